"""Retention (gateway/retention.py, services.room_prune): what is removed and what is kept,
by days and by count, per room and by default; the horizon; what a reader below it is told
(the history API, a resuming socket and stream, a relay target); one replica at a time.
Runs on SQLite and, in CI's second stage, on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import ApplicationCommunicator, WebsocketCommunicator

from gateway import chats, events, retention, selectors, services
from gateway.models import (
    BotChat,
    BotMessage,
    Message,
    MessageRevision,
    Reaction,
    Room,
    RoomEvent,
)
from gateway.policy import Policy
from gateway.routing import websocket_urlpatterns
from protocols.sse.adapter import SseAdapter
from tests.test_relay import FakeRole, started, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

WEB = events.sender(protocol="web", id="anon:alice", name="alice")
BOB = events.sender(protocol="web", id="anon:bob", name="bob")
NOW = time.time()
DAY = 86_400


def post(room: str, text: str, *, days_ago: float = 0) -> int:
    event, _ = services.room_message_post(room=room, text=text, sender=WEB, origin="w")
    if days_ago:
        stamp = datetime.fromtimestamp(NOW - days_ago * DAY, tz=UTC)
        Message.objects.filter(room__name=room, seq=event["id"]).update(created_at=stamp)
    return event["id"]


def prune(room: str) -> int:
    due = services.room_horizon_due(room=room, now=NOW)
    removed, horizon = 0, -1
    while horizon < due:
        count, horizon = services.room_prune(room=room, upto=due)
        removed += count
    return removed


def kept(room: str) -> list[str]:
    return list(Message.objects.filter(room__name=room).order_by("seq")
                .values_list("text", flat=True))


def retain(room: str, *, days: int | None = None, messages: int | None = None) -> None:
    services.room_policy_set(room=room, policy=Policy(retention_days=days,
                                                      retention_messages=messages))


# --- what goes, what stays -------------------------------------------------------------------


def test_messages_older_than_the_days_go_with_everything_about_them():
    old = post("lab", "old", days_ago=10)
    services.message_change("react", room="lab", id=old, sender=BOB, origin="b", staff=False,
                            emoji="👍")
    services.message_change("edit", room="lab", id=old, sender=WEB, origin="w", staff=False,
                            text="old, edited")
    chat = BotChat.objects.create(platform="telegram", chat_id="7", kind="private", title="T")
    chats.bot_messages_record(platform="telegram", chat_id=chat.chat_id, room="lab", seq=old,
                              message_ids=[70], own=True)
    post("lab", "older", days_ago=9)
    retain("lab", days=7)  # the policy entry is recent: it stays
    recent = post("lab", "recent", days_ago=1)
    assert prune("lab") == 4  # the two messages, the reaction and the edit
    assert kept("lab") == ["recent"]
    room = Room.objects.get(name="lab")
    assert room.horizon == 4  # cursors 1-4: old, reaction, edit, older
    assert not Reaction.objects.exists() and not MessageRevision.objects.exists()
    assert not BotMessage.objects.exists()
    assert list(RoomEvent.objects.values_list("kind", flat=True)) == ["policy"]
    assert prune("lab") == 0  # nothing more is due
    log, reached = selectors.room_log_after(room="lab", after=0, limit=10)
    assert [e["type"] for e in log] == ["room.entry", "room.message"]
    assert log[-1]["id"] == recent and reached == recent


def test_only_the_newest_messages_are_kept_and_the_default_applies_where_the_room_says_nothing(
    settings,
):
    for i in range(6):
        post("a", f"a{i}")
        post("b", f"b{i}")
    retain("a", messages=2)
    assert prune("a") == 4 and kept("a") == ["a4", "a5"]
    assert selectors.rooms_with_retention() == ["a"]
    settings.GATEWAY = {**settings.GATEWAY, "RETENTION_MESSAGES": 3}
    assert selectors.rooms_with_retention() == ["a", "b"]
    assert prune("b") == 3 and kept("b") == ["b3", "b4", "b5"]
    retain("b", messages=0)  # 0: this room keeps everything, whatever the default
    post("b", "b6")
    assert prune("b") == 0 and len(kept("b")) == 4


def test_the_stricter_of_days_and_count_wins():
    for i in range(4):
        post("lab", f"old{i}", days_ago=30)
    for i in range(4):
        post("lab", f"new{i}")
    retain("lab", days=7, messages=6)
    prune("lab")
    assert kept("lab") == ["new0", "new1", "new2", "new3"]
    retain("lab", days=60, messages=2)
    prune("lab")
    assert kept("lab") == ["new2", "new3"]


def test_pruning_goes_a_chunk_per_transaction(monkeypatch):
    monkeypatch.setattr(services, "PRUNE_CHUNK", 3)
    for i in range(10):
        post("lab", f"m{i}", days_ago=10)
    retain("lab", days=1)
    due = services.room_horizon_due(room="lab", now=NOW)
    assert due == 10
    assert services.room_prune(room="lab", upto=due) == (3, 3)
    assert Room.objects.get(name="lab").horizon == 3
    assert services.room_prune(room="lab", upto=due) == (3, 6)


# --- readers below the horizon ---------------------------------------------------------------


def test_the_history_api_says_what_was_pruned(client):
    for i in range(5):
        post("lab", f"m{i}")
    retain("lab", messages=2)  # cursor 6
    prune("lab")
    page = client.get("/api/rooms/lab/messages?after=0").json()
    assert page["first_available"] == 4 and page["pruned"] is True
    assert [m["message"] for m in page["messages"]] == ["m3", "m4"]
    later = client.get("/api/rooms/lab/messages?after=4").json()
    assert later["pruned"] is False
    assert "pruned" not in client.get("/api/rooms/lab/messages").json()
    assert client.get("/api/rooms/lab/").json()["first_available"] == 4


async def test_a_socket_resuming_below_the_horizon_is_told_then_replayed_the_rest():
    for i in range(5):
        await database_sync_to_async(post)("lab", f"m{i}")
    await database_sync_to_async(retain)("lab", messages=2)
    await database_sync_to_async(prune)("lab")
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/chat/lab/?after=1")
    assert (await comm.connect(timeout=5))[0]
    told = json.loads(await comm.receive_from(timeout=5))
    assert told == {"type": "pruned", "room": "lab", "after": 1, "first_available": 4}
    replay = [json.loads(await comm.receive_from(timeout=5)) for _ in range(2)]
    assert [f["message"] for f in replay] == ["m3", "m4"]
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()
    fresh = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/chat/lab/?after=4")
    assert (await fresh.connect(timeout=5))[0]
    assert json.loads(await fresh.receive_from(timeout=5))["message"] == "m4"
    await fresh.disconnect()


async def test_a_stream_resuming_below_the_horizon_is_told():
    for i in range(4):
        await database_sync_to_async(post)("lab", f"m{i}")
    await database_sync_to_async(retain)("lab", messages=1)
    await database_sync_to_async(prune)("lab")
    comm = ApplicationCommunicator(URLRouter(SseAdapter("sse").http_stream_routes()), {
        "type": "http", "method": "GET", "path": "/sse/rooms/lab/", "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"last-event-id", b"2")]})
    await comm.send_input({"type": "http.request", "body": b"", "more_body": False})
    assert (await comm.receive_output(timeout=5))["status"] == 200
    body = b""
    while b"m3" not in body:
        body += (await comm.receive_output(timeout=5))["body"]
    text = body.decode()
    assert 'event: pruned\ndata: {"type":"pruned","room":"lab","after":2,' \
           '"first_available":4}' in text
    assert text.index("event: pruned") < text.index('"m3"')
    await comm.send_input({"type": "http.disconnect"})
    await comm.wait(timeout=5)


async def test_a_relay_target_behind_the_horizon_skips_what_was_pruned_and_is_told():
    role = FakeRole(every_room=False)
    await database_sync_to_async(services.room_get_or_create)(room="lab")
    await database_sync_to_async(BotChat.objects.create)(
        platform="fake", chat_id="c1", kind="private", title="c1", room="lab")
    await database_sync_to_async(services.relay_target_place)(
        relay="fake", room="lab", target="c1", position=0)
    for i in range(6):
        await database_sync_to_async(post)("lab", f"m{i}")
    await database_sync_to_async(retain)("lab", messages=2)  # cursor 7
    await database_sync_to_async(prune)("lab")  # horizon 4
    r = await started(role)
    await until(lambda: role.delivered("lab", "c1") == [5, 6, 7])
    assert role.skips == [("lab", "c1", 0, 4)]
    await r.stop()


# --- one replica at a time -------------------------------------------------------------------


async def test_only_the_lease_holder_prunes_and_another_takes_over_when_it_stops():
    for i in range(4):
        await database_sync_to_async(post)("lab", f"m{i}", days_ago=3)
    await database_sync_to_async(retain)("lab", days=1)
    first, second = retention.Pruner(interval=0.05), retention.Pruner(interval=0.05)
    await first.start()
    await until(lambda: first.pruned == 4)
    await second.start()
    await database_sync_to_async(post)("lab", "m4", days_ago=3)
    await until(lambda: first.pruned == 6)  # m4, and the policy entry before it
    await asyncio.sleep(0.3)  # several rounds of the second: none of them its
    assert second.pruned == 0 and second.last_round is None
    assert second.status()["leader"] is False and first.status()["leader"] is True
    await first.stop()  # hands the lease over at once
    await database_sync_to_async(post)("lab", "m5", days_ago=3)
    await until(lambda: second.pruned == 1, timeout=5)
    await second.stop()
    assert await database_sync_to_async(kept)("lab") == []
    assert (await database_sync_to_async(Room.objects.get)(name="lab")).horizon == 7


async def test_the_job_removes_pruned_messages_files_from_the_storage(attachment_storage):
    """Files go with their messages, from the storage too; a file whose message never came
    stays until it is old enough, then the sweep removes it."""
    from gateway import files
    from gateway.models import Attachment

    def post_file(text: str) -> events.RoomMessage:
        kept_files = files.attachments_store(room="lab", sender=WEB, uploads=[
            files.Upload.of_bytes(f"{text}\n".encode(), name=f"{text}.txt")])
        event, _ = services.room_message_post(room="lab", text=text, sender=WEB, origin="w",
                                              attachments=kept_files)
        return event

    def on_disk() -> list[str]:
        return sorted(path.name for path in attachment_storage.rglob("*") if path.is_file())

    old = [await database_sync_to_async(post_file)(f"old{i}") for i in range(2)]
    new = await database_sync_to_async(post_file)("new")
    orphan = await database_sync_to_async(files.attachments_store)(
        room="lab", sender=WEB, uploads=[files.Upload.of_bytes(b"never posted\n")])
    await database_sync_to_async(retain)("lab", messages=1)
    pruner = retention.Pruner(interval=0.05)
    await pruner.start()
    try:
        await until(lambda: pruner.pruned >= 2)
        expected = sorted([f"{new['attachments'][0]['id']}.txt",
                           f"{orphan[0]['id']}.txt"])
        await until(lambda: on_disk() == expected)
    finally:
        await pruner.stop()
    for event in old:
        assert await database_sync_to_async(files.attachment_row)(
            event["attachments"][0]["id"]) is None
    states = await database_sync_to_async(
        lambda: sorted(Attachment.objects.values_list("key", "state")))()
    assert states == sorted([(new["attachments"][0]["id"], Attachment.ATTACHED),
                             (orphan[0]["id"], Attachment.PENDING)])
    # The orphan goes once it has waited long enough for its message.
    swept = await database_sync_to_async(files.attachments_sweep)(
        now=time.time() + files.PENDING_TTL + 1)
    assert swept == 1 and on_disk() == [f"{new['attachments'][0]['id']}.txt"]


def test_a_day_is_what_it_says():
    """The cut is the creation time: a message a minute younger than the days stays."""
    post("lab", "just old enough", days_ago=2 + 1 / 1440)
    post("lab", "just young enough", days_ago=2 - 1 / 1440)
    retain("lab", days=2)
    prune("lab")
    assert kept("lab") == ["just young enough"]
