"""The real tritonserver on loopback: HTTP and gRPC, bad requests, load, queue, versions."""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from parti_ops.deploy.client import ClientError, generate
from parti_ops.deploy.runtime import OnnxTextToImage
from parti_ops.deploy.server import TritonServer
from parti_ops.deploy.triton import (
    add_version,
    served_version,
    set_served_version,
    update_served_version,
)
from parti_ops.model.scenes import Scene, compare, read_scene

PROMPT = "a large red circle in the center, on a white background"


def _http(server) -> http.InferenceServerClient:
    return http.InferenceServerClient(server.http_url.removeprefix("http://"))


def test_http_and_grpc_serve_what_the_model_samples(server, exported, deploy_config):
    images, tokens = generate(server.http_url, [PROMPT, "a small blue star on the left"], seed=11)
    again, tokens_grpc = generate(
        server.grpc_url, [PROMPT, "a small blue star on the left"], seed=11
    )
    runtime = OnnxTextToImage.load(exported["dir"])
    # A request that names no setting is sampled with the served version's defaults: the
    # config's `sample` section, written into the repository at export.
    s = deploy_config.sample
    local, codes = runtime(
        [PROMPT, "a small blue star on the left"], seeds=[11, 12],
        guidance_scale=s.guidance_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
    )  # fmt: skip
    assert images.shape == (2, *runtime.image_shape) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(tokens, tokens_grpc)
    assert np.array_equal(images, local)
    assert np.array_equal(tokens, codes.reshape(2, -1))
    # The attribute oracle reads a whole scene back from the served image.
    scene = read_scene(images[0])
    assert isinstance(scene, Scene)
    assert set(compare(scene, read_scene(local[0]))) >= {"background", "shape", "exact"}
    assert compare(scene, read_scene(local[0]))["exact"]


def test_served_images_show_what_their_prompts_ask_for(faithful, deploy_config, tmp_path):
    """The whole loop on the server conditions each image on its own prompt."""
    repo = tmp_path / "repository"
    add_version(repo, faithful["dir"], 1, deploy_config.serve, sample=deploy_config.sample)
    set_served_version(repo, deploy_config.serve, 1)
    prompts = list(faithful["scenes"])
    with TritonServer(repo, deploy_config.serve) as server:
        # Greedy: the most likely image, so the check does not hang on one sampled code.
        batched, _ = generate(server.http_url, prompts, top_k=1)  # one request, four prompts
        with ThreadPoolExecutor(len(prompts)) as pool:  # four requests at once
            alone = list(pool.map(lambda p: generate(server.grpc_url, [p], top_k=1)[0][0], prompts))
    for prompt, http_image, grpc_image in zip(prompts, batched, alone, strict=True):
        for image in (http_image, grpc_image):
            read = read_scene(image)
            assert read == faithful["scenes"][prompt], f"{prompt!r}: the image shows {read}"


def _raw(server, inputs: list[tuple[str, np.ndarray, str]], protocol=http):
    url = server.http_url if protocol is http else server.grpc_url
    client = protocol.InferenceServerClient(url.split("://")[1])
    tensors = []
    for name, array, dtype in inputs:
        tensor = protocol.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return client.infer("parti", tensors)


def _prompt(*texts: bytes) -> tuple[str, np.ndarray, str]:
    return ("prompt", np.array([[t] for t in texts], dtype=object).reshape(len(texts), 1), "BYTES")


def _one(name: str, value, dtype: str, numpy_type) -> tuple[str, np.ndarray, str]:
    return (name, np.array([[value]], dtype=numpy_type), dtype)


BAD_REQUESTS = {
    "missing prompt": ([_one("seed", 1, "INT64", np.int64)], "missing input 'prompt'"),
    "wrong dtype": ([("prompt", np.array([[1.0]], dtype=np.float32), "FP32")], "expects 'BYTES'"),
    "wrong shape": ([("prompt", np.array([[b"a", b"b"]], dtype=object), "BYTES")], "shape"),
    "empty batch": ([("prompt", np.zeros((0, 1), dtype=object), "BYTES")], "got 0"),
    "not utf-8": ([_prompt(b"a red \xff\xfe circle")], "not UTF-8 text"),
    "1 MB prompt": ([_prompt(b"a" * (1 << 20))], "1048576 bytes, more than 4096"),
    "nan guidance": (
        [_prompt(b"a red circle"), _one("guidance_scale", np.nan, "FP32", np.float32)],
        "guidance_scale=nan",
    ),
    "negative guidance": (
        [_prompt(b"a red circle"), _one("guidance_scale", -2.0, "FP32", np.float32)],
        "guidance_scale=-2.0",
    ),
    "top_k < 0": ([_prompt(b"a red circle"), _one("top_k", -3, "INT32", np.int32)], "top_k=-3"),
    "top_p > 1": ([_prompt(b"a red circle"), _one("top_p", 1.5, "FP32", np.float32)], "top_p=1.5"),
    "seed out of range": (
        [_prompt(b"a red circle"), _one("seed", -5, "INT64", np.int64)],
        "seed=-5",
    ),
    "settings for another batch": (
        [_prompt(b"a", b"b"), ("seed", np.array([[1], [2], [3]], dtype=np.int64), "INT64")],
        "batch size does not match",
    ),
}


@pytest.mark.parametrize("protocol", [http, grpc], ids=["http", "grpc"])
def test_bad_requests_get_clear_errors_and_the_server_stays_up(server, protocol):
    wrong = {}
    for case, (inputs, message) in BAD_REQUESTS.items():
        try:
            _raw(server, inputs, protocol)
            wrong[case] = "served"
        except InferenceServerException as err:
            if message not in err.message():
                wrong[case] = err.message()
    assert not wrong, "\n".join(f"{case}: {message}" for case, message in wrong.items())
    client = _http(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("parti")
    images, _ = generate(server.http_url, [PROMPT], seed=1)
    assert images.shape[0] == 1


def test_one_bad_request_does_not_fail_the_good_ones_batched_with_it(server):
    def call(prompt: bytes):
        try:
            return _raw(server, [_prompt(prompt)]).as_numpy("image").shape
        except InferenceServerException as err:
            return err.message()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, [b"a red circle", b"\xff", b"a blue star", b"\xfe"] * 2))
    assert results[0::2] == [(1, 32, 32, 3)] * 4
    assert all("not UTF-8" in r for r in results[1::2])


def test_sixteen_concurrent_clients_for_a_bounded_time_see_no_errors(server):
    deadline = time.monotonic() + 20

    def client(i: int) -> tuple[int, list[str]]:
        done, errors = 0, []
        url = server.http_url if i % 2 else server.grpc_url
        while time.monotonic() < deadline or done == 0:
            try:
                images, _ = generate(url, [f"a small red square at the top {i}"], seed=i + done)
                done += images.shape[0]
            except ClientError as err:
                errors.append(str(err))
        return done, errors

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    assert [errors for _, errors in results] == [[]] * 16
    assert all(done >= 1 for done, _ in results)
    assert _http(server).is_server_ready()


def test_a_full_queue_rejects_at_once_instead_of_hanging(server, exported, deploy_config):
    import dataclasses

    from parti_ops.deploy.triton import set_served_version

    serve = dataclasses.replace(
        deploy_config.serve, model_name="parti_q", max_batch_size=1, max_queue_size=1,
        queue_delay_us=0,
    )  # fmt: skip
    add_version(server.repository, exported["dir"], 1, serve)
    set_served_version(server.repository, serve, 1)
    client = _http(server)
    client.load_model("parti_q")

    def call(i: int) -> str:
        tensor = http.InferInput("prompt", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b"a red circle"]], dtype=object))
        try:
            http.InferenceServerClient(server.http_url[7:], network_timeout=120).infer(
                "parti_q", [tensor]
            )
            return "ok"
        except InferenceServerException as err:
            return err.message()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    rejected = [r for r in results if r != "ok"]
    assert rejected and all("queue" in r.lower() for r in rejected), results
    assert "ok" in results
    client.unload_model("parti_q")
    assert client.is_server_ready()


def test_a_new_version_that_fails_to_load_leaves_the_old_one_serving(
    server, exported, deploy_config
):
    serve, repo = deploy_config.serve, server.repository
    broken = add_version(repo, exported["dir"], 2, serve)
    (broken / "decoder_step.onnx").write_bytes(b"not an onnx file")
    served, error = update_served_version(server.http_url, repo, serve, 2)
    assert served == 1 and "version 2 did not load" in error
    assert served_version(repo, serve) == 1
    result = _raw(server, [_prompt(PROMPT.encode())])
    assert result.get_response()["model_version"] == "1"

    add_version(repo, exported["dir"], 3, serve)
    served, error = update_served_version(server.http_url, repo, serve, 3)
    assert (served, error) == (3, None)
    result = _raw(server, [_prompt(PROMPT.encode())])
    assert result.get_response()["model_version"] == "3"
    client = _http(server)
    assert client.is_server_ready() and client.is_model_ready("parti")


def test_parti_serve_prints_urls_and_stops_cleanly_on_sigterm(repository, tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "parti_ops.pipelines.cli", "serve", "--repository",
               str(repository), "--set", "data.image_size=32"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               text=True)  # fmt: skip
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.strip().startswith("grpc"):
                break
        url = next(line.split()[-1] for line in lines if line.strip().startswith("http"))
        images, _ = generate(url, [PROMPT], seed=0)
        assert images.shape == (1, 32, 32, 3)
        out = tmp_path / "img.png"
        cli = subprocess.run(
            [sys.executable, "-m", "parti_ops.pipelines.cli", "client", "generate", "--url", url,
             "--prompt", PROMPT, "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert out.stat().st_size > 0
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, "".join(lines) + rest
    assert "tritonserver stopped" in rest


def _failures(server, reason: str) -> float:
    """Triton's count of the parti model's failed requests for `reason`, from /metrics."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nv_inference_request_failure{")
        and 'model="parti"' in line
        and f'reason="{reason}"' in line
    )


def test_a_request_its_client_cancels_is_dropped_by_the_server_which_keeps_serving(server):
    """Cancelled over gRPC behind a queue of other work, the request ends CANCELLED on the
    server (Triton counts it), and later requests are served. (A request already in the
    model's decode loop stops at its next poll: tests/deploy/test_triton_model.py. Here
    a request takes about 40 ms, too short to cancel in flight reliably.)"""
    before = _failures(server, "CANCELED")
    client = grpc.InferenceServerClient(server.grpc_url.split("://")[1])
    tensor = grpc.InferInput("prompt", [8, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[PROMPT.encode()]] * 8, dtype=object))
    done = threading.Semaphore(0)
    outcomes = []

    def callback(result, error):
        outcomes.append((result, error))
        done.release()

    busy = [client.async_infer("parti", [tensor], callback) for _ in range(24)]  # ~1 s
    call = client.async_infer("parti", [tensor], lambda result, error: outcomes.append(
        ("cancelled one", result, error)) or done.release())  # fmt: skip
    time.sleep(0.1)  # sent and queued on the server, not cancelled before it left the client
    call.cancel()
    for _ in range(len(busy) + 1):
        assert done.acquire(timeout=60)
    (mine,) = [o for o in outcomes if o[0] == "cancelled one"]
    assert mine[1] is None and "cancel" in str(mine[2]).lower()
    others = [o for o in outcomes if o[0] != "cancelled one"]
    assert all(error is None for _, error in others)  # the queue around it was served
    deadline = time.monotonic() + 30
    while _failures(server, "CANCELED") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _failures(server, "CANCELED") == before + 1  # dropped on the server, not only here
    images, _ = generate(server.grpc_url, [PROMPT], seed=3)
    assert images.shape[0] == 1
