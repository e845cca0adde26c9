"""Fixtures for the tests at this level; the helpers live in ``support`` (a unique module name, since
each test folder has a conftest of its own).

A fixture that reaches a server fails a test not marked for it (``broker``, ``postgres``, ``s3``), and
fails loudly, never skips, when its server does not answer; nothing here is autouse, so a test that
asks for none of them runs with no server at all (``pytest -m "not broker and not postgres and not s3"``)."""

from postgres_support import postgres_answers, postgres_url  # noqa: F401  (fixtures, by name)
from support import (  # noqa: F401  (fixtures, by name)
    broker_answers,
    broker_is_up,
    env,
    iris_store,
    models,
    s3_env,
    seaweedfs,
    seaweedfs_server,
)
