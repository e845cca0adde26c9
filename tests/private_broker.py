"""Private RabbitMQ nodes for fault tests: one node, or a cluster of three on loopback, restarted,
killed, partitioned and stopped by the test, never the shared broker."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pika

START_TIMEOUT_S = 120.0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


FREE_PORT_LOW = 20000


def free_port() -> int:
    """A loopback port nobody listens on right now, below the kernel's ephemeral range.

    NOTE: a port the kernel hands out (bind to 0) is ephemeral: any outgoing connection, and the suite
    opens thousands, may take it before a server started afterwards binds it (a RabbitMQ node takes
    seconds to reach its listener, and then fails to start). Ports below the range are only ever taken
    by listeners."""
    high = max(_ephemeral_low(), FREE_PORT_LOW + 1000)
    for _ in range(1000):
        port = random.randrange(FREE_PORT_LOW, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port between {FREE_PORT_LOW} and {high}")


class PrivateBroker:
    """A RabbitMQ node of its own (node name, ports, data directory), controlled with rabbitmqctl."""

    def __init__(self, config: str = "", plugins: str = "[]", name: str = "inferq-fault", advanced: str = "[]") -> None:
        """``config``: lines of rabbitmq.conf; ``advanced``: the Erlang terms of advanced.config (settings
        rabbitmq.conf does not know, e.g. ``[{rabbit, [{channel_tick_interval, 1000}]}]``)."""
        self.port = free_port()
        self.node = f"{name}-{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.dir = Path(tempfile.mkdtemp(prefix="inferq-rabbit-"))
        (self.dir / "plugins").write_text(f"{plugins}.\n")
        # The machine-wide config names port 5672: this node gets its own config file.
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n{config}")
        (self.dir / "advanced.config").write_text(f"{advanced}.\n")
        self.cookie: str | None = None  # set while the node is cut off (see PrivateCluster.isolate)
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")  # the server drops to user rabbitmq
        for path in self.dir.iterdir():
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self._env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        }

    def launch(self) -> None:
        """Start the node without waiting for it."""
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env, check=True, capture_output=True)

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
                    raise RuntimeError(f"private RabbitMQ {self.node} did not start:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's own log (its directory is removed with the cluster, so the text is kept
        in the failure)."""
        logs = sorted((self.dir / "log").glob("*.log"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return f"(no log in {self.dir / 'log'})"
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])

    def ctl(self, *args: str, timeout_s: float = 120) -> str:
        cookie = ["--erlang-cookie", self.cookie] if self.cookie else []
        done = subprocess.run(
            ["rabbitmqctl", *cookie, "-n", self.node, *args],
            env=self._env,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        return done.stdout

    @property
    def pid(self) -> int:
        return int((self.dir / "pid").read_text().strip())

    def kill(self) -> None:
        """``kill -9`` the node's Erlang VM."""
        os.kill(self.pid, signal.SIGKILL)

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


CLUSTER_CONFIG = "cluster_partition_handling = pause_minority\n"


def management_config(port: int) -> str:
    return f"management.tcp.port = {port}\nmanagement.tcp.ip = 127.0.0.1\n"


class PrivateCluster:
    """Three private nodes joined into one cluster (pause_minority), each reachable on its own port and
    with the management API on its own ``http_port``."""

    def __init__(self, size: int = 3) -> None:
        self.http_ports = [free_port() for _ in range(size)]
        self.nodes = [
            PrivateBroker(CLUSTER_CONFIG + management_config(port), "[rabbitmq_management]", name="inferq-cluster")
            for port in self.http_ports
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node, comma-separated, as ``INFERQ_AMQP_URL`` takes them."""
        return ",".join(self.urls)

    def start(self) -> None:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        self.wait_running(len(self.nodes))

    def running(self, via: PrivateBroker | None = None) -> set[str]:
        for node in [via] if via else self.nodes:
            try:
                status = json.loads(node.ctl("cluster_status", "--formatter", "json", timeout_s=30))
                return set(status.get("running_nodes", []))
            except (subprocess.SubprocessError, ValueError):
                continue
        return set()

    def wait_running(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.running()) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} running nodes: {self.running()}")
            time.sleep(0.5)

    def by_name(self, name: str) -> PrivateBroker:
        return next(n for n in self.nodes if n.node == name)

    def leader(self, queue: str) -> PrivateBroker:
        """The node that leads ``queue`` now."""
        for node in self.nodes:
            try:
                rows = json.loads(node.ctl("list_queues", "name", "leader", "--formatter", "json", timeout_s=30))
            except (subprocess.SubprocessError, ValueError):
                continue
            for row in rows:
                if row["name"] == queue:
                    return self.by_name(row["leader"])
        raise RuntimeError(f"no node knows queue {queue}")

    def restart(self, node: PrivateBroker) -> None:
        """Start a node that was stopped or killed; it rejoins the cluster from its data directory."""
        node.launch()
        node.wait_ready()
        self.wait_running(len(self.nodes))

    def isolate(self, node: PrivateBroker) -> None:
        """Cut ``node``'s inter-node traffic: it refuses the others' distribution handshakes and they
        refuse its own (another Erlang cookie), while its AMQP port stays open. With pause_minority it
        pauses itself (closing its client connections) and the other two carry on."""
        cookie = uuid.uuid4().hex
        peers = " ".join(f"erlang:disconnect_node('{n.node}')," for n in self.nodes if n is not node)
        node.ctl("eval", f"erlang:set_cookie(node(), '{cookie}'), {peers} ok.")
        node.cookie = cookie

    def heal(self, node: PrivateBroker) -> None:
        """Give ``node`` its cookie back; it reconnects, leaves its pause and rejoins."""
        cookie = (Path(os.path.expanduser("~rabbitmq")) / ".erlang.cookie").read_text().strip()
        node.ctl("eval", f"erlang:set_cookie(node(), '{cookie}'), ok.")
        node.cookie = None
        for peer in self.nodes:
            if peer is not node:
                peer.ctl("eval", f"net_adm:ping('{node.node}').")
        self.wait_running(len(self.nodes), timeout_s=180)

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except subprocess.SubprocessError:
                if (node.dir / "pid").exists():
                    with contextlib.suppress(OSError, ValueError):
                        node.kill()
                shutil.rmtree(node.dir, ignore_errors=True)


class BlackHole:
    """A TCP proxy in front of one node that can start dropping every byte both ways without closing
    anything: to its clients the node vanishes without a reset, as behind a dropping firewall."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.dropping = threading.Event()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([a, b], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        if not self.dropping.is_set():
                            peer[sock].shutdown(socket.SHUT_WR)
                        return
                    if not self.dropping.is_set():
                        peer[sock].sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
