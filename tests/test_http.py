"""Pages and the JSON history API through Django's test client."""

from __future__ import annotations

import pytest

from gateway import events
from gateway.services import room_message_post

pytestmark = pytest.mark.django_db

SENDER = events.sender(protocol="web", id="anon:abc", name="<b>alice</b>")


def post(room: str, n: int) -> None:
    for i in range(n):
        room_message_post(room=room, text=f"<img src=x onerror=alert({i})>", sender=SENDER,
                          origin="test")


def test_history_pages_by_id(client):
    post("lobby", 7)
    first = client.get("/api/rooms/lobby/messages?after=0&limit=3").json()
    assert [m["id"] for m in first["messages"]] == [1, 2, 3]
    assert first["next_after"] == 3 and first["last_id"] == 7
    rest = client.get("/api/rooms/lobby/messages?after=3&limit=10").json()
    assert [m["id"] for m in rest["messages"]] == [4, 5, 6, 7]
    assert rest["next_after"] is None
    newest = client.get("/api/rooms/lobby/messages?limit=2").json()
    assert [m["id"] for m in newest["messages"]] == [6, 7]
    assert newest["messages"][0] == {
        "id": 6, "room": "lobby", "message": "<img src=x onerror=alert(5)>",
        "sender": {"protocol": "web", "id": "anon:abc", "name": "<b>alice</b>"},
        "ts": newest["messages"][0]["ts"], "client_id": None,
        "reply_to": None, "edited_at": None, "reactions": {}, "attachments": [], "deleted": False,
    }


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("/api/rooms/bad%20room/messages", "invalid_room"),
        ("/api/rooms/lobby/messages?after=x", "invalid_query"),
        ("/api/rooms/lobby/messages?limit=0", "invalid_query"),
        ("/api/rooms/lobby/messages?limit=100000", "invalid_query"),
        ("/api/rooms/lobby/messages?after=-4", "invalid_query"),
    ],
)
def test_history_refuses_bad_queries(client, url, code):
    response = client.get(url)
    assert response.status_code == 400
    assert response.json()["code"] == code


def test_room_list_and_index_page(client):
    post("alpha", 1)
    post("beta", 2)
    rooms = client.get("/api/rooms/").json()["rooms"]
    assert [(r["name"], r["last_id"], r["members"]) for r in rooms] == [
        ("beta", 2, 0), ("alpha", 1, 0)
    ]
    assert [r["name"] for r in client.get("/api/rooms/?limit=1").json()["rooms"]] == ["beta"]
    assert client.get("/api/rooms/?limit=0").status_code == 400
    page = client.get("/")
    assert page.status_code == 200
    assert b'href="/chat/alpha/"' in page.content


def test_join_form_redirects_or_explains(client):
    assert client.get("/?room=new-room").url == "/chat/new-room/"
    bad = client.get("/?room=no+spaces")
    assert bad.status_code == 400 and b"Invalid room name" in bad.content


def test_chat_page_escapes_the_room_and_refuses_bad_names(client):
    assert client.get("/chat/lobby/").status_code == 200
    assert client.get("/chat/%3Cscript%3E/").status_code == 404


def test_login_can_be_required_for_pages_and_api(client, settings, django_user_model):
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}
    assert client.get("/chat/lobby/").url.startswith("/accounts/login/")
    assert client.get("/api/rooms/").status_code == 401
    django_user_model.objects.create_user("dora", password="pw-12345-x")
    client.login(username="dora", password="pw-12345-x")
    assert client.get("/chat/lobby/").status_code == 200


@pytest.mark.django_db(transaction=True)  # /readyz reaches the database from its own thread
def test_probes_answer_whatever_the_host_and_the_site_does_not(client, settings):
    settings.ALLOWED_HOSTS = ["chat.example.com"]
    for path in ("/healthz", "/readyz"):  # Kubernetes and Docker call the pod's address
        response = client.get(path, HTTP_HOST="10.0.0.5:8000")
        assert response.status_code == 200, (path, response.content)
    assert client.get("/readyz", HTTP_HOST="10.0.0.5").json()["checks"]["database"]["ready"]
    assert client.get("/api/rooms/", HTTP_HOST="10.0.0.5:8000").status_code == 400
    assert client.get("/api/rooms/", HTTP_HOST="chat.example.com").status_code == 200
