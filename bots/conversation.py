"""The chatbot's conversation: commands, replies, and what a chat says and does in its room.

Platform-neutral: a protocol's consumer turns its platform's update into an ``Incoming``,
and renders the returned replies (the neutral markup of bots/markup.py) for its platform
(protocols/telegram/render.py) to send them back to the chat. Runs in a database thread, one
update at a time per chat, each in one transaction with the claim of its update id (so a
repeated update does nothing).

- A message: a command, or text posted to the joined room (as a reply to the room message
  the chat's message answers, when the chat's map knows it: gateway/chats.py), and recorded
  in the map as the room message's original in this chat.
- A message with a file (``IncomingFile``, its bytes fetched by the platform's consumer once
  ``file_room`` said the chat would post it): the file is checked and kept
  (``files.attachments_store``) and posted with the caption as text. A file the platform
  would not hand over (too large) is posted as a notice with the caption; one the gateway
  refuses (its type, size...) is answered in the chat, like any refusal, and logged.
- An edit of a message the chat posted: the room message gets the new text, as its author.
- Reactions of a user to a chat's message (the bot's copy or an original): set on the room
  message, emoji by emoji, in the chat's room.
- A group that became a supergroup: the chat moves to its new id.
- A command to one of the room's devices (``/cmd <device> <text>``): stored as the chat's
  message with the command (gateway/devices.py), published once the update's transaction
  commits; the device's answer reaches the chat through the relay, as a reply to it.

A refused edit is told only in a private chat; a refused reaction only logged (in a group
the bot does not answer what it was not asked).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from django.db import transaction

from bots import formatting
from bots.markup import Line, Reply, bold, line, reply
from gateway import chats, devices, events, files, metrics, selectors, services
from gateway.errors import GatewayError
from gateway.models import BotChat, BotMessage
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
DEVICES_SHOWN = 50  # of a room's devices, by /who and /devices
# What an answered message cannot be any more: the reply is posted as a plain message.
REPLY_REFUSALS = ("not_found", "deleted")
MESSAGE, EDIT, REACTION, MIGRATE = "message", "edit", "reaction", "migrate"  # Incoming.kind


@dataclass(frozen=True)
class IncomingFile:
    """A file a message carries (its caption is the message's text)."""

    name: str  # the sender's name for it, or one the platform made up
    size: int | None  # bytes, as the platform declares them (None: not said)
    content_type: str = ""  # as the platform declares it: a hint only
    data: bytes | None = field(default=None, repr=False)  # None: not fetched
    too_large: bool = False  # the platform does not hand out files this large


@dataclass(frozen=True)
class Incoming:
    """One message to the bot, from a user in a chat."""

    platform: str  # also the sender's protocol, e.g. "telegram"
    chat_id: str
    chat_kind: str  # "private", or a group kind
    chat_title: str
    user_id: str
    user_name: str  # the platform's display name of the user
    text: str  # a message's text, or an edit's new one
    update_id: int | None = None  # the platform's id of this update: handled once
    # Set when the platform does not pass this chat's plain text to the bot (only commands):
    # what to change, told on /join so that the chat does not think it is bridged.
    text_withheld: str = ""
    kind: str = MESSAGE  # or EDIT, REACTION, MIGRATE
    message_id: int | None = None  # the platform's id of the message (edited, reacted to)
    reply_to_message_id: int | None = None  # the chat's message it answers
    added: tuple[str, ...] = ()  # reaction: emoji added, as the room writes them
    removed: tuple[str, ...] = ()  # reaction: emoji taken back
    migrate_to: str = ""  # migrate: the chat's new id
    file: IncomingFile | None = None  # message: the file it carries (text is its caption)

    @property
    def private(self) -> bool:
        return self.chat_kind == "private"


@dataclass
class _Files:
    """A message's files, kept before its update's transaction (so that none is in the
    storage without a row to sweep it if that transaction rolls back): what the room is
    posted, or why not."""

    text: str  # the message's text: its caption, with a notice of a file not taken
    room: str = ""  # where the files were kept for
    attachments: list[events.Attachment] = field(default_factory=list)
    refused: GatewayError | None = None
    handed: bool = False  # to room_message_post, which discards them if not stored


def handle(incoming: Incoming, *, bot_username: str = "") -> list[Reply]:
    """Answer one message: the replies to send to its chat (none for a repeated update)."""
    kept = _files_keep(incoming)
    try:
        with transaction.atomic():
            return _handle(incoming, bot_username, kept)
    finally:
        if kept.attachments and not kept.handed:  # a repeated update, a chat that left...
            files.attachments_discard([item["id"] for item in kept.attachments])


def file_room(incoming: Incoming) -> str:
    """The room a chat's file would go to ("" if none: not in a room, blocked): asked before
    the platform fetches the file (``handle`` decides again)."""
    return selectors.bot_chat_room(platform=incoming.platform, chat_id=incoming.chat_id)


def _files_keep(incoming: Incoming) -> _Files:
    """Check and keep a message's file for the room the chat is in (refused: why)."""
    file = incoming.file
    if file is None:
        return _Files(incoming.text)
    if file.too_large:
        notice = formatting.file_not_bridged(files.name_clean(file.name, "", ""), file.size)
        return _Files(f"{incoming.text}\n{notice}" if incoming.text else notice)
    room = file_room(incoming)
    if not room:
        return _Files(incoming.text)  # handle() answers as for any message outside a room
    sender = events.sender(protocol=incoming.platform,
                           id=f"{incoming.platform}-{incoming.user_id}",
                           name=incoming.user_name or incoming.user_id)
    try:
        if file.data is None:  # not fetched: past the gateway's size, else unavailable
            if file.size:  # refused as the gateway refuses a file this large
                files.uploads_check([files.Upload(io.BytesIO(), file.size, file.name)])
            raise GatewayError("file_unavailable", "the file could not be fetched from the "
                               "chat app; send it again")
        upload = files.Upload.of_bytes(file.data, name=file.name,
                                       declared_type=file.content_type or None)
        kept = files.attachments_store(room=room, sender=sender, uploads=[upload])
    except GatewayError as exc:
        return _Files(incoming.text, refused=exc)
    return _Files(incoming.text, room=room, attachments=kept)


def _handle(incoming: Incoming, bot_username: str, kept: _Files) -> list[Reply]:
    """``handle``, inside the update's transaction."""
    if incoming.update_id is not None and not chats.bot_update_claim(
        platform=incoming.platform, update_id=incoming.update_id
    ):
        logger.info("ignored a repeated update", extra=_log(incoming))
        return []
    if incoming.kind == MIGRATE:
        chats.bot_chat_migrate(platform=incoming.platform, chat_id=incoming.chat_id,
                               to=incoming.migrate_to)
        logger.info("the chat moved to its new id",
                    extra=_log(incoming, to=incoming.migrate_to))
        return []
    chat = chats.bot_chat_open(
        platform=incoming.platform, chat_id=incoming.chat_id, kind=incoming.chat_kind,
        title=incoming.chat_title,
    )
    if chat.blocked:
        logger.info("ignored a blocked chat", extra=_log(incoming))
        return []
    if incoming.kind == EDIT:
        return _edit(chat, incoming)
    if incoming.kind == REACTION:
        return _react(chat, incoming)
    if incoming.file is not None:  # its caption is never a command
        return _post(chat, incoming, kept)
    if not incoming.text:  # a location, a poll, someone joining the group...
        return [reply(ONLY_TEXT)] if incoming.private else []
    command, argument = command_parse(incoming.text, bot_username)
    if command is None:
        return _post(chat, incoming, kept)
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


def _post(chat: BotChat, incoming: Incoming, kept: _Files) -> list[Reply]:
    if not chat.room:
        # In a group, people talk among themselves: only a private chat gets the hint.
        return [reply(JOIN_HINT)] if incoming.private else []
    answered = _answered(chat, incoming)
    if kept.attachments and answered is not None and (
            selectors.room_message_now(room=chat.room, id=answered) is None):
        answered = None  # gone: not tried (a refused post discards the files it carries)
    try:
        if kept.refused is not None:
            raise kept.refused
        if kept.attachments and kept.room != chat.room:  # it left meanwhile (staff, a block)
            raise GatewayError("room_changed", "this chat changed rooms; send it again")
        try:
            event, _ = _message_post(chat, incoming, answered, kept)
        except GatewayError as exc:
            if answered is None or exc.code not in REPLY_REFUSALS or kept.attachments:
                raise
            event, _ = _message_post(chat, incoming, None, kept)  # the answered one is gone
    except GatewayError as exc:
        logger.warning("refused a chat message %s: %s", exc.code, exc.detail,
                       extra=_log(incoming, room=chat.room, code=exc.code))
        metrics.refused(incoming.platform, exc.code)
        return [reply(f"Not sent: {exc.detail}")]
    if incoming.message_id is not None:
        chats.bot_messages_record(platform=incoming.platform, chat_id=incoming.chat_id,
                                  room=chat.room, seq=event["id"],
                                  message_ids=[incoming.message_id], own=False)
    return []


def _answered(chat: BotChat, incoming: Incoming) -> int | None:
    """The room message (of the chat's room) the chat's message answers, if the map has it."""
    if incoming.reply_to_message_id is None:
        return None
    found = _found(chat, incoming.reply_to_message_id)
    return found.seq if found is not None and found.room == chat.room else None


def _message_post(
    chat: BotChat, incoming: Incoming, reply_to: int | None, kept: _Files
) -> tuple[events.RoomMessage, bool]:
    kept.handed = True
    return services.room_message_post(
        room=chat.room, text=kept.text, sender=_sender(chat, incoming),
        origin=selectors.bot_chat_origin(incoming.platform, incoming.chat_id),
        client_id=_client_id(incoming), reply_to=reply_to, attachments=kept.attachments,
    )


def _client_id(incoming: Incoming, part: int | None = None) -> str | None:
    """The idempotency key of what an update stores (``part``: one of several things)."""
    if incoming.update_id is None:
        return None
    return f"update-{incoming.update_id}" + ("" if part is None else f"-{part}")


def _found(chat: BotChat, message_id: int | None) -> BotMessage | None:
    if message_id is None:
        return None
    return chats.bot_message_find(platform=chat.platform, chat_id=chat.chat_id,
                                  message_id=message_id)


def _edit(chat: BotChat, incoming: Incoming) -> list[Reply]:
    """The chat's user edited a message: its room message (wherever it is) gets the text."""
    found = _found(chat, incoming.message_id)
    if found is None or found.own or not incoming.text:
        return []  # a command, something said outside a room, a caption...
    try:
        services.message_edit(
            room=found.room, id=found.seq, text=incoming.text, sender=_sender(chat, incoming),
            staff=False, origin=selectors.bot_chat_origin(incoming.platform, incoming.chat_id),
            client_id=_client_id(incoming),
        )
    except GatewayError as exc:
        logger.warning("refused a chat's edit %s: %s", exc.code, exc.detail,
                       extra=_log(incoming, room=found.room, code=exc.code))
        metrics.refused(incoming.platform, exc.code)
        return [reply(f"Not edited: {exc.detail}")] if incoming.private else []
    return []


def _react(chat: BotChat, incoming: Incoming) -> list[Reply]:
    """A user's reactions to a chat's copy of a room message (or an original) changed: set
    each emoji added or taken back on the room message, if it is in the chat's room."""
    found = _found(chat, incoming.message_id)
    if found is None or found.room != chat.room:
        return []
    sender = _sender(chat, incoming)
    origin = selectors.bot_chat_origin(incoming.platform, incoming.chat_id)
    changes = [(e, True) for e in incoming.added] + [(e, False) for e in incoming.removed]
    for part, (emoji, added) in enumerate(changes):
        try:
            services.message_react(room=found.room, id=found.seq, emoji=emoji, sender=sender,
                                   origin=origin, client_id=_client_id(incoming, part),
                                   added=added)
        except GatewayError as exc:
            logger.warning("refused a chat's reaction %s: %s", exc.code, exc.detail,
                           extra=_log(incoming, room=found.room, code=exc.code))
            metrics.refused(incoming.platform, exc.code)
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
    "/devices: the room's devices, their status and last state\n"
    "/cmd <device> <command>: send a device of the room a command\n"
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
    policy = services.room_policy_get(room=argument)
    platform = incoming.platform
    if policy is not None and not policy.receives(platform) and not policy.may_post(platform):
        metrics.refused(platform, "not_reached")
        return [reply(line("Room ", bold(argument), " is not open to this chat app."))]
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
    if policy is not None and not policy.may_post(platform):
        return [reply(line("You joined ", bold(chat.room), ": its messages come here, but "
                           "it takes no messages from here (read-only). /leave stops."))]
    if policy is not None and not policy.receives(platform):
        return [reply(line("You joined ", bold(chat.room), ": what you write goes there, "
                           "but its messages do not come here. /leave stops."))]
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
    found = devices.room_devices(room=chat.room)
    if found:
        items.append(line("Devices:"))
        items.extend(_device_lines(found, states=False))
    return [reply(*items)]


def _devices(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    if not chat.room:
        return [reply(JOIN_HINT)]
    found = devices.room_devices(room=chat.room)
    if not found:
        return [reply("No devices in this room.")]
    return [reply(line("Devices in ", bold(chat.room), ":"), *_device_lines(found, states=True))]


def _device_lines(found: list[events.DeviceState], *, states: bool) -> list[Line]:
    """Each device with its status (and its last state under it), the first few."""
    now = time.time()
    out = []
    for device in found[:DEVICES_SHOWN]:
        out.append(formatting.device_line(device, now=now))
        if states and device["state"] is not None:
            out.append(line("  ↳ ", formatting.device_state(device["state"])))
    if len(found) > DEVICES_SHOWN:
        out.append(line(f"… and {len(found) - DEVICES_SHOWN} more"))
    return out


CMD_USAGE = "Usage: /cmd <device> <command>, e.g. /cmd thermo1 set 22 (/devices lists them)"


def _cmd(chat: BotChat, incoming: Incoming, argument: str) -> list[Reply]:
    """Send a device of the room a command: its message is the chat's (not sent back here);
    the device's answer, or the timeout's notice, comes through the relay."""
    if not chat.room:
        return [reply(JOIN_HINT)]
    device, *rest = argument.split(maxsplit=1) or [""]
    if not rest:
        return [reply(CMD_USAGE)]
    try:
        event, command = devices.command_send(
            room=chat.room, device=device, command=rest[0], sender=_sender(chat, incoming),
            origin=selectors.bot_chat_origin(incoming.platform, incoming.chat_id),
            client_id=_client_id(incoming))
    except GatewayError as exc:
        logger.warning("refused a chat's command %s: %s", exc.code, exc.detail,
                       extra=_log(incoming, room=chat.room, code=exc.code))
        metrics.refused(incoming.platform, exc.code)
        return [reply(_command_refusal(exc, device))]
    # Published once the update's transaction commits: before, nobody could claim it.
    transaction.on_commit(lambda: devices.command_dispatch(command))
    if incoming.message_id is not None:  # the device's answer comes as a reply to it
        chats.bot_messages_record(platform=incoming.platform, chat_id=incoming.chat_id,
                                  room=chat.room, seq=event["id"],
                                  message_ids=[incoming.message_id], own=False)
    return []


def _command_refusal(exc: GatewayError, device: str) -> Line:
    if exc.code == "unknown_device":
        return line("Not sent: no device ", bold(device), " in this room (/devices lists them).")
    if exc.code == "invalid_device":
        return line("Not sent: ", bold(device[:COMMAND_SHOWN]), " is not a device id.")
    if exc.code == "invalid_command":
        return line(f"Not sent: a command is text of 1 to {devices.COMMAND_MAX} characters.")
    return line(f"Not sent: {exc.detail}")


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
    "devices": _devices,
    "cmd": _cmd,
    "name": _name,
}
