"""What a webhook is POSTed: one room log entry per request, as the public JSON every other
protocol gets.

=========== ============================================================================
kind        body
=========== ============================================================================
message     ``{"type": "message", "id", "room", "message", "sender", "ts", "client_id",
            "reply_to", "edited_at", "reactions", "attachments", "cursor"}``
            (files.message_public: the files with their signed URLs)
edit        ``{"type": "edit", "id", "room", "cursor", "sender", "message", "edited_at",
            "client_id"}`` (events.entry_public, as for the deletes and reactions)
delete      ``{"type": "delete", "id", "room", "cursor", "sender", "ts", "client_id"}``
reaction    ``{"type": "reaction", "id", "room", "cursor", "sender", "emoji", "added",
            "count", "client_id"}``
closed      ``{"type": "closed", "room", "id": null, "cursor"}`` (events.entry_brief)
reopened    ``{"type": "reopened", "room", "id": null, "cursor"}``
policy      ``{"type": "policy", "room", "cursor", "ts", "policy"}`` (events.policy_public)
=========== ============================================================================

A webhook's ``events`` names the kinds it wants (none: all). Senders' names are shown as
the room's policy says for the ``webhook`` target (its ``name_format``).
"""

from __future__ import annotations

import json
from typing import Any, cast

from gateway import events, files
from gateway.policy import Policy
from gateway.webhooks import PROTOCOL

MESSAGE = "message"
_ENTRY_KINDS = {
    events.ENTRY_EDIT: "edit",
    events.ENTRY_DELETE: "delete",
    events.ENTRY_REACTION: "reaction",
    events.ENTRY_CLOSE: "closed",
    events.ENTRY_REOPEN: "reopened",
    events.ENTRY_POLICY: "policy",
}
KINDS = (MESSAGE, *_ENTRY_KINDS.values())  # the same as EVENT_KINDS (tests hold them so)


def kind(event: events.LogEntry) -> str | None:
    """The webhook event kind of a log entry (None: one webhooks do not carry)."""
    if event["type"] == events.ROOM_MESSAGE:
        return MESSAGE
    return _ENTRY_KINDS.get(cast(events.RoomEntry, event)["kind"])


def frame_name(policy: Policy) -> str:
    """The name a body is cached under (``Delivery.frame``): one per name format, so every
    webhook of a room shares one encoding of each entry."""
    return f"webhook-json:{policy.name_format.get(PROTOCOL, '')}"


def body(event: events.LogEntry, *, policy: Policy, room: str) -> bytes | None:
    """The request body for a log entry (compact JSON, UTF-8), None for one not carried."""
    payload = _payload(event, policy=policy, room=room)
    if payload is None:
        return None
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _payload(event: events.LogEntry, *, policy: Policy, room: str) -> dict[str, Any] | None:
    if event["type"] == events.ROOM_MESSAGE:
        message = cast(events.RoomMessage, event)
        return {"type": MESSAGE, **files.message_public(message),
                "sender": _shown(message["sender"], policy, room), "cursor": message["id"]}
    entry = cast(events.RoomEntry, event)
    name = _ENTRY_KINDS.get(entry["kind"])
    if name is None:
        return None
    if entry["kind"] == events.ENTRY_POLICY:
        return events.policy_public(entry)
    if entry["kind"] in events.MESSAGE_ENTRY_KINDS:
        public = events.entry_public(entry)
        if public is not None:
            public["sender"] = _shown(entry["sender"], policy, room)
        return public
    return events.entry_brief(entry, name)


def _shown(sender: events.Sender, policy: Policy, room: str) -> events.Sender:
    return {**sender, "name": policy.name_shown(sender, target=PROTOCOL, room=room)}
