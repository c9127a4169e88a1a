"""`parti data`: the synthetic set, converters, ingest and validation."""

from pathlib import Path
from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import ConfigFile, Overrides, Preset, load_config
from parti_ops.pipelines.cli.output import clear_errors, console, print_paths

app = typer.Typer(help="Data: synthetic set, converters, ingest, validation.")


@app.command("synth")
@clear_errors
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

    summary = synthesize(out, load_config(preset, config, overrides).data)
    console.print(f"wrote {summary} to {out.resolve()}")
    console.print(f"DVC digest: {dvc_md5(out)}")


@app.command("from-emoji-datasource")
@clear_errors
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


@app.command("ingest")
@clear_errors
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

    column = {"data.caption_column": caption_column} if caption_column else None
    cfg = load_config(preset, config, overrides, column)
    manifest = ingest_step(cfg, "", str(source), str(out))
    console.print(
        f"{manifest['rows']} rows in {len(manifest['shards'])} shards: {out.resolve()}\n"
        f"splits: {manifest['splits']}  DVC digest: {manifest['data_digest']}"
    )


@app.command("validate")
@clear_errors
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

    report = validate_step(load_config(preset, config, overrides), "", str(canonical), str(out))
    print_paths(
        f"{report['accepted']} accepted, {report['quarantined']} quarantined",
        report["paths"],
    )
