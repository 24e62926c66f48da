"""The bot's neutral markup (bots/markup.py) as Telegram messages: HTML (``<b>``,
``<code>``), escaped, packed into as few messages as fit within ``LIMIT``.

Telegram counts a message's length after its markup is parsed, in UTF-16 code units (1 to
4096), so lengths here are measured that way, on the visible text. A line too long for one
message is split at a space (or line break) in the second half of what fits, else hard, and
never inside an escaped entity (text is split before it is escaped).

A caption (of a photo, a document, an album) holds at most ``CAPTION_LIMIT`` (1024): a longer
text is the caption's first part, the rest following as text messages (``caption_split``).
"""

from __future__ import annotations

import html

from bots.markup import BOLD, CODE, Line, Reply, Span

LIMIT = 4096
CAPTION_LIMIT = 1024
TAGS = {BOLD: "b", CODE: "code"}


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def visible_length(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def messages(reply: Reply, *, limit: int = LIMIT) -> list[str]:
    """The reply as HTML messages, each at most ``limit`` visible characters."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for whole in reply.lines:
        for piece in _split(whole, limit):
            length = sum(visible_length(span.text) for span in piece)
            if current and size + 1 + length > limit:
                out.append("\n".join(current))
                current, size = [], 0
            elif current:
                size += 1  # the line break
            current.append(_html(piece))
            size += length
    if current:
        out.append("\n".join(current))
    return out


def caption_split(reply: Reply, *, caption_limit: int = CAPTION_LIMIT,
                  limit: int = LIMIT) -> tuple[str, list[str]]:
    """The reply as a caption of at most ``caption_limit`` (whole lines while they fit, else
    the first line's head), and what does not fit as messages of at most ``limit``."""
    lines = list(reply.lines)
    taken: list[Line] = []
    size = 0
    while lines:
        length = sum(visible_length(span.text) for span in lines[0])
        if size + (1 if taken else 0) + length <= caption_limit:
            size += (1 if taken else 0) + length
            taken.append(lines.pop(0))
            continue
        if not taken:  # a first line too long for a caption: its head is the caption
            head, *tail = _split(lines[0], caption_limit)
            taken.append(head)
            lines[0] = tuple(span for piece in tail for span in piece)
        break
    caption = "\n".join(_html(line) for line in taken)
    return caption, messages(Reply(tuple(lines)), limit=limit) if lines else []


def _html(line: Line) -> str:
    parts = []
    for span in line:
        tag = TAGS.get(span.style)
        text = escape(span.text)
        parts.append(f"<{tag}>{text}</{tag}>" if tag else text)
    return "".join(parts)


def _split(line: Line, limit: int) -> list[Line]:
    """The line in pieces of at most ``limit`` visible characters."""
    pieces: list[Line] = []
    current: list[Span] = []
    room = limit
    for span in line:
        text = span.text
        while visible_length(text) > room:
            cut = _cut(text, room)
            if cut:
                current.append(Span(text[:cut], span.style))
            pieces.append(tuple(current))
            current, room, text = [], limit, text[cut:]
        if text:
            current.append(Span(text, span.style))
            room -= visible_length(text)
    pieces.append(tuple(current))
    return pieces


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
