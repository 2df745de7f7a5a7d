"""Interop with third-party clients, and a log that explains a client (issue 30).

RFC 8621 §4.1.4 (bodyStructure is the full MIME structure: a multipart part's children
are its subParts; a message/rfc822 part is a leaf) against §4.2 (the default
bodyProperties, which leave subParts out): Email/get and Email/parse without
bodyProperties give the whole tree, every node with exactly the §4.2 default part
properties plus subParts, while textBody, htmlBody and attachments keep the §4.2 list;
an explicit bodyProperties is honoured exactly. RFC 8620 §7 (push: §7.2 PushSubscription
url, keys and verificationCode; §7.3 EventSource; with RFC 8887 for WebSockets): a
refused push connection leaves one log line naming the user, the client's address and
the cap (--max-push-connections, --max-event-streams, --max-websockets); `serve
--log-requests` logs each JMAP request and response, cut at 4096 characters, with push
URLs, keys and verification codes hidden, message text reduced to its length, and the
password, app passwords (Basic, Bearer, ?access_token=) and push keys never written.
Shutdown: two SIGTERM/SIGINT signals 1 ms apart end `serve` with status 0, 20 times
in a row; so does a train of signals microseconds apart, some of which land while an
earlier one's handler runs (a handler that took a lock, Event.set, deadlocked there);
and signals that go on until the process is gone leave its status 0.

Everything is checked from outside against real `jmapd.py serve` processes: HTTP with
`requests`, EventSource streams with http.client, WebSockets as raw sockets, Web Push
to an HTTP receiver in this process and decrypted with the `cryptography` package (a
fresh P-256 key), signals with os.kill, and the server's log file as an operator reads
it. Each test that needs particular options starts a server of its own on 127.0.0.1.
"""

import base64
import json
import os
import signal
import socket
import subprocess
import time
from urllib.parse import quote

import pytest
import requests

from conftest import CORE, MAIL, PASSWORD, Client, Server, add_user, run_cli
from test_mime import download, inbox_id, upload
from test_push import EventStream, event_source_url
from test_push_subscription import Receiver, UserAgentKeys, webpush_decrypt
from test_thread import unique
from test_websocket import WsServer, frame, raw_handshake, read_message

SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
WAIT_S = 10  # a log line or a push must come within this, however slow the host
EXIT_S = 15  # `serve` must end within this after SIGTERM (idle: it needs well under 1 s)
LOG_CUT = 4096  # --log-requests: the longest request or response written
# RFC 8621 §4.2: the default bodyProperties
DEFAULT_BODY_PROPERTIES = ["partId", "blobId", "size", "name", "type", "charset",
                           "disposition", "cid", "language", "location"]


# =============================================================================
# Helpers
# =============================================================================


def new_server(tmp_path, *options, cls=Server):
    data_dir = tmp_path / f"data-{unique('d')}"
    add_user(data_dir, "first@example.com")
    return cls(data_dir, *options).start()


def new_user(server, name="interop", password=PASSWORD) -> Client:
    username = f"{unique(name)}@example.com"
    add_user(server.data_dir, username, password)
    return Client(server.url, username, password)


def app_password(server, username) -> str:
    """`jmapd.py user token add USER LABEL` prints the new app password on one line."""
    done = run_cli("user", "token", "add", username, unique("device"), data_dir=server.data_dir)
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    return lines[0]


def log_lines(server, *needles) -> list:
    """The lines of the server's log holding every one of the needles."""
    return [line for line in server.log().splitlines() if all(n in line for n in needles)]


def wait_for_lines(server, *needles, timeout=WAIT_S) -> list:
    deadline = time.monotonic() + timeout
    while True:
        found = log_lines(server, *needles)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def compact(obj) -> str:
    """JSON as jmapd writes it: no spaces, UTF-8 kept."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def logged_json(server, kind, username) -> list:
    """The JSON of every `request of USER: …` (kind "request of") or `response to USER: …`
    line, parsed; lines cut short are returned as their text."""
    prefix = f"{kind} {username}: "
    found = []
    for line in log_lines(server, prefix):
        text = line.split(prefix, 1)[1]
        try:
            found.append(json.loads(text))
        except ValueError:
            found.append(text)
    return found


# =============================================================================
# RFC 8621 §4.1.4 / §4.2: bodyStructure is the whole tree
# =============================================================================

CRLF = "\r\n"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 3 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))


def b64(data: bytes) -> str:
    text = base64.b64encode(data).decode()
    return CRLF.join(text[i:i + 76] for i in range(0, len(text), 76))


def nested_message() -> bytes:
    """mixed[alternative[text/plain, related[text/html, inline image]], a PDF
    attachment, an attached message/rfc822 that is itself multipart]."""
    token = unique("n")
    forwarded = CRLF.join([
        "From: Carol <carol@example.org>", "To: Bob <bob@example.net>",
        "Subject: the forwarded one", "Date: Wed, 31 Jan 2024 08:00:00 +0000",
        f"Message-ID: <fwd-{token}@test.example>", "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="inner"', "",
        "--inner", "Content-Type: text/plain; charset=us-ascii", "", "Inside the attachment.",
        "--inner", "Content-Type: text/csv; name=\"t.csv\"", "", "a,b", "--inner--", ""])
    lines = [
        "From: Alice <alice@example.com>", "To: Bob <bob@example.net>",
        f"Subject: Interop structure {token}", "Date: Thu, 01 Feb 2024 09:00:00 +0000",
        f"Message-ID: <{token}@test.example>", "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="outer"', "",
        "This is a multi-part message in MIME format.",
        "--outer", 'Content-Type: multipart/alternative; boundary="alt"', "",
        "--alt", "Content-Type: text/plain; charset=utf-8", "Content-Language: en", "",
        "Plain words.",
        "--alt", 'Content-Type: multipart/related; boundary="rel"; type="text/html"', "",
        "--rel", "Content-Type: text/html; charset=utf-8", "",
        '<p>HTML words <img src="cid:logo@test.example"></p>',
        "--rel", "Content-Type: image/png", "Content-ID: <logo@test.example>",
        "Content-Disposition: inline", "Content-Transfer-Encoding: base64", "", b64(PNG),
        "--rel--", "--alt--",
        "--outer", 'Content-Type: application/pdf; name="report.pdf"',
        'Content-Disposition: attachment; filename="report.pdf"',
        "Content-Location: https://example.com/report.pdf",
        "Content-Transfer-Encoding: base64", "", b64(PDF),
        "--outer", "Content-Type: message/rfc822",
        'Content-Disposition: attachment; filename="forwarded.eml"', "", forwarded,
        "--outer--", ""]
    return CRLF.join(lines).encode()


# (type, [children]) for the multiparts, type for the leaves
EXPECTED_TREE = ("multipart/mixed", [
    ("multipart/alternative", [
        "text/plain",
        ("multipart/related", ["text/html", "image/png"]),
    ]),
    "application/pdf",
    "message/rfc822",  # a leaf: §4.1.4 gives subParts to multipart/* only
])


def shape(part):
    """The type tree of a bodyStructure that has subParts."""
    if part["subParts"] is None:
        return part["type"]
    return (part["type"], [shape(child) for child in part["subParts"]])


def nodes(part):
    yield part
    for child in part.get("subParts") or ():
        yield from nodes(child)


def leaves(part):
    return [node for node in nodes(part) if not node.get("subParts")]


def without_blob_ids(part):
    out = {k: v for k, v in part.items() if k != "blobId"}
    if out.get("subParts"):
        out["subParts"] = [without_blob_ids(child) for child in out["subParts"]]
    return out


@pytest.fixture(scope="module")
def structured(server):
    """One account holding the nested message (imported) and its blob."""
    username = f"{unique('structure')}@example.com"
    add_user(server.data_dir, username)
    client = Client(server.url, username)
    blob_id = upload(client, nested_message())["blobId"]
    resp = client.ok("Email/import", {"accountId": client.account_id, "emails": {"e": {
        "blobId": blob_id, "mailboxIds": {inbox_id(client): True}}}})
    assert resp["notCreated"] is None, resp
    return client, resp["created"]["e"]["id"], blob_id


def email_get(client, email_id, **args):
    found = client.ok("Email/get", {"accountId": client.account_id, "ids": [email_id],
                                    **args})["list"]
    assert len(found) == 1, found
    return found[0]


def email_parse(client, blob_id, **args):
    resp = client.ok("Email/parse", {"accountId": client.account_id, "blobIds": [blob_id],
                                     **args})
    assert resp["notParsable"] is None and resp["notFound"] is None, resp
    return resp["parsed"][blob_id]


def check_whole_tree(structure):
    """§4.1.4 tree, every node with exactly the §4.2 defaults plus subParts."""
    assert "subParts" in structure, f"a bodyStructure without its children: {structure}"
    assert shape(structure) == EXPECTED_TREE, structure
    wanted = set(DEFAULT_BODY_PROPERTIES) | {"subParts"}
    for node in nodes(structure):
        assert set(node) == wanted, node
        if node["type"].startswith("multipart/"):
            assert node["partId"] is None and node["blobId"] is None, node
            assert node["subParts"], node
        else:
            assert isinstance(node["partId"], str) and node["partId"], node
            assert isinstance(node["blobId"], str) and node["blobId"], node
            assert node["subParts"] is None, node
    by_type = {node["type"]: node for node in leaves(structure)}
    pdf, image = by_type["application/pdf"], by_type["image/png"]
    assert (pdf["name"], pdf["disposition"], pdf["size"]) == ("report.pdf", "attachment",
                                                              len(PDF))
    assert pdf["location"] == "https://example.com/report.pdf", pdf
    assert (image["cid"], image["disposition"], image["size"]) == ("logo@test.example",
                                                                  "inline", len(PNG))
    assert by_type["text/plain"]["charset"] == "utf-8" and \
        by_type["text/plain"]["language"] == ["en"], by_type["text/plain"]
    assert by_type["message/rfc822"]["name"] == "forwarded.eml"
    return by_type


def test_issue_30_email_get_body_structure_without_body_properties_is_the_whole_tree(
        structured):
    client, email_id, _ = structured
    email = email_get(client, email_id, properties=[
        "bodyStructure", "textBody", "htmlBody", "attachments", "hasAttachment"])
    assert set(email) == {"id", "bodyStructure", "textBody", "htmlBody", "attachments",
                          "hasAttachment"}, email
    by_type = check_whole_tree(email["bodyStructure"])
    assert email["hasAttachment"] is True
    # The flat lists keep §4.2's default list: no subParts.
    leaf_ids = {node["partId"] for node in leaves(email["bodyStructure"])}
    for name in ("textBody", "htmlBody", "attachments"):
        assert email[name], (name, email[name])
        for part in email[name]:
            assert set(part) == set(DEFAULT_BODY_PROPERTIES), (name, part)
            assert part["partId"] in leaf_ids, (name, part, leaf_ids)
    attached = {part["partId"] for part in email["attachments"]}
    assert {by_type["application/pdf"]["partId"],
            by_type["message/rfc822"]["partId"]} <= attached, email["attachments"]
    # A client that found the attachment through the tree can fetch it.
    assert download(client, by_type["application/pdf"]["blobId"], "report.pdf",
                    "application/pdf") == PDF


def test_issue_30_explicit_null_body_properties_is_the_default(structured):
    client, email_id, _ = structured
    absent = email_get(client, email_id, properties=["bodyStructure", "attachments"])
    null = email_get(client, email_id, properties=["bodyStructure", "attachments"],
                     bodyProperties=None)
    assert null == absent
    check_whole_tree(null["bodyStructure"])


def test_issue_30_email_parse_body_structure_without_body_properties_is_the_whole_tree(
        structured):
    client, email_id, blob_id = structured
    parsed = email_parse(client, blob_id, properties=["bodyStructure", "attachments"])
    assert set(parsed) == {"bodyStructure", "attachments"}, parsed
    by_type = check_whole_tree(parsed["bodyStructure"])
    for part in parsed["attachments"]:
        assert set(part) == set(DEFAULT_BODY_PROPERTIES), part
    assert download(client, by_type["application/pdf"]["blobId"], "report.pdf",
                    "application/pdf") == PDF
    # The same tree as Email/get of the imported copy (blob ids name other blobs).
    stored = email_get(client, email_id, properties=["bodyStructure"])["bodyStructure"]
    assert without_blob_ids(parsed["bodyStructure"]) == without_blob_ids(stored)


@pytest.mark.parametrize("asked", [
    ["partId", "type"],
    ["type", "subParts"],
    DEFAULT_BODY_PROPERTIES,  # the default list named: still no subParts
    ["subParts", "name", "header:Content-Type", "disposition"],
    [],
], ids=["no-subParts", "type-subParts", "defaults-named", "with-header", "empty"])
@pytest.mark.parametrize("method", ["Email/get", "Email/parse"])
def test_issue_30_explicit_body_properties_are_exactly_what_was_asked(structured, method,
                                                                       asked):
    client, email_id, blob_id = structured
    props = ["bodyStructure", "textBody", "htmlBody", "attachments"]
    if method == "Email/get":
        email = email_get(client, email_id, properties=props, bodyProperties=asked)
    else:
        email = email_parse(client, blob_id, properties=props, bodyProperties=asked)
    structure = email["bodyStructure"]
    if "subParts" in asked:
        counted = list(nodes(structure))
        assert len(counted) == 8, counted  # every node of EXPECTED_TREE
        if "type" in asked:
            assert shape(structure) == EXPECTED_TREE
    else:
        counted = [structure]  # only the root: its children were not asked for
    for node in counted:
        assert set(node) == set(asked), node
    for name in ("textBody", "htmlBody", "attachments"):
        assert email[name], name
        for part in email[name]:
            assert set(part) == set(asked), (name, part)
    if "header:Content-Type" in asked:
        pdf = next(n for n in nodes(structure) if n.get("name") == "report.pdf")
        assert pdf["header:Content-Type"].strip() == 'application/pdf; name="report.pdf"'


# =============================================================================
# RFC 8620 §7.3 / RFC 8887: a refused push connection leaves one log line
# =============================================================================


def refusal_lines(server, username):
    return [line for line in server.log().splitlines() if "refused" in line
            and username in line]


def check_one_refusal(server, username, channel, cap):
    wanted = f"{channel} of {username} from 127.0.0.1 refused"
    found = wait_for_lines(server, wanted, cap)
    tail = server.log().splitlines()[2:]  # past the long configuration line
    assert len(found) == 1, (wanted, cap, tail)
    assert refusal_lines(server, username) == found, tail  # once, and only this line


class Streams:
    """EventSource streams (RFC 8620 §7.3) read by http.client; all closed on exit."""

    def __init__(self):
        self.opened = []

    def open(self, client):
        stream = EventStream(event_source_url(client, ping=0), auth=client.http.auth)
        self.opened.append(stream)
        return stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in self.opened:
            stream.close()


def test_issue_30_event_source_refused_per_user_is_logged(tmp_path):
    srv = new_server(tmp_path, "--max-push-connections", "1")
    try:
        alice, bob = new_user(srv, "alice"), new_user(srv, "bob")
        with Streams() as streams:
            assert streams.open(alice).status == 200
            assert streams.open(bob).status == 200  # the cap is per user: nothing refused
            refused = streams.open(alice)
            assert refused.status == 400, (refused.status, refused.body)
            assert json.loads(refused.body)["type"] == "urn:ietf:params:jmap:error:limit"
        check_one_refusal(srv, alice.username, "EventSource", "--max-push-connections")
        assert refusal_lines(srv, bob.username) == []
    finally:
        srv.stop()


def test_issue_30_event_source_refused_over_the_total_is_logged(tmp_path):
    srv = new_server(tmp_path, "--max-event-streams", "1")
    try:
        alice, bob = new_user(srv, "alice"), new_user(srv, "bob")
        with Streams() as streams:
            assert streams.open(alice).status == 200
            refused = streams.open(bob)
            assert refused.status == 503, (refused.status, refused.body)
        check_one_refusal(srv, bob.username, "EventSource", "--max-event-streams")
        assert refusal_lines(srv, alice.username) == []
    finally:
        srv.stop()


def ws_open(server, client, opened):
    reply = raw_handshake(server, auth=(client.username, client.http.auth[1]))
    opened.append(reply.sock)
    return reply


def test_issue_30_websocket_refused_per_user_is_logged(tmp_path):
    srv = new_server(tmp_path, "--max-push-connections", "1", cls=WsServer)
    opened = []
    try:
        alice, bob = new_user(srv, "alice"), new_user(srv, "bob")
        assert ws_open(srv, alice, opened).status == 101
        assert ws_open(srv, bob, opened).status == 101
        refused = ws_open(srv, alice, opened)
        assert refused.status == 400, (refused.status, refused.body)
        assert refused.problem()["type"] == "urn:ietf:params:jmap:error:limit"
        check_one_refusal(srv, alice.username, "WebSocket", "--max-push-connections")
        assert refusal_lines(srv, bob.username) == []
    finally:
        for sock in opened:
            sock.close()
        srv.stop()


def test_issue_30_websocket_refused_over_the_total_is_logged(tmp_path):
    srv = new_server(tmp_path, "--max-websockets", "1", cls=WsServer)
    opened = []
    try:
        alice, bob = new_user(srv, "alice"), new_user(srv, "bob")
        assert ws_open(srv, alice, opened).status == 101
        refused = ws_open(srv, bob, opened)
        assert refused.status == 503, (refused.status, refused.body)
        check_one_refusal(srv, bob.username, "WebSocket", "--max-websockets")
        assert refusal_lines(srv, alice.username) == []
    finally:
        for sock in opened:
            sock.close()
        srv.stop()


# =============================================================================
# --log-requests
# =============================================================================


@pytest.fixture(scope="module")
def receiver():
    rec = Receiver()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def log_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("logreq") / "data"
    add_user(data_dir, "first@example.com")
    srv = WsServer(data_dir, "--log-requests", "--test-push-allow-loopback").start()
    yield srv
    srv.stop()


def test_issue_30_log_requests_logs_each_request_and_response(log_server):
    user = new_user(log_server, "logged")
    marker = unique("marker")
    args = {"said": marker, "list": [1, None, True]}
    body = {"using": [CORE], "methodCalls": [["Core/echo", args, "e1"]]}
    answer = user.request(body["methodCalls"], using=[CORE])
    assert logged_json(log_server, "request of", user.username) == [body]
    assert logged_json(log_server, "response to", user.username) == [answer]
    # A body that is not JSON: its size and why it was refused, not its text.
    r = user.post("{" + marker + "-broken")
    assert r.status_code == 400, r.text
    found = wait_for_lines(log_server, f"request of {user.username}: ", "refused")
    assert len(found) == 1 and "notJSON" in found[0], found
    assert marker + "-broken" not in log_server.log()


def test_issue_30_log_requests_cut_at_4096_characters(log_server):
    user = new_user(log_server, "long")
    args = {"long": "y" * 10_000}
    answer = user.request([["Core/echo", args, "e1"]], using=[CORE])
    body = {"using": [CORE], "methodCalls": [["Core/echo", args, "e1"]]}
    for kind, whole in (("request of", compact(body)), ("response to", compact(answer))):
        [line] = log_lines(log_server, f"{kind} {user.username}: ")
        text = line.split(f"{kind} {user.username}: ", 1)[1]
        assert text == f"{whole[:LOG_CUT]}… ({len(whole) - LOG_CUT} more)", (kind, text[-80:])


def test_issue_30_log_requests_hides_push_keys_url_and_verification_code(log_server,
                                                                         receiver):
    user = new_user(log_server, "pusher")
    user.ok("Mailbox/set", {"accountId": user.account_id,
                            "create": {"m": {"name": unique("box")}}})  # bus knows the user
    ua = UserAgentKeys.generate()
    keys = ua.keys()
    endpoint = receiver.endpoint()
    created = user.ok("PushSubscription/set", {"create": {"k": {
        "deviceClientId": unique("dev"), "url": endpoint.url, "keys": keys}}})
    assert created["notCreated"] is None, created
    sub_id = created["created"]["k"]["id"]
    verification = json.loads(webpush_decrypt(endpoint.expect().body, ua).plaintext)
    code = verification["verificationCode"]
    assert verification["pushSubscriptionId"] == sub_id
    updated = user.ok("PushSubscription/set", {"update": {sub_id: {"verificationCode": code}}})
    assert updated["notUpdated"] is None, updated
    got = user.ok("PushSubscription/get", {"ids": [sub_id]})["list"]
    assert got[0]["verificationCode"] == code  # the server answers it; the log must not

    requests_logged = logged_json(log_server, "request of", user.username)
    create_args = next(r["methodCalls"][0][1] for r in requests_logged
                       if r["methodCalls"][0][0] == "PushSubscription/set"
                       and "create" in r["methodCalls"][0][1])
    assert create_args["create"]["k"]["url"] == "(hidden)"
    assert create_args["create"]["k"]["keys"] == "(hidden)"
    update_args = next(r["methodCalls"][0][1] for r in requests_logged
                       if r["methodCalls"][0][0] == "PushSubscription/set"
                       and "update" in r["methodCalls"][0][1])
    assert update_args["update"][sub_id]["verificationCode"] == "(hidden)"
    get_response = next(r["methodResponses"][0][1] for r in
                        logged_json(log_server, "response to", user.username)
                        if r["methodResponses"][0][0] == "PushSubscription/get")
    assert get_response["list"][0]["verificationCode"] == "(hidden)"

    text = log_server.log()
    for secret in (keys["p256dh"], keys["auth"], endpoint.url, endpoint.path,
                   endpoint.path.split("?")[0], code):
        assert secret not in text, secret


def test_issue_30_log_requests_reduces_message_text_to_its_length(log_server):
    user = new_user(log_server, "texts")
    plain_word, html_word = unique("plainsecret"), unique("htmlsecret")
    plain, html = f"{plain_word} words", f"<p>{html_word}</p>"
    raw = CRLF.join([
        "From: Alice <alice@example.com>", "To: Bob <bob@example.net>", "Subject: Hello",
        f"Message-ID: <{unique()}@test.example>", "MIME-Version: 1.0",
        'Content-Type: multipart/alternative; boundary="a"', "",
        "--a", "Content-Type: text/plain; charset=utf-8", "", plain,
        "--a", "Content-Type: text/html; charset=utf-8", "", html, "--a--", ""]).encode()
    blob_id = upload(user, raw)["blobId"]
    imported = user.ok("Email/import", {"accountId": user.account_id, "emails": {"e": {
        "blobId": blob_id, "mailboxIds": {inbox_id(user): True}}}})
    email_id = imported["created"]["e"]["id"]
    email = email_get(user, email_id, properties=["preview", "bodyValues", "textBody"],
                      fetchAllBodyValues=True)
    values = [v["value"] for v in email["bodyValues"].values()]
    assert any(plain in v for v in values) and any(html in v for v in values), values

    draft_text, signature = unique("drafttext"), unique("signature")
    drafts = user.ok("Email/set", {"accountId": user.account_id, "create": {"d": {
        "mailboxIds": {inbox_id(user): True}, "subject": "draft",
        "bodyValues": {"b": {"value": draft_text}},
        "textBody": [{"partId": "b", "type": "text/plain"}]}}})
    assert drafts["notCreated"] is None, drafts
    vacation_text = unique("vacationtext")
    user.ok("VacationResponse/set", {"accountId": user.account_id, "update": {"singleton": {
        "textBody": vacation_text, "htmlBody": f"<b>{vacation_text}</b>"}}},
        using=[CORE, MAIL, VACATION])
    identity = user.ok("Identity/get", {"accountId": user.account_id},
                       using=[CORE, MAIL, SUBMISSION])["list"][0]["id"]
    user.ok("Identity/set", {"accountId": user.account_id, "update": {identity: {
        "textSignature": signature, "htmlSignature": f"<i>{signature}</i>"}}},
        using=[CORE, MAIL, SUBMISSION])

    text = log_server.log()
    for secret in (plain_word, html_word, draft_text, vacation_text, signature):
        assert secret not in text, secret
    get_response = next(r["methodResponses"][0][1] for r in
                        logged_json(log_server, "response to", user.username)
                        if r["methodResponses"][0][0] == "Email/get")
    logged = get_response["list"][0]
    assert logged["preview"] == f"({len(email['preview'])} characters)", logged
    assert {k: v["value"] for k, v in logged["bodyValues"].items()} == {
        k: f"({len(v['value'])} characters)" for k, v in email["bodyValues"].items()}
    assert logged["textBody"] == email["textBody"]  # a list of parts, not text: as it is
    sets = [r["methodCalls"][0][1] for r in logged_json(log_server, "request of",
                                                        user.username)]
    assert any(a.get("create", {}).get("d", {}).get("bodyValues") ==
               {"b": {"value": f"({len(draft_text)} characters)"}} for a in sets), sets
    assert any(a.get("update", {}).get("singleton") ==
               {"textBody": f"({len(vacation_text)} characters)",
                "htmlBody": f"({len(vacation_text) + 7} characters)"} for a in sets), sets
    assert any(a.get("update", {}).get(identity) ==
               {"textSignature": f"({len(signature)} characters)",
                "htmlSignature": f"({len(signature) + 7} characters)"} for a in sets), sets


def test_issue_30_log_requests_never_writes_passwords_or_app_passwords(log_server):
    password = unique("pw-") + " secret phrase"
    user = new_user(log_server, "creds", password=password)
    token = app_password(log_server, user.username)
    marker = unique("credmarker")
    clients = {"password": user, "basic-app-password": Client(log_server.url, user.username,
                                                               token)}
    bearer = Client(log_server.url, user.username)
    bearer.http.auth = None
    bearer.http.headers["Authorization"] = f"Bearer {token}"
    clients["bearer"] = bearer
    for how, client in clients.items():
        assert client.ok("Core/echo", {"how": how, "m": marker}, using=[CORE]) == \
            {"how": how, "m": marker}
    # EventSource with ?access_token= (RFC 8620 §7.3 for browsers): a URL with the token
    url = event_source_url(user, ping=0)
    url += ("&" if "?" in url else "?") + "access_token=" + quote(token, safe="")
    stream = EventStream(url)
    try:
        assert stream.status == 200, (stream.status, stream.body)
    finally:
        stream.close()
    # A WebSocket with ?access_token=, and a JMAP request over it
    reply = raw_handshake(log_server, path="/jmap/ws/?access_token=" + quote(token, safe=""))
    try:
        assert reply.status == 101, (reply.status, reply.body)
        reply.sock.sendall(frame(0x1, compact({
            "@type": "Request", "id": "w1", "using": [CORE],
            "methodCalls": [["Core/echo", {"how": "websocket", "m": marker}, "c0"]]}).encode()))
        answer = read_message(reply.sock)
        assert answer["methodResponses"][0][1] == {"how": "websocket", "m": marker}, answer
    finally:
        reply.sock.close()
    # A wrong password is not written either (it is often the right one mistyped).
    wrong = unique("wrong-pw-")
    assert requests.get(log_server.url + "/jmap/session", auth=(user.username, wrong),
                        timeout=30).status_code == 401
    assert wait_for_lines(log_server, "login failed", user.username)

    hows = [r["methodCalls"][0][1].get("how") for r in
            logged_json(log_server, "request of", user.username)]
    assert sorted(hows) == sorted([*clients, "websocket"]), hows
    text = log_server.log()
    secret_part = token.split(".")[-1]
    for secret in (password, password.split()[0], token, secret_part, quote(token, safe=""),
                   wrong):
        assert secret not in text, secret


def test_issue_30_without_log_requests_no_request_bodies_are_logged(tmp_path):
    srv = new_server(tmp_path)
    try:
        user = new_user(srv, "quiet")
        marker = unique("quietmarker")
        assert user.ok("Core/echo", {"m": marker}, using=[CORE]) == {"m": marker}
        user.ok("Mailbox/get", {"accountId": user.account_id})
        assert wait_for_lines(srv, user.username, "Core/echo"), srv.log()  # it was served
        text = srv.log()
        assert marker not in text
        assert f"request of {user.username}" not in text
        assert f"response to {user.username}" not in text
    finally:
        srv.stop()


# =============================================================================
# Shutdown: a second signal while the first is handled
# =============================================================================


def ready_server(data_dir) -> Server:
    """A started server that has answered HTTP: its main loop runs, so its signal
    handlers are in place (the "listening" line comes just before they are)."""
    srv = Server(data_dir).start()
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(b"GET /.well-known/jmap HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 "), "no HTTP answer"
    return srv


def spin_until(moment):
    while time.perf_counter() < moment:
        pass  # time.sleep() is too coarse for microseconds


def check_stopped_cleanly(srv, what):
    try:
        status = srv.proc.wait(EXIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}: still running after {EXIT_S} s\n{srv.log()}") from None
    last = srv.log().splitlines()[-1]
    if status < 0 and last.endswith("stopped"):
        raise AssertionError(f"{what}: killed by {signal.Signals(-status).name} after it had "
                             "stopped (a signal that came while the process exited)")
    assert status == 0, (what, status, srv.log()[-600:])
    assert last.endswith("stopped"), (what, srv.log()[-600:])


@pytest.fixture
def data_dir(tmp_path):
    data = tmp_path / "data"
    add_user(data, "first@example.com")
    return data


TERM, INT = signal.SIGTERM, signal.SIGINT


@pytest.mark.parametrize("pairs, runs", [
    ([(TERM, TERM)], 20),
    ([(INT, TERM), (TERM, INT), (INT, INT)], 12),
], ids=["SIGTERM-SIGTERM", "SIGINT-SIGTERM-mixed"])
def test_issue_30_two_signals_1ms_apart_end_serve_every_time(data_dir, pairs, runs):
    """The issue's case: Ctrl-C twice, or systemd's stop plus a user's, 1 ms apart."""
    for run in range(runs):
        first, second = pairs[run % len(pairs)]
        srv = ready_server(data_dir)
        try:
            srv.proc.send_signal(first)
            time.sleep(0.001)
            srv.proc.send_signal(second)
            check_stopped_cleanly(srv, f"run {run + 1}: {first.name} then {second.name}")
        finally:
            srv.stop()


def test_issue_30_a_train_of_signals_microseconds_apart_ends_serve(data_dir):
    """40 signals 20 µs apart, SIGTERM and SIGINT in turn: some land while the handler
    of an earlier one runs, where a handler that takes a lock (Event.set) deadlocked
    (the old code hung in about half of these runs)."""
    for run in range(10):
        srv = ready_server(data_dir)
        try:
            start = time.perf_counter()
            for k in range(40):
                spin_until(start + k * 20e-6)
                os.kill(srv.proc.pid, (TERM, INT)[(run + k) % 2])
            check_stopped_cleanly(srv, f"run {run + 1}")
        finally:
            srv.stop()


def test_issue_30_signals_until_serve_has_exited_leave_its_status_0(data_dir):
    """A SIGTERM every 0.5 ms until the process is gone (a script's `while kill PID`):
    one lands while the stopped server is exiting, which must not turn status 0 into
    death by that signal."""
    for run in range(3):
        srv = ready_server(data_dir)
        try:
            deadline = time.monotonic() + EXIT_S
            while srv.proc.poll() is None and time.monotonic() < deadline:
                try:
                    os.kill(srv.proc.pid, TERM)
                except ProcessLookupError:
                    break
                time.sleep(0.0005)
            check_stopped_cleanly(srv, f"run {run + 1}")
        finally:
            srv.stop()
