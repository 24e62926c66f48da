"""The Bot API calls the Telegram server makes to a chat, one kind each, and what Telegram's
answers to them mean.

- ``SendText``: a message (Telegram HTML, within one message), maybe as a reply to one of the
  chat's messages (``reply_parameters``, with ``allow_sending_without_reply``: a reply to a
  message that is gone is sent as a plain message). Telegram answers with its message id.
- ``EditText``: a message the bot sent gets new text (``editMessageText``). "Message is not
  modified" means it has that text already: done.
- ``Delete``: a message of the chat is deleted (``deleteMessage``): the bot's own, or one a
  member sent, where the bot may delete it (private chats; groups where it is an admin).
- ``React``: the bot's one reaction on a message (``setMessageReaction``; "" takes it back).
- ``SendMedia``: files, as a photo (``sendPhoto``), a document (``sendDocument``) or an album
  of 2 to 10 of one kind (``sendMediaGroup``), with a caption (Telegram HTML) on the first
  and maybe as a reply. Each file is uploaded (multipart) or, when this bot sent it before,
  named by Telegram's ``file_id`` (not uploaded again). Telegram answers with the id of each
  message (an album is one per file) and of each file it keeps.
- ``EditCaption``: a photo or document the bot sent gets a new caption
  (``editMessageCaption``: ``editMessageText`` is refused for a message without text).

Only a message decides whether a chat is gone (blocked the bot, left): a change refused with
403 is a missing right (to react, to delete), not a gone chat. A change cannot follow a group
that became a supergroup: its messages stayed in the old group, which no longer takes calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from telegram import (
    Bot,
    InputMediaDocument,
    InputMediaPhoto,
    LinkPreviewOptions,
    Message,
    ReactionTypeEmoji,
    ReplyParameters,
)
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden, TelegramError

PHOTO, DOCUMENT = "photo", "document"  # how Telegram shows a file (SendMedia.kind)
# Uploads get this long to be written (at least this rate assumed), and Telegram as long to
# answer once it has them: a large file takes longer than PTB's defaults.
UPLOAD_RATE = 250_000  # bytes per second
UPLOAD_MIN_TIMEOUT = 20.0
UPLOAD_READ_TIMEOUT = 60.0


@dataclass(frozen=True)
class SendText:
    text: str  # Telegram HTML, within one message
    reply_to: int | None = None  # the chat's message it answers


@dataclass(frozen=True)
class EditText:
    message_id: int  # the bot's message in the chat
    text: str  # Telegram HTML, within one message


@dataclass(frozen=True)
class Delete:
    message_id: int


@dataclass(frozen=True)
class React:
    message_id: int
    emoji: str  # one of Telegram's reaction emoji; "" takes the bot's reaction back


@dataclass(frozen=True)
class MediaFile:
    """A file to send: its bytes, or Telegram's id of it (this bot sent it before)."""

    name: str
    data: bytes | None = field(default=None, repr=False)
    file_id: str | None = None


@dataclass(frozen=True)
class SendMedia:
    kind: str  # PHOTO or DOCUMENT
    files: tuple[MediaFile, ...]  # one: sendPhoto/sendDocument; 2 to 10: an album
    caption: str = ""  # Telegram HTML, at most 1024 visible characters, on the first
    reply_to: int | None = None  # the chat's message it answers

    def uploads(self) -> int:
        """How many bytes go up."""
        return sum(len(item.data or b"") for item in self.files)


@dataclass(frozen=True)
class EditCaption:
    message_id: int  # the bot's photo or document in the chat
    caption: str  # Telegram HTML


@dataclass(frozen=True)
class Made:
    """What a call made: the messages sent (an album's, one per file, in order), and for
    files Telegram's id of each (None where it gave none), to send them again by id."""

    message_ids: tuple[int, ...] = ()
    file_ids: tuple[str | None, ...] = ()


Call = SendText | EditText | Delete | React | SendMedia | EditCaption
Send = SendText | SendMedia  # the calls that send a message

WHAT = {SendText: "a message", EditText: "an edit", Delete: "a delete", React: "a reaction",
        SendMedia: "files", EditCaption: "a caption edit"}
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)


async def perform(bot: Bot, chat_id: int, call: Call) -> Made:
    """Make the call; what it made (the messages a send sent)."""
    if isinstance(call, SendText):
        message = await bot.send_message(
            chat_id=chat_id, text=call.text, parse_mode=ParseMode.HTML,
            link_preview_options=NO_PREVIEW, reply_parameters=_reply(call.reply_to),
        )
        return Made((message.message_id,))
    if isinstance(call, SendMedia):
        return await _send_media(bot, chat_id, call)
    if isinstance(call, EditText):
        await bot.edit_message_text(call.text, chat_id=chat_id, message_id=call.message_id,
                                    parse_mode=ParseMode.HTML, link_preview_options=NO_PREVIEW)
    elif isinstance(call, EditCaption):
        await bot.edit_message_caption(chat_id=chat_id, message_id=call.message_id,
                                       caption=call.caption, parse_mode=ParseMode.HTML)
    elif isinstance(call, Delete):
        await bot.delete_message(chat_id, call.message_id)
    else:
        reaction = [ReactionTypeEmoji(call.emoji)] if call.emoji else []
        await bot.set_message_reaction(chat_id, call.message_id, reaction)
    return Made()


def _reply(message_id: int | None) -> ReplyParameters | None:
    """As a reply to the chat's message; sent anyway if that message is gone."""
    if message_id is None:
        return None
    return ReplyParameters(message_id, allow_sending_without_reply=True)


async def _send_media(bot: Bot, chat_id: int, call: SendMedia) -> Made:
    write = max(UPLOAD_MIN_TIMEOUT, call.uploads() / UPLOAD_RATE)
    caption = call.caption or None
    reply = _reply(call.reply_to)
    if len(call.files) > 1:
        kind = InputMediaPhoto if call.kind == PHOTO else InputMediaDocument
        media = [kind(item.file_id or item.data or b"", filename=item.name)
                 for item in call.files]
        messages = await bot.send_media_group(
            chat_id, media, caption=caption, parse_mode=ParseMode.HTML, reply_parameters=reply,
            write_timeout=write, read_timeout=UPLOAD_READ_TIMEOUT)
        return Made(tuple(m.message_id for m in messages),
                    tuple(_file_id(m, call.kind) for m in messages))
    (item,) = call.files
    source = item.file_id or item.data or b""
    send = bot.send_photo if call.kind == PHOTO else bot.send_document
    message = await send(chat_id, source, caption=caption, parse_mode=ParseMode.HTML,
                         reply_parameters=reply, filename=item.name, write_timeout=write,
                         read_timeout=UPLOAD_READ_TIMEOUT)
    return Made((message.message_id,), (_file_id(message, call.kind),))


def _file_id(message: Message, kind: str) -> str | None:
    """Telegram's id of the file a message it sent carries (a photo's largest size)."""
    if kind == PHOTO:
        return message.photo[-1].file_id if message.photo else None
    return message.document.file_id if message.document is not None else None


def is_send(call: Call) -> bool:
    return isinstance(call, SendText | SendMedia)


def without_reply(call: Send) -> Send:
    """The same message, not as a reply (what it answered stayed in an old group)."""
    return dataclasses.replace(call, reply_to=None)


def unchanged(error: BadRequest) -> bool:
    """Telegram refused the call because what it asks is already so: done."""
    return "message is not modified" in str(error).lower()


def too_large(error: TelegramError) -> bool:
    """Telegram refused an upload for its size (HTTP 413, which PTB raises as a network
    error): trying again would not help."""
    text = str(error).lower()
    return "(413)" in text or "too large" in text  # "Request Entity Too Large"


def gone(call: Call, error: TelegramError) -> bool:
    """Telegram's refusal says the chat itself is gone (it blocked the bot, was deleted)."""
    if not is_send(call):
        return False
    return isinstance(error, Forbidden) or "chat not found" in str(error).lower()
