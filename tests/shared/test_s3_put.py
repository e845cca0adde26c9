"""The lean S3 PUT: signed by botocore, addressed and verified as boto3 would, or stepping aside for boto3.

Writes go to a SeaweedFS of this module's own that checks every signature (the suite's shared one takes any
key). Addressing, proxy and CA decisions are also tested without I/O, against the request boto3 itself
builds."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.session
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import CredentialProvider, RefreshableCredentials
from seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS

from inferq.shared.config.logging import redact_text
from inferq.shared.contract.messages import Result, Status
from inferq.shared.errors import StoreError, StoreRefused, StoreUnreachable
from inferq.shared.results.s3 import S3ResultStore
from inferq.shared.s3.client import make_client
from inferq.shared.s3.location import S3Location
from inferq.shared.s3.put import PutOutcome, SignedPutter, address, lean_putter

BUCKET = "inferq-put"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def no_proxy_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="module")
def checking_s3() -> Iterator[SeaweedFS]:
    """A SeaweedFS with one identity (the suite's test key), so that every signature is checked.

    NOTE: ``weed s3`` takes ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from its environment as its only
    identity when it has no other configuration; without one it accepts any key and any signature."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        server = SeaweedFS().start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(checking_s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """The checking server, with the standard AWS variables of this test pointing at it."""
    for name, value in checking_s3.environ.items():
        monkeypatch.setenv(name, value)
    return checking_s3


def result(job_id: str, worker: str = "w:1") -> Result:
    error = {"code": "inference_error", "message": "x"}
    return Result(id=job_id, model="iris", requested_version=1, status=Status.FAILED, error=error, worker=worker)


def putter_from_environment() -> SignedPutter | None:
    session = botocore.session.get_session()
    return lean_putter(session, make_client(session=session), BUCKET)


def read(server: SeaweedFS, key: str) -> bytes:
    body: bytes = server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return body


# -- writes to a server that checks signatures -----------------------------------------------------------------


@pytest.mark.s3
def test_a_lean_put_is_readable_by_boto3_and_the_first_put_of_a_key_wins(s3: SeaweedFS) -> None:
    putter = putter_from_environment()
    assert putter is not None
    key = f"results/{uuid.uuid4().hex}.json"

    assert putter.put(key, b'{"first": true}', putter.signer()) is PutOutcome.STORED
    assert putter.put(key, b'{"second": true}', putter.signer()) is PutOutcome.EXISTS

    assert read(s3, key) == b'{"first": true}'
    putter.close()


@pytest.mark.s3
def test_the_store_writes_through_the_lean_path_and_keeps_the_first_result_of_an_id(s3: SeaweedFS) -> None:
    store = S3ResultStore(S3Location(BUCKET, f"{uuid.uuid4().hex[:8]}/"), concurrency=4)
    assert store._putter is not None
    batch = [result(f"job-{i}") for i in range(20)]

    assert store.put_many(batch) == batch
    assert store.put_many([result("job-3", worker="w:2"), result("new")]) == [batch[3], result("new")]

    assert read(s3, store._key("job-3")) == batch[3].to_json()
    store.close()


@pytest.mark.s3
def test_a_wrong_secret_is_refused_at_once_with_a_clear_error_that_shows_no_secret(
    s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given credentials whose secret the server does not know
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-4711")
    putter = putter_from_environment()
    store = S3ResultStore(S3Location(BUCKET, "refused/"))
    assert putter is not None and store._putter is not None

    # When a result is written, then S3's refusal comes back after one request, naming the reason only
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        putter.put("refused/x.json", b"{}", putter.signer())
    with pytest.raises(StoreRefused) as failed_batch:  # no retry helps: the worker stops (exit 2)
        store.put_many([result("a"), result("b")])
    assert time.monotonic() - started < 5
    for error in (refused.value, failed_batch.value):
        assert "SignatureDoesNotMatch" in str(error)
        assert "not-the-secret-4711" not in str(error) and "Signature=" not in str(error)
    store.close()


@pytest.mark.s3
def test_an_unknown_access_key_is_refused_with_its_code(s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    putter = putter_from_environment()
    assert putter is not None
    with pytest.raises(StoreError, match="InvalidAccessKeyId"):
        putter.put("refused/y.json", b"{}", putter.signer())


class Rotating(CredentialProvider):
    """Refreshable credentials (as from a role) that expire at once: each freeze refreshes them, first
    to a wrong secret, then to the right one."""

    METHOD = "inferq-test-rotating"

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def load(self) -> RefreshableCredentials:
        return RefreshableCredentials.create_from_metadata(self._next(), self._next, self.METHOD)

    def _next(self) -> dict[str, str]:
        expiry = datetime.now(UTC) + timedelta(minutes=5)  # inside botocore's mandatory refresh window
        secret = self.secrets.pop(0) if self.secrets else SECRET_KEY
        return {"access_key": ACCESS_KEY, "secret_key": secret, "token": "", "expiry_time": expiry.isoformat()}


@pytest.mark.s3
def test_refreshed_credentials_sign_the_next_batch(s3: SeaweedFS) -> None:
    session = botocore.session.get_session()
    session.get_component("credential_provider").insert_before("env", Rotating(["stale", "stale", SECRET_KEY]))
    putter = lean_putter(session, make_client(session=session), BUCKET)
    assert putter is not None

    with pytest.raises(StoreError, match="SignatureDoesNotMatch"):
        putter.put("rotated/a.json", b"{}", putter.signer())
    assert putter.put("rotated/a.json", b"{}", putter.signer()) is PutOutcome.STORED


def test_secrets_of_refreshed_credentials_are_masked_in_logs() -> None:
    session = botocore.session.get_session()
    session.get_component("credential_provider").insert_before("env", Rotating(["from-a-role-1234"] * 2))
    putter = lean_putter(session, make_client(session=session), BUCKET)
    assert putter is not None
    putter.signer()
    assert "from-a-role-1234" not in redact_text("secret from-a-role-1234 here")


# -- addressing: as boto3's own put_object, without I/O ---------------------------------------------------------


class Sent(Exception):
    """Raised instead of sending, carrying the request boto3 built."""

    def __init__(self, request: AWSRequest) -> None:
        super().__init__("not sent")
        self.request = request


def client_for(endpoint_url: str | None, style: str | None, region: str = "us-east-1", **config: Any) -> Any:
    session = botocore.session.get_session()
    session.set_credentials("AKIDEXAMPLE", "example-secret")
    s3_config = {"addressing_style": style} if style else None
    settings = Config(s3=s3_config, request_checksum_calculation="when_required", retries={"max_attempts": 1})
    client = boto3.session.Session(botocore_session=session).client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=settings.merge(Config(**config))
    )
    return session, client


def sent_by_boto3(client: Any, bucket: str, key: str) -> AWSRequest:
    def stop(request: AWSRequest, **_kw: Any) -> None:
        raise Sent(request)

    client.meta.events.register("before-send.s3.PutObject", stop)
    try:
        with pytest.raises(Sent) as sent:
            client.put_object(Bucket=bucket, Key=key, Body=b"{}", ContentType="application/json", IfNoneMatch="*")
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", stop)
    return sent.value.request


def header(request: AWSRequest, name: str) -> str:
    value = request.headers[name]  # boto3's prepared requests hold some values as bytes
    return value.decode() if isinstance(value, bytes) else str(value)


def signed_headers(request: AWSRequest) -> tuple[str, str]:
    """The credential scope (minus the day) and the signed header names of a signed request."""
    text = header(request, "Authorization")
    credential = text.split("Credential=")[1].split(",")[0].split("/")
    return "/".join(credential[2:]), text.split("SignedHeaders=")[1].split(",")[0]


ENDPOINTS = [
    ("http://127.0.0.1:8333", "us-east-1"),
    ("http://127.0.0.1:8333", "eu-west-1"),
    ("http://s3.local:8333", "us-east-1"),
    ("https://minio.example.com", "us-east-1"),
    ("https://minio.example.com:9000/base", "us-east-1"),
    ("http://[::1]:8333", "us-east-1"),
    (None, "us-east-1"),  # AWS
    (None, "eu-west-1"),
]


@pytest.mark.parametrize(("endpoint_url", "region"), ENDPOINTS)
@pytest.mark.parametrize("style", [None, "auto", "path", "virtual"])
def test_the_lean_put_addresses_and_signs_like_boto3(
    endpoint_url: str | None, region: str, style: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    session, client = client_for(endpoint_url, style, region)
    key = "results/a b+c.json"
    for bucket in ("inferq-results", "dotted.bucket", "Upper_Case"):
        putter = lean_putter(session, client, bucket)
        boto3_request = sent_by_boto3(client, bucket, key)
        if putter is None:  # the lean path steps aside rather than guess (a dotted bucket, virtual, over http)
            assert endpoint_url is not None and endpoint_url.startswith("http:") and style == "virtual"
            assert "." in bucket
            continue
        lean_request = putter.request(key, b"{}", putter.signer())
        assert lean_request.url == boto3_request.url
        assert lean_request.headers["Host"] == urlsplit(boto3_request.url).netloc.removesuffix(":443")
        assert signed_headers(lean_request) == signed_headers(boto3_request)
        assert header(lean_request, "X-Amz-Content-SHA256") == header(boto3_request, "X-Amz-Content-SHA256")


@pytest.mark.parametrize(
    ("style", "url"),
    [
        (None, "http://s3.local:8333/inferq-results/k.json"),
        ("auto", "http://s3.local:8333/inferq-results/k.json"),
        ("path", "http://s3.local:8333/inferq-results/k.json"),
        ("virtual", "http://inferq-results.s3.local:8333/k.json"),
    ],
)
def test_a_custom_endpoint_is_addressed_path_style_unless_virtual_is_asked_for(style: str | None, url: str) -> None:
    target = address("http://s3.local:8333", "inferq-results", style)
    assert not isinstance(target, str) and target.url("k.json") == url


def test_an_ip_endpoint_and_an_aws_endpoint_are_addressed_as_boto3_does() -> None:
    on_ip = address("http://127.0.0.1:8333", "inferq-results", "virtual")
    on_aws = address("https://s3.eu-west-1.amazonaws.com", "inferq-results", None)
    on_aws_path = address("https://s3.eu-west-1.amazonaws.com", "inferq-results", "path")
    assert not isinstance(on_ip, str) and on_ip.url("k") == "http://127.0.0.1:8333/inferq-results/k"
    assert not isinstance(on_aws, str) and on_aws.url("k") == "https://inferq-results.s3.eu-west-1.amazonaws.com/k"
    assert not isinstance(on_aws_path, str) and on_aws_path.host == "s3.eu-west-1.amazonaws.com"


@pytest.mark.parametrize(
    ("settings", "bucket"),
    [
        ({"signature_version": "s3"}, "inferq-results"),
        ({"request_checksum_calculation": "when_supported"}, "inferq-results"),
        ({"s3": {"use_accelerate_endpoint": True}}, "inferq-results"),
        ({"use_dualstack_endpoint": True}, "inferq-results"),
        ({"use_fips_endpoint": True}, "inferq-results"),
        ({"client_cert": "/no/such/cert.pem"}, "inferq-results"),
        ({}, "my-bucket--use1-az4--x-s3"),
    ],
)
def test_settings_the_lean_put_cannot_honour_leave_the_write_to_boto3(settings: dict[str, Any], bucket: str) -> None:
    session, client = client_for(None, None, **settings)
    assert lean_putter(session, client, bucket) is None


# -- proxies -------------------------------------------------------------------------------------------------


def test_a_proxy_in_the_environment_makes_the_lean_path_step_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    session, client = client_for("http://127.0.0.1:8333", None)
    assert lean_putter(session, client, BUCKET) is not None
    monkeypatch.setenv("HTTP_PROXY", "http://user:pw@proxy.invalid:3128")
    assert lean_putter(session, client, BUCKET) is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert lean_putter(session, client, BUCKET) is not None  # bypassed as botocore bypasses it


def test_only_a_proxy_for_the_endpoints_scheme_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert lean_putter(*client_for("http://127.0.0.1:8333", None), BUCKET) is not None
    assert lean_putter(*client_for("https://minio.example.com", None), BUCKET) is None


def test_the_clients_own_proxies_setting_counts() -> None:
    session, client = client_for("http://127.0.0.1:8333", None, proxies={"http": "http://proxy.invalid:3128"})
    assert lean_putter(session, client, BUCKET) is None


@pytest.mark.s3
def test_with_a_proxy_every_write_goes_through_it(s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    with HttpRelay(s3.endpoint) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        store = S3ResultStore(S3Location(BUCKET, f"{uuid.uuid4().hex[:8]}/"))
        assert store._putter is None
        batch = [result(f"job-{i}") for i in range(5)]
        assert store.put_many(batch) == batch
        assert store.get("job-0") == batch[0]
        store.close()
    puts = [seen for seen in proxy.seen if seen.method == "PUT"]
    assert len(puts) == 5 and all(seen.target.startswith(s3.endpoint) for seen in puts)  # absolute-form: a proxy


# -- redirects and other answers ---------------------------------------------------------------------------------


@pytest.mark.s3
def test_a_redirect_hands_the_write_and_every_later_one_to_boto3(
    s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an endpoint that redirects the lean PUTs (boto3's say who they are) and serves the rest
    def redirect_lean_puts(seen: Seen) -> tuple[int, bytes] | None:
        if seen.method == "PUT" and "Boto3" not in seen.user_agent:
            return 301, b"<Error><Code>PermanentRedirect</Code><Message>Use the other endpoint</Message></Error>"
        return None

    with HttpRelay(s3.endpoint, redirect_lean_puts) as front:
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.url)
        store = S3ResultStore(S3Location(BUCKET, f"{uuid.uuid4().hex[:8]}/"), concurrency=1)
        first, later = [result("a"), result("b")], [result("c"), result("d")]
        # When two batches are written, then both are stored, and the lean path was tried once only
        assert store.put_many(first) == first
        assert store.put_many(later) == later
        store.close()
    lean_puts = [seen for seen in front.seen if seen.method == "PUT" and "Boto3" not in seen.user_agent]
    assert len(lean_puts) == 1
    assert [read(s3, store._key(i)) for i in "abcd"] == [r.to_json() for r in first + later]


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (412, "PreconditionFailed", PutOutcome.EXISTS),
        (409, "ConditionalRequestConflict", PutOutcome.EXISTS),
        (307, "TemporaryRedirect", PutOutcome.ELSEWHERE),
        (400, "AuthorizationHeaderMalformed", PutOutcome.ELSEWHERE),  # signed for the wrong region
        (503, "SlowDown", StoreUnreachable),
        (403, "RequestTimeTooSkewed", StoreUnreachable),
        (404, "NoSuchBucket", StoreRefused),
        (403, "AccessDenied", StoreRefused),
    ],
)
def test_each_answer_is_classified_once(status: int, code: str, outcome: Any) -> None:
    answer = f"<Error><Code>{code}</Code><Message>as S3 says it</Message></Error>".encode()
    with HttpRelay("http://127.0.0.1:9", lambda _seen: (status, answer)) as fake:
        putter = lean_putter(*client_for(fake.url, None), BUCKET)
        assert putter is not None
        if isinstance(outcome, PutOutcome):
            assert putter.put("k.json", b"{}", putter.signer()) is outcome
        else:
            with pytest.raises(outcome, match=f"HTTP {status} {code} as S3 says it"):
                putter.put("k.json", b"{}", putter.signer())
        putter.close()


def test_a_refused_signature_never_echoes_the_canonical_request_s3_sends_back() -> None:
    # S3's SignatureDoesNotMatch body holds the canonical request, and with it the session token
    answer = (
        b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match"
        b"</Message><CanonicalRequest>x-amz-security-token:session-token-9876</CanonicalRequest></Error>"
    )
    with HttpRelay("http://127.0.0.1:9", lambda _seen: (403, answer)) as fake:
        putter = lean_putter(*client_for(fake.url, None), BUCKET)
        assert putter is not None
        with pytest.raises(StoreError) as refused:
            putter.put("k.json", b"{}", putter.signer())
        putter.close()
    assert "SignatureDoesNotMatch" in str(refused.value) and "session-token-9876" not in str(refused.value)


# -- CA bundles ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=inferq-test-ca"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def subjects(context: ssl.SSLContext | None) -> list[str]:
    assert context is not None
    return [value for cert in context.get_ca_certs() for rdn in cert["subject"] for name, value in rdn]


def test_the_aws_ca_bundle_setting_is_the_one_the_lean_path_trusts(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(certificate[0]))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    putter = lean_putter(*client_for("https://minio.example.com", None), BUCKET)
    assert putter is not None and subjects(putter.ssl_context) == ["inferq-test-ca"]


def test_without_aws_ca_bundle_requests_ca_bundle_and_then_botocores_default_apply(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    by_requests = lean_putter(*client_for("https://minio.example.com", None), BUCKET)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    by_default = lean_putter(*client_for("https://minio.example.com", None), BUCKET)
    assert by_requests is not None and subjects(by_requests.ssl_context) == ["inferq-test-ca"]
    assert by_default is not None and len(subjects(by_default.ssl_context)) > 50  # certifi's public roots


@pytest.mark.s3
def test_over_https_the_lean_path_verifies_the_server_against_the_bundle(
    s3: SeaweedFS, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with TlsFront(s3.s3_port, *certificate) as front:
        monkeypatch.setenv("AWS_ENDPOINT_URL", front.url)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(certificate[0]))
        trusting = S3ResultStore(S3Location(BUCKET, "tls/"))
        monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")  # our certificate is not in it
        distrusting = S3ResultStore(S3Location(BUCKET, "tls-refused/"))
        assert trusting._putter is not None and distrusting._putter is not None

        assert trusting.put_many([result("over-tls")]) == [result("over-tls")]
        with pytest.raises(StoreUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            distrusting.put_many([result("never")])
        trusting.close()
        distrusting.close()
    assert read(s3, "tls/over-tls.json") == result("over-tls").to_json()


# -- helpers: a tiny HTTP relay (forward proxy, front or fake server) and a TLS front ---------------------------


class Seen:
    """One request an :class:`HttpRelay` received."""

    def __init__(self, method: str, target: str, user_agent: str) -> None:
        self.method, self.target, self.user_agent = method, target, user_agent


class HttpRelay:
    """Forwards each request to the absolute URL it names (a forward proxy) or to ``upstream`` (a front),
    unless ``answer`` gives a canned ``(status, body)`` for it; records every request it saw."""

    def __init__(self, upstream: str, answer: Callable[[Seen], tuple[int, bytes] | None] = lambda _seen: None) -> None:
        self.upstream = upstream
        self.answer = answer
        self.seen: list[Seen] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _relay_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HttpRelay:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def forward(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        url = urlsplit(target if target.startswith("http") else self.upstream + target)
        path = url.path + (f"?{url.query}" if url.query else "")
        upstream = http.client.HTTPConnection(url.netloc, timeout=30)
        skip = {"connection", "proxy-connection", "keep-alive", "expect", "transfer-encoding", "content-length"}
        try:
            kept = {name: value for name, value in headers.items() if name.lower() not in skip}
            upstream.request(method, path, body=body if body or method == "PUT" else None, headers=kept)
            response = upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            upstream.close()


def _relay_handler(relay: HttpRelay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            pass

        def handle_one(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen = Seen(self.command, self.path, self.headers.get("User-Agent", ""))
            relay.seen.append(seen)
            canned = relay.answer(seen)
            if canned is None:
                status, headers, data = relay.forward(self.command, self.path, self.headers, body)
            else:
                status, headers, data = canned[0], [("Content-Type", "application/xml")], canned[1]
            self.send_response(status)
            hop = {"connection", "keep-alive", "transfer-encoding", "content-length"}
            for name, value in headers:
                if name.lower() not in hop:
                    self.send_header(name, value)
            upstream_length = dict((n.lower(), v) for n, v in headers).get("content-length", str(len(data)))
            self.send_header("Content-Length", upstream_length if self.command == "HEAD" else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = handle_one

    return Handler


class TlsFront:
    """``https://localhost:port`` with ``cert``, passing the bytes to a plain-HTTP server on ``port``."""

    def __init__(self, port: int, cert: Path, key: Path) -> None:
        self.upstream_port = port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://localhost:{self._server.getsockname()[1]}"
        self._open: list[socket.socket] = []

    def __enter__(self) -> TlsFront:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.close()
        for sock in self._open:  # clients may keep idle connections: ours end here
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                self._open.append(client)
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # the client did not trust us: what the test wants to see
            return
        self._open.append(tls)
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._open.append(upstream)
        threading.Thread(target=_pump, args=(upstream, tls), daemon=True).start()
        _pump(tls, upstream)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
