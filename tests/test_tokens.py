"""Connect tokens (JWT): verified with PyJWT for HS256 with a secret, RS256 with a public key
and ES256 with a JWKS fetched over HTTP from a local server; accepted by the WebSocket
(``?token=`` before accept, or the first frame after it) and by the event stream, refused
when expired, badly signed or for another room, with their codes; the socket closes when
its token expires. Last, the same through ``gateway run``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import threading
import time

import httpx
import jwt
import pytest
import websockets
from channels.routing import URLRouter
from channels.testing import ApplicationCommunicator, WebsocketCommunicator
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import access
from gateway.access import connect_token_verify
from gateway.errors import GatewayError
from gateway.routing import websocket_urlpatterns
from protocols.sse.adapter import SseAdapter
from tests.servers import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("runtime_stopped")]

SECRET = "a-connect-token-secret-of-at-least-32-characters"
ws_app = URLRouter(websocket_urlpatterns)
sse_app = URLRouter(SseAdapter("sse").http_stream_routes())


def mint(key=SECRET, algorithm="HS256", *, ttl: float = 300, headers=None, **claims) -> str:
    body = {"sub": "u-42", "name": "Ada (other site)", "exp": int(time.time() + ttl),
            **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key,
                      algorithm=algorithm, headers=headers)


@pytest.fixture
def hs256(settings):
    settings.JWT = {**settings.JWT, "SECRET": SECRET}


def rsa_keys() -> tuple[rsa.RSAPrivateKey, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


# --- verifying ------------------------------------------------------------------------------------


def code_of(token: str) -> str:
    with pytest.raises(GatewayError) as refused:
        connect_token_verify(token)
    return refused.value.code


def test_an_hs256_token_is_its_subject_on_the_web_with_its_rooms(hs256):
    identity = connect_token_verify(mint(rooms=["support-*", "lobby"]))
    assert identity.sender == {"protocol": "web", "id": "jwt:u-42", "name": "Ada (other site)"}
    assert identity.rooms == ("support-*", "lobby")
    assert identity.may_join("support-7") and not identity.may_join("staff")
    assert connect_token_verify(mint(rooms=None)).rooms is None
    with pytest.raises(GatewayError) as refused:
        access.token_room_check(identity, "staff")
    assert refused.value.code == "token_room"


def test_expired_badly_signed_and_malformed_tokens_are_refused(hs256):
    assert code_of(mint(ttl=-60)) == "token_expired"
    assert code_of(mint(key="another-secret-of-at-least-32-characters!")) == "token_invalid"
    assert code_of(mint(exp=None)) == "token_invalid"  # exp is required
    assert code_of(mint(sub=None)) == "token_invalid"
    assert code_of(mint(sub=42)) == "token_invalid"
    assert code_of(mint(rooms=["bad room"])) == "token_invalid"
    assert code_of("not.a.jwt") == "token_invalid"
    unsigned = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, None, algorithm="none")
    assert code_of(unsigned) == "token_invalid"


def test_a_public_key_is_never_taken_as_an_hmac_secret(settings):
    private, public = rsa_keys()
    settings.JWT = {**settings.JWT, "PUBLIC_KEY": public}
    assert connect_token_verify(mint(private, "RS256")).sender["id"] == "jwt:u-42"
    # The classic confusion: HS256 "signed" with the public key's text (made by hand:
    # PyJWT itself refuses to).
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(
        {"sub": "admin", "exp": int(time.time()) + 60}).encode())
    mac = hmac.new(public.encode(), signing.encode(), hashlib.sha256).digest()
    assert code_of(f"{signing}.{b64(mac)}") == "token_invalid"


def test_issuer_and_audience_are_checked_when_configured(settings):
    settings.JWT = {**settings.JWT, "SECRET": SECRET, "ISSUER": "https://shop.example",
                    "AUDIENCE": "gateway"}
    assert connect_token_verify(mint(iss="https://shop.example", aud="gateway"))
    assert code_of(mint(iss="https://evil.example", aud="gateway")) == "token_invalid"
    assert code_of(mint(iss="https://shop.example", aud="other")) == "token_invalid"


def test_no_token_is_accepted_when_none_is_configured():
    assert code_of(mint()) == "token_invalid"


class JwksServer:
    """A JWKS endpoint over HTTP on a free port, counting its requests."""

    def __init__(self, jwks: dict) -> None:
        self.jwks, self.requests = jwks, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                outer.requests += 1
                body = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"

    def __enter__(self) -> JwksServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_es256_token_is_checked_with_a_key_from_the_jwks(settings):
    access._jwks_client.cache_clear()
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    with JwksServer({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}]}) as jwks:
        settings.JWT = {**settings.JWT, "JWKS_URL": jwks.url}
        token = mint(private, "ES256", headers={"kid": "k1"})
        assert connect_token_verify(token).sender["id"] == "jwt:u-42"
        assert connect_token_verify(token).sender["id"] == "jwt:u-42"
        assert jwks.requests == 1  # the keys are cached
        unknown = mint(private, "ES256", headers={"kid": "rotated-away"})
        assert code_of(unknown) == "token_invalid"
        other = ec.generate_private_key(ec.SECP256R1())
        assert code_of(mint(other, "ES256", headers={"kid": "k1"})) == "token_invalid"
    access._jwks_client.cache_clear()


def test_an_unreachable_jwks_is_unavailable_not_the_clients_fault(settings):
    access._jwks_client.cache_clear()
    settings.JWT = {**settings.JWT, "JWKS_URL": f"http://127.0.0.1:{free_port()}/jwks"}
    private = ec.generate_private_key(ec.SECP256R1())
    assert code_of(mint(private, "ES256", headers={"kid": "k1"})) == "unavailable"
    access._jwks_client.cache_clear()


# --- on the WebSocket ---------------------------------------------------------------------------


async def socket(path: str) -> tuple[bool, int | str | None, WebsocketCommunicator]:
    comm = WebsocketCommunicator(ws_app, path)
    connected, code = await comm.connect(timeout=5)
    return connected, code, comm


async def recv(comm: WebsocketCommunicator) -> dict:
    return json.loads(await comm.receive_from(timeout=5))


async def test_a_token_in_the_query_joins_as_its_subject(hs256, settings):
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}  # a token is a login
    connected, _, comm = await socket(f"/ws/chat/lobby/?v=2&token={mint()}")
    assert connected
    presence = await recv(comm)
    assert presence["you"] == {"protocol": "web", "id": "jwt:u-42", "name": "Ada (other site)"}
    await comm.send_to(text_data=json.dumps({"message": "hello from the shop"}))
    frame = await recv(comm)
    assert frame["message"] == "hello from the shop" and frame["sender"]["id"] == "jwt:u-42"
    await comm.disconnect()


@pytest.mark.parametrize(("make", "code"), [
    (lambda: mint(ttl=-60), 4419),
    (lambda: mint(key="another-secret-of-at-least-32-characters!"), 4401),
    (lambda: mint(rooms=["support-*"]), 4403),
    (lambda: "garbage", 4401),
])
async def test_bad_tokens_in_the_query_are_refused_before_accept(hs256, make, code):
    connected, closed_with, comm = await socket(f"/ws/chat/lobby/?token={make()}")
    assert (connected, closed_with) == (False, code)


async def test_a_token_in_the_first_frame_keeps_it_out_of_the_url(hs256):
    connected, _, comm = await socket("/ws/chat/support-1/?auth=frame&v=2")
    assert connected
    await comm.send_to(text_data=json.dumps({"type": "auth", "token": mint(
        rooms=["support-*"])}))
    welcome = await recv(comm)
    assert welcome["type"] == "auth" and welcome["you"]["id"] == "jwt:u-42"
    assert welcome["expires"] > time.time()
    assert (await recv(comm))["type"] == "presence"
    await comm.send_to(text_data=json.dumps({"message": "hi"}))
    assert (await recv(comm))["sender"]["name"] == "Ada (other site)"
    await comm.disconnect()


@pytest.mark.parametrize(("first", "code"), [
    (lambda: {"type": "auth", "token": mint(ttl=-60)}, 4419),
    (lambda: {"type": "auth", "token": mint(rooms=["elsewhere"])}, 4403),
    (lambda: {"type": "auth", "token": "garbage"}, 4401),
    (lambda: {"message": "no auth first"}, 4401),
])
async def test_bad_first_frames_are_closed_with_their_code(hs256, first, code):
    connected, _, comm = await socket("/ws/chat/lobby/?auth=frame")
    assert connected
    await comm.send_to(text_data=json.dumps(first()))
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": code}


async def test_no_first_frame_in_time_is_closed(hs256, settings):
    settings.GATEWAY = {**settings.GATEWAY, "WS_HANDSHAKE_TIMEOUT": 0.5}
    connected, _, comm = await socket("/ws/chat/lobby/?auth=frame")
    assert connected
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_the_socket_closes_when_its_token_expires(hs256):
    connected, _, comm = await socket(f"/ws/chat/lobby/?token={mint(ttl=1.5)}")
    assert connected
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4419}


# --- on the event stream ------------------------------------------------------------------------


async def stream(path: str, *headers: tuple[bytes, bytes]) -> tuple[int, dict | bytes]:
    """The stream's status and its JSON error, or the first bytes of its body."""
    query = path.partition("?")[2].encode()
    comm = ApplicationCommunicator(sse_app, {
        "type": "http", "method": "GET", "path": path.partition("?")[0],
        "query_string": query, "headers": [(b"host", b"localhost"), *headers]})
    await comm.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await comm.receive_output(timeout=5)
    body = await comm.receive_output(timeout=5)
    await comm.send_input({"type": "http.disconnect"})
    await comm.wait(timeout=5)
    content = body["body"]
    return start["status"], json.loads(content) if start["status"] != 200 else content


async def test_the_event_stream_takes_a_token_in_the_query_or_the_header(hs256, settings):
    from channels.db import database_sync_to_async

    from gateway import services

    await database_sync_to_async(services.room_get_or_create)(room="lobby")
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}
    assert (await stream("/sse/rooms/lobby/"))[0] == 401
    status, body = await stream(f"/sse/rooms/lobby/?token={mint()}")
    assert status == 200 and body.startswith(b"retry:")
    status, _ = await stream("/sse/rooms/lobby/", (b"authorization", f"Bearer {mint()}".encode()))
    assert status == 200
    for token, expected in ((mint(ttl=-60), (401, "token_expired")),
                            (mint(key="another-secret-of-at-least-32-characters!"),
                             (401, "token_invalid")),
                            (mint(rooms=["support-*"]), (403, "token_room"))):
        status, body = await stream(f"/sse/rooms/lobby/?token={token}")
        assert (status, body["code"]) == expected


async def test_the_event_stream_takes_an_api_key_with_read(settings):
    from channels.db import database_sync_to_async

    from gateway import services

    await database_sync_to_async(services.room_get_or_create)(room="lobby")
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}
    _, reader = await database_sync_to_async(access.api_key_create)(name="r", scopes="read")
    _, poster = await database_sync_to_async(access.api_key_create)(name="p", scopes="post")
    assert (await stream("/sse/rooms/lobby/",
                         (b"authorization", f"Bearer {reader}".encode())))[0] == 200
    status, body = await stream("/sse/rooms/lobby/",
                                (b"authorization", f"Bearer {poster}".encode()))
    assert (status, body["code"]) == (403, "forbidden")
    status, body = await stream("/sse/rooms/lobby/", (b"authorization", b"Bearer gwk_no_no"))
    assert (status, body["code"]) == (401, "invalid_key")


# --- through gateway run ------------------------------------------------------------------------


@pytest.mark.slow
async def test_tokens_through_a_running_gateway(gateway_factory):
    private, public = rsa_keys()
    gw = gateway_factory(env={"GATEWAY_JWT_PUBLIC_KEY": public, "GATEWAY_REQUIRE_LOGIN": "1"})
    gw.start()
    token = mint(private, "RS256", rooms=["shop-*"])
    origin = {"origin": gw.origin}
    async with websockets.connect(gw.ws(f"/ws/chat/shop-1/?v=2&token={token}"),
                                  open_timeout=10, **origin) as ws:
        assert json.loads(await ws.recv())["you"]["id"] == "jwt:u-42"
        await ws.send(json.dumps({"message": "order shipped"}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "message":
            pass
        assert frame["sender"]["name"] == "Ada (other site)"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(gw.ws(f"/ws/chat/staff/?token={token}"),
                                      open_timeout=10, **origin):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(gw.ws("/ws/chat/shop-1/?auth=frame"), open_timeout=10,
                                  **origin) as ws:
        await ws.send(json.dumps({"type": "auth", "token": mint(private, "RS256", ttl=-60)}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd.code == 4419
    async with httpx.AsyncClient() as client:
        refused_stream = await client.get(f"{gw.http}/sse/rooms/shop-1/?token=garbage")
        assert refused_stream.status_code == 401
        async with client.stream("GET", f"{gw.http}/sse/rooms/shop-1/?after=0&token={token}",
                                 timeout=httpx.Timeout(10, read=10)) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    assert json.loads(line[5:])["message"] == "order shipped"
                    break
        # The history API takes the token too (login is required here).
        assert (await client.get(f"{gw.http}/api/rooms/shop-1/messages")).status_code == 401
        history = await client.get(f"{gw.http}/api/rooms/shop-1/messages",
                                   headers={"Authorization": f"Bearer {token}"})
        assert [m["message"] for m in history.json()["messages"]] == ["order shipped"]
