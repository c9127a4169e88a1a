"""The register step: a trained bundle becomes an MLflow model version, then the gate runs.

Each version is an MLflow pyfunc logged as "models from code" (`pyfunc_model.py`),
its artifact the bundle's model folders, with lineage tags: data digest (DVC), git SHA,
tokenizer digests, the evaluator and the evaluation's metrics. The newest version becomes
the `challenger`; the promotion gate (components/registry.py `decide`) then says whether
it replaces the `champion`, and the decision is written beside the step's outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from parti_ops.components.registry import (
    BUNDLE_TAG,
    CHALLENGER,
    CHAMPION,
    DECISION_JSON,
    DECISION_MD,
    EVALUATION,
    IMAGE_TOKENIZER_TAG,
    KEY_TAG,
    UNCHANGED,
    Decision,
    RegistryError,
    alias_version,
    check_evaluation,
    decide,
    download_bundle,
    load_evaluation,
    metric_tags,
    move_champion,
    registered_version,
    set_tags,
    stored_evaluation,
    write_decision,
)
from parti_ops.model.config import Config

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
EXAMPLE_PROMPT = "a red circle on the left"


def register_step(
    config: Config,
    parent_run_id: str,
    model_dir: str,
    evaluation_dir: str,
    encoded_dir: str,
    out_dir: str,
    *,
    reevaluate: Callable[[Path], dict] | None = None,
) -> dict[str, Any]:
    """Register `model_dir` as a version with alias `challenger`, then run the promotion gate.

    Args:
        config: the run's `Config` (`registry` holds the gate's rules).
        parent_run_id: the pipeline's MLflow parent run ("" for a top-level run).
        model_dir: the bundle `parti train` wrote; its checkpoints are not registered.
        evaluation_dir: holds `evaluation.json` (see `load_evaluation`).
        encoded_dir: the encoded data the bundle was trained on (data digest, tokenizers).
        out_dir: where `decision.json` and `decision.md` are written.
        reevaluate: scores a bundle folder on the challenger's held-out data; used when
            the champion was evaluated with another key. None: such a gate refuses.

    Returns:
        The decision report (as in `decision.json`); a rejection returns normally, with
        `promoted: false` and each rule's values.
    """
    from parti_ops.components.loaders import read_encoded_manifest
    from parti_ops.components.tracking import step_run

    evaluation = load_evaluation(evaluation_dir)
    manifest = read_encoded_manifest(encoded_dir)
    lineage = bundle_lineage(model_dir, manifest)
    evaluation["image_tokenizer"] = lineage[IMAGE_TOKENIZER_TAG]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = config.registry.model_name
    with step_run(config, "register", parent_run_id) as run:
        lineage.update(
            git_sha=_code_version(run),
            preset=config.name,
            **({"pipeline.parent_run_id": parent_run_id} if parent_run_id else {}),
            **{f"{KEY_TAG}{k}": v for k, v in evaluation["key"].items()},
            **{"scorer.version": evaluation["feature_model"]},
        )
        metrics = {k: v for k, v in evaluation["metrics"].items() if v is not None}
        run.log_dataset(
            name="encoded",
            source=str(Path(encoded_dir).resolve()),
            digest=lineage["data_digest"],
            context="training",
        )
        run.log(metrics=metrics, tags=lineage)
        client = run.client
        digest = registration_digest(model_dir, evaluation)
        version = registered_version(client, name, digest)
        if version is None:
            version = _log_model(config, run.run_id, Path(model_dir))
            set_tags(client, name, version, {**lineage, **metric_tags(metrics),
                                              BUNDLE_TAG: digest})  # fmt: skip
            log.info("registered %s version %s (alias %s)", name, version, CHALLENGER)
        else:  # a second run whose training and evaluation came from the cache
            log.info("%s version %s holds these weights, so evaluated: not registered again",
                     name, version)  # fmt: skip
        client.set_registered_model_alias(name, CHALLENGER, version)

        if version == alias_version(client, name, CHAMPION):
            decision, champion = (
                Decision(
                    UNCHANGED,
                    f"unchanged: version {version} (these weights, so evaluated) is the champion",
                ),
                None,
            )
        else:
            decision, champion = _gate(client, config, version, evaluation, reevaluate)
        replaced = None
        if decision.promoted:
            replaced = move_champion(client, name, version)
        gate_tags = {
            "gate.decision": decision.outcome,
            "gate.failed_rules": ",".join(decision.failed_rules),
            "gate.reason": decision.reason,
        }
        if decision.outcome != UNCHANGED:  # keep the tags of the decision that was made
            set_tags(client, name, version, gate_tags)
        report = {
            "model_name": name,
            "version": version,
            "model_uri": f"models:/{name}/{version}",
            **decision.to_dict(),
            "challenger": {"version": version, **evaluation},
            "champion": champion,
            "champion_after": (
                version
                if decision.promoted or decision.outcome == UNCHANGED
                else (champion or {}).get("version")
            ),
            "previous_champion": replaced,
            "lineage": lineage,
        }
        write_decision(report, out)
        run.log(tags=gate_tags)
        run.log_artifact(Path(evaluation_dir) / EVALUATION, "evaluation")
        run.log_artifact(out / DECISION_JSON, "gate")
        run.log_artifact(out / DECISION_MD, "gate")
    log.info("gate: %s", decision.reason)
    return report


def bundle_lineage(model_dir: str | Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Data and tokenizer digests of a bundle, after checking it matches the encoded data."""
    from parti_ops.components.versioning import files_digest
    from parti_ops.model.layout import (
        IMAGE_TOKENIZER,
        IMAGE_TOKENIZER_FILES,
        PARTI,
        TEXT_TOKENIZER,
        TEXT_TOKENIZER_FILES,
    )

    bundle = Path(model_dir)
    for part in (PARTI, TEXT_TOKENIZER, IMAGE_TOKENIZER):
        if not (bundle / part).is_dir():
            raise RegistryError(f"{bundle}: no {part}/ folder; give the output of `parti train`")
    tags = {"data_digest": str(manifest.get("data_digest") or "")}
    for part, files in (
        (TEXT_TOKENIZER, TEXT_TOKENIZER_FILES),
        (IMAGE_TOKENIZER, IMAGE_TOKENIZER_FILES),
    ):
        digest = files_digest(bundle / part, files)
        # The bundle carries copies of the tokenizers; other ones mean other data.
        if manifest.get(part, {}).get("digest") != digest:
            raise RegistryError(
                f"{bundle}/{part} is not the {part.replace('_', ' ')} the encoded data was made"
                " with; give the encoded folder this bundle was trained on"
            )
        tags[f"{part}.digest"] = digest
    return tags


def registration_digest(model_dir: str | Path, evaluation: dict[str, Any]) -> str:
    """sha256 over a bundle's model folders (weights, tokenizers) and its evaluation: the
    same bundle evaluated again, on other data or by another evaluator, is a new version."""
    from parti_ops.components.versioning import dvc_md5
    from parti_ops.model.layout import IMAGE_TOKENIZER, PARTI, TEXT_TOKENIZER

    parts = [f"{p}:{dvc_md5(Path(model_dir) / p)}" for p in (PARTI, TEXT_TOKENIZER,
                                                              IMAGE_TOKENIZER)]  # fmt: skip
    parts.append(json.dumps(evaluation, sort_keys=True, default=str))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _code_version(run) -> str:
    """The pipeline's commit when the parent run has one (a component image has no .git)."""
    from parti_ops.components.versioning import git_sha

    if run.parent is not None:
        tags = run.client.get_run(run.parent.run_id).data.tags
        if commit := tags.get("mlflow.source.git.commit"):
            return commit
    return git_sha()


def _log_model(config: Config, run_id: str, bundle: Path) -> str:
    """Log the bundle as a models-from-code pyfunc in run `run_id`; returns the new version."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_bundle(bundle, Path(tmp) / "bundle")
        uri = config.mlflow_tracking_uri()
        with _fluent_store(uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={"bundle": str(staged)},
                signature=_signature(config, staged),
                input_example=[EXAMPLE_PROMPT],
                # No scorer travels with the model, so one candidate per prompt.
                model_config={"sample": {**asdict(config.sample), "candidates": 1}},
                pip_requirements=_requirements(),
                registered_model_name=config.registry.model_name,
            )
    return str(info.registered_model_version)


def stage_bundle(bundle: Path, target: Path) -> Path:
    """Copy what a served model needs (the three model folders and the training report)."""
    from parti_ops.model.layout import IMAGE_TOKENIZER, PARTI, TEXT_TOKENIZER, TRAINING_REPORT

    target.mkdir(parents=True)
    for part in (PARTI, TEXT_TOKENIZER, IMAGE_TOKENIZER):
        shutil.copytree(bundle / part, target / part)
    if (bundle / TRAINING_REPORT).is_file():
        shutil.copy2(bundle / TRAINING_REPORT, target / TRAINING_REPORT)
    return target


def _signature(config: Config, bundle: Path):
    """Prompts (one unnamed string column, so a plain list is accepted) → uint8 images."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from parti_ops.model.layout import IMAGE_TOKENIZER

    body = json.loads((bundle / IMAGE_TOKENIZER / "config.json").read_text(encoding="utf-8"))
    size = int(body["image_size"])
    s = config.sample
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
        params=ParamSchema(
            [
                ParamSpec("seed", "long", s.seed),
                ParamSpec("guidance_scale", "double", s.guidance_scale),
                ParamSpec("temperature", "double", s.temperature),
                ParamSpec("top_k", "long", s.top_k),
                ParamSpec("top_p", "double", s.top_p),
            ]
        ),
    )


def _requirements() -> list[str]:
    """Pinned to this environment: parti-ops (the component image) and what loading needs."""
    from importlib import metadata

    names = ("parti-ops", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas")
    return [f"{n}=={metadata.version(n)}" for n in names]


@contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model needs it) at `uri` for the block only.

    `mlflow.set_tracking_uri` also writes the environment variables, which the config
    itself reads, so both are put back: a step must not leave the process elsewhere.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {n: os.environ.get(n) for n in names}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for n, value in env.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def _gate(
    client, config: Config, version: str, evaluation: dict, reevaluate
) -> tuple[Decision, dict | None]:
    """Decide on `version`; returns the decision and the champion it was compared with."""
    name = config.registry.model_name
    current = alias_version(client, name, CHAMPION)
    if current is None:
        return decide(evaluation, None, config.registry), None
    stored = stored_evaluation(client, name, current)
    champion = {"version": current, **stored, "reevaluated": False}
    if stored["key"] == evaluation["key"] or reevaluate is None:
        return decide(evaluation, stored, config.registry), champion
    log.info("champion %s was evaluated with another key: re-evaluating it", current)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = download_bundle(client, config, current, Path(tmp))
        fresh = check_evaluation(reevaluate(bundle), f"re-evaluation of {name} version {current}")
        fresh["image_tokenizer"] = stored["image_tokenizer"]
    champion = {"version": current, **fresh, "reevaluated": True, "stored": stored}
    return decide(evaluation, fresh, config.registry), champion
