"""Pre-encode the accepted data: every image to its code grid, every caption to token ids.

The decoder trains on these, so it never runs the image tokenizer itself. Output:

    <out>/train-00000.safetensors, validation-00000.safetensors, test-00000.safetensors, ...
    <out>/manifest.json

Each shard holds `row_id` (int64, N), `codes` (uint16, N × h × w), `text_ids` (uint16,
N × max_length, padded with <pad>) and `text_lengths` (int64, N). The manifest records
the grid, the vocabularies, each shard's sha256, the data digest and the digests of the
two tokenizers that made them, so a decoder can check it is given matching codes.
Work is streamed shard by shard: memory holds one input shard and, per split, at most
one output shard (`shard_size` rows, plus less than a batch), whatever the data set's size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parti_ops.components.loaders import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    EncodedFormatError,
    decode_png,
)
from parti_ops.components.shards import file_sha256, iter_shards, read_manifest, write_json
from parti_ops.components.versioning import files_digest
from parti_ops.model.config import Config
from parti_ops.model.layout import IMAGE_TOKENIZER_FILES, TEXT_TOKENIZER_FILES

log = logging.getLogger(__name__)


class _SplitWriter:
    """Buffers one split's encoded rows; writes a safetensors shard once `shard_size` is reached."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.parts: dict[str, list[np.ndarray]] = {}
        self.rows = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, **arrays: np.ndarray) -> None:
        for key, value in arrays.items():
            self.parts.setdefault(key, []).append(value)
        self.rows += len(arrays["row_id"])
        if self.rows >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        from safetensors.numpy import save_file

        if not self.rows:
            return
        arrays = {k: np.concatenate(v) for k, v in self.parts.items()}
        name = f"{self.split}-{len(self.shards):05d}.safetensors"
        save_file(arrays, self.out / name)
        self.shards.append(
            {"file": name, "rows": self.rows, "sha256": file_sha256(self.out / name)}
        )
        self.parts, self.rows = {}, 0


def encode(
    data_dir: str | Path,
    text_dir: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    max_length: int,
    batch_size: int = 256,
    shard_size: int = 10_000,
) -> dict[str, Any]:
    """Encode every accepted row of every split; returns the manifest it writes."""
    from parti_ops.components.progress import track
    from parti_ops.model.text_tokenizer import encode_captions, load_text_tokenizer
    from parti_ops.model.vqgan import VQGAN, to_unit

    manifest = read_manifest(data_dir)
    tokenizer = load_text_tokenizer(text_dir)
    try:
        model = VQGAN.from_pretrained(image_dir)
    except ValueError as err:
        raise EncodedFormatError(str(err)) from None
    if manifest.get("image_size") not in (None, model.image_size):
        raise EncodedFormatError(
            f"{image_dir}: the image tokenizer takes {model.image_size}px images, the data in"
            f" {data_dir} is {manifest['image_size']}px; train it on this data"
        )
    if len(tokenizer) > 65_536:
        raise EncodedFormatError(f"{text_dir}: {len(tokenizer)} tokens do not fit uint16 ids")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / MANIFEST]:  # an earlier encoding's
        stale.unlink(missing_ok=True)
    writers: dict[str, _SplitWriter] = {}
    truncated = 0
    shards = manifest["shards"]
    columns = ["row_id", "split", "caption", "image"]
    for table in track(iter_shards(data_dir, columns), "encoding", total=len(shards)):
        for start in range(0, table.num_rows, batch_size):
            rows = table.slice(start, batch_size)
            pixels = np.stack([decode_png(b) for b in rows["image"].to_pylist()])
            codes = model.tokenize(to_unit(torch.from_numpy(pixels)))
            captions = [c or "" for c in rows["caption"].to_pylist()]
            ids, lengths, cut = encode_captions(tokenizer, captions, max_length)
            truncated += cut
            splits = np.asarray(rows["split"].to_pylist())
            for split in sorted(set(splits)):
                here = splits == split
                writer = writers.setdefault(split, _SplitWriter(out, split, shard_size))
                writer.add(
                    row_id=rows["row_id"].to_numpy()[here].astype(np.int64),
                    codes=codes.numpy()[here].astype(np.uint16),
                    text_ids=ids[here],
                    text_lengths=lengths[here],
                )
    body: dict[str, Any] = {"splits": {}}
    for split, writer in sorted(writers.items()):
        writer.flush()
        body["splits"][split] = {
            "rows": sum(s["rows"] for s in writer.shards),
            "shards": writer.shards,
        }
    body |= {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rows": sum(s["rows"] for s in body["splits"].values()),
        "grid": [model.grid, model.grid],
        "codebook_size": model.config.codebook_size,
        "vocab_size": len(tokenizer),
        "max_length": max_length,
        "special_tokens": {
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id,
        },
        "truncated_captions": truncated,
        "data_digest": manifest.get("data_digest"),
        "text_tokenizer": {
            "path": str(Path(text_dir).resolve()),
            "digest": files_digest(text_dir, TEXT_TOKENIZER_FILES),
        },
        "image_tokenizer": {
            "path": str(Path(image_dir).resolve()),
            "digest": files_digest(image_dir, IMAGE_TOKENIZER_FILES),
        },
    }
    write_json(out / MANIFEST, body)
    return body


def encode_step(
    config: Config,
    parent_run_id: str,
    data_dir: str,
    text_dir: str,
    image_dir: str,
    out_dir: str,
) -> dict[str, Any]:
    """`encode` inside a nested MLflow run; logs row counts and the tokenizer digests."""
    import time

    from parti_ops.components.tracking import step_run

    with step_run(config, "encode", parent_run_id) as run:
        started = time.perf_counter()
        manifest = encode(
            data_dir,
            text_dir,
            image_dir,
            out_dir,
            max_length=config.text_tokenizer.max_length,
            batch_size=config.image_tokenizer.eval_batch_size,
        )
        seconds = time.perf_counter() - started
        run.log(
            metrics={
                "rows": manifest["rows"],
                "rows_per_s": manifest["rows"] / seconds,
                "truncated_captions": manifest["truncated_captions"],
                **{f"rows.{k}": v["rows"] for k, v in manifest["splits"].items()},
            },
            tags={
                "text_tokenizer.digest": manifest["text_tokenizer"]["digest"],
                "image_tokenizer.digest": manifest["image_tokenizer"]["digest"],
                "data.digest": manifest["data_digest"],
            },
        )
        run.log_artifact(Path(out_dir) / MANIFEST, "encoded")
    log.info("encoded %d rows into %s", manifest["rows"], out_dir)
    return manifest
