from django.urls import path

from gateway import views
from gateway.adapters import adapters_enabled

# Every process: for load balancers, orchestrators and Prometheus.
urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
]

# Then the routes of the protocol adapters this process runs (gateway/adapters.py).
for adapter in adapters_enabled():
    urlpatterns += adapter.http_routes()
