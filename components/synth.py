"""Synthesize step: draw the synthetic data set into a Hugging Face imagefolder.

`out_dir/{train,validation,test}/` each hold `00000.png`, ... and a `metadata.jsonl` whose rows
are `{"file_name", "text", "background", "objects"}`. Test images each show a held-out (colour,
shape) pair, never seen in train or validation; validation images are unseen images of seen
pairs. The whole tree is a pure function of `DataConfig`: the same seed gives the same bytes,
so DVC sees an unchanged data set as unchanged.
"""

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from parti_ops.components.progress import track
from parti_ops.components.shards import empty_own_folder
from parti_ops.model.config import Config, ConfigError, DataConfig
from parti_ops.model.scenes import describe, render, sample_scene

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
METADATA = "metadata.jsonl"
_OWN_FILE = re.compile(r"\d{5,}\.png|metadata\.jsonl")


def split_sizes(data: DataConfig) -> dict[str, int]:
    """Images per split: test and validation by their fractions (at least 1), train the rest."""
    test = max(1, round(data.num_images * data.heldout_fraction))
    validation = max(1, round(data.num_images * data.validation_fraction))
    train = data.num_images - test - validation
    if train < 1:
        raise ConfigError(
            f"data.num_images={data.num_images} leaves no training images after "
            f"{validation} validation and {test} test images"
        )
    return {"train": train, "validation": validation, "test": test}


def synthesize(out_dir: str | Path, data: DataConfig) -> dict[str, Any]:
    """Write the synthetic data set, byte for byte the same for the same `data`.

    Args:
        out_dir: the folder to fill. It must be missing, empty, or hold only an earlier
            synthetic set (which is replaced); anything else raises FileExistsError.
        data: size, image side, seed and split fractions.

    Returns:
        `{"out_dir": ..., "counts": {"train": n, "validation": n, "test": n}, "num_images": n,
        "image_size": n, "seed": n}`.
    """
    out = Path(out_dir)
    counts = split_sizes(data)
    _clear(out)
    # One generator, drawn from in a fixed order (scene, jitter, phrasing), fixes every byte.
    rng = np.random.default_rng(data.seed)
    for split, count in counts.items():
        folder = out / split
        folder.mkdir(parents=True)
        rows = []
        for index in track(range(count), f"synth {split}", count):
            scene = sample_scene(rng, heldout=split == "test")
            name = f"{index:05d}.png"
            # Pillow writes no time or text chunks unless asked; the level is pinned so a
            # change of Pillow's default cannot change the bytes.
            render(scene, image_size=data.image_size, rng=rng).save(
                folder / name, format="PNG", compress_level=6, optimize=False
            )
            row = {"file_name": name, "text": describe(scene, rng), **scene.to_dict()}
            rows.append(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        (folder / METADATA).write_text("".join(rows), encoding="utf-8", newline="\n")
        logger.info("synthesized %d %s images in %s", count, split, folder)
    return {
        "out_dir": str(out),
        "counts": counts,
        "num_images": data.num_images,
        "image_size": data.image_size,
        "seed": data.seed,
    }


def _clear(out: Path) -> None:
    """Make `out` an empty folder, deleting only what an earlier `synthesize` wrote there."""
    empty_own_folder(out, _is_own_split, FileExistsError, "synthetic data set")


def _is_own_split(entry: Path) -> bool:
    """A split folder holding only numbered PNGs and metadata.jsonl, as `synthesize` writes."""
    if entry.is_symlink() or not entry.is_dir() or entry.name not in SPLITS:
        return False
    return all(
        f.is_file() and not f.is_symlink() and _OWN_FILE.fullmatch(f.name) for f in entry.iterdir()
    )


def synth_step(config: Config, parent_run_id: str, out_dir: str) -> dict[str, Any]:
    """`synthesize` inside a nested MLflow run."""
    from parti_ops.components.tracking import step_run

    with step_run(config, "synth", parent_run_id) as run:
        summary = synthesize(out_dir, config.data)
        run.log(
            metrics={f"images.{k}": v for k, v in summary["counts"].items()},
            params={"seed": config.data.seed, "num_images": config.data.num_images},
        )
    return summary
