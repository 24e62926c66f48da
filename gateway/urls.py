from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path, re_path

from gateway import views
from protocols.telegram.webhook import telegram_webhook

# Every process: for load balancers, orchestrators and Prometheus.
urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
]

if "telegram" in settings.GATEWAY_PROTOCOLS:
    urlpatterns += [
        path("telegram/webhook/", telegram_webhook, name="telegram-webhook"),
    ]

if "web" in settings.GATEWAY_PROTOCOLS:
    urlpatterns += [
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
