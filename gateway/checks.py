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
