"""A local stand-in for Telegram's Bot API, served over real HTTP for python-telegram-bot.

Point a real ``telegram.Bot(token, base_url=f"{standin.url}/bot")`` at it. It keeps the
update queue (long polling with offsets), the webhook setting and every message sent, and
can answer the next calls of a method with an error (flood control, outages) or stop
listening altogether, as https://core.telegram.org/bots/api describes the real one.

Privacy mode (https://core.telegram.org/bots/features#privacy-mode) is on by default, as for
a new bot: in a group where the bot is not an administrator, only commands reach it (not
addressed to another bot); other messages are withheld, never queued. (Telegram also passes
replies to the bot's messages and service messages; not modelled.)
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import html
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.servers import free_port

BOT_ID = 4242
MAX_TEXT_LENGTH = 4096  # in UTF-16 code units, after entity parsing, as Telegram counts
FIRST_UPDATE_ID = 1000
GROUP_USER_ID = 1001  # the sender of text_update() in a group when no user_id is given

# Form values that are strings even when they look like JSON ("123", "true", "[1]").
STRING_PARAMS = frozenset(
    "text caption parse_mode url secret_token ip_address title description short_description"
    " name business_connection_id".split()
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

    def __init__(self, status: int, description: str, retry_after: int | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after

    def payload(self) -> dict:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.status,
            "description": self.description,
        }
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
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
    ) -> dict:
        """Push a "message" update with this text from a user in a chat; return it."""
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
        with self._cond:
            message_id = self._take_message_id()
        message: dict[str, Any] = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": sender,
            "text": text,
        }
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            message["entities"] = [
                {"type": "bot_command", "offset": 0, "length": utf16_len(command)}
            ]
        update: dict[str, Any] = {"message": message}
        if update_id is not None:
            update = {"update_id": update_id, **update}
        return self.push_update(update)

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
        """Privacy mode: a group's message reaches a bot that is no admin there only if it
        is a command, and not one for another bot."""
        message = update.get("message")
        if not isinstance(message, dict) or not self.group_privacy:
            return False
        chat = message.get("chat") or {}
        if chat.get("type") not in GROUP_TYPES:
            return False
        if self._bot_status(chat.get("id")) in ("administrator", "creator"):
            return False
        text = message.get("text")
        if not isinstance(text, str) or not text.startswith("/"):
            return True
        addressee = text.split(maxsplit=1)[0].partition("@")[2]
        return bool(addressee) and addressee.lower() != self.me["username"].lower()

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
        """Telegram does not keep updates of the types allowed_updates leaves out."""
        if self.allowed_updates:
            self._queue = [u for u in self._queue if update_type(u) in self.allowed_updates]

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
            }
        )
        self._cond.notify_all()
        chat = self._chats.get(chat_id) or {"id": chat_id, "type": "private"}
        return {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": dict(self.me),
            "text": shown,
        }

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

    do_GET = do_POST

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
