"""A local stand-in for Telegram's Bot API, served over real HTTP for python-telegram-bot.

Point a real ``telegram.Bot(token, base_url=f"{standin.url}/bot")`` at it. It keeps the
update queue (long polling with offsets), the webhook setting and every message of every
chat (the bot's and its users'), and can answer the next calls of a method with an error
(flood control, outages) or stop listening altogether, as https://core.telegram.org/bots/api
describes the real one.

Messages live on after they are sent, as Telegram's do: the bot may edit its own
(``editMessageText``: "message is not modified" for the same text, "message can't be edited"
for one older than 48 hours, which ``age`` makes of a message, or not the bot's), delete
them (``deleteMessage``: its own, and its users' in private chats and in groups where it is
an admin; "message to delete not found", "message can't be deleted"), react to them
(``setMessageReaction``: one emoji of Telegram's list; ``REACTION_INVALID`` otherwise) and
answer them (``reply_parameters``). Users edit theirs (``edit_update``), react
(``reaction_update``: ``message_reaction`` updates, which Telegram sends only where the bot
is an admin, and only to a bot that asks for them in ``allowed_updates``) and reply
(``text_update(..., reply_to=)``); a group becomes a supergroup (``migrate``: its service
messages, and every call to the old group answered with ``migrate_to_chat_id``).

Files (https://core.telegram.org/bots/api#sending-files): users send photos (several sizes),
documents, voice notes, audio, video, animations, video notes and stickers (``file_update``);
the bot fetches them with ``getFile`` (refused past 20 MB: "file is too big") and then
``GET /file/bot<token>/<file_path>`` (each download is recorded in ``downloads``). The bot
sends files with ``sendPhoto``, ``sendDocument`` and ``sendMediaGroup`` as multipart uploads
(an album's parts named by ``attach://<name>`` in its ``media``) or by the ``file_id`` of a
file Telegram has (``media``: every message sent so, with the exact bytes, file name and
caption); uploads past 50 MB are refused with 413, photos past 10 MB or 10,000 pixels of
width and height together, or sides more than 20 to 1 (the wording of those refusals is
approximate), captions past 1024 characters. It edits captions with ``editMessageCaption``
(``caption_edits``); ``editMessageText`` of a message without text is refused ("there is no
text in the message to edit"), as ``editMessageCaption`` of one without a caption.

Privacy mode (https://core.telegram.org/bots/features#privacy-mode) is on by default, as for
a new bot: in a group where the bot is not an administrator, only commands (not addressed to
another bot), replies to the bot's messages and service messages reach it; other messages
(and their edits) are withheld, never queued.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import html
import io
import json
import mimetypes
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from html.parser import HTMLParser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from PIL import Image
from telegram.constants import ReactionEmoji

from tests.servers import free_port

BOT_ID = 4242
MAX_TEXT_LENGTH = 4096  # in UTF-16 code units, after entity parsing, as Telegram counts
MAX_CAPTION_LENGTH = 1024
DOWNLOAD_LIMIT = 20 * 1024 * 1024  # what getFile hands a bot
UPLOAD_LIMIT = 50 * 1024 * 1024  # what a bot may upload
PHOTO_LIMIT = 10 * 1024 * 1024
ALBUM_SIZES = range(2, 11)
FILE_FIELDS = {"sendPhoto": "photo", "sendDocument": "document"}
FIRST_UPDATE_ID = 1000
GROUP_USER_ID = 1001  # the sender of text_update() in a group when no user_id is given
CHANGE_WINDOW = 48 * 3600  # seconds after which a message can no longer be edited or deleted
REACTION_EMOJI = frozenset(emoji.value for emoji in ReactionEmoji)  # what a bot may react with
# Not sent unless allowed_updates names them (https://core.telegram.org/bots/api#getupdates).
NOT_BY_DEFAULT = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
SERVICE_KEYS = frozenset(
    "new_chat_members left_chat_member new_chat_title group_chat_created migrate_to_chat_id"
    " migrate_from_chat_id pinned_message supergroup_chat_created".split()
)
NOT_MODIFIED = ("message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message")

# Form values that are strings even when they look like JSON ("123", "true", "[1]").
STRING_PARAMS = frozenset(
    "text caption parse_mode url secret_token ip_address title description short_description"
    " name business_connection_id file_id photo document".split()
)
HTML_TAGS = frozenset(
    "b strong i em u ins s strike del a code pre tg-spoiler span blockquote tg-emoji".split()
)
HTML_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
GROUP_TYPES = ("group", "supergroup")
# getChatMember answers by status: the fields Telegram always sends besides status and user.
ADMIN_RIGHTS = (
    "can_be_edited is_anonymous can_manage_chat can_delete_messages can_manage_video_chats"
    " can_restrict_members can_promote_members can_change_info can_invite_users"
    " can_post_stories can_edit_stories can_delete_stories".split()
)
MEMBER_FIELDS: dict[str, dict[str, Any]] = {
    "creator": {"is_anonymous": False},
    "administrator": {right: right != "can_be_edited" and right != "is_anonymous"
                      for right in ADMIN_RIGHTS},
    "member": {},
    "left": {},
    "kicked": {"until_date": 0},
}


class ApiError(Exception):
    """A Bot API error answer: ``{"ok": false, "error_code": ..., "description": ...}``."""

    def __init__(self, status: int, description: str, retry_after: int | None = None,
                 migrate_to_chat_id: int | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after
        self.migrate_to_chat_id = migrate_to_chat_id

    def payload(self) -> dict:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        if self.migrate_to_chat_id is not None:
            body["parameters"] = {"migrate_to_chat_id": self.migrate_to_chat_id}
        return body


def bad_request(reason: str) -> ApiError:
    return ApiError(400, f"Bad Request: {reason}")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class _TelegramHTML(HTMLParser):
    """Telegram's HTML parse mode: its few tags, properly nested; collects the visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in HTML_TAGS:
            raise bad_request(f'can\'t parse entities: Unsupported start tag "{tag}"')
        attributes = dict(attrs)
        if tag == "span" and attributes.get("class") != "tg-spoiler":
            raise bad_request('can\'t parse entities: Tag "span" must have class "tg-spoiler"')
        if tag == "tg-emoji" and not attributes.get("emoji-id"):
            raise bad_request(
                'can\'t parse entities: Tag "tg-emoji" must have attribute "emoji-id"'
            )
        self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raise bad_request(f'can\'t parse entities: Unsupported start tag "{tag}/"')

    def handle_endtag(self, tag: str) -> None:
        if not self.open:
            raise bad_request(f'can\'t parse entities: Unexpected end tag "{tag}"')
        expected = self.open.pop()
        if tag != expected:
            raise bad_request(
                f'can\'t parse entities: Unmatched end tag, expected "</{expected}>", '
                f'found "</{tag}>"'
            )

    def handle_data(self, data: str) -> None:
        if "<" in data:  # a bare "<", or a tag left open at the end such as "<b"
            raise bad_request('can\'t parse entities: Unescaped "<" (write &lt;)')
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        if name not in HTML_ENTITIES:
            raise bad_request(f'can\'t parse entities: Unsupported HTML entity "&{name};"')
        self.text.append(HTML_ENTITIES[name])

    def handle_charref(self, name: str) -> None:
        self.text.append(html.unescape(f"&#{name};"))

    def unknown_decl(self, data: str) -> None:
        raise bad_request("can't parse entities: Unsupported declaration")

    handle_comment = handle_decl = handle_pi = unknown_decl

    def visible_text(self, source: str) -> str:
        self.feed(source)
        self.close()
        if self.open:
            raise bad_request(
                "can't parse entities: Can't find end tag corresponding to start tag "
                f'"{self.open[-1]}"'
            )
        return "".join(self.text)


def visible_text(text: str, parse_mode: str | None) -> str:
    """The message text as Telegram shows it (HTML tags removed, entities unescaped)."""
    if parse_mode is None or parse_mode == "":
        return text
    mode = parse_mode.lower()
    if mode == "html":
        return _TelegramHTML().visible_text(text)
    if mode in ("markdown", "markdownv2"):
        return text  # not parsed here: the length check counts the markup too
    raise bad_request("unsupported parse_mode")


def decode_form_value(name: str, value: str) -> Any:
    """PTB JSON-encodes every non-string form value; undo that (``"5"`` -> 5, ``"true"`` ...)."""
    if name in STRING_PARAMS:
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return value if decoded is None or isinstance(decoded, str) else decoded


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            chunk = handler.rfile.read(size)
            handler.rfile.readline()  # the CRLF after each chunk
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def parse_params(handler: BaseHTTPRequestHandler, query: str) -> dict[str, Any]:
    """Parameters from the query string and a JSON, url-encoded or multipart body."""
    params: dict[str, Any] = {
        k: decode_form_value(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
    }
    body = read_body(handler)
    content_type = handler.headers.get("Content-Type", "")
    kind = content_type.split(";")[0].strip().lower()
    if not body:
        return params
    if kind == "application/json":
        decoded = json.loads(body)
        if not isinstance(decoded, dict):
            raise bad_request("parameters must be a JSON object")
        params.update(decoded)
    elif kind == "application/x-www-form-urlencoded":
        form = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        params.update((k, decode_form_value(k, v)) for k, v in form)
    elif kind == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            content = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            if filename is not None:  # an uploaded file
                params[name] = {"filename": filename, "content": content}
            else:
                params[name] = decode_form_value(name, content.decode("utf-8"))
    return params


def as_chat_id(value: Any) -> int | str:
    """Chat ids are integers; "@channelusername" stays a string."""
    if isinstance(value, bool):
        raise bad_request("chat not found")
    try:
        return int(value)
    except (TypeError, ValueError):
        if isinstance(value, str) and value.startswith("@"):
            return value
        raise bad_request("chat not found") from None


def update_type(update: dict) -> str | None:
    return next((key for key in update if key != "update_id"), None)


def emoji_reactions(emoji: list[str | dict]) -> list[dict]:
    """Reactions as updates carry them: an emoji, or a ReactionType object as it is."""
    return [{"type": "emoji", "emoji": e} if isinstance(e, str) else e for e in emoji]


def image_size(content: bytes | None) -> tuple[int, int] | None:
    """An image's width and height, or None if it is none."""
    try:
        with Image.open(io.BytesIO(content or b"")) as image:
            return image.size
    except Exception:  # noqa: BLE001 - whatever Pillow makes of it: not an image
        return None


def _medium(kind: str, ref: dict, *, file_name: str | None, mime_type: str | None, emoji: str,
            is_animated: bool, is_video: bool) -> dict:
    """A user's file as a message carries it (the fields Telegram always sends)."""
    if kind == "document":
        return {**ref, "file_name": file_name or "document",
                "mime_type": mime_type or "application/octet-stream"}
    if kind == "voice":
        return {**ref, "duration": 2, "mime_type": mime_type or "audio/ogg"}
    if kind == "audio":
        return {**ref, "duration": 2, "file_name": file_name or "audio.mp3",
                "mime_type": mime_type or "audio/mpeg"}
    if kind in ("video", "animation"):
        return {**ref, "width": 320, "height": 240, "duration": 2,
                "file_name": file_name or f"{kind}.mp4", "mime_type": mime_type or "video/mp4"}
    if kind == "video_note":
        return {**ref, "length": 240, "duration": 2}
    if kind == "sticker":
        return {**ref, "type": "regular", "width": 512, "height": 512,
                "is_animated": is_animated, "is_video": is_video, "emoji": emoji}
    raise ValueError(f"unknown kind of file {kind!r}")


class BotApiStandIn:
    """Telegram's Bot API for one bot token, on 127.0.0.1, in a background thread."""

    def __init__(
        self,
        token: str,
        *,
        port: int | None = None,
        bot_username: str = "gateway_test_bot",
        group_privacy: bool = True,
    ) -> None:
        self.token = token
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.me = {
            "id": BOT_ID,
            "is_bot": True,
            "first_name": "Gateway",
            "username": bot_username,
            "can_join_groups": True,
            "can_read_all_group_messages": not group_privacy,
            "supports_inline_queries": False,
        }
        self.sent: list[dict] = []
        self.edited: list[dict] = []  # editMessageText calls that edited a message
        self.deleted: list[dict] = []  # deleteMessage calls that deleted one
        self.reacted: list[dict] = []  # setMessageReaction calls that set the bot's reaction
        self.media: list[dict] = []  # photos and documents the bot sent, one per message
        self.caption_edits: list[dict] = []  # editMessageCaption calls that edited one
        self.downloads: list[str] = []  # file_path of each file downloaded
        # file_id -> {"content", "file_unique_id", "file_size", "file_path", "kind", ...}
        self.files: dict[str, dict] = {}
        # (chat, message_id) -> {"message": as Telegram sends it, "source": (text, parse_mode)}
        self.messages: dict[tuple[int, int], dict] = {}
        self.bot_reactions: dict[tuple[int, int], list[str]] = {}  # the bot's, per message
        self.migrated: dict[int, int] = {}  # group -> the supergroup it became
        self.withheld: list[dict] = []  # updates privacy mode kept from the bot
        self.served: Counter[int] = Counter()  # update_id -> getUpdates answers that had it
        self._members: dict[tuple[int, int], str] = {}  # (chat, user) -> status
        self.calls: list[tuple[str, dict]] = []
        self.webhook: dict | None = None
        self.allowed_updates: list[str] | None = None  # as last set; None means all types
        self._cond = threading.Condition()  # guards all the state, wakes long polls
        self._queue: list[dict] = []  # updates not yet confirmed, oldest first
        self._redeliver: set[int] = set()  # ids of repeat_update() copies not yet delivered
        self._history: dict[int, dict] = {}  # every update pushed, for repeat_update()
        self._next_update_id = FIRST_UPDATE_ID
        self._next_message_id = 1
        self._chats: dict[int, dict] = {}  # chats seen in updates (their type, title)
        self._failures: list[dict] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped by stop(): requests to a stopped server go unanswered
        self._methods = {
            "getMe": self._get_me,
            "getUpdates": self._get_updates,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
            "editMessageCaption": self._edit_message_caption,
            "sendPhoto": lambda params: self._send_file("sendPhoto", params),
            "sendDocument": lambda params: self._send_file("sendDocument", params),
            "sendMediaGroup": self._send_media_group,
            "getFile": self._get_file,
            "deleteMessage": self._delete_message,
            "setMessageReaction": self._set_message_reaction,
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "getChatMember": self._get_chat_member,
        }
        self._method_names = {name.lower(): name for name in self._methods}

    # --- listening -------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the port (again, after stop(): all state is kept)."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.standin = self
        server.generation = self._generation
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"botapi-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close the socket, as if Telegram were unreachable; keep state."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._generation += 1
            self._cond.notify_all()  # long polls in progress give up without an answer
        server.shutdown()
        server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self) -> BotApiStandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what the test does ----------------------------------------------------------------

    @property
    def group_privacy(self) -> bool:
        return not self.me["can_read_all_group_messages"]

    @group_privacy.setter
    def group_privacy(self, on: bool) -> None:
        """BotFather's /setprivacy (Telegram applies it to groups the bot joins afterwards;
        here, at once)."""
        with self._cond:
            self.me["can_read_all_group_messages"] = not on

    def set_member(self, chat_id: int, status: str, *, user_id: int = BOT_ID) -> None:
        """Someone's status in a chat, as getChatMember answers it (default: the bot's);
        "administrator" or "creator" lets the bot read a group's every message."""
        if status not in MEMBER_FIELDS:
            raise ValueError(f"unknown chat member status {status!r}")
        with self._cond:
            self._members[(chat_id, user_id)] = status

    @contextmanager
    def together(self) -> Iterator[None]:
        """The updates pushed inside are served together, in one getUpdates answer."""
        with self._cond:
            yield

    def push_update(self, update: dict) -> dict:
        """Queue an update (numbered from 1000 unless it has an update_id) and wake long polls.
        An update privacy mode withholds is only recorded in ``withheld`` (and gets no id)."""
        with self._cond:
            for value in update.values():
                if isinstance(value, dict) and isinstance(value.get("chat"), dict):
                    chat = value["chat"]
                    self._chats[chat["id"]] = {**self._chats.get(chat["id"], {}), **chat}
            if self._privacy_withholds(update):
                self.withheld.append(update)
                return update
            if "update_id" not in update:
                update["update_id"] = self._next_update_id
            self._next_update_id = max(self._next_update_id, update["update_id"] + 1)
            self._history[update["update_id"]] = update
            self._queue.append(update)
            self._cond.notify_all()
        return update

    def text_update(
        self,
        chat_id: int,
        text: str,
        *,
        user_id: int | None = None,
        username: str | None = "alice",
        first_name: str = "Alice",
        last_name: str | None = None,
        chat_type: str = "private",
        title: str | None = None,
        update_id: int | None = None,
        reply_to: int | None = None,
    ) -> dict:
        """Push a "message" update with this text from a user in a chat (``reply_to``: as a
        reply to that message of the chat); return it."""
        fields: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            fields["entities"] = [
                {"type": "bot_command", "offset": 0, "length": utf16_len(command)}
            ]
        return self._user_message(
            chat_id, fields, text, user_id=user_id, username=username, first_name=first_name,
            last_name=last_name, chat_type=chat_type, title=title, update_id=update_id,
            reply_to=reply_to)

    def file_update(
        self,
        chat_id: int,
        kind: str,
        content: bytes,
        *,
        caption: str | None = None,
        file_name: str | None = None,
        mime_type: str | None = None,
        file_size: int | None = None,
        emoji: str = "🙂",
        is_animated: bool = False,
        is_video: bool = False,
        user_id: int | None = None,
        username: str | None = "alice",
        first_name: str = "Alice",
        chat_type: str = "private",
        title: str | None = None,
        reply_to: int | None = None,
    ) -> dict:
        """Push a "message" update carrying a file a user sent: ``kind`` is ``photo`` (sent
        as a small size, with other bytes, and the full ``content``), ``document``,
        ``voice``, ``audio``, ``video``, ``animation`` (with its ``document`` too, as
        Telegram does), ``video_note`` or ``sticker``. ``file_size`` is what the update
        declares (default: the content's length); getFile serves the file."""
        size = len(content) if file_size is None else file_size
        with self._cond:
            if kind == "photo":
                width, height = image_size(content) or (800, 600)
                small = self._file_register("photo", b"a small size of the photo", None,
                                            file_path_kind="photos")
                full = self._file_register("photo", content, size, file_path_kind="photos")
                fields: dict[str, Any] = {"photo": [
                    {**self._file_ref(small), "width": 90, "height": 67},
                    {**self._file_ref(full), "width": width, "height": height}]}
            else:
                ref = self._file_ref(self._file_register(kind, content, size))
                fields = {kind: _medium(kind, ref, file_name=file_name, mime_type=mime_type,
                                        emoji=emoji, is_animated=is_animated,
                                        is_video=is_video)}
                if kind == "animation":
                    fields["document"] = {**ref, "file_name": file_name or "animation.mp4",
                                          "mime_type": mime_type or "video/mp4"}
        if caption is not None:
            fields["caption"] = caption
        return self._user_message(
            chat_id, fields, caption or "", user_id=user_id, username=username,
            first_name=first_name, chat_type=chat_type, title=title, reply_to=reply_to)

    def _user_message(
        self, chat_id: int, fields: dict[str, Any], source: str, *, user_id: int | None,
        username: str | None, first_name: str, chat_type: str, title: str | None,
        last_name: str | None = None, update_id: int | None = None,
        reply_to: int | None = None,
    ) -> dict:
        """Push a "message" update from a user in a chat with these fields; return it."""
        if user_id is None:
            user_id = chat_id if chat_type == "private" else GROUP_USER_ID
        sender: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
        if last_name is not None:
            sender["last_name"] = last_name
        if username is not None:
            sender["username"] = username
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if title is not None:
            chat["title"] = title
        message: dict[str, Any] = {"date": int(time.time()), "chat": chat, "from": sender,
                                   **fields}
        with self._cond:
            if reply_to is not None:
                message["reply_to_message"] = self._answered(chat_id, reply_to)
            message = self._keep({"message_id": self._take_message_id(), **message}, source)
        update: dict[str, Any] = {"message": message}
        if update_id is not None:
            update = {"update_id": update_id, **update}
        return self.push_update(update)

    def edit_update(self, chat_id: int, message_id: int, text: str) -> dict:
        """A user edits their message: an "edited_message" update with its new text."""
        with self._cond:
            stored = self.messages[(chat_id, message_id)]
            message = {**stored["message"], "text": text, "edit_date": int(time.time())}
            message.pop("entities", None)
            stored.update(message=message, source=(text, None))
        return self.push_update({"edited_message": dict(message)})

    def reaction_update(
        self, chat_id: int, message_id: int, *, user_id: int, old: Sequence[str | dict] = (),
        new: Sequence[str | dict] = (), first_name: str = "Alice",
    ) -> dict:
        """A user changes their reactions to a message: a "message_reaction" update (emoji
        as strings, other reaction types as their objects, such as a custom emoji)."""
        with self._cond:
            chat = self._chat(chat_id)
        return self.push_update({"message_reaction": {
            "chat": chat, "message_id": message_id,
            "user": {"id": user_id, "is_bot": False, "first_name": first_name},
            "date": int(time.time()), "old_reaction": emoji_reactions(list(old)),
            "new_reaction": emoji_reactions(list(new)),
        }})

    def migrate(self, chat_id: int, to: int, *, user_id: int = GROUP_USER_ID,
                updates: bool = True) -> None:
        """The group becomes the supergroup ``to``: the old group gets a service message
        naming it (``migrate_to_chat_id``), the new one one naming the old; every call to
        the old group is refused from now on, saying where it went. (``updates=False``: the
        service messages are not pushed, as if the bot called before it had them.)"""
        sender = {"id": user_id, "is_bot": False, "first_name": "Owner"}
        with self._cond:
            old = self._chat(chat_id)
            new = {"id": to, "type": "supergroup", "title": old.get("title", "")}
            self._chats[to] = new
            self.migrated[chat_id] = to
            if (chat_id, BOT_ID) in self._members:
                self._members[(to, BOT_ID)] = self._members[(chat_id, BOT_ID)]
            moved = {"message_id": self._take_message_id(), "date": int(time.time()),
                     "chat": old, "from": sender, "migrate_to_chat_id": to}
            started = {"message_id": self._take_message_id(), "date": int(time.time()),
                       "chat": new, "from": sender, "migrate_from_chat_id": chat_id}
        if updates:
            self.push_update({"message": moved})
            self.push_update({"message": started})

    def age(self, chat_id: int, message_id: int, *, hours: float = 49) -> None:
        """Make a message ``hours`` old (past 48, Telegram no longer lets it be edited or
        deleted)."""
        with self._cond:
            message = self.messages[(chat_id, message_id)]["message"]
            message["date"] = int(time.time() - hours * 3600)

    def repeat_update(self, update_id: int) -> None:
        """Deliver an update again with the same update_id, as Telegram may re-deliver.

        The copy goes out in the next getUpdates answer even if its offset already confirmed
        that update_id; the call after that forgets it again.
        """
        with self._cond:
            self._queue.append(self._history[update_id])
            self._redeliver.add(update_id)
            self._cond.notify_all()

    def fail(
        self,
        method: str,
        *,
        status: int = 429,
        retry_after: int | None = 1,
        times: int = 1,
        chat_id: int | None = None,
        description: str | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` (for ``chat_id`` if given) with an
        error; 429 says "Too Many Requests: retry after N" unless told otherwise."""
        if description is None:
            if status == 429:
                description = "Too Many Requests" + (
                    f": retry after {retry_after}" if retry_after is not None else ""
                )
            elif status == 403:
                description = "Forbidden: bot was blocked by the user"
            else:
                description = HTTPStatus(status).phrase
        with self._cond:
            self._failures.append(
                {
                    "method": method.lower(),
                    "chat_id": chat_id,
                    "times": times,
                    "error": ApiError(status, description, retry_after),
                }
            )

    def sent_to(self, chat_id: int) -> list[dict]:
        with self._cond:
            return [message for message in self.sent if message["chat_id"] == chat_id]

    def wait_sent(self, chat_id: int, count: int, timeout: float = 10.0) -> list[dict]:
        """Block until ``count`` messages were sent to the chat; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.sent_to(chat_id)) >= count, timeout):
                texts = [message["text"] for message in self.sent_to(chat_id)]
                raise AssertionError(
                    f"expected {count} messages to chat {chat_id} within {timeout}s, "
                    f"got {len(texts)}: {texts!r}"
                )
            return self.sent_to(chat_id)

    async def wait_sent_async(self, chat_id: int, count: int, timeout: float = 10.0) -> list[dict]:
        """wait_sent() without blocking the event loop."""
        deadline = time.monotonic() + timeout
        # The messages come from other threads, so there is no asyncio event to await.
        while len(self.sent_to(chat_id)) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self.wait_sent(chat_id, count, timeout=0)

    def media_to(self, chat_id: int) -> list[dict]:
        with self._cond:
            return [sent for sent in self.media if sent["chat_id"] == chat_id]

    async def wait_media_async(self, chat_id: int, count: int,
                               timeout: float = 10.0) -> list[dict]:
        """Wait (without blocking the loop) until ``count`` photos or documents were sent
        to the chat; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.media_to(chat_id)) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        media = self.media_to(chat_id)
        if len(media) < count:
            names = [(sent["method"], sent["filename"]) for sent in media]
            raise AssertionError(f"expected {count} files sent to chat {chat_id} within "
                                 f"{timeout}s, got {len(media)}: {names!r}")
        return media

    def pending_updates(self) -> list[dict]:
        """The queued updates no offset has confirmed yet, oldest first."""
        with self._cond:
            return sorted(self._queue, key=lambda update: update["update_id"])

    # --- the Bot API -----------------------------------------------------------------------

    def handle(
        self, token: str, method: str, params: dict, generation: int
    ) -> tuple[int, dict | None]:
        """Answer one request: (HTTP status, JSON body), or no body at all when the server
        it came to has been stopped meanwhile (say, during a long poll)."""
        name = self._method_names.get(method.lower(), method)
        with self._cond:
            if generation != self._generation:
                return 0, None
            self.calls.append((name, params))
            try:
                if token != self.token:
                    raise ApiError(401, "Unauthorized")
                if name not in self._methods:
                    raise ApiError(404, "Not Found")
                self._injected_failure(name, params)
                self._refuse_migrated(params)
                result = self._methods[name](params)
            except ApiError as error:
                return error.status, error.payload()
            except (TypeError, ValueError) as error:
                return 400, bad_request(f"invalid parameters: {error}").payload()
            if generation != self._generation:
                return 0, None
        return 200, {"ok": True, "result": result}

    def _injected_failure(self, method: str, params: dict) -> None:
        for failure in self._failures:
            if failure["method"] != method.lower():
                continue
            if failure["chat_id"] is not None:
                try:
                    if as_chat_id(params.get("chat_id")) != failure["chat_id"]:
                        continue
                except ApiError:
                    continue
            failure["times"] -= 1
            if failure["times"] <= 0:
                self._failures.remove(failure)
            raise failure["error"]

    def _bot_status(self, chat_id: int) -> str:
        return self._members.get((chat_id, BOT_ID), "member")

    def _privacy_withholds(self, update: dict) -> bool:
        """Privacy mode: a group's message (or its edit) reaches a bot that is no admin
        there only if it is a command, and not one for another bot, a reply to the bot's
        message, or a service message. A reaction reaches only an admin bot."""
        if "message_reaction" in update:
            chat = update["message_reaction"]["chat"]
            return chat.get("type") in GROUP_TYPES and not self._admin(chat["id"])
        message = update.get("message") or update.get("edited_message")
        if not isinstance(message, dict) or not self.group_privacy:
            return False
        chat = message.get("chat") or {}
        if chat.get("type") not in GROUP_TYPES or self._admin(chat.get("id")):
            return False
        answered = message.get("reply_to_message") or {}
        if (answered.get("from") or {}).get("id") == BOT_ID or SERVICE_KEYS & message.keys():
            return False
        text = message.get("text")
        if not isinstance(text, str) or not text.startswith("/"):
            return True
        addressee = text.split(maxsplit=1)[0].partition("@")[2]
        return bool(addressee) and addressee.lower() != self.me["username"].lower()

    def _admin(self, chat_id: Any) -> bool:
        return self._bot_status(chat_id) in ("administrator", "creator")

    def _chat(self, chat_id: int) -> dict:
        return dict(self._chats.get(chat_id) or {"id": chat_id, "type": "private"})

    def _keep(self, message: dict, text: str, parse_mode: str | None = None, *,
              media: bool = False) -> dict:
        """Remember a message of a chat as Telegram sends it (``media``: a photo or document,
        its caption as ``text``); return it."""
        key = (message["chat"]["id"], message["message_id"])
        self.messages[key] = {"message": message, "source": (text, parse_mode), "media": media}
        return dict(message)

    def _answered(self, chat_id: int, message_id: int) -> dict:
        """A message as a reply carries it (``reply_to_message``: without its own)."""
        stored = self.messages.get((chat_id, message_id))
        if stored is None:
            raise bad_request("message to be replied not found")
        return {k: v for k, v in stored["message"].items() if k != "reply_to_message"}

    def _message_of(self, params: dict, missing: str) -> tuple[tuple[int, int], dict]:
        """The chat's message a call names, or ``missing``: ``Bad Request: message to
        <missing> not found``."""
        if params.get("chat_id") in (None, ""):
            raise bad_request("chat_id is empty")
        chat_id = as_chat_id(params["chat_id"])
        message_id = params.get("message_id")
        key = (chat_id, message_id)
        if not isinstance(message_id, int) or key not in self.messages:
            raise bad_request(f"message to {missing} not found")
        return key, self.messages[key]

    def _refuse_migrated(self, params: dict) -> None:
        """A call to a group that became a supergroup is refused, naming the supergroup."""
        try:
            chat_id = as_chat_id(params.get("chat_id"))
        except ApiError:
            return
        if chat_id in self.migrated:
            raise ApiError(400, "Bad Request: group chat was upgraded to a supergroup chat",
                           migrate_to_chat_id=self.migrated[chat_id])

    def _take_message_id(self) -> int:
        message_id = self._next_message_id
        self._next_message_id += 1
        return message_id

    def _get_me(self, params: dict) -> dict:
        return dict(self.me)

    def _get_updates(self, params: dict) -> list[dict]:
        if self.webhook is not None:
            raise ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = int(params.get("offset") or 0)
        limit = min(max(int(params.get("limit") or 100), 1), 100)
        timeout = max(float(params.get("timeout") or 0), 0.0)
        if params.get("allowed_updates") is not None:
            self.allowed_updates = list(params["allowed_updates"]) or None
        self._confirm(offset)
        generation = self._generation
        deadline = time.monotonic() + timeout
        while not self._queue and self._generation == generation:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._cond.wait(remaining)
            self._forget_unwanted()
        delivered = sorted(self._queue, key=lambda update: update["update_id"])[:limit]
        self._redeliver.difference_update(update["update_id"] for update in delivered)
        self.served.update(update["update_id"] for update in delivered)
        return delivered

    def _confirm(self, offset: int) -> None:
        """Forget the updates an offset confirms, and those of types not allowed."""
        if offset < 0:  # keep only the last -offset updates
            self._queue.sort(key=lambda update: update["update_id"])
            del self._queue[:offset]
        elif offset:
            self._queue = [
                update
                for update in self._queue
                if update["update_id"] >= offset or update["update_id"] in self._redeliver
            ]
        self._forget_unwanted()

    def _forget_unwanted(self) -> None:
        """Telegram does not keep updates of the types allowed_updates leaves out (by
        default: chat_member and the reactions)."""
        if self.allowed_updates:
            self._queue = [u for u in self._queue if update_type(u) in self.allowed_updates]
        else:
            self._queue = [u for u in self._queue if update_type(u) not in NOT_BY_DEFAULT]

    def _send_message(self, params: dict) -> dict:
        if params.get("chat_id") in (None, ""):
            raise bad_request("chat_id is empty")
        chat_id = as_chat_id(params["chat_id"])
        text = params.get("text")
        parse_mode = params.get("parse_mode")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("message text is empty")
        shown = visible_text(text, parse_mode).strip()
        if not shown:
            raise bad_request("message text is empty")
        if utf16_len(shown) > MAX_TEXT_LENGTH:
            raise bad_request("message is too long")
        answered = self._reply_of(chat_id, params.get("reply_parameters"))
        message_id = self._take_message_id()
        self.sent.append(
            {
                **params,
                "chat_id": chat_id,
                "text": text,
                "parse_mode": parse_mode,
                "at": time.monotonic(),
                "message_id": message_id,
                "visible_text": shown,
                **({"reply_to_message": answered} if answered is not None else {}),
            }
        )
        self._cond.notify_all()
        message: dict[str, Any] = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": {k: self.me[k] for k in ("id", "is_bot", "first_name", "username")},
            "text": shown,
        }
        if answered is not None:
            message["reply_to_message"] = answered
        return self._keep(message, text, parse_mode)

    def _reply_of(self, chat_id: int | str, parameters: Any) -> dict | None:
        """The message ``reply_parameters`` answers; None when there are none, or when it is
        gone and ``allow_sending_without_reply`` says to send the message anyway."""
        if parameters is None:
            return None
        if not isinstance(parameters, dict) or not isinstance(parameters.get("message_id"), int):
            raise bad_request("can't parse reply parameters JSON object")
        target = as_chat_id(parameters.get("chat_id", chat_id))
        if (target, parameters["message_id"]) in self.messages:
            return self._answered(target, parameters["message_id"])  # type: ignore[arg-type]
        if parameters.get("allow_sending_without_reply"):
            return None
        raise bad_request("message to be replied not found")

    def _edit_message_text(self, params: dict) -> dict:
        key, stored = self._message_of(params, "edit")
        text, parse_mode = params.get("text"), params.get("parse_mode")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("message text is empty")
        message = stored["message"]
        if stored.get("media"):
            raise bad_request("there is no text in the message to edit")
        if message["from"]["id"] != BOT_ID or time.time() - message["date"] > CHANGE_WINDOW:
            raise bad_request("message can't be edited")
        shown = visible_text(text, parse_mode).strip()
        if utf16_len(shown) > MAX_TEXT_LENGTH:
            raise bad_request("message is too long")
        if stored["source"] == (text, parse_mode):
            raise bad_request(NOT_MODIFIED)
        edited = {**message, "text": shown, "edit_date": int(time.time())}
        self.edited.append({**params, "chat_id": key[0], "visible_text": shown,
                            "at": time.monotonic()})
        self._cond.notify_all()
        return self._keep(edited, text, parse_mode)

    def _edit_message_caption(self, params: dict) -> dict:
        key, stored = self._message_of(params, "edit")
        message = stored["message"]
        caption, parse_mode = params.get("caption") or "", params.get("parse_mode")
        if not stored.get("media"):
            raise bad_request("there is no caption in the message to edit")
        if message["from"]["id"] != BOT_ID or time.time() - message["date"] > CHANGE_WINDOW:
            raise bad_request("message can't be edited")
        shown = visible_text(caption, parse_mode).strip()
        if utf16_len(shown) > MAX_CAPTION_LENGTH:
            raise bad_request("message caption is too long")
        if stored["source"] == (caption, parse_mode):
            raise bad_request(NOT_MODIFIED)
        edited = {**message, "caption": shown, "edit_date": int(time.time())}
        self.caption_edits.append({**params, "chat_id": key[0], "visible_caption": shown,
                                   "at": time.monotonic()})
        self._cond.notify_all()
        return self._keep(edited, caption, parse_mode, media=True)

    def _get_file(self, params: dict) -> dict:
        found = self.files.get(params.get("file_id"))  # type: ignore[arg-type]
        if found is None:
            raise bad_request("invalid file_id")
        if found["file_size"] is not None and found["file_size"] > DOWNLOAD_LIMIT:
            raise bad_request("file is too big")
        return {**self._file_ref(found), "file_path": found["file_path"]}

    def _send_file(self, method: str, params: dict) -> dict:
        """sendPhoto, sendDocument: one file, uploaded or by file_id, with a caption."""
        kind = FILE_FIELDS[method]
        chat_id = self._chat_id_of(params)
        upload = self._upload(kind, params.get(kind), params)
        self._upload_limit([upload])
        caption, parse_mode, shown = self._caption(params.get("caption"),
                                                   params.get("parse_mode"))
        answered = self._reply_of(chat_id, params.get("reply_parameters"))
        return self._media_message(method, chat_id, kind, upload, caption, parse_mode, shown,
                                   answered, None)

    def _send_media_group(self, params: dict) -> list[dict]:
        chat_id = self._chat_id_of(params)
        items = params.get("media")
        if not isinstance(items, list) or len(items) not in ALBUM_SIZES:
            raise bad_request("wrong number of media in the media group (2 to 10)")
        kinds = {item.get("type") for item in items if isinstance(item, dict)}
        if len(kinds) != 1 or not kinds <= {"photo", "document"}:
            raise bad_request("can't mix media types in a media group")
        (kind,) = kinds
        uploads = []
        for item in items:
            source = item.get("media")
            if isinstance(source, str) and source.startswith("attach://"):
                source = params.get(source.removeprefix("attach://"))
                if not isinstance(source, dict):
                    raise bad_request("wrong HTTP URL specified")  # no such part
            uploads.append(self._upload(kind, source, item))
        self._upload_limit(uploads)
        answered = self._reply_of(chat_id, params.get("reply_parameters"))
        group = f"album-{self._next_message_id}"
        sent = []
        for item, upload in zip(items, uploads, strict=True):
            caption, parse_mode, shown = self._caption(item.get("caption"),
                                                       item.get("parse_mode"))
            sent.append(self._media_message("sendMediaGroup", chat_id, kind, upload, caption,
                                            parse_mode, shown, answered, group))
        return sent

    def _chat_id_of(self, params: dict) -> int | str:
        if params.get("chat_id") in (None, ""):
            raise bad_request("chat_id is empty")
        return as_chat_id(params["chat_id"])

    def _caption(self, caption: Any, parse_mode: Any) -> tuple[str, str | None, str]:
        caption = caption if isinstance(caption, str) else ""
        shown = visible_text(caption, parse_mode).strip()
        if utf16_len(shown) > MAX_CAPTION_LENGTH:
            raise bad_request("message caption is too long")
        return caption, parse_mode, shown

    def _upload(self, kind: str, source: Any, params: dict) -> dict:
        """A file to send: a multipart part ``{"filename", "content"}``, or a file_id."""
        if isinstance(source, str):
            found = self.files.get(source)
            if found is None:
                raise bad_request("wrong file identifier/HTTP URL specified")
            if found["kind"] != kind:
                raise bad_request("type of file mismatch")
            return {"content": found["content"], "filename": found.get("file_name"),
                    "by_file_id": source}
        if not isinstance(source, dict) or not isinstance(source.get("content"), bytes):
            raise bad_request(f"there is no {kind} in the request")
        upload = {"content": source["content"], "filename": source.get("filename"),
                  "by_file_id": None}
        if kind == "photo":
            if len(source["content"]) > PHOTO_LIMIT:
                raise bad_request("PHOTO_SAVE_FILE_INVALID")  # approximate wording
            size = image_size(source["content"])
            if size is None:
                raise bad_request("IMAGE_PROCESS_FAILED")
            width, height = size
            if width + height > 10_000 or max(size) > 20 * min(size):
                raise bad_request("PHOTO_INVALID_DIMENSIONS")
        return upload

    def _upload_limit(self, uploads: list[dict]) -> None:
        if sum(len(u["content"]) for u in uploads if u["by_file_id"] is None) > UPLOAD_LIMIT:
            raise ApiError(413, "Request Entity Too Large")

    def _media_message(self, method: str, chat_id: int | str, kind: str, upload: dict,
                       caption: str, parse_mode: str | None, shown: str,
                       answered: dict | None, group: str | None) -> dict:
        """Keep a photo or document the bot sent, recorded in ``media``; the message."""
        content = upload["content"]
        message_id = self._take_message_id()
        name = upload["filename"] or ("photo.jpg" if kind == "photo" else "document")
        found = self.files.get(upload["by_file_id"] or "") or self._file_register(
            kind, content, len(content), file_name=name)
        message: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()), "chat": self._chat(chat_id),
            "from": {k: self.me[k] for k in ("id", "is_bot", "first_name", "username")},
        }
        if kind == "photo":
            width, height = image_size(content) or (1, 1)
            message["photo"] = [{**self._file_ref(found), "width": width, "height": height}]
        else:
            message["document"] = {**self._file_ref(found), "file_name": found["file_name"],
                                   "mime_type": mimetypes.guess_type(name)[0]
                                   or "application/octet-stream"}
        if shown:
            message["caption"] = shown
        if group is not None:
            message["media_group_id"] = group
        if answered is not None:
            message["reply_to_message"] = answered
        self.media.append({"method": method, "chat_id": chat_id, "message_id": message_id,
                           "kind": kind, "filename": upload["filename"], "content": content,
                           "by_file_id": upload["by_file_id"], "caption": caption,
                           "parse_mode": parse_mode, "visible_caption": shown,
                           "media_group_id": group, "at": time.monotonic(),
                           **({"reply_to_message": answered} if answered else {})})
        self._cond.notify_all()
        return self._keep(message, caption, parse_mode, media=True)

    def _file_register(self, kind: str, content: bytes | None, size: int | None, *,
                       file_name: str | None = None, file_path_kind: str | None = None) -> dict:
        """A file Telegram keeps (a user's, or one the bot sent), under a new file_id."""
        number = len(self.files) + 1
        folder = file_path_kind or f"{kind}s"
        extension = file_name.rpartition(".")[2] if file_name and "." in file_name else "bin"
        found = {"file_id": f"AgAC-{kind}-{number}-x", "file_unique_id": f"uniq{number}",
                 "file_size": size, "content": content, "kind": kind, "file_name": file_name,
                 "file_path": f"{folder}/file_{number}.{extension}"}
        self.files[found["file_id"]] = found
        return found

    @staticmethod
    def _file_ref(found: dict) -> dict:
        ref = {"file_id": found["file_id"], "file_unique_id": found["file_unique_id"]}
        if found["file_size"] is not None:
            ref["file_size"] = found["file_size"]
        return ref

    def serve_file(self, token: str, path: str, generation: int) -> tuple[int, bytes | None]:
        """``GET /file/bot<token>/<file_path>``: the file's bytes (404 unless known)."""
        with self._cond:
            if generation != self._generation:
                return 0, None
            self.calls.append(("GET /file", {"file_path": path}))
            found = next((f for f in self.files.values() if f["file_path"] == path), None)
            if token != self.token or found is None or found["content"] is None:
                return 404, None
            self.downloads.append(path)
            return 200, found["content"]

    def _delete_message(self, params: dict) -> bool:
        key, stored = self._message_of(params, "delete")
        message = stored["message"]
        chat = message["chat"]
        own = message["from"]["id"] == BOT_ID
        allowed = own or chat["type"] == "private" or self._admin(chat["id"])
        if not allowed or time.time() - message["date"] > CHANGE_WINDOW:
            raise bad_request("message can't be deleted")
        del self.messages[key]
        self.bot_reactions.pop(key, None)
        self.deleted.append({"chat_id": key[0], "message_id": key[1], "own": own,
                             "at": time.monotonic()})
        self._cond.notify_all()
        return True

    def _set_message_reaction(self, params: dict) -> bool:
        reaction = params.get("reaction") or []
        if not isinstance(reaction, list):
            raise bad_request("expected an Array of ReactionType")
        emoji = []
        for kind in reaction:
            if not isinstance(kind, dict) or kind.get("type") not in ("emoji", "custom_emoji"):
                raise bad_request("can't parse ReactionType: invalid reaction type specified")
            if kind["type"] == "custom_emoji":
                raise bad_request("REACTION_INVALID")
            emoji.append(kind.get("emoji"))
        key, _ = self._message_of(params, "react")
        if any(e not in REACTION_EMOJI for e in emoji):
            raise bad_request("REACTION_INVALID")
        if len(emoji) > 1:
            raise bad_request("REACTIONS_TOO_MANY")
        self.bot_reactions[key] = emoji
        self.reacted.append({"chat_id": key[0], "message_id": key[1], "emoji": emoji,
                             "at": time.monotonic()})
        self._cond.notify_all()
        return True

    def _get_chat_member(self, params: dict) -> dict:
        chat_id = as_chat_id(params.get("chat_id"))
        try:
            user_id = int(params["user_id"])
        except (KeyError, TypeError, ValueError):
            raise bad_request("user_id is invalid") from None
        if chat_id not in self._chats:
            raise bad_request("chat not found")
        status = self._members.get((chat_id, user_id), "member")
        if user_id == BOT_ID:
            user = {k: self.me[k] for k in ("id", "is_bot", "first_name", "username")}
        else:
            user = {"id": user_id, "is_bot": False, "first_name": f"User {user_id}"}
        return {"status": status, "user": user, **MEMBER_FIELDS[status]}

    def _set_webhook(self, params: dict) -> bool:
        if "url" not in params:
            raise bad_request('parameter "url" is required')
        if params.get("drop_pending_updates"):
            self._queue.clear()
        if params.get("allowed_updates") is not None:
            self.allowed_updates = list(params["allowed_updates"]) or None
        self.webhook = dict(params) if params["url"] else None
        return True

    def _delete_webhook(self, params: dict) -> bool:
        if params.get("drop_pending_updates"):
            self._queue.clear()
        self.webhook = None
        return True

    def _get_webhook_info(self, params: dict) -> dict:
        info: dict[str, Any] = {
            "url": self.webhook["url"] if self.webhook else "",
            "has_custom_certificate": bool(self.webhook and "certificate" in self.webhook),
            "pending_update_count": len(self._queue),
        }
        if self.webhook and "max_connections" in self.webhook:
            info["max_connections"] = self.webhook["max_connections"]
        if self.webhook and self.allowed_updates:
            info["allowed_updates"] = self.allowed_updates
        return info


_PATH = re.compile(r"^/bot(?P<token>[^/]*)/(?P<method>[A-Za-z0-9_]+)/?$")
_FILE_PATH = re.compile(r"^/file/bot(?P<token>[^/]*)/(?P<path>.+)$")


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    standin: BotApiStandIn
    generation: int


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        match = _PATH.match(url.path)
        try:
            params = parse_params(self, url.query)
        except ApiError as error:
            self._answer(error.status, error.payload())
            return
        except ValueError:
            self._answer(400, bad_request("can't parse the request").payload())
            return
        if match is None:
            self._answer(404, ApiError(404, "Not Found").payload())
            return
        server = self.server
        status, body = server.standin.handle(
            match["token"], match["method"], params, server.generation
        )
        if body is None:
            self.close_connection = True
            return
        self._answer(status, body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        match = _FILE_PATH.match(url.path)
        if match is None:
            self.do_POST()
            return
        server = self.server
        # python-telegram-bot quotes the path, the token's ":" too.
        status, content = server.standin.serve_file(unquote(match["token"]),
                                                    unquote(match["path"]), server.generation)
        if status == 0:
            self.close_connection = True
            return
        if content is None:
            self._answer(status, ApiError(404, "Not Found").payload())
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
        except ConnectionError:
            pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:
            pass  # the client gave up (a timed-out request)

    def log_message(self, format: str, *args: Any) -> None:
        pass
