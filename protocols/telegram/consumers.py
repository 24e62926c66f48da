"""Telegram's consumer: a chat talking to the bot.

The protocol server (protocols/telegram/server.py) opens a scope per chat (``role: chat``);
the consumer translates between its ``chat.*`` events (protocols/telegram/events.py) and the
conversation (bots/): it is fed ``chat.received_message`` (a message, an edit, a reaction, a
group's move to a supergroup), answers with ``chat.send_message`` and reports each update as
handled (``chat.handled``) once its effect is stored, so the server confirms it to Telegram
only then. (Rooms reach the chats through the relay: protocols/telegram/relay.py.)

Every update but a move spends the chat's flood limit: a flood of edits or reactions is
refused like one of messages (only a message is answered "Slow down").

A message with a file: once the flood limit let it through and the conversation says the
chat would post it (``conversation.file_room``: it is in a room), its bytes are fetched
through the scope's ``telegram.download`` (the server's Bot API client: download.py), at
most the Bot API's 20 MB, and handed to the conversation with it. A larger file is not
fetched (the room gets a notice), nor one past the gateway's own size limit (refused, from
its declared size). An outage fetching it fails the update: it comes again, and is given up
after a few tries (ingress.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.conf import settings
from django.db import DatabaseError
from telegram.error import NetworkError

from bots import conversation
from bots.markup import reply
from consumers.base import ScopeConsumer
from gateway.logging import scope_log
from gateway.ratelimit import flood_limit
from protocols.telegram import render
from protocols.telegram.download import DOWNLOAD_MAX_BYTES, FileTooLarge, FileUnavailable
from protocols.telegram.events import (
    DOWNLOAD_EXTENSION,
    ChatConnect,
    ChatDisconnect,
    ChatFile,
    ChatReceivedMessage,
    ChatSend,
)

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
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
            kind=message["kind"], message_id=message["message_id"],
            reply_to_message_id=message["reply_to_message_id"], added=tuple(message["added"]),
            removed=tuple(message["removed"]), migrate_to=message["migrate_to"] or "",
        )
        if incoming.kind != conversation.MIGRATE and not self.bucket.allow():
            logger.warning("refused a chat %s: rate limited", incoming.kind, extra=self.log)
            replies = ([reply("Slow down: too many messages. This one was not sent.")]
                       if incoming.kind == conversation.MESSAGE else [])
        else:
            try:
                if (file := message.get("file")) is not None:
                    incoming = await self._fetched(incoming, file)
                replies = await database_sync_to_async(conversation.handle)(
                    incoming, bot_username=self.scope["bot_username"]
                )
            except NetworkError as exc:  # fetching the file: it comes again
                logger.warning("could not fetch a chat's file (%s); it will come again",
                               type(exc).__name__, extra=self.log)
                await self.base_send({"type": "chat.failed", "update_id": message["update_id"]})
                return
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

    async def _fetched(self, incoming: conversation.Incoming,
                       file: ChatFile) -> conversation.Incoming:
        """The message with its file, fetched if the chat would post it (NetworkError: an
        outage)."""
        offered = conversation.IncomingFile(name=file["name"], size=file["size"],
                                            content_type=file["mime_type"])
        size = file["size"] or 0
        if size > DOWNLOAD_MAX_BYTES:
            offered = dataclasses.replace(offered, too_large=True)
        elif size <= settings.GATEWAY["FILE_MAX_BYTES"] and await database_sync_to_async(
                conversation.file_room)(incoming):
            download = self.scope["extensions"][DOWNLOAD_EXTENSION]
            try:
                data = await download(file["file_id"], DOWNLOAD_MAX_BYTES)
            except FileTooLarge:
                offered = dataclasses.replace(offered, too_large=True)
            except FileUnavailable as exc:
                logger.warning("Telegram did not hand out a chat's file: %s", exc,
                               extra=self.log)
            else:
                offered = dataclasses.replace(offered, data=data, size=len(data))
        return dataclasses.replace(incoming, file=offered)

    async def chat_disconnect(self, message: ChatDisconnect) -> None:
        raise StopConsumer()

    async def finish(self) -> None:
        logger.info("chat scope closed", extra=self.log)
