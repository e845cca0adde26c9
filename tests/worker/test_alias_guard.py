"""Guarded alias moves against the real broker, workers and stores: a move to a version that fails its jobs
rolls itself back, a good one stays, two workers roll back once, and a restart keeps the count."""

from __future__ import annotations

import re
import time

import orjson
import pytest
from onnx import TensorProto, helper
from support import BackgroundWorker, Env, Models, make_job, wait_for

from inferq.model_store.base import publish
from inferq.model_store.guard import GuardState, read_guards
from inferq.model_store.history import read_history
from inferq.shared.contract.messages import Result, Status
from inferq.shared.errors import ErrorCode

pytestmark = pytest.mark.broker

WINDOW = 20
REFRESH_S = 0.2
RATE = 0.2


def renamed_input_onnx() -> bytes:
    """A model like iris's whose input is named ``features``: every job sending ``X`` gets input_mismatch."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features"], ["Y"])],
        "renamed",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def guarded_move(env: Env, version: int, *, window: int = WINDOW) -> None:
    moved = env.inferq(
        "models", "alias", "iris", "champion", str(version),
        "--guard-error-rate", str(RATE), "--guard-window", str(window), "--reason", "try the new one",
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert f"champion -> version {version} (was 1); guarded: back to 1" in moved.stdout


def champion(env: Env) -> int:
    return env.store.read_aliases("iris")["champion"]


def send_wave(env: Env, models: Models, count: int) -> list[Result]:
    """``count`` jobs for ``iris@champion``; returns their results once all are stored."""
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version="champion") for i in range(count)]
    env.submit(jobs)
    wait_for(lambda: all(j.id in env.stored() for j in jobs), timeout_s=30)
    stored = env.stored()
    return [stored[j.id] for j in jobs]


def send_until_rolled_back(env: Env, models: Models, *, max_waves: int = 12) -> list[Result]:
    """Waves of 5 jobs until the alias is back on version 1; every result sent before that."""
    results: list[Result] = []
    for _ in range(max_waves):
        results += send_wave(env, models, 5)
        try:
            wait_for(lambda: champion(env) == 1, timeout_s=0.5)
            return results
        except AssertionError:
            continue
    raise AssertionError(f"champion still on {champion(env)} after {len(results)} jobs")


@pytest.fixture
def bad_version(env: Env, models: Models) -> Env:
    """iris v1 (champion, good) and v2, whose input has another name than the callers send."""
    publish(env.store, "iris", models.forest_onnx, alias="champion")
    publish(env.store, "iris", renamed_input_onnx())
    return env


def test_a_guarded_move_to_a_failing_version_rolls_back_and_later_jobs_succeed(
    bad_version: Env, models: Models
) -> None:
    env = bad_version
    # Given champion guarded onto a version every caller's job fails on
    guarded_move(env, 2)
    with BackgroundWorker(env.worker_settings(alias_refresh_s=REFRESH_S)) as background:
        # When the callers keep sending jobs to champion
        results = send_until_rolled_back(env, models)
        # Then champion went back to version 1 after about WINDOW failed jobs
        failed = [r for r in results if r.status is Status.FAILED]
        assert WINDOW <= len(failed) <= WINDOW + 15, len(failed)
        # and each failure names the version its alias resolved to
        assert {(r.version, r.error.code if r.error else None) for r in failed} == {(2, ErrorCode.INPUT_MISMATCH)}
        # and jobs sent afterwards succeed, on version 1
        later = send_wave(env, models, 10)
        assert {(r.status, r.version) for r in later} == {(Status.SUCCEEDED, 1)}
        # and the worker counted the rollback in its metrics
        assert (
            'inferq_alias_rollbacks_total{alias="champion",model="iris"} 1.0'
            in background.worker.metrics.render().decode()
        )
    # And the history shows the guarded move, then the guard's rollback, with its reason
    history = env.inferq("models", "history", "iris")
    assert history.returncode == 0, history.stderr
    rows = history.stdout.splitlines()[1:]
    assert re.search(r"champion\s+1\s+2\s+\S+@\S+\s+try the new one; guarded: error rate > 20% over 20 jobs", rows[-2])
    assert re.search(
        r"champion\s+2\s+1\s+guard of move \w{8}\s+rolled back: \d+ of \d+ jobs on version 2 failed", rows[-1]
    )
    guard = read_guards(env.store, "iris")["champion"]
    assert guard.state is GuardState.ROLLED_BACK and guard.failed >= WINDOW


def test_a_guarded_move_to_a_good_version_stays_and_the_history_lists_every_move(
    bad_version: Env, models: Models
) -> None:
    env = bad_version
    publish(env.store, "iris", models.logistic_onnx)  # version 3: a good one
    # Given a guarded move to the bad version, rolled back
    guarded_move(env, 2)
    with BackgroundWorker(env.worker_settings(alias_refresh_s=REFRESH_S)):
        send_until_rolled_back(env, models)
        # When champion is then guarded onto the good version and serves a window of jobs
        guarded_move(env, 3)
        wait_for(lambda: send_wave(env, models, 1)[0].version == 3, timeout_s=10)
        results = send_wave(env, models, WINDOW)
        wait_for(lambda: read_guards(env.store, "iris")["champion"].state is GuardState.PASSED, timeout_s=10)
    # Then it stays there, every job succeeded, and the history lists both moves and both verdicts
    assert champion(env) == 3
    assert {r.status for r in results} == {Status.SUCCEEDED}
    listed = env.inferq("models", "history", "iris", "--json")
    assert listed.returncode == 0, listed.stderr
    moves = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [(m["from_version"], m["to_version"], m["by"].startswith("guard")) for m in moves] == [
        (None, 1, False),  # published with the alias
        (1, 2, False),
        (2, 1, True),  # rolled back
        (1, 3, False),
        (3, 3, True),  # kept
    ]
    assert moves[1]["guard"] == {"error_rate": RATE, "min_accuracy": None, "window": WINDOW}
    assert moves[2]["reason"].startswith(f"rolled back: {WINDOW} of {WINDOW} jobs on version 2 failed")
    assert moves[3]["guard_status"]["state"] == "passed" and moves[3]["guard_status"]["failed"] == 0
    assert moves[4]["reason"].startswith("kept: 0 of ")


def test_two_workers_roll_back_exactly_once(bad_version: Env, models: Models) -> None:
    env = bad_version
    guarded_move(env, 2)
    # Given two workers consuming champion's jobs
    with (
        BackgroundWorker(env.worker_settings(alias_refresh_s=REFRESH_S, max_batch_rows=4)) as first,
        BackgroundWorker(env.worker_settings(alias_refresh_s=REFRESH_S, max_batch_rows=4)) as second,
    ):
        # When enough of them fail
        send_until_rolled_back(env, models)
        for background in (first, second):
            assert background.worker.processor.guards.settle(10)
        time.sleep(2 * REFRESH_S)  # the other worker follows the alias back within its refresh interval
        later = send_wave(env, models, 10)
        rollbacks = first.worker.processor.guards.rollbacks + second.worker.processor.guards.rollbacks
    # Then exactly one of them rolled champion back: one rollback, one history entry
    assert rollbacks == 1
    assert [m.by.startswith("guard") for m in read_history(env.store, "iris")] == [False, False, True]
    assert {r.status for r in later} == {Status.SUCCEEDED}


def test_a_worker_restart_mid_window_keeps_the_count(bad_version: Env, models: Models) -> None:
    env = bad_version
    guarded_move(env, 2, window=10)
    first = [make_job(models.X[i : i + 1], version="champion") for i in range(6)]
    env.submit(first)
    # Given a worker process that ran 6 of the window's 10 jobs and exited
    drained = env.inferq("worker", "--drain", INFERQ_ALIAS_REFRESH_S=str(REFRESH_S), INFERQ_METRICS_PORT="0")
    assert drained.returncode == 0, drained.stderr
    guard = read_guards(env.store, "iris")["champion"]
    assert (guard.failed, guard.state) == (6, GuardState.WATCHING)  # counted before the process ended
    assert champion(env) == 2
    # When a new worker runs 4 more
    env.submit([make_job(models.X[i : i + 1], version="champion") for i in range(4)])
    env.drain(alias_refresh_s=REFRESH_S)
    # Then those complete the window, and champion is rolled back
    wait_for(lambda: champion(env) == 1, timeout_s=10)
    guard = read_guards(env.store, "iris")["champion"]
    assert (guard.failed, guard.state) == (10, GuardState.ROLLED_BACK)


def test_a_guard_needs_an_alias_to_return_to(bad_version: Env) -> None:
    env = bad_version
    fresh = env.inferq("models", "alias", "iris", "canary", "2", "--guard-error-rate", "0.1", "--guard-window", "5")
    assert fresh.returncode != 0 and "does not exist yet" in fresh.stderr and len(fresh.stderr.splitlines()) == 1
    half = env.inferq("models", "alias", "iris", "champion", "2", "--guard-window", "5")
    assert half.returncode != 0 and "give --guard-window with" in half.stderr
    assert champion(env) == 1 and "canary" not in env.store.read_aliases("iris")
