"""The HTTP API with API keys, through Django's test client: keys and their scopes and rooms,
posting with every refusal, idempotent repeats, edits, deletes and reactions, rooms and their
policy, reading with a key or a session."""

from __future__ import annotations

import json

import pytest
from django.core.management import call_command

from gateway import access, events, services
from gateway.models import ApiKey, Message, Room, RoomEvent

pytestmark = pytest.mark.django_db

WEB = events.sender(protocol="web", id="anon:abc", name="alice")


def make_key(scopes="read,post", rooms="", name="ci bot") -> str:
    return access.api_key_create(name=name, scopes=scopes, rooms=rooms)[1]


def call(client, method: str, url: str, key: str | None = None, body=None, **headers):
    if key is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    kwargs = {}
    if body is not None:
        kwargs = {"data": body if isinstance(body, str | bytes) else json.dumps(body),
                  "content_type": headers.pop("content_type", "application/json")}
    return getattr(client, method.lower())(url, **kwargs, **headers)


def post(client, key, room="lobby", **body):
    return call(client, "POST", f"/api/rooms/{room}/messages", key, body)


# --- keys ---------------------------------------------------------------------------------------


def test_a_key_is_shown_once_and_only_its_digest_is_kept():
    record, key = access.api_key_create(name="ci bot", scopes=["read", "post"])
    assert key.startswith(f"gwk_{record.prefix}_") and len(key) > 40
    stored = ApiKey.objects.get(pk=record.pk)
    assert key not in json.dumps([stored.digest, stored.prefix, stored.name])
    assert access.api_key_authenticate(key).pk == record.pk
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "gwk_x", f"gwk_{record.prefix}_x",
                  "nonsense", key + "x"):
        with pytest.raises(access.GatewayError) as refused:
            access.api_key_authenticate(wrong)
        assert refused.value.code == "invalid_key"


def test_the_command_prints_the_key_alone_on_its_last_line(capsys):
    call_command("apikey", "create", "--name", "deploy bot", "--rooms", "sensors-*,lobby",
                 "--scopes", "read,post,manage")
    key = capsys.readouterr().out.strip().splitlines()[-1]
    record = access.api_key_authenticate(key)
    assert (record.name, record.rooms, record.scopes) == (
        "deploy bot", ["sensors-*", "lobby"], ["read", "post", "manage"])
    call_command("apikey", "list")
    listing = capsys.readouterr().out
    assert record.prefix in listing and key not in listing
    call_command("apikey", "revoke", record.prefix)
    with pytest.raises(access.GatewayError):
        access.api_key_authenticate(key)


def test_a_key_posts_as_protocol_api_under_its_name(client):
    key = make_key()
    answer = post(client, key, message="hello from CI", client_id="c-1")
    assert answer.status_code == 201, answer.content
    body = answer.json()
    prefix = key.split("_")[1]
    assert body["sender"] == {"protocol": "api", "id": f"key:{prefix}", "name": "ci bot"}
    assert (body["type"], body["message"], body["room"], body["id"], body["cursor"],
            body["client_id"], body["duplicate"]) == (
        "message", "hello from CI", "lobby", 1, 1, "c-1", False)
    assert answer["Cache-Control"] == "no-store"
    named = post(client, key, message="on behalf of bob", name="bob").json()
    assert named["sender"] == {"protocol": "api", "id": f"key:{prefix}", "name": "bob"}


def test_the_same_client_id_again_is_the_same_message_stored_once(client):
    key = make_key()
    first = post(client, key, message="once", client_id="deploy-42")
    again = post(client, key, message="once", client_id="deploy-42")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == {**first.json(), "duplicate": True}
    assert Message.objects.count() == 1


def test_scopes_and_rooms_of_a_key(client):
    services.room_message_post(room="sensors-1", text="t", sender=WEB, origin="x")
    reader = make_key("read")
    assert post(client, reader, message="x").json()["code"] == "forbidden"
    assert post(client, reader, message="x").status_code == 403
    assert call(client, "GET", "/api/rooms/sensors-1/messages", reader).status_code == 200
    poster = make_key("post", rooms="sensors-*")
    assert post(client, poster, "sensors-2", message="x").status_code == 201
    refused = post(client, poster, "lobby", message="x")
    assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
    assert call(client, "GET", "/api/rooms/sensors-1/messages", poster).status_code == 403
    limited = make_key("read", rooms="sensors-*")
    rooms = call(client, "GET", "/api/rooms/", limited).json()["rooms"]
    assert [room["name"] for room in rooms] == ["sensors-2", "sensors-1"]
    assert call(client, "GET", "/api/rooms/lobby/", limited).status_code == 403


def test_a_revoked_key_and_a_bad_one_are_401_with_a_challenge(client):
    record, key = access.api_key_create(name="old", scopes="post")
    assert post(client, key, message="x").status_code == 201
    access.api_key_revoke(prefix=record.prefix)
    for credential in (key, "gwk_nope_nope", "garbage"):
        refused = post(client, credential, message="x")
        assert (refused.status_code, refused.json()["code"]) == (401, "invalid_key")
        assert refused["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    missing = post(client, None, message="x")
    assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized")
    assert missing["WWW-Authenticate"] == 'Bearer realm="gateway"'
    basic = call(client, "POST", "/api/rooms/lobby/messages", None, {"message": "x"},
                 HTTP_AUTHORIZATION="Basic dXNlcjpwYXNz")
    assert basic.status_code == 401
    assert Message.objects.count() == 1


def test_last_use_is_recorded(client):
    record, key = access.api_key_create(name="k", scopes="read")
    assert record.last_used_at is None
    call(client, "GET", "/api/rooms/", key)
    assert ApiKey.objects.get(pk=record.pk).last_used_at is not None


# --- posting: every refusal -----------------------------------------------------------------------


@pytest.mark.parametrize(("body", "content_type", "status", "code"), [
    ("{not json", "application/json", 400, "invalid_json"),
    ("[1, 2]", "application/json", 400, "not_an_object"),
    ({"text": "x"}, "application/json", 400, "missing_message"),
    ({"message": "   "}, "application/json", 400, "empty_message"),
    ({"message": 5}, "application/json", 400, "invalid_message"),
    ({"message": "a\x00b"}, "application/json", 400, "invalid_message"),
    ({"message": "x", "client_id": ""}, "application/json", 400, "invalid_client_id"),
    ({"message": "x", "reply_to": "7"}, "application/json", 400, "invalid_reply_to"),
    ({"message": "x", "reply_to": 99}, "application/json", 400, "not_found"),
    ({"message": "x", "name": 7}, "application/json", 400, "invalid_name"),
    ({"message": "x" * 4097}, "application/json", 413, "message_too_long"),
    ("message=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
])
def test_bad_bodies(client, body, content_type, status, code):
    key = make_key()
    answer = call(client, "POST", "/api/rooms/lobby/messages", key, body,
                  content_type=content_type)
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.content
    assert set(answer.json()) == {"type", "code", "detail"}
    assert not Message.objects.exists()


def test_a_body_over_the_limit_is_413(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "API_MAX_BODY_BYTES": 2048}
    answer = post(client, make_key(), message="x" * 3000)
    assert (answer.status_code, answer.json()["code"]) == (413, "body_too_large")


def test_a_bad_room_name_is_404_for_writes_and_400_for_reads(client):
    key = make_key()
    answer = post(client, key, room="bad%20room", message="x")
    assert (answer.status_code, answer.json()["code"]) == (404, "invalid_room")
    assert call(client, "GET", "/api/rooms/bad%20room/messages", key).status_code == 400


def test_a_closed_room_is_409_and_a_read_only_one_403(client):
    key = make_key()
    services.room_close(room="closed-room")
    answer = post(client, key, room="closed-room", message="x")
    assert (answer.status_code, answer.json()["code"]) == (409, "room_closed")
    services.room_policy_set(room="quiet", policy=services.Policy(post=frozenset({"web"})))
    answer = post(client, key, room="quiet", message="x")
    assert (answer.status_code, answer.json()["code"]) == (403, "read_only")


def test_too_many_requests_from_one_key_is_429_with_retry_after(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "API_RATE_LIMIT_PER_SECOND": 0.5,
                        "API_RATE_LIMIT_BURST": 3}
    key = make_key()
    answers = [post(client, key, message=f"m{i}") for i in range(5)]
    assert [a.status_code for a in answers] == [201, 201, 201, 429, 429]
    assert answers[3].json()["code"] == "rate_limited"
    assert 1 <= int(answers[3]["Retry-After"]) <= 2
    assert Message.objects.count() == 3


def test_the_room_rate_limit_is_429_with_retry_after(client):
    services.room_policy_set(room="slow", policy=services.Policy(rate_per_second=0.1,
                                                                rate_burst=2))
    key = make_key()
    answers = [post(client, key, room="slow", message=f"m{i}") for i in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 429]
    assert 1 <= int(answers[2]["Retry-After"]) <= 10


def test_rooms_staff_only_refuses_a_new_room_unless_the_key_manages(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "ROOMS_STAFF_ONLY": True}
    answer = post(client, make_key(), room="brand-new", message="x")
    assert (answer.status_code, answer.json()["code"]) == (404, "room_not_found")
    assert post(client, make_key("post,manage"), room="brand-new", message="x").status_code == 201


def test_a_session_posts_as_its_user_with_the_csrf_token(client, django_user_model):
    user = django_user_model.objects.create_user("dora", password="pw-12345-x")
    client.force_login(user)
    csrf_client = type(client)(enforce_csrf_checks=True)
    csrf_client.force_login(user)
    refused = post(csrf_client, None, message="x")
    assert (refused.status_code, refused.json()["code"]) == (403, "csrf_failed")
    answer = post(client, None, message="from my session")
    assert answer.status_code == 201
    assert answer.json()["sender"] == {"protocol": "web", "id": f"user:{user.pk}",
                                       "name": "dora"}


# --- edits, deletes, reactions --------------------------------------------------------------------


def test_a_key_edits_deletes_and_reacts_to_its_own_messages(client):
    key = make_key()
    sent = post(client, key, message="draft").json()
    url = f"/api/rooms/lobby/messages/{sent['id']}"
    edit = call(client, "PATCH", url, key, {"message": "final", "client_id": "e-1"})
    assert edit.status_code == 200, edit.content
    assert (edit.json()["type"], edit.json()["message"], edit.json()["cursor"]) == (
        "edit", "final", 2)
    again = call(client, "PATCH", url, key, {"message": "final", "client_id": "e-1"})
    assert again.json()["duplicate"] is True and again.json()["cursor"] == 2
    same = call(client, "PATCH", url, key, {"message": "final"})
    assert same.json()["cursor"] is None
    react = call(client, "POST", url + "/reactions", key, {"emoji": "👍", "added": True})
    assert (react.json()["type"], react.json()["count"], react.json()["added"]) == (
        "reaction", 1, True)
    assert call(client, "GET", url, key).json()["reactions"] == {"👍": 1}
    gone = call(client, "DELETE", url, key)
    assert (gone.status_code, gone.json()["type"]) == (200, "delete")
    assert call(client, "GET", url, key).json()["deleted"] is True
    twice = call(client, "DELETE", url, key)
    assert (twice.status_code, twice.json()["code"]) == (409, "deleted")
    assert RoomEvent.objects.filter(kind__in=["edit", "reaction", "delete"]).count() == 3


def test_a_key_changes_others_messages_only_with_manage(client):
    event, _ = services.room_message_post(room="lobby", text="mine", sender=WEB, origin="x")
    url = f"/api/rooms/lobby/messages/{event['id']}"
    refused = call(client, "PATCH", url, make_key(), {"message": "yours now"})
    assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
    manager = make_key("read,post,manage")
    assert call(client, "PATCH", url, manager, {"message": "moderated"}).status_code == 200
    assert call(client, "DELETE", url, manager).status_code == 200
    missing = call(client, "PATCH", "/api/rooms/lobby/messages/99", manager, {"message": "x"})
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")


def test_anyone_with_post_reacts(client):
    event, _ = services.room_message_post(room="lobby", text="hi", sender=WEB, origin="x")
    url = f"/api/rooms/lobby/messages/{event['id']}/reactions"
    assert call(client, "POST", url, make_key(), {"emoji": "🎉"}).json()["count"] == 1
    bad = call(client, "POST", url, make_key(), {"emoji": "not an emoji"})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_emoji")


# --- rooms and their policy ----------------------------------------------------------------------


def test_a_manage_key_creates_rooms_changes_policy_and_closes(client):
    manager = make_key("read,manage")
    created = call(client, "PUT", "/api/rooms/ops/", manager,
                   {"policy": {"post": ["web", "api"], "notices": True}})
    assert created.status_code == 201, created.content
    assert created.json()["policy"]["post"] == ["api", "web"]
    assert call(client, "PUT", "/api/rooms/ops/", manager).status_code == 200
    changed = call(client, "PATCH", "/api/rooms/ops/", manager, {
        "policy": {"rate_limit": {"per_second": 2, "burst": 5},
                   "name_format": {"telegram": "{name} via {protocol}"},
                   "retention": {"days": 30}}})
    policy = changed.json()["policy"]
    assert policy == {"post": ["api", "web"], "receive": None,
                      "name_format": {"telegram": "{name} via {protocol}"},
                      "rate_limit": {"per_second": 2.0, "burst": 5},
                      "retention": {"days": 30, "messages": None}, "notices": True,
                      "commands": None}
    assert RoomEvent.objects.filter(kind="policy").count() == 2
    closed = call(client, "PATCH", "/api/rooms/ops/", manager, {"closed": True})
    assert closed.json()["closed"] is True and Room.objects.get(name="ops").closed
    reader = call(client, "GET", "/api/rooms/ops/", make_key("read")).json()
    assert reader["policy"] == {**policy} and reader["closed"] is True


@pytest.mark.parametrize(("policy", "detail"), [
    ({"post": ["carrier-pigeon"]}, "unknown protocols"),
    ({"receive": "web"}, "list of protocols"),
    ({"name_format": {"telegram": "{name.__class__}"}}, "placeholders"),
    ({"name_format": {"telegram": "{0}"}}, "placeholders"),
    ({"rate_limit": {"per_second": 0}}, "between"),
    ({"retention": {"days": -1}}, "between"),
    ({"colour": "blue"}, "unknown keys"),
])
def test_a_bad_policy_is_refused_and_changes_nothing(client, policy, detail):
    manager = make_key("manage")
    call(client, "PUT", "/api/rooms/ops/", manager)
    answer = call(client, "PATCH", "/api/rooms/ops/", manager, {"policy": policy})
    assert (answer.status_code, answer.json()["code"]) == (400, "invalid_policy")
    assert detail in answer.json()["detail"]
    assert not RoomEvent.objects.filter(kind="policy").exists()


def test_managing_rooms_needs_manage(client):
    answer = call(client, "PUT", "/api/rooms/ops/", make_key("read,post"))
    assert (answer.status_code, answer.json()["code"]) == (403, "forbidden")
    missing = call(client, "PATCH", "/api/rooms/nowhere/", make_key("manage"), {"closed": True})
    assert (missing.status_code, missing.json()["code"]) == (404, "room_not_found")


def test_reading_with_a_key_when_login_is_required(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}
    services.room_message_post(room="lobby", text="hi", sender=WEB, origin="x")
    assert client.get("/api/rooms/lobby/messages").status_code == 401
    history = call(client, "GET", "/api/rooms/lobby/messages", make_key("read"))
    assert [m["message"] for m in history.json()["messages"]] == ["hi"]
    assert history.json()["first_available"] == 1
    assert call(client, "GET", "/api/rooms/lobby/", make_key("read")).json()["last_id"] == 1
    assert call(client, "GET", "/api/rooms/lobby/messages", make_key("post")).status_code == 403


def test_unknown_methods_are_405_with_allow(client):
    answer = call(client, "DELETE", "/api/rooms/lobby/messages", make_key())
    assert answer.status_code == 405 and answer["Allow"] == "GET, POST"


# --- the admin ---------------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("boss", password="pw-12345-xyz")
    client.force_login(user)
    return client


def test_the_admin_shows_a_new_key_once_and_revokes_it(staff_client):
    answer = staff_client.post("/admin/gateway/apikey/add/", {
        "name": "dashboard bot", "scopes": ["read", "post"], "rooms": "sensors-*"},
        follow=True)
    shown = [str(m) for m in answer.context["messages"]]
    assert len(shown) == 1 and "copy it now" in shown[0]
    key = next(word for word in shown[0].split() if word.startswith("gwk_"))
    record = access.api_key_authenticate(key)
    assert (record.name, record.scopes, record.rooms, record.created_by) == (
        "dashboard bot", ["read", "post"], ["sensors-*"], "boss")
    page = staff_client.get(f"/admin/gateway/apikey/{record.pk}/change/").content.decode()
    assert record.prefix in page and key not in page
    staff_client.post("/admin/gateway/apikey/", {"action": "revoke",
                                                 "_selected_action": [record.pk]})
    with pytest.raises(access.GatewayError):
        access.api_key_authenticate(key)


def test_the_admin_edits_a_rooms_policy_through_the_services(staff_client):
    services.room_get_or_create(room="lab")
    url = f"/admin/gateway/room/{Room.objects.get(name='lab').pk}/change/"
    form = {"post": ["web", "mqtt"], "receive_all": "on", "name_format": '{"telegram": '
            '"{name} [{protocol}]"}', "rate_per_second": "2", "rate_burst": "4",
            "retention_days": "30", "retention_messages": "", "notices": "on"}
    answer = staff_client.post(url, form)
    assert answer.status_code == 302, answer.content.decode()[:3000]
    policy = services.room_policy_get(room="lab").public()
    assert policy == {"post": ["mqtt", "web"], "receive": None,
                      "name_format": {"telegram": "{name} [{protocol}]"},
                      "rate_limit": {"per_second": 2.0, "burst": 4},
                      "retention": {"days": 30, "messages": None}, "notices": True,
                      "commands": None}
    entry = RoomEvent.objects.get(kind="policy")
    assert entry.sender_id.startswith("staff:") and entry.data == policy
    bad = staff_client.post(url, {**form, "name_format": '{"telegram": "{name.__class__}"}'})
    assert bad.status_code == 200 and "placeholders" in bad.content.decode()
    assert RoomEvent.objects.filter(kind="policy").count() == 1


def test_too_many_new_rooms_is_429_with_retry_after_and_the_room_cap_409(
        client, settings, monkeypatch):
    monkeypatch.setattr(services, "_room_creations", services._CreationLimits())
    settings.GATEWAY = {**settings.GATEWAY, "ROOM_CREATE_PER_MINUTE": 2.0}
    key = make_key()
    assert [post(client, key, room=f"new-{n}", message="x").status_code
            for n in range(2)] == [201, 201]
    paced = post(client, key, room="new-2", message="x")
    assert (paced.status_code, paced.json()["code"]) == (429, "rate_limited")
    assert int(paced["Retry-After"]) >= 1
    settings.GATEWAY = {**settings.GATEWAY, "ROOM_CREATE_PER_MINUTE": 1000.0, "MAX_ROOMS": 2}
    monkeypatch.setattr(services, "_room_creations", services._CreationLimits())
    capped = post(client, key, room="new-3", message="x")
    assert (capped.status_code, capped.json()["code"]) == (409, "too_many_rooms")


def test_a_bad_closed_changes_nothing_not_even_the_policy_given_with_it(client):
    manager = make_key("manage")
    call(client, "PUT", "/api/rooms/ops/", manager)
    answer = call(client, "PATCH", "/api/rooms/ops/", manager,
                  {"policy": {"post": ["web"]}, "closed": "yes"})
    assert (answer.status_code, answer.json()["code"]) == (400, "invalid_request")
    assert not RoomEvent.objects.filter(kind="policy").exists()


def test_another_authorization_scheme_leaves_the_session_to_say_who_it_is(
        client, django_user_model):
    # Behind a proxy's Basic login the browser sends its header on every request.
    user = django_user_model.objects.create_user("carol", password="pw-for-carol")
    client.force_login(user)
    answer = client.get("/api/rooms/", HTTP_AUTHORIZATION="Basic Y2Fyb2w6cHc=")
    assert answer.status_code == 200
    empty = client.get("/api/rooms/", HTTP_AUTHORIZATION="Bearer ")
    assert (empty.status_code, empty.json()["code"]) == (401, "invalid_key")


def test_a_connect_token_reads_but_does_not_post_over_http(client, settings):
    import jwt

    settings.JWT = {**settings.JWT, "SECRET": "a-connect-token-secret-of-at-least-32-chars"}
    token = jwt.encode({"sub": "u-1", "name": "Ada", "exp": 4_000_000_000, "rooms": ["lobby"]},
                       settings.JWT["SECRET"], algorithm="HS256")
    services.room_message_post(room="lobby", text="hi", sender=WEB, origin="x")
    assert call(client, "GET", "/api/rooms/lobby/messages", token).status_code == 200
    refused = post(client, token, message="from a token")
    assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
    assert Message.objects.count() == 1
