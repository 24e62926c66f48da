"""The protocol servers' scope registry (protocols/scopes.py), in-process."""

from __future__ import annotations

import asyncio
import time

from protocols.scopes import Scope, ScopeRegistry


def scope(**kw) -> Scope:
    return Scope(scope={"type": "test"}, queue=asyncio.Queue(), **kw)


def test_a_scope_is_opened_once_per_key_and_forgotten_only_as_itself():
    counts: list[int] = []
    registry: ScopeRegistry[str, Scope] = ScopeRegistry(on_count=counts.append)
    first = registry.open("a", scope)
    assert registry.open("a", lambda: scope()) is first  # not opened again
    assert "a" in registry and len(registry) == 1 and registry.get("a") is first
    assert not registry.ended("a", scope())  # an older scope of that key ending: ignored
    assert registry.ended("a", first) and "a" not in registry
    assert not registry.ended("a", first)
    assert counts == [1, 0]


def test_idle_scopes_are_those_unused_with_nothing_pending():
    registry: ScopeRegistry[str, Scope] = ScopeRegistry()
    old = time.monotonic() - 100
    quiet = registry.open("quiet", lambda: scope(last_seen=old))
    registry.open("busy", lambda: scope(last_seen=old, pending=1))  # awaits an answer
    registry.open("fresh", scope)
    assert registry.idle(60) == [("quiet", quiet)]
    assert len(registry) == 3  # found, not forgotten: the caller decides
    everything = registry.values()
    assert registry.take_all() == everything and len(registry) == 0
