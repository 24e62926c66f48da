"""What a Telegram update says to its chat's scope: a message, an edit of one, a user's
reactions changed, or a group that became a supergroup (the ``kind`` of the scope's
``chat.received_message``, protocols/telegram/events.py). Anything else is not taken.

- ``message``: its text and Telegram's id, and the chat's message it answers
  (``reply_to_message``), which the application finds in its map of the chat's messages.
  A message with a file (a photo: its largest size; a document, voice note, audio, video,
  animation, video note or sticker) carries it as ``file`` (``ChatFile``), its caption as
  the text. An animated sticker (Telegram's own vector format, which nothing else shows) is
  its emoji as text.
- ``edit`` (``edited_message``): the message's id and its new text (an edited caption is
  not taken: the room message of a file keeps its text).
- ``reaction`` (``message_reaction``, sent only where the bot is an admin and only when asked
  for in ``allowed_updates``): the emoji the user added and took back, as the room writes
  them (reactions.py); custom emoji and paid reactions are not carried.
- ``migrate``: the old group's service message naming its supergroup (``migrate_to_chat_id``).
  The supergroup's own one (``migrate_from_chat_id``) is not taken: the old one moves the chat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from telegram import (
    Animation,
    Audio,
    Chat,
    Document,
    Message,
    MessageReactionUpdated,
    ReactionTypeEmoji,
    Update,
    User,
    Video,
    VideoNote,
    Voice,
)

from protocols.telegram import reactions
from protocols.telegram.events import ChatFile, ChatUser, FileKind, ReceivedKind

Medium = Animation | Document | Voice | Audio | Video | VideoNote  # a message's one file


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
    file: ChatFile | None = None  # message: the file it carries (text is its caption)

    def scope_chat(self) -> dict[str, str]:
        """The chat as its scope describes it."""
        chat = self.chat
        return {"id": str(chat.id), "kind": chat.type,
                "title": chat.title or chat.full_name or self.user["name"]}


def received(update: Update) -> Received | None:
    """What the update says to its chat, or None for an update that is not taken."""
    if update.message is not None:
        return _message(update.message)
    edited = update.edited_message
    if edited is not None and edited.text is not None:  # a caption's edit is not taken
        return Received(edited.chat, _person(edited.from_user, edited.chat), "edit",
                        edited.message_id, text=edited.text)
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
    file = _file(message)
    text = message.text or message.caption or ""
    sticker = message.sticker
    if sticker is not None and sticker.is_animated:
        text = sticker.emoji or ""
    return Received(message.chat, user, "message", message.message_id, text=text,
                    reply_to=answered.message_id if answered is not None else None, file=file)


def _file(message: Message) -> ChatFile | None:
    """The file a message carries, if any (a photo: its largest size)."""
    if message.photo:
        largest = max(message.photo, key=lambda size: (size.width * size.height,
                                                        size.file_size or 0))
        return _chat_file("photo", largest.file_id, None, largest.file_size, "image/jpeg")
    sticker = message.sticker
    if sticker is not None:
        if sticker.is_animated:
            return None  # TGS, Telegram's own vector format: its emoji is the text
        return _chat_file("sticker", sticker.file_id, None, sticker.file_size,
                          "video/webm" if sticker.is_video else "image/webp")
    # An animation's message has its document too: the animation is what it is.
    found: list[tuple[FileKind, Medium | None]] = [
        ("animation", message.animation), ("document", message.document),
        ("voice", message.voice), ("audio", message.audio), ("video", message.video),
        ("video_note", message.video_note)]
    for kind, item in found:
        if item is not None:  # a voice note or video note has no name, a video note no type
            return _chat_file(kind, item.file_id, getattr(item, "file_name", None),
                              item.file_size, getattr(item, "mime_type", None) or "")
    return None


def _chat_file(kind: FileKind, file_id: str, name: str | None, size: int | None,
               mime_type: str) -> ChatFile:
    # Without a name of its own, it is named after its kind (the gateway adds the extension
    # of the type it reads from the bytes: "photo.jpg", "voice.ogg").
    return {"file_id": file_id, "kind": kind, "name": name or kind,
            "size": size, "mime_type": mime_type}


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
