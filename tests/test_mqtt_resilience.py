"""MQTT under faults, through real interfaces: a private mosquitto that restarts (or is
frozen and killed), a SQLite write lock held by another process, thousands of rooms;
real MQTT and WebSocket clients against ``gateway run``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections import Counter

import aiomqtt
import pytest
import redis

from tests.helpers import (
    connect,
    database_write_lock,
    device,
    gather_out,
    mqtt_env,
    mqtt_ready,
    mqtt_status,
    nothing_more,
    readyz,
    relay_status,
    wait_until,
)
from tests.servers import Mosquitto

pytestmark = pytest.mark.slow


class OutListener:
    """A device reading ``<room>/out`` through a persistent session, reconnecting across
    broker restarts: what is published while it is away waits for it in the broker."""

    def __init__(self, broker, room: str) -> None:
        self.broker, self.topic = broker, f"rooms/{room}/out"
        self.ids: list[int] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> OutListener:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                async with device(self.broker, identifier=f"listener-{self.topic}",
                                  clean_session=False) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        self.ids.append(json.loads(message.payload)["id"])
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    async def wait_for_all(self, last: int, timeout: float, *, first: int = 1) -> None:
        """Until every id from ``first`` to ``last`` has been seen (repeats allowed at QoS 1)."""
        expected = set(range(first, last + 1))
        deadline = time.monotonic() + timeout
        while not expected <= set(self.ids):
            if time.monotonic() > deadline:
                missing = sorted(expected - set(self.ids))
                pytest.fail(f"{len(missing)} ids never published on out: {missing[:20]}...")
            await asyncio.sleep(0.1)


# --- item 2: publishing to out survives broker restarts ----------------------------------


async def test_out_resumes_after_a_broker_dies_with_a_publish_pending(gateway_factory, tmp_path):
    # The broker saves its sessions every second, so the listener's survives the SIGKILL.
    broker = Mosquitto(tmp_path, extra_config="allow_anonymous true\nautosave_interval 1\n")
    broker.start()
    try:
        gw = gateway_factory(env=mqtt_env(broker)).start()
        await mqtt_ready(gw)
        async with connect(gw, "/ws/chat/frozen/") as web, OutListener(broker, "frozen") as out:
            await web.send(json.dumps({"message": "m1"}))
            await out.wait_for_all(1, 10)
            await asyncio.sleep(1.5)  # the listener's session is on disk now
            # Frozen, the broker reads nothing: the gateway's publish of m2 waits for its
            # PUBACK on this connection when the broker dies and another one starts.
            os.kill(broker.proc.pid, signal.SIGSTOP)
            await web.send(json.dumps({"message": "m2"}))
            await asyncio.sleep(1.0)
            broker.proc.kill()
            broker.proc.wait(timeout=10)
            broker.proc = None
            killed_at = time.monotonic()
            await asyncio.to_thread(broker.start)
            for i in range(3, 6):
                await web.send(json.dumps({"message": f"m{i}"}))
            await out.wait_for_all(5, 30)
        # Past aiomqtt's 10 s publish timeout on the dead connection, the live one is still
        # the gateway's connection, and it says so.
        await asyncio.sleep(max(0.0, killed_at + 12 - time.monotonic()))
        code, body = readyz(gw)
        assert code == 200 and body["checks"]["mqtt"]["ready"], body
    finally:
        broker.stop()


async def stream_from_a_browser(gw, room: str, stop: asyncio.Event, rate: float) -> int:
    """Post to ``room`` from a WebSocket at ``rate`` per second until ``stop``; how many."""
    sent = 0
    async with connect(gw, f"/ws/chat/{room}/") as web:
        drain = asyncio.create_task(_drain(web))
        while not stop.is_set():
            await web.send(json.dumps({"message": f"s{sent}"}))
            sent += 1
            await asyncio.sleep(1 / rate)
        drain.cancel()
    return sent


async def _drain(web) -> None:
    async for _ in web:  # its own messages come back: read them, as a page does
        pass


async def test_out_resumes_after_five_broker_restarts_under_a_steady_stream(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with OutListener(mosquitto, "steady") as out:
        stop = asyncio.Event()
        sender = asyncio.create_task(stream_from_a_browser(gw, "steady", stop, rate=200))
        for _ in range(5):
            await asyncio.sleep(1.5)
            await asyncio.to_thread(mosquitto.stop)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(mosquitto.start)
        await asyncio.sleep(1.0)
        stop.set()
        sent = await asyncio.wait_for(sender, 10)
        last = gw.get_json("/api/rooms/steady/")["last_id"]
        assert last == sent
        await out.wait_for_all(last, 40)
    await wait_until(lambda: readyz(gw)[0] == 200 and mqtt_status(gw)["ready"], 10,
                     "not ready after the restarts")
    assert gw.log().count("connected to the MQTT broker") >= 6


# --- item 6: a stall in the gateway costs devices nothing ---------------------------------


async def publish_steadily(broker, room: str, device_id: str, count: int, rate: float) -> None:
    """Publish ``count`` messages (each with its client_id) at ``rate`` per second, QoS 1."""
    async with device(broker) as d:
        for i in range(count):
            body = json.dumps({"message": f"m{i}", "client_id": f"{device_id}-{i}"})
            await d.publish(f"rooms/{room}/in/{device_id}", body.encode(), qos=1)
            await asyncio.sleep(1 / rate)


def stored_texts(gw, room: str) -> list[str]:
    page = gw.get_json(f"/api/rooms/{room}/messages?after=0&limit=500")["messages"]
    return [m["message"] for m in page]


async def errors_of(broker, topic: str, errors: list[dict], ready: asyncio.Event) -> None:
    async with device(broker) as d:
        await d.subscribe(topic, qos=1)
        ready.set()
        async for message in d.messages:
            errors.append(json.loads(message.payload))


async def test_a_database_stall_does_not_count_against_a_devices_rate(
    gateway_factory, mosquitto
):
    # The default flood limit (5/s, burst 20), and a device publishing at 5/s.
    gw = gateway_factory(env={"MQTT_ENABLED": "1", "MQTT_URL": mosquitto.url}).start()
    await mqtt_ready(gw)
    errors: list[dict] = []
    listening = asyncio.Event()
    watcher = asyncio.create_task(errors_of(mosquitto, "rooms/stall/error/meter", errors,
                                            listening))
    await asyncio.wait_for(listening.wait(), 10)
    total = 100
    publisher = asyncio.create_task(publish_steadily(mosquitto, "stall", "meter", total, 5))
    await wait_until(lambda: gw.get_json("/api/rooms/stall/")["last_id"] >= 5, 10,
                     "the device's first messages were not stored")
    with database_write_lock(gw):
        await asyncio.sleep(10)  # the device goes on publishing; the gateway cannot store
    await asyncio.wait_for(publisher, 60)
    with contextlib.suppress(AssertionError):  # whatever is missing is reported below
        await wait_until(lambda: len(stored_texts(gw, "stall")) + len(errors) >= total, 30, "")
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    refused = Counter(error["code"] for error in errors)
    assert not refused, f"{sum(refused.values())} of {total} refused: {dict(refused)}"
    assert sorted(stored_texts(gw, "stall")) == sorted(f"m{i}" for i in range(total))
    assert "rate_limited" not in gw.log()


async def test_a_message_the_database_refuses_is_stored_once_it_can(gateway_factory, mosquitto):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as d:
        await d.publish("rooms/refused/in/probe", b"first", qos=1)
        await wait_until(lambda: gw.get_json("/api/rooms/refused/")["last_id"] == 1, 10,
                         "first not stored")
        # Longer than SQLite's 20 s busy timeout: the gateway's write fails ("database is
        # locked"); the message must wait and be stored, not refused and dropped.
        with database_write_lock(gw):
            for text in ("second", "third"):
                await d.publish("rooms/refused/in/probe", text.encode(), qos=1)
            await wait_until(lambda: "database is locked" in gw.log(), 40,
                             "the write did not fail")
        await wait_until(lambda: gw.get_json("/api/rooms/refused/")["last_id"] == 3, 30,
                         "the refused messages were not stored")
    assert stored_texts(gw, "refused") == ["first", "second", "third"]


async def test_a_message_still_waiting_at_a_graceful_stop_is_delivered_again(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as d:
        await d.publish("rooms/stopping/in/probe", b"first", qos=1)
        await wait_until(lambda: gw.get_json("/api/rooms/stopping/")["last_id"] == 1, 10,
                         "first not stored")
        with database_write_lock(gw):
            await d.publish("rooms/stopping/in/probe", b"second", qos=1)
            await wait_until(lambda: mqtt_status(gw)["received"] == 2, 10,
                             "the gateway did not receive it")  # it waits for the database
            assert await asyncio.to_thread(gw.terminate, 60) == 0
    back = gateway_factory(env=mqtt_env(mosquitto), port=gw.port, datadir=gw.datadir).start()
    await wait_until(lambda: back.get_json("/api/rooms/stopping/")["last_id"] == 2, 20,
                     "the message waiting at the stop was not delivered again")
    assert stored_texts(back, "stopping") == ["first", "second"]


# --- item 9: idle rooms cost nothing -----------------------------------------------------

MANY_ROOMS = {"GATEWAY_ROOM_CREATE_PER_MINUTE": "1000000", "GATEWAY_MAX_ROOMS": "0"}


def room_subscriptions(redis_server) -> int:
    """How many room groups the gateway is subscribed to in Redis (channels_redis pub/sub)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        return sum(b"__group__room." in name for name in client.pubsub_channels())
    finally:
        client.close()


def database_count(gw, sql: str) -> int:
    db = sqlite3.connect(gw.datadir / "gateway.sqlite3", timeout=10)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


async def open_rooms(broker, names: list[str]) -> None:
    """One message from a device into each room (which creates it)."""
    async with device(broker) as d:
        for name in names:
            await d.publish(f"rooms/{name}/in/maker", b"hello", qos=1)


async def test_idle_relays_close_and_wake_up_for_a_new_message(
    gateway_factory, mosquitto, redis_server
):
    gw = gateway_factory(env=mqtt_env(mosquitto, REDIS_URL=redis_server.url,
                                      MQTT_IDLE_TIMEOUT="2", **MANY_ROOMS)).start()
    await mqtt_ready(gw)
    names = [f"idle{i:02d}" for i in range(30)]
    await open_rooms(mosquitto, names)
    await wait_until(lambda: database_count(
        gw, "SELECT count(*) FROM gateway_room WHERE last_seq = 1") == 30, 20, "rooms not stored")
    # The relay published each room's message, then left the rooms after MQTT_IDLE_TIMEOUT:
    # no room is followed and no subscription to a room's group is left.
    await wait_until(lambda: relay_status(gw, "mqtt-out").get("rooms") == 0, 15,
                     "rooms still followed")
    await wait_until(lambda: room_subscriptions(redis_server) == 0, 5,
                     "the hub is still subscribed to idle rooms")
    assert database_count(gw, "SELECT count(*) FROM gateway_relaycursor WHERE last_seq = 1") == 30
    # A new message in an idle room still reaches out, from a browser and from a device (the
    # relay follows a room again as soon as something is stored in it).
    async with OutListener(mosquitto, "idle07") as out7, OutListener(mosquitto, "idle08") as out8:
        async with connect(gw, "/ws/chat/idle07/") as web:
            await web.send(json.dumps({"message": "after a while"}))
            await out7.wait_for_all(2, 10, first=2)
        async with device(mosquitto) as d:
            await d.publish("rooms/idle08/in/maker", b"me again", qos=1)
            await out8.wait_for_all(2, 10, first=2)
        assert sorted(out7.ids) == [2] and sorted(out8.ids) == [2]  # what is new, once


async def test_a_restart_with_thousands_of_rooms_serves_devices_at_once(
    gateway_factory, mosquitto
):
    env = mqtt_env(mosquitto, **MANY_ROOMS)
    gw = gateway_factory(env=env).start()
    await mqtt_ready(gw)
    rooms, batch = 2000, 500  # in batches: the broker queues at most 1000 for a client
    published = "SELECT count(*) FROM gateway_relaycursor WHERE last_seq = 1"
    for start in range(0, rooms, batch):
        await open_rooms(mosquitto, [f"big{i:04d}" for i in range(start, start + batch)])
        await wait_until(lambda: database_count(gw, published) == start + batch, 60,  # noqa: B023
                         "not every room was relayed")
    assert gw.terminate() == 0
    async with OutListener(mosquitto, "big1234") as out, device(mosquitto) as d:
        launched = time.monotonic()
        again = gateway_factory(env=env, port=gw.port, datadir=gw.datadir).start()
        await mqtt_ready(again)
        ready = time.monotonic()
        await d.publish("rooms/big1234/in/probe", b"right away", qos=1)
        await wait_until(lambda: again.get_json("/api/rooms/big1234/")["last_id"] == 2, 20,
                         "not stored")
        stored = time.monotonic()
        await out.wait_for_all(2, 20, first=2)
        published = time.monotonic()
    print(f"restart with {rooms} rooms: ready {ready - launched:.2f}s after launch; the "
          f"device's message stored {stored - ready:.2f}s and on out {published - ready:.2f}s "
          f"after ready")
    # Nothing to catch up: no relay opened at the start (the old start opened one per room,
    # each joining its group and reading the database, ahead of any device message).
    assert stored - ready < 1.0
    assert relay_status(again, "mqtt-out")["rooms"] <= 1


async def test_a_device_sending_refused_payloads_is_bounded_in_logs_and_replies(
    gateway_factory, mosquitto
):
    """Every payload spends the device's flood limit, refusals are logged five times per
    code and then counted, and error replies are paced: one device repeating a mistake
    cannot fill the log or the outbox of error replies."""
    gw = gateway_factory(env={"MQTT_ENABLED": "1", "MQTT_URL": mosquitto.url,
                              "GATEWAY_RATE_LIMIT_PER_SECOND": "5",
                              "GATEWAY_RATE_LIMIT_BURST": "20"}).start()
    await mqtt_ready(gw)
    async with device(mosquitto) as bad, device(mosquitto) as good:
        await bad.subscribe("rooms/noise/error/bad", qos=1)
        await good.subscribe("rooms/noise/out", qos=1)
        for _ in range(300):
            await bad.publish("rooms/noise/in/bad", b"{not json", qos=0)
        replies = await gather_out(bad, 10, timeout=20)
        assert {reply["code"] for reply in replies} <= {"invalid_json", "rate_limited"}
        assert await nothing_more(bad, wait=1.0)  # the rest of the burst was not answered
        await good.publish("rooms/noise/in/good", b"still served", qos=1)
        (out,) = await gather_out(good, 1, timeout=10)
        assert out["message"] == "still served"
    await wait_until(lambda: mqtt_status(gw)["received"] >= 301, 20, "not all received")
    log = gw.log()
    assert log.count("refused device message invalid_json") == 5
    assert log.count("refused device message rate_limited") == 5
    assert "(more are counted, not logged)" in log
