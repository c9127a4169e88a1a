"""Pipeline steps. Each step module holds its logic as plain functions and a `*_step`
function that adds MLflow tracking; `kfp_components.py` wraps each `*_step` as a kfp component."""

import atexit
import gc
import os

# The image every component runs in on a cluster. kfp.local's SubprocessRunner
# ignores it and runs the steps in the current environment.
COMPONENT_IMAGE = "ghcr.io/parti-ops/parti-ops:0.1.0"

if os.environ.get("_KFP_RUNTIME"):
    # A kfp step is a process of its own that ends with the step. With torch, mlflow and
    # SQLAlchemy loaded, the interpreter's last garbage collection at exit took 0.6-1.7 s
    # per step, to free memory the OS takes back anyway. Freezing every object at exit
    # skips it. As with os._exit, objects still alive are then not finalised: steps write
    # their files in `with` blocks, and logging and stdio are flushed explicitly at exit
    # (logging's own atexit handler runs after this one).
    atexit.register(gc.freeze)
