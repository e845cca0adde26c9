"""Test support for the HTTP gateway: the real ``inferq serve`` in a subprocess, on a free port."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from private_broker import free_port
from support import Env

START_TIMEOUT_S = 60.0
CLIENT_CONNECTIONS = 64
ASYNC = {"Prefer": "respond-async"}
"""Headers asking for the operation at once (202), instead of waiting for the result."""


def oip_request(rows: Any, **extra: Any) -> dict[str, Any]:
    """An Open Inference Protocol request body for the iris models (input ``X``, FP32, 4 columns)."""
    flat = [float(x) for row in rows for x in row]
    return {"inputs": [{"name": "X", "shape": [len(rows), 4], "datatype": "FP32", "data": flat}], **extra}


class GatewayProcess:
    """``inferq serve`` pointed at a test's world; stopped with SIGTERM on exit."""

    def __init__(self, env: Env, log_dir: Path, **extra_env: str) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{self.port}.log"
        self._extra = {"INFERQ_HTTP_HOST": "127.0.0.1", "INFERQ_HTTP_PORT": str(self.port), **extra_env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "inferq", "serve"],
                env=self.env.environ(**self._extra),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"inferq serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"inferq serve did not answer in time:\n{self.log()}")
            time.sleep(0.1)

    def client(self, **kw: Any) -> httpx.Client:
        """A client that may be shared by up to ``CLIENT_CONNECTIONS`` threads."""
        # NOTE: keep every connection the pool may open. httpcore 1.0 closes an idle connection once
        # the pool holds more than max_keepalive_connections (default 20) connections in all, and one
        # chosen for closing may meanwhile have been handed to another thread's request: that request
        # then fails with "[Errno 9] Bad file descriptor" (seen with 32 threads on one client).
        limits = httpx.Limits(max_connections=CLIENT_CONNECTIONS, max_keepalive_connections=CLIENT_CONNECTIONS)
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), limits=limits, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"inferq serve did not stop on SIGTERM:\n{self.log()}") from None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
