"""Tracking backends under concurrent steps: the SQLite store and an MLflow tracking server.

Each step is a separate process, as under kfp: four of them log at once into one store,
and every run and every metric value must arrive.
"""

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from parti_ops.components.tracking import end_pipeline_run, start_pipeline_run, step_run
from parti_ops.model.config import Config

STEPS = 4  # concurrent step processes
CALLS = 40  # `Run.log` calls per step, as a training loop makes them
METRICS = ("loss", "grad_norm", "lr", "tokens_per_s")

# One pipeline step: a nested run under the parent, metrics and a param per call.
STEP = """
import sys
from parti_ops.components.tracking import step_run
from parti_ops.model.config import Config

config, parent, name = Config.from_json(sys.argv[1]), sys.argv[2], sys.argv[3]
calls, metrics = int(sys.argv[4]), sys.argv[5].split(",")
with step_run(config, name, parent) as run:
    for i in range(calls):
        values = {m: 1000 * k + i for k, m in enumerate(metrics)}
        run.log(metrics=values, params={f"p{i}": i}, step=i)
"""


def run_steps_concurrently(config: Config) -> str:
    """Start a pipeline run and `STEPS` step processes at once; returns the parent run id."""
    parent = start_pipeline_run(config, run_name="r", pipeline_run_id="kfp-c", code_version="abc")
    metrics = ",".join(METRICS)
    steps = [
        subprocess.Popen(
            [sys.executable, "-c", STEP, config.to_json(), parent, f"step{i}", str(CALLS), metrics],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(STEPS)
    ]
    errors = [p.communicate(timeout=120)[1] for p in steps]
    failed = [(p.returncode, e[-2000:]) for p, e in zip(steps, errors, strict=True) if p.returncode]
    assert not failed, failed
    assert end_pipeline_run(config, "kfp-c") == parent
    return parent


def assert_everything_arrived(client: MlflowClient, parent: str) -> None:
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == [f"step{i}" for i in range(STEPS)]
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params == {f"p{i}": str(i) for i in range(CALLS)}
        for k, name in enumerate(METRICS):
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted((m.step, m.value) for m in history) == [
                (i, float(1000 * k + i)) for i in range(CALLS)
            ]
    assert client.get_run(parent).info.status == "FINISHED"


def test_concurrent_steps_lose_nothing_in_one_sqlite_store(tmp_path):
    config = Config.load("tiny", overrides={"work_dir": str(tmp_path)})
    parent = run_steps_concurrently(config)

    assert_everything_arrived(MlflowClient(config.mlflow_tracking_uri()), parent)
    # WAL is what lets a step read while another writes; it is kept in the file.
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_the_environment_names_the_store_unless_the_config_does(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    from_env = Config.load("tiny", overrides={"work_dir": str(tmp_path)})
    configured = f"sqlite:///{tmp_path / 'configured.db'}"
    from_config = Config.load(
        "tiny", overrides={"work_dir": str(tmp_path), "tracking.tracking_uri": configured}
    )
    assert from_env.mlflow_tracking_uri() == f"sqlite:///{tmp_path / 'env.db'}"
    assert from_config.mlflow_tracking_uri() == configured

    with step_run(from_env, "s") as run:
        run.log(metrics={"m": 1})
    assert MlflowClient(f"sqlite:///{tmp_path / 'env.db'}").get_run(run.run_id)
    assert not (tmp_path / "mlflow.db").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on loopback: SQLite backend, proxied artifacts in a folder."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{root / 'server.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    # Its job runner (a third process, for server-side jobs) has nothing to do here.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (root / "server.log").open("w")
    # Its own process group: the server starts worker processes, and all of them go at the end.
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not become healthy in 60 s"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield url, root
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have died on its own
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()


def test_concurrent_steps_lose_nothing_through_a_tracking_server(server, tmp_path, monkeypatch):
    url, root = server
    monkeypatch.chdir(tmp_path)
    config = Config.load(
        "tiny", overrides={"work_dir": str(tmp_path / "work"), "tracking.tracking_uri": url}
    )
    parent = run_steps_concurrently(config)

    assert_everything_arrived(MlflowClient(url), parent)
    # Nothing fell back to a local store.
    assert not (tmp_path / "work").exists()
    assert list(tmp_path.iterdir()) == []


def test_artifacts_go_through_the_tracking_server(server, tmp_path, monkeypatch):
    url, root = server
    monkeypatch.chdir(tmp_path)
    config = Config.load(
        "tiny", overrides={"work_dir": str(tmp_path / "work"), "tracking.tracking_uri": url}
    )
    note = tmp_path / "out" / "note.txt"
    note.parent.mkdir()
    note.write_text("grid of samples")
    with step_run(config, "train") as run:
        run.log_artifact(note, "samples")

    client = MlflowClient(url)
    assert client.get_run(run.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    fetched = Path(client.download_artifacts(run.run_id, "samples/note.txt", str(tmp_path)))
    assert fetched.read_text() == "grid of samples"
    # Stored where the server keeps artifacts, under the run's id.
    stored = list((root / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and run.run_id in stored[0].parts
    assert not (tmp_path / "work").exists() and not (tmp_path / "mlruns").exists()
