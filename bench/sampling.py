"""Sampling benchmark: KV-cache decoding vs recomputing the whole prefix at every step.

    python bench/sampling.py [--preset tiny] [--prompts 4] [--model BUNDLE]

Prints one JSON object. Both ways sample the same prompts with the same seeds and
guidance (conditional and null-caption halves in one batch) from the same model, in one
run; `cached_vs_uncached` is the ratio of their images/s. The no-cache path is what
parti-pytorch does: a full forward pass over the codes so far for every new code. With
`--model`, a trained bundle; otherwise the preset's Parti with untrained weights (speed
does not depend on them) at the preset's sequence lengths.
"""

import argparse
import json
import platform
import time

import torch

from parti_ops.model.config import Config
from parti_ops.model.parti import Parti, PartiDims
from parti_ops.model.sampling import generate_codes


def images_per_s(model: Parti, ids, mask, *, use_cache: bool, repeats: int) -> float:
    seeds = list(range(len(ids)))
    generate_codes(model, ids, mask, seeds, use_cache=use_cache)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        generate_codes(model, ids, mask, seeds, guidance_scale=3.0, use_cache=use_cache)
    return repeats * len(ids) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default=None, help="a bundle from `parti train`")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=20, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = Config.from_name(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        from parti_ops.model.generate import TextToImage

        model = TextToImage.load(args.model, device=device).parti
    else:
        dims = PartiDims.from_config(config)
        torch.manual_seed(0)
        model = Parti(config=config.parti, dims=dims).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.dims.text_vocab, (args.prompts, args.text_tokens), generator=g)
    ids, mask = ids.to(device), torch.ones_like(ids, dtype=torch.bool).to(device)
    cached = images_per_s(model, ids, mask, use_cache=True, repeats=args.repeats)
    uncached = images_per_s(model, ids, mask, use_cache=False, repeats=1)
    print(
        json.dumps(
            {
                "bench": "sampling",
                "preset": args.preset,
                "device": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
                "threads": torch.get_num_threads(),
                "parameters": model.num_parameters(),
                "image_tokens": model.dims.image_length,
                "prompts": args.prompts,
                "guidance": "conditional and null halves in one batch (scale 3)",
                "cached_images_per_s": round(cached, 3),
                "uncached_images_per_s": round(uncached, 3),
                "cached_vs_uncached": round(cached / uncached, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
