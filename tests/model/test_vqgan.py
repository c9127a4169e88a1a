import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parti_ops.model import vqgan as vqgan_module
from parti_ops.model import vqgan_train
from parti_ops.model.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from parti_ops.model.config import ImageTokenizerConfig
from parti_ops.model.loop import batch_indices, lr_factor
from parti_ops.model.quantizer import FactorizedQuantizer, _kmeans_pp
from parti_ops.model.scenes import heldout_pairs, render, sample_scene
from parti_ops.model.vqgan import VQGAN, PerceptualLoss, to_uint8, to_unit
from parti_ops.model.vqgan_train import (
    CHECKPOINTS,
    edge_weights,
    evaluate_vqgan,
    reconstruction_grid,
    train_vqgan,
)

# A model small enough to train for a few steps in a second.
TINY = ImageTokenizerConfig(
    channels=8,
    latent_dim=16,
    codebook_size=32,
    codebook_dim=4,
    vit_heads=2,
    vit_depth=1,
    steps=6,
    batch_size=4,
    warmup_steps=2,
    gan_weight=0.1,
    gan_start=3,
    disc_channels=8,
    checkpoint_every=2,
    quantize_after=0.0,
    kmeans_images=16,
)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    pictures = [
        np.asarray(render(sample_scene(rng, heldout=False), image_size=size, rng=rng))
        for _ in range(n)
    ]
    return torch.from_numpy(np.stack(pictures))


@pytest.mark.parametrize("architecture", ["patch", "vit"])
def test_codes_have_the_grid_shape_and_decode_back(architecture):
    config = dataclasses.replace(TINY, architecture=architecture)
    model = VQGAN(config=config, image_size=16).eval()
    x = to_unit(_images(3))
    with torch.no_grad():
        quantized, codes, _ = model.encode(x)
        assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
        assert int(codes.min()) >= 0 and int(codes.max()) < config.codebook_size
        from_codes = model.decode_codes(codes)
        assert from_codes.shape == (3, 3, 16, 16)
        torch.testing.assert_close(from_codes, model.decode(quantized), atol=1e-5, rtol=1e-5)


def _reconstruction_errors(model: VQGAN, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model.decode_codes(codes) - x).square().mean(dim=(1, 2, 3))


def test_tokenize_without_refinement_gives_the_codes_of_the_forward_pass():
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, architecture="patch", refine_candidates=1)
    model = VQGAN(config=config, image_size=16).eval()
    x = to_unit(_images(3))
    assert torch.equal(model.tokenize(x), model.encode(x)[1])


@pytest.mark.parametrize("architecture", ["patch", "vit"])
def test_refined_codes_reconstruct_each_image_closer(architecture):
    torch.manual_seed(0)
    config = dataclasses.replace(
        TINY, architecture=architecture, refine_candidates=8, refine_margin=0
    )
    model = VQGAN(config=config, image_size=16).eval()
    x = to_unit(_images(4))
    with torch.no_grad():
        candidates = model.quantizer.nearest(model.encoder(x), 8)
    codes = model.tokenize(x)
    nearest = candidates[..., 0]
    assert (codes.unsqueeze(-1) == candidates).any(dim=-1).all()
    assert not torch.equal(codes, nearest)  # an untrained codebook: the nearest code is poor
    refined, plain = (
        _reconstruction_errors(model, codes, x),
        _reconstruction_errors(model, nearest, x),
    )
    assert (refined <= plain).all() and (refined < plain).any()
    assert not model.tokenize(x).requires_grad and model.tokenize(x[:1]).shape == (1, 4, 4)


def test_refinement_keeps_the_nearest_code_unless_the_gain_passes_the_margin():
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, architecture="patch", refine_candidates=8)
    model = VQGAN(config=config, image_size=16).eval()
    x = to_unit(_images(3))
    nearest = model.encode(x)[1]
    model.config = dataclasses.replace(config, refine_margin=1e6)
    assert torch.equal(model.tokenize(x), nearest)
    model.config = dataclasses.replace(config, refine_candidates=10**6)  # at most every code
    assert model.tokenize(x).shape == nearest.shape


def test_context_blocks_train_under_torch_compile_as_in_eager():
    torch.manual_seed(0)
    block = vqgan_module._ContextBlock(8)
    x = torch.randn(2, 8, 4, 4)
    eager_out = block(x.requires_grad_(True))
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), x)
    compiled_out = torch.compile(block)(x)
    (compiled_grad,) = torch.autograd.grad(compiled_out.square().sum(), x)
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-5)


def test_codebook_lookup_is_l2_normalised_in_the_low_dimensional_space():
    model = VQGAN(config=TINY, image_size=16).train()
    model(to_unit(_images(8)))  # k-means initialises the codebook on the first batch
    codebook = model.quantizer.codebook  # (codebook_size, codebook_dim)
    assert codebook.shape == (TINY.codebook_size, TINY.codebook_dim)
    torch.testing.assert_close(codebook.norm(dim=-1), torch.ones(TINY.codebook_size))


def test_pixel_conversions_round_trip():
    images = _images(2)
    unit = to_unit(images)
    assert unit.shape == (2, 3, 16, 16) and unit.min() >= -1 and unit.max() <= 1
    assert torch.equal(to_uint8(unit), images)


def test_save_and_load_give_the_same_codes(tmp_path):
    model = VQGAN(config=TINY, image_size=16).train()
    model(to_unit(_images(8, seed=1)))  # codebook initialised, as after training
    model.eval().save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    x = to_unit(_images(4))
    with torch.no_grad():
        assert torch.equal(model.encode(x)[1], loaded.encode(x)[1])
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 16
    with pytest.raises(ValueError, match="parti tokenizer image train"):
        VQGAN.from_pretrained(tmp_path / "missing")


def test_a_folder_with_a_removed_option_loads_only_at_the_surviving_behaviour(tmp_path):
    VQGAN(config=TINY, image_size=16).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    body = json.loads(path.read_text())
    # Straight-through gradients, L2 alone and no EMA of the weights, as now.
    body["image_tokenizer"] |= {"rotation_trick": False, "l1_weight": 0.0, "ema_decay": 0.0}
    path.write_text(json.dumps(body))
    assert VQGAN.from_pretrained(tmp_path).config == TINY
    for option, value, says in (
        ("rotation_trick", True, "rotation_trick was removed; only False is supported"),
        ("ema_decay", 0.9, "ema_decay was removed; only 0.0 is supported"),
        ("l1_weight", 1.0, "l1_weight was removed; only 0.0 is supported"),
        ("architecture", "conv", r"architecture='conv': use patch\|vit"),
    ):
        changed = {**body["image_tokenizer"], option: value}
        path.write_text(json.dumps({**body, "image_tokenizer": changed}))
        with pytest.raises(ValueError, match=says):
            VQGAN.from_pretrained(tmp_path)


def test_the_decoder_reads_scaled_unit_vectors_and_older_folders_load_unscaled(tmp_path):
    model = VQGAN(config=dataclasses.replace(TINY, encoder_context=0), image_size=16).train()
    model(to_unit(_images(8, seed=1)))
    model.eval()
    codes = model.encode(to_unit(_images(2)))[1]
    project_out = model.quantizer.project_out
    expected = project_out(model.quantizer.codebook[codes] * TINY.codebook_dim**0.5)
    with torch.no_grad():
        torch.testing.assert_close(model.quantizer.lookup(codes), expected.permute(0, 3, 1, 2))
    # A folder saved before `scaled_lookup` and `encoder_context` existed: its decoder
    # read the unit vectors, and its encoder had no context blocks.
    model.save_pretrained(tmp_path)
    body = json.loads((tmp_path / "config.json").read_text())
    for field in ("scaled_lookup", "encoder_context", "refine_candidates"):
        del body["image_tokenizer"][field]
    (tmp_path / "config.json").write_text(json.dumps(body))
    old = VQGAN.from_pretrained(tmp_path)
    assert not old.config.scaled_lookup and old.config.encoder_context == 0
    assert old.config.refine_candidates == 1  # its codes were the nearest ones
    with torch.no_grad():
        unscaled = project_out(model.quantizer.codebook[codes]).permute(0, 3, 1, 2)
        torch.testing.assert_close(old.quantizer.lookup(codes), unscaled)


def test_batches_visit_every_image_once_per_epoch():
    seen = torch.cat([batch_indices(step, 4, 10, seed=3) for step in range(5)])  # 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, 4, 10, seed=3), batch_indices(2, 4, 10, seed=3))
    assert not torch.equal(seen[:10], seen[10:])  # a new order each epoch


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = dataclasses.replace(TINY, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert lr_factor(100, config) == pytest.approx(0.1)
    # "wsd": the peak until the last 40 % of the steps, then a straight line to the floor.
    wsd = [lr_factor(s, config, "wsd") for s in range(101)]
    assert wsd[:10] == factors[:10] and wsd[10:61] == [1.0] * 51
    assert wsd[80] == pytest.approx(0.55) and wsd[100] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(wsd[60:], wsd[61:], strict=False))


def test_training_reduces_the_loss_and_saves_the_model(tmp_path):
    images = _images(32)
    config = dataclasses.replace(TINY, steps=40, gan_start=30, checkpoint_every=20, lr=3e-3)
    logged: list[tuple[int, dict]] = []
    model = train_vqgan(
        config, images, tmp_path, log_metrics=lambda m, s: logged.append((s, m)), log_every=10
    )
    assert [s for s, _ in logged] == [10, 20, 30, 40]
    assert logged[-1][1]["loss/l2"] < logged[0][1]["loss/l2"]
    assert "loss/d" in logged[-1][1] and "loss/d" not in logged[0][1]  # GAN after gan_start
    saved = VQGAN.from_pretrained(tmp_path).state_dict()  # the trained weights as they are
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert [p.name for p in list_checkpoints(tmp_path / CHECKPOINTS)] == [
        "step-00000020.safetensors",
        "step-00000040.safetensors",
    ]
    metrics, recon = evaluate_vqgan(model, images[:8], None, batch_size=3)
    assert recon.shape == images[:8].shape and recon.dtype == torch.uint8
    mse = (recon.double() - images[:8].double()).pow(2).mean(dim=(1, 2, 3))
    assert metrics["psnr"] == pytest.approx(
        float((10 * torch.log10(255**2 / mse)).mean()), rel=1e-4
    )
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= config.codebook_size
    assert reconstruction_grid(images[:8], recon).size == (4 * 32, 2 * 16)


def test_oracle_diagnostics_split_the_codebook_cost_and_the_heldout_pairs(monkeypatch):
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, heldout=i % 2 == 0) for i in range(12)]
    images = torch.from_numpy(
        np.stack([np.asarray(render(s, image_size=32, rng=rng)) for s in scenes])
    )
    held = heldout_pairs()
    lost = [any((o.colour, o.shape) in held for o in s.objects) for s in scenes]
    assert 0 < sum(lost) < len(lost)

    def fake_reconstruct(model, batch, batch_size, quantize=True):
        # Unquantised: perfect. Quantised: scenes with a held-out pair come back blank.
        recon = batch.clone()
        if quantize:
            recon[torch.tensor(lost)] = 0
        return recon, torch.zeros(len(batch), 2, 2, dtype=torch.long)

    monkeypatch.setattr(vqgan_train, "reconstruct", fake_reconstruct)
    model = VQGAN(config=TINY, image_size=32)
    metrics, _ = evaluate_vqgan(model, images, scenes)
    assert metrics["oracle_exact_unquantized"] == 1.0
    assert metrics["oracle_exact"] == pytest.approx(1 - np.mean(lost))
    assert metrics["oracle_objects_heldout_pair"] == 0.0  # each sits in a blanked scene
    seen = [
        (lst, o)
        for lst, s in zip(lost, scenes, strict=True)
        for o in s.objects
        if (o.colour, o.shape) not in held
    ]
    assert metrics["oracle_objects_seen_pair"] == pytest.approx(
        np.mean([not lst for lst, _ in seen])
    )


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    images = _images(24)
    whole = train_vqgan(TINY, images, tmp_path / "whole")
    train_vqgan(dataclasses.replace(TINY, steps=3), images, tmp_path / "split")
    resumed = train_vqgan(TINY, images, tmp_path / "split", resume=True)
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (
        tmp_path / "split" / "model.safetensors"
    ).read_bytes()
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_sigterm_and_resume_across_the_codebook_fit_equal_uninterrupted_training(tmp_path):
    # Quantisation (and the k-means fit of the codebook) starts at step 4 of 8; the run
    # is stopped at step 3 by SIGTERM, so the resumed run does the fit.
    config = dataclasses.replace(TINY, steps=8, quantize_after=0.5)
    images = _images(24)
    whole = train_vqgan(config, images, tmp_path / "whole")

    def stop_at_three(step, total):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        train_vqgan(config, images, tmp_path / "split", progress=stop_at_three)
    assert stopped.value.code == 143
    assert latest_checkpoint(tmp_path / "split" / CHECKPOINTS)[2]["step"] == 3
    resumed = train_vqgan(config, images, tmp_path / "split", resume=True)
    assert bool(resumed.quantizer.initted)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_codebook_is_fitted_when_quantisation_starts(tmp_path):
    config = dataclasses.replace(
        TINY, steps=4, quantize_after=0.5, checkpoint_every=1, keep_checkpoints=4
    )
    model = train_vqgan(config, _images(8), tmp_path)
    fitted = [
        bool(load_checkpoint(path)[0]["model.quantizer.initted"])
        for path in list_checkpoints(tmp_path / CHECKPOINTS)
    ]
    assert fitted == [False, False, True, True]  # unquantised warm-up for 2 of 4 steps
    torch.testing.assert_close(
        model.quantizer.codebook.norm(dim=-1), torch.ones(config.codebook_size)
    )


def test_edge_weights_favour_outlines_and_average_one():
    images = -torch.ones(1, 3, 8, 8)
    images[:, 0, 1:6, 1:6] = 1.0  # a red 5x5 square on black
    weight = edge_weights(images, extra=4.0)
    assert weight.shape == (1, 1, 8, 8)
    assert float(weight.mean()) == pytest.approx(1.0)
    assert weight[0, 0, 0, 0] == weight[0, 0, 1, 1] == weight.max()  # both sides of the rim
    assert weight[0, 0, 3, 3] == weight[0, 0, 7, 7] == weight.min()  # inside and outside
    assert weight.max() == pytest.approx(5 * weight.min())
    assert torch.equal(edge_weights(-torch.ones(1, 3, 4, 4), 4.0), torch.ones(1, 1, 4, 4))


def test_kmeans_seeds_give_rare_vectors_codes_of_their_own():
    torch.manual_seed(0)
    rare = F.normalize(torch.randn(5, 8), dim=-1)
    common = F.normalize(torch.randn(1, 8), dim=-1).expand(1000, 8)
    seeds = _kmeans_pp(torch.cat([common, rare]), 6)
    distinct = {tuple(v.tolist()) for v in torch.cat([common[:1], rare])}
    assert {tuple(v.tolist()) for v in seeds} == distinct  # uniform draws would miss them


def test_dead_codes_are_reseeded_from_badly_fitted_vectors():
    torch.manual_seed(0)
    quantizer = FactorizedQuantizer(
        dim=8, codebook_size=4, codebook_dim=8, decay=0.99, kmeans_init=False,
        dead_code_threshold=0.5, commitment_weight=0.25,
    ).train()  # fmt: skip
    fitted = quantizer.codebook[0].clone()
    odd = F.normalize(torch.randn(8), dim=0)
    samples = torch.cat([fitted.expand(99, 8), odd[None]])
    similarity = (samples @ quantizer.codebook.t()).amax(dim=-1)
    quantizer.cluster_size.fill_(1.0)
    quantizer.cluster_size[3] = 0.0  # code 3 is dead
    quantizer._reseed_dead_codes(samples, similarity)
    torch.testing.assert_close(quantizer.codebook[3], odd)  # not one of the 99 fitted ones


def test_existing_checkpoints_need_resume_and_a_matching_config(tmp_path):
    images = _images(8)
    train_vqgan(dataclasses.replace(TINY, steps=2), images, tmp_path)
    with pytest.raises(CheckpointError, match="--resume"):
        train_vqgan(TINY, images, tmp_path)
    with pytest.raises(CheckpointError, match="codebook_size: 32 in checkpoint, 64 now"):
        train_vqgan(dataclasses.replace(TINY, codebook_size=64), images, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        train_vqgan(TINY, images, tmp_path / "empty", resume=True)


def _two_checkpoints(folder):
    for step in (1, 2):
        save_checkpoint(folder, step, {"w": torch.full((64,), float(step))}, {"note": step}, keep=2)
    return list_checkpoints(folder)


def test_truncated_checkpoint_is_refused_and_the_earlier_one_still_loads(tmp_path):
    older, newer = _two_checkpoints(tmp_path)
    newer.write_bytes(newer.read_bytes()[:-100])  # as a crash mid-copy would leave it
    with pytest.raises(CheckpointError, match=r"step-00000002.*unreadable.*truncated"):
        load_checkpoint(newer)
    path, tensors, meta = latest_checkpoint(tmp_path)
    assert path == older and meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(64))
    assert not newer.exists() and newer.with_name(newer.name + ".refused").exists()  # kept aside
    assert list_checkpoints(tmp_path) == [older]


def test_corrupted_checkpoint_fails_its_checksum(tmp_path):
    _, newer = _two_checkpoints(tmp_path)
    data = bytearray(newer.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data, same size
    newer.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(newer)
    assert latest_checkpoint(tmp_path)[2]["step"] == 1


def test_only_the_newest_checkpoints_are_kept_and_temp_files_ignored(tmp_path):
    for step in range(5):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, keep=2)
    (tmp_path / ".step-00000009.safetensors.123.tmp").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000003.safetensors",
        "step-00000004.safetensors",
    ]
    assert latest_checkpoint(tmp_path)[2]["step"] == 4


def test_perceptual_loss_runs_on_a_local_vision_model(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(
            image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32,
        )
    ).save_pretrained(tmp_path)  # fmt: skip
    loss = PerceptualLoss(tmp_path)
    a = to_unit(_images(2))
    b = a.flip(-1).clone().requires_grad_(True)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    value = loss(b, a)
    value.backward()
    assert value.item() > 0 and b.grad is not None and b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(FileNotFoundError, match="perceptual_model"):
        PerceptualLoss(tmp_path / "nowhere")


@pytest.mark.parametrize("context", [0, 1])
def test_a_patch_code_sees_its_own_pixels_and_encoder_context_patches_around(context):
    config = dataclasses.replace(TINY, architecture="patch", encoder_context=context)
    model = VQGAN(config=config, image_size=16).eval()
    x = to_unit(_images(1))
    y = x.clone()
    y[:, :, 4:8, 4:8] = torch.rand(1, 3, 4, 4)  # the patch of code (1, 1) only
    with torch.no_grad():
        before, after = model.encoder(x), model.encoder(y)
    changed = (before - after).abs().amax(dim=1)[0] > 0  # (h, w)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1 - context : 2 + context, 1 - context : 2 + context] = True
    assert torch.equal(changed, expected)
