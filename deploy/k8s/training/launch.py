"""The command of every PyTorchJob pod: one node's share of a multi-node training run.

It runs the entry point that the pipeline's train step runs under torchrun on one machine,
with one torchrun per pod (parti_ops.deploy.training_job.pod_main says how). Shipped to the
pods as a ConfigMap (kustomization.yaml beside this file), run by the image's Python.
"""

import os
import sys

from parti_ops.deploy.training_job import pod_main

if __name__ == "__main__":
    sys.exit(pod_main(os.environ))
