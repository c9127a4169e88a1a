"""MLflow tracking: parent and nested runs, statuses, batches and data inputs."""

import pytest
from mlflow import MlflowClient

from parti_ops.components.tracking import end_pipeline_run, start_pipeline_run, step_run
from parti_ops.model.config import Config


@pytest.fixture
def config(tmp_path):
    return Config.load("tiny", overrides={"work_dir": str(tmp_path)})


def test_steps_nest_under_the_pipeline_run(config):
    parent = start_pipeline_run(config, run_name="r", pipeline_run_id="kfp-1", code_version="abc")
    with step_run(config, "ingest", parent) as run:
        run.log(metrics={"rows": 3}, params={"p": 1}, tags={"t": "x"})
        run.log_dataset(name="source", source="/data", digest="d1.dir", context="source")
    with pytest.raises(ValueError), step_run(config, "validate", parent):
        raise ValueError("boom")
    assert end_pipeline_run(config, "kfp-1", failed=True) == parent

    client = MlflowClient(config.mlflow_tracking_uri())
    top = client.get_run(parent)
    assert top.info.status == "FAILED"
    assert top.data.tags["mlflow.source.git.commit"] == "abc"
    assert top.data.params["data.image_size"] == "64"
    children = {
        r.info.run_name: r
        for r in client.search_runs(
            [top.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
        )
    }
    assert children["ingest"].info.status == "FINISHED"
    assert children["ingest"].data.metrics == {"rows": 3.0}
    assert children["ingest"].inputs.dataset_inputs[0].dataset.digest == "d1.dir"
    assert children["validate"].info.status == "FAILED"


def test_closing_an_unknown_pipeline_run_is_a_no_op(config):
    assert end_pipeline_run(config, "never-started") is None


def test_artifacts_go_beside_the_store_not_to_the_cwd(config, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with step_run(config, "s") as run:
        (tmp_path / "f.txt").write_text("x")
        run.log_artifact(tmp_path / "f.txt")
    assert list((tmp_path / "mlartifacts").rglob("f.txt"))
    assert list(elsewhere.iterdir()) == []


def test_a_step_finds_the_parent_run_of_its_kfp_run_from_its_environment(
    config, monkeypatch, caplog
):
    from parti_ops.components.tracking import PIPELINE_RUN_ENV, pipeline_parent_run

    parent = start_pipeline_run(config, run_name="r", pipeline_run_id="kfp-7")
    start_pipeline_run(config, run_name="other", pipeline_run_id="kfp-8")
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)
    assert pipeline_parent_run(config) == ""  # not a step of a pipeline run

    monkeypatch.setenv(PIPELINE_RUN_ENV, "kfp-7")
    assert pipeline_parent_run(config) == parent

    monkeypatch.setenv(PIPELINE_RUN_ENV, "kfp-unknown")
    assert pipeline_parent_run(config) == ""
    assert "no MLflow parent run for kfp run kfp-unknown" in caplog.text
