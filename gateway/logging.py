"""Structured log lines: one JSON object per line, with protocol, room and scope."""

from __future__ import annotations

import json
import logging
import time

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class StructuredFormatter(logging.Formatter):
    """Format records as JSON lines: ts, level, logger, msg and any ``extra`` fields, with
    every one of ``secrets`` masked wherever it appears (message, fields, traceback)."""

    def __init__(self, *args, secrets: list[str] | tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = [secret for secret in secrets if secret]

    def format(self, record: logging.LogRecord) -> str:
        line = self._format(record)
        for secret in self.secrets:
            line = line.replace(secret, "<redacted>")
        return line

    def _format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def scope_log(protocol: str, room: str | None, scope: str, **fields: object) -> dict[str, object]:
    """The ``extra`` for a log line about one scope."""
    return {"protocol": protocol, "room": room, "scope": scope, **fields}


class LogSampler:
    """Which repeated warnings of one connection to log: the first ``first`` of each key,
    then only a count, so a client repeating a mistake cannot fill the disk. ``counted``
    gives what was left out, for one line when the connection ends."""

    def __init__(self, first: int = 5) -> None:
        self.first = first
        self.seen: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        """Count one occurrence of ``key``; whether to log it."""
        count = self.seen.get(key, 0) + 1
        self.seen[key] = count
        return count <= self.first

    def last_logged(self, key: str) -> bool:
        """Whether the occurrence just counted was the last one logged (say so in it)."""
        return self.seen.get(key, 0) == self.first

    def counted(self) -> dict[str, int]:
        """``{key: occurrences not logged}``, for the keys past the limit."""
        return {key: n - self.first for key, n in self.seen.items() if n > self.first}
