"""A guarded alias move on an S3 model store (SeaweedFS): two workers, one rollback, later jobs succeed."""

from __future__ import annotations

import time

import pytest
from support import BackgroundWorker, Env, Models
from test_alias_guard import REFRESH_S, champion, guarded_move, renamed_input_onnx, send_until_rolled_back, send_wave

from inferq.model_store.base import publish
from inferq.model_store.history import read_history
from inferq.shared.contract.messages import Status

pytestmark = [pytest.mark.broker, pytest.mark.s3]


def test_two_workers_on_s3_roll_back_exactly_once(s3_env: Env, models: Models) -> None:
    # Given champion guarded onto a version every job fails on, in an S3 model store
    publish(s3_env.store, "iris", models.forest_onnx, alias="champion")
    publish(s3_env.store, "iris", renamed_input_onnx())
    guarded_move(s3_env, 2)
    settings = s3_env.worker_settings(alias_refresh_s=REFRESH_S, max_batch_rows=4)
    with BackgroundWorker(settings) as first, BackgroundWorker(settings) as second:
        # When two workers serve its jobs
        send_until_rolled_back(s3_env, models)
        for background in (first, second):
            assert background.worker.processor.guards.settle(10)
        time.sleep(2 * REFRESH_S)  # the other worker follows within its refresh interval
        later = send_wave(s3_env, models, 10)
        rollbacks = first.worker.processor.guards.rollbacks + second.worker.processor.guards.rollbacks
    # Then exactly one rolled it back, the history says so once, and later jobs succeed on version 1
    assert rollbacks == 1 and champion(s3_env) == 1
    assert [m.by.startswith("guard") for m in read_history(s3_env.store, "iris")] == [False, False, True]
    assert {(r.status, r.version) for r in later} == {(Status.SUCCEEDED, 1)}
