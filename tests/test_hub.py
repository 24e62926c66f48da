"""The process's hub (gateway/fanout.py) with fake subscribers, on the in-memory layer.

Entries are stored with the real services; "quietly" stores one as if the layer lost its
broadcast, and ``arrive`` hands an event to the hub as the layer would, in the order a test
chooses. Resyncs are called directly (the periodic one is set far off), so no test waits
for a clock."""

from __future__ import annotations

import asyncio
import threading

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import OperationalError, connection, transaction

from gateway import events, fanout, services
from gateway.fanout import END_DISCONNECTED, Delivery, RoomHub
from gateway.names import room_group_name

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

ALICE = events.sender(protocol="web", id="anon:alice", name="alice")
STAFF = events.sender(protocol="system", id="staff:1", name="boss")


class Fake:
    """A subscriber that records what it is delivered and how it is closed."""

    def __init__(self, scope_id: str, *, protocol: str = "fake", fail: bool = False):
        self.protocol = protocol
        self.scope_id = scope_id
        self.fail = fail
        self.got: list[Delivery] = []
        self.closed: list[str] = []

    async def deliver(self, delivery: Delivery) -> None:
        self.got.append(delivery)
        if self.fail:
            raise RuntimeError("this subscriber's socket broke")

    async def end(self, reason: str) -> None:
        self.closed.append(reason)

    def cursors(self) -> list[int]:
        return [d.cursor for d in self.got]


@pytest.fixture
async def hub(settings):
    settings.GATEWAY = {**settings.GATEWAY, "RESYNC_INTERVAL": 3600.0}
    hub = RoomHub(get_channel_layer())
    await hub.start()
    yield hub
    await hub.stop()


async def until(condition, timeout: float = 5.0) -> None:
    """Wait for what the hub does in its own task (it tells nobody: polled)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.005)


async def arrive(hub: RoomHub, *entries: events.LogEntry) -> None:
    """Hand entries to the hub through the layer, as the room's group would."""
    for entry in entries:
        await hub.layer.send(hub.channel, dict(entry))


def quietly(action, **kwargs):
    """Run a service as if the layer lost its broadcast: the entry is only in the log."""
    with transaction.atomic():
        result = action(**kwargs)
        transaction.get_connection().run_on_commit = []
    return result


def store_quietly(room: str, text: str) -> events.RoomMessage:
    event, _ = quietly(services.room_message_post, room=room, text=text, sender=ALICE,
                       origin="test")
    return event


stored_quietly = database_sync_to_async(store_quietly)


def store_elsewhere(room: str, text: str) -> events.RoomMessage:
    """``store_quietly`` on a thread of its own (its connection closed after)."""
    try:
        return store_quietly(room, text)
    finally:
        connection.close()


@database_sync_to_async
def deleted_quietly(room: str, message_id: int) -> None:
    quietly(services.messages_delete, messages=[(room, message_id)], by=STAFF)


# --- order ----------------------------------------------------------------------------------


async def test_entries_are_delivered_once_each_in_cursor_order(hub):
    sub = Fake("a")
    await hub.subscribe("order", sub)
    assert hub.last_seq("order") == 0
    one, two, three = [await stored_quietly("order", t) for t in ("one", "two", "three")]
    # The layer brings 1 twice, then 3 before 2: 2 comes from the log before 3, and the late
    # 2 and the repeated 1 are dropped.
    await arrive(hub, one, one, three, two)
    await until(lambda: hub.stats["duplicates"] == 2)
    assert sub.cursors() == [1, 2, 3]
    assert [d.event for d in sub.got] == [one, two, three]
    assert hub.stats["gap_filled"] == 1 and hub.last_seq("order") == 3
    await hub.unsubscribe("order", sub)


async def test_a_gap_is_filled_from_the_log_past_a_deleted_message(hub, monkeypatch):
    monkeypatch.setattr(fanout, "GAP_FILL_PAGE", 1)  # a page that holds only the tombstone
    sub = Fake("a")
    await hub.subscribe("holes", sub)
    first = await stored_quietly("holes", "first")
    await stored_quietly("holes", "deleted")
    await deleted_quietly("holes", 2)  # message 2 is a tombstone, cursor 3 its delete
    last = await stored_quietly("holes", "last")
    await arrive(hub, first, last)
    await until(lambda: len(sub.got) == 3)
    assert sub.cursors() == [1, 3, 4]
    entry = sub.got[1].event
    assert (entry["type"], entry["kind"], entry["id"]) == (events.ROOM_ENTRY, "delete", 2)
    assert hub.stats["gap_filled"] == 2  # the tombstone's place and the delete
    await asyncio.sleep(0.05)
    assert sub.cursors() == [1, 3, 4]  # nothing more
    await hub.unsubscribe("holes", sub)


async def test_entries_stored_with_their_broadcast_arrive_through_the_layer(hub):
    sub = Fake("a")
    await hub.subscribe("live", sub)
    await database_sync_to_async(services.room_message_post)(
        room="live", text="hi", sender=ALICE, origin="test"
    )
    await database_sync_to_async(services.room_close)(room="live", by=STAFF)
    await until(lambda: len(sub.got) == 2)
    assert [(d.event["type"], d.cursor) for d in sub.got] == [
        (events.ROOM_MESSAGE, 1), (events.ROOM_ENTRY, 2)
    ]
    assert hub.stats["gap_filled"] == 0
    await hub.unsubscribe("live", sub)


async def test_every_subscriber_shares_one_delivery_and_a_failing_one_stops_nobody(hub):
    broken, a, b = Fake("broken", fail=True), Fake("a", protocol="web"), Fake("b")
    for sub in (broken, a, b):
        await hub.subscribe("shared", sub)
    one, two = [await stored_quietly("shared", t) for t in ("one", "two")]
    await arrive(hub, one, two)
    await until(lambda: len(a.got) == 2 and len(b.got) == 2)
    assert broken.cursors() == a.cursors() == b.cursors() == [1, 2]
    assert hub.stats["delivered"] == 6  # the failure was contained (whatever the set's order)
    assert all(x is y for x, y in zip(a.got, b.got, strict=True))
    encoded = []
    frames = {sub.got[0].frame("test", lambda e: encoded.append(e) or "frame")
              for sub in (a, b)}
    assert frames == {"frame"} and len(encoded) == 1  # encoded once for both
    for sub in (broken, a, b):
        await hub.unsubscribe("shared", sub)


async def test_a_room_is_left_when_its_last_subscriber_goes(hub):
    a, b = Fake("a"), Fake("b")
    await hub.subscribe("leaving", a)
    await hub.subscribe("leaving", b)
    group = hub.layer.groups[room_group_name("leaving")]
    assert hub.channel in group
    await hub.unsubscribe("leaving", a)
    assert hub.last_seq("leaving") == 0 and hub.channel in group
    await hub.unsubscribe("leaving", b)
    assert hub.last_seq("leaving") is None and hub.rooms == {}
    assert hub.channel not in hub.layer.groups.get(room_group_name("leaving"), {})
    # An entry for a room nobody here serves is ignored.
    await arrive(hub, await stored_quietly("leaving", "late"))
    await asyncio.sleep(0.05)
    assert a.got == [] and b.got == []


# --- resync ---------------------------------------------------------------------------------


async def test_the_resync_delivers_a_lost_last_entry(hub):
    sub = Fake("a")
    await hub.subscribe("tail", sub)
    first = await stored_quietly("tail", "first")
    await arrive(hub, first)
    await until(lambda: len(sub.got) == 1)
    await stored_quietly("tail", "lost last")  # nothing newer will reveal the gap
    await asyncio.sleep(0.05)
    assert sub.cursors() == [1]
    await hub.resync()
    assert sub.cursors() == [1, 2]
    assert sub.got[1].event["text"] == "lost last"
    await hub.resync()  # nothing new: nothing again
    assert sub.cursors() == [1, 2]
    await deleted_quietly("tail", 1)  # a lost entry that is not a message
    await hub.resync()
    assert sub.cursors() == [1, 2, 3] and sub.got[2].event["kind"] == "delete"
    await hub.unsubscribe("tail", sub)


async def test_the_periodic_resync_runs_by_itself(settings):
    settings.GATEWAY = {**settings.GATEWAY, "RESYNC_INTERVAL": 0.05}
    hub = RoomHub(get_channel_layer())
    await hub.start()
    try:
        sub = Fake("a")
        await hub.subscribe("ticking", sub)
        await stored_quietly("ticking", "lost")
        await until(lambda: sub.cursors() == [1])
    finally:
        await hub.stop()


# --- joining --------------------------------------------------------------------------------


async def test_a_subscriber_joins_at_the_rooms_position(hub):
    for text in ("old", "older"):
        await stored_quietly("known", text)
    sub = Fake("a")
    await hub.subscribe("known", sub)
    assert hub.last_seq("known") == 2  # what was stored before is not delivered
    await arrive(hub, await stored_quietly("known", "new"))
    await until(lambda: len(sub.got) == 1)
    assert sub.cursors() == [3]
    await hub.unsubscribe("known", sub)


async def test_entries_that_arrive_while_the_position_is_read_are_held_then_delivered(
    hub, monkeypatch
):
    read, release = threading.Event(), threading.Event()
    real_open = services.room_position

    def room_open_slowly(**kwargs):
        position = real_open(**kwargs)
        read.set()
        release.wait(5)  # the position is read; the entry below is stored after it
        return position

    monkeypatch.setattr(services, "room_position", room_open_slowly)
    sub = Fake("a")
    joining = asyncio.create_task(hub.subscribe("early", sub))
    await until(read.is_set)
    # Stored on another thread: the database thread is still in room_open.
    entry = await sync_to_async(store_elsewhere, thread_sensitive=False)("early", "meanwhile")
    await arrive(hub, entry)
    await asyncio.sleep(0.05)
    assert sub.got == [] and not joining.done()
    release.set()
    await joining
    await until(lambda: sub.cursors() == [1])
    assert hub.last_seq("early") == 1
    await hub.unsubscribe("early", sub)


async def test_a_failed_join_leaves_no_state_for_anyone_waiting_on_it(hub, monkeypatch):
    release = threading.Event()
    real_open = services.room_position

    def room_open_fails(**kwargs):
        release.wait(5)
        raise OperationalError("the database is down")

    monkeypatch.setattr(services, "room_position", room_open_fails)
    first, second = Fake("first"), Fake("second")
    joining = asyncio.create_task(hub.subscribe("down", first))
    await until(lambda: "down" in hub.rooms)
    waiting = asyncio.create_task(hub.subscribe("down", second))
    await asyncio.sleep(0.02)
    assert not waiting.done()  # it waits for the first join
    release.set()
    with pytest.raises(OperationalError):
        await joining
    with pytest.raises(RuntimeError, match="could not join room down"):
        await waiting
    assert hub.rooms == {} and hub.last_seq("down") is None and hub.subscribers() == []
    assert hub.channel not in hub.layer.groups.get(room_group_name("down"), {})
    # Once the database is back, the room can be joined and works.
    monkeypatch.setattr(services, "room_position", real_open)
    await hub.subscribe("down", first)
    assert hub.last_seq("down") == 0 and hub.subscribers() == [first]
    await arrive(hub, await stored_quietly("down", "up again"))
    await until(lambda: first.cursors() == [1])
    assert second.got == []
    await hub.unsubscribe("down", first)


# --- control --------------------------------------------------------------------------------


async def test_a_staff_disconnect_closes_only_the_scope_it_names(hub):
    a, b = Fake("scope-a"), Fake("scope-b")
    await hub.subscribe("ctl", a)
    await hub.subscribe("ctl", b)
    await hub.layer.group_send(events.CONTROL_GROUP, dict(events.scope_disconnect(scope="scope-b")))
    await until(lambda: b.closed == [END_DISCONNECTED])
    assert a.closed == []
    for sub in (a, b):
        await hub.unsubscribe("ctl", sub)


async def test_a_room_that_did_not_exist_when_joined_is_not_taken_as_open_until_it_does(hub):
    sub = Fake("early")
    await hub.subscribe("unborn", sub)
    assert hub.room_closed("unborn") is None  # entering it still asks the database
    await arrive(hub, await stored_quietly("unborn", "now it exists"))
    await until(lambda: hub.room_closed("unborn") is False)
    await hub.unsubscribe("unborn", sub)
