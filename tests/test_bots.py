"""The bot's neutral markup and its Telegram rendering, command parsing, what Telegram's
updates say (protocols/telegram/updates.py) and how reactions cross (reactions.py), and the
log formatter's secret masking."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from telegram import Bot, Update

from bots import formatting, markup
from bots.conversation import command_parse
from gateway import events
from gateway.logging import StructuredFormatter
from protocols.telegram import reactions, render
from protocols.telegram.updates import received


def message(text: str, name: str = "ann", protocol: str = "web",
            **state) -> events.RoomMessage:
    return events.room_message(
        id=1, room="lobby", text=text, ts=0.0, origin="web-1",
        sender=events.sender(protocol=protocol, id="a1", name=name), **state,
    )


def telegram(reply, limit: int = render.LIMIT) -> list[str]:
    return render.messages(reply, limit=limit)


def test_a_room_message_names_its_sender_and_protocol_escaped():
    assert telegram(formatting.room_message(message("1 < 2 & <b>", name="<i>x</i>"))) == [
        "<b>&lt;i&gt;x&lt;/i&gt;</b> (web): 1 &lt; 2 &amp; &lt;b&gt;"
    ]


def test_files_without_text_are_captioned_by_their_sender_alone():
    photo = {"id": "k1", "name": "door.jpg", "type": "image/jpeg", "size": 10,
             "width": 4, "height": 3}
    assert telegram(formatting.room_message(message("", name="doorcam", protocol="mqtt",
                                                    attachments=[photo]))) == [
        "<b>doorcam</b> (mqtt)"
    ]
    assert formatting.room_message(message("look", attachments=[photo])).plain() == (
        "ann (web): look")
    assert formatting.room_message(message("", attachments=[photo]),
                                   shown="Ann [web]").plain() == "Ann [web]"


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


def test_history_lines_show_a_message_as_it_is_now_a_reply_and_an_edit():
    answered = events.reply_ref(id=7, sender=events.sender(protocol="web", id="b", name="bo"),
                                text="question")
    line = formatting.history_line(message("yes", reply_to=answered, edited_at=5.0))
    assert render.messages(markup.Reply((line,))) == [
        "<code>#1</code> 00:00 <b>ann</b> (web): ↩ <code>#7</code> yes (edited)"
    ]


# --- reactions, both ways (protocols/telegram/reactions.py) ---------------------------------


def test_reactions_cross_as_each_side_writes_its_emoji():
    assert reactions.from_telegram("❤") == "❤️" and reactions.from_telegram("👍") == "👍"
    assert reactions.to_telegram("❤️") == "❤" and reactions.to_telegram("❤") == "❤"
    assert reactions.to_telegram("⚡") == "⚡"
    for foreign in ("😂", "😮", "+1", "👍🏽"):
        assert reactions.to_telegram(foreign) is None
    assert reactions.TEXT_STYLE <= reactions.TELEGRAM_EMOJI


@pytest.mark.parametrize(
    ("counts", "shown"),
    [
        ({}, ""),
        ({"😂": 9}, ""),  # Telegram has no such reaction
        ({"😂": 9, "👍": 1}, "👍"),
        ({"👍": 2, "❤️": 1, "❤": 2}, "❤"),  # both hearts count as one
        ({"👍": 1, "🎉": 1}, "🎉"),  # a tie: the lower code point (U+1F389 < U+1F44D)
    ],
)
def test_the_bot_shows_the_most_used_emoji_telegram_has(counts, shown):
    assert reactions.shown(counts) == shown


def test_only_a_reaction_that_may_change_the_favourite_is_shown_again():
    assert reactions.may_change("👍", True, {"👍": 2, "🎉": 1})  # the favourite now
    assert not reactions.may_change("🎉", True, {"👍": 2, "🎉": 1})
    assert not reactions.may_change("😂", True, {"😂": 5})  # Telegram cannot show it
    assert reactions.may_change("🎉", False, {"👍": 2})  # a taken back one may have been it


# --- what an update says (protocols/telegram/updates.py) -------------------------------------

USER = {"id": 7, "is_bot": False, "first_name": "Alice", "username": "alice"}
PRIVATE = {"id": 7, "type": "private", "first_name": "Alice"}


def update(**body) -> Update:
    return Update.de_json({"update_id": 1, **body}, Bot("1:x"))


def said(text: str = "hi", **fields) -> dict:
    return {"message_id": 5, "date": 0, "chat": PRIVATE, "from": USER, "text": text, **fields}


def test_a_message_says_its_id_text_and_the_message_it_answers():
    found = received(update(message=said(reply_to_message=said("earlier", message_id=3))))
    assert found is not None
    assert (found.kind, found.message_id, found.text, found.reply_to) == ("message", 5, "hi", 3)
    assert found.user == {"id": "7", "username": "alice", "name": "Alice"}
    assert found.scope_chat() == {"id": "7", "kind": "private", "title": "Alice"}


def test_an_edit_says_the_new_text_and_a_caption_edit_is_not_taken():
    found = received(update(edited_message=said("fixed", edit_date=1)))
    assert found is not None and (found.kind, found.message_id, found.text) == ("edit", 5,
                                                                              "fixed")
    caption = {k: v for k, v in said().items() if k != "text"}
    assert received(update(edited_message={**caption, "caption": "c", "edit_date": 1})) is None


def test_a_reaction_says_what_was_added_and_taken_back_as_the_room_writes_emoji():
    group = {"id": -5, "type": "supergroup", "title": "Crew"}
    found = received(update(message_reaction={
        "chat": group, "message_id": 9, "date": 0, "actor_chat": group,
        "old_reaction": [{"type": "emoji", "emoji": "👍"}],
        "new_reaction": [{"type": "emoji", "emoji": "❤"},
                         {"type": "custom_emoji", "custom_emoji_id": "42"}, {"type": "paid"}],
    }))
    assert found is not None
    assert (found.kind, found.message_id, found.added, found.removed) == (
        "reaction", 9, ["❤️"], ["👍"])
    assert found.user == {"id": "-5", "username": "", "name": "Crew"}  # an anonymous admin


def test_a_group_moving_to_a_supergroup_is_taken_once_from_the_old_group():
    group = {"id": -5, "type": "group", "title": "Crew"}
    moved = {"message_id": 8, "date": 0, "chat": group, "from": USER}
    found = received(update(message={**moved, "migrate_to_chat_id": -1005}))
    assert found is not None and (found.kind, found.migrate_to) == ("migrate", "-1005")
    new = {"id": -1005, "type": "supergroup", "title": "Crew"}
    assert received(update(message={**moved, "chat": new, "migrate_from_chat_id": -5})) is None
    assert received(update(channel_post={**moved, "text": "news"})) is None


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
