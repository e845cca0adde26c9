"""Fixtures for the operator-facing tests: unique queues on the real broker, a tiny model, free ports."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from ops_support import free_port, tiny_model
from support import AMQP_URL

from inferq.model_store.base import publish
from inferq.model_store.local import LocalModelStore
from inferq.shared.broker.amqp import declare_topology, delete_topology
from inferq.shared.config.settings import InferqSettings


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker_is_up: None) -> Iterator[dict[str, str]]:
    """``INFERQ_*`` for one test: its own queues on the shared broker (deleted afterwards) and stores, set
    in this process too; tests using it are marked ``broker``."""
    prefix = f"test.ops.{uuid.uuid4().hex[:12]}"
    values = {
        "INFERQ_AMQP_URL": AMQP_URL,
        "INFERQ_JOBS_QUEUE": f"{prefix}.jobs",
        "INFERQ_RESULTS_QUEUE": f"{prefix}.results",
        "INFERQ_MODEL_STORE": str(tmp_path / "models"),
        "INFERQ_RESULT_STORE": str(tmp_path / "results"),
        "INFERQ_LOG_FORMAT": "json",
        "INFERQ_CONNECT_TIMEOUT_S": "10",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    # No management API on the shared broker: point at a closed port unless a test says otherwise.
    monkeypatch.setenv("INFERQ_MANAGEMENT_URL", f"http://127.0.0.1:{free_port()}")
    yield values
    settings = InferqSettings(amqp_url=AMQP_URL, jobs_queue=values["INFERQ_JOBS_QUEUE"])
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    delete_topology(channel, settings.model_copy(update={"results_queue": values["INFERQ_RESULTS_QUEUE"]}))
    connection.close()


@pytest.fixture
def channel(env: dict[str, str]) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on the real broker with the test's queues declared exactly as inferq declares them."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    ch = connection.channel()
    settings = InferqSettings(jobs_queue=env["INFERQ_JOBS_QUEUE"], results_queue=env["INFERQ_RESULTS_QUEUE"])
    declare_topology(ch, settings)
    yield ch
    if connection.is_open:
        connection.close()


@pytest.fixture
def published_model(env: dict[str, str]) -> str:
    """Model ``tiny`` with versions 1 and 2, alias ``champion`` on 1."""
    store = LocalModelStore(env["INFERQ_MODEL_STORE"])
    publish(store, "tiny", tiny_model(), alias="champion")
    publish(store, "tiny", tiny_model())
    return "tiny"
