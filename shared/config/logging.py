"""structlog set-up shared by every process: JSON off a terminal, readable on one, secrets redacted.

Redaction is a processor, not a habit: every event (ours and the stdlib's, e.g. pika's) passes through
:func:`redact_secrets`, which masks registered secret values and the password of any URL.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]+)@", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD")
_REDACTED = "***"


class _Secrets:
    """The secret values seen so far; a value is added once and masked everywhere after."""

    def __init__(self) -> None:
        self.values: frozenset[str] = frozenset()

    def add(self, value: str | None) -> None:
        # Copy on write: a thread redacting a log line iterates the set it read, which a secret registered
        # meanwhile (the S3 store's refreshed credentials, from its writing thread) must not change under it.
        if value and len(value) >= 3 and value not in self.values:
            self.values = self.values | {value}


_secrets = _Secrets()


def register_secret(value: str | None) -> None:
    """Mask ``value`` in every log event from now on."""
    _secrets.add(value)


def redact_text(text: str) -> str:
    """``text`` with URL passwords and registered secrets masked."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{_REDACTED}@", text)
    for secret in _secrets.values:
        if secret in text:
            text = text.replace(secret, _REDACTED)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


class _StderrLogger:
    """Writes each rendered event to whatever ``sys.stderr`` is at the time (tests and tools swap it)."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        # One write per event, under a lock: print() writes the line and its newline separately, and
        # two threads (the worker's I/O and processing threads) interleaved them into unreadable lines.
        with self._lock:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib side of the same: ``sys.stderr`` looked up per record."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)
        super().emit(record)


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every string field of the event."""
    for key, value in event.items():
        event[key] = _redact_value(value)
    return event


def configure_logging(level: str = "info", fmt: str = "auto", secrets: Iterable[str | None] = ()) -> None:
    """Configure structlog and the stdlib root logger to write one event per line to stderr."""
    for secret in (*secrets, *(os.environ.get(name) for name in _SECRET_ENV)):
        register_secret(secret)
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # pika reports every reconnect attempt at ERROR; our own events say the same thing once, redacted.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A bound logger for module ``name``."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
