"""WebSocket routes. The room segment is matched loosely so a bad name reaches the consumer,
which refuses it with a clear close code and a log line."""

from django.urls import re_path

from consumers.websocket import ChatConsumer

websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room>[^/]*)/$", ChatConsumer.as_asgi()),
]
