"""Routes per scope type. The WebSocket room segment is matched loosely (slashes included)
so a bad name reaches the consumer, which refuses it with a clear close code and a log line;
any other WebSocket path is refused before accept (HTTP 403), never left to the router's
exception (a 500 a second later, with a traceback)."""

import logging

from django.conf import settings
from django.urls import re_path

from consumers.dashboard import DashboardConsumer
from consumers.websocket import ChatConsumer
from gateway.crosssite import websocket_refuse
from protocols.mqtt.consumers import MqttDeviceConsumer, MqttRoomConsumer
from protocols.telegram.consumers import (
    TelegramChatConsumer,
    TelegramRoomConsumer,
    TelegramRoomsConsumer,
)

logger = logging.getLogger(__name__)

CLOSE_NOT_FOUND = 4404


async def unrouted_socket(scope, receive, send) -> None:
    """A WebSocket to a path nothing serves: refused before accept, with a log line."""
    logger.warning("refused a socket to an unrouted path",
                   extra={"protocol": "web", "path": scope.get("path"), "code": CLOSE_NOT_FOUND})
    await websocket_refuse(receive, send, CLOSE_NOT_FOUND)


# Without "web" in GATEWAY_PROTOCOLS this process accepts no WebSocket.
websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room>[\s\S]*)/$", ChatConsumer.as_asgi()),
    re_path(r"^ws/dashboard/$", DashboardConsumer.as_asgi()),
] if "web" in settings.GATEWAY_PROTOCOLS else []
websocket_urlpatterns.append(re_path(r"", unrouted_socket))


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
