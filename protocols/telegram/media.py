"""A room message with files as Telegram calls: which files go as photos, as albums, as
documents or as links, where the message's text goes, and how an edit reaches each part.

Telegram's limits for bots (https://core.telegram.org/bots/api#sending-files): uploads of at
most 50 MB; a photo of at most 10 MB whose width and height are at most 10,000 together and
whose sides are at most 20 to 1. So, in the message's order within each kind:

- an image Telegram shows as a photo (JPEG, PNG, WebP, within those limits) is a photo: one
  alone by ``sendPhoto``, several as albums (``sendMediaGroup``, 10 at most; one left over
  alone by ``sendPhoto``);
- any other file (or an image past the photo limits) up to 50 MB is a document, each by
  ``sendDocument``;
- a larger file is a line of text: its name and size, and the gateway's signed link to it
  when the gateway has a public address (``GATEWAY_PUBLIC_URL``), else that it is too large
  to send here.

Photos go first, then documents. The message's text, as the bot shows room messages
(``alice (web): look``, with the lines of the files sent as links), is the caption of the
first photo or document. A caption holds 1024 characters: a longer text is cut there and the
rest follows the media as text messages (rather than a text message followed by the media
without a caption: every photo or document then comes with who sent it, and the layout does
not depend on the text, which edits change). A message whose files are all links is sent as
text, like one without files.

The chat's copies of the message, in order, are the media messages (an album is one per
file) and then the text messages; a send Telegram refuses half-way stops there, so what is
recorded is always a prefix of that. An edit re-renders the text: the first media message
gets the new caption (``editMessageCaption``: Telegram refuses ``editMessageText`` for a
message without text), the text messages the rest (``editMessageText``), and text messages
no longer needed are deleted; where each is follows from the files alone (``layout``), which
an edit never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bots.markup import Line, Reply
from gateway import events
from protocols.telegram import render
from protocols.telegram.calls import DOCUMENT, PHOTO, Call, Delete, EditCaption, EditText

UPLOAD_MAX_BYTES = 50 * 1024 * 1024  # what a bot may upload
PHOTO_MAX_BYTES = 10 * 1024 * 1024  # what a photo may weigh
PHOTO_MAX_SIDES = 10_000  # width + height of a photo
PHOTO_MAX_RATIO = 20.0  # the longer side over the shorter
ALBUM_MAX = 10  # files in one sendMediaGroup
PHOTO_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})


@dataclass(frozen=True)
class Group:
    """Files that go in one call: one alone, or 2 to ``ALBUM_MAX`` as an album."""

    kind: str  # PHOTO or DOCUMENT
    files: tuple[events.Attachment, ...]


@dataclass(frozen=True)
class Layout:
    groups: tuple[Group, ...]  # photos first, then documents
    linked: tuple[events.Attachment, ...]  # too large to upload: lines of text

    @property
    def media_messages(self) -> int:
        """How many messages the media make in the chat (an album one per file)."""
        return sum(len(group.files) for group in self.groups)


@dataclass(frozen=True)
class Rendered:
    """A message with files as the chat is sent it (made once for every chat of its room)."""

    layout: Layout
    caption: str  # Telegram HTML: the first media message's ("" when there is no media)
    texts: tuple[str, ...]  # Telegram HTML: the text messages after the media


def file_kind(attachment: events.Attachment) -> str | None:
    """How Telegram gets a file: PHOTO, DOCUMENT, or None (too large: a link)."""
    size = attachment["size"]
    if size > UPLOAD_MAX_BYTES:
        return None
    width, height = attachment["width"], attachment["height"]
    if (attachment["type"] in PHOTO_TYPES and size <= PHOTO_MAX_BYTES and width and height
            and width + height <= PHOTO_MAX_SIDES
            and max(width, height) <= PHOTO_MAX_RATIO * min(width, height)):
        return PHOTO
    return DOCUMENT


def layout(attachments: Sequence[events.Attachment]) -> Layout:
    """Which calls carry a message's files."""
    kinds = [(item, file_kind(item)) for item in attachments]
    photos = [item for item, kind in kinds if kind == PHOTO]
    groups = [Group(PHOTO, tuple(photos[start:start + ALBUM_MAX]))
              for start in range(0, len(photos), ALBUM_MAX)]
    groups += [Group(DOCUMENT, (item,)) for item, kind in kinds if kind == DOCUMENT]
    return Layout(tuple(groups), tuple(item for item, kind in kinds if kind is None))


def rendered(attachments: Sequence[events.Attachment], message: Reply,
             link: Callable[[events.Attachment], Line]) -> Rendered:
    """The message (as the bot shows it) with its files: the caption and the texts; ``link``
    makes the line of a file sent as a link."""
    plan = layout(attachments)
    whole = Reply(message.lines + tuple(link(item) for item in plan.linked))
    if not plan.groups:
        return Rendered(plan, "", tuple(render.messages(whole)))
    caption, rest = render.caption_split(whole)
    return Rendered(plan, caption, tuple(rest))


def edits(message: Rendered, copies: Sequence[int]) -> list[Call]:
    """The calls that give the chat's copies (its message ids, in order) the message's new
    rendering; text beyond the copies the chat has is cut, as for a text message."""
    media = message.layout.media_messages
    calls: list[Call] = []
    if media and copies:
        calls.append(EditCaption(copies[0], message.caption))
    texts = list(copies[media:])
    calls += [EditText(copy, text) for copy, text in zip(texts, message.texts, strict=False)]
    calls += [Delete(copy) for copy in texts[len(message.texts):]]
    return calls
