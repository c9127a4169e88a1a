"""Retraining on a schedule: a recurring run on Kubeflow, or `parti retrain` from cron.

On a cluster, `schedule` creates a Kubeflow Pipelines recurring run of the compiled
pipeline: each run ingests what `source` holds then, and the promotion gate decides
(pin a `data_digest` only for runs that must fail if the data moved). The `parti-retrain`
CronJob (deploy/k8s) runs `retrain` instead, which skips unchanged data before any step
starts. On one machine, `retrain` compares the data's DVC
digest with the one the registry's champion was trained on, and runs the pipeline only
when they differ; the promotion gate then decides whether the new model serves.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from parti_ops.model.config import Config

log = logging.getLogger(__name__)


def data_digest(config: Config, source: str | Path | None) -> str:
    """The DVC md5 of `source`, or of the synthetic set `config.data` draws when None."""
    from parti_ops.components.versioning import dvc_md5

    if source:
        return dvc_md5(source)
    from parti_ops.components.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="digest-") as tmp:
        synthesize(Path(tmp) / "raw", config.data)
        return dvc_md5(Path(tmp) / "raw")


def champion_digest(config: Config) -> str | None:
    """The data digest the champion was trained on; None when there is no champion."""
    from parti_ops.components.registry import CHAMPION, alias_version
    from parti_ops.components.tracking import client_for

    client, _ = client_for(config)
    name = config.registry.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None
    return client.get_model_version(name, version).tags.get("data_digest")


def retrain(config: Config, source: str | Path | None = None) -> dict[str, Any]:
    """Run the pipeline if the data differ from the champion's; report what happened."""
    from parti_ops.pipelines.parti import run_local

    started = time.monotonic()
    digest = data_digest(config, source)
    current = champion_digest(config)
    report: dict[str, Any] = {"data_digest": digest, "champion_data_digest": current}
    if digest == current:
        log.info("data unchanged (%s): the champion was trained on it; nothing to do", digest)
        return {**report, "retrained": False, "seconds": time.monotonic() - started}
    log.info("data %s differ from the champion's (%s): running the pipeline", digest, current)
    result = run_local(config, source)
    return {**report, "retrained": True, "run": result, "seconds": time.monotonic() - started}


def cron_fields(cron: str) -> str:
    """A 5-field cron line as Kubeflow's 6 (seconds first); 6 fields pass through."""
    fields = cron.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise ValueError(f"cron {cron!r}: give 5 fields (min hour day month weekday) or 6")


def schedule(
    config: Config,
    *,
    host: str,
    cron: str,
    source: str,
    data_digest: str = "",
    experiment: str = "parti-ops",
    job_name: str = "parti-ops-retrain",
    namespace: str = "kubeflow",
) -> str:
    """Create a recurring run of the compiled pipeline on Kubeflow; returns its id.

    One run at a time (`max_concurrency=1`), no catch-up of missed runs, caching on.
    A `data_digest` pins every run to that data version: runs fail at ingest once the data
    at `source` change, so leave it empty for a schedule that follows the data.
    """
    import kfp

    from parti_ops.pipelines.parti import compile_pipeline

    client = kfp.Client(host=host, namespace=namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml", config)
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
        run = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            cron_expression=cron_fields(cron),
            max_concurrency=1,
            no_catchup=True,
            enable_caching=True,
            params={
                "config_json": config.to_json(),
                "source": source,
                "data_digest": data_digest,
                "run_name": job_name,
            },
            pipeline_package_path=str(package),
        )
    return run.recurring_run_id
