"""Hardening figures (issue 10, items 1, 2 and 4), measured on one source tree:

    python bench/hardening.py <tree> [1] [2] [4]

``<tree>`` is a checkout of the gateway (a ``git worktree`` of an older commit, to compare);
its own ``tests/servers.py`` starts its gateway. Run it on two trees one after the other.
Nothing here asserts; it prints figures.

1. embedded broker: 50 paho devices publish QoS 1 at 5 msg/s each; kill -9 of the gateway
   mid-stream; restart; acknowledged-but-not-stored messages counted.
2. Mosquitto via MQTT_URL: a browser posts 20 msg/s while Mosquitto is stopped (SIGTERM) and
   restarted 5 times; ids never published on out, and /readyz 10 s after the last restart.
4. one socket sends 1-byte invalid frames for 20 s without reading: RSS and log growth.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import websockets  # noqa: E402
from paho.mqtt.client import CallbackAPIVersion, Client  # noqa: E402

from tests.servers import Gateway, Mosquitto, free_port  # noqa: E402

FAST = {"GATEWAY_RATE_LIMIT_PER_SECOND": "1000", "GATEWAY_RATE_LIMIT_BURST": "1000"}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stored(gw, room: str) -> list[str]:
    texts, after = [], 0
    while True:
        with urllib.request.urlopen(f"{gw.http}/api/rooms/{room}/messages?after={after}&limit=500",
                                    timeout=30) as r:
            page = json.loads(r.read())
        texts += [m["message"] for m in page["messages"]]
        if page["next_after"] is None:
            return texts
        after = page["next_after"]


def room_and_readiness(gw, room: str) -> tuple[int, int]:
    """The room's last cursor, and /readyz's status."""
    with urllib.request.urlopen(f"{gw.http}/api/rooms/{room}/", timeout=10) as r:
        last = json.loads(r.read())["last_id"]
    try:
        with urllib.request.urlopen(gw.http + "/readyz", timeout=10) as r:
            return last, r.status
    except urllib.error.HTTPError as e:
        return last, e.code


def item1(tmp: Path) -> str:
    port = free_port()
    env = {**FAST, "MQTT_ENABLED": "1", "MQTT_EMBEDDED_PORT": str(port)}
    gw = Gateway(tmp / "gw1", env=env).start()
    time.sleep(3)
    acked: set = set()
    sent: list = []
    lock = threading.Lock()
    clients = []
    for i in range(50):
        c = Client(CallbackAPIVersion.VERSION2, client_id=f"m-d{i}")
        c.reconnect_delay_set(1, 2)
        c.on_publish = lambda client, userdata, mid, rc, props: acked.add((client, mid))
        c.connect_async("127.0.0.1", port, keepalive=30)
        c.loop_start()
        clients.append((f"d{i}", c))
    time.sleep(3)
    stop = threading.Event()

    def publish() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            for dev, c in clients:
                text = f"{dev}-{n}"
                info = c.publish(f"rooms/fleet/in/{dev}",
                                 json.dumps({"message": text, "client_id": text}), qos=1)
                with lock:
                    sent.append((text, c, info.mid))
            time.sleep(0.2)

    t = threading.Thread(target=publish)
    t.start()
    time.sleep(6)
    # A store that stalls (a long write holds SQLite's lock), as under load: what arrives
    # meanwhile waits in the gateway; whatever the broker acknowledged must survive the kill.
    import sqlite3
    db = sqlite3.connect(gw.datadir / "gateway.sqlite3", timeout=10)
    db.execute("BEGIN IMMEDIATE")
    time.sleep(2)
    gw.kill()
    db.rollback()
    db.close()
    time.sleep(1)
    stop.set()
    t.join()
    back = Gateway(tmp / "gw1", env=env, port=gw.port).start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with lock:
            done = all((c, mid) in acked for _, c, mid in sent)
        if done:
            break
        time.sleep(1)
    with lock:
        acked_texts = {text for text, c, mid in sent if (c, mid) in acked}
        published = len(sent)
    texts = stored(back, "fleet")
    for _, c in clients:
        c.disconnect()
        c.loop_stop()
    back.stop()
    lost = acked_texts - set(texts)
    doubled = len(texts) - len(set(texts))
    return (f"item 1: {published} published, {len(acked_texts)} acknowledged, "
            f"{len(lost)} acknowledged but not stored, {doubled} stored twice")


async def item2(tmp: Path) -> str:
    broker = Mosquitto(tmp / "mq",
                       extra_config="allow_anonymous true\nmax_queued_messages 100000\n")
    broker.start()
    env = {**FAST, "MQTT_ENABLED": "1", "MQTT_URL": broker.url}
    gw = await asyncio.to_thread(Gateway(tmp / "gw2", env=env).start)
    await asyncio.sleep(3)
    got: set[int] = set()
    reader = Client(CallbackAPIVersion.VERSION2, client_id="reader", clean_session=False)
    reader.on_message = lambda c, u, m: got.add(json.loads(m.payload)["id"])
    reader.on_connect = lambda c, u, f, rc, p: c.subscribe("rooms/steady/out", qos=1)
    reader.reconnect_delay_set(1, 2)
    reader.connect("127.0.0.1", broker.port, keepalive=30)
    reader.loop_start()
    await asyncio.sleep(1)
    sent = 0
    async with websockets.connect(gw.ws("/ws/chat/steady/"), origin=gw.origin) as ws:
        async def post_for(seconds: float) -> None:
            nonlocal sent
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await ws.send(json.dumps({"message": f"m{sent}"}))
                sent += 1
                await asyncio.sleep(float(os.environ.get("GAP", "0.05")))

        async def drain() -> None:
            while True:
                await ws.recv()

        drainer = asyncio.create_task(drain())
        await post_for(2)
        for _ in range(5):
            broker.stop()
            await post_for(float(os.environ.get("DOWN", "1.0")))
            broker.start()
            await post_for(3.0)
        await post_for(2)
        drainer.cancel()
    await asyncio.sleep(10)
    last, ready = await asyncio.to_thread(room_and_readiness, gw, "steady")
    reader.loop_stop()
    gw.stop()
    broker.stop()
    missing = sorted(set(range(1, last + 1)) - got)
    return (f"item 2: {last} stored, {len(missing)} never published on out "
            f"({missing[:3]}...{missing[-3:] if missing else ''}), /readyz {ready} 10 s after")


def item4(tmp: Path) -> str:
    gw = Gateway(tmp / "gw4", env={}).start()
    pid = gw.proc.pid
    time.sleep(1)
    rss0, log0 = rss_kb(pid), gw.log_path.stat().st_size
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall((f"GET /ws/chat/flood/ HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
                  f"Origin: {gw.origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n")
                 .encode())
    time.sleep(1)
    frame = bytes([0x81, 0x81, 1, 2, 3, 4, ord("x") ^ 1])  # a masked 1-byte text frame "x"
    chunk = frame * 10000
    sent = 0
    closed = False
    end = time.monotonic() + 20
    sock.settimeout(0.5)
    while time.monotonic() < end:
        try:
            sock.sendall(chunk)
            sent += 10000
        except TimeoutError:
            continue  # the server reads no more for now (its buffers are full)
        except OSError:
            closed = True  # reset or closed by the server
            break
    peak = rss_kb(pid)
    time.sleep(2)
    rss1, log1 = rss_kb(pid), gw.log_path.stat().st_size
    sock.close()
    gw.stop()
    return (f"item 4: {sent} invalid frames sent in 20 s (closed by the server: {closed}); RSS "
            f"{rss0 // 1024} -> {peak // 1024} MB (2 s later {rss1 // 1024} MB); log +"
            f"{(log1 - log0) // 1024} KB")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        which = sys.argv[2:] or ["1", "2", "4"]
        if "1" in which:
            print(item1(tmp_path), flush=True)
        if "2" in which:
            print(asyncio.run(item2(tmp_path)), flush=True)
        if "4" in which:
            print(item4(tmp_path), flush=True)


if __name__ == "__main__":
    main()
