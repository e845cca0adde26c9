"""The routes a busy gateway lives on, answered straight from ASGI: ``POST /v2/models/{m}/infer``,
``POST /v2/models/{m}/versions/{v}/infer`` and ``GET /v2/operations/{id}``.

Why: FastAPI's per-request machinery (matching against every route, dependency injection, the
middleware stack, request and response objects) cost about as much CPU per admitted request as the
admission itself. Here a request is matched by splitting its path, its body read once with the size
limit, its token checked, and it is answered with two ASGI messages; what it counts on ``/metrics`` is
the same as through FastAPI. Every other request (other paths, other methods) goes to the FastAPI app
unchanged. The FastAPI routes of these paths stay: they describe them in the OpenAPI schema, and answer
through the same functions (:func:`infer`, :func:`operation`) should a request ever reach them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from inferq.gateway.binary import BINARY_MEDIA_TYPE, HEADER_LENGTH, OutputEncoding, encode_response, read_request
from inferq.gateway.errors import ApiCode, ApiError, failed_job_status
from inferq.gateway.jobs import preference, version_ref
from inferq.gateway.metrics import GatewayMetrics
from inferq.gateway.protocol import ErrorBody, OperationStatus
from inferq.gateway.service import Answer, Gateway
from inferq.shared.config.logging import get_logger, redact_text
from inferq.shared.contract.messages import LATEST

log = get_logger(__name__)

JSON = "application/json"
INFER_ROUTE = "/v2/models/{model_name}/infer"
INFER_VERSION_ROUTE = "/v2/models/{model_name}/versions/{model_version}/infer"
OPERATION_ROUTE = "/v2/operations/{operation_id}"
"""Route templates, as FastAPI names them (the ``route`` label of the request metrics)."""
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


# -- answers ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, body, its media type and any other headers."""

    status: int
    body: bytes
    media_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, body: BaseModel, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """``body`` as JSON (fields that are ``None`` left out)."""
    return Reply(status, body.model_dump_json(exclude_none=True).encode(), JSON, headers)


def error_reply(error: ApiError) -> Reply:
    """The JSON answer of an :class:`ApiError` (messages are redacted: a store URL may carry a password)."""
    headers: list[tuple[str, str]] = []
    if error.retry_after_s is not None:
        headers.append(("Retry-After", str(error.retry_after_s)))
    if error.status == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="inferq"'))
    return json_reply(error.status, ErrorBody(error=redact_text(error.message), code=error.code), tuple(headers))


def _location(operation_id: str, root_path: str) -> tuple[tuple[str, str], ...]:
    location = f"{root_path}/v2/operations/{operation_id}"
    return (("Operation-Location", location), ("Location", location))


def operation_reply(answer: Answer, root_path: str, extra: tuple[tuple[str, str], ...] = ()) -> Reply:
    """An operation, with where to read it again (and when, while it is queued)."""
    headers = _location(answer.operation.id, root_path) + extra
    if answer.operation.status == "queued":
        headers += (("Retry-After", "1"),)
    return json_reply(answer.status, answer.operation, headers)


def inference_reply(answer: Answer, encoding: OutputEncoding, root_path: str) -> Reply:
    """The synchronous answer: the inference response, the job's error, or (not finished in time) 202
    with the operation."""
    operation = answer.operation
    if operation.status is OperationStatus.SUCCEEDED and operation.result is not None:
        body, header_length = encode_response(operation.result, encoding)
        if header_length is None:
            return Reply(200, body, JSON)
        return Reply(200, body, BINARY_MEDIA_TYPE, ((HEADER_LENGTH, str(header_length)),))
    if operation.status is OperationStatus.QUEUED or operation.error is None:
        return operation_reply(Answer(202, operation), root_path)
    error = operation.error
    body_ = ErrorBody(error=redact_text(error.message), code=error.code)
    return json_reply(failed_job_status(error.code), body_, _location(operation.id, root_path))


# -- what the routes do ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferHeaders:
    """The headers an inference request is read with."""

    prefer: list[str]
    idempotency_key: str | None = None
    header_length: str | None = None
    """``Inference-Header-Content-Length``: binary tensors follow the JSON."""


async def infer(
    gateway: Gateway, model: str, version: str, body: bytes, headers: InferHeaders, root_path: str
) -> Reply:
    """Admit the job an inference request asks for; its result (the synchronous default) or its operation."""
    settings = gateway.settings
    request, encoding = read_request(body, headers.header_length)
    prefer = preference(headers.prefer)
    wait_s = prefer.wait(settings.http_wait_s, settings.max_prefer_wait_s)
    answer = await gateway.submit(model, version_ref(version), request, headers.idempotency_key, wait_s)
    if prefer.respond_async:
        return operation_reply(answer, root_path, (("Preference-Applied", "respond-async"),))
    return inference_reply(answer, encoding, root_path)


async def operation(gateway: Gateway, operation_id: str, root_path: str) -> Reply:
    """The status of an operation and, once finished, its result or error."""
    return operation_reply(await gateway.operation(operation_id), root_path)


class BearerToken:
    """Checks ``Authorization: Bearer <INFERQ_API_TOKEN>`` in constant time."""

    def __init__(self, token: SecretStr) -> None:
        # Both sides hashed first: the comparison takes the same time whatever the length of the guess.
        self._expected = hashlib.sha256(token.get_secret_value().encode()).digest()

    def check(self, authorization: str) -> None:
        """Raises a 401 :class:`ApiError` unless ``authorization`` carries the token."""
        scheme, _, given = authorization.partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self._expected):
            raise ApiError(401, ApiCode.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer …)")


# -- ASGI ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Match:
    route: str
    first: str
    second: str = ""


def _route_path(scope: Scope) -> str:
    """The path below the app's root path, as Starlette's router matches it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def match(scope: Scope) -> _Match | None:
    """The hot route ``scope`` asks for (a path segment matches as Starlette's ``{param}`` does: one or
    more characters, no slash), or ``None`` for the FastAPI app."""
    method = scope["method"]
    if method not in ("POST", "GET"):
        return None
    parts = _route_path(scope).split("/")
    count = len(parts)
    if count < 4 or parts[0] or parts[1] != "v2":
        return None
    if method == "GET":
        ok = count == 4 and parts[2] == "operations" and parts[3]
        return _Match(OPERATION_ROUTE, parts[3]) if ok else None
    if parts[2] != "models" or parts[-1] != "infer" or not all(parts[3:-1]):
        return None
    if count == 5:
        return _Match(INFER_ROUTE, parts[3], LATEST)
    if count == 7 and parts[4] == "versions":
        return _Match(INFER_VERSION_ROUTE, parts[3], parts[5])
    return None


@dataclass(slots=True)
class _Headers:
    authorization: str = ""
    content_length: bytes = b""
    idempotency_key: str | None = None
    header_length: str | None = None


def _read_headers(scope: Scope) -> tuple[_Headers, list[str]]:
    """The headers the hot routes read, in one pass (names arrive lower-cased; values are latin-1)."""
    found = _Headers()
    prefer: list[str] = []
    for name, value in scope["headers"]:
        if name == b"prefer":
            prefer.append(value.decode("latin-1"))
        elif name == b"authorization":
            found.authorization = value.decode("latin-1")
        elif name == b"content-length":
            found.content_length = value
        elif name == b"idempotency-key":
            found.idempotency_key = value.decode("latin-1")
        elif name == _HEADER_LENGTH:
            found.header_length = value.decode("latin-1")
    return found, prefer


class _Disconnected(Exception):
    """The client went away before its body arrived: nobody to answer."""


class _Counted:
    """The request metrics of one route and method, their labelled children looked up once."""

    def __init__(self, metrics: GatewayMetrics, route: str, method: str) -> None:
        self._requests = metrics.requests
        self._route = route
        self._method = method
        self._by_status: dict[int, Any] = {}
        self._seconds = metrics.request_seconds.labels(route, method)

    def observe(self, status: int, seconds: float) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._requests.labels(self._route, self._method, str(status))
        child.inc()
        self._seconds.observe(seconds)


class HotPath:
    """ASGI: the hot routes answered here, everything else passed to ``app`` (the FastAPI app)."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        token = gateway.settings.api_token
        self._token = None if token is None else BearerToken(token)
        self._max_bytes = gateway.settings.max_message_bytes
        self._counted = {
            route: _Counted(gateway.metrics, route, method)
            for route, method in ((INFER_ROUTE, "POST"), (INFER_VERSION_ROUTE, "POST"), (OPERATION_ROUTE, "GET"))
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = match(scope) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            reply = await self._answer(found, scope, receive)
        except _Disconnected:
            return
        await _send(send, reply)
        self._counted[found.route].observe(reply.status, time.perf_counter() - started)

    async def _answer(self, found: _Match, scope: Scope, receive: Receive) -> Reply:
        headers, prefer = _read_headers(scope)
        root_path = scope.get("root_path", "")
        try:
            if found.route == OPERATION_ROUTE:
                self._check_token(headers)
                return await operation(self.gateway, found.first, root_path)
            # The size limit before anything else, the token before the body is parsed (as on every route).
            body = await self._body(headers.content_length, receive)
            self._check_token(headers)
            infer_headers = InferHeaders(prefer, headers.idempotency_key, headers.header_length)
            return await infer(self.gateway, found.first, found.second, body, infer_headers, root_path)
        except ApiError as exc:
            return error_reply(exc)
        except _Disconnected:
            raise
        except Exception as exc:  # a bug, not a client's fault: logged with its traceback, answered as JSON
            log.error("request_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
            return error_reply(ApiError(500, ApiCode.INTERNAL_ERROR, "internal error; see the server's log"))

    def _check_token(self, headers: _Headers) -> None:
        if self._token is not None:
            self._token.check(headers.authorization)

    async def _body(self, declared: bytes, receive: Receive) -> bytes:
        """The whole body, refused with 400 ``too_large`` above the limit (declared or read)."""
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise too_large(self._max_bytes)
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):  # the usual case: the body in one message
            if len(body) > self._max_bytes:
                raise too_large(self._max_bytes)
            return body
        chunks = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_bytes:
                raise too_large(self._max_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def too_large(max_bytes: int) -> ApiError:
    """A request body above the limit."""
    return ApiError(400, ApiCode.TOO_LARGE, f"the request body is above the limit of {max_bytes} bytes")


async def _send(send: Send, reply: Reply) -> None:
    headers = [
        (b"content-length", str(len(reply.body)).encode()),
        (b"content-type", reply.media_type.encode()),
    ]
    headers.extend((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers)
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
