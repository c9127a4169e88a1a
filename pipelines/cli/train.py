"""`parti train | generate | evaluate | sweep` and `parti scorer`: the models and their scores."""

from pathlib import Path
from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import (
    Accepted,
    Bundle,
    ConfigFile,
    FeatureDir,
    Overrides,
    Preset,
    Resume,
    load_config,
)
from parti_ops.pipelines.cli.output import clear_errors, print_paths, save_images

scorer_app = typer.Typer(help="The in-house CLIP-style image–text scorer.")


@clear_errors
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
    resume: Resume = False,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the Parti decoder on encoded data; --set train.nproc=N runs N torchrun processes.

    Checkpoints are written atomically every train.checkpoint_every steps. On SIGTERM it
    checkpoints and exits with code 143; run again with --resume to continue.
    """
    from parti_ops.components.train_decoder import train_step
    from parti_ops.model.layout import SAMPLES, TRAINING_REPORT

    cfg = load_config(preset, config, overrides)
    report = train_step(cfg, "", str(encoded), str(text), str(image), str(out), resume=resume)
    nll = ", ".join(
        f"{k.removesuffix('_bits_per_token')} {v:.3f}"
        for k, v in report.items()
        if k.endswith("_bits_per_token")
    )
    print_paths(
        f"Parti ({report['parameters'] / 1e6:.1f}M parameters), held-out bits/token: {nll}",
        {
            "model bundle": out.resolve(),
            "report": (out / TRAINING_REPORT).resolve(),
            "samples": (out / SAMPLES).resolve(),
        },
    )


@clear_errors
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

    from parti_ops.components.evaluate import generate_images

    cfg = load_config(preset, config, overrides)
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
    paths = save_images(generate_images(model, prompt, settings, scorer), out)
    print_paths(f"{len(paths)} image(s)", {p.name: p.resolve() for p in paths})


@clear_errors
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

    cfg = load_config(preset, config, overrides)
    result = evaluate_bundle(cfg, model, data, scorer, out, references)
    lines = [f"{k}: {v:.4f}" for k, v in sorted(result["metrics"].items())]
    print_paths(
        "evaluation\n  " + "\n  ".join(lines),
        {name: (out / name).resolve() for name in (EVALUATION, REPORT, SAMPLES)},
    )


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name}: comma-separated numbers, e.g. 1.5,3") from None


@clear_errors
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
    from parti_ops.components.evaluate import run_sweep

    cfg = load_config(preset, config, overrides)
    axes = {
        "guidance_scale": _floats(guidance_scale, "--guidance-scale"),
        "temperature": _floats(temperature, "--temperature"),
        "top_p": _floats(top_p, "--top-p"),
    }
    for entry in run_sweep(cfg, model, data, scorer, axes, out):
        low, high = entry["interval"]
        exact = f"  exact {entry['exact']:.3f}" if "exact" in entry else ""
        following, (d_low, d_high) = entry["prompt_following"], entry["vs_best"]["interval"]
        print(f"{following:.3f} [{low:.3f}, {high:.3f}]  vs best [{d_low:+.3f}, {d_high:+.3f}]"
              f"{exact}  {entry['settings']}")  # fmt: skip
    print_paths("sampling sweep on validation (chance 0.5)", {"results": out.resolve()})


@scorer_app.command("train")
@clear_errors
def scorer_train(
    data: Accepted = Path("outputs/validated/accepted"),
    text: Annotated[Path, typer.Option(help="Caption tokenizer folder.")] = Path(
        "outputs/text_tokenizer"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the scorer.")] = Path("outputs/scorer"),
    resume: Resume = False,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the CLIP-style scorer on the train pairs; report held-out retrieval accuracy.

    With --set scorer.checkpoint_every=N it checkpoints every N steps and on SIGTERM (exit
    code 143); run again with --resume to continue.
    """
    from parti_ops.components.train_scorer import REPORT, scorer_step

    cfg = load_config(preset, config, overrides)
    report = scorer_step(cfg, "", str(data), str(text), str(out), resume=resume)
    lines = [f"{k}: {v:.3f}" for k, v in sorted(report.items()) if isinstance(v, float)]
    print_paths(
        "scorer: held-out retrieval, own caption first among 10\n  " + "\n  ".join(lines),
        {"scorer": out.resolve(), "report": (out / REPORT).resolve()},
    )
