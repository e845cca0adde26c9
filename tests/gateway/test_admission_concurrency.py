"""Thousands of requests at once through the real ``inferq serve`` and two real ``inferq worker`` processes:
admitted in groups (one transaction, one round of confirms, per group), woken by their result
notifications, and each answered with its own job's result, never another's."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from gateway_support import GatewayProcess, oip_request
from support import Env, Models, audit, make_job, wait_for

from inferq.shared.contract.messages import Job

pytestmark = pytest.mark.broker

REQUESTS = 2000
IN_FLIGHT = 64
ASYNC_EVERY = 10
"""One request in ten asks for ``respond-async`` and reads its operation afterwards."""


@pytest.fixture
def workers(iris_store: Env) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = iris_store
    command = [sys.executable, "-m", "inferq", "worker"]
    started = [
        subprocess.Popen(command, env=env.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    yield started
    for worker in started:
        worker.send_signal(signal.SIGTERM)
    for worker in started:
        assert worker.wait(60) == 0


async def _send_all(url: str, rows: np.ndarray) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def send(i: int) -> httpx.Response:
            # Half the requests name their id, half leave it to the gateway
            body = oip_request([rows[i].tolist()], **({"id": f"many-{i}"} if i % 2 else {}))
            headers = {"Prefer": "respond-async"} if i % ASYNC_EVERY == 0 else {}
            async with gate:
                return await http.post("/v2/models/iris/versions/1/infer", json=body, headers=headers)

        return await asyncio.gather(*(send(i) for i in range(len(rows))))


def _waits_answered(metrics: str) -> dict[str, float]:
    found = re.findall(r'^inferq_http_waits_answered_total\{by="(\w+)"\} ([\d.e+]+)$', metrics, re.MULTILINE)
    return {"notification": 0.0, "store": 0.0} | {by: float(count) for by, count in found}


def test_thousands_of_concurrent_requests_are_each_answered_with_their_own_result(
    iris_store: Env, models: Models, workers: list[subprocess.Popen[bytes]]
) -> None:
    env = iris_store
    rows = np.random.default_rng(24).uniform(0, 8, (REQUESTS, 4)).astype(np.float32)
    expected = models.forest.predict(rows).tolist()
    with GatewayProcess(env, env.tmp) as gateway:
        # When 2,000 requests arrive, 64 at a time (a Python client on the same cores sets that pace)
        responses = asyncio.run(_send_all(gateway.url, rows))

        # Then each synchronous one is answered 200 with the label of its own row, under its own id
        jobs: dict[str, Job] = {}
        for i, response in enumerate(responses):
            body = response.json()
            if i % ASYNC_EVERY == 0:
                assert response.status_code == 202, response.text
            else:
                assert response.status_code == 200, response.text
                assert {o["name"]: o["data"] for o in body["outputs"]}["label"] == [expected[i]], i
            if i % 2:
                assert body["id"] == f"many-{i}"
            jobs[body["id"]] = make_job([rows[i].tolist()], version=1, id=body["id"])
        assert len(jobs) == REQUESTS

        # And each asynchronous one's operation ends with the label of its own row
        with gateway.client() as http:
            answered = _waits_answered(http.get("/metrics").text)
            for i in range(0, REQUESTS, ASYNC_EVERY):
                job_id = responses[i].json()["id"]
                wait_for(lambda j=job_id: http.get(f"/v2/operations/{j}").json()["status"] == "succeeded")
                result = http.get(f"/v2/operations/{job_id}").json()["result"]
                assert {o["name"]: o["data"] for o in result["outputs"]}["label"] == [expected[i]]
        # And the waits were answered by the result notifications (the store only as a fallback)
        assert sum(answered.values()) == REQUESTS - REQUESTS // ASYNC_EVERY
        assert answered["notification"] > 0
    # And every job has exactly its own stored result, nothing is left queued
    audit(env, jobs)
