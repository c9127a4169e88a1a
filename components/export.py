"""Pipeline step: export the registry's champion to ONNX and add it to the Triton repository.

The served version is the one the `champion` alias points at, whichever run promoted it,
and its repository folder is named by its registry version. The export is checked for
parity with PyTorch (an ExportError fails the step); the int8 variant is served only
when `serve.precision` allows it and its fidelity drop is within bounds.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from parti_ops.model.config import Config, ExportConfig
from parti_ops.model.errors import PartiError

log = logging.getLogger(__name__)


class ExportStepError(PartiError, ValueError):
    """Nothing to export, or an export that cannot be served; the message says which."""


def choose_precision(wanted: str, int8: dict[str, Any] | None) -> str:
    """fp32 or int8: `auto` takes int8 only when its measured fidelity drop is in bounds."""
    if wanted == "fp32":
        return "fp32"
    if int8 is None:
        if wanted == "int8":
            raise ExportStepError("serve.precision=int8 needs export.int8=true")
        return "fp32"
    if wanted == "int8" and not int8["served"]:
        raise ExportStepError(
            f"int8 loses {int8['fidelity_drop']:.3f} fidelity, more than "
            f"export.max_int8_fidelity_drop={int8['max_fidelity_drop']}; serve fp32"
        )
    return "int8" if int8["served"] else "fp32"


def export_checked(
    bundle: str | Path, onnx_dir: str | Path, export: ExportConfig
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Export a bundle to ONNX and check it against PyTorch; with `export.int8`, also write
    the int8 variant and measure it against fp32.

    Returns:
        (the parity report, the int8 comparison or None).
    """
    from parti_ops.deploy.onnx import compare_int8, export_onnx, quantize_int8

    parity = export_onnx(bundle, onnx_dir, export)
    if not export.int8:
        return parity, None
    quantize_int8(onnx_dir)
    return parity, compare_int8(onnx_dir, export)


def serve_version(
    repository: str | Path,
    version: int,
    config: Config,
    *,
    onnx_dir: str | Path | None = None,
    bundle: str | Path | None = None,
    target: str = "cpu",
    url: str | None = None,
) -> None:
    """Add an export to the Triton repository as `version` and make it the served one.

    Args:
        onnx_dir: an `export_onnx` folder; or give `bundle`, exported here first.
        target: "cpu" (Python backend only) or "gpu" (also the ONNX Runtime graphs).
        url: a running server (explicit model control) that loads the version; when that
            load fails it keeps serving the old one and the repository's config is put
            back (ExportStepError says so). None: only the repository changes.
    """
    from parti_ops.deploy.onnx import export_onnx
    from parti_ops.deploy.triton import add_version, set_served_version, update_served_version

    if (onnx_dir is None) == (bundle is None):
        raise ExportStepError("give exactly one of an ONNX folder and a model bundle")
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_dir is None:
            onnx_dir = Path(tmp) / "onnx"
            export_onnx(bundle, onnx_dir, config.export)
        add_version(
            repository, onnx_dir, version, config.serve, target=target, sample=config.sample
        )
    if url is None:
        set_served_version(repository, config.serve, version)
        return
    _, error = update_served_version(url, repository, config.serve, version)
    if error:
        raise ExportStepError(error)


def export_step(
    config: Config, parent_run_id: str, repository_dir: str, *, version: str | None = None
) -> dict[str, Any]:
    """Export `version` (None: the champion) into `repository_dir` and serve it there;
    returns the report."""
    from parti_ops.components.registry import CHAMPION, alias_version, download_bundle
    from parti_ops.components.tracking import step_run
    from parti_ops.deploy.triton import add_version, set_served_version

    name = config.registry.model_name
    with step_run(config, "export", parent_run_id) as run:
        version = version or alias_version(run.client, name, CHAMPION)
        if version is None:
            raise ExportStepError(f"registered model {name!r} has no champion to export")
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            bundle = download_bundle(run.client, config, version, Path(tmp) / "bundle")
            onnx_dir = Path(tmp) / "onnx"
            parity, int8 = export_checked(bundle, onnx_dir, config.export)
            precision = choose_precision(config.serve.precision, int8)
            tensorrt = None
            if config.serve.target == "gpu":  # engines and their parity, on this GPU
                from parti_ops.deploy.tensorrt import build_engines

                trt_dir = Path(tmp) / "tensorrt"
                tensorrt = build_engines(onnx_dir, bundle, trt_dir, config.export)
            report = {
                "registry_version": version,
                "precision": precision,
                "parity": parity,
                "int8": int8,
                "tensorrt": tensorrt,
            }
            add_version(
                repository_dir,
                onnx_dir,
                int(version),
                config.serve,
                target=config.serve.target,
                precision=precision,
                sample=config.sample,
                report=report,
            )
        set_served_version(repository_dir, config.serve, int(version))
        metrics = {
            "export.logits_max_abs_diff": parity["logits_max_abs_diff"],
            "export.pixels_mean_abs_diff": parity["pixels_mean_abs_diff"],
            "export.greedy_sequence_agreement": parity["greedy_sequence_agreement"],
        }
        if int8 is not None:
            metrics["export.int8_fidelity_drop"] = int8["fidelity_drop"]
            metrics["export.int8_speedup"] = int8["speedup"]
        run.log(metrics=metrics, tags={"export.version": version, "export.precision": precision})
    log.info("exported %s version %s (%s) into %s", name, version, precision, repository_dir)
    return report
