"""Reactions as Telegram can carry them, both ways.

Telegram takes reactions only from a fixed list of emoji (the Bot API's ``ReactionTypeEmoji``,
73 of them), some written without the variation selector other platforms send ("❤" where the
web page sends "❤️"); and a bot may set at most one reaction on a message, with no count.

- In: a user's reaction in a chat becomes the room reaction of its emoji, the text-style ones
  written as the web writes them (so a heart from Telegram and one from the page count
  together). Custom emoji and paid reactions are not carried.
- Out: on each chat's copy of a room message the bot shows one reaction, the message's
  most-used emoji among those Telegram takes (ties broken by a fixed order, the emoji's code
  points), or none. It is set again when a reaction may have changed which that is (one taken
  back, or one added that is now the most used), and not for the chat's own reactions, which
  Telegram shows as they are. So a chat sees which emoji the room likes most, not how many
  reacted, nor emoji Telegram does not have (😂 and 😮 of the page, tokens such as ``+1``).
"""

from __future__ import annotations

from telegram.constants import ReactionEmoji

TELEGRAM_EMOJI = frozenset(emoji.value for emoji in ReactionEmoji)
VARIATION = "\ufe0f"  # emoji presentation, which Telegram's list leaves out for a few
# Telegram's emoji that Unicode shows as text unless VARIATION follows (no Emoji_Presentation):
# the room writes them with it, as browsers' emoji pickers do.
TEXT_STYLE = frozenset({"\u2764", "\u2603", "\u270d", "\U0001f54a"})  # ❤ ☃ ✍ 🕊


def from_telegram(emoji: str) -> str:
    """A Telegram reaction's emoji as the room writes it."""
    return emoji + VARIATION if emoji in TEXT_STYLE else emoji


def to_telegram(emoji: str) -> str | None:
    """A room reaction's emoji as Telegram takes it, or None if Telegram has no such one."""
    if emoji in TELEGRAM_EMOJI:
        return emoji
    bare = emoji.replace(VARIATION, "")
    return bare if bare in TELEGRAM_EMOJI else None


def shown(counts: dict[str, int]) -> str:
    """The one reaction the bot shows for a message with these counts ("" for none)."""
    totals: dict[str, int] = {}
    for emoji, count in counts.items():
        if (telegram := to_telegram(emoji)) is not None and count > 0:
            totals[telegram] = totals.get(telegram, 0) + count
    return min(totals, key=lambda e: (-totals[e], e), default="")


def may_change(emoji: str, added: bool, counts: dict[str, int]) -> bool:
    """Whether a reaction (``emoji`` added or taken back, leaving ``counts``) may have
    changed what the bot shows: adding one that is not the most used now did not."""
    return not added or to_telegram(emoji) == shown(counts)
