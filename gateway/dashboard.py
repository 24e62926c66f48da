"""What the staff dashboard shows, read from the database, so every replica counts.

Connections come from every live process's presence (and the bot's joined chats), the
state of each protocol server from the status its heartbeat stores, webhooks and how their
delivery goes from their rows (failing and paused first), devices from their rows and
their rooms' (the most recently active first, a bounded number, each state cut short), and
messages from the messages table: the chart's first hour once, then each poll only what is
newer than the newest message already seen (by primary key), so a poll costs the same at
any volume.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.db.models import Count, DateTimeField, F, Max, Value, Window
from django.db.models.functions import Coalesce, Greatest, RowNumber, TruncMinute
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from gateway import selectors, webhooks
from gateway.adapters import protocols_counted_by_connection
from gateway.models import Device, DeviceRoom, GatewayProcess, Message

FEED_SIZE = 30
DEVICES_SHOWN = 50  # devices, the most recently active first
DEVICE_ROOMS_SHOWN = 8  # rooms per device, the most recently active first
STATE_SHOWN = 120  # characters of a device's last state
CHART_MINUTES = 60
# Rows are read once older than this: on PostgreSQL primary keys are taken before commit, so
# a row may become visible after one with a higher key; a second covers any short commit.
SETTLE = timedelta(seconds=1)


def connections() -> dict[str, object]:
    """Connections now: in all, by protocol, and by room and protocol.

    A web connection is a socket (``Adapter.members_are_connections``); a device or a chat
    counts once per room, however many replicas have a scope for it (with a shared
    subscription, several may)."""
    per_connection = protocols_counted_by_connection()
    seen: set[tuple[str, str, str]] = set()
    by_protocol: dict[str, int] = {}
    by_room: dict[str, dict[str, int]] = {}
    entries = selectors.member_entries()
    for entry in entries:
        protocol, room = entry["protocol"], entry["room"]
        key = (room, protocol, entry["scope"] if protocol in per_connection else entry["id"])
        if key in seen:
            continue
        seen.add(key)
        by_protocol[protocol] = by_protocol.get(protocol, 0) + 1
        counts = by_room.setdefault(room, {})
        counts[protocol] = counts.get(protocol, 0) + 1
    return {"total": len(seen), "by_protocol": by_protocol, "by_room": by_room,
            "scopes": [e for e in entries if e.get("scope")][:200]}


def processes() -> list[dict[str, object]]:
    """Every live gateway process, with the state of its protocol servers."""
    cutoff = timezone.now() - timedelta(seconds=settings.GATEWAY["PRESENCE_TIMEOUT"])
    rows = GatewayProcess.objects.filter(heartbeat_at__gte=cutoff).order_by("started_at")
    return [
        {"id": p.pk, "host": p.hostname, "pid": p.pid, "started": p.started_at.timestamp(),
         "heartbeat": p.heartbeat_at.timestamp(), "connections": _count(p.presence),
         "status": p.status}
        for p in rows
    ]


def _count(presence: list[dict[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in presence:
        counts[entry["protocol"]] = counts.get(entry["protocol"], 0) + 1
    return counts


def messages_per_minute(*, after_pk: int = 0, upto_pk: int) -> list[dict[str, object]]:
    """Messages per minute and sender protocol in the last hour, with ``after_pk < pk <=
    upto_pk`` (from 0 the whole hour; then only what to add to what was read before)."""
    since = timezone.now() - timedelta(minutes=CHART_MINUTES)
    rows = (
        Message.objects.filter(created_at__gte=since, pk__gt=after_pk, pk__lte=upto_pk)
        .annotate(minute=TruncMinute("created_at"))
        .values("minute", "sender_protocol")
        .annotate(count=Count("id"))
    )
    return [{"minute": r["minute"].timestamp(), "protocol": r["sender_protocol"],
             "count": r["count"]} for r in rows]


def feed(*, after_pk: int = 0) -> tuple[list[dict[str, object]], int]:
    """The newest settled messages across all rooms after ``after_pk`` (at most
    ``FEED_SIZE``), and the primary key to read after next time."""
    settled = Message.objects.filter(pk__gt=after_pk, created_at__lt=timezone.now() - SETTLE)
    newest = settled.aggregate(top=Max("pk"))["top"]
    if newest is None:
        return [], after_pk
    rows = (settled.filter(pk__lte=newest, deleted_at__isnull=True)  # deleted: not shown
            .select_related("room").order_by("-pk")[:FEED_SIZE])
    items = [
        {"room": m.room.name, "id": m.seq, "text": m.text[:500], "ts": m.created_at.timestamp(),
         "sender": {"protocol": m.sender_protocol, "id": m.sender_id, "name": m.sender_name}}
        for m in reversed(rows)
    ]
    return items, newest


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _latest(*values: datetime | None) -> datetime | None:
    return max((v for v in values if v is not None), default=None)


def state_compact(state: object) -> str | None:
    """A device's state on one line, cut to ``STATE_SHOWN`` characters (text as it is)."""
    if state is None:
        return None
    text = state if isinstance(state, str) else json.dumps(
        state, ensure_ascii=False, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= STATE_SHOWN else text[:STATE_SHOWN - 1] + "…"


# When a room last heard from a device: the latest of when it published live and when its
# state or status changed (a retained one replayed after a restart is not live, but it is
# the last we know). Each null counts as long ago: Greatest is null if any argument is,
# except on PostgreSQL.
_NEVER = Value(datetime(1970, 1, 1, tzinfo=UTC), output_field=DateTimeField())
_ACTIVE = Greatest(*(Coalesce(name, _NEVER) for name in ("seen_at", "state_at", "status_at")))


def devices() -> list[dict[str, Any]]:
    """The devices most recently active (at most ``DEVICES_SHOWN``): a device's own row
    (blocked, takes commands, when it last posted, the rooms it posted to) with its rooms'
    (status and its time, last state, when last seen), newest first. At most five queries,
    whatever the number of devices: the newest device rows, the devices of the newest room
    rows, what each of those lacks of the devices only the other found, and the chosen
    devices' newest rooms."""
    rows = {d["device_id"]: d for d in Device.objects.order_by("-last_seen").values(
        "device_id", "protocol", "last_seen", "rooms", "blocked", "commands")[:DEVICES_SHOWN]}
    heard = {d["device_id"]: d for d in DeviceRoom.objects.values("device_id").annotate(
        active=Max(_ACTIVE), seen=Max("seen_at")).order_by(
        F("active").desc(), "device_id")[:DEVICES_SHOWN]}
    # A device only one query found: what the other would have said of it (one query each).
    missing = [d for d in heard if d not in rows]
    rows.update({d["device_id"]: d for d in Device.objects.filter(device_id__in=missing).values(
        "device_id", "protocol", "last_seen", "rooms", "blocked", "commands")})
    unheard = [d for d in rows if d not in heard]
    heard.update({d["device_id"]: d for d in DeviceRoom.objects.filter(
        device_id__in=unheard).values("device_id").annotate(
        active=Max(_ACTIVE), seen=Max("seen_at"))})
    active = {d: _latest((rows.get(d) or {}).get("last_seen"), (heard.get(d) or {}).get(
        "active")) for d in {*rows, *heard}}
    chosen = sorted(active, key=lambda d: (-(_epoch(active[d]) or 0.0), d))[:DEVICES_SHOWN]
    rooms = _device_rooms(chosen)
    return [_device(d, rows.get(d), heard.get(d), rooms.get(d, ([], 0))) for d in chosen]


def _device_rooms(chosen: list[str]) -> dict[str, tuple[list[dict[str, Any]], int]]:
    """The newest ``DEVICE_ROOMS_SHOWN`` rooms of each device, and how many it has."""
    if not chosen:
        return {}
    ranked = DeviceRoom.objects.filter(device_id__in=chosen).annotate(
        rank=Window(RowNumber(), partition_by=[F("device_id")],
                    order_by=[_ACTIVE.desc(), F("room").asc()]),
        total=Window(Count("id"), partition_by=[F("device_id")]),
    ).filter(rank__lte=DEVICE_ROOMS_SHOWN).order_by("device_id", "rank")
    found: dict[str, tuple[list[dict[str, Any]], int]] = {}
    for row in ranked:
        shown, _ = found.setdefault(row.device_id, ([], row.total))
        shown.append({"room": row.room, "status": row.status or None,
                      "status_at": _epoch(row.status_at), "state": state_compact(row.state),
                      "state_at": _epoch(row.state_at), "seen_at": _epoch(row.seen_at)})
    return found


def _device(device_id: str, row: dict[str, Any] | None, heard: dict[str, Any] | None,
            rooms: tuple[list[dict[str, Any]], int]) -> dict[str, Any]:
    """One device as the dashboard shows it. Without a row of its own (it published a status
    or a state, never a message) it is neither blocked nor refuses commands."""
    members, total = rooms
    names = {room["room"] for room in members}
    posted = [room for room in (row or {}).get("rooms") or [] if room not in names]
    space = max(0, DEVICE_ROOMS_SHOWN - len(members))
    shown = members + [{"room": room, "status": None, "status_at": None, "state": None,
                        "state_at": None, "seen_at": None} for room in posted[:space]]
    # Not shown: its room rows past the newest, the rooms it posted to past the space left
    # (a room of both, past both, counts twice: at most this many).
    hidden = total - len(members) + len(posted[space:])
    newest = max((room for room in shown if room["state_at"] is not None),
                 key=lambda room: room["state_at"], default=None)
    return {
        "id": device_id,
        "protocol": None if row is None else row["protocol"],
        "rooms": shown,
        "rooms_more": max(0, hidden),
        "last_seen": _epoch(_latest(None if row is None else row["last_seen"],
                                    None if heard is None else heard["seen"])),
        "state": None if newest is None else newest["state"],
        "state_at": None if newest is None else newest["state_at"],
        "blocked": False if row is None else row["blocked"],
        "commands": True if row is None else row["commands"],
    }


def snapshot(*, after_pk: int, first: bool) -> dict[str, object]:
    """One update of the dashboard: everything live, plus messages after ``after_pk``."""
    items, newest = feed(after_pk=after_pk)
    return {
        "type": "snapshot",
        "connections": connections(),
        "processes": processes(),
        "webhooks": webhooks.webhooks_dashboard(),
        "devices": devices(),
        "devices_shown": DEVICES_SHOWN,
        "feed": items,
        "chart": messages_per_minute(after_pk=0 if first else after_pk, upto_pk=newest),
        "chart_reset": first,
        "after": newest,
        "now": timezone.now().timestamp(),
    }


def staff_is_current(*, user_pk: int, session_key: str | None) -> bool:
    """Whether the user is still an active staff member, read now, and still logged in with
    the session the dashboard opened with (not logged out, not expired, password unchanged),
    so a demotion, deactivation or logout takes effect on open dashboards at once."""
    user = get_user_model().objects.filter(pk=user_pk, is_active=True, is_staff=True).first()
    if user is None or not session_key:
        return False
    stored = import_module(settings.SESSION_ENGINE).SessionStore(session_key).load()
    return stored.get(SESSION_KEY) == str(user.pk) and constant_time_compare(
        stored.get(HASH_SESSION_KEY, ""), user.get_session_auth_hash()
    )


def staff_snapshot(
    *, user_pk: int, session_key: str | None, after_pk: int, first: bool
) -> dict[str, object] | None:
    """``snapshot`` for a user who is still staff; None once they are not."""
    if not staff_is_current(user_pk=user_pk, session_key=session_key):
        return None
    return snapshot(after_pk=after_pk, first=first)
