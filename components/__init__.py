"""Pipeline steps. Each step module holds its logic as plain functions and a `*_step`
function that adds MLflow tracking; `ops.py` wraps each `*_step` as a kfp component."""

# The image every component runs in on a cluster. kfp.local's SubprocessRunner
# ignores it and runs the steps in the current environment.
COMPONENT_IMAGE = "ghcr.io/parti-ops/parti-ops:0.1.0"
