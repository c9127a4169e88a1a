"""The kfp components: thin wrappers that call each step's `*_step` function.

They live apart from the step modules because kfp's component runtime has no
`dsl.component` (it is left out when `_KFP_RUNTIME` is set), so a module that
defines components at import time cannot be imported inside a running component.
Each body imports what it needs, as kfp requires of lightweight components.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from parti_ops.components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def start_run_op(config_json: str, run_name: str, code_version: str, pipeline_run_id: str) -> str:
    """Open the MLflow parent run of this pipeline run; returns its id."""
    from parti_ops.components.tracking import start_pipeline_run
    from parti_ops.model.config import Config

    return start_pipeline_run(
        Config.from_json(config_json),
        run_name=run_name,
        pipeline_run_id=pipeline_run_id,
        code_version=code_version,
    )


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def end_run_op(config_json: str, pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Close the parent run as FINISHED or FAILED; runs even when a step failed (exit handler)."""
    from parti_ops.components.tracking import end_pipeline_run
    from parti_ops.model.config import Config

    failed = status.state != "SUCCEEDED"
    end_pipeline_run(Config.from_json(config_json), pipeline_run_id, failed=failed)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def ingest_op(
    config_json: str,
    parent_run_id: str,
    source: str,
    raw: Output[Dataset],
    canonical: Output[Dataset],
) -> str:
    """Read image–caption data into canonical shards; returns the source's DVC digest.

    `source` is a path the step can read (a mounted volume, or the /gcs, /s3 and /minio
    mounts of Kubeflow Pipelines) holding an image folder, Parquet or WebDataset shards.
    Empty: the deterministic synthetic set is drawn into `raw` first and ingested.
    (kfp.local cannot select between artifacts of two branches, dsl.OneOf, so the
    choice is made here rather than with dsl.If in the pipeline.)
    """
    from parti_ops.components.ingest import IngestError, ingest_step
    from parti_ops.components.synth import synth_step

    if not source:
        synth_step(config_json, parent_run_id, raw.path)
        source = raw.path
    raw.metadata["source"] = source
    try:
        manifest = ingest_step(config_json, parent_run_id, source, canonical.path)
    except IngestError as err:
        raise SystemExit(f"ingest failed: {err}") from None  # one clear line, no traceback
    canonical.metadata.update(rows=manifest["rows"], data_digest=manifest["data_digest"])
    return manifest["data_digest"]


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def validate_op(
    config_json: str,
    parent_run_id: str,
    canonical: Input[Dataset],
    validated: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
):
    """Great Expectations over every shard: accepted shards, quarantine, Data Docs, report.

    Fails the step when the quarantine or split-balance gate fails.
    """
    import shutil
    from pathlib import Path

    from parti_ops.components.validate import DataValidationError, validate_step

    try:
        result = validate_step(config_json, parent_run_id, canonical.path, validated.path)
    except DataValidationError as err:
        raise SystemExit(str(err)) from None  # one clear line, no traceback
    shutil.copyfile(Path(validated.path) / "report.html", report.path)
    for key in ("rows_in", "accepted", "quarantined", "quarantine_fraction"):
        metrics.log_metric(key, result[key])
    validated.metadata.update(accepted=result["accepted"], data_digest=result["data_digest"])
