"""Issue 16 (hardening), the listeners: slow and half-sent request heads, connections per
client address, request bodies before authentication, half-open WebSocket handshakes,
lockout of a user by strangers, and waitress's own log lines.

RFC 9112 §2-§3 and §6 (a request head, then a body framed by Content-Length or chunked
Transfer-Encoding), §9.6 (Connection: close); RFC 9110 §15.5.2 (401 with
WWW-Authenticate, §11.6.1), §15.5.5 (404), §15.6.4 (503 with Retry-After, §10.2.3);
RFC 6585 §4 (429 Too Many Requests); RFC 7617 (HTTP Basic); RFC 7807 (problem
documents); RFC 8620 §2 (the session resource and its capabilities, here
urn:ietf:params:jmap:websocket's url), §2.2 (autodiscovery: /.well-known/jmap answers
307), §3.1 (the API endpoint), §6.1 (uploads); RFC 6455 §4.1/§4.2 (the opening
handshake: 101 with Sec-WebSocket-Accept) and RFC 8887 §4.2 (Sec-WebSocket-Protocol:
jmap).

Every server is a real `jmapd.py serve` subprocess on a free loopback port with a
temporary data directory. Attackers connect from 127.0.0.2, 127.0.0.3, ... (client
sockets bound to those source addresses: the loopback /8 on Linux); the owner connects
from 127.0.0.1. Clients are independent of jmapd: raw sockets, http.client and
`requests`; only the LoginLimiter flood test imports jmapd. Anything that would hang on
a server without the fix has a timeout, so the test fails instead.
"""

import base64
import hashlib
import http.client
import json
import os
import re
import select
import socket
import sqlite3
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter

from conftest import CORE, MAIL, PASSWORD, ROOT, Server, add_user, run_cli

ALICE = "alice@example.com"
OWNER = "127.0.0.1"
PROBLEM_TYPE = "application/problem+json"
WEBSOCKET = "urn:ietf:params:jmap:websocket"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
PROMPT_S = 3  # "at once" / "within a few seconds": the server needs well under a second
BIG = 50_000_000  # a declared body the server must never wait for before it answers
MIB = 1 << 20


# =============================================================================
# Servers and sockets (all stopped / closed at teardown)
# =============================================================================


@pytest.fixture
def own_server(tmp_path):
    """Start servers of this test's own on fresh data dirs; all stopped at teardown."""
    started = []
    serial = iter(range(1, 100))

    def start(*extra, users=(ALICE,)):
        data_dir = tmp_path / f"data{next(serial)}"
        for user in users:
            add_user(data_dir, user)
        srv = Server(data_dir, *extra)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """A server with the default limits, for tests that only send request heads."""
    data_dir = tmp_path_factory.mktemp("plain") / "data"
    add_user(data_dir, ALICE)
    srv = Server(data_dir)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def sockets():
    """open(addr, source) -> a connected client socket bound to `source`; all closed after."""
    opened = []

    def open_(addr, source, timeout=PROMPT_S):
        sock = socket.create_connection(addr, timeout=timeout, source_address=(source, 0))
        opened.append(sock)
        return sock

    yield open_
    for sock in opened:
        sock.close()


def address_of(url):
    parts = urlsplit(url)
    return parts.hostname, parts.port


def basic(username, password):
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class SourceAdapter(HTTPAdapter):
    """A requests transport whose connections come from a given loopback address."""

    def __init__(self, source, **kwargs):
        self.source = source
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def http_from(source):
    session = requests.Session()
    session.trust_env = False  # never a proxy from the environment
    session.mount("http://", SourceAdapter(source))
    return session


def login(source, url, username, password):
    """GET the session resource from `source` with Basic credentials; the Response."""
    with http_from(source) as http:
        return http.get(url + "/jmap/session", auth=(username, password), timeout=30)


def account_id(url, username=ALICE, password=PASSWORD):
    r = login(OWNER, url, username, password)
    assert r.status_code == 200, r.text
    return r.json()["primaryAccounts"][MAIL]


# =============================================================================
# Reading raw HTTP responses
# =============================================================================


class Reply:
    def __init__(self, response: http.client.HTTPResponse, body: bytes):
        self.status = response.status
        self.headers = response.headers
        self.body = body

    def header(self, name):
        return self.headers.get(name)

    def problem(self):
        media_type = (self.header("Content-Type") or "").split(";")[0].strip().lower()
        assert media_type == PROBLEM_TYPE, (self.status, dict(self.headers), self.body)
        problem = json.loads(self.body)
        assert problem.get("status") == self.status, problem
        assert isinstance(problem.get("type"), str) and problem["type"], problem
        return problem

    def __repr__(self):
        return f"<{self.status} {dict(self.headers)} {self.body[:300]!r}>"


def expect_reply(sock, within, what, method="GET") -> Reply:
    """Read one HTTP response from `sock`; fail the test if none comes within `within` s."""
    sock.settimeout(within)
    response = http.client.HTTPResponse(sock, method=method)
    failure = None
    try:
        response.begin()
        body = response.read()
    except (socket.timeout, TimeoutError):
        failure = f"no answer within {within} s: {what}"
    except (http.client.RemoteDisconnected, ConnectionError) as exc:
        failure = f"the server closed without an answer ({exc!r}): {what}"
    finally:
        response.close()  # its file holds the socket open even after sock.close()
    if failure:
        pytest.fail(failure)
    return Reply(response, body)


def closed_within(sock, seconds) -> bool:
    """Whether the server ends the connection (EOF or reset) within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True  # reset


def quiet_for(sock, seconds) -> bool:
    """Whether nothing at all (no answer, no close) comes on `sock` for `seconds`."""
    readable, _, _ = select.select([sock], [], [], seconds)
    return not readable


def request_head(method, path, headers, host="127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


GET_WELL_KNOWN = request_head("GET", "/.well-known/jmap", {})


# =============================================================================
# An attacker: many connections from one address, each trickling or idling
# =============================================================================


class Swarm:
    """`count` connections from `source`, each sending `opening` and then, once a
    second, the next byte of `drip` (or nothing); a connection the server ends is
    opened again after a second, as a persistent attacker would."""

    def __init__(self, addr, source, count, opening=b"", drip=b""):
        self.addr, self.source, self.count = addr, source, count
        self.opening, self.drip = opening, drip
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connects = 0  # successful connects, reopenings included
        self.open = 0
        self.threads = []

    def __enter__(self):
        for n in range(self.count):
            thread = threading.Thread(target=self._slot, name=f"swarm-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)

    def wait_connected(self, at_least, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.connects < at_least:
            time.sleep(0.05)
        return self.connects

    def _slot(self):
        while not self.stopping.is_set():
            try:
                sock = socket.create_connection(self.addr, timeout=2,
                                                source_address=(self.source, 0))
            except OSError:
                self.stopping.wait(1)
                continue
            with self.lock:
                self.connects += 1
                self.open += 1
            try:
                self._hold(sock)
            except OSError:
                pass  # reset by the server: open another
            finally:
                sock.close()
                with self.lock:
                    self.open -= 1
            self.stopping.wait(1)

    def _hold(self, sock):
        if self.opening:
            sock.sendall(self.opening)
        sent = 0
        while not self.stopping.wait(1):
            while select.select([sock], [], [], 0)[0]:  # an answer (e.g. 503) or the end
                if not sock.recv(65536):
                    return
            if self.drip:
                byte = self.drip[sent:sent + 1] or b"a"  # then the head grows forever
                sock.send(byte)
                sent += 1


SLOW_HEAD = b"GET /.well-known/jmap HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


# =============================================================================
# Slowloris (and waitress's log lines)
# =============================================================================


def test_issue_16_slowloris_does_not_starve_the_owner(own_server):
    """200 connections from 127.0.0.2 each trickle a request head, a byte a second (and
    are reopened when the server ends them); meanwhile the owner's GET /.well-known/jmap
    from 127.0.0.1 is answered (307) within a few seconds every time, throughout."""
    srv = own_server()  # the defaults: whatever protects the owner must be on already
    with Swarm(address_of(srv.url), "127.0.0.2", 200, drip=SLOW_HEAD) as swarm:
        swarm.wait_connected(200, timeout=10)
        assert swarm.connects >= 200, swarm.connects  # the attack is really on
        with http_from(OWNER) as http:
            started = time.monotonic()
            for second in range(15):
                asked = time.monotonic()
                try:
                    # a new connection each time: being accepted is part of being answered
                    r = http.get(srv.url + "/.well-known/jmap", allow_redirects=False,
                                 timeout=PROMPT_S, headers={"Connection": "close"})
                except requests.RequestException as exc:
                    r = exc
                if isinstance(r, Exception):
                    pytest.fail(f"{asked - started:.0f} s into the attack ({swarm.open} "
                                f"slow connections open) the owner's GET was not answered "
                                f"within {PROMPT_S} s: {r!r}")
                assert r.status_code == 307, (second, r.status_code, r.text)
                assert r.headers["Location"].endswith("/jmap/session"), r.headers
                time.sleep(max(0.0, asked + 1 - time.monotonic()))


def test_issue_16_head_trickled_a_byte_a_second_is_cut_off(own_server, sockets):
    """--head-timeout 3: a head still incomplete 3 s after its first byte is cut off
    (EOF or reset; an answer first is allowed), well before 3 + 5 s."""
    srv = own_server("--head-timeout", "3")
    sock = sockets(address_of(srv.url), "127.0.0.2")
    drip = SLOW_HEAD + b"a" * 64
    first_byte = time.monotonic()
    ended = None
    for n in range(len(drip)):
        try:
            sock.sendall(drip[n:n + 1])
        except OSError:
            ended = time.monotonic()
            break
        if closed_within(sock, max(0.0, first_byte + n + 1 - time.monotonic())):
            ended = time.monotonic()
            break
        if time.monotonic() - first_byte > 8:
            break
    assert ended is not None, "the connection trickling its head was still open after 8 s"
    elapsed = ended - first_byte
    assert 2.5 <= elapsed <= 8, f"cut off {elapsed:.1f} s after the first byte"


WAITRESS_LINE = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )?WARNING waitress(?:\.[a-z]+)?: "
    r"Task queue depth is \d+$", re.MULTILINE)


def test_issue_16_waitress_log_lines_use_jmapd_format(own_server):
    """waitress's own warning (here "Task queue depth is N", logged by waitress when a
    request waits for a busy worker) is written like jmapd's lines: `LEVEL waitress:
    message`, with the time unless under journald. Today it comes out bare."""
    srv = own_server("--threads", "1")
    with http_from(OWNER) as http:
        http.auth = (ALICE, PASSWORD)
        r = http.get(srv.url + "/jmap/session", timeout=30)
        assert r.status_code == 200, r.text
        api_url, account = r.json()["apiUrl"], r.json()["primaryAccounts"][MAIL]
    # Another process holds the database's write lock: a Mailbox/set then keeps the one
    # worker waiting (busy timeout), so the next request is queued and waitress logs.
    locker = sqlite3.connect(srv.data_dir / "jmapd.sqlite3", timeout=10, isolation_level=None)
    results = {}

    def mailbox_set():
        body = {"using": [CORE, MAIL], "methodCalls": [
            ["Mailbox/set", {"accountId": account, "create": {"m": {"name": "queued"}}}, "c"]]}
        results["set"] = requests.post(api_url, json=body, auth=(ALICE, PASSWORD), timeout=30)

    def well_known():
        results["get"] = requests.get(srv.url + "/.well-known/jmap", allow_redirects=False,
                                      timeout=30)

    try:
        locker.execute("BEGIN IMMEDIATE")
        writer = threading.Thread(target=mailbox_set)
        writer.start()
        time.sleep(1)
        reader = threading.Thread(target=well_known)
        reader.start()
        time.sleep(1)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    writer.join(30)
    reader.join(30)
    assert results["get"].status_code == 307
    assert results["set"].status_code == 200, results["set"].text
    log = srv.log()
    assert "Task queue depth is" in log, "the trigger did not make waitress log:\n" + log
    assert WAITRESS_LINE.search(log), (
        "waitress's line is not in jmapd's format (LEVEL waitress: message):\n"
        + "\n".join(line for line in log.splitlines() if "Task queue depth" in line))


# =============================================================================
# Connections per client address
# =============================================================================


def test_issue_16_connections_per_address_capped_owner_and_proxy_unaffected(own_server,
                                                                            sockets):
    """--max-connections-per-address 5: five kept-alive connections from 127.0.0.2 are
    served; the sixth gets HTTP/1.1 503 (problem JSON, Retry-After) at once and is closed;
    127.0.0.1 is served meanwhile; once one of the five closes, another is admitted; a
    --trusted-proxy peer (127.0.0.3) is exempt: ten connections at once all served."""
    srv = own_server("--max-connections-per-address", "5", "--trusted-proxy", "127.0.0.3")
    addr = address_of(srv.url)
    five = []
    for _ in range(5):
        sock = sockets(addr, "127.0.0.2")
        sock.sendall(GET_WELL_KNOWN)
        reply = expect_reply(sock, PROMPT_S, "a kept-alive GET within the allowance")
        assert reply.status == 307, reply
        five.append(sock)

    sixth = sockets(addr, "127.0.0.2")
    reply = expect_reply(sixth, PROMPT_S, "the 6th connection from 127.0.0.2")
    assert reply.status == 503, reply
    assert (reply.header("Retry-After") or "").isdigit(), reply
    assert reply.problem()["status"] == 503
    assert closed_within(sixth, PROMPT_S), "the refused connection was left open"

    r = login(OWNER, srv.url, ALICE, PASSWORD)
    assert r.status_code == 200, r.text

    five.pop().close()
    deadline = time.monotonic() + PROMPT_S
    while True:  # the server may take a moment to see the close
        again = sockets(addr, "127.0.0.2")
        if quiet_for(again, 0.3):
            break  # not refused at once
        assert time.monotonic() < deadline, "still refused after one of the five closed"
        time.sleep(0.2)
    again.sendall(GET_WELL_KNOWN)
    reply = expect_reply(again, PROMPT_S, "a connection after one of the five closed")
    assert reply.status == 307, reply

    proxied = [sockets(addr, "127.0.0.3") for _ in range(10)]
    for round_ in range(2):  # all ten open at once, each served (twice: kept alive)
        for n, sock in enumerate(proxied):
            sock.sendall(request_head("GET", "/.well-known/jmap",
                                      {"X-Forwarded-For": f"198.51.100.{n + 1}"}))
            reply = expect_reply(sock, PROMPT_S, f"trusted proxy connection {n + 1}")
            assert reply.status == 307, (round_, n, reply)
    for sock in five:
        sock.sendall(GET_WELL_KNOWN)  # the first five were never dropped
        assert expect_reply(sock, PROMPT_S, "one of the first five").status == 307


# =============================================================================
# Bodies before authentication
# =============================================================================


@pytest.mark.parametrize("method, path, framing", [
    ("POST", "/jmap/session", "length"),
    ("POST", "/nope", "length"),
    ("PUT", "/jmap/api/", "length"),
    ("POST", "/nope", "chunked"),
])
def test_issue_16_body_for_a_route_without_one_is_404_at_its_head(plain_server, sockets,
                                                                  method, path, framing):
    """A request with a body to a route that takes none: 404 (problem JSON) as soon as
    the head is in, the body never sent, and the connection closed."""
    sock = sockets(address_of(plain_server.url), "127.0.0.2")
    headers = ({"Content-Length": str(BIG)} if framing == "length"
               else {"Transfer-Encoding": "chunked"})
    headers["Content-Type"] = "application/json"
    sock.sendall(request_head(method, path, headers))
    reply = expect_reply(sock, PROMPT_S, f"{method} {path} ({framing}) with its body unsent",
                         method=method)
    assert reply.status == 404, reply
    assert reply.problem()["status"] == 404
    assert closed_within(sock, PROMPT_S), "the connection stayed open after the 404"


@pytest.mark.parametrize("authorization", [None, "Basic !!!", "Digest x"])
@pytest.mark.parametrize("route", ["api", "upload"])
def test_issue_16_body_without_usable_credentials_is_401_at_its_head(plain_server, sockets,
                                                                     route, authorization):
    """POST /jmap/api/ or /jmap/upload/{accountId}/ declaring a 50 MB body with no
    Authorization, or one that is neither Basic base64(user:pass) nor Bearer: 401 with
    WWW-Authenticate as soon as the head is in; the body is never sent; closed."""
    path = "/jmap/api/" if route == "api" else f"/jmap/upload/{account_id(plain_server.url)}/"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(BIG)}
    if authorization:
        headers["Authorization"] = authorization
    sock = sockets(address_of(plain_server.url), "127.0.0.2")
    sock.sendall(request_head("POST", path, headers))
    reply = expect_reply(sock, PROMPT_S, f"POST {path} ({authorization}) with its body unsent",
                         method="POST")
    assert reply.status == 401, reply
    assert reply.header("WWW-Authenticate"), reply
    assert closed_within(sock, PROMPT_S), "the connection stayed open after the 401"


def test_issue_16_unverified_bodies_in_flight_capped_per_address(own_server, sockets):
    """A well-formed but wrong Basic password: uploads from 127.0.0.2 whose declared
    bodies pass 2 MiB in flight get 503 (problem JSON, Retry-After) at the head of the
    one that passes; another address is not affected; a verified credential (a 200 just
    before) uploads 5 MiB at once from that same address."""
    srv = own_server("--max-size-upload", "10000000")
    addr = address_of(srv.url)
    path = f"/jmap/upload/{account_id(srv.url)}/"
    size = 900_000  # two fit in 2 MiB, three do not
    head = request_head("POST", path, {"Authorization": basic(ALICE, "not the password"),
                                       "Content-Type": "application/octet-stream",
                                       "Content-Length": str(size)})
    held = []
    for _ in range(2):  # in flight: head and the first octets sent, the rest held back
        sock = sockets(addr, "127.0.0.2")
        sock.sendall(head + b"x" * 1000)
        held.append(sock)
    time.sleep(0.5)
    for sock in held:
        assert quiet_for(sock, 0), "an upload within the allowance was answered early"

    third = sockets(addr, "127.0.0.2")
    third.sendall(head + b"x" * 1000)
    reply = expect_reply(third, PROMPT_S, "the upload passing 2 MiB unverified from one "
                         "address (its body mostly unsent)", method="POST")
    assert reply.status == 503, reply
    assert (reply.header("Retry-After") or "").isdigit(), reply
    assert reply.problem()["status"] == 503

    elsewhere = sockets(addr, "127.0.0.3")  # another address has its own allowance
    elsewhere.sendall(head + b"x" * 1000)
    assert quiet_for(elsewhere, 1), "an upload from another address was refused at its head"
    elsewhere.sendall(b"x" * (size - 1000))
    reply = expect_reply(elsewhere, 10, "the wrong password's upload, sent whole",
                         method="POST")
    assert reply.status == 401, reply

    with http_from("127.0.0.2") as http:  # the same address; the two uploads still held
        http.auth = (ALICE, PASSWORD)
        r = http.get(srv.url + "/jmap/session", timeout=30)
        assert r.status_code == 200, r.text
        blob = os.urandom(5 * MIB)
        r = http.post(srv.url + path, data=blob, timeout=60,
                      headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, (r.status_code, r.text[:500])
        assert r.json()["size"] == len(blob)
    for sock in held:
        assert quiet_for(sock, 0), "the held uploads were answered"


def spooled_sizes(srv):
    """Sizes of the files under the data dir's tmp/: named ones, and those the server
    holds open (waitress spools with TemporaryFile: unlinked, seen in /proc/PID/fd)."""
    tmp = os.path.realpath(srv.data_dir / "tmp")
    sizes = {}
    for name in os.listdir(tmp) if os.path.isdir(tmp) else ():
        try:
            sizes[name] = os.stat(os.path.join(tmp, name)).st_size
        except OSError:
            pass
    fd_dir = f"/proc/{srv.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith(tmp + os.sep):
                sizes[target] = os.stat(os.path.join(fd_dir, fd)).st_size
        except OSError:
            pass  # closed meanwhile
    return sizes


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_issue_16_unverified_bodies_are_not_spooled(own_server, sockets):
    """8 connections (127.0.0.2-9) declare 50 MB uploads with a wrong password and send
    body octets as fast as the server takes them (6 MiB each at most): meanwhile the
    data dir's tmp/ never holds a spooled body of more than a couple of MiB."""
    srv = own_server()
    addr = address_of(srv.url)
    path = f"/jmap/upload/{account_id(srv.url)}/"
    head = request_head("POST", path, {"Authorization": basic(ALICE, "not the password"),
                                       "Content-Type": "application/octet-stream",
                                       "Content-Length": str(BIG)})
    live = []
    for n in range(8):
        sock = sockets(addr, f"127.0.0.{n + 2}")
        sock.sendall(head)
        live.append(sock)
    chunk = b"x" * (256 * 1024)
    largest = 0
    for _ in range(24):  # 24 x 256 KiB = 6 MiB per connection
        for sock in list(live):
            sock.settimeout(2)
            try:
                sock.sendall(chunk)
            except OSError:  # refused and closed (or not reading): stop sending there
                live.remove(sock)
        largest = max([largest, *spooled_sizes(srv).values()])
        if not live:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    largest = max([largest, *spooled_sizes(srv).values()])
    assert largest <= 3 * MIB, f"a body of {largest} octets was spooled before authentication"


# =============================================================================
# WebSocket handshakes
# =============================================================================


def ws_url_of(srv):
    with http_from(OWNER) as http:
        r = http.get(srv.url + "/jmap/session", auth=(ALICE, PASSWORD), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["capabilities"][WEBSOCKET]["url"]


def ws_handshake(sockets, ws_url, source, authorization):
    """A complete RFC 6455 §4.1 opening handshake for the jmap subprotocol; return the
    (status, headers) of the answer and the key sent."""
    parts = urlsplit(ws_url)
    sock = sockets((parts.hostname, parts.port), source)
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    sock.sendall(request_head("GET", parts.path or "/", {
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "jmap",
        "Authorization": authorization}, host=parts.netloc))
    head = b""
    deadline = time.monotonic() + PROMPT_S
    while b"\r\n\r\n" not in head:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no handshake answer within {PROMPT_S} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except (socket.timeout, TimeoutError):
            continue
        if not chunk:
            pytest.fail(f"the server closed during the handshake: {head!r}")
        head += chunk
    lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 101:
        sock.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big"))  # close
    return status, headers, key, head


def assert_ws_accepted(status, headers, key, head):
    assert status == 101, head
    expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    assert headers.get("sec-websocket-accept") == expected, headers
    assert headers.get("sec-websocket-protocol") == "jmap", headers


def ws_partial(ws_url):
    parts = urlsplit(ws_url)
    return (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Upgrade: websocket\r\n").encode()


def test_issue_16_websocket_half_handshakes_do_not_block_a_real_one(own_server, sockets):
    """32 connections from 127.0.0.2 send part of a handshake and idle (reopened as the
    server ends them); a complete, authenticated handshake from 127.0.0.1 still gets 101
    at once, and again after the server's handshake deadline has renewed the swarm."""
    srv = own_server("--websocket", "127.0.0.1:0")
    ws_url = ws_url_of(srv)
    parts = urlsplit(ws_url)
    with Swarm((parts.hostname, parts.port), "127.0.0.2", 32,
               opening=ws_partial(ws_url)) as swarm:
        swarm.wait_connected(32, timeout=10)
        assert swarm.connects >= 32, swarm.connects
        time.sleep(0.5)
        assert_ws_accepted(*ws_handshake(sockets, ws_url, OWNER, basic(ALICE, PASSWORD)))
        time.sleep(11)  # past a 10 s handshake deadline: the swarm has been renewed
        assert_ws_accepted(*ws_handshake(sockets, ws_url, OWNER, basic(ALICE, PASSWORD)))


def test_issue_16_fifth_pending_handshake_from_one_address_refused(own_server, sockets):
    """Four half-handshakes from 127.0.0.3 are pending; a fifth from that address is
    refused at once with 503 (problem JSON) and closed; 127.0.0.1 still gets 101."""
    srv = own_server("--websocket", "127.0.0.1:0")
    ws_url = ws_url_of(srv)
    parts = urlsplit(ws_url)
    addr = (parts.hostname, parts.port)
    for _ in range(4):
        sockets(addr, "127.0.0.3").sendall(ws_partial(ws_url))
    time.sleep(0.5)
    fifth = sockets(addr, "127.0.0.3")
    try:
        fifth.sendall(ws_partial(ws_url))
    except OSError:
        pass  # already refused and closed: its answer is still there to read
    reply = expect_reply(fifth, PROMPT_S, "a 5th pending handshake from one address")
    assert reply.status == 503, reply
    assert reply.problem()["status"] == 503
    assert closed_within(fifth, PROMPT_S), "the refused handshake was left open"
    assert_ws_accepted(*ws_handshake(sockets, ws_url, OWNER, basic(ALICE, PASSWORD)))


# =============================================================================
# Lockout by a stranger
# =============================================================================


def assert_429(response):
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.headers.get("Retry-After", "").isdigit(), response.headers
    assert int(response.headers["Retry-After"]) >= 1


def test_issue_16_strangers_cannot_lock_the_owner_out(own_server):
    """Default limits (10 failures per address, 30 per user per 15 min). alice logs in
    from 127.0.0.1; then 10 wrong passwords from each of 127.0.0.2-4 put her over her
    limit. A wrong password from 127.0.0.1 gets 429; a new address gets three verified
    attempts an hour and the 4th is 429 even when correct; but from 127.0.0.1, where she
    has logged in, her password and her app password still get 200."""
    srv = own_server()
    assert login(OWNER, srv.url, ALICE, PASSWORD).status_code == 200
    done = run_cli("user", "token", "add", ALICE, "phone", data_dir=srv.data_dir)
    assert done.returncode == 0, done.stderr
    app_password = done.stdout.split()[0]

    for n in (2, 3, 4):
        with http_from(f"127.0.0.{n}") as http:
            for guess in range(10):
                r = http.get(srv.url + "/jmap/session", timeout=30,
                             auth=(ALICE, f"guess {n}.{guess}"))
                assert r.status_code == 401, (n, guess, r.status_code, r.text)

    # The owner's address while alice is over her limit: a wrong password is still 429.
    assert_429(login(OWNER, srv.url, ALICE, "a typo"))

    # A new address: three attempts are verified (wrong ones fail), the 4th is refused.
    with http_from("127.0.0.5") as http:
        for guess in range(3):
            r = http.get(srv.url + "/jmap/session", auth=(ALICE, f"new {guess}"), timeout=30)
            assert r.status_code in (401, 429), (guess, r.status_code, r.text)
        assert_429(http.get(srv.url + "/jmap/session", auth=(ALICE, PASSWORD), timeout=30))

    assert login(OWNER, srv.url, ALICE, PASSWORD).status_code == 200
    r = login(OWNER, srv.url, ALICE, app_password)
    assert r.status_code == 200, (r.status_code, r.text)

    # Within the first three attempts from a new address, the right password works.
    assert login("127.0.0.6", srv.url, ALICE, PASSWORD).status_code == 200
    with http_from("127.0.0.7") as http:
        for guess in range(2):
            r = http.get(srv.url + "/jmap/session", auth=(ALICE, f"other {guess}"), timeout=30)
            assert r.status_code in (401, 429), (guess, r.status_code, r.text)
        r = http.get(srv.url + "/jmap/session", auth=(ALICE, PASSWORD), timeout=30)
        assert r.status_code == 200, (r.status_code, r.text)


def test_issue_16_login_limiter_not_reset_by_a_flood():
    """LoginLimiter never clears its counters at once: an address refused after 10
    failures is still refused after 200,000 failures from other addresses/usernames."""
    sys.path.insert(0, str(ROOT))
    import jmapd

    limiter = jmapd.LoginLimiter(10, 30)
    attacked = "192.0.2.1"
    for n in range(10):
        limiter.fail(attacked, f"guess{n}@example.com")
    with pytest.raises(jmapd.TooManyFailures):
        limiter.check(attacked, "someone@example.com")
    for n in range(200_000):
        limiter.fail(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", f"flood{n}@example.com")
    with pytest.raises(jmapd.TooManyFailures):
        limiter.check(attacked, "someone@example.com")
