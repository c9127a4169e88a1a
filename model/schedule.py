"""What each optimiser step sees: its batch and its learning rate, as functions of the step.

Both depend only on (seed, step), so a resumed run continues exactly where it stopped
and any number of processes agree on the global batch without talking to each other.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

WSD_DECAY_SHARE = 0.4


class Schedule(Protocol):
    steps: int
    warmup_steps: int
    min_lr_ratio: float


def batch_indices(step: int, batch_size: int, num_rows: int, seed: int) -> torch.Tensor:
    """Rows of the batch at `step`: epoch by epoch through a seeded permutation per epoch."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // num_rows, positions % num_rows
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
        here = epochs == epoch
        out[here] = order[offsets[here]]
    return out


def lr_factor(step: int, config: Schedule, shape: str = "cosine") -> float:
    """Linear warm-up, then down to `min_lr_ratio` along `shape`.

    "cosine": a cosine over the steps after warm-up. "wsd" (warm-up, stable, decay; Hu et
    al. 2024, MiniCPM): the peak rate until the last `WSD_DECAY_SHARE` of the steps, then
    a straight line.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if shape == "wsd":
        decay_start = round((1 - WSD_DECAY_SHARE) * config.steps)
        progress = (step - decay_start) / max(1, config.steps - decay_start)
        return 1 - (1 - config.min_lr_ratio) * min(1.0, max(0.0, progress))
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine
