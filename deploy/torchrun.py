"""The one torchrun launcher: the pipeline's train step on one machine and every PyTorchJob pod.

Both start `python -m torch.distributed.run ... -m <entry module> <arguments.json>` and
supervise it the same way:

- SIGTERM and SIGINT are passed on to torchrun, which hands them to every process; the
  processes write a checkpoint and exit 143. A pod's launcher is the container's PID 1,
  which the kernel spares signals it has no handler for, so the handler is needed there.
- torchrun itself then exits 1, so the entry point's global rank 0 leaves a marker file
  (`PREEMPTED` in the output folder); a non-zero exit with the marker, or after a signal
  (stopped before the processes could checkpoint: nothing was lost), is a preemption and
  the launcher exits 143, which Kubernetes' and the Training Operator's restart policies
  read as "retry": the restarted run resumes from its checkpoints.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parti_ops.model.layout import PREEMPTED, PREEMPTED_EXIT_CODE


def torchrun_command(module: str, arguments: Path, nproc: int | None = None) -> list[str]:
    """torchrun running `python -m module arguments` in each process.

    Args:
        module: the entry point's module.
        arguments: the JSON file it reads.
        nproc: processes on this machine alone (`--standalone`); None takes the node count,
            rank, rendezvous and processes per node from the PET_* variables that the
            Training Operator sets on every replica (its pkg/controller.v1/pytorch/envvar.go).
    """
    local = [] if nproc is None else ["--standalone", f"--nproc-per-node={nproc}"]
    return [sys.executable, "-m", "torch.distributed.run", *local, "-m", module, str(arguments)]


def supervise(command: Sequence[str], marker: Path) -> int:
    """Run `command`, passing SIGTERM and SIGINT on; a checkpointed stop returns 143."""
    children: list[subprocess.Popen] = []
    stopped: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped.append(signum)
        for child in children:
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        children.append(subprocess.Popen(list(command)))
        code = children[0].wait()
    finally:
        for signum, handler in previous.items():
            # None: the previous handler was set outside Python; the default is the best guess.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if code != 0 and (marker.exists() or stopped):
        return PREEMPTED_EXIT_CODE
    return code


def launch(
    module: str,
    arguments: dict[str, Any],
    arguments_file: Path,
    out_dir: Path,
    *,
    nproc: int | None = None,
    clear_marker: bool = True,
) -> int:
    """Write `arguments` to `arguments_file`, run torchrun on `module`, supervise it.

    Args:
        out_dir: the entry point's output folder, where rank 0 leaves the `PREEMPTED` marker.
        nproc: see `torchrun_command`.
        clear_marker: remove a marker left by an earlier attempt first; only the node that
            holds global rank 0 (the marker's writer) should.

    Returns:
        torchrun's exit code, or 143 for a checkpointed stop.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / PREEMPTED
    if clear_marker:
        marker.unlink(missing_ok=True)
    arguments_file.parent.mkdir(parents=True, exist_ok=True)
    arguments_file.write_text(json.dumps(arguments), encoding="utf-8")
    return supervise(torchrun_command(module, arguments_file, nproc), marker)
