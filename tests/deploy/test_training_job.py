"""The train step on several machines: it submits a PyTorchJob and collects its bundle.

No cluster here, so the Kubernetes API (ConfigMaps, PyTorchJobs) is served on loopback by
a stand-in, and the Training Operator's part is played by starting each replica's
container command as a process, with the pod's environment from the submitted manifest
plus the PET_* variables the operator sets. The job really trains: two "nodes" of one
torchrun process each, rendezvousing over loopback with gloo.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from kubernetes import client

from parti_ops.components.train_job import train_job_step
from parti_ops.deploy.training_job import TrainJobError, job_name
from parti_ops.model.config import Config
from tests.conftest import SMALL

NAMESPACE = "team-a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandInCluster:
    """ConfigMaps and PyTorchJobs over HTTP, and an operator that runs the replicas here.

    `outcome`: "run" starts the replicas; "fail" marks every job Failed at once; "hang"
    leaves it Created.
    """

    def __init__(self, shared: Path, outcome: str = "run"):
        self.shared, self.outcome = shared, outcome
        self.objects: dict[str, dict] = {}
        self.launched: list[str] = []
        self.logs: list[str] = []
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = f"{self.path}/{body['metadata']['name']}"
                if key in cluster.objects:
                    return self._reply(409, {"kind": "Status", "reason": "AlreadyExists"})
                cluster.objects[key] = body
                if body["kind"] == "PyTorchJob":
                    cluster.start(body)
                self._reply(201, body)

            def do_GET(self):
                if self.path not in cluster.objects:
                    return self._reply(404, {"kind": "Status", "reason": "NotFound"})
                self._reply(200, cluster.objects[self.path])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        configuration = client.Configuration(host=f"http://127.0.0.1:{self.server.server_port}")
        self.api = client.ApiClient(configuration)

    def _conditions(self, job: dict, *types: str) -> None:
        job["status"] = {"conditions": [{"type": t, "status": "True"} for t in types]}

    def start(self, job: dict) -> None:
        if self.outcome == "fail":
            self._conditions(job, "Created", "Failed")
            job["status"]["conditions"][-1].update(reason="BackoffLimitExceeded", message="boom")
            return
        self._conditions(job, "Created")
        if self.outcome == "run":
            threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def _run(self, job: dict) -> None:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        launcher = self.objects[f"/api/v1/namespaces/{ns}/configmaps/{name}-launcher"]
        script = self.shared / f"{name}-launch.py"
        script.write_text(launcher["data"]["launch.py"])
        specs = job["spec"]["pytorchReplicaSpecs"]
        replicas = [("Master", specs["Master"])] + [("Worker", specs["Worker"])] * specs.get(
            "Worker", {}
        ).get("replicas", 0)
        port = _free_port()
        processes = []
        for rank, (_, spec) in enumerate(replicas):
            (container,) = spec["template"]["spec"]["containers"]
            env = {**os.environ, "JOB_NAME": name}
            for entry in container["env"]:
                if "value" in entry:
                    env[entry["name"]] = entry["value"].replace("/shared", str(self.shared), 1)
            env.update(
                PET_NNODES=str(len(replicas)), PET_NODE_RANK=str(rank),
                PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port),
                PET_NPROC_PER_NODE=job["spec"]["nprocPerNode"],
            )  # fmt: skip
            assert container["command"] == ["python", "/etc/parti/launch.py"]
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(script)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            self.launched.append(f"{name}/{rank}")
        self._conditions(job, "Created", "Running")
        codes = []
        for process in processes:
            out, _ = process.communicate(timeout=600)
            self.logs.append(out)
            codes.append(process.returncode)
        self._conditions(job, "Created", "Succeeded" if codes == [0] * len(codes) else "Failed")

    def close(self):
        self.server.shutdown()


@pytest.fixture
def cluster(tmp_path, request):
    shared = tmp_path / "shared"
    shared.mkdir()
    stand_in = StandInCluster(shared, getattr(request, "param", "run"))
    yield stand_in
    stand_in.close()


def _config(tmp_path: Path, **overrides) -> Config:
    return Config.load(
        "tiny",
        overrides={
            **SMALL,
            "work_dir": str(tmp_path / "work"),
            "train.nodes": 2,
            "train.job_namespace": NAMESPACE,
            **overrides,
        },
    )


def _step(config: Config, inputs: dict, out: Path, cluster: StandInCluster) -> dict:
    return train_job_step(
        config, "", str(inputs["encoded"]), str(inputs["text"]), str(inputs["image"]),
        str(out), shared=cluster.shared, api=cluster.api, poll_s=0.2,
    )  # fmt: skip


def test_two_nodes_train_as_one_process_does_and_a_retry_follows_the_same_job(
    tmp_path, inputs, train_bundle, cluster
):
    one = train_bundle(tmp_path / "one")
    try:
        report = _step(_config(tmp_path), inputs, tmp_path / "model", cluster)
    except TrainJobError:
        pytest.fail("the job failed; its pods' output:\n" + "\n".join(cluster.logs))

    assert len(cluster.launched) == 2, cluster.logs  # a master and one worker pod
    losses = [h["loss"] for h in report["history"]]
    np.testing.assert_allclose(losses, [h["loss"] for h in one["history"]], rtol=1e-4)
    model = tmp_path / "model"
    assert (model / "parti" / "model.safetensors").is_file()
    assert not (model / "checkpoints").exists()  # they stay on the shared volume
    run = cluster.shared / "runs" / report["job"]
    assert sorted(p.name for p in (run / "inputs").iterdir()) == [
        "encoded", "image_tokenizer", "text_tokenizer",
    ]  # fmt: skip
    assert Config.load("tiny", run / "config.json") == _config(tmp_path)

    again = _step(_config(tmp_path), inputs, tmp_path / "retry", cluster)
    assert again["job"] == report["job"] and len(cluster.launched) == 2  # not trained again
    assert again["history"] == report["history"]


@pytest.mark.parametrize("cluster", ["fail"], indirect=True)
def test_a_failed_job_fails_the_step_with_its_reason(tmp_path, inputs, cluster):
    with pytest.raises(TrainJobError, match=r"failed: BackoffLimitExceeded: boom.*kubectl"):
        _step(_config(tmp_path), inputs, tmp_path / "model", cluster)


@pytest.mark.parametrize("cluster", ["hang"], indirect=True)
def test_a_job_that_does_not_finish_in_time_fails_the_step(tmp_path, inputs, cluster):
    config = _config(tmp_path, **{"train.job_timeout_s": 1})
    with pytest.raises(TrainJobError, match="did not finish in train.job_timeout_s=1"):
        _step(config, inputs, tmp_path / "model", cluster)


def test_the_job_name_follows_the_config_and_the_inputs():
    config = Config.load("tiny")
    digests = {"data": "a", "text_tokenizer": "b", "image_tokenizer": "c"}
    name = job_name(config, digests)
    assert name == job_name(config, dict(digests)) and name.startswith("parti-train-")
    assert name != job_name(config, {**digests, "data": "changed"})
    other = Config.load("tiny", overrides={"train.steps": 7})
    assert name != job_name(other, digests)
    assert len(name) <= 63  # a DNS label, as pod names derived from it must be
