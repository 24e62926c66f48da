"""The webhook adapter: room events POSTed to registered URLs (docs/webhooks.md).

It only sends: it stores nothing of its own (no sender protocol), has no routes (the
API's ``/api/webhooks`` and the admin are the web adapter's) and runs the relay role
``webhook`` with the HTTP client it uses.
"""

from __future__ import annotations

from gateway.adapters import Adapter, RunContext


class WebhookAdapter(Adapter):
    relay_roles = ("webhook",)  # gateway/webhooks.py RELAY_ROLE

    @property
    def sender_protocols(self) -> tuple[str, ...]:
        return ()  # nothing comes in through webhooks

    def servers(self, context: RunContext) -> list:
        from django.conf import settings

        from gateway.relay import Relay
        from protocols.webhook.relay import WebhookRole
        from protocols.webhook.sender import WebhookSender

        sender = WebhookSender(timeout=settings.WEBHOOK["TIMEOUT"],
                               allow_private=settings.WEBHOOK["ALLOW_PRIVATE"])
        # The relay after the sender, so it stops first: deliveries in flight end (or are
        # cut short and kept) and the positions are saved before the client closes.
        return [sender, Relay(WebhookRole(sender))]
