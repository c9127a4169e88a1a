"""Tracking benchmark: `log_batch` vs `log_metric`, and MLflow's share of a training step.

    python bench/tracking.py [--preset tiny] [--values 1000] [--steps 30] [--warmup 5]

Prints one JSON object. Both parts write to a fresh SQLite store in a temporary folder,
opened as the pipeline opens it (`client_for`: WAL mode, busy timeout).

1. `--values` metric values logged with one `log_batch` call, and with one `log_metric`
   call each; `log_batch_speedup` is the second time over the first.
2. `fit()` trains the preset's decoder on random codes and captions (speed does not depend
   on the data) for `--warmup` + `--steps` steps; the step time is that of the last
   `--steps`. The metrics `fit()` reported are then logged again through
   `Run.log(metrics=..., step=...)`, the call the training step makes every `log_every`
   steps, and timed. `log_overhead_fraction` is that call's time spread over `log_every`
   steps, as a fraction of the step time (goal: under 0.01). It is computed rather than
   taken from a run with and one without logging: on a shared CPU the step time varies by
   more than the overhead being measured. A GPU step is far shorter, so run it there too.
"""

import argparse
import dataclasses
import json
import platform
import sqlite3
import statistics
import tempfile
import time
from contextlib import closing
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Metric
from train import random_data  # bench/train.py: the same random rows for the same model

from parti_ops.components.tracking import client_for, step_run
from parti_ops.model.config import Config
from parti_ops.model.parti import PartiDims
from parti_ops.model.train import fit


def batch_vs_single(config: Config, values: int) -> dict[str, float]:
    client, _ = client_for(config)
    with step_run(config, "batch") as batch, step_run(config, "single") as single:
        now = int(time.time() * 1000)
        started = time.perf_counter()
        client.log_batch(batch.run_id, metrics=[Metric("m", i, now, i) for i in range(values)])
        batch_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(values):
            client.log_metric(single.run_id, "m", i, timestamp=now, step=i)
        single_s = time.perf_counter() - started
    # Both runs must hold every value, or the times compare different work.
    for run in (batch, single):
        assert len(client.get_metric_history(run.run_id, "m")) == values
    return {
        "log_batch_s": round(batch_s, 4),
        "log_metric_s": round(single_s, 3),
        "log_batch_speedup": round(single_s / batch_s, 1),
    }


def training_steps(config: Config, steps: int, warmup: int, text_tokens: int) -> tuple[float, list]:
    """Seconds per training step after the warm-up, and the metrics `fit()` reported."""
    dims = PartiDims.from_config(config)
    train = dataclasses.replace(
        config.train,
        steps=warmup + steps,
        log_every=warmup,
        checkpoint_every=10**9,
        compile=False,
        nproc=1,
        grad_accum=1,
    )
    data = random_data(dims, rows=4 * train.batch_size, text_tokens=text_tokens)
    reported: list[tuple[dict[str, float], int]] = []
    at: list[float] = []

    def record(metrics: dict[str, float], step: int) -> None:
        at.append(time.perf_counter())
        reported.append((metrics, step))

    with tempfile.TemporaryDirectory() as out:
        fit(config.parti, train, dims, data, out, log_metrics=record)
    # From the first report (end of warm-up) to the last (end of training).
    return (at[-1] - at[0]) / (reported[-1][1] - reported[0][1]), reported


def log_call_s(config: Config, reported: list, calls: int) -> float:
    """Median seconds of the training step's `Run.log` call, over `calls` calls."""
    times = []
    with step_run(config, "train") as run:
        for i in range(calls):
            metrics, step = reported[i % len(reported)]
            started = time.perf_counter()
            run.log(metrics={f"train/{k}": v for k, v in metrics.items()}, step=step + i)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--values", type=int, default=1000, help="at most 1000 (one batch)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--text-tokens", type=int, default=24)
    parser.add_argument("--log-calls", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        # Named outright, so that no $MLFLOW_TRACKING_URI sends the benchmark elsewhere.
        store = Path(work) / "mlflow.db"
        config = Config.from_name(args.preset).merge(
            {"work_dir": work, "tracking": {"tracking_uri": f"sqlite:///{store}"}}
        )
        batching = batch_vs_single(config, args.values)
        step_s, reported = training_steps(config, args.steps, args.warmup, args.text_tokens)
        log_s = log_call_s(config, reported, args.log_calls)
        with closing(sqlite3.connect(store)) as db:
            journal_mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    log_every = config.train.log_every
    cuda = torch.cuda.is_available()
    result = {
        "bench": "tracking",
        "store": f"sqlite (journal_mode={journal_mode})",
        "mlflow": mlflow.__version__,
        "device": torch.cuda.get_device_name() if cuda else platform.machine(),
        "values": args.values,
        **batching,
        "preset": args.preset,
        "batch_size": config.train.batch_size,
        "train_step_s": round(step_s, 4),
        "metrics_per_log": len(reported[-1][0]),
        "log_call_s": round(log_s, 4),
        "log_every": log_every,
        "log_overhead_fraction": round(log_s / log_every / step_s, 5),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
