"""Drain detection: when the queue is empty and every job is done (pure logic)."""

from __future__ import annotations

from worker.drain import DrainDetector, Step


def test_an_idle_worker_on_an_empty_queue_cancels_then_checks_once_more_then_is_done() -> None:
    drain = DrainDetector()
    assert drain.tick(idle=True) is Step.ASK_DEPTH
    assert drain.depth(0, idle=True) is Step.CANCEL
    drain.cancelled()
    assert drain.settled(idle=True) is Step.ASK_FINAL_DEPTH
    assert drain.depth(0, idle=True) is Step.DONE
    assert drain.done


def test_a_busy_worker_does_not_ask() -> None:
    drain = DrainDetector()
    assert drain.tick(idle=False) is Step.WAIT
    assert drain.tick(idle=True) is Step.ASK_DEPTH
    assert drain.depth(0, idle=False) is Step.WAIT  # work arrived meanwhile
    assert drain.tick(idle=True) is Step.ASK_DEPTH


def test_jobs_requeued_after_the_cancel_are_consumed_again() -> None:
    drain = DrainDetector()
    drain.tick(idle=True)
    drain.depth(0, idle=True)
    drain.cancelled()
    assert drain.settled(idle=True) is Step.ASK_FINAL_DEPTH
    assert drain.depth(3, idle=True) is Step.RESUME
    drain.consuming()
    assert drain.tick(idle=True) is Step.ASK_DEPTH


def test_the_final_check_waits_for_in_flight_work() -> None:
    drain = DrainDetector()
    drain.tick(idle=True)
    drain.depth(0, idle=True)
    drain.cancelled()
    assert drain.settled(idle=False) is Step.WAIT
    assert drain.settled(idle=True) is Step.ASK_FINAL_DEPTH


def test_a_reconnect_during_the_final_check_starts_the_cycle_over() -> None:
    # Given the connection drops while the final depth question is unanswered
    drain = DrainDetector()
    drain.tick(idle=True)
    drain.depth(0, idle=True)
    drain.cancelled()
    drain.settled(idle=True)
    # When the new channel consumes
    drain.consuming()
    # Then the drain goes on (it used to hang here: the final check was never reset)
    assert drain.tick(idle=True) is Step.ASK_DEPTH
    assert drain.depth(0, idle=True) is Step.CANCEL


def test_an_answer_from_before_a_reconnect_is_ignored() -> None:
    drain = DrainDetector()
    drain.tick(idle=True)
    drain.consuming()  # reconnected before the answer came
    assert drain.depth(0, idle=True) is Step.WAIT
    assert not drain.done
