"""Starting Triton Inference Server over an edgevlm model repository.

The server binary, its Python backend and the backend's stub come from the ``nvidia-pytriton`` wheel
(``pip install edgevlm[serve]``), which bundles a real ``tritonserver`` that runs on CPU. edgevlm uses
that binary over its own repository (:mod:`.repository`) rather than PyTriton's Python proxy, so the
model served here is the same one a stock ``tritonserver`` (a data-centre GPU, a Jetson) loads from
``edgevlm export --to triton-repo``, and a bad request in a dynamic batch fails alone.

Two things about the environment are handled here rather than left to users:

- The Python backend's stub embeds a Python and finds ``libpython`` through the dynamic loader. Left
  alone it can load the system's ``libpython3.X`` instead of the interpreter's own and fail on a
  stdlib mismatch (``'_thread.RLock' object has no attribute '_recursion_count'``), so this
  interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH`` (:func:`server_env`).
- That backend (the 24.x-era one in nvidia-pytriton 0.7) reads input arrays wrongly under NumPy 2
  (measured: ``[1, 2]`` arrived as ``[1, 1]``), silently. :func:`check_numpy` refuses to start then.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgevlm.errors import BackendUnavailableError, ConfigError


def bundled_tritonserver() -> Path:
    """The ``tritonserver`` distribution inside the installed nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError("serving needs Triton Inference Server from nvidia-pytriton: "
                                      "pip install 'edgevlm[serve]' (Linux x86-64 / aarch64)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise BackendUnavailableError(f"no tritonserver binary in {root}: reinstall nvidia-pytriton")
    return root


def check_numpy(version: str | None = None) -> None:
    """ConfigError under NumPy >= 2 (see the module docstring)."""
    if version is None:
        import numpy

        version = numpy.__version__
    if int(version.split(".")[0]) >= 2:
        raise ConfigError(f"Triton's Python backend bundled in nvidia-pytriton 0.7 misreads input arrays under "
                          f"NumPy {version} (it needs NumPy < 2); serve from an environment with numpy<2, e.g. "
                          "scripts/setup.sh .venv-serve --serve")


def server_env(libs: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: this interpreter's ``libpython`` directory first on
    ``LD_LIBRARY_PATH``, then the wheel's libraries; this interpreter's ``bin`` first on ``PATH`` (the
    stub runs the models with it, so they import what this environment has installed)."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = ":".join(parts)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _backends(dist: Path, workspace: Path) -> Path:
    """A backend folder whose python backend has the stub built for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendUnavailableError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    py = workspace / "backends" / "python"
    py.mkdir(parents=True, exist_ok=True)
    for f in (dist / "backends" / "python").iterdir():
        (py / f.name).symlink_to(f)
    shutil.copy2(stub, py / "triton_python_backend_stub")
    return workspace / "backends"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free on ``host`` right now (for servers started by tests and benches on loopback)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer:
    """``tritonserver`` over ``repository``, as a context manager (or :meth:`start` / :meth:`stop`).

    Ports: HTTP (KServe v2 REST, health at ``/v2/health/ready``), gRPC (streaming) and metrics
    (Prometheus text at ``/metrics``). :meth:`start` waits until every model is ready, or raises with
    the end of the server's log."""

    def __init__(self, repository: str | os.PathLike, *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, host: str = "127.0.0.1", log_verbose: int = 0,
                 startup_timeout_s: float = 300.0) -> None:
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host, self.log_verbose, self.startup_timeout_s = host, log_verbose, startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._workspace: tempfile.TemporaryDirectory | None = None
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backends: Path, dist: Path) -> list[str]:
        return [str(dist / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                f"--backend-directory={backends}", f"--cache-directory={dist / 'caches'}",
                f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
                "--exit-on-error=true", "--exit-timeout-secs=10", f"--log-verbose={self.log_verbose}"]

    def start(self) -> "TritonServer":
        check_numpy()
        dist = bundled_tritonserver()
        self._workspace = tempfile.TemporaryDirectory(prefix="edgevlm-triton-")
        ws = Path(self._workspace.name)
        backends = _backends(dist, ws)
        self.log_path = ws / "tritonserver.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(backends, dist), stdout=log, stderr=subprocess.STDOUT,
                                     env=server_env(dist.parent.parent / "nvidia_pytriton.libs"),
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.ready():
            if (rc := self.proc.poll()) is not None:
                tail = self.log_tail()
                self.stop()
                raise BackendUnavailableError(f"tritonserver exited ({rc}) while starting:\n{tail}")
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise BackendUnavailableError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s:\n{tail}")
            time.sleep(0.25)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Triton unloads its models), then SIGKILL after ``timeout_s``."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self._workspace is not None:
            self._workspace.cleanup()
            self._workspace = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["TritonServer", "bundled_tritonserver", "check_numpy", "free_ports", "server_env"]
