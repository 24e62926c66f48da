"""A webhook receiver for the tests: a small HTTP/1.1 server (asyncio, keep-alive) on a
free port of the test's own loop, recording every request and answering as the test says:
the first ``fail_first`` with 500, then ``status``; with ``hang``, never."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from protocols.webhook import signing
from tests.servers import free_port

REASONS = {200: "OK", 204: "No Content", 410: "Gone", 500: "Internal Server Error",
           503: "Service Unavailable"}


@dataclass
class Received:
    at: float  # monotonic, when it arrived
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int  # what it was answered (0: nothing, it hung)

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    def verify(self, secret: str) -> None:
        signing.verify(secret, self.headers, self.body)


class Receiver:
    def __init__(self, *, port: int | None = None, fail_first: int = 0, status: int = 200,
                 hang: bool = False, refuse_room: str | None = None) -> None:
        self.port = port or free_port()
        self.fail_first, self.status, self.hang = fail_first, status, hang
        self.refuse_room = refuse_room  # events of this room get a 400 (the others are taken)
        self.requests: list[Received] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> Receiver:
        self._stopping.clear()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        # Not cancelled (Python 3.11's streams log a cancelled handler as an error): told.
        self._stopping.set()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what it was sent ----------------------------------------------------------------

    def accepted(self) -> list[Received]:
        return [r for r in self.requests if r.accepted]

    def cursors(self) -> list[int]:
        """The cursors of the requests it accepted, in the order they came."""
        return [r.payload["cursor"] for r in self.accepted()]

    async def wait(self, condition, timeout: float = 10.0, what: str = "not in time") -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():  # noqa: ASYNC110 (the server tells nobody; polled)
                    await asyncio.sleep(0.01)
        except TimeoutError:
            seen = [(r.status, r.body[:80]) for r in self.requests]
            raise AssertionError(f"{what}: received {seen}") from None

    # --- serving -----------------------------------------------------------------------------

    def _answer(self, body: bytes) -> int:
        if self.hang:
            return 0
        if self.refuse_room is not None and json.loads(body).get("room") == self.refuse_room:
            return 400
        if self.fail_first > 0:
            self.fail_first -= 1
            return 500
        return self.status

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await self._unless_stopping(reader.readuntil(b"\r\n\r\n"))
                if head is None:
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self._answer(body)
                self.requests.append(Received(time.monotonic(), path, headers, body, status))
                if status == 0:
                    await self._stopping.wait()  # never answers (until the test stops it)
                    return
                writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
                             "Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _unless_stopping(self, read) -> bytes | None:
        """What ``read`` reads, or None once the receiver stops (or the client went)."""
        reading = asyncio.ensure_future(read)
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not reading.done():
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            return None
        try:
            return reading.result()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
