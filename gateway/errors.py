"""The gateway's errors: a refusal with a stable code for the client (every protocol shows it
its own way: an error frame, an MQTT error topic, a chat reply, an HTTP status) and a
readable detail. Nothing here imports the rest of the gateway."""

from __future__ import annotations


class GatewayError(Exception):
    """A refusal with a stable code for the client and a readable detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


class InvalidRoomName(GatewayError, ValueError):
    """A room name that no protocol may use (code ``invalid_room``)."""

    def __init__(self, detail: str):
        super().__init__("invalid_room", detail)


class RateLimited(GatewayError):
    """Past a rate limit (code ``rate_limited``): ``retry_after`` seconds until it allows
    one more (an HTTP answer's ``Retry-After``)."""

    def __init__(self, detail: str, retry_after: float):
        super().__init__("rate_limited", detail)
        self.retry_after = retry_after
