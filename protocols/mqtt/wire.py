"""The MQTT wire format, in one place (used by the protocol server and the consumers).

    <prefix>/<room>/in/<device_id>      a device publishes here (the id is in the topic, so a
                                        broker ACL can make each device publish only as itself)
    <prefix>/<room>/out                 every message of the room, in the public shape (the
                                        WebSocket message frame: type, id, room, message,
                                        sender, ts, client_id)
    <prefix>/<room>/error/<device_id>   why the gateway refused a device's message
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway import events
from gateway.errors import GatewayError
from gateway.names import room_name_is_valid


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


def payload_decode(payload: bytes) -> DevicePayload:
    """Plain UTF-8 text, or (if it starts with '{') a JSON object with ``message`` and
    optional ``name`` and ``client_id``."""
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
    unknown = data.keys() - {"message", "name", "client_id"}
    if unknown:
        raise GatewayError("unknown_field", f"unknown field(s): {sorted(unknown)}")
    if "message" not in data:
        raise GatewayError("missing_message", "'message' is required")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        raise GatewayError("invalid_name", "'name' must be a string")
    return DevicePayload(text=data["message"], name=name, client_id=data.get("client_id"))


def out_payload(event: events.RoomMessage) -> bytes:
    """The one MQTT encoding of a room message: its public shape (as the WebSocket frame and
    the history API show it; nothing internal such as the scope it came from)."""
    frame = {"type": "message", **events.message_public(event)}
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_payload(code: str, detail: str, client_id: object = None) -> bytes:
    frame: dict[str, object] = {"type": "error", "code": code, "detail": detail}
    if isinstance(client_id, str):
        frame["client_id"] = client_id
    return json.dumps(frame).encode("utf-8")
