"""The events between the Telegram protocol server and its consumers, through a scope's queue.

The server (protocols/telegram/server.py) opens ``telegram`` scopes with
protocols/scopes.py: one per chat (``role: chat``, TelegramChatConsumer), one per room that
chats have joined (``role: room``, TelegramRoomConsumer) and one list of those rooms
(``role: rooms``, TelegramRoomsConsumer); the last two only on the process holding the
``telegram`` lease. It feeds each scope events (the consumer's ASGI ``receive``); the
consumer answers through the scope's ``send`` (the server's ``_send``). Both ends are in one
process and these events never cross the channel layer. Channels names the handler from
``type``: ``chat.received_message`` -> ``chat_received_message``.

The server sends a scope:

- ``chat.connect`` (chat, room): the scope's first event; no fields.
- ``chat.received_message`` (chat): a message update. ``update_id``: Telegram's id of the
  update (the application records it, so a repeated update is handled once); ``text``: the
  message's text ("" if it has none); ``user``: who wrote it (``id`` Telegram's user id,
  or the chat's when there is no user; ``username`` without the @, maybe ""; ``name`` the
  full name, or the chat's title or id); ``reads_all``: whether the chat's plain text
  reaches the bot (False: a group under privacy mode where the bot is no admin; None: not
  known).
- ``chat.delivered`` (room): the server sent these chats a room message (its last piece).
  ``positions``: chat id -> the message's id. The scope records it and answers
  ``chat.recorded`` per chat; the server waits for that before the chat's next message.
- ``chat.unreachable`` (room): Telegram refused a room message to ``chat_id`` for good (it
  blocked the bot, left, or is gone); the scope takes the chat out of the room.
- ``telegram.scan`` (rooms): the scope's first event, then one a tick: answer with
  ``telegram.relay_rooms``; no fields.
- ``telegram.prune`` (rooms): forget handled updates older than Telegram redelivers; no
  fields. Once an hour.
- ``chat.disconnect`` (every role): the scope ends (idle chat, room no longer relayed,
  lease lost, shutdown); no fields.

A scope sends the server:

- ``chat.send_message``, in two shapes, queued in order per chat and paced:

  - ``ChatSendReply`` (chat): the bot's reply; ``chat_id``, ``text`` (Telegram HTML).
  - ``ChatSendRoomPiece`` (room): a piece of room message ``id`` of ``room`` for
    ``chat_id`` (long messages are split); ``last``: the last piece, after which the
    chat has been sent the message (``chat.delivered``). Skipped when the chat falls behind.

- ``chat.handled`` (chat): update ``update_id`` is handled and its effect stored: the
  server confirms it to Telegram now.
- ``chat.failed`` (chat): update ``update_id`` could not be handled (the database): not
  confirmed, so it comes again.
- ``chat.drop`` (room): message ``id`` of ``room`` was deleted: taken out of every chat's
  queue.
- ``chat.recorded`` (room): the delivery to ``chat_id`` is recorded (see ``chat.delivered``).
- ``chat.relay_behind`` (room): the relay of ``room`` holds more messages than it may
  (``RELAY_PENDING_LIMIT``): the server ends it, and the next scan opens it again from the
  chats' recorded positions (bounded, nothing lost).
- ``telegram.relay_rooms`` (rooms): ``rooms``, every room with chats: the server opens a
  room scope for each it does not relay yet and closes those no longer named.

The TypedDicts are final so that mypy can tell the two ``chat.send_message`` shapes apart by
their keys (``"room" in event``). This module imports only the standard library.
"""

from __future__ import annotations

from typing import Literal, TypedDict, final


class ChatUser(TypedDict):
    id: str  # Telegram's user id, or the chat's when the message has no user
    username: str  # without the @; "" if none
    name: str  # the full name, or the chat's title (or id)


# --- the server to a scope -------------------------------------------------------------


@final
class ChatConnect(TypedDict):
    type: Literal["chat.connect"]


@final
class ChatReceivedMessage(TypedDict):
    type: Literal["chat.received_message"]
    update_id: int
    text: str  # "" if the message has none
    user: ChatUser
    reads_all: bool | None  # the chat's plain text reaches the bot; None: not known


@final
class ChatDelivered(TypedDict):
    type: Literal["chat.delivered"]
    positions: dict[str, int]  # chat id -> the room message it has been sent


@final
class ChatUnreachable(TypedDict):
    type: Literal["chat.unreachable"]
    chat_id: str


@final
class TelegramScan(TypedDict):
    type: Literal["telegram.scan"]


@final
class TelegramPrune(TypedDict):
    type: Literal["telegram.prune"]


@final
class ChatDisconnect(TypedDict):
    type: Literal["chat.disconnect"]


# --- a scope to the server -------------------------------------------------------------


@final
class ChatSendReply(TypedDict):
    type: Literal["chat.send_message"]
    chat_id: str
    text: str  # Telegram HTML


@final
class ChatSendRoomPiece(TypedDict):
    type: Literal["chat.send_message"]
    chat_id: str
    text: str  # Telegram HTML, at most one message long (bots/formatting.py splits)
    room: str
    id: int  # the room message's id
    last: bool  # its last piece: once sent, the chat has been sent the message


@final
class ChatHandled(TypedDict):
    type: Literal["chat.handled"]
    update_id: int


@final
class ChatFailed(TypedDict):
    type: Literal["chat.failed"]
    update_id: int


@final
class ChatDrop(TypedDict):
    type: Literal["chat.drop"]
    room: str
    id: int  # the deleted message


@final
class ChatRelayBehind(TypedDict):
    type: Literal["chat.relay_behind"]
    room: str


@final
class ChatRecorded(TypedDict):
    type: Literal["chat.recorded"]
    chat_id: str


@final
class TelegramRelayRooms(TypedDict):
    type: Literal["telegram.relay_rooms"]
    rooms: list[str]


ChatSendMessage = ChatSendReply | ChatSendRoomPiece
ChatReceive = ChatConnect | ChatReceivedMessage | ChatDisconnect  # server -> role chat
RoomReceive = ChatConnect | ChatDelivered | ChatUnreachable | ChatDisconnect  # -> role room
RoomsReceive = TelegramScan | TelegramPrune | ChatDisconnect  # server -> role rooms
ChatSend = ChatSendReply | ChatHandled | ChatFailed  # role chat -> server
RoomSend = ChatSendRoomPiece | ChatDrop | ChatRecorded | ChatRelayBehind  # role room -> server
RoomsSend = TelegramRelayRooms  # role rooms -> server
ScopeSend = ChatSend | RoomSend | RoomsSend  # what the server's send takes


def chat_connect() -> ChatConnect:
    return {"type": "chat.connect"}


def chat_disconnect() -> ChatDisconnect:
    return {"type": "chat.disconnect"}


def telegram_scan() -> TelegramScan:
    return {"type": "telegram.scan"}
