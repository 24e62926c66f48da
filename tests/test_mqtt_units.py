"""Fast tests of the MQTT server's logic: rates by arrival, the bounded outbox, which rooms
need a relay, and a publish cut short by its connection's end (against a real mosquitto)."""

from __future__ import annotations

import asyncio
import os
import signal

import aiomqtt
import pytest

from gateway import selectors, services
from gateway.models import Room
from gateway.ratelimit import TokenBucket
from protocols.mqtt.server import BrokerAddress, MqttServer, _Link


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


def bucket(now: list[float], rate: float = 5.0, burst: int = 2) -> TokenBucket:
    return TokenBucket(rate=rate, burst=burst, clock=lambda: now[0])


def test_a_bucket_counts_events_when_they_arrived_not_when_they_are_handled():
    now = [0.0]
    limit = bucket(now)
    # Three events arrived 0.2 s apart (within 5/s); handled together 10 s later.
    now[0] = 10.0
    assert [limit.allow(now=t) for t in (0.2, 0.4, 0.6)] == [True, True, True]
    # By the clock they would be a burst of three beyond a burst of two.
    fresh = bucket([0.0])
    assert [fresh.allow() for _ in range(3)] == [True, True, False]


def test_an_earlier_arrival_time_refills_nothing():
    now = [0.0]
    limit = bucket(now, burst=1)
    assert limit.allow(now=5.0)
    assert not limit.allow(now=1.0)  # not a refill from 5.0 back to 1.0
    assert limit.allow(now=5.2)


def test_credit_lets_a_held_back_burst_through_and_then_expires():
    now = [0.0]
    limit = bucket(now, rate=5.0, burst=2)
    assert [limit.allow(now=0.0) for _ in range(3)] == [True, True, False]
    limit.credit(10.0, now=1.0)  # a 10 s stall: 50 tokens beyond the burst, for 10 s
    assert sum(limit.allow(now=1.0) for _ in range(60)) == 2 + 50
    limit.credit(2.0, now=20.0)
    assert limit.allow(now=20.0)
    now[0] = 40.0  # expired: only the burst again
    assert [limit.allow(now=40.0) for _ in range(13)].count(True) == 2


def test_credit_is_not_spent_while_the_burst_lasts():
    limit = bucket([0.0], rate=1.0, burst=1)
    limit.credit(3.0, now=0.0)
    assert [limit.allow(now=0.0) for _ in range(5)] == [True, True, True, True, False]


@pytest.mark.django_db
def test_rooms_pending_for_out_are_those_with_entries_beyond_their_position():
    for name, last_seq in [("quiet", 4), ("busy", 9), ("new", 2), ("empty", 0)]:
        Room.objects.create(name=name, last_seq=last_seq)
    for relay, room, position in [("mqtt-out", "quiet", 4), ("mqtt-out", "busy", 7),
                                  ("other", "new", 2)]:
        services.relay_target_place(relay=relay, room=room, target="", position=position)
    pending = selectors.relay_rooms_pending(relay="mqtt-out",
                                            targets=selectors.relay_targets_rooms(protocol="mqtt"))
    assert pending == [("busy", 9), ("new", 2)]


def server() -> MqttServer:
    return MqttServer(None, address=BrokerAddress(host="127.0.0.1", port=1), prefix="rooms",
                      client_id="unit", idle_timeout=60)


async def test_a_full_outbox_drops_error_replies_and_counts_them():
    mqtt = server()
    mqtt.outbox = asyncio.Queue(maxsize=1)
    for _ in range(3):
        await mqtt._send({"type": "mqtt.publish", "topic": "rooms/r/error/d", "payload": b"{}",
                          "refused": "rate_limited"})
    assert mqtt.outbox.qsize() == 1 and mqtt.stats["dropped"] == 2
    assert mqtt.refused["rate_limited"] == 3
