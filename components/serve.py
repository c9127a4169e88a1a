"""Pipeline step: start tritonserver on the repository and generate through the endpoint.

The smoke test asks for one image of a synthetic-world prompt over HTTP and the same over
gRPC, checks they agree, reads the image back with the attribute oracle and records which
of the prompt's attributes it shows. A server that does not start, or an endpoint that
refuses a good request, fails the step; what the oracle reads is recorded, not enforced
(the promotion gate judges fidelity).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from parti_ops.model.config import Config

log = logging.getLogger(__name__)

SMOKE_PNG, SMOKE_JSON = "smoke.png", "smoke.json"


def smoke_test_step(
    config_json: str, parent_run_id: str, repository_dir: str, out_dir: str
) -> dict[str, Any]:
    """Serve `repository_dir`, generate one image through it, write smoke.png/json."""
    from PIL import Image

    from parti_ops.components.tracking import step_run
    from parti_ops.deploy.client import generate
    from parti_ops.deploy.server import TritonServer
    from parti_ops.model.scenes import compare, prompt_suite, read_scene

    config = Config.from_json(config_json)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    [(prompt, scene)] = prompt_suite(1, seed=config.sample.seed + 3)
    with step_run(config, "smoke-test", parent_run_id) as run:
        with TritonServer(repository_dir, config.serve) as server:
            started = time.perf_counter()
            images, tokens = generate(server.http_url, [prompt], seed=config.sample.seed)
            latency = time.perf_counter() - started
            again, _ = generate(server.grpc_url, [prompt], seed=config.sample.seed)
            urls = {"http": server.http_url, "grpc": server.grpc_url}
        if not np.array_equal(images, again):
            raise RuntimeError("HTTP and gRPC returned different images for the same seed")
        Image.fromarray(images[0]).save(out / SMOKE_PNG)
        read = read_scene(images[0])
        checks = compare(read, scene)
        report = {
            "prompt": prompt,
            "seed": config.sample.seed,
            "endpoints": urls,
            "latency_s": latency,
            "image_shape": list(images.shape[1:]),
            "tokens": int(tokens.shape[1]),
            "expected": scene.to_dict(),
            "read": read.to_dict(),
            "checks": checks,
        }
        (out / SMOKE_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        run.log(
            metrics={
                "smoke.latency_s": latency,
                **{f"smoke.{k}": float(v) for k, v in checks.items()},
            }
        )
        run.log_artifact(out / SMOKE_PNG, "smoke")
    log.info("smoke test through %s: %s", urls["http"], checks)
    return report
