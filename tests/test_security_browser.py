"""Cross-site socket hijacking and impersonation, in Chromium with a staff session."""

from __future__ import annotations

import http.server
import threading

import pytest
from playwright.sync_api import expect

from tests.helpers import ARTIFACTS, PASSWORD, STAFF, log_in, open_chat, send

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HOSTILE_PAGE = """<!doctype html><title>Free prizes</title><script>
// Opens the gateway's sockets from another origin, with whatever cookies the browser sends.
function probe(url, frame) {
  return new Promise((resolve) => {
    const result = { url, opened: false, frames: [] };
    const ws = new WebSocket(url);
    ws.onopen = () => { result.opened = true; if (frame) ws.send(JSON.stringify(frame)); };
    ws.onmessage = (e) => result.frames.push(e.data.slice(0, 200));
    ws.onerror = () => { result.error = true; };
    ws.onclose = (e) => { result.code = e.code; resolve(result); };
    setTimeout(() => { ws.close(); resolve(result); }, 5000);
  });
}
window.probes = (gateway) => Promise.all([
  probe(`ws://${gateway}/ws/dashboard/`, { action: "post", room: "lobby", message: "pwned" }),
  probe(`ws://${gateway}/ws/chat/lobby/`, { message: "hijacked" }),
]);
</script>"""


class HostilePage:
    """A tiny HTTP server on another port of 127.0.0.1 serving a hostile page."""

    def __init__(self) -> None:
        body = HOSTILE_PAGE.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HostilePage:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_page_on_another_port_cannot_use_the_staff_session_on_the_sockets(
    browser, gateway_factory
):
    gw = gateway_factory().start()
    gw.create_user(STAFF, PASSWORD, staff=True)
    dash = log_in(browser, gw, "/dashboard/")
    expect(dash.locator("#status")).to_have_text("live")
    with HostilePage() as hostile:
        page = dash.context.new_page()  # same browser session: the staff's cookies
        page.goto(hostile.url)
        results = page.evaluate("(gateway) => window.probes(gateway)", f"127.0.0.1:{gw.port}")
    for result in results:
        assert result["opened"] is False, result
        assert result["frames"] == [], result
    assert f"refused a socket from origin '{hostile.url.rstrip('/')}'" in gw.log()
    assert gw.get_json("/api/rooms/lobby/messages")["messages"] == []

    # The gateway's own pages, in the same session, still work.
    dash.reload()
    expect(dash.locator("#status")).to_have_text("live")
    chat = dash.context.new_page()
    chat.goto(gw.http + "/chat/lobby/")
    expect(chat.locator("#status")).to_have_text("connected")
    send(chat, "from the site itself")
    expect(chat.locator("#messages li .text")).to_have_text(["from the site itself"])


def test_verified_senders_are_marked_and_a_borrowed_name_is_not(browser, gateway_factory):
    gw = gateway_factory().start()
    gw.create_user("admin", PASSWORD, staff=True)
    observer = open_chat(browser, gw, "vip", "observer")

    real = log_in(browser, gw, "/chat/vip/", username="admin")
    expect(real.locator("#status")).to_have_text("connected")
    send(real, "from the real admin")
    expect(real.locator("#messages li .text").last).to_have_text("from the real admin")
    impostor = open_chat(browser, gw, "vip", "admin")
    send(impostor, "from someone typing admin")
    # Stored (its own page shows it back) before the notice below, whose order is checked.
    expect(impostor.locator("#messages li .text").last).to_have_text("from someone typing admin")
    dash = real.context.new_page()
    dash.goto(gw.http + "/dashboard/")
    expect(dash.locator("#status")).to_have_text("live")
    dash.fill("#post-room", "vip")
    dash.fill("#post-text", "a system notice")
    dash.press("#post-text", "Enter")

    items = observer.locator("#messages li")
    expect(items.locator(".text")).to_have_text(
        ["from the real admin", "from someone typing admin", "a system notice"]
    )
    expect(items.nth(0).locator(".verified")).to_have_count(1)
    expect(items.nth(1).locator(".verified")).to_have_count(0)
    expect(items.nth(2).locator(".verified")).to_have_count(1)
    expect(items.nth(0).locator(".verified")).to_have_attribute(
        "title", "verified: a logged-in account or staff"
    )
    # in the member list too: the logged-in admin, not the visitor who typed the name
    expect(observer.locator("#members li")).to_have_count(3, timeout=10_000)
    expect(observer.locator("#members li .verified")).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    observer.screenshot(path=str(ARTIFACTS / "chat-verified.png"))
