"""A private RabbitMQ node for fault tests: restarted and stopped by the test, never the shared broker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateBroker:
    """A RabbitMQ node of its own (node name, ports, data directory), controlled with rabbitmqctl."""

    def __init__(self) -> None:
        self.port = free_port()
        self.node = f"inferq-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.dir = Path(tempfile.mkdtemp(prefix="inferq-rabbit-"))
        (self.dir / "plugins").write_text("[].\n")
        # The machine-wide config names port 5672: this node gets its own config file.
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")  # the server drops to user rabbitmq
        for path in self.dir.iterdir():
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self._env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
        }

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env, check=True, capture_output=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"private RabbitMQ {self.node} did not start; see {self.dir}/log") from None
                time.sleep(0.2)

    def ctl(self, *args: str) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.node, *args], env=self._env, check=True, capture_output=True)

    def restart_app(self, down_s: float = 1.0) -> None:
        """Broker down, then up again: connections drop; durable queues and persistent messages stay."""
        self.ctl("stop_app")
        time.sleep(down_s)
        self.ctl("start_app")
        self.wait_ready()

    def stop(self) -> None:
        try:
            self.ctl("stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
