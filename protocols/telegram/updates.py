"""What a Telegram update says to its chat's scope: a message, an edit of one, a user's
reactions changed, or a group that became a supergroup (the ``kind`` of the scope's
``chat.received_message``, protocols/telegram/events.py). Anything else is not taken.

- ``message``: its text and Telegram's id, and the chat's message it answers
  (``reply_to_message``), which the application finds in its map of the chat's messages.
- ``edit`` (``edited_message``): the message's id and its new text.
- ``reaction`` (``message_reaction``, sent only where the bot is an admin and only when asked
  for in ``allowed_updates``): the emoji the user added and took back, as the room writes
  them (reactions.py); custom emoji and paid reactions are not carried.
- ``migrate``: the old group's service message naming its supergroup (``migrate_to_chat_id``).
  The supergroup's own one (``migrate_from_chat_id``) is not taken: the old one moves the chat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from telegram import Chat, Message, MessageReactionUpdated, ReactionTypeEmoji, Update, User

from protocols.telegram import reactions
from protocols.telegram.events import ChatUser, ReceivedKind


@dataclass(frozen=True)
class Received:
    """The part of an update its chat's scope is fed."""

    chat: Chat
    user: ChatUser
    kind: ReceivedKind
    message_id: int
    text: str = ""
    reply_to: int | None = None  # message: the chat's message it answers
    added: list[str] = field(default_factory=list)  # reaction: emoji, as the room has them
    removed: list[str] = field(default_factory=list)
    migrate_to: str | None = None  # migrate: the supergroup's chat id

    def scope_chat(self) -> dict[str, str]:
        """The chat as its scope describes it."""
        chat = self.chat
        return {"id": str(chat.id), "kind": chat.type,
                "title": chat.title or chat.full_name or self.user["name"]}


def received(update: Update) -> Received | None:
    """What the update says to its chat, or None for an update that is not taken."""
    if update.message is not None:
        return _message(update.message)
    if update.edited_message is not None and update.edited_message.text is not None:
        message = update.edited_message
        return Received(message.chat, _person(message.from_user, message.chat), "edit",
                        message.message_id, text=message.text or "")
    if update.message_reaction is not None:
        return _reaction(update.message_reaction)
    return None


def _message(message: Message) -> Received | None:
    user = _person(message.from_user, message.chat)
    if message.migrate_to_chat_id is not None:
        return Received(message.chat, user, "migrate", message.message_id,
                        migrate_to=str(message.migrate_to_chat_id))
    if message.migrate_from_chat_id is not None:
        return None
    answered = message.reply_to_message
    return Received(message.chat, user, "message", message.message_id,
                    text=message.text or "",
                    reply_to=answered.message_id if answered is not None else None)


def _reaction(update: MessageReactionUpdated) -> Received:
    before, after = _emoji(update.old_reaction), _emoji(update.new_reaction)
    return Received(update.chat, _person(update.user, update.actor_chat or update.chat),
                    "reaction", update.message_id,
                    added=[e for e in after if e not in before],
                    removed=[e for e in before if e not in after])


def _emoji(kinds: tuple) -> list[str]:
    return [reactions.from_telegram(kind.emoji) for kind in kinds
            if isinstance(kind, ReactionTypeEmoji)]


def _person(user: User | None, chat: Chat) -> ChatUser:
    """Who did it: the user, or (an anonymous admin, a channel) the chat that speaks."""
    if user is not None:
        return {"id": str(user.id), "username": user.username or "", "name": user.full_name}
    return {"id": str(chat.id), "username": chat.username or "",
            "name": chat.title or chat.full_name or str(chat.id)}
