"""Web pages, the probes and the metrics (the JSON API is gateway/api.py)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render

from gateway import selectors, status
from gateway.adapters import adapters_enabled
from gateway.names import ROOM_NAME_RULE, room_name_is_valid

logger = logging.getLogger(__name__)


def _login_gate(request: HttpRequest) -> HttpResponse | None:
    if settings.GATEWAY["REQUIRE_LOGIN"] and not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    return None


def error_response(status: int, code: str, detail: str) -> JsonResponse:
    """A JSON error: ``{"type": "error", "code", "detail"}`` with an HTTP status."""
    return JsonResponse({"type": "error", "code": code, "detail": detail}, status=status)


def _index_page(request: HttpRequest, *, room: str, error: str, status: int) -> HttpResponse:
    return render(
        request, "gateway/index.html",
        {"rooms": selectors.room_list(), "error": error, "room": room,
         "room_rule": ROOM_NAME_RULE},
        status=status,
    )


def index(request: HttpRequest) -> HttpResponse:
    if (gate := _login_gate(request)) is not None:
        return gate
    room = request.GET.get("room", "").strip()
    if room and room_name_is_valid(room):
        return redirect("chat", room=room)
    error = f"Invalid room name. Use {ROOM_NAME_RULE}." if room else ""
    return _index_page(request, room=room, error=error, status=400 if error else 200)


def chat(request: HttpRequest, room: str) -> HttpResponse:
    if (gate := _login_gate(request)) is not None:
        return gate
    if not room_name_is_valid(room):
        return _index_page(
            request, room=room, error=f"Invalid room name. Use {ROOM_NAME_RULE}.", status=404
        )
    if selectors.room_is_closed(room=room):
        return _index_page(request, room=room, error=f"Room {room} is closed.", status=410)
    return render(
        request, "gateway/chat.html",
        {"room": room, "max_length": settings.GATEWAY["MAX_MESSAGE_LENGTH"],
         "history": settings.GATEWAY["HISTORY_PAGE_SIZE"]},
    )


async def healthz(request: HttpRequest) -> HttpResponse:
    """The process is alive (for liveness probes): no dependency is checked."""
    return JsonResponse({"status": "ok"})


async def readyz(request: HttpRequest) -> HttpResponse:
    """Whether this process can serve (for load balancers): the database, the channel layer,
    and every protocol server it runs. 503 with the failing parts otherwise."""
    checks = await status.process_status(database=True)
    ready = all(part.get("ready") for part in checks.values())
    return JsonResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics of this process (each replica is scraped on its own)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from gateway import metrics as gauges
    from gateway.runtime import get_runtime

    runtime = await get_runtime()
    counts = {name: 0 for adapter in adapters_enabled() for name in adapter.sender_protocols}
    for entry in runtime.presence.entries.values():
        counts[entry["protocol"]] = counts.get(entry["protocol"], 0) + 1
    for protocol, count in counts.items():
        gauges.CONNECTIONS.labels(protocol).set(count)
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)


def dashboard(request: HttpRequest) -> HttpResponse:
    """The staff dashboard: anonymous visitors log in first, other users are refused."""
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    if not request.user.is_staff:
        raise PermissionDenied("staff only")
    return render(request, "gateway/dashboard.html", {"chart_minutes": 60})
