"""Reading what earlier steps wrote: a split of the canonical shards (images, captions,
scenes) and the encoded codes. The training, evaluation and serving steps load their
inputs through these, so that no step imports another step's module.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from parti_ops.components.shards import file_sha256, iter_shards, read_manifest
from parti_ops.model.errors import PartiError
from parti_ops.model.scenes import Scene

if TYPE_CHECKING:
    import torch


def iter_split(data_dir: str | Path, split: str, columns: list[str]) -> Iterator[pa.Table]:
    """Each accepted shard of `split`, with `columns`, in shard order."""
    yield from iter_shards(data_dir, columns, split=split)


def decode_png(data: bytes) -> np.ndarray:
    """A canonical row's image bytes → uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def load_images(data_dir: str | Path, split: str) -> tuple[torch.Tensor, list[Scene | None]]:
    """All images of a split as uint8 (N, H, W, 3), with each row's scene where it has one.

    Synthetic rows carry their scene (background, objects) in `metadata`; rows from
    other sources have None, and the oracle skips them.
    """
    images, scenes = [], []
    for table in iter_split(data_dir, split, ["image", "metadata"]):
        images += [decode_png(b) for b in table["image"].to_pylist()]
        scenes += [parse_scene(m) for m in table["metadata"].to_pylist()]
    return _as_tensor(images), scenes


def load_pairs(data_dir: str | Path, split: str) -> tuple[torch.Tensor, list[str]]:
    """The (image, caption) pairs of a split: uint8 (N, H, W, 3) and N captions."""
    images, captions, _ = load_captioned(data_dir, split)
    return images, captions


def load_captioned(
    data_dir: str | Path, split: str
) -> tuple[torch.Tensor, list[str], list[Scene | None]]:
    """`load_pairs` with each pair's scene where its row has one (see `load_images`)."""
    images, captions, scenes = [], [], []
    for table in iter_split(data_dir, split, ["image", "caption", "metadata"]):
        for image, caption, metadata in zip(
            table["image"].to_pylist(),
            table["caption"].to_pylist(),
            table["metadata"].to_pylist(),
            strict=True,
        ):
            if caption:
                images.append(decode_png(image))
                captions.append(caption)
                scenes.append(parse_scene(metadata))
    return _as_tensor(images), captions, scenes


def _as_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (N, H, W, 3). torch is imported here, so the caption step never loads it."""
    import torch

    if not images:
        return torch.empty(0, 0, 0, 3, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images))


def parse_scene(metadata: str | None) -> Scene | None:
    try:
        return Scene.from_dict(json.loads(metadata or "{}"))
    except (KeyError, TypeError, ValueError):
        return None


def heldout_split(data_dir: str | Path) -> str:
    """The split to score tokenizers on: `test` if the data has one, else `validation`."""
    splits = read_manifest(data_dir).get("splits") or {}
    return "test" if splits.get("test") else "validation"


# The encoded data set (components/encode.py writes it).

FORMAT = "parti-ops/encoded"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class EncodedFormatError(PartiError, ValueError):
    """An encoded data set that is missing, damaged or made by other tokenizers."""


def read_encoded_manifest(encoded_dir: str | Path) -> dict[str, Any]:
    """An encoded folder's manifest, after checking that it is one `encode` wrote."""
    folder = Path(encoded_dir)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EncodedFormatError(
            f"{folder}: no readable {MANIFEST} ({err}); run `parti tokenizer encode` first"
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise EncodedFormatError(f"{folder}: not a {FORMAT} v{FORMAT_VERSION} folder; re-encode")
    return manifest


def load_encoded(encoded_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """All shards of one split, checked against the manifest's sha256s, concatenated."""
    from safetensors.numpy import load_file

    folder = Path(encoded_dir)
    manifest = read_encoded_manifest(folder)
    if split not in manifest["splits"]:
        raise EncodedFormatError(
            f"{folder}: no split {split!r}; it has {sorted(manifest['splits'])}"
        )
    parts: dict[str, list[np.ndarray]] = {}
    for shard in manifest["splits"][split]["shards"]:
        path = folder / shard["file"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            raise EncodedFormatError(f"{path}: missing or changed since it was written; re-encode")
        for key, value in load_file(path).items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}
