"""The folders ingest and validate write open as they are in pandas and `datasets`."""

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from parti_ops.components.ingest import ingest
from parti_ops.components.shards import ShardFormatError, iter_shards, read_manifest
from parti_ops.components.validate import validate
from parti_ops.model.config import DataConfig

SPLITS = {"train": 48, "validation": 6, "test": 6}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    src = root / "src"
    src.mkdir()
    lines = []
    names = [s for s, n in SPLITS.items() for _ in range(n)]
    for k, split in enumerate(names):
        Image.new("RGB", (24, 16), (4 * k, 255 - 4 * k, 9)).save(src / f"{k}.png")
        lines.append({"file_name": f"{k}.png", "text": f"a swatch {k}", "split": split})
    (src / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = DataConfig(shard_size=25)  # train spans two shards
    ingest(src, root / "canonical", data)
    report = validate(root / "canonical", root / "validated", data)
    assert report["passed"] and report["splits"] == SPLITS
    return {"canonical": root / "canonical", "accepted": root / "validated" / "accepted"}


@pytest.mark.parametrize("which", ["canonical", "accepted"])
def test_one_file_per_split_and_shard_in_the_manifest(folders, which):
    manifest = read_manifest(folders[which])
    assert [s["file"] for s in manifest["shards"]] == [
        "data/test-00000-of-00001.parquet",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
        "data/validation-00000-of-00001.parquet",
    ]
    files = sorted(p.relative_to(folders[which]).as_posix() for p in folders[which].rglob("*"))
    assert files == ["data", *(s["file"] for s in manifest["shards"]), "manifest.json"]
    assert sum(s["rows"] for s in manifest["shards"] if s["split"] == "train") == SPLITS["train"]


@pytest.mark.parametrize("which", ["canonical", "accepted"])
def test_pandas_reads_the_data_folder(folders, which):
    frame = pd.read_parquet(folders[which] / "data")
    assert len(frame) == sum(SPLITS.values())
    assert frame["split"].value_counts().to_dict() == SPLITS
    im = Image.open(io.BytesIO(frame["image"].iloc[0]["bytes"]))
    assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))


@pytest.mark.parametrize("which", ["canonical", "accepted"])
def test_hugging_face_datasets_gives_splits_and_images(folders, which, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets  # a pinned dev dependency: its absence is a failure, not a skip

    loaded = datasets.load_dataset(
        "parquet", data_dir=str(folders[which]), cache_dir=str(tmp_path / "hf")
    )
    assert list(loaded) == list(SPLITS)
    assert {s: len(d) for s, d in loaded.items()} == SPLITS
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    for split, table in loaded.items():
        assert set(table["split"]) == {split}
    row = loaded["test"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    assert row["caption"].startswith("a swatch")


def test_the_pipeline_reads_png_bytes(folders):
    tables = list(iter_shards(folders["accepted"], ["split", "image"], split="validation"))
    assert [t.num_rows for t in tables] == [SPLITS["validation"]]
    assert tables[0]["image"].type == pa.binary()
    assert Image.open(io.BytesIO(tables[0]["image"][0].as_py())).format == "PNG"


def test_an_older_folder_asks_for_a_new_ingest(folders, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": []}))
    with pytest.raises(ShardFormatError, match="re-run `parti data ingest`"):
        read_manifest(old)


def test_writing_again_replaces_the_earlier_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        Image.new("RGB", (24, 16), (40 * k, 9, 9)).save(src / f"{k}.png")
    lines = [{"file_name": f"{k}.png", "text": f"swatch {k}", "split": "train"} for k in range(6)]
    (src / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ingest(src, tmp_path / "out", DataConfig(shard_size=2))
    manifest = ingest(src, tmp_path / "out", DataConfig(shard_size=4))
    listed = {tmp_path / "out" / s["file"] for s in manifest["shards"]}
    assert set((tmp_path / "out" / "data").iterdir()) == listed and len(listed) == 2


def test_parquet_files_no_earlier_write_listed_are_refused_not_deleted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (24, 16), (9, 9, 9)).save(src / "a.png")
    (src / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "dark"}) + "\n")
    theirs = tmp_path / "out" / "data" / "train-00000-of-00001.parquet"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"someone's data set")
    with pytest.raises(ShardFormatError, match="no earlier write .* listed; refusing"):
        ingest(src, tmp_path / "out", DataConfig())
    assert theirs.read_bytes() == b"someone's data set"
