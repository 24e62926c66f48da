"""Services for the chats with the gateway's bot (bots/), on any chat platform: a chat's
record (its room, names, delivery position), and the updates already handled. The only
writers of ``BotChat`` and ``BotUpdate``."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from django.db import IntegrityError, transaction

from gateway.models import BotChat, BotUpdate
from gateway.names import room_name_validate
from gateway.services import room_get_or_create


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
    chat.room = room_name_validate(room)
    creator = f"{chat.platform}-chat-{chat.chat_id}"
    chat.delivered_seq = room_get_or_create(room=room, creator=creator).last_seq
    chat.save(update_fields=["room", "delivered_seq"])


def bot_chat_leave(*, chat: BotChat) -> None:
    chat.room = ""
    chat.save(update_fields=["room"])


def bot_chat_leave_unreachable(*, platform: str, chat_id: str, room: str) -> None:
    """A chat that can no longer be sent to (it blocked the bot) leaves ``room``."""
    BotChat.objects.filter(platform=platform, chat_id=chat_id, room=room).update(room="")


def bot_chat_name_set(*, chat: BotChat, user_id: str, name: str) -> None:
    chat.names = {**chat.names, user_id: name}
    chat.save(update_fields=["names"])


def bot_chats_delivered_save(*, platform: str, room: str, positions: dict[str, int]) -> None:
    """Record how far each chat has been sent ``room`` (only forward, only while it is
    still in that room)."""
    for chat_id, seq in positions.items():
        BotChat.objects.filter(
            platform=platform, chat_id=chat_id, room=room, delivered_seq__lt=seq
        ).update(delivered_seq=seq)
