"""A room's policy changed through the HTTP API with a manage key takes effect, live, on the
open connections of every protocol, through a running gateway: a browser's socket (v=2),
an MQTT device through a real Mosquitto, a Telegram chat through the Bot API stand-in."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from tests.botapi import BotApiStandIn
from tests.helpers import (
    ALICE,
    connect,
    device,
    gather_out,
    mqtt_env,
    mqtt_ready,
    next_message,
    next_of,
    nothing_more,
    say,
    tg_env,
)

pytestmark = pytest.mark.slow


def call(gw, method: str, path: str, key: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        gw.http + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def texts_sent(api: BotApiStandIn, chat_id: int) -> list[str]:
    return [message["visible_text"] for message in api.sent_to(chat_id)]


async def test_policy_changes_reach_every_protocol_live(gateway_factory, mosquitto, api):
    gw = gateway_factory(env={**mqtt_env(mosquitto), **tg_env(api)}).start()
    await mqtt_ready(gw)
    key = gw.manage("apikey", "create", "--name", "ops", "--scopes",
                    "read,post,manage").strip().splitlines()[-1]
    await say(api, ALICE, "/join plant")
    async with connect(gw, "/ws/chat/plant/?v=2&name=ann") as page, \
            device(mosquitto, "watcher") as watcher, device(mosquitto, "sensor1") as sensor:
        await watcher.subscribe("rooms/plant/out", qos=1)
        await sensor.subscribe("rooms/plant/error/sensor1", qos=1)
        await page.send(json.dumps({"message": "before"}))
        await next_message(page)
        assert (await gather_out(watcher, 1))[0]["message"] == "before"
        await api.wait_sent_async(ALICE, 2)  # the join's answer, then "ann (web): before"
        assert texts_sent(api, ALICE)[-1] == "ann (web): before"

        # Devices may no longer post, the room no longer reaches Telegram, and MQTT shows
        # other protocols' senders its own way.
        changed = call(gw, "PATCH", "/api/rooms/plant/", key, {"policy": {
            "post": ["web", "api", "telegram"], "receive": ["web", "sse", "mqtt"],
            "name_format": {"mqtt": "{name}@{protocol}"}}})
        assert changed["policy"]["receive"] == ["mqtt", "sse", "web"]
        frame = await next_of(page, "policy")
        assert frame["policy"]["post"] == ["api", "telegram", "web"]

        await sensor.publish("rooms/plant/in/sensor1", b"21.5", qos=1)
        refused = (await gather_out(sensor, 1))[0]
        assert (refused["topic"], refused["code"]) == ("rooms/plant/error/sensor1", "read_only")

        await page.send(json.dumps({"message": "after"}))
        await next_message(page)
        out = (await gather_out(watcher, 1))[0]
        assert (out["message"], out["sender"]["name"]) == ("after", "ann@web")
        await say(api, ALICE, "written in telegram", replies=0)  # Telegram may still post
        assert (await next_message(page))["message"] == "written in telegram"
        from_telegram = (await gather_out(watcher, 1))[0]
        assert from_telegram["sender"]["name"].endswith("@telegram")
        await asyncio.sleep(1.5)  # the relay would have sent it by now
        assert "ann (web): after" not in texts_sent(api, ALICE)

        # It reaches Telegram again: from there on, not with what it missed.
        call(gw, "PATCH", "/api/rooms/plant/", key, {"policy": {"receive": None}})
        await next_of(page, "policy")
        await page.send(json.dumps({"message": "again"}))
        await next_message(page)
        sent = await api.wait_sent_async(ALICE, 3)
        assert sent[-1]["visible_text"] == "ann (web): again"
        assert (await gather_out(watcher, 1))[0]["message"] == "again"
        assert "ann (web): after" not in texts_sent(api, ALICE)

        # The web may no longer post: the page is told, and nothing is stored.
        call(gw, "PATCH", "/api/rooms/plant/", key, {"policy": {"post": ["api"]}})
        await next_of(page, "policy")
        await page.send(json.dumps({"message": "web is read-only", "client_id": "c9"}))
        error = await next_of(page, "error")
        assert (error["code"], error["client_id"]) == ("read_only", "c9")
        assert await nothing_more(watcher, 0.5)

        # And the room stops reaching web pages: the open one is closed with 4403.
        call(gw, "PATCH", "/api/rooms/plant/", key, {"policy": {"receive": ["mqtt"]}})
        with pytest.raises(Exception) as closed:  # websockets' ConnectionClosed
            while True:
                await asyncio.wait_for(page.recv(), 10)
        assert closed.value.rcvd.code == 4403
    history = call(gw, "GET", "/api/rooms/plant/messages?after=0", key)["messages"]
    assert [m["message"] for m in history] == ["before", "after", "written in telegram", "again"]
