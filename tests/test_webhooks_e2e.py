"""Webhooks across replicas: two ``gateway run`` processes on one database and Redis, one
holding the ``webhook`` lease; it is SIGKILLed while the receiver is down, and the other
takes over within the lease's time and delivers from the stored cursor, every event once,
in order, signed."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.helpers import FAST, wait_until
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

RELAYS = "this process now relays webhook"


async def api(gw, method: str, path: str, key: str, body: dict | None = None) -> dict:
    async with httpx.AsyncClient(base_url=gw.http, trust_env=False, timeout=10) as client:
        response = await client.request(method, path, json=body,
                                        headers={"Authorization": f"Bearer {key}"})
    assert response.status_code in (200, 201), response.text
    return response.json()


@pytest.mark.timeout(90)
async def test_a_replica_killed_while_the_receiver_is_down_is_taken_over_from_its_cursor(
    redis_server, tmp_path, gateway_factory
):
    env = {**FAST, "REDIS_URL": redis_server.url, "GATEWAY_WEBHOOK_TIMEOUT": "2",
           "GATEWAY_WEBHOOK_ALLOW_PRIVATE": "1"}  # the receiver is on this machine
    a = gateway_factory(env=env, datadir=tmp_path / "shared")
    b = gateway_factory(env=env, datadir=tmp_path / "shared")
    await asyncio.to_thread(a.start)
    await asyncio.to_thread(b.start)
    output = await asyncio.to_thread(a.manage, "apikey", "create", "--name", "t",
                                     "--scopes", "post,manage")
    key = output.strip().splitlines()[-1]

    receiver = await Receiver().start()
    made = await api(b, "POST", "/api/webhooks", key,
                     {"name": "e2e", "url": receiver.url(), "rooms": ["e2e-*"]})
    secret = made["secret"]

    async def say(text: str) -> None:
        await api(b, "POST", "/api/rooms/e2e-room/messages", key, {"message": text})

    for i in range(1, 4):
        await say(f"up {i}")
    await receiver.wait(lambda: receiver.cursors() == [1, 2, 3], timeout=20)
    await asyncio.sleep(1.5)  # the positions are saved every second
    await receiver.stop()  # down: connections refused

    for i in range(4, 9):
        await say(f"down {i}")
    await wait_until(lambda: RELAYS in a.log() or RELAYS in b.log(), 10, "no process relays")
    leader, other = (a, b) if RELAYS in a.log() else (b, a)
    assert RELAYS not in other.log()

    async def failing() -> bool:
        return (await api(other, "GET", f"/api/webhooks/{made['id']}", key))["state"] == (
            "failing")

    for _ in range(100):  # the leader has tried and failed (recorded in the database)
        if await failing():
            break
        await asyncio.sleep(0.1)
    assert await failing()

    await asyncio.to_thread(leader.kill)  # SIGKILL: no handover; its lease expires (10 s)
    killed_at = asyncio.get_running_loop().time()
    back = await Receiver(port=receiver.port).start()
    try:
        await back.wait(lambda: set(back.cursors()) >= set(range(4, 9)), timeout=30,
                        what="the other replica did not take over")
        took = asyncio.get_running_loop().time() - killed_at
        await asyncio.sleep(1.5)  # anything repeated would have come by now
    finally:
        await back.stop()

    assert RELAYS in other.log()
    assert took < 20, took  # the lease's 10 s, a second's scan, the first attempt
    ids = [r.id for r in back.accepted()]
    assert len(ids) == len(set(ids)) == 5  # every event once, by delivery id
    assert back.cursors() == [4, 5, 6, 7, 8]  # in order, from the stored cursor
    assert [r.payload["message"] for r in back.accepted()] == [f"down {i}" for i in range(4, 9)]
    for request in back.requests:
        request.verify(secret)
    shown = await api(other, "GET", f"/api/webhooks/{made['id']}", key)
    assert shown["state"] == "active" and shown["last_success_at"] is not None
