"""A trained small bundle, its ONNX export, and a Triton repository serving it."""

from pathlib import Path

import pytest

from parti_ops.model.config import Config

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
