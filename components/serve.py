"""Pipeline step: start tritonserver on the repository and generate through the endpoint.

The smoke test asks for one image of a held-out caption of the run's own data (the first
captioned `validation` row) over HTTP and the same over gRPC, and checks they agree. Where
that row carries a synthetic scene, the attribute oracle reads the image back and records
which of its attributes it shows. A server that does not start, or an endpoint that
refuses a good request, fails the step; what the image shows is recorded, not enforced
(the promotion gate judges the model).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from parti_ops.model.config import Config
from parti_ops.model.errors import PartiError

log = logging.getLogger(__name__)

SMOKE_PNG, SMOKE_JSON, REAL_PNG = "smoke.png", "smoke.json", "real.png"


class SmokeTestError(PartiError, ValueError):
    """The smoke test has nothing to prompt with, or the endpoints disagree."""


def smoke_prompt(data_dir: str | Path) -> tuple[str, np.ndarray, Any]:
    """The first captioned `validation` row: its caption, image and scene (or None)."""
    from parti_ops.components.loaders import decode_png, iter_split, parse_scene
    from parti_ops.components.shards import TUNING_SPLIT

    for table in iter_split(data_dir, TUNING_SPLIT, ["caption", "image", "metadata"]):
        for caption, image, metadata in zip(
            table["caption"].to_pylist(),
            table["image"].to_pylist(),
            table["metadata"].to_pylist(),
            strict=True,
        ):
            if caption:
                return caption, decode_png(image), parse_scene(metadata)
    raise SmokeTestError(
        f"{data_dir}: no captioned {TUNING_SPLIT!r} row to prompt the served model with"
    )


def smoke_test_step(
    config: Config, parent_run_id: str, repository_dir: str, data_dir: str, out_dir: str
) -> dict[str, Any]:
    """Serve `repository_dir`, generate one image of a held-out caption of `data_dir`,
    write smoke.png (the generated image), real.png (the row's own) and smoke.json."""
    from PIL import Image

    from parti_ops.components.tracking import step_run
    from parti_ops.deploy.client import generate
    from parti_ops.deploy.server import TritonServer
    from parti_ops.model.scenes import compare, read_scene

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt, real, scene = smoke_prompt(data_dir)
    with step_run(config, "smoke-test", parent_run_id) as run:
        with TritonServer(repository_dir, config.serve) as server:
            started = time.perf_counter()
            images, tokens = generate(server.http_url, [prompt], seed=config.sample.seed)
            latency = time.perf_counter() - started
            again, _ = generate(server.grpc_url, [prompt], seed=config.sample.seed)
            urls = {"http": server.http_url, "grpc": server.grpc_url}
        if not np.array_equal(images, again):
            raise SmokeTestError("HTTP and gRPC returned different images for the same seed")
        Image.fromarray(images[0]).save(out / SMOKE_PNG)
        Image.fromarray(real).save(out / REAL_PNG)
        report = {
            "prompt": prompt,
            "seed": config.sample.seed,
            "endpoints": urls,
            "latency_s": latency,
            "image_shape": list(images.shape[1:]),
            "tokens": int(tokens.shape[1]),
            "checks": {},
        }
        if scene is not None:
            read = read_scene(images[0])
            report |= {
                "expected": scene.to_dict(),
                "read": read.to_dict(),
                "checks": compare(read, scene),
            }
        (out / SMOKE_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        run.log(
            metrics={
                "smoke.latency_s": latency,
                **{f"smoke.{k}": float(v) for k, v in report["checks"].items()},
            },
            tags={"smoke.prompt": prompt[:500]},
        )
        run.log_artifact(out / SMOKE_PNG, "smoke")
        run.log_artifact(out / REAL_PNG, "smoke")
    log.info("smoke test through %s: %r %s", urls["http"], prompt, report["checks"] or "")
    return report


def read_smoke_report(out_dir: str | Path) -> dict[str, Any]:
    """The report `smoke_test_step` wrote into `out_dir` (its return value)."""
    return json.loads((Path(out_dir) / SMOKE_JSON).read_text(encoding="utf-8"))
