"""Image tokenizer benchmark: batched vs one-at-a-time encoding, and compiled vs eager training.

    python bench/tokenizer.py [--preset tiny] [--images N] [--steps S] [--batch B]

Prints one JSON object. Both comparisons are ratios taken in the same run, on the same
model and images (the preset's VQGAN, untrained weights: speed does not depend on them):
- `encode.batched_vs_single`: images/s of `model.tokenize` (what encoding uses, with the
  preset's `refine_candidates`) on batches of B images (the preset's `eval_batch_size`)
  over images/s one image at a time, both under `torch.inference_mode`; other batch
  sizes are listed beside it;
- `encode.refined_vs_nearest`: batched images/s with the preset's refinement over
  images/s taking the nearest codes (`refine_candidates` 1): what refinement costs;
- `train.compiled_vs_eager`: optimiser steps/s of `train_vqgan` with
  `image_tokenizer.compile=true` over without, both timed after the first
  `--warmup` steps (which hold torch.compile's one-off compilation, reported apart).
"""

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from typing import Any

import numpy as np
import torch

from parti_ops.model.config import Config
from parti_ops.model.scenes import render, sample_scene
from parti_ops.model.vqgan import VQGAN, to_unit
from parti_ops.model.vqgan_train import train_vqgan


def make_images(n: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    scenes = (sample_scene(rng, heldout=False) for _ in range(n))
    return torch.from_numpy(
        np.stack([np.asarray(render(s, image_size=size, rng=rng)) for s in scenes])
    )


def images_per_s(model: VQGAN, images: torch.Tensor, batch: int) -> float:
    model.tokenize(to_unit(images[:batch]))  # warm-up: allocator, oneDNN primitives
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        model.tokenize(to_unit(images[start : start + batch]))
    return len(images) / (time.perf_counter() - started)


def train_steps_per_s(
    config: Config, images: torch.Tensor, steps: int, warmup: int, compile_: bool
) -> dict[str, float]:
    cfg = dataclasses.replace(
        config.image_tokenizer,
        steps=warmup + steps,
        compile=compile_,
        gan_start=10**9,  # the reconstruction path alone; the GAN adds the same to both
        checkpoint_every=10**9,
        warmup_steps=1,
    )
    marks: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train_vqgan(
            cfg, images, out, progress=lambda step, _: marks.setdefault(step, time.perf_counter())
        )
    return {
        "steps_per_s": steps / (marks[warmup + steps] - marks[warmup]),
        "first_steps_s": marks[warmup] - started,
    }


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, help="default: the preset's eval_batch_size")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    config = Config.from_name(args.preset)
    args.batch = args.batch or config.image_tokenizer.eval_batch_size
    images = make_images(args.images, config.data.image_size)
    torch.manual_seed(0)
    model = VQGAN(config=config.image_tokenizer, image_size=config.data.image_size).train()
    model(to_unit(images[:64]))  # k-means initialises the codebook, as training would
    model.eval()
    per_batch = {b: images_per_s(model, images, b) for b in sorted({8, 16, 32, 128, args.batch})}
    batched = per_batch[args.batch]
    single = images_per_s(model, images[: max(32, args.images // 4)], 1)
    refined_candidates = config.image_tokenizer.refine_candidates
    model.config = dataclasses.replace(config.image_tokenizer, refine_candidates=1)
    nearest = images_per_s(model, images, args.batch)
    eager = train_steps_per_s(config, images, args.steps, args.warmup, compile_=False)
    compiled = train_steps_per_s(config, images, args.steps, args.warmup, compile_=True)
    return {
        "bench": "tokenizer",
        "preset": args.preset,
        "image_size": config.data.image_size,
        "grid": config.image_grid,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "encode": {
            "batch": args.batch,
            "batched_images_per_s": round(batched, 1),
            "single_images_per_s": round(single, 1),
            "batched_vs_single": round(batched / single, 2),
            "refine_candidates": refined_candidates,
            "nearest_images_per_s": round(nearest, 1),
            "refined_vs_nearest": round(batched / nearest, 3),
            "images_per_s_by_batch": {b: round(v, 1) for b, v in per_batch.items()},
        },
        "train": {
            "batch": config.image_tokenizer.batch_size,
            "timed_steps": args.steps,
            "eager_steps_per_s": round(eager["steps_per_s"], 2),
            "compiled_steps_per_s": round(compiled["steps_per_s"], 2),
            "compiled_vs_eager": round(compiled["steps_per_s"] / eager["steps_per_s"], 2),
            "eager_first_steps_s": round(eager["first_steps_s"], 1),
            "compiled_first_steps_s": round(compiled["first_steps_s"], 1),
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
