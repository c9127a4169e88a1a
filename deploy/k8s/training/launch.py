"""One node's share of a multi-node training run: the command of every PyTorchJob pod.

It starts the entry point that the pipeline's train step starts under torchrun on one
machine, `python -m parti_ops.components.train <arguments.json>` (components/train.py), with
one torchrun per pod. torchrun takes the node count, this node's rank, the master's address
and port, and the processes per node from the PET_* variables that the Training Operator
sets on every replica (its pkg/controller.v1/pytorch/envvar.go), so no command line names
them.

1. The arguments file: the resolved config (PARTI_PRESET, PARTI_CONFIG, PARTI_SET) and the
   folders (PARTI_ENCODED, PARTI_TEXT_TOKENIZER, PARTI_IMAGE_TOKENIZER, PARTI_OUT), with
   `resume` set when PARTI_OUT already holds checkpoints, so that a restarted pod continues.
2. torchrun, with SIGTERM passed on (this process is the container's PID 1, which the
   kernel spares signals it has no handler for): the processes checkpoint and exit 143.
3. The exit code: 143 when the processes stopped to checkpoint (torchrun itself then exits
   1; rank 0 leaves the `preempted` marker), so that the job's ExitCode restart policy
   recreates the pods, which resume; otherwise torchrun's own code (1: a permanent failure).

Shipped to the pods as a ConfigMap (kustomization.yaml beside this file), run by the
image's Python.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PREEMPTED_EXIT_CODE = 143  # parti_ops.model.checkpoint.PREEMPTED_EXIT_CODE


def launch_arguments(env: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of `train_step`, as `components/train.py`'s `main` reads them."""
    from parti_ops.model.checkpoint import list_checkpoints
    from parti_ops.model.config import Config
    from parti_ops.model.train import CHECKPOINTS

    config = Config.load(
        env.get("PARTI_PRESET", "tiny"),
        env.get("PARTI_CONFIG") or None,
        shlex.split(env.get("PARTI_SET", "")),
    )
    out = Path(env["PARTI_OUT"])
    return {
        "config_json": config.to_json(),
        "parent_run_id": env.get("PARTI_PARENT_RUN_ID", ""),
        "encoded_dir": env["PARTI_ENCODED"],
        "text_dir": env["PARTI_TEXT_TOKENIZER"],
        "image_dir": env["PARTI_IMAGE_TOKENIZER"],
        "out_dir": str(out),
        "resume": bool(list_checkpoints(out / CHECKPOINTS)),
    }


def torchrun_command(arguments: Path) -> list[str]:
    """torchrun for this node; every rendezvous setting comes from the PET_* variables."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "-m", "parti_ops.components.train", str(arguments),
    ]  # fmt: skip


def supervise(command: Sequence[str], marker: Path) -> int:
    """Run `command`, passing SIGTERM and SIGINT on; map a checkpointed stop to 143."""
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
            signal.signal(signum, handler)
    # Stopped before the processes could checkpoint (still starting) is a preemption all
    # the same: nothing was lost, and a restart starts or resumes the run.
    if code != 0 and (marker.exists() or stopped):
        return PREEMPTED_EXIT_CODE
    return code


def main(env: Mapping[str, str] = os.environ) -> int:
    from parti_ops.components.train import PREEMPTED

    arguments = launch_arguments(env)
    out = Path(arguments["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    marker = out / PREEMPTED
    if env.get("PET_NODE_RANK", "0") == "0":  # the marker's writer, global rank 0, is here
        marker.unlink(missing_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="parti-launch-"))  # per pod: never shared
    path = folder / "launch.json"
    path.write_text(json.dumps(arguments), encoding="utf-8")
    state = "resuming from checkpoints" if arguments["resume"] else "starting"
    print(f"node {env.get('PET_NODE_RANK', '0')}: {state} in {out}", flush=True)
    return supervise(torchrun_command(path), marker)


if __name__ == "__main__":
    sys.exit(main())
