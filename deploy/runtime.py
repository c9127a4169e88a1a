"""Prompt → image with ONNX Runtime: what the Triton model runs, and nothing more.

Needs numpy, onnxruntime and tokenizers only — no torch, no parti-ops package — so that it
is copied into each version folder of the Triton repository (`parti_runtime.py`) and
serves from a plain Triton image. It mirrors `model/sampling.py`: prefill with the null
caption beside each prompt (classifier-free guidance), then one decoder step per code over
an explicit KV cache, then the VQGAN decoder. Sampling settings are per row, so requests
with different settings share one batch. Draws come from numpy generators seeded per
prompt: the same seed gives the same image here, and greedy decoding (temperature 0) gives
the codes PyTorch gives.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# model/layout.py's GRAPHS, restated: this file runs without the package (tests check both agree).
TEXT_ENCODER, DECODER_STEP, IMAGE_DECODER = "text_encoder", "decoder_step", "image_decoder"


class RequestError(ValueError):
    """A prompt or sampling setting that cannot be served; the message says which and why."""


def check_settings(settings: Mapping[str, float], rules: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise RequestError naming the first setting outside its rule.

    The rules are SampleConfig's declared ranges as the export wrote them into
    `export.json` (parti_ops.model.config.sampling_rules): bounds `ge`/`gt`/`le`/`lt`,
    `finite`, and `use`, the words saying what to send instead.
    """
    for name, rule in rules.items():
        value = settings[name]
        within = all(
            bound is None or holds(value, bound)
            for holds, bound in (
                (operator.ge, rule.get("ge")),
                (operator.gt, rule.get("gt")),
                (operator.le, rule.get("le")),
                (operator.lt, rule.get("lt")),
            )
        )  # NaN compares false with every bound
        if not within or math.isnan(value) or (rule.get("finite") and not math.isfinite(value)):
            raise RequestError(f"{name}={value}: use {rule['use']}")


def apply_cfg(cond: np.ndarray, uncond: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """uncond + scale * (cond - uncond) per row, exactly cond where scale is 1."""
    return cond + (scale[:, None] - 1.0) * (cond - uncond)


def sample_logits(
    logits: np.ndarray,
    rngs: Sequence[np.random.Generator],
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
) -> np.ndarray:
    """Logits (B, K) → codes (B,), each row with its own settings and generator.

    Temperature 0 is argmax. Otherwise temperature, top-k, then top-p (the smallest set
    of most likely codes whose mass reaches top_p; the most likely always stays), and an
    inverse-CDF draw with one uniform number from the row's generator.
    """
    b, k = logits.shape
    chosen = logits.argmax(axis=-1)
    sampled = temperature > 0
    if not sampled.any():
        return chosen
    rows = np.flatnonzero(sampled)
    x = logits[rows].astype(np.float64) / temperature[rows, None]
    kk = top_k[rows]
    limit = (kk > 0) & (kk < k)
    if limit.any():
        kth = -np.sort(-x, axis=-1)[np.arange(len(rows)), np.clip(kk - 1, 0, k - 1)]
        x = np.where(limit[:, None] & (x < kth[:, None]), -np.inf, x)
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if (top_p[rows] < 1).any():  # the sort only where some row asks for nucleus sampling
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        sorted_probs = np.where(before >= top_p[rows, None], 0.0, sorted_probs)
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_probs, axis=-1)
    u = np.array([rngs[r].random() for r in rows])
    cdf = np.cumsum(probs, axis=-1)
    allowed = probs > 0
    above = (cdf > (u * cdf[:, -1])[:, None]) & allowed
    last_allowed = k - 1 - allowed[:, ::-1].argmax(axis=-1)
    chosen[rows] = np.where(above.any(axis=-1), above.argmax(axis=-1), last_allowed)
    return chosen


class OnnxTextToImage:
    """The exported graphs of one model folder (`parti export onnx`), sampling images.

    Args:
        folder: holds the three `.onnx` files, `text_tokenizer/` and `meta.json`.
        providers: ONNX Runtime execution providers, in order of preference.
        threads: intra-op threads per graph; 0 lets ONNX Runtime choose.
    """

    def __init__(self, folder: Path, providers: Sequence[str], threads: int):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # The three graphs run in turn; idle pool threads spinning for work would steal
        # the cores from the one that runs (measured: 2 threads spinning ran slower than 1).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {
            name: ort.InferenceSession(
                str(folder / f"{name}.onnx"), sess_options=options, providers=list(providers)
            )
            for name in (TEXT_ENCODER, DECODER_STEP, IMAGE_DECODER)
        }
        self.tokenizer = Tokenizer.from_file(str(folder / "text_tokenizer" / "tokenizer.json"))
        self.pad_id = self.tokenizer.token_to_id("<pad>") or 0

    @classmethod
    def load(
        cls,
        folder: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int = 0,
    ) -> OnnxTextToImage:
        """ValueError names a missing file of the folder."""
        folder = Path(folder)
        needed = [f"{n}.onnx" for n in (TEXT_ENCODER, DECODER_STEP, IMAGE_DECODER)]
        needed += ["meta.json", "text_tokenizer/tokenizer.json"]
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{folder}: missing {', '.join(missing)}; run `parti export onnx`")
        return cls(folder, providers, threads)

    @property
    def image_length(self) -> int:
        return self.meta["grid"] ** 2

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts → ids (B, T) int64, mask (B, T) bool, null (B,) bool, as `TextToImage` does.

        Empty prompts are null (unconditional); longer than the model's text length are cut,
        keeping `</s>`.
        """
        limit = self.meta["text_length"]
        prompts = [p.strip() for p in prompts]
        encoded = [e.ids for e in self.tokenizer.encode_batch(prompts)]
        encoded = [seq if len(seq) <= limit else seq[: limit - 1] + seq[-1:] for seq in encoded]
        width = max(len(seq) for seq in encoded)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)] = seq
        lengths = np.array([len(seq) for seq in encoded])
        mask = np.arange(width)[None, :] < lengths[:, None]
        null = np.array([not p for p in prompts], dtype=bool)
        return ids, mask, null

    def _prefill(self, ids: np.ndarray, mask: np.ndarray, null: np.ndarray) -> list[np.ndarray]:
        feeds = {"text_ids": ids, "text_mask": mask, "null": null}
        return self.sessions[TEXT_ENCODER].run(None, feeds)

    def _step(self, token: np.ndarray, past: list[np.ndarray], cross: list[np.ndarray]):
        feeds = {
            "token": token.astype(np.int64),
            "past_key": past[0],
            "past_value": past[1],
            "cross_key": cross[0],
            "cross_value": cross[1],
            "cross_mask": cross[2],
        }
        logits, key, value = self.sessions[DECODER_STEP].run(None, feeds)
        return logits, [key, value]

    def generate_codes(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        null: np.ndarray,
        seeds: Sequence[int],
        *,
        guidance_scale: float | np.ndarray,
        temperature: float | np.ndarray,
        top_k: int | np.ndarray,
        top_p: float | np.ndarray,
        cancelled: Callable[[], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Codes (B, grid, grid) for prompts (B, T); settings are scalars or one per row.

        `cancelled()`, called before every step, returns a (B,) bool array; cancelled rows
        stop being decoded (their codes stay -1) and, once all are, decoding stops.
        """
        b = ids.shape[0]
        per_row = [
            np.broadcast_to(np.asarray(v, dtype=dtype), (b,)).copy()
            for v, dtype in (
                (guidance_scale, np.float32),
                (temperature, np.float64),
                (top_k, np.int64),
                (top_p, np.float64),
            )
        ]
        scale, temp, k, p = per_row
        rngs = [np.random.default_rng(int(s)) for s in seeds]
        guided = bool((scale != 1.0).any())
        if guided:  # the prompts, then the same rows as null captions (model/sampling.py)
            ids, mask = np.concatenate([ids, ids]), np.concatenate([mask, mask])
            null = np.concatenate([null, np.ones_like(null)])
        logits, key, value, cross_k, cross_v, cross_mask = self._prefill(ids, mask, null)
        past, cross = [key, value], [cross_k, cross_v, cross_mask]
        codes = np.full((b, self.image_length), -1, dtype=np.int64)
        active = np.arange(b)  # prompt rows still decoding
        for i in range(self.image_length):
            if cancelled is not None:
                keep = ~cancelled()[active]
                if not keep.all():
                    active, logits = active[keep], _rows(logits, keep, guided)
                    past = [_rows(t, keep, guided, axis=1) for t in past]
                    cross = [
                        _rows(t, keep, guided, axis=a)
                        for t, a in zip(cross, (1, 1, 0), strict=True)
                    ]
                    if not len(active):
                        break
            if guided:
                cond, uncond = np.split(logits, 2)
                mixed = apply_cfg(cond, uncond, scale[active])
            else:
                mixed = logits
            chosen = sample_logits(
                mixed, [rngs[r] for r in active], temp[active], k[active], p[active]
            )
            codes[active, i] = chosen
            if i + 1 < self.image_length:
                token = np.concatenate([chosen, chosen]) if guided else chosen
                logits, past = self._step(token, past, cross)
        grid = self.meta["grid"]
        return codes.reshape(b, grid, grid)

    def teacher_forced_logits(
        self, ids: np.ndarray, mask: np.ndarray, null: np.ndarray, codes: np.ndarray
    ) -> np.ndarray:
        """Logits (B, N, K) at every position when fed `codes` (B, N): the parity check's view."""
        logits, key, value, cross_k, cross_v, cross_mask = self._prefill(ids, mask, null)
        past, cross, out = [key, value], [cross_k, cross_v, cross_mask], [logits]
        for i in range(codes.shape[1] - 1):
            logits, past = self._step(codes[:, i], past, cross)
            out.append(logits)
        return np.stack(out, axis=1)

    def decode_images(self, codes: np.ndarray) -> np.ndarray:
        """Codes (B, grid, grid) → uint8 images (B, H, W, 3)."""
        (image,) = self.sessions[IMAGE_DECODER].run(None, {"codes": codes.astype(np.int64)})
        return image

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int],
        cancelled: Callable[[], np.ndarray] | None = None,
        **settings: float | np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, H, W, 3) uint8 and codes (B, grid, grid) for prompts, one seed each.

        `settings`: guidance_scale, temperature, top_k and top_p, as `generate_codes` takes them.
        """
        if len(seeds) != len(prompts):
            raise RequestError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        ids, mask, null = self.encode_prompts(prompts)
        codes = self.generate_codes(ids, mask, null, seeds, cancelled=cancelled, **settings)
        done = (codes >= 0).all(axis=(1, 2))
        images = np.zeros((len(prompts), *self.image_shape), dtype=np.uint8)
        if done.any():
            images[done] = self.decode_images(codes[done])
        return images, codes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.meta["image_size"]
        return (size, size, 3)


def _rows(array: np.ndarray, keep: np.ndarray, guided: bool, axis: int = 0) -> np.ndarray:
    """Keep the rows `keep` (B,) of a (B or 2B)-row array along `axis` (both halves if guided)."""
    index = np.flatnonzero(keep)
    if guided:
        index = np.concatenate([index, index + array.shape[axis] // 2])
    return np.take(array, index, axis=axis)
