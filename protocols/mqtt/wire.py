"""The MQTT wire format, in one place (used by the protocol server and the consumers).

    <prefix>/<room>/in/<device_id>      a device publishes here (the id is in the topic, so a
                                        broker ACL can make each device publish only as itself):
                                        text, or {"message", "name"?, "client_id"?,
                                        "reply_to"?}, or {"type": "edit", "id", "message"},
                                        {"type": "delete", "id"}, {"type": "react", "id",
                                        "emoji"} (edits and deletes of its own messages)
    <prefix>/<room>/in/<device_id>/file
                                        a device posts a file (a camera's snapshot): the
                                        payload is its bytes, one file a message. Its type is
                                        read from the bytes (the MQTT 5 content type is passed
                                        on as a hint); MQTT 5 user properties, all optional:
                                        ``filename`` (or ``name``) its file name (else one is
                                        made), ``message`` a caption, ``client_id`` and
                                        ``reply_to`` as in the JSON above; others are ignored.
                                        Properties reach the gateway only when its client
                                        speaks MQTT 5 (MQTT_PROTOCOL=5, with MQTT_URL's broker;
                                        the embedded broker speaks 3.1.1). A file is one
                                        packet: the embedded broker takes it up to
                                        MQTT_MAX_PACKET_SIZE, and GATEWAY_FILE_* bound what is
                                        kept (refusals: unsupported_type, file_too_large,
                                        empty_file, invalid_image, image_too_large,
                                        unsafe_content, on the error topic)
    <prefix>/<room>/out                 the room's log in the public shape (the WebSocket
                                        frames): {"type": "message", id, room, message,
                                        sender, ts, client_id, reply_to, edited_at,
                                        reactions, attachments}, and {"type": "edit" |
                                        "delete" | "reaction", id, room, cursor, sender, ...};
                                        ``attachments`` lists a message's files, never their
                                        bytes: [{id, name, type, size, width, height, url,
                                        thumbnail_url}], the URLs signed and expiring
                                        (GATEWAY_FILE_URL_TTL), absolute with
                                        GATEWAY_PUBLIC_URL
    <prefix>/<room>/error/<device_id>   why the gateway refused a device's message or file:
                                        {"type": "error", code, detail, client_id?}

Devices as members (gateway/devices.py):

    <prefix>/<room>/status/<device_id>  its status, retained: ``online`` or ``offline`` (its
                                        birth and its will), or a JSON object with
                                        ``status`` and anything else it wants shown; empty:
                                        cleared. Read by every gateway process (never a
                                        shared subscription: retained messages reach each)
    <prefix>/<room>/state/<device_id>   its last state, retained: a JSON object, or text (at
                                        most STATE_MAX bytes); empty: cleared
    <prefix>/<room>/cmd/<device_id>     a command from the room (QoS 1): {"id", "command",
                                        "sender"}; over MQTT 5 also the response topic (the
                                        reply topic below), the correlation data (the id),
                                        a message expiry (its timeout) and the content type
    <prefix>/<room>/cmd/<device_id>/reply
                                        the device's answer: {"id", "reply"}; over MQTT 5 the
                                        correlation data may give the id, the payload then
                                        being the reply's text
    gateway/status/<client id>          the gateway process's own status, retained:
                                        ``online`` once connected, ``offline`` as its will
                                        and when it stops
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import events, files
from gateway.errors import GatewayError
from gateway.names import room_name_is_valid
from gateway.services import MESSAGE_CHANGES, unicode_check

FILE = "file"  # the last level of a device's file topic
STATUS, STATE, CMD, REPLY = "status", "state", "cmd", "reply"
STATE_MAX = 16_384  # bytes of a status or state payload
ONLINE, OFFLINE = "online", "offline"
GATEWAY_STATUS = "gateway/status"  # + /<client id>: the gateway's own


@dataclass(frozen=True)
class InTopic:
    room: str
    device_id: str
    file: bool = False  # <prefix>/<room>/in/<device>/file: the payload is a file


def in_filter(prefix: str) -> str:
    return f"{prefix}/+/in/+"


def in_file_filter(prefix: str) -> str:
    return f"{prefix}/+/in/+/{FILE}"


def out_topic(prefix: str, room: str) -> str:
    return f"{prefix}/{room}/out"


def error_topic(prefix: str, room: str, device_id: str) -> str:
    return f"{prefix}/{room}/error/{device_id}"


@dataclass(frozen=True)
class DeviceTopic:
    kind: str  # STATUS, STATE or REPLY
    room: str
    device_id: str


def status_filter(prefix: str) -> str:
    return f"{prefix}/+/{STATUS}/+"


def state_filter(prefix: str) -> str:
    return f"{prefix}/+/{STATE}/+"


def reply_filter(prefix: str) -> str:
    return f"{prefix}/+/{CMD}/+/{REPLY}"


def cmd_topic(prefix: str, room: str, device_id: str) -> str:
    return f"{prefix}/{room}/{CMD}/{device_id}"


def reply_topic(prefix: str, room: str, device_id: str) -> str:
    return f"{cmd_topic(prefix, room, device_id)}/{REPLY}"


def gateway_status_topic(client_id: str) -> str:
    return f"{GATEWAY_STATUS}/{client_id}"


def device_topic_parse(prefix: str, topic: str) -> DeviceTopic | None:
    """A device's status, state or reply topic; None for any other topic; GatewayError if
    its room or device is invalid."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[2] in (STATUS, STATE):
        kind = parts[2]
    elif len(parts) == 5 and parts[2] == CMD and parts[4] == REPLY:
        kind = REPLY
    else:
        return None
    if parts[0] != prefix:
        return None
    room, device_id = parts[1], parts[3]
    if not room_name_is_valid(room):
        raise GatewayError("invalid_room", f"invalid room name {room[:80]!r}")
    if not room_name_is_valid(device_id):
        raise GatewayError("invalid_device", f"invalid device id {device_id[:80]!r}")
    return DeviceTopic(kind=kind, room=room, device_id=device_id)


def _text(payload: bytes, what: str) -> str:
    if len(payload) > STATE_MAX:
        raise GatewayError(f"{what}_too_large", f"a {what} is at most {STATE_MAX} bytes")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise GatewayError("invalid_utf8", "the payload is not valid UTF-8") from None


_INT_LIMIT = 2**63  # what a database's JSON and the channel layer's msgpack carry


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _storable(value: object, what: str) -> None:
    """Refuse what a database's JSON or msgpack cannot carry: integers past 64 bits, NUL
    characters and lone surrogates (NaN and infinities are refused while parsing)."""
    if isinstance(value, str):
        unicode_check(value, what, code="invalid_json")
    elif isinstance(value, int) and not -_INT_LIMIT <= value < _INT_LIMIT:
        raise GatewayError("invalid_json", f"a number in the {what} is out of range")
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key, what)
            _storable(item, what)
    elif isinstance(value, list):
        for item in value:
            _storable(item, what)


def _object(text: str, what: str) -> dict | None:
    """A JSON object if ``text`` starts with '{' (GatewayError if it is not one, or holds
    what cannot be stored), else None."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise GatewayError("invalid_json", f"a {what} starting with '{{' must be JSON") from None
    if not isinstance(data, dict):
        raise GatewayError("not_an_object", "send a JSON object")
    _storable(data, what)
    return data


def status_decode(payload: bytes) -> tuple[str | None, dict | None]:
    """A status: ``online``/``offline`` as text (any case), or a JSON object whose
    ``status`` is one of them (the object kept as the status's detail); empty: cleared
    (None, None)."""
    text = _text(payload, "status").strip()
    if not text:
        return None, None
    data = _object(text, "status")
    value = data.get("status") if data is not None else text
    if not isinstance(value, str) or value.strip().lower() not in (ONLINE, OFFLINE):
        raise GatewayError("invalid_status", "a status is online or offline (or a JSON "
                           'object {"status": "online" | "offline", ...})')
    return value.strip().lower(), data


def state_decode(payload: bytes) -> object:
    """A state: a JSON object, else text as it came; empty: cleared (None)."""
    text = _text(payload, "state")
    if not text.strip():
        return None
    data = _object(text, "state")
    if data is None:
        unicode_check(text, "state", code="invalid_state")
    return data if data is not None else text


def reply_decode(payload: bytes, correlation: bytes | None) -> tuple[str, object]:
    """A device's answer: the command's id and the reply. ``{"id", "reply"}``; or, with
    MQTT 5 correlation data (the id), the payload is the reply: text, or a JSON object whose
    ``reply`` is it."""
    text = _text(payload, "reply")
    data = _object(text, "reply")
    if data is not None and "id" in data:
        unknown = data.keys() - {"id", "reply"}
        if unknown:
            raise GatewayError("unknown_field", f"unknown field(s): {sorted(unknown)}")
        return data["id"], data.get("reply")
    if correlation:
        try:
            key = correlation.decode("ascii")
        except UnicodeDecodeError:
            raise GatewayError("invalid_id", "the correlation data is not a command id") from None
        return key, (data.get("reply") if data is not None else text)
    raise GatewayError("missing_id", "'id' is required (or MQTT 5 correlation data)")


def command_payload(command: dict) -> bytes:
    """A command as its device is sent it: ``{"id", "command", "sender"}``."""
    return json.dumps(command, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def in_topic_parse(prefix: str, topic: str) -> InTopic:
    """The room and device of an inbound topic (a message's, or a file's); GatewayError if
    either is invalid."""
    parts = topic.split("/")
    file = len(parts) == 5 and parts[4] == FILE
    if not (len(parts) == 4 or file) or parts[0] != prefix or parts[2] != "in":
        raise GatewayError("invalid_topic",
                           f"not a {prefix}/<room>/in/<device>[/{FILE}] topic")
    room, device_id = parts[1], parts[3]
    if not room_name_is_valid(room):
        raise GatewayError("invalid_room", f"invalid room name {room[:80]!r}")
    if not room_name_is_valid(device_id):  # device ids follow the room-name rule
        raise GatewayError("invalid_device", f"invalid device id {device_id[:80]!r}")
    return InTopic(room=room, device_id=device_id, file=file)


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


@dataclass(frozen=True)
class DeviceFile:
    """What a device said of a file it published (its MQTT 5 properties; all optional)."""

    name: str | None = None  # its file name (a hint: files.name_clean makes it safe)
    content_type: str | None = None  # the type it declared (a hint: the bytes decide)
    caption: str | None = None  # the message's text
    client_id: object = None
    reply_to: object = None


UserProperties = tuple[tuple[str, str], ...]
_REPLY_TO = re.compile(r"[0-9]{1,19}")


def correlation_data(properties: object) -> bytes | None:
    """A received message's MQTT 5 correlation data (None over 3.1.1, or without)."""
    value = getattr(properties, "CorrelationData", None)
    return bytes(value) if isinstance(value, bytes | bytearray) else None


def message_properties(properties: object) -> tuple[str | None, UserProperties]:
    """The content type and user properties of a received message's MQTT 5 properties
    (paho's ``Properties``; None, as a 3.1.1 connection gets, has neither)."""
    content_type = getattr(properties, "ContentType", None)
    pairs = getattr(properties, "UserProperty", None) or ()
    user = tuple((str(key), str(value)) for key, value in pairs)
    return (content_type if isinstance(content_type, str) else None), user


def file_decode(content_type: str | None, user_properties: UserProperties) -> DeviceFile:
    """A file's metadata from its properties: ``filename`` (else ``name``), ``message``,
    ``client_id``, ``reply_to`` (decimal digits: a message id; anything else is passed on
    for the service to refuse); a key given twice counts once (its first value), unknown
    keys are ignored (brokers and SDKs add their own)."""
    given: dict[str, str] = {}
    for key, value in user_properties:
        given.setdefault(key, value)
    reply_to: object = given.get("reply_to")
    if isinstance(reply_to, str) and _REPLY_TO.fullmatch(reply_to):
        reply_to = int(reply_to)
    return DeviceFile(name=given.get("filename", given.get("name")),
                      content_type=content_type or None, caption=given.get("message"),
                      client_id=given.get("client_id"), reply_to=reply_to)


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


class PackedProperties(Properties):
    """MQTT 5 properties packed by the gateway, once: paho packs each publish's properties in
    Python, some 30 µs a message, which ``out`` pays at every message."""

    packed: bytes

    def __init__(self, packed: bytes) -> None:
        # paho's own set-up (and its checking __setattr__) is what this skips
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "packed", packed)

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:  # what paho's debug log shows of a publish
        return f"<{len(self.packed)} bytes of properties>"


_CONTENT_TYPE, _USER_PROPERTY = b"\x03", b"\x26"


def _mqtt_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def varint(value: int) -> bytes:
    """MQTT's variable byte integer (a remaining length, a properties' length)."""
    out = bytearray()
    while True:
        value, digit = value >> 7, value & 0x7F
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def out_properties(event: events.LogEntry) -> PackedProperties:
    """The MQTT 5 properties of what ``out`` carries: its content type, and the message's
    id, its sender's id and protocol as user properties."""
    sender = event["sender"]
    body = b"".join([
        _CONTENT_TYPE, _mqtt_string("application/json"),
        *(_USER_PROPERTY + _mqtt_string(key) + _mqtt_string(value) for key, value in (
            ("id", str(event["id"])), ("sender", sender["id"]),
            ("protocol", sender["protocol"]))),
    ])
    return PackedProperties(varint(len(body)) + body)


def error_payload(code: str, detail: str, client_id: object = None) -> bytes:
    frame: dict[str, object] = {"type": "error", "code": code, "detail": detail}
    if isinstance(client_id, str):
        frame["client_id"] = client_id
    return json.dumps(frame).encode("utf-8")
