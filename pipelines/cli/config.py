"""`parti config`: the resolved configuration."""

from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import ConfigFile, Overrides, Preset, load_config
from parti_ops.pipelines.cli.output import clear_errors

app = typer.Typer(help="Configuration presets.")


@app.command("show")
@clear_errors
def config_show(
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved configuration (preset + YAML file + --set overrides)."""
    import yaml

    resolved = load_config(preset, config, overrides)
    if as_json:
        print(resolved.to_json())
    else:
        print(yaml.safe_dump(resolved.to_dict(), sort_keys=False), end="")
