"""The hot path's pure pieces, without a server: it takes exactly the requests FastAPI would route to
the infer and operation endpoints (and nothing else), jobs are encoded once, and the ids the gateway
makes up are time-ordered uuids."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from inferq.gateway.app import create_fastapi_app
from inferq.gateway.errors import ApiError
from inferq.gateway.hot_path import INFER_ROUTE, INFER_VERSION_ROUTE, OPERATION_ROUTE, BearerToken, match
from inferq.gateway.jobs import build_job, digest, job_id_for
from inferq.gateway.metrics import GatewayMetrics
from inferq.gateway.protocol import InferenceRequest
from inferq.shared.contract.messages import Job, is_valid_job_id

HOT_ENDPOINTS = {("POST", INFER_ROUTE), ("POST", INFER_VERSION_ROUTE), ("GET", OPERATION_ROUTE)}
PATHS = [
    "/v2/models/iris/infer",
    "/v2/models/iris/versions/2/infer",
    "/v2/models/iris/versions/champion/infer",
    "/v2/models/infer/infer",
    "/v2/models/versions/infer",
    "/v2/models//infer",
    "/v2/models/iris/versions//infer",
    "/v2/models/iris/infer/",
    "/v2/models/iris/versions/2/infer/x",
    "/v2/models/iris/versions/infer",
    "/v2/models/iris",
    "/v2/models/iris/ready",
    "/v2/operations/order-42",
    "/v2/operations/",
    "/v2/operations/a/b",
    "/v2/health/live",
    "/v2",
    "/v3/models/iris/infer",
    "/models/iris/infer",
]


class _NoGateway:
    """Just enough of a gateway to build the FastAPI app's routes (none of them is called)."""

    class settings:
        api_token = None
        max_message_bytes = 1024

    metrics = GatewayMetrics()


def fastapi_endpoint(app: Any, method: str, path: str) -> tuple[str, str] | None:
    """The (method, route template) FastAPI's router picks for a request, or None (found by sending it
    the request: the router notes its route in the scope)."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "app": app,
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(_message: dict[str, Any]) -> None:
        return None

    with contextlib.suppress(Exception):  # the endpoints have no gateway to call: only the routing counts
        asyncio.run(app(scope, receive, send))
    route = scope.get("route")
    return None if route is None else (method, route.path)


@pytest.fixture(scope="module")
def fastapi_app() -> Any:
    return create_fastapi_app(_NoGateway())  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "HEAD"])
@pytest.mark.parametrize("path", PATHS)
def test_the_hot_path_takes_exactly_what_fastapi_routes_to_the_hot_endpoints(
    fastapi_app: Any, method: str, path: str
) -> None:
    routed = fastapi_endpoint(fastapi_app, method, path)
    hot = match({"type": "http", "method": method, "path": path, "root_path": ""})

    if routed in HOT_ENDPOINTS:
        assert hot is not None and (method, hot.route) == routed
    else:
        assert hot is None


def test_path_parameters_are_read_from_below_the_root_path() -> None:
    scope = {"type": "http", "method": "POST", "path": "/api/v2/models/iris/versions/3/infer", "root_path": "/api"}

    found = match(scope)

    assert found is not None and (found.route, found.first, found.second) == (INFER_VERSION_ROUTE, "iris", "3")


def test_the_bearer_token_is_checked_scheme_and_all() -> None:
    token = BearerToken(SecretStr("s3cret-token-of-16+"))

    token.check("Bearer s3cret-token-of-16+")
    token.check("bearer  s3cret-token-of-16+ ")
    for wrong in ("", "Bearer", "Bearer nope", "Basic s3cret-token-of-16+", "s3cret-token-of-16+"):
        with pytest.raises(ApiError) as refused:
            token.check(wrong)
        assert refused.value.status == 401


def test_a_job_is_encoded_once_and_the_encoding_is_what_a_worker_decodes() -> None:
    request = InferenceRequest.model_validate(
        {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
    )

    job, encoded = build_job("iris", "latest", request, "order-1", max_message_bytes=1 << 20)

    assert encoded.job_id == "order-1"
    assert Job.model_validate_json(encoded.body) == job
    assert encoded.body == job.model_dump_json(exclude_none=True).encode()


def test_the_request_digest_is_the_one_records_were_written_with() -> None:
    # Records in a shared store outlive a release: the digest of a body must not change with the code.
    request = InferenceRequest.model_validate(
        {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2]}], "parameters": {"b": 1}}
    )
    job, _ = build_job("iris", 2, request, "order-1", max_message_bytes=1 << 20)
    material = {
        "model": "iris",
        "version": 2,
        "inputs": [t.model_dump(mode="json") for t in job.inputs],
        "parameters": {"b": 1},
        "outputs": None,
    }

    assert digest(job, request) == hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def test_ids_made_up_by_the_gateway_are_unique_time_ordered_version_7_uuids() -> None:
    request = InferenceRequest.model_validate(
        {"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [1]}]}
    )
    before_ms = time.time_ns() // 1_000_000

    ids = [job_id_for(request, None) for _ in range(1000)]

    after_ms = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert is_valid_job_id(job_id) and str(parsed) == job_id
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before_ms <= parsed.int >> 80 <= after_ms
    stamps = [uuid.UUID(job_id).int >> 80 for job_id in ids]
    assert stamps == sorted(stamps)
