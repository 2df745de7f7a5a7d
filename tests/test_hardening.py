"""Issue 16 (hardening): regression tests for the request engine, Email/query, poison
messages, LMTP, EventSource slots, EmailSubmission's Sender and Mailbox sibling names.

Each test describes the behaviour jmapd has once issue 16 is fixed; against the code
before the fix every one of them fails (or would hang: everything is bounded by socket
and HTTP timeouts). The server is a real `jmapd.py serve` subprocess; the clients are
independent of jmapd (`requests`, `smtplib`, raw sockets, the `websockets` package,
an `aiosmtpd` smarthost).

- RFC 8620 §3.7 (result references): the JSON size of every value that `#name`
  arguments substitute in one request counts against maxSizeRequest (§2 Session, core
  capability); the call whose references pass it gets invalidArguments (§3.6.2) and the
  request goes on; the same over WebSocket (RFC 8887 §4.3). RFC 8620 §3.6.1 / RFC 7493:
  an integer of more than 4,300 digits is notJSON (HTTP 400 problem; over WebSocket a
  RequestError, RFC 8887 §4.3.4, and the connection stays open). RFC 7807 / RFC 9112
  §2.2, §3, §5, §7.1: a malformed request head gets a problem document.
- RFC 8620 §5.5 / RFC 8621 §4.4.1 (Email/query filters): control characters in text
  filters are separators; 100 text conditions in one operator work; more than 100
  FilterConditions in the whole tree is unsupportedFilter.
- RFC 2045 §5.1, RFC 2046 §4.1.2 (charset), RFC 2047 §2 (encoded words), RFC 2231 §3-§4
  (parameter continuations and charsets), RFC 8621 §4.1.4, §4.2 (Email/get), §4.9
  (Email/parse), §4.8 (Email/import), RFC 8620 §6.2 (download), RFC 2033 §4.2 (LMTP
  replies): poison messages are stored and readable.
- RFC 5321 §4.1.1.4, §4.5.2 (only CRLF.CRLF ends DATA: SMTP smuggling), §2.3.8 / §4.1.2
  (CR and LF only as the line end; 501 for a bad argument), §3.8 / §4.2.2 (421 at the
  greeting): LMTP (RFC 2033).
- RFC 8620 §7.3 (EventSource) with the per-user limit (--max-push-connections) and the
  §3.6.1 limit problem.
- RFC 8621 §7.5 (EmailSubmission/set: forbiddenFrom covers the Sender header field);
  RFC 8620 §5.3 / RFC 8621 §2.5 (Mailbox/set: alreadyExists with existingId for a
  sibling of the same name).
"""

import base64
import contextlib
import itertools
import json
import re
import secrets
import smtplib
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import quote, urlsplit

import pytest
import requests
from aiosmtpd.controller import Controller

from conftest import CORE, JMAPD, MAIL, PASSWORD, Client, Server, add_user, free_port

ws_client = pytest.importorskip("websockets.sync.client")

SUBMISSION = "urn:ietf:params:jmap:submission"
WEBSOCKET = "urn:ietf:params:jmap:websocket"
ERROR = "urn:ietf:params:jmap:error:"
PROBLEM_TYPE = "application/problem+json"
MAX_REQUEST = 200_000  # --max-size-request of the module's server
ATTACKER = ("127.0.0.2", 0)  # raw attacking connections come from here; clients use 127.0.0.1
WAIT_S = 10  # socket / HTTP timeout: what must come comes well within this
_serial = itertools.count(1)


# =============================================================================
# Fixtures: one server for most tests (HTTP, WebSocket, LMTP, a relay), users
# =============================================================================


class Sink:
    """An aiosmtpd smarthost that accepts and records every message."""

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  bytes(envelope.original_content)))
        return "250 2.0.0 OK"


@pytest.fixture(scope="module")
def sink():
    relay = Sink()
    relay.controller.start()
    yield relay
    relay.controller.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, sink):
    data_dir = tmp_path_factory.mktemp("hardening") / "data"
    add_user(data_dir, "first@example.com")
    server = Server(data_dir, "--websocket", "127.0.0.1:0", "--lmtp", "127.0.0.1:0",
                    "--max-size-request", MAX_REQUEST,
                    "--smtp-relay", f"127.0.0.1:{sink.port}", "--smtp-retry-seconds", "1",
                    "--max-login-failures-per-address", "100000",
                    "--max-login-failures-per-user", "100000").start()
    match = re.search(r"LMTP on 127\.0\.0\.1:(\d+)", server.log())
    assert match, server.log()
    server.lmtp_port = int(match.group(1))
    yield server
    server.stop()


def new_client(server, prefix="h") -> Client:
    username = f"{prefix}{next(_serial)}-{secrets.token_hex(3)}@example.com"
    add_user(server.data_dir, username)
    return Client(server.url, username)


@pytest.fixture
def user(srv):
    client = new_client(srv)
    yield client
    client.http.close()  # no idle keep-alive connections pile up on the shared server


def basic(username, password=PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def mailbox_ids(client) -> dict:
    boxes = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})["list"]
    return {m["role"]: m["id"] for m in boxes if m["role"]}


def upload(client, raw: bytes) -> str:
    url = client.session["uploadUrl"].replace("{accountId}", quote(client.account_id, safe=""))
    r = client.http.post(url, data=raw, headers={"Content-Type": "message/rfc822"},
                         timeout=WAIT_S)
    assert r.status_code in (200, 201), r.text
    return r.json()["blobId"]


def import_raw(client, raw: bytes, mailbox_id=None):
    """Upload and Email/import one message; return the Email/import response."""
    blob = upload(client, raw)
    mailbox_id = mailbox_id or mailbox_ids(client)["inbox"]
    return client.call("Email/import", {"accountId": client.account_id, "emails": {
        "i": {"blobId": blob, "mailboxIds": {mailbox_id: True}}}})


def download(client, blob_id, name="part", media_type="application/octet-stream"):
    url = client.session["downloadUrl"]
    for key, value in {"accountId": client.account_id, "blobId": blob_id, "name": name,
                       "type": media_type}.items():
        url = url.replace("{" + key + "}", quote(value, safe=""))
    return client.http.get(url, timeout=WAIT_S)


def all_email_ids(client) -> list:
    out = client.ok("Email/query", {"accountId": client.account_id,
                                    "sort": [{"property": "receivedAt", "isAscending": True}]})
    return out["ids"]


def simple_message(subject, body="hello\r\n", sender="alice@example.com",
                   to="rcpt@example.com") -> bytes:
    return (f"From: Alice Hello <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{secrets.token_hex(8)}@hardening.test>\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()


# =============================================================================
# Request engine: result-reference amplification (RFC 8620 §3.7)
# =============================================================================

AMPLIFY_CALLS = 12


def amplifying_calls():
    """c0 echoes ~1 KB; each next Core/echo references the previous result twice, whole.

    Result k is about 1 KB * 2^k. The values substituted up to call k sum to about
    2 KB * (2^k - 1): 127 KB at c6, 256 KB at c7, so with maxSizeRequest = 200,000 the
    references of c7 pass it (whatever JSON spacing is counted: the margins are wide).
    A last, independent call shows that the request goes on.
    """
    calls = [["Core/echo", {"x": "a" * 1000}, "c0"]]
    for i in range(1, AMPLIFY_CALLS):
        ref = {"resultOf": f"c{i - 1}", "name": "Core/echo", "path": ""}
        calls.append(["Core/echo", {"#a": ref, "#b": dict(ref)}, f"c{i}"])
    calls.append(["Core/echo", {"still": "here"}, "last"])
    return calls


AMPLIFY_FAILS_AT = 7


def check_amplification(responses):
    by_id = {}
    for name, args, call_id in responses:
        by_id.setdefault(call_id, []).append((name, args))
    for i in range(AMPLIFY_FAILS_AT):
        assert [n for n, _ in by_id.get(f"c{i}", [])] == ["Core/echo"], (i, by_id.get(f"c{i}"))
    failing = by_id.get(f"c{AMPLIFY_FAILS_AT}")
    assert failing and failing[0][0] == "error", \
        f"c{AMPLIFY_FAILS_AT} (substituted ~256 KB in all) was not refused: " \
        f"{[(n, len(json.dumps(a))) for n, a in failing or []]}"
    error = failing[0][1]
    assert error["type"] == "invalidArguments", error
    assert "maxSizeRequest" in error.get("description", ""), error
    for i in range(AMPLIFY_FAILS_AT + 1, AMPLIFY_CALLS):
        # Their reference names an error response (or the sum is over): never echoed.
        assert [n for n, _ in by_id.get(f"c{i}", [])] == ["error"], (i, by_id.get(f"c{i}"))
    assert by_id.get("last") == [("Core/echo", {"still": "here"})], by_id.get("last")


def test_issue_16_result_reference_amplification_http(srv, user):
    r = user.post({"using": [CORE], "methodCalls": amplifying_calls()})
    assert r.status_code == 200, r.text[:500]
    check_amplification(r.json()["methodResponses"])
    assert len(r.content) < 4 * MAX_REQUEST, f"a {len(r.content)}-octet response"


@contextlib.contextmanager
def websocket(client):
    """A JMAP WebSocket to the URL of the session's websocket capability."""
    url = client.session["capabilities"][WEBSOCKET]["url"]
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", url
    with ws_client.connect(url, subprotocols=["jmap"],
                           additional_headers={"Authorization": basic(client.username)},
                           open_timeout=WAIT_S, close_timeout=WAIT_S, max_size=None,
                           proxy=None) as conn:
        yield conn


def ws_recv(conn, timeout=WAIT_S) -> dict:
    try:
        text = conn.recv(timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"no WebSocket message within {timeout} s") from None
    assert isinstance(text, str), text
    return json.loads(text)


def test_issue_16_result_reference_amplification_websocket(srv, user):
    with websocket(user) as conn:
        conn.send(json.dumps({"@type": "Request", "id": "amp", "using": [CORE],
                              "methodCalls": amplifying_calls()}))
        reply = ws_recv(conn)
        assert reply.get("@type") == "Response" and reply.get("requestId") == "amp", \
            {k: v for k, v in reply.items() if k != "methodResponses"}
        check_amplification(reply["methodResponses"])


# =============================================================================
# Request engine: integers of more than 4,300 digits (RFC 7493, RFC 8620 §3.6.1)
# =============================================================================

BIG_INT_REQUEST = ('{"using": ["%s"], "methodCalls": [["Core/echo", {"n": %s}, "c0"]]}'
                   % (CORE, "7" * 5000))


def test_issue_16_big_integer_is_not_json_http(srv, user):
    r = user.post(BIG_INT_REQUEST)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.headers.get("Content-Type", "").startswith(PROBLEM_TYPE), r.headers
    problem = r.json()
    assert problem["type"] == ERROR + "notJSON" and problem["status"] == 400, problem
    # The server is fine afterwards.
    assert user.ok("Core/echo", {"ok": 1}, using=[CORE]) == {"ok": 1}


def test_issue_16_big_integer_is_not_json_websocket(srv, user):
    with websocket(user) as conn:
        conn.send('{"@type": "Request", "id": "big", "using": ["%s"], '
                  '"methodCalls": [["Core/echo", {"n": %s}, "c0"]]}' % (CORE, "7" * 5000))
        try:
            error = ws_recv(conn)
        except Exception as exc:  # noqa: BLE001 -- today: the server drops the connection
            raise AssertionError(f"no RequestError: {exc!r}") from None
        assert error.get("@type") == "RequestError", error
        assert error.get("type") == ERROR + "notJSON" and error.get("status") == 400, error
        # The connection stays usable.
        conn.send(json.dumps({"@type": "Request", "id": "after", "using": [CORE],
                              "methodCalls": [["Core/echo", {"ok": 1}, "c0"]]}))
        reply = ws_recv(conn)
        assert reply.get("@type") == "Response" and reply.get("requestId") == "after", reply
        assert reply["methodResponses"] == [["Core/echo", {"ok": 1}, "c0"]], reply


# =============================================================================
# Malformed HTTP request heads: an RFC 7807 problem document
# =============================================================================


def raw_exchange(url, data: bytes) -> bytes:
    """Send octets on a fresh connection; return everything the server sends back."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S,
                                    source_address=ATTACKER)
    received = b""
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # the server closed with our octets unread: what came is kept
            except socket.timeout:
                raise AssertionError(f"no end of the answer within {WAIT_S} s: "
                                     f"{received[:300]!r}") from None
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return received


def parse_http_answer(received: bytes):
    head, sep, body = received.partition(b"\r\n\r\n")
    assert sep, f"no complete answer: {received[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return status, headers, body


def auth_line(client) -> bytes:
    return f"Authorization: {basic(client.username)}\r\n".encode()


MALFORMED_HEADS = {
    "bad-request-line": lambda auth: b"GARBAGE\r\n\r\n",
    "request-line-extra-word": lambda auth: b"GET /jmap/session HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    "header-without-colon": lambda auth: (b"GET /jmap/session HTTP/1.1\r\nHost: x\r\n" + auth
                                          + b"NoColonInThisLine\r\n\r\n"),
    "head-too-large": lambda auth: (b"GET /jmap/session HTTP/1.1\r\nHost: x\r\n" + auth
                                    + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000)
                                               for i in range(265)) + b"\r\n"),
    "bad-chunk-size": lambda auth: (b"POST /jmap/api/ HTTP/1.1\r\nHost: x\r\n" + auth
                                    + b"Content-Type: application/json\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n"),
    "chunk-not-terminated": lambda auth: (b"POST /jmap/api/ HTTP/1.1\r\nHost: x\r\n" + auth
                                          + b"Content-Type: application/json\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n"
                                            b"3\r\nabcXX\r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("kind", list(MALFORMED_HEADS))
def test_issue_16_malformed_http_head_gets_problem_json(srv, user, kind):
    user.session  # one verified login first: the credential is known to the server
    status, headers, body = parse_http_answer(
        raw_exchange(srv.url, MALFORMED_HEADS[kind](auth_line(user))))
    assert 400 <= status < 600, status
    assert headers.get("content-type", "").startswith(PROBLEM_TYPE), (status, headers, body)
    problem = json.loads(body)
    assert isinstance(problem.get("type"), str) and problem["type"], problem
    assert problem.get("status") == status, problem
    assert isinstance(problem.get("detail"), str) and problem["detail"], problem


# =============================================================================
# Email/query: control characters, 100 text conditions, conditions in the whole tree
# =============================================================================


@pytest.fixture
def searchable(user):
    """A user with one Email: subject "hello world", from "Alice Hello", body with both."""
    out = import_raw(user, simple_message("hello world", "hello world body text\r\n"))
    assert out[0] == "Email/import" and out[1]["notCreated"] is None, out
    return user, out[1]["created"]["i"]["id"]


def query(client, filter_):
    return client.call("Email/query", {"accountId": client.account_id, "filter": filter_})


def test_issue_16_query_control_characters_are_separators(searchable):
    client, email_id = searchable
    cases = [("text", "hello\x00world"), ("text", "\x00hello"), ("subject", "hello\x00world"),
             ("from", "alice\x00hello"), ("body", "world\x00hello"), ("to", "rcpt\x00example"),
             ("text", "hello\x01world"), ("text", "hello\x1bworld\x7f"),
             ("subject", "\x08hello\x1f")]
    wrong = []
    for name, value in cases:
        resp = query(client, {name: value})
        if resp[0] != "Email/query" or resp[1]["ids"] != [email_id]:
            wrong.append((name, value, resp))
    assert not wrong, wrong


def test_issue_16_query_100_text_conditions_in_one_and(searchable):
    client, email_id = searchable
    resp = query(client, {"operator": "AND", "conditions": [{"text": "hello"}] * 99
                          + [{"text": "world"}]})
    assert resp[0] == "Email/query", resp
    assert resp[1]["ids"] == [email_id], resp


def test_issue_16_query_100_text_conditions_in_one_or(searchable):
    client, email_id = searchable
    resp = query(client, {"operator": "OR", "conditions": [{"text": f"absent{i}"}
                                                           for i in range(99)]
                          + [{"text": "world"}]})
    assert resp[0] == "Email/query", resp
    assert resp[1]["ids"] == [email_id], resp


def test_issue_16_query_more_than_100_conditions_in_the_tree(searchable):
    client, _ = searchable
    nested = {"operator": "AND", "conditions": [
        {"operator": "OR", "conditions": [{"subject": f"a{i}"} for i in range(60)]},
        {"operator": "OR", "conditions": [{"subject": f"b{i}"} for i in range(60)]}]}
    resp = query(client, nested)
    assert resp[0] == "error" and resp[1]["type"] == "unsupportedFilter", resp
    deeper = {"operator": "NOT", "conditions": [
        {"operator": "OR", "conditions": [{"from": f"a{i}"} for i in range(50)]},
        {"operator": "AND", "conditions": [
            {"operator": "OR", "conditions": [{"to": f"b{i}"} for i in range(50)]},
            {"text": "one too many"}]}]}
    resp = query(client, deeper)  # 101 conditions on three levels
    assert resp[0] == "error" and resp[1]["type"] == "unsupportedFilter", resp
    at_limit = {"operator": "OR", "conditions": [
        {"operator": "OR", "conditions": [{"subject": f"a{i}"} for i in range(50)]},
        {"operator": "OR", "conditions": [{"subject": f"b{i}"} for i in range(49)]
         + [{"subject": "hello"}]}]}
    resp = query(client, at_limit)  # exactly 100: fine
    assert resp[0] == "Email/query" and len(resp[1]["ids"]) == 1, resp


# =============================================================================
# Poison messages: odd codecs and malformed RFC 2231 parameter sets
# =============================================================================

# Python codec names that are not text encodings (or refuse errors="replace").
POISON_CODECS = ["idna", "rot13", "hex", "base64", "zlib", "uu", "quoted-printable",
                 "undefined", "bz2", "punycode"]
# Malformed parameter sets: (Content-Type parameters, Content-Disposition).
POISON_PARAMS = {
    "whole-and-sections": ("name*0=a; name*=b", "attachment; filename*0=a; filename*=b"),
    "section-1-alone": ("name*1=x", "attachment; filename*1=x"),
    "bad-percent": ("name*=''%ZZ", "attachment; filename*=''%ZZ"),
    "huge-section": ("name*99999999999=x", "attachment; filename*99999999999=x"),
    "duplicates": ("name=a; name=b; name*=utf-8''c",
                   "attachment; filename=a; filename=b; filename*=utf-8''c; filename*0=d"),
    "mixed-sections": ("name*0*=rot13''%41; name*1=b; name*0=c",
                       "attachment; filename*0*=idna''%41; filename*2=z; filename*0*=x"),
}
BOUNDARY = "poison-b0undary"


def _message(tag, headers, body) -> bytes:
    lines = ["To: rcpt@example.com", f"Message-ID: <{tag}.{secrets.token_hex(4)}@poison.test>",
             "Date: Mon, 01 Jan 2024 00:00:00 +0000", "MIME-Version: 1.0", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def codec_message(codec) -> bytes:
    """The codec as a text part's charset, an RFC 2231 charset and encoded-word charsets."""
    b = BOUNDARY
    return _message(f"codec-{codec}", [
        f"From: =?{codec}?q?Evil_Name?= <alice@example.com>",
        f"Subject: =?{codec}?q?hello_=41?= and =?{codec}?b?aGVsbG8=?= {codec}",
        f"Cc: =?{codec}?b?RGlzcGxheQ==?= <cc@example.com>",
        f'Content-Type: multipart/mixed; boundary="{b}"'],
        f"--{b}\r\nContent-Type: text/plain; charset={codec}\r\n\r\nhello a b c\r\n"
        f"--{b}\r\nContent-Type: text/html; charset=\"{codec}\"\r\n\r\n<p>hello</p>\r\n"
        f"--{b}\r\nContent-Type: text/plain; charset*={codec}''x; name=\"n.txt\"\r\n"
        "Content-Disposition: attachment\r\n\r\nattached text\r\n"
        f"--{b}\r\nContent-Type: application/octet-stream; name*={codec}''%41%42%43\r\n"
        f"Content-Disposition: attachment; filename*={codec}'en'%41%42%43\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n"
        f"--{b}--\r\n")


def params_message(kind) -> bytes:
    ct_params, disposition = POISON_PARAMS[kind]
    b = BOUNDARY
    return _message(f"params-{kind}", [
        "From: Alice <alice@example.com>", f"Subject: parameters {kind}",
        f'Content-Type: multipart/mixed; boundary="{b}"'],
        f"--{b}\r\nContent-Type: text/plain; charset=utf-8; charset=us-ascii\r\n\r\nhello\r\n"
        f"--{b}\r\nContent-Type: text/plain; {ct_params}\r\nContent-Disposition: {disposition}"
        "\r\n\r\nattached text\r\n"
        f"--{b}\r\nContent-Type: application/octet-stream; {ct_params}\r\n"
        f"Content-Disposition: {disposition}\r\n\r\ndata\r\n"
        f"--{b}--\r\n")


def poison_messages() -> dict:
    """Name -> octets: a good message first and last, every poison message between."""
    messages = {"good-first": simple_message("a good message")}
    for codec in POISON_CODECS:
        messages[f"codec-{codec}"] = codec_message(codec)
    for kind in POISON_PARAMS:
        messages[f"params-{kind}"] = params_message(kind)
    messages["good-last"] = simple_message("another good message")
    return messages


def leaves(part):
    """The parts with content of a bodyStructure (multipart parts have no blobId)."""
    if (part.get("type") or "").startswith("multipart/"):
        for child in part.get("subParts") or []:
            yield from leaves(child)
    else:
        yield part


BODY_PROPERTIES = ["partId", "blobId", "size", "name", "type", "charset", "disposition", "cid",
                   "language", "location", "headers", "subParts"]


def check_poison_readable(client, expected_count):
    """Email/get (defaults, then every body property), Email/parse, part downloads."""
    ids = all_email_ids(client)
    assert len(ids) == expected_count, ids
    acc = client.account_id
    responses = client.request([
        ["Email/get", {"accountId": acc, "ids": ids, "properties": None}, "defaults"],
        ["Email/get", {"accountId": acc, "ids": ids, "fetchAllBodyValues": True,
                       "properties": ["id", "blobId", "subject", "from", "cc", "headers",
                                      "bodyStructure", "bodyValues", "textBody", "htmlBody",
                                      "attachments", "preview", "hasAttachment"],
                       "bodyProperties": BODY_PROPERTIES}, "body"],
    ])["methodResponses"]
    assert [r[0] for r in responses] == ["Email/get", "Email/get"], responses
    for name, out, call_id in responses:
        assert out["notFound"] == [], (call_id, out["notFound"])
        assert sorted(e["id"] for e in out["list"]) == sorted(ids), (call_id, out["list"])
    emails = responses[1][1]["list"]
    blob_ids = [e["blobId"] for e in emails]
    parsed = client.request([
        ["Email/parse", {"accountId": acc, "blobIds": blob_ids}, "p1"],
        ["Email/parse", {"accountId": acc, "blobIds": blob_ids, "fetchAllBodyValues": True,
                         "properties": ["subject", "from", "cc", "headers", "bodyStructure",
                                        "bodyValues", "attachments", "preview"],
                         "bodyProperties": BODY_PROPERTIES}, "p2"],
    ])["methodResponses"]
    assert [r[0] for r in parsed] == ["Email/parse", "Email/parse"], parsed
    for name, out, call_id in parsed:
        assert sorted(out["parsed"] or {}) == sorted(blob_ids), (call_id, out)
        assert not out.get("notParsable") and not out.get("notFound"), (call_id, out)
    failed, downloaded = [], 0
    for email in emails:
        for part in leaves(email["bodyStructure"]):
            downloaded += 1
            r = download(client, part["blobId"], part.get("name") or "part",
                         part.get("type") or "application/octet-stream")
            if r.status_code != 200:
                failed.append((email["subject"], part.get("partId"), r.status_code, r.text[:200]))
    assert not failed, failed
    assert downloaded >= 3 * (expected_count - 2), downloaded  # the parts were all seen


@pytest.fixture
def poison_user(srv):
    client = new_client(srv, "poison")
    yield client
    client.http.close()


def test_issue_16_poison_messages_by_lmtp(srv, poison_user):
    messages = poison_messages()
    refused = {}
    with smtplib.LMTP("127.0.0.1", srv.lmtp_port, timeout=WAIT_S) as lmtp:
        for name, raw in messages.items():
            try:
                errors = lmtp.sendmail("sender@example.net", [poison_user.username], raw)
            except smtplib.SMTPException as exc:
                refused[name] = repr(exc)
                lmtp.rset()
            else:
                if errors:
                    refused[name] = errors
    assert not refused, refused  # every one answered 250
    check_poison_readable(poison_user, len(messages))


def test_issue_16_poison_messages_by_deliver_command(srv, poison_user):
    messages = poison_messages()
    failed = {}
    for name, raw in messages.items():
        done = subprocess.run(
            [sys.executable, str(JMAPD), "deliver", "--user", poison_user.username,
             "--data-dir", str(srv.data_dir)],
            input=raw, capture_output=True, timeout=60)
        if done.returncode != 0:
            failed[name] = (done.returncode, done.stderr.decode(errors="replace")[-300:])
    assert not failed, failed
    check_poison_readable(poison_user, len(messages))


def test_issue_16_poison_messages_by_email_import(srv, poison_user):
    messages = poison_messages()
    failed = {}
    inbox = mailbox_ids(poison_user)["inbox"]
    for name, raw in messages.items():
        resp = import_raw(poison_user, raw, inbox)
        if resp[0] != "Email/import" or resp[1]["notCreated"] is not None:
            failed[name] = resp
    assert not failed, failed
    check_poison_readable(poison_user, len(messages))


# =============================================================================
# LMTP: smuggling, CR/NUL in commands, the connection limit
# =============================================================================


class RawLmtp:
    """An LMTP conversation over a raw socket (to send exactly the octets we choose)."""

    def __init__(self, port, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=WAIT_S,
                                             source_address=ATTACKER)
        self.file = self.sock.makefile("rb")

    def reply(self):
        """One (possibly multi-line) reply: (code, text); (None, '') at end of input."""
        lines = []
        while True:
            try:
                line = self.file.readline()
            except socket.timeout:
                raise AssertionError(f"no reply within {WAIT_S} s after {lines!r}") from None
            except ConnectionResetError:
                line = b""
            if not line:
                return (None, "") if not lines else (int(lines[0][:3]), "\n".join(lines))
            text = line.decode("latin-1").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    def send(self, data: bytes):
        self.sock.sendall(data)

    def cmd(self, line: bytes):
        self.send(line + b"\r\n")
        return self.reply()

    def close(self):
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def test_issue_16_lmtp_lf_dot_crlf_does_not_end_data(srv, user):
    rcpt = user.username.encode()
    lmtp = RawLmtp(srv.lmtp_port)
    try:
        assert lmtp.reply()[0] == 220
        assert lmtp.cmd(b"LHLO smuggler.example")[0] == 250
        assert lmtp.cmd(b"MAIL FROM:<sender@example.net>")[0] == 250
        assert lmtp.cmd(b"RCPT TO:<" + rcpt + b">")[0] == 250
        assert lmtp.cmd(b"DATA")[0] == 354
        lmtp.send(b"From: sender@example.net\r\nTo: " + rcpt + b"\r\nSubject: carrier\r\n"
                  b"Message-ID: <carrier@smuggle.test>\r\n\r\n"
                  b"foo\n.\r\n"
                  b"MAIL FROM:<x@y>\r\n"
                  b"RCPT TO:<" + rcpt + b">\r\n"
                  b"DATA\r\n"
                  b"From: x@y\r\nSubject: smuggled\r\n\r\n"
                  b"smuggled body\r\n"
                  b".\r\n")
        replies = [lmtp.reply()]
        lmtp.send(b"QUIT\r\n")
        while replies[-1][0] not in (221, None):
            replies.append(lmtp.reply())
    finally:
        lmtp.close()
    ids = all_email_ids(user)
    subjects = [e["subject"] for e in user.ok("Email/get", {
        "accountId": user.account_id, "ids": ids, "properties": ["subject"]})["list"]]
    assert len(ids) == 1, f"{len(ids)} messages stored: {subjects}; replies {replies}"
    assert [code for code, _ in replies] == [250, 221], replies
    blob = user.ok("Email/get", {"accountId": user.account_id, "ids": ids,
                                 "properties": ["blobId"]})["list"][0]["blobId"]
    r = download(user, blob, "m.eml", "message/rfc822")
    assert r.status_code == 200, r.text
    assert re.search(rb"foo\r?\n\.\r\nMAIL FROM:<x@y>\r\nRCPT TO:<[^>]+>\r\nDATA\r\n"
                     rb"From: x@y\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n?$", r.content), \
        r.content[-300:]


def test_issue_16_lmtp_cr_or_nul_in_a_command_is_501(srv, user):
    rcpt = user.username.encode()
    lmtp = RawLmtp(srv.lmtp_port)
    got = {}
    try:
        assert lmtp.reply()[0] == 220
        assert lmtp.cmd(b"LHLO client.example")[0] == 250
        for label, line in (("CR in MAIL", b"MAIL FROM:<a\rb@example.com>"),
                            ("NUL in MAIL", b"MAIL FROM:<a\x00b@example.com>")):
            got[label] = lmtp.cmd(line)
            lmtp.cmd(b"RSET")  # whatever happened, start over
        assert lmtp.cmd(b"MAIL FROM:<good@example.com>")[0] == 250
        for label, line in (("CR in RCPT", b"RCPT TO:<" + rcpt + b"\r>"),
                            ("NUL in RCPT", b"RCPT TO:<" + rcpt + b"\x00>")):
            got[label] = lmtp.cmd(line)
        lmtp.cmd(b"QUIT")
    finally:
        lmtp.close()
    assert {label: code for label, (code, _) in got.items()} == {
        "CR in MAIL": 501, "NUL in MAIL": 501, "CR in RCPT": 501, "NUL in RCPT": 501}, got


def test_issue_16_lmtp_connection_limit_answers_421(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "first@example.com")
    server = Server(data_dir, "--lmtp", "127.0.0.1:0", "--max-lmtp-connections", "2")
    opened = []
    try:
        server.start()  # today: exit 2, the option is unknown
        port = int(re.search(r"LMTP on 127\.0\.0\.1:(\d+)", server.log()).group(1))
        for _ in range(2):
            conn = RawLmtp(port)
            opened.append(conn)
            assert conn.reply()[0] == 220
        third = RawLmtp(port)
        opened.append(third)
        code, text = third.reply()
        assert code == 421, text
        assert text[4:9] == "4.3.2", text
        assert third.reply() == (None, ""), "the refused connection must be closed"
        # The two admitted connections still work.
        for conn in opened[:2]:
            assert conn.cmd(b"NOOP")[0] == 250
        # Once one of them leaves, a new connection is admitted.
        opened[0].cmd(b"QUIT")
        opened[0].close()
        deadline = time.monotonic() + WAIT_S
        while True:
            conn = RawLmtp(port)
            opened.append(conn)
            code, text = conn.reply()
            if code == 220 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert code == 220, text
    finally:
        for conn in opened:
            conn.close()
        server.stop()


# =============================================================================
# EventSource slots (--max-push-connections)
# =============================================================================


def event_source_url(client) -> str:
    url = client.session["eventSourceUrl"]
    for name, value in {"types": "*", "closeafter": "no", "ping": "0"}.items():
        url = url.replace("{" + name + "}", value)
    return url


class Stream:
    """One EventSource GET on a connection of its own (requests, stream=True)."""

    def __init__(self, client):
        self.http = requests.Session()
        self.http.auth = client.http.auth
        self.response = self.http.get(event_source_url(client), stream=True,
                                      timeout=(WAIT_S, WAIT_S),
                                      headers={"Accept": "text/event-stream"})
        self.status = self.response.status_code
        self.lines = None

    def problem(self):
        assert self.response.headers.get("Content-Type", "").startswith(PROBLEM_TYPE), \
            self.response.headers
        return self.response.json()

    def next_state(self) -> dict:
        """Read events until a `state` one; return its data (the StateChange)."""
        event, data = None, []
        if self.lines is None:  # one iterator for the stream's life: it buffers
            self.lines = self.response.iter_lines(chunk_size=1, decode_unicode=True)
        for line in self.lines:
            if line == "":
                if event == "state" and data:
                    return json.loads("\n".join(data))
                event, data = None, []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        raise AssertionError("the stream ended")

    def wait_state(self, account_id, type_name, state):
        """Read StateChanges (an initial one may come first) until type_name is at state."""
        seen = []
        while True:
            change = self.next_state()
            seen.append(change)
            if change.get("changed", {}).get(account_id, {}).get(type_name) == state:
                return
            assert len(seen) < 20, seen

    def close(self):
        self.response.close()
        self.http.close()


def test_issue_16_eventsource_reopen_gets_a_slot_at_once(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "first@example.com")
    server = Server(data_dir, "--max-push-connections", "2").start()
    streams, client = [], None
    try:
        client = new_client(server, "es")
        client.ok("Mailbox/get", {"accountId": client.account_id, "ids": []})
        first, second = Stream(client), Stream(client)
        streams += [first, second]
        assert (first.status, second.status) == (200, 200)
        statuses = []
        for _ in range(5):  # a tab reloaded again and again: close, then open at once
            second.close()
            started = time.monotonic()
            second = Stream(client)
            streams.append(second)
            statuses.append((second.status, round(time.monotonic() - started, 2)))
        assert [s for s, _ in statuses] == [200] * 5, statuses
        assert all(seconds < 3 for _, seconds in statuses), statuses
        # Live streams are never ended to admit another: the third is refused...
        third = Stream(client)
        streams.append(third)
        assert third.status != 200, third.status
        assert third.problem()["type"] == ERROR + "limit", third.problem()
        # ...and both live streams still carry pushes.
        created = client.ok("Mailbox/set", {"accountId": client.account_id,
                                            "create": {"m": {"name": "pushed"}}})
        assert "m" in created["created"], created
        for stream in (first, second):
            stream.wait_state(client.account_id, "Mailbox", created["newState"])
    finally:
        for stream in streams:
            stream.close()
        if client is not None:
            client.http.close()
        server.stop()


# =============================================================================
# Others: EmailSubmission with a foreign Sender; Mailbox sibling names
# =============================================================================


def test_issue_16_submission_with_foreign_sender_is_forbidden_from(srv, user, sink):
    acc = user.account_id
    using = [CORE, MAIL, SUBMISSION]
    identities = user.ok("Identity/get", {"accountId": acc, "ids": None}, using=using)["list"]
    identity = next(i["id"] for i in identities if i["email"] == user.username)
    drafts = mailbox_ids(user)["drafts"]
    recipient = f"rcpt-{secrets.token_hex(4)}@example.net"
    made = user.ok("Email/set", {"accountId": acc, "create": {"d": {
        "mailboxIds": {drafts: True}, "keywords": {"$draft": True},
        "from": [{"name": None, "email": user.username}],
        "sender": [{"name": "The Boss", "email": "boss@elsewhere.example"}],
        "to": [{"name": None, "email": recipient}], "subject": "on behalf",
        "textBody": [{"partId": "t", "type": "text/plain"}],
        "bodyValues": {"t": {"value": "Sent as someone else.\n"}}}}})
    assert made["notCreated"] is None, made["notCreated"]
    email_id = made["created"]["d"]["id"]
    out = user.ok("EmailSubmission/set", {"accountId": acc, "create": {
        "s": {"identityId": identity, "emailId": email_id}}}, using=using)
    assert not out.get("created"), out["created"]
    assert (out["notCreated"] or {}).get("s", {}).get("type") == "forbiddenFrom", out


def mailbox_set(client, **args):
    return client.ok("Mailbox/set", {"accountId": client.account_id, **args})


def already_exists(error, existing_id):
    assert error is not None, "no SetError"
    assert error.get("type") == "alreadyExists", error
    assert error.get("existingId") == existing_id, error
    assert error.get("properties") == ["name"], error


def test_issue_16_mailbox_sibling_name_clash_is_already_exists(user):
    made = mailbox_set(user, create={
        "work": {"name": "Work"}, "home": {"name": "Home"},
        "sub": {"name": "Work", "parentId": "#home"}, "other": {"name": "Other"},
        "mover": {"name": "Mover"}, "box": {"name": "Box"},
        "inner": {"name": "Mover", "parentId": "#box"}})
    assert made["notCreated"] is None, made["notCreated"]
    ids = {key: value["id"] for key, value in made["created"].items()}
    problems = []

    def check(what, error, existing_id):
        try:
            already_exists(error, existing_id)
        except AssertionError as exc:
            problems.append((what, str(exc)))

    resp = mailbox_set(user, create={"top": {"name": "Work"},
                                     "child": {"name": "Work", "parentId": ids["home"]}})
    check("create at the top", (resp["notCreated"] or {}).get("top"), ids["work"])
    check("create in a parent", (resp["notCreated"] or {}).get("child"), ids["sub"])
    resp = mailbox_set(user, update={ids["other"]: {"name": "Work"}})
    check("rename", (resp["notUpdated"] or {}).get(ids["other"]), ids["work"])
    resp = mailbox_set(user, update={ids["mover"]: {"parentId": ids["box"]}})
    check("move", (resp["notUpdated"] or {}).get(ids["mover"]), ids["inner"])
    resp = mailbox_set(user, update={ids["sub"]: {"parentId": None}})
    check("move to the top", (resp["notUpdated"] or {}).get(ids["sub"]), ids["work"])
    assert not problems, problems


def test_issue_16_escape_codecs_are_no_charsets(tmp_path):
    """A charset naming Python's unicode_escape (or raw_unicode_escape) codec: it turns
    "\\ud9ea" into a lone surrogate, which SQLite's UTF-8 (and JSON) cannot carry; LMTP
    answered 451 forever (found by contrib/fuzz.py). The body is read as UTF-8 instead."""
    data_dir = tmp_path / "data"
    add_user(data_dir, "esc@example.com")
    port = free_port()
    srv = Server(data_dir, "--lmtp", f"127.0.0.1:{port}").start()
    try:
        for codec in ("unicode_escape", "raw_unicode_escape", "unicode-escape"):
            message = (f"From: a@example.com\r\nTo: esc@example.com\r\nSubject: {codec}\r\n"
                       f"Content-Type: text/plain; charset={codec}\r\n\r\n"
                       "lone \\ud9ea surrogate escape\r\n").encode()
            with smtplib.LMTP("127.0.0.1", port) as lmtp:
                refused = lmtp.sendmail("a@example.com", ["esc@example.com"], message)
            assert refused == {}, refused
        client = Client(srv.url, "esc@example.com")
        ids = client.ok("Email/query", {"accountId": client.account_id,
                                        "filter": {"text": "surrogate"}})["ids"]
        assert len(ids) == 3
        got = client.ok("Email/get", {"accountId": client.account_id, "ids": ids,
                                      "properties": ["bodyValues", "preview"],
                                      "fetchAllBodyValues": True})
        assert len(got["list"]) == 3 and got["notFound"] == []
        for email in got["list"]:
            assert "surrogate escape" in email["preview"], email
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


def test_issue_16_huge_address_list_parsed_in_part(srv, user):
    """A To field naming 30,000 recipients (~700 KB on one line): the Addresses form gives
    the first 2000 (parsing all would cost hundreds of megabytes for a 10 MB field), the
    Raw form keeps every one, and the message is stored and searchable like any other."""
    count = 30_000
    to = ", ".join(f"User {i} <user{i:06d}@example.com>" for i in range(count))
    raw = (f"From: Mallory <mallory@example.net>\r\nTo: {to}\r\nSubject: huge list\r\n"
           "Message-ID: <huge-list@example.net>\r\n\r\nhello everybody\r\n").encode()
    resp = import_raw(user, raw)
    assert resp[0] == "Email/import" and resp[1]["notCreated"] is None, resp
    email_id = resp[1]["created"]["i"]["id"]
    got = user.ok("Email/get", {"accountId": user.account_id, "ids": [email_id],
                                "properties": ["to", "header:To", "header:To:asGroupedAddresses",
                                               "subject"]})["list"][0]
    assert got["subject"] == "huge list"
    assert len(got["to"]) == 2000
    assert got["to"][0] == {"name": "User 0", "email": "user000000@example.com"}
    assert got["to"][-1] == {"name": "User 1999", "email": "user001999@example.com"}
    assert got["header:To"].count("@example.com") == count
    assert got["header:To:asGroupedAddresses"] == [{"name": None, "addresses": got["to"]}]
    for address in ("user001234@example.com", "user029999@example.com"):  # all searchable
        found = user.ok("Email/query", {"accountId": user.account_id,
                                        "filter": {"to": address}})["ids"]
        assert email_id in found, address
    gone = user.ok("Email/set", {"accountId": user.account_id, "destroy": [email_id]})
    assert gone["destroyed"] == [email_id]
    assert user.ok("Email/query", {"accountId": user.account_id,
                                   "filter": {"to": "user029999@example.com"}})["ids"] == []
