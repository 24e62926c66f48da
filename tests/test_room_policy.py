"""Who may create rooms, how many, how fast; and whose names are reserved."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from django.contrib.auth import get_user_model

from gateway import events, services
from gateway.errors import GatewayError
from gateway.models import Room
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_limits(monkeypatch):
    """Each test starts with empty per-creator buckets and no cached staff names."""
    monkeypatch.setattr(services, "_room_creations", services._CreationLimits())
    monkeypatch.setattr(services, "_reserved", (0.0, frozenset()))


def post(room: str, sender_id: str = "dev1", protocol: str = "mqtt", name: str = "dev1"):
    return services.room_message_post(
        room=room, text="hi", origin="test", sender=events.sender(
            protocol=protocol, id=sender_id, name=name),
    )


def test_a_sender_creates_rooms_at_the_configured_pace(settings):
    settings.GATEWAY = {**settings.GATEWAY, "ROOM_CREATE_PER_MINUTE": 3.0}
    for n in range(3):
        post(f"r{n}")
    with pytest.raises(GatewayError) as refused:
        post("r3")
    assert refused.value.code == "rate_limited"
    assert "retry in" in refused.value.detail
    # Posting to rooms that exist is not limited by it; other senders have their own pace.
    post("r0")
    post("r3", sender_id="dev2", name="dev2")
    assert sorted(Room.objects.values_list("name", flat=True)) == ["r0", "r1", "r2", "r3"]


def test_the_number_of_rooms_is_capped(settings):
    settings.GATEWAY = {**settings.GATEWAY, "MAX_ROOMS": 2}
    post("a")
    post("b", sender_id="dev2")
    with pytest.raises(GatewayError) as refused:
        post("c", sender_id="dev3")
    assert refused.value.code == "too_many_rooms"
    # Staff (the system) is not held by the cap or the pace.
    post("c", sender_id="system", protocol="system", name="system")
    assert Room.objects.count() == 3


def test_rooms_created_by_staff_only(settings):
    settings.GATEWAY = {**settings.GATEWAY, "ROOMS_STAFF_ONLY": True}
    with pytest.raises(GatewayError) as refused:
        post("new")
    assert refused.value.code == "room_not_found"
    staff = events.sender(protocol="web", id="user:1", name="root")
    assert services.room_enter(room="new", sender=staff, staff=True) == (False, staff)
    post("new")  # once staff made it, anyone may post
    visitor = events.sender(protocol="web", id="anon:x", name="x")
    with pytest.raises(GatewayError):
        services.room_enter(room="other", sender=visitor, staff=False)
    assert services.room_enter(room="new", sender=visitor, staff=False) == (False, visitor)


def test_listening_to_a_room_does_not_create_it():
    assert services.room_open(room="quiet") == 0
    assert not Room.objects.filter(name="quiet").exists()
    post("quiet")
    assert services.room_open(room="quiet") == 1


def test_staff_names_are_reserved_for_verified_senders():
    get_user_model().objects.create_user("Admin", password="x", is_staff=True)
    get_user_model().objects.create_user("bob", password="x")
    event, _ = post("lobby", sender_id="anon:1", protocol="web", name="admin")
    assert event["sender"]["name"] == "admin (unverified)"
    event, _ = post("lobby", sender_id="dev9", protocol="mqtt", name="ADMIN")
    assert event["sender"]["name"] == "ADMIN (unverified)"
    event, _ = post("lobby", sender_id="anon:2", protocol="web", name="system")
    assert event["sender"]["name"] == "system (unverified)"
    # The account itself, and names nobody on staff has, are left alone.
    event, _ = post("lobby", sender_id="user:1", protocol="web", name="Admin")
    assert event["sender"]["name"] == "Admin"
    event, _ = post("lobby", sender_id="anon:3", protocol="web", name="bob")
    assert event["sender"]["name"] == "bob"
    # Presence shows the same name as the messages.
    _, shown = services.room_enter(
        room="lobby", sender=events.sender(protocol="web", id="anon:1", name="admin"),
        staff=False)
    assert shown["name"] == "admin (unverified)"


# --- through a real gateway and real sockets ----------------------------------------------


async def closed_with(gw, path: str) -> int:
    """The close code a socket to ``path`` ends with, without sending anything."""
    async with websockets.connect(gw.ws(path), origin=gw.origin, open_timeout=10) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        return ws.close_code


@pytest.mark.slow
async def test_sockets_follow_the_room_policy(gateway_factory):
    gw = gateway_factory(env={"GATEWAY_ROOM_CREATE_PER_MINUTE": "2"}).start()
    uid = "uid=browser-secret-1"
    for room in ("one", "two"):
        async with websockets.connect(gw.ws(f"/ws/chat/{room}/?{uid}"), origin=gw.origin):
            pass
    # The third new room from the same address within the minute: told why, after accept;
    # a new anonymous id does not help (anyone may send any uid).
    assert await closed_with(gw, f"/ws/chat/three/?{uid}") == 4429
    assert await closed_with(gw, "/ws/chat/three/?uid=browser-secret-2") == 4429
    assert "too many new rooms" in gw.log()
    # Existing rooms stay open to it; a logged-in account has its own allowance.
    async with websockets.connect(gw.ws(f"/ws/chat/one/?{uid}"), origin=gw.origin) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"type": "pong"}
    gw.create_user("ann", "a-long-pass-phrase-1", staff=False)
    cookie = gw.login("ann", "a-long-pass-phrase-1")
    async with websockets.connect(gw.ws("/ws/chat/three/"), origin=gw.origin,
                                  additional_headers={"Cookie": cookie}):
        pass
    rooms = {room["name"] for room in gw.get_json("/api/rooms/")["rooms"]}
    assert rooms == {"one", "two", "three"}


@pytest.mark.slow
async def test_only_staff_open_rooms_when_so_configured(gateway_factory):
    gw = gateway_factory(env={"GATEWAY_ROOMS_STAFF_ONLY": "1"}).start()
    gw.create_user("root", "a-long-pass-phrase-1", staff=True)
    assert await closed_with(gw, "/ws/chat/new/") == 4404
    cookie = gw.login("root", "a-long-pass-phrase-1")
    async with websockets.connect(gw.ws("/ws/chat/new/"), origin=gw.origin,
                                  additional_headers={"Cookie": cookie}):
        pass
    # Now that it exists, anyone joins; an anonymous "root" is shown as unverified.
    async with websockets.connect(gw.ws("/ws/chat/new/?name=ROOT"), origin=gw.origin) as ws:
        await ws.send(json.dumps({"message": "hi"}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert frame["sender"]["name"] == "ROOT (unverified)"

        def shown() -> list[str]:
            return [m["name"] for m in gw.get_json("/api/rooms/new/")["members"]]

        await wait_until(lambda: shown() == ["ROOT (unverified)"], 15, "presence")
