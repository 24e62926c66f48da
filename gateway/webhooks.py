"""Services for webhooks: registering and changing them (validated), the rooms each one
follows, and how its delivery goes. The only writer of ``Webhook`` and ``WebhookRoom``.

A webhook names rooms by patterns; the rooms that match are its ``WebhookRoom`` rows, the
targets of the relay's ``webhook`` role (protocols/webhook/). They are kept as webhooks
change and rooms are created, and each row comes with its delivery position: a room the
webhook starts following is delivered from then on (a new room from its first entry).

Delivery (the relay role) records how it goes: ``failing_since`` is the first failure after
the last success, ``last_error`` the newest failure, ``last_success_at`` the newest success
(to within ``SUCCESS_WRITE_EVERY``). A webhook failing longer than
``settings.WEBHOOK["PAUSE_AFTER"]`` is paused (no longer enabled, ``paused_at`` set); its
positions stay, so enabled again it resumes where it stopped.

Staff and ``manage`` keys register webhooks. URLs are checked here for their shape and
refuse link-local addresses given as IP literals (169.254.0.0/16, fe80::/10: cloud
metadata services); the addresses a host name resolves to are checked at each connection
(protocols/webhook/sender.py ``AddressGuard``: no private network unless
``settings.WEBHOOK["ALLOW_PRIVATE"]``).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import secrets
import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from django.db import transaction
from django.db.models import CharField, DateTimeField, QuerySet, Value
from django.db.models.functions import Cast, Coalesce

from gateway.errors import GatewayError
from gateway.models import RelayCursor, Room, Webhook, WebhookRoom
from gateway.names import (
    display_name_clean,
    room_matches,
    room_patterns_regex,
    room_patterns_validate,
)

logger = logging.getLogger(__name__)

RELAY_ROLE = "webhook"  # the relay role (and lease) that delivers webhooks
PROTOCOL = "webhook"  # its adapter's name: a room policy's "receive" and "name_format" key
# The kinds of event a webhook may ask for (``Webhook.events``; none: all of them).
EVENT_KINDS = ("message", "edit", "delete", "reaction", "closed", "reopened", "policy")
URL_MAX = 2000
NAME_MAX = 64
ERROR_MAX = 500  # characters of ``last_error``
# Secrets as the Standard Webhooks specification has them (protocols/webhook/signing.py).
SECRET_PREFIX = "whsec_"
SECRET_BYTES, SECRET_BYTES_MIN, SECRET_BYTES_MAX = 32, 24, 64
SUCCESS_WRITE_EVERY = 10.0  # seconds: a webhook that delivers records it at most this often
STATE_ACTIVE, STATE_FAILING, STATE_PAUSED, STATE_DISABLED = (
    "active", "failing", "paused", "disabled")
CHANGEABLE = ("name", "url", "rooms", "events", "enabled")


def _now() -> datetime:
    return datetime.now(UTC)


# --- what a webhook may be --------------------------------------------------------------------


def webhook_name_validate(name: object) -> str:
    """A webhook's name, cleaned (1 to 64 characters); GatewayError ``invalid_name``."""
    cleaned = display_name_clean(name) if isinstance(name, str) else ""
    if not cleaned:
        raise GatewayError("invalid_name", f"a webhook needs a name (1-{NAME_MAX} characters)")
    return cleaned[:NAME_MAX]


def webhook_url_validate(url: object) -> str:
    """An http(s) URL with a host, at most 2000 characters, not a link-local address;
    GatewayError ``invalid_url`` saying what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise GatewayError("invalid_url", "'url' is required: an http or https URL")
    url = url.strip()
    if len(url) > URL_MAX:
        raise GatewayError("invalid_url", f"the URL is over {URL_MAX} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise GatewayError("invalid_url", "the URL has spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise GatewayError("invalid_url", "the URL must be http:// or https://")
    try:
        host, _ = parts.hostname, parts.port  # the port is checked as it is read
    except ValueError:
        raise GatewayError("invalid_url", "the URL's port is not valid") from None
    if not host:
        raise GatewayError("invalid_url", "the URL has no host")
    address = _ip_literal(host)
    if address is not None and _link_local(address):
        raise GatewayError("invalid_url", "link-local addresses (169.254.0.0/16, fe80::/10) "
                           "are refused: they reach the machine's metadata service")
    return url


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host is, if it is written as one; also the forms resolvers take as
    IPv4 (``2852039166``, ``0xa9fea9fe``, ``169.254.43518``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _link_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:169.254.169.254
    return address.is_link_local or (mapped is not None and mapped.is_link_local)


def webhook_rooms_validate(rooms: object) -> list[str]:
    """At least one room name or pattern (``*``, ``?``); GatewayError ``invalid_room``."""
    patterns = room_patterns_validate(rooms)
    if not patterns:
        raise GatewayError("invalid_room", "'rooms' needs at least one room name or pattern "
                           "('*' for every room)")
    return patterns


def webhook_events_validate(kinds: object) -> list[str]:
    """Event kinds (a list, or a comma-separated string; none: every kind), in their usual
    order; GatewayError ``invalid_events``."""
    if kinds is None:
        return []
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    if not isinstance(kinds, list | tuple) or not all(k in EVENT_KINDS for k in kinds):
        raise GatewayError("invalid_events", "'events' must be a list of some of "
                           f"{', '.join(EVENT_KINDS)} (none: all of them)")
    return [kind for kind in EVENT_KINDS if kind in kinds]


def webhook_secret_generate() -> str:
    """A new secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def webhook_secret_validate(secret: object) -> str:
    """A secret given by a client: ``whsec_`` and the base64 of 24 to 64 bytes;
    GatewayError ``invalid_secret``."""
    refused = GatewayError("invalid_secret", f"a secret is {SECRET_PREFIX} and the base64 of "
                           f"{SECRET_BYTES_MIN}-{SECRET_BYTES_MAX} random bytes")
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise refused
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise refused from None
    if not SECRET_BYTES_MIN <= len(key) <= SECRET_BYTES_MAX:
        raise refused
    return secret


def url_host(url: str) -> str:
    """What logs and lists show of a URL: its host and port (never credentials or a path,
    which may hold a token)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:
        return "?"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


# --- registering ------------------------------------------------------------------------------


def webhook_create(*, name: object, url: object, rooms: object, events: object = None,
                   created_by: str = "", secret: object = None) -> tuple[Webhook, str]:
    """Register a webhook (validated) following the rooms its patterns match from now on
    (rooms created later from their first entry); it and its secret, shown once."""
    fields = {"name": webhook_name_validate(name), "url": webhook_url_validate(url),
              "rooms": webhook_rooms_validate(rooms), "events": webhook_events_validate(events)}
    key = webhook_secret_generate() if secret is None else webhook_secret_validate(secret)
    with transaction.atomic():
        webhook = Webhook.objects.create(**fields, secret=key, created_by=created_by[:150])
        webhook_rooms_sync(webhook=webhook)
    logger.info("webhook registered", extra={**_log(webhook), "rooms": webhook.rooms,
                                             "events": webhook.events, "by": created_by})
    return webhook, key


def webhook_update(*, webhook: Webhook, **changes: Any) -> Webhook:
    """Change ``name``, ``url``, ``rooms``, ``events`` or ``enabled`` (validated). Enabled
    again, it resumes from where it stopped (no longer failing or paused); disabled, it is
    delivered nothing until then. Returns the webhook as stored."""
    unknown = sorted(set(changes) - set(CHANGEABLE))
    if unknown:
        raise GatewayError("invalid_request", f"unknown keys {unknown}: {', '.join(CHANGEABLE)}")
    fields = _changes_validate(changes)
    if "enabled" in fields:
        if fields["enabled"] and not webhook.enabled:
            fields.update(paused_at=None, failing_since=None)
        elif not fields["enabled"]:
            fields["paused_at"] = None  # disabled by staff, not paused by failures
    with transaction.atomic():
        if fields:  # only the fields changed: delivery writes the others meanwhile
            Webhook.objects.filter(pk=webhook.pk).update(**fields)
        webhook.refresh_from_db()
        if "rooms" in fields:
            webhook_rooms_sync(webhook=webhook)
    if fields:
        logger.info("webhook changed", extra={**_log(webhook), "changed": sorted(changes),
                                              "state": webhook_state(webhook)})
    return webhook


def _changes_validate(changes: dict[str, Any]) -> dict[str, Any]:
    checks = {"name": webhook_name_validate, "url": webhook_url_validate,
              "rooms": webhook_rooms_validate, "events": webhook_events_validate}
    fields: dict[str, Any] = {key: checks[key](value) for key, value in changes.items()
                              if key in checks}
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise GatewayError("invalid_request", "'enabled' must be true or false")
        fields["enabled"] = changes["enabled"]
    return fields


def webhook_delete(*, webhook: Webhook) -> None:
    """Delete a webhook, with its rooms and positions."""
    log = _log(webhook)
    webhook_forget(webhook=webhook)
    logger.info("webhook deleted", extra=log)


def webhooks_enable(*, webhooks: Iterable[Webhook], enabled: bool) -> int:
    """Enable (resuming from where each stopped) or disable webhooks; how many changed."""
    changed = 0
    for webhook in webhooks:
        if webhook.enabled != enabled:
            webhook_update(webhook=webhook, enabled=enabled)
            changed += 1
    return changed


def _log(webhook: Webhook) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "webhook": webhook.pk, "webhook_name": webhook.name,
            "host": url_host(webhook.url)}


# --- the rooms each follows -------------------------------------------------------------------


def webhook_rooms_sync(*, webhook: Webhook) -> None:
    """Make the rooms ``webhook`` follows what its patterns match now: rooms newly matched
    are followed from their newest entry on; rooms no longer matched are left, with their
    positions."""
    target = str(webhook.pk)
    with transaction.atomic():
        matched: dict[str, int] = {}
        if webhook.rooms:
            rows = Room.objects.filter(name__regex=room_patterns_regex(webhook.rooms))
            matched = dict(rows.values_list("name", "last_seq"))
        following = set(WebhookRoom.objects.filter(webhook=webhook).values_list("room", flat=True))
        gone = following - matched.keys()
        if gone:
            WebhookRoom.objects.filter(webhook=webhook, room__in=gone).delete()
            RelayCursor.objects.filter(relay=RELAY_ROLE, target=target, room__in=gone).delete()
        new = sorted(matched.keys() - following)
        WebhookRoom.objects.bulk_create([WebhookRoom(webhook=webhook, room=room) for room in new],
                                        ignore_conflicts=True)
        for room in new:
            RelayCursor.objects.update_or_create(relay=RELAY_ROLE, room=room, target=target,
                                                 defaults={"last_seq": matched[room]})


def webhook_rooms_add_room(*, room: str) -> None:
    """A room was just created: the webhooks whose patterns match it follow it from its
    first entry. Call it in the transaction that creates the room."""
    found = [pk for pk, patterns in Webhook.objects.values_list("pk", "rooms")
             if patterns and room_matches(patterns, room)]
    if not found:
        return
    WebhookRoom.objects.bulk_create([WebhookRoom(webhook_id=pk, room=room) for pk in found],
                                    ignore_conflicts=True)
    RelayCursor.objects.bulk_create(
        [RelayCursor(relay=RELAY_ROLE, room=room, target=str(pk), last_seq=0) for pk in found],
        ignore_conflicts=True)


def webhook_forget(*, webhook: Webhook) -> None:
    """A webhook is deleted: its rooms and positions go with it."""
    with transaction.atomic():
        RelayCursor.objects.filter(relay=RELAY_ROLE, target=str(webhook.pk)).delete()
        webhook.delete()


# --- delivery (the relay role, protocols/webhook/relay.py) -------------------------------------


def webhook_relay_targets() -> QuerySet:
    """The relay's targets: each enabled webhook in each room it follows whose policy reaches
    webhooks (``target``: the webhook's id)."""
    # Imported here: selectors imports services, which imports this module.
    from gateway.selectors import rooms_not_reaching

    rows = WebhookRoom.objects.filter(webhook__enabled=True, webhook__paused_at__isnull=True)
    rows = rows.exclude(room__in=rooms_not_reaching(PROTOCOL))
    return rows.values("room", target=Cast("webhook_id", output_field=CharField()))


def webhooks_deliverable() -> list[dict[str, Any]]:
    """What delivery needs of every enabled webhook (one query)."""
    return list(Webhook.objects.filter(enabled=True).values(
        "pk", "name", "url", "secret", "events", "uid", "failing_since"))


def webhook_delivery_failed(*, pk: int, error: str) -> tuple[datetime | None, bool]:
    """A delivery failed: the webhook is failing (since its first failure after its last
    success) with this error. Returns since when, and whether it is still enabled."""
    with transaction.atomic():
        Webhook.objects.filter(pk=pk).update(
            failing_since=Coalesce("failing_since", Value(_now(), output_field=DateTimeField())),
            last_error=error[:ERROR_MAX])
        row = Webhook.objects.filter(pk=pk).values_list("failing_since", "enabled").first()
    return row if row is not None else (None, False)


def webhook_delivery_succeeded(*, pk: int) -> None:
    """A delivery succeeded: the webhook is no longer failing."""
    Webhook.objects.filter(pk=pk).update(failing_since=None, last_success_at=_now())


def webhook_pause(*, pk: int) -> bool:
    """Pause a webhook that has been failing too long (delivery stops; its positions stay);
    whether this call paused it."""
    return bool(Webhook.objects.filter(pk=pk, enabled=True).update(
        enabled=False, paused_at=_now()))


# --- how they are shown -----------------------------------------------------------------------


def webhook_state(webhook: Webhook) -> str:
    """``active``, ``failing`` (delivering, not succeeding), ``paused`` (stopped after
    failing too long) or ``disabled`` (by staff)."""
    if not webhook.enabled:
        return STATE_PAUSED if webhook.paused_at is not None else STATE_DISABLED
    return STATE_FAILING if webhook.failing_since is not None else STATE_ACTIVE


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def webhook_public(webhook: Webhook) -> dict[str, Any]:
    """A webhook as the API shows it (never its secret); times as epoch seconds."""
    return {
        "id": webhook.pk, "name": webhook.name, "url": webhook.url, "rooms": webhook.rooms,
        "events": webhook.events, "enabled": webhook.enabled, "state": webhook_state(webhook),
        "failing_since": _epoch(webhook.failing_since), "paused_at": _epoch(webhook.paused_at),
        "last_error": webhook.last_error,  # "" until a delivery fails
        "last_success_at": _epoch(webhook.last_success_at),
        "created_at": _epoch(webhook.created_at),
    }


def webhooks_list() -> list[Webhook]:
    """Every webhook, by name."""
    return list(Webhook.objects.all())


def webhook_get(*, pk: int) -> Webhook:
    """The webhook with this id; GatewayError ``no_such_webhook``."""
    webhook = Webhook.objects.filter(pk=pk).first()
    if webhook is None:
        raise GatewayError("no_such_webhook", f"no webhook {pk}")
    return webhook


DASHBOARD_LIMIT = 100


def webhooks_dashboard() -> list[dict[str, Any]]:
    """The webhooks as the dashboard shows them (the failing and paused first)."""
    order = {STATE_PAUSED: 0, STATE_FAILING: 1, STATE_DISABLED: 2, STATE_ACTIVE: 3}
    rows = [webhook_public(webhook) for webhook in Webhook.objects.all()[:DASHBOARD_LIMIT]]
    for row in rows:
        del row["url"]  # a URL may hold credentials or a token: the admin has it
    return sorted(rows, key=lambda row: (order[row["state"]], row["name"], row["id"]))
