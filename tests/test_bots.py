"""The bot's neutral markup and its Telegram rendering, command parsing, and the log
formatter's secret masking."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from bots import formatting, markup
from bots.conversation import command_parse
from gateway import events
from gateway.logging import StructuredFormatter
from protocols.telegram import render


def message(text: str, name: str = "ann", protocol: str = "web") -> events.RoomMessage:
    return events.room_message(
        id=1, room="lobby", text=text, ts=0.0, origin="web-1",
        sender=events.sender(protocol=protocol, id="a1", name=name),
    )


def telegram(reply, limit: int = render.LIMIT) -> list[str]:
    return render.messages(reply, limit=limit)


def test_a_room_message_names_its_sender_and_protocol_escaped():
    assert telegram(formatting.room_message(message("1 < 2 & <b>", name="<i>x</i>"))) == [
        "<b>&lt;i&gt;x&lt;/i&gt;</b> (web): 1 &lt; 2 &amp; &lt;b&gt;"
    ]


def test_the_markup_is_neutral_and_its_plain_text_is_what_was_said():
    said = formatting.room_message(message("1 < 2", name="ann"))
    assert said.plain() == "ann (web): 1 < 2"
    assert said.lines[0][0] == markup.bold("ann")
    assert markup.reply("a\nb", markup.line("c ", markup.code("#1"))).plain() == "a\nb\nc #1"


def test_long_texts_split_at_spaces_within_the_limit():
    text = " ".join(["word"] * 2000)  # 9999 characters
    pieces = telegram(formatting.room_message(message(text)), limit=4096)
    assert len(pieces) == 3
    visible = [p.replace("<b>ann</b>", "ann") for p in pieces]
    assert all(render.visible_length(p) <= 4096 for p in visible)
    assert "".join(visible) == "ann (web): " + text
    assert all(p.endswith(" ") for p in visible[:-1])  # never inside a word


def test_a_text_without_spaces_is_cut_hard_and_astral_characters_count_twice():
    assert telegram(markup.reply("x" * 10), limit=4) == ["xxxx", "xxxx", "xx"]
    assert telegram(markup.reply("😀" * 5), limit=4) == ["😀😀", "😀😀", "😀"]  # 2 units each


def test_escaping_never_splits_an_entity():
    pieces = telegram(formatting.room_message(message("&" * 5000)))
    assert len(pieces) == 2
    assert all(piece.replace("&amp;", "").count("&") == 0 for piece in pieces)
    assert "".join(pieces).count("&amp;") == 5000


def test_lines_pack_into_as_few_messages_as_fit():
    lines = [f"line {i:03d} " + "x" * 90 for i in range(100)]  # 100 lines of 99
    packed = telegram(markup.reply(*lines), limit=1000)
    assert all(len(m) <= 1000 for m in packed)
    assert "\n".join(packed).split("\n") == lines
    assert len(packed) == 10


def test_history_lines_mark_the_id_as_code():
    line = formatting.history_line(message("a  b\nc"))
    assert render.messages(markup.Reply((line,))) == [
        "<code>#1</code> 00:00 <b>ann</b> (web): a b c"
    ]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("/join lobby", ("join", "lobby")),
        ("/JOIN   lobby  ", ("join", "lobby")),
        ("/join@gateway_test_bot lobby", ("join", "lobby")),
        ("/join@Gateway_Test_Bot lobby", ("join", "lobby")),
        ("/join@other_bot lobby", ("", "")),
        ("/who", ("who", "")),
        ("hello /join", (None, "hello /join")),
    ],
)
def test_commands_are_parsed_as_telegram_sends_them(text, parsed):
    assert command_parse(text, "gateway_test_bot") == parsed


def test_secrets_are_masked_everywhere_in_a_log_line():
    token = "123:ABC-secret"
    formatter = StructuredFormatter(secrets=[token, ""])
    try:
        raise RuntimeError(f"GET https://api.telegram.org/bot{token}/getMe failed")
    except RuntimeError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "url %s", (token,), sys.exc_info()
        )
    record.url = f"/bot{token}/x"
    line = formatter.format(record)
    assert token not in line
    entry = json.loads(line)
    assert entry["msg"] == "url <redacted>" and entry["url"] == "/bot<redacted>/x"
    assert "bot<redacted>/getMe" in entry["exc"]
