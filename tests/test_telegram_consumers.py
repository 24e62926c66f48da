"""The Telegram consumer in-process: ApplicationCommunicator plays the protocol server (its
``chat.*`` events in, what the consumer sends out), on the in-memory layer; no Bot API: a
chat's messages, replies, edits, reactions and move to a supergroup. And the relay's
Telegram role, calling a stand-in for the server: messages, and the edits, deletes,
reactions and replies that find the chats' copies through the map of messages."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.db import OperationalError

from gateway import chats, events, selectors, services
from gateway.models import BotChat, BotMessage, Message, RelayCursor
from gateway.ratelimit import TokenBucket
from gateway.relay import Relay
from protocols.telegram import consumers
from protocols.telegram.calls import Call, Delete, EditText, React, SendText
from protocols.telegram.consumers import TelegramChatConsumer
from protocols.telegram.relay import TelegramChats
from protocols.telegram.server import Answer, Sent

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


def update(update_id: int, text: str, reads_all: bool | None = None, **fields) -> dict:
    """A ``chat.received_message`` (a message unless ``fields`` say otherwise)."""
    return {"type": "chat.received_message", "update_id": update_id, "kind": "message",
            "message_id": 500 + update_id, "text": text, "reply_to_message_id": None,
            "added": [], "removed": [], "migrate_to": None, "user": ALICE,
            "reads_all": reads_all, **fields}


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
    """Stands in for the Telegram server: records the messages the role sends (and, in
    ``calls``, every call), answers as told; messages are numbered from 1000."""

    def __init__(self) -> None:
        self.sent: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.calls: list[tuple[str, Call]] = []
        self.gone: set[str] = set()
        self.hold: asyncio.Event | None = None

    async def send(self, chat_id: str, call: Call) -> Answer:
        if self.hold is not None:
            await self.hold.wait()
        if chat_id in self.gone:
            return Answer(Sent.GONE)
        self.calls.append((chat_id, call))
        if not isinstance(call, SendText):
            return Answer(Sent.SENT)
        self.sent.put_nowait((chat_id, call.text))
        return Answer(Sent.SENT, 999 + len(self.calls))

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


# --- a chat's messages living on: the map, replies, edits, reactions, moves --------------------

TG = events.sender(protocol="telegram", id="telegram-7", name="alice")


@database_sync_to_async
def mapped(chat_id: str, room: str, seq: int, *message_ids: int, own: bool = True) -> None:
    chats.bot_messages_record(platform=PLATFORM, chat_id=chat_id, room=room, seq=seq,
                              message_ids=list(message_ids), own=own)


@database_sync_to_async
def map_of(chat_id: str) -> list[tuple[int, int, bool, int]]:
    rows = BotMessage.objects.filter(platform=PLATFORM, chat_id=chat_id).order_by("message_id")
    return list(rows.values_list("message_id", "seq", "own", "part"))


async def test_a_chat_message_is_mapped_its_reply_answers_and_its_edit_edits(room_events):
    await chats_join("lobby", PRIVATE["id"])
    question = await post("lobby", "question?")
    await mapped(PRIVATE["id"], "lobby", question, 900)  # the bot's copy in this chat
    comm = await chat()
    await comm.send_input(update(1, "answer", message_id=501, reply_to_message_id=900))
    assert await replies(comm, 1) == []
    answer = room_events[-1]
    assert answer["reply_to"]["id"] == question and answer["client_id"] == "update-1"
    assert await map_of(PRIVATE["id"]) == [(501, answer["id"], False, 0),
                                           (900, question, True, 0)]

    await comm.send_input(update(2, "answer!", kind="edit", message_id=501))
    assert await replies(comm, 2) == []
    edit = room_events[-1]
    assert (edit["kind"], edit["id"], edit["text"]) == ("edit", answer["id"], "answer!")
    assert edit["origin"] == selectors.bot_chat_origin(PLATFORM, PRIVATE["id"])
    await comm.send_input(update(2, "answer!", kind="edit", message_id=501))  # again
    assert await replies(comm, 2) == []
    # An edit of the bot's copy, or of a message the room never had: nothing.
    for update_id, message_id in ((3, 900), (4, 12345)):
        await comm.send_input(update(update_id, "mine now", kind="edit", message_id=message_id))
        assert await replies(comm, update_id) == []
    assert len(room_events) == 3
    await disconnect(comm)


async def test_a_reply_to_what_the_room_does_not_have_or_no_longer_has_is_posted_plain(
    room_events
):
    await chats_join("lobby", PRIVATE["id"])
    gone = await post("lobby", "soon gone")
    await mapped(PRIVATE["id"], "lobby", gone, 900)
    await database_sync_to_async(services.messages_delete)(messages=[("lobby", gone)], by=STAFF)
    comm = await chat()
    for update_id, answered in ((1, 900), (2, 4242)):  # deleted; never mapped
        await comm.send_input(update(update_id, f"re {answered}", reply_to_message_id=answered))
        assert await replies(comm, update_id) == []
    posted = [e for e in room_events if e["type"] == events.ROOM_MESSAGE][1:]
    assert [(e["text"], e["reply_to"]) for e in posted] == [("re 900", None), ("re 4242", None)]
    await disconnect(comm)


async def test_a_refused_edit_is_told_in_a_private_chat_and_kept_quiet_in_a_group():
    group = {"id": "-200", "kind": "supergroup", "title": "Gardeners"}
    await chats_join("shut", PRIVATE["id"], group["id"])
    for update_id, info in enumerate((PRIVATE, group), start=1):
        comm = await chat(info)
        await comm.send_input(update(update_id, "hello", message_id=update_id))
        assert await comm.receive_output(timeout=5) == handled(update_id)
        await disconnect(comm)
    await database_sync_to_async(services.room_close)(room="shut")
    comm = await chat()
    await comm.send_input(update(3, "hello?", kind="edit", message_id=1))
    (told,) = await replies(comm, 3)
    assert told.startswith("Not edited:") and "closed" in told
    await disconnect(comm)
    comm = await chat(group)
    await comm.send_input(update(4, "hello?", kind="edit", message_id=2))
    assert await comm.receive_output(timeout=5) == handled(4)
    await disconnect(comm)


async def test_reactions_set_each_emoji_on_the_room_message_of_the_chats_room(room_events):
    await chats_join("likes", PRIVATE["id"])
    liked = await post("likes", "cake")
    await mapped(PRIVATE["id"], "likes", liked, 900)
    await mapped(PRIVATE["id"], "elsewhere", 1, 901)  # a copy of another room's message
    comm = await chat()
    await comm.send_input(update(1, "", kind="reaction", message_id=900, added=["👍", "🎉"]))
    assert await replies(comm, 1) == []
    await comm.send_input(update(2, "", kind="reaction", message_id=900, added=["❤️"],
                                 removed=["👍"]))
    assert await replies(comm, 2) == []
    await comm.send_input(update(3, "", kind="reaction", message_id=901, added=["👍"]))
    assert await replies(comm, 3) == []
    reactions = [(e["emoji"], e["added"], e["count"]) for e in room_events
                 if e["type"] == events.ROOM_ENTRY]
    assert reactions == [("👍", True, 1), ("🎉", True, 1), ("❤️", True, 1), ("👍", False, 0)]
    assert {e["sender"]["id"] for e in room_events[1:]} == {"telegram-7"}
    await disconnect(comm)


async def test_a_flood_of_reactions_is_refused_quietly_and_a_move_is_never(monkeypatch,
                                                                          room_events):
    now = [0.0]
    monkeypatch.setattr(consumers, "flood_limit",
                        lambda: TokenBucket(rate=1.0, burst=1, clock=lambda: now[0]))
    await chats_join("busy", PRIVATE["id"])
    liked = await post("busy", "cake")
    await mapped(PRIVATE["id"], "busy", liked, 900)
    comm = await chat()
    for update_id, emoji in ((1, "👍"), (2, "🎉")):
        await comm.send_input(update(update_id, "", kind="reaction", message_id=900,
                                     added=[emoji]))
        assert await replies(comm, update_id) == []  # the second one unanswered, not stored
    await comm.send_input(update(3, "", kind="migrate", migrate_to="-1005"))
    assert await replies(comm, 3) == []
    assert [e.get("emoji") for e in room_events[1:]] == ["👍"]
    await disconnect(comm)


async def test_a_group_that_became_a_supergroup_keeps_its_room_and_place_under_its_new_id():
    group = {"id": "-5", "kind": "group", "title": "Crew"}
    await chats_join("crew", group["id"])
    await post("crew", "one")
    await mapped("-5", "crew", 1, 40)  # sent, and its position stored
    await database_sync_to_async(services.relay_positions_save)(
        relay=PLATFORM, positions={("crew", "-5"): 1})
    # The group's own message, which the relay passed over but had not stored yet.
    await post("crew", "two", sender=TG, origin=selectors.bot_chat_origin(PLATFORM, "-5"))
    await mapped("-5", "crew", 2, 41, own=False)
    comm = await chat(group)
    await comm.send_input(update(1, "", kind="migrate", message_id=42, migrate_to="-1005"))
    assert await comm.receive_output(timeout=5) == handled(1)
    await comm.send_input(update(1, "", kind="migrate", message_id=42, migrate_to="-1005"))
    assert await comm.receive_output(timeout=5) == handled(1)  # a repeat: nothing
    await disconnect(comm)
    rows = await database_sync_to_async(
        lambda: list(BotChat.objects.values_list("chat_id", "room", "kind")))()
    assert rows == [("-1005", "crew", "supergroup")]
    assert await database_sync_to_async(relay_positions)("crew") == {"-1005": 2}
    # The old group's messages stay mapped where they are (the supergroup numbers afresh).
    assert await map_of("-5") == [(40, 1, True, 0), (41, 2, False, 0)]
    assert await map_of("-1005") == []


async def test_a_move_to_a_supergroup_that_already_joined_a_room_only_leaves_the_old_one():
    await chats_join("old", "-5")
    await chats_join("new", "-1005")
    await database_sync_to_async(chats.bot_chat_migrate)(platform=PLATFORM, chat_id="-5",
                                                         to="-1005")
    rows = await database_sync_to_async(
        lambda: dict(BotChat.objects.values_list("chat_id", "room")))()
    assert rows == {"-5": "", "-1005": "new"}
    assert await database_sync_to_async(relay_positions)("old") == {}


# --- the relay role: the map, replies, edits, deletes, reactions -------------------------------


async def calls_made(bot: Bot, count: int) -> list[tuple[str, Call]]:
    """The calls once ``count`` were made (and no more came), in the order made: each chat's
    in its order, the chats' interleaved (they are called concurrently)."""
    async with asyncio.timeout(5):
        while len(bot.calls) < count:  # noqa: ASYNC110 - the role calls from its own tasks
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(bot.calls) == count, bot.calls
    return list(bot.calls)


def to(chat_id: str, made: list[tuple[str, Call]]) -> list[Call]:
    return [call for chat, call in made if chat == chat_id]


async def test_each_piece_sent_is_mapped_and_a_reply_answers_each_chats_message():
    await chats_join("ask", "A", "B")
    relay, bot = await chats_relay()
    origin_a = selectors.bot_chat_origin(PLATFORM, "A")
    question = await post("ask", "lunch?", sender=TG, origin=origin_a)
    await mapped("A", "ask", question, 77, own=False)  # as chat A's post recorded it
    await calls_made(bot, 1)
    assert await map_of("B") == [(1000, question, True, 0)]
    await post("ask", "y" * 4096)  # two pieces each
    await calls_made(bot, 5)
    assert [row[3] for row in await map_of("A")] == [0, 0, 1]
    bot.calls.clear()
    await database_sync_to_async(services.room_message_post)(
        room="ask", text="yes", sender=WEB, origin="test", reply_to=question)
    replies_sent = {chat: call for chat, call in await calls_made(bot, 2)}
    assert replies_sent["A"] == SendText("<b>bob</b> (web): yes", reply_to=77)  # the original
    assert replies_sent["B"] == SendText("<b>bob</b> (web): yes", reply_to=1000)
    await relay.stop()


async def test_an_edit_edits_the_copies_and_not_the_chat_the_original_is_in():
    await chats_join("fix", "A", "B")
    relay, bot = await chats_relay()
    origin_a = selectors.bot_chat_origin(PLATFORM, "A")
    typo = await post("fix", "teh", sender=TG, origin=origin_a)
    await mapped("A", "fix", typo, 77, own=False)
    await calls_made(bot, 1)
    await database_sync_to_async(services.message_edit)(
        room="fix", id=typo, text="the", sender=TG, staff=False, origin=origin_a)
    await calls_made(bot, 2)
    await database_sync_to_async(services.message_edit)(
        room="fix", id=typo, text="the!", sender=STAFF, staff=True, origin="")
    made = await calls_made(bot, 3)
    # The author's name stays on it, whoever edited; A has its original, not a copy.
    assert to("B", made)[1:] == [EditText(1000, "<b>alice</b> (telegram): the"),
                                 EditText(1000, "<b>alice</b> (telegram): the!")]
    assert to("A", made) == []
    await relay.stop()


async def test_an_edit_of_a_long_copy_edits_its_pieces_and_deletes_those_not_needed():
    await chats_join("long", "A")
    relay, bot = await chats_relay()
    seq = await post("long", "z" * 4096)
    await calls_made(bot, 2)
    await database_sync_to_async(services.message_edit)(
        room="long", id=seq, text="short now", sender=WEB, staff=False, origin="test")
    assert [call for _, call in await calls_made(bot, 4)][2:] == [
        EditText(1000, "<b>bob</b> (web): short now"), Delete(1001)]
    await relay.stop()


async def test_a_delete_deletes_every_copy_and_the_original_and_forgets_them():
    await chats_join("oops", "A", "B")
    relay, bot = await chats_relay()
    origin_a = selectors.bot_chat_origin(PLATFORM, "A")
    seq = await post("oops", "regret", sender=TG, origin=origin_a)
    await mapped("A", "oops", seq, 77, own=False)
    await calls_made(bot, 1)
    await database_sync_to_async(services.messages_delete)(messages=[("oops", seq)], by=STAFF)
    made = await calls_made(bot, 3)
    assert (to("A", made), to("B", made)[1:]) == ([Delete(77)], [Delete(1000)])
    assert await map_of("A") == [] and await map_of("B") == []
    await relay.stop()


async def test_the_bot_shows_the_favourite_reaction_and_not_back_to_the_chat_that_reacted():
    await chats_join("likes", "A", "B")
    relay, bot = await chats_relay()
    seq = await post("likes", "cake")
    await calls_made(bot, 2)
    origin_a = selectors.bot_chat_origin(PLATFORM, "A")

    async def react(emoji: str, sender=WEB, origin="test", added=None) -> None:
        await database_sync_to_async(services.message_react)(
            room="likes", id=seq, emoji=emoji, sender=sender, origin=origin, added=added)

    copy_a, copy_b = (rows[0][0] for rows in [await map_of("A"), await map_of("B")])
    await react("👍", sender=TG, origin=origin_a)  # from chat A: shown to B only
    await react("😂")  # Telegram has no such reaction: nothing to show
    made = await calls_made(bot, 3)
    assert made[2:] == [("B", React(copy_b, "👍"))]
    await react("❤️")  # a tie with 👍 now, which the heart wins (the lower code point)
    await react("❤️", sender=events.sender(protocol="web", id="anon:c", name="cy"))
    await react("👍", sender=TG, origin=origin_a, added=False)  # not told back to A
    made = await calls_made(bot, 8)
    assert to("A", made[3:]) == [React(copy_a, "❤")] * 2
    assert to("B", made[3:]) == [React(copy_b, "❤")] * 3
    await relay.stop()


async def test_a_chat_that_became_a_supergroup_goes_on_there_after_the_entry(monkeypatch):
    await chats_join("crew", "-5")
    relay, bot = await chats_relay()
    real_send = bot.send

    async def moved(chat_id: str, call: Call) -> Answer:
        if chat_id != "-5":
            return await real_send(chat_id, call)
        await database_sync_to_async(chats.bot_chat_migrate)(platform=PLATFORM,
                                                             chat_id="-5", to="-1005")
        answer = await real_send("-1005", call)
        return Answer(answer.sent, answer.message_id, moved_to="-1005")

    monkeypatch.setattr(bot, "send", moved)
    await post("crew", "one")
    await calls_made(bot, 1)
    await post("crew", "two")
    made = await calls_made(bot, 2)
    assert [(chat, call.text) for chat, call in made] == [  # type: ignore[union-attr]
        ("-1005", "<b>bob</b> (web): one"), ("-1005", "<b>bob</b> (web): two")]
    assert await map_of("-1005") == [(1000, 1, True, 0), (1001, 2, True, 0)]
    await relay.stop()
    assert await database_sync_to_async(relay_positions)("crew") == {"-1005": 2}
