"""The options most commands share, declared once, and the one way to resolve a config."""

from pathlib import Path
from typing import Annotated, Any

import typer

from parti_ops.model.config import Config
from parti_ops.model.presets import PRESETS

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
Resume = Annotated[
    bool, typer.Option(help="Continue from the newest good checkpoint in OUT/checkpoints.")
]
Accepted = Annotated[
    Path,
    typer.Option(
        "--data", help="Accepted shards (the accepted/ folder `parti data validate` wrote)."
    ),
]


def load_config(
    preset: str,
    config: Path | None,
    overrides: list[str] | None,
    fields: dict[str, Any] | None = None,
) -> Config:
    """The preset, then the YAML file, then each `--set`, each on top of the last.

    Args:
        fields: set last and taken as they are, e.g. `{"data.caption_column": "text"}` (a
            command's own option; `--set` values are parsed as YAML).

    Raises:
        ConfigError: naming the preset, file or key that cannot be used.
    """
    resolved = Config.load(preset, config, overrides or [])
    return resolved.merge(fields) if fields else resolved
