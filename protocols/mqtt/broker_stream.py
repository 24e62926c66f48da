"""A connection's bytes into the embedded broker: packets over the size limit and a CONNECT
that does not come are refused from the header, before anything else is read."""

from __future__ import annotations

import asyncio
import time

from amqtt.adapters import ReaderAdapter

CONNECT_TIMEOUT = 10.0  # seconds for a new connection's CONNECT to arrive
PROTOCOL_LIMIT = 268_435_460  # MQTT's largest packet: what the gateway's own client may send


class PacketRefused(ConnectionResetError):
    """Raised by the reader in place of the data: amqtt takes it as the connection's end."""


class PacketLimitReader(ReaderAdapter):
    """amqtt's stream reader, following MQTT's framing (fixed header: a type byte, then the
    remaining length in 1-4 bytes of 7 bits) to refuse an oversized packet from its header."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 limit: int, on_refused) -> None:
        self._reader, self._writer = reader, writer
        self.limit = limit
        self._on_refused = on_refused  # (reason, size) -> None
        self._header = bytearray()  # the fixed header read so far
        self._body_left = 0  # bytes of the current packet still to come
        self.packets = 0  # complete packets read
        self._connect_by = time.monotonic() + CONNECT_TIMEOUT

    async def read(self, n: int = -1) -> bytes:
        read = self._reader.read(n) if n == -1 else self._reader.readexactly(n)
        if self.packets == 0:
            try:
                data = await asyncio.wait_for(read, self._connect_by - time.monotonic())
            except TimeoutError:
                self._refuse("no_connect", 0)
        else:
            data = await read
        self._follow(data)
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _follow(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - i)
                self._body_left -= step
                i += step
                self.packets += self._body_left == 0
                continue
            self._header.append(data[i])
            i += 1
            if len(self._header) >= 2 and not self._header[-1] & 0x80:
                self._header_done()
            elif len(self._header) > 5:
                self._refuse("malformed_packet", 0)

    def _header_done(self) -> None:
        length = sum((byte & 0x7F) << (7 * i) for i, byte in enumerate(self._header[1:]))
        size = len(self._header) + length
        self._header.clear()
        if size > self.limit:
            self._refuse("packet_too_large", size)
        self._body_left = length
        self.packets += length == 0

    def _refuse(self, reason: str, size: int):
        self._writer.transport.abort()  # read no more of it
        self._on_refused(reason, size)
        raise PacketRefused(reason)
