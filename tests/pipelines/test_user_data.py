"""The whole pipeline on data without synthetic scenes: evaluated, registered, promoted, served.

The fixture is what a user brings: one folder of images with a `metadata.jsonl` of file
names and captions, no splits and no scenes. A challenger trained far fewer steps on the
same data is then refused by the gate, which names the metric and its interval.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from parti_ops.components.evaluate import EVALUATION, evaluate_step
from parti_ops.components.register import register_step
from parti_ops.components.registry import BITS, CHAMPION, FOLLOWING
from parti_ops.components.train_decoder import train_step
from parti_ops.model.config import Config
from parti_ops.pipelines.pipeline import run_local

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
MARKS = {"stripes": "rows", "bars": "columns", "dots": "dots", "block": "block"}


def _icon(colour: tuple[int, int, int], mark: str, shade: int) -> np.ndarray:
    """A 32×32 icon: a light background with one coloured pattern (no scene to read back)."""
    image = np.full((32, 32, 3), 235 - shade, np.uint8)
    if mark == "rows":
        image[::4] = colour
    elif mark == "columns":
        image[:, ::4] = colour
    elif mark == "dots":
        image[2::6, 2::6] = colour
    else:
        image[8:24, 8:24] = colour
    return image


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """240 captioned icons in one folder, as an imagefolder with `metadata.jsonl`."""
    root = tmp_path_factory.mktemp("icons") / "icons"
    root.mkdir()
    rows = []
    for i in range(240):
        name, colour = list(COLOURS.items())[i % 3]
        word, mark = list(MARKS.items())[(i // 3) % 4]
        Image.fromarray(_icon(colour, mark, i // 12)).save(root / f"icon-{i:03d}.png")
        rows.append({"file_name": f"icon-{i:03d}.png", "text": f"{name} {word} icon"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_data_without_scenes_runs_through_registration_promotion_and_serving(user_folder, tmp_path):
    overrides = {"work_dir": str(tmp_path / "work"), "train.steps": 40}
    config = Config.load("quick", overrides=overrides)
    result = run_local(config, user_folder)

    evaluation = json.loads((result.evaluation / EVALUATION).read_text())
    metrics = evaluation["metrics"]
    for name in (BITS, FOLLOWING, "validation/retrieval_r1", "train/prompt_following",
                 "clip_score", "fid"):  # fmt: skip
        assert name in metrics and np.isfinite(metrics[name]), name
        assert name in evaluation["computed"]
    assert evaluation["chance"][FOLLOWING] == 0.5
    low, high = evaluation["intervals"][FOLLOWING]
    assert low <= metrics[FOLLOWING] <= high
    # No scenes: the oracle's scores are listed as not computed, with the reason.
    assert "fidelity" not in metrics and "validation/exact" not in metrics
    assert "synthetic scene" in evaluation["not_computed"]["fidelity"]

    decision = result.decision.read_text()
    assert "**promote**" in decision and "not applied: min_fidelity" in decision
    client = MlflowClient(config.mlflow_tracking_uri())
    name = config.registry.model_name
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert client.get_model_version(name, "1").tags["gate.decision"] == "promote"

    smoke = json.loads((result.smoke / "smoke.json").read_text())
    captions = {json.loads(line)["text"] for line in (user_folder / "metadata.jsonl").open()}
    assert smoke["prompt"] in captions and smoke["checks"] == {}
    assert (result.smoke / "smoke.png").stat().st_size > 0

    # A challenger trained one step on the same data, scored by the same evaluator.
    root = tmp_path / "challenger"
    cfg = Config.load("quick", overrides={**overrides, "train.steps": 1})
    train_step(cfg, "", str(result.encoded), str(result.text_tokenizer),
               str(result.image_tokenizer), str(root / "model"))  # fmt: skip
    evaluate_step(cfg, "", str(root / "model"), str(result.accepted), str(result.scorer),
                  str(result.run_dir / "fid-reference-op" / "references"),
                  str(root / "evaluation"))  # fmt: skip
    report = register_step(cfg, "", str(root / "model"), str(root / "evaluation"),
                           str(result.encoded), str(root / "decision"))  # fmt: skip
    assert report["outcome"] == "reject" and "max_nll_rise" in report["failed_rules"]
    assert f"max_nll_rise ({BITS}" in report["reason"] and "interval [" in report["reason"]
    rule = {r["name"]: r for r in report["rules"]}["max_nll_rise"]
    assert rule["interval"][0] > rule["limit"]  # all of the paired interval past the margin
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
