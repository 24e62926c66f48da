"""MQTT devices in the rooms: a real broker (a private mosquitto, or the embedded amqtt),
real MQTT clients (aiomqtt, mosquitto_pub) and real WebSocket clients, against
``gateway run``."""

from __future__ import annotations

import asyncio
import json
import subprocess

import aiomqtt
import pytest
import websockets

from tests.helpers import (
    FAST,
    collect,
    connect,
    database_write_lock,
    device,
    gather_out,
    members,
    mqtt_env,
    mqtt_ready,
    mqtt_status,
    next_message,
    nothing_more,
    wait_until,
)
from tests.servers import ROOT, Mosquitto, free_port

pytestmark = pytest.mark.slow


async def test_devices_and_browsers_share_a_room(gateway_factory, mosquitto):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with connect(gw, "/ws/chat/plant/?name=web") as browser, \
            device(mosquitto) as d1, device(mosquitto) as d2:
        for d in (d1, d2):
            await d.subscribe("rooms/plant/out", qos=1)  # returns once the broker confirmed

        # device -> browser, and -> every device through out (the sender too), once each
        await d1.publish("rooms/plant/in/sensor1", b"21.5 C", qos=1)
        frame = await next_message(browser)
        assert frame["message"] == "21.5 C"
        assert frame["sender"] == {"protocol": "mqtt", "id": "sensor1", "name": "sensor1"}
        for d in (d1, d2):
            [out] = await gather_out(d, 1)
            assert (out["topic"], out["message"], out["id"]) == ("rooms/plant/out", "21.5 C", 1)
            assert out["type"] == "message" and out["sender"]["protocol"] == "mqtt"
            assert "origin" not in out and out["room"] == "plant"

        # browser -> devices
        await browser.send(json.dumps({"message": "hello devices"}))
        assert (await next_message(browser))["message"] == "hello devices"  # its own copy
        for d in (d1, d2):
            [out] = await gather_out(d, 1)
            assert (out["message"], out["sender"]["protocol"]) == ("hello devices", "web")

        # a JSON payload with a display name and an idempotency key, sent twice
        payload = json.dumps({"message": "hi all", "name": "Boiler", "client_id": "b-1"})
        await d2.publish("rooms/plant/in/boiler", payload.encode(), qos=1)
        await d2.publish("rooms/plant/in/boiler", payload.encode(), qos=1)
        frame = await next_message(browser)
        assert (frame["message"], frame["sender"]["name"]) == ("hi all", "Boiler")
        for d in (d1, d2):
            [out] = await gather_out(d, 1)
            assert out["message"] == "hi all" and out["client_id"] == "b-1"
            assert await nothing_more(d)  # no echo, no second copy, no re-ingestion

        history = gw.get_json("/api/rooms/plant/messages?after=0")
        assert [m["message"] for m in history["messages"]] == [
            "21.5 C", "hello devices", "hi all"
        ]
        await wait_until(lambda: members(gw, "plant") == 3, 5, "devices not in presence")
        room = gw.get_json("/api/rooms/plant/")
        assert sorted((m["protocol"], m["id"]) for m in room["members"])[:2] == [
            ("mqtt", "boiler"), ("mqtt", "sensor1")
        ]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe not utf-8", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b'{"text": "wrong key"}', "unknown_field"),
        (b'{"name": "no message"}', "missing_message"),
        (b'{"message": ""}', "empty_message"),
        (b"   ", "empty_message"),
        (b"x" * 4097, "message_too_long"),
        (b'{"message": 7}', "invalid_message"),
    ],
)
async def test_bad_payloads_are_refused_on_the_error_topic(gateway_factory, mosquitto,
                                                           payload, code):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as d:
        await d.subscribe("rooms/lab/error/probe", qos=1)
        await d.subscribe("rooms/lab/out", qos=1)
        await d.publish("rooms/lab/in/probe", payload, qos=1)
        [error] = await gather_out(d, 1)
        assert (error["topic"], error["type"], error["code"]) == (
            "rooms/lab/error/probe", "error", code
        )
        # The bridge keeps serving: a good message still goes through.
        await d.publish("rooms/lab/in/probe", b"fine", qos=1)
        [out] = await gather_out(d, 1)
        assert out["message"] == "fine"
    assert [m["message"] for m in gw.get_json("/api/rooms/lab/messages")["messages"]] == ["fine"]
    assert f"refused device message {code}" in gw.log()
    gw.terminate()
    assert f'"refused": {{"{code}": 1}}' in gw.log()  # the counter, reported at stop


@pytest.mark.parametrize("topic", ["rooms/bad room/in/dev1", "rooms/lab/in/bad$device",
                                   "rooms/" + "r" * 65 + "/in/dev1"])
async def test_invalid_topics_are_logged_and_dropped(gateway_factory, mosquitto, topic):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as d:
        await d.subscribe("rooms/#", qos=1)
        await d.publish(topic, b"hello", qos=1)
        await gather_out_raw(d, 1)  # our own publish, echoed by the broker to rooms/#
        assert await nothing_more(d, 1.0)  # no error topic: room or device is not valid
    assert gw.get_json("/api/rooms/")["rooms"] == []
    assert "refused MQTT message" in gw.log()


async def gather_out_raw(client: aiomqtt.Client, n: int) -> None:
    count = 0
    async for _ in client.messages:
        count += 1
        if count == n:
            return


async def test_retained_messages_are_not_stored_again(gateway_factory, mosquitto):
    env = mqtt_env(mosquitto)
    gw = gateway_factory(env=env).start()
    await mqtt_ready(gw)  # published before the gateway subscribed, it would come retained
    async with device(mosquitto) as d:
        await d.publish("rooms/shelf/in/lamp", b"on", qos=1, retain=True)
        await wait_until(lambda: gw.get_json("/api/rooms/shelf/")["last_id"] == 1, 5,
                         "retained message not stored live")
    gw.terminate()
    again = gateway_factory(env=env, port=gw.port, datadir=gw.datadir).start()
    # The broker replays the retained message when the gateway subscribes again.
    await wait_until(lambda: "ignored a retained message" in again.log(), 15,
                     "the retained message was not replayed")
    assert again.get_json("/api/rooms/shelf/")["last_id"] == 1


async def test_broker_restart_mid_stream_loses_nothing_it_accepted(gateway_factory, mosquitto):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)  # before it, the first message could find no subscription
    total, acked = 60, []

    async def publisher() -> None:
        i = 0
        while i < total:
            try:
                async with device(mosquitto, identifier="stream-dev", clean_session=False) as d:
                    while i < total:
                        body = json.dumps({"message": f"m{i}", "client_id": f"s-{i}"})
                        await d.publish("rooms/stream/in/meter", body.encode(), qos=1)
                        acked.append(i)  # the broker answered PUBACK: it accepted it
                        i += 1
                        if i == total // 2:
                            await asyncio.to_thread(mosquitto.stop)
                            await asyncio.sleep(1.0)
                            await asyncio.to_thread(mosquitto.start)
                        await asyncio.sleep(0.02)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.3)

    await asyncio.wait_for(publisher(), 60)
    await wait_until(
        lambda: gw.get_json("/api/rooms/stream/")["last_id"] >= len(acked), 20,
        "not every accepted message was stored",
    )
    stored = [m["message"] for m in
              gw.get_json("/api/rooms/stream/messages?after=0&limit=500")["messages"]]
    assert sorted(stored) == sorted({f"m{i}" for i in acked})  # all of them, each once
    assert "MQTT broker unreachable" in gw.log()


async def test_embedded_broker_and_idle_device_scopes(gateway_factory):
    port = free_port()
    gw = gateway_factory(env={**FAST, "MQTT_ENABLED": "1", "MQTT_EMBEDDED_PORT": str(port),
                              "MQTT_IDLE_TIMEOUT": "1"}).start()
    await mqtt_ready(gw)
    async with connect(gw, "/ws/chat/lobby/") as browser:
        await asyncio.to_thread(
            subprocess.run, ["mosquitto_pub", "-p", str(port), "-q", "1",
                             "-t", "rooms/lobby/in/sensor1", "-m", "21.5 C"],
            check=True, timeout=10,
        )
        frame = await next_message(browser)
        assert (frame["message"], frame["sender"]["id"]) == ("21.5 C", "sensor1")
        await wait_until(lambda: members(gw, "lobby") == 2, 5, "device not present")
        # Idle for longer than MQTT_IDLE_TIMEOUT: the device's scope closes.
        await wait_until(lambda: members(gw, "lobby") == 1, 6, "idle device still present")
    assert "embedded MQTT broker listening" in gw.log()


async def test_a_browser_message_reaches_devices_subscribed_with_mosquitto_sub(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    # A persistent session subscribed first (-E: exit once the broker confirmed it), so
    # what is published from then on waits for the mosquitto_sub that reads it.
    sub = ["mosquitto_sub", "-p", str(mosquitto.port), "-q", "1", "-t", "rooms/hall/out",
           "-c", "-i", "hall-reader"]
    await asyncio.to_thread(subprocess.run, [*sub, "-E"], check=True, timeout=10)
    async with connect(gw, "/ws/chat/hall/") as browser:
        for text in ("one", "two"):
            await browser.send(json.dumps({"message": text}))
        await collect(browser, 2)
    read = await asyncio.to_thread(subprocess.run, [*sub, "-C", "2", "-W", "15"],
                                   capture_output=True, text=True, timeout=20)
    assert [json.loads(line)["message"] for line in read.stdout.splitlines()] == ["one", "two"]
    with pytest.raises(websockets.InvalidStatus):  # unrelated: MQTT adds no web routes
        async with connect(gw, "/ws/mqtt/"):
            pass


async def test_two_gateways_share_one_broker_without_duplicates(gateway_factory, mosquitto,
                                                                redis_server, tmp_path):
    env = mqtt_env(mosquitto, REDIS_URL=redis_server.url, MQTT_SHARED_GROUP="gateway")
    a = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    b = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    await mqtt_ready(a)
    await mqtt_ready(b)
    total_devices, total_web = 40, 10
    async with connect(a, "/ws/chat/duo/") as on_a, connect(b, "/ws/chat/duo/") as on_b, \
            device(mosquitto) as listener, device(mosquitto) as meter:
        await listener.subscribe("rooms/duo/out", qos=1)
        for i in range(total_devices):
            # No client_id: a message that reached both gateways would be stored twice.
            await meter.publish("rooms/duo/in/meter", f"d{i}".encode(), qos=1)
        for i in range(total_web):
            await on_b.send(json.dumps({"message": f"w{i}"}))
        total = total_devices + total_web
        for ws in (on_a, on_b):
            frames = await collect(ws, total)
            assert [f["id"] for f in frames] == list(range(1, total + 1))
        out = await gather_out(listener, total, timeout=20)
        assert sorted(m["id"] for m in out) == list(range(1, total + 1))  # each exactly once
        assert await nothing_more(listener, 1.0)
    history = a.get_json("/api/rooms/duo/messages?after=0&limit=100")["messages"]
    assert sorted(m["message"] for m in history) == sorted(
        [f"d{i}" for i in range(total_devices)] + [f"w{i}" for i in range(total_web)]
    )
    # Exactly one of the two relays the rooms to MQTT.
    leads = "this process now relays mqtt-out"
    assert (leads in a.log()) != (leads in b.log())


def secured_mosquitto(tmp_path) -> Mosquitto:
    """A mosquitto running deploy/mosquitto/mosquitto.conf, with only paths and port
    rewritten, and a password file made with mosquitto_passwd."""
    deploy = ROOT / "deploy" / "mosquitto"
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate([("gateway", "gw-secret"), ("sensor1", "s1-secret"),
                                          ("sensor2", "s2-secret")]):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd),
                        user, password], check=True, timeout=10)
    passwd.chmod(0o644)
    config = (deploy / "mosquitto.conf").read_text()
    config = config.replace("/mosquitto/config/passwd", str(passwd))
    config = config.replace("/mosquitto/config/acl", str(deploy / "acl"))
    lines = [line for line in config.splitlines()
             if not line.startswith(("listener", "persistence"))]
    return Mosquitto(tmp_path, extra_config="\n".join(lines) + "\n")


async def test_the_deploy_acl_lets_a_device_publish_only_as_itself(gateway_factory, tmp_path):
    broker = secured_mosquitto(tmp_path)
    broker.start()
    try:
        env = mqtt_env(broker, MQTT_URL=f"mqtt://gateway:gw-secret@127.0.0.1:{broker.port}")
        gw = gateway_factory(env=env).start()
        await mqtt_ready(gw)  # it logged in
        with pytest.raises(aiomqtt.MqttError):  # no anonymous clients
            async with device(broker) as anonymous:
                await anonymous.publish("rooms/acl/in/sensor1", b"anon", qos=1)
        async with device(broker, username="sensor1", password="s1-secret") as s1:
            await s1.subscribe("rooms/acl/out", qos=1)
            await s1.publish("rooms/acl/in/sensor2", b"pretending to be sensor2", qos=1)
            await s1.publish("rooms/acl/in/sensor1", b"as myself", qos=1)
            [out] = await gather_out(s1, 1)
            assert (out["message"], out["sender"]["id"]) == ("as myself", "sensor1")
            assert await nothing_more(s1, 1.0)
        history = gw.get_json("/api/rooms/acl/messages")["messages"]
        assert [m["message"] for m in history] == ["as myself"]
    finally:
        broker.stop()


async def test_what_devices_publish_while_the_gateway_restarts_is_stored_once(
    gateway_factory, mosquitto
):
    env = mqtt_env(mosquitto)
    gw = gateway_factory(env=env).start()
    await mqtt_ready(gw)  # its session and subscription exist: the broker queues for it
    assert gw.terminate() == 0
    async with device(mosquitto) as d:  # the gateway is away: its session queues these
        for i in range(5):
            await d.publish("rooms/away/in/meter", f"while away {i}".encode(), qos=1)
    back = gateway_factory(env=env, port=gw.port, datadir=gw.datadir).start()
    await wait_until(lambda: back.get_json("/api/rooms/away/")["last_id"] == 5, 20,
                     "queued messages were not delivered")
    history = back.get_json("/api/rooms/away/messages?after=0")["messages"]
    assert [m["message"] for m in history] == [f"while away {i}" for i in range(5)]


async def test_a_room_created_while_the_layer_is_down_is_still_relayed(
    gateway_factory, mosquitto, redis_server
):
    gw = gateway_factory(env=mqtt_env(mosquitto, REDIS_URL=redis_server.url)).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as d:
        await d.subscribe("rooms/late/out", qos=1)
        redis_server.stop()  # the new room's relay cannot join its group now
        await d.publish("rooms/late/in/probe", b"stored while the layer is down", qos=1)
        await wait_until(lambda: gw.get_json("/api/rooms/late/")["last_id"] == 1, 10,
                         "not stored")
        # Its relay either failed to join (and the next scan starts it again from where it
        # got) or joined a layer that resubscribes on reconnect; either way, once Redis is
        # back, the room's message reaches out exactly once.
        await asyncio.sleep(1.0)
        redis_server.start()
        [out] = await gather_out(d, 1, timeout=15)
        assert (out["id"], out["message"]) == (1, "stored while the layer is down")
        assert await nothing_more(d, 1.0)


async def test_a_message_the_gateway_dies_before_storing_is_delivered_again(
    mosquitto, gateway_factory
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as d:
        await d.publish("rooms/crash/in/probe", b"first", qos=1)
        await wait_until(lambda: gw.get_json("/api/rooms/crash/")["last_id"] == 1, 10,
                         "first not stored")
        # Hold the database's write lock: the gateway receives the next message and waits to
        # store it, and is killed while it waits.
        with database_write_lock(gw):
            await d.publish("rooms/crash/in/probe", b"second", qos=1)  # the broker has it
            await wait_until(lambda: mqtt_status(gw)["received"] == 2, 10,
                             "the gateway did not receive it")  # and the gateway too
            gw.kill()
    back = gateway_factory(env=mqtt_env(mosquitto), port=gw.port, datadir=gw.datadir).start()
    await wait_until(lambda: back.get_json("/api/rooms/crash/")["last_id"] == 2, 15,
                     "the unacknowledged message was not delivered again")
    history = back.get_json("/api/rooms/crash/messages?after=0")["messages"]
    assert [m["message"] for m in history] == ["first", "second"]
