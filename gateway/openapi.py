"""The HTTP API's OpenAPI 3.1 description, served at ``/api/openapi.json``.

Written by hand next to the views (gateway/api.py, gateway/api_webhooks.py) rather than
generated: the API is small, its refusals matter as much as its answers, and
tests/test_openapi.py holds the two together (every route is described, the document is
valid, and what the views answer follows its schemas).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse

from gateway.devices import COMMAND_MAX, TIMEOUT_MAX, TIMEOUT_MIN

REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ref("Error"), description)


ROOM = {"name": "room", "in": "path", "required": True,
        "description": "1 to 64 of A-Z a-z 0-9 - _ .",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"}}
MESSAGE_ID = {"name": "id", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 1}}
WEBHOOK_ID = {"name": "id", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 1}}
NULLABLE_STRING = {"type": ["string", "null"]}
NULLABLE_TIME = {"type": ["number", "null"], "description": "epoch seconds"}
DEVICE_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$",
             "description": "a device id: 1 to 64 of A-Z a-z 0-9 - _ ."}

COMMON = {
    "401": _error("No credentials where they are needed, or a bad key or token "
                  "(`unauthorized`, `invalid_key`, `token_invalid`, `token_expired`, "
                  "`login_required`)"),
    "403": _error("Not allowed: the key's scopes or rooms (`forbidden`), the room's policy "
                  "(`read_only`), a blocked sender (`blocked`), a session without its CSRF "
                  "token (`csrf_failed`)"),
    "429": {**_error("Too many requests from this key (or messages into this room)"),
            "headers": {"Retry-After": {"schema": {"type": "integer"},
                                        "description": "seconds"}}},
    "503": _error("The database could not be reached: try again"),
}


def _sender() -> dict[str, Any]:
    return {"type": "object", "required": ["protocol", "id", "name"],
            "properties": {"protocol": {"type": "string", "examples": ["api"]},
                           "id": {"type": "string", "examples": ["key:3f2a9c0e"]},
                           "name": {"type": "string"}},
            "additionalProperties": False}


def schemas() -> dict[str, Any]:
    return {
        "Error": {"type": "object", "required": ["type", "code", "detail"],
                  "properties": {"type": {"const": "error"}, "code": {"type": "string"},
                                 "detail": {"type": "string"}},
                  "additionalProperties": False},
        "Sender": _sender(),
        "ReplyRef": {"type": "object", "required": ["id", "sender", "excerpt"],
                     "properties": {"id": {"type": "integer"}, "sender": ref("Sender"),
                                    "excerpt": {"type": "string"}},
                     "additionalProperties": False},
        "Message": {
            "type": "object",
            "required": ["id", "room", "message", "sender", "ts", "client_id", "reply_to",
                         "edited_at", "reactions", "attachments"],
            "properties": {
                "type": {"const": "message"},
                "id": {"type": "integer", "description": "its cursor in the room's log"},
                "room": {"type": "string"},
                "message": {"type": "string", "description": "its text now (after edits)"},
                "sender": ref("Sender"),
                "ts": {"type": "number", "description": "epoch seconds, when stored"},
                "client_id": NULLABLE_STRING,
                "reply_to": {"oneOf": [ref("ReplyRef"), {"type": "null"}]},
                "edited_at": NULLABLE_TIME,
                "reactions": {"type": "object", "additionalProperties": {"type": "integer"},
                              "description": "senders per emoji"},
                "attachments": {"type": "array", "items": ref("Attachment"),
                                "description": "the files it carries (none after a delete)"},
                "deleted": {"type": "boolean"},
                "cursor": {"type": "integer"},
                "duplicate": {"type": "boolean",
                              "description": "its client_id was stored before: this is "
                                             "that message"},
                "command": {"oneOf": [ref("CommandSent"), {"type": "null"}],
                            "description": "only in the answer to a command: the command "
                                           "on its way (null: its client_id was sent "
                                           "before, nothing new)"},
            },
            "additionalProperties": False,
        },
        "CommandSent": {
            "type": "object", "required": ["id", "device", "timeout"],
            "properties": {
                "id": {"type": "string", "description": "its correlation id (the device "
                       "answers with it)"},
                "device": {"type": "string"},
                "timeout": {"type": "number", "description": "seconds it waits for the "
                            "device's answer; none by then: a notice in the room"},
            },
            "additionalProperties": False,
        },
        "Attachment": {
            "type": "object",
            "required": ["id", "name", "type", "size", "width", "height", "url",
                         "thumbnail_url"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string", "description": "its file name, sanitised"},
                "type": {"type": "string", "description": "its content type, read from its "
                         "bytes"},
                "size": {"type": "integer", "description": "bytes"},
                "width": {"type": ["integer", "null"], "description": "an image's pixels"},
                "height": {"type": ["integer", "null"]},
                "url": {"type": "string", "description": "signed; expires "
                        "(GATEWAY_FILE_URL_TTL): read the message again for a new one"},
                "thumbnail_url": {"type": ["string", "null"],
                                  "description": "an image's thumbnail, signed"},
            },
            "additionalProperties": False,
        },
        "MessageUpload": {
            "type": "object",
            "description": "a message with files: `MessagePost`'s fields as form fields, and "
                           "one `file` part per file (`message` may be left out)",
            "required": ["file"],
            "properties": {
                "message": {"type": "string",
                            "maxLength": settings.GATEWAY["MAX_MESSAGE_LENGTH"]},
                "name": {"type": "string"},
                "client_id": {"type": "string", "minLength": 1, "maxLength": 64},
                "reply_to": {"type": "integer", "minimum": 1},
                "file": {"type": "array", "maxItems": settings.GATEWAY["FILE_MAX_COUNT"],
                         "items": {"type": "string", "format": "binary"}},
            },
        },
        "MessagePost": {
            "type": "object", "required": ["message"],
            "properties": {
                "type": {"const": "message", "description": "the default"},
                "message": {"type": "string", "minLength": 1,
                            "maxLength": settings.GATEWAY["MAX_MESSAGE_LENGTH"]},
                "name": {"type": "string", "description": "the sender name shown for this "
                         "message (default: the key's name)"},
                "client_id": {"type": "string", "minLength": 1, "maxLength": 64,
                              "description": "the same again: stored once"},
                "reply_to": {"type": "integer", "minimum": 1},
            },
        },
        "CommandPost": {
            "type": "object", "required": ["type", "device", "command"],
            "description": "a command to one of the room's devices: stored as the room's "
                           "message `/cmd <device> <command>`, then published to the device; "
                           "its answer (or, after `timeout`, a notice that none came) is a "
                           "message replying to it",
            "properties": {
                "type": {"const": "command"},
                "device": {**DEVICE_ID, "description": "a device of the room (it has a status "
                           "or a state there, or posted there)"},
                "command": {"type": "string", "minLength": 1, "maxLength": COMMAND_MAX},
                "timeout": {"type": "number", "minimum": TIMEOUT_MIN, "maximum": TIMEOUT_MAX,
                            "description": "seconds to wait for the answer (default: the "
                                           "gateway's MQTT_COMMAND_TIMEOUT)"},
                "client_id": {"type": "string", "minLength": 1, "maxLength": 64,
                              "description": "the same again: sent once"},
            },
        },
        "DeviceState": {
            "type": "object",
            "required": ["id", "room", "status", "status_at", "detail", "state", "state_at",
                         "seen_at"],
            "description": "a device as a member of a room: its status and its last state, "
                           "as it published them (no history)",
            "properties": {
                "id": {"type": "string"},
                "room": {"type": "string"},
                "status": {"enum": ["online", "offline", "unknown", None],
                           "description": "unknown: online, then silent too long; null: it "
                                          "never said"},
                "status_at": {**NULLABLE_TIME, "description": "epoch seconds of the status's "
                              "last change"},
                "detail": {"type": ["object", "null"],
                           "description": "a JSON status as the device sent it"},
                "state": {"type": ["object", "string", "null"],
                          "description": "its last state: a JSON object, or text"},
                "state_at": NULLABLE_TIME,
                "seen_at": {**NULLABLE_TIME, "description": "when it last published its "
                            "status or state"},
            },
            "additionalProperties": False,
        },
        "Devices": {
            "type": "object", "required": ["room", "devices"],
            "properties": {"room": {"type": "string"},
                           "devices": {"type": "array", "items": ref("DeviceState")}},
            "additionalProperties": False,
        },
        "Change": {
            "type": "object", "required": ["type", "id", "room", "cursor", "duplicate"],
            "description": "an entry of the room's log about one message (its public shape "
                           "on every protocol); `cursor` null: nothing changed",
            "properties": {
                "type": {"enum": ["edit", "delete", "reaction"]},
                "id": {"type": "integer"}, "room": {"type": "string"},
                "cursor": {"type": ["integer", "null"]}, "sender": ref("Sender"),
                "message": {"type": "string"}, "edited_at": {"type": "number"},
                "ts": {"type": "number"}, "emoji": {"type": "string"},
                "added": {"type": "boolean"}, "count": {"type": "integer"},
                "client_id": NULLABLE_STRING, "duplicate": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
        "History": {
            "type": "object",
            "required": ["room", "messages", "last_id", "next_after", "first_available"],
            "properties": {
                "room": {"type": "string"},
                "messages": {"type": "array", "items": ref("Message")},
                "last_id": {"type": "integer", "description": "the room's newest cursor"},
                "next_after": {"type": ["integer", "null"]},
                "first_available": {"type": "integer",
                                    "description": "retention pruned the cursors before it"},
                "pruned": {"type": "boolean",
                           "description": "`after` asked for entries retention pruned"},
            },
            "additionalProperties": False,
        },
        "Policy": {
            "type": "object",
            "properties": {
                "post": {"type": ["array", "null"], "items": {"type": "string"},
                         "description": "sender protocols that may post (null: all)"},
                "receive": {"type": ["array", "null"], "items": {"type": "string"},
                            "description": "protocols the room reaches (null: all)"},
                "name_format": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": "per target protocol: {name}, {protocol}, "
                                               "{room}, {id}"},
                "rate_limit": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["per_second"],
                    "properties": {"per_second": {"type": "number", "exclusiveMinimum": 0},
                                   "burst": {"type": "integer", "minimum": 1}},
                    "additionalProperties": False}]},
                "retention": {"type": "object", "properties": {
                    "days": {"type": ["integer", "null"], "minimum": 0},
                    "messages": {"type": ["integer", "null"], "minimum": 0}},
                    "additionalProperties": False,
                    "description": "null: the gateway's default; 0: forever"},
                "notices": {"type": "boolean", "description": "announce the Telegram chats "
                            "and devices that come and go (a device's status too)"},
                "commands": {"type": ["array", "null"], "items": {"type": "string"},
                             "description": "sender protocols that may send the room's "
                                            "devices commands (null: all that may post)"},
            },
            "additionalProperties": False,
        },
        "Member": {"type": "object", "required": ["protocol", "id", "name", "connections"],
                   "properties": {"protocol": {"type": "string"}, "id": {"type": "string"},
                                  "name": {"type": "string"},
                                  "connections": {"type": "integer"}}},
        "Room": {
            "type": "object", "required": ["name", "last_id", "members", "exists"],
            "properties": {
                "name": {"type": "string"}, "last_id": {"type": "integer"},
                "exists": {"type": "boolean"}, "closed": {"type": "boolean"},
                "first_available": {"type": "integer"}, "last_activity": NULLABLE_TIME,
                "policy": ref("Policy"),
                "members": {"type": "array", "items": ref("Member")},
                "devices": {"type": "array", "items": ref("DeviceState")},
            },
            "additionalProperties": False,
        },
        "RoomSummary": {
            "type": "object",
            "required": ["name", "members", "members_by_protocol", "last_id", "last_activity"],
            "properties": {"name": {"type": "string"}, "members": {"type": "integer"},
                           "members_by_protocol": {"type": "object",
                                                   "additionalProperties": {"type": "integer"}},
                           "last_id": {"type": "integer"}, "last_activity": NULLABLE_TIME},
            "additionalProperties": False,
        },
        "Webhook": {
            "type": "object",
            "required": ["id", "name", "url", "rooms", "events", "enabled", "state"],
            "properties": {
                "id": {"type": "integer"}, "name": {"type": "string"},
                "url": {"type": "string", "format": "uri"},
                "rooms": {"type": "array", "items": {"type": "string"}},
                "events": {"type": "array", "items": {"enum": [
                    "message", "edit", "delete", "reaction", "closed", "reopened", "policy"]}},
                "enabled": {"type": "boolean"},
                "state": {"enum": ["active", "failing", "paused", "disabled"]},
                "failing_since": NULLABLE_TIME, "paused_at": NULLABLE_TIME,
                "last_error": {"type": "string"}, "last_success_at": NULLABLE_TIME,
                "created_at": NULLABLE_TIME,
                "secret": {"type": "string", "description": "only when it is created"},
            },
        },
        "WebhookWrite": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "url": {"type": "string"},
                           "rooms": {"type": "array", "items": {"type": "string"}},
                           "events": {"type": "array", "items": {"type": "string"}},
                           "secret": {"type": "string", "description":
                                      "only when creating: your own secret, whsec_ and the "
                                      "base64 of 24 to 64 bytes; without it the gateway "
                                      "makes one"},
                           "enabled": {"type": "boolean"}},
        },
    }


def _op(summary: str, responses: dict[str, Any], *, scope: str | None = None,
        body: str | None = None, parameters: list[dict[str, Any]] | None = None,
        description: str = "") -> dict[str, Any]:
    common = {status: answer for status, answer in COMMON.items() if status not in responses}
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **common}}
    if description:
        operation["description"] = description
    if scope is not None:
        operation["description"] = (operation.get("description", "") + f" Needs `{scope}`.")
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": ref(body)}}}
    if parameters:
        operation["parameters"] = parameters
    return operation


def paths() -> dict[str, Any]:
    after = {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}}
    limit = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    client_id = {"name": "client_id", "in": "query", "schema": {"type": "string"}}
    bad = _error("A bad body or query (`invalid_json`, `missing_message`, ...)")
    return {
        "/api/rooms/": {"get": _op("The most recently active rooms (those the key may use)", {
            "200": _json({"type": "object", "required": ["rooms"], "properties": {
                "rooms": {"type": "array", "items": ref("RoomSummary")}}}, "the rooms"),
            "400": bad}, scope="read", parameters=[limit])},
        "/api/rooms/{room}/": {
            "parameters": [ROOM],
            "get": _op("A room: its cursor, members, policy, first available cursor",
                       {"200": _json(ref("Room"), "the room"), "400": bad}, scope="read"),
            "put": {**_op("Create the room (and give it a policy)", {
                "200": _json(ref("Room"), "it existed"), "201": _json(ref("Room"), "created"),
                "400": bad, "404": _error("a bad room name")}, scope="manage"),
                "requestBody": {"required": False, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"policy": ref("Policy")}}}}}},
            "patch": {**_op("Close or reopen the room, change its policy (applied live)", {
                "200": _json(ref("Room"), "changed"), "400": bad,
                "404": _error("no such room, or a bad name")}, scope="manage"),
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "properties": {
                        "closed": {"type": "boolean"}, "policy": ref("Policy")},
                        "additionalProperties": False}}}}},
        },
        "/api/rooms/{room}/messages": {
            "parameters": [ROOM],
            "get": _op("History: messages after a cursor, oldest first, each as it is now", {
                "200": _json(ref("History"), "a page"), "400": bad}, scope="read",
                parameters=[after, limit]),
            "post": {**_op("Post a message, with files or without, or send a device a "
                           "command", {
                "201": _json(ref("Message"), "stored (a command: with `command`)"),
                "200": _json(ref("Message"), "its client_id was stored before"),
                "400": _error("a bad body or query (`invalid_json`, `missing_message`, "
                              "`invalid_form`, `invalid_image`, `empty_file`, "
                              "`unknown_type`; a command's `missing_device`, "
                              "`missing_command`, `invalid_device`, `invalid_command`, "
                              "`invalid_timeout`, ...)"),
                "403": _error("Not allowed: the key's scopes or rooms (`forbidden`), the "
                              "room's policy (`read_only`; `command_not_allowed`: commands "
                              "from this protocol), a blocked sender (`blocked`), a device "
                              "staff blocked or that takes no commands "
                              "(`command_not_allowed`), a session without its CSRF token "
                              "(`csrf_failed`)"),
                "404": _error("a bad room name; a new room only staff may open; a device "
                              "the room does not know (`unknown_device`)"),
                "409": _error("the room is closed"),
                "413": _error("over the length limit, or the body over its limit; a file "
                              "too large, too many, or an image with too many pixels"),
                "415": _error("neither JSON nor a multipart form; a file of a type not "
                              "taken (`unsupported_type`), or markup beside an image "
                              "(`unsafe_content`)")}, scope="post"),
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"oneOf": [ref("MessagePost"),
                                                              ref("CommandPost")]}},
                    "multipart/form-data": {"schema": ref("MessageUpload"), "encoding": {
                        "file": {"contentType": "*/*"}}}}}},
        },
        "/api/rooms/{room}/devices": {
            "parameters": [ROOM],
            "get": _op("The room's devices: each one's status and last state, by id", {
                "200": _json(ref("Devices"), "the devices (none: `[]`)"),
                "404": _error("no such room, or a bad name (`room_not_found`, "
                              "`invalid_room`)")}, scope="read"),
        },
        "/api/rooms/{room}/messages/{id}": {
            "parameters": [ROOM, MESSAGE_ID],
            "get": _op("One message as it is now", {
                "200": _json(ref("Message"), "the message"),
                "404": _error("no such message")}, scope="read"),
            "patch": _op("Edit a message (the key's own; any with manage)", {
                "200": _json(ref("Change"), "the edit"), "400": bad,
                "404": _error("no such message"), "409": _error("deleted, or room closed")},
                scope="post", body="MessagePost"),
            "delete": _op("Delete a message (the key's own; any with manage)", {
                "200": _json(ref("Change"), "the delete"),
                "404": _error("no such message"), "409": _error("deleted already")},
                scope="post", parameters=[client_id]),
        },
        "/api/rooms/{room}/messages/{id}/reactions": {
            "parameters": [ROOM, MESSAGE_ID],
            "post": {**_op("React (toggle, or `added` true/false to set)", {
                "200": _json(ref("Change"), "the reaction"), "400": bad,
                "404": _error("no such message")}, scope="post"),
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["emoji"], "properties": {
                        "emoji": {"type": "string"}, "added": {"type": "boolean"},
                        "client_id": {"type": "string"}}}}}}},
        },
        "/api/webhooks": {
            "get": _op("The webhooks", {"200": _json({"type": "object", "properties": {
                "webhooks": {"type": "array", "items": ref("Webhook")}}}, "the webhooks")},
                scope="manage"),
            "post": _op("Register a webhook (its secret is in this answer only)", {
                "201": _json(ref("Webhook"), "registered"), "400": bad},
                scope="manage", body="WebhookWrite"),
        },
        "/api/webhooks/{id}": {
            "parameters": [WEBHOOK_ID],
            "get": _op("A webhook", {"200": _json(ref("Webhook"), "it"),
                                     "404": _error("no such webhook")}, scope="manage"),
            "patch": _op("Change a webhook; `enabled: true` resumes a paused one from where it "
                         "stopped", {"200": _json(ref("Webhook"), "changed"), "400": bad,
                                     "404": _error("no such webhook")},
                         scope="manage", body="WebhookWrite"),
            "delete": _op("Delete a webhook", {"200": {"description": "deleted"},
                                               "204": {"description": "deleted"},
                                               "404": _error("no such webhook")},
                          scope="manage"),
        },
        "/sse/rooms/{room}/": {
            "parameters": [ROOM],
            "get": {"summary": "The room's log as Server-Sent Events (`id` is the cursor; "
                               "`Last-Event-ID` or `after` resumes)",
                    "parameters": [after, {"name": "token", "in": "query",
                                           "schema": {"type": "string"},
                                           "description": "a connect token (JWT)"}],
                    "responses": {"200": {"description": "the stream", "content": {
                        "text/event-stream": {"schema": {"type": "string"}}}},
                        "404": _error("no such room"), "410": _error("the room is closed"),
                        **COMMON}},
        },
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "rt-gateway", "version": "1",
                 "description": "Rooms shared by browsers, MQTT devices, Telegram chats and "
                                "other programs. Errors are `{type, code, detail}`."},
        "paths": paths(),
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "an API key, gwk_...: `gateway manage apikey "
                                          "create` or the admin"},
                "connectToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                 "description": "a connect token from another backend "
                                                "(reads the rooms it may join)"},
                "session": {"type": "apiKey", "in": "cookie", "name": "sessionid",
                            "description": "a logged-in user (writes need the CSRF token)"},
            },
        },
        "security": [{"apiKey": []}, {"connectToken": []}, {"session": []}, {}],
    }


def openapi_json(request: HttpRequest) -> JsonResponse:
    """``GET /api/openapi.json``."""
    return JsonResponse(document(), json_dumps_params={"indent": 1})
