"""Services for the chats with the gateway's bot (bots/), on any chat platform: a chat's
record (its room, names), and the updates already handled. The only writers of ``BotChat``
and ``BotUpdate``.

A chat is a target of the relay role named after its platform (gateway/relay.py): joining
a room places its delivery position at the room's newest entry (it gets what follows),
leaving it or being blocked removes it, being unblocked places it afresh."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from django.db import IntegrityError, transaction

from gateway.models import BotChat, BotUpdate
from gateway.names import room_name_validate
from gateway.services import relay_target_place, relay_target_remove, room_get_or_create


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
        if chat.room and chat.room != name:
            relay_target_remove(relay=chat.platform, room=chat.room, target=chat.chat_id)
        chat.room = name
        chat.save(update_fields=["room"])
        if not chat.blocked:
            relay_target_place(relay=chat.platform, room=name, target=chat.chat_id,
                               position=head)


def bot_chat_leave(*, chat: BotChat) -> None:
    with transaction.atomic():
        if chat.room:
            relay_target_remove(relay=chat.platform, room=chat.room, target=chat.chat_id)
        chat.room = ""
        chat.save(update_fields=["room"])


def bot_chat_leave_unreachable(*, platform: str, chat_id: str, room: str) -> None:
    """A chat that can no longer be sent to (it blocked the bot) leaves ``room``."""
    with transaction.atomic():
        BotChat.objects.filter(platform=platform, chat_id=chat_id, room=room).update(room="")
        relay_target_remove(relay=platform, room=room, target=chat_id)


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


def bot_chat_name_set(*, chat: BotChat, user_id: str, name: str) -> None:
    chat.names = {**chat.names, user_id: name}
    chat.save(update_fields=["names"])
