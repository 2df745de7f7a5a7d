"""Issue 18: migration tests against stored databases made by earlier schema versions.

tests/data/db/schema-N/ are data directories (jmapd.sqlite3 and blobs/) that the jmapd.py
of older commits made with its own CLI (see tests/data/db/README.md): two users, an alias,
an app password, imported mail, and from schema 6 on a share. Each test copies one to a
temp dir and starts today's `jmapd.py serve` on it, which migrates it; then, from outside:

- the schema is today's (`jmapd.py check` exits 0) and a second start changes nothing;
- the old password and the old app password log in (RFC 8620 §2: the Session, with the
  account shared read-write for schema >= 6);
- the Emails, Mailboxes, Threads and Identities keep the ids clients already hold (RFC 8620
  §1.2: an id never changes), read from the stored file before migrating: the row keys
  with the type's letter (e3, M1, T2, I1);
- Email/get (RFC 8621 §4.2: subject, bodyStructure, blobId) and Email/query's `text`
  filter (§4.4.1) work on the old mail; new objects (Email/import, §4.8; Mailbox/set,
  §2.5) get ids that are not plain numbers; an alias still delivers (LMTP and `deliver`).

A database whose schema is newer than the code is refused with one line and exit 2.
"""

import hashlib
import itertools
import json
import re
import shutil
import smtplib
import sqlite3
import subprocess
import sys

import pytest

from conftest import CORE, MAIL, PASSWORD, ROOT, Client, Server, run_cli

sys.path.insert(0, str(ROOT))
import jmapd  # noqa: E402  (for SCHEMA_VERSION and the file name only)

STORED = ROOT / "tests" / "data" / "db"
MAIL_DIR = ROOT / "tests" / "data" / "mail"
MANIFEST = json.loads((STORED / "manifest.json").read_text())
SCHEMAS = sorted(MANIFEST, key=lambda name: MANIFEST[name]["schema"])
SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
ALICE, BOB, ALIAS = "alice@example.com", "bob@example.com", "alias@example.com"
# A word of each stored message (its subject or body) for the text filter.
SEARCH_WORDS = {"01-plain-ascii": "Thai", "02-alternative": "planning",
                "04-mixed-attachments": "invoice", "08-rfc2047-words": "understand",
                "28-references": "kickoff", "17-quoted-printable": "wrapped"}
_serial = itertools.count(1)


def copy_stored(name, tmp_path):
    """A copy of a stored data directory: its database and blobs (the stored one is never
    opened, so SQLite leaves no -wal or -shm file in tests/data)."""
    data_dir = tmp_path / f"{name}-{next(_serial)}" / "data"
    data_dir.mkdir(parents=True)
    shutil.copy2(STORED / name / jmapd.DB_FILE, data_dir / jmapd.DB_FILE)
    shutil.copytree(STORED / name / "blobs", data_dir / "blobs")
    return data_dir


def read_sql(data_dir, sql, params=()):
    conn = sqlite3.connect(data_dir / jmapd.DB_FILE)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def legacy(data_dir):
    """What the old data holds, read before any migration: ids as clients know them."""
    has_identity = read_sql(data_dir, "SELECT 1 FROM sqlite_master WHERE name = 'identity'")
    by_sha = {hashlib.sha256(path.read_bytes()).hexdigest(): path.stem
              for path in MAIL_DIR.glob("*.eml")}
    accounts = dict(read_sql(data_dir, "SELECT username, pk FROM account"))
    emails = {}
    for pk, account_pk, sha, thread_pk, size in read_sql(
            data_dir, "SELECT pk, account_pk, blob_sha256, thread_pk, size FROM email "
                      "WHERE destroyed = 0"):
        emails[f"e{pk}"] = {"account": f"A{account_pk}", "file": by_sha[sha],
                            "threadId": f"T{thread_pk}", "size": size, "mailboxIds": {
                                f"M{m}": True for (m,) in read_sql(
                                    data_dir, "SELECT mailbox_pk FROM email_mailbox WHERE "
                                              "email_pk = ?", (pk,))}}
    mailboxes = {}
    for pk, account_pk, name, role in read_sql(
            data_dir, "SELECT pk, account_pk, name, role FROM mailbox WHERE destroyed = 0"):
        mailboxes.setdefault(f"A{account_pk}", {})[f"M{pk}"] = (name, role)
    identities = {}
    if has_identity:
        for pk, account_pk, email in read_sql(
                data_dir, "SELECT pk, account_pk, email FROM identity WHERE destroyed = 0"):
            identities.setdefault(f"A{account_pk}", {})[f"I{pk}"] = email
    schema = read_sql(data_dir, "SELECT MAX(version) FROM schema_version")[0][0]
    return {"accounts": {u: f"A{pk}" for u, pk in accounts.items()}, "emails": emails,
            "mailboxes": mailboxes, "identities": identities if has_identity else None,
            "schema": schema}


def expected(file_stem):
    return json.loads((MAIL_DIR / f"{file_stem}.json").read_text())


def shape(part):
    """A bodyStructure as its tree of media types."""
    return (part["type"], tuple(shape(sub) for sub in part.get("subParts") or ()))


def mailbox_ids(client, account_id):
    got = client.ok("Mailbox/get", {"accountId": account_id})
    return {m["id"]: (m["name"], m["role"]) for m in got["list"]}


def inbox(client):
    return next(i for i, (_, role) in mailbox_ids(client, client.account_id).items()
                if role == "inbox")


def search(client, words, account_id=None):
    return client.ok("Email/query", {"accountId": account_id or client.account_id,
                                     "filter": {"text": words}})["ids"]


def message(subject):
    return (f"From: Carol <carol@example.net>\r\nTo: {ALIAS}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.net>\r\nDate: Tue, 8 Dec 2026 10:00:00 +0000\r\n"
            f"\r\nA message for the alias: {subject}.\r\n").encode()


def upload(client, data):
    url = client.session["uploadUrl"].replace("{accountId}", client.account_id)
    r = client.http.post(url, data=data, headers={"Content-Type": "message/rfc822"},
                         timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()["blobId"]


def download(client, blob_id):
    url = (client.session["downloadUrl"].replace("{accountId}", client.account_id)
           .replace("{blobId}", blob_id).replace("{name}", "m.eml")
           .replace("{type}", "message/rfc822"))
    r = client.http.get(url, timeout=30)
    assert r.status_code == 200, r.text
    return r.content


def lmtp_port(server):
    match = re.search(r"LMTP on 127\.0\.0\.1:(\d+)", server.log())
    assert match, server.log()
    return int(match.group(1))


@pytest.fixture(scope="module", params=SCHEMAS)
def migrated(request, tmp_path_factory):
    """Today's server on a copy of one stored data directory (migrated by the start)."""
    name = request.param
    data_dir = copy_stored(name, tmp_path_factory.mktemp("migrated"))
    old = legacy(data_dir)
    assert old["schema"] == MANIFEST[name]["schema"] < jmapd.SCHEMA_VERSION
    server = Server(data_dir, "--lmtp", "127.0.0.1:0").start()
    server.old, server.name = old, name
    server.alice = Client(server.url, ALICE)
    server.bob = Client(server.url, BOB)
    yield server
    server.stop()


# ---- the schema ----

def test_issue_18_migrated_schema_is_current(migrated):
    assert f"database upgraded from schema {migrated.old['schema']} to " \
           f"{jmapd.SCHEMA_VERSION}" in migrated.log()
    done = run_cli("check", data_dir=migrated.data_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"schema version {jmapd.SCHEMA_VERSION} (this jmapd: {jmapd.SCHEMA_VERSION})" \
        in done.stdout
    assert "0 damaged or missing, 0 orphan files" in done.stdout
    versions = [v for (v,) in read_sql(migrated.data_dir,
                                       "SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, jmapd.SCHEMA_VERSION + 1))


# ---- logins ----

def test_issue_18_old_password_and_app_password_log_in(migrated):
    old = migrated.old
    assert migrated.alice.session["primaryAccounts"][MAIL] == old["accounts"][ALICE]
    device = Client(migrated.url, ALICE, MANIFEST[migrated.name]["app_password"])
    assert device.session["username"] == ALICE
    assert device.account_id == old["accounts"][ALICE]
    refused = Client(migrated.url, ALICE, "not the password at all")
    assert refused.http.get(migrated.url + "/jmap/session", timeout=30).status_code == 401
    assert migrated.bob.account_id == old["accounts"][BOB]


def test_issue_18_share_survives(migrated):
    old = migrated.old
    accounts = migrated.bob.session["accounts"]
    alice_account = old["accounts"][ALICE]
    if old["schema"] < 6:  # sharing came with schema 6
        assert alice_account not in accounts
        return
    assert accounts[alice_account]["isReadOnly"] is False
    got = migrated.bob.ok("Email/get", {"accountId": alice_account, "ids": sorted(
        i for i, e in old["emails"].items() if e["account"] == alice_account),
        "properties": ["subject"]})
    assert got["notFound"] == [] and len(got["list"]) == 5


# ---- old ids ----

def test_issue_18_old_mailboxes_keep_their_ids(migrated):
    for client in (migrated.alice, migrated.bob):
        assert mailbox_ids(client, client.account_id) == \
            migrated.old["mailboxes"][client.account_id]


def test_issue_18_old_emails_keep_their_ids(migrated):
    for client in (migrated.alice, migrated.bob):
        mine = {i: e for i, e in migrated.old["emails"].items()
                if e["account"] == client.account_id}
        assert mine
        got = client.ok("Email/get", {"accountId": client.account_id, "ids": sorted(mine),
                                      "properties": ["subject", "bodyStructure", "threadId",
                                                     "mailboxIds", "blobId", "size"]})
        assert got["notFound"] == []
        assert {e["id"] for e in got["list"]} == set(mine)
        for email in got["list"]:
            old = mine[email["id"]]
            want = expected(old["file"])
            assert email["subject"] == want["email"]["subject"], old["file"]
            assert shape(email["bodyStructure"]) == shape(want["bodyStructure"]), old["file"]
            assert (email["threadId"], email["mailboxIds"], email["size"]) == (
                old["threadId"], old["mailboxIds"], old["size"])
            raw = download(client, email["blobId"])
            assert raw == (MAIL_DIR / f"{old['file']}.eml").read_bytes()
        listed = client.ok("Email/query", {"accountId": client.account_id})["ids"]
        assert sorted(listed) == sorted(mine)
        threads = client.ok("Thread/get", {"accountId": client.account_id, "ids": sorted(
            {e["threadId"] for e in mine.values()})})
        assert threads["notFound"] == []


def test_issue_18_old_identities_keep_their_ids(migrated):
    using = [CORE, MAIL, SUBMISSION, VACATION]
    for client, username in ((migrated.alice, ALICE), (migrated.bob, BOB)):
        got = client.ok("Identity/get", {"accountId": client.account_id}, using=using)
        found = {i["id"]: i["email"] for i in got["list"]}
        if migrated.old["identities"] is None:  # schema 5: made by migration 6
            assert list(found.values()) == [username]
            assert re.fullmatch(r"I[0-9]+", next(iter(found)))
        else:
            assert found == migrated.old["identities"][client.account_id]
        vacation = client.ok("VacationResponse/get", {"accountId": client.account_id},
                             using=using)
        assert [v["id"] for v in vacation["list"]] == ["singleton"]


# ---- search ----

def test_issue_18_old_mail_is_found_by_text_search(migrated):
    for client in (migrated.alice, migrated.bob):
        for email_id, old in migrated.old["emails"].items():
            if old["account"] != client.account_id:
                continue
            assert search(client, SEARCH_WORDS[old["file"]]) == [email_id], old["file"]


# ---- new objects ----

def test_issue_18_new_objects_get_ids_that_are_not_numbers(migrated):
    alice = migrated.alice
    blob_id = upload(alice, message("imported-after-migration"))
    result = alice.ok("Email/import", {"accountId": alice.account_id, "emails": {"k": {
        "blobId": blob_id, "mailboxIds": {inbox(alice): True}}}})
    new_id = result["created"]["k"]["id"]
    assert not re.fullmatch(r"e[0-9]+", new_id), new_id
    assert new_id not in migrated.old["emails"]
    assert search(alice, "imported-after-migration") == [new_id]
    got = alice.ok("Email/get", {"accountId": alice.account_id, "ids": [new_id],
                                 "properties": ["subject", "threadId"]})["list"][0]
    assert got["subject"] == "imported-after-migration"
    assert not re.fullmatch(r"T[0-9]+", got["threadId"])
    made = alice.ok("Mailbox/set", {"accountId": alice.account_id,
                                    "create": {"m": {"name": f"After {migrated.name}"}}})
    assert not re.fullmatch(r"M[0-9]+", made["created"]["m"]["id"])


# ---- aliases deliver ----

def test_issue_18_alias_still_delivers(migrated):
    subject = f"alias-{migrated.name}-lmtp"
    conn = smtplib.LMTP("127.0.0.1", lmtp_port(migrated), timeout=30)
    try:
        assert conn.sendmail("carol@example.net", [ALIAS], message(subject)) == {}
    finally:
        conn.quit()
    subject_cli = f"alias-{migrated.name}-deliver"
    done = run_cli("deliver", "--user", ALIAS, data_dir=migrated.data_dir,
                   input_text=message(subject_cli).decode())
    assert done.returncode == 0, done.stderr
    alice = migrated.alice
    for words in (subject, subject_cli):
        found = search(alice, words)
        assert len(found) == 1, words
        got = alice.ok("Email/get", {"accountId": alice.account_id, "ids": found,
                                     "properties": ["mailboxIds"]})["list"][0]
        assert got["mailboxIds"] == {inbox(alice): True}


# ---- a second start ----

@pytest.mark.parametrize("name", SCHEMAS)
def test_issue_18_second_start_is_a_no_op(name, tmp_path):
    data_dir = copy_stored(name, tmp_path)
    old = legacy(data_dir)
    first = Server(data_dir).start()
    try:
        alice = Client(first.url, ALICE)
        blob_id = upload(alice, message("made-in-the-first-run"))
        new_id = alice.ok("Email/import", {"accountId": alice.account_id, "emails": {"k": {
            "blobId": blob_id, "mailboxIds": {inbox(alice): True}}}})["created"]["k"]["id"]
    finally:
        first.stop()
    assert "database upgraded" in first.log()
    tables = ("schema_version", "id_scheme", "server_secret")
    after_first = {t: read_sql(data_dir, f"SELECT * FROM {t} ORDER BY 1") for t in tables}
    second = Server(data_dir).start()
    try:
        assert "database upgraded" not in second.log()
        assert "new database" not in second.log()
        alice = Client(second.url, ALICE)
        ids = sorted(i for i, e in old["emails"].items() if e["account"] == alice.account_id)
        got = alice.ok("Email/get", {"accountId": alice.account_id, "ids": ids + [new_id],
                                     "properties": ["subject"]})
        assert got["notFound"] == []
        assert search(alice, "made-in-the-first-run") == [new_id]
    finally:
        second.stop()
    assert {t: read_sql(data_dir, f"SELECT * FROM {t} ORDER BY 1") for t in tables} == \
        after_first
    done = run_cli("check", data_dir=data_dir)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- a newer database ----

def test_issue_18_newer_schema_is_refused_in_one_line(tmp_path):
    data_dir = copy_stored(SCHEMAS[-1], tmp_path)
    newer = jmapd.SCHEMA_VERSION + 1
    conn = sqlite3.connect(data_dir / jmapd.DB_FILE)
    conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (newer,))
    conn.commit()
    conn.close()
    before = read_sql(data_dir, "SELECT version FROM schema_version ORDER BY version")
    for args in (("user", "list"), ("check",)):
        done = run_cli(*args, data_dir=data_dir)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert f"database schema {newer} is newer than this jmapd " \
               f"({jmapd.SCHEMA_VERSION})" in lines[0]
    serve = subprocess.run(
        [sys.executable, str(ROOT / "jmapd.py"), "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(data_dir), "--test-cheap-hashing"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert serve.returncode == 2, serve.stderr
    assert len(serve.stderr.splitlines()) == 1, serve.stderr
    assert "is newer than this jmapd" in serve.stderr
    # Nothing was migrated: the old schema's versions and the newer one, no more.
    assert read_sql(data_dir, "SELECT version FROM schema_version ORDER BY version") == before
    assert not read_sql(data_dir, "SELECT 1 FROM sqlite_master WHERE name = 'id_scheme'")
