"""End to end: ``gateway run`` (daphne) on a free port, real WebSocket clients.

Run once on the in-memory channel layer and once on Redis (a private redis-server).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time

import pytest
import websockets

from consumers.websocket import anonymous_id
from tests.helpers import FAST, collect, connect, members, next_message, raw_socket, wait_until

pytestmark = pytest.mark.slow

@pytest.fixture(params=["memory", "redis"])
def gateway(request, gateway_factory, tmp_path):
    env = dict(FAST)
    if request.param == "redis":
        redis = request.getfixturevalue("redis_server")
        env["REDIS_URL"] = redis.url
    return gateway_factory(env=env).start()


async def test_tutorial_clients_chat_and_everyone_gets_every_message_once_in_order(gateway):
    async with connect(gateway, "/ws/chat/lobby/?name=ann") as ann, \
            connect(gateway, "/ws/chat/lobby/?name=ben") as ben, \
            connect(gateway, "/ws/chat/lobby/") as watcher:
        await ann.send(json.dumps({"message": "hi"}))
        for ws in (ann, ben, watcher):
            frame = await next_message(ws)
            assert frame["message"] == "hi" and frame["id"] == 1
            assert frame["sender"]["name"] == "ann" and frame["sender"]["protocol"] == "web"

        async def send_many(ws, tag: str) -> None:
            for i in range(100):
                await ws.send(json.dumps({"message": f"{tag}{i}"}))

        late: list[dict] = []

        async def late_joiner() -> None:
            # Connects mid-stream with after=0: history and live must join without a seam.
            await asyncio.sleep(0.05)
            async with connect(gateway, "/ws/chat/lobby/?after=0") as ws:
                late.extend(await collect(ws, 201))

        await asyncio.gather(send_many(ann, "a"), send_many(ben, "b"), late_joiner())
        for frames in [await collect(ws, 200) for ws in (ann, ben, watcher)] + [late[1:]]:
            ids = [f["id"] for f in frames]
            assert ids == list(range(2, 202))
            texts = [f["message"] for f in frames]
            assert [t for t in texts if t[0] == "a"] == [f"a{i}" for i in range(100)]
            assert [t for t in texts if t[0] == "b"] == [f"b{i}" for i in range(100)]
        assert late[0]["message"] == "hi"
        for ws in (ann, ben, watcher):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)


async def test_a_client_resumes_after_a_drop_with_no_gap_and_no_duplicate(gateway):
    async with connect(gateway, "/ws/chat/resume/") as sender:
        async with connect(gateway, "/ws/chat/resume/") as reader:
            for i in range(5):
                await sender.send(json.dumps({"message": f"m{i}"}))
            seen = await collect(reader, 5)
        for i in range(5, 12):  # sent while the reader is away
            await sender.send(json.dumps({"message": f"m{i}"}))
        await collect(sender, 12)
        async with connect(gateway, f"/ws/chat/resume/?after={seen[-1]['id']}") as reader:
            await sender.send(json.dumps({"message": "m12"}))
            resumed = await collect(reader, 8)
            assert [f["message"] for f in seen + resumed] == [f"m{i}" for i in range(13)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.recv(), 0.3)
    history = gateway.get_json("/api/rooms/resume/messages?after=0&limit=100")
    assert [m["message"] for m in history["messages"]] == [f"m{i}" for i in range(13)]


async def test_redis_restart_mid_conversation_loses_nothing(gateway_factory, redis_server):
    gw = gateway_factory(env={**FAST, "REDIS_URL": redis_server.url,
                              "GATEWAY_RESYNC_INTERVAL": "0.5"}).start()
    total = 60
    received: dict[str, list[int]] = {"r1": [], "r2": []}
    done = asyncio.Event()

    async def reader(name: str) -> None:
        # A page's behaviour: on any close, reconnect and resume after the last id seen.
        while not done.is_set():
            after = received[name][-1] if received[name] else 0
            try:
                async with connect(gw, f"/ws/chat/storm/?after={after}") as ws:
                    while len(received[name]) < total:
                        received[name].append((await next_message(ws, 30))["id"])
                    return
            except (OSError, websockets.ConnectionClosed, websockets.InvalidStatus):
                await asyncio.sleep(0.2)

    async def sender() -> None:
        acked: set[str] = set()
        pending = [f"c{i}" for i in range(total)]
        while pending:
            try:
                async with connect(gw, "/ws/chat/storm/?uid=storm-sender-1") as ws:
                    for cid in list(pending):
                        await ws.send(json.dumps({"message": cid, "client_id": cid}))
                        while True:
                            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                            if frame["type"] == "ack":
                                acked.add(frame["client_id"])
                                pending.remove(frame["client_id"])
                                break
                        await asyncio.sleep(0.03)
                        if len(acked) == total // 3:
                            await asyncio.to_thread(redis_server.restart, 1.0)
            except (OSError, websockets.ConnectionClosed, websockets.InvalidStatus):
                await asyncio.sleep(0.2)

    readers = [asyncio.create_task(reader(n)) for n in received]
    await asyncio.sleep(0.5)
    await asyncio.wait_for(sender(), 60)
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    done.set()
    history = gw.get_json(f"/api/rooms/storm/messages?after=0&limit={total + 10}")
    assert [m["id"] for m in history["messages"]] == list(range(1, total + 1))
    stored = sorted(m["message"] for m in history["messages"])
    assert stored == sorted(f"c{i}" for i in range(total))
    for ids in received.values():
        assert ids == list(range(1, total + 1))


async def test_chat_goes_on_while_redis_is_down(gateway_factory, redis_server):
    gw = gateway_factory(env={**FAST, "REDIS_URL": redis_server.url,
                              "GATEWAY_RESYNC_INTERVAL": "0.5"}).start()

    async def join(path: str):
        # As the page does: a refused handshake (the layer is unreachable) is retried.
        for _ in range(40):
            try:
                return await connect(gw, path).__aenter__()
            except websockets.InvalidStatus as refused:
                assert refused.response.status_code == 403
                await asyncio.sleep(0.25)
        raise AssertionError("never joined")

    before = await join("/ws/chat/down/")
    redis_server.stop()
    during = await join("/ws/chat/down/")
    # Stored, and delivered from the database by each process's resync.
    await during.send(json.dumps({"message": "while down"}))
    for ws in (before, during):
        assert (await next_message(ws))["message"] == "while down"
    redis_server.start()
    await before.send(json.dumps({"message": "back"}))
    for ws in (before, during):
        assert (await next_message(ws))["message"] == "back"
    for ws in (before, during):
        await ws.close()


async def test_a_burst_of_1000_browsers_is_all_accepted(gateway_factory, redis_server):
    gw = gateway_factory(env={**FAST, "REDIS_URL": redis_server.url}).start()

    async def one(i: int):
        return await websockets.connect(gw.ws(f"/ws/chat/crowd/?uid=crowd-member-{i:04d}"),
                                        origin=gw.origin, open_timeout=60)

    sockets = await asyncio.gather(*(one(i) for i in range(1000)), return_exceptions=True)
    failures = [s for s in sockets if isinstance(s, BaseException)]
    assert failures == []
    try:
        await sockets[0].send(json.dumps({"message": "hello crowd"}))
        frames = await asyncio.gather(*(next_message(ws, 30) for ws in sockets))
        assert {f["message"] for f in frames} == {"hello crowd"}
        await wait_until(lambda: members(gw, "crowd") == 1000, 10, "presence did not reach 1000")
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


@pytest.mark.parametrize("layer", ["memory", "redis"])
async def test_a_restart_after_kill_9_shows_no_ghosts(request, gateway_factory, layer):
    env = dict(FAST)  # with the default 15 s presence timeout
    if layer == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    gw = gateway_factory(env=env).start()
    async with connect(gw, "/ws/chat/ghosts/?name=casper&uid=casper-browser"):
        await wait_until(lambda: members(gw, "ghosts") == 1, 5, "member never appeared")
        gw.kill()
    # In-memory: one process by definition, so all earlier rows go. Redis: this host's
    # rows whose pid is gone. Either way long before the heartbeat would expire.
    restarted = gateway_factory(env=env, port=gw.port).start()
    assert restarted.get_json("/api/rooms/ghosts/")["members"] == []
    # (listening alone does not create a room, so the list may not show it at all)
    assert all(r["members"] == 0 for r in restarted.get_json("/api/rooms/")["rooms"])


async def test_presence_of_a_killed_replica_expires_on_redis(gateway_factory, redis_server,
                                                             tmp_path):
    env = {**FAST, "REDIS_URL": redis_server.url, "GATEWAY_PRESENCE_TIMEOUT": "2",
           "GATEWAY_HEARTBEAT_INTERVAL": "0.5"}
    a = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    b = gateway_factory(env=env, datadir=tmp_path / "shared").start()
    async with connect(a, "/ws/chat/replicas/?uid=on-replica-a"), \
            connect(b, "/ws/chat/replicas/?uid=on-replica-b"):
        await wait_until(lambda: members(b, "replicas") == 2, 5, "members never appeared")
        a.kill()
        await wait_until(lambda: members(b, "replicas") == 1, 6, "the dead replica's member stayed")
        member = b.get_json("/api/rooms/replicas/")["members"][0]
        assert member["id"] == anonymous_id("on-replica-b")


async def test_sigterm_closes_sockets_with_4012_and_exits_cleanly(gateway_factory):
    gw = gateway_factory(env=FAST).start()
    async with connect(gw, "/ws/chat/bye/") as ws:
        await asyncio.sleep(0.3)
        code = await asyncio.to_thread(gw.terminate)
        assert code == 0, gw.log()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd.code == 4012
    assert "shutting down gracefully" in gw.log()


# --- frames no well-behaved client library will send -------------------------------------


def send_frame(sock: socket.socket, opcode: int, payload: bytes) -> None:
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(header + mask + masked)


def close_code(sock: socket.socket) -> int:
    """Read frames until the server's close frame; return its code."""
    return read_until_close(sock)[1]


def frames_split(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole server frames at the start of ``data`` as (opcode, payload), and the rest
    (a frame not all arrived yet)."""
    frames = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = {126: 4, 127: 10}.get(length, 2)
        if len(data) < offset:
            break  # the extended length has not all arrived yet
        if length == 126:
            length = struct.unpack("!H", data[2:4])[0]
        elif length == 127:
            length = struct.unpack("!Q", data[2:10])[0]
        if len(data) < offset + length:
            break
        frames.append((opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return frames, data


def read_until_close(sock: socket.socket) -> tuple[list[dict], int | None]:
    """Read frames until the server's close frame: the text frames and the close code
    (None if the connection was reset before a close frame arrived)."""
    frames: list[dict] = []
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return frames, None
        if not chunk:
            raise ConnectionError("closed without a close frame")
        arrived, data = frames_split(data + chunk)
        for opcode, payload in arrived:
            if opcode == 0x8:
                return frames, struct.unpack("!H", payload[:2])[0]
            if opcode == 0x1:
                frames.append(json.loads(payload))


@pytest.mark.parametrize(
    ("opcode", "payload", "expected"),
    [
        (0x1, b'{"message": "\xff\xfe"}', 1007),  # invalid UTF-8 in a text frame
        (0x1, b"x" * 70_000, 1009),  # beyond GATEWAY_WS_MAX_FRAME_BYTES (64 KiB)
    ],
    ids=["invalid-utf8", "oversized"],
)
async def test_protocol_violations_close_only_that_socket(gateway_factory, opcode, payload,
                                                          expected):
    gw = gateway_factory(env=FAST).start()
    async with connect(gw, "/ws/chat/violations/") as bystander:
        sock = raw_socket(gw, "/ws/chat/violations/")
        send_frame(sock, opcode, payload)
        assert await asyncio.to_thread(close_code, sock) == expected
        sock.close()
        await bystander.send(json.dumps({"message": "unaffected"}))
        assert (await next_message(bystander))["message"] == "unaffected"


def frames_until_end(sock: socket.socket, limit: float) -> tuple[list[tuple[float, int]], bool]:
    """(time, opcode) of each frame the server sends, never answering its pings, until it
    ends the connection (True) or ``limit`` seconds pass (False)."""
    seen: list[tuple[float, int]] = []
    data, started = b"", time.monotonic()
    sock.settimeout(0.5)
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return seen, True
        if not chunk:
            return seen, True
        arrived, data = frames_split(data + chunk)
        seen += [(time.monotonic() - started, opcode) for opcode, _ in arrived]
    return seen, False


async def test_open_sockets_are_pinged_at_the_configured_interval_and_dead_ones_closed(
    gateway_factory,
):
    gw = gateway_factory(env={**FAST, "GATEWAY_WS_PING_INTERVAL": "1",
                              "GATEWAY_WS_PING_TIMEOUT": "2"}).start()
    async with connect(gw, "/ws/chat/pinged/") as alive:  # answers pings (websockets does)
        sock = raw_socket(gw, "/ws/chat/pinged/")
        seen, ended = await asyncio.to_thread(frames_until_end, sock, 15)
        sock.close()
        pings = [at for at, opcode in seen if opcode == 0x9]
        assert pings and pings[0] < 5, seen  # every second, checked every two
        assert ended, "a socket that never answers a ping is closed"
        await alive.send(json.dumps({"message": "still here"}))
        assert (await next_message(alive))["message"] == "still here"


async def test_a_client_that_stops_reading_is_closed_and_resumes_from_history(gateway_factory):
    gw = gateway_factory(env={**FAST, "GATEWAY_WS_SEND_BUFFER_LIMIT": "65536"}).start()
    # More than the kernel buffers on both ends (tcp_wmem reaches 4 MiB) plus our 64 KiB.
    total, text = 1600, "y" * 4000
    slow = raw_socket(gw, "/ws/chat/slow/", rcvbuf=4096)
    async with connect(gw, "/ws/chat/slow/") as sender:
        for i in range(total):
            await sender.send(json.dumps({"message": f"{i:04d}{text}"}))
        assert len(await collect(sender, total)) == total  # the room itself keeps going
    # Only now does the slow client read: what was sent to it, then the 4008 close (or a
    # reset, if the server gave up waiting for the close handshake). Either way it
    # reconnects after the last id it saw, as the page does.
    frames, code = await asyncio.to_thread(read_until_close, slow)
    slow.close()
    assert code in (4008, None)
    ids = [f["id"] for f in frames if f["type"] == "message"]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) < total
    async with connect(gw, f"/ws/chat/slow/?after={ids[-1]}") as resumed:
        rest = await collect(resumed, total - len(ids))
    assert [f["id"] for f in rest] == list(range(len(ids) + 1, total + 1))
    assert "fell behind" in gw.log()
