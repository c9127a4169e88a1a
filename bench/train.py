"""Decoder training benchmark: tokens/s of `fit()` eager vs `torch.compile`, and MFU on a GPU.

    python bench/train.py [--preset tiny] [--steps 20] [--warmup 10] [--batch B]
    python bench/train.py --preset parti-350m --batch 32      # on a GPU, bf16

Prints one JSON object. Both runs are `fit()` on the same random codes and captions at
the preset's sizes (speed does not depend on the data), in one process; each figure is
the throughput of the last `--steps` steps, after `--warmup` steps that hold
torch.compile's compilation. `compiled_vs_eager` is their ratio. On a GPU the preset's
precision applies (bf16 autocast) and MFU is model FLOPs (6 per parameter per token plus
attention) over the GPU's dense bf16 peak.
"""

import argparse
import dataclasses
import json
import platform
import tempfile
import time

import torch

from parti_ops.model.config import Config
from parti_ops.model.parti import PartiDims
from parti_ops.model.train import CodeData, fit


def random_data(dims: PartiDims, rows: int, text_tokens: int) -> CodeData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, dims.text_vocab, (rows, dims.text_length), generator=g)
    mask = torch.arange(dims.text_length)[None, :] < text_tokens
    codes = torch.randint(0, dims.codebook_size, (rows, dims.image_length), generator=g)
    return CodeData(codes=codes, text_ids=ids, text_mask=mask.expand(rows, -1))


def measure(
    config: Config, dims: PartiDims, data: CodeData, steps: int, warmup: int, compile_: bool
) -> dict[str, float]:
    train = dataclasses.replace(
        config.train,
        steps=warmup + steps,
        log_every=warmup if warmup else steps,
        checkpoint_every=10**9,
        compile=compile_,
        nproc=1,
        grad_accum=1,
    )
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        fit(config.parti, train, dims, data, out, log_metrics=lambda m, s: history.append(m))
    last = history[-1]
    return {
        "tokens_per_s": round(last["tokens_per_s"], 1),
        "mfu": round(last["mfu"], 4) if "mfu" in last else None,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--text-tokens", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args()

    config = Config.from_name(args.preset)
    if args.batch:
        config = config.merge({"train": {"batch_size": args.batch, "nproc": 1, "grad_accum": 1}})
    dims = PartiDims.from_config(config)
    data = random_data(dims, rows=4 * config.train.batch_size, text_tokens=args.text_tokens)
    eager = measure(config, dims, data, args.steps, args.warmup, compile_=False)
    result = {
        "bench": "train",
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine(),
        "torch": torch.__version__,
        "batch_size": config.train.batch_size,
        "tokens_per_example": dims.image_length,
        "precision": config.train.precision,
        "eager": eager,
    }
    if not args.no_compile:
        compiled = measure(config, dims, data, args.steps, args.warmup, compile_=True)
        result["compiled"] = compiled
        result["compiled_vs_eager"] = round(compiled["tokens_per_s"] / eager["tokens_per_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
