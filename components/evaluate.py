"""The pinned evaluator: held-out NLL, prompt fidelity, CLIP score and FID of a bundle.

Everything a number depends on is fixed and recorded: the held-out rows (by the data's
DVC digest), the feature model (by the digest of its files), the prompts (the first
`evaluate.prompts` captioned rows of each held-out split), the sampling settings and the
seeds. The same bundle evaluated twice gives the same numbers, and two bundles are
compared only when their evaluations share that key.

- **NLL**: bits per token of the held-out images' codes given their captions, encoded
  with the bundle's own tokenizers (so bundles with other tokenizers stay comparable).
- **Prompt fidelity**: the attribute oracle reads each sample back (`read_scene`) and
  `compare`s it with the caption's scene: per attribute, per split (`validation`: unseen
  captions of seen (colour, shape) pairs; `test`: pairs never seen in training).
- **CLIP score and FID**: torchmetrics' `CLIPScore` and `FrechetInceptionDistance`, with
  the in-house scorer (or a local Hugging Face CLIP) as the model. FID's statistics of the
  real held-out images are computed once per (data digest, feature model) and kept in a
  references folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from parti_ops.components.scorer import scorer_version
from parti_ops.components.shards import HELDOUT_SPLITS, read_manifest, write_json
from parti_ops.components.tokenizers import iter_split, load_pairs, parse_scene
from parti_ops.components.versioning import files_digest
from parti_ops.model.config import Config, SampleConfig
from parti_ops.model.scenes import compare, read_scene
from parti_ops.model.scorer import TEXT_TOKENIZER, load_scorer

log = logging.getLogger(__name__)

# Unseen captions; test: (colour, shape) pairs never seen in training.
EVALUATION, REPORT, SAMPLES = "evaluation.json", "report.md", "samples.png"
FID_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class EvaluationError(ValueError):
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
            return cls(model, processor, scorer_version(folder), model.config.embed_dim)
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
        text = self.processor(text=list(captions), return_tensors="pt", padding=True)
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
    """FID's real statistics of up to `limit` held-out images, computed once per key.

    The file is named by (data digest, feature model, limit) and reused when present.
    """
    digest = read_manifest(data_dir)["data_digest"]
    name = f"fid-{digest.removesuffix('.dir')}-{features.version[:16]}-{limit}.safetensors"
    path = Path(folder) / name
    if path.is_file():
        return path
    from safetensors.torch import save_file

    images = torch.cat([load_pairs(data_dir, split)[0] for split in HELDOUT_SPLITS])[:limit]
    if len(images) < 2:
        raise EvaluationError(f"{data_dir}: FID needs >= 2 held-out images, found {len(images)}")
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
            "images": str(len(images)),
        },
    )
    tmp.replace(path)  # atomic: a concurrent evaluation never reads half a file
    log.info("FID reference statistics of %d held-out images: %s", len(images), path)
    return path


def heldout_prompts(data_dir: str | Path, split: str, limit: int) -> list[tuple[str, Any]]:
    """The first `limit` (caption, scene) pairs of a split that carry a scene."""
    pairs = []
    for table in iter_split(data_dir, split, ["caption", "metadata"]):
        for caption, metadata in zip(
            table["caption"].to_pylist(), table["metadata"].to_pylist(), strict=True
        ):
            scene = parse_scene(metadata)
            if scene is not None and caption:
                pairs.append((caption, scene))
            if len(pairs) == limit:
                return pairs
    return pairs


def evaluator_sampling(config: Config) -> SampleConfig:
    """The settings the evaluator samples with: `sample`'s, with the evaluator's own seed
    (`sample.seed` is the default of `parti generate`)."""
    return replace(config.sample, seed=config.evaluate.seed)


def evaluation_key(config: Config, data_dir: str | Path, features: FeatureModel) -> dict[str, str]:
    """What makes two evaluations comparable: the held-out data and the evaluator."""
    evaluator = {
        "feature_model": features.version,
        "evaluate": asdict(config.evaluate),
        "sample": asdict(evaluator_sampling(config)),
    }
    blob = json.dumps(evaluator, sort_keys=True).encode()
    return {
        "data_digest": read_manifest(data_dir)["data_digest"],
        "evaluator": hashlib.sha256(blob).hexdigest(),
        "feature_model": features.version,
    }


def evaluate_bundle(
    config: Config,
    bundle_dir: str | Path,
    data_dir: str | Path,
    feature_dir: str | Path,
    out_dir: str | Path,
    references_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a trained bundle on the held-out splits of the accepted data.

    Writes `evaluation.json` (`{"metrics", "key"}`), `report.md` and `samples.png`
    into `out_dir`; returns what `evaluation.json` holds.

    Args:
        feature_dir: the scorer folder (`parti scorer train`) or a local Hugging Face CLIP;
            `scorer.clip_model`, when set, wins over it.
        references_dir: where FID reference statistics are kept; default `out_dir/references`.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    from parti_ops.model.generate import TextToImage
    from parti_ops.model.train import heldout_nll

    bundle = TextToImage.load(bundle_dir)
    features = FeatureModel.load(config.scorer.clip_model or feature_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev, settings = config.evaluate, evaluator_sampling(config)
    torch.manual_seed(ev.seed)
    metrics: dict[str, float] = {}

    token_nll, tokens = 0.0, 0
    for split in HELDOUT_SPLITS:
        images, captions = load_pairs(data_dir, split)
        if not len(images):
            continue
        data = _encode(bundle, images, captions)
        bits = heldout_nll(bundle.parti, data, ev.batch_size)
        metrics[f"{split}/bits_per_token"] = bits
        token_nll, tokens = token_nll + bits * data.codes.numel(), tokens + data.codes.numel()
    if not tokens:
        raise EvaluationError(f"{data_dir}: no held-out rows in {' or '.join(HELDOUT_SPLITS)}")
    metrics["heldout_bits_per_token"] = token_nll / tokens

    rerank = features.reranker() if settings.candidates > 1 else None
    samples, prompts, exact = [], [], []
    for split in HELDOUT_SPLITS:
        pairs = heldout_prompts(data_dir, split, ev.prompts)
        if not pairs:
            continue
        images = bundle([c for c, _ in pairs], settings, rerank=rerank, batch_size=ev.batch_size)
        scores: dict[str, list[bool]] = {}
        for image, (_, scene) in zip(images.numpy(), pairs, strict=True):
            for name, ok in compare(read_scene(image), scene).items():
                scores.setdefault(name, []).append(ok)
        metrics |= {f"{split}/{k}": float(np.mean(v)) for k, v in scores.items()}
        exact += scores["exact"]
        samples.append(images)
        prompts += [c for c, _ in pairs]
    if not prompts:
        raise EvaluationError(f"{data_dir}: no held-out rows with a scene to check fidelity on")
    metrics["fidelity"] = float(np.mean(exact))
    generated = torch.cat(samples)

    clip = CLIPScore(
        model_name_or_path=lambda: (_ClipScoreModel(features.model), features.processor)
    )
    for start in range(0, len(generated), ev.batch_size):
        chunk = generated[start : start + ev.batch_size].permute(0, 3, 1, 2)
        clip.update(list(chunk), prompts[start : start + ev.batch_size])
    metrics["clip_score"] = float(clip.compute())

    reference = fid_references(
        data_dir, features, references_dir or out / "references", ev.fid_images
    )
    fid = _fid(features)
    _load_fid_references(fid, reference)
    for start in range(0, len(generated), ev.batch_size):
        fid.update(generated[start : start + ev.batch_size].permute(0, 3, 1, 2), real=False)
    metrics["fid"] = float(fid.compute())

    result = {
        "metrics": metrics,
        "key": evaluation_key(config, data_dir, features),
        "prompts": len(prompts),
        "fid_reference": reference.name,
    }
    write_json(out / EVALUATION, result)
    _grid(torch.cat([s[:16] for s in samples]).numpy()).save(out / SAMPLES)
    (out / REPORT).write_text(_report(result, bundle_dir), encoding="utf-8")
    log.info(
        "evaluation: fidelity %.1f%%, %.3f bits/token, CLIP score %.2f, FID %.2f",
        100 * metrics["fidelity"],
        metrics["heldout_bits_per_token"],
        metrics["clip_score"],
        metrics["fid"],
    )
    return result


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
    lines = [
        "# Evaluation",
        "",
        f"Model: `{bundle_dir}`  ",
        f"Held-out data: `{key['data_digest']}`; evaluator `{key['evaluator'][:12]}`"
        f" (feature model `{key['feature_model'][:12]}`); {result['prompts']} prompts.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for name in ("fidelity", "heldout_bits_per_token", "clip_score", "fid"):
        lines.append(f"| {name} | {metrics[name]:.4f} |")
    attributes = sorted(
        {k.split("/", 1)[1] for k in metrics if "/" in k and not k.endswith("bits_per_token")}
    )
    lines += ["", "| attribute | " + " | ".join(HELDOUT_SPLITS) + " |", "|---|---|---|"]
    for name in attributes:
        cells = [f"{metrics.get(f'{s}/{name}', float('nan')):.3f}" for s in HELDOUT_SPLITS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"![samples]({SAMPLES})", ""]
    return "\n".join(lines)


def _grid(images: np.ndarray, per_row: int = 8) -> Image.Image:
    pad = (-len(images)) % per_row
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    rows = [np.concatenate(images[i : i + per_row], axis=1) for i in range(0, len(images), per_row)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def evaluate_step(
    config_json: str,
    parent_run_id: str,
    model_dir: str,
    data_dir: str,
    scorer_dir: str,
    references_dir: str,
    out_dir: str,
) -> dict[str, Any]:
    """`evaluate_bundle` in a nested MLflow run "evaluate": metrics, key as tags, artifacts."""
    from parti_ops.components.tracking import step_run

    config = Config.from_json(config_json)
    with step_run(config, "evaluate", parent_run_id) as run:
        result = evaluate_bundle(config, model_dir, data_dir, scorer_dir, out_dir, references_dir)
        run.log(
            metrics=result["metrics"],
            tags={f"evaluation.{k}": v for k, v in result["key"].items()},
        )
        for name in (EVALUATION, REPORT, SAMPLES):
            run.log_artifact(Path(out_dir) / name, "evaluation")
    return result
