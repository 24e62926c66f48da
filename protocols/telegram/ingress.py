"""How updates reach the Telegram server: long polling (``getUpdates``) or the webhook.

The counterpart of python-telegram-bot's ``Updater``, which we do not use because it confirms
updates as soon as they are fetched: here an update is confirmed to Telegram (by the next
``getUpdates`` offset, or the webhook's answer) only once the server's ``dispatch`` reports
it handled. With ``TELEGRAM_WEBHOOK_URL``, Telegram posts updates to the web server's webhook
route (protocols/telegram/webhook.py, which checks the secret and hands them here through
protocols/telegram/handoff.py); otherwise the process holding the lease polls.

An update whose ``update_id`` the handled-updates record cannot hold is refused (webhook) or
skipped and confirmed (polling), with a log line: never retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from telegram import Bot, Update
from telegram.error import RetryAfter, TelegramError

from gateway.lease import jitter
from protocols.telegram.handoff import Rejected, Unavailable

logger = logging.getLogger(__name__)

# What the bot asks Telegram for (getUpdates and setWebhook): messages, their edits, and
# reactions, which Telegram leaves out unless asked for (and sends only where the bot is an
# admin). Updates of other kinds are not kept for the bot.
ALLOWED_UPDATES = ["message", "edited_message", "message_reaction"]
HANDLE_TIMEOUT = 30.0  # an update not handled by then is fetched (or delivered) again
MAX_ATTEMPTS = 5  # an update that fails this often is given up (logged), not retried forever
UPDATE_ID_MAX = 2**63 - 1  # what the record of handled updates holds (a BigIntegerField)
LOG = {"protocol": "telegram"}

# Feeds an update to its chat; the future's result is True once it is handled, False if
# that failed (None: not an update the server takes).
Dispatch = Callable[[Update], Awaitable["asyncio.Future | None"]]


class Ingress:
    """The webhook's handler, and the poller while this process leads."""

    def __init__(
        self,
        bot: Bot,
        dispatch: Dispatch,
        *,
        ready: asyncio.Event,
        stats: Counter[str],
        webhook_url: str = "",
        webhook_secret: str = "",
        poll_timeout: int = 30,
    ) -> None:
        self.bot = bot
        self.dispatch = dispatch
        self.ready = ready  # the bot has reached Telegram
        self.stats = stats  # the server's: updates_refused is counted here
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.poll_timeout = poll_timeout
        self.webhook_set = False
        self.attempts: Counter[int] = Counter()  # update_id -> times it failed
        self._poller: asyncio.Task | None = None

    @property
    def mode(self) -> str:
        return "webhook" if self.webhook_url else "polling"

    @property
    def polling(self) -> bool:
        return self._poller is not None

    # --- leading: the poller -----------------------------------------------------------

    def lead(self) -> None:
        """This process leads: poll, unless updates come by the webhook (to every process)."""
        if not self.webhook_url:
            self._poller = asyncio.create_task(self._poll(), name="telegram-poll")

    def cancel(self) -> None:
        """Stop polling now (without waiting for it)."""
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None

    async def step_down(self) -> None:
        """Stop polling, and wait until the poller has."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    async def _poll(self) -> None:
        """Long-poll getUpdates, confirming a batch (by the next offset) only once every
        update in it is handled; otherwise it is fetched again (the claim in the application
        makes the handled ones no-ops). Never stops while this process leads."""
        offset: int | None = None
        backoff = 1.0
        webhook_deleted = False
        while True:
            try:
                if not webhook_deleted:  # getUpdates is refused while a webhook is set
                    await self.bot.delete_webhook()
                    webhook_deleted = True
                updates = await self.bot.get_updates(
                    offset=offset, timeout=self.poll_timeout, allowed_updates=ALLOWED_UPDATES
                )
                backoff = 1.0
            except RetryAfter as exc:
                await asyncio.sleep(seconds(exc.retry_after))
                continue
            except Exception as exc:  # noqa: BLE001 - network, Telegram, or a bug: go on
                delay = jitter(backoff)
                logger.warning("polling Telegram failed (%s); retrying in %.1fs", exc, delay,
                               extra=LOG, exc_info=not isinstance(exc, TelegramError))
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)
                continue
            if not updates:
                continue
            if await self._handle_batch(updates):
                # Confirms them to Telegram, the skipped ones too.
                offset = max(u.update_id for u in updates) + 1
            else:
                await asyncio.sleep(jitter(1.0))

    async def _handle_batch(self, updates: tuple[Update, ...]) -> bool:
        """Handle fetched updates; True once they may be confirmed."""
        handled = {}
        for update in updates:
            if not update_id_storable(update.update_id):
                self.stats["updates_refused"] += 1
                logger.warning("skipped an update: %s", update_id_problem(update.update_id),
                               extra={**LOG, "update_id": _shown(update.update_id)})
            elif (future := await self.dispatch(update)) is not None:
                handled[update.update_id] = future
        if handled:
            await asyncio.wait(handled.values(), timeout=HANDLE_TIMEOUT)
        failed = [i for i, f in handled.items() if not (f.done() and f.result())]
        for update_id in handled.keys() - set(failed):
            self.attempts.pop(update_id, None)
        for update_id in failed:
            self.attempts[update_id] += 1
        if failed and min(self.attempts[i] for i in failed) < MAX_ATTEMPTS:
            logger.warning("%d updates not handled; fetching them again", len(failed),
                           extra=LOG)
            return False
        for update_id in failed:
            logger.error("gave up on update %d after %d attempts", update_id,
                         self.attempts.pop(update_id), extra=LOG)
        return True

    # --- the webhook -------------------------------------------------------------------

    async def set_webhook(self) -> None:
        """Register the webhook with Telegram (the lease holder does); retried until set."""
        try:
            await self.bot.set_webhook(
                self.webhook_url, secret_token=self.webhook_secret,
                allowed_updates=ALLOWED_UPDATES,
            )
        except TelegramError as exc:
            logger.warning("could not set the webhook (%s); will retry", exc, extra=LOG)
            return
        self.webhook_set = True
        logger.info("webhook set", extra={**LOG, "url": self.webhook_url})

    async def webhook_update(self, data: dict) -> None:
        """An update posted to the webhook: returns once handled."""
        if not self.ready.is_set():
            raise Unavailable("the bot has not reached Telegram yet")
        try:
            update = Update.de_json(data, self.bot)
        except Exception as exc:  # noqa: BLE001 - whatever PTB makes of a malformed body
            raise Rejected(f"not a Telegram update: {exc}") from None
        if not update_id_storable(update.update_id):
            # 400, not 503: the same update would fail the same way every time it came.
            self.stats["updates_refused"] += 1
            raise Rejected(update_id_problem(update.update_id))
        handled = await self.dispatch(update)
        if handled is not None and not await asyncio.wait_for(
            asyncio.shield(handled), HANDLE_TIMEOUT
        ):
            raise Unavailable("the update could not be handled; deliver it again")


def update_id_storable(update_id: int) -> bool:
    """Telegram's update ids are positive and far below 2^63; only those can be recorded
    (and confirmed by a getUpdates offset)."""
    return 0 <= update_id <= UPDATE_ID_MAX


def update_id_problem(update_id: int) -> str:
    return f"update_id {_shown(update_id)} is out of range (0 to 2^63-1)"


def _shown(number: int) -> str:
    """A number for a log line: in full unless it is absurdly long."""
    return str(number) if number.bit_length() <= 128 else f"of {number.bit_length()} bits"


def seconds(period) -> float:
    """A PTB time period in seconds (a timedelta, or an int without PTB_TIMEDELTA)."""
    return period.total_seconds() if hasattr(period, "total_seconds") else float(period)
