"""The web adapter: what browsers (and programs reading the API) use.

The pages, views and consumers themselves are the core's (gateway/views.py,
consumers/websocket.py, consumers/dashboard.py); this adapter puts them on routes, so a
process without ``web`` serves none of them.
"""

from __future__ import annotations

from gateway.adapters import Adapter


class WebAdapter(Adapter):
    hosts_pages = True
    members_are_connections = True  # a browser's sockets: each tab counts

    @property
    def sender_protocols(self) -> tuple[str, ...]:
        return ("web",)

    def http_routes(self) -> list:
        from django.contrib import admin
        from django.contrib.auth import views as auth_views
        from django.urls import path, re_path

        from gateway import views

        return [
            path("", views.index, name="index"),
            re_path(r"^chat/(?P<room>[^/]*)/$", views.chat, name="chat"),
            path("api/rooms/", views.api_rooms, name="api-rooms"),
            re_path(r"^api/rooms/(?P<room>[^/]*)/$", views.api_room, name="api-room"),
            re_path(r"^api/rooms/(?P<room>[^/]*)/messages$", views.api_messages,
                    name="api-messages"),
            path("dashboard/", views.dashboard, name="dashboard"),
            path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
            path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
            path("admin/", admin.site.urls),
        ]

    def websocket_routes(self) -> list:
        from django.urls import re_path

        from consumers.dashboard import DashboardConsumer
        from consumers.websocket import ChatConsumer

        # The room segment is matched loosely (slashes included) so a bad name reaches the
        # consumer, which refuses it with a clear close code and a log line.
        return [
            re_path(r"^ws/chat/(?P<room>[\s\S]*)/$", ChatConsumer.as_asgi()),
            re_path(r"^ws/dashboard/$", DashboardConsumer.as_asgi()),
        ]
