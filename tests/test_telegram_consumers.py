"""The Telegram consumers in-process: ApplicationCommunicator plays the protocol server (its
``chat.*`` events in, what the consumer sends out), on the in-memory layer; no Bot API."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.db import OperationalError

from gateway import chats, events, selectors, services
from gateway.models import BotChat, Message
from gateway.ratelimit import TokenBucket
from protocols.telegram import consumers
from protocols.telegram.consumers import TelegramChatConsumer, TelegramRoomConsumer
from tests.helpers import until_live

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

PLATFORM = "telegram"
PRIVATE = {"id": "100", "kind": "private", "title": "Alice Liddell"}
ALICE = {"id": "7", "username": "alice", "name": "Alice Liddell"}
WEB = events.sender(protocol="web", id="anon:bob", name="bob")
STAFF = events.sender(protocol="system", id="staff:1", name="boss")


# --- helpers -------------------------------------------------------------------------------


async def chat(info: dict = PRIVATE) -> ApplicationCommunicator:
    comm = ApplicationCommunicator(TelegramChatConsumer.as_asgi(), {
        "type": "telegram", "role": "chat", "chat": info, "user": ALICE,
        "bot_username": "gateway_bot",
    })
    await comm.send_input({"type": "chat.connect"})
    return comm


def update(update_id: int, text: str, reads_all: bool | None = None) -> dict:
    return {"type": "chat.received_message", "update_id": update_id, "text": text,
            "user": ALICE, "reads_all": reads_all}


def handled(update_id: int) -> dict:
    return {"type": "chat.handled", "update_id": update_id}


async def replies(comm: ApplicationCommunicator, update_id: int) -> list[str]:
    """The texts the bot answered ``update_id`` with, up to its ``chat.handled``."""
    texts = []
    while (out := await comm.receive_output(timeout=5)) != handled(update_id):
        assert out["type"] == "chat.send_message" and out["chat_id"] == PRIVATE["id"], out
        assert isinstance(out["text"], str)
        texts.append(out["text"])
    return texts


async def relay(room: str) -> ApplicationCommunicator:
    """A room's relay to its chats, once it is live."""
    comm = ApplicationCommunicator(TelegramRoomConsumer.as_asgi(), {
        "type": "telegram", "role": "room", "room": room,
    })
    await comm.send_input({"type": "chat.connect"})
    await until_live(f"telegram-out-{room}")
    return comm


async def disconnect(comm: ApplicationCommunicator) -> None:
    await comm.send_input({"type": "chat.disconnect"})
    await comm.wait(timeout=5)


async def sends(comm: ApplicationCommunicator, n: int) -> list[dict]:
    """``n`` sends, sorted by chat (the relay's order of chats is the database's)."""
    got = [await comm.receive_output(timeout=5) for _ in range(n)]
    assert all(o["type"] == "chat.send_message" for o in got), got
    return sorted(got, key=lambda o: o["chat_id"])


@database_sync_to_async
def chats_join(room: str, *chat_ids: str) -> None:
    for chat_id in chat_ids:
        record = chats.bot_chat_open(platform=PLATFORM, chat_id=chat_id, kind="private",
                                        title=chat_id)
        chats.bot_chat_join(chat=record, room=room)


@database_sync_to_async
def post(room: str, text: str, sender: events.Sender = WEB, origin: str = "test") -> int:
    event, _ = services.room_message_post(room=room, text=text, sender=sender, origin=origin)
    return event["id"]


@database_sync_to_async
def stored(room: str) -> list[str]:
    return list(Message.objects.filter(room__name=room).values_list("text", flat=True))


# --- TelegramChatConsumer --------------------------------------------------------------------


async def test_a_chat_joins_a_room_and_its_text_is_posted_once(room_events):
    comm = await chat()
    await comm.send_input(update(1, "hello?"))
    (hint,) = await replies(comm, 1)  # in no room yet: told how to join
    assert "/join" in hint
    await comm.send_input(update(2, "/join lobby"))
    (joined,) = await replies(comm, 2)
    assert "You joined" in joined and "<b>lobby</b>" in joined
    assert room_events == []

    await comm.send_input(update(3, "hello room"))
    assert await replies(comm, 3) == []  # posted: nothing to answer
    (event,) = room_events
    assert (event["room"], event["text"], event["client_id"]) == ("lobby", "hello room",
                                                                  "update-3")
    assert event["sender"] == {"protocol": "telegram", "id": "telegram-7", "name": "Alice Liddell"}
    assert event["origin"] == selectors.bot_chat_origin(PLATFORM, PRIVATE["id"])
    # Telegram delivers update 3 (and the /join) again: handled, and nothing else happens.
    await comm.send_input(update(3, "hello room"))
    assert await replies(comm, 3) == []
    await comm.send_input(update(2, "/join lobby"))
    assert await replies(comm, 2) == []
    assert await comm.receive_nothing(timeout=0.1)
    assert len(room_events) == 1 and await stored("lobby") == ["hello room"]
    await disconnect(comm)


async def test_a_group_under_privacy_mode_is_told_its_text_does_not_reach_the_bot():
    group = {"id": "-200", "kind": "supergroup", "title": "Gardeners"}
    comm = await chat(group)
    await comm.send_input(update(1, "/join@gateway_bot lobby", reads_all=False))
    out = await comm.receive_output(timeout=5)
    assert out["chat_id"] == "-200" and "privacy mode" in out["text"]
    assert "/setprivacy" in out["text"] and "&lt;" not in out["text"]  # no markup shown as text
    assert await comm.receive_output(timeout=5) == handled(1)
    await disconnect(comm)


async def test_a_chat_over_its_rate_is_told_and_nothing_is_posted(monkeypatch, room_events):
    now = [0.0]
    monkeypatch.setattr(consumers, "flood_limit",
                        lambda: TokenBucket(rate=1.0, burst=2, clock=lambda: now[0]))
    await chats_join("busy", PRIVATE["id"])
    comm = await chat()
    for update_id in (1, 2, 3):
        await comm.send_input(update(update_id, f"m{update_id}"))
    assert await replies(comm, 1) == [] and await replies(comm, 2) == []
    (slow,) = await replies(comm, 3)
    assert "Slow down" in slow
    now[0] += 1.0  # a second later: one more
    await comm.send_input(update(4, "m4"))
    assert await replies(comm, 4) == []
    assert [e["text"] for e in room_events] == ["m1", "m2", "m4"]
    await disconnect(comm)


async def test_an_update_the_database_could_not_store_fails_and_is_handled_when_it_comes_again(
    monkeypatch, room_events
):
    await chats_join("flaky", PRIVATE["id"])
    real_post = services.room_message_post

    def unavailable(**kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(services, "room_message_post", unavailable)
    comm = await chat()
    await comm.send_input(update(5, "first try"))
    # Not handled: the server does not confirm it, so Telegram delivers it again.
    assert await comm.receive_output(timeout=5) == {"type": "chat.failed", "update_id": 5}
    assert await comm.receive_nothing(timeout=0.1)
    monkeypatch.setattr(services, "room_message_post", real_post)
    await comm.send_input(update(5, "first try"))
    assert await replies(comm, 5) == []  # the failed attempt did not claim the update
    assert [e["text"] for e in room_events] == ["first try"]
    await disconnect(comm)


# --- TelegramRoomConsumer --------------------------------------------------------------------


async def test_a_room_message_goes_to_every_chat_but_the_one_it_came_from():
    await chats_join("lobby", "A", "B")
    out = await relay("lobby")
    await post("lobby", "hi <all>")
    assert await sends(out, 2) == [
        {"type": "chat.send_message", "chat_id": chat_id, "room": "lobby", "id": 1,
         "text": "<b>bob</b> (web): hi &lt;all&gt;", "last": True}
        for chat_id in ("A", "B")
    ]
    # Posted by chat A: only B is sent it.
    tg = events.sender(protocol="telegram", id="telegram-7", name="alice")
    await post("lobby", "from A", sender=tg, origin=selectors.bot_chat_origin(PLATFORM, "A"))
    (only,) = await sends(out, 1)
    assert (only["chat_id"], only["id"]) == ("B", 2)
    assert only["text"] == "<b>alice</b> (telegram): from A"
    assert await out.receive_nothing(timeout=0.2)
    await disconnect(out)


async def test_a_long_message_is_sent_in_pieces_and_only_the_last_counts_as_sent():
    await chats_join("long", "A")
    out = await relay("long")
    await post("long", "x" * 4096)
    pieces = []
    while not pieces or not pieces[-1]["last"]:
        pieces.append(await out.receive_output(timeout=5))
    assert len(pieces) >= 2 and all(not p["last"] for p in pieces[:-1])
    assert {(p["chat_id"], p["id"]) for p in pieces} == {("A", 1)}
    text = "".join(p["text"] for p in pieces)
    assert text == "<b>bob</b> (web): " + "x" * 4096
    assert await out.receive_nothing(timeout=0.2)
    await disconnect(out)


async def test_a_deleted_message_is_dropped_from_the_chats_queues():
    await chats_join("oops", "A")
    out = await relay("oops")
    await post("oops", "regret")
    (sent,) = await sends(out, 1)
    await database_sync_to_async(services.messages_delete)(messages=[("oops", 1)], by=STAFF)
    assert await out.receive_output(timeout=5) == {"type": "chat.drop", "room": "oops", "id": 1}
    # A close is an entry too, but has nothing to drop.
    await database_sync_to_async(services.room_close)(room="oops", by=STAFF)
    assert await out.receive_nothing(timeout=0.2)
    await disconnect(out)


async def test_the_relay_resumes_each_chat_after_what_it_was_sent():
    await chats_join("resume", "A", "B")
    for text in ("one", "two"):
        await post("resume", text)
    # A was sent both already (recorded by an earlier relay); B neither.
    await database_sync_to_async(chats.bot_chats_delivered_save)(
        platform=PLATFORM, room="resume", positions={"A": 2}
    )
    out = await relay("resume")
    caught_up = [await out.receive_output(timeout=5) for _ in range(2)]
    assert [(o["chat_id"], o["id"]) for o in caught_up] == [("B", 1), ("B", 2)]
    # The server reports B sent message 2: recorded, and answered.
    await out.send_input({"type": "chat.delivered", "positions": {"B": 2}})
    assert await out.receive_output(timeout=5) == {"type": "chat.recorded", "chat_id": "B"}
    positions = await database_sync_to_async(selectors.room_bot_chats)(
        platform=PLATFORM, room="resume"
    )
    assert positions == {"A": 2, "B": 2}
    await post("resume", "three")
    assert [(o["chat_id"], o["id"]) for o in await sends(out, 2)] == [("A", 3), ("B", 3)]
    await disconnect(out)


async def test_an_unreachable_chat_leaves_the_room_and_is_sent_nothing_more():
    await chats_join("gone", "A", "B")
    out = await relay("gone")
    await out.send_input({"type": "chat.unreachable", "chat_id": "A"})
    # Events are handled in order: once this one is answered, A has been taken out.
    await out.send_input({"type": "chat.delivered", "positions": {"B": 0}})
    assert await out.receive_output(timeout=5) == {"type": "chat.recorded", "chat_id": "B"}
    rooms = await database_sync_to_async(
        lambda: dict(BotChat.objects.values_list("chat_id", "room"))
    )()
    assert rooms == {"A": "", "B": "gone"}
    await post("gone", "still here?")
    (only,) = await sends(out, 1)
    assert only["chat_id"] == "B"
    assert await out.receive_nothing(timeout=0.2)
    await disconnect(out)
