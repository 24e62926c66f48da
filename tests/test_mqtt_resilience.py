"""MQTT under faults, through real interfaces: a private mosquitto that restarts (or is
frozen and killed); real MQTT and WebSocket clients against ``gateway run``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiomqtt
import pytest

from tests.servers import Mosquitto
from tests.test_e2e import connect, wait_until
from tests.test_mqtt import device, mqtt_env, mqtt_ready, mqtt_status, readyz

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
