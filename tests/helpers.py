"""Helpers shared by several test modules (the servers themselves are in tests/servers.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import websockets
from channels.testing import WebsocketCommunicator
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from playwright.sync_api import Page, expect

from tests.botapi import BotApiStandIn


@contextlib.contextmanager
def database_write_lock(gw) -> Iterator[None]:
    """Hold a gateway's SQLite write lock from another connection, as a long write would,
    until the block ends: what the gateway tries to store meanwhile waits (or fails after
    its busy timeout)."""
    db = sqlite3.connect(gw.datadir / "gateway.sqlite3", timeout=10, check_same_thread=False)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.rollback()
        db.close()


# --- WebSocket clients of a running gateway ---------------------------------------------


FAST = {"GATEWAY_RATE_LIMIT_PER_SECOND": "1000", "GATEWAY_RATE_LIMIT_BURST": "1000"}


def connect(gw, path: str, **kwargs):
    return websockets.connect(gw.ws(path), origin=gw.origin, open_timeout=10, **kwargs)


async def next_message(ws, timeout: float = 10) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == "message":
            return frame


def members(gw, room: str) -> int:
    return len(gw.get_json(f"/api/rooms/{room}/")["members"])


async def wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` (blocking calls are fine: it runs in a thread) until it holds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def collect(ws, n: int, timeout: float = 20) -> list[dict]:
    return [await next_message(ws, timeout) for _ in range(n)]


def raw_socket(gw, path: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so the TCP window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gw.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {gw.origin}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


# --- the ASGI application in-process ------------------------------------------------------


HOSTS = ["localhost", "127.0.0.1", "[::1]", "example.com"]


def chat(app, path: str, origin: str | None = "http://localhost:8000"):
    headers = [(b"host", b"localhost:8000")]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return WebsocketCommunicator(app, path, headers=headers)


async def recv(comm) -> dict:
    return json.loads(await comm.receive_from(timeout=5))


# --- the staff dashboard's socket --------------------------------------------------------


def dashboard_socket(gw, cookie: str | None):
    headers = {"Cookie": cookie} if cookie else {}
    return websockets.connect(gw.ws("/ws/dashboard/"), origin=gw.origin,
                              additional_headers=headers, open_timeout=10)


async def next_of(ws, kind: str, timeout: float = 10) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == kind:
            return frame


async def snapshot_until(ws, condition, timeout: float = 15) -> dict:
    """Read snapshots until one satisfies ``condition``; feed items accumulate."""
    feed: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await next_of(ws, "snapshot", timeout=max(0.1, deadline - loop.time()))
        feed.extend(frame["feed"])
        frame["seen_feed"] = feed
        if condition(frame):
            return frame


# --- MQTT devices and the gateway's readiness ------------------------------------------


def mqtt_env(broker, **extra: str) -> dict[str, str]:
    return {**FAST, "MQTT_ENABLED": "1", "MQTT_URL": broker.url, **extra}


def device(broker, identifier: str | None = None, **kwargs) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", broker.port, identifier=identifier, **kwargs)


def readyz(gw) -> tuple[int, dict]:
    """``/readyz``: its status code and body."""
    try:
        with urllib.request.urlopen(gw.http + "/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def mqtt_status(gw) -> dict:
    """The MQTT server's part of ``/readyz``."""
    return readyz(gw)[1]["checks"].get("mqtt", {})


def relay_status(gw, role: str) -> dict:
    """The part of ``/readyz`` of the relay of ``role`` (``mqtt-out``, ``telegram``)."""
    return readyz(gw)[1]["checks"].get(f"relay:{role}", {})


async def mqtt_ready(gw, timeout: float = 20) -> None:
    """Wait until the gateway is ready with its MQTT subscription in place (``/healthz``
    answers before it: a device publishing then could find nobody subscribed)."""
    await wait_until(lambda: readyz(gw)[0] == 200 and mqtt_status(gw).get("ready"), timeout,
                     "the gateway is not ready with MQTT")


async def gather_out(client: aiomqtt.Client, n: int, timeout: float = 10) -> list[dict]:
    """The next ``n`` messages a subscribed client receives, decoded."""
    received: list[dict] = []

    async def take() -> None:
        async for message in client.messages:
            received.append({"topic": str(message.topic), **json.loads(message.payload)})
            if len(received) == n:
                return

    await asyncio.wait_for(take(), timeout)
    return received


async def nothing_more(client: aiomqtt.Client, wait: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(anext(aiter(client.messages)), wait)
    except TimeoutError:
        return True
    return False


# --- the Telegram bot (against tests/botapi.py) ----------------------------------------


TOKEN = "123456789:AAHfake-token-for-tests_0123456789abc"


ALICE, BEN = 111, 222


def tg_env(api: BotApiStandIn, **extra: str) -> dict[str, str]:
    return {
        **FAST,
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_API_URL": api.url,
        "TELEGRAM_POLL_TIMEOUT": "5",
        "TELEGRAM_CHAT_RATE": "50",
        **extra,
    }


async def say(api: BotApiStandIn, chat_id: int, text: str, replies: int = 1, **kw) -> list[str]:
    """Send ``text`` from a chat and return the visible text of the next ``replies`` replies."""
    before = len(api.sent_to(chat_id))
    api.text_update(chat_id, text, **kw)
    if not replies:
        return []
    sent = await api.wait_sent_async(chat_id, before + replies)
    return [m["visible_text"] for m in sent[before:]]


async def stored(gw, room: str) -> list[dict]:
    return (await asyncio.to_thread(gw.get_json, f"/api/rooms/{room}/messages?after=0"))[
        "messages"
    ]


def post_update(gw, body: bytes | None, secret: str | None, method: str = "POST") -> int:
    """Call the webhook as Telegram does; the HTTP status."""
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    request = urllib.request.Request(
        gw.http + "/telegram/webhook/", data=body, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


# --- the chat page and the admin in Chromium --------------------------------------------


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def open_chat(browser, gw, room: str, name: str) -> Page:
    page = browser.new_context().new_page()
    page.goto(f"{gw.http}/chat/{room}/")
    expect(page.locator("#status")).to_have_text("connected")
    page.fill("#name", name)
    page.locator("#name").dispatch_event("change")  # reconnects under the new name
    expect(page.locator("#status")).to_have_text("connected")
    return page


def forged_chat(browser, gw, room: str, timeout: float = 10_000) -> tuple[Page, list]:
    """A chat page whose socket frames a test can forge: the page and its sockets (Playwright
    ``WebSocketRoute``s, still connected to the server; ``sockets[-1].send(...)`` is a frame
    as if the server had sent it), once connected."""
    page = browser.new_context().new_page()
    sockets: list = []

    def route(ws) -> None:
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/ws/chat/"), route)
    page.goto(f"{gw.http}/chat/{room}/")
    expect(page.locator("#status")).to_have_text("connected", timeout=timeout)
    return page, sockets


def send(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


STAFF, PASSWORD = "staff", "a-long-staff-pass-phrase"


def log_in(browser, gw, path: str, username: str = STAFF, password: str = PASSWORD) -> Page:
    """A new browser session that opens ``path`` and logs in on the way."""
    page = browser.new_context().new_page()
    page.goto(gw.http + "/accounts/login/?" + urllib.parse.urlencode({"next": path}))
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("form.login button[type=submit]")
    return page


async def until_live(scope_id: str) -> None:
    """Wait for an in-process scope to have caught up with its room (it tells nobody:
    polled on the runtime's hub)."""
    from gateway.runtime import get_runtime

    runtime = await get_runtime()
    async with asyncio.timeout(5):
        while not any(s.scope_id == scope_id and getattr(s, "live", False)  # noqa: ASYNC110
                      for s in runtime.hub.subscribers()):
            await asyncio.sleep(0.01)


# --- devices as members ------------------------------------------------------------------


def devices_of(gw, room: str) -> dict[str, dict]:
    """The room's devices by id (none while the room does not exist)."""
    try:
        listed = gw.get_json(f"/api/rooms/{room}/devices")["devices"]
    except urllib.error.HTTPError as refused:
        assert refused.code == 404
        return {}
    return {d["id"]: d for d in listed}


def history(gw, room: str) -> list[dict]:
    """A room's first page of messages, oldest first."""
    return gw.get_json(f"/api/rooms/{room}/messages?after=0")["messages"]


async def next_mqtt(client: aiomqtt.Client, timeout: float = 15) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        return await anext(aiter(client.messages))


async def thermostat(broker, name: str = "thermo1", room: str = "home",
                     **kwargs) -> aiomqtt.Client:
    """A connected device with a will (offline) that says it is online and its state,
    retained (the caller disconnects it, or kills it: ``client._client._sock.close()``)."""
    will = aiomqtt.Will(f"rooms/{room}/status/{name}", b"offline", qos=1, retain=True)
    client = device(broker, identifier=name, will=will, keepalive=5, **kwargs)
    await client.__aenter__()
    await client.publish(f"rooms/{room}/status/{name}", b"online", qos=1, retain=True)
    await client.publish(f"rooms/{room}/state/{name}", b'{"temperature": 20.5, "target": 21}',
                         qos=1, retain=True)
    return client


async def answer_commands(client: aiomqtt.Client, *, mqtt5: bool, seen: list) -> None:
    """A device that answers each command (``done: <command>``): on the 3.1.1 reply topic
    with the id, or (MQTT 5) on the response topic with the correlation data; ``seen`` gets
    (topic, command, properties) of each."""
    with contextlib.suppress(aiomqtt.MqttError):  # its connection ends with the test
        async for message in client.messages:
            command = json.loads(message.payload)
            seen.append((str(message.topic), command, message.properties))
            reply = f"done: {command['command']}"
            if mqtt5:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = message.properties.CorrelationData
                await client.publish(message.properties.ResponseTopic, reply.encode(), qos=1,
                                     properties=props)
            else:
                await client.publish(f"{message.topic}/reply", json.dumps(
                    {"id": command["id"], "reply": reply}).encode(), qos=1)
