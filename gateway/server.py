"""daphne, started in-process by ``gateway run``, with a graceful shutdown.

On SIGTERM or SIGINT: stop accepting connections, close every open scope with code 1012
(clients reconnect and resume), leave the channel layer, remove this process's presence,
then stop the reactor.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import daphne.server  # isort:skip  (installs the asyncio reactor before twisted is imported)
from twisted.internet import reactor, tcp

from gateway import status
from gateway.fanout import FRAME_WRITER_EXTENSION
from gateway.runtime import get_runtime, stop_runtime

logger = logging.getLogger(__name__)


class FrameWriter:
    """Write one prepared WebSocket frame to many daphne sockets (a scope extension).

    A room message is framed once per process (autobahn's ``prepareMessage``, the library's
    own broadcast facility) and the same bytes are written to every member's transport,
    skipping the per-send ASGI, session-wrapper and framing work. Consumers use it when
    the scope offers it and fall back to the ASGI ``send`` otherwise.
    """

    __slots__ = ("protocol", "factory")

    def __init__(self, protocol, factory) -> None:
        self.protocol = protocol
        self.factory = factory

    def prepare(self, text: str):
        return self.factory.prepareMessage(text.encode("utf-8"), isBinary=False)

    def is_open(self) -> bool:
        return self.protocol.state == self.protocol.STATE_OPEN

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel: how far the client lags."""
        transport = self.protocol.transport
        return len(getattr(transport, "dataBuffer", b"")) + getattr(transport, "_tempDataLen", 0)

    def send(self, prepared) -> None:
        protocol = self.protocol
        if protocol._perMessageCompress is not None or protocol.send_queue:
            return protocol.sendPreparedMessage(prepared)
        data = prepared.payloadHybi
        transport = protocol.transport
        # Twisted's write() only buffers and waits for the next writable event: two epoll
        # changes and a loop turn per socket. Like asyncio's transports (and the floor),
        # try the socket first when nothing is queued; only a remainder goes to Twisted.
        # Plain TCP only: under TLS the transport is a wrapper, and takes the normal path.
        if (
            type(transport) is tcp.Server
            and not transport.dataBuffer
            and not transport._tempDataLen
        ):
            try:
                sent = transport.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the connection is gone; Twisted notices on its next read
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)


class GatewayServer(daphne.server.Server):
    """daphne plus the other protocol servers (``services``: objects with async ``start`` and
    ``stop``, started in order once the loop runs and stopped in reverse at shutdown)."""

    def __init__(self, *args, on_listening=None, services=(), **kwargs):
        super().__init__(*args, signal_handlers=False, **kwargs)
        self.services = list(services)
        self._started_services: list = []
        self._services_task: asyncio.Future | None = None
        self.ports = []
        self._on_listening = on_listening
        self._stopping = False
        self.exit_code = 0
        self._shutdown_task: asyncio.Future | None = None

    def run(self) -> None:
        reactor.callWhenRunning(self._install_signal_handlers)
        reactor.callWhenRunning(self._configure_websockets)
        reactor.callWhenRunning(self._start_services)
        super().run()
        self._finish_loop()

    @staticmethod
    def _finish_loop() -> None:
        """Cancel what is still pending and close the loop, rather than leave suspended
        coroutines to the interpreter's final garbage collection (which crashed CPython
        3.11 here when a socket closed during shutdown)."""
        loop = reactor._asyncioEventloop
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def create_application(self, protocol, scope):
        if scope.get("type") == "websocket":
            scope.setdefault("extensions", {})[FRAME_WRITER_EXTENSION] = FrameWriter(
                protocol, self.ws_factory
            )
        return super().create_application(protocol, scope)

    def listen_success(self, port) -> None:
        super().listen_success(port)
        self.ports.append(port)
        status.register("web", self.status)
        if self._on_listening is not None:
            self._on_listening(port.getHost())

    def status(self) -> dict:
        """For /readyz and the dashboard: listening, and not shutting down."""
        from django.conf import settings

        return {"ready": bool(self.ports) and not self._stopping,
                "listening": [port.getHost().port for port in self.ports],
                "serves": "chat" if "web" in settings.GATEWAY_PROTOCOLS else "health only"}

    def _configure_websockets(self) -> None:
        # On a protocol violation (invalid UTF-8, a frame over the size limit) send the
        # close frame with its code (1007, 1009) instead of dropping the TCP connection,
        # so the client learns why.
        self.ws_factory.setProtocolOptions(failByDrop=False)

    def _start_services(self) -> None:
        self._services_task = asyncio.ensure_future(self._run_services())

    async def _run_services(self) -> None:
        # The hub and presence first, so this process is registered before any client. If
        # the channel layer is down now, the first scope that needs it starts them later.
        try:
            await get_runtime()
        except Exception:
            logger.exception("could not start the runtime yet; will retry on first use")
        for service in self.services:
            try:
                await service.start()
            except Exception:
                logger.critical("could not start %s; stopping", type(service).__name__,
                                exc_info=True)
                self.exit_code = 1
                self._on_signal(signal.SIGTERM)
                return
            self._started_services.append(service)

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            logger.warning("second %s: stopping now", sig.name)
            reactor.stop()
            return
        self._stopping = True
        logger.info("received %s: shutting down gracefully", sig.name)
        self._shutdown_task = asyncio.ensure_future(self._shutdown())

    async def _shutdown(self) -> None:
        for port in self.ports:
            port.stopListening()
        try:
            for service in reversed(self._started_services):
                await asyncio.wait_for(service.stop(), timeout=10)
            await asyncio.wait_for(stop_runtime(), timeout=10)
            await asyncio.sleep(0.2)  # let close frames reach the wire
        except Exception:
            logger.exception("graceful shutdown incomplete")
        finally:
            reactor.stop()
