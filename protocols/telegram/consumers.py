"""Telegram consumers: a chat talking to the bot, and the rooms relayed to the chats.

The protocol server (protocols/telegram/server.py) opens the scopes; these translate between
its ``chat.*`` and ``telegram.*`` events (protocols/telegram/events.py) and the
conversation (bots/) and rooms.

- ``role: chat``, one per chat, is fed ``chat.received_message`` and answers with
  ``chat.send_message``; it reports each update as handled (``chat.handled``) once its
  effect is stored, so the server confirms it to Telegram only then.
- ``role: room``, one per room that chats have joined (on the process that relays), sends
  each room message to every chat in the room but the one it came from, and records how
  far each chat has been sent (``chat.delivered`` from the server once sent, answered with
  ``chat.recorded``).
- ``role: rooms``, one on the relaying process, answers the server's ``telegram.scan`` with
  the rooms to relay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.db import DatabaseError

from bots import conversation, formatting
from bots.markup import reply
from consumers.base import RoomConsumer, ScopeConsumer
from gateway import chats, events, metrics, selectors
from gateway.fanout import Delivery
from gateway.logging import scope_log
from gateway.ratelimit import flood_limit
from protocols.telegram import render
from protocols.telegram.events import (
    ChatConnect,
    ChatDelivered,
    ChatDisconnect,
    ChatReceivedMessage,
    ChatSend,
    ChatUnreachable,
    RoomSend,
    RoomsSend,
    TelegramPrune,
    TelegramScan,
)

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
UPDATES_KEPT = 48 * 3600.0  # Telegram redelivers an update for at most 24 hours
# Room messages a relay holds before its worker sends them on; past it the relay ends and
# starts again from the chats' recorded positions (its worker is stuck: the database).
RELAY_PENDING_LIMIT = 10_000
# Told on /join in a group whose plain text the bot does not receive (privacy mode, no admin).
PRIVACY_ADVICE = (
    "To bridge this group, turn the bot's privacy mode off: in @BotFather, send "
    "/setprivacy, choose this bot, then Disable; then remove the bot from this group and add "
    "it again. Or make the bot an admin of this group."
)


class TelegramChatConsumer(ScopeConsumer):
    """One chat: what its people write is answered by the bot or posted to its room."""

    base_send: Callable[[ChatSend], Awaitable[None]]  # the scope's send, typed

    def setup(self) -> None:
        chat = self.scope["chat"]
        self.chat_id = chat["id"]
        self.log = scope_log(PLATFORM, None, f"telegram-chat-{self.chat_id}")
        self.bucket = flood_limit()

    async def chat_connect(self, message: ChatConnect) -> None:
        logger.info("chat scope opened", extra=self.log)

    async def chat_received_message(self, message: ChatReceivedMessage) -> None:
        chat, user = self.scope["chat"], message["user"]
        incoming = conversation.Incoming(
            platform=PLATFORM, chat_id=self.chat_id, chat_kind=chat["kind"],
            chat_title=chat["title"], user_id=user["id"], user_name=user["name"],
            text=message["text"], update_id=message["update_id"],
            text_withheld=PRIVACY_ADVICE if message.get("reads_all") is False else "",
        )
        if not self.bucket.allow():
            logger.warning("refused a chat message: rate limited", extra=self.log)
            replies = [reply("Slow down: too many messages. This one was not sent.")]
        else:
            try:
                replies = await database_sync_to_async(conversation.handle)(
                    incoming, bot_username=self.scope["bot_username"]
                )
            except DatabaseError:
                # Not stored and not claimed: the server fetches it again (or Telegram
                # delivers it again), so it is neither lost nor posted twice.
                logger.exception("could not handle a chat message; it will come again",
                                 extra=self.log)
                await self.base_send({"type": "chat.failed", "update_id": message["update_id"]})
                return
        for answer in replies:
            for text in render.messages(answer):
                await self.base_send({"type": "chat.send_message", "chat_id": self.chat_id,
                                      "text": text})
        await self.base_send({"type": "chat.handled", "update_id": message["update_id"]})

    async def chat_disconnect(self, message: ChatDisconnect) -> None:
        raise StopConsumer()

    async def finish(self) -> None:
        logger.info("chat scope closed", extra=self.log)


class TelegramRoomConsumer(RoomConsumer):
    """A room's relay to the chats that joined it.

    The hub hands it each room message in order; a worker reads the room's chats (once per
    batch of messages, off the fan-out path) and queues one ``chat.send_message`` per chat
    and piece of text. A chat is sent only messages newer than what it has been sent, so a
    relay taking over or starting again resumes each chat where it got.
    """

    protocol = PLATFORM
    base_send: Callable[[RoomSend], Awaitable[None]]  # the scope's send, typed

    def setup(self) -> None:
        super().setup()
        self.behind = False  # past RELAY_PENDING_LIMIT: ending, takes nothing more

    async def chat_connect(self, message: ChatConnect) -> None:
        room = self.scope["room"]
        self.scope_id = f"telegram-out-{room}"
        self.pending: list[events.RoomMessage] = []
        self.wakeup = asyncio.Event()
        self.worker = asyncio.create_task(self._work(), name=self.scope_id)
        chats = await database_sync_to_async(selectors.room_bot_chats)(
            platform=PLATFORM, room=room
        )
        await self.room_join(room, member_id=None)
        await self.room_catch_up(min(chats.values()) if chats else None)

    async def send_room_event(self, event: events.RoomMessage, delivery: Delivery) -> None:
        if len(self.pending) >= RELAY_PENDING_LIMIT:
            # The worker is stuck (the database?): stop taking messages and have the server
            # end this relay; it starts again from each chat's recorded position.
            self.live = False
            if not self.behind:
                self.behind = True
                metrics.dropped(PLATFORM, "relay_behind")
                logger.warning("room relay fell behind; it restarts from the chats' positions",
                               extra=self.log_extra(pending=len(self.pending),
                                                    dropped_from=event["id"]))
                await self.base_send({"type": "chat.relay_behind", "room": event["room"]})
            return
        self.pending.append(event)
        self.wakeup.set()

    def is_open(self) -> bool:
        return not self.closed and not self.behind  # a catch-up stops too

    async def _work(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            batch, self.pending = self.pending, []
            try:
                chats = await database_sync_to_async(selectors.room_bot_chats)(
                    platform=PLATFORM, room=self.scope["room"]
                )
            except Exception:
                logger.exception("could not read the room's chats; retrying",
                                 extra=self.log_extra())
                self.pending[:0] = batch
                await asyncio.sleep(1.0)
                self.wakeup.set()
                continue
            for event in batch:
                try:
                    await self._relay(event, chats)
                except Exception:  # never stop relaying the room for one message
                    logger.exception("could not relay a message to the chats",
                                     extra=self.log_extra(id=event["id"]))

    async def _relay(self, event: events.RoomMessage, chats: dict[str, int]) -> None:
        pieces: list[str] | None = None
        for chat_id, delivered in chats.items():
            if event["id"] <= delivered or event["origin"] == selectors.bot_chat_origin(
                PLATFORM, chat_id
            ):
                continue
            pieces = pieces or render.messages(formatting.room_message(event))
            for index, text in enumerate(pieces):
                await self.base_send({
                    "type": "chat.send_message", "chat_id": chat_id, "text": text,
                    "room": event["room"], "id": event["id"],
                    # Once the last piece is sent, the chat has been sent this message.
                    "last": index == len(pieces) - 1,
                })

    async def chat_delivered(self, message: ChatDelivered) -> None:
        """The server sent these; record it, then tell it (it waits before the next)."""
        try:
            await database_sync_to_async(chats.bot_chats_delivered_save)(
                platform=PLATFORM, room=self.scope["room"], positions=message["positions"]
            )
        except DatabaseError:
            # Only the record of progress: at worst a later relay sends these again.
            logger.exception("could not record how far chats were sent", extra=self.log_extra())
        for chat_id in message["positions"]:
            await self.base_send({"type": "chat.recorded", "chat_id": chat_id})

    async def send_room_entry(self, entry: events.RoomEntry, delivery: Delivery) -> None:
        """A message deleted by staff is not sent to chats that have not had it yet."""
        if entry["kind"] == events.ENTRY_DELETE and entry["id"] is not None:
            self.pending = [e for e in self.pending if e["id"] != entry["id"]]
            await self.base_send({"type": "chat.drop", "room": entry["room"], "id": entry["id"]})

    async def chat_unreachable(self, message: ChatUnreachable) -> None:
        """The chat blocked the bot or removed it: it leaves the room."""
        try:
            await database_sync_to_async(chats.bot_chat_leave_unreachable)(
                platform=PLATFORM, chat_id=message["chat_id"], room=self.scope["room"]
            )
        except DatabaseError:
            logger.exception("could not take an unreachable chat out of the room",
                             extra=self.log_extra(chat=message["chat_id"]))
            return
        logger.warning("chat unreachable: it left the room",
                       extra=self.log_extra(chat=message["chat_id"]))

    async def close(self, code: int) -> None:
        self.closed, self.live = True, False

    async def chat_disconnect(self, message: ChatDisconnect) -> None:
        raise StopConsumer()

    async def finish(self) -> None:
        if hasattr(self, "worker"):
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        await super().finish()


class TelegramRoomsConsumer(ScopeConsumer):
    """Tells the relaying server which rooms have chats, and forgets old updates."""

    base_send: Callable[[RoomsSend], Awaitable[None]]  # the scope's send, typed

    async def telegram_scan(self, message: TelegramScan) -> None:
        rooms = await database_sync_to_async(selectors.bot_chat_rooms)(platform=PLATFORM)
        await self.base_send({"type": "telegram.relay_rooms", "rooms": rooms})

    async def telegram_prune(self, message: TelegramPrune) -> None:
        await database_sync_to_async(chats.bot_updates_prune)(
            platform=PLATFORM, older_than=UPDATES_KEPT
        )

    async def chat_disconnect(self, message: ChatDisconnect) -> None:
        raise StopConsumer()
