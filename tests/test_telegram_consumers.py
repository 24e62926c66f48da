"""The Telegram consumer in-process: ApplicationCommunicator plays the protocol server (its
``chat.*`` events in, what the consumer sends out), on the in-memory layer; no Bot API. And
the relay's Telegram role, sending to a stand-in for the server."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.db import OperationalError

from gateway import chats, events, selectors, services
from gateway.models import BotChat, Message, RelayCursor
from gateway.ratelimit import TokenBucket
from gateway.relay import Relay
from protocols.telegram import consumers
from protocols.telegram.consumers import TelegramChatConsumer
from protocols.telegram.relay import TelegramChats
from protocols.telegram.server import Sent

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


async def disconnect(comm: ApplicationCommunicator) -> None:
    await comm.send_input({"type": "chat.disconnect"})
    await comm.wait(timeout=5)


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


# --- the relay role to the chats (protocols/telegram/relay.py) ---------------------------------


class Bot:
    """Stands in for the Telegram server: records what the role sends, answers as told."""

    def __init__(self) -> None:
        self.sent: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.gone: set[str] = set()
        self.hold: asyncio.Event | None = None

    async def send(self, chat_id: str, text: str) -> Sent:
        if self.hold is not None:
            await self.hold.wait()
        if chat_id in self.gone:
            return Sent.GONE
        self.sent.put_nowait((chat_id, text))
        return Sent.SENT

    async def take(self, n: int) -> list[tuple[str, str]]:
        """``n`` sends, sorted by chat (chats are sent to concurrently)."""
        got = [await asyncio.wait_for(self.sent.get(), 5) for _ in range(n)]
        return sorted(got)

    async def nothing_more(self) -> bool:
        await asyncio.sleep(0.3)
        return self.sent.empty()


async def chats_relay(backlog: int = 100) -> tuple[Relay, Bot]:
    bot = Bot()
    relay = Relay(TelegramChats(bot, backlog=backlog), tick=0.05)  # type: ignore[arg-type]
    await relay.start()
    assert relay.leader
    return relay, bot


async def test_a_room_message_goes_to_every_chat_but_the_one_it_came_from():
    await chats_join("lobby", "A", "B")
    relay, bot = await chats_relay()
    await post("lobby", "hi <all>")
    assert await bot.take(2) == [(chat_id, "<b>bob</b> (web): hi &lt;all&gt;")
                                 for chat_id in ("A", "B")]
    # Posted by chat A: only B is sent it.
    tg = events.sender(protocol="telegram", id="telegram-7", name="alice")
    await post("lobby", "from A", sender=tg, origin=selectors.bot_chat_origin(PLATFORM, "A"))
    assert await bot.take(1) == [("B", "<b>alice</b> (telegram): from A")]
    assert await bot.nothing_more()
    await relay.stop()
    positions = await database_sync_to_async(relay_positions)("lobby")
    assert positions == {"A": 2, "B": 2}  # A passed over its own message


async def test_a_long_message_is_sent_in_pieces_in_order():
    await chats_join("long", "A")
    relay, bot = await chats_relay()
    await post("long", "x" * 4096)
    pieces = []
    while not bot.sent.empty() or not pieces:
        pieces.append(await asyncio.wait_for(bot.sent.get(), 5))
        await asyncio.sleep(0.05)
    assert len(pieces) >= 2 and {chat_id for chat_id, _ in pieces} == {"A"}
    assert "".join(text for _, text in pieces) == "<b>bob</b> (web): " + "x" * 4096
    await relay.stop()


async def test_a_message_deleted_before_a_chat_had_it_is_not_sent_to_it():
    await chats_join("oops", "A")
    relay, bot = await chats_relay()
    bot.hold = asyncio.Event()
    await post("oops", "fine")  # being sent while the next two are stored
    await post("oops", "regret")
    await database_sync_to_async(services.messages_delete)(messages=[("oops", 2)], by=STAFF)
    await post("oops", "after")
    await asyncio.sleep(0.2)
    bot.hold.set()
    assert [text for _, text in await bot.take(2)] == ["<b>bob</b> (web): after",
                                                        "<b>bob</b> (web): fine"]
    assert await bot.nothing_more()
    await relay.stop()


async def test_the_relay_resumes_each_chat_after_what_it_was_sent():
    await chats_join("resume", "A", "B")
    for text in ("one", "two"):
        await post("resume", text)
    # A was sent both already (recorded by an earlier holder of the role); B only "one".
    await database_sync_to_async(services.relay_positions_save)(
        relay=PLATFORM, positions={("resume", "A"): 2, ("resume", "B"): 1}
    )
    relay, bot = await chats_relay()
    assert await bot.take(1) == [("B", "<b>bob</b> (web): two")]
    await post("resume", "three")
    assert [chat for chat, _ in await bot.take(2)] == ["A", "B"]
    assert await bot.nothing_more()
    await relay.stop()


async def test_an_unreachable_chat_leaves_the_room_and_is_sent_nothing_more():
    await chats_join("gone", "A", "B")
    relay, bot = await chats_relay()
    bot.gone.add("A")
    await post("gone", "still here?")
    assert await bot.take(1) == [("B", "<b>bob</b> (web): still here?")]
    await asyncio.sleep(0.2)
    rooms = await database_sync_to_async(
        lambda: dict(BotChat.objects.values_list("chat_id", "room"))
    )()
    assert rooms == {"A": "", "B": "gone"}
    assert set(await database_sync_to_async(relay_positions)("gone")) == {"B"}
    bot.gone.clear()
    await post("gone", "and now?")
    assert await bot.take(1) == [("B", "<b>bob</b> (web): and now?")]
    assert await bot.nothing_more()
    await relay.stop()


async def test_a_chat_far_behind_is_told_how_many_messages_it_missed():
    await chats_join("flood", "A")
    relay, bot = await chats_relay(backlog=2)
    bot.hold = asyncio.Event()
    await post("flood", "m0")  # being sent while the rest arrive
    await asyncio.sleep(0.1)
    tg = events.sender(protocol="telegram", id="telegram-7", name="alice")
    for i in range(1, 7):
        own = i == 3  # the chat's own message is not counted as missed
        await post("flood", f"m{i}", sender=tg if own else WEB,
                   origin=selectors.bot_chat_origin(PLATFORM, "A") if own else "test")
    bot.hold.set()
    texts = [text for _, text in [await asyncio.wait_for(bot.sent.get(), 5) for _ in range(4)]]
    assert texts == [
        "<b>bob</b> (web): m0",
        "… 3 earlier messages were skipped here (this chat fell behind); /history shows them.",
        "<b>bob</b> (web): m5", "<b>bob</b> (web): m6",
    ]
    assert await bot.nothing_more()
    await relay.stop()


async def test_a_blocked_chat_is_sent_nothing_at_once_and_unblocked_gets_what_follows():
    await chats_join("mod", "A", "B")
    relay, bot = await chats_relay()
    await post("mod", "before")
    assert [chat for chat, _ in await bot.take(2)] == ["A", "B"]  # the room is followed
    record = await database_sync_to_async(BotChat.objects.get)(chat_id="A")
    await database_sync_to_async(chats.bot_chat_block)(chat=record, blocked=True)
    await post("mod", "while blocked")  # before the relay's next look at the chats
    assert await bot.take(1) == [("B", "<b>bob</b> (web): while blocked")]
    await database_sync_to_async(chats.bot_chat_block)(chat=record, blocked=False)
    await post("mod", "after")
    assert await bot.take(2) == [("A", "<b>bob</b> (web): after"),
                                 ("B", "<b>bob</b> (web): after")]
    assert await bot.nothing_more()
    await relay.stop()


async def test_a_chat_that_leaves_and_joins_again_gets_nothing_said_meanwhile():
    await chats_join("door", "A")
    relay, bot = await chats_relay()
    await post("door", "one")
    assert await bot.take(1) == [("A", "<b>bob</b> (web): one")]
    bot.hold = asyncio.Event()  # so that leaving and joining again fit between two sends
    await post("door", "two")
    record = await database_sync_to_async(BotChat.objects.get)(chat_id="A")
    await database_sync_to_async(chats.bot_chat_leave)(chat=record)
    await post("door", "said while A was away")
    await chats_join("door", "A")
    await post("door", "three")
    bot.hold.set()
    got = [text for _, text in [await asyncio.wait_for(bot.sent.get(), 5) for _ in range(2)]]
    assert got == ["<b>bob</b> (web): two", "<b>bob</b> (web): three"]  # "two" was under way
    assert await bot.nothing_more()
    await relay.stop()


def relay_positions(room: str) -> dict[str, int]:
    rows = RelayCursor.objects.filter(relay=PLATFORM, room=room)
    return dict(rows.values_list("target", "last_seq"))
