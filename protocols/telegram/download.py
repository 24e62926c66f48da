"""Fetching a file a chat sent from the Bot API: ``getFile``, then the file itself.

Bots download files of at most 20 MB (https://core.telegram.org/bots/api#getfile): a larger
one is not fetched (``FileTooLarge``, from the size the update declared, ``getFile``'s answer,
or the bytes that came). A file Telegram will not hand out (an id it no longer knows) is
``FileUnavailable``; an outage is Telegram's ``NetworkError`` (the update is then handled
again later).

The file's URL holds the bot token (``<api>/file/bot<token>/<path>``, how Matterbridge came
to leak it): it stays inside python-telegram-bot's ``File`` here and is never logged, stored
or shown. What failed is told by kind, not by URL; the gateway keeps its own copy of the
bytes and serves them behind its own signed URLs (gateway/files.py).
"""

from __future__ import annotations

from telegram import Bot
from telegram.error import BadRequest, Forbidden, InvalidToken

DOWNLOAD_MAX_BYTES = 20 * 1024 * 1024  # what the Bot API lets a bot download
READ_TIMEOUT = 30.0  # seconds between two reads of a download (not the whole of it)


class FileTooLarge(Exception):
    """Larger than a bot may download: not fetched."""


class FileUnavailable(Exception):
    """Telegram refused to hand the file out (for good)."""


async def fetch(bot: Bot, file_id: str, *, limit: int = DOWNLOAD_MAX_BYTES) -> bytes:
    """The file's bytes (at most ``limit``). ``FileTooLarge``, ``FileUnavailable``, or
    ``NetworkError`` (try again later)."""
    try:
        found = await bot.get_file(file_id, read_timeout=READ_TIMEOUT)
    except (BadRequest, Forbidden) as exc:
        if "too big" in exc.message.lower():  # "Bad Request: file is too big"
            raise FileTooLarge(exc.message) from None
        raise FileUnavailable(exc.message) from None
    if found.file_size is not None and found.file_size > limit:
        raise FileTooLarge(f"{found.file_size} bytes")
    try:
        data = await found.download_as_bytearray(read_timeout=READ_TIMEOUT)
    except (BadRequest, Forbidden, InvalidToken) as exc:  # InvalidToken: the file's 404
        raise FileUnavailable(exc.message) from None
    except RuntimeError:  # getFile answered without a path
        raise FileUnavailable("Telegram gave no path for the file") from None
    if len(data) > limit:
        raise FileTooLarge(f"{len(data)} bytes")
    return bytes(data)
