"""MLflow tracking: one parent run per pipeline run, one nested run per step.

Steps run in separate processes (kfp), so runs are addressed by id through an
explicit `MlflowClient` rather than the fluent API's process-global active run.
Metrics, params and tags go in one `log_batch` call each.
"""

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parti_ops.components.versioning import git_sha, package_versions
from parti_ops.model.config import Config

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
PIPELINE_RUN_TAG = "kfp.pipeline_run_id"
# The id of the kfp run a step process belongs to. On a cluster it is the pod's
# `pipeline/runid` label (pipelines/pipeline.py maps it into every step's environment);
# `run_local` sets it for the steps it starts.
PIPELINE_RUN_ENV = "PARTI_PIPELINE_RUN_ID"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
SQLITE_TIMEOUT_S = 30  # how long a step waits for another step's write before "database is locked"


def _sqlite_for_many_processes(uri: str) -> str:
    """Put the SQLite store at `uri` in WAL mode (creating it); returns `uri` with a busy timeout.

    Pipeline steps are separate processes writing to one file. In WAL mode readers and the
    writer do not block each other, and the mode is kept in the file, so setting it from
    any step is enough. A writer still waits for the one before it: MLflow sets
    `busy_timeout` inside its sessions (20 s, mlflow/store/db/utils.py) but not on the
    connections it opens outside them (creating and checking the schema), which keep
    sqlite3's 5 s default; SQLAlchemy hands the URI's `timeout` to `sqlite3.connect`.
    WAL needs every process on one host: a store shared across machines is a server's job.
    """
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as db:
        db.execute("PRAGMA journal_mode=WAL")
    return uri if "?" in uri else f"{uri}?timeout={SQLITE_TIMEOUT_S}"


def client_for(config: Config):
    """An MlflowClient on the configured store, and the experiment id (created if missing)."""
    import mlflow
    from mlflow import MlflowClient

    uri = config.mlflow_tracking_uri()
    if uri.startswith("sqlite:///"):
        uri = _sqlite_for_many_processes(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return client, experiment.experiment_id
    # A local store keeps artifacts beside the database, not in ./mlruns of whatever cwd.
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(config.work_dir) / "mlartifacts").resolve().as_uri()
    try:
        return client, client.create_experiment(
            config.tracking.experiment, artifact_location=artifacts
        )
    except mlflow.exceptions.MlflowException:  # another step created it meanwhile
        return client, client.get_experiment_by_name(config.tracking.experiment).experiment_id


@dataclass
class Run:
    """A handle on one MLflow run: what a step logs through."""

    client: Any
    run_id: str
    parent: "Run | None" = None  # the pipeline's parent run, for what belongs to the whole run

    def log(
        self,
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        """Log metrics (at training step `step`), params and tags in one batch."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def log_dataset(self, *, name: str, source: str, digest: str, context: str) -> None:
        """Record a data set as a run input (`mlflow.log_input`), identified by its DVC digest."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(LocalArtifactDatasetSource(source), name=name, digest=digest)
        tags = [InputTag("mlflow.data.context", context)]
        entity = DatasetInput(dataset._to_mlflow_entity(), tags)
        self.client.log_inputs(self.run_id, datasets=[entity])


def start_pipeline_run(
    config: Config, *, run_name: str, pipeline_run_id: str, code_version: str | None = None
) -> str:
    """Create the parent run of a pipeline run; returns its id for the steps to nest under.

    The kfp run id is kept as a tag: it is how the exit handler finds this run again.
    """
    client, experiment_id = client_for(config)
    tags = {
        "mlflow.runName": run_name,
        PIPELINE_RUN_TAG: pipeline_run_id,
        "mlflow.source.git.commit": code_version or git_sha(),
        "parti.preset": config.name,
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    run = client.create_run(experiment_id, tags=tags, run_name=run_name)
    Run(client, run.info.run_id).log(params=config.flat())
    log.info("MLflow parent run %s in %s", run.info.run_id, config.mlflow_tracking_uri())
    return run.info.run_id


def end_pipeline_run(config: Config, pipeline_run_id: str, *, failed: bool = False) -> str | None:
    """Close the parent run of kfp run `pipeline_run_id`; returns its id (None if never opened)."""
    client, experiment_id = client_for(config)
    runs = _parent_runs(client, experiment_id, pipeline_run_id)
    for run in runs:
        client.set_terminated(run.info.run_id, status="FAILED" if failed else "FINISHED")
    return runs[0].info.run_id if runs else None


def current_pipeline_run(default: str = "") -> str:
    """The kfp run this process is a step of (`PIPELINE_RUN_ENV`), else `default`."""
    return os.environ.get(PIPELINE_RUN_ENV) or default


def pipeline_parent_run(config: Config) -> str:
    """The MLflow parent run of the kfp run this step belongs to; "" outside a pipeline run.

    Steps look their parent up instead of taking its id as an input: an input that is new
    in every run would be part of every step's kfp cache key, and no step would ever be
    taken from the cache.
    """
    run_id = current_pipeline_run()
    if not run_id:
        return ""
    client, experiment_id = client_for(config)
    runs = _parent_runs(client, experiment_id, run_id)
    if not runs:
        log.warning("no MLflow parent run for kfp run %s; this step's run is top-level", run_id)
        return ""
    return runs[0].info.run_id


def _parent_runs(client, experiment_id: str, pipeline_run_id: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'"
    )


@contextmanager
def step_run(config: Config, step: str, parent_run_id: str = "") -> Iterator[Run]:
    """A nested run for one step under `parent_run_id` (a top-level run when it is empty).

    The run ends FINISHED when the block completes, KILLED when the step was preempted
    (SystemExit 143 after a SIGTERM checkpoint; a retry resumes it) and FAILED otherwise.
    """
    client, experiment_id = client_for(config)
    tags = {"mlflow.runName": step, "parti.step": step, "parti.preset": config.name}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    else:
        tags["mlflow.source.git.commit"] = git_sha()
    parent = Run(client, parent_run_id) if parent_run_id else None
    created = client.create_run(experiment_id, tags=tags, run_name=step)
    run = Run(client, created.info.run_id, parent)
    try:
        yield run
    except SystemExit as stop:
        client.set_terminated(run.run_id, status="KILLED" if stop.code == 143 else "FAILED")
        raise
    except BaseException:
        client.set_terminated(run.run_id, status="FAILED")
        raise
    client.set_terminated(run.run_id, status="FINISHED")


def keep_metrics(metrics: Any) -> None:
    """Write a kfp Metrics artifact's values into its file as JSON.

    kfp keeps logged metrics in the artifact's metadata and leaves its file unwritten;
    kfp.local's cache counts an output whose file is missing as a miss, so a step with
    metrics would never be reused.
    """
    path = Path(metrics.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics.metadata), sort_keys=True), encoding="utf-8")
