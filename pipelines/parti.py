"""The parti-ops pipeline: wiring only. Each step is a component from `components/`.

    source ─► ingest ─► validate ─┬─► text tokenizer ──┬─► encode ─► train decoder ──┐
                                  ├─► image tokenizer ─┘                            ├─► evaluate ─►
                                  └─► scorer (after the text tokenizer) ─► FID refs ─┘   register
                                                                          + promotion gate (MLflow)
      ─► export the champion (ONNX, parity-checked) into a Triton repository ─► smoke test
         through tritonserver (HTTP + gRPC, attribute oracle)
    (the synthetic set is drawn by the ingest step when no source is given; before
    ingest, an uncached step takes the source's DVC digest, which keys ingest's cache)

The same pipeline function runs on this machine with `kfp.local` and compiles to
YAML for Kubeflow Pipelines. One MLflow parent run spans it; the exit handler
closes that run as FAILED when any step fails.
"""

import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from parti_ops.components.ops import (
    data_digest_op,
    encode_op,
    end_run_op,
    evaluate_op,
    export_op,
    fid_reference_op,
    image_tokenizer_op,
    ingest_op,
    register_op,
    scorer_op,
    smoke_test_op,
    start_run_op,
    text_tokenizer_op,
    train_op,
    validate_op,
)
from parti_ops.components.tracking import PIPELINE_RUN_ENV
from parti_ops.components.versioning import dvc_md5, git_sha
from parti_ops.deploy.training_job import SHARED
from parti_ops.model.config import Config

log = logging.getLogger(__name__)

PIPELINE_NAME = "parti-ops"
COMPILED = Path(__file__).with_name("parti_pipeline.yaml")


def build_pipeline(config: Config) -> Callable[..., None]:
    """The pipeline for a config: its JSON is the default parameter, and its resources
    (the training step's accelerator) are fixed in the compiled YAML."""

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Train, evaluate, promote and serve a Parti-style text-to-image model.",
    )
    def parti_pipeline(
        config_json: str = config.to_json(),
        source: str = "",
        data_digest: str = "",
        code_version: str = "unknown",
        run_name: str = PIPELINE_NAME,
    ) -> None:
        """The whole pipeline.

        Args:
            config_json: the resolved `Config` as JSON (`parti config show --json`).
            source: a data set path or object-store URI; empty draws the synthetic set.
            data_digest: pins the run to this DVC md5 of the source (`data.dvc`): other
                data fail its first step. Empty follows the data: that step computes the
                digest each run and ingest's cache is keyed by it, so changed data at the
                same path re-run the pipeline.
            code_version: the git SHA (or image digest) recorded on the MLflow runs.
            run_name: the MLflow parent run's name.
        """
        _steps(config_json, source, data_digest, code_version, run_name, config)

    return parti_pipeline


# CPU and memory limits per step on a cluster; kfp.local runs steps as plain processes.
RESOURCES = {
    "small": ("2", "4G"),  # bookkeeping: tracking, registry; the data digest (one stream)
    "data": ("4", "16G"),  # ingest, validate, tokenizers, encode, evaluate, export
    "train": ("8", "32G"),
}


def _limit(task, size: str):
    cpu, memory = RESOURCES[size]
    return task.set_cpu_limit(cpu).set_memory_limit(memory)


def _retry(task):
    """Steps that touch object storage, the tracking server or preemptible nodes retry
    with back-off; a retried training step resumes from its last checkpoint."""
    return task.set_retry(
        num_retries=3, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="1800s"
    )


def _knows_its_run(task):
    """Give the step the kfp run id in its environment, from its pod's label (the label
    KFP's own launcher reads the run id from); kfp.local ignores it and `run_local` sets
    the variable itself."""
    return kubernetes.use_field_path_as_env(
        task, PIPELINE_RUN_ENV, "metadata.labels['pipeline/runid']"
    )


def _ingest(config_json: str, source: str, data_digest: str):
    """The digest step and the ingest step it keys; returns both tasks.

    Ingest's inputs (config, path, pin) can all stay the same while the data at the path
    change, so a cached ingest would hand every later run the old data. The digest step
    is never cached and reads the data each run; its output, the data's DVC md5, is
    ingest's `data_digest` input, and with it part of ingest's cache key (and so, through
    ingest's new artifacts, of every later step's).
    """
    digest = data_digest_op(source=source, data_digest=data_digest)
    digest.set_caching_options(False)
    ingest = ingest_op(config_json=config_json, source=source, data_digest=digest.output)
    return digest, ingest


def _steps(
    config_json: str,
    source: str,
    data_digest: str,
    code_version: str,
    run_name: str,
    config: Config,
) -> None:
    train = config.train
    # The exit task may not take inputs from other tasks, so it finds the parent run
    # through the kfp run id, as every step does.
    end = end_run_op(config_json=config_json, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    end.set_caching_options(False)
    with dsl.ExitHandler(end, name="tracked-run"):
        start = start_run_op(
            config_json=config_json,
            run_name=run_name,
            code_version=code_version,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        start.set_caching_options(False)  # a fresh parent run every time
        # Steps find that parent run themselves (components/tracking.py,
        # pipeline_parent_run), so that no step input changes from run to run: each step's
        # cache key is its config, its data digest and the artifacts it reads.
        digest, ingest = _ingest(config_json, source, data_digest)
        ingest.after(start)
        validate = validate_op(config_json=config_json, canonical=ingest.outputs["canonical"])
        validated = validate.outputs["validated"]
        text = text_tokenizer_op(config_json=config_json, validated=validated)
        image = image_tokenizer_op(config_json=config_json, validated=validated)
        encode = encode_op(
            config_json=config_json,
            validated=validated,
            text_tokenizer=text.outputs["text_tokenizer"],
            image_tokenizer=image.outputs["image_tokenizer"],
        )
        trainer = train_op(
            config_json=config_json,
            encoded=encode.outputs["encoded"],
            text_tokenizer=text.outputs["text_tokenizer"],
            image_tokenizer=image.outputs["image_tokenizer"],
        )
        if train.nodes > 1:  # the step submits a PyTorchJob: the GPUs are the job's
            kubernetes.mount_pvc(trainer, pvc_name=train.job_volume, mount_path=SHARED)
        elif train.accelerator:  # one GPU per torchrun process, on one node
            trainer.set_accelerator_type(train.accelerator).set_accelerator_limit(train.nproc)
        scorer = scorer_op(
            config_json=config_json,
            validated=validated,
            text_tokenizer=text.outputs["text_tokenizer"],
        )
        references = fid_reference_op(
            config_json=config_json, validated=validated, scorer=scorer.outputs["scorer"]
        )
        evaluate = evaluate_op(
            config_json=config_json,
            model=trainer.outputs["model"],
            validated=validated,
            scorer=scorer.outputs["scorer"],
            references=references.outputs["references"],
        )
        register = register_op(
            config_json=config_json,
            model=trainer.outputs["model"],
            evaluation=evaluate.outputs["evaluation"],
            encoded=encode.outputs["encoded"],
            validated=validated,
            scorer=scorer.outputs["scorer"],
            references=references.outputs["references"],
        )
        register.set_caching_options(False)  # the registry's state is an input kfp cannot see
        export = export_op(
            config_json=config_json,
            decision=register.outputs["decision"],
        )
        export.set_caching_options(False)  # exports whatever the champion alias now names
        smoke = smoke_test_op(
            config_json=config_json,
            repository=export.outputs["repository"],
            validated=validated,
        )
        smoke.set_caching_options(False)
        if config.serve.target == "gpu" and train.accelerator:  # TensorRT engines + parity
            export.set_accelerator_type(train.accelerator).set_accelerator_limit(1)
        for task, size in (
            (start, "small"), (digest, "small"), (ingest, "data"), (validate, "data"),
            (text, "data"), (image, "data"), (encode, "data"),
            (trainer, "small" if train.nodes > 1 else "train"), (scorer, "data"),
            (references, "data"), (evaluate, "data"), (register, "small"), (export, "data"),
            (smoke, "data"),
        ):  # fmt: skip
            _limit(task, size)
        # Not register: a retry after a partial success would register a second version.
        for task in (digest, ingest, trainer, export, smoke):
            _retry(task)
        for task in (start, digest, ingest, validate, text, image, encode, trainer, scorer,
                     references, evaluate, register, export, smoke):  # fmt: skip
            _knows_its_run(task)
    _knows_its_run(end)


def compile_pipeline(path: str | Path = COMPILED, config: Config | None = None) -> Path:
    """Write the pipeline for `config` (default: the tiny preset) as Kubeflow Pipelines YAML."""
    pipeline = build_pipeline(config or Config.from_name("tiny"))
    compiler.Compiler().compile(pipeline, package_path=str(path))
    return Path(path)


@dataclass(frozen=True)
class LocalRun:
    """Where a local pipeline run put its outputs."""

    canonical: Path
    accepted: Path
    quarantine: Path
    data_docs: Path
    report: Path
    text_tokenizer: Path
    image_tokenizer: Path
    encoded: Path
    model: Path
    scorer: Path
    evaluation: Path
    decision: Path
    repository: Path
    smoke: Path
    run_dir: Path
    tracking_uri: str


@contextmanager
def _step_environment(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment, which the steps' processes inherit."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def run_local(config: Config, source: str | Path | None = None) -> LocalRun:
    """Run the pipeline on this machine with kfp.local's SubprocessRunner.

    Steps run as subprocesses of the current Python environment; artifacts go under
    `<work_dir>/kfp/<run>/<task>/<output>`, MLflow runs to the configured store.
    """
    from kfp import local

    root = (Path(config.work_dir) / "kfp").resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
    )
    run_name = f"{PIPELINE_NAME}-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    before = set(root.iterdir())
    log.info("running pipeline %s with kfp.local; artifacts under %s", run_name, root)
    with _step_environment(PIPELINE_RUN_ENV, uuid.uuid4().hex), warnings.catch_warnings():
        # kfp.local warns that the component image is not a "python" image; locally the
        # steps run in this environment, where parti-ops is installed.
        warnings.filterwarnings("ignore", message="You may be attemping to run a task")
        # CPU/memory limits, retries and accelerators are for the cluster; locally each
        # step is a process on this machine.
        warnings.filterwarnings("ignore", message=r"Task '.*': settings \[.*\] have no effect")
        build_pipeline(config)(
            config_json=config.to_json(),
            source=str(Path(source).resolve()) if source else "",
            data_digest=dvc_md5(source) if source else "",
            code_version=git_sha(Path(__file__).parent),
            run_name=run_name,
        )
    # Pipeline outputs cannot leave an exit handler's scope, so the artifacts are
    # found where kfp.local writes them: a new folder per run under the root.
    (run_dir,) = set(root.iterdir()) - before
    validated = run_dir / "validate-op" / "validated"
    return LocalRun(
        canonical=run_dir / "ingest-op" / "canonical",
        accepted=validated / "accepted",
        quarantine=validated / "quarantine.jsonl",
        data_docs=validated / "data_docs" / "index.html",
        report=validated / "report.html",
        text_tokenizer=run_dir / "text-tokenizer-op" / "text_tokenizer",
        image_tokenizer=run_dir / "image-tokenizer-op" / "image_tokenizer",
        encoded=run_dir / "encode-op" / "encoded",
        model=run_dir / "train-op" / "model",
        scorer=run_dir / "scorer-op" / "scorer",
        evaluation=run_dir / "evaluate-op" / "evaluation",
        decision=run_dir / "register-op" / "decision",
        repository=run_dir / "export-op" / "repository",
        smoke=run_dir / "smoke-test-op" / "smoke",
        run_dir=run_dir,
        tracking_uri=config.mlflow_tracking_uri(),
    )
