"""Pipeline steps. Each step module holds its logic as plain functions and a `*_step`
function that adds MLflow tracking; `kfp_components.py` wraps each `*_step` as a kfp component."""

import atexit
import gc
import os

# The image every component runs in on a cluster. kfp.local's SubprocessRunner
# ignores it and runs the steps in the current environment.
COMPONENT_IMAGE = "ghcr.io/parti-ops/parti-ops:0.1.0"

# The config sections each cached step receives: those its module and the model code it
# calls read, and `tracking` where it logs to MLflow (`name` and `work_dir` always come).
# The pipeline's `config` step hands each step these alone (`Config.sections_json`), so a
# step's cache key, on Kubeflow Pipelines as in kfp.local, changes only when they do: a
# new `serve.instances` re-runs the export, not the training. Reading another section is
# an error (`WithheldSection`), never a silent default. Steps not listed get the whole
# config and are never cached.
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("data", "tracking"),
    "validate": ("data", "tracking"),
    "text_tokenizer": ("data", "text_tokenizer", "tracking"),
    "image_tokenizer": ("data", "image_tokenizer", "tracking"),
    "encode": ("data", "text_tokenizer", "image_tokenizer", "tracking"),
    "train": ("data", "text_tokenizer", "image_tokenizer", "parti", "train", "sample", "tracking"),
    "scorer": ("data", "text_tokenizer", "scorer", "tracking"),
    "fid_reference": ("data", "scorer", "evaluate"),
    "evaluate": (
        "data",
        "text_tokenizer",
        "image_tokenizer",
        "parti",
        "train",
        "sample",
        "scorer",
        "evaluate",
        "tracking",
    ),  # fmt: skip
    "export": ("sample", "export", "serve", "registry", "tracking"),
}

if os.environ.get("_KFP_RUNTIME"):
    # A kfp step is a process of its own that ends with the step. With torch, mlflow and
    # SQLAlchemy loaded, the interpreter's last garbage collection at exit took 0.6-1.7 s
    # per step, to free memory the OS takes back anyway. Freezing every object at exit
    # skips it. As with os._exit, objects still alive are then not finalised: steps write
    # their files in `with` blocks, and logging and stdio are flushed explicitly at exit
    # (logging's own atexit handler runs after this one).
    atexit.register(gc.freeze)
