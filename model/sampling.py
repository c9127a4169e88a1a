"""Sampling image codes from Parti: small pure functions over an explicit KV cache.

`prefill` encodes the prompts (and the null caption for guidance) and runs the start
token; `decode_step` feeds one code and returns the next logits; `apply_cfg` mixes the
conditional and unconditional halves of one batch (Ho & Salimans 2022, as Parti §3.3);
`sample_logits` applies temperature, top-k and top-p and draws with one generator per
row, so an image depends on its own seed only. `generate_codes` strings them together,
with or without the cache (the no-cache path recomputes the whole prefix each step,
as parti-pytorch does; `bench/sampling.py` compares the two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from parti_ops.model.config import SampleConfig, check_sampling
from parti_ops.model.parti import KVCache, Parti

# images (B, H, W, 3) uint8 and their prompt → a score per image, higher is better.
Reranker = Callable[[torch.Tensor, str], torch.Tensor]


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), exactly cond at scale 1."""
    return cond + (scale - 1.0) * (cond - uncond)


def sample_logits(
    logits: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Logits (B, K) → tokens (B,); row i draws from `generators[i]`. Temperature 0: argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman
        # et al. 2020); the most likely token always stays.
        # Stable, so ties at the cut-off keep the lower code, as deploy/runtime.py does.
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # Inverse-CDF draw with one uniform number per row from that row's generator: the
    # first token whose cumulative mass exceeds u. Filtered tokens (probability 0) are
    # never taken, even where a GPU's cumsum rounds differently.
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(probs.device)
    cdf = probs.cumsum(dim=-1)
    allowed = probs > 0
    above = (cdf > (u * cdf[:, -1])[:, None]) & allowed
    last_allowed = probs.shape[-1] - 1 - allowed.flip(-1).int().argmax(dim=-1)
    return torch.where(above.any(dim=-1), above.int().argmax(dim=-1), last_allowed)


def _batch_for_guidance(
    text_ids: torch.Tensor, text_mask: torch.Tensor, null: torch.Tensor | None, guided: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts, and if guided the same rows again as null captions: (2B or B, T) + null."""
    if null is None:
        null = torch.zeros(text_ids.shape[0], dtype=torch.bool, device=text_ids.device)
    if not guided:
        return text_ids, text_mask, null
    return text_ids.repeat(2, 1), text_mask.repeat(2, 1), torch.cat([null, torch.ones_like(null)])


def prefill(
    model: Parti,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    guided: bool,
    null: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Encode the prompts (B, T), compute cross-attention K/V once, run the start token.

    Rows where `null` (B,) is True are sampled unconditionally. Returns logits for the
    first code, (2B, K) when guided (conditional rows first), and the cache.
    """
    ids, mask, null = _batch_for_guidance(text_ids, text_mask, null, guided)
    states, mask = model.encode_text(ids, mask, null)
    cache = model.start_cache(states, mask)
    start = ids.new_full((ids.shape[0], 1), model.start_token)
    logits, cache = model.decode(start, cache)
    return logits[:, -1], cache


def decode_step(model: Parti, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
    """The codes just chosen (B,) → logits for the next position (B, K), cache one longer."""
    logits, cache = model.decode(tokens[:, None], cache)
    return logits[:, -1], cache


def _guide(logits: torch.Tensor, scale: float, guided: bool) -> torch.Tensor:
    if not guided:
        return logits
    cond, uncond = logits.chunk(2)
    return apply_cfg(cond, uncond, scale)


@torch.inference_mode()
def generate_codes(
    model: Parti,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    seeds: Sequence[int],
    *,
    guidance_scale: float = SampleConfig.guidance_scale,
    temperature: float = SampleConfig.temperature,
    top_k: int = SampleConfig.top_k,
    top_p: float = SampleConfig.top_p,
    null: torch.Tensor | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample image codes (B, grid, grid) for prompts (B, T), row i seeded by `seeds[i]`.

    Guidance scale 1 samples the conditional model alone; 0 the unconditional one. Rows
    where `null` (B,) is True (empty prompts) are unconditional samples. With
    `use_cache=False` every step recomputes the whole prefix (the baseline of the bench).
    """
    check_sampling(guidance_scale, temperature, top_k, top_p)
    if len(seeds) != text_ids.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {text_ids.shape[0]} prompts: give one per prompt")
    model.eval()
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    guided = guidance_scale != 1.0
    n, b = model.dims.image_length, text_ids.shape[0]
    codes = text_ids.new_empty(b, 0)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        guided_logits = _guide(logits, guidance_scale, guided)
        return sample_logits(
            guided_logits, generators, temperature=temperature, top_k=top_k, top_p=top_p
        )

    if use_cache:
        logits, cache = prefill(model, text_ids, text_mask, guided=guided, null=null)
        for i in range(n):
            chosen = pick(logits)
            codes = torch.cat([codes, chosen[:, None]], dim=1)
            if i + 1 < n:
                logits, cache = decode_step(model, chosen.repeat(2) if guided else chosen, cache)
    else:
        ids, mask, null = _batch_for_guidance(text_ids, text_mask, null, guided)
        for _ in range(n):
            rows = torch.cat([codes, codes]) if guided else codes
            pad = rows.new_zeros(rows.shape[0], 1)  # the position being predicted
            logits = model(ids, mask, torch.cat([rows, pad], dim=1), null)[:, -1]
            codes = torch.cat([codes, pick(logits)[:, None]], dim=1)
    grid = model.dims.grid
    return codes.view(b, grid, grid)


def rerank_candidates(
    images: torch.Tensor, prompt: str, candidates: int, rerank: Reranker | None
) -> torch.Tensor:
    """images (candidates, H, W, 3) of one prompt → the best one first, by `rerank`."""
    if rerank is None or candidates == 1:
        return images
    scores = rerank(images, prompt)
    if scores.shape != (candidates,):
        raise ValueError(f"rerank returned shape {tuple(scores.shape)}, expected ({candidates},)")
    return images[scores.argsort(descending=True)]
