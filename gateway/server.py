"""daphne, started in-process by ``gateway run``, with a graceful shutdown.

On SIGTERM or SIGINT: stop accepting connections, end every open scope (sockets get 4012,
streams end: clients reconnect and resume), leave the channel layer, remove this process's presence,
then stop the reactor.

Slow clients cannot hold connections: a request's headers must arrive within
``GATEWAY_HTTP_HEADER_TIMEOUT`` of the connection (or of the previous response on a kept-alive
one), an idle connection closes after ``GATEWAY_HTTP_IDLE_TIMEOUT``, a WebSocket handshake must
complete within ``GATEWAY_WS_HANDSHAKE_TIMEOUT``, and the process raises its open-file limit
to the hard limit at start. ``/metrics`` shows the open connections by state.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import resource
import signal
import sys
import weakref
from typing import Any

import daphne.server  # isort:skip  (installs the asyncio reactor before twisted is imported)
from daphne.http_protocol import WebRequest
from daphne.ws_protocol import WebSocketProtocol
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from twisted.internet import reactor as _reactor
from twisted.internet import tcp
from twisted.web import http

from gateway import status
from gateway.fanout import (
    CONNECTION_OPEN_EXTENSION,
    FRAME_WRITER_EXTENSION,
    SEND_BUFFER_EXTENSION,
)
from gateway.runtime import get_runtime, stop_runtime

logger = logging.getLogger(__name__)
# The installed reactor: Twisted's stubs type the module attribute as the interfaces it
# provides, not as the asyncio reactor with its own methods.
reactor: Any = _reactor


def transport_buffered(protocol) -> int:
    """Bytes a connection has written but the kernel has not taken yet."""
    transport = getattr(protocol, "transport", None)
    return len(getattr(transport, "dataBuffer", b"")) + getattr(transport, "_tempDataLen", 0)


def request_open(request) -> bool:
    """Whether an HTTP request's client is still connected and its response not finished
    (Twisted's ``Request`` marks both)."""
    return not getattr(request, "_disconnected", False) and not getattr(request, "finished", False)


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
        return transport_buffered(self.protocol)

    def fail(self, code: int, reason: str) -> None:
        """Close with a protocol-level code (1008), as autobahn closes with 1007 or 1009.

        daphne passes ``websocket.close`` codes to autobahn's ``sendClose``, which takes only
        1000 and 3000-4999, and keeps queueing the frames that arrive during the close
        handshake for an application that has finished. So: mute daphne's protocol (nothing
        more is queued, and no disconnect: the consumer stops by itself) and send the close
        frame.
        """
        self.protocol.muted = True
        self.protocol.sendCloseFrame(code=code, reasonUtf8=reason.encode())

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


class GatewayWebSocketProtocol(WebSocketProtocol):
    """daphne's WebSocket protocol, lighter per connection (``websocket_protocol_for`` makes
    the class for a factory):

    - its options (autobahn copies some 30 of them from the factory into every connection,
      then pretty-prints them for a debug line nobody reads: ~0.1 ms a connect) are class
      attributes of the factory's own subclass, shared by its connections;
    - once the connection is open, what only the handshake needed (the request's bytes,
      headers and query, the response's bytes) is let go (the parsed request stays: daphne
      logs its path at the close).
    """

    # autobahn's own setup, with nothing left to copy or list.
    CONFIG_ATTRS: tuple[str, ...] = ()
    OPTIONS = tuple(WebSocketProtocol.CONFIG_ATTRS)
    # daphne's onClose still reads ``request.path``: the request stays.
    HANDSHAKE_ONLY = ("http_request_data", "http_response_data", "http_headers",
                      "http_request_params")

    def onOpen(self) -> None:  # noqa: N802 (autobahn's names)
        super().onOpen()
        self.handshake_forget()

    def handshake_forget(self) -> None:
        for name in self.HANDSHAKE_ONLY:
            self.__dict__.pop(name, None)


def websocket_protocol_for(factory) -> type[GatewayWebSocketProtocol]:
    """A ``GatewayWebSocketProtocol`` class holding ``factory``'s options as they are now
    (set them before: later ``setProtocolOptions`` calls would not reach its connections)."""
    options = {}
    for name in GatewayWebSocketProtocol.OPTIONS:
        value = getattr(factory, name)
        # A function option (a compression offer's accept) stays a plain function.
        options[name] = staticmethod(value) if inspect.isfunction(value) else value
    return type("WebSocketProtocol", (GatewayWebSocketProtocol,), options)


class ScopeInbox:
    """The events daphne's protocol puts for a socket's application, as an ``asyncio.Queue``
    would take them (``put_nowait``, ``get``) for its one reader, at a fraction of its size:
    an idle socket holds an empty list, where a queue holds four deques (~3 KB)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            if self._waiter is not None and not self._waiter.done():
                raise RuntimeError("a socket's events have one reader")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def qsize(self) -> int:
        return len(self._items)


class HeaderDeadlineChannel(http.HTTPChannel):
    """Twisted's HTTP channel with a deadline for the request headers.

    Twisted's own idle timeout restarts with every byte, so a client sending a header line
    every few seconds holds a connection forever (slowloris); this deadline does not move.
    """

    header_timeout = 10.0
    reading_headers: weakref.WeakSet[HeaderDeadlineChannel] = weakref.WeakSet()
    _deadline: Any = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's names)
        super().connectionMade()
        self._arm()

    def allHeadersReceived(self) -> None:  # noqa: N802
        self._disarm()
        super().allHeadersReceived()

    def requestDone(self, request) -> None:  # noqa: N802
        # Armed for the next request on this kept-alive connection before Twisted reads
        # it: a pipelined request already buffered is parsed inside requestDone, and its
        # headers being complete disarm the deadline again.
        self._arm()
        super().requestDone(request)
        if not self.persistent or self.transport is None or self.transport.disconnecting:
            self._disarm()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = reactor.callLater(self.header_timeout, self._headers_too_slow)
        self.reading_headers.add(self)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.reading_headers.discard(self)

    def _headers_too_slow(self) -> None:
        self._deadline = None
        self.reading_headers.discard(self)
        transport: Any = self.transport
        if transport is None:
            return
        peer = transport.getPeer()
        logger.warning("closed a connection that sent no complete request in %.0fs",
                       self.header_timeout,
                       extra={"protocol": "http", "peer": str(getattr(peer, "host", peer))})
        transport.abortConnection()


class ConnectionsCollector:
    """``gateway_open_connections{state}`` for /metrics, read when scraped: connections
    still sending their request headers, HTTP requests in progress, open WebSockets."""

    def __init__(self, server: daphne.server.Server) -> None:
        self.server = server

    def collect(self):
        counts = {"reading_headers": len(HeaderDeadlineChannel.reading_headers),
                  "http": 0, "websocket": 0}
        for protocol, details in list(getattr(self.server, "connections", {}).items()):
            if "disconnected" in details:
                continue
            if isinstance(protocol, WebSocketProtocol):
                counts["websocket"] += 1
            elif isinstance(protocol, WebRequest):
                counts["http"] += 1
        family = GaugeMetricFamily(
            "gateway_open_connections", "Open connections of this process's HTTP server",
            labels=["state"],
        )
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family


def open_files_limit_raise() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit (each connection
    is a file); the limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            logger.warning("could not raise the open-file limit", extra={"soft": soft})
    return soft, hard


class GatewayServer(daphne.server.Server):
    """daphne plus the other protocol servers (``services``: objects with async ``start`` and
    ``stop``, started in order once the loop runs and stopped in reverse at shutdown)."""

    def __init__(self, *args, on_listening=None, services=(), header_timeout: float = 10.0,
                 idle_timeout: float = 60.0, **kwargs):
        super().__init__(*args, signal_handlers=False, **kwargs)
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.listening: list[int] = []  # the ports, read while listening (not after stop)
        self.services = list(services)
        self._started_services: list = []
        self._services_task: asyncio.Future | None = None
        self.ports: list[Any] = []
        self._on_listening = on_listening
        self._stopping = False
        self.exit_code = 0
        self._shutdown_task: asyncio.Future | None = None

    def run(self) -> None:
        soft, _ = open_files_limit_raise()
        logger.info("open-file limit %d", soft, extra={"protocol": "http"})
        collector = ConnectionsCollector(self)
        REGISTRY.register(collector)
        reactor.callWhenRunning(self._install_signal_handlers)
        reactor.callWhenRunning(self._configure_protocols)
        reactor.callWhenRunning(self._start_services)
        try:
            super().run()
            self._finish_loop()
        finally:
            REGISTRY.unregister(collector)

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
        extensions = scope.setdefault("extensions", {})
        if scope.get("type") == "websocket":
            extensions[FRAME_WRITER_EXTENSION] = FrameWriter(protocol, self.ws_factory)
            return self._websocket_application(protocol, scope)
        # An HTTP response, perhaps a long stream.
        extensions[SEND_BUFFER_EXTENSION] = functools.partial(transport_buffered, protocol)
        extensions[CONNECTION_OPEN_EXTENSION] = functools.partial(request_open, protocol)
        return super().create_application(protocol, scope)

    def _websocket_application(self, protocol, scope) -> ScopeInbox | None:
        """daphne's ``create_application`` (4.x) for a socket, with a ``ScopeInbox`` where it
        has an ``asyncio.Queue``: the application instance is started and kept for daphne's
        checks, and the protocol gets the inbox to put its events in."""
        assert "application_instance" not in self.connections[protocol]
        inbox = ScopeInbox()
        scope.setdefault("asgi", {"version": "3.0"})
        instance = self.application(scope=scope, receive=inbox.get,
                                    send=functools.partial(self.handle_reply, protocol))
        if protocol not in self.connections:  # gone meanwhile
            instance.close()
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(instance)
        return inbox

    def listen_success(self, port) -> None:
        super().listen_success(port)
        self.ports.append(port)
        self.listening.append(port.getHost().port)
        status.register("web", self.status)
        if self._on_listening is not None:
            self._on_listening(port.getHost())

    def status(self) -> dict:
        """For /readyz and the dashboard: listening, and not shutting down."""
        from django.conf import settings

        return {"ready": bool(self.ports) and not self._stopping,
                "listening": list(self.listening),
                "serves": list(settings.GATEWAY_PROTOCOLS)}

    def listen_error(self, failure) -> None:
        """The HTTP port cannot be had (taken, not allowed): say so and exit non-zero."""
        print(f"gateway run: cannot listen for HTTP: {failure.getErrorMessage()}",
              file=sys.stderr, flush=True)
        self.exit_code = 1
        super().listen_error(failure)

    def _configure_protocols(self) -> None:
        # On a protocol violation (invalid UTF-8, a frame over the size limit) send the
        # close frame with its code (1007, 1009) instead of dropping the TCP connection,
        # so the client learns why.
        self.ws_factory.setProtocolOptions(failByDrop=False)
        self.ws_factory.protocol = websocket_protocol_for(self.ws_factory)
        # Every HTTP connection from now on gets the header deadline and the idle timeout
        # (nothing is accepted before the reactor runs).
        header_timeout = self.header_timeout

        class Channel(HeaderDeadlineChannel):
            pass

        Channel.header_timeout = header_timeout
        self.http_factory.protocol = lambda: http._GenericHTTPChannelProtocol(Channel())
        self.http_factory.timeOut = self.idle_timeout

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
