"""The OpenAPI document (gateway/openapi.py) served at /api/openapi.json: valid OpenAPI 3.1,
describing every API route, and what the views answer follows its schemas (checked with
jsonschema on real answers, errors included)."""

from __future__ import annotations

import json
import re
import time

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway import access, devices, events, services
from gateway.adapters import adapters_all

pytestmark = pytest.mark.django_db

WEB = events.sender(protocol="web", id="anon:abc", name="alice")


@pytest.fixture
def document(client) -> dict:
    answer = client.get("/api/openapi.json")
    assert answer.status_code == 200 and answer["Content-Type"] == "application/json"
    return answer.json()


def test_the_document_is_valid_openapi_3_1(document):
    validate(document)
    assert document["openapi"] == "3.1.0"


def _route_path(pattern: str) -> str:
    """A URL pattern as an OpenAPI path: ``^api/rooms/(?P<room>[^/]*)/$`` ->
    ``/api/rooms/{room}/``."""
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.strip("^$"))
    return "/" + path.replace("[1-9][0-9]{0,17}", "")


def test_every_api_route_is_described(document):
    routes = {_route_path(str(route.pattern)) for adapter in adapters_all().values()
              for route in adapter.http_routes() if str(route.pattern).lstrip("^").startswith(
                  "api/") and "openapi" not in str(route.pattern)}
    assert routes and routes <= set(document["paths"]), routes - set(document["paths"])
    assert "/sse/rooms/{room}/" in document["paths"]


def validator(document: dict, schema: dict) -> Draft202012Validator:
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:api", resource)
    rebased = json.loads(json.dumps(schema).replace('"#/components', '"urn:api#/components'))
    return Draft202012Validator(rebased, registry=registry)


def answer_schema(document: dict, path: str, method: str, status: int) -> dict:
    response = document["paths"][path][method]["responses"][str(status)]
    return response["content"]["application/json"]["schema"]


def check(document: dict, path: str, method: str, answer) -> dict:
    body = answer.json()
    errors = list(validator(document, answer_schema(document, path, method,
                                                    answer.status_code)).iter_errors(body))
    assert not errors, (path, method, answer.status_code, body, errors[0].message)
    return body


@pytest.fixture
def call(client):
    """A call of the API with a key that may do everything: ``call(method, url, body?)``."""
    key = access.api_key_create(name="ci", scopes="read,post,manage")[1]
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}

    def call(method: str, url: str, body=None):
        data = {} if body is None else {"data": json.dumps(body),
                                         "content_type": "application/json"}
        return getattr(client, method)(url, **data, **auth)

    return call


def test_the_answers_follow_the_schemas(client, call, document):

    services.room_message_post(room="lab", text="first", sender=WEB, origin="w")
    posted = call("post", "/api/rooms/lab/messages", {"message": "hi", "client_id": "c1"})
    check(document, "/api/rooms/{room}/messages", "post", posted)
    again = call("post", "/api/rooms/lab/messages", {"message": "hi", "client_id": "c1"})
    check(document, "/api/rooms/{room}/messages", "post", again)
    reply = call("post", "/api/rooms/lab/messages", {"message": "re", "reply_to": 1})
    assert check(document, "/api/rooms/{room}/messages", "post", reply)["reply_to"]["id"] == 1
    check(document, "/api/rooms/{room}/messages", "get",
          call("get", "/api/rooms/lab/messages?after=0"))
    message = "/api/rooms/lab/messages/2"
    check(document, "/api/rooms/{room}/messages/{id}", "patch",
          call("patch", message, {"message": "edited"}))
    check(document, "/api/rooms/{room}/messages/{id}/reactions", "post",
          call("post", message + "/reactions", {"emoji": "👍"}))
    check(document, "/api/rooms/{room}/messages/{id}", "get", call("get", message))
    check(document, "/api/rooms/{room}/messages/{id}", "delete", call("delete", message))
    check(document, "/api/rooms/{room}/messages/{id}", "get", call("get", message))
    check(document, "/api/rooms/", "get", call("get", "/api/rooms/"))
    check(document, "/api/rooms/{room}/", "put", call("put", "/api/rooms/ops/", {
        "policy": {"post": ["api"], "rate_limit": {"per_second": 1}}}))
    check(document, "/api/rooms/{room}/", "patch", call("patch", "/api/rooms/ops/",
                                                       {"closed": True}))
    check(document, "/api/rooms/{room}/", "get", call("get", "/api/rooms/ops/"))
    # Refusals, each in the Error shape under its status.
    refusals = [
        ("post", "/api/rooms/{room}/messages", call("post", "/api/rooms/lab/messages",
                                                    {"text": "x"})),
        ("post", "/api/rooms/{room}/messages", call("post", "/api/rooms/ops/messages",
                                                    {"message": "x"})),
        ("post", "/api/rooms/{room}/messages", call("post", "/api/rooms/bad%20name/messages",
                                                    {"message": "x"})),
        ("post", "/api/rooms/{room}/messages", call("post", "/api/rooms/lab/messages",
                                                    {"message": "x" * 5000})),
        ("post", "/api/rooms/{room}/messages", client.post(
            "/api/rooms/lab/messages", data="{}", content_type="application/json",
            HTTP_AUTHORIZATION="Bearer gwk_bad_key")),
        ("get", "/api/rooms/{room}/messages/{id}", call("get", "/api/rooms/lab/messages/99")),
    ]
    assert [answer.status_code for _, _, answer in refusals] == [400, 409, 404, 413, 401, 404]
    for method, path, answer in refusals:
        check(document, path, method, answer)


def request_schema(document: dict, path: str, method: str) -> dict:
    body = document["paths"][path][method]["requestBody"]
    return body["content"]["application/json"]["schema"]


def test_devices_and_commands_follow_the_schemas(client, call, document):
    """The devices list (a status, a state as an object and as text, a device that never
    said its status), a command's answer, its repeat, and its refusals."""

    now = time.time()
    devices.devices_report([
        devices.Report(room="home", device_id="thermo1", kind="status", at=now, live=True,
                       status="online"),
        devices.Report(room="home", device_id="thermo1", kind="state", at=now, live=True,
                       state={"temperature": 20.5}),
        devices.Report(room="home", device_id="lamp", kind="state", at=now, live=False,
                       state="on"),
        devices.Report(room="home", device_id="plug", kind="status", at=now, live=True,
                       status="offline", detail={"status": "offline", "reason": "power"}),
    ])
    listed = check(document, "/api/rooms/{room}/devices", "get",
                   call("get", "/api/rooms/home/devices"))
    assert [(d["id"], d["status"], d["state"]) for d in listed["devices"]] == [
        ("lamp", None, "on"), ("plug", "offline", None),
        ("thermo1", "online", {"temperature": 20.5})]
    room = check(document, "/api/rooms/{room}/", "get", call("get", "/api/rooms/home/"))
    assert len(room["devices"]) == 3
    check(document, "/api/rooms/{room}/devices", "get", call("get", "/api/rooms/none/devices"))

    command = {"type": "command", "device": "thermo1", "command": "set 21", "timeout": 5,
               "client_id": "k1"}
    body_schema = request_schema(document, "/api/rooms/{room}/messages", "post")
    for body in (command, {"message": "hi"}, {"type": "message", "message": "hi"}):
        assert not list(validator(document, body_schema).iter_errors(body)), body
    for body in ({**command, "timeout": 0.1}, {"type": "command", "device": "thermo1"},
                 {**command, "device": "bad id"}):
        assert list(validator(document, body_schema).iter_errors(body)), body
    sent = check(document, "/api/rooms/{room}/messages", "post",
                 call("post", "/api/rooms/home/messages", command))
    assert (sent["message"], sent["command"]["device"], sent["command"]["timeout"]) == (
        "/cmd thermo1 set 21", "thermo1", 5.0)
    again = call("post", "/api/rooms/home/messages", command)
    assert again.status_code == 200
    assert check(document, "/api/rooms/{room}/messages", "post", again)["command"] is None

    poster = access.api_key_create(name="poster", scopes="read,post")[1]

    def refused(body) -> tuple[int, str]:
        """Sent with a key without manage: the room's policy applies to it (not to staff)."""
        answer = client.post("/api/rooms/home/messages", data=json.dumps(body),
                             content_type="application/json",
                             HTTP_AUTHORIZATION=f"Bearer {poster}")
        check(document, "/api/rooms/{room}/messages", "post", answer)
        return answer.status_code, answer.json()["code"]

    once = {**command, "client_id": None}
    assert [refused(body) for body in (
        {**once, "device": "ghost"}, {**once, "device": "bad id"}, {**once, "command": " "},
        {**once, "timeout": 301}, {"type": "command", "command": "x"})] == [
        (404, "unknown_device"), (400, "invalid_device"), (400, "invalid_command"),
        (400, "invalid_timeout"), (400, "missing_device")]
    services.room_policy_set(room="home", policy=services.Policy(commands=frozenset({"web"})),
                             by=services.SYSTEM_SENDER)
    assert refused(once) == (403, "command_not_allowed")
    policy = check(document, "/api/rooms/{room}/", "get", call("get", "/api/rooms/home/"))
    assert policy["policy"]["commands"] == ["web"]


def test_the_new_error_codes_are_documented(document):
    post = document["paths"]["/api/rooms/{room}/messages"]["post"]["responses"]
    for status, codes in {"400": ["invalid_device", "invalid_command", "invalid_timeout"],
                          "403": ["command_not_allowed"], "404": ["unknown_device"]}.items():
        for code in codes:
            assert f"`{code}`" in post[status]["description"], (status, code)
    schemas = document["components"]["schemas"]
    assert schemas["DeviceState"]["properties"]["status"]["enum"] == [
        "online", "offline", "unknown", None]
    assert schemas["Policy"]["properties"]["commands"]["type"] == ["array", "null"]
