"""The Telegram bot against odd input (issue 10): command arguments that are not ASCII
numbers, update ids the record of handled updates cannot hold, and groups whose plain text
Telegram's privacy mode keeps from the bot. The gateway's real python-telegram-bot against
the Bot API stand-in (tests/botapi.py), over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.botapi import BotApiStandIn
from tests.helpers import ALICE, BEN, TOKEN, post_update, say, stored, tg_env, wait_until

pytestmark = pytest.mark.slow

HUGE = 2**63  # one past what the BigIntegerField of handled updates holds


def telegram_status(gw) -> dict:
    """The Telegram server's status dict, as /readyz (and the dashboard) show it."""
    try:
        with urllib.request.urlopen(gw.http + "/readyz", timeout=5) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = json.loads(error.read())
    return body["checks"]["telegram"]


def update(update_id: int, text: str, chat_id: int = ALICE) -> bytes:
    message = {"message_id": 1, "date": int(time.time()), "text": text,
               "chat": {"id": chat_id, "type": "private", "first_name": "Alice"},
               "from": {"id": chat_id, "is_bot": False, "first_name": "Alice"}}
    return json.dumps({"update_id": update_id, "message": message}).encode()


async def test_command_arguments_that_are_not_ascii_numbers_get_the_usage(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join digits")
    await say(api, ALICE, "said once", replies=0)
    await wait_until(lambda: gw.get_json("/api/rooms/digits/")["last_id"] == 1, 10, "not stored")
    usage = "Usage: /history [n], n from 1 to 50"
    for argument in ["²", "٣", "１０", "⑤", "-1", "0", "51", "9" * 5000, "1e3"]:
        assert await say(api, ALICE, f"/history {argument}") == [usage], argument
    (history,) = await say(api, ALICE, "/history 1")
    assert history.endswith("Alice (telegram): said once")
    (unknown,) = await say(api, ALICE, "/" + "x" * 4000)
    assert unknown == f"Unknown command /{'x' * 64}. /help lists the commands."
    assert "gave up on update" not in gw.log() and "Traceback" not in gw.log()


async def test_the_webhook_refuses_update_ids_out_of_range_and_goes_on(api, gateway_factory):
    secret = "s3cret-Token_for-tests"
    port = gateway_factory(env={}).port  # the webhook URL names the port
    url = f"http://127.0.0.1:{port}/telegram/webhook/"
    gw = gateway_factory(
        env=tg_env(api, TELEGRAM_WEBHOOK_URL=url, TELEGRAM_WEBHOOK_SECRET=secret), port=port
    ).start()
    await wait_until(lambda: api.webhook is not None, 10, "setWebhook not called")
    call = asyncio.to_thread
    for update_id in [HUGE, 2**64, 10**400, -1, -(2**63) - 1]:
        assert await call(post_update, gw, update(update_id, "/help"), secret) == 400, update_id
    assert "refused a webhook call: update_id 9223372036854775808 is out of range" in gw.log()
    assert api.sent == []
    # Numbers Python's JSON parser refuses (over 4,300 digits) and nesting past its
    # recursion limit are bodies that are not updates, not server errors.
    digits = b'{"update_id": ' + b"9" * 5000 + b"}"
    assert await call(post_update, gw, digits, secret) == 400
    assert await call(post_update, gw, b"[" * 100_000 + b"]" * 100_000, secret) == 400
    assert await call(post_update, gw, update(HUGE - 1, "/join edge"), secret) == 200
    assert await call(post_update, gw, update(5, "hello"), secret) == 200
    await api.wait_sent_async(ALICE, 1)
    assert [m["message"] for m in await stored(gw, "edge")] == ["hello"]
    assert telegram_status(gw)["updates_refused"] == 5


async def test_polling_skips_an_update_id_out_of_range_and_confirms_past_it(
    api, gateway_factory
):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join odd")  # update 1000: polling runs
    # Telegram numbers updates upwards, so once past 2^63 it would confirm any lower one:
    # the normal update comes in the same answer (ids sorted: it is handled first).
    with api.together():
        api.text_update(ALICE, "never stored", update_id=HUGE)
        api.text_update(BEN, "/help", user_id=BEN, update_id=1001)
    (helped,) = [m["visible_text"] for m in await api.wait_sent_async(BEN, 1)]
    assert "/history [n]" in helped
    await wait_until(lambda: "skipped an update" in gw.log(), 10, "no log line")
    await wait_until(lambda: not api.pending_updates(), 10, "not confirmed past it")
    assert api.served[HUGE] == 1  # confirmed by the next poll, never fetched again
    assert "update_id 9223372036854775808 is out of range" in gw.log()
    assert "not handled; fetching them again" not in gw.log()
    assert "gave up on update" not in gw.log()
    assert await stored(gw, "odd") == []
    assert telegram_status(gw)["updates_refused"] == 1


async def test_join_in_a_group_under_privacy_mode_says_what_to_change(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    quiet, admin = -100200, -100300
    api.set_member(admin, "administrator")
    kw = {"chat_type": "supergroup", "title": "Crew", "user_id": 5}

    (told,) = await say(api, quiet, "/join crew", **kw)
    assert told.startswith("You joined crew")
    assert "plain text in this group does not reach me" in told
    assert "/setprivacy" in told and "Disable" in told and "admin" in told
    await say(api, quiet, "lost at Telegram's edge", replies=0, **kw)
    assert [u["message"]["text"] for u in api.withheld] == ["lost at Telegram's edge"]
    calls = [p for name, p in api.calls if name == "getChatMember"]
    assert [(p["chat_id"], p["user_id"]) for p in calls] == [(quiet, 4242)]

    (plain,) = await say(api, admin, "/join crew", **kw)
    assert "what you write goes there" in plain and "does not reach" not in plain
    await say(api, admin, "an admin bot hears this", replies=0, **kw)
    await wait_until(lambda: gw.get_json("/api/rooms/crew/")["last_id"] == 1, 10, "not stored")
    (private,) = await say(api, ALICE, "/join crew")
    assert "does not reach" not in private

    state = telegram_status(gw)
    assert state["group_privacy"] is True and state["groups_commands_only"] == 1
    assert "/setprivacy" in state["group_privacy_hint"]
    assert "Telegram privacy mode is on" in gw.log()


async def test_join_in_a_group_without_privacy_mode_gives_no_advice(gateway_factory):
    with BotApiStandIn(TOKEN, group_privacy=False) as api:
        gw = gateway_factory(env=tg_env(api)).start()
        kw = {"chat_type": "group", "title": "Open", "user_id": 5}
        (joined,) = await say(api, -7, "/join open", **kw)
        assert "what you write goes there" in joined
        await say(api, -7, "everyone hears this", replies=0, **kw)
        await wait_until(lambda: gw.get_json("/api/rooms/open/")["last_id"] == 1, 10, "lost")
        assert not [name for name, _ in api.calls if name == "getChatMember"]
        state = telegram_status(gw)
        assert state["group_privacy"] is False and "group_privacy_hint" not in state


@pytest.mark.browser
def test_the_dashboard_shows_the_privacy_mode(api, browser, gateway_factory):
    from playwright.sync_api import expect

    from tests.helpers import PASSWORD, STAFF, log_in

    gw = gateway_factory(env=tg_env(api)).start()
    gw.create_user(STAFF, PASSWORD, staff=True)
    dash = log_in(browser, gw, "/dashboard/")
    row = dash.locator("#servers tr[data-part=telegram]")
    expect(row).to_contain_text("group_privacy: true")
    expect(row).to_contain_text("BotFather /setprivacy")
