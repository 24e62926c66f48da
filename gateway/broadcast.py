"""The one choke point for room traffic: the only caller of ``group_send`` for rooms.

Services call ``room_event_broadcast_on_commit`` inside the transaction that stores the
message, so nobody hears about a message that was not stored.
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from gateway.events import RoomMessage
from gateway.names import room_group_name

logger = logging.getLogger(__name__)


async def room_event_broadcast(event: RoomMessage) -> None:
    """Send a stored room event to every process serving the room.

    A failure is logged, not raised: the message is stored, and every process fills the gap
    from the database on its next resync (gateway/fanout.py).
    """
    layer = get_channel_layer()
    try:
        await layer.group_send(room_group_name(event["room"]), event)
    except Exception:
        logger.exception(
            "broadcast failed; receivers will resync from history",
            extra={"room": event["room"], "id": event["id"], "protocol": "layer"},
        )


def room_event_broadcast_on_commit(event: RoomMessage) -> None:
    """Broadcast the event once the current transaction commits."""
    transaction.on_commit(lambda: async_to_sync(room_event_broadcast)(event))
