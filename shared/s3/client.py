"""S3 plumbing shared by the model store and the result store: locations, the client, error translation.

The client takes the standard AWS configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_PROFILE``, ``~/.aws/config``); inferq adds no variables
of its own. Every failure leaves here as one of two types: :class:`StoreUnreachable` (an ``OSError``;
worth retrying), :class:`StoreRefused` (the store refuses us for good: a wrong key, no permission, a
missing bucket or one in another region), :class:`ValueRefused` (this one object cannot be stored: too
large) or :class:`StoreError` (any other request S3 calls wrong).
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.session import Session as BotocoreSession

from inferq.shared.config.logging import redact_text
from inferq.shared.errors import StoreError, StoreRefused, StoreUnreachable, ValueRefused

NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
# Codes S3 and compatible servers answer when the request was fine but the server was not.
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ExpiredToken",  # a role's session token: refreshed credentials sign the next try
        "TooManyRequests",
        "503",
        "500",
        "502",
        "504",
        "429",
    }
)
# Codes that refuse the store as a whole: no retry helps until an operator fixes the key, the policy or
# the bucket. (A 403 without a body, as HEAD answers, shows as "403".)
REFUSED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "NoSuchBucket",
        "InvalidBucketName",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "403",
        "301",
    }
)
# Codes that refuse one object's content: the others of a batch may still be stored.
VALUE_REFUSED_CODES = frozenset({"EntityTooLarge", "KeyTooLongError"})

# Retrying cannot fix these: the configuration is wrong.
_CONFIGURATION_ERRORS = (NoCredentialsError, PartialCredentialsError, NoRegionError, ParamValidationError)


def make_client(*, max_pool_connections: int = 10, session: BotocoreSession | None = None) -> Any:
    """A thread-safe boto3 S3 client from the standard AWS configuration, made by ``session`` (a new one
    by default; the lean PUT path reads its credentials and CA bundle from the same session).

    NOTE: boto3 ≥ 1.36 adds CRC checksums to every upload and validates them on download by default;
    several S3-compatible servers (SeaweedFS, older MinIO) store or return such bodies wrongly.
    ``when_required`` restores the classic behaviour, so bytes round-trip exactly everywhere.
    """
    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Fail fast and let the caller's own backoff decide: a worker retries result writes with
        # backoff, and model-store lookups on the I/O thread must not block it for long.
        connect_timeout=3,
        read_timeout=30,
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=max_pool_connections,
    )
    return boto3.session.Session(botocore_session=session).client("s3", config=config)


def error_code(exc: ClientError) -> str:
    """The S3 error code of ``exc`` (``NoSuchKey``, ``PreconditionFailed``, ``404``, ...)."""
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def is_not_found(exc: BaseException) -> bool:
    """True when ``exc`` says the object (or key) does not exist."""
    return isinstance(exc, ClientError) and error_code(exc) in NOT_FOUND_CODES


def is_precondition_failed(exc: BaseException) -> bool:
    """True when a conditional write lost: the object already exists (or changed)."""
    return isinstance(exc, ClientError) and error_code(exc) in PRECONDITION_CODES


def put_if(
    client: Any,
    bucket: str,
    key: str,
    body: bytes,
    *,
    if_none_match: bool = False,
    if_match: str | None = None,
    content_type: str = "application/json",
) -> bool:
    """Write one object: with ``if_none_match`` only if no object has ``key``, with ``if_match`` only if the
    object still has that ETag, else unconditionally. False when the condition did not hold (412, or 409
    while another conditional write of the key is under way); any other failure raises as :func:`translate`."""
    condition = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, **condition)
    except Exception as exc:  # boto3 raises ClientError, BotoCoreError and urllib3 errors
        if condition and is_precondition_failed(exc):
            return False
        raise translate(exc, f"put s3://{bucket}/{key}") from None
    return True


def translate(exc: BaseException, what: str, *, always_transient: bool = False) -> Exception:
    """``exc`` from boto3 as :class:`StoreUnreachable` (retry), :class:`StoreRefused` (the store refuses
    us), :class:`ValueRefused` (this object's content) or :class:`StoreError` (give up); with
    ``always_transient`` every answer of the server is :class:`StoreUnreachable`.

    ``what`` says what was attempted, e.g. ``"put s3://b/r/x.json"``. The message carries the S3 error
    code and message, never credentials, and passes through the log redaction once more besides."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message") or ""
        text = redact_text(f"{what}: {code} {message}".strip())
        if always_transient or code in TRANSIENT_CODES:
            return StoreUnreachable(text)
        return refusal(code, text)
    if isinstance(exc, _CONFIGURATION_ERRORS):
        return StoreRefused(redact_text(f"{what}: {exc} (check the AWS_* configuration)"))
    if isinstance(exc, BotoCoreError):
        return StoreUnreachable(redact_text(f"{what}: {type(exc).__name__}: {exc}"))
    if isinstance(exc, OSError):
        return StoreUnreachable(redact_text(f"{what}: {exc}"))
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def refusal(code: str, text: str) -> StoreError:
    """The error for an S3 answer ``code`` that no retry of the same request fixes."""
    if code in REFUSED_CODES:
        return StoreRefused(text)
    if code in VALUE_REFUSED_CODES:
        return ValueRefused(text)
    return StoreError(text)
