"""Fan-out benchmark: the gateway against the Channels tutorial and the Python floor.

    python bench/fanout.py                       # fixed load, then a capacity search
    python bench/fanout.py --rooms 2 --clients 50 --rate 10 --duration 10 --rounds 2

Systems, measured in the same run and interleaved round by round:
  floor     a bare ``websockets`` broadcast server (bench/floor_server.py)
  tutorial  daphne + channels-redis RedisChannelLayer + the tutorial's ChatConsumer
  gateway   ``gateway run`` (daphne) with REDIS_URL (channels-redis pub/sub), storing
            every message in SQLite before it fans out

Load: R rooms x N WebSocket clients from a Node ``ws`` load generator (bench/loadgen.mjs),
one sender per room at a fixed rate. Reported per system: server CPU per delivered message
(server process + redis-server, from /proc/<pid>/stat), deliveries per second, p50/p99
latency, lost, duplicated and reordered messages. The capacity search raises the rate until
p99 passes 100 ms, anything is lost, or the system falls behind the offered rate.
Nothing here asserts; it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import free_port, wait_for_port  # noqa: E402

BENCH = ROOT / "bench"
TICKS = os.sysconf("SC_CLK_TCK")
SYSTEMS = ("floor", "tutorial", "gateway")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


class Redis:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True,
                       stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_system(name: str, redis: Redis, workdir: Path, env_extra: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, int, str]:
    """Start a system on a free port: its process, port and room URL pattern. ``env_extra``
    (a gateway's DATABASE_URL, say) is added to its environment."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis.url, **(env_extra or {})}
    if name == "floor":
        cmd = [sys.executable, str(BENCH / "floor_server.py"), str(port)]
    elif name == "tutorial":
        env["DJANGO_SETTINGS_MODULE"] = "bench.tutorial.settings"
        cmd = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
               "bench.tutorial.asgi:application"]
    else:
        datadir = workdir / f"gateway-{port}"
        datadir.mkdir()
        env.update({
            "DJANGO_SETTINGS_MODULE": "settings", "GATEWAY_DATA_DIR": str(datadir),
            "GATEWAY_RATE_LIMIT_PER_SECOND": "100000", "GATEWAY_RATE_LIMIT_BURST": "100000",
            # One load generator opens every room from one address: not a flood here.
            "GATEWAY_ROOM_CREATE_PER_MINUTE": "100000",
            "LOG_LEVEL": "WARNING", "MQTT_ENABLED": "0",
            # Production mode, as it is deployed (DEBUG's query log costs per message).
            "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "bench-" + "x" * 50,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        })
        cmd = [sys.executable, "-m", "gateway.cli", "run", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"{name}-{port}.log", "wb"))  # noqa: SIM115
    wait_for_port(port, timeout=30)
    return proc, port, f"ws://127.0.0.1:{port}/ws/chat/{{room}}/"


def stop_system(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def measure(name: str, redis: Redis, workdir: Path, rooms: int, clients: int, rate: float,
            duration: float) -> dict:
    redis.flush()
    proc, port, url = start_system(name, redis, workdir)
    try:
        time.sleep(1.0)
        cmd = ["node", str(BENCH / "loadgen.mjs"), "--url", url, "--rooms", str(rooms),
               "--clients", str(clients), "--rate", str(rate), "--duration", str(duration),
               "--origin", f"http://127.0.0.1:{port}"]
        loadgen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        # CPU is sampled over the sending window only (connects and settle excluded).
        connect_guess = rooms * clients / 1000 + 1.0
        time.sleep(connect_guess)
        before = cpu_seconds(proc.pid) + cpu_seconds(redis.proc.pid)
        started = time.monotonic()
        out, _ = loadgen.communicate(timeout=duration + 120)
        elapsed = time.monotonic() - started
        after = cpu_seconds(proc.pid) + cpu_seconds(redis.proc.pid)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        stop_system(proc)
    delivered = result["unique"]
    result.update(
        system=name,
        cpu_s=after - before,
        cpu_us_per_delivery=(after - before) / delivered * 1e6 if delivered else None,
        deliveries_per_s=delivered / duration,
        window_s=elapsed,
    )
    return result


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'system':<10}{'µs/deliv':>10}{'deliv/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'lost':>7}{'dup':>6}{'reord':>7}{'conn fail':>10}")
    for r in rows:
        print(f"{r['system']:<10}{fmt(r['cpu_us_per_delivery'], '10.1f')}"
              f"{r['deliveries_per_s']:10.0f}{fmt(r['p50_ms'], '9.2f')}{fmt(r['p99_ms'], '9.2f')}"
              f"{r['lost']:7d}{r['duplicates']:6d}{r['reordered']:7d}{r['connect_failures']:10d}")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def fixed_load(args, redis: Redis, workdir: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s: [] for s in args.systems}
    for round_no in range(1, args.rounds + 1):
        rows = []
        for system in args.systems:
            rows.append(measure(system, redis, workdir, args.rooms, args.clients, args.rate,
                                args.duration))
            runs[system].append(rows[-1])
        print_table(f"round {round_no}: {args.rooms} rooms x {args.clients} clients, "
                    f"{args.rate:g} msg/s per room ({args.rooms * args.clients * args.rate:g} "
                    f"deliveries/s offered), {args.duration:g}s", rows)
    cpu = {s: median([r["cpu_us_per_delivery"] for r in runs[s]]) for s in args.systems}
    print("\nmedian server CPU per delivery and ratios (lower is better)")
    for system in args.systems:
        ratios = "  ".join(f"{cpu[system] / cpu[o]:.2f}x {o}" for o in args.systems if o != system)
        print(f"  {system:<10}{cpu[system]:8.1f} µs   {ratios}")
    return runs


def sustainable(result: dict, offered: float) -> bool:
    return (result["lost"] == 0 and result["duplicates"] == 0 and result["p99_ms"] is not None
            and result["p99_ms"] < 100 and result["deliveries_per_s"] >= 0.95 * offered)


def capacity(args, redis: Redis, workdir: Path) -> dict[str, float]:
    print(f"\ncapacity: {args.rooms} rooms x {args.clients} clients; the rate doubles until p99 "
          ">= 100 ms, a loss, or falling behind, then bisects twice")
    best: dict[str, float] = {}
    peak: dict[str, float] = {}  # highest rate delivered without loss, whatever the latency

    def attempt(system: str, rate: float) -> bool:
        offered = args.rooms * args.clients * rate
        result = measure(system, redis, workdir, args.rooms, args.clients, rate,
                         args.capacity_duration)
        ok = sustainable(result, offered)
        print(f"  {system:<10}{offered:8.0f}/s offered  {result['deliveries_per_s']:8.0f}/s "
              f"delivered  p99 {fmt(result['p99_ms'], '.1f')} ms  lost {result['lost']}  "
              f"{'ok' if ok else 'NOT sustained'}")
        if ok:
            best[system] = max(best.get(system, 0.0), result["deliveries_per_s"])
        if result["lost"] == 0:
            peak[system] = max(peak.get(system, 0.0), result["deliveries_per_s"])
        return ok

    for system in args.systems:
        best[system] = 0.0
        low, high, rate = 0.0, None, args.capacity_start
        while rate <= args.max_rate:
            if not attempt(system, rate):
                high = rate
                break
            low, rate = rate, rate * 2
        for _ in range(2 if high is not None else 0):
            middle = (low + high) / 2
            if attempt(system, middle):
                low = middle
            else:
                high = middle
        if high is None:
            print(f"  {system:<10}still sustained at the highest rate tried (--max-rate)")
    print("\nsustained deliveries per second (ratios)")
    for system in args.systems:
        ratios = "  ".join(
            f"{best[system] / best[o]:.2f}x {o}" for o in args.systems if o != system and best[o]
        )
        print(f"  {system:<10}{best[system]:8.0f}/s   {ratios}")
    print("peak deliveries per second without loss, latency aside")
    for system in args.systems:
        print(f"  {system:<10}{peak.get(system, 0.0):8.0f}/s")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rooms", type=int, default=2)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0, help="messages/s per room")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--no-capacity", action="store_true")
    parser.add_argument("--capacity-duration", type=float, default=6.0)
    parser.add_argument("--capacity-start", type=float, default=2.5, help="per room")
    parser.add_argument("--max-rate", type=float, default=1280.0, help="per room")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()

    for tool in ("node", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required")
    if not (BENCH / "node_modules" / "ws").exists():
        # From the lock file, exactly (node_modules is not kept in the repository).
        subprocess.run(["npm", "ci", "--silent", "--prefix", str(BENCH)], check=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = Redis(workdir)
        try:
            runs = fixed_load(args, redis, workdir)
            best = {} if args.no_capacity else capacity(args, redis, workdir)
        finally:
            redis.stop()
    if args.json:
        args.json.write_text(json.dumps({"fixed": runs, "capacity": best}, indent=2))


if __name__ == "__main__":
    main()
