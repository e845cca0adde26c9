"""The gateway's answers when something is wrong: no token, a full jobs queue, a SIGTERM in the middle
of traffic, two replicas. Each test runs its own ``inferq serve`` on its own queues."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gateway_support import ASYNC, GatewayProcess, oip_request
from support import Env, wait_for

from inferq.model_store.base import publish

pytestmark = pytest.mark.broker

ROW = [[5.1, 3.5, 1.4, 0.2]]
TOKEN = "s3cret-token-" + uuid.uuid4().hex


def test_with_a_token_set_requests_without_it_get_401_and_probes_stay_open(iris_store: Env) -> None:
    with GatewayProcess(iris_store, iris_store.tmp, INFERQ_API_TOKEN=TOKEN) as gateway, gateway.client() as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN}):
            response = http.post("/v2/models/iris/infer", json=oip_request(ROW), headers=headers)
            assert response.status_code == 401, response.text
            assert response.json()["code"] == "unauthorized" and response.headers["WWW-Authenticate"].startswith(
                "Bearer"
            )
        assert http.get("/v2/operations/x").status_code == 401
        assert http.get("/v2/models/iris").status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert http.post("/v2/models/iris/infer", json=oip_request(ROW), headers={**good, **ASYNC}).status_code == 202
        # (no worker: the synchronous path's wait runs out, into the same 202)
        waited = http.post("/v2/models/iris/infer", json=oip_request(ROW), headers={**good, "Prefer": "wait=0.2"})
        assert waited.status_code == 202, waited.text
        assert http.get("/v2/models/iris/ready").status_code == 401 and http.get("/v2").status_code == 401
        assert http.get("/v2", headers=good).json()["name"] == "inferq"
        assert http.get("/v2/models/iris", headers=good).status_code == 200
        assert http.get("/v2/health/live").status_code == 200 and http.get("/v2/health/ready").status_code == 200
        assert http.get("/metrics").status_code == 200
    assert TOKEN not in gateway.log()


def test_a_full_jobs_queue_gets_429_with_retry_after_and_nothing_refused_is_queued(iris_store: Env) -> None:
    extra = {"INFERQ_MAX_QUEUE_LENGTH": "20"}
    with GatewayProcess(iris_store, iris_store.tmp, **extra) as gateway, gateway.client() as http:
        ids = [f"full-{i}" for i in range(300)]

        def submit(job_id: str) -> httpx.Response:
            return http.post("/v2/models/iris/infer", json=oip_request(ROW, id=job_id), headers=ASYNC)

        with ThreadPoolExecutor(16) as pool:
            responses = dict(zip(ids, pool.map(submit, ids), strict=True))
        statuses = Counter(r.status_code for r in responses.values())
        accepted = {job_id for job_id, r in responses.items() if r.status_code == 202}
        refused = [r for r in responses.values() if r.status_code == 429]
        # Then the broker's bound decided: every 202 is queued, every 429 says when to come back
        assert set(statuses) == {202, 429} and statuses[202] >= 20, statuses
        assert all(r.json()["code"] == "queue_full" and r.headers["Retry-After"] == "1" for r in refused)
        assert iris_store.depth(iris_store.jobs_queue) == len(accepted)
        # And an id refused was never accepted, and the gateway says it is not ready
        refused_id = next(job_id for job_id, r in responses.items() if r.status_code == 429)
        assert http.get(f"/v2/operations/{refused_id}").status_code == 404
        wait_for(lambda: http.get("/v2/health/ready").status_code == 503, timeout_s=10)
        assert http.get("/v2/health/ready").json()["code"] == "not_ready"
        # When a worker drains the queue, a refused job resubmitted is accepted
        iris_store.drain(max_queue_length=20)
        wait_for(lambda: submit(refused_id).status_code == 202, timeout_s=10)  # as a client obeying Retry-After
    queued = {props.message_id for props, _ in iris_store.read_queue(iris_store.jobs_queue)}
    assert queued == {refused_id}
    assert set(iris_store.stored()) == accepted


def test_sigterm_lets_requests_in_flight_finish_and_every_202_is_queued(iris_store: Env) -> None:
    gateway = GatewayProcess(iris_store, iris_store.tmp).start()
    answers: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(n: int) -> None:
        with gateway.client() as http:
            i = 0
            while not stop.is_set():
                job_id = f"term-{n}-{i}"
                i += 1
                try:
                    status = http.post(
                        "/v2/models/iris/infer", json=oip_request(ROW, id=job_id), headers=ASYNC
                    ).status_code
                except httpx.TransportError:
                    status = 0  # refused or closed before a response: not accepted
                with lock:
                    answers[job_id] = status
                if status == 0:
                    return

    def waiting_request() -> httpx.Response:
        with gateway.client() as http:
            return http.post("/v2/models/iris/infer", json=oip_request(ROW, id="waiter"), headers={"Prefer": "wait=60"})

    with ThreadPoolExecutor(9) as pool:
        waiter = pool.submit(waiting_request)
        loops = [pool.submit(client_loop, n) for n in range(8)]
        wait_for(lambda: len(answers) > 200, timeout_s=30)
        started = time.monotonic()
        code = gateway.stop()
        stopped_in = time.monotonic() - started
        stop.set()
        for loop in loops:
            loop.result()
        # The request waiting for a result was answered 202 at once, not held to its 60 s
        assert waiter.result().status_code == 202

    assert code == 0, gateway.log()
    assert stopped_in < 20
    accepted = {job_id for job_id, status in answers.items() if status == 202} | {"waiter"}
    assert set(Counter(answers.values())) <= {202, 0}
    queued = [props.message_id for props, _ in iris_store.read_queue(iris_store.jobs_queue)]
    assert sorted(queued) == sorted(accepted)


def test_a_second_replica_sees_the_first_ones_operations(iris_store: Env, models: object) -> None:
    publish(iris_store.store, "other", iris_store.store.read_model("iris", 1))
    with (
        GatewayProcess(iris_store, iris_store.tmp) as first,
        GatewayProcess(iris_store, iris_store.tmp) as second,
        first.client() as a,
        second.client() as b,
    ):
        assert a.post("/v2/models/iris/infer", json=oip_request(ROW, id="shared-id"), headers=ASYNC).status_code == 202
        assert b.get("/v2/operations/shared-id").json()["status"] == "queued"
        other = oip_request([[1.0, 1.0, 1.0, 1.0]], id="shared-id")
        assert b.post("/v2/models/iris/infer", json=other).status_code == 409
    assert iris_store.depth(iris_store.jobs_queue) == 1


def idle_connection_closed_by_server(url: str, idle_s: float) -> bool:
    """Send one request on a keep-alive connection, read the whole response, stay idle ``idle_s``, and
    tell whether the server has closed the connection by then."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/v2/health/live")
        response = connection.getresponse()
        assert response.status == 200 and response.read()
        time.sleep(idle_s)
        assert connection.sock is not None
        connection.sock.setblocking(False)
        try:
            return connection.sock.recv(1, socket.MSG_PEEK) == b""  # end of stream
        except BlockingIOError:
            return False  # nothing to read: still open
    finally:
        connection.close()


def test_an_idle_client_connection_stays_open_for_the_keep_alive_time(iris_store: Env) -> None:
    # Given a gateway with the default keep-alive and one with 1 s
    with GatewayProcess(iris_store, iris_store.tmp) as default:
        # Then a connection idle for 6 s is still open on the default one (75 s; uvicorn alone: 5 s)
        assert not idle_connection_closed_by_server(default.url, idle_s=6)
    with GatewayProcess(iris_store, iris_store.tmp, INFERQ_HTTP_KEEP_ALIVE_S="1") as short:
        # And closed by the other
        assert idle_connection_closed_by_server(short.url, idle_s=3)
