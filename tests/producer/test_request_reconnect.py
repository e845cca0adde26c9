"""``Producer.request`` when its connection drops while it waits: the reply queue of the old connection
is gone, yet the result is stored and must be returned, not reported as a timeout."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from private_broker import PrivateBroker
from support import Env, Models, make_job, wait_for

from inferq.model_store.base import publish
from inferq.producer.client import Producer
from inferq.shared.contract.messages import Result, Status

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def private_broker() -> Iterator[PrivateBroker]:
    broker = PrivateBroker()
    broker.start()
    yield broker
    broker.stop()


def test_a_result_stored_while_the_requester_reconnected_is_returned_not_a_timeout(
    tmp_path: Path, models: Models, private_broker: PrivateBroker
) -> None:
    # Given a requester waiting for the result of a queued job
    env = Env(tmp_path, f"request.{uuid.uuid4().hex[:8]}", amqp_url=private_broker.url)
    publish(env.store, "iris", models.forest_onnx)
    job = make_job(models.X[:1])
    outcome: dict[str, Result | BaseException] = {}

    def ask() -> None:
        try:
            with Producer(env.producer_settings(connect_timeout_s=60)) as producer:
                outcome["result"] = producer.request(job, timeout_s=30)
        except BaseException as exc:
            outcome["error"] = exc

    requester = threading.Thread(target=ask)
    requester.start()
    wait_for(lambda: env.depth(env.jobs_queue) == 1)

    # When the broker restarts under it (its connection and its reply queue go) and a worker runs the job
    private_broker.restart_app(down_s=1.0)
    assert env.drain().succeeded == 1
    requester.join(timeout=60)

    # Then the requester gets the stored result
    assert not requester.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, Result)
    assert result.id == job.id and result.status == Status.SUCCEEDED
    assert result == env.stored()[job.id]
