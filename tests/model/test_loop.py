"""The shared training loop: schedule, checkpoints, SIGTERM, resume, metrics, processes."""

import dataclasses
import logging
import os
import signal
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from parti_ops.model.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from parti_ops.model.layout import PREEMPTED_EXIT_CODE
from parti_ops.model.loop import TrainState, lr_factor, train_loop

ARCH = {"net": {"width": 4}, "vocab": 8}


@dataclass(frozen=True)
class Settings:
    steps: int = 8
    lr: float = 0.1
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    checkpoint_every: int = 3
    keep_checkpoints: int = 2
    optimizer: str = "sgd"


class Toy:
    """Two modules, an optimiser each; each step draws noise from torch's generator."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.head = nn.Linear(3, 1, bias=False)
        self.opt_a = torch.optim.Adam(self.net.parameters())
        self.opt_b = torch.optim.SGD(self.head.parameters(), momentum=0.9)
        self.rates: list[tuple[float, ...]] = []

    def state(self) -> TrainState:
        return TrainState(
            {"net": self.net, "head": self.head}, {"a": self.opt_a, "b": self.opt_b}, rng=True
        )

    def step(self, step: int) -> dict[str, float]:
        self.rates.append(
            tuple(g["lr"] for opt in (self.opt_a, self.opt_b) for g in opt.param_groups)
        )
        x = torch.randn(5, 4)
        loss = self.net(x).pow(2).mean() + (self.head.weight - step).pow(2).sum()
        for opt in (self.opt_a, self.opt_b):
            opt.zero_grad()
        loss.backward()
        for opt in (self.opt_a, self.opt_b):
            opt.step()
        return {"loss": loss.item(), "step": float(step)}

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in (*self.net.parameters(), *self.head.parameters())]


def _run(toy: Toy, folder, settings=Settings(), **kwargs) -> None:
    kwargs = {"architecture": ARCH, "resume": False, "log_every": 2, **kwargs}
    train_loop(settings, toy.state(), toy.step, folder, **kwargs)


def test_every_optimiser_gets_the_scheduled_rate_and_checkpoints_keep_the_newest(tmp_path):
    toy, logged, progress = Toy(), [], []
    _run(
        toy,
        tmp_path,
        log_metrics=lambda m, s: logged.append((s, m)),
        throughput=lambda steps_per_s: {"things_per_s": 3 * steps_per_s},
        progress=lambda s, total: progress.append((s, total)),
    )
    settings = Settings()
    assert toy.rates == [(0.1 * lr_factor(s, settings),) * 2 for s in range(8)]
    assert [s for s, _ in logged] == [2, 4, 6, 8]
    assert logged[0][1]["step"] == 0.5  # the mean over the window: steps 0 and 1
    assert logged[-1][1]["lr"] == toy.rates[-1][0] and logged[-1][1]["things_per_s"] > 0
    assert progress == [(s, 8) for s in range(1, 9)]
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000006.safetensors", "step-00000008.safetensors"]  # 3, 6, 8; keep 2
    meta = latest_checkpoint(tmp_path)[2]
    assert meta["config"]["architecture"] == ARCH
    assert meta["config"]["settings"] == dataclasses.asdict(settings)


def test_sigterm_checkpoints_exits_143_and_resuming_equals_an_uninterrupted_run(tmp_path):
    straight = Toy()
    _run(straight, tmp_path / "straight")

    def preempt(step: int, total: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        _run(Toy(), tmp_path / "split", progress=preempt)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert latest_checkpoint(tmp_path / "split")[2]["step"] == 4
    with pytest.raises(CheckpointError, match="pass --resume"):
        _run(Toy(), tmp_path / "split")
    torch.randn(7)  # the generator moved since: the checkpoint's state must win
    resumed = Toy()
    _run(resumed, tmp_path / "split", resume=True)
    assert len(resumed.rates) == 4
    for a, b in zip(straight.weights(), resumed.weights(), strict=True):
        assert torch.equal(a, b)


def test_resume_refuses_another_architecture_and_warns_on_changed_settings(tmp_path, caplog):
    _run(Toy(), tmp_path, Settings(steps=3))
    wider = {**ARCH, "net": {"width": 8}}
    with pytest.raises(CheckpointError, match=r"net\.width: 4 in checkpoint, 8 now"):
        _run(Toy(), tmp_path, architecture=wider, resume=True)
    with caplog.at_level(logging.WARNING):
        _run(Toy(), tmp_path, Settings(steps=5, optimizer="adam"), resume=True)
    assert "steps 3→5" in caplog.text and "optimizer 'sgd'→'adam'" in caplog.text
    with pytest.raises(CheckpointError, match="no checkpoints"):
        _run(Toy(), tmp_path / "empty", resume=True)


def test_a_checkpoint_without_its_architecture_is_refused(tmp_path):
    tensors, meta = Toy().state().tensors()
    save_checkpoint(tmp_path, 2, tensors, {**meta, "config": {"steps": 8}}, keep=2)
    with pytest.raises(CheckpointError, match="before checkpoints held their architecture"):
        _run(Toy(), tmp_path, resume=True)


def test_without_checkpoint_every_nothing_is_written_and_sigterm_still_stops(tmp_path):
    _run(Toy(), tmp_path, Settings(checkpoint_every=0))
    assert not list_checkpoints(tmp_path)

    def preempt(step: int, total: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        _run(Toy(), tmp_path, Settings(checkpoint_every=0), progress=preempt)
    assert stopped.value.code == PREEMPTED_EXIT_CODE and not list_checkpoints(tmp_path)


class TwoProcesses:
    """One of two processes whose peer gets SIGTERM after step 2 and reports metrics of 0."""

    def __init__(self, rank: int) -> None:
        self.rank, self.asked, self.barriers = rank, 0, 0

    def share(self, value):
        return value

    def any(self, flag: bool) -> bool:
        self.asked += 1  # once before each step
        return flag or self.asked == 3

    def mean(self, value: float) -> float:
        return value / 2

    def barrier(self) -> None:
        self.barriers += 1


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stop_agreed_by_the_processes_stops_each_and_rank_0_alone_writes(tmp_path, rank):
    processes, logged, progress = TwoProcesses(rank), [], []
    with pytest.raises(SystemExit) as stopped:
        _run(
            Toy(),
            tmp_path,
            processes=processes,
            log_metrics=lambda m, s: logged.append((s, m)),
            progress=lambda s, total: progress.append(s),
        )
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert processes.barriers == 2  # after the resume check, and at the stop's checkpoint
    if rank == 1:
        assert not list_checkpoints(tmp_path) and not logged and not progress
        return
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.safetensors"]
    assert progress == [1, 2]
    assert [s for s, _ in logged] == [2] and logged[0][1]["step"] == 0.25  # (0 + 1) / 2, halved
