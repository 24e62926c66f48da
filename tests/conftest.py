from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from gateway.runtime import stop_runtime
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
def gateway_factory(tmp_path):
    started: list[Gateway] = []

    def make(*, env: dict[str, str] | None = None, datadir=None, port=None) -> Gateway:
        gw = Gateway(datadir or tmp_path / "gw", env=env, port=port)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()
