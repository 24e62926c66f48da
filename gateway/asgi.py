"""The root ASGI application: one router for every scope type, with the routes and scope
types of the protocol adapters this process runs (gateway/adapters.py)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from gateway.crosssite import SameOriginValidator  # noqa: E402
from gateway.middleware import SessionAuthStack  # noqa: E402
from gateway.routing import (  # noqa: E402
    http_stream_urlpatterns,
    scope_applications,
    websocket_urlpatterns,
)

http_application = django_asgi_app
if http_stream_urlpatterns:
    # The adapters' event streams, then everything else is Django's.
    http_application = URLRouter([*http_stream_urlpatterns, re_path(r"", django_asgi_app)])

application = ProtocolTypeRouter(
    {
        "http": http_application,
        # The exact origin (scheme, host and port), before the session is even read: a page
        # on another port or scheme of this host must not use the visitor's cookies.
        "websocket": SameOriginValidator(
            SessionAuthStack(URLRouter(websocket_urlpatterns))
        ),
        # Opened by the adapters' protocol servers (mqtt: a device in a room, a room's
        # relay; telegram: a chat, a relayed room).
        **scope_applications,
    }
)
