"""The root ASGI application: one router for every scope type."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from gateway.crosssite import SameOriginValidator  # noqa: E402
from gateway.routing import (  # noqa: E402
    mqtt_application,
    telegram_application,
    websocket_urlpatterns,
)

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The exact origin (scheme, host and port), before the session is even read: a page
        # on another port or scheme of this host must not use the visitor's cookies.
        "websocket": SameOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
        # Opened by protocols/mqtt: one scope per device and room, one per room's relay.
        "mqtt": mqtt_application,
        # Opened by protocols/telegram: one scope per chat, one per relayed room.
        "telegram": telegram_application,
    }
)
