"""Helpers shared by several test modules (the servers themselves are in tests/servers.py)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator


@contextlib.contextmanager
def database_write_lock(gw) -> Iterator[None]:
    """Hold a gateway's SQLite write lock from another connection, as a long write would,
    until the block ends: what the gateway tries to store meanwhile waits (or fails after
    its busy timeout)."""
    db = sqlite3.connect(gw.datadir / "gateway.sqlite3", timeout=10, check_same_thread=False)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.rollback()
        db.close()
