"""The room domain: rooms, their log (messages and every other entry), and the live processes
that hold members.

A room's log is one ordered sequence with one cursor (``Room.last_seq``): every entry takes the
room's next cursor in the transaction that stores it. Messages, the common case, are rows of
``Message`` (their id is their cursor) and keep their current state (a deleted one stays as a
tombstone, its text gone, so the log has no holes); every other kind of entry (a delete, a
close, a reopen, later edits and reactions) is a row of ``RoomEvent``. Reading the log after a
cursor reads both, merged by cursor (gateway/selectors.py ``room_log_after``)."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q


class Room(models.Model):
    name = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # The cursor of the room's newest log entry (a message's id is its cursor); incremented
    # under the row lock, so cursors are gap-free per room and commits happen in their order.
    last_seq = models.BigIntegerField(default=0, verbose_name="last cursor")
    last_activity = models.DateTimeField(null=True, blank=True)
    # Closed by staff: refuses new messages and members until reopened.
    closed = models.BooleanField(default=False)
    # Its policy (gateway/policy.py), written only by services.room_policy_set. What the
    # statement that takes a cursor checks is kept in columns (the sender protocols that may
    # post, the rate limit and its bucket); the rest is ``policy`` (how senders are shown to
    # other protocols, join/leave notices). "" = every protocol; else ",web,api," (","
    # alone: none).
    post_allowed = models.CharField(max_length=200, blank=True, default="")
    receive_allowed = models.CharField(max_length=200, blank=True, default="")
    policy = models.JSONField(default=dict, blank=True)
    # The room's message rate limit (None: none), a token bucket kept in the row and spent by
    # the same UPDATE that takes the cursors, so every replica shares it.
    rate_per_second = models.FloatField(null=True, blank=True)
    rate_burst = models.PositiveIntegerField(null=True, blank=True)
    rate_tokens = models.FloatField(default=0.0)
    rate_at = models.FloatField(default=0.0, help_text="Epoch seconds of the bucket's last spend")
    # Retention (None: the gateway's default, GATEWAY_RETENTION_*; 0: forever).
    retention_days = models.PositiveIntegerField(null=True, blank=True)
    retention_messages = models.PositiveIntegerField(null=True, blank=True)
    # Entries with a cursor up to the horizon were pruned: the first available is horizon + 1.
    horizon = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.BigIntegerField(help_text="Message id, monotonic per room")
    text = models.TextField()
    sender_protocol = models.CharField(max_length=16)
    sender_id = models.CharField(max_length=128)
    sender_name = models.CharField(max_length=128)
    origin = models.CharField(max_length=128, help_text="The scope the message came from")
    # NULL, not "", means "no key": the uniqueness constraint below covers only real keys.
    client_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(db_index=True)  # the dashboard's hour, admin filters
    # Deleted by staff: a tombstone, its text erased, its place in the log kept; the delete
    # itself is the log entry (a RoomEvent) that follows.
    deleted_at = models.DateTimeField(null=True, blank=True)
    # The message it answers (its id in the same room), if any.
    reply_to = models.BigIntegerField(null=True, blank=True)
    # Its current state: when its text was last replaced (the texts it replaced are its
    # MessageRevisions, for staff only), and how many senders reacted with each emoji
    # (kept with the row, under the room's lock, so history reads no other table; who
    # reacted is in Reaction). None: never edited, no reaction yet.
    edited_at = models.DateTimeField(null=True, blank=True)
    reactions = models.JSONField(null=True, blank=True)
    # The files it carries, as the log shows them (events.Attachment: id, name, type, size,
    # image size, thumbnail), so history reads no other table; the files and where they are
    # kept are its Attachments. None: none (or deleted).
    attachments = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_room_seq_unique"),
            models.UniqueConstraint(
                fields=["room", "sender_id", "client_id"],
                condition=Q(client_id__isnull=False),
                name="message_client_id_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room_id}#{self.seq} {self.sender_name}: {self.text[:40]}"


class RoomEvent(models.Model):
    """A log entry that is not a message: what happened to the room or to one of its
    messages, at its own cursor in the room's sequence."""

    KIND_DELETE = "delete"
    KIND_CLOSE = "close"
    KIND_REOPEN = "reopen"
    KIND_EDIT = "edit"
    KIND_REACTION = "reaction"
    KIND_POLICY = "policy"
    KINDS = [(KIND_DELETE, "message deleted"), (KIND_CLOSE, "room closed"),
             (KIND_REOPEN, "room reopened"), (KIND_EDIT, "message edited"),
             (KIND_REACTION, "reaction"), (KIND_POLICY, "policy changed")]

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="log_events")
    seq = models.BigIntegerField(help_text="Cursor in the room's log")
    kind = models.CharField(max_length=16, choices=KINDS)
    target = models.BigIntegerField(null=True, blank=True, help_text="The message it concerns")
    sender_protocol = models.CharField(max_length=16)
    sender_id = models.CharField(max_length=128)
    sender_name = models.CharField(max_length=128)
    created_at = models.DateTimeField()
    # A reaction's emoji, and whether it was added (else taken back). An edit keeps no text
    # here: the log is read with the message's current text (gateway/selectors.py).
    emoji = models.CharField(max_length=64, blank=True, default="")
    added = models.BooleanField(null=True, blank=True)
    origin = models.CharField(max_length=128, blank=True, default="",
                              help_text="The scope it came from ('' for staff)")
    client_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    # A policy entry: the room's policy from then on (its public form, gateway/policy.py).
    data = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="room_event_room_seq_unique"),
            models.UniqueConstraint(
                fields=["room", "sender_id", "client_id"],
                condition=Q(client_id__isnull=False),
                name="room_event_client_id_unique",
            ),
        ]

    def __str__(self) -> str:
        target = f" #{self.target}" if self.target is not None else ""
        return f"{self.room_id}@{self.seq} {self.kind}{target}"


class Reaction(models.Model):
    """A sender's reaction with one emoji to one message (its counts are on the message)."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="reactions")
    seq = models.BigIntegerField(help_text="The message's id")
    emoji = models.CharField(max_length=64)
    sender_protocol = models.CharField(max_length=16)
    sender_id = models.CharField(max_length=128)
    sender_name = models.CharField(max_length=128)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["room", "seq", "emoji", "sender_protocol", "sender_id"],
                name="reaction_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room_id}#{self.seq} {self.emoji} {self.sender_name}"


class MessageRevision(models.Model):
    """A text an edit replaced: the edit history staff see in the admin (never the API).
    Deleting the message erases its revisions with its text."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="revisions")
    text = models.TextField()
    replaced_at = models.DateTimeField()
    by_protocol = models.CharField(max_length=16)
    by_id = models.CharField(max_length=128)
    by_name = models.CharField(max_length=128)

    class Meta:
        ordering = ["message", "replaced_at", "id"]

    def __str__(self) -> str:
        return f"{self.message_id} before {self.replaced_at:%Y-%m-%d %H:%M:%S}"


class BotMessage(models.Model):
    """Where a room message is in a bot's chat: the platform's message id of the chat's copy
    (``own``: the bot sent it) or of the original the chat sent. Edits, deletes, replies and
    reactions find each other through it, across restarts and replicas."""

    platform = models.CharField(max_length=16)
    chat_id = models.CharField(max_length=64)
    message_id = models.BigIntegerField(help_text="The platform's id of the message")
    room = models.CharField(max_length=64)
    seq = models.BigIntegerField(help_text="The room message's id")
    own = models.BooleanField(default=True, help_text="Sent by the bot (else the original)")
    part = models.PositiveSmallIntegerField(default=0, help_text="Piece of a long message")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["platform", "chat_id", "message_id"],
                                    name="bot_message_unique"),
        ]
        indexes = [models.Index(fields=["platform", "room", "seq"], name="bot_message_room")]

    def __str__(self) -> str:
        return f"{self.platform}:{self.chat_id}/{self.message_id} = {self.room}#{self.seq}"


class GatewayProcess(models.Model):
    """A running gateway process; its heartbeat makes its members count as present."""

    id = models.CharField(max_length=32, primary_key=True)
    hostname = models.CharField(max_length=255)
    pid = models.IntegerField()
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(db_index=True)
    # The process's open scopes: [{"room", "protocol", "id", "name", "scope"}, ...]
    presence = models.JSONField(default=list)
    # How its parts are doing (gateway/status.py): {"web": {"ready": true, ...}, ...}
    status = models.JSONField(default=dict)
    # The last presence change it had published (room.presence ``seq``) when it wrote
    # ``presence``: a hub takes the row over the changes it heard only if it is as new.
    presence_seq = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid}"


class Lease(models.Model):
    """A role that one process at a time may hold (for instance publishing rooms to MQTT)."""

    name = models.CharField(max_length=64, primary_key=True)
    holder = models.CharField(max_length=64)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder}"


class RelayCursor(models.Model):
    """How far the relay (gateway/relay.py) has delivered a room to one target of a role: the
    cursor of the last entry delivered, where delivery resumes after a restart or a takeover.

    A role's targets are its protocol's (an MQTT room topic: one per room, target ""; a
    Telegram chat, by chat id); a row exists once the relay has followed the target, or the
    target joined the room (a chat's /join records where it starts)."""

    relay = models.CharField(max_length=64, help_text="The role (and lease) name")
    room = models.CharField(max_length=64)
    target = models.CharField(max_length=128, blank=True, default="")
    last_seq = models.BigIntegerField(default=0, verbose_name="position")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["relay", "room", "target"],
                                    name="relay_cursor_target_unique"),
        ]

    def __str__(self) -> str:
        target = f"/{self.target}" if self.target else ""
        return f"{self.relay}:{self.room}{target}@{self.last_seq}"


class BotChat(models.Model):
    """A chat with the gateway's bot (on ``platform``, e.g. Telegram) and the room it joined.

    It outlives the chat's scope: a chat keeps receiving its room while nobody writes.
    """

    platform = models.CharField(max_length=16)
    chat_id = models.CharField(max_length=64)
    kind = models.CharField(max_length=16, help_text="private, group, supergroup, ...")
    title = models.CharField(max_length=128, help_text="The group's title or the user's name")
    # How far it has been sent its room is the relay's: RelayCursor(relay=platform, room,
    # target=chat_id), placed when it joins.
    room = models.CharField(max_length=64, blank=True, db_index=True, help_text="'' = none")
    # Display names chosen with /name, by the platform's user id.
    names = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Blocked by staff: the bot ignores the chat and sends it nothing.
    blocked = models.BooleanField(default=False)

    class Meta:
        ordering = ["platform", "chat_id"]
        constraints = [
            models.UniqueConstraint(fields=["platform", "chat_id"], name="bot_chat_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.platform}:{self.chat_id} ({self.title}) in {self.room or '-'}"


class BotUpdate(models.Model):
    """An update from a chat platform that has been handled, so a repeat is not."""

    platform = models.CharField(max_length=16)
    update_id = models.BigIntegerField()
    handled_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["platform", "update_id"], name="bot_update_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.platform}:{self.update_id}"


class Device(models.Model):
    """A device the gateway has seen (a sender of its ``protocol`` that is a machine)."""

    device_id = models.CharField(max_length=64, unique=True)
    protocol = models.CharField(max_length=16, help_text="Its sender protocol (mqtt)")
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField()
    rooms = models.JSONField(default=list, blank=True, help_text="Rooms it has posted to")
    # Blocked by staff: its messages are dropped (not stored, not broadcast).
    blocked = models.BooleanField(default=False)
    # Staff may stop commands to it (its own ACL on the gateway's side): refused as
    # command_not_allowed before anything is published.
    commands = models.BooleanField(default=True, help_text="It takes commands from the rooms")

    class Meta:
        ordering = ["device_id"]

    def __str__(self) -> str:
        return self.device_id


class SenderBlock(models.Model):
    """A sender staff blocked, on one protocol: by sender id (``user:<pk>`` or ``anon:<hash>``
    on the web, a device id, ...) or by display name. Its messages are dropped (not stored,
    not broadcast) and it is told so."""

    KIND_ID = "id"
    KIND_NAME = "name"
    protocol = models.CharField(max_length=16, help_text="The sender's protocol")
    kind = models.CharField(max_length=8, choices=[(KIND_ID, "sender id"), (KIND_NAME, "name")])
    value = models.CharField(max_length=128, help_text="Names match without regard to case")
    note = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["protocol", "kind", "value"],
                                    name="sender_block_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.protocol} {self.kind}: {self.value}"


class ApiKey(models.Model):
    """A key another program uses on the HTTP API (``Authorization: Bearer <key>``), as a
    sender of protocol ``api`` under its name. Only a digest of the key is kept: it is shown
    once, when it is made (gateway/access.py)."""

    SCOPE_READ = "read"
    SCOPE_POST = "post"
    SCOPE_MANAGE = "manage"
    SCOPES = (SCOPE_READ, SCOPE_POST, SCOPE_MANAGE)

    name = models.CharField(max_length=64, help_text="Shown as the sender of what it posts")
    prefix = models.CharField(max_length=16, unique=True,
                              help_text="The key's public part: how lists and logs name it")
    digest = models.CharField(max_length=64, help_text="SHA-256 of the whole key")
    rooms = models.JSONField(default=list, blank=True,
                             help_text="Room names or patterns (* and ?) it may use; none: all")
    scopes = models.JSONField(default=list, help_text="read, post, manage")
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.CharField(max_length=150, blank=True, default="")
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name", "prefix"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"


class Webhook(models.Model):
    """An HTTP endpoint that is POSTed the events of the rooms it follows, in room order,
    signed with its secret (protocols/webhook/). Delivered by the relay's ``webhook`` role:
    its position per room is a RelayCursor (target: the webhook's id)."""

    name = models.CharField(max_length=64)
    url = models.URLField(max_length=2000)
    rooms = models.JSONField(default=list, help_text="Room names or patterns (* and ?)")
    events = models.JSONField(default=list, blank=True, help_text="Event kinds; none: all")
    secret = models.CharField(max_length=128, help_text="whsec_...: shown once")
    # Delivery ids are made from it, so they never repeat across webhooks.
    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.CharField(max_length=150, blank=True, default="")
    # How delivery goes (written by the relay role): failing since the first failure after
    # the last success; paused (and no longer enabled) once failing longer than allowed.
    failing_since = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    last_success_at = models.DateTimeField(null=True, blank=True)
    paused_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name


class WebhookRoom(models.Model):
    """A room a webhook follows (its patterns matched the room's name): the relay's target
    rows for the ``webhook`` role, kept when webhooks change and rooms are created."""

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="subscriptions")
    room = models.CharField(max_length=64)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["webhook", "room"], name="webhook_room_unique"),
        ]
        indexes = [models.Index(fields=["room"], name="webhook_room_room")]

    def __str__(self) -> str:
        return f"{self.webhook_id}:{self.room}"


class Attachment(models.Model):
    """A file a message carries, kept in the ``attachments`` storage (gateway/files.py).

    Made ``pending`` when it is received and checked, before its message is stored; the
    transaction that stores the message makes it ``attached`` (its room and message id). A
    deleted or pruned message makes its files ``gone``; the sweep (gateway/files.py) removes
    gone files, and pending ones whose message never came, from the storage, then their
    rows. A file is served only while attached."""

    PENDING = "pending"
    ATTACHED = "attached"
    GONE = "gone"
    STATES = [(PENDING, "pending"), (ATTACHED, "attached"), (GONE, "gone")]

    key = models.CharField(max_length=32, unique=True, help_text="Its id in URLs and events")
    state = models.CharField(max_length=8, choices=STATES, default=PENDING)
    room = models.CharField(max_length=64)
    seq = models.BigIntegerField(null=True, blank=True, help_text="Its message's id")
    name = models.CharField(max_length=255, help_text="The file name shown (sanitised)")
    content_type = models.CharField(max_length=100, help_text="Read from its bytes")
    size = models.BigIntegerField()
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    file = models.CharField(max_length=255, blank=True, help_text="Its name in the storage")
    thumbnail = models.CharField(max_length=255, blank=True,
                                 help_text="Its thumbnail's name in the storage, if any")
    sender_protocol = models.CharField(max_length=16)
    sender_id = models.CharField(max_length=128)
    created_at = models.DateTimeField()
    changed_at = models.DateTimeField(help_text="When it last changed state")

    class Meta:
        ordering = ["room", "seq", "id"]
        indexes = [
            models.Index(fields=["room", "seq"], name="attachment_room_seq"),
            models.Index(fields=["state", "changed_at"], name="attachment_state"),
        ]

    def __str__(self) -> str:
        return f"{self.room}#{self.seq} {self.name}"


class DeviceRoom(models.Model):
    """A device as a member of a room (gateway/devices.py): its status (from
    ``<prefix>/<room>/status/<device>``: online, offline, or unknown after a silence) and its
    last state (``<prefix>/<room>/state/<device>``: a JSON object or text), each with when it
    changed. Written by one process at a time (the ``mqtt-devices`` lease); no history."""

    ONLINE, OFFLINE, UNKNOWN = "online", "offline", "unknown"
    STATUSES = [(ONLINE, "online"), (OFFLINE, "offline"), (UNKNOWN, "unknown")]

    room = models.CharField(max_length=64)
    device_id = models.CharField(max_length=64)
    status = models.CharField(max_length=8, choices=STATUSES, blank=True, default="")
    status_detail = models.JSONField(null=True, blank=True,
                                     help_text="A JSON status as the device sent it")
    status_at = models.DateTimeField(null=True, blank=True)
    state = models.JSONField(null=True, blank=True, help_text="Its last state (object or text)")
    state_at = models.DateTimeField(null=True, blank=True)
    seen_at = models.DateTimeField(null=True, blank=True,
                                   help_text="When it last published its status or state")

    class Meta:
        ordering = ["room", "device_id"]
        constraints = [
            models.UniqueConstraint(fields=["room", "device_id"], name="device_room_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.device_id} in {self.room}"


class DeviceCommand(models.Model):
    """A command sent to a device from a room (gateway/devices.py): its message in the room,
    then its publication (once: ``sent_at`` is claimed), then its answer or its timeout
    (once: ``state`` leaves ``pending`` under a condition)."""

    PENDING, ANSWERED, EXPIRED = "pending", "answered", "expired"
    STATES = [(PENDING, "pending"), (ANSWERED, "answered"), (EXPIRED, "expired")]

    key = models.CharField(max_length=32, unique=True, help_text="Its correlation id")
    room = models.CharField(max_length=64)
    device_id = models.CharField(max_length=64)
    seq = models.BigIntegerField(help_text="Its message's id in the room")
    command = models.TextField()
    sender = models.JSONField(help_text="Who sent it")
    state = models.CharField(max_length=8, choices=STATES, default=PENDING)
    created_at = models.DateTimeField()
    deadline = models.DateTimeField(help_text="No answer by then: a timeout notice")
    sent_at = models.DateTimeField(null=True, blank=True)
    answered_seq = models.BigIntegerField(null=True, blank=True,
                                          help_text="The answer's (or the notice's) id")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["state", "deadline"], name="device_command_due"),
        ]

    def __str__(self) -> str:
        return f"{self.room}#{self.seq} -> {self.device_id}"
