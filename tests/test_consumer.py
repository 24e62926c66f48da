"""The WebSocket consumer through WebsocketCommunicator, on the in-memory layer."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User

from consumers.websocket import anonymous_id
from gateway import events
from gateway.models import Message
from gateway.routing import websocket_urlpatterns
from gateway.runtime import get_runtime
from gateway.services import room_message_post

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

app = URLRouter(websocket_urlpatterns)


async def connect(path: str, user=None) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(app, path)
    if user is not None:
        comm.scope["user"] = user
    connected, code = await comm.connect(timeout=5)
    assert connected, f"refused with {code}"
    return comm


async def recv(comm: WebsocketCommunicator) -> dict:
    return json.loads(await comm.receive_from(timeout=5))


async def recv_messages(comm: WebsocketCommunicator, n: int) -> list[dict]:
    frames = [await recv(comm) for _ in range(n)]
    assert all(f["type"] == "message" for f in frames), frames
    return frames


async def stored(room: str) -> list[str]:
    return await database_sync_to_async(
        lambda: list(Message.objects.filter(room__name=room).values_list("text", flat=True))
    )()


async def test_tutorial_client_round_trip():
    alice = await connect("/ws/chat/lobby/?name=alice&uid=alice-browser-1")
    bob = await connect("/ws/chat/lobby/")
    await alice.send_to(text_data=json.dumps({"message": "hi"}))
    for comm in (alice, bob):
        frame = await recv(comm)
        assert frame["message"] == "hi"
        assert frame["id"] == 1
        assert frame["room"] == "lobby"
        assert frame["sender"] == {
            "protocol": "web", "id": anonymous_id("alice-browser-1"), "name": "alice"
        }
        assert isinstance(frame["ts"], float)
    assert await bob.receive_nothing(timeout=0.2)
    await alice.disconnect()
    await bob.disconnect()


async def test_ids_are_monotonic_and_each_message_arrives_once_in_order():
    alice = await connect("/ws/chat/order/")
    bob = await connect("/ws/chat/order/")
    for i in range(15):
        await (alice if i % 2 else bob).send_to(text_data=json.dumps({"message": f"m{i}"}))
    seen = []
    for comm in (alice, bob):
        frames = await recv_messages(comm, 15)
        assert [f["id"] for f in frames] == list(range(1, 16))
        texts = [f["message"] for f in frames]
        # Each sender's messages keep their order; both receivers see one order.
        assert [t for t in texts if int(t[1:]) % 2] == [f"m{i}" for i in range(1, 15, 2)]
        assert [t for t in texts if not int(t[1:]) % 2] == [f"m{i}" for i in range(0, 15, 2)]
        seen.append(texts)
        assert await comm.receive_nothing(timeout=0.2)
    assert seen[0] == seen[1]
    await alice.disconnect()
    await bob.disconnect()


async def test_client_id_gets_an_ack_and_is_stored_once():
    alice = await connect("/ws/chat/idem/?uid=alice-browser-1")
    bob = await connect("/ws/chat/idem/")
    payload = json.dumps({"message": "once", "client_id": "c-1"})
    await alice.send_to(text_data=payload)
    first = [await recv(alice), await recv(alice)]
    ack = next(f for f in first if f["type"] == "ack")
    assert ack == {"type": "ack", "client_id": "c-1", "id": 1, "cursor": 1, "duplicate": False}
    await alice.send_to(text_data=payload)
    assert await recv(alice) == {"type": "ack", "client_id": "c-1", "id": 1, "cursor": 1,
                                 "duplicate": True}
    assert [f["message"] for f in await recv_messages(bob, 1)] == ["once"]
    assert await bob.receive_nothing(timeout=0.3)
    assert await stored("idem") == ["once"]
    await alice.disconnect()
    await bob.disconnect()


async def test_after_replays_history_then_the_live_stream():
    for i in range(5):
        await database_sync_to_async(room_message_post)(
            room="resume", text=f"old{i}",
            sender=events.sender(protocol="web", id="anon:x", name="x"), origin="test",
        )
    late = await connect("/ws/chat/resume/?after=2")
    frames = await recv_messages(late, 3)
    assert [f["id"] for f in frames] == [3, 4, 5]
    await late.send_to(text_data=json.dumps({"message": "new"}))
    assert [(f["id"], f["message"]) for f in await recv_messages(late, 1)] == [(6, "new")]
    assert await late.receive_nothing(timeout=0.2)
    await late.disconnect()


async def test_a_message_the_layer_lost_is_filled_from_history(settings):
    settings.GATEWAY = {**settings.GATEWAY, "RESYNC_INTERVAL": 0.2}
    comm = await connect("/ws/chat/gaps/")
    sender = events.sender(protocol="web", id="anon:x", name="x")

    def store_without_broadcast(text: str) -> None:
        # As if the layer dropped the broadcast (for instance while Redis restarted).
        from django.db import transaction

        with transaction.atomic():
            room_message_post(room="gaps", text=text, sender=sender, origin="test")
            transaction.get_connection().run_on_commit = []

    await database_sync_to_async(store_without_broadcast)("lost-1")
    await comm.send_to(text_data=json.dumps({"message": "after-gap"}))
    frames = await recv_messages(comm, 2)
    assert [(f["id"], f["message"]) for f in frames] == [(1, "lost-1"), (2, "after-gap")]
    # A lost *last* message arrives through the periodic resync.
    await database_sync_to_async(store_without_broadcast)("lost-last")
    assert [(f["id"], f["message"]) for f in await recv_messages(comm, 1)] == [(3, "lost-last")]
    runtime = await get_runtime()
    assert runtime.hub.stats["gap_filled"] == 2
    await comm.disconnect()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ('["a list"]', "not_an_object"),
        ('"a string"', "not_an_object"),
        ("{}", "missing_message"),
        ('{"message": ""}', "empty_message"),
        ('{"message": "   "}', "empty_message"),
        ('{"message": 42}', "invalid_message"),
        ('{"message": "' + "x" * 4097 + '"}', "message_too_long"),
        ('{"type": "shout", "message": "hi"}', "unknown_type"),
        ('{"message": "hi", "client_id": ""}', "invalid_client_id"),
        ("[" * 100_000, "invalid_json"),  # nesting deep enough to exhaust the parser
        ('{"message": "lone \\ud800 surrogate"}', "invalid_message"),
        ('{"message": "nul \\u0000 inside"}', "invalid_message"),
        ('{"message": "hi", "client_id": "a\\u0000"}', "invalid_client_id"),
    ],
)
async def test_bad_input_gets_an_error_frame_and_nothing_else_happens(frame, code):
    bad = await connect("/ws/chat/bad-input/")
    other = await connect("/ws/chat/bad-input/")
    await bad.send_to(text_data=frame)
    error = await recv(bad)
    assert error["type"] == "error" and error["code"] == code and error["detail"]
    assert await other.receive_nothing(timeout=0.2)
    # The same connection keeps working.
    await bad.send_to(text_data=json.dumps({"message": "still here"}))
    assert [f["message"] for f in await recv_messages(other, 1)] == ["still here"]
    assert await stored("bad-input") == ["still here"]
    await bad.disconnect()
    await other.disconnect()


async def test_binary_frame_is_refused_with_an_error():
    comm = await connect("/ws/chat/binary/")
    await comm.send_to(bytes_data=b"\x00\x01")
    assert (await recv(comm))["code"] == "binary_not_supported"
    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    assert await recv(comm) == {"type": "pong"}
    await comm.disconnect()


async def test_flood_beyond_the_rate_limit_is_refused(settings):
    settings.GATEWAY = {**settings.GATEWAY, "RATE_LIMIT_BURST": 3, "RATE_LIMIT_PER_SECOND": 0.1}
    flooder = await connect("/ws/chat/flood/")
    other = await connect("/ws/chat/flood/")
    for i in range(6):
        await flooder.send_to(text_data=json.dumps({"message": f"f{i}"}))
    frames = [await recv(flooder) for _ in range(6)]
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"] * 3
    assert [f["message"] for f in await recv_messages(other, 3)] == ["f0", "f1", "f2"]
    assert await other.receive_nothing(timeout=0.2)
    assert await stored("flood") == ["f0", "f1", "f2"]
    await flooder.disconnect()
    await other.disconnect()


@pytest.mark.parametrize(
    "path",
    [
        "/ws/chat/bad room/",
        "/ws/chat/room%0A/",  # "room\n": matched whole, so refused
        "/ws/chat/" + "a" * 65 + "/",
        "/ws/chat/café/",
        "/ws/chat//",
        "/ws/chat/lobby/?after=-1",
        "/ws/chat/lobby/?after=abc",
    ],
)
async def test_invalid_room_or_query_is_refused_before_accept(path):
    comm = WebsocketCommunicator(app, path)
    connected, code = await comm.connect(timeout=5)
    assert (connected, code) == (False, 4400)


async def test_login_can_be_required(settings):
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}
    from django.contrib.auth.models import AnonymousUser

    comm = WebsocketCommunicator(app, "/ws/chat/members/")
    comm.scope["user"] = AnonymousUser()
    assert await comm.connect(timeout=5) == (False, 4401)
    user = await database_sync_to_async(User.objects.create_user)("carol", password="pw-12345-x")
    carol = await connect("/ws/chat/members/?name=ignored", user=user)
    await carol.send_to(text_data=json.dumps({"message": "hello"}))
    frame = await recv(carol)
    assert frame["sender"] == {"protocol": "web", "id": f"user:{user.pk}", "name": "carol"}
    await carol.disconnect()


async def test_presence_lists_members_by_protocol_and_forgets_them(settings):
    from gateway import selectors

    settings.GATEWAY = {**settings.GATEWAY, "HEARTBEAT_INTERVAL": 0.2}
    alice = await connect("/ws/chat/here/?name=alice&uid=alice-browser-1")
    alice2 = await connect("/ws/chat/here/?name=alice&uid=alice-browser-1")
    bob = await connect("/ws/chat/here/?name=bob&uid=bob-browser-22")
    runtime = await get_runtime()
    await runtime.presence.flush()
    members = await database_sync_to_async(selectors.room_member_list)(room="here")
    assert members == [
        {"protocol": "web", "id": anonymous_id("alice-browser-1"), "name": "alice",
         "connections": 2},
        {"protocol": "web", "id": anonymous_id("bob-browser-22"), "name": "bob", "connections": 1},
    ]
    await alice.disconnect()
    await alice2.disconnect()
    await bob.disconnect()
    await runtime.presence.flush()
    assert await database_sync_to_async(selectors.room_member_list)(room="here") == []


async def test_errors_name_the_client_id_they_refuse(settings):
    # Refused messages spend tokens too: a flood of junk is a flood.
    settings.GATEWAY = {**settings.GATEWAY, "RATE_LIMIT_BURST": 2, "RATE_LIMIT_PER_SECOND": 0.1}
    comm = await connect("/ws/chat/errors/")
    await comm.send_to(text_data=json.dumps({"message": "", "client_id": "c-empty"}))
    assert await recv(comm) == {
        "type": "error", "code": "empty_message", "detail": "'message' is empty",
        "client_id": "c-empty",
    }
    await comm.send_to(text_data=json.dumps({"message": "one", "client_id": "c-1"}))
    assert {f["type"] for f in [await recv(comm), await recv(comm)]} == {"message", "ack"}
    await comm.send_to(text_data=json.dumps({"message": "two", "client_id": "c-2"}))
    frame = await recv(comm)
    assert (frame["code"], frame["client_id"]) == ("rate_limited", "c-2")
    await comm.disconnect()


async def test_anonymous_ids_do_not_reveal_the_browser_secret():
    comm = await connect("/ws/chat/secret/?uid=my-secret-browser-id")
    await comm.send_to(text_data=json.dumps({"message": "hi"}))
    frame = await recv(comm)
    assert frame["sender"]["id"].startswith("anon:")
    assert "my-secret-browser-id" not in json.dumps(frame)
    await comm.disconnect()


async def test_a_blocked_sender_is_refused_on_its_own_protocol_only():
    from gateway.errors import GatewayError
    from gateway.models import Device, SenderBlock

    async def post(sender, text: str) -> None:
        await database_sync_to_async(room_message_post)(
            room="mod", text=text, sender=sender, origin="test"
        )

    await database_sync_to_async(SenderBlock.objects.bulk_create)([
        SenderBlock(protocol="web", kind=SenderBlock.KIND_NAME, value="Spammer"),
        SenderBlock(protocol="telegram", kind=SenderBlock.KIND_ID, value="telegram-66"),
    ])
    await database_sync_to_async(Device.objects.create)(
        device_id="rogue", protocol="mqtt", blocked=True, last_seen="2026-01-01T00:00:00Z"
    )
    # The web name block holds for any web sender of that name (case-insensitive), over
    # the socket too...
    spammer = await connect("/ws/chat/mod/?name=spammer")
    await spammer.send_to(text_data=json.dumps({"message": "buy now"}))
    frame = await recv(spammer)
    assert (frame["type"], frame["code"]) == ("error", "blocked")
    await spammer.disconnect()
    refused = [
        events.sender(protocol="telegram", id="telegram-66", name="mallory"),
        events.sender(protocol="mqtt", id="rogue", name="rogue"),
    ]
    for sender in refused:
        with pytest.raises(GatewayError) as caught:
            await post(sender, "no")
        assert caught.value.code == "blocked"
    # ... and only on its own protocol: a device or a chat with that name, a web sender
    # whose id is the blocked device's, are not blocked.
    allowed = [
        events.sender(protocol="mqtt", id="spammer", name="Spammer"),
        events.sender(protocol="telegram", id="telegram-67", name="spammer"),
        events.sender(protocol="web", id="rogue", name="rogue"),
    ]
    for sender in allowed:
        await post(sender, f"from {sender['protocol']}")
    assert await stored("mod") == ["from mqtt", "from telegram", "from web"]
