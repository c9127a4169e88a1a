"""`parti retrain`: the pipeline runs when the data's digest is new, and only then."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from parti_ops.components.registry import CHALLENGER
from parti_ops.components.synth import synthesize
from parti_ops.components.versioning import dvc_md5
from parti_ops.model.config import Config
from parti_ops.pipelines import pipeline
from parti_ops.pipelines.cli import app
from parti_ops.pipelines.recurring import cron_fields, retrain

# Three training steps each: only the data differ, so the gate must not refuse on noise.
GATE = {"registry.max_nll_rise": 5.0, "registry.max_fid_rise": 100.0}
# A gate no model passes: a held-out bit per 1000 image tokens at most.
REJECT = {"registry.max_bits_per_token": 0.001}


def test_retrain_runs_once_per_data_version(tmp_path):
    config = Config.load("quick", overrides={"work_dir": str(tmp_path / "work"), **GATE})
    data = tmp_path / "data"
    synthesize(data, config.data)

    first = retrain(config, data)
    assert first["retrained"] and first["champion_data_digest"] is None
    second = retrain(config, data)
    assert not second["retrained"]
    assert second["champion_data_digest"] == second["data_digest"] == first["data_digest"]
    assert second["seconds"] < 0.1 * first["seconds"], (second["seconds"], first["seconds"])

    metadata = data / "train" / "metadata.jsonl"
    rows = metadata.read_text().splitlines()
    row = json.loads(rows[0])
    row["text"] = row["text"] + "."
    metadata.write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    rejecting = Config.load(
        "quick", overrides={"work_dir": str(tmp_path / "work"), **GATE, **REJECT}
    )
    third = retrain(rejecting, data)
    assert third["retrained"] and third["data_digest"] != first["data_digest"]
    assert third["champion_data_digest"] == first["data_digest"]
    client = MlflowClient(config.mlflow_tracking_uri())
    name = config.registry.model_name
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 2  # the gate decided on the second; both are registered
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"  # rejected

    # The gate rejected the model trained on these data: the champion's digest is still
    # the old one, but the data were trained on, so the next night skips them.
    fourth = retrain(rejecting, data)
    assert not fourth["retrained"]
    assert fourth["last_trained_data_digest"] == fourth["data_digest"] == third["data_digest"]
    assert fourth["champion_data_digest"] == first["data_digest"]
    assert len(client.search_model_versions(f"name='{name}'")) == 2


def _registered_on(config: Config, digest: str, decision: str | None = "reject") -> None:
    """A model version trained on `digest`, registered and rejected: `challenger` only.

    `decision` None: the gate failed before it recorded one.
    """
    client = MlflowClient(config.mlflow_tracking_uri())
    name = config.registry.model_name
    client.create_registered_model(name)
    version = client.create_model_version(name, source=str(Path(config.work_dir) / "model"))
    client.set_model_version_tag(name, version.version, "data_digest", digest)
    if decision is not None:
        client.set_model_version_tag(name, version.version, "gate.decision", decision)
    client.set_registered_model_alias(name, CHALLENGER, version.version)


def test_force_retrains_data_already_trained_on(tmp_path, monkeypatch):
    """The skip and `--force` through the CLI; the pipeline itself is stubbed (above: real)."""
    work = tmp_path / "work"
    config = Config.load("tiny", overrides={"work_dir": str(work)})
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    _registered_on(config, dvc_md5(data))
    runs = []

    def run_local(config, source, *, cache=True, console=None):
        runs.append(source)
        assert not cache  # a forced retrain runs every step afresh
        return pipeline.LocalRun(**dict.fromkeys(pipeline.LocalRun.__dataclass_fields__, tmp_path))

    monkeypatch.setattr(pipeline, "run_local", run_local)
    args = ["retrain", "--source", str(data), "--set", f"work_dir={work}"]
    skipped = CliRunner().invoke(app, args)
    assert skipped.exit_code == 0, skipped.output
    assert "the last registered version was trained on it" in skipped.output and not runs
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert runs == [data] and "retrained on" in forced.output


def test_data_whose_gate_never_decided_is_trained_again(tmp_path, monkeypatch):
    config = Config.load("tiny", overrides={"work_dir": str(tmp_path / "work")})
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    _registered_on(config, dvc_md5(data), decision=None)
    runs = []
    monkeypatch.setattr(pipeline, "run_local", lambda config, source, **_: runs.append(source))
    report = retrain(config, data)
    assert report["retrained"] and runs == [data]
    assert report["last_trained_data_digest"] is None


@pytest.mark.parametrize(
    ("cron", "expected"), [("0 3 * * *", "0 0 3 * * *"), ("30 0 3 * * 1", "30 0 3 * * 1")]
)
def test_cron_lines_become_kubeflows_six_fields(cron, expected):
    assert cron_fields(cron) == expected


def test_a_bad_cron_line_is_refused():
    with pytest.raises(ValueError, match="give 5 fields"):
        cron_fields("every night")
