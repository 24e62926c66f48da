"""The Telegram protocol server: owns the Bot API connection and the ``telegram`` scopes.

Like daphne for WebSockets, it knows nothing of rooms or commands. It turns Telegram
updates into scopes and events for the root ASGI application, and makes the calls to chats:
the application's replies (``chat.send_message``) and what the relay asks (``send``, from
protocols/telegram/relay.py: messages, and edits, deletes and reactions of them). The events
are written down in protocols/telegram/events.py, the calls in calls.py.

- A chat scope per chat, ``{"type": "telegram", "role": "chat", "chat": {...}, "user": {...}}``
  (the user who opened it), fed ``chat.received_message`` events: a message, an edit of one,
  a user's reactions changed, a group that became a supergroup (updates.py reads them from
  the update); closed after ``TELEGRAM_IDLE_TIMEOUT`` without an update, and at shutdown.
  An update is confirmed to Telegram (by the next ``getUpdates`` offset, or the webhook's
  answer) only once the application reports it handled (``chat.handled``); a repeated
  update is recognised by its ``update_id`` in the application, so nothing is lost or
  done twice.
- Updates come by long polling (``getUpdates``), or, with ``TELEGRAM_WEBHOOK_URL``, by
  Telegram posting them to the web server's webhook route (webhook.py, which checks the
  secret and hands them here through handoff.py): ``Ingress`` (ingress.py). With several
  gateway processes, the one holding the ``telegram-poll`` lease polls (and registers the
  webhook, and forgets old handled updates); another takes over within ``LEASE_TTL``.
- Calling: one ordered queue per chat, each paced by the chat's limit (private chats,
  groups) and all by the bot's overall limit; ``RetryAfter`` pauses only that chat, network
  errors are retried with backoff, keeping the order. The queues and the pace are the pure
  ``Outbox`` (outbox.py); here a task per chat drains it, calls and retries. A room's
  backlog never waits here: the relay hands over one entry at a time and awaits it.
  ``send`` answers with Telegram's id of the message sent (an album's, one per file), which
  the relay records. A call that uploads a file Telegram finds too large (413) is refused,
  not retried.
- Files a chat sends are fetched from the Bot API by its consumer, through the scope's
  ``telegram.download`` extension (download.py), once it knows the file is wanted: the
  token-bearing file URL never leaves python-telegram-bot.
- A group that became a supergroup (``ChatMigrated`` in answer to a call) is moved to its
  new id (gateway/chats.py: its room, its place in the room) and the message is sent there
  (not as a reply: what it answered stayed in the old group); a change to one of its old
  messages is not made (they stayed in the old group, which takes no more calls).
- Privacy mode (Telegram's default, from ``getMe``): in a group where the bot is not an
  admin, only commands reach it. A group's command then says (``"reads_all": false``, from
  ``getChatMember`` of the bot itself) that the group's plain text does not, so the
  application can tell the group what to change; the status shows the mode.
- An update whose ``update_id`` the handled-updates record cannot hold is refused (webhook)
  or skipped and confirmed (polling), with a log line: never retried (ingress.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

# Opt in to python-telegram-bot's v23 time periods (RetryAfter.retry_after as a timedelta)
# rather than be warned about the change on every flood-control answer.
os.environ.setdefault("PTB_TIMEDELTA", "true")

from channels.db import database_sync_to_async  # noqa: E402
from django.db import DatabaseError  # noqa: E402
from telegram import Bot, Update  # noqa: E402
from telegram.error import (  # noqa: E402
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.request import HTTPXRequest  # noqa: E402

from gateway import chats, metrics, status  # noqa: E402
from gateway.lease import Lease, jitter  # noqa: E402
from protocols.scopes import Scope, ScopeRegistry, scope_open, scopes_close  # noqa: E402
from protocols.telegram import calls, download, handoff  # noqa: E402
from protocols.telegram.calls import Call  # noqa: E402
from protocols.telegram.events import (  # noqa: E402
    DOWNLOAD_EXTENSION,
    ChatDisconnect,
    ChatReceive,
    ChatReceivedMessage,
    ChatSend,
    chat_connect,
    chat_disconnect,
)
from protocols.telegram.ingress import LOG, Ingress, seconds  # noqa: E402
from protocols.telegram.outbox import Outbox, Outgoing, SendLimits  # noqa: E402
from protocols.telegram.updates import Received, received  # noqa: E402

__all__ = ["SendLimits", "TelegramServer", "telegram_bot"]  # SendLimits: for gateway run

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
LEASE = "telegram-poll"  # held by the process that polls (rooms reach chats by the relay)
LEASE_TTL = 10.0  # another process takes over within this after the holder dies
TICK = 1.0  # lease renewal, idle scopes
CALL_READ_TIMEOUT = 20.0  # seconds a call waits for its answer (PTB: 5)
PRUNE_INTERVAL = 3600.0
UPDATES_KEPT = 48 * 3600.0  # Telegram redelivers an update for at most 24 hours
ME_REFRESH = 300.0  # getMe again: the privacy mode may have been changed in BotFather
MEMBER_TTL = 10.0  # how long the bot's status in a group is taken as known (bursts of commands)
MEMBERS_KEPT = 10_000  # groups whose bot status is remembered (the oldest are forgotten)
ADMIN_STATUSES = ("administrator", "creator")  # they receive every message, privacy or not
GROUP_KINDS = ("group", "supergroup")
PRIVACY_HINT = ("in groups where the bot is not an admin only commands reach it: "
                "BotFather /setprivacy -> Disable, then re-add the bot to each group")


class Sent(enum.Enum):
    """How a ``send`` ended."""

    SENT = "sent"  # done (a change Telegram found already made counts too)
    REFUSED = "refused"  # Telegram refused this call for good (invalid, too old): not made
    GONE = "gone"  # the chat blocked the bot, left, or does not exist


@dataclass(frozen=True)
class Answer:
    """Telegram's answer to a ``send``, for good."""

    sent: Sent
    message_id: int | None = None  # a message sent: Telegram's id of it in the chat
    moved_to: str | None = None  # the chat's new id: it became a supergroup meanwhile
    others: tuple[int, ...] = ()  # an album: the ids of its other messages, in order
    file_ids: tuple[str | None, ...] = ()  # files sent: Telegram's id of each, in order

    @property
    def message_ids(self) -> tuple[int, ...]:
        """Every message sent, in order (an album has one per file)."""
        return () if self.message_id is None else (self.message_id, *self.others)


class ServerStopped(Exception):
    """A send asked of a server that has stopped (or stops before sending it)."""


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
        self.outbox = Outbox(limits)
        self.drains: dict[str, asyncio.Task] = {}  # chat -> the task sending its queue
        self._closing = False  # stop() has begun: no more housekeeping
        self._stopping = False  # what is queued has had its chance: no more sends
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
        state = {"ready": self.ready.is_set(), "mode": self.mode, "polling": self.leader,
                 "last_update": self.last_update, "chats_open": len(self.chats),
                 "retry_after_waits": self.stats["retry_after"],
                 "received": self.stats["received"], "sent": self.stats["sent"],
                 "changed": self.stats["changed"], "refused": self.stats["refused"],
                 "downloaded": self.stats["downloaded"],
                 "group_privacy": self.group_privacy,
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
        self._closing = True
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
        self._stopping = True
        await self._step_down()
        for task in self.drains.values():
            task.cancel()
        await asyncio.gather(*self.drains.values(), return_exceptions=True)
        for chat_id in list(self.outbox.chats):
            self._fail_waiting(chat_id, ServerStopped("the Telegram server has stopped"))
        if self.ready.is_set():
            await self.bot.shutdown()
        logger.info("telegram server stopped", extra={**LOG, **self.stats})

    async def _run(self) -> None:
        if not await self._connect():
            return
        next_prune = 0.0
        next_me = time.monotonic() + ME_REFRESH
        while not self._closing:  # as well as cancelled: a lost cancellation ends it too
            try:
                if time.monotonic() >= next_me:
                    next_me = time.monotonic() + ME_REFRESH
                    await self._refresh_me()
                await self._lead()
                if self.leader:
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + PRUNE_INTERVAL
                        await self._prune()
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

    # --- leadership: polling -----------------------------------------------------------

    async def _lead(self) -> None:
        """Renew or take the lease; poll only while it is surely held."""
        held = await self.lease.renew()
        if held and not self.leader:
            self.leader = True
            self.ingress.lead()
            logger.info("this process now %s Telegram",
                        "receives the webhook of" if self.ingress.webhook_url else "polls",
                        extra={**LOG, "mode": self.mode})
        elif not held and (self.leader or self.ingress.polling):
            await self._step_down()
            logger.warning("lost the telegram-poll lease; another process polls now", extra=LOG)

    async def _step_down(self) -> None:
        """Stop polling, and hand the lease over."""
        was_leader, self.leader = self.leader, False
        await self.ingress.step_down()
        if was_leader:
            await self.lease.release()

    async def _prune(self) -> None:
        """Forget handled updates older than Telegram redelivers."""
        try:
            await database_sync_to_async(chats.bot_updates_prune)(
                platform=PLATFORM, older_than=UPDATES_KEPT
            )
        except DatabaseError:
            logger.warning("could not forget old handled updates; will retry", exc_info=True,
                           extra=LOG)

    # --- inbound (from Ingress) --------------------------------------------------------

    async def _dispatch(self, update: Update) -> asyncio.Future | None:
        """Feed an update about a chat's messages to the chat's scope. The future's result is
        True once the update is handled, False if that failed."""
        found = received(update)
        if found is None:
            return None  # another kind of update (not asked for), or not one to take
        pending = self.handling.get(update.update_id)
        if pending is not None:
            return pending[0]  # delivered again while still being handled
        reads_all = await self._reads_all(found) if found.kind == "message" else None
        pending = self.handling.get(update.update_id)
        if pending is not None:
            return pending[0]  # delivered again while the bot's status was asked
        self.stats["received"] += 1
        self.last_update = time.time()
        chat = found.scope_chat()
        chat_id = chat["id"]
        scope = self.chats.open(chat_id, lambda: scope_open(
            self.application,
            {"type": "telegram", "role": "chat", "chat": chat, "user": found.user,
             "bot_username": self.bot.username,
             "extensions": {DOWNLOAD_EXTENSION: self._download}},
            self._send, first=chat_connect(), name=f"telegram-chat-{chat_id}",
            on_exit=self._exited,
        ))
        handled = asyncio.get_running_loop().create_future()
        self.handling[update.update_id] = (handled, scope)
        scope.last_seen = time.monotonic()
        scope.pending += 1  # until handled: an idle close waits for it
        scope.put(_event(update.update_id, found, reads_all))
        return handled

    async def _reads_all(self, message: Received) -> bool | None:
        """Whether the chat's plain text reaches the bot; asked only for a group's commands
        under privacy mode (plain text arriving there shows it does). None: not known."""
        chat_id = str(message.chat.id)
        if (message.chat.type not in GROUP_KINDS or not self.group_privacy
                or not message.text.startswith("/")):
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

    async def _download(self, file_id: str, limit: int) -> bytes:
        """A file a chat sent (the scopes' ``telegram.download``): download.fetch."""
        data = await download.fetch(self.bot, file_id, limit=limit)
        self.stats["downloaded"] += 1
        return data

    def _handled(self, update_id: int, ok: bool) -> None:
        pending = self.handling.pop(update_id, None)
        if pending is None:
            return
        handled, scope = pending
        scope.pending = max(scope.pending - 1, 0)
        if not handled.done():
            handled.set_result(ok)

    def _exited(self, scope: Scope[ChatDisconnect], failure: BaseException | None) -> None:
        self.chats.ended(scope.scope["chat"]["id"], scope)
        for update_id, (_, owner) in list(self.handling.items()):
            if owner is scope:  # it ended (or failed) before handling them
                self._handled(update_id, False)

    # --- from the application ----------------------------------------------------------

    async def _send(self, message: ChatSend) -> None:
        if message["type"] == "chat.send_message":
            self._queue(str(message["chat_id"]), Outgoing(calls.SendText(message["text"])))
        elif message["type"] == "chat.handled" or message["type"] == "chat.failed":
            self._handled(message["update_id"], message["type"] == "chat.handled")
        else:
            raise ValueError(f"unknown telegram event {message['type']!r}")

    # --- outbound ----------------------------------------------------------------------

    async def send(self, chat_id: str, call: Call) -> Answer:
        """Make ``call`` (a message, or a change to one: calls.py) to the chat, after what it
        has queued and at its pace; return once Telegram has answered for good (a flood
        limit or an outage is waited out). ``ServerStopped`` if the server stops first."""
        while not self.ready.is_set():  # until the bot has reached Telegram (getMe answered)
            if self._stopping:
                break
            try:
                async with asyncio.timeout(1.0):
                    await self.ready.wait()
            except TimeoutError:
                pass
        if self._stopping:
            raise ServerStopped("the Telegram server has stopped")
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue(chat_id, Outgoing(call, waiter=waiter))
        return await waiter  # cancelled: the call is not made, unless already under way

    def _queue(self, chat_id: str, item: Outgoing) -> None:
        self.outbox.queue(chat_id, item)
        if chat_id not in self.drains:
            self.drains[chat_id] = asyncio.create_task(
                self._drain(chat_id), name=f"telegram-send-{chat_id}"
            )

    async def _drain(self, chat_id: str) -> None:
        try:
            while (item := self.outbox.next(chat_id)) is not None:
                if item.waiter is not None and item.waiter.cancelled():
                    continue  # whoever asked gave up (a stopping relay): not sent
                try:
                    answer = await self._deliver(chat_id, item.call)
                except BaseException as exc:
                    if item.waiter is not None and not item.waiter.done():
                        item.waiter.set_exception(ServerStopped(str(exc) or "stopped"))
                    raise
                if item.waiter is not None and not item.waiter.done():
                    item.waiter.set_result(answer)
                if answer.sent is Sent.GONE:
                    self._fail_waiting(chat_id, None)
        finally:
            if self.drains.get(chat_id) is asyncio.current_task():
                del self.drains[chat_id]
            self.outbox.release(chat_id)

    def _fail_waiting(self, chat_id: str, error: Exception | None) -> None:
        """Forget the chat's queue, telling whoever waits: ``GONE``, or ``error``."""
        for item in self.outbox.forget(chat_id):
            if item.waiter is None or item.waiter.done():
                continue
            if error is None:
                item.waiter.set_result(Answer(Sent.GONE))
            else:
                item.waiter.set_exception(error)

    async def _paced(self, chat_id: str) -> None:
        """Wait for the chat's turn, then the bot's overall one, as the outbox paces them."""
        if (wait := self.outbox.due(chat_id)) > 0:
            await asyncio.sleep(wait)
        if (wait := self.outbox.turn(chat_id)) > 0:
            await asyncio.sleep(wait)

    async def _deliver(self, chat_id: str, call: Call) -> Answer:
        """Make one call, waiting out flood limits and outages; how Telegram answered for
        good. A chat that became a supergroup is moved, and sent the message there."""
        backoff = 1.0
        moved_to: str | None = None
        while True:
            try:
                await self._paced(chat_id)
                made = await calls.perform(self.bot, int(moved_to or chat_id), call)
                self.stats["sent" if calls.is_send(call) else "changed"] += 1
                ids = made.message_ids
                return Answer(Sent.SENT, ids[0] if ids else None, moved_to, ids[1:],
                              made.file_ids)
            except RetryAfter as exc:
                wait = seconds(exc.retry_after)
                self.stats["retry_after"] += 1
                logger.warning("Telegram flood control: chat waits %.0fs", wait,
                               extra={**LOG, "chat": chat_id})
                await asyncio.sleep(wait)
            except ChatMigrated as exc:
                if moved_to is not None:  # moved twice in one call: not followed further
                    return self._refused(chat_id, call, exc, moved_to)
                moved_to = str(exc.new_chat_id)
                await self._migrated(chat_id, moved_to)
                if not isinstance(call, calls.SendText | calls.SendMedia):
                    return self._refused(chat_id, call, exc, moved_to)  # it stayed there
                call = calls.without_reply(call)  # what it answers stayed in the old group
            except (Forbidden, BadRequest) as exc:
                if isinstance(exc, BadRequest) and calls.unchanged(exc):
                    return Answer(Sent.SENT, None, moved_to)
                return self._refused(chat_id, call, exc, moved_to)
            except NetworkError as exc:  # includes TimedOut: kept, in order, and tried again
                if calls.too_large(exc):  # an upload Telegram will never take
                    return self._refused(chat_id, call, exc, moved_to)
                delay = jitter(backoff)
                logger.warning("calling Telegram failed (%s); retrying in %.1fs", exc, delay,
                               extra={**LOG, "chat": chat_id})
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)
            except TelegramError:
                self.stats["refused"] += 1
                logger.exception("Telegram refused %s", calls.WHAT[type(call)],
                                 extra={**LOG, "chat": chat_id})
                return Answer(Sent.REFUSED, None, moved_to)

    def _refused(self, chat_id: str, call: Call, error: TelegramError,
                 moved_to: str | None) -> Answer:
        self.stats["refused"] += 1
        gone = calls.gone(call, error)
        logger.warning("Telegram refused %s to the chat: %s", calls.WHAT[type(call)], error,
                       extra={**LOG, "chat": chat_id, "gone": gone})
        return Answer(Sent.GONE if gone else Sent.REFUSED, None, moved_to)

    async def _migrated(self, chat_id: str, to: str) -> None:
        """Telegram says the group became the supergroup ``to``: the chat moves there."""
        logger.info("the group became a supergroup: the chat moves to its new id",
                    extra={**LOG, "chat": chat_id, "to": to})
        try:
            await database_sync_to_async(chats.bot_chat_migrate)(
                platform=PLATFORM, chat_id=chat_id, to=to
            )
        except DatabaseError:
            logger.warning("could not move the chat to its new id; will retry on its next "
                           "call", exc_info=True, extra={**LOG, "chat": chat_id, "to": to})

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
        # A call Telegram answers late may have gone through: it is sent again only past a
        # read timeout well beyond PTB's 5 s (Telegram has no idempotent send).
        request=HTTPXRequest(connection_pool_size=16, read_timeout=CALL_READ_TIMEOUT,
                             write_timeout=CALL_READ_TIMEOUT),
    )


def _event(update_id: int, found: Received, reads_all: bool | None) -> ChatReceivedMessage:
    return {"type": "chat.received_message", "update_id": update_id, "kind": found.kind,
            "message_id": found.message_id, "text": found.text,
            "reply_to_message_id": found.reply_to, "added": found.added,
            "removed": found.removed, "migrate_to": found.migrate_to, "user": found.user,
            "reads_all": reads_all, "file": found.file}
