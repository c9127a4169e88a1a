"""A trained small bundle, its ONNX export, and a Triton repository serving it."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from parti_ops.components.synth import METADATA, SPLITS
from parti_ops.model.config import Config
from parti_ops.model.scenes import Scene, SceneObject, render

# Enough steps that the model's logits are not near-uniform, so near-ties that would
# make greedy agreement a coin flip are rare, as with a trained model.
EXPORT = {"train.steps": 40, "export.int8_prompts": 8, "export.parity_prompts": 32}


@pytest.fixture(scope="session")
def deploy_config(small) -> Config:
    return Config.load("tiny", overrides={**small, **EXPORT})


@pytest.fixture(scope="session")
def bundle(train_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "bundle"
    train_bundle(out, **EXPORT)
    return out


@pytest.fixture(scope="session")
def exported(bundle, deploy_config, tmp_path_factory) -> dict:
    """`parti export onnx` of the bundle: folder, parity report, int8 comparison."""
    from parti_ops.deploy.onnx import compare_int8, export_onnx, quantize_int8

    out = tmp_path_factory.mktemp("onnx") / "onnx"
    report = export_onnx(bundle, out, deploy_config.export)
    quantize_int8(out)
    return {"dir": out, "parity": report, "int8": compare_int8(out, deploy_config.export)}


@pytest.fixture(scope="session")
def repository(exported, deploy_config, tmp_path_factory) -> Path:
    """A model repository serving the export as version 1 of `parti`."""
    from parti_ops.deploy.triton import add_version, set_served_version

    repo = tmp_path_factory.mktemp("triton") / "repository"
    add_version(repo, exported["dir"], 1, deploy_config.serve, sample=deploy_config.sample)
    set_served_version(repo, deploy_config.serve, 1)
    return repo


@pytest.fixture(scope="session")
def server(repository, deploy_config):
    """The real tritonserver on loopback, free ports, stopped after the last test."""
    from parti_ops.deploy.server import TritonServer

    with TritonServer(repository, deploy_config.serve) as running:
        yield running


# Four scenes, told apart by every attribute, and their captions: a model trained on them
# alone learns to draw each one from its caption within a minute of CPU.
FAITHFUL_SCENES = {
    "a large red circle in the center, on a white background": Scene(
        "white", (SceneObject("circle", "red", "center", "large"),)
    ),
    "a large blue square in the top left corner, on a black background": Scene(
        "black", (SceneObject("square", "blue", "top left", "large"),)
    ),
    "a large yellow cross at the bottom, on a gray background": Scene(
        "gray", (SceneObject("cross", "yellow", "bottom", "large"),)
    ),
    "a large green triangle on the right, on a white background": Scene(
        "white", (SceneObject("triangle", "green", "right", "large"),)
    ),
}
FAITHFUL = {
    "image_tokenizer.channels": 32,
    "image_tokenizer.latent_dim": 32,
    "image_tokenizer.codebook_dim": 8,
    "image_tokenizer.steps": 300,
    "image_tokenizer.warmup_steps": 10,
    "parti.d_model": 64,
    "train.steps": 400,
    "train.lr": 2e-3,
    "train.warmup_steps": 10,
    "train.checkpoint_every": 200,
    "train.log_every": 50,
}


def _write_scenes(out: Path, image_size: int) -> None:
    """An imagefolder of `FAITHFUL_SCENES`: one drawing of each per split, no two alike."""
    rng, seen = np.random.default_rng(0), set()
    for split in SPLITS:
        (out / split).mkdir(parents=True)
        rows = []
        for index, (caption, scene) in enumerate(FAITHFUL_SCENES.items()):
            while True:  # validation quarantines duplicate images
                image = render(scene, image_size=image_size, rng=rng)
                digest = hashlib.sha256(image.tobytes()).digest()
                if digest not in seen:
                    break
            seen.add(digest)
            image.save(out / split / f"{index:05d}.png")
            rows.append({"file_name": f"{index:05d}.png", "text": caption, **scene.to_dict()})
        (out / split / METADATA).write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
        )


@pytest.fixture(scope="session")
def faithful(small, prepare, tmp_path_factory) -> dict:
    """Every step from data to `parti export onnx`, on `FAITHFUL_SCENES`: a model that follows
    its prompts, so what a server makes of a prompt can be checked against it.

    Returns `{"dir": the export, "scenes": {caption: Scene}}`.
    """
    from parti_ops.components.train_decoder import train_step
    from parti_ops.deploy.onnx import export_onnx

    root = tmp_path_factory.mktemp("faithful")
    config = Config.load("tiny", overrides={**small, **FAITHFUL, "work_dir": str(root / "work")})
    _write_scenes(root / "raw", config.data.image_size)
    paths = {k: str(v) for k, v in prepare(config, root / "raw", root).items()}
    train_step(
        config, "", paths["encoded"], paths["text"], paths["image"], str(root / "bundle")
    )  # fmt: skip
    export_onnx(root / "bundle", root / "onnx", config.export)
    return {"dir": root / "onnx", "scenes": FAITHFUL_SCENES}
