"""Start and stop a real ``llamafactory-cli api`` on 127.0.0.1, for the tests and the serving benchmark.

``ApiServer(yaml, overrides)`` runs ``llamafactory-cli api YAML key=value ...`` in its own process,
bound to 127.0.0.1 (``API_HOST``) on a free port (``API_PORT``), waits until ``GET /v1/models``
answers, and stops it (SIGINT, then SIGTERM, then SIGKILL, by its process id) on exit.  The server's
output goes to a log file, never a pipe a busy server could fill.  ``peak_memory()`` reads the
server's peak resident memory (``VmHWM`` of /proc/PID/status).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cli_path() -> str:
    """``llamafactory-cli`` of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "llamafactory-cli"
    if not candidate.exists():
        raise FileNotFoundError(f"{candidate} not found; install LLaMA-Factory into this environment "
                                "(scripts/install.sh)")
    return str(candidate)


class ApiServer:
    """``llamafactory-cli api`` on 127.0.0.1 at a free port, as a context manager."""

    def __init__(self, config: str | os.PathLike | dict[str, Any], overrides: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 600.0) -> None:
        self.config = config
        self.overrides = dict(overrides or {})
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="mkv-api-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self._yaml: Path | None = None
        self._launched = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def command(self) -> list[str]:
        if isinstance(self.config, dict):
            handle, name = tempfile.mkstemp(prefix="mkv-api-", suffix=".yaml")
            with os.fdopen(handle, "w") as fh:
                fh.writelines(f"{key}: {json.dumps(value)}\n" for key, value in self.config.items())  # JSON is YAML
            self._yaml = Path(name)
            config = name
        else:
            config = str(self.config)
        return [cli_path(), "api", config, *(f"{key}={value}" for key, value in self.overrides.items())]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(API_HOST=HOST, API_PORT=str(self.port), API_VERBOSE="0", DISABLE_VERSION_CHECK="1",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("API_KEY", None)
        env.update(self.extra_env)
        if env["API_HOST"] != HOST:
            raise ValueError(f"API_HOST must be {HOST}: a test or benchmark server is never reachable from outside")
        return env

    def start(self) -> ApiServer:
        """Launch and wait until it serves."""
        return self.launch().wait()

    def launch(self) -> ApiServer:
        """Start the process without waiting (servers launched together load their models at the same time)."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                            stdin=subprocess.DEVNULL)
        self._launched = time.monotonic()
        return self

    def wait(self) -> ApiServer:
        """Block until ``GET /v1/models`` answers; the start-up log is in the error when it never does."""
        if self.process is None:
            raise RuntimeError("launch() the server first")
        deadline = self._launched + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llamafactory-cli api exited with {self.process.returncode} before serving:\n"
                                   f"{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"llamafactory-cli api did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def peak_memory(self) -> int | None:
        """Peak resident bytes of the server process so far (None once it is gone)."""
        if self.process is None:
            return None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                process.send_signal(sig)
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._yaml is not None:
            self._yaml.unlink(missing_ok=True)
            self._yaml = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
