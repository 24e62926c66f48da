"""Files through Telegram (issue 15).

- Fast: which files go as photos, albums, documents or links, where the text goes within
  Telegram's caption limit, which calls an edit makes (protocols/telegram/media.py); files
  read from updates (updates.py); how sizes and links are shown (bots/formatting.py).
- In-process: the relay's Telegram role and the real python-telegram-bot against the Bot
  API stand-in over HTTP (tests/botapi.py), with limits lowered where a test needs it.
- End to end (slow): ``gateway run`` with the bot pointed at the stand-in; photos,
  documents and voice notes sent in a chat become room messages whose files the gateway
  serves itself (the bot token nowhere), files too large or refused, and room messages with
  files posted over the HTTP API reaching the chat as photos, albums, documents or links,
  and edits of them as caption edits.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from telegram import Update
from telegram.error import NetworkError

from bots import formatting
from bots.markup import Reply, line
from gateway import chats, events, files, services
from gateway.models import BotMessage, RelayCursor
from gateway.relay import Relay
from protocols.telegram import media, render
from protocols.telegram.calls import (
    DOCUMENT,
    PHOTO,
    Delete,
    EditCaption,
    EditText,
)
from protocols.telegram.consumers import TelegramChatConsumer
from protocols.telegram.download import FileUnavailable
from protocols.telegram.events import DOWNLOAD_EXTENSION
from protocols.telegram.outbox import SendLimits
from protocols.telegram.relay import TelegramChats
from protocols.telegram.server import TelegramServer, telegram_bot
from protocols.telegram.updates import received
from tests.botapi import BotApiStandIn, visible_text
from tests.helpers import ALICE, BEN, TOKEN, say, tg_env, wait_until
from tests.samples import jpeg, pdf, png

PLATFORM = "telegram"
MB = 1024 * 1024
WEB = events.sender(protocol="web", id="anon:bob", name="bob")
FAST = SendLimits(chat_per_second=1000.0, group_per_minute=60_000.0, overall_per_second=1000.0)


def ogg(size: int = 2000) -> bytes:
    return b"OggS\x00\x02" + b"\x00" * 22 + b"OpusHead" + b"\x01" * (size - 36)


def zipped() -> bytes:
    return b"PK\x03\x04" + b"\x14\x00" * 200


def attachment(name: str = "a.png", type: str = "image/png", size: int = 1000,
               width: int | None = 640, height: int | None = 480) -> events.Attachment:
    return events.attachment(id=name, name=name, type=type, size=size, width=width,
                             height=height, thumbnail=width is not None)


# --- which calls carry a message's files (fast) ---------------------------------------------


def test_one_image_is_a_photo_several_an_album_others_documents_and_huge_ones_links():
    photo, doc = attachment("a.png"), attachment("b.pdf", "application/pdf", width=None,
                                                 height=None)
    huge = attachment("c.mp4", "video/mp4", size=60 * MB, width=None, height=None)
    assert media.layout([photo]) == media.Layout((media.Group(PHOTO, (photo,)),), ())
    two = [attachment("1.png"), attachment("2.jpg", "image/jpeg")]
    assert media.layout(two).groups == (media.Group(PHOTO, tuple(two)),)
    # Documents after the photos, each alone; too large to upload: a link.
    plan = media.layout([doc, huge, photo])
    assert plan.groups == (media.Group(PHOTO, (photo,)), media.Group(DOCUMENT, (doc,)))
    assert plan.linked == (huge,) and plan.media_messages == 2
    eleven = [attachment(f"{i}.png") for i in range(11)]
    groups = media.layout(eleven).groups
    assert [len(group.files) for group in groups] == [10, 1]
    assert media.layout(eleven).media_messages == 11


@pytest.mark.parametrize(("item", "kind"), [
    (attachment(size=10 * MB), PHOTO),
    (attachment(size=10 * MB + 1), DOCUMENT),  # too heavy for a photo
    (attachment(width=9000, height=1001), DOCUMENT),  # 10,000 pixels together at most
    (attachment(width=2100, height=100), DOCUMENT),  # sides at most 20 to 1
    (attachment(width=2000, height=100), PHOTO),
    (attachment("a.gif", "image/gif"), DOCUMENT),  # Telegram animates a GIF document
    (attachment("a.bmp", "image/bmp"), DOCUMENT),
    (attachment(width=None, height=None), DOCUMENT),
    (attachment("a.pdf", "application/pdf", size=50 * MB, width=None), DOCUMENT),
    (attachment("a.pdf", "application/pdf", size=50 * MB + 1, width=None), None),
])
def test_what_each_file_goes_as(item, kind):
    assert media.file_kind(item) == kind


def link(item: events.Attachment):
    return formatting.file_link(item["name"], item["size"], f"https://gw.example/f/{item['id']}")


def test_the_text_is_the_first_files_caption_and_a_long_one_goes_on_in_text_messages():
    message = Reply((line("ann (web): ", "x " * 1500),))
    shown = media.rendered([attachment()], message, link)
    assert render.visible_length(visible_text(shown.caption, "HTML")) <= render.CAPTION_LIMIT
    assert len(shown.texts) == 1
    whole = visible_text(shown.caption, "HTML") + visible_text(shown.texts[0], "HTML")
    assert whole == message.plain()  # nothing lost, nothing doubled
    short = media.rendered([attachment()], Reply((line("ann (web): look"),)), link)
    assert (short.caption, short.texts) == ("ann (web): look", ())


def test_a_file_too_large_is_a_line_with_its_link_and_only_links_make_a_text_message():
    huge = attachment("film.mp4", "video/mp4", size=60 * MB, width=None, height=None)
    message = Reply((line("ann (web): the film"),))
    with_photo = media.rendered([attachment(), huge], message, link)
    assert with_photo.caption == ("ann (web): the film\n📎 film.mp4 (60.0 MB) is too large to "
                                  "send here: https://gw.example/f/film.mp4")
    only = media.rendered([huge], message, link)
    assert only.caption == "" and only.texts == (with_photo.caption,)
    assert only.layout.media_messages == 0


def test_an_edit_gives_the_caption_to_the_first_media_message_and_the_rest_to_texts():
    album = [attachment("1.png"), attachment("2.png")]
    long = media.rendered(album, Reply((line("x" * 1500),)), link)
    # The chat has the album (two messages) and one text message.
    assert media.edits(long, [10, 11, 12]) == [EditCaption(10, long.caption),
                                               EditText(12, long.texts[0])]
    short = media.rendered(album, Reply((line("y"),)), link)
    assert media.edits(short, [10, 11, 12]) == [EditCaption(10, "y"), Delete(12)]
    # Sent half-way (Telegram refused the rest): what it has is edited.
    assert media.edits(long, [10]) == [EditCaption(10, long.caption)]
    links = media.rendered([attachment(size=60 * MB)], Reply((line("z"),)), link)
    assert media.edits(links, [20]) == [EditText(20, links.texts[0])]


def test_a_caption_split_cuts_a_long_first_line_and_keeps_whole_lines_together():
    lines = Reply((line("a" * 10), line("b" * 10), line("c" * 30)))
    assert render.caption_split(lines, caption_limit=25) == ("a" * 10 + "\n" + "b" * 10,
                                                            ["c" * 30])
    head, rest = render.caption_split(Reply((line("word " * 10),)), caption_limit=12)
    assert head == "word word " and "".join(rest) == "word " * 8
    assert render.caption_split(Reply((line("<b>"),)), caption_limit=12) == ("&lt;b&gt;", [])


@pytest.mark.parametrize(("size", "shown"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KB"),
                                             (1536, "1.5 KB"), (25 * MB, "25.0 MB"),
                                             (3 * 1024 * MB, "3.0 GB")])
def test_sizes_are_shown_in_units_of_1024(size, shown):
    assert formatting.file_size(size) == shown


def test_history_names_a_messages_files():
    event = events.room_message(id=3, room="r", text="look", sender=WEB, ts=0.0, origin="t",
                                attachments=[attachment("door.png")])
    assert formatting.history_line(event)[-1].text == "look 📎 door.png"


# --- files read from updates (fast) ---------------------------------------------------------


def message_update(api: BotApiStandIn, kind: str, content: bytes = b"x", **kwargs) -> Update:
    pushed = api.file_update(ALICE, kind, content, **kwargs)
    return Update.de_json(json.loads(json.dumps(pushed)), None)


def test_updates_carry_the_largest_photo_documents_voice_notes_and_stickers():
    api = BotApiStandIn(TOKEN)  # not listening: only its update builders
    found = received(message_update(api, "photo", jpeg(), caption="the garden"))
    assert found is not None and found.text == "the garden"
    assert found.file is not None and found.file["kind"] == "photo"
    assert api.files[found.file["file_id"]]["content"] == jpeg()  # the largest size
    assert found.file["name"] == "photo" and found.file["size"] == len(jpeg())
    doc = received(message_update(api, "document", pdf(), file_name="report.pdf",
                                  mime_type="application/pdf"))
    assert doc is not None and doc.file is not None and doc.text == ""
    assert (doc.file["kind"], doc.file["name"], doc.file["mime_type"]) == (
        "document", "report.pdf", "application/pdf")
    voice = received(message_update(api, "voice", ogg(), file_size=99))
    assert voice is not None and voice.file is not None
    assert (voice.file["kind"], voice.file["name"], voice.file["size"]) == ("voice", "voice", 99)
    gif = received(message_update(api, "animation", b"gif", file_name="cat.mp4"))
    assert gif is not None and gif.file is not None and gif.file["kind"] == "animation"
    # An animated sticker (Telegram's own vector format) is its emoji.
    sticker = received(message_update(api, "sticker", b"tgs", is_animated=True, emoji="🐱"))
    assert sticker is not None and sticker.file is None and sticker.text == "🐱"
    still = received(message_update(api, "sticker", b"webp"))
    assert still is not None and still.file is not None and still.file["kind"] == "sticker"


# --- the consumer fetching a chat's file (in-process, a stand-in for the server's fetch) -------


class Fetches:
    """The scope's ``telegram.download``: answers with ``content``, or raises what ``fail``
    holds (once each); records what was asked."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.fail: list[Exception] = []
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, file_id: str, limit: int) -> bytes:
        self.asked.append((file_id, limit))
        if self.fail:
            raise self.fail.pop(0)
        return self.content


async def chat_scope(fetch: Fetches) -> ApplicationCommunicator:
    comm = ApplicationCommunicator(TelegramChatConsumer.as_asgi(), {
        "type": "telegram", "role": "chat",
        "chat": {"id": "100", "kind": "private", "title": "Alice"},
        "user": {"id": "7", "username": "alice", "name": "Alice"},
        "bot_username": "gateway_bot", "extensions": {DOWNLOAD_EXTENSION: fetch}})
    await comm.send_input({"type": "chat.connect"})
    return comm


def chat_update(update_id: int, text: str, file: dict | None = None) -> dict:
    return {"type": "chat.received_message", "update_id": update_id, "kind": "message",
            "message_id": 500 + update_id, "text": text, "reply_to_message_id": None,
            "added": [], "removed": [], "migrate_to": None,
            "user": {"id": "7", "username": "alice", "name": "Alice"}, "reads_all": True,
            "file": file}


def chat_file(size: int | None, name: str = "photo") -> dict:
    return {"file_id": "AgAC-secret-id", "kind": "photo", "name": name, "size": size,
            "mime_type": "image/jpeg"}


async def outcome(comm: ApplicationCommunicator, update_id: int) -> tuple[str, list[str]]:
    """How the consumer ended the update (handled, failed) and what it answered."""
    texts = []
    while True:
        out = await comm.receive_output(timeout=5)
        if out["type"] == "chat.send_message":
            texts.append(visible_text(out["text"], "HTML"))
        else:
            assert out["update_id"] == update_id, out
            return out["type"], texts


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_the_consumer_fetches_a_file_only_for_a_chat_in_a_room_and_retries_outages(
        room_events, settings):
    settings.GATEWAY = {**settings.GATEWAY, "FILE_MAX_BYTES": 5 * MB}
    fetch = Fetches(jpeg())
    comm = await chat_scope(fetch)
    await comm.send_input(chat_update(1, "", chat_file(len(jpeg()))))
    (kind, (hint,)) = await outcome(comm, 1)
    assert kind == "chat.handled" and "/join" in hint and fetch.asked == []  # not fetched
    await comm.send_input(chat_update(2, "/join pics"))
    assert (await outcome(comm, 2))[0] == "chat.handled"
    fetch.fail.append(NetworkError("down"))
    await comm.send_input(chat_update(3, "look", chat_file(len(jpeg()))))
    assert await outcome(comm, 3) == ("chat.failed", [])  # not claimed: it comes again
    await comm.send_input(chat_update(3, "look", chat_file(len(jpeg()))))
    assert await outcome(comm, 3) == ("chat.handled", [])
    assert fetch.asked == [("AgAC-secret-id", 20 * MB)] * 2
    (event,) = room_events
    assert event["text"] == "look" and event["attachments"][0]["type"] == "image/jpeg"
    assert "AgAC-secret-id" not in json.dumps(event)
    # Telegram will not hand it out: answered, nothing posted.
    fetch.fail.append(FileUnavailable("Bad Request: invalid file_id"))
    await comm.send_input(chat_update(4, "again", chat_file(None)))
    assert await outcome(comm, 4) == ("chat.handled", [
        "Not sent: the file could not be fetched from the chat app; send it again"])
    # Past the gateway's own limit: refused from its declared size, not fetched.
    await comm.send_input(chat_update(5, "", chat_file(6 * MB, "big.jpg")))
    assert await outcome(comm, 5) == ("chat.handled", [
        "Not sent: 'big.jpg' has 6291456 bytes; the limit is 5242880"])
    # Past the Bot API's: the room is told, nothing fetched.
    await comm.send_input(chat_update(6, "huge", chat_file(21 * MB, "huge.jpg")))
    assert await outcome(comm, 6) == ("chat.handled", [])
    assert room_events[-1]["text"] == "huge\n📎 huge.jpg (21.0 MB) was too large to bridge."
    assert len(fetch.asked) == 3 and len(room_events) == 2
    await comm.send_input({"type": "chat.disconnect"})
    await comm.wait(timeout=5)


# --- the relay's role with the real python-telegram-bot, in-process ---------------------------


@database_sync_to_async
def chats_join(room: str, *chat_ids: int) -> None:
    for chat_id in chat_ids:
        record = chats.bot_chat_open(platform=PLATFORM, chat_id=str(chat_id), kind="private",
                                     title=str(chat_id))
        chats.bot_chat_join(chat=record, room=room)


@database_sync_to_async
def post(room: str, text: str, *parts: tuple[str, bytes]) -> events.RoomMessage:
    kept = files.attachments_store(room=room, sender=WEB, uploads=[
        files.Upload.of_bytes(data, name=name) for name, data in parts])
    event, _ = services.room_message_post(room=room, text=text, sender=WEB, origin="test",
                                          attachments=kept)
    return event


@database_sync_to_async
def copies(chat_id: int, seq: int) -> list[int]:
    return list(BotMessage.objects.filter(chat_id=str(chat_id), seq=seq)
                .order_by("part").values_list("message_id", flat=True))


class Relayed:
    """The Telegram server (its real Bot, against the stand-in) and the relay's role."""

    async def __aenter__(self) -> Relayed:
        self.server = TelegramServer(None, bot=telegram_bot(TOKEN, api_url=self.api.url),
                                     limits=FAST)
        await self.server.bot.initialize()
        self.server.ready.set()
        self.relay = Relay(TelegramChats(self.server, backlog=100), tick=0.05)
        await self.relay.start()
        return self

    def __init__(self, api: BotApiStandIn) -> None:
        self.api = api

    async def __aexit__(self, *exc_info: object) -> None:
        await self.relay.stop()
        await self.server.bot.shutdown()


@pytest.mark.parametrize("public_url", ["https://gw.example", ""])
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_file_over_the_upload_limit_arrives_as_a_link_or_its_name_and_size(
        api, monkeypatch, settings, public_url):
    monkeypatch.setattr(media, "UPLOAD_MAX_BYTES", 2000)
    settings.GATEWAY = {**settings.GATEWAY, "PUBLIC_URL": public_url}
    await chats_join("big", ALICE)
    async with Relayed(api):
        event = await post("big", "the report", ("report.pdf", pdf(3000)))
        (sent,) = await api.wait_sent_async(ALICE, 1)
    assert api.media == []  # nothing uploaded
    (item,) = event["attachments"]
    shown = sent["visible_text"]
    head = "bob (web): the report\n📎 report.pdf (2.9 KB) is too large to send here"
    if public_url:
        assert shown.startswith(f"{head}: https://gw.example/files/{item['id']}/report.pdf?")
        url = shown.rsplit(": ", 1)[1]
        files.signature_check(variant="file", key=item["id"], **{
            k: v for k, v in (p.split("=") for p in url.split("?")[1].split("&"))})
    else:
        assert shown == f"{head}."
    assert await copies(ALICE, event["id"]) == [sent["message_id"]]


@database_sync_to_async
def behind(room: str, chat_id: int) -> None:
    """The chat is placed back at its room's start (as one that fell behind)."""
    RelayCursor.objects.filter(relay=PLATFORM, room=room, target=str(chat_id)).update(
        last_seq=0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_file_telegram_has_goes_to_a_later_chat_by_its_id_not_uploaded_again(api):
    await chats_join("twice", ALICE)
    async with Relayed(api):
        await post("twice", "one", ("a.png", png()))
        (first,) = await api.wait_media_async(ALICE, 1)
        await chats_join("twice", BEN)
        await behind("twice", BEN)  # Ben is sent it after Alice
        (second,) = await api.wait_media_async(BEN, 1)
    assert first["by_file_id"] is None and second["by_file_id"] is not None
    assert first["content"] == second["content"] == png()
    assert second["visible_caption"] == "bob (web): one"


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_photo_telegram_refuses_goes_as_a_document_and_is_recorded_once(api):
    await chats_join("odd", ALICE)
    api.fail("sendPhoto", status=400, retry_after=None, description="Bad Request: "
             "IMAGE_PROCESS_FAILED")
    async with Relayed(api):
        event = await post("odd", "odd one", ("odd.png", png()))
        (sent,) = await api.wait_media_async(ALICE, 1)
    assert (sent["method"], sent["content"], sent["visible_caption"]) == (
        "sendDocument", png(), "bob (web): odd one")
    assert await copies(ALICE, event["id"]) == [sent["message_id"]]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_a_long_text_with_a_photo_is_the_caption_then_a_text_message_and_edits_so(api):
    await chats_join("long", ALICE)
    async with Relayed(api):
        event = await post("long", "word " * 400, ("a.png", png()))
        (photo,) = await api.wait_media_async(ALICE, 1)
        (rest,) = await api.wait_sent_async(ALICE, 1)
        expected = [photo["message_id"], rest["message_id"]]
        for _ in range(100):  # the relay records its copies once the last is sent
            if await copies(ALICE, event["id"]) == expected:
                break
            await asyncio.sleep(0.05)
        assert await copies(ALICE, event["id"]) == expected
        assert len(photo["visible_caption"]) <= 1024
        assert (photo["visible_caption"] + " " + rest["visible_text"]).split() == (
            ("bob (web): " + "word " * 400).split())
        await database_sync_to_async(services.message_edit)(
            room="long", id=event["id"], text="short now", sender=WEB, staff=False,
            origin="test")
        await wait_until(lambda: api.caption_edits and api.deleted, 10, "not edited")
    (edit,) = api.caption_edits
    assert (edit["message_id"], edit["visible_caption"]) == (photo["message_id"],
                                                             "bob (web): short now")
    assert [d["message_id"] for d in api.deleted] == [rest["message_id"]]
    assert not [name for name, _ in api.calls if name == "editMessageText"]


# --- end to end: gateway run, the bot against the stand-in ------------------------------------


def everything_stored(gw) -> str:
    """Every value of every row of the gateway's database, as text."""
    with sqlite3.connect(gw.datadir / "gateway.sqlite3", timeout=10) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE "
                                               "type = 'table'")]
        return "\n".join(repr(row) for table in tables
                         for row in db.execute(f'SELECT * FROM "{table}"'))  # noqa: S608


def fetch(gw, url: str) -> httpx.Response:
    return httpx.get(url if url.startswith("http") else gw.http + url, timeout=10)


async def room_messages(gw, room: str, count: int, timeout: float = 15) -> list[dict]:
    """The room's messages, once it has ``count``."""
    found: list[dict] = []

    def enough() -> bool:
        found[:] = gw.get_json(f"/api/rooms/{room}/messages?after=0")["messages"]
        return len(found) >= count

    await wait_until(enough, timeout, f"room {room} did not get {count} messages")
    return found


async def settled(wait: float = 1.0) -> None:
    """Anything more the gateway was going to do would have been done by now."""
    await asyncio.sleep(wait)


@pytest.mark.slow
async def test_a_photo_becomes_a_room_message_whose_file_the_gateway_serves(
        api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join pics")
    image = jpeg(800, 600)
    pushed = api.file_update(ALICE, "photo", image, caption="the <garden>")
    (message,) = await room_messages(gw, "pics", 1)
    assert (message["message"], message["sender"]["name"]) == ("the <garden>", "Alice")
    (item,) = message["attachments"]
    assert (item["type"], item["name"], item["width"], item["height"], item["size"]) == (
        "image/jpeg", "photo.jpg", 800, 600, len(image))
    served = fetch(gw, item["url"])
    assert served.status_code == 200 and served.content == image
    assert fetch(gw, item["thumbnail_url"]).status_code == 200
    small, large = pushed["message"]["photo"]
    assert api.downloads == [api.files[large["file_id"]]["file_path"]]  # the largest only
    await settled()
    assert len(api.sent_to(ALICE)) == 1  # the /join answer; the photo is not answered
    file_path = api.files[large["file_id"]]["file_path"]
    answer = json.dumps(gw.get_json("/api/rooms/pics/messages?after=0"))
    for secret in (TOKEN, TOKEN.split(":")[1], file_path, "/file/bot"):
        assert secret not in answer
        assert secret not in everything_stored(gw)
        assert secret not in gw.log()


@pytest.mark.slow
async def test_a_document_and_a_voice_note_become_room_messages(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join docs")
    api.file_update(ALICE, "document", pdf(), file_name="minutes.pdf",
                    mime_type="application/pdf", caption="minutes")
    api.file_update(ALICE, "voice", ogg())
    first, second = await room_messages(gw, "docs", 2)
    assert first["message"] == "minutes" and second["message"] == ""
    (doc,), (voice,) = first["attachments"], second["attachments"]
    assert (doc["name"], doc["type"]) == ("minutes.pdf", "application/pdf")
    assert (voice["name"], voice["type"]) == ("voice.ogg", "audio/ogg")
    assert fetch(gw, doc["url"]).content == pdf() and fetch(gw, voice["url"]).content == ogg()
    assert len(api.downloads) == 2


@pytest.mark.slow
async def test_a_file_over_20_mb_is_not_fetched_and_the_room_is_told(api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, BEN, "/join big", user_id=BEN, username="ben", first_name="Ben")
    await say(api, ALICE, "/join big")
    api.file_update(ALICE, "video", b"\x00" * 100, file_name="holiday.mp4",
                    file_size=25 * MB, caption="our holiday")
    (message,) = await room_messages(gw, "big", 1)
    assert message["message"] == "our holiday\n📎 holiday.mp4 (25.0 MB) was too large to bridge."
    assert message["attachments"] == []
    (_, relayed) = await api.wait_sent_async(BEN, 2)
    assert relayed["visible_text"] == f"Alice (telegram): {message['message']}"
    assert api.downloads == [] and not [n for n, _ in api.calls if n == "getFile"]


@pytest.mark.slow
async def test_a_refused_type_is_answered_in_the_chat_and_nothing_is_stored(
        api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    await say(api, ALICE, "/join strict")
    api.file_update(ALICE, "document", zipped(), file_name="archive.zip",
                    mime_type="application/zip", caption="all of it")
    (_, answer) = await api.wait_sent_async(ALICE, 2)
    assert answer["visible_text"] == ("Not sent: 'archive.zip' is application/zip, which this "
                                      "gateway does not take")
    assert "refused a chat message unsupported_type" in gw.log()
    assert gw.get_json("/api/rooms/strict/")["last_id"] == 0
    assert "archive" not in everything_stored(gw).replace("'archive.zip' is", "")
    # Not kept in the storage either.
    assert not [p for p in (gw.datadir / "attachments").rglob("*") if p.is_file()]


def api_key(gw, room: str) -> str:
    out = gw.manage("apikey", "create", "--name", "camera", "--rooms", room, "--scopes",
                    "read,post")
    return out.strip().splitlines()[-1]


def api_post(gw, key: str, room: str, *parts: tuple[str, bytes, str], **fields: str) -> dict:
    answer = httpx.post(f"{gw.http}/api/rooms/{room}/messages", data=fields,
                        files=[("file", part) for part in parts],
                        headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()


@pytest.mark.slow
async def test_files_posted_over_the_api_reach_the_chat_as_photos_albums_and_documents(
        api, gateway_factory):
    gw = gateway_factory(env=tg_env(api)).start()
    key = await asyncio.to_thread(api_key, gw, "out")
    await say(api, ALICE, "/join out")
    door, yard = png(640, 480), jpeg(320, 240)
    one = await asyncio.to_thread(api_post, gw, key, "out", ("door.png", door, "image/png"),
                                  message="the <door>")
    (photo,) = await api.wait_media_async(ALICE, 1)
    assert (photo["method"], photo["content"], photo["filename"]) == ("sendPhoto", door,
                                                                      "door.png")
    assert photo["caption"] == "<b>camera</b> (api): the &lt;door&gt;"
    assert photo["parse_mode"] == "HTML"
    await asyncio.to_thread(api_post, gw, key, "out", ("door.png", door, "image/png"),
                            ("yard.jpg", yard, "image/jpeg"), message="both")
    album = (await api.wait_media_async(ALICE, 3))[1:]
    assert [(s["method"], s["content"]) for s in album] == [("sendMediaGroup", door),
                                                            ("sendMediaGroup", yard)]
    assert [s["visible_caption"] for s in album] == ["camera (api): both", ""]
    assert album[0]["media_group_id"] == album[1]["media_group_id"]
    await asyncio.to_thread(api_post, gw, key, "out", ("minutes.pdf", pdf(), "application/pdf"))
    (document,) = (await api.wait_media_async(ALICE, 4))[3:]
    assert (document["method"], document["content"], document["filename"]) == (
        "sendDocument", pdf(), "minutes.pdf")
    assert document["visible_caption"] == "camera (api)"
    # An edit of the photo's message edits its caption.
    edited = await asyncio.to_thread(
        httpx.patch, f"{gw.http}/api/rooms/out/messages/{one['id']}",
        json={"message": "the front door"}, headers={"Authorization": f"Bearer {key}"},
        timeout=10)
    assert edited.status_code == 200, edited.text
    await wait_until(lambda: api.caption_edits, 10, "the caption was not edited")
    (edit,) = api.caption_edits
    assert (edit["message_id"], edit["visible_caption"]) == (photo["message_id"],
                                                             "camera (api): the front door")
    await settled()
    assert not [n for n, _ in api.calls if n == "editMessageText"]
    assert len(api.sent_to(ALICE)) == 1  # only the /join answer went as text
    # A reply in the chat to the album's second photo answers the room message.
    api.text_update(ALICE, "nice yard", reply_to=album[1]["message_id"])
    messages = await room_messages(gw, "out", 4)
    assert messages[3]["reply_to"]["id"] == messages[1]["id"]
