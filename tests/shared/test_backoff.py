"""Backoff: capped and jittered, whatever the number of attempts."""

from __future__ import annotations

from inferq.shared.broker.amqp import Backoff


def test_a_backoff_after_ten_thousand_attempts_still_gives_a_capped_delay() -> None:
    backoff = Backoff(base_s=0.05, cap_s=2.0)
    delays = [backoff.next_delay() for _ in range(10_000)]
    assert backoff.attempt == 10_000
    assert all(0 < d <= 2.0 for d in delays)
    assert all(d >= 1.0 for d in delays[10:])  # jitter keeps at least half of the capped delay
    backoff.reset()
    assert backoff.next_delay() <= 0.05
