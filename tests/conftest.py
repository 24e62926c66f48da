from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from gateway.runtime import stop_runtime
from tests.botapi import BotApiStandIn
from tests.helpers import TOKEN
from tests.servers import Gateway, Mosquitto, RedisServer


@pytest.fixture
async def runtime_stopped():
    """Stop the event loop's gateway runtime after a consumer test, and close the database
    thread's kept connection so the test database can be dropped."""
    yield
    await stop_runtime()
    await sync_to_async(connections.close_all, thread_sensitive=True)()


def running(server):
    """Start a test's private server and stop it afterwards, whatever happened."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path):
    yield from running(RedisServer(tmp_path))


@pytest.fixture
def mosquitto(tmp_path):
    yield from running(Mosquitto(tmp_path))


@pytest.fixture
def api():
    """The Bot API stand-in (tests/botapi.py), over HTTP on a free port."""
    with BotApiStandIn(TOKEN) as standin:
        yield standin


@pytest.fixture
def gateway_factory(tmp_path):
    started: list[Gateway] = []

    def make(*, env: dict[str, str] | None = None, datadir=None, port=None) -> Gateway:
        gw = Gateway(datadir or tmp_path / "gw", env=env, port=port)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium is not installed (scripts/test.sh installs Debian's chromium)")
    return path


@pytest.fixture
def browser():
    """Debian's Chromium, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(autouse=True)
def room_creation_allowance(monkeypatch):
    """Each test starts with no room-creation history: the per-creator allowance is process
    state, and in-process consumer tests all come from the same (unknown) address."""
    from gateway import services

    monkeypatch.setattr(services, "_room_creations", services._CreationLimits())


@pytest.fixture
def room_events(monkeypatch) -> list[dict]:
    """Every room event the code under test published once its transaction committed, in
    order (they are still published: consumers in the test receive them as usual)."""
    from gateway import broadcast

    captured: list[dict] = []
    publish = broadcast._publish

    def capture(events) -> None:
        captured.extend(dict(event) for event in events)
        publish(events)

    monkeypatch.setattr(broadcast, "_publish", capture)
    return captured


@pytest.fixture(autouse=True)
def attachment_storage(tmp_path, settings):
    """Each test keeps attachments in a folder of its own (never the checkout's)."""
    folder = tmp_path / "attachments"
    settings.STORAGES = {**settings.STORAGES, "attachments": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(folder), "base_url": None}}}
    return folder
