"""A recurring run follows the data: changed data at the same path are never a cache hit."""

import json
import warnings
from pathlib import Path

import pytest
import yaml
from kfp import dsl, local

from parti_ops.components.synth import synthesize
from parti_ops.components.versioning import dvc_md5
from parti_ops.model.config import Config
from parti_ops.pipelines import recurring
from parti_ops.pipelines.pipeline import _ingest, compile_pipeline


def _edit_a_caption(data: Path) -> None:
    metadata = data / "train" / "metadata.jsonl"
    rows = metadata.read_text().splitlines()
    row = json.loads(rows[0])
    row["text"] += "."
    metadata.write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")


def test_ingest_is_keyed_by_a_digest_step_that_is_never_cached(tmp_path):
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    digest, ingest = tasks["data-digest-op"], tasks["ingest-op"]
    assert not digest["cachingOptions"].get("enableCache")
    assert digest["inputs"]["parameters"] == {
        "source": {"componentInputParameter": "pipelinechannel--source"},
        "data_digest": {"componentInputParameter": "pipelinechannel--data_digest"},
    }
    assert ingest["cachingOptions"]["enableCache"]
    assert ingest["inputs"]["parameters"]["data_digest"] == {
        "taskOutputParameter": {"producerTask": "data-digest-op", "outputParameterKey": "Output"}
    }


@pytest.fixture
def cached_local(tmp_path):
    """kfp.local with its task cache on, as Kubeflow caches a recurring run's steps."""
    root = tmp_path / "kfp"
    root.mkdir()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You may be attemping to run a task")
        warnings.filterwarnings("ignore", message=r"Task '.*': settings \[.*\] have no effect")
        yield root


def test_kfp_local_cache_reingests_changed_data_at_the_same_path(tmp_path, cached_local):
    config = Config.load(
        "tiny", overrides={"work_dir": str(tmp_path / "work"), "data.num_images": 30}
    )
    data = tmp_path / "data"
    synthesize(data, config.data)

    @dsl.pipeline(name="ingest-only")
    def ingest_only(config_json: str, source: str, data_digest: str = "") -> str:
        _, ingest = _ingest(config_json, source, data_digest)
        return ingest.outputs["Output"]

    def run(**pin: str) -> tuple[str, bool]:
        """The run's ingested digest, and whether ingest ran (a cache hit writes nothing)."""
        before = set(cached_local.iterdir())
        task = ingest_only(config_json=config.to_json(), source=str(data), **pin)
        (run_dir,) = set(cached_local.iterdir()) - before - {cached_local / ".kfp_cache"}
        return task.output, (run_dir / "ingest-op").exists()

    first = dvc_md5(data)
    assert run() == (first, True)
    assert run() == (first, False)  # same data, same path: ingest from the cache
    _edit_a_caption(data)
    assert run() == (dvc_md5(data), True)  # new data, same path: ingested again
    with pytest.raises(RuntimeError, match="data-digest-op"):
        run(data_digest=first)  # pinned to the old data: the run stops at its first step


class _FakeClient:
    """kfp.Client's part that `schedule` uses; records the recurring run it would create."""

    created: dict = {}

    def __init__(self, host: str, namespace: str) -> None:
        pass

    def create_experiment(self, name: str, namespace: str):
        return type("Experiment", (), {"experiment_id": "e1"})

    def create_recurring_run(self, **kwargs):
        package = Path(kwargs["pipeline_package_path"])
        _FakeClient.created = {**kwargs, "spec": next(yaml.safe_load_all(package.read_text()))}
        return type("RecurringRun", (), {"recurring_run_id": "r1"})


def test_schedule_keeps_each_steps_caching_and_follows_the_data(monkeypatch):
    import kfp

    monkeypatch.setattr(kfp, "Client", _FakeClient)
    config = Config.from_name("tiny")
    run_id = recurring.schedule(
        config, host="http://ml-pipeline:8888", cron="0 3 * * *", source="/s3/data"
    )
    created = _FakeClient.created
    assert run_id == "r1" and created["cron_expression"] == "0 0 3 * * *"
    # None: the compiled per-task options hold (kfp.Client would override them otherwise).
    assert created["enable_caching"] is None
    assert created["params"]["data_digest"] == "" and created["params"]["source"] == "/s3/data"
    tasks = created["spec"]["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert not tasks["data-digest-op"]["cachingOptions"].get("enableCache")
