"""Files on the chat page, in Chromium: attached (the button, or dropped on the conversation)
and posted over the HTTP API with the session, with their progress and the API's refusals;
shown to every page as thumbnails or download links, from live frames and from history; gone
with their message; and nothing a file or its name holds ever runs in the page."""

from __future__ import annotations

import base64
import json
import re
import urllib.request

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from tests import samples
from tests.helpers import ARTIFACTS, FAST, PASSWORD, forged_chat, log_in, open_chat
from tests.samples import jpeg, pdf

pytestmark = [pytest.mark.slow, pytest.mark.browser]

DEFAULT_TYPES = ("image/jpeg,image/png,image/gif,image/webp,application/pdf,text/plain,"
                 "audio/mpeg,audio/ogg,audio/mp4,audio/aac,audio/x-wav,audio/x-flac,"
                 "video/mp4,video/webm,video/quicktime")
WAIT = 10_000  # ms: every wait below is bounded


def png(width: int = 640, height: int = 480, color=(200, 30, 30)) -> bytes:
    return samples.png(width, height, color)


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory(env=FAST).start()


def member(browser, gw, room: str, username: str = "alice") -> Page:
    """A logged-in user's chat page (a session posts files; its CSRF token is the page's)."""
    gw.create_user(username, PASSWORD, staff=False)
    page = log_in(browser, gw, f"/chat/{room}/", username=username)
    expect(page.locator("#status")).to_have_text("connected", timeout=WAIT)
    return page


def thumbnail_loaded(page: Page, thumb) -> None:
    """Wait until an attachment's thumbnail has really been fetched and decoded."""
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=thumb.element_handle(timeout=WAIT), timeout=WAIT)


def stored(gw, room: str) -> list[dict]:
    return gw.get_json(f"/api/rooms/{room}/messages?after=0")["messages"]


def api_key(gw, room: str, name: str = "door camera") -> str:
    out = gw.manage("apikey", "create", "--name", name, "--rooms", room, "--scopes", "read,post")
    return out.strip().splitlines()[-1]


def api_upload(gw, key: str, room: str, *files: tuple[str, bytes, str], **fields: str) -> dict:
    """What a device or program does: a multipart POST with its API key."""
    answer = httpx.post(f"{gw.http}/api/rooms/{room}/messages", data=fields,
                        files=[("file", part) for part in files],
                        headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_an_uploaded_image_shows_its_progress_then_a_thumbnail_everywhere(browser, gateway):
    alice = member(browser, gateway, "pics")
    bob = open_chat(browser, gateway, "pics", "bob")
    original = png(640, 480)

    # The upload is held at the network until the page has shown its progress.
    held: list[Route] = []

    def hold(route: Route) -> None:
        if route.request.method == "POST":
            held.append(route)
        else:
            route.continue_()

    alice.route(lambda url: url.endswith("/api/rooms/pics/messages"), hold)
    alice.set_input_files("#attach", files=[
        {"name": "door.png", "mimeType": "image/png", "buffer": original}])
    expect(alice.locator("#staged .staged-file .file-name")).to_have_text(["door.png"])
    alice.fill("#text", "the front door")
    alice.press("#text", "Enter")
    upload = alice.locator("#uploads li.upload")
    expect(upload).to_have_count(1, timeout=WAIT)
    expect(upload.locator(".upload-files")).to_have_text("door.png")
    expect(upload.locator("progress.upload-progress")).to_be_visible()
    expect(alice.locator("#staged")).to_be_hidden()
    expect(alice.locator("#text")).to_have_value("")
    for _ in range(200):  # bounded: 10 s
        if held:
            break
        alice.wait_for_timeout(50)
    assert len(held) == 1, "the page did not post the file"
    request = held[0].request
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert request.headers.get("x-csrftoken"), request.headers
    assert stored(gateway, "pics") == []  # nothing stored while it is held
    held[0].continue_()

    # Bob's page: the message with its thumbnail, its box sized before it loads.
    item = bob.locator("#messages li").last
    expect(item.locator(".text")).to_have_text("the front door", timeout=WAIT)
    thumb = item.locator(".attachment img.attachment-thumb")
    expect(thumb).to_have_count(1)
    thumbnail_loaded(bob, thumb)
    assert (thumb.get_attribute("width"), thumb.get_attribute("height")) == ("320", "240")
    expect(thumb).to_have_attribute("alt", "door.png")
    [message] = stored(gateway, "pics")
    [attachment] = message["attachments"]
    expect(item.locator(".attachment")).to_have_attribute("data-attachment-id", attachment["id"])
    assert thumb.get_attribute("src").startswith(gateway.http + "/files/")

    # Its link opens the full-size image in a new tab.
    link = item.locator("a.attachment-open")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    with bob.context.expect_page(timeout=WAIT) as opened:
        link.click()
    full = opened.value
    full.wait_for_load_state(timeout=WAIT)
    assert re.fullmatch(rf"{re.escape(gateway.http)}/files/{attachment['id']}/door\.png\?.+",
                        full.url), full.url
    assert full.evaluate("() => document.images[0].naturalWidth") == 640
    with urllib.request.urlopen(link.get_attribute("href"), timeout=5) as served:
        assert served.read() == original

    # The uploader's page shows it once (from the socket), and its upload is done.
    expect(alice.locator("#uploads li")).to_have_count(0, timeout=WAIT)
    expect(alice.locator("#messages li")).to_have_count(1)
    thumbnail_loaded(alice, alice.locator("#messages li img.attachment-thumb"))
    alice.wait_for_timeout(300)  # a second copy would have come by now
    expect(alice.locator("#messages li")).to_have_count(1)
    assert len(stored(gateway, "pics")) == 1
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "chat-image.png"))


DROP = """async ([b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
  const target = document.getElementById("messages");
  const fire = (kind) => {
    const event = new DragEvent(kind, { bubbles: true, cancelable: true, dataTransfer: data });
    target.dispatchEvent(event);
    return event.defaultPrevented;
  };
  const entered = fire("dragenter");
  const over = fire("dragover");
  const highlighted = document.querySelector(".conversation").classList.contains("dragging");
  const dropped = fire("drop");
  const after = document.querySelector(".conversation").classList.contains("dragging");
  return { entered, over, highlighted, dropped, after };
}"""


def test_a_file_dropped_on_the_conversation_is_sent(browser, gateway):
    alice = member(browser, gateway, "drops")
    bob = open_chat(browser, gateway, "drops", "bob")
    image = png(200, 100, color=(10, 200, 10))
    events = alice.evaluate(DROP, [base64.b64encode(image).decode(), "dropped.png", "image/png"])
    # Accepted (the browser would otherwise open the file), highlighted while dragged over.
    assert events == {"entered": True, "over": True, "highlighted": True, "dropped": True,
                      "after": False}, events
    expect(alice.locator("#staged .file-name")).to_have_text(["dropped.png"])
    alice.locator("#composer button[type=submit]").click()  # no caption: the file alone

    item = bob.locator("#messages li").last
    thumb = item.locator("img.attachment-thumb")
    expect(thumb).to_have_count(1, timeout=WAIT)
    thumbnail_loaded(bob, thumb)
    expect(thumb).to_have_attribute("alt", "dropped.png")
    expect(item.locator(".sender")).to_have_text("alice")
    expect(item.locator(".text")).to_have_text("")
    expect(item.locator(".text")).to_be_hidden()  # an empty text takes no room
    [message] = stored(gateway, "drops")
    assert message["message"] == "" and message["attachments"][0]["name"] == "dropped.png"
    assert message["sender"]["name"] == "alice"
    expect(alice.locator("#uploads li")).to_have_count(0, timeout=WAIT)
    expect(alice.locator("#messages li")).to_have_count(1)

    # A reply to it quotes its file (an empty excerpt is not a removed message here).
    item.locator("button.reply").click()
    expect(bob.locator("#replying-text")).to_have_text("\U0001F4CE dropped.png")
    bob.fill("#text", "nice lawn")
    bob.press("#text", "Enter")
    reply = bob.locator("#messages li").last
    expect(reply.locator(".text")).to_have_text("nice lawn", timeout=WAIT)
    expect(reply.locator(".quote-text")).to_have_text("\U0001F4CE dropped.png")
    expect(reply.locator(".quote-text.gone")).to_have_count(0)


def test_an_upload_that_failed_on_the_way_is_retried_and_posted_once(browser, gateway):
    alice = member(browser, gateway, "flaky")
    attempts: list[str] = []

    def flaky(route: Route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        sent = re.search(rb'name="client_id"\r\n\r\n([^\r]+)', route.request.post_data_buffer)
        assert sent is not None
        attempts.append(sent[1].decode())
        if len(attempts) == 1:  # as a proxy in trouble would answer
            route.fulfill(status=503, content_type="text/html", body="<h1>Bad gateway</h1>")
        else:
            route.continue_()

    alice.route(lambda url: url.endswith("/api/rooms/flaky/messages"), flaky)
    alice.set_input_files("#attach", files=[
        {"name": "retry.png", "mimeType": "image/png", "buffer": png(50, 50)}])
    alice.press("#text", "Enter")
    upload = alice.locator("#uploads li.upload.retry")
    expect(upload.locator(".upload-state")).to_have_text(
        "Not sent: the gateway is unavailable.", timeout=WAIT)
    assert stored(gateway, "flaky") == []
    upload.locator("button.retry-upload").click()
    expect(alice.locator("#messages li img.attachment-thumb")).to_have_count(1, timeout=WAIT)
    expect(alice.locator("#uploads li")).to_have_count(0, timeout=WAIT)
    [message] = stored(gateway, "flaky")
    assert message["attachments"][0]["name"] == "retry.png"
    assert attempts == [message["client_id"]] * 2  # the same message again, stored once


def test_an_anonymous_visitor_attaches_files_as_the_guest_its_socket_is(browser, gateway):
    # The page posts with its CSRF token, as the visitor its socket is (uid and name).
    visitor = open_chat(browser, gateway, "guests", "guest")
    visitor.set_input_files("#attach", files=[
        {"name": "a.png", "mimeType": "image/png", "buffer": png(20, 20)}])
    visitor.fill("#text", "from a guest")
    visitor.press("#text", "Enter")
    item = visitor.locator("#messages li", has_text="from a guest")
    expect(item).to_have_count(1, timeout=WAIT)
    thumbnail_loaded(visitor, item.locator("img.attachment-thumb"))
    (message,) = stored(gateway, "guests")
    assert (message["message"], message["sender"]["protocol"], message["sender"]["name"]) == (
        "from a guest", "web", "guest")
    # The same sender as the visitor's socket messages: its own to edit and delete.
    visitor.fill("#text", "and text")
    visitor.press("#text", "Enter")
    expect(visitor.locator("#messages li", has_text="and text")).to_have_count(1, timeout=WAIT)
    first, second = stored(gateway, "guests")
    assert first["sender"] == second["sender"]


SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b'<script>window.pwned = true; try { top.pwned = true } catch (e) {}</script>'
       b'<rect width="10" height="10"/></svg>')
HTML = (b"<!doctype html><html><head><title>harmless</title></head><body>"
        b"<script>console.log('pwned'); document.title = 'pwned';"
        b" try { opener.pwned = true } catch (e) {}</script></body></html>")


def test_a_refused_upload_shows_the_api_error_and_no_file_ever_runs_script(
    browser, gateway_factory
):
    # HTML is taken here (an operator may allow it) to show how it is served: never run.
    gw = gateway_factory(env={**FAST, "GATEWAY_FILE_TYPES": DEFAULT_TYPES + ",text/html"}).start()
    alice = member(browser, gw, "refusals")
    console: list[str] = []
    alice.on("console", lambda msg: console.append(msg.text))

    alice.set_input_files("#attach", files=[
        {"name": "cute.svg", "mimeType": "image/svg+xml", "buffer": SVG}])
    alice.fill("#text", "look at this")
    alice.press("#text", "Enter")
    failed = alice.locator("#uploads li.upload.failed")
    expect(failed).to_have_count(1, timeout=WAIT)
    refusal = re.compile(r"Not sent: 'cute\.svg' is image/svg\+xml, which this gateway does "
                         r"not take\.")
    expect(failed.locator(".upload-state")).to_have_text(refusal)
    expect(alice.locator("#notice")).to_have_text(refusal)
    expect(alice.locator("#notice")).to_be_visible()
    expect(alice.locator("#text")).to_have_value("look at this")  # the caption comes back
    failed.locator("button.dismiss-upload").click()
    expect(alice.locator("#uploads li")).to_have_count(0)

    alice.fill("#text", "")
    alice.set_input_files("#attach", files=[
        {"name": "backup.zip", "mimeType": "application/zip",
         "buffer": b"PK\x03\x04" + b"\x00" * 60}])
    alice.press("#text", "Enter")
    expect(alice.locator("#uploads li.upload.failed .upload-state")).to_have_text(
        re.compile(r"backup\.zip' is application/zip"), timeout=WAIT)
    expect(alice.locator("#messages li")).to_have_count(0)
    assert stored(gw, "refusals") == []
    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "chat-upload-refused.png"))
    assert alice.evaluate("() => window.pwned") is None

    # A file of markup a program posted: its URL, opened in the page's tab, downloads it.
    key = api_key(gw, "refusals", name="uploader")
    posted = api_upload(gw, key, "refusals", ("page.html", HTML, "text/html"),
                        ("notes.txt", b"a <b>note</b>\n", "text/plain"))
    links = alice.locator("#messages li a.attachment-link")
    expect(links).to_have_text(["page.html", "notes.txt"], timeout=WAIT)
    chat_url = alice.url
    for link, attachment in zip(links.all(), posted["attachments"], strict=True):
        href = link.get_attribute("href")
        assert href == gw.http + attachment["url"], (href, attachment)
        with alice.expect_download(timeout=WAIT) as download:
            alice.evaluate("(url) => { location.href = url; }", href)
        assert download.value.suggested_filename == attachment["name"]
        with urllib.request.urlopen(href, timeout=5) as served:
            assert served.headers["Content-Disposition"].startswith("attachment")
            assert served.headers["X-Content-Type-Options"] == "nosniff"
            assert "sandbox" in served.headers["Content-Security-Policy"]
    assert alice.url == chat_url
    assert alice.title() != "pwned"
    assert alice.evaluate("() => window.pwned") is None
    assert not [line for line in console if "pwned" in line], console


def test_a_device_snapshot_posted_with_an_api_key_shows_as_a_thumbnail(browser, gateway):
    viewer = open_chat(browser, gateway, "cams", "watcher")
    key = api_key(gateway, "cams")
    snapshot = jpeg(800, 600)
    posted = api_upload(gateway, key, "cams", ("snap.jpg", snapshot, "image/jpeg"),
                        message="motion at the door", client_id="snap-0001")

    item = viewer.locator("#messages li").last
    expect(item.locator(".text")).to_have_text("motion at the door", timeout=WAIT)
    expect(item.locator(".sender")).to_have_text("door camera")
    expect(item.locator(".badge")).to_have_text("api")
    thumb = item.locator("img.attachment-thumb")
    thumbnail_loaded(viewer, thumb)
    assert (thumb.get_attribute("width"), thumb.get_attribute("height")) == ("320", "240")
    expect(item.locator(".attachment")).to_have_attribute(
        "data-attachment-id", posted["attachments"][0]["id"])

    # A page opened later has it from the history.
    later = open_chat(browser, gateway, "cams", "latecomer")
    thumbnail_loaded(later, later.locator("#messages li img.attachment-thumb"))
    assert later.locator("#messages li .attachment a.attachment-open").get_attribute(
        "href").startswith(gateway.http + "/files/")


def test_other_files_show_name_size_and_download_link_and_go_with_their_message(
    browser, gateway
):
    alice = member(browser, gateway, "docs")
    bob = open_chat(browser, gateway, "docs", "bob")
    report, notes = pdf(3000), b"remember the milk\n"
    alice.set_input_files("#attach", files=[
        {"name": "report.pdf", "mimeType": "application/pdf", "buffer": report},
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": notes}])
    expect(alice.locator("#staged .file-name")).to_have_text(["report.pdf", "notes.txt"])
    expect(alice.locator("#staged .file-size")).to_have_text(["2.9 KB", "18 bytes"])
    alice.fill("#text", "the quarterly numbers")
    alice.press("#text", "Enter")

    item = bob.locator("#messages li").last
    expect(item.locator(".text")).to_have_text("the quarterly numbers", timeout=WAIT)
    files = item.locator(".attachment.attachment-file")
    expect(files).to_have_count(2)
    expect(files.locator("a.attachment-link")).to_have_text(["report.pdf", "notes.txt"])
    expect(files.locator(".attachment-size")).to_have_text(["2.9 KB", "18 bytes"])
    expect(item.locator("img")).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "chat-files.png"))
    with bob.expect_download(timeout=WAIT) as download:
        files.nth(0).locator("a.attachment-link").click()
    assert download.value.suggested_filename == "report.pdf"
    with open(download.value.path(), "rb") as got:
        assert got.read() == report

    # Deleted: the files go from every page (and the server no longer serves them).
    href = files.nth(1).locator("a.attachment-link").get_attribute("href")
    msg_id = item.get_attribute("data-id")
    mine = alice.locator(f"#messages li[data-id='{msg_id}']")
    mine.locator("button.delete").click()
    mine.locator("button.confirm-delete").click()
    for page in (alice, bob):
        gone = page.locator(f"#messages li[data-id='{msg_id}']")
        expect(gone.locator(".removed-text")).to_have_text("message removed", timeout=WAIT)
        expect(gone.locator(".attachment")).to_have_count(0)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(href, timeout=5)
    assert refused.value.code == 404
    later = open_chat(browser, gateway, "docs", "carol")
    expect(later.locator("#messages li .removed-text")).to_have_text(["message removed"])
    expect(later.locator("#messages .attachment")).to_have_count(0)


FORGED = {
    "type": "message", "id": 1, "cursor": 1, "room": "forged", "message": "",
    "sender": {"protocol": "web", "id": "anon:0", "name": "mallory"}, "ts": 1764057600.0,
    "client_id": None, "edited_at": None, "reply_to": None, "reactions": {},
    "attachments": [
        {"id": "a1", "name": '<img src=x onerror="window.pwned=true">', "type": "image/png",
         "size": 10, "width": 10, "height": 10, "url": "javascript:window.pwned=true",
         "thumbnail_url": "https://evil.example/files/x.png"},
        {"id": "a2", "name": "elsewhere.txt", "type": "text/plain", "size": 10,
         "width": None, "height": None, "url": "//evil.example/files/a2/x.txt",
         "thumbnail_url": None},
        {"id": "a3", "name": "climbing.txt", "type": "text/plain", "size": 10,
         "width": None, "height": None, "url": "/files/../api/rooms/", "thumbnail_url": None},
        {"id": "a4", "name": "fine.txt", "type": "text/plain", "size": 2048,
         "width": None, "height": None, "url": "/files/a4/fine.txt?expires=1&signature=s",
         "thumbnail_url": None},
    ],
}


def test_a_frame_cannot_put_markup_or_foreign_urls_in_the_page(browser, gateway):
    page, sockets = forged_chat(browser, gateway, "forged", WAIT)
    sockets[-1].send(json.dumps(FORGED))  # as if the server had sent it

    item = page.locator("#messages li[data-id='1']")
    expect(item.locator(".attachment")).to_have_count(4, timeout=WAIT)
    ids = item.locator(".attachment").evaluate_all(
        "nodes => nodes.map((n) => n.dataset.attachmentId)")
    assert ids == ["a1", "a2", "a3", "a4"]
    expect(item.locator("img")).to_have_count(0)  # no thumbnail from another origin
    expect(item.locator(".attachment-name")).to_have_text(
        ['<img src=x onerror="window.pwned=true">', "elsewhere.txt", "climbing.txt"])
    links = item.locator("a")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute(
        "href", gateway.http + "/files/a4/fine.txt?expires=1&signature=s")
    expect(item.locator(".attachment-size").last).to_have_text("2.0 KB")
    page.wait_for_timeout(300)  # an onerror would have run by now
    assert page.evaluate("() => window.pwned") is None
