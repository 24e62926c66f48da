"""Fast tests of the MQTT server's logic: a publish cut short by its connection's end
(against a real mosquitto)."""

from __future__ import annotations

import asyncio
import os
import signal

import aiomqtt
import pytest

from protocols.mqtt.server import _Link


@pytest.mark.slow
async def test_a_publish_pending_when_its_connection_ends_returns_at_once(mosquitto):
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, timeout=30) as client:
        link = _Link(client)
        assert await link.publish("rooms/unit/out", b"confirmed")
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)  # no PUBACK from now on
        try:
            pending = asyncio.create_task(link.publish("rooms/unit/out", b"cut short"))
            await asyncio.sleep(0.2)
            assert not pending.done()
            link.lost.set()  # what the connection loop does when the connection ends
            assert await asyncio.wait_for(pending, 1) is False  # not aiomqtt's 30 s timeout
            assert await link.publish("rooms/unit/out", b"after the end") is False
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
