"""The HTTP server against slow and hostile clients, and what its pages may show."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from gateway.debug import GatewayExceptionReporterFilter, url_credentials_mask
from tests.servers import ROOT, free_port

pytestmark = pytest.mark.slow


def metric(gw, name: str, labels: str) -> float:
    with urllib.request.urlopen(gw.http + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    assert found is not None, text[:2000]
    return float(found[1])


def slow_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the server closed this socket (after a trickled header line)."""
    try:
        sock.sendall(b"X-Trickle: 1\r\n")
        sock.settimeout(0.2)
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_headers_are_cut_off_and_others_are_served(gateway_factory):
    gw = gateway_factory(env={"GATEWAY_HTTP_HEADER_TIMEOUT": "2"}).start()
    slow = [slow_client(gw.port) for _ in range(40)]
    try:
        deadline = time.monotonic() + 5
        while metric(gw, "gateway_open_connections", 'state="reading_headers"') < 40:
            assert time.monotonic() < deadline, "the slow clients are not counted"
            time.sleep(0.1)
        # Trickling a header line every half second does not keep them open (it does with
        # Twisted's idle timeout alone, which restarts with every byte).
        deadline = time.monotonic() + 10
        while not all(closed(sock) for sock in slow):
            assert time.monotonic() < deadline, "slow clients still connected"
            for sock in slow:
                closed(sock)
            time.sleep(0.5)
        with urllib.request.urlopen(gw.http + "/healthz", timeout=5) as resp:
            assert resp.status == 200
        assert metric(gw, "gateway_open_connections", 'state="reading_headers"') == 0
        assert "sent no complete request" in gw.log()
    finally:
        for sock in slow:
            sock.close()


def test_kept_alive_connections_serve_several_requests(gateway_factory):
    gw = gateway_factory(env={"GATEWAY_HTTP_HEADER_TIMEOUT": "1"}).start()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)  # within the deadline, which starts again after each response
        time.sleep(1.5)
        sock.settimeout(2)
        try:  # idle past the header deadline: closed (aborted, so possibly reset)
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


def test_a_taken_http_port_exits_non_zero(gateway_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = gateway_factory(port=port)
        gw.datadir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "run", "--port", str(port)],
            cwd=ROOT, env=gw.env, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode != 0
    assert "cannot listen for HTTP" in result.stderr


def test_a_graceful_stop_logs_no_failure(gateway_factory):
    gw = gateway_factory().start()
    assert gw.terminate() == 0
    log = gw.log()
    assert "status provider failed" not in log
    assert "Traceback" not in log


def test_error_pages_never_show_credentials(gateway_factory):
    secret = "Sup3r-secret-pw"
    gw = gateway_factory(env={
        "MQTT_URL": f"mqtt://gateway:{secret}@127.0.0.1:{free_port()}",
        "TELEGRAM_API_URL": f"https://bot:{secret}@bots.example.com",
    }).start()
    request = urllib.request.Request(gw.http + "/", headers={"Host": "evil.example.com"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)
    assert error.value.code == 400
    page = error.value.read().decode()
    assert "DisallowedHost" in page  # development mode: Django's technical page
    assert "mqtt://********@127.0.0.1" in page
    assert secret not in page


def test_the_filter_masks_urls_and_secret_names():
    reporter = GatewayExceptionReporterFilter()
    assert reporter.cleanse_setting("REDIS_URL", "redis://:pw@h:6379/0") == "redis://********@h:6379/0"
    assert reporter.cleanse_setting("DATABASES", {"default": {"NAME": "postgres://u:p@h/db"}}) == {
        "default": {"NAME": "postgres://********@h/db"}}
    assert reporter.cleanse_setting("MQTT", {"DEVICE_PASSWORDS": "/etc/p"}) == {
        "DEVICE_PASSWORDS": reporter.cleansed_substitute}
    assert url_credentials_mask("see http://example.com/a@b") == "see http://example.com/a@b"


def test_a_pipelined_request_in_progress_has_no_header_deadline():
    """Twisted parses a pipelined request inside ``requestDone`` of the one before: the
    deadline must not be armed again while that next request is being served (it would
    abort the connection mid-request, or a WebSocket upgraded on it)."""
    from twisted.internet.testing import StringTransport
    from twisted.web import http

    from gateway.server import HeaderDeadlineChannel

    class Request(http.Request):
        def process(self):  # answered later, by the test
            pass

    channel = HeaderDeadlineChannel()
    channel.requestFactory = Request
    channel.makeConnection(StringTransport())
    try:
        assert channel in HeaderDeadlineChannel.reading_headers  # waiting for a request
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [r.path for r in channel.requests] == [b"/a"]  # /b waits in the buffer
        channel.requests[0].finish()  # /a done: Twisted parses /b now, inside requestDone
        assert [r.path for r in channel.requests] == [b"/b"]
        assert channel not in HeaderDeadlineChannel.reading_headers
        assert channel._deadline is None
        channel.requests[0].finish()  # /b done: waiting for the next request again
        assert channel in HeaderDeadlineChannel.reading_headers
    finally:
        channel.connectionLost(None)
    assert channel not in HeaderDeadlineChannel.reading_headers
