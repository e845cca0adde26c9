"""The file model store: publishing, immutability, aliases, names, and the skl2onnx export."""

from __future__ import annotations

import threading
from pathlib import Path

import joblib
import numpy as np
import onnxruntime as ort
import pytest
from support import Env, Models

from inferq.model_store.base import publish, resolve_version, set_alias
from inferq.model_store.local import LocalModelStore
from inferq.model_store.registry import Registry
from inferq.shared.errors import InvalidName, ModelLoadError, UnknownModel, UnknownVersion, VersionExists
from inferq.worker.runner import load_model


def test_versions_are_numbered_in_order_and_latest_is_the_highest(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    first = publish(store, "iris", models.forest_onnx)
    second = publish(store, "iris", models.logistic_onnx, alias="candidate")
    assert (first.version, second.version) == (1, 2)
    assert store.list_models() == ["iris"]
    assert resolve_version(store, "iris", "latest") == 2
    assert resolve_version(store, "iris", "candidate") == 2
    manifest = store.read_manifest("iris", 1)
    assert manifest.inputs[0].name == "X" and manifest.inputs[0].shape == [None, 4]
    assert [o.name for o in manifest.outputs] == ["label", "probabilities"]
    assert manifest.size_bytes == len(models.forest_onnx)


def test_a_version_is_immutable(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx, version=3)
    with pytest.raises(VersionExists, match="immutable"):
        publish(store, "iris", models.logistic_onnx, version=3)
    assert store.read_model("iris", 3) == models.forest_onnx


def test_two_publishers_racing_for_one_version_cannot_both_win(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def attempt(data: bytes) -> None:
        barrier.wait()
        try:
            publish(store, "race", data, version=1)
            outcomes.append("won")
        except VersionExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=attempt, args=(d,)) for d in [models.forest_onnx, models.logistic_onnx] * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["lost", "lost", "lost", "won"]
    assert store.list_versions("race") == [1]


def test_unversioned_publishers_racing_each_get_a_version(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    threads = [threading.Thread(target=publish, args=(store, "m", models.forest_onnx)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.list_versions("m") == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", ".hidden", "a..b", "x" * 200])
def test_names_that_could_escape_the_store_are_refused(tmp_path: Path, models: Models, name: str) -> None:
    with pytest.raises(InvalidName):
        publish(LocalModelStore(tmp_path), name, models.forest_onnx)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("alias", ["latest", "1", "../up", "a/b", ""])
def test_bad_aliases_are_refused(tmp_path: Path, models: Models, alias: str) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx)
    with pytest.raises(InvalidName):
        set_alias(store, "iris", alias, 1)


def test_an_alias_must_point_at_a_published_version(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx)
    with pytest.raises(UnknownVersion):
        set_alias(store, "iris", "champion", 9)
    with pytest.raises(UnknownModel):
        set_alias(store, "nope", "champion", 1)


def test_a_half_written_version_is_invisible(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx)
    (tmp_path / "iris" / "2").mkdir()
    (tmp_path / "iris" / "2" / "model.onnx").write_bytes(b"partial")
    assert store.list_versions("iris") == [1]
    assert resolve_version(store, "iris", "latest") == 1


def test_classifiers_export_plain_tensors_matching_scikit_learn(models: Models) -> None:
    session = ort.InferenceSession(models.forest_onnx, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"X": models.X[:20]})
    np.testing.assert_array_equal(label, models.forest.predict(models.X[:20]))
    np.testing.assert_allclose(probabilities, models.forest.predict_proba(models.X[:20]), atol=1e-5)


def test_a_corrupted_model_file_is_a_model_load_error(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx)
    path = tmp_path / "iris" / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    registry = Registry(store, load_model)
    with pytest.raises(ModelLoadError, match="does not match its manifest"):
        registry.get("iris", 1)


def test_an_alias_move_is_seen_after_the_refresh_interval(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx, alias="champion")
    publish(store, "iris", models.logistic_onnx)
    now = [0.0]
    registry = Registry(store, load_model, refresh_s=5, clock=lambda: now[0])
    assert registry.resolve("iris", "champion") == 1
    set_alias(store, "iris", "champion", 2)
    now[0] = 4.0
    assert registry.resolve("iris", "champion") == 1  # within the refresh interval
    now[0] = 5.0
    assert registry.resolve("iris", "champion") == 2


def test_the_registry_keeps_a_bounded_number_of_models_loaded(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    for _ in range(3):
        publish(store, "iris", models.forest_onnx)
    registry = Registry(store, load_model, max_loaded=2)
    for version in (1, 2, 3, 2):
        registry.get("iris", version)
    assert registry.loaded() == [("iris", 3), ("iris", 2)]


@pytest.mark.broker
def test_cli_publishes_a_pickled_estimator_and_lists_it(env: Env, models: Models) -> None:
    path = env.tmp / "forest.joblib"
    joblib.dump(models.forest, path)
    published = env.inferq("models", "publish", "iris", str(path), "--alias", "champion")
    assert published.returncode == 0, published.stderr
    assert "published iris version 1" in published.stdout
    listed = env.inferq("models", "list")
    assert "iris" in listed.stdout and "champion" in listed.stdout
    moved = env.inferq("models", "alias", "iris", "stable", "1")
    assert moved.returncode == 0 and env.store.read_aliases("iris") == {"champion": 1, "stable": 1}


@pytest.mark.broker
def test_cli_refuses_a_traversal_name_with_one_line(env: Env, models: Models) -> None:
    path = env.tmp / "m.onnx"
    path.write_bytes(models.forest_onnx)
    done = env.inferq("models", "publish", "../evil", str(path))
    assert done.returncode == 1
    assert done.stderr.startswith("inferq: error: invalid model name") and done.stderr.count("\n") == 1
    assert not (env.tmp / "evil").exists()


@pytest.mark.broker
def test_cli_refuses_a_file_that_is_not_a_model(env: Env) -> None:
    path = env.tmp / "junk.onnx"
    path.write_bytes(b"not a model")
    done = env.inferq("models", "publish", "junk", str(path))
    assert done.returncode == 1 and "not a readable ONNX model" in done.stderr


def test_concurrent_alias_moves_lose_none(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx)
    threads = [threading.Thread(target=set_alias, args=(store, "iris", f"team{i}", 1)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.read_aliases("iris") == {f"team{i}": 1 for i in range(8)}
