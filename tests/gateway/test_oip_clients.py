"""``inferq serve`` as an Open Inference Protocol server, driven by a client no one here wrote: Triton's
``tritonclient.http``, with its defaults (binary tensors both ways) and without, against a real worker;
then the asynchronous path (``Prefer: respond-async``), a wait that runs out, and a job that fails."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from gateway_support import ASYNC, GatewayProcess, oip_request
from support import BackgroundWorker, Env, Models
from tritonclient.utils import InferenceServerException

from inferq.model_store.base import publish

pytestmark = pytest.mark.broker


@pytest.fixture
def client(gateway: GatewayProcess, worker: BackgroundWorker) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{gateway.port}")
    yield client
    client.close()


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


def features(rows: np.ndarray, *, binary: bool = True) -> list[triton.InferInput]:
    tensor = triton.InferInput("X", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32), binary_data=binary)
    return [tensor]


def test_tritonclient_sees_a_live_and_ready_server_and_its_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "inferq" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("iris", "champion")
    assert model["versions"] == ["1", "2"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]


def test_a_model_is_ready_when_its_version_exists_and_a_worker_consumes_the_jobs(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    # Given a worker consuming the jobs queue: every version that exists is ready
    for version in ("", "1", "2", "champion", "latest"):
        assert client.is_model_ready("iris", version), version
    assert http.get("/v2/models/iris/versions/champion/ready").json() == {"name": "iris", "ready": True}
    # And those that do not exist are not, with the status KServe gives them
    assert not client.is_model_ready("nope") and not client.is_model_ready("iris", "9")
    for path, status, code in [
        ("nope/ready", 404, "unknown_model"),
        ("iris/versions/9/ready", 404, "unknown_version"),
        ("iris/versions/-1/ready", 400, "invalid_payload"),
    ]:
        response = http.get(f"/v2/models/{path}")
        assert (response.status_code, response.json()["code"]) == (status, code), response.text


def test_infer_with_json_tensors_answers_scikit_learns_outputs(
    client: triton.InferenceServerClient, models: Models
) -> None:
    rows = models.X[10:15]
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("label", "probabilities")]

    # (with the Prefer header a caller may send to bound its wait)
    result = client.infer(
        "iris", features(rows, binary=False), model_version="champion", outputs=outputs, headers={"Prefer": "wait=20"}
    )

    np.testing.assert_array_equal(result.as_numpy("label"), models.forest.predict(rows))
    np.testing.assert_allclose(result.as_numpy("probabilities"), models.forest.predict_proba(rows), atol=1e-5)
    response = result.get_response()
    assert response["model_name"] == "iris" and response["model_version"] == "1"  # the version that ran
    assert response["id"] and response["parameters"]["total_ms"] >= 0
    assert all("data" in output for output in response["outputs"])


def test_infer_with_tritonclients_defaults_sends_and_gets_binary_tensors(
    client: triton.InferenceServerClient, models: Models
) -> None:
    rows = models.X[40:60]
    # When tritonclient sends its default: binary inputs, and every output asked for in binary
    result = client.infer("iris", features(rows), model_version="2", request_id=f"bin-{uuid.uuid4().hex}")

    # Then the answer's outputs came as bytes after the JSON, and equal scikit-learn's
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(result.as_numpy("label"), models.logistic.predict(rows))
    probabilities = result.as_numpy("probabilities")
    assert probabilities is not None and probabilities.shape == (20, 3)
    np.testing.assert_allclose(probabilities, models.logistic.predict_proba(rows), atol=1e-5)


def test_requested_outputs_are_the_only_ones_returned_each_in_the_encoding_asked(
    client: triton.InferenceServerClient, models: Models
) -> None:
    rows = models.X[100:103]
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=True)]
    only = client.infer("iris", features(rows), outputs=outputs)
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]
    assert only.as_numpy("label") is None
    np.testing.assert_allclose(only.as_numpy("probabilities"), models.logistic.predict_proba(rows), atol=1e-5)

    mixed = [triton.InferRequestedOutput("label", binary_data=False), triton.InferRequestedOutput("probabilities")]
    both = client.infer("iris", features(rows, binary=False), outputs=mixed)
    by_name = {o["name"]: o for o in both.get_response()["outputs"]}
    assert by_name["label"]["data"] == models.logistic.predict(rows).tolist()
    assert "data" not in by_name["probabilities"]
    np.testing.assert_allclose(both.as_numpy("probabilities"), models.logistic.predict_proba(rows), atol=1e-5)


def test_a_request_refused_at_the_door_is_an_oip_error_for_tritonclient(
    client: triton.InferenceServerClient, models: Models
) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", features(models.X[:1]))
    assert unknown.value.status() == "404" and "nope" in unknown.value.message()

    wrong = triton.InferInput("X", [1, 3], "FP32").set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as mismatch:
        client.infer("iris", [wrong])
    assert mismatch.value.status() == "400"


def test_a_job_that_fails_on_the_worker_answers_its_error_and_status(
    client: triton.InferenceServerClient, http: httpx.Client, models: Models
) -> None:
    # Given a model every job of which fails when it runs (the door cannot tell)
    job_id = f"fails-{uuid.uuid4().hex}"

    # When a caller waits for one of its jobs
    response = http.post("/v2/models/broken/infer", json=oip_request(models.X[:2], id=job_id))

    # Then the answer is the job's error: 500 for an inference error, with the operation's address
    assert response.status_code == 500, response.text
    assert response.json()["code"] == "inference_error" and response.json()["error"]
    assert set(response.json()) == {"error", "code"}
    assert response.headers["Operation-Location"] == f"/v2/operations/{job_id}"
    operation = http.get(response.headers["Operation-Location"]).json()
    assert operation["status"] == "failed" and operation["error"]["code"] == "inference_error"
    # And tritonclient raises it with the server's message
    with pytest.raises(InferenceServerException) as failed:
        client.infer("broken", features(models.X[:1]))
    assert failed.value.status() == "500" and failed.value.message()


def test_respond_async_answers_202_and_the_operation_holds_the_result(
    http: httpx.Client, worker: BackgroundWorker, models: Models
) -> None:
    # Given a binary request, built as tritonclient builds it, and asked to answer at once
    rows = models.X[70:72]
    body, json_size = triton.InferenceServerClient.generate_request_body(features(rows), request_id=new_id())
    headers = {**ASYNC, "Inference-Header-Content-Length": str(json_size)}

    response = http.post("/v2/models/iris/versions/champion/infer", content=body, headers=headers)

    # Then it is accepted with the operation to read
    assert response.status_code == 202, response.text
    assert response.headers["Preference-Applied"] == "respond-async"
    assert response.json()["status"] == "queued" and response.json()["model_version"] == "champion"
    operation = poll(http, response.headers["Operation-Location"])
    assert operation["status"] == "succeeded" and operation["result"]["model_version"] == "1"
    labels = {o["name"]: o for o in operation["result"]["outputs"]}["label"]["data"]
    assert labels == models.forest.predict(rows).tolist()


def test_bodies_are_read_as_json_whatever_their_content_type(http: httpx.Client, worker: BackgroundWorker) -> None:
    raw = httpx.Request("POST", "/", json=oip_request([[6.0, 3.0, 5.0, 2.0]])).content
    types = (
        None,
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
    )
    for content_type in types:
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = http.post("/v2/models/iris/infer", content=raw, headers=headers)
        assert response.status_code == 200, (content_type, response.text)
        assert response.headers["content-type"] == "application/json"


# -- without a worker ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[GatewayProcess]:
    """A gateway whose jobs queue has no worker, waiting 1 s by default."""
    env = Env(tmp_path_factory.mktemp("idle"), f"test.idle.{uuid.uuid4().hex[:12]}")
    publish(env.store, "iris", models.forest_onnx)
    try:
        with GatewayProcess(env, env.tmp, INFERQ_HTTP_WAIT_S="1") as process:
            yield process
    finally:
        env.delete_queues()


def test_a_wait_that_runs_out_answers_202_with_the_operation(idle: GatewayProcess) -> None:
    with idle.client() as http:
        for headers in ({}, {"Prefer": "wait=2"}, {"Prefer": "wait=0"}):
            job_id = new_id()
            response = http.post(
                "/v2/models/iris/infer", json=oip_request([[5.1, 3.5, 1.4, 0.2]], id=job_id), headers=headers
            )
            assert response.status_code == 202, response.text
            assert response.json() == {
                "id": job_id,
                "status": "queued",
                "model_name": "iris",
                "model_version": "latest",
            }
            assert response.headers["Operation-Location"] == f"/v2/operations/{job_id}"
            assert "Preference-Applied" not in response.headers
    client = triton.InferenceServerClient(url=f"127.0.0.1:{idle.port}")
    try:
        # tritonclient knows only 200: it raises, with the status
        with pytest.raises(InferenceServerException) as accepted:
            client.infer("iris", features(np.ones((1, 4))))
        assert accepted.value.status() == "202"
    finally:
        client.close()


def test_a_model_without_a_worker_is_not_ready(idle: GatewayProcess) -> None:
    with idle.client() as http:
        response = http.get("/v2/models/iris/ready")
        assert response.status_code == 503 and response.json()["code"] == "not_ready", response.text
        assert "no worker" in response.json()["error"] and response.headers["Retry-After"] == "1"
        assert http.get("/v2/health/ready").status_code == 200  # the server itself can accept jobs


def new_id() -> str:
    return f"oip-{uuid.uuid4().hex}"


def poll(http: httpx.Client, location: str, timeout_s: float = 30) -> dict[str, Any]:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(location)
        assert response.status_code == 200, response.text
        if response.json()["status"] != "queued":
            return dict(response.json())
        assert time.monotonic() < deadline, "the operation did not finish in time"
        time.sleep(0.05)
