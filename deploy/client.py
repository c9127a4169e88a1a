"""Call the `parti` model of a Triton endpoint over HTTP or gRPC with `tritonclient`.

    images, tokens = generate("http://127.0.0.1:8000", ["a red circle on the left"], seed=3)

The URL's scheme picks the protocol: `http://` (default when there is none) or `grpc://`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parti_ops.model.errors import PartiError

SETTINGS = {  # input → (numpy dtype, Triton type)
    "seed": (np.int64, "INT64"),
    "guidance_scale": (np.float32, "FP32"),
    "temperature": (np.float32, "FP32"),
    "top_k": (np.int32, "INT32"),
    "top_p": (np.float32, "FP32"),
}


class ClientError(PartiError, RuntimeError):
    """The server refused or failed a request; the message is the server's."""


def protocol_of(url: str) -> tuple[Any, str]:
    """(tritonclient module, host:port) for an `http://` or `grpc://` URL."""
    if url.startswith("grpc://"):
        import tritonclient.grpc as module

        return module, url.removeprefix("grpc://")
    import tritonclient.http as module

    return module, url.removeprefix("http://")


def generate(
    url: str,
    prompts: Sequence[str],
    *,
    model: str = "parti",
    timeout_s: float = 300.0,
    **settings: float | int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) and codes (N, grid²) for N prompts; settings optional.

    `settings` are `seed`, `guidance_scale`, `temperature`, `top_k`, `top_p`; a seed applies
    to the first prompt and counts up from it, so a batch is reproducible. None leaves a
    setting to the server's default.
    """
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; use {', '.join(SETTINGS)}")
    module, address = protocol_of(url)
    from tritonclient.utils import InferenceServerException

    n = len(prompts)
    inputs = [_input(module, "prompt", np.array([[p.encode()] for p in prompts], dtype=object))]
    for name, value in settings.items():
        if value is None:
            continue
        dtype, _ = SETTINGS[name]
        column = np.arange(n) + value if name == "seed" else np.full(n, value)
        inputs.append(_input(module, name, column.astype(dtype).reshape(n, 1)))
    outputs = [module.InferRequestedOutput(name) for name in ("image", "tokens")]
    kwargs = {"network_timeout": timeout_s} if module.__name__.endswith("http") else {}
    client = module.InferenceServerClient(address, **kwargs)
    try:
        result = client.infer(model, inputs, outputs=outputs, **_timeout(module, timeout_s))
    except InferenceServerException as err:
        raise ClientError(err.message() or str(err)) from None
    finally:
        client.close()
    return result.as_numpy("image"), result.as_numpy("tokens")


def _input(module: Any, name: str, array: np.ndarray):
    triton_type = "BYTES" if array.dtype == object else SETTINGS[name][1]
    tensor = module.InferInput(name, list(array.shape), triton_type)
    tensor.set_data_from_numpy(array)
    return tensor


def _timeout(module: Any, timeout_s: float) -> dict[str, Any]:
    return {"client_timeout": timeout_s} if module.__name__.endswith("grpc") else {}
