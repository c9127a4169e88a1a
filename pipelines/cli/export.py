"""`parti export`: ONNX with parity checks, TensorRT engines, the Triton model repository."""

from pathlib import Path
from typing import Annotated

import typer

from parti_ops.pipelines.cli.options import Bundle, ConfigFile, Overrides, Preset, load_config
from parti_ops.pipelines.cli.output import clear_errors, print_paths

app = typer.Typer(help="Export: ONNX with parity checks, TensorRT, the Triton repository.")


@app.command("onnx")
@clear_errors
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

    from parti_ops.components.export import export_checked

    cfg = load_config(preset, config, overrides)
    parity, int8 = export_checked(model, out, cfg.export)
    print(json.dumps({"parity": parity}, indent=2))
    if int8 is not None:
        print(json.dumps({"int8": int8}, indent=2))
    print_paths("exported", {"onnx": out.resolve()})


@app.command("tensorrt")
@clear_errors
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

    cfg = load_config(preset, config, overrides)
    print(json.dumps(build_engines(onnx, model, out, cfg.export), indent=2))


@app.command("triton")
@clear_errors
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
    from parti_ops.components.export import serve_version

    cfg = load_config(preset, config, overrides)
    if (onnx is None) == (model is None):
        raise typer.BadParameter("give exactly one of --onnx and --model")
    serve_version(repository, version, cfg, onnx_dir=onnx, bundle=model, target=target, url=url)
    print_paths(
        f"{cfg.serve.model_name} version {version} is served",
        {"repository": repository.resolve()},
    )
