"""The embedded MQTT broker (amqtt inside ``gateway run``): nothing it acknowledged is lost,
and it is not open. Real ``gateway run`` processes, real paho/aiomqtt clients and a password
file made by the real ``mosquitto_passwd``; unit tests for the password file and the ACL.

    python -m tests.test_mqtt_broker [--devices 100] [--rate 5] [--kill-after 5]

runs the kill -9 measurement behind the README figures (not part of the suite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.client import CallbackAPIVersion, Client

from protocols.mqtt.wire import varint
from tests.helpers import FAST, database_write_lock, wait_until
from tests.servers import Gateway, free_port


def embedded_env(port: int, **extra: str) -> dict[str, str]:
    """A gateway running the embedded broker on ``port``."""
    return {**FAST, "MQTT_ENABLED": "1", "MQTT_EMBEDDED_PORT": str(port), **extra}


async def gateway_connected(gw: Gateway, timeout: float = 15) -> None:
    """The gateway's own client is connected to its broker and subscribed."""
    await wait_until(lambda: "connected to the MQTT broker" in gw.log(), timeout,
                     "the gateway did not connect to its embedded broker")


def stored(gw: Gateway, room: str, cookie: str | None = None) -> list[str]:
    """Every message text of a room, oldest first, through the history API's pages."""
    texts: list[str] = []
    after = 0
    while True:
        request = urllib.request.Request(
            f"{gw.http}/api/rooms/{room}/messages?after={after}&limit=500",
            headers={"Cookie": cookie} if cookie else {},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            page = json.loads(response.read())
        texts += [m["message"] for m in page["messages"]]
        if page["next_after"] is None:
            return texts
        after = page["next_after"]


class Fleet:
    """paho devices publishing QoS 1 into one room, each with its own network thread that
    reconnects by itself and then sends again what was not acknowledged (as devices do)."""

    def __init__(self, port: int, count: int, *, room: str = "fleet", tag: str = "d",
                 inflight: int = 20) -> None:
        self.room = room
        self.clients: list[tuple[str, Client]] = []
        for i in range(count):
            device = f"{tag}{i}"
            client = Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-{device}")
            client.reconnect_delay_set(min_delay=1, max_delay=2)
            client.max_inflight_messages_set(inflight)  # paho's default: 20
            client.on_publish = self._on_publish
            client.connect_async("127.0.0.1", port, keepalive=30)
            self.clients.append((device, client))
        self.sent: list[tuple[str, Client, int]] = []  # text, its client, its message id
        self._acked: set[tuple[Client, int]] = set()
        self._lock = threading.Lock()
        self._round = 0

    def _on_publish(self, client: Client, userdata, mid: int, reason_code, properties) -> None:
        # No lock of ours here: paho calls this holding its own, which publish() takes too.
        self._acked.add((client, mid))

    def start(self) -> None:
        for _, client in self.clients:
            client.loop_start()

    def connected(self) -> bool:
        return all(client.is_connected() for _, client in self.clients)

    def publish_round(self) -> None:
        """One message from each device: unique text, used as its idempotency key too."""
        self._round += 1
        for device, client in self.clients:
            text = f"{device}-{self._round}"
            body = json.dumps({"message": text, "client_id": text}).encode()
            info = client.publish(f"rooms/{self.room}/in/{device}", body, qos=1)
            with self._lock:
                self.sent.append((text, client, info.mid))

    def acked(self) -> set[str]:
        """The texts whose PUBACK the device received."""
        acked = set(self._acked)  # copied in one step (C code, under the GIL)
        with self._lock:
            return {text for text, client, mid in self.sent if (client, mid) in acked}

    def published(self) -> set[str]:
        with self._lock:
            return {text for text, _, _ in self.sent}

    def stop(self) -> None:
        for _, client in self.clients:
            client.disconnect()
            client.loop_stop()


async def publish_every(fleet: Fleet, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(fleet.publish_round)
        await asyncio.sleep(interval)


# --- 1. nothing acknowledged is lost --------------------------------------------------------


@pytest.mark.timeout(300)
async def test_a_kill_loses_no_device_message_the_embedded_broker_acknowledged(gateway_factory):
    port = free_port()
    gw = gateway_factory(env=embedded_env(port)).start()
    await gateway_connected(gw)
    fleet = Fleet(port, 5)
    fleet.start()
    try:
        await wait_until(fleet.connected, 15, "devices did not connect")
        stop = asyncio.Event()
        publisher = asyncio.create_task(publish_every(fleet, 0.02, stop))
        await wait_until(lambda: len(fleet.acked()) >= 50, 20, "nothing acknowledged")
        # Hold the database's write lock: what arrives now cannot be stored. Whatever the
        # broker acknowledges meanwhile must survive the kill.
        with database_write_lock(gw):
            await asyncio.sleep(1.5)
            gw.kill()
        await asyncio.sleep(0.5)  # devices go on publishing into the void (queued by paho)
        stop.set()
        await publisher
        back = gateway_factory(env=embedded_env(port), port=gw.port, datadir=gw.datadir).start()
        await gateway_connected(back)
        published = fleet.published()
        # Under load a message the gateway took may go unacknowledged: the broker closes that
        # device after ACK_TIMEOUT (60 s) and it sends the message again, so allow for it.
        try:
            await wait_until(lambda: fleet.acked() == published, 150,
                             "devices did not get every message acknowledged after the restart")
        except AssertionError:
            missing = sorted(published - fleet.acked())
            kept = set(stored(back, fleet.room))
            raise AssertionError(
                f"{len(missing)} of {len(published)} never acknowledged after the restart "
                f"(stored: {[t for t in missing if t in kept][:20]}, not stored: "
                f"{[t for t in missing if t not in kept][:20]}); devices connected: "
                f"{[c.is_connected() for _, c in fleet.clients]}\n"
                + "\n".join(back.log().splitlines()[-40:])
            ) from None
        texts = stored(back, fleet.room)
    finally:
        await asyncio.to_thread(fleet.stop)
    acked = fleet.acked()
    lost = acked - set(texts)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged messages lost"
    assert len(texts) == len(set(texts)), "a message was stored twice"
    assert set(texts) <= published


# The chain itself, on a broker in this process, so a test can hold the gateway's
# acknowledgement (the gateway's client here is an aiomqtt client with manual acks, as
# protocols/mqtt/server.py makes it).

GATEWAY_ID, GATEWAY_TOPICS = "gw-test", "rooms/+/in/+"


@pytest.fixture
async def broker():
    from gateway.ratelimit import TokenBucket
    from protocols.mqtt.broker import EmbeddedBroker

    embedded = EmbeddedBroker(
        "127.0.0.1", free_port(), prefix="rooms", gateway_client_id=GATEWAY_ID,
        allow_anonymous=True, max_packet_size=65_536,
        flood_limit=lambda: TokenBucket(rate=1000, burst=1000),
    )
    await embedded.start()
    yield embedded
    await asyncio.wait_for(embedded.stop(), 15)


def gateway_client(broker, **kwargs) -> aiomqtt.Client:
    """A stand-in for the gateway's client: its id and credentials, acknowledging by hand."""
    client = aiomqtt.Client("127.0.0.1", broker.port, identifier=GATEWAY_ID,
                            username=broker.policy.gateway_user,
                            password=broker.policy.gateway_password, clean_session=False,
                            **kwargs)
    client._client.manual_ack_set(True)  # noqa: SLF001 - as protocols/mqtt/server.py does
    return client


def acknowledge(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    client._client.ack(message.mid, message.qos)  # noqa: SLF001


def device_client(broker, identifier: str | None = None, **kwargs) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", broker.port, identifier=identifier, **kwargs)


async def still_pending(task: asyncio.Task, wait: float = 0.5) -> bool:
    await asyncio.wait({task}, timeout=wait)
    return not task.done()


def gateway_side(broker):
    """The gateway's session and connection handler inside the broker."""
    return broker._broker.sessions[GATEWAY_ID]  # noqa: SLF001


@pytest.mark.parametrize("qos", [1, 2])
async def test_a_device_is_acknowledged_only_once_the_gateway_acknowledged_its_copy(broker, qos):
    async with device_client(broker, "meter") as meter:
        publish = asyncio.create_task(meter.publish("rooms/lab/in/meter", b"21.5", qos=qos))
        assert await still_pending(publish), "acknowledged with no gateway to take it"
        async with gateway_client(broker) as gateway:
            await gateway.subscribe(GATEWAY_TOPICS, qos=1)
            message = await asyncio.wait_for(anext(aiter(gateway.messages)), 10)
            assert (str(message.topic), message.payload, message.qos) == (
                "rooms/lab/in/meter", b"21.5", 1
            )
            assert await still_pending(publish), "acknowledged before the gateway stored it"
            acknowledge(gateway, message)
            await asyncio.wait_for(publish, 10)
            # Taken once: a QoS 2 message is not handed over again on its PUBREL.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(aiter(gateway.messages)), 0.5)
            session, handler = gateway_side(broker)
            assert not handler._puback_waiters and not session.inflight_out  # noqa: SLF001


async def test_a_message_the_gateway_does_not_take_in_time_is_left_unacknowledged(
    broker, monkeypatch
):
    from protocols.mqtt import broker_relay

    monkeypatch.setattr(broker_relay, "GATEWAY_WAIT", 0.5)
    gone = threading.Event()
    meter = Client(CallbackAPIVersion.VERSION2, client_id="meter")
    meter.on_disconnect = lambda *args: gone.set()
    meter.connect("127.0.0.1", broker.port)
    meter.loop_start()
    try:
        info = meter.publish("rooms/lab/in/meter", b"x", qos=1)
        # The broker closes the connection, unacknowledged: the device sends the message
        # again when it reconnects.
        assert await asyncio.to_thread(gone.wait, 10), "the connection was not closed"
        assert not info.is_published()
    finally:
        meter.disconnect()
        meter.loop_stop()


async def test_devices_leaving_while_their_messages_wait_leak_nothing(broker):
    async with gateway_client(broker) as gateway:
        await gateway.subscribe(GATEWAY_TOPICS, qos=1)
        async with device_client(broker, "meter") as meter:
            for i in range(5):
                meter._client.publish("rooms/lab/in/meter", f"m{i}".encode(), qos=1)  # noqa: SLF001
            received = [await asyncio.wait_for(anext(aiter(gateway.messages)), 10)
                        for _ in range(5)]
        session, handler = gateway_side(broker)
        assert len(handler._puback_waiters) == 5  # noqa: SLF001 - the ids stay taken...
        for message in received:
            acknowledge(gateway, message)
        await wait_until(lambda: not handler._puback_waiters and not session.inflight_out,  # noqa: SLF001
                         5, "waiters left after the gateway answered")  # ...until answered
        # And the gateway leaving with messages unanswered frees them too.
        async with device_client(broker, "meter") as meter:
            meter._client.publish("rooms/lab/in/meter", b"late", qos=1)  # noqa: SLF001
            await asyncio.wait_for(anext(aiter(gateway.messages)), 10)
    await wait_until(lambda: not handler._puback_waiters and not session.inflight_out,  # noqa: SLF001
                     5, "waiters left after the gateway left")


# --- 2. the broker is not open ----------------------------------------------------------------


def password_file(tmp_path: Path) -> Path:
    """Made by the real mosquitto_passwd: PBKDF2 ($7$, its default) and the older SHA-512 ($6$),
    with a ``gateway`` line as deploy/mosquitto's file has."""
    path = tmp_path / "passwd"
    users = [("sensor1", "s1-secret", []), ("sensor2", "s2-secret", []),
             ("gateway", "gw-file-secret", []), ("legacy", "old-secret", ["-H", "sha512"])]
    for i, (user, password, hashing) in enumerate(users):
        subprocess.run(["mosquitto_passwd", *hashing, *(["-c"] if i == 0 else []), "-b",
                        str(path), user, password], check=True, timeout=10)
    return path


def failures(codes) -> list[bool]:
    return [code.is_failure for code in codes]


async def refused(port: int, **kwargs) -> bool:
    """Whether the broker refuses this CONNECT."""
    try:
        async with aiomqtt.Client("127.0.0.1", port, timeout=10, **kwargs):
            return False
    except aiomqtt.MqttError:
        return True


async def gather(client: aiomqtt.Client, timeout: float = 1.0) -> list[tuple[str, dict]]:
    """Every message a subscribed client receives until ``timeout`` passes without one."""
    received = []
    while True:
        try:
            message = await asyncio.wait_for(anext(aiter(client.messages)), timeout)
        except TimeoutError:
            return received
        received.append((str(message.topic), json.loads(message.payload)))


async def test_devices_log_in_from_a_mosquitto_passwd_file_and_publish_only_as_themselves(
    gateway_factory, tmp_path
):
    port = free_port()
    gw = gateway_factory(env=embedded_env(
        port, MQTT_DEVICE_PASSWORDS=str(password_file(tmp_path)), GATEWAY_REQUIRE_LOGIN="1",
    )).start()
    await gateway_connected(gw)  # with its own credentials
    assert await refused(port)  # anonymous: off with GATEWAY_REQUIRE_LOGIN=1
    assert await refused(port, username="sensor1", password="wrong")
    assert await refused(port, username="nobody", password="s1-secret")
    assert await refused(port, username="gateway", password="gw-file-secret")  # reserved
    async with aiomqtt.Client("127.0.0.1", port, username="sensor1", password="s1-secret",
                              timeout=10) as s1:
        # Reading: what deploy/mosquitto's ACL lets a device read, nothing wider.
        assert failures(await s1.subscribe("rooms/acl/out", qos=1)) == [False]
        assert failures(await s1.subscribe("rooms/+/error/sensor1", qos=1)) == [False]
        for wider in ("#", "rooms/#", "rooms/+/in/+", "rooms/acl/error/sensor2",
                      "rooms/acl/error/+", "rooms/+/+"):
            assert failures(await s1.subscribe(wider, qos=1)) == [True], wider
        await s1.publish("rooms/acl/in/sensor2", b"pretending to be sensor2", qos=1)
        await s1.publish("rooms/acl/out", b'{"text": "fake"}', qos=1)
        await s1.publish("rooms/acl/in/sensor1", b"as myself", qos=1)
        async with aiomqtt.Client("127.0.0.1", port, username="legacy", password="old-secret",
                                  timeout=10) as legacy:  # a $6$ line
            await legacy.publish("rooms/acl/in/legacy", b"old hash", qos=1)
        received = await gather(s1)
    assert [(topic, m["message"], m["sender"]["id"]) for topic, m in received] == [
        ("rooms/acl/out", "as myself", "sensor1"), ("rooms/acl/out", "old hash", "legacy"),
    ]
    gw.create_user("staff", "staff-password", staff=True)  # history needs a login here
    assert stored(gw, "acl", gw.login("staff", "staff-password")) == ["as myself", "old hash"]
    assert "embedded broker refused a publish" in gw.log()
    assert "gw-file-secret" not in gw.log() and "s1-secret" not in gw.log()


async def test_anonymous_devices_cannot_publish_as_the_gateway_nor_read_other_devices(
    gateway_factory
):
    port = free_port()
    gw = gateway_factory(env=embedded_env(port)).start()  # development: anonymous allowed
    await gateway_connected(gw)
    async with aiomqtt.Client("127.0.0.1", port, timeout=10) as device:
        assert failures(await device.subscribe("rooms/inj/out", qos=1)) == [False]
        assert failures(await device.subscribe("rooms/inj/error/+", qos=1)) == [False]
        for wider in ("#", "rooms/+/in/+", "rooms/inj/in/meter"):
            assert failures(await device.subscribe(wider, qos=1)) == [True], wider
        fake = json.dumps({"type": "message", "id": 99, "message": "fake"}).encode()
        await device.publish("rooms/inj/out", fake, qos=1)
        await device.publish("rooms/inj/error/meter", b'{"type": "error"}', qos=1)
        await device.publish("elsewhere/topic", b"not a gateway topic", qos=1)
        await device.publish("rooms/inj/in/meter", b"real", qos=1)
        received = await gather(device)
    assert [(topic, m["message"], m["id"]) for topic, m in received] == [
        ("rooms/inj/out", "real", 1)
    ]


async def test_the_gateway_client_id_cannot_be_taken_over(gateway_factory):
    port = free_port()
    gw = gateway_factory(env=embedded_env(port, MQTT_CLIENT_ID="gw-fixed")).start()
    await gateway_connected(gw)
    assert await refused(port, identifier="gw-fixed")  # anonymous, with the gateway's id
    assert await refused(port, identifier="gw-fixed", clean_session=False)
    assert await refused(port, username="gateway")
    async with aiomqtt.Client("127.0.0.1", port, timeout=10) as device:
        await device.publish("rooms/own/in/meter", b"still served", qos=1)
    assert stored(gw, "own") == ["still served"]
    assert "MQTT broker unreachable" not in gw.log()  # its connection was never taken


def vmrss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def mqtt_string(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def send_huge_publish(port: int, size: int) -> int:
    """A raw MQTT client: CONNECT, then a PUBLISH of ``size`` bytes streamed in chunks until
    the broker closes the connection; how many payload bytes it could send."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        connect = mqtt_string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + \
            mqtt_string(b"huge")
        sock.sendall(bytes([0x10]) + varint(len(connect)) + connect)
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK: accepted
        topic = mqtt_string(b"rooms/big/in/blob")
        sock.sendall(bytes([0x30]) + varint(len(topic) + size) + topic)
        sent, chunk = 0, b"\0" * 65_536
        try:
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        return sent


async def test_a_packet_over_the_size_limit_is_refused_before_it_is_read(gateway_factory):
    port = free_port()
    gw = gateway_factory(env=embedded_env(port)).start()  # MQTT_MAX_PACKET_SIZE: 256 KiB
    await gateway_connected(gw)
    before = vmrss(gw.proc.pid)
    size = 50 * 2**20
    sent = await asyncio.to_thread(send_huge_publish, port, size)
    assert sent < size / 2, "the broker went on reading a 50 MB packet"
    grown = vmrss(gw.proc.pid) - before
    assert grown < 20 * 2**20, f"the gateway grew by {grown // 2**20} MB"
    async with aiomqtt.Client("127.0.0.1", port, timeout=10) as device:  # others are served
        await device.publish("rooms/big/in/meter", b"small", qos=1)
    assert stored(gw, "big") == ["small"]
    assert "packet_too_large" in gw.log()


async def test_production_mode_warns_when_the_embedded_broker_is_reachable(gateway_factory):
    port = free_port()
    gw = gateway_factory(env=embedded_env(
        port, DJANGO_DEBUG="0", DJANGO_SECRET_KEY="k" * 40 + "abcdefghij0123456789",
        DJANGO_ALLOWED_HOSTS="127.0.0.1", MQTT_EMBEDDED_HOST="0.0.0.0",
    )).start()
    await gateway_connected(gw)
    log = gw.log()
    assert "WARNING: the embedded MQTT broker listens on 0.0.0.0" in log  # stderr
    assert '"level": "warning", "logger": "gateway.adapters"' in log  # and the log line
    assert await refused(port)  # anonymous: off in production mode
    assert "WARNING: the embedded MQTT broker accepts no device" in log  # and no accounts


async def test_development_mode_on_all_interfaces_warns(gateway_factory):
    gw = gateway_factory(env={"GATEWAY_HOST": "0.0.0.0"}).start()
    assert "WARNING: development mode (DJANGO_DEBUG=1) on 0.0.0.0" in gw.log()
    quiet = gateway_factory(datadir=gw.datadir / "quiet").start()  # 127.0.0.1
    assert "WARNING" not in quiet.log()


# --- 3. one connection, one flood limit -----------------------------------------------------


async def test_rotating_device_ids_on_one_connection_does_not_bypass_the_flood_limit(
    gateway_factory
):
    port = free_port()
    gw = gateway_factory(env={"MQTT_ENABLED": "1", "MQTT_EMBEDDED_PORT": str(port),
                              "GATEWAY_RATE_LIMIT_PER_SECOND": "2",
                              "GATEWAY_RATE_LIMIT_BURST": "4"}).start()
    await gateway_connected(gw)
    started = time.monotonic()
    async with aiomqtt.Client("127.0.0.1", port, timeout=20) as device:
        # QoS 1, a new device id each time: held back to the connection's pace, not lost
        # (each id alone would have a full bucket at the gateway).
        await asyncio.gather(*(device.publish(f"rooms/flood/in/r{i}", f"m{i}".encode(), qos=1)
                               for i in range(14)))
        acknowledged = time.monotonic() - started
        # QoS 0 past the limit: dropped, the device told on its error topic.
        await device.subscribe("rooms/flood/error/+", qos=1)
        for i in range(10):
            await device.publish(f"rooms/flood/in/q{i}", f"q{i}".encode(), qos=0)
        errors = await gather(device)
    texts = stored(gw, "flood")
    held = [t for t in texts if t.startswith("m")]
    assert sorted(held) == sorted(f"m{i}" for i in range(14))  # every one, once
    assert held == [f"m{i}" for i in range(14)]  # in the order sent
    assert acknowledged >= (14 - 4) / 2 - 1, f"14 acknowledged in {acknowledged:.1f}s"
    assert len(texts) - len(held) < 10
    assert errors and {m["code"] for _, m in errors} == {"rate_limited"}
    assert gw.log().count("over the flood limit") == 1  # sampled, not one line per packet


async def test_what_a_device_held_back_during_a_stalled_store_is_not_over_the_flood_limit(
    gateway_factory
):
    port = free_port()
    gw = gateway_factory(env={"MQTT_ENABLED": "1", "MQTT_EMBEDDED_PORT": str(port),
                              "GATEWAY_RATE_LIMIT_PER_SECOND": "5",
                              "GATEWAY_RATE_LIMIT_BURST": "5"}).start()
    await gateway_connected(gw)
    # One device, under its limit (4 a second), with 5 messages in flight at most.
    fleet = Fleet(port, 1, room="steady", inflight=5)
    fleet.start()
    try:
        await wait_until(fleet.connected, 15, "the device did not connect")
        stop = asyncio.Event()
        publisher = asyncio.create_task(publish_every(fleet, 0.25, stop))
        await wait_until(lambda: len(fleet.acked()) >= 4, 10, "nothing acknowledged")
        # The store stalls for 3 s: the device's messages wait unacknowledged (paho sends 5
        # and queues the rest, to send them all at once when the store is back).
        with database_write_lock(gw):
            await asyncio.sleep(3)
        await asyncio.sleep(2)
        stop.set()
        await publisher
        published = fleet.published()
        await wait_until(lambda: fleet.acked() == published, 30, "not all acknowledged")
    finally:
        await asyncio.to_thread(fleet.stop)
    # Nothing dropped by the broker's limit (the gateway's own limit per device is counted
    # the same way, on arrival, by protocols/mqtt/server.py).
    assert "over the flood limit" not in gw.log()


# --- unit: the password file, the ACL, the packet framing -------------------------------------


def test_password_hashes_made_by_mosquitto_passwd_are_checked(tmp_path):
    from protocols.mqtt.broker_auth import PasswordFile, password_check

    users = PasswordFile(password_file(tmp_path)).users()
    assert users["sensor1"].startswith("$7$101$") and users["legacy"].startswith("$6$")
    assert password_check(users["sensor1"], "s1-secret")
    assert password_check(users["legacy"], "old-secret")
    assert not password_check(users["sensor1"], "s2-secret")
    assert not password_check(users["legacy"], "")
    for broken in ("", "plain", "$7$101$", "$7$x$c2FsdA==$aGFzaA==", "$7$0$c2FsdA==$aGFzaA==",
                   "$7$101$!!$aGFzaA==", "$6$c2FsdA==$", "$5$c2FsdA==$aGFzaA==",
                   "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"):
        assert not password_check(broken, ""), broken


def test_the_password_file_is_parsed_and_read_again_when_it_changes(tmp_path):
    from protocols.mqtt.broker_auth import PasswordFile, password_file_parse

    assert password_file_parse("# comment\n\n a:$7$x \nno-colon\nb:c:d\n") == {
        "a": "$7$x", "b": "c:d"
    }
    path = password_file(tmp_path)
    passwords = PasswordFile(path)
    assert passwords.check("sensor2", "s2-secret")
    subprocess.run(["mosquitto_passwd", "-D", str(path), "sensor2"], check=True, timeout=10)
    subprocess.run(["mosquitto_passwd", "-b", str(path), "sensor3", "s3-secret"], check=True,
                   timeout=10)
    assert not passwords.check("sensor2", "s2-secret")
    assert passwords.check("sensor3", "s3-secret")
    with pytest.raises(OSError):
        PasswordFile(tmp_path / "missing")


def policy(tmp_path=None, *, anonymous: bool = False):
    from protocols.mqtt.broker_auth import BrokerPolicy, PasswordFile

    return BrokerPolicy(prefix="rooms", gateway_client_id="gw-1", gateway_password="pw",
                        passwords=PasswordFile(password_file(tmp_path)) if tmp_path else None,
                        allow_anonymous=anonymous)


def test_who_logs_in(tmp_path):
    from protocols.mqtt.broker_auth import ANONYMOUS, GATEWAY, Client, LoginRefused

    accounts = policy(tmp_path)
    assert accounts.authenticate("gw-1", "gateway", "pw") == GATEWAY
    assert accounts.authenticate("any", "sensor1", "s1-secret") == Client("device", "sensor1")
    assert accounts.authenticate("any", "sensor1", b"s1-secret") == Client("device", "sensor1")
    for client_id, user, password in [
        ("gw-1", None, None), ("gw-1", "gateway", "wrong"), ("gw-1", "sensor1", "s1-secret"),
        ("other", "gateway", "pw"), ("other", "gateway", "gw-file-secret"),
        ("any", "sensor1", "wrong"), ("any", "sensor1", None), ("any", "unknown", "x"),
        ("any", None, None),
    ]:
        with pytest.raises(LoginRefused):
            accounts.authenticate(client_id, user, password)
    open_door = policy(tmp_path, anonymous=True)
    assert open_door.authenticate("any", None, None) == ANONYMOUS
    with pytest.raises(LoginRefused):  # a wrong password is refused, not made anonymous
        open_door.authenticate("any", "sensor1", "wrong")
    # Without a password file a user name proves nothing: anonymous, if allowed at all.
    assert policy(anonymous=True).authenticate("any", "sensor1", None) == ANONYMOUS
    with pytest.raises(LoginRefused):
        policy().authenticate("any", "sensor1", "s1-secret")


PUBLISH_RULES = [
    # (topic, gateway, sensor1, anonymous)
    ("rooms/lobby/in/sensor1", False, True, True),
    ("rooms/lobby/in/sensor2", False, False, True),
    ("rooms/lobby/out", True, False, False),
    ("rooms/lobby/error/sensor1", True, False, False),
    ("rooms/lobby/in/sensor1/extra", False, False, False),
    ("rooms/lobby/in", False, False, False),
    ("other/lobby/in/sensor1", False, False, False),
    ("rooms/+/in/sensor1", False, False, False),
    ("rooms/#", False, False, False),
    ("$SYS/rooms/lobby/out", False, False, False),
    ("", False, False, False),
]


@pytest.mark.parametrize(("topic", "gateway", "sensor1", "anonymous"), PUBLISH_RULES)
def test_who_may_publish_where(topic, gateway, sensor1, anonymous):
    from protocols.mqtt.broker_auth import ANONYMOUS, GATEWAY, Client

    rules = policy()
    assert rules.may_publish(GATEWAY, topic) is gateway
    assert rules.may_publish(Client("device", "sensor1"), topic) is sensor1
    assert rules.may_publish(ANONYMOUS, topic) is anonymous


SUBSCRIBE_RULES = [
    # (filter, sensor1, anonymous); the gateway may read anything
    ("rooms/lobby/out", True, True),
    ("rooms/+/out", True, True),
    ("rooms/lobby/error/sensor1", True, True),
    ("rooms/+/error/sensor1", True, True),
    ("rooms/lobby/error/sensor2", False, True),
    ("rooms/lobby/error/+", False, True),
    ("rooms/lobby/error/#", False, False),  # also rooms/lobby/error and deeper levels
    ("rooms/lobby/in/sensor1", False, False),
    ("rooms/+/in/+", False, False),
    ("rooms/+/+", False, False),
    ("rooms/#", False, False),
    ("#", False, False),
    ("+/lobby/out", False, False),
    ("rooms/lobby/out/#", False, False),
]


@pytest.mark.parametrize(("topic_filter", "sensor1", "anonymous"), SUBSCRIBE_RULES)
def test_who_may_read_what(topic_filter, sensor1, anonymous):
    from protocols.mqtt.broker_auth import ANONYMOUS, GATEWAY, Client

    rules = policy()
    assert rules.may_subscribe(GATEWAY, topic_filter)
    assert rules.may_subscribe(Client("device", "sensor1"), topic_filter) is sensor1
    assert rules.may_subscribe(ANONYMOUS, topic_filter) is anonymous


def test_topic_matching():
    from protocols.mqtt.broker_auth import shared_filter_strip, topic_matches

    assert topic_matches("rooms/+/in/+", "rooms/a/in/b")
    assert topic_matches("rooms/#", "rooms/a/in/b") and topic_matches("#", "x")
    assert not topic_matches("rooms/+/in/+", "rooms/a/in/b/c")
    assert not topic_matches("rooms/+/in/+", "rooms/a/in")
    assert shared_filter_strip("$share/gateway/rooms/+/in/+") == "rooms/+/in/+"
    assert shared_filter_strip("rooms/+/in/+") == "rooms/+/in/+"


async def test_the_reader_refuses_a_packet_from_its_header():
    from protocols.mqtt.broker_stream import PacketLimitReader, PacketRefused

    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    refusals = []
    stream = PacketLimitReader(reader, writer, limit=200,
                               on_refused=lambda reason, size: refusals.append((reason, size)))
    ping, publish = b"\xc0\x00", b"\x30" + varint(150) + b"x" * 150
    theirs.sendall(ping + publish + b"\x30" + varint(2**20))
    try:
        assert await stream.read(2) == ping and stream.packets == 1
        assert await stream.read(1) == b"\x30"
        assert await stream.read(2) == varint(150)  # two bytes of length, 150 < 200
        assert await stream.read(150) == b"x" * 150 and stream.packets == 2
        assert await stream.read(1) == b"\x30"
        for _ in range(2):
            await stream.read(1)
        with pytest.raises(PacketRefused):
            await stream.read(1)  # the last byte of the length: 1 MiB announced
        assert refusals == [("packet_too_large", 2**20 + 4)]
    finally:
        writer.close()
        theirs.close()


# --- the kill -9 measurement (a script, not part of the suite) ------------------------------


async def measure(devices: int, rate: float, kill_after: float, burst: int) -> dict:
    """Devices publishing QoS 1 (``rate`` a second each, or ``burst`` at once), kill -9 of the
    gateway after ``kill_after`` seconds, a restart: what was acknowledged and what lost."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        gw = Gateway(Path(tmp) / "gw", env=embedded_env(port)).start()
        await gateway_connected(gw)
        fleet = Fleet(port, devices)
        fleet.start()
        back = None
        try:
            await wait_until(fleet.connected, 60, "devices did not connect")
            stop = asyncio.Event()
            if burst:
                for _ in range(burst):
                    await asyncio.to_thread(fleet.publish_round)
                publisher = None
            else:
                publisher = asyncio.create_task(publish_every(fleet, 1 / rate, stop))
            await asyncio.sleep(kill_after)
            acked_at_kill = len(fleet.acked())
            gw.kill()
            stop.set()
            if publisher is not None:
                await publisher
            back = Gateway(gw.datadir, env=embedded_env(port), port=gw.port).start()
            published = fleet.published()
            try:
                await wait_until(lambda: fleet.acked() == published, 120, "not all acknowledged")
            except AssertionError:
                pass  # reported below
            texts = stored(back, fleet.room)
        finally:
            await asyncio.to_thread(fleet.stop)
            for server in (gw, back):
                if server is not None:
                    server.stop()
    acked = fleet.acked()
    return {"devices": devices, "rate": rate, "burst": burst, "published": len(published),
            "acknowledged_before_kill": acked_at_kill, "acknowledged": len(acked),
            "stored": len(texts), "lost": len(acked - set(texts)),
            "stored_twice": len(texts) - len(set(texts))}


def main() -> None:
    parser = argparse.ArgumentParser(description=measure.__doc__)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5.0, help="messages a second per device")
    parser.add_argument("--burst", type=int, default=0, help="instead: this many each at once")
    parser.add_argument("--kill-after", type=float, default=5.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.devices, args.rate, args.kill_after, args.burst))))


if __name__ == "__main__":
    main()
