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

from channels.db import database_sync_to_async
from django.db import DatabaseError, InterfaceError, OperationalError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import devices, metrics
from gateway.errors import GatewayError
from gateway.lease import Lease
from gateway.logging import LogSampler
from gateway.ratelimit import TokenBucket, flood_limit
from protocols.mqtt import wire
from protocols.mqtt.server import MqttServer, ServerStopped

logger = logging.getLogger(__name__)

LEASE = "mqtt-devices"
WRITE_BATCH = 200  # reports written by one call
RETRY = 1.0  # seconds before writes the database refused are tried again
SCAN_INTERVAL = 0.5  # seconds between looks for commands due (timeouts, unclaimed)
CONNECTED_CHECK = 0.25  # seconds between looks for the broker connection, without the lease
SILENCE_INTERVAL = 5.0  # seconds between looks for silent devices
FORGET_INTERVAL = 3600.0  # seconds between removals of old commands
UNCLAIMED_AFTER = 2.0  # seconds a command waits for the process that sent it to publish it
# Reports kept (each device's last per room and topic, what a takeover writes) and devices'
# limits kept: past it the oldest are forgotten (a device publishing to endless rooms costs
# bounded memory).
KEPT_MAX = 100_000
LOGGED_PER_CODE = 5  # refused reports logged per code (the rest counted in the metrics)
ERROR_REPLY_BURST = 10  # error replies to a device at once (then one a second)


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
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self.log_sample = LogSampler(LOGGED_PER_CODE)
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
        """What the server received on a status or state topic (on the loop). A live one
        spends the device's flood limit (a retained one is the broker's replay); a refused
        one is logged (the first few of each code) and answered on the device's error topic
        (a burst, then one a second)."""
        try:
            if not retained and not self._limits(topic.device_id)[0].allow():
                raise GatewayError("rate_limited", "too many status or state reports")
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
            return self._refuse(topic, exc, retained)
        self.stats["reports"] += 1
        key = (topic.room, topic.device_id, report.kind)
        self.latest.pop(key, None)  # to the end: the oldest are forgotten first
        if report.status is not None or report.state is not None:  # a clear is not kept
            self.latest[key] = report
            while len(self.latest) > KEPT_MAX:
                self.latest.pop(next(iter(self.latest)))
        self.dirty.pop(key, None)  # to the end: written in the order received
        self.dirty[key] = report
        self._wake.set()

    def _limits(self, device_id: str) -> tuple[TokenBucket, TokenBucket]:
        """A device's flood limit and error-reply limit (the most recent devices' kept)."""
        limits = self._buckets.pop(device_id, None) or (
            flood_limit(), TokenBucket(rate=1.0, burst=ERROR_REPLY_BURST))
        self._buckets[device_id] = limits
        while len(self._buckets) > KEPT_MAX:
            self._buckets.pop(next(iter(self._buckets)))
        return limits

    def _refuse(self, topic: wire.DeviceTopic, exc: GatewayError, retained: bool) -> None:
        self.stats["refused"] += 1
        metrics.refused("mqtt", exc.code)
        if self.log_sample.allow(exc.code):
            more = " (more are counted, not logged)" if self.log_sample.last_logged(
                exc.code) else ""
            logger.warning("refused a device's %s: %s%s", topic.kind, exc.detail, more, extra={
                "protocol": "mqtt", "room": topic.room, "device": topic.device_id,
                "code": exc.code})
        if not retained and self._limits(topic.device_id)[1].allow():
            self.server.error_reply(
                wire.error_topic(self.prefix, topic.room, topic.device_id),
                wire.error_payload(exc.code, exc.detail), exc.code)

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
                except (OperationalError, InterfaceError):
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
        """Hold the lease while connected to the broker (a process that hears nothing must
        not be the one that writes), and write what this process holds on taking it."""
        while True:
            try:
                await self._lease_round()
            except Exception:  # a bug: this process stops writing until the next round
                self.lease.held = False
                logger.exception("the devices' lease round failed", extra={"protocol": "mqtt"})
            # Until connected, look often: the lease is taken as soon as the broker is there.
            connected = self.server.connected.is_set()
            await asyncio.sleep(self.lease.ttl / 3 if connected else CONNECTED_CHECK)

    async def _lease_round(self) -> None:
        if not self.server.connected.is_set():
            if self.lease.held:
                logger.info("left the devices' lease: not connected to the broker",
                            extra={"protocol": "mqtt"})
                await self.lease.release()
            return
        held = self.lease.held
        if await self.lease.renew() and not held:
            logger.info("holding the devices' lease", extra={"protocol": "mqtt"})
            # Write what this process holds: the truth as its broker replayed it (what the
            # room learnt after it heard it, the writer keeps).
            for key, report in self.latest.items():
                self.dirty.setdefault(key, report)
            self._wake.set()

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
        """Publish a claimed command while it has time left: one whose deadline passed (the
        broker away meanwhile) is not sent late, when the room was told it timed out. Over
        MQTT 5 its expiry is the time it has left."""
        remaining = command.remaining()
        if remaining <= 0:
            return self._late(command)
        properties = None
        if self.server.mqtt5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = wire.reply_topic(self.prefix, command.room,
                                                        command.device_id)
            properties.CorrelationData = command.key.encode("ascii")
            properties.MessageExpiryInterval = max(1, math.ceil(remaining))
            properties.ContentType = "application/json"
        try:
            async with asyncio.timeout(remaining):
                await self.server.publish(
                    wire.cmd_topic(self.prefix, command.room, command.device_id),
                    wire.command_payload(command.payload()), properties=properties)
        except TimeoutError:
            return self._late(command)
        self.stats["commands"] += 1
        logger.info("published a command", extra={
            "protocol": "mqtt", "room": command.room, "device": command.device_id,
            "command_id": command.key, "sender": command.sender["id"]})

    def _late(self, command: devices.Command) -> None:
        logger.warning("a command was not published before its deadline (the broker away?)",
                       extra={"protocol": "mqtt", "room": command.room,
                              "device": command.device_id, "command_id": command.key})

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
