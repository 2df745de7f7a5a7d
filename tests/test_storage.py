"""Storage and the type machine's less common paths, in-process on a real data directory:
migrations (schema version table, ordered migrations, a newer database refused), count-only
Mailbox changes reported through updatedProperties (RFC 8621 §2.2), and the generic
`singleton` and `tooLarge` SetErrors (RFC 8620 §5.3) on a type declared that way.
"""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import jmapd  # noqa: E402
from conftest import JMAPD  # noqa: E402


@pytest.fixture
def app(tmp_path):
    data_dir = tmp_path / "data"
    jmapd.db_open(str(data_dir), create=True)
    cfg = jmapd.Config(command="serve", data_dir=str(data_dir), test_cheap_hashing=True)
    app = jmapd.make_app(cfg)
    app.user = jmapd.account_create(app.auth, "alice@example.com", "pw", app.clock.now())
    yield app
    jmapd.db.close()


def call(app, name, args):
    ctx = jmapd.Call(app, app.user, frozenset([jmapd.CAP_CORE, jmapd.CAP_MAIL]), {}, method=name)
    return jmapd.engine_call(ctx, name, {"accountId": app.user.id, **args})


def set_counts(app, mailbox_id, **counts):
    """Change a Mailbox's counts the way Email changes will: a `counts` change record."""
    with jmapd.db.atomic("IMMEDIATE"):
        changes = jmapd.ChangeLog(app.user.pk, app.clock.now())
        row = jmapd.Mailbox.get_by_id(jmapd.type_pk("Mailbox", mailbox_id))
        for column, value in counts.items():
            setattr(row, column, value)
        jmapd.record_change(changes, "Mailbox", row, "counts")
        changes.flush()


# ---- migrations ----

def test_storage_migrates_a_version_1_database(tmp_path):
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / jmapd.DB_FILE)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied_at INTEGER NOT NULL)")

    class Raw:  # migration 1 run on its own, as a version-1 jmapd left it
        execute_sql = conn.execute

    jmapd.MIGRATIONS[0][2](Raw)
    conn.execute("INSERT INTO schema_version VALUES (1, 'initial', 0)")
    conn.execute("INSERT INTO account (username, password_hash, created_at) "
                 "VALUES ('old@example.com', 'x', 0)")
    conn.commit()
    conn.close()
    jmapd.db_open(str(data_dir), create=False)
    try:
        assert jmapd.db_schema_version(jmapd.db) == jmapd.SCHEMA_VERSION
        versions = [r[0] for r in jmapd.db.execute_sql(
            "SELECT version FROM schema_version ORDER BY version")]
        assert versions == list(range(1, jmapd.SCHEMA_VERSION + 1))
        assert jmapd.Account.get(jmapd.Account.username == "old@example.com")
        assert jmapd.Blob.select().count() == 0  # tables of later migrations exist
    finally:
        jmapd.db.close()


def test_storage_refuses_a_newer_database(tmp_path):
    data_dir = tmp_path / "new"
    jmapd.db_open(str(data_dir), create=True)
    jmapd.db.execute_sql("INSERT INTO schema_version VALUES (999, 'future', 0)")
    jmapd.db.close()
    done = subprocess.run([sys.executable, str(JMAPD), "user", "list", "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "newer than this jmapd" in done.stderr


# ---- count-only Mailbox changes (RFC 8621 §2.2) ----

def test_storage_count_changes_report_updated_properties(app):
    inbox = next(m for m in call(app, "Mailbox/get", {})["list"] if m["role"] == "inbox")
    since = call(app, "Mailbox/get", {"ids": []})["state"]
    set_counts(app, inbox["id"], total_emails=3, unread_emails=2, total_threads=2,
               unread_threads=1)
    changes = call(app, "Mailbox/changes", {"sinceState": since})
    assert changes["updated"] == [inbox["id"]]
    assert changes["updatedProperties"] == ["totalEmails", "unreadEmails", "totalThreads",
                                            "unreadThreads"]
    assert changes["newState"] != since
    got = call(app, "Mailbox/get", {"ids": [inbox["id"]],
                                    "properties": changes["updatedProperties"]})["list"][0]
    assert got == {"id": inbox["id"], "totalEmails": 3, "unreadEmails": 2, "totalThreads": 2,
                   "unreadThreads": 1}


def test_storage_other_changes_make_updated_properties_null(app):
    boxes = {m["role"]: m["id"] for m in call(app, "Mailbox/get", {})["list"]}
    since = call(app, "Mailbox/get", {"ids": []})["state"]
    set_counts(app, boxes["inbox"], total_emails=1)
    call(app, "Mailbox/set", {"update": {boxes["archive"]: {"sortOrder": 9}}})
    changes = call(app, "Mailbox/changes", {"sinceState": since})
    assert sorted(changes["updated"]) == sorted([boxes["inbox"], boxes["archive"]])
    assert changes["updatedProperties"] is None
    # From the state after the rename, only the counts changed again.
    since = changes["newState"]
    set_counts(app, boxes["inbox"], total_emails=2)
    assert call(app, "Mailbox/changes", {"sinceState": since})["updatedProperties"] == [
        "totalEmails", "unreadEmails", "totalThreads", "unreadThreads"]


def test_storage_count_changes_do_not_disturb_queries(app):
    inbox = next(m for m in call(app, "Mailbox/get", {})["list"] if m["role"] == "inbox")
    query = call(app, "Mailbox/query", {"sort": [{"property": "name"}]})
    set_counts(app, inbox["id"], total_emails=5)
    changes = call(app, "Mailbox/queryChanges", {"sort": [{"property": "name"}],
                                                 "sinceQueryState": query["queryState"]})
    assert changes["removed"] == [] and changes["added"] == []


# ---- singleton and tooLarge (RFC 8620 §5.3) ----

class SingletonMailbox(jmapd.MailboxType):
    """Mailbox declared as a singleton type with a small size bound (not registered)."""

    singleton = True
    max_object_octets = 500  # an Archive named with 100 octets fits, 255 do not


def set_direct(app, spec, args):
    ctx = jmapd.Call(app, app.user, frozenset([jmapd.CAP_CORE, jmapd.CAP_MAIL]), {})
    ctx.account, ctx.changes = app.user, jmapd.ChangeLog(app.user.pk, app.clock.now())
    with jmapd.db.atomic("IMMEDIATE"):
        result = jmapd.method_set(spec, ctx, {"accountId": app.user.id, **args})
        ctx.flush_changes()
    return result


def test_storage_singleton_type_refuses_create_and_destroy(app):
    spec = SingletonMailbox()
    inbox = next(m for m in call(app, "Mailbox/get", {})["list"] if m["role"] == "inbox")
    result = set_direct(app, spec, {"create": {"x": {"name": "Another"}},
                                    "destroy": [inbox["id"]]})
    assert result["notCreated"]["x"]["type"] == "singleton"
    assert result["notDestroyed"][inbox["id"]]["type"] == "singleton"
    assert result["created"] is None and result["destroyed"] is None


def test_storage_too_large_object_refused(app):
    spec = SingletonMailbox()
    archive = next(m for m in call(app, "Mailbox/get", {})["list"] if m["role"] == "archive")
    result = set_direct(app, spec, {"update": {archive["id"]: {"name": "a" * 100},
                                               }})
    assert result["updated"] == {archive["id"]: None}  # under the bound
    result = set_direct(app, spec, {"update": {archive["id"]: {"name": "b" * 255}}})
    assert result["notUpdated"][archive["id"]]["type"] == "tooLarge"
    names = {m["name"] for m in call(app, "Mailbox/get", {})["list"]}
    assert "a" * 100 in names and "b" * 255 not in names
