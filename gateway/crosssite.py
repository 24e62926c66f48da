"""Cross-site protection for what browsers open with the visitor's cookies: sockets, streams.

A browser sends the session cookie with a WebSocket handshake whatever page opened it, and
the handshake is not subject to CORS, so the server must check the ``Origin`` itself. The
origin must be exactly the site's own (scheme, host and port, as the request reached it) or
one of ``GATEWAY["ALLOWED_ORIGINS"]``; comparing host names only would let a page on another
port or scheme of the same host in. ``origin_allowed`` is the one rule, for every transport
(a Server-Sent Events view passes its request's scheme and Host). Staff actions on a socket
also carry Django's CSRF token, checked as ``CsrfViewMiddleware`` checks a form's.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.middleware.csrf import (
    CSRF_SESSION_KEY,
    CSRF_TOKEN_LENGTH,
    InvalidTokenFormat,
    _check_token_format,
    _does_token_match,
    _unmask_cipher_token,
)

logger = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}
# Refused before accept: daphne answers the handshake with HTTP 403.
CLOSE_FORBIDDEN_ORIGIN = 4403
# Django's own fallback when DEBUG is on and ALLOWED_HOSTS is empty (HttpRequest.get_host).
DEBUG_HOSTS = [".localhost", "127.0.0.1", "[::1]"]


def origin_normalize(origin: str) -> str | None:
    """``scheme://host:port`` (lower case, default port written out), or None when
    ``origin`` is not an http(s) origin (``null``, a path, user info, a bad port)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6: urlsplit drops the brackets
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or DEFAULT_PORTS[scheme]}"


def host_allowed(host: str) -> bool:
    """Whether a Host header names this site (``ALLOWED_HOSTS``, as Django checks it)."""
    domain, _port = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS or (DEBUG_HOSTS if settings.DEBUG else [])
    return bool(domain) and validate_host(domain, allowed)


def allowed_origins() -> set[str]:
    """The configured extra origins, normalised (a malformed entry matches nothing)."""
    normalized = (origin_normalize(o) for o in settings.GATEWAY["ALLOWED_ORIGINS"])
    return {origin for origin in normalized if origin is not None}


def origin_allowed(*, scheme: str, host: str | None, origin: str | None) -> bool:
    """Whether a request that reached the site as ``scheme`` (http or https) with this
    ``Host`` may be served to a page of ``origin``; no Origin header is refused."""
    if not origin or not host or not host_allowed(host):
        return False
    wanted = origin_normalize(origin)
    if wanted is None:
        return False
    return wanted == origin_normalize(f"{scheme}://{host}") or wanted in allowed_origins()


def scope_header(scope, name: bytes) -> str | None:
    """The value of an ASGI scope's header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def scope_scheme(scope) -> str:
    """``http`` or ``https``: how the browser reached the site (``ws`` -> http, ``wss`` ->
    https). Behind a TLS proxy its header counts only when ``SECURE_PROXY_SSL_HEADER`` says
    so (production mode), as for Django's ``request.is_secure()``."""
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        name, secure_value = proxy
        header = name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
        value = scope_header(scope, header)
        if value is not None:
            return "https" if value.split(",", 1)[0].strip() == secure_value else "http"
    return "https" if scope.get("scheme") in ("wss", "https") else "http"


def scope_origin_allowed(scope) -> bool:
    """``origin_allowed`` for an ASGI scope."""
    return origin_allowed(scheme=scope_scheme(scope), host=scope_header(scope, b"host"),
                          origin=scope_header(scope, b"origin"))


async def websocket_refuse(receive, send, code: int) -> None:
    """Close a WebSocket before accept (daphne answers the handshake with 403)."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": code})


class SameOriginValidator:
    """ASGI middleware: a WebSocket whose Origin is not allowed is refused before accept,
    with a log line naming the origin; other scope types pass through."""

    def __init__(self, application) -> None:
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket" or scope_origin_allowed(scope):
            return await self.application(scope, receive, send)
        origin, host = scope_header(scope, b"origin"), scope_header(scope, b"host")
        logger.warning(
            "refused a socket from origin %r (host %r)", origin, host,
            extra={"protocol": "web", "path": scope.get("path"), "origin": origin,
                   "host": host, "code": CLOSE_FORBIDDEN_ORIGIN},
        )
        return await websocket_refuse(receive, send, CLOSE_FORBIDDEN_ORIGIN)


def csrf_secret(scope) -> str | None:
    """The visitor's CSRF secret, where ``CsrfViewMiddleware`` keeps it: the cookie, or the
    session (already loaded at connect by the auth middleware)."""
    try:
        if settings.CSRF_USE_SESSIONS:
            secret = scope["session"].get(CSRF_SESSION_KEY)
        else:
            secret = scope.get("cookies", {}).get(settings.CSRF_COOKIE_NAME)
        if not secret:
            return None
        _check_token_format(secret)
    except (KeyError, InvalidTokenFormat):
        return None
    # Django before 4.0 stored the secret masked.
    return _unmask_cipher_token(secret) if len(secret) == CSRF_TOKEN_LENGTH else secret


def csrf_token_valid(scope, token: object) -> bool:
    """Whether ``token`` (the page's ``{{ csrf_token }}`` or the cookie's value) matches
    the visitor's CSRF secret, compared in constant time by Django's own helper."""
    secret = csrf_secret(scope)
    if secret is None or not isinstance(token, str):
        return False
    try:
        _check_token_format(token)
    except InvalidTokenFormat:
        return False
    return _does_token_match(token, secret)
