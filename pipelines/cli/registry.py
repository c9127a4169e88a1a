"""`parti registry`: the registered model's versions, the champion, promotion and rollback."""

from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import ConfigFile, Overrides, Preset, load_config
from parti_ops.pipelines.cli.output import clear_errors, print_paths

app = typer.Typer(help="The MLflow model registry: versions, champion, rollback.")


@app.command("status")
@clear_errors
def registry_status(
    preset: Preset = "tiny",
    config: ConfigFile = None,
    overrides: Overrides = None,
) -> None:
    """List the registered model's versions: aliases, gate metrics, data digest, gate outcome.

    The model is registry.model_name in the configured MLflow store.
    """
    from parti_ops.components.registry import status, status_lines
    from parti_ops.components.tracking import client_for

    cfg = load_config(preset, config, overrides)
    client, _ = client_for(cfg)
    rows = status(client, cfg.registry.model_name)
    print(f"{cfg.registry.model_name} in {cfg.mlflow_tracking_uri()}")
    for line in status_lines(rows):
        print(line)


@app.command("promote")
@clear_errors
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

    cfg = load_config(preset, config, overrides)
    client, _ = client_for(cfg)
    result = promote(client, cfg.registry.model_name, str(version), reason=reason, user=by)
    print_paths(
        f"{cfg.registry.model_name} version {result['champion']} is the champion",
        {"previous-champion": result["previous_champion"] or "none"},
    )


@app.command("rollback")
@clear_errors
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

    cfg = load_config(preset, config, overrides)
    client, _ = client_for(cfg)
    result = rollback(client, cfg.registry.model_name, reason=reason, user=by)
    print_paths(
        f"{cfg.registry.model_name} version {result['champion']} is the champion again",
        {
            "rolled back": result["rolled_back"] or "none",
            "previous-champion": result["previous_champion"] or "none",
        },
    )
