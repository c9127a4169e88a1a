"""`parti`: the one console command; each sub-command's docstring is its --help.

One module per command group. A command parses its options, calls the one function that
does the work (in components/, deploy/ or pipelines/) and prints where the results went;
expected failures are one red line (`output.clear_errors`).
"""

import logging
from typing import Annotated

import typer
from rich.logging import RichHandler

from parti_ops.pipelines.cli import config, data, export, registry, run, serve, tokenizer, train
from parti_ops.pipelines.cli.output import console

app = typer.Typer(help="parti-ops: train, evaluate, promote and serve a Parti-style model.")

# Commands first, then groups: the order `parti --help` lists them in.
app.command("train")(train.train)
app.command("generate")(train.generate)
app.command("evaluate")(train.evaluate)
app.command("sweep")(train.sweep)
app.command("run")(run.run)
app.command("retrain")(run.retrain)
app.command("serve")(serve.serve)
app.add_typer(data.app, name="data")
app.add_typer(tokenizer.app, name="tokenizer")
app.add_typer(config.app, name="config")
app.add_typer(run.pipeline_app, name="pipeline")
app.add_typer(registry.app, name="registry")
app.add_typer(train.scorer_app, name="scorer")
app.add_typer(export.app, name="export")
app.add_typer(serve.client_app, name="client")


# Without a docstring: the app's help above is what `parti --help` shows.
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


__all__ = ["app"]
