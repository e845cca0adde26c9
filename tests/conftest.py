"""Fixtures for the tests at this level; the helpers live in ``support`` (a unique module name, since
each test folder has a conftest of its own)."""

from postgres_support import postgres_url  # noqa: F401  (a fixture, by name)
from support import broker_is_up, env, iris_store, models, s3_env, seaweedfs  # noqa: F401  (fixtures, by name)
