"""The Python floor: a bare ``websockets`` broadcast server, no framework, no layer.

It does what the gateway does per message at the least possible cost: parse the client's
JSON, stamp an id, encode once, write the same frame to every socket in the room.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import defaultdict

import websockets

rooms: dict[str, set] = defaultdict(set)
ids: dict[str, int] = defaultdict(int)


async def handler(ws) -> None:
    room = ws.request.path.split("?")[0]
    rooms[room].add(ws)
    try:
        async for text in ws:
            data = json.loads(text)
            ids[room] += 1
            frame = json.dumps({"type": "message", "message": data["message"], "id": ids[room]})
            websockets.broadcast(rooms[room], frame)
    finally:
        rooms[room].discard(ws)


async def main(port: int) -> None:
    async with websockets.serve(handler, "127.0.0.1", port, compression=None, max_queue=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
