"""Log events from several threads at once stay one JSON event per line."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import orjson
import pytest

from inferq.shared.config import logging as inferq_logging
from inferq.shared.config.logging import configure_logging, get_logger, redact_text, register_secret


def test_events_logged_from_several_threads_never_share_a_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "stderr.log"
    captured = path.open("w")  # a real file: each flush is a system call, where threads switch
    monkeypatch.setattr(sys, "stderr", captured)
    configure_logging("info", "json")
    log = get_logger("test")

    def emit(thread: int) -> None:
        for number in range(500):
            # Events longer than the text buffer make a write reach the file (and let threads switch).
            log.info("tick", thread=thread, number=number, detail="words " * 2_000)

    threads = [threading.Thread(target=emit, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    captured.close()
    events = [orjson.loads(line) for line in path.read_text().splitlines()]
    assert len(events) == 2000 and {e["event"] for e in events} == {"tick"}


def test_a_secret_registered_while_another_thread_redacts_does_not_disturb_it() -> None:
    # Given a redaction part-way through the registered secrets
    register_secret("a-first-secret-value")
    reading = iter(inferq_logging._secrets.values)
    next(reading)
    # When another thread registers a new secret (refreshed credentials)
    register_secret("a-refreshed-secret-value")
    # Then the redaction goes on over what it read, and the next one masks the new secret too
    list(reading)
    assert redact_text("key a-refreshed-secret-value") == "key ***"
