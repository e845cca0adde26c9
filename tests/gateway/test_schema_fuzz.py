"""The OpenAPI schema, fuzzed with schemathesis against a running ``inferq serve`` (real broker, a
published model, a worker, so inference requests are answered with their results): no answer is a 5xx,
and every answer matches the schema (status, content type, headers, body). Negative cases (bodies that
break the schema) must be refused with a 4xx."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import orjson
import pytest
import schemathesis
from gateway_support import GatewayProcess
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import BackgroundWorker, Env, Models

from inferq.model_store.base import publish

pytestmark = pytest.mark.broker
TOKEN = "fuzz-token-" + uuid.uuid4().hex
EXAMPLES = 100
JSON = "application/json"
BINARY = "application/octet-stream"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[GatewayProcess]:
    env = Env(tmp_path_factory.mktemp("fuzz"), f"test.fuzz.{uuid.uuid4().hex[:12]}")
    publish(env.store, "iris", models.forest_onnx, alias="champion")
    try:
        with (
            GatewayProcess(env, env.tmp, INFERQ_API_TOKEN=TOKEN) as process,
            BackgroundWorker(env.worker_settings()),
        ):
            yield process
    finally:
        env.delete_queues()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_matches_the_schema_and_none_is_a_server_error(
    server: GatewayProcess, mode: GenerationMode
) -> None:
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    auth = {"Authorization": f"Bearer {TOKEN}"}

    @given(case=api.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case: schemathesis.Case) -> None:
        # A schema-valid body may still break rules JSON Schema cannot state (data length against
        # shape, the model's input signature): those get 400 by design, so that one check is off.
        case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

    call()
    assert "Traceback" not in server.log()


def test_each_kind_of_inference_answer_matches_the_schema(server: GatewayProcess, models: Models) -> None:
    # The fuzzer's bodies rarely fit the model; these do: a result as JSON, a result with binary outputs
    # after binary inputs, an accepted operation, and a model's readiness.
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rows = models.X[:2]
    tensor = {"name": "X", "shape": [2, 4], "datatype": "FP32"}
    as_json = {"inputs": [{**tensor, "data": rows.ravel().tolist()}]}
    header = orjson.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": 32}}], "parameters": {"binary_data_output": True}}
    )
    infer = api["/v2/models/{model_name}/versions/{model_version}/infer"]["POST"]
    cases = [
        (
            infer.Case(path_parameters={"model_name": "iris", "model_version": "1"}, body=as_json, media_type=JSON),
            200,
            JSON,
        ),
        (
            infer.Case(
                path_parameters={"model_name": "iris", "model_version": "champion"},
                body=header + rows.tobytes(),
                media_type=BINARY,
                headers={"Inference-Header-Content-Length": str(len(header))},
            ),
            200,
            BINARY,
        ),
        (
            infer.Case(
                path_parameters={"model_name": "iris", "model_version": "latest"},
                body=as_json,
                media_type=JSON,
                headers={"Prefer": "respond-async"},
            ),
            202,
            JSON,
        ),
        (api["/v2/models/{model_name}/ready"]["GET"].Case(path_parameters={"model_name": "iris"}), 200, JSON),
    ]
    for case, status, media_type in cases:
        response = case.call_and_validate(headers=auth)
        assert response.status_code == status, response.text
        assert response.headers["content-type"][0] == media_type
