"""Telegram's relay role: each room's messages sent to the chats that joined it.

The relay (gateway/relay.py) holds the ``telegram`` lease, follows the rooms that have
chats, keeps each chat's position in its room and hands this role one entry at a time per
chat; this role renders a message the way the bot shows room messages (bots/formatting.py,
as Telegram HTML by render.py, split within Telegram's length limit, rendered once for
every chat) and sends it through the Telegram server's paced outbox, awaiting the answer.
The position is saved before the chat's next message (``save_interval = 0``), so a
takeover after a crash sends again at most the one message in flight (Telegram has no
idempotent send).

- A chat is never sent what it wrote (its messages' origin is the chat), nor other log
  entries; a message staff deleted before the chat had it is not sent.
- A chat more than ``TELEGRAM_CHAT_BACKLOG`` entries behind skips the oldest; it is told
  how many messages it missed (``/history`` shows them).
- A chat that blocked the bot or is gone leaves its room (``chats.bot_chat_leave_unreachable``)
  and is sent nothing more; a message Telegram refuses for good is passed over.
"""

from __future__ import annotations

import logging

from channels.db import database_sync_to_async
from django.db.models import QuerySet

from bots import formatting
from gateway import chats, events, selectors
from gateway.relay import Batch, RelayRole, TargetGone
from protocols.telegram import render
from protocols.telegram.server import Sent, TelegramServer

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
WIRE_FORMAT = "telegram-html"


def _pieces(event: events.RoomMessage) -> list[str]:
    return render.messages(formatting.room_message(event))


class TelegramChats(RelayRole):
    name = PLATFORM  # chats are targets of the relay role named after their platform
    protocol = PLATFORM
    batch_size = 1
    save_interval = 0.0  # each message recorded before the chat's next

    def __init__(self, server: TelegramServer, *, backlog: int) -> None:
        self.server = server
        self.backlog = backlog

    def targets(self) -> QuerySet:
        return selectors.relay_targets_bot_chats(platform=PLATFORM)

    async def deliver(self, batch: Batch) -> None:
        room, target = batch.room, batch.target
        origin = selectors.bot_chat_origin(PLATFORM, target)
        for delivery in batch.entries:
            event = delivery.event
            if event["type"] != events.ROOM_MESSAGE or event["origin"] == origin:
                continue
            for piece in delivery.frame(WIRE_FORMAT, _pieces):
                if not await self._send(room, target, piece):
                    break  # refused for good: the rest of this message would not help

    async def skipped(self, room: str, target: str, *, after: int, upto: int) -> None:
        count = await database_sync_to_async(selectors.room_messages_count)(
            room=room, after=after, upto=upto,
            origin_not=selectors.bot_chat_origin(PLATFORM, target),
        )
        if count:
            for piece in render.messages(formatting.messages_skipped(count)):
                await self._send(room, target, piece)

    async def _send(self, room: str, chat_id: str, text: str) -> bool:
        """Send one piece; False if Telegram refused it for good. ``TargetGone`` once the
        chat is unreachable (it has then left the room)."""
        sent = await self.server.send(chat_id, text)
        if sent is Sent.GONE:
            await database_sync_to_async(chats.bot_chat_leave_unreachable)(
                platform=PLATFORM, chat_id=chat_id, room=room
            )
            logger.warning("chat unreachable: it left the room",
                           extra={"protocol": PLATFORM, "room": room, "chat": chat_id})
            raise TargetGone(chat_id)
        return sent is Sent.SENT
