"""How the bot writes: Telegram-style HTML (b, i, code), escaped, in messages of at most
``LIMIT`` characters.

Chat platforms count a message's length after markup is parsed, in UTF-16 code units
(Telegram: 1-4096), so lengths here are measured that way, on the visible text.
"""

from __future__ import annotations

import html
import time

from gateway import events

LIMIT = 4096

# How a sender's protocol is shown: "alice (web): hi".
PROTOCOL_LABELS = {"web": "web", "mqtt": "mqtt", "telegram": "telegram", "system": "system"}


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def visible_length(text: str) -> int:
    """Length as chat platforms count it: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _cut(text: str, limit: int) -> int:
    """The longest prefix of ``text`` within ``limit``, ending at a line break or space when
    one is in its second half."""
    size = 0
    cut = len(text)
    for index, char in enumerate(text):
        size += 2 if ord(char) > 0xFFFF else 1
        if size > limit:
            cut = index
            break
    if cut == len(text):
        return cut
    space = max(text.rfind("\n", 0, cut), text.rfind(" ", 0, cut))
    return space + 1 if space >= cut // 2 else cut


def split_text(text: str, *, first: int = LIMIT, rest: int = LIMIT) -> list[str]:
    """Split plain text into pieces of at most ``first`` (then ``rest``) visible characters;
    joined again they are the text."""
    pieces = []
    limit = first
    while visible_length(text) > limit:
        cut = _cut(text, limit)
        pieces.append(text[:cut])
        text, limit = text[cut:], rest
    pieces.append(text)
    return pieces


def sender_label(sender: events.Sender) -> tuple[str, int]:
    """``<b>name</b> (protocol): `` and its visible length."""
    name = sender["name"] or sender["id"]
    label = PROTOCOL_LABELS.get(sender["protocol"], sender["protocol"])
    plain = f"{name} ({label}): "
    return f"<b>{escape(name)}</b> ({escape(label)}): ", visible_length(plain)


def room_message(event: events.RoomMessage, *, limit: int = LIMIT) -> list[str]:
    """A room message as one or more chat messages, who said it and from where first."""
    prefix, prefix_length = sender_label(event["sender"])
    pieces = split_text(event["text"], first=limit - prefix_length, rest=limit)
    return [prefix + escape(pieces[0]), *(escape(piece) for piece in pieces[1:])]


def lines(items: list[str], *, limit: int = LIMIT) -> list[str]:
    """Join HTML lines (each well within ``limit``) into as few messages as fit. A line's
    markup is counted too: an upper bound of its visible length."""
    messages: list[str] = []
    current: list[str] = []
    size = 0
    for item in items:
        length = visible_length(item)
        if current and size + 1 + length > limit:
            messages.append("\n".join(current))
            current, size = [], 0
        current.append(item)
        size += length + (1 if size else 0)
    if current:
        messages.append("\n".join(current))
    return messages


def history_line(event: events.RoomMessage, *, width: int = 300) -> str:
    """One stored message on a line: ``#12 14:03 alice (web): text`` (long texts shortened)."""
    prefix, _ = sender_label(event["sender"])
    text = " ".join(event["text"].split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    stamp = time.strftime("%H:%M", time.gmtime(event["ts"]))
    return f"<code>#{event['id']}</code> {stamp} {prefix}{escape(text)}"
