"""The model fetcher: lookups never wait on the model store; what is missing or due is fetched in the
background. A local model store and a controlled clock, no broker."""

from __future__ import annotations

import threading
from pathlib import Path

from support import Models

from inferq.model_store.base import publish, set_alias
from inferq.model_store.local import LocalModelStore
from inferq.model_store.registry import Registry
from inferq.worker.fetcher import ModelFetcher
from inferq.worker.runner import LoadedModel, load_model

REFRESH_S = 5.0


class Fetched:
    """Counts the background fetches that finished, and waits for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._done = threading.Condition()

    def __call__(self) -> None:
        with self._done:
            self.count += 1
            self._done.notify_all()

    def wait_for(self, count: int) -> None:
        with self._done:
            assert self._done.wait_for(lambda: self.count >= count, timeout=10), "the fetch never finished"


def test_a_refresh_is_fetched_ahead_and_no_job_waits_for_it(tmp_path: Path, models: Models) -> None:
    # Given a fetcher that has loaded the champion (version 1), on a store that answers at once
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx, alias="champion")
    publish(store, "iris", models.logistic_onnx)
    now = [0.0]
    registry: Registry[LoadedModel] = Registry(store, load_model, refresh_s=REFRESH_S, clock=lambda: now[0])
    fetched = Fetched()
    fetcher = ModelFetcher(registry, on_fetched=fetched)
    assert fetcher.lookup("iris", "champion") is None  # nothing loaded yet: fetched in the background
    fetched.wait_for(1)
    first = fetcher.lookup("iris", "champion")
    assert first is not None and first[0] == 1

    # When the alias moves and the view nears its refresh interval
    set_alias(store, "iris", "champion", 2)
    now[0] = REFRESH_S - 0.5  # inside the last fifth of the interval
    near = fetcher.lookup("iris", "champion")

    # Then the old view still answers (it is within the interval) while the new one is fetched
    assert near is not None and near[0] == 1
    fetched.wait_for(2)
    # ... and once the interval has passed, jobs are answered from the renewed view, without being held
    now[0] = REFRESH_S + 0.1
    after = fetcher.lookup("iris", "champion")
    assert after is not None and after[0] == 2
    assert fetched.count == 2  # and nothing more was fetched for it


def test_a_refresh_past_due_holds_jobs_until_the_new_view_is_read(tmp_path: Path, models: Models) -> None:
    # Given a loaded model whose view is past its refresh interval (nothing asked for it in between)
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx)
    now = [0.0]
    registry: Registry[LoadedModel] = Registry(store, load_model, refresh_s=REFRESH_S, clock=lambda: now[0])
    fetched = Fetched()
    fetcher = ModelFetcher(registry, on_fetched=fetched)
    assert fetcher.lookup("iris", "latest") is None
    fetched.wait_for(1)
    publish(store, "iris", models.logistic_onnx)
    now[0] = REFRESH_S * 2

    # When a job asks for latest, it waits for the refresh (a view older than the interval is not used) ...
    assert fetcher.lookup("iris", "latest") is None
    fetched.wait_for(2)  # one fetch: the new view, then the new version loaded

    # Then the new version answers
    after = fetcher.lookup("iris", "latest")
    assert after is not None and after[0] == 2


def test_with_a_refresh_interval_of_zero_jobs_wait_for_one_fresh_view_not_for_ever(
    tmp_path: Path, models: Models
) -> None:
    # Given a registry whose views are always due (INFERQ_ALIAS_REFRESH_S=0: read the store for every batch)
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx, alias="champion")
    registry: Registry[LoadedModel] = Registry(store, load_model, refresh_s=0)
    fetched = Fetched()
    fetcher = ModelFetcher(registry, on_fetched=fetched)
    assert fetcher.lookup("iris", "champion") is None
    fetched.wait_for(1)

    # When the alias moves and a job for it is looked up, as the worker does after every finished fetch
    set_alias(store, "iris", "champion", publish(store, "iris", models.logistic_onnx).version)
    answers = []
    for _ in range(5):
        answers.append(fetcher.lookup("iris", "champion"))
        if answers[-1] is not None:
            break
        fetched.wait_for(fetched.count + 1)

    # Then it is answered once a view read after it was held is there: the moved alias, version 2
    ready = answers[-1]
    assert ready is not None and ready[0] == 2, f"held for {len(answers)} lookups"
    assert len(answers) <= 3  # held for the fresh view (and the new version's load), no longer
