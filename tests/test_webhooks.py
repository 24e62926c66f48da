"""Webhooks out: the relay's ``webhook`` role in-process, POSTing to a real local HTTP
receiver (tests/webhook_receiver.py) over real HTTP; signatures, delivery ids, retries and
backoff, pause and resume, event kinds, room patterns, room policy; the API and the admin
through Django's test client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from prometheus_client import REGISTRY

from gateway import (
    access,
    admin_webhooks,  # noqa: F401 (registers the admin, as gateway/admin.py does)
    events,
    relay,
    services,
    webhooks,
)
from gateway.errors import GatewayError
from gateway.models import RelayCursor, Webhook
from gateway.policy import Policy
from gateway.relay import Relay
from protocols.webhook import signing, wire
from protocols.webhook.relay import WebhookRole, delivery_id
from protocols.webhook.sender import USER_AGENT, WebhookSender, address_refused
from tests.webhook_receiver import Receiver

ALICE = events.sender(protocol="web", id="anon:alice", name="alice")
TICK = 0.05

@pytest.fixture
def fast_retries(monkeypatch):
    """The relay's backoff from 0.1 s (doubling, with jitter) rather than 1 s."""
    monkeypatch.setattr(relay, "RETRY_FIRST", 0.1)
    monkeypatch.setattr(relay, "RETRY_MAX", 0.4)


@contextlib.asynccontextmanager
async def delivering(timeout: float = 5.0, allow_private: bool = True
                     ) -> AsyncIterator[Relay]:
    """The webhook role's relay, leading, with its sender, as ``gateway run`` starts them
    (allowed to reach the receivers of these tests, on this machine)."""
    sender = WebhookSender(timeout=timeout, allow_private=allow_private)
    await sender.start()
    r = Relay(WebhookRole(sender), tick=TICK)
    await r.start()
    try:
        await until(lambda: r.leader, what="never led")
        yield r
    finally:
        await r.stop()
        await sender.stop()


async def until(condition, timeout: float = 10.0, what: str = "not in time") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 (polled: the relay tells nobody)
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(what) from None


@database_sync_to_async
def post(room: str, text: str = "hi") -> int:
    event, _ = services.room_message_post(room=room, text=text, sender=ALICE, origin="test")
    return event["id"]


@database_sync_to_async
def register(url: str, rooms: list[str], events: list[str] | None = None,
             name: str = "hook") -> tuple[Webhook, str]:
    return webhooks.webhook_create(name=name, url=url, rooms=rooms, events=events)


@database_sync_to_async
def stored(webhook: Webhook) -> Webhook:
    return Webhook.objects.get(pk=webhook.pk)


def deliveries(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_webhook_deliveries_total",
                                     {"result": result}) or 0.0


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_a_webhook_failing_in_one_room_pauses_even_while_its_other_rooms_go_through(
        fast_retries, settings):
    settings.WEBHOOK = {**settings.WEBHOOK, "PAUSE_AFTER": 0.6}
    async with Receiver(refuse_room="broken") as receiver, delivering():
        webhook, _ = await register(receiver.url(), ["broken", "fine"])
        await post("broken", "refused")
        await receiver.wait(lambda: any(r.status == 400 for r in receiver.requests))
        row = await stored(webhook)
        for _ in range(30):  # the failure recorded (just after the answer)
            if row.failing_since is not None:
                break
            await asyncio.sleep(0.02)
            row = await stored(webhook)
        for i in range(200):  # the other room keeps succeeding meanwhile
            await post("fine", f"m{i}")
            await asyncio.sleep(0.03)  # delivered meanwhile (while not paused)
            row = await stored(webhook)
            if webhooks.webhook_state(row) == "paused":
                break
            assert row.failing_since is not None, "a success in another room cleared it"
    assert webhooks.webhook_state(row) == "paused"
    assert row.last_error.startswith("HTTP 400")
    assert {r.payload["room"] for r in receiver.accepted()} == {"fine"}


# --- where receivers may be --------------------------------------------------------------------


@pytest.mark.parametrize(("address", "private_ok", "public_ok"), [
    ("127.0.0.1", False, True), ("::1", False, True), ("10.1.2.3", False, True),
    ("192.168.0.10", False, True), ("172.20.0.1", False, True), ("100.100.100.200", False, True),
    ("fd00:ec2::254", False, True), ("0.0.0.0", False, True), ("::ffff:10.0.0.1", False, True),
    ("169.254.169.254", False, False), ("fe80::1", False, False),
    ("::ffff:169.254.169.254", False, False), ("93.184.215.14", True, True),
    ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True, True),
])
def test_which_addresses_a_receiver_may_have(address, private_ok, public_ok):
    import ipaddress

    ip = ipaddress.ip_address(address)
    assert (address_refused(ip, allow_private=False) is None) is private_ok
    assert (address_refused(ip, allow_private=True) is None) is public_ok


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_a_name_that_resolves_to_this_machine_is_refused_at_connect_time(fast_retries):
    unreachable_before = deliveries("unreachable")
    async with Receiver() as receiver, delivering(allow_private=False):
        # "localhost" passes the check at registration (a name); the connection is refused.
        webhook, _ = await register(receiver.url().replace("127.0.0.1", "localhost"),
                                    ["lobby"])
        await post("lobby")
        await until(lambda: deliveries("unreachable") > unreachable_before)
        await asyncio.sleep(0.2)
    assert receiver.requests == []
    row = await stored(webhook)
    assert "address is refused: this machine" in row.last_error
    assert row.failing_since is not None


# --- delivery ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_a_receiver_failing_three_times_gets_every_event_once_in_order_signed(
        fast_retries, caplog):
    failed_before = deliveries("error_status")
    async with Receiver(fail_first=3) as receiver, delivering():
        url = receiver.url().replace("http://", "http://user:pass-in-url@")
        webhook, secret = await register(url, ["lobby"])
        for i in range(5):
            await post("lobby", f"m{i}")
        await receiver.wait(lambda: len(receiver.accepted()) == 5)
        await asyncio.sleep(0.3)  # nothing more comes

    assert receiver.cursors() == [1, 2, 3, 4, 5]  # in room order, each once
    ids = [r.id for r in receiver.accepted()]
    assert len(set(ids)) == 5
    assert ids == [delivery_id(webhook.uid, "lobby", c) for c in range(1, 6)]
    first = receiver.requests[:4]  # three 500s, then the same entry accepted
    assert [r.status for r in first] == [500, 500, 500, 200]
    assert {r.id for r in first} == {ids[0]}  # the same delivery id on every retry
    gaps = [b.at - a.at for a, b in zip(first, first[1:], strict=False)]
    for i, gap in enumerate(gaps):  # 0.1 s doubling, each at least half its step (jitter)
        assert gap >= 0.05 * 2 ** i - 0.01, gaps
    for request in receiver.requests:
        request.verify(secret)
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"] == USER_AGENT
        assert request.headers["webhook-signature"].startswith("v1,")
        assert request.headers["authorization"].startswith("Basic ")  # the URL's credentials
    body = receiver.accepted()[0].payload
    assert body == {"type": "message", "id": 1, "room": "lobby", "message": "m0",
                    "sender": {"protocol": "web", "id": "anon:alice", "name": "alice"},
                    "ts": body["ts"], "client_id": None, "reply_to": None, "edited_at": None,
                    "reactions": {}, "attachments": [], "cursor": 1}
    row = await stored(webhook)
    assert row.failing_since is None and row.last_success_at is not None
    assert row.last_error.startswith("HTTP 500 Internal Server Error")
    assert deliveries("error_status") - failed_before == 3
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "webhook delivery failed" in logged
    assert secret not in logged and "pass-in-url" not in logged and "/hook" not in logged


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_a_receiver_that_never_answers_delays_no_other_webhook():
    async with Receiver(hang=True) as stuck, Receiver() as fine, delivering(timeout=2.0):
        hung, _ = await register(stuck.url(), ["lobby", "hall"], name="stuck")
        await register(fine.url(), ["lobby", "hall"], name="fine")
        started = asyncio.get_running_loop().time()
        for i in range(3):
            await post("lobby", f"m{i}")
            await post("hall", f"h{i}")
        await fine.wait(lambda: len(fine.accepted()) == 6, timeout=5)
        assert asyncio.get_running_loop().time() - started < 1.5  # before the first timeout
        assert len(stuck.requests) == 2  # one in flight per room, hanging
        await until(lambda: len(stuck.requests) >= 3, what="the timed-out request not retried")
        row = await stored(hung)
        assert row.last_error == "no answer within 2s" and row.failing_since is not None
    assert sorted(r.payload["message"] for r in fine.accepted()) == [
        "h0", "h1", "h2", "m0", "m1", "m2"]


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_failing_too_long_pauses_and_enabling_resumes_missing_and_repeating_nothing(
        fast_retries, settings):
    settings.WEBHOOK = {**settings.WEBHOOK, "PAUSE_AFTER": 0.6}
    async with Receiver() as receiver, delivering():
        webhook, secret = await register(receiver.url(), ["lobby"])
        await post("lobby", "m1")
        await post("lobby", "m2")
        await receiver.wait(lambda: receiver.cursors() == [1, 2])
        receiver.status = 503
        await post("lobby", "m3")
        for _ in range(300):
            row = await stored(webhook)
            if webhooks.webhook_state(row) == "paused":
                break
            await asyncio.sleep(0.02)
        assert webhooks.webhook_state(row) == "paused" and not row.enabled
        assert row.paused_at is not None and row.last_error.startswith("HTTP 503")
        shown = await database_sync_to_async(webhooks.webhooks_dashboard)()
        assert [(w["name"], w["state"]) for w in shown] == [("hook", "paused")]
        await post("lobby", "m4")
        attempts = len(receiver.requests)
        await asyncio.sleep(0.5)
        assert len(receiver.requests) == attempts  # paused: nothing is sent
        receiver.status = 200
        await database_sync_to_async(webhooks.webhook_update)(webhook=row, enabled=True)
        await receiver.wait(lambda: receiver.cursors()[-1:] == [4])
        await asyncio.sleep(0.3)
        row = await stored(webhook)
    assert receiver.cursors() == [1, 2, 3, 4]  # nothing missed, nothing twice
    assert len({r.id for r in receiver.accepted()}) == 4
    assert webhooks.webhook_state(row) == "active" and row.paused_at is None
    for request in receiver.requests:
        request.verify(secret)


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_410_gone_pauses_at_once():
    async with Receiver(status=410) as receiver, delivering():
        webhook, _ = await register(receiver.url(), ["lobby"])
        await post("lobby", "m1")
        await receiver.wait(lambda: len(receiver.requests) == 1)
        for _ in range(200):
            row = await stored(webhook)
            if not row.enabled:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
    assert webhooks.webhook_state(row) == "paused" and len(receiver.requests) == 1


# --- what is sent ---------------------------------------------------------------------------


async def act(receiver: Receiver, count: int, step) -> None:
    """Do ``step`` (in the database thread) and wait until ``count`` requests came."""
    await database_sync_to_async(step)()
    await receiver.wait(lambda: len(receiver.accepted()) >= count)


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_each_kind_of_event_and_a_webhook_asking_for_some_only():
    async with Receiver() as every, Receiver() as changes, delivering():
        await register(every.url(), ["lobby"], name="all")
        await register(changes.url(), ["lobby"], events=["edit", "delete"], name="changes")
        one = await post("lobby", "first")
        steps = [
            lambda: services.message_edit(room="lobby", id=one, text="first!", sender=ALICE,
                                          staff=False, origin="test"),
            lambda: services.message_react(room="lobby", id=one, emoji="👍", sender=ALICE,
                                           origin="test"),
            lambda: services.message_delete(room="lobby", id=one, sender=ALICE, staff=False,
                                            origin="test"),
            lambda: services.room_close(room="lobby"),
            lambda: services.room_reopen(room="lobby"),
            lambda: services.room_policy_set(room="lobby", policy=Policy(notices=True)),
        ]
        await every.wait(lambda: len(every.accepted()) == 1)
        for count, step in enumerate(steps, start=2):
            await act(every, count, step)
        await changes.wait(lambda: len(changes.accepted()) == 2)
        await asyncio.sleep(0.3)
    kinds = [r.payload["type"] for r in every.accepted()]
    assert kinds == ["message", "edit", "reaction", "delete", "closed", "reopened", "policy"]
    assert every.cursors() == list(range(1, 8))
    by_kind = {r.payload["type"]: r.payload for r in every.accepted()}
    assert by_kind["edit"]["message"] == "first!" and by_kind["edit"]["id"] == one
    assert (by_kind["reaction"]["emoji"], by_kind["reaction"]["added"]) == ("👍", True)
    assert by_kind["closed"] == {"type": "closed", "room": "lobby", "id": None, "cursor": 5}
    assert by_kind["policy"]["policy"]["notices"] is True
    assert [r.payload["type"] for r in changes.accepted()] == ["edit", "delete"]
    assert changes.cursors() == [2, 4]


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_room_patterns_follow_matching_rooms_from_now_and_new_ones_from_their_start():
    await post("sensors-1", "before the webhook")
    await post("other", "not followed")
    async with Receiver() as receiver, delivering():
        await register(receiver.url(), ["sensors-*", "lab?"])
        await post("sensors-1", "after")
        await post("sensors-2", "a new room's first")
        await post("lab1", "lab")
        await post("other", "still not")
        await post("lab12", "not matched by lab?")
        await receiver.wait(lambda: len(receiver.accepted()) == 3)
        await asyncio.sleep(0.3)
    got = sorted((r.payload["room"], r.payload["cursor"], r.payload["message"])
                 for r in receiver.accepted())
    assert got == [("lab1", 1, "lab"), ("sensors-1", 2, "after"),
                   ("sensors-2", 1, "a new room's first")]


@pytest.mark.usefixtures("runtime_stopped")
@pytest.mark.django_db(transaction=True)
async def test_a_policy_that_stops_reaching_webhooks_stops_delivery_and_names_are_formatted():
    def policy_set(policy: Policy):
        return database_sync_to_async(services.room_policy_set)(room="lobby", policy=policy)

    async with Receiver() as receiver, delivering():
        await register(receiver.url(), ["lobby"])
        await policy_set(Policy(name_format={"webhook": "{name} ({protocol})"}))  # cursor 1
        await post("lobby", "shown with its protocol")  # 2
        await receiver.wait(lambda: receiver.cursors() == [1, 2])
        await policy_set(Policy(receive=frozenset({"web", "mqtt"})))  # 3: no webhooks
        await post("lobby", "not for webhooks")  # 4
        await asyncio.sleep(0.5)
        assert receiver.cursors() == [1, 2]
        await policy_set(Policy())  # 5: webhooks again, from here on
        await post("lobby", "for webhooks again")  # 6
        await receiver.wait(lambda: receiver.cursors()[-1:] == [6])
        await asyncio.sleep(0.3)
    assert receiver.cursors() == [1, 2, 6]
    first, message = receiver.accepted()[:2]
    assert first.payload["type"] == "policy"
    assert message.payload["sender"]["name"] == "alice (web)"
    assert receiver.accepted()[2].payload["sender"]["name"] == "alice"


# --- signatures, validation -----------------------------------------------------------------


def test_the_kinds_a_webhook_may_ask_for_are_the_kinds_it_is_sent():
    assert sorted(wire.KINDS) == sorted(webhooks.EVENT_KINDS)


def test_signatures_follow_the_standard_webhooks_test_vector():
    # The vector of the Standard Webhooks reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    signature = signing.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"Webhook-Id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "Webhook-Timestamp": "1614265330",
               "Webhook-Signature": f"v1,bm9wZQ== {signature}"}
    signing.verify(secret, headers, body, now=1614265330 + 10)
    for wrong in ({"now": 1614265330 + 301}, {"now": 1614265330 - 301}):
        with pytest.raises(signing.SignatureError):
            signing.verify(secret, headers, body, **wrong)
    with pytest.raises(signing.SignatureError):
        signing.verify(secret, headers, body + b" ", now=1614265330)
    with pytest.raises(signing.SignatureError):
        signing.verify(signing.secret_generate(), headers, body, now=1614265330)
    made = signing.secret_generate()
    assert made.startswith("whsec_") and len(signing.secret_key(made)) == 32
    assert webhooks.webhook_secret_validate(made) == made


@pytest.mark.parametrize("url", [
    "ftp://example.com/x", "example.com/hook", "http:///nohost", "https://", "http://a b/",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://[fe80::1%25eth0]/",
    "http://2852039166/", "http://0xa9fea9fe/", "http://169.254.43518/",
    "http://[::ffff:169.254.169.254]/", "http://example.com:99999/", "https://x.io/" + "a" * 2000,
    "", None, 42,
])
def test_urls_that_are_refused(url):
    with pytest.raises(GatewayError) as refused:
        webhooks.webhook_url_validate(url)
    assert refused.value.code == "invalid_url"


@pytest.mark.parametrize("url", [
    "http://localhost:8080/hook", "https://user:pw@example.com/x?a=1", "http://receiver/",
    "http://10.0.0.5:9000/", "https://[2001:db8::1]/in", "http://127.0.0.1/",
])
def test_urls_that_are_accepted(url):
    assert webhooks.webhook_url_validate(f" {url} ") == url


def test_logs_and_lists_show_only_a_urls_host():
    assert webhooks.url_host("https://user:pw@example.com:8443/t0ken?x=1") == "example.com:8443"
    assert webhooks.url_host("http://[2001:db8::1]/in") == "[2001:db8::1]"


# --- the API ------------------------------------------------------------------------------------


def call(client, method: str, url: str, key: str | None, body=None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    kwargs = {} if body is None else {"data": json.dumps(body),
                                      "content_type": "application/json"}
    return getattr(client, method.lower())(url, **kwargs, **headers)


@pytest.mark.django_db
def test_the_api_registers_lists_changes_and_deletes_webhooks_with_a_manage_key(client):
    services.room_get_or_create(room="lobby")
    manage = access.api_key_create(name="ops", scopes="manage")[1]
    poster = access.api_key_create(name="bot", scopes="read,post")[1]
    body = {"name": "crm", "url": "https://hooks.example.com/in", "rooms": ["lobby", "s-*"],
            "events": ["message"]}
    assert call(client, "POST", "/api/webhooks", poster, body).status_code == 403
    assert call(client, "GET", "/api/webhooks", poster).status_code == 403
    assert call(client, "GET", "/api/webhooks", None).status_code == 401
    made = call(client, "POST", "/api/webhooks", manage, body)
    assert made.status_code == 201, made.content
    shown = made.json()
    secret = shown.pop("secret")
    assert secret.startswith("whsec_") and Webhook.objects.get().secret == secret
    assert shown == {"id": shown["id"], "name": "crm", "url": "https://hooks.example.com/in",
                     "rooms": ["lobby", "s-*"], "events": ["message"], "enabled": True,
                     "state": "active", "failing_since": None, "paused_at": None,
                     "last_error": "", "last_success_at": None,
                     "created_at": shown["created_at"]}
    url = f"/api/webhooks/{shown['id']}"
    listed = call(client, "GET", "/api/webhooks", manage)
    assert listed.json() == {"webhooks": [shown]} and secret not in listed.content.decode()
    assert call(client, "GET", url, manage).json() == shown
    assert RelayCursor.objects.filter(relay="webhook", target=str(shown["id"])).count() == 1

    for wrong, code in [({"url": "http://169.254.169.254/"}, "invalid_url"),
                        ({"rooms": ["no spaces"]}, "invalid_room"),
                        ({"rooms": []}, "invalid_room"), ({"events": ["typing"]}, "invalid_events"),
                        ({"name": ""}, "invalid_name"), ({"secret": "whsec_x"}, "invalid_secret"),
                        ({"colour": "red"}, "invalid_request")]:
        refused = call(client, "POST", "/api/webhooks", manage, {**body, **wrong})
        assert (refused.status_code, refused.json()["code"]) == (400, code), wrong

    Webhook.objects.filter(pk=shown["id"]).update(enabled=False, paused_at="2025-01-01T00:00Z",
                                                  failing_since="2024-12-31T00:00Z")
    assert call(client, "GET", url, manage).json()["state"] == "paused"
    changed = call(client, "PATCH", url, manage, {"enabled": True, "rooms": ["lobby"]})
    assert changed.status_code == 200, changed.content
    assert {k: changed.json()[k] for k in ("state", "paused_at", "failing_since", "rooms")} == {
        "state": "active", "paused_at": None, "failing_since": None, "rooms": ["lobby"]}
    assert secret not in changed.content.decode()
    assert call(client, "PATCH", url, manage, {"secret": "x"}).json()["code"] == (
        "invalid_request")
    assert call(client, "PATCH", url, manage, {"enabled": "yes"}).status_code == 400

    assert call(client, "DELETE", url, manage).status_code == 204
    gone = call(client, "GET", url, manage)
    assert (gone.status_code, gone.json()["code"]) == (404, "no_such_webhook")
    assert not RelayCursor.objects.filter(relay="webhook").exists()


@pytest.mark.django_db
def test_the_api_answers_follow_the_openapi_document(client):
    from tests.test_openapi import answer_schema, validator

    document = client.get("/api/openapi.json").json()
    manage = access.api_key_create(name="ops", scopes="manage")[1]
    made = call(client, "POST", "/api/webhooks", manage,
                {"name": "crm", "url": "https://example.com/in", "rooms": ["*"]})
    url = "/api/webhooks/{id}"
    answers = [(made, "/api/webhooks", "post"),
               (call(client, "GET", "/api/webhooks", manage), "/api/webhooks", "get"),
               (call(client, "GET", f"/api/webhooks/{made.json()['id']}", manage), url, "get"),
               (call(client, "PATCH", f"/api/webhooks/{made.json()['id']}", manage,
                     {"enabled": False}), url, "patch"),
               (call(client, "GET", "/api/webhooks/999", manage), url, "get")]
    for answer, path, method in answers:
        schema = answer_schema(document, path, method, answer.status_code)
        validator(document, schema).validate(answer.json())


@pytest.mark.django_db
def test_a_key_limited_to_rooms_manages_only_webhooks_on_them(client):
    limited = access.api_key_create(name="ops", scopes="manage", rooms="sensors-*")[1]
    body = {"name": "x", "url": "https://example.com/", "rooms": ["*"]}
    refused = call(client, "POST", "/api/webhooks", limited, body)
    assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
    for rooms in (["sensors-*"], ["sensors-1"]):
        assert call(client, "POST", "/api/webhooks", limited,
                    {**body, "rooms": rooms}).status_code == 201
    other, _ = webhooks.webhook_create(name="all", url="https://example.com/", rooms=["*"])
    assert len(call(client, "GET", "/api/webhooks", limited).json()["webhooks"]) == 2
    assert call(client, "GET", f"/api/webhooks/{other.pk}", limited).status_code == 404


# --- the admin ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_shows_a_new_webhooks_secret_once_and_never_again(client):
    staff = User.objects.create_superuser("staff", password="a-long-staff-pass-phrase")
    client.force_login(staff)
    services.room_get_or_create(room="lobby")
    assert client.get("/admin/gateway/webhook/add/").status_code == 200
    refused = client.post("/admin/gateway/webhook/add/", {
        "name": "crm", "url": "http://169.254.169.254/", "rooms": "lobby"})
    assert refused.status_code == 200 and "link-local" in refused.content.decode()
    page = client.post("/admin/gateway/webhook/add/", {
        "name": "crm", "url": "http://receiver:8080/in", "rooms": "lobby, sensors-*",
        "events": ["message", "edit"]}, follow=True)
    assert page.status_code == 200
    webhook = Webhook.objects.get()
    assert (webhook.rooms, webhook.events, webhook.created_by) == (
        ["lobby", "sensors-*"], ["message", "edit"], "staff")
    assert webhook.secret in page.content.decode()  # shown once, with the success message
    assert webhook.subscriptions.filter(room="lobby").exists()
    change = f"/admin/gateway/webhook/{webhook.pk}/change/"
    for again in (client.get("/admin/gateway/webhook/"), client.get(change)):
        assert again.status_code == 200 and webhook.secret not in again.content.decode()
    assert "receiver:8080" in client.get("/admin/gateway/webhook/").content.decode()

    Webhook.objects.filter(pk=webhook.pk).update(enabled=False, paused_at="2025-01-01T00:00Z")
    assert "PAUSED since" in client.get("/admin/gateway/webhook/").content.decode()
    client.post("/admin/gateway/webhook/", {"action": "enable_webhooks",
                                            "_selected_action": [webhook.pk]})
    webhook.refresh_from_db()
    assert webhook.enabled and webhook.paused_at is None
    saved = client.post(change, {"name": "crm", "url": "http://receiver:8080/in",
                                 "rooms": "sensors-*", "events": [], "enabled": "on"})
    assert saved.status_code == 302, saved.content.decode()[:2000]
    webhook.refresh_from_db()
    assert webhook.rooms == ["sensors-*"] and webhook.events == []
    assert not webhook.subscriptions.filter(room="lobby").exists()  # re-synced
