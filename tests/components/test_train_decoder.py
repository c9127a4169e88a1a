"""The decoder training step on real encoded data: one process vs torchrun, bundle, CLI."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from parti_ops.components.train_decoder import REPORT, SAMPLES, TrainError, train_step
from parti_ops.model.checkpoint import list_checkpoints
from parti_ops.model.config import Config
from parti_ops.model.generate import TextToImage
from parti_ops.model.layout import PREEMPTED_EXIT_CODE


def test_two_torchrun_processes_match_one_process_with_the_same_global_batch(
    tmp_path, inputs, train_bundle
):
    one = train_bundle(tmp_path / "one")
    two = train_bundle(tmp_path / "two", **{"train.nproc": 2})
    losses_one = [h["loss"] for h in one["history"]]
    losses_two = [h["loss"] for h in two["history"]]
    assert len(losses_one) == len(losses_two) == 6
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-4)
    assert losses_one[0] != losses_one[-1]  # it trained
    np.testing.assert_allclose(two["test_bits_per_token"], one["test_bits_per_token"], rtol=1e-3)


def test_the_step_writes_a_self_contained_bundle_and_an_mlflow_run(tmp_path, inputs, train_bundle):
    report = train_bundle(tmp_path / "bundle")
    out = tmp_path / "bundle"
    assert json.loads((out / REPORT).read_text()) == report
    assert report["validation_bits_per_token"] > 0 and report["test_bits_per_token"] > 0
    assert report["train_seconds"] > 0
    samples = Image.open(out / SAMPLES)
    assert samples.size == (4 * 2 * 32, 2 * 32)  # 8 (sample | reference) pairs, 4 a row
    bundle = TextToImage.load(out)
    images = bundle(["a red circle on the left", ""])
    assert images.shape == (2, 32, 32, 3) and images.dtype.is_floating_point is False

    client = MlflowClient(Config.load("tiny", overrides={"work_dir": str(tmp_path / "bundle.work")})
                          .mlflow_tracking_uri())  # fmt: skip
    run = client.search_runs(
        [client.get_experiment_by_name("parti-ops").experiment_id],
        filter_string="tags.`parti.step` = 'train'",
    )[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_bits_per_token"] == pytest.approx(report["test_bits_per_token"])
    assert run.data.metrics["train_seconds"] == pytest.approx(report["train_seconds"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6


def test_data_encoded_with_another_tokenizer_is_refused(tmp_path, inputs, small):
    config = Config.load("tiny", overrides={**small, "work_dir": str(tmp_path / "work")})
    other = tmp_path / "other_text"
    shutil.copytree(inputs["text"], other)
    with open(other / "tokenizer_config.json", "a") as f:
        f.write("\n")  # same tokenizer, other bytes: another version as far as lineage goes
    for text, message in (
        (other, "encoded with another text tokenizer"),
        (inputs["image"], "cannot read the text tokenizer"),
    ):
        with pytest.raises(TrainError, match=message):
            train_step(
                config, "", str(inputs["encoded"]), str(text), str(inputs["image"]),
                str(tmp_path / "out"),
            )  # fmt: skip


def _parti(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "parti_ops.pipelines.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_cli_generate_same_seed_same_png_and_clear_errors(tmp_path, inputs, train_bundle):
    train_bundle(tmp_path / "bundle")
    model = str(tmp_path / "bundle")
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for path in (first, second):
        done = _parti("generate", "--model", model, "--prompt", "a blue star", "--seed", "3",
                      "--out", str(path))  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert first.read_bytes() == second.read_bytes()
    assert Image.open(first).size == (32, 32)

    bad = _parti("generate", "--model", model, "--prompt", "x", "--guidance-scale", "nan")
    assert bad.returncode == 1 and "guidance_scale=nan" in bad.stderr
    bad = _parti("generate", "--model", model, "--prompt", "x", "--top-p", "0")
    assert bad.returncode == 1 and "top_p=0.0" in bad.stderr
    missing = _parti("generate", "--model", str(tmp_path / "nothing"), "--prompt", "x")
    assert missing.returncode == 1 and "no parti/ folder" in missing.stderr
    unknown = _parti("train", "--preset", "huge")
    assert unknown.returncode == 1 and "choose one of: tiny, small" in unknown.stderr


def test_an_over_long_prompt_is_truncated_with_a_warning(tmp_path, train_bundle, caplog):
    train_bundle(tmp_path / "bundle")
    bundle = TextToImage.load(tmp_path / "bundle")
    ids, mask, null = bundle.encode_prompts(["red " * 100, ""])
    assert "1 prompt(s) longer than 24 tokens were truncated" in caplog.text
    assert ids.shape[1] == 24 and mask[0].all() and ids[0, -1] == bundle.tokenizer.eos_token_id
    assert null.tolist() == [False, True]  # the empty prompt samples unconditionally


@pytest.mark.slow
def test_sigterm_to_a_torchrun_training_checkpoints_exits_143_and_resumes(tmp_path, inputs, small):
    out = tmp_path / "preempted"
    long_run = {"train.steps": 3000, "train.nproc": 2, "train.checkpoint_every": 50}
    sets = [f"{k}={v}" for k, v in {**small, **long_run}.items()]
    command = [
        sys.executable, "-m", "parti_ops.pipelines.cli", "train",
        "--encoded", str(inputs["encoded"]), "--text", str(inputs["text"]),
        "--image", str(inputs["image"]), "--out", str(out),
        "--set", f"work_dir={tmp_path / 'work'}", *[a for s in sets for a in ("--set", s)],
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list_checkpoints(out / "checkpoints"):  # wait until the processes train
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE, rest[-3000:]
    assert (out / "preempted").exists() and "preempted at step" in rest
    step = int(list_checkpoints(out / "checkpoints")[-1].stem.split("-")[1])
    assert 50 <= step < 3000

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out / REPORT).read_text())
    assert report["history"][-1]["step"] == 3000
    assert not (out / "preempted").exists()
