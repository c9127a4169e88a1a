"""Data-path benchmark: ingest and validate against a bare Pillow loop, and peak memory.

    python bench/data.py [--images N] [--repeats R] [--image-size S]

Prints one JSON object. Goals:
- ingest+validate runs at no less than half the images/s of `Image.open(path).load()`
  over the same files (`validation_vs_bare >= 0.5`): the data path costs about one decode;
- the peak RSS of ingesting 10·N images is within 20% of ingesting N, each in a fresh
  process (`rss_growth < 0.2`): rows stream through one shard at a time.

Throughput is the best of R runs in this process, so the one-off cost of importing Great
Expectations and building its context is left out (it is reported as `first_run_s`).
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import PIL
from PIL import Image

from parti_ops.components.ingest import ingest
from parti_ops.components.synth import synthesize
from parti_ops.components.validate import validate
from parti_ops.model.config import DataConfig

GOAL_VS_BARE = 0.5
GOAL_RSS_GROWTH = 0.2

# Each ingest runs in a fresh interpreter and reports its own peak in KiB. On Linux that is
# VmHWM from /proc (per address space, so new at exec); ru_maxrss is not usable there, as
# a child starts from its parent's peak at fork (getrusage(2)).
_RSS_CHILD = """
import resource, sys
if sys.argv[1] != "-":
    from parti_ops.components.ingest import ingest
    from parti_ops.model.config import DataConfig
    n, size = int(sys.argv[3]), int(sys.argv[4])
    ingest(sys.argv[1], sys.argv[2], DataConfig(num_images=n, image_size=size))
else:
    import parti_ops.components.ingest  # the imports alone: the floor under both runs
try:
    with open("/proc/self/status") as f:
        print(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bare_pil(paths: list[Path]) -> float:
    """Seconds to open and decode every file with Pillow and nothing else."""
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            im.load()
    return time.perf_counter() - start


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def throughput(source: Path, work: Path, data: DataConfig, repeats: int) -> dict[str, Any]:
    paths = sorted(source.rglob("*.png"))
    bare, ingest_s, validate_s, both = [], [], [], []
    for run in range(repeats):
        canonical, validated = work / f"canonical-{run}", work / f"validated-{run}"
        bare.append(bare_pil(paths))
        ingest_s.append(timed(ingest, source, canonical, data))
        validate_s.append(timed(validate, canonical, validated, data))
        both.append(ingest_s[-1] + validate_s[-1])
    n = len(paths)
    pipeline = n / min(both)
    bare_ips = n / min(bare)
    return {
        "files": n,
        "bare_pil_images_per_s": round(bare_ips),
        "ingest_images_per_s": round(n / min(ingest_s)),
        "validate_images_per_s": round(n / min(validate_s)),
        "ingest_validate_images_per_s": round(pipeline),
        "validation_vs_bare": round(pipeline / bare_ips, 3),
        # The validate step alone (GE over the facts ingest gathered), for comparison.
        "validate_step_vs_bare": round(n / min(validate_s) / bare_ips, 3),
        "first_run_s": {"ingest": round(ingest_s[0], 3), "validate": round(validate_s[0], 3)},
    }


def peak_rss_kib(source: Path | None, out: Path | None, data: DataConfig) -> int:
    args = ["-"]
    if source is not None:
        args = [str(source), str(out), str(data.num_images), str(data.image_size)]
    result = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return int(result.stdout.split()[-1])


def memory(small: Path, large: Path, work: Path, data: DataConfig) -> dict[str, Any]:
    floor = peak_rss_kib(None, None, data)
    at_n = peak_rss_kib(small, work / "rss-n", data)
    at_10n = peak_rss_kib(
        large, work / "rss-10n", dataclasses.replace(data, num_images=10 * data.num_images)
    )
    mib = 1 / 1024
    return {
        "imports_only_mib": round(floor * mib, 1),
        "ingest_n_mib": round(at_n * mib, 1),
        "ingest_10n_mib": round(at_10n * mib, 1),
        "rss_growth": round((at_10n - at_n) / at_n, 3),
        # The same growth measured against what ingesting adds over the imports.
        "rss_growth_above_imports": round((at_10n - at_n) / max(at_n - floor, 1), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="N: images for throughput")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; best is kept")
    parser.add_argument("--image-size", type=int, default=64, help="side of images drawn, kept")
    args = parser.parse_args()
    n = args.images
    with tempfile.TemporaryDirectory(prefix="parti-bench-") as scratch:
        work = Path(scratch)
        data = DataConfig(num_images=n, image_size=args.image_size)
        start = time.perf_counter()
        synthesize(work / "images-n", data)
        synthesize(work / "images-10n", dataclasses.replace(data, num_images=10 * n))
        synth_s = time.perf_counter() - start
        speed = throughput(work / "images-n", work, data, args.repeats)
        rss = memory(work / "images-n", work / "images-10n", work, data)
    report = {
        "images": n,
        "image_size": data.image_size,
        "repeats": args.repeats,
        "synthesize_s": round(synth_s, 2),
        "throughput": speed,
        "peak_rss": rss,
        "goals": {
            f"validation_vs_bare >= {GOAL_VS_BARE}": {
                "value": speed["validation_vs_bare"],
                "met": speed["validation_vs_bare"] >= GOAL_VS_BARE,
            },
            f"rss_growth < {GOAL_RSS_GROWTH}": {
                "value": rss["rss_growth"],
                "met": rss["rss_growth"] < GOAL_RSS_GROWTH,
            },
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "max_rss_this_process_mib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            ),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
