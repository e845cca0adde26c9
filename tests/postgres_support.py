"""PostgreSQL for tests: a schema of its own per test on the shared server, and a private cluster
(its own data directory and port) for tests that stop the database; the shared server is never stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import private_broker
import psycopg
import pytest
from support import require_marker

SHARED_URL = os.environ.get("INFERQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
"""The shared PostgreSQL: the one place the suite reads it (``INFERQ_TEST_POSTGRES_URL``)."""
# Debian keeps the server programs out of PATH, one directory per major version: take the newest.
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)


def schema_url(base: str, schema: str) -> str:
    """``base`` with every table the store creates going into ``schema``."""
    return f"{base}?options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def postgres_answers() -> None:
    """The shared PostgreSQL answers, checked once per session: fail loudly (never skip) when it does not."""
    try:
        psycopg.connect(SHARED_URL, connect_timeout=5).close()
        return
    except psycopg.OperationalError as exc:
        reason = str(exc)
    pytest.fail(
        f"PostgreSQL is not reachable at {SHARED_URL} ({reason}); run scripts/ensure-postgres.sh", pytrace=False
    )


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A libpq URL whose tables live in a fresh schema of the shared test database (dropped afterwards),
    for a test marked ``postgres``."""
    require_marker(request, "postgres", f"PostgreSQL at {SHARED_URL}")
    request.getfixturevalue("postgres_answers")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SHARED_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield schema_url(SHARED_URL, schema)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def _free_port() -> int:
    return private_broker.free_port()  # below the ephemeral range: see its note


def _bin(name: str) -> str:
    for directory in PG_BINS:
        if (directory / name).is_file():
            return str(directory / name)
    return shutil.which(name) or name


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary directory, run as user postgres), to stop and
    start in a fault test."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="inferq-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            _bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", _bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.dir, ignore_errors=True)
