"""The browser-facing sockets against other sites: exact origins (the rule, then through
the ASGI application and a real ``gateway run``), unrouted paths, and the dashboard's CSRF
token and staff re-check."""

from __future__ import annotations

import json
import time

import pytest
import websockets
from channels.testing import WebsocketCommunicator
from django.middleware.csrf import _get_new_csrf_string, _mask_cipher_secret

from gateway.crosssite import (
    csrf_token_valid,
    origin_allowed,
    origin_normalize,
    scope_origin_allowed,
    scope_scheme,
)
from gateway.models import Message
from tests.helpers import FAST, HOSTS, chat, connect, next_message, recv
from tests.servers import free_port

# --- the origin rule -------------------------------------------------------------------


@pytest.fixture
def hosts(settings):
    settings.ALLOWED_HOSTS = HOSTS
    settings.GATEWAY = {**settings.GATEWAY, "ALLOWED_ORIGINS": []}
    return settings


@pytest.mark.parametrize(
    ("scheme", "host", "origin", "allowed"),
    [
        ("http", "127.0.0.1:8000", "http://127.0.0.1:8000", True),
        ("http", "127.0.0.1:8000", "http://127.0.0.1:8001", False),  # another port
        ("http", "127.0.0.1:8000", "https://127.0.0.1:8000", False),  # another scheme
        ("http", "127.0.0.1:8000", "http://localhost:8000", False),  # another host
        ("http", "127.0.0.1:8000", "http://127.0.0.1", False),  # port 80 is another port
        ("http", "localhost", "http://localhost:80", True),  # default ports written out
        ("http", "localhost:80", "http://localhost", True),
        ("https", "localhost", "https://localhost:443", True),
        ("https", "localhost:443", "https://localhost", True),
        ("https", "localhost", "http://localhost", False),
        ("http", "LocalHost:8000", "HTTP://localhost:8000", True),  # case-insensitive
        ("http", "localhost:8000", "http://localhost:8000/", True),  # an empty path is fine
        ("http", "[::1]:8000", "http://[::1]:8000", True),  # IPv6
        ("http", "[::1]:8000", "http://[::1]:8001", False),
        ("http", "[::1]", "http://[::1]:80", True),
        ("http", "[::1]:8000", "http://127.0.0.1:8000", False),
        ("http", "127.0.0.1:8000", None, False),  # no Origin header
        ("http", "127.0.0.1:8000", "", False),
        ("http", "127.0.0.1:8000", "null", False),  # an opaque origin (sandbox, file:)
        ("http", "127.0.0.1:8000", "http://127.0.0.1:8000/path", False),
        ("http", "127.0.0.1:8000", "http://user@127.0.0.1:8000", False),
        ("http", "127.0.0.1:8000", "http://127.0.0.1:99999", False),
        ("http", "127.0.0.1:8000", "ws://127.0.0.1:8000", False),  # not a page's scheme
        ("http", "evil.test:8000", "http://evil.test:8000", False),  # not an allowed host
        ("http", None, "http://127.0.0.1:8000", False),
        ("http", "127.0.0.1:bad", "http://127.0.0.1:bad", False),
    ],
)
def test_origin_must_be_the_sites_own(hosts, scheme, host, origin, allowed):
    assert origin_allowed(scheme=scheme, host=host, origin=origin) is allowed


def test_configured_origins_are_allowed_exactly(hosts):
    hosts.GATEWAY = {**hosts.GATEWAY, "ALLOWED_ORIGINS": [
        "https://app.example.com", "http://localhost:3000", "not an origin",
    ]}
    host = "127.0.0.1:8000"
    assert origin_allowed(scheme="http", host=host, origin="https://app.example.com:443")
    assert origin_allowed(scheme="http", host=host, origin="http://localhost:3000")
    assert not origin_allowed(scheme="http", host=host, origin="http://localhost:3001")
    assert not origin_allowed(scheme="http", host=host, origin="http://app.example.com")
    # the list adds origins; it never makes a foreign Host acceptable
    assert not origin_allowed(scheme="http", host="evil.test", origin="http://localhost:3000")


def test_origin_normalize():
    assert origin_normalize("https://Example.com") == "https://example.com:443"
    assert origin_normalize("http://[::1]:8000") == "http://[::1]:8000"
    assert origin_normalize("http://[::1") is None
    assert origin_normalize("http://example.com?x=1") is None


def scope(headers: dict[str, str], scheme: str | None = None) -> dict:
    result = {"type": "websocket", "headers": [
        (name.encode(), value.encode()) for name, value in headers.items()
    ]}
    if scheme is not None:
        result["scheme"] = scheme
    return result


def test_scheme_from_the_socket_and_from_a_trusted_proxy(hosts):
    hosts.SECURE_PROXY_SSL_HEADER = None
    assert scope_scheme(scope({})) == "http"  # ASGI's default: ws
    assert scope_scheme(scope({}, "ws")) == "http"
    assert scope_scheme(scope({}, "wss")) == "https"
    # a proxy's header counts only when the settings trust it (production mode does)
    assert scope_scheme(scope({"x-forwarded-proto": "https"}, "ws")) == "http"
    hosts.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert scope_scheme(scope({"x-forwarded-proto": "https"}, "ws")) == "https"
    assert scope_scheme(scope({"x-forwarded-proto": "https, http"}, "ws")) == "https"
    assert scope_scheme(scope({"x-forwarded-proto": "http"}, "wss")) == "http"
    assert scope_scheme(scope({}, "wss")) == "https"  # no header: the socket's own scheme


def test_behind_a_tls_proxy_the_https_origin_is_the_sites(hosts):
    headers = {"host": "example.com", "origin": "https://example.com",
               "x-forwarded-proto": "https"}
    hosts.SECURE_PROXY_SSL_HEADER = None
    assert not scope_origin_allowed(scope(headers, "ws"))
    hosts.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert scope_origin_allowed(scope(headers, "ws"))
    assert not scope_origin_allowed(scope({**headers, "origin": "http://example.com"}, "ws"))


def test_csrf_token_is_checked_as_django_checks_a_form(settings):
    settings.CSRF_USE_SESSIONS = False
    secret = _get_new_csrf_string()
    cookies = {"type": "websocket", "cookies": {settings.CSRF_COOKIE_NAME: secret}}
    assert csrf_token_valid(cookies, _mask_cipher_secret(secret))  # {{ csrf_token }}
    assert csrf_token_valid(cookies, secret)  # the cookie's value itself
    assert not csrf_token_valid(cookies, _mask_cipher_secret(_get_new_csrf_string()))
    assert not csrf_token_valid(cookies, None)
    assert not csrf_token_valid(cookies, 42)
    assert not csrf_token_valid(cookies, "short")
    assert not csrf_token_valid(cookies, "!" * 64)
    assert not csrf_token_valid({"cookies": {}}, secret)
    assert not csrf_token_valid({"cookies": {settings.CSRF_COOKIE_NAME: "!" * 32}}, "!" * 32)


# --- through the ASGI application -----------------------------------------------------


@pytest.fixture
def chat_app(settings):
    from gateway.asgi import application

    settings.ALLOWED_HOSTS = HOSTS
    return application


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_the_asgi_application_refuses_foreign_origins_before_accept(chat_app, caplog):
    for origin in ("http://localhost:8001", "https://localhost:8000", None):
        comm = chat(chat_app, "/ws/chat/lobby/", origin)
        assert await comm.connect(timeout=5) == (False, 4403)
    assert "refused a socket from origin 'http://localhost:8001'" in caplog.text
    comm = chat(chat_app, "/ws/chat/lobby/")
    assert (await comm.connect(timeout=5))[0]
    await comm.disconnect()


# --- through a real gateway ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("path", [
    "/ws/nowhere/", "/ws/chat/lobby", "/ws/dashboard/more/", "/", "/ws/chat/a/b/",
    "/ws/chat/a%2Fb/",
])
async def test_unrouted_paths_and_rooms_with_a_slash_are_refused_at_once(gateway_factory, path):
    gw = gateway_factory(env=FAST).start()
    started = time.monotonic()
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(gw, path):
            pass
    elapsed = time.monotonic() - started
    assert refused.value.response.status_code == 403
    assert elapsed < 0.9, f"answered after {elapsed:.2f}s"
    log = gw.log()
    assert "Traceback" not in log and "Exception inside application" not in log
    assert "refused a socket to an unrouted path" in log or "invalid room name" in log


@pytest.mark.slow
async def test_sockets_from_foreign_origins_are_refused(gateway_factory):
    other = free_port()
    gw = gateway_factory(env={**FAST, "GATEWAY_ALLOWED_ORIGINS": f"http://localhost:{other}"})
    gw.start()
    for origin in (f"http://127.0.0.1:{other}", f"https://127.0.0.1:{gw.port}",
                   f"http://localhost:{gw.port}", "null", None):
        for path in ("/ws/chat/lobby/", "/ws/dashboard/"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(gw.ws(path), origin=origin, open_timeout=10):
                    pass
            # autobahn itself answers 400 to an opaque origin ("null")
            expected = 400 if origin == "null" else 403
            assert refused.value.response.status_code == expected, (origin, path)
    assert f"refused a socket from origin 'http://127.0.0.1:{other}'" in gw.log()
    for origin in (gw.origin, f"http://localhost:{other}"):
        async with websockets.connect(gw.ws("/ws/chat/lobby/"), origin=origin,
                                      open_timeout=10) as ws:
            await ws.send(json.dumps({"message": f"from {origin}"}))
            assert (await next_message(ws))["message"] == f"from {origin}"


@pytest.mark.slow
async def test_behind_a_tls_proxy_in_production_the_https_origin_is_accepted(gateway_factory):
    gw = gateway_factory(env={
        **FAST, "DJANGO_DEBUG": "0", "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECRET_KEY": "k" * 40 + "0123456789abcdef",
    }).start()
    proxied = {"X-Forwarded-Proto": "https"}
    async with websockets.connect(gw.ws("/ws/chat/tls/"), origin="https://127.0.0.1:"
                                  f"{gw.port}", additional_headers=proxied,
                                  open_timeout=10) as ws:
        await ws.send(json.dumps({"message": "through the proxy"}))
        assert (await next_message(ws))["message"] == "through the proxy"
    for origin, headers in ((gw.origin, proxied), (f"https://127.0.0.1:{gw.port}", {})):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(gw.ws("/ws/chat/tls/"), origin=origin,
                                          additional_headers=headers, open_timeout=10):
                pass
        assert refused.value.response.status_code == 403


# --- the dashboard socket's actions ----------------------------------------------------


def logged_in_session(user):
    """A stored session logged in as ``user``, as Django's login() leaves it (the dashboard
    checks that its session still is)."""
    from importlib import import_module

    from django.conf import settings as django_settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY

    session = import_module(django_settings.SESSION_ENGINE).SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return session


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_dashboard_actions_check_csrf_and_staff_each_time(settings, monkeypatch):
    from channels.db import database_sync_to_async
    from django.contrib.auth.models import User

    from consumers import dashboard as dashboard_consumer

    monkeypatch.setattr(dashboard_consumer, "INTERVAL", 3600)  # no snapshot check meanwhile
    user = await database_sync_to_async(User.objects.create_user)(
        "boss", password="a-long-pass-phrase", is_staff=True
    )
    secret = _get_new_csrf_string()
    session = await database_sync_to_async(logged_in_session)(user)
    comm = WebsocketCommunicator(dashboard_consumer.DashboardConsumer.as_asgi(), "/ws/dashboard/")
    comm.scope.update(user=user, session=session, cookies={settings.CSRF_COOKIE_NAME: secret})
    assert (await comm.connect(timeout=5))[0]
    assert (await recv(comm))["type"] == "snapshot"
    post = {"action": "post", "room": "ops", "message": "hello"}
    await comm.send_to(text_data=json.dumps(post))
    assert (await recv(comm))["code"] == "csrf_failed"
    await comm.send_to(text_data=json.dumps({**post, "csrf": _mask_cipher_secret(secret)}))
    assert await recv(comm) == {"type": "done", "action": "post"}

    await database_sync_to_async(User.objects.filter(pk=user.pk).update)(is_staff=False)
    await comm.send_to(text_data=json.dumps({**post, "csrf": secret}))
    assert (await recv(comm))["code"] == "not_staff"
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4403}
    await comm.send_to(text_data=json.dumps({**post, "csrf": secret}))  # ignored now
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()
    stored = await database_sync_to_async(
        lambda: list(Message.objects.filter(room__name="ops").values_list("text", flat=True))
    )()
    assert stored == ["hello"]
