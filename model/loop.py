"""The training loop every trainer here shares: the decoder, the image tokenizer, the scorer.

`train_loop` owns what they have in common: resuming from the newest good checkpoint (or
refusing to overwrite one), the step loop, the learning-rate schedule on every optimiser,
SIGTERM between steps (a checkpoint, then SystemExit 143), checkpoints every
`checkpoint_every` steps and at the end keeping the newest `keep_checkpoints`, metrics
averaged over `log_every` steps with a throughput figure, and progress. A trainer brings
its `TrainState`, one training step (step → metrics) and saves its model afterwards.

A checkpoint's metadata holds the architecture it was made with and the other settings.
Resuming refuses another architecture, naming the fields, and logs changed settings.
Nothing about the data or the schedule is saved: batches and rates are functions of
(seed, step) (`batch_indices`, `lr_factor`): a resumed run continues exactly where it
stopped, and any number of processes agree on the global batch without talking.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from parti_ops.model.checkpoint import (
    CheckpointError,
    StopOnSigterm,
    latest_checkpoint,
    load_checkpoint,
    optimizer_tensors,
    refuse_to_overwrite,
    restore_optimizer,
    save_checkpoint,
)
from parti_ops.model.layout import PREEMPTED_EXIT_CODE

log = logging.getLogger(__name__)

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


MetricsLogger = Callable[[dict[str, float], int], None]
Progress = Callable[[int, int], None]


class LoopConfig(Schedule, Protocol):
    """The fields of a trainer's config section that the loop reads."""

    lr: float
    checkpoint_every: int  # 0: no checkpoints (the scorer's default)
    keep_checkpoints: int


class ProcessGroup(Protocol):
    """The processes that train together (torchrun's); `ONE_PROCESS` when alone."""

    @property
    def rank(self) -> int: ...

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every process."""

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any."""

    def mean(self, value: float) -> float:
        """The mean over the processes, on every process."""

    def barrier(self) -> None: ...


class _OneProcess:
    rank = 0

    def share(self, value: Any) -> Any:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass


ONE_PROCESS: ProcessGroup = _OneProcess()


class TrainState:
    """What a checkpoint holds: named modules and optimisers, and torch's CPU random state
    where the steps draw from it.

    Tensors are named `<module>.<parameter>` and `<optimiser>.<index>.<field>`; the
    optimisers' other state goes into the metadata.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        *,
        rng: bool = False,
    ) -> None:
        self.modules, self.optimizers, self.rng = modules, optimizers, rng

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """All tensors, and the JSON-able rest."""
        tensors = {
            f"{name}.{key}": value
            for name, module in self.modules.items()
            for key, value in module.state_dict().items()
        }
        meta: dict[str, Any] = {}
        for name, optimizer in self.optimizers.items():
            state, meta[name] = optimizer_tensors(name, optimizer)
            tensors |= state
        if self.rng:
            tensors["rng.torch"] = torch.get_rng_state()
        return tensors, {"optimizers": meta}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of `tensors`."""
        for name, module in self.modules.items():
            prefix = f"{name}."
            module.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
        for name, optimizer in self.optimizers.items():
            restore_optimizer(name, optimizer, tensors, meta["optimizers"][name])
        if self.rng:
            torch.set_rng_state(tensors["rng.torch"])


def arch_fields(config: Any) -> dict[str, Any]:
    """The fields a config section names in its `ARCH_FIELDS`, with their values: those that
    shape the weights, in a section that holds training settings too."""
    return {name: getattr(config, name) for name in config.ARCH_FIELDS}


def train_loop(
    config: LoopConfig,
    state: TrainState,
    train_step: Callable[[int], dict[str, float]],
    folder: Path,
    *,
    architecture: dict[str, Any],
    resume: bool,
    log_every: int,
    schedule: str = "cosine",
    log_metrics: MetricsLogger | None = None,
    throughput: Callable[[float], dict[str, float]] = lambda rate: {"steps_per_s": rate},
    progress: Progress | None = None,
    processes: ProcessGroup = ONE_PROCESS,
) -> None:
    """Run `train_step(step)` from step 0, or the checkpoint's, to `config.steps`.

    Every process of `processes` calls this; rank 0 alone writes checkpoints, logs metrics
    and reports progress, and all wait for its checkpoints.

    Args:
        config: the trainer's section; its fields other than `architecture`'s are the
            settings saved beside it.
        state: what checkpoints hold; every optimiser in it gets the scheduled rate.
        train_step: one optimiser step at the given step; returns its metrics.
        folder: the checkpoints' folder.
        architecture: what shapes the weights (nested sections allowed); a checkpoint made
            with another is refused.
        resume: continue from the newest good checkpoint; without it, existing
            checkpoints are an error rather than silently overwritten.
        schedule: `lr_factor`'s shape.
        log_metrics: called with (metrics averaged since the last call, step) every
            `log_every` steps and at the end, with "lr" and `throughput`'s figures.
        throughput: optimiser steps per second → the figures logged for it.
        progress: called with (step, total) after each step.

    Raises:
        CheckpointError: no usable checkpoint to resume from, one made with another
            architecture, or (without `resume`) checkpoints already in `folder`.
        SystemExit: with `PREEMPTED_EXIT_CODE` after SIGTERM, once the checkpoint is written.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in architecture}
    # Through JSON, as it is saved: tuples read back as lists.
    made_with = json.loads(json.dumps({"architecture": architecture, "settings": settings}))
    saving = config.checkpoint_every > 0
    step = 0
    if resume:
        path, tensors, meta = _newest(folder, processes)
        _check_same_config(meta["config"], made_with, path)
        state.restore(tensors, meta)
        step = int(meta["step"])
        if processes.rank == 0:
            log.info("resumed from %s (step %d of %d)", path, step, config.steps)
    else:
        refuse_to_overwrite(folder)
    processes.barrier()  # no process reads checkpoints that another is about to write

    def checkpoint() -> None:
        if saving and processes.rank == 0:
            tensors, meta = state.tensors()
            meta["config"] = made_with
            save_checkpoint(folder, step, tensors, meta, keep=config.keep_checkpoints)
        processes.barrier()

    history: dict[str, list[float]] = {}
    window_start, window_step = time.perf_counter(), step
    with StopOnSigterm() as stop:
        while step < config.steps:
            if processes.any(stop.requested):
                checkpoint()
                log.warning(
                    "preempted at step %d%s", step, ", checkpoint written" if saving else ""
                )
                raise SystemExit(PREEMPTED_EXIT_CODE)
            lr = config.lr * lr_factor(step, config, schedule)
            for optimizer in state.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = lr
            for key, value in train_step(step).items():
                history.setdefault(key, []).append(value)
            step += 1
            if step % log_every == 0 or step == config.steps:
                summary = {k: processes.mean(float(np.mean(v))) for k, v in history.items()}
                history.clear()
                # Throughput over the steps since the last log (after compilation, warm-up).
                now = time.perf_counter()
                steps_per_s = (step - window_step) / (now - window_start)
                window_start, window_step = now, step
                summary["lr"] = lr
                summary |= throughput(steps_per_s)
                if log_metrics and processes.rank == 0:
                    log_metrics(summary, step)
            if saving and (step % config.checkpoint_every == 0 or step == config.steps):
                checkpoint()
            if progress and processes.rank == 0:
                progress(step, config.steps)


def _newest(folder: Path, processes: ProcessGroup) -> tuple[Path, dict, dict]:
    """The newest good checkpoint, chosen by rank 0 (which sets bad ones aside) for all."""
    found: tuple[Path, dict, dict] | None = None
    error = None
    if processes.rank == 0:
        try:
            found = latest_checkpoint(folder)
        except CheckpointError as err:
            error = str(err)
    path, error = processes.share((found[0] if found else None, error))
    if error:
        raise CheckpointError(error)
    return found if found else (path, *load_checkpoint(path))


def _check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint made with another architecture; warn on changed settings."""
    if "architecture" not in saved:
        raise CheckpointError(
            f"{path}: written before checkpoints held their architecture; train into a new"
            " output folder"
        )
    built = _changes(saved["architecture"], current["architecture"])
    settings = _changes(saved["settings"], current["settings"])
    if built:
        detail = ", ".join(
            f"{k}: {old!r} in checkpoint, {new!r} now" for k, (old, new) in sorted(built.items())
        )
        raise CheckpointError(
            f"{path}: made with a different model config ({detail}); resume with the same"
            " config, or train into a new output folder"
        )
    if settings:
        detail = ", ".join(f"{k} {old!r}→{new!r}" for k, (old, new) in sorted(settings.items()))
        log.warning("resuming with changed training settings: %s", detail)


def _changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Field → (saved, current) where they differ; nested sections as `section.field`."""
    saved, current = _flat(saved), _flat(current)
    return {
        k: (saved.get(k), current.get(k))
        for k in saved.keys() | current.keys()
        if saved.get(k) != current.get(k)
    }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out
