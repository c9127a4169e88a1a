"""The canonical shard format that ingest writes and every later step reads.

A data set folder is a Parquet data set laid out as Hugging Face `datasets` lays one out
on the Hub, plus a manifest:

    FOLDER/data/train-00000-of-00002.parquet, train-00001-of-00002.parquet,
                validation-00000-of-00001.parquet, test-00000-of-00001.parquet
    FOLDER/manifest.json

Each row is one source row: the canonical image (PNG at the preset resolution, RGB; null
when the source could not be read), its caption, provenance (source reference, sha256
of the source bytes, split) and the per-row facts that validation checks. Each file
holds one split's rows, and each row still says its split. Parquet keeps the facts
readable on their own (column projection), so validation never decodes an image twice.

The image is stored as `datasets` stores one (`{bytes, path}`, with the `Image` feature
in the schema metadata), so the folder opens as it is:

    datasets.load_dataset("parquet", data_dir=FOLDER)  # DatasetDict, one per split; PIL
    pandas.read_parquet(FOLDER / "data")               # every split; image as {bytes, path}

The pipeline reads it through `iter_shards`, which hands the image back as PNG bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from parti_ops.model.errors import PartiError

MANIFEST = "manifest.json"
DATA_DIR = "data"
HELDOUT_SPLITS = ("validation", "test")  # the splits never trained on
TUNING_SPLIT = "validation"  # where settings and promotions are chosen; `test` is only reported
SEEN_SPLIT = "train"
# `datasets` reads `data/{split}-NNNNN-of-NNNNN.*` as the split named in the file name,
# whatever it is, if it matches this (datasets.data_files.SPLIT_PATTERN_SHARDED and
# datasets.naming._split_re); the same rule keeps a split name a safe file name.
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")


# Caption characters (ingest flags them, validation quarantines the rows that hold them).
# Unicode category Cc, the C0 and C1 controls. Whitespace is collapsed to spaces first.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")
# Category Cf (format: bidi overrides and isolates, zero-width space, BOM, soft hyphen,
# tag characters) is invisible and can reorder or hide text (Trojan Source,
# CVE-2021-42574), so it is flagged too, except the zero-width non-joiner and joiner:
# Persian and Indic orthography need them inside words, as emoji sequences need ZWJ.
ALLOWED_FORMAT_CHARS = frozenset("\u200c\u200d")


def control_chars(text: str) -> list[str]:
    """The distinct control and format characters in `text` that a caption may not hold."""
    if text.isascii():
        found = CONTROL_CHARS.findall(text)
    else:
        found = [
            c
            for c in text
            if unicodedata.category(c) in ("Cc", "Cf") and c not in ALLOWED_FORMAT_CHARS
        ]
    return list(dict.fromkeys(found))


def describe_chars(chars: list[str], limit: int = 5) -> str:
    """'U+202E RIGHT-TO-LEFT OVERRIDE, U+0007 (control)', at most `limit` of them."""
    named = [f"U+{ord(c):04X} {unicodedata.name(c, '(control)')}" for c in chars[:limit]]
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return ", ".join(named) + more


class ShardFormatError(PartiError, ValueError):
    """A data set folder that is not (or no longer) in the canonical shard format."""


FORMAT_VERSION = 2

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
# A row as ShardWriter takes it and iter_shards gives it back.
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

# How `datasets` stores an `Image()` value, and where it looks for the feature type
# (datasets.Features.arrow_schema / from_arrow_schema); columns it does not list are
# inferred from their Arrow types.
IMAGE_STORAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}}}}
FILE_SCHEMA = pa.schema(
    [pa.field("image", IMAGE_STORAGE) if f.name == "image" else f for f in SCHEMA],
    metadata={"huggingface": json.dumps(HF_FEATURES)},
)


class ShardWriter:
    """Writes rows into Parquet shards of up to `shard_size` rows per split, then a manifest.

    Memory holds at most one shard's rows per split, whatever the data set's size.
    Shards of an earlier write to the folder are removed first: readers of the folder
    (`datasets`, pandas) take every file in `data/`, not the manifest's list.
    """

    def __init__(self, out_dir: str | Path, *, shard_size: int):
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self._rows: dict[str, list[dict[str, Any]]] = {}
        _remove_earlier_write(self.out_dir)
        (self.out_dir / DATA_DIR).mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        rows = self._rows.setdefault(row["split"], [])
        rows.append(row)
        if len(rows) >= self.shard_size:
            self._flush(row["split"])

    def write_table(self, table: pa.Table) -> None:
        """Write a table as `iter_shards` yields it, one shard per split in it, undecoded."""
        for split in sorted(pc.unique(table["split"]).to_pylist()):
            self._flush(split)
            self._write_shard(split, table.filter(pc.equal(table["split"], split)))

    def flush(self) -> None:
        for split in sorted(self._rows):
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._rows.pop(split, [])
        if rows:
            columns = {name: [row[name] for row in rows] for name in SCHEMA.names}
            self._write_shard(split, pa.Table.from_pydict(columns, schema=SCHEMA))

    def _write_shard(self, split: str, table: pa.Table) -> None:
        if not SPLIT_NAME.fullmatch(split):
            raise ValueError(f"split {split!r} is not a split name (letters, digits, _ and .)")
        index = sum(s["split"] == split for s in self.shards)
        # Named in full by `close`, once each split's shard count is known.
        name = f"{DATA_DIR}/{split}-{index:05d}.parquet"
        path = self.out_dir / name
        # PNG bytes are already compressed: zstd on them costs time and saves nothing.
        codecs = {n: "none" if n == "image" else "zstd" for n in table.column_names}
        pq.write_table(_to_file(table), path, compression=codecs)
        # Hand freed buffers back to the OS so peak memory stays one shard's worth.
        pa.default_memory_pool().release_unused()
        self.shards.append(
            {"file": name, "split": split, "rows": table.num_rows, "sha256": file_sha256(path)}
        )

    def close(self, **manifest: Any) -> dict[str, Any]:
        """Flush and write `manifest.json`: format, shards, row count, plus `manifest` fields."""
        self.flush()
        counts = Counter(s["split"] for s in self.shards)
        for shard in self.shards:
            name = shard["file"].removesuffix(".parquet") + f"-of-{counts[shard['split']]:05d}"
            (self.out_dir / shard["file"]).rename(self.out_dir / f"{name}.parquet")
            shard["file"] = f"{name}.parquet"
        self.shards.sort(key=lambda s: s["file"])
        body = {
            "format_version": FORMAT_VERSION,
            "rows": sum(s["rows"] for s in self.shards),
            "shards": self.shards,
            **manifest,
        }
        write_json(self.out_dir / MANIFEST, body)
        return body


# A shard `ShardWriter` wrote but never listed: a write that stopped before `close`.
_UNFINISHED = re.compile(rf"{DATA_DIR}/[A-Za-z0-9_.]+-\d{{5}}\.parquet")


def _remove_earlier_write(out: Path) -> None:
    """Remove the shards and manifest an earlier write left in `out`, and nothing else.

    Readers of the folder (`datasets`, pandas) take every file in `data/`, so stale shards
    must go; Parquet files no write of ours made there (a source inside the output
    folder, someone's data set) are refused rather than deleted.

    Raises:
        ShardFormatError: naming the first foreign file.
    """
    listed: set[str] = set()
    try:
        body = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        listed = {str(shard["file"]) for shard in body["shards"]}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardFormatError(f"{out / MANIFEST}: unreadable ({err}); pass a new folder") from None
    found = [*out.glob(f"{DATA_DIR}/*.parquet"), *out.glob("shard-[0-9]*.parquet")]
    for path in found:
        name = path.relative_to(out).as_posix()
        if name not in listed and not _UNFINISHED.fullmatch(name):
            raise ShardFormatError(
                f"{path}: a Parquet file that no earlier write to {out} listed; refusing to"
                " delete it (pass a new or empty folder, outside the source)"
            )
    (out / MANIFEST).unlink(missing_ok=True)
    for path in found:
        path.unlink()


def _to_file(table: pa.Table) -> pa.Table:
    """A `SCHEMA` table as its file stores it: the PNG bytes inside `datasets`' image struct."""
    chunks = [
        pa.StructArray.from_arrays(
            [png, pa.nulls(len(png), pa.string())], fields=list(IMAGE_STORAGE), mask=png.is_null()
        )
        for png in table["image"].chunks
    ]
    image = pa.chunked_array(chunks, IMAGE_STORAGE)
    columns = [image if name == "image" else table[name] for name in SCHEMA.names]
    return pa.Table.from_arrays(columns, schema=FILE_SCHEMA)


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


def read_shard(
    data_dir: str | Path, shard: dict[str, Any], columns: list[str] | None = None
) -> pa.Table:
    """One manifest entry's rows as `SCHEMA` has them (the image as PNG bytes)."""
    table = pq.read_table(Path(data_dir) / shard["file"], columns=columns)
    if "image" in table.column_names:
        png = pc.struct_field(table["image"], "bytes")
        table = table.set_column(table.column_names.index("image"), SCHEMA.field("image"), png)
    return table.replace_schema_metadata(None)


def iter_shards(
    data_dir: str | Path, columns: list[str] | None = None, *, split: str | None = None
) -> Iterator[pa.Table]:
    """Yield each shard of a data set folder (only `split`'s, if given), in manifest order."""
    for shard in read_manifest(data_dir)["shards"]:
        if split is None or shard["split"] == split:
            yield read_shard(data_dir, shard, columns)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: str | Path, body: Any) -> None:
    Path(path).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def empty_own_folder(
    out: Path, is_own: Callable[[Path], bool], refuse: Callable[[str], Exception], what: str
) -> None:
    """Make `out` an empty folder, deleting only entries that `is_own` says an earlier run
    of the same writer left there; anything else raises `refuse(message)`.

    Args:
        what: what the writer writes, for the messages ("the synthetic data set").
    """
    if out.exists() and not out.is_dir():
        raise refuse(f"{out}: a file, not a folder for {what}; pass a folder")
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = list(out.iterdir())
    if not all(is_own(entry) for entry in entries):
        raise refuse(
            f"{out}: not empty, and holds more than an earlier {what}; refusing to"
            " overwrite it (pass a new or empty folder)"
        )
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
