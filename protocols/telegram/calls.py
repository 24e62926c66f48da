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

Only a message decides whether a chat is gone (blocked the bot, left): a change refused with
403 is a missing right (to react, to delete), not a gone chat. A change cannot follow a group
that became a supergroup: its messages stayed in the old group, which no longer takes calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from telegram import Bot, LinkPreviewOptions, ReactionTypeEmoji, ReplyParameters
from telegram.constants import ParseMode
from telegram.error import BadRequest, Forbidden, TelegramError


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


Call = SendText | EditText | Delete | React

WHAT = {SendText: "a message", EditText: "an edit", Delete: "a delete", React: "a reaction"}
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)


async def perform(bot: Bot, chat_id: int, call: Call) -> int | None:
    """Make the call; Telegram's id of the message a ``SendText`` sent (None otherwise)."""
    if isinstance(call, SendText):
        reply = (None if call.reply_to is None else
                 ReplyParameters(call.reply_to, allow_sending_without_reply=True))
        message = await bot.send_message(
            chat_id=chat_id, text=call.text, parse_mode=ParseMode.HTML,
            link_preview_options=NO_PREVIEW, reply_parameters=reply,
        )
        return message.message_id
    if isinstance(call, EditText):
        await bot.edit_message_text(call.text, chat_id=chat_id, message_id=call.message_id,
                                    parse_mode=ParseMode.HTML, link_preview_options=NO_PREVIEW)
    elif isinstance(call, Delete):
        await bot.delete_message(chat_id, call.message_id)
    else:
        reaction = [ReactionTypeEmoji(call.emoji)] if call.emoji else []
        await bot.set_message_reaction(chat_id, call.message_id, reaction)
    return None


def unchanged(error: BadRequest) -> bool:
    """Telegram refused the call because what it asks is already so: done."""
    return "message is not modified" in str(error).lower()


def gone(call: Call, error: TelegramError) -> bool:
    """Telegram's refusal says the chat itself is gone (it blocked the bot, was deleted)."""
    if not isinstance(call, SendText):
        return False
    return isinstance(error, Forbidden) or "chat not found" in str(error).lower()
