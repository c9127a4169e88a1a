"""Model registration, the promotion gate, rollback: on a real MLflow SQLite store."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from parti_ops.components.loaders import read_encoded_manifest
from parti_ops.components.register import bundle_lineage, register_step
from parti_ops.components.registry import (
    CHALLENGER,
    CHAMPION,
    DECISION_JSON,
    DECISION_MD,
    FOLLOWING,
    PREVIOUS,
    RegistryError,
    decide,
    download_bundle,
    load_evaluation,
    promote,
)
from parti_ops.model.config import Config, ConfigError, RegistryConfig

KEY = {"data_digest": "heldout-1", "evaluator": "oracle+scorer-1", "feature_model": "scorer-1"}


def evaluation(fidelity, bits, fid=50.0, key=KEY, following=0.8, **more) -> dict:
    """An evaluation with the gate's validation metrics; `fidelity` None: data without scenes."""
    metrics = {
        "validation/exact": fidelity,
        "validation/bits_per_token": bits,
        "validation/prompt_following": following,
        "fid": fid,
        **more,
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return {"metrics": {"clip_score": 0.25, **metrics}, "key": dict(key)}


def with_prompts(body: dict, **per_prompt: list[float]) -> dict:
    """`body` with per-prompt values (metric → list) and the mean of each as its metric."""
    values = {name.replace("__", "/"): v for name, v in per_prompt.items()}
    metrics = {**body["metrics"], **{k: float(np.mean(v)) for k, v in values.items()}}
    return {**body, "metrics": metrics, "per_prompt": values}


def write_evaluation(folder: Path, body: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(body))
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One work_dir (MLflow store) for the module; each test registers its own model name."""
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def bundle(train_bundle, store) -> Path:
    out = store / "bundle"
    train_bundle(out)
    return out


@pytest.fixture(scope="module")
def config_for(store, small):
    """`config_for(name, **overrides)`: the small config on the module's store, model `name`."""

    def make(name: str, **overrides) -> Config:
        base = {**small, "work_dir": str(store), "registry.model_name": name}
        return Config.load("tiny", overrides={**base, **overrides})

    return make


def register(config, bundle, inputs, tmp_path, tag, body, reevaluate=None) -> dict:
    evaluated = write_evaluation(tmp_path / f"eval-{tag}", body)
    return register_step(
        config, "", str(bundle), str(evaluated), str(inputs["encoded"]),
        str(tmp_path / f"gate-{tag}"), reevaluate=reevaluate,
    )  # fmt: skip


def aliases(config) -> dict[str, str]:
    client = MlflowClient(config.mlflow_tracking_uri())
    found = client.get_registered_model(config.registry.model_name).aliases
    return {alias: str(version) for alias, version in found.items()}


def version_tags(config, version) -> dict[str, str]:
    client = MlflowClient(config.mlflow_tracking_uri())
    return client.get_model_version(config.registry.model_name, version).tags


# The gate as a pure function.


def test_first_model_is_judged_by_the_floors_only():
    rules = RegistryConfig(min_fidelity=0.2, max_bits_per_token=3.0)
    assert decide(evaluation(0.3, 2.0), None, rules).promoted
    low = decide(evaluation(0.1, 2.0), None, rules)
    assert low.outcome == "reject" and low.failed_rules == ["min_fidelity"]
    assert "min_fidelity (validation/exact 0.1: validation/exact not >= 0.2)" in low.reason
    diverged = decide(evaluation(0.3, math.nan), None, rules)
    assert diverged.failed_rules == ["max_bits_per_token"]  # NaN never passes


def test_each_rule_against_the_champion():
    rules = RegistryConfig(max_fidelity_drop=0.02, max_nll_rise=0.05, max_fid_rise=0.1)
    champion = evaluation(0.50, 2.00, fid=40.0)
    within = decide(evaluation(0.49, 2.04, fid=43.9), champion, rules)
    assert within.promoted, within.reason
    worse = decide(evaluation(0.47, 2.06, fid=44.1), champion, rules)
    assert worse.failed_rules == ["max_fidelity_drop", "max_nll_rise", "max_fid_rise"]
    by_name = {rule.name: rule for rule in worse.rules}
    assert by_name["max_fid_rise"].limit == pytest.approx(44.0)  # relative: 40 * 1.1
    assert by_name["max_nll_rise"].champion == 2.0
    no_fid = decide(evaluation(0.5, 2.0, fid=None), champion, rules)
    assert no_fid.promoted
    assert {r.name: r.status for r in no_fid.rules}["max_fid_rise"] == "not applied"
    assert "max_fid_rise" in no_fid.not_applied and "not applied: max_fid_rise" in no_fid.reason


def test_bits_of_another_image_tokenizer_are_not_compared():
    rules = RegistryConfig(max_nll_rise=0.02)
    champion = {**evaluation(0.80, 0.40), "image_tokenizer": "nearest-codes"}
    same = decide({**evaluation(0.85, 0.45), "image_tokenizer": "nearest-codes"}, champion, rules)
    assert same.failed_rules == ["max_nll_rise"]
    other = decide({**evaluation(0.85, 0.45), "image_tokenizer": "refined-codes"}, champion, rules)
    assert other.promoted, other.reason
    assert "other image tokenizer" in {r.name: r.note for r in other.rules}["max_nll_rise"]
    worse = decide({**evaluation(0.70, 0.45), "image_tokenizer": "refined-codes"}, champion, rules)
    assert worse.failed_rules == ["max_fidelity_drop"]  # the other rules still apply


def test_data_without_scenes_is_judged_without_the_oracle_and_says_so():
    rules = RegistryConfig(min_fidelity=0.5)
    first = decide(evaluation(None, 2.0), None, rules)
    assert first.promoted, first.reason
    rule = {r.name: r for r in first.rules}["min_fidelity"]
    assert rule.status == "not applied" and rule.value is None and rule.passed
    assert first.not_applied == ["min_fidelity"] and "not applied: min_fidelity" in first.reason
    told = {**evaluation(None, 2.0), "not_computed": {"validation/exact": "no scenes here"}}
    assert (
        "no scenes here"
        in {r.name: r.note for r in decide(told, None, rules).rules}["min_fidelity"]
    )
    against = decide(evaluation(None, 2.0), evaluation(None, 2.0), rules)
    assert against.promoted and set(against.not_applied) == {"min_fidelity", "max_fidelity_drop"}


def test_prompt_following_floor_is_judged_by_its_interval():
    rules = RegistryConfig(min_prompt_following=0.5)
    sure = {**evaluation(None, 2.0, following=0.6), "intervals": {FOLLOWING: (0.55, 0.65)}}
    assert decide(sure, None, rules).promoted
    unsure = {**evaluation(None, 2.0, following=0.6), "intervals": {FOLLOWING: (0.45, 0.75)}}
    decision = decide(unsure, None, rules)
    assert decision.failed_rules == ["min_prompt_following"]
    assert "validation/prompt_following 0.6, interval [0.45, 0.75]" in decision.reason


def test_against_the_champion_noise_does_not_flip_the_decision_a_real_loss_does():
    rng = np.random.default_rng(0)
    rules = RegistryConfig(
        max_nll_rise=0.02, max_prompt_following_drop=0.02, min_prompt_following=0
    )
    bits = rng.normal(2.0, 0.3, 200)
    follow = rng.uniform(0.3, 1.0, 200)
    champion = with_prompts(evaluation(None, 0), validation__bits_per_token=list(bits),
                            validation__prompt_following=list(follow))  # fmt: skip
    # Each prompt's score moves by noise alone: the points may differ by more than the
    # margins, the paired intervals reach back inside them.
    noisy = with_prompts(
        evaluation(None, 0),
        validation__bits_per_token=list(bits + rng.normal(0.03, 0.4, 200)),
        validation__prompt_following=list(follow + rng.normal(-0.03, 0.3, 200)),
    )
    kept = decide(noisy, champion, rules)
    assert kept.promoted, kept.reason
    by_name = {r.name: r for r in kept.rules}
    assert by_name["max_nll_rise"].interval[0] < 0.02 < by_name["max_nll_rise"].interval[1]
    worse = with_prompts(
        evaluation(None, 0),
        validation__bits_per_token=list(bits + 0.5),
        validation__prompt_following=list(follow * 0.5),
    )
    refused = decide(worse, champion, rules)
    assert refused.failed_rules == ["max_prompt_following_drop", "max_nll_rise"]
    assert "max_nll_rise (validation/bits_per_token" in refused.reason
    assert "interval [0.5, 0.5]: difference not <= 0.02" in refused.reason
    # Without the champion's per-prompt values the points are compared, and the rule says so.
    plain = decide(worse, evaluation(None, float(bits.mean())), rules)
    assert "point values compared" in {r.name: r.note for r in plain.rules}["max_nll_rise"]
    assert "max_nll_rise" in plain.failed_rules


def test_other_held_out_data_is_refused_not_compared():
    other = evaluation(0.9, 1.0, key={**KEY, "data_digest": "heldout-2"})
    decision = decide(evaluation(0.1, 5.0), other, RegistryConfig())
    assert decision.outcome == "refuse" and not decision.promoted
    assert "champion evaluated on other data/evaluator" in decision.reason
    assert "heldout-2" in decision.reason


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"key": KEY}, "missing field 'metrics'"),
        ({"metrics": {"fidelity": 0.1}, "key": KEY}, "missing field metrics.validation/bits"),
        (evaluation(0.1, 2.0, key={"data_digest": "d"}), "missing field key.evaluator"),
        (evaluation("high", 2.0), "metrics.validation/exact='high' is not a number"),
        ({**evaluation(0.1, 2.0), "intervals": {"fid": [1]}}, "intervals.fid=.1. is not"),
    ],
)
def test_a_malformed_evaluation_names_the_file_and_field(tmp_path, body, message):
    write_evaluation(tmp_path, body)
    with pytest.raises(RegistryError, match=message) as caught:
        load_evaluation(tmp_path)
    assert str(tmp_path / "evaluation.json") in str(caught.value)
    with pytest.raises(RegistryError, match="no readable evaluation"):
        load_evaluation(tmp_path / "absent")


def test_registry_rules_are_validated():
    with pytest.raises(ConfigError, match="registry.max_fid_rise=-0.1"):
        Config.load("tiny", overrides={"registry.max_fid_rise": -0.1})
    with pytest.raises(ConfigError, match="registry.min_fidelity"):
        Config.load("tiny", overrides={"registry.min_fidelity": 2})


def test_a_bundle_from_other_data_is_not_registered(bundle, inputs, tmp_path):
    manifest = read_encoded_manifest(inputs["encoded"])
    assert bundle_lineage(bundle, manifest)["data_digest"] == manifest["data_digest"]
    other = tmp_path / "bundle"
    shutil.copytree(bundle, other, ignore=shutil.ignore_patterns("checkpoints"))
    (other / "text_tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(RegistryError, match="not the text tokenizer the encoded data"):
        bundle_lineage(other, manifest)


# Registration and the gate on a real store.


def test_gate_promotes_a_better_challenger_and_refuses_a_worse_one(
    config_for, bundle, inputs, tmp_path
):
    config = config_for("parti")
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    first = register(config, bundle, inputs, tmp_path, "v1", evaluation(0.30, 1.90))
    assert first["promoted"] and first["champion"] is None
    assert aliases(config) == {CHALLENGER: "1", CHAMPION: "1"}
    # The step points MLflow's fluent API at the store for the model only, then back.
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before

    worse = register(config, bundle, inputs, tmp_path, "v2", evaluation(0.10, 2.50, fid=80.0))
    assert worse["promoted"] is False and worse["outcome"] == "reject"
    assert worse["failed_rules"] == ["max_fidelity_drop", "max_nll_rise", "max_fid_rise"]
    assert aliases(config) == {CHALLENGER: "2", CHAMPION: "1"}  # champion untouched
    assert version_tags(config, "2")["gate.decision"] == "reject"
    assert version_tags(config, "2")["gate.failed_rules"] == ",".join(worse["failed_rules"])
    written = json.loads((tmp_path / "gate-v2" / DECISION_JSON).read_text())
    assert written["failed_rules"] == worse["failed_rules"]
    assert {r["name"]: r["champion"] for r in written["rules"]}["max_fidelity_drop"] == 0.30
    assert "**FAIL**" in (tmp_path / "gate-v2" / DECISION_MD).read_text()

    better = register(config, bundle, inputs, tmp_path, "v3", evaluation(0.35, 1.85, fid=45.0))
    assert better["promoted"] and better["champion"]["version"] == "1"
    assert aliases(config) == {CHALLENGER: "3", CHAMPION: "3", PREVIOUS: "1"}

    # Lineage on the version and on its run.
    manifest = read_encoded_manifest(inputs["encoded"])
    tags = version_tags(config, "3")
    assert tags["data_digest"] == manifest["data_digest"]
    assert tags["text_tokenizer.digest"] == manifest["text_tokenizer"]["digest"]
    assert tags["image_tokenizer.digest"] == manifest["image_tokenizer"]["digest"]
    assert tags["scorer.version"] == KEY["feature_model"] and tags["preset"] == "tiny"
    assert float(tags["metric.validation/exact"]) == 0.35 and tags["git_sha"]
    client = MlflowClient(config.mlflow_tracking_uri())
    run = client.get_run(client.get_model_version("parti", "3").run_id)
    assert run.data.metrics["validation/bits_per_token"] == 1.85
    assert run.inputs.dataset_inputs[0].dataset.digest == manifest["data_digest"]
    assert run.data.tags["gate.decision"] == "promote"

    # The registered artifact is the model folders and the report, no checkpoints.
    registered = download_bundle(client, config, "3", tmp_path / "download")
    assert sorted(p.name for p in registered.iterdir()) == [
        "image_tokenizer", "parti", "text_tokenizer", "training_report.json",
    ]  # fmt: skip


def test_the_champion_loads_and_draws_uint8_images(
    config_for, bundle, inputs, tmp_path, monkeypatch
):
    import mlflow
    import pandas as pd

    config = config_for("parti")
    if CHAMPION not in aliases(config):  # when run on its own
        register(config, bundle, inputs, tmp_path, "v1", evaluation(0.3, 1.9))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.mlflow_tracking_uri())
    model = mlflow.pyfunc.load_model("models:/parti@champion")
    images = model.predict(["a red circle on the left"])
    assert isinstance(images, np.ndarray)
    assert images.dtype == np.uint8 and images.shape == (1, 32, 32, 3)
    table = model.predict(pd.DataFrame({"prompt": ["a red circle on the left", "a blue square"]}))
    assert table.shape == (2, 32, 32, 3)
    again = model.predict(["a red circle on the left"], params={"seed": 7})
    np.testing.assert_array_equal(
        again, model.predict(np.array(["a red circle on the left"]), params={"seed": 7})
    )  # same seed, same image
    outputs = model.metadata.get_output_schema().inputs[0]
    assert outputs.type == np.dtype("uint8") and outputs.shape == (-1, 32, 32, 3)


def test_a_first_model_below_the_floor_is_not_champion(config_for, bundle, inputs, tmp_path):
    config = config_for("floor", **{"registry.min_fidelity": 0.5})
    report = register(config, bundle, inputs, tmp_path, "v1", evaluation(0.1, 1.9))
    assert report["outcome"] == "reject" and report["failed_rules"] == ["min_fidelity"]
    assert aliases(config) == {CHALLENGER: "1"}
    assert report["champion_after"] is None


def test_a_champion_evaluated_elsewhere_is_rescored_or_refused(
    config_for, bundle, inputs, tmp_path
):
    config = config_for("keys")
    register(config, bundle, inputs, tmp_path, "v1", evaluation(0.9, 1.0))
    moved = {"data_digest": "heldout-2", "evaluator": "oracle+scorer-2"}

    refused = register(config, bundle, inputs, tmp_path, "v2", evaluation(0.3, 1.9, key=moved))
    assert refused["outcome"] == "refuse" and not refused["promoted"]
    assert "champion evaluated on other data/evaluator" in refused["reason"]
    assert aliases(config)[CHAMPION] == "1"
    assert version_tags(config, "2")["gate.decision"] == "refuse"

    seen: list[Path] = []

    def reevaluate(folder: Path) -> dict:
        from parti_ops.model.generate import TextToImage

        seen.append(folder)
        TextToImage.load(folder)  # a loadable bundle, as the evaluator gets it
        return evaluation(0.25, 2.0, key=moved)  # on the new data the champion does worse

    rescored = register(
        config, bundle, inputs, tmp_path, "v3", evaluation(0.3, 1.9, key=moved), reevaluate
    )
    assert len(seen) == 1
    assert rescored["promoted"], rescored["reason"]
    assert rescored["champion"]["reevaluated"] and rescored["champion"]["version"] == "1"
    assert rescored["champion"]["metrics"]["validation/exact"] == 0.25
    # The same bundle with the same evaluation as version 2: version 2 is decided on again
    # (now promoted), not registered a third time.
    assert aliases(config)[CHAMPION] == "2" and aliases(config)[PREVIOUS] == "1"
    assert version_tags(config, "2")["gate.decision"] == "promote"
    assert rescored["version"] == "2"


# People's commands, through the console entry point.


def cli(store: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "parti_ops.pipelines.cli", "registry", *args,
         "--set", f"work_dir={store}", "--set", f"registry.model_name={name}"],
        capture_output=True, text=True, env=env, cwd=store, timeout=120,
    )  # fmt: skip


def test_status_promote_and_rollback_commands(config_for, store, bundle, inputs, tmp_path):
    config = config_for("people")
    register(config, bundle, inputs, tmp_path, "v1", evaluation(0.30, 1.90))
    register(config, bundle, inputs, tmp_path, "v2", evaluation(0.40, 1.80))
    assert aliases(config) == {CHALLENGER: "2", CHAMPION: "2", PREVIOUS: "1"}

    shown = cli(store, "people", "status")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()[2:]}
    assert "challenger,champion" in rows["2"] and "0.4000" in rows["2"]
    assert "previous-champion" in rows["1"] and "1.9000" in rows["1"]
    digest = read_encoded_manifest(inputs["encoded"])["data_digest"]
    assert digest in rows["1"]

    back = cli(store, "people", "rollback", "--reason", "blurry samples")
    assert back.returncode == 0, back.stderr
    assert aliases(config) == {CHALLENGER: "2", CHAMPION: "1"}
    assert "blurry samples" in version_tags(config, "2")["rolled_back"]
    again = cli(store, "people", "rollback")
    assert again.returncode == 1
    assert "no 'previous-champion' alias" in again.stderr and "Traceback" not in again.stderr

    manual = cli(store, "people", "promote", "--version", "2", "--reason", "fixed", "--by", "ana")
    assert manual.returncode == 0, manual.stderr
    assert aliases(config) == {CHALLENGER: "2", CHAMPION: "2", PREVIOUS: "1"}
    tags = version_tags(config, "2")
    assert tags["promotion.by"] == "ana" and tags["promotion.reason"] == "fixed"
    assert tags["gate.decision"] == "manual"
    client = MlflowClient(config.mlflow_tracking_uri())
    with pytest.raises(RegistryError, match="has no version 9"):
        promote(client, "people", "9", reason="x")
    with pytest.raises(RegistryError, match="already the champion"):
        promote(client, "people", "2", reason="x")


def test_the_same_bundle_and_evaluation_is_not_registered_twice(
    config_for, bundle, inputs, tmp_path
):
    config = config_for("twice")
    first = register(config, bundle, inputs, tmp_path, "a", evaluation(0.9, 1.0))
    again = register(config, bundle, inputs, tmp_path, "b", evaluation(0.9, 1.0))
    assert (first["outcome"], again["outcome"]) == ("promote", "unchanged")
    assert again["version"] == "1" and again["champion_after"] == "1"
    assert version_tags(config, "1")["gate.decision"] == "promote"  # the decision made
    other = register(config, bundle, inputs, tmp_path, "c", evaluation(0.9, 1.1))
    assert other["version"] == "2"  # evaluated otherwise: a version of its own
    client = MlflowClient(config.mlflow_tracking_uri())
    assert len(client.search_model_versions(f"name = '{config.registry.model_name}'")) == 2
