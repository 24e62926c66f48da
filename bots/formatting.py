"""How the bot shows room messages and history, in the neutral markup of bots/markup.py:
``alice (web): hi`` with the name in bold, ``#12 14:03 alice (web): hi`` for history, each
message in its current state there: ``#13 14:05 bob (web): ↩ #12 yes (edited)`` for a reply
whose text was edited. (A platform marks edits and replies of the messages it is sent its
own way: Telegram edits the message, and sends a reply as one.) Devices of a room:
``thermo1 — offline since 14:03`` and their last state as ``temperature: 20.5, target: 21``."""

from __future__ import annotations

import json
import time
from typing import Any

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
    """A room message, who said it and from where first (a platform splits a long one).
    Files without text are captioned by who sent them alone (``doorcam (mqtt)``)."""
    label = sender_label(event["sender"], shown)
    if not event["text"] and event["attachments"]:
        *head, tail = label
        return Reply((line(*head, Span(tail.text.removesuffix(": "))),))
    return Reply((line(*label, event["text"]),))


def messages_skipped(count: int) -> Reply:
    """Told to a chat that fell so far behind its room that older messages were skipped."""
    return Reply((line(f"… {count} earlier messages were skipped here (this chat fell "
                       "behind); /history shows them."),))


FILE_MARK = "📎 "


def file_size(size: int) -> str:
    """``812 B``, ``14.2 KB``, ``3.1 MB`` (multiples of 1024)."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def file_link(name: str, size: int, url: str | None) -> Line:
    """A file a platform does not carry (too large to send there): its name, size and the
    gateway's link to it, or (the gateway has no public address) only that it did not come."""
    shown = f"{FILE_MARK}{name} ({file_size(size)}) is too large to send here"
    return line(f"{shown}: {url}") if url else line(f"{shown}.")


def file_not_bridged(name: str, size: int | None) -> str:
    """What a room is told of a file a chat sent that was too large to take."""
    sized = f" ({file_size(size)})" if size is not None else ""
    return f"{FILE_MARK}{name}{sized} was too large to bridge."


EDITED = " (edited)"


def history_line(event: events.RoomMessage, *, width: int = 300) -> Line:
    """One stored message on a line, as it is now: ``#12 14:03 alice (web): text``, with
    ``↩ #7`` before the text of a reply, ``📎 photo.jpg`` after the text of one with files,
    and `` (edited)`` after an edited one (long texts shortened)."""
    text = " ".join(event["text"].split())
    if event["attachments"]:
        names = ", ".join(item["name"] for item in event["attachments"])
        text = f"{text} {FILE_MARK}{names}" if text else f"{FILE_MARK}{names}"
    if len(text) > width:
        text = text[: width - 1] + "…"
    stamp = time.strftime("%H:%M", time.gmtime(event["ts"]))
    answered = event["reply_to"]
    reply_mark = ("↩ ", code(f"#{answered['id']}"), " ") if answered is not None else ()
    edited = EDITED if event["edited_at"] is not None else ""
    return line(code(f"#{event['id']}"), f" {stamp} ", *sender_label(event["sender"]),
                *reply_mark, text + edited)


# --- devices -------------------------------------------------------------------------------

STATE_WIDTH = 200  # characters of a device's state shown on its line


def clock(at: float, *, now: float | None = None) -> str:
    """``14:03`` (UTC, as history shows times), ``2024-05-01 14:03`` when not today."""
    day = "%Y-%m-%d"
    today = time.strftime(day, time.gmtime(time.time() if now is None else now))
    shown = time.gmtime(at)
    stamp = time.strftime("%H:%M", shown)
    return stamp if time.strftime(day, shown) == today else f"{time.strftime(day, shown)} {stamp}"


def device_status(device: events.DeviceState, *, now: float | None = None) -> str:
    """``offline since 14:03``, or ``no status`` for a device that never said."""
    status = device["status"]
    if not status:
        return "no status"
    at = device["status_at"]
    return status if at is None else f"{status} since {clock(at, now=now)}"


def device_line(device: events.DeviceState, *, now: float | None = None) -> Line:
    """``• thermo1 — offline since 14:03`` with the id in bold."""
    return line("• ", bold(device["id"]), f" — {device_status(device, now=now)}")


def device_state(state: Any, *, width: int = STATE_WIDTH) -> str:
    """A device's last state on one line: a JSON object as ``key: value`` pairs, text as
    it is (runs of spaces and line breaks as one space), cut to ``width``."""
    if isinstance(state, dict):
        text = ", ".join(f"{key}: {_state_value(value)}" for key, value in state.items())
    else:
        text = _state_value(state)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _state_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
