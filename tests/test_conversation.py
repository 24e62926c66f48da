"""The bot's conversation in-process (bots/conversation.py): every command's arguments,
fuzzed, get an answer Telegram accepts, never an exception."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from bots import conversation, formatting
from bots.conversation import HISTORY_MAX, Incoming, count_parse
from gateway import devices, selectors
from gateway.models import DeviceCommand
from protocols.telegram import render
from tests.botapi import visible_text

pytestmark = pytest.mark.django_db

_update_ids = itertools.count(1)

# Arguments people (or fuzzers) type: other Unicode digits, huge and negative numbers,
# markup, control characters, nothing at all.
ARGUMENTS = [
    "", " ", "²", "³", "٣", "१", "１０", "⑤", "Ⅻ", "½", "-1", "0", "00", "+5", "5.0", "1e3",
    "0x10", "1_0", "9" * 30, "9" * 5000, "-" + "9" * 5000, "5 6", "lobby", "lobby\nx",
    "<b>x</b>", "&amp;", "a/b", "😀" * 40, "\x00", "\u202e", "\ud800", "x" * 5000,
]


def say(text: str, *, chat_id: str = "7", kind: str = "private", withheld: str = "") -> list[str]:
    incoming = Incoming(
        platform="telegram", chat_id=chat_id, chat_kind=kind, chat_title="T", user_id="7",
        user_name="Tester", text=text, update_id=next(_update_ids), text_withheld=withheld,
    )
    replies = conversation.handle(incoming, bot_username="gateway_test_bot")
    return [text for reply in replies for text in render.messages(reply)]  # as Telegram gets


def assert_sendable(replies: list[str]) -> None:
    """Each reply is HTML Telegram parses, within its length limit."""
    for reply in replies:
        shown = visible_text(reply, "HTML")
        assert 0 < render.visible_length(shown) <= render.LIMIT, reply[:200]


@pytest.mark.parametrize("count", ["²", "٣", "１０", "-1", "0", "51", "9" * 5000, "x", "5 6"])
def test_history_answers_usage_for_anything_but_1_to_50(count):
    say("/join lobby")
    assert say(f"/history {count}") == [f"Usage: /history [n], n from 1 to {HISTORY_MAX}"]


def test_history_takes_ascii_counts():
    say("/join lobby")
    for text in ["one", "two", "three"]:
        assert say(text) == []
    assert len(say("/history 2")[0].splitlines()) == 2
    assert len(say("/history 050")[0].splitlines()) == 3
    assert len(say("/history")[0].splitlines()) == 3


@pytest.mark.parametrize(
    ("text", "count"),
    [("1", 1), ("50", 50), ("007", 7), ("²", None), ("٣", None), ("１", None), ("0", None),
     ("51", None), ("-1", None), ("+1", None), ("", None), ("9" * 5000, None)],
)
def test_count_parse(text, count):
    assert count_parse(text, 50) == count


@pytest.mark.parametrize("joined", [False, True], ids=["no room", "in a room"])
def test_no_argument_crashes_a_command(joined):
    if joined:
        say("/join fuzz")
    for command in [*conversation.COMMANDS, "nosuch", "x" * 5000, "²"]:
        for argument in ARGUMENTS:
            assert_sendable(say(f"/{command} {argument}"))
            assert_sendable(say(f"/{command}@gateway_test_bot {argument}"))
    for text in ["/", "/ ", "/@", "/@gateway_test_bot", "/join@", "/join\tlobby"]:
        assert_sendable(say(text))


def test_join_in_a_group_says_when_its_plain_text_does_not_reach_the_bot():
    advice = "Turn privacy mode off."
    (told,) = say("/join crew", chat_id="-100", kind="supergroup", withheld=advice)
    assert told.startswith("You joined <b>crew</b>") and told.endswith(advice)
    assert "plain text in this group does not reach me" in told
    (plain,) = say("/join crew", chat_id="-101", kind="supergroup")
    assert "does not reach" not in plain and "what you write goes there" in plain


def report(device: str, kind: str, room: str = "home", **fields) -> None:
    devices.devices_report([devices.Report(room=room, device_id=device, kind=kind,
                                           at=time.time(), live=True, **fields)])


def seen(text: str) -> list[str]:
    """The replies to ``text`` as the chat shows them (markup gone)."""
    return [visible_text(reply, "HTML") for reply in say(text)]


def test_who_and_devices_show_the_room_s_devices_with_status_and_state():
    say("/join home")
    assert seen("/devices") == ["No devices in this room."]
    report("thermo1", "status", status="offline")
    report("thermo1", "state", state={"temperature": 20.5, "mode": "heat", "x": [1, 2]})
    report("fan1", "state", state="spinning\nfast " + "x" * 500)
    at = formatting.clock(devices.room_device(room="home", device_id="thermo1")["status_at"])
    (who,) = seen("/who")
    assert who.splitlines()[-3:] == [
        "Devices:", "• fan1 — no status", f"• thermo1 — offline since {at}"]
    (listed,) = seen("/devices")
    fan_state = listed.splitlines()[2]
    assert fan_state.startswith("  ↳ spinning fast xxx") and fan_state.endswith("x…")
    assert len(fan_state) == len("  ↳ ") + formatting.STATE_WIDTH
    assert listed.splitlines()[:2] + listed.splitlines()[3:4] == [
        "Devices in home:", "• fan1 — no status", f"• thermo1 — offline since {at}"]
    # Its pairs as the database keeps them (PostgreSQL's jsonb orders an object's keys).
    thermo_state = listed.splitlines()[4]
    assert thermo_state.startswith("  ↳ ") and sorted(
        re.split(r", (?=[a-z]+: )", thermo_state[4:])) == [
        "mode: heat", "temperature: 20.5", "x: [1, 2]"]
    say("/leave")
    assert seen("/devices") == [conversation.JOIN_HINT]


def test_cmd_sends_the_command_as_the_chat_s_message_and_refuses_clearly(
    django_capture_on_commit_callbacks,
):
    assert seen("/cmd thermo1 set 22") == [conversation.JOIN_HINT]
    say("/join home")
    report("thermo1", "status", status="online")
    for usage in ["/cmd", "/cmd thermo1", "/cmd   thermo1  "]:
        assert seen(usage) == [conversation.CMD_USAGE]
    assert seen("/cmd ghost x") == [
        "Not sent: no device ghost in this room (/devices lists them)."]
    assert seen("/cmd bad/id x") == ["Not sent: bad/id is not a device id."]
    dispatched: list[devices.Command] = []
    devices.command_dispatcher_install(dispatched.append)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            assert seen("/cmd thermo1 set   22 ") == []
            assert dispatched == []  # not before its update's transaction commits
    finally:
        devices.command_dispatcher_install(None)
    (sent,) = DeviceCommand.objects.all()
    assert [command.key for command in dispatched] == [sent.key]
    assert (sent.room, sent.device_id, sent.command, sent.sender["protocol"]) == (
        "home", "thermo1", "set   22", "telegram")
    (message,) = selectors.room_messages_last(room="home", limit=5)
    assert (message["id"], message["text"], message["origin"]) == (
        sent.seq, "/cmd thermo1 set   22", "telegram-chat-7")


def test_clock_shows_the_date_of_another_day():
    now = 1_714_572_000.0  # 2024-05-01 14:00 UTC
    assert formatting.clock(now - 60, now=now) == "13:59"
    assert formatting.clock(now - 86_400, now=now) == "2024-04-30 14:00"
