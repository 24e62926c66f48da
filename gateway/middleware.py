"""Probes and scrapes reach a replica by its address, not by the site's host name."""

from __future__ import annotations

from asgiref.sync import markcoroutinefunction
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
