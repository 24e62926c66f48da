"""The events between the MQTT protocol server and its consumers, through a scope's queue.

The server (protocols/mqtt/server.py) opens an ``mqtt`` scope per device and room
(``role: device``, MqttDeviceConsumer) with protocols/scopes.py (rooms reach ``out``
through the relay, protocols/mqtt/relay.py, not through scopes). It feeds each scope
events (the consumer's ASGI ``receive``); the consumer answers through the scope's ``send``
(the server's ``_send``). Both ends are in one process and these events never cross the
channel layer, so they may carry bytes. Channels names the handler from ``type``:
``mqtt.message`` -> ``mqtt_message``.

The server sends a scope:

- ``mqtt.connect``: the scope's first event; no fields.
- ``mqtt.message`` (device): a message the device published on
  ``<prefix>/<room>/in/<device>``. ``payload``: its bytes as received; ``ack``: the server's
  token for it, to be reported in ``mqtt.handled``; ``received_at``: when it reached the
  gateway (``time.monotonic()``), from which the device's rate limit counts.
- ``mqtt.file`` (device): a file the device published on ``<prefix>/<room>/in/<device>/file``:
  ``payload``, ``ack`` and ``received_at`` as ``mqtt.message``; ``content_type``: its MQTT 5
  content type (None without one, as over MQTT 3.1.1); ``user_properties``: its MQTT 5 user
  properties as ``(key, value)`` pairs, in order (none over 3.1.1). A device's messages and
  files reach the same scope, so they are handled in the order they arrived.
- ``mqtt.reply`` (device): the device's answer to a command, published on
  ``<prefix>/<room>/cmd/<device>/reply``: ``payload``, ``ack`` and ``received_at`` as
  ``mqtt.message``; ``correlation_data``: its MQTT 5 correlation data (the command's id when
  the payload is only the reply), None without.
- ``mqtt.disconnect``: the scope ends; ``reason``: ``idle`` (the device went quiet: it
  has left the room) or ``shutdown`` (this process stops: it has not).

A scope sends the server:

- ``mqtt.handled``: the message (or file) ``ack`` was stored (``stored`` true) or refused; the
  server acknowledges it to the broker now.
- ``mqtt.publish`` (``MqttErrorReply``): ``topic`` ``<prefix>/<room>/error/<device>``,
  ``payload`` the error JSON, ``refused`` the error code (the server counts refusals by
  it). Dropped (counted) when the outbox is full.

The TypedDicts are final, so mypy tells the events apart by their ``type``. This module
imports only the standard library.
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
class MqttFile(TypedDict):
    type: Literal["mqtt.file"]
    payload: bytes  # the file, as the device published it
    ack: int  # the server's token for it, returned in mqtt.handled
    received_at: float  # time.monotonic() when it reached the gateway
    content_type: str | None  # its MQTT 5 content type
    user_properties: tuple[tuple[str, str], ...]  # its MQTT 5 user properties, in order


@final
class MqttReply(TypedDict):
    type: Literal["mqtt.reply"]
    payload: bytes  # {"id", "reply"}, or the reply (with correlation_data)
    ack: int  # the server's token for it, returned in mqtt.handled
    received_at: float  # time.monotonic() when it reached the gateway
    correlation_data: bytes | None  # its MQTT 5 correlation data


@final
class MqttDisconnect(TypedDict):
    type: Literal["mqtt.disconnect"]
    reason: Literal["idle", "shutdown"]


@final
class MqttHandled(TypedDict):
    type: Literal["mqtt.handled"]
    ack: int  # the mqtt.message's token
    stored: bool  # stored, else refused


@final
class MqttErrorReply(TypedDict):
    type: Literal["mqtt.publish"]
    topic: str  # <prefix>/<room>/error/<device>
    payload: bytes  # the error JSON
    refused: str  # the error code, counted by the server


DeviceReceive = MqttConnect | MqttMessage | MqttFile | MqttReply | MqttDisconnect  # server -> scope
DeviceSend = MqttHandled | MqttErrorReply  # scope -> server


def mqtt_connect() -> MqttConnect:
    return {"type": "mqtt.connect"}


def mqtt_disconnect(reason: Literal["idle", "shutdown"]) -> MqttDisconnect:
    return {"type": "mqtt.disconnect", "reason": reason}
