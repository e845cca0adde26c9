"""Results are published to a topic exchange: a consumer binds only what it needs, and the default
results queue, bound to everything, stays bounded while the result store keeps every result."""

from __future__ import annotations

import numpy as np
import pika
import pytest
from support import Env, Models, make_job

from inferq.producer.client import Producer
from inferq.shared.contract.messages import Result, Status

pytestmark = pytest.mark.broker


def test_a_consumer_bound_to_failed_results_gets_only_those(iris_store: Env, models: Models) -> None:
    # Given a queue of our own bound to failed iris results only
    connection = pika.BlockingConnection(pika.URLParameters(iris_store.amqp_url))
    channel = connection.channel()
    iris_store.submit([make_job(models.X[:1])])  # declares the topology
    iris_store.drain()
    mine = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(mine, iris_store.results_queue, "iris.failed")
    # When good and bad jobs run
    good = [make_job(models.X[i : i + 1]) for i in range(5)]
    bad = [make_job(np.ones((1, 3)), id=f"narrow-{i}") for i in range(3)]
    iris_store.submit(good + bad)
    iris_store.drain()
    # Then our queue holds exactly the failures, and the default queue every result
    ours = []
    while (message := channel.basic_get(mine, auto_ack=True))[0] is not None:
        ours.append(Result.model_validate_json(message[2]))
    connection.close()
    assert sorted(r.id for r in ours) == sorted(j.id for j in bad)
    assert all(r.status is Status.FAILED for r in ours)
    assert len(iris_store.results_on_queue()) == 1 + len(good) + len(bad)


def test_the_default_results_queue_drops_its_oldest_notifications_when_full(iris_store: Env, models: Models) -> None:
    # Given a deployment whose results queue is bounded to 10 notifications
    jobs = [make_job(models.X[i % 150 : i % 150 + 1]) for i in range(300)]
    with Producer(iris_store.producer_settings(results_max_length=10)) as producer:
        producer.publish_many(jobs)
    # When 300 jobs finish
    counters = iris_store.drain(results_max_length=10)
    # Then every result is stored and the queue holds only the newest few notifications
    assert counters.succeeded == len(jobs)
    assert len(iris_store.stored()) == len(jobs)
    on_queue = [r.id for r in iris_store.results_on_queue()]
    assert 0 < len(on_queue) <= 10
    assert set(on_queue) <= {j.id for j in jobs[-64:]}, "the oldest notifications went first"
