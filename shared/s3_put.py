"""Conditional S3 PUTs for result objects on a lean path: SigV4-signed by hand, sent on kept-alive
connections of one urllib3 pool.

boto3 spends about 5 ms of CPU per ``put_object`` (parameter validation, event hooks, the request
pipeline, its own signing); a result write needs none of that: one small body, one key, one header
(``If-None-Match: *``). Signing here costs a few HMACs, so more of a shared CPU goes to the writes
themselves. Credentials, region and endpoint still come from boto3's standard configuration (the
client the store already has), read per batch so rotated credentials are followed.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3

from shared.errors import StoreUnreachable
from shared.logging import redact_text

_SIGNED_HEADERS = "content-type;host;if-none-match;x-amz-content-sha256;x-amz-date"
_TIMEOUT = urllib3.Timeout(connect=3.0, read=30.0)


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
    """PUTs ``If-None-Match: *`` objects through a pool of ``max_connections`` kept-alive connections."""

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
        self._http = urllib3.PoolManager(num_pools=2, maxsize=max_connections, block=True, retries=False)
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
            response = self._http.request(
                "PUT", f"{self.scheme}://{self.host}{path}", body=body, headers=headers, timeout=_TIMEOUT
            )
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnreachable(redact_text(f"put s3://{self.bucket}/{key}: {type(exc).__name__}: {exc}")) from None
        if response.status == 200:
            return PutOutcome(stored=True)
        if response.status in (409, 412):
            return PutOutcome(stored=False)
        detail = response.data[:300].decode(errors="replace").replace("\n", " ")
        raise StoreUnreachable(redact_text(f"put s3://{self.bucket}/{key}: HTTP {response.status} {detail}"))

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
        del headers["host"]  # urllib3 sends it from the URL
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
        self._http.clear()
