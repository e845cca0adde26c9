"""Guarded alias moves on live accuracy, against the real broker, workers and stores: labels that arrive
after the jobs (no job running) roll a move back once they make the accuracy low, exactly once across
two workers; right labels, some sent before their predictions, keep it; the history lists both."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from support import BackgroundWorker, Env, Models, make_job, wait_for
from test_alias_guard import champion, renamed_input_onnx, send_wave

from inferq.model_store.base import publish
from inferq.model_store.guard import GuardState, read_guards
from inferq.model_store.history import read_history
from inferq.monitoring.performance import guard_accuracy
from inferq.shared.contract.messages import Result, Status
from inferq.shared.results.stores import open_result_store
from inferq.worker import alias_guard

pytestmark = pytest.mark.broker

WINDOW = 20
MIN_ACCURACY = 0.8
REFRESH_S = 0.2
CHECK_S = 0.3


@pytest.fixture
def two_versions(env: Env, models: Models, monkeypatch: pytest.MonkeyPatch) -> Env:
    """iris v1 (champion) and v2, both classifiers; workers look at the labels every CHECK_S."""
    monkeypatch.setattr(alias_guard, "ACCURACY_CHECK_S", CHECK_S)
    publish(env.store, "iris", models.forest_onnx, alias="champion")
    publish(env.store, "iris", models.logistic_onnx)
    env.result_location = f"sqlite:{env.tmp / 'results.db'}"
    return env


def accuracy_move(env: Env, version: int) -> None:
    moved = env.inferq(
        "models", "alias", "iris", "champion", str(version), "--guard-min-accuracy", str(MIN_ACCURACY),
        "--guard-window", str(WINDOW), "--reason", "try it on live accuracy",
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert "guarded: back to 1 if accuracy < 80% over 20 labeled predictions" in moved.stdout


def run_on_champion(env: Env, models: Models, ids: list[str]) -> dict[str, Result]:
    """One job per id on ``iris@champion``; their results once stored."""
    env.submit([make_job(models.X[n % 150 : n % 150 + 1], version="champion", id=i) for n, i in enumerate(ids)])
    wait_for(lambda: all(i in env.stored() for i in ids), timeout_s=30)
    stored = env.stored()
    return {i: stored[i] for i in ids}


def predicted(result: Result) -> int:
    label = next(t for t in result.outputs or [] if t.name == "label")
    return int(label.data[0])


def submit_labels(env: Env, path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows(rows)
    stored = env.inferq("labels", "submit", str(path), "--model", "iris")
    assert stored.returncode == 0, stored.stderr


def wrong(results: dict[str, Result]) -> list[tuple[str, int]]:
    return [(i, (predicted(r) + 1) % 3) for i, r in results.items()]


def guard_of(env: Env) -> GuardState:
    return read_guards(env.store, "iris")["champion"].state


def test_wrong_labels_arriving_after_the_jobs_roll_the_move_back_once_across_two_workers(
    two_versions: Env, models: Models, tmp_path: Path
) -> None:
    env = two_versions
    accuracy_move(env, 2)
    settings = env.worker_settings(alias_refresh_s=REFRESH_S, max_batch_rows=4)
    with BackgroundWorker(settings) as first, BackgroundWorker(settings) as second:
        # Given 30 jobs of champion run on version 2
        wait_for(lambda: send_wave(env, models, 4)[-1].version == 2, timeout_s=60)
        results = run_on_champion(env, models, [f"bad-{n}" for n in range(30)])
        assert {r.version for r in results.values()} == {2}
        # When labels saying 10 of them were wrong arrive: fewer than the window, nothing is decided
        labels = wrong(results)
        submit_labels(env, tmp_path / "first.csv", labels[:10])
        wait_for(lambda: read_guards(env.store, "iris")["champion"].labeled == 10, timeout_s=60)
        assert guard_of(env) is GuardState.WATCHING and champion(env) == 2
        # and then 15 more, with no job running
        submit_labels(env, tmp_path / "more.csv", labels[10:25])
        # Then champion is back on version 1 within seconds
        wait_for(lambda: champion(env) == 1, timeout_s=60)
        for background in (first, second):
            assert background.worker.processor.guards.settle(10)
        rollbacks = [b.worker.processor.guards.rollbacks for b in (first, second)]
        metrics = [b.worker.metrics.render().decode() for b in (first, second)]
        later = send_wave(env, models, 8)
    # rolled back by exactly one worker, which counted it in its metrics
    assert sorted(rollbacks) == [0, 1]
    assert sum('inferq_alias_rollbacks_total{alias="champion",model="iris"} 1.0' in text for text in metrics) == 1
    # and said why in the history, once
    moves = read_history(env.store, "iris")
    assert [m.by.startswith("guard") for m in moves] == [False, False, True]
    assert moves[-1].reason == "rolled back: accuracy 0.0% on 25 labeled predictions of version 2 (< 80.0%)"
    assert {(r.status, r.version) for r in later} == {(Status.SUCCEEDED, 1)}


def test_right_labels_keep_the_move_and_the_history_lists_the_rollback_and_the_kept_move(
    two_versions: Env, models: Models, tmp_path: Path
) -> None:
    env = two_versions
    with BackgroundWorker(env.worker_settings(alias_refresh_s=REFRESH_S)):
        # Given a guarded move rolled back by wrong labels
        accuracy_move(env, 2)
        wait_for(lambda: send_wave(env, models, 1)[-1].version == 2, timeout_s=60)
        submit_labels(env, tmp_path / "bad.csv", wrong(run_on_champion(env, models, [f"b-{n}" for n in range(25)])))
        wait_for(lambda: champion(env) == 1, timeout_s=60)
        # When champion is guarded onto version 2 again, and labels of 24 of its next 25 predictions agree
        # with them, half sent before the predictions exist (by the ids the caller will use)
        accuracy_move(env, 2)
        wait_for(lambda: send_wave(env, models, 1)[-1].version == 2, timeout_s=60)
        ids = [f"g-{n}" for n in range(25)]
        expected = [int(v) for v in models.logistic.predict(models.X[:25].astype(float))]
        early = [(i, expected[n]) for n, i in enumerate(ids[:12])]
        submit_labels(env, tmp_path / "early.csv", early)
        results = run_on_champion(env, models, ids)
        late = [(i, predicted(results[i]) if n != 20 else (predicted(results[i]) + 1) % 3) for n, i in enumerate(ids)]
        submit_labels(env, tmp_path / "late.csv", late[12:])
        wait_for(lambda: guard_of(env) is GuardState.PASSED, timeout_s=60)

    # Then champion stays on version 2: the first move's wrong labels count for its own guard only
    assert champion(env) == 2
    right = sum(predicted(results[i]) == label for i, label in early + late[12:])
    assert MIN_ACCURACY * 25 <= right <= 24  # scikit-learn's and onnxruntime's classes agree on (nearly) all rows
    listed = env.inferq("models", "history", "iris")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert len(rows) == 5
    assert re.search(r"champion\s+1\s+2\s+\S+@\S+\s+try it on live accuracy; guarded: accuracy < 80% over 20", rows[1])
    assert re.search(r"champion\s+2\s+1\s+guard of move \w{8}\s+rolled back: accuracy 0\.0% on 25 labeled", rows[2])
    assert re.search(r"champion\s+1\s+2\s+\S+@\S+\s+try it on live accuracy; guarded: accuracy < 80%", rows[3])
    assert re.search(rf"champion\s+2\s+2\s+guard of move \w{{8}}\s+kept: accuracy {right / 25:.1%} on 25", rows[4])


def test_a_move_made_again_counts_none_of_the_earlier_moves_predictions_even_a_moment_later(
    two_versions: Env, models: Models, tmp_path: Path
) -> None:
    env = two_versions
    moved = env.inferq("models", "alias", "iris", "champion", "2")
    assert moved.returncode == 0, moved.stderr
    # Given 25 predictions of champion on version 2, all labeled wrong
    with BackgroundWorker(env.worker_settings(alias_refresh_s=REFRESH_S)):
        wait_for(lambda: send_wave(env, models, 1)[-1].version == 2, timeout_s=60)
        results = run_on_champion(env, models, [f"b-{n}" for n in range(25)])
    submit_labels(env, tmp_path / "bad.csv", wrong(results))
    assert env.result_location is not None
    store = open_result_store(env.result_location)
    try:
        labels = store.labels()
        stored_at = [stored.stored_at_s for stored in labels.stored_results(list(results)).values()]
        # When a guard is judged that started before them, and one that started a millisecond after the last
        # (within the same second: a move rolled back and made again at once)
        before = guard_accuracy(env.store, labels, "iris", "champion", 2, min(stored_at) - 0.001)
        after = guard_accuracy(env.store, labels, "iris", "champion", 2, max(stored_at) + 0.001)
    finally:
        store.close()
    # Then the first counts all 25, the second none of them
    assert before == (25, 0)
    assert after == (0, 0)


def test_a_guard_on_accuracy_needs_a_classifier(two_versions: Env) -> None:
    env = two_versions
    publish(env.store, "iris", renamed_input_onnx())  # version 3: its only output is a float tensor

    refused = env.inferq(
        "models", "alias", "iris", "champion", "3", "--guard-min-accuracy", "0.9", "--guard-window", "10"
    )  # fmt: skip

    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert "version 3 of 'iris' predicts numbers ('Y'): accuracy needs a classifier" in refused.stderr
    assert champion(env) == 1
