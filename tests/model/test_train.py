"""Decoder training: it learns, it resumes bit for bit, it refuses other configs' checkpoints."""

import dataclasses
import os
import signal

import pytest
import torch

from parti_ops.model.checkpoint import CheckpointError, list_checkpoints
from parti_ops.model.config import PartiConfig, TrainConfig
from parti_ops.model.layout import PREEMPTED_EXIT_CODE
from parti_ops.model.parti import Parti, PartiDims
from parti_ops.model.train import (
    CHECKPOINTS,
    MODEL,
    CodeData,
    _optimizer,
    caption_drops,
    fit,
    heldout_nll,
)

DIMS = PartiDims(text_vocab=24, text_length=8, codebook_size=16, grid=4)
CONFIG = PartiConfig(d_model=32, encoder_layers=1, decoder_layers=2, heads=4, dropout=0.1)
TRAIN = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=3, log_every=2)


def _data(rows: int = 24) -> CodeData:
    """Captions whose first word fixes the image: code = word, everywhere (learnable)."""
    g = torch.Generator().manual_seed(0)
    word = torch.randint(4, 20, (rows,), generator=g)
    ids = torch.zeros(rows, DIMS.text_length, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = 2, word, 3
    mask = ids != 0
    codes = (word - 4)[:, None].repeat(1, DIMS.image_length)
    return CodeData(codes=codes, text_ids=ids, text_mask=mask)


def _weights(folder) -> dict[str, torch.Tensor]:
    return Parti.from_pretrained(folder / MODEL).state_dict()


def test_fit_learns_and_saves_a_loadable_model(tmp_path):
    history = []
    data = _data()
    train = dataclasses.replace(TRAIN, steps=40, checkpoint_every=100)
    model = fit(CONFIG, train, DIMS, data, tmp_path, log_metrics=lambda m, s: history.append(m))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["tokens_per_s"] > 0 and "mfu" not in history[-1]  # MFU: GPUs only
    assert heldout_nll(model, data) < history[0]["bits_per_token"]
    assert [p.name for p in list_checkpoints(tmp_path / CHECKPOINTS)] == [
        "step-00000040.safetensors"
    ]
    loaded = _weights(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.items())


def test_sigterm_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    data = _data()
    fit(CONFIG, TRAIN, DIMS, data, tmp_path / "straight")

    def preempt(step: int, total: int) -> None:
        if step == 4:  # between steps, as a pod's SIGTERM would arrive
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        fit(CONFIG, TRAIN, DIMS, data, tmp_path / "stopped", progress=preempt)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    names = [p.name for p in list_checkpoints(tmp_path / "stopped" / CHECKPOINTS)]
    assert names == ["step-00000003.safetensors", "step-00000004.safetensors"]
    with pytest.raises(CheckpointError, match="pass --resume"):
        fit(CONFIG, TRAIN, DIMS, data, tmp_path / "stopped")
    fit(CONFIG, TRAIN, DIMS, data, tmp_path / "stopped", resume=True)

    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "stopped")
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_resuming_with_another_model_config_names_the_fields(tmp_path):
    data = _data()
    fit(CONFIG, dataclasses.replace(TRAIN, steps=3), DIMS, data, tmp_path)
    wider = dataclasses.replace(CONFIG, d_model=64)
    with pytest.raises(CheckpointError, match="d_model: 32 in checkpoint, 64 now"):
        fit(wider, TRAIN, DIMS, data, tmp_path, resume=True)
    # What the tokenizers fix counts too.
    more_codes = dataclasses.replace(DIMS, codebook_size=32)
    with pytest.raises(CheckpointError, match="codebook_size: 16 in checkpoint, 32 now"):
        fit(CONFIG, TRAIN, more_codes, data, tmp_path, resume=True)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = _data()
    one = dataclasses.replace(TRAIN, steps=3, caption_dropout=0.0)
    accumulated = dataclasses.replace(one, grad_accum=4)
    cfg = dataclasses.replace(CONFIG, dropout=0.0)
    fit(cfg, one, DIMS, data, tmp_path / "one")
    fit(cfg, accumulated, DIMS, data, tmp_path / "acc")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "acc")
    # Adam divides by the gradient's RMS, so where a gradient is near zero (a QK-norm
    # gain) summation-order noise moves a weight by up to ~3e-5 in 3 steps of lr 3e-3;
    # a wrong accumulation moves weights by the order of the learning rate.
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)


def test_caption_dropout_is_a_function_of_the_step():
    drops = caption_drops(5, 10_000, 0.1, seed=0)
    assert torch.equal(drops, caption_drops(5, 10_000, 0.1, seed=0))
    assert not torch.equal(drops, caption_drops(6, 10_000, 0.1, seed=0))
    assert 0.08 < drops.float().mean() < 0.12


def test_the_first_code_is_learned_from_the_caption(tmp_path):
    # Only the first code depends on the caption and the rest are all 0, so nothing before
    # position 0 can tell the model what to draw there: the caption must reach it.
    data = _data(rows=64)
    first = data.codes[:, 0].clone()
    codes = torch.zeros_like(data.codes)
    codes[:, 0] = first
    data = dataclasses.replace(data, codes=codes)
    train = dataclasses.replace(TRAIN, steps=150, batch_size=16, checkpoint_every=100)
    model = fit(dataclasses.replace(CONFIG, dropout=0.0), train, DIMS, data, tmp_path)
    with torch.no_grad():
        conditional = model(data.text_ids, data.text_mask, codes)[:, 0].argmax(-1)
        null = torch.ones(len(codes), dtype=torch.bool)
        unconditional = model(data.text_ids, data.text_mask, codes, null)[:, 0].argmax(-1)
    assert (conditional == first).float().mean() >= 0.95
    assert (unconditional == first).float().mean() <= 0.5  # the null caption cannot know


def test_muon_takes_the_hidden_matrices_and_adamw_the_input_and_output():
    model = Parti(config=CONFIG, dims=DIMS)
    names = {id(p): name for name, p in model.named_parameters()}
    hidden, rest = (
        {names[id(p)] for p in group["params"]} for group in _optimizer(model, TRAIN).param_groups
    )
    assert {"decoder.0.mlp.0.weight", "decoder.1.cross_attn.kv.weight"} <= hidden
    # The input and output: code_embed is also the (tied) output head.
    outer = {"code_embed.weight", "text_embed.weight", "row_pos", "text_pos"}
    assert outer <= rest and not outer & hidden
    assert hidden | rest == set(names.values())
