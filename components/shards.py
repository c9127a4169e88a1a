"""The canonical shard format that ingest writes and every later step reads.

A data set folder holds `shard-NNNNN.parquet` files and a `manifest.json`. Each
row is one source row: the canonical image (PNG bytes at the preset resolution,
RGB; null when the source could not be read), its caption, provenance (source
reference, sha256 of the source bytes, split) and the per-row facts that
validation checks. Parquet keeps the facts readable on their own (column
projection), so validation never decodes an image twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
HELDOUT_SPLITS = ("validation", "test")  # the splits never trained on


class ShardFormatError(ValueError):
    """A data set folder that is not (or no longer) in the canonical shard format."""


FORMAT_VERSION = 1

# Facts are what validation looks at; the rest is the row itself.
FACT_FIELDS = [
    pa.field("read_error", pa.string()),  # the row could not be read: why
    pa.field("path_inside_root", pa.bool_()),
    pa.field("decodable", pa.bool_()),
    pa.field("decode_error", pa.string()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("aspect_ratio", pa.float64()),
    pa.field("mode", pa.string()),
    pa.field("caption_chars", pa.int64()),
    pa.field("caption_words", pa.int64()),
    pa.field("caption_utf8", pa.bool_()),
    pa.field("caption_control_chars", pa.bool_()),
    pa.field("duplicate_of", pa.int64()),  # row_id of the first row with the same sha256
]
SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # file:line, tar:key, ...
        pa.field("split", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("image", pa.binary()),  # PNG, image_size x image_size, RGB
        pa.field("metadata", pa.string()),  # the source row's other fields, as JSON
        *FACT_FIELDS,
    ]
)
FACT_COLUMNS = ["row_id", "source", "split", *(f.name for f in FACT_FIELDS)]


class ShardWriter:
    """Writes rows into fixed-size Parquet shards, then a manifest describing them.

    Memory holds at most one shard's rows, whatever the data set's size.
    """

    def __init__(self, out_dir: str | Path, *, shard_size: int, schema: pa.Schema = SCHEMA):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.schema = schema
        self.shards: list[dict[str, Any]] = []
        self._rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.shard_size:
            self.flush()

    def write_table(self, table: pa.Table) -> None:
        """Write an already-built table as one shard (used to filter shards without decoding)."""
        self.flush()
        if table.num_rows:
            self._write_shard(table)

    def flush(self) -> None:
        if self._rows:
            columns = {name: [row[name] for row in self._rows] for name in self.schema.names}
            self._write_shard(pa.Table.from_pydict(columns, schema=self.schema))
            self._rows = []

    def _write_shard(self, table: pa.Table) -> None:
        name = f"shard-{len(self.shards):05d}.parquet"
        path = self.out_dir / name
        # PNG bytes are already compressed: zstd on them costs time and saves nothing.
        codecs = {n: "none" if n == "image" else "zstd" for n in table.column_names}
        pq.write_table(table, path, compression=codecs)
        # Hand freed buffers back to the OS so peak memory stays one shard's worth.
        pa.default_memory_pool().release_unused()
        self.shards.append({"file": name, "rows": table.num_rows, "sha256": file_sha256(path)})

    def close(self, **manifest: Any) -> dict[str, Any]:
        """Flush and write `manifest.json`: format, shards, row count, plus `manifest` fields."""
        self.flush()
        body = {
            "format_version": FORMAT_VERSION,
            "rows": sum(s["rows"] for s in self.shards),
            "shards": self.shards,
            **manifest,
        }
        write_json(self.out_dir / MANIFEST, body)
        return body


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no manifest; point at a folder written by `parti data ingest`"
        ) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: shard format {manifest.get('format_version')!r}, expected {FORMAT_VERSION};"
            " re-run `parti data ingest`"
        )
    return manifest


def iter_shards(data_dir: str | Path, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Yield each shard of a data set folder as a table, in manifest order."""
    data_dir = Path(data_dir)
    for shard in read_manifest(data_dir)["shards"]:
        yield pq.read_table(data_dir / shard["file"], columns=columns)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: str | Path, body: Any) -> None:
    Path(path).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
