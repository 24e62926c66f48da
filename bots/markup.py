"""What the bot says, in a form no chat platform owns: lines of text spans, some bold or
code. Each platform renders it its own way (protocols/telegram/render.py: Telegram's HTML,
packed into messages within its length limit), so the conversation never escapes or
measures anything itself.

    reply(line("You joined ", bold(room), "."), "Second line")
"""

from __future__ import annotations

from dataclasses import dataclass

PLAIN, BOLD, CODE = "", "bold", "code"


@dataclass(frozen=True, slots=True)
class Span:
    text: str
    style: str = PLAIN  # PLAIN, BOLD or CODE


Line = tuple[Span, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: lines a platform packs into as few messages as its limit allows (a line
    too long for one message is split, at a space where it can)."""

    lines: tuple[Line, ...]

    def plain(self) -> str:
        """The visible text, lines joined by newlines."""
        return "\n".join("".join(span.text for span in line) for line in self.lines)


def bold(text: str) -> Span:
    return Span(text, BOLD)


def code(text: str) -> Span:
    return Span(text, CODE)


def line(*parts: str | Span) -> Line:
    """A line of spans; plain strings are plain spans."""
    return tuple(part if isinstance(part, Span) else Span(part) for part in parts if part)


def reply(*lines: str | Line) -> Reply:
    """A reply of lines; a plain string may hold several lines (split at newlines)."""
    out: list[Line] = []
    for item in lines:
        if isinstance(item, str):
            out.extend(line(text) for text in item.split("\n"))
        else:
            out.append(item)
    return Reply(tuple(out))
