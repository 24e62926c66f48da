"""The chat page in Chromium: messages that live (edits, deletes, replies, reactions), after
reconnects too, and the member list fed by presence frames instead of polling."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse

import pytest
import websockets.sync.client
from playwright.sync_api import Page, WebSocketRoute, expect

from tests.helpers import ARTIFACTS, FAST, PASSWORD, STAFF, log_in, open_chat, send

pytestmark = [pytest.mark.slow, pytest.mark.browser]

THUMBS, HEART = "\U0001F44D", "\u2764\uFE0F"


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory(env=FAST).start()


def item(page: Page, msg_id: int):
    return page.locator(f"#messages li[data-id='{msg_id}']")


def sent_id(page: Page, text: str) -> int:
    """Send ``text`` from ``page`` and return its id once the page shows it."""
    send(page, text)
    last = page.locator("#messages li").last
    expect(last.locator(".text")).to_have_text(text)
    msg_id = last.get_attribute("data-id")
    assert msg_id is not None
    return int(msg_id)


def edit(page: Page, msg_id: int, text: str) -> None:
    item(page, msg_id).locator("button.edit").click()
    box = item(page, msg_id).locator(".edit-box")
    expect(box).to_be_focused()
    box.fill(text)
    box.press("Enter")


def delete(page: Page, msg_id: int) -> None:
    item(page, msg_id).locator("button.delete").click()
    item(page, msg_id).locator("button.confirm-delete").click()


def react(page: Page, msg_id: int, emoji: str) -> None:
    item(page, msg_id).locator("button.react").click()
    item(page, msg_id).get_by_role("button", name=f"React with {emoji}").click()


def chip(page: Page, msg_id: int, emoji: str):
    return item(page, msg_id).locator(f"button.chip[data-emoji='{emoji}']")


def expect_chip(page: Page, msg_id: int, emoji: str, count: int, mine: bool | None = None):
    expect(chip(page, msg_id, emoji).locator(".count")).to_have_text(str(count))
    if mine is not None:
        expect(chip(page, msg_id, emoji)).to_have_attribute("aria-pressed", str(mine).lower())


def test_edit_own_message_seen_edited_by_others_and_in_history(browser, gateway):
    alice = open_chat(browser, gateway, "life", "alice")
    bob = open_chat(browser, gateway, "life", "bob")
    msg = sent_id(alice, "helo wrold")
    expect(item(bob, msg).locator(".text")).to_have_text("helo wrold")
    expect(item(alice, msg).locator(".edited")).to_be_hidden()

    # Escape leaves it as it was, and nothing is sent.
    item(alice, msg).locator("button.edit").click()
    box = item(alice, msg).locator(".edit-box")
    expect(box).to_have_value("helo wrold")
    box.fill("not this")
    box.press("Escape")
    expect(box).to_have_count(0)
    expect(item(alice, msg).locator("button.edit")).to_be_focused()

    edit(alice, msg, "hello world")
    for page in (alice, bob):
        expect(item(page, msg).locator(".text")).to_have_text("hello world")
        expect(item(page, msg).locator(".edited")).to_be_visible()
        expect(item(page, msg).locator(".edited")).to_have_text("(edited)")
    expect(bob.locator("#messages li .text")).to_have_text(["hello world"])  # no new line

    # History shows the current text; the author's controls survive a reload (the page keeps
    # its sender id with its uid).
    carol = open_chat(browser, gateway, "life", "carol")
    expect(item(carol, msg).locator(".text")).to_have_text("hello world")
    expect(item(carol, msg).locator(".edited")).to_be_visible()
    expect(item(carol, msg).locator("button.edit")).to_have_count(0)
    alice.reload()
    expect(alice.locator("#status")).to_have_text("connected")
    expect(item(alice, msg).locator("button.edit")).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "chat-edited.png"))


FORGE = """async ([room, id]) => {
  // What a visitor could type in the console: its own identity (uid), someone else's message.
  const uid = localStorage.getItem("gateway.uid");
  const ws = new WebSocket(`ws://${location.host}/ws/chat/${room}/?v=2&uid=${uid}`);
  return await new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error("no answer")), 10000);
    ws.onopen = () => ws.send(JSON.stringify(
      {type: "edit", id, message: "forged", client_id: "forged-edit-1"}));
    ws.onmessage = (e) => {
      const frame = JSON.parse(e.data);
      if (frame.type === "error" || frame.type === "ack") { ws.close(); resolve(frame); }
    };
  });
}"""


def test_a_non_author_has_no_controls_and_a_forged_edit_is_forbidden(browser, gateway):
    alice = open_chat(browser, gateway, "forge", "alice")
    bob = open_chat(browser, gateway, "forge", "bob")
    msg = sent_id(alice, "mine alone")
    expect(item(alice, msg).locator("button.edit")).to_have_count(1)
    expect(item(alice, msg).locator("button.delete")).to_have_count(1)
    expect(item(bob, msg).locator(".text")).to_have_text("mine alone")
    expect(item(bob, msg).locator("button.reply")).to_have_count(1)
    expect(item(bob, msg).locator("button.edit")).to_have_count(0)
    expect(item(bob, msg).locator("button.delete")).to_have_count(0)

    refused = bob.evaluate(FORGE, ["forge", msg])
    assert refused["type"] == "error" and refused["code"] == "forbidden", refused
    assert refused["client_id"] == "forged-edit-1"
    with websockets.sync.client.connect(gateway.ws("/ws/chat/forge/?v=2&name=mallory"),
                                        origin=gateway.origin) as ws:
        ws.send(json.dumps({"type": "delete", "id": msg, "client_id": "forged-delete-1"}))
        while (frame := json.loads(ws.recv(timeout=10)))["type"] not in ("error", "ack"):
            pass
        assert frame["code"] == "forbidden", frame
    for page in (alice, bob):
        expect(item(page, msg).locator(".text")).to_have_text("mine alone")
        expect(item(page, msg).locator(".edited")).to_be_hidden()
    assert [m["message"] for m in gateway.get_json("/api/rooms/forge/messages")["messages"]] \
        == ["mine alone"]


def test_delete_is_confirmed_and_shown_removed_in_place(browser, gateway):
    alice = open_chat(browser, gateway, "gone", "alice")
    bob = open_chat(browser, gateway, "gone", "bob")
    keep = sent_id(alice, "keep me")
    doomed = sent_id(alice, "delete me")
    react(bob, doomed, THUMBS)
    expect_chip(alice, doomed, THUMBS, 1)

    # "Keep" (or Escape) cancels.
    item(alice, doomed).locator("button.delete").click()
    expect(item(alice, doomed).locator(".confirm")).to_have_text("Delete this message?")
    item(alice, doomed).locator("button.cancel-delete").click()
    expect(item(alice, doomed).locator(".confirm")).to_have_count(0)
    item(alice, doomed).locator("button.delete").click()
    alice.keyboard.press("Escape")
    expect(item(alice, doomed).locator("button.delete")).to_be_focused()

    delete(alice, doomed)
    for page in (alice, bob):
        expect(item(page, doomed).locator(".removed-text")).to_have_text("message removed")
        expect(item(page, doomed).locator(".text")).to_have_count(0)
        expect(item(page, doomed).locator("button.chip")).to_have_count(0)
        expect(item(page, doomed).locator("button")).to_have_count(0)  # nothing to act on
        expect(page.locator("#messages li .text")).to_have_text(["keep me"])
        expect(item(page, keep).locator(".text")).to_have_text("keep me")
    # A newcomer sees the tombstone in place, from the history API.
    carol = open_chat(browser, gateway, "gone", "carol")
    expect(carol.locator("#messages li")).to_have_count(2)
    expect(item(carol, doomed).locator(".removed-text")).to_have_text("message removed")
    assert "delete me" not in carol.locator("#messages").inner_text()


def test_reply_shows_the_excerpt_and_jumps_to_the_original(browser, gateway):
    alice = open_chat(browser, gateway, "thread", "alice")
    bob = open_chat(browser, gateway, "thread", "bob")
    question = "<b>shall we</b> meet at noon? " + "x" * 120
    original = sent_id(alice, question)
    excerpt = question[:100]

    # Reply, cancel, reply again.
    item(bob, original).locator("button.reply").click()
    expect(bob.locator("#replying")).to_be_visible()
    expect(bob.locator("#replying-to")).to_have_text("alice")
    expect(bob.locator("#replying-text")).to_have_text(excerpt)
    expect(bob.locator("#text")).to_be_focused()
    bob.locator("#text").press("Escape")
    expect(bob.locator("#replying")).to_be_hidden()
    item(bob, original).locator("button.reply").click()
    bob.locator("#replying-cancel").click()
    expect(bob.locator("#replying")).to_be_hidden()
    plain = sent_id(bob, "not a reply")
    item(bob, original).locator("button.reply").click()
    reply = sent_id(bob, "yes")
    expect(bob.locator("#replying")).to_be_hidden()

    for page in (alice, bob):
        quote = item(page, reply).locator("button.quote")
        expect(quote.locator(".quote-sender")).to_have_text("alice")
        expect(quote.locator(".quote-text")).to_have_text(excerpt)
        expect(item(page, reply).locator(".text")).to_have_text("yes")
        assert page.locator("#messages b").count() == 0  # the excerpt stays text
    expect(item(alice, plain).locator("button.quote")).to_have_count(0)

    # Scroll the original out of view, then jump back to it through the quote.
    with websockets.sync.client.connect(gateway.ws("/ws/chat/thread/?name=filler"),
                                        origin=gateway.origin) as ws:
        for i in range(30):
            ws.send(json.dumps({"message": f"filler {i}"}))
            ws.recv(timeout=10)
    expect(alice.locator("#messages li")).to_have_count(33)
    alice.locator("#messages").evaluate("list => { list.scrollTop = list.scrollHeight; }")
    expect(item(alice, original)).not_to_be_in_viewport()
    item(alice, reply).locator("button.quote").click()
    expect(item(alice, original)).to_be_in_viewport()
    expect(item(alice, original)).to_have_class(re.compile(r"\bflash\b"))
    expect(item(alice, original)).to_be_focused()
    expect(item(alice, original)).not_to_have_class(re.compile(r"\bflash\b"), timeout=5000)

    # The quote follows the original's edit; a newcomer reads it from history.
    edit(alice, original, "noon it is")
    expect(item(bob, reply).locator(".quote-text")).to_have_text("noon it is")
    carol = open_chat(browser, gateway, "thread", "carol")
    expect(item(carol, reply).locator(".quote-text")).to_have_text("noon it is")
    delete(alice, original)
    expect(item(bob, reply).locator(".quote-text")).to_have_text("message removed")
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "chat-reply.png"))


def test_reactions_are_counted_everywhere_and_toggled_by_their_chip(browser, gateway):
    alice = open_chat(browser, gateway, "fun", "alice")
    bob = open_chat(browser, gateway, "fun", "bob")
    msg = sent_id(alice, "cake in the kitchen")
    expect(item(bob, msg).locator(".text")).to_have_text("cake in the kitchen")
    expect(item(bob, msg).locator("button.chip")).to_have_count(0)

    react(alice, msg, THUMBS)
    expect_chip(alice, msg, THUMBS, 1, mine=True)
    expect_chip(bob, msg, THUMBS, 1, mine=False)
    expect(item(alice, msg).locator(".picker")).to_have_count(0)  # closed after picking

    chip(bob, msg, THUMBS).click()  # bob adds his
    expect_chip(alice, msg, THUMBS, 2, mine=True)
    expect_chip(bob, msg, THUMBS, 2, mine=True)
    react(bob, msg, HEART)
    expect_chip(alice, msg, HEART, 1, mine=False)
    expect_chip(bob, msg, HEART, 1, mine=True)

    chip(alice, msg, THUMBS).click()  # alice takes hers back
    expect_chip(alice, msg, THUMBS, 1, mine=False)
    expect_chip(bob, msg, THUMBS, 1, mine=True)
    chip(bob, msg, HEART).click()
    for page in (alice, bob):
        expect(chip(page, msg, HEART)).to_have_count(0)
    # The picker closes with Escape, back on its button.
    item(bob, msg).locator("button.react").click()
    expect(item(bob, msg).locator(".picker button").first).to_be_focused()
    bob.keyboard.press("Escape")
    expect(item(bob, msg).locator(".picker")).to_have_count(0)
    expect(item(bob, msg).locator("button.react")).to_be_focused()

    carol = open_chat(browser, gateway, "fun", "carol")
    expect_chip(carol, msg, THUMBS, 1, mine=False)
    expect(item(carol, msg).locator("button.chip")).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "chat-reactions.png"))


class Cable:
    """The page's chat sockets through Playwright's WebSocket routing: unplugged, the page's
    socket closes and its reconnects are refused until plugged back (the gateway stays up,
    so others can change messages meanwhile)."""

    def __init__(self, page: Page):
        self.urls: list[str] = []
        self.open: list[WebSocketRoute] = []
        self.plugged = threading.Event()
        self.plugged.set()
        page.route_web_socket(re.compile(r"/ws/chat/"), self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        self.urls.append(ws.url)
        if not self.plugged.is_set():
            ws.close(code=1011, reason="unplugged")
            return
        ws.connect_to_server()
        self.open.append(ws)

    def unplug(self) -> None:
        self.plugged.clear()
        for ws in self.open:
            ws.close(code=1011, reason="unplugged")
        self.open.clear()

    def plug(self) -> None:
        self.plugged.set()


def open_routed(browser, gw, room: str, name: str) -> tuple[Page, Cable, list[str]]:
    """``open_chat`` with the page's sockets on a ``Cable`` and its requests recorded."""
    page = browser.new_context().new_page()
    cable = Cable(page)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{gw.http}/chat/{room}/")
    expect(page.locator("#status")).to_have_text("connected")
    page.fill("#name", name)
    page.locator("#name").dispatch_event("change")
    expect(page.locator("#status")).to_have_text("connected")
    return page, cable, requests


def test_changes_made_while_a_page_was_offline_are_applied_when_it_resumes(
    browser, gateway
):
    bob, cable, requests = open_routed(browser, gateway, "away", "bob")
    alice = open_chat(browser, gateway, "away", "alice")
    edited = sent_id(alice, "first draft")
    doomed = sent_id(alice, "regrettable")
    liked = sent_id(alice, "likeable")
    react(bob, liked, HEART)
    expect_chip(alice, liked, HEART, 1)
    for msg in (edited, doomed, liked):
        expect(item(bob, msg)).to_have_count(1)
    seen = max(edited, doomed, liked) + 1  # bob's reaction was the last entry he saw
    expect_chip(bob, liked, HEART, 1, mine=True)

    cable.unplug()
    expect(bob.locator("#status")).to_have_text("reconnecting…")
    react(bob, doomed, THUMBS)  # queued while offline; refused on resume (deleted)
    edit(alice, edited, "final text")
    delete(alice, doomed)
    react(alice, liked, THUMBS)
    chip(alice, liked, HEART).click()  # adds alice's heart: 2
    expect_chip(alice, liked, HEART, 2)
    posted = sent_id(alice, "posted meanwhile")
    expect(item(bob, edited).locator(".text")).to_have_text("first draft")  # still away

    cable.plug()
    expect(bob.locator("#status")).to_have_text("connected", timeout=30_000)
    expect(item(bob, edited).locator(".text")).to_have_text("final text")
    expect(item(bob, edited).locator(".edited")).to_be_visible()
    expect(item(bob, doomed).locator(".removed-text")).to_have_text("message removed")
    expect_chip(bob, liked, THUMBS, 1, mine=False)
    expect_chip(bob, liked, HEART, 2, mine=True)
    expect(item(bob, posted).locator(".text")).to_have_text("posted meanwhile")
    expect(bob.locator("#notice")).to_have_text(re.compile("deleted"))  # the queued reaction
    expect(bob.locator("#messages li")).to_have_count(4)
    # Resumed from its cursor over the extended protocol, not reloaded.
    resumed = urllib.parse.parse_qs(urllib.parse.urlparse(cable.urls[-1]).query)
    assert resumed["v"] == ["2"] and int(resumed["after"][0]) >= seen, cable.urls
    assert sum("/messages" in url for url in requests) == 1, requests


def test_staff_may_edit_and_delete_anyones_message(browser, gateway):
    gateway.create_user(STAFF, PASSWORD, staff=True)
    visitor = open_chat(browser, gateway, "mod", "visitor")
    msg = sent_id(visitor, "spam spam spam")
    staff = log_in(browser, gateway, "/chat/mod/")
    expect(staff.locator("#status")).to_have_text("connected")
    expect(item(staff, msg).locator(".text")).to_have_text("spam spam spam")
    edit(staff, msg, "[redacted]")
    expect(item(visitor, msg).locator(".text")).to_have_text("[redacted]")
    delete(staff, msg)
    expect(item(visitor, msg).locator(".removed-text")).to_have_text("message removed")
    # A staff member's own messages are marked and editable by the author too.
    own = sent_id(staff, "from staff")
    expect(item(staff, own).locator("button.edit")).to_have_count(1)
    expect(item(visitor, own).locator("button.edit")).to_have_count(0)


def members_of(page: Page):
    return page.locator("#members li")


def test_presence_list_follows_joins_and_leaves_without_polling(browser, gateway):
    room_api = "/api/rooms/here/"
    context = browser.new_context()
    alice = context.new_page()
    polled: list[str] = []
    alice.on("request", lambda r: polled.append(r.url)
             if urllib.parse.urlparse(r.url).path == room_api else None)
    alice.goto(f"{gateway.http}/chat/here/")
    expect(alice.locator("#status")).to_have_text("connected")
    alice.fill("#name", "alice")
    alice.locator("#name").dispatch_event("change")
    expect(members_of(alice)).to_have_text([re.compile(r"^alice\b")], timeout=10_000)

    bob = open_chat(browser, gateway, "here", "bob")
    expect(members_of(alice)).to_have_text([re.compile(r"^alice\b"), re.compile(r"^bob\b")],
                                           timeout=10_000)
    expect(members_of(bob)).to_have_count(2)
    # A second tab of bob's (same browser: same uid) is the same member, with two sockets.
    bob_again = bob.context.new_page()
    bob_again.goto(f"{gateway.http}/chat/here/")
    expect(bob_again.locator("#status")).to_have_text("connected")
    expect(members_of(bob_again)).to_have_count(2)
    bob.close()
    alice.wait_for_timeout(1000)
    expect(members_of(alice)).to_have_count(2)  # bob is still here, in his other tab
    bob_again.close()
    expect(members_of(alice)).to_have_text([re.compile(r"^alice\b")], timeout=10_000)
    alice.wait_for_timeout(3500)  # past the old 3 s poll
    expect(alice.locator("#members li .badge")).to_have_text(["web"])  # shown as before
    assert polled == []
