"""Confidence intervals for the evaluator's per-prompt scores (numpy only).

A percentile bootstrap over prompts (Efron & Tibshirani 1993, ch. 13): resample the
prompts with replacement, take the mean each time, and read the interval off the
resampled means. Paired comparisons resample the same prompts for both models, so a
difference that every prompt shares is not drowned by how hard the prompts are.
The resampling is seeded, so the same values give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def mean_interval(
    values: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The `level` percentile-bootstrap interval of the mean of `values` (lo, hi).

    Raises:
        ValueError: for no values.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or not len(data):
        raise ValueError(f"an interval needs a non-empty list of values, got shape {data.shape}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(data), size=(resamples, len(data)))
    means = data[index].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_difference(
    new: Sequence[float], old: Sequence[float], **kw
) -> tuple[float, tuple[float, float]]:
    """Mean of `new - old` over the same prompts, and its bootstrap interval.

    Raises:
        ValueError: when the two lists differ in length (not the same prompts).
    """
    a, b = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {len(a)} against {len(b)}")
    diff = a - b
    return float(diff.mean()), mean_interval(diff, **kw)


def rank_wins(similarity: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """Per prompt i, the share of other prompts' images that score below image i for prompt i.

    `similarity[i, j]` scores prompt i against image j (made for, or shown with, prompt j).
    A tie counts half, and images of a prompt with the same caption are not compared, so
    a model that ignores the prompt scores 0.5 on average: the chance level.

    Returns:
        float64 (N,), in [0, 1]; NaN for a prompt with no other caption to compare with.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] != len(captions):
        raise ValueError(f"similarity {sim.shape} is not square over {len(captions)} captions")
    labels = np.unique(np.asarray(captions, dtype=object), return_inverse=True)[1]
    other = labels[:, None] != labels[None, :]  # (N, N): which images to compare with
    own = np.diag(sim)[:, None]
    wins = ((own > sim) + 0.5 * (own == sim)) * other
    count = other.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, wins.sum(axis=1) / np.maximum(count, 1), np.nan)


def top1(similarity: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """Per caption i, whether the best-scoring image j carries caption i (retrieval R@1).

    Chance is about 1 / N for N distinct captions.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    labels = np.unique(np.asarray(captions, dtype=object), return_inverse=True)[1]
    return (labels[sim.argmax(axis=1)] == labels).astype(np.float64)
