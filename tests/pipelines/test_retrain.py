"""`parti retrain`: the pipeline runs when the data's digest is new, and only then."""

import json

import pytest
from mlflow import MlflowClient

from parti_ops.components.synth import synthesize
from parti_ops.model.config import Config
from parti_ops.pipelines.schedule import cron_fields, retrain

QUICK = {
    "data.num_images": 200,
    "image_tokenizer.steps": 4,
    "image_tokenizer.batch_size": 8,
    "image_tokenizer.channels": 8,
    "parti.d_model": 32,
    "parti.decoder_layers": 1,
    "train.steps": 3,
    "train.batch_size": 8,
    "train.warmup_steps": 1,
    "scorer.steps": 3,
    "scorer.channels": 4,
    "scorer.embed_dim": 16,
    "scorer.text_width": 32,
    "scorer.text_layers": 1,
    "evaluate.prompts": 4,
    "evaluate.fid_images": 16,
    "registry.max_bits_per_token": 11.0,
    "registry.max_nll_rise": 5.0,  # three training steps each: only the data differ
    "registry.max_fid_rise": 100.0,
    "export.parity_prompts": 2,
    "export.int8": False,
}


def test_retrain_runs_once_per_data_version(tmp_path):
    config = Config.load("tiny", overrides={"work_dir": str(tmp_path / "work"), **QUICK})
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
