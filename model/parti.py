"""Parti: a Transformer text encoder and an autoregressive decoder over image codes.

Yu et al. 2022, "Scaling Autoregressive Models for Content-Rich Text-to-Image Generation":
the caption is encoded bidirectionally; the decoder predicts the image's VQGAN codes in
raster order with causal self-attention and cross-attention to the text states. A learned
null caption stands in for dropped captions in training, which gives the unconditional
path of classifier-free guidance.

The decoder runs over new positions given a cache of the past (`decode`), so one code path
serves training (all positions, empty cache), prefill and one-token steps. A cache holds,
per layer, the self-attention keys/values so far and the cross-attention keys/values of the
text, which are computed once per prompt.

Shapes: B batch, T text tokens, N = grid² image codes, D d_model, H heads, L layers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parti_ops.model.config import Config, PartiConfig
from parti_ops.model.errors import ModelFolderError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class PartiDims:
    """What the tokenizers fix: vocabularies and lengths."""

    text_vocab: int
    text_length: int
    codebook_size: int
    grid: int  # codes along a side; an image is grid * grid codes

    @property
    def image_length(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_config(cls, config: Config) -> PartiDims:
        """What tokenizers trained with `config` would fix (their vocabularies are upper bounds)."""
        return cls(
            text_vocab=config.text_tokenizer.vocab_size,
            text_length=config.text_tokenizer.max_length,
            codebook_size=config.image_tokenizer.codebook_size,
            grid=config.image_grid,
        )

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> PartiDims:
        """What the tokenizers that encoded a data set fix, from its manifest (`encode`)."""
        return cls(
            text_vocab=int(manifest["vocab_size"]),
            text_length=int(manifest["max_length"]),
            codebook_size=int(manifest["codebook_size"]),
            grid=int(manifest["grid"][0]),
        )


@dataclass
class KVCache:
    """Per-layer attention keys and values of one batch of prompts, each (B, H, *, D / H)."""

    self_k: list[torch.Tensor]  # image positions decoded so far
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]  # text positions, fixed per prompt
    cross_v: list[torch.Tensor]
    text_mask: torch.Tensor  # (B, T) True where the text is a real token
    prompt: torch.Tensor | None = None  # (B, D) added to the start token's input

    @property
    def length(self) -> int:
        return self.self_k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        # LayerNorm of each head's queries and keys (Dehghani et al. 2023): the logits start
        # at a useful scale instead of near zero, so attention can become selective early.
        self.q_norm, self.k_norm = nn.LayerNorm(d_model // heads), nn.LayerNorm(d_model // heads)

    def _split(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """(B, n, D) → (B, H, n, D/H), each head normalised by `norm` first: before the
        transpose the heads are contiguous, so the norm copies nothing (a tiny-preset training
        step on 2 CPU cores measured 7 % faster than normalising the transposed view)."""
        b, n, d = x.shape
        x = x.view(b, n, self.heads, d // self.heads)
        return (x if norm is None else norm(x)).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split(k, self.k_norm), self._split(v)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x (B, n, D) attends to k, v (B, H, m, D/H); mask (B or 1, 1, n or 1, m), True = keep."""
        q = self._split(self.q(x), self.q_norm)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.out(y.transpose(1, 2).flatten(2))  # (B, n, D)


class ReLUSquared(nn.Module):
    """relu(x)² (So et al. 2021, "Primer"), the MLPs' activation
    (docs/experiments/decoder-relu2-zero-init-wsd.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        return y * y


class MLP(nn.Sequential):
    def __init__(self, d_model: int, ratio: int, dropout: float):
        super().__init__(
            nn.Linear(d_model, ratio * d_model),
            ReLUSquared(),
            nn.Linear(ratio * d_model, d_model),
            nn.Dropout(dropout),
        )


class EncoderLayer(nn.Module):
    def __init__(self, cfg: PartiConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, *self.attn.keys_values(h), mask=mask)
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PartiConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.cross_attn = Attention(cfg.d_model, cfg.heads, cfg.dropout)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio, cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor],
        cross: tuple[torch.Tensor, torch.Tensor],
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, n, D) at the n positions after the cached past → (x, (k, v) with x's appended)."""
        h = self.norm1(x)
        k_new, v_new = self.self_attn.keys_values(h)
        n, seen = x.shape[1], past[0].shape[2]
        if seen:
            k, v = torch.cat([past[0], k_new], dim=2), torch.cat([past[1], v_new], dim=2)
        else:  # nothing cached (training, prefill): no copy, and no cast of bf16 keys
            k, v = k_new, v_new
        if n == 1:  # one new position sees everything before it
            x = x + self.self_attn(h, k, v)
        elif seen == 0:
            x = x + self.self_attn(h, k, v, causal=True)
        else:  # several new positions after a cached past
            keep = torch.ones(n, seen + n, dtype=torch.bool, device=x.device).tril(seen)
            x = x + self.self_attn(h, k, v, mask=keep)
        x = x + self.cross_attn(self.norm2(x), *cross, mask=text_mask)
        return x + self.mlp(self.norm3(x)), (k, v)


class Parti(nn.Module):
    """Text encoder + image-code decoder.

    Args:
        config: the `parti` section of the config.
        dims: vocabularies and lengths, from the tokenizers.
    """

    def __init__(self, *, config: PartiConfig, dims: PartiDims):
        super().__init__()
        self.config, self.dims = config, dims
        d = config.d_model
        self.text_embed = nn.Embedding(dims.text_vocab, d)
        self.text_pos = nn.Parameter(torch.zeros(dims.text_length, d))
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        # The null caption: one learned text state that dropped captions are replaced by.
        self.null_text = nn.Parameter(torch.zeros(1, 1, d))
        # Codes 0..K-1, and K: the start token before the first code.
        self.code_embed = nn.Embedding(dims.codebook_size + 1, d)
        # 2-D positions: a row and a column embedding, summed, for each grid cell.
        self.row_pos = nn.Parameter(torch.zeros(dims.grid, d))
        self.col_pos = nn.Parameter(torch.zeros(dims.grid, d))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        # The caption, pooled, added to the start token's input: position 0 then carries
        # the prompt, and every later position can read it through self-attention.
        self.prompt_proj = nn.Linear(d, d)
        self.drop = nn.Dropout(config.dropout)
        self.apply(_init_weights)
        for p in (self.text_pos, self.row_pos, self.col_pos, self.null_text):
            nn.init.normal_(p, std=0.02)
        # Every residual branch starts at zero, so each layer starts as the identity (the
        # output projections of attention and MLP; as in Jordan et al.'s modded-nanogpt).
        for module in self.modules():
            if isinstance(module, Attention):
                nn.init.zeros_(module.out.weight)
            elif isinstance(module, MLP):
                nn.init.zeros_(module[2].weight)

    @property
    def start_token(self) -> int:
        return self.dims.codebook_size

    def encode_text(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, null: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask, null (B,) bool → text states (B, T, D) and their mask (B, T).

        Rows where `null` is True get the null caption: its state at position 0, the rest masked.
        """
        t = text_ids.shape[1]
        x = self.drop(self.text_embed(text_ids) + self.text_pos[:t])
        mask = text_mask[:, None, None, :]  # (B, 1, 1, T) for every query
        for layer in self.encoder:
            x = layer(x, mask)
        states = self.encoder_norm(x)
        if null is not None:
            null_mask = torch.zeros_like(text_mask)
            null_mask[:, 0] = True
            null_states = self.null_text.expand_as(states) * null_mask[..., None]
            states = torch.where(null[:, None, None], null_states, states)
            # Logical ops, not torch.where: ONNX Runtime has no boolean Where kernel.
            keep = null[:, None]
            text_mask = (null_mask & keep) | (text_mask & ~keep)
        return states, text_mask

    def start_cache(self, states: torch.Tensor, text_mask: torch.Tensor) -> KVCache:
        """An empty cache for text states (B, T, D): cross-attention K/V computed here, once."""
        b, d, heads = states.shape[0], self.config.d_model, self.config.heads
        empty = states.new_zeros(b, heads, 0, d // heads)
        cross = [layer.cross_attn.keys_values(states) for layer in self.decoder]
        return KVCache(
            self_k=[empty] * len(self.decoder),
            self_v=[empty] * len(self.decoder),
            cross_k=[k for k, _ in cross],
            cross_v=[v for _, v in cross],
            text_mask=text_mask,
            prompt=self._pool(states, text_mask),
        )

    def _pool(self, states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the real text states (B, T, D) → projected (B, D)."""
        weights = text_mask[..., None].to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.prompt_proj(pooled)

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Decoder inputs (B, n) at the n positions after `cache.length` → logits (B, n, K).

        Input i is the code before position i (the start token at position 0); the logits
        at position i predict code i. Returns the cache extended by these positions.
        """
        start, n = cache.length, tokens.shape[1]
        positions = torch.arange(start, start + n, device=tokens.device)
        grid = self.dims.grid
        pos = self.row_pos[positions // grid] + self.col_pos[positions % grid]  # (n, D)
        x = self.code_embed(tokens) + pos
        if start == 0 and cache.prompt is not None:
            x = torch.cat([x[:, :1] + cache.prompt[:, None], x[:, 1:]], dim=1)
        x = self.drop(x)
        text_mask = cache.text_mask[:, None, None, :]
        self_k, self_v = [], []
        for i, layer in enumerate(self.decoder):
            x, (k, v) = layer(
                x,
                (cache.self_k[i], cache.self_v[i]),
                (cache.cross_k[i], cache.cross_v[i]),
                text_mask,
            )
            self_k.append(k)
            self_v.append(v)
        # The output head is the code embedding, transposed (start token excluded).
        logits = self.decoder_norm(x) @ self.code_embed.weight[: self.dims.codebook_size].t()
        return logits, dataclasses.replace(cache, self_k=self_k, self_v=self_v)

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        codes: torch.Tensor,
        null: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher forcing: text (B, T), codes (B, N) → logits (B, N, K) predicting each code."""
        states, mask = self.encode_text(text_ids, text_mask, null)
        starts = codes.new_full((codes.shape[0], 1), self.start_token)
        tokens = torch.cat([starts, codes[:, :-1]], dim=1)
        logits, _ = self.decode(tokens, self.start_cache(states, mask))
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, folder: str | Path) -> None:
        """`model.safetensors` + `config.json`, read back by `from_pretrained`."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, out / WEIGHTS)
        body = {"parti": dataclasses.asdict(self.config), "dims": dataclasses.asdict(self.dims)}
        (out / CONFIG).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> Parti:
        """Load a folder written by `save_pretrained`; ModelFolderError says what is wrong."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            body: dict[str, Any] = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
            saved = dict(body["parti"])
            # Every folder saved before `tie_head` was removed holds it; one of those without
            # `activation` was saved before that option existed, with GELU MLPs.
            activation = saved.pop("activation", "gelu" if "tie_head" in saved else "relu2")
            # The removed `zero_init` chose only the weights that these replace.
            saved.pop("zero_init", None)
            config = PartiConfig.from_dict(saved)
            model = cls(config=config, dims=PartiDims(**body["dims"]))
            state = load_file(folder / WEIGHTS, device=str(device))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise ModelFolderError(
                f"{folder}: not a Parti model folder ({WEIGHTS} + {CONFIG}): {err}"
            ) from None
        if activation != "relu2":
            raise ModelFolderError(
                f"{folder}: a Parti model with {activation!r} MLPs, a branch since removed"
                " (parti.activation; only relu2 is supported): retrain it with this version"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ModelFolderError(
                f"{folder / WEIGHTS}: weights do not fit {CONFIG}: {err}"
            ) from None
        return model.to(device).eval()


def _init_weights(module: nn.Module) -> None:
    """GPT-2's init: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
