from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Real-time gateway"

    def ready(self) -> None:
        from gateway import checks  # noqa: F401  (registers the system checks)
        from gateway.adapters import adapters_all

        adapters_all()  # the configured protocols, their sender protocols registered
