"""Names: the room-name rule of every protocol, the group name built from it, and how
display names are cleaned."""

from __future__ import annotations

import fnmatch
import re

from gateway.errors import InvalidRoomName

__all__ = ["InvalidRoomName"]  # raised here; it lives with the other errors

# Channels accepts group names matching ^[a-zA-Z\d\-_.]+$ below 100 characters
# (channels/layers.py); a room name is a stricter subset so "room." + name always fits.
ROOM_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
ROOM_NAME_RULE = "1 to 64 characters: ASCII letters, digits, '-', '_' or '.'"
GROUP_PREFIX = "room."


def room_name_is_valid(name: object) -> bool:
    return isinstance(name, str) and ROOM_NAME_RE.fullmatch(name) is not None


def room_name_validate(name: object) -> str:
    """Return the name unchanged, or raise InvalidRoomName with a message for the client."""
    if not room_name_is_valid(name):
        shown = repr(name)[:80]
        raise InvalidRoomName(f"invalid room name {shown}: {ROOM_NAME_RULE}")
    assert isinstance(name, str)
    return name


def room_group_name(room: str) -> str:
    """The channel-layer group that carries a room's events."""
    return GROUP_PREFIX + room_name_validate(room)


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


def display_name_clean(raw: str) -> str:
    """A display name as shown to others: no control characters or lone surrogates, at most
    64 characters."""
    raw = raw.encode("utf-8", "replace").decode("utf-8")
    return " ".join(_CONTROL_RE.sub(" ", raw).split())[:64]


# Room patterns (API keys, connect tokens, webhooks): a room name, or one with ``*`` (any
# run of characters) and ``?`` (one character).
ROOM_PATTERN_RE = re.compile(r"[A-Za-z0-9_.\-*?]{1,64}")
ROOM_PATTERN_RULE = "a room name, or one with * (any characters) and ? (one character)"


def room_patterns_validate(patterns: object, *, field: str = "rooms") -> list[str]:
    """A list of room patterns as a client gives it (a list of strings, or one string of
    comma-separated patterns); InvalidRoomName (code ``invalid_room``) naming the bad one."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    if not isinstance(patterns, list) or len(patterns) > 100:
        raise InvalidRoomName(f"'{field}' must be a list of at most 100 room patterns")
    for pattern in patterns:
        if not isinstance(pattern, str) or not ROOM_PATTERN_RE.fullmatch(pattern):
            raise InvalidRoomName(f"'{field}': {repr(pattern)[:80]} is not {ROOM_PATTERN_RULE}")
    return list(dict.fromkeys(patterns))


def room_matches(patterns: list[str] | tuple[str, ...], room: str) -> bool:
    """Whether ``room`` matches one of ``patterns`` (case-sensitive, as room names are)."""
    return any(fnmatch.fnmatchcase(room, pattern) for pattern in patterns)


def room_patterns_regex(patterns: list[str] | tuple[str, ...]) -> str:
    """One regular expression (Python's and PostgreSQL's alike) matching the room names that
    match ``patterns``: for a database to filter rooms by them."""
    alternatives = ("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                            for c in pattern) for pattern in patterns)
    return "^(" + "|".join(alternatives) + ")$"
