"""The layering (pyproject.toml's import-linter contracts) holds, and breaking it is caught."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "components", "pipelines", "deploy")
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(pythonpath or "")}
    return subprocess.run(
        [str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_tree_keeps_every_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "says"),
    [
        ("model/layout.py", "from parti_ops.components import shards", "parti_ops.model.layout"),
        ("deploy/triton.py", "import parti_ops.components.train_decoder", "deploy.triton"),
        ("components/ingest.py", "import parti_ops.pipelines.local", "parti_ops.components.ingest"),
        ("deploy/runtime.py", "import torch", "parti_ops.deploy.runtime -> torch"),
        ("model/parti.py", "import mlflow", "parti_ops.model.parti -> mlflow"),
        ("components/serve.py", "import parti_ops.components.train_decoder", "components.serve"),
    ],
    ids=["model-to-components", "deploy-to-components", "step-to-pipelines",
         "runtime-to-torch", "model-to-mlflow", "step-to-step"],
)  # fmt: skip
def test_an_import_against_the_layering_fails_the_check(tmp_path, module, line, says):
    """A copy of the tree with one deliberate reverse import: the check names it."""
    package = tmp_path / "parti_ops"
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, package / layer, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = package / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}  # noqa\n")
    result = _lint(tmp_path, pythonpath=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and says in result.stdout, result.stdout


def test_the_serving_runtime_imports_without_torch_or_the_package():
    """What Triton loads runs where neither torch nor the rest of parti_ops is installed."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Absent(importlib.abc.MetaPathFinder):
            allowed = {"parti_ops", "parti_ops.deploy", "parti_ops.deploy.runtime"}

            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                if top == "torch" or (top == "parti_ops" and name not in self.allowed):
                    raise ModuleNotFoundError(f"No module named {name!r} (not installed here)")
                return None

        sys.meta_path.insert(0, Absent())
        import parti_ops.deploy.runtime as runtime
        assert runtime.OnnxTextToImage and "torch" not in sys.modules
        print(sorted(m for m in sys.modules if m.startswith("parti_ops")))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(
        ["parti_ops", "parti_ops.deploy", "parti_ops.deploy.runtime"]
    )


def test_building_a_triton_repository_needs_no_torch():
    """The repository, the server and the client load without torch (a serving host's CLI)."""
    script = (
        "import sys\n"
        "import parti_ops.deploy.client, parti_ops.deploy.server, parti_ops.deploy.triton\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_runtime_names_the_graphs_as_the_export_writes_them():
    """deploy/runtime.py restates the graph names (it runs without the package)."""
    from parti_ops.deploy import runtime
    from parti_ops.model.layout import GRAPHS

    assert (runtime.TEXT_ENCODER, runtime.DECODER_STEP, runtime.IMAGE_DECODER) == GRAPHS
