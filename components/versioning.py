"""What a run records so it can be traced back: data digest (DVC), git SHA, package versions."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

from parti_ops.model.layout import MODEL_FILES

PACKAGES = ["parti-ops", "torch", "kfp", "mlflow", "great-expectations", "dvc", "pillow", "pyarrow"]


def dvc_md5(path: str | Path) -> str:
    """The digest DVC gives `path`: `<md5>.dir` for a folder, the file's md5 for a file.

    Equal to the `md5` that `dvc add` (DVC 3, `hash: md5`) writes into a `.dvc` file: a
    folder's digest is the md5 of the JSON list of `{"md5", "relpath"}` entries sorted by
    path (dvc_data's `Tree.as_bytes`). It is computed here as a stream, holding only the
    sorted paths, where DVC's own builder holds a tree object per file.
    """
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    relpaths = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    digest = hashlib.md5()
    digest.update(b"[")
    for index, relpath in enumerate(relpaths):
        entry = json.dumps({"md5": _file_md5(path / relpath), "relpath": relpath}, sort_keys=True)
        digest.update(f"{', ' if index else ''}{entry}".encode())
    digest.update(b"]")
    return f"{digest.hexdigest()}.dir"


def _file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def git_sha(repo: str | Path = ".") -> str:
    """The commit of `repo` with `-dirty` when its tree has changes, or "unknown" outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def files_digest(folder: str | Path, names: list[str]) -> str:
    """sha256 over named files of a folder (name, then bytes): the version of a saved model."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        with open(Path(folder) / name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def model_version(folder: str | Path) -> str:
    """A saved model's identity (the scorer's, a VQGAN's): a digest of its weights and config."""
    return files_digest(folder, MODEL_FILES)
