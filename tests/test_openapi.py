"""The OpenAPI document (gateway/openapi.py) served at /api/openapi.json: valid OpenAPI 3.1,
describing every API route, and what the views answer follows its schemas (checked with
jsonschema on real answers, errors included)."""

from __future__ import annotations

import json
import re

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway import access, events, services
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


def test_the_answers_follow_the_schemas(client, document):
    key = access.api_key_create(name="ci", scopes="read,post,manage")[1]
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}

    def call(method: str, url: str, body=None):
        data = {} if body is None else {"data": json.dumps(body),
                                         "content_type": "application/json"}
        return getattr(client, method)(url, **data, **auth)

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
