"""Issue 18 ("Foundation 4"), "Defects to fix": one regression test per defect, each
failing on the code before the fix (commit 32a4a6b) and passing now.

- DNS under the write lock: PushSubscription/set (RFC 8620 §7.2.2) resolves the push
  URL's host (§8.6: only public addresses) before its write transaction, so a slow
  resolver holds no other writer (a Mailbox/set, RFC 8621 §2.5, or a delivery) waiting.
- Wake before commit: the push sender is woken only after the PushSubscription create or
  update has committed (RFC 8620 §7.2: the PushVerification must be for a subscription
  that exists).
- Stale change bus: the published type states (what StateChange, RFC 8620 §7.1, reports
  and /get's `state`, §5.1, answers) never move backwards when a slow reader applies what
  it read before a newer commit was published.
- Change log ignores savepoints: a record refused with a SetError (RFC 8620 §5.3) leaves
  no trace: it is in notCreated, newState equals oldState, /changes (§5.2) reports
  nothing and no push fires.

Everything runs in-process on a real data directory (jmapd.db_open, jmapd.make_app,
jmapd.engine_call), with other writers in threads of this process (each has its own
SQLite connection, as the server's worker threads do).
"""

import socket
import sys
import threading
import time

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import jmapd  # noqa: E402

USING = frozenset([jmapd.CAP_CORE, jmapd.CAP_MAIL])
SLOW_RESOLVE_S = 5.0  # at most; below the busy timeout, so a blocked writer fails late
WAIT_S = 20  # for a thread that must finish, however slow the machine


@pytest.fixture
def app(tmp_path):
    data_dir = tmp_path / "data"
    jmapd.db_open(str(data_dir), create=True)
    cfg = jmapd.Config(command="serve", data_dir=str(data_dir), test_cheap_hashing=True,
                       test_push_allow_loopback=True)
    app = jmapd.make_app(cfg)
    app.user = jmapd.account_create(app.auth, "alice@example.com", "pw", app.clock.now())
    app.user.credential = "password"  # as the Authenticator marks a password login
    yield app
    app.bus.stop()
    jmapd.db.close()


def call(app, name, args, account=True):
    """One method call through the engine (its own transaction, notify, after-commit)."""
    ctx = jmapd.Call(app, app.user, USING, {}, method=name)
    if account:
        args = {"accountId": app.user.id, **args}
    return jmapd.engine_call(ctx, name, args)


def mailboxes(app):
    return {m["role"] or m["name"]: m["id"] for m in call(app, "Mailbox/get", {})["list"]}


def inbox_pk(app):
    return jmapd.Mailbox.get((jmapd.Mailbox.account_pk == app.user.pk)
                             & (jmapd.Mailbox.role == "inbox")).pk


def stored_states(pk):
    rows = jmapd.db.execute_sql("SELECT type_name, modseq FROM type_state WHERE account_pk = ?",
                                (pk,)).fetchall()
    return {name: jmapd.state_string(modseq) for name, modseq in rows}


class Finished(threading.Thread):
    """Run fn in a thread, keep its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 -- reported by outcome()
            self.error = exc

    def outcome(self):
        self.join(WAIT_S)
        assert not self.is_alive(), "the thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


MESSAGE = (b"From: bob@example.org\r\nTo: alice@example.com\r\nSubject: while resolving\r\n"
           b"Message-ID: <resolving@example.org>\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n"
           b"\r\nDelivered while a push URL resolved.\r\n")


# ---- DNS under the write lock ----

def test_issue_18_push_url_resolved_outside_the_write_lock(app, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo
    resolving, resolved, others_done = threading.Event(), threading.Event(), threading.Event()

    def slow_getaddrinfo(host, *args, **kwargs):
        if host != "push.example.net":
            return real_getaddrinfo(host, *args, **kwargs)
        resolving.set()
        # A resolver that takes its time: until the other writers are done, or (when they
        # wait for it) SLOW_RESOLVE_S.
        others_done.wait(SLOW_RESOLVE_S)
        resolved.set()
        return real_getaddrinfo("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    subscribe = Finished(lambda: call(app, "PushSubscription/set", {"create": {"p": {
        "deviceClientId": "phone", "url": "http://push.example.net/push/1", "types": None}}},
        account=False))
    subscribe.start()
    assert resolving.wait(WAIT_S), "the push URL was never resolved"
    # Other writers, while the resolver sleeps: neither waits for it.
    started = time.monotonic()
    try:
        made = call(app, "Mailbox/set", {"create": {"m": {"name": "Written meanwhile"}}})
        delivered = jmapd.deliver_message(jmapd.db_data_dir(), app.user.pk, [MESSAGE],
                                          [inbox_pk(app)], {}, time.time(), incoming=True)
        took = time.monotonic() - started
        still_resolving = not resolved.is_set()
    finally:
        others_done.set()
    assert made["created"] and "m" in made["created"], made
    assert len(delivered) == 1
    assert still_resolving, (f"the other writes took {took:.2f} s: they waited for the "
                             "push URL's name resolution (done under the write lock)")
    result = subscribe.outcome()
    assert "p" in (result["created"] or {}), result  # the subscription is made all the same


# ---- Wake before commit ----

class RecordingEvent(threading.Event):
    """app.push_wake that records, at each set(), whether a write was still uncommitted."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def set(self):
        connection = jmapd.db.connection()
        self.calls.append(jmapd.db.in_transaction() or connection.in_transaction)
        super().set()


def test_issue_18_push_wake_after_commit(app):
    app.push_wake = RecordingEvent()
    created = call(app, "PushSubscription/set", {"create": {"p": {
        "deviceClientId": "phone", "url": "http://127.0.0.1:9/push/1", "types": None}}},
        account=False)
    assert "p" in (created["created"] or {}), created
    assert app.push_wake.calls, "a new subscription did not wake the push sender"
    assert app.push_wake.calls == [False] * len(app.push_wake.calls), \
        "the push sender was woken inside the create's transaction (before its commit)"
    # The verification comes back (an update): that wakes the sender too, after commit.
    sub_id = created["created"]["p"]["id"]
    code = jmapd.db.execute_sql("SELECT expected_code FROM push_subscription ORDER BY pk DESC "
                                "LIMIT 1").fetchone()[0]
    app.push_wake = RecordingEvent()
    updated = call(app, "PushSubscription/set", {"update": {sub_id: {
        "verificationCode": code}}}, account=False)
    assert sub_id in (updated["updated"] or {}), updated
    assert app.push_wake.calls, "a verified subscription did not wake the push sender"
    assert app.push_wake.calls == [False] * len(app.push_wake.calls), \
        "the push sender was woken inside the update's transaction (before its commit)"


# ---- Stale change bus ----

class FetchedCursor:
    """What a cursor gave, already read (the pause comes after the read)."""

    def __init__(self, rows, description):
        self.rows, self.description, self.lastrowid, self.rowcount = rows, description, None, -1

    def fetchone(self):
        return self.rows.pop(0) if self.rows else None

    def fetchall(self):
        rows, self.rows = self.rows, []
        return rows

    def __iter__(self):
        return iter(self.fetchall())

    def close(self):
        pass


def commit_mailbox(pk, name):
    with jmapd.db.atomic("IMMEDIATE"):
        changes = jmapd.ChangeLog(pk, time.time())
        jmapd.record_change(changes, "Mailbox", jmapd.Mailbox(account_pk=pk, name=name),
                            "created")
        changes.flush()


@pytest.mark.parametrize("slow_call", ["refresh", "notify"])
def test_issue_18_change_bus_never_moves_a_state_backwards(app, monkeypatch, slow_call):
    bus, pk = app.bus, app.user.pk
    bus.refresh()
    commit_mailbox(pk, "First")  # state X in the store, not yet published
    older = stored_states(pk)
    database = jmapd.db.obj
    real_execute_sql = database.execute_sql
    slow_reader, read_done, go_on = [], threading.Event(), threading.Event()

    def execute_sql(sql, *args, **kwargs):
        cursor = real_execute_sql(sql, *args, **kwargs)
        if threading.current_thread() not in slow_reader or "type_state" not in sql \
                or read_done.is_set():
            return cursor
        fetched = FetchedCursor(cursor.fetchall(), cursor.description)
        read_done.set()
        assert go_on.wait(WAIT_S)  # slow to get to the publishing
        return fetched

    monkeypatch.setattr(database, "execute_sql", execute_sql)
    reader = Finished(getattr(bus, slow_call) if slow_call == "refresh"
                      else lambda: bus.notify(pk))
    slow_reader.append(reader)
    reader.start()
    assert read_done.wait(WAIT_S), "the slow reader never read type_state"
    # Meanwhile a newer commit (state Y) is made and published at once.
    commit_mailbox(pk, "Second")
    newer = stored_states(pk)
    assert int(newer["Mailbox"]) > int(older["Mailbox"])
    bus.notify(pk)
    version, published = bus.snapshot(pk)
    assert published["Mailbox"] == newer["Mailbox"]
    go_on.set()  # the slow reader now publishes what it read before (state X)
    reader.outcome()
    _, published = bus.snapshot(pk)
    assert published["Mailbox"] == newer["Mailbox"], (
        f"the published Mailbox state went back from {newer['Mailbox']} to "
        f"{published['Mailbox']} while the store holds {stored_states(pk)['Mailbox']}")
    assert published == stored_states(pk)


# ---- Change log ignores savepoints ----

class RefusingMailbox(jmapd.MailboxType):
    """Mailbox whose on_create hook refuses the record after it was written and logged
    (the TypeSpec contract allows a hook to raise SetError); not registered."""

    def on_create(self, ctx, row, values):
        super().on_create(ctx, row, values)
        raise jmapd.SetError("forbidden", "refused by the on_create hook")


def test_issue_18_set_error_in_a_hook_leaves_no_change(app):
    spec = RefusingMailbox()
    before = mailboxes(app)
    since = call(app, "Mailbox/get", {"ids": []})["state"]
    app.bus.refresh()
    version, published = app.bus.snapshot(app.user.pk)
    ctx = jmapd.Call(app, app.user, USING, {}, method="Mailbox/set")
    ctx.account, ctx.changes = app.user, jmapd.ChangeLog(app.user.pk, app.clock.now())
    with jmapd.db.atomic("IMMEDIATE"):
        result = jmapd.method_set(spec, ctx, {"accountId": app.user.id,
                                              "create": {"x": {"name": "Refused"}}})
        touched = ctx.flush_changes()
    for pk in touched:  # as engine_call publishes after commit ...
        app.bus.notify(pk)
    app.bus.notify(app.user.pk)  # ... and even a notify that is not needed
    assert result["created"] is None
    assert result["notCreated"]["x"]["type"] == "forbidden"
    assert mailboxes(app) == before  # the row was rolled back; its change-log entry must be too
    changes = call(app, "Mailbox/changes", {"sinceState": since})
    problems = []
    if not result["newState"] == result["oldState"] == since:
        problems.append(f"/set newState {result['newState']} (oldState {result['oldState']})")
    if (changes["created"], changes["updated"], changes["destroyed"]) != ([], [], []):
        problems.append(f"/changes lists {changes}")
    if changes["newState"] != since:
        problems.append(f"/changes newState {changes['newState']}, nothing listed")
    state = call(app, "Mailbox/get", {"ids": []})["state"]
    if state != since:
        problems.append(f"/get state {state}")
    if app.bus.snapshot(app.user.pk) != (version, published):
        problems.append(f"a push fired: {app.bus.snapshot(app.user.pk)}")
    assert not problems, (f"a refused create (state {since} before) left traces: "
                          + "; ".join(problems))
