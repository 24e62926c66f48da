"""Protocol adapters: the settings list that plugs each protocol into the gateway.

In the spirit of ``CHANNEL_LAYERS`` and ``INSTALLED_APPS``, ``settings.GATEWAY_ADAPTERS`` maps
a protocol's name to its adapter class (``"mqtt": "protocols.mqtt.adapter.MqttAdapter"``), and
``GATEWAY_PROTOCOLS`` (or ``gateway run --protocols``) picks the ones this process runs. An
adapter brings everything its protocol adds, and the core asks it instead of naming it:

- ``http_routes()``: Django URL patterns (pages, an API, a webhook);
- ``http_stream_routes()``: ASGI routes for long-lived HTTP responses (an event stream),
  served beside Django (wrap the consumer in ``gateway.middleware.SessionAuthStack`` for
  the session's user);
- ``websocket_routes()``: WebSocket routes (behind the same-origin check and the session);
- ``scope_type`` and ``scope_application()``: the ASGI scope type its server opens for
  each conversation, and the consumer(s) that serve it;
- ``add_arguments(parser)`` and ``servers(context)``: its options of ``gateway run`` and the
  servers that command starts and stops with the web server (``start()``/``stop()``);
- ``checks()``: its system checks; ``sender_protocols``: the sender protocols it stores.

Status for ``/readyz`` and the dashboard is registered by the servers themselves
(gateway/status.py). Adapter modules are imported before Django is set up (``gateway run``
reads their options first): they import their servers and consumers inside the methods.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import sys
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from gateway import events

logger = logging.getLogger(__name__)


class RunRefused(Exception):
    """A setting ``gateway run`` cannot start with; the message says which and why."""


@dataclass(frozen=True)
class RunContext:
    """What ``gateway run`` gives an adapter to build its servers."""

    application: Any  # the root ASGI application: servers open their scopes on it
    options: argparse.Namespace  # the command line, with the adapters' own options


class Adapter:
    """A protocol's parts; every method has a default, so an adapter writes what it adds."""

    scope_type: str | None = None  # the ASGI scope type its server opens, if any
    hosts_pages = False  # serves the pages browsers use (see gateway.E003)
    # Its members are connections (a socket each: two tabs are two), rather than members
    # counted once per room however many scopes replicas hold for them (a device, a chat).
    members_are_connections = False
    # The relay roles that carry rooms to its targets (gateway/relay.py), by name: a room's
    # policy that reaches the protocol again places them at that point of the room's log.
    relay_roles: tuple[str, ...] = ()

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def sender_protocols(self) -> tuple[str, ...]:
        return (self.name,)

    def http_routes(self) -> list:
        return []

    def http_stream_routes(self) -> list:
        return []

    def websocket_routes(self) -> list:
        return []

    def scope_application(self) -> Any:
        return None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``gateway run`` for this protocol."""

    def servers(self, context: RunContext) -> list:
        return []

    def checks(self) -> list[checks.CheckMessage]:
        return []


@functools.cache
def adapters_all() -> dict[str, Adapter]:
    """Every configured adapter, by protocol name, in settings order."""
    found = {name: import_string(path)(name) for name, path in settings.GATEWAY_ADAPTERS.items()}
    events.protocols_register(
        *(protocol for adapter in found.values() for protocol in adapter.sender_protocols)
    )
    return found


def protocols_counted_by_connection() -> set[str]:
    """The sender protocols whose members count once per connection (see
    ``Adapter.members_are_connections``)."""
    return {protocol for adapter in adapters_all().values() if adapter.members_are_connections
            for protocol in adapter.sender_protocols}


def adapters_relay_roles() -> dict[str, tuple[str, ...]]:
    """Each protocol's relay roles (``Adapter.relay_roles``), for every configured adapter."""
    return {name: adapter.relay_roles for name, adapter in adapters_all().items()
            if adapter.relay_roles}


def adapters_enabled() -> list[Adapter]:
    """The adapters this process runs (``GATEWAY_PROTOCOLS``), in settings order; unknown
    names are reported by the system checks (gateway.E002)."""
    chosen = set(settings.GATEWAY_PROTOCOLS)
    return [adapter for name, adapter in adapters_all().items() if name in chosen]


class ScopeRoleRouter:
    """Route the scopes of a protocol server by their ``role`` (a device, a room relay...)."""

    def __init__(self, routes: dict) -> None:
        self.routes = routes

    async def __call__(self, scope, receive, send):
        try:
            application = self.routes[scope["role"]]
        except KeyError:
            raise ValueError(
                f"no route for {scope['type']} scope role {scope.get('role')!r}"
            ) from None
        return await application(scope, receive, send)


# --- helpers for adapters' servers ------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well be reachable


def warn(text: str) -> None:
    """Said loudly: on stderr and as a WARNING log line."""
    print(f"WARNING: {text}", file=sys.stderr, flush=True)
    logger.warning(text)
