"""What the gateway holds per socket: the inbox, the protocol class, presence's writes."""

from __future__ import annotations

import asyncio

import pytest

from gateway.server import GatewayWebSocketProtocol, ScopeInbox, websocket_protocol_for


async def test_the_inbox_hands_events_over_in_order_and_wakes_its_reader():
    inbox = ScopeInbox()
    inbox.put_nowait({"n": 1})
    inbox.put_nowait({"n": 2})
    assert [await inbox.get(), await inbox.get()] == [{"n": 1}, {"n": 2}]
    reading = asyncio.create_task(inbox.get())
    await asyncio.sleep(0.01)
    assert not reading.done()
    inbox.put_nowait({"n": 3})
    assert await asyncio.wait_for(reading, 1) == {"n": 3}
    assert inbox.qsize() == 0


async def test_a_cancelled_read_loses_nothing_and_a_second_reader_is_refused():
    inbox = ScopeInbox()
    reading = asyncio.create_task(inbox.get())
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="one reader"):
        await inbox.get()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    inbox.put_nowait("kept")  # nobody waiting: kept for the next read
    assert await asyncio.wait_for(inbox.get(), 1) == "kept"


def test_a_factory_s_options_are_shared_by_its_connections_as_class_attributes():
    from daphne.ws_protocol import WebSocketFactory

    factory = WebSocketFactory(None)
    factory.setProtocolOptions(failByDrop=False, maxFramePayloadSize=4096)
    protocol_class = websocket_protocol_for(factory)
    assert issubclass(protocol_class, GatewayWebSocketProtocol)
    assert protocol_class.failByDrop is False and protocol_class.maxFramePayloadSize == 4096
    assert set(GatewayWebSocketProtocol.OPTIONS) <= set(vars(protocol_class))
    # A function option is called as the factory's would be, not as a method.
    accept = protocol_class.perMessageCompressionAccept
    instance = protocol_class.__new__(protocol_class)
    assert instance.perMessageCompressionAccept is accept
    assert protocol_class.CONFIG_ATTRS == ()  # nothing left for autobahn to copy or print


def test_presence_gathers_changes_longer_as_a_process_holds_more_members():
    from gateway import presence

    tracker = presence.PresenceTracker("p", single_process=True)
    assert tracker.flush_delay() == presence.FLUSH_DELAY  # a small process: as before
    for n in range(presence.FLUSH_ENTRIES * 2):
        tracker.add(scope=f"s{n}", room="r", protocol="web", member_id=f"m{n}", name="n")
    assert tracker.flush_delay() == presence.FLUSH_DELAY * 2
    for n in range(presence.FLUSH_ENTRIES * 2, presence.FLUSH_ENTRIES * 20):
        tracker.add(scope=f"s{n}", room="r", protocol="web", member_id=f"m{n}", name="n")
    assert tracker.flush_delay() == presence.FLUSH_DELAY_MAX


def test_a_socket_open_then_closed_still_logs_its_path():
    """What the handshake needed is let go once open, but daphne's close reads the
    request's path: the close must run whole (autobahn counts connections after it)."""
    from types import SimpleNamespace

    from daphne.ws_protocol import WebSocketFactory

    logged = []
    server = SimpleNamespace(protocol_disconnected=lambda protocol: None,
                             log_action=lambda *args: logged.append(args))
    protocol = websocket_protocol_for(WebSocketFactory(None)).__new__(
        websocket_protocol_for(WebSocketFactory(None)))
    protocol.__dict__.update(server=server, client_addr=["127.0.0.1", 5], muted=False,
                             application_queue=ScopeInbox(),
                             request=SimpleNamespace(path="/ws/chat/r/"),
                             http_request_data=b"GET ...", http_headers={"host": "x"})
    protocol.handshake_forget()
    assert "http_request_data" not in vars(protocol) and "http_headers" not in vars(protocol)
    protocol.onClose(True, 1000, "")
    assert logged and logged[0][2]["path"] == "/ws/chat/r/"
