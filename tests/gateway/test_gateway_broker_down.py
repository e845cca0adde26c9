"""A stopped broker: the gateway answers 503 with Retry-After (never hangs) and recovers by itself when
the broker is back. Runs on a private RabbitMQ node, never the shared one."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
from gateway_support import ASYNC, GatewayProcess, oip_request
from private_broker import PrivateBroker
from support import Env, wait_for

pytestmark = pytest.mark.broker

ROW = [[5.1, 3.5, 1.4, 0.2]]


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    broker = PrivateBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_a_stopped_broker_gets_503_with_retry_after_and_the_gateway_recovers(
    iris_store: Env, private_broker: PrivateBroker
) -> None:
    env = dataclasses.replace(iris_store, amqp_url=private_broker.url)
    extra = {"INFERQ_CONNECT_TIMEOUT_S": "2", "INFERQ_PUBLISH_TIMEOUT_S": "5"}
    with GatewayProcess(env, env.tmp, **extra) as gateway, gateway.client() as http:
        assert http.post("/v2/models/iris/infer", json=oip_request(ROW, id="before"), headers=ASYNC).status_code == 202
        private_broker.ctl("stop_app")
        # While the broker is down: 503 with Retry-After, within the connect timeout, never a hang
        started = time.monotonic()
        response = http.post("/v2/models/iris/infer", json=oip_request(ROW, id="during"))
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "broker_unavailable" and response.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 10
        wait_for(lambda: http.get("/v2/health/ready").status_code == 503, timeout_s=10)
        # When it is back, the same request is accepted
        private_broker.ctl("start_app")
        private_broker.wait_ready()

        def accepted() -> bool:
            return (
                http.post("/v2/models/iris/infer", json=oip_request(ROW, id="during"), headers=ASYNC).status_code == 202
            )

        wait_for(accepted, timeout_s=30)
        wait_for(lambda: http.get("/v2/health/ready").status_code == 200, timeout_s=10)
    queued = sorted(props.message_id for props, _ in env.read_queue(env.jobs_queue))
    assert "during" in queued and "before" in queued
