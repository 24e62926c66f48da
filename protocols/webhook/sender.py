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
- ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` are honoured, as httpx does by default: an
  egress proxy is how a deployment limits where webhooks may go.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

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


class WebhookSender:
    """POSTs webhook deliveries over one connection pool."""

    def __init__(self, *, timeout: float) -> None:
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE),
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
