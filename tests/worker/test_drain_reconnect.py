"""Drain mode across a real reconnect: the connection to the broker is cut (reset by the network path)
mid-drain and again while the drain's final question is unanswered; the worker reconnects, the drain
still ends, and every job has its one result."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from support import AMQP_URL, Env, Models, audit, make_job, wait_for
from tcp_proxy import TcpProxy

from inferq.worker.worker import Worker, build_worker

pytestmark = pytest.mark.broker


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    broker = urlsplit(AMQP_URL)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    yield proxy
    proxy.close()


def cut_at_the_final_question(worker: Worker, proxy: TcpProxy) -> list[int]:
    """Cut the connection right after the drain's first final depth question is sent (asked when the
    worker no longer consumes), so its answer never comes. Returns the epochs at which it cut."""
    ask: Callable[[Callable[[int], None]], None] = worker.consumer.queue_depth
    cuts: list[int] = []

    def asked(on_count: Callable[[int], None]) -> None:
        ask(on_count)
        if not worker.consumer.ready and not cuts:
            cuts.append(worker.consumer.epoch)
            proxy.cut()

    worker.consumer.queue_depth = asked  # type: ignore[method-assign]
    return cuts


def test_a_drain_cut_off_mid_drain_and_at_its_final_check_reconnects_and_still_ends(
    iris_store: Env, models: Models, proxy: TcpProxy
) -> None:
    # Given a backlog, and a draining worker whose broker connection goes through a proxy
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(600)]
    iris_store.submit(jobs)
    broker = urlsplit(AMQP_URL)
    amqp_url = broker._replace(netloc=f"{broker.username}:{broker.password}@127.0.0.1:{proxy.port}").geturl()
    worker = build_worker(iris_store.worker_settings(amqp_url=amqp_url, prefetch=50, heartbeat_s=2), drain=True)
    final_cuts = cut_at_the_final_question(worker, proxy)
    drained = threading.Thread(target=worker.run, daemon=True)
    drained.start()
    # When the connection is reset mid-drain, with jobs in flight
    wait_for(lambda: len(iris_store.stored()) >= 100, timeout_s=60)
    first_epoch = worker.consumer.epoch
    proxy.cut()
    # (and again when the drain asks its final question, once the queue looks empty)
    drained.join(timeout=60)
    # Then the worker reconnected each time, and the drain still ended (it used to hang after a
    # reconnect at the final check: the check was never reset, nor the cancel undone)
    assert not drained.is_alive(), "the drain did not end after the reconnect"
    assert final_cuts and final_cuts[0] > first_epoch, "the final question was never cut off"
    assert worker.consumer.epoch > final_cuts[0]
    assert worker.consumer.failure is None and not worker.counters.forced
    # And every job has exactly one result, stored and published, and no queue holds any
    report = audit(iris_store, {j.id for j in jobs})
    assert report.stored == len(jobs)
