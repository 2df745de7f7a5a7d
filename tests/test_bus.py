"""The change bus (jmapd section 6.5): the in-process API push channels wait on.

Push (RFC 8620 §7, RFC 8887) needs to learn of every committed change to an account's
type states, whichever process made it: this server's own requests (notify after
commit) and other processes on the same data directory (`jmapd.py user ...`, later
`deliver` and `import`), noticed through PRAGMA data_version by a watcher thread.
The bus is tested in-process; the other writers are real subprocesses: the CLI and a
`jmapd.py serve` answering Mailbox/set (RFC 8621 §2.5) over HTTP.
"""

import subprocess
import sys
import threading
import time

import pytest

from conftest import PASSWORD, ROOT, Client, Server, add_user, run_cli

sys.path.insert(0, str(ROOT))
import jmapd  # noqa: E402

WAKE_TIMEOUT_S = 10  # generous: a waiter must be woken, however slow the machine
QUIET_TIMEOUT_S = 0.3  # how long to wait for something that must not happen


@pytest.fixture
def data_dir(tmp_path):
    """A fresh data directory, opened by this process through jmapd.db."""
    path = tmp_path / "data"
    jmapd.db_open(str(path), create=True)
    yield path
    jmapd.db.close()


@pytest.fixture
def bus(data_dir):
    bus = jmapd.ChangeBus()
    yield bus
    bus.stop()
    if bus.watcher is not None:
        bus.watcher.join(WAKE_TIMEOUT_S)
        assert not bus.watcher.is_alive(), "the watcher thread outlived stop()"


class Rollback(Exception):
    pass


class Waiter(threading.Thread):
    """bus.wait() in a thread of its own, as a push channel would."""

    def __init__(self, bus, account_pk, seen_version, timeout_s=WAKE_TIMEOUT_S):
        super().__init__(daemon=True)
        self.args_ = (account_pk, seen_version, timeout_s)
        self.bus = bus
        self.result = None
        self.waiting = threading.Event()

    def run(self):
        self.waiting.set()
        self.result = self.bus.wait(*self.args_)

    def outcome(self):
        self.join(WAKE_TIMEOUT_S + 5)
        assert not self.is_alive(), "bus.wait() did not return"
        return self.result


def make_account(username):
    """Create an account in this process, the way the CLI does."""
    auth = jmapd.Authenticator(True, jmapd.Clock())
    return jmapd.account_create(auth, username, PASSWORD, time.time())


def account_pk(username):
    return jmapd.Account.get(jmapd.Account.username == username).pk


def stored_states(pk):
    """The account's type states as committed in the database."""
    rows = jmapd.TypeState.select().where(jmapd.TypeState.account_pk == pk)
    return {row.type_name: jmapd.state_string(row.modseq) for row in rows}


def create_mailbox(pk, name):
    """Commit one new Mailbox in this process (a write as the engine makes it)."""
    with jmapd.db.atomic("IMMEDIATE"):
        changes = jmapd.ChangeLog(pk, time.time())
        jmapd.record_change(changes, "Mailbox", jmapd.Mailbox(account_pk=pk, name=name),
                            "created")
        changes.flush()


def create_mailbox_rolled_back(pk, name):
    """Write one new Mailbox and its state in a transaction that then rolls back."""
    with pytest.raises(Rollback):
        with jmapd.db.atomic("IMMEDIATE"):
            changes = jmapd.ChangeLog(pk, time.time())
            jmapd.record_change(changes, "Mailbox", jmapd.Mailbox(account_pk=pk, name=name),
                                "created")
            changes.flush()
            raise Rollback


ROLLBACK_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import jmapd
jmapd.db_open(sys.argv[2], create=False)
pk = int(sys.argv[3])
try:
    with jmapd.db.atomic("IMMEDIATE"):
        changes = jmapd.ChangeLog(pk, time.time())
        jmapd.record_change(changes, "Mailbox", jmapd.Mailbox(account_pk=pk, name="Ghost"),
                            "created")
        changes.flush()
        raise KeyError("roll back")
except KeyError:
    print("rolled back")
"""


def settle(bus, data_dir, username):
    """A barrier: commit in another process and wait until the bus has seen it.

    After this, every commit made before it has been through the watcher, so an
    account whose version did not move was not published.
    """
    add_user(data_dir, username)
    version, _ = bus.wait(account_pk(username), 0, WAKE_TIMEOUT_S)
    assert version != 0, "the barrier commit was never published"


def mailbox_state(client):
    return client.ok("Mailbox/get", {"accountId": client.account_id, "ids": []})["state"]


# ---- snapshot ----


def test_bus_snapshot_gives_type_states(data_dir, bus):
    alice = make_account("alice@example.com")
    bus.start_watcher(str(data_dir))
    version, states = bus.snapshot(alice.pk)
    # account_create made the role Mailboxes, the default Identity and the VacationResponse
    assert set(states) == {"Mailbox", "Identity", "VacationResponse"}
    assert states == stored_states(alice.pk)
    assert states["Mailbox"] != jmapd.state_string(0)
    states["Mailbox"] = "tampered"
    assert bus.snapshot(alice.pk) == (version, stored_states(alice.pk))  # a copy


def test_bus_snapshot_unknown_account_is_empty(data_dir, bus):
    alice = make_account("alice@example.com")
    bus.start_watcher(str(data_dir))
    assert bus.snapshot(alice.pk + 1) == (0, {})


def test_bus_snapshot_matches_jmap_state(data_dir, bus):
    username = add_user(data_dir, "alice@example.com")
    srv = Server(data_dir).start()
    try:
        bus.start_watcher(str(data_dir))
        _, states = bus.snapshot(account_pk(username))
        assert states["Mailbox"] == mailbox_state(Client(srv.url, username))
    finally:
        srv.stop()


# ---- commits by other processes ----


def test_bus_wakes_on_user_add_by_cli_process(data_dir, bus):
    alice = make_account("alice@example.com")
    bus.start_watcher(str(data_dir))
    alice_seen = bus.snapshot(alice.pk)
    add_user(data_dir, "bob@example.com")  # another process: its Mailboxes commit there
    bob = account_pk("bob@example.com")
    version, states = bus.wait(bob, 0, WAKE_TIMEOUT_S)
    assert version != 0
    assert "Mailbox" in states
    assert states == stored_states(bob)
    # Bob's commit is not Alice's change: her waiters stay asleep.
    assert bus.wait(alice.pk, alice_seen[0], QUIET_TIMEOUT_S) == alice_seen


def test_bus_wakes_waiter_on_mailbox_set_by_server_process(data_dir, bus):
    username = add_user(data_dir, "alice@example.com")
    srv = Server(data_dir).start()
    try:
        client = Client(srv.url, username)
        bus.start_watcher(str(data_dir))
        pk = account_pk(username)
        seen, states = bus.snapshot(pk)
        waiter = Waiter(bus, pk, seen)
        waiter.start()
        waiter.waiting.wait(WAKE_TIMEOUT_S)
        result = client.ok("Mailbox/set", {"accountId": client.account_id,
                                           "create": {"new": {"name": "Projects"}}})
        assert "new" in result["created"], result
        assert result["newState"] != states["Mailbox"]
        version, new_states = waiter.outcome()
        assert version != seen
        assert new_states["Mailbox"] == result["newState"]
    finally:
        srv.stop()


def test_bus_wakes_on_commit_in_this_process_after_notify(data_dir, bus):
    alice = make_account("alice@example.com")
    bus.refresh()  # no watcher: only notify() can publish
    seen, states = bus.snapshot(alice.pk)
    waiter = Waiter(bus, alice.pk, seen)
    waiter.start()
    waiter.waiting.wait(WAKE_TIMEOUT_S)
    create_mailbox(alice.pk, "Local")
    bus.notify(alice.pk)
    version, new_states = waiter.outcome()
    assert version != seen
    assert new_states == stored_states(alice.pk)
    assert new_states["Mailbox"] != states["Mailbox"]


def test_bus_wakes_waiters_when_account_deleted_by_cli_process(data_dir, bus):
    username = add_user(data_dir, "alice@example.com")
    bus.start_watcher(str(data_dir))
    pk = account_pk(username)
    seen, states = bus.snapshot(pk)
    assert states
    done = run_cli("user", "del", username, data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    settle(bus, data_dir, "barrier@example.com")  # the deletion has been through the bus
    version, new_states = bus.wait(pk, seen, QUIET_TIMEOUT_S)
    assert new_states == {}
    assert version != seen


# ---- nothing happens, nothing is published ----


def test_bus_wait_times_out_unchanged(data_dir, bus):
    alice = make_account("alice@example.com")
    bus.start_watcher(str(data_dir))
    seen = bus.snapshot(alice.pk)
    assert bus.wait(alice.pk, seen[0], QUIET_TIMEOUT_S) == seen


def test_bus_publishes_nothing_for_rolled_back_transaction(data_dir, bus):
    alice = make_account("alice@example.com")
    bus.start_watcher(str(data_dir))
    seen = bus.snapshot(alice.pk)
    # In this process, even with a (mistaken) notify after the rollback ...
    create_mailbox_rolled_back(alice.pk, "Ghost")
    bus.notify(alice.pk)
    # ... and in another process.
    done = subprocess.run([sys.executable, "-c", ROLLBACK_SCRIPT, str(ROOT), str(data_dir),
                           str(alice.pk)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "rolled back", done.stderr
    settle(bus, data_dir, "barrier@example.com")
    assert stored_states(alice.pk) == seen[1]  # the rollbacks left nothing behind
    assert bus.snapshot(alice.pk) == seen
    # The bus still publishes a real commit afterwards.
    create_mailbox(alice.pk, "Real")
    bus.notify(alice.pk)
    assert bus.snapshot(alice.pk)[0] != seen[0]


def test_bus_publishes_nothing_for_failed_mailbox_set_over_http(data_dir, bus):
    username = add_user(data_dir, "alice@example.com")
    srv = Server(data_dir).start()
    try:
        client = Client(srv.url, username)
        bus.start_watcher(str(data_dir))
        pk = account_pk(username)
        seen = bus.snapshot(pk)
        # stateMismatch: the whole call fails, its transaction rolls back.
        mismatch = client.call("Mailbox/set", {
            "accountId": client.account_id, "ifInState": "no-such-state",
            "create": {"a": {"name": "Never"}}})
        assert mismatch[0] == "error" and mismatch[1]["type"] == "stateMismatch", mismatch
        # A record refused with a SetError changes nothing either.
        refused = client.ok("Mailbox/set", {"accountId": client.account_id,
                                            "create": {"b": {"name": ""}}})
        assert refused["created"] is None and "b" in refused["notCreated"], refused
        assert refused["newState"] == seen[1]["Mailbox"]
        settle(bus, data_dir, "barrier@example.com")
        assert bus.snapshot(pk) == seen
        assert mailbox_state(client) == seen[1]["Mailbox"]
    finally:
        srv.stop()


# ---- stop ----


def test_bus_stop_releases_waiters(data_dir, bus):
    alice = make_account("alice@example.com")
    bus.start_watcher(str(data_dir))
    seen = bus.snapshot(alice.pk)
    waiters = [Waiter(bus, alice.pk, seen[0], timeout_s=60) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
        waiter.waiting.wait(WAKE_TIMEOUT_S)
    bus.stop()
    for waiter in waiters:
        assert waiter.outcome() == seen  # released, with nothing new to report
    bus.watcher.join(WAKE_TIMEOUT_S)
    assert not bus.watcher.is_alive()
