"""Middleware: probes and scrapes reach a replica by its address, not by the site's host
name; a socket's user comes from its session, without a database hop when it has none."""

from __future__ import annotations

from asgiref.sync import markcoroutinefunction
from channels.auth import AuthMiddleware
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest, HttpResponse


class ProbeMiddleware:
    """Answer ``/healthz``, ``/readyz`` and ``/metrics`` before anything checks the Host
    header: Kubernetes probes, Docker's health check and Prometheus call a pod by its IP,
    which ``ALLOWED_HOSTS`` rightly does not list. They reveal nothing a client could use."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method == "GET":
            from gateway import views

            probe = {"/healthz": views.healthz, "/readyz": views.readyz,
                     "/metrics": views.metrics}.get(request.path_info)
            if probe is not None:
                return await probe(request)
        return await self.get_response(request)


class SessionAuthMiddleware(AuthMiddleware):
    """Channels' ``AuthMiddleware``, but a socket without a session cookie is anonymous at
    once: Channels would ask the database thread (a hop per connect) to find that out."""

    async def resolve_scope(self, scope) -> None:
        if scope["session"].session_key is None:
            scope["user"]._wrapped = AnonymousUser()
        else:
            await super().resolve_scope(scope)


def SessionAuthStack(inner):  # noqa: N802 (named as Channels' AuthMiddlewareStack)
    """Cookies, the session and its user for ``inner``, as Channels' ``AuthMiddlewareStack``."""
    return CookieMiddleware(SessionMiddleware(SessionAuthMiddleware(inner)))
