"""Telegram's relay role: each room's log carried to the chats that joined it.

The relay (gateway/relay.py) holds the ``telegram`` lease, follows the rooms that have
chats, keeps each chat's position in its room and hands this role one entry at a time per
chat; this role makes the Bot API calls the entry needs through the Telegram server's paced
outbox (protocols/telegram/calls.py), in room order, awaiting each answer. The position is
saved before the chat's next entry (``save_interval = 0``), so a takeover after a crash
makes again at most the calls of the one entry in flight (Telegram has no idempotent send).

- A message is rendered the way the bot shows room messages (bots/formatting.py, as
  Telegram HTML by render.py, split within Telegram's length limit, rendered once for every
  chat) and sent; a reply is sent as a reply to the chat's copy of the message it answers
  (or to the original, in the chat it came from), as a plain message if the chat has
  neither. Telegram's id of each piece sent is recorded in the map of messages
  (gateway/chats.py), in the database: edits, deletes, reactions and replies find the copies
  after a restart, and from any replica.
- A message with files goes as photos, albums, documents, or links for files too large to
  upload, with the rendered message as the first one's caption (media.py says which and
  why). Their bytes are read from the gateway's storage (off the loop and the database
  thread); once Telegram has a file, other chats are sent it by Telegram's id of it, not
  uploaded again. A photo Telegram refuses goes again as a document.
- An edit edits the chat's copy (``editMessageText``, each piece with the message's new
  rendering, or ``editMessageCaption`` for the caption of a message with files: media.py;
  pieces the new text no longer needs are deleted, text beyond the pieces the copy has is
  cut). "Not modified" counts as done; a copy older than 48 hours, which
  Telegram no longer lets the bot edit, is left as it is (logged).
- A delete deletes the chat's copy, every piece; in the chat the message came from, its
  original too (where the bot may: private chats, groups where it is an admin). A refusal
  (not found, can't be deleted) is logged and passed over.
- A reaction sets the bot's one reaction on the chat's copy (or the original): the rule and
  Telegram's limits are in reactions.py.
- A chat is never sent what came from it: its own messages, and its own edits and reactions
  (it has them already); room entries that are not about a message (close, reopen) are
  passed over. A message staff deleted before the chat had it is not sent.
- A chat more than ``TELEGRAM_CHAT_BACKLOG`` entries behind skips the oldest; it is told
  how many messages it missed (``/history`` shows them).
- A chat that blocked the bot or is gone leaves its room (``chats.bot_chat_leave_unreachable``)
  and is sent nothing more; a call Telegram refuses for good is passed over.
- A group that became a supergroup (Telegram says so in answer to a call) goes on under its
  new id from the entry it was being sent (the server moves it; this role places its new id
  after that entry, and drops the old one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import QuerySet

from bots import formatting
from bots.markup import Line, Reply
from gateway import chats, events, files, selectors, services
from gateway.fanout import Delivery
from gateway.models import BotMessage
from gateway.policy import DEFAULT as DEFAULT_POLICY
from gateway.policy import Policy
from gateway.relay import Batch, RelayRole, TargetGone
from protocols.telegram import media, reactions, render
from protocols.telegram.calls import (
    DOCUMENT,
    PHOTO,
    Call,
    Delete,
    EditText,
    MediaFile,
    React,
    SendMedia,
    SendText,
)
from protocols.telegram.server import Answer, Sent, TelegramServer

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
WIRE_FORMAT = "telegram-html"
STATES_KEPT = 1000  # messages' current states read for edits and reactions, shared by chats
FILE_IDS_KEPT = 1000  # Telegram's ids of files this bot sent, to send them again by id


def _shown(event: events.RoomMessage, policy: Policy = DEFAULT_POLICY) -> Reply:
    """A room message as the bot shows it: ``alice (web): hi``, or with the name the room's
    name format for Telegram gives a sender of another protocol."""
    sender = event["sender"]
    template = policy.name_format.get(PLATFORM)
    shown = None if template is None or sender["protocol"] == PLATFORM else (
        policy.name_shown(sender, target=PLATFORM, room=event["room"]))
    return formatting.room_message(event, shown=shown)


def _pieces(event: events.RoomMessage, policy: Policy = DEFAULT_POLICY) -> list[str]:
    """A room message as Telegram messages."""
    return render.messages(_shown(event, policy))


def _with_files(event: events.RoomMessage, policy: Policy = DEFAULT_POLICY) -> media.Rendered:
    """A room message with files as Telegram messages (media.py)."""
    return media.rendered(event["attachments"], _shown(event, policy), _link)


def _link(attachment: events.Attachment) -> Line:
    """A file too large to upload: the gateway's signed link, if it has a public address."""
    public = bool(settings.GATEWAY["PUBLIC_URL"])
    url = files.file_url(attachment) if public else None
    return formatting.file_link(attachment["name"], attachment["size"], url)


def _read(stored: str) -> bytes:
    with files.storage().open(stored, "rb") as handle:
        return handle.read()


@dataclass
class _Chat:
    """The chat an entry is carried to; its id changes if it becomes a supergroup."""

    room: str
    id: str
    moved: bool = False
    policy: Policy = DEFAULT_POLICY  # the room's (its name format for Telegram)

    def pieces(self, delivery: Delivery) -> list[str]:
        """The message's rendering, made once for every chat of the room."""
        template = self.policy.name_format.get(PLATFORM)
        if template is None:
            return delivery.frame(WIRE_FORMAT, _pieces)
        policy = self.policy
        return delivery.frame(f"{WIRE_FORMAT}:{template}", lambda e: _pieces(e, policy))

    def with_files(self, delivery: Delivery) -> media.Rendered:
        """A message with files, rendered once for every chat of the room."""
        template = self.policy.name_format.get(PLATFORM)
        policy = self.policy
        return delivery.frame(f"{WIRE_FORMAT}:files:{template or ''}",
                              lambda e: _with_files(e, policy))

    @property
    def log(self) -> dict[str, str]:
        return {"protocol": PLATFORM, "room": self.room, "chat": self.id}


class TelegramChats(RelayRole):
    name = PLATFORM  # chats are targets of the relay role named after their platform
    protocol = PLATFORM
    batch_size = 1
    save_interval = 0.0  # each entry recorded before the chat's next

    def __init__(self, server: TelegramServer, *, backlog: int) -> None:
        self.server = server
        self.backlog = backlog
        # (room, cursor of an edit or reaction) -> its message as it is now (None: deleted)
        self._states: dict[tuple[str, int], events.RoomMessage | None] = {}
        # (attachment, PHOTO or DOCUMENT) -> Telegram's id of the file this bot sent so
        self._file_ids: dict[tuple[str, str], str] = {}

    def targets(self) -> QuerySet:
        return selectors.relay_targets_bot_chats(platform=PLATFORM)

    async def deliver(self, batch: Batch) -> None:
        chat = _Chat(batch.room, batch.target, policy=batch.policy)
        origin = selectors.bot_chat_origin(PLATFORM, batch.target)
        for delivery in batch.entries:
            if delivery.event["origin"] == origin:
                continue
            if delivery.event["type"] == events.ROOM_MESSAGE:
                await self._message(chat, delivery)
            else:
                await self._change(chat, cast(events.RoomEntry, delivery.event),
                                   delivery.cursor)
            if chat.moved:
                await self._moved(chat, batch.target, delivery.cursor)

    async def skipped(self, room: str, target: str, *, after: int, upto: int) -> None:
        count = await database_sync_to_async(selectors.room_messages_count)(
            room=room, after=after, upto=upto,
            origin_not=selectors.bot_chat_origin(PLATFORM, target),
        )
        if count:
            chat = _Chat(room, target)
            for piece in render.messages(formatting.messages_skipped(count)):
                await self._call(chat, SendText(piece))

    # --- what each entry takes -------------------------------------------------------------

    async def _message(self, chat: _Chat, delivery: Delivery) -> None:
        """Send a message, piece by piece (a reply as one), and record where they are."""
        event = cast(events.RoomMessage, delivery.event)
        answered = event["reply_to"]
        reply_to = None if answered is None else await self._copy(chat, answered["id"])
        if event["attachments"]:
            sent = await self._with_files(chat, chat.with_files(delivery), reply_to)
        else:
            sent = await self._texts(chat, chat.pieces(delivery), reply_to)
        if sent:
            await database_sync_to_async(chats.bot_messages_record)(
                platform=PLATFORM, chat_id=chat.id, room=chat.room, seq=event["id"],
                message_ids=sent, own=True,
            )

    async def _texts(self, chat: _Chat, pieces: Sequence[str], reply_to: int | None,
                     sent: list[int] | None = None) -> list[int]:
        """Send text pieces (the first as a reply, unless ``sent`` has some); the ids of the
        messages sent, after ``sent``'s."""
        sent = [] if sent is None else sent
        for piece in pieces:
            answer = await self._call(chat, SendText(piece, None if sent else reply_to))
            if answer.sent is not Sent.SENT or answer.message_id is None:
                break  # refused for good: the rest of this message would not help
            sent.append(answer.message_id)
        return sent

    async def _with_files(self, chat: _Chat, message: media.Rendered,
                          reply_to: int | None) -> list[int]:
        """Send a message with files: its media (the caption on the first), then its text
        messages; the ids of the messages sent, in order. A part refused for good ends it
        (what was recorded stays a prefix of the layout: media.py)."""
        sent: list[int] = []
        for group in message.layout.groups:
            caption = "" if sent else message.caption
            made = await self._media(chat, group, caption, None if sent else reply_to)
            if not made:
                return sent
            sent.extend(made)
        return await self._texts(chat, message.texts, reply_to, sent)

    async def _media(self, chat: _Chat, group: media.Group, caption: str,
                     reply_to: int | None) -> tuple[int, ...]:
        """Send one photo, document or album; the ids of its messages (none: refused for
        good). Tried by Telegram's ids of files it has first, then uploaded; a photo
        Telegram refuses is tried again as a document."""
        kind, by_id = group.kind, True
        while True:
            call = await self._media_call(kind, group.files, caption, reply_to, by_id)
            if call is None:
                return ()
            answer = await self._call(chat, call)
            if answer.sent is Sent.SENT:
                self._file_ids_keep(kind, group.files, answer.file_ids)
                return answer.message_ids
            if any(item.file_id for item in call.files):
                for item in group.files:  # Telegram no longer takes the id: upload it
                    self._file_ids.pop((item["id"], kind), None)
                by_id = False
            elif kind == PHOTO:
                logger.info("Telegram refused a photo: sending it as a document", extra=chat.log)
                kind = DOCUMENT
            else:
                return ()

    async def _media_call(self, kind: str, attachments: Sequence[events.Attachment],
                          caption: str, reply_to: int | None, by_id: bool) -> SendMedia | None:
        """The call sending these files (None: one of them is gone from the storage)."""
        items = []
        for attachment in attachments:
            known = self._file_ids.get((attachment["id"], kind)) if by_id else None
            if known is not None:
                items.append(MediaFile(attachment["name"], file_id=known))
                continue
            row = await database_sync_to_async(files.attachment_row)(attachment["id"])
            if row is None:  # deleted or pruned meanwhile: its message is gone too
                logger.info("a message's file is gone: not sent",
                            extra={"protocol": PLATFORM, "attachment": attachment["id"]})
                return None
            data = await sync_to_async(_read, thread_sensitive=False)(row.file)
            items.append(MediaFile(attachment["name"], data=data))
        return SendMedia(kind, tuple(items), caption, reply_to)

    def _file_ids_keep(self, kind: str, attachments: Sequence[events.Attachment],
                       file_ids: Sequence[str | None]) -> None:
        for attachment, file_id in zip(attachments, file_ids, strict=False):
            if file_id:
                self._file_ids[(attachment["id"], kind)] = file_id
        while len(self._file_ids) > FILE_IDS_KEPT:
            del self._file_ids[next(iter(self._file_ids))]

    async def _change(self, chat: _Chat, entry: events.RoomEntry, cursor: int) -> None:
        """An edit, a delete or a reaction, to the chat's copy of its message (if it has
        one); the room's own entries are passed over."""
        if entry["kind"] not in events.MESSAGE_ENTRY_KINDS or entry["id"] is None:
            return
        copies = await database_sync_to_async(chats.bot_message_copies)(
            platform=PLATFORM, chat_id=chat.id, room=chat.room, seq=entry["id"]
        )
        if entry["kind"] == events.ENTRY_DELETE:  # no chat behind is to be edited to its text
            gone = (entry["room"], entry["id"])
            self._states = {key: state for key, state in self._states.items()
                            if state is None or (state["room"], state["id"]) != gone}
        if not copies:
            return  # the chat never had it (it joined later, or it was skipped)
        if entry["kind"] == events.ENTRY_DELETE:
            await self._delete(chat, entry["id"], copies)
        elif entry["kind"] == events.ENTRY_EDIT:
            await self._edit(chat, copies, await self._state(chat.room, entry["id"], cursor))
        else:
            await self._react(chat, entry, copies[0],
                              await self._state(chat.room, entry["id"], cursor))

    async def _edit(self, chat: _Chat, copies: list[BotMessage],
                    message: events.RoomMessage | None) -> None:
        own = [copy for copy in copies if copy.own]
        if message is None or not own:
            return  # deleted since (its delete follows), or the chat's original
        if message["attachments"]:
            rendered = _with_files(message, chat.policy)
            for call in media.edits(rendered, [copy.message_id for copy in own]):
                await self._call(chat, call)
            return
        pieces = _pieces(message, chat.policy)
        for copy, piece in zip(own, pieces, strict=False):
            await self._call(chat, EditText(copy.message_id, piece))
        for copy in own[len(pieces):]:
            await self._call(chat, Delete(copy.message_id))

    async def _delete(self, chat: _Chat, seq: int, copies: list[BotMessage]) -> None:
        for copy in copies:
            await self._call(chat, Delete(copy.message_id))
        await database_sync_to_async(chats.bot_messages_forget)(
            platform=PLATFORM, chat_id=chat.id, room=chat.room, seq=seq
        )

    async def _react(self, chat: _Chat, entry: events.RoomEntry, copy: BotMessage,
                     message: events.RoomMessage | None) -> None:
        if message is None:
            return
        counts = message["reactions"]
        if reactions.may_change(cast(str, entry["emoji"]), bool(entry["added"]), counts):
            await self._call(chat, React(copy.message_id, reactions.shown(counts)))

    # --- reads and calls ---------------------------------------------------------------------

    async def _copy(self, chat: _Chat, seq: int) -> int | None:
        """The chat's message for room message ``seq`` (its copy's first piece, or the
        original), to reply to."""
        copies = await database_sync_to_async(chats.bot_message_copies)(
            platform=PLATFORM, chat_id=chat.id, room=chat.room, seq=seq
        )
        return copies[0].message_id if copies else None

    async def _state(self, room: str, seq: int, cursor: int) -> events.RoomMessage | None:
        """Message ``seq`` as it is now (None: deleted), read once for every chat that is
        carried the entry at ``cursor``."""
        key = (room, cursor)
        if key not in self._states:
            self._states[key] = await database_sync_to_async(selectors.room_message_now)(
                room=room, id=seq)
            while len(self._states) > STATES_KEPT:
                del self._states[next(iter(self._states))]
        return self._states[key]

    async def _call(self, chat: _Chat, call: Call) -> Answer:
        """Make one call; its answer. ``TargetGone`` once the chat is unreachable (it has
        then left the room). A chat that moved is called at its new id from then on."""
        answer = await self.server.send(chat.id, call)
        if answer.moved_to is not None:
            chat.id, chat.moved = answer.moved_to, True
        if answer.sent is Sent.GONE:
            await database_sync_to_async(chats.bot_chat_leave_unreachable)(
                platform=PLATFORM, chat_id=chat.id, room=chat.room
            )
            logger.warning("chat unreachable: it left the room", extra=chat.log)
            raise TargetGone(chat.id)
        return answer

    async def _moved(self, chat: _Chat, old: str, cursor: int) -> None:
        """The chat became a supergroup while this entry was carried: its new id goes on
        after the entry (the server moved its place in the room); the old id is done."""
        await database_sync_to_async(services.relay_positions_save)(
            relay=PLATFORM, positions={(chat.room, chat.id): cursor}
        )
        logger.info("chat moved to its supergroup: it goes on there",
                    extra={**chat.log, "from": old})
        raise TargetGone(old)
