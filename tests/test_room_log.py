"""The room log: every change to a room (messages, deletes, closes, reopens) is one entry with
the room's next cursor, stored, and replayed by cursor. In-process (WebsocketCommunicator on
the in-memory layer) and through a real gateway with WebSocket clients."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import transaction
from django.test import Client

from gateway import events, selectors, services
from gateway.models import Message, Room, RoomEvent
from gateway.routing import websocket_urlpatterns
from gateway.runtime import get_runtime
from tests.helpers import (
    FAST,
    connect,
    device,
    gather_out,
    mqtt_env,
    mqtt_ready,
    next_message,
    nothing_more,
)

app = URLRouter(websocket_urlpatterns)
ALICE = events.sender(protocol="web", id="anon:alice", name="alice")
STAFF = events.sender(protocol="system", id="staff:1", name="boss")


def post(room: str, text: str) -> int:
    event, _ = services.room_message_post(room=room, text=text, sender=ALICE, origin="test")
    return event["id"]


def quietly(action, *args, **kwargs):
    """Run a service as if the layer lost its broadcast (for instance while Redis restarted):
    what it stored must still reach everyone, from the log."""
    with transaction.atomic():
        result = action(*args, **kwargs)
        transaction.get_connection().run_on_commit = []
    return result


# --- the log itself -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_delete_is_an_entry_after_a_tombstone_that_keeps_its_place():
    for text in ("one", "two", "three"):
        post("log", text)
    assert services.messages_delete(messages=[("log", 2)], by=STAFF) == 1
    assert services.messages_delete(messages=[("log", 2), ("log", 99)], by=STAFF) == 0
    assert Room.objects.get(name="log").last_seq == 4  # three messages, one delete
    tombstone = Message.objects.get(room__name="log", seq=2)
    assert tombstone.text == "" and tombstone.deleted_at is not None
    (entry,) = RoomEvent.objects.filter(room__name="log")
    assert (entry.seq, entry.kind, entry.target, entry.sender_id) == (4, "delete", 2, "staff:1")
    assert post("log", "four") == 5  # messages go on after the entry

    entries, reached = selectors.room_log_after(room="log", after=0, limit=100)
    assert [(e["type"], events.entry_cursor(e)) for e in entries] == [
        ("room.message", 1), ("room.message", 3), ("room.entry", 4), ("room.message", 5)
    ]
    assert reached == 5
    assert entries[2] == events.room_entry(cursor=4, room="log", kind="delete", id=2,
                                           sender=STAFF, ts=entries[2]["ts"])
    # pages end where they reach, past a tombstone too
    assert selectors.room_log_after(room="log", after=1, limit=1) == ([], 2)
    assert selectors.room_log_after(room="log", after=2, upto=4, limit=100)[1] == 4
    assert selectors.room_log_after(room="log", after=5, limit=100) == ([], 5)
    # history shows the current state: the deleted message is gone
    assert [m["text"] for m in selectors.room_messages_last(room="log", limit=10)] == [
        "one", "three", "four"
    ]


@pytest.mark.django_db
def test_close_and_reopen_are_entries_once_each():
    post("shut", "hello")
    services.room_close(room="shut", by=STAFF)
    services.room_close(room="shut", by=STAFF)  # already closed: nothing new
    with pytest.raises(services.GatewayError) as refused:
        post("shut", "while closed")
    assert refused.value.code == "room_closed"
    services.room_reopen(room="shut", by=STAFF)
    services.room_reopen(room="shut", by=STAFF)
    assert post("shut", "again") == 4
    kinds = list(RoomEvent.objects.filter(room__name="shut").values_list("seq", "kind"))
    assert kinds == [(2, "close"), (3, "reopen")]


@pytest.mark.django_db
def test_history_pages_show_a_deleted_message_in_its_place_and_end_after_it():
    for text in ("a", "b", "c"):
        post("pages", text)
    services.messages_delete(messages=[("pages", 3)], by=STAFF)
    client = Client()
    first = client.get("/api/rooms/pages/messages?after=0&limit=2").json()
    assert [m["id"] for m in first["messages"]] == [1, 2] and first["last_id"] == 4
    assert first["next_after"] == 2
    last = client.get("/api/rooms/pages/messages?after=2&limit=2").json()
    (gone,) = last["messages"]
    assert gone["id"] == 3 and gone["deleted"] is True and gone["message"] == ""
    assert last["next_after"] is None  # nothing after 3 but its delete


def test_entries_follow_the_contract():
    entry = events.room_entry(cursor=9, room="r", kind="close", id=None, sender=STAFF, ts=1)
    assert events.log_entry_decode(dict(entry)) == entry
    for broken in ({**entry, "kind": "explode"}, {**entry, "cursor": "9"},
                   {**entry, "extra": 1}, {k: v for k, v in entry.items() if k != "id"}):
        with pytest.raises(events.EventError):
            events.log_entry_decode(broken)
    with pytest.raises(events.EventError):
        events.room_entry(cursor=1, room="r", kind="explode", id=None, sender=STAFF, ts=1)


# --- through the consumer, in-process -------------------------------------------------------


async def ws(path: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(app, path)
    connected, code = await comm.connect(timeout=5)
    assert connected, f"refused with {code}"
    return comm


async def frame_of(comm: WebsocketCommunicator, *, presence: bool = True) -> dict:
    """The next frame (with ``presence`` False, the next that is not a presence frame)."""
    while True:
        frame = json.loads(await comm.receive_from(timeout=5))
        if presence or frame["type"] != "presence":
            return frame


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_client_that_resumes_gets_the_deletes_made_while_it_was_away():
    for text in ("keep", "drop", "late"):
        await database_sync_to_async(post)("away", text)
    await database_sync_to_async(services.messages_delete)(messages=[("away", 2)], by=STAFF)
    # It had seen message 1 only: it gets message 3 and the delete, not the deleted text.
    comm = await ws("/ws/chat/away/?after=1&v=2")
    assert (await frame_of(comm))["id"] == 3
    assert deleted(await frame_of(comm)) == ("away", 2, 4)
    assert (await frame_of(comm))["type"] == "presence"  # then live: who is here
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()
    # One that had seen everything before the delete gets just the delete.
    comm = await ws("/ws/chat/away/?after=3&v=2")
    assert deleted(await frame_of(comm)) == ("away", 2, 4)
    assert (await frame_of(comm))["type"] == "presence"
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()
    # A client that did not ask for the extended frames gets the delete as it always did.
    comm = await ws("/ws/chat/away/?after=1")
    assert (await frame_of(comm))["id"] == 3
    assert await frame_of(comm) == {"type": "deleted", "room": "away", "id": 2, "cursor": 4}
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()


def deleted(frame: dict) -> tuple[str, int, int]:
    """A delete frame's room, message and cursor (checking its shape)."""
    assert frame["type"] == "delete" and frame["sender"] == dict(STAFF), frame
    assert set(frame) == {"type", "room", "id", "cursor", "sender", "ts", "client_id"}
    return frame["room"], frame["id"], frame["cursor"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_entries_the_layer_lost_are_filled_in_order_from_the_log(settings):
    settings.GATEWAY = {**settings.GATEWAY, "RESYNC_INTERVAL": 0.2}
    comm = await ws("/ws/chat/lossy/?v=2")
    await database_sync_to_async(post)("lossy", "first")
    assert (await frame_of(comm, presence=False))["id"] == 1
    await database_sync_to_async(quietly)(post, "lossy", "lost")
    await database_sync_to_async(quietly)(
        services.messages_delete, messages=[("lossy", 1)], by=STAFF
    )
    # The next live entry finds the gap and fills it from the log first, in cursor order.
    await database_sync_to_async(post)("lossy", "live")
    frames = [await frame_of(comm, presence=False) for _ in range(3)]
    assert [(f["type"], f.get("cursor", f["id"])) for f in frames] == [
        ("message", 2), ("delete", 3), ("message", 4)
    ]
    # A lost *last* entry (a close) arrives through the resync: the socket is closed.
    await database_sync_to_async(quietly)(services.room_close, room="lossy", by=STAFF)
    assert (await comm.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4410}
    runtime = await get_runtime()
    assert runtime.hub.stats["gap_filled"] >= 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_socket_into_a_room_this_process_follows_enters_without_the_database(
    monkeypatch,
):
    first = await ws("/ws/chat/busy/")
    await database_sync_to_async(services.display_name_reserved)("warm")  # staff names read
    entered = []
    real_enter = services.room_enter
    monkeypatch.setattr(services, "room_enter",
                        lambda **kwargs: entered.append(kwargs) or real_enter(**kwargs))
    second = await ws("/ws/chat/busy/")
    assert entered == []  # the hub knows the room is open
    await database_sync_to_async(post)("busy", "to both")
    assert (await frame_of(first))["message"] == "to both"
    assert (await frame_of(second))["message"] == "to both"

    # Closed by staff (here or in another process): the hub learns it from the log. The
    # next socket is refused as before; a closed room is confirmed by the database (it may
    # have been reopened a moment ago).
    await database_sync_to_async(services.room_close)(room="busy", by=STAFF)
    assert (await first.receive_output(timeout=5))["code"] == 4410
    late = WebsocketCommunicator(app, "/ws/chat/busy/")
    await late.connect(timeout=5)
    assert (await late.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4410}
    await database_sync_to_async(services.room_reopen)(room="busy", by=STAFF)
    await asyncio.sleep(0.2)  # the reopen reaches the hub (if it still follows the room)
    again = await ws("/ws/chat/busy/")
    hops = len(entered)
    another = await ws("/ws/chat/busy/")
    assert len(entered) == hops  # open again, as the hub knows: no hop
    for comm in (second, again, another):
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_room_reopened_before_the_hub_hears_of_it_is_entered():
    class Keeper:  # keeps the hub in the room while its sockets are closed
        protocol, scope_id = "test", "keeper"

        async def deliver(self, delivery) -> None:
            pass

        async def end(self, reason: str) -> None:
            pass

    first = await ws("/ws/chat/again/")
    runtime = await get_runtime()
    await runtime.hub.subscribe("again", Keeper())
    await database_sync_to_async(services.room_close)(room="again", by=STAFF)
    assert (await first.receive_output(timeout=5))["code"] == 4410
    # Reopened, and the reopen's broadcast lost: the hub still holds the room as closed.
    await database_sync_to_async(quietly)(services.room_reopen, room="again", by=STAFF)
    assert runtime.hub.room_closed("again") is True
    comm = await ws("/ws/chat/again/")  # the database says it is open: entered
    await database_sync_to_async(post)("again", "welcome back")
    assert (await frame_of(comm))["message"] == "welcome back"
    await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_staff_name_is_still_marked_when_the_hub_knows_the_room(monkeypatch):
    from django.contrib.auth import get_user_model

    await database_sync_to_async(get_user_model().objects.create_user)(
        "boss", password="x" * 12, is_staff=True)
    monkeypatch.setattr(services, "_reserved", (0.0, frozenset()))  # due to be read again
    first = await ws("/ws/chat/named/?name=someone")
    impostor = await ws("/ws/chat/named/?name=boss")  # the staff names are read for it
    await impostor.send_to(text_data=json.dumps({"message": "hi"}))
    frame = await frame_of(first)
    assert frame["sender"]["name"] == "boss (unverified)"
    late = await ws("/ws/chat/named/?name=BOSS")  # from what the process holds now
    await late.send_to(text_data=json.dumps({"message": "me too"}))
    while (frame := await frame_of(first))["message"] != "me too":
        pass
    assert frame["sender"]["name"] == "BOSS (unverified)"
    for comm in (first, impostor, late):
        await comm.disconnect()


# --- through a real gateway -----------------------------------------------------------------


@pytest.mark.slow
async def test_a_page_offline_during_a_staff_delete_drops_the_message_when_it_resumes(
    gateway_factory,
):
    gw = gateway_factory(env=FAST).start()
    async with connect(gw, "/ws/chat/resume/") as page:
        for text in ("hello", "oops"):
            await page.send(json.dumps({"message": text}))
            await next_message(page)
    # The page is offline; staff delete "oops" (the admin's service, in another process).
    gw.manage("shell", "-c", "from gateway import services; "
              "print(services.messages_delete(messages=[('resume', 2)]))")
    async with connect(gw, "/ws/chat/resume/?after=2", subprotocols=["rt-gateway.v2"]) as page:
        assert page.subprotocol == "rt-gateway.v2"
        frame = json.loads(await asyncio.wait_for(page.recv(), 10))
        assert (frame["type"], frame["room"], frame["id"], frame["cursor"]) == (
            "delete", "resume", 2, 3)
        await page.send(json.dumps({"message": "after"}))
        assert (await next_message(page))["id"] == 4
    # A page that saw nothing replays the log: never the deleted text, but its delete.
    async with connect(gw, "/ws/chat/resume/?after=0&v=2") as fresh:
        got = [json.loads(await asyncio.wait_for(fresh.recv(), 10)) for _ in range(3)]
        assert [(f["type"], f["id"]) for f in got] == [
            ("message", 1), ("delete", 2), ("message", 4)
        ]


@pytest.mark.slow
async def test_the_mqtt_relay_publishes_deletes_and_moves_past_a_closing_entry(
    gateway_factory, mosquitto,
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with connect(gw, "/ws/chat/plant/?v=2") as browser, device(mosquitto) as reader:
        await reader.subscribe("rooms/plant/out", qos=1)
        for text in ("one", "two"):
            await browser.send(json.dumps({"message": text}))
            await next_message(browser)
        assert [o["id"] for o in await gather_out(reader, 2)] == [1, 2]
        gw.manage("shell", "-c", "from gateway import services; "
                  "services.messages_delete(messages=[('plant', 2)])")
        # The delete reaches the page (through the resync: another process stored it) ...
        frame = json.loads(await asyncio.wait_for(browser.recv(), 10))
        assert (frame["type"], frame["id"], frame["cursor"]) == ("delete", 2, 3)
        await browser.send(json.dumps({"message": "three"}))
        assert (await next_message(browser))["id"] == 4
        # ... and devices, in order, with the message after it.
        assert [(o["type"], o["id"]) for o in await gather_out(reader, 2)] == [
            ("delete", 2), ("message", 4)]
        # The log now ends with an entry that is the room's own, which out does not carry.
        gw.manage("shell", "-c", "from gateway import services; "
                  "services.room_close(room='plant')")
        assert (await browser.wait_closed() or browser.close_code) == 4410
        assert await nothing_more(reader)
    assert gw.terminate() == 0
    # The relay's saved position is the log's last cursor: a restart publishes nothing again
    # and the room is not "behind" forever.
    cursor = gw.manage("shell", "-c", "from gateway.models import RelayCursor; print("
                       "RelayCursor.objects.get(relay='mqtt-out', room='plant').last_seq)")
    assert cursor.split()[-1] == "5"


# --- the broadcast ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_entries_go_to_their_room_group_not_to_every_process():
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()

    async def listen(group: str) -> str:
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        return channel

    async def receive(channel: str) -> dict | None:
        try:
            return await asyncio.wait_for(layer.receive(channel), 0.3)
        except TimeoutError:
            return None

    room = async_to_sync(listen)("room.grouped")
    control = async_to_sync(listen)(events.CONTROL_GROUP)
    post("grouped", "hello")
    services.messages_delete(messages=[("grouped", 1)], by=STAFF)
    services.room_close(room="grouped", by=STAFF)
    got = [async_to_sync(receive)(room) for _ in range(3)]
    assert [(e["type"], events.entry_cursor(e)) for e in got] == [
        ("room.message", 1), ("room.entry", 2), ("room.entry", 3)
    ]
    assert async_to_sync(receive)(control) is None


async def test_the_publish_backlog_is_bounded_and_counts_what_it_drops(monkeypatch):
    from gateway import broadcast

    monkeypatch.setattr(broadcast, "PUBLISH_BACKLOG", 3)
    publisher = broadcast.Publisher(asyncio.get_running_loop())  # not started: nothing drains
    for cursor in range(1, 6):
        publisher.submit({"type": events.ROOM_ENTRY, "room": "r", "cursor": cursor})
    await asyncio.sleep(0.05)  # submit hands over through the loop
    assert publisher.queue.qsize() == 3 and publisher.dropped == 2
    assert [publisher.queue.get_nowait()["cursor"] for _ in range(3)] == [1, 2, 3]


@pytest.mark.django_db(transaction=True)
def test_each_entry_is_published_once_after_its_commit_and_never_when_rolled_back(room_events):
    post("pub", "kept")
    with pytest.raises(RuntimeError), transaction.atomic():
        post("pub", "rolled back")
        services.messages_delete(messages=[("pub", 1)], by=STAFF)
        raise RuntimeError("the transaction fails")
    assert [e["id"] for e in room_events] == [1]  # nothing of the failed transaction
    services.messages_delete(messages=[("pub", 1)], by=STAFF)
    services.room_close(room="pub", by=STAFF)
    services.room_reopen(room="pub", by=STAFF)
    assert [(e["type"], e.get("kind"), events.entry_cursor(e)) for e in room_events] == [
        ("room.message", None, 1), ("room.entry", "delete", 2), ("room.entry", "close", 3),
        ("room.entry", "reopen", 4),
    ]
    assert Room.objects.get(name="pub").last_seq == 4  # the rolled-back cursors are not kept


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_client_that_resumes_across_a_close_and_reopen_stays():
    await database_sync_to_async(post)("cycle", "before")
    await database_sync_to_async(services.room_close)(room="cycle", by=STAFF)
    await database_sync_to_async(services.room_reopen)(room="cycle", by=STAFF)
    comm = await ws("/ws/chat/cycle/?after=1")  # it was away for both
    assert await comm.receive_nothing(timeout=0.3)  # not closed: the room is open again
    await database_sync_to_async(post)("cycle", "after")
    assert (await frame_of(comm))["id"] == 4
    # A close that reaches it live closes it (4410: the page does not come back by itself).
    await database_sync_to_async(services.room_close)(room="cycle", by=STAFF)
    assert (await comm.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4410}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_cursor_beyond_the_rooms_log_swallows_nothing_that_comes_next():
    for text in ("one", "two"):
        await database_sync_to_async(post)("ahead", text)
    # A stale client (its page outlived a database restore, say) claims cursor 100.
    comm = await ws("/ws/chat/ahead/?after=100")
    assert await comm.receive_nothing(timeout=0.2)  # nothing old is replayed
    await database_sync_to_async(post)("ahead", "three")
    assert (await frame_of(comm))["message"] == "three"  # and nothing new is swallowed
    await comm.disconnect()
