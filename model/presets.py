"""The named presets, `Config.from_name(name)`: each a whole Config, studied where noted.

The tiny ones run the synthetic scenes end to end on two CPU cores, `small` and the
paper sizes (Parti's Table 1) need GPUs, and `starter` is for your own captioned images.
Their names are the CLI's `--preset` choices.
"""

from __future__ import annotations

import dataclasses

from parti_ops.model.config import (
    Config,
    DataConfig,
    ImageTokenizerConfig,
    PartiConfig,
    TextTokenizerConfig,
    TrainConfig,
)

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
