"""One typed configuration object with named presets (model/presets.py).

`Config.from_name("tiny")` gives a preset; `Config.load(preset, yaml_path, overrides)`
layers a YAML file and `section.field=value` overrides on top of it, the way the
CLI and the pipeline components build theirs. Every section is a frozen dataclass
whose fields declare their ranges (`setting(64, ge=8, le=1024)`), checked when a
section is made, so a bad value fails with the field's name, not deep inside a step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

from parti_ops.model.errors import PartiError


class ConfigError(PartiError, ValueError):
    """A configuration value or key that cannot be used; the message says which."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_RANGE = "range"  # the field metadata key `setting` files a field's Range under


@dataclass(frozen=True)
class Range:
    """The values a setting takes: bounds (`ge`, `le` inclusive; `gt`, `lt` exclusive; NaN
    is outside any, `lt=math.inf` keeps out infinity) or a tuple of `choices`; `note`
    explains a value."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    note: str = ""

    def allows(self, value: Any) -> bool:
        """Whether `value` is one of the choices, or a number within the bounds."""
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return False
        bounds = (
            (operator.ge, self.ge),
            (operator.gt, self.gt),
            (operator.le, self.le),
            (operator.lt, self.lt),
        )
        return all(b is None or holds(value, b) for holds, b in bounds)

    def describe(self, value: Any) -> str:
        """What to use instead of `value`: "8..1024", "a number in (0, 1]", ">= 1",
        "a finite number >= 0" (`lt=math.inf`), "patch|vit"."""
        lows = [(sign, b) for sign, b in ((">=", self.ge), (">", self.gt)) if b is not None]
        highs = [(sign, b) for sign, b in (("<=", self.le), ("<", self.lt)) if b is not None]
        if self.choices is not None:
            what = "|".join(map(str, self.choices))
        elif lows and highs:
            (low_sign, low), (high_sign, high) = lows[0], highs[0]
            closed = low_sign == ">=" and high_sign == "<="
            if high == math.inf:
                what = f"a finite number {low_sign} {low}"
            elif closed and all(isinstance(x, int) for x in (value, low, high)):
                what = f"{low}..{high}"  # a count
            else:
                left = "(" if low_sign == ">" else "["
                right = ")" if high_sign == "<" else "]"
                what = f"a number in {left}{low}, {high}{right}"
        else:
            sign, bound = (lows or highs)[0]
            what = f"{sign} {bound}"
        return f"{what} ({self.note})" if self.note else what

    def check(self, name: str, value: Any) -> None:
        """Raise ConfigError `name=value: use ...` unless the value is allowed."""
        if not self.allows(value):
            shown = repr(value) if isinstance(value, str) else value
            raise ConfigError(f"{name}={shown}: use {self.describe(value)}")


def setting(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    note: str = "",
) -> Any:
    """A section field with a default and the Range of values it takes, checked when a
    section is made: `image_size: int = setting(64, ge=8, le=1024)`."""
    rule = Range(ge=ge, gt=gt, le=le, lt=lt, choices=choices, note=note)
    return field(default=default, metadata={_RANGE: rule})


class Section:
    """Base of the config sections: each field's declared Range is checked when one is made.

    A subclass names its section, `class DataConfig(Section, section="data")`, for the
    messages (`data.image_size=4: use 8..1024`); rules across fields go in its own
    `__post_init__`, after `super().__post_init__()`.
    """

    section: ClassVar[str]

    def __init_subclass__(cls, *, section: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.section = section

    def __post_init__(self) -> None:
        for f in fields(self):
            if (rule := f.metadata.get(_RANGE)) is not None:
                rule.check(f"{self.section}.{f.name}", getattr(self, f.name))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """The section from saved values (a model folder's config.json), read as the loader
        reads a YAML section: unknown keys are errors, removed ones pass at the surviving value."""
        return _merge(cls(), values, prefix=f"{cls.section}.")


@dataclass(frozen=True)
class DataConfig(Section, section="data"):
    """The data: how the synthetic set is drawn, ingest canonicalises, validation accepts."""

    image_size: int = setting(64, ge=8, le=1024)
    # Synthetic set. `heldout_fraction` of the images show a (colour, shape) pair
    # that never appears in train/validation: the compositional-generalisation split.
    # 20 000: the tiny decoder's ten minutes pass over 6 000 images about eight times and
    # begin to memorise them; on 20 000 the same run drew more held-out scenes exactly
    # (67 / 67 % against 61 / 57 %, on the held-out prompts of a 6 000-image set).
    num_images: int = setting(20_000, ge=10)
    seed: int = 0
    heldout_fraction: float = setting(0.1, gt=0, lt=0.5)
    validation_fraction: float = setting(0.05, gt=0, lt=0.5)
    # Ingest. Rows without a split get one from their content hash: `validation_fraction`
    # of them validation, `test_fraction` test, the rest train, so re-ingesting the same
    # files in any order gives the same splits. (The synthetic set writes its own splits,
    # its test share being `heldout_fraction`.)
    test_fraction: float = setting(0.05, ge=0, lt=0.5)
    shard_size: int = setting(1000, ge=1)
    caption_column: str | None = None  # None: "text", else "caption"
    max_image_pixels: int = setting(50_000_000, gt=0)  # larger ones are decompression bombs
    # Validation (Great Expectations). Each row-level expectation allows at most
    # `max_quarantine_fraction` failures; past that the run stops.
    min_image_side: int = setting(16, ge=1)  # and at most max_image_side
    max_image_side: int = 8192
    max_aspect_ratio: float = setting(4.0, ge=1)
    max_caption_chars: int = setting(1000, ge=1)
    max_caption_words: int = setting(200, ge=1)
    max_quarantine_fraction: float = setting(0.05, ge=0, le=1)
    # Each split present must hold a share within these bounds. Where the content hash
    # split the whole set, they widen by its sampling noise around the fractions above
    # (components/validate.py), so the split ingest draws passes at any set size.
    min_split_fraction: float = setting(0.01, ge=0, le=1)
    max_split_fraction: float = setting(0.95, ge=0, le=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.min_image_side <= self.max_image_side,
            f"data.min_image_side={self.min_image_side}: use at most data.max_image_side"
            f" ({self.max_image_side})",
        )
        _check(
            self.min_split_fraction <= self.max_split_fraction,
            f"data.min_split_fraction={self.min_split_fraction}: use at most"
            f" data.max_split_fraction ({self.max_split_fraction})",
        )


@dataclass(frozen=True)
class TextTokenizerConfig(Section, section="text_tokenizer"):
    """The caption tokenizer, trained with Hugging Face `tokenizers` on the training captions."""

    # "bpe", or "unigram" (SentencePiece's model, as Parti) for real caption corpora: on
    # a closed vocabulary of a few dozen words Unigram stays at characters.
    kind: str = setting("bpe", choices=("unigram", "bpe"))
    # Parti: 16k; an upper bound, small caption sets give fewer pieces. Token ids are
    # stored as uint16 once encoded.
    vocab_size: int = setting(512, ge=16, le=65_536)
    lowercase: bool = True  # after NFKC normalisation
    # Tokens with <s> and </s>; longer captions are truncated, and counted.
    max_length: int = setting(64, ge=3, note="<s>, a token, </s>")


@dataclass(frozen=True)
class ImageTokenizerConfig(Section, section="image_tokenizer"):
    """The VQGAN image tokenizer (ViT-VQGAN's factorised, l2-normalised codes; Yu et al. 2021).

    The encoder maps an image to a (image_size / downsample)² grid of `latent_dim`
    vectors; the quantiser projects each to `codebook_dim`, l2-normalises it and takes the
    nearest of `codebook_size` codes (cosine similarity), whose index is the token (or,
    with `refine_candidates`, the one of its nearest codes that decodes closest to the image).
    """

    # The fields that shape the weights, saved with a checkpoint: resuming with others is
    # refused. The rest are training and encoding settings.
    ARCH_FIELDS: ClassVar[tuple[str, ...]] = (
        "architecture", "downsample", "channels", "res_blocks", "encoder_context", "vit_depth",
        "vit_heads", "latent_dim", "codebook_size", "codebook_dim", "disc_channels",
    )  # fmt: skip

    # "patch": an encoder over each code's own pixels and, with `encoder_context`, its
    # neighbours' (a narrow view keeps plain patches' codes predictable for the decoder)
    # and a conv decoder at the code grid; "vit": ViT-VQGAN's Transformers. (VQGAN's conv
    # encoder and decoder lost: docs/experiments/tokenizer-design.md.)
    architecture: str = setting("patch", choices=("patch", "vit"))
    downsample: int = 4  # pixels per code along a side: a power of two
    channels: int = 96  # patch: width at the code grid; vit: model width
    res_blocks: int = setting(1, ge=0)  # patch: residual blocks at the code grid
    # patch: residual 3x3 conv blocks in the encoder at the code grid, each widening what a
    # code sees by one patch on every side; 0: each code sees only its own pixels. Tiny
    # preset, 3600 steps, held-out oracle exact 97.7 % with 1 at seed 0 (96.7 % at seeds 1
    # and 2), 94.7 % with 0; a decoder trained 900 steps on the codes of 1 drew the
    # prompt's position in 38 % of held-out samples (10 % in a run at lr 0.004), against
    # 1 % on those of 0, though at 0.73 bits per code against 0.41.
    encoder_context: int = setting(1, ge=0)
    vit_depth: int = 4  # vit: Transformer layers in the encoder and in the decoder
    vit_heads: int = 4
    latent_dim: int = 128
    codebook_size: int = setting(1024, ge=2, le=65_536)  # ViT-VQGAN: 8192; stored as uint16
    # The lookup space. ViT-VQGAN: 32. Here 64: on the tiny preset, an autoencoder through
    # the l2-normalised space read back 88 % of held-out scenes after 1000 steps at 64
    # dimensions, 83 % at 32 and 16, and 98 % without the normalisation.
    codebook_dim: int = setting(64, ge=1)  # and at most latent_dim
    # `project_out` reads the unit lookup vectors times sqrt(codebook_dim), entries of
    # about ±1 instead of ±1/8, so that Adam moves its outputs as fast as other layers'.
    # An autoencoder through the normalised space, 1000 steps: held-out oracle exact
    # 90.5 % with it, 80.3 % without.
    scaled_lookup: bool = True
    # EMA of the code vectors and of their counts. A slow EMA keeps a count for codes used
    # once in tens of batches (a shape's rarer outlines), which a fast one would call dead.
    codebook_decay: float = setting(0.99, ge=0, lt=1)
    kmeans_init: bool = True  # the codebook starts as k-means (k-means++ seeds) of the vectors
    kmeans_images: int = setting(256, ge=1)  # ... of this many training images
    # Share of the steps trained before quantisation starts, the normalised vectors passed
    # through unquantised; then the codebook is fitted by k-means to vectors that already
    # describe the images. Tiny preset: held-out oracle exact 86 % with 0.4, 85 % with 0.
    quantize_after: float = setting(0.4, ge=0, lt=1)
    # Codes whose EMA count (uses per batch) falls below this are re-seeded from the batch
    # vectors their codes fit worst. Tiny preset: 2.0 kept about 40 % of the codes in use
    # (a batch holds ~360 edge patches, so at most ~180 edge codes stay alive), 0.05 95 %.
    dead_code_threshold: float = setting(0.05, ge=0)
    commitment_weight: float = 0.25
    # The reconstruction loss is L2 alone: an L1 term pulls a code's pixels to the median
    # of the patches it stands for, dropping the thin tips that tell a small star or
    # diamond from a circle (docs/experiments/tokenizer-design.md).
    l2_weight: float = setting(1.0, ge=0)
    # Reconstruction loss weight of pixels at edges, on top of 1 (`edge_weights`); 0: off,
    # the plain loss. The tiny preset sets 4 (held-out oracle exact 73 % with 4, 52 %
    # without, on the synthetic scenes' thin shapes).
    edge_weight: float = setting(0.0, ge=0)
    # Perceptual loss: a local Hugging Face vision model folder (e.g. a CLIP or ViT
    # checkpoint); None turns it off, since no pretrained weights can be downloaded.
    perceptual_model: str | None = None
    perceptual_weight: float = setting(0.1, ge=0)
    # Hinge PatchGAN loss (the GAN in VQGAN), switched on at `gan_start` steps; 0: off.
    # Off for the CPU preset: within its ten minutes, GAN steps measured worse on small
    # shapes (held-out oracle accuracy 77% with the GAN from step 2500, 80.5% without).
    gan_weight: float = setting(0.0, ge=0)
    gan_start: int = setting(2500, ge=0)
    disc_channels: int = 16
    steps: int = setting(3600, ge=1)
    batch_size: int = setting(16, ge=1)
    lr: float = setting(4e-3, gt=0)
    warmup_steps: int = setting(100, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)  # cosine decay ends at lr * min_lr_ratio
    checkpoint_every: int = setting(500, ge=1)
    keep_checkpoints: int = setting(2, ge=2, note="one to fall back on")
    seed: int = 0
    compile: bool = False  # torch.compile the encoder and decoder
    # Encoding by analysis-by-synthesis (`VQGAN.tokenize`): each position's code is chosen
    # among its `refine_candidates` nearest codes as the one whose decoded patch is
    # closest to the image's pixels (greedily, positions two apart at a time), kept only
    # if the patch's mean squared error (pixels in [-1, 1]) falls by more than
    # `refine_margin`; 1: the nearest code, as in training and as VQGAN encodes. A setting
    # of the tokenizer folder (its config.json), which encoding and evaluation read. The
    # tiny preset sets 16: on its tokenizer, 1 999 synthetic `test` images, oracle exact
    # 98.2 % with 16 against 96.4 % with 1, at 65 decodes of the grid per image (about
    # 56× the encoding time).
    refine_candidates: int = setting(1, ge=1)
    refine_margin: float = setting(0.002, ge=0)
    # Encoding and evaluation batch. On 2 CPU cores 16 is fastest (bench/tokenizer.py,
    # nearest codes: 1010 images/s at 16, 348 at 128 as activations outgrow the caches);
    # raise on a GPU.
    eval_batch_size: int = setting(16, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        p = "image_tokenizer."
        _check(
            self.downsample >= 2 and self.downsample & (self.downsample - 1) == 0,
            f"{p}downsample={self.downsample}: use a power of two >= 2",
        )
        _check(
            self.codebook_dim <= self.latent_dim,
            f"{p}codebook_dim={self.codebook_dim}: use 1..latent_dim ({self.latent_dim})",
        )
        # GroupNorm splits each width (x1, x2, x4) into min(32, width / 4) groups.
        for name in ("channels", "disc_channels"):
            width = getattr(self, name)
            _check(
                width >= 4 and all(w % min(32, w // 4) == 0 for w in (width, 2 * width, 4 * width)),
                f"{p}{name}={width}: use a multiple of 4 (and of 32 above 128)",
            )
        _check(
            self.architecture != "vit" or self.channels % self.vit_heads == 0,
            f"{p}channels={self.channels}: use a multiple of vit_heads ({self.vit_heads})",
        )


@dataclass(frozen=True)
class PartiConfig(Section, section="parti"):
    """The Parti encoder–decoder Transformer (Yu et al. 2022; sizes from its Table 1).

    Vocabularies and lengths are not set here: they come from the tokenizers (text vocab
    and `text_tokenizer.max_length`, `image_tokenizer.codebook_size` and the code grid),
    so a model always matches the data it is trained on.
    """

    # Tiny: narrow, so that ten CPU minutes are many optimiser steps.
    d_model: int = setting(64, ge=8)  # and a multiple of heads
    encoder_layers: int = setting(2, ge=1)  # bidirectional text encoder
    decoder_layers: int = setting(4, ge=1)  # causal self-attention + cross-attention to the text
    heads: int = setting(4, ge=1)
    mlp_ratio: int = setting(4, ge=1)  # MLP width / d_model (Parti: 4)
    dropout: float = setting(0.0, ge=0, lt=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.d_model % self.heads == 0,
            f"parti.d_model={self.d_model} must be divisible by heads={self.heads}",
        )


@dataclass(frozen=True)
class TrainConfig(Section, section="train"):
    """Decoder training: one `fit()` for CPU, one GPU, or many processes under torchrun."""

    # The CPU preset: 1300 steps of 32 took 9.7 minutes of training (10.1 for all of
    # `parti train`) on 2 AVX2 cores (`parti.d_model` 64, about 18-21k tokens/s). Prompt
    # following grows with the number of steps far more than with width: in about the
    # same time, width 64 for 1800 steps drew the exact scene 44 % of the time, width 128
    # for 900 steps 10 %.
    # Batches of 16 (3600 steps) or 64 (900 steps) of the same tokens did worse than 32
    # (34 % and 21 %).
    steps: int = setting(1300, ge=1)
    # Global batch per optimiser step, over all processes and accumulation steps; each
    # process takes batch_size / (processes * grad_accum) rows per micro-step.
    batch_size: int = setting(32, ge=1)
    grad_accum: int = setting(1, ge=1)
    # Muon for the hidden matrices, AdamW for the rest (model/optim.py;
    # docs/experiments/decoder-muon.md). `lr` is AdamW's (embeddings, the tied head, norms,
    # biases); Muon's is `lr` times `muon_lr_scale`. The embeddings and head want a far
    # larger step than the matrices.
    # Tiny preset, 1300 steps on 20 000 images, held-out bits per token and exact at top-p
    # 0.6 (200 prompts per split; validation / test), AdamW / Muon learning rates:
    # 1.8e-2 / 4.5e-3 0.363 / 0.436, 91.5 / 79.5 %; 9e-3 / 4.5e-3 0.369 / 0.442, 90.5 /
    # 82.5 %; 4.5e-3 / 4.5e-3 0.391 / 0.457; 1.5e-3 / 4.5e-3 0.458 / 0.513, 81 / 71 %;
    # 4.5e-3 / 9e-3 0.413 / 0.486, 66.5 / 46 %.
    lr: float = setting(1.8e-2, gt=0)
    muon_lr_scale: float = setting(0.25, gt=0)
    warmup_steps: int = setting(50, ge=0)
    # After warm-up the peak rate holds, then falls in a straight line over the last 40 %
    # of the steps to lr * min_lr_ratio (wsd: model/loop.py `lr_factor`;
    # docs/experiments/decoder-relu2-zero-init-wsd.md).
    min_lr_ratio: float = setting(0.1, ge=0, le=1)
    # Decoupled; hidden matrices only, not norms, biases or embeddings.
    weight_decay: float = setting(0.01, ge=0)
    beta2: float = setting(0.98, gt=0, lt=1)
    grad_clip: float = setting(1.0, gt=0)
    # Share of captions replaced by the learned null caption, which trains the
    # unconditional path that classifier-free guidance needs (Ho & Salimans 2022).
    caption_dropout: float = setting(0.1, ge=0, lt=1)
    # auto: bf16 autocast on a GPU, fp32 on CPU.
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"))
    compile: bool = False  # torch.compile the model
    # Processes the pipeline step starts with torchrun (GPUs on a GPU node).
    nproc: int = setting(1, ge=1)
    accelerator: str | None = None  # kfp accelerator type for the step, e.g. NVIDIA_TESLA_T4
    # Machines. Above 1, the pipeline's train step submits a PyTorchJob (Kubeflow Training
    # Operator) of `nodes` pods, each running torchrun with `nproc` processes
    # (deploy/training_job.py), and waits for it.
    nodes: int = setting(1, ge=1)
    job_image: str = "ghcr.io/parti-ops/parti-ops-cuda:0.1.0"
    job_namespace: str = ""  # empty: the pipeline step's own namespace
    job_volume: str = "parti-train-shared"  # ReadWriteMany PVC mounted at /shared by all
    job_timeout_s: int = setting(7 * 24 * 3600, ge=1)
    checkpoint_every: int = setting(250, ge=1)
    keep_checkpoints: int = setting(2, ge=2, note="one to fall back on")
    log_every: int = setting(25, ge=1)
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.batch_size % (self.grad_accum * self.nproc * self.nodes) == 0,
            f"train.batch_size={self.batch_size} must be a multiple of grad_accum * nproc *"
            f" nodes ({self.grad_accum} * {self.nproc} * {self.nodes})",
        )


@dataclass(frozen=True)
class SampleConfig(Section, section="sample"):
    """Sampling defaults; `parti generate` and the server take each per request too."""

    # Classifier-free guidance (Ho & Salimans 2022); 1: conditional only, 0: unconditional.
    # Chosen on a real set's validation split (`parti sweep`; the starter preset on 3 783
    # Apple emoji, 100 prompts): prompt following 0.83 at 1.5 for every temperature and
    # top-p tried, 0.77-0.83 at 3, 0.73-0.77 at 5. Temperature and top-p stay standard.
    guidance_scale: float = setting(1.5, ge=0, lt=math.inf)
    temperature: float = setting(1.0, ge=0, lt=math.inf, note="0: greedy")
    top_k: int = setting(0, ge=0, note="0: off")
    # Nucleus sampling (Holtzman et al. 2020); 1: off.
    top_p: float = setting(1.0, gt=0, le=1)
    seed: int = setting(0, ge=0, le=2**63 - 1)  # numpy's and torch's generators take these
    candidates: int = setting(1, ge=1)  # samples per prompt, reranked by a scorer when one is given

    def sampling_kwargs(self) -> dict[str, float]:
        """Guidance, temperature, top-k and top-p as keyword arguments of the samplers
        (`generate_codes`, the ONNX runtime), which keep no defaults of their own."""
        return {name: getattr(self, name) for name in REQUEST_SETTINGS if name != "seed"}


def check_sampling(
    guidance_scale: float, temperature: float, top_k: int, top_p: float, prefix: str = ""
) -> None:
    """Raise ConfigError naming the first sampling setting that cannot be used (the ranges
    declared on SampleConfig), for settings given per request."""
    ranges = {f.name: f.metadata.get(_RANGE) for f in fields(SampleConfig)}
    for name, value in (
        ("guidance_scale", guidance_scale),
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
    ):
        ranges[name].check(prefix + name, value)


# The settings a request may carry; the server checks them with the rules written here.
REQUEST_SETTINGS = ("guidance_scale", "temperature", "top_k", "top_p", "seed")


def sampling_rules() -> dict[str, dict[str, Any]]:
    """SampleConfig's declared ranges of the per-request settings, as JSON for a server.

    The export writes them beside the defaults (`export.json`), so that the Triton model,
    which runs without this package, refuses what `check_sampling` refuses, with the same
    words: `{"top_p": {"gt": 0, "le": 1, "use": "a number in (0, 1]"}, ...}`; NaN is
    outside every rule.
    """
    rules = {}
    for f in fields(SampleConfig):
        if f.name in REQUEST_SETTINGS:
            rule: Range = f.metadata[_RANGE]
            bounds = {k: getattr(rule, k) for k in ("ge", "gt", "le", "lt")}
            if bounds["lt"] == math.inf:  # strict JSON has no infinity: say "finite" instead
                bounds["lt"], bounds["finite"] = None, True
            rules[f.name] = {
                **{k: v for k, v in bounds.items() if v is not None},
                "use": rule.describe(f.default),
            }
    return rules


@dataclass(frozen=True)
class ScorerConfig(Section, section="scorer"):
    """The in-house CLIP-style image–text scorer (contrastive, Radford et al. 2021).

    It supplies the default CLIP score, the FID features and the reranking of candidates.
    `clip_model` points at a local Hugging Face CLIP folder to use instead (none can be
    downloaded here).
    """

    # The fields that shape the weights, saved with a checkpoint: resuming with others is
    # refused.
    ARCH_FIELDS: ClassVar[tuple[str, ...]] = (
        "embed_dim", "channels", "text_width", "text_layers", "text_heads",
    )  # fmt: skip

    clip_model: str | None = None
    embed_dim: int = setting(128, ge=1)  # the shared image–text space
    # Image tower: width at full resolution, doubled per halving.
    channels: int = setting(16, ge=1)
    text_width: int = setting(128, ge=1)  # a multiple of text_heads
    text_layers: int = setting(2, ge=1)
    text_heads: int = 4
    steps: int = setting(1500, ge=1)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(1e-3, gt=0)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    # Rows that carry a scene also train against their near misses' captions (one
    # attribute changed). Tiny preset, validation images: the true caption beat a
    # shape-changed one for 81 % with them, 73 % without; a colour-changed one 97 % / 90 %.
    hard_negatives: bool = True
    # Near misses per image and step, distinct, up to all five. Tiny preset, held-out
    # images: a shape-changed caption beaten 83 % (test) / 86 % (validation) with 5, 79 % /
    # 81 % with 1; and only with 5 did reranking 4 candidates raise exact fidelity
    # (2400-step decoder: 20.5 % → 29 %; with 1, on a 2700-step one, 28.5 % either way).
    negatives_per_step: int = setting(5, ge=1)
    # Checkpoints every this many steps, at the end and on SIGTERM, to resume from; 0: none.
    checkpoint_every: int = setting(0, ge=0, note="0: none")
    keep_checkpoints: int = setting(2, ge=2, note="one to fall back on")
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.text_width % self.text_heads == 0,
            f"scorer.text_width={self.text_width}: use a multiple of text_heads"
            f" ({self.text_heads})",
        )


@dataclass(frozen=True)
class EvaluateConfig(Section, section="evaluate"):
    """The pinned evaluator: what is sampled and scored, and with which seed."""

    prompts: int = setting(100, ge=1)  # held-out captions sampled per split (validation, test)
    # Training captions sampled too, for prompt following on seen captions; 0: none.
    seen_prompts: int = setting(100, ge=0)
    fid_images: int = setting(600, ge=1)  # real validation images in the FID reference
    batch_size: int = setting(64, ge=1)
    seed: int = 0  # held-out prompt i is sampled with seed + i (the other settings: `sample`)
    grid_rows: int = setting(8, ge=0)  # rows (caption | generated | real) per split in the grid


@dataclass(frozen=True)
class TrackingConfig(Section, section="tracking"):
    """Where MLflow runs go. None: a SQLite store and artifact folder under `work_dir`."""

    tracking_uri: str | None = None
    experiment: str = "parti-ops"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.experiment.strip()), "tracking.experiment must not be empty")


@dataclass(frozen=True)
class RegistryConfig(Section, section="registry"):
    """The MLflow registered model and the promotion gate's rules.

    Every rule reads a metric of the `validation` split (settings are chosen there; `test`
    is only reported). A first model must clear the floors; a challenger must also not be
    worse than the champion by more than a margin, judged on the same prompts by the
    95 % bootstrap interval of the paired difference, so noise alone does not flip a
    decision. A rule whose metric was not measured (the oracle's exact accuracy on data
    without synthetic scenes) is reported as not applied.
    """

    model_name: str = "parti"
    # Floors. Prompt following is judged by its interval's lower end; 0.5 is its chance
    # level, so by default a first model must follow prompts better than chance.
    min_prompt_following: float = setting(0.5, ge=0, le=1)
    # Held-out bits per image token (log2 1024 = 10: uniform).
    max_bits_per_token: float = setting(8.0, gt=0)
    # The oracle's exact accuracy, where rows carry scenes.
    min_fidelity: float = setting(0.0, ge=0, le=1)
    # Margins against the champion.
    max_prompt_following_drop: float = setting(0.02, ge=0, lt=math.inf)  # absolute (0..1)
    # Held-out bits per image token, absolute.
    max_nll_rise: float = setting(0.02, ge=0, lt=math.inf)
    # Oracle exact accuracy, absolute (0..1).
    max_fidelity_drop: float = setting(0.02, ge=0, lt=math.inf)
    # FID is relative: its scale moves with the feature model and the number of images.
    # 0.05: at most 5 % above the champion's FID.
    max_fid_rise: float = setting(0.05, ge=0, lt=math.inf)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model_name.strip()), "registry.model_name must not be empty")


@dataclass(frozen=True)
class ExportConfig(Section, section="export"):
    """ONNX export, the parity checks that follow it, and the int8 variant."""

    opset: int = setting(20, ge=17, le=23)
    parity_prompts: int = setting(32, ge=1)  # greedy decoding must agree on every one of these
    # Guidance used by the parity run, so both halves are checked (sample.guidance_scale's range).
    parity_guidance: float = setting(3.0, ge=0, lt=math.inf)
    logits_atol: float = setting(1e-4, gt=0)  # largest |ONNX - PyTorch| of any logit
    # Mean |ONNX - PyTorch| of decoded pixels in [0, 1].
    pixel_tolerance: float = setting(1 / 255, gt=0)
    # Also write ONNX Runtime's dynamically quantised int8 variant. Its check reads synthetic
    # scenes back with the attribute oracle, so only the tiny preset turns it on.
    int8: bool = False
    int8_prompts: int = setting(64, ge=1)  # prompts that measure the int8 variant
    # Oracle exact accuracy; beyond it fp32 is served.
    max_int8_fidelity_drop: float = setting(0.02, ge=0, le=1)


@dataclass(frozen=True)
class ServeConfig(Section, section="serve"):
    """The Triton model repository and the server that `parti serve` starts."""

    model_name: str = "parti"
    # cpu: the orchestrator alone (Python backend, as in the nvidia-pytriton bundle); gpu:
    # also the three graphs as ONNX Runtime backend models with TensorRT (NGC images).
    target: str = setting("cpu", choices=("cpu", "gpu"))
    # Dynamic batching: requests are merged up to `max_batch_size` prompts, waiting at most
    # `queue_delay_us` for more; past `max_queue_size` waiting requests Triton rejects new
    # ones at once rather than letting clients hang.
    max_batch_size: int = setting(8, ge=1)
    # 5 ms measured 17 % slower than in-process at one client.
    queue_delay_us: int = setting(1000, ge=0)
    max_queue_size: int = setting(32, ge=1)
    # Model instances, each a process with its own ONNX Runtime graphs, and intra-op
    # threads per instance (0: one per core). On 2 CPU cores two single-threaded instances
    # serve more than one with two threads: one prompt's decode step is too small to split
    # (bench/serving.py). On a GPU: one instance per GPU.
    instances: int = setting(2, ge=1)
    threads: int = setting(1, ge=0, note="0: one per core")
    # auto: int8 where its fidelity drop is in bounds.
    precision: str = setting("auto", choices=("fp32", "int8", "auto"))
    # Longer prompts are refused (the tokenizer would cut them).
    max_prompt_bytes: int = setting(4096, ge=1)
    # Cancelled requests stop decoding within this long: the server is asked at most this
    # often (each ask is a round trip; asking every step cost 35 % of 1-client throughput).
    cancel_check_ms: int = setting(20, ge=1)
    # ONNX Runtime execution providers of the orchestrator, in order of preference; on a
    # GPU server "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider".
    providers: str = "CPUExecutionProvider"
    host: str = "127.0.0.1"
    http_port: int = setting(0, ge=0, le=65_535, note="0: a free port")
    grpc_port: int = setting(0, ge=0, le=65_535, note="0: a free port")
    metrics_port: int = setting(0, ge=0, le=65_535, note="0: a free port")
    ready_timeout_s: float = setting(120.0, gt=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.model_name.strip()), "serve.model_name must not be empty")
        _check(bool(self.providers.strip()), "serve.providers must name at least one provider")


class WithheldSection:
    """Stands in for a config section that a pipeline step was not given.

    A step receives only the sections it reads (`Config.sections_json`), so that its cache
    key changes only when they do; reading another one is a bug in the step's list of
    sections, and says so instead of silently reading the section's defaults.
    """

    def __init__(self, section: str) -> None:
        self._section = section

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_section":
            raise AttributeError(name)
        raise RuntimeError(
            f"config.{self._section}.{name}: this step was not given the {self._section!r}"
            " section; add it to the step's sections (components/__init__.py STEP_SECTIONS)"
        )

    def __repr__(self) -> str:
        return f"WithheldSection({self._section!r})"


@dataclass(frozen=True)
class Config:
    """The whole configuration: one frozen section per concern."""

    name: str = "tiny"
    work_dir: str = "outputs"  # run outputs: MLflow store, kfp.local pipeline root
    data: DataConfig = field(default_factory=DataConfig)
    text_tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    parti: PartiConfig = field(default_factory=PartiConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        size, down = self.data.image_size, self.image_tokenizer.downsample
        _check(
            size % down == 0 and size // down >= 2,
            f"data.image_size={size} must be a multiple of image_tokenizer.downsample={down}"
            " giving a grid of at least 2x2",
        )

    @property
    def image_grid(self) -> int:
        """Codes along a side of an image: image_size / downsample."""
        return self.data.image_size // self.image_tokenizer.downsample

    @classmethod
    def from_name(cls, name: str) -> Config:
        """A named preset; unknown names raise an error listing the presets."""
        # Imported here: the presets are Configs, built when their module is imported.
        from parti_ops.model.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def load(
        cls,
        preset: str = "tiny",
        yaml_path: str | Path | None = None,
        overrides: dict[str, Any] | list[str] | None = None,
    ) -> Config:
        """A preset, then a YAML file, then overrides, each on top of the last.

        Args:
            preset: a name from `presets.PRESETS`; a YAML file's own `preset:` key wins.
            yaml_path: a file of nested sections, e.g. `data: {image_size: 32}`.
            overrides: `{"data.image_size": 32}` or `["data.image_size=32"]`.
        """
        tree: dict[str, Any] = {}
        if yaml_path is not None:
            path = Path(yaml_path)
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ConfigError(f"{path}: cannot read config YAML ({err})") from err
            _check(isinstance(loaded, dict), f"{path}: expected a mapping of sections at the top")
            tree = loaded
            preset = tree.pop("preset", preset)
        config = cls.from_name(preset)
        if tree:
            config = config.merge(tree)
        if overrides:
            config = config.merge(parse_overrides(overrides))
        return config

    def merge(self, tree: dict[str, Any]) -> Config:
        """A new config with nested values from `tree` (dotted keys allowed) replacing ours."""
        return _merge(self, _nest(tree), prefix="")

    def to_dict(self) -> dict[str, Any]:
        """Every field, section by section (a step's config: the sections it was given)."""
        return {
            f.name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            for f in fields(self)
            if not isinstance(value := getattr(self, f.name), WithheldSection)
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def sections_json(self, sections: Sequence[str]) -> str:
        """`to_json` of `name`, `work_dir` and these sections only: what a pipeline step
        receives, so that its cache key changes only when they do."""
        unknown = sorted(set(sections) - set(SECTIONS))
        _check(not unknown, f"no config sections {unknown}; the sections are {SECTIONS}")
        body = {k: v for k, v in self.to_dict().items() if k in sections or k not in SECTIONS}
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Inverse of `to_json` and `sections_json`: how pipeline components receive the
        config. A section the JSON leaves out is withheld (`WithheldSection`), not defaulted."""
        tree = json.loads(text)
        if all(name in tree for name in SECTIONS):
            return cls().merge(tree)  # the whole config, checked as a whole
        # A step's sections, each checked on its own (the whole was checked where it was made).
        unknown = sorted(set(tree) - {f.name for f in fields(cls)})
        _check(not unknown, f"unknown config keys {unknown}")
        defaults = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in SECTIONS:
                values[f.name] = str(tree.get(f.name, getattr(defaults, f.name)))
            elif f.name in tree:
                values[f.name] = _merge(getattr(defaults, f.name), tree[f.name], f"{f.name}.")
            else:
                values[f.name] = WithheldSection(f.name)
        config = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(config, name, value)
        return config

    def flat(self) -> dict[str, Any]:
        """`{"data.image_size": 64, ...}`: the form logged as MLflow params."""
        out: dict[str, Any] = {}

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    out[f"{prefix}{key}"] = value

        walk(self.to_dict(), "")
        return out

    def mlflow_tracking_uri(self) -> str:
        """`tracking.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a SQLite file.

        The environment variable is where MLflow users expect to name a server; the SQLite
        file is under `work_dir`, its path absolute so steps started elsewhere agree.
        """
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if uri := os.environ.get("MLFLOW_TRACKING_URI"):
            return uri
        return f"sqlite:///{(Path(self.work_dir) / 'mlflow.db').resolve()}"


# The sections of a Config (the fields besides its name and work folder).
SECTIONS = tuple(f.name for f in fields(Config) if f.name not in ("name", "work_dir"))


def parse_overrides(items: dict[str, Any] | list[str]) -> dict[str, Any]:
    """`["data.image_size=32"]` → `{"data.image_size": 32}`; values are read as YAML scalars."""
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        _check(bool(sep) and bool(key.strip()), f"override {item!r}: use section.field=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _nest(tree: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in tree.items():
        node = nested
        *parents, leaf = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"config key {key!r} mixes a value and a section")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return nested


# Settings removed with the branch that lost their ablation, and the value that kept the
# surviving behaviour: a saved config or model folder that still carries one loads if it
# holds that value, and is refused otherwise. The results, under docs/experiments/:
REMOVED: dict[str, Any] = {
    # tokenizer-design.md
    "image_tokenizer.rotation_trick": False,
    "image_tokenizer.l1_weight": 0.0,
    "image_tokenizer.ema_decay": 0.0,
    # decoder-prompt-conditioning.md
    "parti.prompt_start": True,
    "parti.qk_norm": True,
    # decoder-relu2-zero-init-wsd.md
    "parti.tie_head": True,
    "parti.zero_init": True,
    "parti.activation": "relu2",
    "train.schedule": "wsd",
    # decoder-muon.md
    "train.optimizer": "muon",
}


def _merge(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for key, value in tree.items():
        if prefix + key in REMOVED:
            kept = REMOVED[prefix + key]
            # A YAML `0` is the float 0.0; True is not the number 1.
            same_kind = isinstance(value, type(kept)) or (
                isinstance(kept, float) and isinstance(value, int) and not isinstance(value, bool)
            )
            _check(
                same_kind and value == kept,
                f"{prefix + key} was removed; only {kept!r} is supported (got {value!r})",
            )
            continue
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix + key!r}; known keys here: {', '.join(known)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _check(isinstance(value, dict), f"config key {prefix + key!r} is a section")
            changes[key] = _merge(current, value, prefix=f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hints[key], prefix + key)
    try:
        return dataclasses.replace(obj, **changes)
    except TypeError as err:
        raise ConfigError(f"config section {prefix or 'top'}: {err}") from err


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a value against a field's annotation, converting int → float where asked.

    A float field also takes a string that reads as a number: YAML 1.1 (PyYAML) reads
    `9e-3`, without a dot, as a string.
    """
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config key {key!r}: expected {names}, got {value!r}")
