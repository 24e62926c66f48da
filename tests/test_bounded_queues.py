"""Queues that hold room traffic are bounded, and what passes the bound is recovered, not
lost: here the Telegram room relay whose worker is stuck (in-process, on the in-memory
layer; the publisher's and the MQTT outbox's bounds are tested beside their code)."""

from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator

from gateway import events, services
from protocols.telegram import consumers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

WEB = events.sender(protocol="web", id="anon:w", name="w")


async def test_a_stuck_room_relay_asks_to_be_ended_once_and_takes_nothing_more(monkeypatch):
    monkeypatch.setattr(consumers, "RELAY_PENDING_LIMIT", 3)
    stuck = asyncio.Event()
    relay_one = consumers.TelegramRoomConsumer._relay

    async def relay_stuck(self, event, chats):
        await stuck.wait()  # as if sending hung (the server's queue, the database)
        await relay_one(self, event, chats)

    monkeypatch.setattr(consumers.TelegramRoomConsumer, "_relay", relay_stuck)
    monkeypatch.setattr(consumers.selectors, "room_bot_chats",
                        lambda *, platform, room: {"A": 0})
    await database_sync_to_async(services.room_message_post)(
        room="jam", text="first", sender=WEB, origin="web-1"
    )
    relay = ApplicationCommunicator(consumers.TelegramRoomConsumer.as_asgi(),
                                    {"type": "telegram", "role": "room", "room": "jam"})
    await relay.send_input({"type": "chat.connect"})
    try:
        for i in range(8):
            await database_sync_to_async(services.room_message_post)(
                room="jam", text=f"m{i}", sender=WEB, origin="web-1"
            )
        # The worker took the first batch and hangs on it; three more wait, the next one
        # finds the relay full: it asks the server to end it, once, and takes no more.
        assert await relay.receive_output(timeout=5) == {"type": "chat.relay_behind",
                                                          "room": "jam"}
        stuck.set()  # the worker goes on with what it had taken
        sent = []
        while not await relay.receive_nothing(timeout=0.5):
            sent.append(await relay.receive_output())
        assert {m["type"] for m in sent} <= {"chat.send_message"}
        texts = [m["text"].split(": ", 1)[1] for m in sent]
        assert texts == ["first", "m0", "m1", "m2"][: len(texts)]  # in order, none past
    finally:
        stuck.set()
        await relay.send_input({"type": "chat.disconnect"})
        await relay.wait(timeout=5)
