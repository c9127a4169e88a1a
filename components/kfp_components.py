"""The kfp components: thin wrappers that call each step's `*_step` function.

They live apart from the step modules because kfp's component runtime has no
`dsl.component` (it is left out when `_KFP_RUNTIME` is set), so a module that
defines components at import time cannot be imported inside a running component.
Each body imports what it needs, as kfp requires of lightweight components.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from parti_ops.components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def start_run_op(config_json: str, run_name: str, code_version: str, pipeline_run_id: str) -> str:
    """Open the MLflow parent run of this pipeline run; returns its id."""
    from parti_ops.components.tracking import current_pipeline_run, start_pipeline_run
    from parti_ops.model.config import Config

    return start_pipeline_run(
        Config.from_json(config_json),
        run_name=run_name,
        pipeline_run_id=current_pipeline_run(default=pipeline_run_id),
        code_version=code_version,
    )


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def end_run_op(config_json: str, pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Close the parent run as FINISHED or FAILED; runs even when a step failed (exit handler)."""
    from parti_ops.components.tracking import current_pipeline_run, end_pipeline_run
    from parti_ops.model.config import Config

    failed = status.state != "SUCCEEDED"
    run_id = current_pipeline_run(default=pipeline_run_id)
    end_pipeline_run(Config.from_json(config_json), run_id, failed=failed)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def config_op(config_json: str) -> NamedTuple(
    "StepConfigs",
    [
        ("ingest", str), ("validate", str), ("text_tokenizer", str), ("image_tokenizer", str),
        ("encode", str), ("train", str), ("scorer", str), ("fid_reference", str),
        ("evaluate", str), ("export", str),
    ],
):  # fmt: skip
    """Each cached step's config: the sections it reads (`STEP_SECTIONS`, one output per
    step, in its order) and no others, so that a step's cache key changes only when they do."""
    from collections import namedtuple

    from parti_ops.components import STEP_SECTIONS
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    steps = namedtuple("StepConfigs", list(STEP_SECTIONS))
    return steps(*(config.sections_json(sections) for sections in STEP_SECTIONS.values()))


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def data_digest_op(source: str, data_digest: str) -> str:
    """The DVC md5 of the data at `source` now; the pipeline never caches this step.

    Its output is an input of the ingest step, so ingest's cache key changes whenever the
    data at the same path change: a recurring run re-ingests new data and takes
    unchanged data from the cache. `data_digest`, when given, pins the run: data with
    another digest fail here, before any work. Empty `source` (the synthetic set, drawn
    from the config, which keys the cache already): returns `data_digest` as given.
    """
    from pathlib import Path

    from parti_ops.components.versioning import dvc_md5

    if not source:
        return data_digest
    if not Path(source).exists():
        raise SystemExit(f"data digest: {source}: no such file or folder")
    digest = dvc_md5(source)
    if data_digest and data_digest != digest:
        raise SystemExit(
            f"data digest: {source} has DVC digest {digest}, but the run was pinned to "
            f"{data_digest}; the data changed since: start the run again"
        )
    return digest


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def ingest_op(
    config_json: str,
    source: str,
    data_digest: str,
    raw: Output[Dataset],
    canonical: Output[Dataset],
) -> str:
    """Read image–caption data into canonical shards; returns the source's DVC digest.

    `source` is a path the step can read (a mounted volume, or the /gcs, /s3 and /minio
    mounts of Kubeflow Pipelines) holding an image folder, Parquet or WebDataset shards.
    `data_digest`, when given, is the source's DVC md5: it keys the step's cache, and
    data that no longer has it fails the step.
    Empty: the deterministic synthetic set is drawn into `raw` first and ingested.
    (kfp.local cannot select between artifacts of two branches, dsl.OneOf, so the
    choice is made here rather than with dsl.If in the pipeline.)
    """
    from pathlib import Path

    from parti_ops.components.ingest import IngestError, ingest_step
    from parti_ops.components.synth import synth_step
    from parti_ops.components.tracking import pipeline_parent_run
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    if not source:
        synth_step(config, parent_run_id, raw.path)
        source = raw.path
    else:  # an output never written makes kfp.local's cache treat the step as a miss
        Path(raw.path).mkdir(parents=True, exist_ok=True)
    raw.metadata["source"] = source
    try:
        manifest = ingest_step(config, parent_run_id, source, canonical.path)
    except IngestError as err:
        raise SystemExit(f"ingest failed: {err}") from None  # one clear line, no traceback
    if data_digest and data_digest != manifest["data_digest"]:
        raise SystemExit(
            f"ingest failed: {source} has DVC digest {manifest['data_digest']}, but the run "
            f"was started for {data_digest}; the data changed since: start the run again"
        )
    canonical.metadata.update(rows=manifest["rows"], data_digest=manifest["data_digest"])
    return manifest["data_digest"]


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def validate_op(
    config_json: str,
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

    from parti_ops.components.tracking import keep_metrics, pipeline_parent_run
    from parti_ops.components.validate import DataValidationError, validate_step
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    try:
        result = validate_step(config, parent_run_id, canonical.path, validated.path)
    except DataValidationError as err:
        raise SystemExit(str(err)) from None  # one clear line, no traceback
    shutil.copyfile(Path(validated.path) / "report.html", report.path)
    for key in ("rows_in", "accepted", "quarantined", "quarantine_fraction"):
        metrics.log_metric(key, result[key])
    keep_metrics(metrics)
    validated.metadata.update(accepted=result["accepted"], data_digest=result["data_digest"])


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def text_tokenizer_op(
    config_json: str,
    validated: Input[Dataset],
    text_tokenizer: Output[Model],
    metrics: Output[Metrics],
):
    """Train the caption tokenizer (a transformers fast tokenizer folder) on the train captions."""
    from pathlib import Path

    from parti_ops.components.tokenizers import TokenizerError, text_tokenizer_step
    from parti_ops.components.tracking import keep_metrics, pipeline_parent_run
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    accepted = str(Path(validated.path) / "accepted")
    try:
        report = text_tokenizer_step(config, parent_run_id, accepted, text_tokenizer.path)
    except TokenizerError as err:
        raise SystemExit(f"text tokenizer: {err}") from None
    for key in ("vocab_size", "truncated", "truncated_fraction", "unk_fraction"):
        metrics.log_metric(key, report[key])
    keep_metrics(metrics)
    text_tokenizer.metadata.update(digest=report["digest"], vocab_size=report["vocab_size"])


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def image_tokenizer_op(
    config_json: str,
    validated: Input[Dataset],
    image_tokenizer: Output[Model],
    metrics: Output[Metrics],
    reconstructions: Output[HTML],
):
    """Train the VQGAN image tokenizer; score it on the held-out split.

    A retry of this task resumes from the checkpoints its earlier attempt left in the
    output folder (on a cluster: a preempted pod, exit code 143).
    """
    import base64
    from pathlib import Path

    from parti_ops.components.tokenizers import GRID, TokenizerError, image_tokenizer_step
    from parti_ops.components.tracking import keep_metrics, pipeline_parent_run
    from parti_ops.model.checkpoint import CheckpointError, list_checkpoints
    from parti_ops.model.config import Config
    from parti_ops.model.layout import CHECKPOINTS

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    out = Path(image_tokenizer.path)
    resume = bool(list_checkpoints(out / CHECKPOINTS))
    accepted = str(Path(validated.path) / "accepted")
    try:
        result = image_tokenizer_step(config, parent_run_id, accepted, str(out), resume=resume)
    except (CheckpointError, TokenizerError) as err:
        raise SystemExit(f"image tokenizer: {err}") from None
    scores = {k: v for k, v in result.items() if isinstance(v, float)}
    for key, value in scores.items():
        metrics.log_metric(key, value)
    keep_metrics(metrics)
    image_tokenizer.metadata.update(digest=result["digest"], heldout_split=result["split"])
    png = base64.b64encode((out / GRID).read_bytes()).decode()
    rows = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in scores.items())
    Path(reconstructions.path).write_text(
        f"<h3>Held-out reconstructions ({result['split']}): original | reconstruction</h3>"
        f'<img src="data:image/png;base64,{png}" style="image-rendering:pixelated;width:100%">'
        f"<table>{rows}</table>",
        encoding="utf-8",
    )


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def encode_op(
    config_json: str,
    validated: Input[Dataset],
    text_tokenizer: Input[Model],
    image_tokenizer: Input[Model],
    encoded: Output[Dataset],
):
    """Turn every accepted image into its code grid and every caption into token ids."""
    from pathlib import Path

    from parti_ops.components.encode import encode_step
    from parti_ops.components.loaders import EncodedFormatError
    from parti_ops.components.tracking import pipeline_parent_run
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    accepted = str(Path(validated.path) / "accepted")
    try:
        manifest = encode_step(
            config,
            parent_run_id,
            accepted,
            text_tokenizer.path,
            image_tokenizer.path,
            encoded.path,
        )
    except EncodedFormatError as err:
        raise SystemExit(f"encode: {err}") from None
    encoded.metadata.update(
        rows=manifest["rows"],
        data_digest=manifest["data_digest"],
        text_tokenizer_digest=manifest["text_tokenizer"]["digest"],
        image_tokenizer_digest=manifest["image_tokenizer"]["digest"],
    )


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train_op(
    config_json: str,
    encoded: Input[Dataset],
    text_tokenizer: Input[Model],
    image_tokenizer: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the Parti decoder (torchrun with `train.nproc` processes); write the bundle.

    A retry of this task resumes from the checkpoints its earlier attempt left in the
    output folder (on a cluster: a preempted pod, exit code 143). With `train.nodes` > 1
    it submits a PyTorchJob instead and waits for it (components/train_job.py); a retry
    follows the same job.
    """
    from pathlib import Path

    from parti_ops.components.loaders import EncodedFormatError
    from parti_ops.components.tracking import keep_metrics, pipeline_parent_run
    from parti_ops.components.train_decoder import TrainError, train_step
    from parti_ops.components.train_job import train_job_step
    from parti_ops.deploy.training_job import TrainJobError
    from parti_ops.model.checkpoint import CheckpointError, list_checkpoints
    from parti_ops.model.config import Config
    from parti_ops.model.layout import CHECKPOINTS

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)
    inputs = (encoded.path, text_tokenizer.path, image_tokenizer.path, model.path)
    try:
        if config.train.nodes > 1:
            report = train_job_step(config, parent_run_id, *inputs)
        else:
            resume = bool(list_checkpoints(Path(model.path) / CHECKPOINTS))
            report = train_step(config, parent_run_id, *inputs, resume=resume)
    except (CheckpointError, EncodedFormatError, TrainError, TrainJobError) as err:
        raise SystemExit(f"train: {err}") from None
    for key, value in report.items():
        if isinstance(value, int | float):
            metrics.log_metric(key, value)
    keep_metrics(metrics)
    model.metadata.update(
        parameters=report["parameters"],
        data_digest=encoded.metadata.get("data_digest", ""),
        text_tokenizer_digest=encoded.metadata.get("text_tokenizer_digest", ""),
        image_tokenizer_digest=encoded.metadata.get("image_tokenizer_digest", ""),
    )


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def scorer_op(
    config_json: str,
    validated: Input[Dataset],
    text_tokenizer: Input[Model],
    scorer: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Train the CLIP-style scorer on the accepted train pairs; returns its version.

    With `scorer.checkpoint_every` > 0, a retry of this task resumes from the checkpoints
    its earlier attempt left in the output folder.
    """
    from pathlib import Path

    from parti_ops.components.tracking import keep_metrics, pipeline_parent_run
    from parti_ops.components.train_scorer import scorer_step
    from parti_ops.model.checkpoint import list_checkpoints
    from parti_ops.model.config import Config
    from parti_ops.model.layout import CHECKPOINTS

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    accepted = str(Path(validated.path) / "accepted")
    resume = bool(list_checkpoints(Path(scorer.path) / CHECKPOINTS))
    try:
        report = scorer_step(
            config, parent_run_id, accepted, text_tokenizer.path, scorer.path, resume=resume
        )
    except ValueError as err:
        raise SystemExit(f"scorer: {err}") from None
    for key, value in report.items():
        if isinstance(value, float):
            metrics.log_metric(key, value)
    keep_metrics(metrics)
    scorer.metadata.update(version=report["version"])
    return report["version"]


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def fid_reference_op(
    config_json: str, validated: Input[Dataset], scorer: Input[Model], references: Output[Dataset]
):
    """FID statistics of the real held-out images under the scorer's features.

    Its inputs are the data and the scorer only, so kfp's cache reuses it across runs
    (and candidate models) until either changes.
    """
    from pathlib import Path

    from parti_ops.components.evaluate import FeatureModel, fid_references
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    accepted = Path(validated.path) / "accepted"
    features = FeatureModel.load(config.scorer.clip_model or scorer.path)
    path = fid_references(accepted, features, references.path, config.evaluate.fid_images)
    references.metadata.update(file=path.name, feature_model=features.version)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate_op(
    config_json: str,
    model: Input[Model],
    validated: Input[Dataset],
    scorer: Input[Model],
    references: Input[Dataset],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """Held-out bits, prompt following, CLIP score, FID (and the oracle's fidelity on scenes)."""
    import shutil
    from pathlib import Path

    from parti_ops.components.evaluate import REPORT, evaluate_step
    from parti_ops.components.tracking import keep_metrics, pipeline_parent_run
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    accepted = str(Path(validated.path) / "accepted")
    try:
        result = evaluate_step(
            config,
            parent_run_id,
            model.path,
            accepted,
            scorer.path,
            references.path,
            evaluation.path,
        )
    except ValueError as err:
        raise SystemExit(f"evaluate: {err}") from None
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)
    keep_metrics(metrics)
    evaluation.metadata.update(**result["key"])
    shutil.copyfile(Path(evaluation.path) / REPORT, report.path)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def register_op(
    config_json: str,
    model: Input[Model],
    evaluation: Input[Dataset],
    encoded: Input[Dataset],
    validated: Input[Dataset],
    scorer: Input[Model],
    references: Input[Dataset],
    decision: Output[Markdown],
) -> NamedTuple("RegisterOutputs", [("promoted", bool), ("champion", str)]):
    """Register the bundle in MLflow as `challenger` and run the promotion gate.

    A champion evaluated on other data or by another evaluator is re-evaluated here with
    this run's evaluator first. The same bundle with the same evaluation (training and
    evaluation taken from the cache) is not registered twice. Returns whether the
    challenger became champion and the champion's version after the gate; a rejection
    is a decision, not a failure.
    """
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from parti_ops.components.register import register_step
    from parti_ops.components.tracking import pipeline_parent_run
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)
    accepted = Path(validated.path) / "accepted"
    work = Path(tempfile.mkdtemp(prefix="register-"))

    def reevaluate(bundle: Path) -> dict:
        from parti_ops.components.evaluate import evaluate_bundle  # only for an older champion

        return evaluate_bundle(
            config, bundle, accepted, scorer.path, work / "champion", references.path
        )

    try:
        report = register_step(
            config,
            parent_run_id,
            model.path,
            evaluation.path,
            encoded.path,
            str(work / "decision"),
            reevaluate=reevaluate,
        )
    except ValueError as err:
        raise SystemExit(f"register: {err}") from None
    shutil.copyfile(work / "decision" / "decision.md", decision.path)
    promoted, champion = bool(report.get("promoted")), str(report.get("champion_after") or "")
    decision.metadata.update(
        version=str(report.get("version", "")),
        promoted=promoted,
        outcome=report["outcome"],
        champion=champion,
    )
    return namedtuple("RegisterOutputs", ["promoted", "champion"])(promoted, champion)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def export_op(
    config_json: str,
    champion: str,
    repository: Output[Model],
) -> str:
    """Export the champion version to ONNX (parity-checked) into a Triton repository.

    Runs after the gate, whichever way it went, on the version it left as `champion`
    (empty: whatever the registry's alias names); returns the served version. Its cache
    key is that version, so an unchanged champion is not exported again.
    """
    from parti_ops.components.export import ExportStepError, export_step
    from parti_ops.components.tracking import pipeline_parent_run
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    try:
        report = export_step(config, parent_run_id, repository.path, version=champion or None)
    except (ExportStepError, ValueError) as err:
        raise SystemExit(f"export: {err}") from None
    repository.metadata.update(version=report["registry_version"], precision=report["precision"])
    return report["registry_version"]


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def smoke_test_op(
    config_json: str,
    repository: Input[Model],
    validated: Input[Dataset],
    smoke: Output[Dataset],
    metrics: Output[Metrics],
):
    """Start tritonserver on the repository and generate a held-out caption over HTTP and gRPC."""
    from pathlib import Path

    from parti_ops.components.serve import smoke_test_step
    from parti_ops.components.tracking import keep_metrics, pipeline_parent_run
    from parti_ops.model.config import Config

    config = Config.from_json(config_json)
    parent_run_id = pipeline_parent_run(config)

    accepted = str(Path(validated.path) / "accepted")
    try:
        report = smoke_test_step(config, parent_run_id, repository.path, accepted, smoke.path)
    except ValueError as err:
        raise SystemExit(f"smoke-test: {err}") from None
    for name, ok in report["checks"].items():
        metrics.log_metric(f"oracle_{name}", float(ok))
    metrics.log_metric("latency_s", report["latency_s"])
    keep_metrics(metrics)
