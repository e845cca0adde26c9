"""The ack window: which delivery tags may be acked, and how (pure logic)."""

from __future__ import annotations

from inferq.worker.acks import Acks, AckWindow


def window_with(*tags: int, epoch: int = 1) -> AckWindow[int]:
    window: AckWindow[int] = AckWindow()
    window.reset(epoch)
    for tag in tags:
        window.received(epoch, tag, tag)
    return window


def test_a_finished_prefix_is_acked_with_one_multiple_ack() -> None:
    window = window_with(1, 2, 3, 4)
    for tag in (2, 1, 3):
        window.finished(1, tag, ok=True)
    assert window.take() == Acks(through=3)
    assert len(window) == 1
    assert not window.take()  # nothing new


def test_nothing_is_acked_past_a_delivery_still_being_worked_on() -> None:
    window = window_with(1, 2, 3)
    window.finished(1, 2, ok=True)
    window.finished(1, 3, ok=True)
    assert not window.take()
    window.finished(1, 1, ok=True)
    assert window.take() == Acks(through=3)


def test_a_handed_back_delivery_leaves_the_window_without_an_ack_of_its_own() -> None:
    window = window_with(1, 2, 3)
    window.finished(1, 1, ok=True)
    window.finished(1, 2, ok=False)  # nacked: the broker no longer counts it
    window.finished(1, 3, ok=True)
    assert window.take() == Acks(through=3)
    assert len(window) == 0


def test_only_handed_back_deliveries_send_no_ack() -> None:
    window = window_with(1)
    window.finished(1, 1, ok=False)
    assert not window.take()
    assert len(window) == 0


def test_a_tag_of_an_earlier_channel_is_never_acked() -> None:
    window = window_with(1, 2)
    window.reset(2)  # reconnected
    assert window.finished(1, 1, ok=True) is False
    window.received(2, 1, 1)
    assert not window.take()
    window.finished(2, 1, ok=True)
    assert window.take() == Acks(through=1)


def test_deliveries_after_a_held_one_are_acked_one_by_one() -> None:
    # Given job 1 waits for its unreachable model store, and jobs 2-4 of other models finish
    window = window_with(1, 2, 3, 4, 5)
    window.hold(1, 1)
    for tag in (2, 3, 4):
        window.finished(1, tag, ok=True)
    # Then they are acked singly (a multiple ack would take job 1 with them), up to one still running
    assert window.take() == Acks(through=None, singles=[2, 3, 4])
    assert len(window) == 2
    # And when job 1 is released and finishes, a multiple ack covers it and what finished meanwhile
    window.release(1, 1)
    window.finished(1, 5, ok=True)
    assert not window.take()
    window.finished(1, 1, ok=True)
    assert window.take() == Acks(through=5)
    assert len(window) == 0


def test_a_finished_prefix_before_a_held_delivery_still_gets_its_multiple_ack() -> None:
    window = window_with(1, 2, 3, 4)
    window.finished(1, 1, ok=True)
    window.hold(1, 2)
    window.finished(1, 3, ok=True)
    window.finished(1, 4, ok=False)
    assert window.take() == Acks(through=1, singles=[3])
    assert len(window) == 1


def test_a_delivery_being_handed_over_is_finished_only_by_its_copy_s_confirm() -> None:
    # Given delivery 1 is handed back as a copy, and the others finish
    window = window_with(1, 2, 3)
    assert window.hand_over(1, 1)
    window.finished(1, 2, ok=True)
    window.finished(1, 3, ok=True)
    # Then the later ones are acked singly meanwhile, and nothing else finishes it (not even a nack)
    assert window.take() == Acks(through=None, singles=[2, 3])
    assert window.finished(1, 1, ok=False) is False
    assert not window.working(1, 1) and not window.hand_over(1, 1)
    # When the copy is confirmed, the delivery is acked
    assert window.handed_over(1, 1, ok=True)
    assert window.take() == Acks(through=1)
    assert len(window) == 0


def test_a_refused_copy_leaves_the_delivery_to_be_nacked_and_a_late_result_changes_nothing() -> None:
    window = window_with(1, 2)
    window.hand_over(1, 1)
    assert window.handed_over(1, 1, ok=False)  # the caller nacks it
    assert window.finished(1, 1, ok=True) is False  # its result came after all: finished once only
    window.finished(1, 2, ok=True)
    assert window.take() == Acks(through=2)


def test_a_copy_confirmed_after_a_reconnect_is_left_alone() -> None:
    window = window_with(1)
    window.hand_over(1, 1)
    window.reset(2)
    assert window.handed_over(1, 1, ok=True) is False


def test_unacked_lists_every_delivery_that_returns_with_the_channel_and_working_only_those_under_way() -> None:
    window = window_with(1, 2, 3, 4)
    window.finished(1, 2, ok=True)
    window.hand_over(1, 3)
    assert window.unacked() == [1, 2, 3, 4]
    assert list(window.working_items()) == [1, 4]
