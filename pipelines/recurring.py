"""Retraining on a schedule: a recurring run on Kubeflow, or `parti retrain` from cron.

On a cluster, `schedule` creates a Kubeflow Pipelines recurring run of the compiled
pipeline: each run's first, uncached step takes the DVC digest of what `source` holds
then and keys ingest's cache with it, so new data at the same path are ingested and
trained on, and unchanged data come from the cache up to the gate (pin a `data_digest`
only for runs that must fail if the data moved). The `parti-retrain` CronJob
(deploy/k8s) runs `retrain` instead, which skips known data before any step starts:
`retrain` compares the data's DVC digest with the one the registry's champion was
trained on and with the one the newest registered version (`challenger`) was trained
on, whatever the gate decided for it, and runs the pipeline only when it equals
neither; the promotion gate then decides whether the new model serves.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parti_ops.model.config import Config
from parti_ops.model.errors import PartiError

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)


class ScheduleError(PartiError, ValueError):
    """A recurring run that cannot be created as asked; the message says what to change."""


def data_digest(config: Config, source: str | Path | None) -> str:
    """The DVC md5 of `source`, or of the synthetic set `config.data` draws when None."""
    from parti_ops.components.versioning import dvc_md5

    if source:
        return dvc_md5(source)
    from parti_ops.components.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="digest-") as tmp:
        synthesize(Path(tmp) / "raw", config.data)
        return dvc_md5(Path(tmp) / "raw")


def _alias_digest(config: Config, alias: str, *, decided: bool = False) -> str | None:
    """The data digest the version `alias` names was trained on; None without that alias
    (or, with `decided`, while the gate has not recorded a decision on that version)."""
    from parti_ops.components.registry import alias_version
    from parti_ops.components.tracking import client_for

    client, _ = client_for(config)
    name = config.registry.model_name
    version = alias_version(client, name, alias)
    if version is None:
        return None
    tags = client.get_model_version(name, version).tags
    if decided and "gate.decision" not in tags:
        return None  # registered, but the gate failed before deciding: try the data again
    return tags.get("data_digest")


def champion_digest(config: Config) -> str | None:
    """The data digest the champion was trained on; None when there is no champion."""
    from parti_ops.components.registry import CHAMPION

    return _alias_digest(config, CHAMPION)


def last_trained_digest(config: Config) -> str | None:
    """The data digest the newest registered version was trained on, promoted or not.

    The register step tags every version with its data digest and moves the `challenger`
    alias to it before the gate runs, so this is the data the last completed training
    was on, whichever way the gate went (a rejected model leaves the champion's digest
    as it was). None when no version was registered, or when the gate never recorded a
    decision on the newest one (it failed before deciding).
    """
    from parti_ops.components.registry import CHALLENGER

    return _alias_digest(config, CHALLENGER, decided=True)


def retrain(
    config: Config,
    source: str | Path | None = None,
    *,
    force: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the pipeline unless the data were trained on already; report what happened.

    Data whose DVC digest is the champion's, or that of the last registered version
    (trained on and judged by the gate, even if the gate rejected it), are skipped;
    `force` runs the pipeline anyway, every step afresh (no step cache). `console` gets
    the run's step lines.
    """
    from parti_ops.pipelines.pipeline import run_local

    started = time.monotonic()
    digest = data_digest(config, source)
    champion, last = champion_digest(config), last_trained_digest(config)
    report: dict[str, Any] = {
        "data_digest": digest,
        "champion_data_digest": champion,
        "last_trained_data_digest": last,
        "forced": force,
    }
    if digest in (champion, last) and not force:
        whose = "the champion" if digest == champion else "the last registered version"
        log.info("data unchanged (%s): %s was trained on it; nothing to do", digest, whose)
        return {**report, "retrained": False, "seconds": time.monotonic() - started}
    if digest in (champion, last):
        log.info("data %s were trained on already; retraining (forced)", digest)
    else:
        log.info(
            "data %s are new (champion's: %s, last trained on: %s): running the pipeline",
            digest, champion, last,
        )  # fmt: skip
    result = run_local(config, source, cache=not force, console=console)
    return {**report, "retrained": True, "run": result, "seconds": time.monotonic() - started}


def cron_fields(cron: str) -> str:
    """A 5-field cron line as Kubeflow's 6 (seconds first); 6 fields pass through."""
    fields = cron.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise ScheduleError(f"cron {cron!r}: give 5 fields (min hour day month weekday) or 6")


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

    One run at a time (`max_concurrency=1`), no catch-up of missed runs, and each step's
    caching as compiled: every run digests the data at `source` afresh (never cached)
    and ingest's cache is keyed by that digest, so changed data are ingested and trained
    on, and unchanged data come from the cache up to the promotion gate. Leave
    `data_digest` empty for that; a digest pins every run to one data version, and runs
    fail at their first step once the data at `source` change.
    """
    import kfp

    from parti_ops.pipelines.pipeline import compile_pipeline

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
            # None keeps each task's compiled caching option; a bool would override them
            # (kfp.Client sets it on the root DAG's tasks, the exit handler's among them).
            enable_caching=None,
            params={
                "config_json": config.to_json(),
                "source": source,
                "data_digest": data_digest,
                "run_name": job_name,
            },
            pipeline_package_path=str(package),
        )
    return run.recurring_run_id
