"""Names: the room-name rule of every protocol, the group name built from it, and how
display names are cleaned."""

from __future__ import annotations

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
