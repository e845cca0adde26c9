"""Optional dependencies: which extra (``pip install 'inferq[<extra>]'``) installs which third-party module,
and :class:`MissingExtra`, the one error a feature raises when the extra it needs is not installed.

A core install runs workers, producers and the operator commands on file and SQLite stores; everything
else is an extra. Code that needs one imports it where the feature is opened, inside :func:`needs_extra`,
so the error comes once, on the calling thread, naming what to install (never an ImportError later).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

from inferq.shared.errors import ConfigError

S3 = "s3"
POSTGRES = "postgres"
HTTP = "http"
SKLEARN = "sklearn"
MONITOR = "monitor"
TABLES = "tables"

EXTRA_OF_MODULE: Mapping[str, str] = MappingProxyType(
    {
        # Top-level import names, as ModuleNotFoundError.name starts with them; their own dependencies
        # (botocore, starlette, anyio) are listed too, since only the extra brings them in.
        "boto3": S3,
        "botocore": S3,
        "s3transfer": S3,
        "psycopg": POSTGRES,
        "psycopg_pool": POSTGRES,
        "fastapi": HTTP,
        "starlette": HTTP,
        "anyio": HTTP,
        "uvicorn": HTTP,
        "httptools": HTTP,
        "uvloop": HTTP,
        "sklearn": SKLEARN,
        "skl2onnx": SKLEARN,
        "joblib": SKLEARN,
        "scipy": MONITOR,
        "matplotlib": MONITOR,
        "pyarrow": TABLES,
        "pandas": TABLES,
    }
)
"""Third-party top-level module → the extra that installs it."""


class MissingExtra(ConfigError):
    """A feature needs an optional dependency that is not installed; the message names the extra to install."""

    def __init__(self, extra: str, needed_by: str) -> None:
        super().__init__(f"{needed_by} needs the {extra} extra: pip install 'inferq[{extra}]'")
        self.extra = extra
        self.needed_by = needed_by


def extra_of(exc: BaseException) -> str | None:
    """The extra that installs the module ``exc`` could not find; ``None`` when ``exc`` is not a missing
    module, or the module is no extra's (a broken core install deserves its traceback)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    return EXTRA_OF_MODULE.get(exc.name.partition(".")[0])


@contextmanager
def needs_extra(extra: str, needed_by: str) -> Iterator[None]:
    """Raise :class:`MissingExtra` (``needed_by`` needs ``extra``) when an import in the block finds an
    optional module missing; any other error passes through unchanged."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if extra_of(exc) is None:
            raise
        raise MissingExtra(extra, needed_by) from exc
