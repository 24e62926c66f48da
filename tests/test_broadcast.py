"""The publisher: committed events reach the layer in order, many per round trip."""

from __future__ import annotations

import asyncio

import pytest
from channels.layers import InMemoryChannelLayer
from channels_redis.pubsub import RedisPubSubChannelLayer

from gateway import broadcast, events
from gateway.names import room_group_name


def entry(room: str, cursor: int) -> dict:
    return {"type": events.ROOM_ENTRY, "room": room, "cursor": cursor, "kind": "delete"}


async def within(step, what: str, seconds: float = 20):
    """Await ``step``; a hang fails with what it was, rather than the whole test's timeout."""
    try:
        async with asyncio.timeout(seconds):
            return await step
    except TimeoutError:
        raise AssertionError(f"{what} hung for {seconds}s") from None


async def drain(layer, channel: str, count: int) -> list[dict]:
    got = []
    async with asyncio.timeout(10):
        while len(got) < count:
            got.append(await layer.receive(channel))
    return got


async def test_a_batch_goes_through_one_redis_pipeline_in_room_order(redis_server, monkeypatch):
    layer = RedisPubSubChannelLayer(hosts=[redis_server.url])
    monkeypatch.setattr(broadcast, "get_channel_layer", lambda: layer)
    try:
        a, b = await layer.new_channel("a."), await layer.new_channel("b.")
        await layer.group_add(room_group_name("ra"), a)
        await layer.group_add(room_group_name("rb"), b)
        await layer.group_add(events.CONTROL_GROUP, b)
        sends = [(room_group_name("ra" if n % 3 else "rb"), entry("ra" if n % 3 else "rb", n))
                 for n in range(300)]
        sends.append((events.CONTROL_GROUP, {"type": events.SCOPE_DISCONNECT, "scope": "s1"}))
        # The internals it relies on are there (an upgrade that moves them fails here, rather
        # than quietly publishing one by one).
        assert await broadcast._pipeline_publish(layer, sends) is True
        got_a, got_b = await drain(layer, a, 200), await drain(layer, b, 101)
        assert [e["cursor"] for e in got_a] == [n for n in range(300) if n % 3]
        assert [e["cursor"] for e in got_b[:100]] == [n for n in range(300) if not n % 3]
        assert got_b[100]["scope"] == "s1"

        # After a Redis restart the pooled connection is stale: the retry gets a fresh one.
        redis_server.restart()
        await within(broadcast._group_send_many([(room_group_name("ra"), entry("ra", 1000))]),
                     "the publish after the restart")
        await within(layer.flush(), "the layer's flush")
        fresh = await layer.new_channel("c.")
        await within(layer.group_add(room_group_name("ra"), fresh), "subscribing again")
        await within(broadcast._group_send_many([(room_group_name("ra"), entry("ra", 1001))]),
                     "the next publish")
        assert [e["cursor"] for e in await drain(layer, fresh, 1)] == [1001]
    finally:
        await layer.flush()


async def test_the_publisher_batches_what_queued_and_keeps_commit_order(monkeypatch):
    layer = InMemoryChannelLayer(capacity=10_000)
    monkeypatch.setattr(broadcast, "get_channel_layer", lambda: layer)
    trips: list[int] = []
    send_many = broadcast._group_send_many

    async def counted(sends):
        trips.append(len(sends))
        await send_many(sends)

    monkeypatch.setattr(broadcast, "_group_send_many", counted)
    channel = await layer.new_channel("hub.")
    await layer.group_add(room_group_name("r"), channel)
    publisher = broadcast.Publisher(asyncio.get_running_loop())
    publisher.start()
    try:
        publisher.submit(entry("r", 0))  # alone: goes at once, by itself
        assert [e["cursor"] for e in await drain(layer, channel, 1)] == [0]
        assert trips == [1]
        for start in range(1, 1201, 100):  # twelve commits of 100, queued together
            publisher.submit_many([entry("r", n) for n in range(start, start + 100)])
        got = await drain(layer, channel, 1200)
        await publisher.stop()
    finally:
        if publisher.task is not None:
            publisher.task.cancel()
    assert [e["cursor"] for e in got] == list(range(1, 1201))
    assert sum(trips) == 1201 and max(trips) <= broadcast.PUBLISH_BATCH
    assert len(trips) <= 1 + 1200 // broadcast.PUBLISH_BATCH + 1  # batched, not one by one


async def test_a_layer_that_keeps_failing_loses_the_batch_with_a_log_line(monkeypatch, caplog):
    class Down(InMemoryChannelLayer):
        calls = 0

        async def group_send(self, group, message):
            Down.calls += 1
            raise ConnectionError("the layer is down")

    monkeypatch.setattr(broadcast, "get_channel_layer", lambda: Down())
    await broadcast._group_send_many([(room_group_name("r"), entry("r", n)) for n in range(3)])
    assert Down.calls == 2  # tried, retried once, then given up: receivers resync from the log
    assert "receivers will resync from history" in caplog.text


@pytest.mark.parametrize("count", [2, 4])
async def test_one_by_one_layers_resume_where_a_failure_stopped(monkeypatch, count):
    sent: list[int] = []

    class Flaky(InMemoryChannelLayer):
        failed = False

        async def group_send(self, group, message):
            if message["cursor"] == 1 and not Flaky.failed:
                Flaky.failed = True
                raise ConnectionError("stale connection")
            sent.append(message["cursor"])

    monkeypatch.setattr(broadcast, "get_channel_layer", lambda: Flaky())
    await broadcast._group_send_many([(room_group_name("r"), entry("r", n))
                                      for n in range(count)])
    assert sent == list(range(count))  # nothing twice, nothing skipped
