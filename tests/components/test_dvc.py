"""The default synthetic set is what data.dvc records, so DVC sees it as unchanged."""

from pathlib import Path

import yaml

from parti_ops.components.synth import synthesize
from parti_ops.components.versioning import dvc_md5
from parti_ops.model.config import Config

ROOT = Path(__file__).resolve().parents[2]


def test_default_synthetic_set_reproduces_data_dvc(tmp_path):
    tracked = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    synthesize(tmp_path / "data", Config.from_name("tiny").data)
    assert dvc_md5(tmp_path / "data") == tracked["md5"]
    assert sum(1 for p in (tmp_path / "data").rglob("*") if p.is_file()) == tracked["nfiles"]


def test_dvc_md5_of_a_file_is_its_md5(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"abc")
    assert dvc_md5(path) == "900150983cd24fb0d6963f7d28e17f72"


def test_dvc_md5_changes_with_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = dvc_md5(tmp_path)
    (tmp_path / "a.txt").write_text("two")
    assert dvc_md5(tmp_path) != before


def test_dvc_md5_equals_dvcs_own_tree_hash(tmp_path):
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    root = tmp_path / "data"
    for relpath, body in {
        "b.txt": b"b",
        "a/x.bin": bytes(range(256)),
        "a/b/empty": b"",
        "ünïcode name.txt": "é".encode(),
        "a b/c-d.png": b"\x89PNG",
    }.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(body)
    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(tmp_path / "odb")), str(root), fs, "md5", dry_run=True)
    assert dvc_md5(root) == obj.hash_info.value
