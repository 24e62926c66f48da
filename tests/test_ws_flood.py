"""One socket must not grow the gateway's memory or logs: every frame spends the
connection's budget, refused frames close it past a limit, replies share the send-backlog
limit, repeated warnings are counted. In process, then against a real ``gateway run``."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import websockets

from gateway.logging import LogSampler
from tests.helpers import HOSTS, chat, connect, next_message, raw_socket, recv


@pytest.fixture
def chat_app(settings):
    from gateway.asgi import application

    settings.ALLOWED_HOSTS = HOSTS
    return application


def test_log_sampler_logs_the_first_of_each_key_then_counts():
    sampler = LogSampler(first=2)
    assert [sampler.allow("a") for _ in range(5)] == [True, True, False, False, False]
    assert sampler.allow("b") and not sampler.last_logged("b")
    assert sampler.counted() == {"a": 3}


# --- the consumer's budget, in process -------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_every_frame_spends_the_flood_limit(chat_app, settings):
    settings.GATEWAY = {**settings.GATEWAY, "RATE_LIMIT_BURST": 3,
                        "RATE_LIMIT_PER_SECOND": 0.01, "WS_ERROR_LIMIT": 50}
    comm = chat(chat_app, "/ws/chat/budget/")
    assert (await comm.connect(timeout=5))[0]
    for _ in range(3):
        await comm.send_to(text_data=json.dumps({"type": "ping"}))
        assert await recv(comm) == {"type": "pong"}
    await comm.send_to(text_data=json.dumps({"type": "ping"}))
    assert (await recv(comm))["code"] == "rate_limited"
    await comm.disconnect()

    junk = chat(chat_app, "/ws/chat/budget/")  # refused frames spend it too
    assert (await junk.connect(timeout=5))[0]
    for _ in range(3):
        await junk.send_to(text_data="x")
        assert (await recv(junk))["code"] == "invalid_json"
    await junk.send_to(text_data=json.dumps({"message": "hi", "client_id": "c-1"}))
    refused = await recv(junk)
    assert (refused["code"], refused["client_id"]) == ("rate_limited", "c-1")
    await junk.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_too_many_refused_frames_close_the_socket_with_1008(chat_app, settings, caplog):
    settings.GATEWAY = {**settings.GATEWAY, "WS_ERROR_LIMIT": 8}
    other = chat(chat_app, "/ws/chat/junk/")
    assert (await other.connect(timeout=5))[0]
    comm = chat(chat_app, "/ws/chat/junk/")
    assert (await comm.connect(timeout=5))[0]
    kinds = ["x", b"\x00", json.dumps({"type": "shout"}), "{}"] * 2
    for frame in kinds:
        await comm.send_to(**({"bytes_data": frame} if isinstance(frame, bytes)
                              else {"text_data": frame}))
        assert (await recv(comm))["type"] == "error"
    await comm.send_to(text_data="x")
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 1008}
    await comm.wait(timeout=5)  # the consumer stopped by itself
    # the room is undisturbed
    await other.send_to(text_data=json.dumps({"message": "still here"}))
    assert (await recv(other))["message"] == "still here"
    await other.disconnect()
    lines = [r.getMessage() for r in caplog.records if r.name == "consumers.websocket"]
    assert sum(m.startswith("client error invalid_json") for m in lines) == 3
    assert "closing: more than 8 refused frames in a burst" in lines


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("runtime_stopped")
async def test_repeated_errors_are_logged_a_few_times_then_counted(chat_app, settings, caplog):
    settings.GATEWAY = {**settings.GATEWAY, "WS_ERROR_LIMIT": 50}
    comm = chat(chat_app, "/ws/chat/noisy/")
    assert (await comm.connect(timeout=5))[0]
    for _ in range(12):
        await comm.send_to(text_data="x")
        assert (await recv(comm))["code"] == "invalid_json"
    await comm.disconnect()
    lines = [r.getMessage() for r in caplog.records if r.name == "consumers.websocket"]
    assert sum(m.startswith("client error invalid_json") for m in lines) == 5
    assert lines.count(
        "client errors counted but not logged on this connection: {'invalid_json': 7}"
    ) == 1


# --- through a real gateway ------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Sample a process's RSS in a thread until stopped; the highest value seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stopped = pid, rss_mb(pid), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(5)


async def keep_chatting(ws, stop: asyncio.Event, latencies: list[float]) -> None:
    """A member of the room who posts every 0.25 s and times each message's round trip."""
    i = 0
    while not stop.is_set():
        started = time.monotonic()
        await ws.send(json.dumps({"message": f"ping {i}"}))
        frame = await next_message(ws, timeout=10)
        assert frame["message"] == f"ping {i}"
        latencies.append(time.monotonic() - started)
        i += 1
        await asyncio.sleep(0.25)


@pytest.mark.slow
async def test_a_flood_of_refused_frames_is_closed_early_and_costs_little(gateway_factory):
    gw = gateway_factory().start()  # the default limits: rate 5/s, burst 20, 20 refusals
    total = 200_000
    latencies: list[float] = []
    stop = asyncio.Event()
    async with connect(gw, "/ws/chat/flooded/?name=bystander") as bystander:
        chatting = asyncio.create_task(keep_chatting(bystander, stop, latencies))
        await asyncio.sleep(0.5)
        log_before = gw.log_path.stat().st_size
        lines_before = gw.log().count("\n")
        sent, started = 0, time.monotonic()
        with PeakRss(gw.proc.pid) as rss:
            baseline = rss.peak
            # The attacker never calls recv(); its library keeps at most 64 frames unread.
            async with websockets.connect(gw.ws("/ws/chat/flooded/"), origin=gw.origin,
                                          max_queue=64, open_timeout=10) as attacker:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while sent < total:
                        await attacker.send("x")
                        sent += 1
                        if sent % 100 == 0:
                            await asyncio.sleep(0)  # as a real client's loop would
                    await asyncio.wait_for(attacker.recv(), 10)
            closed_after = time.monotonic() - started
            await asyncio.sleep(1.0)  # the bystander keeps chatting after it
        stop.set()
        await asyncio.wait_for(chatting, 15)
    log_bytes = gw.log_path.stat().st_size - log_before
    log_lines = gw.log().count("\n") - lines_before
    growth = rss.peak - baseline
    print(f"closed after {sent} frames, {closed_after:.2f}s; RSS +{growth:.1f} MB; "
          f"log +{log_bytes} bytes, {log_lines} lines; bystander max {max(latencies):.2f}s")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert sent < 20_000 and closed_after < 10
    assert growth < 10, f"RSS grew {growth:.1f} MB"
    assert log_lines < 30 and log_bytes < 20_000
    assert "closing: more than 20 refused frames in a burst" in gw.log()
    assert len(latencies) >= 4 and max(latencies) < 3


@pytest.mark.slow
async def test_replies_nobody_reads_are_bounded_by_the_send_backlog(gateway_factory):
    gw = gateway_factory(env={
        "GATEWAY_RATE_LIMIT_PER_SECOND": "1000000", "GATEWAY_RATE_LIMIT_BURST": "1000000",
        "GATEWAY_WS_SEND_BUFFER_LIMIT": "65536",
    }).start()
    # Pongs (17 bytes each): ~10 MB of them, more than the kernel buffers on both ends
    # (tcp_wmem reaches 4 MiB) plus our 64 KiB. The client never reads.
    total, payload = 600_000, b'{"type":"ping"}'
    frame = bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # masked, zero key
    sock = raw_socket(gw, "/ws/chat/unread/", rcvbuf=4096)

    def flood() -> int:
        sent = 0
        try:
            while sent < total:
                sock.sendall(frame * 1000)
                sent += 1000
        except OSError:  # the server gave up on us: reset or broken pipe
            pass
        return sent

    try:
        with PeakRss(gw.proc.pid) as rss:
            baseline = rss.peak
            sent = await asyncio.wait_for(asyncio.to_thread(flood), 100)
    finally:
        sock.close()
    print(f"closed after {sent} pings; RSS +{rss.peak - baseline:.1f} MB")
    assert sent < total, "the server kept answering a client that does not read"
    assert "client fell behind" in gw.log()
    assert rss.peak - baseline < 20
