from django.urls import path, re_path

from gateway import downloads, views
from gateway.adapters import adapters_enabled

# Every process: for load balancers, orchestrators and Prometheus.
urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    # Attachments, behind signed URLs: every protocol links to them (gateway/downloads.py).
    re_path(r"^files/(?P<key>[A-Za-z0-9_-]{22})/(?P<name>[^/]{1,255})$", downloads.file_view,
            name="file"),
]

# Then the routes of the protocol adapters this process runs (gateway/adapters.py).
for adapter in adapters_enabled():
    urlpatterns += adapter.http_routes()
