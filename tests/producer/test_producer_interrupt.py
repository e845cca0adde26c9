"""Ctrl-C in a program publishing with the producer, against the real broker: at any moment (connecting,
publishing, waiting on a full queue's refusals), it ends the call with KeyboardInterrupt at once, the
connection closes, and every job the broker confirmed is in the queue."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from support import Env, Models, make_job

from inferq.producer.client import Producer

pytestmark = pytest.mark.broker

TRIES = 100
STOPPED_WITHIN_S = 5.0
"""Far above the producer's own bound (a look every 0.1 s): only a call that missed the signal takes longer."""


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this process, as in any Python program run from a terminal (a suite
    started in the background of a non-interactive shell ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_at_any_moment_of_a_publish_ends_it_at_once_and_loses_no_confirmed_job(env: Env, models: Models) -> None:
    # Given a jobs queue bounded at 20 that nobody consumes, and far more jobs than it takes (a quorum queue
    # applies its bound a little late: the first call may get a few hundred in)
    settings = env.producer_settings(max_queue_length=20, publish_retry_s=60)
    confirmed: set[str] = set()
    outcomes: list[str] = []
    rng = random.Random(7)
    for _ in range(TRIES):
        jobs = [make_job(models.X[:1]) for _ in range(2000)]
        # When Ctrl-C comes at a random moment of the call (the connection is opened inside it)
        delay = rng.uniform(0.0, 0.2)
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        started = time.monotonic()
        try:
            timer.start()
            with Producer(settings) as producer:
                producer.publish_many(jobs, on_confirmed=confirmed.add)
            outcomes.append("returned")
        except KeyboardInterrupt:
            outcomes.append("interrupted" if time.monotonic() - started < delay + STOPPED_WITHIN_S else "late")
        except Exception as exc:  # what else Ctrl-C caused is what this test is about
            outcomes.append(f"{type(exc).__name__}: {exc}")
        finally:
            timer.join()
    # Then every call ended in KeyboardInterrupt, soon after the signal
    assert outcomes == ["interrupted"] * TRIES
    # and every job the broker confirmed is queued (some sent but unconfirmed may be as well)
    assert env.depth(env.jobs_queue) >= len(confirmed) > 0
