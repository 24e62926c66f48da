"""A room's policy: which protocols may post into it and which receive it, how a sender is
shown to the other protocols, its message rate limit, how long it keeps messages, and
whether it announces the chats and devices that come and go (a device's status going
online or offline too), and who may send its devices commands.

Set by staff (the admin, the API with a ``manage`` key) through ``services.room_policy_set``,
applied live: a change is an entry of the room's log (kind ``policy``, carrying the policy's
public form), so every process learns it in room order, and what the database must check
when a message is stored is in the room's row (``Room.post_allowed``, ``rate_*``).

Its public form (the API's ``policy``, the log entry's)::

    {"post": null | ["web", "api", ...],       sender protocols that may post (null: all)
     "receive": null | ["web", "sse", ...],    protocols the room reaches (null: all)
     "name_format": {"telegram": "{name} [{protocol}]", ...},
     "rate_limit": null | {"per_second": 2.0, "burst": 10},
     "retention": {"days": null | n, "messages": null | n},   null: the gateway's default
     "notices": false,
     "commands": null | ["web", "telegram", ...]}  sender protocols that may command the
                                               room's devices (null: all that may post)

Staff (the system sender) may always post. A name format applies to messages from another
protocol than its target (a page shows its own protocol's names as they are); its
placeholders are ``{name}``, ``{protocol}``, ``{room}`` and ``{id}``, nothing else (no
attribute access: it is not ``str.format``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway import events
from gateway.errors import GatewayError
from gateway.names import display_name_clean

PLACEHOLDER_RE = re.compile(r"\{([a-z]*)\}")
PLACEHOLDERS = ("name", "protocol", "room", "id")
FORMAT_MAX = 100  # characters of a name format
NAME_MAX = 128  # characters of a name as shown (the sender name's column)
RATE_MAX = 10_000.0  # messages per second a room may be allowed (beyond: no limit at all)
BURST_MAX = 100_000
RETENTION_DAYS_MAX = 36_500
KEYS = ("post", "receive", "name_format", "rate_limit", "retention", "notices", "commands")


@dataclass(frozen=True)
class Policy:
    post: frozenset[str] | None = None  # sender protocols that may post; None: all
    receive: frozenset[str] | None = None  # protocols (adapters) it reaches; None: all
    name_format: Mapping[str, str] = field(default_factory=dict)  # target -> template
    rate_per_second: float | None = None
    rate_burst: int | None = None
    retention_days: int | None = None  # None: the gateway's default; 0: forever
    retention_messages: int | None = None
    notices: bool = False
    commands: frozenset[str] | None = None  # sender protocols that may command; None: all

    def may_post(self, protocol: str) -> bool:
        return protocol == "system" or self.post is None or protocol in self.post

    def may_command(self, protocol: str) -> bool:
        """Whether a sender of ``protocol`` may send the room's devices commands (it must
        also be allowed to post: the command is a message of the room)."""
        return self.may_post(protocol) and (
            protocol == "system" or self.commands is None or protocol in self.commands)

    def receives(self, protocol: str) -> bool:
        return self.receive is None or protocol in self.receive

    def public(self) -> dict[str, Any]:
        """The policy as the API shows it and the log carries it (primitives only)."""
        rate = None if self.rate_per_second is None else {
            "per_second": self.rate_per_second, "burst": self.rate_burst}
        return {
            "post": None if self.post is None else sorted(self.post),
            "receive": None if self.receive is None else sorted(self.receive),
            "name_format": dict(sorted(self.name_format.items())),
            "rate_limit": rate,
            "retention": {"days": self.retention_days, "messages": self.retention_messages},
            "notices": self.notices,
            "commands": None if self.commands is None else sorted(self.commands),
        }

    def name_shown(self, sender: events.Sender, *, target: str, room: str) -> str:
        """How ``sender`` is shown to protocol ``target``: its name, or the target's name
        format for a sender of another protocol."""
        template = self.name_format.get(target)
        if template is None or sender["protocol"] == target:
            return sender["name"]
        return name_render(template, sender=sender, room=room)


DEFAULT = Policy()


def message_shown(event: events.RoomMessage, policy: Policy, *,
                  target: str) -> events.RoomMessage:
    """``event`` as protocol ``target`` shows it under ``policy``: its sender's name (and
    the name of the sender it answers) in the target's name format."""
    room = event["room"]
    sender = {**event["sender"], "name": policy.name_shown(event["sender"], target=target,
                                                          room=room)}
    reply = event["reply_to"]
    if reply is not None:
        reply = {**reply, "sender": {**reply["sender"], "name": policy.name_shown(
            reply["sender"], target=target, room=room)}}
    return {**event, "sender": sender, "reply_to": reply}  # type: ignore[typeddict-item]


def name_render(template: str, *, sender: events.Sender, room: str) -> str:
    """``template`` with its placeholders filled in, as a display name (cleaned, cut)."""
    values = {"name": sender["name"], "protocol": sender["protocol"], "room": room,
              "id": sender["id"]}
    shown = PLACEHOLDER_RE.sub(lambda match: values.get(match[1], match[0]), template)
    return display_name_clean(shown)[:NAME_MAX] or sender["name"]


# --- reading a policy from a client (API, admin) -------------------------------------------


def _invalid(detail: str) -> GatewayError:
    return GatewayError("invalid_policy", detail)


def policy_update(base: Policy, data: object, *, senders: set[str],
                  targets: set[str]) -> Policy:
    """``base`` with the keys ``data`` gives replaced (a partial update: a key left out
    keeps its value), each validated; GatewayError ``invalid_policy`` naming what is
    wrong. ``senders``: the sender protocols that exist; ``targets``: the protocols a room
    can reach (the adapters)."""
    if not isinstance(data, dict):
        raise _invalid("the policy must be an object")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise _invalid(f"unknown keys {unknown}; known: {list(KEYS)}")
    changes: dict[str, Any] = {}
    if "post" in data:
        changes["post"] = _protocols(data["post"], "post", senders - {"system"})
    if "receive" in data:
        changes["receive"] = _protocols(data["receive"], "receive", targets)
    if "name_format" in data:
        changes["name_format"] = _formats(data["name_format"], targets)
    if "rate_limit" in data:
        changes["rate_per_second"], changes["rate_burst"] = _rate(data["rate_limit"])
    if "retention" in data:
        changes["retention_days"], changes["retention_messages"] = _retention(
            data["retention"], base)
    if "notices" in data:
        if not isinstance(data["notices"], bool):
            raise _invalid("'notices' must be true or false")
        changes["notices"] = data["notices"]
    if "commands" in data:
        changes["commands"] = _protocols(data["commands"], "commands", senders - {"system"})
    return replace(base, **changes)


def _protocols(value: object, key: str, known: set[str]) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"'{key}' must be null (every protocol) or a list of protocols")
    unknown = sorted(set(value) - known)
    if unknown:
        raise _invalid(f"'{key}': unknown protocols {unknown}; known: {sorted(known)}")
    return frozenset(value)


def _formats(value: object, targets: set[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("'name_format' must be an object: {protocol: template}")
    formats: dict[str, str] = {}
    for target, template in value.items():
        if target not in targets:
            raise _invalid(f"'name_format': unknown protocol {str(target)[:32]!r}; known: "
                           f"{sorted(targets)}")
        if template is None or template == "":
            continue  # the default
        if not isinstance(template, str) or len(template) > FORMAT_MAX:
            raise _invalid(f"'name_format.{target}' must be a string of at most "
                           f"{FORMAT_MAX} characters")
        stray = PLACEHOLDER_RE.sub("", template)
        names = PLACEHOLDER_RE.findall(template)
        if "{" in stray or "}" in stray or any(name not in PLACEHOLDERS for name in names):
            raise _invalid(f"'name_format.{target}': only the placeholders "
                           f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} may be used")
        formats[target] = template
    return formats


def _number(value: object, key: str, *, integer: bool, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        raise _invalid(f"'{key}' must be {'an integer' if integer else 'a number'}")
    if not math.isfinite(value) or not low <= value <= high:
        raise _invalid(f"'{key}' must be between {low:g} and {high:g}")
    return value


def _rate(value: object) -> tuple[float | None, int | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict) or set(value) - {"per_second", "burst"} or (
            "per_second" not in value):
        raise _invalid("'rate_limit' must be null or {\"per_second\": n, \"burst\": n}")
    per_second = float(_number(value["per_second"], "rate_limit.per_second", integer=False,
                               low=0.001, high=RATE_MAX))
    burst = value.get("burst", max(1, math.ceil(per_second)))
    return per_second, int(_number(burst, "rate_limit.burst", integer=True, low=1,
                                   high=BURST_MAX))


def _retention(value: object, base: Policy) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    if not isinstance(value, dict) or set(value) - {"days", "messages"}:
        raise _invalid("'retention' must be {\"days\": n | null, \"messages\": n | null} "
                       "(null: the gateway's default; 0: forever)")
    days, messages = base.retention_days, base.retention_messages
    if "days" in value:
        days = None if value["days"] is None else int(_number(
            value["days"], "retention.days", integer=True, low=0, high=RETENTION_DAYS_MAX))
    if "messages" in value:
        messages = None if value["messages"] is None else int(_number(
            value["messages"], "retention.messages", integer=True, low=0, high=10**12))
    return days, messages


# --- where the policy is kept -----------------------------------------------------------------


def allowed_column(protocols: frozenset[str] | None) -> str:
    """A set of protocols as the room's row keeps it: "" for all, else ",a,b," ("," for
    none), so ``LIKE '%,a,%'`` asks for one."""
    return "" if protocols is None else "," + "".join(p + "," for p in sorted(protocols))


def allowed_parse(column: str) -> frozenset[str] | None:
    return None if column == "" else frozenset(p for p in column.split(",") if p)


def policy_columns(policy: Policy) -> dict[str, Any]:
    """The ``Room`` fields that keep ``policy``."""
    extra: dict[str, Any] = {}
    if policy.name_format:
        extra["name_format"] = dict(policy.name_format)
    if policy.notices:
        extra["notices"] = True
    if policy.commands is not None:
        extra["commands"] = sorted(policy.commands)
    return {
        "post_allowed": allowed_column(policy.post),
        "receive_allowed": allowed_column(policy.receive),
        "policy": extra,
        "rate_per_second": policy.rate_per_second,
        "rate_burst": policy.rate_burst,
        "retention_days": policy.retention_days,
        "retention_messages": policy.retention_messages,
    }


def policy_from_columns(*, post_allowed: str, receive_allowed: str, policy: Mapping[str, Any],
                        rate_per_second: float | None, rate_burst: int | None,
                        retention_days: int | None, retention_messages: int | None) -> Policy:
    """The policy a room's row keeps (its fields by name)."""
    return Policy(
        post=allowed_parse(post_allowed), receive=allowed_parse(receive_allowed),
        name_format=dict(policy.get("name_format") or {}),
        rate_per_second=rate_per_second, rate_burst=rate_burst,
        retention_days=retention_days, retention_messages=retention_messages,
        notices=bool(policy.get("notices")),
        commands=_protocols_kept(policy.get("commands")),
    )


def _protocols_kept(value: object) -> frozenset[str] | None:
    return None if not isinstance(value, list) else frozenset(str(v) for v in value)


POLICY_FIELDS = ("post_allowed", "receive_allowed", "policy", "rate_per_second", "rate_burst",
                 "retention_days", "retention_messages")


def policy_from_public(data: Mapping[str, Any]) -> Policy:
    """The policy from its public form (a log entry's, which the services wrote)."""
    rate = data.get("rate_limit") or {}
    retention = data.get("retention") or {}
    post, receive = data.get("post"), data.get("receive")
    return Policy(
        post=None if post is None else frozenset(post),
        receive=None if receive is None else frozenset(receive),
        name_format=dict(data.get("name_format") or {}),
        rate_per_second=rate.get("per_second"), rate_burst=rate.get("burst"),
        retention_days=retention.get("days"), retention_messages=retention.get("messages"),
        notices=bool(data.get("notices")),
        commands=_protocols_kept(data.get("commands")),
    )
