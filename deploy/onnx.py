"""ONNX export of a trained bundle, checked against PyTorch right after it is written.

Three graphs sample an image together, the way `model/sampling.py` does in PyTorch:

- `text_encoder.onnx`, the prefill: prompt ids (B, T), mask (B, T), null (B,) → the first
  code's logits (B, K), the start token's self-attention K/V (L, B, H, 1, Dh) and the
  text's cross-attention K/V (L, B, H, T, Dh) with its mask (B, T).
- `decoder_step.onnx`: the code just chosen (B,), the past K/V (L, B, H, P, Dh) and the
  cross-attention K/V → the next logits (B, K) and the K/V with P + 1 positions.
- `image_decoder.onnx`: codes (B, g, g) → uint8 pixels (B, H, W, 3).

Batch, text length and past length are dynamic axes. The folder also holds the caption
tokenizer and `meta.json`, so that a server needs nothing else (`deploy/runtime.py`).
The int8 variant is ONNX Runtime's dynamic quantisation of the two Transformer graphs
(weights int8, activations quantised per call); the image decoder stays fp32.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from parti_ops.model.config import ExportConfig, SampleConfig
from parti_ops.model.errors import PartiError
from parti_ops.model.generate import TextToImage
from parti_ops.model.layout import (
    DECODER_STEP,
    IMAGE_DECODER,
    IMAGE_TOKENIZER,
    INT8,
    ONNX_META,
    PARTI,
    TEXT_ENCODER,
    TEXT_TOKENIZER,
)
from parti_ops.model.parti import KVCache, Parti
from parti_ops.model.sampling import generate_codes
from parti_ops.model.scenes import compare, prompt_suite, read_scene
from parti_ops.model.vqgan import VQGAN, to_uint8

log = logging.getLogger(__name__)


class ExportError(PartiError, ValueError):
    """An export that cannot be made or fails its parity check; the message says which."""


class _TextEncoder(nn.Module):
    def __init__(self, parti: Parti):
        super().__init__()
        self.parti = parti

    def forward(self, text_ids, text_mask, null):
        states, mask = self.parti.encode_text(text_ids, text_mask, null)
        cache = self.parti.start_cache(states, mask)
        start = torch.full_like(text_ids[:, :1], self.parti.start_token)
        logits, cache = self.parti.decode(start, cache)
        stack = torch.stack
        return (
            logits[:, -1],
            stack(cache.self_k),
            stack(cache.self_v),
            stack(cache.cross_k),
            stack(cache.cross_v),
            mask,
        )


class _DecoderStep(nn.Module):
    def __init__(self, parti: Parti):
        super().__init__()
        self.parti = parti

    def forward(self, token, past_key, past_value, cross_key, cross_value, cross_mask):
        cache = KVCache(
            list(past_key.unbind(0)),
            list(past_value.unbind(0)),
            list(cross_key.unbind(0)),
            list(cross_value.unbind(0)),
            cross_mask,
        )
        logits, cache = self.parti.decode(token[:, None], cache)
        return logits[:, -1], torch.stack(cache.self_k), torch.stack(cache.self_v)


class _ImageDecoder(nn.Module):
    def __init__(self, vqgan: VQGAN):
        super().__init__()
        self.vqgan = vqgan

    def forward(self, codes):
        return to_uint8(self.vqgan.decode_codes(codes))


# Input and output names of each graph, in argument order; `deploy/runtime.py` feeds these.
NAMES = {
    TEXT_ENCODER: (
        ["text_ids", "text_mask", "null"],
        ["logits", "present_key", "present_value", "cross_key", "cross_value", "cross_mask"],
    ),
    DECODER_STEP: (
        ["token", "past_key", "past_value", "cross_key", "cross_value", "cross_mask"],
        ["logits", "present_key", "present_value"],
    ),
    IMAGE_DECODER: (["codes"], ["image"]),
}


def export_onnx(bundle: str | Path, out: str | Path, config: ExportConfig) -> dict[str, Any]:
    """Write the three graphs, the tokenizer and `meta.json` to `out`, then check parity.

    Returns the parity report (also written as `out/parity.json`); ExportError when a
    check fails, naming the check, the measured value and the bound, and `out` is left
    as it was. An existing `out` is replaced only if it is an earlier export.
    """
    import onnx

    bundle, final = Path(bundle), Path(out)
    if final.exists() and any(final.iterdir()) and not (final / ONNX_META).is_file():
        raise ExportError(f"{final}: not empty and not an export; give a new or export folder")
    model = TextToImage.load(bundle)
    # Written beside the target and moved into place only once parity holds, so a
    # folder with meta.json is always one that passed.
    out = final.with_name(f".{final.name}.partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parti, vqgan = model.parti, model.vqgan
    ids, mask, null = model.encode_prompts(["a red circle", "two blue squares", ""])
    batch = torch.export.Dim("batch", min=1, max=4096)
    text = torch.export.Dim("text", min=1, max=parti.dims.text_length)
    past = torch.export.Dim("past", min=1, max=parti.dims.image_length)
    with torch.no_grad():
        first = _TextEncoder(parti)(ids, mask, null)
    token = ids.new_zeros(ids.shape[0])
    codes = torch.zeros(2, vqgan.grid, vqgan.grid, dtype=torch.int64)
    kv = {1: batch, 3: past}
    cross = {1: batch, 3: text}
    graphs = {
        TEXT_ENCODER: (
            _TextEncoder(parti),
            (ids, mask, null),
            {"text_ids": {0: batch, 1: text}, "text_mask": {0: batch, 1: text}, "null": {0: batch}},
        ),
        DECODER_STEP: (
            _DecoderStep(parti),
            (token, *first[1:]),
            {
                "token": {0: batch},
                "past_key": kv,
                "past_value": kv,
                "cross_key": cross,
                "cross_value": cross,
                "cross_mask": {0: batch, 1: text},
            },
        ),
        IMAGE_DECODER: (_ImageDecoder(vqgan), (codes,), {"codes": {0: batch}}),
    }
    for name, (module, args, dynamic) in graphs.items():
        inputs, outputs = NAMES[name]
        path = out / f"{name}.onnx"
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=True,
            opset_version=config.opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dict(zip(_arg_names(module), dynamic.values(), strict=True)),
            external_data=False,
            verbose=False,
        )
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    shutil.copytree(bundle / TEXT_TOKENIZER, out / TEXT_TOKENIZER)
    meta = {
        "grid": parti.dims.grid,
        "codebook_size": parti.dims.codebook_size,
        "text_length": parti.dims.text_length,
        "image_size": vqgan.image_size,
        "layers": parti.config.decoder_layers,
        "heads": parti.config.heads,
        "head_dim": parti.config.d_model // parti.config.heads,
        "opset": config.opset,
        "source": {
            part: _file_digest(bundle / part / name)
            for part, name in ((PARTI, "model.safetensors"), (IMAGE_TOKENIZER, "model.safetensors"))
        },
    }
    (out / ONNX_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    try:
        report = check_parity(model, out, config)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    (out / "parity.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    return report


def _arg_names(module: nn.Module) -> list[str]:
    import inspect

    return list(inspect.signature(module.forward).parameters)


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_parity(
    model: TextToImage, folder: Path, config: ExportConfig, runtime: Any = None
) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch on `config.parity_prompts` prompts with guidance, greedy.

    - logits: the largest |difference| of every step's conditional and null logits, the
      ONNX graphs fed the codes PyTorch chose (teacher forcing);
    - pixels: the mean |difference| of the decoded images, in [0, 1] units;
    - greedy: the share of prompts whose whole code sequence is the same when each side
      decodes greedily on its own.
    """
    from parti_ops.deploy.runtime import OnnxTextToImage

    prompts = [p for p, _ in prompt_suite(config.parity_prompts)]
    runtime = runtime or OnnxTextToImage.load(folder)
    ids, mask, null = model.encode_prompts(prompts)
    seeds = list(range(len(prompts)))
    scale = config.parity_guidance
    torch_codes = generate_codes(
        model.parti, ids, mask, seeds, guidance_scale=scale, temperature=0.0, null=null
    ).cpu()
    ort_ids, ort_mask, ort_null = runtime.encode_prompts(prompts)
    if not np.array_equal(ort_ids, ids.cpu().numpy()) or not np.array_equal(
        ort_mask, mask.cpu().numpy()
    ):
        raise ExportError("the served tokenizer encodes the parity prompts differently")
    greedy = runtime.generate_codes(
        ort_ids,
        ort_mask,
        ort_null,
        seeds,
        guidance_scale=scale,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
    )
    agree = greedy.reshape(len(prompts), -1) == torch_codes.reshape(len(prompts), -1).numpy()
    logits_diff = _teacher_forced_diff(model, runtime, ids, mask, null, torch_codes.to(ids.device))
    with torch.no_grad():
        reference = to_uint8(model.vqgan.decode_codes(torch_codes.to(ids.device))).cpu().numpy()
    pixels = runtime.decode_images(torch_codes.numpy())
    pixel_diff = float(np.abs(pixels.astype(np.float32) - reference).mean() / 255)
    report = {
        "prompts": len(prompts),
        "guidance_scale": scale,
        "logits_max_abs_diff": logits_diff,
        "pixels_mean_abs_diff": pixel_diff,
        "greedy_sequence_agreement": float(agree.all(axis=1).mean()),
        "greedy_token_agreement": float(agree.mean()),
        "bounds": {"logits_atol": config.logits_atol, "pixel_tolerance": config.pixel_tolerance},
    }
    failures = []
    if logits_diff > config.logits_atol:
        failures.append(f"logits differ by {logits_diff:.2e} > {config.logits_atol:.0e}")
    if pixel_diff > config.pixel_tolerance:
        failures.append(f"pixels differ by {pixel_diff:.2e} > {config.pixel_tolerance:.2e}")
    if report["greedy_sequence_agreement"] < 1.0:
        failures.append(
            f"greedy decoding agrees on {report['greedy_sequence_agreement']:.1%} of prompts"
        )
    if failures:
        raise ExportError(f"{folder}: ONNX parity failed: {'; '.join(failures)}")
    return report


@torch.no_grad()
def _teacher_forced_diff(model, runtime, ids, mask, null, codes) -> float:
    """max |ONNX − PyTorch| over every position's logits, both halves of the guided batch."""
    b = ids.shape[0]
    ids2, mask2 = ids.repeat(2, 1), mask.repeat(2, 1)
    null2 = torch.cat([null, torch.ones_like(null)])
    flat = codes.reshape(b, -1).repeat(2, 1)
    reference = model.parti(ids2, mask2, flat, null2).cpu().numpy()  # (2B, N, K)
    ids2, mask2, null2, flat = (t.cpu().numpy() for t in (ids2, mask2, null2, flat))
    steps = runtime.teacher_forced_logits(ids2, mask2, null2, flat)
    return float(np.abs(steps - reference).max())


def quantize_int8(folder: str | Path) -> Path:
    """The int8 variant under `folder/int8`: dynamic quantisation of the Transformer graphs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(folder)
    target = folder / INT8
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for name in (TEXT_ENCODER, DECODER_STEP):
        quantize_dynamic(
            folder / f"{name}.onnx", target / f"{name}.onnx", weight_type=QuantType.QInt8
        )
    shutil.copy2(folder / f"{IMAGE_DECODER}.onnx", target / f"{IMAGE_DECODER}.onnx")
    shutil.copytree(folder / TEXT_TOKENIZER, target / TEXT_TOKENIZER)
    meta = json.loads((folder / ONNX_META).read_text(encoding="utf-8"))
    (target / ONNX_META).write_text(json.dumps({**meta, "precision": "int8"}, indent=2) + "\n")
    return target


def compare_int8(folder: str | Path, config: ExportConfig) -> dict[str, Any]:
    """Oracle fidelity and decode speed of the int8 variant against fp32, same prompts and seeds.

    `served` is True when the fidelity drop is within `config.max_int8_fidelity_drop`.
    """
    from parti_ops.deploy.runtime import OnnxTextToImage

    folder = Path(folder)
    pairs = prompt_suite(config.int8_prompts, seed=1)
    prompts = [p for p, _ in pairs]
    seeds = list(range(len(prompts)))
    result: dict[str, Any] = {"prompts": len(prompts)}
    for name, path in (("fp32", folder), ("int8", folder / INT8)):
        runtime = OnnxTextToImage.load(path)
        start = time.perf_counter()
        images, _ = runtime(
            prompts,
            seeds=seeds,
            **{**SampleConfig().sampling_kwargs(), "guidance_scale": config.parity_guidance},
        )
        seconds = time.perf_counter() - start
        exact = [
            compare(read_scene(image), scene)["exact"]
            for image, (_, scene) in zip(images, pairs, strict=True)
        ]
        result[name] = {"fidelity": float(np.mean(exact)), "images_per_s": len(prompts) / seconds}
    result["fidelity_drop"] = result["fp32"]["fidelity"] - result["int8"]["fidelity"]
    result["speedup"] = result["int8"]["images_per_s"] / result["fp32"]["images_per_s"]
    result["max_fidelity_drop"] = config.max_int8_fidelity_drop
    result["served"] = result["fidelity_drop"] <= config.max_int8_fidelity_drop
    (folder / INT8 / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
