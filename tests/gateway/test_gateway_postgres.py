"""Two gateway replicas sharing their operation records through the real PostgreSQL: an id accepted
by one is queued (and conflicts) on the other, and the job is published once."""

from __future__ import annotations

import psycopg
import pytest
from gateway_support import ASYNC, GatewayProcess, oip_request
from support import Env

pytestmark = [pytest.mark.broker, pytest.mark.postgres]


def test_replicas_on_postgres_share_operations(iris_store: Env, postgres_url: str) -> None:
    extra = {"INFERQ_OPERATIONS_STORE": postgres_url}
    with (
        GatewayProcess(iris_store, iris_store.tmp, **extra) as first,
        GatewayProcess(iris_store, iris_store.tmp, **extra) as second,
        first.client() as a,
        second.client() as b,
    ):
        body = oip_request([[5.1, 3.5, 1.4, 0.2]], id="pg-shared")
        assert a.post("/v2/models/iris/infer", json=body, headers=ASYNC).status_code == 202
        assert b.get("/v2/operations/pg-shared").json()["status"] == "queued"
        # the same body: the same operation
        assert b.post("/v2/models/iris/infer", json=body, headers=ASYNC).status_code == 202
        other = oip_request([[1.0, 1.0, 1.0, 1.0]], id="pg-shared")
        assert b.post("/v2/models/iris/infer", json=other).json()["code"] == "id_conflict"
    assert iris_store.depth(iris_store.jobs_queue) == 1
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT id, model, requested_version, confirmed FROM inferq_operations").fetchall()
    assert rows == [("pg-shared", "iris", "latest", True)]
