"""TensorRT engines for the exported graphs, built and checked on the GPU they will run on.

The engines are built by ONNX Runtime's TensorRT execution provider from the same ONNX
files Triton serves, and cached in `out/` (`trt_engine_cache_*`): this is the path
Triton's ONNX Runtime backend takes with its TensorRT accelerator (`deploy/triton.py`),
so what is checked here is what a GPU server runs. Parity is the ONNX export's check
(`deploy/onnx.py`) with TensorRT in fp32, and the speed ratio is measured against
PyTorch eager on the same GPU. Needs an NVIDIA GPU, TensorRT and onnxruntime-gpu, as in
NGC's images; elsewhere `build_engines` raises an error saying so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from parti_ops.model.config import ExportConfig
from parti_ops.model.errors import PartiError


class TensorRTUnavailable(PartiError, RuntimeError):
    """No GPU, or no TensorRT execution provider, on this machine."""


def providers(cache: Path, fp16: bool = False) -> list:
    """ONNX Runtime providers: TensorRT (engines cached in `cache`), then CUDA, then CPU."""
    options = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_fp16_enable": fp16,
    }
    return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def check_available() -> None:
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "TensorRT engines need an NVIDIA GPU and this machine has none; run "
            "`parti export tensorrt` on a GPU node (NGC Triton/PyTorch images include TensorRT)"
        )
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise TensorRTUnavailable(
            "onnxruntime here has no TensorRT execution provider "
            f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu with TensorRT"
        )


def build_engines(
    onnx_dir: str | Path, bundle: str | Path, out: str | Path, config: ExportConfig
) -> dict[str, Any]:
    """Build (and cache) the engines, check parity, time decode against PyTorch eager."""
    check_available()
    import torch

    from parti_ops.deploy.onnx import ExportError, check_parity
    from parti_ops.deploy.runtime import OnnxTextToImage
    from parti_ops.model.config import SampleConfig
    from parti_ops.model.generate import TextToImage
    from parti_ops.model.scenes import prompt_suite

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = TextToImage.load(bundle, device="cuda")
    start = time.perf_counter()
    try:
        runtime = OnnxTextToImage.load(onnx_dir, providers=providers(out))
    except ValueError as err:  # a plain ValueError: runtime.py imports nothing of parti_ops
        raise ExportError(str(err)) from None
    report: dict[str, Any] = {"engine_build_s": time.perf_counter() - start}
    report["parity"] = check_parity(model, Path(onnx_dir), config, runtime=runtime)
    prompts = [p for p, _ in prompt_suite(config.parity_prompts)]
    seeds = list(range(len(prompts)))
    timings = {}
    for name, run in (
        ("tensorrt", lambda: runtime(prompts, seeds=seeds, **SampleConfig().sampling_kwargs())),
        ("torch_eager", lambda: model(prompts, seeds=seeds)),
    ):
        run()  # warm-up: engine and kernel selection
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        timings[name] = len(prompts) / (time.perf_counter() - start)
    report["images_per_s"] = timings
    report["speedup_vs_torch_eager"] = timings["tensorrt"] / timings["torch_eager"]
    (out / "tensorrt.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
