"""Routes per scope type. The WebSocket room segment is matched loosely so a bad name
reaches the consumer, which refuses it with a clear close code and a log line."""

from django.conf import settings
from django.urls import re_path

from consumers.dashboard import DashboardConsumer
from consumers.mqtt import MqttDeviceConsumer, MqttRoomConsumer
from consumers.telegram import TelegramChatConsumer, TelegramRoomConsumer, TelegramRoomsConsumer
from consumers.websocket import ChatConsumer

# Without "web" in GATEWAY_PROTOCOLS this process accepts no WebSocket.
websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room>[^/]*)/$", ChatConsumer.as_asgi()),
    re_path(r"^ws/dashboard/$", DashboardConsumer.as_asgi()),
] if "web" in settings.GATEWAY_PROTOCOLS else []


class ScopeRoleRouter:
    """Route the scopes of a protocol server by their ``role``."""

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


mqtt_application = ScopeRoleRouter(
    {"device": MqttDeviceConsumer.as_asgi(), "out": MqttRoomConsumer.as_asgi()}
)

telegram_application = ScopeRoleRouter(
    {
        "chat": TelegramChatConsumer.as_asgi(),
        "room": TelegramRoomConsumer.as_asgi(),
        "rooms": TelegramRoomsConsumer.as_asgi(),
    }
)
