"""The HTTP side of webhooks: one POST, and what came of it. Started and stopped by
``gateway run`` before and after the relay that uses it.

- One ``httpx.AsyncClient`` for every webhook, with no cap on its connections: a receiver
  that answers slowly or not at all holds only the connections of its own requests, and
  each target has its own worker in the relay, so it delays nobody else.
- Every attempt has one deadline (``settings.WEBHOOK["TIMEOUT"]``) for all of it: connect,
  send, and the answer, of which at most ``ANSWER_BYTES`` are read (a receiver trickling
  an endless answer costs the timeout, no more).
- Redirects are not followed (the Standard Webhooks specification: update the URL
  instead); a 3xx is a failure.
- Where a receiver may be: the host is resolved at connect time and the connection made to
  an address that was checked (``AddressGuard``), so a name that points (or is re-pointed,
  DNS rebinding) at the machine itself, a private network or the cloud's metadata service
  is refused: loopback, private, shared (CGNAT), unique-local, unspecified, multicast and
  reserved addresses unless ``settings.WEBHOOK["ALLOW_PRIVATE"]``; link-local always.
- ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are honoured, as httpx does by default: an
  egress proxy is how a deployment limits where webhooks may go (the guard then leaves the
  proxy's address alone: the proxy decides).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
from httpcore._backends.auto import AutoBackend

from gateway.debug import url_credentials_mask

USER_AGENT = "rt-gateway-webhooks/1"
ANSWER_BYTES = 4096  # of an answer read (an error's excerpt; a short answer keeps its connection)
EXCERPT = 200  # characters of an error answer kept in ``last_error``
KEEPALIVE = 100  # idle connections kept for the next deliveries (not a cap on connections)

# What came of an attempt (the ``result`` label of gateway_webhook_deliveries_total).
OK, ERROR_STATUS, TIMEOUT, UNREACHABLE = "ok", "error_status", "timeout", "unreachable"


@dataclass(frozen=True)
class Answer:
    """What came of one POST."""

    result: str  # OK, ERROR_STATUS, TIMEOUT or UNREACHABLE
    status: int | None  # the HTTP status, if the receiver answered
    detail: str  # for logs and ``last_error``: never the URL
    seconds: float  # how long the attempt took

    @property
    def ok(self) -> bool:
        return self.result == OK


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_refused(address: Address, *, allow_private: bool) -> str | None:
    """Why a receiver may not be at ``address`` (None: it may)."""
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.1 is 10.0.0.1
    if mapped is not None:
        address = mapped
    if address.is_link_local:
        return "a link-local address (the machine's metadata service)"
    if allow_private:
        return None
    if address.is_loopback or address.is_unspecified:
        return "this machine"
    if address.is_multicast or address.is_reserved:
        return "a multicast or reserved address"
    if address.is_private or address in SHARED:
        return "a private network (GATEWAY_WEBHOOK_ALLOW_PRIVATE=1 allows it)"
    return None


SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not is_private


class AddressGuard(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, connecting only to addresses ``address_refused`` allows: the
    name is resolved here and the connection made to the address checked (TLS still checks
    the certificate against the name)."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._backend = AutoBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
                          local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve the host: {exc}") from None
        refused = ""
        for *_, sockaddr in found:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            why = address_refused(address, allow_private=self.allow_private)
            if why is None:
                return await self._backend.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options)
            refused = why
        raise httpcore.ConnectError(f"the receiver's address is refused: {refused}")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks do not go to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class WebhookSender:
    """POSTs webhook deliveries over one connection pool."""

    def __init__(self, *, timeout: float, allow_private: bool = False) -> None:
        self.timeout = timeout
        self.allow_private = allow_private
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE))
        # httpx's transport does not take a network backend; the httpcore pool under it does.
        transport._pool._network_backend = AddressGuard(allow_private=self.allow_private)
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
        )

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        """POST ``body`` (JSON) to ``url``; what came of it (never raises for the receiver's
        failures: a bad status, a timeout, a refused connection are answers too)."""
        if self._client is None:
            raise RuntimeError("the webhook sender is not started")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client.stream(
                    "POST", url, content=body,
                    headers={**headers, "content-type": "application/json"},
                ) as response:
                    answer = await _read_some(response, ANSWER_BYTES)
        except (TimeoutError, httpx.TimeoutException):
            return Answer(TIMEOUT, None, f"no answer within {self.timeout:g}s",
                          time.monotonic() - started)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return Answer(UNREACHABLE, None, _describe(exc), time.monotonic() - started)
        seconds = time.monotonic() - started
        status = response.status_code
        if 200 <= status < 300:
            return Answer(OK, status, f"HTTP {status}", seconds)
        return Answer(ERROR_STATUS, status, _status_detail(response, answer), seconds)


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the answer, as sent (not decompressed: no bomb)."""
    read = b""
    async for chunk in response.aiter_raw():
        read += chunk
        if len(read) >= limit:
            break
    return read[:limit]


def _status_detail(response: httpx.Response, answer: bytes) -> str:
    reason = response.reason_phrase or ""
    excerpt = " ".join(answer.decode("utf-8", "replace").split())[:EXCERPT]
    detail = f"HTTP {response.status_code} {reason}".rstrip()
    if 300 <= response.status_code < 400:
        detail += " (redirects are not followed: register the URL it points to)"
    return f"{detail}: {excerpt}" if excerpt else detail


def _describe(exc: Exception) -> str:
    """An error without the URL's credentials (httpx's messages rarely hold the URL)."""
    text = url_credentials_mask(str(exc)).strip()
    name = type(exc).__name__
    return f"{name}: {text}"[:EXCERPT] if text else name
