"""Devices from a Telegram chat, end to end: ``gateway run`` with the bot pointed at the Bot
API stand-in (tests/botapi.py) and MQTT at a real Mosquitto, devices as aiomqtt clients.
``/who`` and ``/devices`` show their status and last state; ``/cmd`` sends one a command,
whose answer comes back through the relay as a reply to the chat's command."""

from __future__ import annotations

import asyncio

import pytest

from bots.conversation import CMD_USAGE
from tests.botapi import BotApiStandIn
from tests.helpers import (
    ALICE,
    BEN,
    answer_commands,
    devices_of,
    history,
    mqtt_env,
    mqtt_ready,
    say,
    tg_env,
    thermostat,
    wait_until,
)

pytestmark = pytest.mark.slow


def told(api: BotApiStandIn, chat_id: int, text: str) -> str:
    """Send ``text`` from a chat and wait for the bot's one answer (blocking)."""
    before = len(api.sent_to(chat_id))
    api.text_update(chat_id, text)
    return api.wait_sent(chat_id, before + 1)[before]["visible_text"]


async def test_who_and_devices_show_status_and_state_and_cmd_is_answered_in_the_chat(
    api, gateway_factory, mosquitto
):
    gw = gateway_factory(env=tg_env(api, **mqtt_env(mosquitto))).start()
    await mqtt_ready(gw)
    thermo = await thermostat(mosquitto)  # online, its state retained, a will: offline
    await thermo.subscribe("rooms/home/cmd/thermo1", qos=1)
    seen: list = []
    answering = asyncio.create_task(answer_commands(thermo, mqtt5=False, seen=seen))
    await wait_until(lambda: devices_of(gw, "home").get("thermo1", {}).get("state"), 15,
                     "the device's state is not known")
    assert "You joined home" in (await say(api, ALICE, "/join home"))[0]
    await say(api, BEN, "/join home", user_id=BEN, username="ben", first_name="Ben")

    (who,) = await say(api, ALICE, "/who")
    assert who.splitlines()[-2] == "Devices:"
    assert who.splitlines()[-1].startswith("• thermo1 — online since ")
    (listed,) = await say(api, ALICE, "/devices")
    assert listed.splitlines()[0] == "Devices in home:"
    assert listed.splitlines()[1].startswith("• thermo1 — online since ")
    assert listed.splitlines()[2] == "  ↳ temperature: 20.5, target: 21"

    # A command: the device gets it from the chat's user and answers; the answer reaches
    # the chat as a reply to its command, which is not sent back to it.
    alice_before, ben_before = len(api.sent_to(ALICE)), len(api.sent_to(BEN))
    sent = api.text_update(ALICE, "/cmd thermo1 set 22")
    (answer,) = (await api.wait_sent_async(ALICE, alice_before + 1, timeout=15))[alice_before:]
    assert answer["visible_text"] == "thermo1 (mqtt): done: set 22"
    assert answer["reply_to_message"]["message_id"] == sent["message"]["message_id"]
    ((topic, payload, _),) = seen
    assert topic == "rooms/home/cmd/thermo1"
    assert payload["command"] == "set 22" and payload["id"]
    assert (payload["sender"]["protocol"], payload["sender"]["name"]) == ("telegram", "Alice")
    command, reply = history(gw, "home")
    assert (command["message"], command["sender"]["protocol"]) == (
        "/cmd thermo1 set 22", "telegram")
    assert (reply["message"], reply["sender"]["id"], reply["reply_to"]["id"]) == (
        "done: set 22", "thermo1", command["id"])
    # Another chat in the room sees both, the command from its sender.
    ben = await api.wait_sent_async(BEN, ben_before + 2)
    assert [m["visible_text"] for m in ben[ben_before:]] == [
        "Alice (telegram): /cmd thermo1 set 22", "thermo1 (mqtt): done: set 22"]

    # Telegram delivers the update again: the command is not sent twice.
    api.repeat_update(sent["update_id"])
    await say(api, ALICE, "/help")  # handled after the repeated one
    await asyncio.sleep(1.0)
    assert len(seen) == 1 and len(history(gw, "home")) == 2

    # Refusals and usage, answered in the chat.
    (ghost,) = await say(api, ALICE, "/cmd ghost x")
    assert ghost == "Not sent: no device ghost in this room (/devices lists them)."
    assert await say(api, ALICE, "/cmd") == [CMD_USAGE]
    assert await say(api, ALICE, "/cmd thermo1") == [CMD_USAGE]

    # Killed without a word: the broker fires its will, and /who says so.
    thermo._client._sock.close()  # noqa: SLF001 - a crash, not a DISCONNECT
    await wait_until(lambda: "thermo1 — offline since " in told(api, ALICE, "/who"), 20,
                     "/who does not say the device is offline")
    answering.cancel()
    shown = [m["visible_text"] for m in api.sent_to(ALICE)]
    assert "Alice (telegram): /cmd thermo1 set 22" not in shown  # never sent back to it


async def test_devices_needs_a_room_and_says_when_there_are_none(api, gateway_factory, mosquitto):
    gateway_factory(env=tg_env(api, **mqtt_env(mosquitto))).start()
    (hint,) = await say(api, ALICE, "/devices")
    assert hint.startswith("Join a room first")
    assert (await say(api, ALICE, "/cmd thermo1 set 22"))[0].startswith("Join a room first")
    await say(api, ALICE, "/join empty")
    assert await say(api, ALICE, "/devices") == ["No devices in this room."]
    (help_text,) = await say(api, ALICE, "/help")
    assert "/devices:" in help_text and "/cmd <device> <command>:" in help_text
