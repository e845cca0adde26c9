"""Opening a result store from its location string (``INFERQ_RESULT_STORE``).

Each back end is imported only when its location is opened, so a process loads the drivers of its own
stores and no others (psycopg for PostgreSQL, boto3 for S3)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from inferq.shared.errors import ConfigError, StoreError
from inferq.shared.extras import POSTGRES, S3, needs_extra
from inferq.shared.results.base import ResultStore
from inferq.shared.results.files import FileResultStore
from inferq.shared.s3.location import S3Location, is_s3

DEFAULT_LOCATION = "sqlite:var/results.db"
SETTING = "INFERQ_RESULT_STORE"


def open_result_store(location: str, *, fsync: bool = True, setting: str = SETTING) -> ResultStore:
    """The result store at ``location``:

    ``sqlite:relative/path.db`` or ``sqlite:///absolute/path.db``, ``postgresql://user@host:port/db``
    (a libpq URL; the password from the URL or ``PGPASSWORD``), ``s3://bucket/prefix``, ``file:///abs/dir``
    or a directory path. A malformed location raises :class:`ConfigError` naming ``setting``.
    Nothing is connected yet: the first operation does that (and creates a database schema)."""
    kind, target = parse_location(location, setting)
    if kind == "sqlite":
        from inferq.shared.results.sqlite import SQLiteResultStore  # noqa: PLC0415  (sqlite3 only when used)

        return SQLiteResultStore(target)
    if kind == "postgresql":
        with needs_extra(POSTGRES, "a postgresql:// result store"):
            from inferq.shared.results.postgres import PostgresResultStore  # noqa: PLC0415  (psycopg only when used)

        return PostgresResultStore(target)
    if kind == "s3":
        with needs_extra(S3, "an s3:// result store"):
            from inferq.shared.results.s3 import S3ResultStore  # noqa: PLC0415  (boto3 only when used)

        return S3ResultStore(S3Location.parse(target))
    return FileResultStore(target, fsync=fsync)


def parse_location(location: str, setting: str = SETTING) -> tuple[str, str]:
    """``(kind, target)`` of a result-store location: kind ``sqlite`` (target a path), ``postgresql``
    (a libpq URL), ``s3`` (the location) or ``file`` (a directory path)."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{setting}: {why} (use sqlite:PATH, postgresql://…, s3://bucket/prefix or a directory)")

    if not location.strip():
        raise bad("empty")
    if location.startswith("sqlite:"):
        return "sqlite", _sqlite_path(location, bad)
    if location.startswith(("postgresql://", "postgres://")):
        _check_postgres_url(location, bad)
        return "postgresql", location
    if is_s3(location):
        try:
            S3Location.parse(location)
        except StoreError as exc:
            raise bad(str(exc)) from None
        return "s3", location
    if location.startswith("file:"):
        if not location.startswith("file:///") or len(location) == len("file:///"):
            raise bad(f"{location!r} is not file:///absolute/dir")
        return "file", location[len("file://") :]
    if "://" in location:
        raise bad(f"unknown scheme {location.split('://', 1)[0]!r}")
    return "file", location


def _sqlite_path(location: str, bad: Callable[[str], ConfigError]) -> str:
    rest = location[len("sqlite:") :]
    if rest.startswith("//"):
        if not rest.startswith("///") or len(rest) == 3:
            raise bad(f"{location!r} is not sqlite:///absolute/path.db or sqlite:relative/path.db")
        return rest[2:]
    if not rest:
        raise bad("sqlite: names no database file")
    return rest


def _check_postgres_url(location: str, bad: Callable[[str], ConfigError]) -> None:
    try:
        parts = urlsplit(location)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        raise bad("a postgresql:// URL that cannot be parsed") from None
    if not parts.path.strip("/"):
        raise bad("the postgresql:// URL names no database: postgresql://user@host:port/db")
