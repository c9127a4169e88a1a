"""Prompt fidelity: sample held-out captions, read the pictures back with the oracle.

For each held-out split (`validation`: unseen captions of seen (colour, shape) pairs;
`test`: pairs never seen in training), the first `prompts` synthetic rows' captions are
sampled with the given settings and `read_scene` reads each image back; `compare` gives
per-attribute matches against the row's scene. The same seeds give the same images, so
two evaluations of one model agree exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from parti_ops.components.tokenizers import iter_split, parse_scene
from parti_ops.model.config import SampleConfig
from parti_ops.model.scenes import compare, read_scene

log = logging.getLogger(__name__)

# Unseen captions; test: (colour, shape) pairs never seen in training.
HELDOUT_SPLITS = ("validation", "test")


def heldout_prompts(data_dir: str | Path, split: str, limit: int) -> list[tuple[str, Any]]:
    """The first `limit` (caption, scene) pairs of a split that carry a scene."""
    pairs = []
    for table in iter_split(data_dir, split, ["caption", "metadata"]):
        for caption, metadata in zip(
            table["caption"].to_pylist(), table["metadata"].to_pylist(), strict=True
        ):
            scene = parse_scene(metadata)
            if scene is not None and caption:
                pairs.append((caption, scene))
            if len(pairs) == limit:
                return pairs
    return pairs


def prompt_fidelity(
    bundle_dir: str | Path,
    data_dir: str | Path,
    settings: SampleConfig,
    *,
    prompts: int = 100,
    grid_path: str | Path | None = None,
) -> dict[str, float]:
    """Oracle accuracy per attribute on samples of held-out captions, per split.

    Returns `{"<split>/<attribute>": accuracy}` plus `<split>/prompts`; with `grid_path`,
    a PNG of the first 32 samples of each split (a row of 8 per line, validation first).
    """
    from parti_ops.model.generate import TextToImage

    bundle = TextToImage.load(bundle_dir)
    results: dict[str, float] = {}
    grids = []
    for split in HELDOUT_SPLITS:
        pairs = heldout_prompts(data_dir, split, prompts)
        if not pairs:
            continue
        images = bundle([c for c, _ in pairs], settings).numpy()
        scores: dict[str, list[bool]] = {}
        for image, (_, scene) in zip(images, pairs, strict=True):
            for name, ok in compare(read_scene(image), scene).items():
                scores.setdefault(name, []).append(ok)
        results |= {f"{split}/{k}": float(np.mean(v)) for k, v in scores.items()}
        results[f"{split}/prompts"] = float(len(pairs))
        grids.append(images[:32])
        log.info(
            "%s: exact %.1f%% of %d prompts", split, 100 * results[f"{split}/exact"], len(pairs)
        )
    if grid_path and grids:
        _grid(np.concatenate(grids)).save(grid_path)
    return results


def _grid(images: np.ndarray, per_row: int = 8) -> Image.Image:
    pad = (-len(images)) % per_row
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    rows = [np.concatenate(images[i : i + per_row], axis=1) for i in range(0, len(images), per_row)]
    return Image.fromarray(np.concatenate(rows, axis=0))
