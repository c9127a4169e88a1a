"""The synthesize step: layout, splits, held-out pairs, determinism, refusing foreign folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from parti_ops.components.synth import SPLITS, split_sizes, synthesize
from parti_ops.model.config import DataConfig
from parti_ops.model.scenes import Scene, heldout_pairs, read_scene


def _rows(folder: Path) -> list[dict]:
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    data = DataConfig(num_images=300, seed=3, image_size=64)
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, synthesize(out, data)


def test_layout_and_split_sizes(written):
    out, summary = written
    assert summary["counts"] == {"train": 255, "validation": 15, "test": 30}
    assert sum(summary["counts"].values()) == 300
    assert sorted(p.name for p in out.iterdir()) == sorted(SPLITS)
    for split in SPLITS:
        rows = _rows(out / split)
        assert len(rows) == summary["counts"][split]
        names = [row["file_name"] for row in rows]
        assert names == [f"{i:05d}.png" for i in range(len(rows))]
        assert sorted(p.name for p in (out / split).glob("*.png")) == names
        assert set(rows[0]) == {"file_name", "text", "background", "objects"}


def test_heldout_pairs_only_in_test(written):
    out, _ = written
    held = heldout_pairs()
    for split in SPLITS:
        for row in _rows(out / split):
            has_held = any((o["colour"], o["shape"]) in held for o in row["objects"])
            assert has_held == (split == "test"), (split, row)


def test_images_show_what_metadata_says(written):
    out, _ = written
    for split in SPLITS:
        for row in _rows(out / split)[:20]:
            with Image.open(out / split / row["file_name"]) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
                assert read_scene(image) == Scene.from_dict(row)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    data = DataConfig(num_images=40, seed=7, image_size=32)
    synthesize(tmp_path / "a", data)
    synthesize(tmp_path / "b", data)
    synthesize(tmp_path / "c", DataConfig(num_images=40, seed=8, image_size=32))
    first, second, other = (_tree(tmp_path / name) for name in "abc")
    assert first == second
    assert first.keys() == other.keys() and first != other


def test_rewrites_an_earlier_set_in_place(tmp_path):
    synthesize(tmp_path, DataConfig(num_images=40, seed=1))
    summary = synthesize(tmp_path, DataConfig(num_images=20, seed=1))
    assert len(list((tmp_path / "train").glob("*.png"))) == summary["counts"]["train"]


@pytest.mark.parametrize("stray", ["notes.txt", "train/notes.txt", "other/00000.png"])
def test_refuses_a_folder_with_other_files(tmp_path, stray):
    synthesize(tmp_path, DataConfig(num_images=20))
    (tmp_path / stray).parent.mkdir(exist_ok=True)
    (tmp_path / stray).write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        synthesize(tmp_path, DataConfig(num_images=20))
    assert (tmp_path / stray).read_text() == "keep me"


def test_split_sizes_keep_every_split():
    tiny = DataConfig(num_images=10, heldout_fraction=0.01, validation_fraction=0.01)
    assert split_sizes(tiny) == {"train": 8, "validation": 1, "test": 1}
    with pytest.raises(ValueError, match="no training images"):
        split_sizes(DataConfig(num_images=10, heldout_fraction=0.49, validation_fraction=0.49))
