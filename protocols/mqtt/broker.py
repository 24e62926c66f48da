"""The embedded MQTT broker (amqtt), for `gateway run` on embedded defaults."""

from __future__ import annotations

import logging

from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig

logger = logging.getLogger(__name__)


class EmbeddedBroker:
    """An anonymous broker on ``host:port``; for a real deployment use MQTT_URL."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._broker: Broker | None = None

    async def start(self) -> None:
        self._broker = Broker(  # binds to the running loop, so made here
            BrokerConfig(
                listeners={"default": ListenerConfig(bind=f"{self.host}:{self.port}")},
                plugins={
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            )
        )
        await self._broker.start()
        logger.info("embedded MQTT broker listening",
                    extra={"protocol": "mqtt", "broker": f"mqtt://{self.host}:{self.port}"})

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
