"""The Triton model repository: every `config.pbtxt` generated from code and validated.

    repository/
      parti/config.pbtxt            Python backend: prompt → image inside one model
      parti/<version>/model.py      the orchestrator (`deploy/triton_model.py`)
      parti/<version>/parti_runtime.py, *.onnx, text_tokenizer/, meta.json, int8/
      text_encoder/, decoder_step/, image_decoder/   (target "gpu" only) ONNX Runtime
                                    backend models with the TensorRT accelerator

A version folder is named by the MLflow registry version it was exported from, and the
`parti` model's version policy serves exactly one: the champion. Promoting a new champion
writes its folder, moves the policy, and asks the server to load it; if that load fails,
Triton keeps the version it was serving (`update_served_version`).

The CPU target is what the Triton bundled with `nvidia-pytriton` can run (Python backend
only): the orchestrator runs ONNX Runtime itself. The GPU target adds the three graphs as
ONNX Runtime backend models for the NGC image, where they can be called on their own.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from parti_ops.model.config import SampleConfig, ServeConfig, sampling_rules
from parti_ops.model.errors import PartiError
from parti_ops.model.layout import GRAPHS, INT8, ONNX_META

HERE = Path(__file__).parent
CONFIG = "config.pbtxt"
TARGETS = ("cpu", "gpu")
INPUTS = {  # name → (Triton type, optional); each (1,) per prompt
    "prompt": (pb.TYPE_STRING, False),
    "seed": (pb.TYPE_INT64, True),
    "guidance_scale": (pb.TYPE_FP32, True),
    "temperature": (pb.TYPE_FP32, True),
    "top_k": (pb.TYPE_INT32, True),
    "top_p": (pb.TYPE_FP32, True),
}


class RepositoryError(PartiError, ValueError):
    """A model repository that cannot be written or read; the message says which file."""


def parti_config(serve: ServeConfig, meta: dict[str, Any], version: int) -> pb.ModelConfig:
    """The orchestrator's config: inputs, outputs, bounded dynamic batching, one version."""
    size, n = meta["image_size"], meta["grid"] ** 2
    config = pb.ModelConfig(
        name=serve.model_name,
        backend="python",
        max_batch_size=serve.max_batch_size,
        version_policy=pb.ModelVersionPolicy(
            specific=pb.ModelVersionPolicy.Specific(versions=[version])
        ),
        input=[
            pb.ModelInput(name=name, data_type=dtype, dims=[1], optional=optional)
            for name, (dtype, optional) in INPUTS.items()
        ],
        output=[
            pb.ModelOutput(name="image", data_type=pb.TYPE_UINT8, dims=[size, size, 3]),
            pb.ModelOutput(name="tokens", data_type=pb.TYPE_INT32, dims=[n]),
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            max_queue_delay_microseconds=serve.queue_delay_us,
            default_queue_policy=pb.ModelQueuePolicy(
                max_queue_size=serve.max_queue_size, timeout_action=pb.ModelQueuePolicy.REJECT
            ),
        ),
        instance_group=[
            pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_CPU, count=serve.instances)
        ],
    )
    for key, value in {
        "providers": serve.providers,
        "threads": str(serve.threads),
        "max_prompt_bytes": str(serve.max_prompt_bytes),
        "cancel_check_ms": str(serve.cancel_check_ms),
    }.items():
        config.parameters[key].string_value = value
    return config


def graph_config(name: str, folder: Path) -> pb.ModelConfig:
    """An ONNX Runtime backend model for one graph (GPU servers), with TensorRT enabled.

    The batch is not the first axis of the K/V tensors, so Triton's own batching is off
    (max_batch_size 0) and every dimension is declared dynamic.
    """
    import onnx

    graph = onnx.load(str(folder / f"{name}.onnx"), load_external_data=False).graph
    config = pb.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=0,
        input=[_tensor(pb.ModelInput, v) for v in graph.input],
        output=[_tensor(pb.ModelOutput, v) for v in graph.output],
        instance_group=[pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_GPU, count=1)],
    )
    # The TensorRT accelerator of the ONNX Runtime backend, FP16, engines cached on disk
    # (Triton's onnxruntime_backend README, "TensorRT Optimization").
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
    accelerator.name = "tensorrt"
    accelerator.parameters["precision_mode"] = "FP16"
    accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
    accelerator.parameters["trt_engine_cache_enable"] = "1"
    accelerator.parameters["trt_engine_cache_path"] = "/tmp/trt_cache"
    return config


_ONNX_TO_TRITON = {1: pb.TYPE_FP32, 7: pb.TYPE_INT64, 9: pb.TYPE_BOOL, 2: pb.TYPE_UINT8}


def _tensor(kind, value):
    tensor = value.type.tensor_type
    dtype = _ONNX_TO_TRITON.get(tensor.elem_type)
    if dtype is None:
        raise RepositoryError(f"graph input/output {value.name}: ONNX type {tensor.elem_type}")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return kind(name=value.name, data_type=dtype, dims=dims)


def write_config(config: pb.ModelConfig, folder: Path) -> Path:
    """Write `config.pbtxt` and read it back, so a file that does not parse is never left."""
    text = text_format.MessageToString(config)
    path = folder / CONFIG
    _parse(text, path)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def read_config(path: str | Path) -> pb.ModelConfig:
    """Parse a `config.pbtxt` with Triton's own schema; RepositoryError names the file."""
    return _parse(Path(path).read_text(encoding="utf-8"), Path(path))


def _parse(text: str, path: Path) -> pb.ModelConfig:
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as err:
        raise RepositoryError(f"{path}: not a valid Triton model config: {err}") from None


def add_version(
    repository: str | Path,
    onnx_dir: str | Path,
    version: int,
    serve: ServeConfig,
    *,
    target: str = "cpu",
    precision: str = "fp32",
    sample: SampleConfig | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Copy an exported model (`parti export onnx`) in as `version`; return its folder.

    The served version does not change here: `set_served_version` moves it. `sample`
    holds the sampling defaults the model applies to settings a request leaves out.
    """
    if target not in TARGETS:
        raise RepositoryError(f"target {target!r}: use one of {', '.join(TARGETS)}")
    if version < 1:
        raise RepositoryError(f"version {version}: Triton versions start at 1")
    repository, onnx_dir = Path(repository), Path(onnx_dir)
    if not (onnx_dir / ONNX_META).is_file():
        raise RepositoryError(f"{onnx_dir}: no {ONNX_META}; give the output of `parti export onnx`")
    if precision == INT8 and not (onnx_dir / INT8).is_dir():
        raise RepositoryError(f"{onnx_dir}: no int8/ variant to serve; export with int8 on")
    folder = repository / serve.model_name / str(version)
    staging = folder.with_name(f".{version}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    source = onnx_dir / INT8 if precision == INT8 else onnx_dir
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(INT8, "parity.json"))
    shutil.copy2(HERE / "triton_model.py", staging / "model.py")
    shutil.copy2(HERE / "runtime.py", staging / "parti_runtime.py")
    body = {
        "version": version,
        "precision": precision,
        "target": target,
        **(report or {}),
        "sample": dataclasses.asdict(sample or SampleConfig()),
        "sample_rules": sampling_rules(),
    }
    (staging / "export.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    if folder.exists():  # moved aside first: a crash never leaves the version missing
        retired = folder.with_name(f".{version}.retired")
        shutil.rmtree(retired, ignore_errors=True)
        folder.rename(retired)
        staging.rename(folder)
        shutil.rmtree(retired)
    else:
        staging.rename(folder)
    if target == "gpu":
        for name in GRAPHS:
            graph_dir = repository / name
            (graph_dir / str(version)).mkdir(parents=True, exist_ok=True)
            shutil.copy2(onnx_dir / f"{name}.onnx", graph_dir / str(version) / "model.onnx")
            config = graph_config(name, onnx_dir)
            config.version_policy.specific.versions.append(version)
            write_config(config, graph_dir)
    return folder


def set_served_version(repository: str | Path, serve: ServeConfig, version: int) -> Path:
    """Point the `parti` model's version policy at `version` (its folder must exist)."""
    model_dir = Path(repository) / serve.model_name
    folder = model_dir / str(version)
    if not (folder / ONNX_META).is_file():
        raise RepositoryError(f"{folder}: no exported model; add the version first")
    meta = json.loads((folder / ONNX_META).read_text(encoding="utf-8"))
    return write_config(parti_config(serve, meta, version), model_dir)


def served_version(repository: str | Path, serve: ServeConfig) -> int | None:
    """The version the repository's `parti` config serves, None if there is no config."""
    path = Path(repository) / serve.model_name / CONFIG
    if not path.is_file():
        return None
    versions = list(read_config(path).version_policy.specific.versions)
    return versions[0] if versions else None


def versions(repository: str | Path, serve: ServeConfig) -> list[int]:
    """Version folders present for the `parti` model, ascending."""
    model_dir = Path(repository) / serve.model_name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def update_served_version(
    url: str,
    repository: str | Path,
    serve: ServeConfig,
    version: int,
    headers: dict[str, str] | None = None,
):
    """Serve `version` on a running server (explicit model control); keep the old on failure.

    Returns (served version, error or None). Triton reloads the model with the new
    config; when that load fails it keeps serving the loaded version, and the repository's
    config is put back. `headers` carry the admin key where the server restricts the
    model-repository API (`--http-restricted-api`), as deploy/k8s does.
    """
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    old = served_version(repository, serve)
    set_served_version(repository, serve, version)
    client = http.InferenceServerClient(url.removeprefix("http://"))
    try:
        client.load_model(serve.model_name, headers=headers)
    except InferenceServerException as err:
        if old is not None:
            set_served_version(repository, serve, old)
        hint = (
            " (the server restricts model control: pass its admin key)"
            if ("restricted" in (err.message() or "").lower() or err.status() == "403")
            else ""
        )
        still = f"; still serving {old}" if old is not None else ""
        return old, f"version {version} did not load ({err.message()}){hint}{still}"
    except BaseException:  # unreachable server, Ctrl-C: the repository stays as it was
        if old is not None:
            set_served_version(repository, serve, old)
        raise
    return version, None
