"""The staff dashboard's socket: ``ws://HOST/ws/dashboard/``, for staff users only.

server -> client  {"type": "snapshot", ...}  once a second (gateway/dashboard.py)
                  {"type": "done", "action": ...} | {"type": "error", "code", "detail"}
client -> server  {"action": "post", "room": "lobby", "message": "...", "csrf": "..."}
                  {"action": "close_room", "room": "lobby", "csrf": ...} | "reopen_room"
                  {"action": "disconnect", "scope": "web-...", "csrf": ...}  one connection

Anonymous and non-staff users are refused before accept (close 4403; HTTP 403). Every
action carries the page's CSRF token (``csrf``: the dashboard page's ``{{ csrf_token }}``,
or the ``csrftoken`` cookie's value), checked as Django checks a form's; without it the
action is refused (``csrf_failed``) and nothing is done. The user is read again from the
database before each action and each snapshot: once no longer active staff, the socket
gets a ``not_staff`` error and is closed with 4403.
"""

from __future__ import annotations

import asyncio
import json
import logging

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer

from consumers.base import ScopeConsumer
from gateway import dashboard, events, services
from gateway.broadcast import control_broadcast
from gateway.crosssite import csrf_token_valid
from gateway.errors import GatewayError
from gateway.names import room_name_validate

logger = logging.getLogger(__name__)

CLOSE_FORBIDDEN = 4403
INTERVAL = 1.0


class DashboardConsumer(ScopeConsumer):
    def setup(self) -> None:
        self.poller: asyncio.Task | None = None
        self.closed = False
        self.log = {"protocol": "dashboard", "scope": "dashboard", "room": None}

    async def websocket_connect(self, message) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            logger.warning("refused the dashboard socket: not staff", extra=self.log)
            return await self.base_send({"type": "websocket.close", "code": CLOSE_FORBIDDEN})
        self.user = user
        session = self.scope.get("session")
        self.session_key = getattr(session, "session_key", None)
        self.log["user"] = user.get_username()
        await self.base_send({"type": "websocket.accept"})
        self.poller = asyncio.create_task(self._poll(), name="dashboard-poll")

    async def _poll(self) -> None:
        after, first = 0, True
        while not self.closed:
            try:
                update = await database_sync_to_async(dashboard.staff_snapshot)(
                    user_pk=self.user.pk, session_key=self.session_key, after_pk=after,
                    first=first,
                )
                if update is None:
                    return await self._forbid()
                after, first = update["after"], False
                await self.send_json(update)
            except Exception:  # the database, or a bug: log it and keep the page updating
                logger.exception("dashboard update failed; retrying", extra=self.log)
            await asyncio.sleep(INTERVAL)

    async def websocket_receive(self, message) -> None:
        if self.closed:
            return
        try:
            data = json.loads(message.get("text") or "")
        except ValueError:
            return await self.send_error("invalid_json", "send a JSON object")
        if not isinstance(data, dict):
            return await self.send_error("not_an_object", "send a JSON object")
        action = data.get("action")
        handler = getattr(self, f"action_{action}", None) if isinstance(action, str) else None
        if handler is None:
            return await self.send_error("unknown_action", f"unknown action {str(action)[:32]!r}")
        if not csrf_token_valid(self.scope, data.get("csrf")):
            return await self.send_error(
                "csrf_failed", "the CSRF token is missing or wrong; reload the page"
            )
        if not await database_sync_to_async(dashboard.staff_is_current)(
            user_pk=self.user.pk, session_key=self.session_key
        ):
            return await self._forbid()
        await self._act(str(action), handler, data)

    async def _act(self, action: str, handler, data: dict) -> None:
        try:
            await handler(data)
        except GatewayError as exc:  # an invalid room name too
            return await self.send_error(exc.code, exc.detail)
        logger.info("staff action %s", action, extra={**self.log, "action": action,
                    "room": data.get("room"), "target": data.get("scope")})
        await self.send_json({"type": "done", "action": action})

    async def _forbid(self) -> None:
        """The user is no longer active staff: say so and close (the page does not retry)."""
        if self.closed:
            return
        self.closed = True  # before any await: the poller and an action may both get here
        await self.send_error("not_staff", "you are no longer staff")
        await self.base_send({"type": "websocket.close", "code": CLOSE_FORBIDDEN})

    async def action_post(self, data: dict) -> None:
        sender = services.staff_sender(self.user)
        await database_sync_to_async(services.room_message_post)(
            room=data.get("room"), text=data.get("message"), sender=sender, origin="dashboard"
        )

    async def action_close_room(self, data: dict) -> None:
        room = room_name_validate(data.get("room"))
        await database_sync_to_async(services.room_close)(
            room=room, by=services.staff_sender(self.user)
        )

    async def action_reopen_room(self, data: dict) -> None:
        room = room_name_validate(data.get("room"))
        await database_sync_to_async(services.room_reopen)(
            room=room, by=services.staff_sender(self.user)
        )

    async def action_disconnect(self, data: dict) -> None:
        scope = data.get("scope")
        if not isinstance(scope, str) or not 1 <= len(scope) <= 128:
            raise GatewayError("invalid_scope", "'scope' must name a connection")
        await control_broadcast(events.scope_disconnect(scope=scope))

    async def send_json(self, payload: dict) -> None:
        await self.base_send({"type": "websocket.send", "text": json.dumps(payload)})

    async def send_error(self, code: str, detail: str) -> None:
        logger.warning("dashboard error %s: %s", code, detail, extra=self.log)
        await self.send_json({"type": "error", "code": code, "detail": detail})

    async def websocket_disconnect(self, message) -> None:
        raise StopConsumer()

    async def finish(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
