"""Ingest: read image–caption pairs from the formats teams have, write canonical shards.

Sources:
- an image folder with `metadata.jsonl` or `metadata.csv` (Hugging Face imagefolder:
  `file_name` plus a caption column), at the root or in split folders (`train/`, ...);
- Parquet files with an image column (bytes, or the `{bytes, path}` struct of
  Hugging Face `datasets`) or a `file_name` path column, plus a caption column;
- WebDataset tar shards as img2dataset writes them (`key.jpg|png|webp`, `key.txt`,
  optional `key.json`).

Every source row becomes exactly one output row. A row that cannot be read or
decoded is still written, with the facts that say why, so that validation can
quarantine it: nothing is dropped here. Rows stream through one shard at a time.

Rows that carry no split get one from the hash of their image bytes
(`data.validation_fraction` validation, `data.test_fraction` test, the rest train):
the same files give the same splits in any order, and copies of an image share one.
"""

import csv
import hashlib
import io
import json
import logging
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from parti_ops.components.progress import track
from parti_ops.components.shards import SPLIT_NAME, ShardWriter, control_chars
from parti_ops.components.versioning import dvc_md5
from parti_ops.model.config import Config, DataConfig
from parti_ops.model.errors import PartiError

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ("text", "caption")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class IngestError(PartiError, ValueError):
    """The source as a whole cannot be read; the message names the file and what to do."""


@dataclass
class SourceRow:
    """One row as read from the source, before any decoding."""

    source: str  # where it came from: "train/metadata.jsonl:12", "00000.tar:000042"
    image: bytes | None = None
    caption: str | None = None
    split: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    read_error: str | None = None
    path_inside_root: bool = True


def ingest(source: str | Path, out_dir: str | Path, data: DataConfig) -> dict[str, Any]:
    """Read `source` in any supported format and write canonical shards to `out_dir`.

    Returns:
        The manifest written to `out_dir/manifest.json`.
    """
    source = Path(source)
    if not source.exists():
        raise IngestError(f"{source}: no such file or folder; pass the data set's path")
    kind = detect_format(source)
    log.info("ingesting %s (%s) into %s", source, kind, out_dir)
    rows = {"imagefolder": read_imagefolder, "parquet": read_parquet, "webdataset": read_webdataset}
    writer = ShardWriter(out_dir, shard_size=data.shard_size)
    first_of: dict[str, int] = {}  # sha256 → first row_id, to flag duplicates
    splits: Counter[str] = Counter()
    hashed: Counter[str] = Counter()
    for row_id, row in enumerate(track(rows[kind](source, data.caption_column), "ingest")):
        record = canonical_row(row_id, row, data, first_of)
        splits[record["split"]] += 1
        if not row.split:
            hashed[record["split"]] += 1
        writer.write(record)
    manifest = writer.close(
        source=str(source.resolve()),
        source_format=kind,
        data_digest=dvc_md5(source),
        image_size=data.image_size,
        splits=dict(sorted(splits.items())),
        # What validation needs to judge a hash split by the fractions it was drawn with.
        hash_split={"fractions": hash_fractions(data), "rows": dict(sorted(hashed.items()))},
    )
    log.info("wrote %d rows in %d shards to %s", manifest["rows"], len(manifest["shards"]), out_dir)
    return manifest


def detect_format(source: Path) -> str:
    if source.is_file():
        by_suffix = {".parquet": "parquet", ".tar": "webdataset"}
        if source.suffix in by_suffix:
            return by_suffix[source.suffix]
        raise IngestError(f"{source}: not a .parquet or .tar file; pass a data folder or shard")
    if _metadata_files(source):
        return "imagefolder"
    if any(source.glob("*.parquet")):
        return "parquet"
    if any(source.glob("*.tar")):
        return "webdataset"
    raise IngestError(
        f"{source}: found no metadata.jsonl, metadata.csv, *.parquet or *.tar;"
        " see `parti data ingest --help` for the supported layouts"
    )


# --- readers: each yields SourceRow, one per source row, in a stable order ---


def read_imagefolder(root: Path, caption_column: str | None) -> Iterator[SourceRow]:
    real_root = root.resolve()
    for meta in _metadata_files(root):
        folder = meta.parent
        split = folder.name if folder != root else None
        rel = meta.relative_to(root).as_posix()
        records = _jsonl_records(meta, caption_column) if meta.suffix == ".jsonl" else None
        if records is None:
            records = _csv_records(meta, caption_column)
        for ref, record, error in records:
            row = SourceRow(source=f"{rel}:{ref}", split=split)
            if error:
                row.read_error = error
                yield row
                continue
            caption_key = record.pop("__caption_key__")
            row.caption, row.read_error = _caption_value(record, caption_key)
            row.split = record.pop("split", None) or split
            name = record.pop("file_name", None)
            row.metadata = record
            if row.read_error is None:
                _load_file(row, real_root, folder, name)
            yield row


def read_parquet(source: Path, caption_column: str | None) -> Iterator[SourceRow]:
    files = [source] if source.is_file() else sorted(source.glob("*.parquet"))
    for path in files:
        try:
            yield from _parquet_rows(path, caption_column)
        except pa.ArrowException as err:
            raise IngestError(f"{path}: not a readable Parquet file ({err}); re-export it") from err


def _parquet_rows(path: Path, caption_column: str | None) -> Iterator[SourceRow]:
    real_root = path.parent.resolve()
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    caption_key = _pick_caption_column(names, caption_column, path.name)
    image_key = next((n for n in ("image", "jpg", "png", "webp") if n in names), None)
    if image_key is None and "file_name" not in names:
        raise IngestError(
            f"{path}: no image column; expected 'image' (bytes or {{bytes, path}}) or"
            f" 'file_name' (a path), found {names}"
        )
    index = 0
    for batch in pf.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            row = SourceRow(source=f"{path.name}:row {index}")
            index += 1
            row.caption, row.read_error = _caption_value(record, caption_key)
            row.split = record.pop("split", None)
            image = record.pop(image_key, None) if image_key else None
            if isinstance(image, dict):  # datasets' Image feature: {bytes, path}
                image = image.get("bytes") or image.get("path")
            name = image if isinstance(image, str) else record.pop("file_name", None)
            row.metadata = {k: v for k, v in record.items() if _jsonable(v)}
            if row.read_error is None:
                if isinstance(image, bytes):
                    row.image = image
                else:
                    _load_file(row, real_root, path.parent, name)
            yield row


def read_webdataset(source: Path, caption_column: str | None) -> Iterator[SourceRow]:
    files = [source] if source.is_file() else sorted(source.glob("*.tar"))
    caption_ext = caption_column or "txt"
    for path in files:
        try:
            with tarfile.open(path, mode="r|*") as tar:
                yield from _webdataset_samples(tar, path.name, caption_ext)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise IngestError(f"{path}: not a readable tar shard ({err}); re-download it") from err


def _webdataset_samples(tar: tarfile.TarFile, shard: str, caption_ext: str) -> Iterator[SourceRow]:
    # WebDataset groups consecutive members by key: the name up to the first dot of the basename.
    key, parts = None, {}
    for member in tar:
        if member.isdir():
            continue  # `tar -cf x.tar folder/` stores the folder itself: not a sample
        folder, _, base = member.name.rpartition("/")
        stem, _, ext = base.partition(".")
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key:
            if key is not None:
                yield _webdataset_row(shard, key, parts, caption_ext)
            key, parts = member_key, {}
        f = tar.extractfile(member) if member.isfile() else None
        parts[ext.lower()] = f.read() if f else None
    if key is not None:
        yield _webdataset_row(shard, key, parts, caption_ext)


def _webdataset_row(
    shard: str, key: str, parts: dict[str, bytes | None], caption_ext: str
) -> SourceRow:
    row = SourceRow(source=f"{shard}:{key}")
    if parts.get("json"):
        try:
            meta = json.loads(parts["json"])
            row.metadata = meta if isinstance(meta, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            row.read_error = f"{key}.json is not valid JSON"
        row.split = row.metadata.pop("split", None)
    ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if ext is None:
        names = ", ".join(f".{e}" for e in IMAGE_EXTENSIONS)
        row.read_error = row.read_error or f"sample has no image member ({names})"
    elif parts[ext] is None:
        row.read_error = row.read_error or f"{key}.{ext} is not a regular file"
    else:
        row.image = parts[ext]
    raw = parts.get(caption_ext)
    if raw is None:
        row.read_error = row.read_error or f"sample has no .{caption_ext} caption"
    else:
        # Invalid bytes stay as lone surrogates: canonical_row judges and repairs them.
        row.caption = raw.decode("utf-8", errors="surrogateescape")
    return row


def _metadata_files(root: Path) -> list[Path]:
    found = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        for name in METADATA_FILES:
            if (folder / name).is_file():
                found.append(folder / name)
                break  # metadata.jsonl wins over metadata.csv, as in datasets' imagefolder
    return found


def _jsonl_records(meta: Path, caption_column: str | None):
    """Yield (ref, record, error) for each non-blank line."""
    with open(meta, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            # Invalid bytes become lone surrogates, so the caption alone is judged on them.
            text = raw.decode("utf-8", errors="surrogateescape")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                yield f"line {number}", None, f"malformed JSON line ({err.msg})"
                continue
            if not isinstance(record, dict):
                yield f"line {number}", None, "line is not a JSON object"
                continue
            # JSON lines have no header: the caption field is chosen per row, so a row
            # without one is quarantined wherever it stands in the file.
            found = [name for name in CAPTION_COLUMNS if name in record]
            record["__caption_key__"] = caption_column or (found[0] if found else "text")
            yield f"line {number}", record, None


def _csv_records(meta: Path, caption_column: str | None):
    # newline="" lets the csv module handle quoted commas and newlines (RFC 4180);
    # surrogateescape keeps invalid UTF-8 visible per row instead of failing the file.
    with open(meta, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, restkey="__extra__")
        header = reader.fieldnames or []
        if "file_name" not in header:
            raise IngestError(f"{meta}: no 'file_name' column in the header {header}")
        caption_key = _pick_caption_column(header, caption_column, str(meta))
        for number, record in enumerate(reader, start=1):
            ref = f"row {number}"
            if "__extra__" in record or None in record.values():
                error = f"row has a different number of fields than the header ({len(header)})"
                yield ref, None, error
                continue
            record["__caption_key__"] = caption_key
            yield ref, record, None  # invalid bytes stay as surrogates, judged per field


def _pick_caption_column(names: list[str], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise IngestError(
                f"{where}: no caption column {wanted!r}; found {names}; set --caption-column"
            )
        return wanted
    for name in CAPTION_COLUMNS:
        if name in names:
            return name
    raise IngestError(
        f"{where}: no caption column ('text' or 'caption') among {names}; set --caption-column"
    )


def _caption_value(record: dict[str, Any], key: str) -> tuple[str | None, str | None]:
    if key not in record:
        return None, f"missing caption field {key!r} (set --caption-column to use another)"
    value = record.pop(key)
    if not isinstance(value, str):
        return None, f"caption field {key!r} is {type(value).__name__}, not text"
    return value, None


def _load_file(row: SourceRow, real_root: Path, folder: Path, name: Any) -> None:
    """Read the image at `folder/name`, refusing paths that leave the data root."""
    if not isinstance(name, str) or not name:
        row.read_error = "missing or empty 'file_name'"
        return
    if os.path.isabs(name):
        row.path_inside_root = False
        row.read_error = f"file_name {name!r} is absolute; use a path relative to the metadata file"
        return
    real = Path(os.path.realpath(folder / name))  # follows symlinks and '..'
    if not real.is_relative_to(real_root):
        row.path_inside_root = False
        row.read_error = f"file_name {name!r} resolves outside the data root"
        return
    try:
        row.image = real.read_bytes()
    except FileNotFoundError:
        row.read_error = f"file not found: {name}"
    except OSError as err:
        row.read_error = f"cannot read {name}: {err.strerror or err}"


def _repair_surrogates(value: str) -> tuple[str, bool]:
    try:
        value.encode("utf-8")
        return value, True
    except UnicodeEncodeError:
        raw = value.encode("utf-8", errors="surrogateescape")
        return raw.decode("utf-8", errors="replace"), False


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | list | dict) or value is None


# --- canonicalisation: decode, orient, convert to RGB, resize, and gather the facts ---


def canonical_row(
    row_id: int, row: SourceRow, data: DataConfig, first_of: dict[str, int]
) -> dict[str, Any]:
    if row.split is not None and not isinstance(row.split, str):
        row.read_error = row.read_error or f"split {row.split!r} is not text"
        row.split = None
    elif row.split and not SPLIT_NAME.fullmatch(row.split):
        # A split names the files its rows are written to (components/shards.py).
        row.read_error = row.read_error or (
            f"split {row.split!r} is not a split name: letters, digits, _ and . only"
        )
        row.split = None
    # Names from non-UTF-8 file systems or tar headers carry lone surrogates.
    source = _repair_surrogates(row.source)[0]
    sha = hashlib.sha256(row.image).hexdigest() if row.image is not None else None
    image, facts = (None, {}) if row.image is None else decode_image(row.image, data)
    has_caption = row.caption is not None
    caption, utf8 = _repair_surrogates(row.caption or "")
    caption = " ".join(caption.split())  # collapse newlines/tabs/runs of spaces
    # Only a row that could be kept counts as the original of later copies, so that a
    # broken first copy does not take a good second copy into quarantine with it.
    duplicate_of = None
    if sha is not None and row.read_error is None and facts.get("decodable") and caption:
        duplicate_of = first_of.setdefault(sha, row_id)
        duplicate_of = None if duplicate_of == row_id else duplicate_of
    return {
        "row_id": row_id,
        "source": source,
        "split": row.split or hash_split(sha or source, data),
        "caption": caption if has_caption else None,
        "sha256": sha,
        "image": image,
        "metadata": json.dumps(row.metadata, sort_keys=True, default=str),
        "read_error": row.read_error,
        "path_inside_root": row.path_inside_root,
        # Facts stay null where there was nothing to look at (no image, no caption), so
        # one problem gives one quarantine reason, not a cascade of them.
        "decodable": facts.get("decodable"),
        "decode_error": facts.get("decode_error"),
        "width": facts.get("width"),
        "height": facts.get("height"),
        "aspect_ratio": facts.get("aspect_ratio"),
        "mode": facts.get("mode"),
        "caption_chars": len(caption) if has_caption else None,
        "caption_words": len(caption.split()) if has_caption else None,
        "caption_utf8": utf8 if has_caption else None,
        "caption_control_chars": bool(control_chars(caption)) if has_caption else None,
        "duplicate_of": duplicate_of,
    }


def decode_image(raw: bytes, data: DataConfig) -> tuple[bytes | None, dict[str, Any]]:
    """Decode source bytes into a canonical PNG (RGB, image_size²) and the image's facts."""
    facts: dict[str, Any] = {"decodable": False}
    if not raw:
        facts["decode_error"] = "zero-byte file"
        return None, facts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            facts["mode"] = im.mode
            width, height = im.size
            if width * height > data.max_image_pixels:
                facts["decode_error"] = (
                    f"declared size {width}x{height} is over data.max_image_pixels="
                    f"{data.max_image_pixels} (a decompression bomb?)"
                )
                return None, facts
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                facts["decode_error"] = f"animated image with {frames} frames; supply a still image"
                return None, facts
            # An 8-bit RGB PNG without EXIF can be kept byte for byte (16-bit PNGs also open
            # as "RGB", so look at the raw mode of the first tile, which load() clears).
            fast = (
                im.format == "PNG"
                and im.mode == "RGB"
                and bool(im.tile)
                and im.tile[0].args in ("RGB", ("RGB",))  # PNG's tile args: the rawmode itself
                and "exif" not in im.info
            )
            im.load()
            im = ImageOps.exif_transpose(im)  # EXIF-rotated photos keep their upright view
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        facts["decode_error"] = f"decompression bomb refused ({err})"
        return None, facts
    except UnidentifiedImageError:
        facts["decode_error"] = "not an image Pillow can identify (wrong extension, bad header)"
        return None, facts
    except (OSError, SyntaxError, ValueError) as err:
        facts["decode_error"] = f"cannot decode: {err}"
        return None, facts
    except Exception as err:  # a corrupt file can trip any decoder (TIFF: TypeError)
        facts["decode_error"] = f"cannot decode: {type(err).__name__}: {err}"
        return None, facts
    width, height = im.size
    aspect = max(width, height) / min(width, height)
    facts.update(decodable=True, width=width, height=height, aspect_ratio=aspect)
    size = data.image_size
    if fast and im.size == (size, size):
        return raw, facts  # already canonical: keep the source bytes, skip re-encoding
    buf = io.BytesIO()
    try:
        _resize_crop(_to_rgb(im), size).save(buf, format="PNG", compress_level=1)
    except Exception as err:  # a mode Pillow decodes but cannot convert
        facts.update(decodable=False, decode_error=f"cannot convert {im.mode} to RGB: {err}")
        return None, facts
    return buf.getvalue(), facts


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:  # palette or tRNS key
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparency over white, the way a viewer shows it.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then centre-crop to a square."""
    width, height = im.size
    if (width, height) == (size, size):
        return im
    scale = size / min(width, height)
    resized = im.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))),
        Image.Resampling.BICUBIC,
        reducing_gap=3.0,
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def hash_fractions(data: DataConfig) -> dict[str, float]:
    """The share of hash-split rows each split is drawn with."""
    held_out = {"validation": data.validation_fraction, "test": data.test_fraction}
    return {"train": round(1.0 - sum(held_out.values()), 12), **held_out}


def hash_split(key: str, data: DataConfig) -> str:
    """A split from the content hash: stable across re-ingests and row order."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
    # Validation keeps the lowest bucket: data split while it was the only held-out
    # split keeps its validation rows when ingested again.
    if bucket < data.validation_fraction:
        return "validation"
    return "test" if bucket < data.validation_fraction + data.test_fraction else "train"


def ingest_step(config: Config, parent_run_id: str, source: str, out_dir: str) -> dict[str, Any]:
    """`ingest` inside a nested MLflow run that records the source's DVC digest."""
    from parti_ops.components.tracking import step_run

    with step_run(config, "ingest", parent_run_id) as run:
        manifest = ingest(source, out_dir, config.data)
        splits, digest = manifest["splits"], manifest["data_digest"]
        run.log(
            metrics={"rows": manifest["rows"], **{f"rows.{k}": v for k, v in splits.items()}},
            params={"source": manifest["source"], "source_format": manifest["source_format"]},
        )
        for target in filter(None, (run, run.parent)):  # the data version of the whole run too
            target.log(tags={"data.digest": digest})
            target.log_dataset(
                name="source", source=manifest["source"], digest=digest, context="source"
            )
        run.log_artifact(Path(out_dir) / "manifest.json")
    return manifest
