"""The event contract: what crosses the channel layer for a room.

A room's log has two kinds of entry, each with its cursor (its place in the room's one
sequence): ``room.message`` (its ``id`` is its cursor) and ``room.entry``, every other change
(``kind`` delete, close or reopen; ``id`` the message it concerns, ``cursor`` its own place).
Both go to the room's group, in cursor order; ``entry_cursor`` reads either's place.

Every consumer and protocol server builds and reads room events only through this module.
Events carry primitives only (channels-redis serialises them with msgpack): times are epoch
floats, the sender is a plain dict. Decoding rejects unknown or missing keys. This module
imports only the standard library.
"""

from __future__ import annotations

from typing import Any, TypedDict

ROOM_MESSAGE = "room.message"
ROOM_ENTRY = "room.entry"  # a log entry that is not a message (ENTRY_KINDS)
ENTRY_DELETE = "delete"  # staff deleted message ``id``: gone from history and pages
ENTRY_CLOSE = "close"  # staff closed the room: its members are disconnected
ENTRY_REOPEN = "reopen"  # staff reopened it
ENTRY_KINDS = (ENTRY_DELETE, ENTRY_CLOSE, ENTRY_REOPEN)
# Control events, on the group every process joins (CONTROL_GROUP): not part of any log.
SCOPE_DISCONNECT = "scope.disconnect"  # {"scope"}: that connection is closed
CONTROL_GROUP = "gateway.control"

# The sender protocols: "system" (staff, the gateway itself) and those of the configured
# protocol adapters, which gateway/adapters.py registers when it loads them.
PROTOCOLS: set[str] = {"system"}


def protocols_register(*names: str) -> None:
    PROTOCOLS.update(names)


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


class RoomEntry(TypedDict):
    type: str  # ROOM_ENTRY
    cursor: int  # its place in the room's log, after every entry before it
    room: str
    kind: str  # one of ENTRY_KINDS
    id: int | None  # the message it concerns (delete), else None
    sender: Sender  # who did it (staff act as the system sender)
    ts: float  # epoch seconds, when it was stored


LogEntry = RoomMessage | RoomEntry


class ScopeDisconnect(TypedDict):
    type: str  # SCOPE_DISCONNECT
    scope: str


def entry_cursor(entry: LogEntry) -> int:
    """An entry's place in its room's log (a message's id is its cursor)."""
    if entry["type"] == ROOM_MESSAGE:
        return entry["id"]  # type: ignore[return-value]
    return entry["cursor"]  # type: ignore[typeddict-item]


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


_ENTRY_KEYS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "cursor": int,
    "room": str,
    "kind": str,
    "id": (int, type(None)),
    "sender": dict,
    "ts": float,
}


def room_entry(
    *, cursor: int, room: str, kind: str, id: int | None, sender: Sender, ts: float
) -> RoomEntry:
    """Build a ``room.entry`` event."""
    if kind not in ENTRY_KINDS:
        raise EventError(f"unknown entry kind {kind!r}")
    return {
        "type": ROOM_ENTRY,
        "cursor": cursor,
        "room": room,
        "kind": kind,
        "id": id,
        "sender": {"protocol": sender["protocol"], "id": sender["id"], "name": sender["name"]},
        "ts": float(ts),
    }


def room_entry_decode(data: object) -> RoomEntry:
    """Validate a received ``room.entry`` against the contract and return it."""
    if not isinstance(data, dict):
        raise EventError(f"event is a {type(data).__name__}, not a dict")
    _check_keys(data, _ENTRY_KEYS, ROOM_ENTRY)
    if data["type"] != ROOM_ENTRY or data["kind"] not in ENTRY_KINDS:
        raise EventError(f"not a room entry: {data['type']!r} {data['kind']!r}")
    _check_keys(data["sender"], _SENDER_KEYS, "sender")
    return data  # type: ignore[return-value]


def log_entry_decode(data: object) -> LogEntry:
    """Either kind of log entry, validated."""
    if isinstance(data, dict) and data.get("type") == ROOM_ENTRY:
        return room_entry_decode(data)
    return room_message_decode(data)


def scope_disconnect(*, scope: str) -> ScopeDisconnect:
    return {"type": SCOPE_DISCONNECT, "scope": scope}


def control_decode(data: dict[str, Any]) -> ScopeDisconnect:
    """Validate a received control event against the contract and return it."""
    if data.get("type") != SCOPE_DISCONNECT:
        raise EventError(f"unknown event type {data.get('type')!r}")
    _check_keys(data, {"type": str, "scope": str}, SCOPE_DISCONNECT)
    return data  # type: ignore[return-value]
