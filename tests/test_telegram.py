"""People chatting through the Telegram bot: the gateway's real python-telegram-bot against
a local Bot API stand-in over HTTP (tests/botapi.py), with real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.helpers import (
    ALICE,
    BEN,
    TOKEN,
    connect,
    members,
    next_message,
    post_update,
    say,
    stored,
    tg_env,
    wait_until,
)

pytestmark = pytest.mark.slow

async def test_join_then_chat_both_ways_with_browsers(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    (joined,) = await say(api, ALICE, "/join lobby", first_name="Alice")
    assert "You joined lobby" in joined
    await say(api, BEN, "/join lobby", user_id=BEN, username="ben", first_name="Ben")

    async with connect(gw, "/ws/chat/lobby/?name=ann") as browser:
        await say(api, ALICE, "hello from telegram", replies=0, first_name="Alice")
        frame = await next_message(browser)
        assert frame["message"] == "hello from telegram"
        assert frame["sender"]["protocol"] == "telegram"
        assert frame["sender"]["name"] == "Alice"
        # ... reaches the other chat in the room, not the one it came from
        (relayed,) = [m["visible_text"] for m in await api.wait_sent_async(BEN, 2)][1:]
        assert relayed == "Alice (telegram): hello from telegram"

        await browser.send(json.dumps({"message": "hi <b>tg</b> & co"}))
        await next_message(browser)
        to_alice = (await api.wait_sent_async(ALICE, 2))[1]
        assert to_alice["parse_mode"] == "HTML"
        assert to_alice["text"] == "<b>ann</b> (web): hi &lt;b&gt;tg&lt;/b&gt; &amp; co"
        assert to_alice["visible_text"] == "ann (web): hi <b>tg</b> & co"
        await api.wait_sent_async(BEN, 3)

    await asyncio.sleep(1.0)  # anything more would have come by now
    assert [m["visible_text"] for m in api.sent_to(ALICE)][1:] == ["ann (web): hi <b>tg</b> & co"]
    assert len(api.sent_to(BEN)) == 3
    assert [m["message"] for m in await stored(gw, "lobby")] == [
        "hello from telegram", "hi <b>tg</b> & co",
    ]


async def test_every_command(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    (start,) = await say(api, ALICE, "/start")
    assert start.startswith("Welcome!") and "/join <room>" in start and "no room yet" in start
    (hint,) = await say(api, ALICE, "hello?")
    assert hint.startswith("Join a room first")
    (usage,) = await say(api, ALICE, "/join")
    assert usage.startswith("Usage: /join <room>")
    (bad,) = await say(api, ALICE, "/join bad room!")
    assert "invalid room name" in bad
    (unknown,) = await say(api, ALICE, "/dance")
    assert unknown == "Unknown command /dance. /help lists the commands."
    (no_history,) = await say(api, ALICE, "/history")
    assert no_history.startswith("Join a room first")

    await say(api, ALICE, "/join garden")
    async with connect(gw, "/ws/chat/garden/?name=ann") as browser:
        await browser.send(json.dumps({"message": "first"}))
        await next_message(browser)
        await api.wait_sent_async(ALICE, 7)  # the browser's message, relayed

        (renamed,) = await say(api, ALICE, "/name Alice <A>")
        assert renamed == "Others now see you as Alice <A>."
        await say(api, ALICE, "second", replies=0)
        frame = await next_message(browser)
        assert (frame["message"], frame["sender"]["name"]) == ("second", "Alice <A>")

        await wait_until(lambda: members(gw, "garden") == 2, 10, "browser not in presence")
        (who,) = await say(api, ALICE, "/who")
        assert who.splitlines()[0] == "In garden:"
        assert "• ann (web)" in who.splitlines() and "• Alice (telegram)" in who.splitlines()
        (history,) = await say(api, ALICE, "/history 2")
        lines = history.splitlines()
        assert len(lines) == 2
        assert lines[0].startswith("#1 ") and lines[0].endswith("ann (web): first")
        assert lines[1].startswith("#2 ") and lines[1].endswith("Alice <A> (telegram): second")
        (bad_n,) = await say(api, ALICE, "/history lots")
        assert bad_n.startswith("Usage: /history [n]")
        (rooms,) = await say(api, ALICE, "/rooms")
        assert "• garden: 2 (telegram 1, web 1)" in rooms.splitlines()
        (helped,) = await say(api, ALICE, "/help")
        assert "/history [n]" in helped and "You are in garden." in helped

        (left,) = await say(api, ALICE, "/leave")
        assert left == "You left garden."
        await browser.send(json.dumps({"message": "after the leave"}))
        await next_message(browser)
    (hint,) = await say(api, ALICE, "still there?")
    assert hint.startswith("Join a room first")
    assert "after the leave" not in [m["visible_text"] for m in api.sent_to(ALICE)]
    assert [m["message"] for m in await stored(gw, "garden")] == [
        "first", "second", "after the leave",
    ]


async def test_a_group_bridges_to_one_room(api, gateway_factory):
    group = -100123
    api.set_member(group, "administrator")  # privacy mode passes an admin every message
    gw = gateway_factory(env=tg_env(api)).start()
    group_kw = {"chat_type": "supergroup", "title": "Plant crew"}
    # A command for another bot in the group, and chatter before any room: no answer.
    await say(api, group, "/join@some_other_bot lobby", replies=0, user_id=5, **group_kw)
    await say(api, group, "just talking", replies=0, user_id=5, **group_kw)
    (joined,) = await say(api, group, "/join@gateway_test_bot plant", user_id=5, **group_kw)
    assert "You joined plant" in joined
    assert len(api.sent_to(group)) == 1
    async with connect(gw, "/ws/chat/plant/?name=ann") as browser:
        await say(api, group, "from Carol", replies=0, user_id=7, first_name="Carol", **group_kw)
        await say(api, group, "from Dan", replies=0, user_id=8, first_name="Dan", **group_kw)
        frames = [await next_message(browser) for _ in range(2)]
        assert [(f["sender"]["name"], f["message"]) for f in frames] == [
            ("Carol", "from Carol"), ("Dan", "from Dan"),
        ]
        assert frames[0]["sender"]["id"] != frames[1]["sender"]["id"]
        members = (await asyncio.to_thread(gw.get_json, "/api/rooms/plant/"))["members"]
        assert {"protocol": "telegram", "name": "Plant crew"}.items() <= next(
            m for m in members if m["protocol"] == "telegram"
        ).items()


async def test_html_and_texts_over_4096_characters(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api, GATEWAY_MAX_MESSAGE_LENGTH="6000")).start()
    await say(api, ALICE, "/join long")
    text = ("<script>&amp;</script> " * 250)[:5000]
    async with connect(gw, "/ws/chat/long/?name=ann") as browser:
        await browser.send(json.dumps({"message": text}))
        await next_message(browser)
    pieces = (await api.wait_sent_async(ALICE, 3))[1:]
    assert all(len(p["visible_text"]) <= 4096 for p in pieces)
    # Cut at a space, which Telegram trims from the end of a message.
    assert " ".join(p["visible_text"] for p in pieces) == "ann (web): " + text.strip()
    await asyncio.sleep(0.5)
    assert len(api.sent_to(ALICE)) == 3


async def test_flood_control_waits_for_that_chat_only_and_keeps_its_order(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join busy")
    await say(api, BEN, "/join busy")
    api.fail("sendMessage", status=429, retry_after=2, chat_id=ALICE)
    async with connect(gw, "/ws/chat/busy/?name=ann") as browser:
        started = time.monotonic()
        for i in range(3):
            await browser.send(json.dumps({"message": f"m{i}"}))
        to_ben = (await api.wait_sent_async(BEN, 4))[1:]
        to_alice = (await api.wait_sent_async(ALICE, 4))[1:]
    assert [m["visible_text"] for m in to_alice] == [f"ann (web): m{i}" for i in range(3)]
    assert [m["visible_text"] for m in to_ben] == [f"ann (web): m{i}" for i in range(3)]
    assert to_alice[0]["at"] - started >= 1.9  # Telegram's retry_after was honoured
    assert to_ben[-1]["at"] - started < 1.5  # and Ben was not held up by Alice's wait
    refused = [p for method, p in api.calls if method == "sendMessage"]
    assert len(refused) == len(api.sent) + 1  # the one 429, then each message once
    assert "Telegram flood control" in gw.log()


async def test_bot_api_down_and_back_loses_and_doubles_nothing(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join outage")
    async with connect(gw, "/ws/chat/outage/?name=ann") as browser:
        api.stop()
        for i in range(3):
            api.text_update(ALICE, f"queued {i}")  # held by "Telegram" while we are cut off
        await browser.send(json.dumps({"message": "while you were away"}))
        await next_message(browser)
        await asyncio.sleep(3)
        api.start()
        frames = [await next_message(browser, timeout=40) for _ in range(3)]
        assert [f["message"] for f in frames] == [f"queued {i}" for i in range(3)]
        relayed = (await api.wait_sent_async(ALICE, 2, timeout=40))[1:]
        assert [m["visible_text"] for m in relayed] == ["ann (web): while you were away"]
    await asyncio.sleep(1.5)
    assert len(api.sent_to(ALICE)) == 2
    assert [m["message"] for m in await stored(gw, "outage")] == [
        "while you were away", "queued 0", "queued 1", "queued 2",
    ]
    assert "polling Telegram failed" in gw.log()


async def test_a_repeated_update_is_handled_once_and_rooms_survive_a_restart(
    api, gateway_factory
):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join keep")
    update = api.text_update(ALICE, "only once")
    await wait_until(lambda: gw.get_json("/api/rooms/keep/")["last_id"] == 1, 10, "not stored")
    api.repeat_update(update["update_id"])
    api.repeat_update(update["update_id"] - 1)  # the /join, answered once
    await wait_until(lambda: not api.pending_updates(), 10, "repeat not fetched")
    await asyncio.sleep(1.0)
    assert len(api.sent_to(ALICE)) == 1
    assert gw.get_json("/api/rooms/keep/")["last_id"] == 1

    assert gw.terminate() == 0
    back = gateway_factory(env=tg_env(api), port=gw.port, datadir=gw.datadir).start()
    # The stopped process handed the lease over: the new one leads at once.
    await wait_until(lambda: "now polls Telegram" in back.log(), 3, "the lease was kept")
    async with connect(back, "/ws/chat/keep/?name=ann") as browser:
        await browser.send(json.dumps({"message": "still joined?"}))
        await next_message(browser)
        relayed = await api.wait_sent_async(ALICE, 2)
    assert relayed[1]["visible_text"] == "ann (web): still joined?"


async def test_webhook_checks_the_secret_and_handles_each_update_once(api, gateway_factory):
    secret = "s3cret-Token_for-tests"
    port = None
    gw = gateway_factory(env={})  # to learn the port the webhook URL names
    port = gw.port
    url = f"http://127.0.0.1:{port}/telegram/webhook/"
    gw = gateway_factory(
        env=tg_env(api, TELEGRAM_WEBHOOK_URL=url, TELEGRAM_WEBHOOK_SECRET=secret), port=port
    ).start()
    await wait_until(lambda: api.webhook is not None, 10, "setWebhook not called")
    assert (api.webhook["url"], api.webhook["secret_token"]) == (url, secret)

    update = json.dumps({
        "update_id": 77,
        "message": {"message_id": 1, "date": int(time.time()), "text": "/join hooked",
                    "chat": {"id": ALICE, "type": "private", "first_name": "Alice"},
                    "from": {"id": ALICE, "is_bot": False, "first_name": "Alice"},
                    "entities": [{"type": "bot_command", "offset": 0, "length": 5}]},
    }).encode()
    call = asyncio.to_thread
    assert await call(post_update, gw, update, None) == 403
    assert await call(post_update, gw, update, "wrong") == 403
    assert await call(post_update, gw, update, secret[:-1]) == 403
    assert await call(post_update, gw, b"{not json", secret) == 400
    assert await call(post_update, gw, b"\xff\xfe", secret) == 400
    assert await call(post_update, gw, b"[1, 2]", secret) == 400
    assert await call(post_update, gw, b'{"update_id": "77"}', secret) == 400
    assert api.sent == []
    assert await call(post_update, gw, update, secret) == 200
    assert "You joined hooked" in (await api.wait_sent_async(ALICE, 1))[0]["visible_text"]
    assert await call(post_update, gw, update, secret) == 200  # Telegram delivering again
    await asyncio.sleep(0.5)
    assert len(api.sent_to(ALICE)) == 1
    assert "refused a webhook call: wrong or missing secret" in gw.log()
    assert await call(post_update, gw, None, secret, "GET") == 405


async def test_the_token_never_reaches_the_logs(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api, LOG_LEVEL="DEBUG")).start()
    await say(api, ALICE, "/join secrets")
    api.stop()  # errors, with the URLs that hold the token, are logged too
    await asyncio.sleep(2)
    api.start()
    await say(api, ALICE, "/help")
    log = gw.log()
    assert TOKEN not in log and TOKEN.split(":")[1] not in log
    assert "bot<redacted>/getUpdates" in log  # httpx logged the URL; the token was masked


async def test_two_gateways_one_poller_each_message_sent_once(
    api, gateway_factory, redis_server, tmp_path
):
    env = tg_env(api, REDIS_URL=redis_server.url)
    a = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    b = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    await say(api, ALICE, "/join duo")
    await say(api, BEN, "/join duo")
    polls = "now polls Telegram"
    await wait_until(lambda: polls in a.log() or polls in b.log(), 10, "no poller")
    leader, other = (a, b) if polls in a.log() else (b, a)
    assert polls not in other.log()

    async with connect(other, "/ws/chat/duo/?name=ann") as browser:
        await browser.send(json.dumps({"message": "to both chats"}))
        await next_message(browser)
        await api.wait_sent_async(ALICE, 2)
        await api.wait_sent_async(BEN, 2)
        await asyncio.sleep(1.0)
        assert len(api.sent_to(ALICE)) == len(api.sent_to(BEN)) == 2

        leader.kill()  # SIGKILL: no handover; the lease expires
        await wait_until(lambda: polls in other.log(), 20, "no takeover")
        await say(api, ALICE, "after the takeover", replies=0)
        frame = await next_message(browser, timeout=20)
        assert frame["message"] == "after the takeover"
        relayed = (await api.wait_sent_async(BEN, 3, timeout=20))[2]
        assert relayed["visible_text"] == "Alice (telegram): after the takeover"
    await asyncio.sleep(1.0)
    assert len(api.sent_to(ALICE)) == 2 and len(api.sent_to(BEN)) == 3


async def test_a_chat_far_behind_skips_the_oldest_and_is_told(api, gateway_factory):
    gw = gateway_factory(
        env=tg_env(api, TELEGRAM_CHAT_RATE="2", TELEGRAM_CHAT_BACKLOG="5")
    ).start()
    await say(api, ALICE, "/join flood")
    await say(api, BEN, "/join flood")
    async with connect(gw, "/ws/chat/flood/?name=ann") as browser:
        for i in range(20):
            await browser.send(json.dumps({"message": f"m{i}"}))
        for _ in range(20):
            await next_message(browser)  # all stored and live for the browser
    await wait_until(
        lambda: any(m["visible_text"].endswith(": m19") for m in api.sent_to(ALICE)), 30,
        "the newest message never came",
    )
    await asyncio.sleep(1.0)
    texts = [m["visible_text"] for m in api.sent_to(ALICE)][1:]
    notices = [t for t in texts if "skipped" in t]
    assert notices and all("/history shows them" in t for t in notices)
    skipped = sum(int(t.split()[1]) for t in notices)
    relayed = [t.removeprefix("ann (web): ") for t in texts if t not in notices]
    assert len(relayed) + skipped == 20
    assert relayed[-5:] == [f"m{i}" for i in range(15, 20)]  # the newest kept, in order
    assert relayed == sorted(relayed, key=lambda t: int(t[1:]))


async def test_a_chat_that_blocked_the_bot_leaves_its_room(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join quiet")
    await say(api, BEN, "/join quiet")
    api.fail("sendMessage", status=403, retry_after=None, chat_id=BEN, times=100)
    async with connect(gw, "/ws/chat/quiet/?name=ann") as browser:
        await browser.send(json.dumps({"message": "one"}))
        await api.wait_sent_async(ALICE, 2)
        await wait_until(lambda: members(gw, "quiet") == 2, 10, "the blocked chat stayed")
        await browser.send(json.dumps({"message": "two"}))
        await api.wait_sent_async(ALICE, 3)
    await asyncio.sleep(1.0)
    tries = [p for method, p in api.calls if method == "sendMessage" and p["chat_id"] == BEN]
    assert len(tries) == 2  # the /join reply, then "one", refused; "two" was not tried
    assert "chat unreachable: it left the room" in gw.log()


async def test_idle_chat_scopes_close_and_reopen_and_only_text_is_taken(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api, TELEGRAM_IDLE_TIMEOUT="1")).start()
    await say(api, ALICE, "/join idle")
    await wait_until(lambda: "chat scope closed" in gw.log(), 10, "the idle scope stayed open")
    photo = {"message_id": 9, "date": int(time.time()), "photo": [],
             "chat": {"id": ALICE, "type": "private", "first_name": "Alice"},
             "from": {"id": ALICE, "is_bot": False, "first_name": "Alice"}}
    api.push_update({"message": photo})
    (only_text,) = [m["visible_text"] for m in (await api.wait_sent_async(ALICE, 2))[1:]]
    assert only_text == "Only text messages are passed on to the room."
    assert gw.log().count("chat scope opened") == 2
    group_photo = {**photo, "chat": {"id": -5, "type": "group", "title": "G"}}
    api.set_member(-5, "administrator")  # so that privacy mode lets the photo through
    api.push_update({"message": group_photo})  # in a group: not worth an answer
    await say(api, ALICE, "/who")
    assert api.sent_to(-5) == []
    assert gw.get_json("/api/rooms/idle/")["last_id"] == 0
