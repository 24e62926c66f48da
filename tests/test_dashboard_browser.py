"""The staff dashboard and the admin in Chromium, with real WebSocket, MQTT (mosquitto) and
Telegram (the Bot API stand-in) traffic."""

from __future__ import annotations

import json
import subprocess

import pytest
import websockets.sync.client
from playwright.sync_api import expect

from tests.botapi import BotApiStandIn
from tests.helpers import ARTIFACTS, PASSWORD, STAFF, TOKEN, log_in, open_chat, send

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHAT = 111


def publish(broker, topic: str, payload: str) -> None:
    subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", topic,
                    "-m", payload], check=True, timeout=10)


def stored(gw, room: str) -> list[str]:
    """The texts of the room's messages that are not deleted."""
    page = gw.get_json(f"/api/rooms/{room}/messages?after=0")["messages"]
    return [m["message"] for m in page if not m["deleted"]]


def test_staff_watch_live_traffic_and_post_to_an_open_chat(browser, gateway_factory, mosquitto):
    gw = gateway_factory(env={"MQTT_ENABLED": "1", "MQTT_URL": mosquitto.url}).start()
    gw.create_user(STAFF, PASSWORD, staff=True)
    dash = log_in(browser, gw, "/dashboard/")
    expect(dash.locator("#status")).to_have_text("live")
    expect(dash.locator("#servers tr[data-part=mqtt] td").nth(2)).to_have_text("ready")

    ann = open_chat(browser, gw, "ops", "ann")
    expect(dash.locator('#tiles .tile[data-protocol="web"] .value')).to_have_text("1")
    send(ann, "hello from the web")
    publish(mosquitto, "rooms/ops/in/sensor1", "21.5 C")
    feed = dash.locator("#feed li")
    expect(feed.filter(has_text="hello from the web")).to_have_count(1)
    expect(feed.filter(has_text="21.5 C")).to_have_count(1)
    expect(dash.locator('#tiles .tile[data-protocol="mqtt"] .value')).to_have_text("1")
    expect(dash.locator("#chart rect[data-protocol=web]")).to_have_count(1)
    expect(dash.locator("#chart rect[data-protocol=mqtt]")).to_have_count(1)

    dash.fill("#post-room", "ops")
    dash.fill("#post-text", "maintenance at noon")
    dash.press("#post-text", "Enter")
    last = ann.locator("#messages li").last
    expect(last.locator(".text")).to_have_text("maintenance at noon")
    expect(last.locator(".badge")).to_have_text("system")
    expect(dash.locator("#notice")).to_have_text("Done: post")

    ARTIFACTS.mkdir(exist_ok=True)
    dash.set_viewport_size({"width": 1280, "height": 1000})
    dash.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


def test_the_dashboard_refuses_visitors_and_non_staff(browser, gateway_factory):
    gw = gateway_factory().start()
    gw.create_user("visitor", "a-long-visitor-pass-phrase", staff=False)
    page = browser.new_context().new_page()
    page.goto(gw.http + "/dashboard/")
    expect(page).to_have_url(gw.http + "/accounts/login/?next=/dashboard/")
    page.fill("#id_username", "visitor")
    page.fill("#id_password", "a-long-visitor-pass-phrase")
    page.click("form.login button[type=submit]")
    expect(page.locator("body")).to_contain_text("403")
    response = page.goto(gw.http + "/dashboard/")
    assert response is not None and response.status == 403
    assert page.locator("#dashboard").count() == 0


def test_admin_deletes_a_message_and_blocks_a_device_and_a_chat(
    browser, gateway_factory, mosquitto
):
    with BotApiStandIn(TOKEN) as api:
        gw = gateway_factory(env={
            "MQTT_ENABLED": "1", "MQTT_URL": mosquitto.url, "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_API_URL": api.url, "TELEGRAM_POLL_TIMEOUT": "5",
            "TELEGRAM_CHAT_RATE": "50",
        }).start()
        gw.create_user(STAFF, PASSWORD, staff=True)
        reader = open_chat(browser, gw, "adm", "reader")
        with websockets.sync.client.connect(gw.ws("/ws/chat/adm/?name=spammer"),
                                            origin=gw.origin) as ws:
            for text in ("keep me", "delete me"):
                ws.send(json.dumps({"message": text}))
                ws.recv(timeout=10)
        expect(reader.locator("#messages li .text")).to_have_text(["keep me", "delete me"])

        # delete a message: gone from the history API and from the open page
        admin = log_in(browser, gw, "/admin/gateway/message/?q=delete+me")
        expect(admin.locator("#result_list tbody tr")).to_have_count(1)
        admin.locator("#result_list tbody input.action-select").check()
        admin.select_option("select[name=action]", "delete_selected")
        admin.click("button[name=index]")
        admin.click("input[type=submit]")  # "Yes, I'm sure"
        expect(admin.locator("ul.messagelist")).to_contain_text("Successfully deleted 1")
        expect(reader.locator("#messages li .text")).to_have_text(["keep me"])
        assert stored(gw, "adm") == ["keep me"]

        # block a device: its next message is neither stored nor broadcast
        publish(mosquitto, "rooms/adm/in/noisy", "first")
        expect(reader.locator("#messages li .text").last).to_have_text("first")
        admin.goto(gw.http + "/admin/gateway/device/")
        row = admin.locator("#result_list tbody tr", has_text="noisy")
        expect(row).to_have_count(1)
        row.locator("input[name$=blocked]").check()
        admin.click("input[name=_save]")
        expect(admin.locator("ul.messagelist")).to_contain_text("was changed successfully")
        publish(mosquitto, "rooms/adm/in/noisy", "second")
        publish(mosquitto, "rooms/adm/in/quiet", "from another device")
        expect(reader.locator("#messages li .text").last).to_have_text("from another device")
        assert stored(gw, "adm") == ["keep me", "first", "from another device"]
        assert '"code": "blocked"' in gw.log() or "blocked" in gw.log()

        # block a Telegram chat: the bot ignores it, and it gets nothing from the room
        api.text_update(CHAT, "/join adm")
        api.wait_sent(CHAT, 1)
        admin.goto(gw.http + "/admin/gateway/botchat/")
        row = admin.locator("#result_list tbody tr", has_text=str(CHAT))
        row.locator("input[name$=blocked]").check()
        admin.click("input[name=_save]")
        expect(admin.locator("ul.messagelist")).to_contain_text("was changed successfully")
        api.text_update(CHAT, "let me in")
        send(reader, "anyone on telegram?")
        expect(reader.locator("#messages li .text").last).to_have_text("anyone on telegram?")
        reader.wait_for_timeout(1500)
        assert "let me in" not in stored(gw, "adm")
        assert len(api.sent_to(CHAT)) == 1  # only the reply to /join
        assert not api.pending_updates()  # the blocked chat's update was fetched and dropped
