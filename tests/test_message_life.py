"""A message's life after it is sent: edits, deletes by its author, replies and reactions,
each an entry of the room's log; and live presence. The services in-process, the WebSocket
protocol through the consumer (WebsocketCommunicator on the in-memory layer), the roster as a
pure unit."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import Client

from gateway import events, selectors, services
from gateway.errors import GatewayError
from gateway.models import Message, MessageRevision, Reaction, Room, RoomEvent
from gateway.presence import RoomRoster
from gateway.routing import websocket_urlpatterns
from tests.helpers import FAST, connect, device, gather_out, mqtt_env, mqtt_ready, next_of

app = URLRouter(websocket_urlpatterns)
ALICE = events.sender(protocol="web", id="anon:alice", name="alice")
BOB = events.sender(protocol="web", id="anon:bob", name="bob")
DEVICE = events.sender(protocol="mqtt", id="alice", name="alice")  # same id, other protocol
STAFF = events.sender(protocol="system", id="staff:1", name="boss")


def post(room: str, text: str, sender: events.Sender = ALICE, **kwargs) -> events.RoomMessage:
    return services.room_message_post(room=room, text=text, sender=sender, origin="test",
                                      **kwargs)[0]


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(GatewayError) as caught:
        call(*args, **kwargs)
    return caught.value.code


# --- the services ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_edit_is_an_entry_the_text_is_replaced_and_the_old_text_is_for_staff_only():
    post("life", "helo")
    entry, created = services.message_edit(room="life", id=1, text="hello", sender=ALICE,
                                           staff=False, origin="scope-1", client_id="e1")
    assert created and entry is not None
    assert (entry["kind"], entry["id"], entry["cursor"], entry["text"]) == ("edit", 1, 2, "hello")
    assert entry["origin"] == "scope-1" and entry["client_id"] == "e1"
    message = Message.objects.get(room__name="life", seq=1)
    assert message.text == "hello" and message.edited_at is not None
    assert list(MessageRevision.objects.values_list("text", flat=True)) == ["helo"]
    # The same client_id again: the same entry, nothing stored twice.
    again, created = services.message_edit(room="life", id=1, text="hello!", sender=ALICE,
                                           staff=False, origin="scope-1", client_id="e1")
    assert not created and again is not None and again["cursor"] == 2
    assert Room.objects.get(name="life").last_seq == 2
    # The same text: nothing to record.
    assert services.message_edit(room="life", id=1, text="hello", sender=ALICE, staff=False,
                                 origin="x") == (None, False)
    assert Room.objects.get(name="life").last_seq == 2
    # The API shows the current state only, with no trace of the old text.
    page = Client().get("/api/rooms/life/messages").json()["messages"]
    assert page[0]["message"] == "hello" and page[0]["edited_at"] == message.edited_at.timestamp()
    assert "helo" not in json.dumps(page)


@pytest.mark.django_db
def test_only_the_author_or_staff_may_edit_or_delete():
    post("rules", "mine")
    assert refused(services.message_edit, room="rules", id=1, text="x", sender=BOB,
                   staff=False, origin="o") == "forbidden"
    assert refused(services.message_delete, room="rules", id=1, sender=DEVICE, staff=False,
                   origin="o") == "forbidden"  # the same id on another protocol is not her
    assert refused(services.message_edit, room="rules", id=9, text="x", sender=ALICE,
                   staff=False, origin="o") == "not_found"
    assert refused(services.message_edit, room="nowhere", id=1, text="x", sender=ALICE,
                   staff=False, origin="o") == "not_found"
    assert refused(services.message_edit, room="rules", id="1", text="x", sender=ALICE,
                   staff=False, origin="o") == "invalid_id"
    assert refused(services.message_edit, room="rules", id=1, text=" ", sender=ALICE,
                   staff=False, origin="o") == "empty_message"
    services.message_edit(room="rules", id=1, text="moderated", sender=BOB, staff=True,
                          origin="o")
    assert Room.objects.get(name="rules").last_seq == 2  # refusals took no cursor
    entry, _ = services.message_delete(room="rules", id=1, sender=ALICE, staff=False,
                                       origin="o")
    assert entry is not None and entry["kind"] == "delete"
    assert refused(services.message_edit, room="rules", id=1, text="x", sender=ALICE,
                   staff=False, origin="o") == "deleted"
    assert refused(services.message_react, room="rules", id=1, emoji="👍", sender=BOB,
                   origin="o") == "deleted"
    # Deleting erases the text and its history.
    message = Message.objects.get(room__name="rules", seq=1)
    assert message.text == "" and message.deleted_at is not None
    assert not MessageRevision.objects.exists()


@pytest.mark.django_db
def test_a_closed_room_and_a_blocked_sender_refuse_changes_but_staff_may_still_delete():
    from gateway.models import SenderBlock

    post("shut", "one")
    post("shut", "two")
    services.room_close(room="shut", by=STAFF)
    assert refused(services.message_edit, room="shut", id=1, text="x", sender=ALICE,
                   staff=False, origin="o") == "room_closed"
    assert services.messages_delete(messages=[("shut", 1)], by=STAFF) == 1
    services.room_reopen(room="shut", by=STAFF)
    SenderBlock.objects.create(protocol="web", kind=SenderBlock.KIND_ID, value=ALICE["id"])
    assert refused(services.message_react, room="shut", id=2, emoji="👍", sender=ALICE,
                   origin="o") == "blocked"


@pytest.mark.django_db
def test_reactions_toggle_count_per_emoji_and_are_limited(settings):
    settings.GATEWAY = {**settings.GATEWAY, "MAX_REACTIONS": 2}
    post("react", "nice")
    added, _ = services.message_react(room="react", id=1, emoji="👍", sender=ALICE, origin="o")
    assert added is not None and (added["emoji"], added["added"], added["count"]) == ("👍", True, 1)
    services.message_react(room="react", id=1, emoji="👍", sender=BOB, origin="o")
    services.message_react(room="react", id=1, emoji="🎉", sender=BOB, origin="o")
    assert Message.objects.get(room__name="react", seq=1).reactions == {"👍": 2, "🎉": 1}
    assert refused(services.message_react, room="react", id=1, emoji="😮", sender=ALICE,
                   origin="o") == "invalid_emoji"  # a third different emoji
    taken, _ = services.message_react(room="react", id=1, emoji="👍", sender=ALICE, origin="o")
    assert taken is not None and (taken["added"], taken["count"]) == (False, 1)
    # Set, not toggled (a platform that says what the sender's reactions are now).
    assert services.message_react(room="react", id=1, emoji="🎉", sender=BOB, origin="o",
                                  added=True) == (None, False)
    assert Reaction.objects.count() == 2
    page = Client().get("/api/rooms/react/messages").json()["messages"]
    assert page[0]["reactions"] == {"👍": 1, "🎉": 1}


@pytest.mark.parametrize("emoji", ["👍", "❤️", "👍🏽", "👨‍👩‍👧", "🇫🇷", "1️⃣", "+1", "thumbs_up"])
def test_an_emoji_or_a_short_token_is_a_reaction(emoji):
    assert services.emoji_validate(emoji) == emoji


@pytest.mark.parametrize("emoji", ["", "👍👍", "a b", "<b>", "x" * 33, "👍 ", "\u200d", "🇫", 7,
                                   None, "a\x00", "\u2800", "─", "👍\u200d"])
def test_anything_else_is_an_invalid_emoji(emoji):
    assert refused(services.emoji_validate, emoji) == "invalid_emoji"


@pytest.mark.django_db
def test_a_reply_shows_the_excerpt_of_what_it_answers_as_it_is_now():
    long = "x" * 150
    post("thread", long, sender=BOB)
    reply = post("thread", "agreed", reply_to=1)
    assert reply["reply_to"] == {"id": 1, "sender": dict(BOB), "excerpt": "x" * 100}
    assert refused(post, "thread", "to nothing", reply_to=99) == "not_found"
    assert refused(post, "thread", "bad", reply_to="1") == "invalid_reply_to"
    services.message_edit(room="thread", id=1, text="short now", sender=BOB, staff=False,
                          origin="o")
    page = Client().get("/api/rooms/thread/messages").json()["messages"]
    assert page[1]["reply_to"]["excerpt"] == "short now"
    services.message_delete(room="thread", id=1, sender=BOB, staff=False, origin="o")
    page = Client().get("/api/rooms/thread/messages").json()["messages"]
    assert page[1]["reply_to"] == {"id": 1, "sender": dict(BOB), "excerpt": ""}
    assert refused(post, "thread", "to the deleted", reply_to=1) == "deleted"


@pytest.mark.django_db
def test_replies_stored_together_are_checked_in_one_batch():
    post("batch", "first")
    posts = [services.Post(room="batch", text=t, sender=ALICE, origin="o", reply_to=r)
             for t, r in (("a", 1), ("b", 42), ("c", None))]
    results = services.room_messages_post(posts=posts)
    assert results[0][0]["reply_to"]["id"] == 1  # type: ignore[index]
    assert isinstance(results[1], GatewayError) and results[1].code == "not_found"
    assert results[2][0]["reply_to"] is None  # type: ignore[index]
    assert list(Message.objects.filter(room__name="batch").values_list("seq", "reply_to")) == [
        (1, None), (2, 1), (3, None)]


@pytest.mark.django_db
def test_the_log_is_read_in_its_messages_current_state():
    post("state", "one")
    post("state", "two")
    services.message_edit(room="state", id=1, text="one, edited", sender=ALICE, staff=False,
                          origin="o")
    services.message_edit(room="state", id=1, text="one, final", sender=ALICE, staff=False,
                          origin="o")
    services.message_react(room="state", id=2, emoji="👍", sender=BOB, origin="o")
    services.message_edit(room="state", id=2, text="two, edited", sender=ALICE, staff=False,
                          origin="o")
    services.message_delete(room="state", id=2, sender=ALICE, staff=False, origin="o")
    entries, reached = selectors.room_log_after(room="state", after=0, limit=100)
    assert reached == 7
    shown = [(e["type"], events.entry_cursor(e), e.get("text"), e.get("kind")) for e in entries]
    assert shown == [
        ("room.message", 1, "one, final", None),  # its text now
        ("room.entry", 3, "one, final", "edit"),  # never the intermediate text
        ("room.entry", 4, "one, final", "edit"),
        ("room.entry", 7, None, "delete"),  # message 2 and its changes are gone with it
    ]
    assert RoomEvent.objects.filter(room__name="state").count() == 5


# --- the WebSocket protocol -----------------------------------------------------------------


async def ws(path: str, **kwargs) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(app, path, **kwargs)
    connected, code = await comm.connect(timeout=5)
    assert connected, f"refused with {code}"
    return comm


async def frame(comm: WebsocketCommunicator, kind: str | None = None) -> dict:
    """The next frame (of ``kind``, passing over others: presence comes and goes)."""
    while True:
        data = json.loads(await comm.receive_from(timeout=5))
        if kind is None or data["type"] == kind:
            return data


async def only_presence(comm: WebsocketCommunicator, wait: float = 0.3) -> bool:
    """Whether nothing but presence frames arrives within ``wait`` seconds."""
    while not await comm.receive_nothing(timeout=wait):
        data = json.loads(await comm.receive_from(timeout=1))
        assert data["type"] == "presence", data
    return True


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_changes_reach_extended_clients_and_a_tutorial_client_sees_messages_only():
    alice = await ws("/ws/chat/mixed/?v=2&uid=alice-uid-1&name=alice")
    bob = await ws("/ws/chat/mixed/", subprotocols=["rt-gateway.v2"])  # the other way to ask
    tutorial = await ws("/ws/chat/mixed/")
    await alice.send_json_to({"message": "hi", "client_id": "m1"})
    sent = await frame(alice, "message")
    assert sent["cursor"] == sent["id"] == 1 and sent["reply_to"] is None
    assert (await frame(alice, "ack"))["cursor"] == 1
    for comm in (bob, tutorial):
        assert (await frame(comm, "message"))["message"] == "hi"
    await alice.send_json_to({"type": "edit", "id": 1, "message": "hi all", "client_id": "e1"})
    edit = await frame(bob, "edit")
    assert (edit["id"], edit["message"], edit["cursor"], edit["sender"]["name"]) == (
        1, "hi all", 2, "alice")
    assert edit["edited_at"] > 0 and edit["client_id"] == "e1"
    assert (await frame(alice, "ack")) == {"type": "ack", "client_id": "e1", "id": 1,
                                           "cursor": 2, "duplicate": False}
    await bob.send_json_to({"type": "react", "id": 1, "emoji": "🎉"})
    reaction = await frame(alice, "reaction")
    assert (reaction["emoji"], reaction["added"], reaction["count"], reaction["cursor"]) == (
        "🎉", True, 1, 3)
    await bob.send_json_to({"message": "yes", "reply_to": 1})
    reply = await frame(alice, "message")
    assert reply["reply_to"]["id"] == 1 and reply["reply_to"]["excerpt"] == "hi all"
    await alice.send_json_to({"type": "delete", "id": 1})
    assert (await frame(bob, "delete"))["cursor"] == 5
    # The tutorial's client got the two messages and the delete as it always had it, no
    # edit, reaction or presence frame.
    assert (await frame(tutorial))["message"] == "yes"
    assert await frame(tutorial) == {"type": "deleted", "room": "mixed", "id": 1, "cursor": 5}
    assert await tutorial.receive_nothing(timeout=0.3)
    for comm in (alice, bob, tutorial):
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_change_another_sender_may_not_make_is_an_error_frame():
    alice = await ws("/ws/chat/guard/?v=2&uid=alice-uid-1")
    mallory = await ws("/ws/chat/guard/?v=2&uid=mallory-uid")
    await alice.send_json_to({"message": "mine"})
    await frame(alice, "message")
    await frame(mallory, "message")
    for data, code in (
        ({"type": "edit", "id": 1, "message": "pwned", "client_id": "x"}, "forbidden"),
        ({"type": "delete", "id": 1}, "forbidden"),
        ({"type": "edit", "id": 2, "message": "?"}, "not_found"),
        ({"type": "edit", "id": 1}, "missing_message"),
        ({"type": "react", "id": 1, "emoji": "<script>"}, "invalid_emoji"),
        ({"type": "react", "id": True, "emoji": "👍"}, "invalid_id"),
        ({"message": "re", "reply_to": 77}, "not_found"),
    ):
        await mallory.send_json_to(data)
        error = await frame(mallory, "error")
        assert error["code"] == code, (data, error)
    assert error.get("client_id") is None
    assert await only_presence(alice)  # nothing happened in the room
    for comm in (alice, mallory):
        await comm.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_an_unknown_version_is_refused_before_accept():
    comm = WebsocketCommunicator(app, "/ws/chat/ver/?v=3")
    connected, code = await comm.connect(timeout=5)
    assert not connected and code == 4400


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_presence_is_pushed_to_extended_clients_as_members_come_and_go():
    watcher = await ws("/ws/chat/who/?v=2&uid=watcher-uid&name=watcher")
    first = await frame(watcher, "presence")
    assert [m["name"] for m in first["members"]] == ["watcher"]
    assert first["you"] == {"protocol": "web", "id": first["members"][0]["id"], "name": "watcher"}
    tutorial = await ws("/ws/chat/who/?name=tut")
    joined = await frame(watcher, "presence")
    assert [m["name"] for m in joined["joined"]] == ["tut"] and "scope" not in joined["joined"][0]
    assert await tutorial.receive_nothing(timeout=0.3)  # never a presence frame for it
    await tutorial.disconnect()
    left = await frame(watcher, "presence")
    assert [m["name"] for m in left["left"]] == ["tut"]
    # A second extended client gets the whole list at once.
    late = await ws("/ws/chat/who/?v=2&name=late")
    members = (await frame(late, "presence"))["members"]
    assert sorted(m["name"] for m in members) == ["late", "watcher"]
    assert all(m["connections"] == 1 for m in members)
    for comm in (watcher, late):
        await comm.disconnect()


# --- the roster -----------------------------------------------------------------------------


def member(scope: str, name: str = "x") -> events.PresenceMember:
    return {"scope": scope, "protocol": "web", "id": f"anon:{name}", "name": name}


def change(process: str, seq: int, joined=(), left=()) -> events.RoomPresence:
    return events.room_presence(room="r", process=process, seq=seq, joined=list(joined),
                                left=list(left))


def test_the_roster_tells_each_change_once_and_ignores_old_ones():
    roster = RoomRoster()
    assert roster.apply(change("p1", 1, joined=[member("s1", "ann")])) == (
        [member("s1", "ann")], [])
    assert roster.apply(change("p1", 1, joined=[member("s1", "ann")])) == ([], [])  # again
    assert roster.apply(change("p1", 2, joined=[member("s1", "ann"), member("s2", "ann")])) == (
        [member("s2", "ann")], [])
    assert roster.snapshot() == [{"protocol": "web", "id": "anon:ann", "name": "ann",
                                  "connections": 2}]
    assert roster.apply(change("p1", 3, left=[member("s9")])) == ([], [])  # never here


def test_a_row_replaces_what_was_heard_only_if_it_is_as_new():
    roster = RoomRoster()
    roster.apply(change("p1", 5, joined=[member("s1")]))
    roster.apply(change("p1", 6, left=[member("s1")]))
    # A row written before the leave (seq 5) would bring s1 back: the leave heard since is
    # applied again over it.
    assert roster.replace({"p1": (5, [member("s1")])}) == ([], [])
    # One written after it is the truth: it carries a change the events lost.
    assert roster.replace({"p1": (7, [member("s3")])}) == ([member("s3")], [])
    # A process whose row is gone (dead) takes its members with it.
    assert roster.replace({}) == ([], [member("s3")])
    assert roster.snapshot() == []


def test_a_lost_change_is_mended_by_the_next_row_however_busy_the_room():
    roster = RoomRoster()
    roster.apply(change("p1", 5, joined=[member("s1")]))
    # seq 6, s1 leaving, is lost on the way; seq 7 arrives: the room is never quiet.
    roster.apply(change("p1", 7, joined=[member("s2")]))
    # The row written at 6 is older than what was heard, yet it mends the lost leave.
    assert roster.replace({"p1": (6, [])}) == ([], [member("s1")])
    assert [m["id"] for m in roster.snapshot()] == ["anon:x"] and roster.members["p1"].keys() == {
        "s2"}
    # Changes no longer kept (more than KEPT since the row): that row is passed over.
    for seq in range(8, 8 + RoomRoster.KEPT + 1):
        roster.apply(change("p1", seq, joined=[member(f"t{seq}")]))
    assert roster.replace({"p1": (7, [])}) == ([], [])


@pytest.mark.django_db
def test_staff_see_the_edit_history_in_the_admin(admin_client):
    post("audit", "first words")
    services.message_edit(room="audit", id=1, text="second words", sender=ALICE, staff=False,
                          origin="o")
    services.message_edit(room="audit", id=1, text="last words", sender=ALICE, staff=False,
                          origin="o")
    message = Message.objects.get(room__name="audit", seq=1)
    page = admin_client.get(f"/admin/gateway/message/{message.pk}/change/")
    assert page.status_code == 200
    body = page.content.decode()
    assert "first words" in body and "second words" in body and "last words" in body
    assert body.index("first words") < body.index("second words")
    assert "first words" not in Client().get("/api/rooms/audit/messages").content.decode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_flood_of_reactions_is_limited_like_messages(settings):
    settings.GATEWAY = {**settings.GATEWAY, "RATE_LIMIT_PER_SECOND": 0.01,
                        "RATE_LIMIT_BURST": 5, "WS_ERROR_LIMIT": 100}
    alice = await ws("/ws/chat/flood/?v=2")
    await alice.send_json_to({"message": "react to me"})
    await frame(alice, "message")
    for _ in range(10):
        await alice.send_json_to({"type": "react", "id": 1, "emoji": "👍"})
    reactions, refusals = 0, 0
    while reactions + refusals < 10:
        data = await frame(alice)
        reactions += data["type"] == "reaction"
        refusals += data["type"] == "error" and data["code"] == "rate_limited"
    assert (reactions, refusals) == (4, 6)  # the burst of 5, less the message
    assert await database_sync_to_async(RoomEvent.objects.filter(room__name="flood").count)() == 4
    await alice.disconnect()


# --- through a real gateway, with a real broker -----------------------------------------------


@pytest.mark.slow
async def test_a_devices_changes_reach_the_page_and_out_and_the_pages_reach_the_devices(
    gateway_factory, mosquitto,
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    await mqtt_ready(gw)
    async with connect(gw, "/ws/chat/plant/?v=2&name=web") as page, \
            device(mosquitto) as sensor:
        await sensor.subscribe("rooms/plant/out", qos=1)
        await sensor.publish("rooms/plant/in/probe", b"21.5 C", qos=1)
        assert (await next_of(page, "message"))["message"] == "21.5 C"
        await sensor.publish("rooms/plant/in/probe", json.dumps(
            {"type": "edit", "id": 1, "message": "21.7 C"}).encode(), qos=1)
        edit = await next_of(page, "edit")
        assert (edit["id"], edit["message"], edit["sender"]["id"]) == (1, "21.7 C", "probe")
        # The page answers and reacts; the device sees it all on out, in room order.
        await page.send(json.dumps({"message": "thanks", "reply_to": 1}))
        await page.send(json.dumps({"type": "react", "id": 1, "emoji": "👍"}))
        out = await gather_out(sensor, 4)
        assert [(o["type"], o["id"]) for o in out] == [
            ("message", 1), ("edit", 1), ("message", 3), ("reaction", 1)]
        assert out[2]["reply_to"] == {"id": 1, "excerpt": "21.7 C", "sender": {
            "protocol": "mqtt", "id": "probe", "name": "probe"}}
        assert (out[3]["emoji"], out[3]["added"], out[3]["count"]) == ("👍", True, 1)
        # A device may not edit what another sender said: told on its error topic.
        await sensor.subscribe("rooms/plant/error/probe", qos=1)
        await sensor.publish("rooms/plant/in/probe", json.dumps(
            {"type": "delete", "id": 3, "client_id": "d-1"}).encode(), qos=1)
        [error] = await gather_out(sensor, 1)
        assert (error["topic"], error["code"], error["client_id"]) == (
            "rooms/plant/error/probe", "forbidden", "d-1")
        await sensor.publish("rooms/plant/in/probe", json.dumps(
            {"type": "delete", "id": 1}).encode(), qos=1)
        assert (await next_of(page, "delete"))["id"] == 1
        [gone] = await gather_out(sensor, 1)
        assert (gone["type"], gone["id"]) == ("delete", 1)


@pytest.mark.slow
async def test_a_page_offline_during_changes_gets_their_current_state_when_it_resumes(
    gateway_factory,
):
    gw = gateway_factory(env=FAST).start()
    async with connect(gw, "/ws/chat/later/?v=2&uid=author-uid-1") as author:
        for text in ("one", "two", "three"):
            await author.send(json.dumps({"message": text}))
            await next_of(author, "message")
    async with connect(gw, "/ws/chat/later/?v=2&uid=author-uid-1") as author:
        # Another page meanwhile: an edit, a delete, two reactions.
        await author.send(json.dumps({"type": "edit", "id": 1, "message": "one (fixed)"}))
        await author.send(json.dumps({"type": "delete", "id": 2}))
        await author.send(json.dumps({"type": "react", "id": 3, "emoji": "🎉"}))
        await author.send(json.dumps({"type": "edit", "id": 1, "message": "one (final)"}))
        await next_of(author, "edit")
        while (await next_of(author, "edit"))["message"] != "one (final)":
            pass
    # The page that had seen everything up to 3 resumes: the changes, in order, in their
    # current state (never the intermediate text), and the history shows the same.
    async with connect(gw, "/ws/chat/later/?v=2&after=3") as page:
        got = [json.loads(await asyncio.wait_for(page.recv(), 10)) for _ in range(5)]
    changes = [(f["type"], f["id"], f.get("message"), f.get("count")) for f in got
               if f["type"] != "presence"]
    assert changes == [("edit", 1, "one (final)", None), ("delete", 2, None, None),
                       ("reaction", 3, None, 1), ("edit", 1, "one (final)", None)]
    history = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(
        f"{gw.http}/api/rooms/later/messages", timeout=5).read()))
    assert [(m["id"], m["message"], m["deleted"], m["reactions"]) for m in history["messages"]
            ] == [(1, "one (final)", False, {}), (2, "", True, {}), (3, "three", False,
                                                                    {"🎉": 1})]


@pytest.mark.django_db(transaction=True)
def test_concurrent_changes_to_one_message_keep_its_counts_and_the_log_consistent():
    """On PostgreSQL (scripts/test.sh runs this file there too): the tests' SQLite is an
    in-memory database whose concurrent writers fail at once rather than wait."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection, connections

    if connection.vendor != "postgresql":
        pytest.skip("concurrent writers need a database that makes them wait")

    post("race", "popular")
    senders = [events.sender(protocol="web", id=f"anon:{n}", name=f"n{n}") for n in range(8)]

    def react(sender: events.Sender) -> None:
        try:
            for emoji in ("👍", "🎉", "👍"):  # add, add, take back
                services.message_react(room="race", id=1, emoji=emoji, sender=sender,
                                       origin="o")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(react, senders))
    message = Message.objects.get(room__name="race", seq=1)
    assert message.reactions == {"🎉": 8}
    assert Reaction.objects.filter(room__name="race").count() == 8
    cursors = sorted(RoomEvent.objects.filter(room__name="race").values_list("seq", flat=True))
    assert cursors == list(range(2, 2 + 24))  # one entry each, gap-free


@pytest.mark.django_db
def test_a_reply_shows_what_it_answers_as_it_is_once_the_room_is_locked():
    """A reply checks its target first, then reads it again once it holds the room's cursor,
    so an edit or delete committed in between is what it carries (here the in-between
    changes are made before the second read, as another process would)."""
    post("late", "first text", sender=BOB)
    checked = services._reply_targets([("late", 1)])
    services.message_edit(room="late", id=1, text="second text", sender=BOB, staff=False,
                          origin="o")
    assert services._replies_now(checked)[("late", 1)]["excerpt"] == "second text"  # type: ignore[index]
    services.message_delete(room="late", id=1, sender=BOB, staff=False, origin="o")
    assert services._replies_now(checked)[("late", 1)] == {
        "id": 1, "sender": dict(BOB), "excerpt": ""}  # still answered: it holds a cursor


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_client_may_say_what_it_wants_of_a_reaction_rather_than_toggle_it():
    page = await ws("/ws/chat/want/?v=2&uid=page-uid-01")
    await page.send_json_to({"message": "like me"})
    await frame(page, "message")
    await page.send_json_to({"type": "react", "id": 1, "emoji": "👍", "added": True,
                             "client_id": "r1"})
    got = {f["type"]: f for f in [await frame(page), await frame(page)]}  # in either order
    assert got["reaction"]["added"] is True and got["ack"]["cursor"] == 2
    # Again, as a page that reloaded and does not know it reacted: nothing changes, and the
    # ack says so (no cursor), so the page learns the reaction is its own.
    await page.send_json_to({"type": "react", "id": 1, "emoji": "👍", "added": True,
                             "client_id": "r2"})
    assert await frame(page, "ack") == {"type": "ack", "client_id": "r2", "id": 1,
                                        "cursor": None, "duplicate": True}
    await page.send_json_to({"type": "react", "id": 1, "emoji": "👍", "added": "yes"})
    assert (await frame(page, "error"))["code"] == "invalid_added"
    await page.send_json_to({"type": "react", "id": 1, "emoji": "👍", "added": False})
    assert (await frame(page, "reaction"))["count"] == 0
    await page.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_presence_change_is_encoded_once_for_all_the_sockets_it_goes_to(monkeypatch):
    from consumers import websocket

    encoded = []
    real = websocket.presence_frames
    monkeypatch.setattr(websocket, "presence_frames",
                        lambda change: encoded.append(change) or real(change))
    watchers = [await ws(f"/ws/chat/once/?v=2&name=w{n}") for n in range(3)]
    for comm in watchers:
        await frame(comm, "presence")  # the list
    encoded.clear()
    newcomer = await ws("/ws/chat/once/?name=new")
    for comm in watchers:
        assert [m["name"] for m in (await frame(comm, "presence"))["joined"]] == ["new"]
    assert len(encoded) == 1
    for comm in (*watchers, newcomer):
        await comm.disconnect()
