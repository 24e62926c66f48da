"""The Telegram server's paced outbox, on a fake clock: order, pace, backlog, drops."""

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


def room(seq: int, room: str = "lobby", text: str | None = None, last: bool = True) -> Outgoing:
    return Outgoing(text or f"m{seq}", room, seq, last)


def send_all(box: Outbox, clock: Clock, chat_id: str) -> list[tuple[float, str]]:
    """Drain one chat as the server does: wait for its turn, then the overall one, send."""
    start, sent = clock.now, []
    while (item := box.next(chat_id)) is not None:
        clock.advance(box.due(chat_id))
        clock.advance(box.turn(chat_id))
        sent.append((round(clock.now - start, 6), item.text))
        box.done(chat_id)
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
        texts.append(item.text)
    assert [text for _, text in send_all(box, clock, "7")] == texts
    assert [text for _, text in send_all(box, clock, "8")] == [f"m{100 + i}" for i in range(10)]


def test_a_full_backlog_skips_the_oldest_and_counts_them_for_a_notice():
    box, clock = outbox(backlog=3)
    overflowed = [box.queue("7", room(i)) for i in range(1, 7)]
    assert overflowed == [False, False, False, True, True, True]
    assert [i.text for i in box.waiting("7")] == ["m4", "m5", "m6"]
    sent = [text for _, text in send_all(box, clock, "7")]
    assert sent[0].startswith("… 3 earlier messages were skipped here")
    assert sent[0].endswith("/history shows them.")
    assert sent[1:] == ["m4", "m5", "m6"]


def test_the_notice_counts_only_the_skips_since_the_last_one():
    box, clock = outbox(backlog=1)
    box.queue("7", room(1))
    box.queue("7", room(2))  # m1 skipped
    assert box.next("7").text.startswith("… 1 earlier")
    box.done("7")
    assert box.next("7").text == "m2"
    box.done("7")
    box.queue("7", room(3))
    box.queue("7", room(4))
    box.queue("7", room(5))
    assert [text for _, text in send_all(box, clock, "7")] == [
        box_notice(2), "m5"]


def box_notice(count: int) -> str:
    return (f"… {count} earlier messages were skipped here (this chat fell behind); "
            "/history shows them.")


def test_replies_and_earlier_pieces_do_not_count_against_the_backlog():
    box, clock = outbox(backlog=1)
    for i in range(5):
        assert not box.queue("7", Outgoing(f"reply {i}"))
    assert not box.queue("7", room(1, text="m1 a", last=False))
    assert not box.queue("7", room(1, text="m1 b"))
    assert len(send_all(box, clock, "7")) == 7


def test_the_message_being_sent_keeps_its_remaining_pieces_when_the_backlog_overflows():
    box, clock = outbox(backlog=1)
    box.queue("7", room(1, text="m1 a", last=False))
    box.queue("7", room(1, text="m1 b"))
    assert box.next("7").text == "m1 a"  # being sent: its last piece still waits
    assert box.queue("7", room(2))  # two waiting now: the oldest not being sent goes
    sent = [text for _, text in send_all(box, clock, "7")]
    assert "m1 b" in sent and "m2" not in sent and box_notice(1) in sent


def test_a_deleted_message_is_never_sent_to_any_chat():
    box, clock = outbox(backlog=3)
    for chat_id in ("7", "-100"):
        box.queue(chat_id, room(1))
        box.queue(chat_id, room(2, text="m2 a", last=False))
        box.queue(chat_id, room(2, text="m2 b"))
    box.queue("7", room(2, room="other"))  # the same number in another room stays
    box.drop(("lobby", 2))
    assert not box.queue("7", room(3))  # the deleted one no longer counts as waiting
    assert [text for _, text in send_all(box, clock, "7")] == ["m1", "m2", "m3"]
    assert [text for _, text in send_all(box, clock, "-100")] == ["m1"]


def test_stepping_down_keeps_replies_and_forgets_room_messages_and_skips():
    box, clock = outbox(backlog=1)
    box.queue("7", room(1))
    box.queue("7", Outgoing("reply"))
    box.queue("7", room(2))  # m1 skipped
    box.drop_rooms()
    assert [text for _, text in send_all(box, clock, "7")] == ["reply"]


def test_a_relay_starting_again_drops_only_its_room_queued_messages():
    box, clock = outbox(backlog=5)
    box.queue("7", room(1))
    box.queue("7", Outgoing("reply"))
    box.queue("7", room(1, room="other"))
    box.queue("7", room(2))
    box.drop_rooms("lobby")  # its relay sends them again from the chat's record
    for seq in (3, 4, 5, 6):  # the dropped ones no longer count against the backlog (5)
        assert not box.queue("7", room(seq))
    assert [text for _, text in send_all(box, clock, "7")] == [
        "reply", "m1", "m3", "m4", "m5", "m6"
    ]


def test_a_gone_chat_is_forgotten_with_everything_it_had_waiting():
    box, clock = outbox(backlog=1)
    box.queue("7", room(1))
    box.queue("7", room(2))
    box.forget("7")
    assert "7" not in box and box.next("7") is None and box.waiting("7") == []


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
