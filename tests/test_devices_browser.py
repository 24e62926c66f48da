"""The room's devices on the chat page, in Chromium, against a real gateway and Mosquitto:
each device's status and last state shown live (its will too, without a reload), commands
sent from the composer (``/cmd``) and from a device's card and answered as replies, the
refusals shown, and nothing a device publishes ever runs in the page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import aiomqtt
import pytest
from playwright.sync_api import Locator, Page, expect

from tests.helpers import FAST, device, forged_chat, mqtt_env, mqtt_ready, open_chat, send

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOM = "home"
WAIT = 10_000  # ms: every wait below is bounded
THERMO_STATE = b'{"temperature": 20.5, "target": 21}'


class Devices:
    """MQTT devices (aiomqtt) on an event loop of their own thread, beside the test's sync
    Playwright (which refuses to run inside a running loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="devices", daemon=True)
        self.clients: list[aiomqtt.Client] = []
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, action: Callable[[], object]) -> None:
        """Run ``action`` on the devices' loop (where their sockets live), and wait for it."""
        async def call() -> None:
            action()
        self.run(call())

    async def connect(self, client: aiomqtt.Client) -> aiomqtt.Client:
        await client.__aenter__()
        self.clients.append(client)
        return client

    async def _close(self) -> None:
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        for client in self.clients:
            with contextlib.suppress(Exception):  # some were killed on purpose
                async with asyncio.timeout(5):
                    await client.__aexit__(None, None, None)

    def close(self) -> None:
        self.run(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def mqtt_devices() -> Iterator[Devices]:
    devices = Devices()
    try:
        yield devices
    finally:
        devices.close()


@pytest.fixture
def gateway(gateway_factory, mosquitto, mqtt_devices):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    mqtt_devices.run(mqtt_ready(gw))
    return gw


async def thermostat(devices: Devices, broker, name: str = "thermo1") -> aiomqtt.Client:
    """A device with a will (offline) that says it is online and its state, retained."""
    will = aiomqtt.Will(f"rooms/{ROOM}/status/{name}", b"offline", qos=1, retain=True)
    client = await devices.connect(device(broker, identifier=name, will=will, keepalive=5))
    await client.publish(f"rooms/{ROOM}/status/{name}", b"online", qos=1, retain=True)
    await client.publish(f"rooms/{ROOM}/state/{name}", THERMO_STATE, qos=1, retain=True)
    return client


async def answering(devices: Devices, broker, seen: list[dict]) -> None:
    """thermo1, MQTT 3.1.1: online, and answering each command on its reply topic."""
    client = await thermostat(devices, broker)
    await client.subscribe(f"rooms/{ROOM}/cmd/thermo1", qos=1)

    async def answer() -> None:
        async for message in client.messages:
            command = json.loads(message.payload)
            seen.append(command)
            reply = {"id": command["id"], "reply": f"done: {command['command']}"}
            await client.publish(f"{message.topic}/reply", json.dumps(reply).encode(), qos=1)

    asyncio.get_running_loop().create_task(answer(), name="thermo1 answers")


def card_of(page: Page, device_id: str) -> Locator:
    return page.locator(f"#devices li.device[data-device='{device_id}']")


def no_dialogs(page: Page) -> list[str]:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    return dialogs


def test_a_device_shows_its_status_and_state_live_and_its_will_without_a_reload(
    browser, gateway, mosquitto, mqtt_devices
):
    ann = open_chat(browser, gateway, ROOM, "ann")
    expect(ann.locator("#devices-section")).to_be_hidden()  # no devices yet
    ann.evaluate("() => { window.notReloaded = true; }")
    thermo = mqtt_devices.run(thermostat(mqtt_devices, mosquitto))

    card = card_of(ann, "thermo1")
    expect(card.locator(".device-status")).to_have_text("online", timeout=WAIT)
    expect(ann.locator("#devices-section")).to_be_visible()
    expect(card.locator(".device-dot")).to_have_class("device-dot online")
    expect(card.locator(".device-name")).to_have_text("thermo1")
    expect(card.locator(".device-state")).to_have_text("temperature: 20.5, target: 21")
    expect(card.locator(".device-state .state-key")).to_have_text(["temperature:", "target:"])
    when = card.locator(".device-line time")
    expect(when).to_have_text(re.compile(r"\d{1,2}:\d{2}"))
    expect(when).to_have_attribute("title", re.compile(r"^online since "))
    expect(card.locator(".device-seen")).to_have_text(re.compile(r"^last seen \S"))

    # A page that joins now has it from its first presence frame.
    bob = open_chat(browser, gateway, ROOM, "bob")
    expect(card_of(bob, "thermo1").locator(".device-state")).to_have_text(
        "temperature: 20.5, target: 21", timeout=WAIT)

    new_state = b'{"temperature": 21.5, "target": 22, "mode": "heat"}'
    mqtt_devices.run(thermo.publish(f"rooms/{ROOM}/state/thermo1", new_state, qos=1, retain=True))
    for page in (ann, bob):
        expect(card_of(page, "thermo1").locator(".device-state")).to_have_text(
            "temperature: 21.5, target: 22, mode: heat", timeout=WAIT)

    # Killed without a word: the broker publishes its will, and the pages show it.
    mqtt_devices.call(lambda: thermo._client._sock.close())  # noqa: SLF001 - a crash
    for page in (ann, bob):
        gone = card_of(page, "thermo1")
        expect(gone.locator(".device-status")).to_have_text("offline", timeout=20_000)
        expect(gone.locator(".device-dot")).to_have_class("device-dot offline")
        expect(gone.locator(".device-state")).to_have_text(  # its last state stays
            "temperature: 21.5, target: 22, mode: heat")
    assert ann.evaluate("() => window.notReloaded") is True
    expect(ann.locator("#announce")).to_have_text("thermo1 is offline")


def test_commands_from_the_composer_and_a_card_are_answered_as_replies(
    browser, gateway, mosquitto, mqtt_devices
):
    ann = open_chat(browser, gateway, ROOM, "ann")
    dialogs = no_dialogs(ann)
    seen: list[dict] = []
    mqtt_devices.run(answering(mqtt_devices, mosquitto, seen))
    card = card_of(ann, "thermo1")
    expect(card.locator(".device-status")).to_have_text("online", timeout=WAIT)

    # Typed in the composer: a command, not a message; the device's answer is its reply.
    send(ann, "/cmd thermo1 set 22")
    messages = ann.locator("#messages li")
    expect(messages.locator(".text")).to_have_text(
        ["/cmd thermo1 set 22", "done: set 22"], timeout=WAIT)
    expect(ann.locator("#text")).to_have_value("")
    answer = messages.nth(1)
    expect(answer.locator(".sender")).to_have_text("thermo1")
    expect(answer.locator(".badge")).to_have_text("mqtt")
    expect(answer.locator(".quote .quote-sender")).to_have_text("ann")
    expect(answer.locator(".quote .quote-text")).to_have_text("/cmd thermo1 set 22")

    # The card's button: a small form of its own; Enter sends, the focus goes back.
    opener = card.get_by_role("button", name="Send thermo1 a command")
    expect(opener).to_have_text("Command…")
    opener.click()
    expect(opener).to_have_attribute("aria-expanded", "true")
    field = card.get_by_role("textbox", name="Command for thermo1")
    expect(field).to_be_focused()
    field.fill("mode eco")
    field.press("Enter")
    expect(card.locator("form")).to_have_count(0)
    expect(opener).to_be_focused()
    expect(opener).to_have_attribute("aria-expanded", "false")
    expect(messages.locator(".text")).to_have_text(
        ["/cmd thermo1 set 22", "done: set 22", "/cmd thermo1 mode eco", "done: mode eco"],
        timeout=WAIT)
    expect(messages.nth(3).locator(".quote .quote-text")).to_have_text("/cmd thermo1 mode eco")
    # Escape (or Cancel) closes it unsent.
    opener.click()
    field.fill("never sent")
    field.press("Escape")
    expect(card.locator("form")).to_have_count(0)
    expect(opener).to_be_focused()
    assert [(c["command"], c["sender"]["name"]) for c in seen] == [
        ("set 22", "ann"), ("mode eco", "ann")]

    # A /cmd without a device or a command: said on the page, nothing sent, the text kept.
    notice = ann.locator("#notice")
    for typed, said in (("/cmd", "Which device?"),
                        ("/cmd thermo1   ", "What should thermo1 do?")):
        send(ann, typed)
        expect(notice).to_be_visible()
        expect(notice).to_contain_text(said)
        expect(ann.locator("#text")).to_have_value(typed)

    # A device the room does not know: the server's refusal, and the text back to fix.
    send(ann, "/cmd nosuch hello")
    expect(notice).to_have_text("no device 'nosuch' in room 'home'", timeout=WAIT)
    expect(ann.locator("#text")).to_have_value("/cmd nosuch hello")

    # Any other text is a message, as ever.
    ann.fill("#text", "")
    send(ann, "/cmdless is a message")
    expect(messages.last.locator(".text")).to_have_text("/cmdless is a message", timeout=WAIT)
    expect(messages).to_have_count(5)
    assert len(seen) == 2
    assert dialogs == []


def test_what_devices_publish_is_shown_as_text(browser, gateway, mosquitto, mqtt_devices):
    ann = open_chat(browser, gateway, ROOM, "ann")
    dialogs = no_dialogs(ann)
    markup = "<img src=x onerror=alert(1)>"

    async def publish() -> None:
        client = await mqtt_devices.connect(device(mosquitto))
        await client.publish(f"rooms/{ROOM}/state/fan1", markup.encode(), qos=1, retain=True)
        lamp = {"<b>on</b>": "<img src=y onerror=alert(2)>", "level": 3}
        await client.publish(f"rooms/{ROOM}/state/lamp1", json.dumps(lamp).encode(), qos=1,
                             retain=True)

    mqtt_devices.run(publish())
    fan = card_of(ann, "fan1")
    expect(fan.locator(".device-state")).to_have_text(markup, timeout=WAIT)
    # A state and no status: said so, with a hollow dot.
    expect(fan.locator(".device-status")).to_have_text("no status")
    expect(fan.locator(".device-dot")).to_have_class("device-dot none")
    lamp = card_of(ann, "lamp1")
    expect(lamp.locator(".device-state")).to_have_text(
        "<b>on</b>: <img src=y onerror=alert(2)>, level: 3", timeout=WAIT)
    expect(ann.locator("#devices li.device")).to_have_count(2)  # by id
    expect(ann.locator("#devices .device-name")).to_have_text(["fan1", "lamp1"])
    expect(ann.locator("#devices img")).to_have_count(0)
    expect(ann.locator("#devices b")).to_have_count(0)
    ann.wait_for_timeout(300)  # an onerror would have run by now
    assert dialogs == []


def test_forged_device_frames_keep_their_place(browser, gateway_factory):
    """Every status's dot, long and nested states, and a full list that replaces the cards
    (frames forged at the page's socket, as if the server had sent them)."""
    gw = gateway_factory(env=FAST).start()
    page, sockets = forged_chat(browser, gw, "forged", WAIT)
    expect(page.locator("#members li")).to_have_count(1, timeout=WAIT)  # its presence came

    def forged(device_id: str, status: str | None, state: object) -> dict:
        return {"id": device_id, "room": "forged", "status": status, "status_at": 1764057600.0,
                "detail": None, "state": state, "state_at": 1764057600.0, "seen_at": None}

    long_text = "x" * 5000
    listed = [forged("a1", "online", {"nested": {"deep": [1, 2]}, "ok": True}),
              forged("b2", "offline", long_text), forged("c3", "unknown", None),
              forged("d4", None, None)]
    sockets[-1].send(json.dumps({"type": "presence", "room": "forged", "devices": listed}))
    cards = page.locator("#devices li.device")
    expect(cards).to_have_count(4, timeout=WAIT)
    dots = cards.locator(".device-dot").evaluate_all("ns => ns.map((n) => n.className)")
    assert dots == [f"device-dot {s}" for s in ("online", "offline", "unknown", "none")]
    expect(cards.locator(".device-status")).to_have_text(
        ["online", "offline", "unknown", "no status"])
    expect(card_of(page, "a1").locator(".device-state")).to_have_text(
        'nested: {"deep":[1,2]}, ok: true')
    shown = card_of(page, "b2").locator(".device-state").text_content() or ""
    assert len(shown) == 300 and shown.endswith("…")
    expect(card_of(page, "c3").locator(".device-state")).to_be_hidden()
    expect(card_of(page, "a1").locator(".device-seen")).to_be_hidden()  # never seen live

    # A command being typed on a card survives its device's changes.
    card_of(page, "c3").get_by_role("button", name="Send c3 a command").click()
    field = card_of(page, "c3").get_by_role("textbox", name="Command for c3")
    field.fill("half typed")
    change = {"type": "device", "room": "forged", "change": "status",
              "device": forged("c3", "online", "warm")}
    sockets[-1].send(json.dumps(change))
    expect(card_of(page, "c3").locator(".device-status")).to_have_text("online", timeout=WAIT)
    expect(field).to_have_value("half typed")
    expect(field).to_be_focused()

    # A full list replaces the cards: gone ones go, a new one takes its place by id.
    again = [forged("a1", "online", "fine"), forged("aa", "offline", None)]
    sockets[-1].send(json.dumps({"type": "presence", "room": "forged", "devices": again}))
    expect(page.locator("#devices .device-name")).to_have_text(["a1", "aa"], timeout=WAIT)
    sockets[-1].send(json.dumps({"type": "presence", "room": "forged", "devices": []}))
    expect(page.locator("#devices-section")).to_be_hidden(timeout=WAIT)
