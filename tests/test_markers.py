"""Tests by what they need: the server markers select exactly what needs a server, and the fixtures hold
every test to its marker (an unmarked test that reaches a server fails, as does a marked one whose
server does not answer), so ``pytest -m "not broker"`` runs with no broker at all."""

from __future__ import annotations

import re
from pathlib import Path

import postgres_support
import pytest
import support
from private_broker import free_port

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
SERVER_MARKERS = ("broker", "postgres", "s3")
NO_SERVER_MODULES = [
    "worker/test_acks.py",
    "worker/test_batcher.py",
    "worker/test_waiting.py",
    "worker/test_processor.py",
    "worker/test_runner_split.py",
    "worker/test_runner_stack.py",
    "shared/test_table.py",
    "shared/test_backoff.py",
    "shared/test_broker_urls.py",
    "shared/test_rowfile.py",
    "shared/test_result_store_batches.py",
    "test_messages.py",
    "test_results.py",
    "monitoring/test_drift_statistics.py",
    "monitoring/test_monitor_windows.py",
    "producer/test_rows.py",
]
"""Pure logic: modules in which no test may need a server."""

INNER_CONFTEST = """
from postgres_support import postgres_answers, postgres_url
from support import broker_answers, broker_is_up, env, seaweedfs
"""
INNER_TESTS = """
import pytest

def test_unmarked_on_the_broker(env): pass

def test_unmarked_on_postgres(postgres_url): pass

def test_unmarked_on_s3(seaweedfs): pass

@pytest.mark.broker
def test_marked_on_a_broker_that_does_not_answer(env): pass

@pytest.mark.postgres
def test_marked_on_a_postgres_that_does_not_answer(postgres_url): pass

def test_needing_nothing(): pass
"""
EXPECTED_ERRORS = {
    "test_unmarked_on_the_broker": r"needs RabbitMQ at .* but is not marked: add @pytest.mark.broker",
    "test_unmarked_on_postgres": r"needs PostgreSQL at .* but is not marked: add @pytest.mark.postgres",
    "test_unmarked_on_s3": r"needs a SeaweedFS S3 server .* but is not marked: add @pytest.mark.s3",
    "test_marked_on_a_broker_that_does_not_answer": r"^RabbitMQ is not reachable at amqp://",
    "test_marked_on_a_postgres_that_does_not_answer": r"^PostgreSQL is not reachable at postgresql://",
}


def test_no_pure_logic_test_is_marked_for_a_server(pytester: pytest.Pytester) -> None:
    # When the pure-logic modules are collected as the suite collects them
    items, _ = pytester.inline_genitems(*(str(TESTS / module) for module in NO_SERVER_MODULES))
    # Then every test of each is there, and none needs a server
    assert {item.path.relative_to(TESTS).as_posix() for item in items} == set(NO_SERVER_MODULES)
    marked = [item.nodeid for item in items if any(item.get_closest_marker(name) for name in SERVER_MARKERS)]
    assert marked == []


def test_a_server_fixture_fails_a_test_not_marked_for_it_and_a_marked_one_whose_server_is_down(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker and a PostgreSQL nobody listens for
    monkeypatch.setattr(support, "AMQP_URL", f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    monkeypatch.setattr(postgres_support, "SHARED_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    pytester.makeini("[pytest]\nmarkers =\n    broker: b\n    postgres: p\n    s3: s\naddopts = --strict-markers -ra")
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_servers=INNER_TESTS)
    # When tests ask for the server fixtures, with and without the marker
    outcome = pytester.runpytest()
    # Then each test asking for a server fails: an unmarked one for its missing marker (before any
    # server is tried), a marked one loudly because its server does not answer; none is skipped
    outcome.assert_outcomes(passed=1, errors=5)
    errors = dict(re.findall(r"_+ ERROR at setup of (\w+) _+\n(.*?)(?=\n_+ |\n=+ )", outcome.stdout.str(), re.S))
    assert errors.keys() == EXPECTED_ERRORS.keys()
    for test, expected in EXPECTED_ERRORS.items():
        assert re.search(expected, errors[test], re.S), errors[test]
