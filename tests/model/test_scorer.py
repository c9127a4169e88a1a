"""Scorer training: stopped by SIGTERM and resumed, it equals an uninterrupted run."""

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

from parti_ops.model.checkpoint import CheckpointError, list_checkpoints
from parti_ops.model.config import ScorerConfig, TextTokenizerConfig
from parti_ops.model.layout import CHECKPOINTS, PREEMPTED_EXIT_CODE
from parti_ops.model.scenes import describe, render, sample_scene
from parti_ops.model.scorer import train_scorer
from parti_ops.model.text_tokenizer import train_text_tokenizer

SMALL = ScorerConfig(
    embed_dim=16,
    channels=4,
    text_width=16,
    text_layers=1,
    text_heads=2,
    steps=6,
    batch_size=4,
    warmup_steps=2,
    negatives_per_step=1,
    checkpoint_every=2,
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(images (12, 16, 16, 3) uint8, their captions, a caption tokenizer folder)."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, heldout=False) for _ in range(12)]
    images = torch.from_numpy(
        np.stack([np.asarray(render(s, image_size=16, rng=rng)) for s in scenes])
    )
    captions = [describe(s, rng) for s in scenes]
    tokenizer = tmp_path_factory.mktemp("text_tokenizer")
    train_text_tokenizer(captions * 4, TextTokenizerConfig(max_length=24)).save_pretrained(
        tokenizer
    )
    return images, captions, tokenizer


def _train(pairs, out, config=SMALL, **kwargs):
    images, captions, tokenizer = pairs
    # Another image's caption as each one's negative: the (seed, step)-drawn columns too.
    negatives = [[captions[i - 1]] for i in range(len(captions))]
    model = train_scorer(
        config, images, captions, tokenizer, 24, out, negatives=negatives, **kwargs
    )
    return model.state_dict()


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, pairs):
    straight = _train(pairs, tmp_path / "straight")
    assert [p.name for p in list_checkpoints(tmp_path / "straight" / CHECKPOINTS)] == [
        "step-00000004.safetensors",
        "step-00000006.safetensors",
    ]

    def preempt(step: int, total: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        _train(pairs, tmp_path / "split", progress=preempt)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    with pytest.raises(CheckpointError, match="pass --resume"):
        _train(pairs, tmp_path / "split")
    resumed = _train(pairs, tmp_path / "split", resume=True)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_resuming_with_another_architecture_names_the_field(tmp_path, pairs):
    _train(pairs, tmp_path, dataclasses.replace(SMALL, steps=2))
    wider = dataclasses.replace(SMALL, embed_dim=32)
    with pytest.raises(CheckpointError, match="embed_dim: 16 in checkpoint, 32 now"):
        _train(pairs, tmp_path, wider, resume=True)


def test_without_checkpoint_every_no_checkpoints_are_written(tmp_path, pairs):
    logged = []
    config = dataclasses.replace(SMALL, checkpoint_every=0)
    _train(pairs, tmp_path, config, log_every=3, log_metrics=lambda m, s: logged.append(s))
    assert not list_checkpoints(tmp_path / CHECKPOINTS) and logged == [3, 6]
    _train(pairs, tmp_path, config)  # and so nothing to refuse
