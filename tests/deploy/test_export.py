"""ONNX export: parity with PyTorch, the int8 variant, the serving runtime, the repository."""

import inspect
import json

import numpy as np
import onnx
import pytest
import torch

from parti_ops.deploy.onnx import ExportError, check_parity
from parti_ops.deploy.runtime import OnnxTextToImage, RequestError, check_settings, sample_logits
from parti_ops.deploy.triton import (
    RepositoryError,
    add_version,
    parti_config,
    read_config,
    served_version,
    set_served_version,
    write_config,
)
from parti_ops.model.config import ConfigError, SampleConfig, sampling_rules
from parti_ops.model.generate import TextToImage
from parti_ops.model.layout import GRAPHS, INT8
from parti_ops.model.sampling import generate_codes


def test_export_is_exact(exported, deploy_config):
    report = exported["parity"]
    bounds = deploy_config.export
    assert report["prompts"] == 32
    assert report["greedy_sequence_agreement"] == 1.0
    assert report["greedy_token_agreement"] == 1.0
    assert report["logits_max_abs_diff"] <= bounds.logits_atol
    assert report["pixels_mean_abs_diff"] <= bounds.pixel_tolerance
    for name in GRAPHS:
        model = onnx.load(str(exported["dir"] / f"{name}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == bounds.opset
    assert json.loads((exported["dir"] / "parity.json").read_text()) == report


DEFAULTS = SampleConfig().sampling_kwargs()


def test_sampling_defaults_are_written_once():
    # The runtime ships into the Triton repository without parti_ops: it keeps no defaults
    # of its own, and a served request that leaves a setting out gets export.json's.
    params = inspect.signature(OnnxTextToImage.generate_codes).parameters
    for name in DEFAULTS:  # `__call__` passes its settings on as they are
        assert params[name].default is inspect.Parameter.empty, name
    params = inspect.signature(generate_codes).parameters
    assert {name: params[name].default for name in DEFAULTS} == DEFAULTS


def test_parity_check_catches_a_different_model(exported, train_bundle, deploy_config, tmp_path):
    other = tmp_path / "other"
    train_bundle(other, **{"train.steps": 40, "train.seed": 7})
    with pytest.raises(ExportError, match="parity failed: logits differ"):
        check_parity(TextToImage.load(other), exported["dir"], deploy_config.export)


def test_dynamic_axes_batch_and_past_length(exported, bundle):
    """Other batch sizes and prompt lengths than the export's example, unguided sampling."""
    runtime = OnnxTextToImage.load(exported["dir"])
    model = TextToImage.load(bundle)
    prompts = ["a small red circle on the left on a black background"] * 5 + [""]
    ids, mask, null = model.encode_prompts(prompts)
    ort_ids, ort_mask, ort_null = runtime.encode_prompts(prompts)
    assert np.array_equal(ort_ids, ids.numpy()) and np.array_equal(ort_null, null.numpy())
    seeds = list(range(6))
    expected = generate_codes(
        model.parti, ids, mask, seeds, guidance_scale=1.0, temperature=0, null=null
    )
    got = runtime.generate_codes(ort_ids, ort_mask, ort_null, seeds, guidance_scale=1.0,
                                 temperature=0.0, top_k=0, top_p=1.0)  # fmt: skip
    assert np.array_equal(got, expected.numpy())


def test_long_prompts_are_cut_like_pytorch(exported, bundle):
    runtime, model = OnnxTextToImage.load(exported["dir"]), TextToImage.load(bundle)
    prompt = " ".join(["a red circle"] * 50)
    ids, mask, _ = runtime.encode_prompts([prompt])
    assert ids.shape[1] == runtime.meta["text_length"]
    assert np.array_equal(ids, model.encode_prompts([prompt])[0].numpy())


def test_int8_variant_is_measured_and_smaller(exported, deploy_config):
    result = exported["int8"]
    assert result["prompts"] == deploy_config.export.int8_prompts
    assert result["fidelity_drop"] == pytest.approx(
        result["fp32"]["fidelity"] - result["int8"]["fidelity"]
    )
    assert result["served"] == (
        result["fidelity_drop"] <= deploy_config.export.max_int8_fidelity_drop
    )
    fp32 = (exported["dir"] / "decoder_step.onnx").stat().st_size
    int8 = exported["dir"] / INT8 / "decoder_step.onnx"
    assert int8.stat().st_size < fp32
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops


def test_same_seed_same_image_and_sampling_settings(exported):
    runtime = OnnxTextToImage.load(exported["dir"])
    prompts = ["a large blue star at the top", "a small green cross on the right"]
    first, codes = runtime(prompts, seeds=[3, 4], **{**DEFAULTS, "top_k": 20, "top_p": 0.9})
    again, codes_again = runtime(prompts, seeds=[3, 4], **{**DEFAULTS, "top_k": 20, "top_p": 0.9})
    other, _ = runtime(prompts, seeds=[5, 6], **{**DEFAULTS, "top_k": 20, "top_p": 0.9})
    assert first.shape == (2, *runtime.image_shape) and first.dtype == np.uint8
    assert np.array_equal(first, again) and np.array_equal(codes, codes_again)
    assert not np.array_equal(
        codes, runtime(prompts, seeds=[5, 6], **{**DEFAULTS, "top_k": 20, "top_p": 0.9})[1]
    )
    assert other.shape == first.shape


def test_sample_logits_respects_each_rows_settings():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    rngs = [np.random.default_rng(i) for i in range(4)]
    best = logits.argmax(axis=1)
    top2 = np.argsort(-logits, axis=1)[:, :2]
    for _ in range(50):
        chosen = sample_logits(
            logits,
            rngs,
            temperature=np.array([0.0, 1.0, 1.0, 5.0]),
            top_k=np.array([0, 1, 0, 2]),
            top_p=np.array([1.0, 1.0, 1e-6, 1.0]),
        )
        assert chosen[0] == best[0]  # greedy
        assert chosen[1] == best[1]  # top-k 1
        assert chosen[2] == best[2]  # top-p keeps the most likely only
        assert chosen[3] in top2[3]  # top-k 2, however flat the temperature


def test_cancelled_rows_stop_and_the_rest_finish(exported):
    runtime = OnnxTextToImage.load(exported["dir"])
    prompts = ["a red circle", "a blue square", "a green star"]
    ids, mask, null = runtime.encode_prompts(prompts)
    full = runtime.generate_codes(ids, mask, null, [1, 2, 3], **DEFAULTS)
    calls = []

    def cancelled():
        calls.append(1)
        return np.array([False, len(calls) > 3, False])

    partial = runtime.generate_codes(ids, mask, null, [1, 2, 3], cancelled=cancelled, **DEFAULTS)
    assert np.array_equal(partial[[0, 2]], full[[0, 2]])
    assert (partial[1].reshape(-1)[3:] == -1).all() and (partial[1].reshape(-1)[:3] >= 0).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"guidance_scale": float("nan")}, "guidance_scale=nan"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
        ({"guidance_scale": float("inf")}, "guidance_scale=inf"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"seed": -1}, "seed=-1"),
        ({"seed": 2**63}, f"seed={2**63}"),
    ],
)
def test_the_server_refuses_what_the_config_refuses_in_the_same_words(bad, message):
    """The runtime checks requests with SampleConfig's ranges, as export.json carries them."""
    rules = json.loads(json.dumps(sampling_rules()))  # as the Triton model reads them
    settings = {**DEFAULTS, "seed": 0, **bad}
    with pytest.raises(RequestError, match=message.replace(".", r"\.")) as served:
        check_settings(settings, rules)
    with pytest.raises(ConfigError) as configured:
        SampleConfig(**settings)
    assert str(served.value) == str(configured.value).removeprefix("sample.")
    check_settings({**DEFAULTS, "seed": 2**63 - 1}, rules)  # the defaults and the edge pass


def test_repository_configs_parse_and_switch_versions(exported, deploy_config, tmp_path):
    serve = deploy_config.serve
    repo = tmp_path / "repo"
    add_version(repo, exported["dir"], 4, serve, target="gpu", precision="int8")
    assert served_version(repo, serve) is None  # adding does not serve
    set_served_version(repo, serve, 4)
    config = read_config(repo / "parti" / "config.pbtxt")
    assert list(config.version_policy.specific.versions) == [4]
    assert config.backend == "python" and config.max_batch_size == serve.max_batch_size
    assert config.dynamic_batching.default_queue_policy.max_queue_size == serve.max_queue_size
    assert [i.name for i in config.input] == [
        "prompt", "seed", "guidance_scale", "temperature", "top_k", "top_p"
    ]  # fmt: skip
    assert [o.name for o in config.output] == ["image", "tokens"]
    version = repo / "parti" / "4"
    assert json.loads((version / "meta.json").read_text())["precision"] == "int8"
    assert {"model.py", "parti_runtime.py", "export.json"} <= {p.name for p in version.iterdir()}
    for name in GRAPHS:  # the GPU target's ONNX Runtime models, TensorRT accelerated
        graph = read_config(repo / name / "config.pbtxt")
        assert graph.backend == "onnxruntime" and (repo / name / "4" / "model.onnx").is_file()
        accelerator = graph.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accelerator.name == "tensorrt"
    with pytest.raises(RepositoryError, match="no exported model"):
        set_served_version(repo, serve, 9)
    assert served_version(repo, serve) == 4


def test_a_config_that_does_not_parse_is_refused(tmp_path, exported, deploy_config):
    meta = json.loads((exported["dir"] / "meta.json").read_text())
    config = parti_config(deploy_config.serve, meta, 1)
    write_config(config, tmp_path)
    assert read_config(tmp_path / "config.pbtxt") == config
    (tmp_path / "config.pbtxt").write_text("max_batch_size: eight\n")
    with pytest.raises(RepositoryError, match="not a valid Triton model config"):
        read_config(tmp_path / "config.pbtxt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of GPU-less machines")
def test_tensorrt_export_says_it_needs_a_gpu(exported, bundle, tmp_path):
    from typer.testing import CliRunner

    from parti_ops.pipelines.cli import app

    args = ["export", "tensorrt", "--onnx", str(exported["dir"]), "--model", str(bundle),
            "--out", str(tmp_path / "trt")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "need an NVIDIA GPU" in result.output


def test_export_never_replaces_a_folder_that_is_not_an_export(bundle, deploy_config, tmp_path):
    from parti_ops.deploy.onnx import export_onnx

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty and not an export"):
        export_onnx(bundle, tmp_path, deploy_config.export)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
