"""The chatbot's conversation: commands, replies, and text posted to the joined room.

Platform-neutral: a protocol's consumer turns its platform's message into an ``Incoming``,
and renders the returned replies (the neutral markup of bots/markup.py) for its platform
(protocols/telegram/render.py) to send them back to the chat. Runs in a database thread, one
update at a time per chat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from django.db import transaction

from bots import formatting
from bots.markup import Line, Reply, bold, line, reply
from gateway import chats, events, metrics, selectors, services
from gateway.errors import GatewayError
from gateway.models import BotChat
from gateway.names import (
    ROOM_NAME_RULE,
    InvalidRoomName,
    display_name_clean,
    room_name_validate,
)

logger = logging.getLogger(__name__)

HISTORY_DEFAULT = 10
HISTORY_MAX = 50
ROOMS_SHOWN = 20
COMMAND_SHOWN = 64  # of an unknown command, quoted back (a reply fits a chat message)


@dataclass(frozen=True)
class Incoming:
    """One message to the bot, from a user in a chat."""

    platform: str  # also the sender's protocol, e.g. "telegram"
    chat_id: str
    chat_kind: str  # "private", or a group kind
    chat_title: str
    user_id: str
    user_name: str  # the platform's display name of the user
    text: str
    update_id: int | None = None  # the platform's id of this update: handled once
    # Set when the platform does not pass this chat's plain text to the bot (only commands):
    # what to change, told on /join so that the chat does not think it is bridged.
    text_withheld: str = ""

    @property
    def private(self) -> bool:
        return self.chat_kind == "private"


def handle(incoming: Incoming, *, bot_username: str = "") -> list[Reply]:
    """Answer one message: the replies to send to its chat (none for a repeated update)."""
    with transaction.atomic():
        if incoming.update_id is not None and not chats.bot_update_claim(
            platform=incoming.platform, update_id=incoming.update_id
        ):
            logger.info("ignored a repeated update", extra=_log(incoming))
            return []
        chat = chats.bot_chat_open(
            platform=incoming.platform, chat_id=incoming.chat_id, kind=incoming.chat_kind,
            title=incoming.chat_title,
        )
        if chat.blocked:
            logger.info("ignored a blocked chat", extra=_log(incoming))
            return []
        if not incoming.text:  # a photo, a sticker, someone joining the group...
            return [reply(ONLY_TEXT)] if incoming.private else []
        command, argument = command_parse(incoming.text, bot_username)
        if command is None:
            return _post(chat, incoming)
        if command == "":
            return []  # a command for another bot in the group
        action = COMMANDS.get(command)
        if action is None:
            shown = command[:COMMAND_SHOWN]
            return [reply(f"Unknown command /{shown}. /help lists the commands.")]
        return action(chat, incoming, argument)


def command_parse(text: str, bot_username: str) -> tuple[str | None, str]:
    """``("join", "lobby")`` for ``/join lobby`` or ``/join@this_bot lobby``; ``(None, text)``
    for plain text; ``("", "")`` for a command addressed to another bot."""
    if not text.startswith("/"):
        return None, text
    head, *rest = text[1:].split(maxsplit=1) or [""]  # "/join\nlobby" too
    command, _, addressee = head.partition("@")
    if addressee and addressee.lower() != bot_username.lower():
        return "", ""
    return command.lower(), rest[0].strip() if rest else ""


def _log(incoming: Incoming, **fields: object) -> dict[str, object]:
    return {"protocol": incoming.platform, "chat": incoming.chat_id, **fields}


def _sender(chat: BotChat, incoming: Incoming) -> events.Sender:
    name = chat.names.get(incoming.user_id) or display_name_clean(incoming.user_name)
    return events.sender(
        protocol=incoming.platform, id=f"{incoming.platform}-{incoming.user_id}",
        name=name or incoming.user_id,
    )


def _post(chat: BotChat, incoming: Incoming) -> list[Reply]:
    if not chat.room:
        # In a group, people talk among themselves: only a private chat gets the hint.
        return [reply(JOIN_HINT)] if incoming.private else []
    client_id = None if incoming.update_id is None else f"update-{incoming.update_id}"
    try:
        services.room_message_post(
            room=chat.room, text=incoming.text, sender=_sender(chat, incoming),
            origin=selectors.bot_chat_origin(incoming.platform, incoming.chat_id),
            client_id=client_id,
        )
    except GatewayError as exc:
        logger.warning("refused a chat message %s: %s", exc.code, exc.detail,
                       extra=_log(incoming, room=chat.room, code=exc.code))
        metrics.refused(incoming.platform, exc.code)
        return [reply(f"Not sent: {exc.detail}")]
    return []


# --- commands ------------------------------------------------------------------------------

ONLY_TEXT = "Only text messages are passed on to the room."
JOIN_HINT = "Join a room first: /join <room> (/rooms lists them)."

HELP = (
    "I bridge this chat to a room of the gateway: browsers, devices and other chats.\n"
    "/rooms: active rooms\n"
    "/join <room>: receive a room and write to it\n"
    "/leave: leave the room\n"
    "/who: who is in the room\n"
    f"/history [n]: the last n messages (up to {HISTORY_MAX})\n"
    "/name <name>: the name others see\n"
    "/help: this help"
)


def _start(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    return [reply(f"Welcome! {HELP}", "", _where(chat))]


def _help(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    return [reply(HELP, "", _where(chat))]


def _where(chat: BotChat) -> Line:
    if chat.room:
        return line("You are in ", bold(chat.room), ".")
    return line("You are in no room yet.")


def _rooms(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    rooms = selectors.room_list(limit=ROOMS_SHOWN)
    if not rooms:
        return [reply("No rooms yet: /join <room> opens one.")]
    items = [line("Rooms, most recently active first:")]
    for room in rooms:
        counts = cast(dict[str, int], room["members_by_protocol"])
        by_protocol = ", ".join(f"{p} {n}" for p, n in counts.items())
        members = f"{room['members']} ({by_protocol})" if by_protocol else "0"
        items.append(line("• ", bold(str(room["name"])), f": {members}"))
    return [reply(*items)]


def _join(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    if not argument:
        return [reply(f"Usage: /join <room> ({ROOM_NAME_RULE})")]
    try:  # before any query: PostgreSQL refuses a NUL in a name, for one
        room_name_validate(argument)
    except InvalidRoomName as exc:
        return [reply(line(exc.detail))]
    if selectors.room_is_closed(room=argument):
        return [reply(line("Room ", bold(argument), " is closed."))]
    try:
        chats.bot_chat_join(chat=chat, room=argument)
    except GatewayError as exc:  # the room policy refused a new room
        logger.warning("refused a join %s: %s", exc.code, exc.detail,
                       extra=_log(incoming, room=argument, code=exc.code))
        metrics.refused(incoming.platform, exc.code)
        return [reply(f"Not joined: {exc.detail}")]
    logger.info("chat joined a room", extra=_log(incoming, room=chat.room))
    if incoming.text_withheld and not incoming.private:
        logger.warning("joined a room, but the group's plain text does not reach the bot",
                       extra=_log(incoming, room=chat.room))
        return [reply(line(
            "You joined ", bold(chat.room), ": its messages come here, and commands work. "
            "But plain text in this group does not reach me, so it is not passed on. "
            f"{incoming.text_withheld}"
        ))]
    return [reply(line(
        "You joined ", bold(chat.room), ": its messages come here, and what you write goes "
        "there. /history shows what was said; /leave stops."
    ))]


def _leave(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    if not chat.room:
        return [reply("You are in no room.")]
    room = chat.room
    chats.bot_chat_leave(chat=chat)
    logger.info("chat left a room", extra=_log(incoming, room=room))
    return [reply(line("You left ", bold(room), "."))]


def _who(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    if not chat.room:
        return [reply(JOIN_HINT)]
    members = selectors.room_member_list(room=chat.room)
    items = [line("In ", bold(chat.room), ":")]
    for member in members:
        label = formatting.protocol_label(str(member["protocol"]))
        items.append(line(f"• {member['name']} ({label})"))
    return [reply(*items)]


def _history(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    if not chat.room:
        return [reply(JOIN_HINT)]
    count = HISTORY_DEFAULT if not argument else count_parse(argument, HISTORY_MAX)
    if count is None:
        return [reply(f"Usage: /history [n], n from 1 to {HISTORY_MAX}")]
    history = selectors.room_messages_last(room=chat.room, limit=count)
    if not history:
        return [reply(line("No messages in ", bold(chat.room), " yet."))]
    return [reply(*(formatting.history_line(event) for event in history))]


def count_parse(text: str, most: int) -> int | None:
    """``text`` as a count from 1 to ``most``, or None. ASCII digits only (``str.isdigit``
    also takes "²", which ``int`` refuses), and short: ``int`` refuses 4,300 digits."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    if len(digits) > len(str(most)):
        return None
    count = int(digits or "0")
    return count if 1 <= count <= most else None


def _name(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    name = display_name_clean(argument)
    if not name:
        return [reply("Usage: /name <display name>")]
    chats.bot_chat_name_set(chat=chat, user_id=incoming.user_id, name=name)
    return [reply(line("Others now see you as ", bold(name), "."))]


COMMANDS: dict[str, Callable[[BotChat, Incoming, str], list[Reply]]] = {
    "start": _start,
    "help": _help,
    "rooms": _rooms,
    "join": _join,
    "leave": _leave,
    "who": _who,
    "history": _history,
    "name": _name,
}
