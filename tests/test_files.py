"""Attachments through the HTTP API and Django's test client: what is taken and what is
refused (type from the bytes, allow-list, sizes, polyglots, SVG and HTML, decompression bombs,
names), thumbnails without metadata, signed URLs (expiry, tampering), how files are served,
login-required mode, and files going with their message (delete, retention, repeats)."""

from __future__ import annotations

import io
import time
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest
from asgiref.sync import async_to_sync
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from gateway import access, files, services
from gateway.models import Attachment, Message

pytestmark = pytest.mark.django_db


def png(width=64, height=48, color=(200, 30, 30), mode="RGB", **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, "PNG", **save)
    return out.getvalue()


def jpeg_with_exif(width=640, height=480) -> bytes:
    image = Image.new("RGB", (width, height), (10, 120, 200))
    exif = Image.Exif()
    exif[0x010F] = "SpyCam Inc"  # Make
    exif[0x0131] = "secret-software"  # Software
    exif[0x0112] = 6  # shown turned a quarter: 480x640
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("P", (10, 10), 1).save(out, "GIF")
    return out.getvalue()


def make_key(scopes="read,post", rooms="") -> str:
    return access.api_key_create(name="camera", scopes=scopes, rooms=rooms)[1]


def upload(client, key, *parts, room="lobby", **fields):
    data = {**fields, "file": [SimpleUploadedFile(name, body, content_type=kind)
                               for name, body, kind in parts]}
    return client.post(f"/api/rooms/{room}/messages", data=data,
                       HTTP_AUTHORIZATION=f"Bearer {key}")


def fetch(client, url: str, **headers):
    return client.get(url, **headers)


def body_of(response) -> bytes:
    if not response.streaming:
        return response.content

    async def join() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(join)()


# --- what is taken ------------------------------------------------------------------------------


def test_an_image_with_a_caption_is_stored_with_its_size_and_a_thumbnail(client):
    key = make_key()
    answer = upload(client, key, ("snap.png", png(), "image/png"), message="the door",
                    client_id="snap-1")
    assert answer.status_code == 201, answer.content
    body = answer.json()
    assert body["message"] == "the door" and body["duplicate"] is False
    (attachment,) = body["attachments"]
    assert (attachment["name"], attachment["type"], attachment["size"], attachment["width"],
            attachment["height"]) == ("snap.png", "image/png", len(png()), 64, 48)
    assert attachment["url"].startswith(f"/files/{attachment['id']}/snap.png?expires=")
    assert attachment["thumbnail_url"].startswith(f"/files/{attachment['id']}/thumbnail?")
    # The history shows it the same way, and the log keeps it on the message's row.
    history = client.get("/api/rooms/lobby/messages").json()["messages"]
    assert history[-1]["attachments"][0]["id"] == attachment["id"]
    row = Attachment.objects.get(key=attachment["id"])
    assert (row.state, row.room, row.seq) == (Attachment.ATTACHED, "lobby", body["id"])
    served = fetch(client, attachment["url"])
    assert served.status_code == 200
    assert body_of(served) == png()
    assert served["Content-Type"] == "image/png"
    assert served["Content-Disposition"].startswith("inline")
    assert served["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in served["Content-Security-Policy"]
    thumb = fetch(client, attachment["thumbnail_url"])
    assert thumb.status_code == 200 and thumb["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body_of(thumb))).size == (64, 48)  # never enlarged


def test_a_file_without_a_message_and_several_files_in_one(client):
    key = make_key()
    answer = upload(client, key, ("a.png", png(), "image/png"),
                    ("notes.txt", b"line one\nline two\n", "text/plain"),
                    ("report.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n%%EOF\n",
                     "application/pdf"))
    assert answer.status_code == 201, answer.content
    body = answer.json()
    assert body["message"] == ""
    assert [(a["name"], a["type"]) for a in body["attachments"]] == [
        ("a.png", "image/png"), ("notes.txt", "text/plain"), ("report.pdf", "application/pdf")]
    assert body["attachments"][1]["thumbnail_url"] is None
    text = fetch(client, body["attachments"][1]["url"])
    assert text["Content-Type"] == "text/plain; charset=utf-8"
    assert text["Content-Disposition"] == 'attachment; filename="notes.txt"'
    pdf = fetch(client, body["attachments"][2]["url"])
    assert pdf["Content-Disposition"].startswith("attachment")


def test_the_thumbnail_is_turned_upright_and_keeps_no_metadata(client):
    data = jpeg_with_exif()
    assert b"SpyCam" in data
    body = upload(client, make_key(), ("IMG_0001.JPG", data, "image/jpeg")).json()
    (attachment,) = body["attachments"]
    assert (attachment["width"], attachment["height"]) == (480, 640)  # as it is shown
    thumb = body_of(fetch(client, attachment["thumbnail_url"]))
    assert b"SpyCam" not in thumb and b"secret-software" not in thumb
    image = Image.open(io.BytesIO(thumb))
    assert image.size == (240, 320) and not image.getexif()


def test_the_type_is_read_from_the_bytes_and_the_name_follows_it(client):
    key = make_key()
    body = upload(client, key, ("holiday.txt", png(), "text/plain")).json()
    (attachment,) = body["attachments"]
    assert (attachment["type"], attachment["name"]) == ("image/png", "holiday.txt.png")


@pytest.mark.parametrize(("raw", "expected"), [
    ("../../etc/passwd.png", "passwd.png"),
    ("..\\..\\windows\\system32\\evil.png", "evil.png"),
    ("/abs/path/x.png", "x.png"),
    (".hidden.png", "hidden.png"),
    ("photo\u202egnp.exe.png", "photognp.exe.png"),  # no bidi override
    ("a\x00b\r\n.png", "ab.png"),
    ('what?<>:"|*.png', "what_______.png"),
    ("", "file-ABCDEFGH.png"),
    ("..", "file-ABCDEFGH.png"),
    ("x" * 300 + ".png", "x" * 116 + ".png"),
    ("report.PNG", "report.PNG"),
])
def test_names_are_sanitised(raw, expected):
    assert files.name_clean(raw, "png", "ABCDEFGHIJ", "image/png") == expected


def test_a_path_traversal_name_never_reaches_the_storage(client, attachment_storage):
    body = upload(client, make_key(), ("../../../../tmp/pwned.png", png(), "image/png")).json()
    assert body["attachments"][0]["name"] == "pwned.png"
    kept = sorted(path.relative_to(attachment_storage).as_posix()
                  for path in attachment_storage.rglob("*") if path.is_file())
    key = body["attachments"][0]["id"]
    assert kept == sorted([f"{key[:2]}/{key}.png", f"{key[:2]}/{key}.thumb.jpg"])


# --- what is refused ----------------------------------------------------------------------------


def refused(answer, status: int, code: str) -> None:
    assert answer.status_code == status, answer.content
    assert answer.json()["code"] == code


def test_a_type_outside_the_allow_list_is_refused(client):
    zipped = b"PK\x03\x04" + b"\x00" * 40
    refused(upload(client, make_key(), ("x.zip", zipped, "application/zip")),
            415, "unsupported_type")
    refused(upload(client, make_key(), ("x.bin", b"\x00\x01\x02\xff" * 10,
                                        "application/octet-stream")), 415, "unsupported_type")
    assert not Attachment.objects.exists() and not Message.objects.exists()


def test_html_and_svg_are_refused_whatever_they_are_called(client):
    key = make_key()
    svg = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">'
           b"<script>alert(document.cookie)</script></svg>")
    refused(upload(client, key, ("cute.svg", svg, "image/svg+xml")), 415, "unsupported_type")
    refused(upload(client, key, ("cute.png", svg, "image/png")), 415, "unsupported_type")
    html = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
    refused(upload(client, key, ("page.txt", html, "text/plain")), 415, "unsupported_type")
    refused(upload(client, key, ("page.png", b"  \n<html><script>x</script>", "image/png")),
            415, "unsupported_type")
    assert files.content_type_detect(svg) == "image/svg+xml"
    assert files.content_type_detect(html) == "text/html"


def test_a_polyglot_image_with_markup_is_refused(client):
    # A real GIF that a browser sniffing it could also take for HTML.
    polyglot = gif() + b"<html><body><script>alert(document.domain)</script></body></html>"
    assert Image.open(io.BytesIO(polyglot)).size == (10, 10)
    refused(upload(client, make_key(), ("funny.gif", polyglot, "image/gif")),
            415, "unsafe_content")


def test_an_image_that_does_not_decode_is_refused(client):
    broken = png()[:60] + b"\x00" * 200
    refused(upload(client, make_key(), ("broken.png", broken, "image/png")),
            400, "invalid_image")
    fake_jpeg = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20
    refused(upload(client, make_key(), ("fake.jpg", fake_jpeg, "image/jpeg")),
            400, "invalid_image")


def test_a_decompression_bomb_is_refused_before_it_is_decoded(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "FILE_MAX_PIXELS": 10_000_000}
    bomb = png(20_000, 20_000, 0, mode="1")  # 400 Mpx in a few kilobytes
    assert len(bomb) < 100_000
    refused(upload(client, make_key(), ("bomb.png", bomb, "image/png")), 413, "image_too_large")
    # A PNG whose header claims the size without the pixels behind it: refused the same.
    header = png(10, 10)
    ihdr = (b"IHDR" + (60_000).to_bytes(4, "big") + (60_000).to_bytes(4, "big")
            + header[24:29])
    forged = (header[:8] + (13).to_bytes(4, "big") + ihdr
              + zlib.crc32(ihdr).to_bytes(4, "big") + header[33:])
    refused(upload(client, make_key(), ("claims.png", forged, "image/png")),
            413, "image_too_large")


def test_sizes_and_counts_are_limited(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "FILE_MAX_BYTES": 2000, "FILE_MAX_COUNT": 2,
                        "FILE_MAX_MESSAGE_BYTES": 3000}
    key = make_key()
    refused(upload(client, key, ("big.txt", b"a" * 2001, "text/plain")), 413, "file_too_large")
    refused(upload(client, key, *[(f"{i}.txt", b"hi", "text/plain") for i in range(3)]),
            413, "too_many_files")
    refused(upload(client, key, ("1.txt", b"a" * 1600, "text/plain"),
                   ("2.txt", b"b" * 1600, "text/plain")), 413, "file_too_large")
    refused(upload(client, key, ("empty.txt", b"", "text/plain")), 400, "empty_file")
    assert upload(client, key, ("ok.txt", b"a" * 2000, "text/plain")).status_code == 201


def test_files_go_in_file_parts(client):
    answer = client.post("/api/rooms/lobby/messages", HTTP_AUTHORIZATION=f"Bearer {make_key()}",
                         data={"image": SimpleUploadedFile("a.png", png(), "image/png")})
    refused(answer, 400, "invalid_form")


def test_a_refused_message_keeps_none_of_its_files(client, attachment_storage):
    key = make_key(rooms="lobby")
    refused(upload(client, key, ("a.png", png(), "image/png"), room="elsewhere"),
            403, "forbidden")
    answer = upload(client, key, ("a.png", png(), "image/png"), ("x.zip", b"PK\x03\x04" * 9,
                                                                  "application/zip"))
    refused(answer, 415, "unsupported_type")
    services.room_get_or_create(room="lobby")
    services.room_close(room="lobby")
    refused(upload(client, key, ("a.png", png(), "image/png")), 409, "room_closed")
    assert not Attachment.objects.exists()
    assert not [path for path in attachment_storage.rglob("*") if path.is_file()]


def test_a_repeated_client_id_keeps_the_first_files_only(client, attachment_storage):
    key = make_key()
    first = upload(client, key, ("a.png", png(), "image/png"), client_id="k1").json()
    again = upload(client, key, ("b.png", png(color=(0, 0, 0)), "image/png"), client_id="k1")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["attachments"][0]["id"] == first["attachments"][0]["id"]
    assert Attachment.objects.count() == 1
    assert len([path for path in attachment_storage.rglob("*") if path.is_file()]) == 2


# --- signed URLs --------------------------------------------------------------------------------


def test_a_url_expires_and_cannot_be_altered(client, settings):
    settings.GATEWAY = {**settings.GATEWAY, "FILE_URL_TTL": 3600}
    body = upload(client, make_key(), ("a.png", png(), "image/png")).json()
    url = body["attachments"][0]["url"]
    path, query = urlsplit(url).path, parse_qs(urlsplit(url).query)
    expires, signature = query["expires"][0], query["signature"][0]
    assert 3600 <= int(expires) - time.time() <= 3600 + 450
    assert fetch(client, url).status_code == 200
    later = str(int(expires) + 10)
    refused(fetch(client, f"{path}?expires={later}&signature={signature}"),
            403, "invalid_signature")
    altered = ("B" if signature[0] == "A" else "A") + signature[1:]
    refused(fetch(client, f"{path}?expires={expires}&signature={altered}"),
            403, "invalid_signature")
    refused(fetch(client, path), 403, "invalid_signature")
    # The file's URL is not its thumbnail's, nor another file's.
    thumb = urlsplit(body["attachments"][0]["thumbnail_url"]).path
    refused(fetch(client, f"{thumb}?expires={expires}&signature={signature}"),
            403, "invalid_signature")
    other = upload(client, make_key(), ("b.png", png(), "image/png")).json()["attachments"][0]
    refused(fetch(client, f"/files/{other['id']}/b.png?expires={expires}&signature={signature}"),
            403, "invalid_signature")
    # Signed properly but past its time.
    attachment = body["attachments"][0]
    old = files.file_url({**attachment, "thumbnail": True}, now=time.time() - 3 * 3600,
                         absolute=False)
    refused(fetch(client, old), 403, "url_expired")
    with pytest.raises(files.GatewayError) as expired:
        files.signature_check(variant="file", key=attachment["id"],
                              expires=query["expires"][0], signature=signature,
                              now=int(expires) + 1)
    assert expired.value.code == "url_expired"


def test_urls_made_within_a_step_are_the_same_and_absolute_with_the_public_url(settings):
    settings.GATEWAY = {**settings.GATEWAY, "FILE_URL_TTL": 800,
                        "PUBLIC_URL": "https://chat.example.com"}
    attachment = {"id": "A" * 22, "name": "a b.png", "type": "image/png", "size": 1,
                  "width": 1, "height": 1, "thumbnail": True}
    first = files.file_url(attachment, now=1_000_000)
    assert first == files.file_url(attachment, now=1_000_050)
    assert first.startswith("https://chat.example.com/files/AAAAAAAAAAAAAAAAAAAAAA/a%20b.png?")
    assert first != files.file_url(attachment, now=1_000_200)
    assert files.file_url(attachment, now=1_000_000, absolute=False).startswith("/files/")


def test_login_required_files_need_a_login_or_a_key(client, settings, django_user_model):
    body = upload(client, make_key(), ("a.png", png(), "image/png")).json()
    url = body["attachments"][0]["url"]
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}
    refused(fetch(client, url), 401, "login_required")
    assert fetch(client, url, HTTP_AUTHORIZATION=f"Bearer {make_key('read')}").status_code == 200
    refused(fetch(client, url, HTTP_AUTHORIZATION=f"Bearer {make_key('read', 'other')}"),
            403, "forbidden")
    user = django_user_model.objects.create_user("alice", password="pw-alice-1")
    client.force_login(user)
    assert fetch(client, url).status_code == 200


def test_a_conditional_request_and_head(client):
    attachment = upload(client, make_key(), ("a.png", png(), "image/png")).json()[
        "attachments"][0]
    served = fetch(client, attachment["url"])
    again = fetch(client, attachment["url"], HTTP_IF_NONE_MATCH=served["ETag"])
    assert again.status_code == 304 and again["X-Content-Type-Options"] == "nosniff"
    head = client.head(attachment["url"])
    assert head.status_code == 200 and head["Content-Length"] == str(len(png()))
    assert client.post(attachment["url"]).status_code == 405


# --- files go with their message -----------------------------------------------------------------


def files_in(folder) -> list:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_deleting_the_message_removes_its_files(client, attachment_storage,
                                                django_capture_on_commit_callbacks):
    key = make_key()
    body = upload(client, key, ("a.png", png(), "image/png")).json()
    url = body["attachments"][0]["url"]
    assert len(files_in(attachment_storage)) == 2
    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"/api/rooms/lobby/messages/{body['id']}",
                             HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
    refused(fetch(client, url), 404, "not_found")
    assert files_in(attachment_storage) == [] and not Attachment.objects.exists()
    page = client.get("/api/rooms/lobby/messages").json()["messages"]
    assert page[-1]["deleted"] is True and page[-1]["attachments"] == []


def test_retention_removes_files_with_their_messages(client, attachment_storage,
                                                     django_capture_on_commit_callbacks):
    key = make_key()
    old = upload(client, key, ("old.png", png(), "image/png")).json()
    new = upload(client, key, ("new.png", png(color=(1, 2, 3)), "image/png")).json()
    with django_capture_on_commit_callbacks(execute=True):
        services.room_prune(room="lobby", upto=old["id"])
    assert Attachment.objects.get().key == new["attachments"][0]["id"]
    refused(fetch(client, old["attachments"][0]["url"]), 404, "not_found")
    assert fetch(client, new["attachments"][0]["url"]).status_code == 200
    assert len(files_in(attachment_storage)) == 2


def test_files_whose_message_never_came_are_swept(attachment_storage):
    sender = services.SYSTEM_SENDER
    kept = files.attachments_store(room="lobby", sender=sender,
                                   uploads=[files.Upload.of_bytes(png(), name="a.png")])
    assert Attachment.objects.get().state == Attachment.PENDING
    assert files.attachments_sweep() == 0  # not old enough
    assert files.attachments_sweep(now=time.time() + files.PENDING_TTL + 1) == 1
    assert not Attachment.objects.exists() and files_in(attachment_storage) == []
    # Too late: the message is stored, without the file being served.
    event, _ = services.room_message_post(room="lobby", text="late", sender=sender, origin="",
                                          attachments=kept)
    assert files.attachment_row(kept[0]["id"]) is None


def test_group_commit_stores_and_links_files():
    sender = services.SYSTEM_SENDER
    posts = []
    for index in range(3):
        kept = files.attachments_store(room=f"room-{index % 2}", sender=sender, uploads=[
            files.Upload.of_bytes(f"note {index}\n".encode(), name=f"n{index}.txt")])
        posts.append(services.Post(room=f"room-{index % 2}", text="", sender=sender,
                                   origin="", attachments=tuple(kept)))
    posts.append(services.Post(room="room-0", text="plain", sender=sender, origin=""))
    results = services.room_messages_post(posts=posts)
    assert all(isinstance(result, tuple) and result[1] for result in results)
    for post, (event, _) in zip(posts, results, strict=True):
        assert event["attachments"] == list(post.attachments)
        for item in post.attachments:
            row = Attachment.objects.get(key=item["id"])
            assert (row.state, row.room, row.seq) == (Attachment.ATTACHED, event["room"],
                                                      event["id"])
    stored = Message.objects.get(room__name="room-1", seq=1)
    assert stored.attachments == list(posts[1].attachments)


def test_a_photo_with_xmp_metadata_is_not_a_polyglot(client):
    xmp = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><?xml version="1.0"?>'
           b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
           b'02/22-rdf-syntax-ns#"><rdf:Description/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(out, "JPEG", xmp=xmp)
    assert b"x:xmpmeta" in out.getvalue()
    answer = upload(client, make_key(), ("edited.jpg", out.getvalue(), "image/jpeg"))
    assert answer.status_code == 201, answer.content
    assert answer.json()["attachments"][0]["type"] == "image/jpeg"


# --- an anonymous visitor's page -----------------------------------------------------------------


def test_a_visitors_page_posts_files_as_the_visitor_its_socket_is(settings):
    from django.test import Client

    services.room_get_or_create(room="lobby")
    page = Client(enforce_csrf_checks=True)
    page.get("/chat/lobby/")  # the page sets the CSRF cookie
    token = page.cookies["csrftoken"].value
    form = {"message": "look", "uid": "browser-secret-1", "name": "alice",
            "file": SimpleUploadedFile("a.png", png(), "image/png")}
    answer = page.post("/api/rooms/lobby/messages", data=form, HTTP_X_CSRFTOKEN=token)
    assert answer.status_code == 201, answer.content
    assert answer.json()["sender"] == {"protocol": "web",
                                       "id": access.anonymous_id("browser-secret-1"),
                                       "name": "alice"}
    # Not without the page's CSRF token (another site's form could post as the visitor).
    form["file"] = SimpleUploadedFile("a.png", png(), "image/png")
    refused(page.post("/api/rooms/lobby/messages", data=form), 403, "csrf_failed")
    # Only in a room that exists: a visitor's id is its own to choose.
    form["file"] = SimpleUploadedFile("a.png", png(), "image/png")
    refused(page.post("/api/rooms/new-room/messages", data=form, HTTP_X_CSRFTOKEN=token),
            404, "room_not_found")
    # Nor when login is required, nor anything but posting.
    settings.GATEWAY = {**settings.GATEWAY, "REQUIRE_LOGIN": True}
    form["file"] = SimpleUploadedFile("a.png", png(), "image/png")
    refused(page.post("/api/rooms/lobby/messages", data=form, HTTP_X_CSRFTOKEN=token),
            401, "unauthorized")
    assert Attachment.objects.count() == 1


def test_programs_get_absolute_urls_and_pages_paths(client, settings, django_user_model):
    settings.GATEWAY = {**settings.GATEWAY, "PUBLIC_URL": "https://chat.example.com"}
    key = make_key()
    posted = upload(client, key, ("a.png", png(), "image/png")).json()
    assert posted["attachments"][0]["url"].startswith("https://chat.example.com/files/")
    by_key = client.get("/api/rooms/lobby/messages", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert by_key.json()["messages"][0]["attachments"][0]["url"].startswith("https://")
    client.force_login(django_user_model.objects.create_user("bob", password="pw-bob-123"))
    by_page = client.get("/api/rooms/lobby/messages").json()["messages"][0]["attachments"][0]
    assert by_page["url"].startswith("/files/") and by_page["thumbnail_url"].startswith("/files/")
