"""Bad input: broken, odd and hostile rows, generated here, through ingest and validate.

Every case is either quarantined with its reason code and a precise detail, or accepted
with the right conversion to canonical RGB; no row is dropped and none is counted twice.
The corpus is drawn in a temporary folder, so no binary fixtures live in the repository.
"""

import dataclasses
import io
import json
import logging
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from parti_ops.components.ingest import IngestError, ingest
from parti_ops.components.shards import iter_shards
from parti_ops.components.validate import DataValidationError, validate
from parti_ops.model.config import DataConfig

GOOD_TRAIN = 200
GOOD_VALIDATION = 30
# A loose gate so the corpus passes; `max_image_pixels` low enough that a 2000x2000
# header trips ingest's own check, below Pillow's built-in bomb limit.
DATA = DataConfig(max_quarantine_fraction=0.5, max_image_pixels=1_000_000)

# case → (reason code, detail substring): rows validation must quarantine, for one reason.
QUARANTINED = {
    "zero_byte": ("not_decodable", "zero-byte file"),
    "truncated_jpeg": ("not_decodable", "cannot decode: image file is truncated ("),
    "truncated_png": ("not_decodable", "cannot decode: image file is truncated"),
    "text_named_png": ("not_decodable", "not an image Pillow can identify"),
    "bomb_100000x100000": (
        "not_decodable",
        "decompression bomb refused (Image size (10000000000 pixels) exceeds limit",
    ),
    "over_max_image_pixels": (
        "not_decodable",
        "declared size 2000x2000 is over data.max_image_pixels=1000000",
    ),
    "animated_gif": ("not_decodable", "animated image with 3 frames; supply a still image"),
    "invalid_utf8_jsonl": ("caption_not_utf8", "caption is not valid UTF-8"),
    "invalid_utf8_csv": ("caption_not_utf8", "caption is not valid UTF-8"),
    "empty_caption": ("caption_empty", "caption is empty or only whitespace"),
    "whitespace_caption": ("caption_empty", "caption is empty or only whitespace"),
    "caption_10000_chars": ("caption_too_long", "caption has 10000 characters (max 1000)"),
    "bidi_override_caption": (
        "caption_control_chars",
        "format characters: U+202E RIGHT-TO-LEFT OVERRIDE, U+202C POP DIRECTIONAL FORMATTING",
    ),
    "invisible_chars_caption": (
        "caption_control_chars",
        "format characters: U+FEFF ZERO WIDTH NO-BREAK SPACE, U+200B ZERO WIDTH SPACE,"
        " U+2067 RIGHT-TO-LEFT ISOLATE, U+2069 POP DIRECTIONAL ISOLATE, U+0007 (control)",
    ),
    "missing_caption_field": ("unreadable", "missing caption field 'text'"),
    "malformed_json": ("unreadable", "malformed JSON line (Expecting ',' delimiter)"),
    "parent_traversal": (
        "path_outside_root",
        "file_name '../../etc/passwd' resolves outside the data root",
    ),
    "absolute_path": ("path_outside_root", "is absolute; use a path relative to the metadata file"),
    "symlink_outside": (
        "path_outside_root",
        "file_name 'images/escape.png' resolves outside the data root",
    ),
    "missing_file": ("unreadable", "file not found: images/missing.png"),
    "duplicate_copy": ("duplicate_image", "same image bytes as row 0"),
}
CSV_CAPTION = 'a red, round ball on a "blue" table'
# Joiners that captions in Persian, Indic scripts and emoji sequences need: accepted.
JOINER_CAPTIONS = {
    "zwnj_persian_caption": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    "zwj_emoji_caption": "a woman technologist \U0001f469\u200d\U0001f4bb",
}


# --- drawing the corpus ---


def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _halves(mode: str, size: tuple[int, int], left, right) -> Image.Image:
    """An image whose left half is `left` and right half `right`: an asymmetric pattern."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def _unique_png(k: int) -> bytes:
    """A 64x64 RGB PNG whose bytes differ for every k < 65536 (so no accidental duplicates)."""
    im = Image.new("RGB", (64, 64), (k % 256, (k // 256 * 53) % 256, 128))
    ImageDraw.Draw(im).rectangle((8 + k % 40, 8, 20 + k % 40, 40), fill=(255, 255, 255))
    return _encode(im, "PNG")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares `width`x`height` RGB but holds no pixels: tiny on disk, huge in RAM."""
    # IHDR: width, height, bit depth 8, colour type 2 (truecolour); PNG spec section 11.2.2.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _exif_jpeg(orientation: int) -> bytes:
    """96x64 stored, red left / blue right, with an EXIF orientation tag (274 = 0x0112)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    im = _halves("RGB", (96, 64), (255, 0, 0), (0, 0, 255))
    return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def _odd_images() -> dict[str, bytes]:
    """Case → file bytes for the image cases, bad and merely unusual."""
    noisy_jpeg = _encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG", quality=90)
    noisy_png = _encode(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG")
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    palette = _halves("P", (64, 64), 0, 1)
    palette.putpalette([0, 0, 0, 10, 200, 10])
    # Built from an array: pasting an int into an "I;16" image stores it byte-swapped.
    grey16 = np.full((64, 64), 32768, np.uint16)
    grey16[:, 32:] = 1000
    return {
        "zero_byte": b"",
        "truncated_jpeg": noisy_jpeg[: len(noisy_jpeg) // 2],
        "truncated_png": noisy_png[: len(noisy_png) // 2],
        "text_named_png": b"this is a caption, not a picture\n",
        "bomb_100000x100000": _header_only_png(100_000, 100_000),
        "over_max_image_pixels": _header_only_png(2000, 2000),
        "animated_gif": _encode(
            frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100
        ),
        "cmyk_jpeg": _encode(
            _halves("CMYK", (64, 64), (0, 255, 255, 0), (255, 0, 0, 0)), "JPEG", quality=95
        ),
        "greyscale_l": _encode(Image.new("L", (64, 64), 77), "PNG"),
        "rgba_png": _encode(_halves("RGBA", (64, 64), (255, 0, 0, 0), (0, 0, 255, 128)), "PNG"),
        "grey16_png": _encode(Image.fromarray(grey16), "PNG"),
        "palette_png": _encode(palette, "PNG"),
        "palette_transparent_png": _encode(palette, "PNG", transparency=0),
        "exif_orientation_6": _exif_jpeg(6),
        "exif_orientation_8": _exif_jpeg(8),
    }


def build_imagefolder(root: Path) -> dict[str, str]:
    """Write the corpus under `root`; returns case → the `source` reference ingest gives it.

    `root/metadata.jsonl` holds the train rows and most cases (its own `split` field);
    `root/validation/metadata.csv` the validation rows and the CSV cases (split from the folder).
    Good rows are named `good-train-NNN` / `good-validation-NNN`.
    """
    images, outside = root / "images", root.parent / "outside"
    (root / "validation").mkdir(parents=True)
    images.mkdir()
    outside.mkdir()
    sources: dict[str, str] = {}
    lines: list[bytes] = []

    def jsonl_row(case: str, record: dict | bytes) -> None:
        raw = record if isinstance(record, bytes) else json.dumps(record).encode()
        lines.append(raw)
        sources[case] = f"metadata.jsonl:line {len(lines)}"

    def image_row(case: str, name: str, raw: bytes, caption: str = "an odd picture") -> None:
        (images / name).write_bytes(raw)
        jsonl_row(case, {"file_name": f"images/{name}", "text": caption, "split": "train"})

    for i in range(GOOD_TRAIN):
        image_row(f"good-train-{i:03d}", f"good-{i:03d}.png", _unique_png(i), f"a square {i}")
    lines.append(b"   ")  # a blank line is not a row
    k = GOOD_TRAIN + GOOD_VALIDATION  # next unused _unique_png index
    for case, raw in _odd_images().items():
        ext = "jpg" if raw.startswith(b"\xff\xd8") else "gif" if raw.startswith(b"GIF") else "png"
        image_row(case, f"{case}.{ext}", raw)
    image_row("duplicate_copy", "copy-of-good-000.png", _unique_png(0))
    for case, caption in [
        ("empty_caption", ""),
        ("whitespace_caption", " \t\n  \r\n "),
        ("caption_10000_chars", "x" * 10_000),
        ("bidi_override_caption", "a cat \u202eeldoop a\u202c on a mat"),
        ("invisible_chars_caption", "\ufeffa zero\u200bwidth \u2067isolate\u2069 bell \x07"),
        *JOINER_CAPTIONS.items(),
    ]:
        image_row(case, f"{case}.png", _unique_png(k), caption)
        k += 1
    (images / "utf8.png").write_bytes(_unique_png(k))
    k += 1
    jsonl_row(
        "invalid_utf8_jsonl",
        b'{"file_name": "images/utf8.png", "text": "caf\xe9 on a \xff table", "split": "train"}',
    )
    jsonl_row("missing_caption_field", {"file_name": "images/good-000.png", "split": "train"})
    jsonl_row("malformed_json", b'{"file_name": "images/good-001.png", "text": "no end"')
    jsonl_row("parent_traversal", {"file_name": "../../etc/passwd", "text": "a password file"})
    absolute = outside / "absolute.png"
    absolute.write_bytes(_unique_png(k))
    k += 1
    jsonl_row("absolute_path", {"file_name": str(absolute), "text": "an absolute path"})
    (outside / "target.png").write_bytes(_unique_png(k))
    k += 1
    (images / "escape.png").symlink_to(outside / "target.png")
    jsonl_row("symlink_outside", {"file_name": "images/escape.png", "text": "a symlink"})
    jsonl_row("missing_file", {"file_name": "images/missing.png", "text": "nothing there"})
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    # The CSV is written as bytes: it holds a row that is not UTF-8 on purpose.
    folder = root / "validation"
    rows = [b"file_name,text"]
    for i in range(GOOD_VALIDATION):
        (folder / f"good-{i:03d}.png").write_bytes(_unique_png(GOOD_TRAIN + i))
        rows.append(f"good-{i:03d}.png,a validation square {i}".encode())
        sources[f"good-validation-{i:03d}"] = f"validation/metadata.csv:row {i + 1}"
    (folder / "quoted.png").write_bytes(_unique_png(k))
    (folder / "latin1.png").write_bytes(_unique_png(k + 1))
    # RFC 4180: quoted commas, doubled quotes and a newline inside one field.
    rows.append(b'quoted.png,"a red, round ball\non a ""blue""   table"')
    sources["csv_quoted"] = f"validation/metadata.csv:row {GOOD_VALIDATION + 1}"
    rows.append(b"latin1.png,caf\xe9 in latin-1")
    sources["invalid_utf8_csv"] = f"validation/metadata.csv:row {GOOD_VALIDATION + 2}"
    (folder / "metadata.csv").write_bytes(b"\r\n".join(rows) + b"\r\n")
    return sources


# --- fixtures: one corpus, ingested once, validated once with a loose gate ---


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus") / "data"
    return root, build_imagefolder(root)


@pytest.fixture(scope="module")
def canonical(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("canonical")
    return out, ingest(corpus[0], out, DATA)


@pytest.fixture(scope="module")
def validated(canonical, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated")
    report = validate(canonical[0], out, DATA)
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    accepted = [row for table in iter_shards(out / "accepted") for row in table.to_pylist()]
    return report, {r["source"]: r for r in quarantine}, {r["source"]: r for r in accepted}


def _pixels(row: dict) -> np.ndarray:
    im = Image.open(io.BytesIO(row["image"]))
    assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
    return np.asarray(im).astype(int)  # (H, W, 3)


# --- the image folder corpus ---


def test_counts_reconcile(corpus, canonical, validated):
    _, sources = corpus
    report, quarantined, accepted = validated
    n_rows = len(sources)  # one case per source row
    assert canonical[1]["rows"] == report["rows_in"] == n_rows
    assert report["accepted"] + report["quarantined"] == n_rows
    assert (len(accepted), len(quarantined)) == (report["accepted"], report["quarantined"])
    assert report["quarantined"] == len(QUARANTINED)
    assert report["passed"] and report["split_balance_ok"]
    # Every source row appears exactly once across the accepted shards and the quarantine
    # (read again as lists: the fixture's dicts by source would hide a repeat).
    paths = report["paths"]
    lines = Path(paths["quarantine"]).read_text().splitlines()
    seen = Counter(json.loads(line)["source"] for line in lines)
    for table in iter_shards(paths["accepted"], columns=["source"]):
        seen.update(table["source"].to_pylist())
    assert set(seen) == set(sources.values())
    assert set(seen.values()) == {1}
    assert sum(report["reasons"].values()) == len(QUARANTINED)
    for path in ("report.json", "report.html", "data_docs/index.html", "quarantine.jsonl"):
        assert (Path(report["paths"]["quarantine"]).parent / path).is_file()


@pytest.mark.parametrize("case", list(QUARANTINED))
def test_bad_row_is_quarantined_with_its_reason(case, corpus, validated):
    reason, detail = QUARANTINED[case]
    _, quarantined, accepted = validated
    source = corpus[1][case]
    assert source not in accepted
    row = quarantined[source]
    # One problem, one reason: a check that repeats an earlier detail is not listed again.
    assert len(row["reasons"]) == 1, row["reasons"]
    assert row["reasons"][0].startswith(f"{reason}: "), row["reasons"]
    assert detail in row["reasons"][0]
    assert {"row_id", "source", "split", "read_error", "decode_error"} <= set(row)


def test_good_rows_are_accepted_with_their_split(corpus, validated):
    report, _, accepted = validated
    for case, source in corpus[1].items():
        if case.startswith("good-"):
            assert accepted[source]["split"] == case.split("-")[1]
            assert accepted[source]["caption"].startswith(("a square", "a validation square"))
    assert report["splits"]["validation"] == GOOD_VALIDATION + 1  # + the quoted CSV row


def test_joiners_in_captions_are_accepted(corpus, validated):
    _, _, accepted = validated
    for case, caption in JOINER_CAPTIONS.items():
        assert accepted[corpus[1][case]]["caption"] == caption


def test_duplicate_keeps_the_first_copy(corpus, validated):
    _, _, accepted = validated
    first = accepted[corpus[1]["good-train-000"]]
    assert first["row_id"] == 0 and first["duplicate_of"] is None


def test_csv_quoted_commas_and_newlines_survive(corpus, validated):
    row = validated[2][corpus[1]["csv_quoted"]]
    assert row["caption"] == CSV_CAPTION  # newline and the run of spaces collapsed
    assert row["split"] == "validation"


def test_cmyk_jpeg_becomes_rgb(corpus, validated):
    row = validated[2][corpus[1]["cmyk_jpeg"]]
    px = _pixels(row)
    assert row["mode"] == "CMYK"
    np.testing.assert_allclose(px[32, 8], [255, 0, 0], atol=12)  # C=0 M=Y=255: red
    np.testing.assert_allclose(px[32, 56], [0, 255, 255], atol=12)  # C=255: cyan


def test_greyscale_l_becomes_grey_rgb(corpus, validated):
    row = validated[2][corpus[1]["greyscale_l"]]
    assert row["mode"] == "L"
    assert (_pixels(row) == 77).all()


def test_rgba_is_composited_over_white(corpus, validated):
    row = validated[2][corpus[1]["rgba_png"]]
    px = _pixels(row)
    assert row["mode"] == "RGBA"
    assert px[32, 8].tolist() == [255, 255, 255]  # fully transparent red: white, not red
    np.testing.assert_allclose(px[32, 56], [127, 127, 255], atol=2)  # half-transparent blue


def test_grey16_is_scaled_not_clipped(corpus, validated):
    row = validated[2][corpus[1]["grey16_png"]]
    px = _pixels(row)
    assert row["mode"] == "I;16"
    # 32768/65535 → 128 and 1000/65535 → 4; clipping at 255 would give 255 for both.
    assert px[32, 8].tolist() == [128, 128, 128]
    assert px[32, 56].tolist() == [4, 4, 4]


@pytest.mark.parametrize(
    ("case", "left"), [("palette_png", [0, 0, 0]), ("palette_transparent_png", [255, 255, 255])]
)
def test_palette_png_becomes_rgb(case, left, corpus, validated):
    row = validated[2][corpus[1][case]]
    px = _pixels(row)
    assert row["mode"] == "P"
    assert px[32, 8].tolist() == left  # index 0: black, or white where it is transparent
    assert px[32, 56].tolist() == [10, 200, 10]


@pytest.mark.parametrize(("orientation", "top"), [(6, "red"), (8, "blue")])
def test_exif_orientation_is_applied(orientation, top, corpus, validated):
    row = validated[2][corpus[1][f"exif_orientation_{orientation}"]]
    px = _pixels(row)
    # Stored 96x64 red | blue; upright it is 64x96 with red on top (6: turn clockwise) or
    # at the bottom (8: turn anticlockwise), then centre-cropped to 64x64.
    assert (row["width"], row["height"]) == (64, 96)
    red, blue = [250, 0, 0], [0, 0, 250]
    upper, lower = (red, blue) if top == "red" else (blue, red)
    np.testing.assert_allclose(px[4, 32], upper, atol=12)
    np.testing.assert_allclose(px[59, 32], lower, atol=12)


def test_failing_gate_raises_after_writing_the_report(canonical, tmp_path):
    strict = dataclasses.replace(DATA, max_quarantine_fraction=0.05)
    with pytest.raises(DataValidationError) as caught:
        validate(canonical[0], tmp_path, strict)
    report = json.loads((tmp_path / "report.json").read_text())
    message = str(caught.value)
    assert not report["passed"]
    assert report["quarantined"] == len(QUARANTINED)
    assert len((tmp_path / "quarantine.jsonl").read_text().splitlines()) == len(QUARANTINED)
    assert f"{len(QUARANTINED)} of {report['rows_in']} rows quarantined" in message
    # 7 undecodable, then 3 each outside the root and unreadable; the rest fewer.
    for top in ("not_decodable (7)", "path_outside_root (3)", "unreadable (3)"):
        assert top in message
    assert message.endswith(f"Report: {tmp_path.resolve() / 'report.html'}")


def test_csv_without_caption_column_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(_unique_png(0))
    (tmp_path / "metadata.csv").write_text("file_name,label\na.png,cat\n")
    with pytest.raises(
        IngestError, match=r"metadata\.csv: no caption column \('text' or 'caption'\)"
    ):
        ingest(tmp_path, tmp_path / "out", DATA)


# --- Parquet and WebDataset readers ---


def _canonical_rows(source: Path, out: Path) -> dict[str, dict]:
    ingest(source, out, DATA)
    rows = [row for table in iter_shards(out) for row in table.to_pylist()]
    # Shards hold one split each: source order is row_id order, not file order.
    return {row["source"]: row for row in sorted(rows, key=lambda row: row["row_id"])}


def test_parquet_image_bytes_column(tmp_path):
    table = pa.table(
        {
            "image": [_unique_png(1), _unique_png(2), b"not an image"],
            "text": ["one", "two", "three"],
            "split": ["train", "validation", "train"],
            "license": ["cc0", "cc-by", "cc0"],
        }
    )
    pq.write_table(table, tmp_path / "bytes.parquet")
    rows = _canonical_rows(tmp_path / "bytes.parquet", tmp_path / "out")
    one, two, bad = (rows[f"bytes.parquet:row {i}"] for i in range(3))
    assert one["image"] == _unique_png(1)  # a canonical 64x64 RGB PNG is kept byte for byte
    assert (one["caption"], one["split"], json.loads(one["metadata"])) == (
        "one",
        "train",
        {"license": "cc0"},
    )
    assert two["split"] == "validation" and two["decodable"]
    assert bad["decodable"] is False and "not an image Pillow can identify" in bad["decode_error"]


def test_parquet_hf_image_struct(tmp_path):
    (tmp_path / "beside.png").write_bytes(_unique_png(3))
    (tmp_path / "escape.png").write_bytes(_unique_png(4))
    data = tmp_path / "data"
    data.mkdir()
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [
        {"bytes": _unique_png(5), "path": "in-memory.png"},
        {"bytes": None, "path": "beside.png"},
        {"bytes": None, "path": "../escape.png"},
    ]
    (data / "beside.png").write_bytes(_unique_png(3))
    table = pa.table(
        {"image": pa.array(images, type=struct_type), "caption": ["five", "three", "four"]}
    )
    pq.write_table(table, data / "hf.parquet")
    rows = _canonical_rows(data, tmp_path / "out")
    inline, beside, escape = (rows[f"hf.parquet:row {i}"] for i in range(3))
    assert inline["image"] == _unique_png(5) and inline["caption"] == "five"
    assert beside["image"] == _unique_png(3) and beside["read_error"] is None
    assert escape["image"] is None and escape["path_inside_root"] is False
    assert escape["read_error"] == "file_name '../escape.png' resolves outside the data root"


def test_parquet_file_name_column(tmp_path):
    (tmp_path / "a.png").write_bytes(_unique_png(6))
    table = pa.table({"file_name": ["a.png", "gone.png"], "text": ["a", "gone"]})
    pq.write_table(table, tmp_path / "paths.parquet")
    rows = _canonical_rows(tmp_path / "paths.parquet", tmp_path / "out")
    assert rows["paths.parquet:row 0"]["image"] == _unique_png(6)
    assert rows["paths.parquet:row 1"]["read_error"] == "file not found: gone.png"


def test_parquet_without_caption_column_is_refused(tmp_path):
    pq.write_table(pa.table({"image": [_unique_png(7)], "label": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(IngestError, match="no caption column"):
        ingest(tmp_path / "x.parquet", tmp_path / "out", DATA)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(
        shards / "00000.tar",
        [
            ("000.png", _unique_png(8)),
            ("000.txt", b"a good sample"),
            ("000.json", b'{"split": "validation", "url": "https://example.com/0"}'),
            ("001.jpg", _encode(Image.new("RGB", (80, 64), (0, 90, 0)), "JPEG")),
            ("001.txt", "caf\u00e9 sample".encode()),
            ("002.png", _unique_png(9)),  # no caption
            ("003.txt", b"a caption without an image"),
        ],
    )
    _tar(shards / "00001.tar", [("sub/004.webp", _encode(Image.new("RGB", (64, 64)), "WEBP"))])
    rows = _canonical_rows(shards, tmp_path / "out")
    assert list(rows) == [
        "00000.tar:000",
        "00000.tar:001",
        "00000.tar:002",
        "00000.tar:003",
        "00001.tar:sub/004",
    ]
    good = rows["00000.tar:000"]
    assert (good["caption"], good["split"], good["read_error"]) == (
        "a good sample",
        "validation",
        None,
    )
    assert json.loads(good["metadata"]) == {"url": "https://example.com/0"}
    jpeg = rows["00000.tar:001"]
    assert jpeg["decodable"] and (jpeg["width"], jpeg["height"]) == (80, 64)
    assert jpeg["caption"] == "café sample" and jpeg["caption_utf8"]
    assert rows["00000.tar:002"]["read_error"] == "sample has no .txt caption"
    assert rows["00000.tar:003"]["read_error"] == (
        "sample has no image member (.jpg, .jpeg, .png, .webp)"
    )
    assert rows["00001.tar:sub/004"]["read_error"] == "sample has no .txt caption"


# --- the CLI: expected failures are one line and exit code 1, never a traceback ---


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Invoke `parti` in `tmp_path` (MLflow store there too), restoring logging afterwards."""
    from typer.testing import CliRunner

    from parti_ops.pipelines.cli import app

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def invoke(*args: str):
        return CliRunner().invoke(app, [*args, "--set", f"work_dir={tmp_path / 'work'}"])

    yield invoke
    root.handlers[:], root.level = handlers, level


def _one_error_line(result) -> str:
    output = result.output
    assert result.exit_code == 1, output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_cli_missing_caption_column_is_one_line(cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "metadata.csv").write_text("file_name,label\na.png,cat\n")
    line = _one_error_line(cli("data", "ingest", str(src), "--out", str(tmp_path / "canonical")))
    assert "no caption column ('text' or 'caption')" in line


def test_cli_failing_gate_is_one_line(cli, canonical, tmp_path):
    out = tmp_path / "validated"
    line = _one_error_line(cli("data", "validate", str(canonical[0]), "--out", str(out)))
    assert "validation stopped the run" in line and "top reasons: not_decodable" in line
    assert line.endswith(f"Report: {out.resolve() / 'report.html'}")
    assert (out / "report.json").is_file()
    passed = cli(
        "data", "validate", str(canonical[0]), "--out", str(tmp_path / "loose"),
        "--set", "data.max_quarantine_fraction=0.5",
    )  # fmt: skip
    assert passed.exit_code == 0, passed.output


def test_jsonl_row_without_caption_is_quarantined_even_first(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    lines = [{"file_name": "0.png", "label": "no caption here"}]
    lines += [{"file_name": f"{k}.png", "caption": f"image {k}"} for k in range(1, 4)]
    for k in range(4):
        (source / f"{k}.png").write_bytes(_unique_png(k))
    (source / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = _canonical_rows(source, tmp_path / "out")
    first = rows["metadata.jsonl:line 1"]
    assert first["read_error"].startswith("missing caption field 'text'")
    assert [rows[f"metadata.jsonl:line {k}"]["caption"] for k in (2, 3, 4)] == [
        "image 1",
        "image 2",
        "image 3",
    ]


def test_a_broken_first_copy_does_not_quarantine_a_good_second_copy(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(_unique_png(7))
    (source / "b.png").write_bytes(_unique_png(7))  # the same bytes
    lines = [{"file_name": "a.png", "text": "   "}, {"file_name": "b.png", "text": "a copy"}]
    lines += [{"file_name": "a.png", "text": "a third copy"}]
    (source / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = _canonical_rows(source, tmp_path / "out")
    assert rows["metadata.jsonl:line 1"]["duplicate_of"] is None  # quarantined as empty
    assert rows["metadata.jsonl:line 2"]["duplicate_of"] is None  # kept: the original
    assert rows["metadata.jsonl:line 3"]["duplicate_of"] == 1
