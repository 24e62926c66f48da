"""Selectors: read-only queries over rooms, history and presence."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import F, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from gateway import events, files
from gateway.models import BotChat, GatewayProcess, Message, RelayCursor, Room, RoomEvent
from gateway.names import room_patterns_regex
from gateway.policy import POLICY_FIELDS, policy_from_columns
from gateway.presence import CHATS, members_counted
from gateway.services import entry_event, message_events


def room_log_after(
    *, room: str, after: int, limit: int, upto: int | None = None
) -> tuple[list[events.LogEntry], int]:
    """A room's log entries with ``after < cursor <= upto`` (every kind), oldest first, at
    most ``limit``; and the cursor they reach, so a reader continues from there.

    Entries are read in the current state of their messages: a message with its text after
    edits and its reactions now, an edit with the text now (an earlier text is never read
    back), a reaction with its emoji's count now. A deleted message's tombstone holds its
    place but is not an entry to deliver, nor are the edits and reactions it had; the
    delete that follows it is. The cursor reached is ``after`` when nothing was there."""
    messages = Message.objects.filter(room__name=room, seq__gt=after)
    others = RoomEvent.objects.filter(room__name=room, seq__gt=after)
    if upto is not None:
        messages, others = messages.filter(seq__lte=upto), others.filter(seq__lte=upto)
    rows: list[Message | RoomEvent] = [*messages.order_by("seq")[:limit],
                                       *others.order_by("seq")[:limit]]
    rows.sort(key=lambda row: row.seq)
    rows = rows[:limit]
    live = [row for row in rows if isinstance(row, Message) and row.deleted_at is None]
    shown = {event["id"]: event for event in message_events(live, room=room)}
    changed = {row.target for row in rows if isinstance(row, RoomEvent)
               and row.kind in (RoomEvent.KIND_EDIT, RoomEvent.KIND_REACTION)}
    states = _message_states(room, changed - shown.keys())
    for event in shown.values():
        states[event["id"]] = (event["text"], event["reactions"])
    entries: list[events.LogEntry] = []
    for row in rows:
        if isinstance(row, Message):
            if row.seq in shown:
                entries.append(shown[row.seq])
        elif row.kind in (RoomEvent.KIND_EDIT, RoomEvent.KIND_REACTION):
            state = states.get(row.target)
            if state is None:
                continue  # its message was deleted since
            text, reactions = state
            if row.kind == RoomEvent.KIND_EDIT:
                entries.append(entry_event(row, room=room, text=text))
            else:
                entries.append(entry_event(row, room=room, count=reactions.get(row.emoji, 0)))
        else:
            entries.append(entry_event(row, room=room))
    return entries, rows[-1].seq if rows else after


def _message_states(room: str, ids: set[int | None]) -> dict[int, tuple[str, dict[str, int]]]:
    """The current text and reactions of these messages of ``room`` (not deleted ones)."""
    if not ids:
        return {}
    rows = Message.objects.filter(room__name=room, seq__in=ids, deleted_at__isnull=True)
    return {seq: (text, reactions or {}) for seq, text, reactions in
            rows.values_list("seq", "text", "reactions")}


def room_message_now(*, room: str, id: int) -> events.RoomMessage | None:
    """Message ``id`` of ``room`` in its current state (None: deleted, or never stored)."""
    rows = list(Message.objects.filter(room__name=room, seq=id, deleted_at__isnull=True))
    return message_events(rows, room=room)[0] if rows else None


def room_messages_last(*, room: str, limit: int) -> list[events.RoomMessage]:
    """The newest ``limit`` messages of a room, oldest first (deleted ones are gone), in
    their current state."""
    rows = Message.objects.filter(room__name=room, deleted_at__isnull=True).order_by("-seq")
    return message_events(list(reversed(rows[:limit])), room=room)


def room_history(
    *, room: str, limit: int, after: int | None = None, absolute: bool = True
) -> list[dict[str, object]]:
    """The history API's page: messages in their current state, in the public shape, with
    ``deleted`` (a deleted one keeps its place, id, sender and time; its text, reply and
    reactions are gone). Oldest first: after the id ``after``, or the newest ``limit``."""
    query = Message.objects.filter(room__name=room)
    if after is None:
        rows = list(reversed(query.order_by("-seq")[:limit]))
    else:
        rows = list(query.filter(seq__gt=after).order_by("seq")[:limit])
    page: list[dict[str, object]] = []
    for row, event in zip(rows, message_events(rows, room=room), strict=True):
        if row.deleted_at is None:
            page.append({**files.message_public(event, absolute=absolute), "deleted": False})
        else:  # its text and reactions are erased already; its key, reply and edit go too
            page.append({**files.message_public(event, absolute=absolute), "client_id": None,
                         "reply_to": None,
                         "edited_at": None,
                         "deleted": True})
    return page


def room_last_seqs(*, rooms: list[str]) -> dict[str, int]:
    """The cursor of each room's newest log entry (0 for rooms with nothing yet)."""
    found = dict(Room.objects.filter(name__in=rooms).values_list("name", "last_seq"))
    return {room: found.get(room, 0) for room in rooms}


def rooms_reaching(protocol: str) -> Q:
    """The rooms whose policy reaches ``protocol`` (a condition on ``Room``)."""
    return Q(receive_allowed="") | Q(receive_allowed__contains=f",{protocol},")


def rooms_not_reaching(protocol: str) -> QuerySet:
    """The names of the rooms whose policy does not reach ``protocol``: a role's targets
    leave them out."""
    return Room.objects.exclude(rooms_reaching(protocol)).values("name")


def relay_targets_rooms(*, protocol: str) -> QuerySet:
    """Every room the policy lets ``protocol`` reach as a relay target of its own (``target``
    ""), for a role that serves every room (an MQTT room's ``out`` topic)."""
    rooms = Room.objects.filter(rooms_reaching(protocol))
    return rooms.values(room=F("name"), target=Value(""), head=F("last_seq"))


def relay_targets_bot_chats(*, platform: str) -> QuerySet:
    """The bot's chats of ``platform`` as relay targets of the rooms they joined (``target``
    the chat id; blocked chats, and rooms whose policy does not reach the platform, are sent
    nothing)."""
    chats = BotChat.objects.filter(platform=platform, blocked=False).exclude(room="")
    chats = chats.exclude(room__in=rooms_not_reaching(platform))
    return chats.values("room", target=F("chat_id"))


def relay_targets_list(*, targets: QuerySet) -> set[tuple[str, str]]:
    """A relay role's targets (its ``targets`` query) as ``(room, target)`` pairs."""
    return set(targets.values_list("room", "target"))


def relay_position(*, relay: str, room: str, target: str = "") -> int | None:
    """How far the relay role ``relay`` has delivered ``room`` to ``target`` (None: it has
    no position there)."""
    rows = RelayCursor.objects.filter(relay=relay, room=room, target=target)
    return rows.values_list("last_seq", flat=True).first()


def relay_rooms_pending(*, relay: str, targets: QuerySet) -> list[tuple[str, int]]:
    """``(name, newest cursor)`` of the rooms in which some target of the relay role
    ``relay`` has not been delivered everything (``targets``: rows with ``room`` and
    ``target``, the role's; a target without a position counts from 0): one query, whose
    answer holds only the rooms with news, however many rooms and targets there are."""
    position = RelayCursor.objects.filter(
        relay=relay, room=OuterRef("room"), target=OuterRef("target")
    ).values("last_seq")[:1]
    rows = targets.annotate(position=Coalesce(Subquery(position), 0))
    if "head" not in targets.query.annotations:  # the role's rows may have it at hand
        head = Room.objects.filter(name=OuterRef("room")).values("last_seq")[:1]
        rows = rows.annotate(head=Subquery(head))
    return sorted(set(rows.filter(head__gt=F("position")).values_list("room", "head")))


def room_messages_count(
    *, room: str, after: int, upto: int, origin_not: str | None = None
) -> int:
    """How many messages of ``room`` (not deleted) have ``after < id <= upto``, leaving out
    those from ``origin_not``."""
    query = Message.objects.filter(room__name=room, seq__gt=after, seq__lte=upto,
                                   deleted_at__isnull=True)
    if origin_not is not None:
        query = query.exclude(origin=origin_not)
    return query.count()


def presence_live_entries() -> list[dict[str, str]]:
    """Every open scope of every live process."""
    timeout = settings.GATEWAY["PRESENCE_TIMEOUT"]
    cutoff = timezone.now() - timedelta(seconds=timeout)
    entries: list[dict[str, str]] = []
    for snapshot in GatewayProcess.objects.filter(heartbeat_at__gte=cutoff).values_list(
        "presence", flat=True
    ):
        entries.extend(snapshot)
    return entries


def room_rosters(
    *, rooms: list[str], exclude: str = ""
) -> dict[str, dict[str, tuple[int, list[events.PresenceMember]]]]:
    """Every live process's members in each of ``rooms`` as its row has them, with the
    presence sequence it wrote them at (but ``exclude``'s, a hub's own process), and each
    room's bot chats (under ``presence.CHATS``, sequence -1): ``{room: {process: (seq,
    members)}}``, every live process present in every room (a process missing is gone)."""
    wanted = set(rooms)
    cutoff = timezone.now() - timedelta(seconds=settings.GATEWAY["PRESENCE_TIMEOUT"])
    found: dict[str, dict[str, tuple[int, list[events.PresenceMember]]]] = {
        room: {} for room in rooms}
    processes = GatewayProcess.objects.filter(heartbeat_at__gte=cutoff).exclude(pk=exclude)
    for process, seq, entries in processes.values_list("pk", "presence_seq", "presence"):
        for room in rooms:
            found[room][process] = (seq, [])
        for entry in entries:
            if entry["room"] in wanted:
                found[entry["room"]][process][1].append({
                    "scope": entry["scope"], "protocol": entry["protocol"], "id": entry["id"],
                    "name": entry["name"]})
    for room in rooms:
        found[room][CHATS] = (-1, [])
    chats = BotChat.objects.filter(room__in=rooms, blocked=False)
    for platform, chat_id, title, room in chats.values_list("platform", "chat_id", "title",
                                                             "room"):
        member = bot_chat_origin(platform, chat_id)
        found[room][CHATS][1].append({"scope": member, "protocol": platform, "id": member,
                                      "name": title})
    return found


def member_entries(*, room: str | None = None) -> list[dict[str, str]]:
    """Everyone in the rooms (or in ``room``): every open scope of every live process, and
    the bot's chats, which are in their room whether or not anyone is writing."""
    entries = [e for e in presence_live_entries() if room is None or e["room"] == room]
    chats = BotChat.objects.exclude(room="").filter(blocked=False)
    if room is not None:
        chats = chats.filter(room=room)
    for platform, chat_id, title, chat_room in chats.values_list(
        "platform", "chat_id", "title", "room"
    ):
        entries.append({"room": chat_room, "protocol": platform, "id": bot_chat_origin(
            platform, chat_id), "name": title, "scope": ""})
    return entries


def room_member_list(*, room: str) -> list[dict[str, object]]:
    """Who is in a room: one entry per person per protocol, with their connection count."""
    return members_counted(member_entries(room=room))


def room_list(
    *, limit: int = 200, patterns: tuple[str, ...] | None = None
) -> list[dict[str, object]]:
    """The ``limit`` most recently active rooms with their members by protocol (only those
    matching ``patterns``, when given)."""
    counts: dict[str, dict[str, set[str]]] = {}
    for entry in member_entries():
        counts.setdefault(entry["room"], {}).setdefault(entry["protocol"], set()).add(entry["id"])
    rooms = []
    recent = Room.objects.order_by(F("last_activity").desc(nulls_last=True), "name")
    if patterns is not None:
        recent = recent.filter(name__regex=room_patterns_regex(patterns))
    for room in recent[:limit]:
        by_protocol = {p: len(ids) for p, ids in sorted(counts.get(room.name, {}).items())}
        rooms.append(
            {
                "name": room.name,
                "members": sum(by_protocol.values()),
                "members_by_protocol": by_protocol,
                "last_id": room.last_seq,
                "last_activity": room.last_activity.timestamp() if room.last_activity else None,
            }
        )
    return rooms


def bot_chat_room(*, platform: str, chat_id: str) -> str:
    """The room an unblocked bot chat is in ("" if none)."""
    found = BotChat.objects.filter(platform=platform, chat_id=chat_id, blocked=False
                                   ).values_list("room", flat=True).first()
    return found or ""


def bot_chat_origin(platform: str, chat_id: str) -> str:
    """The origin of the messages a bot chat posts, and its member id: a chat is never sent
    what came from it."""
    return f"{platform}-chat-{chat_id}"


def room_detail(*, room: str) -> dict[str, object] | None:
    """What the API shows of a room besides its members: its cursor, whether it is closed,
    its first available cursor (retention prunes what is before), its policy; None if there
    is no such room."""
    row = Room.objects.filter(name=room).values(
        "last_seq", "closed", "horizon", "last_activity", *POLICY_FIELDS).first()
    if row is None:
        return None
    activity = row.pop("last_activity")
    return {"name": room, "last_id": row.pop("last_seq"), "closed": row.pop("closed"),
            "first_available": row.pop("horizon") + 1,
            "last_activity": activity.timestamp() if activity else None,
            "policy": policy_from_columns(**row).public()}


def room_cursor_and_horizon(*, room: str) -> tuple[int, int]:
    """The room's newest cursor and its retention horizon (what is at or before it was
    pruned); ``(0, 0)`` for a room that does not exist."""
    found = Room.objects.filter(name=room).values_list("last_seq", "horizon").first()
    return found or (0, 0)


def room_horizon(*, room: str) -> int:
    """The cursor up to which retention pruned the room's log (0: nothing)."""
    return Room.objects.filter(name=room).values_list("horizon", flat=True).first() or 0


def rooms_with_retention() -> list[str]:
    """The rooms whose log may have something to prune: those with a retention of their
    own, or every room when the gateway has a default retention."""
    defaults = settings.GATEWAY
    rooms = Room.objects.all()
    if not (defaults["RETENTION_DAYS"] or defaults["RETENTION_MESSAGES"]):
        rooms = rooms.filter(Q(retention_days__gt=0) | Q(retention_messages__gt=0))
    return list(rooms.order_by("name").values_list("name", flat=True))


def room_closed(*, room: str) -> bool | None:
    """Whether staff closed the room; None if there is no such room."""
    return Room.objects.filter(name=room).values_list("closed", flat=True).first()


def room_is_closed(*, room: str) -> bool:
    return Room.objects.filter(name=room, closed=True).exists()
