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
    """Only protocols that exist, and, on the in-memory layer (one process), a set that
    works alone: without web here, no browser could share this process's rooms."""
    from channels.layers import InMemoryChannelLayer, get_channel_layer

    protocols = settings.GATEWAY_PROTOCOLS
    unknown = sorted(set(protocols) - set(settings.PROTOCOL_NAMES))
    if unknown:
        return [checks.Error(
            f"Unknown protocol(s) {', '.join(unknown)} in GATEWAY_PROTOCOLS/--protocols.",
            hint=f"Choose from {', '.join(settings.PROTOCOL_NAMES)}.", id="gateway.E002",
        )]
    if not protocols:
        return [checks.Error("No protocol to run (GATEWAY_PROTOCOLS/--protocols is empty).",
                             id="gateway.E002")]
    if "web" not in protocols and isinstance(get_channel_layer(), InMemoryChannelLayer):
        return [checks.Error(
            f"--protocols {','.join(protocols)} needs a channel layer shared with the process "
            "that serves the web: the in-memory layer reaches only this process, so its rooms "
            "would reach no browser.",
            hint="Set REDIS_URL (the Redis channel layer) for protocol servers in separate "
            "processes, or run all of them here (the default).",
            id="gateway.E003",
        )]
    return []
