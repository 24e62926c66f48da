"""MQTT's relay role: every room's messages on ``<prefix>/<room>/out``, each published once.

The relay (gateway/relay.py) holds the ``mqtt-out`` lease, follows the rooms with news and
keeps each room's position; this role only carries bytes: it encodes each message as the
public message JSON (protocols/mqtt/wire.py), and each edit, delete and reaction as its
public JSON (over MQTT 5 with its content type and the user properties ``id``, ``sender``
and ``protocol``, so a subscriber can route without parsing), and publishes them through
the MQTT server's broker connection (QoS 1, in order, waiting out an outage). The room's
own entries (a close, a reopen) are passed over: the room's position moves past them.

Every room has one target, ``""``: its ``out`` topic. A room new to the role is published
from its first message, also one created while no process held the role for a moment (a
restart, a takeover); only when the role was never held, or not for an hour (MQTT was off),
do the rooms it never published start from the takeover. A room
quiet for ``MQTT_IDLE_TIMEOUT`` is left (no subscription in the hub or Redis) and followed
again at its next entry: at once when it was stored in this process (a device's message),
within the relay's scan (a second) otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db.models import QuerySet

from gateway import events, selectors
from gateway.policy import message_shown
from gateway.relay import Batch, RelayRole
from protocols.mqtt import wire

if TYPE_CHECKING:
    from protocols.mqtt.server import MqttServer

ROLE = "mqtt-out"  # the lease and the positions (RelayCursor.relay)
WIRE_FORMAT = "mqtt-json"
ENTRY_FORMAT = "mqtt-entry-json"


class MqttOut(RelayRole):
    name = ROLE
    protocol = "mqtt"
    every_room = True
    from_start = True
    refresh_targets = False  # one target per room, for good
    batch_size = 100
    save_interval = 1.0  # a takeover publishes at most about a second again (ids tell)

    def __init__(self, server: MqttServer, *, prefix: str, idle_timeout: float) -> None:
        self.server = server
        self.prefix = prefix
        self.idle_timeout = idle_timeout

    def targets(self) -> QuerySet:
        return selectors.relay_targets_rooms(protocol=self.protocol)

    async def deliver(self, batch: Batch) -> None:
        topic = wire.out_topic(self.prefix, batch.room)
        policy = batch.policy
        template = policy.name_format.get(self.protocol)
        if template is None:
            wire_format, encode = WIRE_FORMAT, wire.out_payload
        else:  # the room's name format for MQTT: encoded once per format
            wire_format = f"{WIRE_FORMAT}:{template}"

            def encode(event: events.RoomMessage) -> bytes:
                return wire.out_payload(message_shown(event, policy, target=self.protocol))
        mqtt5 = self.server.mqtt5
        for delivery in batch.entries:
            event = delivery.event
            if event["type"] == events.ROOM_MESSAGE:
                await self.server.publish(topic, delivery.frame(wire_format, encode),
                                          properties=wire.out_properties(event) if mqtt5
                                          else None)
            elif (payload := delivery.frame(ENTRY_FORMAT, wire.entry_payload)) is not None:
                await self.server.publish(topic, payload,
                                          properties=wire.out_properties(event) if mqtt5
                                          else None)
            batch.done(delivery.cursor)  # a batch cut short (a stop) keeps what went out
