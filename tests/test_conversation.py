"""The bot's conversation in-process (bots/conversation.py): every command's arguments,
fuzzed, get an answer Telegram accepts, never an exception."""

from __future__ import annotations

import itertools

import pytest

from bots import conversation
from bots.conversation import HISTORY_MAX, Incoming, count_parse
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
