"""Devices as members, unit by unit: the MQTT wire of status, state and answers; the
writers of status and state; commands sent, claimed, answered and timed out once each; the
keeper's one writer; the policy's ``commands``."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from asgiref.sync import sync_to_async
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import devices, events, policy, services
from gateway.errors import GatewayError
from gateway.models import Device, DeviceCommand, DeviceRoom, Message
from protocols.mqtt import wire
from protocols.mqtt.broker_auth import ANONYMOUS, BrokerPolicy, Client
from protocols.mqtt.devices import ERROR_REPLY_BURST as ERROR_REPLIES_AT_ONCE
from protocols.mqtt.devices import DeviceKeeper

ALICE = events.sender(protocol="web", id="user:1", name="alice")

# --- the wire ---------------------------------------------------------------------------


@pytest.mark.parametrize(("topic", "expected"), [
    ("rooms/home/status/t1", wire.DeviceTopic("status", "home", "t1")),
    ("rooms/home/state/t1", wire.DeviceTopic("state", "home", "t1")),
    ("rooms/home/cmd/t1/reply", wire.DeviceTopic("reply", "home", "t1")),
    ("rooms/home/cmd/t1", None),  # what the gateway publishes, not a device's
    ("rooms/home/in/t1", None),
    ("other/home/status/t1", None),
])
def test_device_topics_are_told_apart(topic, expected):
    assert wire.device_topic_parse("rooms", topic) == expected


def test_a_device_topic_with_an_invalid_device_is_refused():
    with pytest.raises(GatewayError) as refused:
        wire.device_topic_parse("rooms", "rooms/home/status/bad id")
    assert refused.value.code == "invalid_device"


@pytest.mark.parametrize(("payload", "expected"), [
    (b"online", ("online", None)),
    (b" OFFLINE\n", ("offline", None)),
    (b'{"status": "online", "battery": 80}', ("online", {"status": "online", "battery": 80})),
    (b"", (None, None)),  # the retained status cleared
])
def test_a_status_is_online_or_offline_as_text_or_json(payload, expected):
    assert wire.status_decode(payload) == expected


@pytest.mark.parametrize(("payload", "code"), [
    (b"sleepy", "invalid_status"),
    (b'{"status": 1}', "invalid_status"),
    (b"{oops", "invalid_json"),
    (b"\xff", "invalid_utf8"),
    (b"x" * (wire.STATE_MAX + 1), "status_too_large"),
])
def test_a_bad_status_is_refused(payload, code):
    with pytest.raises(GatewayError) as refused:
        wire.status_decode(payload)
    assert refused.value.code == code


def test_a_state_is_an_object_or_text():
    assert wire.state_decode(b'{"t": 21.5}') == {"t": 21.5}
    assert wire.state_decode(b"21.5") == "21.5"
    assert wire.state_decode(b"  ") is None
    with pytest.raises(GatewayError):
        wire.state_decode(b"{1, 2")


def test_an_answer_names_its_command_by_id_or_by_mqtt5_correlation_data():
    assert wire.reply_decode(b'{"id": "abc", "reply": "ok"}', None) == ("abc", "ok")
    assert wire.reply_decode(b"21 degrees", b"abc") == ("abc", "21 degrees")
    assert wire.reply_decode(b'{"reply": "ok"}', b"abc") == ("abc", "ok")
    for payload, correlation, code in ((b"ok", None, "missing_id"),
                                       (b'{"id": "a", "x": 1}', None, "unknown_field"),
                                       (b"ok", b"\xff", "invalid_id")):
        with pytest.raises(GatewayError) as refused:
            wire.reply_decode(payload, correlation)
        assert refused.value.code == code


def test_out_carries_the_message_id_and_sender_as_mqtt5_user_properties():
    event = events.room_message(id=7, room="r", text="hi", sender=ALICE, ts=1.0, origin="")
    long = events.sender(protocol="web", id="user:" + "é" * 100, name="x")
    for sender, expected in ((ALICE, "user:1"), (long, long["id"])):
        event = events.room_message(id=7, room="r", text="hi", sender=sender, ts=1.0, origin="")
        packed = wire.out_properties(event).pack()
        properties = Properties(PacketTypes.PUBLISH)  # read back as paho reads them
        _, length = properties.unpack(packed)
        assert length == len(packed)
        assert properties.ContentType == "application/json"
        assert properties.UserProperty == [("id", "7"), ("sender", expected),
                                           ("protocol", "web")]


def test_the_embedded_broker_lets_a_device_speak_for_itself_only():
    rules = BrokerPolicy(prefix="rooms", gateway_client_id="gw", gateway_password="x")
    thermo, gateway = Client("device", "t1"), Client("gateway")
    for topic in ("rooms/h/status/t1", "rooms/h/state/t1", "rooms/h/cmd/t1/reply"):
        assert rules.may_publish(thermo, topic)
        assert not rules.may_publish(thermo, topic.replace("t1", "t2"))
        assert rules.may_publish(ANONYMOUS, topic)
    assert not rules.may_publish(thermo, "rooms/h/cmd/t1")  # commands come from the gateway
    assert rules.may_publish(gateway, "rooms/h/cmd/t1")
    assert rules.may_publish(gateway, "gateway/status/gw")
    assert rules.may_subscribe(thermo, "rooms/+/cmd/t1")
    assert not rules.may_subscribe(thermo, "rooms/+/cmd/+")
    assert rules.may_subscribe(thermo, "rooms/+/state/+")


# --- status and state --------------------------------------------------------------------


def set_policy(**changes) -> None:
    base = services.room_policy_get(room="home") or policy.DEFAULT
    services.room_policy_set(room="home", policy=policy.policy_update(
        base, changes, senders=set(events.PROTOCOLS), targets={"web", "telegram", "mqtt"}))


def report(kind: str = "status", *, live: bool = True, at: float | None = None, **fields):
    return devices.Report(room=fields.pop("room", "home"), device_id=fields.pop("device", "t1"),
                          kind=kind, at=at or time.time(), live=live, **fields)


@pytest.mark.django_db(transaction=True)
def test_a_report_is_written_once_and_a_repeat_changes_nothing(room_events):
    [change] = devices.devices_report([report(status="online")])
    assert (change["type"], change["change"], change["device"]["status"]) == (
        events.ROOM_DEVICE, "status", "online")
    assert events.room_device_decode(change) == change
    assert devices.devices_report([report(status="online")]) == []
    [state] = devices.devices_report([report("state", state={"t": 20}, live=False)])
    assert state["device"]["state"] == {"t": 20} and state["device"]["status"] == "online"
    assert [e["type"] for e in room_events] == [events.ROOM_DEVICE, events.ROOM_DEVICE]
    assert devices.room_devices(room="home") == [state["device"]]
    assert Message.objects.count() == 0  # no chat message per update


@pytest.mark.django_db
def test_a_status_change_is_announced_when_the_room_asks(room_events):
    devices.devices_report([report(status="online")])
    set_policy(notices=True)
    devices.devices_report([report(status="offline"), report(status="offline")])
    assert list(Message.objects.values_list("text", flat=True)) == ["device t1 is offline"]


@pytest.mark.django_db
def test_an_online_device_silent_too_long_becomes_unknown(room_events):
    now = time.time()
    devices.devices_report([report(status="online", at=now - 100)])
    assert devices.devices_silent(silence=200, now=now) == []
    Device.objects.filter(device_id="t1").update(last_seen=devices._at(now - 10))
    assert devices.devices_silent(silence=50, now=now) == []  # it still posts messages
    Device.objects.filter(device_id="t1").update(last_seen=devices._at(now - 90))
    [change] = devices.devices_silent(silence=50, now=now)
    assert change["device"]["status"] == "unknown"
    assert devices.devices_silent(silence=50, now=now) == []


@pytest.mark.django_db
def test_a_report_for_a_room_the_device_may_not_create_is_dropped(settings):
    settings.GATEWAY = {**settings.GATEWAY, "ROOMS_STAFF_ONLY": True}
    assert devices.devices_report([report(status="online", room="new")]) == []
    assert not DeviceRoom.objects.exists()


# --- commands ------------------------------------------------------------------------------


@pytest.fixture
def thermo(db):
    services.room_get_or_create(room="home")
    devices.devices_report([report(status="online")])


def send(command: str = "set 21", **kwargs):
    return devices.command_send(room="home", device=kwargs.pop("device", "t1"),
                                command=command, sender=ALICE, origin="ws-1", **kwargs)


def test_a_command_is_a_message_and_a_pending_command_claimed_once(thermo):
    event, command = send(client_id="c1", timeout=3)
    assert event["text"] == "/cmd t1 set 21" and command is not None
    assert command.payload() == {"id": command.key, "command": "set 21", "sender": ALICE}
    assert command.timeout == 3.0
    again, repeat = send(client_id="c1")
    assert (again["id"], repeat) == (event["id"], None)
    assert DeviceCommand.objects.count() == 1
    assert devices.command_claim(key=command.key)
    assert not devices.command_claim(key=command.key)
    assert devices.commands_unclaimed(older_than=0) == []


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"device": "bad id"}, "invalid_device"),
    ({"device": "ghost"}, "unknown_device"),
    ({"command": "  "}, "invalid_command"),
    ({"command": "x" * (devices.COMMAND_MAX + 1)}, "invalid_command"),
    ({"timeout": 0}, "invalid_timeout"),
    ({"timeout": True}, "invalid_timeout"),
])
def test_a_bad_command_is_refused_before_anything_is_stored(thermo, kwargs, code):
    with pytest.raises(GatewayError) as refused:
        send(**{"command": "x", **kwargs})
    assert refused.value.code == code
    assert not Message.objects.exists()


def test_who_may_command_is_the_rooms_policy_and_the_devices_own(thermo):
    set_policy(commands=["telegram"])
    with pytest.raises(GatewayError) as refused:
        send()
    assert refused.value.code == "command_not_allowed"
    assert send(staff=True)[1] is not None  # staff always may
    set_policy(commands=None, post=["mqtt"])
    with pytest.raises(GatewayError) as refused:
        send()  # one who may not post may not command either
    assert refused.value.code == "command_not_allowed"
    set_policy(post=None)
    Device.objects.filter(device_id="t1").update(commands=False)
    with pytest.raises(GatewayError) as refused:
        send()
    assert refused.value.code == "command_not_allowed"


def test_the_answer_and_the_timeout_land_once_whichever_comes_first(thermo):
    event, command = send(timeout=1)
    assert command is not None
    reply = devices.command_answer(room="home", device_id="t1", key=command.key, reply="ok")
    assert reply is not None
    assert (reply["text"], reply["reply_to"]["id"], reply["sender"]["id"]) == (
        "ok", event["id"], "t1")
    assert devices.command_answer(room="home", device_id="t1", key=command.key,
                                  reply="again") is None
    assert devices.commands_expire(now=time.time() + 5) == []

    late, slow = send("status", timeout=1)
    assert slow is not None
    [notice] = devices.commands_expire(now=time.time() + 5)
    assert (notice["text"], notice["reply_to"]["id"], notice["sender"]["protocol"]) == (
        "t1 did not answer within 1 s", late["id"], "system")
    assert devices.commands_expire(now=time.time() + 5) == []
    assert devices.command_answer(room="home", device_id="t1", key=slow.key, reply="x") is None
    with pytest.raises(GatewayError) as refused:  # another device cannot answer it
        devices.command_answer(room="home", device_id="t2", key=slow.key, reply="x")
    assert refused.value.code == "unknown_command"


def test_the_policy_keeps_commands_in_its_public_form():
    base = policy.policy_update(policy.DEFAULT, {"commands": ["web"]},
                                senders={"web", "telegram", "system"}, targets={"web"})
    assert base.public()["commands"] == ["web"]
    assert policy.policy_from_public(base.public()) == base
    assert policy.policy_from_columns(**policy.policy_columns(base)) == base
    assert base.may_command("web") and not base.may_command("telegram")
    assert base.may_command("system")
    with pytest.raises(GatewayError):
        policy.policy_update(policy.DEFAULT, {"commands": ["fax"]}, senders={"web"},
                             targets={"web"})


# --- the keeper: one writer --------------------------------------------------------------


class Server:
    """Stands in for the MQTT server: what the keeper publishes."""

    mqtt5 = True
    device_reports = None

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes, Properties | None]] = []
        self.errors: list[tuple[str, bytes, str]] = []

    async def publish(self, topic: str, payload: bytes, *, properties=None) -> None:
        self.published.append((topic, payload, properties))

    def error_reply(self, topic: str, payload: bytes, code: str) -> None:
        self.errors.append((topic, payload, code))


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")  # the database thread's connection closed
async def test_only_the_lease_holder_writes_and_a_taker_writes_what_it_heard(room_events):
    first, second = Server(), Server()
    holder = DeviceKeeper(first, prefix="rooms", silence=0)  # type: ignore[arg-type]
    other = DeviceKeeper(second, prefix="rooms", silence=0)  # type: ignore[arg-type]
    await holder.start()
    await asyncio.sleep(0.2)  # it takes the lease
    await other.start()
    try:
        assert holder.lease.held and not other.lease.held
        topic = wire.DeviceTopic("state", "home", "t1")
        for keeper in (holder, other):  # both hear it (not shared)
            keeper.report(topic, b'{"t": 20}', False)
        await asyncio.sleep(0.3)
        rows = await sync_to_async(devices.room_devices)(room="home")
        assert [row["state"] for row in rows] == [{"t": 20}]
        assert other.dirty == {}

        other.report(wire.DeviceTopic("status", "home", "t1"), b"sleepy", False)
        assert second.errors[0][0] == "rooms/home/error/t1"
        await holder.stop()  # the lease is released: the other takes it and writes
        other.report(wire.DeviceTopic("status", "home", "t1"), b"online", True)
        await asyncio.sleep(other.lease.ttl / 3 + 0.5)
        assert other.lease.held
        rows = await sync_to_async(devices.room_devices)(room="home")
        assert (rows[0]["status"], rows[0]["state"]) == ("online", {"t": 20})
    finally:
        await other.stop()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")  # the database thread's connection closed
async def test_a_command_sent_here_is_published_once_with_its_mqtt5_properties():
    server = Server()
    keeper = DeviceKeeper(server, prefix="rooms", silence=0)  # type: ignore[arg-type]
    await keeper.start()
    try:
        await sync_to_async(services.room_get_or_create)(room="home")
        await sync_to_async(devices.devices_report)([report(status="online")])
        _, command = await sync_to_async(send)(timeout=4)
        devices.command_dispatch(command)
        devices.command_dispatch(command)  # twice: claimed once
        for _ in range(50):
            if server.published:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        [(topic, payload, properties)] = server.published
        assert command is not None and topic == "rooms/home/cmd/t1"
        assert json.loads(payload) == {"id": command.key, "command": "set 21", "sender": ALICE}
        assert properties is not None
        assert properties.ResponseTopic == "rooms/home/cmd/t1/reply"
        assert properties.CorrelationData == command.key.encode()
        assert properties.MessageExpiryInterval == 4
        assert isinstance(properties, Properties) and properties.packetType == PacketTypes.PUBLISH
    finally:
        await keeper.stop()


# --- what a careless or hostile device cannot do ----------------------------------------------


@pytest.mark.parametrize("payload", [
    b'{"t": NaN}', b'{"t": Infinity}', b'{"t": 1e999}', b'{"t": 18446744073709551616}',
    b'{"t": "a\\u0000b"}', b'{"\\ud800": 1}', b'{"t": [{"u": -9223372036854775809}]}',
])
def test_a_state_no_database_or_layer_could_carry_is_refused(payload):
    with pytest.raises(GatewayError) as refused:
        wire.state_decode(payload)
    assert refused.value.code == "invalid_json"
    with pytest.raises(GatewayError):
        wire.status_decode(payload.replace(b'{"t"', b'{"status": "online", "t"'))


def test_a_timeout_past_any_float_is_refused_not_raised(thermo):
    with pytest.raises(GatewayError) as refused:
        send(timeout=10**400)
    assert refused.value.code == "invalid_timeout"


@pytest.mark.django_db(transaction=True)
def test_a_blocked_device_and_a_room_closed_to_devices_take_no_report(room_events):
    devices.devices_report([report(status="online")])
    Device.objects.filter(device_id="t1").update(blocked=True)
    assert devices.devices_report([report(status="offline")]) == []
    Device.objects.filter(device_id="t1").update(blocked=False)
    set_policy(post=["web"])
    assert devices.devices_report([report(status="offline")]) == []
    assert devices.room_devices(room="home")[0]["status"] == "online"


@pytest.mark.django_db(transaction=True)
def test_a_flapping_device_is_told_once_and_a_closed_room_still_shows_its_status(room_events):
    devices.devices_report([report(status="online")])
    set_policy(notices=True)
    for status in ("offline", "online", "offline"):
        assert devices.devices_report([report(status=status)])
    assert list(Message.objects.values_list("text", flat=True)) == ["device t1 is offline"]
    services.room_close(room="home")
    Message.objects.all().delete()  # no notice within NOTICE_INTERVAL: none to wait out
    assert devices.devices_report([report(status="online")])  # applied, not told
    assert devices.room_devices(room="home")[0]["status"] == "online"
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_brokers_replay_does_not_undo_what_the_room_learnt_since(room_events):
    heard = time.time() - 60  # a new lease holder heard the retained "online" a minute ago
    devices.devices_report([report(status="online", at=heard - 100)])
    [unknown] = devices.devices_silent(silence=30, now=heard + 30)
    assert unknown["device"]["status"] == "unknown"
    assert devices.devices_report([report(status="online", live=False, at=heard)]) == []
    assert devices.room_devices(room="home")[0]["status"] == "unknown"
    assert devices.devices_report([report(status="online", at=time.time())])  # live: it is


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")  # the database thread's connection closed
async def test_a_command_past_its_deadline_is_not_published_late(caplog):
    server = Server()
    keeper = DeviceKeeper(server, prefix="rooms", silence=0)  # type: ignore[arg-type]
    late = devices.Command(key="k1", room="home", device_id="t1", command="unlock",
                           sender=ALICE, timeout=1.0, deadline=time.time() - 0.1)
    await keeper.publish(late)
    assert server.published == []
    assert "not published before its deadline" in caplog.text


def test_a_device_flooding_its_status_is_refused_and_told_a_few_times(settings):
    settings.GATEWAY = {**settings.GATEWAY, "RATE_LIMIT_PER_SECOND": 0.01,
                        "RATE_LIMIT_BURST": 3}
    server = Server()
    keeper = DeviceKeeper(server, prefix="rooms", silence=0)  # type: ignore[arg-type]
    topic = wire.DeviceTopic("status", "home", "t1")
    for _ in range(30):
        keeper.report(topic, b"online", False)
    assert keeper.stats["reports"] == 3
    assert 1 <= len(server.errors) <= ERROR_REPLIES_AT_ONCE
    assert {code for _, _, code in server.errors} == {"rate_limited"}
    for _ in range(5):  # the broker's replay is not the device's flood
        keeper.report(topic, b"online", True)
    assert keeper.stats["reports"] == 8


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")  # the database thread's connection closed
async def test_a_process_not_connected_to_the_broker_does_not_hold_the_lease():
    server = Server()
    keeper = DeviceKeeper(server, prefix="rooms", silence=0)  # type: ignore[arg-type]
    await keeper._lease_round()
    assert keeper.lease.held
    server.connected.clear()
    await keeper._lease_round()
    assert not keeper.lease.held


def test_without_mqtt_a_command_is_refused_not_left_pending(thermo, settings):
    settings.MQTT = {**settings.MQTT, "ENABLED": False}
    with pytest.raises(GatewayError) as refused:
        send()
    assert refused.value.code == "unavailable"
    assert not DeviceCommand.objects.exists()
