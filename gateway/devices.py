"""Devices as members of rooms: their status and last state, and the commands sent to them.

**Status and state.** A device says it is ``online`` or ``offline`` (typically its birth and
its will) and publishes its last state, retained, on its protocol's topics
(protocols/mqtt/wire.py). The room keeps the last of each per device (``DeviceRoom``), not a
history: the log is for messages. They are written here by one process at a time, the holder
of the protocol's lease (protocols/mqtt/devices.py), in the order the broker delivered them,
so every replica reads the same truth; each change is then a ``room.device`` event to the
room's group (not part of the log), which clients that asked for the extended frames are
sent. A status that changes between online and offline (or unknown) is announced in the
room when its policy asks for notices. A device silent for ``MQTT_DEVICE_SILENCE`` while
online becomes ``unknown`` (``devices_silent``).

**Commands.** Anyone who may post in a room (and whose protocol the policy's ``commands``
allows) may send one of its devices a command (``command_send``): it is a message of the
room (``/cmd <device> <text>``) and a ``DeviceCommand`` with a correlation id and a deadline,
stored together. It is published once: whoever publishes it first claims it
(``command_claim``). The device's answer (``command_answer``) and the timeout
(``commands_expire``) each take the command out of ``pending`` under a condition, so exactly
one of them lands in the room, once, whichever replica hears it: the answer as the device's
reply to the command's message, the timeout as a notice replying to it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, transaction
from django.db.models import Q
from django.utils import timezone

from gateway import broadcast, events, services
from gateway.errors import GatewayError
from gateway.models import Device, DeviceCommand, DeviceRoom, Message
from gateway.names import room_name_is_valid, room_name_validate

logger = logging.getLogger(__name__)

COMMAND_MAX = 1_000  # characters of a command's text
TIMEOUT_MIN, TIMEOUT_MAX = 0.5, 300.0  # seconds a command may wait for its answer
NOTICE_LABEL = "device"
NOTICE_INTERVAL = 30.0  # seconds between two status notices of a device in a room


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def device_public(row: DeviceRoom) -> events.DeviceState:
    """A device of a room as clients see it (API, WebSocket, dashboard, the bot)."""
    return {"id": row.device_id, "room": row.room, "status": row.status or None,
            "status_at": _epoch(row.status_at), "detail": row.status_detail,
            "state": row.state, "state_at": _epoch(row.state_at),
            "seen_at": _epoch(row.seen_at)}


# --- readers -----------------------------------------------------------------------------


def room_devices(*, room: str) -> list[events.DeviceState]:
    """The devices of ``room`` with a status or a state, by id."""
    rows = DeviceRoom.objects.filter(room=room_name_validate(room)).order_by("device_id")
    return [device_public(row) for row in rows]


def room_device(*, room: str, device_id: str) -> events.DeviceState | None:
    row = DeviceRoom.objects.filter(room=room, device_id=device_id).first()
    return None if row is None else device_public(row)


# --- status and state: written by the lease holder ---------------------------------------


@dataclass(frozen=True)
class Report:
    """What a device published on its status or state topic (already decoded)."""

    room: str
    device_id: str
    kind: str  # "status" or "state"
    at: float  # epoch seconds it reached the gateway
    live: bool  # published now (else a retained one the broker replayed)
    status: str | None = None  # status: one of events.DEVICE_STATUSES, None: cleared
    detail: dict[str, Any] | None = None  # status: the JSON it came as
    state: Any = None  # state: a JSON object or text, None: cleared


def devices_report(reports: Sequence[Report]) -> list[events.RoomDevice]:
    """Apply reports in order (one transaction each, so one refused costs the others
    nothing); the changes, as ``room.device`` events, broadcast once committed. A report
    for a room that does not exist creates it, within the room policy for the device (as
    its first message would); refused, it is logged and dropped."""
    changes: list[events.RoomDevice] = []
    for report in reports:
        try:
            change = _report_apply(report)
        except GatewayError as exc:
            logger.warning("device %s not applied: %s", report.kind, exc.detail,
                           extra={"protocol": "mqtt", "room": report.room,
                                  "device": report.device_id, "code": exc.code})
            continue
        except (OperationalError, InterfaceError):
            raise  # the database cannot now: the caller tries again
        except DatabaseError as exc:  # this report only (a value it cannot hold): dropped
            logger.warning("device %s not stored: %s", report.kind, exc,
                           extra={"protocol": "mqtt", "room": report.room,
                                  "device": report.device_id, "code": "invalid_state"})
            continue
        if change is not None:
            changes.append(change)
    return changes


def _report_apply(report: Report) -> events.RoomDevice | None:
    """One report, taken as the device's message would be: its room created within the
    room policy for it, refused for a blocked device (``blocked``) and where the room's
    policy lets no device post (``read_only``). A report does not undo what the room learnt
    after it was heard (the silence rule's ``unknown``; a takeover's older view)."""
    room = services.room_get_or_create(room=report.room, creator=report.device_id)
    at = _at(report.at)
    device, _ = Device.objects.get_or_create(device_id=report.device_id, defaults={
        "protocol": "mqtt", "last_seen": at, "rooms": [report.room]})
    if device.blocked:
        raise GatewayError("blocked", "staff blocked this device")
    policy = services.room_policy_get(room=room.name)
    if policy is not None and not policy.may_post("mqtt"):
        raise GatewayError("read_only", "the room's policy lets no device post")
    if report.room not in device.rooms:
        device.rooms = [*device.rooms, report.room]
        device.save(update_fields=["rooms"])
    with transaction.atomic():
        row, created = DeviceRoom.objects.select_for_update().get_or_create(
            room=report.room, device_id=report.device_id)
        fields: list[str] = []
        before = row.status
        if report.live and (row.seen_at is None or row.seen_at < at):
            row.seen_at = at
            fields.append("seen_at")
        # Not over what the room learnt after this report was heard (the silence rule's
        # unknown; a newer value written before a takeover).
        if report.kind == "status":
            status = report.status or ""
            changed = (status != row.status or report.detail != row.status_detail) and (
                row.status_at is None or row.status_at <= at)
            if changed:
                row.status, row.status_detail, row.status_at = status, report.detail, at
                fields += ["status", "status_detail", "status_at"]
        else:
            changed = report.state != row.state and (row.state_at is None or row.state_at <= at)
            if changed:
                row.state, row.state_at = report.state, at
                fields += ["state", "state_at"]
        if fields:
            row.save(update_fields=fields)
        if not changed and not created:
            return None
        if report.kind == "status" and row.status != before:
            _status_notice(row)
        event = events.room_device(change=report.kind, device=device_public(row))
        broadcast.live_broadcast_on_commit(event)
    return event


def devices_silent(*, silence: float, now: float) -> list[events.RoomDevice]:
    """Online devices that published nothing (status, state, messages) for ``silence``
    seconds: ``unknown`` now (a device that died without a will). The changes, broadcast
    once committed."""
    cutoff = _at(now - silence)
    quiet = DeviceRoom.objects.filter(status=DeviceRoom.ONLINE).filter(
        Q(seen_at__lt=cutoff) | Q(seen_at__isnull=True, status_at__lt=cutoff))
    active = dict(Device.objects.filter(device_id__in=quiet.values("device_id"))
                  .values_list("device_id", "last_seen"))
    changes = []
    for row in quiet:
        last = active.get(row.device_id)
        if last is not None and last >= cutoff:
            continue  # it still posts messages
        with transaction.atomic():
            if not DeviceRoom.objects.filter(pk=row.pk, status=DeviceRoom.ONLINE).update(
                    status=DeviceRoom.UNKNOWN, status_at=_at(now), status_detail=None):
                continue
            row.refresh_from_db()
            _status_notice(row)
            event = events.room_device(change="status", device=device_public(row))
            broadcast.live_broadcast_on_commit(event)
        logger.info("device silent for %.0fs: status unknown", silence,
                    extra={"protocol": "mqtt", "room": row.room, "device": row.device_id})
        changes.append(event)
    return changes


def _status_notice(row: DeviceRoom) -> None:
    """Tell the room a device's status changed, if its policy asks (``notices``): at most
    one notice per device and room every ``NOTICE_INTERVAL`` (a device that flaps does not
    fill the room), and never at the cost of the status (a closed room is not told)."""
    policy = services.room_policy_get(room=row.room)
    if policy is None or not policy.notices or not row.status:
        return
    prefix = f"status:{row.device_id}:"
    last = (Message.objects.filter(room__name=row.room, sender_id=services.SYSTEM_SENDER["id"],
                                   client_id__startswith=prefix)
            .order_by("-seq").values_list("created_at", flat=True).first())
    if last is not None and (timezone.now() - last).total_seconds() < NOTICE_INTERVAL:
        return
    text = f"{NOTICE_LABEL} {row.device_id} is {row.status}"
    try:
        with transaction.atomic():
            services.room_message_post(room=row.room, text=text,
                                       sender=services.SYSTEM_SENDER, origin="",
                                       client_id=f"{prefix}{uuid.uuid4().hex}")
    except GatewayError as exc:
        logger.info("device status not told: %s", exc.detail, extra={
            "protocol": "mqtt", "room": row.room, "device": row.device_id, "code": exc.code})


# --- commands ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command on its way to its device: what the protocol publishes."""

    key: str  # the correlation id
    room: str
    device_id: str
    command: str
    sender: events.Sender
    timeout: float  # seconds it waits for its answer, as sent
    deadline: float  # epoch seconds: past it, the room is told it timed out

    def remaining(self, now: float | None = None) -> float:
        """Seconds left before its deadline (a command past it is not published)."""
        return self.deadline - (time.time() if now is None else now)

    def payload(self) -> dict[str, Any]:
        """What the device is sent: ``{"id", "command", "sender"}``."""
        return {"id": self.key, "command": self.command, "sender": self.sender}


def command_text(device_id: str, command: str) -> str:
    """The command's message in the room, as it would be typed."""
    return f"/cmd {device_id} {command}"


def timeout_validate(value: object) -> float:
    if value is None:
        return float(settings.MQTT["COMMAND_TIMEOUT"])
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            TIMEOUT_MIN <= value <= TIMEOUT_MAX) or not math.isfinite(value):
        raise GatewayError("invalid_timeout", f"'timeout' must be a number of seconds "
                           f"between {TIMEOUT_MIN:g} and {TIMEOUT_MAX:g}")
    return float(value)


def command_send(*, room: str, device: object, command: object, sender: events.Sender,
                 origin: str, staff: bool = False, client_id: object = None,
                 timeout: object = None) -> tuple[events.RoomMessage, Command | None]:
    """Send ``device`` of ``room`` a command from ``sender``: its message stored in the
    room with the command, both once committed (the message broadcast). Returns the message
    and the command to publish (None: its ``client_id`` was sent before, nothing new).

    Refused (GatewayError): an invalid device id or command (``invalid_device``,
    ``invalid_command``, ``invalid_timeout``); a device the room does not know
    (``unknown_device``); the room's policy (``command_not_allowed``, and whatever refuses a
    message: a closed room, a sender that may not post, a block, the rate limit); a device
    staff blocked or whose commands they turned off (``command_not_allowed``)."""
    if not settings.MQTT["ENABLED"]:  # nobody would publish it, nor tell it timed out
        raise GatewayError("unavailable", "devices take commands over MQTT, which is off")
    if not isinstance(device, str) or not room_name_is_valid(device):
        raise GatewayError("invalid_device", "'device' must be a device id")
    if not isinstance(command, str) or not command.strip() or len(command) > COMMAND_MAX:
        raise GatewayError("invalid_command",
                           f"'command' must be text of 1 to {COMMAND_MAX} characters")
    command = command.strip()
    wait = timeout_validate(timeout)
    room = room_name_validate(room)
    policy = services.room_policy_get(room=room)
    if policy is None:
        raise GatewayError("room_not_found", f"no room {room!r}")
    if not staff and not policy.may_command(sender["protocol"]):
        raise GatewayError("command_not_allowed",
                           f"the room's policy does not let {sender['protocol']} send commands")
    row = Device.objects.filter(device_id=device).values("blocked", "commands", "rooms").first()
    known = DeviceRoom.objects.filter(room=room, device_id=device).exists() or (
        row is not None and room in (row["rooms"] or []))
    if not known:
        raise GatewayError("unknown_device", f"no device {device!r} in room {room!r}")
    if row is not None and (row["blocked"] or not row["commands"]):
        raise GatewayError("command_not_allowed", f"device {device!r} takes no commands")
    key = uuid.uuid4().hex
    now = timezone.now()
    with transaction.atomic():
        event, created = services.room_message_post(
            room=room, text=command_text(device, command), sender=sender, origin=origin,
            client_id=services.client_id_validate(client_id))
        if not created:
            return event, None
        DeviceCommand.objects.create(
            key=key, room=room, device_id=device, seq=event["id"], command=command,
            sender=dict(event["sender"]), created_at=now,
            deadline=now + timedelta(seconds=wait))
    logger.info("command sent to %s", device,
                extra={"protocol": sender["protocol"], "room": room, "device": device,
                       "sender": event["sender"]["id"], "id": event["id"], "command_id": key})
    return event, Command(key=key, room=room, device_id=device, command=command,
                          sender=event["sender"], timeout=wait,
                          deadline=(now + timedelta(seconds=wait)).timestamp())


# Where this process publishes commands (protocols/mqtt/devices.py installs it where MQTT
# runs; it must be safe to call from any thread). Elsewhere a command waits for a process
# that has MQTT (``commands_unclaimed``).
_dispatcher: Callable[[Command], None] | None = None


def command_dispatcher_install(dispatch: Callable[[Command], None] | None) -> None:
    global _dispatcher
    _dispatcher = dispatch


def command_dispatch(command: Command | None) -> None:
    """Hand a command just sent (``command_send``) to this process's publisher, if any."""
    if command is not None and (dispatch := _dispatcher) is not None:
        dispatch(command)


def command_claim(*, key: str) -> bool:
    """Whether this caller is the one to publish command ``key`` (the first to ask)."""
    return bool(DeviceCommand.objects.filter(
        key=key, sent_at__isnull=True, state=DeviceCommand.PENDING).update(sent_at=timezone.now()))


def commands_unclaimed(*, older_than: float, limit: int = 100) -> list[Command]:
    """Pending commands nobody published yet (sent from a process without the protocol):
    published by a process with it."""
    now = timezone.now()
    rows = DeviceCommand.objects.filter(
        state=DeviceCommand.PENDING, sent_at__isnull=True,
        created_at__lt=now - timedelta(seconds=older_than)).order_by("created_at")[:limit]
    return [Command(key=row.key, room=row.room, device_id=row.device_id, command=row.command,
                    sender=row.sender, timeout=(row.deadline - row.created_at).total_seconds(),
                    deadline=row.deadline.timestamp())
            for row in rows if row.deadline > now]


def command_answer(*, room: str, device_id: str, key: object,
                   reply: object) -> events.RoomMessage | None:
    """The device's answer to command ``key``: its reply to the command's message, stored
    once (None: not a pending command of this device and room: answered or timed out
    already, or unknown). Refused (GatewayError) as the device's message would be; the
    command then stays pending (and times out)."""
    if not isinstance(key, str) or not key or len(key) > 64:
        raise GatewayError("invalid_id", "'id' must be the command's id")
    if reply is None:
        reply = ""
    if not isinstance(reply, str):
        raise GatewayError("invalid_reply", "'reply' must be text")
    found = DeviceCommand.objects.filter(key=key, room=room, device_id=device_id).first()
    if found is None:
        raise GatewayError("unknown_command", "no such command for this device")
    sender = events.sender(protocol="mqtt", id=device_id, name=device_id)
    with transaction.atomic():
        if not DeviceCommand.objects.filter(pk=found.pk, state=DeviceCommand.PENDING).update(
                state=DeviceCommand.ANSWERED):
            logger.info("late or repeated answer to a command", extra={
                "protocol": "mqtt", "room": room, "device": device_id, "command_id": key,
                "state": found.state})
            return None
        event, _ = services.room_message_post(
            room=room, text=reply or "(no text)", sender=sender, origin="",
            client_id=f"reply:{key}", reply_to=found.seq)
        DeviceCommand.objects.filter(pk=found.pk).update(answered_seq=event["id"])
    logger.info("command answered", extra={"protocol": "mqtt", "room": room,
                                           "device": device_id, "command_id": key})
    return event


def commands_expire(*, now: float | None = None) -> list[events.RoomMessage]:
    """Pending commands past their deadline: each told in its room as a notice answering
    it, once. The notices."""
    when = timezone.now() if now is None else _at(now)
    notices = []
    due = DeviceCommand.objects.filter(state=DeviceCommand.PENDING, deadline__lt=when)
    for row in due.order_by("deadline")[:500]:
        waited = (row.deadline - row.created_at).total_seconds()
        with transaction.atomic():
            if not DeviceCommand.objects.filter(pk=row.pk, state=DeviceCommand.PENDING).update(
                    state=DeviceCommand.EXPIRED):
                continue
            try:
                event, _ = services.room_message_post(
                    room=row.room, text=f"{row.device_id} did not answer within {waited:g} s",
                    sender=services.SYSTEM_SENDER, origin="", client_id=f"timeout:{row.key}",
                    reply_to=row.seq)
            except GatewayError as exc:  # the room closed, the command's message deleted
                logger.info("command timed out, not told: %s", exc.detail, extra={
                    "protocol": "mqtt", "room": row.room, "device": row.device_id})
                continue
            DeviceCommand.objects.filter(pk=row.pk).update(answered_seq=event["id"])
        logger.info("command timed out", extra={"protocol": "mqtt", "room": row.room,
                                                "device": row.device_id, "command_id": row.key})
        notices.append(event)
    return notices


def commands_forget(*, older_than_days: float = 7.0) -> int:
    """Commands answered or timed out long ago (their messages stay in the log)."""
    cutoff = timezone.now() - timedelta(days=older_than_days)
    removed, _ = DeviceCommand.objects.filter(created_at__lt=cutoff).exclude(
        state=DeviceCommand.PENDING).delete()
    return removed
