"""Attachments: the files messages carry, from any protocol to every other.

A file is checked before anything is kept: its size (``GATEWAY_FILE_MAX_BYTES``, and per
message ``GATEWAY_FILE_MAX_MESSAGE_BYTES`` / ``GATEWAY_FILE_MAX_COUNT``), its type read from
its bytes (filetype's signatures; text told from markup here), never from its name or what the
sender declares, against the allow-list (``GATEWAY_FILE_TYPES``); an image is opened with
Pillow, refused past ``GATEWAY_FILE_MAX_PIXELS`` before it is decoded (decompression bombs),
refused if it cannot be decoded or holds markup beside its pixels (a polyglot), and
re-encoded as a thumbnail without its metadata. Its name is sanitised (no path, no control or
bidi characters, an extension that matches its type).

Then it is kept in the ``attachments`` storage (any Django storage: settings.STORAGES) under
a name made from a random key, as an ``Attachment`` row ``pending`` until the transaction
that stores its message makes it ``attached`` (gateway/services.py). A deleted or pruned
message makes its files ``gone``; ``attachments_sweep`` removes gone files, and pending ones
whose message never came, from the storage.

Files are served by the gateway (gateway/downloads.py) behind URLs signed with the secret
key that expire (``GATEWAY_FILE_URL_TTL``); the expiry is rounded up to a step, so every
client shown a message within the same step gets the same URL (frames stay encoded once).
"""

from __future__ import annotations

import codecs
import io
import logging
import re
import secrets
import time
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from struct import error as struct_error
from typing import IO, Any
from urllib.parse import quote

import filetype
from django.conf import settings
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.core.signing import Signer
from django.db import connection, transaction
from django.utils.crypto import constant_time_compare
from PIL import Image, ImageOps, UnidentifiedImageError

from gateway import events
from gateway.errors import GatewayError
from gateway.models import Attachment

logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = 320  # pixels, the longer side
PENDING_TTL = 3600.0  # seconds a received file waits for its message before it is swept
# Images a browser shows inline (served as themselves with Content-Disposition: inline); any
# other type is served as an attachment (downloaded, never rendered by the page's origin).
INLINE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# Images Pillow checks, measures and thumbnails.
RASTER_TYPES = INLINE_TYPES | {"image/bmp", "image/tiff"}
# Extensions a name may keep for its type (else the type's own is added).
_EXTENSIONS = {
    "image/jpeg": ("jpg", "jpeg", "jpe", "jfif"),
    "image/tiff": ("tif", "tiff"),
    "audio/mpeg": ("mp3", "mpga"),
    "audio/ogg": ("ogg", "oga", "opus"),
    "audio/mp4": ("m4a", "mp4", "aac"),
    "audio/x-wav": ("wav",),
    "video/mp4": ("mp4", "m4v"),
    "video/quicktime": ("mov", "qt"),
    "text/plain": ("txt", "text", "log", "csv", "tsv", "md", "json", "yaml", "yml", "ini",
                   "conf", "cfg"),
}
_TYPE_EXTENSION = {kind.mime: kind.extension for kind in filetype.types}
_TYPE_EXTENSION.update({"text/plain": "txt", "text/html": "html", "image/svg+xml": "svg",
                        "application/xml": "xml", "application/octet-stream": "bin"})
# Markup: in a text file it makes it HTML/SVG/XML (refused unless allowed).
_MARKUP = re.compile(
    rb"<\s*(?:script|html|svg|iframe|body|head|object|embed|meta|!doctype\s+html|\?xml)"
    rb"[\s>/]", re.IGNORECASE)
# Markup a browser would run, anywhere in an image file: a polyglot (refused). Not XML as
# such: photos carry XMP metadata (<?xpacket, <x:xmpmeta, <rdf:RDF), which is harmless.
_ACTIVE_MARKUP = re.compile(rb"<\s*(?:script|html|svg|iframe|body|object|embed)[\s>/]",
                            re.IGNORECASE)
_SIGNER_SALT = "gateway.files"
_NAME_LIMIT = 120  # characters of a file name


class FileRefused(GatewayError):
    """A file the gateway does not take; ``status`` is the HTTP status the API answers."""

    def __init__(self, code: str, detail: str, status: int = 400) -> None:
        super().__init__(code, detail)
        self.status = status


@dataclass(frozen=True, slots=True)
class Upload:
    """A file as a protocol received it: its bytes (a seekable binary file), the name and
    type its sender gave (hints only: the type is read from the bytes)."""

    file: IO[bytes]
    size: int
    name: str | None = None
    declared_type: str | None = None

    @classmethod
    def of_bytes(cls, data: bytes, *, name: str | None = None,
                 declared_type: str | None = None) -> Upload:
        return cls(file=io.BytesIO(data), size=len(data), name=name,
                   declared_type=declared_type)


@dataclass(frozen=True, slots=True)
class Inspected:
    """What the checks found: the type, its extension, an image's size and thumbnail."""

    content_type: str
    extension: str
    width: int | None = None
    height: int | None = None
    thumbnail: bytes | None = None
    thumbnail_extension: str = ""


def storage() -> Storage:
    return storages["attachments"]


# --- the checks ------------------------------------------------------------------------------


def uploads_check(uploads: Sequence[Upload]) -> None:
    """The limits of one message's files, before any is read: how many, how large."""
    limits = settings.GATEWAY
    if len(uploads) > limits["FILE_MAX_COUNT"]:
        raise FileRefused("too_many_files", f"a message carries at most "
                          f"{limits['FILE_MAX_COUNT']} files", 413)
    for upload in uploads:
        if upload.size > limits["FILE_MAX_BYTES"]:
            raise FileRefused("file_too_large", f"{_shown(upload.name)} has {upload.size} "
                              f"bytes; the limit is {limits['FILE_MAX_BYTES']}", 413)
        if upload.size == 0:
            raise FileRefused("empty_file", f"{_shown(upload.name)} is empty")
    total = sum(upload.size for upload in uploads)
    if total > limits["FILE_MAX_MESSAGE_BYTES"]:
        raise FileRefused("file_too_large", f"the files have {total} bytes together; a "
                          f"message carries at most {limits['FILE_MAX_MESSAGE_BYTES']}", 413)


def _shown(name: str | None) -> str:
    """A sender's file name as an error message quotes it (short, printable)."""
    return repr(name_clean(name, "", "")[:60]) if name else "the file"


def content_type_detect(head: bytes) -> str:
    """The content type of a file from its first bytes (8 KiB are enough): a known
    signature (filetype), else text (UTF-8 without NUL) told apart from markup, else
    ``application/octet-stream``."""
    kind = filetype.guess_mime(head)
    if kind:
        return kind
    if b"\x00" in head:
        return "application/octet-stream"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "application/octet-stream"
    markup = _MARKUP.search(head)
    if markup:
        if b"<svg" in head.lower():
            return "image/svg+xml"
        return "application/xml" if b"?xml" in markup.group(0) else "text/html"
    if text.lstrip("\ufeff \t\r\n").startswith("<"):  # some other markup: not plain text
        return "application/xml"
    return "text/plain"


def type_allowed(content_type: str) -> bool:
    return any(fnmatchcase(content_type, pattern) for pattern in settings.GATEWAY["FILE_TYPES"])


def inspect(upload: Upload) -> Inspected:
    """Check one file's content (type, allow-list, image soundness and size): what it is,
    or FileRefused."""
    upload.file.seek(0)
    head = upload.file.read(8192)
    content_type = content_type_detect(head)
    if not type_allowed(content_type):
        raise FileRefused("unsupported_type", f"{_shown(upload.name)} is {content_type}, "
                          "which this gateway does not take", 415)
    extension = _TYPE_EXTENSION.get(content_type, "bin")
    if content_type not in RASTER_TYPES:
        return Inspected(content_type=content_type, extension=extension)
    upload.file.seek(0)
    if _ACTIVE_MARKUP.search(upload.file.read()):
        raise FileRefused("unsafe_content", f"{_shown(upload.name)} holds markup beside its "
                          "image (a polyglot file)", 415)
    return _image_inspect(upload, content_type, extension)


def _image_inspect(upload: Upload, content_type: str, extension: str) -> Inspected:
    """Open an image with Pillow: refused past the pixel limit before decoding, or if it
    does not decode; its size, and a thumbnail re-encoded without its metadata."""
    most = settings.GATEWAY["FILE_MAX_PIXELS"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            upload.file.seek(0)
            with Image.open(upload.file) as image:
                _pixels_check(image, most, upload.name)
                image.verify()  # the file's structure (chunks, checksums), without decoding
            upload.file.seek(0)
            with Image.open(upload.file) as image:
                width, height = image.size
                if image.getexif().get(0x0112) in (5, 6, 7, 8):  # shown turned a quarter
                    width, height = height, width
                image.draft("RGB", (THUMBNAIL_SIZE * 2, THUMBNAIL_SIZE * 2))  # JPEG: scaled
                image.seek(0)
                image.load()
                shown = ImageOps.exif_transpose(image)
                thumbnail, thumbnail_extension = _thumbnail(shown)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FileRefused("image_too_large", f"{_shown(upload.name)} has too many pixels "
                          f"(the limit is {most})", 413) from None
    except FileRefused:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            IndexError, struct_error) as exc:
        raise FileRefused("invalid_image", f"{_shown(upload.name)} is not a readable "
                          f"{content_type} image ({type(exc).__name__})") from None
    return Inspected(content_type=content_type, extension=extension, width=width,
                     height=height, thumbnail=thumbnail,
                     thumbnail_extension=thumbnail_extension)


def _pixels_check(image: Image.Image, most: int, name: str | None) -> None:
    width, height = image.size  # from the header: nothing is decoded yet
    if width * height > most or width <= 0 or height <= 0:
        raise FileRefused("image_too_large", f"{_shown(name)} is {width}x{height} pixels; "
                          f"the limit is {most} pixels", 413)


def _thumbnail(image: Image.Image) -> tuple[bytes, str]:
    """A small copy, re-encoded (no EXIF, no text chunks, no colour profile): PNG where the
    image has transparency, else JPEG."""
    image = image.copy()
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    out = io.BytesIO()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image.convert("RGBA").save(out, "PNG", optimize=True)
        return out.getvalue(), "png"
    image.convert("RGB").save(out, "JPEG", quality=80, optimize=True)
    return out.getvalue(), "jpg"


def name_clean(raw: str | None, extension: str, key: str, content_type: str = "") -> str:
    """A file name safe to show and to download: its last path part, without control, format
    (bidi) or reserved characters, no leading dot, at most ``_NAME_LIMIT`` characters, and
    ending in an extension that belongs to its type (``extension`` added otherwise);
    ``file-<key>`` when nothing is left."""
    name = unicodedata.normalize("NFC", raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(char for char in name if unicodedata.category(char)[0] != "C")
    name = re.sub(r'[<>:"|?*]', "_", name).strip().lstrip(".").strip()
    if not name:
        name = f"file-{key[:8]}" if key else "file"
    if extension:
        stem, dot, suffix = name.rpartition(".")
        allowed = _EXTENSIONS.get(content_type, (extension,))
        if not dot or suffix.lower() not in allowed:
            stem, suffix = name, extension
        stem = stem[:_NAME_LIMIT - len(suffix) - 1].rstrip() or "file"
        return f"{stem}.{suffix}"
    return name[:_NAME_LIMIT]


# --- keeping files ---------------------------------------------------------------------------


def attachments_store(
    *, room: str, sender: events.Sender, uploads: Sequence[Upload],
) -> list[events.Attachment]:
    """Check and keep one message's files (pending until the message is stored with them:
    pass them to ``services.room_message_post``). FileRefused for the first file refused;
    then none of them is kept."""
    uploads_check(uploads)
    checked = [inspect(upload) for upload in uploads]
    kept: list[events.Attachment] = []
    try:
        for upload, found in zip(uploads, checked, strict=True):
            kept.append(_keep(room, sender, upload, found))
    except BaseException:
        attachments_discard([item["id"] for item in kept])
        raise
    return kept


def _keep(room: str, sender: events.Sender, upload: Upload,
          found: Inspected) -> events.Attachment:
    key = secrets.token_urlsafe(16)
    name = name_clean(upload.name, found.extension, key, found.content_type)
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    row = Attachment.objects.create(
        key=key, room=room, name=name, content_type=found.content_type, size=upload.size,
        width=found.width, height=found.height, sender_protocol=sender["protocol"],
        sender_id=sender["id"][:128], created_at=now, changed_at=now)
    store = storage()
    upload.file.seek(0)
    row.file = store.save(f"{key[:2]}/{key}.{found.extension}", File(upload.file))
    if found.thumbnail is not None:
        row.thumbnail = store.save(f"{key[:2]}/{key}.thumb.{found.thumbnail_extension}",
                                   ContentFile(found.thumbnail))
    Attachment.objects.filter(pk=row.pk).update(file=row.file, thumbnail=row.thumbnail)
    logger.info("file received", extra={
        "protocol": sender["protocol"], "room": room, "attachment": key,
        "content_type": found.content_type, "size": upload.size})
    return events.attachment(id=key, name=name, type=found.content_type, size=upload.size,
                             width=found.width, height=found.height,
                             thumbnail=found.thumbnail is not None)


def attachments_link(links: Iterable[tuple[str, int, str]]) -> None:
    """Inside the transaction storing messages: their files ``(room, message id, key)``
    become attached (a file swept as abandoned meanwhile stays gone)."""
    rows = [(seq, room, key) for room, seq, key in links]
    if not rows:
        return
    now = connection.ops.adapt_datetimefield_value(datetime.fromtimestamp(time.time(), tz=UTC))
    quote_name = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.executemany(
            f"UPDATE {quote_name(Attachment._meta.db_table)} SET seq = %s, state = "  # noqa: S608
            f"'{Attachment.ATTACHED}', changed_at = %s WHERE room = %s AND key = %s "
            f"AND state = '{Attachment.PENDING}'",
            [(seq, now, room, key) for seq, room, key in rows])


def attachments_gone(*, room: str, seqs: Iterable[int] | None = None,
                     upto: int | None = None, after: int | None = None) -> int:
    """Inside the transaction deleting or pruning messages: their files are gone (no longer
    served; swept from the storage once it commits). Returns how many."""
    query = Attachment.objects.filter(room=room, state=Attachment.ATTACHED)
    if seqs is not None:
        query = query.filter(seq__in=list(seqs))
    if after is not None:
        query = query.filter(seq__gt=after)
    if upto is not None:
        query = query.filter(seq__lte=upto)
    now = datetime.fromtimestamp(time.time(), tz=UTC)
    count = query.update(state=Attachment.GONE, changed_at=now)
    if count:
        transaction.on_commit(lambda: attachments_sweep(pending_ttl=None))
    return count


def attachments_discard(keys: Sequence[str]) -> None:
    """Files kept for a message that was not stored (refused, or a repeat): gone now."""
    if keys:
        Attachment.objects.filter(key__in=list(keys), state=Attachment.PENDING).update(
            state=Attachment.GONE, changed_at=datetime.fromtimestamp(time.time(), tz=UTC))
        attachments_sweep(pending_ttl=None)


def attachments_sweep(*, now: float | None = None, pending_ttl: float | None = PENDING_TTL,
                      limit: int = 500) -> int:
    """Remove gone files from the storage, then their rows (and, with ``pending_ttl``,
    first make gone the pending ones older than that: their message never came). Returns
    how many rows went. A file the storage cannot remove now stays for the next sweep."""
    moment = time.time() if now is None else now
    if pending_ttl is not None:
        stale = datetime.fromtimestamp(moment - pending_ttl, tz=UTC)
        Attachment.objects.filter(state=Attachment.PENDING, changed_at__lt=stale).update(
            state=Attachment.GONE, changed_at=datetime.fromtimestamp(moment, tz=UTC))
    rows = list(Attachment.objects.filter(state=Attachment.GONE)
                .values_list("pk", "key", "file", "thumbnail")[:limit])
    store, removed = storage(), []
    for pk, key, *names in rows:
        try:
            for name in names:
                if name:
                    store.delete(name)
        except Exception:
            logger.warning("a gone file could not be removed from the storage; will retry",
                           exc_info=True, extra={"protocol": "files", "attachment": key})
            continue
        removed.append(pk)
    if removed:
        Attachment.objects.filter(pk__in=removed, state=Attachment.GONE).delete()
    return len(removed)


def attachment_row(key: str) -> Attachment | None:
    """An attached file's row (None: unknown, pending or gone)."""
    return Attachment.objects.filter(key=key, state=Attachment.ATTACHED).first()


def attachment_read(key: str) -> bytes:
    """An attached file's bytes (for protocols that carry them: a chat's upload)."""
    row = attachment_row(key)
    if row is None:
        raise GatewayError("not_found", f"no file {key}")
    with storage().open(row.file, "rb") as handle:
        return handle.read()


# --- signed URLs -----------------------------------------------------------------------------


def _signature(variant: str, key: str, expires: int) -> str:
    return Signer(salt=_SIGNER_SALT).signature(f"{variant}:{key}:{expires}")


def url_expiry(now: float | None = None) -> int:
    """When a URL made now expires: ``GATEWAY_FILE_URL_TTL`` from now, rounded up to a step
    of an eighth of it (at least a minute), so URLs made within one step are the same."""
    ttl = settings.GATEWAY["FILE_URL_TTL"]
    step = max(60, ttl // 8)
    moment = int(time.time() if now is None else now) + ttl
    return (moment // step + 1) * step


def file_url(attachment: events.Attachment, *, thumbnail: bool = False,
             now: float | None = None, absolute: bool = True) -> str:
    """The signed URL of a file (or of its thumbnail): ``/files/<id>/<name>`` or
    ``/files/<id>/thumbnail``, with ``expires`` and ``signature``; absolute with
    ``GATEWAY_PUBLIC_URL`` when it is set and ``absolute``."""
    key, expires = attachment["id"], url_expiry(now)
    variant = "thumbnail" if thumbnail else "file"
    tail = "thumbnail" if thumbnail else quote(attachment["name"], safe="")
    base = settings.GATEWAY["PUBLIC_URL"] if absolute else ""
    return (f"{base}/files/{key}/{tail}?expires={expires}"
            f"&signature={_signature(variant, key, expires)}")


def signature_check(*, variant: str, key: str, expires: str | None, signature: str | None,
                    now: float | None = None) -> None:
    """A URL's signature and expiry: GatewayError ``invalid_signature`` (tampered with, or
    not signed by this gateway's secret key) or ``url_expired``."""
    if not expires or not signature or not expires.isdigit() or len(expires) > 12:
        raise GatewayError("invalid_signature", "the URL is not signed")
    if not constant_time_compare(signature, _signature(variant, key, int(expires))):
        raise GatewayError("invalid_signature", "the URL's signature is not valid")
    if int(expires) < (time.time() if now is None else now):
        raise GatewayError("url_expired", "the URL has expired: ask for the message again")


def attachment_public(attachment: events.Attachment, *, now: float | None = None,
                      absolute: bool = True) -> dict[str, Any]:
    """What clients see of a file: the log's fields and signed URLs (``thumbnail_url`` only
    for an image with a thumbnail)."""
    return {
        "id": attachment["id"], "name": attachment["name"], "type": attachment["type"],
        "size": attachment["size"], "width": attachment["width"],
        "height": attachment["height"],
        "url": file_url(attachment, now=now, absolute=absolute),
        "thumbnail_url": file_url(attachment, thumbnail=True, now=now, absolute=absolute)
        if attachment["thumbnail"] else None,
    }


def message_public(event: events.RoomMessage, *, absolute: bool = True) -> dict[str, Any]:
    """``events.message_public`` with each file's signed URLs."""
    public = events.message_public(event)
    if event["attachments"]:
        now = time.time()
        public["attachments"] = [attachment_public(item, now=now, absolute=absolute)
                                 for item in event["attachments"]]
    return public


def content_disposition_inline(content_type: str) -> bool:
    """Whether a type is served to be shown in the browser (safe raster images only)."""
    return content_type in INLINE_TYPES
