"""The local runner: step cache keys, the console's lines, a failing step's report."""

import ast
import json
import os
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from parti_ops.components import STEP_SECTIONS, progress
from parti_ops.model.config import SECTIONS as CONFIG_SECTIONS
from parti_ops.model.config import Config
from parti_ops.pipelines.cli import app
from parti_ops.pipelines.local import LAYERS, RunConsole, code_digest, summarize

COMPONENTS = Path(__file__).resolve().parents[2] / "components"
SECTIONS = set(CONFIG_SECTIONS)  # `name` and `work_dir` come to every step


def test_a_step_receives_only_its_config_sections():
    config = Config.from_name("tiny")
    for field, value, rerun in (
        ("train.steps", 7, {"train", "evaluate"}),
        ("serve.instances", 3, {"export"}),
        ("image_tokenizer.steps", 11, {"image_tokenizer", "encode", "train", "evaluate"}),
        ("tracking.experiment", "study", set(STEP_SECTIONS) - {"fid_reference"}),
    ):
        changed = config.merge({field: value})
        differs = {
            step
            for step, sections in STEP_SECTIONS.items()
            if config.sections_json(sections) != changed.sections_json(sections)
        }
        assert differs == rerun, field


def test_a_step_reading_a_section_it_was_not_given_fails_loudly():
    step = Config.from_json(Config.from_name("tiny").sections_json(STEP_SECTIONS["export"]))
    assert step.serve.instances == 2 and step.name == "tiny"
    with pytest.raises(RuntimeError, match="not given the 'train' section"):
        _ = step.train.steps
    assert Config.from_json(step.to_json()).to_json() == step.to_json()


def test_the_config_step_has_one_output_per_step():
    from parti_ops.components.kfp_components import config_op

    outputs = config_op.component_spec.outputs
    assert list(outputs) == list(STEP_SECTIONS)
    assert config_op.python_func(Config.from_name("tiny").to_json()).train == (
        Config.from_name("tiny").sections_json(STEP_SECTIONS["train"])
    )


# The code each cached step runs, for the check below: (module, function or None: all of it).
STEP_CODE = {
    "ingest": [("synth", None), ("ingest", None)],
    "validate": [("validate", None)],
    "text_tokenizer": [("tokenizers", "text_tokenizer_step")],
    "image_tokenizer": [("tokenizers", "image_tokenizer_step")],
    "encode": [("encode", None)],
    "train": [("train_decoder", None)],
    "scorer": [("train_scorer", None)],
    "fid_reference": [("kfp_components", "fid_reference_op")],
    "evaluate": [("evaluate", None)],
    "export": [("export", None)],
}


def _sections_read(module: str, function: str | None) -> set[str]:
    tree = ast.parse((COMPONENTS / f"{module}.py").read_text())
    if function is not None:
        tree = next(n for n in ast.walk(tree) if getattr(n, "name", None) == function)
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "config"
        and node.attr in SECTIONS
    }


@pytest.mark.parametrize("task", sorted(STEP_CODE))
def test_every_config_section_a_step_reads_is_in_its_cache_key(task):
    read = set().union(*(_sections_read(m, f) for m, f in STEP_CODE[task]))
    assert read, f"{task}: the check found no config reads; is STEP_CODE stale?"
    assert read <= set(STEP_SECTIONS[task]), (task, read - set(STEP_SECTIONS[task]))


def _artifact(**metadata):
    return SimpleNamespace(metadata=metadata, uri="/runs/r1/x")


def test_each_step_line_carries_its_figure(tmp_path):
    assert summarize("ingest-op", {"canonical": _artifact(rows=20000.0)}) == "20,000 rows"
    validated = {"metrics": _artifact(accepted=19996.0, quarantined=4.0)}
    assert summarize("validate-op", validated) == "19,996 accepted, 4 quarantined"
    tokenizer = {"metrics": _artifact(psnr=31.234, codebook_usage=0.953)}
    assert summarize("image-tokenizer-op", tokenizer) == "PSNR 31.2 dB, codebook usage 95.3 %"
    evaluation = {"metrics": _artifact(**{"validation/prompt_following": 0.81,
                                          "validation/exact": 0.875})}  # fmt: skip
    shown = summarize("evaluate-op", evaluation)
    assert shown == "prompt following 0.810 · exact 87.5 % (validation)"
    references = {"references": _artifact(file="fid-abc.dir-0123-validation-600.safetensors")}
    assert summarize("fid-reference-op", references) == "FID statistics of 600 validation images"
    decision = {"decision": _artifact(version="3", promoted=False, outcome="reject")}
    assert summarize("register-op", decision) == "version 3 not promoted (reject)"
    smoke = tmp_path / "smoke"
    smoke.mkdir()
    (smoke / "smoke.json").write_text(json.dumps({"endpoints": {"http": "http://127.0.0.1:8000"}}))
    served = {"metrics": _artifact(latency_s=0.1204), "smoke": SimpleNamespace(uri=str(smoke))}
    assert summarize("smoke-test-op", served) == (
        "served at http://127.0.0.1:8000/v2/models/parti, 120 ms"
    )
    assert summarize("ingest-op", {}) == ""  # a figure that is missing is left out


def test_the_console_keeps_step_output_in_the_log_and_tells_steps_apart(tmp_path):
    out = StringIO()
    run_console = RunConsole(Console(file=out, width=200), tmp_path / "run.log")
    with run_console.running():
        run_console.started("ingest-op")
        print("12:00:00.000 - INFO - Executing task 'ingest-op'")
        print(f"{progress.PROGRESS_PREFIX} ingest 5/10")
        print("    [KFP Executor] ingested 10 rows")
        run_console.finished("ingest-op", {"canonical": _artifact(rows=10)}, True, 1.25, False)
        run_console.started("validate-op")
        for i in range(30):
            print(f"validate line {i}")
        print("validation failed: 10 of 10 rows quarantined")
        run_console.finished("validate-op", {}, False, 2.0, False)
    log = (tmp_path / "run.log").read_text()
    assert "ingested 10 rows" in log and "validate line 29" in log
    assert progress.PROGRESS_PREFIX not in log  # progress lines only drive the bar
    shown = out.getvalue()
    assert "✓ ingest" in shown and "1.2 s" in shown and "10 rows" in shown
    assert "✗ validate" in shown and "failed after 2.0 s" in shown
    assert "validate line" not in shown  # the step's output is not on the console
    assert run_console.failed == "validate"
    assert len(run_console.failed_tail) == 20
    assert run_console.failed_tail[-1] == "validation failed: 10 of 10 rows quarantined"


def test_progress_lines_under_the_local_runner(monkeypatch, capsys):
    monkeypatch.setenv(progress.LINES_ENV, "1")
    with progress.progress_bar("image tokenizer") as update:
        update(1, 10)
        update(2, 10)  # within the interval: not printed
        update(10, 10)  # the last one always is
    lines = capsys.readouterr().out.splitlines()
    assert [progress.parse_progress(line) for line in lines] == [
        ("image tokenizer", 1, 10),
        ("image tokenizer", 10, 10),
    ]
    assert progress.parse_progress("an ordinary log line") is None


def test_a_failing_step_prints_its_name_its_log_and_no_runner_traceback(tmp_path):
    source = tmp_path / "bad"
    source.mkdir()
    lines = [{"file_name": f"{i}.png", "text": "a missing image"} for i in range(20)]
    (source / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    work = tmp_path / "work"
    result = CliRunner().invoke(
        app, ["run", "--source", str(source), "--preset", "quick", "--set", f"work_dir={work}"]
    )
    assert result.exit_code == 1
    assert "step validate failed" in result.output
    (log,) = (work / "kfp" / "logs").glob("*.log")
    assert f"full log: {log}" in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    assert "executor_input" not in result.output  # kfp's dumps stay in the log
    assert "executor_input" in log.read_text()
    assert os.environ.get(progress.LINES_ENV) is None  # the run leaves the environment as it was


def test_the_code_digest_counts_the_package_source_and_nothing_beside_it(tmp_path):
    """In a checkout the run outputs (a Triton repository's model.py) and the venv lie
    beside the package: a second `make run` must find the first one's cache."""
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "a.py").write_text(f"# {layer}\n")
    first = code_digest(tmp_path)
    served = tmp_path / "outputs" / "kfp" / "run" / "export-op" / "repository" / "parti" / "1"
    served.mkdir(parents=True)
    (served / "model.py").write_text("class TritonPythonModel: ...\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "site.py").write_text("x = 1\n")
    assert code_digest(tmp_path) == first
    (tmp_path / "deploy" / "a.py").write_text("# edited\n")
    assert code_digest(tmp_path) != first
    assert code_digest() == code_digest(Path(__file__).resolve().parents[2])  # this checkout
