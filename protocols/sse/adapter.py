"""The SSE adapter: ``GET /sse/rooms/<room>/``, the room's log as an event stream."""

from __future__ import annotations

from gateway.adapters import Adapter


class SseAdapter(Adapter):
    @property
    def sender_protocols(self) -> tuple[str, ...]:
        return ()  # it only reads

    def http_stream_routes(self) -> list:
        from django.urls import re_path

        from gateway.middleware import SessionAuthStack
        from protocols.sse.consumer import RoomStreamConsumer

        # The room segment is matched loosely so a bad name gets a clear 400.
        return [re_path(r"^sse/rooms/(?P<room>[^/]*)/$",
                        SessionAuthStack(RoomStreamConsumer.as_asgi()))]
