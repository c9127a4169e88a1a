"""`parti serve` and `parti client`: a Triton endpoint on this machine, and calls to one."""

from pathlib import Path
from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import ConfigFile, Overrides, Preset, load_config
from parti_ops.pipelines.cli.output import (
    clear_errors,
    console,
    print_error,
    print_paths,
    save_images,
)

client_app = typer.Typer(help="Call a Triton endpoint serving the `parti` model.")


@clear_errors
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
    from parti_ops.deploy.server import TritonServer, serve_until_signalled

    def ready(server: TritonServer) -> None:
        print_paths(
            "tritonserver is ready (Ctrl-C stops it)",
            {"http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url},
        )

    cfg = load_config(preset, config, overrides)
    stopped = serve_until_signalled(repository, cfg.serve, on_ready=ready)
    if stopped.crashed:
        console.print("[red]tritonserver exited:[/red]")
        console.print(stopped.log_tail, markup=False, highlight=False)
    console.print(f"tritonserver stopped (exit {stopped.exit_code})")
    if stopped.crashed:
        raise typer.Exit(1)


@client_app.command("generate")
@clear_errors
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
    except ClientError as err:  # the server's own message, labelled as its refusal
        print_error("server refused:", err)
        raise typer.Exit(1) from None
    paths = save_images(images, out)
    print_paths(f"{len(paths)} image(s) from {url}", {p.name: p.resolve() for p in paths})
