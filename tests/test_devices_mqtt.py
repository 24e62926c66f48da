"""Devices as members, end to end through a real Mosquitto: status (birth, will), retained
state, commands answered from MQTT 5 and 3.1.1 devices, timeouts, refusals, two replicas."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiomqtt
import httpx
import pytest
import websockets

from tests.helpers import (
    FAST,
    answer_commands,
    device,
    devices_of,
    history,
    mqtt_env,
    mqtt_ready,
    next_mqtt,
    next_of,
    thermostat,
    wait_until,
)
from tests.servers import free_port

pytestmark = pytest.mark.slow

V5 = aiomqtt.ProtocolVersion.V5


def api_key(gw, room: str, name: str = "ops") -> str:
    out = gw.manage("apikey", "create", "--name", name, "--rooms", room, "--scopes", "read,post")
    return out.strip().splitlines()[-1]


async def test_status_and_state_reach_api_and_v2_sockets_and_the_will_says_offline(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with websockets.connect(gw.ws("/ws/chat/home/?v=2&name=ann"),
                                  origin=gw.origin) as ws, \
            websockets.connect(gw.ws("/ws/chat/home/?name=old"), origin=gw.origin) as tutorial:
        first = await next_of(ws, "presence")
        assert first["devices"] == []
        thermo = await thermostat(mosquitto)
        status = await next_of(ws, "device")
        assert (status["change"], status["device"]["id"], status["device"]["status"]) == (
            "status", "thermo1", "online")
        state = await next_of(ws, "device")
        assert state["device"]["state"] == {"temperature": 20.5, "target": 21}
        listed = devices_of(gw, "home")["thermo1"]
        assert (listed["status"], listed["state"]["target"]) == ("online", 21)
        assert listed["status_at"] and listed["seen_at"]
        assert gw.get_json("/api/rooms/home/")["devices"] == [listed]  # beside its members

        # Killed without a word: the broker fires its will.
        thermo._client._sock.close()  # noqa: SLF001 - a crash, not a DISCONNECT
        gone = await next_of(ws, "device", timeout=20)
        assert (gone["device"]["status"], gone["change"]) == ("offline", "status")
        assert devices_of(gw, "home")["thermo1"]["status"] == "offline"
        # A tutorial client is sent no device frames (notices are off by default).
        await tutorial.send(json.dumps({"message": "still here"}))
        frame = json.loads(await asyncio.wait_for(tutorial.recv(), 5))
        assert frame["message"] == "still here"
    assert [m["message"] for m in history(gw, "home")] == ["still here"]


async def test_retained_state_is_read_when_the_gateway_starts_and_notices_are_told(
    gateway_factory, mosquitto
):
    async with device(mosquitto) as early:
        await early.publish("rooms/attic/status/fan1", b'{"status": "online", "rssi": -60}',
                            qos=1, retain=True)
        await early.publish("rooms/attic/state/fan1", b"spinning", qos=1, retain=True)
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    await wait_until(lambda: "fan1" in devices_of(gw, "attic"), 15, "no retained state read")
    fan = devices_of(gw, "attic")["fan1"]
    assert (fan["status"], fan["detail"], fan["state"]) == (
        "online", {"status": "online", "rssi": -60}, "spinning")
    assert fan["seen_at"] is None  # heard from the broker's memory, not from the device

    # The room asks for notices: a status change is told in the room, once.
    key = gw.manage("apikey", "create", "--name", "ops", "--scopes", "read,post,manage")
    key = key.strip().splitlines()[-1]
    answer = await asyncio.to_thread(
        httpx.patch, f"{gw.http}/api/rooms/attic/", json={"policy": {"notices": True}},
        headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    async with device(mosquitto) as fan1:
        await fan1.publish("rooms/attic/status/fan1", b"offline", qos=1, retain=True)
        await fan1.publish("rooms/attic/status/fan1", b"offline", qos=1, retain=True)
    await wait_until(lambda: any(m["message"] == "device fan1 is offline"
                                 for m in history(gw, "attic")), 10, "no notice")
    await asyncio.sleep(1)
    assert [m["message"] for m in history(gw, "attic")] == ["device fan1 is offline"]

    # A malformed status is refused on the device's error topic; the last one stands.
    async with device(mosquitto) as fan1:
        await fan1.subscribe("rooms/attic/error/fan1", qos=1)
        await fan1.publish("rooms/attic/status/fan1", b"sleepy", qos=1)
        error = json.loads((await next_mqtt(fan1)).payload)
        assert error["code"] == "invalid_status"
    assert devices_of(gw, "attic")["fan1"]["status"] == "offline"


@pytest.mark.parametrize("mqtt5", [False, True], ids=["3.1.1", "mqtt5"])
async def test_a_command_from_the_api_and_a_socket_is_answered_in_the_room(
    gateway_factory, mosquitto, mqtt5
):
    env = mqtt_env(mosquitto, MQTT_PROTOCOL="5" if mqtt5 else "3.1.1")
    gw = gateway_factory(env=env).start()
    await mqtt_ready(gw)
    seen: list = []
    kwargs = {"protocol": V5} if mqtt5 else {}
    async with device(mosquitto, identifier="thermo1", **kwargs) as thermo:
        await thermo.publish("rooms/home/status/thermo1", b"online", qos=1, retain=True)
        await thermo.subscribe("rooms/home/cmd/thermo1", qos=1)
        answering = asyncio.create_task(answer_commands(thermo, mqtt5=mqtt5, seen=seen))
        await wait_until(lambda: "thermo1" in devices_of(gw, "home"), 10, "device not known")
        key = api_key(gw, "home")
        answer = await asyncio.to_thread(httpx.post, f"{gw.http}/api/rooms/home/messages", json={
            "type": "command", "device": "thermo1", "command": "set 22"},
            headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert answer.status_code == 201, answer.text
        sent = answer.json()
        assert sent["message"] == "/cmd thermo1 set 22" and sent["command"]["device"] == "thermo1"
        await wait_until(lambda: len(history(gw, "home")) == 2, 10, "no answer in the room")
        command, reply = history(gw, "home")[:2]
        assert reply["message"] == "done: set 22"
        assert (reply["sender"]["id"], reply["reply_to"]["id"]) == ("thermo1", command["id"])
        topic, payload, properties = seen[0]
        assert topic == "rooms/home/cmd/thermo1"
        assert payload["id"] == sent["command"]["id"] and payload["command"] == "set 22"
        assert payload["sender"]["protocol"] == "api"
        if mqtt5:
            assert properties.ResponseTopic == "rooms/home/cmd/thermo1/reply"
            assert properties.CorrelationData == sent["command"]["id"].encode()
            assert 1 <= properties.MessageExpiryInterval <= 10
            # out names each message's id and sender in its user properties.
            async with device(mosquitto, protocol=V5) as listener:
                await listener.subscribe("rooms/home/out", qos=1)
                await asyncio.to_thread(
                    httpx.post, f"{gw.http}/api/rooms/home/messages",
                    json={"message": "hello devices"},
                    headers={"Authorization": f"Bearer {key}"}, timeout=10)
                out = await next_mqtt(listener)
                hello = json.loads(out.payload)
                assert hello["message"] == "hello devices"
                assert out.properties.ContentType == "application/json"
                assert out.properties.UserProperty == [
                    ("id", str(hello["id"])), ("sender", hello["sender"]["id"]),
                    ("protocol", "api")]

        # From a socket, acknowledged like a message; the answer reaches the socket.
        after = history(gw, "home")[-1]["id"]
        async with websockets.connect(gw.ws(f"/ws/chat/home/?after={after}&name=ann"),
                                      origin=gw.origin) as ws:
            await ws.send(json.dumps({"type": "command", "device": "thermo1",
                                      "command": "status", "client_id": "c1"}))
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(3)]
            kinds = sorted(f["type"] for f in frames)
            assert kinds == ["ack", "message", "message"]
            texts = [f["message"] for f in frames if f["type"] == "message"]
            assert texts == ["/cmd thermo1 status", "done: status"]
        answering.cancel()
    assert len(seen) == 2


async def test_no_answer_is_a_timeout_notice_and_refusals_are_clear(gateway_factory, mosquitto):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with device(mosquitto, identifier="mute1") as mute:
        await mute.publish("rooms/lab/state/mute1", b"idle", qos=1, retain=True)
        await wait_until(lambda: "mute1" in devices_of(gw, "lab"), 10, "device not known")
    async with websockets.connect(gw.ws("/ws/chat/lab/?name=ann"), origin=gw.origin) as ws:
        await ws.send(json.dumps({"type": "command", "device": "mute1", "command": "ping",
                                  "timeout": 1}))
        command = await next_of(ws, "message")
        notice = await next_of(ws, "message", timeout=10)
        assert notice["message"] == "mute1 did not answer within 1 s"
        assert (notice["sender"]["protocol"], notice["reply_to"]["id"]) == ("system",
                                                                           command["id"])
        # A late answer lands nowhere: the command timed out.
        for frame, code in (
            ({"type": "command", "device": "ghost", "command": "x"}, "unknown_device"),
            ({"type": "command", "device": "mute1", "command": ""}, "invalid_command"),
            ({"type": "command", "device": "mute1"}, "missing_command"),
            ({"type": "command", "device": "mute1", "command": "x", "timeout": 9999},
             "invalid_timeout"),
        ):
            await ws.send(json.dumps(frame))
            assert (await next_of(ws, "error"))["code"] == code

    # The room's policy lets only Telegram command its devices: the web is refused.
    key = gw.manage("apikey", "create", "--name", "ops", "--scopes", "read,post,manage")
    key = key.strip().splitlines()[-1]
    answer = await asyncio.to_thread(
        httpx.patch, f"{gw.http}/api/rooms/lab/", json={"policy": {"commands": ["telegram"]}},
        headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["policy"]["commands"] == ["telegram"]
    async with websockets.connect(gw.ws("/ws/chat/lab/?name=ann"), origin=gw.origin) as ws:
        await ws.send(json.dumps({"type": "command", "device": "mute1", "command": "x"}))
        assert (await next_of(ws, "error"))["code"] == "command_not_allowed"
    assert [m["message"] for m in history(gw, "lab")] == [
        "/cmd mute1 ping", "mute1 did not answer within 1 s"]
    assert "command sent to mute1" in gw.log()


async def test_the_gateway_says_it_is_online_and_its_will_says_offline(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto, MQTT_CLIENT_ID="gw-a")).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as watcher:
        await watcher.subscribe("gateway/status/+", qos=1)
        message = await next_mqtt(watcher)
        assert (str(message.topic), message.payload, message.retain) == (
            "gateway/status/gw-a", b"online", True)
        gw.kill()
        message = await next_mqtt(watcher, timeout=60)
        assert (str(message.topic), message.payload) == ("gateway/status/gw-a", b"offline")


async def test_two_replicas_show_the_same_devices_and_send_and_answer_each_command_once(
    gateway_factory, mosquitto, redis_server, tmp_path
):
    env = mqtt_env(mosquitto, REDIS_URL=redis_server.url, MQTT_SHARED_GROUP="gateway")
    a = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    b = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    await mqtt_ready(a)
    await mqtt_ready(b)
    seen: list = []
    async with websockets.connect(a.ws("/ws/chat/duo/?v=2&name=ann"), origin=a.origin) as on_a, \
            websockets.connect(b.ws("/ws/chat/duo/?v=2&name=bob"), origin=b.origin) as on_b, \
            device(mosquitto, identifier="thermo1") as thermo:
        for ws in (on_a, on_b):
            await next_of(ws, "presence")
        await thermo.subscribe("rooms/duo/cmd/thermo1", qos=1)
        answering = asyncio.create_task(answer_commands(thermo, mqtt5=False, seen=seen))
        for value in ("online", "offline", "online"):
            await thermo.publish("rooms/duo/status/thermo1", value.encode(), qos=1,
                                 retain=True)
            for ws in (on_a, on_b):  # each change told once on each replica
                assert (await next_of(ws, "device"))["device"]["status"] == value
        assert devices_of(a, "duo") == devices_of(b, "duo")

        keys = {gw: api_key(gw, "duo", name=f"ops-{gw.port}") for gw in (a, b)}
        total = 10
        for i in range(total):
            gw = (a, b)[i % 2]
            answer = await asyncio.to_thread(
                httpx.post, f"{gw.http}/api/rooms/duo/messages",
                json={"type": "command", "device": "thermo1", "command": f"c{i}"},
                headers={"Authorization": f"Bearer {keys[gw]}"}, timeout=10)
            assert answer.status_code == 201, answer.text
        await wait_until(lambda: len(history(a, "duo")) == 2 * total, 20,
                         "not every command was answered")
        await asyncio.sleep(1.5)  # nothing more comes: no command published twice
        answering.cancel()
    assert sorted(command["command"] for _, command, _ in seen) == sorted(
        f"c{i}" for i in range(total))
    messages = history(a, "duo")
    assert len(messages) == 2 * total
    answers = [m for m in messages if m["sender"]["id"] == "thermo1"]
    assert sorted(m["message"] for m in answers) == sorted(f"done: c{i}" for i in range(total))
    # One process at a time writes the devices' status.
    holds = "holding the devices' lease"
    assert (holds in a.log()) != (holds in b.log())


async def test_the_deploy_acl_lets_a_device_be_a_member_only_as_itself(
    gateway_factory, tmp_path
):
    from tests.test_mqtt import secured_mosquitto

    broker = secured_mosquitto(tmp_path)
    broker.start()
    try:
        env = mqtt_env(broker, MQTT_URL=f"mqtt://gateway:gw-secret@127.0.0.1:{broker.port}")
        gw = gateway_factory(env=env).start()
        await mqtt_ready(gw)
        seen: list = []
        async with device(broker, identifier="sensor1", username="sensor1",
                          password="s1-secret") as sensor:
            await sensor.publish("rooms/acl/status/sensor1", b"online", qos=1, retain=True)
            await sensor.publish("rooms/acl/state/sensor2", b"spoofed", qos=1, retain=True)
            await sensor.subscribe("rooms/acl/cmd/sensor1", qos=1)
            answering = asyncio.create_task(answer_commands(sensor, mqtt5=False, seen=seen))
            await wait_until(lambda: "sensor1" in devices_of(gw, "acl"), 10, "status not read")
            async with websockets.connect(gw.ws("/ws/chat/acl/?name=ann"),
                                          origin=gw.origin) as ws:
                await ws.send(json.dumps({"type": "command", "device": "sensor1",
                                          "command": "ping"}))
                await next_of(ws, "message")
                answer = await next_of(ws, "message")
                assert (answer["message"], answer["sender"]["id"]) == ("done: ping", "sensor1")
            answering.cancel()
        assert list(devices_of(gw, "acl")) == ["sensor1"]  # not another device's state
        status = await asyncio.to_thread(gw.get_json, "/api/rooms/acl/devices")
        assert status["devices"][0]["status"] == "online"
    finally:
        broker.stop()


async def test_the_embedded_broker_serves_devices_as_members_and_leaks_no_retained_state(
    gateway_factory
):
    port = free_port()
    gw = gateway_factory(env={**FAST, "MQTT_ENABLED": "1", "MQTT_EMBEDDED_PORT": str(port)})
    gw.start()
    await wait_until(lambda: "connected to the MQTT broker" in gw.log(), 15,
                     "the gateway did not connect to its embedded broker")
    broker = SimpleNamespace(port=port)  # what device() needs of a broker
    thermo = await thermostat(broker, room="den")
    await wait_until(lambda: devices_of(gw, "den").get("thermo1", {}).get("state"), 10,
                     "state not read")
    seen: list = []
    await thermo.subscribe("rooms/den/cmd/thermo1", qos=1)
    answering = asyncio.create_task(answer_commands(thermo, mqtt5=False, seen=seen))
    # Another client subscribed only to its commands gets nothing else: amqtt would offer it
    # the retained status and state the gateway reads.
    async with device(broker, identifier="other") as other:
        await other.subscribe("rooms/den/cmd/other", qos=1)
        async with websockets.connect(gw.ws("/ws/chat/den/?name=ann"), origin=gw.origin) as ws:
            await ws.send(json.dumps({"type": "command", "device": "thermo1",
                                      "command": "set 22"}))
            await next_of(ws, "message")
            assert (await next_of(ws, "message"))["message"] == "done: set 22"
        with pytest.raises(TimeoutError):
            await next_mqtt(other, timeout=1)
    answering.cancel()
    thermo._client._sock.close()  # noqa: SLF001 - its will fires
    await wait_until(lambda: devices_of(gw, "den")["thermo1"]["status"] == "offline", 15,
                     "the embedded broker did not publish the will")
