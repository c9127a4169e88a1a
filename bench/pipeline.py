"""Pipeline benchmark: `make run`'s wall time per step, a second (cached) run, orchestration.

    python bench/pipeline.py [--preset tiny] [--config FILE] [--set KEY=VALUE ...]
    python bench/pipeline.py --overhead [--preset quick]

Prints one JSON object from one run. Default: the pipeline through `run_local` (kfp.local,
what `parti run` does) in a fresh work folder, with every step's wall time and the total,
then the same again in that folder, where every cached step is reused; `goal_ratio` is
the first run's total over the 10-minute goal and `second_run_ratio` the second's over
the first's. `--overhead` instead compares kfp.local with the same `*_step` functions
called in order in one process, each into its own work folder: the difference divided by
the number of steps is the orchestration overhead per step (goal: <= 3 s).
"""

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

from parti_ops.model.config import Config

# The pipeline's tasks, exit handler included.
STEPS = ("start-run", "ingest", "validate", "text-tokenizer", "image-tokenizer", "encode",
         "train", "scorer", "fid-reference", "evaluate", "register", "export", "smoke-test",
         "end-run")  # fmt: skip


def direct(config: Config, root: Path) -> None:
    """Every step of the pipeline, in the pipeline's order, as plain calls."""
    from parti_ops.components.encode import encode_step
    from parti_ops.components.evaluate import (
        FeatureModel,
        evaluate_bundle,
        evaluate_step,
        fid_references,
    )
    from parti_ops.components.export import export_step
    from parti_ops.components.ingest import ingest_step
    from parti_ops.components.register import register_step
    from parti_ops.components.serve import smoke_test_step
    from parti_ops.components.synth import synth_step
    from parti_ops.components.tokenizers import image_tokenizer_step, text_tokenizer_step
    from parti_ops.components.tracking import end_pipeline_run, start_pipeline_run
    from parti_ops.components.train_decoder import train_step
    from parti_ops.components.train_scorer import scorer_step
    from parti_ops.components.validate import validate_step

    run_id = str(uuid.uuid4())
    parent = start_pipeline_run(config, run_name="direct", pipeline_run_id=run_id)
    synth_step(config, parent, str(root / "raw"))
    ingest_step(config, parent, str(root / "raw"), str(root / "canonical"))
    validate_step(config, parent, str(root / "canonical"), str(root / "validated"))
    accepted = root / "validated" / "accepted"
    text_tokenizer_step(config, parent, str(accepted), str(root / "text"))
    image_tokenizer_step(config, parent, str(accepted), str(root / "image"))
    encode_step(config, parent, str(accepted), str(root / "text"), str(root / "image"),
                str(root / "encoded"))  # fmt: skip
    train_step(config, parent, str(root / "encoded"), str(root / "text"), str(root / "image"),
               str(root / "model"))  # fmt: skip
    scorer_step(config, parent, str(accepted), str(root / "text"), str(root / "scorer"))
    features = FeatureModel.load(root / "scorer")
    fid_references(accepted, features, root / "references", config.evaluate.fid_images)
    evaluate_step(config, parent, str(root / "model"), str(accepted), str(root / "scorer"),
                  str(root / "references"), str(root / "evaluation"))  # fmt: skip

    def reevaluate(bundle: Path) -> dict:
        return evaluate_bundle(
            config, bundle, accepted, root / "scorer", root / "champion", root / "references"
        )

    register_step(config, parent, str(root / "model"), str(root / "evaluation"),
                  str(root / "encoded"), str(root / "decision"), reevaluate=reevaluate)  # fmt: skip
    export_step(config, parent, str(root / "repository"))
    smoke_test_step(config, parent, str(root / "repository"), str(accepted), str(root / "smoke"))
    end_pipeline_run(config, run_id)


def _timed_runs(config: Config) -> dict:
    """The pipeline twice in one work folder: fresh, then with the first run's cache."""
    from parti_ops.pipelines.pipeline import run_local

    runs = []
    for _ in range(2):
        started = time.perf_counter()
        result = run_local(config)
        runs.append((time.perf_counter() - started, result))
    (first_s, first), (second_s, second) = runs
    evaluation = json.loads((first.evaluation / "evaluation.json").read_text())
    metrics = evaluation["metrics"]
    return {
        "total_s": first_s,
        "steps_s": {name.removesuffix("-op"): round(s, 2) for name, s in first.seconds.items()},
        "goal_s": GOAL_S,
        "goal_ratio": first_s / GOAL_S,
        "second_run_s": second_s,
        "second_run_ratio": second_s / first_s,
        "second_run_cached": sorted(n.removesuffix("-op") for n in second.cached),
        "evaluation": {
            k: metrics.get(k)
            for k in sorted(metrics)
            if "exact" in k or "fidelity" in k or "prompt_following" in k
        },  # fmt: skip
    }


def _overhead(config_for) -> dict:
    from parti_ops.pipelines.pipeline import run_local

    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for way in ("direct", "kfp_local"):
            config = config_for(Path(tmp) / way)
            started = time.perf_counter()
            if way == "direct":
                direct(config, Path(tmp) / way / "steps")
            else:
                run_local(config, cache=False)
            timings[way] = time.perf_counter() - started
    overhead = timings["kfp_local"] - timings["direct"]
    return {
        "kfp_local_s": timings["kfp_local"],
        "direct_s": timings["direct"],
        "steps": len(STEPS),
        "overhead_per_step_s": overhead / len(STEPS),
        "goal_overhead_per_step_s": 3.0,
    }


GOAL_S = 600.0  # `make run` on 2 CPU cores, environment installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=None, help="default: tiny (quick with --overhead)")
    parser.add_argument("--config", default=None, help="YAML file of config sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--overhead", action="store_true", help="kfp.local vs in-process")
    parser.add_argument("--work-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    preset = args.preset or ("quick" if args.overhead else "tiny")

    def config_for(work: Path) -> Config:
        overrides = [*args.overrides, f"work_dir={work}"]
        return Config.load(preset, args.config, overrides)

    if args.overhead:
        report = _overhead(config_for)
    elif args.work_dir:
        report = _timed_runs(config_for(Path(args.work_dir)))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = _timed_runs(config_for(Path(tmp)))
    report.update(preset=preset, machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count())  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
