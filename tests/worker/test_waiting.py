"""Waiting deliveries: held without stalling the acks, tried again, handed back on stop, forgotten with
their channel, dropped once handed back for being held too long (pure logic: a fake loop whose timers
fire when the test says)."""

from __future__ import annotations

from collections.abc import Callable

from support import delivery

from inferq.worker.acks import Acks, AckWindow
from inferq.worker.consumer import Delivery
from inferq.worker.waiting import Waiting

DELAY_S = 1.0


class FakeLoop:
    """Timers that fire on demand, and the channel epoch that is current."""

    def __init__(self) -> None:
        self.epoch = 1
        self.timers: dict[int, tuple[float, Callable[[], None]]] = {}
        self._next = 0

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> object:
        self._next += 1
        self.timers[self._next] = (delay_s, callback)
        return self._next

    def cancel_timer(self, handle: object) -> None:
        assert isinstance(handle, int)
        self.timers.pop(handle, None)

    def is_current(self, d: Delivery) -> bool:
        return d.epoch == self.epoch

    def fire(self) -> None:
        timers, self.timers = self.timers, {}
        for _delay, callback in timers.values():
            callback()


class World:
    """A window of four deliveries, one waiting list over it, and what happened to each delivery."""

    def __init__(self) -> None:
        self.loop = FakeLoop()
        self.acks: AckWindow[Delivery] = AckWindow()
        self.acks.reset(1)
        self.deliveries = [delivery() for _ in range(4)]
        for d in self.deliveries:
            self.acks.received(1, d.tag, d)
        self.retried: list[str] = []
        self.handed_back: list[int] = []
        self.stopping = False
        self.waiting: Waiting[str] = Waiting(
            self.loop, self.acks, self.retried.append, lambda: DELAY_S, self.hand_back, lambda: self.stopping
        )

    def finished(self, d: Delivery, ok: bool) -> None:
        self.acks.finished(d.epoch, d.tag, ok)

    def hand_back(self, d: Delivery) -> None:
        if self.acks.hand_over(d.epoch, d.tag):
            self.handed_back.append(d.tag)

    def finish(self, *indices: int) -> None:
        for i in indices:
            self.finished(self.deliveries[i], True)


def test_a_held_delivery_does_not_stop_the_acks_of_later_ones_and_is_tried_again_after_the_delay() -> None:
    world = World()
    first, *rest = world.deliveries
    world.finish(1, 2, 3)

    # Given the first delivery waits for its model store
    assert world.waiting.add(first, "job-0")

    # Then the others are acked one by one, and the held one stays
    assert world.acks.take() == Acks(None, [d.tag for d in rest])
    assert len(world.waiting) == 1 and [d for d, _cb in world.loop.timers.values()] == [DELAY_S]

    # When the delay passes, its work is tried again, and once done it is acked
    world.loop.fire()
    assert world.retried == ["job-0"] and len(world.waiting) == 0
    world.finish(0)
    assert world.acks.take() == Acks(first.tag)


def test_retry_now_tries_every_held_item_at_once_and_cancels_the_timer() -> None:
    world = World()
    world.waiting.add(world.deliveries[0], "a")
    world.waiting.add(world.deliveries[1], "b")
    assert len(world.loop.timers) == 1  # one timer for all of them
    world.waiting.retry_now()
    assert world.retried == ["a", "b"] and not world.loop.timers


def test_a_stop_hands_every_held_delivery_back_and_later_ones_go_back_at_once() -> None:
    world = World()
    world.waiting.add(world.deliveries[0], "a")
    world.waiting.add(world.deliveries[1], "b")
    world.stopping = True
    world.waiting.hand_back()
    assert not world.waiting.add(world.deliveries[2], "c")
    assert world.handed_back == [d.tag for d in world.deliveries[:3]]
    assert world.retried == [] and not world.loop.timers and len(world.waiting) == 0


def test_a_retry_that_comes_while_stopping_hands_back_instead() -> None:
    world = World()
    world.waiting.add(world.deliveries[0], "a")
    world.stopping = True
    world.loop.fire()
    assert world.retried == [] and world.handed_back == [world.deliveries[0].tag]


def test_a_lost_connection_forgets_held_deliveries_and_an_old_channel_s_delivery_is_left_alone() -> None:
    world = World()
    world.waiting.add(world.deliveries[0], "a")
    world.waiting.forget()
    assert len(world.waiting) == 0 and not world.loop.timers

    # Given a new channel: a delivery of the old one is neither held nor tried again
    world.loop.epoch = 2
    assert not world.waiting.add(world.deliveries[1], "b")
    world.waiting.retry_now()
    assert world.retried == [] and world.handed_back == [] and len(world.waiting) == 0


def test_a_held_delivery_handed_back_meanwhile_is_not_tried_again() -> None:
    # Given two held deliveries, one of which is handed back (held longer than the broker allows)
    world = World()
    world.waiting.add(world.deliveries[0], "a")
    world.waiting.add(world.deliveries[1], "b")
    world.hand_back(world.deliveries[0])
    # When the delay passes, only the other one is tried again
    world.loop.fire()
    assert world.retried == ["b"] and world.handed_back == [world.deliveries[0].tag]
