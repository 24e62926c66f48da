"""The chat page in Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import json

import pytest
import websockets.sync.client
from playwright.sync_api import expect

from tests.helpers import ARTIFACTS, open_chat, send

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory().start()


def test_two_pages_chat_and_html_stays_text(browser, gateway):
    alice = open_chat(browser, gateway, "lobby", "alice")
    bob = open_chat(browser, gateway, "lobby", "bob")
    dialogs: list[str] = []
    for page in (alice, bob):
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    send(alice, "hello bob")
    last = bob.locator("#messages li").last
    expect(last.locator(".text")).to_have_text("hello bob")
    expect(last.locator(".sender")).to_have_text("alice")
    expect(last.locator(".badge")).to_have_text("web")
    expect(last.locator("time")).not_to_be_empty()

    payload = "<img src=x onerror=alert(1)>"
    send(bob, payload)
    for page in (alice, bob):
        expect(page.locator("#messages li").last.locator(".text")).to_have_text(payload)
        assert page.locator("#messages img").count() == 0
    expect(alice.locator("#members li")).to_have_count(2, timeout=10_000)
    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "chat.png"))
    assert dialogs == []

    # A third visitor gets the history on arrival.
    carol = open_chat(browser, gateway, "lobby", "carol")
    expect(carol.locator("#messages li .text")).to_have_text(["hello bob", payload])


def test_page_reconnects_after_a_restart_and_resumes_without_gap_or_duplicate(
    browser, gateway, gateway_factory
):
    page = open_chat(browser, gateway, "resume", "dana")
    for i in range(3):
        send(page, f"before {i}")
    expect(page.locator("#messages li")).to_have_count(3)

    gateway.terminate()
    expect(page.locator("#status")).to_have_text("reconnecting…")
    restarted = gateway_factory(port=gateway.port, datadir=gateway.datadir).start()
    # Posted by another client before the page is back: it must appear exactly once.
    with websockets.sync.client.connect(restarted.ws("/ws/chat/resume/?name=eve"),
                                        origin=restarted.origin) as ws:
        ws.send(json.dumps({"message": "while you were away"}))
        assert json.loads(ws.recv(timeout=10))["id"] == 4
    expect(page.locator("#status")).to_have_text("connected", timeout=20_000)
    send(page, "after")
    expect(page.locator("#messages li .text")).to_have_text(
        ["before 0", "before 1", "before 2", "while you were away", "after"], timeout=10_000
    )
    ids = page.locator("#messages li").evaluate_all("els => els.map(e => e.dataset.id)")
    assert ids == ["1", "2", "3", "4", "5"]
