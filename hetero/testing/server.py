"""`hetero serve` as a subprocess on 127.0.0.1 (tests and benchmarks drive it over HTTP)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(["--model", dir]) as srv:` -> srv.url once /health answers 200.
    The log goes to `log_path` (read it with `srv.log()`); leaving sends SIGTERM and waits."""

    def __init__(
        self, args: list[str], log_path: str | Path, timeout: float = 180.0, env: dict | None = None
    ) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "hetero.cli", "serve", "--port", str(self.port), *args]
        self.log_path, self.timeout = Path(log_path), timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hetero serve exited {self.proc.returncode}:\n{self.log()}")
            status, _ = self.get("/health")
            if status == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"hetero serve not healthy after {self.timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then the exit code (SIGKILL after `timeout`)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of a GET; status 0 when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    def metric(self, name: str) -> float:
        """One unlabeled sample of /metrics."""
        _, body = self.get("/metrics")
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(f"{name} not in /metrics: {json.dumps(body[:200])}")
