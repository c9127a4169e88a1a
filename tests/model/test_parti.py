"""The Parti model and its sampler: cache exactness, guidance, seeds, sizes, files."""

import dataclasses
import json
import math

import pytest
import torch

from parti_ops.model.config import Config, ConfigError, PartiConfig
from parti_ops.model.errors import ModelFolderError
from parti_ops.model.parti import Parti, PartiDims
from parti_ops.model.presets import PRESETS
from parti_ops.model.sampling import (
    apply_cfg,
    decode_step,
    generate_codes,
    prefill,
    sample_logits,
)

DIMS = PartiDims(text_vocab=40, text_length=12, codebook_size=32, grid=4)
CONFIG = PartiConfig(d_model=32, encoder_layers=2, decoder_layers=2, heads=4)


def _model(seed: int = 0, zero_start: bool = False, **changes) -> Parti:
    """An untrained model with random output projections unless `zero_start` (the model's
    own start, each layer the identity): every path then changes the logits, so the cache
    and guidance checks below can fail."""
    torch.manual_seed(seed)
    model = Parti(config=dataclasses.replace(CONFIG, **changes), dims=DIMS)
    if not zero_start:
        for name, p in model.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.2.weight")):
                torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def _prompts(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, DIMS.text_vocab, (batch, 9), generator=g)
    mask = torch.ones(batch, 9, dtype=torch.bool)
    mask[1:, 6:] = False  # shorter captions, padded
    return ids, mask


@pytest.mark.parametrize("guided", [False, True])
def test_cached_decoding_gives_the_logits_of_full_recomputation_at_every_step(guided):
    model = _model()
    ids, mask = _prompts()
    codes = torch.randint(0, DIMS.codebook_size, (3, DIMS.image_length))
    with torch.no_grad():
        null = torch.tensor([False, False, True])  # an unconditional row too
        full = model(ids, mask, codes, null)
        if guided:  # the null-caption half of a guided batch
            full_null = model(ids, mask, codes, torch.ones(3, dtype=torch.bool))
            full = torch.cat([full, full_null])
        logits, cache = prefill(model, ids, mask, guided=guided, null=null)
        steps = [logits]
        for i in range(DIMS.image_length - 1):
            token = codes[:, i].repeat(2) if guided else codes[:, i]
            logits, cache = decode_step(model, token, cache)
            steps.append(logits)
    cached = torch.stack(steps, dim=1)
    assert cache.length == DIMS.image_length
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_decoding_several_positions_after_a_cache_matches_one_at_a_time():
    model = _model()
    ids, mask = _prompts()
    codes = torch.randint(0, DIMS.codebook_size, (3, DIMS.image_length))
    with torch.no_grad():
        full = model(ids, mask, codes)
        _, cache = prefill(model, ids, mask, guided=False)
        chunk, _ = model.decode(codes[:, :5], cache)  # positions 1..5 after the start token
    torch.testing.assert_close(chunk, full[:, 1:6], atol=1e-5, rtol=0)


def test_guidance_at_scale_one_is_exactly_the_conditional_logits():
    cond, uncond = torch.randn(4, 32), torch.randn(4, 32)
    assert torch.equal(apply_cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(apply_cfg(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(apply_cfg(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_guided_sampling_at_scale_one_samples_the_conditional_model():
    model = _model()
    ids, mask = _prompts()
    seeds = [1, 2, 3]
    guided = generate_codes(model, ids, mask, seeds, guidance_scale=1.0, temperature=1.0, top_p=1.0)
    # The same draw, from conditional logits computed with a guided (two-half) batch.
    with torch.no_grad():
        logits, cache = prefill(model, ids, mask, guided=True)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        codes = []
        for i in range(DIMS.image_length):
            cond, uncond = logits.chunk(2)
            chosen = sample_logits(apply_cfg(cond, uncond, 1.0), generators)
            codes.append(chosen)
            if i + 1 < DIMS.image_length:
                logits, cache = decode_step(model, chosen.repeat(2), cache)
    assert torch.equal(guided.flatten(1), torch.stack(codes, dim=1))


def test_a_fixed_seed_gives_the_same_codes_and_another_seed_others():
    model = _model()
    ids, mask = _prompts()
    kwargs = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 20, "top_p": 0.95}
    first = generate_codes(model, ids, mask, [7, 8, 9], **kwargs)
    again = generate_codes(model, ids, mask, [7, 8, 9], **kwargs)
    other = generate_codes(model, ids, mask, [70, 80, 90], **kwargs)
    assert first.shape == (3, DIMS.grid, DIMS.grid)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sampling_without_the_cache_draws_the_same_codes():
    model = _model()
    ids, mask = _prompts()
    cached = generate_codes(model, ids, mask, [1, 2, 3], guidance_scale=2.0)
    uncached = generate_codes(model, ids, mask, [1, 2, 3], guidance_scale=2.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(400, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    assert sample_logits(logits, gens, temperature=0).eq(1).all()  # greedy
    assert sample_logits(logits, gens, top_k=1).eq(1).all()
    assert sample_logits(logits, gens, top_p=0.01).eq(1).all()  # the top token always stays
    top2 = sample_logits(logits, gens, top_k=2)
    assert set(top2.tolist()) == {1, 3}
    # Without filters the draw follows softmax(logits): here p(1) = 0.64.
    counts = torch.bincount(sample_logits(logits, gens), minlength=4).double() / 400
    torch.testing.assert_close(counts, logits[0].softmax(-1).double(), atol=0.06, rtol=0)
    # top_p = 0.8 keeps {1, 3} (0.64 + 0.24 >= 0.8) and drops the rest.
    assert set(sample_logits(logits, gens, top_p=0.8).tolist()) == {1, 3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
        ({"guidance_scale": math.nan}, "guidance_scale=nan"),
        ({"top_p": 0.0}, r"top_p=0.0: use a number in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_k": -2}, "top_k=-2"),
    ],
)
def test_bad_sampling_settings_are_refused_by_name(kwargs, message):
    model = _model()
    ids, mask = _prompts()
    with pytest.raises(ConfigError, match=message):
        generate_codes(model, ids, mask, [0, 1, 2], **kwargs)
    with pytest.raises(ConfigError, match=message):
        Config.load("tiny", overrides={f"sample.{k}": v for k, v in kwargs.items()})


def test_the_null_caption_ignores_the_text():
    model = _model()
    ids, mask = _prompts()
    other = torch.randint(4, DIMS.text_vocab, ids.shape)
    null = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        a, _ = model.encode_text(ids, mask, null)
        b, _ = model.encode_text(other, mask, null)
        c, _ = model.encode_text(other, mask)
    assert torch.equal(a, b)
    assert not torch.allclose(b, c)


def test_every_layer_starts_as_the_identity():
    model = _model(zero_start=True)
    x = torch.randn(3, 9, CONFIG.d_model)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    cross = model.decoder[0].cross_attn.keys_values(torch.randn(3, 5, CONFIG.d_model))
    text_mask = torch.ones(3, 1, 1, 5, dtype=torch.bool)
    empty = torch.zeros(3, CONFIG.heads, 0, CONFIG.d_model // CONFIG.heads)
    with torch.no_grad():
        assert torch.equal(model.encoder[0](x, mask), x)
        out, _ = model.decoder[0](x, (empty, empty), cross, text_mask)
    assert torch.equal(out, x)
    # With random output projections the same layers change their input.
    with torch.no_grad():
        assert not torch.allclose(_model().encoder[0](x, mask), x)


def test_the_mlp_activation_is_relu_squared():
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(_model().decoder[0].mlp[1](x), x.clamp(min=0) ** 2)


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    loaded = Parti.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.dims == DIMS
    state = loaded.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    # A folder that holds since-removed options at the behaviour that stayed loads, with the
    # same outputs (`zero_init` at either value: it chose only the starting weights).
    config = tmp_path / "m" / "config.json"
    body = json.loads(config.read_text())
    removed = {"tie_head": True, "prompt_start": True, "qk_norm": True, "zero_init": False}
    removed["activation"] = "relu2"
    config.write_text(json.dumps({**body, "parti": {**body["parti"], **removed}}))
    old = Parti.from_pretrained(tmp_path / "m")
    assert old.config == model.config
    ids, mask = _prompts()
    codes = torch.randint(0, DIMS.codebook_size, (3, DIMS.image_length))
    with torch.no_grad():
        assert torch.equal(old(ids, mask, codes), model.eval()(ids, mask, codes))
    # One with GELU MLPs holds a branch since removed: retrain it. So does one from before
    # `activation` existed (GELU): it holds `tie_head`, as every folder did until it was
    # removed, but no `activation`; the oldest lack `prompt_start` and `qk_norm` too.
    assert "activation" not in body["parti"] and "tie_head" not in body["parti"]
    gelu = {**body["parti"], "activation": "gelu"}
    older = {**body["parti"], "tie_head": True, "prompt_start": True, "qk_norm": True}
    oldest = {**body["parti"], "tie_head": True}
    for parti in (gelu, older, oldest):
        config.write_text(json.dumps({**body, "parti": parti}))
        with pytest.raises(ModelFolderError, match="'gelu' MLPs.*retrain it"):
            Parti.from_pretrained(tmp_path / "m")
    config.write_text(json.dumps({**body, "parti": {**body["parti"], "qk_norm": False}}))
    with pytest.raises(ValueError, match="parti.qk_norm was removed; only True is"):
        Parti.from_pretrained(tmp_path / "m")
    config.write_text(json.dumps(body))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a Parti model folder"):
        Parti.from_pretrained(tmp_path / "m")


# Parameter counts of Parti's Table 1 (Yu et al. 2022).
PAPER = {"parti-350m": 350e6, "parti-750m": 750e6, "parti-3b": 3e9, "parti-20b": 20e9}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_paper_sizes_match_the_paper(name):
    config = Config.from_name(name)
    dims = PartiDims(
        text_vocab=config.text_tokenizer.vocab_size,
        text_length=config.text_tokenizer.max_length,
        codebook_size=config.image_tokenizer.codebook_size,
        grid=config.image_grid,
    )
    with torch.device("meta"):
        model = Parti(config=config.parti, dims=dims)
    count = model.num_parameters()
    if name in PAPER:
        assert abs(count / PAPER[name] - 1) <= 0.10, f"{name}: {count / 1e6:.0f}M parameters"
    else:
        assert 5e4 < count < 350e6  # quick: 95k, tiny: 0.46M, small: ~60M
