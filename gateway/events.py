"""The event contract: what crosses the channel layer for a room.

A room's log has two kinds of entry, each with its cursor (its place in the room's one
sequence): ``room.message`` (its ``id`` is its cursor) and ``room.entry``, every other change
(``kind`` delete, edit, reaction, close, reopen or policy; ``id`` the message it concerns,
``cursor`` its own place).
Both go to the room's group, in cursor order; ``entry_cursor`` reads either's place. Beside the
log, the group also carries live events that are not kept as entries: ``room.presence`` (who
came and went, per process) and ``room.device`` (a device's status or last state changed:
the room keeps only the last, gateway/devices.py).

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
ENTRY_EDIT = "edit"  # message ``id`` has the text ``text`` now
ENTRY_REACTION = "reaction"  # ``sender`` added (or took back) ``emoji`` on message ``id``
ENTRY_POLICY = "policy"  # staff changed the room's policy: ``policy`` from now on
ENTRY_KINDS = (ENTRY_DELETE, ENTRY_CLOSE, ENTRY_REOPEN, ENTRY_EDIT, ENTRY_REACTION,
               ENTRY_POLICY)
# What a message's own entries are (the room's are close and reopen).
MESSAGE_ENTRY_KINDS = (ENTRY_DELETE, ENTRY_EDIT, ENTRY_REACTION)
EXCERPT_LENGTH = 100  # characters of a replied-to message shown with the reply
# Who came and went in a room, from one process (not part of the log: presence is live only).
ROOM_PRESENCE = "room.presence"
# A device's status or last state changed (not part of the log: the room keeps only the last).
ROOM_DEVICE = "room.device"
DEVICE_STATUSES = ("online", "offline", "unknown")  # and None: it never said
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


class ReplyRef(TypedDict):
    """The message a reply answers, as the reply shows it (read when the reply is stored or
    read: a deleted one has an empty excerpt)."""

    id: int
    sender: Sender
    excerpt: str  # its first EXCERPT_LENGTH characters


class Attachment(TypedDict):
    """A file a message carries, as the log keeps it (the bytes are in the storage; clients
    get signed URLs to them: gateway/files.py)."""

    id: str  # its key: URLs and the storage's name are made from it
    name: str  # its file name, sanitised
    type: str  # its content type, read from its bytes
    size: int  # bytes
    width: int | None  # an image's size in pixels (else None)
    height: int | None
    thumbnail: bool  # a thumbnail was made (images)


class RoomMessage(TypedDict):
    type: str
    id: int  # monotonic per room, assigned when the message is stored
    room: str
    text: str  # its current text (after edits)
    sender: Sender
    ts: float  # epoch seconds, when it was stored
    origin: str  # the scope that sent it, so no consumer echoes it back there
    client_id: str | None  # the sender's idempotency key, if it gave one
    reply_to: ReplyRef | None  # the message it answers
    edited_at: float | None  # when its text was last replaced (read from the log: current)
    reactions: dict[str, int]  # senders per emoji (read from the log: current)
    attachments: list[Attachment]  # the files it carries (none: [])


class RoomEntry(TypedDict):
    type: str  # ROOM_ENTRY
    cursor: int  # its place in the room's log, after every entry before it
    room: str
    kind: str  # one of ENTRY_KINDS
    id: int | None  # the message it concerns (delete, edit, reaction), else None
    sender: Sender  # who did it (staff act as the system sender, or as themselves)
    ts: float  # epoch seconds, when it was stored
    origin: str  # the scope it came from ("" for staff and the system)
    client_id: str | None  # the sender's idempotency key, if it gave one
    text: str | None  # edit: the message's text (read from the log: its current one)
    emoji: str | None  # reaction: which
    added: bool | None  # reaction: added, or taken back
    count: int | None  # reaction: how many senders have that emoji on the message now
    policy: dict[str, Any] | None  # policy: the room's policy, public form (gateway/policy.py)


LogEntry = RoomMessage | RoomEntry


class PresenceMember(TypedDict):
    scope: str  # the connection (a member with two tabs has two)
    protocol: str
    id: str
    name: str


class RoomPresence(TypedDict):
    type: str  # ROOM_PRESENCE
    room: str
    process: str  # whose members these are
    seq: int  # that process's presence sequence: its row records the last one it includes
    joined: list[PresenceMember]
    left: list[PresenceMember]


class DeviceState(TypedDict):
    """A device as a member of a room (gateway/devices.py): its status and last state."""

    id: str  # the device id
    room: str
    status: str | None  # one of DEVICE_STATUSES, or None: it never said
    status_at: float | None  # epoch seconds of the status's last change
    detail: dict[str, Any] | None  # a JSON status as the device sent it
    state: Any  # its last state: a JSON object, or text (None: none)
    state_at: float | None
    seen_at: float | None  # when it last published its status or state (live)


class RoomDevice(TypedDict):
    type: str  # ROOM_DEVICE
    room: str
    change: str  # "status" or "state": what changed
    device: DeviceState


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
    "reply_to": (dict, type(None)),
    "edited_at": (float, type(None)),
    "reactions": dict,
    "attachments": list,
}
_ATTACHMENT_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str, "name": str, "type": str, "size": int, "width": (int, type(None)),
    "height": (int, type(None)), "thumbnail": bool,
}
_REPLY_KEYS = {"id": int, "sender": dict, "excerpt": str}


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
    reply_to: ReplyRef | None = None,
    edited_at: float | None = None,
    reactions: dict[str, int] | None = None,
    attachments: list[Attachment] | None = None,
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
        "reply_to": reply_to,
        "edited_at": None if edited_at is None else float(edited_at),
        "reactions": reactions or {},
        "attachments": attachments or [],
    }


def attachment(*, id: str, name: str, type: str, size: int, width: int | None = None,
               height: int | None = None, thumbnail: bool = False) -> Attachment:
    return {"id": id, "name": name, "type": type, "size": size, "width": width,
            "height": height, "thumbnail": thumbnail}


def reply_ref(*, id: int, sender: Sender, text: str) -> ReplyRef:
    """What a reply shows of the message it answers."""
    return {"id": id, "sender": {"protocol": sender["protocol"], "id": sender["id"],
                                 "name": sender["name"]},
            "excerpt": text[:EXCERPT_LENGTH]}


def _check_keys(data: dict[str, Any], spec: dict[str, Any], what: str) -> None:
    missing = spec.keys() - data.keys()
    extra = data.keys() - spec.keys()
    if missing or extra:
        raise EventError(f"{what}: missing {sorted(missing)}, unknown {sorted(extra)}")
    for key, kind in spec.items():
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and not _allows_bool(kind)):
            raise EventError(f"{what}: {key!r} has type {type(value).__name__}")


def _allows_bool(kind: type | tuple[type, ...]) -> bool:
    return bool in kind if isinstance(kind, tuple) else kind is bool


def room_message_decode(data: object) -> RoomMessage:
    """Validate a received event against the contract and return it."""
    if not isinstance(data, dict):
        raise EventError(f"event is a {type(data).__name__}, not a dict")
    _check_keys(data, _MESSAGE_KEYS, ROOM_MESSAGE)
    if data["type"] != ROOM_MESSAGE:
        raise EventError(f"type {data['type']!r} is not {ROOM_MESSAGE!r}")
    _check_keys(data["sender"], _SENDER_KEYS, "sender")
    if data["reply_to"] is not None:
        _check_keys(data["reply_to"], _REPLY_KEYS, "reply_to")
        _check_keys(data["reply_to"]["sender"], _SENDER_KEYS, "reply_to sender")
    for emoji, count in data["reactions"].items():
        if not isinstance(emoji, str) or not isinstance(count, int) or isinstance(count, bool):
            raise EventError("reactions: counts of emoji only")
    for item in data["attachments"]:
        if not isinstance(item, dict):
            raise EventError("attachments: objects only")
        _check_keys(item, _ATTACHMENT_KEYS, "attachment")
    return data  # type: ignore[return-value]


def message_public(event: RoomMessage) -> dict[str, Any]:
    """What clients see of a room message (API, WebSocket, SSE, MQTT): the contract less its
    internal ``type`` and ``origin``, with the text under the Channels tutorial's key
    ``message``, and its current state (reply, edit, reactions). Its ``attachments`` are
    as the log keeps them: gateway/files.py ``message_public`` gives them their URLs."""
    return {
        "id": event["id"],
        "room": event["room"],
        "message": event["text"],
        "sender": event["sender"],
        "ts": event["ts"],
        "client_id": event["client_id"],
        "reply_to": event["reply_to"],
        "edited_at": event["edited_at"],
        "reactions": event["reactions"],
        "attachments": event["attachments"],
    }


def entry_brief(entry: RoomEntry, name: str) -> dict[str, Any]:
    """The short shape of a log entry that clients had before the extended frames, under
    ``name`` (``deleted``, ``closed``, ``reopened``): what it is about and its cursor."""
    return {"type": name, "room": entry["room"], "id": entry["id"], "cursor": entry["cursor"]}


def policy_public(entry: RoomEntry) -> dict[str, Any]:
    """What clients that asked for the extended frames see of a policy entry: the room's
    policy from this cursor on (who may post, which protocols it reaches...)."""
    return {"type": "policy", "room": entry["room"], "cursor": entry["cursor"],
            "ts": entry["ts"], "policy": entry["policy"]}


def entry_public(entry: RoomEntry) -> dict[str, Any] | None:
    """What clients see of a message's log entry (WebSocket ``v=2``, SSE, MQTT ``out``):
    ``{"type": "edit" | "delete" | "reaction", "id", "room", "cursor", "sender", ...}``.
    None for the room's own entries (close, reopen, policy), which each protocol says its own
    way."""
    kind = entry["kind"]
    if kind not in MESSAGE_ENTRY_KINDS:
        return None
    public: dict[str, Any] = {"type": kind, "id": entry["id"], "room": entry["room"],
                              "cursor": entry["cursor"], "sender": entry["sender"]}
    if kind == ENTRY_EDIT:
        public["message"] = entry["text"]
        public["edited_at"] = entry["ts"]
    elif kind == ENTRY_REACTION:
        public.update(emoji=entry["emoji"], added=entry["added"], count=entry["count"])
    else:
        public["ts"] = entry["ts"]
    public["client_id"] = entry["client_id"]
    return public


_ENTRY_KEYS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "cursor": int,
    "room": str,
    "kind": str,
    "id": (int, type(None)),
    "sender": dict,
    "ts": float,
    "origin": str,
    "client_id": (str, type(None)),
    "text": (str, type(None)),
    "emoji": (str, type(None)),
    "added": (bool, type(None)),
    "count": (int, type(None)),
    "policy": (dict, type(None)),
}


def room_entry(
    *, cursor: int, room: str, kind: str, id: int | None, sender: Sender, ts: float,
    origin: str = "", client_id: str | None = None, text: str | None = None,
    emoji: str | None = None, added: bool | None = None, count: int | None = None,
    policy: dict[str, Any] | None = None,
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
        "origin": origin,
        "client_id": client_id,
        "text": text,
        "emoji": emoji,
        "added": added,
        "count": count,
        "policy": policy,
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


_PRESENCE_KEYS: dict[str, type] = {"type": str, "room": str, "process": str, "seq": int,
                                   "joined": list, "left": list}
_MEMBER_KEYS = {"scope": str, "protocol": str, "id": str, "name": str}


def room_presence(
    *, room: str, process: str, seq: int, joined: list[PresenceMember],
    left: list[PresenceMember],
) -> RoomPresence:
    return {"type": ROOM_PRESENCE, "room": room, "process": process, "seq": seq,
            "joined": joined, "left": left}


def room_presence_decode(data: object) -> RoomPresence:
    """Validate a received ``room.presence`` against the contract and return it."""
    if not isinstance(data, dict) or data.get("type") != ROOM_PRESENCE:
        raise EventError("not a room.presence event")
    _check_keys(data, _PRESENCE_KEYS, ROOM_PRESENCE)
    for member in (*data["joined"], *data["left"]):
        if not isinstance(member, dict):
            raise EventError("presence: members are objects")
        _check_keys(member, _MEMBER_KEYS, "presence member")
    return data  # type: ignore[return-value]


_DEVICE_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str, "room": str, "status": (str, type(None)), "status_at": (float, type(None)),
    "detail": (dict, type(None)), "state": (dict, str, type(None)),
    "state_at": (float, type(None)), "seen_at": (float, type(None)),
}


def room_device(*, change: str, device: DeviceState) -> RoomDevice:
    if change not in ("status", "state"):
        raise EventError(f"unknown device change {change!r}")
    return {"type": ROOM_DEVICE, "room": device["room"], "change": change, "device": device}


def room_device_decode(data: object) -> RoomDevice:
    """Validate a received ``room.device`` against the contract and return it."""
    if not isinstance(data, dict) or data.get("type") != ROOM_DEVICE:
        raise EventError("not a room.device event")
    _check_keys(data, {"type": str, "room": str, "change": str, "device": dict}, ROOM_DEVICE)
    _check_keys(data["device"], _DEVICE_KEYS, "device")
    if data["change"] not in ("status", "state") or data["device"]["room"] != data["room"]:
        raise EventError("device: a status or state change of a device of the room")
    if data["device"]["status"] not in (*DEVICE_STATUSES, None):
        raise EventError(f"device: unknown status {data['device']['status']!r}")
    return data  # type: ignore[return-value]


def scope_disconnect(*, scope: str) -> ScopeDisconnect:
    return {"type": SCOPE_DISCONNECT, "scope": scope}


def control_decode(data: dict[str, Any]) -> ScopeDisconnect:
    """Validate a received control event against the contract and return it."""
    if data.get("type") != SCOPE_DISCONNECT:
        raise EventError(f"unknown event type {data.get('type')!r}")
    _check_keys(data, {"type": str, "scope": str}, SCOPE_DISCONNECT)
    return data  # type: ignore[return-value]
