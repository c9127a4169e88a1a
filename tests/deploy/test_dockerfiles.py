"""The Dockerfiles in deploy/docker: lint-clean, pinned, non-root, and small build contexts.

No image is built here (no Docker engine): what can be checked from the files is checked,
and the Triton image's default command is run against a stand-in `tritonserver`.
"""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = ("cpu", "cuda", "mlflow", "triton")
BUILT_FROM_SOURCES = ("cpu", "cuda")  # the images that install the parti-ops package
# Where base images may come from: Docker Hub (python, nvidia/cuda, postgres, ...), GitHub's
# registry (uv) and NVIDIA's NGC (Triton).
TRUSTED_REGISTRIES = ("docker.io", "ghcr.io", "nvcr.io")


def _tool(name: str) -> str:
    """A binary from the dev extra: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    pairs = []
    for entry in logical:
        keyword, _, rest = entry.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first."""
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def dockerfile(name: str) -> Path:
    return DOCKER / f"{name}.Dockerfile"


def test_every_image_has_a_dockerfile_and_nothing_else_is_there():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(
        f"{name}.Dockerfile" for name in IMAGES
    )


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint_finds_nothing(name):
    command = [_tool("hadolint"), "--no-color", "--failure-threshold", "style"]
    for registry in TRUSTED_REGISTRIES:
        command += ["--trusted-registry", registry]
    result = subprocess.run(
        [*command, str(dockerfile(name))], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_base_images_are_pinned_to_a_release(name):
    stage_names: set[str] = set()
    for stage in stages(dockerfile(name)):
        image, *alias = stage[0][1].split()
        if alias:
            stage_names.add(alias[-1])
        if image in stage_names:
            continue
        assert "$" not in image, f"{image}: a base image named by a build argument is unpinned"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and re.match(r"\d+\.\d+", tag), f"{image}: tag is not a release"


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_runs_as_a_numeric_non_root_user(name):
    final = stages(dockerfile(name))[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets no USER, so the image runs as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it without the image's passwd.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]
    last_user = max(i for i, (keyword, _) in enumerate(final) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in final[last_user:]), "RUN after USER"


@pytest.mark.parametrize("name", ("cpu", "cuda", "mlflow"))
def test_the_runtime_stage_copies_from_a_builder(name):
    all_stages = stages(dockerfile(name))
    assert len(all_stages) >= 2
    copies = [rest for keyword, rest in all_stages[-1] if keyword == "COPY"]
    assert any(rest.startswith("--from=builder ") for rest in copies), copies
    assert not any(keyword == "RUN" and "pip install" in rest for keyword, rest in all_stages[-1])


@pytest.mark.parametrize("name", IMAGES)
def test_pip_keeps_no_cache(name):
    for keyword, rest in instructions(dockerfile(name)):
        if keyword == "RUN" and "pip install" in rest:
            for command in re.split(r"&&|;", rest):
                if "pip install" in command:
                    assert "--no-cache-dir" in command, command


def _pinned(requirement: str) -> tuple[str, str]:
    name, _, version = requirement.partition("==")
    return name.lower().replace("_", "-"), version


def _project_pins() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(_pinned(r) for r in pyproject["project"]["dependencies"])


@pytest.mark.parametrize("name", BUILT_FROM_SOURCES)
def test_torch_goes_in_first_at_the_projects_pin_then_the_project_under_constraints(name):
    runs = [rest for keyword, rest in instructions(dockerfile(name)) if keyword == "RUN"]
    torch = next(i for i, rest in enumerate(runs) if "torch==" in rest)
    project = next(i for i, rest in enumerate(runs) if re.search(r"pip install .*\s\.(\s|$)", rest))
    assert torch < project
    assert f"torch=={_project_pins()['torch']}" in runs[torch]
    assert "-c .ci/constraints.txt" in runs[project]
    if name == "cpu":  # the CPU wheel: PyPI's default Linux build is the CUDA one
        assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch]


def test_the_cpu_image_is_the_component_image_with_the_smoke_tests_server():
    from parti_ops.components import COMPONENT_IMAGE

    text = dockerfile("cpu").read_text(encoding="utf-8")
    assert f"-t {COMPONENT_IMAGE} ." in text  # the build command in its header
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    wheel = re.search(r"TRITON_WHEEL := (\S+)", makefile).group(1)
    assert wheel in text, "the image bundles another tritonserver than `make install`"
    assert "-r deploy/serve-requirements.txt" in text


def test_the_serving_image_pins_what_the_triton_model_imports():
    serving = dict(
        _pinned(line)
        for line in (ROOT / "deploy" / "serve-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    runs = " ".join(rest for k, rest in instructions(dockerfile("triton")) if k == "RUN")
    installed = dict(_pinned(token) for token in runs.split() if "==" in token)
    assert installed["numpy"] == serving["numpy"]
    assert installed["tokenizers"] == serving["tokenizers"]
    assert "onnxruntime-gpu" in installed  # the GPU build of serve-requirements' onnxruntime
    assert "torch" not in installed and "parti-ops" not in installed


def _triton_default_command() -> list[str]:
    cmd = [rest for keyword, rest in instructions(dockerfile("triton")) if keyword == "CMD"]
    assert len(cmd) == 1
    return json.loads(cmd[0])


def _run_default_command(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The image's CMD through /bin/sh, with a stand-in tritonserver that records its argv."""
    bin_dir, record = tmp_path / "bin", tmp_path / "argv"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "tritonserver"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n', encoding="utf-8")
    fake.chmod(0o755)
    command = _triton_default_command()
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    subprocess.run(command, env={"PATH": path, **env}, check=True, timeout=30)
    return record.read_text(encoding="utf-8").splitlines()


def _restricted(argv: list[str], flag: str) -> tuple[set[str], str]:
    """The restricted groups of `flag` and the header value they require."""
    (value,) = [a.removeprefix(f"{flag}=") for a in argv if a.startswith(f"{flag}=")]
    groups, _, header = value.partition(":")
    key, _, secret = header.partition("=")
    assert key == "triton-admin-key"
    return set(groups.split(",")), secret


def test_the_serving_images_default_command_serves_and_controls_nothing(tmp_path):
    argv = _run_default_command(tmp_path, {})
    assert "--model-control-mode=none" in argv  # no load/unload through the network
    assert "--model-repository=/models" in argv
    http, http_key = _restricted(argv, "--http-restricted-api")
    grpc, grpc_key = _restricted(argv, "--grpc-restricted-protocol")
    assert {"model-repository", "shared-memory"} <= http and http == grpc
    assert not {"health", "inference", "metadata"} & http
    # Without TRITON_ADMIN_KEY the key is random per start: nobody holds it.
    assert re.fullmatch(r"[0-9a-f]{32}", http_key) and http_key == grpc_key
    assert _restricted(_run_default_command(tmp_path, {}), "--http-restricted-api")[1] != http_key
    given = _run_default_command(tmp_path, {"TRITON_ADMIN_KEY": "s3cret"})
    assert _restricted(given, "--grpc-restricted-protocol")[1] == "s3cret"


def dockerignore(name: str) -> list[str]:
    path = DOCKER / f"{name}.Dockerfile.dockerignore"  # BuildKit's per-Dockerfile name
    assert path.is_file(), f"{path.name} is missing: the build would send the whole tree"
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule for a path relative to the context: the last matching pattern decides.

    A pattern matching a parent folder matches what is inside it. (fnmatch's `*` also
    crosses `/`, unlike Go's filepath.Match; close enough for the patterns used here.)
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            verdict = not negated
    return verdict


@pytest.mark.parametrize("name", IMAGES)
def test_the_build_context_leaves_out_environments_outputs_and_data(name):
    patterns = dockerignore(name)
    for path in (".venv", ".venv/bin/python", "outputs", ".git", "data", ".triton", "mlruns"):
        assert ignored(patterns, path), f"{name}: {path} would be sent to the builder"
    assert ignored(patterns, "model/__pycache__/parti.cpython-311.pyc")


@pytest.mark.parametrize("name", IMAGES)
def test_everything_the_dockerfile_copies_is_in_its_build_context(name):
    patterns = dockerignore(name)
    for keyword, rest in instructions(dockerfile(name)):
        if keyword != "COPY" or rest.startswith("--from="):
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(patterns, source), f"{name}: COPY {source}, but it is ignored"
