"""The Telegram protocol server: owns the Bot API connection and the ``telegram`` scopes.

Like daphne for WebSockets, it knows nothing of rooms or commands. It turns Telegram
updates into scopes and events for the root ASGI application, and carries the
application's ``chat.send_message`` events to Telegram. The events are written down in
protocols/telegram/events.py.

- A chat scope per chat, ``{"type": "telegram", "role": "chat", "chat": {...}, "user": {...}}``
  (the user who opened it), fed ``chat.received_message`` events; closed after
  ``TELEGRAM_IDLE_TIMEOUT`` without a message, and at shutdown. An update is confirmed to
  Telegram (by the next ``getUpdates`` offset, or the webhook's answer) only once the
  application reports it handled (``chat.handled``); a repeated update is recognised by
  its ``update_id`` in the application, so nothing is lost or posted twice.
- Updates come by long polling (``getUpdates``), or, with ``TELEGRAM_WEBHOOK_URL``, by
  Telegram posting them to the web server's webhook route (webhook.py, which checks the
  secret and hands them here through handoff.py): ``Ingress`` (ingress.py).
- With several gateway processes, one holds the ``telegram`` lease: it polls (webhooks reach
  every process) and relays the rooms to the chats, through a ``rooms`` scope that names
  the rooms with chats and a ``room`` scope per such room. Another process takes the lease
  over within ``LEASE_TTL`` if it dies.
- Sending: one ordered queue per chat, each paced by the chat's limit (private chats,
  groups) and all by the bot's overall limit; ``RetryAfter`` pauses only that chat, network
  errors are retried with backoff, keeping the order. A chat with more than
  ``TELEGRAM_CHAT_BACKLOG`` room messages waiting loses the oldest of them and is told how
  many it missed (``/history`` shows them): a chat far behind costs bounded memory and
  never holds up another. The queues, the pace and that policy are the pure ``Outbox``
  (outbox.py); here a task per chat drains it, sends, retries and has deliveries recorded.
- Privacy mode (Telegram's default, from ``getMe``): in a group where the bot is not an
  admin, only commands reach it. A group's command then says (``"reads_all": false``, from
  ``getChatMember`` of the bot itself) that the group's plain text does not, so the
  application can tell the group what to change; the status shows the mode.
- An update whose ``update_id`` the handled-updates record cannot hold is refused (webhook)
  or skipped and confirmed (polling), with a log line: never retried (ingress.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections import Counter

# Opt in to python-telegram-bot's v23 time periods (RetryAfter.retry_after as a timedelta)
# rather than be warned about the change on every flood-control answer.
os.environ.setdefault("PTB_TIMEDELTA", "true")

from telegram import Bot, LinkPreviewOptions, Update  # noqa: E402
from telegram.constants import ParseMode  # noqa: E402
from telegram.error import (  # noqa: E402
    BadRequest,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.request import HTTPXRequest  # noqa: E402

from gateway import metrics, status  # noqa: E402
from gateway.lease import Lease, jitter  # noqa: E402
from protocols.scopes import Scope, ScopeRegistry, scope_open, scopes_close  # noqa: E402
from protocols.telegram import handoff  # noqa: E402
from protocols.telegram.events import (  # noqa: E402
    ChatDisconnect,
    ChatReceive,
    ChatUser,
    RoomReceive,
    RoomsReceive,
    ScopeSend,
    chat_connect,
    chat_disconnect,
    telegram_scan,
)
from protocols.telegram.ingress import LOG, Ingress, seconds  # noqa: E402
from protocols.telegram.outbox import Outbox, Outgoing, SendLimits  # noqa: E402

__all__ = ["SendLimits", "TelegramServer", "telegram_bot"]  # SendLimits: for gateway run

logger = logging.getLogger(__name__)

LEASE = "telegram"  # held by the process that polls and relays rooms to chats
LEASE_TTL = 10.0  # another process takes over within this after the holder dies
TICK = 1.0  # lease renewal, rooms scan, idle scopes
PRUNE_INTERVAL = 3600.0
RECORD_TIMEOUT = 5.0  # how long a chat's next message waits for the last one's record
ME_REFRESH = 300.0  # getMe again: the privacy mode may have been changed in BotFather
MEMBER_TTL = 10.0  # how long the bot's status in a group is taken as known (bursts of commands)
MEMBERS_KEPT = 10_000  # groups whose bot status is remembered (the oldest are forgotten)
ADMIN_STATUSES = ("administrator", "creator")  # they receive every message, privacy or not
GROUP_KINDS = ("group", "supergroup")
PRIVACY_HINT = ("in groups where the bot is not an admin only commands reach it: "
                "BotFather /setprivacy -> Disable, then re-add the bot to each group")


class TelegramServer:
    def __init__(
        self,
        application,
        *,
        bot: Bot,
        webhook_url: str = "",
        webhook_secret: str = "",
        poll_timeout: int = 30,
        idle_timeout: float = 300.0,
        limits: SendLimits | None = None,
    ) -> None:
        limits = limits or SendLimits()
        self.application = application
        self.bot = bot
        self.idle_timeout = idle_timeout
        self.limits = limits
        self.lease = Lease(LEASE, ttl=LEASE_TTL)
        self.leader = False
        self.ready = asyncio.Event()
        self.chats: ScopeRegistry[str, Scope[ChatReceive]] = ScopeRegistry(
            on_count=metrics.CONNECTIONS.labels("telegram").set
        )
        self.relays: ScopeRegistry[str, Scope[RoomReceive]] = ScopeRegistry()
        self.directory: Scope[RoomsReceive] | None = None
        self.outbox = Outbox(limits)
        self.drains: dict[str, asyncio.Task] = {}  # chat -> the task sending its queue
        self.recorded: dict[str, asyncio.Future] = {}  # chat -> its last delivery recorded
        # update_id -> (whether handled, the chat scope handling it)
        self.handling: dict[int, tuple[asyncio.Future, Scope[ChatReceive]]] = {}
        self.stats: Counter[str] = Counter()
        self.last_update: float | None = None  # epoch seconds
        self.ingress = Ingress(
            bot, self._dispatch, ready=self.ready, stats=self.stats, webhook_url=webhook_url,
            webhook_secret=webhook_secret, poll_timeout=poll_timeout,
        )
        # From getMe: groups' plain text reaches the bot only where it is an admin (None
        # until Telegram has answered).
        self.group_privacy: bool | None = None
        self.members: dict[str, tuple[float, bool]] = {}  # chat -> (when, reads all)
        self.commands_only: set[str] = set()  # groups seen where plain text does not reach
        self._tasks: list[asyncio.Task] = []

    @property
    def mode(self) -> str:
        return self.ingress.mode

    def status(self) -> dict:
        """For /readyz and the dashboard."""
        state = {"ready": self.ready.is_set(), "mode": self.mode, "relaying": self.leader,
                 "last_update": self.last_update, "chats_open": len(self.chats),
                 "retry_after_waits": self.stats["retry_after"],
                 "received": self.stats["received"], "sent": self.stats["sent"],
                 "skipped": self.stats["skipped"], "group_privacy": self.group_privacy,
                 "updates_refused": self.stats["updates_refused"]}
        if self.group_privacy:
            state["group_privacy_hint"] = PRIVACY_HINT
            state["groups_commands_only"] = len(self.commands_only)
        return state

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        status.register("telegram", self.status)
        if self.ingress.webhook_url:
            handoff.register("telegram", self.ingress.webhook_update)
        self._tasks = [asyncio.create_task(self._run(), name="telegram")]

    async def stop(self) -> None:
        """Stop taking updates, close the chats, send what is queued (briefly), hand over."""
        status.unregister("telegram")
        handoff.unregister("telegram", self.ingress.webhook_update)
        for task in self._tasks:  # no more housekeeping: it could take the lease again
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await scopes_close(list(self.chats.values()), chat_disconnect(), wait=5)
        if self.drains:
            _, unsent = await asyncio.wait(list(self.drains.values()), timeout=3)
            if unsent:
                logger.warning("stopped with %d chats' messages unsent", len(unsent), extra=LOG)
        await self._step_down()
        for task in self.drains.values():
            task.cancel()
        if self.ready.is_set():
            await self.bot.shutdown()
        logger.info("telegram server stopped", extra={**LOG, **self.stats})

    async def _run(self) -> None:
        if not await self._connect():
            return
        next_prune = 0.0
        next_me = time.monotonic() + ME_REFRESH
        while True:
            try:
                if time.monotonic() >= next_me:
                    next_me = time.monotonic() + ME_REFRESH
                    await self._refresh_me()
                await self._lead()
                if self.leader and self.directory is not None:
                    self.directory.put(telegram_scan())
                    if time.monotonic() >= next_prune:
                        self.directory.put({"type": "telegram.prune"})
                        next_prune = time.monotonic() + PRUNE_INTERVAL
                    if self.ingress.webhook_url and not self.ingress.webhook_set:
                        await self.ingress.set_webhook()
                self._close_idle()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("telegram housekeeping failed; will retry", extra=LOG)
            await asyncio.sleep(TICK)

    async def _connect(self) -> bool:
        """Ask Telegram who the bot is (getMe) until it answers; False for a refused token."""
        backoff = 1.0
        while True:
            try:
                await self.bot.initialize()
            except InvalidToken:
                logger.error("Telegram refused TELEGRAM_BOT_TOKEN; the bot is not started",
                             extra=LOG)
                return False
            except TelegramError as exc:
                delay = jitter(backoff)
                logger.warning("Telegram Bot API unreachable (%s); retrying in %.1fs", exc,
                               delay, extra=LOG)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)
                continue
            self.ready.set()
            logger.info("connected to Telegram as @%s", self.bot.username,
                        extra={**LOG, "mode": self.mode})
            self._privacy_learn()
            return True

    async def _refresh_me(self) -> None:
        try:
            await self.bot.get_me()  # PTB keeps the answer as bot.bot
        except TelegramError as exc:
            logger.warning("could not ask Telegram about the bot (%s); will retry", exc,
                           extra=LOG)
            return
        self._privacy_learn()

    def _privacy_learn(self) -> None:
        """Read the privacy mode from getMe's answer; say so when it changes."""
        privacy = not self.bot.bot.can_read_all_group_messages
        if privacy == self.group_privacy:
            return
        self.group_privacy = privacy
        self.members.clear()
        if privacy:
            logger.warning("Telegram privacy mode is on for @%s: %s", self.bot.username,
                           PRIVACY_HINT, extra={**LOG, "group_privacy": True})
        else:
            logger.info("Telegram privacy mode is off: groups' plain text reaches the bot",
                        extra={**LOG, "group_privacy": False})

    # --- leadership: polling and relaying rooms ----------------------------------------

    async def _lead(self) -> None:
        """Renew or take the lease; relay (and poll) only while it is surely held."""
        held = await self.lease.renew()
        if held and not self.leader:
            self.leader = True
            self.ingress.lead()
            self.directory = scope_open(
                self.application, {"type": "telegram", "role": "rooms"}, self._send,
                first=telegram_scan(), name="telegram-rooms", on_exit=self._exited,
            )
            logger.info("this process now %s Telegram and relays rooms to chats",
                        "receives the webhook of" if self.ingress.webhook_url else "polls",
                        extra={**LOG, "mode": self.mode})
        elif not held and (self.leader or self.relays or self.directory
                           or self.ingress.polling):
            await self._step_down()
            logger.warning("lost the telegram lease; another process relays now", extra=LOG)

    async def _step_down(self) -> None:
        """Stop polling and relaying, record how far each chat got, and hand the lease over.
        Room messages still queued are dropped: the next relay sends them from the record."""
        was_leader, self.leader = self.leader, False
        await self.ingress.step_down()
        self.outbox.drop_rooms()
        scopes: list[Scope[ChatDisconnect]] = list(self.relays.values())
        if self.directory is not None:
            scopes.append(self.directory)
        await scopes_close(scopes, chat_disconnect(), wait=5)
        if was_leader:
            await self.lease.release()

    # --- inbound (from Ingress) --------------------------------------------------------

    async def _dispatch(self, update: Update) -> asyncio.Future | None:
        """Feed a message update to its chat's scope. The future's result is True once the
        update is handled, False if that failed."""
        message = update.message
        if message is None:
            return None  # another kind of update (not asked for)
        pending = self.handling.get(update.update_id)
        if pending is not None:
            return pending[0]  # delivered again while still being handled
        reads_all = await self._reads_all(message)
        pending = self.handling.get(update.update_id)
        if pending is not None:
            return pending[0]  # delivered again while the bot's status was asked
        self.stats["received"] += 1
        self.last_update = time.time()
        chat_id = str(message.chat.id)
        user = message.from_user
        person: ChatUser = {
            "id": str(user.id) if user else chat_id,
            "username": (user.username or "") if user else "",
            "name": user.full_name if user else (message.chat.title or chat_id),
        }
        chat = {"id": chat_id, "kind": message.chat.type,
                "title": message.chat.title or message.chat.full_name or person["name"]}
        scope = self.chats.open(chat_id, lambda: scope_open(
            self.application,
            {"type": "telegram", "role": "chat", "chat": chat, "user": person,
             "bot_username": self.bot.username},
            self._send, first=chat_connect(), name=f"telegram-chat-{chat_id}",
            on_exit=self._exited,
        ))
        handled = asyncio.get_running_loop().create_future()
        self.handling[update.update_id] = (handled, scope)
        scope.last_seen = time.monotonic()
        scope.pending += 1  # until handled: an idle close waits for it
        scope.put({"type": "chat.received_message", "update_id": update.update_id,
                   "text": message.text or "", "user": person, "reads_all": reads_all})
        return handled

    async def _reads_all(self, message) -> bool | None:
        """Whether the chat's plain text reaches the bot; asked only for a group's commands
        under privacy mode (plain text arriving there shows it does). None: not known."""
        chat_id = str(message.chat.id)
        if (message.chat.type not in GROUP_KINDS or not self.group_privacy
                or not (message.text or "").startswith("/")):
            return True
        known = self.members.get(chat_id)
        if known is not None and time.monotonic() - known[0] < MEMBER_TTL:
            return known[1]
        try:
            member = await self.bot.get_chat_member(message.chat.id, self.bot.id)
        except TelegramError as exc:
            logger.warning("could not ask Telegram for the bot's status in a group (%s)", exc,
                           extra={**LOG, "chat": chat_id})
            return None
        reads_all = member.status in ADMIN_STATUSES
        self.members[chat_id] = (time.monotonic(), reads_all)
        if len(self.members) > MEMBERS_KEPT:
            del self.members[next(iter(self.members))]
        if reads_all:
            self.commands_only.discard(chat_id)
        else:
            self.commands_only.add(chat_id)
        return reads_all

    def _handled(self, update_id: int, ok: bool) -> None:
        pending = self.handling.pop(update_id, None)
        if pending is None:
            return
        handled, scope = pending
        scope.pending = max(scope.pending - 1, 0)
        if not handled.done():
            handled.set_result(ok)

    def _exited(self, scope: Scope[ChatDisconnect], failure: BaseException | None) -> None:
        info = scope.scope
        if info["role"] == "chat":
            self.chats.ended(info["chat"]["id"], scope)
            for update_id, (_, owner) in list(self.handling.items()):
                if owner is scope:  # it ended (or failed) before handling them
                    self._handled(update_id, False)
        elif info["role"] == "room":
            self.relays.ended(info["room"], scope)  # a failed one is opened again by the next scan
        elif self.directory is scope:
            self.directory = None
            if failure is not None and self.leader:
                # Lead again from the next tick: a new directory, and the poller restarted.
                self.leader = False
                self.ingress.cancel()

    # --- from the application ----------------------------------------------------------

    async def _send(self, message: ScopeSend) -> None:
        if message["type"] == "chat.send_message":
            if "room" in message:  # a piece of a room message; else a reply
                item = Outgoing(message["text"], message["room"], message["id"], message["last"])
            else:
                item = Outgoing(message["text"])
            self._queue(str(message["chat_id"]), item)
        elif message["type"] == "chat.handled" or message["type"] == "chat.failed":
            self._handled(message["update_id"], message["type"] == "chat.handled")
        elif message["type"] == "chat.drop":
            self.outbox.drop((message["room"], message["id"]))
        elif message["type"] == "chat.recorded":
            recorded = self.recorded.get(message["chat_id"])
            if recorded is not None and not recorded.done():
                recorded.set_result(None)
        elif message["type"] == "telegram.relay_rooms":
            self._relay_rooms(message["rooms"])
        elif message["type"] == "chat.relay_behind":
            # Ended, with what it queued: the next scan opens it again where chats got, and
            # sends those again (kept, they would reach the chats twice).
            self.outbox.drop_rooms(message["room"])
            relay = self.relays.get(message["room"])
            if relay is not None:
                relay.put(chat_disconnect())
        else:
            raise ValueError(f"unknown telegram event {message['type']!r}")

    def _relay_rooms(self, rooms: list[str]) -> None:
        if not self.leader:
            return
        for room in set(rooms) - self.relays.keys():
            self.relays.open(room, functools.partial(self._open_relay, room))
        for room in self.relays.keys() - set(rooms):
            relay = self.relays.get(room)
            if relay is not None:
                relay.put(chat_disconnect())

    def _open_relay(self, room: str) -> Scope[RoomReceive]:
        return scope_open(
            self.application, {"type": "telegram", "role": "room", "room": room},
            self._send, first=chat_connect(), name=f"telegram-out-{room}",
            on_exit=self._exited,
        )

    # --- outbound ----------------------------------------------------------------------

    def _queue(self, chat_id: str, item: Outgoing) -> None:
        if self.outbox.queue(chat_id, item):
            self.stats["skipped"] += 1
            metrics.dropped("telegram", "chat_backlog")
        if chat_id not in self.drains:
            self.drains[chat_id] = asyncio.create_task(
                self._drain(chat_id), name=f"telegram-send-{chat_id}"
            )

    async def _drain(self, chat_id: str) -> None:
        try:
            while (item := self.outbox.next(chat_id)) is not None:
                sent = await self._deliver(chat_id, item.text)
                self.outbox.done(chat_id)
                relay = self.relays.get(item.room) if item.room is not None else None
                if sent and item.last and relay is not None and item.seq is not None:
                    await self._record(relay, chat_id, item.seq)
                elif not sent and item.room is not None and chat_id not in self.outbox:
                    # Unreachable: tell the room's relay, which takes the chat out of it.
                    if relay is not None:
                        relay.put({"type": "chat.unreachable", "chat_id": chat_id})
        finally:
            if self.drains.get(chat_id) is asyncio.current_task():
                del self.drains[chat_id]
            self.outbox.release(chat_id)

    async def _record(self, relay: Scope[RoomReceive], chat_id: str, seq: int) -> None:
        """Have the relay record that the chat was sent ``seq``, and wait for it before the
        chat's next message: a relay taking over after a crash then resends at most the one
        message that was in flight (Telegram has no idempotent send)."""
        recorded = self.recorded[chat_id] = asyncio.get_running_loop().create_future()
        relay.put({"type": "chat.delivered", "positions": {chat_id: seq}})
        try:
            await asyncio.wait_for(recorded, RECORD_TIMEOUT)
        except TimeoutError:
            logger.warning("delivery not recorded in time", extra={**LOG, "chat": chat_id})
        finally:
            if self.recorded.get(chat_id) is recorded:
                del self.recorded[chat_id]

    async def _paced(self, chat_id: str) -> None:
        """Wait for the chat's turn, then the bot's overall one, as the outbox paces them."""
        if (wait := self.outbox.due(chat_id)) > 0:
            await asyncio.sleep(wait)
        if (wait := self.outbox.turn(chat_id)) > 0:
            await asyncio.sleep(wait)

    async def _deliver(self, chat_id: str, text: str) -> bool:
        """Send one message, waiting out flood limits and outages; False if Telegram refused
        it for good (the chat is gone, or the message is invalid)."""
        backoff = 1.0
        while True:
            try:
                await self._paced(chat_id)
                await self.bot.send_message(
                    chat_id=int(chat_id), text=text, parse_mode=ParseMode.HTML,
                    link_preview_options=LinkPreviewOptions(is_disabled=True),
                )
                self.stats["sent"] += 1
                return True
            except RetryAfter as exc:
                wait = seconds(exc.retry_after)
                self.stats["retry_after"] += 1
                logger.warning("Telegram flood control: chat waits %.0fs", wait,
                               extra={**LOG, "chat": chat_id})
                await asyncio.sleep(wait)
            except (Forbidden, BadRequest) as exc:
                self.stats["refused"] += 1
                gone = isinstance(exc, Forbidden) or "chat not found" in str(exc).lower()
                logger.warning("Telegram refused a message to the chat: %s", exc,
                               extra={**LOG, "chat": chat_id, "gone": gone})
                if gone:
                    self.outbox.forget(chat_id)
                return False
            except NetworkError as exc:  # includes TimedOut: kept, in order, and tried again
                delay = jitter(backoff)
                logger.warning("sending to Telegram failed (%s); retrying in %.1fs", exc, delay,
                               extra={**LOG, "chat": chat_id})
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)
            except TelegramError:
                self.stats["refused"] += 1
                logger.exception("Telegram refused a message", extra={**LOG, "chat": chat_id})
                return False

    def _close_idle(self) -> None:
        for chat_id, scope in self.chats.idle(self.idle_timeout):
            self.chats.ended(chat_id, scope)  # a new update opens a new scope at once
            scope.put(chat_disconnect())


def telegram_bot(token: str, *, api_url: str) -> Bot:
    """The python-telegram-bot client for ``api_url`` (Telegram's, or another Bot API server)."""
    return Bot(
        token,
        base_url=f"{api_url}/bot",
        base_file_url=f"{api_url}/file/bot",
        # Chats are sent to concurrently (each in order): more than PTB's single connection.
        # (Polls have their own connection; PTB adds the poll timeout to their read timeout.)
        request=HTTPXRequest(connection_pool_size=16),
    )
