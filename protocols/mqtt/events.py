"""The events between the MQTT protocol server and its consumers, through a scope's queue.

The server (protocols/mqtt/server.py) opens an ``mqtt`` scope per device and room
(``role: device``, MqttDeviceConsumer) and per room it relays (``role: out``,
MqttRoomConsumer) with protocols/scopes.py. It feeds each scope events (the consumer's ASGI
``receive``); the consumer answers through the scope's ``send`` (the server's ``_send``).
Both ends are in one process and these events never cross the channel layer, so they may
carry bytes. Channels names the handler from ``type``: ``mqtt.message`` -> ``mqtt_message``.

The server sends a scope:

- ``mqtt.connect`` (both roles): the scope's first event; no fields.
- ``mqtt.message`` (device): a message the device published on
  ``<prefix>/<room>/in/<device>``. ``payload``: its bytes as received; ``ack``: the server's
  token for it, to be reported in ``mqtt.handled``; ``received_at``: when it reached the
  gateway (``time.monotonic()``), from which the device's rate limit counts.
- ``mqtt.disconnect`` (both roles): the scope ends (idle, the relay paused or its lease
  lost, shutdown); no fields.

A scope sends the server:

- ``mqtt.handled`` (device): the message ``ack`` was stored (``stored`` true) or refused;
  the server acknowledges it to the broker now and, if stored, wakes the room's relay.
- ``mqtt.publish``, in two shapes:

  - ``MqttErrorReply`` (device): ``topic`` ``<prefix>/<room>/error/<device>``, ``payload``
    the error JSON, ``refused`` the error code (the server counts refusals by it). Dropped
    (counted) when the outbox is half full.
  - ``MqttRoomPublish`` (out): an entry of the room's log, ``room`` and ``id`` (its cursor).
    For a message, ``topic`` ``<prefix>/<room>/out`` and ``payload`` the message JSON; for
    an entry with nothing to publish (a delete), ``topic`` None and ``payload`` b"": it only
    moves the room's recorded position, in order with what is published.

The TypedDicts are final so that mypy can tell the two ``mqtt.publish`` shapes apart by
their keys (``"room" in event``). This module imports only the standard library.
"""

from __future__ import annotations

from typing import Literal, TypedDict, final


@final
class MqttConnect(TypedDict):
    type: Literal["mqtt.connect"]


@final
class MqttMessage(TypedDict):
    type: Literal["mqtt.message"]
    payload: bytes  # as the device published it
    ack: int  # the server's token for it, returned in mqtt.handled
    received_at: float  # time.monotonic() when it reached the gateway


@final
class MqttDisconnect(TypedDict):
    type: Literal["mqtt.disconnect"]


@final
class MqttHandled(TypedDict):
    type: Literal["mqtt.handled"]
    ack: int  # the mqtt.message's token
    stored: bool  # stored (its room's relay has news), else refused


@final
class MqttErrorReply(TypedDict):
    type: Literal["mqtt.publish"]
    topic: str  # <prefix>/<room>/error/<device>
    payload: bytes  # the error JSON
    refused: str  # the error code, counted by the server


@final
class MqttRoomPublish(TypedDict):
    type: Literal["mqtt.publish"]
    topic: str | None  # <prefix>/<room>/out; None: nothing to publish, the position moves
    payload: bytes  # the message JSON (b"" with no topic)
    room: str
    id: int  # the entry's cursor: how far the room got once this is published


MqttPublish = MqttErrorReply | MqttRoomPublish
DeviceReceive = MqttConnect | MqttMessage | MqttDisconnect  # server -> role device
RelayReceive = MqttConnect | MqttDisconnect  # server -> role out
DeviceSend = MqttHandled | MqttErrorReply  # role device -> server
RelaySend = MqttRoomPublish  # role out -> server
ScopeSend = DeviceSend | RelaySend  # what the server's send takes


def mqtt_connect() -> MqttConnect:
    return {"type": "mqtt.connect"}


def mqtt_disconnect() -> MqttDisconnect:
    return {"type": "mqtt.disconnect"}
