"""The MQTT consumers in-process: ApplicationCommunicator plays the protocol server (its
``mqtt.*`` events in, what the consumer sends out), on the in-memory layer; no broker. And
the relay's MQTT role, publishing to a stand-in for the server."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from datetime import UTC, datetime

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.db import DataError, OperationalError

from gateway import events, services
from gateway.models import Device, Message, RelayCursor
from gateway.ratelimit import TokenBucket
from gateway.relay import Relay
from gateway.runtime import get_runtime
from protocols.mqtt import consumers
from protocols.mqtt.consumers import MqttDeviceConsumer
from protocols.mqtt.relay import MqttOut

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

PREFIX = "rooms"
ALICE = events.sender(protocol="web", id="anon:alice", name="alice")
STAFF = events.sender(protocol="system", id="staff:1", name="boss")


# --- helpers -------------------------------------------------------------------------------


async def device(room: str, device_id: str) -> ApplicationCommunicator:
    comm = ApplicationCommunicator(MqttDeviceConsumer.as_asgi(), {
        "type": "mqtt", "role": "device", "room": room, "device_id": device_id,
        "prefix": PREFIX,
    })
    await comm.send_input({"type": "mqtt.connect"})
    return comm


async def disconnect(comm: ApplicationCommunicator) -> None:
    await comm.send_input({"type": "mqtt.disconnect", "reason": "shutdown"})
    await comm.wait(timeout=5)


def message(payload: bytes, ack: int, received_at: float | None = None) -> dict:
    return {"type": "mqtt.message", "payload": payload, "ack": ack,
            "received_at": time.monotonic() if received_at is None else received_at}


def handled(ack: int, stored: bool) -> dict:
    return {"type": "mqtt.handled", "ack": ack, "stored": stored}


async def refusal(comm: ApplicationCommunicator, room: str, device_id: str) -> dict:
    """The error publish the device gets; returns its JSON."""
    reply = await comm.receive_output(timeout=5)
    assert reply["type"] == "mqtt.publish"
    assert reply["topic"] == f"{PREFIX}/{room}/error/{device_id}"
    body = json.loads(reply["payload"])
    assert body["type"] == "error" and body["detail"]
    assert reply["refused"] == body["code"]
    return body


@database_sync_to_async
def stored(room: str) -> list[str]:
    return list(Message.objects.filter(room__name=room).values_list("text", flat=True))


def post(room: str, text: str, sender: events.Sender = ALICE, client_id: str | None = None):
    event, _ = services.room_message_post(room=room, text=text, sender=sender, origin="test",
                                          client_id=client_id)
    return event


# --- MqttDeviceConsumer ----------------------------------------------------------------------


async def test_a_device_message_is_stored_once_for_its_client_id(room_events):
    dev = await device("plant", "sensor-1")
    payload = json.dumps({"message": "21.5 C", "name": "Greenhouse", "client_id": "c-1"})
    await dev.send_input(message(payload.encode(), ack=1))
    assert await dev.receive_output(timeout=5) == handled(1, True)
    # The broker delivers it again (the device did not get the PUBACK): not stored twice,
    # and not refused either.
    await dev.send_input(message(payload.encode(), ack=2))
    assert await dev.receive_output(timeout=5) == handled(2, False)
    await dev.send_input(message(b"plain text", ack=3))
    assert await dev.receive_output(timeout=5) == handled(3, True)
    assert await dev.receive_nothing(timeout=0.1)

    assert [(e["id"], e["text"], e["client_id"]) for e in room_events] == [
        (1, "21.5 C", "c-1"), (2, "plain text", None)
    ]
    assert room_events[0]["sender"] == {"protocol": "mqtt", "id": "sensor-1",
                                        "name": "Greenhouse"}
    assert room_events[1]["sender"]["name"] == "sensor-1"  # no name: the device id
    assert room_events[0]["origin"].startswith("mqtt-")
    assert await stored("plant") == ["21.5 C", "plain text"]
    await disconnect(dev)


@pytest.mark.parametrize(
    ("payload", "code", "client_id"),
    [
        (b"\xff\xfe not utf-8", "invalid_utf8", None),
        (b"{not json", "invalid_json", None),
        (b"", "empty_message", None),
        (b"   ", "empty_message", None),
        (b'{"message": "", "client_id": "c-7"}', "empty_message", "c-7"),
        (b"x" * 4097, "message_too_long", None),
        (b'{"message": "hi", "colour": "red"}', "unknown_field", None),
    ],
)
async def test_a_refused_payload_gets_an_error_publish_and_is_handled_unstored(
    room_events, payload, code, client_id
):
    dev = await device("refusals", "sensor-2")
    await dev.send_input(message(payload, ack=7))
    body = await refusal(dev, "refusals", "sensor-2")
    assert body["code"] == code
    assert body.get("client_id") == client_id
    assert await dev.receive_output(timeout=5) == handled(7, False)
    assert room_events == [] and await stored("refusals") == []
    # The device's next message is taken as usual.
    await dev.send_input(message(b"fine", ack=8))
    assert await dev.receive_output(timeout=5) == handled(8, True)
    assert [e["text"] for e in room_events] == ["fine"]
    await disconnect(dev)


async def test_the_rate_limit_counts_messages_when_they_reached_the_gateway(settings, room_events):
    settings.GATEWAY = {**settings.GATEWAY, "RATE_LIMIT_BURST": 2, "RATE_LIMIT_PER_SECOND": 0.01}
    dev = await device("flood", "sensor-3")
    arrived = time.monotonic()  # all three arrived at once, whenever they are handled
    await dev.send_input(message(b"\xff", ack=1, received_at=arrived))  # refused, still counted
    assert (await refusal(dev, "flood", "sensor-3"))["code"] == "invalid_utf8"
    assert await dev.receive_output(timeout=5) == handled(1, False)
    await dev.send_input(message(b"first", ack=2, received_at=arrived))
    assert await dev.receive_output(timeout=5) == handled(2, True)
    await dev.send_input(message(b"second", ack=3, received_at=arrived))
    assert (await refusal(dev, "flood", "sensor-3"))["code"] == "rate_limited"
    assert await dev.receive_output(timeout=5) == handled(3, False)
    # One that arrived 150 s later (at 0.01/s: a token back) is taken.
    await dev.send_input(message(b"later", ack=4, received_at=arrived + 150))
    assert await dev.receive_output(timeout=5) == handled(4, True)
    assert [e["text"] for e in room_events] == ["first", "later"]
    await disconnect(dev)


async def test_error_replies_stop_after_a_burst_but_every_message_is_handled(monkeypatch):
    # The replies' bucket on a clock that does not move: no refill during the test.
    monkeypatch.setattr(consumers, "TokenBucket", functools.partial(TokenBucket, clock=lambda: 0.0))
    dev = await device("noisy", "sensor-4")
    for ack in range(consumers.ERROR_REPLY_BURST + 2):
        await dev.send_input(message(b"", ack=ack, received_at=0.0))
    outputs = []
    async with asyncio.timeout(5):
        while len([o for o in outputs if o["type"] == "mqtt.handled"]) < 12:
            outputs.append(await dev.receive_output(timeout=5))
    assert [o["ack"] for o in outputs if o["type"] == "mqtt.handled"] == list(range(12))
    assert len([o for o in outputs if o["type"] == "mqtt.publish"]) == consumers.ERROR_REPLY_BURST
    assert await dev.receive_nothing(timeout=0.1)
    await disconnect(dev)


@pytest.mark.parametrize("room_exists", [False, True])
async def test_a_blocked_device_is_refused_and_nothing_is_stored(room_exists):
    await database_sync_to_async(Device.objects.create)(
        device_id="rogue", protocol="mqtt", blocked=True, last_seen=datetime.now(tz=UTC)
    )
    if room_exists:  # the block is then checked as the message's id is taken
        await database_sync_to_async(post)("guarded", "before")
    dev = await device("guarded", "rogue")
    await dev.send_input(message(b'{"message": "let me in", "client_id": "c-1"}', ack=1))
    body = await refusal(dev, "guarded", "rogue")
    assert (body["code"], body["client_id"]) == ("blocked", "c-1")
    assert await dev.receive_output(timeout=5) == handled(1, False)
    assert await stored("guarded") == (["before"] if room_exists else [])
    await disconnect(dev)


async def test_a_database_outage_holds_the_message_unacknowledged_until_it_is_stored(
    monkeypatch, room_events
):
    monkeypatch.setattr(consumers, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(consumers, "RETRY_MAX", 0.02)
    outage = threading.Event()
    outage.set()
    attempts: list[str] = []

    real_post = services.room_messages_post

    def flaky_post(*, posts):
        attempts.extend(post.text for post in posts)
        if outage.is_set():
            raise OperationalError("database is locked")
        return real_post(posts=posts)

    monkeypatch.setattr(services, "room_messages_post", flaky_post)
    dev = await device("outage", "sensor-5")
    await dev.send_input(message(b"during", ack=1))
    await dev.send_input(message(b"behind", ack=2))
    # Not acknowledged while it cannot be stored (the broker keeps it), retried, and the
    # next message waits behind it.
    assert await dev.receive_nothing(timeout=0.3)
    assert len(attempts) >= 3 and set(attempts) == {"during"}
    outage.clear()
    assert await dev.receive_output(timeout=5) == handled(1, True)
    assert await dev.receive_output(timeout=5) == handled(2, True)
    assert [e["text"] for e in room_events] == ["during", "behind"]
    await disconnect(dev)


async def test_a_database_error_that_is_not_an_outage_is_refused_at_once(monkeypatch):
    calls = []

    def broken_post(*, posts):
        calls.extend(post.text for post in posts)
        raise DataError("value too long for the column")

    monkeypatch.setattr(services, "room_messages_post", broken_post)
    dev = await device("broken", "sensor-6")
    await dev.send_input(message(b'{"message": "x", "client_id": "c-2"}', ack=1))
    body = await refusal(dev, "broken", "sensor-6")
    assert (body["code"], body["client_id"]) == ("unavailable", "c-2")
    assert await dev.receive_output(timeout=5) == handled(1, False)
    assert calls == ["x"]  # not retried
    await disconnect(dev)


# --- the relay role to out (protocols/mqtt/relay.py) -------------------------------------------


class Broker:
    """Stands in for the MQTT server: records what the role publishes."""

    mqtt5 = False  # MQTT 3.1.1: no properties

    def __init__(self) -> None:
        self.published: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()

    async def publish(self, topic: str, payload: bytes, *, properties=None) -> None:
        assert properties is None
        self.published.put_nowait((topic, json.loads(payload)))

    async def next(self, room: str) -> dict:
        topic, body = await asyncio.wait_for(self.published.get(), 5)
        assert topic == f"{PREFIX}/{room}/out"
        return body


async def out_relay() -> tuple[Relay, Broker]:
    broker = Broker()
    relay = Relay(MqttOut(broker, prefix=PREFIX, idle_timeout=60), tick=0.05)  # type: ignore
    await relay.start()
    assert relay.leader
    return relay, broker


async def test_the_relay_publishes_each_message_and_its_changes_and_moves_past_the_rooms():
    relay, broker = await out_relay()
    event = await database_sync_to_async(post)("plant", "hello", client_id="c-1")
    assert await broker.next("plant") == {
        "type": "message", "id": 1, "room": "plant", "message": "hello", "sender": ALICE,
        "ts": event["ts"], "client_id": "c-1", "reply_to": None, "edited_at": None,
        "reactions": {}, "attachments": []}  # no origin
    await database_sync_to_async(post)("plant", "second")
    assert (await broker.next("plant"))["message"] == "second"
    # A staff delete is published in the public shape; a close is the room's own entry:
    # only the position moves past it.
    await database_sync_to_async(services.messages_delete)(messages=[("plant", 1)], by=STAFF)
    gone = await broker.next("plant")
    assert (gone["type"], gone["id"], gone["cursor"], gone["sender"]) == (
        "delete", 1, 3, dict(STAFF))
    await database_sync_to_async(services.room_close)(room="plant", by=STAFF)
    await asyncio.sleep(0.3)
    assert broker.published.empty()
    await relay.stop()
    cursor = await database_sync_to_async(RelayCursor.objects.get)(relay="mqtt-out", room="plant")
    assert cursor.last_seq == 4
    runtime = await get_runtime()
    assert runtime.hub.subscribers() == []  # it left the room


async def test_the_relay_resumes_after_its_position_without_the_deleted_text():
    relay, broker = await out_relay()
    await database_sync_to_async(post)("resume", "one")
    assert (await broker.next("resume"))["id"] == 1
    await relay.stop()
    for text in ("two", "three"):
        await database_sync_to_async(post)("resume", text)
    await database_sync_to_async(services.messages_delete)(messages=[("resume", 2)], by=STAFF)
    relay, broker = await out_relay()
    assert (await broker.next("resume"))["message"] == "three"  # never the deleted text
    assert (await broker.next("resume"))["type"] == "delete"  # what devices may have had
    await database_sync_to_async(post)("resume", "four")
    assert (await broker.next("resume"))["id"] == 5
    await asyncio.sleep(0.2)
    assert broker.published.empty()
    await relay.stop()


async def test_a_lagging_out_topic_gets_its_messages_as_they_are_now_not_their_past():
    gate = asyncio.Event()
    gate.set()

    class Stuck(Broker):  # the broker holds publishes while the gate is shut
        async def publish(self, topic: str, payload: bytes, *, properties=None) -> None:
            await gate.wait()
            await super().publish(topic, payload, properties=properties)

    broker = Stuck()
    relay = Relay(MqttOut(broker, prefix=PREFIX, idle_timeout=60), tick=0.05)  # type: ignore
    await relay.start()
    await database_sync_to_async(post)("lag", "hello")  # 1
    assert (await broker.next("lag"))["message"] == "hello"  # the relay follows the room
    gate.clear()

    def meanwhile() -> None:
        post("lag", "blocker")  # 2: in flight while the broker is stuck
        post("lag", "oops, a secret")  # 3: deleted below, before out has it
        for text in ("hello v2", "hello v3"):  # 4, 5: only the text now is published
            services.message_edit(room="lag", id=1, text=text, sender=ALICE, staff=False,
                                  origin="o")
        services.room_message_post(room="lag", text="re", sender=ALICE, origin="o",
                                   reply_to=3)  # 6: quotes the secret, deleted next
        services.message_delete(room="lag", id=3, sender=ALICE, staff=False, origin="o")  # 7

    await database_sync_to_async(meanwhile)()
    await asyncio.sleep(0.3)  # all of it in the relay's tail
    gate.set()
    out = [await broker.next("lag") for _ in range(4)]
    assert [(o["type"], o["id"], o.get("cursor")) for o in out] == [
        ("message", 2, None), ("edit", 1, 5), ("message", 6, None), ("delete", 3, 7)]
    assert out[1]["message"] == "hello v3" and out[2]["reply_to"]["excerpt"] == ""
    assert "secret" not in json.dumps(out) and "hello v2" not in json.dumps(out)
    await asyncio.sleep(0.2)
    assert broker.published.empty()
    await relay.stop()


async def test_a_device_message_reaches_the_rooms_out_topic():
    relay, broker = await out_relay()
    dev = await device("greenhouse", "sensor-7")
    await dev.send_input(message(b'{"message": "dry", "name": "Probe"}', ack=1))
    assert await dev.receive_output(timeout=5) == handled(1, True)
    body = await broker.next("greenhouse")
    assert (body["message"], body["sender"]) == (
        "dry", {"protocol": "mqtt", "id": "sensor-7", "name": "Probe"}
    )
    assert "origin" not in body
    # The device's error topic is its own; nothing reaches out for a refusal.
    await dev.send_input(message(b"", ack=2))
    assert (await refusal(dev, "greenhouse", "sensor-7"))["code"] == "empty_message"
    assert await dev.receive_output(timeout=5) == handled(2, False)
    await asyncio.sleep(0.2)
    assert broker.published.empty()
    await disconnect(dev)
    await relay.stop()
