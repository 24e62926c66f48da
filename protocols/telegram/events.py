"""The events between the Telegram protocol server and its consumer, through a scope's queue.

The server (protocols/telegram/server.py) opens a ``telegram`` scope per chat (``role:
chat``, TelegramChatConsumer) with protocols/scopes.py (rooms reach the chats through the
relay, protocols/telegram/relay.py, not through scopes). It feeds each scope events (the
consumer's ASGI ``receive``); the consumer answers through the scope's ``send`` (the
server's ``_send``). Both ends are in one process and these events never cross the channel
layer. Channels names the handler from ``type``: ``chat.received_message`` ->
``chat_received_message``.

The server sends a scope:

- ``chat.connect``: the scope's first event; no fields.
- ``chat.received_message``: an update about the chat's messages (protocols/telegram/
  updates.py reads it). ``update_id``: Telegram's id of the update (the application records
  it, so a repeated update is handled once); ``kind``: ``message`` (a new one), ``edit`` (a
  message got new text), ``reaction`` (a user's reactions to a message changed) or
  ``migrate`` (the group became a supergroup); ``message_id``: Telegram's id of the message
  in the chat (the one edited, or reacted to); ``text``: the message's text, or new text
  ("" if it has none); ``reply_to_message_id``: the chat's message a new one answers, or
  None; ``added`` and ``removed``: the emoji of the reactions the user added and took back,
  as the room writes them; ``migrate_to``: the supergroup's chat id, or None; ``user``: who
  did it (``id`` Telegram's user id, or the chat's when there is no user; ``username``
  without the @, maybe ""; ``name`` the full name, or the chat's title or id);
  ``reads_all``: whether the chat's plain text reaches the bot (False: a group under privacy
  mode where the bot is no admin; None: not known, or not a message); ``file`` (a message
  only, and may be left out): the file the message carries (a photo, document, voice note,
  audio, video, animation, video note or sticker), whose caption is then ``text``: Telegram's
  ``file_id`` to fetch it with (through the scope's ``telegram.download`` extension; never
  stored or shown), its ``kind``, a ``name`` (the sender's, or the kind's),
  ``size`` in bytes as Telegram says (None: not said) and ``mime_type`` as Telegram says
  ("" if not: a hint only, the gateway reads the type from the bytes).
- ``chat.disconnect``: the scope ends (idle chat, shutdown); no fields.

A scope sends the server:

- ``chat.send_message``: the bot's reply; ``chat_id``, ``text`` (Telegram HTML, within one
  message), queued in order per chat and paced.
- ``chat.handled``: update ``update_id`` is handled and its effect stored: the server
  confirms it to Telegram now.
- ``chat.failed``: update ``update_id`` could not be handled (the database): not
  confirmed, so it comes again.

A chat scope has the extension ``telegram.download`` (``scope["extensions"]``): an async
callable ``(file_id, limit) -> bytes`` that fetches a file from the Bot API (protocols/
telegram/download.py: ``FileTooLarge``, ``FileUnavailable``, or Telegram's ``NetworkError``).

The TypedDicts are final, so mypy tells the events apart by their ``type``. This module
imports only the standard library.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict, final

DOWNLOAD_EXTENSION = "telegram.download"  # the chat scope's file fetcher


class ChatUser(TypedDict):
    id: str  # Telegram's user id, or the chat's when the message has no user
    username: str  # without the @; "" if none
    name: str  # the full name, or the chat's title (or id)


# --- the server to a scope -------------------------------------------------------------


@final
class ChatConnect(TypedDict):
    type: Literal["chat.connect"]


ReceivedKind = Literal["message", "edit", "reaction", "migrate"]
FileKind = Literal["photo", "document", "voice", "audio", "video", "animation", "video_note",
                   "sticker"]


class ChatFile(TypedDict):
    file_id: str  # Telegram's id to fetch it with (getFile): never stored, logged or shown
    kind: FileKind
    name: str  # the sender's file name, or its kind ("photo", "voice")
    size: int | None  # bytes, as Telegram says (None: not said)
    mime_type: str  # as Telegram says ("" if not): a hint only


@final
class ChatReceivedMessage(TypedDict):
    type: Literal["chat.received_message"]
    update_id: int
    kind: ReceivedKind
    message_id: int  # Telegram's, in the chat: the message, or the one edited or reacted to
    text: str  # "" if the message has none
    reply_to_message_id: int | None  # message: the chat's message it answers
    added: list[str]  # reaction: emoji added, as the room writes them
    removed: list[str]  # reaction: emoji taken back
    migrate_to: str | None  # migrate: the supergroup's chat id
    user: ChatUser
    reads_all: bool | None  # the chat's plain text reaches the bot; None: not known
    file: NotRequired[ChatFile | None]  # message: the file it carries (its caption is text)


@final
class ChatDisconnect(TypedDict):
    type: Literal["chat.disconnect"]


# --- a scope to the server -------------------------------------------------------------


@final
class ChatSendMessage(TypedDict):
    type: Literal["chat.send_message"]
    chat_id: str
    text: str  # Telegram HTML


@final
class ChatHandled(TypedDict):
    type: Literal["chat.handled"]
    update_id: int


@final
class ChatFailed(TypedDict):
    type: Literal["chat.failed"]
    update_id: int


ChatReceive = ChatConnect | ChatReceivedMessage | ChatDisconnect  # server -> scope
ChatSend = ChatSendMessage | ChatHandled | ChatFailed  # scope -> server


def chat_connect() -> ChatConnect:
    return {"type": "chat.connect"}


def chat_disconnect() -> ChatDisconnect:
    return {"type": "chat.disconnect"}
