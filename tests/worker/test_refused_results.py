"""Result publishes the broker refuses, again and again: the jobs wait with their results stored, spend
none of their delivery attempts, and are acked once the broker takes the results again.

A queue that refuses every message (``x-max-length: 0`` with ``reject-publish``) bound to the results
exchange makes the broker nack every result publish, as it does while the results queue has no leader
after a node died. A long run of nacks also makes the worker replace its session (the channel may be
the one at fault), which returns its unacked jobs once; the prefetch here keeps that to a few times."""

from __future__ import annotations

import threading

import pika
import pytest
from support import Env, Models, audit, make_job, wait_for

from inferq.shared.config.settings import WorkerSettings
from inferq.worker.worker import Worker, build_worker

pytestmark = pytest.mark.broker

JOBS = 2_000
PREFETCH = 32
ROUNDS = 7
"""Refusals per job in flight before the broker takes results again: more than its delivery limit."""


def refusing_queue(env: Env, settings: WorkerSettings, *, bound: bool) -> None:
    """Bind (or delete) a queue that refuses everything routed to it, on the results exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    try:
        channel = connection.channel()
        name = f"{env.prefix}.refusing"
        if bound:
            channel.queue_declare(name, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
            channel.queue_bind(name, settings.results_exchange_name, "#")
        else:
            channel.queue_delete(name)
    finally:
        connection.close()


def test_refused_result_publishes_are_retried_without_spending_delivery_attempts(
    iris_store: Env, models: Models
) -> None:
    # Given thousands of jobs, and a broker that refuses every result publish
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(JOBS)]
    confirmed = set(iris_store.submit(jobs))
    settings = iris_store.worker_settings(prefetch=PREFETCH)
    assert settings.max_deliveries < ROUNDS
    refusing_queue(iris_store, settings, bound=True)
    worker: Worker = build_worker(settings, drain=True)
    drained = threading.Thread(target=worker.run, daemon=True)
    drained.start()
    try:
        # When the results of the jobs in flight are refused more times each than their delivery limit
        wait_for(lambda: worker.counters.publishes_refused >= PREFETCH * ROUNDS, timeout_s=120)
        # Then meanwhile nothing was dead-lettered, and the jobs in flight wait (their results stored)
        assert iris_store.depth(f"{iris_store.jobs_queue}.dlq") == 0
        assert 0 < len(iris_store.stored()) < JOBS and drained.is_alive()
    finally:
        # And once the broker takes results again, the drain finishes
        refusing_queue(iris_store, settings, bound=False)
        drained.join(timeout=120)
    assert not drained.is_alive(), "the drain did not finish"
    # With every job stored once, published once, nothing dead-lettered and the queues empty
    report = audit(iris_store, confirmed)  # (a refused publish may still reach the queues that took it)
    assert report.stored == JOBS and report.dead_lettered == 0
    # And the refusals cost no delivery attempts: jobs came back only with a replaced session (each job
    # in flight once per replacement), from the retry queue, or from the drain's closing cancel (a
    # delivery crossing it) - never for a refusal itself
    counters, sessions = worker.counters, worker.consumer.epoch
    redelivered = counters.received - JOBS
    assert redelivered <= sessions * PREFETCH + counters.quarantined < counters.publishes_refused, (
        f"{redelivered} redeliveries, {counters.publishes_refused} refusals, {sessions} sessions"
    )
