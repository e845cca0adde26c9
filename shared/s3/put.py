"""Conditional S3 PUTs for result objects on a lean path: built and signed by botocore's own SigV4 signer,
sent with http.client on one kept-alive connection per writing thread.

boto3's ``put_object`` spends its CPU on parameter validation, event hooks, the request pipeline and
urllib3; a result write needs none of that: one small body, one key, one header (``If-None-Match: *``).
Here only the signing is botocore's (:class:`botocore.auth.S3SigV4Auth`); the rest is one http.client
request on a connection kept alive per thread. A PUT costs about 0.5 ms of client CPU instead of 1.5 ms
(measured against a local SeaweedFS), so more of a shared CPU goes to the server doing the writes.

The lean path is taken only where it does exactly what boto3 would, and :func:`lean_putter` says why not
otherwise (boto3's ``put_object`` then writes, honouring everything):

- credentials, CA bundle and proxies come from the botocore session that made the client, read the way
  botocore reads them; frozen credentials are taken per batch, so refreshed ones (a role) are followed;
- the bucket is addressed as boto3 would (path-style or virtual-hosted, from ``addressing_style``);
- a proxy for the endpoint (``HTTPS_PROXY``/``HTTP_PROXY`` unless ``NO_PROXY``, or the client's
  ``proxies``), a client certificate, SigV2 or unsigned clients, CRC checksums, accelerate or FIPS
  endpoints, directory buckets: boto3 writes;
- a redirect (S3 says the bucket lives in another region) stores nothing; boto3, which follows S3's region
  redirects, writes that result and every later one of the store.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import ssl
import threading
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.httpsession import get_cert_path
from botocore.session import Session
from botocore.utils import get_environ_proxies

from inferq.shared.config.logging import get_logger, redact_text, register_secret
from inferq.shared.errors import StoreUnreachable
from inferq.shared.s3.client import TRANSIENT_CODES, refusal, translate

log = get_logger(__name__)

# What S3 answers when the bucket is in another region than the request was signed for.
_REDIRECTS = frozenset({301, 302, 307, 308})
_WRONG_REGION_CODES = frozenset({"AuthorizationHeaderMalformed", "PermanentRedirect", "TemporaryRedirect"})
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]{1,300})</Message>")
# S3 buckets whose requests boto3 sends elsewhere than the endpoint (directory, Outposts, Object Lambda).
_SPECIAL_BUCKET_SUFFIXES = ("--x-s3", "--xa-s3", "--op-s3", "--ol-s3")
_PLAIN_BUCKET = re.compile(r"[A-Za-z0-9._-]{3,63}")
_DNS_BUCKET = re.compile(r"[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])")  # a host label: virtual-hosted addressable
_AWS_S3_HOST = re.compile(r"s3(?:\.[a-z0-9-]+)?\.amazonaws\.com(?:\.cn)?")  # global or regional
_DEFAULT_PORTS = {"http": 80, "https": 443}


class PutOutcome(Enum):
    """What the server said to one conditional PUT."""

    STORED = "stored"
    EXISTS = "exists"  # 412 or 409: the key already existed, the first result wins
    ELSEWHERE = "elsewhere"  # a redirect or a wrong-region answer: nothing stored, boto3 must write it


@dataclass(frozen=True, slots=True)
class Target:
    """Where boto3 sends a bucket's requests: scheme, host and port, and the path before the key."""

    scheme: str
    host: str  # lowercase, without the default port: the Host header SigV4 signs
    bucket_path: str  # "/base/bucket" path-style, "/base" (usually "") virtual-hosted

    def url(self, key: str) -> str:
        """The URL of ``key``, encoded as botocore encodes it."""
        return f"{self.scheme}://{self.host}{self.bucket_path}/{quote(key, safe='/~')}"


def address(endpoint_url: str, bucket: str, addressing_style: str | None) -> Target | str:
    """``bucket`` at ``endpoint_url`` as botocore's S3 endpoint rules address it, or why that cannot be
    told for sure (then boto3 writes).

    Custom endpoints (SeaweedFS, MinIO) take path-style requests unless ``addressing_style`` is
    ``virtual``; AWS endpoints take the bucket in the host unless it is ``path``. Either way, a bucket that
    is no DNS label (dots, capitals, underscores) or an endpoint that is an IP address goes path-style."""
    url = urlsplit(endpoint_url)
    if url.scheme not in _DEFAULT_PORTS or not url.hostname or url.query or url.username:
        return f"endpoint {endpoint_url!r} is not a plain http(s) URL"
    if not _PLAIN_BUCKET.fullmatch(bucket) or bucket.endswith(_SPECIAL_BUCKET_SUFFIXES):
        return f"bucket {bucket!r} is addressed by rules of its own"
    aws = url.hostname.endswith((".amazonaws.com", ".amazonaws.com.cn"))
    if aws and not _AWS_S3_HOST.fullmatch(url.hostname):
        return f"AWS endpoint {url.hostname!r} is not a plain regional S3 endpoint"
    host = _host_header(url.scheme, url.hostname, url.port)
    base = url.path.rstrip("/")
    virtual = addressing_style != "path" if aws else addressing_style == "virtual"
    if not virtual:
        return Target(url.scheme, host, f"{base}/{bucket}")
    if _DNS_BUCKET.fullmatch(bucket) and not _is_ip(url.hostname):
        return Target(url.scheme, f"{bucket}.{host}", base)
    if url.scheme == "http" and "." in bucket:  # botocore may put a dotted bucket in the host over plain http
        return f"bucket {bucket!r} with dots, virtual-hosted over http"
    return Target(url.scheme, host, f"{base}/{bucket}")


def _host_header(scheme: str, hostname: str, port: int | None) -> str:
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"


def _is_ip(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def lean_putter(session: Session, client: Any, bucket: str) -> SignedPutter | None:
    """A :class:`SignedPutter` for ``bucket`` if it can write exactly as ``client.put_object`` would, else
    ``None`` (the reason is logged). ``client`` must have been made by ``session`` from the standard
    configuration (no explicit keys or ``verify``): its credentials and CA bundle are the session's."""
    credentials = session.get_credentials()
    target = address(client.meta.endpoint_url, bucket, (client.meta.config.s3 or {}).get("addressing_style"))
    if isinstance(target, str):
        reason: str | None = target
    elif credentials is None:
        reason = "no credentials"
    else:
        reason = _unsupported_setting(client) or _proxied(client, target.scheme)
        if reason is None:
            context = _ssl_context(session) if target.scheme == "https" else None
            return SignedPutter(bucket, target, client.meta.region_name, credentials, client.meta.config, context)
    log.info("s3_lean_put_off", bucket=bucket, reason=redact_text(reason or ""))
    return None


def _unsupported_setting(client: Any) -> str | None:
    """The first client setting under which boto3 would send something else than this module does."""
    config = client.meta.config
    s3 = config.s3 or {}
    checks = {
        "signature_version is not SigV4": config.signature_version not in (None, "s3v4", "v4"),
        "request_checksum_calculation adds CRC checksums": config.request_checksum_calculation != "when_required",
        "a client certificate is configured": config.client_cert is not None,
        "an accelerate, dual-stack or FIPS endpoint is configured": any(
            (
                s3.get("use_accelerate_endpoint"),
                s3.get("use_dualstack_endpoint"),
                config.use_dualstack_endpoint,
                config.use_fips_endpoint,
            )
        ),
        "no region": not client.meta.region_name,
    }
    return next((reason for reason, applies in checks.items() if applies), None)


def _proxied(client: Any, scheme: str) -> str | None:
    """Why a proxy applies to the endpoint, as botocore decides it: the client's ``proxies`` if set, else
    the environment's (``HTTPS_PROXY``/``HTTP_PROXY``, minus ``NO_PROXY``)."""
    proxies = client.meta.config.proxies
    if proxies is None:
        proxies = get_environ_proxies(client.meta.endpoint_url)
    return f"a proxy is configured for {scheme}" if proxies.get(scheme) else None


def _ssl_context(session: Session) -> ssl.SSLContext:
    """Verification as botocore's: the ``ca_bundle`` setting (``AWS_CA_BUNDLE`` or the profile's), else
    ``REQUESTS_CA_BUNDLE``, else botocore's default bundle (certifi's)."""
    ca_bundle = session.get_config_variable("ca_bundle")
    verify = ca_bundle if ca_bundle is not None else os.environ.get("REQUESTS_CA_BUNDLE")
    path = get_cert_path(verify or True)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


class SignedPutter:
    """PUTs ``If-None-Match: *`` objects signed by botocore, one kept-alive connection per calling thread."""

    def __init__(
        self,
        bucket: str,
        target: Target,
        region: str,
        credentials: Any,
        config: Any,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.bucket = bucket
        self.target = target
        self.region = region
        self.ssl_context = ssl_context
        self._credentials = credentials  # botocore's, refreshable: frozen once per batch by signer()
        self._config = config
        self._connect_timeout_s = float(config.connect_timeout)
        self._read_timeout_s = float(config.read_timeout)
        self.redirected = False  # S3 said the bucket is elsewhere: boto3 writes from then on
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._opened_lock = threading.Lock()
        # A store dropped without close() still closes its sockets (the pool threads hold them too).
        weakref.finalize(self, _close_all, self._opened)

    def signer(self) -> S3SigV4Auth:
        """botocore's signer with the credentials as they are now (refreshed if they were about to expire)."""
        try:
            frozen = self._credentials.get_frozen_credentials()
        except Exception as exc:  # a failed refresh (STS down, an expired SSO session)
            raise translate(exc, f"credentials for s3://{self.bucket}", always_transient=True) from None
        register_secret(frozen.secret_key)  # masked in every log event from now on
        register_secret(frozen.token)
        return S3SigV4Auth(frozen, "s3", self.region)

    def request(self, key: str, body: bytes, signer: S3SigV4Auth) -> AWSRequest:
        """The signed PUT of ``body`` at ``key`` (no I/O)."""
        request = AWSRequest(
            method="PUT",
            url=self.target.url(key),
            data=body,
            headers={"Host": self.target.host, "Content-Type": "application/json", "If-None-Match": "*"},
        )
        request.context["client_config"] = self._config  # S3's payload_signing_enabled, as boto3 reads it
        signer.add_auth(request)
        return request

    def put(self, key: str, body: bytes, signer: S3SigV4Auth) -> PutOutcome:
        """PUT ``body`` at ``key`` unless it exists. Raises :class:`StoreUnreachable` when the server or the
        network failed (worth retrying), :class:`StoreRefused` when S3 refuses the store (a wrong key, a
        missing bucket), :class:`ValueRefused` when it refuses this object (too large) and
        :class:`StoreError` for any other refusal; none is retried here."""
        request = self.request(key, body, signer)
        where = f"put s3://{self.bucket}/{key}"
        try:
            status, data = self._send(urlsplit(request.url).path, body, dict(request.headers.items()))
        except (OSError, http.client.HTTPException) as exc:
            raise StoreUnreachable(redact_text(f"{where}: {type(exc).__name__}: {exc}")) from None
        if status == 200:
            return PutOutcome.STORED
        if status in (409, 412):
            return PutOutcome.EXISTS
        code, message = _error(status, data)
        if status in _REDIRECTS or code in _WRONG_REGION_CODES:
            if not self.redirected:
                log.warning(
                    "s3_lean_put_redirected", bucket=self.bucket, status=status, code=code, message=redact_text(message)
                )
            self.redirected = True
            return PutOutcome.ELSEWHERE
        text = redact_text(f"{where}: HTTP {status} {code} {message}".strip())
        if status >= 500 or status in (408, 429) or code in TRANSIENT_CODES:
            raise StoreUnreachable(text)
        raise refusal(code, text)

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
            # "host[:port]", IPv6 in brackets: http.client splits it as the URL does.
            if self.ssl_context is not None:
                connection = http.client.HTTPSConnection(
                    self.target.host, timeout=self._connect_timeout_s, context=self.ssl_context
                )
            else:
                connection = http.client.HTTPConnection(self.target.host, timeout=self._connect_timeout_s)
            self._local.connection = connection
            with self._opened_lock:
                self._opened.append(connection)
        if connection.sock is None:  # new, or closed by a "Connection: close" answer
            connection.connect()
            assert connection.sock is not None
            connection.sock.settimeout(self._read_timeout_s)  # connect_timeout to connect, read_timeout after
        return connection

    def close(self) -> None:
        with self._opened_lock:
            _close_all(self._opened)


def _error(status: int, data: bytes) -> tuple[str, str]:
    """The S3 error code and message of an error answer. Only these two: S3's body for a refused signature
    also holds the canonical request, which carries the session token."""
    code, message = _ERROR_CODE.search(data), _ERROR_MESSAGE.search(data)
    return (
        code[1].decode(errors="replace") if code else str(status),
        message[1].decode(errors="replace") if message else "",
    )


def _close_all(connections: list[http.client.HTTPConnection]) -> None:
    for connection in connections:
        connection.close()
    connections.clear()
