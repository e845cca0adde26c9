"""Dead-lettering is at least once: a job that reaches its delivery limit while the dead-letter queue
cannot take it (here: it is gone for a while) stays in its queue until it can be moved, never dropped.

A private node, because the test tunes how soon the broker tries a dead letter again (three minutes by
default)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from private_broker import PrivateBroker

from inferq.shared.broker.amqp import declare_topology, delete_topology
from inferq.shared.broker.topology import dead_letters_exchange, dlq_queue, jobs_queue
from inferq.shared.config.settings import InferqSettings

pytestmark = pytest.mark.broker

JOBS = 2_000
MAX_DELIVERIES = 2


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateBroker]:
    node = PrivateBroker()
    node.start()
    # A refused dead letter is tried again after this long (the broker's default is 180 s).
    node.ctl("eval", "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, 1000).")
    yield node
    node.stop()


def _settings(broker: PrivateBroker) -> InferqSettings:
    return InferqSettings(amqp_url=broker.url, jobs_queue=f"dlx.{uuid.uuid4().hex[:8]}", max_deliveries=MAX_DELIVERIES)


def _ready(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def _return_until_dead(channel: Any, queue: str) -> None:
    """Take every job and hand it back, again and again, until the broker stops delivering them."""
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 2.0:
        method, _props, _body = channel.basic_get(queue)
        if method is None:
            time.sleep(0.05)
            continue
        quiet_since = time.monotonic()
        channel.basic_nack(method.delivery_tag, requeue=True)


def _wait_for_depth(channel: Any, queue: str, depth: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (seen := _ready(channel, queue)) != depth and time.monotonic() < deadline:
        time.sleep(0.5)
    return seen


def _dead_letter_while_gone(settings: InferqSettings, jobs_arguments: dict[str, Any], wait_s: float = 60) -> int:
    """Publish ``JOBS`` jobs, delete the dead-letter queue, return every job until the broker dead-letters
    it, then declare the dead-letter queue again: how many jobs arrive there."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url.get_secret_value()))
    channel = connection.channel()
    try:
        declare_topology(channel, settings)
        if jobs_arguments != jobs_queue(settings).arguments:
            channel.queue_delete(settings.jobs_queue)
            channel.queue_declare(settings.jobs_queue, durable=True, arguments=jobs_arguments)
        channel.queue_delete(settings.dlq_queue)
        channel.confirm_delivery()
        for n in range(JOBS):
            props = pika.BasicProperties(message_id=f"job-{n}", delivery_mode=2)
            channel.basic_publish("", settings.jobs_queue, b"{}", props, mandatory=True)
        _return_until_dead(channel, settings.jobs_queue)
        assert _ready(channel, settings.jobs_queue) == 0  # every job was dead-lettered, none is ready
        dlq = dlq_queue(settings)  # the dead-letter queue is back
        channel.queue_declare(dlq.name, durable=True, arguments=dlq.arguments)
        channel.queue_bind(dlq.name, dead_letters_exchange(settings), "#")
        return _wait_for_depth(channel, settings.dlq_queue, JOBS, timeout_s=wait_s)
    finally:
        delete_topology(channel, settings)
        connection.close()


def test_a_job_dead_lettered_while_the_dead_letter_queue_is_gone_waits_and_arrives(broker: PrivateBroker) -> None:
    settings = _settings(broker)

    arrived = _dead_letter_while_gone(settings, jobs_queue(settings).arguments)

    assert arrived == JOBS


def test_at_most_once_dead_lettering_would_have_dropped_them(broker: PrivateBroker) -> None:
    # The control: the arguments the jobs queue was declared with before (no strategy: at most once) lose
    # every job the same sequence dead-letters, which is what the test above proves cannot happen now.
    settings = _settings(broker)
    before = {
        "x-queue-type": "quorum",
        "x-delivery-limit": MAX_DELIVERIES,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": settings.dlq_queue,
        "x-max-length": settings.max_queue_length,
        "x-overflow": "reject-publish",
    }

    # (Ten seconds: the broker tries a dead letter again every second here.)
    arrived = _dead_letter_while_gone(settings, before, wait_s=10)

    assert arrived == 0
