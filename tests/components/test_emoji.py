"""The emoji-datasource converter, on a small package drawn here (never the network)."""

import io
import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from parti_ops.components.emoji import from_emoji_datasource
from parti_ops.components.ingest import IngestError, ingest
from parti_ops.components.shards import iter_shards
from parti_ops.model.config import DataConfig


def _png(k: int) -> bytes:
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((4 + k, 4, 60, 60 - k), fill=(40 * k % 256, 200, 90, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _variant(unified: str, apple: bool = True) -> dict:
    return {
        "unified": unified,
        "image": f"{unified.lower()}.png",
        "has_img_apple": apple,
        "has_img_facebook": True,
    }


EMOJI = [
    {
        "name": "GRINNING FACE",
        "short_name": "grinning",
        "category": "Smileys & Emotion",
        "subcategory": "face-smiling",
        **_variant("1F600"),
    },
    {
        "name": "WAVING HAND SIGN",
        "short_name": "wave",
        "category": "People & Body",
        "subcategory": "hand-fingers-open",
        **_variant("1F44B"),
        "skin_variations": {
            "1F3FB": _variant("1F44B-1F3FB"),
            "1F3FD": _variant("1F44B-1F3FD"),
            "1F3FF": _variant("1F44B-1F3FF", apple=False),
        },
    },
    {
        "name": "PEOPLE HOLDING HANDS",
        "short_name": "people_holding_hands",
        "category": "People & Body",
        "subcategory": "family",
        **_variant("1F9D1-200D-1F91D-200D-1F9D1"),
        "skin_variations": {
            "1F3FB-1F3FC": _variant("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC"),
            "1F3FC-1F3FC": _variant("1F9D1-1F3FC-200D-1F91D-200D-1F9D1-1F3FC"),
        },
    },
    {
        "name": "",
        "short_name": "heavy_check-mark",
        "category": "Symbols",
        "subcategory": "other-symbol",
        **_variant("2714-FE0F"),
    },
    {  # an image only the facebook set has
        "name": "FACE WITH BAGS UNDER EYES",
        "short_name": "face_with_bags_under_eyes",
        "category": "Smileys & Emotion",
        "subcategory": "face-sleepy",
        **_variant("1FAE9", apple=False),
    },
]
CAPTIONS = [
    "grinning face",
    "waving hand sign",
    "waving hand sign, light skin tone",
    "waving hand sign, medium skin tone",
    "people holding hands",
    "people holding hands, light skin tone, medium-light skin tone",
    "people holding hands, medium-light skin tone",
    "heavy check mark",
]


def _images(entries: list[dict], image_set: str = "apple") -> list[str]:
    items = [e for entry in entries for e in [entry, *entry.get("skin_variations", {}).values()]]
    return [e["image"] for e in items if e[f"has_img_{image_set}"]]


def _files(image_set: str = "apple", emoji: list[dict] = EMOJI) -> dict[str, bytes]:
    """Package path (under package/) → bytes, as `npm pack` lays it out."""
    files = {
        "package.json": json.dumps({"name": f"emoji-datasource-{image_set}", "version": "16.0.0"}),
        "emoji.json": json.dumps(emoji),
        "README.md": "# emoji-datasource",
        f"img/{image_set}/sheets/64.png": _png(0),  # a sprite sheet: not a row
        f"img/{image_set}/64/1f9b0.png": _png(1),  # listed by no emoji: not a row
    }
    all_images = {img for e in emoji for img in _images([e], "facebook") + _images([e])}
    for k, name in enumerate(sorted(all_images)):
        if image_set == "facebook" or name in _images(emoji):
            files[f"img/{image_set}/64/{name}"] = _png(k + 2)
    return {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}


def _tgz(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _unpacked(root: Path, files: dict[str, bytes]) -> Path:
    for name, body in files.items():
        (root / "package" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "package" / name).write_bytes(body)
    return root


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_a_tarball_becomes_an_imagefolder(tmp_path):
    files = _files()
    summary = from_emoji_datasource(_tgz(tmp_path / "pkg.tgz", files), tmp_path / "out")
    assert {k: summary[k] for k in ("rows", "emoji", "skin_variations", "not_in_set")} == {
        "rows": 8,
        "emoji": 4,
        "skin_variations": 4,
        "not_in_set": 2,
    }
    assert (summary["set"], summary["version"], summary["skipped"]) == ("apple", "16.0.0", {})
    rows = _rows(tmp_path / "out")
    assert [r["text"] for r in rows] == CAPTIONS
    wave = rows[3]
    assert wave == {
        "file_name": "images/1f44b-1f3fd.png",
        "text": "waving hand sign, medium skin tone",
        "unified": "1F44B-1F3FD",
        "short_name": "wave",
        "category": "People & Body",
        "subcategory": "hand-fingers-open",
        "skin_tone": "medium skin tone",
    }
    for row in rows:  # the package's bytes, unchanged
        name = row["file_name"].removeprefix("images/")
        assert (tmp_path / "out" / row["file_name"]).read_bytes() == files[f"img/apple/64/{name}"]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted(
        r["file_name"].removeprefix("images/") for r in rows
    )


def test_the_unpacked_folder_gives_the_same_folder(tmp_path):
    files = _files()
    from_emoji_datasource(_tgz(tmp_path / "pkg.tgz", files), tmp_path / "a")
    unpacked = _unpacked(tmp_path / "unpacked", files)
    from_emoji_datasource(unpacked, tmp_path / "b")
    from_emoji_datasource(unpacked / "package", tmp_path / "c")
    for other in ("b", "c"):
        assert (tmp_path / other / "metadata.jsonl").read_bytes() == (
            tmp_path / "a" / "metadata.jsonl"
        ).read_bytes()
        for image in (tmp_path / "a" / "images").iterdir():
            assert (tmp_path / other / "images" / image.name).read_bytes() == image.read_bytes()


def test_the_facebook_set_takes_its_own_images(tmp_path):
    pkg = _tgz(tmp_path / "fb.tgz", _files("facebook"))
    summary = from_emoji_datasource(pkg, tmp_path / "out")
    assert summary["set"] == "facebook" and summary["rows"] == 10 and summary["not_in_set"] == 0
    assert "face with bags under eyes" in [r["text"] for r in _rows(tmp_path / "out")]


def test_ingest_reads_the_folder_and_keeps_category_as_metadata(tmp_path):
    from_emoji_datasource(_tgz(tmp_path / "pkg.tgz", _files()), tmp_path / "out")
    manifest = ingest(tmp_path / "out", tmp_path / "canonical", DataConfig())
    assert manifest["rows"] == 8 and sum(manifest["hash_split"]["rows"].values()) == 8
    rows = [r for t in iter_shards(tmp_path / "canonical") for r in t.to_pylist()]
    rows.sort(key=lambda r: r["row_id"])  # shards hold one split each
    assert [r["caption"] for r in rows] == CAPTIONS
    assert all(r["decodable"] and r["read_error"] is None for r in rows)
    meta = json.loads(rows[0]["metadata"])
    assert meta["category"] == "Smileys & Emotion" and meta["subcategory"] == "face-smiling"


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "says"),
    [
        (_member("package/img/apple/64/evil.png", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (_member("package/img/apple/64/hard.png", tarfile.LNKTYPE, "package/x"), "is a link"),
        (_member("package/dev", tarfile.CHRTYPE), "is not a regular file"),
        (_member("/etc/cron.d/evil"), "points outside the package"),
        (_member("package/../../evil.png"), "points outside the package"),
    ],
)
def test_links_and_paths_outside_are_refused(tmp_path, member, says):
    pkg = _tgz(tmp_path / "pkg.tgz", _files(), [member])
    with pytest.raises(IngestError, match=says) as err:
        from_emoji_datasource(pkg, tmp_path / "out")
    assert f"member {member.name!r}" in str(err.value) and str(pkg) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_symlink_in_a_folder_is_refused(tmp_path):
    unpacked = _unpacked(tmp_path / "unpacked", _files())
    image = unpacked / "package/img/apple/64/1f600.png"
    image.unlink()
    (tmp_path / "secret.png").write_bytes(_png(9))
    image.symlink_to(tmp_path / "secret.png")
    with pytest.raises(IngestError, match="1f600.png: a link"):
        from_emoji_datasource(unpacked, tmp_path / "out")


def _damaged(tmp_path: Path, name: str, body: bytes | None) -> Path:
    files = _files()
    if body is None:
        del files[name]
    else:
        files[name] = body
    return _tgz(tmp_path / "pkg.tgz", files)


@pytest.mark.parametrize(
    ("name", "body", "says"),
    [
        ("emoji.json", None, "package/emoji.json: not found; this is not an emoji-datasource"),
        ("emoji.json", b"{not json", "package/emoji.json is not valid JSON"),
        ("emoji.json", b'{"a": 1}', "package/emoji.json: not a list of emoji objects"),
        (
            "emoji.json",
            json.dumps([{**EMOJI[0], "image": "../../x.png"}]).encode(),
            "emoji '1F600' names its image '../../x.png', not a file name of code points",
        ),
        (
            "emoji.json",
            json.dumps([{"name": "A", "image": "1f600.png"}]).encode(),
            "no emoji has a 'has_img_apple' field",
        ),
        (
            "emoji.json",
            json.dumps([{**EMOJI[0], "skin_variations": ["1F3FB"]}]).encode(),
            "emoji '1F600' has skin_variations that are not objects",
        ),
    ],
)
def test_a_damaged_package_names_the_file(tmp_path, name, body, says):
    pkg = _damaged(tmp_path, name, body)
    with pytest.raises(IngestError, match="^" + re.escape(str(pkg))) as err:
        from_emoji_datasource(pkg, tmp_path / "out")
    assert says in str(err.value)


def test_a_package_that_is_not_one_says_what_to_pass(tmp_path):
    (tmp_path / "notes.tgz").write_text("not a tarball")
    with pytest.raises(IngestError, match="not a readable .tgz package .*npm pack"):
        from_emoji_datasource(tmp_path / "notes.tgz", tmp_path / "out")
    with pytest.raises(IngestError, match="no such file or folder; get one with `npm pack"):
        from_emoji_datasource(tmp_path / "missing.tgz", tmp_path / "out")
    files = {k: v for k, v in _files().items() if k != "package.json"}
    files.update({k.replace("apple", "google"): v for k, v in files.items() if "/64/" in k})
    with pytest.raises(IngestError, match=r"image sets found are \['apple', 'google'\]"):
        from_emoji_datasource(_tgz(tmp_path / "two.tgz", files), tmp_path / "out")


def test_an_image_the_package_lacks_is_skipped_and_reported(tmp_path, caplog):
    files = _files()
    del files["img/apple/64/1f600.png"]
    with caplog.at_level(logging.WARNING):
        summary = from_emoji_datasource(_tgz(tmp_path / "pkg.tgz", files), tmp_path / "out")
    assert summary["rows"] == 7
    assert summary["skipped"] == {"image listed in emoji.json but absent from the package": 1}
    assert "1f600.png" in caplog.text


def test_the_output_folder_is_replaced_only_if_a_conversion_wrote_it(tmp_path):
    pkg = _tgz(tmp_path / "pkg.tgz", _files())
    out = tmp_path / "out"
    from_emoji_datasource(pkg, out)
    (out / "images" / "1f600.png").write_bytes(b"stale")
    from_emoji_datasource(pkg, out)  # an earlier conversion: replaced
    assert (out / "images" / "1f600.png").read_bytes() != b"stale"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(IngestError, match="not empty, and holds more than an earlier conversion"):
        from_emoji_datasource(pkg, out)
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)


def test_a_package_holding_too_many_image_bytes_is_refused(tmp_path, monkeypatch):
    import parti_ops.components.emoji as emoji

    files = _files()
    pkg = _tgz(tmp_path / "pkg.tgz", files)
    images = sum(len(body) for name, body in files.items() if name.startswith("img/apple/64/"))
    monkeypatch.setattr(emoji, "MAX_TOTAL_BYTES", images - 1)
    with pytest.raises(IngestError, match="bytes of images; this is not an emoji-datasource"):
        from_emoji_datasource(pkg, tmp_path / "out")
    monkeypatch.setattr(emoji, "MAX_TOTAL_BYTES", images)
    assert from_emoji_datasource(pkg, tmp_path / "out")["rows"] == 8


def test_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from parti_ops.pipelines.cli import app

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        pkg = _tgz(tmp_path / "pkg.tgz", _files())
        ok = CliRunner().invoke(app, ["data", "from-emoji-datasource", str(pkg), "--out", "em"])
        assert ok.exit_code == 0, ok.output
        assert "8 rows (4 emoji, 4 skin-tone variations) of the apple set 16.0.0" in ok.output
        bad = CliRunner().invoke(app, ["data", "from-emoji-datasource", "nothing.tgz"])
        assert bad.exit_code == 1 and "Traceback" not in bad.output
        assert "error: nothing.tgz: no such file or folder" in bad.output
    finally:
        root.handlers[:], root.level = handlers, level
