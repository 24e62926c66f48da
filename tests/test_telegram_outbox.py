"""The Telegram server's paced outbox, on a fake clock: order, pace, a gone chat. (A room's
backlog is the relay's: tests/test_relay.py, tests/test_telegram_consumers.py.)"""

from __future__ import annotations

import pytest

from protocols.telegram.outbox import Outbox, Outgoing, SendLimits

FAST = dict(chat_per_second=1000.0, group_per_minute=60_000.0, overall_per_second=1000.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def outbox(**limits) -> tuple[Outbox, Clock]:
    clock = Clock()
    return Outbox(SendLimits(**{**FAST, **limits}), clock=clock), clock


def room(seq: int) -> Outgoing:
    """A piece of a room message, as the relay hands it over."""
    return Outgoing(f"m{seq}", waiter=f"waiter of m{seq}")


def send_all(box: Outbox, clock: Clock, chat_id: str) -> list[tuple[float, str]]:
    """Drain one chat as the server does: wait for its turn, then the overall one, send."""
    start, sent = clock.now, []
    while (item := box.next(chat_id)) is not None:
        clock.advance(box.due(chat_id))
        clock.advance(box.turn(chat_id))
        sent.append((round(clock.now - start, 6), item.call))
    box.release(chat_id)
    return sent


def test_a_private_chat_gets_one_message_a_second():
    box, clock = outbox(chat_per_second=1.0)
    for i in range(4):
        box.queue("7", room(i))
    assert send_all(box, clock, "7") == [(0.0, "m0"), (1.0, "m1"), (2.0, "m2"), (3.0, "m3")]


def test_a_chat_rate_above_one_allows_that_burst_then_paces():
    box, clock = outbox(chat_per_second=2.0)
    for i in range(5):
        box.queue("7", room(i))
    assert [t for t, _ in send_all(box, clock, "7")] == [0.0, 0.0, 0.5, 1.0, 1.5]


def test_a_chat_rate_below_one_spaces_messages_out():
    box, clock = outbox(chat_per_second=0.5)
    box.queue("7", room(1))
    box.queue("7", room(2))
    assert [t for t, _ in send_all(box, clock, "7")] == [0.0, 2.0]


def test_the_chat_waits_only_as_long_as_its_pace_says():
    box, clock = outbox(chat_per_second=1.0)
    box.queue("7", room(1))
    box.queue("7", room(2))
    box.next("7")
    assert box.due("7") == 0.0 and box.turn("7") == 0.0
    box.next("7")
    clock.advance(0.25)
    assert box.due("7") == pytest.approx(0.75)
    clock.advance(0.75)
    assert box.due("7") == 0.0


def test_a_group_gets_its_per_minute_burst_then_one_every_three_seconds():
    box, clock = outbox(group_per_minute=20.0)
    for i in range(23):
        box.queue("-100", room(i))
    times = [t for t, _ in send_all(box, clock, "-100")]
    assert times[:20] == [0.0] * 20
    assert times[20:] == [3.0, 6.0, 9.0]


def test_a_group_pace_does_not_hold_up_a_private_chat():
    box, clock = outbox(group_per_minute=1.0, chat_per_second=1.0)
    box.queue("-100", room(1))
    box.queue("-100", room(2))
    box.queue("7", room(3))
    box.next("-100")
    assert box.turn("-100") == 0.0
    box.next("-100")
    assert box.due("-100") == pytest.approx(60.0)
    box.next("7")
    assert box.due("7") == 0.0 and box.turn("7") == 0.0


def test_the_overall_limit_spreads_chats_in_the_order_they_ask():
    box, clock = outbox(overall_per_second=3.0)
    chats = [str(i) for i in range(1, 7)]
    for chat_id in chats:
        box.queue(chat_id, room(1))
    waits = []
    for chat_id in chats:
        box.next(chat_id)
        assert box.due(chat_id) == 0.0  # each chat's own pace allows it
        waits.append(box.turn(chat_id))
    assert waits == pytest.approx([0.0, 0.0, 0.0, 1 / 3, 2 / 3, 1.0])
    clock.advance(2.0)  # the bucket has leaked: a burst again
    box.queue("1", room(2))
    box.next("1")
    assert box.turn("1") == 0.0


def test_a_chat_still_waiting_its_own_turn_does_not_hold_an_overall_one():
    box, clock = outbox(chat_per_second=1.0, overall_per_second=1.0)
    box.queue("7", room(1))
    box.queue("7", room(2))
    box.queue("8", room(3))
    box.next("7")
    assert box.turn("7") == 0.0
    box.next("7")
    clock.advance(0.5)
    assert box.due("7") == pytest.approx(0.5)  # asked, but no turn taken yet
    clock.advance(0.5)
    box.next("8")
    assert box.turn("8") == 0.0  # the overall turn at 1.0 goes to whoever asks first
    assert box.turn("7") == pytest.approx(1.0)


def test_messages_to_a_chat_go_in_the_order_they_were_queued():
    box, clock = outbox()
    texts = []
    for i in range(10):
        item = room(i) if i % 3 else Outgoing(f"reply {i}")
        box.queue("7", item)
        box.queue("8", room(100 + i))
        texts.append(item.call)
    assert [text for _, text in send_all(box, clock, "7")] == texts
    assert [text for _, text in send_all(box, clock, "8")] == [f"m{100 + i}" for i in range(10)]


def test_a_gone_chat_is_forgotten_and_what_it_had_waiting_is_handed_back():
    box, clock = outbox()
    box.queue("7", room(1))
    box.queue("7", Outgoing("reply"))
    box.queue("7", room(2))
    assert [i.waiter for i in box.forget("7")] == ["waiter of m1", None, "waiter of m2"]
    assert "7" not in box and box.next("7") is None and box.waiting("7") == []
    assert box.forget("7") == []


def test_a_drained_chat_is_released_and_starts_afresh():
    box, clock = outbox(chat_per_second=1.0)
    box.queue("7", room(1))
    box.queue("7", room(2))
    box.next("7")
    box.release("7")
    assert "7" in box  # something still waits
    send_all(box, clock, "7")
    assert "7" not in box and len(box) == 0


def test_a_turn_asked_early_comes_after_the_chat_own_turn():
    box, clock = outbox(chat_per_second=1.0, overall_per_second=1.0)
    box.queue("7", room(1))
    box.queue("7", room(2))
    box.next("7")
    assert box.turn("7") == 0.0
    box.next("7")
    assert box.turn("7") == pytest.approx(1.0)  # the chat's turn, the overall one with it
