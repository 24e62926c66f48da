"""The Bot API stand-in (tests/botapi.py), driven by the real python-telegram-bot client."""

from __future__ import annotations

import asyncio
import datetime as dtm
import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
import telegram
from telegram.error import BadRequest, Conflict, InvalidToken, NetworkError, RetryAfter, TimedOut

from tests.botapi import BotApiStandIn

# RetryAfter.retry_after is a timedelta then, instead of an int and a deprecation warning.
os.environ["PTB_TIMEDELTA"] = "true"

TOKEN = "123456:TEST-token"
CHAT = 555


@pytest.fixture
def standin():
    with BotApiStandIn(TOKEN) as api:
        yield api


@pytest.fixture
async def bot(standin):
    async with telegram.Bot(TOKEN, base_url=f"{standin.url}/bot") as client:
        yield client


def post(standin: BotApiStandIn, method: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(
        f"{standin.url}/bot{TOKEN}/{method}",
        data=body,
        headers={"Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


async def test_get_me(bot, standin):
    me = await bot.get_me()
    assert (me.id, me.username, me.is_bot) == (4242, "gateway_test_bot", True)
    assert standin.calls[0] == ("getMe", {})


async def test_offset_confirms_updates(bot, standin):
    first = standin.text_update(CHAT, "/start")
    second = standin.text_update(CHAT, "hello", update_id=2000)
    assert first["update_id"] == 1000
    updates = await bot.get_updates()
    assert [u.update_id for u in updates] == [1000, 2000]
    assert updates[0].message.text == "/start"
    assert updates[0].message.entities[0].type == "bot_command"
    assert updates[0].message.from_user.username == "alice"

    again = await bot.get_updates(offset=first["update_id"] + 1)
    assert [u.update_id for u in again] == [second["update_id"]]
    assert [u["update_id"] for u in standin.pending_updates()] == [2000]
    assert standin.push_update({"message": second["message"]})["update_id"] == 2001

    assert await bot.get_updates(offset=2002) == ()
    assert standin.pending_updates() == []


async def test_repeat_update_is_delivered_again(bot, standin):
    update = standin.text_update(CHAT, "once")
    await bot.get_updates(offset=update["update_id"] + 1)
    standin.repeat_update(update["update_id"])
    again = await bot.get_updates(offset=update["update_id"] + 1)
    assert [u.update_id for u in again] == [update["update_id"]]
    assert await bot.get_updates(offset=update["update_id"] + 1) == ()


async def test_long_poll_returns_when_an_update_arrives(bot, standin):
    threading.Timer(0.3, standin.text_update, args=(CHAT, "late")).start()
    started = time.monotonic()
    updates = await bot.get_updates(timeout=dtm.timedelta(seconds=5))
    assert [u.message.text for u in updates] == ["late"]
    assert 0.2 < time.monotonic() - started < 2


async def test_long_poll_times_out_empty(bot):
    started = time.monotonic()
    assert await bot.get_updates(timeout=dtm.timedelta(seconds=0.3)) == ()
    assert time.monotonic() - started >= 0.25


async def test_send_message_html_is_recorded(bot, standin):
    standin.text_update(-100, "hi all", chat_type="supergroup", title="Room")
    message = await bot.send_message(
        -100,
        "<b>Bob</b> &lt;3 <a href='https://x.test'>you</a>",
        parse_mode="HTML",
        disable_notification=True,
        reply_markup=telegram.ForceReply(),
    )
    assert message.text == "Bob <3 you"
    assert (message.chat.type, message.from_user.id) == ("supergroup", 4242)
    [sent] = await standin.wait_sent_async(-100, 1)
    assert sent["chat_id"] == -100
    assert sent["text"] == "<b>Bob</b> &lt;3 <a href='https://x.test'>you</a>"
    assert sent["parse_mode"] == "HTML"
    assert sent["message_id"] == message.message_id
    # form values come back with their JSON types
    assert sent["disable_notification"] is True
    assert sent["reply_markup"] == {"force_reply": True}


async def test_wait_sent_reports_what_was_sent(bot, standin):
    await bot.send_message(CHAT, "one")
    with pytest.raises(AssertionError, match="got 1: \\['one'\\]"):
        await standin.wait_sent_async(CHAT, 2, timeout=0.1)


@pytest.mark.parametrize(
    "text",
    ["<b>unclosed", "<b><i>crossed</b></i>", "<div>no</div>", "a < b", "<span>x</span>", "&nbsp;"],
)
async def test_bad_html_is_rejected(bot, standin, text):
    with pytest.raises(BadRequest, match="(?i)can't parse entities"):
        await bot.send_message(CHAT, text, parse_mode="HTML")
    assert standin.sent == []
    assert standin.calls[-1][0] == "sendMessage"


async def test_length_counts_visible_text(bot, standin):
    await bot.send_message(CHAT, "<b>" + "x" * 4096 + "</b>", parse_mode="HTML")
    with pytest.raises(BadRequest, match="(?i)message is too long"):
        await bot.send_message(CHAT, "&amp;" * 5000, parse_mode="HTML")
    with pytest.raises(BadRequest, match="(?i)message text is empty"):
        await bot.send_message(CHAT, "<b> </b>", parse_mode="HTML")
    assert len(standin.sent) == 1


async def test_injected_flood_control(bot, standin):
    standin.fail("sendMessage", status=429, retry_after=2)
    with pytest.raises(RetryAfter) as caught:
        await bot.send_message(CHAT, "first")
    assert caught.value.retry_after == dtm.timedelta(seconds=2)
    await bot.send_message(CHAT, "second")
    assert [m["text"] for m in standin.sent] == ["second"]
    assert [name for name, _ in standin.calls] == ["getMe", "sendMessage", "sendMessage"]


async def test_failure_for_one_chat_only(bot, standin):
    standin.fail("sendmessage", status=403, retry_after=None, chat_id=7, times=2)
    await bot.send_message(8, "fine")
    for _ in range(2):
        with pytest.raises(telegram.error.Forbidden, match="blocked"):
            await bot.send_message(7, "nope")
    await bot.send_message(7, "ok now")
    assert [m["text"] for m in standin.sent] == ["fine", "ok now"]


async def test_webhook_conflicts_with_get_updates(bot, standin):
    standin.text_update(CHAT, "queued")
    assert await bot.set_webhook(
        "https://example.test/hook",
        secret_token="s3cret",
        allowed_updates=["message"],
        max_connections=5,
        certificate=b"-----BEGIN CERTIFICATE-----",
    )
    hook = standin.webhook
    assert hook is not None
    assert hook["url"] == "https://example.test/hook"
    assert (hook["secret_token"], hook["max_connections"]) == ("s3cret", 5)
    assert hook["allowed_updates"] == ["message"]
    info = await bot.get_webhook_info()
    assert (info.url, info.has_custom_certificate, info.pending_update_count) == (
        "https://example.test/hook",
        True,
        1,
    )
    with pytest.raises(Conflict, match="webhook is active"):
        await bot.get_updates()

    assert await bot.delete_webhook()
    assert standin.webhook is None
    assert [u.message.text for u in await bot.get_updates()] == ["queued"]
    assert await bot.delete_webhook(drop_pending_updates=True)
    assert standin.pending_updates() == []


async def test_stop_and_start_keep_the_state(bot, standin):
    poll = asyncio.create_task(bot.get_updates(timeout=dtm.timedelta(seconds=5)))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    standin.stop()
    assert time.monotonic() - started < 1
    with pytest.raises(NetworkError):  # the long poll in progress is dropped
        await poll
    with pytest.raises((NetworkError, TimedOut)):
        await bot.send_message(CHAT, "unreachable")

    standin.text_update(CHAT, "while down")
    standin.start()
    assert [u.message.text for u in await bot.get_updates()] == ["while down"]
    await bot.send_message(CHAT, "back")
    assert [m["text"] for m in standin.sent_to(CHAT)] == ["back"]


async def test_wrong_token(standin):
    with pytest.raises(InvalidToken):
        async with telegram.Bot("999:wrong", base_url=f"{standin.url}/bot"):
            pass
    assert standin.calls == [("getMe", {})]


async def test_unknown_method(bot):
    with pytest.raises(telegram.error.EndPointNotFound):
        await bot.do_api_request("sendPigeon", api_kwargs={"chat_id": CHAT})


def test_json_and_query_string_bodies(standin):
    answer = post(
        standin,
        "SENDMESSAGE?parse_mode=HTML",
        json.dumps({"chat_id": "42", "text": "<i>json</i>"}).encode(),
        "application/json",
    )
    assert answer["ok"] and answer["result"]["text"] == "json"
    answer = post(
        standin, "sendMessage", b"chat_id=42&text=123", "application/x-www-form-urlencoded"
    )
    assert answer["result"]["text"] == "123"
    assert [(m["chat_id"], m["text"]) for m in standin.wait_sent(42, 2)] == [
        (42, "<i>json</i>"),
        (42, "123"),
    ]
    assert post(standin, "getMe", b"", "") == {"ok": True, "result": standin.me}
    with urllib.request.urlopen(f"{standin.url}/bot{TOKEN}/getMe", timeout=5) as response:
        assert json.loads(response.read())["result"]["id"] == 4242


def test_error_answers(standin):
    assert post(standin, "nothing", b"", "") == {
        "ok": False,
        "error_code": 404,
        "description": "Not Found",
    }
    standin.fail("getMe", status=502, retry_after=None, description="Bad Gateway")
    assert post(standin, "getMe", b"", "") == {
        "ok": False,
        "error_code": 502,
        "description": "Bad Gateway",
    }
    assert post(
        standin, "sendMessage", b"chat_id=1&text=%20", "application/x-www-form-urlencoded"
    ) == {
        "ok": False,
        "error_code": 400,
        "description": "Bad Request: message text is empty",
    }
    standin.fail("getMe")
    assert post(standin, "getMe", b"", "") == {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 1",
        "parameters": {"retry_after": 1},
    }


async def test_get_me_tells_the_privacy_mode(standin):
    async with telegram.Bot(TOKEN, base_url=f"{standin.url}/bot") as client:
        assert client.bot.can_read_all_group_messages is False  # Telegram's default
    standin.group_privacy = False
    async with telegram.Bot(TOKEN, base_url=f"{standin.url}/bot") as client:
        assert client.bot.can_read_all_group_messages is True
    with BotApiStandIn(TOKEN, group_privacy=False) as other:
        assert post(other, "getMe", b"", "")["result"]["can_read_all_group_messages"] is True


async def test_get_chat_member_of_the_bot_per_chat(bot, standin):
    for chat in (-1, -2, -3, -4, -5):
        standin.text_update(chat, "/start", chat_type="group", title=f"G{chat}")
    standin.set_member(-2, "administrator")
    standin.set_member(-3, "creator")
    standin.set_member(-4, "left")
    standin.set_member(-5, "kicked")
    statuses = [(await bot.get_chat_member(c, bot.id)).status for c in (-1, -2, -3, -4, -5)]
    assert statuses == ["member", "administrator", "creator", "left", "kicked"]
    admin = await bot.get_chat_member(-2, bot.id)
    assert isinstance(admin, telegram.ChatMemberAdministrator)
    assert admin.user.username == "gateway_test_bot" and admin.can_delete_messages
    other = await bot.get_chat_member(-1, 77)
    assert (other.status, other.user.id) == ("member", 77)
    with pytest.raises(BadRequest, match="(?i)chat not found"):
        await bot.get_chat_member(-999, bot.id)
    with pytest.raises(ValueError, match="unknown chat member status"):
        standin.set_member(-1, "boss")


async def test_privacy_mode_passes_a_group_only_commands_unless_the_bot_is_admin(bot, standin):
    group = {"chat_type": "supergroup", "title": "Crew"}
    standin.text_update(-10, "plain talk", **group)
    standin.text_update(-10, "/join crew", **group)
    standin.text_update(-10, "/join@gateway_test_bot crew", **group)
    standin.text_update(-10, "/join@other_bot crew", **group)
    standin.text_update(CHAT, "private talk")
    standin.set_member(-11, "administrator")
    standin.text_update(-11, "admins read everything", **group)
    withheld = [u["message"]["text"] for u in standin.withheld]
    assert withheld == ["plain talk", "/join@other_bot crew"]
    assert all("update_id" not in u for u in standin.withheld)
    texts = [u.message.text for u in await bot.get_updates()]
    assert texts == ["/join crew", "/join@gateway_test_bot crew", "private talk",
                     "admins read everything"]

    standin.group_privacy = False  # BotFather /setprivacy: Disable
    standin.text_update(-10, "now it does", **group)
    assert [u.message.text for u in await bot.get_updates(offset=1004)] == ["now it does"]
    assert len(standin.withheld) == 2


async def test_served_counts_and_updates_pushed_together_come_together(bot, standin):
    poll = asyncio.create_task(bot.get_updates(timeout=dtm.timedelta(seconds=5)))
    await asyncio.sleep(0.2)  # the long poll waits
    with standin.together():
        standin.text_update(CHAT, "odd", update_id=2**63)
        standin.text_update(CHAT, "normal", update_id=1500)
    assert [u.update_id for u in await asyncio.wait_for(poll, 5)] == [1500, 2**63]
    await bot.get_updates()
    assert standin.served == {1500: 2, 2**63: 2}
    assert await bot.get_updates(offset=2**63 + 1) == ()
    assert standin.pending_updates() == []


# --- messages live on: edits, deletes, reactions, replies, supergroups -------------------------

EDIT_UPDATES = ["message", "edited_message", "message_reaction"]


async def test_the_bot_edits_its_messages_as_telegram_allows(bot, standin):
    sent = await bot.send_message(CHAT, "<b>draft</b>", parse_mode="HTML")
    edited = await bot.edit_message_text("<b>final</b>", chat_id=CHAT,
                                         message_id=sent.message_id, parse_mode="HTML")
    assert (edited.text, edited.edit_date is not None) == ("final", True)
    assert [(e["message_id"], e["visible_text"]) for e in standin.edited] == [
        (sent.message_id, "final")]
    with pytest.raises(BadRequest, match="(?i)message is not modified: specified new message"):
        await bot.edit_message_text("<b>final</b>", chat_id=CHAT,
                                    message_id=sent.message_id, parse_mode="HTML")
    with pytest.raises(BadRequest, match="(?i)message to edit not found"):
        await bot.edit_message_text("x", chat_id=CHAT, message_id=9999)
    theirs = standin.text_update(CHAT, "mine")["message"]["message_id"]
    standin.age(CHAT, sent.message_id)  # 49 hours old
    for message_id in (theirs, sent.message_id):
        with pytest.raises(BadRequest, match="(?i)message can't be edited"):
            await bot.edit_message_text("new", chat_id=CHAT, message_id=message_id)
    assert len(standin.edited) == 1


async def test_the_bot_deletes_its_messages_and_others_where_it_may(bot, standin):
    group = {"chat_type": "supergroup", "title": "Crew"}
    own = await bot.send_message(CHAT, "oops")
    private = standin.text_update(CHAT, "mine")["message"]["message_id"]
    grouped = standin.text_update(-10, "/join crew", **group)["message"]["message_id"]
    assert await bot.delete_message(CHAT, own.message_id)
    assert await bot.delete_message(CHAT, private)  # incoming, in a private chat
    with pytest.raises(BadRequest, match="(?i)message to delete not found"):
        await bot.delete_message(CHAT, own.message_id)
    with pytest.raises(BadRequest, match="(?i)message can't be deleted"):
        await bot.delete_message(-10, grouped)  # not an admin there
    standin.set_member(-10, "administrator")
    old = await bot.send_message(-10, "ancient")
    standin.age(-10, old.message_id)
    with pytest.raises(BadRequest, match="(?i)message can't be deleted"):
        await bot.delete_message(-10, old.message_id)
    assert await bot.delete_message(-10, grouped)
    assert [(d["chat_id"], d["own"]) for d in standin.deleted] == [
        (CHAT, True), (CHAT, False), (-10, False)]


async def test_the_bot_sets_one_reaction_from_telegrams_list(bot, standin):
    sent = await bot.send_message(CHAT, "cake")
    assert await bot.set_message_reaction(CHAT, sent.message_id, "👍")
    assert standin.bot_reactions == {(CHAT, sent.message_id): ["👍"]}
    for reaction, error in (("😂", "Reaction_invalid"), (["👍", "🎉"], "Reactions_too_many"),
                            (telegram.ReactionTypeCustomEmoji("42"), "Reaction_invalid")):
        with pytest.raises(BadRequest, match=error):
            await bot.set_message_reaction(CHAT, sent.message_id, reaction)
    with pytest.raises(BadRequest, match="(?i)message to react not found"):
        await bot.set_message_reaction(CHAT, 9999, "👍")
    assert await bot.set_message_reaction(CHAT, sent.message_id, [])  # taken back
    assert standin.bot_reactions == {(CHAT, sent.message_id): []}
    assert [r["emoji"] for r in standin.reacted] == [["👍"], []]


async def test_a_reply_answers_a_message_of_the_chat_or_goes_without(bot, standin):
    asked = standin.text_update(CHAT, "coffee?")["message"]["message_id"]
    answer = await bot.send_message(CHAT, "yes", reply_parameters=telegram.ReplyParameters(
        asked, allow_sending_without_reply=True))
    assert answer.reply_to_message.text == "coffee?"
    plain = await bot.send_message(CHAT, "hm", reply_parameters=telegram.ReplyParameters(
        9999, allow_sending_without_reply=True))
    assert plain.reply_to_message is None
    with pytest.raises(BadRequest, match="(?i)message to be replied not found"):
        await bot.send_message(CHAT, "no", reply_parameters=telegram.ReplyParameters(9999))
    assert [m["reply_parameters"]["message_id"] for m in standin.sent] == [asked, 9999]
    # A user's reply carries the message it answers.
    update = standin.text_update(CHAT, "thanks", reply_to=answer.message_id)
    assert update["message"]["reply_to_message"]["text"] == "yes"


async def test_edits_and_reactions_come_as_updates_where_telegram_sends_them(bot, standin):
    said = standin.text_update(CHAT, "helo")["message"]["message_id"]
    standin.edit_update(CHAT, said, "hello")
    standin.reaction_update(CHAT, said, user_id=CHAT, new=["👍"])
    # By default Telegram leaves reactions out; asked for, they come.
    assert [u.edited_message.text for u in (await bot.get_updates())[1:]] == ["hello"]
    standin.reaction_update(CHAT, said, user_id=CHAT, old=["👍"], new=["❤"])
    updates = await bot.get_updates(offset=1003, allowed_updates=EDIT_UPDATES)
    (reaction,) = [u.message_reaction for u in updates]
    assert (reaction.message_id, reaction.old_reaction[0].emoji,
            reaction.new_reaction[0].emoji) == (said, "👍", "❤")
    # In a group only an admin bot gets reactions; privacy mode passes replies to the bot.
    group = {"chat_type": "supergroup", "title": "Crew"}
    theirs = standin.text_update(-10, "/start", **group)["message"]["message_id"]
    standin.reaction_update(-10, theirs, user_id=5, new=["🔥"])
    mine = await bot.send_message(-10, "hi all")
    standin.text_update(-10, "hi bot", reply_to=mine.message_id, **group)
    standin.edit_update(-10, theirs, "plain now")
    assert [u.get("message_reaction", u.get("edited_message", {})).get("message_id")
            for u in standin.withheld] == [theirs, theirs]
    texts = [u.message.text for u in await bot.get_updates(offset=1004)]
    assert texts == ["/start", "hi bot"]


async def test_a_group_that_becomes_a_supergroup_says_so_and_refuses_calls(bot, standin):
    standin.text_update(-10, "/start", chat_type="group", title="Crew")
    standin.set_member(-10, "administrator")
    standin.migrate(-10, -1000000000010)
    updates = (await bot.get_updates())[1:]
    assert [(u.message.chat.id, u.message.migrate_to_chat_id, u.message.migrate_from_chat_id)
            for u in updates] == [(-10, -1000000000010, None), (-1000000000010, None, -10)]
    with pytest.raises(telegram.error.ChatMigrated) as moved:
        await bot.send_message(-10, "hello?")
    assert moved.value.new_chat_id == -1000000000010
    await bot.send_message(-1000000000010, "hello!")
    member = await bot.get_chat_member(-1000000000010, bot.id)
    assert member.status == "administrator"
