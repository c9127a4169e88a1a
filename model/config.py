"""One typed configuration object with named presets.

`Config.from_name("tiny")` gives a preset; `Config.load(preset, yaml_path, overrides)`
layers a YAML file and `section.field=value` overrides on top of it, the way the
CLI and the pipeline components build theirs. Every section is a frozen
dataclass validated in `__post_init__`, so a bad value fails when the config is
made, with the field's name, not deep inside a step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says which."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """The data: how the synthetic set is drawn, ingest canonicalises, validation accepts."""

    image_size: int = 64
    # Synthetic set. `heldout_fraction` of the images show a (colour, shape) pair
    # that never appears in train/validation: the compositional-generalisation split.
    # 20 000: the tiny decoder's ten minutes pass over 6 000 images about eight times and
    # begin to memorise them; on 20 000 the same run drew more held-out scenes exactly
    # (67 / 67 % against 61 / 57 %, on the held-out prompts of a 6 000-image set).
    num_images: int = 20_000
    seed: int = 0
    heldout_fraction: float = 0.1
    validation_fraction: float = 0.05
    # Ingest. Rows without a split get one from their content hash: `validation_fraction`
    # of them validation, `test_fraction` test, the rest train, so re-ingesting the same
    # files in any order gives the same splits. (The synthetic set writes its own splits,
    # its test share being `heldout_fraction`.)
    test_fraction: float = 0.05
    shard_size: int = 1000
    caption_column: str | None = None  # None: "text", else "caption"
    max_image_pixels: int = 50_000_000  # larger declared sizes are decompression bombs
    # Validation (Great Expectations). Each row-level expectation allows at most
    # `max_quarantine_fraction` failures; past that the run stops.
    min_image_side: int = 16
    max_image_side: int = 8192
    max_aspect_ratio: float = 4.0
    max_caption_chars: int = 1000
    max_caption_words: int = 200
    max_quarantine_fraction: float = 0.05
    # Each split present must hold a share within these bounds. Where the content hash
    # split the whole set, they widen by its sampling noise around the fractions above
    # (components/validate.py), so the split ingest draws passes at any set size.
    min_split_fraction: float = 0.01
    max_split_fraction: float = 0.95

    def __post_init__(self) -> None:
        _check(8 <= self.image_size <= 1024, f"data.image_size={self.image_size}: use 8..1024")
        _check(self.num_images >= 10, f"data.num_images={self.num_images}: use at least 10")
        _check(0 < self.heldout_fraction < 0.5, "data.heldout_fraction must be in (0, 0.5)")
        _check(0 < self.validation_fraction < 0.5, "data.validation_fraction must be in (0, 0.5)")
        _check(0 <= self.test_fraction < 0.5, "data.test_fraction must be in [0, 0.5)")
        _check(self.shard_size >= 1, "data.shard_size must be >= 1")
        _check(self.max_image_pixels > 0, "data.max_image_pixels must be > 0")
        _check(
            1 <= self.min_image_side <= self.max_image_side,
            "data.min_image_side must be in 1..data.max_image_side",
        )
        _check(self.max_aspect_ratio >= 1, "data.max_aspect_ratio must be >= 1")
        _check(self.max_caption_chars >= 1, "data.max_caption_chars must be >= 1")
        _check(self.max_caption_words >= 1, "data.max_caption_words must be >= 1")
        _check(
            0 <= self.max_quarantine_fraction <= 1, "data.max_quarantine_fraction must be in [0, 1]"
        )
        _check(
            0 <= self.min_split_fraction <= self.max_split_fraction <= 1,
            "data.min_split_fraction <= data.max_split_fraction, both in [0, 1]",
        )


@dataclass(frozen=True)
class TextTokenizerConfig:
    """The caption tokenizer, trained with Hugging Face `tokenizers` on the training captions."""

    # "bpe", or "unigram" (SentencePiece's model, as Parti) for real caption corpora: on
    # a closed vocabulary of a few dozen words Unigram stays at characters.
    kind: str = "bpe"
    vocab_size: int = 512  # Parti: 16k; an upper bound, small caption sets give fewer pieces
    lowercase: bool = True  # after NFKC normalisation
    max_length: int = 64  # tokens with <s> and </s>; longer captions are truncated, and counted

    def __post_init__(self) -> None:
        _check(self.kind in ("unigram", "bpe"), f"text_tokenizer.kind={self.kind!r}: unigram|bpe")
        # Token ids are stored as uint16 once encoded.
        _check(
            16 <= self.vocab_size <= 65_536,
            f"text_tokenizer.vocab_size={self.vocab_size}: use 16..65536",
        )
        _check(self.max_length >= 3, "text_tokenizer.max_length must be >= 3 (<s>, a token, </s>)")


ARCHITECTURES = ("conv", "patch", "vit")


@dataclass(frozen=True)
class ImageTokenizerConfig:
    """The VQGAN image tokenizer (ViT-VQGAN's factorised, l2-normalised codes; Yu et al. 2021).

    The encoder maps an image to a (image_size / downsample)² grid of `latent_dim`
    vectors; the quantiser projects each to `codebook_dim`, l2-normalises it and takes the
    nearest of `codebook_size` codes (cosine similarity), whose index is the token (or,
    with `refine_candidates`, the one of its nearest codes that decodes closest to the image).
    """

    # "patch": an encoder over each code's own pixels and, with `encoder_context`, its
    # neighbours' (a narrow view keeps plain patches' codes predictable for the decoder)
    # and a conv decoder at the code grid; "conv": VQGAN's conv encoder and decoder;
    # "vit": ViT-VQGAN's Transformers.
    architecture: str = "patch"
    downsample: int = 4  # pixels per code along a side: a power of two
    # conv: width at full resolution, doubled per halving; patch: width at the code grid;
    # vit: model width.
    channels: int = 96
    res_blocks: int = 1  # conv: residual blocks per resolution; patch: at the code grid
    # patch: residual 3x3 conv blocks in the encoder at the code grid, each widening what a
    # code sees by one patch on every side; 0: each code sees only its own pixels. Tiny
    # preset, 3600 steps, held-out oracle exact 97.7 % with 1 at seed 0 (96.7 % at seeds 1
    # and 2), 94.7 % with 0; a decoder trained 900 steps on the codes of 1 drew the
    # prompt's position in 38 % of held-out samples (10 % in a run at lr 0.004), against
    # 1 % on those of 0, though at 0.73 bits per code against 0.41.
    encoder_context: int = 1
    vit_depth: int = 4  # vit: Transformer layers in the encoder and in the decoder
    vit_heads: int = 4
    latent_dim: int = 128
    codebook_size: int = 1024  # ViT-VQGAN: 8192; codes are stored as uint16
    # The lookup space. ViT-VQGAN: 32. Here 64: on the tiny preset, an autoencoder through
    # the l2-normalised space read back 88 % of held-out scenes after 1000 steps at 64
    # dimensions, 83 % at 32 and 16, and 98 % without the normalisation.
    codebook_dim: int = 64
    # `project_out` reads the unit lookup vectors times sqrt(codebook_dim), entries of
    # about ±1 instead of ±1/8, so that Adam moves its outputs as fast as other layers'.
    # An autoencoder through the normalised space, 1000 steps: held-out oracle exact
    # 90.5 % with it, 80.3 % without.
    scaled_lookup: bool = True
    # EMA of the code vectors and of their counts. A slow EMA keeps a count for codes used
    # once in tens of batches (a shape's rarer outlines), which a fast one would call dead.
    codebook_decay: float = 0.99
    kmeans_init: bool = True  # the codebook starts as k-means (k-means++ seeds) of the vectors
    kmeans_images: int = 256  # ... of this many training images
    # Share of the steps trained before quantisation starts, the normalised vectors passed
    # through unquantised; then the codebook is fitted by k-means to vectors that already
    # describe the images. Tiny preset: held-out oracle exact 86 % with 0.4, 85 % with 0.
    quantize_after: float = 0.4
    # Codes whose EMA count (uses per batch) falls below this are re-seeded from the batch
    # vectors their codes fit worst. Tiny preset: 2.0 kept about 40 % of the codes in use
    # (a batch holds ~360 edge patches, so at most ~180 edge codes stay alive), 0.05 95 %.
    dead_code_threshold: float = 0.05
    commitment_weight: float = 0.25
    # Gradients to the encoder through the rotation onto each code (Fifty et al. 2024)
    # rather than straight through.
    rotation_trick: bool = False
    # L2 alone by default: L1 pulls a code's pixels to the median of the patches it stands
    # for, which drops the thin tips that tell a small star or diamond from a circle.
    # Tiny preset, 3600 steps, held-out oracle exact: 94.7 % with 0, 90.3 % with 1 (PSNR
    # 34.18 vs 33.91 dB, SSIM 0.942 vs 0.970). With 4096 codes and 0: 95.8 %, but only
    # 59 % of the codes used.
    l1_weight: float = 0.0
    l2_weight: float = 1.0
    # Reconstruction loss weight of pixels at edges, on top of 1 (`edge_weights`); 0: off,
    # the plain loss. The tiny preset sets 4 (held-out oracle exact 73 % with 4, 52 %
    # without, on the synthetic scenes' thin shapes).
    edge_weight: float = 0.0
    # Perceptual loss: a local Hugging Face vision model folder (e.g. a CLIP or ViT
    # checkpoint); None turns it off, since no pretrained weights can be downloaded.
    perceptual_model: str | None = None
    perceptual_weight: float = 0.1
    # Hinge PatchGAN loss (the GAN in VQGAN), switched on at `gan_start` steps; 0: off.
    # Off for the CPU preset: within its ten minutes, GAN steps measured worse on small
    # shapes (held-out oracle accuracy 77% with the GAN from step 2500, 80.5% without).
    gan_weight: float = 0.0
    gan_start: int = 2500
    disc_channels: int = 16
    steps: int = 3600
    batch_size: int = 16
    lr: float = 4e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    # EMA of the weights used for evaluation and encoding; 0: the trained weights as they
    # are. Off by default: the codebook is an EMA of its own and re-seeds unused codes, and
    # a lagging encoder/decoder paired with it measured worse (held-out SSIM 0.88 vs 0.97).
    ema_decay: float = 0.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
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
    refine_candidates: int = 1
    refine_margin: float = 0.002
    # Encoding and evaluation batch. On 2 CPU cores 16 is fastest (bench/tokenizer.py,
    # nearest codes: 1010 images/s at 16, 348 at 128 as activations outgrow the caches);
    # raise on a GPU.
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        p = "image_tokenizer."
        _check(self.architecture in ARCHITECTURES, f"{p}architecture: {'|'.join(ARCHITECTURES)}")
        _check(
            self.downsample >= 2 and self.downsample & (self.downsample - 1) == 0,
            f"{p}downsample={self.downsample}: use a power of two >= 2",
        )
        _check(
            self.refine_candidates >= 1, f"{p}refine_candidates={self.refine_candidates}: use >= 1"
        )
        _check(self.refine_margin >= 0, f"{p}refine_margin={self.refine_margin}: use >= 0")
        _check(
            2 <= self.codebook_size <= 65_536, f"{p}codebook_size={self.codebook_size}: 2..65536"
        )
        _check(
            1 <= self.codebook_dim <= self.latent_dim,
            f"{p}codebook_dim={self.codebook_dim}: use 1..latent_dim ({self.latent_dim})",
        )
        _check(self.res_blocks >= 0, f"{p}res_blocks must be >= 0")
        _check(self.encoder_context >= 0, f"{p}encoder_context must be >= 0")
        # GroupNorm splits each width (x1, x2, x4) into min(32, width / 4) groups.
        for name in ("channels", "disc_channels"):
            width = getattr(self, name)
            _check(
                width >= 4 and all(w % min(32, w // 4) == 0 for w in (width, 2 * width, 4 * width)),
                f"{p}{name}={width}: use a multiple of 4 (and of 32 above 128)",
            )
        _check(
            self.architecture != "vit" or self.channels % self.vit_heads == 0,
            f"{p}channels must be divisible by vit_heads",
        )
        _check(self.dead_code_threshold >= 0, f"{p}dead_code_threshold must be >= 0")
        _check(0 <= self.quantize_after < 1, f"{p}quantize_after must be in [0, 1)")
        _check(self.kmeans_images >= 1, f"{p}kmeans_images must be >= 1")
        _check(
            min(self.warmup_steps, self.gan_start) >= 0 and self.eval_batch_size >= 1,
            f"{p}warmup_steps and gan_start >= 0, eval_batch_size >= 1",
        )
        _check(0 <= self.codebook_decay < 1 and 0 <= self.ema_decay < 1, f"{p}decays in [0, 1)")
        for name in ("l1_weight", "l2_weight", "edge_weight", "perceptual_weight", "gan_weight"):
            _check(getattr(self, name) >= 0, f"{p}{name} must be >= 0")
        _check(self.steps >= 1 and self.batch_size >= 1, f"{p}steps and batch_size must be >= 1")
        _check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, f"{p}lr > 0, min_lr_ratio in [0, 1]")
        _check(self.checkpoint_every >= 1, f"{p}checkpoint_every must be >= 1")
        _check(
            self.keep_checkpoints >= 2, f"{p}keep_checkpoints must be >= 2 (one to fall back on)"
        )


@dataclass(frozen=True)
class PartiConfig:
    """The Parti encoder–decoder Transformer (Yu et al. 2022; sizes from its Table 1).

    Vocabularies and lengths are not set here: they come from the tokenizers (text vocab
    and `text_tokenizer.max_length`, `image_tokenizer.codebook_size` and the code grid),
    so a model always matches the data it is trained on.
    """

    d_model: int = 64  # tiny: narrow, so that ten CPU minutes are many optimiser steps
    encoder_layers: int = 2  # bidirectional text encoder
    decoder_layers: int = 4  # causal self-attention + cross-attention to the text
    heads: int = 4
    mlp_ratio: int = 4  # MLP width / d_model (Parti: 4)
    dropout: float = 0.0
    tie_head: bool = True  # the output head shares the image-code embedding matrix
    prompt_start: bool = True  # add the pooled caption to the start token's input
    qk_norm: bool = True  # LayerNorm on each head's queries and keys
    # The MLP's activation: "relu2" (relu(x)², So et al. 2021) or "gelu".
    activation: str = "relu2"
    # Output projections of attention and MLP start at zero: each layer starts as the identity.
    zero_init: bool = True

    def __post_init__(self) -> None:
        p = "parti."
        _check(self.d_model >= 8 and self.heads >= 1, f"{p}d_model >= 8 and heads >= 1")
        _check(
            self.d_model % self.heads == 0,
            f"{p}d_model={self.d_model} must be divisible by heads={self.heads}",
        )
        _check(
            self.encoder_layers >= 1 and self.decoder_layers >= 1,
            f"{p}encoder_layers and decoder_layers must be >= 1",
        )
        _check(self.mlp_ratio >= 1, f"{p}mlp_ratio must be >= 1")
        _check(
            self.activation in ("relu2", "gelu"), f"{p}activation={self.activation!r}: relu2|gelu"
        )
        _check(0 <= self.dropout < 1, f"{p}dropout must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Decoder training: one `fit()` for CPU, one GPU, or many processes under torchrun."""

    # The CPU preset: 1300 steps of 32 took 9.7 minutes of training (10.1 for all of
    # `parti train`) on 2 AVX2 cores (`parti.d_model` 64, about 18-21k tokens/s). Prompt
    # following grows with the number of steps far more than with width: in about the
    # same time, width 64 for 1800 steps drew the exact scene 44 % of the time, width 128
    # for 900 steps 10 %.
    # Batches of 16 (3600 steps) or 64 (900 steps) of the same tokens did worse than 32
    # (34 % and 21 %).
    steps: int = 1300
    # Global batch per optimiser step, over all processes and accumulation steps; each
    # process takes batch_size / (processes * grad_accum) rows per micro-step.
    batch_size: int = 32
    grad_accum: int = 1
    # "muon": Muon for the hidden matrices, AdamW for the rest (model/optim.py); "adamw":
    # AdamW for all, at `lr` (on the tiny preset, set lr 1.5e-3 with it). Tiny preset,
    # 1300 steps on 6 000 images, held-out exact (validation / test): 54 / 46 % with Muon
    # and AdamW at one learning rate, 29 / 19 % with AdamW alone.
    optimizer: str = "muon"
    # `lr` is AdamW's (embeddings, the tied head, norms, biases); Muon's is `lr` times
    # `muon_lr_scale`. The embeddings and head want a far larger step than the matrices.
    # Tiny preset, 1300 steps on 20 000 images, held-out bits per token and exact at top-p
    # 0.6 (200 prompts per split; validation / test), AdamW / Muon learning rates:
    # 1.8e-2 / 4.5e-3 0.363 / 0.436, 91.5 / 79.5 %; 9e-3 / 4.5e-3 0.369 / 0.442, 90.5 /
    # 82.5 %; 4.5e-3 / 4.5e-3 0.391 / 0.457; 1.5e-3 / 4.5e-3 0.458 / 0.513, 81 / 71 %;
    # 4.5e-3 / 9e-3 0.413 / 0.486, 66.5 / 46 %.
    lr: float = 1.8e-2
    muon_lr_scale: float = 0.25
    warmup_steps: int = 50
    # After warm-up: "wsd" holds the peak rate, then falls in a straight line over the
    # last 40 % of the steps (model/schedule.py); "cosine" decays from the end of warm-up.
    schedule: str = "wsd"
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # decoupled; hidden matrices only, not norms, biases or embeddings
    beta2: float = 0.98
    grad_clip: float = 1.0
    # Share of captions replaced by the learned null caption, which trains the
    # unconditional path that classifier-free guidance needs (Ho & Salimans 2022).
    caption_dropout: float = 0.1
    precision: str = "auto"  # auto: bf16 autocast on a GPU, fp32 on CPU; or fp32 | bf16
    compile: bool = False  # torch.compile the model
    nproc: int = 1  # processes the pipeline step starts with torchrun (GPUs on a GPU node)
    accelerator: str | None = None  # kfp accelerator type for the step, e.g. NVIDIA_TESLA_T4
    # Machines. Above 1, the pipeline's train step submits a PyTorchJob (Kubeflow Training
    # Operator) of `nodes` pods, each running torchrun with `nproc` processes
    # (deploy/training_job.py), and waits for it.
    nodes: int = 1
    job_image: str = "ghcr.io/parti-ops/parti-ops-cuda:0.1.0"
    job_namespace: str = ""  # empty: the pipeline step's own namespace
    job_volume: str = "parti-train-shared"  # ReadWriteMany PVC mounted at /shared by all
    job_timeout_s: int = 7 * 24 * 3600
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        p = "train."
        _check(self.steps >= 1, f"{p}steps must be >= 1")
        _check(
            min(self.grad_accum, self.nproc, self.nodes) >= 1,
            f"{p}grad_accum, nproc and nodes must be >= 1",
        )
        processes = self.nproc * self.nodes
        _check(
            self.batch_size >= 1 and self.batch_size % (self.grad_accum * processes) == 0,
            f"{p}batch_size={self.batch_size} must be a multiple of grad_accum * nproc * nodes"
            f" ({self.grad_accum} * {self.nproc} * {self.nodes})",
        )
        _check(self.job_timeout_s >= 1, f"{p}job_timeout_s must be >= 1")
        _check(self.optimizer in ("muon", "adamw"), f"{p}optimizer={self.optimizer!r}: muon|adamw")
        _check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, f"{p}lr > 0, min_lr_ratio in [0, 1]")
        _check(self.muon_lr_scale > 0, f"{p}muon_lr_scale must be > 0")
        _check(self.schedule in ("wsd", "cosine"), f"{p}schedule={self.schedule!r}: wsd|cosine")
        _check(
            self.warmup_steps >= 0 and self.weight_decay >= 0, f"{p}warmup_steps, weight_decay >= 0"
        )
        _check(0 < self.beta2 < 1, f"{p}beta2 must be in (0, 1)")
        _check(self.grad_clip > 0, f"{p}grad_clip must be > 0")
        _check(0 <= self.caption_dropout < 1, f"{p}caption_dropout must be in [0, 1)")
        _check(self.precision in ("auto", "fp32", "bf16"), f"{p}precision: auto|fp32|bf16")
        _check(
            self.checkpoint_every >= 1 and self.log_every >= 1,
            f"{p}checkpoint_every and log_every must be >= 1",
        )
        _check(
            self.keep_checkpoints >= 2, f"{p}keep_checkpoints must be >= 2 (one to fall back on)"
        )


@dataclass(frozen=True)
class SampleConfig:
    """Sampling defaults; `parti generate` and the server take each per request too."""

    # Classifier-free guidance (Ho & Salimans 2022); 1: conditional only, 0: unconditional.
    # Chosen on a real set's validation split (`parti sweep`; the starter preset on 3 783
    # Apple emoji, 100 prompts): prompt following 0.83 at 1.5 for every temperature and
    # top-p tried, 0.77-0.83 at 3, 0.73-0.77 at 5. Temperature and top-p stay standard.
    guidance_scale: float = 1.5
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2020); 1: off
    seed: int = 0
    candidates: int = 1  # samples per prompt, reranked by a scorer when one is given

    def __post_init__(self) -> None:
        check_sampling(self.guidance_scale, self.temperature, self.top_k, self.top_p, "sample.")
        _check(self.candidates >= 1, "sample.candidates must be >= 1")


def check_sampling(
    guidance_scale: float, temperature: float, top_k: int, top_p: float, prefix: str = ""
) -> None:
    """Raise ConfigError naming the first sampling setting that cannot be used."""
    _check(
        math.isfinite(guidance_scale) and guidance_scale >= 0,
        f"{prefix}guidance_scale={guidance_scale}: use a finite number >= 0",
    )
    _check(
        math.isfinite(temperature) and temperature >= 0,
        f"{prefix}temperature={temperature}: use a finite number >= 0 (0: greedy)",
    )
    _check(top_k >= 0, f"{prefix}top_k={top_k}: use 0 (off) or a positive count")
    _check(
        math.isfinite(top_p) and 0 < top_p <= 1, f"{prefix}top_p={top_p}: use a number in (0, 1]"
    )


@dataclass(frozen=True)
class ScorerConfig:
    """The in-house CLIP-style image–text scorer (contrastive, Radford et al. 2021).

    It supplies the default CLIP score, the FID features and the reranking of candidates.
    `clip_model` points at a local Hugging Face CLIP folder to use instead (none can be
    downloaded here).
    """

    clip_model: str | None = None
    embed_dim: int = 128  # the shared image–text space
    channels: int = 16  # image tower: width at full resolution, doubled per halving
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
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
    negatives_per_step: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "embed_dim",
            "channels",
            "text_width",
            "text_layers",
            "steps",
            "batch_size",
            "negatives_per_step",
        ):
            _check(getattr(self, name) >= 1, f"scorer.{name} must be >= 1")
        _check(
            self.text_width % self.text_heads == 0, "scorer.text_width must divide by text_heads"
        )
        _check(self.lr > 0, "scorer.lr must be > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """The pinned evaluator: what is sampled and scored, and with which seed."""

    prompts: int = 100  # held-out captions sampled per split (validation, test)
    # Training captions sampled too, for prompt following on seen captions; 0: none.
    seen_prompts: int = 100
    fid_images: int = 600  # real validation images in the FID reference statistics
    batch_size: int = 64
    seed: int = 0  # held-out prompt i is sampled with seed + i (the other settings: `sample`)
    grid_rows: int = 8  # rows (caption | generated | real) per split in the sample grid

    def __post_init__(self) -> None:
        for name in ("prompts", "fid_images", "batch_size"):
            _check(getattr(self, name) >= 1, f"evaluate.{name} must be >= 1")
        for name in ("seen_prompts", "grid_rows"):
            _check(getattr(self, name) >= 0, f"evaluate.{name} must be >= 0")


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow runs go. None: a SQLite store and artifact folder under `work_dir`."""

    tracking_uri: str | None = None
    experiment: str = "parti-ops"

    def __post_init__(self) -> None:
        _check(bool(self.experiment.strip()), "tracking.experiment must not be empty")


@dataclass(frozen=True)
class RegistryConfig:
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
    min_prompt_following: float = 0.5
    max_bits_per_token: float = 8.0  # held-out bits per image token (log2 1024 = 10: uniform)
    min_fidelity: float = 0.0  # the oracle's exact accuracy, where rows carry scenes
    # Margins against the champion.
    max_prompt_following_drop: float = 0.02  # absolute (0..1)
    max_nll_rise: float = 0.02  # held-out bits per image token, absolute
    max_fidelity_drop: float = 0.02  # oracle exact accuracy, absolute (0..1)
    # FID is relative: its scale moves with the feature model and the number of images.
    max_fid_rise: float = 0.05  # 0.05: at most 5% above the champion's FID

    def __post_init__(self) -> None:
        p = "registry."
        _check(bool(self.model_name.strip()), f"{p}model_name must not be empty")
        for name in ("max_fidelity_drop", "max_nll_rise", "max_fid_rise",
                     "max_prompt_following_drop"):  # fmt: skip
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"{p}{name}={value}: use a number >= 0")
        for name in ("min_fidelity", "min_prompt_following"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"{p}{name}={value}: use 0..1")
        _check(self.max_bits_per_token > 0, f"{p}max_bits_per_token must be > 0")


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export, the parity checks that follow it, and the int8 variant."""

    opset: int = 20
    parity_prompts: int = 32  # greedy decoding must agree on every one of these
    parity_guidance: float = 3.0  # guidance used by the parity run, so both halves are checked
    logits_atol: float = 1e-4  # largest |ONNX - PyTorch| of any logit
    pixel_tolerance: float = 1 / 255  # mean |ONNX - PyTorch| of decoded pixels in [0, 1]
    # Also write ONNX Runtime's dynamically quantised int8 variant. Its check reads synthetic
    # scenes back with the attribute oracle, so only the tiny preset turns it on.
    int8: bool = False
    int8_prompts: int = 64  # prompts that measure the int8 variant's fidelity and speed
    max_int8_fidelity_drop: float = 0.02  # oracle exact accuracy; beyond it fp32 is served

    def __post_init__(self) -> None:
        p = "export."
        _check(17 <= self.opset <= 23, f"{p}opset={self.opset}: use 17..23")
        _check(self.parity_prompts >= 1 and self.int8_prompts >= 1, f"{p}*_prompts must be >= 1")
        check_sampling(self.parity_guidance, 0.0, 0, 1.0, p + "parity_")
        _check(self.logits_atol > 0 and self.pixel_tolerance > 0, f"{p}tolerances must be > 0")
        _check(0 <= self.max_int8_fidelity_drop <= 1, f"{p}max_int8_fidelity_drop: use 0..1")


@dataclass(frozen=True)
class ServeConfig:
    """The Triton model repository and the server that `parti serve` starts."""

    model_name: str = "parti"
    # cpu: the orchestrator alone (Python backend, as in the nvidia-pytriton bundle); gpu:
    # also the three graphs as ONNX Runtime backend models with TensorRT (NGC images).
    target: str = "cpu"
    # Dynamic batching: requests are merged up to `max_batch_size` prompts, waiting at most
    # `queue_delay_us` for more; past `max_queue_size` waiting requests Triton rejects new
    # ones at once rather than letting clients hang.
    max_batch_size: int = 8
    queue_delay_us: int = 1000  # 5 ms measured 17 % slower than in-process at one client
    max_queue_size: int = 32
    # Model instances, each a process with its own ONNX Runtime graphs, and intra-op
    # threads per instance (0: one per core). On 2 CPU cores two single-threaded instances
    # serve more than one with two threads: one prompt's decode step is too small to split
    # (bench/serving.py). On a GPU: one instance per GPU.
    instances: int = 2
    threads: int = 1
    precision: str = "auto"  # fp32 | int8 | auto: int8 where its fidelity drop is in bounds
    max_prompt_bytes: int = 4096  # longer prompts are refused (the tokenizer would cut them)
    # Cancelled requests stop decoding within this long: the server is asked at most this
    # often (each ask is a round trip; asking every step cost 35 % of 1-client throughput).
    cancel_check_ms: int = 20
    # ONNX Runtime execution providers of the orchestrator, in order of preference; on a
    # GPU server "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider".
    providers: str = "CPUExecutionProvider"
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    ready_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        p = "serve."
        _check(bool(self.model_name.strip()), f"{p}model_name must not be empty")
        for name in (
            "max_batch_size",
            "max_queue_size",
            "instances",
            "max_prompt_bytes",
            "cancel_check_ms",
        ):
            _check(getattr(self, name) >= 1, f"{p}{name} must be >= 1")
        _check(self.queue_delay_us >= 0 and self.threads >= 0, f"{p}queue_delay_us, threads >= 0")
        _check(self.precision in ("fp32", "int8", "auto"), f"{p}precision: fp32|int8|auto")
        _check(self.target in ("cpu", "gpu"), f"{p}target={self.target!r}: cpu|gpu")
        _check(bool(self.providers.strip()), f"{p}providers must name at least one provider")
        for name in ("http_port", "grpc_port", "metrics_port"):
            _check(0 <= getattr(self, name) <= 65_535, f"{p}{name}: use 0 (free) or a port")
        _check(self.ready_timeout_s > 0, f"{p}ready_timeout_s must be > 0")


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
            preset: a name from `PRESETS`; a YAML file's own `preset:` key wins over it.
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
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Inverse of `to_json`: how pipeline components receive the config."""
        return cls().merge(json.loads(text))  # the JSON holds every field, the name too

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


def _merge(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for key, value in tree.items():
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


# The synthetic scenes end to end on two CPU cores, at two budgets. The sizes are the
# defaults'; the settings marked "oracle" were chosen on the synthetic set's oracle and
# belong to it alone.
_SYNTHETIC = {
    "image_tokenizer.edge_weight": 4.0,  # oracle: thin shapes, exact 73 vs 52 %
    # Oracle: temperature 0.7 (2700 decoder steps, 50 prompts: exact 46 % with guidance
    # 1.5, 38 % greedy, 20 % at temperature 1 unguided) and top-p 0.6 (200 prompts per
    # split: 81 / 71 % against 73 / 65.5 %).
    "sample.temperature": 0.7,
    "sample.top_p": 0.6,
}
PRESETS: dict[str, Config] = {
    # `make run`: data to a served model in ten minutes on 2 cores (bench/pipeline.py), the
    # steps of each stage sized to its share: about 0.11 s per tokenizer step, 0.3 per
    # scorer step and 0.33 per decoder step on 2 AVX2 cores, and 4.5 minutes for the rest.
    # Nearest-code encoding (refined codes cost 56x). Studies: docs/experiments/tiny-budget.md.
    "tiny": Config(name="tiny").merge(
        {
            **_SYNTHETIC,
            "image_tokenizer.steps": 800,
            "scorer.steps": 120,
            "train.steps": 680,
            "evaluate.seen_prompts": 0,
        }
    ),
    # A larger synthetic set and images for a single GPU; ViT-VQGAN tokenizer, 16x16 codes.
    "small": Config(
        name="small",
        data=DataConfig(image_size=128, num_images=50_000),
        text_tokenizer=TextTokenizerConfig(vocab_size=4096, max_length=128),
        image_tokenizer=ImageTokenizerConfig(
            architecture="vit",
            downsample=8,
            channels=256,
            vit_depth=8,
            vit_heads=8,
            latent_dim=256,
            codebook_size=8192,
            codebook_dim=32,
            gan_weight=0.1,
            gan_start=30_000,
            disc_channels=64,
            steps=50_000,
            batch_size=64,
            lr=3e-4,
            warmup_steps=1000,
            checkpoint_every=2000,
            compile=True,
            eval_batch_size=256,
            # Refinement's groups suit a decoder that reads mostly neighbouring codes (the
            # patch architecture's); ViT-VQGAN's decoder attends to every code. Not measured.
            refine_candidates=1,
        ),
        parti=PartiConfig(d_model=512, encoder_layers=6, decoder_layers=12, heads=8, dropout=0.1),
        train=TrainConfig(
            steps=100_000,
            batch_size=256,
            lr=4.5e-4,
            # Muon at AdamW's learning rate, as Liu et al. (2025) trained at scale; the
            # tiny preset's split of the two is tuned on two CPU cores and nowhere else.
            muon_lr_scale=1.0,
            warmup_steps=2000,
            compile=True,
            accelerator="NVIDIA_TESLA_A100",
            checkpoint_every=1000,
        ),
    ),
}


def _paper_preset(name: str, d_model: int, encoder: int, decoder: int, heads: int) -> Config:
    """Parti at a size of its Table 1: 256² images as 32² codes of 8192, 16k text pieces."""
    small = PRESETS["small"]
    return Config(
        name=name,
        data=DataConfig(image_size=256, num_images=1_000_000),
        text_tokenizer=TextTokenizerConfig(kind="unigram", vocab_size=16_384, max_length=128),
        image_tokenizer=dataclasses.replace(small.image_tokenizer, channels=768, vit_depth=12),
        parti=PartiConfig(
            d_model=d_model,
            encoder_layers=encoder,
            decoder_layers=decoder,
            heads=heads,
            dropout=0.1,
        ),
        train=dataclasses.replace(small.train, batch_size=512, nproc=8, precision="bf16"),
    )


for _preset in (
    _paper_preset("parti-350m", 1024, 12, 12, 16),
    _paper_preset("parti-750m", 1024, 12, 36, 16),
    _paper_preset("parti-3b", 2048, 12, 36, 32),
    _paper_preset("parti-20b", 4096, 16, 64, 64),
):
    PRESETS[_preset.name] = _preset

# The tiny preset with a few iterations per step: the whole pipeline, data to smoke test,
# in about two minutes on 2 CPU cores. For checking the plumbing (the pipeline tests,
# bench/pipeline.py), not the model.
PRESETS["quick"] = PRESETS["tiny"].merge(
    {
        "data.num_images": 200,
        "image_tokenizer.steps": 4,
        "image_tokenizer.batch_size": 8,
        "image_tokenizer.channels": 8,
        "parti.d_model": 32,
        "parti.decoder_layers": 1,
        "train.steps": 3,
        "train.batch_size": 8,
        "train.warmup_steps": 1,
        "scorer.steps": 3,
        "scorer.channels": 4,
        "scorer.embed_dim": 16,
        "scorer.text_width": 32,
        "scorer.text_layers": 1,
        "evaluate.prompts": 4,
        "evaluate.seen_prompts": 4,
        "evaluate.fid_images": 16,
        "registry.max_bits_per_token": 11.0,  # three training steps: barely below log2(1024)
        "registry.min_prompt_following": 0.0,  # ... and no prompt following to speak of
        "export.parity_prompts": 4,
        "export.int8": False,
    }
)
PRESETS["quick"] = dataclasses.replace(PRESETS["quick"], name="quick")

# Your own captioned images on a CPU: a first model from data to smoke test in about half
# an hour on 2 cores, for a few thousand images at 64×64 (e.g. an icon set). The
# defaults' sizes and settings, with shorter tokenizer and scorer training.
PRESETS["starter"] = Config(name="starter").merge(
    {
        "image_tokenizer.steps": 2000,
        "scorer.steps": 600,
    }
)

# The tiny model trained for the defaults' steps, with refined codes: over an hour on
# 2 cores, a third of it encoding (each code chosen among 16 by decoding its patch).
PRESETS["tiny-full"] = Config(name="tiny-full").merge(
    {
        **_SYNTHETIC,
        "image_tokenizer.refine_candidates": 16,  # oracle: exact 98.2 vs 96.4 %
        "export.int8": True,  # served when the oracle loses <= 2 points to fp32
    }
)
