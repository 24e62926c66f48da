"""The paced outbox: what the Telegram server sends next to each chat, and when.

Pure bookkeeping (no I/O, no tasks; time from an injectable clock), so it is unit-tested
with a fake clock. The server drains each chat in a task of its own and asks this class
for the chat's next call and its turn to make it; it does the calling and the retries.

- One ordered queue per chat: the bot's replies, and what the relay hands over one entry
  at a time: the pieces of room messages, and the edits, deletes and reactions of the
  bot's copies (so a queue stays short: the room's backlog waits in the log, and the
  relay's skip policy bounds it). Every call counts against the same pace, in room order.
- Pacing, as leaky buckets (the same arithmetic as aiolimiter's ``AsyncLimiter``, kept as
  the time each bucket is next empty): a chat's own limit (``chat_per_second``; groups
  ``group_per_minute``), then the bot's overall limit (``overall_per_second``), taken in
  the order chats ask for it. A chat's pace is forgotten with its queue, as the server's
  per-chat limiter was.
- A chat Telegram says is gone is forgotten, with what it had waiting (the server tells
  whoever waits for those).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SendLimits:
    """Telegram's flood limits: about one message a second per chat, 20 a minute per group,
    30 a second in all (https://core.telegram.org/bots/faq#my-bot-is-hitting-limits-how-do-i-avoid-this)."""

    chat_per_second: float = 1.0
    group_per_minute: float = 20.0
    overall_per_second: float = 30.0


@dataclass
class Outgoing:
    """One Bot API call for a chat: a message (or piece of one), or a change to one."""

    call: Any  # what to call (the server's protocols/telegram/calls.py), carried along
    waiter: Any = None  # whoever waits for the outcome (the server's), carried along


class Pace:
    """A leaky bucket of ``rate`` messages a ``period``, holding up to ``rate`` (at least
    one): a burst of that many, then one every ``period / rate`` seconds."""

    def __init__(self, rate: float, period: float) -> None:
        self.interval = period / rate
        # How far ahead of the bucket's emptying a message may still go (the burst).
        self.tolerance = (max(rate, 1.0) - 1.0) * self.interval
        self.empty_at = float("-inf")  # when the bucket will have leaked everything

    def wait(self, now: float) -> float:
        """Seconds until a message may go (0.0: now)."""
        return max(0.0, self.empty_at - self.tolerance - now)

    def take(self, now: float) -> float:
        """Take the next turn at or after ``now``; the seconds until it comes."""
        at = now + self.wait(now)
        self.empty_at = max(self.empty_at, at) + self.interval
        return at - now


@dataclass
class _Chat:
    pace: Pace
    items: deque[Outgoing] = field(default_factory=deque)


class Outbox:
    """Every chat's messages waiting to be sent, and the pace they may go at."""

    def __init__(self, limits: SendLimits, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.overall = Pace(limits.overall_per_second, 1.0)
        self.chats: dict[str, _Chat] = {}

    def __contains__(self, chat_id: str) -> bool:
        return chat_id in self.chats

    def __len__(self) -> int:
        return len(self.chats)

    def waiting(self, chat_id: str) -> list[Outgoing]:
        """What the chat has queued, in order (a copy)."""
        chat = self.chats.get(chat_id)
        return list(chat.items) if chat is not None else []

    # --- queueing ------------------------------------------------------------------------

    def queue(self, chat_id: str, item: Outgoing) -> None:
        """Queue a message for the chat, after what it has waiting."""
        chat = self.chats.get(chat_id)
        if chat is None:
            group = chat_id.startswith("-")  # Telegram's group and channel ids are negative
            pace = (Pace(self.limits.group_per_minute, 60.0) if group
                    else Pace(self.limits.chat_per_second, 1.0))
            chat = self.chats[chat_id] = _Chat(pace)
        chat.items.append(item)

    def forget(self, chat_id: str) -> list[Outgoing]:
        """The chat is gone (it blocked the bot, or does not exist): nothing more for it.
        Returns what it had waiting."""
        chat = self.chats.pop(chat_id, None)
        return list(chat.items) if chat is not None else []

    def release(self, chat_id: str) -> None:
        """The chat's queue is no longer drained: forget the chat if nothing waits."""
        chat = self.chats.get(chat_id)
        if chat is not None and not chat.items:
            del self.chats[chat_id]

    # --- sending -------------------------------------------------------------------------

    def next(self, chat_id: str) -> Outgoing | None:
        """What to send the chat now, its oldest message; None if nothing waits."""
        chat = self.chats.get(chat_id)
        if chat is None or not chat.items:
            return None
        return chat.items.popleft()

    def due(self, chat_id: str) -> float:
        """Seconds until the chat's own limit lets its next message go (0.0: now)."""
        chat = self.chats.get(chat_id)
        return chat.pace.wait(self.clock()) if chat is not None else 0.0

    def turn(self, chat_id: str) -> float:
        """Take the chat's next turn, then the bot's next overall turn after it; the seconds
        until the message may go. Asked once ``due`` has passed, so that a chat waiting for
        its own turn does not hold an overall one other chats could use meanwhile."""
        now = self.clock()
        chat = self.chats.get(chat_id)
        wait = chat.pace.take(now) if chat is not None else 0.0
        return wait + self.overall.take(now + wait)
