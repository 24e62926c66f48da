"""What the staff dashboard shows, read from the database, so every replica counts.

Connections come from every live process's presence (and the bot's joined chats), the
state of each protocol server from the status its heartbeat stores, webhooks and how their
delivery goes from their rows (failing and paused first), and messages from the
messages table: the chart's first hour once, then each poll only what is newer than the
newest message already seen (by primary key), so a poll costs the same at any volume.
"""

from __future__ import annotations

from datetime import timedelta
from importlib import import_module

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.db.models import Count, Max
from django.db.models.functions import TruncMinute
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from gateway import selectors, webhooks
from gateway.adapters import protocols_counted_by_connection
from gateway.models import GatewayProcess, Message

FEED_SIZE = 30
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


def snapshot(*, after_pk: int, first: bool) -> dict[str, object]:
    """One update of the dashboard: everything live, plus messages after ``after_pk``."""
    items, newest = feed(after_pk=after_pk)
    return {
        "type": "snapshot",
        "connections": connections(),
        "processes": processes(),
        "webhooks": webhooks.webhooks_dashboard(),
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
