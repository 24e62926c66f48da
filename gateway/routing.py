"""Routes per scope type, gathered from the protocol adapters this process runs
(gateway/adapters.py). Any other WebSocket path is refused before accept (HTTP 403), never
left to the router's exception (a 500 a second later, with a traceback)."""

import logging

from django.urls import re_path

from gateway.adapters import adapters_enabled
from gateway.crosssite import websocket_refuse

logger = logging.getLogger(__name__)

CLOSE_NOT_FOUND = 4404


async def unrouted_socket(scope, receive, send) -> None:
    """A WebSocket to a path nothing serves: refused before accept, with a log line."""
    logger.warning("refused a socket to an unrouted path",
                   extra={"protocol": "web", "path": scope.get("path"), "code": CLOSE_NOT_FOUND})
    await websocket_refuse(receive, send, CLOSE_NOT_FOUND)


websocket_urlpatterns = [
    *(route for adapter in adapters_enabled() for route in adapter.websocket_routes()),
    re_path(r"", unrouted_socket),
]

# Long-lived HTTP responses (event streams), served beside Django.
http_stream_urlpatterns = [
    route for adapter in adapters_enabled() for route in adapter.http_stream_routes()
]

# The scope types the adapters' servers open, each to its consumer(s).
scope_applications = {
    adapter.scope_type: adapter.scope_application()
    for adapter in adapters_enabled() if adapter.scope_type is not None
}
