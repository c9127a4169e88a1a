"""Triton Python-backend model `parti`: prompt → text tokens → encoder → decode loop → image.

Copied into each version folder as `model.py`, beside `parti_runtime.py`
(`deploy/runtime.py`); it needs numpy, onnxruntime and tokenizers only. The whole decode
loop runs inside this model, with no Triton round-trip per code. It follows the
python_backend contract: `initialize` reads the config once, `execute` returns exactly one
response per request, and a bad request gets an error response naming the input and the
fix while the other requests of the batch are served.

Inputs, each (1,) per prompt: `prompt` (BYTES, UTF-8), and optional `seed`,
`guidance_scale`, `temperature`, `top_k`, `top_p`. Outputs: `image` (UINT8 H×W×3) and
`tokens` (INT32, the image codes in raster order).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parti_runtime import OnnxTextToImage, RequestError, check_settings  # noqa: E402

SETTINGS = ("seed", "guidance_scale", "temperature", "top_k", "top_p")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        export = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        self.defaults = {name: export["sample"][name] for name in SETTINGS}
        self.rules = export["sample_rules"]  # SampleConfig's ranges: parti_ops.model.config
        self.max_prompt_bytes = int(params.get("max_prompt_bytes", "4096"))
        self.cancel_check_s = float(params.get("cancel_check_ms", "20")) / 1000
        providers = [p.strip() for p in params.get("providers", "CPUExecutionProvider").split(",")]
        self.model = OnnxTextToImage.load(folder, providers, int(params.get("threads", "0")))
        self.log = pb_utils.Logger
        self.log.log_info(f"parti: version {args['model_version']} ({export.get('precision')})")

    def execute(self, requests):
        responses = [None] * len(requests)
        rows = []  # (request index, prompt, settings)
        for i, request in enumerate(requests):
            try:
                rows.extend((i, prompt, settings) for prompt, settings in self._parse(request))
            except RequestError as err:
                responses[i] = _error(str(err))
        if rows:
            self._generate(requests, rows, responses)
        return responses

    def _parse(self, request):
        prompts = pb_utils.get_input_tensor_by_name(request, "prompt")
        if prompts is None:
            raise RequestError("missing input 'prompt': send one BYTES prompt per row")
        values = prompts.as_numpy().reshape(-1)
        if len(values) == 0:
            raise RequestError("empty batch: send at least one prompt")
        texts = []
        for row, value in enumerate(values):
            raw = value if isinstance(value, bytes) else str(value).encode()
            if len(raw) > self.max_prompt_bytes:
                raise RequestError(
                    f"prompt {row}: {len(raw)} bytes, more than {self.max_prompt_bytes}; shorten it"
                )
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise RequestError(
                    f"prompt {row}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
        columns = {}
        for name in SETTINGS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                columns[name] = [self.defaults[name]] * len(texts)
                continue
            column = tensor.as_numpy().reshape(-1)
            if len(column) != len(texts):
                raise RequestError(f"input '{name}': {len(column)} values for {len(texts)} prompts")
            columns[name] = column.tolist()
        parsed = []
        for row, text in enumerate(texts):
            settings = {name: columns[name][row] for name in SETTINGS}
            try:
                check_settings(settings, self.rules)
            except RequestError as err:
                raise RequestError(f"prompt {row}: {err}") from None
            parsed.append((text, settings))
        return parsed

    def _generate(self, requests, rows, responses):
        owner = np.array([i for i, _, _ in rows])
        flags = np.zeros(len(requests), dtype=bool)
        last = [0.0]

        def cancelled():
            # Asked before every decode step, but each `is_cancelled` is a round trip to
            # the server (about 0.3 ms; one per step cost a third of the throughput on
            # CPU), so the server is polled at most every `cancel_check_ms`.
            now = time.monotonic()
            if now - last[0] >= self.cancel_check_s:
                last[0] = now
                flags[:] = [request.is_cancelled() for request in requests]
            return flags[owner]

        column = {name: np.array([s[name] for _, _, s in rows]) for name in SETTINGS}
        try:
            images, codes = self.model(
                [prompt for _, prompt, _ in rows],
                seeds=column["seed"].tolist(),
                guidance_scale=column["guidance_scale"],
                temperature=column["temperature"],
                top_k=column["top_k"],
                top_p=column["top_p"],
                cancelled=cancelled,
            )
        except Exception as err:  # one failed batch must not take the model down
            self.log.log_error(f"parti: generation failed: {err!r}")
            for i in set(owner.tolist()):
                responses[i] = _error(f"generation failed: {err}")
            return
        done = (codes >= 0).reshape(len(rows), -1).all(axis=1)
        for i in sorted(set(owner.tolist())):
            mine = owner == i
            if not done[mine].all():
                responses[i] = _error("request cancelled", pb_utils.TritonError.CANCELLED)
                continue
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("image", images[mine]),
                    pb_utils.Tensor(
                        "tokens", codes[mine].reshape(int(mine.sum()), -1).astype(np.int32)
                    ),
                ]
            )

    def finalize(self):
        self.model = None


def _error(message, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
