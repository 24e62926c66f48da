"""The HTTP API's webhooks (``manage``: a key with that scope, or a staff session):

- ``GET /api/webhooks``: every webhook; ``POST`` ``{"name", "url", "rooms", "events"?,
  "secret"?}`` registers one: ``201`` with its ``secret``, shown this once.
- ``GET /api/webhooks/<id>``; ``PATCH`` ``{"name"?, "url"?, "rooms"?, "events"?,
  "enabled"?}`` (``enabled: true`` resumes a paused webhook where it stopped);
  ``DELETE``: ``204``.

A webhook is ``{"id", "name", "url", "rooms", "events", "enabled", "state", "failing_since",
"paused_at", "last_error", "last_success_at", "created_at"}`` (times in epoch seconds or
null; ``last_error`` "" until a delivery fails; ``state``: active, failing, paused or
disabled); never its secret after it is made.
A key limited to rooms manages only webhooks on those rooms (each pattern one of the key's,
or a room name it may use).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.http import HttpResponse, JsonResponse

from gateway import webhooks
from gateway.access import Principal
from gateway.api import MANAGE, ApiError, Request, endpoint
from gateway.errors import GatewayError
from gateway.models import Webhook

CREATE_KEYS = ("name", "url", "rooms", "events", "secret")


@contextmanager
def _body_checked() -> Iterator[None]:
    """A bad room pattern in a body is a bad request (400), not a URL's unknown room (404)."""
    try:
        yield
    except GatewayError as exc:
        if exc.code == "invalid_room":
            raise ApiError(exc.code, exc.detail, 400) from None
        raise


def _may_follow(principal: Principal, patterns: list[str]) -> bool:
    """Whether a principal limited to rooms may have webhooks follow ``patterns``."""
    if principal.rooms is None:
        return True
    return all(pattern in principal.rooms or (
        "*" not in pattern and "?" not in pattern and principal.may_use(pattern))
        for pattern in patterns)


def _check_rooms(principal: Principal, patterns: object) -> None:
    if isinstance(patterns, list) and not _may_follow(principal, patterns):
        raise GatewayError("forbidden", f"this {principal.kind} may not follow these rooms")


def _webhook(request: Request, id: str) -> Webhook:
    """The webhook ``id``, if the principal may manage it (else it does not exist for it)."""
    webhook = webhooks.webhook_get(pk=int(id))
    if not _may_follow(request.principal, webhook.rooms):
        raise GatewayError("no_such_webhook", f"no webhook {id}")
    return webhook


def webhooks_list(request: Request) -> HttpResponse:
    """Every webhook (that the principal may manage), by name."""
    found = [webhooks.webhook_public(webhook) for webhook in webhooks.webhooks_list()
             if _may_follow(request.principal, webhook.rooms)]
    return JsonResponse({"webhooks": found})


def webhook_create(request: Request) -> HttpResponse:
    """Register a webhook: 201 with its secret, which is never shown again."""
    data = request.body
    unknown = sorted(set(data) - set(CREATE_KEYS))
    if unknown:
        raise GatewayError("invalid_request", f"unknown keys {unknown}: {', '.join(CREATE_KEYS)}")
    with _body_checked():
        rooms = webhooks.webhook_rooms_validate(data.get("rooms"))
        _check_rooms(request.principal, rooms)
        webhook, secret = webhooks.webhook_create(
            name=data.get("name"), url=data.get("url"), rooms=rooms, events=data.get("events"),
            secret=data.get("secret"), created_by=request.principal.log_id)
    return JsonResponse({**webhooks.webhook_public(webhook), "secret": secret}, status=201)


def webhook_detail(request: Request, id: str) -> HttpResponse:
    return JsonResponse(webhooks.webhook_public(_webhook(request, id)))


def webhook_patch(request: Request, id: str) -> HttpResponse:
    """Change some of name, url, rooms, events, enabled (the keys given)."""
    webhook = _webhook(request, id)
    data = request.body
    unknown = sorted(set(data) - set(webhooks.CHANGEABLE))
    if unknown:
        raise GatewayError("invalid_request",
                           f"unknown keys {unknown}: {', '.join(webhooks.CHANGEABLE)}")
    with _body_checked():
        if "rooms" in data:
            _check_rooms(request.principal, webhooks.webhook_rooms_validate(data["rooms"]))
        webhook = webhooks.webhook_update(webhook=webhook, **data)
    return JsonResponse(webhooks.webhook_public(webhook))


def webhook_delete(request: Request, id: str) -> HttpResponse:
    webhooks.webhook_delete(webhook=_webhook(request, id))
    return HttpResponse(status=204)


api_webhooks = endpoint({"GET": (MANAGE, webhooks_list), "POST": (MANAGE, webhook_create)})
api_webhook = endpoint({"GET": (MANAGE, webhook_detail), "PATCH": (MANAGE, webhook_patch),
                        "DELETE": (MANAGE, webhook_delete)})
