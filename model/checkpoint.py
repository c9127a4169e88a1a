"""Training checkpoints that survive preemption: atomic, self-checking, nothing unpickled.

A checkpoint is one safetensors file, `step-00001234.safetensors`, holding every
tensor of the training state (model, EMA, optimiser moments, RNG state) and, in its
metadata, a JSON document with the rest (step, optimiser hyper-parameters, the config
that made it) and a sha256 over the tensors, so that a truncated or corrupted file is
refused with a message instead of resuming from garbage.

Writes go to a temporary file in the same folder, are fsynced, then `os.replace`d
into place: a crash mid-write leaves the previous checkpoint as it was. The newest
`keep` checkpoints are kept, so a bad newest one has a fallback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parti_ops.model.errors import PartiError

log = logging.getLogger(__name__)

_NAME = re.compile(r"step-(\d{8,})\.safetensors")
_META_KEY = "parti_ops.checkpoint"


class CheckpointError(PartiError, ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, or made by another config."""


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """sha256 over the JSON document (less its own checksum) and every tensor."""
    sha = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "sha256"}
    sha.update(json.dumps(body, sort_keys=True).encode() + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def save_checkpoint(
    folder: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int
) -> Path:
    """Write `step-<step>.safetensors` atomically, then delete all but the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.safetensors"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    body = {**meta, "step": step}
    body["sha256"] = _digest(tensors, body)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(body, sort_keys=True)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in `folder`, oldest first (temporary files are not checkpoints)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))  # type: ignore[union-attr]


def refuse_to_overwrite(folder: str | Path) -> None:
    """A fresh run where checkpoints already are is an error: resume, or use another folder."""
    if list_checkpoints(folder):
        raise CheckpointError(
            f"{folder} already holds checkpoints; pass --resume to continue that run,"
            " or use another output folder"
        )


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify one checkpoint; CheckpointError says what is wrong with it."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:  # one read: header, metadata, tensors
            meta = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({err}); it is probably truncated by a crash or"
            " a full disk"
        ) from None
    if _digest(tensors, meta) != meta.get("sha256"):
        raise CheckpointError(
            f"{path}: checkpoint contents do not match their checksum (corrupted on disk)"
        )
    return tensors, meta


def latest_checkpoint(folder: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint that loads and verifies; bad newer ones are set aside.

    A refused file is renamed to `<name>.refused` (kept for inspection, no longer counted
    among the checkpoints, so it cannot push a good one out), with a warning saying why.

    Raises:
        CheckpointError: there is none, or none that is good (every reason listed).
    """
    found = list_checkpoints(folder)
    if not found:
        raise CheckpointError(f"{folder}: no checkpoints to resume from; start without --resume")
    reasons = []
    for path in reversed(found):
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointError as err:
            path.rename(path.with_name(path.name + ".refused"))
            log.warning("skipping %s; renamed to %s.refused", err, path.name)
            reasons.append(str(err))
            continue
        return path, tensors, meta
    raise CheckpointError("no usable checkpoint: " + " | ".join(reasons))


def optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimiser's state into tensors (for safetensors) and JSON (the rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    prefix = f"{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class StopOnSigterm:
    """Within this context, SIGTERM sets `requested` instead of killing the process.

    The training loop checks it between steps, writes a checkpoint and exits with
    `PREEMPTED_EXIT_CODE`, which is how a preempted pod or a `torchrun` restart sees it.
    """

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        log.warning("SIGTERM: writing a checkpoint after this step, then exiting")

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():  # signals reach only it
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            # None: the previous handler was set outside Python; the default is the best guess.
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False
