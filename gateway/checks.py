"""System checks for configurations that would lose messages."""

from __future__ import annotations

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def check_channel_layer(app_configs, **kwargs) -> list[checks.CheckMessage]:
    layers = getattr(settings, "CHANNEL_LAYERS", {})
    if "default" not in layers:
        return [
            checks.Error(
                "CHANNEL_LAYERS has no 'default' layer; rooms cannot fan out.",
                id="gateway.E001",
            )
        ]
    return []


@checks.register(checks.Tags.compatibility)
def check_protocols(app_configs, **kwargs) -> list[checks.CheckMessage]:
    """Only protocols that have an adapter, and, on the in-memory layer (one process), a set
    that works alone: without the adapter that serves pages here, no browser could share
    this process's rooms. Then each enabled adapter's own checks."""
    from channels.layers import InMemoryChannelLayer, get_channel_layer

    from gateway.adapters import adapters_enabled

    protocols = settings.GATEWAY_PROTOCOLS
    unknown = sorted(set(protocols) - set(settings.GATEWAY_ADAPTERS))
    if unknown:
        return [checks.Error(
            f"Unknown protocol(s) {', '.join(unknown)} in GATEWAY_PROTOCOLS/--protocols.",
            hint=f"Choose from {', '.join(settings.GATEWAY_ADAPTERS)} (GATEWAY_ADAPTERS).",
            id="gateway.E002",
        )]
    if not protocols:
        return [checks.Error("No protocol to run (GATEWAY_PROTOCOLS/--protocols is empty).",
                             id="gateway.E002")]
    enabled = adapters_enabled()
    pages = [adapter for adapter in enabled if adapter.hosts_pages]
    if not pages and isinstance(get_channel_layer(), InMemoryChannelLayer):
        return [checks.Error(
            f"--protocols {','.join(protocols)} needs a channel layer shared with the process "
            "that serves the web: the in-memory layer reaches only this process, so its rooms "
            "would reach no browser.",
            hint="Set REDIS_URL (the Redis channel layer) for protocol servers in separate "
            "processes, or run all of them here (the default).",
            id="gateway.E003",
        )]
    return [message for adapter in enabled for message in adapter.checks()]
