"""Devices for staff, in process: the dashboard's devices list (what it shows, bounded, in
few queries) and the admin (a device's commands switch, the read-only lists of device rooms
and commands, the room policy's ``commands``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from gateway import dashboard, devices, events, services
from gateway.models import Device, DeviceCommand, DeviceRoom, Room, RoomEvent

pytestmark = pytest.mark.django_db

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
API = events.sender(protocol="api", id="key:ab12", name="ops")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def member(room: str, device_id: str, *, seen: float | None = None, status: str = "",
           status_at: float | None = None, state=None, state_at: float | None = None):
    return DeviceRoom.objects.create(
        room=room, device_id=device_id, status=status,
        status_at=None if status_at is None else at(status_at), state=state,
        state_at=None if state_at is None else at(state_at),
        seen_at=None if seen is None else at(seen))


def device(device_id: str, *, last_seen: float, rooms=(), **fields) -> Device:
    return Device.objects.create(device_id=device_id, protocol="mqtt", last_seen=at(last_seen),
                                 rooms=list(rooms), **fields)


# --- the dashboard --------------------------------------------------------------------------


def test_the_dashboard_lists_devices_with_their_rooms_newest_first():
    member("home", "thermo1", seen=50, status="online", status_at=10,
           state={"temperature": 20.5, "note": "x" * 300}, state_at=40)
    member("lab", "thermo1", seen=20, status="offline", status_at=20)
    device("thermo1", last_seen=30, rooms=["home", "hall"], commands=False)
    member("home", "lamp", status="unknown", status_at=60, state="on\n  dim", state_at=5)
    device("poster", last_seen=100, rooms=["ops"], blocked=True)

    shown = dashboard.devices()
    assert [d["id"] for d in shown] == ["poster", "lamp", "thermo1"]
    poster, lamp, thermo = shown
    assert poster == {
        "id": "poster", "protocol": "mqtt", "last_seen": at(100).timestamp(),
        "rooms": [{"room": "ops", "status": None, "status_at": None, "state": None,
                   "state_at": None, "seen_at": None}],
        "rooms_more": 0, "state": None, "state_at": None, "blocked": True, "commands": True}
    # only a room row (a status, a state; never a message): no row of its own
    assert (lamp["protocol"], lamp["blocked"], lamp["commands"], lamp["last_seen"]) == (
        None, False, True, None)
    assert lamp["rooms"][0]["status"] == "unknown" and lamp["state"] == "on dim"
    # its rooms: those it is a member of (newest first), then those it only posted to
    assert [(r["room"], r["status"], r["status_at"]) for r in thermo["rooms"]] == [
        ("home", "online", at(10).timestamp()), ("lab", "offline", at(20).timestamp()),
        ("hall", None, None)]
    assert thermo["last_seen"] == at(50).timestamp()  # a room saw it after its last message
    # its newest state on one line (PostgreSQL's jsonb orders an object's keys)
    assert thermo["state"].startswith(('{"temperature":20.5,"note":"xxx', '{"note":"xxx'))
    assert len(thermo["state"]) == dashboard.STATE_SHOWN and thermo["state"].endswith("…")
    assert (thermo["blocked"], thermo["commands"]) == (False, False)
    assert "devices" in dashboard.snapshot(after_pk=0, first=True)


def test_the_devices_list_is_bounded_and_costs_a_few_queries(django_assert_max_num_queries):
    for n in range(dashboard.DEVICES_SHOWN + 5):
        device(f"d{n:03}", last_seen=n)
    for n in range(dashboard.DEVICE_ROOMS_SHOWN + 3):
        member(f"room{n:02}", "busy", seen=1000 + n)
    device("busy", last_seen=0, rooms=[f"posted{n}" for n in range(4)])
    with django_assert_max_num_queries(5):
        shown = dashboard.devices()
    assert len(shown) == dashboard.DEVICES_SHOWN
    busy = shown[0]
    assert busy["id"] == "busy"
    assert len(busy["rooms"]) == dashboard.DEVICE_ROOMS_SHOWN
    assert busy["rooms"][0]["room"] == f"room{dashboard.DEVICE_ROOMS_SHOWN + 2:02}"
    assert busy["rooms_more"] == 3 + 4
    assert [d["id"] for d in shown[1:4]] == ["d054", "d053", "d052"]
    assert "d004" not in {d["id"] for d in shown}  # the oldest are left out


def test_a_device_found_by_one_query_gets_what_the_other_knows():
    """A device among the newest rows but not the newest rooms still shows its rooms' last
    seen, and the other way round."""
    for n in range(dashboard.DEVICES_SHOWN):
        member("busy", f"r{n:03}", seen=500 + n)
        device(f"p{n:03}", last_seen=500 + n)
    device("old-room", last_seen=2000)
    member("far", "old-room", seen=3000)
    member("far", "old-row", seen=4000)
    device("old-row", last_seen=1, blocked=True)
    shown = {d["id"]: d for d in dashboard.devices()}
    assert shown["old-room"]["last_seen"] == at(3000).timestamp()
    assert shown["old-row"]["blocked"] is True


# --- the admin --------------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("boss", password="pw-12345-xyz")
    client.force_login(user)
    return client


def test_staff_turn_a_devices_commands_off_in_the_admin(staff_client):
    services.room_get_or_create(room="home")
    thermo = device("thermo1", last_seen=0, rooms=["home"])
    listed = staff_client.get("/admin/gateway/device/").content.decode()
    assert "form-0-commands" in listed
    answer = staff_client.post(f"/admin/gateway/device/{thermo.pk}/change/",
                               {"blocked": "", "commands": ""})
    assert answer.status_code == 302, answer.content.decode()[:2000]
    thermo.refresh_from_db()
    assert (thermo.commands, thermo.blocked, thermo.device_id) == (False, False, "thermo1")
    with pytest.raises(devices.GatewayError) as refused:
        devices.command_send(room="home", device="thermo1", command="on", sender=API,
                             origin="t")
    assert refused.value.code == "command_not_allowed"
    assert "?commands__exact=0" in staff_client.get("/admin/gateway/device/").content.decode()


def test_the_admin_lists_device_rooms_read_only(staff_client):
    row = member("home", "thermo1", seen=1, status="online", status_at=1,
                 state={"temperature": 20.5}, state_at=1)
    member("lab", "plug", status="offline", status_at=2)
    page = staff_client.get("/admin/gateway/deviceroom/").content.decode()
    assert "thermo1" in page and "plug" in page and "temperature" in page
    filtered = staff_client.get("/admin/gateway/deviceroom/?status__exact=offline")
    assert "plug" in filtered.content.decode() and "thermo1" not in filtered.content.decode()
    found = staff_client.get("/admin/gateway/deviceroom/?q=thermo").content.decode()
    assert "thermo1" in found and "plug" not in found
    assert staff_client.get("/admin/gateway/deviceroom/add/").status_code == 403
    change = f"/admin/gateway/deviceroom/{row.pk}/change/"
    assert staff_client.get(change).status_code == 200  # viewed, not edited
    assert staff_client.post(change, {"status": "offline"}).status_code == 403
    assert staff_client.post(f"/admin/gateway/deviceroom/{row.pk}/delete/",
                             {"post": "yes"}).status_code == 403
    row.refresh_from_db()
    assert row.status == "online"


def test_the_admin_lists_commands_read_only_and_deletes_them(staff_client):
    member("home", "thermo1", status="online", status_at=1)
    services.room_get_or_create(room="home")
    devices.command_send(room="home", device="thermo1", command="set 21", sender=API,
                         origin="t")
    command = DeviceCommand.objects.get()
    page = staff_client.get("/admin/gateway/devicecommand/").content.decode()
    assert "set 21" in page and "ops (api)" in page and "pending" in page
    assert "set 21" not in staff_client.get(
        "/admin/gateway/devicecommand/?state__exact=answered").content.decode()
    assert staff_client.get("/admin/gateway/devicecommand/add/").status_code == 403
    change = f"/admin/gateway/devicecommand/{command.pk}/change/"
    assert staff_client.post(change, {"command": "rm -rf"}).status_code == 403
    assert DeviceCommand.objects.get().command == "set 21"
    answer = staff_client.post("/admin/gateway/devicecommand/", {
        "action": "delete_selected", "_selected_action": [command.pk], "post": "yes"})
    assert answer.status_code == 302
    assert not DeviceCommand.objects.exists()
    # the command's message stays in the room: deleting the command drops its answer only
    assert services.room_policy_get(room="home") is not None


def policy_form(**changes) -> dict:
    return {"post_all": "on", "receive_all": "on", "name_format": "{}", **changes}


def test_the_admin_sets_who_may_send_commands_through_the_policy(staff_client):
    services.room_get_or_create(room="lab")
    url = f"/admin/gateway/room/{Room.objects.get(name='lab').pk}/change/"
    assert 'name="commands"' in staff_client.get(url).content.decode()

    def saved(**changes):
        answer = staff_client.post(url, policy_form(**changes))
        assert answer.status_code == 302, answer.content.decode()[:3000]
        return services.room_policy_get(room="lab").public()["commands"]

    def ticked(name: str) -> list[str]:
        page = staff_client.get(url).content.decode()
        return re.findall(rf'<input type="checkbox" name="{name}" (?:value="([^"]*)" )?'
                          r'[^>]*\bchecked\b', page)

    assert saved(commands=["web", "api"]) == ["api", "web"]
    assert ticked("commands") == ["api", "web"]
    assert saved() is None  # none ticked: every protocol that may post
    assert ticked("commands") == []
    assert saved(commands_staff_only="on") == []
    assert ticked("commands_staff_only") == [""]
    assert saved(commands_staff_only="on") == []  # saved again, it stays staff only
    assert "commands: staff only" in staff_client.get("/admin/gateway/room/").content.decode()
    both = staff_client.post(url, policy_form(commands=["web"], commands_staff_only="on"))
    assert both.status_code == 200 and "not both" in both.content.decode()
    unknown = staff_client.post(url, policy_form(commands=["carrier-pigeon"]))
    assert unknown.status_code == 200
    assert services.room_policy_get(room="lab").public()["commands"] == []
    entries = RoomEvent.objects.filter(kind="policy").order_by("pk")
    assert [e.data["commands"] for e in entries][:3] == [["api", "web"], None, []]
    assert all(e.sender_id.startswith("staff:") for e in entries)
