"""The deployment: its files are valid, and its topology works, run as processes on this
machine (no Docker engine here): Redis, Mosquitto and PostgreSQL, three `gateway run`
replicas, and Debian's nginx with deploy/nginx/gateway.conf in front."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import aiomqtt
import psycopg
import pytest
import websockets
import yaml

from tests.botapi import BotApiStandIn
from tests.helpers import FAST, TOKEN, dashboard_socket, snapshot_until, wait_until
from tests.servers import ROOT, Nginx

DEPLOY = ROOT / "deploy"
POSTGRES = "postgres://postgres@127.0.0.1:5432"
# Official images the deployment may use (pinned tags; nothing else is pulled).
IMAGES = {"redis", "postgres", "eclipse-mosquitto", "nginx"}
GATEWAY_IMAGE = "rt-gateway:0.1.0"


def settings_variables() -> set[str]:
    """Every environment variable the gateway reads (settings/ and the CLI)."""
    code = "".join((ROOT / path).read_text() for path in ("settings/__init__.py", "gateway/cli.py"))
    return set(re.findall(r'env_\w+\(\s*"([A-Z0-9_]+)"', code)) | set(
        re.findall(r'os\.environ\.get\("([A-Z0-9_]+)"', code)
    )


def env_file_variables(path: Path) -> set[str]:
    return set(re.findall(r"^([A-Z0-9_]+)=", path.read_text(), re.MULTILINE))


# --- the files ----------------------------------------------------------------------------


def test_nginx_config_passes_nginx_t(tmp_path):
    result = Nginx(tmp_path, [8001, 8002, 8003]).test_config()
    assert result.returncode == 0, result.stderr


def test_every_variable_is_documented():
    read = settings_variables()
    assert {"DATABASE_URL", "REDIS_URL", "TELEGRAM_BOT_TOKEN", "GATEWAY_PROTOCOLS"} <= read
    assert read - env_file_variables(ROOT / "env.example") == set()


def test_compose_uses_only_known_images_files_and_variables():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "mosquitto", "nginx"} <= services.keys()
    replicas = [name for name in services if name.startswith("gateway-")]
    assert len(replicas) == 3
    for name, service in services.items():
        image = service["image"]
        if name in replicas:
            assert image == GATEWAY_IMAGE
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()
            continue
        repository, _, tag = image.partition(":")
        assert repository in IMAGES and tag and tag != "latest", image
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.endswith("passwd"):  # passwd: yours
                assert (DEPLOY / source).exists(), source
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert used and used <= env_file_variables(DEPLOY / "env.example")
    assert env_file_variables(DEPLOY / "env.example") <= settings_variables() | used
    site = (DEPLOY / "nginx" / "gateway.conf").read_text()
    upstreams = re.findall(r"server (gateway-\d+):8000", site)
    assert sorted(upstreams) == sorted(replicas)


def test_kubernetes_manifests_parse_and_fit_the_gateway():
    documents = [
        doc for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) == {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == GATEWAY_IMAGE
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    known = settings_variables()
    configured = set(kinds["ConfigMap"]["data"]) | set(kinds["Secret"]["stringData"])
    configured |= {e["name"] for e in container.get("env", [])}
    assert configured <= known, configured - known
    assert {"DJANGO_SECRET_KEY", "DATABASE_URL", "REDIS_URL"} <= set(kinds["Secret"]["stringData"])
    selector = kinds["Service"]["spec"]["selector"]
    assert selector.items() <= kinds["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


def test_dockerfile_is_slim_non_root_with_the_console_script():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.MULTILINE)
    assert re.search(r"^USER 10001$", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["gateway"]' in dockerfile and "/healthz" in dockerfile
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), source


def test_in_memory_layer_refuses_a_process_without_web(tmp_path):
    env = {"GATEWAY_DATA_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "settings"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "run", "--protocols", "mqtt,telegram"],
        cwd=ROOT, env={**_base_env(), **env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "gateway.E003" in result.stderr and "REDIS_URL" in result.stderr


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}


# --- the topology ---------------------------------------------------------------------------


@pytest.fixture
def postgres_url():
    """A database of its own on the machine's PostgreSQL, dropped afterwards."""
    name = f"gateway_deploy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{POSTGRES}/{name}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


class Browser:
    """A chat page's behaviour over a raw WebSocket through nginx: it keeps the last id it
    saw, reconnects (to whichever replica nginx picks) with ``after=<id>``, and resends what
    was not acknowledged, with the same client_id, as the same sender (the page keeps its
    ``uid`` in localStorage: a client_id is unique per sender, so a resend under a new
    identity would be stored again)."""

    def __init__(self, base: str, room: str, name: str):
        uid = f"deploy-{name}-{uuid.uuid4().hex[:12]}"
        self.url = f"ws://{base.removeprefix('http://')}/ws/chat/{room}/?name={name}&uid={uid}"
        self.origin = base
        self.name = name
        self.received: list[dict] = []
        self.outbox: dict[str, str] = {}
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.socket = None
        self.task: asyncio.Task | None = None

    @property
    def last_id(self) -> int:
        return self.received[-1]["id"] if self.received else 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async with websockets.connect(f"{self.url}&after={self.last_id}",
                                              origin=self.origin, open_timeout=5) as ws:
                    self.socket = ws
                    self.connected.set()
                    for client_id, text in list(self.outbox.items()):
                        await ws.send(json.dumps({"message": text, "client_id": client_id}))
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame["type"] == "message":
                            assert frame["id"] > self.last_id, (self.name, frame, self.last_id)
                            self.received.append(frame)
                        elif frame["type"] == "ack":
                            self.outbox.pop(frame["client_id"], None)
            except (OSError, websockets.ConnectionClosed, websockets.InvalidStatus,
                    TimeoutError):
                pass
            self.connected.clear()
            self.socket = None
            self.reconnects += 1
            await asyncio.sleep(0.3)

    async def send(self, text: str) -> None:
        client_id = uuid.uuid4().hex
        self.outbox[client_id] = text
        if self.socket is not None:
            try:
                await self.socket.send(json.dumps({"message": text, "client_id": client_id}))
            except websockets.ConnectionClosed:
                pass  # resent on reconnect

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def relay_story(replicas) -> list[str]:
    """What the replicas logged about leases, relays and calls to Telegram (a failure's why)."""
    words = ("lease", "relay", "Telegram", "retrying", "now polls")
    return [f"replica {n}: {line}" for n, replica in enumerate(replicas)
            for line in replica.log().splitlines() if any(w in line for w in words)][-60:]


def texts_by_sender(frames: list[dict]) -> dict[str, list[str]]:
    by_sender: dict[str, list[str]] = {}
    for frame in frames:
        text = frame["message"]  # WebSocket and MQTT frames alike
        by_sender.setdefault(frame["sender"]["name"], []).append(text)
    return by_sender


@pytest.mark.slow
async def test_three_replicas_behind_nginx_lose_and_double_nothing_when_one_is_killed(
    redis_server, mosquitto, postgres_url, tmp_path, gateway_factory
):
    # (gateway_factory last: the replicas stop before the servers they use)
    chat = 111
    with BotApiStandIn(TOKEN) as api:
        env = {
            **FAST, "REDIS_URL": redis_server.url, "DATABASE_URL": postgres_url,
            "MQTT_ENABLED": "1", "MQTT_URL": mosquitto.url, "MQTT_SHARED_GROUP": "gateway",
            "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": api.url,
            "TELEGRAM_POLL_TIMEOUT": "5", "TELEGRAM_CHAT_RATE": "100",
            "GATEWAY_RESYNC_INTERVAL": "0.5", "GATEWAY_HEARTBEAT_INTERVAL": "1",
        }
        replicas = [gateway_factory(env=env, datadir=tmp_path / f"replica-{i}")
                    for i in range(3)]
        # Started together: they migrate the new database under the advisory lock, in turn.
        await asyncio.gather(*(asyncio.to_thread(replica.start) for replica in replicas))
        nginx = Nginx(tmp_path, [r.port for r in replicas])
        nginx.start()
        browsers: list[Browser] = []
        try:
            replicas[0].create_user("staff", "a-long-staff-pass-phrase", staff=True)
            api.text_update(chat, "/join hall")
            await api.wait_sent_async(chat, 1)
            browsers = [Browser(nginx.http, "hall", f"b{i}") for i in range(6)]
            for browser in browsers:
                browser.start()
                await asyncio.wait_for(browser.connected.wait(), 10)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as d1, \
                    aiomqtt.Client("127.0.0.1", mosquitto.port) as d2:
                out: dict[str, list[dict]] = {"d1": [], "d2": []}

                async def listen(name: str, device: aiomqtt.Client) -> None:
                    await device.subscribe("rooms/hall/out", qos=1)
                    async for message in device.messages:
                        out[name].append(json.loads(message.payload))

                listeners = [asyncio.create_task(listen("d1", d1)),
                             asyncio.create_task(listen("d2", d2))]
                await asyncio.sleep(0.5)

                async def devices_say(phase: str) -> None:
                    for i in range(3):
                        await d1.publish("rooms/hall/in/d1", f"d1 {phase}{i}".encode(), qos=1)
                        await d2.publish("rooms/hall/in/d2", f"d2 {phase}{i}".encode(), qos=1)
                        await asyncio.sleep(0.1)

                async def browsers_say(phase: str) -> None:
                    for i in range(3):
                        for browser in browsers:
                            await browser.send(f"{browser.name} {phase}{i}")
                        await asyncio.sleep(0.15)

                async def chat_says(phase: str) -> None:
                    for i in range(3):
                        api.text_update(chat, f"tg {phase}{i}")
                        await asyncio.sleep(0.2)

                # Spread over the replicas, and counted over all of them by the dashboard.
                cookie = await asyncio.to_thread(
                    replicas[0].login, "staff", "a-long-staff-pass-phrase"
                )
                await devices_say("a")
                async with dashboard_socket(replicas[1], cookie) as dash:
                    frame = await snapshot_until(dash, lambda f: len(f["processes"]) == 3 and (
                        f["connections"]["by_room"].get("hall") == {"web": 6, "mqtt": 2,
                                                                    "telegram": 1}))
                    # nginx spread the browsers (least_conn): two on each replica
                    per_replica = [p["connections"].get("web", 0) for p in frame["processes"]]
                    assert per_replica == [2, 2, 2], frame["processes"]
                    assert frame["connections"]["total"] == 9

                # Phase a has reached the chat: a double from the kill can only be phase b's.
                await api.wait_sent_async(chat, 1 + 6, timeout=40)
                # Mid-stream, kill the replica that polls Telegram.
                poller = next(r for r in replicas if "now polls Telegram" in r.log())
                survivors = [r for r in replicas if r is not poller]
                stream = asyncio.gather(browsers_say("b"), chat_says("b"))
                await asyncio.sleep(0.2)
                poller.kill()
                await stream
                await devices_say("c")
                await asyncio.gather(browsers_say("d"), chat_says("d"))
                # A rolling restart of another: SIGTERM, its pages resume on the last one.
                stream = asyncio.gather(browsers_say("e"), chat_says("e"))
                await asyncio.sleep(0.2)
                assert survivors[0].terminate() == 0
                await stream

                total = 2 * 6 + 6 * 9 + 9  # devices, browsers, the chat
                for browser in browsers:
                    try:
                        await wait_until(lambda b=browser: len(b.received) >= total, 40,
                                         f"{browser.name} missed messages")
                    except AssertionError:
                        raise AssertionError(
                            f"{browser.name}: {len(browser.received)}/{total}, reconnects "
                            f"{browser.reconnects}, task {browser.task}, outbox "
                            f"{list(browser.outbox.values())}, by sender "
                            f"{texts_by_sender(browser.received)}"
                        ) from None
                await wait_until(
                    lambda: min(len({m["id"] for m in o}) for o in out.values()) >= total, 20,
                    "a device missed messages",
                )
                await api.wait_sent_async(chat, 1 + total - 9, timeout=40)
                await asyncio.sleep(1.5)  # anything doubled would have come by now
                for task in listeners:
                    task.cancel()

            expected = {f"b{i}": [f"b{i} {p}{j}" for p in "bde" for j in range(3)]
                        for i in range(6)}
            expected |= {d: [f"{d} {p}{j}" for p in "ac" for j in range(3)] for d in ("d1", "d2")}
            expected["Alice"] = [f"tg {p}{j}" for p in "bde" for j in range(3)]
            for browser in browsers:  # every message once, in id order, in order per sender
                ids = [m["id"] for m in browser.received]
                texts = [m["message"] for m in browser.received]
                doubled = sorted({t for t in texts if texts.count(t) > 1})
                assert ids == list(range(1, total + 1)), (browser.name, "doubled:", doubled)
                assert texts_by_sender(browser.received) == expected, browser.name
            # the clients of the killed replica and of the restarted one came back
            assert sum(b.reconnects for b in browsers) >= 4
            for name, frames in out.items():
                # QoS 1: a relay taking over may publish a message again, with its id.
                first = {}
                for frame in frames:
                    first.setdefault(frame["id"], frame)
                assert sorted(first) == list(range(1, total + 1)), name
                ordered = [first[i] for i in sorted(first)]
                assert texts_by_sender(ordered) == expected, name
            relayed = [m["visible_text"] for m in api.sent_to(chat)[1:]]
            # Telegram has no idempotent send: the one message a killed replica had just sent
            # to the chat, before recording it, may come again from the next relay. Nothing
            # else, and never across a graceful restart.
            doubled = [t for t in set(relayed) if relayed.count(t) > 1]
            phase = [t.rpartition(" ")[2][0] for t in doubled]  # "b0 (web): b0 b1" -> "b"
            assert len(doubled) <= 1 and phase in ([], ["b"]), (doubled, relay_story(replicas))
            assert len(relayed) == total - 9 + len(doubled)
            relayed = list(dict.fromkeys(relayed))
            by_sender: dict[str, list[str]] = {}
            for text in relayed:
                sender, _, message = text.partition(": ")
                by_sender.setdefault(sender.split(" (")[0], []).append(message)
            assert by_sender == {k: v for k, v in expected.items() if k != "Alice"}
            assert any("now polls Telegram" in r.log() for r in survivors)
        finally:
            for browser in browsers:
                await browser.stop()
            nginx.stop()
