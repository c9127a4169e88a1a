"""Training the Parti decoder: one `fit()` for CPU, one GPU, or many processes under torchrun.

DDP starts when `torchrun` sets WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU); bf16 autocast
on a GPU, fp32 on CPU; gradient accumulation; Muon (hidden matrices) with AdamW (the rest),
with warm-up, a stable peak and a linear decay (wsd); gradient clipping; optional
`torch.compile`; caption dropout for classifier-free guidance.

The global batch at step s, and which captions it drops, are functions of (seed, s)
(`model/loop.py`), so 1 process and N processes train on the same rows, and a run
stopped by SIGTERM and resumed from its checkpoint equals an uninterrupted one bit for
bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parti_ops.model.config import PartiConfig, TrainConfig
from parti_ops.model.layout import CHECKPOINTS
from parti_ops.model.loop import MetricsLogger, Progress, TrainState, batch_indices, train_loop
from parti_ops.model.optim import MuonAdamW
from parti_ops.model.parti import Parti, PartiDims

MODEL = "parti"  # the trained model's folder under the output folder
# Dense bf16 peak of one GPU, for MFU; other GPUs report tokens/s only.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


@dataclass(frozen=True)
class CodeData:
    """Encoded rows: codes (N, grid²) int64, text ids (N, T) int64, text mask (N, T) bool."""

    codes: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], text_length: int) -> CodeData:
        """From `load_encoded`'s arrays: codes (N, h, w), text_ids (N, T), text_lengths (N,)."""
        codes = torch.from_numpy(arrays["codes"].astype(np.int64)).flatten(1)
        ids = torch.from_numpy(arrays["text_ids"].astype(np.int64))[:, :text_length]
        lengths = torch.from_numpy(arrays["text_lengths"].astype(np.int64))
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        return cls(codes=codes, text_ids=ids, text_mask=mask)

    def __len__(self) -> int:
        return len(self.codes)

    def rows(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        # Text trimmed to the longest caption in the batch: padding costs attention time.
        mask = self.text_mask[index]
        width = max(1, int(mask.sum(dim=1).max()))
        return tuple(
            t.to(device, non_blocking=True)
            for t in (self.text_ids[index, :width], mask[:, :width], self.codes[index])
        )


@dataclass(frozen=True)
class _Processes:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # this process started the process group, and ends it

    @classmethod
    def start(cls) -> _Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        owner = world > 1 and not dist.is_initialized()
        if owner:
            dist.init_process_group("nccl" if cuda else "gloo")
        rank = int(os.environ.get("RANK", "0"))
        return cls(rank=rank, world=world, device=device, owns_group=owner)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (e.g. one of them got SIGTERM)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def caption_drops(step: int, batch_size: int, rate: float, seed: int) -> torch.Tensor:
    """Which rows of the global batch at `step` get the null caption: (batch_size,) bool."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(batch_size, generator=generator) < rate


def _optimizer(model: Parti, train: TrainConfig) -> MuonAdamW:
    """Muon for the hidden matrices, which alone take weight decay; AdamW for the rest
    (norms, biases, the embeddings, which the output head shares, positions): Muon is for
    hidden layers, not a network's input and output (Jordan et al. 2024)."""
    matrices, rest = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim == 2 and not name.startswith(("text_embed", "code_embed"))
        is_matrix = is_matrix and not name.endswith("_pos")
        (matrices if is_matrix else rest).append(p)
    groups = [
        {
            "params": matrices,
            "weight_decay": train.weight_decay,
            "muon": True,
            "lr_scale": train.muon_lr_scale,
        },
        {"params": rest, "weight_decay": 0.0},
    ]
    return MuonAdamW(groups, lr=train.lr, betas=(0.9, train.beta2))


def _autocast(train: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_flops_per_example(model: Parti, text_tokens: int) -> float:
    """Training FLOPs of one example: 6 per parameter per token plus attention (PaLM, app. B)."""
    cfg, dims = model.config, model.dims
    n, d = dims.image_length, cfg.d_model
    embeddings = model.text_embed.weight.numel() + model.code_embed.weight.numel()
    dense = model.num_parameters() - embeddings
    attention = (
        6
        * 2
        * d
        * (
            cfg.encoder_layers * text_tokens**2
            + cfg.decoder_layers * (n * (n + 1) // 2 + n * text_tokens)
        )
    )
    return 6 * dense * (n + text_tokens) + 6 * d * dims.codebook_size * n + attention


def fit(
    config: PartiConfig,
    train: TrainConfig,
    dims: PartiDims,
    data: CodeData,
    out_dir: str | Path,
    *,
    resume: bool = False,
    log_metrics: MetricsLogger | None = None,
    progress: Progress | None = None,
) -> Parti:
    """Train Parti on encoded rows; returns the model, saved to `out_dir/parti` by rank 0.

    Checkpoints go to `out_dir/checkpoints` every `checkpoint_every` steps, at the end and
    on SIGTERM (then SystemExit with code 143). Under torchrun every process calls this.

    Args:
        resume: continue from the newest good checkpoint; without it, existing
            checkpoints are an error rather than silently overwritten.
        log_metrics: called on rank 0 with (metrics, step) every `log_every` steps.
        progress: called on rank 0 with (step, total) after each step.
    """
    procs = _Processes.start()
    try:
        return _fit(procs, config, train, dims, data, Path(out_dir), resume, log_metrics, progress)
    finally:
        procs.close()


def _fit(
    procs: _Processes,
    config: PartiConfig,
    train: TrainConfig,
    dims: PartiDims,
    data: CodeData,
    out: Path,
    resume: bool,
    log_metrics: MetricsLogger | None,
    progress: Progress | None,
) -> Parti:
    if train.batch_size % (procs.world * train.grad_accum):
        raise ValueError(
            f"train.batch_size={train.batch_size} must be a multiple of processes * grad_accum"
            f" ({procs.world} * {train.grad_accum})"
        )
    micro = train.batch_size // (procs.world * train.grad_accum)
    torch.manual_seed(train.seed)
    model = Parti(config=config, dims=dims).to(procs.device)
    optimizer = _optimizer(model, train)
    stepper: torch.nn.Module = model
    ddp = None
    if procs.world > 1:
        ddp_device = [procs.device.index] if procs.device.type == "cuda" else None
        stepper = ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_device)
    if train.compile:
        stepper = torch.compile(stepper)
    per_process = micro * train.grad_accum
    mine = slice(procs.rank * per_process, (procs.rank + 1) * per_process)  # of a global batch

    def train_step(step: int) -> dict[str, float]:
        rows = batch_indices(step, train.batch_size, len(data), train.seed)
        drops = caption_drops(step, train.batch_size, train.caption_dropout, train.seed)
        loss_sum = 0.0
        for i, part in enumerate(_chunks(rows[mine], drops[mine], micro)):
            # Gradients are averaged across processes on the last micro-step only.
            last = i == train.grad_accum - 1
            # Dropout draws from a seed per (step, process, micro-step), so a resumed
            # run needs no generator state to continue exactly, on CPU or GPU.
            torch.manual_seed(hash((train.seed, step, procs.rank, i)) % 2**63)
            with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
                text_ids, text_mask, codes = data.rows(part[0], procs.device)
                with _autocast(train, procs.device):
                    logits = stepper(text_ids, text_mask, codes, part[1].to(procs.device))
                loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
                (loss / train.grad_accum).backward()
            loss_sum += loss.item() / train.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bits = loss_sum / math.log(2)
        return {"loss": loss_sum, "grad_norm": float(grad_norm), "bits_per_token": bits}

    flops = train_flops_per_example(model, text_tokens=int(data.text_mask.sum(1).float().mean()))
    peak = _peak_flops(procs.device)

    def throughput(steps_per_s: float) -> dict[str, float]:
        examples_per_s = steps_per_s * train.batch_size
        figures = {"tokens_per_s": examples_per_s * dims.image_length}
        if peak:
            figures["mfu"] = examples_per_s * flops / (peak * procs.world)
        return figures

    model.train()
    train_loop(
        train,
        TrainState({"model": model}, {"optimizer": optimizer}),
        train_step,
        out / CHECKPOINTS,
        # The whole model section and what the tokenizers fix, as `save_pretrained` writes.
        architecture={"parti": dataclasses.asdict(config), "dims": dataclasses.asdict(dims)},
        resume=resume,
        log_every=train.log_every,
        schedule="wsd",
        log_metrics=log_metrics,
        throughput=throughput,
        progress=progress,
        processes=procs,
    )
    model.eval()
    if procs.rank == 0:
        model.save_pretrained(out / MODEL)
    procs.barrier()
    return model


def _chunks(
    rows: torch.Tensor, drops: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size], drops[start : start + size]


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


@torch.inference_mode()
def heldout_nll(model: Parti, data: CodeData, batch_size: int = 64) -> float:
    """Mean negative log-likelihood of the codes given the captions, in bits per token."""
    return float(bits_per_row(model, data, batch_size).mean())


@torch.inference_mode()
def bits_per_row(model: Parti, data: CodeData, batch_size: int = 64) -> torch.Tensor:
    """Each row's negative log-likelihood of its codes given its caption, bits per token (N,).

    Every row has the same number of codes, so the mean over rows is the mean per token.
    """
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        text_ids, text_mask, codes = data.rows(index, device)
        logits = model(text_ids, text_mask, codes)  # (B, T, codebook)
        nll = F.cross_entropy(logits.transpose(1, 2).float(), codes, reduction="none")  # (B, T)
        rows.append(nll.double().mean(dim=1).cpu())
    return torch.cat(rows) / math.log(2)
