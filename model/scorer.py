"""An in-house CLIP-style image–text scorer: two towers trained contrastively.

CLIP (Radford et al. 2021) embeds images and captions in one space and scores a pair by
the cosine of their embeddings. Parti reranks its samples with such a scorer and reports
CLIP score; FID needs an image feature network. No pretrained CLIP can be downloaded here,
so this small one is trained on the accepted training pairs and serves all three.

It speaks the interface torchmetrics expects of a CLIP model and processor
(`get_image_features`, `get_text_features`, `processor(text=..., images=...)`), so
torchmetrics' `CLIPScore` takes it, or a local Hugging Face CLIP, unchanged.

Shapes: B batch, T text tokens, E embed_dim; images uint8 (B, H, W, 3) or (B, 3, H, W).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parti_ops.model.config import ScorerConfig
from parti_ops.model.layout import CHECKPOINTS
from parti_ops.model.loop import (
    MetricsLogger,
    Progress,
    TrainState,
    arch_fields,
    batch_indices,
    train_loop,
)
from parti_ops.model.text_tokenizer import encode_captions, load_text_tokenizer

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, TEXT_TOKENIZER = "model.safetensors", "config.json", "text_tokenizer"
_POOL = 8  # the image tower keeps an 8x8 map: where a shape is matters to the caption


class ImageTower(nn.Module):
    """uint8 images → features (B, num_features), position kept by flattening a small map."""

    def __init__(self, cfg: ScorerConfig):
        super().__init__()
        w = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, w, 3, padding=1), nn.GELU()]
        for i in range(3):  # three halvings: 64 → 8
            layers += [nn.Conv2d(w << i, w << (i + 1), 4, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(_POOL), nn.Flatten())
        self.num_features = 4 * cfg.embed_dim
        self.fc = nn.Linear((w << 3) * _POOL * _POOL, self.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == 3:  # channels last, as images are stored
            images = images.permute(0, 3, 1, 2)
        x = images.float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        return self.fc(self.convs(x))


class TextTower(nn.Module):
    """Token ids → the state of the last real token (`</s>`), as in CLIP."""

    def __init__(self, cfg: ScorerConfig, vocab: int, length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.text_width)
        self.pos = nn.Parameter(torch.randn(length, cfg.text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.text_width,
            cfg.text_heads,
            4 * cfg.text_width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))  # (B, T, width)
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        return x[torch.arange(len(x)), last]


class ImageTextScorer(nn.Module):
    """Two towers and projections into one l2-normalised space, with CLIP's learned scale.

    Args:
        config: the `scorer` section.
        vocab: the caption tokenizer's vocabulary size.
        length: the longest caption, in tokens.
    """

    def __init__(self, *, config: ScorerConfig, vocab: int, length: int):
        super().__init__()
        self.config, self.vocab, self.length = config, vocab, length
        self.image = ImageTower(config)
        self.text = TextTower(config, vocab, length)
        self.image_proj = nn.Linear(self.image.num_features, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's init

    def get_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images → (B, E) embeddings (not normalised, like Hugging Face CLIP)."""
        return self.image_proj(self.image(images))

    def get_text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(ids, mask.bool()))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, B): image i against caption j, scaled cosine similarity."""
        return self.scale() * self.image_embeddings(images) @ self.text_embeddings(ids, mask).t()

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images → (B, E) unit vectors."""
        return F.normalize(self.get_image_features(images), dim=-1)

    def text_embeddings(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask → (B, E) unit vectors."""
        return F.normalize(self.get_text_features(ids, mask), dim=-1)

    def scale(self) -> torch.Tensor:
        """CLIP's learned temperature, capped at 100."""
        return self.logit_scale.exp().clamp(max=100)

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out / WEIGHTS)
        body = {
            "scorer": dataclasses.asdict(self.config),
            "vocab": self.vocab,
            "length": self.length,
        }
        (out / CONFIG).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageTextScorer:
        """ValueError says what is wrong with the folder."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            body: dict[str, Any] = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
            model = cls(
                config=ScorerConfig(**body["scorer"]), vocab=body["vocab"], length=body["length"]
            )
            model.load_state_dict(load_file(folder / WEIGHTS))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
            raise ValueError(
                f"{folder}: not a scorer folder ({WEIGHTS} + {CONFIG}): {err}"
            ) from None
        return model.eval()


class ScorerProcessor:
    """Captions → ids and mask, images → a (B, 3, H, W) uint8 batch, as CLIP's processor does."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer, self.length = tokenizer, length

    def __call__(
        self,
        text: Sequence[str] | None = None,
        images: Sequence[torch.Tensor] | None = None,
        return_tensors: str = "pt",
        padding: bool = True,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            ids, lengths, _ = encode_captions(self.tokenizer, list(text), self.length)
            width = max(1, int(lengths.max()))
            lengths_t = torch.from_numpy(lengths).long()
            out["input_ids"] = torch.from_numpy(ids[:, :width].astype("int64"))
            out["attention_mask"] = torch.arange(width)[None, :] < lengths_t[:, None]
        if images is not None:
            out["pixel_values"] = torch.stack([_channels_first(i) for i in images])
        return out


def _channels_first(image: torch.Tensor) -> torch.Tensor:
    return image.permute(2, 0, 1) if image.shape[-1] == 3 else image


def load_scorer(folder: str | Path) -> tuple[ImageTextScorer, ScorerProcessor]:
    """A scorer folder (`train_scorer`'s output) → the model and its processor."""
    model = ImageTextScorer.from_pretrained(folder)
    tokenizer = load_text_tokenizer(Path(folder) / TEXT_TOKENIZER)
    return model, ScorerProcessor(tokenizer, model.length)


def train_scorer(
    config: ScorerConfig,
    images: torch.Tensor,
    captions: Sequence[str],
    tokenizer_dir: str | Path,
    length: int,
    out_dir: str | Path,
    progress: Progress | None = None,
    negatives: Sequence[Sequence[str]] | None = None,
    *,
    resume: bool = False,
    log_metrics: MetricsLogger | None = None,
    log_every: int = 100,
) -> ImageTextScorer:
    """Train on (image, caption) pairs with CLIP's symmetric InfoNCE loss; save to `out_dir`.

    Batches are a function of (seed, step) (`batch_indices`), so a run is reproducible,
    and one stopped by SIGTERM and resumed equals an uninterrupted one on CPU. With
    `config.checkpoint_every`, checkpoints go to `out_dir/checkpoints` every that many
    steps, at the end and on SIGTERM (then SystemExit with code 143). The caption tokenizer
    is copied into the folder, which then scores on its own.

    Args:
        images: uint8 (N, H, W, 3).
        captions: N captions.
        tokenizer_dir: the caption tokenizer (a transformers fast tokenizer folder).
        length: captions are cut to this many tokens.
        negatives: for each pair, captions that are nearly right and wrong (hard negatives,
            possibly none). Each step, every image is also told apart from
            `config.negatives_per_step` distinct ones of its own, drawn by (seed, step):
            as many extra columns of the image-to-text loss.
        resume: continue from the newest good checkpoint; without it, existing
            checkpoints are an error rather than silently overwritten.
        log_metrics: called with (metrics, step) every `log_every` steps; by default the
            loss is logged.
        progress: called with (step, total) after each step.
    """
    import shutil

    if len(images) != len(captions) or len(images) < 2:
        raise ValueError(f"{len(images)} images and {len(captions)} captions: need >= 2 pairs")
    tokenizer = load_text_tokenizer(tokenizer_dir)
    text = ScorerProcessor(tokenizer, length)(text=list(captions))
    ids_t, mask = text["input_ids"], text["attention_mask"]
    if negatives is not None and len(negatives) != len(captions):
        raise ValueError(
            f"{len(negatives)} lists of negatives for {len(captions)} pairs: need one each"
        )
    hard = (
        _HardNegatives(negatives, tokenizer, length, config.seed, config.negatives_per_step)
        if negatives and any(negatives)
        else None
    )
    torch.manual_seed(config.seed)
    model = ImageTextScorer(config=config, vocab=len(tokenizer), length=length)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    batch = min(config.batch_size, len(images))

    def train_step(step: int) -> dict[str, float]:
        rows = batch_indices(step, batch, len(images), config.seed)
        width = max(1, int(mask[rows].sum(dim=1).max()))
        img = model.image_embeddings(images[rows])
        logits = (
            model.scale() * img @ model.text_embeddings(ids_t[rows, :width], mask[rows, :width]).t()
        )
        image_to_text = logits
        if hard is not None:
            image_to_text = torch.cat([logits, hard.logits(model, img, rows, step)], dim=1)
        target = torch.arange(batch)
        loss = (F.cross_entropy(image_to_text, target) + F.cross_entropy(logits.t(), target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    def log_loss(metrics: dict[str, float], step: int) -> None:
        log.info("scorer step %d/%d: loss %.4f", step, config.steps, metrics["loss"])

    out = Path(out_dir)
    model.train()
    train_loop(
        config,
        TrainState({"model": model}, {"optimizer": optimizer}),
        train_step,
        out / CHECKPOINTS,
        architecture={"vocab": len(tokenizer), "length": length, **arch_fields(config)},
        resume=resume,
        log_every=log_every,
        log_metrics=log_metrics or log_loss,
        throughput=lambda steps_per_s: {"pairs_per_s": steps_per_s * batch},
        progress=progress,
    )
    model.eval()
    model.save_pretrained(out)
    shutil.copytree(tokenizer_dir, out / TEXT_TOKENIZER, dirs_exist_ok=True)
    return model


class _HardNegatives:
    """Each pair's hard-negative captions, tokenised once, and `per_step` distinct ones
    drawn per row and step."""

    def __init__(
        self,
        negatives: Sequence[Sequence[str]],
        tokenizer: Any,
        length: int,
        seed: int,
        per_step: int = 1,
    ) -> None:
        self.count = torch.tensor([len(row) for row in negatives])
        self.first = torch.cumsum(self.count, 0) - self.count
        text = ScorerProcessor(tokenizer, length)(text=[c for row in negatives for c in row])
        self.ids, self.mask = text["input_ids"], text["attention_mask"]
        self.seed, self.per_step = seed, per_step

    def logits(
        self, model: ImageTextScorer, img: torch.Tensor, rows: torch.Tensor, step: int
    ) -> torch.Tensor:
        """(B, per_step): image embeddings `img` of batch `rows` against distinct negatives
        of their own, scaled; -inf where a row has fewer."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draw = torch.randint(1 << 30, (len(rows), 1), generator=generator)
        count = self.count[rows, None]
        offset = torch.arange(self.per_step)[None, :]  # consecutive offsets stay distinct
        has = offset < count
        pick = self.first[rows, None] + (draw + offset) % count.clamp(min=1)
        out = torch.full((len(rows), self.per_step), float("-inf"))
        if has.any():
            ids, mask = self.ids[pick[has]], self.mask[pick[has]]
            width = max(1, int(mask.sum(dim=1).max()))
            txt = model.text_embeddings(ids[:, :width], mask[:, :width])
            own = img[:, None, :].expand(-1, self.per_step, -1)[has]
            out[has] = model.scale() * (own * txt).sum(-1)
        return out


@torch.inference_mode()
def similarity(
    model: ImageTextScorer,
    processor: ScorerProcessor,
    images: torch.Tensor,
    captions: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Cosine similarity (N, M) of N uint8 images with M captions."""
    return _image_rows(model, images, batch_size) @ _text_rows(model, processor, captions).t()


def retrieval_accuracy(
    model: ImageTextScorer,
    processor: ScorerProcessor,
    images: torch.Tensor,
    captions: Sequence[str],
    candidates: int = 10,
    seed: int = 0,
) -> float:
    """Share of images whose own caption ranks first among `candidates` captions.

    The others are the captions of `candidates - 1` other images of the same set, drawn
    with a fixed seed; captions equal to the true one are not counted as rivals.
    """
    n = len(images)
    if n < candidates:
        raise ValueError(f"{n} images: need at least {candidates} for {candidates} candidates")
    scores = similarity(model, processor, images, captions)  # (N, N)
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for i in range(n):
        others = torch.randperm(n - 1, generator=generator)[: candidates - 1]
        others = others + (others >= i).long()  # skip the image's own row
        rivals = [j for j in others.tolist() if captions[j] != captions[i]]
        hits += bool((scores[i, rivals] < scores[i, i]).all())
    return hits / n


@torch.inference_mode()
def near_miss_accuracy(
    model: ImageTextScorer,
    processor: ScorerProcessor,
    images: torch.Tensor,
    pairs: Sequence[Sequence[tuple[str, str]]],
) -> list[float]:
    """For each k, the share of images whose k-th (true, near miss) caption pair it scores
    in the right order: the true caption higher.

    Args:
        pairs: per image, (its caption, a near miss's caption) pairs in one fixed order;
            images with fewer than k + 1 are left out of the k-th share.
    """
    img = _image_rows(model, images)
    shares = []
    for k in range(max((len(p) for p in pairs), default=0)):
        rows = [i for i, p in enumerate(pairs) if len(p) > k]
        true = _text_rows(model, processor, [pairs[i][k][0] for i in rows])
        miss = _text_rows(model, processor, [pairs[i][k][1] for i in rows])
        shares.append(
            ((img[rows] * true).sum(-1) > (img[rows] * miss).sum(-1)).float().mean().item()
        )
    return shares


def _image_rows(
    model: ImageTextScorer, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    return torch.cat(
        [
            model.image_embeddings(images[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
    )


def _text_rows(
    model: ImageTextScorer, processor: ScorerProcessor, captions: Sequence[str]
) -> torch.Tensor:
    text = processor(text=list(captions))
    return model.text_embeddings(text["input_ids"], text["attention_mask"])
