"""Multi-node training as a Kubeflow Training Operator PyTorchJob.

When `train.nodes` > 1 the pipeline's train step does not train: it stages its inputs on
the shared volume, submits the job built here and waits for it. The job is the manifest
people apply by hand (`k8s/training/pytorchjob.yaml`, with `launch.py` as its command),
filled in for one run:

- its name is a digest of the config and of the encoded data and tokenizers, so that a
  retried step finds the job its first attempt submitted (and, once it succeeded, its
  bundle) instead of starting another;
- every pod reads the run's folder `/shared/runs/<name>`: `config.json`, `inputs/`, and
  `parti/`, the bundle with its checkpoints, from which restarted pods resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from parti_ops.model.config import Config
from parti_ops.model.errors import PartiError
from parti_ops.model.layout import CHECKPOINTS, TRAIN_ENTRY

log = logging.getLogger(__name__)

TRAINING = Path(__file__).parent / "k8s" / "training"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
SHARED = "/shared"  # where the job's pods and the submitting step mount train.job_volume
GPU = "nvidia.com/gpu"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class TrainJobError(PartiError, RuntimeError):
    """The job could not be submitted, failed, or did not finish in time."""


def job_name(config: Config, digests: Mapping[str, str]) -> str:
    """`parti-train-<12 hex>`: the same config and inputs give the same job."""
    text = json.dumps({"config": config.to_dict(), **digests}, sort_keys=True)
    return f"parti-train-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def run_folder(shared: str | Path, name: str) -> Path:
    return Path(shared) / "runs" / name


def job_objects(config: Config, name: str, namespace: str, parent_run_id: str = "") -> list[dict]:
    """The launcher's ConfigMap and the PyTorchJob of one run, in the order to create them."""
    train = config.train
    run = run_folder(SHARED, name)
    launcher = f"{name}-launcher"
    job = yaml.safe_load((TRAINING / "pytorchjob.yaml").read_text(encoding="utf-8"))
    job["metadata"].update(name=name, namespace=namespace)
    job["spec"]["nprocPerNode"] = str(train.nproc)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    if train.nodes == 1:
        del replicas["Worker"]
    else:
        replicas["Worker"]["replicas"] = train.nodes - 1
    env = {
        "PARTI_CONFIG": f"{run}/config.json",
        "PARTI_ENCODED": f"{run}/inputs/encoded",
        "PARTI_TEXT_TOKENIZER": f"{run}/inputs/text_tokenizer",
        "PARTI_IMAGE_TOKENIZER": f"{run}/inputs/image_tokenizer",
        "PARTI_OUT": f"{run}/parti",
        "PARTI_PARENT_RUN_ID": parent_run_id,
        # The pods log where the step does: on a cluster, the tracking server.
        "MLFLOW_TRACKING_URI": config.mlflow_tracking_uri(),
    }
    if env["MLFLOW_TRACKING_URI"].startswith("sqlite:"):
        log.warning(
            "the training pods will log to %s, a file they can only reach if it is on a "
            "volume they mount; on a cluster set MLFLOW_TRACKING_URI to the tracking server",
            env["MLFLOW_TRACKING_URI"],
        )
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        container["image"] = train.job_image
        kept = [e for e in container["env"] if e["name"] not in {"PARTI_PRESET", "PARTI_SET", *env}]
        container["env"] = kept + [{"name": k, "value": v} for k, v in env.items()]
        for section in container["resources"].values():
            if train.accelerator:
                section[GPU] = train.nproc
            else:
                section.pop(GPU, None)
        if not train.accelerator:
            pod.pop("tolerations", None)
        for volume in pod["volumes"]:
            if "configMap" in volume:
                volume["configMap"]["name"] = launcher
            if "persistentVolumeClaim" in volume:
                volume["persistentVolumeClaim"]["claimName"] = train.job_volume
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": launcher, "namespace": namespace, "labels": job["metadata"]["labels"]},
        "data": {"launch.py": (TRAINING / "launch.py").read_text(encoding="utf-8")},
    }
    return [config_map, job]


def own_namespace() -> str:
    """The namespace of the pod this runs in (its service account's)."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip()
    except OSError:
        raise TrainJobError(
            f"not in a Kubernetes pod ({SERVICE_ACCOUNT_NAMESPACE} is missing): set "
            "train.job_namespace to the namespace to train in"
        ) from None


def api_client():
    """A Kubernetes API client: in-cluster credentials in a pod, else ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def submit(api, objects: list[dict]) -> None:
    """Create the objects; one that exists already (a retried step) is kept and followed."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    for obj in objects:
        meta = obj["metadata"]
        try:
            if obj["kind"] == "ConfigMap":
                client.CoreV1Api(api).create_namespaced_config_map(meta["namespace"], obj)
            else:
                client.CustomObjectsApi(api).create_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], PLURAL, obj
                )
        except ApiException as err:
            if err.status != 409:
                raise TrainJobError(
                    f"cannot create {obj['kind']} {meta['namespace']}/{meta['name']}: "
                    f"{err.status} {err.reason}: {err.body}"
                ) from None
            log.info("%s %s exists already: following it", obj["kind"], meta["name"])
        else:
            log.info("created %s %s/%s", obj["kind"], meta["namespace"], meta["name"])


def wait(
    api,
    namespace: str,
    name: str,
    *,
    timeout_s: float,
    poll_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the job until its `Succeeded` condition; its `Failed` one raises with the reason."""
    from kubernetes import client

    api = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout_s
    seen = None
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        conditions = {
            c["type"]: c
            for c in job.get("status", {}).get("conditions", [])
            if c["status"] == "True"
        }
        if "Succeeded" in conditions:
            return job
        if "Failed" in conditions:
            failed = conditions["Failed"]
            raise TrainJobError(
                f"PyTorchJob {namespace}/{name} failed: {failed.get('reason', '')}: "
                f"{failed.get('message', '')} (kubectl -n {namespace} logs -l "
                f"training.kubeflow.org/job-name={name})"
            )
        state = sorted(conditions)
        if state != seen:
            log.info("PyTorchJob %s: %s", name, ", ".join(state) or "pending")
            seen = state
        if time.monotonic() > deadline:
            raise TrainJobError(
                f"PyTorchJob {namespace}/{name} did not finish in train.job_timeout_s="
                f"{timeout_s:.0f} s (conditions: {', '.join(state) or 'none'}); it keeps "
                "running: a retry of the step follows it"
            )
        sleep(poll_s)


# What runs in each pod: `k8s/training/launch.py` calls `pod_main`.


def launch_arguments(env: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of the train entry point (`TRAIN_ENTRY`), from a pod's env.

    The resolved config (PARTI_PRESET, PARTI_CONFIG, PARTI_SET) and the folders
    (PARTI_ENCODED, PARTI_TEXT_TOKENIZER, PARTI_IMAGE_TOKENIZER, PARTI_OUT), with `resume`
    set when PARTI_OUT already holds checkpoints, so that a restarted pod continues.
    """
    from parti_ops.model.checkpoint import list_checkpoints

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


def pod_main(env: Mapping[str, str]) -> int:
    """One node's share of the run: torchrun over the train entry point, as the step runs it.

    torchrun takes the node count, this node's rank, the master's address and the processes
    per node from the PET_* variables that the Training Operator sets on every replica. The
    exit code is 143 when the processes stopped to checkpoint, so that the job's ExitCode
    restart policy recreates the pods, which resume; otherwise torchrun's own (1: permanent).
    """
    from parti_ops.deploy.torchrun import launch

    arguments = launch_arguments(env)
    out = Path(arguments["out_dir"])
    node = env.get("PET_NODE_RANK", "0")
    state = "resuming from checkpoints" if arguments["resume"] else "starting"
    print(f"node {node}: {state} in {out}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="parti-launch-"))  # per pod: never shared
    # The marker's writer, global rank 0, runs on node 0: only that node clears it.
    return launch(TRAIN_ENTRY, arguments, folder / "launch.json", out, clear_marker=node == "0")
