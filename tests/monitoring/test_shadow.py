"""Shadow traffic end to end: the next version runs on sampled real jobs; only the answering version's
results reach the results queue and the result store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from sklearn.linear_model import LogisticRegression
from support import Env, Models, failing_model, make_job

from inferq.model_store.base import publish
from inferq.model_store.convert import estimator_to_onnx
from inferq.monitoring.shadow_setting import sampled, set_shadow

pytestmark = pytest.mark.broker


def test_every_job_is_paired_at_fraction_one_and_agreement_matches_scikit_learn(
    iris_store: Env, models: Models, tmp_path: Path
) -> None:
    # Given iris v1 (the champion, a random forest) answering and v2 (a logistic regression) in its shadow
    iris_store.result_location = f"sqlite:{tmp_path}/results.db"
    turned_on = iris_store.inferq("models", "shadow", "iris", "--target", "2", "--fraction", "1.0")
    assert turned_on.returncode == 0, turned_on.stderr
    rows = models.X
    jobs = [make_job(rows[i : i + 1], version="champion") for i in range(len(rows))]
    iris_store.submit(jobs)

    # When a worker drains the queue (it stores its pending pairs before it exits)
    iris_store.drain()

    # Then every job has a pair, and the agreement is the two estimators' own
    shown = iris_store.inferq("monitor", "shadow", "iris", "--json")
    assert shown.returncode == 0, shown.stderr
    report = orjson.loads(shown.stdout)
    expected = float(np.mean(models.forest.predict(rows) == models.logistic.predict(rows)))
    assert (report["model"], report["version"], report["shadow_version"]) == ("iris", 1, 2)
    assert report["pairs"] == len(jobs) and report["skipped"] == 0
    assert report["agreement"] == expected
    low, high = report["agreement_ci"]
    assert low < expected < high and high - low < 0.2
    (probabilities,) = report["outputs"]
    assert (
        probabilities["name"] == "probabilities" and 0 < probabilities["mean_abs_diff"] <= probabilities["p95_abs_diff"]
    )
    # and only the answering version's results went out and were stored
    on_queue = iris_store.results_on_queue()
    assert len(on_queue) == len(jobs) and {r.version for r in on_queue} == {1}
    stored = iris_store.stored()
    assert len(stored) == len(jobs) and {r.version for r in stored.values()} == {1}


def test_a_fifth_of_the_jobs_are_shadowed_at_fraction_point_two(iris_store: Env, models: Models) -> None:
    set_shadow(iris_store.store, "iris", "latest", 0.2)
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1) for i in range(600)]
    iris_store.submit(jobs)

    iris_store.drain()

    shown = iris_store.inferq("monitor", "shadow", "iris", "--json")
    assert shown.returncode == 0, shown.stderr
    report = orjson.loads(shown.stdout)
    # the choice is a hash of the id: exactly the sampled ones, about a fifth (4 standard deviations)
    assert report["pairs"] == sum(sampled(job.id, 0.2) for job in jobs)
    spread = 4 * math.sqrt(600 * 0.2 * 0.8)
    assert 600 * 0.2 - spread < report["pairs"] < 600 * 0.2 + spread
    assert len(iris_store.results_on_queue()) == len(jobs) == len(iris_store.stored())


def test_shadow_commands_refuse_what_cannot_work(iris_store: Env) -> None:
    unknown_target = iris_store.inferq("models", "shadow", "iris", "--target", "9", "--fraction", "0.5")
    no_pairs = iris_store.inferq("monitor", "shadow", "iris")

    assert unknown_target.returncode == 1
    assert unknown_target.stderr.startswith("inferq: error: model 'iris' has no version 9")
    assert no_pairs.returncode == 1 and no_pairs.stderr.startswith("inferq: error: no shadow pairs of model 'iris'")


def test_sampled_jobs_are_skipped_and_counted_while_the_queue_is_deep(iris_store: Env, models: Models) -> None:
    # Given a backlog limit of zero: once the shadow thread has seen jobs waiting, it stops shadowing
    set_shadow(iris_store.store, "iris", 2, 1.0)
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1) for i in range(3000)]
    iris_store.submit(jobs)

    iris_store.drain(shadow_max_backlog=0, prefetch=64, max_batch_rows=32)

    report = orjson.loads(iris_store.inferq("monitor", "shadow", "iris", "--json").stdout)
    assert report["skipped"] > 0 and report["pairs"] > 0
    assert report["pairs"] + report["skipped"] == len(jobs)  # each sampled job either shadowed or counted


def test_a_failing_shadow_model_never_touches_the_jobs_results(iris_store: Env, models: Models) -> None:
    publish(iris_store.store, "iris", failing_model())  # version 3
    set_shadow(iris_store.store, "iris", 3, 1.0)
    jobs = [make_job(models.X[i : i + 1], version=1) for i in range(40)]
    iris_store.submit(jobs)

    iris_store.drain()

    stored = iris_store.stored()
    assert len(stored) == len(jobs) and {r.status.value for r in stored.values()} == {"succeeded"}
    assert len(iris_store.results_on_queue()) == len(jobs)
    report = orjson.loads(iris_store.inferq("monitor", "shadow", "iris", "--json").stdout)
    assert report["pairs"] == len(jobs) and report["errors"] == {"version": 0, "shadow_version": len(jobs)}
    assert report["agreement"] is None and report["agreement_ci"] is None


def test_jobs_the_answering_version_fails_at_run_time_are_its_errors(iris_store: Env, models: Models) -> None:
    # Given version 3 answering and failing every job when it runs, and version 1 in its shadow
    publish(iris_store.store, "iris", failing_model())  # version 3
    set_shadow(iris_store.store, "iris", 1, 1.0)
    jobs = [make_job(models.X[i : i + 1], version=3) for i in range(30)]
    iris_store.submit(jobs)

    iris_store.drain()

    # Then every job failed, every one has a pair, and the errors are the answering version's
    stored = iris_store.stored()
    assert {r.status.value for r in stored.values()} == {"failed"} and len(stored) == len(jobs)
    report = orjson.loads(iris_store.inferq("monitor", "shadow", "iris", "--json").stdout)
    assert (report["version"], report["shadow_version"], report["pairs"]) == (3, 1, len(jobs))
    assert report["errors"] == {"version": len(jobs), "shadow_version": 0}
    assert report["agreement"] is None  # no pair where both answered


def test_jobs_the_answering_version_refuses_are_its_errors_and_the_shadow_may_take_them(
    iris_store: Env, models: Models
) -> None:
    # Given version 1 (four features) answering, and version 3 (three features) in its shadow
    three = LogisticRegression(max_iter=500).fit(models.X[:, :3], models.forest.predict(models.X))
    publish(iris_store.store, "iris", estimator_to_onnx(three))  # version 3
    set_shadow(iris_store.store, "iris", 3, 1.0)
    four_wide = [make_job(models.X[i : i + 1], version=1) for i in range(20)]
    three_wide = [make_job(models.X[i : i + 1, :3], version=1) for i in range(10)]
    iris_store.submit(four_wide + three_wide)

    iris_store.drain()

    # Then version 1 refused the three-wide jobs (input mismatch) and the shadow answered them, while the
    # four-wide jobs were answered by version 1 and refused by the shadow
    stored = iris_store.stored()
    assert {stored[j.id].status.value for j in three_wide} == {"failed"}
    assert {stored[j.id].status.value for j in four_wide} == {"succeeded"}
    shown = iris_store.inferq("monitor", "shadow", "iris", "--json")
    assert shown.returncode == 0, shown.stderr
    report = orjson.loads(shown.stdout)
    assert (report["version"], report["shadow_version"], report["pairs"]) == (1, 3, 30)
    assert report["errors"] == {"version": 10, "shadow_version": 20}
    text = iris_store.inferq("monitor", "shadow", "iris").stdout
    assert "errors (of the 30 pairs): version 10, shadow 20" in text
