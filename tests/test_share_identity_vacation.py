"""Account sharing, Identity and VacationResponse, over HTTP and the CLI.

Sharing: `jmapd.py user share|unshare|shares`, the shared account in the grantee's Session
(RFC 8620 §2: accounts, isPersonal, isReadOnly, accountCapabilities; RFC 8621 §1.3.1
mayCreateTopLevelMailbox), accountReadOnly for write methods (RFC 8620 §3.6.2), 403/404
on upload and download (§6.1, §6.2), accountNotFound after unsharing, and Blob/copy
(§6.3) from a shared account, respecting §6.1 ("unreferenced blobs MUST only be
accessible to the uploader, even in shared accounts").

Identity (RFC 8621 §6) and VacationResponse (RFC 8621 §8) through their capabilities
urn:ietf:params:jmap:submission and urn:ietf:params:jmap:vacationresponse.

Every test makes its own users on one server of this module (own data directory).
"""

import itertools
from urllib.parse import quote

import pytest

from conftest import CORE, MAIL, Client, Server, add_user, run_cli
from test_generic import Var, expect, no_descriptions

SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
USING_IDENTITY = [CORE, MAIL, SUBMISSION]
USING_VACATION = [CORE, MAIL, VACATION]
MAILBOX_RIGHTS = ("mayReadItems", "mayAddItems", "mayRemoveItems", "maySetSeen",
                  "maySetKeywords", "mayCreateChild", "mayRename", "mayDelete", "maySubmit")
VACATION_DEFAULT = {"id": "singleton", "isEnabled": False, "fromDate": None, "toDate": None,
                    "subject": None, "textBody": None, "htmlBody": None}
MESSAGE = (b"From: Owner <owner@example.com>\r\n"
           b"To: someone@example.net\r\n"
           b"Subject: shared blob\r\n"
           b"Date: Tue, 14 May 2024 07:15:00 +0000\r\n"
           b"Message-ID: <shared-blob@example.com>\r\n"
           b"\r\n"
           b"Hello from a shared account.\r\n")
_names = itertools.count(1)


# ---- fixtures and helpers ----


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """This module's own server and data directory."""
    data_dir = tmp_path_factory.mktemp("share") / "data"
    add_user(data_dir, "first@example.com")
    server = Server(data_dir).start()
    yield server
    server.stop()


@pytest.fixture
def new_user(srv):
    """new_user(prefix) -> a Client for a freshly added user of this module's server."""

    def make(prefix="user"):
        username = f"{prefix}{next(_names)}@example.com"
        add_user(srv.data_dir, username)
        return Client(srv.url, username)

    return make


def cli(srv, *args):
    return run_cli("user", *args, data_dir=srv.data_dir)


def share(srv, owner, grantee, read_only=False):
    done = cli(srv, "share", owner.username, grantee.username,
               *(["--read-only"] if read_only else []))
    assert done.returncode == 0, done.stderr
    return done


def unshare(srv, owner, grantee):
    done = cli(srv, "unshare", owner.username, grantee.username)
    assert done.returncode == 0, done.stderr
    return done


def shares(srv, username):
    done = cli(srv, "shares", username)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def fresh_session(client):
    """GET the Session again (the Client caches the first one)."""
    r = client.http.get(client.base_url + "/jmap/session", timeout=30)
    assert r.status_code == 200, r.text
    client._session = r.json()
    return client._session


def call_in(client, account_id, name, args, using=(CORE, MAIL, SUBMISSION, VACATION)):
    """One call with an explicit accountId; return [name, arguments] of the response."""
    resp = client.call(name, {"accountId": account_id, **args}, using=list(using))
    return resp[0], no_descriptions(resp[1])


def ok_in(client, account_id, name, args, **kw):
    got, out = call_in(client, account_id, name, args, **kw)
    assert got == name, out
    return out


def error_in(client, account_id, name, args, **kw):
    got, out = call_in(client, account_id, name, args, **kw)
    assert got == "error", out
    return out


def mailboxes(client, account_id):
    return {m["name"]: m for m in ok_in(client, account_id, "Mailbox/get", {"ids": None})["list"]}


def upload(client, account_id, data, media_type="application/octet-stream"):
    url = client.session["uploadUrl"].replace("{accountId}", quote(account_id, safe=""))
    return client.http.post(url, data=data, headers={"Content-Type": media_type}, timeout=30)


def download(client, account_id, blob_id, name="x.bin", media_type="application/octet-stream"):
    url = client.session["downloadUrl"]
    for key, value in (("accountId", account_id), ("blobId", blob_id), ("name", name),
                       ("type", media_type)):
        url = url.replace("{" + key + "}", quote(value, safe=""))
    return client.http.get(url, timeout=30)


def import_message(client, data=MESSAGE):
    """Upload and Email/import a message into the client's own Inbox; return its blobId."""
    r = upload(client, client.account_id, data, "message/rfc822")
    assert r.status_code in (200, 201), r.text
    blob_id = r.json()["blobId"]
    inbox = mailboxes(client, client.account_id)["Inbox"]["id"]
    out = ok_in(client, client.account_id, "Email/import", {"emails": {
        "m": {"blobId": blob_id, "mailboxIds": {inbox: True}}}})
    assert out["notCreated"] is None, out
    return blob_id


def identities(client, account_id=None):
    return ok_in(client, account_id or client.account_id, "Identity/get", {"ids": None},
                 using=USING_IDENTITY)


def identity_set(client, **args):
    return ok_in(client, client.account_id, "Identity/set", args, using=USING_IDENTITY)


def vacation_get(client, **args):
    return ok_in(client, client.account_id, "VacationResponse/get", args,
                 using=USING_VACATION)


def vacation_set(client, **args):
    return ok_in(client, client.account_id, "VacationResponse/set", args,
                 using=USING_VACATION)


# =============================================================================
# user share / unshare / shares (CLI)
# =============================================================================


def test_cli_share_read_only_then_read_write_then_unshare(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    assert shares(srv, owner.username) == []
    done = share(srv, owner, grantee, read_only=True)
    assert done.stdout.strip() == \
        f"{grantee.username} now has {owner.username}'s account (read-only)"
    line = f"{owner.username}\t{grantee.username}\tread-only"
    assert shares(srv, owner.username) == [line]
    assert shares(srv, grantee.username) == [line]  # listed from both ends
    share(srv, owner, grantee)  # again, without --read-only: the mode changes
    line = f"{owner.username}\t{grantee.username}\tread-write"
    assert shares(srv, owner.username) == [line]
    assert shares(srv, grantee.username) == [line]
    share(srv, owner, grantee, read_only=True)  # and back
    assert shares(srv, owner.username) == [f"{owner.username}\t{grantee.username}\tread-only"]
    done = unshare(srv, owner, grantee)
    assert grantee.username in done.stdout and owner.username in done.stdout
    assert shares(srv, owner.username) == []
    assert shares(srv, grantee.username) == []


def test_cli_shares_lists_both_directions_sorted(srv, new_user):
    me, a, b = new_user("me"), new_user("a"), new_user("b")
    share(srv, me, b, read_only=True)
    share(srv, a, me)
    share(srv, me, a)
    share(srv, a, b)  # not involving `me`: not listed for me
    expected = sorted([
        f"{me.username}\t{b.username}\tread-only",
        f"{a.username}\t{me.username}\tread-write",
        f"{me.username}\t{a.username}\tread-write",
    ])
    assert shares(srv, me.username) == expected
    assert shares(srv, b.username) == sorted([f"{me.username}\t{b.username}\tread-only",
                                              f"{a.username}\t{b.username}\tread-write"])


def test_cli_share_errors(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    cases = [
        (("share", owner.username, "nobody-here@example.com"), "nobody-here@example.com"),
        (("share", "nobody-there@example.com", grantee.username), "nobody-there@example.com"),
        (("share", owner.username, owner.username), None),  # with oneself
        (("share", owner.username, owner.username.upper()), None),  # same, other case
        (("unshare", owner.username, grantee.username), None),  # nothing shared yet
        (("unshare", owner.username, "nobody-here@example.com"), "nobody-here@example.com"),
        (("shares", "nobody-there@example.com"), "nobody-there@example.com"),
    ]
    for args, named in cases:
        done = cli(srv, *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("jmapd: "), (args, done.stderr)
        if named:
            assert named in done.stderr, (args, done.stderr)
        assert done.stdout == "", (args, done.stdout)
    assert shares(srv, owner.username) == []
    assert shares(srv, grantee.username) == []


def test_cli_unshare_wrong_direction_refused(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    share(srv, owner, grantee)
    done = cli(srv, "unshare", grantee.username, owner.username)
    assert done.returncode == 1 and done.stderr.startswith("jmapd: "), done
    assert shares(srv, owner.username) == [f"{owner.username}\t{grantee.username}\tread-write"]


def test_cli_user_del_ends_its_shares(srv, new_user):
    owner, grantee, other = new_user("owner"), new_user("grantee"), new_user("other")
    share(srv, owner, grantee)
    share(srv, grantee, other, read_only=True)
    assert owner.account_id in fresh_session(grantee)["accounts"]
    assert run_cli("user", "del", owner.username, data_dir=srv.data_dir).returncode == 0
    assert shares(srv, grantee.username) == [
        f"{grantee.username}\t{other.username}\tread-only"]
    assert set(fresh_session(grantee)["accounts"]) == {grantee.account_id}
    assert run_cli("user", "del", grantee.username, data_dir=srv.data_dir).returncode == 0
    assert shares(srv, other.username) == []
    assert set(fresh_session(other)["accounts"]) == {other.account_id}
    # a user added now (a new account id) is shared with nobody
    newcomer = new_user("newcomer")
    assert newcomer.account_id not in (owner.account_id, grantee.account_id)
    assert shares(srv, newcomer.username) == []
    assert set(fresh_session(other)["accounts"]) == {other.account_id}


# =============================================================================
# The Session (RFC 8620 §2)
# =============================================================================


def test_session_lists_shared_account(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    owner_before = fresh_session(owner)
    before = fresh_session(grantee)
    own_entry = before["accounts"][grantee.account_id]
    assert set(before["accounts"]) == {grantee.account_id}

    share(srv, owner, grantee, read_only=True)
    ro = fresh_session(grantee)
    read_only_caps = {**own_entry["accountCapabilities"]}
    read_only_caps[MAIL] = {**read_only_caps[MAIL], "mayCreateTopLevelMailbox": False}
    assert ro["accounts"] == {
        grantee.account_id: own_entry,
        owner.account_id: {"name": owner.username, "isPersonal": False, "isReadOnly": True,
                           "accountCapabilities": read_only_caps},
    }
    assert ro["state"] != before["state"]
    # the user's own account stays primary
    assert ro["primaryAccounts"] == before["primaryAccounts"]
    assert ro["primaryAccounts"][MAIL] == grantee.account_id

    share(srv, owner, grantee)  # now read-write
    rw = fresh_session(grantee)
    assert rw["accounts"][owner.account_id] == {
        "name": owner.username, "isPersonal": False, "isReadOnly": False,
        "accountCapabilities": own_entry["accountCapabilities"]}
    assert own_entry["accountCapabilities"][MAIL]["mayCreateTopLevelMailbox"] is True
    assert rw["state"] not in (before["state"], ro["state"])

    # the owner's Session does not change: the grantee's account is not theirs to see
    assert fresh_session(owner) == owner_before

    unshare(srv, owner, grantee)
    after = fresh_session(grantee)
    assert set(after["accounts"]) == {grantee.account_id}
    assert after["state"] not in (ro["state"], rw["state"])
    assert fresh_session(owner) == owner_before


def test_session_api_response_reports_new_session_state(srv, new_user):
    """RFC 8620 §3.4: sessionState in every API response; it follows a new share."""
    owner, grantee = new_user("owner"), new_user("grantee")
    first = grantee.request([["Core/echo", {}, "0"]])["sessionState"]
    assert first == fresh_session(grantee)["state"]
    share(srv, owner, grantee, read_only=True)
    second = grantee.request([["Core/echo", {}, "0"]])["sessionState"]
    assert second != first and second == fresh_session(grantee)["state"]


def test_session_submission_and_vacation_capabilities(srv, new_user):
    user = new_user()
    session = fresh_session(user)
    assert session["capabilities"][SUBMISSION] == {}
    assert session["capabilities"][VACATION] == {}
    me = session["primaryAccounts"][MAIL]
    assert session["accounts"][me]["isPersonal"] is True
    assert session["accounts"][me]["name"] == user.username
    assert session["primaryAccounts"][SUBMISSION] == me
    assert session["primaryAccounts"][VACATION] == me
    caps = session["accounts"][me]["accountCapabilities"]
    assert caps[VACATION] == {}
    # RFC 8621 §1.3.2: the submission account capability's two members
    assert set(caps[SUBMISSION]) == {"maxDelayedSend", "submissionExtensions"}
    assert isinstance(caps[SUBMISSION]["maxDelayedSend"], int)
    assert isinstance(caps[SUBMISSION]["submissionExtensions"], dict)


# =============================================================================
# Read-only and read-write shares
# =============================================================================


def test_read_only_share_reads(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    blob_id = import_message(owner)
    mine = ok_in(owner, owner.account_id, "Mailbox/get", {"ids": None})
    share(srv, owner, grantee, read_only=True)
    theirs = ok_in(grantee, owner.account_id, "Mailbox/get", {"ids": None})
    assert theirs["accountId"] == owner.account_id
    assert theirs["state"] == mine["state"]
    strip = [{k: v for k, v in m.items() if k not in ("myRights", "isSubscribed")}
             for m in mine["list"]]
    assert [{k: v for k, v in m.items() if k not in ("myRights", "isSubscribed")}
            for m in theirs["list"]] == strip
    assert {m["name"] for m in theirs["list"]} >= {"Inbox", "Trash"}
    # RFC 8621 §2: myRights are the grantee's: read, nothing else
    only_read = dict.fromkeys(MAILBOX_RIGHTS, False) | {"mayReadItems": True}
    assert [m["myRights"] for m in theirs["list"]] == [only_read] * len(theirs["list"])
    # The owner's mail, Identity and VacationResponse can be read
    emails = ok_in(grantee, owner.account_id, "Email/query", {})
    assert len(emails["ids"]) == 1
    assert identities(grantee, owner.account_id)["list"][0]["email"] == owner.username
    vacation = ok_in(grantee, owner.account_id, "VacationResponse/get", {}, using=USING_VACATION)
    assert vacation["list"] == [VACATION_DEFAULT]
    # and the message itself downloaded (a referenced blob: §6.2)
    r = download(grantee, owner.account_id, blob_id)
    assert r.status_code == 200 and r.content == MESSAGE


def test_read_only_share_refuses_every_write(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    import_message(owner)
    share(srv, owner, grantee, read_only=True)
    acct = owner.account_id
    boxes = mailboxes(owner, acct)
    inbox = boxes["Inbox"]["id"]
    email_id = ok_in(owner, acct, "Email/query", {})["ids"][0]
    # an upload the grantee could name: one of their own account's blobs
    r = upload(grantee, grantee.account_id, MESSAGE, "message/rfc822")
    assert r.status_code in (200, 201), r.text
    own_blob = r.json()["blobId"]
    identity_id = identities(owner)["list"][0]["id"]
    states = {
        "Mailbox": ok_in(owner, acct, "Mailbox/get", {"ids": []})["state"],
        "Email": ok_in(owner, acct, "Email/get", {"ids": []})["state"],
    }
    writes = [
        ("Mailbox/set", {"create": {"n": {"name": "Sneaky"}}}, USING_IDENTITY),
        ("Mailbox/set", {"update": {inbox: {"sortOrder": 9}}}, USING_IDENTITY),
        ("Mailbox/set", {"destroy": [boxes["Trash"]["id"]]}, USING_IDENTITY),
        ("Email/set", {"update": {email_id: {"keywords/$seen": True}}}, USING_IDENTITY),
        ("Email/set", {"destroy": [email_id]}, USING_IDENTITY),
        ("Email/import", {"emails": {"m": {"blobId": own_blob,
                                           "mailboxIds": {inbox: True}}}}, USING_IDENTITY),
        ("VacationResponse/set", {"update": {"singleton": {"isEnabled": True}}},
         USING_VACATION),
        ("Identity/set", {"update": {identity_id: {"name": "Sneaky"}}}, USING_IDENTITY),
        ("Identity/set", {"create": {"i": {"email": owner.username}}}, USING_IDENTITY),
    ]
    for name, args, using in writes:
        assert error_in(grantee, acct, name, args, using=using) == {"type": "accountReadOnly"}, \
            name
    # Blob/copy *into* the read-only account is a write too
    assert error_in(grantee, acct, "Blob/copy", {"fromAccountId": grantee.account_id,
                                                  "blobIds": [own_blob]}) == \
        {"type": "accountReadOnly"}
    # nothing changed in the owner's account
    assert ok_in(owner, acct, "Mailbox/get", {"ids": []})["state"] == states["Mailbox"]
    assert ok_in(owner, acct, "Email/get", {"ids": []})["state"] == states["Email"]
    assert "Sneaky" not in mailboxes(owner, acct)
    assert vacation_get(owner)["list"] == [VACATION_DEFAULT]
    assert identities(owner)["list"][0]["name"] == ""
    # upload to the read-only account: 403 (and the owner may still upload there)
    r = upload(grantee, acct, b"not allowed")
    assert r.status_code == 403, (r.status_code, r.text)
    assert r.json()["status"] == 403
    assert upload(owner, acct, b"allowed").status_code in (200, 201)


def test_read_write_share_mailbox_set(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    share(srv, owner, grantee)
    since = ok_in(owner, owner.account_id, "Mailbox/get", {"ids": []})["state"]
    out = ok_in(grantee, owner.account_id, "Mailbox/set",
                {"create": {"p": {"name": "Project X"}}})
    assert out["accountId"] == owner.account_id and out["notCreated"] is None, out
    new_id = out["created"]["p"]["id"]
    mine = mailboxes(owner, owner.account_id)
    assert mine["Project X"]["id"] == new_id
    assert mine["Project X"]["myRights"] == dict.fromkeys(MAILBOX_RIGHTS, True)
    changes = ok_in(owner, owner.account_id, "Mailbox/changes", {"sinceState": since})
    assert changes["created"] == [new_id]
    # the grantee's own account is untouched
    assert "Project X" not in mailboxes(grantee, grantee.account_id)
    # read-write: the grantee sees full rights, and may upload into the account
    theirs = mailboxes(grantee, owner.account_id)
    assert theirs["Project X"]["myRights"] == dict.fromkeys(MAILBOX_RIGHTS, True)
    r = upload(grantee, owner.account_id, b"written by the grantee")
    assert r.status_code in (200, 201), r.text
    assert r.json()["accountId"] == owner.account_id


def test_unshare_takes_the_account_away(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    blob_id = import_message(owner)
    share(srv, owner, grantee)
    assert download(grantee, owner.account_id, blob_id).status_code == 200
    assert ok_in(grantee, owner.account_id, "Mailbox/get", {"ids": []})
    unshare(srv, owner, grantee)
    for name, args in (("Mailbox/get", {"ids": None}), ("Email/query", {}),
                       ("Mailbox/set", {"create": {"n": {"name": "Late"}}})):
        assert error_in(grantee, owner.account_id, name, args) == {"type": "accountNotFound"}
    assert error_in(grantee, owner.account_id, "Identity/get", {},
                    using=USING_IDENTITY) == {"type": "accountNotFound"}
    assert error_in(grantee, owner.account_id, "VacationResponse/get", {},
                    using=USING_VACATION) == {"type": "accountNotFound"}
    r = download(grantee, owner.account_id, blob_id)
    assert r.status_code == 404, (r.status_code, r.text)
    r = upload(grantee, owner.account_id, b"too late")
    assert r.status_code == 404, (r.status_code, r.text)
    # the owner is unaffected
    assert download(owner, owner.account_id, blob_id).content == MESSAGE


def test_unshared_account_is_not_found(srv, new_user):
    owner, stranger = new_user("owner"), new_user("stranger")
    blob_id = import_message(owner)
    assert error_in(stranger, owner.account_id, "Mailbox/get", {}) == \
        {"type": "accountNotFound"}
    assert download(stranger, owner.account_id, blob_id).status_code == 404
    assert upload(stranger, owner.account_id, b"x").status_code == 404


# =============================================================================
# Blob/copy (RFC 8620 §6.3) out of a shared account
# =============================================================================


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_blob_copy_from_shared_account(srv, new_user, read_only):
    owner, grantee, stranger = new_user("owner"), new_user("grantee"), new_user("stranger")
    blob_id = import_message(owner)  # referenced by an Email of the owner's
    share(srv, owner, grantee, read_only=read_only)
    assert download(grantee, grantee.account_id, blob_id).status_code == 404  # not yet
    out = ok_in(grantee, grantee.account_id, "Blob/copy",
                {"fromAccountId": owner.account_id, "blobIds": [blob_id]}, using=[CORE])
    assert out == {"fromAccountId": owner.account_id, "accountId": grantee.account_id,
                   "copied": {blob_id: out["copied"][blob_id]}, "notCopied": None}
    copied_id = out["copied"][blob_id]
    r = download(grantee, grantee.account_id, copied_id, "m.eml", "message/rfc822")
    assert r.status_code == 200 and r.content == MESSAGE
    # the copy can be used in the grantee's account, e.g. imported there
    inbox = mailboxes(grantee, grantee.account_id)["Inbox"]["id"]
    imported = ok_in(grantee, grantee.account_id, "Email/import", {"emails": {
        "m": {"blobId": copied_id, "mailboxIds": {inbox: True}}}})
    assert imported["notCreated"] is None, imported
    # a third user, with no share, cannot name the owner's account
    assert error_in(stranger, stranger.account_id, "Blob/copy",
                    {"fromAccountId": owner.account_id, "blobIds": [blob_id]},
                    using=[CORE]) == {"type": "fromAccountNotFound"}
    assert download(stranger, stranger.account_id, blob_id).status_code == 404


def test_blob_copy_unreferenced_upload_only_for_uploader(srv, new_user):
    """RFC 8620 §6.1: "unreferenced blobs MUST only be accessible to the uploader, even in
    shared accounts" -- the owner's fresh upload is notFound for the grantee, while the
    grantee's own upload into the shared account can be copied out."""
    owner, grantee = new_user("owner"), new_user("grantee")
    share(srv, owner, grantee)
    r = upload(owner, owner.account_id, b"the owner's unreferenced upload")
    assert r.status_code in (200, 201), r.text
    owners_blob = r.json()["blobId"]
    r = upload(grantee, owner.account_id, b"the grantee's upload into the shared account")
    assert r.status_code in (200, 201), r.text
    grantees_blob = r.json()["blobId"]
    out = ok_in(grantee, grantee.account_id, "Blob/copy",
                {"fromAccountId": owner.account_id,
                 "blobIds": [owners_blob, grantees_blob, "Bnosuchblob"]}, using=[CORE])
    assert out == {
        "fromAccountId": owner.account_id, "accountId": grantee.account_id,
        "copied": {grantees_blob: out["copied"][grantees_blob]},
        "notCopied": {owners_blob: {"type": "notFound"}, "Bnosuchblob": {"type": "notFound"}},
    }
    r = download(grantee, grantee.account_id, out["copied"][grantees_blob])
    assert r.content == b"the grantee's upload into the shared account"
    assert download(grantee, owner.account_id, owners_blob).status_code == 404
    assert download(owner, owner.account_id, owners_blob).status_code == 200


def test_blob_copy_after_unshare_is_from_account_not_found(srv, new_user):
    owner, grantee = new_user("owner"), new_user("grantee")
    blob_id = import_message(owner)
    share(srv, owner, grantee, read_only=True)
    unshare(srv, owner, grantee)
    assert error_in(grantee, grantee.account_id, "Blob/copy",
                    {"fromAccountId": owner.account_id, "blobIds": [blob_id]},
                    using=[CORE]) == {"type": "fromAccountNotFound"}


# =============================================================================
# Identity (RFC 8621 §6)
# =============================================================================


def identity_defaults(identity_id, email, may_delete=True, **props):
    return {"id": identity_id, "name": "", "email": email, "replyTo": None, "bcc": None,
            "textSignature": "", "htmlSignature": "", "mayDelete": may_delete, **props}


def test_identity_default_for_new_account(new_user):
    user = new_user()
    out = identities(user)
    expect(out, {"accountId": user.account_id, "state": Var("state"),
                 "list": [identity_defaults(Var("id"), user.username, may_delete=False)],
                 "notFound": []})
    # by id, with a property selection (id always returned: RFC 8620 §5.1)
    identity_id = out["list"][0]["id"]
    picked = ok_in(user, user.account_id, "Identity/get",
                   {"ids": [identity_id, "Inosuch"], "properties": ["email"]},
                   using=USING_IDENTITY)
    assert picked["list"] == [{"id": identity_id, "email": user.username}]
    assert picked["notFound"] == ["Inosuch"]


def test_identity_needs_submission_capability(new_user):
    user = new_user()
    for name, args in (("Identity/get", {}), ("Identity/changes", {"sinceState": "0"}),
                       ("Identity/set", {"create": {"i": {"email": user.username}}})):
        assert error_in(user, user.account_id, name, args, using=[CORE, MAIL]) == \
            {"type": "unknownMethod"}, name
    # nothing was created by the refused set
    assert len(identities(user)["list"]) == 1


def test_identity_create_own_address_and_alias(srv, new_user):
    user = new_user()
    alias = f"alias{next(_names)}@example.org"
    done = cli(srv, "alias", "add", user.username, alias)
    assert done.returncode == 0, done.stderr
    before = identities(user)["state"]
    out = identity_set(user, create={
        "own": {"email": user.username, "name": "Work me"},
        "al": {"email": alias},
    })
    assert out["notCreated"] is None, out
    assert out["oldState"] == before and out["newState"] != before
    own_id, alias_id = out["created"]["own"]["id"], out["created"]["al"]["id"]
    assert own_id != alias_id
    # RFC 8620 §5.3: created holds the id and every property the server set or defaulted
    assert out["created"] == {
        "own": {"id": own_id, "replyTo": None, "bcc": None, "textSignature": "",
                "htmlSignature": "", "mayDelete": True},
        "al": {"id": alias_id, "name": "", "replyTo": None, "bcc": None,
               "textSignature": "", "htmlSignature": "", "mayDelete": True},
    }
    listed = {i["id"]: i for i in identities(user)["list"]}
    assert listed[own_id] == identity_defaults(own_id, user.username, name="Work me")
    assert listed[alias_id] == identity_defaults(alias_id, alias)
    assert len(listed) == 3
    assert identities(user)["state"] == out["newState"]


def test_identity_create_for_other_address_is_forbidden_from(srv, new_user):
    user, other = new_user(), new_user("other")
    other_alias = f"alias{next(_names)}@example.org"
    assert cli(srv, "alias", "add", other.username, other_alias).returncode == 0
    before = identities(user)["state"]
    out = identity_set(user, create={
        "a": {"email": other.username},            # another user's address
        "b": {"email": other_alias},               # another user's alias
        "c": {"email": "stranger@example.net"},    # nobody's
    })
    assert out["created"] is None
    assert out["notCreated"] == {k: {"type": "forbiddenFrom"} for k in "abc"}
    assert out["newState"] == before
    assert len(identities(user)["list"]) == 1


def test_identity_create_invalid(new_user):
    user = new_user()
    out = identity_set(user, create={
        "noemail": {"name": "No address"},
        "server": {"email": user.username, "mayDelete": False},
        "withid": {"email": user.username, "id": "Imine"},
        "unknown": {"email": user.username, "nickname": "x"},
        "notaddr": {"email": "not an address"},
        "bcc": {"email": user.username, "bcc": [{"name": "x", "email": "y@example.com",
                                                 "extra": 1}]},
    })
    assert out["created"] is None
    assert out["notCreated"] == {
        cid: {"type": "invalidProperties", "properties": [prop]} for cid, prop in (
            ("noemail", "email"), ("server", "mayDelete"), ("withid", "id"),
            ("unknown", "nickname"), ("bcc", "bcc"))
    } | {"notaddr": out["notCreated"]["notaddr"]}
    # an address that is not the account's (or not an address at all): refused either way
    assert out["notCreated"]["notaddr"] in (
        {"type": "invalidProperties", "properties": ["email"]}, {"type": "forbiddenFrom"})
    assert len(identities(user)["list"]) == 1


def test_identity_in_shared_read_write_account(srv, new_user):
    """forbiddenFrom is about the account's addresses, whoever makes the call."""
    owner, grantee = new_user("owner"), new_user("grantee")
    share(srv, owner, grantee)
    out = ok_in(grantee, owner.account_id, "Identity/set", {"create": {
        "o": {"email": owner.username, "name": "On behalf"},
        "g": {"email": grantee.username}}}, using=USING_IDENTITY)
    assert out["notCreated"] == {"g": {"type": "forbiddenFrom"}}
    made = out["created"]["o"]["id"]
    assert {i["id"]: i["name"] for i in identities(owner)["list"]}[made] == "On behalf"
    assert [i["email"] for i in identities(grantee)["list"]] == [grantee.username]


def test_identity_destroy_default_forbidden_created_allowed(new_user):
    user = new_user()
    default_id = identities(user)["list"][0]["id"]
    made = identity_set(user, create={"x": {"email": user.username, "name": "Extra"}})
    extra_id = made["created"]["x"]["id"]
    out = identity_set(user, destroy=[default_id, extra_id])
    assert out["destroyed"] == [extra_id]
    assert out["notDestroyed"] == {default_id: {"type": "forbidden"}}
    assert [i["id"] for i in identities(user)["list"]] == [default_id]
    # destroying it again: notFound
    again = identity_set(user, destroy=[extra_id])
    assert again["destroyed"] is None
    assert again["notDestroyed"] == {extra_id: {"type": "notFound"}}


def test_identity_update(new_user):
    user = new_user()
    identity_id = identities(user)["list"][0]["id"]
    reply_to = [{"name": "Help desk", "email": "help@example.com"},
                {"name": None, "email": "backup@example.com"}]
    out = identity_set(user, update={identity_id: {
        "name": "Jane Doe", "textSignature": "-- \nJane", "replyTo": reply_to,
        "htmlSignature": "<p>Jane</p>", "bcc": [{"name": "Archive",
                                                "email": "archive@example.com"}]}})
    assert out["updated"] == {identity_id: None} and out["notUpdated"] is None, out
    assert identities(user)["list"] == [identity_defaults(
        identity_id, user.username, may_delete=False, name="Jane Doe",
        textSignature="-- \nJane", replyTo=reply_to, htmlSignature="<p>Jane</p>",
        bcc=[{"name": "Archive", "email": "archive@example.com"}])]
    # back to null
    out = identity_set(user, update={identity_id: {"replyTo": None, "bcc": None}})
    assert out["updated"] == {identity_id: None}
    got = identities(user)["list"][0]
    assert got["replyTo"] is None and got["bcc"] is None and got["name"] == "Jane Doe"


def test_identity_update_errors(new_user):
    user = new_user()
    identity_id = identities(user)["list"][0]["id"]
    before = identities(user)
    bad = {
        "email": {"email": "other@example.com"},          # immutable
        "replyTo": {"replyTo": "help@example.com"},       # not an array
        "replyTo ": {"replyTo": [{"email": 5}]},         # email not a string
        "replyTo  ": {"replyTo": [{"name": "x"}]},        # no email
        "replyTo   ": {"replyTo": ["help@example.com"]},  # not objects
        "bcc": {"bcc": {"name": "x", "email": "y@example.com"}},  # an object, not an array
        "mayDelete": {"mayDelete": True},                 # server-set
        "name": {"name": 7},
        "textSignature": {"textSignature": ["-- "]},
    }
    for prop, patch in bad.items():
        out = identity_set(user, update={identity_id: patch})
        assert out["updated"] is None, (patch, out)
        assert out["notUpdated"] == {identity_id: {"type": "invalidProperties",
                                                   "properties": [prop.strip()]}}, patch
    assert identities(user) == before
    # invalid replyTo on create too
    out = identity_set(user, create={"i": {"email": user.username, "replyTo": "nope"}})
    assert out["notCreated"] == {"i": {"type": "invalidProperties", "properties": ["replyTo"]}}
    missing = identity_set(user, update={"Inosuch": {"name": "x"}})
    assert missing["notUpdated"] == {"Inosuch": {"type": "notFound"}}


def test_identity_update_whole_object_and_null_resets_default(new_user):
    """RFC 8620 §5.3 PatchObject: a whole object is a valid patch (unchanged server-set and
    immutable values are accepted); null sets a property back to its default."""
    user = new_user()
    current = identities(user)["list"][0]
    identity_id = current["id"]
    out = identity_set(user, update={identity_id: {**current, "name": "Whole",
                                                   "textSignature": "sig"}})
    assert out["updated"] == {identity_id: None} and out["notUpdated"] is None, out
    assert identities(user)["list"] == [{**current, "name": "Whole", "textSignature": "sig"}]
    out = identity_set(user, update={identity_id: {"name": None, "textSignature": None}})
    assert out["updated"] == {identity_id: None}, out
    assert identities(user)["list"] == [current]  # both back to their default ""


def test_identity_changes(new_user):
    user = new_user()
    default_id = identities(user)["list"][0]["id"]
    since = identities(user)["state"]
    made = identity_set(user, create={"a": {"email": user.username},
                                      "b": {"email": user.username}})
    a_id, b_id = made["created"]["a"]["id"], made["created"]["b"]["id"]
    mid = made["newState"]
    identity_set(user, update={default_id: {"name": "Renamed"}})
    final = identity_set(user, destroy=[b_id])["newState"]

    def changes(since_state):
        return ok_in(user, user.account_id, "Identity/changes", {"sinceState": since_state},
                     using=USING_IDENTITY)

    everything = changes(since)
    assert everything["oldState"] == since and everything["newState"] == final
    assert everything["hasMoreChanges"] is False
    # b was created and destroyed since `since`: the server may omit it or list it as
    # destroyed (RFC 8620 §5.2), never as created
    assert everything["created"] == [a_id]
    assert everything["updated"] == [default_id]
    assert everything["destroyed"] in ([], [b_id])
    later = changes(mid)
    assert later["created"] == [] and later["updated"] == [default_id]
    assert later["destroyed"] == [b_id]
    assert changes(final)["created"] == [] and changes(final)["destroyed"] == []
    assert error_in(user, user.account_id, "Identity/changes", {"sinceState": "bogus"},
                    using=USING_IDENTITY) == {"type": "cannotCalculateChanges"}


# =============================================================================
# VacationResponse (RFC 8621 §8)
# =============================================================================


def test_vacation_default_singleton(new_user):
    user = new_user()
    out = vacation_get(user)
    expect(out, {"accountId": user.account_id, "state": Var("s"),
                 "list": [VACATION_DEFAULT], "notFound": []})
    by_id = vacation_get(user, ids=["singleton", "other"])
    assert by_id["list"] == [VACATION_DEFAULT]
    assert by_id["notFound"] == ["other"]
    assert vacation_get(user, ids=[])["list"] == []
    picked = vacation_get(user, ids=None, properties=["isEnabled"])
    assert picked["list"] == [{"id": "singleton", "isEnabled": False}]


def test_vacation_update_round_trip(new_user):
    user = new_user()
    before = vacation_get(user)["state"]
    values = {"isEnabled": True, "fromDate": "2026-12-01T00:00:00Z",
              "toDate": "2027-01-02T12:30:00Z", "subject": "Away",
              "textBody": "I am away until January.", "htmlBody": "<p>I am away.</p>"}
    out = vacation_set(user, update={"singleton": values})
    assert no_descriptions(out) == {
        "accountId": user.account_id, "oldState": before, "newState": out["newState"],
        "created": None, "updated": {"singleton": None}, "destroyed": None,
        "notCreated": None, "notUpdated": None, "notDestroyed": None}
    assert out["newState"] != before
    got = vacation_get(user)
    assert got["state"] == out["newState"]
    assert got["list"] == [{"id": "singleton", **values}]
    # a patch of one property leaves the others; null clears
    vacation_set(user, update={"singleton": {"isEnabled": False, "fromDate": None,
                                             "subject": None}})
    assert vacation_get(user)["list"] == [{**VACATION_DEFAULT, **values, "isEnabled": False,
                                           "fromDate": None, "subject": None}]
    # RFC 8620 §5.3: the whole object is a valid patch; null restores a default
    whole = vacation_get(user)["list"][0]
    out = vacation_set(user, update={"singleton": {**whole, "isEnabled": True}})
    assert out["updated"] == {"singleton": None}, out
    vacation_set(user, update={"singleton": {k: None for k in VACATION_DEFAULT if k != "id"}})
    assert vacation_get(user)["list"] == [VACATION_DEFAULT]


def test_vacation_create_and_destroy_are_singleton_errors(new_user):
    user = new_user()
    before = vacation_get(user)["state"]
    out = vacation_set(user, create={"v": {"isEnabled": True}}, destroy=["singleton"])
    assert out["created"] is None and out["destroyed"] is None
    assert out["notCreated"] == {"v": {"type": "singleton"}}
    assert out["notDestroyed"] == {"singleton": {"type": "singleton"}}
    assert out["newState"] == before
    assert vacation_get(user)["list"] == [VACATION_DEFAULT]


def test_vacation_update_other_id_not_found(new_user):
    user = new_user()
    out = vacation_set(user, update={"other": {"isEnabled": True}})
    assert out["updated"] is None
    assert out["notUpdated"] == {"other": {"type": "notFound"}}
    assert vacation_get(user)["list"] == [VACATION_DEFAULT]


def test_vacation_invalid_properties(new_user):
    user = new_user()
    out = vacation_set(user, update={"singleton": {"isEnabled": "yes", "fromDate": "tomorrow",
                                                   "subject": "fine"}})
    assert out["updated"] is None
    err = out["notUpdated"]["singleton"]
    assert err["type"] == "invalidProperties"
    assert sorted(err["properties"]) == ["fromDate", "isEnabled"]
    for prop, value in (("toDate", "2026-12-01"), ("toDate", 20261201),
                        ("fromDate", "2026-12-01T00:00:00+01:00"),  # UTCDate: "Z" only
                        ("fromDate", "2026-12-01T00:00:00"), ("toDate", "2026-02-30T00:00:00Z"),
                        ("isEnabled", 1), ("subject", 5), ("htmlBody", ["x"]),
                        ("id", "other")):
        out = vacation_set(user, update={"singleton": {prop: value}})
        assert out["notUpdated"] == {"singleton": {"type": "invalidProperties",
                                                   "properties": [prop]}}, (prop, value)
    assert vacation_get(user)["list"] == [VACATION_DEFAULT]


def test_vacation_no_changes_or_query_methods(new_user):
    user = new_user()
    state = vacation_get(user)["state"]
    for name, args in (("VacationResponse/changes", {"sinceState": state}),
                       ("VacationResponse/query", {}),
                       ("VacationResponse/queryChanges", {"sinceQueryState": state}),
                       ("VacationResponse/copy", {"fromAccountId": user.account_id,
                                                  "create": {}})):
        assert error_in(user, user.account_id, name, args, using=USING_VACATION) == \
            {"type": "unknownMethod"}, name
    # and without the vacationresponse capability, /get and /set are unknown too
    for name in ("VacationResponse/get", "VacationResponse/set"):
        assert error_in(user, user.account_id, name, {}, using=[CORE, MAIL]) == \
            {"type": "unknownMethod"}, name


def test_vacation_if_in_state(new_user):
    user = new_user()
    state = vacation_get(user)["state"]
    assert error_in(user, user.account_id, "VacationResponse/set",
                    {"ifInState": state + "x", "update": {"singleton": {"isEnabled": True}}},
                    using=USING_VACATION) == {"type": "stateMismatch"}
    assert vacation_get(user)["list"] == [VACATION_DEFAULT]
    out = vacation_set(user, ifInState=state, update={"singleton": {"isEnabled": True}})
    assert out["updated"] == {"singleton": None}
    assert vacation_get(user)["list"][0]["isEnabled"] is True
