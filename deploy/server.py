"""Start the real `tritonserver` on loopback with a model repository, and stop it cleanly.

Where the binary comes from, first found wins:
1. `$TRITONSERVER`: the path of a `tritonserver` binary;
2. the server bundled in the `nvidia-pytriton` wheel, unpacked by `make install` into
   `<venv>/tritonserver/` (or the `pytriton` package if installed): Triton with the
   Python backend, for CPU machines;
3. `tritonserver` on PATH, as in NGC's Triton images (backends in /opt/tritonserver).

The bundled server needs the Python backend's stub for this Python in its backend
folder, and the venv's `bin/` first on PATH so the stub imports the venv's packages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from parti_ops.model.config import ServeConfig
from parti_ops.model.errors import PartiError


class ServerError(PartiError, RuntimeError):
    """The server could not be found or did not become ready; the message says why."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    libraries: Path | None  # shared libraries the bundled binary needs
    stubs: Path | None  # python_backend_stubs/<version>/ of the bundle


def find_tritonserver() -> TritonInstall:
    """The Triton installation to use; ServerError says how to get one."""
    if env := os.environ.get("TRITONSERVER"):
        binary = Path(env)
        if not binary.is_file():
            raise ServerError(f"TRITONSERVER={env}: no such file")
        return _install_around(binary)
    for root in _bundle_roots():
        binary = root / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        if binary.is_file():
            return _install_around(binary)
    if on_path := shutil.which("tritonserver"):
        return TritonInstall(Path(on_path), Path("/opt/tritonserver/backends"), None, None)
    raise ServerError(
        "no tritonserver found: run `make install` (unpacks the server from the "
        "nvidia-pytriton wheel into .venv/tritonserver), set TRITONSERVER to a binary, "
        "or use NGC's tritonserver image"
    )


def _bundle_roots() -> list[Path]:
    roots = [Path(sys.prefix) / "tritonserver"]
    with contextlib.suppress(ImportError):
        import pytriton

        roots.append(Path(pytriton.__file__).parent.parent)
    return roots


def _install_around(binary: Path) -> TritonInstall:
    server = binary.parent.parent  # .../tritonserver/{bin,backends,python_backend_stubs}
    libraries = server.parent.parent / "nvidia_pytriton.libs"
    stubs = server / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    return TritonInstall(
        binary=binary,
        backends=server / "backends",
        libraries=libraries if libraries.is_dir() else None,
        stubs=stubs if stubs.is_dir() else None,
    )


def serving_python_env() -> Path:
    """The Python environment the Python backend's stub runs models in.

    The bundled stub is built against numpy 1 and misreads BYTES tensors under numpy 2, so
    `make install` makes a small environment beside the venv with just what the `parti`
    model imports (numpy 1, onnxruntime, tokenizers): `$PARTI_SERVE_ENV`, else
    `<venv>/serve-env`, else this interpreter's own environment.
    """
    if env := os.environ.get("PARTI_SERVE_ENV"):
        return Path(env)
    beside = Path(sys.prefix) / "serve-env"
    return beside if (beside / "bin" / "python").exists() else Path(sys.prefix)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """A running tritonserver; a context manager that stops it on exit.

    Args:
        repository: the model repository (`parti export triton`).
        serve: host, ports (0: free ones) and the model to load.
        log_file: where the server's output goes; default a file in a temporary folder.
    """

    def __init__(self, repository: str | Path, serve: ServeConfig, log_file: Path | None = None):
        self.repository, self.serve = Path(repository).resolve(), serve
        self.ports = {
            name: getattr(serve, f"{name}_port") or free_port(serve.host)
            for name in ("http", "grpc", "metrics")
        }
        self._tmp = tempfile.TemporaryDirectory(prefix="parti-triton-")
        self.log_file = log_file or Path(self._tmp.name) / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.serve.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.serve.host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.serve.host}:{self.ports['metrics']}/metrics"

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        host = self.serve.host
        return [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            f"--load-model={self.serve.model_name}",
            # Ready = up with the startup models loaded (a failed startup load exits). Not
            # strict: under strict readiness one failed load of a new version marks the
            # server unready for good, though the old version goes on serving.
            "--strict-readiness=false",
            "--exit-on-error=true",
            f"--http-address={host}",
            f"--grpc-address={host}",
            f"--metrics-address={host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-port={self.ports['metrics']}",
            "--exit-timeout-secs=10",
        ]

    def start(self) -> TritonServer:
        """Start and wait until ready; ServerError with the log's tail if it does not get there."""
        install = find_tritonserver()
        backends = install.backends
        env = dict(os.environ)
        env["PATH"] = f"{serving_python_env() / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        if install.stubs is not None:  # the bundle: add this Python's stub to a backend copy
            backends = Path(self._tmp.name) / "backends"
            shutil.copytree(install.backends, backends)
            shutil.copy2(install.stubs / "triton_python_backend_stub", backends / "python")
        if install.libraries is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(install.libraries), env.get("LD_LIBRARY_PATH", "")) if p
            )
        log = self.log_file.open("wb")
        self.process = subprocess.Popen(
            self.command(install, backends),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal reaches us; we stop the server
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:  # Ctrl-C or a failed start: no server is left behind
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import tritonclient.http as http

        client = http.InferenceServerClient(self.http_url.removeprefix("http://"))
        deadline = time.monotonic() + self.serve.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with {self.process.returncode}:\n{self.tail()}"
                )
            with contextlib.suppress(Exception):
                if client.is_server_ready() and client.is_model_ready(self.serve.model_name):
                    return
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver not ready in {self.serve.ready_timeout_s} s:\n{self.tail()}"
        )

    def tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return ""
        text = self.log_file.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            self._tmp.cleanup()
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:  # the server and its model stubs, all of them
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self._tmp.cleanup()
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Stopped:
    """How a server that `serve_until_signalled` ran came to an end."""

    exit_code: int | None
    crashed: bool  # it exited by itself, not on a signal
    log_tail: str = ""  # the end of its log when it crashed (the log goes with the server)


def serve_until_signalled(
    repository: str | Path, serve: ServeConfig, on_ready: Callable[[TritonServer], None]
) -> Stopped:
    """Run tritonserver on `repository` until SIGINT or SIGTERM, or until it exits by itself.

    `on_ready` is called once the server is ready (to say where it listens). The server is
    stopped on the way out, whatever happens; one that does not start raises ServerError.
    """
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in signals}
    try:
        server = TritonServer(repository, serve).start()
        crashed, tail = False, ""
        try:
            on_ready(server)
            while not stop.wait(1.0):
                if server.process.poll() is not None:
                    crashed, tail = True, server.tail()  # read before `stop` deletes the log
                    break
        finally:
            code = server.stop()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return Stopped(exit_code=code, crashed=crashed, log_tail=tail)
