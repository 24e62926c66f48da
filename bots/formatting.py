"""How the bot shows room messages and history, in the neutral markup of bots/markup.py:
``alice (web): hi`` with the name in bold, ``#12 14:03 alice (web): hi`` for history, each
message in its current state there: ``#13 14:05 bob (web): ↩ #12 yes (edited)`` for a reply
whose text was edited. (A platform marks edits and replies of the messages it is sent its
own way: Telegram edits the message, and sends a reply as one.)"""

from __future__ import annotations

import time

from bots.markup import Line, Reply, Span, bold, code, line
from gateway import events

# How a sender's protocol is shown: "alice (web): hi".
PROTOCOL_LABELS = {"web": "web", "mqtt": "mqtt", "telegram": "telegram", "system": "system"}


def protocol_label(protocol: str) -> str:
    return PROTOCOL_LABELS.get(protocol, protocol)


def sender_label(sender: events.Sender, shown: str | None = None) -> tuple[Span, ...]:
    """``name (protocol): `` with the name in bold; ``shown: `` instead when the room's
    name format says how this sender is shown here (gateway/policy.py)."""
    if shown is not None:
        return (bold(shown), Span(": "))
    name = sender["name"] or sender["id"]
    return (bold(name), Span(f" ({protocol_label(sender['protocol'])}): "))


def room_message(event: events.RoomMessage, *, shown: str | None = None) -> Reply:
    """A room message, who said it and from where first (a platform splits a long one)."""
    return Reply((line(*sender_label(event["sender"], shown), event["text"]),))


def messages_skipped(count: int) -> Reply:
    """Told to a chat that fell so far behind its room that older messages were skipped."""
    return Reply((line(f"… {count} earlier messages were skipped here (this chat fell "
                       "behind); /history shows them."),))


EDITED = " (edited)"


def history_line(event: events.RoomMessage, *, width: int = 300) -> Line:
    """One stored message on a line, as it is now: ``#12 14:03 alice (web): text``, with
    ``↩ #7`` before the text of a reply and `` (edited)`` after an edited one (long texts
    shortened)."""
    text = " ".join(event["text"].split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    stamp = time.strftime("%H:%M", time.gmtime(event["ts"]))
    answered = event["reply_to"]
    reply_mark = ("↩ ", code(f"#{answered['id']}"), " ") if answered is not None else ()
    edited = EDITED if event["edited_at"] is not None else ""
    return line(code(f"#{event['id']}"), f" {stamp} ", *sender_label(event["sender"]),
                *reply_mark, text + edited)
