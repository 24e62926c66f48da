"""A room's policy in the services and the relay: who may post (every path that takes a
cursor: alone, in a batch, changes), the room's rate limit shared through its row (on a fake
clock), the policy entry in the log, a relay target cut exactly where the room stops
reaching its protocol and placed afresh when it reaches it again, and name formats."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from gateway import events, policy, selectors, services
from gateway.errors import GatewayError, RateLimited
from gateway.models import RelayCursor, Room
from gateway.policy import Policy, policy_update
from gateway.routing import websocket_urlpatterns
from gateway.services import Post
from tests.test_relay import FakeRole, apositions, apost, started, until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

WEB = events.sender(protocol="web", id="anon:alice", name="alice")
DEVICE = events.sender(protocol="mqtt", id="sensor-1", name="sensor-1")
STAFF = events.sender(protocol="system", id="staff:1", name="boss")
KNOWN = {"web", "api", "mqtt", "telegram", "system"}
TARGETS = {"web", "sse", "mqtt", "telegram", "webhook"}


def set_policy(room: str, **fields) -> events.RoomEntry | None:
    return services.room_policy_set(room=room, policy=Policy(**fields))[1]


def outcome(result) -> object:
    return result.code if isinstance(result, GatewayError) else (result[0]["id"], result[1])


class FakeTime:
    """``services.time`` on a clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


# --- who may post -------------------------------------------------------------------------------


def test_a_protocol_that_may_not_post_is_refused_alone_and_staff_never():
    set_policy("ro", post=frozenset({"web"}))
    with pytest.raises(GatewayError) as refused:
        services.room_message_post(room="ro", text="x", sender=DEVICE, origin="d")
    assert refused.value.code == "read_only" and "mqtt" in refused.value.detail
    assert services.room_message_post(room="ro", text="ok", sender=WEB, origin="w")[1]
    assert services.room_message_post(room="ro", text="staff", sender=STAFF, origin="")[1]
    assert [e["text"] for e in selectors.room_messages_last(room="ro", limit=10)] == [
        "ok", "staff"]


def test_a_batch_admits_per_message_in_restricted_rooms_and_takes_the_others_at_once():
    set_policy("ro", post=frozenset({"web"}))
    results = services.room_messages_post(posts=[
        Post(room="open", text="o1", sender=DEVICE, origin="d"),
        Post(room="ro", text="r1", sender=DEVICE, origin="d"),
        Post(room="ro", text="r2", sender=WEB, origin="w"),
        Post(room="open", text="o2", sender=WEB, origin="w"),
        Post(room="ro", text="r3", sender=STAFF, origin=""),
    ])
    # "ro" has its policy entry at cursor 1.
    assert [outcome(r) for r in results] == [(1, True), "read_only", (2, True), (2, True),
                                             (3, True)]
    assert Room.objects.get(name="ro").last_seq == 3


def test_changes_by_a_protocol_that_may_not_post_are_refused():
    event, _ = services.room_message_post(room="ro", text="mine", sender=DEVICE, origin="d")
    set_policy("ro", post=frozenset({"web"}))
    for kind, fields in (("edit", {"text": "new"}), ("delete", {}), ("react", {"emoji": "👍"})):
        with pytest.raises(GatewayError) as refused:
            services.message_change(kind, room="ro", id=event["id"], sender=DEVICE,
                                    origin="d", staff=False, **fields)
        assert refused.value.code == "read_only"
    entry, created = services.message_change("react", room="ro", id=event["id"], sender=WEB,
                                             origin="w", staff=False, emoji="👍")
    assert created and entry is not None and entry["count"] == 1
    assert services.message_change("delete", room="ro", id=event["id"], sender=STAFF,
                                   origin="", staff=True)[1]


# --- the room's rate limit ---------------------------------------------------------------------


def test_the_rate_limit_refuses_past_the_burst_and_refills(monkeypatch):
    clock = FakeTime(1_800_000_000.0)
    monkeypatch.setattr(services, "time", clock)
    set_policy("slow", rate_per_second=0.5, rate_burst=2)
    assert services.room_message_post(room="slow", text="1", sender=WEB, origin="w")[1]
    assert services.room_message_post(room="slow", text="2", sender=WEB, origin="w")[1]
    with pytest.raises(RateLimited) as refused:
        services.room_message_post(room="slow", text="3", sender=DEVICE, origin="d")
    assert refused.value.code == "rate_limited" and refused.value.retry_after == pytest.approx(2)
    assert services.room_message_post(room="slow", text="staff", sender=STAFF, origin="")[1]
    clock.now += 2.0
    assert services.room_message_post(room="slow", text="3", sender=WEB, origin="w")[1]
    results = services.room_messages_post(posts=[
        Post(room="slow", text=str(i), sender=WEB, origin="w") for i in range(3)])
    assert [outcome(r) for r in results] == ["rate_limited"] * 3
    clock.now += 10.0  # refills to the burst, no more
    results = services.room_messages_post(posts=[
        Post(room="slow", text=str(i), sender=WEB, origin="w") for i in range(3)]
        + [Post(room="other", text="x", sender=WEB, origin="w")])
    assert [outcome(r) for r in results] == [(6, True), (7, True), "rate_limited", (1, True)]


def test_a_new_rate_limit_starts_with_a_full_bucket(monkeypatch):
    monkeypatch.setattr(services, "time", FakeTime(1_800_000_000.0))
    set_policy("slow", rate_per_second=1.0, rate_burst=3)
    results = services.room_messages_post(posts=[
        Post(room="slow", text=str(i), sender=WEB, origin="w") for i in range(4)])
    assert [outcome(r) for r in results] == [(2, True), (3, True), (4, True), "rate_limited"]
    set_policy("slow", rate_per_second=1.0, rate_burst=3, notices=True)  # same limit: kept
    with pytest.raises(RateLimited):
        services.room_message_post(room="slow", text="x", sender=WEB, origin="w")


# --- the policy entry --------------------------------------------------------------------------


def test_a_change_is_an_entry_of_the_log_and_the_same_policy_again_is_none(room_events):
    entry = set_policy("ops", post=frozenset({"web", "api"}), notices=True)
    assert entry is not None and entry["kind"] == "policy"
    assert entry["policy"]["post"] == ["api", "web"] and entry["policy"]["notices"] is True
    assert set_policy("ops", post=frozenset({"web", "api"}), notices=True) is None
    assert [e["kind"] for e in room_events] == ["policy"]
    log, _ = selectors.room_log_after(room="ops", after=0, limit=10)
    assert log == [entry]
    assert events.policy_public(entry) == {"type": "policy", "room": "ops", "cursor": 1,
                                           "ts": entry["ts"], "policy": entry["policy"]}
    assert services.room_position(room="ops")[2] == Policy(post=frozenset({"web", "api"}),
                                                           notices=True)


def test_policy_update_keeps_what_it_is_not_given():
    base = Policy(post=frozenset({"web"}), rate_per_second=2.0, rate_burst=4,
                  retention_days=7, retention_messages=100)
    changed = policy_update(base, {"retention": {"messages": None}, "receive": ["web"]},
                            senders=KNOWN, targets=TARGETS)
    assert changed == Policy(post=frozenset({"web"}), receive=frozenset({"web"}),
                             rate_per_second=2.0, rate_burst=4, retention_days=7)
    assert policy_update(base, {"rate_limit": None}, senders=KNOWN,
                         targets=TARGETS).rate_per_second is None
    assert policy_update(base, {"post": None}, senders=KNOWN, targets=TARGETS).post is None


def test_name_formats_fill_their_placeholders_only_for_other_protocols():
    shown = Policy(name_format={"telegram": "[{protocol}] {name} in {room} ({id})"})
    assert shown.name_shown(DEVICE, target="telegram", room="lab") == (
        "[mqtt] sensor-1 in lab (sensor-1)")
    tg = events.sender(protocol="telegram", id="telegram-1", name="tom")
    assert shown.name_shown(tg, target="telegram", room="lab") == "tom"
    assert shown.name_shown(DEVICE, target="web", room="lab") == "sensor-1"
    hostile = Policy(name_format={"web": "{name}{{name}}"})
    assert policy.name_render("{nope}", sender=DEVICE, room="r") == "{nope}"
    assert hostile.name_shown(DEVICE, target="web", room="r") == "sensor-1{sensor-1}"


# --- the relay stops where the room stops reaching it ---------------------------------------------


async def test_a_relay_target_stops_at_the_policy_entry_and_goes_on_from_there_when_it_reaches_it_again(  # noqa: E501
    monkeypatch,
):
    role = FakeRole()  # protocol "web", every room: as if the web adapter had this role
    monkeypatch.setattr(services, "adapters_relay_roles", lambda: {"web": ("fake",)})
    r = await started(role)
    await apost("lab", "before")
    await until(lambda: role.delivered("lab") == [1])
    await database_sync_to_async(set_policy)("lab", receive=frozenset({"mqtt"}))  # cursor 2
    await apost("lab", "while not received")  # 3
    await asyncio.sleep(0.4)
    assert role.delivered("lab") == [1]
    await database_sync_to_async(set_policy)("lab")  # reaches every protocol again: 4
    assert (await apositions("fake"))[("lab", "")] == 4
    await apost("lab", "after")  # 5
    await until(lambda: role.delivered("lab") == [1, 5])
    await asyncio.sleep(0.3)
    assert role.delivered("lab") == [1, 5]
    await r.stop()
    assert await database_sync_to_async(RelayCursor.objects.get)(relay="fake", room="lab")


def test_the_roles_of_a_protocol_reached_again_are_placed_at_the_entry():
    services.room_message_post(room="lab", text="x", sender=WEB, origin="w")
    services.relay_target_place(relay="telegram", room="lab", target="42", position=1)
    services.relay_target_place(relay="mqtt-out", room="lab", target="", position=0)
    set_policy("lab", receive=frozenset({"web"}))
    services.room_message_post(room="lab", text="y", sender=WEB, origin="w")
    entry = set_policy("lab", receive=frozenset({"web", "telegram"}))
    assert entry is not None
    rows = dict(RelayCursor.objects.filter(room="lab").values_list("relay", "last_seq"))
    assert rows == {"telegram": entry["cursor"], "mqtt-out": 0}


# --- on open sockets ---------------------------------------------------------------------------

app = URLRouter(websocket_urlpatterns)


async def open_socket(path: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(app, path)
    connected, code = await comm.connect(timeout=5)
    assert connected, code
    return comm


async def frames(comm: WebsocketCommunicator, kind: str, n: int = 1) -> list[dict]:
    found = []
    while len(found) < n:
        frame = json.loads(await comm.receive_from(timeout=5))
        if frame["type"] == kind:
            found.append(frame)
    return found


async def closed_with(comm: WebsocketCommunicator) -> int:
    """The close code the socket gets, past the frames before it."""
    while (output := await comm.receive_output(timeout=5))["type"] != "websocket.close":
        pass
    return output["code"]


async def test_a_page_is_told_read_only_and_sees_the_policy_change():
    page = await open_socket("/ws/chat/lab/?v=2&name=alice")
    tutorial = await open_socket("/ws/chat/lab/")
    await database_sync_to_async(set_policy)("lab", post=frozenset({"mqtt"}))
    (change,) = await frames(page, "policy")
    assert change["policy"]["post"] == ["mqtt"] and change["cursor"] == 1
    await page.send_to(text_data=json.dumps({"message": "may I?", "client_id": "c1"}))
    (refused,) = await frames(page, "error")
    assert (refused["code"], refused["client_id"]) == ("read_only", "c1")
    assert await tutorial.receive_nothing(timeout=0.3)  # tutorial clients see no policy
    await page.disconnect()
    await tutorial.disconnect()


async def test_a_room_that_stops_reaching_the_web_closes_its_sockets_and_refuses_new_ones():
    page = await open_socket("/ws/chat/lab/?v=2")
    await database_sync_to_async(set_policy)("lab", receive=frozenset({"mqtt", "telegram"}))
    assert await closed_with(page) == 4403
    late = await open_socket("/ws/chat/lab/")
    assert await closed_with(late) == 4403


async def test_a_name_format_for_the_web_shows_other_protocols_senders_its_way():
    await database_sync_to_async(set_policy)("lab", name_format={"web": "{name} [{protocol}]"})
    page = await open_socket("/ws/chat/lab/?name=alice")
    await database_sync_to_async(services.room_message_post)(
        room="lab", text="21.5", sender=DEVICE, origin="d")
    await page.send_to(text_data=json.dumps({"message": "thanks"}))
    device_said, page_said = await frames(page, "message", 2)
    assert device_said["sender"] == {"protocol": "mqtt", "id": "sensor-1",
                                     "name": "sensor-1 [mqtt]"}
    assert page_said["sender"]["name"] == "alice"  # its own protocol: as it is
    history = await database_sync_to_async(selectors.room_history)(room="lab", limit=5)
    assert history[0]["sender"]["name"] == "sensor-1"  # stored as sent
    await page.disconnect()


# --- notices: chats and devices that come and go -----------------------------------------------


def texts(room: str) -> list[str]:
    return [e["text"] for e in selectors.room_messages_last(room=room, limit=50)]


def test_notices_are_off_by_default_and_said_once_per_change():
    member = events.sender(protocol="mqtt", id="sensor-1", name="sensor-1")
    services.room_get_or_create(room="lab")
    assert services.room_member_notice(room="lab", member=member, joined=True, origin="o") is None
    set_policy("lab", notices=True)
    joined = services.room_member_notice(room="lab", member=member, joined=True, origin="o")
    assert joined is not None and joined["sender"] == services.SYSTEM_SENDER
    assert joined["origin"] == "o" and joined["text"] == "device sensor-1 joined the room"
    # Another process seeing the same arrival, or a repeat: nothing more.
    assert services.room_member_notice(room="lab", member=member, joined=True, origin="x") is None
    assert services.room_member_notice(room="lab", member=member, joined=False, origin="o")
    assert services.room_member_notice(room="lab", member=member, joined=False, origin="o") is None
    assert services.room_member_notice(room="lab", member=member, joined=True, origin="o")
    assert texts("lab") == ["device sensor-1 joined the room", "device sensor-1 left the room",
                            "device sensor-1 joined the room"]


def test_a_member_never_announced_as_come_is_not_announced_as_gone():
    set_policy("lab", notices=True)
    member = events.sender(protocol="mqtt", id="sensor-9", name="sensor-9")
    assert services.room_member_notice(room="lab", member=member, joined=False, origin="o") is None


def test_two_processes_announcing_the_same_arrival_store_one_notice(monkeypatch):
    set_policy("lab", notices=True)
    member = events.sender(protocol="mqtt", id="sensor-1", name="sensor-1")
    # Both read that nothing was said yet, then both post: the client_id keeps one.
    real = services.Message.objects.filter

    def not_yet(*args, **kwargs):  # the notices said before, as a second process read them
        return real(pk=-1) if "client_id__startswith" in kwargs else real(*args, **kwargs)

    monkeypatch.setattr(services.Message.objects, "filter", not_yet)
    first = services.room_member_notice(room="lab", member=member, joined=True, origin="a")
    second = services.room_member_notice(room="lab", member=member, joined=True, origin="b")
    monkeypatch.undo()
    assert first is not None and second is None
    assert texts("lab") == ["device sensor-1 joined the room"]


async def test_a_device_is_announced_when_it_first_speaks_and_when_it_goes_quiet():
    from channels.testing import ApplicationCommunicator

    from protocols.mqtt.consumers import MqttDeviceConsumer

    await database_sync_to_async(set_policy)("lab", notices=True)
    comm = ApplicationCommunicator(MqttDeviceConsumer.as_asgi(), {
        "type": "mqtt", "role": "device", "room": "lab", "device_id": "sensor-1",
        "prefix": "rooms"})
    await comm.send_input({"type": "mqtt.connect"})
    await comm.send_input({"type": "mqtt.message", "payload": b"21.5", "ack": 1,
                           "received_at": 0.0})
    assert await comm.receive_output(timeout=5) == {"type": "mqtt.handled", "ack": 1,
                                                    "stored": True}
    await comm.send_input({"type": "mqtt.disconnect", "reason": "idle"})
    await comm.wait(timeout=5)
    assert await database_sync_to_async(texts)("lab") == [
        "device sensor-1 joined the room", "21.5", "device sensor-1 left the room"]


def test_a_telegram_chat_is_announced_and_joins_only_rooms_open_to_it():
    from bots import conversation
    from bots.conversation import Incoming
    from protocols.telegram import render

    def say(text: str, n: int) -> str:
        incoming = Incoming(platform="telegram", chat_id="7", chat_kind="group",
                            chat_title="Team", user_id="7", user_name="Tom", text=text,
                            update_id=n)
        replies = conversation.handle(incoming, bot_username="bot")
        return " ".join(text for reply in replies for text in render.messages(reply))

    set_policy("lab", notices=True)
    set_policy("devices-only", post=frozenset({"mqtt"}), receive=frozenset({"web", "mqtt"}))
    set_policy("announcements", post=frozenset({"web"}))
    assert "not open to this chat app" in say("/join devices-only", 1)
    assert "read-only" in say("/join announcements", 2)
    assert "You joined" in say("/join lab", 3)
    assert "You left" in say("/leave", 4)
    assert texts("lab") == ["Telegram chat Team joined the room",
                            "Telegram chat Team left the room"]
    notice = selectors.room_messages_last(room="lab", limit=1)[0]
    assert notice["origin"] == "telegram-chat-7"  # the chat is not sent its own notice
