"""The pipeline: the committed YAML is what the code compiles to, and kfp.local runs it."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from parti_ops.components.versioning import dvc_md5
from parti_ops.deploy.triton import served_version
from parti_ops.model.config import Config
from parti_ops.pipelines.local import StepFailed
from parti_ops.pipelines.pipeline import COMPILED, compile_pipeline, run_local


def test_committed_pipeline_yaml_matches_the_code(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == COMPILED.read_text(), "run `make compile` and commit the YAML"


def _runs(config: Config) -> dict[str, object]:
    client = MlflowClient(config.mlflow_tracking_uri())
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def test_local_run_writes_artifacts_and_nested_mlflow_runs(tmp_path):
    config = Config.load("quick", overrides={"work_dir": str(tmp_path)})
    result = run_local(config)

    manifest = json.loads((result.canonical / "manifest.json").read_text())
    report = json.loads((result.report.parent / "report.json").read_text())
    assert manifest["rows"] == 200
    assert report["passed"] and report["accepted"] + report["quarantined"] == 200
    assert report["splits"] == {"test": 20, "train": 170, "validation": 10}
    assert (result.accepted / "manifest.json").exists()
    assert result.quarantine.exists() and result.data_docs.exists()
    assert "Data validation passed" in result.report.read_text()

    runs = _runs(config)
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED"
    steps = ("synth", "ingest", "validate", "text-tokenizer", "image-tokenizer", "encode", "train",
             "scorer", "evaluate", "register", "export", "smoke-test")  # fmt: skip
    for step in steps:
        assert runs[step].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[step].info.status == "FINISHED"
    digest = dvc_md5(result.run_dir / "ingest-op" / "raw")
    assert parent.data.tags["data.digest"] == digest == manifest["data_digest"]
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == [digest]
    assert parent.data.params["data.num_images"] == "200"
    assert parent.data.tags["version.mlflow"]
    assert runs["validate"].data.metrics["accepted"] == 200

    encoded = json.loads((result.encoded / "manifest.json").read_text())
    assert encoded["rows"] == 200 and encoded["data_digest"] == digest
    assert encoded["grid"] == [16, 16]
    assert (result.text_tokenizer / "tokenizer.json").exists()
    assert (
        encoded["image_tokenizer"]["digest"]
        == (runs["image-tokenizer"].data.tags["image_tokenizer.digest"])
    )
    assert (result.image_tokenizer / "reconstructions.png").exists()
    html = next(result.run_dir.glob("image-tokenizer-op/reconstructions*"))
    assert "data:image/png;base64," in html.read_text()
    trained = json.loads((result.model / "training_report.json").read_text())
    assert [h["step"] for h in trained["history"]] == [3]
    assert (result.model / "parti" / "model.safetensors").exists()
    assert runs["train"].data.metrics["test_bits_per_token"] == trained["test_bits_per_token"]

    evaluation = json.loads((result.evaluation / "evaluation.json").read_text())
    assert evaluation["key"]["data_digest"] == digest
    assert evaluation["key"]["feature_model"] == runs["scorer"].data.tags["scorer.version"]
    assert runs["evaluate"].data.metrics["fidelity"] == evaluation["metrics"]["fidelity"]
    (references,) = result.run_dir.glob("fid-reference-op/references/fid-*.safetensors")
    assert evaluation["fid_reference"] == references.name

    # The first model ever, above the floors: registered and made champion.
    assert "version 1" in result.decision.read_text()
    client = MlflowClient(config.mlflow_tracking_uri())
    champion = client.get_model_version_by_alias(config.registry.model_name, "champion")
    assert str(champion.version) == "1" and champion.tags["data_digest"] == digest

    # The champion is exported, parity-checked, and served as version 1 of the repository.
    assert served_version(result.repository, config.serve) == 1
    exported = json.loads((result.repository / "parti" / "1" / "export.json").read_text())
    assert exported["parity"]["greedy_sequence_agreement"] == 1.0
    assert runs["export"].data.metrics["export.greedy_sequence_agreement"] == 1.0
    smoke = json.loads((result.smoke / "smoke.json").read_text())
    assert smoke["image_shape"] == [64, 64, 3] and smoke["tokens"] == 256
    assert smoke["endpoints"]["http"].startswith("http://127.0.0.1:")
    assert (result.smoke / "smoke.png").stat().st_size > 0
    assert set(smoke["checks"]) >= {"background", "exact"}
    assert result.cached == ()  # a fresh work_dir: nothing to reuse

    # Again with the same inputs: every cached step is reused, the same weights are not
    # registered twice, and the champion's export is the earlier run's.
    again = run_local(config)
    assert set(again.cached) == CACHED_STEPS
    assert again.model == result.model and again.repository == result.repository
    decision = again.decision.read_text()
    assert "version 1" in decision and "**unchanged**" in decision
    versions = client.search_model_versions(f"name = '{config.registry.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert json.loads((again.smoke / "smoke.json").read_text())["tokens"] == 256

    # One training field changed: the config step, training and what reads its model run
    # again; the data, tokenizers, encoding and scorer come from the cache.
    changed = run_local(config.merge({"train.steps": 4}))
    rerun = {"config-op", "train-op", "evaluate-op", "export-op"}
    assert set(changed.cached) >= CACHED_STEPS - rerun
    assert not {"train-op", "evaluate-op"} & set(changed.cached)
    assert (
        json.loads((changed.model / "training_report.json").read_text())["history"][-1]["step"] == 4
    )


# Every step kfp may take from its cache.
CACHED_STEPS = {
    "config-op", "ingest-op", "validate-op", "text-tokenizer-op", "image-tokenizer-op",
    "encode-op", "train-op", "scorer-op", "fid-reference-op", "evaluate-op", "export-op",
}  # fmt: skip


def test_the_training_step_asks_for_gpus_when_configured(tmp_path):
    config = Config.load(
        "tiny", overrides={"train.accelerator": "NVIDIA_TESLA_T4", "train.nproc": 2}
    )
    spec = compile_pipeline(tmp_path / "gpu.yaml", config).read_text()
    resources = spec.split("exec-train-op:")[1]
    assert "resourceType: NVIDIA_TESLA_T4" in resources and "resourceCount: '2'" in resources
    assert "resourceType" not in COMPILED.read_text()  # the tiny preset runs on CPU


def _compiled(path: Path) -> tuple[dict, dict]:
    """The pipeline spec and the Kubernetes platform spec of a compiled pipeline."""
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_cached_steps_take_only_inputs_that_stay_the_same_from_run_to_run():
    spec, executors = _compiled(COMPILED)
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    cached = {name for name, task in tasks.items() if task["cachingOptions"].get("enableCache")}
    assert cached == CACHED_STEPS
    assert "start-run-op" not in cached and "register-op" not in cached
    # Ingest's data digest is the output of the digest step, which is never cached.
    assert "data-digest-op" not in cached
    digest = {
        "taskOutputParameter": {"producerTask": "data-digest-op", "outputParameterKey": "Output"}
    }
    for name in cached:
        for key, value in tasks[name]["inputs"].get("parameters", {}).items():
            # Only the pipeline parameters that name the config and the data, the config
            # step's sections for this step, and the data's digest from the digest step;
            # never the run's id, name or code version, nor the parent run's id.
            if (name, key) == ("ingest-op", "data_digest"):
                assert value == digest
                continue
            if (name, key) == ("export-op", "champion"):  # the version the gate left
                assert value["taskOutputParameter"]["producerTask"] == "register-op"
                continue
            if key == "config_json" and name != "config-op":  # only its own sections
                step = name.removesuffix("-op").replace("-", "_")
                assert value == {
                    "taskOutputParameter": {"producerTask": "config-op", "outputParameterKey": step}
                }, name
                continue
            assert value == {"componentInputParameter": f"pipelinechannel--{key}"}, (name, key)
            assert key in {"config_json", "source"}, (name, key)
    # Every step, the exit handler too, finds the kfp run id in its environment.
    for task in [*tasks.values(), spec["root"]["dag"]["tasks"]["end-run-op"]]:
        executor = executors[task["componentRef"]["name"].replace("comp-", "exec-", 1)]
        assert executor["fieldPathAsEnv"] == [
            {"name": "PARTI_PIPELINE_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"}
        ]


def test_with_several_nodes_the_train_step_mounts_the_shared_volume_and_asks_no_gpu(tmp_path):
    config = Config.load(
        "tiny",
        overrides={"train.accelerator": "NVIDIA_H100_80GB", "train.nodes": 2, "train.nproc": 8,
                   "train.batch_size": 64},
    )  # fmt: skip
    path = compile_pipeline(tmp_path / "nodes.yaml", config)
    spec, executors = _compiled(path)
    train = spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]
    assert "accelerator" not in train["resources"]  # the job's pods have the GPUs
    assert executors["exec-train-op"]["pvcMount"] == [
        {"constant": "parti-train-shared", "mountPath": "/shared",
         "pvcNameParameter": {"runtimeValue": {"constant": "parti-train-shared"}}}
    ]  # fmt: skip


def test_failed_validation_fails_the_run_and_marks_mlflow_failed(tmp_path):
    source = tmp_path / "bad"
    source.mkdir()
    lines = [{"file_name": f"{i}.png", "text": "a missing image"} for i in range(20)]
    (source / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    config = Config.load("tiny", overrides={"work_dir": str(tmp_path / "work")})

    with pytest.raises(StepFailed, match="step validate failed") as failed:
        run_local(config, source)
    assert failed.value.step == "validate" and failed.value.log_path.is_file()
    assert 0 < len(failed.value.tail) <= 20
    assert any("quarantine" in line for line in failed.value.tail), failed.value.tail

    runs = _runs(config)
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"  # closed by the exit handler
    assert runs["validate"].info.status == "FAILED"
    assert runs["validate"].data.metrics["quarantined"] == 20
    (report,) = Path(config.work_dir).glob("kfp/*/validate-op/validated/report.json")
    assert json.loads(report.read_text())["reasons"] == {"unreadable": 20}
