"""The browser chat consumer: ``ws://HOST/ws/chat/<room>/``.

Wire format (JSON text frames), compatible with the Channels tutorial's client:

client -> server  {"message": "hi"}                     tutorial form
                  {"type": "message", "message": "hi", "client_id": "c1", "reply_to": 5}
                  {"type": "edit", "id": 7, "message": "new text"}     its author, or staff
                  {"type": "delete", "id": 7}                           its author, or staff
                  {"type": "react", "id": 7, "emoji": "👍"}   toggles the sender's reaction
                  ... "added": true | false                 sets it so instead
                  {"type": "command", "device": "d1", "command": "set 21", "client_id": "c2",
                   "timeout": 10}      a command to one of the room's devices: a message
                                       of the room (``/cmd d1 set 21``), then the device's
                                       answer as its reply, or a timeout notice
                  {"type": "ping"}
server -> client  {"type": "message", "message": "hi", "id": 7, "cursor": 7, "room": "lobby",
                   "sender": {"protocol": "web", "id": "anon:...", "name": "alice"},
                   "ts": 1764057600.0, "client_id": "c1", "edited_at": null,
                   "reply_to": {"id": 5, "sender": {...}, "excerpt": "..."} | null,
                   "reactions": {"👍": 2}}
                  {"type": "ack", "client_id": "c1", "id": 7, "cursor": 7, "duplicate": false}
                  {"type": "error", "code": "invalid_json", "detail": "..."}
                  {"type": "pong"}
   extended (v2)  {"type": "edit", "id": 7, "message": "new text", "edited_at": ...,
                   "cursor": 9, "room", "sender", "client_id"}
                  {"type": "delete", "id": 7, "ts": ..., "cursor": 10, "room", "sender", ...}
                  {"type": "reaction", "id": 7, "emoji": "👍", "added": true, "count": 2,
                   "cursor": 11, "room", "sender", "client_id"}
                  {"type": "presence", "members": [...], "you": {sender},
                   "devices": [{device}, ...]} on joining, then
                  {"type": "presence", "joined": [...]} / {"type": "presence", "left": [...]}
                  {"type": "device", "room", "change": "status" | "state", "device": {"id",
                   "status": "online" | "offline" | "unknown" | null, "status_at",
                   "detail", "state", "state_at", "seen_at"}}    a device's status or state

A client written for the tutorial prints ``data.message`` of every frame, so it gets what
it always got: message frames, the replies to its own frames, and a staff or author delete
as ``{"type": "deleted", "room", "id", "cursor"}``. The extended frames go to clients that
ask for them, with ``v=2`` in the query or the subprotocol ``rt-gateway.v2`` (the gateway's
page does). Every client may send every kind of frame.

Query parameters: ``after=<cursor>`` replays the room's log after that cursor (a message's
id is its cursor; every other entry carries its own) before the live stream: the messages
in their current state, and the edits, deletes and reactions made meanwhile, once and in
order; ``v=1`` or ``v=2`` (see above); ``name=<display name>`` and ``uid=<stable browser
id>`` identify anonymous visitors.

Close codes: 4400 invalid room name or query, 4401 login required, 1011 the room could not
be joined (all three before accept, which daphne answers with HTTP 403); 4008 the client
fell behind the room (reconnect with ``after`` to resume from history); 4012 server
restarting (reconnect and resume); 4403 disconnected by staff and 4410 room closed by staff
(do not reconnect by themselves); after accept, 4404 no such room (only staff create rooms)
and 4429 no new room now (this sender created too many lately, or the gateway holds
``GATEWAY_MAX_ROOMS``); 1008 too many refused frames (below); 1009 frame too big
and 1007 invalid UTF-8 (from the server library).

Budget of a connection: every frame, whatever it holds, spends a token of its flood limit
(``GATEWAY_RATE_LIMIT_PER_SECOND`` sustained, ``GATEWAY_RATE_LIMIT_BURST`` at once); a frame
beyond it is refused with ``rate_limited``. Every refused frame (any error frame except
``unavailable``, which is the server's fault) also spends one of ``GATEWAY_WS_ERROR_LIMIT``
refusal tokens, refilled at one per second: the refused frame that finds none closes the
socket with 1008 instead of getting its error frame. So a client may make mistakes, but one
that keeps sending refused frames is closed after ``WS_ERROR_LIMIT`` of them in a burst (or
soon after refusals outpace one a second), and frames still in flight are dropped unread.
Replies (errors, pongs, acks) share the send-backlog limit of room messages
(``GATEWAY_WS_SEND_BUFFER_LIMIT``, close 4008). Each error code is logged for the first
``LOGGED_PER_CODE`` times on a connection, then only counted, in one line at close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from django.conf import settings
from django.db import DatabaseError

from consumers.base import RoomConsumer
from gateway import access, devices, events, files, metrics, selectors, services
from gateway.errors import GatewayError
from gateway.fanout import (
    END_DISCONNECTED,
    END_SHUTDOWN,
    FRAME_WRITER_EXTENSION,
    Delivery,
    DeviceChange,
    PresenceChange,
)
from gateway.ingest import message_post
from gateway.logging import LogSampler
from gateway.names import ROOM_NAME_RULE, room_name_is_valid
from gateway.policy import DEFAULT as DEFAULT_POLICY
from gateway.policy import Policy, message_shown
from gateway.ratelimit import TokenBucket, flood_limit
from gateway.services import Post

logger = logging.getLogger(__name__)

CLOSE_INVALID = 4400
CLOSE_LOGIN_REQUIRED = 4401
CLOSE_JOIN_FAILED = 1011
CLOSE_FELL_BEHIND = 4008
CLOSE_ROOM_CLOSED = 4410
CLOSE_NO_SUCH_ROOM = 4404  # rooms are created by staff only
CLOSE_TRY_LATER = 4429  # this sender created too many rooms lately, or the cap is reached
CLOSE_POLICY = 1008
# It mirrors 1012 "service restart", which daphne (autobahn) does not let an application
# send (only 1000 and 3000-4999): clients reconnect, to another replica if any, and resume.
CLOSE_RESTARTING = 4012
CLOSE_DISCONNECTED = 4403  # by staff: the page does not reconnect by itself
CLOSE_NOT_REACHED = 4403  # the room's policy does not reach the web (do not reconnect)
CLOSE_TOKEN_EXPIRED = 4419  # the connect token expired: reconnect with a new one
END_CODES = {END_SHUTDOWN: CLOSE_RESTARTING, END_DISCONNECTED: CLOSE_DISCONNECTED}
# Connect tokens refused (gateway/access.py): before accept with ?token= (the client sees
# HTTP 403, the log the code), or after it with an auth frame (the client sees the code).
TOKEN_CLOSE_CODES = {"token_invalid": CLOSE_LOGIN_REQUIRED, "token_expired": CLOSE_TOKEN_EXPIRED,
                     "token_room": CLOSE_DISCONNECTED}
AUTH_FRAME = "frame"  # ?auth=frame: the token comes in the first frame

LOGGED_PER_CODE = 5
# Error codes that are the server's fault: they cost the client nothing.
SERVER_ERRORS = frozenset({"unavailable"})

WIRE_FORMAT = "ws-json"
PREPARED_FORMAT = "ws-prepared"
ENTRY_FORMAT = "ws-entry"
PRESENCE_FORMAT = "ws-presence"
DELETED_FORMAT = "ws-deleted"
PREPARED_DELETED_FORMAT = "ws-deleted-prepared"
PREPARED_ENTRY_FORMAT = "ws-entry-prepared"
POLICY_FORMAT = "ws-policy"
DEVICE_FORMAT = "ws-device"
PREPARED_POLICY_FORMAT = "ws-policy-prepared"
SUBPROTOCOL_V2 = "rt-gateway.v2"  # or ?v=2: the extended frames


def message_frame(event: events.RoomMessage) -> str:
    """The one WebSocket encoding of a room message."""
    return json.dumps(
        {"type": "message", **files.message_public(event, absolute=False), "cursor": event["id"]},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def deleted_frame(entry: events.RoomEntry) -> str:
    """A delete as clients that did not ask for the extended frames have always had it."""
    return json.dumps(events.entry_brief(entry, "deleted"), separators=(",", ":"))


def presence_frames(change: PresenceChange) -> list[str]:
    """The one WebSocket encoding of who came and went: a ``joined`` frame and a ``left``
    frame, each when it has members (one per connection)."""
    return [json.dumps({"type": "presence", "room": change.room, key: [
        {"protocol": m["protocol"], "id": m["id"], "name": m["name"]} for m in members]},
        ensure_ascii=False, separators=(",", ":"))
        for key, members in (("joined", change.joined), ("left", change.left)) if members]


def device_frame(event: events.RoomDevice) -> str:
    """A device's status or state changed, for extended clients."""
    return json.dumps({"type": "device", "room": event["room"], "change": event["change"],
                       "device": event["device"]}, ensure_ascii=False, separators=(",", ":"))


def policy_frame(entry: events.RoomEntry) -> str:
    """A policy entry, for extended clients: the room's policy from this cursor on."""
    return json.dumps(events.policy_public(entry), ensure_ascii=False, separators=(",", ":"))


def entry_frame(entry: events.RoomEntry) -> str | None:
    """The one WebSocket encoding of another log entry (extended clients only); None for
    the room's own entries (a close is a close code)."""
    public = events.entry_public(entry)
    if public is None:
        return None
    return json.dumps(public, ensure_ascii=False, separators=(",", ":"))


class ChatConsumer(RoomConsumer):
    protocol = "web"

    def setup(self) -> None:
        super().setup()
        self.writer = None
        self.log_sample = LogSampler(LOGGED_PER_CODE)
        self.subprotocol: str | None = None
        self.extended = False  # the client asked for the extended frames (v2)
        self.staff = False
        self.awaiting_auth: tuple[str, int | None] | None = None  # (room, after) until then
        self.timer: asyncio.TimerHandle | None = None  # the auth frame's deadline, or expiry
        self.closing: asyncio.Future[None] | None = None

    async def finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        counted = self.log_sample.counted()
        if counted:
            logger.warning("client errors counted but not logged on this connection: %s",
                           counted, extra=self.log_extra(counted=counted))
        await super().finish()

    # --- connection --------------------------------------------------------------------

    async def websocket_connect(self, message) -> None:
        room = self.scope["url_route"]["kwargs"]["room"]
        if not room_name_is_valid(room):
            return await self._refuse(CLOSE_INVALID, f"invalid room name: {ROOM_NAME_RULE}")
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        try:
            after = _int_param(query, "after")
            version = _int_param(query, "v")
        except ValueError as exc:
            return await self._refuse(CLOSE_INVALID, str(exc))
        if version not in (None, 1, 2):
            return await self._refuse(CLOSE_INVALID, "'v' must be 1 or 2")
        auth = (query.get("auth") or [None])[-1]
        if auth not in (None, AUTH_FRAME):
            return await self._refuse(CLOSE_INVALID, f"'auth' must be {AUTH_FRAME}")
        offered = self.scope.get("subprotocols") or []
        self.subprotocol = SUBPROTOCOL_V2 if SUBPROTOCOL_V2 in offered else None
        self.extended = version == 2 or self.subprotocol is not None
        self.writer = self.scope.get("extensions", {}).get(FRAME_WRITER_EXTENSION)
        self.send_buffer_limit = settings.GATEWAY["WS_SEND_BUFFER_LIMIT"]
        self.bucket = flood_limit()
        self.refusals = TokenBucket(rate=1.0, burst=settings.GATEWAY["WS_ERROR_LIMIT"])
        token = (query.get("token") or [None])[-1]
        if token is not None:
            identity = await self._token_identity(token, room)
            if identity is not None:
                await self._enter(room, after, identity=identity)
            return
        if auth == AUTH_FRAME:
            # Accepted; the first frame must be {"type": "auth", "token": ...} (a token kept
            # out of URLs, and so out of proxies' logs), in time.
            self.awaiting_auth = (room, after)
            await self._accept()
            self.timer = asyncio.get_running_loop().call_later(
                settings.GATEWAY["WS_HANDSHAKE_TIMEOUT"], self._close_soon,
                CLOSE_LOGIN_REQUIRED, "no auth frame in time")
            return
        user = self.scope.get("user")
        authenticated = bool(user is not None and user.is_authenticated)
        if settings.GATEWAY["REQUIRE_LOGIN"] and not authenticated:
            return await self._refuse(CLOSE_LOGIN_REQUIRED, "login required")
        await self._enter(room, after, user=user if authenticated else None, query=query)

    async def _token_identity(
        self, token: str, room: str, *, accepted: bool = False
    ) -> access.TokenIdentity | None:
        """The identity of a connect token that allows ``room``; None once the socket is
        refused (before accept with ``?token=``, after it with an auth frame)."""
        try:
            identity = await access.connect_token_verify_async(token)
            access.token_room_check(identity, room)
        except GatewayError as exc:
            if exc.code == "unavailable":  # the issuer's keys cannot be fetched: try again
                code = CLOSE_RESTARTING if accepted else CLOSE_JOIN_FAILED
            else:
                code = TOKEN_CLOSE_CODES.get(exc.code, CLOSE_LOGIN_REQUIRED)
            self.closed = accepted
            await self._refuse(code, f"{exc.code}: {exc.detail}")
            return None
        return identity

    async def _enter(
        self, room: str, after: int | None, *, identity: access.TokenIdentity | None = None,
        user=None, query: dict[str, list[str]] | None = None, accepted: bool = False,
    ) -> None:
        """Join the room as the token's holder, the logged-in user or an anonymous visitor,
        catch up and go live (``accepted``: the socket is open already: refusals are
        closes the client sees)."""
        if identity is not None:
            self.sender, creator = identity.sender, identity.sender["id"]
        elif user is not None:
            self.sender = events.sender(protocol=self.protocol, id=f"user:{user.pk}",
                                        name=user.get_username()[:128])
            creator = None
        else:
            member_id, name = _anonymous_identity(query or {})
            self.sender = events.sender(protocol=self.protocol, id=member_id, name=name)
            creator = _client_address(self.scope)
        self.staff = staff = bool(user is not None and user.is_staff)
        try:
            try:
                closed, self.sender = await self.room_enter(room, staff=staff, creator=creator)
            except GatewayError as exc:  # the creation rules: new rooms are limited
                # Accepted, then closed, so the page can say why (a refused handshake would
                # only show it 1006).
                await self._accept_once(accepted)
                code = CLOSE_NO_SUCH_ROOM if exc.code == "room_not_found" else CLOSE_TRY_LATER
                return await self._refuse(code, exc.detail)
            if closed:
                # Accepted, then closed: the page sees 4410 and does not retry.
                await self._accept_once(accepted)
                return await self._refuse(CLOSE_ROOM_CLOSED, "the room is closed")
            await self.room_join(room, member_id=self.sender["id"], name=self.sender["name"])
            if (self.runtime is not None and self.runtime.hub.room_closed(room)
                    and await database_sync_to_async(selectors.room_is_closed)(room=room)):
                # Closed just before this scope's subscription (its catch-up would not see
                # it), and not reopened since: the hub may not have heard of a reopen yet.
                await self._accept_once(accepted)
                return await self._refuse(CLOSE_ROOM_CLOSED, "the room is closed")
        except Exception:
            # Before accept: the client sees the handshake refused and retries.
            logger.exception("could not join room", extra=self.log_extra(joining=room))
            return await self.base_send({"type": "websocket.close", "code": (
                CLOSE_RESTARTING if accepted else CLOSE_JOIN_FAILED)})
        await self._accept_once(accepted)
        if not self._policy().receives(self.protocol):
            return await self.close_with(CLOSE_NOT_REACHED, "the room does not reach the web")
        if identity is not None:
            self._expire_at(identity)
            if accepted:
                await self.send_json({"type": "auth", "you": self.sender,
                                      "expires": identity.expires})
        await self.room_catch_up(after)
        if self.extended and self.live and self.runtime is not None:
            await self._presence_start()

    async def _accept_once(self, accepted: bool) -> None:
        if not accepted:
            await self._accept()

    def _expire_at(self, identity: access.TokenIdentity) -> None:
        """Close the socket when its token expires: the client reconnects with a new one
        (and ``after``) to go on."""
        delay = max(0.0, identity.expires - time.time())
        self.timer = asyncio.get_running_loop().call_later(
            delay, self._close_soon, CLOSE_TOKEN_EXPIRED, "the token expired")

    def _close_soon(self, code: int, why: str) -> None:
        if not self.closed:
            self.closing = asyncio.ensure_future(self.close_with(code, why))

    async def close_with(self, code: int, why: str) -> None:
        """Close the open socket with ``code``, saying why in the log."""
        if self.closed:
            return
        logger.info("closing: %s", why, extra=self.log_extra(code=code))
        await self.close(code)

    def _policy(self) -> Policy:
        if self.runtime is None or self.room is None:
            return DEFAULT_POLICY
        return self.runtime.hub.room_policy(self.room)

    async def _presence_start(self) -> None:
        """Tell the client who is here, and from now on who comes and goes."""
        assert self.runtime is not None and self.room is not None
        try:
            members = await self.runtime.hub.roster(self.room, self)
            known = await database_sync_to_async(devices.room_devices)(room=self.room)
        except Exception:
            # The room works without it: the page shows no member list until it resumes.
            logger.warning("presence not available", extra=self.log_extra(), exc_info=True)
            return
        await self.send_json({"type": "presence", "room": self.room, "members": members,
                              "you": self.sender, "devices": known})

    async def presence_changed(self, change: PresenceChange) -> None:
        for text in change.frame(PRESENCE_FORMAT, presence_frames):
            await self.send_text(text)

    async def device_changed(self, change: DeviceChange) -> None:
        await self.send_text(change.frame(DEVICE_FORMAT, device_frame))

    async def _accept(self) -> None:
        accept: dict[str, object] = {"type": "websocket.accept"}
        if self.subprotocol is not None:
            accept["subprotocol"] = self.subprotocol
        await self.base_send(accept)

    async def _refuse(self, code: int, detail: str) -> None:
        logger.warning(
            "refused connection: %s", detail,
            extra=self.log_extra(path=self.scope.get("path"), code=code),
        )
        await self.base_send({"type": "websocket.close", "code": code})

    async def websocket_disconnect(self, message) -> None:
        raise StopConsumer()

    async def end(self, reason: str) -> None:
        await self.close(END_CODES.get(reason, CLOSE_RESTARTING))

    async def close(self, code: int) -> None:
        self.closed, self.live = True, False
        await self.base_send({"type": "websocket.close", "code": code})

    def is_open(self) -> bool:
        return not self.closed and (self.writer is None or self.writer.is_open())

    async def send_room_entry(self, entry: events.RoomEntry, delivery: Delivery) -> None:
        if entry["kind"] == events.ENTRY_CLOSE:
            if self.live:
                await self.room_closed()
        elif entry["kind"] == events.ENTRY_POLICY:
            if not self._policy().receives(self.protocol):
                await self.close_with(CLOSE_NOT_REACHED, "the room no longer reaches the web")
            elif self.extended:
                await self._send_frame(delivery, POLICY_FORMAT, policy_frame,
                                       PREPARED_POLICY_FORMAT, entry["cursor"])
        elif self.extended:
            if delivery.frame(ENTRY_FORMAT, entry_frame) is not None:
                await self._send_frame(delivery, ENTRY_FORMAT, entry_frame,
                                       PREPARED_ENTRY_FORMAT, entry["cursor"])
        elif entry["kind"] == events.ENTRY_DELETE:  # what such clients have always had
            await self._send_frame(delivery, DELETED_FORMAT, deleted_frame,
                                   PREPARED_DELETED_FORMAT, entry["cursor"])

    async def send_pruned(self, *, after: int, first_available: int) -> None:
        await self.send_json({"type": "pruned", "room": self.room, "after": after,
                              "first_available": first_available})

    async def room_closed(self) -> None:
        logger.info("room closed by staff", extra=self.log_extra(code=CLOSE_ROOM_CLOSED))
        await self.close(CLOSE_ROOM_CLOSED)

    # --- client -> room ----------------------------------------------------------------

    async def websocket_receive(self, message) -> None:
        if self.awaiting_auth is not None and not self.closed:
            return await self._authenticate(message)
        if self.room is None or self.closed:
            return  # not joined, or closing: frames still arriving are dropped unread
        within_rate = self.bucket.allow()  # every frame spends a token, whatever it holds
        text = message.get("text")
        if text is None:
            return await self.send_error("binary_not_supported", "send JSON as text frames")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return await self.send_error("invalid_json", "the frame is not valid JSON")
        if not isinstance(data, dict):
            return await self.send_error("not_an_object", "send a JSON object")
        client_id = data.get("client_id")
        echo = client_id if isinstance(client_id, str) else None  # lets the client match errors
        if not within_rate:
            return await self.send_error(
                "rate_limited", f"too many frames; retry in {self.bucket.retry_after():.1f}s",
                echo,
            )
        kind = data.get("type", "message")
        if kind == "ping":
            return await self.send_json({"type": "pong"})
        if kind == "message":
            return await self._post(data, client_id, echo)
        if kind in services.MESSAGE_CHANGES:
            return await self._change(kind, data, client_id, echo)
        if kind == "command":
            return await self._command(data, client_id, echo)
        return await self.send_error("unknown_type", f"unknown type {str(kind)[:32]!r}")

    async def _authenticate(self, message) -> None:
        """The first frame of an ``?auth=frame`` socket: ``{"type": "auth", "token"}``."""
        assert self.awaiting_auth is not None
        room, after = self.awaiting_auth
        self.awaiting_auth = None
        if self.timer is not None:
            self.timer.cancel()
        try:
            data = json.loads(message.get("text") or "")
        except (ValueError, RecursionError):
            data = None
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("type") != "auth" or not isinstance(token, str):
            metrics.refused(self.protocol, "auth_expected")
            self.closed = True
            return await self._refuse(CLOSE_LOGIN_REQUIRED,
                                      'the first frame must be {"type": "auth", "token": ...}')
        identity = await self._token_identity(token, room, accepted=True)
        if identity is not None:
            await self._enter(room, after, identity=identity, accepted=True)

    async def _post(self, data: dict, client_id: object, echo: str | None) -> None:
        if "message" not in data:
            return await self.send_error("missing_message", "'message' is required", echo)
        if (room := self.room) is None:
            return  # left the room meanwhile
        try:
            event, created = await message_post(Post(
                room=room, text=data["message"], sender=self.sender,
                origin=self.scope_id, client_id=client_id, reply_to=data.get("reply_to"),
            ))
        except GatewayError as exc:
            return await self.send_error(exc.code, exc.detail, echo)
        except DatabaseError:
            logger.exception("could not store a message", extra=self.log_extra())
            return await self.send_error(
                "unavailable", "the message could not be stored; send it again", echo
            )
        if client_id is not None:
            await self.send_json(
                {"type": "ack", "client_id": client_id, "id": event["id"],
                 "cursor": event["id"], "duplicate": not created}
            )

    async def _change(self, kind: str, data: dict, client_id: object, echo: str | None) -> None:
        """An edit, a delete or a reaction: stored as the room's next log entry (which every
        member then receives), acknowledged with its cursor when it has a ``client_id``."""
        if (room := self.room) is None:
            return
        missing = [field for field in services.MESSAGE_CHANGES[kind] if field not in data]
        if missing:
            return await self.send_error(f"missing_{missing[0]}",
                                         f"'{missing[0]}' is required", echo)
        try:
            entry, created = await database_sync_to_async(services.message_change)(
                kind, room=room, id=data["id"], sender=self.sender, origin=self.scope_id,
                staff=self.staff, client_id=client_id, text=data.get("message"),
                emoji=data.get("emoji"), added=data.get("added"))
        except GatewayError as exc:
            return await self.send_error(exc.code, exc.detail, echo)
        except DatabaseError:
            logger.exception("could not store a change to a message",
                             extra=self.log_extra(kind=kind))
            return await self.send_error("unavailable", "not stored; send it again", echo)
        if client_id is not None:
            await self.send_json(
                {"type": "ack", "client_id": client_id, "id": data["id"],
                 "cursor": entry["cursor"] if entry is not None else None,
                 "duplicate": not created}
            )

    async def _command(self, data: dict, client_id: object, echo: str | None) -> None:
        """A command to one of the room's devices: its message stored (which every member
        then receives), the command published, acknowledged like a message."""
        if (room := self.room) is None:
            return
        for field in ("device", "command"):
            if field not in data:
                return await self.send_error(f"missing_{field}", f"'{field}' is required", echo)
        try:
            event, command = await database_sync_to_async(devices.command_send)(
                room=room, device=data["device"], command=data["command"], sender=self.sender,
                origin=self.scope_id, staff=self.staff, client_id=client_id,
                timeout=data.get("timeout"))
        except GatewayError as exc:
            return await self.send_error(exc.code, exc.detail, echo)
        except DatabaseError:
            logger.exception("could not store a command", extra=self.log_extra())
            return await self.send_error("unavailable", "not stored; send it again", echo)
        devices.command_dispatch(command)
        if client_id is not None:
            await self.send_json(
                {"type": "ack", "client_id": client_id, "id": event["id"],
                 "cursor": event["id"], "duplicate": command is None})

    # --- room -> client ----------------------------------------------------------------

    async def send_room_event(self, event: events.RoomMessage, delivery: Delivery) -> None:
        policy = self._policy()
        template = policy.name_format.get(self.protocol)
        if template is None:
            return await self._send_frame(delivery, WIRE_FORMAT, message_frame,
                                          PREPARED_FORMAT, event["id"])
        # The room shows other protocols' senders its own way here: encoded once per
        # process and format.
        await self._send_frame(
            delivery, f"{WIRE_FORMAT}:{template}",
            lambda shown: message_frame(message_shown(shown, policy, target=self.protocol)),
            f"{PREPARED_FORMAT}:{template}", event["id"])

    async def _send_frame(
        self, delivery: Delivery, wire_format: str, encode: Callable[[Any], str | None],
        prepared_format: str, cursor: int,
    ) -> None:
        """Send a log entry's frame, encoded (and, under daphne, framed) once per process."""
        writer = self.writer
        if writer is None:  # a server without the frame writer: plain ASGI
            text = delivery.frame(wire_format, encode)
            return await self.base_send({"type": "websocket.send", "text": text})
        if not writer.is_open():
            return
        if writer.buffered() > self.send_buffer_limit:
            return await self._fell_behind(dropped_from=cursor)
        writer.send(delivery.frame(
            prepared_format, lambda event: writer.prepare(delivery.frame(wire_format, encode))))

    async def _fell_behind(self, *, dropped_from: int | None) -> None:
        """Bounded, not lost: close the lagging socket; it resumes from history by id."""
        self.closed, self.live = True, False
        if self.runtime is not None:
            self.runtime.hub.stats["fell_behind"] += 1
        metrics.dropped(self.protocol, "fell_behind")
        logger.warning(
            "client fell behind; closing so it resumes from history",
            extra=self.log_extra(code=CLOSE_FELL_BEHIND, last_sent=self.last_sent,
                                 dropped_from=dropped_from),
        )
        await self.base_send({"type": "websocket.close", "code": CLOSE_FELL_BEHIND})

    async def send_json(self, payload: dict) -> None:
        """A reply (error, pong, ack): held to the backlog limit of room messages."""
        await self.send_text(json.dumps(payload))

    async def send_text(self, text: str) -> None:
        """A frame of this socket's own (a reply, presence), held to the backlog limit."""
        if self.closed:
            return
        writer = self.writer
        if writer is not None:
            if not writer.is_open():
                return
            if writer.buffered() > self.send_buffer_limit:
                return await self._fell_behind(dropped_from=None)
        await self.base_send({"type": "websocket.send", "text": text})

    async def send_error(self, code: str, detail: str, client_id: str | None = None) -> None:
        """Refuse a frame: an error frame, unless refusals are over budget (close 1008)."""
        metrics.refused(self.protocol, code)
        self._log_refusal(code, detail)
        if code not in SERVER_ERRORS and not self.refusals.allow():
            return await self._too_many_refusals()
        frame = {"type": "error", "code": code, "detail": detail}
        if client_id is not None:
            frame["client_id"] = client_id
        await self.send_json(frame)

    def _log_refusal(self, code: str, detail: str) -> None:
        if not self.log_sample.allow(code):
            return
        more = " (more on this connection are counted, not logged)" \
            if self.log_sample.last_logged(code) else ""
        logger.warning("client error %s: %s%s", code, detail, more,
                       extra=self.log_extra(code=code))

    async def _too_many_refusals(self) -> None:
        self.closed, self.live = True, False
        metrics.dropped(self.protocol, "too_many_refusals")
        logger.warning(
            "closing: more than %d refused frames in a burst",
            settings.GATEWAY["WS_ERROR_LIMIT"], extra=self.log_extra(code=CLOSE_POLICY),
        )
        if self.writer is None:  # another ASGI server: it sends any close code
            await self.base_send({"type": "websocket.close", "code": CLOSE_POLICY})
        elif self.writer.is_open():
            self.writer.fail(CLOSE_POLICY, "too many refused frames")
        raise StopConsumer()


def _client_address(scope) -> str:
    """Who opens rooms for the room policy when the visitor is anonymous: its address (an
    anonymous id is whatever the browser sends, so it would not hold anyone back)."""
    client = scope.get("client") or ("unknown",)
    return f"ip:{client[0]}"


def _int_param(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        value = int(values[-1])
    except ValueError:
        raise ValueError(f"'{name}' must be a non-negative integer") from None
    if value < 0:
        raise ValueError(f"'{name}' must be a non-negative integer")
    return value


def _anonymous_identity(query: dict[str, list[str]]) -> tuple[str, str]:
    """``(sender id, display name)`` of an anonymous visitor (access.visitor_identity)."""
    return access.visitor_identity((query.get("uid") or [""])[-1],
                                   (query.get("name") or [""])[-1])


anonymous_id = access.anonymous_id  # the public id of a browser's secret uid
