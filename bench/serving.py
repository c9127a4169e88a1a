"""Serving benchmark: PyTorch eager vs ONNX Runtime in process vs the Triton endpoint.

    python bench/serving.py --model BUNDLE [--requests 24] [--seconds 30] [--set serve.x=y]

Prints one JSON object from one run: the same bundle, prompts, seeds and sampling settings
(guidance 3, temperature 1) everywhere. Rates are images/s, one prompt per request:
(a) `TextToImage` in process (PyTorch eager with the KV cache), one prompt at a time;
(b) `OnnxTextToImage` in process, the graphs the server runs, one prompt at a time;
(c) the real tritonserver (`parti serve`'s), HTTP, with 1 and 8 concurrent clients, with
p50/p99 latency per request. Also the time of one guided decoder step, ONNX Runtime vs
PyTorch eager, at 1 prompt. Ratios compare measurements of this run only.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from parti_ops.deploy.client import generate
from parti_ops.deploy.onnx import export_onnx
from parti_ops.deploy.runtime import OnnxTextToImage
from parti_ops.deploy.server import TritonServer
from parti_ops.deploy.triton import add_version, set_served_version
from parti_ops.model.config import Config, SampleConfig
from parti_ops.model.generate import TextToImage
from parti_ops.model.sampling import decode_step, prefill
from parti_ops.model.scenes import prompt_suite


def sequential(call, prompts: list[str]) -> dict:
    call(prompts[0], 0)  # warm-up
    latencies = []
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        t = time.perf_counter()
        call(prompt, i)
        latencies.append(time.perf_counter() - t)
    return summary(len(prompts), time.perf_counter() - started, latencies)


def concurrent(url: str, prompts: list[str], clients: int, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    def client(c: int) -> int:
        done = 0
        while time.monotonic() < deadline:
            t = time.perf_counter()
            generate(url, [prompts[(c + done * clients) % len(prompts)]], seed=c * 1000 + done)
            latencies.append(time.perf_counter() - t)
            done += 1
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        images = sum(pool.map(client, range(clients)))
    return summary(images, time.perf_counter() - started, latencies)


def summary(images: int, seconds: float, latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "images": images,
        "images_per_s": images / seconds,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def step_times(model: TextToImage, runtime: OnnxTextToImage, steps: int = 200) -> dict:
    """Seconds per guided decoder step at one prompt, past growing from 1, each engine."""
    prompt = ["a large red circle in the center, on a white background"]
    ids, mask, null = model.encode_prompts(prompt)
    with torch.inference_mode():
        _, cache = prefill(model.parti, ids, mask, guided=True, null=null)
        token = torch.zeros(2, dtype=torch.long)
        started = time.perf_counter()
        for _ in range(steps):
            _, cache = decode_step(model.parti, token, cache)
        torch_s = (time.perf_counter() - started) / steps
    ids, mask, null = runtime.encode_prompts(prompt)
    both = (np.concatenate([ids, ids]), np.concatenate([mask, mask]), np.array([False, True]))
    _, key, value, cross_k, cross_v, cross_mask = runtime._prefill(*both)
    past, cross, token = [key, value], [cross_k, cross_v, cross_mask], np.zeros(2, np.int64)
    started = time.perf_counter()
    for _ in range(steps):
        _, past = runtime._step(token, past, cross)
    ort_s = (time.perf_counter() - started) / steps
    return {"torch_eager_s": torch_s, "onnxruntime_s": ort_s, "ort_vs_torch": torch_s / ort_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a bundle from `parti train`")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=24, help="per in-process engine")
    parser.add_argument("--seconds", type=float, default=30, help="per Triton client count")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. "
                        "serve.queue_delay_us=1000")  # fmt: skip
    args = parser.parse_args()

    config = Config.load(args.preset, overrides=args.set)
    torch.set_num_threads(torch.get_num_threads())
    prompts = [p for p, _ in prompt_suite(args.requests, seed=2)]
    settings = SampleConfig(guidance_scale=3.0, temperature=1.0)
    model = TextToImage.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir, repo = Path(tmp) / "onnx", Path(tmp) / "repository"
        parity = export_onnx(args.model, onnx_dir, config.export)
        runtime = OnnxTextToImage.load(onnx_dir, threads=config.serve.threads)
        add_version(repo, onnx_dir, 1, config.serve)
        set_served_version(repo, config.serve, 1)
        result = {
            "torch_eager": sequential(lambda p, i: model([p], settings, seeds=[i]), prompts),
            "onnxruntime": sequential(lambda p, i: runtime([p], seeds=[i]), prompts),
            "decode_step": step_times(model, runtime),
        }
        with TritonServer(repo, config.serve) as server:
            generate(server.http_url, prompts[:1])  # warm-up
            for clients in (1, 8):
                result[f"triton_{clients}_clients"] = concurrent(
                    server.http_url, prompts, clients, args.seconds
                )
    a, b = result["torch_eager"]["images_per_s"], result["onnxruntime"]["images_per_s"]
    result["ratios"] = {
        "triton_8_clients_vs_torch_eager": result["triton_8_clients"]["images_per_s"] / a,
        "ort_decode_step_vs_torch_eager": result["decode_step"]["ort_vs_torch"],
        "server_overhead_1_client_vs_ort": 1 - result["triton_1_clients"]["images_per_s"] / b,
    }
    result["goals"] = {
        "triton_8_clients_vs_torch_eager": ">= 3",
        "ort_decode_step_vs_torch_eager": ">= 1.8",
        "server_overhead_1_client_vs_ort": "<= 0.10",
    }
    result["setup"] = {
        "model": str(Path(args.model).resolve()),
        "image_codes": model.parti.dims.image_length,
        "parameters": model.parti.num_parameters(),
        "guidance_scale": 3.0,
        "max_batch_size": config.serve.max_batch_size,
        "queue_delay_us": config.serve.queue_delay_us,
        "server_instances": config.serve.instances,
        "ort_threads_per_instance": config.serve.threads,
        "parity_greedy_agreement": parity["greedy_sequence_agreement"],
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
