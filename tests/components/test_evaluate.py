"""The scorer and the pinned evaluator on a real (small) bundle: reproducible, reused, clear."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from parti_ops.components.evaluate import (
    EVALUATION,
    REPORT,
    SAMPLES,
    EvaluationError,
    FeatureModel,
    evaluate_bundle,
    evaluation_key,
)
from parti_ops.components.loaders import load_captioned, load_pairs
from parti_ops.components.train_scorer import REPORT as SCORER_REPORT
from parti_ops.components.train_scorer import near_miss_captions, scorer_step
from parti_ops.model.config import Config
from parti_ops.model.generate import TextToImage
from parti_ops.model.scenes import NEAR_MISSES
from parti_ops.model.scorer import _HardNegatives, load_scorer, similarity, train_scorer

SCORER = {
    "scorer.steps": 120,
    "scorer.warmup_steps": 5,
    "scorer.batch_size": 16,
    "scorer.channels": 4,
    "scorer.embed_dim": 16,
    # One near miss per step: in 120 steps of 16, five outweigh the in-batch pairs that
    # the retrieval test below checks are learnt.
    "scorer.negatives_per_step": 1,
    "scorer.text_width": 32,
    "scorer.text_layers": 1,
    "evaluate.prompts": 4,
    "evaluate.seen_prompts": 4,
    "evaluate.fid_images": 16,
    "evaluate.batch_size": 8,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, inputs, small, train_bundle):
    root = tmp_path_factory.mktemp("evaluate")
    config = Config.load("tiny", overrides={**small, **SCORER, "work_dir": str(root / "work")})
    report = scorer_step(
        config, "", str(inputs["accepted"]), str(inputs["text"]), str(root / "scorer")
    )
    train_bundle(root / "bundle")
    return {"config": config, "root": root, "scorer": root / "scorer", "report": report}


def test_the_scorer_learns_the_training_pairs_and_reports_held_out_retrieval(setup, inputs):
    features = FeatureModel.load(setup["scorer"])
    images, captions = load_pairs(inputs["accepted"], "train")
    img = torch.nn.functional.normalize(features.image_features(images[:16]), dim=-1)
    txt = torch.nn.functional.normalize(features.text_features(captions[:16]), dim=-1)
    own = (img @ txt.t()).argmax(dim=1) == torch.arange(16)
    assert own.float().mean() > 0.3  # chance: 1 in 16
    saved = json.loads((setup["scorer"] / SCORER_REPORT).read_text())
    assert saved == setup["report"] and saved["version"] == features.version
    retrieval = [k for k in saved if "retrieval_top1_of_10" in k]
    assert retrieval and all(0 <= saved[k] <= 1 for k in retrieval)


def test_a_checkpointing_scorer_step_resumes_to_the_same_scorer(setup, inputs, tmp_path):
    """With scorer.checkpoint_every set, a rerun into the same folder must say --resume, and
    a resumed run (the step's retry) ends with the weights of an uninterrupted one."""
    from parti_ops.model.checkpoint import CheckpointError, list_checkpoints
    from parti_ops.model.layout import CHECKPOINTS

    config = setup["config"].merge({"scorer.steps": 8, "scorer.checkpoint_every": 4})
    args = (str(inputs["accepted"]), str(inputs["text"]))
    whole = scorer_step(config, "", *args, str(tmp_path / "whole"))
    assert [p.name for p in list_checkpoints(tmp_path / "whole" / CHECKPOINTS)] == [
        "step-00000004.safetensors", "step-00000008.safetensors",
    ]  # fmt: skip
    with pytest.raises(CheckpointError, match="--resume"):
        scorer_step(config, "", *args, str(tmp_path / "whole"))
    # A run stopped after 4 steps (its checkpoint kept), then resumed to 8: the 4 steps are
    # all warm-up (scorer.warmup_steps=5), whose rates do not depend on the total.
    scorer_step(config.merge({"scorer.steps": 4}), "", *args, str(tmp_path / "part"))
    resumed = scorer_step(config, "", *args, str(tmp_path / "part"), resume=True)
    assert resumed["version"] == whole["version"]


def test_re_evaluating_a_bundle_gives_identical_numbers_and_reuses_fid_references(setup, inputs):
    root, config = setup["root"], setup["config"]
    refs = root / "refs"
    first = evaluate_bundle(config, root / "bundle", inputs["accepted"], setup["scorer"],
                            root / "e1", refs)  # fmt: skip
    (reference,) = refs.iterdir()
    written = reference.stat().st_mtime_ns
    second = evaluate_bundle(config, root / "bundle", inputs["accepted"], setup["scorer"],
                             root / "e2", refs)  # fmt: skip
    assert first == second  # every metric, the key and the reference file's name
    assert reference.stat().st_mtime_ns == written  # computed once, then reused
    assert json.loads((root / "e1" / EVALUATION).read_text()) == first
    metrics = first["metrics"]
    for name in ("fidelity", "heldout_bits_per_token", "clip_score", "fid"):
        assert name in metrics and metrics[name] == metrics[name]  # present, not NaN
    assert 0 <= metrics["fidelity"] <= 1 and metrics["fid"] >= 0
    for attribute in ("shape", "colour", "position", "count", "exact"):
        assert f"test/{attribute}" in metrics and f"validation/{attribute}" in metrics
    assert first["key"]["data_digest"].endswith(".dir")
    assert "| fidelity |" in (root / "e1" / REPORT).read_text()
    assert (root / "e1" / SAMPLES).stat().st_size > 0

    # The evaluator's seed, not `sample.seed`, seeds its samples.
    other = dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, seed=1))
    third = evaluate_bundle(other, root / "bundle", inputs["accepted"], setup["scorer"],
                            root / "e3", refs)  # fmt: skip
    assert third["key"]["evaluator"] != first["key"]["evaluator"]  # other settings: not comparable
    assert third["key"]["data_digest"] == first["key"]["data_digest"]
    assert (root / "e3" / SAMPLES).read_bytes() != (root / "e1" / SAMPLES).read_bytes()
    assert third["metrics"]["heldout_bits_per_token"] == metrics["heldout_bits_per_token"]
    # ... so `sample.seed`, which it does not use, leaves evaluations comparable.
    unused = dataclasses.replace(config, sample=dataclasses.replace(config.sample, seed=7))
    features = FeatureModel.load(setup["scorer"])
    assert evaluation_key(unused, inputs["accepted"], features) == first["key"]


def test_hard_negatives_train_only_the_rows_that_have_them(setup, inputs, tmp_path):
    images, captions, scenes = load_captioned(inputs["accepted"], "train")
    misses = near_miss_captions(scenes, seed=0)
    assert all(len(m) == len(NEAR_MISSES) for m in misses)  # every synthetic row has its five
    assert misses == near_miss_captions(scenes, seed=0) != near_miss_captions(scenes, seed=1)
    cfg = dataclasses.replace(setup["config"].scorer, steps=6)

    def weights(name: str, negatives) -> dict[str, torch.Tensor]:
        args = (cfg, images, captions, inputs["text"], 24, tmp_path / name)
        return train_scorer(*args, negatives=negatives).state_dict()

    plain, taught = weights("plain", None), weights("taught", misses)
    assert not all(torch.equal(plain[k], taught[k]) for k in plain)
    with pytest.raises(ValueError, match="1 lists of negatives for"):
        weights("short", misses[:1])

    # A row without negatives gets a column of -inf (no term); a row with two, either one.
    model, processor = load_scorer(setup["scorer"])
    rows = [["a large red circle in the center"], [], ["a small blue star", "a green cross"]]
    hard = _HardNegatives(rows, processor.tokenizer, model.length, seed=0)
    img = model.image_embeddings(images[:3])
    own = [
        similarity(model, processor, images[i : i + 1], row) for i, row in enumerate(rows) if row
    ]
    drawn = set()
    with torch.no_grad():
        for step in range(20):
            out = hard.logits(model, img, torch.arange(3), step)
            assert out.shape == (3, 1) and torch.isneginf(out[1, 0])
            assert torch.isclose(out[0, 0], model.scale() * own[0][0, 0])
            third = out[2, 0] / model.scale()
            drawn |= {k for k in range(2) if torch.isclose(third, own[1][0, k], atol=1e-6)}
    assert drawn == {0, 1}
    # Two per step: a row with two gets both, a row with one gets it and -inf.
    both = _HardNegatives(rows, processor.tokenizer, model.length, seed=0, per_step=2)
    with torch.no_grad():
        out = both.logits(model, img, torch.arange(3), step=0) / model.scale()
    assert out.shape == (3, 2) and torch.isneginf(out[1]).all() and torch.isneginf(out[0, 1])
    assert torch.isclose(out[0, 0], own[0][0, 0], atol=1e-6)
    third = out[2].sort().values
    assert torch.allclose(third, own[1][0].sort().values, atol=1e-6)

    report = setup["report"]
    for split in ("validation", "test"):  # every attribute's share; backgrounds learnt first
        assert {f"{split}/beats_near_miss_{kind}" for kind in NEAR_MISSES} <= set(report)
        assert report[f"{split}/beats_near_miss_background"] >= 0.8


def test_reranking_keeps_the_candidate_the_scorer_likes_best(setup):
    bundle = TextToImage.load(setup["root"] / "bundle")
    features = FeatureModel.load(setup["scorer"])
    prompt = "a large red circle in the center on a black background"
    settings = dataclasses.replace(setup["config"].sample, candidates=4, seed=3)
    one_each = dataclasses.replace(settings, candidates=1)
    every = bundle([prompt] * 4, one_each, seeds=[12, 13, 14, 15])  # candidate j: seed 3*4 + j
    scores = features.reranker()(every, prompt)
    best = bundle([prompt], settings, rerank=features.reranker())
    assert torch.equal(best[0], every[int(scores.argmax())])


def test_bad_inputs_get_clear_errors(setup, inputs, tmp_path, small):
    with pytest.raises(EvaluationError, match="neither a `parti scorer train` folder"):
        FeatureModel.load(tmp_path)
    config = Config.load("tiny", overrides={**small, **SCORER, "work_dir": str(tmp_path / "w")})
    with pytest.raises(FileNotFoundError, match="no manifest; point at a folder written by"):
        scorer_step(config, "", str(tmp_path), str(inputs["text"]), str(tmp_path / "s"))


def _parti(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "parti_ops.pipelines.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_cli_generate_with_candidates_needs_a_scorer_and_uses_it(setup, tmp_path, small):
    sets = [a for k, v in {**small, **SCORER}.items() for a in ("--set", f"{k}={v}")]
    bundle = str(setup["root"] / "bundle")
    refused = _parti("generate", "--prompt", "a red circle", "--model", bundle,
                     "--candidates", "3", "--out", str(tmp_path / "x.png"), *sets)  # fmt: skip
    assert refused.returncode != 0 and "needs --scorer" in refused.stderr
    scorer = str(setup["scorer"])
    done = _parti("generate", "--prompt", "a red circle", "--model", bundle, "--candidates", "3",
                  "--scorer", scorer, "--out", str(tmp_path / "x.png"), *sets)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.png").stat().st_size > 0


def _local_clip(folder) -> None:
    """A tiny, randomly initialised Hugging Face CLIP saved to `folder`, as a downloaded one
    would be (model, tokenizer and image processor); none can be downloaded here."""
    import string

    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder.mkdir()
    letters = list(string.ascii_lowercase + string.digits + ",.")
    tokens = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    square = {"height": 32, "width": 32}
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=square)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2}  # fmt: skip
    config = CLIPConfig(
        text_config={**layers, "vocab_size": len(vocab), "max_position_embeddings": 77,
                     "bos_token_id": vocab["<|startoftext|>"],
                     "eos_token_id": vocab["<|endoftext|>"]},
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def test_a_local_hugging_face_clip_replaces_the_scorer_everywhere(setup, inputs):
    root = setup["root"]
    clip = root / "clip"
    _local_clip(clip)
    config = dataclasses.replace(
        setup["config"],
        scorer=dataclasses.replace(setup["config"].scorer, clip_model=str(clip)),
    )
    features = FeatureModel.load(clip)
    assert features.dim == 16 and features.version != FeatureModel.load(setup["scorer"]).version

    result = evaluate_bundle(config, root / "bundle", inputs["accepted"], setup["scorer"],
                             root / "with-clip", root / "clip-refs")  # fmt: skip
    metrics = result["metrics"]
    assert metrics["clip_score"] == metrics["clip_score"] and metrics["fid"] >= 0  # not NaN
    assert result["key"]["feature_model"] == features.version  # not the in-house scorer's
    (reference,) = (root / "clip-refs").iterdir()
    assert features.version[:16] in reference.name

    images, captions = load_pairs(inputs["accepted"], "test")
    scores = features.reranker()(images[:3], captions[0])
    assert scores.shape == (3,) and torch.all(scores.abs() <= 1 + 1e-6)  # cosine similarities


def test_choosing_a_setting_reads_validation_only(setup, inputs, monkeypatch):
    import parti_ops.components.evaluate as evaluate_module
    from parti_ops.components.loaders import iter_split
    from parti_ops.components.registry import decide

    read: list[str] = []

    def spy(data_dir, split, columns):
        read.append(split)
        return iter_split(data_dir, split, columns)

    monkeypatch.setattr(evaluate_module, "iter_split", spy)
    grid = [{"temperature": 0.7}, {"temperature": 1.0, "guidance_scale": 3.0}]
    results = evaluate_module.sweep_sampling(
        setup["config"], setup["root"] / "bundle", inputs["accepted"], setup["scorer"], grid
    )
    assert read and set(read) == {"validation"}
    assert sorted(map(str, (r["settings"] for r in results))) == sorted(map(str, grid))
    for entry in results:
        low, high = entry["interval"]
        assert low <= entry["prompt_following"] <= high and 0 <= entry["exact"] <= 1
    assert results[0]["prompt_following"] >= results[1]["prompt_following"]  # best first
    assert results[0]["vs_best"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    low, high = results[1]["vs_best"]["interval"]
    assert low <= results[1]["vs_best"]["difference"] <= high
    assert results[1]["vs_best"]["difference"] <= 0  # the best has the highest mean

    # The gate reads validation's metrics: anything measured on test leaves it unmoved.
    body = {
        "metrics": {"validation/bits_per_token": 2.0, "validation/prompt_following": 0.7},
        "key": {"data_digest": "d", "evaluator": "e"},
    }
    worse_on_test = {**body, "metrics": {**body["metrics"], "test/bits_per_token": 9.9,
                                         "test/prompt_following": 0.0}}  # fmt: skip
    rules = setup["config"].registry
    first, second = decide(body, body, rules), decide(worse_on_test, body, rules)
    assert first.to_dict() == second.to_dict()
