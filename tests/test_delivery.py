"""Local delivery by `jmapd.py deliver` (jmapd §8.1 DELIVER_MESSAGE, §14 cmd_deliver).

The command an MTA (or fetchmail/procmail) runs as its mail delivery agent, run here as a
real subprocess with the message on stdin, beside a real `jmapd.py serve` on the same
data directory; what arrived is read back through JMAP as a client would.

The exit statuses an MTA acts on (sysexits.h, STYLE §6): 0 only once the message is
stored, 67 (EX_NOUSER) for an unknown user, 75 (EX_TEMPFAIL, "try again later") for
anything that may pass: a missing data directory (never created), bad usage, a database
locked for longer than its busy timeout. Filing: --mailbox by role or name, else the
Inbox; `user+detail@` as over LMTP; aliases; never a new Mailbox. A delivery by another
process reaches a connected EventSource client (RFC 8620 §7.3) as an EmailDelivery
state change (RFC 8621 §1.5).
"""

import json
import secrets
import sqlite3
import subprocess
import sys
import threading

import pytest

from conftest import JMAPD, Client, Server, add_user, run_cli
from test_lmtp import (create_mailbox, download, find_one, mailbox_id, mailboxes,
                       make_message, query_ids, token)

EX_NOUSER, EX_TEMPFAIL = 67, 75


# ---- fixtures and helpers ----


@pytest.fixture(scope="module")
def dd_server(tmp_path_factory):
    """A running server whose data directory `deliver` writes to from outside."""
    data_dir = tmp_path_factory.mktemp("delivery") / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir).start()
    yield srv
    srv.stop()


@pytest.fixture
def new_user(dd_server):
    """Make a fresh user on the module's server; return (address, Client)."""

    def make(prefix="mda"):
        address = f"{prefix}-{secrets.token_hex(4)}@example.com"
        add_user(dd_server.data_dir, address)
        return address, Client(dd_server.url, address)

    return make


def deliver(data_dir, *args, message=b"", timeout=60) -> subprocess.CompletedProcess:
    """Run `jmapd.py deliver ARGS --data-dir D` with the message on stdin, as an MTA would."""
    cmd = [sys.executable, str(JMAPD), "deliver", *map(str, args)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return subprocess.run(cmd, input=message, capture_output=True, timeout=timeout)


def delivered(data_dir, address, tok, *args) -> bytes:
    """Deliver a message holding tok to address; it must exit 0. Return the message."""
    message = make_message(f"mda {tok}", f"Delivered by the MDA, {tok}.\n.dot line\n")
    done = deliver(data_dir, "--user", address, *args, message=message)
    assert done.returncode == 0, done.stderr.decode()
    return message


# ---- exit 0: stored, where asked ----


def test_deliver_stores_in_inbox(dd_server, new_user):
    address, client = new_user()
    inbox = mailbox_id(client, role="inbox")
    tok = token()
    message = delivered(dd_server.data_dir, address, tok)
    found = find_one(client, tok)
    assert found["mailboxIds"] == {inbox: True} and found["keywords"] == {}
    assert download(client, found["blobId"]).endswith(message)
    box = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": [inbox]})["list"][0]
    assert (box["totalEmails"], box["unreadEmails"]) == (1, 1)
    assert query_ids(client, {"inMailbox": inbox}) == [found["id"]]


def test_deliver_mailbox_option(dd_server, new_user):
    """--mailbox: a role (any case), else a Mailbox name (any case); another name is a
    mistake in the MTA's configuration: exit 75, so the MTA keeps the mail (issue 17)."""
    address, client = new_user()
    lists = create_mailbox(client, "Lists")
    junk = mailbox_id(client, role="junk")
    renamed = client.ok("Mailbox/set", {"accountId": client.account_id,
                                        "update": {junk: {"name": "Spam"}}})
    assert junk in renamed["updated"]
    inbox = mailbox_id(client, role="inbox")
    before = sorted(m["id"] for m in mailboxes(client))
    cases = {"junk": junk, "JUNK": junk, "spam": junk, "Lists": lists, "lists": lists}
    toks = {wanted: token() for wanted in cases}
    for wanted, tok in toks.items():
        delivered(dd_server.data_dir, address, tok, "--mailbox", wanted)
    for wanted, expected in cases.items():
        assert find_one(client, toks[wanted])["mailboxIds"] == {expected: True}, wanted
    tok = token()
    done = deliver(dd_server.data_dir, "--user", address, "--mailbox", "nosuchbox",
                   message=make_message(f"mda {tok}", f"Not for the Inbox, {tok}.\n"))
    assert done.returncode == 75, done.stderr.decode()
    assert "nosuchbox" in done.stderr.decode()
    assert client.ok("Email/query", {"accountId": client.account_id,
                                     "filter": {"text": tok}})["ids"] == []
    assert sorted(m["id"] for m in mailboxes(client)) == before  # nothing created


def test_deliver_plus_detail(dd_server, new_user):
    address, client = new_user("plus")
    local, domain = address.split("@")
    lists = create_mailbox(client, "Lists")
    inbox, trash = mailbox_id(client, role="inbox"), mailbox_id(client, role="trash")
    before = sorted(m["id"] for m in mailboxes(client))
    cases = {"LISTS": lists, "trash": trash, "nosuchbox": inbox}
    toks = {detail: token() for detail in cases}
    for detail, tok in toks.items():
        delivered(dd_server.data_dir, f"{local}+{detail}@{domain}", tok)
    for detail, expected in cases.items():
        assert find_one(client, toks[detail])["mailboxIds"] == {expected: True}, detail
    assert sorted(m["id"] for m in mailboxes(client)) == before


def test_deliver_to_alias(dd_server, new_user):
    owner, client = new_user("owner")
    alias = f"info-{secrets.token_hex(3)}@example.org"
    done = run_cli("user", "alias", "add", owner, alias, data_dir=dd_server.data_dir)
    assert done.returncode == 0, done.stderr
    tok = token()
    delivered(dd_server.data_dir, alias, tok)
    assert find_one(client, tok)["mailboxIds"] == {mailbox_id(client, role="inbox"): True}


# ---- the statuses an MTA acts on ----


def test_deliver_unknown_user_exits_67(dd_server):
    done = deliver(dd_server.data_dir, "--user", "nobody-here@example.com",
                   message=make_message("lost", "nobody\n"))
    assert done.returncode == EX_NOUSER, done.stderr.decode()


@pytest.mark.parametrize("missing", ["absent", "absent/deeper"])
def test_deliver_missing_data_dir_exits_75_and_creates_nothing(tmp_path, missing):
    """A missing data directory (an unmounted disk) is temporary; deliver never makes one."""
    data_dir = tmp_path / missing
    done = deliver(data_dir, "--user", "first@example.com", message=make_message("x", "y\n"))
    assert done.returncode == EX_TEMPFAIL, done.stderr.decode()
    assert not data_dir.exists() and not (tmp_path / "absent").exists()


def test_deliver_empty_data_dir_exits_75_and_creates_nothing(tmp_path):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    done = deliver(mount_point, "--user", "first@example.com", message=make_message("x", "y\n"))
    created = sorted(p.name for p in mount_point.iterdir())
    assert (done.returncode, created) == (EX_TEMPFAIL, []), done.stderr.decode()


@pytest.mark.parametrize("usage", [["--bogus"], ["--mailbox"], ["--log-level", "loud"],
                                   ["--listen", "127.0.0.1:1"], ["stray-argument"]])
def test_deliver_bad_usage_exits_75(dd_server, new_user, usage):
    """An MTA bounces on any status but 75: a broken command line must defer, not bounce."""
    address, client = new_user()
    tok = token()
    done = deliver(dd_server.data_dir, "--user", address, *usage,
                   message=make_message(f"usage {tok}", f"{tok}\n"))
    assert done.returncode == EX_TEMPFAIL, done.stderr.decode()
    assert query_ids(client, {"text": tok}) == []


def test_deliver_without_user_exits_75(dd_server):
    done = deliver(dd_server.data_dir, message=make_message("who", "for whom?\n"))
    assert done.returncode == EX_TEMPFAIL, done.stderr.decode()


def hold_write_lock(data_dir) -> sqlite3.Connection:
    """Take the database's write lock the way another writer would (BEGIN IMMEDIATE)."""
    conn = sqlite3.connect(str(data_dir / "jmapd.sqlite3"), isolation_level=None,
                           check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_deliver_database_locked_exits_75_slow(tmp_path):
    """Slow (about 10 s: deliver waits out its busy timeout), on purpose.

    A write lock held longer than the busy timeout: exit 75 and nothing stored; once
    the lock is gone the same message is delivered. A lock released within the busy
    timeout is waited for: exit 0.
    """
    data_dir = tmp_path / "data"
    address = add_user(data_dir, "locked@example.com")
    tok, tok_brief = token(), token()
    message = make_message(f"locked {tok}", f"Locked out {tok}\n")
    lock = hold_write_lock(data_dir)
    try:
        done = deliver(data_dir, "--user", address, message=message, timeout=120)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert done.returncode == EX_TEMPFAIL, done.stderr.decode()

    lock = hold_write_lock(data_dir)
    releaser = threading.Timer(1.0, lambda: (lock.execute("ROLLBACK"), lock.close()))
    releaser.start()
    try:
        brief = deliver(data_dir, "--user", address, timeout=120,
                        message=make_message(f"brief {tok_brief}", f"Waited {tok_brief}\n"))
    finally:
        releaser.join()
    assert brief.returncode == 0, brief.stderr.decode()

    server = Server(data_dir).start()
    try:
        client = Client(server.url, address)
        assert query_ids(client, {"text": tok}) == []  # 75 means not stored
        assert find_one(client, tok_brief)
        again = deliver(data_dir, "--user", address, message=message)
        assert again.returncode == 0, again.stderr.decode()
        found = find_one(client, tok)
        assert download(client, found["blobId"]).endswith(message)
    finally:
        server.stop()
    check = run_cli("check", data_dir=data_dir)
    assert check.returncode == 0, check.stdout + check.stderr


# ---- push: a delivery by another process reaches a connected client ----


def read_events(lines) -> list:
    """Parse text/event-stream lines into [(event, data)] (comments skipped)."""
    events, event, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
    return events


def test_deliver_reaches_eventsource_client(dd_server, new_user):
    address, client = new_user("push")
    url = (client.session["eventSourceUrl"].replace("{types}", "Email,EmailDelivery")
           .replace("{closeafter}", "state").replace("{ping}", "0"))
    stream = client.http.get(url, stream=True, timeout=(10, 30),
                             headers={"Accept": "text/event-stream"})
    try:
        assert stream.status_code == 200, stream.text
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        chunks = stream.iter_content(chunk_size=None)
        text = next(chunks).decode()  # the stream is open: the server has its snapshot
        assert "event: state" not in text, text  # nothing has changed yet
        tok = token()
        delivered(dd_server.data_dir, address, tok)
        for chunk in chunks:  # closeafter=state: the server ends it after one state event
            text += chunk.decode()
    finally:
        stream.close()
    events = read_events(text.replace("\r\n", "\n").split("\n"))
    assert events, text
    name, data = events[-1]
    assert name == "state", events
    change = json.loads(data)
    assert change["@type"] == "StateChange"
    assert "EmailDelivery" in change["changed"][client.account_id], change
    assert find_one(client, tok)
