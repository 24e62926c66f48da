"""Every figure of the speed issue in one run: the gateway beside its floors and the tutorial.

    python bench/suite.py                          # every scenario, SQLite and PostgreSQL
    python bench/suite.py --rounds 2 --duration 10
    python bench/suite.py --scenarios ingest connect --databases sqlite

Systems, interleaved within each scenario and round (each started fresh for each
measurement, on a flushed private Redis):
  floor             a bare ``websockets`` broadcast server (bench/floor_server.py); for
                    MQTT, Mosquitto alone (device -> device)
  tutorial          daphne + channels-redis + the Channels tutorial's ChatConsumer
  gateway-sqlite    ``gateway run`` on its embedded SQLite, Redis pub/sub between processes
  gateway-postgres  the same on a fresh PostgreSQL database (DATABASE_URL; --pg-url)

Scenarios (load from bench/loadgen.mjs, Node ``ws`` clients; MQTT from aiomqtt clients):
  ingest       100 rooms x 2 members, one sender per room, 500 messages/s in all: server
               CPU (server + redis-server) per message received, against the floor's
  ingest-3000  the same rooms at 3,000 messages/s: sustained? p99, nothing lost
  fanout       2 rooms x 50 members at 10 messages/s each: CPU per delivery
  room-1000    one room of 1,000 members, 2 messages/s: CPU per delivery at scale
  connect      2,000 browsers connecting at 1,000/s: CPU per connect, connect p50/p99,
               failures
  idle         10,000 sockets in 100 rooms, held quiet for --idle seconds: KB of server
               memory per socket (RSS growth), CPU while idle (% of one core)
  mqtt         device -> browser at 200 messages/s (p50 against Mosquitto's own pub -> sub
               p50), and 100 devices -> browser at 2,500 messages/s through a real Mosquitto

Printed per measurement: CPU per message / delivery / connect, p50/p99, lost, duplicated and
reordered counts; then the medians and their ratios to the floor beside each aim. Figures,
not tests: nothing here asserts, and CI runs none of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import mqtt  # noqa: E402
from bench.fanout import BENCH, Redis, cpu_seconds, start_system, stop_system  # noqa: E402
from tests.servers import Mosquitto  # noqa: E402

SYSTEMS = ("floor", "tutorial", "gateway-sqlite", "gateway-postgres")
SCENARIOS = ("ingest", "ingest-3000", "fanout", "room-1000", "connect", "idle", "mqtt")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def pg_database(base_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one gateway (dropped afterwards): its URL."""
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = base_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def system_env(system: str, args) -> Iterator[dict[str, str]]:
    if system == "gateway-postgres":
        with pg_database(args.pg_url) as url:
            yield {"DATABASE_URL": url}
    else:
        yield {}


class Sampler:
    """CPU (the server and redis-server) and the server's memory at a moment."""

    def __init__(self, server: int, redis: int):
        self.server, self.redis = server, redis

    def __call__(self) -> dict:
        return {"at": time.monotonic(), "cpu": cpu_seconds(self.server) + cpu_seconds(self.redis),
                "rss_kb": rss_kb(self.server)}


def load(system: str, args, redis: Redis, workdir: Path, *, rooms: int, clients: int,
         rate: float, duration: float, storm: bool = False, idle: float = 0.0) -> dict:
    """Start ``system``, run the load generator against it, and read the server's CPU and
    memory at each phase the generator marks."""
    redis.flush()
    kind = "gateway" if system.startswith("gateway") else system
    with system_env(system, args) as env:
        proc, port, url = start_system(kind, redis, workdir, env)
        try:
            time.sleep(1.0)
            sample = Sampler(proc.pid, redis.proc.pid)
            cmd = ["node", str(BENCH / "loadgen.mjs"), "--url", url, "--rooms", str(rooms),
                   "--clients", str(clients), "--rate", str(rate), "--duration", str(duration),
                   "--origin", f"http://127.0.0.1:{port}", "--connect-rate", "1000",
                   "--phases", "1", "--idle", str(idle), "--drain", "3" if rate else "0"]
            if storm:
                cmd += ["--storm", "1"]
            marks = {"start": sample()}
            loadgen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
            out: list[str] = []
            reader = threading.Thread(target=lambda: out.extend(loadgen.stdout), daemon=True)
            reader.start()
            for line in loadgen.stderr:
                with contextlib.suppress(ValueError, KeyError):
                    marks[json.loads(line)["phase"]] = sample()
            loadgen.wait(timeout=duration + idle + 300)
            reader.join(10)
            result = json.loads(out[-1])
        finally:
            stop_system(proc)
    connected, start = result["connected"], marks["start"]
    ready = marks.get("connected", start)
    quiet = marks.get("idle", ready)
    # Sending: from the first measured message to the last one's due time (the warm-up
    # message before it and the drain after it are not charged).
    sending = marks.get("sending", quiet)
    sent = marks.get("sent", sending)
    send_cpu = sent["cpu"] - sending["cpu"]
    result.update(
        system=system,
        cpu_us_per_message=send_cpu / result["sent"] * 1e6 if result["sent"] else None,
        cpu_us_per_delivery=send_cpu / result["unique"] * 1e6 if result["unique"] else None,
        deliveries_per_s=result["unique"] / duration if duration else 0.0,
        messages_per_s=result["sent"] / duration if duration else 0.0,
        cpu_us_per_connect=(ready["cpu"] - start["cpu"]) / connected * 1e6 if connected else None,
        kb_per_socket=(ready["rss_kb"] - start["rss_kb"]) / connected if connected else None,
        idle_cpu_pct=((quiet["cpu"] - ready["cpu"]) / (quiet["at"] - ready["at"]) * 100
                      if quiet is not ready else None),
    )
    return result


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = {
    "messages": [("µs/msg", "cpu_us_per_message", ".1f"), ("msg/s", "messages_per_s", ".0f"),
                 ("deliv/s", "deliveries_per_s", ".0f"), ("p50 ms", "p50_ms", ".2f"),
                 ("p99 ms", "p99_ms", ".2f")],
    "deliveries": [("µs/deliv", "cpu_us_per_delivery", ".1f"),
                   ("deliv/s", "deliveries_per_s", ".0f"), ("p50 ms", "p50_ms", ".2f"),
                   ("p99 ms", "p99_ms", ".2f")],
    "connect": [("µs/conn", "cpu_us_per_connect", ".0f"), ("conn p50", "connect_p50_ms", ".1f"),
                ("conn p99", "connect_p99_ms", ".1f"), ("connected", "connected", "d")],
    "idle": [("KB/socket", "kb_per_socket", ".1f"), ("idle CPU %", "idle_cpu_pct", ".2f"),
             ("connected", "connected", "d")],
}
COUNTS = [("lost", "lost"), ("dup", "duplicates"), ("reord", "reordered"),
          ("conn fail", "connect_failures")]


def print_rows(title: str, rows: list[dict], columns: str) -> None:
    cols = COLUMNS[columns]
    print(f"\n{title}")
    print(f"{'system':<18}" + "".join(f"{name:>11}" for name, _, _ in cols)
          + "".join(f"{name:>10}" for name, _ in COUNTS))
    for row in rows:
        print(f"{row['system']:<18}" + "".join(f"{fmt(row.get(key), spec):>11}"
                                               for _, key, spec in cols)
              + "".join(f"{row.get(key, 0):>10}" for _, key in COUNTS))


def median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


# scenario: (load, systems that run it, the table's columns)
LOADS = {
    "ingest": (dict(rooms=100, clients=2, rate=5.0), SYSTEMS, "messages"),
    "ingest-3000": (dict(rooms=100, clients=2, rate=30.0),
                    ("floor", "gateway-sqlite", "gateway-postgres"), "messages"),
    "fanout": (dict(rooms=2, clients=50, rate=10.0), SYSTEMS, "deliveries"),
    "room-1000": (dict(rooms=1, clients=1000, rate=2.0), SYSTEMS, "deliveries"),
    "connect": (dict(rooms=20, clients=100, rate=0.0, storm=True), SYSTEMS, "connect"),
    "idle": (dict(rooms=100, clients=100, rate=0.0, storm=True), SYSTEMS, "idle"),
}


def socket_scenario(name: str, args, redis: Redis, workdir: Path) -> dict[str, list[dict]]:
    spec, systems, columns = LOADS[name]
    systems = [s for s in systems if s in args.systems]
    duration = 0.0 if spec["rate"] == 0 else args.duration
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for round_no in range(1, args.rounds + 1):
        rows = []
        for system in systems:
            rows.append(load(system, args, redis, workdir, duration=duration,
                             idle=args.idle if name == "idle" else 0.0, **spec))
            runs[system].append(rows[-1])
        print_rows(f"{name}, round {round_no}: {spec['rooms']} rooms x {spec['clients']} "
                   f"clients, {spec['rate']:g} msg/s per room, {duration:g}s", rows, columns)
    return runs


async def mqtt_rows(args, workdir: Path, redis: Redis) -> list[dict]:
    """Device -> browser through a real Mosquitto, beside Mosquitto alone."""
    queue = "max_queued_messages 100000\n"
    broker = Mosquitto(workdir, extra_config="allow_anonymous true\n" + queue)
    broker.start()
    rows: list[dict] = []
    fleet_rate, fleet_count = 2500.0, int(2500 * args.duration)
    one_count = int(200 * args.duration)
    try:
        rows.append({"system": "floor", "path": "device -> device, 200/s",
                     **await mqtt.floor(broker.port, one_count, 200.0)})
        rows.append({"system": "floor", "path": "device -> device, 2500/s",
                     **await mqtt.floor(broker.port, fleet_count, fleet_rate)})
        for system in [s for s in SYSTEMS[2:] if s in args.systems]:
            redis.flush()
            data = workdir / f"mqtt-{system}-{time.monotonic_ns()}"
            data.mkdir()
            with system_env(system, args) as env:
                proc, http = mqtt.start_gateway(data, redis.url, broker.url, env)
                try:
                    await asyncio.sleep(1.5)
                    rows.append({"system": system, "path": "device -> browser, 200/s",
                                 **await mqtt.mqtt_to_ws(broker.port, http, "one", one_count,
                                                         200.0)})
                    rows.append({"system": system, "path": "100 devices -> browser, 2500/s",
                                 **await mqtt.mqtt_to_ws(broker.port, http, "fleet", fleet_count,
                                                         fleet_rate, 100)})
                finally:
                    stop_system(proc)
    finally:
        broker.stop()
    print(f"\nmqtt ({args.duration:g}s per path)")
    print(f"{'system':<18}{'path':<32}{'msgs/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'lost':>6}"
          f"{'dup':>5}")
    for r in rows:
        print(f"{r['system']:<18}{r['path']:<32}{fmt(r['msgs_per_s'], '.0f'):>9}"
              f"{fmt(r['p50_ms'], '.2f'):>9}{fmt(r['p99_ms'], '.2f'):>9}{r['lost']:6d}"
              f"{r['duplicates']:5d}")
    return rows


def aims(results: dict) -> None:
    """The medians beside the issue's aims (ratios to the floor measured in the same run)."""
    print("\nmedians and ratios to the floor (the aims in brackets)")

    def med(scenario: str, system: str, key: str) -> float | None:
        return median([r.get(key) for r in results.get(scenario, {}).get(system, [])])

    def ratio_line(scenario: str, key: str, unit: str, aim: str) -> None:
        if scenario not in results:
            return
        base = med(scenario, "floor", key)
        for system in results[scenario]:
            value = med(scenario, system, key)
            ratio = f"{value / base:6.2f}x floor" if value and base and system != "floor" else ""
            print(f"  {scenario:<12}{system:<18}{fmt(value):>9} {unit:<9}{ratio:<14}"
                  f"{'[' + aim + ']' if ratio else ''}")

    ratio_line("ingest", "cpu_us_per_message", "µs/msg", "<= 4x")
    ratio_line("ingest-3000", "p99_ms", "ms p99", "< 100 ms, nothing lost")
    ratio_line("fanout", "cpu_us_per_delivery", "µs/deliv", "<= 2x")
    ratio_line("room-1000", "cpu_us_per_delivery", "µs/deliv", "<= 2x")
    ratio_line("connect", "cpu_us_per_connect", "µs/conn", "<= 3x, all accepted")
    ratio_line("idle", "kb_per_socket", "KB/sock", "<= 25 KB")
    ratio_line("idle", "idle_cpu_pct", "% core", "10,000 sockets <= 2 %")
    mqtt_rows = results.get("mqtt", [])
    floor_p50 = next((r["p50_ms"] for r in mqtt_rows if r["path"].endswith("200/s")
                      and r["system"] == "floor"), None)
    for r in mqtt_rows:
        if r["system"] == "floor":
            continue
        if r["path"].endswith("200/s") and floor_p50 is not None and r["p50_ms"] is not None:
            print(f"  {'mqtt':<12}{r['system']:<18}{r['p50_ms']:9.2f} ms p50   "
                  f"{r['p50_ms'] - floor_p50:+.2f} ms vs Mosquitto's p50 [<= +1 ms]")
        elif r["msgs_per_s"] is not None:
            print(f"  {'mqtt':<12}{r['system']:<18}{r['msgs_per_s']:9.0f} msg/s    "
                  f"p99 {fmt(r['p99_ms'])} ms, {r['path']} [>= 2,500/s, p99 < 100 ms]")
    bad = [(scenario, system, r[key]) for scenario, by in results.items() if scenario != "mqtt"
           for system, rows in by.items() for r in rows
           for key in ("lost", "duplicates", "reordered", "connect_failures") if r.get(key)]
    bad += [("mqtt", r["system"] + " " + r["path"], r["lost"] + r["duplicates"])
            for r in results.get("mqtt", []) if r["lost"] or r["duplicates"]]
    print("  lost, duplicated, reordered or refused: "
          + ("none" if not bad else "; ".join(f"{a} {b}: {c}" for a, b, c in bad)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"],
                        choices=["sqlite", "postgres"])
    parser.add_argument("--systems", nargs="+", default=None, choices=SYSTEMS,
                        help="default: the floor, the tutorial and each --databases gateway")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--idle", type=float, default=30.0,
                        help="seconds the idle sockets hold (past the 20 s ping interval)")
    parser.add_argument("--pg-url", default="postgres://postgres@127.0.0.1:5432/gateway",
                        help="a PostgreSQL server (its database name is replaced)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    if args.systems is None:
        args.systems = ["floor", "tutorial", *(f"gateway-{db}" for db in args.databases)]
    for tool in ("node", "redis-server", "redis-cli", "mosquitto"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required")
    if not (BENCH / "node_modules" / "ws").exists():
        # From the lock file, exactly (node_modules is not kept in the repository).
        subprocess.run(["npm", "ci", "--silent", "--prefix", str(BENCH)], check=True)

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = Redis(workdir)
        try:
            for scenario in args.scenarios:
                if scenario == "mqtt":
                    results["mqtt"] = asyncio.run(mqtt_rows(args, workdir, redis))
                else:
                    results[scenario] = socket_scenario(scenario, args, redis, workdir)
        finally:
            redis.stop()
    aims(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
