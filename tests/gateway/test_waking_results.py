"""A request waiting for its result is woken by the result itself: each replica of ``inferq serve`` consumes
the result notifications on a queue of its own, and reads the result store only as a fallback (a lost
notification, a reconnect). The gateway runs in this process (its result store wrapped to count reads),
against the real broker and a real worker."""

from __future__ import annotations

import subprocess
import threading
import uuid
from typing import Any

import httpx
import numpy as np
import pika
import pytest
from gateway_support import oip_request
from private_broker import free_port
from support import BackgroundWorker, Env, Models, audit, make_job, wait_for

from inferq.gateway.server import build_gateway, server_for
from inferq.gateway.service import Gateway
from inferq.gateway.settings import GatewaySettings
from inferq.shared.results.base import ResultStore

pytestmark = pytest.mark.broker

REQUESTS = 20
NEVER_S = 600.0
"""A fallback poll interval no test waits for: an answer before it came from a notification."""


class CountingReads:
    """A result store that counts the reads of the gateway (``get`` and ``get_many`` calls)."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.reads = 0

    def get(self, job_id: str) -> Any:
        self.reads += 1
        return self.store.get(job_id)

    def get_many(self, job_ids: Any) -> Any:
        self.reads += 1
        return self.store.get_many(job_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class InProcessGateway:
    """``inferq serve``'s server on a thread of this process, its result store's reads counted."""

    def __init__(self, env: Env, *, fallback_poll_s: float) -> None:
        self.port = free_port()
        settings = GatewaySettings(**env._settings(http_host="127.0.0.1", http_port=self.port))
        self.gateway: Gateway = build_gateway(settings, fallback_poll_s=fallback_poll_s)
        self.results = CountingReads(self.gateway.results)
        self.gateway.results = self.results  # type: ignore[assignment]
        self.server = server_for(self.gateway)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def listening(self) -> bool:
        listener = self.gateway.listener
        return listener is not None and listener.listening.is_set()

    def __enter__(self) -> InProcessGateway:
        self._thread.start()
        wait_for(lambda: self.server.started and self.listening, timeout_s=30)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive(), "the gateway did not stop"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)


@pytest.fixture
def rows(models: Models) -> np.ndarray:
    return models.X[::7][:REQUESTS]


def _ask(http: httpx.Client, row: np.ndarray, job_id: str) -> httpx.Response:
    body = oip_request([row.tolist()], id=job_id)
    return http.post("/v2/models/iris/versions/1/infer", json=body, headers={"Prefer": "wait=30"})


def _answers_with_the_forests_label(response: httpx.Response, job_id: str, row: np.ndarray, models: Models) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == job_id
    labels = {o["name"]: o["data"] for o in body["outputs"]}["label"]
    assert labels == models.forest.predict(row.reshape(1, -1)).tolist()


def test_a_waiting_request_is_answered_by_the_notification_without_reading_the_store(
    iris_store: Env, models: Models, rows: np.ndarray
) -> None:
    env = iris_store
    # Given a gateway whose safety-net read of the store would come only after ten minutes, and a worker
    with InProcessGateway(env, fallback_poll_s=NEVER_S) as served, BackgroundWorker(env.worker_settings()):
        reads_before = served.results.reads  # ids chosen by the client are looked up once at admission
        # When requests wait for their results, one after another
        ids = [f"woken-{i}-{uuid.uuid4().hex[:8]}" for i in range(REQUESTS)]
        with served.client() as http:
            for job_id, row in zip(ids, rows, strict=True):
                _answers_with_the_forests_label(_ask(http, row, job_id), job_id, row, models)
        # Then each was answered with its own result, and the store was read only to admit each id
        assert served.results.reads - reads_before == REQUESTS
        assert len(served.gateway.waiters) == 0
    audit(env, {job_id: make_job([row.tolist()], version=1, id=job_id) for job_id, row in zip(ids, rows, strict=True)})


def test_a_request_without_an_id_reads_the_store_not_once(iris_store: Env, models: Models, rows: np.ndarray) -> None:
    env = iris_store
    with InProcessGateway(env, fallback_poll_s=NEVER_S) as served, BackgroundWorker(env.worker_settings()):
        with served.client() as http:
            for row in rows[:5]:
                body = oip_request([row.tolist()])
                response = http.post("/v2/models/iris/versions/1/infer", json=body, headers={"Prefer": "wait=30"})
                _answers_with_the_forests_label(response, response.json()["id"], row, models)
        # The id was made up here: nothing can be stored under it before, and the notification answers
        assert served.results.reads == 0


def test_a_result_stored_without_a_notification_is_found_in_the_store(
    iris_store: Env, models: Models, rows: np.ndarray
) -> None:
    env = iris_store
    elsewhere = f"{env.prefix}.elsewhere"
    # Given a worker whose result notifications go to an exchange the gateway does not hear
    worker = env.worker_settings(results_exchange=elsewhere)
    try:
        with InProcessGateway(env, fallback_poll_s=0.5) as served, BackgroundWorker(worker):
            # When requests wait for their results
            ids = [f"unheard-{i}-{uuid.uuid4().hex[:8]}" for i in range(5)]
            with served.client() as http:
                for job_id, row in zip(ids, rows[: len(ids)], strict=True):
                    # Then each is still answered with its own result, read from the store
                    _answers_with_the_forests_label(_ask(http, row, job_id), job_id, row, models)
            assert served.results.reads > len(ids)
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
        connection.channel().exchange_delete(elsewhere)
        connection.close()


def test_a_replica_whose_notification_queue_was_deleted_listens_again_and_answers(
    iris_store: Env, models: Models, rows: np.ndarray
) -> None:
    env = iris_store
    with InProcessGateway(env, fallback_poll_s=NEVER_S) as served:
        listener = served.gateway.listener
        assert listener is not None
        first = listener.queues()
        # Given a request waiting for a job no worker has taken yet
        job_id = f"requeued-{uuid.uuid4().hex[:8]}"
        answered: list[httpx.Response] = []
        with served.client() as http:
            waiting = threading.Thread(target=lambda: answered.append(_ask(http, rows[0], job_id)))
            waiting.start()
            wait_for(lambda: len(served.gateway.waiters) == 1)
            # When an operator deletes the replica's result queue (the broker cancels its consumer; the queue
            # is exclusive to the replica's connection, so only the broker's own tool can)
            (results_queue,) = [queue for queue in first if ".gateway-results." in queue]
            command = ["rabbitmqctl", "delete_queue", results_queue]
            deleted = subprocess.run(command, check=False, capture_output=True, text=True)
            assert deleted.returncode == 0, deleted.stderr
            # Then it listens again on new queues, and the request is answered once a worker ran the job
            wait_for(lambda: served.listening and listener.queues() and listener.queues() != first, timeout_s=30)
            with BackgroundWorker(env.worker_settings()):
                waiting.join(60)
                assert answered, "the waiting request was not answered"
                _answers_with_the_forests_label(answered[0], job_id, rows[0], models)
                # And a request after that is woken by its notification again: one read, at admission
                reads = served.results.reads
                second = f"after-{uuid.uuid4().hex[:8]}"
                _answers_with_the_forests_label(_ask(http, rows[1], second), second, rows[1], models)
                assert served.results.reads == reads + 1


def test_a_stopping_gateway_answers_a_waiting_request_at_once(iris_store: Env, rows: np.ndarray) -> None:
    env = iris_store
    with InProcessGateway(env, fallback_poll_s=NEVER_S) as served:
        answered: list[httpx.Response] = []

        def ask() -> None:
            body = oip_request([rows[0].tolist()])
            with served.client() as http:
                answered.append(http.post("/v2/models/iris/infer", json=body, headers={"Prefer": "wait=60"}))

        # Given a request that may wait a minute for a job no worker runs
        waiting = threading.Thread(target=ask)
        waiting.start()
        wait_for(lambda: len(served.gateway.waiters) == 1)
        # When the gateway begins to stop
        served.gateway.begin_stop()
        waiting.join(30)
        # Then the request is answered with its operation (202) before its wait ran out
        assert not waiting.is_alive() and answered
        assert answered[0].status_code == 202, answered[0].text
