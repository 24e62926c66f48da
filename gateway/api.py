"""The HTTP API (JSON), for pages and for other programs: rooms, their history, members and
policy; posting, editing, deleting and reacting; described by the OpenAPI schema served at
``/api/openapi.json`` (gateway/openapi.py).

Who may do what (gateway/access.py):

- ``Authorization: Bearer gwk_...``: an API key, within its scopes (``read``, ``post``,
  ``manage``) and rooms; it posts as protocol ``api`` under its name.
- ``Authorization: Bearer <JWT>``: a connect token's holder reads the rooms it may join.
- The session of a logged-in user (with Django's CSRF token on writes): reads, posts as
  that user on the web; staff also manage.
- Nobody: reads, unless ``GATEWAY_REQUIRE_LOGIN``.

Every refusal is ``{"type": "error", "code", "detail"}`` with its status (``STATUS``), a log
line, and a count in ``gateway_errors_total{protocol="api"}``; a 429 says ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from gateway import access, devices, events, files, metrics, selectors, services
from gateway.adapters import adapters_all
from gateway.errors import GatewayError, RateLimited
from gateway.models import ApiKey
from gateway.names import ROOM_NAME_RULE, room_name_is_valid
from gateway.policy import policy_update
from gateway.views import error_response

logger = logging.getLogger(__name__)

READ, POST, MANAGE = ApiKey.SCOPE_READ, ApiKey.SCOPE_POST, ApiKey.SCOPE_MANAGE

# The status of each refusal, by code (anything else: 400).
STATUS = {
    "unauthorized": 401, "invalid_key": 401, "token_invalid": 401, "token_expired": 401,
    "login_required": 401,
    "forbidden": 403, "read_only": 403, "blocked": 403, "token_room": 403, "csrf_failed": 403,
    "not_reached": 403, "command_not_allowed": 403,
    "unknown_device": 404,
    "invalid_room": 404, "room_not_found": 404, "not_found": 404, "no_such_webhook": 404,
    "method_not_allowed": 405,
    "room_closed": 409, "deleted": 409,
    "message_too_long": 413, "body_too_large": 413,
    "file_too_large": 413, "too_many_files": 413, "image_too_large": 413,
    "unsupported_media_type": 415, "unsupported_type": 415, "unsafe_content": 415,
    "rate_limited": 429,
    "too_many_rooms": 409,  # the gateway's cap on rooms: no wait makes room
    "unavailable": 503,
}

_key_limits = access.KeyLimits()


class ApiError(GatewayError):
    """A refusal with an HTTP status of its own choosing (else ``STATUS``)."""

    def __init__(self, code: str, detail: str, status: int | None = None):
        super().__init__(code, detail)
        self.status = status


class Request:
    """What a handler gets: the request, who makes it, and its body (for writes): JSON, or
    where a handler takes files, a multipart form (its fields in ``body``, its ``file``
    parts in ``uploads``)."""

    def __init__(self, http: HttpRequest, principal: access.Principal) -> None:
        self.http = http
        self.principal = principal
        self._body: dict[str, Any] | None = None
        self.uploads: list[files.Upload] = []

    @property
    def body(self) -> dict[str, Any]:
        if self._body is None:
            self._body = _json_body(self.http)
        return self._body

    def body_or_form(self) -> dict[str, Any]:
        """The JSON body, or a ``multipart/form-data`` one's fields (``uploads`` set)."""
        if self._body is None:
            if self.http.content_type == "multipart/form-data":
                self._body, self.uploads = _form_body(self.http)
            elif self.http.content_type != "application/json":
                raise GatewayError("unsupported_media_type", "send JSON (Content-Type: "
                                   "application/json), or files as multipart/form-data")
        return self.body


Handler = Callable[..., HttpResponse]


def endpoint(methods: dict[str, tuple[str | None, Handler]], *, visitors: tuple[str, ...] = ()):
    """A view of the API: for each method the scope it needs (None: none) and its handler,
    called as ``handler(request, **url_kwargs)``. It authenticates, checks the scope, the
    room's name and the principal's rooms, the key's flood limit, and turns every
    GatewayError into its JSON refusal. ``visitors``: the methods an anonymous visitor's
    page (it has the CSRF cookie) may also call unless login is required, as the chat page
    posts files: with the CSRF token, limited by its address, as the visitor its form names
    (``uid``, ``name``)."""

    @csrf_exempt  # keys and tokens are not ambient credentials; sessions are checked below
    def view(http: HttpRequest, **kwargs: str) -> HttpResponse:
        room = kwargs.get("room")
        principal: access.Principal | None = None
        try:
            if http.method not in methods:
                raise ApiError("method_not_allowed", f"use {', '.join(methods)}")
            scope, handler = methods[http.method]
            principal = _principal(http)
            if (principal.kind == "anonymous" and http.method in visitors
                    and not settings.GATEWAY["REQUIRE_LOGIN"]
                    and settings.CSRF_COOKIE_NAME in http.COOKIES):  # a page of ours
                # (a program without credentials is still told to send a key)
                principal = access.Principal(kind="visitor", scopes=frozenset({READ, POST}))
            _check(http, principal, scope, room)
            response = handler(Request(http, principal), **kwargs)
        except GatewayError as exc:
            response = _refusal(http, principal, room, exc)
        except DatabaseError:
            logger.exception("the API could not reach the database",
                             extra={"protocol": "api", "room": room, "path": http.path})
            response = error_response(503, "unavailable", "try again")
        if http.method not in methods:
            response["Allow"] = ", ".join(methods)
        response["Cache-Control"] = "no-store"
        return response

    return view


def _check(http: HttpRequest, principal: access.Principal, scope: str | None,
           room: str | None) -> None:
    if scope is not None and not principal.may(scope):
        if principal.kind == "anonymous":
            if settings.GATEWAY["REQUIRE_LOGIN"] and scope == READ:
                raise GatewayError("login_required", "log in first, or send an API key")
            raise GatewayError("unauthorized", "send an API key: Authorization: Bearer <key>")
        raise GatewayError("forbidden", f"this {principal.kind} may not {scope}")
    if room is not None:
        if not room_name_is_valid(room):
            # Reads answer 400, as they always have; writes (new with keys) 404.
            status = 400 if http.method == "GET" else 404
            raise ApiError("invalid_room", f"invalid room name: {ROOM_NAME_RULE}", status)
        if not principal.may_use(room):
            raise GatewayError("forbidden", f"this {principal.kind} may not use room {room}")
    if principal.kind in ("user", "visitor") and http.method not in ("GET", "HEAD", "OPTIONS"):
        # A session is sent by the browser whatever page asks: Django's CSRF check, as
        # for a form.
        try:
            refused = CsrfViewMiddleware(lambda request: HttpResponse()).process_view(
                http, None, (), {})
        except (MultiPartParserError, RequestDataTooBig, TooManyFieldsSent,
                TooManyFilesSent) as exc:  # it reads a form's token from the body
            raise GatewayError("invalid_form", f"the body cannot be read: {exc}") from None
        if refused is not None:
            raise GatewayError("csrf_failed", "the CSRF token is missing or wrong")
    limited = principal.key.prefix if principal.key is not None else (
        principal.sender["id"] if principal.kind == "user" and principal.sender else None)
    if principal.kind == "visitor":  # its id is whatever its page sends: its address
        limited = f"ip:{http.META.get('REMOTE_ADDR') or 'unknown'}"
    if limited is not None and (wait := _key_limits.allow(limited)) is not None:
        raise RateLimited(f"too many requests; retry in {wait:.1f}s", wait)


def principal_of(http: HttpRequest) -> access.Principal:
    """Who makes a request: a key, a connect token, the session, or nobody (GatewayError
    for a bad Bearer credential)."""
    return _principal(http)


def _principal(http: HttpRequest) -> access.Principal:
    header = http.headers.get("Authorization")
    scheme, _, credential = (header or "").strip().partition(" ")
    # Only a Bearer header is ours: another scheme (a proxy's Basic login, sent by the
    # browser on every request) leaves the session to say who it is.
    if scheme.lower() == "bearer":
        credential = credential.strip()
        if not credential:
            raise GatewayError("invalid_key", "use Authorization: Bearer <key or token>")
        if access.looks_like_token(credential):
            return access.connect_token_verify(credential).principal()
        return access.key_principal(access.api_key_authenticate(credential))
    user = getattr(http, "user", None)
    if user is not None and user.is_authenticated:
        scopes = {READ, POST, MANAGE} if user.is_staff else {READ, POST}
        sender = events.sender(protocol="web", id=f"user:{user.pk}",
                               name=user.get_username()[:128])
        return access.Principal(kind="user", scopes=frozenset(scopes), sender=sender,
                                staff=bool(user.is_staff))
    scopes = set() if settings.GATEWAY["REQUIRE_LOGIN"] else {READ}
    return access.Principal(kind="anonymous", scopes=frozenset(scopes))


def _refusal(http: HttpRequest, principal: access.Principal | None, room: str | None,
             exc: GatewayError) -> HttpResponse:
    status = getattr(exc, "status", None) or STATUS.get(exc.code, 400)
    metrics.refused("api", exc.code)
    logger.warning("API refused: %s %s", exc.code, exc.detail,
                   extra={"protocol": "api", "room": room, "path": http.path,
                          "method": http.method, "code": exc.code, "status": status,
                          "scope": principal.log_id if principal else None})
    response = error_response(status, exc.code, exc.detail)
    if isinstance(exc, RateLimited):
        response["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if status == 401:
        challenge = 'Bearer realm="gateway"'
        if exc.code in ("invalid_key", "token_invalid", "token_expired"):
            challenge += ', error="invalid_token"'
        response["WWW-Authenticate"] = challenge
    return response


def _declared_length_check(http: HttpRequest, limit: int) -> None:
    """``body_too_large`` when the request says its body is over ``limit`` (before reading
    it; what is read is checked again)."""
    try:
        declared = int(http.headers.get("Content-Length") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise GatewayError("body_too_large", f"the body is over {limit} bytes")


def _json_body(http: HttpRequest) -> dict[str, Any]:
    kind = http.content_type or ""
    if kind != "application/json":
        raise GatewayError("unsupported_media_type", "send JSON (Content-Type: application/json)")
    limit = settings.GATEWAY["API_MAX_BODY_BYTES"]
    _declared_length_check(http, limit)
    raw = http.body
    if len(raw) > limit:
        raise GatewayError("body_too_large", f"the body is over {limit} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise GatewayError("invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise GatewayError("not_an_object", "send a JSON object")
    return data


def _form_body(http: HttpRequest) -> tuple[dict[str, Any], list[files.Upload]]:
    """A multipart form: its fields (one value each; ``reply_to`` as a number) and its
    ``file`` parts, within the files' limits plus the JSON body's for the fields."""
    limit = settings.GATEWAY["FILE_MAX_MESSAGE_BYTES"] + settings.GATEWAY["API_MAX_BODY_BYTES"]
    _declared_length_check(http, limit)
    try:
        form, parts = http.POST, http.FILES
    except (MultiPartParserError, RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent) as exc:
        raise GatewayError("invalid_form", f"the multipart body cannot be read: {exc}") from None
    unknown = set(parts) - {"file"}
    if unknown:
        raise GatewayError("invalid_form", f"files go in 'file' parts, not {sorted(unknown)}")
    data: dict[str, Any] = {key: form.get(key) for key in form}
    if isinstance(data.get("reply_to"), str):
        reply_to = data["reply_to"]
        data["reply_to"] = int(reply_to) if reply_to.isdigit() and len(reply_to) < 19 else (
            reply_to or None)
    uploads = [files.Upload(file=part, size=part.size or 0, name=part.name,
                            declared_type=part.content_type) for part in parts.getlist("file")]
    return data, uploads


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise GatewayError(f"invalid_{key}", f"'{key}' must be a string")
    return value


def _sender(request: Request) -> events.Sender:
    principal = request.principal
    if principal.kind == "visitor":
        uid, name = request.body.get("uid"), request.body.get("name")
        member_id, shown = access.visitor_identity(uid if isinstance(uid, str) else "",
                                                   name if isinstance(name, str) else "")
        return events.sender(protocol="web", id=member_id, name=shown)
    if principal.sender is None:
        raise GatewayError("unauthorized", "send an API key: Authorization: Bearer <key>")
    name = _optional_str(request.body, "name")
    if name is not None and principal.key is not None:
        return access.api_key_sender(principal.key, name)
    return principal.sender


# --- rooms ----------------------------------------------------------------------------------


def rooms_list(request: Request) -> HttpResponse:
    """``?limit=<n>`` (default 200): the most recently active rooms first (those the
    principal may use)."""
    maximum = max(settings.GATEWAY["HISTORY_MAX_PAGE_SIZE"], 200)
    limit = _int_query(request.http, "limit", 200)
    if limit is None or not 1 <= limit <= maximum:
        raise GatewayError("invalid_query", f"'limit' must be 1-{maximum}")
    rooms = selectors.room_list(limit=limit, patterns=request.principal.rooms)
    return JsonResponse({"rooms": rooms})


def room_detail(request: Request, room: str) -> HttpResponse:
    """A room's cursor, members, whether it is closed, its first available cursor (after
    retention) and its policy."""
    return JsonResponse(_room_body(room))


def _room_body(room: str) -> dict[str, Any]:
    found = selectors.room_detail(room=room)
    members = selectors.room_member_list(room=room)
    if found is None:  # listening creates no room: it has no log yet
        return {"name": room, "last_id": 0, "exists": False, "members": members,
                "devices": []}
    return {**found, "exists": True, "members": members,
            "devices": devices.room_devices(room=room)}


def room_put(request: Request, room: str) -> HttpResponse:
    """Create the room (staff may: no creation limit), with ``policy`` if given."""
    data = request.body if request.http.body else {}
    existed = selectors.room_detail(room=room) is not None
    by = _staff_sender(request)
    services.room_get_or_create(room=room)
    if "policy" in data:
        _policy_apply(room, data["policy"], by)
    logger.info("room %s through the API", "ensured" if existed else "created",
                extra={"protocol": "api", "room": room, "scope": request.principal.log_id})
    return JsonResponse(_room_body(room), status=200 if existed else 201)


def room_patch(request: Request, room: str) -> HttpResponse:
    """``{"closed": bool, "policy": {...}}``: close or reopen the room, change its policy
    (the keys given; applied live)."""
    data = request.body
    unknown = sorted(set(data) - {"closed", "policy"})
    if unknown:
        raise GatewayError("invalid_request", f"unknown keys {unknown}: closed, policy")
    if selectors.room_detail(room=room) is None:
        raise GatewayError("room_not_found", f"no room {room}")
    if "closed" in data and not isinstance(data["closed"], bool):  # before anything changes
        raise GatewayError("invalid_request", "'closed' must be true or false")
    by = _staff_sender(request)
    if "policy" in data:
        _policy_apply(room, data["policy"], by)
    if "closed" in data:
        (services.room_close if data["closed"] else services.room_reopen)(room=room, by=by)
    logger.info("room changed through the API", extra={
        "protocol": "api", "room": room, "scope": request.principal.log_id,
        "changed": sorted(data)})
    return JsonResponse(_room_body(room))


def _staff_sender(request: Request) -> events.Sender:
    """Who changes rooms, as their log records it: the key (``api``), or the staff user."""
    principal = request.principal
    if principal.key is not None and principal.sender is not None:
        return principal.sender
    return services.staff_sender(request.http.user)


def _policy_apply(room: str, data: object, by: events.Sender) -> None:
    current = services.room_policy_get(room=room)
    assert current is not None
    senders = {p for adapter in adapters_all().values() for p in adapter.sender_protocols}
    policy = policy_update(current, data, senders=senders, targets=set(adapters_all()))
    services.room_policy_set(room=room, policy=policy, by=by)


# --- messages ---------------------------------------------------------------------------------


def messages_list(request: Request, room: str) -> HttpResponse:
    """``?after=<id>&limit=<n>``: messages after an id, oldest first; ``next_after`` pages on.
    Without ``after``, the newest ``limit`` messages. Each in its current state, with
    ``deleted``. ``first_available``: the room's first cursor after retention; ``pruned``:
    ``after`` asked for entries that were pruned."""
    http = request.http
    maximum = settings.GATEWAY["HISTORY_MAX_PAGE_SIZE"]
    limit = _int_query(http, "limit", settings.GATEWAY["HISTORY_PAGE_SIZE"])
    after = _int_query(http, "after", None)
    if limit is None or not 1 <= limit <= maximum or (after is not None and after < 0):
        raise GatewayError("invalid_query", f"'limit' must be 1-{maximum}; 'after' >= 0 "
                           "('after' and 'limit' are integers)")
    more = False
    # The cursor first: what is stored after it was read is after it too, so a client that
    # resumes from it misses nothing the page did not show.
    last, horizon = selectors.room_cursor_and_horizon(room=room)
    if after is None:
        messages = selectors.room_history(room=room, limit=limit,
                                          absolute=_absolute(request))
    else:
        # One more than the page, to know whether another follows.
        messages = selectors.room_history(room=room, after=after, limit=limit + 1,
                                          absolute=_absolute(request))
        more, messages = len(messages) > limit, messages[:limit]
    page: dict[str, Any] = {"room": room, "messages": messages, "last_id": last,
                            "next_after": messages[-1]["id"] if more else None,
                            "first_available": horizon + 1}
    if after is not None:
        page["pruned"] = after < horizon
    return JsonResponse(page)


def _absolute(request: Request) -> bool:
    """Whether file URLs are absolute (with GATEWAY_PUBLIC_URL) for this reader: for other
    programs; a page (a session, a visitor) gets paths on the origin it was loaded from."""
    return request.principal.kind in ("key", "token")


def message_post(request: Request, room: str) -> HttpResponse:
    """``{"message", "name"?, "client_id"?, "reply_to"?}``: 201 with the stored message;
    the same ``client_id`` again: 200 with that message and ``"duplicate": true``. As a
    multipart form, the same fields and one or more ``file`` parts (``message`` may then be
    left out): the files are checked and kept, then carried by the message.
    ``{"type": "command", "device", "command", "timeout"?, "client_id"?}`` sends one of the
    room's devices a command: 201 with its message, and ``command`` (its ``id``, the
    ``device``, the ``timeout``)."""
    data = request.body_or_form()
    if data.get("type", "message") == "command":
        return _command_post(request, room, data)
    if data.get("type", "message") != "message":
        raise GatewayError("unknown_type", f"unknown type {str(data.get('type'))[:32]!r}")
    uploads = request.uploads
    if "message" not in data and not uploads:
        raise GatewayError("missing_message", "'message' is required")
    sender = _sender(request)
    if request.principal.staff:  # staff open rooms whatever the creation rules
        services.room_get_or_create(room=room)
    elif request.principal.kind == "visitor" and selectors.room_closed(room=room) is None:
        # A visitor posts in the room its page is in: it opens none (its id is its own).
        raise ApiError("room_not_found", f"no room {room}", 404)
    attachments = files.attachments_store(room=room, sender=sender, uploads=uploads) if (
        uploads) else []
    try:
        event, created = services.room_message_post(
            room=room, text=data.get("message", ""), sender=sender,
            origin=f"api-{sender['id']}", client_id=data.get("client_id"),
            reply_to=data.get("reply_to"), attachments=attachments)
    except GatewayError as exc:
        if exc.code in ("not_found", "deleted"):  # what reply_to names: the body is wrong
            raise ApiError(exc.code, f"'reply_to': {exc.detail}", 400) from None
        if exc.code == "room_not_found":
            raise ApiError(exc.code, exc.detail, 404) from None
        raise
    body = {"type": "message", **files.message_public(event, absolute=_absolute(request)),
            "cursor": event["id"],
            "duplicate": not created}
    return JsonResponse(body, status=201 if created else 200)


def _command_post(request: Request, room: str, data: dict[str, Any]) -> HttpResponse:
    for field in ("device", "command"):
        if field not in data:
            raise GatewayError(f"missing_{field}", f"'{field}' is required")
    sender = _sender(request)
    event, command = devices.command_send(
        room=room, device=data["device"], command=data["command"], sender=sender,
        origin=f"api-{sender['id']}", staff=request.principal.staff,
        client_id=data.get("client_id"), timeout=data.get("timeout"))
    devices.command_dispatch(command)
    body = {"type": "message", **files.message_public(event, absolute=_absolute(request)),
            "cursor": event["id"], "duplicate": command is None,
            "command": None if command is None else {
                "id": command.key, "device": command.device_id, "timeout": command.timeout}}
    return JsonResponse(body, status=201 if command is not None else 200)


def devices_list(request: Request, room: str) -> HttpResponse:
    """The room's devices: each one's status and last state (``[]``: none has said)."""
    if selectors.room_closed(room=room) is None:
        raise ApiError("room_not_found", f"no room {room}", 404)
    return JsonResponse({"room": room, "devices": devices.room_devices(room=room)})


def message_get(request: Request, room: str, id: str) -> HttpResponse:
    """One message in its current state (as in the history, with ``deleted``)."""
    seq = int(id)
    page = selectors.room_history(room=room, after=seq - 1, limit=1,
                                  absolute=_absolute(request))
    if not page or page[0]["id"] != seq:
        raise GatewayError("not_found", f"no message {seq} in room {room}")
    return JsonResponse(page[0])


def message_patch(request: Request, room: str, id: str) -> HttpResponse:
    """``{"message", "client_id"?}``: edit a message (the key's own; any with ``manage``)."""
    data = request.body
    if "message" not in data:
        raise GatewayError("missing_message", "'message' is required")
    return _change(request, "edit", room, id, text=data["message"])


def message_delete(request: Request, room: str, id: str) -> HttpResponse:
    """Delete a message (the key's own; any with ``manage``); ``?client_id=`` optional."""
    return _change(request, "delete", room, id, body=False)


def reaction_post(request: Request, room: str, id: str) -> HttpResponse:
    """``{"emoji", "added"?, "client_id"?}``: toggle the key's reaction, or set it so."""
    data = request.body
    if "emoji" not in data:
        raise GatewayError("missing_emoji", "'emoji' is required")
    return _change(request, "react", room, id, emoji=data["emoji"], added=data.get("added"))


def _change(request: Request, kind: str, room: str, id: str, *, body: bool = True,
            **fields: Any) -> HttpResponse:
    principal = request.principal
    if principal.sender is None:
        raise GatewayError("unauthorized", "send an API key: Authorization: Bearer <key>")
    client_id = request.body.get("client_id") if body else request.http.GET.get("client_id")
    entry, created = services.message_change(
        kind, room=room, id=int(id), sender=principal.sender, staff=principal.staff,
        origin=f"api-{principal.sender['id']}", client_id=client_id, **fields)
    if entry is None:  # nothing to change (the same text; a reaction set so already)
        return JsonResponse({"type": _ENTRY_TYPES[kind], "id": int(id), "room": room,
                             "cursor": None, "duplicate": False})
    public = events.entry_public(entry) or {}
    return JsonResponse({**public, "duplicate": not created})


_ENTRY_TYPES = {"edit": "edit", "delete": "delete", "react": "reaction"}


def _int_query(http: HttpRequest, name: str, default: int | None) -> int | None:
    raw = http.GET.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise GatewayError("invalid_query", f"'{name}' must be an integer") from None


# --- the routes ---------------------------------------------------------------------------------

api_rooms = endpoint({"GET": (READ, rooms_list)})
api_room = endpoint({"GET": (READ, room_detail), "PUT": (MANAGE, room_put),
                     "PATCH": (MANAGE, room_patch)})
api_messages = endpoint({"GET": (READ, messages_list), "POST": (POST, message_post)},
                        visitors=("POST",))
api_message = endpoint({"GET": (READ, message_get), "PATCH": (POST, message_patch),
                        "DELETE": (POST, message_delete)})
api_reactions = endpoint({"POST": (POST, reaction_post)})
api_devices = endpoint({"GET": (READ, devices_list)})
