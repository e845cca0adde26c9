"""The connection layer as a user meets it: permanent refusals fail at once with exit 2, an unreachable
broker is named with its reason, the password never shows, and every client behaves the same way."""

from __future__ import annotations

import pytest
from private_broker import free_port
from support import Env, dumps, job_dict

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
