"""A model store that stops answering (black-holed: connections accepted, nothing ever answered) must
not stop the worker: heartbeats flow, jobs of models it already knows go on and are acked, and the
held jobs run once the store answers again.

The store stays silent for 12 s by default (twelve heartbeat intervals here: the broker would drop a
connection after two missed ones). The long proof, a full minute of silence (the test takes about
75 s), is run with:

    INFERQ_TEST_BLACK_HOLE_S=60 .venv/bin/python -m pytest tests/worker/test_model_store_outage.py
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from seaweedfs import SeaweedFS
from support import S3_BUCKET, BackgroundWorker, Env, Models, make_job, wait_for
from tcp_proxy import TcpProxy

from inferq.model_store.base import publish
from inferq.model_store.stores import open_model_store

pytestmark = [pytest.mark.broker, pytest.mark.s3]

BLACK_HOLE_S = float(os.environ.get("INFERQ_TEST_BLACK_HOLE_S", "12"))
"""How long the store stays silent, in seconds (60 for the long proof, see above; heartbeats are 1 s here)."""


@pytest.fixture
def proxy(seaweedfs: SeaweedFS) -> Iterator[TcpProxy]:
    endpoint = urlsplit(seaweedfs.endpoint)
    proxy = TcpProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80)
    yield proxy
    proxy.close()


def test_a_black_holed_model_store_neither_stops_heartbeats_nor_the_acks_of_other_models(
    env: Env, models: Models, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given models in S3, reached by the worker through a proxy, and one of them already in use
    env.model_location = f"s3://{S3_BUCKET}/{env.prefix}/models"
    publish(open_model_store(env.model_location), "known", models.forest_onnx)
    publish(open_model_store(env.model_location), "iris", models.logistic_onnx)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    settings = env.worker_settings(heartbeat_s=1, prefetch=10, alias_refresh_s=1)
    with BackgroundWorker(settings) as background:
        env.submit([make_job(models.X[:1], model="known")])
        wait_for(lambda: len(env.stored()) == 1, timeout_s=60)
        epoch = background.worker.consumer.epoch
        # When the store goes silent and jobs arrive: one for a model never resolved, then many for
        # the known one (more than the prefetch window)
        proxy.black_hole = True
        held = make_job(models.X[:1], model="iris")
        env.submit([held])
        others = [make_job(models.X[i : i + 1], model="known") for i in range(40)]
        env.submit(others)
        # Then the known model's jobs are all done and acked past the held one
        wait_for(lambda: all(j.id in env.stored() for j in others), timeout_s=60)
        assert held.id not in env.stored()
        # And the connection stays up for the whole outage (the broker drops a connection after two
        # missed heartbeats: 2 s here)
        deadline = time.monotonic() + BLACK_HOLE_S
        while time.monotonic() < deadline:
            assert env.consumers(env.jobs_queue) == 1
            time.sleep(1)
        assert background.worker.consumer.epoch == epoch, "the worker reconnected"
        # When the store answers again, the held job runs
        proxy.forward()
        wait_for(lambda: held.id in env.stored(), timeout_s=120)
    assert background.counters is not None and background.counters.failed == 0
