"""The Server-Sent Events adapter (protocols/sse): a room's log as an event stream, read with
a real HTTP client against ``gateway run``, with messages from a browser, an MQTT device
(through Mosquitto) and a Telegram chat (the Bot API stand-in)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gateway import events
from protocols.sse.consumer import _cursor, entry_event
from tests.helpers import (
    ALICE,
    FAST,
    connect,
    device,
    mqtt_env,
    mqtt_ready,
    next_message,
    say,
    tg_env,
)


class Stream:
    """An SSE reader: the events of one ``GET``, parsed as EventSource parses them."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 10) -> dict:
        """The next event: ``{"id", "event", "data"}`` (data parsed as JSON)."""
        event: dict = {}
        while True:
            line = await asyncio.wait_for(anext(self.lines), timeout)
            if line == "":
                if "data" in event:
                    return event
                event = {}
                continue
            if line.startswith(":"):
                continue  # a comment (keepalive)
            field, _, value = line.partition(": ")
            if field == "data":
                event["data"] = json.loads(value)
            elif field in ("id", "event", "retry"):
                event[field] = value

    async def messages(self, n: int) -> list[dict]:
        return [await self.next() for _ in range(n)]


def stream(client: httpx.AsyncClient, gw, room: str, **headers: str):
    return client.stream("GET", f"{gw.http}/sse/rooms/{room}/", headers=headers,
                         timeout=httpx.Timeout(30, read=None))


@pytest.mark.slow
async def test_a_room_streams_what_every_protocol_says_and_resumes_by_its_cursor(
    gateway_factory, mosquitto, api
):
    gw = gateway_factory(env={**mqtt_env(mosquitto), **tg_env(api)}).start()
    await mqtt_ready(gw)
    async with connect(gw, "/ws/chat/mix/?name=web") as browser, \
            httpx.AsyncClient() as client:
        await browser.send(json.dumps({"message": "from the web"}))
        await next_message(browser)
        async with stream(client, gw, "mix") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            live = Stream(response)
            # a new stream starts from now: the earlier message is not replayed
            async with device(mosquitto) as sensor:
                await sensor.publish("rooms/mix/in/sensor1", b"21.5 C", qos=1)
                first = await live.next()
            await say(api, ALICE, "/join mix")
            await say(api, ALICE, "from telegram", replies=0)
            second = await live.next()
            await browser.send(json.dumps({"message": "web again"}))
            third = await live.next()
        got = [(e["id"], e["event"], e["data"]["message"], e["data"]["sender"]["protocol"])
               for e in (first, second, third)]
        assert got == [("2", "message", "21.5 C", "mqtt"),
                       ("3", "message", "from telegram", "telegram"),
                       ("4", "message", "web again", "web")]
        assert first["data"]["type"] == "message" and "origin" not in first["data"]

        # Away: staff delete the device's message, the browser says more.
        gw.manage("shell", "-c", "from gateway import services; "
                  "services.messages_delete(messages=[('mix', 2)])")
        await browser.send(json.dumps({"message": "while away"}))
        await next_message(browser)
        # Back with EventSource's header: what happened since, once and in order.
        async with stream(client, gw, "mix", **{"Last-Event-ID": "4"}) as response:
            resumed = await Stream(response).messages(2)
        assert [(e["id"], e["event"], e["data"]) for e in resumed] == [
            ("5", "deleted", {"type": "deleted", "room": "mix", "id": 2, "cursor": 5}),
            ("6", "message", resumed[1]["data"]),
        ]
        assert resumed[1]["data"]["message"] == "while away"
        # ?after= does the same for a first connection
        async with client.stream("GET", f"{gw.http}/sse/rooms/mix/?after=0",
                                 timeout=httpx.Timeout(30, read=None)) as response:
            replay = await Stream(response).messages(5)
        assert [e["id"] for e in replay] == ["1", "3", "4", "5", "6"]


@pytest.mark.slow
async def test_bad_requests_get_a_clear_error_and_the_stream_ends_when_the_room_closes(
    gateway_factory
):
    gw = gateway_factory(env=FAST).start()
    async with connect(gw, "/ws/chat/here/") as browser, httpx.AsyncClient() as client:
        await browser.send(json.dumps({"message": "hi"}))
        await next_message(browser)
        refused = [
            ("GET", "/sse/rooms/bad%20room/", {}, 400, "invalid_room"),
            ("GET", "/sse/rooms/here/", {"Last-Event-ID": "-1"}, 400, "invalid_cursor"),
            ("GET", "/sse/rooms/here/?after=x", {}, 400, "invalid_cursor"),
            ("GET", "/sse/rooms/here/", {"Origin": "http://evil.test"}, 403, "forbidden_origin"),
            ("GET", "/sse/rooms/nowhere/", {}, 404, "room_not_found"),
            ("GET", "/sse/rooms/here/", {"Host": "evil.example"}, 400, "disallowed_host"),
            ("POST", "/sse/rooms/here/", {}, 405, "method_not_allowed"),
        ]
        for method, path, headers, status, code in refused:
            response = await client.request(method, gw.http + path, headers=headers)
            assert (response.status_code, response.json()["code"]) == (status, code), path
        assert "refused an event stream" in gw.log()
        # The site's own origin is welcome (a page of the gateway's reading the stream).
        async with stream(client, gw, "here", Origin=gw.origin) as response:
            live = Stream(response)
            assert response.status_code == 200
            await browser.send(json.dumps({"message": "still served"}))
            assert (await live.next())["data"]["message"] == "still served"
            await next_message(browser)
            gw.manage("shell", "-c", "from gateway import services; "
                      "services.room_close(room='here')")
            closed = await live.next(timeout=15)  # from the log's resync: another process
            assert (closed["event"], closed["data"]["type"]) == ("closed", "closed")
            with pytest.raises(StopAsyncIteration):
                await live.next()
        # EventSource would come back: a closed room answers 410, after which it does not.
        response = await client.get(gw.http + "/sse/rooms/here/")
        assert (response.status_code, response.json()["code"]) == (410, "room_closed")
        # Reopened: a reader that was away for both resumes past them and stays.
        gw.manage("shell", "-c", "from gateway import services; "
                  "services.room_reopen(room='here')")
        async with stream(client, gw, "here", **{"Last-Event-ID": closed["id"]}) as response:
            back = Stream(response)
            assert (await back.next())["event"] == "reopened"
        async with connect(gw, "/ws/chat/here/") as again:
            await again.send(json.dumps({"message": "open again"}))
            await next_message(again)
        async with stream(client, gw, "here", **{"Last-Event-ID": "1"}) as response:
            replay = await Stream(response).messages(4)
        assert [e["event"] for e in replay] == ["message", "closed", "reopened", "message"]


@pytest.mark.slow
async def test_a_login_required_gateway_streams_only_to_the_logged_in(gateway_factory):
    gw = gateway_factory(env={**FAST, "GATEWAY_REQUIRE_LOGIN": "1"}).start()
    async with httpx.AsyncClient() as client:
        response = await client.get(gw.http + "/sse/rooms/lobby/")
    assert (response.status_code, response.json()["code"]) == (401, "login_required")


def test_cursors_and_entries_are_encoded_as_eventsource_reads_them():
    def scope(query: bytes = b"", **headers: str) -> dict:
        return {"query_string": query,
                "headers": [(k.lower().replace("_", "-").encode(), v.encode())
                            for k, v in headers.items()]}

    assert _cursor(scope()) is None
    assert _cursor(scope(b"after=7")) == 7
    assert _cursor(scope(b"after=7", Last_Event_ID="9")) == 9  # the reconnect wins
    for bad in ("-1", "1e3", "٣", "9" * 19, ""):
        with pytest.raises(ValueError):
            _cursor(scope(Last_Event_ID=bad))
    staff = events.sender(protocol="system", id="staff:1", name="boss")
    entry = events.room_entry(cursor=9, room="r", kind="delete", id=7, sender=staff, ts=1.0)
    assert entry_event(entry) == (
        b'id: 9\nevent: deleted\ndata: {"type":"deleted","room":"r","id":7,"cursor":9}\n\n'
    )
    edit = events.room_entry(cursor=10, room="r", kind="edit", id=7, sender=staff, ts=2.0,
                             text="new\ntext")
    lines = entry_event(edit).decode().split("\n")
    assert lines[:2] == ["id: 10", "event: edit"] and lines[3:] == ["", ""]  # one data line
    assert json.loads(lines[2].removeprefix("data: ")) == {
        "type": "edit", "id": 7, "room": "r", "cursor": 10, "sender": dict(staff),
        "message": "new\ntext", "edited_at": 2.0, "client_id": None}
    reaction = events.room_entry(cursor=11, room="r", kind="reaction", id=7, sender=staff,
                                 ts=3.0, emoji="🎉", added=True, count=2)
    assert entry_event(reaction).startswith(b"id: 11\nevent: reaction\ndata: {")
    assert '"emoji":"🎉","added":true,"count":2'.encode() in entry_event(reaction)
