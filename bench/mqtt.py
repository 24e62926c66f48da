"""MQTT benchmark: device -> browser and browser -> device through the gateway, beside the
floor measured in the same run: device -> device through the same Mosquitto, no gateway.

    python bench/mqtt.py [--rate 200] [--duration 5] [--burst 2000] [--devices 100]

Paths: one device, and a fleet of ``--devices`` devices, into a room read by a browser; a
browser to devices subscribed to the room's ``out``. For each path: p50/p99 latency at a
fixed rate, and messages per second for a burst sent as fast as the sender can (every
message counted: lost and duplicated are reported). All clients are aiomqtt/websockets in
one process, so the floor carries the same client costs. Nothing here asserts; it prints
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fanout import Redis  # noqa: E402
from tests.servers import Mosquitto, free_port, wait_for_port  # noqa: E402


def now_ms() -> float:
    return time.time() * 1000


class Meter:
    """Counts what one receiver got: latency per message, duplicates, losses."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.seen: set[int] = set()
        self.duplicates = 0
        self.last_at = 0.0

    def record(self, body: str) -> None:
        m = json.loads(body)
        if m["s"] in self.seen:
            self.duplicates += 1
            return
        self.seen.add(m["s"])
        self.latencies.append(now_ms() - m["t"])
        self.last_at = time.monotonic()

    def summary(self, sent: int, started: float) -> dict:
        lat = sorted(self.latencies)
        pick = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: None)
        elapsed = (self.last_at or time.monotonic()) - started
        return {"sent": sent, "received": len(self.seen), "lost": sent - len(self.seen),
                "duplicates": self.duplicates, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
                "msgs_per_s": len(self.seen) / elapsed if elapsed > 0 else None}


async def paced(send, count: int, rate: float | None) -> None:
    start = time.monotonic()
    for s in range(1, count + 1):
        await send(json.dumps({"s": s, "t": now_ms()}))
        if rate:
            delay = start + s / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def wait_quiet(meter: Meter, expected: int, limit: float = 15) -> None:
    """Poll until ``expected`` messages arrived or ``limit`` seconds passed (losses count)."""
    deadline = time.monotonic() + limit
    while len(meter.seen) < expected and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def measure(meter: Meter, readers, send, count: int, rate: float | None,
                  settle: float = 0.3) -> dict:
    """Run the readers, send ``count`` messages, wait for them, and summarise."""
    tasks = [asyncio.create_task(reader()) for reader in readers]
    await asyncio.sleep(settle)
    started = time.monotonic()
    await paced(send, count, rate)
    await wait_quiet(meter, count)
    for task in tasks:
        task.cancel()
    return meter.summary(count, started)


async def floor(port: int, count: int, rate: float | None) -> dict:
    meter = Meter()
    async with aiomqtt.Client("127.0.0.1", port) as sub, aiomqtt.Client("127.0.0.1", port) as pub:
        await sub.subscribe("floor/t", qos=1)

        async def take() -> None:
            async for message in sub.messages:
                meter.record(message.payload.decode())

        def send(body: str):
            return pub.publish("floor/t", body.encode(), qos=1)

        return await measure(meter, [take], send, count, rate)


def room_socket(http: int, room: str):
    """A browser in ``room`` on the gateway at ``http``."""
    return websockets.connect(f"ws://127.0.0.1:{http}/ws/chat/{room}/",
                              origin=f"http://127.0.0.1:{http}")


async def mqtt_to_ws(port: int, http: int, room: str, count: int, rate: float | None,
                     devices: int = 1) -> dict:
    """Devices (one connection, a device id each in turn) into one room, read by one
    browser; with several, what group commit batches (each device's own messages stay in
    order)."""
    meter = Meter()
    async with room_socket(http, room) as ws, aiomqtt.Client("127.0.0.1", port) as pub:
        async def take() -> None:
            async for frame in ws:
                data = json.loads(frame)
                if data.get("type") == "message":
                    meter.record(data["message"])

        sent = 0

        def send(body: str):
            nonlocal sent
            sent += 1
            payload = json.dumps({"message": body}).encode()
            return pub.publish(f"rooms/{room}/in/dev-{sent % devices}", payload, qos=1)

        return await measure(meter, [take], send, count, rate)


async def ws_to_mqtt(port: int, http: int, room: str, count: int, rate: float | None) -> dict:
    meter = Meter()
    async with room_socket(http, room) as ws, aiomqtt.Client("127.0.0.1", port) as sub:
        await sub.subscribe(f"rooms/{room}/out", qos=1)

        async def take() -> None:
            async for message in sub.messages:
                meter.record(json.loads(message.payload)["message"])

        async def drain_ws() -> None:
            async for _ in ws:
                pass

        def send(body: str):
            return ws.send(json.dumps({"message": body}))

        # The room is new: give the MQTT relay time to find it.
        return await measure(meter, [take, drain_ws], send, count, rate, settle=2.5)


def start_gateway(workdir: Path, redis_url: str, mqtt_url: str,
                  env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, **(env_extra or {}), "PYTHONPATH": str(ROOT),
           "DJANGO_SETTINGS_MODULE": "settings",
           "GATEWAY_DATA_DIR": str(workdir), "REDIS_URL": redis_url, "MQTT_URL": mqtt_url,
           "GATEWAY_RATE_LIMIT_PER_SECOND": "100000", "GATEWAY_RATE_LIMIT_BURST": "100000",
           "LOG_LEVEL": "WARNING", "DJANGO_DEBUG": "0",
           "DJANGO_SECRET_KEY": "bench-" + "x" * 50, "DJANGO_ALLOWED_HOSTS": "127.0.0.1"}
    with open(workdir / "gateway.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    wait_for_port(port, timeout=30)
    return proc, port


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def show(title: str, rows: dict[str, dict], base: str) -> None:
    print(f"\n{title}")
    print(f"{'path':<28}{'msgs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'lost':>6}{'dup':>5}")
    for name, r in rows.items():
        ratio = ""
        if name != base and r["msgs_per_s"] and rows[base]["msgs_per_s"]:
            ratio = f"   {r['msgs_per_s'] / rows[base]['msgs_per_s']:.2f}x floor msgs/s"
        print(f"{name:<28}{r['msgs_per_s'] or 0:9.0f}{fmt(r['p50_ms']):>9}{fmt(r['p99_ms']):>9}"
              f"{r['lost']:6d}{r['duplicates']:5d}{ratio}")


async def run(args, mqtt_port: int, http: int) -> None:
    for title, count, rate in (
        (f"fixed rate: {args.rate:g} msg/s for {args.duration:g}s",
         int(args.rate * args.duration), args.rate),
        (f"burst: {args.burst} messages as fast as the sender can", args.burst, None),
    ):
        rows = {
            "floor (device -> device)": await floor(mqtt_port, count, rate),
            "device -> browser": await mqtt_to_ws(mqtt_port, http, f"m2w{count}", count, rate),
            f"{args.devices} devices -> browser": await mqtt_to_ws(
                mqtt_port, http, f"f2w{count}", count, rate, args.devices),
            "browser -> device": await ws_to_mqtt(mqtt_port, http, f"w2m{count}", count, rate),
        }
        show(title, rows, "floor (device -> device)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=100,
                        help="devices publishing into one room in the fleet rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # The broker holds a burst the gateway has not stored yet (it acknowledges a message
        # only once stored): deploy/mosquitto/mosquitto.conf's queue size, not the default 1000.
        queue = "max_queued_messages 100000\n"
        broker = Mosquitto(workdir, extra_config="allow_anonymous true\n" + queue)
        redis = Redis(workdir)
        broker.start()
        gateway, http = start_gateway(workdir, redis.url, broker.url)
        try:
            time.sleep(1.5)
            asyncio.run(run(args, broker.port, http))
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(15)
            broker.stop()
            redis.stop()


if __name__ == "__main__":
    main()
