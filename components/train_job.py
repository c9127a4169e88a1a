"""The train step when training spans machines (`train.nodes` > 1).

The step stages its inputs on the shared volume, submits the run's PyTorchJob
(deploy/training_job.py) and waits for it; the job's pods run the same entry point as the
one-machine step (components/train_decoder.py) and log to MLflow under the pipeline's parent run.
When the job succeeds, the bundle is copied into the step's output, without checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from parti_ops.components.loaders import read_encoded_manifest
from parti_ops.components.shards import write_json
from parti_ops.deploy.training_job import (
    SHARED,
    api_client,
    job_name,
    job_objects,
    own_namespace,
    run_folder,
    submit,
    wait,
)
from parti_ops.model.config import Config
from parti_ops.model.layout import CHECKPOINTS, TRAINING_REPORT

log = logging.getLogger(__name__)


def train_job_step(
    config: Config,
    parent_run_id: str,
    encoded_dir: str,
    text_dir: str,
    image_dir: str,
    out_dir: str,
    *,
    shared: str | Path = SHARED,
    api: Any = None,
    poll_s: float = 30.0,
) -> dict[str, Any]:
    """Train the decoder in a PyTorchJob of `train.nodes` pods; returns the training report."""
    manifest = read_encoded_manifest(encoded_dir)
    name = job_name(
        config,
        {
            "data": manifest["data_digest"],
            "text_tokenizer": manifest["text_tokenizer"]["digest"],
            "image_tokenizer": manifest["image_tokenizer"]["digest"],
        },
    )
    run = run_folder(shared, name)
    for key, source in (
        ("encoded", encoded_dir), ("text_tokenizer", text_dir), ("image_tokenizer", image_dir),
    ):  # fmt: skip
        _stage(Path(source), run / "inputs" / key)
    write_json(run / "config.json", config.to_dict())
    namespace = config.train.job_namespace or own_namespace()
    api = api or api_client()
    log.info("training in PyTorchJob %s/%s (%d nodes)", namespace, name, config.train.nodes)
    submit(api, job_objects(config, name, namespace, parent_run_id))
    wait(api, namespace, name, timeout_s=config.train.job_timeout_s, poll_s=poll_s)
    shutil.copytree(
        run / "parti",
        out_dir,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(CHECKPOINTS),  # they stay on the shared volume
    )
    report = json.loads((Path(out_dir) / TRAINING_REPORT).read_text(encoding="utf-8"))
    return {**report, "job": name}


def _stage(source: Path, target: Path) -> None:
    """Copy a folder onto the shared volume once: the job name fixes its content."""
    if target.is_dir():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    partial.rename(target)
