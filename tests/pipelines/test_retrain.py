"""`parti retrain`: the pipeline runs when the data's digest is new, and only then."""

import json

import pytest
from mlflow import MlflowClient

from parti_ops.components.synth import synthesize
from parti_ops.model.config import Config
from parti_ops.pipelines.schedule import cron_fields, retrain

# Three training steps each: only the data differ, so the gate must not refuse on noise.
GATE = {"registry.max_nll_rise": 5.0, "registry.max_fid_rise": 100.0}


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
    third = retrain(config, data)
    assert third["retrained"] and third["data_digest"] != first["data_digest"]
    assert third["champion_data_digest"] == first["data_digest"]
    client = MlflowClient(config.mlflow_tracking_uri())
    versions = client.search_model_versions(f"name='{config.registry.model_name}'")
    assert len(versions) == 2  # the gate decided on the second; both are registered


@pytest.mark.parametrize(
    ("cron", "expected"), [("0 3 * * *", "0 0 3 * * *"), ("30 0 3 * * 1", "30 0 3 * * 1")]
)
def test_cron_lines_become_kubeflows_six_fields(cron, expected):
    assert cron_fields(cron) == expected


def test_a_bad_cron_line_is_refused():
    with pytest.raises(ValueError, match="give 5 fields"):
        cron_fields("every night")
