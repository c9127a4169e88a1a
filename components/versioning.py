"""What a run records so it can be traced back: data digest (DVC), git SHA, package versions."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGES = ["parti-ops", "torch", "kfp", "mlflow", "great-expectations", "dvc", "pillow", "pyarrow"]


def dvc_md5(path: str | Path) -> str:
    """The digest DVC gives `path`: `<md5>.dir` for a folder, the file's md5 for a file.

    Computed by DVC's own hashing (a dry run that stores nothing), so it equals the
    `md5` that `dvc add` writes into a `.dvc` file for the same content.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    path = Path(path).resolve()
    if path.is_file():
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


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
