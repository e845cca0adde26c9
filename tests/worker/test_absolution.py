"""Announced returns: counted once however often heard, told apart per copy, bounded; each announcement
sent until confirmed, and repeated to a worker that starts listening (pure logic: a fake transport and
timers)."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from inferq.worker.absolution import RECENT_S, REPEAT_AFTER_S, Absolutions, ReturnsAnnounced


class Transport:
    """What the consumer would publish, answered when the test says; timers fired on demand."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Callable[[bool], None]]] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def send(self, body: bytes, on_confirm: Callable[[bool], None]) -> None:
        self.sent.append((body, on_confirm))

    def later(self, delay_s: float, callback: Callable[[], None]) -> object:
        self.timers.append((delay_s, callback))
        return len(self.timers)

    def answer(self, ok: bool) -> None:
        sent, self.sent = self.sent, []
        for _body, on_confirm in sent:
            on_confirm(ok)

    def causes(self) -> list[str]:
        return [orjson.loads(body)["cause"] for body, _ in self.sent]

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for _delay, callback in timers:
            callback()


def test_a_loss_heard_twice_counts_once_and_explains_the_returns_up_to_the_next_one() -> None:
    here, there = Transport(), Transport()
    losing = Absolutions(here.send, here.later, "a:1")
    hearing = Absolutions(there.send, there.later, "b:2")
    # Given worker a lost job j when it had been returned 0 times, and again at 2 times
    losing.lost([("j", 0, 0)], "connection lost")
    losing.lost([("j", 0, 2)], "connection lost")
    losing.listening()
    for body, _confirm in here.sent:
        hearing.heard(body)
        hearing.heard(body)  # heard twice
    # Then both workers explain the returns since: one loss explains up to two (a closed connection may
    # count twice), and the one in between (2 -> 3 at count 3) was someone's crash
    assert losing.explained("j", 0, 3) == hearing.explained("j", 0, 3) == 3
    assert hearing.explained("j", 0, 5) == 4  # two losses explain four returns at most: one crash since
    assert hearing.explained("j", 0, 1) == 1
    # And a copy of j (a new message, its count started over) has none, nor has an unknown job
    assert hearing.explained("j", 1, 3) == 0 and hearing.explained("k", 0, 3) == 0
    assert hearing.explained(None, 0, 3) == 0


def test_an_announcement_is_sent_once_connected_and_again_after_a_refusal() -> None:
    transport = Transport()
    absolutions = Absolutions(transport.send, transport.later, "a:1")
    absolutions.lost([("j", 0, 1)], "connection lost")
    assert transport.sent == []  # not connected yet: sent once listening
    absolutions.listening()
    assert transport.causes() == ["connection lost", "listening"]
    transport.answer(False)  # refused (the session was lost): kept for the next one
    absolutions.listening()
    assert transport.causes() == ["connection lost", "listening"]
    transport.answer(True)
    absolutions.listening()
    assert transport.causes() == ["listening"]  # confirmed: not sent again by itself


def test_a_worker_that_starts_listening_hears_the_recent_announcements_again() -> None:
    now = [0.0]
    here, there = Transport(), Transport()
    losing = Absolutions(here.send, here.later, "a:1", clock=lambda: now[0])
    joining = Absolutions(there.send, there.later, "b:2")
    losing.lost([("j", 0, 0)], "connection lost")
    losing.listening()
    here.answer(True)  # sent while b was not listening yet: b never heard it
    # When b starts listening, and a hears it (twice: one repeat for both)
    joining.listening()
    hello = there.sent[-1][0]
    losing.heard(hello)
    losing.heard(hello)
    assert [delay for delay, _ in here.timers] == [REPEAT_AFTER_S]
    here.fire()
    # Then a repeats its announcement, and b counts the return
    for body, _confirm in here.sent:
        joining.heard(body)
    assert joining.explained("j", 0, 1) == 1
    # But an announcement older than RECENT_S is not repeated, and a worker's own hello asks nothing of it
    here.sent.clear()
    now[0] = RECENT_S + 1
    losing.heard(hello)
    here.fire()
    assert here.sent == []
    losing.heard(ReturnsAnnounced(worker="a:1", cause="listening", returns=[]).model_dump_json().encode())
    assert here.timers == []


def test_nothing_lost_is_nothing_announced_and_an_unreadable_announcement_is_ignored() -> None:
    transport = Transport()
    absolutions = Absolutions(transport.send, transport.later, "a:1")
    absolutions.lost([], "connection lost")
    absolutions.listening()
    absolutions.heard(b"not json")
    absolutions.heard(b'{"worker": "b", "cause": "connection lost", "returns": [["j", 0, 5000]]}')  # past any limit
    assert transport.causes() == ["listening"] and len(absolutions) == 0


def test_the_oldest_announced_jobs_are_forgotten_first() -> None:
    transport = Transport()
    absolutions = Absolutions(transport.send, transport.later, "a:1", max_messages=2)
    absolutions.lost([("j1", 0, 0), ("j2", 0, 0)], "connection lost")
    absolutions.lost([("j1", 0, 1)], "connection lost")  # j1 is the most recent now
    absolutions.lost([("j3", 0, 0)], "connection lost")
    assert len(absolutions) == 2
    assert absolutions.explained("j2", 0, 1) == 0
    assert absolutions.explained("j1", 0, 2) == 2 and absolutions.explained("j3", 0, 1) == 1
