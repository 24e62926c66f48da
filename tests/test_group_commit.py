"""Group commit (gateway/ingest.py, services.room_messages_post): messages that arrive
together are stored in one transaction, each answered as if stored alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError

from gateway import events, ingest, services
from gateway.errors import GatewayError
from gateway.models import Message, SenderBlock
from gateway.services import Post

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

ALICE = events.sender(protocol="web", id="anon:alice", name="alice")
BOB = events.sender(protocol="mqtt", id="sensor-1", name="sensor-1")
STAFF = events.sender(protocol="system", id="staff:1", name="boss")


def post(room: str, text: object, sender: events.Sender = ALICE, client_id: object = None) -> Post:
    return Post(room=room, text=text, sender=sender, origin="test", client_id=client_id)


def stored(room: str) -> list[tuple[int, str]]:
    return list(Message.objects.filter(room__name=room).order_by("seq")
                .values_list("seq", "text"))


def outcome(result) -> object:
    """A result as (id, created) or the error's code."""
    return result.code if isinstance(result, GatewayError) else (result[0]["id"], result[1])


# --- the batch, in one transaction -----------------------------------------------------------


def test_a_batch_gets_gap_free_ids_per_room_in_its_order_and_is_published_once(room_events):
    posts = [post("a", "a1"), post("b", "b1"), post("a", "a2"), post("c", "c1"),
             post("b", "b2", sender=BOB), post("a", "a3")]
    results = services.room_messages_post(posts=posts)
    assert [outcome(r) for r in results] == [(1, True), (1, True), (2, True), (1, True),
                                             (2, True), (3, True)]
    assert stored("a") == [(1, "a1"), (2, "a2"), (3, "a3")]
    assert [(e["room"], e["id"]) for e in room_events] == [
        ("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2), ("a", 3)]
    assert results[4][0]["sender"] == BOB
    # The next batch goes on from there.
    more = services.room_messages_post(posts=[post("a", "a4"), post("b", "b3")])
    assert [outcome(r) for r in more] == [(4, True), (3, True)]


def test_a_client_id_is_stored_once_whether_stored_before_or_twice_in_the_batch(room_events):
    services.room_message_post(room="r", text="earlier", sender=ALICE, origin="t",
                               client_id="c-1")
    results = services.room_messages_post(posts=[
        post("r", "again", client_id="c-1"), post("r", "new", client_id="c-2"),
        post("r", "new, resent", client_id="c-2"), post("r", "other sender", sender=BOB,
                                                        client_id="c-2"),
    ])
    assert [outcome(r) for r in results] == [(1, False), (2, True), (2, False), (3, True)]
    assert results[2][0]["text"] == "new"  # the first one's message
    assert stored("r") == [(1, "earlier"), (2, "new"), (3, "other sender")]
    assert [e["id"] for e in room_events] == [1, 2, 3]


def test_a_refused_message_costs_the_others_of_its_batch_nothing(settings):
    services.room_close(room="shut")
    SenderBlock.objects.create(protocol="web", kind=SenderBlock.KIND_NAME, value="Spammer")
    spammer = events.sender(protocol="web", id="anon:s", name="spammer")
    results = services.room_messages_post(posts=[
        post("ok", "one"), post("ok", ""), post("bad room!", "x"), post("shut", "closed?"),
        post("ok", "buy now", sender=spammer), post("ok", 42), post("ok", "two"),
    ])
    assert [outcome(r) for r in results] == [
        (1, True), "empty_message", "invalid_room", "room_closed", "blocked",
        "invalid_message", (2, True)]
    assert stored("ok") == [(1, "one"), (2, "two")]
    assert stored("shut") == []


def test_a_new_room_is_created_for_each_sender_in_turn_within_the_room_policy(settings):
    settings.GATEWAY = {**settings.GATEWAY, "ROOMS_STAFF_ONLY": True}
    results = services.room_messages_post(posts=[
        post("fresh", "anyone?"), post("fresh", "opening it", sender=STAFF),
        post("fresh", "now it exists"),
    ])
    assert [outcome(r) for r in results] == ["room_not_found", (1, True), (2, True)]


def test_a_client_id_another_process_stored_meanwhile_is_answered_as_a_repeat(monkeypatch):
    services.room_message_post(room="race", text="won elsewhere", sender=ALICE, origin="t",
                               client_id="c-9")
    # As if the row was committed after the batch looked for it: the bulk insert fails on
    # the unique key, and the batch is stored one message at a time instead.
    monkeypatch.setattr(services, "_messages_by_client_ids", lambda posts: {})
    results = services.room_messages_post(posts=[
        post("race", "lost", client_id="c-9"), post("race", "unrelated"),
    ])
    assert [outcome(r) for r in results] == [(1, False), (2, True)]
    assert stored("race") == [(1, "won elsewhere"), (2, "unrelated")]


# --- the committer: the queue and its one writer ---------------------------------------------


async def test_messages_that_arrive_together_share_a_hop_and_each_gets_its_answer():
    count = 60
    results = await asyncio.gather(*(
        ingest.message_post(post(f"room{i % 7}", f"m{i}", client_id=f"c-{i}"))
        for i in range(count)))
    assert sorted(r[0]["text"] for r in results) == sorted(f"m{i}" for i in range(count))
    assert all(created for _, created in results)
    stats = ingest.committer().stats
    assert stats["messages"] == count and stats["batches"] < count  # batched by themselves
    again = await ingest.message_post(post("room0", "m0 again", client_id="c-0"))
    assert again[1] is False and again[0]["text"] == "m0"


async def test_a_lone_message_goes_at_once():
    started = asyncio.get_running_loop().time()
    event, created = await ingest.message_post(post("quiet", "hello"))
    assert created and event["id"] == 1
    assert asyncio.get_running_loop().time() - started < 1.0  # no timer to wait out
    assert ingest.committer().stats["batches"] == 1


def held(monkeypatch) -> threading.Event:
    """Make the database hold every batch until the returned event is set."""
    hold = threading.Event()
    real = services.room_messages_post

    def slow(*, posts):
        hold.wait(5)
        return real(posts=posts)

    monkeypatch.setattr(services, "room_messages_post", slow)
    return hold


async def test_past_its_limit_the_queue_refuses_as_busy(monkeypatch):
    monkeypatch.setattr(ingest, "QUEUE_LIMIT", 3)
    hold = held(monkeypatch)
    first = asyncio.create_task(ingest.message_post(post("jam", "in flight")))
    await asyncio.sleep(0.1)  # taken: the database holds it
    waiting = [asyncio.create_task(ingest.message_post(post("jam", f"w{i}"))) for i in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(ingest.Busy) as refused:
        await ingest.message_post(post("jam", "one too many"))
    assert refused.value.code == "unavailable"
    hold.set()
    assert (await first)[0]["id"] == 1
    assert [(await w)[0]["id"] for w in waiting] == [2, 3, 4]


async def test_a_message_whose_sender_stopped_waiting_is_not_stored(monkeypatch):
    hold = held(monkeypatch)
    first = asyncio.create_task(ingest.message_post(post("gone", "stored")))
    await asyncio.sleep(0.1)
    abandoned = asyncio.create_task(ingest.message_post(post("gone", "never")))
    await asyncio.sleep(0.05)
    abandoned.cancel()
    hold.set()
    await first
    await asyncio.sleep(0.1)
    assert await database_sync_to_async(stored)("gone") == [(1, "stored")]


async def test_a_database_error_reaches_every_sender_of_its_batch(monkeypatch):
    def down(*, posts):
        raise OperationalError("database is locked")

    monkeypatch.setattr(services, "room_messages_post", down)
    results = await asyncio.gather(
        *(ingest.message_post(post("down", f"m{i}")) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, OperationalError) for r in results)


def test_a_repeat_whose_first_post_was_refused_is_stored_as_one_at_a_time_would(settings):
    settings.GATEWAY = {**settings.GATEWAY, "ROOMS_STAFF_ONLY": True}
    results = services.room_messages_post(posts=[
        post("new", "is anyone here?", client_id="k"), post("new", "opening it", sender=STAFF),
        post("new", "is anyone here?", client_id="k"),  # resent, once the room is there
    ])
    assert [outcome(r) for r in results] == ["room_not_found", (1, True), (2, True)]


def test_a_row_the_database_refuses_costs_only_its_own_message(monkeypatch):
    from django.db import DataError

    real_insert = services._messages_insert

    def picky(rows):  # the database refuses any statement with this row in it
        if any(row[2] == "too much" for row in rows):
            raise DataError("value too long for type character varying")
        return real_insert(rows)

    monkeypatch.setattr(services, "_messages_insert", picky)
    results = services.room_messages_post(posts=[
        post("data", "one"), post("data", "too much"), post("data", "two")])
    assert outcome(results[0]) == (1, True) and outcome(results[2]) == (2, True)
    assert isinstance(results[1], DataError)
    assert stored("data") == [(1, "one"), (2, "two")]


def test_rooms_are_taken_in_name_order_so_two_batches_never_wait_on_each_other(monkeypatch):
    taken = []
    real_take = services._cursor_take

    def recording(room, **kwargs):
        taken.append(room)
        return real_take(room, **kwargs)

    monkeypatch.setattr(services, "_cursor_take", recording)
    services.room_messages_post(posts=[post("b", "1"), post("a", "2"), post("c", "3"),
                                       post("a", "4")])
    assert list(dict.fromkeys(taken)) == ["a", "b", "c"]  # each new: taken, created, taken
    assert stored("a") == [(1, "2"), (2, "4")]  # in the batch's order within the room


def test_the_batch_insert_writes_every_column_of_a_new_message():
    columns = {f.column for f in Message._meta.concrete_fields if not f.primary_key}
    later = {"deleted_at", "edited_at", "reactions"}  # what a message gains after it is stored
    assert set(services.MESSAGE_INSERT_COLUMNS) == columns - later


def test_existing_rooms_take_their_cursors_in_one_statement_and_closed_ones_refuse():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for room in ("m1", "m2", "m3", "shut"):
        services.room_messages_post(posts=[post(room, "first")])
    services.room_close(room="shut")
    with CaptureQueriesContext(connection) as queries:
        results = services.room_messages_post(posts=[
            post("m3", "a"), post("m1", "b"), post("shut", "c"), post("m2", "d"),
            post("m1", "e")])
    assert [outcome(r) for r in results] == [(2, True), (2, True), "room_closed", (2, True),
                                             (3, True)]
    updates = [q["sql"] for q in queries.captured_queries
               if q["sql"].lstrip().upper().startswith(("UPDATE", "WITH LOCKED"))]
    # One for the open rooms; the closed one is looked at again by itself (refused: rare).
    assert len(updates) <= 3 and "m1" in updates[0] and "m3" in updates[0]
    assert stored("m1") == [(1, "first"), (2, "b"), (3, "e")]


def test_a_new_room_that_sorts_before_existing_ones_is_created_in_the_same_batch():
    services.room_messages_post(posts=[post("zeta", "there already")])
    results = services.room_messages_post(posts=[
        post("zeta", "one"), post("alpha", "new room"), post("zeta", "two"),
        post("omega", "another new one")])
    assert [outcome(r) for r in results] == [(2, True), (1, True), (3, True), (1, True)]
    assert stored("alpha") == [(1, "new room")] and stored("omega") == [(1, "another new one")]
    assert stored("zeta") == [(1, "there already"), (2, "one"), (3, "two")]


def test_a_name_block_matches_the_same_way_alone_and_in_a_batch():
    SenderBlock.objects.create(protocol="web", kind=SenderBlock.KIND_NAME, value="ÉVE")
    SenderBlock.objects.create(protocol="web", kind=SenderBlock.KIND_NAME, value="Mallory")
    names = ["éve", "ÉVE", "MALLORY", "mallory", "eve"]
    senders = [events.sender(protocol="web", id=f"anon:{i}", name=n) for i, n in enumerate(names)]
    alone = [outcome(services.room_messages_post(posts=[post(f"alone{i}", "x", sender=s)])[0])
             for i, s in enumerate(senders)]
    batch = [outcome(r) for r in services.room_messages_post(
        posts=[post("together", "x", sender=s) for s in senders])]
    assert [r == "blocked" for r in alone] == [r == "blocked" for r in batch]
    assert batch[1:4] == ["blocked", "blocked", "blocked"] and batch[4] != "blocked"


async def test_a_stop_waits_for_the_batch_being_stored_and_refuses_what_was_queued(monkeypatch):
    monkeypatch.setattr(ingest, "STOP_WAIT", 0.2)
    hold = held(monkeypatch)
    first = asyncio.create_task(ingest.message_post(post("halt", "being stored")))
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(ingest.message_post(post("halt", "queued")))
    await asyncio.sleep(0.05)
    threading.Timer(0.3, hold.set).start()  # the database finishes after the first wait
    await ingest.committer_stop()
    assert (await first)[0]["id"] == 1  # its sender learns it was stored
    with pytest.raises(ingest.Busy):
        await queued
    with pytest.raises(ingest.Busy):  # and nothing more is taken on this loop
        await ingest.message_post(post("halt", "late"))
    assert await database_sync_to_async(stored)("halt") == [(1, "being stored")]


async def test_a_committer_whose_task_failed_is_replaced_and_its_senders_told(monkeypatch):
    monkeypatch.setattr(services, "room_messages_post", lambda *, posts: [])  # a bug
    with pytest.raises(RuntimeError):
        await ingest.message_post(post("bug", "lost?"))
    monkeypatch.undo()
    event, created = await ingest.message_post(post("bug", "after the fix"))
    assert created and event["id"] == 1
