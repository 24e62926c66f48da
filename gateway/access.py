"""Who another program is: API keys for the HTTP API, and connect tokens (JWT) with which
another backend puts its users into rooms under their own names.

**API keys** (``gwk_<prefix>_<secret>``): made by staff (the admin, ``gateway manage apikey
create``), shown once; only the SHA-256 of the whole key is kept (a key has 256 random bits,
so a fast hash is enough, as for GitHub's tokens), found by its public prefix and compared in
constant time. A key has scopes (``read``, ``post``, ``manage``) and may be limited to rooms
(names or patterns); it posts as a sender of protocol ``api`` under its name.

**Connect tokens**: a JWT signed by the other backend (HS256 with ``GATEWAY_JWT_SECRET``, or
RS256/ES256 with ``GATEWAY_JWT_PUBLIC_KEY`` or the keys at ``GATEWAY_JWT_JWKS_URL``) with
``sub``, ``name``, ``exp`` and optionally ``rooms``. Verified with PyJWT; the algorithm comes
from the key it is checked with, never from the token alone, so an RS256 public key is never
taken as an HMAC secret. Its holder is a web sender ``jwt:<sub>``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from django.conf import settings

from gateway import events
from gateway.errors import GatewayError
from gateway.models import ApiKey
from gateway.names import display_name_clean, room_matches, room_patterns_validate
from gateway.ratelimit import TokenBucket

logger = logging.getLogger(__name__)

KEY_PREFIX = "gwk_"
LAST_USED_EVERY = 60.0  # seconds: a key's last use is written at most this often


# --- API keys --------------------------------------------------------------------------------


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def scopes_validate(scopes: object) -> list[str]:
    """A key's scopes as a client gives them (a list, or a comma-separated string)."""
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",") if s.strip()]
    if not isinstance(scopes, list) or not scopes or not all(
            isinstance(s, str) and s in ApiKey.SCOPES for s in scopes):
        raise GatewayError("invalid_scopes",
                           f"scopes must be some of {', '.join(ApiKey.SCOPES)}")
    return [scope for scope in ApiKey.SCOPES if scope in scopes]


def api_key_create(*, name: str, scopes: object, rooms: object = (),
                   created_by: str = "") -> tuple[ApiKey, str]:
    """A new key: its record, and the key itself (shown once; only its digest is kept)."""
    name = display_name_clean(name if isinstance(name, str) else "")
    if not name:
        raise GatewayError("invalid_name", "a key needs a name (it is shown as the sender)")
    checked_scopes = scopes_validate(scopes)
    patterns = room_patterns_validate(list(rooms) if isinstance(rooms, tuple) else rooms)
    prefix = secrets.token_hex(4)
    while ApiKey.objects.filter(prefix=prefix).exists():
        prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    record = ApiKey.objects.create(name=name, prefix=prefix, digest=_digest(key),
                                   scopes=checked_scopes, rooms=patterns,
                                   created_by=created_by[:150])
    logger.info("API key created", extra={"protocol": "api", "key": prefix, "key_name": name,
                                          "scopes": checked_scopes, "rooms": patterns})
    return record, key


def api_key_revoke(*, prefix: str) -> bool:
    """Revoke the key with this prefix (from now on it is refused); whether one was."""
    revoked = ApiKey.objects.filter(prefix=prefix, revoked_at__isnull=True).update(
        revoked_at=datetime.now(UTC))
    if revoked:
        logger.info("API key revoked", extra={"protocol": "api", "key": prefix})
    return bool(revoked)


def api_key_authenticate(key: str) -> ApiKey:
    """The key's record; GatewayError ``invalid_key`` for anything else (malformed, unknown,
    revoked: the client is not told which)."""
    parts = key.split("_", 2)  # the secret may hold "_" too (URL-safe base64)
    if len(parts) != 3 or f"{parts[0]}_" != KEY_PREFIX or len(key) > 200:
        raise GatewayError("invalid_key", "the API key is not valid")
    record = ApiKey.objects.filter(prefix=parts[1]).first()
    if (record is None or not hmac.compare_digest(record.digest, _digest(key))
            or record.revoked_at is not None):
        raise GatewayError("invalid_key", "the API key is not valid")
    now = datetime.now(UTC)
    if record.last_used_at is None or (now - record.last_used_at).total_seconds() > (
            LAST_USED_EVERY):
        ApiKey.objects.filter(pk=record.pk).update(last_used_at=now)
        record.last_used_at = now
    return record


def api_key_sender(record: ApiKey, name: str | None = None) -> events.Sender:
    """What a key posts as: protocol ``api``, id ``key:<prefix>``, its name (or ``name``)."""
    return events.sender(protocol="api", id=f"key:{record.prefix}",
                         name=display_name_clean(name or "") or record.name)


# --- who makes a request -----------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who is asking, what it may do and where: an API key, a token's holder, a logged-in
    user (staff: everything), or an anonymous visitor."""

    kind: str  # "key", "token", "user", "anonymous"
    scopes: frozenset[str]
    rooms: tuple[str, ...] | None = None  # patterns it is limited to; None: every room
    sender: events.Sender | None = None  # as whom it posts
    staff: bool = False  # may change any message, rooms and their policies
    key: ApiKey | None = None

    def may(self, scope: str) -> bool:
        return scope in self.scopes

    def may_use(self, room: str) -> bool:
        return self.rooms is None or room_matches(self.rooms, room)

    @property
    def log_id(self) -> str:
        if self.key is not None:
            return f"key:{self.key.prefix}"
        return self.sender["id"] if self.sender is not None else "anonymous"


def key_principal(record: ApiKey) -> Principal:
    return Principal(kind="key", scopes=frozenset(record.scopes),
                     rooms=tuple(record.rooms) or None, sender=api_key_sender(record),
                     staff=ApiKey.SCOPE_MANAGE in record.scopes, key=record)


# --- connect tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenIdentity:
    """A connect token's holder: who (``jwt:<sub>`` on the web) and which rooms it may join."""

    sender: events.Sender
    rooms: tuple[str, ...] | None  # None: any room
    expires: float  # epoch seconds

    def may_join(self, room: str) -> bool:
        return self.rooms is None or room_matches(self.rooms, room)

    def principal(self) -> Principal:
        """On the HTTP API and SSE a token reads; it posts over the WebSocket it opens, under
        that socket's flood limit (a program that posts over HTTP uses an API key)."""
        return Principal(kind="token", scopes=frozenset({"read"}), rooms=self.rooms,
                         sender=self.sender)


def tokens_enabled() -> bool:
    config = settings.JWT
    return bool(config["SECRET"] or config["PUBLIC_KEY"] or config["JWKS_URL"])


def looks_like_token(value: str) -> bool:
    return value.count(".") == 2 and not value.startswith(KEY_PREFIX)


def _invalid(detail: str) -> GatewayError:
    return GatewayError("token_invalid", detail)


@functools.cache
def _jwks_client(url: str) -> jwt.PyJWKClient:
    # Keys are cached for five minutes; one unknown to the cache is fetched at once (a key
    # rotated at the issuer), at most once per token.
    return jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=5)


_ASYMMETRIC = ("RS256", "ES256")


def _verifying_key(token: str) -> tuple[Any, list[str]]:
    """The key to check ``token`` with and the algorithms that key allows, from the token's
    header's ``alg`` (and ``kid`` for a JWKS): HS256 only with the secret, RS256/ES256 only
    with a public key."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise _invalid(f"not a JWT: {exc}") from None
    config = settings.JWT
    algorithm = header.get("alg")
    if algorithm == "HS256" and config["SECRET"]:
        return config["SECRET"], ["HS256"]
    if algorithm in _ASYMMETRIC and config["PUBLIC_KEY"]:
        return config["PUBLIC_KEY"], [algorithm]
    if algorithm in _ASYMMETRIC and config["JWKS_URL"]:
        try:
            found = _jwks_client(config["JWKS_URL"]).get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            logger.warning("cannot fetch the connect tokens' keys: %s", exc,
                           extra={"protocol": "jwt"})
            raise GatewayError("unavailable", "the token's keys cannot be fetched now; "
                               "try again") from None
        except jwt.PyJWTError as exc:
            raise _invalid(f"no key for this token: {exc}") from None
        return found.key, [algorithm]
    raise _invalid(f"tokens signed with {str(algorithm)[:16]!r} are not accepted here")


def connect_token_verify(token: str) -> TokenIdentity:
    """The identity a connect token carries, once its signature, ``exp`` (and ``iss``,
    ``aud`` when configured) are checked. GatewayError ``token_expired``, or
    ``token_invalid`` for everything else (tokens not configured, malformed, a bad
    signature, a wrong issuer or audience, bad claims). May fetch a JWKS: call it off the
    event loop."""
    if not tokens_enabled():
        raise _invalid("connect tokens are not configured on this gateway")
    if len(token) > 8192:
        raise _invalid("the token is too long")
    key, algorithms = _verifying_key(token)
    config = settings.JWT
    try:
        claims = jwt.decode(
            token, key, algorithms=algorithms, leeway=config["LEEWAY"],
            issuer=config["ISSUER"] or None, audience=config["AUDIENCE"] or None,
            options={"require": ["exp", "sub"], "verify_aud": bool(config["AUDIENCE"])},
        )
    except jwt.ExpiredSignatureError:
        raise GatewayError("token_expired", "the token has expired") from None
    except jwt.PyJWTError as exc:
        raise _invalid(f"the token is not valid: {exc}") from None
    return _identity(claims)


async def connect_token_verify_async(token: str) -> TokenIdentity:
    """``connect_token_verify`` from the event loop: in a worker thread when a JWKS may be
    fetched (a network call), in place otherwise (a signature check costs microseconds)."""
    if settings.JWT["JWKS_URL"]:
        return await asyncio.to_thread(connect_token_verify, token)
    return connect_token_verify(token)


def _identity(claims: dict[str, Any]) -> TokenIdentity:
    subject = claims["sub"]
    if not isinstance(subject, str) or not 1 <= len(subject) <= 120:
        raise _invalid("'sub' must be a string of 1-120 characters")
    name = claims.get("name", "")
    if not isinstance(name, str):
        raise _invalid("'name' must be a string")
    rooms = claims.get("rooms")
    try:
        patterns = None if rooms is None else tuple(room_patterns_validate(rooms))
    except GatewayError as exc:
        raise _invalid(f"'rooms': {exc.detail}") from None
    shown = display_name_clean(name) or display_name_clean(subject) or "guest"
    return TokenIdentity(sender=events.sender(protocol="web", id=f"jwt:{subject}", name=shown),
                         rooms=patterns, expires=float(claims["exp"]))


def token_room_check(identity: TokenIdentity, room: str) -> None:
    """GatewayError ``token_room`` unless the token allows ``room``."""
    if not identity.may_join(room):
        raise GatewayError("token_room", f"the token does not allow room {room}")


# --- a limit per key --------------------------------------------------------------------------


class KeyLimits:
    """A flood limit per key in this process (``GATEWAY_API_RATE_LIMIT_*``): a token bucket
    for each of the most recent keys (bounded)."""

    KEEP = 10_000

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> float | None:
        """None if ``key`` may make a request now, else seconds to wait."""
        limits = settings.GATEWAY
        with self._lock:
            bucket = self._buckets.pop(key, None) or TokenBucket(
                rate=limits["API_RATE_LIMIT_PER_SECOND"], burst=limits["API_RATE_LIMIT_BURST"])
            self._buckets[key] = bucket
            while len(self._buckets) > self.KEEP:
                self._buckets.popitem(last=False)
            return None if bucket.allow() else max(bucket.retry_after(), 0.001)


# --- anonymous visitors -------------------------------------------------------------------------

# A browser's secret id for itself (kept in its storage, sent on connect or with a post).
UID_RE = re.compile(r"[A-Za-z0-9_\-]{8,64}")


def anonymous_id(uid: str) -> str:
    """The public sender id of the browser whose secret ``uid`` this is."""
    digest = hmac.new(settings.SECRET_KEY.encode(), uid.encode(), hashlib.sha256).hexdigest()
    return f"anon:{digest[:16]}"


def visitor_identity(uid: str, name: str) -> tuple[str, str]:
    """``(sender id, display name)`` of an anonymous visitor.

    The browser's ``uid`` is its secret; others only ever see a keyed hash of it, so nobody
    can take over an anonymous identity from what the room shows. Without a valid one the
    visitor is a new guest.
    """
    if not UID_RE.fullmatch(uid):
        uid = secrets.token_hex(8)
    public = anonymous_id(uid)
    return public, display_name_clean(name) or f"guest-{public[5:9]}"
