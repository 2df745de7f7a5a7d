"""Mailboxes with mail in them: RFC 8621 §2 counts, §2.2 updatedProperties, §2.5 destroy.

Everything goes over HTTP to a real `jmapd.py serve` (conftest.py). Mail enters as a
client would put it there: raw RFC 5322 messages uploaded and added with Email/import
(§4.8), or composed with Email/set create (§4.6); it is moved, marked and destroyed
with Email/set update/destroy (mailboxIds and keywords patches, §4.6).

Covered:
  * the §2.6 example "an Email is marked read": Mailbox/changes (updatedProperties) and
    two Mailbox/get calls with #ids / #properties back-references; updatedProperties
    null once a Mailbox is also renamed (§2.2);
  * totalEmails, unreadEmails, totalThreads, unreadThreads (§2) through threads, reads,
    moves, copies, destroys and new replies; $draft is never unread; the trash rule of
    unreadThreads both ways. Every step is checked against hand-computed numbers, against
    an independent recount from Email/get (the §2 "quality implementation" that jmapd
    documents), against Email/query inMailbox, and against Mailbox/changes;
  * Mailbox/set destroy of a Mailbox holding mail: mailboxHasEmail, and
    onDestroyRemoveEmails (§2.5) with Email/get, Email/changes, Thread/get and the
    remaining Mailboxes' counts;
  * the §2.6 "rename one Mailbox and destroy another" example with mail in the Mailbox
    that cannot be destroyed (the Inbox: forbidden; any other: mailboxHasEmail);
  * Email/query inMailbox and Email/queryChanges after moving and copying (RFC 8620 §5.6).
"""

import itertools

import pytest

from test_generic import Var, expect, set_response
from test_thread import MailAccount, at, message, unique

COUNTS = ("totalEmails", "unreadEmails", "totalThreads", "unreadThreads")
ZERO = (0, 0, 0, 0)
BY_RECEIVED = [{"property": "receivedAt"}]


class Account(MailAccount):
    """A fresh account; Mailboxes by role or by the name a test gave them (self.box)."""

    def __init__(self, client):
        super().__init__(client)
        self.topics = {}  # thread key -> (Message-ID of its first message, subject)
        self.hours = itertools.count(1)
        self.last = None  # (Mailbox state, counts) at the previous check()

    def new_mailbox(self, name):
        self.box[name] = self.mailbox(name)
        return self.box[name]

    def name_of(self, mailbox_id):
        return next((k for k, v in self.box.items() if v == mailbox_id), mailbox_id)

    def post(self, topic, mailboxes=("inbox",), keywords=()):
        """Import one message: the first of `topic` starts a thread, later ones reply to it
        (In-Reply-To, References and "Re: " + the same subject, RFC 8621 §3)."""
        if topic not in self.topics:
            msgid = unique() + "@test.example"
            self.topics[topic] = (msgid, f"Topic {topic} {unique('s')}")
            raw = message(self.topics[topic][1], msgid=msgid)
        else:
            msgid, subject = self.topics[topic]
            raw = message("Re: " + subject, in_reply_to=msgid, references=[msgid])
        return self.add(raw, mailboxes, keywords, at(next(self.hours)))["id"]

    # ---- Email/set ----

    def email_set(self, **args):
        resp = self.ok("Email/set", **args)
        for key in ("notCreated", "notUpdated", "notDestroyed"):
            assert resp[key] is None, resp
        return resp

    def update(self, email_id, patch):
        resp = self.email_set(update={email_id: patch})
        assert resp["updated"] == {email_id: None}, resp
        return resp

    def move(self, email_id, source, target):
        """Move with a PatchObject on mailboxIds (RFC 8621 §4.6 / RFC 8620 §5.3)."""
        self.update(email_id, {f"mailboxIds/{self.box[source]}": None,
                               f"mailboxIds/{self.box[target]}": True})

    # ---- counts ----

    def boxes(self):
        return self.ok("Mailbox/get", ids=None, properties=["role", *COUNTS])

    def counts(self):
        """Mailbox name/role -> (totalEmails, unreadEmails, totalThreads, unreadThreads)."""
        return {self.name_of(b["id"]): tuple(b[c] for c in COUNTS)
                for b in self.boxes()["list"]}

    def emails(self):
        ids = self.ok("Email/query")["ids"]
        return self.ok("Email/get", ids=ids,
                       properties=["threadId", "mailboxIds", "keywords"])["list"]

    def check(self, **expected):
        """The counts are exactly `expected` (other Mailboxes: zero), agree with a recount
        from the Emails themselves, with Email/query inMailbox, and Mailbox/changes since
        the previous check() names every Mailbox whose counts moved."""
        got = self.boxes()
        counts = {self.name_of(b["id"]): tuple(b[c] for c in COUNTS) for b in got["list"]}
        want = {name: ZERO for name in counts}
        want.update(expected)
        assert counts == want
        emails = self.emails()
        assert counts == {self.name_of(k): v
                          for k, v in rfc_counts(got["list"], emails).items()}
        queries = [["Email/query", {"accountId": self.id, "filter": {"inMailbox": b["id"]}},
                    b["id"]] for b in got["list"]]
        for name, args, box_id in self.client.request(queries)["methodResponses"]:
            assert name == "Email/query"
            assert sorted(args["ids"]) == sorted(
                e["id"] for e in emails if box_id in e["mailboxIds"]), self.name_of(box_id)
        if self.last is not None:
            since, before = self.last
            changes = self.ok("Mailbox/changes", sinceState=since)
            moved = sorted(name for name in counts if counts[name] != before.get(name))
            assert changes["created"] == [] and changes["destroyed"] == [], changes
            # A Mailbox whose counts went and came back within the span may be listed too
            # (RFC 8620 §5.2 allows naming records that ended unchanged).
            updated = {self.name_of(i) for i in changes["updated"]}
            assert set(moved) <= updated <= set(counts), (moved, updated)
            if updated:  # RFC 8621 §2.2: only the counts changed
                assert sorted(changes["updatedProperties"]) == sorted(COUNTS), changes
            assert changes["newState"] == got["state"]
        self.last = (got["state"], counts)
        return counts


def is_unread(email):
    """RFC 8621 §2 unreadEmails: neither "$seen" nor "$draft" (keywords: any case)."""
    keywords = {k.lower() for k in email["keywords"]}
    return "$seen" not in keywords and "$draft" not in keywords


def rfc_counts(boxes, emails):
    """RFC 8621 §2 counts, unreadThreads as the "quality implementation" with the trash
    rule: a Thread is unread for a Mailbox if one of its Emails is in that Mailbox and one
    (maybe another) is unread; Emails only in the trash are ignored for other Mailboxes,
    Emails not in the trash are ignored for the trash."""
    trash = {b["id"] for b in boxes if b["role"] == "trash"}
    out = {}
    for box in boxes:
        here = box["id"]
        inside = [e for e in emails if here in e["mailboxIds"]]
        threads = {e["threadId"] for e in inside}
        if here in trash:
            def counted(e):
                return here in e["mailboxIds"]
        else:
            def counted(e):
                return not set(e["mailboxIds"]) <= trash
        unread_threads = {e["threadId"] for e in emails
                          if e["threadId"] in threads and is_unread(e) and counted(e)}
        out[here] = (len(inside), sum(map(is_unread, inside)), len(threads),
                     len(unread_threads))
    return out


@pytest.fixture
def acct(client):
    return Account(client)


def ref(result_of, name, path):
    return {"resultOf": result_of, "name": name, "path": path}


# =============================================================================
# RFC 8621 §2.6: "Now suppose an Email is marked read ..." (§2.2 updatedProperties)
# =============================================================================


@pytest.mark.parametrize("marked, unread_threads", [
    ("lone", 1),  # its thread has no other unread Email: one unread thread less
    ("parent", 2),  # its reply is still unread, so the thread stays unread
], ids=["lone-email", "thread-stays-unread"])
def test_spec_8621_2_6_email_marked_read(acct, marked, unread_threads):
    inbox = acct.box["inbox"]
    ids = {"parent": acct.post("A"), "reply": acct.post("A"), "lone": acct.post("B"),
           "read": acct.post("C", keywords=["$seen"])}
    assert acct.counts()["inbox"] == (4, 3, 3, 2)
    since = acct.boxes()["state"]
    resp = acct.email_set(update={ids[marked]: {"keywords/$seen": True}})
    assert resp["updated"] == {ids[marked]: None}
    account = acct.id
    responses = acct.client.request([
        ["Mailbox/changes", {"accountId": account, "sinceState": since}, "0"],
        ["Mailbox/get", {"accountId": account,
                         "#ids": ref("0", "Mailbox/changes", "/created")}, "1"],
        ["Mailbox/get", {"accountId": account,
                         "#ids": ref("0", "Mailbox/changes", "/updated"),
                         "#properties": ref("0", "Mailbox/changes", "/updatedProperties")},
         "2"],
    ])["methodResponses"]
    # The RFC lists the four in this order but does not fix one: compared as a set.
    updated_properties = responses[0][1].pop("updatedProperties")
    assert sorted(updated_properties) == sorted(COUNTS)
    bound = expect(responses, [
        ["Mailbox/changes", {
            "accountId": account, "oldState": since, "newState": Var("new"),
            "hasMoreChanges": False, "created": [], "updated": [inbox], "destroyed": [],
        }, "0"],
        ["Mailbox/get", {"accountId": account, "state": Var("new"), "list": [],
                         "notFound": []}, "1"],
        ["Mailbox/get", {"accountId": account, "state": Var("new"), "list": [{
            "id": inbox, "totalEmails": 4, "unreadEmails": 2, "totalThreads": 3,
            "unreadThreads": unread_threads,
        }], "notFound": []}, "2"],
    ])
    assert bound["new"] != since
    assert bound["new"] == acct.boxes()["state"]


@pytest.mark.parametrize("renamed", ["same", "other"])
def test_mailbox_changes_updated_properties_null_when_also_renamed(acct, renamed):
    # RFC 8621 §2.2: updatedProperties lists the counts only if nothing else changed.
    work = acct.new_mailbox("Work")
    email = acct.post("A", mailboxes=["Work"])
    since = acct.boxes()["state"]
    acct.update(email, {"keywords/$seen": True})
    renamed_id = work if renamed == "same" else acct.box["archive"]
    resp = acct.ok("Mailbox/set", update={renamed_id: {"name": "Renamed"}})
    assert resp["updated"] == {renamed_id: None}
    responses = acct.client.request([
        ["Mailbox/changes", {"accountId": acct.id, "sinceState": since}, "0"],
        ["Mailbox/get", {"accountId": acct.id,
                         "#ids": ref("0", "Mailbox/changes", "/updated"),
                         "#properties": ref("0", "Mailbox/changes", "/updatedProperties")},
         "1"],
    ])["methodResponses"]
    changes = responses[0][1]
    assert changes["updatedProperties"] is None
    assert sorted(changes["updated"]) == sorted({work, renamed_id})
    assert (changes["created"], changes["destroyed"]) == ([], [])
    got = {m["id"]: m for m in responses[1][1]["list"]}
    assert sorted(got) == sorted({work, renamed_id})
    for box in got.values():  # null #properties: every property
        assert set(box) == {"id", "name", "parentId", "role", "sortOrder", *COUNTS,
                            "myRights", "isSubscribed"}
    assert got[renamed_id]["name"] == "Renamed"
    assert tuple(got[work][c] for c in COUNTS) == (1, 0, 1, 0)
    # From the state after the rename, a counts-only change is again reported as such.
    since = responses[0][1]["newState"]
    acct.update(email, {"keywords/$seen": None})
    changes = acct.ok("Mailbox/changes", sinceState=since)
    assert (changes["updated"], sorted(changes["updatedProperties"])) == ([work], sorted(COUNTS))


# =============================================================================
# RFC 8621 §2 counts
# =============================================================================


def test_mailbox_counts_threads_reads_moves_and_destroys(acct):
    acct.new_mailbox("Work")
    p1 = acct.post("T1")  # T1: p1 Inbox, unread; r1 Inbox + Work, read
    r1 = acct.post("T1", mailboxes=["inbox", "Work"], keywords=["$seen"])
    p2 = acct.post("T2", keywords=["$seen"])  # T2: p2 Inbox, read; r2 Work, unread
    r2 = acct.post("T2", mailboxes=["Work"])
    s3 = acct.post("T3")  # T3: s3 Inbox, unread
    acct.post("T4", mailboxes=["Work"], keywords=["$seen"])  # T4: d4 Work, read
    threads = {e["id"]: e["threadId"] for e in acct.emails()}
    assert threads[p1] == threads[r1] and threads[p2] == threads[r2]
    assert len(set(threads.values())) == 4
    # unreadThreads: a thread counts if one of its Emails is here and one is unread -- not
    # necessarily the same one (T2 for the Inbox: r2 is in Work; T1 for Work: p1).
    acct.check(inbox=(4, 2, 3, 3), Work=(3, 1, 3, 2))

    acct.update(r2, {"keywords/$seen": True})  # T2 all read: both Mailboxes lose it
    acct.check(inbox=(4, 2, 3, 2), Work=(3, 0, 3, 1))

    acct.update(r1, {f"mailboxIds/{acct.box['Work']}": None})  # r1 leaves Work
    acct.check(inbox=(4, 2, 3, 2), Work=(2, 0, 2, 0))

    acct.move(p2, "inbox", "Work")
    acct.check(inbox=(3, 2, 2, 2), Work=(3, 0, 2, 0))

    acct.update(s3, {f"mailboxIds/{acct.box['Work']}": True})  # now in both
    acct.check(inbox=(3, 2, 2, 2), Work=(4, 1, 3, 1))

    resp = acct.email_set(destroy=[p1])
    assert resp["destroyed"] == [p1]
    acct.check(inbox=(2, 1, 2, 1), Work=(4, 1, 3, 1))

    r2b = acct.post("T2")  # a new unread reply in T2 arrives in the Inbox
    assert acct.thread_of(r2b) == threads[r2]
    acct.check(inbox=(3, 2, 3, 2), Work=(4, 1, 3, 2))

    acct.update(s3, {"mailboxIds": {acct.box["Work"]: True}})  # whole mailboxIds replaced
    acct.check(inbox=(2, 1, 2, 1), Work=(4, 1, 3, 2))

    acct.update(r2b, {"keywords": {"$seen": True, "$flagged": True}})  # whole keywords
    acct.check(inbox=(2, 0, 2, 0), Work=(4, 1, 3, 1))

    resp = acct.email_set(destroy=[r1, r2, r2b])
    assert sorted(resp["destroyed"]) == sorted([r1, r2, r2b])
    acct.check(Work=(3, 1, 3, 1))


def test_mailbox_counts_draft_is_never_unread(acct):
    # RFC 8621 §2 unreadEmails: "neither the "$seen" keyword nor the "$draft" keyword".
    drafts = acct.box["drafts"]
    resp = acct.email_set(create={"d": {
        "mailboxIds": {drafts: True}, "keywords": {"$draft": True},
        "from": [{"name": "Me", "email": acct.client.username}],
        "subject": "Unfinished " + unique("s"),
        "textBody": [{"partId": "1", "type": "text/plain"}],
        "bodyValues": {"1": {"value": "To be continued."}},
    }})
    draft = resp["created"]["d"]["id"]
    acct.post("A", keywords=["$Draft"])  # keywords are case-insensitive (RFC 8621 §4.1.1)
    acct.check(drafts=(1, 0, 1, 0), inbox=(1, 0, 1, 0))

    unread = acct.post("B")
    acct.check(drafts=(1, 0, 1, 0), inbox=(2, 1, 2, 1))

    acct.update(draft, {"keywords/$draft": None})  # no longer a draft, never seen
    acct.check(drafts=(1, 1, 1, 1), inbox=(2, 1, 2, 1))

    acct.update(draft, {"keywords": {"$draft": True, "$seen": True}})
    acct.check(drafts=(1, 0, 1, 0), inbox=(2, 1, 2, 1))

    # A draft reply composed with Email/set joins B's thread: Drafts now shows that
    # thread, which is unread because of B in the Inbox.
    msgid, subject = acct.topics["B"]
    resp = acct.email_set(create={"r": {
        "mailboxIds": {drafts: True}, "keywords": {"$draft": True},
        "from": [{"name": "Me", "email": acct.client.username}],
        "subject": "Re: " + subject, "inReplyTo": [msgid], "references": [msgid],
        "textBody": [{"partId": "1", "type": "text/plain"}],
        "bodyValues": {"1": {"value": "Agreed."}},
    }})
    assert resp["created"]["r"]["threadId"] == acct.thread_of(unread)
    acct.check(drafts=(2, 0, 2, 1), inbox=(2, 1, 2, 1))

    acct.update(unread, {"keywords/$seen": True})
    acct.check(drafts=(2, 0, 2, 0), inbox=(2, 0, 2, 0))


def test_mailbox_counts_trash_rule(acct):
    # RFC 8621 §2 unreadThreads: Emails only in the trash are ignored for other Mailboxes,
    # Emails not in the trash are ignored for the trash.
    a = acct.post("T", keywords=["$seen"])
    b = acct.post("T")
    acct.post("T", mailboxes=["archive"], keywords=["$seen"])
    acct.check(inbox=(2, 1, 1, 1), archive=(1, 0, 1, 1))

    # The RFC's example: an unread Email in the trash, a read one in the Inbox.
    acct.move(b, "inbox", "trash")
    acct.check(inbox=(1, 0, 1, 0), archive=(1, 0, 1, 0), trash=(1, 1, 1, 1))

    # The reverse: the unread Email outside the trash does not make the trash unread.
    acct.email_set(update={b: {"keywords/$seen": True}, a: {"keywords/$seen": None}})
    acct.check(inbox=(1, 1, 1, 1), archive=(1, 0, 1, 1), trash=(1, 0, 1, 0))

    # In the trash *and* the Inbox: it counts for both.
    acct.email_set(update={a: {"keywords/$seen": True},
                           b: {"keywords/$seen": None, f"mailboxIds/{acct.box['inbox']}": True}})
    acct.check(inbox=(2, 1, 1, 1), archive=(1, 0, 1, 1), trash=(1, 1, 1, 1))

    acct.update(b, {f"mailboxIds/{acct.box['inbox']}": None})  # back to the trash only
    acct.check(inbox=(1, 0, 1, 0), archive=(1, 0, 1, 0), trash=(1, 1, 1, 1))

    acct.email_set(destroy=[b])  # emptying the trash
    acct.check(inbox=(1, 0, 1, 0), archive=(1, 0, 1, 0))


def test_mailbox_counts_trash_role_removed(acct):
    acct.post("T", keywords=["$seen"])
    b = acct.post("T", mailboxes=["trash"])
    acct.check(inbox=(1, 0, 1, 0), trash=(1, 1, 1, 1))
    resp = acct.ok("Mailbox/set", update={acct.box["trash"]: {"role": None}})
    assert resp["updated"] == {acct.box["trash"]: None}
    acct.last = None  # a role change: not a counts-only change
    # No trash any more: b is an unread Email of the thread like any other.
    acct.check(inbox=(1, 0, 1, 1), trash=(1, 1, 1, 1))
    acct.update(b, {"keywords/$seen": True})
    acct.check(inbox=(1, 0, 1, 0), trash=(1, 0, 1, 0))


def test_mailbox_counts_trash_role_given(acct):
    acct.ok("Mailbox/set", destroy=[acct.box.pop("trash")])
    bin_id = acct.new_mailbox("Bin")
    acct.post("T", keywords=["$seen"])
    b = acct.post("T", mailboxes=["Bin"])
    acct.check(inbox=(1, 0, 1, 1), Bin=(1, 1, 1, 1))
    resp = acct.ok("Mailbox/set", update={bin_id: {"role": "trash"}})
    assert resp["updated"] == {bin_id: None}
    acct.last = None
    acct.check(inbox=(1, 0, 1, 0), Bin=(1, 1, 1, 1))  # RFC 8621 §2 trash rule 1
    acct.update(b, {"keywords/$seen": True})
    acct.check(inbox=(1, 0, 1, 0), Bin=(1, 0, 1, 0))


# =============================================================================
# Mailbox/set destroy with mail in it (RFC 8621 §2.5 onDestroyRemoveEmails)
# =============================================================================


def states(acct):
    return {t: acct.state(t) for t in ("Mailbox", "Email", "Thread")}


def test_mailbox_destroy_with_emails(acct):
    work = acct.new_mailbox("Work")
    only = acct.post("T1", mailboxes=["Work"])  # only in Work: destroyed with it
    reply = acct.post("T1", keywords=["$seen"])  # its thread's read reply in the Inbox
    both = acct.post("T2", mailboxes=["Work", "inbox"])  # stays, in the Inbox only
    archived = acct.post("T3", mailboxes=["Work", "archive"], keywords=["$seen"])
    acct.check(inbox=(2, 1, 2, 2), Work=(3, 2, 3, 2), archive=(1, 0, 1, 0))
    before = states(acct)
    email_ids = [only, reply, both, archived]

    for extra in ({}, {"onDestroyRemoveEmails": False}):
        resp = acct.ok("Mailbox/set", destroy=[work], **extra)
        expect([resp], [set_response(acct.id, before["Mailbox"], before["Mailbox"],
                                     notDestroyed={work: {"type": "mailboxHasEmail"}})])
        assert states(acct) == before
        assert len(acct.ok("Email/get", ids=email_ids, properties=["id"])["list"]) == 4

    resp = acct.ok("Mailbox/set", destroy=[work], onDestroyRemoveEmails=True)
    expect([resp], [set_response(acct.id, before["Mailbox"], Var("new"), destroyed=[work])])
    got = acct.ok("Email/get", ids=email_ids, properties=["mailboxIds"])
    assert got["notFound"] == [only]
    assert sorted(got["list"], key=lambda e: email_ids.index(e["id"])) == [
        {"id": reply, "mailboxIds": {acct.box["inbox"]: True}},
        {"id": both, "mailboxIds": {acct.box["inbox"]: True}},
        {"id": archived, "mailboxIds": {acct.box["archive"]: True}},
    ]
    changes = acct.ok("Email/changes", sinceState=before["Email"])
    assert (changes["created"], sorted(changes["updated"]), changes["destroyed"]) == (
        [], sorted([both, archived]), [only])
    assert acct.thread(acct.thread_of(reply)) == [reply]
    mailbox_changes = acct.ok("Mailbox/changes", sinceState=before["Mailbox"])
    # The Inbox loses T1's unread Email: one unread thread less. The Archive is unchanged.
    assert (mailbox_changes["created"], mailbox_changes["updated"],
            mailbox_changes["destroyed"]) == ([], [acct.box["inbox"]], [work])
    assert acct.ok("Mailbox/get", ids=[work])["notFound"] == [work]
    del acct.box["Work"]
    acct.last = None
    acct.check(inbox=(2, 1, 2, 1), archive=(1, 0, 1, 0))


def test_mailbox_destroy_two_mailboxes_sharing_emails(acct):
    a, b = acct.new_mailbox("A"), acct.new_mailbox("B")
    in_both = acct.post("T1", mailboxes=["A", "B"])
    in_a = acct.post("T2", mailboxes=["A"])
    kept = acct.post("T3", mailboxes=["B", "inbox"])
    gone_threads = [acct.thread_of(in_both), acct.thread_of(in_a)]
    since = acct.state("Email")
    resp = acct.ok("Mailbox/set", destroy=[a, b], onDestroyRemoveEmails=True)
    assert (sorted(resp["destroyed"]), resp["notDestroyed"]) == (sorted([a, b]), None)
    got = acct.ok("Email/get", ids=[in_both, in_a, kept], properties=["mailboxIds"])
    assert got["list"] == [{"id": kept, "mailboxIds": {acct.box["inbox"]: True}}]
    assert sorted(got["notFound"]) == sorted([in_both, in_a])
    changes = acct.ok("Email/changes", sinceState=since)
    assert (changes["created"], changes["updated"], sorted(changes["destroyed"])) == (
        [], [kept], sorted([in_both, in_a]))
    got = acct.ok("Thread/get", ids=gone_threads)  # their only Emails are gone
    assert (got["list"], sorted(got["notFound"])) == ([], sorted(gone_threads))
    del acct.box["A"], acct.box["B"]
    acct.check(inbox=(1, 1, 1, 1))


# =============================================================================
# RFC 8621 §2.6: "rename one Mailbox and destroy another", the destroy failing
# =============================================================================


@pytest.mark.parametrize("remove_emails", [None, True], ids=["plain", "onDestroyRemoveEmails"])
def test_spec_8621_2_6_rename_and_destroy_inbox_holding_mail(acct, remove_emails):
    inbox = acct.box["inbox"]
    email = acct.post("A")
    important = acct.new_mailbox("Important mail")
    state = acct.boxes()["state"]
    email_state = acct.state("Email")
    args = {"ifInState": state, "update": {important: {"name": "Maybe important mail"}},
            "destroy": [inbox]}
    if remove_emails is not None:
        args["onDestroyRemoveEmails"] = remove_emails
    resp = acct.ok("Mailbox/set", **args)
    # The RFC's example answer: the rename succeeds, the destroy is "forbidden" (the
    # Inbox has mayDelete false), whatever onDestroyRemoveEmails says.
    expect([resp], [set_response(acct.id, state, Var("new"), updated={important: None},
                                 notDestroyed={inbox: {"type": "forbidden"}})])
    assert acct.ok("Email/get", ids=[email], properties=["mailboxIds"])["list"] == [
        {"id": email, "mailboxIds": {inbox: True}}]
    assert acct.state("Email") == email_state
    acct.box["Maybe important mail"] = acct.box.pop("Important mail")
    acct.check(inbox=(1, 1, 1, 1))
    assert acct.ok("Mailbox/get", ids=[important], properties=["name"])["list"] == [
        {"id": important, "name": "Maybe important mail"}]


def test_spec_8621_2_6_rename_and_destroy_mailbox_holding_mail(acct):
    important = acct.new_mailbox("Important mail")
    full = acct.new_mailbox("Full")
    email = acct.post("A", mailboxes=["Full"], keywords=["$seen"])
    state = acct.boxes()["state"]
    resp = acct.ok("Mailbox/set", ifInState=state,
                   update={important: {"name": "Maybe important mail"}}, destroy=[full])
    expect([resp], [set_response(acct.id, state, Var("new"), updated={important: None},
                                 notDestroyed={full: {"type": "mailboxHasEmail"}})])
    assert acct.ok("Email/get", ids=[email], properties=["mailboxIds"])["list"] == [
        {"id": email, "mailboxIds": {full: True}}]
    acct.check(Full=(1, 0, 1, 0))


# =============================================================================
# Email/query inMailbox and Email/queryChanges when mail moves (RFC 8620 §5.6)
# =============================================================================


def splice(old_ids, changes):
    """RFC 8620 §5.6: take out "removed", put in "added" by ascending index."""
    ids = [i for i in old_ids if i not in set(changes["removed"])]
    for item in sorted(changes["added"], key=lambda a: a["index"]):
        ids.insert(item["index"], item["id"])
    return ids


def test_email_query_in_mailbox_and_query_changes_after_move(acct):
    inbox, archive = acct.box["inbox"], acct.box["archive"]
    e1, e2, e3 = acct.post("A"), acct.post("B"), acct.post("C")  # oldest first
    e4 = acct.post("D", mailboxes=["archive"])

    def query(box):
        return acct.ok("Email/query", filter={"inMailbox": box}, sort=BY_RECEIVED,
                       calculateTotal=True)

    def query_changes(box, old):
        return acct.ok("Email/queryChanges", filter={"inMailbox": box}, sort=BY_RECEIVED,
                       sinceQueryState=old["queryState"], calculateTotal=True)

    old_inbox, old_archive = query(inbox), query(archive)
    expect([old_inbox, old_archive], [
        {"accountId": acct.id, "queryState": Var("q"), "canCalculateChanges": True,
         "position": 0, "ids": [e1, e2, e3], "total": 3},
        {"accountId": acct.id, "queryState": Var("q"), "canCalculateChanges": True,
         "position": 0, "ids": [e4], "total": 1},
    ])

    acct.move(e2, "inbox", "archive")
    new_inbox, new_archive = query(inbox), query(archive)
    assert (new_inbox["ids"], new_archive["ids"]) == ([e1, e3], [e2, e4])
    assert new_inbox["queryState"] != old_inbox["queryState"]
    changes = query_changes(inbox, old_inbox)
    assert changes == {"accountId": acct.id, "oldQueryState": old_inbox["queryState"],
                       "newQueryState": new_inbox["queryState"], "removed": [e2],
                       "added": [], "total": 2}
    changes = query_changes(archive, old_archive)
    assert changes["added"] == [{"id": e2, "index": 0}]
    # e2 was not in the old results; RFC 8620 §5.6 lets it be named in "removed" anyway.
    assert set(changes["removed"]) <= {e2}
    assert (changes["newQueryState"], changes["total"]) == (new_archive["queryState"], 2)
    assert splice(old_archive["ids"], changes) == [e2, e4]

    # Copied into the Archive as well (still in the Inbox): the Inbox keeps it in place.
    acct.update(e3, {f"mailboxIds/{archive}": True})
    changes = query_changes(inbox, new_inbox)
    assert splice(new_inbox["ids"], changes) == [e1, e3]
    assert set(changes["removed"]) <= {e3}
    assert changes["added"] in ([], [{"id": e3, "index": 1}])
    if e3 in changes["removed"]:  # mutable filter: removed, then added back (§5.6)
        assert changes["added"] == [{"id": e3, "index": 1}]
    changes = query_changes(archive, new_archive)
    assert changes["added"] == [{"id": e3, "index": 1}]
    assert splice(new_archive["ids"], changes) == [e2, e3, e4] == query(archive)["ids"]

    # From the first state, both moves at once.
    changes = query_changes(inbox, old_inbox)
    assert splice(old_inbox["ids"], changes) == [e1, e3]
    assert e2 in changes["removed"] and e2 not in [a["id"] for a in changes["added"]]
    changes = query_changes(archive, old_archive)
    assert splice(old_archive["ids"], changes) == [e2, e3, e4]

    # Destroyed: gone from every Mailbox's results.
    acct.email_set(destroy=[e3])
    assert query(inbox)["ids"] == [e1] and query(archive)["ids"] == [e2, e4]
    changes = query_changes(archive, old_archive)
    assert splice(old_archive["ids"], changes) == [e2, e4]
    assert e3 not in [a["id"] for a in changes["added"]]
