"""Services: the only code that changes rooms and messages."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import emoji as emoji_data
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)
from django.db.models import Exists, F, OuterRef, Q, QuerySet, Subquery

from gateway import events, files, metrics
from gateway.adapters import adapters_relay_roles
from gateway.broadcast import room_event_broadcast_on_commit, room_events_broadcast_on_commit
from gateway.errors import GatewayError, RateLimited
from gateway.models import (
    BotMessage,
    Device,
    Lease,
    Message,
    MessageRevision,
    Reaction,
    RelayCursor,
    Room,
    RoomEvent,
    SenderBlock,
)
from gateway.names import room_name_validate
from gateway.policy import POLICY_FIELDS, Policy, policy_columns, policy_from_columns
from gateway.ratelimit import TokenBucket
from gateway.webhooks import webhook_rooms_add_room


def message_text_validate(text: object, *, empty_ok: bool = False) -> str:
    """The one message-text rule of every protocol: a non-empty string within the limit
    (empty allowed, with ``empty_ok``, for a message that carries files)."""
    limit = settings.GATEWAY["MAX_MESSAGE_LENGTH"]
    if not isinstance(text, str):
        raise GatewayError("invalid_message", "'message' must be a string")
    unicode_check(text, "message")
    if not text.strip() and not empty_ok:
        raise GatewayError("empty_message", "'message' is empty")
    if len(text) > limit:
        raise GatewayError("message_too_long", f"message has {len(text)} characters; limit {limit}")
    return text


def client_id_validate(client_id: object) -> str | None:
    if client_id is None:
        return None
    if not isinstance(client_id, str) or not 1 <= len(client_id) <= 64:
        raise GatewayError("invalid_client_id", "'client_id' must be a string of 1-64 characters")
    unicode_check(client_id, "client_id", code="invalid_client_id")
    return client_id


def unicode_check(value: str, field: str, *, code: str = "invalid_message") -> None:
    """Refuse what no database stores as text: lone surrogates and NUL characters."""
    if "\x00" in value:
        raise GatewayError(code, f"'{field}' contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise GatewayError(code, f"'{field}' is not valid Unicode text") from None


def message_event(message: Message, *, room: str | None = None) -> events.RoomMessage:
    """The contract event for a stored message, in its current state (``room`` spares a
    query for its name)."""
    return message_events([message], room=room if room is not None else message.room.name)[0]


def message_events(messages: Sequence[Message], *, room: str) -> list[events.RoomMessage]:
    """The contract events of stored messages of ``room``, in their current state: the
    messages they answer read in one query, only when some answer one."""
    answered = {m.reply_to for m in messages if m.reply_to is not None}
    refs = _reply_refs(room, answered) if answered else {}
    return [events.room_message(
        id=message.seq,
        room=room,
        text=message.text,
        sender=events.sender(
            protocol=message.sender_protocol, id=message.sender_id, name=message.sender_name
        ),
        ts=message.created_at.timestamp(),
        origin=message.origin,
        client_id=message.client_id,
        reply_to=None if message.reply_to is None else refs.get(message.reply_to),
        edited_at=None if message.edited_at is None else message.edited_at.timestamp(),
        reactions=message.reactions,
        attachments=message.attachments,
    ) for message in messages]


def _reply_refs(room: str, ids: set[int]) -> dict[int, events.ReplyRef]:
    """What replies show of these messages of ``room`` (a deleted one: no excerpt)."""
    rows = Message.objects.filter(room__name=room, seq__in=ids).values_list(
        "seq", "sender_protocol", "sender_id", "sender_name", "text")
    return {seq: events.reply_ref(id=seq, text=text, sender=events.sender(
        protocol=protocol, id=sender_id, name=name))
        for seq, protocol, sender_id, name, text in rows}


def entry_event(
    entry: RoomEvent, *, room: str, text: str | None = None, count: int | None = None
) -> events.RoomEntry:
    """The contract event for a stored log entry that is not a message (an edit's ``text``
    and a reaction's ``count`` are the message's, which the caller read)."""
    return events.room_entry(
        cursor=entry.seq,
        room=room,
        kind=entry.kind,
        id=entry.target,
        sender=events.sender(
            protocol=entry.sender_protocol, id=entry.sender_id, name=entry.sender_name
        ),
        ts=entry.created_at.timestamp(),
        origin=entry.origin,
        client_id=entry.client_id,
        text=text,
        emoji=entry.emoji or None,
        added=entry.added,
        count=count,
        policy=entry.data if entry.kind == RoomEvent.KIND_POLICY else None,
    )


SYSTEM_SENDER = events.sender(protocol="system", id="system", name="system")


def staff_sender(user) -> events.Sender:
    """A staff user acting on rooms (dashboard, admin), as the log records them."""
    return events.sender(protocol="system", id=f"staff:{user.pk}", name=user.get_username())


def room_get_or_create(
    *, room: str, creator: str | None = None, staff: bool = False
) -> Room:
    """The room, created if it is new, within the room policy for ``creator``: see
    ``room_create_check`` (``creator`` None: staff or the gateway itself, never limited)."""
    name = room_name_validate(room)
    existing = Room.objects.filter(name=name).first()
    if existing is not None:
        return existing
    if creator is not None and not staff:
        room_create_check(creator=creator)
    with transaction.atomic():
        obj, created = Room.objects.get_or_create(name=name)
        if created:
            webhook_rooms_add_room(room=name)
    return obj


def room_open(*, room: str) -> int:
    """The id of the room's newest message (0 for a room that does not exist yet: listening
    to a room does not create it)."""
    last = Room.objects.filter(name=room_name_validate(room)).values_list("last_seq", flat=True)
    return last.first() or 0


def room_position(*, room: str) -> tuple[int, bool | None, Policy | None]:
    """The room's newest cursor, whether it is closed and its policy, read together
    (``(0, None, None)`` for a room that does not exist yet: listening to a room does not
    create it)."""
    found = (Room.objects.filter(name=room_name_validate(room))
             .values("last_seq", "closed", *POLICY_FIELDS).first())
    if found is None:
        return 0, None, None
    return found.pop("last_seq"), found.pop("closed"), policy_from_columns(**found)


def room_enter(
    *, room: str, sender: events.Sender, staff: bool, creator: str | None = None
) -> tuple[bool, events.Sender]:
    """A member arrives in ``room``: create it if it is new (within the room policy for
    ``creator``, by default the sender, else GatewayError). Returns whether staff closed it,
    and the sender as the room shows it (an unverified sender does not keep a staff user's
    name)."""
    creator = creator or sender["id"]
    closed = _room_closed(room_name_validate(room))
    if closed is None:  # new
        closed = room_get_or_create(room=room, creator=creator, staff=staff).closed
    name = display_name_for(sender_id=sender["id"], protocol=sender["protocol"],
                            name=sender["name"])
    return closed, events.sender(protocol=sender["protocol"], id=sender["id"], name=name)


def _room_closed(name: str) -> bool | None:
    """Whether the room is closed; None if it does not exist (one indexed read, no model:
    every socket's connect asks it)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT closed FROM {connection.ops.quote_name(Room._meta.db_table)}"  # noqa: S608
                       " WHERE name = %s", [name])
        row = cursor.fetchone()
    return None if row is None else bool(row[0])


class _CreationLimits:
    """Per-creator token buckets for new rooms, for the most recent creators (bounded)."""

    KEEP = 10_000

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, creator: str) -> float | None:
        """None if ``creator`` may create a room now, else seconds to wait."""
        per_minute = settings.GATEWAY["ROOM_CREATE_PER_MINUTE"]
        with self._lock:
            bucket = self._buckets.pop(creator, None) or TokenBucket(
                rate=per_minute / 60, burst=max(1, int(per_minute))
            )
            self._buckets[creator] = bucket
            while len(self._buckets) > self.KEEP:
                self._buckets.popitem(last=False)
            return None if bucket.allow() else bucket.retry_after()


_room_creations = _CreationLimits()


def room_create_check(*, creator: str) -> None:
    """Whether ``creator`` (a sender id, not staff) may create a room now; GatewayError if
    not: rooms are created by staff only (``room_not_found``), the cap on rooms is reached
    (``too_many_rooms``), or this sender created too many lately (``rate_limited``)."""
    policy = settings.GATEWAY
    if policy["ROOMS_STAFF_ONLY"]:
        raise GatewayError("room_not_found", "no such room (rooms are created by staff)")
    wait = _room_creations.allow(creator)
    if wait is not None:
        raise RateLimited(f"too many new rooms; retry in {wait:.0f}s", wait)
    if policy["MAX_ROOMS"] and Room.objects.count() >= policy["MAX_ROOMS"]:
        raise GatewayError("too_many_rooms", f"the gateway holds {policy['MAX_ROOMS']} rooms")


# --- display names: staff names are reserved for staff -----------------------------------

_RESERVED_TTL = 10.0
_reserved: tuple[float, frozenset[str]] = (0.0, frozenset())


def sender_verified(sender_id: str, protocol: str) -> bool:
    """Whether the gateway vouches for this sender's name: a logged-in account, the system."""
    return protocol == "system" or sender_id.startswith("user:")


def _staff_names(*, read: bool) -> frozenset[str] | None:
    """The staff accounts' names (casefolded), read again every 10 s; None when they are due
    and ``read`` is False (no database here)."""
    global _reserved
    expires, names = _reserved
    if time.monotonic() > expires:
        if not read:
            return None
        staff = get_user_model().objects.filter(is_staff=True)
        names = frozenset(n.casefold() for n in staff.values_list("username", flat=True))
        _reserved = (time.monotonic() + _RESERVED_TTL, names)
    return names


def _name_shown(sender_id: str, protocol: str, name: str, staff: frozenset[str]) -> str:
    if sender_verified(sender_id, protocol) or name.casefold() not in staff | {"system"}:
        return name
    return f"{name[:50]} (unverified)"


def display_name_reserved(name: str) -> bool:
    """Whether ``name`` is a staff account's (case-insensitive); refreshed every 10 s."""
    staff = cast(frozenset[str], _staff_names(read=True))
    return name.casefold() in staff or name.casefold() == "system"


def display_name_for(*, sender_id: str, protocol: str, name: str) -> str:
    """The name a sender shows: an unverified sender cannot take a staff user's name."""
    if sender_verified(sender_id, protocol):
        return name  # no need for the staff names
    return _name_shown(sender_id, protocol, name, cast(frozenset[str], _staff_names(read=True)))


def display_name_known(*, sender_id: str, protocol: str, name: str) -> str | None:
    """``display_name_for`` from what this process holds, without the database: None when
    the staff names it compares with are due to be read again (ask ``display_name_for``)."""
    staff = _staff_names(read=False)
    return None if staff is None else _name_shown(sender_id, protocol, name, staff)


def room_message_post(
    *,
    room: str,
    text: str,
    sender: events.Sender,
    origin: str,
    client_id: str | None = None,
    reply_to: int | None = None,
    attachments: Sequence[events.Attachment] = (),
) -> tuple[events.RoomMessage, bool]:
    """Store a message (an answer to message ``reply_to`` of the room, if given; carrying
    ``attachments``, files kept by ``files.attachments_store``), then broadcast it once
    committed.

    Returns the event and whether it was created; a repeated ``client_id`` from the same
    sender returns the message stored the first time and broadcasts nothing. Files of a
    message not stored (refused, or a repeat) are discarded.
    """
    post = Post(room=room, text=text, sender=sender, origin=origin, client_id=client_id,
                reply_to=reply_to, attachments=tuple(attachments))
    try:
        result = _message_post_one(_post_checked(post))
    except BaseException:
        _files_discard(post)
        raise
    if not result[1]:
        _files_discard(post)
    return result


def _files_discard(post: Post) -> None:
    """The files of a post that was not stored: not kept."""
    if post.attachments:
        files.attachments_discard([item["id"] for item in post.attachments])


def _message_post_one(post: Post) -> tuple[events.RoomMessage, bool]:
    """Store one checked post in a transaction of its own (GatewayError if refused)."""
    room, sender = post.room, post.sender
    text, client_id = cast(str, post.text), cast(str | None, post.client_id)  # checked
    if client_id is not None:
        existing = _message_by_client_id(room, sender["id"], client_id)
        if existing is not None:
            return message_event(existing, room=room), False
    reply = None
    if post.reply_to is not None:
        answered = (room, cast(int, post.reply_to))
        found = _reply_targets([answered])[answered]
        if isinstance(found, GatewayError):
            raise found
        reply = found
    try:
        with transaction.atomic():
            event = _message_insert(room, text, sender, post.origin, client_id, reply,
                                    list(post.attachments))
            room_event_broadcast_on_commit(event)
    except IntegrityError:
        # The same client_id won a race in another process; answer with its message.
        existing = _message_by_client_id(room, sender["id"], client_id or "")
        if existing is None:
            raise
        return message_event(existing, room=room), False
    metrics.MESSAGES_IN.labels(sender["protocol"]).inc()
    return event, True


@dataclass(frozen=True, slots=True)
class Post:
    """One message to store, as a protocol received it (validated when stored)."""

    room: str
    text: object
    sender: events.Sender
    origin: str
    client_id: object = None
    reply_to: object = None  # the id of the room's message it answers
    attachments: tuple[events.Attachment, ...] = ()  # kept already (files.attachments_store)


# What storing a Post came to: the event and whether it was created (False: its client_id
# was stored before), or why not: a refusal (GatewayError) or a database error of its own.
PostResult = tuple[events.RoomMessage, bool] | Exception


def room_messages_post(*, posts: Sequence[Post]) -> list[PostResult]:
    """Store messages that arrived together (any rooms, any senders) in one transaction,
    then broadcast them once committed, in order: group commit. Each gets its result, in
    the order given; one refused (invalid, blocked, a closed room...) costs the others
    nothing.

    Per room, one ``UPDATE ... RETURNING`` takes as many cursors as the room has messages in
    the batch (ids stay gap-free and in commit order; rooms are taken in name order, so two
    processes' batches never wait on each other's rooms); the rows are inserted in bulk; a
    repeated ``client_id`` (stored before, or twice in the batch) is stored once. A lone
    message takes the single path (``room_message_post``), costing what it always did.

    The database unreachable or locked (``OperationalError``, ``InterfaceError``) fails the
    whole batch, raised: nothing of it was stored. Any other database error (a unique-key
    race with another process on a client_id, a value one row cannot hold) stores the batch
    again one message at a time, each with its own result.
    """
    results: list[PostResult | None] = [None] * len(posts)
    valid: list[tuple[int, Post]] = []
    for index, post in enumerate(posts):
        try:
            valid.append((index, _post_checked(post)))
        except GatewayError as exc:
            results[index] = exc
    if len(valid) == 1:
        index, post = valid[0]
        try:
            results[index] = _message_post_one(post)
        except GatewayError as exc:
            results[index] = exc
    elif valid:
        try:
            with transaction.atomic():
                _messages_store(valid, results)
        except (OperationalError, InterfaceError):
            raise
        except DatabaseError:
            for index, post in valid:
                results[index] = _message_post_alone(post)
        else:
            for index, _ in valid:
                result = results[index]
                if isinstance(result, tuple) and result[1]:
                    metrics.MESSAGES_IN.labels(result[0]["sender"]["protocol"]).inc()
    answers = [result if result is not None else GatewayError("unavailable", "not stored")
               for result in results]
    for post, answer in zip(posts, answers, strict=True):
        if post.attachments and not (isinstance(answer, tuple) and answer[1]):
            _files_discard(post)
    return answers


def _message_post_alone(post: Post) -> PostResult:
    """One message of a batch stored by itself: its result, whatever it is."""
    try:
        return _message_post_one(post)
    except (GatewayError, DatabaseError) as exc:
        return exc


def _post_checked(post: Post) -> Post:
    """The post with its fields validated and its sender as the room shows it."""
    sender = post.sender
    name = display_name_for(sender_id=sender["id"], protocol=sender["protocol"],
                            name=sender["name"])
    if name != sender["name"]:
        sender = events.sender(protocol=sender["protocol"], id=sender["id"], name=name)
    reply_to = None if post.reply_to is None else message_id_validate(post.reply_to, "reply_to")
    return Post(room=room_name_validate(post.room),
                text=message_text_validate(post.text, empty_ok=bool(post.attachments)),
                sender=sender, origin=post.origin, client_id=client_id_validate(post.client_id),
                reply_to=reply_to, attachments=post.attachments)


def message_id_validate(value: object, field: str = "id") -> int:
    """A message id as a client gives it: a positive integer (GatewayError otherwise)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**63:
        raise GatewayError(f"invalid_{field}", f"'{field}' must be a message id (an integer > 0)")
    return value


def _reply_targets(
    pairs: Sequence[tuple[str, int]],
) -> dict[tuple[str, int], events.ReplyRef | GatewayError]:
    """For each ``(room, id)`` a reply answers: what the reply shows of it, or why it cannot
    be answered (``not_found``, ``deleted``). One query for all of them."""
    wanted = set(pairs)
    rows = Message.objects.filter(
        room__name__in={room for room, _ in wanted}, seq__in={seq for _, seq in wanted}
    ).values_list("room__name", "seq", "sender_protocol", "sender_id", "sender_name", "text",
                  "deleted_at")
    found: dict[tuple[str, int], events.ReplyRef | GatewayError] = {}
    for room, seq, protocol, sender_id, name, text, deleted_at in rows:
        if (room, seq) not in wanted:
            continue
        if deleted_at is not None:
            found[(room, seq)] = GatewayError("deleted", f"message {seq} was deleted")
        else:
            found[(room, seq)] = events.reply_ref(id=seq, text=text, sender=events.sender(
                protocol=protocol, id=sender_id, name=name))
    for room, seq in wanted - found.keys():
        found[(room, seq)] = GatewayError("not_found", f"no message {seq} in room {room}")
    return found


def _messages_store(valid: list[tuple[int, Post]], results: list[PostResult | None]) -> None:
    """The batch path of ``room_messages_post``, inside its transaction."""
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    known = _messages_by_client_ids([post for _, post in valid])
    blocked = _senders_blocked([post.sender for _, post in valid])
    answered = [_answered(post) for _, post in valid if post.reply_to is not None]
    replies = _reply_targets(answered) if answered else {}
    by_room: dict[str, list[tuple[int, Post]]] = {}
    first_of: dict[tuple[str, str, object], int] = {}  # a client_id's first post in the batch
    repeats: list[tuple[int, int]] = []  # (a post, the first one with its client_id)
    for index, post in valid:
        key = (post.room, post.sender["id"], post.client_id)
        if post.client_id is not None and key in known:
            results[index] = (message_event(known[key], room=post.room), False)
        elif (post.sender["protocol"], post.sender["id"], post.sender["name"]) in blocked:
            results[index] = GatewayError("blocked",
                                          "staff blocked this sender; the message was dropped")
        elif post.client_id is not None and key in first_of:
            repeats.append((index, first_of[key]))
        elif post.reply_to is not None and isinstance(
                reply := replies[_answered(post)], GatewayError):
            results[index] = reply
        else:
            if post.client_id is not None:
                first_of[key] = index
            by_room.setdefault(post.room, []).append((index, post))
    taken = _rooms_cursors_take({room: len(items) for room, items in by_room.items()}, now)
    if answered:  # read again under the rooms' locks: as they are now
        replies = _replies_now(replies)
    rows: list[tuple] = []
    links: list[tuple[str, int, str]] = []
    ts, stamp = now.timestamp(), connection.ops.adapt_datetimefield_value(now)
    for room in sorted(by_room):  # one lock order for every process: no deadlock
        items = by_room[room]
        if room in taken:
            room_pk, last = taken[room]
            first_seq = last - len(items) + 1
        else:  # new, closed or with a policy to apply: admitted one by one
            found = _room_admit(room, items, now, results)
            if found is None:
                continue
            room_pk, first_seq, items = found
        for offset, (index, post) in enumerate(items):
            sender, seq = post.sender, first_seq + offset
            name, text, client_id = sender["name"][:128], cast(str, post.text), post.client_id
            rows.append((room_pk, seq, text, sender["protocol"], sender["id"], name,
                         post.origin, client_id, stamp, post.reply_to,
                         _attachments_column(post.attachments)))
            links.extend((room, seq, item["id"]) for item in post.attachments)
            results[index] = (events.room_message(
                id=seq, room=room, text=text, ts=ts, origin=post.origin,
                sender=events.sender(protocol=sender["protocol"], id=sender["id"], name=name),
                client_id=cast(str | None, client_id),
                reply_to=None if post.reply_to is None
                else cast(events.ReplyRef, replies[_answered(post)]),
                attachments=list(post.attachments),
            ), True)
    alone = []  # repeats whose first was refused: stored as if they came after the batch
    for index, first in repeats:
        answer = results[first]
        if isinstance(answer, tuple):
            results[index] = (answer[0], False)  # the first one's message
        else:
            alone.append(index)
    _messages_insert(rows)
    files.attachments_link(links)
    room_events_broadcast_on_commit([result[0] for index, _ in valid
                                     if isinstance(result := results[index], tuple)
                                     and result[1]])
    posts = dict(valid)
    for index in alone:
        try:
            results[index] = _message_post_one(posts[index])
        except GatewayError as exc:
            results[index] = exc


def _replies_now(
    checked: dict[tuple[str, int], events.ReplyRef | GatewayError],
) -> dict[tuple[str, int], events.ReplyRef | GatewayError]:
    """The replies' targets read again once the rooms' cursors are taken (no edit or delete
    of them can commit meanwhile): their text now; one deleted since its check is still
    answered, with no excerpt (its reply already holds a cursor)."""
    wanted = [key for key, ref in checked.items() if not isinstance(ref, GatewayError)]
    now = _reply_targets(wanted) if wanted else {}
    fresh: dict[tuple[str, int], events.ReplyRef | GatewayError] = dict(checked)
    for key in wanted:
        ref = now[key]
        if isinstance(ref, GatewayError):
            before = cast(events.ReplyRef, checked[key])
            ref = events.reply_ref(id=before["id"], sender=before["sender"], text="")
        fresh[key] = ref
    return fresh


def _answered(post: Post) -> tuple[str, int]:
    """The message a (checked) reply answers: ``(room, id)``."""
    return post.room, cast(int, post.reply_to)


# The columns a new message is inserted with, in the order of ``_messages_insert``'s rows
# (tests/test_group_commit.py checks they are every column but the key and the state a message
# gains later: its tombstone, edit and reactions).
MESSAGE_INSERT_COLUMNS = ("room_id", "seq", "text", "sender_protocol", "sender_id",
                          "sender_name", "origin", "client_id", "created_at", "reply_to",
                          "attachments")


def _attachments_column(attachments: Sequence[events.Attachment]) -> object:
    """A new message's ``attachments`` as the database takes it (NULL: none)."""
    if not attachments:
        return None
    return Message._meta.get_field("attachments").get_db_prep_save(list(attachments),
                                                                   connection)


def _messages_insert(rows: list[tuple]) -> None:
    """Insert new messages' rows (``MESSAGE_INSERT_COLUMNS``, values as the database takes
    them) with one prepared statement: no model instances, no ids read back."""
    if not rows:
        return
    quote = connection.ops.quote_name
    columns = ", ".join(quote(column) for column in MESSAGE_INSERT_COLUMNS)
    marks = ", ".join(["%s"] * len(MESSAGE_INSERT_COLUMNS))
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {quote(Message._meta.db_table)} ({columns}) VALUES ({marks})",  # noqa: S608
            rows,
        )


def _rooms_cursors_take(counts: dict[str, int], now: datetime) -> dict[str, tuple[int, int]]:
    """Take ``counts[room]`` cursors of each of these rooms that exists and is open, in one
    statement: ``{room: (room pk, the last cursor taken)}``; a room missing from it is new or
    closed (the caller handles it as one message would be). Records ``now`` as activity.

    On PostgreSQL the rows are locked in name order first, so two processes' batches never
    wait on each other in a cycle. A missing room that sorts before one taken would be
    created or locked out of that order: then nothing is taken (back to a savepoint, which
    releases the locks) and the caller takes each room in name order, one by one.
    """
    if len(counts) <= 1:
        if not counts:
            return {}
        ((room, count),) = counts.items()
        one = _cursor_take(room, count=count, activity=now, where=_OPEN_UNRESTRICTED)
        return {} if one is None else {room: one}
    quote = connection.ops.quote_name
    table = quote(Room._meta.db_table)
    names = sorted(counts)
    marks = ", ".join(["%s"] * len(names))
    case = " ".join(["WHEN %s THEN %s"] * len(names))
    case_params = [value for name in names for value in (name, counts[name])]
    stamp = connection.ops.adapt_datetimefield_value(now)
    if connection.vendor == "postgresql":
        # COLLATE "C": the byte order Python's sorted() uses for these ASCII names (the
        # database's own collation may put "general" before "Lobby").
        sql = (f"WITH locked AS (SELECT id FROM {table} WHERE name IN ({marks})"  # noqa: S608
               f'{_OPEN_UNRESTRICTED} ORDER BY name COLLATE "C" FOR UPDATE)'
               f" UPDATE {table} SET last_seq = last_seq + CASE name {case} END,"
               f" last_activity = %s FROM locked WHERE {table}.id = locked.id"
               f" RETURNING {table}.name, {table}.id, {table}.last_seq")
        params = [*names, *case_params, stamp]
        savepoint = transaction.savepoint()
    else:  # SQLite: one writer at a time, no order to keep
        sql = (f"UPDATE {table} SET last_seq = last_seq + CASE name {case} END,"  # noqa: S608
               f" last_activity = %s WHERE name IN ({marks}){_OPEN_UNRESTRICTED}"
               " RETURNING name, id, last_seq")
        params = [*case_params, stamp, *names]
        savepoint = None
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        taken = {name: (pk, last) for name, pk, last in cursor.fetchall()}
    if savepoint is not None:
        missing = counts.keys() - taken.keys()
        if missing and taken and min(missing) < max(taken):
            transaction.savepoint_rollback(savepoint)
            return {}
        transaction.savepoint_commit(savepoint)
    return taken


# What the statements that take many cursors at once require of a room: open, and no policy
# to apply per message (every protocol may post, no rate limit). Other rooms are admitted
# one by one under their lock (``_room_admit``).
_OPEN_UNRESTRICTED = " AND NOT closed AND post_allowed = '' AND rate_per_second IS NULL"


@dataclass(frozen=True, slots=True)
class _Admission:
    """What a room's row says of who may post now, read under the room's lock."""

    closed: bool
    post_allowed: str
    rate_per_second: float | None
    rate_burst: int | None
    rate_tokens: float
    rate_at: float

    def may_post(self, protocol: str) -> bool:
        return (protocol == "system" or self.post_allowed == ""
                or f",{protocol}," in self.post_allowed)

    def tokens(self, now: float) -> float:
        """The rate limit's tokens at ``now`` (epoch seconds)."""
        assert self.rate_per_second is not None and self.rate_burst is not None
        refill = max(0.0, now - self.rate_at) * self.rate_per_second
        return min(float(self.rate_burst), self.rate_tokens + refill)


def _room_locked(room: str) -> _Admission | None:
    """The room's admission state, its row locked until the transaction ends (PostgreSQL;
    SQLite's transaction holds the write lock already); None if there is no such room."""
    table = connection.ops.quote_name(Room._meta.db_table)
    lock = " FOR UPDATE" if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT closed, post_allowed, rate_per_second, rate_burst, rate_tokens, rate_at"  # noqa: S608
            f" FROM {table} WHERE name = %s{lock}", [room])
        row = cursor.fetchone()
    return None if row is None else _Admission(bool(row[0]), *row[1:])


def read_only_error(room: str, protocol: str) -> GatewayError:
    return GatewayError("read_only", f"room {room} does not take messages from {protocol}")


def _room_admit(
    room: str, items: list[tuple[int, Post]], now: datetime, results: list[PostResult | None]
) -> tuple[int, int, list[tuple[int, Post]]] | None:
    """Take the room's next cursors for those of ``items`` it admits: ``(room pk, first
    cursor, the items admitted)``; None when none is (each then has its error in
    ``results``). Under the room's lock:

    - a room that does not exist yet is created within the room creation rules, for each
      sender in turn, as one message at a time would be;
    - a closed room admits none (``room_closed``);
    - its policy refuses the senders of protocols that may not post (``read_only``), and
      past its rate limit the rest (``rate_limited``), in order; staff are never refused.
    """
    state = _room_locked(room)
    if state is None:
        for position, (index, post) in enumerate(items):
            try:
                room_get_or_create(room=room, creator=post.sender["id"],
                                   staff=post.sender["protocol"] == "system")
            except GatewayError as exc:
                results[index] = exc
                continue
            items = items[position:]
            break
        else:
            return None
        state = _room_locked(room)
    if state is None or state.closed:
        for index, _ in items:
            results[index] = GatewayError("room_closed", f"room {room} is closed")
        return None
    stamp = now.timestamp()
    limited = state.rate_per_second is not None
    tokens = state.tokens(stamp) if limited else 0.0
    admitted: list[tuple[int, Post]] = []
    for index, post in items:
        protocol = post.sender["protocol"]
        if not state.may_post(protocol):
            results[index] = read_only_error(room, protocol)
        elif limited and protocol != "system" and tokens < 1.0:
            rate = cast(float, state.rate_per_second)
            wait = (1.0 - tokens) / rate
            results[index] = RateLimited(f"room {room} takes {rate:g} messages a second; "
                                         f"retry in {wait:.1f}s", wait)
        else:
            if limited and protocol != "system":
                tokens -= 1.0
            admitted.append((index, post))
    if not admitted:
        return None
    taken = _cursor_take(room, count=len(admitted), activity=now, where=" AND NOT closed",
                         bucket=(tokens, stamp) if limited else None)
    if taken is None:  # cannot happen under the lock; refuse rather than guess
        for index, _ in admitted:
            results[index] = GatewayError("room_closed", f"room {room} is closed")
        return None
    room_pk, last = taken
    return room_pk, last - len(admitted) + 1, admitted


def _messages_by_client_ids(posts: list[Post]) -> dict[tuple[str, str, object], Message]:
    """The stored messages of these posts' client_ids, by (room, sender id, client_id)."""
    keyed = [post for post in posts if post.client_id is not None]
    if not keyed:
        return {}
    rows = Message.objects.filter(
        room__name__in={p.room for p in keyed}, sender_id__in={p.sender["id"] for p in keyed},
        client_id__in={p.client_id for p in keyed},
    ).annotate(room_name=F("room__name"))
    return {(m.room_name, m.sender_id, m.client_id): m for m in rows}


def _senders_blocked(senders: list[events.Sender]) -> set[tuple[str, str, str]]:
    """Which of these senders staff blocked, as ``sender_blocked`` says (the same conditions
    as the single path's ``_unblocked_condition``, names compared by the database's
    ``LOWER``), in one statement: ``(protocol, id, name)`` of each."""
    unique = sorted({(s["protocol"], s["id"], s["name"]) for s in senders})
    if not unique:
        return set()
    quote = connection.ops.quote_name
    devices, blocks = quote(Device._meta.db_table), quote(SenderBlock._meta.db_table)
    values = ", ".join(["(%s, %s, %s, %s)"] * len(unique))
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH s (n, protocol, sender_id, name) AS (VALUES {values}) SELECT s.n FROM s"  # noqa: S608
            f" WHERE EXISTS (SELECT 1 FROM {devices} d WHERE d.device_id = s.sender_id"
            " AND d.protocol = s.protocol AND d.blocked)"
            f" OR EXISTS (SELECT 1 FROM {blocks} b WHERE b.protocol = s.protocol AND"
            " ((b.kind = %s AND b.value = s.sender_id)"
            " OR (b.kind = %s AND LOWER(b.value) = LOWER(s.name))))",
            [*(value for n, sender in enumerate(unique) for value in (n, *sender)),
             SenderBlock.KIND_ID, SenderBlock.KIND_NAME],
        )
        return {unique[n] for (n,) in cursor.fetchall()}


def sender_blocked(sender: events.Sender) -> bool:
    """Whether staff blocked this sender: a device of its protocol switched off, or a block
    of its protocol by its id or display name (a bot's chats are also blocked as chats:
    gateway/chats.py)."""
    protocol = sender["protocol"]
    device = Device.objects.filter(protocol=protocol, device_id=sender["id"], blocked=True)
    blocks = SenderBlock.objects.filter(protocol=protocol).filter(
        Q(kind=SenderBlock.KIND_ID, value=sender["id"])
        | Q(kind=SenderBlock.KIND_NAME, value__iexact=sender["name"])
    )
    return device.exists() or blocks.exists()


def _message_by_client_id(room: str, sender_id: str, client_id: str) -> Message | None:
    return Message.objects.filter(
        room__name=room, sender_id=sender_id, client_id=client_id
    ).first()


def _room_advance(room: str, now: datetime, sender: events.Sender) -> tuple[int, int] | None:
    """Take the room's next message id: ``(room pk, id)``, or None if the room is new, closed,
    has a policy to apply (``_room_admit`` then), or the sender is blocked.

    One ``UPDATE ... RETURNING`` (SQLite 3.35+, PostgreSQL): it takes the room's row lock
    (PostgreSQL) or the write lock (SQLite) until commit, so ids are assigned and committed
    in order, without a separate read. The closed and blocked checks are part of it, so a
    message costs no extra round trip for them.
    """
    unblocked, params = _unblocked_condition(sender)
    return _cursor_take(room, activity=now, where=f"{_OPEN_UNRESTRICTED}{unblocked}",
                        params=params)


def _cursor_take(
    room: str, *, count: int = 1, activity: datetime | None = None, where: str = "",
    params: Sequence[str] = (), bucket: tuple[float, float] | None = None,
) -> tuple[int, int] | None:
    """Take the room's next ``count`` log cursors: ``(room pk, the last of them)``, or None if
    no row matched (the room is new, or ``where`` excluded it). Also records ``activity``
    and the rate limit's ``bucket`` (tokens left, when) when given."""
    table = connection.ops.quote_name(Room._meta.db_table)
    sets = "last_seq = last_seq + %s"
    values: list[object] = [count]
    if activity is not None:
        sets += ", last_activity = %s"
        values.append(connection.ops.adapt_datetimefield_value(activity))
    if bucket is not None:
        sets += ", rate_tokens = %s, rate_at = %s"
        values.extend(bucket)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {sets} WHERE name = %s{where} "  # noqa: S608
            "RETURNING id, last_seq",
            [*values, room, *params],
        )
        return cursor.fetchone()


def _post_allowed_condition(sender: events.Sender) -> tuple[str, list[str]]:
    """SQL (and its parameter) that holds when the room's policy lets the sender's protocol
    post (``Room.post_allowed``: "" for every protocol, else ",web,api,")."""
    escaped = sender["protocol"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return " AND (post_allowed = '' OR post_allowed LIKE %s ESCAPE '\\')", [f"%,{escaped},%"]


def _unblocked_condition(sender: events.Sender) -> tuple[str, list[str]]:
    """SQL (and its parameters) that holds unless staff blocked this sender, as
    ``sender_blocked`` says: two index probes on small tables, whatever the protocol."""
    quote = connection.ops.quote_name
    devices, blocks = quote(Device._meta.db_table), quote(SenderBlock._meta.db_table)
    protocol, sender_id, name = sender["protocol"], sender["id"], sender["name"]
    return (
        f" AND NOT EXISTS (SELECT 1 FROM {devices} WHERE device_id = %s AND protocol = %s"
        " AND blocked)"
        f" AND NOT EXISTS (SELECT 1 FROM {blocks} WHERE protocol = %s AND ((kind = %s AND"
        " value = %s) OR (kind = %s AND LOWER(value) = LOWER(%s))))",
        [sender_id, protocol, protocol, SenderBlock.KIND_ID, sender_id, SenderBlock.KIND_NAME,
         name],
    )


def _message_insert(
    room: str, text: str, sender: events.Sender, origin: str, client_id: str | None,
    reply: events.ReplyRef | None = None, attachments: list[events.Attachment] | None = None,
) -> events.RoomMessage:
    """Take the room's next id and insert the message (the single path): its event."""
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    advanced = _room_advance(room, now, sender)
    if advanced is None:  # why not: only now is it worth a query
        if sender_blocked(sender):
            raise GatewayError("blocked", "staff blocked this sender; the message was dropped")
        results: list[PostResult | None] = [None]
        post = Post(room=room, text=text, sender=sender, origin=origin, client_id=client_id)
        admitted = _room_admit(room, [(0, post)], now, results)
        if admitted is None:
            raise cast(GatewayError, results[0])
        advanced = (admitted[0], admitted[1])
    room_pk, seq = advanced
    if reply is not None:  # read again under the room's lock: as it is now (edited, deleted)
        answered = (room, reply["id"])
        found = _reply_targets([answered])[answered]
        if isinstance(found, GatewayError):
            raise found
        reply = found
    name = sender["name"][:128]
    _messages_insert([(room_pk, seq, text, sender["protocol"], sender["id"], name, origin,
                       client_id, connection.ops.adapt_datetimefield_value(now),
                       None if reply is None else reply["id"],
                       _attachments_column(attachments or ()))])
    if attachments:
        files.attachments_link([(room, seq, item["id"]) for item in attachments])
    return events.room_message(
        id=seq, room=room, text=text, ts=now.timestamp(), origin=origin, client_id=client_id,
        sender=events.sender(protocol=sender["protocol"], id=sender["id"], name=name),
        reply_to=reply, attachments=attachments,
    )


def lease_acquire(*, name: str, holder: str, ttl: float) -> tuple[bool, datetime | None]:
    """Take or renew a lease: whether ``holder`` now holds it for ``ttl`` seconds, and, when
    it has just taken it over, when the lease had expired (None: it held it already, or
    nobody ever held it), which tells how long the role went without a holder."""
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    expires = datetime.fromtimestamp(time.time() + ttl, tz=UTC)
    previous = (Lease.objects.filter(name=name).exclude(holder=holder)
                .values_list("expires_at", flat=True).first())
    taken = Lease.objects.filter(
        Q(holder=holder) | Q(expires_at__lt=now), name=name
    ).update(holder=holder, expires_at=expires)
    if taken:
        return True, previous
    try:
        with transaction.atomic():
            Lease.objects.create(name=name, holder=holder, expires_at=expires)
    except IntegrityError:
        return False, None  # someone else holds it
    return True, None


def lease_release(*, name: str, holder: str) -> None:
    """Hand a lease over now: it expires at once (the row stays, so whoever takes it next
    knows when the role was last held)."""
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    Lease.objects.filter(name=name, holder=holder).update(expires_at=now)


# --- the relay's positions (gateway/relay.py) -------------------------------------------------

_ROOMS_PER_QUERY = 500  # rooms named in one IN (...): within every backend's parameter limit


def relay_targets_open(
    *, relay: str, targets: QuerySet, rooms: Sequence[str], from_start: bool
) -> dict[str, dict[str, int]]:
    """The targets of the relay role ``relay`` in ``rooms`` (``targets``: the role's rows with
    ``room`` and ``target``), each with its position. A target without one is given one now:
    0 with ``from_start`` (a room new to the role is delivered from its first entry), else
    its room's newest cursor (from now on)."""
    found: dict[str, dict[str, int]] = {room: {} for room in rooms}
    for start in range(0, len(rooms), _ROOMS_PER_QUERY):
        chunk = list(rooms[start:start + _ROOMS_PER_QUERY])
        pairs = set(targets.filter(room__in=chunk).values_list("room", "target"))
        known = _relay_positions(relay, chunk)
        missing = pairs - known.keys()
        if missing:
            heads = {} if from_start else dict(
                Room.objects.filter(name__in={room for room, _ in missing})
                .values_list("name", "last_seq"))
            RelayCursor.objects.bulk_create(
                [RelayCursor(relay=relay, room=room, target=target, last_seq=heads.get(room, 0))
                 for room, target in sorted(missing)],
                ignore_conflicts=True,  # another writer placed it first: its place stands
            )
            known = _relay_positions(relay, chunk)
        for room, target in pairs:
            found[room][target] = known[(room, target)]
    return found


def _relay_positions(relay: str, rooms: list[str]) -> dict[tuple[str, str], int]:
    rows = RelayCursor.objects.filter(relay=relay, room__in=rooms)
    return {(room, target): seq for room, target, seq in
            rows.values_list("room", "target", "last_seq")}


def relay_targets_init(*, relay: str, targets: QuerySet) -> int:
    """A process takes the relay role ``relay`` over: every target without a position (it was
    never delivered while the role ran, for instance MQTT was off) starts from now, at its
    room's newest cursor. Returns how many were placed."""
    known = RelayCursor.objects.filter(
        relay=relay, room=OuterRef("room"), target=OuterRef("target")
    )
    missing = targets.annotate(known=Exists(known)).filter(known=False)
    if "head" not in targets.query.annotations:
        head = Room.objects.filter(name=OuterRef("room")).values("last_seq")[:1]
        missing = missing.annotate(head=Subquery(head))
    rows = [RelayCursor(relay=relay, room=room, target=target, last_seq=seq or 0)
            for room, target, seq in missing.values_list("room", "target", "head")]
    RelayCursor.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
    return len(rows)


def relay_positions_save(*, relay: str, positions: dict[tuple[str, str], int]) -> None:
    """Record how far the role ``relay`` has delivered each ``(room, target)``: only forward,
    and only for targets that still have a position (one that left its room is not brought
    back by a late save)."""
    with transaction.atomic():
        for (room, target), seq in positions.items():
            RelayCursor.objects.filter(
                relay=relay, room=room, target=target, last_seq__lt=seq
            ).update(last_seq=seq)


def relay_target_place(*, relay: str, room: str, target: str, position: int) -> None:
    """A target joins ``room`` (a chat's /join): it is delivered what follows ``position``."""
    RelayCursor.objects.update_or_create(
        relay=relay, room=room, target=target, defaults={"last_seq": position}
    )


def relay_target_remove(*, relay: str, target: str, room: str | None = None) -> None:
    """A target leaves ``room`` (or every room): its position goes with it."""
    rows = RelayCursor.objects.filter(relay=relay, target=target)
    if room is not None:
        rows = rows.filter(room=room)
    rows.delete()


# --- staff actions (admin, dashboard) -------------------------------------------------------


def messages_delete(
    *, messages: list[tuple[str, int]], by: events.Sender = SYSTEM_SENDER
) -> int:
    """Staff delete stored messages by ``(room, id)`` (``message_delete`` for each). Returns
    how many were deleted (one already deleted, or never stored, counts nothing)."""
    deleted = 0
    for room, seq in messages:
        try:
            message_delete(room=room, id=seq, sender=by, staff=True, origin="")
        except GatewayError as exc:
            if exc.code not in ("not_found", "deleted"):
                raise
        else:
            deleted += 1
    return deleted


# --- what happens to a stored message: edits, deletes, reactions ----------------------------
#
# Each is an entry of the room's log (a RoomEvent at the room's next cursor), stored with the
# message's new state in one transaction that first takes the room's cursor: every change to
# a room's messages holds the room's row lock (PostgreSQL) or the write lock (SQLite), so
# they are applied, and reach every member, in one order.

_UNCHANGED = object()  # what a change returns when there is nothing to record


def message_edit(
    *, room: str, id: object, text: object, sender: events.Sender, staff: bool, origin: str,
    client_id: object = None,
) -> tuple[events.RoomEntry | None, bool]:
    """Replace the text of message ``id`` (its author, or staff). Returns the edit entry and
    whether it was recorded now (False: its ``client_id`` was seen before, or the text is
    the same, then without an entry). The replaced text is kept for staff only
    (``MessageRevision``). GatewayError: ``not_found``, ``deleted``, ``forbidden``, the text
    rules, ``room_closed``, ``blocked``."""
    new_text = message_text_validate(text)

    def change(message: Message, now: datetime, by: events.Sender) -> object:
        if message.text == new_text:
            return _UNCHANGED
        MessageRevision.objects.create(
            message=message, text=message.text, replaced_at=now, by_protocol=by["protocol"],
            by_id=by["id"], by_name=by["name"][:128])
        Message.objects.filter(pk=message.pk).update(text=new_text, edited_at=now)
        return {"text": new_text}

    return _message_change(RoomEvent.KIND_EDIT, room=room, id=id, sender=sender, staff=staff,
                           origin=origin, client_id=client_id, author_only=True, change=change)


def message_delete(
    *, room: str, id: object, sender: events.Sender, staff: bool, origin: str,
    client_id: object = None,
) -> tuple[events.RoomEntry | None, bool]:
    """Delete message ``id`` (its author, or staff): it becomes a tombstone (its text, edit
    history, reactions and files erased; its place in the log kept) and the room's log gets a delete
    entry, which reaches every member, now or when it resumes. GatewayError as for
    ``message_edit``."""

    def change(message: Message, now: datetime, by: events.Sender) -> object:
        Message.objects.filter(pk=message.pk).update(text="", deleted_at=now, reactions=None,
                                                     attachments=None)
        files.attachments_gone(room=room, seqs=[message.seq])
        MessageRevision.objects.filter(message=message).delete()
        Reaction.objects.filter(room_id=message.room_id, seq=message.seq).delete()
        return {}

    return _message_change(RoomEvent.KIND_DELETE, room=room, id=id, sender=sender,
                           staff=staff, origin=origin, client_id=client_id, author_only=True,
                           change=change)


def emoji_validate(emoji: object) -> str:
    """A reaction: one emoji (as Unicode's emoji data has it: a pictograph with its
    modifiers, a ZWJ sequence, a flag, a keycap; the ``emoji`` library knows them) or a
    short token (``[A-Za-z0-9_+-]``, 1-32 characters, for platforms without emoji);
    ``invalid_emoji`` otherwise."""
    if isinstance(emoji, str) and (_TOKEN_RE.fullmatch(emoji) or emoji_data.is_emoji(emoji)):
        return emoji
    raise GatewayError("invalid_emoji", "'emoji' must be one emoji or a short token "
                       "(letters, digits, _ + -, at most 32)")


_TOKEN_RE = re.compile(r"[A-Za-z0-9_+\-]{1,32}")


def message_react(
    *, room: str, id: object, emoji: object, sender: events.Sender, origin: str,
    client_id: object = None, added: bool | None = None,
) -> tuple[events.RoomEntry | None, bool]:
    """Toggle the sender's reaction ``emoji`` on message ``id`` (``added`` True or False:
    set it so, recording nothing when it already is). Anyone in the room may react; a
    message holds at most ``GATEWAY_MAX_REACTIONS`` different emoji (``invalid_emoji``
    beyond). The entry says whether it was added and how many senders have it now."""
    emoji = emoji_validate(emoji)

    def change(message: Message, now: datetime, by: events.Sender) -> object:
        mine = Reaction.objects.filter(room_id=message.room_id, seq=message.seq, emoji=emoji,
                                       sender_protocol=by["protocol"], sender_id=by["id"])
        had = mine.exists()
        want = not had if added is None else added
        if want == had:
            return _UNCHANGED
        counts = dict(message.reactions or {})
        if want:
            most = settings.GATEWAY["MAX_REACTIONS"]
            if emoji not in counts and len(counts) >= most:
                raise GatewayError("invalid_emoji",
                                   f"a message holds at most {most} different reactions")
            Reaction.objects.create(room_id=message.room_id, seq=message.seq, emoji=emoji,
                                    sender_protocol=by["protocol"], sender_id=by["id"],
                                    sender_name=by["name"][:128], created_at=now)
            counts[emoji] = counts.get(emoji, 0) + 1
        else:
            mine.delete()
            counts[emoji] = counts.get(emoji, 1) - 1
            if counts[emoji] <= 0:
                del counts[emoji]
        Message.objects.filter(pk=message.pk).update(reactions=counts or None)
        return {"emoji": emoji, "added": want, "count": counts.get(emoji, 0)}

    return _message_change(RoomEvent.KIND_REACTION, room=room, id=id, sender=sender,
                           staff=False, origin=origin, client_id=client_id, author_only=False,
                           change=change)


# The changes a client may ask for (``type`` of its frame or payload), and the fields each
# needs besides it (``client_id`` is optional), as every protocol takes them.
MESSAGE_CHANGES: dict[str, tuple[str, ...]] = {
    "edit": ("id", "message"), "delete": ("id",), "react": ("id", "emoji"),
}


def message_change(
    kind: str, *, room: str, id: object, sender: events.Sender, origin: str, staff: bool,
    client_id: object = None, text: object = None, emoji: object = None, added: object = None,
) -> tuple[events.RoomEntry | None, bool]:
    """The change ``kind`` (one of ``MESSAGE_CHANGES``) as a client asked for it: edit,
    delete or react (toggled, or with ``added`` set so: a client that does not know whether
    its sender has that reaction says what it wants)."""
    if kind == "edit":
        return message_edit(room=room, id=id, text=text, sender=sender, staff=staff,
                            origin=origin, client_id=client_id)
    if kind == "delete":
        return message_delete(room=room, id=id, sender=sender, staff=staff, origin=origin,
                              client_id=client_id)
    if kind == "react":
        if added is not None and not isinstance(added, bool):
            raise GatewayError("invalid_added", "'added' must be true or false")
        return message_react(room=room, id=id, emoji=emoji, sender=sender, origin=origin,
                             client_id=client_id, added=added)
    raise GatewayError("unknown_type", f"unknown change {kind[:32]!r}")


def _message_change(
    kind: str, *, room: str, id: object, sender: events.Sender, staff: bool, origin: str,
    client_id: object, author_only: bool,
    change: Callable[[Message, datetime, events.Sender], object],
) -> tuple[events.RoomEntry | None, bool]:
    """The one way a stored message changes: checks, the room's cursor, the change, the log
    entry, its broadcast on commit (see above)."""
    room = room_name_validate(room)
    seq = message_id_validate(id)
    key = client_id_validate(client_id)
    staff = staff or sender["protocol"] == "system"
    shown = display_name_for(sender_id=sender["id"], protocol=sender["protocol"],
                             name=sender["name"])
    by = events.sender(protocol=sender["protocol"], id=sender["id"], name=shown)
    if key is not None and (done := _entry_by_client_id(room, by["id"], key)) is not None:
        return done, False
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    try:
        with transaction.atomic():
            unblocked, params = _unblocked_condition(by)
            allowed, allowed_params = ("", []) if staff else _post_allowed_condition(by)
            closed = "" if staff else " AND NOT closed"
            taken = _cursor_take(room, where=closed + unblocked + allowed,
                                 params=[*params, *allowed_params])
            message = Message.objects.filter(room__name=room, seq=seq).first()
            if message is None:
                raise GatewayError("not_found", f"no message {seq} in room {room}")
            if taken is None:
                if sender_blocked(by):
                    raise GatewayError("blocked", "staff blocked this sender")
                state = _room_locked(room)
                if state is not None and not state.closed:
                    raise read_only_error(room, by["protocol"])
                raise GatewayError("room_closed", f"room {room} is closed")
            if message.deleted_at is not None:
                raise GatewayError("deleted", f"message {seq} was deleted")
            if author_only and not staff and (message.sender_protocol, message.sender_id) != (
                    by["protocol"], by["id"]):
                raise GatewayError("forbidden", "only its author or staff may do that")
            fields = change(message, now, by)
            if fields is _UNCHANGED:
                transaction.set_rollback(True)  # the cursor taken is given back
                return None, False
            data = cast(dict, fields)
            room_pk, cursor = taken
            entry = RoomEvent.objects.create(
                room_id=room_pk, seq=cursor, kind=kind, target=seq, created_at=now,
                sender_protocol=by["protocol"], sender_id=by["id"],
                sender_name=by["name"][:128], origin=origin[:128], client_id=key,
                emoji=data.get("emoji", ""), added=data.get("added"),
            )
            event = entry_event(entry, room=room, text=data.get("text"),
                                count=data.get("count"))
            room_event_broadcast_on_commit(event)
    except IntegrityError:
        # The same client_id won a race in another process: answer with its entry.
        done = _entry_by_client_id(room, by["id"], key) if key is not None else None
        if done is None:
            raise
        return done, False
    return event, True


def _entry_by_client_id(room: str, sender_id: str, client_id: str) -> events.RoomEntry | None:
    entry = RoomEvent.objects.filter(room__name=room, sender_id=sender_id,
                                     client_id=client_id).first()
    if entry is None:
        return None
    text, count = _entry_state(entry)
    return entry_event(entry, room=room, text=text, count=count)


def _entry_state(entry: RoomEvent) -> tuple[str | None, int | None]:
    """What an edit or a reaction entry shows of its message now: the text, the count."""
    if entry.kind not in (RoomEvent.KIND_EDIT, RoomEvent.KIND_REACTION):
        return None, None
    row = Message.objects.filter(room_id=entry.room_id, seq=entry.target).values_list(
        "text", "reactions").first()
    if row is None:
        return None, None
    text, reactions = row
    if entry.kind == RoomEvent.KIND_EDIT:
        return text, None
    return None, (reactions or {}).get(entry.emoji, 0)


def room_close(*, room: str, by: events.Sender = SYSTEM_SENDER) -> None:
    """Close a room: its members are disconnected and nobody can post until it reopens (a
    close entry in its log; closing a closed room changes nothing)."""
    with transaction.atomic():
        room_get_or_create(room=room)
        if Room.objects.filter(name=room, closed=False).update(closed=True):
            _log_append(room, RoomEvent.KIND_CLOSE, by)


def room_reopen(*, room: str, by: events.Sender = SYSTEM_SENDER) -> None:
    """Reopen a closed room (a reopen entry in its log)."""
    room = room_name_validate(room)
    with transaction.atomic():
        if Room.objects.filter(name=room, closed=True).update(closed=False):
            _log_append(room, RoomEvent.KIND_REOPEN, by)


def _log_append(room: str, kind: str, by: events.Sender,
                data: dict | None = None) -> events.RoomEntry:
    """Append an entry of the room itself (close, reopen, policy) to its log, at its next
    cursor, and broadcast it once committed. Call it inside a transaction."""
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    taken = _cursor_take(room)
    if taken is None:  # callers hold the room's row: it exists
        raise GatewayError("room_not_found", f"no room {room}")
    room_pk, seq = taken
    entry = RoomEvent.objects.create(
        room_id=room_pk, seq=seq, kind=kind, sender_protocol=by["protocol"],
        sender_id=by["id"], sender_name=by["name"][:128], created_at=now, data=data,
    )
    event = entry_event(entry, room=room)
    room_event_broadcast_on_commit(event)
    return event


NOTICE_LABELS = {"telegram": "Telegram chat", "mqtt": "device"}


def room_member_notice(
    *, room: str, member: events.Sender, joined: bool, origin: str
) -> events.RoomMessage | None:
    """Announce in the room that a chat or a device came or went, when the room's policy
    asks (``notices``): a message from the system, from ``origin`` (the member's own scope
    or chat is not sent it). Said once per change, however many replicas see it: each
    notice's ``client_id`` names the member, what it says and the notice before it, so
    two processes announcing the same arrival store one message, and a member is not
    announced as gone unless it was as come. Returns the notice, or None."""
    policy = room_policy_get(room=room)
    if policy is None or not policy.notices:
        return None
    key = hashlib.sha256(f"{member['protocol']}:{member['id']}".encode()).hexdigest()[:16]
    prefix = f"notice:{key}:"
    last = (Message.objects.filter(room__name=room, sender_id=SYSTEM_SENDER["id"],
                                   client_id__startswith=prefix)
            .order_by("-seq").values_list("seq", "client_id").first())
    said = "joined" if joined else "left"
    if (last[1].split(":")[2] if last else "left") == said:
        return None  # said already (by another process, or nothing to say)
    label = NOTICE_LABELS.get(member["protocol"], member["protocol"])
    text = f"{label} {member['name']} {'joined' if joined else 'left'} the room"
    client_id = f"{prefix}{said}:{last[0] if last else 0}"
    event, created = room_message_post(room=room, text=text, sender=SYSTEM_SENDER,
                                       origin=origin, client_id=client_id)
    return event if created else None


def room_policy_get(*, room: str) -> Policy | None:
    """The room's policy (None: no such room)."""
    found = Room.objects.filter(name=room_name_validate(room)).values(*POLICY_FIELDS).first()
    return None if found is None else policy_from_columns(**found)


def room_policy_set(
    *, room: str, policy: Policy, by: events.Sender = SYSTEM_SENDER,
) -> tuple[Policy, events.RoomEntry | None]:
    """Give the room (created if new: staff may) this policy, applied live: a ``policy``
    entry in its log from which every process applies it, in room order. A protocol it now
    reaches again starts from now (its relay roles' targets in the room are placed at the
    entry), not with what it missed. Returns the policy and its entry (None: it was that
    already)."""
    relay_roles = adapters_relay_roles()
    room = room_name_validate(room)
    with transaction.atomic():
        room_get_or_create(room=room)
        row = Room.objects.select_for_update().get(name=room)
        before = policy_from_columns(**{name: getattr(row, name) for name in POLICY_FIELDS})
        if before == policy:
            return before, None
        fields = policy_columns(policy)
        if (policy.rate_per_second, policy.rate_burst) != (before.rate_per_second,
                                                          before.rate_burst):
            fields.update(rate_tokens=float(policy.rate_burst or 0), rate_at=time.time())
        Room.objects.filter(pk=row.pk).update(**fields)
        entry = _log_append(room, RoomEvent.KIND_POLICY, by, data=policy.public())
        roles = [role for protocol, names in relay_roles.items() for role in names
                 if policy.receives(protocol) and not before.receives(protocol)]
        if roles:
            RelayCursor.objects.filter(relay__in=roles, room=room).update(
                last_seq=entry["cursor"])
    return policy, entry


# --- retention: the log's horizon ---------------------------------------------------------------

PRUNE_CHUNK = 1000  # cursors pruned by one transaction


def room_retention(*, days: int | None, messages: int | None) -> tuple[int | None, int | None]:
    """The retention that applies to a room with this policy: its own, else the gateway's
    (``GATEWAY_RETENTION_*``); None for each rule that keeps everything (0 in the policy)."""
    default = settings.GATEWAY
    days = default["RETENTION_DAYS"] if days is None else days
    messages = default["RETENTION_MESSAGES"] if messages is None else messages
    return days or None, messages or None


def room_horizon_due(*, room: str, now: float) -> int:
    """The cursor the room's log may be pruned up to now (its current horizon if nothing
    more): the last message older than its retention's days, or the one before its newest
    ``messages``, whichever is later."""
    row = Room.objects.filter(name=room).values_list(
        "pk", "horizon", "retention_days", "retention_messages").first()
    if row is None:
        return 0
    room_pk, horizon, days, messages = row
    days, messages = room_retention(days=days, messages=messages)
    due = horizon
    if messages is not None:
        beyond = (Message.objects.filter(room_id=room_pk).order_by("-seq")
                  .values_list("seq", flat=True)[messages:messages + 1])
        due = max(due, next(iter(beyond), 0))
    if days is not None:
        cutoff = datetime.fromtimestamp(now - days * 86_400, tz=UTC)
        # Forward from the horizon on the (room, seq) index, reading only what goes (and
        # one more): cursors are taken in time order.
        older = (Message.objects.filter(room_id=room_pk, seq__gt=due, created_at__lt=cutoff)
                 .order_by("-seq").values_list("seq", flat=True)[:1])
        due = max(due, next(iter(older), 0))
    return due


def room_prune(*, room: str, upto: int) -> tuple[int, int]:
    """Remove the room's log after its horizon up to the cursor ``upto``, at most
    ``PRUNE_CHUNK`` cursors of it in one transaction (messages with their reactions, edit
    histories and places in bot chats; the other entries), and move its horizon there, only
    forward. Returns how many entries went and the horizon now: call again until it is
    ``upto``."""
    with transaction.atomic():
        room_pk, horizon = Room.objects.filter(name=room).values_list("pk", "horizon").get()
        if horizon >= upto:
            return 0, horizon
        step = min(upto, horizon + PRUNE_CHUNK)
        window = {"room_id": room_pk, "seq__gt": horizon, "seq__lte": step}
        Reaction.objects.filter(**window).delete()
        MessageRevision.objects.filter(message__room_id=room_pk, message__seq__gt=horizon,
                                       message__seq__lte=step).delete()
        BotMessage.objects.filter(room=room, seq__gt=horizon, seq__lte=step).delete()
        files.attachments_gone(room=room, after=horizon, upto=step)
        removed = (Message.objects.filter(**window).delete()[0]
                   + RoomEvent.objects.filter(**window).delete()[0])
        Room.objects.filter(pk=room_pk, horizon__lt=step).update(horizon=step)
    if removed:
        metrics.RETENTION_PRUNED.inc(removed)
    return removed, step


def device_seen(*, device_id: str, protocol: str, room: str) -> None:
    """Record that a device (a sender of ``protocol``) was active in a room."""
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    device, created = Device.objects.get_or_create(
        device_id=device_id, defaults={"last_seen": now, "rooms": [room], "protocol": protocol}
    )
    if not created:
        device.last_seen = now
        if room not in device.rooms:
            device.rooms = [*device.rooms, room]
        device.save(update_fields=["last_seen", "rooms"])
