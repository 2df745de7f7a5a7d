"""Issue 18's worked example: a throwaway document type, declared here and not in
jmapd.py, gets all six standard methods, push and search by declaration alone.

The declaration (a peewee model on jmapd.DocumentRow, one migration made by
jmapd.db_object_table, a capability from jmapd.register_capability and a
jmapd.DocumentSpec with its props, index, search, sorts and filters) lives in a small
launcher script written into a temp dir; that launcher runs `user add`, `user share` and
`serve`, so a real server process has the type. Everything is then checked from outside,
over HTTP, with `using` [core, "urn:example:notes"]:

- RFC 8620 §2: the Session advertises the capability (capabilities, the account's
  accountCapabilities, primaryAccounts), for shared accounts too.
- §5.1 /get: with properties (a vendor property named among them) and with null (the whole
  document, properties the declaration does not know included).
- §5.3 /set: created answers the defaults; unknown (vendor) properties kept; updates are
  PatchObjects with paths into the document ("tags/work"), null removing a key;
  invalidProperties names the exact paths (a bad LocalDateTime, Duration, time zone,
  an id-set naming a missing Mailbox or with a value that is not true); a server-set id
  is refused. Ids of new objects are not counters.
- §5.2 /changes, §5.5 /query (sort, a declared filter, the `text` search filter, with
  the Email query syntax of RFC 8621 §4.4.1), §5.6 /queryChanges, §5.4 /copy into an
  account shared read-write, keeping unknown properties.
- §7.3 push: an EventSource stream (StateChange, §7.1) names the new type after a
  Note/set.
"""

import base64
import http.client
import itertools
import json
import re
import sqlite3
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

from conftest import CORE, MAIL, PASSWORD, ROOT, Client, Server

sys.path.insert(0, str(ROOT))
import jmapd  # noqa: E402  (only to compute ids with the server's IdScheme)

NOTES = "urn:example:notes"
USING = [CORE, NOTES]
WAIT_S = 20

LAUNCHER = '''\
"""jmapd with a Note document type declared outside jmapd.py (issue 18's example)."""
import sys

sys.path.insert(0, {root!r})
import peewee  # noqa: E402

import jmapd  # noqa: E402


class NoteRow(jmapd.DocumentRow):
    title_sort = peewee.TextField(default="")

    class Meta:
        table_name = "note"


jmapd.register_migration(1000, "notes", lambda database: jmapd.db_object_table(
    database, "note", {{"title_sort": "TEXT NOT NULL DEFAULT ''"}}, document=True,
    search=("title", "body")))
jmapd.register_capability("urn:example:notes", account=lambda app, read_only: {{}})


def title_contains(ctx, value):
    return NoteRow.title_sort.contains(jmapd.a_str(value).casefold())


@jmapd.register_type
class NoteType(jmapd.DocumentSpec):
    name, capability, model, id_prefix = "Note", "urn:example:notes", NoteRow, "N"
    methods = ("get", "changes", "set", "copy", "query", "queryChanges")
    props = {{
        "id": jmapd.Prop("id", server_set=True),
        "title": jmapd.Prop("str", max_len=255),
        "body": jmapd.Prop("str", default=""),
        "tags": jmapd.Prop("object", default={{}}),
        "due": jmapd.Prop("localdatetime", nullable=True, default=None),
        "remind": jmapd.Prop("duration", nullable=True, default=None),
        "timeZone": jmapd.Prop("timezone", nullable=True, default=None),
        "folderIds": jmapd.Prop("idset", ref="Mailbox"),
    }}
    index = {{"title_sort": lambda d: d["title"].casefold()}}
    search = {{"title": lambda d: d["title"], "body": lambda d: d.get("body", "")}}
    sorts = {{"title": (NoteRow.title_sort, True)}}
    filters = {{"title": title_contains}}


sys.exit(jmapd.main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    path = tmp_path_factory.mktemp("notes-launcher") / "jmapd_notes.py"
    path.write_text(LAUNCHER.format(root=str(ROOT)))
    return path


def run_launcher(launcher, *args, data_dir, input_text=None):
    cmd = [sys.executable, str(launcher), *map(str, args), "--test-cheap-hashing",
           "--data-dir", str(data_dir)]
    done = subprocess.run(cmd, input=input_text, capture_output=True, text=True, timeout=60,
                          stdin=None if input_text is not None else subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done


class NotesServer(Server):
    """`serve` through the launcher (the Note type declared) on a free loopback port."""

    def __init__(self, launcher, data_dir):
        super().__init__(data_dir)
        self.launcher = launcher

    def start(self, timeout=20):
        self.log_file = open(self.log_path, "w+")
        cmd = [sys.executable, str(self.launcher), "serve", "--listen", "127.0.0.1:0",
               "--data-dir", str(self.data_dir), "--test-cheap-hashing"]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+?)/? ", self.log() + " ")
            if match:
                self.url = match.group(1).rstrip("/")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"jmapd exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"jmapd did not start:\n{self.log()}")


OWNER, GRANTEE = "owner@example.com", "grantee@example.com"
FRESH = itertools.count(1)


@pytest.fixture(scope="module")
def server(launcher, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("notes") / "data"
    for user in (OWNER, GRANTEE):
        run_launcher(launcher, "user", "add", user, "--password-stdin", data_dir=data_dir,
                     input_text=PASSWORD + "\n")
    run_launcher(launcher, "user", "share", OWNER, GRANTEE, data_dir=data_dir)
    srv = NotesServer(launcher, data_dir).start()
    yield srv
    srv.stop()


class NotesClient(Client):
    def notes(self, name, args, account_id=None):
        """A Note/* call that must succeed; its response arguments."""
        args = {"accountId": account_id or self.account_id, **args}
        return self.ok(f"Note/{name}", args, using=USING)

    def inbox(self, account_id=None):
        got = self.ok("Mailbox/get", {"accountId": account_id or self.account_id},
                      using=[CORE, MAIL])
        return next(m["id"] for m in got["list"] if m["role"] == "inbox")


@pytest.fixture(scope="module")
def owner(server):
    return NotesClient(server.url, OWNER)


@pytest.fixture(scope="module")
def grantee(server):
    return NotesClient(server.url, GRANTEE)


@pytest.fixture
def fresh(launcher, server):
    """A new user of their own (added through the launcher while the server runs)."""
    username = f"fresh{next(FRESH)}@example.com"
    run_launcher(launcher, "user", "add", username, "--password-stdin",
                 data_dir=server.data_dir, input_text=PASSWORD + "\n")
    return NotesClient(server.url, username)


def new_note(client, cid="n", **props):
    note = {"title": "A note", "folderIds": {client.inbox(): True}, **props}
    result = client.notes("set", {"create": {cid: note}})
    assert cid in (result["created"] or {}), result
    return result["created"][cid]


def query_ids(client, **args):
    return client.notes("query", args)["ids"]


# ---- the Session (RFC 8620 §2) ----

def test_issue_18_session_advertises_the_declared_capability(owner, grantee):
    session = owner.session
    assert session["capabilities"][NOTES] == {}
    assert session["primaryAccounts"][NOTES] == owner.account_id
    assert session["accounts"][owner.account_id]["accountCapabilities"][NOTES] == {}
    shared = grantee.session["accounts"]
    owner_account = next(i for i, a in shared.items() if a["name"] == OWNER)
    assert shared[owner_account]["isReadOnly"] is False
    assert NOTES in shared[owner_account]["accountCapabilities"]
    assert grantee.session["primaryAccounts"][NOTES] == grantee.account_id


# ---- /set create and /get (RFC 8620 §5.3, §5.1) ----

def test_issue_18_create_answers_defaults_and_keeps_vendor_properties(owner):
    inbox = owner.inbox()
    result = owner.notes("set", {"create": {"a": {
        "title": "Groceries", "folderIds": {inbox: True}, "example.com:colour": "green"}}})
    created = result["created"]["a"]
    assert created == {"id": created["id"], "body": "", "tags": {}, "due": None,
                       "remind": None, "timeZone": None}
    assert result["oldState"] != result["newState"]
    note_id = created["id"]
    got = owner.notes("get", {"ids": [note_id], "properties": ["title", "example.com:colour"]})
    assert got["list"] == [{"id": note_id, "title": "Groceries", "example.com:colour": "green"}]
    assert got["state"] == result["newState"]
    got = owner.notes("get", {"ids": [note_id], "properties": ["title"]})  # nothing unasked
    assert got["list"] == [{"id": note_id, "title": "Groceries"}]
    whole = owner.notes("get", {"ids": [note_id], "properties": None})["list"][0]
    assert whole == {"id": note_id, "title": "Groceries", "body": "", "tags": {}, "due": None,
                     "remind": None, "timeZone": None, "folderIds": {inbox: True},
                     "example.com:colour": "green"}
    listed = owner.notes("get", {})["list"]  # ids null: every Note
    assert note_id in [n["id"] for n in listed]
    assert owner.notes("get", {"ids": ["Nnosuchnote00"]})["notFound"] == ["Nnosuchnote00"]


def test_issue_18_create_with_every_kind_of_value(owner):
    created = new_note(owner, title="Dentist", body="Bring the forms", tags={"health": True},
                       due="2027-03-01T09:30:00", remind="PT15M", timeZone="Europe/Berlin")
    got = owner.notes("get", {"ids": [created["id"]]})["list"][0]
    assert (got["due"], got["remind"], got["timeZone"], got["tags"]) == (
        "2027-03-01T09:30:00", "PT15M", "Europe/Berlin", {"health": True})


def test_issue_18_ids_of_new_notes_are_not_counters(owner):
    first, second = new_note(owner, "x")["id"], new_note(owner, "y")["id"]
    assert first.startswith("N") and second.startswith("N")
    assert not (first[1:].isdigit() and second[1:].isdigit()
                and int(second[1:]) - int(first[1:]) == 1), (first, second)
    assert not first[1:].isdigit() and not second[1:].isdigit(), (first, second)


def overflowing_id(data_dir, type_name, table):
    """An id of the type whose 13 letters the server's IdScheme decodes to a key of 2**63
    or more (half of all such ids): a well-formed id that names nothing."""
    conn = sqlite3.connect(f"file:{data_dir / jmapd.DB_FILE}?mode=ro", uri=True)
    try:
        secret = conn.execute("SELECT value FROM server_secret WHERE name = 'ids'").fetchone()[0]
        first = dict(conn.execute("SELECT table_name, first_new_pk FROM id_scheme"))
    finally:
        conn.close()
    scheme = jmapd.IdScheme(bytes(secret), first)
    prefix = {"Note": "N", "Mailbox": "M"}[type_name]
    for first_letter in "abcdefghijklmnop":
        for letter in jmapd.IdScheme.ALPHABET:
            body = first_letter + letter * 12
            block = 0
            for ch in body:
                block = block * 32 + jmapd.IdScheme.ALPHABET.index(ch)
            if scheme.unpermute(table, block) >= 2 ** 63:
                return prefix + body
    raise AssertionError("no such id found")


def test_issue_18_well_formed_ids_naming_nothing_are_not_found(server, owner):
    note_id = overflowing_id(server.data_dir, "Note", "note")
    mailbox_id = overflowing_id(server.data_dir, "Mailbox", "mailbox")
    problems = []
    got = owner.call("Note/get", {"accountId": owner.account_id, "ids": [note_id]}, using=USING)
    if got[0] != "Note/get" or got[1]["notFound"] != [note_id]:
        problems.append(f"Note/get {note_id}: {got}")
    got = owner.call("Mailbox/get", {"accountId": owner.account_id, "ids": [mailbox_id]},
                     using=[CORE, MAIL])
    if got[0] != "Mailbox/get" or got[1]["notFound"] != [mailbox_id]:
        problems.append(f"Mailbox/get {mailbox_id}: {got}")
    got = owner.call("Note/set", {"accountId": owner.account_id, "create": {"bad": {
        "title": "Bad", "folderIds": {mailbox_id: True}}}}, using=USING)
    if got[0] != "Note/set" or got[1]["notCreated"]["bad"].get("properties") != [
            f"folderIds/{mailbox_id}"]:
        problems.append(f"Note/set folderIds {mailbox_id}: {got}")
    assert not problems, problems


# ---- invalidProperties with paths (RFC 8620 §5.3) ----

def not_created(client, obj):
    result = client.notes("set", {"create": {"bad": obj}})
    assert result["created"] is None, result
    return result["notCreated"]["bad"]


def test_issue_18_invalid_properties_name_exact_paths(owner):
    inbox = owner.inbox()
    error = not_created(owner, {"title": "Bad", "due": "2027-02-30T10:00:00",
                                "remind": "one hour", "timeZone": "Mars/Olympus_Mons",
                                "folderIds": {inbox: True}})
    assert error["type"] == "invalidProperties"
    assert error["properties"] == ["due", "remind", "timeZone"]
    error = not_created(owner, {"title": "Bad", "folderIds": {}})
    assert error["properties"] == ["folderIds"]
    error = not_created(owner, {"title": "Bad", "folderIds": [inbox]})
    assert error["properties"] == ["folderIds"]
    error = not_created(owner, {"title": "Bad", "folderIds": {inbox: True},
                                "due": "2027-03-01T09:30:00Z"})  # UTC, not local
    assert error["properties"] == ["due"]
    error = not_created(owner, {"folderIds": {inbox: True}})  # title is required
    assert error["properties"] == ["title"]
    error = not_created(owner, {"title": "x" * 256, "folderIds": {inbox: True}})
    assert error["properties"] == ["title"]
    error = not_created(owner, {"id": "Nmine", "title": "Mine", "folderIds": {inbox: True}})
    assert error == {"type": "invalidProperties", "properties": ["id"]}
    note_id = new_note(owner)["id"]
    result = owner.notes("set", {"update": {note_id: {"remind": "P1Y", "id": "Nother"}}})
    assert result["notUpdated"][note_id]["type"] == "invalidProperties"
    assert result["notUpdated"][note_id]["properties"] == ["id", "remind"]
    result = owner.notes("set", {"update": {note_id: {"timeZone": "Europe/Nowhere",
                                                      "due": "2027-01-01T25:00:00"}}})
    assert result["notUpdated"][note_id]["properties"] == ["due", "timeZone"]


def test_issue_18_id_set_errors_name_only_the_path(owner, grantee):
    inbox = owner.inbox()
    problems = []

    def expect(what, error, properties):
        if error.get("type") != "invalidProperties" or error.get("properties") != properties:
            problems.append(f"{what}: {error} (expected {properties})")

    expect("a missing Mailbox", not_created(owner, {"title": "Bad", "folderIds": {
        "M999999": True}}), ["folderIds/M999999"])
    expect("a value false", not_created(owner, {"title": "Bad", "folderIds": {inbox: False}}),
           [f"folderIds/{inbox}"])
    expect("with another bad property", not_created(owner, {
        "title": "Bad", "remind": "soon", "folderIds": {"M999999": True}}),
        ["folderIds/M999999", "remind"])
    note_id = new_note(owner)["id"]
    result = owner.notes("set", {"update": {note_id: {"folderIds": {"M999999": True}}}})
    expect("an update", (result["notUpdated"] or {}).get(note_id, {}), ["folderIds/M999999"])
    # A copy whose folderIds name the grantee's Inbox, which the owner's account lacks.
    owner_account = next(i for i, a in grantee.session["accounts"].items()
                         if a["name"] == OWNER)
    original = new_note(grantee, "o")["id"]
    result = grantee.notes("copy", {"fromAccountId": grantee.account_id, "create": {
        "c": {"id": original}}}, account_id=owner_account)
    expect("a copy", (result["notCreated"] or {}).get("c", {}),
           [f"folderIds/{grantee.inbox()}"])
    assert not problems, problems


# ---- updates as PatchObjects on the document (RFC 8620 §5.3) ----

def test_issue_18_update_patches_inside_the_document(owner):
    note_id = new_note(owner, tags={"home": True}, **{"example.com:colour": "red"})["id"]
    before = owner.notes("get", {"ids": []})["state"]
    result = owner.notes("set", {"update": {note_id: {"tags/work": True,
                                                      "example.com:colour": "blue"}}})
    assert result["updated"] == {note_id: None}, result
    assert result["oldState"] == before and result["newState"] != before
    got = owner.notes("get", {"ids": [note_id], "properties": None})["list"][0]
    assert got["tags"] == {"home": True, "work": True}
    assert got["example.com:colour"] == "blue"
    result = owner.notes("set", {"update": {note_id: {"tags/home": None,
                                                      "example.com:colour": None,
                                                      "due": "2027-01-01T08:00:00"}}})
    assert result["updated"] == {note_id: None}, result
    got = owner.notes("get", {"ids": [note_id], "properties": None})["list"][0]
    assert got["tags"] == {"work": True}
    assert "example.com:colour" not in got
    assert got["due"] == "2027-01-01T08:00:00"
    result = owner.notes("set", {"update": {note_id: {"due": None, "body": "Written"}}})
    got = owner.notes("get", {"ids": [note_id]})["list"][0]
    assert (got["due"], got["body"]) == (None, "Written")
    result = owner.notes("set", {"update": {note_id: {"tags/work/deep": True}}})
    assert result["notUpdated"][note_id]["type"] == "invalidPatch"
    result = owner.notes("set", {"update": {note_id: {"title": None}}})  # required
    assert result["notUpdated"][note_id]["properties"] == ["title"]


# ---- /changes (RFC 8620 §5.2) ----

def test_issue_18_changes_report_created_updated_destroyed(fresh):
    kept = new_note(fresh, "k")["id"]
    gone = new_note(fresh, "g")["id"]
    since = fresh.notes("get", {"ids": []})["state"]
    made = new_note(fresh, "f")["id"]
    fresh.notes("set", {"update": {kept: {"body": "changed"}}, "destroy": [gone]})
    changes = fresh.notes("changes", {"sinceState": since})
    assert changes["oldState"] == since
    assert changes["newState"] == fresh.notes("get", {"ids": []})["state"]
    assert (changes["created"], changes["updated"], changes["destroyed"]) == (
        [made], [kept], [gone])
    assert changes["hasMoreChanges"] is False
    again = fresh.notes("changes", {"sinceState": changes["newState"]})
    assert (again["created"], again["updated"], again["destroyed"]) == ([], [], [])
    assert fresh.notes("get", {"ids": [gone]})["notFound"] == [gone]


# ---- /query, the text filter, /queryChanges (RFC 8620 §5.5, §5.6) ----

def test_issue_18_query_sorts_filters_and_searches(fresh):
    ids = {title: new_note(fresh, title, title=title, body=body)["id"] for title, body in (
        ("banana", "yellow fruit from far away"), ("Apple", "a red pomme"),
        ("cherry", "small red stone fruit"))}
    assert query_ids(fresh, sort=[{"property": "title"}]) == [
        ids["Apple"], ids["banana"], ids["cherry"]]
    assert query_ids(fresh, sort=[{"property": "title", "isAscending": False}]) == [
        ids["cherry"], ids["banana"], ids["Apple"]]
    assert query_ids(fresh, filter={"title": "ERR"}) == [ids["cherry"]]
    by_title = {"property": "title"}
    assert query_ids(fresh, filter={"text": "red"}, sort=[by_title]) == [
        ids["Apple"], ids["cherry"]]
    assert query_ids(fresh, filter={"text": "banana"}) == [ids["banana"]]  # by title
    assert query_ids(fresh, filter={"text": "red fruit"}) == [ids["cherry"]]  # every word
    assert query_ids(fresh, filter={"operator": "NOT", "conditions": [{"text": "red"}]},
                     sort=[by_title]) == [ids["banana"]]
    fresh.notes("set", {"update": {ids["Apple"]: {"body": "a green pomme"}}})
    assert query_ids(fresh, filter={"text": "red"}) == [ids["cherry"]]
    assert query_ids(fresh, filter={"text": "green"}) == [ids["Apple"]]
    fresh.notes("set", {"destroy": [ids["cherry"]]})
    assert query_ids(fresh, filter={"text": "red"}) == []
    assert query_ids(fresh, filter={"text": "stone"}) == []
    result = fresh.call("Note/query", {"accountId": fresh.account_id,
                                         "sort": [{"property": "colour"}]}, using=USING)
    assert result[1]["type"] == "unsupportedSort"
    result = fresh.call("Note/query", {"accountId": fresh.account_id,
                                         "filter": {"colour": "red"}}, using=USING)
    assert result[1]["type"] == "unsupportedFilter"


def test_issue_18_query_changes(fresh):
    sort = [{"property": "title"}]
    flt = {"text": "qcmarker"}
    moved = new_note(fresh, "m", title="qc b", body="qcmarker")["id"]
    dropped = new_note(fresh, "d", title="qc c", body="qcmarker")["id"]
    before = fresh.notes("query", {"filter": flt, "sort": sort})
    assert before["ids"] == [moved, dropped] and before["canCalculateChanges"] is True
    added = new_note(fresh, "a", title="qc a", body="qcmarker")["id"]
    fresh.notes("set", {"update": {moved: {"title": "qc z"}}, "destroy": [dropped]})
    changes = fresh.notes("queryChanges", {"filter": flt, "sort": sort,
                                           "sinceQueryState": before["queryState"],
                                           "calculateTotal": True})
    assert changes["oldQueryState"] == before["queryState"]
    assert changes["newQueryState"] == fresh.notes("query", {"filter": flt})["queryState"]
    assert sorted(changes["removed"]) == sorted([moved, dropped])
    assert changes["added"] == [{"id": added, "index": 0}, {"id": moved, "index": 1}]
    assert changes["total"] == 2
    assert fresh.notes("query", {"filter": flt, "sort": sort})["ids"] == [added, moved]


# ---- /copy into a shared account (RFC 8620 §5.4) ----

def test_issue_18_copy_into_a_shared_account_keeps_unknown_properties(owner, grantee):
    owner_account = next(i for i, a in grantee.session["accounts"].items()
                         if a["name"] == OWNER)
    original = new_note(grantee, title="Shared plan", body="for both of us",
                        tags={"plans": True}, **{"example.com:colour": "teal"})["id"]
    owner_inbox = grantee.inbox(owner_account)
    result = grantee.notes("copy", {"fromAccountId": grantee.account_id, "create": {
        "c": {"id": original, "folderIds": {owner_inbox: True}}}}, account_id=owner_account)
    assert result["fromAccountId"] == grantee.account_id
    copy_id = result["created"]["c"]["id"]
    assert copy_id != original
    copied = owner.notes("get", {"ids": [copy_id], "properties": None})["list"][0]
    assert copied == {"id": copy_id, "title": "Shared plan", "body": "for both of us",
                      "tags": {"plans": True}, "due": None, "remind": None, "timeZone": None,
                      "folderIds": {owner_inbox: True}, "example.com:colour": "teal"}
    assert copy_id in query_ids(owner, filter={"text": "both"})  # indexed for search too
    # The original's folderIds name the grantee's Inbox, which the owner's account lacks.
    result = grantee.notes("copy", {"fromAccountId": grantee.account_id, "create": {
        "c": {"id": original}}}, account_id=owner_account)
    assert result["created"] is None
    assert result["notCreated"]["c"]["type"] == "invalidProperties"
    assert f"folderIds/{grantee.inbox()}" in result["notCreated"]["c"]["properties"]
    assert grantee.notes("get", {"ids": [original]})["list"][0]["title"] == "Shared plan"


# ---- push (RFC 8620 §7.3, §7.1) ----

def test_issue_18_eventsource_names_the_declared_type(server, owner):
    url = urlsplit(owner.session["eventSourceUrl"].replace("{types}", "Note").replace(
        "{closeafter}", "state").replace("{ping}", "0"))
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=WAIT_S)
    try:
        auth = owner.http.auth
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        connection.request("GET", f"{url.path}?{url.query}",
                           headers={"Authorization": f"Basic {token}",
                                    "Accept": "text/event-stream"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        assert response.readline().startswith(b":")  # the stream is open and watching
        created = owner.notes("set", {"create": {"p": {
            "title": "Pushed", "folderIds": {owner.inbox(): True}}}})
        body = response.read().decode()  # closeafter=state: the stream ends after one
    finally:
        connection.close()
    data = next(line[len("data: "):] for line in body.splitlines() if line.startswith("data: "))
    change = json.loads(data)
    assert change["@type"] == "StateChange"
    assert change["changed"] == {owner.account_id: {"Note": created["newState"]}}
    assert "event: state" in body
