"""S3 stores against a real SeaweedFS: publishing, results, the verified cache, alias moves while running."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.config import Config
from botocore.exceptions import EndpointConnectionError
from onnx import TensorProto, helper
from seaweedfs import SeaweedFS
from support import S3_BUCKET, BackgroundWorker, Env, Models, make_job, wait_for

from inferq.model_store.base import MODEL_FILE, publish, set_alias
from inferq.model_store.cache import ModelCache
from inferq.model_store.manifest import build_manifest
from inferq.model_store.registry import Registry
from inferq.model_store.s3 import S3ModelStore
from inferq.shared.contract.messages import Result, Status
from inferq.shared.errors import ErrorCode, ModelLoadError, StoreUnreachable, VersionExists
from inferq.shared.results.s3 import S3ResultStore
from inferq.shared.results.stores import open_result_store
from inferq.shared.s3.location import S3Location
from inferq.worker.runner import LoadedModel, load_model


def s3_store(env: Env) -> S3ModelStore:
    assert env.model_location is not None
    return S3ModelStore(S3Location.parse(env.model_location))


def raw_put(store: S3ModelStore, key: str, body: bytes) -> None:
    store._client.put_object(Bucket=store.location.bucket, Key=store.location.key(key), Body=body)


def count_gets(store: S3ModelStore) -> list[str]:
    """Keys of every GetObject the store's client sends from now on."""
    keys: list[str] = []

    def on_call(params: dict[str, Any], **_kw: Any) -> None:
        keys.append(params["Key"])

    store._client.meta.events.register("provide-client-params.s3.GetObject", on_call)
    return keys


def onnx_with_external_data(location: str) -> bytes:
    """A valid graph (Y = X + W) whose initializer W claims to live in the file ``location``."""
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    weight.external_data.add(key="length", value="16")
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"])],
        "external",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


# -- model store ------------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.s3
def test_publish_list_alias_and_load_round_trip_on_s3(s3_env: Env, models: Models) -> None:
    model_file = s3_env.tmp / "forest.onnx"
    model_file.write_bytes(models.forest_onnx)
    assert s3_env.inferq("models", "publish", "iris", str(model_file), "--alias", "champion").returncode == 0
    (s3_env.tmp / "logistic.onnx").write_bytes(models.logistic_onnx)
    assert s3_env.inferq("models", "publish", "iris", str(s3_env.tmp / "logistic.onnx")).returncode == 0
    moved = s3_env.inferq("models", "alias", "iris", "stable", "2")
    listed = s3_env.inferq("models", "list")
    assert moved.returncode == 0, moved.stderr
    assert listed.returncode == 0 and "champion" in listed.stdout and "stable" in listed.stdout

    store = s3_store(s3_env)
    assert store.list_models() == ["iris"]
    assert store.list_versions("iris") == [1, 2]
    assert store.read_aliases("iris") == {"champion": 1, "stable": 2}
    assert store.read_model("iris", 1) == models.forest_onnx  # byte for byte
    manifest, loaded = Registry(store, load_model).get("iris", 1)
    label, _ = loaded.session.run(None, {"X": models.X[:5]})
    np.testing.assert_array_equal(label, models.forest.predict(models.X[:5]))
    assert manifest.sha256 == build_manifest("iris", 1, models.forest_onnx, "onnx", {}).sha256


@pytest.mark.broker
@pytest.mark.s3
def test_a_version_without_a_manifest_is_absent(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    publish(store, "iris", models.forest_onnx)
    raw_put(store, f"iris/2/{MODEL_FILE}", models.logistic_onnx)  # a publisher died before the manifest
    assert store.list_versions("iris") == [1]
    assert publish(store, "iris", models.logistic_onnx).version == 2


@pytest.mark.broker
@pytest.mark.s3
def test_two_concurrent_publishers_of_one_version_exactly_one_wins(s3_env: Env, models: Models) -> None:
    # Given four publishers, each with its own client, racing for version 1 with different bytes
    publishers = [s3_store(s3_env) for _ in range(4)]
    payloads = [models.forest_onnx, models.logistic_onnx] * 2
    barrier = threading.Barrier(len(publishers))
    outcomes: dict[int, str] = {}

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            publish(publishers[index], "race", payloads[index], version=1)
            outcomes[index] = "won"
        except VersionExists as exc:
            outcomes[index] = str(exc)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(publishers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly one wins, the others get a clear error, and the stored model is the winner's
    winners = [i for i, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert all("already exists" in o for i, o in outcomes.items() if i != winners[0])
    store = s3_store(s3_env)
    assert store.list_versions("race") == [1]
    assert store.read_model("race", 1) == payloads[winners[0]]
    Registry(store, load_model).get("race", 1)  # and it verifies against its manifest


@pytest.mark.broker
@pytest.mark.s3
def test_cli_publishers_racing_for_one_version_one_gets_a_clear_error(s3_env: Env, models: Models) -> None:
    (s3_env.tmp / "m.onnx").write_bytes(models.forest_onnx)
    results: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                s3_env.inferq("models", "publish", "cli-race", str(s3_env.tmp / "m.onnx"), "--version", "3")
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.returncode for r in results) == [0, 1]
    loser = next(r for r in results if r.returncode == 1)
    assert "version 3 already exists" in loser.stderr and "Traceback" not in loser.stderr


@pytest.mark.broker
@pytest.mark.s3
def test_external_data_outside_the_version_directory_is_refused(s3_env: Env, models: Models) -> None:
    hostile = onnx_with_external_data("../../../../etc/passwd")
    store = s3_store(s3_env)
    # At publish
    with pytest.raises(ModelLoadError, match="outside the version's directory"):
        publish(store, "evil", hostile)
    assert store.list_versions("evil") == []
    # And at load, for a version that reached the store some other way (a hand-made manifest)
    publish(store, "evil", models.forest_onnx)
    forged = build_manifest("evil", 2, models.forest_onnx, "onnx", {}).model_copy(
        update={"sha256": hashlib.sha256(hostile).hexdigest(), "size_bytes": len(hostile)}
    )
    raw_put(store, f"evil/2/{MODEL_FILE}", hostile)
    raw_put(store, "evil/2/manifest.json", forged.model_dump_json().encode())
    cache = ModelCache(s3_env.tmp / "cache", 1 << 30)
    with pytest.raises(ModelLoadError, match="outside the version's directory"):
        Registry(store, load_model, cache=cache).get("evil", 2)
    assert not (s3_env.tmp / "cache" / "evil" / "2").exists() or not any(
        (s3_env.tmp / "cache" / "evil" / "2").iterdir()
    )


@pytest.mark.broker
@pytest.mark.s3
def test_a_model_above_the_size_limit_is_refused_without_download(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    publish(store, "big", models.forest_onnx)
    gets = count_gets(store)
    registry: Registry[LoadedModel] = Registry(store, load_model, cache=ModelCache(None, len(models.forest_onnx) - 1))
    with pytest.raises(ModelLoadError, match="INFERQ_MAX_MODEL_BYTES"):
        registry.get("big", 1)
    assert not any(key.endswith(MODEL_FILE) for key in gets)


# -- the verified cache -----------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.s3
def test_a_restarted_worker_loads_from_the_cache_without_downloading(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    publish(store, "iris", models.forest_onnx)
    cache_dir = s3_env.tmp / "cache"

    first = s3_store(s3_env)
    first_gets = count_gets(first)
    Registry(first, load_model, cache=ModelCache(cache_dir, 1 << 30)).get("iris", 1)
    assert [k for k in first_gets if k.endswith(MODEL_FILE)] == [first.location.key("iris", "1", MODEL_FILE)]
    cached = list(cache_dir.rglob("*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == models.forest_onnx

    # A new process (a new store, client and registry) with the same cache directory
    again = s3_store(s3_env)
    again_gets = count_gets(again)
    manifest, loaded = Registry(again, load_model, cache=ModelCache(cache_dir, 1 << 30)).get("iris", 1)
    assert not [k for k in again_gets if k.endswith(MODEL_FILE)]
    assert loaded.manifest.sha256 == manifest.sha256
    assert not list(cache_dir.rglob("*.tmp"))


@pytest.mark.broker
@pytest.mark.s3
def test_a_damaged_cache_file_is_fetched_again(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    publish(store, "iris", models.forest_onnx)
    cache_dir = s3_env.tmp / "cache"
    Registry(store, load_model, cache=ModelCache(cache_dir, 1 << 30)).get("iris", 1)
    [path] = cache_dir.rglob("*.onnx")
    path.write_bytes(path.read_bytes()[:100])  # truncated on disk
    Registry(store, load_model, cache=ModelCache(cache_dir, 1 << 30)).get("iris", 1)
    assert path.read_bytes() == models.forest_onnx


@pytest.mark.broker
@pytest.mark.s3
def test_a_corrupted_model_object_fails_its_jobs_and_other_models_keep_working(s3_env: Env, models: Models) -> None:
    # Given iris v1 whose object was corrupted after publishing, and a healthy model beside it
    store = s3_store(s3_env)
    publish(store, "iris", models.forest_onnx)
    publish(store, "flower", models.logistic_onnx)
    corrupted = bytearray(models.forest_onnx)
    corrupted[len(corrupted) // 2] ^= 0xFF
    raw_put(store, f"iris/1/{MODEL_FILE}", bytes(corrupted))
    truncated = models.forest_onnx[:-50]
    publish(store, "iris", models.logistic_onnx)  # v2, then truncated
    raw_put(store, f"iris/2/{MODEL_FILE}", truncated)
    bad_onnx = b"\x08\x07" + b"not a graph" * 10  # v3: its manifest matches, but it is no model
    manifest = build_manifest("iris", 3, models.forest_onnx, "onnx", {}).model_copy(
        update={"sha256": hashlib.sha256(bad_onnx).hexdigest(), "size_bytes": len(bad_onnx)}
    )
    raw_put(store, f"iris/3/{MODEL_FILE}", bad_onnx)
    raw_put(store, "iris/3/manifest.json", manifest.model_dump_json().encode())
    jobs = [make_job(models.X[:2], version=v) for v in (1, 2, 3)] + [make_job(models.X[:2], model="flower")]
    s3_env.submit(jobs)

    cache_dir = s3_env.tmp / "cache"
    s3_env.drain(model_cache=str(cache_dir))

    stored = s3_env.stored()
    assert [stored[j.id].error.code for j in jobs[:3]] == [ErrorCode.MODEL_LOAD_ERROR] * 3  # type: ignore[union-attr]
    assert "does not match its manifest" in stored[jobs[0].id].error.message  # type: ignore[union-attr]
    assert stored[jobs[3].id].status is Status.SUCCEEDED
    assert [p.parent.parent.name for p in cache_dir.rglob("*.onnx")] == ["flower"]  # bad files never cached


# -- results ----------------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.s3
def test_results_round_trip_byte_for_byte_and_concurrently(s3_env: Env, models: Models) -> None:
    assert s3_env.result_location is not None
    store = open_result_store(s3_env.result_location)
    assert isinstance(store, S3ResultStore)
    results = [
        Result(
            id=f"job-{i:04d}",
            model="iris",
            requested_version="latest",
            status=Status.FAILED,
            error={"code": "inference_error", "message": f"ünïcödé ✓ {i}"},
            worker="w:1",
        )
        for i in range(200)
    ]
    store.put_many(results)
    for result in results[:20]:
        raw = store._client.get_object(Bucket=S3_BUCKET, Key=store._key(result.id))["Body"].read()
        assert raw == result.to_json()
        assert store.get(result.id) == result
    assert store.exists("job-0199") and not store.exists("job-9999")
    assert len(s3_env.stored()) == 200


@pytest.mark.broker
@pytest.mark.s3
def test_worker_results_on_s3_are_readable_by_the_cli(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    publish(store, "iris", models.forest_onnx)
    jobs = [make_job(models.X[i : i + 1]) for i in range(30)]
    s3_env.submit(jobs)
    counters = s3_env.drain()
    assert counters.succeeded == 30
    shown = s3_env.inferq("results", "get", jobs[0].id)
    assert shown.returncode == 0, shown.stderr
    result = Result.model_validate_json(shown.stdout)
    assert result.version == 1 and result.model_sha256 == store.read_manifest("iris", 1).sha256
    missing = s3_env.inferq("results", "get", "no-such-job")
    assert missing.returncode == 1 and "no result" in missing.stderr


def test_an_unreachable_s3_store_is_a_retryable_error() -> None:
    dead = S3Location.parse("s3://nowhere/prefix")
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="k",
        aws_secret_access_key="secret-value-x",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )
    results = S3ResultStore(dead, client)
    with pytest.raises(StoreUnreachable) as caught:
        results.put_many(
            [
                Result(
                    id="j1",
                    model="m",
                    requested_version=1,
                    status=Status.FAILED,
                    error={"code": "inference_error", "message": "x"},
                    worker="w",
                )
            ]
        )
    assert isinstance(caught.value, OSError) and "secret-value-x" not in str(caught.value)
    with pytest.raises(StoreUnreachable):
        S3ModelStore(dead, client).list_versions("iris")


# -- aliases and new versions while running ---------------------------------------------------------


@pytest.mark.broker
@pytest.mark.s3
def test_registry_serves_its_last_view_while_the_store_is_unreachable(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    publish(store, "iris", models.forest_onnx, alias="champion")
    now = [0.0]
    registry: Registry[LoadedModel] = Registry(store, load_model, refresh_s=1, clock=lambda: now[0])
    assert registry.resolve("iris", "champion") == 1
    store._client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **_kw: (_ for _ in ()).throw(StoreUnreachable("down"))
    )
    now[0] = 5.0
    assert registry.resolve("iris", "champion") == 1  # stale, not crashed
    with pytest.raises(StoreUnreachable):
        registry.resolve("never-seen", "latest")


@pytest.mark.broker
@pytest.mark.s3
def test_a_running_worker_follows_an_alias_move_and_pinned_jobs_stay(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    publish(store, "iris", models.forest_onnx, alias="champion")
    publish(store, "iris", models.logistic_onnx)
    settings = s3_env.worker_settings(alias_refresh_s=0.5, max_loaded_models=2, model_cache=str(s3_env.tmp / "c"))
    with BackgroundWorker(settings) as background:
        before = make_job(models.X[:1], version="champion")
        s3_env.submit([before])
        wait_for(lambda: before.id in s3_env.stored())

        moved = s3_env.inferq("models", "alias", "iris", "champion", "2")
        assert moved.returncode == 0, moved.stderr
        time.sleep(0.6)  # one refresh interval
        after = make_job(models.X[:1], version="champion")
        pinned = make_job(models.X[:1], version=1)
        s3_env.submit([after, pinned])
        wait_for(lambda: {after.id, pinned.id} <= set(s3_env.stored()))
        loaded = background.worker.registry.loaded()

    stored = s3_env.stored()
    shas = {v: store.read_manifest("iris", v).sha256 for v in (1, 2)}
    assert (stored[before.id].version, stored[after.id].version, stored[pinned.id].version) == (1, 2, 1)
    assert stored[after.id].model_sha256 == shas[2] and stored[pinned.id].model_sha256 == shas[1]
    assert sorted(loaded) == [("iris", 1), ("iris", 2)]  # the new version loaded beside the old one


@pytest.mark.broker
@pytest.mark.s3
def test_unused_versions_are_evicted_by_the_bound(s3_env: Env, models: Models) -> None:
    store = s3_store(s3_env)
    for _ in range(3):
        publish(store, "iris", models.forest_onnx)
    registry: Registry[LoadedModel] = Registry(store, load_model, max_loaded=2)
    for version in (1, 2, 3):
        registry.get("iris", version)
    assert registry.loaded() == [("iris", 2), ("iris", 3)]


# -- a real outage ----------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.s3
def test_an_s3_outage_delays_results_but_loses_none_and_the_worker_survives(
    s3_env: Env, seaweedfs: SeaweedFS, models: Models
) -> None:
    # Given a worker on S3 stores which has already served iris once
    publish(s3_store(s3_env), "iris", models.forest_onnx)
    assert s3_env.result_location is not None
    results = S3ResultStore(S3Location.parse(s3_env.result_location))
    settings = s3_env.worker_settings(alias_refresh_s=0.2, store_retry_max_s=1)
    first = make_job(models.X[:1])
    try:
        with BackgroundWorker(settings) as background:
            s3_env.submit([first])
            wait_for(lambda: results.exists(first.id))
            # When the server dies, jobs arrive: the alias refresh fails and result writes fail
            seaweedfs.halt(kill=True)
            during = [make_job(models.X[i : i + 1]) for i in range(20)]
            s3_env.submit(during)
            time.sleep(1.5)
            assert background._thread.is_alive()
            # Then, once it is back, every job gets exactly one result
            seaweedfs.start()
            wait_for(lambda: all(results.exists(j.id) for j in during), timeout_s=60)
    finally:
        if seaweedfs._proc is None:
            seaweedfs.start()  # the rest of the session needs it
    stored = s3_env.stored()
    assert all(stored[j.id].status is Status.SUCCEEDED and stored[j.id].version == 1 for j in during)
    on_queue = [r.id for r in s3_env.results_on_queue()]
    assert sorted(on_queue) == sorted([first.id, *(j.id for j in during)])
    assert s3_env.depth(s3_env.jobs_queue) == 0 and s3_env.depth(f"{s3_env.jobs_queue}.dlq") == 0


@pytest.mark.broker
@pytest.mark.s3
def test_a_job_for_a_model_never_resolved_waits_out_a_model_store_outage(s3_env: Env, models: Models) -> None:
    # Given a worker whose model store fails its first listings (as when unreachable at start-up)
    publish(s3_store(s3_env), "iris", models.forest_onnx)
    failures = [8]

    def unreachable(**_kw: Any) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")

    job = make_job(models.X[:1])
    with BackgroundWorker(s3_env.worker_settings()) as background:
        store = background.worker.registry.store
        assert isinstance(store, S3ModelStore)
        store._client.meta.events.register("before-send.s3.ListObjectsV2", unreachable)
        s3_env.submit([job])
        # Then the job is held, not failed nor handed back, and runs once the store answers
        wait_for(lambda: job.id in s3_env.stored(), timeout_s=30)
    assert failures == [0]
    assert s3_env.stored()[job.id].status is Status.SUCCEEDED
    assert s3_env.depth(f"{s3_env.jobs_queue}.dlq") == 0


@pytest.mark.broker
@pytest.mark.s3
def test_concurrent_alias_moves_on_s3_lose_none(s3_env: Env, models: Models) -> None:
    publish(s3_store(s3_env), "iris", models.forest_onnx)
    clients = [s3_store(s3_env) for _ in range(6)]
    barrier = threading.Barrier(len(clients))

    def move(index: int) -> None:
        barrier.wait()
        set_alias(clients[index], "iris", f"team{index}", 1)

    threads = [threading.Thread(target=move, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert s3_store(s3_env).read_aliases("iris") == {f"team{i}": 1 for i in range(len(clients))}


@pytest.mark.broker
@pytest.mark.s3
def test_the_first_result_of_an_id_wins_on_s3(s3_env: Env) -> None:
    assert s3_env.result_location is not None
    store = S3ResultStore(S3Location.parse(s3_env.result_location))
    first, second = (
        Result(
            id="twice",
            model="iris",
            requested_version=1,
            status=Status.FAILED,
            error={"code": "inference_error", "message": "x"},
            worker=worker,
        )
        for worker in ("w:1", "w:2")
    )
    assert store.put_many([first]) == [first]
    assert store.put_many([second]) == [first]
    assert store.get("twice") == first
