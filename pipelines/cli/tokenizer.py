"""`parti tokenizer`: train the caption and image tokenizers, encode the accepted data."""

from pathlib import Path
from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import (
    Accepted,
    ConfigFile,
    Overrides,
    Preset,
    Resume,
    load_config,
)
from parti_ops.pipelines.cli.output import clear_errors, print_paths

app = typer.Typer(help="Tokenizers: captions to token ids, images to code grids.")
text_app = typer.Typer(help="The caption tokenizer (Hugging Face tokenizers).")
image_app = typer.Typer(help="The image tokenizer (VQGAN).")
app.add_typer(text_app, name="text")
app.add_typer(image_app, name="image")


@text_app.command("train")
@clear_errors
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

    report = text_tokenizer_step(load_config(preset, config, overrides), "", str(data), str(out))
    print_paths(
        f"text tokenizer: {report['vocab_size']} tokens, {report['truncated']} of"
        f" {report['train_captions']} captions longer than {report['max_length']} tokens",
        {"tokenizer": out.resolve()},
    )


@image_app.command("train")
@clear_errors
def tokenizer_image_train(
    data: Accepted = Path("outputs/validated/accepted"),
    out: Annotated[Path, typer.Option(help="Folder for the model and its checkpoints.")] = Path(
        "outputs/image_tokenizer"
    ),
    resume: Resume = False,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """Train the VQGAN image tokenizer, then score it on the held-out split.

    Checkpoints are written atomically every image_tokenizer.checkpoint_every steps. On
    SIGTERM it checkpoints and exits with code 143; run again with --resume to continue.
    """
    from parti_ops.components.tokenizers import GRID, IMAGE_REPORT, image_tokenizer_step

    cfg = load_config(preset, config, overrides)
    metrics = image_tokenizer_step(cfg, "", str(data), str(out), resume=resume)
    print_paths(
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


@app.command("encode")
@clear_errors
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

    cfg = load_config(preset, config, overrides)
    manifest = encode_step(cfg, "", str(data), str(text), str(image), str(out))
    rows = ", ".join(f"{k} {v['rows']}" for k, v in manifest["splits"].items())
    print_paths(f"encoded {manifest['rows']} rows ({rows})", {"encoded": out.resolve()})
