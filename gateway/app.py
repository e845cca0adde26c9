"""The ASGI app: routes, the OpenAPI schema, errors as JSON, the token check, body limit and metrics.

An inference request is answered the Open Inference Protocol way by default: it waits for its job's
result (``INFERQ_HTTP_WAIT_S``, or ``Prefer: wait=N``) and answers 200 with the inference response (JSON,
or JSON then binary outputs), or the job's error. ``Prefer: respond-async``, or a wait that runs out,
answers 202 with the operation to read at ``Operation-Location``. Every answer that is not a success is
``{"error": message, "code": code}`` with a status from the list in the README; the schema at
``/openapi.json`` documents each one, so clients (and the schema fuzzer in the tests) can hold the
server to it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferq.gateway import hot_path
from inferq.gateway.binary import BINARY_MEDIA_TYPE, HEADER_LENGTH
from inferq.gateway.errors import ApiCode, ApiError, describe_validation, from_job_error, store_unavailable
from inferq.gateway.hot_path import (
    JSON,
    BearerToken,
    HotPath,
    InferHeaders,
    Reply,
    error_reply,
    json_reply,
    too_large,
)
from inferq.gateway.jobs import version_ref
from inferq.gateway.metrics import UNMATCHED_ROUTE
from inferq.gateway.probe import model_not_ready
from inferq.gateway.protocol import (
    ErrorBody,
    InferenceRequest,
    InferenceResponse,
    Liveness,
    ModelMetadata,
    ModelReadiness,
    Operation,
    Readiness,
    ServerMetadata,
)
from inferq.gateway.service import Gateway
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import JOB_ID_PATTERN, LATEST, VersionRef
from inferq.shared.errors import JobError, StoreError

log = get_logger(__name__)

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before asking again.", "schema": {"type": "integer"}}}
_OPERATION_HEADERS = {
    "Operation-Location": {"description": "Where to read the operation.", "schema": {"type": "string"}},
    "Location": {"description": "The same as Operation-Location.", "schema": {"type": "string"}},
    **_RETRY_AFTER,
}


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorBody, "description": description}
    if retry:
        doc["headers"] = _RETRY_AFTER
    return doc


def _json(status: int, body: BaseModel) -> Response:
    return _response(json_reply(status, body))


def _response(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=dict(reply.headers))


def error_response(error: ApiError) -> Response:
    """The JSON answer of an :class:`ApiError` (messages are redacted: a store URL may carry a password)."""
    return _response(error_reply(error))


# -- middleware ------------------------------------------------------------------------------------


class BodyLimit:
    """Refuses a request body above ``max_bytes`` with 400 ``too_large`` before anything parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(too_large(self.max_bytes))(scope, receive, send)


class RequestMetrics:
    """Counts answers by route template and status, and times them."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.metrics = gateway.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            method = scope["method"] if route != UNMATCHED_ROUTE else "_"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_seconds.labels(route, method).observe(time.perf_counter() - started)


# -- the app ---------------------------------------------------------------------------------------


def _token_check(gateway: Gateway) -> list[Any]:
    """Dependencies that enforce ``Authorization: Bearer <INFERQ_API_TOKEN>`` (none when it is unset)."""
    token = gateway.settings.api_token
    if token is None:
        return []
    bearer_token = BearerToken(token)
    bearer = HTTPBearer(auto_error=False, description="INFERQ_API_TOKEN")

    def check(request: Request) -> None:
        bearer_token.check(request.headers.get("authorization", ""))

    # The HTTPBearer dependency only documents the scheme in the OpenAPI schema; ``check`` decides.
    return [Depends(bearer), Depends(check)]


def create_app(gateway: Gateway) -> ASGIApp:
    """The ASGI app over a built :class:`Gateway`: the hot routes answered straight from ASGI
    (:class:`HotPath`), the rest by FastAPI; stopping the app stops the gateway, in order."""
    return HotPath(create_fastapi_app(gateway), gateway)


def create_fastapi_app(gateway: Gateway) -> FastAPI:
    """The FastAPI app: every route and the OpenAPI schema (the hot routes' included)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # The server stopped taking requests and the in-flight ones have been answered (their
        # confirms included): publish whatever is left, then close the stores.
        await to_thread.run_sync(gateway.close)

    app = FastAPI(
        title="inferq",
        summary="Open Inference Protocol requests in: results, or asynchronous operations on request.",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    _add_error_handlers(app)
    app.include_router(_v2_router(gateway, _token_check(gateway)))
    app.include_router(_service_router(gateway))
    app.add_middleware(BodyLimit, max_bytes=gateway.settings.max_message_bytes)
    app.add_middleware(RequestMetrics, gateway=gateway)
    app.openapi = _openapi_without_422(app)  # type: ignore[method-assign]
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def invalid_request(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # FastAPI's locations start with where the value came from (path, query, header).
        errors = [{**error, "loc": tuple(error.get("loc", ()))[1:]} for error in exc.errors()]
        return error_response(ApiError(400, ApiCode.INVALID_PAYLOAD, describe_validation(errors)))

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: ApiCode.NOT_FOUND, 405: ApiCode.METHOD_NOT_ALLOWED}
        code = codes.get(exc.status_code, ApiCode.INVALID_PAYLOAD)
        return error_response(ApiError(exc.status_code, code, str(exc.detail)))

    async def unexpected(_request: Request, exc: Exception) -> Response:
        # A bug, not a client's fault: logged with its traceback, answered in the same JSON shape.
        log.error("request_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return error_response(ApiError(500, ApiCode.INTERNAL_ERROR, "internal error; see the server's log"))

    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)


# The infer routes and the operation read are answered by :class:`HotPath` before FastAPI sees them; their
# FastAPI routes describe them in the schema (and answer the same way, through the same functions). The
# headers and the body (JSON whatever its content type, or JSON then binary tensors) are read by hand, so
# they are documented here.
_INFER_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "Prefer",
            "in": "header",
            "required": False,
            "description": (
                "RFC 7240. `respond-async`: answer 202 with the operation at once (with `wait=N`: after up to "
                "N seconds). `wait=N`: wait up to N seconds (at most 60) for the result instead of "
                "INFERQ_HTTP_WAIT_S; a wait that runs out answers 202 with the operation."
            ),
            "schema": {"type": "string"},
        },
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "The job id when the body has none: a retry with it is safe.",
            "schema": {"type": "string", "pattern": JOB_ID_PATTERN},
        },
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": (
                "Binary tensor data extension: the length of the JSON at the start of the body; the bytes "
                "of the inputs with parameters.binary_data_size follow it, in input order."
            ),
            "schema": {"type": "integer", "minimum": 0},
        },
    ],
    "requestBody": {
        "required": True,
        "description": "JSON (any content type or none), or JSON then binary inputs (Inference-Header-Content-Length).",
        "content": {
            JSON: {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    },
}
_BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The job finished: the inference response (application/json), or its JSON then the binary outputs "
            "asked for (application/octet-stream, with Inference-Header-Content-Length). With Prefer: "
            "respond-async, the finished operation of an id accepted before."
        ),
        "headers": {
            HEADER_LENGTH: {
                "description": "The length of the JSON before the binary outputs.",
                "schema": {"type": "integer"},
            },
            **_OPERATION_HEADERS,
        },
        "content": {
            JSON: {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/InferenceResponse"},
                        {"$ref": "#/components/schemas/Operation"},
                    ]
                }
            },
            BINARY_MEDIA_TYPE: _BINARY_BODY,
        },
    },
    202: {
        "model": Operation,
        "description": "Accepted and queued (the broker confirmed it): Prefer: respond-async, or the wait ran out.",
        "headers": _OPERATION_HEADERS,
    },
    400: _error(
        "The body breaks the contract, or the job failed for it: invalid_payload, input_mismatch or too_large."
    ),
    404: _error("No such model or version: unknown_model, unknown_version."),
    409: _error("The id was already used for a different request, or holds another job's result: id_conflict."),
    429: _error("The jobs queue is full: queue_full.", retry=True),
    500: _error("The job failed on the worker: inference_error, model_load_error, dead_lettered, ..."),
    503: _error("The broker or a store is unreachable.", retry=True),
}
_REQUEST_SCHEMAS = (InferenceRequest, InferenceResponse)
"""Models the schema names that no route declares as such (the infer routes read their body themselves)."""


def _v2_router(gateway: Gateway, auth: list[Any]) -> APIRouter:
    responses: dict[int | str, dict[str, Any]] = {401: _error("Missing or wrong bearer token.")} if auth else {}
    router = APIRouter(prefix="/v2", dependencies=auth, responses=responses)
    server = ServerMetadata(name="inferq", version=metadata.version("inferq"), extensions=["binary_tensor_data"])

    @router.get("", response_model=None, responses={200: {"model": ServerMetadata, "description": "This server."}})
    async def server_metadata() -> Response:
        """Open Inference Protocol server metadata: name, version and extensions."""
        return _json(200, server)

    async def infer_at(request: Request, model: str, version: str) -> Response:
        headers = request.headers
        read = InferHeaders(headers.getlist("prefer"), headers.get("idempotency-key"), headers.get(HEADER_LENGTH))
        root_path = request.scope.get("root_path", "")
        return _response(await hot_path.infer(gateway, model, version, await request.body(), read, root_path))

    @router.post(
        "/models/{model_name}/infer",
        response_model=None,
        responses=_INFER_RESPONSES,
        openapi_extra=_INFER_OPENAPI,
    )
    async def infer(request: Request, model_name: str) -> Response:
        """Run the latest version of a model on a request: its result, or its operation (asynchronous)."""
        return await infer_at(request, model_name, LATEST)

    @router.post(
        "/models/{model_name}/versions/{model_version}/infer",
        response_model=None,
        responses=_INFER_RESPONSES,
        openapi_extra=_INFER_OPENAPI,
    )
    async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
        """Run a version of a model (a number, `latest` or an alias) on a request: its result, or its operation."""
        return await infer_at(request, model_name, model_version)

    @router.get(
        "/operations/{operation_id}",
        response_model=None,
        responses={
            200: {
                "model": Operation,
                "description": "Queued or finished (failed with id_conflict or dead_lettered included).",
                "headers": _OPERATION_HEADERS,
            },
            404: _error("No operation with that id was accepted: not_found."),
            503: _error("A store is unreachable.", retry=True),
        },
    )
    async def operation(request: Request, operation_id: str) -> Response:
        """The status of an operation and, once finished, its result or error."""
        return _response(await hot_path.operation(gateway, operation_id, request.scope.get("root_path", "")))

    _add_model_routes(router, gateway)
    return router


def _add_model_routes(router: APIRouter, gateway: Gateway) -> None:
    metadata_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": ModelMetadata, "description": "From the manifest of the version."},
        400: _error("The version is not a number, latest or an alias name."),
        404: _error("No such model or version."),
        503: _error("The model store is unreachable.", retry=True),
    }

    @router.get("/models/{model_name}", response_model=None, responses=metadata_responses)
    async def model_metadata(model_name: str) -> Response:
        """Model metadata of the latest version."""
        return _json(200, await gateway.metadata(model_name, None))

    @router.get("/models/{model_name}/versions/{model_version}", response_model=None, responses=metadata_responses)
    async def model_version_metadata(model_name: str, model_version: str) -> Response:
        """Model metadata of a version: a number, `latest` or an alias."""
        return _json(200, await gateway.metadata(model_name, version_ref(model_version)))

    ready_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": ModelReadiness, "description": "The version exists and a worker consumes the jobs queue."},
        400: _error("The version is not a number, latest or an alias name."),
        404: _error("No such model or version: unknown_model, unknown_version."),
        503: _error(
            "Not ready: not_ready (no worker, or the broker cannot be read), or store_unavailable.", retry=True
        ),
    }

    async def ready_at(name: str, ref: VersionRef) -> Response:
        problem = await to_thread.run_sync(_model_problem, gateway, name, ref)
        if problem is not None:
            raise ApiError(503, ApiCode.NOT_READY, problem, retry_after_s=1)
        return _json(200, ModelReadiness(name=name, ready=True))

    @router.get("/models/{model_name}/ready", response_model=None, responses=ready_responses)
    async def model_ready(model_name: str) -> Response:
        """Whether the latest version of a model can be served now."""
        return await ready_at(model_name, LATEST)

    @router.get("/models/{model_name}/versions/{model_version}/ready", response_model=None, responses=ready_responses)
    async def model_version_ready(model_name: str, model_version: str) -> Response:
        """Whether a version of a model (a number, `latest` or an alias) can be served now."""
        return await ready_at(model_name, version_ref(model_version))


def _model_problem(gateway: Gateway, name: str, ref: VersionRef) -> str | None:
    try:
        return model_not_ready(gateway.catalog, gateway.probe, name, ref)
    except JobError as exc:
        raise from_job_error(exc) from None
    except (OSError, StoreError) as exc:
        raise store_unavailable("the model store", exc) from None


def _service_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/v2/health/live", response_model=None, responses={200: {"model": Liveness, "description": "Alive."}})
    async def live() -> Response:
        """The process answers."""
        return _json(200, Liveness(live=True))

    @router.get(
        "/v2/health/ready",
        response_model=None,
        responses={
            200: {"model": Readiness, "description": "Connected to the broker, the jobs queue below its bound."},
            503: _error("Not ready: not_ready, with the reason.", retry=True),
        },
    )
    async def ready() -> Response:
        """Whether the gateway can accept jobs now."""
        problem = await gateway.not_ready()
        if problem is not None:
            raise ApiError(503, ApiCode.NOT_READY, problem, retry_after_s=1)
        return _json(200, Readiness(ready=True))

    @router.get(
        "/metrics",
        response_model=None,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus."}},
    )
    async def metrics() -> Response:
        """Prometheus metrics."""
        gateway.metrics.broker_connected.set(1 if gateway.publisher.connected else 0)
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


def _openapi_without_422(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 for every route with parameters (this app answers those with 400), and
    not the models of bodies a route reads itself."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for model in _REQUEST_SCHEMAS:
                described = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in described.pop("$defs", {}).items():
                    schemas.setdefault(name, definition)
                schemas.setdefault(model.__name__, described)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
