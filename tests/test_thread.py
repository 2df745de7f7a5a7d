"""Threads (jmapd §7.3, thread_for_email in §7.4): RFC 8621 §3, §3.1, §3.2.

Messages are built here as small RFC 5322 byte strings (message()), uploaded to the
session's uploadUrl and added with Email/import (RFC 8621 §4.8), as a client would.
Covered: the §3 suggested algorithm (a shared message id in Message-ID / In-Reply-To /
References *and* the same base subject after stripping "Re:", "Fwd:", "[list]" and white
space), a reply that arrives before its parent, broken References and same-subject
strangers staying apart; Thread.emailIds oldest receivedAt first (§3); Thread/get and
the §3.1.1 example; Thread/changes (§3.2, RFC 8620 §5.2) when a message joins, starts or
leaves a thread; threadId of Email/import (§4.8) against Email/get.

The message builder and MailAccount helper are shared with test_email_query.py and
test_search.py.
"""

import base64
import itertools
import os
from datetime import datetime, timedelta, timezone

import pytest

from conftest import Client, add_user
from test_generic import Var, expect
from test_mime import upload

_ids = itertools.count(1)
CRLF = "\r\n"
EPOCH = datetime(2024, 2, 1, tzinfo=timezone.utc)


def unique(prefix="m"):
    """A fresh token (for Message-IDs and subjects no other test uses)."""
    return f"{prefix}{next(_ids)}x{os.getpid()}"


def at(hours=0, minutes=0, seconds=0):
    """A UTCDate (RFC 8620 §1.4) some time after 2024-02-01T00:00:00Z."""
    moment = EPOCH + timedelta(hours=hours, minutes=minutes, seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- building messages (RFC 5322, MIME per RFC 2045/2046) ----


def _leaf(media_type, text):
    return (f"Content-Type: {media_type}; charset=utf-8{CRLF}"
            f"Content-Transfer-Encoding: 8bit{CRLF}{CRLF}{text}{CRLF}")


def _multipart(subtype, parts):
    boundary = "=_" + unique("b")
    out = f"Content-Type: multipart/{subtype}; boundary=\"{boundary}\"{CRLF}{CRLF}"
    for part in parts:
        out += f"--{boundary}{CRLF}{part}"
    return out + f"--{boundary}--{CRLF}"


def _attachment(name, media_type, data):
    encoded = base64.encodebytes(data).decode("ascii").replace("\n", CRLF)
    return (f"Content-Type: {media_type}; name=\"{name}\"{CRLF}"
            f"Content-Disposition: attachment; filename=\"{name}\"{CRLF}"
            f"Content-Transfer-Encoding: base64{CRLF}{CRLF}{encoded}")


def message(subject="Hello", *, msgid=None, in_reply_to=None, references=(),
            from_="Alice Example <alice@example.com>", to="Bob Example <bob@example.net>",
            cc=None, bcc=None, date="Thu, 01 Feb 2024 09:00:00 +0000", text="Hello there.",
            html=None, attachments=(), headers=()) -> bytes:
    """An RFC 5322 message: text and/or HTML body, optional attachments (name, type, bytes)."""
    lines = []
    for name, value in (("From", from_), ("To", to), ("Cc", cc), ("Bcc", bcc),
                        ("Date", date), ("Subject", subject)):
        if value is not None:
            lines.append(f"{name}: {value}")
    lines.append(f"Message-ID: <{msgid or unique() + '@test.example'}>")
    if in_reply_to:
        lines.append(f"In-Reply-To: <{in_reply_to}>")
    if references:
        lines.append("References: " + " ".join(f"<{r}>" for r in references))
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("MIME-Version: 1.0")
    if html is None:
        body = _leaf("text/plain", text)
    elif text is None:
        body = _leaf("text/html", html)
    else:
        body = _multipart("alternative", [_leaf("text/plain", text), _leaf("text/html", html)])
    if attachments:
        body = _multipart("mixed", [body, *(_attachment(*a) for a in attachments)])
    return (CRLF.join(lines) + CRLF + body).encode("utf-8")


class MailAccount:
    """One user's account seen through HTTP: roles -> Mailbox ids, import, query, get."""

    def __init__(self, client):
        self.client = client
        self.id = client.account_id
        boxes = self.ok("Mailbox/get", ids=None)["list"]
        self.box = {m["role"]: m["id"] for m in boxes if m["role"]}

    def ok(self, name, **args):
        return self.client.ok(name, {"accountId": self.id, **args})

    def error(self, name, **args):
        """Make a call that must fail; return its error type (RFC 8620 §3.6.2)."""
        resp = self.client.call(name, {"accountId": self.id, **args})
        assert resp[0] == "error", resp
        return resp[1]["type"]

    def item(self, raw, mailboxes=("inbox",), keywords=(), received=None):
        """An EmailImport object (RFC 8621 §4.8) for raw octets, uploaded first."""
        out = {"blobId": upload(self.client, raw)["blobId"],
               "mailboxIds": {self.box.get(m, m): True for m in mailboxes},
               "keywords": dict.fromkeys(keywords, True)}
        if received is not None:
            out["receivedAt"] = received
        return out

    def add_many(self, items: dict) -> dict:
        """Import EmailImport objects (creation id -> item) in one call; return created."""
        resp = self.ok("Email/import", emails=items)
        assert resp["notCreated"] is None, resp
        return resp["created"]

    def add(self, raw, mailboxes=("inbox",), keywords=(), received=None) -> dict:
        """Import one message; return its created object (id, blobId, threadId, size)."""
        return self.add_many({"k": self.item(raw, mailboxes, keywords, received)})["k"]

    def query(self, **args) -> list:
        return self.ok("Email/query", **args)["ids"]

    def thread_of(self, email_id):
        found = self.ok("Email/get", ids=[email_id], properties=["threadId"])["list"]
        assert len(found) == 1, found
        return found[0]["threadId"]

    def thread(self, thread_id):
        found = self.ok("Thread/get", ids=[thread_id])["list"]
        assert len(found) == 1, found
        return found[0]["emailIds"]

    def state(self, type_name):
        return self.ok(f"{type_name}/get", ids=[])["state"]

    def changes(self, type_name, since):
        resp = self.ok(f"{type_name}/changes", sinceState=since)
        return resp["created"], resp["updated"], resp["destroyed"]

    def mailbox(self, name):
        resp = self.ok("Mailbox/set", create={"n": {"name": name}})
        assert resp["notCreated"] is None, resp
        return resp["created"]["n"]["id"]

    def destroy_mailbox(self, mailbox_id):
        resp = self.ok("Mailbox/set", destroy=[mailbox_id], onDestroyRemoveEmails=True)
        assert resp["destroyed"] == [mailbox_id], resp


def new_account(server, name):
    username = f"{unique(name)}@example.com"
    add_user(server.data_dir, username)
    return MailAccount(Client(server.url, username))


@pytest.fixture(scope="module")
def acct(server):
    """One account for this module: every test uses Message-IDs and subjects of its own."""
    return new_account(server, "thread")


def parent_and(acct, reply_subject, refs=True, in_reply_to=True, subject=None):
    """Import a parent, then a message answering it; return (parent, other) created."""
    base = subject or "Plans " + unique("s")
    parent_id = unique() + "@test.example"
    parent = acct.add(message(base, msgid=parent_id), received=at(1))
    other = acct.add(message(reply_subject.format(base), references=[parent_id] if refs else (),
                             in_reply_to=parent_id if in_reply_to else None), received=at(2))
    return parent, other


# =============================================================================
# RFC 8621 §3: which messages share a Thread
# =============================================================================


@pytest.mark.parametrize("reply_subject", [
    "Re: {}", "RE: {}", "re:{}", "Re: Re: {}", "Re[2]: {}", "Fwd: {}", "Fw: {}", "FWD: Re: {}",
    "[list] Re: {}", "Re: [list] {}", "[list] {}", "  Re:   {}  ", "{} (fwd)", "[Fwd: {}]", "{}",
])
def test_thread_reply_with_references_joins(acct, reply_subject):
    parent, reply = parent_and(acct, reply_subject)
    assert reply["threadId"] == parent["threadId"]
    assert acct.thread(parent["threadId"]) == [parent["id"], reply["id"]]


@pytest.mark.parametrize("parent_subject, reply_subject", [
    ("=?UTF-8?Q?Caf=C3=A9_{}?=", "Re: Caf\u00e9 {}"),  # RFC 2047 decoded before comparing
    ("Long\r\n subject {}", "Re: Long subject {}"),  # folded
    ("Long\tsubject {}", "Re: Long  subject {}"),  # white space ignored (§3)
    ("Hello {}", "Re: [ext] Fwd: [list] hello {}"),
])
def test_thread_subject_forms_join(acct, parent_subject, reply_subject):
    token = unique("s")
    parent_id = unique() + "@test.example"
    parent = acct.add(message(parent_subject.format(token), msgid=parent_id), received=at(1))
    reply = acct.add(message(reply_subject.format(token), in_reply_to=parent_id,
                             references=[parent_id]), received=at(2))
    assert reply["threadId"] == parent["threadId"]


def test_thread_in_reply_to_alone_joins(acct):
    parent, reply = parent_and(acct, "Re: {}", refs=False)
    assert reply["threadId"] == parent["threadId"]


def test_thread_references_alone_join(acct):
    parent, reply = parent_and(acct, "Re: {}", in_reply_to=False)
    assert reply["threadId"] == parent["threadId"]


def test_thread_forward_with_references_joins(acct):
    parent, forward = parent_and(acct, "Fwd: {}", in_reply_to=False)
    assert forward["threadId"] == parent["threadId"]


def test_thread_grandchild_naming_only_the_root_joins(acct):
    base = "Chain " + unique("s")
    root_id, child_id = unique() + "@test.example", unique() + "@test.example"
    root = acct.add(message(base, msgid=root_id), received=at(1))
    child = acct.add(message("Re: " + base, msgid=child_id, in_reply_to=root_id,
                             references=[root_id]), received=at(2))
    grandchild = acct.add(message("Re: " + base, references=[root_id, child_id],
                                  in_reply_to=child_id), received=at(3))
    assert root["threadId"] == child["threadId"] == grandchild["threadId"]
    assert acct.thread(root["threadId"]) == [root["id"], child["id"], grandchild["id"]]


@pytest.mark.parametrize("same_call", [False, True], ids=["separate-imports", "one-import"])
def test_thread_reply_arriving_before_its_parent(acct, same_call):
    # The earlier-stored reply names the parent's Message-ID: the parent joins its thread.
    base = "Minutes " + unique("s")
    parent_id = unique() + "@test.example"
    reply_raw = message("Re: " + base, in_reply_to=parent_id, references=[parent_id])
    parent_raw = message(base, msgid=parent_id)
    if same_call:
        created = acct.add_many({"reply": acct.item(reply_raw, received=at(5)),
                                 "parent": acct.item(parent_raw, received=at(4))})
        reply, parent = created["reply"], created["parent"]
    else:
        reply = acct.add(reply_raw, received=at(5))
        parent = acct.add(parent_raw, received=at(4))
    assert parent["threadId"] == reply["threadId"]
    assert acct.thread(reply["threadId"]) == [parent["id"], reply["id"]]  # oldest first


@pytest.mark.parametrize("reply_subject", ["Lunch on Friday?", "Re: Lunch on Friday?",
                                           "Fwd: Something else entirely"])
def test_thread_broken_references_do_not_join(acct, reply_subject):
    # §3 condition 2: a different base subject starts a new conversation.
    parent, other = parent_and(acct, reply_subject)
    assert other["threadId"] != parent["threadId"]
    assert acct.thread(parent["threadId"]) == [parent["id"]]
    assert acct.thread(other["threadId"]) == [other["id"]]


def test_thread_broken_reference_before_parent_does_not_join(acct):
    base = "Budget " + unique("s")
    parent_id = unique() + "@test.example"
    other = acct.add(message("Holiday photos", references=[parent_id]), received=at(1))
    parent = acct.add(message(base, msgid=parent_id), received=at(2))
    assert other["threadId"] != parent["threadId"]


@pytest.mark.parametrize("subject", ["{}", "Re: {}"])
def test_thread_same_subject_strangers_do_not_join(acct, subject):
    # §3 condition 1: no shared message id, no thread, whatever the subject.
    parent, stranger = parent_and(acct, subject, refs=False, in_reply_to=False)
    assert stranger["threadId"] != parent["threadId"]
    assert acct.thread(parent["threadId"]) == [parent["id"]]


def test_thread_unknown_references_start_a_thread(acct):
    created = acct.add(message("Re: Orphan " + unique("s"),
                               references=[unique() + "@nowhere.example"]))
    assert acct.thread(created["threadId"]) == [created["id"]]


# =============================================================================
# RFC 8621 §3: Thread objects, Thread/get, Thread/changes
# =============================================================================


def test_thread_email_ids_oldest_received_first(acct):
    base = "Order " + unique("s")
    root_id = unique() + "@test.example"
    refs = {"references": [root_id], "in_reply_to": root_id}
    # Imported in an order that is neither receivedAt order nor its reverse.
    middle = acct.add(message("Re: " + base, **refs), received=at(20))
    root = acct.add(message(base, msgid=root_id), received=at(10))
    newest = acct.add(message("Re: " + base, **refs), received=at(30))
    early = acct.add(message("Re: " + base, **refs), received=at(15))
    assert len({root["threadId"], middle["threadId"], newest["threadId"],
                early["threadId"]}) == 1
    assert acct.thread(root["threadId"]) == [root["id"], early["id"], middle["id"],
                                              newest["id"]]


def test_thread_import_thread_id_matches_email_get(acct):
    parent, reply = parent_and(acct, "Re: {}")
    for created in (parent, reply):
        assert acct.thread_of(created["id"]) == created["threadId"]
    resp = acct.ok("Thread/get", ids=[parent["threadId"]])
    assert resp["list"] == [{"id": parent["threadId"], "emailIds": [parent["id"], reply["id"]]}]


def test_spec_8621_3_1_1_thread_get_example(acct):
    # Two threads, the first with two Emails (eaa623, f782cbb), the second with one.
    first, second_email = parent_and(acct, "Re: {}")
    lone = acct.add(message("Alone " + unique("s")), received=at(3))
    resp = acct.client.request([["Thread/get", {
        "accountId": acct.id, "ids": [first["threadId"], lone["threadId"]]}, "#1"]])
    listed = resp["methodResponses"][0][1]["list"]
    listed.sort(key=lambda t: t["id"] != first["threadId"])  # RFC 8620 §5.1: any order
    expect(resp["methodResponses"], [["Thread/get", {
        "accountId": acct.id,
        "state": Var("state"),
        "list": [
            {"id": first["threadId"], "emailIds": [first["id"], second_email["id"]]},
            {"id": lone["threadId"], "emailIds": [lone["id"]]},
        ],
        "notFound": [],
    }, "#1"]])


def test_thread_get_unknown_ids_not_found(acct):
    lone = acct.add(message("Alone " + unique("s")))
    resp = acct.ok("Thread/get", ids=[lone["threadId"], "T999999999", "f41u44"])
    assert resp["list"] == [{"id": lone["threadId"], "emailIds": [lone["id"]]}]
    assert sorted(resp["notFound"]) == sorted(["T999999999", "f41u44"])


def test_thread_get_properties_id_always_returned(acct):
    lone = acct.add(message("Alone " + unique("s")))
    resp = acct.ok("Thread/get", ids=[lone["threadId"]], properties=["emailIds"])
    assert resp["list"] == [{"id": lone["threadId"], "emailIds": [lone["id"]]}]


def test_thread_changes_new_thread_then_joined_thread(acct):
    since = acct.state("Thread")
    base = "Changes " + unique("s")
    parent_id = unique() + "@test.example"
    parent = acct.add(message(base, msgid=parent_id), received=at(1))
    assert acct.changes("Thread", since) == ([parent["threadId"]], [], [])
    since = acct.state("Thread")
    reply = acct.add(message("Re: " + base, references=[parent_id]), received=at(2))
    assert reply["threadId"] == parent["threadId"]
    # RFC 8620 §5.2: the Thread's emailIds changed, so it is "updated".
    assert acct.changes("Thread", since) == ([], [parent["threadId"]], [])
    after = acct.state("Thread")
    assert after != since
    assert acct.changes("Thread", after) == ([], [], [])


def test_thread_changes_when_its_emails_are_destroyed(server):
    # An Email removed from its only Mailbox is destroyed (RFC 8621 §2.5, §2): its thread
    # loses it (updated), and a thread left with no Emails is destroyed.
    acct = new_account(server, "threadgone")
    doomed = acct.mailbox("Doomed")
    base = "Gone " + unique("s")
    parent_id = unique() + "@test.example"
    parent = acct.add(message(base, msgid=parent_id), mailboxes=["inbox"], received=at(1))
    reply = acct.add(message("Re: " + base, references=[parent_id]), mailboxes=[doomed],
                     received=at(2))
    lone = acct.add(message("Alone " + unique("s")), mailboxes=[doomed], received=at(3))
    assert reply["threadId"] == parent["threadId"]
    since = acct.state("Thread")
    acct.destroy_mailbox(doomed)
    assert acct.changes("Thread", since) == ([], [parent["threadId"]], [lone["threadId"]])
    resp = acct.ok("Thread/get", ids=[parent["threadId"], lone["threadId"]])
    assert resp["list"] == [{"id": parent["threadId"], "emailIds": [parent["id"]]}]
    assert resp["notFound"] == [lone["threadId"]]


def test_thread_destroyed_parent_does_not_attract_replies(server):
    # A destroyed Email is gone: a later reply to it has nothing to join.
    acct = new_account(server, "threadgone2")
    doomed = acct.mailbox("Doomed")
    base = "Ghost " + unique("s")
    parent_id = unique() + "@test.example"
    parent = acct.add(message(base, msgid=parent_id), mailboxes=[doomed], received=at(1))
    acct.destroy_mailbox(doomed)
    reply = acct.add(message("Re: " + base, references=[parent_id]), received=at(2))
    assert acct.thread(reply["threadId"]) == [reply["id"]]  # a live thread of its own
