"""Services for the chats with the gateway's bot (bots/), on any chat platform: a chat's
record (its room, names), the updates already handled, and where each room message is in
each chat. The only writers of ``BotChat``, ``BotUpdate`` and ``BotMessage``.

A chat is a target of the relay role named after its platform (gateway/relay.py): joining
a room places its delivery position at the room's newest entry (it gets what follows),
leaving it or being blocked removes it, being unblocked places it afresh.

The map of messages (``BotMessage``): for each room message a chat has, the platform's id of
its copy there (the bot sent it, in pieces when long) or of the original (the chat sent it).
Edits, deletes and reactions of a room message find its copies through it, and a reply in a
chat finds the room message it answers; it is in the database, so it outlives restarts and
is shared by replicas. A message deleted in the room is forgotten from it."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from django.db import IntegrityError, transaction
from django.db.models import Max

from gateway import events
from gateway.errors import GatewayError
from gateway.models import BotChat, BotMessage, BotUpdate
from gateway.names import room_name_validate
from gateway.selectors import bot_chat_origin, relay_position
from gateway.services import (
    relay_target_place,
    relay_target_remove,
    room_get_or_create,
    room_member_notice,
)

logger = logging.getLogger(__name__)


def bot_update_claim(*, platform: str, update_id: int) -> bool:
    """Record that an update is being handled; False if it was handled before.

    Call it inside the transaction that handles the update, so a failure leaves it unclaimed.
    """
    try:
        with transaction.atomic():
            BotUpdate.objects.create(platform=platform, update_id=update_id)
    except IntegrityError:
        return False
    return True


def bot_updates_prune(*, platform: str, older_than: float) -> int:
    """Forget handled updates older than ``older_than`` seconds (the platform's redelivery
    window is far shorter); returns how many."""
    cutoff = datetime.fromtimestamp(time.time() - older_than, tz=UTC)
    deleted, _ = BotUpdate.objects.filter(platform=platform, handled_at__lt=cutoff).delete()
    return deleted


def bot_chat_open(*, platform: str, chat_id: str, kind: str, title: str) -> BotChat:
    """The chat's record, created on its first message; its kind and title kept current."""
    chat, created = BotChat.objects.get_or_create(
        platform=platform, chat_id=chat_id, defaults={"kind": kind, "title": title[:128]}
    )
    if not created and (chat.kind, chat.title) != (kind, title[:128]):
        chat.kind, chat.title = kind, title[:128]
        chat.save(update_fields=["kind", "title"])
    return chat


def bot_chat_join(*, chat: BotChat, room: str) -> None:
    """The chat now receives ``room``, from its next message on (GatewayError when the room
    is new and the room policy refuses it)."""
    name = room_name_validate(room)
    creator = f"{chat.platform}-chat-{chat.chat_id}"
    head = room_get_or_create(room=name, creator=creator).last_seq
    with transaction.atomic():
        left = chat.room if chat.room and chat.room != name else None
        if left is not None:
            relay_target_remove(relay=chat.platform, room=left, target=chat.chat_id)
        chat.room = name
        chat.save(update_fields=["room"])
        if not chat.blocked:
            relay_target_place(relay=chat.platform, room=name, target=chat.chat_id,
                               position=head)
    if left is not None:
        _notice(chat, left, joined=False)
    _notice(chat, name, joined=True)


def _notice(chat: BotChat, room: str, *, joined: bool) -> None:
    """Tell the room the chat came or went, if its policy asks (never in the way of the
    chat's own command: a refusal, a closed room, only logs)."""
    origin = bot_chat_origin(chat.platform, chat.chat_id)
    member = events.sender(protocol=chat.platform, id=origin, name=chat.title or origin)
    try:
        room_member_notice(room=room, member=member, joined=joined, origin=origin)
    except GatewayError as exc:
        logger.warning("no notice of a chat in its room: %s", exc.detail,
                       extra={"protocol": chat.platform, "room": room, "chat": chat.chat_id})


def bot_chat_leave(*, chat: BotChat) -> None:
    left = chat.room
    with transaction.atomic():
        if chat.room:
            relay_target_remove(relay=chat.platform, room=chat.room, target=chat.chat_id)
        chat.room = ""
        chat.save(update_fields=["room"])
    if left:
        _notice(chat, left, joined=False)


def bot_chat_leave_unreachable(*, platform: str, chat_id: str, room: str) -> None:
    """A chat that can no longer be sent to (it blocked the bot) leaves ``room``."""
    with transaction.atomic():
        left = BotChat.objects.filter(platform=platform, chat_id=chat_id, room=room).update(
            room="")
        relay_target_remove(relay=platform, room=room, target=chat_id)
    chat = BotChat.objects.filter(platform=platform, chat_id=chat_id).first()
    if left and chat is not None:
        _notice(chat, room, joined=False)


def bot_chat_block(*, chat: BotChat, blocked: bool) -> None:
    """Staff block a chat (the bot ignores it and sends it nothing) or unblock it (it gets
    its room from now on, not what was said while it was blocked)."""
    with transaction.atomic():
        chat.blocked = blocked
        chat.save(update_fields=["blocked"])
        if not chat.room:
            return
        if blocked:
            relay_target_remove(relay=chat.platform, room=chat.room, target=chat.chat_id)
        else:
            head = room_get_or_create(room=chat.room).last_seq
            relay_target_place(relay=chat.platform, room=chat.room, target=chat.chat_id,
                               position=head)
    _notice(chat, chat.room, joined=not blocked)


def bot_chat_name_set(*, chat: BotChat, user_id: str, name: str) -> None:
    chat.names = {**chat.names, user_id: name}
    chat.save(update_fields=["names"])


def bot_chat_migrate(*, platform: str, chat_id: str, to: str) -> None:
    """The group ``chat_id`` became the supergroup ``to`` (Telegram's ``migrate_to_chat_id``):
    the chat goes on under its new id with its room, names and place in the room. (Unless
    the supergroup joined a room of its own first: then the old group only leaves its room.)
    Its map stays where its messages are, in the old group (now read-only: the supergroup
    numbers its messages afresh, so the old ids name none of its messages).

    The place is the stored position, or the newest message the map says the chat has if
    that is further: the relay stores a position a moment after the delivery (and the chat's
    own messages are passed over, not sent), so the supergroup gets neither again."""
    with transaction.atomic():
        old = BotChat.objects.select_for_update().filter(platform=platform,
                                                         chat_id=chat_id).first()
        if old is None:
            return  # moved already (the update and a refused call both say so)
        new = BotChat.objects.filter(platform=platform, chat_id=to).first()
        if new is not None and new.room:
            bot_chat_leave(chat=old)
            return
        if new is not None:
            new.delete()  # opened by something said in the supergroup before the move
        position = relay_position(relay=platform, room=old.room, target=chat_id)
        relay_target_remove(relay=platform, target=chat_id)
        old.chat_id, old.kind = to, "supergroup"
        old.save(update_fields=["chat_id", "kind"])
        if old.room and position is not None:
            had = BotMessage.objects.filter(platform=platform, chat_id=chat_id, room=old.room)
            newest = had.aggregate(newest=Max("seq"))["newest"] or 0
            relay_target_place(relay=platform, room=old.room, target=to,
                               position=max(position, newest))


# --- the map of messages ---------------------------------------------------------------------


def bot_messages_record(
    *, platform: str, chat_id: str, room: str, seq: int, message_ids: list[int], own: bool
) -> None:
    """Room message ``seq`` is in the chat as these messages (its pieces, in order): the
    bot's copy (``own``) or the original the chat sent. Recorded again, it stays as it was."""
    BotMessage.objects.bulk_create(
        [BotMessage(platform=platform, chat_id=chat_id, message_id=message_id, room=room,
                    seq=seq, own=own, part=part) for part, message_id in enumerate(message_ids)],
        ignore_conflicts=True,
    )


def bot_message_find(*, platform: str, chat_id: str, message_id: int) -> BotMessage | None:
    """The room message a chat's message is (a copy or the original), if any."""
    return BotMessage.objects.filter(platform=platform, chat_id=chat_id,
                                     message_id=message_id).first()


def bot_message_copies(*, platform: str, chat_id: str, room: str, seq: int) -> list[BotMessage]:
    """Where room message ``seq`` is in the chat: the bot's copy, piece by piece, or the
    original the chat sent (a chat has one or the other)."""
    return list(BotMessage.objects.filter(platform=platform, chat_id=chat_id, room=room,
                                          seq=seq).order_by("part"))


def bot_messages_forget(*, platform: str, chat_id: str, room: str, seq: int) -> None:
    """Room message ``seq`` was deleted: the chat's copies of it are no longer looked for."""
    BotMessage.objects.filter(platform=platform, chat_id=chat_id, room=room, seq=seq).delete()
