"""Devices' files over MQTT (``<prefix>/<room>/in/<device>/file``): the topic, its MQTT 5
properties, the broker rules (the embedded broker's and deploy/mosquitto's ACL), the consumer
in-process, and end to end through a real Mosquitto (3.1.1 and MQTT 5), the deploy ACL and
the embedded broker: the room's ``out`` carries the message with its attachments' signed URLs
(never the bytes), the URL serves the same bytes, and a refused file answers on the device's
error topic while everything else goes on."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import aiomqtt
import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from PIL import Image

from gateway import files
from gateway.adapters import RunRefused
from gateway.errors import GatewayError
from gateway.models import Attachment, Message
from protocols.mqtt import consumers, wire
from protocols.mqtt.broker_auth import ANONYMOUS, GATEWAY, BrokerPolicy, Client, topic_matches
from protocols.mqtt.server import BrokerAddress, MqttServer
from tests.helpers import (
    FAST,
    database_write_lock,
    device,
    mqtt_env,
    mqtt_ready,
    mqtt_status,
    wait_until,
)
from tests.servers import ROOT, free_port
from tests.test_mqtt import secured_mosquitto
from tests.test_mqtt_consumers import device as device_scope
from tests.test_mqtt_consumers import disconnect, handled, refusal

PREFIX = "rooms"


def in_process(test):
    """A consumer test: ApplicationCommunicator plays the protocol server, on the in-memory
    layer, with a database its threads share."""
    return pytest.mark.django_db(transaction=True)(
        pytest.mark.usefixtures("runtime_stopped")(test))


def png(width: int = 160, height: int = 120) -> bytes:
    """A camera-like snapshot: noise, so it does not compress to nothing."""
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def zipped() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("readme.txt", "not an image")
    return out.getvalue()


SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b"<script>alert(1)</script></svg>")


# --- the topic and its properties (unit) -----------------------------------------------------


@pytest.mark.parametrize(("topic", "room", "device_id", "file"), [
    ("rooms/yard/in/cam1/file", "yard", "cam1", True),
    ("rooms/yard/in/cam1", "yard", "cam1", False),
    ("rooms/yard/in/file", "yard", "file", False),  # a device may be called "file"
    ("rooms/yard/in/file/file", "yard", "file", True),
])
def test_inbound_topics_are_parsed_with_their_kind(topic, room, device_id, file):
    assert wire.in_topic_parse(PREFIX, topic) == wire.InTopic(room, device_id, file)


@pytest.mark.parametrize(("topic", "code"), [
    ("rooms/yard/in/cam1/files", "invalid_topic"),
    ("rooms/yard/in/cam1/file/more", "invalid_topic"),
    ("rooms/yard/in/cam1/", "invalid_topic"),
    ("rooms/yard/out/cam1/file", "invalid_topic"),
    ("other/yard/in/cam1/file", "invalid_topic"),
    ("rooms/bad room/in/cam1/file", "invalid_room"),
    ("rooms/yard/in/bad$cam/file", "invalid_device"),
])
def test_other_topics_are_refused(topic, code):
    with pytest.raises(GatewayError) as refused:
        wire.in_topic_parse(PREFIX, topic)
    assert refused.value.code == code


def test_the_server_subscribes_to_messages_and_files_shared_or_not():
    def server(group: str) -> MqttServer:
        return MqttServer(None, address=BrokerAddress(host="127.0.0.1", port=1), prefix="p",
                          client_id="unit", idle_timeout=60, shared_group=group)

    devices = ["p/+/status/+", "p/+/state/+"]  # never shared: retained ones reach each
    assert server("").in_filters == ["p/+/in/+", "p/+/in/+/file", "p/+/cmd/+/reply", *devices]
    assert server("gw").in_filters == ["$share/gw/p/+/in/+", "$share/gw/p/+/in/+/file",
                                       "$share/gw/p/+/cmd/+/reply", *devices]
    topics = ("p/r/in/d", "p/r/in/d/file", "p/r/cmd/d/reply", "p/r/status/d", "p/r/state/d")
    for item in server("").in_filters:  # each topic matches exactly one filter
        assert [topic_matches(item, t) for t in topics].count(True) == 1


class Subscriber:
    """Stands in for aiomqtt's client: answers a SUBSCRIBE with ``codes``."""

    def __init__(self, *codes: int) -> None:
        self.codes, self.asked = codes, []

    async def subscribe(self, topics):
        self.asked.append(topics)
        return [ReasonCode(PacketTypes.SUBACK, identifier=code) for code in self.codes]


async def test_a_filter_the_broker_refuses_is_logged_and_the_others_serve(caplog):
    server = MqttServer(None, address=BrokerAddress(host="127.0.0.1", port=1), prefix="p",
                        client_id="unit", idle_timeout=60)
    granted = Subscriber(1, 1, 1, 1, 1)
    await server._subscribe(granted)  # type: ignore[arg-type]
    assert granted.asked == [[(item, 1) for item in server.in_filters]]
    assert "refused the subscription" not in caplog.text
    await server._subscribe(Subscriber(1, 0x87, 1, 1, 1))  # type: ignore[arg-type]
    assert "refused the subscription to p/+/in/+/file (code 0x87)" in caplog.text
    assert "p/+/in/+ " not in caplog.text


def test_mqtt_protocol_is_3_1_1_or_5():
    from protocols.mqtt.adapter import _protocol

    assert _protocol("3.1.1") == aiomqtt.ProtocolVersion.V311
    assert _protocol("5") == aiomqtt.ProtocolVersion.V5
    for wrong in ("4", "5.0", "3.1", ""):
        with pytest.raises(RunRefused):
            _protocol(wrong)


def publish_properties(content_type: str | None, *pairs: tuple[str, str]) -> Properties:
    """MQTT 5 PUBLISH properties as they come off the wire: packed, then read back by paho."""
    sent = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        sent.ContentType = content_type
    if pairs:
        sent.UserProperty = list(pairs)
    received = Properties(PacketTypes.PUBLISH)
    received.unpack(sent.pack())
    return received


def test_a_files_properties_are_read_from_mqtt5():
    props = publish_properties("image/png", ("filename", "door.png"), ("message", "Front door"),
                               ("client_id", "snap-1"), ("reply_to", "12"), ("trace", "x"))
    content_type, user = wire.message_properties(props)
    assert content_type == "image/png"
    assert user == (("filename", "door.png"), ("message", "Front door"),
                    ("client_id", "snap-1"), ("reply_to", "12"), ("trace", "x"))
    assert wire.file_decode(content_type, user) == wire.DeviceFile(
        name="door.png", content_type="image/png", caption="Front door", client_id="snap-1",
        reply_to=12)
    # MQTT 3.1.1 (no properties), and MQTT 5 without any: nothing declared.
    assert wire.message_properties(None) == (None, ())
    assert wire.message_properties(publish_properties(None)) == (None, ())
    assert wire.file_decode(None, ()) == wire.DeviceFile()


@pytest.mark.parametrize(("pairs", "expected"), [
    ((("name", "a.jpg"),), {"name": "a.jpg"}),
    ((("name", "a.jpg"), ("filename", "b.jpg")), {"name": "b.jpg"}),  # filename first
    ((("filename", "b.jpg"), ("filename", "c.jpg")), {"name": "b.jpg"}),  # its first value
    ((("reply_to", "007"),), {"reply_to": 7}),
    ((("reply_to", "seven"),), {"reply_to": "seven"}),  # left for the service to refuse
    ((("reply_to", "1" * 25),), {"reply_to": "1" * 25}),
    ((("message", ""),), {"caption": ""}),
    ((("Filename", "x.png"), ("colour", "red")), {}),  # unknown keys: ignored
])
def test_user_properties_are_decoded(pairs, expected):
    assert wire.file_decode("", pairs) == wire.DeviceFile(**expected)


# --- the broker rules (unit): the embedded broker and deploy/mosquitto's ACL agree ------------


def policy() -> BrokerPolicy:
    return BrokerPolicy(prefix=PREFIX, gateway_client_id="gw-1", gateway_password="pw")


@pytest.mark.parametrize(("topic", "gateway", "sensor1", "anonymous"), [
    ("rooms/yard/in/sensor1/file", False, True, True),
    ("rooms/yard/in/sensor2/file", False, False, True),
    ("rooms/yard/in/sensor1/file/x", False, False, False),
    ("rooms/yard/in/sensor1/files", False, False, False),
    ("rooms/yard/in/+/file", False, False, False),
])
def test_a_device_publishes_files_only_as_itself(topic, gateway, sensor1, anonymous):
    rules = policy()
    assert rules.may_publish(GATEWAY, topic) is gateway
    assert rules.may_publish(Client("device", "sensor1"), topic) is sensor1
    assert rules.may_publish(ANONYMOUS, topic) is anonymous


def test_files_go_to_the_gateways_client_as_messages_do():
    rules = policy()
    assert rules.is_device_topic("rooms/yard/in/sensor1/file")
    assert rules.is_device_topic("rooms/yard/in/sensor1")
    for topic in ("rooms/yard/in/sensor1/file/x", "rooms/yard/in/sensor1/files",
                  "rooms/yard/out", "rooms/yard/in"):
        assert not rules.is_device_topic(topic), topic


def acl_rules() -> tuple[list[str], list[str], list[str]]:
    """deploy/mosquitto/acl: the gateway user's read and write topics, and the devices'
    write patterns (``%u``: the user name)."""
    reads, writes, patterns, user = [], [], [], None
    for line in (ROOT / "deploy" / "mosquitto" / "acl").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
        elif words[:2] == ["topic", "read"] and user == "gateway":
            reads.append(words[2])
        elif words[:2] == ["topic", "write"] and user == "gateway":
            writes.append(words[2])
        elif words[:2] == ["pattern", "write"]:
            patterns.append(words[2])
    return reads, writes, patterns


TOPICS = ["rooms/yard/in/sensor1", "rooms/yard/in/sensor1/file", "rooms/yard/in/sensor2",
          "rooms/yard/in/sensor2/file", "rooms/yard/in/sensor1/file/x", "rooms/yard/out",
          "rooms/yard/error/sensor1", "rooms/yard/in/sensor1/other"]


def test_the_deploy_acl_and_the_embedded_broker_allow_the_same_publishes():
    reads, writes, patterns = acl_rules()
    rules = policy()
    for topic in TOPICS:
        by_acl = any(topic_matches(p.replace("%u", "sensor1"), topic) for p in patterns)
        assert by_acl is rules.may_publish(Client("device", "sensor1"), topic), topic
        assert any(topic_matches(p, topic) for p in writes) is rules.may_publish(GATEWAY, topic)
    # The gateway's user reads what its client subscribes to: messages and files.
    server = MqttServer(None, address=BrokerAddress(host="127.0.0.1", port=1), prefix=PREFIX,
                        client_id="unit", idle_timeout=60)
    assert sorted(reads) == sorted(server.in_filters)


# --- the consumer in-process ------------------------------------------------------------------


def file_event(data: bytes, ack: int, content_type: str | None = None,
               *pairs: tuple[str, str]) -> dict:
    return {"type": "mqtt.file", "payload": data, "ack": ack, "received_at": time.monotonic(),
            "content_type": content_type, "user_properties": tuple(pairs)}


@database_sync_to_async
def attachments_by_state() -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in Attachment.objects.values_list("state", flat=True):
        counts[state] = counts.get(state, 0) + 1
    return counts


def files_in(folder: Path) -> list[Path]:
    return [item for item in folder.rglob("*") if item.is_file()]


async def attachments_become(expected: dict[str, int], folder: Path, kept: int,
                             timeout: float = 5) -> None:
    """Wait for the attachment rows to be ``expected`` and the storage to hold ``kept``
    files (a file let go is removed by a sweep after its message was refused)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await attachments_by_state()
        on_disk = await asyncio.to_thread(files_in, folder)
        if rows == expected and len(on_disk) == kept:
            return
        assert time.monotonic() < deadline, (rows, on_disk)
        await asyncio.sleep(0.05)


@database_sync_to_async
def stored_file(key: str) -> bytes:
    return files.attachment_read(key)


@in_process
async def test_a_file_is_kept_and_posted_with_its_caption_in_a_file_thread(
    room_events, monkeypatch, attachment_storage
):
    threads: list[str] = []
    real_store = files.attachments_store

    def store(**kwargs):
        threads.append(threading.current_thread().name)
        return real_store(**kwargs)

    monkeypatch.setattr(files, "attachments_store", store)
    snapshot = png()
    cam = await device_scope("yard", "cam1")
    await cam.send_input(file_event(snapshot, 1, "image/png", ("filename", "door.png"),
                                    ("message", "Front door"), ("client_id", "snap-1")))
    assert await cam.receive_output(timeout=10) == handled(1, True)
    # Pillow and the storage ran in one of the file threads: not the loop, not the
    # database thread.
    assert len(threads) == 1 and threads[0].startswith("mqtt-files")
    [event] = room_events
    assert (event["text"], event["client_id"], event["sender"]) == (
        "Front door", "snap-1", {"protocol": "mqtt", "id": "cam1", "name": "cam1"})
    [attachment] = event["attachments"]
    assert (attachment["name"], attachment["type"], attachment["size"]) == (
        "door.png", "image/png", len(snapshot))
    assert (attachment["width"], attachment["height"], attachment["thumbnail"]) == (160, 120, True)
    assert await stored_file(attachment["id"]) == snapshot
    assert await attachments_by_state() == {Attachment.ATTACHED: 1}
    # Sent again (the broker delivers it again): stored once, the second copy let go.
    await cam.send_input(file_event(snapshot, 2, "image/png", ("client_id", "snap-1")))
    assert await cam.receive_output(timeout=10) == handled(2, False)
    assert len(room_events) == 1
    # The file and its thumbnail, once.
    await attachments_become({Attachment.ATTACHED: 1}, attachment_storage, kept=2)
    await disconnect(cam)


@in_process
async def test_without_properties_the_name_is_made_and_the_type_read_from_the_bytes(
    room_events
):
    cam = await device_scope("yard", "cam2")
    await cam.send_input(file_event(png(40, 30), 1))  # as over MQTT 3.1.1
    assert await cam.receive_output(timeout=10) == handled(1, True)
    [event] = room_events
    [attachment] = event["attachments"]
    assert event["text"] == "" and event["client_id"] is None
    assert attachment["type"] == "image/png"
    assert re.fullmatch(r"file-[A-Za-z0-9_-]{8}\.png", attachment["name"]), attachment["name"]
    # A declared type is a hint: a PNG said to be a JPEG is kept as the PNG it is.
    await cam.send_input(file_event(png(40, 30), 2, "image/jpeg", ("filename", "x.jpg")))
    assert await cam.receive_output(timeout=10) == handled(2, True)
    assert room_events[1]["attachments"][0]["type"] == "image/png"
    assert room_events[1]["attachments"][0]["name"] == "x.jpg.png"
    await disconnect(cam)


@pytest.mark.parametrize(("data", "pairs", "code"), [
    (zipped(), (), "unsupported_type"),
    (SVG, (("filename", "logo.svg"),), "unsupported_type"),
    (b"", (), "empty_file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, (), "invalid_image"),
    (png(20, 20), (("reply_to", "seven"),), "invalid_reply_to"),
    (png(20, 20), (("reply_to", "99"),), "not_found"),
])
@in_process
async def test_a_refused_file_is_answered_on_the_error_topic_and_nothing_is_kept(
    room_events, attachment_storage, data, pairs, code
):
    cam = await device_scope("yard", "cam3")
    await cam.send_input(file_event(data, 1, None, *pairs, ("client_id", "c-9")))
    body = await refusal(cam, "yard", "cam3")
    assert (body["code"], body["client_id"]) == (code, "c-9")
    assert await cam.receive_output(timeout=5) == handled(1, False)
    assert room_events == []
    # A file kept before its message was refused is let go (removed from the storage).
    await attachments_become({}, attachment_storage, kept=0)
    # The device's next message is taken as usual.
    await cam.send_input({"type": "mqtt.message", "payload": b"still here", "ack": 2,
                          "received_at": time.monotonic()})
    assert await cam.receive_output(timeout=5) == handled(2, True)
    assert [e["text"] for e in room_events] == ["still here"]
    await disconnect(cam)


@in_process
async def test_a_file_over_the_size_limit_is_refused(settings, room_events):
    settings.GATEWAY = {**settings.GATEWAY, "FILE_MAX_BYTES": 1024}
    cam = await device_scope("yard", "cam4")
    await cam.send_input(file_event(png(), 1))
    assert (await refusal(cam, "yard", "cam4"))["code"] == "file_too_large"
    assert await cam.receive_output(timeout=5) == handled(1, False)
    assert room_events == []
    await disconnect(cam)


@in_process
async def test_a_database_outage_holds_the_file_unacknowledged_until_it_is_kept(
    monkeypatch, room_events
):
    monkeypatch.setattr(consumers, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(consumers, "RETRY_MAX", 0.02)
    outage, attempts = threading.Event(), []
    outage.set()
    real_store = files.attachments_store

    def flaky_store(**kwargs):
        attempts.append(kwargs["uploads"][0].size)
        if outage.is_set():
            raise OperationalError("database is locked")
        return real_store(**kwargs)

    monkeypatch.setattr(files, "attachments_store", flaky_store)
    cam = await device_scope("yard", "cam5")
    await cam.send_input(file_event(png(30, 30), 1))
    await cam.send_input({"type": "mqtt.message", "payload": b"behind", "ack": 2,
                          "received_at": time.monotonic()})
    assert await cam.receive_nothing(timeout=0.3)  # unacknowledged, retried
    assert len(attempts) >= 3
    outage.clear()
    assert await cam.receive_output(timeout=10) == handled(1, True)
    assert await cam.receive_output(timeout=5) == handled(2, True)
    assert [(e["text"], len(e["attachments"])) for e in room_events] == [("", 1), ("behind", 0)]
    await disconnect(cam)


@in_process
async def test_a_storage_that_fails_is_unavailable_and_the_device_goes_on(
    monkeypatch, room_events, caplog
):
    def broken_store(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "attachments_store", broken_store)
    cam = await device_scope("yard", "cam6")
    await cam.send_input(file_event(png(30, 30), 1, None, ("client_id", "c-1")))
    body = await refusal(cam, "yard", "cam6")
    assert (body["code"], body["client_id"]) == ("unavailable", "c-1")
    assert await cam.receive_output(timeout=5) == handled(1, False)
    assert "could not keep a device's file" in caplog.text
    assert room_events == []
    await disconnect(cam)


@in_process
async def test_a_file_answers_a_message_with_reply_to(room_events):
    cam = await device_scope("yard", "cam7")
    await cam.send_input({"type": "mqtt.message", "payload": b"motion?", "ack": 1,
                          "received_at": time.monotonic()})
    assert await cam.receive_output(timeout=5) == handled(1, True)
    await cam.send_input(file_event(png(30, 30), 2, None, ("reply_to", "1"),
                                    ("message", "here")))
    assert await cam.receive_output(timeout=10) == handled(2, True)
    reply = room_events[1]
    assert (reply["text"], reply["reply_to"]["id"], len(reply["attachments"])) == ("here", 1, 1)
    stored = await database_sync_to_async(lambda: list(
        Message.objects.filter(room__name="yard").values_list("seq", flat=True)))()
    assert stored == [1, 2]
    await disconnect(cam)


# --- end to end: gateway run, a real Mosquitto, real MQTT clients ------------------------------


async def next_raw(client: aiomqtt.Client, timeout: float = 15) -> tuple[str, bytes]:
    message = await asyncio.wait_for(anext(aiter(client.messages)), timeout)
    return str(message.topic), bytes(message.payload)


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


async def check_out_message(gw, topic: str, raw: bytes, snapshot: bytes, room: str) -> dict:
    """``out``'s message carries the file's metadata and signed URLs, never its bytes, and
    the URLs serve the same bytes (and a thumbnail) from the gateway."""
    assert topic == f"rooms/{room}/out"
    assert len(raw) < len(snapshot) // 10  # metadata only
    message = json.loads(raw)
    [attachment] = message["attachments"]
    assert set(attachment) == {"id", "name", "type", "size", "width", "height", "url",
                               "thumbnail_url"}
    assert (attachment["type"], attachment["size"]) == ("image/png", len(snapshot))
    assert (attachment["width"], attachment["height"]) == (160, 120)
    status, headers, body = await asyncio.to_thread(http_get, gw.http + attachment["url"])
    assert (status, body) == (200, snapshot)
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, thumb = await asyncio.to_thread(http_get,
                                                     gw.http + attachment["thumbnail_url"])
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert Image.open(io.BytesIO(thumb)).size == (160, 120)  # not larger than the image
    return message


@pytest.mark.slow
async def test_a_snapshot_reaches_out_as_signed_urls_and_a_refused_file_the_error_topic(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    snapshot = png()
    async with device(mosquitto) as listener, device(mosquitto) as cam, \
            device(mosquitto) as other:
        await listener.subscribe("rooms/yard/out", qos=1)
        await cam.subscribe("rooms/yard/error/cam1", qos=1)
        await cam.publish("rooms/yard/in/cam1/file", snapshot, qos=1)
        topic, raw = await next_raw(listener)
        message = await check_out_message(gw, topic, raw, snapshot, "yard")
        assert (message["message"], message["sender"]["id"]) == ("", "cam1")
        assert message["attachments"][0]["name"].endswith(".png")  # made: no MQTT 5 here

        # Refused types: an error on the camera's error topic, nothing in the room; another
        # device's text still goes through.
        for refused in (zipped(), SVG):
            await cam.publish("rooms/yard/in/cam1/file", refused, qos=1)
            topic, raw = await next_raw(cam)
            error = json.loads(raw)
            assert (topic, error["type"], error["code"]) == (
                "rooms/yard/error/cam1", "error", "unsupported_type")
        await other.publish("rooms/yard/in/sensor9", b"still served", qos=1)
        topic, raw = await next_raw(listener)
        assert json.loads(raw)["message"] == "still served"
    history = gw.get_json("/api/rooms/yard/messages?after=0")["messages"]
    assert [(m["message"], len(m["attachments"])) for m in history] == [
        ("", 1), ("still served", 0)]
    assert "refused device message unsupported_type" in gw.log()


@pytest.mark.slow
async def test_a_file_the_gateway_dies_before_storing_is_delivered_again(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    snapshot = png()
    async with device(mosquitto) as cam:
        with database_write_lock(gw):  # received, and waiting to be stored
            await cam.publish("rooms/crash/in/cam1/file", snapshot, qos=1)
            await wait_until(lambda: mqtt_status(gw)["received"] == 1, 10,
                             "the gateway did not receive it")
            gw.kill()
    back = gateway_factory(env=mqtt_env(mosquitto), port=gw.port, datadir=gw.datadir).start()
    await wait_until(lambda: back.get_json("/api/rooms/crash/")["last_id"] == 1, 20,
                     "the unacknowledged file was not delivered again")
    [message] = back.get_json("/api/rooms/crash/messages?after=0")["messages"]
    status, _, body = await asyncio.to_thread(http_get,
                                              back.http + message["attachments"][0]["url"])
    assert (status, body) == (200, snapshot)


def mqtt5_file(snapshot: bytes, *pairs: tuple[str, str]) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.ContentType = "image/png"
    properties.UserProperty = list(pairs)
    return properties


@pytest.mark.slow
async def test_an_mqtt5_gateway_reads_the_files_content_type_and_user_properties(
    gateway_factory, mosquitto, tmp_path
):
    env = mqtt_env(mosquitto, MQTT_PROTOCOL="5")
    gw = gateway_factory(env=env).start()
    await mqtt_ready(gw)
    snapshot = png()
    v5 = aiomqtt.ProtocolVersion.V5
    async with device(mosquitto, protocol=v5) as listener, \
            device(mosquitto, protocol=v5) as cam:
        await listener.subscribe("rooms/gate/out", qos=1)
        await cam.subscribe("rooms/gate/error/cam1", qos=1)
        properties = mqtt5_file(snapshot, ("filename", "door.png"),
                                ("message", "Front door"), ("client_id", "snap-1"))
        for _ in range(2):  # the second is a repeat of its client_id: stored once
            await cam.publish("rooms/gate/in/cam1/file", snapshot, qos=1,
                              properties=properties)
        topic, raw = await next_raw(listener)
        message = await check_out_message(gw, topic, raw, snapshot, "gate")
        assert (message["message"], message["client_id"]) == ("Front door", "snap-1")
        assert message["attachments"][0]["name"] == "door.png"
        # The README's mosquitto_pub, with its properties, answering the first.
        picture = tmp_path / "snapshot.png"
        await asyncio.to_thread(picture.write_bytes, png())
        await asyncio.to_thread(subprocess.run, [
            "mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-V", "mqttv5",
            "-t", "rooms/gate/in/cam2/file", "-f", str(picture),
            "-D", "publish", "content-type", "image/png",
            "-D", "publish", "user-property", "name", "back door.png",
            "-D", "publish", "user-property", "reply_to", str(message["id"]),
        ], check=True, timeout=10)
        topic, raw = await next_raw(listener)
        reply = json.loads(raw)
        assert (reply["reply_to"]["id"], reply["attachments"][0]["name"]) == (
            message["id"], "back door.png")
        # A property the service refuses is an error like any.
        await cam.publish("rooms/gate/in/cam1/file", snapshot, qos=1,
                          properties=mqtt5_file(snapshot, ("message", "x" * 5000)))
        topic, raw = await next_raw(cam)
        assert (topic, json.loads(raw)["code"]) == ("rooms/gate/error/cam1", "message_too_long")
    assert gw.get_json("/api/rooms/gate/")["last_id"] == 2


@pytest.mark.slow
async def test_an_mqtt5_gateway_keeps_its_session_across_a_restart(gateway_factory, mosquitto):
    env = mqtt_env(mosquitto, MQTT_PROTOCOL="5")
    gw = gateway_factory(env=env).start()
    await mqtt_ready(gw)  # its session and subscriptions exist: the broker queues for it
    assert gw.terminate() == 0
    async with device(mosquitto) as d:  # the gateway is away
        await d.publish("rooms/away/in/meter", b"while away", qos=1)
        await d.publish("rooms/away/in/cam1/file", png(), qos=1)
    back = gateway_factory(env=env, port=gw.port, datadir=gw.datadir).start()
    await wait_until(lambda: back.get_json("/api/rooms/away/")["last_id"] == 2, 20,
                     "what was queued for the gateway's session was not delivered")
    history = back.get_json("/api/rooms/away/messages?after=0")["messages"]
    assert [(m["message"], len(m["attachments"])) for m in history] == [
        ("while away", 0), ("", 1)]


@pytest.mark.slow
async def test_the_deploy_acl_lets_a_device_send_files_only_as_itself(gateway_factory, tmp_path):
    broker = secured_mosquitto(tmp_path)
    broker.start()
    try:
        env = mqtt_env(broker, MQTT_URL=f"mqtt://gateway:gw-secret@127.0.0.1:{broker.port}")
        gw = gateway_factory(env=env).start()
        await mqtt_ready(gw)
        async with device(broker, username="sensor1", password="s1-secret") as s1:
            await s1.subscribe("rooms/acl/out", qos=1)
            await s1.publish("rooms/acl/in/sensor2/file", png(), qos=1)  # dropped by the ACL
            await s1.publish("rooms/acl/in/sensor1/file", png(), qos=1)
            _, raw = await next_raw(s1)
            message = json.loads(raw)
            assert (message["sender"]["id"], len(message["attachments"])) == ("sensor1", 1)
        assert gw.get_json("/api/rooms/acl/")["last_id"] == 1
    finally:
        broker.stop()


@pytest.mark.slow
async def test_the_embedded_broker_acknowledges_a_file_once_it_is_stored(
    gateway_factory, tmp_path
):
    port = free_port()
    # MQTT_PROTOCOL=5 is for a broker of one's own: amqtt speaks 3.1.1, and the gateway's
    # client speaks it to it (saying so), else it would never connect.
    gw = gateway_factory(env={**FAST, "MQTT_ENABLED": "1", "MQTT_EMBEDDED_PORT": str(port),
                              "MQTT_PROTOCOL": "5"})
    gw.start()
    await mqtt_ready(gw)
    assert "MQTT_PROTOCOL=5 applies to a broker of your own" in gw.log()
    picture, snapshot = tmp_path / "snapshot.png", png()
    await asyncio.to_thread(picture.write_bytes, snapshot)
    await asyncio.to_thread(subprocess.run, [
        "mosquitto_pub", "-p", str(port), "-q", "1", "-t", "rooms/porch/in/cam1/file",
        "-f", str(picture)], check=True, timeout=15)
    # mosquitto_pub returned on its PUBACK, which the broker sends once the gateway stored it.
    [message] = gw.get_json("/api/rooms/porch/messages?after=0")["messages"]
    [attachment] = message["attachments"]
    assert (attachment["type"], attachment["size"]) == ("image/png", len(snapshot))
    status, _, body = await asyncio.to_thread(http_get, gw.http + attachment["url"])
    assert (status, body) == (200, snapshot)
