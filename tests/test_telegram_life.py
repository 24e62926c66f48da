"""Messages that live on, through Telegram: edits, deletes, replies and reactions both ways,
and a group that becomes a supergroup. The gateway's real python-telegram-bot against the
Bot API stand-in over HTTP (tests/botapi.py), with real WebSocket clients (``v=2``, which
get the edit, delete and reaction frames) and real gateway processes."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest

from tests.botapi import BotApiStandIn
from tests.helpers import (
    ALICE,
    BEN,
    connect,
    next_message,
    next_of,
    say,
    stored,
    tg_env,
    wait_until,
)

pytestmark = pytest.mark.slow

GROUP, SUPERGROUP = -300, -1000000000300
CAROL = 333  # a member of the group


def extended(gw, room: str, name: str = "ann", **kwargs):
    """A browser that asked for the extended frames (edits, deletes, reactions)."""
    return connect(gw, f"/ws/chat/{room}/?name={name}&v=2", **kwargs)


async def join_both(api: BotApiStandIn, room: str) -> None:
    await say(api, ALICE, f"/join {room}")
    await say(api, BEN, f"/join {room}", user_id=BEN, username="ben", first_name="Ben")


async def copy(api: BotApiStandIn, chat_id: int, count: int) -> dict:
    """The ``count``-th message sent to the chat (once it is), as the stand-in recorded it."""
    return (await api.wait_sent_async(chat_id, count))[count - 1]


async def settled(api: BotApiStandIn, wait: float = 1.0) -> None:
    """Anything more the gateway was going to call would have come by now."""
    await asyncio.sleep(wait)


def calls_of(api: BotApiStandIn, method: str) -> list[dict]:
    return [params for name, params in api.calls if name == method]


async def mapped(gw, chat_id: int, message: dict) -> None:
    """Wait until the gateway has recorded where a message it sent is (it does once Telegram
    has answered the send, a moment after the stand-in shows it): a reply or a reaction to
    it before that would not find it, as in Telegram."""

    def recorded() -> bool:
        with sqlite3.connect(gw.datadir / "gateway.sqlite3", timeout=10) as db:
            row = db.execute("SELECT 1 FROM gateway_botmessage WHERE platform = 'telegram' "
                             "AND chat_id = ? AND message_id = ?",
                             (str(chat_id), message["message_id"])).fetchone()
        return row is not None

    await wait_until(recorded, 10, f"message {message['message_id']} was not mapped")


async def test_an_edit_in_telegram_reaches_browsers_and_the_other_chats_copy(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await join_both(api, "life")
    async with extended(gw, "life") as browser:
        said = api.text_update(ALICE, "helo wrld")["message"]
        frame = await next_message(browser)
        to_ben = await copy(api, BEN, 2)
        api.edit_update(ALICE, said["message_id"], "hello world")
        edit = await next_of(browser, "edit")
        assert (edit["id"], edit["message"], edit["sender"]["name"]) == (
            frame["id"], "hello world", "Alice")
        await wait_until(lambda: api.edited, 10, "Ben's copy was not edited")
    await settled(api)
    (edited,) = api.edited  # Ben's copy, once; Alice's own message is hers to edit
    assert (edited["chat_id"], edited["message_id"]) == (BEN, to_ben["message_id"])
    assert edited["visible_text"] == "Alice (telegram): hello world"
    (message,) = await stored(gw, "life")
    assert message["message"] == "hello world" and message["edited_at"] is not None
    (history,) = await say(api, BEN, "/history", user_id=BEN)
    assert history.endswith("Alice (telegram): hello world (edited)")


async def test_a_web_edit_edits_each_chats_copy_once(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await join_both(api, "edits")
    async with extended(gw, "edits") as browser:
        await browser.send(json.dumps({"message": "frist"}))
        frame = await next_message(browser)
        copies = {chat: (await copy(api, chat, 2))["message_id"] for chat in (ALICE, BEN)}
        await browser.send(json.dumps({"type": "edit", "id": frame["id"], "message": "first"}))
        await next_of(browser, "edit")
        await wait_until(lambda: len(api.edited) == 2, 10, "the copies were not edited")
    await settled(api)
    assert sorted((e["chat_id"], e["message_id"]) for e in api.edited) == sorted(copies.items())
    assert {e["visible_text"] for e in api.edited} == {"ann (web): first"}
    assert all(e["parse_mode"] == "HTML" for e in api.edited)
    assert len(calls_of(api, "editMessageText")) == 2


async def test_unchanged_and_too_old_copies_are_passed_over(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await join_both(api, "old")
    async with extended(gw, "old") as browser:
        await browser.send(json.dumps({"message": "then"}))
        frame = await next_message(browser)
        api.age(BEN, (await copy(api, BEN, 2))["message_id"])  # 49 hours old
        await copy(api, ALICE, 2)
        # Alice's copy answers as if it had the text already (Telegram's words for it).
        api.fail("editMessageText", status=400, retry_after=None, chat_id=ALICE,
                 description="Bad Request: message is not modified: specified new message "
                 "content and reply markup are exactly the same as a current content and "
                 "reply markup of the message")
        await browser.send(json.dumps({"type": "edit", "id": frame["id"], "message": "now"}))
        await next_of(browser, "edit")
        await browser.send(json.dumps({"message": "after"}))  # the chats go on
        await next_message(browser)
        await copy(api, ALICE, 3)
        await copy(api, BEN, 3)
    await settled(api)
    assert api.edited == []
    assert len(calls_of(api, "editMessageText")) == 2  # each tried once, never again
    log = gw.log()
    assert "Telegram refused an edit to the chat: Message can't be edited" in log
    assert log.count("Telegram refused an edit") == 1  # "not modified" is done, not refused


async def test_a_web_delete_deletes_each_chats_copy_and_staff_delete_the_original(
    api, gateway_factory
):
    gw = gateway_factory(env=tg_env(api)).start()
    gw.create_user("staff", "a-long-staff-pass-phrase", staff=True)
    cookie = gw.login("staff", "a-long-staff-pass-phrase")
    await join_both(api, "oops")
    async with extended(gw, "oops") as browser:
        await browser.send(json.dumps({"message": "x" * 4096}))  # two pieces to each chat
        frame = await next_message(browser)
        pieces = {chat: [m["message_id"] for m in (await api.wait_sent_async(chat, 3))[1:]]
                  for chat in (ALICE, BEN)}
        await browser.send(json.dumps({"type": "delete", "id": frame["id"]}))
        await next_of(browser, "delete")
        await wait_until(lambda: len(api.deleted) == 4, 10, "the copies were not deleted")
        assert sorted((d["chat_id"], d["message_id"]) for d in api.deleted) == sorted(
            (chat, m) for chat, ids in pieces.items() for m in ids)

        said = api.text_update(ALICE, "regrettable")["message"]
        own = await next_message(browser)
        to_ben = await copy(api, BEN, 4)
        async with extended(gw, "oops", name="boss",
                            additional_headers={"Cookie": cookie}) as staff:
            await staff.send(json.dumps({"type": "delete", "id": own["id"]}))
            await next_of(staff, "delete")
        await wait_until(lambda: len(api.deleted) == 6, 10, "the message stayed in a chat")
    await settled(api)
    # Ben's copy, and in Alice's private chat her original (the bot may delete it there).
    assert {(d["chat_id"], d["message_id"], d["own"]) for d in api.deleted[4:]} == {
        (BEN, to_ben["message_id"], True), (ALICE, said["message_id"], False)}
    assert len(calls_of(api, "deleteMessage")) == 6
    assert [m["deleted"] for m in await stored(gw, "oops")] == [True, True]


async def test_a_deleted_copy_telegram_cannot_delete_is_passed_over(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await join_both(api, "gone")
    async with extended(gw, "gone") as browser:
        for text in ("one", "two"):
            await browser.send(json.dumps({"message": text}))
        first, _ = await next_message(browser), await next_message(browser)
        api.age(ALICE, (await copy(api, ALICE, 2))["message_id"])
        await copy(api, BEN, 3)
        api.fail("deleteMessage", status=400, retry_after=None, chat_id=BEN,
                 description="Bad Request: message to delete not found")
        await browser.send(json.dumps({"type": "delete", "id": first["id"]}))
        await next_of(browser, "delete")
        await browser.send(json.dumps({"message": "three"}))
        await copy(api, ALICE, 4)
        await copy(api, BEN, 4)
    await settled(api)
    assert api.deleted == []
    log = gw.log()
    assert "Telegram refused a delete to the chat: Message can't be deleted" in log
    assert "Telegram refused a delete to the chat: Message to delete not found" in log


async def test_a_web_reply_reaches_telegram_as_a_reply_to_each_chats_message_after_a_restart(
    api, gateway_factory
):
    gw = gateway_factory(env=tg_env(api)).start()
    await join_both(api, "ask")
    asked = api.text_update(ALICE, "coffee?")["message"]
    to_ben = await copy(api, BEN, 2)
    await mapped(gw, BEN, to_ben)
    assert gw.terminate() == 0
    back = gateway_factory(env=tg_env(api), port=gw.port, datadir=gw.datadir).start()
    async with extended(back, "ask") as browser:
        await browser.send(json.dumps({"message": "yes", "reply_to": 1}))
        frame = await next_message(browser)
        assert frame["reply_to"]["id"] == 1 and frame["reply_to"]["excerpt"] == "coffee?"
        reply_to_ben = await copy(api, BEN, 3)
        reply_to_alice = await copy(api, ALICE, 2)
    assert reply_to_ben["reply_parameters"]["message_id"] == to_ben["message_id"]
    assert reply_to_ben["reply_to_message"]["text"] == "Alice (telegram): coffee?"
    # In the chat it came from, the reply answers the original.
    assert reply_to_alice["reply_parameters"]["message_id"] == asked["message_id"]
    assert all(r["reply_parameters"]["allow_sending_without_reply"]
               for r in (reply_to_ben, reply_to_alice))
    assert reply_to_ben["visible_text"] == "ann (web): yes"


async def test_a_telegram_reply_becomes_the_room_messages_reply(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await join_both(api, "thread")
    async with extended(gw, "thread") as browser:
        await browser.send(json.dumps({"message": "lunch at noon"}))
        asked = await next_message(browser)
        to_ben = await copy(api, BEN, 2)
        await mapped(gw, BEN, to_ben)
        api.text_update(BEN, "count me in", user_id=BEN, first_name="Ben",
                        reply_to=to_ben["message_id"])
        answer = await next_message(browser)
        assert answer["reply_to"] == {"id": asked["id"], "sender": asked["sender"],
                                      "excerpt": "lunch at noon"}
        # Replying to a message the room does not have (the bot's /join answer): plain.
        api.text_update(BEN, "and this?", user_id=BEN, first_name="Ben",
                        reply_to=(await copy(api, BEN, 1))["message_id"])
        plain = await next_message(browser)
        assert plain["message"] == "and this?" and plain["reply_to"] is None
        to_alice = await copy(api, ALICE, 3)
        await copy(api, ALICE, 4)
    assert to_alice["reply_parameters"]["message_id"] == (await copy(api, ALICE, 2))["message_id"]
    (history,) = await say(api, ALICE, "/history 2")
    assert f"Ben (telegram): ↩ #{asked['id']} count me in" in history


async def test_telegram_reactions_become_room_reactions_and_the_bot_shows_the_favourite(
    api, gateway_factory
):
    gw = gateway_factory(env=tg_env(api)).start()
    await join_both(api, "likes")
    async with extended(gw, "likes") as browser:
        said = api.text_update(ALICE, "cake in the kitchen")["message"]
        frame = await next_message(browser)
        to_ben = await copy(api, BEN, 2)
        await mapped(gw, BEN, to_ben)
        await wait_until(lambda: api.allowed_updates and
                         "message_reaction" in api.allowed_updates, 10, "not asked for")
        api.reaction_update(BEN, to_ben["message_id"], user_id=BEN, first_name="Ben",
                            new=["👍"])
        reaction = await next_of(browser, "reaction")
        assert (reaction["id"], reaction["emoji"], reaction["added"], reaction["count"]) == (
            frame["id"], "👍", True, 1)
        assert reaction["sender"]["name"] == "Ben"
        # The bot shows it on Alice's message (not on Ben's copy: Ben's own is there).
        await wait_until(lambda: api.reacted, 10, "no reaction shown to Alice")
        assert api.bot_reactions == {(ALICE, said["message_id"]): ["👍"]}

        # A heart from the page and from Telegram are one emoji; a custom one is not carried.
        await browser.send(json.dumps({"type": "react", "id": frame["id"], "emoji": "❤️"}))
        await next_of(browser, "reaction")
        api.reaction_update(BEN, to_ben["message_id"], user_id=BEN, first_name="Ben", old=["👍"],
                            new=["❤", {"type": "custom_emoji", "custom_emoji_id": "5"}])
        changes = [await next_of(browser, "reaction") for _ in range(2)]
        assert {(c["emoji"], c["added"], c["count"]) for c in changes} == {
            ("❤️", True, 2), ("👍", False, 0)}
        await wait_until(lambda: api.bot_reactions.get((BEN, to_ben["message_id"])) == ["❤"],
                         10, "Ben's copy does not show the heart")
        await wait_until(lambda: api.bot_reactions[(ALICE, said["message_id"])] == ["❤"],
                         10, "Alice's message does not show the heart")
    await settled(api)
    message = (await stored(gw, "likes"))[0]
    assert message["reactions"] == {"❤️": 2}


async def test_reactions_in_a_group_need_the_bot_to_be_an_admin(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    group = {"chat_type": "supergroup", "title": "Crew", "user_id": CAROL}
    api.set_member(GROUP, "administrator")
    await say(api, GROUP, "/join@gateway_test_bot crew", **group)
    async with extended(gw, "crew") as browser:
        said = api.text_update(GROUP, "ship it", **group)["message"]
        frame = await next_message(browser)
        api.set_member(GROUP, "member")  # no longer an admin: Telegram keeps reactions back
        api.reaction_update(GROUP, said["message_id"], user_id=CAROL, new=["🔥"])
        api.set_member(GROUP, "administrator")
        api.reaction_update(GROUP, said["message_id"], user_id=CAROL, new=["🎉"])
        reaction = await next_of(browser, "reaction")
        assert (reaction["id"], reaction["emoji"]) == (frame["id"], "🎉")
    assert len(api.withheld) == 1


async def test_a_group_that_becomes_a_supergroup_keeps_its_room_and_map(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    group = {"chat_type": "group", "title": "Crew", "user_id": CAROL, "first_name": "Carol"}
    api.set_member(GROUP, "administrator")
    await say(api, GROUP, "/join crew", **group)
    await say(api, ALICE, "/join crew")
    async with extended(gw, "crew") as browser:
        await browser.send(json.dumps({"message": "before"}))
        before = await next_message(browser)
        old_copy = await copy(api, GROUP, 2)
        await mapped(gw, GROUP, old_copy)
        api.migrate(GROUP, SUPERGROUP)
        await wait_until(lambda: "the chat moved to its new id" in gw.log(), 10, "not moved")
        await browser.send(json.dumps({"message": "after", "reply_to": before["id"]}))
        await next_message(browser)
        after = await copy(api, SUPERGROUP, 1)
        assert after["visible_text"] == "ann (web): after"
        # The old message stayed in the old group: no reply to a message the supergroup
        # does not have.
        assert "reply_parameters" not in after
        await mapped(gw, SUPERGROUP, after)
        # A reply in the supergroup to the bot's new copy is a reply in the room.
        api.text_update(SUPERGROUP, "got it", chat_type="supergroup", title="Crew",
                        user_id=CAROL, first_name="Carol", reply_to=after["message_id"])
        answer = await next_message(browser)
        assert answer["reply_to"]["excerpt"] == "after"
        # An edit of the message sent before the move cannot reach the old group: skipped.
        await browser.send(json.dumps({"type": "edit", "id": before["id"], "message": "b"}))
        await next_of(browser, "edit")
    await settled(api)
    assert [m["visible_text"] for m in api.sent_to(GROUP)] == [
        "You joined crew: its messages come here, and what you write goes there. /history "
        "shows what was said; /leave stops.", old_copy["visible_text"]]
    assert [e["chat_id"] for e in api.edited] == [ALICE]  # her copy; the group's stayed old
    members = (await asyncio.to_thread(gw.get_json, "/api/rooms/crew/"))["members"]
    assert sum(m["protocol"] == "telegram" for m in members) == 2  # the group counted once
    (who,) = await say(api, SUPERGROUP, "/who", chat_type="supergroup", title="Crew",
                       user_id=CAROL)
    assert who.startswith("In crew:")


async def test_a_message_to_a_group_that_became_a_supergroup_is_sent_there(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    group = {"chat_type": "group", "title": "Crew", "user_id": CAROL}
    api.set_member(GROUP, "administrator")
    await say(api, GROUP, "/join crew", **group)
    api.migrate(GROUP, SUPERGROUP, updates=False)  # the bot has not heard of it yet
    async with extended(gw, "crew") as browser:
        for text in ("one", "two"):
            await browser.send(json.dumps({"message": text}))
            await next_message(browser)
        moved = await api.wait_sent_async(SUPERGROUP, 2)
    await settled(api)
    assert [m["visible_text"] for m in moved] == ["ann (web): one", "ann (web): two"]
    assert len(api.sent_to(GROUP)) == 1  # the /join answer, before the move
    refused = [p for p in calls_of(api, "sendMessage") if p["chat_id"] == GROUP]
    assert len(refused) == 2  # the /join answer, then "one", which Telegram redirected


async def test_two_replicas_edit_each_chats_copy_once(api, gateway_factory, redis_server, tmp_path):
    env = tg_env(api, REDIS_URL=redis_server.url)
    a = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    b = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    await join_both(api, "duo")
    async with extended(a, "duo") as writer, extended(b, "duo", name="bo") as reader:
        await writer.send(json.dumps({"message": "draft"}))
        frame = await next_message(writer)
        await next_message(reader)
        copies = {chat: (await copy(api, chat, 2))["message_id"] for chat in (ALICE, BEN)}
        for done, text in enumerate(("draft 2", "final"), start=1):
            await writer.send(json.dumps({"type": "edit", "id": frame["id"], "message": text}))
            assert (await next_of(reader, "edit"))["message"] == text
            await wait_until(lambda n=done: len(api.edited) >= 2 * n, 10, "copies not edited")
    await settled(api, 1.5)
    assert sorted((e["chat_id"], e["message_id"], e["visible_text"]) for e in api.edited) == sorted(
        (chat, copies[chat], f"ann (web): {text}") for chat in (ALICE, BEN)
        for text in ("draft 2", "final"))
