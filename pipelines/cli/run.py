"""`parti run | retrain` and `parti pipeline`: the whole pipeline, here or on Kubeflow."""

from pathlib import Path
from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import ConfigFile, Overrides, Preset, load_config
from parti_ops.pipelines.cli.output import clear_errors, console, print_error, print_paths

pipeline_app = typer.Typer(help="The Kubeflow pipeline.")


@clear_errors
def run(
    source: Annotated[
        Path | None, typer.Option(help="Data set to ingest; default: the synthetic set.")
    ] = None,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Take steps whose inputs, config and code are unchanged from an earlier run"
            " in the same work_dir; --no-cache runs every step.",
        ),
    ] = True,
) -> None:
    """Run the whole pipeline on this machine (kfp.local) and print where everything went."""
    import time

    from parti_ops.components.serve import SMOKE_PNG, read_smoke_report
    from parti_ops.pipelines.local import StepFailed
    from parti_ops.pipelines.pipeline import run_local

    cfg = load_config(preset, config, overrides)
    started = time.perf_counter()
    try:
        result = run_local(cfg, source, cache=cache, console=console)
    except StepFailed as err:  # its report carries the step's log lines, after this label
        print_error("pipeline failed:", err)
        raise typer.Exit(1) from None
    console.print(
        f"pipeline finished in {time.perf_counter() - started:.0f} s"
        + (f" ({len(result.cached)} steps from the cache)" if result.cached else ""),
        highlight=False,
    )
    print_paths(
        "pipeline finished",
        {
            "canonical data": result.canonical,
            "accepted data": result.accepted,
            "quarantine": result.quarantine,
            "validation report": result.report,
            "Data Docs": result.data_docs,
            "text tokenizer": result.text_tokenizer,
            "image tokenizer": result.image_tokenizer,
            "encoded data": result.encoded,
            "model bundle": result.model,
            "scorer": result.scorer,
            "evaluation": result.evaluation,
            "promotion decision": result.decision,
            "Triton repository": result.repository,
            "MLflow store": result.tracking_uri,
        },
    )
    smoke = read_smoke_report(result.smoke)
    http, grpc = smoke["endpoints"]["http"], smoke["endpoints"]["grpc"]
    print_paths(
        "served through tritonserver (smoke test; stopped after it)",
        {
            "endpoint": f"{http}/v2/models/parti (and {grpc})",
            "prompt": smoke["prompt"],
            "image": result.smoke / SMOKE_PNG,
            **(
                {"oracle": ", ".join(k for k, ok in smoke["checks"].items() if ok) or "none"}
                if smoke["checks"]  # only prompts with a synthetic scene are read back
                else {}
            ),
            "serve again": f"parti serve --repository {result.repository}",
        },
    )


@clear_errors
def retrain(
    source: Annotated[
        Path | None, typer.Option(help="Data set to ingest; default: the synthetic set.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force/--no-force",
            help="Run the pipeline even on data already trained on.",
            envvar="PARTI_RETRAIN_FORCE",
        ),
    ] = False,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Run the pipeline only on data not trained on yet (by their DVC digest).

    Data whose digest is the champion's, or that of the newest registered version (trained
    on and judged by the promotion gate, even if the gate rejected it), are skipped: says
    so and exits 0 in seconds. Suitable for cron or a Kubernetes CronJob (deploy/k8s); the
    promotion gate decides whether a retrained model serves.
    """
    from parti_ops.pipelines.local import StepFailed
    from parti_ops.pipelines.recurring import retrain as run_retrain

    cfg = load_config(preset, config, overrides)
    try:
        report = run_retrain(cfg, source, force=force, console=console)
    except StepFailed as err:
        print_error("pipeline failed:", err)
        raise typer.Exit(1) from None
    if not report["retrained"]:
        digest = report["data_digest"]
        if digest == report["champion_data_digest"]:
            print(f"data unchanged ({digest}): the champion was trained on it")
        else:
            print(
                f"data unchanged ({digest}): the last registered version was trained on it "
                "and the promotion gate kept the champion; --force retrains anyway"
            )
        return
    print_paths(
        f"retrained on {report['data_digest']} (champion's: {report['champion_data_digest']})",
        {"promotion decision": report["run"].decision, "run": report["run"].run_dir},
    )


@pipeline_app.command("schedule")
@clear_errors
def pipeline_schedule(
    host: Annotated[
        str, typer.Option(help="Kubeflow Pipelines API, e.g. http://ml-pipeline:8888.")
    ],
    cron: Annotated[str, typer.Option(help="Cron line, 5 or 6 fields (UTC), e.g. '0 3 * * *'.")],
    source: Annotated[str, typer.Option(help="Data the runs ingest (path or mount).")],
    data_digest: Annotated[
        str,
        typer.Option(
            help="Pin every run to this DVC md5 (runs fail once the data change); empty: "
            "follow the data (each run digests the source and re-ingests when it changed)."
        ),
    ] = "",
    namespace: Annotated[str, typer.Option(help="Kubeflow namespace.")] = "kubeflow",
    job_name: Annotated[str, typer.Option(help="Name of the recurring run.")] = "parti-ops-retrain",
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Create a recurring run of the pipeline on a Kubeflow cluster (kfp.Client).

    One run at a time, no catch-up. Each run first takes the DVC digest of the data at
    --source (never cached) and ingest's cache is keyed by it: changed data are ingested
    and trained on, unchanged data come from Kubeflow's cache up to the promotion gate.
    """
    from parti_ops.pipelines.recurring import schedule

    cfg = load_config(preset, config, overrides)
    run_id = schedule(
        cfg, host=host, cron=cron, source=source, data_digest=data_digest,
        namespace=namespace, job_name=job_name,
    )  # fmt: skip
    print_paths("recurring run created", {"id": run_id, "cron": cron, "host": host})


@pipeline_app.command("compile")
@clear_errors
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = Path(
        "pipelines/parti_pipeline.yaml"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Compile the pipeline to Kubeflow Pipelines YAML for a cluster.

    The config is the pipeline's default `config_json`; its train.accelerator and
    train.nproc set the training step's GPU request.
    """
    from parti_ops.pipelines.pipeline import compile_pipeline

    cfg = load_config(preset, config, overrides)
    console.print(f"wrote {compile_pipeline(out, cfg).resolve()}")
