"""Who may use the embedded broker, and which topics: the rule of deploy/mosquitto's ACL.

- The gateway's own client (its client id, with credentials made at start) publishes the
  rooms and the errors, ``<prefix>/+/out`` and ``<prefix>/+/error/+``, and reads anything.
- A device logs in with its device id as user name and a password from a file made by
  ``mosquitto_passwd`` (``$7$`` PBKDF2-SHA512 or the older ``$6$`` SHA-512), publishes only
  as itself, ``<prefix>/<room>/in/<its id>`` and its files on ``<prefix>/<room>/in/<its
  id>/file``, and reads ``<prefix>/+/out`` and its own errors, ``<prefix>/+/error/<its id>``.
- An anonymous client (when allowed) publishes as any device, ``<prefix>/+/in/+`` and
  ``<prefix>/+/in/+/file``, and reads ``<prefix>/+/out`` and ``<prefix>/+/error/+``.
- Devices as members: the gateway also publishes commands, ``<prefix>/+/cmd/+``, and its own
  status, ``gateway/status/+``; a device publishes its status, its state and its answers as
  itself (``<prefix>/+/status/<id>``, ``<prefix>/+/state/<id>``,
  ``<prefix>/+/cmd/<id>/reply``; anonymous: any id), reads its own commands
  (``<prefix>/+/cmd/<id>``), and every device's status and state and the gateway's.

Nothing else: no other topic, no ``#``. The gateway's user name (``gateway``) and client id
are reserved for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED

from gateway.names import room_name_is_valid
from protocols.mqtt.wire import CMD, FILE, GATEWAY_STATUS, REPLY, STATE, STATUS

GATEWAY_USER = "gateway"


@dataclass(frozen=True)
class Client:
    """Who a connection is: the gateway, a device (by id) or an anonymous device."""

    kind: str  # "gateway", "device" or "anonymous"
    device_id: str | None = None

    @property
    def is_gateway(self) -> bool:
        return self.kind == "gateway"

    @property
    def is_anonymous(self) -> bool:
        return self.kind == "anonymous"

    def __str__(self) -> str:
        return self.device_id if self.kind == "device" and self.device_id else self.kind


GATEWAY = Client("gateway")
ANONYMOUS = Client("anonymous")


class LoginRefused(Exception):
    """A CONNECT refused: ``reason`` for the log, ``code`` for the CONNACK."""

    def __init__(self, reason: str, code: int = NOT_AUTHORIZED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# --- topics ---------------------------------------------------------------------------------


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (MQTT's ``+`` and ``#``)."""
    levels = topic.split("/")
    for i, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True
        if i >= len(levels) or level not in ("+", levels[i]):
            return False
    return len(levels) == len(topic_filter.split("/"))


def filter_covers(pattern: str, topic_filter: str) -> bool:
    """Whether every topic that ``topic_filter`` matches also matches ``pattern``, so a
    subscription reads nothing the pattern does not allow (``rooms/#`` is not covered by
    ``rooms/+/out``; ``rooms/+/out`` and ``rooms/lobby/out`` are)."""
    wanted = topic_filter.split("/")
    for i, level in enumerate(pattern.split("/")):
        if level == "#":
            return True
        if i >= len(wanted) or wanted[i] == "#":
            return False
        if level != "+" and wanted[i] != level:
            return False
    return len(wanted) == len(pattern.split("/"))


def topic_is_publishable(topic: str | None) -> bool:
    """A topic a client may publish to at all: no wildcards, not ``$...``, not empty."""
    return bool(topic) and topic is not None and not topic.startswith("$") and not any(
        c in topic for c in "+#\0"
    )


def shared_filter_strip(topic_filter: str) -> str:
    """``$share/<group>/<filter>`` -> ``<filter>`` (amqtt has no shared subscriptions)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


# --- passwords ------------------------------------------------------------------------------


def password_check(encoded: str, password: str) -> bool:
    """Whether ``password`` matches one ``mosquitto_passwd`` hash: ``$7$<iterations>$<salt>$
    <hash>`` (PBKDF2-HMAC-SHA512) or ``$6$<salt>$<hash>`` (SHA-512 of password + salt),
    salt and hash in base64. Anything else never matches."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[:2] == ["", "7"]:
            iterations, salt, digest = int(parts[2]), _b64(parts[3]), _b64(parts[4])
            if not 1 <= iterations <= 10_000_000:
                return False
            computed = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations,
                                           len(digest))
        elif len(parts) == 4 and parts[:2] == ["", "6"]:
            salt, digest = _b64(parts[2]), _b64(parts[3])
            computed = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    return bool(digest) and hmac.compare_digest(computed, digest)


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def password_file_parse(text: str) -> dict[str, str]:
    """``{user: hash}`` from a mosquitto password file (``user:hash`` lines; blank lines and
    ``#`` comments skipped; a line without ``:`` is ignored)."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, encoded = line.split(":", 1)
            users[user] = encoded
    return users


class PasswordFile:
    """A mosquitto password file, read again when it changes (add a device without a
    restart)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, str] = {}
        self.users()  # a missing or unreadable file fails at start, not at first login

    def users(self) -> dict[str, str]:
        stat = os.stat(self.path)
        if (stat.st_mtime, stat.st_size) != self._stamp:
            self._users = password_file_parse(self.path.read_text(encoding="utf-8"))
            self._stamp = (stat.st_mtime, stat.st_size)
        return self._users

    def check(self, user: str, password: str) -> bool:
        encoded = self.users().get(user)
        return encoded is not None and password_check(encoded, password)


# --- the policy -----------------------------------------------------------------------------


@dataclass
class BrokerPolicy:
    """Who may connect and what each may publish and read."""

    prefix: str
    gateway_client_id: str
    gateway_password: str
    passwords: PasswordFile | None = None
    allow_anonymous: bool = False
    gateway_user: str = GATEWAY_USER

    def authenticate(self, client_id: str | None, username: str | None,
                     password: str | bytes | None) -> Client:
        """The client a CONNECT logs in as; LoginRefused otherwise. Blocking (reads the
        password file, hashes): run it in a thread."""
        secret = password.decode(errors="replace") if isinstance(password, bytes) else password
        if client_id == self.gateway_client_id or username == self.gateway_user:
            # Reserved: only the gateway's own client, with this process's credentials.
            if (client_id == self.gateway_client_id and username == self.gateway_user
                    and secret is not None
                    and hmac.compare_digest(secret.encode(), self.gateway_password.encode())):
                return GATEWAY
            raise LoginRefused("reserved for the gateway", BAD_USERNAME_PASSWORD)
        if username and self.passwords is not None:
            if room_name_is_valid(username) and self.passwords.check(username, secret or ""):
                return Client("device", username)
            raise LoginRefused("bad user name or password", BAD_USERNAME_PASSWORD)
        if self.allow_anonymous:
            return ANONYMOUS  # a user name without a password file proves nothing
        raise LoginRefused("anonymous clients are not allowed")

    def may_publish(self, client: Client, topic: str | None) -> bool:
        if topic is None or not topic_is_publishable(topic):
            return False
        if client.is_gateway:
            return any(topic_matches(p, topic) for p in (
                self._topic("out"), self._topic("error", "+"), self._topic(CMD, "+"),
                f"{GATEWAY_STATUS}/+"))
        device = client.device_id if client.kind == "device" and client.device_id else "+"
        return any(topic_matches(p, topic) for p in (
            *self._device_topics(device), self._topic(STATUS, device),
            self._topic(STATE, device), f"{self._topic(CMD, device)}/{REPLY}"))

    def may_subscribe(self, client: Client, topic_filter: str) -> bool:
        if client.is_gateway:
            return True
        device = client.device_id if client.kind == "device" else "+"
        return any(filter_covers(p, topic_filter) for p in (
            self._topic("out"), self._topic("error", device), self._topic(CMD, device),
            self._topic(STATUS, "+"), self._topic(STATE, "+"), f"{GATEWAY_STATUS}/+"))

    def is_device_topic(self, topic: str) -> bool:
        """A device's inbound topic, ``<prefix>/<room>/in/<device>`` or its ``/file``."""
        return any(topic_matches(p, topic) for p in self._device_topics("+"))

    def _device_topics(self, device: str) -> tuple[str, str]:
        """What ``device`` (``+``: any) publishes: its messages and its files."""
        return self._topic("in", device), f"{self._topic('in', device)}/{FILE}"

    def _topic(self, kind: str, device: str | None = None) -> str:
        return "/".join([self.prefix, "+", kind, *([device] if device else [])])
