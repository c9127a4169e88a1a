"""Orchestration benchmark: the pipeline through kfp.local vs its step functions in one process.

    python bench/pipeline.py [--preset quick]

Prints one JSON object from one run. Both ways run the same steps on the same config,
each into its own work folder (own MLflow store and registry): (a) `run_local`, kfp.local's
SubprocessRunner, every step a fresh Python process with artifacts passed through kfp;
(b) the same `*_step` functions called in order in this process. The difference divided
by the number of steps is the orchestration overhead per step (goal: <= 3 s). The default
preset, `quick`, does a few iterations per step, so that orchestration is what is
measured; `--preset tiny` runs the real thing.
"""

import argparse
import json
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
    from parti_ops.components.registry import register_step
    from parti_ops.components.scorer import scorer_step
    from parti_ops.components.serve import smoke_test_step
    from parti_ops.components.synth import synth_step
    from parti_ops.components.tokenizers import image_tokenizer_step, text_tokenizer_step
    from parti_ops.components.tracking import end_pipeline_run, start_pipeline_run
    from parti_ops.components.train import train_step
    from parti_ops.components.validate import validate_step

    cfg = config.to_json()
    run_id = str(uuid.uuid4())
    parent = start_pipeline_run(config, run_name="direct", pipeline_run_id=run_id)
    synth_step(cfg, parent, str(root / "raw"))
    ingest_step(cfg, parent, str(root / "raw"), str(root / "canonical"))
    validate_step(cfg, parent, str(root / "canonical"), str(root / "validated"))
    accepted = root / "validated" / "accepted"
    text_tokenizer_step(cfg, parent, str(accepted), str(root / "text"))
    image_tokenizer_step(cfg, parent, str(accepted), str(root / "image"))
    encode_step(cfg, parent, str(accepted), str(root / "text"), str(root / "image"),
                str(root / "encoded"))  # fmt: skip
    train_step(cfg, parent, str(root / "encoded"), str(root / "text"), str(root / "image"),
               str(root / "model"))  # fmt: skip
    scorer_step(cfg, parent, str(accepted), str(root / "text"), str(root / "scorer"))
    features = FeatureModel.load(root / "scorer")
    fid_references(accepted, features, root / "references", config.evaluate.fid_images)
    evaluate_step(cfg, parent, str(root / "model"), str(accepted), str(root / "scorer"),
                  str(root / "references"), str(root / "evaluation"))  # fmt: skip

    def reevaluate(bundle: Path) -> dict:
        return evaluate_bundle(
            config, bundle, accepted, root / "scorer", root / "champion", root / "references"
        )

    register_step(cfg, parent, str(root / "model"), str(root / "evaluation"),
                  str(root / "encoded"), str(root / "decision"), reevaluate=reevaluate)  # fmt: skip
    export_step(cfg, parent, str(root / "repository"))
    smoke_test_step(cfg, parent, str(root / "repository"), str(accepted), str(root / "smoke"))
    end_pipeline_run(config, run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quick", help="quick: a few iterations per step")
    args = parser.parse_args()

    from parti_ops.pipelines.parti import run_local

    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for way in ("direct", "kfp_local"):
            work = Path(tmp) / way
            config = Config.load(args.preset, overrides={"work_dir": str(work)})
            started = time.perf_counter()
            if way == "direct":
                direct(config, work / "steps")
            else:
                run_local(config)
            timings[way] = time.perf_counter() - started
    overhead = timings["kfp_local"] - timings["direct"]
    print(
        json.dumps(
            {
                "kfp_local_s": timings["kfp_local"],
                "direct_s": timings["direct"],
                "steps": len(STEPS),
                "overhead_per_step_s": overhead / len(STEPS),
                "goal_overhead_per_step_s": 3.0,
                "preset": args.preset,
                "machine": platform.processor() or platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
