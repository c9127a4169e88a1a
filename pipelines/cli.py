"""`parti`: the one console command; each sub-command's docstring is its --help."""

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from parti_ops.model.config import PRESETS, Config, ConfigError

app = typer.Typer(help="parti-ops: train, evaluate, promote and serve a Parti-style model.")
data_app = typer.Typer(help="Data: synthetic set, converters, ingest, validation.")
config_app = typer.Typer(help="Configuration presets.")
pipeline_app = typer.Typer(help="The Kubeflow pipeline.")
tokenizer_app = typer.Typer(help="Tokenizers: captions to token ids, images to code grids.")
text_tokenizer_app = typer.Typer(help="The caption tokenizer (Hugging Face tokenizers).")
image_tokenizer_app = typer.Typer(help="The image tokenizer (VQGAN).")
tokenizer_app.add_typer(text_tokenizer_app, name="text")
tokenizer_app.add_typer(image_tokenizer_app, name="image")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(config_app, name="config")
app.add_typer(pipeline_app, name="pipeline")
registry_app = typer.Typer(help="The MLflow model registry: versions, champion, rollback.")
app.add_typer(registry_app, name="registry")
scorer_app = typer.Typer(help="The in-house CLIP-style image–text scorer.")
app.add_typer(scorer_app, name="scorer")
export_app = typer.Typer(help="Export: ONNX with parity checks, TensorRT, the Triton repository.")
app.add_typer(export_app, name="export")
client_app = typer.Typer(help="Call a Triton endpoint serving the `parti` model.")
app.add_typer(client_app, name="client")

console = Console(stderr=True)

Preset = Annotated[
    str, typer.Option(help=f"Named preset: {', '.join(PRESETS)}.", show_default=True)
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML file of config sections over the preset.")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one field, e.g. --set data.image_size=32 (repeatable)."),
]
Bundle = Annotated[Path, typer.Option(help="Model bundle (`parti train`'s output).")]
FeatureDir = Annotated[
    Path, typer.Option(help="Scorer folder (`parti scorer train`) or a local HF CLIP.")
]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    for noisy in ("great_expectations", "alembic", "urllib3", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _clear_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad config, bad data) into one red line and exit code 1."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from parti_ops.components.encode import EncodedFormatError
        from parti_ops.components.ingest import IngestError
        from parti_ops.components.shards import ShardFormatError
        from parti_ops.components.tokenizers import TokenizerError
        from parti_ops.components.train import TrainError
        from parti_ops.components.validate import DataValidationError
        from parti_ops.deploy.client import ClientError
        from parti_ops.deploy.server import ServerError
        from parti_ops.deploy.tensorrt import TensorRTUnavailable
        from parti_ops.model.checkpoint import CheckpointError

        expected = (
            ConfigError,
            IngestError,
            ShardFormatError,
            DataValidationError,
            CheckpointError,
            EncodedFormatError,
            TokenizerError,
            TrainError,
            ServerError,
            ClientError,
            TensorRTUnavailable,
            ValueError,  # unreadable model folders, bad sampling settings
            OSError,
        )
        try:
            return command(*args, **kwargs)
        except expected as err:
            console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _load(preset: str, config: Path | None, overrides: list[str] | None) -> Config:
    return Config.load(preset, config, overrides or [])


@config_app.command("show")
@_clear_errors
def config_show(
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved configuration (preset + YAML file + --set overrides)."""
    import yaml

    resolved = _load(preset, config, overrides)
    if as_json:
        print(resolved.to_json())
    else:
        print(yaml.safe_dump(resolved.to_dict(), sort_keys=False), end="")


@data_app.command("synth")
@_clear_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the image folder into.")] = Path(
        "data"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Draw the deterministic synthetic data set (Hugging Face imagefolder layout).

    Same seed and config, same bytes: its DVC digest is the one in data.dvc.
    """
    from parti_ops.components.synth import synthesize
    from parti_ops.components.versioning import dvc_md5

    data = _load(preset, config, overrides).data
    summary = synthesize(out, data)
    console.print(f"wrote {summary} to {out.resolve()}")
    console.print(f"DVC digest: {dvc_md5(out)}")


@data_app.command("from-emoji-datasource")
@_clear_errors
def data_from_emoji_datasource(
    package: Annotated[
        Path,
        typer.Argument(
            help="An emoji-datasource-<set> npm package: the .tgz `npm pack` writes, or its"
            " unpacked folder."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for images/ and metadata.jsonl.")] = Path(
        "data/emoji"
    ),
) -> None:
    """Convert an emoji-datasource npm package into an image folder for `parti data ingest`.

    Get one with `npm pack emoji-datasource-apple@16.0.0` (or -facebook, -google,
    -twitter). Every emoji the set has an image for becomes a row captioned with its
    Unicode name in lower case ("grinning face"), each skin-tone variation another
    ("waving hand, medium skin tone"); category and subcategory go along as metadata.
    """
    from parti_ops.components.emoji import from_emoji_datasource

    summary = from_emoji_datasource(package, out)
    console.print(
        f"{summary['rows']} rows ({summary['emoji']} emoji, {summary['skin_variations']}"
        f" skin-tone variations) of the {summary['set']} set {summary['version']}:"
        f" {out.resolve()}"
    )
    if summary["skipped"]:
        console.print(f"skipped: {summary['skipped']}")


@data_app.command("ingest")
@_clear_errors
def data_ingest(
    source: Annotated[Path, typer.Argument(help="Image folder, Parquet or .tar shards.")],
    out: Annotated[Path, typer.Option(help="Folder for the canonical shards.")] = Path(
        "outputs/canonical"
    ),
    caption_column: Annotated[
        str | None, typer.Option(help="Caption column/extension (default: text, then caption).")
    ] = None,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Read image–caption data into canonical shards at the preset's resolution.

    Layouts: a folder with metadata.jsonl or metadata.csv (file_name + caption column),
    Parquet (image bytes or file_name + caption), WebDataset .tar shards (key.jpg|png|webp
    + key.txt [+ key.json]). Unreadable rows are kept with the reason, for validation.
    """
    from parti_ops.components.ingest import ingest_step

    cfg = _load(preset, config, overrides)
    if caption_column:  # a column name, taken as it is (not parsed as YAML like --set)
        cfg = cfg.merge({"data.caption_column": caption_column})
    manifest = ingest_step(cfg.to_json(), "", str(source), str(out))
    console.print(
        f"{manifest['rows']} rows in {len(manifest['shards'])} shards: {out.resolve()}\n"
        f"splits: {manifest['splits']}  DVC digest: {manifest['data_digest']}"
    )


@data_app.command("validate")
@_clear_errors
def data_validate(
    canonical: Annotated[Path, typer.Argument(help="Folder written by `parti data ingest`.")],
    out: Annotated[Path, typer.Option(help="Folder for accepted shards, quarantine, docs.")] = Path(
        "outputs/validated"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Run the Great Expectations suite; write accepted shards, quarantine and Data Docs.

    Exits 1 with the top reasons when more than data.max_quarantine_fraction of the rows
    fail, or the split balance is off. Nothing is dropped: accepted + quarantined = rows.
    """
    from parti_ops.components.validate import validate_step

    cfg = _load(preset, config, overrides)
    report = validate_step(cfg.to_json(), "", str(canonical), str(out))
    _print_paths(
        f"{report['accepted']} accepted, {report['quarantined']} quarantined",
        report["paths"],
    )


Accepted = Annotated[
    Path,
    typer.Option(
        "--data", help="Accepted shards (the accepted/ folder `parti data validate` wrote)."
    ),
]


@text_tokenizer_app.command("train")
@_clear_errors
def tokenizer_text_train(
    data: Accepted = Path("outputs/validated/accepted"),
    out: Annotated[Path, typer.Option(help="Folder for the tokenizer.")] = Path(
        "outputs/text_tokenizer"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the caption tokenizer on the train split's captions.

    The folder loads with transformers.AutoTokenizer.from_pretrained(out). Same captions
    and config, same files.
    """
    from parti_ops.components.tokenizers import text_tokenizer_step

    cfg = _load(preset, config, overrides)
    report = text_tokenizer_step(cfg.to_json(), "", str(data), str(out))
    _print_paths(
        f"text tokenizer: {report['vocab_size']} tokens, {report['truncated']} of"
        f" {report['train_captions']} captions longer than {report['max_length']} tokens",
        {"tokenizer": out.resolve()},
    )


@image_tokenizer_app.command("train")
@_clear_errors
def tokenizer_image_train(
    data: Accepted = Path("outputs/validated/accepted"),
    out: Annotated[Path, typer.Option(help="Folder for the model and its checkpoints.")] = Path(
        "outputs/image_tokenizer"
    ),
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest good checkpoint in OUT/checkpoints.")
    ] = False,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the VQGAN image tokenizer, then score it on the held-out split.

    Checkpoints are written atomically every image_tokenizer.checkpoint_every steps. On
    SIGTERM it checkpoints and exits with code 143; run again with --resume to continue.
    """
    from parti_ops.components.tokenizers import GRID, IMAGE_REPORT, image_tokenizer_step

    cfg = _load(preset, config, overrides)
    metrics = image_tokenizer_step(cfg.to_json(), "", str(data), str(out), resume=resume)
    _print_paths(
        f"image tokenizer on {metrics['split']}: PSNR {metrics['psnr']:.2f} dB, SSIM"
        f" {metrics['ssim']:.3f}, codebook usage {100 * metrics['codebook_usage']:.1f}%"
        + (
            f", oracle exact {100 * metrics['oracle_exact']:.1f}%"
            if "oracle_exact" in metrics
            else ""
        ),
        {
            "model": out.resolve(),
            "held-out metrics": (out / IMAGE_REPORT).resolve(),
            "reconstructions": (out / GRID).resolve(),
        },
    )


@tokenizer_app.command("encode")
@_clear_errors
def tokenizer_encode(
    data: Accepted = Path("outputs/validated/accepted"),
    text: Annotated[Path, typer.Option(help="Caption tokenizer folder.")] = Path(
        "outputs/text_tokenizer"
    ),
    image: Annotated[Path, typer.Option(help="Image tokenizer folder.")] = Path(
        "outputs/image_tokenizer"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the encoded shards.")] = Path(
        "outputs/encoded"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Encode every accepted row: images to code grids, captions to token ids (uint16)."""
    from parti_ops.components.encode import encode_step

    cfg = _load(preset, config, overrides)
    manifest = encode_step(cfg.to_json(), "", str(data), str(text), str(image), str(out))
    rows = ", ".join(f"{k} {v['rows']}" for k, v in manifest["splits"].items())
    _print_paths(f"encoded {manifest['rows']} rows ({rows})", {"encoded": out.resolve()})


@app.command("train")
@_clear_errors
def train(
    encoded: Annotated[Path, typer.Option(help="Encoded data (`parti tokenizer encode`).")] = Path(
        "outputs/encoded"
    ),
    text: Annotated[Path, typer.Option(help="Caption tokenizer the data was encoded with.")] = Path(
        "outputs/text_tokenizer"
    ),
    image: Annotated[Path, typer.Option(help="Image tokenizer the data was encoded with.")] = Path(
        "outputs/image_tokenizer"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the model bundle and checkpoints.")] = Path(
        "outputs/parti"
    ),
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest good checkpoint in OUT/checkpoints.")
    ] = False,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the Parti decoder on encoded data; --set train.nproc=N runs N torchrun processes.

    Checkpoints are written atomically every train.checkpoint_every steps. On SIGTERM it
    checkpoints and exits with code 143; run again with --resume to continue.
    """
    from parti_ops.components.train import REPORT, SAMPLES, train_step

    cfg = _load(preset, config, overrides)
    report = train_step(
        cfg.to_json(), "", str(encoded), str(text), str(image), str(out), resume=resume
    )
    nll = ", ".join(
        f"{k.removesuffix('_bits_per_token')} {v:.3f}"
        for k, v in report.items()
        if k.endswith("_bits_per_token")
    )
    _print_paths(
        f"Parti ({report['parameters'] / 1e6:.1f}M parameters), held-out bits/token: {nll}",
        {
            "model bundle": out.resolve(),
            "report": (out / REPORT).resolve(),
            "samples": (out / SAMPLES).resolve(),
        },
    )


@app.command("generate")
@_clear_errors
def generate(
    prompt: Annotated[
        list[str],
        typer.Option(help="Caption to draw (repeatable); an empty one draws unconditionally."),
    ],
    out: Annotated[
        Path, typer.Option(help="PNG to write; with several prompts, -<i> is added to the name.")
    ] = Path("image.png"),
    model: Bundle = Path("outputs/parti"),
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0: greedy.")] = None,
    top_k: Annotated[int | None, typer.Option(help="0: off.")] = None,
    top_p: Annotated[float | None, typer.Option(help="In (0, 1]; 1: off.")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same image.")] = None,
    candidates: Annotated[
        int | None, typer.Option(help="Samples per prompt; the scorer keeps the best.")
    ] = None,
    scorer: Annotated[
        Path | None, typer.Option(help="Scorer folder that reranks the candidates.")
    ] = None,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Sample images for prompts from a trained bundle, in this process (no server)."""
    import dataclasses

    from parti_ops.components.evaluate import FeatureModel
    from parti_ops.model.generate import TextToImage

    cfg = _load(preset, config, overrides)
    given = {
        "guidance_scale": guidance_scale,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "candidates": candidates,
    }
    settings = dataclasses.replace(cfg.sample, **{k: v for k, v in given.items() if v is not None})
    if settings.candidates > 1 and scorer is None:
        raise typer.BadParameter("--candidates > 1 needs --scorer to choose among them")
    rerank = FeatureModel.load(scorer).reranker() if scorer else None
    bundle = TextToImage.load(model)
    images = bundle(prompt, settings, rerank=rerank)
    paths = _save_images(images.numpy(), out)
    _print_paths(f"{len(paths)} image(s)", {p.name: p.resolve() for p in paths})


@app.command("evaluate")
@_clear_errors
def evaluate(
    model: Bundle = Path("outputs/parti"),
    data: Accepted = Path("outputs/validated/accepted"),
    scorer: FeatureDir = Path("outputs/scorer"),
    references: Annotated[
        Path | None,
        typer.Option(help="Folder of FID reference statistics, reused across evaluations."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the report and the sample grid.")] = Path(
        "outputs/evaluation"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Held-out NLL, prompt fidelity (attribute oracle), CLIP score and FID of a bundle.

    The same bundle, data and settings give the same numbers.
    """
    from parti_ops.components.evaluate import EVALUATION, REPORT, SAMPLES, evaluate_bundle

    cfg = _load(preset, config, overrides)
    result = evaluate_bundle(cfg, model, data, scorer, out, references)
    lines = [f"{k}: {v:.4f}" for k, v in sorted(result["metrics"].items())]
    _print_paths(
        "evaluation\n  " + "\n  ".join(lines),
        {name: (out / name).resolve() for name in (EVALUATION, REPORT, SAMPLES)},
    )


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name}: comma-separated numbers, e.g. 1.5,3") from None


@app.command("sweep")
@_clear_errors
def sweep(
    model: Bundle = Path("outputs/parti"),
    data: Accepted = Path("outputs/validated/accepted"),
    scorer: FeatureDir = Path("outputs/scorer"),
    guidance_scale: Annotated[str, typer.Option(help="Values to try, e.g. 1.5,3.")] = "",
    temperature: Annotated[str, typer.Option(help="Values to try, e.g. 0.7,1.")] = "",
    top_p: Annotated[str, typer.Option(help="Values to try, e.g. 0.6,1.")] = "",
    out: Annotated[Path, typer.Option(help="Where to write the results (JSON).")] = Path(
        "outputs/sweep.json"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Try sampling settings on the validation split (never test); best prompt following first.

    Each option not given keeps the config's value; the grid is every combination.
    """
    import itertools
    import json

    from parti_ops.components.evaluate import sweep_sampling

    cfg = _load(preset, config, overrides)
    axes = {
        "guidance_scale": _floats(guidance_scale, "--guidance-scale"),
        "temperature": _floats(temperature, "--temperature"),
        "top_p": _floats(top_p, "--top-p"),
    }
    axes = {name: values for name, values in axes.items() if values}
    grid = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    results = sweep_sampling(cfg, model, data, scorer, grid or [{}])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for entry in results:
        low, high = entry["interval"]
        exact = f"  exact {entry['exact']:.3f}" if "exact" in entry else ""
        following, (d_low, d_high) = entry["prompt_following"], entry["vs_best"]["interval"]
        print(f"{following:.3f} [{low:.3f}, {high:.3f}]  vs best [{d_low:+.3f}, {d_high:+.3f}]"
              f"{exact}  {entry['settings']}")  # fmt: skip
    _print_paths("sampling sweep on validation (chance 0.5)", {"results": out.resolve()})


@scorer_app.command("train")
@_clear_errors
def scorer_train(
    data: Accepted = Path("outputs/validated/accepted"),
    text: Annotated[Path, typer.Option(help="Caption tokenizer folder.")] = Path(
        "outputs/text_tokenizer"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the scorer.")] = Path("outputs/scorer"),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the CLIP-style scorer on the train pairs; report held-out retrieval accuracy."""
    from parti_ops.components.scorer import REPORT, scorer_step

    cfg = _load(preset, config, overrides)
    report = scorer_step(cfg.to_json(), "", str(data), str(text), str(out))
    lines = [f"{k}: {v:.3f}" for k, v in sorted(report.items()) if isinstance(v, float)]
    _print_paths(
        "scorer: held-out retrieval, own caption first among 10\n  " + "\n  ".join(lines),
        {"scorer": out.resolve(), "report": (out / REPORT).resolve()},
    )


@app.command("run")
@_clear_errors
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
    import json
    import time

    from parti_ops.pipelines.local import StepFailed
    from parti_ops.pipelines.parti import run_local

    cfg = _load(preset, config, overrides)
    started = time.perf_counter()
    try:
        result = run_local(cfg, source, cache=cache, console=console)
    except StepFailed as err:
        _print_failure(err)
        raise typer.Exit(1) from None
    console.print(
        f"pipeline finished in {time.perf_counter() - started:.0f} s"
        + (f" ({len(result.cached)} steps from the cache)" if result.cached else ""),
        highlight=False,
    )
    _print_paths(
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
    smoke = json.loads((result.smoke / "smoke.json").read_text(encoding="utf-8"))
    http, grpc = smoke["endpoints"]["http"], smoke["endpoints"]["grpc"]
    _print_paths(
        "served through tritonserver (smoke test; stopped after it)",
        {
            "endpoint": f"{http}/v2/models/parti (and {grpc})",
            "prompt": smoke["prompt"],
            "image": result.smoke / "smoke.png",
            **(
                {"oracle": ", ".join(k for k, ok in smoke["checks"].items() if ok) or "none"}
                if smoke["checks"]  # only prompts with a synthetic scene are read back
                else {}
            ),
            "serve again": f"parti serve --repository {result.repository}",
        },
    )


@app.command("retrain")
@_clear_errors
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
    from parti_ops.pipelines.schedule import retrain as run_retrain

    cfg = _load(preset, config, overrides)
    try:
        report = run_retrain(cfg, source, force=force, console=console)
    except StepFailed as err:
        _print_failure(err)
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
    _print_paths(
        f"retrained on {report['data_digest']} (champion's: {report['champion_data_digest']})",
        {"promotion decision": report["run"].decision, "run": report["run"].run_dir},
    )


@pipeline_app.command("schedule")
@_clear_errors
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
    from parti_ops.pipelines.schedule import schedule

    cfg = _load(preset, config, overrides)
    run_id = schedule(
        cfg, host=host, cron=cron, source=source, data_digest=data_digest,
        namespace=namespace, job_name=job_name,
    )  # fmt: skip
    _print_paths("recurring run created", {"id": run_id, "cron": cron, "host": host})


@pipeline_app.command("compile")
@_clear_errors
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
    from parti_ops.pipelines.parti import compile_pipeline

    cfg = _load(preset, config, overrides)
    console.print(f"wrote {compile_pipeline(out, cfg).resolve()}")


@registry_app.command("status")
@_clear_errors
def registry_status(
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """List the registered model's versions: aliases, gate metrics, data digest, gate outcome.

    The model is registry.model_name in the configured MLflow store.
    """
    from parti_ops.components.registry import STATUS_METRICS, status
    from parti_ops.components.tracking import client_for

    cfg = _load(preset, config, overrides)
    client, _ = client_for(cfg)
    rows = status(client, cfg.registry.model_name)
    header = ("version", "aliases", "following", "bits/token", "exact", "FID", "CLIP", "gate",
              "data digest")  # fmt: skip
    table = [header] + [
        (
            row["version"],
            ",".join(row["aliases"]) or "-",
            *("-" if row[k] is None else f"{row[k]:.4f}" for k in STATUS_METRICS),
            row["gate"] or "-",
            row["data_digest"] or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print(f"{cfg.registry.model_name} in {cfg.mlflow_tracking_uri()}")
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())


@registry_app.command("promote")
@_clear_errors
def registry_promote(
    version: Annotated[int, typer.Option(help="Model version to make the champion.")],
    reason: Annotated[str, typer.Option(help="Why, kept as a tag on the version.")],
    by: Annotated[str | None, typer.Option(help="Who; default: the current user.")] = None,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Make a version the champion by hand, past the gate; the old one is previous-champion.

    Who and why are tagged on the version (promotion.by, promotion.reason).
    """
    from parti_ops.components.registry import promote
    from parti_ops.components.tracking import client_for

    cfg = _load(preset, config, overrides)
    client, _ = client_for(cfg)
    result = promote(client, cfg.registry.model_name, str(version), reason=reason, user=by)
    _print_paths(
        f"{cfg.registry.model_name} version {result['champion']} is the champion",
        {"previous-champion": result["previous_champion"] or "none"},
    )


@registry_app.command("rollback")
@_clear_errors
def registry_rollback(
    reason: Annotated[str, typer.Option(help="Why, kept as a tag on the version.")] = "",
    by: Annotated[str | None, typer.Option(help="Who; default: the current user.")] = None,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Give the champion alias back to the previous champion.

    The version rolled back from is tagged rolled_back; fails when there is no
    previous-champion alias.
    """
    from parti_ops.components.registry import rollback
    from parti_ops.components.tracking import client_for

    cfg = _load(preset, config, overrides)
    client, _ = client_for(cfg)
    result = rollback(client, cfg.registry.model_name, reason=reason, user=by)
    _print_paths(
        f"{cfg.registry.model_name} version {result['champion']} is the champion again",
        {
            "rolled back": result["rolled_back"] or "none",
            "previous-champion": result["previous_champion"] or "none",
        },
    )


@export_app.command("onnx")
@_clear_errors
def export_onnx(
    model: Bundle,
    out: Annotated[Path, typer.Option(help="Folder for the ONNX graphs (replaced).")] = Path(
        "outputs/onnx"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Export the text encoder, the KV-cache decoder step and the VQGAN decoder to ONNX.

    Parity with PyTorch is checked right after (export.logits_atol, export.pixel_tolerance,
    100 % greedy agreement on export.parity_prompts prompts); with export.int8 the int8
    variant is written and its fidelity drop and speed-up measured.
    """
    import json

    from parti_ops.deploy.onnx import compare_int8, export_onnx, quantize_int8

    cfg = _load(preset, config, overrides)
    report = export_onnx(model, out, cfg.export)
    print(json.dumps({"parity": report}, indent=2))
    if cfg.export.int8:
        quantize_int8(out)
        print(json.dumps({"int8": compare_int8(out, cfg.export)}, indent=2))
    _print_paths("exported", {"onnx": out.resolve()})


@export_app.command("tensorrt")
@_clear_errors
def export_tensorrt(
    onnx: Annotated[Path, typer.Option(help="Exported ONNX folder (`parti export onnx`).")],
    model: Annotated[Path, typer.Option(help="The bundle it came from, for parity.")],
    out: Annotated[Path, typer.Option(help="Folder for the TensorRT engine cache.")] = Path(
        "outputs/tensorrt"
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Build TensorRT engines from the ONNX graphs and check parity on this GPU.

    Needs an NVIDIA GPU and TensorRT (as in NGC's images); elsewhere it says so and exits 1.
    """
    import json

    from parti_ops.deploy.tensorrt import build_engines

    cfg = _load(preset, config, overrides)
    print(json.dumps(build_engines(onnx, model, out, cfg.export), indent=2))


@export_app.command("triton")
@_clear_errors
def export_triton(
    version: Annotated[int, typer.Option(help="Version folder: the MLflow registry version.")],
    repository: Annotated[Path, typer.Option(help="Model repository to add it to.")] = Path(
        "outputs/triton"
    ),
    onnx: Annotated[
        Path | None, typer.Option(help="Exported ONNX folder; else --model is exported first.")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="Model bundle to export.")] = None,
    target: Annotated[str, typer.Option(help="cpu: Python backend only; gpu: also ORT.")] = "cpu",
    url: Annotated[
        str | None, typer.Option(help="A running server (explicit mode) to switch over.")
    ] = None,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Add a version to the Triton model repository and make it the served one.

    With --url the running server loads it; if the load fails it keeps serving the old
    version, and the repository's config is put back.
    """
    import tempfile

    from parti_ops.deploy.onnx import export_onnx
    from parti_ops.deploy.triton import add_version, set_served_version, update_served_version

    cfg = _load(preset, config, overrides)
    if (onnx is None) == (model is None):
        raise typer.BadParameter("give exactly one of --onnx and --model")
    with tempfile.TemporaryDirectory() as tmp:
        if onnx is None:
            onnx = Path(tmp) / "onnx"
            export_onnx(model, onnx, cfg.export)
        add_version(repository, onnx, version, cfg.serve, target=target, sample=cfg.sample)
    if url:
        served, error = update_served_version(url, repository, cfg.serve, version)
        if error:
            console.print(f"[red]error:[/red] {error}", highlight=False)
            raise typer.Exit(1)
    else:
        set_served_version(repository, cfg.serve, version)
    _print_paths(
        f"{cfg.serve.model_name} version {version} is served",
        {"repository": repository.resolve()},
    )


@app.command("serve")
@_clear_errors
def serve(
    repository: Annotated[Path, typer.Option(help="Model repository (`parti export triton`).")] = (
        Path("outputs/triton")
    ),
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Start tritonserver on 127.0.0.1 (serve.host) with the repository, until Ctrl-C/SIGTERM.

    Free ports are picked unless serve.http_port / grpc_port / metrics_port are set.
    """
    import signal
    import threading

    from parti_ops.deploy.server import TritonServer

    cfg = _load(preset, config, overrides)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(repository, cfg.serve).start()
    try:
        _print_paths(
            "tritonserver is ready (Ctrl-C stops it)",
            {"http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url},
        )
        while not stop.wait(1.0):
            if server.process.poll() is not None:
                console.print(f"[red]tritonserver exited:[/red]\n{server.tail()}")
                raise typer.Exit(1)
    finally:
        code = server.stop()
        console.print(f"tritonserver stopped (exit {code})")


@client_app.command("generate")
@_clear_errors
def client_generate(
    prompt: Annotated[list[str], typer.Option(help="Caption to draw (repeatable).")],
    url: Annotated[str, typer.Option(help="http://host:port or grpc://host:port.")],
    out: Annotated[
        Path, typer.Option(help="PNG to write; with several prompts, -<i> is added to the name.")
    ] = Path("image.png"),
    seed: Annotated[int | None, typer.Option(help="Seed of the first prompt.")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="Classifier-free guidance.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0: greedy.")] = None,
    top_k: Annotated[int | None, typer.Option(help="0: off.")] = None,
    top_p: Annotated[float | None, typer.Option(help="In (0, 1]; 1: off.")] = None,
    model: Annotated[str, typer.Option(help="Model name on the server.")] = "parti",
) -> None:
    """Generate images through a Triton endpoint (tritonclient, HTTP or gRPC)."""

    from parti_ops.deploy.client import ClientError, generate

    try:
        images, _ = generate(
            url,
            prompt,
            model=model,
            seed=seed,
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
    except ClientError as err:
        console.print(f"[red]server refused:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None
    paths = _save_images(images, out)
    _print_paths(f"{len(paths)} image(s) from {url}", {p.name: p.resolve() for p in paths})


def _save_images(images, out: Path) -> list[Path]:
    """uint8 (N, H, W, 3) as PNGs: `out` for one image, `<stem>-<i>` for several."""
    from PIL import Image

    count = len(images)
    paths = [out] if count == 1 else [out.with_stem(f"{out.stem}-{i}") for i in range(count)]
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image).save(path)
    return paths


def _print_failure(err: Exception) -> None:
    """A failed step's report as it is: its log lines are not rich markup."""
    console.print("[red]pipeline failed:[/red]", end=" ")
    console.print(str(err), markup=False, highlight=False, soft_wrap=True)


def _print_paths(title: str, paths: dict[str, Any]) -> None:
    print(title)
    width = max(len(k) for k in paths)
    for key, value in paths.items():
        print(f"  {key:<{width}}  {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    app()
