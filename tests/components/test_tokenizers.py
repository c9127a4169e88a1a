"""The tokenizer steps and encoding, on a small synthetic set, through files and MLflow."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from transformers import AutoTokenizer

from parti_ops.components.encode import encode_step
from parti_ops.components.ingest import ingest
from parti_ops.components.loaders import EncodedFormatError, decode_png, load_encoded
from parti_ops.components.shards import iter_shards
from parti_ops.components.synth import synthesize
from parti_ops.components.tokenizers import (
    GRID,
    IMAGE_REPORT,
    image_tokenizer_step,
    text_tokenizer_step,
)
from parti_ops.components.validate import validate
from parti_ops.components.versioning import files_digest
from parti_ops.model.checkpoint import list_checkpoints
from parti_ops.model.config import Config
from parti_ops.model.layout import IMAGE_TOKENIZER_FILES, PREEMPTED_EXIT_CODE, TEXT_TOKENIZER_FILES
from parti_ops.model.vqgan import VQGAN, to_unit

SMALL_VQGAN = {
    "image_tokenizer.channels": 8,
    "image_tokenizer.latent_dim": 16,
    "image_tokenizer.codebook_size": 64,
    "image_tokenizer.codebook_dim": 4,
    "image_tokenizer.batch_size": 8,
    "image_tokenizer.warmup_steps": 2,
    "image_tokenizer.disc_channels": 8,
    "image_tokenizer.gan_weight": 0.1,  # the GAN path too, though the tiny preset has it off
}


@pytest.fixture(scope="module")
def accepted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    data = Config.load("tiny", overrides={"data.num_images": 120, "data.image_size": 32}).data
    synthesize(root / "raw", data)
    ingest(root / "raw", root / "canonical", data)
    validate(root / "canonical", root / "validated", data)
    return root / "validated" / "accepted"


def _config(tmp_path: Path, **overrides) -> Config:
    base = {"work_dir": str(tmp_path / "work"), "data.image_size": 32, **SMALL_VQGAN}
    return Config.load("tiny", overrides={**base, **overrides})


def test_steps_train_both_tokenizers_and_encode_every_accepted_row(tmp_path, accepted):
    config = _config(
        tmp_path,
        **{
            "image_tokenizer.steps": 8,
            "image_tokenizer.gan_start": 4,
            "text_tokenizer.max_length": 24,
        },
    )
    text, image, encoded = tmp_path / "text", tmp_path / "image", tmp_path / "encoded"
    text_report = text_tokenizer_step(config, "", str(accepted), str(text))
    heldout = image_tokenizer_step(config, "", str(accepted), str(image))
    manifest = encode_step(config, "", str(accepted), str(text), str(image), str(encoded))

    tokenizer = AutoTokenizer.from_pretrained(text, local_files_only=True)
    assert text_report["vocab_size"] == len(tokenizer) and text_report["train_captions"] > 0
    assert text_report["truncated"] > 0  # synthetic two-object captions run past 24 tokens
    assert heldout["split"] == "test" and heldout["images"] == manifest["splits"]["test"]["rows"]
    assert {"psnr", "ssim", "codebook_usage", "perplexity", "oracle_exact"} <= set(heldout)
    assert json.loads((image / IMAGE_REPORT).read_text())["psnr"] == heldout["psnr"]
    rows = -(-min(16, int(heldout["images"])) // 4)  # 4 (original | reconstruction) pairs a row
    assert Image.open(image / GRID).size == (4 * 64, rows * 32)

    splits = json.loads((accepted / "manifest.json").read_text())["splits"]
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == splits
    assert manifest["grid"] == [8, 8] and manifest["codebook_size"] == 64
    assert manifest["text_tokenizer"]["digest"] == files_digest(text, TEXT_TOKENIZER_FILES)
    assert manifest["image_tokenizer"]["digest"] == files_digest(image, IMAGE_TOKENIZER_FILES)
    assert manifest["truncated_captions"] > 0

    rows = [t for t in iter_shards(accepted, ["row_id", "split", "caption", "image"])]
    train = [
        (r["row_id"], r["caption"], r["image"])
        for t in rows
        for r in t.to_pylist()
        if r["split"] == "train"
    ]
    arrays = load_encoded(encoded, "train")
    assert arrays["codes"].dtype == np.uint16 and arrays["codes"].shape == (len(train), 8, 8)
    assert arrays["text_ids"].dtype == np.uint16 and arrays["text_ids"].shape == (len(train), 24)
    assert arrays["row_id"].tolist() == [r for r, _, _ in train]
    model = VQGAN.from_pretrained(image)
    pixels = torch.from_numpy(np.stack([decode_png(b) for _, _, b in train[:5]]))
    assert np.array_equal(model.tokenize(to_unit(pixels)).numpy(), arrays["codes"][:5])
    ids = tokenizer(train[0][1], truncation=True, max_length=24)["input_ids"]
    assert arrays["text_ids"][0, : len(ids)].tolist() == ids
    assert arrays["text_lengths"][0] == len(ids)

    client = MlflowClient(config.mlflow_tracking_uri())
    runs = {r.info.run_name: r for r in client.search_runs(_experiments(client))}
    assert {"text-tokenizer", "image-tokenizer", "encode"} <= set(runs)
    trained = runs["image-tokenizer"]
    assert trained.data.tags["image_tokenizer.digest"] == manifest["image_tokenizer"]["digest"]
    assert trained.data.metrics["heldout/psnr"] == pytest.approx(heldout["psnr"])
    history = client.get_metric_history(trained.info.run_id, "loss/l2")
    assert [m.step for m in history] == [8]  # log_every=50 > steps: logged at the end
    assert runs["encode"].data.metrics["rows"] == manifest["rows"]


def test_encoded_shards_are_checked_when_loaded(tmp_path, accepted):
    config = _config(tmp_path, **{"image_tokenizer.steps": 2})
    text, image, encoded = tmp_path / "text", tmp_path / "image", tmp_path / "encoded"
    text_tokenizer_step(config, "", str(accepted), str(text))
    image_tokenizer_step(config, "", str(accepted), str(image))
    encode_step(config, "", str(accepted), str(text), str(image), str(encoded))
    with pytest.raises(EncodedFormatError, match="no split 'holdout'"):
        load_encoded(encoded, "holdout")
    shard = next(encoded.glob("validation-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one changed byte of tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(EncodedFormatError, match="changed since it was written"):
        load_encoded(encoded, "validation")
    with pytest.raises(EncodedFormatError, match="parti tokenizer encode"):
        load_encoded(tmp_path, "train")


def _experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


# Wide log lines, so that paths in messages are not wrapped.
ENV = {**os.environ, "COLUMNS": "500"}


def _train_command(accepted: Path, out: Path, config: Config, *extra: str) -> list[str]:
    sets = [f"{k}={v}" for k, v in SMALL_VQGAN.items()] + [
        "data.image_size=32",
        f"work_dir={config.work_dir}",
        "image_tokenizer.steps=200",
        "image_tokenizer.checkpoint_every=20",
        "image_tokenizer.gan_start=100",
    ]
    command = [sys.executable, "-m", "parti_ops.pipelines.cli", "tokenizer", "image", "train"]
    command += ["--data", str(accepted), "--out", str(out)]
    for item in sets:
        command += ["--set", item]
    return command + list(extra)  # last, so that its --set wins


def test_sigterm_checkpoints_exits_143_and_resume_equals_an_uninterrupted_run(tmp_path, accepted):
    config = _config(tmp_path)
    env = ENV
    whole, split = tmp_path / "whole", tmp_path / "split"
    subprocess.run(
        _train_command(accepted, whole, config), check=True, env=env, capture_output=True
    )

    process = subprocess.Popen(
        _train_command(accepted, split, config), env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list_checkpoints(split / "checkpoints") and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr
    stopped_at = int(list_checkpoints(split / "checkpoints")[-1].stem.split("-")[1])
    assert 20 <= stopped_at < 200
    assert not (split / "model.safetensors").exists()

    resumed = subprocess.run(
        _train_command(accepted, split, config, "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (split / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    final = list_checkpoints(split / "checkpoints")[-1]
    assert final.read_bytes() == list_checkpoints(whole / "checkpoints")[-1].read_bytes()

    client = MlflowClient(config.mlflow_tracking_uri())
    runs = client.search_runs(_experiments(client), order_by=["attribute.start_time ASC"])
    statuses = [r.info.status for r in runs]
    assert statuses == ["FINISHED", "KILLED", "FINISHED"]  # the preempted attempt: KILLED


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, accepted):
    config = _config(tmp_path)
    out = tmp_path / "run"
    first = _train_command(accepted, out, config, "--set", "image_tokenizer.steps=40")
    subprocess.run(first, check=True, capture_output=True, env=ENV)
    older, newest = list_checkpoints(out / "checkpoints")
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = subprocess.run(
        _train_command(accepted, out, config, "--resume", "--set", "image_tokenizer.steps=60"),
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "unreadable checkpoint" in resumed.stderr and older.name in resumed.stderr
    assert "step-00000060.safetensors" in [p.name for p in list_checkpoints(out / "checkpoints")]
