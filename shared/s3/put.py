"""Conditional S3 PUTs for result objects on a lean path: SigV4-signed by hand, sent with http.client
on one kept-alive connection per writing thread.

boto3's ``put_object`` spends its CPU on parameter validation, event hooks, the request pipeline, its
signing and urllib3; a result write needs none of that: one small body, one key, one header
(``If-None-Match: *``). Here a PUT costs about 0.3 ms of client CPU instead of 1.4 ms (measured against a
local SeaweedFS), so more of a shared CPU goes to the server doing the writes. Credentials, region and
endpoint still come from boto3's standard configuration (the client the store already has), read per
batch so rotated credentials are followed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import threading
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from inferq.shared.config.logging import redact_text
from inferq.shared.errors import StoreUnreachable

_SIGNED_HEADERS = "content-type;host;if-none-match;x-amz-content-sha256;x-amz-date"
_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class PutOutcome:
    """What the server said to one conditional PUT."""

    stored: bool  # False: the key already existed (412 or 409), the first result wins


@dataclass(frozen=True, slots=True)
class _Credentials:
    access_key: str
    secret_key: str
    token: str | None


class SignedPutter:
    """PUTs ``If-None-Match: *`` objects, one kept-alive connection per calling thread."""

    def __init__(self, client: Any, bucket: str, max_connections: int) -> None:
        self.bucket = bucket
        self.region = client.meta.region_name or "us-east-1"
        endpoint = urlsplit(client.meta.endpoint_url)
        self.scheme = endpoint.scheme
        aws = endpoint.hostname is not None and endpoint.hostname.endswith("amazonaws.com")
        # Custom endpoints (SeaweedFS, MinIO) take path-style addresses; AWS takes the bucket in the host.
        self.host = f"{bucket}.{endpoint.netloc}" if aws else endpoint.netloc
        self.path_prefix = "" if aws else f"/{quote(bucket, safe='-_.~')}"
        self._client = client
        # One kept-alive connection per writing thread (the store's pool has ``max_connections`` threads).
        self.max_connections = max_connections
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._opened_lock = threading.Lock()
        # A store dropped without close() still closes its sockets (the pool threads hold them too).
        weakref.finalize(self, _close_all, self._opened)
        self._keys: dict[tuple[str, str], bytes] = {}

    @staticmethod
    def usable(client: Any) -> bool:
        """True when the client has credentials this signer can use (otherwise boto3 writes)."""
        credentials = client._request_signer._credentials  # the client's own, resolved at creation
        return credentials is not None and client.meta.endpoint_url is not None

    def credentials(self) -> _Credentials:
        frozen = self._client._request_signer._credentials.get_frozen_credentials()
        return _Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def put(self, key: str, body: bytes, credentials: _Credentials) -> PutOutcome:
        """PUT ``body`` at ``key`` unless it exists; raises :class:`StoreUnreachable` on any other answer."""
        path = f"{self.path_prefix}/{quote(key, safe='/-_.~')}"
        headers = self._signed_headers(path, body, credentials)
        try:
            status, data = self._send(path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            raise StoreUnreachable(redact_text(f"put s3://{self.bucket}/{key}: {type(exc).__name__}: {exc}")) from None
        if status == 200:
            return PutOutcome(stored=True)
        if status in (409, 412):
            return PutOutcome(stored=False)
        detail = data[:300].decode(errors="replace").replace("\n", " ")
        raise StoreUnreachable(redact_text(f"put s3://{self.bucket}/{key}: HTTP {status} {detail}"))

    def _send(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """One PUT on this thread's kept-alive connection; a connection the server closed meanwhile is
        reopened once (the PUT is conditional, so sending it twice cannot store two results)."""
        for attempt in (1, 2):
            connection = self._connection()
            try:
                connection.request("PUT", path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self._forget(connection)
                if attempt == 2:
                    raise
            except BaseException:
                self._forget(connection)
                raise
        raise AssertionError("unreachable")

    def _forget(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None
        with self._opened_lock:
            self._opened.remove(connection)

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            factory = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            connection = factory(self.host, timeout=_TIMEOUT_S)
            self._local.connection = connection
            with self._opened_lock:
                self._opened.append(connection)
        return connection

    def _signed_headers(self, path: str, body: bytes, credentials: _Credentials) -> dict[str, str]:
        now = datetime.now(UTC)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        payload_hash = hashlib.sha256(body).hexdigest()
        headers = {
            "content-type": "application/json",
            "host": self.host,
            "if-none-match": "*",
            "x-amz-content-sha256": payload_hash,
            "x-amz-date": amz_date,
        }
        signed = _SIGNED_HEADERS
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
            signed += ";x-amz-security-token"
        canonical_headers = "".join(f"{name}:{headers[name]}\n" for name in signed.split(";"))
        canonical = f"PUT\n{path}\n\n{canonical_headers}\n{signed}\n{payload_hash}"
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(day, credentials.secret_key), to_sign.encode(), "sha256").hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        del headers["host"]  # http.client sends it from the connection's host
        return headers

    def _signing_key(self, day: str, secret: str) -> bytes:
        cached = self._keys.get((day, secret))
        if cached is None:
            key = hmac.new(f"AWS4{secret}".encode(), day.encode(), "sha256").digest()
            for part in (self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), "sha256").digest()
            self._keys = {(day, secret): key}  # one day's key at a time
            cached = key
        return cached

    def close(self) -> None:
        with self._opened_lock:
            _close_all(self._opened)


def _close_all(connections: list[http.client.HTTPConnection]) -> None:
    for connection in connections:
        connection.close()
    connections.clear()
