"""Devices as members, over MQTT: their status and state kept, and commands published.

- **Status and state.** Every gateway process reads ``<prefix>/+/status/+`` and
  ``<prefix>/+/state/+`` (not shared: the broker replays the retained ones to each on
  subscribe, and each keeps the last of every device). The process holding the
  ``mqtt-devices`` lease writes them (gateway/devices.py ``devices_report``) in the order
  its broker delivered them, so there is one writer and one order; a process taking the
  lease over writes what it holds, which brings the rooms to the truth after a restart.
  Reports that arrive while a write is under way are gathered per device and topic: the
  last one is written (the room keeps the last, not each; a burst tells its end).
- **Commands.** A command sent in this process (``devices.command_dispatch``) is published
  at once on ``<prefix>/<room>/cmd/<device>`` (QoS 1; over MQTT 5 with its response topic,
  correlation data, expiry and content type) once claimed, so it goes out once whichever
  process publishes it; one sent where MQTT does not run is claimed by any process where it
  does within ``UNCLAIMED_AFTER`` and a scan. The answers come back through the device's
  scope (protocols/mqtt/consumers.py).
- **Time.** The lease holder also tells the rooms of commands that timed out, and marks
  ``unknown`` the online devices silent for ``MQTT_DEVICE_SILENCE``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace

from channels.db import database_sync_to_async
from django.db import DatabaseError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import devices, metrics
from gateway.errors import GatewayError
from gateway.lease import Lease
from protocols.mqtt import wire
from protocols.mqtt.server import MqttServer, ServerStopped

logger = logging.getLogger(__name__)

LEASE = "mqtt-devices"
WRITE_BATCH = 200  # reports written by one call
RETRY = 1.0  # seconds before writes the database refused are tried again
SCAN_INTERVAL = 0.5  # seconds between looks for commands due (timeouts, unclaimed)
SILENCE_INTERVAL = 5.0  # seconds between looks for silent devices
FORGET_INTERVAL = 3600.0  # seconds between removals of old commands
UNCLAIMED_AFTER = 2.0  # seconds a command waits for the process that sent it to publish it


class DeviceKeeper:
    def __init__(self, server: MqttServer, *, prefix: str, silence: float) -> None:
        self.server = server
        self.prefix = prefix
        self.silence = silence
        self.lease = Lease(LEASE)
        # The last report of each device, topic and room: (room, device, kind) -> report.
        self.latest: dict[tuple[str, str, str], devices.Report] = {}
        self.dirty: dict[tuple[str, str, str], devices.Report] = {}  # to write, in order
        self._wake = asyncio.Event()
        self._commands: asyncio.Queue[devices.Command] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"reports": 0, "written": 0, "refused": 0, "commands": 0}
        # From the first connection on: the retained reports come with the subscription.
        server.device_reports = self.report

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        devices.command_dispatcher_install(self.dispatch)
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="mqtt-devices-lease"),
            asyncio.create_task(self._write_loop(), name="mqtt-devices-write"),
            asyncio.create_task(self._publish_loop(), name="mqtt-commands"),
            asyncio.create_task(self._scan_loop(), name="mqtt-devices-scan"),
        ]

    async def stop(self) -> None:
        devices.command_dispatcher_install(None)
        self.server.device_reports = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lease.release()

    # --- status and state ------------------------------------------------------------

    def report(self, topic: wire.DeviceTopic, payload: bytes, retained: bool) -> None:
        """What the server received on a status or state topic (on the loop)."""
        try:
            if topic.kind == wire.STATUS:
                status, detail = wire.status_decode(payload)
                report = devices.Report(room=topic.room, device_id=topic.device_id,
                                        kind="status", at=time.time(), live=not retained,
                                        status=status, detail=detail)
            else:
                report = devices.Report(room=topic.room, device_id=topic.device_id,
                                        kind="state", at=time.time(), live=not retained,
                                        state=wire.state_decode(payload))
        except GatewayError as exc:
            self.stats["refused"] += 1
            metrics.refused("mqtt", exc.code)
            logger.warning("refused a device's %s: %s", topic.kind, exc.detail, extra={
                "protocol": "mqtt", "room": topic.room, "device": topic.device_id,
                "code": exc.code})
            if not retained:
                self.server.error_reply(
                    wire.error_topic(self.prefix, topic.room, topic.device_id),
                    wire.error_payload(exc.code, exc.detail), exc.code)
            return
        self.stats["reports"] += 1
        key = (topic.room, topic.device_id, report.kind)
        self.latest[key] = report
        self.dirty.pop(key, None)  # to the end: written in the order received
        self.dirty[key] = report
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.dirty:
                if not self.lease.held:
                    self.dirty.clear()  # the holder writes them (it heard them too)
                    break
                keys = list(self.dirty)[:WRITE_BATCH]
                batch = [self.dirty.pop(key) for key in keys]
                try:
                    written = await database_sync_to_async(devices.devices_report)(batch)
                except DatabaseError:
                    logger.warning("could not write devices' status; retrying", exc_info=True,
                                   extra={"protocol": "mqtt"})
                    for key, report in zip(keys, batch, strict=True):
                        self.dirty.setdefault(key, report)  # unless a newer one came
                    await asyncio.sleep(RETRY)
                    continue
                except Exception:  # a bug: these reports are dropped, the next ones written
                    logger.exception("devices' status not written", extra={"protocol": "mqtt"})
                    continue
                self.stats["written"] += len(written)

    async def _lease_loop(self) -> None:
        while True:
            held = self.lease.held
            if await self.lease.renew() and not held:
                logger.info("holding the devices' lease", extra={"protocol": "mqtt"})
                # Write what this process holds: the truth as its broker replayed it.
                for key, report in self.latest.items():
                    self.dirty.setdefault(key, replace(report, live=False))
                self._wake.set()
            await asyncio.sleep(self.lease.ttl / 3)

    # --- commands --------------------------------------------------------------------

    def dispatch(self, command: devices.Command) -> None:
        """A command sent in this process: published at once (any thread may call)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._commands.put_nowait, command)

    async def _publish_loop(self) -> None:
        while True:
            command = await self._commands.get()
            try:
                if await database_sync_to_async(devices.command_claim)(key=command.key):
                    await self.publish(command)
            except DatabaseError:
                # Left unclaimed: published after UNCLAIMED_AFTER by whoever scans first.
                logger.warning("could not claim a command; it waits for the scan",
                               exc_info=True, extra={"protocol": "mqtt", "room": command.room})
            except ServerStopped:
                return
            except Exception:  # a bug: this command times out, the next ones go
                logger.exception("command not published", extra={
                    "protocol": "mqtt", "room": command.room, "device": command.device_id})

    async def publish(self, command: devices.Command) -> None:
        properties = None
        if self.server.mqtt5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = wire.reply_topic(self.prefix, command.room,
                                                        command.device_id)
            properties.CorrelationData = command.key.encode("ascii")
            properties.MessageExpiryInterval = max(1, math.ceil(command.timeout))
            properties.ContentType = "application/json"
        await self.server.publish(
            wire.cmd_topic(self.prefix, command.room, command.device_id),
            wire.command_payload(command.payload()), properties=properties)
        self.stats["commands"] += 1
        logger.info("published a command", extra={
            "protocol": "mqtt", "room": command.room, "device": command.device_id,
            "command_id": command.key, "sender": command.sender["id"]})

    # --- what time does --------------------------------------------------------------

    async def _scan_loop(self) -> None:
        silent_at = forgot_at = 0.0
        while True:
            await asyncio.sleep(SCAN_INTERVAL)
            try:
                await self._scan_unclaimed()
                if not self.lease.held:
                    continue
                await database_sync_to_async(devices.commands_expire)()
                now = time.monotonic()
                if self.silence and now - silent_at >= SILENCE_INTERVAL:
                    silent_at = now
                    await database_sync_to_async(devices.devices_silent)(
                        silence=self.silence, now=time.time())
                if now - forgot_at >= FORGET_INTERVAL:
                    forgot_at = now
                    await database_sync_to_async(devices.commands_forget)()
            except DatabaseError:
                logger.warning("devices' scan failed; will retry", exc_info=True,
                               extra={"protocol": "mqtt"})
            except Exception:  # a bug: logged, and the next scan tries again
                logger.exception("devices' scan failed", extra={"protocol": "mqtt"})

    async def _scan_unclaimed(self) -> None:
        """Publish the commands sent where MQTT does not run (or whose process failed to
        claim them): claimed, then published, in turn with this process's own."""
        if not self._commands.empty():
            return  # busy publishing (or waiting for the broker): the next scan will do
        for command in await database_sync_to_async(devices.commands_unclaimed)(
                older_than=UNCLAIMED_AFTER):
            self._commands.put_nowait(command)
