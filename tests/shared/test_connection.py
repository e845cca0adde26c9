"""The connection layer as a user meets it: permanent refusals fail at once with exit 2, an unreachable
broker is named with its reason, the password never shows, and every client behaves the same way."""

from __future__ import annotations

import pytest
from private_broker import free_port
from support import Env, dumps, job_dict

from inferq.shared.broker.amqp import declare_topology
from inferq.shared.broker.connection import open_blocking
from inferq.shared.config.settings import OperatorSettings
from inferq.shared.errors import BrokerRefused, BrokerUnavailable

pytestmark = pytest.mark.broker

SECRET = "s3cret-pw"


COMMANDS = {
    "submit": ("submit", "-"),
    "worker": ("worker", "--drain"),
    "status": ("status",),
    "dlq": ("dlq", "list"),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_wrong_password_fails_at_once_with_exit_2_in_every_command(env: Env, command: str) -> None:
    done = env.inferq(
        *COMMANDS[command],
        stdin=dumps(job_dict()).decode(),
        INFERQ_AMQP_URL=f"amqp://guest:{SECRET}@127.0.0.1:5672/%2F",
        INFERQ_CONNECT_TIMEOUT_S="30",
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("inferq: error: the broker at amqp://guest:***@127.0.0.1:5672/%2F refused the login")
    assert "broker_unavailable" not in done.stderr, "a refused login is not retried"
    assert SECRET not in done.stderr + done.stdout


@pytest.mark.parametrize("command", ["submit", "worker"])
def test_an_unknown_virtual_host_fails_at_once_with_exit_2(env: Env, command: str) -> None:
    done = env.inferq(
        *COMMANDS[command],
        stdin=dumps(job_dict()).decode(),
        INFERQ_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/no-such-vhost",
        INFERQ_CONNECT_TIMEOUT_S="30",
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("inferq: error: the broker at amqp://guest:***@127.0.0.1:5672/no-such-vhost refused")
    assert "virtual host 'no-such-vhost'" in last
    assert "broker_unavailable" not in done.stderr


@pytest.mark.parametrize("command", ["submit", "worker", "status"])
def test_a_refused_port_is_retried_then_reported_as_connection_refused_with_host_and_port(
    env: Env, command: str
) -> None:
    port = free_port()
    done = env.inferq(
        *COMMANDS[command],
        stdin=dumps(job_dict()).decode(),
        INFERQ_AMQP_URL=f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F",
        INFERQ_CONNECT_TIMEOUT_S="1",
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last == (
        f"inferq: error: cannot reach the broker at amqp://guest:***@127.0.0.1:{port}/%2F within 1s: "
        f"connection refused (127.0.0.1:{port})"
    )
    assert "broker_unavailable" in done.stderr, "a refused port may be a broker restarting: it is retried"
    assert SECRET not in done.stderr + done.stdout


def test_the_blocking_connection_of_the_operator_commands_classifies_failures_the_same_way() -> None:
    wrong = OperatorSettings(amqp_url=f"amqp://guest:{SECRET}@127.0.0.1:5672/%2F", connect_timeout_s=30)
    with pytest.raises(BrokerRefused, match="refused the login of user 'guest'") as refused:
        open_blocking(wrong, "test")
    assert SECRET not in str(refused.value)
    nowhere = OperatorSettings(amqp_url="amqp://guest:guest@no-such-host.invalid:5672/%2F", connect_timeout_s=0.5)
    with pytest.raises(BrokerUnavailable, match=r"unknown host \(no-such-host.invalid:5672\)"):
        open_blocking(nowhere, "test")


def test_every_client_advertises_that_it_hears_consumer_cancels(env: Env) -> None:
    # RabbitMQ tells a consumer of its deleted queue only a client that advertises this capability.
    connection = open_blocking(env.worker_settings(), "capabilities")
    try:
        capabilities = connection._impl._client_properties["capabilities"]
        assert capabilities["consumer_cancel_notify"] is True
    finally:
        connection.close()


OLD_DEAD_LETTERING = {"x-dead-letter-exchange": "", "x-queue-type": "quorum", "x-quorum-initial-group-size": 3}


def declare_old_queues(env: Env) -> None:
    """The jobs and retry queues as an earlier inferq declared them: dead-lettering to exchange ``""`` with a
    routing key, without a strategy, and the retry queue without ``x-overflow``."""
    settings = env.worker_settings()
    old = {**OLD_DEAD_LETTERING, "x-delivery-limit": 5, "x-dead-letter-routing-key": settings.dlq_queue}
    connection = open_blocking(settings, "old-topology")
    try:
        channel = connection.channel()
        channel.queue_declare(
            env.jobs_queue, durable=True, arguments={**old, "x-max-length": 1_000_000, "x-overflow": "reject-publish"}
        )
        channel.queue_declare(f"{env.jobs_queue}.retry", durable=True, arguments=old)
    finally:
        connection.close()


def test_a_worker_on_queues_of_an_earlier_version_exits_with_one_line_saying_how_to_migrate(env: Env) -> None:
    # Given the jobs and retry queues as an earlier inferq declared them
    declare_old_queues(env)

    # When a worker starts on them
    done = env.inferq("worker", "--drain", INFERQ_METRICS_PORT="0")

    # Then it exits 2 with one line naming the change and the commands that migrate
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"inferq: error: queue '{env.jobs_queue}' exists with another x-dead-letter-exchange")
    assert "x-dead-letter-strategy" in last and "inferq worker --drain" in last
    assert f"rabbitmqctl delete_queue {env.jobs_queue}; rabbitmqctl delete_queue {env.jobs_queue}.retry" in last


def test_the_blocking_declaration_of_the_tools_tells_the_same_way_out(env: Env) -> None:
    declare_old_queues(env)
    connection = open_blocking(env.worker_settings(), "declare")
    try:
        with pytest.raises(BrokerRefused, match="declared by an earlier inferq") as refused:
            declare_topology(connection.channel(), env.worker_settings())
    finally:
        connection.close()
    assert "\n" not in str(refused.value) and "x-overflow" in str(refused.value)
