"""The `parti` command: every sub-command has help, errors are one clear line."""

import json

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from parti_ops.components.versioning import dvc_md5
from parti_ops.pipelines.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands write outputs/ (MLflow store) under the cwd


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path
        if hasattr(command, "commands"):
            yield from _commands(command, path)


COMMANDS = sorted(_commands(get_command(app)))


def test_the_command_tree():
    assert {("run",), ("data", "synth"), ("data", "ingest"), ("data", "validate")} <= set(COMMANDS)
    assert {("config", "show"), ("pipeline", "compile")} <= set(COMMANDS)
    tokenizers = {("tokenizer", "text", "train"), ("tokenizer", "image", "train")}
    assert tokenizers | {("tokenizer", "encode")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 4


def test_config_show_applies_overrides():
    result = runner.invoke(app, ["config", "show", "--set", "data.image_size=32"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["data"]["image_size"] == 32
    as_json = runner.invoke(app, ["config", "show", "--preset", "small", "--json"])
    assert json.loads(as_json.output)["name"] == "small"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["config", "show", "--preset", "huge"], "unknown preset 'huge'"),
        (["config", "show", "--set", "data.nope=1"], "unknown config key 'data.nope'"),
        (["data", "ingest", "/nonexistent/data"], "no such file or folder"),
        (["data", "validate", "/nonexistent/canonical"], "no manifest"),
        (["tokenizer", "text", "train", "--data", "/nonexistent/accepted"], "no manifest"),
        (["tokenizer", "image", "train", "--data", "/nonexistent/accepted"], "no manifest"),
        (["tokenizer", "encode", "--data", "/nonexistent/accepted"], "no manifest"),
        (["tokenizer", "image", "train", "--set", "image_tokenizer.downsample=5"], "power of two"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_synth_prints_the_dvc_digest(tmp_path):
    out = tmp_path / "data"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--set", "data.num_images=30"])
    assert result.exit_code == 0, result.output
    assert f"DVC digest: {dvc_md5(out)}" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "validation"]
