"""Splits of user data: drawn from the content hash when rows carry none, judged fairly."""

import dataclasses
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from parti_ops.components.ingest import hash_fractions, hash_split, ingest
from parti_ops.components.shards import iter_shards
from parti_ops.components.validate import DataValidationError, split_rule, validate
from parti_ops.model.config import ConfigError, DataConfig


def _png(k: int) -> bytes:
    """A 16x16 PNG whose bytes differ for every k < 2**24."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (k % 256, (k >> 8) % 256, (k >> 16) % 256)).save(buf, "PNG")
    return buf.getvalue()


def _folder(root: Path, n: int, order: list[int] | None = None, **extra) -> Path:
    """An imagefolder of `n` distinct images, rows in `order`, with no split field."""
    root.mkdir(parents=True)
    lines = []
    for k in order if order is not None else range(n):
        name = f"img-{k:05d}.png"
        (root / name).write_bytes(_png(k))
        lines.append(json.dumps({"file_name": name, "text": f"colour {k}", **extra}) + "\n")
    (root / "metadata.jsonl").write_text("".join(lines))
    return root


def _splits_by_image(folder: Path) -> dict[str, str]:
    rows = [r for t in iter_shards(folder, columns=["sha256", "split"]) for r in t.to_pylist()]
    return {r["sha256"]: r["split"] for r in rows}


def test_rows_without_splits_get_all_three_whatever_their_order(tmp_path):
    data = DataConfig()
    n = 400
    forward = _folder(tmp_path / "forward", n)
    backward = _folder(tmp_path / "backward", n, order=list(reversed(range(n))))
    a = ingest(forward, tmp_path / "a", data)
    b = ingest(backward, tmp_path / "b", data)
    assert a["splits"] == b["splits"]
    assert set(a["splits"]) == {"train", "validation", "test"}
    assert a["hash_split"] == {"fractions": hash_fractions(data), "rows": a["splits"]}
    assert _splits_by_image(tmp_path / "a") == _splits_by_image(tmp_path / "b")
    # 5 % each: 20 expected of 400, so far from 0 and from 40 by chance.
    assert 5 <= a["splits"]["test"] <= 40 and 5 <= a["splits"]["validation"] <= 40


def test_a_split_a_row_carries_is_kept(tmp_path):
    src = _folder(tmp_path / "src", 30, split="validation")
    manifest = ingest(src, tmp_path / "out", DataConfig())
    assert manifest["splits"] == {"validation": 30} and manifest["hash_split"]["rows"] == {}


def test_a_split_that_is_not_a_file_name_is_quarantined_with_why(tmp_path):
    src = _folder(tmp_path / "src", 3, split="../train")
    ingest(src, tmp_path / "canonical", DataConfig())
    rows = [r for t in iter_shards(tmp_path / "canonical") for r in t.to_pylist()]
    assert {r["read_error"] for r in rows} == {
        "split '../train' is not a split name: letters, digits, _ and . only"
    }
    assert all(r["split"] in ("train", "validation", "test") for r in rows)
    assert {p.parent for p in tmp_path.rglob("*.parquet")} == {tmp_path / "canonical" / "data"}


def test_an_800_image_set_passes_validation_with_the_defaults(tmp_path):
    data = DataConfig()
    src = _folder(tmp_path / "src", 800)
    ingest(src, tmp_path / "canonical", data)
    report = validate(tmp_path / "canonical", tmp_path / "out", data)
    assert report["passed"] and report["accepted"] == 800
    assert set(report["splits"]) == {"train", "validation", "test"}
    assert report["split_rule"]["hashed"]


def test_a_set_too_small_for_a_test_split_stops_with_what_to_set(tmp_path):
    data = dataclasses.replace(DataConfig(), test_fraction=0.001)
    src = _folder(tmp_path / "src", 40)
    manifest = ingest(src, tmp_path / "canonical", data)
    assert "test" not in manifest["splits"]  # 40 draws at 0.1 %: none (fixed by the images)
    with pytest.raises(DataValidationError) as err:
        validate(tmp_path / "canonical", tmp_path / "out", data)
    message = str(err.value)
    assert "split 'test' has no rows: the content hash drew none of 40 rows" in message
    assert "data.test_fraction=0.001" in message
    assert "--set data.test_fraction=0.16" in message  # 1 - 0.001 ** (1 / 40), rounded up
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["split_balance_ok"] and report["checkpoints_ok"]


def test_test_fraction_zero_asks_for_no_test_split(tmp_path):
    data = dataclasses.replace(DataConfig(), test_fraction=0.0)
    ingest(_folder(tmp_path / "src", 200), tmp_path / "canonical", data)
    report = validate(tmp_path / "canonical", tmp_path / "out", data)
    assert report["passed"] and set(report["splits"]) == {"train", "validation"}
    assert report["split_rule"]["required"] == ["train", "validation"]


def test_data_that_chose_its_splits_is_held_to_the_bounds(tmp_path):
    data = DataConfig()
    ingest(_folder(tmp_path / "src", 100, split="train"), tmp_path / "canonical", data)
    with pytest.raises(DataValidationError) as err:
        validate(tmp_path / "canonical", tmp_path / "out", data)
    assert "split 'train' holds 100 of 100 accepted rows (100.0%), over 95.0%" in str(err.value)
    assert "data.max_split_fraction" in str(err.value)


@pytest.mark.parametrize("n", [30, 100, 300, 1000, 3000])
def test_the_rule_accepts_what_the_hash_draws_at_any_size(n):
    data = DataConfig()
    manifest = {"rows": n, "hash_split": {"fractions": hash_fractions(data), "rows": {"x": n}}}
    rule = split_rule(manifest, n, data)
    for draw in range(100):
        keys = (hashlib.sha256(f"{n}/{draw}/{k}".encode()).hexdigest() for k in range(n))
        counts = Counter(hash_split(key, data) for key in keys)
        shares = [c / n for c in counts.values()]
        assert all(rule["min_fraction"] <= s <= rule["max_fraction"] for s in shares), counts


def test_bounds_widen_only_for_a_hash_split_set():
    data = DataConfig()
    chosen = split_rule({"rows": 800, "splits": {"train": 800}}, 800, data)
    assert (chosen["min_fraction"], chosen["max_fraction"]) == (0.01, 0.95)
    hashed = {"rows": 800, "hash_split": {"fractions": hash_fractions(data), "rows": {"t": 800}}}
    widened = split_rule(hashed, 800, data)
    assert widened["min_fraction"] == 0.01 and 0.95 < widened["max_fraction"] < 0.96
    assert split_rule(hashed, 10**7, data)["max_fraction"] == 0.95


def test_held_out_fractions_are_checked():
    with pytest.raises(ConfigError, match="data.test_fraction"):
        DataConfig(test_fraction=0.5)
