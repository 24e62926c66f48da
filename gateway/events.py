"""The event contract: what crosses the channel layer for a room.

Every consumer and protocol server builds and reads room events only through this module.
Events carry primitives only (channels-redis serialises them with msgpack): times are epoch
floats, the sender is a plain dict. Decoding rejects unknown or missing keys. This module
imports only the standard library.
"""

from __future__ import annotations

from typing import Any, TypedDict

ROOM_MESSAGE = "room.message"
# Control events, on the group every process joins (CONTROL_GROUP): staff actions.
MESSAGE_DELETED = "room.message_deleted"  # {"room", "id"}: gone from history and pages
ROOM_CLOSED = "room.closed"  # {"room"}: its members are disconnected
SCOPE_DISCONNECT = "scope.disconnect"  # {"scope"}: that connection is closed
CONTROL_GROUP = "gateway.control"

PROTOCOLS = ("web", "mqtt", "telegram", "system")


class Sender(TypedDict):
    protocol: str
    id: str
    name: str


class RoomMessage(TypedDict):
    type: str
    id: int  # monotonic per room, assigned when the message is stored
    room: str
    text: str
    sender: Sender
    ts: float  # epoch seconds, when it was stored
    origin: str  # the scope that sent it, so no consumer echoes it back there
    client_id: str | None  # the sender's idempotency key, if it gave one


class EventError(ValueError):
    """An event that does not follow the contract."""


_SENDER_KEYS = {"protocol": str, "id": str, "name": str}
_MESSAGE_KEYS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "id": int,
    "room": str,
    "text": str,
    "sender": dict,
    "ts": float,
    "origin": str,
    "client_id": (str, type(None)),
}


def sender(*, protocol: str, id: str, name: str) -> Sender:
    if protocol not in PROTOCOLS:
        raise EventError(f"unknown protocol {protocol!r}")
    return {"protocol": protocol, "id": id, "name": name}


def room_message(
    *,
    id: int,
    room: str,
    text: str,
    sender: Sender,
    ts: float,
    origin: str,
    client_id: str | None = None,
) -> RoomMessage:
    """Build a ``room.message`` event."""
    return {
        "type": ROOM_MESSAGE,
        "id": id,
        "room": room,
        "text": text,
        "sender": {"protocol": sender["protocol"], "id": sender["id"], "name": sender["name"]},
        "ts": float(ts),
        "origin": origin,
        "client_id": client_id,
    }


def _check_keys(data: dict[str, Any], spec: dict[str, Any], what: str) -> None:
    missing = spec.keys() - data.keys()
    extra = data.keys() - spec.keys()
    if missing or extra:
        raise EventError(f"{what}: missing {sorted(missing)}, unknown {sorted(extra)}")
    for key, kind in spec.items():
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise EventError(f"{what}: {key!r} has type {type(data[key]).__name__}")


def room_message_decode(data: object) -> RoomMessage:
    """Validate a received event against the contract and return it."""
    if not isinstance(data, dict):
        raise EventError(f"event is a {type(data).__name__}, not a dict")
    _check_keys(data, _MESSAGE_KEYS, ROOM_MESSAGE)
    if data["type"] != ROOM_MESSAGE:
        raise EventError(f"type {data['type']!r} is not {ROOM_MESSAGE!r}")
    _check_keys(data["sender"], _SENDER_KEYS, "sender")
    return data  # type: ignore[return-value]


def message_public(event: RoomMessage) -> dict[str, Any]:
    """What clients see of a room message (API, WebSocket): the contract less its internal
    ``type`` and ``origin``, with the text under the Channels tutorial's key ``message``."""
    return {
        "id": event["id"],
        "room": event["room"],
        "message": event["text"],
        "sender": event["sender"],
        "ts": event["ts"],
        "client_id": event["client_id"],
    }


_CONTROL_KEYS: dict[str, dict[str, type]] = {
    MESSAGE_DELETED: {"type": str, "room": str, "id": int},
    ROOM_CLOSED: {"type": str, "room": str},
    SCOPE_DISCONNECT: {"type": str, "scope": str},
}


def message_deleted(*, room: str, id: int) -> dict[str, Any]:
    return {"type": MESSAGE_DELETED, "room": room, "id": id}


def room_closed(*, room: str) -> dict[str, Any]:
    return {"type": ROOM_CLOSED, "room": room}


def scope_disconnect(*, scope: str) -> dict[str, Any]:
    return {"type": SCOPE_DISCONNECT, "scope": scope}


def control_decode(data: dict[str, Any]) -> dict[str, Any]:
    """Validate a received control event against the contract and return it."""
    spec = _CONTROL_KEYS.get(data.get("type"))  # type: ignore[arg-type]
    if spec is None:
        raise EventError(f"unknown event type {data.get('type')!r}")
    _check_keys(data, spec, data["type"])
    return data
