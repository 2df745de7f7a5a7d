"""LMTP inside `serve` (jmapd §8.2 LMTP, §8.1 DELIVER_MESSAGE, §14 serve --lmtp/--lmtp-socket).

Driven as an MTA drives it, with `smtplib.LMTP` and raw sockets against a real
`jmapd.py serve --lmtp 127.0.0.1:0 --lmtp-socket PATH` subprocess; what arrived is read
back through JMAP as a client would (Email/query, Email/get, Mailbox/get, the download URL).

RFC 2033 §4.1 LHLO (HELO/EHLO refused) and its extensions (PIPELINING RFC 2920, 8BITMIME
RFC 6152, SIZE RFC 1870, ENHANCEDSTATUSCODES RFC 2034); §4.2 one reply per successful
RCPT after DATA, in RCPT order, 503 for DATA without one; RFC 5321 §4.1.1 MAIL/RCPT/DATA/
RSET/NOOP/QUIT and 503 out of order, §4.1.1.4 a transaction the connection dropped before
the final "." is cancelled, §4.5.2 dot-stuffing, §4.2 reply codes (550 unknown recipient,
552 too big by SIZE= and by DATA). jmapd's own rules: aliases deliver to their owner,
`user+detail@` files into the Mailbox with that role or name (never creating one), the
trace fields Return-Path/Received are the only change to the message, and every 250 means
the message survives a SIGKILL of the server (the crash test).
"""

import email.utils
import itertools
import re
import secrets
import signal
import smtplib
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import Client, Server, add_user, run_cli

MAX_SIZE = 20_000  # --max-size-upload of the module's server: the SIZE limit
_serial = itertools.count(1)


# ---- fixtures ----


@pytest.fixture(scope="module")
def lmtp_server(tmp_path_factory):
    """One server with LMTP on TCP and on a Unix socket, and a small message size limit."""
    data_dir = tmp_path_factory.mktemp("lmtp") / "data"
    add_user(data_dir, "first@example.com")
    # A Unix socket path must fit in sun_path (108 octets): a short temp dir of its own.
    sock_dir = Path(tempfile.mkdtemp(prefix="jl-"))
    srv = Server(data_dir, "--lmtp", "127.0.0.1:0", "--lmtp-socket", sock_dir / "lmtp.sock",
                 "--max-size-upload", MAX_SIZE).start()
    srv.lmtp_socket = str(sock_dir / "lmtp.sock")
    yield srv
    srv.stop()
    for leftover in sock_dir.iterdir():
        leftover.unlink()
    sock_dir.rmdir()


@pytest.fixture
def new_user(lmtp_server):
    """Make a fresh user on the module's server; return (address, Client)."""

    def make(prefix="rcpt"):
        address = f"{prefix}{next(_serial)}-{secrets.token_hex(3)}@example.com"
        add_user(lmtp_server.data_dir, address)
        return address, Client(lmtp_server.url, address)

    return make


# ---- LMTP helpers (an MTA's side) ----


def lmtp_port(server) -> int:
    match = re.search(r"LMTP on 127\.0\.0\.1:(\d+)", server.log())
    assert match, server.log()
    return int(match.group(1))


def lmtp_connect(server, greet=True) -> smtplib.LMTP:
    """An LMTP connection (the constructor insists on the 220 greeting), LHLO said."""
    conn = smtplib.LMTP("127.0.0.1", lmtp_port(server), timeout=30)
    if greet:
        code, _ = conn.ehlo("mta.example.net")  # smtplib.LMTP sends LHLO here
        assert code == 250
    return conn


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with "." gets one more."""
    return re.sub(rb"(?m)^\.", b"..", message)


def send_data(conn: smtplib.LMTP, message: bytes, replies: int) -> list:
    """DATA, the dot-stuffed message and the final ".", then one reply per recipient."""
    code, text = conn.docmd("DATA")
    assert code == 354, (code, text)
    assert message.endswith(b"\r\n")
    conn.sock.sendall(dot_stuff(message) + b".\r\n")
    return [conn.getreply() for _ in range(replies)]


def transaction(conn, sender, recipients, message) -> tuple[list, list]:
    """MAIL, each RCPT, and (if any RCPT got 250) DATA; return (RCPT codes, DATA replies)."""
    code, text = conn.docmd(f"MAIL FROM:<{sender}>")
    assert code == 250, (code, text)
    rcpt = [conn.docmd(f"RCPT TO:<{r}>")[0] for r in recipients]
    accepted = sum(c == 250 for c in rcpt)
    return rcpt, (send_data(conn, message, accepted) if accepted else [])


def make_message(subject: str, body: str, sender="alice@example.net", to="bob@example.com",
                 msgid=None) -> bytes:
    """A plain-text RFC 5322 message with CRLF line ends (8-bit UTF-8 body)."""
    msgid = msgid or f"{secrets.token_hex(8)}@example.net"
    head = [f"From: Alice <{sender}>", f"To: {to}", f"Subject: {subject}",
            f"Message-ID: <{msgid}>", f"Date: {email.utils.formatdate()}",
            "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit"]
    text = "\r\n".join(head) + "\r\n\r\n" + body.replace("\r\n", "\n").replace("\n", "\r\n")
    return text.encode("utf-8") + (b"" if text.endswith("\r\n") else b"\r\n")


def token() -> str:
    return "tok" + secrets.token_hex(8)


def split_trace(blob: bytes, sender: str) -> tuple[bytes, bytes]:
    """Split jmapd's trace fields (Return-Path, then Received, RFC 5321 §4.4) off a blob."""
    expected = f"Return-Path: <{sender}>\r\n".encode()
    assert blob.startswith(expected), blob[:200]
    rest = blob[len(expected):]
    assert rest.startswith(b"Received: "), blob[:300]
    end = rest.index(b"\r\n") + 2
    while rest[end:end + 1] in (b" ", b"\t"):  # a folded Received field
        end = rest.index(b"\r\n", end) + 2
    return blob[: len(expected) + end], rest[end:]


# ---- JMAP helpers (a client's side) ----


def query_ids(client, condition=None) -> list:
    args = {"accountId": client.account_id}
    if condition:
        args["filter"] = condition
    return client.ok("Email/query", args)["ids"]


def get_emails(client, ids, properties) -> list:
    if not ids:
        return []
    return client.ok("Email/get", {"accountId": client.account_id, "ids": ids,
                                    "properties": properties})["list"]


def mailboxes(client) -> list:
    return client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})["list"]


def mailbox_id(client, role=None, name=None) -> str:
    for mailbox in mailboxes(client):
        if (role and mailbox["role"] == role) or (name and mailbox["name"] == name):
            return mailbox["id"]
    raise AssertionError(f"no mailbox role={role} name={name}")


def create_mailbox(client, name) -> str:
    done = client.ok("Mailbox/set", {"accountId": client.account_id,
                                     "create": {"m": {"name": name}}})
    assert "m" in (done.get("created") or {}), done
    return done["created"]["m"]["id"]


def download(client, blob_id) -> bytes:
    url = (client.session["downloadUrl"].replace("{accountId}", client.account_id)
           .replace("{blobId}", blob_id).replace("{name}", "message.eml")
           .replace("{type}", "message/rfc822"))
    r = client.http.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


def find_one(client, tok) -> dict:
    """The one Email whose text holds tok, with its blobId and Mailboxes."""
    ids = query_ids(client, {"text": tok})
    assert len(ids) == 1, (tok, ids)
    return get_emails(client, ids, ["blobId", "mailboxIds", "subject", "keywords"])[0]


# ---- LHLO and its extensions ----


def test_lmtp_lhlo_advertises_extensions(lmtp_server):
    conn = lmtp_connect(lmtp_server, greet=False)
    try:
        code, text = conn.ehlo("mta.example.net")
        assert code == 250, text
        for ext in ("pipelining", "8bitmime", "enhancedstatuscodes"):
            assert conn.has_extn(ext), conn.esmtp_features
        assert conn.has_extn("size")
        assert int(conn.esmtp_features["size"]) == MAX_SIZE  # RFC 1870: the fixed maximum
    finally:
        conn.close()


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_lmtp_helo_and_ehlo_refused(lmtp_server, verb):
    """RFC 2033 §4.1: LMTP has LHLO only; HELO/EHLO get an error and greet nothing."""
    conn = lmtp_connect(lmtp_server, greet=False)
    try:
        code, _ = conn.docmd(verb, "mta.example.net")
        assert code in (500, 502), code
        # The refused greeting did not open a session: MAIL still wants LHLO first.
        assert conn.docmd("MAIL FROM:<a@example.net>")[0] == 503
        assert conn.docmd("LHLO", "mta.example.net")[0] == 250
        assert conn.docmd("MAIL FROM:<a@example.net>")[0] == 250
    finally:
        conn.close()


# ---- recipients and per-recipient replies (RFC 2033 §4.2) ----


def test_lmtp_unknown_recipient_refused_others_delivered(lmtp_server, new_user):
    (one, c1), (two, c2) = new_user(), new_user()
    tok = token()
    conn = lmtp_connect(lmtp_server)
    try:
        code, text = conn.docmd("MAIL FROM:<alice@example.net>")
        assert code == 250
        assert conn.docmd(f"RCPT TO:<{one}>")[0] == 250
        code, text = conn.docmd("RCPT TO:<nobody-here@example.com>")
        assert code == 550, text
        assert text.startswith(b"5."), text  # ENHANCEDSTATUSCODES (RFC 2034)
        assert conn.docmd(f"RCPT TO:<{two}>")[0] == 250
        replies = send_data(conn, make_message("two of three", f"Hello {tok}\n"), 2)
        assert [code for code, _ in replies] == [250, 250], replies
        assert all(text.startswith(b"2.") for _, text in replies), replies
    finally:
        conn.close()
    assert find_one(c1, tok) and find_one(c2, tok)


def test_lmtp_one_reply_per_recipient_in_rcpt_order(lmtp_server, new_user):
    """RFC 2033 §4.2: after DATA, one reply per successful RCPT, in the order of the RCPTs.

    The middle recipient's account is deleted between its RCPT and the DATA, so its
    reply must differ from its neighbours' (a deferral or refusal, not 250).
    """
    (one, c1), (gone, _), (three, c3) = new_user(), new_user("gone"), new_user()
    tok = token()
    conn = lmtp_connect(lmtp_server)
    try:
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
        assert [conn.docmd(f"RCPT TO:<{r}>")[0] for r in (one, gone, three)] == [250] * 3
        done = run_cli("user", "del", gone, data_dir=lmtp_server.data_dir)
        assert done.returncode == 0, done.stderr
        replies = send_data(conn, make_message("order", f"Order {tok}\n"), 3)
        codes = [code for code, _ in replies]
        assert codes[0] == 250 and codes[2] == 250, replies
        assert codes[1] // 100 in (4, 5), replies
        # The connection goes on: nothing was left unread or answered twice.
        assert conn.docmd("NOOP")[0] == 250
    finally:
        conn.close()
    assert find_one(c1, tok) and find_one(c3, tok)


# ---- the message itself: dot-stuffing, 8-bit, trace fields ----


def test_lmtp_dot_stuffing_and_raw_message(lmtp_server, new_user):
    """RFC 5321 §4.5.2: the receiver removes one leading dot; the rest arrives octet for octet.

    The wire form is written out by hand here, not by the module's dot_stuff().
    """
    address, client = new_user()
    tok = token()
    head = make_message("Dots \u00e9t\u00e9", f"Token {tok}\n")
    wire = head + ("..leading dot\r\n...\r\n..\r\n....three dots\r\n.. space after dot\r\n"
                   "middle . dot\r\nGr\u00fc\u00dfe, \u65e5\u672c\r\n").encode()
    sent = head + ((".leading dot\r\n..\r\n.\r\n...three dots\r\n. space after dot\r\n"
                    "middle . dot\r\nGr\u00fc\u00dfe, \u65e5\u672c\r\n").encode())
    conn = lmtp_connect(lmtp_server)
    try:
        assert conn.docmd("MAIL FROM:<alice@example.net> BODY=8BITMIME")[0] == 250
        assert conn.docmd(f"RCPT TO:<{address}>")[0] == 250
        assert conn.docmd("DATA")[0] == 354
        conn.sock.sendall(wire + b".\r\n")
        code, text = conn.getreply()
        assert code == 250, text
    finally:
        conn.close()
    found = find_one(client, tok)
    assert found["subject"] == "Dots \u00e9t\u00e9"
    raw = download(client, found["blobId"])
    _, rest = split_trace(raw, "alice@example.net")
    assert rest == sent


def test_lmtp_null_sender_in_return_path(lmtp_server, new_user):
    """A bounce (MAIL FROM:<>, RFC 5321 §4.5.5) is delivered with Return-Path: <>."""
    address, client = new_user()
    tok = token()
    message = make_message("Undeliverable", f"Bounce {tok}\n", sender="mailer-daemon@example.net")
    conn = lmtp_connect(lmtp_server)
    try:
        rcpt, replies = transaction(conn, "", [address], message)
        assert rcpt == [250] and [c for c, _ in replies] == [250], replies
    finally:
        conn.close()
    _, rest = split_trace(download(client, find_one(client, tok)["blobId"]), "")
    assert rest == message


# ---- size limits (RFC 1870, RFC 5321 §4.2.3 552) ----


def test_lmtp_mail_size_parameter_limit(lmtp_server):
    conn = lmtp_connect(lmtp_server)
    try:
        code, text = conn.docmd(f"MAIL FROM:<alice@example.net> SIZE={MAX_SIZE + 1}")
        assert code == 552, text
        assert text.startswith(b"5.3.4"), text
        code, text = conn.docmd(f"MAIL FROM:<alice@example.net> SIZE={MAX_SIZE}")
        assert code == 250, text
    finally:
        conn.close()


def sized_message(tok: str, size: int) -> bytes:
    """A message of exactly `size` octets (unstuffed, with its CRLFs)."""
    base = make_message("sized", f"{tok}\n")
    filler = size - len(base) - 2
    assert filler > 0
    lines = [b"x" * 76] * (filler // 78)
    pad = filler - len(lines) * 78
    body = b"".join(line + b"\r\n" for line in lines) + b"y" * pad + b"\r\n"
    message = base + body
    assert len(message) == size
    return message


def test_lmtp_data_over_size_refused_per_recipient(lmtp_server, new_user):
    (one, c1), (two, c2) = new_user(), new_user()
    big_tok, fit_tok = token(), token()
    conn = lmtp_connect(lmtp_server)
    try:
        rcpt, replies = transaction(conn, "alice@example.net", [one, two],
                                    sized_message(big_tok, MAX_SIZE + 1))
        assert rcpt == [250, 250]
        assert [code for code, _ in replies] == [552, 552], replies
        # Just at the limit: accepted (the advertised SIZE is what the server takes).
        rcpt, replies = transaction(conn, "alice@example.net", [one, two],
                                    sized_message(fit_tok, MAX_SIZE))
        assert [code for code, _ in replies] == [250, 250], replies
    finally:
        conn.close()
    for client in (c1, c2):
        assert query_ids(client, {"text": big_tok}) == []
        assert find_one(client, fit_tok)


# ---- MAIL/RCPT parameters (RFC 5321 §4.1.1.11) and the recipients buffer ----


def test_lmtp_advertised_parameters_accepted(lmtp_server, new_user):
    address, _ = new_user()
    conn = lmtp_connect(lmtp_server)
    try:
        for params in ("SIZE=100", "BODY=8BITMIME", "BODY=7BIT", "SIZE=100 BODY=8BITMIME"):
            code, text = conn.docmd(f"MAIL FROM:<alice@example.net> {params}")
            assert code == 250, (params, text)
            assert conn.docmd(f"RCPT TO:<{address}>")[0] == 250
            assert conn.docmd("RSET")[0] == 250
    finally:
        conn.close()


@pytest.mark.parametrize("command", ["MAIL FROM:<alice@example.net> XFROB=1",
                                     "MAIL FROM:<alice@example.net> SMTPUTF8",
                                     "RCPT TO:<{rcpt}> NOTIFY=NEVER"])
def test_lmtp_unknown_parameters_refused(lmtp_server, new_user, command):
    address, _ = new_user()
    conn = lmtp_connect(lmtp_server)
    try:
        if command.startswith("RCPT"):
            assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
        code, text = conn.docmd(command.format(rcpt=address))
        assert code == 555, text
    finally:
        conn.close()


def test_lmtp_recipient_limit(lmtp_server, new_user):
    """RFC 5321 §4.5.3.1.8: at least 100 recipients buffered (jmapd's limit is that 100);
    beyond the limit 452, and those already accepted are still delivered (one reply each)."""
    address, client = new_user()
    tok = token()
    conn = lmtp_connect(lmtp_server)
    try:
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
        codes = [conn.docmd(f"RCPT TO:<{address}>")[0] for _ in range(100)]
        assert codes == [250] * 100
        code, text = conn.docmd(f"RCPT TO:<{address}>")
        assert code == 452, text
        replies = send_data(conn, make_message("hundred", f"Hundred {tok}\n"), 100)
        assert [code for code, _ in replies] == [250] * 100
        assert conn.docmd("VRFY", "postmaster")[0] == 252  # nothing left over
    finally:
        conn.close()
    assert len(query_ids(client, {"text": tok})) == 100


# ---- session commands and their order ----


def test_lmtp_rset_noop_quit(lmtp_server, new_user):
    address, client = new_user()
    conn = lmtp_connect(lmtp_server)
    try:
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
        assert conn.docmd(f"RCPT TO:<{address}>")[0] == 250
        assert conn.docmd("RSET")[0] == 250
        assert conn.docmd("DATA")[0] == 503  # RSET forgot the recipients
        assert conn.docmd(f"RCPT TO:<{address}>")[0] == 503  # and the sender
        assert conn.docmd("NOOP")[0] == 250
        assert conn.docmd("NOOP", "with an argument")[0] == 250  # RFC 5321 §4.1.1.9
        code, _ = conn.docmd("QUIT")
        assert code == 221
        assert conn.sock.recv(1) == b""  # the server closed the connection
    finally:
        conn.close()
    assert query_ids(client) == []


def test_lmtp_commands_out_of_order(lmtp_server, new_user):
    address, _ = new_user()
    conn = lmtp_connect(lmtp_server, greet=False)
    try:
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 503  # before LHLO
        assert conn.docmd("LHLO", "mta.example.net")[0] == 250
        assert conn.docmd(f"RCPT TO:<{address}>")[0] == 503  # before MAIL
        assert conn.docmd("DATA")[0] == 503  # nothing at all
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 503  # nested MAIL
        assert conn.docmd("DATA")[0] == 503  # RFC 2033 §4.2: no successful RCPT
        assert conn.docmd("RCPT TO:<nobody-here@example.com>")[0] == 550
        assert conn.docmd("DATA")[0] == 503  # still none successful
        assert conn.docmd("FROB")[0] == 500  # RFC 5321 §4.2.4, the session goes on
        assert conn.docmd("NOOP")[0] == 250
    finally:
        conn.close()


def read_replies(sock_file, count: int) -> list:
    """Read `count` complete (possibly multi-line) replies; return [(code, last line)]."""
    replies = []
    while len(replies) < count:
        line = sock_file.readline()
        assert line, f"connection closed after {replies}"
        if line[3:4] != b"-":
            replies.append((int(line[:3]), line.rstrip(b"\r\n")))
    return replies


def test_lmtp_pipelining(lmtp_server, new_user):
    """RFC 2920: a group of commands in one write gets every reply, in order."""
    (one, c1), (two, c2) = new_user(), new_user()
    tok = token()
    with socket.create_connection(("127.0.0.1", lmtp_port(lmtp_server)), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert read_replies(replies, 1)[0][0] == 220
        sock.sendall(b"LHLO mta.example.net\r\nMAIL FROM:<alice@example.net>\r\n"
                     + f"RCPT TO:<{one}>\r\nRCPT TO:<nobody-here@example.com>\r\n"
                       f"RCPT TO:<{two}>\r\nDATA\r\n".encode())
        codes = [code for code, _ in read_replies(replies, 6)]
        assert codes == [250, 250, 250, 550, 250, 354]
        sock.sendall(dot_stuff(make_message("piped", f"Pipelined {tok}\n.dot\n")) + b".\r\n")
        assert [code for code, _ in read_replies(replies, 2)] == [250, 250]
        sock.sendall(b"RSET\r\nNOOP\r\nMAIL FROM:<>\r\nRCPT TO:<nobody-here@example.com>\r\n"
                     b"QUIT\r\n")
        assert [code for code, _ in read_replies(replies, 5)] == [250, 250, 250, 550, 221]
        assert replies.read() == b""
    assert find_one(c1, tok) and find_one(c2, tok)


def test_lmtp_dropped_connection_cancels_the_transaction(lmtp_server, new_user):
    """RFC 5321 §4.1.1.10: a connection closed before the final "." cancels the transaction.

    Nothing was acknowledged, so nothing may be stored: a half message must not appear.
    """
    address, client = new_user()
    tok = token()
    full = make_message("half", f"First half {tok}\n" + "more text\n" * 50)
    conn = lmtp_connect(lmtp_server)
    assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
    assert conn.docmd(f"RCPT TO:<{address}>")[0] == 250
    assert conn.docmd("DATA")[0] == 354
    conn.sock.sendall(full[: len(full) // 2])
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # The server sees the end of input at once; give it a moment to do anything wrong.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert query_ids(client) == [], "a half-received message was delivered"
        time.sleep(0.2)


def smuggle(victim: str, tok: str) -> bytes:
    """Message text that spells a whole second transaction for `victim` (dot-stuffed)."""
    return (f"MAIL FROM:<evil@example.net>\r\nRCPT TO:<{victim}>\r\nDATA\r\n"
            f"Subject: smuggled {tok}\r\n\r\nsmuggled {tok}\r\n..\r\n").encode()


def replies_until_vrfy(conn) -> list:
    """Send VRFY, then read replies up to its 252: what the server answered meanwhile."""
    conn.sock.sendall(b"VRFY postmaster\r\n")
    codes = []
    while 252 not in codes and len(codes) < 50:
        codes.append(conn.getreply()[0])
    return codes


def test_lmtp_long_line_does_not_end_the_message(lmtp_server, new_user):
    (address, _), (victim, victim_client) = new_user(), new_user("victim")
    tok = token()
    # Lines of every length around the usual buffer sizes, each ending in a dot: a
    # server reading lines in fixed-size pieces sees one of them as a lone ".".
    long_lines = b"".join(b"x" * (2 ** k + d) + b".\r\n" for k in range(10, 18) for d in (0, 1))
    wire = make_message("long lines", f"Long {tok}\n") + long_lines + smuggle(victim, tok)
    conn = lmtp_connect(lmtp_server)
    try:
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
        assert conn.docmd(f"RCPT TO:<{address}>")[0] == 250
        assert conn.docmd("DATA")[0] == 354
        conn.sock.sendall(wire + b".\r\n")
        (code, text), = [conn.getreply()]
        assert code in (500, 552), text  # too big for this server, or a line too long
        after = replies_until_vrfy(conn)
    finally:
        conn.close()
    assert query_ids(victim_client) == [], "the message text was run as commands"
    assert after == [252]


def test_lmtp_bare_lf_dot_does_not_end_the_message(lmtp_server, new_user):
    (address, client), (victim, victim_client) = new_user(), new_user("victim")
    tok = token()
    wire = (make_message("bare lf", f"Bare {tok}\n") + b"bare line feed\n.\n"
            + smuggle(victim, tok) + b"end\r\n")
    conn = lmtp_connect(lmtp_server)
    try:
        assert conn.docmd("MAIL FROM:<alice@example.net>")[0] == 250
        assert conn.docmd(f"RCPT TO:<{address}>")[0] == 250
        assert conn.docmd("DATA")[0] == 354
        conn.sock.sendall(wire + b".\r\n")
        code, text = conn.getreply()
        after = replies_until_vrfy(conn)
    finally:
        conn.close()
    assert query_ids(victim_client) == [], "the message text was run as commands"
    assert after == [252]
    if code == 250:  # stored whole, or else refused (5xx) for its bare line feeds
        _, rest = split_trace(download(client, find_one(client, tok)["blobId"]),
                              "alice@example.net")
        assert f"smuggled {tok}".encode() in rest and rest.endswith(b"end\r\n")
    else:
        assert code // 100 == 5, text


# ---- addresses: aliases and +detail ----


def test_lmtp_alias_delivers_to_owner(lmtp_server, new_user):
    owner, client = new_user("owner")
    alias = f"sales-{secrets.token_hex(3)}@example.org"
    done = run_cli("user", "alias", "add", owner, alias, data_dir=lmtp_server.data_dir)
    assert done.returncode == 0, done.stderr
    listed = run_cli("user", "alias", "list", owner, data_dir=lmtp_server.data_dir)
    assert alias in listed.stdout.split()
    tok, tok_upper = token(), token()
    conn = lmtp_connect(lmtp_server)
    try:
        rcpt, replies = transaction(conn, "alice@example.net", [alias],
                                    make_message("to the alias", f"Alias {tok}\n", to=alias))
        assert rcpt == [250] and [c for c, _ in replies] == [250]
        domain_upper = alias.split("@")[0] + "@EXAMPLE.ORG"  # domains are case-insensitive
        rcpt, replies = transaction(conn, "alice@example.net", [domain_upper],
                                    make_message("to the alias", f"Alias {tok_upper}\n"))
        assert rcpt == [250] and [c for c, _ in replies] == [250]
    finally:
        conn.close()
    inbox = mailbox_id(client, role="inbox")
    assert find_one(client, tok)["mailboxIds"] == {inbox: True}
    assert find_one(client, tok_upper)["mailboxIds"] == {inbox: True}


def deliver_lmtp(server, address, tok) -> None:
    conn = lmtp_connect(server)
    try:
        rcpt, replies = transaction(conn, "alice@example.net", [address],
                                    make_message(f"detail {tok}", f"Detail {tok}\n"))
        assert rcpt == [250] and [c for c, _ in replies] == [250], (address, replies)
    finally:
        conn.close()


def test_lmtp_plus_detail_files_into_mailbox(lmtp_server, new_user):
    """`user+detail@`: the Mailbox with that role, else that name (any case), else the Inbox."""
    address, client = new_user("plus")
    local, domain = address.split("@")
    lists = create_mailbox(client, "Lists")
    old = create_mailbox(client, "Old")
    done = client.ok("Mailbox/set", {"accountId": client.account_id, "destroy": [old]})
    assert done["destroyed"] == [old]
    junk = mailbox_id(client, role="junk")
    renamed = client.ok("Mailbox/set", {"accountId": client.account_id,
                                        "update": {junk: {"name": "Spam"}}})
    assert junk in renamed["updated"]
    inbox = mailbox_id(client, role="inbox")
    before = sorted(m["id"] for m in mailboxes(client))
    cases = {"lists": lists, "LISTS": lists, "junk": junk, "spam": junk,
             "nosuchbox": inbox, "old": inbox}
    toks = {}
    for detail in cases:
        toks[detail] = token()
        deliver_lmtp(lmtp_server, f"{local}+{detail}@{domain}", toks[detail])
    for detail, expected in cases.items():
        assert find_one(client, toks[detail])["mailboxIds"] == {expected: True}, detail
    assert sorted(m["id"] for m in mailboxes(client)) == before  # nothing created


def test_lmtp_plus_detail_on_alias(lmtp_server, new_user):
    owner, client = new_user("aliasowner")
    alias = f"team-{secrets.token_hex(3)}@example.org"
    assert run_cli("user", "alias", "add", owner, alias,
                   data_dir=lmtp_server.data_dir).returncode == 0
    lists = create_mailbox(client, "Lists")
    tok = token()
    local, domain = alias.split("@")
    deliver_lmtp(lmtp_server, f"{local}+lists@{domain}", tok)
    assert find_one(client, tok)["mailboxIds"] == {lists: True}


# ---- what a client sees ----


def test_lmtp_delivered_mail_visible_to_client(lmtp_server, new_user):
    address, client = new_user()
    inbox = mailbox_id(client, role="inbox")

    def inbox_counts():
        box = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": [inbox],
                                        "properties": ["totalEmails", "unreadEmails"]})
        return box["list"][0]["totalEmails"], box["list"][0]["unreadEmails"]

    assert inbox_counts() == (0, 0)
    toks = [token(), token()]
    for n, tok in enumerate(toks, 1):
        deliver_lmtp(lmtp_server, address, tok)
        assert inbox_counts() == (n, n)
    ids = query_ids(client, {"inMailbox": inbox})
    assert len(ids) == 2
    got = get_emails(client, ids, ["subject", "from", "keywords", "mailboxIds", "preview"])
    assert sorted(e["subject"] for e in got) == sorted(f"detail {t}" for t in toks)
    for e in got:
        assert e["keywords"] == {} and e["mailboxIds"] == {inbox: True}
        assert e["from"] == [{"name": "Alice", "email": "alice@example.net"}]
    for tok in toks:
        assert len(query_ids(client, {"text": tok})) == 1
        assert len(query_ids(client, {"body": tok})) == 1


# ---- the Unix socket ----


def test_lmtp_unix_socket(lmtp_server, new_user):
    address, client = new_user()
    tok = token()
    message = make_message("by unix socket", f"Unix {tok}\n.dot\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(lmtp_server.lmtp_socket)
        replies = sock.makefile("rb")
        assert read_replies(replies, 1)[0][0] == 220
        for command, expected in ((b"LHLO mta.example.net", 250),
                                  (b"MAIL FROM:<alice@example.net>", 250),
                                  (f"RCPT TO:<{address}>".encode(), 250),
                                  (b"RCPT TO:<nobody-here@example.com>", 550),
                                  (b"DATA", 354)):
            sock.sendall(command + b"\r\n")
            assert read_replies(replies, 1)[0][0] == expected, command
        sock.sendall(dot_stuff(message) + b".\r\n")
        assert read_replies(replies, 1)[0][0] == 250
        sock.sendall(b"QUIT\r\n")
        assert read_replies(replies, 1)[0][0] == 221
    found = find_one(client, tok)
    trace, rest = split_trace(download(client, found["blobId"]), "alice@example.net")
    assert rest == message


# ---- crash safety: every 250 survives a SIGKILL ----


class Burst(threading.Thread):
    """An MTA connection delivering unique messages until the server dies."""

    def __init__(self, port, address, worker, attempted, acked, lock, killed):
        super().__init__(daemon=True, name=f"burst-{worker}")
        self.port, self.address, self.worker = port, address, worker
        self.attempted, self.acked, self.lock, self.killed = attempted, acked, lock, killed
        self.error = None
        self.error_after_kill = None

    def run(self):
        try:
            conn = smtplib.LMTP("127.0.0.1", self.port, timeout=30)
            conn.ehlo("burst.example.net")
            for i in range(100_000):
                tok = f"tok{self.worker}n{i}r{secrets.token_hex(6)}"
                filler = "".join(f"line {j} of {tok}\n" for j in range(i % 40))
                if i % 7 == 3:  # over 256 KiB: a blob file, not kept in the database
                    filler += f"{tok} {'z' * 70}\n" * 4000
                message = make_message(f"burst {tok}", f"Token {tok}\n.dot line\n{filler}",
                                       msgid=f"{tok}@burst.example.net")
                with self.lock:
                    self.attempted[tok] = message
                assert conn.docmd("MAIL FROM:<burst@example.net>")[0] == 250
                assert conn.docmd(f"RCPT TO:<{self.address}>")[0] == 250
                (code, text), = send_data(conn, message, 1)
                if code == 250:
                    with self.lock:
                        self.acked[tok] = message
        except (OSError, smtplib.SMTPException, AssertionError) as exc:
            self.error = exc
            self.error_after_kill = self.killed.is_set()


@pytest.mark.parametrize("connections", [2, 4])
def test_lmtp_crash_safety_every_250_survives_sigkill(tmp_path, connections):
    """Small messages live in the database, written by the commit that stores them;
    big ones (every 7th here) are blob files synced before it (issue 19): either way
    a 250 is only ever said for what survives a SIGKILL, with four MTA connections
    sharing group commits as well as two."""
    data_dir = tmp_path / "data"
    address = add_user(data_dir, "crash@example.com")
    server = Server(data_dir, "--lmtp", "127.0.0.1:0").start()
    attempted, acked, lock, killed = {}, {}, threading.Lock(), threading.Event()
    try:
        port = lmtp_port(server)
        bursts = [Burst(port, address, w, attempted, acked, lock, killed)
                  for w in range(1, connections + 1)]
        for burst in bursts:
            burst.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and all(b.is_alive() for b in bursts):
            with lock:
                if len(acked) >= 120 and all(any(t.startswith(f"tok{b.worker}n") for t in acked)
                                            for b in bursts):
                    break
            time.sleep(0.01)
        assert all(b.is_alive() for b in bursts), [b.error for b in bursts]
        killed.set()
        server.stop(signal.SIGKILL)  # in the middle of the burst
        for burst in bursts:
            burst.join(30)
            assert not burst.is_alive()
            # Each connection broke because the server died, not for any other reason.
            assert burst.error is not None and burst.error_after_kill, burst.error
    finally:
        server.stop(signal.SIGKILL)
    with lock:
        acked, attempted = dict(acked), dict(attempted)
    assert len(acked) >= 120

    server = Server(data_dir, "--lmtp", "127.0.0.1:0").start()
    try:
        client = Client(server.url, address)
        for tok, message in acked.items():
            found = find_one(client, tok)
            _, rest = split_trace(download(client, found["blobId"]), "burst@example.net")
            assert rest == message, tok
        # Whatever else is there (sent, stored, never acknowledged) is whole too.
        everything = get_emails(client, query_ids(client), ["blobId", "subject"])
        assert len(acked) <= len(everything) <= len(attempted)
        for email_ in everything:
            tok = email_["subject"].split()[-1]
            _, rest = split_trace(download(client, email_["blobId"]), "burst@example.net")
            assert rest == attempted[tok], tok
        check = run_cli("check", data_dir=data_dir)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        server.stop()


def test_lmtp_250_only_after_the_commit_holding_the_message(tmp_path):
    """RFC 2033 §4.2 with jmapd's rule: the 250 is sent after the transaction that holds
    the message has committed. With another process holding the database's write lock
    the server cannot commit, and no 250 comes; once the lock is let go the 250 comes,
    and at that moment the message is already visible to any other reader."""
    import select
    import sqlite3

    data_dir = tmp_path / "data"
    address = add_user(data_dir, "commit@example.com")
    server = Server(data_dir, "--lmtp", "127.0.0.1:0").start()
    try:
        tok = token()
        message = make_message(f"commit {tok}", f"Committed first, {tok}.\n")
        sock = socket.create_connection(("127.0.0.1", lmtp_port(server)), timeout=30)
        reader = sock.makefile("rb")
        blocker = sqlite3.connect(str(data_dir / "jmapd.sqlite3"), timeout=30,
                                  isolation_level=None)
        try:
            def say(line):
                sock.sendall(line)
                reply = reader.readline()
                while reply[3:4] == b"-":  # a multi-line reply
                    reply = reader.readline()
                return int(reply[:3])

            assert int(reader.readline()[:3]) == 220
            assert say(b"LHLO commit.example.net\r\n") == 250
            assert say(b"MAIL FROM:<sender@example.net>\r\n") == 250
            assert say(f"RCPT TO:<{address}>\r\n".encode()) == 250
            assert say(b"DATA\r\n") == 354
            blocker.execute("BEGIN IMMEDIATE")  # the write lock, held by someone else
            sock.sendall(message + b".\r\n")  # make_message ends with a CRLF
            ready, _, _ = select.select([sock], [], [], 2)
            assert not ready, "an answer came while nothing could be committed"
            blocker.execute("ROLLBACK")
            assert int(reader.readline()[:3]) == 250
            check = sqlite3.connect(f"file:{data_dir / 'jmapd.sqlite3'}?mode=ro", uri=True)
            try:
                subjects = [s for (s,) in check.execute(
                    "SELECT json_extract(summary, '$.subject') FROM email")]
            finally:
                check.close()
            assert f"commit {tok}" in subjects  # committed before the 250 was sent
        finally:
            reader.close()
            sock.close()
            blocker.close()
    finally:
        server.stop()
