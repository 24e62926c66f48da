"""The Telegram server's calls in-process, with a stand-in for python-telegram-bot's Bot:
what the relay awaits (``send``), what becomes of a send nobody waits for any more, and how
Telegram's refusals of changes are taken."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from telegram.error import BadRequest, ChatMigrated, Forbidden

from protocols.telegram.calls import Delete, EditText, React, SendText
from protocols.telegram.outbox import SendLimits
from protocols.telegram.server import Answer, Sent, ServerStopped, TelegramServer

FAST = SendLimits(chat_per_second=1000.0, group_per_minute=60_000.0, overall_per_second=1000.0)


class Bot:
    """Records what is sent; a chat in ``hold`` waits for it; one in ``blocked`` refuses;
    ``refuse`` answers the changes (edits, deletes, reactions) with that error."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []
        self.answered: list[int | None] = []  # the message each sent one replied to
        self.changed: list[tuple[str, int, int]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.blocked: set[int] = set()
        self.refuse: Exception | None = None
        self.migrated: dict[int, int] = {}

    async def send_message(self, *, chat_id: int, text: str, **options) -> SimpleNamespace:
        await self.hold.wait()
        if chat_id in self.migrated:
            raise ChatMigrated(self.migrated[chat_id])
        if chat_id in self.blocked:
            raise Forbidden("bot was blocked by the user")
        self.sent.append((chat_id, text))
        reply = options.get("reply_parameters")
        self.answered.append(reply.message_id if reply is not None else None)
        return SimpleNamespace(message_id=len(self.sent))

    async def _change(self, kind: str, chat_id: int, message_id: int) -> bool:
        if chat_id in self.migrated:
            raise ChatMigrated(self.migrated[chat_id])
        if self.refuse is not None:
            raise self.refuse
        self.changed.append((kind, chat_id, message_id))
        return True

    async def edit_message_text(self, text: str, *, chat_id: int, message_id: int, **options):
        return await self._change("edit", chat_id, message_id)

    async def delete_message(self, chat_id: int, message_id: int) -> bool:
        return await self._change("delete", chat_id, message_id)

    async def set_message_reaction(self, chat_id: int, message_id: int, reaction) -> bool:
        return await self._change("react", chat_id, message_id)


def server(bot: Bot) -> TelegramServer:
    tg = TelegramServer(None, bot=bot, limits=FAST)  # type: ignore[arg-type]
    tg.ready.set()  # as once getMe has answered
    return tg


async def test_a_send_is_answered_once_telegram_has_it_and_in_order_with_replies():
    bot = Bot()
    tg = server(bot)
    await tg._send({"type": "chat.send_message", "chat_id": "7", "text": "a reply"})
    assert await tg.send("7", SendText("a room message")) == Answer(Sent.SENT, 2)
    assert bot.sent == [(7, "a reply"), (7, "a room message")]


async def test_a_send_whose_caller_gave_up_is_not_sent():
    bot = Bot()
    tg = server(bot)
    bot.hold.clear()
    first = asyncio.create_task(tg.send("7", SendText("one")))
    second = asyncio.create_task(tg.send("7", SendText("two")))
    await asyncio.sleep(0.05)  # "one" is under way, "two" waits behind it
    second.cancel()
    bot.hold.set()
    assert (await first).sent is Sent.SENT
    with pytest.raises(asyncio.CancelledError):
        await second
    await asyncio.sleep(0.05)
    assert bot.sent == [(7, "one")]


async def test_a_chat_that_blocked_the_bot_answers_gone_for_everything_it_had_waiting():
    bot = Bot()
    tg = server(bot)
    bot.blocked.add(7)
    bot.hold.clear()
    sends = [asyncio.create_task(tg.send("7", SendText(f"m{i}"))) for i in range(3)]
    await asyncio.sleep(0.05)
    bot.hold.set()
    assert [(await s).sent for s in sends] == [Sent.GONE, Sent.GONE, Sent.GONE]
    assert "7" not in tg.outbox


async def test_a_send_after_the_server_stopped_is_refused():
    tg = server(Bot())
    tg._stopping = True
    with pytest.raises(ServerStopped):
        await tg.send("7", SendText("too late"))


async def test_changes_are_made_in_order_with_messages_and_counted():
    bot = Bot()
    tg = server(bot)
    answers = [await tg.send("7", call) for call in
               (SendText("one"), EditText(1, "uno"), React(1, "👍"), Delete(1))]
    assert answers == [Answer(Sent.SENT, 1), Answer(Sent.SENT), Answer(Sent.SENT),
                       Answer(Sent.SENT)]
    assert bot.changed == [("edit", 7, 1), ("react", 7, 1), ("delete", 7, 1)]
    assert (tg.status()["sent"], tg.status()["changed"]) == (1, 3)


async def test_an_unchanged_edit_is_done_and_refused_changes_never_make_a_chat_gone():
    bot = Bot()
    tg = server(bot)
    bot.refuse = BadRequest("Message is not modified: specified new message content and "
                            "reply markup are exactly the same")
    assert await tg.send("7", EditText(1, "same")) == Answer(Sent.SENT)
    for refusal in (BadRequest("Message can't be edited"), BadRequest("REACTION_INVALID"),
                    Forbidden("CHAT_WRITE_FORBIDDEN"), BadRequest("Chat not found")):
        bot.refuse = refusal
        assert (await tg.send("7", React(1, "👍"))).sent is Sent.REFUSED
    assert tg.status()["refused"] == 4


@pytest.mark.django_db(transaction=True)  # the move is stored from a database thread
@pytest.mark.usefixtures("runtime_stopped")  # which closes its connection afterwards
async def test_a_group_that_became_a_supergroup_is_sent_there_but_not_changed(monkeypatch):
    from gateway import chats

    moves = []
    monkeypatch.setattr(chats, "bot_chat_migrate", lambda **kw: moves.append(kw))
    bot = Bot()
    tg = server(bot)
    bot.migrated[-5] = -1005
    assert await tg.send("-5", SendText("hi", reply_to=3)) == Answer(Sent.SENT, 1,
                                                                     moved_to="-1005")
    # Not as a reply: the message it answered is the old group's.
    assert (bot.sent, bot.answered) == ([(-1005, "hi")], [None])
    # Its old messages stayed in the old group: not edited in the new one.
    assert await tg.send("-5", EditText(3, "x")) == Answer(Sent.REFUSED, moved_to="-1005")
    assert bot.changed == []
    assert moves == [{"platform": "telegram", "chat_id": "-5", "to": "-1005"}] * 2
