"""HTTP front of jmapd (sections 5 and 13, 14 serve): app passwords, login limits,
proxies, the Unix socket, CORS, --public-url, graceful stop and sd_notify.

RFC 8620 §2 (session resource and its URLs), §2.2 (autodiscovery), §3.1 (API endpoint);
RFC 7617 (HTTP Basic), RFC 6750 §2.1 (Bearer tokens), RFC 6585 §4 (429 and Retry-After),
RFC 7807 (problem documents), RFC 7239 / X-Forwarded-* (proxy headers, trusted peers only),
the Fetch standard's CORS protocol, and systemd's sd_notify(3) protocol (READY=1, STOPPING=1).

Everything talks to real `jmapd.py serve` subprocesses as a client would. Tests that need
small limits, proxy trust, a Unix socket or a signal start a server of their own.
"""

import base64
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import CORE, JMAPD, MAIL, PASSWORD, USING, Client, Server, add_user, run_cli

UNIX_SOCKET_BUG = ("jmapd bug: serve --unix-socket exits 1 with a traceback: waitress."
                   "create_server(sockets=[tcp, unix]) raises 'Internet and UNIX sockets may "
                   "not be mixed.' (waitress 2.1 and 3.x)")
TOKEN_SHAPE = re.compile(r"^([A-Za-z0-9_-]{8,32})\.([A-Za-z0-9_-]{16,128})$")
PROBLEM_TYPE = "application/problem+json"
ALICE = "alice@example.com"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path):
    """Start servers of this test's own on fresh data dirs; all stopped at teardown."""
    started = []
    serial = iter(range(1, 100))

    def start(*extra, users=("alice@example.com",)):
        data_dir = tmp_path / f"data{next(serial)}"
        for user in users:
            add_user(data_dir, user)
        srv = Server(data_dir, *extra).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def basic(username, password):
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def session_status(url, username, password, headers=None):
    r = requests.get(url + "/jmap/session", auth=(username, password), headers=headers or {},
                     timeout=30)
    return r.status_code


def get_session(url, headers):
    r = requests.get(url + "/jmap/session", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def echo_status(api_url, headers):
    """POST Core/echo to api_url with the given auth headers; return (status, body)."""
    body = {"using": [CORE], "methodCalls": [["Core/echo", {"ping": "pong"}, "e"]]}
    r = requests.post(api_url, json=body, headers=headers, timeout=30)
    return r.status_code, (r.json() if r.status_code == 200 else r.text)


def assert_echo_ok(api_url, headers):
    status, body = echo_status(api_url, headers)
    assert status == 200, body
    assert body["methodResponses"] == [["Core/echo", {"ping": "pong"}, "e"]]


def assert_429(response):
    """A rate-limited login: 429, Retry-After within the window, a problem document."""
    assert response.status_code == 429, (response.status_code, response.text)
    retry_after = response.headers.get("Retry-After", "")
    assert retry_after.isdigit(), response.headers
    assert 1 <= int(retry_after) <= 900
    assert response.headers["Content-Type"].split(";")[0].strip() == PROBLEM_TYPE
    problem = response.json()
    assert problem["status"] == 429
    assert "type" in problem


def login(url, username, password, headers=None):
    return requests.get(url + "/jmap/session", auth=(username, password),
                        headers=headers or {}, timeout=30)


def token_add(data_dir, username, label):
    done = run_cli("user", "token", "add", username, label, data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return done


def new_token(data_dir, username, label="phone"):
    lines = [line for line in token_add(data_dir, username, label).stdout.splitlines() if line]
    assert len(lines) == 1, lines
    return lines[0].strip()


# ---------------------------------------------------------------------------
# app passwords
# ---------------------------------------------------------------------------


def test_http_token_add_prints_id_dot_secret_once(server, client):
    done = token_add(server.data_dir, client.username, "my phone")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout
    match = TOKEN_SHAPE.match(lines[0].strip())
    assert match, lines[0]
    token_id, secret = match.groups()
    assert secret not in done.stderr
    second = new_token(server.data_dir, client.username, "laptop")
    assert second.split(".")[0] != token_id and second.split(".")[1] != secret

    listed = run_cli("user", "token", "list", client.username, data_dir=server.data_dir)
    assert listed.returncode == 0, listed.stderr
    assert token_id in listed.stdout and "my phone" in listed.stdout
    assert second.split(".")[0] in listed.stdout and "laptop" in listed.stdout
    assert secret not in listed.stdout + listed.stderr
    assert second.split(".")[1] not in listed.stdout + listed.stderr


def test_http_token_as_basic_password(server, client):
    token = new_token(server.data_dir, client.username)
    session = get_session(server.url, {"Authorization": basic(client.username, token)})
    assert session["username"] == client.username
    assert session["primaryAccounts"][MAIL] == client.account_id
    assert_echo_ok(session["apiUrl"], {"Authorization": basic(client.username, token)})


def test_http_token_as_bearer(server, client):
    token = new_token(server.data_dir, client.username)
    session = get_session(server.url, {"Authorization": f"Bearer {token}"})
    assert session["username"] == client.username
    assert session["primaryAccounts"][MAIL] == client.account_id
    assert_echo_ok(session["apiUrl"], {"Authorization": f"Bearer {token}"})
    # The token reaches the user's own data, e.g. their Mailboxes.
    body = {"using": USING,
            "methodCalls": [["Mailbox/get", {"accountId": client.account_id, "ids": None}, "m"]]}
    r = requests.post(session["apiUrl"], json=body, timeout=30,
                      headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    roles = {m["role"] for m in r.json()["methodResponses"][0][1]["list"]}
    assert "inbox" in roles


def test_http_token_revoke_takes_effect_at_once(server, client):
    token = new_token(server.data_dir, client.username)
    token_id = token.split(".")[0]
    as_basic = {"Authorization": basic(client.username, token)}
    as_bearer = {"Authorization": f"Bearer {token}"}
    api_url = client.session["apiUrl"]
    # Both forms verified now, so both are in the server's two-minute credential cache.
    assert_echo_ok(api_url, as_basic)
    assert_echo_ok(api_url, as_bearer)

    done = run_cli("user", "token", "revoke", client.username, token_id,
                   data_dir=server.data_dir)
    assert done.returncode == 0, done.stderr

    for headers in (as_basic, as_bearer):
        status, _ = echo_status(api_url, headers)
        assert status == 401
        r = requests.get(server.url + "/jmap/session", headers=headers, timeout=30)
        assert r.status_code == 401
    listed = run_cli("user", "token", "list", client.username, data_dir=server.data_dir)
    assert token_id not in listed.stdout
    # The account's own password is unaffected.
    assert session_status(server.url, client.username, PASSWORD) == 200


def test_http_token_revoke_is_scoped_to_its_user(server, client, other_client):
    token = new_token(server.data_dir, client.username)
    done = run_cli("user", "token", "revoke", other_client.username, token.split(".")[0],
                   data_dir=server.data_dir)
    assert done.returncode == 1
    assert_echo_ok(client.session["apiUrl"], {"Authorization": f"Bearer {token}"})


def test_http_token_of_one_user_is_not_a_password_of_another(server, client, other_client):
    token = new_token(server.data_dir, client.username)
    assert session_status(server.url, client.username, token) == 200
    assert session_status(server.url, other_client.username, token) == 401
    status, _ = echo_status(client.session["apiUrl"],
                            {"Authorization": basic(other_client.username, token)})
    assert status == 401


@pytest.mark.parametrize("credentials", [
    "garbage",
    "abcdefgh.abcdefghijklmnopqrstuvwxyz",  # the right shape, no such app password
    "",
])
def test_http_bearer_garbage_is_401(server, client, credentials):
    r = requests.get(server.url + "/jmap/session", timeout=30,
                     headers={"Authorization": f"Bearer {credentials}".strip()})
    assert r.status_code == 401
    assert "WWW-Authenticate" in r.headers
    status, _ = echo_status(client.session["apiUrl"], {"Authorization": f"Bearer {credentials}"})
    assert status == 401


def test_http_bearer_right_id_wrong_secret_is_401(server, client):
    token = new_token(server.data_dir, client.username)
    token_id, secret = token.split(".")
    wrong = token_id + "." + ("A" if secret[0] != "A" else "B") + secret[1:]
    r = requests.get(server.url + "/jmap/session", headers={"Authorization": f"Bearer {wrong}"},
                     timeout=30)
    assert r.status_code == 401


# ---------------------------------------------------------------------------
# login rate limiting
# ---------------------------------------------------------------------------


def test_http_login_limit_per_address(own_server):
    users = ("alice@example.com", "bob@example.com", "carol@example.com")
    srv = own_server("--max-login-failures-per-address", "3",
                     "--max-login-failures-per-user", "1000", users=users)
    alice, bob, carol = users
    assert login(srv.url, alice, "wrong 1").status_code == 401
    assert login(srv.url, alice, "wrong 2").status_code == 401
    # Just under the limit (2 of 3): a right password still gets in.
    assert login(srv.url, bob, PASSWORD).status_code == 200
    assert login(srv.url, alice, "wrong 3").status_code == 401
    # Over it: even the right password, and for any username from this address.
    assert_429(login(srv.url, alice, PASSWORD))
    assert_429(login(srv.url, carol, PASSWORD))
    assert_429(login(srv.url, bob, "wrong 4"))
    r = requests.get(srv.url + "/jmap/session", headers={"Authorization": "Bearer garbage"},
                     timeout=30)
    assert_429(r)


def test_http_login_limit_applies_to_recently_verified_password(own_server):
    alice = "alice@example.com"
    srv = own_server("--max-login-failures-per-address", "3",
                     "--max-login-failures-per-user", "1000", users=(alice,))
    assert login(srv.url, alice, PASSWORD).status_code == 200  # e.g. alice's own phone
    for attempt in range(3):
        assert login(srv.url, alice, f"guess {attempt}").status_code == 401
    assert_429(login(srv.url, alice, "guess 3"))
    assert_429(login(srv.url, alice, PASSWORD))  # the next attempt, even correct


def test_http_login_limit_per_user(own_server):
    users = ("alice@example.com", "bob@example.com")
    srv = own_server("--max-login-failures-per-address", "1000",
                     "--max-login-failures-per-user", "2", users=users)
    alice, bob = users
    assert login(srv.url, alice, "wrong 1").status_code == 401
    assert login(srv.url, alice, PASSWORD).status_code == 200  # 1 of 2: still fine
    assert login(srv.url, alice, "wrong 2").status_code == 401
    assert_429(login(srv.url, alice, "wrong 3"))
    assert_429(login(srv.url, "ALICE@example.com", "wrong 4"))  # usernames fold to lower case
    # The per-user limit blocks alice only; bob, from the same address, is not limited.
    assert login(srv.url, bob, PASSWORD).status_code == 200
    assert login(srv.url, bob, "wrong").status_code == 401


# ---------------------------------------------------------------------------
# proxy headers
# ---------------------------------------------------------------------------

FORGED = {
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "forged.example",
}


def port_of(url):
    return int(url.rsplit(":", 1)[1])


def test_http_forwarded_headers_from_untrusted_peer_ignored(own_server):
    alice, bob = "alice@example.com", "bob@example.com"
    srv = own_server("--max-login-failures-per-address", "2", users=(alice, bob))
    # (bob looks at URLs; alice, never logged in, so never cached, meets the limiter)
    headers = {**FORGED, "Authorization": basic(bob, PASSWORD)}
    session = get_session(srv.url, headers)
    assert session["apiUrl"] == f"http://127.0.0.1:{port_of(srv.url)}/jmap/api/"
    for key in ("downloadUrl", "uploadUrl", "eventSourceUrl"):
        assert session[key].startswith(f"http://127.0.0.1:{port_of(srv.url)}/jmap/"), session
    r = requests.get(srv.url + "/.well-known/jmap", headers=FORGED, allow_redirects=False,
                     timeout=30)
    assert r.headers["Location"] == f"http://127.0.0.1:{port_of(srv.url)}/jmap/session"
    # A forged client address does not buy a fresh failure budget.
    for n in range(2):
        r = login(srv.url, alice, "wrong", {"X-Forwarded-For": f"198.51.100.{n + 1}"})
        assert r.status_code == 401
    assert_429(login(srv.url, alice, PASSWORD, {"X-Forwarded-For": "198.51.100.99"}))


def test_http_forwarded_headers_from_trusted_proxy_honoured(own_server):
    alice, bob = "alice@example.com", "bob@example.com"
    srv = own_server("--trusted-proxy", "127.0.0.1", "--max-login-failures-per-address", "2",
                     users=(alice, bob))
    # (bob looks at URLs; alice, never logged in, so never cached, meets the limiter)
    session = get_session(srv.url, {**FORGED, "Authorization": basic(bob, PASSWORD)})
    assert session["apiUrl"] == "https://forged.example/jmap/api/"
    assert session["uploadUrl"].startswith("https://forged.example/jmap/upload/")
    r = requests.get(srv.url + "/.well-known/jmap", headers=FORGED, allow_redirects=False,
                     timeout=30)
    assert r.headers["Location"] == "https://forged.example/jmap/session"
    # Without the headers, the URLs are the direct ones again.
    plain = get_session(srv.url, {"Authorization": basic(bob, PASSWORD)})
    assert plain["apiUrl"] == f"http://127.0.0.1:{port_of(srv.url)}/jmap/api/"

    # The limiter keys on the forwarded client address: each gets its own 2 failures.
    for client_ip in ("198.51.100.1", "198.51.100.2"):
        xff = {"X-Forwarded-For": client_ip}
        assert login(srv.url, alice, "wrong 1", xff).status_code == 401
        assert login(srv.url, alice, "wrong 2", xff).status_code == 401
        assert_429(login(srv.url, alice, "wrong 3", xff))
    # The rightmost address that is not a trusted proxy is the client.
    assert_429(login(srv.url, alice, "wrong", {"X-Forwarded-For": "198.51.100.1, 127.0.0.1"}))
    r = login(srv.url, alice, "wrong", {"X-Forwarded-For": "198.51.100.1, 198.51.100.3"})
    assert r.status_code == 401
    # The proxy's own address (no X-Forwarded-For) was never charged.
    assert login(srv.url, alice, PASSWORD).status_code == 200


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix stream socket."""

    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def unix_request(path, method, target, headers=None, body=None):
    conn = UnixHTTPConnection(path)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.fixture
def short_dir():
    """A short private temp dir (AF_UNIX paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="jmapd-") as path:
        yield Path(path)


def test_http_unix_socket_serves_and_honours_forwarded(own_server, short_dir):
    alice = "alice@example.com"
    sock_path = short_dir / "http.sock"
    srv = own_server("--unix-socket", sock_path, "--max-login-failures-per-address", "2",
                     users=(alice,))
    auth = {"Authorization": basic(alice, PASSWORD)}

    status, _, body = unix_request(sock_path, "GET", "/jmap/session", auth)
    assert status == 200, body
    assert json.loads(body)["username"] == alice

    status, _, body = unix_request(sock_path, "GET", "/jmap/session", {**auth, **FORGED})
    assert status == 200, body
    session = json.loads(body)
    assert session["apiUrl"] == "https://forged.example/jmap/api/"

    request = json.dumps({"using": [CORE], "methodCalls": [["Core/echo", {"a": 1}, "e"]]})
    status, _, body = unix_request(sock_path, "POST", "/jmap/api/", body=request,
                                   headers={**auth, "Content-Type": "application/json"})
    assert status == 200, body
    assert json.loads(body)["methodResponses"] == [["Core/echo", {"a": 1}, "e"]]

    # X-Forwarded-For from the socket is the client address the limiter keys on.
    wrong = {"Authorization": basic(alice, "wrong")}
    for client_ip in ("198.51.100.1", "198.51.100.2"):
        for _ in range(2):
            status, _, _ = unix_request(sock_path, "GET", "/jmap/session",
                                        {**wrong, "X-Forwarded-For": client_ip})
            assert status == 401
        status, headers, _ = unix_request(sock_path, "GET", "/jmap/session",
                                          {**wrong, "X-Forwarded-For": client_ip})
        assert status == 429
        assert "Retry-After" in headers

    # Trusting the socket does not make TCP peers trusted.
    tcp = get_session(srv.url, {**auth, **FORGED})
    assert tcp["apiUrl"] == f"http://127.0.0.1:{port_of(srv.url)}/jmap/api/"

    srv.stop()
    assert srv.proc.returncode == 0
    assert not sock_path.exists()


# ---------------------------------------------------------------------------
# CORS
# ---------------------------------------------------------------------------


def header_list(value):
    return {item.strip().lower() for item in (value or "").split(",") if item.strip()}


@pytest.mark.parametrize("path", ["/jmap/api/", "/jmap/session"])
def test_http_cors_preflight_without_credentials(server, path):
    r = requests.options(server.url + path, timeout=30, headers={
        "Origin": "https://webmail.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert r.status_code == 204
    assert r.headers.get("Access-Control-Allow-Origin") in ("*", "https://webmail.example")
    assert "post" in header_list(r.headers.get("Access-Control-Allow-Methods"))
    allowed = header_list(r.headers.get("Access-Control-Allow-Headers"))
    assert {"authorization", "content-type"} <= allowed


def test_http_cors_on_normal_and_401_responses(server, client):
    origin = {"Origin": "https://webmail.example"}
    ok = client.http.get(server.url + "/jmap/session", headers=origin, timeout=30)
    assert ok.status_code == 200
    assert "Access-Control-Allow-Origin" in ok.headers
    api = client.post({"using": [CORE], "methodCalls": [["Core/echo", {}, "e"]]},
                      headers={**origin, "Content-Type": "application/json"})
    assert api.status_code == 200
    assert "Access-Control-Allow-Origin" in api.headers
    denied = requests.get(server.url + "/jmap/session", headers=origin, timeout=30)
    assert denied.status_code == 401
    assert "Access-Control-Allow-Origin" in denied.headers
    denied_api = requests.post(client.session["apiUrl"], headers=origin, json={}, timeout=30)
    assert denied_api.status_code == 401
    assert "Access-Control-Allow-Origin" in denied_api.headers


# ---------------------------------------------------------------------------
# --public-url
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("public_url", ["https://mail.example.com", "https://mail.example.com/"])
def test_http_public_url_makes_session_urls_absolute(own_server, public_url):
    alice = "alice@example.com"
    srv = own_server("--public-url", public_url, users=(alice,))
    session = get_session(srv.url, {**FORGED, "Authorization": basic(alice, PASSWORD),
                                    "Host": "other.example:1234"})
    assert session["apiUrl"] == "https://mail.example.com/jmap/api/"
    for key in ("downloadUrl", "uploadUrl", "eventSourceUrl"):
        assert session[key].startswith("https://mail.example.com/jmap/"), session[key]
    r = requests.get(srv.url + "/.well-known/jmap", allow_redirects=False, timeout=30)
    assert r.status_code in (301, 302, 307, 308)
    assert r.headers["Location"] == "https://mail.example.com/jmap/session"
    # The API itself is reached directly; only the advertised URLs change.
    assert_echo_ok(srv.url + "/jmap/api/", {"Authorization": basic(alice, PASSWORD)})


# ---------------------------------------------------------------------------
# graceful stop (SIGTERM) and sd_notify
# ---------------------------------------------------------------------------

HEAVY_CALLS, HEAVY_PER_CALL = 16, 300  # 4800 Mailboxes in one request: seconds of work


def heavy_request(account_id, tag):
    return [["Mailbox/set", {"accountId": account_id, "create": {
        f"k{i}x{j}": {"name": f"{tag} {i}-{j}"} for j in range(HEAVY_PER_CALL)}}, f"c{i}"]
        for i in range(HEAVY_CALLS)]


def connection_refused(url, timeout=15):
    """Wait until a new TCP connection to url is refused; False if it never is."""
    host, port = url.split("//")[1].rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                pass
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def test_http_sigterm_finishes_request_in_flight(own_server):
    alice = "alice@example.com"
    srv = own_server("--max-objects-in-set", "500", users=(alice,))
    client = Client(srv.url, alice)
    account_id = client.account_id
    calls = heavy_request(account_id, "drain")
    outcome = {}

    def send():
        try:
            outcome["response"] = client.post({"using": USING, "methodCalls": calls})
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = exc

    worker = threading.Thread(target=send)
    worker.start()
    time.sleep(0.3)
    in_flight = worker.is_alive()
    srv.proc.send_signal(signal.SIGTERM)
    refused = connection_refused(srv.url)
    worker.join(120)
    assert in_flight, "the request finished before SIGTERM: make HEAVY_* bigger"
    assert refused, "new connections were still accepted after SIGTERM"
    assert "error" not in outcome, outcome.get("error")
    response = outcome["response"]
    assert response.status_code == 200, response.text
    responses = response.json()["methodResponses"]
    assert [r[0] for r in responses] == ["Mailbox/set"] * HEAVY_CALLS
    assert all(len(r[1]["created"]) == HEAVY_PER_CALL for r in responses), responses
    assert srv.proc.wait(60) == 0

    again = Server(srv.data_dir, "--max-objects-in-get", "10000").start()
    try:
        names = {m["name"] for m in Client(again.url, alice).ok(
            "Mailbox/get", {"accountId": account_id, "ids": None, "properties": ["name"]})["list"]}
    finally:
        again.stop()
    expected = {spec["name"] for call in calls for spec in call[1]["create"].values()}
    assert expected <= names


def test_http_sigterm_finishes_upload_still_arriving(own_server):
    srv = own_server(users=(ALICE,))
    client = Client(srv.url, ALICE)
    upload_url = client.session["uploadUrl"].replace("{accountId}", client.account_id)
    path = upload_url[len(srv.url):]
    chunk, chunks = secrets.token_bytes(100_000), 20
    with socket.create_connection(("127.0.0.1", port_of(srv.url)), timeout=30) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port_of(srv.url)}\r\n"
                      f"Authorization: {basic(ALICE, PASSWORD)}\r\n"
                      f"Content-Type: application/octet-stream\r\n"
                      f"Content-Length: {len(chunk) * chunks}\r\nConnection: close\r\n\r\n"
                      ).encode())
        for n in range(chunks):  # a phone on a slow link: the body trickles in
            sock.sendall(chunk)
            if n == 3:
                srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        response = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201"), response[:300]
    uploaded = json.loads(body)
    assert uploaded["size"] == len(chunk) * chunks
    assert srv.proc.wait(60) == 0

    again = Server(srv.data_dir).start()
    try:
        after = Client(again.url, ALICE)
        url = (after.session["downloadUrl"].replace("{accountId}", after.account_id)
               .replace("{blobId}", uploaded["blobId"]).replace("{name}", "x")
               .replace("{type}", "application/octet-stream"))
        r = after.http.get(url, timeout=30)
        assert r.status_code == 200
        assert r.content == chunk * chunks
    finally:
        again.stop()


def start_with_env(data_dir, log_path, env, *extra):
    """Start `jmapd.py serve` with extra environment variables; return the Popen."""
    cmd = [sys.executable, str(JMAPD), "serve", "--listen", "127.0.0.1:0",
           "--data-dir", str(data_dir), "--test-cheap-hashing", *map(str, extra)]
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env})
    finally:
        log.close()


def recv_notify(sock, proc, timeout=20):
    """Receive one sd_notify datagram as a set of its lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(0.2)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            if proc.poll() is not None:
                pytest.fail(f"jmapd exited {proc.returncode} before notifying")
            continue
        return set(data.decode().split("\n")) - {""}
    pytest.fail("no sd_notify message")


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_http_sd_notify_ready_and_stopping(tmp_path, short_dir, kind):
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice@example.com")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(short_dir / "notify")
        sock.bind(address)
    else:
        name = f"jmapd-test-{secrets.token_hex(8)}"
        sock.bind("\0" + name)
        address = "@" + name
    log_path = tmp_path / "serve.log"
    proc = start_with_env(data_dir, log_path, {"NOTIFY_SOCKET": address})
    try:
        ready = recv_notify(sock, proc)
        assert "READY=1" in ready
        # READY means it answers HTTP now, without any retrying.
        match = re.search(r"listening on (http://\S+?)/? ", log_path.read_text())
        assert match, log_path.read_text()
        url = match.group(1).rstrip("/")
        r = requests.get(url + "/.well-known/jmap", allow_redirects=False, timeout=10)
        assert r.status_code in (301, 302, 307, 308)
        assert session_status(url, "alice@example.com", PASSWORD) == 200

        proc.send_signal(signal.SIGTERM)
        stopping = recv_notify(sock, proc)
        assert "STOPPING=1" in stopping
        assert "READY=1" not in stopping
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
