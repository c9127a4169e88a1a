"""Prompt → image with a trained bundle: the caption tokenizer, Parti and the VQGAN decoder.

A bundle is the folder the training step writes: `parti/`, `text_tokenizer/` and
`image_tokenizer/`, each loadable on its own (safetensors + JSON, a transformers fast
tokenizer), so that sampling needs nothing but the folder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from parti_ops.model.config import SampleConfig, check_sampling
from parti_ops.model.errors import ModelFolderError
from parti_ops.model.layout import IMAGE_TOKENIZER, PARTI, TEXT_TOKENIZER
from parti_ops.model.parti import Parti
from parti_ops.model.sampling import Reranker, generate_codes, rerank_candidates
from parti_ops.model.text_tokenizer import encode_captions, load_text_tokenizer
from parti_ops.model.vqgan import VQGAN, to_uint8

log = logging.getLogger(__name__)


class TextToImage:
    """Samples images for prompts. `load(folder)` reads a bundle."""

    def __init__(self, parti: Parti, vqgan: VQGAN, tokenizer):
        self.parti, self.vqgan, self.tokenizer = parti.eval(), vqgan.eval(), tokenizer

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> TextToImage:
        """ModelFolderError names the part of the bundle that is missing or broken."""
        folder = Path(folder)
        for part in (PARTI, TEXT_TOKENIZER, IMAGE_TOKENIZER):
            if not (folder / part).is_dir():
                raise ModelFolderError(
                    f"{folder}: no {part}/ folder; give the output folder of `parti train`"
                )
        parti = Parti.from_pretrained(folder / PARTI, device=device)
        vqgan = VQGAN.from_pretrained(folder / IMAGE_TOKENIZER).to(device)
        tokenizer = load_text_tokenizer(folder / TEXT_TOKENIZER)
        if len(tokenizer) > parti.dims.text_vocab or vqgan.grid != parti.dims.grid:
            raise ModelFolderError(f"{folder}: the tokenizers do not match the Parti model's sizes")
        return cls(parti, vqgan, tokenizer)

    def encode_prompts(
        self, prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts → ids (B, T), mask (B, T), null (B,): empty prompts sample unconditionally.

        Prompts longer than the model's text length are cut (keeping `</s>`), with a warning.
        """
        limit = self.parti.dims.text_length
        ids, lengths, cut = encode_captions(self.tokenizer, [p.strip() for p in prompts], limit)
        if cut:
            log.warning("%d prompt(s) longer than %d tokens were truncated", cut, limit)
        width = int(lengths.max())
        device = next(self.parti.parameters()).device
        ids_t = torch.from_numpy(ids[:, :width].astype("int64")).to(device)
        lengths_t = torch.from_numpy(lengths).to(device)
        mask = torch.arange(width, device=device)[None, :] < lengths_t[:, None]
        null = torch.tensor([not p.strip() for p in prompts], device=device)
        return ids_t, mask, null

    @torch.inference_mode()
    def __call__(
        self,
        prompts: Sequence[str],
        settings: SampleConfig | None = None,
        *,
        seeds: Sequence[int] | None = None,
        rerank: Reranker | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """uint8 images (B, H, W, 3), one per prompt.

        Args:
            settings: guidance scale, temperature, top-k, top-p, seed and candidates.
            seeds: one per prompt; default `settings.seed` + the prompt's index.
            rerank: scores the `settings.candidates` samples of a prompt; the best is kept.
        """
        s = settings or SampleConfig()
        check_sampling(s.guidance_scale, s.temperature, s.top_k, s.top_p)
        seeds = list(seeds) if seeds is not None else [s.seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one per prompt")
        # Candidate j of prompt i is seeded seeds[i] * candidates + j, so candidate 0 of a
        # one-candidate run is the prompt's own seed.
        rows = [(p, seed * s.candidates + j) for p, seed in zip(prompts, seeds, strict=True)
                for j in range(s.candidates)]  # fmt: skip
        images = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask, null = self.encode_prompts([p for p, _ in chunk])
            codes = generate_codes(
                self.parti,
                ids,
                mask,
                [seed for _, seed in chunk],
                guidance_scale=s.guidance_scale,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                null=null,
            )
            images.append(to_uint8(self.vqgan.decode_codes(codes)).cpu())
        samples = torch.cat(images).view(len(prompts), s.candidates, *images[0].shape[1:])
        best = [
            rerank_candidates(samples[i], prompt, s.candidates, rerank)[0]
            for i, prompt in enumerate(prompts)
        ]
        return torch.stack(best)
