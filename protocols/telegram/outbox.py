"""The paced outbox: what the Telegram server sends next to each chat, and when.

Pure bookkeeping (no I/O, no tasks; time from an injectable clock), so it is unit-tested
with a fake clock. The server drains each chat in a task of its own and asks this class
for the chat's next message and its turn to send; it does the sending, the retries and
the records of delivery.

- One ordered queue per chat. A long message comes as several pieces; only the last one
  counts as a room message waiting.
- Pacing, as leaky buckets (the same arithmetic as aiolimiter's ``AsyncLimiter``, kept as
  the time each bucket is next empty): a chat's own limit (``chat_per_second``; groups
  ``group_per_minute``), then the bot's overall limit (``overall_per_second``), taken in
  the order chats ask for it. A chat's pace is forgotten with its queue, as the server's
  per-chat limiter was.
- A chat with more than ``backlog`` room messages waiting skips the oldest of them (never
  the one being sent); the next thing it is sent is a notice of how many it missed.
- A room message staff deleted is taken out of every queue; a chat Telegram says is gone
  is forgotten.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SKIPPED = ("… {count} earlier messages were skipped here (this chat fell behind); "
           "/history shows them.")

Message = tuple[str | None, int | None]  # (room, seq) of a room message


@dataclass(frozen=True)
class SendLimits:
    """Telegram's flood limits: about one message a second per chat, 20 a minute per group,
    30 a second in all (https://core.telegram.org/bots/faq#my-bot-is-hitting-limits-how-do-i-avoid-this)."""

    chat_per_second: float = 1.0
    group_per_minute: float = 20.0
    overall_per_second: float = 30.0
    backlog: int = 100  # room messages waiting per chat before the oldest are skipped


@dataclass
class Outgoing:
    """One message (or piece of one) for a chat."""

    text: str
    room: str | None = None  # for room messages: which one this is, so it can be recorded
    seq: int | None = None
    last: bool = True  # the last piece of its message (long messages are split)

    @property
    def message(self) -> Message:
        return self.room, self.seq


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
    waiting: int = 0  # room messages among the items
    skipped: int = 0  # room messages skipped since the chat was last told
    sending: Message | None = None  # the room message being sent


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

    def queue(self, chat_id: str, item: Outgoing) -> bool:
        """Queue a message for the chat; True if that overflowed the chat's backlog (then
        the oldest room message waiting is skipped)."""
        chat = self.chats.get(chat_id)
        if chat is None:
            group = chat_id.startswith("-")  # Telegram's group and channel ids are negative
            pace = (Pace(self.limits.group_per_minute, 60.0) if group
                    else Pace(self.limits.chat_per_second, 1.0))
            chat = self.chats[chat_id] = _Chat(pace)
        chat.items.append(item)
        if item.room is None or not item.last:
            return False
        chat.waiting += 1
        if chat.waiting <= self.limits.backlog:
            return False
        self._skip_oldest(chat)
        return True

    @staticmethod
    def _skip_oldest(chat: _Chat) -> None:
        """Drop the oldest waiting room message, all its pieces (not the one being sent)."""
        oldest = next((i.message for i in chat.items
                       if i.room is not None and i.message != chat.sending), None)
        if oldest is None:
            return
        for item in [i for i in chat.items if i.message == oldest]:
            chat.items.remove(item)
        chat.waiting -= 1
        chat.skipped += 1

    def drop(self, message: Message) -> None:
        """Take a room message out of every chat's queue (staff deleted it)."""
        for chat in self.chats.values():
            pieces = [i for i in chat.items if i.message == message]
            for item in pieces:
                chat.items.remove(item)
            chat.waiting -= sum(1 for i in pieces if i.last)

    def drop_rooms(self, room: str | None = None) -> None:
        """Take every room message (of ``room``, or of every room) out of every queue: another
        process relays them now, or the room's relay starts again from the chats' records."""
        for chat in self.chats.values():
            dropped = [i for i in chat.items
                       if i.room is not None and (room is None or i.room == room)]
            for item in dropped:
                chat.items.remove(item)
            if room is None:
                chat.waiting = chat.skipped = 0
            else:
                chat.waiting -= sum(1 for i in dropped if i.last)

    def forget(self, chat_id: str) -> None:
        """The chat is gone (it blocked the bot, or does not exist): nothing more for it."""
        self.chats.pop(chat_id, None)

    def release(self, chat_id: str) -> None:
        """The chat's queue is no longer drained: forget the chat if nothing waits."""
        chat = self.chats.get(chat_id)
        if chat is not None and not chat.items:
            del self.chats[chat_id]

    # --- sending -------------------------------------------------------------------------

    def next(self, chat_id: str) -> Outgoing | None:
        """What to send the chat now: the notice of messages skipped, if any, else its
        oldest message; None if nothing waits."""
        chat = self.chats.get(chat_id)
        if chat is None or not chat.items:
            return None
        if chat.skipped:
            count, chat.skipped = chat.skipped, 0
            return Outgoing(SKIPPED.format(count=count))
        item = chat.items.popleft()
        if item.room is not None:
            chat.sending = item.message
            chat.waiting -= 1 if item.last else 0
        return item

    def done(self, chat_id: str) -> None:
        """The message from ``next`` was sent, or given up."""
        chat = self.chats.get(chat_id)
        if chat is not None:
            chat.sending = None

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
