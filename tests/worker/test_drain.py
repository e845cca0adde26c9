"""Drain detection: when the queue is empty and every job is done (pure logic), the loop that drives
it, and the one broker behaviour it relies on (a delivery that crosses the cancel is counted)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pika
import pytest
from support import Env, wait_for

from inferq.worker.consumer import _count_returns
from inferq.worker.drain import DrainDetector, DrainLoop, Step


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


def test_a_cycle_in_which_a_job_was_handed_back_is_not_the_last() -> None:
    # Given a cycle during which the worker quarantined a job (or a delivery crossed its cancel)
    drain = DrainDetector()
    drain.tick(idle=True)
    drain.depth(0, idle=True, handed_back=0)
    drain.cancelled()
    drain.settled(idle=True)
    # When the final count misses it (the broker counts a returned message as ready a moment later)
    # Then the worker consumes again instead of stopping
    assert drain.depth(0, idle=True, handed_back=1) is Step.RESUME
    # And the next cycle, with nothing handed back, is the last
    drain.consuming()
    assert drain.tick(idle=True) is Step.ASK_DEPTH
    assert drain.depth(0, idle=True, handed_back=1) is Step.CANCEL
    drain.cancelled()
    assert drain.settled(idle=True) is Step.ASK_FINAL_DEPTH
    assert drain.depth(0, idle=True, handed_back=1) is Step.DONE


class ScriptedBroker:
    """The broker side of a drain, answering from a script; a delivery crosses the cancel on the wire."""

    def __init__(self) -> None:
        self.ready = True
        self.handed_back = 0
        self.ready_jobs = 0
        self.timers: list[Callable[[], None]] = []
        self.events: list[str] = []

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> object:
        self.timers.append(callback)
        return callback

    def queue_depth(self, on_count: Callable[[int], None]) -> None:
        self.events.append(f"depth={self.ready_jobs}")
        on_count(self.ready_jobs)

    def cancel(self, on_cancelled: Callable[[], None]) -> None:
        self.events.append("cancel")
        self.ready = False
        self.handed_back += 1  # the suspect the retry queue was sending crossed the cancel: returned
        on_cancelled()

    def resume(self) -> None:
        self.events.append("resume")
        self.ready = True

    def stop(self) -> None:
        self.events.append("stop")

    def run_timers(self) -> None:
        timers, self.timers = self.timers, []
        for timer in timers:
            timer()


def test_a_drain_does_not_stop_while_a_delivery_that_crossed_its_cancel_is_on_its_way_back() -> None:
    # Given an idle worker on an empty queue, whose retry queue sends it one more suspect just as it
    # cancels; the broker's count right after the cancel does not include the returned suspect yet
    broker = ScriptedBroker()
    loop = DrainLoop(broker, poll_s=0.05, idle=lambda: True, stopping=lambda: False)
    loop.consuming()
    # When the drain ticks
    broker.run_timers()
    # Then it consumes again rather than stopping: the job it was about to run is not left behind
    # (it used to stop here, leaving the suspect in the retry queue)
    assert broker.events == ["depth=0", "cancel", "depth=0", "resume"]
    assert not loop.detector.done


@pytest.mark.broker
def test_a_delivery_that_crosses_the_cancel_on_the_wire_is_counted_as_handed_back(env: Env) -> None:
    # Given a consumer whose channel counts what pika hands back by itself
    queue = f"{env.prefix}.crossing"
    connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    publisher = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        returned: list[int] = []
        _count_returns(channel._impl, lambda: returned.append(1))
        seen: list[bytes] = []
        tag = channel.basic_consume(queue, lambda _ch, _method, _props, body: seen.append(body))
        # And a message delivered to it that it has not read yet
        confirmed = publisher.channel()
        confirmed.confirm_delivery()
        confirmed.basic_publish("", queue, f"job {uuid.uuid4()}".encode())
        wait_for(lambda: env.depth(queue) == 0)  # taken by the consumer, the frames in its socket
        # When it cancels before reading them
        channel.basic_cancel(tag)
        # Then pika returned the delivery (never shown to the consumer), and it was counted
        assert seen == [] and returned == [1]
        wait_for(lambda: env.depth(queue) == 1)
        channel.queue_delete(queue)
    finally:
        publisher.close()
        connection.close()
