"""A room as a Server-Sent Events stream: ``GET /sse/rooms/<room>/``.

    curl -N http://127.0.0.1:8000/sse/rooms/lobby/

Each entry of the room's log is one event, its cursor as the event id, its data the JSON the
WebSocket sends for it::

    id: 7
    event: message
    data: {"type":"message","message":"hi","id":7,"room":"lobby","sender":{...},...}

    id: 9
    event: deleted
    data: {"type":"deleted","room":"lobby","id":7,"cursor":9}

    id: 10
    event: edit
    data: {"type":"edit","id":7,"room":"lobby","cursor":10,"message":"new text",...}

Other entries are ``reaction`` (the WebSocket's reaction frame), ``closed`` (staff closed the
room; the stream ends) and ``reopened``. A message event carries its current state (reply,
edit, reactions) when replayed.
A browser's ``EventSource`` hands ``message`` events to ``onmessage`` and the others to their
listeners, and reconnects by itself with ``Last-Event-ID``: the stream resumes after that
cursor, with nothing missing and nothing twice (``?after=<cursor>`` does the same for a first
connection). A comment line every ``KEEPALIVE`` seconds keeps proxies from closing it.

Refused with a JSON error, before the stream starts: 405 for a method other than GET, 400 a
``Host`` not in ``ALLOWED_HOSTS`` (as Django refuses it: this route is served beside Django),
a bad room name or cursor, 401 login required (``GATEWAY_REQUIRE_LOGIN``), 403 an ``Origin``
that is not the site's own (gateway/crosssite.py: a page elsewhere must not read a room with
the visitor's cookies), 404 no such room (listening creates none), 410 the room is closed
(EventSource does not come back after it), 503 the room cannot be joined now. A reader that
falls more than ``GATEWAY_WS_SEND_BUFFER_LIMIT`` bytes behind is ended, and resumes by its
cursor; a replay stops as soon as the reader is gone. A close replayed from the log ends the
stream only if no reopen follows it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.conf import settings

from consumers.base import RoomConsumer
from consumers.websocket import message_frame
from gateway import access, events, selectors
from gateway.api import STATUS
from gateway.crosssite import host_allowed, scope_header, scope_origin_allowed
from gateway.errors import GatewayError
from gateway.fanout import CONNECTION_OPEN_EXTENSION, SEND_BUFFER_EXTENSION, Delivery
from gateway.names import ROOM_NAME_RULE, room_name_is_valid
from gateway.policy import DEFAULT as DEFAULT_POLICY
from gateway.policy import Policy, message_shown

logger = logging.getLogger(__name__)

KEEPALIVE = 15.0  # seconds between comment lines
RETRY_MS = 2000  # how long EventSource waits before it reconnects
WIRE_FORMAT = "sse"
ENTRY_EVENTS = {events.ENTRY_DELETE: "deleted", events.ENTRY_CLOSE: "closed",
                events.ENTRY_REOPEN: "reopened"}
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass events on as they come
]


def message_event(event: events.RoomMessage) -> bytes:
    """The one SSE encoding of a room message (JSON has no raw newline: one data line)."""
    return f"id: {event['id']}\nevent: message\ndata: {message_frame(event)}\n\n".encode()


def entry_event(entry: events.RoomEntry) -> bytes:
    """Any other log entry: its kind as the event name (deleted, closed, reopened, edit,
    reaction). An edit and a reaction carry the WebSocket's extended frame; an
    ``EventSource`` passes over the names it does not listen to."""
    kind = entry["kind"]
    if kind in ENTRY_EVENTS:
        name = ENTRY_EVENTS[kind]
        data = events.entry_brief(entry, name)
    elif kind == events.ENTRY_POLICY:
        name, data = kind, events.policy_public(entry)
    else:
        name, data = kind, events.entry_public(entry) or {}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {entry['cursor']}\nevent: {name}\ndata: {text}\n\n".encode()


class RoomStreamConsumer(RoomConsumer):
    protocol = "sse"

    def setup(self) -> None:
        super().setup()
        self.started = False
        self.keepalive: asyncio.Task | None = None
        extensions = self.scope.get("extensions", {})
        self.buffered = extensions.get(SEND_BUFFER_EXTENSION)
        self.connected = extensions.get(CONNECTION_OPEN_EXTENSION)
        self.expires: float | None = None  # a connect token's expiry
        self.timer: asyncio.TimerHandle | None = None

    async def http_request(self, message) -> None:
        if message.get("more_body") or self.started:
            return  # a GET has no body to wait for; anything after the start is ignored
        refusal = await self._refusal()
        if refusal is not None:
            status, code, detail = refusal
            logger.warning("refused an event stream: %s", detail,
                           extra=self.log_extra(path=self.scope.get("path"), code=code))
            return await self._respond_error(status, code, detail)
        room, after = self._room, self._after
        try:
            await self.room_join(room, member_id=None)
        except Exception:
            logger.exception("could not join room", extra=self.log_extra(joining=room))
            return await self._respond_error(503, "unavailable", "try again later")
        await self.base_send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        self.started = True
        await self._write(f"retry: {RETRY_MS}\n\n".encode())
        self.keepalive = asyncio.create_task(self._keep_alive(), name=self.scope_id)
        if self.expires is not None:  # a token's stream ends with it: EventSource is refused
            self.timer = asyncio.get_running_loop().call_later(
                max(0.0, self.expires - time.time()),
                lambda: asyncio.ensure_future(self.close(0)))
        await self.room_catch_up(after)

    async def _refusal(self) -> tuple[int, str, str] | None:
        """Why this request gets no stream: (status, code, detail), or None."""
        if self.scope.get("method") != "GET":
            return 405, "method_not_allowed", "use GET"
        if not host_allowed(scope_header(self.scope, b"host") or ""):
            return 400, "disallowed_host", "the Host header names another site"
        room = self.scope["url_route"]["kwargs"]["room"]
        if not room_name_is_valid(room):
            return 400, "invalid_room", f"invalid room name: {ROOM_NAME_RULE}"
        try:
            self._after = _cursor(self.scope)
        except ValueError as exc:
            return 400, "invalid_cursor", str(exc)
        if not scope_origin_allowed(self.scope) and scope_header(self.scope, b"origin") is not None:
            return 403, "forbidden_origin", "the Origin is not this site's"
        try:
            credential = await self._credential(room)
        except GatewayError as exc:
            return STATUS.get(exc.code, 401), exc.code, exc.detail
        user = self.scope.get("user")
        if (settings.GATEWAY["REQUIRE_LOGIN"] and credential is None
                and not (user and user.is_authenticated)):
            return 401, "login_required", "log in first"
        try:
            found = await database_sync_to_async(selectors.room_detail)(room=room)
        except Exception:
            logger.exception("could not read the room", extra=self.log_extra(joining=room))
            return 503, "unavailable", "try again later"
        if found is None:
            return 404, "room_not_found", f"no room {room}"
        if found["closed"]:
            return 410, "room_closed", f"room {room} is closed"
        receive = found["policy"]["receive"]
        if receive is not None and self.protocol not in receive:
            return 403, "not_reached", f"room {room} is not open to event streams"
        self._room = room
        return None

    async def _credential(self, room: str) -> access.Principal | None:
        """Who the reader says it is, if it says: a connect token (``?token=``, or
        ``Authorization: Bearer <JWT>``: what EventSource cannot send, curl can) or an API
        key with ``read``, either allowing ``room``; GatewayError if it does not hold."""
        header = scope_header(self.scope, b"authorization")
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [None])[-1]
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() == "bearer":  # another scheme (a proxy's Basic login) is not ours
            value = value.strip()
            if not value:
                raise GatewayError("invalid_key", "use Authorization: Bearer <key or token>")
            if not access.looks_like_token(value):
                key = await database_sync_to_async(access.api_key_authenticate)(value)
                principal = access.key_principal(key)
                if not principal.may("read") or not principal.may_use(room):
                    raise GatewayError("forbidden", f"this key may not read room {room}")
                return principal
            token = value
        if token is None:
            return None
        identity = await access.connect_token_verify_async(token)
        access.token_room_check(identity, room)
        self.expires = identity.expires
        return identity.principal()

    async def _respond_error(self, status: int, code: str, detail: str) -> None:
        body = json.dumps({"type": "error", "code": code, "detail": detail}).encode()
        await self.base_send({"type": "http.response.start", "status": status,
                              "headers": [(b"content-type", b"application/json")]})
        await self.base_send({"type": "http.response.body", "body": body})
        self.closed = True

    async def http_disconnect(self, message) -> None:
        raise StopConsumer()

    async def finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.keepalive is not None:
            self.keepalive.cancel()
            await asyncio.gather(self.keepalive, return_exceptions=True)
        await super().finish()

    def is_open(self) -> bool:
        """Whether the reader is still there: a replay stops as soon as it is gone."""
        return not self.closed and (self.connected is None or self.connected())

    async def _keep_alive(self) -> None:
        while not self.closed:
            await asyncio.sleep(KEEPALIVE)
            await self._write(b": keepalive\n\n")

    # --- room -> stream ---------------------------------------------------------------

    async def send_room_event(self, event: events.RoomMessage, delivery: Delivery) -> None:
        policy = self._policy()
        template = policy.name_format.get(self.protocol)
        if template is None:
            return await self._write(delivery.frame(WIRE_FORMAT, message_event))
        await self._write(delivery.frame(f"{WIRE_FORMAT}:{template}", lambda shown: message_event(
            message_shown(shown, policy, target=self.protocol))))

    async def send_room_entry(self, entry: events.RoomEntry, delivery: Delivery) -> None:
        await self._write(entry_event(entry))
        if entry["kind"] == events.ENTRY_CLOSE and self.live:
            await self.room_closed()
        elif entry["kind"] == events.ENTRY_POLICY and not self._policy().receives(
                self.protocol):
            await self.close(0)  # EventSource comes back, and is answered 403

    async def send_pruned(self, *, after: int, first_available: int) -> None:
        data = json.dumps({"type": "pruned", "room": self.room, "after": after,
                           "first_available": first_available}, separators=(",", ":"))
        await self._write(f"event: pruned\ndata: {data}\n\n".encode())

    def _policy(self) -> Policy:
        if self.runtime is None or self.room is None:
            return DEFAULT_POLICY
        return self.runtime.hub.room_policy(self.room)

    async def room_closed(self) -> None:
        await self.close(0)  # EventSource comes back, and is answered 410

    async def _write(self, data: bytes) -> None:
        if self.closed:
            return
        limit = settings.GATEWAY["WS_SEND_BUFFER_LIMIT"]
        if self.buffered is not None and self.buffered() > limit:
            logger.warning("event stream fell behind; ending it so it resumes by its cursor",
                           extra=self.log_extra(last_sent=self.last_sent))
            return await self.close(0)
        await self.base_send({"type": "http.response.body", "body": data, "more_body": True})

    async def close(self, code: int) -> None:
        """End the stream (shutdown, staff, a closed room): the client reconnects and
        resumes by its cursor, or is refused if it may no longer read."""
        if self.closed:
            return
        self.closed, self.live = True, False
        if self.started:
            await self.base_send({"type": "http.response.body", "body": b"", "more_body": False})


def _cursor(scope) -> int | None:
    """Where to resume: ``Last-Event-ID`` (EventSource's reconnect), else ``?after=``."""
    value = scope_header(scope, b"last-event-id")
    if value is None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        value = (query.get("after") or [None])[-1]
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise ValueError("the cursor (Last-Event-ID or after) must be a non-negative integer")
    return int(value)
