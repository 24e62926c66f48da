"""Staff controls through real interfaces: /readyz against a Redis that stops, /metrics after
real traffic, and the dashboard's WebSocket (who may open it, what it shows, its actions)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.error
import urllib.request

import aiomqtt
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    FAST,
    connect,
    dashboard_socket,
    device,
    mqtt_env,
    mqtt_ready,
    next_message,
    next_of,
    snapshot_until,
    wait_until,
)

pytestmark = pytest.mark.slow

STAFF, STAFF_PASSWORD = "staff", "a-long-staff-pass-phrase"


def get(gw, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(gw.http + path, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def metric_values(gw) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` from /metrics."""
    status, body = get(gw, "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def csrf_of(cookie: str) -> str:
    """The CSRF cookie's value: a token the dashboard socket accepts, as the page's."""
    return dict(part.split("=", 1) for part in cookie.split("; "))["csrftoken"]


async def act(ws, cookie: str, **action) -> None:
    """Send a dashboard action with the session's CSRF token, as the page does."""
    await ws.send(json.dumps({**action, "csrf": csrf_of(cookie)}))


async def frames_until_closed(ws, timeout: float = 10) -> tuple[list[dict], int | None]:
    """Every frame a socket gets until the server closes it, and the close code."""
    frames = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    received = closed.value.rcvd
    return frames, None if received is None else received.code


async def test_readyz_follows_the_channel_layer_and_healthz_stays_up(
    gateway_factory, redis_server
):
    gw = gateway_factory(env={**FAST, "REDIS_URL": redis_server.url}).start()
    status, body = get(gw, "/readyz")
    checks = json.loads(body)["checks"]
    assert status == 200, body
    assert checks["layer"] == {"ready": True, "backend": "redis"}
    assert checks["database"]["ready"] and checks["web"]["ready"]

    redis_server.stop()
    status, body = get(gw, "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["layer"]["ready"] is False
    assert get(gw, "/healthz")[0] == 200  # alive, just not ready

    redis_server.start()
    await wait_until(lambda: get(gw, "/readyz")[0] == 200, 10, "not ready again")


async def test_metrics_count_what_was_sent(gateway_factory):
    gw = gateway_factory(env=FAST).start()
    async with connect(gw, "/ws/chat/count/?name=a") as a, connect(gw, "/ws/chat/count/") as b:
        for i in range(3):
            await a.send(json.dumps({"message": f"m{i}"}))
        for ws in (a, b):
            for _ in range(3):
                await next_message(ws)
        await a.send("{not json")
        await next_of(a, "error")
        values = metric_values(gw)
    assert values[("gateway_messages_in_total", (("protocol", "web"),))] == 3
    assert values[("gateway_messages_out_total", (("protocol", "web"),))] == 6
    assert values[("gateway_errors_total", (("code", "invalid_json"), ("protocol", "web")))] == 1
    assert values[("gateway_connections", (("protocol", "web"),))] == 2
    assert values[("gateway_broadcast_latency_seconds_count", ())] == 3


async def test_only_staff_open_the_dashboard_socket(gateway_factory):
    gw = gateway_factory(env=FAST).start()
    gw.create_user(STAFF, STAFF_PASSWORD, staff=True)
    gw.create_user("visitor", "a-long-visitor-pass-phrase", staff=False)
    for cookie in (None, gw.login("visitor", "a-long-visitor-pass-phrase")):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with dashboard_socket(gw, cookie):
                pass
        assert refused.value.response.status_code == 403
    assert get(gw, "/dashboard/")[0] == 200  # the login page, after a redirect
    assert "refused the dashboard socket: not staff" in gw.log()
    async with dashboard_socket(gw, gw.login(STAFF, STAFF_PASSWORD)) as ws:
        frame = await next_of(ws, "snapshot")
        assert frame["processes"][0]["status"]["web"]["ready"] is True


async def test_dashboard_shows_live_traffic_and_its_actions_reach_the_rooms(gateway_factory):
    gw = gateway_factory(env=FAST).start()
    gw.create_user(STAFF, STAFF_PASSWORD, staff=True)
    cookie = gw.login(STAFF, STAFF_PASSWORD)
    async with dashboard_socket(gw, cookie) as dash, \
            connect(gw, "/ws/chat/ops/?name=ann") as ann, \
            connect(gw, "/ws/chat/ops/?name=bob") as bob:
        await ann.send(json.dumps({"message": "hello ops"}))
        frame = await snapshot_until(dash, lambda f: any(
            m["text"] == "hello ops" for m in f["seen_feed"]
        ) and f["connections"]["by_room"].get("ops", {}).get("web") == 2)
        assert frame["connections"]["by_protocol"]["web"] == 2
        assert sum(p["count"] for p in frame["chart"] if p["protocol"] == "web") >= 1

        # post as the system: every member gets it
        await act(dash, cookie, action="post", room="ops", message="maintenance")
        assert (await next_of(dash, "done"))["action"] == "post"
        for ws in (ann, bob):
            message = await next_message(ws)
            while message["message"] != "maintenance":
                message = await next_message(ws)
            assert message["sender"]["protocol"] == "system"

        # disconnect one connection
        scopes = frame["connections"]["scopes"]
        bob_scope = next(s["scope"] for s in scopes if s["name"] == "bob")
        await act(dash, cookie, action="disconnect", scope=bob_scope)
        await asyncio.wait_for(bob.wait_closed(), 10)
        assert bob.close_code == 4403

        # bad actions get clear errors
        await act(dash, cookie, action="explode")
        assert (await next_of(dash, "error"))["code"] == "unknown_action"
        await act(dash, cookie, action="post", room="bad room", message="x")
        assert (await next_of(dash, "error"))["code"] == "invalid_room"

        # close the room: members disconnected, nobody joins or posts until it reopens
        await act(dash, cookie, action="close_room", room="ops")
        await asyncio.wait_for(ann.wait_closed(), 10)
        assert ann.close_code == 4410
        async with connect(gw, "/ws/chat/ops/") as late:  # told why, so it does not retry
            await asyncio.wait_for(late.wait_closed(), 10)
            assert late.close_code == 4410
        await act(dash, cookie, action="post", room="ops", message="x")
        assert (await next_of(dash, "error"))["code"] == "room_closed"
        await act(dash, cookie, action="reopen_room", room="ops")
        await next_of(dash, "done")
    async with connect(gw, "/ws/chat/ops/") as again:
        await again.send(json.dumps({"message": "back"}))
        assert (await next_message(again))["message"] == "back"


def page_token(gw, cookie: str) -> str:
    """The CSRF token the dashboard page renders for this session (``data-csrf``)."""
    request = urllib.request.Request(gw.http + "/dashboard/", headers={"Cookie": cookie})
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    match = re.search(r'data-csrf="([^"]+)"', page)
    assert match is not None, page
    return match[1]


async def test_dashboard_actions_need_the_csrf_token(gateway_factory):
    gw = gateway_factory(env=FAST).start()
    gw.create_user(STAFF, STAFF_PASSWORD, staff=True)
    cookie = gw.login(STAFF, STAFF_PASSWORD)
    post = {"action": "post", "room": "csrf", "message": "as the system"}
    async with dashboard_socket(gw, cookie) as dash:
        for token in (None, "", "x" * 64, page_token(gw, gw.login(STAFF, STAFF_PASSWORD))):
            frame = dict(post) if token is None else {**post, "csrf": token}
            await dash.send(json.dumps(frame))
            error = await next_of(dash, "error")
            assert error["code"] == "csrf_failed", token
        await dash.send(json.dumps({**post, "csrf": page_token(gw, cookie)}))
        assert (await next_of(dash, "done"))["action"] == "post"
    assert [m["message"] for m in gw.get_json("/api/rooms/csrf/messages")["messages"]] == [
        "as the system"
    ]
    assert "dashboard error csrf_failed" in gw.log()


async def test_a_demoted_staff_user_is_refused_and_the_snapshots_stop(gateway_factory):
    gw = gateway_factory(env=FAST).start()
    gw.create_user(STAFF, STAFF_PASSWORD, staff=True)
    cookie = gw.login(STAFF, STAFF_PASSWORD)
    async with dashboard_socket(gw, cookie) as dash:
        await next_of(dash, "snapshot")
        await act(dash, cookie, action="post", room="demoted", message="while staff")
        await next_of(dash, "done")
        await asyncio.to_thread(gw.manage, "shell", "-c", (
            "from django.contrib.auth.models import User; "
            f"User.objects.filter(username={STAFF!r}).update(is_staff=False)"
        ))
        # Refused by this action's check, or the socket is already closed by the snapshot's
        # check (each second): either way nothing is done, and it was told why.
        with contextlib.suppress(websockets.ConnectionClosed):
            await act(dash, cookie, action="post", room="demoted", message="after demotion")
        frames, code = await frames_until_closed(dash)
        assert code == 4403
        assert [f["code"] for f in frames if f["type"] == "error"] == ["not_staff"]
        assert not [f for f in frames if f["type"] == "done"]
    assert [m["message"] for m in gw.get_json("/api/rooms/demoted/messages")["messages"]] == [
        "while staff"
    ]
    with pytest.raises(websockets.InvalidStatus):  # and it cannot come back
        async with dashboard_socket(gw, cookie):
            pass


async def test_a_staff_user_who_logged_out_is_refused_on_the_open_dashboard(gateway_factory):
    gw = gateway_factory(env=FAST).start()
    gw.create_user(STAFF, STAFF_PASSWORD, staff=True)
    cookie = gw.login(STAFF, STAFF_PASSWORD)
    async with dashboard_socket(gw, cookie) as dash:
        await next_of(dash, "snapshot")
        csrf = re.search(r"csrftoken=([^;]+)", cookie)[1]
        logout = urllib.request.Request(
            gw.http + "/accounts/logout/", data=b"", method="POST",
            headers={"Cookie": cookie, "X-CSRFToken": csrf, "Referer": gw.http + "/"},
        )
        with contextlib.suppress(urllib.error.HTTPError):  # a redirect to the index
            await asyncio.to_thread(urllib.request.urlopen, logout, timeout=5)
        with contextlib.suppress(websockets.ConnectionClosed):
            await act(dash, cookie, action="post", room="after-logout", message="no")
        frames, code = await frames_until_closed(dash)
        assert code == 4403
        assert not [f for f in frames if f["type"] == "done"]
    assert gw.get_json("/api/rooms/after-logout/messages")["messages"] == []


def device_of(frame: dict, device_id: str) -> dict | None:
    return next((d for d in frame["devices"] if d["id"] == device_id), None)


async def test_the_dashboard_shows_devices_their_rooms_status_and_state(
    gateway_factory, mosquitto
):
    gw = gateway_factory(env=mqtt_env(mosquitto)).start()
    gw.create_user(STAFF, STAFF_PASSWORD, staff=True)
    await mqtt_ready(gw)
    will = aiomqtt.Will("rooms/home/status/thermo1", b"offline", qos=1, retain=True)
    thermo = device(mosquitto, identifier="thermo1", will=will, keepalive=5)
    await thermo.__aenter__()
    try:
        await thermo.publish("rooms/home/status/thermo1", b"online", qos=1, retain=True)
        await thermo.publish("rooms/home/state/thermo1", b'{"temperature": 20.5}', qos=1,
                             retain=True)
        await thermo.publish("rooms/lab/in/thermo1", b"hello lab", qos=1)
        async with dashboard_socket(gw, gw.login(STAFF, STAFF_PASSWORD)) as dash:
            frame = await snapshot_until(dash, lambda f: (d := device_of(f, "thermo1")) and (
                d["state"] and len(d["rooms"]) == 2))
            shown = device_of(frame, "thermo1")
            home, lab = shown["rooms"]
            assert (home["room"], home["status"], home["state"]) == (
                "home", "online", '{"temperature":20.5}')
            assert home["status_at"] and home["seen_at"]
            assert (lab["room"], lab["status"]) == ("lab", None)  # it only posted there
            assert shown["state"] == '{"temperature":20.5}'
            assert (shown["blocked"], shown["commands"], shown["protocol"]) == (
                False, True, "mqtt")
            assert shown["last_seen"] >= home["seen_at"]

            # staff turn its commands off (as the admin does): the next snapshot shows it
            await asyncio.to_thread(gw.manage, "shell", "-c", (
                "from gateway.models import Device; "
                "Device.objects.filter(device_id='thermo1').update(commands=False)"))
            await snapshot_until(dash, lambda f: device_of(f, "thermo1")["commands"] is False)

            # killed without a word: its will says offline, and the dashboard follows
            thermo._client._sock.close()  # noqa: SLF001 - a crash, not a DISCONNECT
            frame = await snapshot_until(dash, lambda f: device_of(f, "thermo1")["rooms"][0][
                "status"] == "offline", timeout=30)
            assert device_of(frame, "thermo1")["rooms"][0]["status_at"] > home["status_at"]
    finally:
        with contextlib.suppress(Exception):
            await thermo.__aexit__(None, None, None)
