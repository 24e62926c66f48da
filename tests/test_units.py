"""The room-name rule, the event contract and the token bucket."""

from __future__ import annotations

import msgpack
import pytest

from gateway import events
from gateway.names import InvalidRoomName, room_group_name, room_name_is_valid
from gateway.ratelimit import TokenBucket


@pytest.mark.parametrize("name", ["lobby", "a", "Room-1_2.3", "x" * 64, "..", "-"])
def test_valid_room_names(name):
    assert room_name_is_valid(name)
    assert room_group_name(name) == "room." + name


@pytest.mark.parametrize(
    "name", ["", "room\n", "\nroom", "a b", "x" * 65, "café", "a/b", "room;drop", None, 7]
)
def test_invalid_room_names(name):
    assert not room_name_is_valid(name)
    with pytest.raises(InvalidRoomName, match="1 to 64 characters"):
        room_group_name(name)


def test_group_names_fit_the_channel_layer_rules():
    from channels.layers import BaseChannelLayer

    layer = BaseChannelLayer()
    assert layer.require_valid_group_name(room_group_name("x" * 64))


def sample() -> events.RoomMessage:
    return events.room_message(
        id=3, room="lobby", text="hi", ts=1.5, origin="web-1", client_id=None,
        sender=events.sender(protocol="web", id="anon:1", name="a"),
    )


def test_room_message_survives_msgpack_as_channels_redis_sends_it():
    event = sample()
    decoded = events.room_message_decode(msgpack.unpackb(msgpack.packb(event)))
    assert decoded == event
    assert events.room_message_decode(event)["type"] == "room.message"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("origin"),
        lambda e: e.update(extra=1),
        lambda e: e.update(id="3"),
        lambda e: e.update(id=True),
        lambda e: e.update(type="room.other"),
        lambda e: e["sender"].pop("name"),
        lambda e: e["sender"].update(avatar="x"),
    ],
)
def test_decode_rejects_events_outside_the_contract(mutate):
    event = sample()
    mutate(event)
    with pytest.raises(events.EventError):
        events.room_message_decode(event)


def test_unknown_protocol_is_rejected():
    with pytest.raises(events.EventError):
        events.sender(protocol="carrier-pigeon", id="1", name="x")


def test_token_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.allow() and not bucket.allow()
    now[0] += 100
    assert sum(bucket.allow() for _ in range(10)) == 3
