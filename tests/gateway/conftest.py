"""Fixtures of the API's tests: its operation records in each kind of store; a world of models with one
API and one worker, per test module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_support import GatewayProcess
from support import BackgroundWorker, Env, Models, failing_model

from inferq.gateway.records import OperationStore, open_operation_store
from inferq.model_store.base import publish


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OperationStore]:
    """An operation store in SQLite, and in a fresh schema of the shared PostgreSQL (dropped afterwards)."""
    location = (
        f"sqlite:{tmp_path}/ops.db" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))
    )
    opened = open_operation_store(location)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Env]:
    """iris (a forest as ``champion``, then a logistic regression) and ``broken`` (fails every job)."""
    env = Env(tmp_path_factory.mktemp("gateway"), f"test.gw.{uuid.uuid4().hex[:12]}")
    publish(env.store, "iris", models.forest_onnx, alias="champion")
    publish(env.store, "iris", models.logistic_onnx)
    publish(env.store, "broken", failing_model())
    yield env
    env.delete_queues()


@pytest.fixture(scope="module")
def gateway(world: Env) -> Iterator[GatewayProcess]:
    with GatewayProcess(world, world.tmp) as process:
        yield process


@pytest.fixture(scope="module")
def worker(world: Env, gateway: GatewayProcess) -> Iterator[BackgroundWorker]:
    with BackgroundWorker(world.worker_settings()) as running:
        yield running
