"""The webhook relay role: each room's log POSTed to the webhooks that follow it.

The relay (gateway/relay.py) holds the ``webhook`` lease (one replica delivers every
webhook), follows the rooms with webhooks behind, keeps each webhook's position per room
(``RelayCursor``, target: the webhook's id) and hands this role the entries in order; the
role POSTs each one the webhook asks for (``Webhook.events``), one request per entry,
signed (signing.py), and says how far it got after each. Targets are the rooms each
enabled webhook follows (``WebhookRoom``: kept by gateway/webhooks.py, which also places
positions, so ``from_start`` is off) in rooms whose policy reaches ``webhook``.

- **Delivery id.** ``webhook-id`` is made from the webhook's ``uid``, the room and the
  entry's cursor: the same on every retry and from every replica, so a receiver drops
  repeats by it (a takeover after a crash repeats at most the unsaved second, and the
  request in flight).
- **Failures.** A non-2xx answer (3xx included: redirects are not followed), a timeout
  or a refused connection raises; the relay retries the same entry with backoff and
  jitter (1 s doubling to 60 s), never skipping. Each failure is recorded on the webhook
  (``failing_since``, ``last_error``); a success clears it once none of the webhook's
  rooms is failing (kept per webhook and room in the role). Failing longer than
  ``settings.WEBHOOK["PAUSE_AFTER"]`` (or answered ``410 Gone``, which the Standard
  Webhooks specification reads as "stop"), the webhook is paused and the relay drops it
  (``TargetGone``), its position saved first; enabled again it resumes where it stopped.
- **Slow receivers.** Each webhook in each room has its own worker, and the sender's pool
  has no cap: a receiver that hangs delays only its own deliveries (sender.py).
- **Webhooks change.** Their rows (URL, secret, events) are read again, in one query, at
  most every ``CACHE_SECONDS`` as deliveries need them; one deleted or disabled is
  dropped at the next refresh of the relay's targets (a second).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import QuerySet

from gateway import metrics, services, webhooks
from gateway.fanout import Delivery
from gateway.policy import Policy
from gateway.relay import Batch, RelayRole, TargetGone
from protocols.webhook import signing, wire
from protocols.webhook.sender import Answer, WebhookSender

logger = logging.getLogger(__name__)

CACHE_SECONDS = 2.0  # webhooks' rows are read again at most this often
GONE = 410  # the receiver asks to be sent nothing more


class WebhookFailed(Exception):
    """A delivery failed; the relay retries it (the message says why, without the URL)."""


@dataclass
class _Hook:
    """What delivery needs of one webhook, as last read."""

    pk: int
    name: str
    url: str
    secret: str
    events: frozenset[str]
    uid: uuid.UUID
    failing_since: datetime | None
    success_written: float = float("-inf")  # monotonic time of the last success recorded

    def wants(self, kind: str) -> bool:
        return not self.events or kind in self.events

    def log(self, room: str, **fields: Any) -> dict[str, Any]:
        return {"protocol": wire.PROTOCOL, "room": room, "webhook": self.pk,
                "webhook_name": self.name, "host": webhooks.url_host(self.url), **fields}


def delivery_id(uid: uuid.UUID, room: str, cursor: int) -> str:
    """The ``webhook-id`` of the entry at ``cursor`` in ``room`` for the webhook ``uid``."""
    return f"msg_{uuid.uuid5(uid, f'{room}/{cursor}').hex}"


class WebhookRole(RelayRole):
    name = webhooks.RELAY_ROLE
    protocol = wire.PROTOCOL
    every_room = False  # only the rooms webhooks follow
    from_start = False  # positions are placed by gateway/webhooks.py
    refresh_targets = True  # webhooks come, go and change rooms at any time
    backlog = None  # never skip: a receiver that is down gets everything once it is back
    # Entries are POSTed one at a time whatever the batch; a batch bounds what one log
    # read takes and how much a position lags behind (it moves when the batch returns).
    batch_size = 10
    # Positions saved with the others every second: a takeover after a crash repeats at
    # most that second (receivers drop repeats by their delivery id), for a database write
    # per second rather than one per request.
    save_interval = 1.0

    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender
        self._hooks: dict[str, _Hook] = {}
        # Since when (monotonic) each webhook has been failing in each room: a webhook stays
        # failing while any of its rooms is, and pauses when one has failed too long, even if
        # its other rooms go through.
        self._failing: dict[tuple[int, str], float] = {}
        self._read_at = float("-inf")
        self._reading = asyncio.Lock()

    def targets(self) -> QuerySet:
        return webhooks.webhook_relay_targets()

    def status(self) -> dict[str, Any]:
        """Webhooks failing, as delivery last read them (the dashboard lists them all)."""
        failing = sum(1 for hook in self._hooks.values() if hook.failing_since is not None)
        return {"webhooks_failing": failing}

    async def deliver(self, batch: Batch) -> None:
        try:
            await self._deliver(batch)
        except TargetGone:
            # The relay forgets a dropped target's unsaved position: saved here, so that a
            # webhook enabled again resumes right after what it was delivered.
            upto = batch.done_upto or batch.entries[0].cursor - 1
            if upto > 0:
                await database_sync_to_async(services.relay_positions_save)(
                    relay=self.name, positions={(batch.room, batch.target): upto})
            raise

    async def _deliver(self, batch: Batch) -> None:
        hook = await self._hook(batch.target)
        if hook is None:
            raise TargetGone(batch.target)  # deleted or disabled since the last refresh
        for delivery in batch.entries:
            kind = wire.kind(delivery.event)
            if kind is not None and hook.wants(kind):
                await self._send(hook, batch.room, delivery, batch.policy)
            batch.done(delivery.cursor)

    # --- one entry --------------------------------------------------------------------------

    async def _send(self, hook: _Hook, room: str, delivery: Delivery, policy: Policy) -> None:
        body = delivery.frame(wire.frame_name(policy),
                              lambda event: wire.body(event, policy=policy, room=room))
        if body is None:
            return
        msg_id = delivery_id(hook.uid, room, delivery.cursor)
        headers = signing.headers(hook.secret, msg_id, int(time.time()), body)
        answer = await self.sender.post(hook.url, body, headers)
        metrics.WEBHOOK_DELIVERIES.labels(answer.result).inc()
        metrics.WEBHOOK_LATENCY.observe(answer.seconds)
        if answer.ok:
            await self._succeeded(hook, room)
        else:
            await self._failed(hook, room, delivery.cursor, answer)

    async def _succeeded(self, hook: _Hook, room: str) -> None:
        """Record the success: at once if the webhook was failing (and no other room of it
        still is), else now and then."""
        self._failing.pop((hook.pk, room), None)
        if any(pk == hook.pk for pk, _ in self._failing):
            return  # another room of this webhook still fails: it is still failing
        if hook.failing_since is None and (
                time.monotonic() - hook.success_written < webhooks.SUCCESS_WRITE_EVERY):
            return
        was_failing = hook.failing_since
        await database_sync_to_async(webhooks.webhook_delivery_succeeded)(pk=hook.pk)
        hook.failing_since, hook.success_written = None, time.monotonic()
        if was_failing is not None:
            down = (datetime.now(UTC) - was_failing).total_seconds()
            logger.info("webhook delivers again", extra=hook.log(room, failed_for=round(down)))

    async def _failed(self, hook: _Hook, room: str, cursor: int, answer: Answer) -> None:
        """Record the failure, pause the webhook if it has failed too long, and raise."""
        since, enabled = await database_sync_to_async(webhooks.webhook_delivery_failed)(
            pk=hook.pk, error=answer.detail)
        log = hook.log(room, cursor=cursor, status=answer.status, result=answer.result,
                       error=answer.detail)
        if hook.failing_since is None:
            logger.warning("webhook delivery failed: %s", answer.detail, extra=log)
        else:
            logger.info("webhook delivery failed again: %s", answer.detail, extra=log)
        hook.failing_since = since
        if not enabled:
            self._forget_failing(hook.pk)
            raise TargetGone(str(hook.pk))  # paused or disabled meanwhile
        started = self._failing.setdefault((hook.pk, room), time.monotonic())
        failing_for = max((datetime.now(UTC) - since).total_seconds() if since else 0.0,
                          time.monotonic() - started)
        pause_after = settings.WEBHOOK["PAUSE_AFTER"]
        if failing_for > pause_after or answer.status == GONE:
            await self._pause(hook, room, failing_for, answer)
        raise WebhookFailed(f"webhook {hook.pk} ({hook.name}): {answer.detail}")

    async def _pause(self, hook: _Hook, room: str, failing_for: float,
                     answer: Answer) -> NoReturn:
        paused = await database_sync_to_async(webhooks.webhook_pause)(pk=hook.pk)
        self._hooks.pop(str(hook.pk), None)
        self._forget_failing(hook.pk)
        if paused:
            why = ("the receiver answered 410 Gone" if answer.status == GONE else
                   f"failing for {failing_for:.0f}s, over GATEWAY_WEBHOOK_PAUSE_AFTER")
            logger.warning("webhook paused: %s; enable it again to resume where it stopped",
                           why, extra=hook.log(room, failing_for=round(failing_for)))
        raise TargetGone(str(hook.pk))

    def _forget_failing(self, pk: int) -> None:
        """The webhook stops (paused, disabled): enabled again, its rooms start afresh."""
        for key in [key for key in self._failing if key[0] == pk]:
            del self._failing[key]

    # --- the webhooks' rows -----------------------------------------------------------------

    async def _hook(self, target: str) -> _Hook | None:
        """The webhook ``target`` as read at most ``CACHE_SECONDS`` ago (read now if it is
        not known yet: it may have just been made); None if it is not enabled."""
        if time.monotonic() - self._read_at > CACHE_SECONDS or target not in self._hooks:
            await self._read()
        return self._hooks.get(target)

    async def _read(self) -> None:
        asked = time.monotonic()
        async with self._reading:
            if self._read_at >= asked:
                return  # read by another worker, begun after this one asked
            read_at = time.monotonic()
            rows = await database_sync_to_async(webhooks.webhooks_deliverable)()
            hooks: dict[str, _Hook] = {}
            for row in rows:
                known = self._hooks.get(str(row["pk"]))
                hooks[str(row["pk"])] = _Hook(
                    pk=row["pk"], name=row["name"], url=row["url"], secret=row["secret"],
                    events=frozenset(row["events"] or ()), uid=row["uid"],
                    failing_since=row["failing_since"],
                    success_written=known.success_written if known else float("-inf"))
            self._hooks, self._read_at = hooks, read_at
