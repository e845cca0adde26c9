"""``inferq status`` against the real broker: AMQP fallback, management API, models, errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest
from ops_support import free_port

from inferq.cli import _run, cli
from inferq.shared.broker.amqp import declare_topology
from inferq.shared.config.settings import InferqSettings

pytestmark = pytest.mark.broker


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = _run(cli, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def status_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run_cli(capsys, "status", "--json")
    assert code == 0, err
    report: dict[str, Any] = orjson.loads(out)
    return report


def queues_by_role(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["role"]: q for q in report["queues"]}


def publish(channel: Any, queue: str, count: int) -> None:
    channel.confirm_delivery()
    for _ in range(count):
        channel.basic_publish("", queue, b'{"id": "x"}', pika.BasicProperties(delivery_mode=2), mandatory=True)


def test_status_without_management_api_counts_ready_messages_and_consumers_over_amqp(
    env: dict[str, str], channel: Any, published_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 3 waiting jobs, 4 suspects waiting to run alone, 2 dead letters and one consumer on the results queue
    publish(channel, env["INFERQ_JOBS_QUEUE"], 3)
    publish(channel, env["INFERQ_JOBS_QUEUE"] + ".retry", 4)
    publish(channel, env["INFERQ_JOBS_QUEUE"] + ".dlq", 2)
    channel.basic_consume(env["INFERQ_RESULTS_QUEUE"], lambda *_: None)

    # When the operator asks for the status while the management API does not answer
    report = status_json(capsys)

    # Then the numbers come from passive declares, and the models from the store
    assert report["source"] == "amqp"
    assert "unreachable" in report["management_error"]
    queues = queues_by_role(report)
    assert (queues["jobs"]["ready"], queues["jobs"]["unacked"], queues["jobs"]["consumers"]) == (3, None, 0)
    assert (queues["retry"]["name"], queues["retry"]["ready"]) == (env["INFERQ_JOBS_QUEUE"] + ".retry", 4)
    assert (queues["dlq"]["ready"], queues["dlq"]["consumers"]) == (2, 0)
    assert (queues["results"]["ready"], queues["results"]["consumers"]) == (0, 1)
    assert queues["dlq"]["name"] == env["INFERQ_JOBS_QUEUE"] + ".dlq"
    assert report["models"] == [{"name": "tiny", "versions": [1, 2], "aliases": {"champion": 1}}]


def test_status_table_names_each_queue_and_model(
    env: dict[str, str], channel: Any, published_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(channel, env["INFERQ_JOBS_QUEUE"], 4)
    code, out, err = run_cli(capsys, "status")
    assert code == 0, err
    lines = out.splitlines()
    jobs_line = next(line for line in lines if line.startswith("jobs "))
    assert jobs_line.split() == ["jobs", env["INFERQ_JOBS_QUEUE"], "4", "?", "0"]
    retry_line = next(line for line in lines if line.startswith("retry "))
    assert retry_line.split() == ["retry", env["INFERQ_JOBS_QUEUE"] + ".retry", "0", "?", "0"]
    assert any(line.split()[:3] == ["tiny", "1,2", "champion->1"] for line in lines)
    assert "management API unavailable" in out


def test_status_marks_queues_that_do_not_exist_yet(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    report = status_json(capsys)
    assert [q["exists"] for q in report["queues"]] == [False, False, False, False]
    assert report["models"] == []


def test_status_with_broker_down_is_one_line_error_without_password(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("INFERQ_AMQP_URL", f"amqp://guest:s3cret-pw@127.0.0.1:{port}/%2F")
    monkeypatch.setenv("INFERQ_CONNECT_TIMEOUT_S", "1")
    code, out, err = run_cli(capsys, "status")
    assert code == 1
    # Retried like every other client (a warning per attempt), then one line saying why.
    last = err.strip().splitlines()[-1]
    assert last.startswith("inferq: error: cannot reach the broker at amqp://guest:***@127.0.0.1:")
    assert last.endswith(f"connection refused (127.0.0.1:{port})")
    assert all(line.startswith("{") for line in err.strip().splitlines()[:-1])
    assert "s3cret-pw" not in err + out


# -- the management API, on a private node (never touch the shared broker's plugins) --------------


class PrivateNode:
    """A RabbitMQ node with the management plugin, on free ports, stopped by its pid at the end."""

    def __init__(self) -> None:
        self.amqp_port, self.http_port, self.dist_port = free_port(), free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="inferq-mgmt-"))
        self.name = f"inferq-mgmt-{uuid.uuid4().hex[:8]}@localhost"

    def start(self) -> None:
        (self.dir / "plugins").write_text("[rabbitmq_management].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.amqp_port}\n"
            f"management.tcp.port = {self.http_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            "collect_statistics_interval = 500\n"
        )
        # Quorum queues report their numbers on a tick (5 s by default): sooner, so the test is quick.
        (self.dir / "advanced.config").write_text("[{rabbit, [{quorum_tick_interval, 200}]}].\n")
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        for path in self.dir.iterdir():
            shutil.chown(path, "rabbitmq", "rabbitmq")
        node_env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins"),
        }
        subprocess.run(["rabbitmq-server", "-detached"], env=node_env, check=True, capture_output=True)

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    def stop(self) -> None:
        pid_file = self.dir / "pid"
        if pid_file.exists() and pid_file.read_text().strip():
            # A throwaway node: no need for its slow orderly stop, its data is deleted right after.
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def management_node() -> Iterator[PrivateNode]:
    node = PrivateNode()
    node.start()
    try:
        yield node
    finally:
        node.stop()


def wait_for(check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except (pika.exceptions.AMQPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def test_status_reads_ready_unacked_and_consumers_from_the_management_api(
    env: dict[str, str],
    management_node: PrivateNode,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a broker with the management API, 3 jobs of which one is taken and not acked yet
    monkeypatch.setenv("INFERQ_AMQP_URL", management_node.amqp_url)
    monkeypatch.setenv("INFERQ_MANAGEMENT_URL", f"http://guest:guest@127.0.0.1:{management_node.http_port}")
    connection = wait_for(lambda: pika.BlockingConnection(pika.URLParameters(management_node.amqp_url)))
    ch = connection.channel()
    settings = InferqSettings(jobs_queue=env["INFERQ_JOBS_QUEUE"], results_queue=env["INFERQ_RESULTS_QUEUE"])
    declare_topology(ch, settings)
    publish(ch, env["INFERQ_JOBS_QUEUE"], 3)
    method, _props, _body = ch.basic_get(env["INFERQ_JOBS_QUEUE"], auto_ack=False)
    assert method is not None
    ch.basic_consume(env["INFERQ_RESULTS_QUEUE"], lambda *_: None)

    # When the operator asks (the API samples queue stats every 0.5 s on this node)
    def sampled() -> dict[str, Any] | None:
        report = status_json(capsys)
        jobs = queues_by_role(report)["jobs"]
        return report if (jobs["ready"], jobs["unacked"]) == (2, 1) else None

    report = wait_for(sampled)

    # Then the numbers come from the management API, unacked included
    assert report["source"] == "management"
    assert report["management_error"] is None
    queues = queues_by_role(report)
    # (a quorum queue counts a channel holding an unacked basic.get as a consumer: not asserted)
    assert queues["results"]["consumers"] == 1
    assert (queues["dlq"]["exists"], queues["dlq"]["ready"]) == (True, 0)
    connection.close()
