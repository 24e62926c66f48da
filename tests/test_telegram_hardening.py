"""The Telegram bot against odd input (issue 10): command arguments that are not ASCII
numbers, update ids the record of handled updates cannot hold, and groups whose plain text
Telegram's privacy mode keeps from the bot. The gateway's real python-telegram-bot against
the Bot API stand-in (tests/botapi.py), over real HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.botapi import BotApiStandIn
from tests.test_e2e import wait_until
from tests.test_telegram import ALICE, TOKEN, say, tg_env

pytestmark = pytest.mark.slow

HUGE = 2**63  # one past what the BigIntegerField of handled updates holds


@pytest.fixture
def api():
    with BotApiStandIn(TOKEN) as standin:
        yield standin


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

