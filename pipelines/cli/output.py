"""What every command shares on the way out: the console, expected errors, paths, images."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from parti_ops.model.errors import PartiError

if TYPE_CHECKING:
    import numpy as np

console = Console(stderr=True)


def clear_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print an expected failure as one red line and exit 1; anything else is a bug and keeps
    its traceback.

    Expected are `PartiError` (each stage's own errors: bad config, data, folders, servers)
    and `OSError`: a file or folder given on the command line that is missing, unreadable or
    not writable, or an address that cannot be reached; its message names which.
    """

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (PartiError, OSError) as err:
            print_error("error:", err)
            raise typer.Exit(1) from None

    return wrapper


def print_error(label: str, err: Exception) -> None:
    """`label` in red, then the message as it is: log lines and paths are not rich markup."""
    console.print(f"[red]{label}[/red]", end=" ")
    console.print(str(err), markup=False, highlight=False, soft_wrap=True)


def print_paths(title: str, paths: dict[str, Any]) -> None:
    """`title`, then one aligned `name  value` line per entry, on stdout."""
    print(title)
    width = max(len(k) for k in paths)
    for key, value in paths.items():
        print(f"  {key:<{width}}  {value}")
    sys.stdout.flush()


def save_images(images: np.ndarray, out: Path) -> list[Path]:
    """uint8 (N, H, W, 3) as PNGs: `out` for one image, `<stem>-<i>` for several."""
    from PIL import Image

    count = len(images)
    paths = [out] if count == 1 else [out.with_stem(f"{out.stem}-{i}") for i in range(count)]
    out.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(image).save(path)
    return paths
