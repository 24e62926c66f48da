"""The Telegram server's sending in-process, with a stand-in for python-telegram-bot's Bot:
what the relay awaits (``send``) and what becomes of a send nobody waits for any more."""

from __future__ import annotations

import asyncio

import pytest
from telegram.error import Forbidden

from protocols.telegram.outbox import SendLimits
from protocols.telegram.server import Sent, ServerStopped, TelegramServer

FAST = SendLimits(chat_per_second=1000.0, group_per_minute=60_000.0, overall_per_second=1000.0)


class Bot:
    """Records what is sent; a chat in ``hold`` waits for it; one in ``blocked`` refuses."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.blocked: set[int] = set()

    async def send_message(self, *, chat_id: int, text: str, **options) -> None:
        await self.hold.wait()
        if chat_id in self.blocked:
            raise Forbidden("bot was blocked by the user")
        self.sent.append((chat_id, text))


def server(bot: Bot) -> TelegramServer:
    tg = TelegramServer(None, bot=bot, limits=FAST)  # type: ignore[arg-type]
    tg.ready.set()  # as once getMe has answered
    return tg


async def test_a_send_is_answered_once_telegram_has_it_and_in_order_with_replies():
    bot = Bot()
    tg = server(bot)
    await tg._send({"type": "chat.send_message", "chat_id": "7", "text": "a reply"})
    assert await tg.send("7", "a room message") is Sent.SENT
    assert bot.sent == [(7, "a reply"), (7, "a room message")]


async def test_a_send_whose_caller_gave_up_is_not_sent():
    bot = Bot()
    tg = server(bot)
    bot.hold.clear()
    first = asyncio.create_task(tg.send("7", "one"))
    second = asyncio.create_task(tg.send("7", "two"))
    await asyncio.sleep(0.05)  # "one" is under way, "two" waits behind it
    second.cancel()
    bot.hold.set()
    assert await first is Sent.SENT
    with pytest.raises(asyncio.CancelledError):
        await second
    await asyncio.sleep(0.05)
    assert bot.sent == [(7, "one")]


async def test_a_chat_that_blocked_the_bot_answers_gone_for_everything_it_had_waiting():
    bot = Bot()
    tg = server(bot)
    bot.blocked.add(7)
    bot.hold.clear()
    sends = [asyncio.create_task(tg.send("7", f"m{i}")) for i in range(3)]
    await asyncio.sleep(0.05)
    bot.hold.set()
    assert [await s for s in sends] == [Sent.GONE, Sent.GONE, Sent.GONE]
    assert "7" not in tg.outbox


async def test_a_send_after_the_server_stopped_is_refused():
    tg = server(Bot())
    tg._stopping = True
    with pytest.raises(ServerStopped):
        await tg.send("7", "too late")
