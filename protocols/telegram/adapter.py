"""The Telegram adapter: chats with the gateway's bot (when ``TELEGRAM_BOT_TOKEN`` is set)."""

from __future__ import annotations

from gateway.adapters import Adapter, RunContext, ScopeRoleRouter


class TelegramAdapter(Adapter):
    scope_type = "telegram"  # one scope per chat
    relay_roles = ("telegram",)  # protocols/telegram/relay.py: the platform's name

    def scope_application(self) -> ScopeRoleRouter:
        from protocols.telegram.consumers import TelegramChatConsumer

        return ScopeRoleRouter({"chat": TelegramChatConsumer.as_asgi()})

    def http_routes(self) -> list:
        from django.urls import path

        from protocols.telegram.webhook import telegram_webhook

        return [path("telegram/webhook/", telegram_webhook, name="telegram-webhook")]

    def servers(self, context: RunContext) -> list:
        from django.conf import settings

        telegram = settings.TELEGRAM
        if not telegram["TOKEN"]:
            return []
        from gateway.relay import Relay
        from protocols.telegram.relay import TelegramChats
        from protocols.telegram.server import SendLimits, TelegramServer, telegram_bot

        server = TelegramServer(
            context.application,
            bot=telegram_bot(telegram["TOKEN"], api_url=telegram["API_URL"]),
            webhook_url=telegram["WEBHOOK_URL"],
            webhook_secret=telegram["WEBHOOK_SECRET"],
            poll_timeout=telegram["POLL_TIMEOUT"],
            idle_timeout=telegram["IDLE_TIMEOUT"],
            limits=SendLimits(
                chat_per_second=telegram["CHAT_RATE"], group_per_minute=telegram["GROUP_RATE"],
                overall_per_second=telegram["OVERALL_RATE"],
            ),
        )
        # The relay after the server, so it stops first: what it is sending goes out, and
        # each chat's position is saved, before the server closes.
        return [server, Relay(TelegramChats(server, backlog=telegram["CHAT_BACKLOG"]))]
