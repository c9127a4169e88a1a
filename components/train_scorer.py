"""The scorer step: train the in-house CLIP-style scorer on the accepted training pairs.

Its output folder (weights, config, a copy of the caption tokenizer, a report) is what
the evaluator uses for CLIP score and FID features, and the sampler for reranking. The
report gives its retrieval accuracy on held-out pairs: how often an image's own caption
ranks first among 10; and, where rows carry a scene, how often a caption of it scores
above the same caption with one attribute changed (per attribute).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from parti_ops.components.loaders import load_captioned
from parti_ops.components.shards import write_json
from parti_ops.components.versioning import model_version
from parti_ops.model.config import Config
from parti_ops.model.errors import PartiError
from parti_ops.model.scenes import NEAR_MISSES, Scene, describe, near_misses

log = logging.getLogger(__name__)

REPORT = "scorer_report.json"
RETRIEVAL_CANDIDATES = 10
# Held-out pairs the step scores the trained scorer on, per split, spread evenly over it:
# enough for a figure to a point or two, and a bounded share of a short run's time.
HELDOUT_PAIRS = 500


class ScorerError(PartiError, ValueError):
    """The scorer cannot be trained on this data; the message says what to do."""


def near_miss_captions(scenes: list[Scene | None], seed: int) -> list[list[str]]:
    """For each row with a scene, the captions of its near misses (`near_misses`), each
    phrased at random, as training captions are."""
    rng = np.random.default_rng(seed)
    return [
        [describe(miss, rng) for miss in near_misses(scene, rng)] if scene else []
        for scene in scenes
    ]


def near_miss_pairs(scenes: list[Scene | None], seed: int) -> list[list[tuple[str, str]]]:
    """For each row with a scene, (its caption, a near miss's caption) per `NEAR_MISSES`,
    both phrased alike, so that the one changed attribute is all that tells them apart."""
    rng = np.random.default_rng(seed)
    pairs = []
    for scene in scenes:
        row = []
        for miss in near_misses(scene, rng) if scene else []:
            phrasing = int(rng.integers(1 << 62))
            row.append(
                (
                    describe(scene, np.random.default_rng(phrasing)),
                    describe(miss, np.random.default_rng(phrasing)),
                )
            )
        pairs.append(row)
    return pairs


def scorer_step(
    config: Config,
    parent_run_id: str,
    data_dir: str,
    text_tokenizer_dir: str,
    out_dir: str,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the scorer on the `train` pairs, report held-out retrieval; returns the report.

    With `scorer.checkpoint_every` > 0 it checkpoints into `out_dir/checkpoints`; `resume`
    continues from the newest good one.
    """
    from parti_ops.components.progress import progress_bar
    from parti_ops.components.tracking import step_run
    from parti_ops.model.scorer import (
        load_scorer,
        near_miss_accuracy,
        retrieval_accuracy,
        train_scorer,
    )

    cfg = config.scorer
    out = Path(out_dir)
    with step_run(config, "scorer", parent_run_id) as run:
        images, captions, scenes = load_captioned(data_dir, "train")
        if len(images) < 2:
            raise ScorerError(
                f"{data_dir}: the scorer needs captioned rows in split 'train' (has"
                f" {len(images)}); ingest and validate a data set with captions first"
            )
        log.info("training the scorer on %d pairs, %d steps", len(images), cfg.steps)
        with progress_bar("scorer") as update:
            train_scorer(
                cfg,
                images,
                captions,
                text_tokenizer_dir,
                config.text_tokenizer.max_length,
                out,
                progress=update,
                negatives=near_miss_captions(scenes, cfg.seed) if cfg.hard_negatives else None,
                resume=resume,
            )
        model, processor = load_scorer(out)
        report: dict[str, Any] = {"train_pairs": len(images), "steps": cfg.steps}
        for split in ("validation", "test"):
            held, held_captions, held_scenes = load_captioned(data_dir, split)
            if len(held) > HELDOUT_PAIRS:
                keep = np.linspace(0, len(held) - 1, HELDOUT_PAIRS).round().astype(int)
                held = held[keep]
                held_captions = [held_captions[i] for i in keep]
                held_scenes = [held_scenes[i] for i in keep]
            if len(held) >= RETRIEVAL_CANDIDATES:
                report[f"{split}/retrieval_top1_of_{RETRIEVAL_CANDIDATES}"] = retrieval_accuracy(
                    model, processor, held, held_captions, RETRIEVAL_CANDIDATES, seed=cfg.seed
                )
                report[f"{split}/pairs"] = len(held)
            pairs = near_miss_pairs(held_scenes, cfg.seed)
            if any(pairs):
                shares = near_miss_accuracy(model, processor, held, pairs)
                for kind, share in zip(NEAR_MISSES, shares, strict=False):
                    report[f"{split}/beats_near_miss_{kind}"] = share
        report["version"] = model_version(out)
        write_json(out / REPORT, report)
        run.log(
            metrics={k: v for k, v in report.items() if isinstance(v, float)},
            tags={"scorer.version": report["version"]},
            step=cfg.steps,
        )
        run.log_artifact(out / REPORT, "scorer")
    for key, value in report.items():
        if key.endswith(f"retrieval_top1_of_{RETRIEVAL_CANDIDATES}"):
            log.info("scorer %s: %.1f%%", key, 100 * value)
    return report
