"""The tutorial's asgi.py, routing inlined. AuthMiddlewareStack is left out: it costs a
session lookup per connect, nothing per delivered message, and needs a database."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.tutorial.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import re_path  # noqa: E402

from bench.tutorial.consumers import ChatConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            URLRouter([re_path(r"ws/chat/(?P<room_name>\w+)/$", ChatConsumer.as_asgi())])
        ),
    }
)
