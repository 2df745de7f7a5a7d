"""JMAP over WebSocket (jmapd §12: ws_handshake, WebSocket, JmapWebSocket, ws_connection).

RFC 8887 §4.2 (the handshake: authenticated, Sec-WebSocket-Protocol must list "jmap" and
the reply echoes it), §4.3 (text messages only: Request, WebSocketPushEnable,
WebSocketPushDisable from the client; Response, RequestError, StateChange from the
server; fragmented messages are joined before parsing), §4.3.1 (binary -> 1003),
§4.3.2/§4.3.3 (@type and id / requestId; requests may be answered out of order),
§4.3.4 (RequestError with requestId), §4.3.5 (StateChange with pushState; pushState on
enable sends what was missed at once; disable), §4.4 (the example flow, checked as
exact JSON where the server does not choose the values). RFC 6455 §4.2.1/§4.2.2 (the
server's handshake checks and answers: 426 with Sec-WebSocket-Version, 400 for a bad
key), §5.1 (client frames are masked), §5.2 (RSV bits, opcodes), §5.4 (fragments,
control frames in between), §5.5 (control frames: <= 125 octets, never fragmented;
ping -> pong with the same payload; close is echoed), §7.4.1 (close codes 1001, 1002,
1003, 1007, 1009). RFC 8620 §7.1 (StateChange), §7.3 (EventSource, here with
?access_token=).

The client side is independent of jmapd: the `websockets` package (its threaded client,
`websockets.sync.client`) for well-formed traffic, and raw sockets with frames built by
hand here for handshakes and frames `websockets` would refuse to send. The writer in
push tests is another client: HTTP with `requests`, or another process
(`jmapd.py deliver`). "Nothing was pushed" is shown with a barrier (a change that must
be pushed, made after the one that must stay silent: the first StateChange has to be
exactly the barrier's, as the server reports state differences) or, where no barrier
can tell, a quiet period. Waits are generous; the promptness bound (PROMPT_S: a push,
a replay on pushState, the close on SIGTERM) is several times what the server needs (a
bus wait of at most 1 s).
"""

import base64
import contextlib
import hashlib
import inspect
import json
import os
import re
import signal
import socket
import struct
import time
from urllib.parse import quote, urlsplit

import pytest
import requests

from conftest import CORE, MAIL, PASSWORD, Client, Server, add_user, run_cli
from test_mime import upload
from test_thread import message, unique

ws_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402

WEBSOCKET = "urn:ietf:params:jmap:websocket"
ERROR = "urn:ietf:params:jmap:error:"
WAIT_S = 10  # an expected message must arrive within this, however slow the host
PROMPT_S = 3  # "at once": a push or a close that the server sends within ~1 s
QUIET_S = 2  # how long to listen for something that must not come
MAX_REQUEST = 100_000  # --max-size-request of this module's server
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


# =============================================================================
# Servers with a WebSocket listener
# =============================================================================


class WsServer(Server):
    """`jmapd.py serve --websocket 127.0.0.1:0`; ws_url from its log line."""

    def __init__(self, data_dir, *extra):
        super().__init__(data_dir, "--websocket", "127.0.0.1:0", *extra)
        self.ws_url = None

    def start(self, timeout=20):
        super().start(timeout)
        match = re.search(r"JMAP over WebSocket on (ws://\S+)", self.log())
        assert match, self.log()
        self.ws_url = match.group(1)
        parts = urlsplit(self.ws_url)
        self.ws_addr = (parts.hostname, parts.port)
        return self


def start_server(tmp_path_factory, name, *extra):
    data_dir = tmp_path_factory.mktemp(name) / "data"
    add_user(data_dir, "first@example.com")
    return WsServer(data_dir, "--max-login-failures-per-address", "100000",
                    "--max-login-failures-per-user", "100000", *extra).start()


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory):
    srv = start_server(tmp_path_factory, "ws", "--max-size-request", MAX_REQUEST)
    yield srv
    srv.stop()


def new_client(server, name="ws") -> Client:
    """A fresh user (added by the CLI), known to the server's change bus.

    One write through the server makes the bus re-read every account, so a push
    channel opened now does not report the account's creation as a change.
    """
    username = f"{unique(name)}@example.com"
    add_user(server.data_dir, username)
    client = Client(server.url, username)
    make_mailbox(client)
    return client


@pytest.fixture
def alice(ws_server):
    return new_client(ws_server, "alice")


def app_password(server, username) -> str:
    done = run_cli("user", "token", "add", username, unique("device"), data_dir=server.data_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


# =============================================================================
# JMAP helpers (the writing client, over HTTP)
# =============================================================================


def make_mailbox(client) -> str:
    """Create a Mailbox; return the Mailbox state it produced."""
    resp = client.ok("Mailbox/set", {"accountId": client.account_id,
                                     "create": {"m": {"name": unique("box")}}})
    assert resp["notCreated"] is None and "m" in resp["created"], resp
    return resp["newState"]


def state_of(client, type_name):
    return client.ok(f"{type_name}/get", {"accountId": client.account_id, "ids": []})["state"]


def inbox(client):
    boxes = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})["list"]
    return next(m["id"] for m in boxes if m["role"] == "inbox")


def import_email(client) -> str:
    blob = upload(client, message(unique("WebSocket push ")))["blobId"]
    resp = client.ok("Email/import", {"accountId": client.account_id, "emails": {"e": {
        "blobId": blob, "mailboxIds": {inbox(client): True}}}})
    assert resp["notCreated"] is None, resp
    return resp["created"]["e"]["id"]


def set_vacation(client) -> str:
    """A change to VacationResponse only (RFC 8621 §8); return its new state."""
    resp = client.ok("VacationResponse/set", {"accountId": client.account_id, "update": {
        "singleton": {"isEnabled": False, "subject": unique("Away ")}}},
        using=[CORE, MAIL, "urn:ietf:params:jmap:vacationresponse"])
    assert "singleton" in resp["updated"], resp
    return resp["newState"]


def changed_last(token) -> str:
    """The app password with its last character changed (so it is surely wrong)."""
    return token[:-1] + ("B" if token.endswith("A") else "A")


def basic(username, password=PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


# =============================================================================
# A WebSocket client: the `websockets` package
# =============================================================================


def echo_request(request_id, args, call_id="c0"):
    return {"@type": "Request", "id": request_id, "using": [CORE],
            "methodCalls": [["Core/echo", args, call_id]]}


class Jws:
    """One JMAP WebSocket (the `websockets` threaded client) with JSON helpers."""

    def __init__(self, url, headers=None, origin=None):
        kwargs = {"subprotocols": ["jmap"], "additional_headers": headers or {},
                  "open_timeout": WAIT_S, "close_timeout": WAIT_S}
        if origin:
            kwargs["origin"] = origin
        if "proxy" in inspect.signature(ws_client.connect).parameters:
            kwargs["proxy"] = None  # never an HTTP proxy from the environment
        # Entered as a context manager: newer `websockets` warn about a bare connect().
        self.stack = contextlib.ExitStack()
        self.conn = self.stack.enter_context(ws_client.connect(url, **kwargs))

    def send(self, obj):
        self.conn.send(obj if isinstance(obj, str) else json.dumps(obj))

    def recv(self, timeout=WAIT_S) -> dict:
        try:
            text = self.conn.recv(timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"no message within {timeout} s") from None
        assert isinstance(text, str), f"a binary message from the server: {text!r}"
        return json.loads(text)

    def nothing_for(self, seconds=QUIET_S):
        try:
            text = self.conn.recv(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {text}")

    def call(self, request) -> dict:
        self.send(request)
        reply = self.recv()
        assert reply.get("requestId") == request.get("id"), reply
        return reply

    def push_enable(self, data_types=None, push_state=None):
        message = {"@type": "WebSocketPushEnable", "dataTypes": data_types}
        if push_state is not None:
            message["pushState"] = push_state
        self.send(message)

    def state_change(self, timeout=WAIT_S) -> dict:
        change = self.recv(timeout)
        assert change.get("@type") == "StateChange", change
        assert set(change) == {"@type", "changed", "pushState"}, change
        assert isinstance(change["pushState"], str) and change["pushState"], change
        return change

    def states_until(self, done, timeout=WAIT_S) -> list:
        """StateChange objects (in order) until done(merged changed) is true."""
        merged, seen = {}, []
        deadline = time.monotonic() + timeout
        while not done(merged):
            change = self.state_change(max(0.01, deadline - time.monotonic()))
            seen.append(change)
            for account_id, types in change["changed"].items():
                merged.setdefault(account_id, {}).update(types)
        return seen

    def close(self):
        self.stack.close()


@pytest.fixture
def sockets(ws_server):
    """Open JMAP WebSockets (Basic by default); all closed when the test ends."""
    opened = []

    def open_ws(client=None, url=None, headers=None, **kwargs):
        if headers is None and client is not None:
            headers = {"Authorization": basic(client.username)}
        ws = Jws(url or ws_server.ws_url, headers=headers, **kwargs)
        opened.append(ws)
        return ws

    yield open_ws
    for ws in opened:
        ws.close()


def exactly(account_id, type_name, state):
    return {account_id: {type_name: state}}


def has_states(account_id, wanted: dict):
    return lambda merged: all(merged.get(account_id, {}).get(t) == s for t, s in wanted.items())


# =============================================================================
# A raw client: handshakes and frames built by hand
# =============================================================================


def handshake_text(host, path="/jmap/ws/", **overrides) -> str:
    """An RFC 6455 §4.1 opening handshake; header overrides by name (None drops one)."""
    headers = {"Host": host, "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Protocol": "jmap"}
    for name, value in overrides.items():
        headers[name.replace("_", "-")] = value
    lines = [f"GET {path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items() if v is not None]
    return "\r\n".join(lines) + "\r\n\r\n"


class RawReply:
    def __init__(self, status, headers, body, sock):
        self.status, self.headers, self.body, self.sock = status, headers, body, sock

    def problem(self):
        assert self.headers.get("content-type", "").startswith("application/problem+json"), \
            self.headers
        return json.loads(self.body)


def read_http_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed during the reply: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def raw_handshake(server, path="/jmap/ws/", auth=None, **overrides) -> RawReply:
    """Send a handshake (Basic auth as (user, password) or a header value); read the reply.

    A refusal's body is read to its Content-Length; after a 101 the socket is kept.
    """
    sock = socket.create_connection(server.ws_addr, timeout=WAIT_S)
    if auth is not None:
        overrides.setdefault("Authorization", basic(*auth) if isinstance(auth, tuple) else auth)
    host = f"{server.ws_addr[0]}:{server.ws_addr[1]}"
    sock.sendall(handshake_text(host, path, **overrides).encode("latin-1"))
    status, headers, rest = read_http_head(sock)
    body = rest
    if status != 101:
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
        sock.close()
    else:
        assert rest == b"", rest  # no frame before the client has sent anything
    return RawReply(status, headers, body, sock)


def frame(opcode, payload=b"", fin=True, masked=True, rsv=0, length=None) -> bytes:
    """One client frame (RFC 6455 §5.2); `length` can claim another payload length."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes([first, mask_bit | size])
    elif size < 65536:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code, reason=b""):
    return frame(0x8, struct.pack("!H", code) + reason)


def recv_exact(sock, size) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} octets")
        data += chunk
    return bytes(data)


def read_frame(sock):
    """One server frame: (fin, opcode, payload); server frames are never masked."""
    first, second = recv_exact(sock, 2)
    assert not first & 0x70, f"RSV bits set: {first:#x}"
    assert not second & 0x80, "a masked server frame (RFC 6455 §5.1)"
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", recv_exact(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", recv_exact(sock, 8))[0]
    return bool(first & 0x80), first & 0x0F, recv_exact(sock, size)


def read_message(sock) -> dict:
    fin, opcode, payload = read_frame(sock)
    assert (fin, opcode) == (True, 0x1), (fin, opcode, payload)
    return json.loads(payload.decode("utf-8"))


def expect_close(sock, code):
    """The next frame is a close with `code`; then the server ends the TCP connection."""
    fin, opcode, payload = read_frame(sock)
    assert opcode == 0x8, (opcode, payload)
    assert fin and len(payload) >= 2, payload
    got = struct.unpack("!H", payload[:2])[0]
    assert got == code, (got, payload[2:].decode("utf-8", "replace"))
    payload[2:].decode("utf-8")  # the reason is UTF-8
    try:
        rest = sock.recv(4096)
    except ConnectionResetError:
        rest = b""
    assert rest == b"", f"data after the close frame: {rest!r}"
    sock.close()
    return payload[2:].decode()


def raw_open(server, client):
    reply = raw_handshake(server, auth=(client.username, PASSWORD))
    assert reply.status == 101, (reply.status, reply.body)
    return reply.sock


def open_until_accepted(server, client, timeout=WAIT_S) -> RawReply:
    """A handshake, retried while a just-closed connection still holds its slot."""
    deadline = time.monotonic() + timeout
    while True:
        reply = raw_handshake(server, auth=(client.username, PASSWORD))
        if reply.status == 101 or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def assert_serves(server, client=None):
    """A new connection is accepted and answers a Core/echo (the server survived)."""
    client = client or new_client(server, "after")
    ws = Jws(server.ws_url, headers={"Authorization": basic(client.username)})
    try:
        reply = ws.call(echo_request("alive", {"still": "serving"}))
        assert reply["methodResponses"] == [["Core/echo", {"still": "serving"}, "c0"]], reply
    finally:
        ws.close()
    assert client.ok("Core/echo", {"http": True}, using=[CORE]) == {"http": True}


def accept_value(key):
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


# =============================================================================
# RFC 8887 §4.1: the session capability
# =============================================================================


def test_ws_session_capability_names_the_listener(ws_server, alice):
    capability = alice.session["capabilities"][WEBSOCKET]
    assert capability == {"url": ws_server.ws_url, "supportsPush": True}
    assert ws_server.ws_url == f"ws://127.0.0.1:{ws_server.ws_addr[1]}/jmap/ws/"
    assert ws_server.ws_addr[1] != int(urlsplit(ws_server.url).port)
    # The host the client used, with the WebSocket listener's port
    port = urlsplit(ws_server.url).port
    r = alice.http.get(f"{ws_server.url}/jmap/session", headers={"Host": f"localhost:{port}"},
                       timeout=WAIT_S)
    assert r.status_code == 200, r.text
    assert r.json()["capabilities"][WEBSOCKET]["url"] == \
        f"ws://localhost:{ws_server.ws_addr[1]}/jmap/ws/"
    # Untrusted X-Forwarded-* change nothing (no --trusted-proxy here)
    r = alice.http.get(f"{ws_server.url}/jmap/session", timeout=WAIT_S, headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"})
    assert r.json()["capabilities"][WEBSOCKET]["url"] == ws_server.ws_url


def test_ws_capability_absent_without_websocket_option(tmp_path):
    data_dir = tmp_path / "data"
    username = add_user(data_dir, "plain@example.com")
    srv = Server(data_dir).start()
    try:
        session = Client(srv.url, username).session
        assert WEBSOCKET not in session["capabilities"], session["capabilities"]
    finally:
        srv.stop()


# =============================================================================
# RFC 8887 §4.4: the example flow
# =============================================================================


def test_ws_rfc8887_example_flow(ws_server, alice, sockets):
    """RFC 8887 §4.4 in its order: the handshake with "jmap"; WebSocketPushEnable for
    Mailbox and Email with a pushState the client cached ("aaa", none of ours) -> a
    StateChange at once; Core/echo R1; a text that is not JSON; a new Email (another
    client's Email/import) -> StateChange; the closing handshake."""
    key = base64.b64encode(os.urandom(16)).decode()
    reply = raw_handshake(ws_server, auth=(alice.username, PASSWORD), Sec_WebSocket_Key=key)
    assert reply.status == 101, (reply.status, reply.body)
    assert reply.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in reply.headers["connection"].lower()
    assert reply.headers["sec-websocket-accept"] == accept_value(key)
    assert reply.headers["sec-websocket-protocol"] == "jmap"
    assert "sec-websocket-extensions" not in reply.headers
    reply.sock.close()

    ws = sockets(alice)  # the `websockets` client offers permessage-deflate: declined
    assert ws.conn.subprotocol == "jmap"
    ws.push_enable(["Mailbox", "Email"], "aaa")
    resumed = ws.state_change(PROMPT_S)  # an unknown pushState: every watched state
    changed = resumed["changed"]
    assert set(changed) == {alice.account_id}, resumed
    assert changed[alice.account_id]["Mailbox"] == state_of(alice, "Mailbox"), resumed
    assert set(changed[alice.account_id]) <= {"Mailbox", "Email"}, resumed

    ws.send({"@type": "Request", "id": "R1", "using": [CORE],
             "methodCalls": [["Core/echo", {"hello": True, "high": 5}, "b3ff"]]})
    assert ws.recv() == {"@type": "Response", "requestId": "R1",
                         "methodResponses": [["Core/echo", {"hello": True, "high": 5}, "b3ff"]],
                         "sessionState": alice.session["state"]}

    ws.send("The quick brown fox jumps\n over the lazy dog.")
    error = ws.recv()
    assert isinstance(error.pop("detail", None), str), error
    assert error == {"@type": "RequestError", "requestId": None,
                     "type": ERROR + "notJSON", "status": 400}

    writer = Client(alice.base_url, alice.username)  # another client of the same user
    import_email(writer)
    wanted = {"Mailbox": state_of(alice, "Mailbox"), "Email": state_of(alice, "Email")}
    changes = ws.states_until(has_states(alice.account_id, wanted))
    for change in changes:
        assert set(change["changed"]) == {alice.account_id}, changes
        assert set(change["changed"][alice.account_id]) <= {"Mailbox", "Email"}, changes
    assert changes[-1]["pushState"] != resumed["pushState"]

    ws.conn.close(1000)
    assert ws.conn.close_code == 1000  # the server's echo of the client's close


def test_ws_push_arrives_promptly_after_http_change(alice, sockets):
    ws = sockets(alice)
    ws.push_enable(None)
    ws.call(echo_request("sync", {}))  # the enable has been read before the change
    started = time.monotonic()
    new_state = make_mailbox(Client(alice.base_url, alice.username))
    change = ws.state_change(PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    assert change["changed"] == exactly(alice.account_id, "Mailbox", new_state)


def test_ws_push_reports_a_delivery_by_another_process(ws_server, alice, sockets):
    """`jmapd.py deliver` commits in its own process; the server's bus sees it."""
    ws = sockets(alice)
    ws.push_enable(["Mailbox", "Email"])
    ws.call(echo_request("sync", {}))
    done = run_cli("deliver", "--user", alice.username, data_dir=ws_server.data_dir,
                   input_text=message(unique("Delivered ")).decode())
    assert done.returncode == 0, done.stderr
    wanted = {"Mailbox": state_of(alice, "Mailbox"), "Email": state_of(alice, "Email")}
    changes = ws.states_until(has_states(alice.account_id, wanted))
    for change in changes:
        assert set(change["changed"][alice.account_id]) <= {"Mailbox", "Email"}, changes


def test_ws_data_types_filter_skips_other_types(alice, sockets):
    """A Mailbox-only subscription: a VacationResponse change is not pushed."""
    ws = sockets(alice)
    ws.push_enable(["Mailbox"])
    ws.call(echo_request("sync", {}))
    mailbox_before = state_of(alice, "Mailbox")
    set_vacation(alice)
    assert state_of(alice, "Mailbox") == mailbox_before
    barrier = make_mailbox(alice)
    assert ws.state_change()["changed"] == exactly(alice.account_id, "Mailbox", barrier)


def test_ws_data_types_null_pushes_every_type(alice, sockets):
    ws = sockets(alice)
    ws.push_enable(None)
    ws.call(echo_request("sync", {}))
    vacation = set_vacation(alice)
    assert ws.state_change()["changed"] == exactly(alice.account_id, "VacationResponse",
                                                   vacation)


def test_ws_push_state_resumes_with_missed_change(alice, sockets):
    first = sockets(alice)
    first.push_enable(None)
    first.call(echo_request("sync", {}))
    make_mailbox(alice)
    seen = first.state_change()
    first.close()
    missed = make_mailbox(alice)  # while disconnected

    again = sockets(alice)
    again.push_enable(None, seen["pushState"])
    replay = again.state_change(PROMPT_S)  # no change is made now: this is the missed one
    assert replay["changed"] == exactly(alice.account_id, "Mailbox", missed)
    assert replay["pushState"] != seen["pushState"]
    again.close()

    latest = sockets(alice)
    latest.push_enable(None, replay["pushState"])  # nothing was missed since
    latest.call(echo_request("sync", {}))
    barrier = make_mailbox(alice)
    assert latest.state_change()["changed"] == exactly(alice.account_id, "Mailbox", barrier)


def test_ws_push_disable_stops_pushes(alice, sockets):
    ws = sockets(alice)
    ws.push_enable(None)
    ws.call(echo_request("sync", {}))
    first = make_mailbox(alice)
    assert ws.state_change()["changed"] == exactly(alice.account_id, "Mailbox", first)
    ws.send({"@type": "WebSocketPushDisable"})
    ws.call(echo_request("sync", {}))
    make_mailbox(alice)
    ws.nothing_for(QUIET_S)
    reply = ws.call(echo_request("still", {"open": True}))  # the connection itself goes on
    assert reply["methodResponses"] == [["Core/echo", {"open": True}, "c0"]]


def test_ws_pushes_only_the_users_own_accounts(ws_server, alice, sockets):
    bob = new_client(ws_server, "bob")
    ws = sockets(alice)
    ws.push_enable(None)
    ws.call(echo_request("sync", {}))
    make_mailbox(bob)
    barrier = make_mailbox(alice)
    assert ws.state_change()["changed"] == exactly(alice.account_id, "Mailbox", barrier)


def share(server, owner, grantee, undo=False):
    done = run_cli("user", "unshare" if undo else "share", owner.username, grantee.username,
                   data_dir=server.data_dir)
    assert done.returncode == 0, done.stderr


def test_ws_pushes_a_shared_account(ws_server, alice, sockets):
    bob = new_client(ws_server, "bob")
    share(ws_server, alice, bob)
    ws = sockets(bob)
    ws.push_enable(None)
    ws.call(echo_request("sync", {}))
    new_state = make_mailbox(alice)
    assert ws.state_change()["changed"] == exactly(alice.account_id, "Mailbox", new_state)


def test_ws_unshare_stops_pushes_of_that_account(ws_server, alice, sockets):
    bob = new_client(ws_server, "bob")
    share(ws_server, alice, bob)
    ws = sockets(bob)
    ws.push_enable(None)
    ws.call(echo_request("sync", {}))
    shared = make_mailbox(alice)
    assert ws.state_change()["changed"] == exactly(alice.account_id, "Mailbox", shared)
    share(ws_server, alice, bob, undo=True)
    make_mailbox(alice)  # no longer bob's business
    barrier = make_mailbox(bob)
    assert ws.state_change()["changed"] == exactly(bob.account_id, "Mailbox", barrier)


def test_ws_deleted_user_gets_no_server_fail(ws_server, sockets):
    carol = new_client(ws_server, "carol")
    ws = sockets(carol)
    assert ws.call(echo_request("before", {}))["@type"] == "Response"
    done = run_cli("user", "del", carol.username, data_dir=ws_server.data_dir)
    assert done.returncode == 0, done.stderr
    request = {"@type": "Request", "id": "gone", "using": [CORE, MAIL], "methodCalls": [
        ["Mailbox/set", {"accountId": carol.account_id, "create": {"x": {"name": "x"}}}, "s"],
        ["Mailbox/get", {"accountId": carol.account_id, "ids": None}, "g"]]}
    try:
        ws.send(request)
        reply = ws.recv()
    except ConnectionClosed:
        return  # closed: fine
    if reply["@type"] == "RequestError":
        return
    for name, args, _ in reply["methodResponses"]:
        assert (name, args.get("type")) == ("error", "accountNotFound"), reply


# =============================================================================
# RFC 8887 §4.3.2-§4.3.4: requests, responses, request-level errors
# =============================================================================


def test_ws_several_requests_in_flight(alice, sockets):
    ws = sockets(alice)
    requests_sent = {
        "A": echo_request("A", {"n": 1}, "a"),
        "B": {"@type": "Request", "id": "B", "using": [CORE, MAIL], "methodCalls": [
            ["Mailbox/get", {"accountId": alice.account_id, "ids": None,
                             "properties": ["role"]}, "b"]]},
        "C": echo_request("C", {"n": 3}, "c"),
    }
    for request in requests_sent.values():
        ws.send(request)
    replies = {}
    for _ in requests_sent:
        reply = ws.recv()
        assert reply["@type"] == "Response", reply
        replies[reply["requestId"]] = reply
    assert set(replies) == {"A", "B", "C"}
    assert replies["A"]["methodResponses"] == [["Core/echo", {"n": 1}, "a"]]
    assert replies["C"]["methodResponses"] == [["Core/echo", {"n": 3}, "c"]]
    name, args, call_id = replies["B"]["methodResponses"][0]
    assert (name, call_id) == ("Mailbox/get", "b")
    assert "inbox" in {m["role"] for m in args["list"]}


def test_ws_many_requests_at_once_each_answered(alice, sockets):
    """More than maxConcurrentRequests sent at once: each gets its Response or a limit
    RequestError with its own requestId; none is lost."""
    limit = alice.session["capabilities"][CORE]["maxConcurrentRequests"]
    ws = sockets(alice)
    ids = [f"N{i}" for i in range(3 * limit)]
    for request_id in ids:
        ws.send(echo_request(request_id, {"id": request_id}))
    answered = {}
    for _ in ids:
        reply = ws.recv()
        answered[reply["requestId"]] = reply
        if reply["@type"] == "Response":
            assert reply["methodResponses"] == [
                ["Core/echo", {"id": reply["requestId"]}, "c0"]], reply
        else:
            assert reply["@type"] == "RequestError", reply
            assert reply["type"] == ERROR + "limit", reply
            assert reply["limit"] == "maxConcurrentRequests", reply
    assert sorted(answered) == sorted(ids)
    assert sum(r["@type"] == "Response" for r in answered.values()) >= 1


def test_ws_responses_and_pushes_interleave_whole(alice, sockets):
    """Writes by the connection's own requests, answered while pushes go out: every
    message is whole JSON (frames from two threads never mix)."""
    ws = sockets(alice)
    ws.push_enable(None)
    ws.call(echo_request("sync", {}))
    names = [unique("mix") for _ in range(12)]
    pending = set()
    for i, name in enumerate(names):
        request_id = f"W{i}"
        ws.send({"@type": "Request", "id": request_id, "using": [CORE, MAIL], "methodCalls": [
            ["Mailbox/set", {"accountId": alice.account_id,
                             "create": {"m": {"name": name}}}, "s"]]})
        pending.add(request_id)
        if len(pending) >= 3:  # stay within maxConcurrentRequests
            pending -= wait_responses(ws, 1)
    while pending:
        pending -= wait_responses(ws, 1)
    final = state_of(alice, "Mailbox")
    ws.states_until(has_states(alice.account_id, {"Mailbox": final}))


def test_ws_large_responses_in_flight_stay_whole(ws_server, alice):
    """Large answers (several MB in all, more than the socket buffers hold) written at
    once by the server's request threads to a client that reads slowly: each arrives as
    one whole frame (the writes of two threads never interleave)."""
    line = "0123456789 abcdefghij " * 3 + "\r\n"
    text = line * (3_000_000 // len(line))
    blob = upload(alice, message(unique("Large "), text=text))["blobId"]
    imported = alice.ok("Email/import", {"accountId": alice.account_id, "emails": {"e": {
        "blobId": blob, "mailboxIds": {inbox(alice): True}}}})
    email_id = imported["created"]["e"]["id"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning
    sock.settimeout(WAIT_S)
    sock.connect(ws_server.ws_addr)
    sock.sendall(handshake_text(f"127.0.0.1:{ws_server.ws_addr[1]}",
                                Authorization=basic(alice.username)).encode())
    assert read_http_head(sock)[0] == 101
    ids = [f"get{i}" for i in range(4)]  # maxConcurrentRequests (4 by default)
    for request_id in ids:
        sock.sendall(frame(0x1, json.dumps({
            "@type": "Request", "id": request_id, "using": [CORE, MAIL], "methodCalls": [
                ["Email/get", {"accountId": alice.account_id, "ids": [email_id],
                               "properties": ["bodyValues"], "fetchAllBodyValues": True},
                 "g"]]}).encode()))
    time.sleep(0.5)  # the answers pile up in the server's writes
    got = set()
    for _ in ids:
        reply = read_message(sock)
        assert reply["@type"] == "Response", reply
        values = reply["methodResponses"][0][1]["list"][0]["bodyValues"]
        expected = text.replace("\r\n", "\n").rstrip("\n")
        assert [v["value"].replace("\r\n", "\n").rstrip("\n")
                for v in values.values()] == [expected]
        got.add(reply["requestId"])
    assert got == set(ids)
    sock.close()


def wait_responses(ws, count):
    """Read until `count` Responses came (StateChanges in between are fine)."""
    got = set()
    while len(got) < count:
        reply = ws.recv()
        if reply["@type"] == "StateChange":
            continue
        assert reply["@type"] == "Response", reply
        assert reply["methodResponses"][0][0] == "Mailbox/set", reply
        assert "m" in reply["methodResponses"][0][1]["created"], reply
        got.add(reply["requestId"])
    return got


def test_ws_request_without_id_gets_response_without_request_id(alice, sockets):
    ws = sockets(alice)
    ws.send({"@type": "Request", "using": [CORE], "methodCalls": [["Core/echo", {}, "x"]]})
    reply = ws.recv()
    assert reply["@type"] == "Response" and "requestId" not in reply, reply


def test_ws_empty_string_id_is_echoed(alice, sockets):
    ws = sockets(alice)
    reply = ws.call(echo_request("", {}))
    assert reply.get("requestId") == "", reply


def request_error(ws, message, request_id):
    ws.send(message)
    error = ws.recv()
    assert error["@type"] == "RequestError", error
    assert error["requestId"] == request_id, error
    assert error["status"] == 400 and isinstance(error.get("detail"), str), error
    return error


def test_ws_unknown_capability_is_a_request_error(alice, sockets):
    ws = sockets(alice)
    error = request_error(ws, {"@type": "Request", "id": "U1",
                               "using": [CORE, "urn:example:no-such-capability"],
                               "methodCalls": [["Core/echo", {}, "c"]]}, "U1")
    assert error["type"] == ERROR + "unknownCapability", error


@pytest.mark.parametrize("message, request_id", [
    ({"@type": "Requests", "id": "T1", "using": [CORE], "methodCalls": []}, "T1"),
    ({"id": "T2", "using": [CORE], "methodCalls": []}, "T2"),  # no @type at all
    ({"@type": "StateChange", "changed": {}}, None),  # a server-to-client type
    ([{"@type": "Request"}], None),  # not an object
    ({"@type": "Request", "id": "T3", "using": [CORE]}, "T3"),  # no methodCalls
    ({"@type": "Request", "id": 7, "using": [CORE], "methodCalls": []}, None),  # id not String
    ({"@type": "WebSocketPushEnable", "dataTypes": "Mailbox"}, None),
])
def test_ws_not_a_request_is_a_request_error(alice, sockets, message, request_id):
    ws = sockets(alice)
    error = request_error(ws, message, request_id)
    assert error["type"] == ERROR + "notRequest", error
    assert ws.call(echo_request("after", {}))["@type"] == "Response"  # still open


def test_ws_method_error_is_a_normal_response(alice, sockets):
    ws = sockets(alice)
    reply = ws.call({"@type": "Request", "id": "M1", "using": [CORE], "methodCalls": [
        ["Nope/nothing", {}, "bad"], ["Core/echo", {"after": 1}, "ok"]]})
    assert reply["@type"] == "Response", reply
    error = reply["methodResponses"][0][1]
    assert isinstance(error.pop("description", ""), str), error
    assert reply["methodResponses"] == [["error", {"type": "unknownMethod"}, "bad"],
                                        ["Core/echo", {"after": 1}, "ok"]]


def test_ws_message_just_under_max_size_request_is_answered(alice, sockets):
    """A message just under --max-size-request is answered (the limit is the message's)."""
    ws = sockets(alice)
    pad = "x" * (MAX_REQUEST - 200)
    request = echo_request("big", {"pad": pad})
    assert len(json.dumps(request)) <= MAX_REQUEST
    assert ws.call(request)["methodResponses"] == [["Core/echo", {"pad": pad}, "c0"]]


# =============================================================================
# Authentication (RFC 8887 §4.1) and Origin
# =============================================================================


def test_ws_bearer_app_password_and_access_token(ws_server, alice, sockets):
    token = app_password(ws_server, alice.username)
    bearer = sockets(headers={"Authorization": "Bearer " + token})
    assert bearer.call(echo_request("b", {}))["@type"] == "Response"
    bearer.close()
    by_query = sockets(url=ws_server.ws_url + "?access_token=" + quote(token, safe=""),
                       headers={})
    reply = by_query.call({"@type": "Request", "id": "q", "using": [CORE, MAIL], "methodCalls": [
        ["Mailbox/get", {"accountId": alice.account_id, "ids": []}, "m"]]})
    assert reply["methodResponses"][0][0] == "Mailbox/get", reply  # alice's own account
    assert reply["sessionState"] == alice.session["state"]


def test_ws_same_origin_with_basic_is_accepted(ws_server, alice):
    origin = f"http://{ws_server.ws_addr[0]}:{ws_server.ws_addr[1]}"
    reply = raw_handshake(ws_server, auth=(alice.username, PASSWORD), Origin=origin)
    assert reply.status == 101, (reply.status, reply.body)
    reply.sock.close()


# =============================================================================
# RFC 6455 §4.2: handshake errors (raw HTTP/1.1)
# =============================================================================


@pytest.mark.parametrize("case, path, overrides, status", [
    ("no subprotocol", "/jmap/ws/", {"Sec_WebSocket_Protocol": None}, 400),
    ("other subprotocol", "/jmap/ws/", {"Sec_WebSocket_Protocol": "chat, superchat"}, 400),
    ("version 8", "/jmap/ws/", {"Sec_WebSocket_Version": "8"}, 426),
    ("no version", "/jmap/ws/", {"Sec_WebSocket_Version": None}, 426),
    ("key not base64", "/jmap/ws/", {"Sec_WebSocket_Key": "not a key!"}, 400),
    ("key of 8 octets", "/jmap/ws/",
     {"Sec_WebSocket_Key": base64.b64encode(b"8 octets").decode()}, 400),
    ("no key", "/jmap/ws/", {"Sec_WebSocket_Key": None}, 400),
    ("wrong path", "/jmap/api/", {}, 404),
    ("plain GET", "/jmap/ws/", {"Upgrade": None, "Connection": None}, 426),
    ("upgrade to h2c", "/jmap/ws/", {"Upgrade": "h2c"}, 426),
])
def test_ws_handshake_refused(ws_server, alice, case, path, overrides, status):
    reply = raw_handshake(ws_server, path, auth=(alice.username, PASSWORD), **overrides)
    assert reply.status == status, (case, reply.status, reply.body)
    problem = reply.problem()
    assert problem["status"] == status, problem
    if case.startswith("version") or case == "no version":
        assert reply.headers.get("sec-websocket-version") == "13", reply.headers
    if case == "plain GET":
        assert reply.headers.get("upgrade", "").lower() == "websocket", reply.headers
    assert_serves(ws_server, alice)


@pytest.mark.parametrize("case", ["no credentials", "wrong password", "unknown user",
                                  "wrong bearer", "wrong access_token"])
def test_ws_handshake_unauthenticated(ws_server, alice, case):
    path, auth = "/jmap/ws/", None
    if case == "wrong password":
        auth = (alice.username, "not the password")
    elif case == "unknown user":
        auth = (f"{unique('nobody')}@example.com", PASSWORD)
    elif case == "wrong bearer":
        auth = "Bearer " + app_password(ws_server, alice.username) + "x"
    elif case == "wrong access_token":
        path += "?access_token=" + quote(changed_last(app_password(ws_server, alice.username)))
    reply = raw_handshake(ws_server, path, auth=auth)
    assert reply.status == 401, (reply.status, reply.body)
    assert reply.headers.get("www-authenticate", "").lower().startswith("basic"), reply.headers
    assert reply.problem()["status"] == 401
    assert_serves(ws_server, alice)


def test_ws_foreign_origin_refused_with_basic(ws_server, alice):
    reply = raw_handshake(ws_server, auth=(alice.username, PASSWORD),
                          Origin="https://evil.example")
    assert reply.status == 403, (reply.status, reply.body)
    assert reply.problem()["status"] == 403
    token = app_password(ws_server, alice.username)
    bearer = raw_handshake(ws_server, auth="Bearer " + token, Origin="https://evil.example")
    assert bearer.status == 403, (bearer.status, bearer.body)  # any Authorization header
    assert_serves(ws_server, alice)


def test_ws_foreign_origin_accepted_with_access_token(ws_server, alice):
    token = app_password(ws_server, alice.username)
    reply = raw_handshake(ws_server, "/jmap/ws/?access_token=" + quote(token, safe=""),
                          Origin="https://evil.example")
    assert reply.status == 101, (reply.status, reply.body)
    assert reply.headers["sec-websocket-protocol"] == "jmap"
    reply.sock.sendall(frame(0x1, json.dumps(echo_request("o", {"x": 1})).encode()))
    assert read_message(reply.sock)["methodResponses"] == [["Core/echo", {"x": 1}, "c0"]]
    reply.sock.sendall(close_frame(1000))
    expect_close(reply.sock, 1000)


def test_ws_subprotocol_among_others_is_chosen(ws_server, alice):
    reply = raw_handshake(ws_server, auth=(alice.username, PASSWORD),
                          Sec_WebSocket_Protocol="chat, jmap")
    assert reply.status == 101, (reply.status, reply.body)
    assert reply.headers["sec-websocket-protocol"] == "jmap"
    reply.sock.close()


def test_ws_handshake_as_browsers_send_it(ws_server, alice):
    """Firefox's `Connection: keep-alive, Upgrade`, a mixed-case `Upgrade: WebSocket` and
    an offered extension (declined: frames stay plain)."""
    reply = raw_handshake(ws_server, auth=(alice.username, PASSWORD),
                          Connection="keep-alive, Upgrade", Upgrade="WebSocket",
                          Sec_WebSocket_Extensions="permessage-deflate; client_max_window_bits")
    assert reply.status == 101, (reply.status, reply.body)
    assert "sec-websocket-extensions" not in reply.headers  # no extension: plain frames
    reply.sock.sendall(frame(0x1, json.dumps(echo_request("ff", {})).encode()))
    assert read_message(reply.sock)["requestId"] == "ff"
    reply.sock.close()


def test_ws_handshake_in_pieces(ws_server, alice):
    sock = socket.create_connection(ws_server.ws_addr, timeout=WAIT_S)
    text = handshake_text(f"127.0.0.1:{ws_server.ws_addr[1]}",
                          Authorization=basic(alice.username)).encode()
    for piece in (text[:5], text[5:60], text[60:-3], text[-3:]):
        sock.sendall(piece)
        time.sleep(0.05)
    status, headers, rest = read_http_head(sock)
    assert status == 101, (status, headers)
    sock.sendall(frame(0x1, json.dumps(echo_request("slow", {})).encode()))
    assert read_message(sock)["requestId"] == "slow"
    sock.close()


def test_ws_handshake_head_too_large(ws_server, alice):
    reply = raw_handshake(ws_server, auth=(alice.username, PASSWORD), X_Filler="f" * 20_000)
    assert reply.status in (400, 431), (reply.status, reply.body)
    assert_serves(ws_server, alice)


def test_ws_garbage_and_silent_connections_do_not_stop_the_server(ws_server, alice):
    junk = socket.create_connection(ws_server.ws_addr, timeout=WAIT_S)
    junk.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n")
    silent = socket.create_connection(ws_server.ws_addr, timeout=WAIT_S)  # sends nothing
    half = socket.create_connection(ws_server.ws_addr, timeout=WAIT_S)
    half.sendall(b"GET /jmap/ws/ HTTP/1.1\r\nHost: x\r\n")  # never finished
    try:
        assert_serves(ws_server, alice)
    finally:
        for sock in (junk, silent, half):
            sock.close()


# =============================================================================
# RFC 6455 §5: framing (raw frames after a good handshake)
# =============================================================================


FRAMING_ERRORS = {
    "unmasked frame": ([frame(0x1, b'{"@type":"Request"}', masked=False)], 1002),
    "RSV1 set": ([frame(0x1, b"{}", rsv=4)], 1002),
    "RSV3 set": ([frame(0x1, b"{}", rsv=1)], 1002),
    "opcode 3": ([frame(0x3, b"{}")], 1002),
    "opcode 0xB": ([frame(0xB, b"")], 1002),
    "ping of 126 octets": ([frame(0x9, b"p" * 126)], 1002),
    "fragmented ping": ([frame(0x9, b"p", fin=False)], 1002),
    "continuation first": ([frame(0x0, b"{}")], 1002),
    "new message inside a fragmented one": (
        [frame(0x1, b'{"@type":', fin=False), frame(0x1, b'"Request"}')], 1002),
    "binary message": ([frame(0x2, json.dumps(echo_request("b", {})).encode())], 1003),
    "fragmented binary message": ([frame(0x2, b"{", fin=False), frame(0x0, b"}")], 1003),
    "invalid UTF-8": ([frame(0x1, b'{"a":"\xff\xfe"}')], 1007),
    "UTF-8 surrogate": ([frame(0x1, b'{"a":"\xed\xa0\x80"}')], 1007),
    "close with code 1005": ([close_frame(1005)], 1002),
    "close with 1 octet": ([frame(0x8, b"\x03")], 1002),
    "close reason not UTF-8": ([close_frame(1000, b"\xff")], 1007),
}


@pytest.mark.parametrize("case", list(FRAMING_ERRORS))
def test_ws_framing_error_closes_with_code(ws_server, alice, case):
    frames, code = FRAMING_ERRORS[case]
    sock = raw_open(ws_server, alice)
    sock.sendall(b"".join(frames))
    expect_close(sock, code)
    assert_serves(ws_server, alice)


def test_ws_message_over_size_limit_closes_1009_from_header(ws_server, alice):
    """The frame header claims more than --max-size-request: refused before the payload."""
    sock = raw_open(ws_server, alice)
    sock.sendall(frame(0x1, b"", length=MAX_REQUEST + 1)[:10])  # header only (127 form)
    expect_close(sock, 1009)
    assert_serves(ws_server, alice)


def test_ws_fragments_over_size_limit_close_1009(ws_server, alice):
    """Each fragment is small; together they pass --max-size-request."""
    sock = raw_open(ws_server, alice)
    piece = b" " * (MAX_REQUEST // 2)
    sock.sendall(frame(0x1, b"{", fin=False) + frame(0x0, piece, fin=False))
    sock.sendall(frame(0x0, piece, fin=False))  # now over the limit
    expect_close(sock, 1009)
    assert_serves(ws_server, alice)


def test_ws_flood_of_empty_fragments_closes_1009(ws_server, alice):
    """Empty continuation frames carry no payload but cost memory each: a message may not
    be cut into more than a bounded number of fragments (RFC 6455 §10.4)."""
    sock = raw_open(ws_server, alice)
    sock.sendall(frame(0x1, b"{", fin=False) + frame(0x0, b"", fin=False) * 5000)
    expect_close(sock, 1009)
    assert_serves(ws_server, alice)


def test_ws_close_codes_1012_to_1014_are_valid(ws_server, alice):
    """RFC 6455 §7.4: 1012-1014 are registered codes a peer may send; echoed, not 1002."""
    for code in (1012, 1013, 1014):
        sock = raw_open(ws_server, alice)
        sock.sendall(close_frame(code))
        expect_close(sock, code)


def test_ws_client_message_over_size_limit_gets_1009(ws_server, alice, sockets):
    """What a real client sees when its whole over-limit message is on the wire."""
    ws = sockets(alice)
    ws.send(echo_request("huge", {"pad": "x" * (MAX_REQUEST + 1)}))
    with pytest.raises(ConnectionClosed) as closed:
        ws.conn.recv(timeout=WAIT_S)
    assert closed.value.rcvd is not None, "no close frame reached the client"
    assert closed.value.rcvd.code == 1009
    assert_serves(ws_server, alice)


def test_ws_ping_gets_pong_with_same_payload(ws_server, alice):
    sock = raw_open(ws_server, alice)
    for payload in (b"", b"jmapd?", os.urandom(125)):
        sock.sendall(frame(0x9, payload))
        assert read_frame(sock) == (True, 0xA, payload)
    sock.sendall(frame(0xA, b"unsolicited"))  # a pong nobody asked for is ignored
    sock.sendall(frame(0x1, json.dumps(echo_request("p", {})).encode()))
    assert read_message(sock)["requestId"] == "p"
    sock.sendall(close_frame(1000))
    expect_close(sock, 1000)


def test_ws_fragmented_request_with_ping_between(ws_server, alice):
    text = json.dumps(echo_request("F1", {"word": "fragments \u00e9\u20ac\U0001f600"}),
                      ensure_ascii=False)
    data = text.encode("utf-8")
    cut1 = data.index(b"\xc3") + 1  # inside a 2-octet UTF-8 sequence
    cut2 = data.index(b"\xf0") + 2  # inside a 4-octet one
    sock = raw_open(ws_server, alice)
    sock.sendall(frame(0x1, data[:cut1], fin=False))
    sock.sendall(frame(0x9, b"between"))
    sock.sendall(frame(0x0, data[cut1:cut2], fin=False))
    sock.sendall(frame(0x0, data[cut2:], fin=True))
    assert read_frame(sock) == (True, 0xA, b"between")
    reply = read_message(sock)
    assert reply["requestId"] == "F1", reply
    assert reply["methodResponses"] == [
        ["Core/echo", {"word": "fragments \u00e9\u20ac\U0001f600"}, "c0"]]
    sock.sendall(close_frame(1000))
    expect_close(sock, 1000)


def test_ws_payload_lengths_16_and_64_bit(ws_server, alice):
    """Client frames in the 126 (16-bit) and 127 (64-bit) length forms; replies the same."""
    sock = raw_open(ws_server, alice)
    for size in (200, 70_000):
        pad = "y" * size
        body = json.dumps(echo_request(f"L{size}", {"pad": pad})).encode()
        sock.sendall(frame(0x1, body))
        reply = read_message(sock)
        assert reply["methodResponses"] == [["Core/echo", {"pad": pad}, "c0"]]
    sock.sendall(close_frame(1000))
    expect_close(sock, 1000)


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
def test_ws_client_close_is_echoed(ws_server, alice, code):
    sock = raw_open(ws_server, alice)
    sock.sendall(close_frame(code, b"bye"))
    expect_close(sock, code)
    assert_serves(ws_server, alice)


def test_ws_client_close_without_code_is_answered(ws_server, alice):
    sock = raw_open(ws_server, alice)
    sock.sendall(frame(0x8, b""))
    fin, opcode, payload = read_frame(sock)
    assert opcode == 0x8, (opcode, payload)
    assert payload == b"" or struct.unpack("!H", payload[:2])[0] == 1000, payload


def test_ws_client_vanishing_frees_its_slot(ws_server, alice):
    """Connections dropped without a close frame (TCP only) free the per-user slots."""
    limit = 8  # --max-push-connections by default
    for _ in range(3):
        dropped = [open_until_accepted(ws_server, alice) for _ in range(limit)]
        assert all(reply.status == 101 for reply in dropped), [r.status for r in dropped]
        refused = raw_handshake(ws_server, auth=(alice.username, PASSWORD))
        assert refused.status == 400, (refused.status, refused.body)  # both slots held
        for reply in dropped:
            reply.sock.close()


# =============================================================================
# Limits: --max-push-connections (per user and kind), --max-websockets (in all)
# =============================================================================


def test_ws_max_push_connections_per_user(tmp_path_factory):
    srv = start_server(tmp_path_factory, "ws-per-user", "--max-push-connections", "1")
    try:
        alice, bob = new_client(srv, "alice"), new_client(srv, "bob")
        first = raw_open(srv, alice)
        refused = raw_handshake(srv, auth=(alice.username, PASSWORD))
        assert refused.status == 400, (refused.status, refused.body)
        assert refused.problem()["status"] == 400
        other = raw_open(srv, bob)  # the limit is per user
        # ... and per kind: an EventSource stream of the same user is still allowed
        url = alice.session["eventSourceUrl"].replace("{types}", "*").replace(
            "{closeafter}", "no").replace("{ping}", "0")
        with alice.http.get(url, stream=True, timeout=WAIT_S) as stream:
            assert stream.status_code == 200, stream.text
        first.sendall(frame(0x1, json.dumps(echo_request("1", {})).encode()))
        assert read_message(first)["requestId"] == "1"  # the first goes on
        first.sendall(close_frame(1000))
        expect_close(first, 1000)
        again = open_until_accepted(srv, alice)
        assert again.status == 101, (again.status, again.body)
        again.sock.close()
        other.close()
    finally:
        srv.stop()


def test_ws_max_push_connections_problem_is_a_jmap_limit(tmp_path_factory):
    srv = start_server(tmp_path_factory, "ws-limit-type", "--max-push-connections", "1")
    try:
        alice = new_client(srv, "alice")
        first = raw_open(srv, alice)
        refused = raw_handshake(srv, auth=(alice.username, PASSWORD))
        first.close()
        assert refused.status == 400, (refused.status, refused.body)
        problem = refused.problem()
        assert problem["type"] == ERROR + "limit", problem
        assert isinstance(problem.get("limit"), str) and problem["limit"], problem
    finally:
        srv.stop()


def test_ws_max_websockets_in_all(tmp_path_factory):
    srv = start_server(tmp_path_factory, "ws-total", "--max-websockets", "2")
    try:
        users = [new_client(srv, f"u{i}") for i in range(3)]
        first, second = raw_open(srv, users[0]), raw_open(srv, users[1])
        refused = raw_handshake(srv, auth=(users[2].username, PASSWORD))
        assert refused.status == 503, (refused.status, refused.body)
        assert refused.problem()["status"] == 503
        # HTTP is not held up by full WebSocket slots
        assert users[2].ok("Core/echo", {"http": 1}, using=[CORE]) == {"http": 1}
        first.sendall(close_frame(1000))
        expect_close(first, 1000)
        again = open_until_accepted(srv, users[2])
        assert again.status == 101, (again.status, again.body)
        again.sock.sendall(frame(0x1, json.dumps(echo_request("3", {})).encode()))
        assert read_message(again.sock)["requestId"] == "3"
        again.sock.close()
        second.close()
    finally:
        srv.stop()


# =============================================================================
# Shutdown
# =============================================================================


def test_ws_sigterm_closes_websockets_1001_and_exits_0(tmp_path_factory):
    srv = start_server(tmp_path_factory, "ws-term")
    try:
        alice = new_client(srv, "alice")
        pushing = Jws(srv.ws_url, headers={"Authorization": basic(alice.username)})
        pushing.push_enable(None)
        pushing.call(echo_request("sync", {}))
        raw = raw_open(srv, alice)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        raw.settimeout(PROMPT_S)
        expect_close(raw, 1001)
        with pytest.raises(ConnectionClosed) as closed:
            pushing.conn.recv(timeout=PROMPT_S)
        assert time.monotonic() - started < PROMPT_S
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, closed.value
        assert srv.proc.wait(WAIT_S) == 0, srv.log()
    finally:
        srv.stop()


# =============================================================================
# EventSource with ?access_token= (RFC 8620 §7.3; browsers cannot set Authorization)
# =============================================================================


def event_source(client, token=None, auth=True):
    url = client.session["eventSourceUrl"].replace("{types}", "*").replace(
        "{closeafter}", "state").replace("{ping}", "0")
    if token is not None:
        url += "&access_token=" + quote(token, safe="")
    session = requests.Session()
    if not auth:
        session.auth = None
    return session.get(url, stream=True, timeout=WAIT_S,
                       auth=client.http.auth if auth else None)


def test_ws_event_source_with_access_token(ws_server, alice):
    token = app_password(ws_server, alice.username)
    with event_source(alice, token, auth=False) as stream:
        assert stream.status_code == 200, stream.text
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        new_state = make_mailbox(alice)
        lines = []
        for line in stream.iter_lines(decode_unicode=True):  # closeafter=state: it ends
            lines.append(line)
        data = [line[5:].strip() for line in lines if line.startswith("data:")]
        assert "event: state" in lines, lines
        assert json.loads(data[-1]) == {"@type": "StateChange",
                                        "changed": exactly(alice.account_id, "Mailbox",
                                                           new_state)}


@pytest.mark.parametrize("token", ["wrong", "right-but-changed", None])
def test_ws_event_source_access_token_wrong_is_401(ws_server, alice, token):
    if token == "right-but-changed":
        token = changed_last(app_password(ws_server, alice.username))
    with event_source(alice, token, auth=False) as stream:
        assert stream.status_code == 401, stream.status_code
        assert stream.headers.get("WWW-Authenticate", "").lower().startswith("basic")
