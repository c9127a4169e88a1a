"""The pipeline on this machine: kfp.local with a step cache and a console a person can follow.

`parti run` prints one line per step as it starts and ends (wall time and the figure that
matters), draws a bar for long steps from the progress lines they print, and sends
everything else (the kfp executor's own output, each step's logs) to a per-run log file.
A failing step is named with its last log lines and the log's path.

The cache is kfp.local's, keyed like Kubeflow Pipelines' cache: the component, its
inputs, the artifacts it reads. A step's config input holds only the sections it reads
(the pipeline's `config` step), so changing `train.steps` re-runs training and what
follows it, not the tokenizers. For local work the package's source is part of every
key too, so edited code re-runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from parti_ops.components.progress import parse_progress
from parti_ops.model.errors import PartiError

TAIL_LINES = 20
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own lines around each task; they stay in the log file only.
_KFP_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} - (INFO|WARNING|ERROR) - ")


class StepFailed(PartiError, RuntimeError):
    """A pipeline step failed: which one, the end of its log and where the whole log is."""

    def __init__(self, step: str, log_path: Path, tail: list[str]) -> None:
        self.step, self.log_path, self.tail = step, log_path, tail
        lines = "\n".join(f"  {line}" for line in tail) or "  (the step printed nothing)"
        super().__init__(
            f"step {step} failed; its last {len(tail)} log lines:\n{lines}\nfull log: {log_path}"
        )


def step_label(task: str) -> str:
    """`image-tokenizer-op` → `image-tokenizer`."""
    return task.removesuffix("-op")


LAYERS = ("model", "components", "pipelines", "deploy")  # the package's source folders


def code_digest(root: Path | None = None) -> str:
    """sha256 over the package's Python source: edited code re-runs every cached step.

    Only the package's own folders count: beside them, in a checkout, lie the run outputs
    (a Triton repository holds `model.py` files) and the virtual environment.
    """
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def install_step_cache(cache_root: Path) -> None:
    """Make kfp.local's cache (after `local.init(enable_caching=True, cache_root=...)`) key
    each step on the package's source too."""
    from kfp.local import cache as kfp_cache

    code = code_digest()

    class StepCache(kfp_cache.LocalCache):
        hits = 0  # lookups answered from the cache: the console reads it around each task

        def get(self, cache_key: str) -> Any:
            found = super().get(cache_key)
            self.hits += found is not None
            return found

        def compute_key(
            self,
            component_name: str,
            image: str,
            full_command: list[str],
            arguments: dict[str, Any],
            env_vars: dict[str, str] | None = None,
            custom_cache_key: str | None = None,
        ) -> str:
            env = {**(env_vars or {}), "PARTI_OPS_CODE_DIGEST": code}
            return super().compute_key(
                component_name, image, full_command, arguments, env, custom_cache_key
            )

    root = str(Path(cache_root).resolve())
    with kfp_cache._cache_singleton_lock:
        kfp_cache._cache_singleton = StepCache(cache_root=root)
        kfp_cache._cache_singleton_root = root


def _metadata(outputs: dict[str, Any], name: str) -> dict[str, Any]:
    artifact = outputs.get(name)
    return dict(getattr(artifact, "metadata", None) or {})


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f} %"


def summarize(task: str, outputs: dict[str, Any]) -> str:
    """The figure that matters of a finished step, from its outputs' metadata ("" if none)."""
    step = step_label(task)
    metrics = _metadata(outputs, "metrics")
    try:
        if step == "ingest":
            return f"{int(_metadata(outputs, 'canonical')['rows']):,} rows"
        if step == "validate":
            return f"{metrics['accepted']:,.0f} accepted, {metrics['quarantined']:,.0f} quarantined"
        if step == "text-tokenizer":
            return f"{metrics['vocab_size']:.0f} tokens"
        if step == "image-tokenizer":
            usage = _pct(metrics["codebook_usage"])
            return f"PSNR {metrics['psnr']:.1f} dB, codebook usage {usage}"
        if step == "encode":
            return f"{int(_metadata(outputs, 'encoded')['rows']):,} rows"
        if step == "train":
            return (
                f"{metrics['steps']:.0f} steps, validation"
                f" {metrics['validation_bits_per_token']:.3f} bits/token"
            )
        if step == "scorer":
            top1 = _pct(metrics["validation/retrieval_top1_of_10"])
            return f"validation retrieval top-1 of 10: {top1}"
        if step == "fid-reference":  # fid-<data>-<features>-<split>-<images>.safetensors
            images = _metadata(outputs, "references")["file"].rsplit("-", 1)[1].split(".")[0]
            return f"FID statistics of {int(images):,} validation images"
        if step == "evaluate":
            parts = [f"prompt following {metrics['validation/prompt_following']:.3f}"]
            if "validation/exact" in metrics:  # the oracle's, where rows carry scenes
                parts.append(f"exact {_pct(metrics['validation/exact'])}")
            return " · ".join(parts) + " (validation)"
        if step == "register":
            decision = _metadata(outputs, "decision")
            verdict = {
                "promote": "promoted to champion",
                "unchanged": "is the champion already (same weights)",
            }.get(decision.get("outcome", ""), f"not promoted ({decision.get('outcome', '?')})")
            return f"version {decision['version']} {verdict}"
        if step == "export":
            repository = _metadata(outputs, "repository")
            return f"champion version {repository['version']}, {repository['precision']}"
        if step == "smoke-test":
            report = Path(outputs["smoke"].uri) / "smoke.json"
            http = json.loads(report.read_text(encoding="utf-8"))["endpoints"]["http"]
            return f"served at {http}/v2/models/parti, {1000 * metrics['latency_s']:.0f} ms"
    except (KeyError, TypeError, ValueError, AttributeError, OSError):
        return ""
    return ""


class RunConsole:
    """Step lines and a progress bar on `console`; every other line to the log file."""

    def __init__(self, console: Console | None, log_path: Path) -> None:
        self.console = console
        self.log_path = log_path
        self.failed: str | None = None
        self.failed_tail: list[str] = []
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._partial = ""
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._bar_task: Any = None
        self._log: io.TextIOBase | None = None
        self.artifacts: dict[str, dict[str, str]] = {}  # task → output name → uri
        self.cached: list[str] = []
        self.seconds: dict[str, float] = {}  # task → wall time (a cached task's lookup)
        self.run_folder = ""  # this run's folder under the pipeline root

    # The stream kfp.local writes to (sys.stdout while the pipeline runs).
    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()

    def isatty(self) -> bool:
        return False

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        progress = parse_progress(plain)
        if progress is not None:
            self._progress(*progress)
            return
        if self._log is not None:
            self._log.write(plain + "\n")
        text = plain.strip()
        if text and not _KFP_LINE.match(text) and not set(text) <= {"-"}:
            self._tail.append(text)

    def _progress(self, description: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._bar_task is None:
            self._bar_task = self._bar.add_task(description, total=total or None)
        self._bar.update(self._bar_task, description=description, completed=done,
                         total=total or None)  # fmt: skip

    def _print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Redirect stdout to this object (and so to the log) while the pipeline runs."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w", encoding="utf-8") as log:
            self._log = log
            bar = None
            if self.console is not None and self.console.is_terminal:
                columns = (TextColumn("  {task.description}"), BarColumn(),
                           MofNCompleteColumn(), TimeElapsedColumn())  # fmt: skip
                bar = Progress(*columns, console=self.console, transient=True)
            try:
                with bar or contextlib.nullcontext(), contextlib.redirect_stdout(self):  # type: ignore[type-var]
                    self._bar = bar
                    yield
            finally:
                if self._partial:
                    self._line(self._partial)
                    self._partial = ""
                self._bar = None
                self._log = None

    def started(self, task: str) -> None:
        with self._lock:
            self._tail.clear()
        self._print(f"[dim]…[/dim] {step_label(task)}")

    def finished(self, task: str, outputs: dict[str, Any], ok: bool, seconds: float,
                 cached: bool) -> None:  # fmt: skip
        with self._lock:
            if self._bar is not None and self._bar_task is not None:
                self._bar.remove_task(self._bar_task)
            self._bar_task = None
        label = step_label(task)
        self.artifacts[task] = {k: v.uri for k, v in outputs.items() if hasattr(v, "uri")}
        self.seconds[task] = seconds
        if cached:
            self.cached.append(task)
        if not ok:
            if self.failed is None:  # the first failure, not the exit handler's
                self.failed, self.failed_tail = label, list(self._tail)
            self._print(f"[red]✗[/red] {label:<16} failed after {seconds:.1f} s")
            return
        when = "cached" if cached else f"{seconds:.1f} s"
        self._print(f"[green]✓[/green] {label:<16} {when:>9}  {summarize(task, outputs)}".rstrip())


@contextlib.contextmanager
def observe_tasks(run_console: RunConsole) -> Iterator[None]:
    """Report each kfp.local task's start and end to `run_console` while the pipeline runs."""
    from kfp.local import cache as kfp_cache
    from kfp.local import status
    from kfp.local.orchestrator import task_executor

    original = task_executor.execute_single_task

    def execute(**kwargs: Any) -> Any:
        task, folder = kwargs["task_name"], kwargs["pipeline_resource_name"]
        run_console.run_folder = run_console.run_folder or folder
        run_console.started(task)
        cache = kfp_cache.get_local_cache()  # None when the run does not cache
        hits = getattr(cache, "hits", 0)
        started = time.perf_counter()
        outputs, task_status = original(**kwargs)
        run_console.finished(
            task,
            outputs,
            task_status == status.Status.SUCCESS,
            time.perf_counter() - started,
            getattr(cache, "hits", 0) > hits,
        )
        return outputs, task_status

    task_executor.execute_single_task = execute
    try:
        yield
    finally:
        task_executor.execute_single_task = original
