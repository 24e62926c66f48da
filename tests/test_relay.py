"""The relay in-process (gateway/relay.py): a fake role records what it is handed, on the
in-memory layer and the test database. Lease, positions, resume and takeover, batches,
retries, the backlog, targets coming and going, the tail and the log."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from channels.db import database_sync_to_async
from django.db import OperationalError
from django.db.models import F, Value

from gateway import events, relay, selectors, services
from gateway.models import BotChat, Lease, RelayCursor, Room
from gateway.relay import Relay, RelayRole, TargetGone

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

ALICE = events.sender(protocol="web", id="anon:alice", name="alice")
TICK = 0.05


class FakeRole(RelayRole):
    """Records every batch it is handed: ``(room, target, [cursors])``."""

    protocol = "web"

    def __init__(self, name: str = "fake", *, every_room: bool = True, **options) -> None:
        self.name = name
        self.every_room = every_room
        self.from_start = every_room
        self.refresh_targets = not every_room
        for key, value in options.items():
            setattr(self, key, value)
        self.batches: list[tuple[str, str, list[int]]] = []
        self.kinds: list[str] = []
        self.skips: list[tuple[str, str, int, int]] = []
        self.failures = 0  # deliveries still to fail
        self.gone: set[str] = set()
        self.hold: asyncio.Event | None = None  # deliveries wait for it while set

    def targets(self):
        if self.every_room:
            return Room.objects.filter(selectors.rooms_reaching(self.protocol)).values(
                room=F("name"), target=Value(""))
        chats = BotChat.objects.filter(platform="fake", blocked=False).exclude(room="")
        chats = chats.exclude(room__in=selectors.rooms_not_reaching(self.protocol))
        return chats.values("room", target=F("chat_id"))

    async def deliver(self, batch) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if batch.target in self.gone:
            raise TargetGone(batch.target)
        if self.failures:
            self.failures -= 1
            raise OSError("the far end is down")
        self.batches.append((batch.room, batch.target, [d.cursor for d in batch.entries]))
        self.kinds.extend(d.event["type"] for d in batch.entries)

    async def skipped(self, room, target, *, after, upto) -> None:
        self.skips.append((room, target, after, upto))

    def delivered(self, room: str, target: str = "") -> list[int]:
        return [c for r, t, cursors in self.batches if (r, t) == (room, target) for c in cursors]


def post(room: str, text: str = "hi") -> int:
    event, _ = services.room_message_post(room=room, text=text, sender=ALICE, origin="test")
    return event["id"]


apost = database_sync_to_async(post)


def positions(role: str) -> dict[tuple[str, str], int]:
    rows = RelayCursor.objects.filter(relay=role).values_list("room", "target", "last_seq")
    return {(room, target): seq for room, target, seq in rows}


apositions = database_sync_to_async(positions)


@database_sync_to_async
def chat_join(chat_id: str, room: str) -> None:
    """A fake target joins a room as a chat does: placed at the room's newest cursor."""
    head = services.room_get_or_create(room=room).last_seq
    BotChat.objects.update_or_create(platform="fake", chat_id=chat_id,
                                     defaults={"room": room, "kind": "private", "title": chat_id})
    services.relay_target_place(relay="fake", room=room, target=chat_id, position=head)


async def until(condition, timeout: float = 5.0, what: str = "not in time") -> None:
    """Poll a condition on the relay's own loop (its state is in memory)."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 (nothing to wait on: the relay tells nobody)
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(what) from None


async def started(role: RelayRole, **options) -> Relay:
    r = Relay(role, tick=TICK, **options)
    await r.start()
    await until(lambda: r.leader, what="never led")
    return r


# --- order, once, positions ------------------------------------------------------------------


async def test_each_room_is_delivered_in_order_once_and_its_position_saved():
    role = FakeRole()
    r = await started(role)
    for i in range(5):
        await apost("a", f"a{i}")
        await apost("b", f"b{i}")
    await until(lambda: len(role.delivered("a")) == 5 and len(role.delivered("b")) == 5)
    await asyncio.sleep(0.2)  # nothing more comes
    assert role.delivered("a") == [1, 2, 3, 4, 5] and role.delivered("b") == [1, 2, 3, 4, 5]
    await r.stop()
    assert await apositions("fake") == {("a", ""): 5, ("b", ""): 5}


async def test_a_restart_resumes_after_the_saved_position_and_repeats_nothing():
    role = FakeRole()
    r = await started(role)
    for i in range(3):
        await apost("a", f"a{i}")
    await until(lambda: len(role.delivered("a")) == 3)
    await r.stop()
    for i in range(3):
        await apost("a", f"while away {i}")
    again = FakeRole()
    r = await started(again)
    await until(lambda: len(again.delivered("a")) == 3)
    await asyncio.sleep(0.2)
    assert again.delivered("a") == [4, 5, 6]
    await r.stop()


async def test_one_process_leads_and_another_takes_over_where_it_stopped():
    first, second = FakeRole(), FakeRole()
    a = await started(first, lease_ttl=1.0)
    b = Relay(second, tick=TICK, lease_ttl=1.0)
    await b.start()
    await apost("r", "one")
    await until(lambda: first.delivered("r") == [1])
    await asyncio.sleep(0.3)
    assert not b.leader and second.batches == []
    await a.stop()  # hands the lease over
    await until(lambda: b.leader, what="no takeover")
    await apost("r", "two")
    await until(lambda: second.delivered("r") == [2])
    await asyncio.sleep(0.2)
    assert first.delivered("r") == [1] and second.delivered("r") == [2]
    await b.stop()


async def test_a_room_the_role_never_delivered_starts_from_now_and_a_new_one_from_its_start():
    await apost("old", "before the role ran")
    role = FakeRole()
    r = await started(role)
    await apost("old", "after")
    await apost("new", "first")
    await until(lambda: role.delivered("old") == [2] and role.delivered("new") == [1])
    await r.stop()


# --- batches, failures, backlog --------------------------------------------------------------


async def test_what_arrives_during_a_delivery_goes_in_the_next_batches_within_their_size():
    role = FakeRole(batch_size=4)
    role.hold = asyncio.Event()
    r = await started(role)
    for i in range(10):
        await apost("a", f"m{i}")
    role.hold.set()
    await until(lambda: len(role.delivered("a")) == 10)
    assert role.delivered("a") == list(range(1, 11))
    sizes = [len(cursors) for _, _, cursors in role.batches]
    assert max(sizes) <= 4 and len(sizes) < 10
    await r.stop()


async def test_a_failing_delivery_is_retried_in_order_and_nothing_is_skipped(monkeypatch):
    monkeypatch.setattr(relay, "RETRY_FIRST", 0.02)
    role = FakeRole()
    role.failures = 3
    r = await started(role)
    for i in range(4):
        await apost("a", f"m{i}")
    await until(lambda: len(role.delivered("a")) == 4)
    assert role.delivered("a") == [1, 2, 3, 4]
    assert r.stats["retries"] == 3
    await r.stop()


async def test_a_target_too_far_behind_skips_the_oldest_and_is_told():
    role = FakeRole(backlog=3, batch_size=1)
    role.hold = asyncio.Event()
    r = await started(role)
    await apost("a", "m0")
    await until(lambda: r.rooms.get("a") is not None and r.rooms["a"].head == 1)
    for i in range(1, 10):
        await apost("a", f"m{i}")
    role.hold.set()
    await until(lambda: role.delivered("a")[-1:] == [10])
    # m0 was being delivered; then 10 - 3 = 7 is where the skip ends: the newest 3 follow.
    assert role.skips == [("a", "", 1, 7)]
    assert role.delivered("a") == [1, 8, 9, 10]
    assert r.stats["skipped"] == 6
    await r.stop()


async def test_a_gone_target_is_dropped_and_the_others_go_on():
    role = FakeRole(every_room=False)
    r = await started(role)
    await chat_join("7", "room")
    await chat_join("8", "room")
    role.gone.add("7")
    await apost("room", "one")
    await until(lambda: role.delivered("room", "8") == [1])
    await until(lambda: r.stats["gone"] == 1)
    await apost("room", "two")
    await until(lambda: role.delivered("room", "8") == [1, 2])
    assert role.delivered("room", "7") == []
    assert set(r.rooms["room"].targets) == {"8"}
    await r.stop()


# --- targets, tail and log ------------------------------------------------------------------


async def test_a_target_joining_a_followed_room_gets_what_follows_its_join_and_a_leaver_nothing():
    role = FakeRole(every_room=False)
    r = await started(role)
    await chat_join("7", "room")
    await apost("room", "one")
    await until(lambda: role.delivered("room", "7") == [1])
    await chat_join("8", "room")  # placed at 1
    await apost("room", "two")
    await until(lambda: role.delivered("room", "8") == [2]
                and role.delivered("room", "7") == [1, 2])
    await database_sync_to_async(BotChat.objects.filter(chat_id="7").update)(room="")
    await asyncio.sleep(TICK * 4)  # the next refresh takes it out
    await apost("room", "three")
    await until(lambda: role.delivered("room", "8") == [2, 3])
    await asyncio.sleep(0.2)
    assert role.delivered("room", "7") == [1, 2]
    await r.stop()


async def test_a_message_deleted_before_a_target_had_it_is_not_delivered_to_it():
    role = FakeRole(every_room=False, batch_size=1)
    role.hold = asyncio.Event()
    r = await started(role)
    await chat_join("7", "room")
    for text in ("one", "two", "three"):
        await apost("room", text)
    await until(lambda: r.rooms.get("room") is not None and r.rooms["room"].head == 3)
    await database_sync_to_async(services.messages_delete)(messages=[("room", 2)])
    await until(lambda: r.rooms["room"].head == 4)
    role.hold.set()
    await until(lambda: role.delivered("room", "7")[-1:] == [4])
    assert role.delivered("room", "7") == [1, 3, 4]  # one was in flight; two never went
    assert role.kinds == [events.ROOM_MESSAGE, events.ROOM_MESSAGE, events.ROOM_ENTRY]
    await r.stop()


async def test_a_target_behind_the_tail_reads_the_log_in_order(monkeypatch):
    monkeypatch.setattr(relay, "TAIL_LIMIT", 3)
    role = FakeRole(batch_size=2)
    role.hold = asyncio.Event()
    r = await started(role)
    await apost("a", "m0")
    await until(lambda: r.rooms.get("a") is not None and r.rooms["a"].head == 1)
    for i in range(1, 9):
        await apost("a", f"m{i}")
    await until(lambda: r.rooms["a"].head == 9)
    assert [d.cursor for d in r.rooms["a"].tail] == [7, 8, 9]  # 2-6: only in the log now
    role.hold.set()
    await until(lambda: len(role.delivered("a")) == 9)
    assert role.delivered("a") == list(range(1, 10))
    await r.stop()


async def test_a_quiet_room_is_left_and_followed_again_when_it_has_news():
    role = FakeRole(idle_timeout=0.2)
    r = await started(role)
    await apost("a", "one")
    await until(lambda: role.delivered("a") == [1])
    await until(lambda: "a" not in r.rooms, what="the quiet room was kept")
    runtime_rooms = (await relay.get_runtime()).hub.rooms
    assert "a" not in runtime_rooms
    await apost("a", "two")
    await until(lambda: role.delivered("a") == [1, 2])
    await r.stop()


async def test_each_delivery_is_saved_before_the_next_with_no_save_interval():
    role = FakeRole(every_room=False, save_interval=0, batch_size=1)
    seen: list[dict] = []

    async def deliver(batch) -> None:
        seen.append(await apositions("fake"))
        role.batches.append((batch.room, batch.target, [d.cursor for d in batch.entries]))

    role.deliver = deliver  # type: ignore[method-assign]
    r = await started(role)
    await chat_join("7", "room")
    for text in ("one", "two", "three"):
        await apost("room", text)
    await until(lambda: role.delivered("room", "7") == [1, 2, 3])
    assert [s[("room", "7")] for s in seen] == [0, 1, 2]
    await r.stop()


lease_set = database_sync_to_async(lambda **fields: Lease.objects.filter(name="fake")
                                   .update(**fields))


async def a_holder_delivers_old_then_stops() -> None:
    """A first holder of the role delivers room "old" its first message, then stops."""
    first = FakeRole()
    a = await started(first)
    await apost("old", "one")
    await until(lambda: first.delivered("old") == [1])
    await a.stop()  # the lease is handed over; a crash would let it expire


async def test_a_lost_lease_stops_delivery_at_once_and_a_retaken_one_resumes():
    role = FakeRole()
    r = await started(role)
    await apost("a", "one")
    await until(lambda: role.delivered("a") == [1])
    await lease_set(holder="another process", expires_at=datetime.now(UTC) + timedelta(seconds=60))
    await until(lambda: not r.leader, what="kept delivering without the lease")
    assert r.rooms == {}
    await apost("a", "two")
    await asyncio.sleep(0.3)
    assert role.delivered("a") == [1]
    await lease_set(expires_at=datetime.now(UTC) - timedelta(seconds=1))  # it expires
    await until(lambda: role.delivered("a")[-1:] == [2], what="not resumed")
    assert set(role.delivered("a")) == {1, 2}  # 1 again at most: its position was unsaved
    await r.stop()


async def test_housekeeping_that_keeps_failing_is_logged_once_in_a_while(monkeypatch, caplog):
    def down(**kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(selectors, "relay_rooms_pending", down)
    r = await started(FakeRole())
    await asyncio.sleep(TICK * 10)
    failures = [rec for rec in caplog.records if "housekeeping failed" in rec.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    await r.stop()


async def test_a_room_created_while_the_role_had_no_holder_is_delivered_from_its_start():
    await a_holder_delivers_old_then_stops()
    await apost("new", "created while nobody relayed")
    await apost("old", "two")
    second = FakeRole()
    b = await started(second)
    await until(lambda: second.delivered("new") == [1] and second.delivered("old") == [2])
    await b.stop()


async def test_after_a_long_vacancy_what_the_role_never_delivered_starts_from_the_takeover():
    await a_holder_delivers_old_then_stops()
    await apost("new", "while the protocol was off")
    await apost("old", "two")
    await lease_set(expires_at=datetime.now(UTC) - timedelta(seconds=relay.FRESH_START_AFTER + 60))
    second = FakeRole()
    b = await started(second)
    await apost("new", "after")
    await until(lambda: second.delivered("new") == [2])
    assert second.delivered("old") == [2]  # a known position still resumes
    await b.stop()


async def test_a_delivery_cut_short_by_a_stop_keeps_what_it_delivered(monkeypatch):
    monkeypatch.setattr(relay, "STOP_WAIT", 0.1)
    role = FakeRole(batch_size=10)
    release = asyncio.Event()

    async def deliver(batch) -> None:
        for delivery in batch.entries:
            if delivery.cursor == 3:
                await release.wait()  # hangs on the third (never released)
            role.batches.append((batch.room, batch.target, [delivery.cursor]))
            batch.done(delivery.cursor)

    role.deliver = deliver  # type: ignore[method-assign]
    r = await started(role)
    await apost("a", "m1")
    await until(lambda: role.delivered("a") == [1])
    for i in range(2, 6):
        await apost("a", f"m{i}")
    await until(lambda: role.delivered("a") == [1, 2])
    await r.stop()
    assert await apositions("fake") == {("a", ""): 2}  # not 1 (all again), not 5
