"""The HTTP gateway end to end: ``inferq serve`` → RabbitMQ → a worker → the result store, read back
over HTTP. One gateway and one worker serve the whole module (each test uses ids of its own)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from gateway_support import ASYNC, GatewayProcess, oip_request
from support import BackgroundWorker, Env, Models, wait_for

pytestmark = pytest.mark.broker


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


def new_id() -> str:
    return f"http-{uuid.uuid4().hex}"


def test_outputs_equal_scikit_learns_for_every_version_form(
    http: httpx.Client, worker: BackgroundWorker, models: Models
) -> None:
    # Given rows sent to the alias, a version number and latest
    cases = [("versions/champion/", models.forest), ("versions/2/", models.logistic), ("", models.logistic)]
    for i, (path, estimator) in enumerate(cases):
        rows = models.X[i * 7 : i * 7 + 5]
        # When each is submitted as an Open Inference Protocol client does (no Prefer header)
        response = http.post(f"/v2/models/iris/{path}infer", json=oip_request(rows))
        # Then the inference response comes back, with scikit-learn's answers and the version that ran
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"model_name", "model_version", "id", "parameters", "outputs"}
        outputs = {o["name"]: o for o in answer["outputs"]}
        np.testing.assert_array_equal(outputs["label"]["data"], estimator.predict(rows))
        probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
        np.testing.assert_allclose(probabilities, estimator.predict_proba(rows), atol=1e-5)
        assert answer["model_name"] == "iris"
        assert answer["model_version"] == ("1" if estimator is models.forest else "2")


def test_a_job_is_accepted_with_202_and_its_operation_finishes(http: httpx.Client, worker: BackgroundWorker) -> None:
    job_id = new_id()
    response = http.post(
        "/v2/models/iris/versions/champion/infer", json=oip_request([[5.1, 3.5, 1.4, 0.2]], id=job_id), headers=ASYNC
    )

    assert response.status_code == 202, response.text
    assert response.headers["Preference-Applied"] == "respond-async"
    assert response.headers["Operation-Location"] == f"/v2/operations/{job_id}"
    assert response.headers["Location"] == response.headers["Operation-Location"]
    assert response.headers["Retry-After"] == "1"
    assert response.json() == {"id": job_id, "status": "queued", "model_name": "iris", "model_version": "champion"}

    operation = poll(http, response.headers["Operation-Location"])
    assert operation["status"] == "succeeded" and operation["model_version"] == "champion"
    assert operation["result"]["id"] == job_id and operation["result"]["model_version"] == "1"


def poll(http: httpx.Client, location: str, timeout_s: float = 30) -> dict:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(location)
        assert response.status_code == 200, response.text
        if response.json()["status"] != "queued":
            return dict(response.json())
        assert response.headers["Retry-After"] == "1"
        assert time.monotonic() < deadline, "the operation did not finish in time"
        time.sleep(0.05)


def test_requested_outputs_are_the_only_ones_returned(http: httpx.Client, worker: BackgroundWorker) -> None:
    body = oip_request([[6.0, 3.0, 5.0, 2.0]], outputs=[{"name": "label"}])
    response = http.post("/v2/models/iris/infer", json=body)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["label"]


def test_the_same_id_again_returns_the_existing_operation_and_never_a_second_job(
    http: httpx.Client, world: Env, worker: BackgroundWorker
) -> None:
    job_id = new_id()
    body = oip_request([[5.0, 3.4, 1.5, 0.2]], id=job_id)
    # Given 20 concurrent submissions of one body under one id, and then one more after it finished
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(lambda _: http.post("/v2/models/iris/infer", json=body, headers=ASYNC).status_code, range(20))
        )
    assert set(statuses) <= {200, 202}
    finished = poll(http, f"/v2/operations/{job_id}")
    again = http.post("/v2/models/iris/infer", json=body, headers=ASYNC)
    # Then the resubmission answers with the finished operation, or its result when waited for
    assert again.status_code == 200 and again.json() == finished
    waited = http.post("/v2/models/iris/infer", json=body)
    assert waited.status_code == 200 and waited.json() == finished["result"]
    # And a different body under that id is refused, in either place it can carry the id
    other = oip_request([[9.9, 3.4, 1.5, 0.2]], id=job_id)
    conflict = http.post("/v2/models/iris/infer", json=other)
    assert conflict.status_code == 409 and conflict.json()["code"] == "id_conflict"
    keyed = http.post(
        "/v2/models/iris/infer", json=oip_request([[9.9, 3.4, 1.5, 0.2]]), headers={"Idempotency-Key": job_id}
    )
    assert keyed.status_code == 409
    # And the job ran once: one stored result, and at most one per concurrent publish on the result queue
    assert world.stored()[job_id].status == "succeeded"
    results = [r for r in world.results_on_queue() if r.id == job_id]
    assert results and all(r == results[0] for r in results)


def test_the_idempotency_key_is_the_job_id_when_the_body_has_none(http: httpx.Client, worker: BackgroundWorker) -> None:
    key = new_id()
    headers = {"Idempotency-Key": key, **ASYNC}
    first = http.post("/v2/models/iris/infer", json=oip_request([[5.1, 3.5, 1.4, 0.2]]), headers=headers)
    second = http.post("/v2/models/iris/infer", json=oip_request([[5.1, 3.5, 1.4, 0.2]]), headers=headers)
    assert first.status_code == 202 and first.json()["id"] == key
    assert second.status_code in (200, 202) and second.json()["id"] == key


def tensor(shape: list[int], data: list, datatype: str = "FP32", name: str = "X") -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("iris/infer", {"inputs": []}, 400, "invalid_payload"),
        ("iris/infer", tensor([1, 4], [1, 2]), 400, "invalid_payload"),
        ("iris/infer", tensor([1, 4], [1, 2, 3, "x"]), 400, "invalid_payload"),
        ("iris/infer", {"id": "no spaces allowed", **oip_request([[1, 2, 3, 4]])}, 400, "invalid_payload"),
        ("iris/infer", tensor([1, 3], [1, 2, 3]), 400, "input_mismatch"),
        ("iris/infer", tensor([1, 4], [1, 2, 3, 4], "FP64"), 400, "input_mismatch"),
        ("iris/infer", tensor([1, 4], [1, 2, 3, 4], name="features"), 400, "input_mismatch"),
        ("iris/infer", oip_request([[1, 2, 3, 4]], outputs=[{"name": "nope"}]), 400, "input_mismatch"),
        ("iris/infer", oip_request([[1.0, 2, 3, 4]] * 100_000), 400, "too_large"),
        ("nope/infer", oip_request([[1, 2, 3, 4]]), 404, "unknown_model"),
        ("iris/versions/9/infer", oip_request([[1, 2, 3, 4]]), 404, "unknown_version"),
        ("iris/versions/ghost/infer", oip_request([[1, 2, 3, 4]]), 404, "unknown_version"),
        ("iris/versions/-1/infer", oip_request([[1, 2, 3, 4]]), 400, "invalid_payload"),
    ],
)
def test_a_request_that_cannot_run_is_refused_at_the_door_with_the_workers_code(
    http: httpx.Client, world: Env, path: str, body: dict, status: int, code: str
) -> None:
    response = http.post(f"/v2/models/{path}", json=body)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and response.json()["error"]
    assert set(response.json()) == {"error", "code"}


def test_a_body_that_is_not_json_is_invalid_payload(http: httpx.Client) -> None:
    response = http.post("/v2/models/iris/infer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_payload"


def test_an_operation_never_accepted_is_404(http: httpx.Client) -> None:
    for job_id in (new_id(), "not a valid id"):
        response = http.get(f"/v2/operations/{job_id}")
        assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_model_metadata_comes_from_the_manifest(http: httpx.Client) -> None:
    response = http.get("/v2/models/iris")
    assert response.status_code == 200
    assert response.json() == {
        "name": "iris",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
        ],
    }
    assert http.get("/v2/models/iris/versions/champion").status_code == 200
    assert http.get("/v2/models/nope").json()["code"] == "unknown_model"


def test_health_metrics_and_schema(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    metrics = http.get("/metrics").text
    assert 'inferq_http_requests_total{method="GET",route="/v2/health/live",status="200"}' in metrics
    schema = http.get("/openapi.json").json()
    assert "/v2/models/{model_name}/versions/{model_version}/infer" in schema["paths"]


def test_thousands_of_concurrent_requests_each_get_one_accepted_job_and_one_result(
    http: httpx.Client, world: Env, worker: BackgroundWorker, models: Models
) -> None:
    ids = [new_id() for _ in range(2000)]
    lock = threading.Lock()
    statuses: Counter[int] = Counter()
    resent: list[str] = []

    def submit(i: int) -> None:
        body = oip_request(models.X[i % 150 : i % 150 + 1], id=ids[i])
        for attempt in range(3):
            try:
                response = http.post("/v2/models/iris/infer", json=body, headers=ASYNC)
                break
            except httpx.TransportError:
                # As a client should: the same request again, under the same id (the gateway answers
                # an id it already took with its operation, and never queues a second job for it).
                if attempt == 2:
                    raise
                with lock:
                    resent.append(ids[i])
        with lock:
            statuses[response.status_code] += 1

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(submit, range(len(ids))))

    # Every request accepted: 202, or for a request sent again after a lost connection, 200 once its
    # first copy had finished. A connection lost now and then is the network's; more is the gateway's.
    assert set(statuses) <= {200, 202} and statuses.total() == len(ids), statuses
    assert statuses[200] <= len(resent) <= len(ids) // 100, resent
    wait_for(lambda: all((world.result_dir / f"{job_id}.json").exists() for job_id in ids), timeout_s=60)
    stored = world.stored()
    assert all(stored[job_id].status == "succeeded" for job_id in ids)
    for job_id in ids[::100]:
        assert http.get(f"/v2/operations/{job_id}").json()["result"]["id"] == job_id
