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
        return ("web", "api")  # pages, and programs with an API key (gateway/api.py)

    def http_routes(self) -> list:
        from django.contrib import admin
        from django.contrib.auth import views as auth_views
        from django.urls import path, re_path

        from gateway import api, api_webhooks, openapi, views

        return [
            path("", views.index, name="index"),
            re_path(r"^chat/(?P<room>[^/]*)/$", views.chat, name="chat"),
            path("api/rooms/", api.api_rooms, name="api-rooms"),
            re_path(r"^api/rooms/(?P<room>[^/]*)/$", api.api_room, name="api-room"),
            re_path(r"^api/rooms/(?P<room>[^/]*)/devices$", api.api_devices,
                    name="api-devices"),
            re_path(r"^api/rooms/(?P<room>[^/]*)/messages$", api.api_messages,
                    name="api-messages"),
            re_path(r"^api/rooms/(?P<room>[^/]*)/messages/(?P<id>[1-9][0-9]{0,17})$",
                    api.api_message, name="api-message"),
            re_path(r"^api/rooms/(?P<room>[^/]*)/messages/(?P<id>[1-9][0-9]{0,17})/reactions$",
                    api.api_reactions, name="api-reactions"),
            path("api/openapi.json", openapi.openapi_json, name="api-openapi"),
            re_path(r"^api/webhooks$", api_webhooks.api_webhooks, name="api-webhooks"),
            re_path(r"^api/webhooks/(?P<id>[1-9][0-9]{0,17})$", api_webhooks.api_webhook,
                    name="api-webhook"),
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
