"""Serving attachments: ``GET /files/<id>/<name>`` and ``GET /files/<id>/thumbnail``.

Every request carries the URL's ``expires`` and ``signature`` (gateway/files.py): a URL this
gateway made, for that file and that variant, not yet expired. The file must still be
attached to a message (a deleted or pruned message's files are gone). With
``GATEWAY_REQUIRE_LOGIN`` the viewer must also be logged in, or send a key or connect token
that may read the room.

What a browser gets cannot run in the page's origin: the type read from the bytes, never
sniffed (``X-Content-Type-Options: nosniff``), a sandbox with nothing allowed
(``Content-Security-Policy``), and ``Content-Disposition: attachment`` for every type but the
raster images shown inline. The bytes are streamed from the storage in a worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import IO

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header

from gateway import files, metrics
from gateway.errors import GatewayError
from gateway.models import Attachment
from gateway.views import error_response

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
STATUS = {"invalid_signature": 403, "url_expired": 403, "not_found": 404,
          "login_required": 401, "forbidden": 403, "method_not_allowed": 405}


async def file_view(http: HttpRequest, key: str, name: str) -> HttpResponse:
    """A file (``name`` is for the reader: the stored name is served) or its thumbnail."""
    variant = "thumbnail" if name == "thumbnail" else "file"  # a file's name has a suffix
    try:
        if http.method not in ("GET", "HEAD"):
            raise GatewayError("method_not_allowed", "use GET")
        files.signature_check(variant=variant, key=key, expires=http.GET.get("expires"),
                              signature=http.GET.get("signature"))
        # Django's own hop (the request's connection is managed by its signals, as for a
        # synchronous view), not Channels' (which closes old connections around it).
        row = await sync_to_async(_row_for)(http, key)
    except GatewayError as exc:
        status = STATUS.get(exc.code, 400)
        metrics.refused("files", exc.code)
        logger.warning("file refused: %s %s", exc.code, exc.detail, extra={
            "protocol": "files", "attachment": key, "code": exc.code, "status": status})
        response = error_response(status, exc.code, exc.detail)
        if status == 405:
            response["Allow"] = "GET, HEAD"
        response["Cache-Control"] = "no-store"
        return response
    return await _serve(http, row, thumbnail=variant == "thumbnail")


def _row_for(http: HttpRequest, key: str) -> Attachment:
    """The attached file, if the viewer may have it."""
    row = files.attachment_row(key)
    if row is None:
        raise GatewayError("not_found", "no such file (its message may have been deleted)")
    if settings.GATEWAY["REQUIRE_LOGIN"]:
        from gateway import api  # the API's one way of telling who asks

        principal = api.principal_of(http)
        if principal.kind == "anonymous":
            raise GatewayError("login_required", "log in first, or send an API key")
        if not principal.may("read") or not principal.may_use(row.room):
            raise GatewayError("forbidden", f"this {principal.kind} may not read room "
                               f"{row.room}")
    return row


async def _serve(http: HttpRequest, row: Attachment, *, thumbnail: bool) -> HttpResponse:
    stored = row.thumbnail if thumbnail else row.file
    if not stored:
        return error_response(404, "not_found", "this file has no thumbnail")
    etag = f'"{row.key}{"-t" if thumbnail else ""}"'
    expires = int(http.GET["expires"])
    max_age = max(0, min(expires - int(time.time()), 86_400))
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": f"private, max-age={max_age}",
        "ETag": etag,
        "Referrer-Policy": "no-referrer",
    }
    if http.headers.get("If-None-Match") == etag:
        response = HttpResponse(status=304)
    else:
        try:
            size = await sync_to_async(files.storage().size, thread_sensitive=False)(stored)
        except OSError:
            logger.error("a file is missing from the storage", extra={
                "protocol": "files", "room": row.room, "attachment": row.key})
            return error_response(404, "not_found", "the file is not in the storage")
        if http.method == "HEAD":
            response = HttpResponse()
        else:
            response = StreamingHttpResponse(_chunks(stored))
        response["Content-Length"] = str(size)
        if thumbnail:
            kind, inline = ("image/png" if stored.endswith(".png") else "image/jpeg"), True
            filename = "thumbnail." + stored.rsplit(".", 1)[-1]
        else:
            kind = row.content_type
            inline = files.content_disposition_inline(kind)
            filename = row.name
        response["Content-Type"] = (f"{kind}; charset=utf-8" if kind.startswith("text/")
                                    else kind)
        response["Content-Disposition"] = content_disposition_header(
            not inline, filename) or "attachment"
    for header, value in headers.items():
        response[header] = value
    return response


async def _chunks(stored: str) -> AsyncIterator[bytes]:
    """The file's bytes, opened once the response is sent and read in a worker thread a
    chunk at a time (never all in memory)."""
    handle: IO[bytes] = await sync_to_async(files.storage().open, thread_sensitive=False)(
        stored, "rb")
    read = sync_to_async(handle.read, thread_sensitive=False)
    try:
        while chunk := await read(CHUNK):
            yield chunk
    finally:
        await sync_to_async(handle.close, thread_sensitive=False)()
