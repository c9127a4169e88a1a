"""The parti-ops pipeline: wiring only. Each step is a component from `components/`.

    source ─► ingest ─► validate ─┬─► text tokenizer ──┬─► encode ─► train decoder ──┐
                                  ├─► image tokenizer ─┘                            ├─► evaluate ─►
                                  └─► scorer (after the text tokenizer) ─► FID refs ─┘   register
                                                                          + promotion gate (MLflow)
      ─► export the champion (ONNX, parity-checked) into a Triton repository ─► smoke test
         through tritonserver (HTTP + gRPC, attribute oracle)
    (the synthetic set is drawn by the ingest step when no source is given; before
    ingest, an uncached step takes the source's DVC digest, which keys ingest's cache;
    first, a `config` step hands each later step only the config sections it reads)

The same pipeline function runs on this machine with `kfp.local` and compiles to
YAML for Kubeflow Pipelines. One MLflow parent run spans it; the exit handler
closes that run as FAILED when any step fails.
"""

import contextlib
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from rich.console import Console

from parti_ops.components.kfp_components import (
    config_op,
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


def _ingest(config_json, source: str, data_digest: str):
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
        # Each cached step receives only the config sections it reads (components/
        # __init__.py STEP_SECTIONS), so its cache key changes only when they do.
        split = config_op(config_json=config_json)
        step = split.outputs
        digest, ingest = _ingest(step["ingest"], source, data_digest)
        ingest.after(start)
        validate = validate_op(config_json=step["validate"], canonical=ingest.outputs["canonical"])
        validated = validate.outputs["validated"]
        text = text_tokenizer_op(config_json=step["text_tokenizer"], validated=validated)
        image = image_tokenizer_op(config_json=step["image_tokenizer"], validated=validated)
        encode = encode_op(
            config_json=step["encode"],
            validated=validated,
            text_tokenizer=text.outputs["text_tokenizer"],
            image_tokenizer=image.outputs["image_tokenizer"],
        )
        trainer = train_op(
            config_json=step["train"],
            encoded=encode.outputs["encoded"],
            text_tokenizer=text.outputs["text_tokenizer"],
            image_tokenizer=image.outputs["image_tokenizer"],
        )
        if train.nodes > 1:  # the step submits a PyTorchJob: the GPUs are the job's
            kubernetes.mount_pvc(trainer, pvc_name=train.job_volume, mount_path=SHARED)
        elif train.accelerator:  # one GPU per torchrun process, on one node
            trainer.set_accelerator_type(train.accelerator).set_accelerator_limit(train.nproc)
        scorer = scorer_op(
            config_json=step["scorer"],
            validated=validated,
            text_tokenizer=text.outputs["text_tokenizer"],
        )
        references = fid_reference_op(
            config_json=step["fid_reference"], validated=validated, scorer=scorer.outputs["scorer"]
        )
        evaluate = evaluate_op(
            config_json=step["evaluate"],
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
        # Keyed by the champion's version: an unchanged champion is not exported again.
        export = export_op(config_json=step["export"], champion=register.outputs["champion"])
        smoke = smoke_test_op(
            config_json=config_json,
            repository=export.outputs["repository"],
            validated=validated,
        )
        smoke.set_caching_options(False)
        if config.serve.target == "gpu" and train.accelerator:  # TensorRT engines + parity
            export.set_accelerator_type(train.accelerator).set_accelerator_limit(1)
        for task, size in (
            (start, "small"), (split, "small"), (digest, "small"), (ingest, "data"),
            (validate, "data"), (text, "data"), (image, "data"), (encode, "data"),
            (trainer, "small" if train.nodes > 1 else "train"), (scorer, "data"),
            (references, "data"), (evaluate, "data"), (register, "small"), (export, "data"),
            (smoke, "data"),
        ):  # fmt: skip
            _limit(task, size)
        # Not register: a retry after a partial success would register a second version.
        for task in (digest, ingest, trainer, export, smoke):
            _retry(task)
        for task in (start, split, digest, ingest, validate, text, image, encode, trainer,
                     scorer, references, evaluate, register, export, smoke):  # fmt: skip
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
    run_dir: Path  # this run's folder; steps taken from the cache keep an earlier run's
    tracking_uri: str
    log: Path  # the steps' own output
    cached: tuple[str, ...] = ()  # tasks taken from the cache
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per task


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


def run_local(
    config: Config,
    source: str | Path | None = None,
    *,
    cache: bool = True,
    console: Console | None = None,
) -> LocalRun:
    """Run the pipeline on this machine with kfp.local's SubprocessRunner.

    Steps run as subprocesses of the current Python environment; artifacts go under
    `<work_dir>/kfp/<run>/<task>/<output>`, MLflow runs to the configured store, and the
    steps' own output to `<work_dir>/kfp/logs/<run>.log`. With `cache`, a step whose
    inputs, config sections and code are unchanged since an earlier run in the same
    `work_dir` is taken from that run (pipelines/local.py). `console` gets one line per
    step as it starts and ends. A failing step raises `StepFailed`.
    """
    from kfp import local

    from parti_ops.components.progress import LINES_ENV
    from parti_ops.pipelines.local import RunConsole, StepFailed, install_step_cache, observe_tasks

    root = (Path(config.work_dir) / "kfp").resolve()
    root.mkdir(parents=True, exist_ok=True)
    cache_root = root / ".cache"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=cache,
        cache_root=str(cache_root),
    )
    if cache:
        install_step_cache(cache_root)
    run_name = f"{PIPELINE_NAME}-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    log_path = root / "logs" / f"{run_name}.log"
    run_console = RunConsole(console, log_path)
    log.debug("running pipeline %s with kfp.local; artifacts under %s", run_name, root)
    if console is not None:
        console.print(f"log: {log_path}", highlight=False, soft_wrap=True)
        console.print(f"running {run_name}; artifacts under {root}", highlight=False)
    with contextlib.ExitStack() as environment:
        environment.enter_context(_step_environment(PIPELINE_RUN_ENV, uuid.uuid4().hex))
        environment.enter_context(_step_environment(LINES_ENV, "1"))
        environment.enter_context(warnings.catch_warnings())
        # kfp.local warns that the component image is not a "python" image; locally the
        # steps run in this environment, where parti-ops is installed.
        warnings.filterwarnings("ignore", message="You may be attemping to run a task")
        # CPU/memory limits, retries and accelerators are for the cluster; locally each
        # step is a process on this machine.
        warnings.filterwarnings("ignore", message=r"Task '.*': settings \[.*\] have no effect")
        # kfp.local's own messages (cache hits, workspace clean-up) go to the log only.
        root_logger = logging.getLogger()
        environment.callback(root_logger.setLevel, root_logger.level)
        root_logger.setLevel(logging.WARNING)
        environment.enter_context(run_console.running())
        environment.enter_context(observe_tasks(run_console))
        try:
            build_pipeline(config)(
                config_json=config.to_json(),
                source=str(Path(source).resolve()) if source else "",
                data_digest=dvc_md5(source) if source else "",
                code_version=git_sha(Path(__file__).parent),
                run_name=run_name,
            )
        except RuntimeError as err:
            if run_console.failed is None:
                raise
            raise StepFailed(run_console.failed, log_path, run_console.failed_tail) from err
    run_dir = root / run_console.run_folder

    # Pipeline outputs cannot leave an exit handler's scope, so the artifacts are found
    # where kfp.local writes them (a folder per run under the root), or, for a step taken
    # from the cache, where its earlier run wrote them.
    def output(task: str, name: str) -> Path:
        return Path(run_console.artifacts[task][name])

    validated = output("validate-op", "validated")
    return LocalRun(
        canonical=output("ingest-op", "canonical"),
        accepted=validated / "accepted",
        quarantine=validated / "quarantine.jsonl",
        data_docs=validated / "data_docs" / "index.html",
        report=validated / "report.html",
        text_tokenizer=output("text-tokenizer-op", "text_tokenizer"),
        image_tokenizer=output("image-tokenizer-op", "image_tokenizer"),
        encoded=output("encode-op", "encoded"),
        model=output("train-op", "model"),
        scorer=output("scorer-op", "scorer"),
        evaluation=output("evaluate-op", "evaluation"),
        decision=output("register-op", "decision"),
        repository=output("export-op", "repository"),
        smoke=output("smoke-test-op", "smoke"),
        run_dir=run_dir,
        tracking_uri=config.mlflow_tracking_uri(),
        log=log_path,
        cached=tuple(run_console.cached),
        seconds=dict(run_console.seconds),
    )
