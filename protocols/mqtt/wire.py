"""The MQTT wire format, in one place (used by the protocol server and the consumers).

    <prefix>/<room>/in/<device_id>      a device publishes here (the id is in the topic, so a
                                        broker ACL can make each device publish only as itself):
                                        text, or {"message", "name"?, "client_id"?,
                                        "reply_to"?}, or {"type": "edit", "id", "message"},
                                        {"type": "delete", "id"}, {"type": "react", "id",
                                        "emoji"} (edits and deletes of its own messages)
    <prefix>/<room>/out                 the room's log in the public shape (the WebSocket
                                        frames): {"type": "message", id, room, message,
                                        sender, ts, client_id, reply_to, edited_at,
                                        reactions}, and {"type": "edit" | "delete" |
                                        "reaction", id, room, cursor, sender, ...}
    <prefix>/<room>/error/<device_id>   why the gateway refused a device's message
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway import events, files
from gateway.errors import GatewayError
from gateway.names import room_name_is_valid
from gateway.services import MESSAGE_CHANGES


@dataclass(frozen=True)
class InTopic:
    room: str
    device_id: str


def in_filter(prefix: str) -> str:
    return f"{prefix}/+/in/+"


def out_topic(prefix: str, room: str) -> str:
    return f"{prefix}/{room}/out"


def error_topic(prefix: str, room: str, device_id: str) -> str:
    return f"{prefix}/{room}/error/{device_id}"


def in_topic_parse(prefix: str, topic: str) -> InTopic:
    """The room and device of an inbound topic; GatewayError if either is invalid."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[2] != "in":
        raise GatewayError("invalid_topic", f"not a {prefix}/<room>/in/<device> topic")
    room, device_id = parts[1], parts[3]
    if not room_name_is_valid(room):
        raise GatewayError("invalid_room", f"invalid room name {room[:80]!r}")
    if not room_name_is_valid(device_id):  # device ids follow the room-name rule
        raise GatewayError("invalid_device", f"invalid device id {device_id[:80]!r}")
    return InTopic(room=room, device_id=device_id)


@dataclass(frozen=True)
class DevicePayload:
    text: object  # validated by the service, like every protocol's text
    name: str | None = None
    client_id: object = None
    kind: str = "message"  # or one of CHANGES
    id: object = None  # the message a change concerns
    emoji: object = None
    reply_to: object = None
    added: object = None  # a reaction set so (else toggled)


_MESSAGE_FIELDS = {"type", "message", "name", "client_id", "reply_to"}


def payload_decode(payload: bytes) -> DevicePayload:
    """Plain UTF-8 text, or (if it starts with '{') a JSON object: a message (``message``,
    optional ``name``, ``client_id``, ``reply_to``) or a change (``type`` edit, delete or
    react with its fields: ``services.MESSAGE_CHANGES``)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise GatewayError("invalid_utf8", "the payload is not valid UTF-8") from None
    if not text.lstrip().startswith("{"):
        return DevicePayload(text=text)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise GatewayError("invalid_json", "a payload starting with '{' must be JSON") from None
    if not isinstance(data, dict):
        raise GatewayError("not_an_object", "send a JSON object")
    kind = data.get("type", "message")
    if kind != "message" and kind not in MESSAGE_CHANGES:
        raise GatewayError("unknown_type", f"unknown type {str(kind)[:32]!r}")
    needed = MESSAGE_CHANGES.get(kind, ("message",))
    allowed = _MESSAGE_FIELDS if kind == "message" else {"type", "name", "client_id", *needed}
    if kind == "react":
        allowed |= {"added"}
    unknown = data.keys() - allowed
    if unknown:
        raise GatewayError("unknown_field", f"unknown field(s): {sorted(unknown)}")
    for field in needed:
        if field not in data:
            raise GatewayError(f"missing_{field}", f"'{field}' is required")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise GatewayError("invalid_name", "'name' must be a string")
    return DevicePayload(text=data.get("message"), name=name, client_id=data.get("client_id"),
                         kind=kind, id=data.get("id"), emoji=data.get("emoji"),
                         reply_to=data.get("reply_to"), added=data.get("added"))


def out_payload(event: events.RoomMessage) -> bytes:
    """The one MQTT encoding of a room message: its public shape (as the WebSocket frame and
    the history API show it; nothing internal such as the scope it came from)."""
    frame = {"type": "message", **files.message_public(event)}
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def entry_payload(entry: events.RoomEntry) -> bytes | None:
    """The one MQTT encoding of a message's edit, delete or reaction (the WebSocket frame);
    None for the room's own entries (close, reopen), which ``out`` does not carry."""
    public = events.entry_public(entry)
    if public is None:
        return None
    return json.dumps(public, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_payload(code: str, detail: str, client_id: object = None) -> bytes:
    frame: dict[str, object] = {"type": "error", "code": code, "detail": detail}
    if isinstance(client_id, str):
        frame["client_id"] = client_id
    return json.dumps(frame).encode("utf-8")
