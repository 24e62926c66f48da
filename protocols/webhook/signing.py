"""Webhook signatures as the Standard Webhooks specification has them
(https://www.standardwebhooks.com, symmetric scheme ``v1``).

A secret is ``whsec_`` and the base64 of 24 to 64 random bytes (the gateway makes 32). Each
request carries three headers:

- ``webhook-id``: the delivery id (the same on every retry, from every replica: receivers
  drop repeats by it);
- ``webhook-timestamp``: the attempt's time, in integer seconds since the epoch;
- ``webhook-signature``: ``v1,`` and the base64 of HMAC-SHA256, keyed with the secret's
  bytes, over ``{id}.{timestamp}.{body}`` (the body exactly as sent). The header is a
  space-separated list, so a receiver tries each signature in it.

``verify`` is what a receiver in Python does (tests use it; docs/webhooks.md shows it).
Standard library only: a receiver can copy this module as it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

PREFIX = "whsec_"
KEY_BYTES = 32  # what a new secret has (the specification allows 24 to 64)
KEY_BYTES_MIN, KEY_BYTES_MAX = 24, 64
TOLERANCE = 300  # seconds a receiver accepts between a timestamp and its clock
VERSION = "v1"


class SignatureError(ValueError):
    """A request whose signature or timestamp does not verify."""


def secret_generate() -> str:
    """A new secret: ``whsec_`` and the base64 of 32 random bytes."""
    return PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of a secret (ValueError if it is not one)."""
    if not secret.startswith(PREFIX):
        raise ValueError(f"a webhook secret starts with {PREFIX}")
    try:
        key = base64.b64decode(secret[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ and base64") from None
    if not KEY_BYTES_MIN <= len(key) <= KEY_BYTES_MAX:
        raise ValueError(f"a webhook secret holds {KEY_BYTES_MIN} to {KEY_BYTES_MAX} bytes")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one request: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode()}"


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three signature headers of one request."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def verify(secret: str, headers: Mapping[str, str], body: bytes, *,
           tolerance: float = TOLERANCE, now: float | None = None) -> None:
    """Check a received request (its headers, any case, and its raw body) against the
    secret; SignatureError if it does not verify or its timestamp is too far from ``now``."""
    found = {name.lower(): value for name, value in headers.items()}
    msg_id = found.get("webhook-id", "")
    stamp = found.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit():
        raise SignatureError("missing webhook-id or webhook-timestamp")
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance:
        raise SignatureError("the timestamp is too old or too new")
    expected = sign(secret, msg_id, int(stamp), body)
    for candidate in found.get("webhook-signature", "").split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return
    raise SignatureError("no signature matches")
