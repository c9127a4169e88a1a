"""The pinned evaluator: works on any captioned data; the attribute oracle where it can.

Everything a number depends on is fixed and recorded: the held-out rows (by the data's
DVC digest), the feature model (by the digest of its files), the prompts
(`evaluate.prompts` captioned rows spread evenly over each held-out split,
`evaluate.seen_prompts` over `train`), the sampling settings and the seeds. The same
bundle evaluated twice gives the same numbers, and two bundles are compared only when
their evaluations share that key.

- **NLL**: bits per token of the held-out images' codes given their captions, encoded
  with the bundle's own tokenizers (so bundles with other tokenizers stay comparable).
- **Prompt following** (any data): with the feature model, does a prompt's own sample
  score above the samples made for the other prompts? The share of other prompts it
  beats, averaged; chance is 0.5. The same score of the real images says how far the
  feature model can tell this data's captions apart at all, and caption → image
  retrieval R@1 among the real images how well it matches them.
- **Prompt fidelity** (synthetic scenes only): the attribute oracle reads each sample
  back (`read_scene`) and `compare`s it with the caption's scene, per attribute and split.
- **CLIP score and FID**: torchmetrics' `CLIPScore` and `FrechetInceptionDistance`, with
  the in-house scorer (or a local Hugging Face CLIP) as the model. FID's statistics of
  the real validation images are computed once per (data digest, feature model) and
  kept in a references folder.

Every per-prompt score carries a 95 % bootstrap interval; what could not be computed is
listed with the reason in `evaluation.json`'s `not_computed`, never left out silently.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from parti_ops.components.loaders import decode_png, iter_split, load_captioned, parse_scene
from parti_ops.components.shards import (
    HELDOUT_SPLITS,
    SEEN_SPLIT,
    TUNING_SPLIT,
    read_manifest,
    write_json,
)
from parti_ops.components.stats import mean_interval, paired_difference, rank_wins, top1
from parti_ops.components.versioning import files_digest, model_version
from parti_ops.model.config import Config, SampleConfig
from parti_ops.model.errors import PartiError
from parti_ops.model.scenes import compare, read_scene
from parti_ops.model.scorer import TEXT_TOKENIZER, load_scorer

log = logging.getLogger(__name__)

# Unseen captions; test: (colour, shape) pairs never seen in training.
EVALUATION, REPORT, SAMPLES = "evaluation.json", "report.md", "samples.png"
# Part of every evaluation's key: a change to what is measured, or on which prompts,
# makes earlier evaluations incomparable, and the gate re-evaluates the champion.
EVALUATOR_VERSION = 2
FID_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class EvaluationError(PartiError, ValueError):
    """The evaluation cannot run on these inputs; the message says what to do."""


@dataclass(frozen=True)
class FeatureModel:
    """A CLIP-compatible (model, processor) and the digest that names it."""

    model: Any
    processor: Any
    version: str
    dim: int

    @classmethod
    def load(cls, folder: str | Path) -> FeatureModel:
        """The in-house scorer's folder, or a local Hugging Face CLIP folder."""
        folder = Path(folder)
        if (folder / TEXT_TOKENIZER).is_dir():  # a scorer carries its caption tokenizer
            model, processor = load_scorer(folder)
            return cls(model, processor, model_version(folder), model.config.embed_dim)
        try:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(folder).eval()
            processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise EvaluationError(
                f"{folder}: neither a `parti scorer train` folder nor a Hugging Face CLIP: {err}"
            ) from None
        names = sorted(p.name for p in folder.iterdir() if p.suffix in {".safetensors", ".json"})
        return cls(model, processor, files_digest(folder, names), model.config.projection_dim)

    @torch.inference_mode()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or (N, 3, H, W) → (N, dim)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _tensor(self.model.get_image_features(pixels))

    @torch.inference_mode()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        # A Hugging Face CLIP has a fixed number of positions; the scorer cuts its own.
        text_config = getattr(self.model.config, "text_config", None)
        cut = {} if text_config is None else {
            "truncation": True, "max_length": text_config.max_position_embeddings
        }  # fmt: skip
        text = self.processor(text=list(captions), return_tensors="pt", padding=True, **cut)
        return _tensor(self.model.get_text_features(text["input_ids"], text["attention_mask"]))

    def reranker(self):
        """Scores the candidates of one prompt by cosine similarity, for `TextToImage`."""

        def score(images: torch.Tensor, prompt: str) -> torch.Tensor:
            img = torch.nn.functional.normalize(self.image_features(images), dim=-1)
            txt = torch.nn.functional.normalize(self.text_features([prompt]), dim=-1)
            return (img @ txt.t())[:, 0]

        return score


def _tensor(output: Any) -> torch.Tensor:
    # Some transformers versions wrap CLIP features in a model output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _ClipScoreModel(torch.nn.Module):
    """The feature model as torchmetrics' CLIPScore calls it, returning plain tensors.

    CLIPScore normalises what `get_*_features` return; a transformers 5 `CLIPModel` returns
    a model output there, which it cannot.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _tensor(self.model.get_image_features(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return _tensor(self.model.get_text_features(input_ids, attention_mask))


class _FidFeatures(torch.nn.Module):
    """The feature model's image embedding as the `feature` network of torchmetrics' FID."""

    def __init__(self, features: FeatureModel):
        super().__init__()
        self.features, self.num_features = features, features.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, H, W)
        return self.features.image_features(images).double()


def _fid(features: FeatureModel):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=_FidFeatures(features), reset_real_features=False)


def fid_references(
    data_dir: str | Path, features: FeatureModel, folder: str | Path, limit: int
) -> Path:
    """FID's real statistics of up to `limit` validation images, computed once per key.

    The file is named by (data digest, feature model, split, limit) and reused when present.

    Raises:
        EvaluationError: when the validation split has fewer than 2 captioned images.
    """
    digest = read_manifest(data_dir)["data_digest"]
    name = (
        f"fid-{digest.removesuffix('.dir')}-{features.version[:16]}-{TUNING_SPLIT}-{limit}"
        ".safetensors"
    )
    path = Path(folder) / name
    if path.is_file():
        return path
    from safetensors.torch import save_file

    images = _spread_captioned(data_dir, TUNING_SPLIT, limit)[0]
    if len(images) < 2:
        raise EvaluationError(
            f"{data_dir}: FID needs >= 2 captioned images in split {TUNING_SPLIT!r}, found"
            f" {len(images)}; give the data a validation split (data.validation_fraction)"
        )
    metric = _fid(features)
    for start in range(0, len(images), 256):
        metric.update(images[start : start + 256].permute(0, 3, 1, 2), real=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: getattr(metric, k).detach().contiguous() for k in FID_STATES},
        tmp,
        metadata={
            "data_digest": digest,
            "feature_model": features.version,
            "split": TUNING_SPLIT,
            "images": str(len(images)),
        },
    )
    tmp.replace(path)  # atomic: a concurrent evaluation never reads half a file
    log.info("FID reference statistics of %d validation images: %s", len(images), path)
    return path


def _spread_captioned(
    data_dir: str | Path, split: str, limit: int
) -> tuple[torch.Tensor, list[str], list[Any]]:
    """`limit` captioned rows of a split, spread evenly over it: images, captions, scenes.

    Files are often sorted by name (and so by topic); the first rows alone would score one
    corner of the data. Only the chosen rows' images are decoded.
    """
    captioned = [
        (shard, row)
        for shard, table in enumerate(iter_split(data_dir, split, ["caption"]))
        for row, caption in enumerate(table["caption"].to_pylist())
        if caption
    ]
    captioned = [captioned[i] for i in _spread(len(captioned), limit)]
    wanted: dict[int, set[int]] = {}
    for shard, row in captioned:
        wanted.setdefault(shard, set()).add(row)
    images, captions, scenes = [], [], []
    for shard, table in enumerate(iter_split(data_dir, split, ["image", "caption", "metadata"])):
        rows = sorted(wanted.get(shard, ()))
        if not rows:
            continue
        chosen = table.take(rows)
        images += [decode_png(b) for b in chosen["image"].to_pylist()]
        captions += chosen["caption"].to_pylist()
        scenes += [parse_scene(m) for m in chosen["metadata"].to_pylist()]
    stacked = torch.from_numpy(np.stack(images)) if images else torch.empty(0, 0, 0, 3)
    return stacked.to(torch.uint8), captions, scenes


def _spread(count: int, limit: int) -> list[int]:
    """`limit` indices of `count` rows, evenly spaced (all of them when there are fewer)."""
    if count <= limit:
        return list(range(count))
    return np.linspace(0, count - 1, limit).round().astype(int).tolist()


def evaluator_sampling(config: Config) -> SampleConfig:
    """The settings the evaluator samples with: `sample`'s, with the evaluator's own seed
    (`sample.seed` is the default of `parti generate`)."""
    return replace(config.sample, seed=config.evaluate.seed)


def evaluation_key(config: Config, data_dir: str | Path, features: FeatureModel) -> dict[str, str]:
    """What makes two evaluations comparable: the held-out data and the evaluator."""
    manifest = read_manifest(data_dir)
    evaluator = {
        "version": EVALUATOR_VERSION,
        # The accepted rows of each split, not only the source's digest: the same source
        # ingested at another size, split or quarantine rule gives other prompts.
        "rows": sorted((s["split"], s["sha256"]) for s in manifest["shards"]),
        "feature_model": features.version,
        "evaluate": asdict(config.evaluate),
        "sample": asdict(evaluator_sampling(config)),
    }
    blob = json.dumps(evaluator, sort_keys=True).encode()
    return {
        "data_digest": manifest["data_digest"],
        "evaluator": hashlib.sha256(blob).hexdigest(),
        "feature_model": features.version,
    }


class _Scores:
    """What one evaluation measured, and why anything was not: `evaluation.json`'s body."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.intervals: dict[str, list[float]] = {}
        self.per_prompt: dict[str, list[float]] = {}
        self.chance: dict[str, float] = {}
        self.not_computed: dict[str, str] = {}

    def add(self, name: str, values, *, chance: float | None = None, keep: bool = False):
        """The mean of per-prompt `values` with its bootstrap interval."""
        values = np.asarray(values, dtype=np.float64)
        self.metrics[name] = float(values.mean())
        self.intervals[name] = list(mean_interval(values))
        if chance is not None:
            self.chance[name] = chance
        if keep:  # the gate pairs these with the champion's, prompt by prompt
            self.per_prompt[name] = [round(float(v), 6) for v in values]

    def skip(self, name: str, why: str) -> None:
        self.not_computed[name] = why
        log.warning("evaluation: %s not computed: %s", name, why)


def evaluate_bundle(
    config: Config,
    bundle_dir: str | Path,
    data_dir: str | Path,
    feature_dir: str | Path,
    out_dir: str | Path,
    references_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a trained bundle on any captioned data; the oracle only where rows have scenes.

    Per split (`train`: seen captions, `validation`, `test`): bits per image token of all
    captioned held-out rows; one sample for each of `evaluate.prompts` captions spread
    over the split (`seen_prompts` of `train`), scored by the feature model: prompt
    following (the share of other prompts' samples a prompt's own sample outscores;
    chance 0.5), the same score of the real images, caption → image retrieval R@1 among
    the real images, CLIP score; the attribute oracle's accuracy where the rows carry
    synthetic scenes. FID compares the validation samples with the validation images.
    Each score has a 95 % bootstrap interval over prompts. Writes `evaluation.json`
    (what was measured, and why anything was not), `report.md` and `samples.png`
    (caption | generated | real) into `out_dir`.

    Args:
        feature_dir: the scorer folder (`parti scorer train`) or a local Hugging Face CLIP;
            `scorer.clip_model`, when set, wins over it.
        references_dir: where FID reference statistics are kept; default `out_dir/references`.

    Raises:
        EvaluationError: when the data has no captioned held-out row at all.
    """
    from parti_ops.model.generate import TextToImage
    from parti_ops.model.train import bits_per_row

    bundle = TextToImage.load(bundle_dir)
    features = FeatureModel.load(config.scorer.clip_model or feature_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev, settings = config.evaluate, evaluator_sampling(config)
    torch.manual_seed(ev.seed)
    scores = _Scores()

    token_bits, tokens = 0.0, 0
    loaded: dict[str, tuple[torch.Tensor, list[str], list[Any]]] = {}
    for split in HELDOUT_SPLITS:
        images, captions, _ = loaded[split] = load_captioned(data_dir, split)
        if not len(images):
            scores.skip(f"{split}/bits_per_token", f"no captioned rows in split {split!r}")
            continue
        data = _encode(bundle, images, captions)
        bits = bits_per_row(bundle.parti, data, ev.batch_size).numpy()
        scores.add(f"{split}/bits_per_token", bits, keep=split == TUNING_SPLIT)
        token_bits, tokens = token_bits + bits.sum(), tokens + len(bits)
    if not tokens:
        raise EvaluationError(
            f"{data_dir}: no captioned rows in {' or '.join(HELDOUT_SPLITS)}; give the data a"
            " held-out split (data.validation_fraction, data.test_fraction)"
        )
    scores.metrics["heldout_bits_per_token"] = token_bits / tokens

    rerank = features.reranker() if settings.candidates > 1 else None
    shown: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = {}
    exact: list[float] = []
    for split, limit in ((SEEN_SPLIT, ev.seen_prompts), *((s, ev.prompts) for s in HELDOUT_SPLITS)):
        if split in loaded:  # already in memory for its bits: pick the same rows from it
            images, captions, scenes = loaded[split]
            picks = _spread(len(captions), limit)
            real, captions, scenes = (
                images[picks],
                [captions[i] for i in picks],
                [scenes[i] for i in picks],
            )
        else:
            real, captions, scenes = _spread_captioned(data_dir, split, limit)
        if len(set(captions)) < 2:
            why = "evaluate.seen_prompts is 0" if not limit else "fewer than 2 distinct captions"
            scores.skip(f"{split}/prompt_following", f"{why} in split {split!r}")
            continue
        generated = bundle(captions, settings, rerank=rerank, batch_size=ev.batch_size)
        shown[split] = (captions, generated, real)
        keep = split == TUNING_SPLIT
        _feature_scores(scores, features, split, captions, generated, real, ev.batch_size, keep)
        if any(scene is None for scene in scenes):
            scores.skip(f"{split}/exact", "rows without a synthetic scene: no attribute oracle")
            continue
        checks: dict[str, list[bool]] = {}
        for image, scene in zip(generated.numpy(), scenes, strict=True):
            for name, ok in compare(read_scene(image), scene).items():
                checks.setdefault(name, []).append(ok)
        for name, values in checks.items():
            scores.add(f"{split}/{name}", values, keep=keep and name == "exact")
        if split != SEEN_SPLIT:
            exact += checks["exact"]
    if exact:
        scores.add("fidelity", exact)
    else:
        scores.skip("fidelity", "no held-out rows with a synthetic scene for the oracle")
    heldout = [shown[s] for s in HELDOUT_SPLITS if s in shown]
    if heldout:
        scores.metrics["clip_score"] = _clip_score(
            features,
            torch.cat([g for _, g, _ in heldout]),
            [c for cs, _, _ in heldout for c in cs],
            ev.batch_size,
        )
    else:
        scores.skip("clip_score", "no held-out split with 2 or more distinct captions")
    reference = None
    if TUNING_SPLIT in shown:
        reference = fid_references(
            data_dir, features, references_dir or out / "references", ev.fid_images
        )
        fid = _fid(features)
        _load_fid_references(fid, reference)
        generated = shown[TUNING_SPLIT][1]
        for start in range(0, len(generated), ev.batch_size):
            fid.update(generated[start : start + ev.batch_size].permute(0, 3, 1, 2), real=False)
        scores.metrics["fid"] = float(fid.compute())
    else:
        scores.skip("fid", f"no split {TUNING_SPLIT!r} with 2 or more distinct captions")

    result = {
        "metrics": scores.metrics,
        "intervals": scores.intervals,
        "chance": scores.chance,
        "computed": sorted(scores.metrics),
        "not_computed": scores.not_computed,
        "key": evaluation_key(config, data_dir, features),
        "prompts": {split: len(c) for split, (c, _, _) in shown.items()},
        "per_prompt": scores.per_prompt,
        "fid_reference": reference.name if reference else None,
    }
    write_json(out / EVALUATION, result)
    sample_grid(shown, ev.grid_rows).save(out / SAMPLES)
    (out / REPORT).write_text(_report(result, bundle_dir), encoding="utf-8")
    m = scores.metrics
    log.info(
        "evaluation: prompt following %s (chance 0.5), %.3f bits/token, fidelity %s",
        _fmt(m.get(f"{TUNING_SPLIT}/prompt_following")),
        m["heldout_bits_per_token"],
        _fmt(m.get("fidelity")),
    )
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _feature_scores(
    scores: _Scores,
    features: FeatureModel,
    split: str,
    captions: list[str],
    generated: torch.Tensor,
    real: torch.Tensor,
    batch_size: int,
    keep: bool,
) -> None:
    """Prompt following of the samples and of the real images, and retrieval R@1."""

    def embed(fn, items) -> torch.Tensor:
        chunks = [fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    text = embed(features.text_features, captions)  # (N, dim)
    for name, images in (("prompt_following", generated), ("prompt_following_real", real)):
        wins = rank_wins((text @ embed(features.image_features, images).t()).numpy(), captions)
        scores.add(f"{split}/{name}", wins[~np.isnan(wins)], chance=0.5, keep=keep and name ==
                   "prompt_following")  # fmt: skip
    similarity = (text @ embed(features.image_features, real).t()).numpy()
    # A random pick is right when it lands on any image of the caption: sum of n_c² / N².
    counts = np.unique(np.asarray(captions, dtype=object), return_counts=True)[1]
    chance = float((counts**2).sum() / len(captions) ** 2)
    scores.add(f"{split}/retrieval_r1", top1(similarity, captions), chance=chance)


def _clip_score(
    features: FeatureModel, images: torch.Tensor, captions: list[str], batch_size: int
) -> float:
    from torchmetrics.multimodal.clip_score import CLIPScore

    clip = CLIPScore(
        model_name_or_path=lambda: (_ClipScoreModel(features.model), features.processor)
    )
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].permute(0, 3, 1, 2)
        clip.update(list(chunk), captions[start : start + batch_size])
    return float(clip.compute())


def _encode(bundle, images: torch.Tensor, captions: list[str]):
    """Held-out pairs → codes and caption ids, with the bundle's own tokenizers."""
    from parti_ops.model.text_tokenizer import encode_captions
    from parti_ops.model.train import CodeData
    from parti_ops.model.vqgan import to_unit

    step = bundle.vqgan.config.eval_batch_size
    codes = torch.cat(
        [bundle.vqgan.tokenize(to_unit(images[i : i + step])) for i in range(0, len(images), step)]
    )
    ids, lengths, _ = encode_captions(bundle.tokenizer, captions, bundle.parti.dims.text_length)
    return CodeData.from_arrays(
        {"codes": codes.numpy(), "text_ids": ids, "text_lengths": lengths},
        bundle.parti.dims.text_length,
    )


def _load_fid_references(metric, path: Path) -> None:
    from safetensors.torch import load_file

    for name, value in load_file(path).items():
        setattr(metric, name, value)


def _report(result: dict[str, Any], bundle_dir: str | Path) -> str:
    metrics, key = result["metrics"], result["key"]
    prompts = ", ".join(f"{n} {split}" for split, n in result["prompts"].items()) or "none"
    lines = [
        "# Evaluation",
        "",
        f"Model: `{bundle_dir}`  ",
        f"Data: `{key['data_digest']}`; evaluator `{key['evaluator'][:12]}`"
        f" (feature model `{key['feature_model'][:12]}`); prompts: {prompts}.",
        f"Settings are chosen on `{TUNING_SPLIT}`; `test` is reported, not tuned on.",
        "",
        "| metric | value | 95 % interval | chance |",
        "|---|---|---|---|",
    ]
    for name in sorted(metrics):
        interval = result["intervals"].get(name)
        span = f"{interval[0]:.4f} – {interval[1]:.4f}" if interval else ""
        chance = result["chance"].get(name)
        chance_cell = "" if chance is None else f"{chance:.4f}"
        lines.append(f"| {name} | {metrics[name]:.4f} | {span} | {chance_cell} |")
    if result["not_computed"]:
        lines += ["", "Not computed:", ""]
        lines += [f"- `{name}`: {why}" for name, why in sorted(result["not_computed"].items())]
    lines += ["", f"![caption | generated | real]({SAMPLES})", ""]
    return "\n".join(lines)


def sample_grid(shown: dict[str, tuple[list[str], Any, Any]], rows: int) -> Image.Image:
    """Up to `rows` prompts per split as rows: split and caption | generated | real image.

    `shown` maps a split to (captions, generated uint8 (N, H, W, 3), real uint8 (N, H, W, 3)).
    """
    from PIL import ImageDraw, ImageFont

    scale, text_width = 2, 240
    items = [
        (f"{split}: {caption}", gen, real)
        for split, (captions, generated, images) in shown.items()
        for caption, gen, real in list(
            zip(captions, generated.numpy(), images.numpy(), strict=True)
        )[:rows]  # fmt: skip
    ]
    if not items:
        return Image.new("RGB", (text_width, 32), "white")
    side = items[0][1].shape[0] * scale
    canvas = Image.new("RGB", (text_width + 2 * side + 8, side * len(items)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=14)
    for i, (label, gen, real) in enumerate(items):
        top = i * side
        for column, image in enumerate((gen, real)):
            tile = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (text_width + column * (side + 8), top))
        draw.multiline_text((4, top + 4), _wrap(label, 28, lines=7), fill="black", font=font)
    return canvas


def _wrap(text: str, width: int, lines: int = 4) -> str:
    import textwrap

    wrapped = textwrap.wrap(text, width) or [""]
    return "\n".join(wrapped[:lines]) + ("…" if len(wrapped) > lines else "")


def evaluate_step(
    config: Config,
    parent_run_id: str,
    model_dir: str,
    data_dir: str,
    scorer_dir: str,
    references_dir: str,
    out_dir: str,
) -> dict[str, Any]:
    """`evaluate_bundle` in a nested MLflow run "evaluate": metrics, key as tags, artifacts."""
    from parti_ops.components.tracking import step_run

    with step_run(config, "evaluate", parent_run_id) as run:
        result = evaluate_bundle(config, model_dir, data_dir, scorer_dir, out_dir, references_dir)
        intervals = {
            f"{name}.ci_{end}": value
            for name, (lo, hi) in result["intervals"].items()
            for end, value in (("low", lo), ("high", hi))
        }
        run.log(
            metrics={**result["metrics"], **intervals},
            tags={
                **{f"evaluation.{k}": v for k, v in result["key"].items()},
                **{f"not_computed.{k}": v for k, v in result["not_computed"].items()},
            },
        )
        for name in (EVALUATION, REPORT, SAMPLES):
            run.log_artifact(Path(out_dir) / name, "evaluation")
    return result


def sweep_sampling(
    config: Config,
    bundle_dir: str | Path,
    data_dir: str | Path,
    feature_dir: str | Path,
    grid: Sequence[dict[str, float]],
) -> list[dict[str, Any]]:
    """Score sampling settings on `validation` only, best first (by prompt following).

    Each setting in `grid` overrides `sample` fields (e.g. `{"guidance_scale": 3.0}`); the
    `evaluate.prompts` validation captions are sampled with the evaluator's seeds.
    `test` is never read: settings chosen here are then reported on it by `evaluate_bundle`.

    Returns:
        One entry per setting: the settings, prompt following with its interval and
        per-prompt values, its paired difference to the best setting with that interval
        (`vs_best`), and the oracle's exact accuracy where the rows carry scenes.
    """
    from parti_ops.model.generate import TextToImage

    bundle = TextToImage.load(bundle_dir)
    features = FeatureModel.load(config.scorer.clip_model or feature_dir)
    ev = config.evaluate
    real, captions, scenes = _spread_captioned(data_dir, TUNING_SPLIT, ev.prompts)
    if len(set(captions)) < 2:
        raise EvaluationError(
            f"{data_dir}: a sampling sweep needs >= 2 distinct {TUNING_SPLIT} captions"
        )
    results = []
    for overrides in grid:
        settings = replace(evaluator_sampling(config), **overrides)
        rerank = features.reranker() if settings.candidates > 1 else None
        generated = bundle(captions, settings, rerank=rerank, batch_size=ev.batch_size)
        scores = _Scores()
        _feature_scores(scores, features, TUNING_SPLIT, captions, generated, real,
                        ev.batch_size, keep=True)  # fmt: skip
        name = f"{TUNING_SPLIT}/prompt_following"
        entry = {
            "settings": dict(overrides),
            "prompt_following": scores.metrics[name],
            "interval": scores.intervals[name],
            "per_prompt": scores.per_prompt[name],
        }
        if all(scene is not None for scene in scenes):
            pairs = zip(generated.numpy(), scenes, strict=True)
            entry["exact"] = float(np.mean([compare(read_scene(i), s)["exact"] for i, s in pairs]))
        results.append(entry)
        log.info("sweep %s: prompt following %.3f", overrides, entry["prompt_following"])
    results.sort(key=lambda e: -e["prompt_following"])
    # Against the best, prompt by prompt: a setting whose interval includes 0 is as good
    # as far as these prompts can tell.
    for entry in results:
        diff, interval = paired_difference(entry["per_prompt"], results[0]["per_prompt"])
        entry["vs_best"] = {"difference": diff, "interval": list(interval)}
    return results


def sampling_grid(axes: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of the values of `axes`, e.g. `{"temperature": [0.7, 1.0]}`.

    A field with no values is left out (it keeps the config's value); no values at all give
    one setting, the config's own.
    """
    given = {name: list(values) for name, values in axes.items() if values}
    return [dict(zip(given, combo, strict=True)) for combo in itertools.product(*given.values())]


def run_sweep(
    config: Config,
    bundle_dir: str | Path,
    data_dir: str | Path,
    feature_dir: str | Path,
    axes: Mapping[str, Sequence[float]],
    out: str | Path,
) -> list[dict[str, Any]]:
    """`sweep_sampling` over `sampling_grid(axes)`; the results also go to `out` (JSON)."""
    results = sweep_sampling(config, bundle_dir, data_dir, feature_dir, sampling_grid(axes))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def generate_images(
    bundle_dir: str | Path,
    prompts: Sequence[str],
    settings: SampleConfig,
    scorer_dir: str | Path | None = None,
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for `prompts` from a bundle, sampled in this process.

    With `settings.candidates` > 1, the scorer (or local CLIP) at `scorer_dir` keeps the
    best candidate of each prompt.
    """
    from parti_ops.model.generate import TextToImage

    rerank = FeatureModel.load(scorer_dir).reranker() if scorer_dir else None
    return TextToImage.load(bundle_dir)(prompts, settings, rerank=rerank).numpy()
