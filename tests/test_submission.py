"""Sending mail: EmailSubmission (RFC 8621 §7) and jmapd's outbox (jmapd §8.3 SUBMISSION).

The smarthost is an in-process `aiosmtpd` server on 127.0.0.1 (a `Sink`): it records every
MAIL FROM, RCPT TO, AUTH and message it sees, with whether the session was TLS and
authenticated, and answers scripted replies per recipient and stage (RFC 5321 §4.2).
jmapd runs as a real `serve --smtp-relay 127.0.0.1:PORT --smtp-retry-seconds 1` subprocess;
clients compose the Email with Email/set create (into Drafts) and send it with
EmailSubmission/set, then poll EmailSubmission/get while the outbox worker (which looks
for due mail every second) sends.

Covered: the §7.5.1 example (two responses under one call id, onSuccessUpdateEmail moving
the Email from Drafts to Sent, onSuccessDestroyEmail); the envelope as given and as
generated from the headers (§7 envelope: To+Cc+Bcc deduplicated, mailFrom from From); the
octets sent are the Email's minus its Bcc field (§7.5); deliveryStatus/undoStatus as replies
come in (§7 DeliveryStatus, the multi-line reply rule); retries of 4xx (only the recipients
that failed), 5xx final; STARTTLS verified against a test CA with AUTH, implicit TLS, AUTH
never in clear; the queue surviving a restart and sending exactly once; FUTURERELEASE
(RFC 4865) HOLDFOR/HOLDUNTIL, maxDelayedSend and canceling (undoStatus "canceled",
cannotUnsend); the SetErrors of §7.5; /get, /changes, /query, /queryChanges; destroying a
submission does not stop its delivery (§7.5).

Servers (each with its own data directory) are shared per relay setup; tests use their own
users and recipient addresses, so they do not see each other's mail.
"""

import itertools
import re
import ssl
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from conftest import add_user, Client, CORE, free_port, MAIL, run_cli, Server
from test_generic import no_descriptions

SUBMISSION = "urn:ietf:params:jmap:submission"
USING = [CORE, MAIL, SUBMISSION]
RELAY_USER = "relay-user"
RELAY_PASSWORD = "relay secret 42"
WAIT_S = 10  # the worker polls every second; a retry after 1 s; so 10 s is ample
MAX_DELAYED_SEND = 604800  # jmapd's default --max-delayed-send
_names = itertools.count(1)


# =============================================================================
# The smarthost
# =============================================================================


class Sink:
    """An aiosmtpd smarthost recording what it sees.

    script[(stage, address)] is a list of replies, one used per attempt: stage "MAIL" is a
    MAIL FROM with that address, "RCPT" that recipient's RCPT TO, "DATA" the end of DATA of
    a transaction that includes that recipient. Without a scripted reply the answer is 2xx.
    """

    def __init__(self, port=None, ssl_context=None, **smtp_kwargs):
        self.lock = threading.Lock()
        self.messages = []  # one dict per message accepted at DATA
        self.rcpts = []  # every RCPT TO address, in order
        self.mails = []  # every MAIL FROM: (address, options)
        self.auths = []  # every AUTH attempt: (mechanism, login, password, success)
        self.ehlos = 0  # sessions that said EHLO
        self.script = {}
        self.port = port or free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port,
                                     ssl_context=ssl_context, authenticator=self.authenticate,
                                     **smtp_kwargs)

    def start(self):
        self.controller.start()
        return self

    def stop(self):
        self.controller.stop()

    # ---- views ----

    def to(self, address):
        """The messages whose envelope includes this recipient."""
        with self.lock:
            return [m for m in self.messages if address in m["rcpt_tos"]]

    def rcpt_count(self, address):
        with self.lock:
            return self.rcpts.count(address)

    def wait_message(self, address, count=1):
        return wait_for(lambda: len(self.to(address)) >= count and self.to(address),
                        f"{count} message(s) for {address} at the sink")

    # ---- aiosmtpd hooks ----

    def _scripted(self, stage, address):
        with self.lock:
            replies = self.script.get((stage, address))
            return replies.pop(0) if replies else None

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        login = auth_data.login.decode()
        password = auth_data.password.decode()
        success = (login, password) == (RELAY_USER, RELAY_PASSWORD)
        with self.lock:
            self.auths.append((mechanism, login, password, success))
        return AuthResult(success=success, handled=False, auth_data=auth_data)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self.lock:
            self.ehlos += 1
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        with self.lock:
            self.mails.append((address, list(mail_options)))
        reply = self._scripted("MAIL", address)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self._scripted("RCPT", address)
        with self.lock:
            self.rcpts.append(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return rcpt_ok(address)

    async def handle_DATA(self, server, session, envelope):
        for address in envelope.rcpt_tos:
            reply = self._scripted("DATA", address)
            if reply:
                return reply
        with self.lock:
            self.messages.append({
                "mail_from": envelope.mail_from, "mail_options": list(envelope.mail_options),
                "rcpt_tos": list(envelope.rcpt_tos), "content": bytes(envelope.original_content),
                "starttls": session.ssl is not None,
                "tls": server.transport.get_extra_info("ssl_object") is not None,
                "authenticated": bool(session.authenticated),
                "login": getattr(session.auth_data, "login", None), "at": time.time()})
            return data_ok(len(self.messages))


def rcpt_ok(address):
    return f"250 2.1.5 Recipient <{address}> OK"


def data_ok(n):
    return f"250 2.0.0 Queued as Q{n}"


def wait_for(what, description, timeout=WAIT_S, step=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(step)


# =============================================================================
# Servers, users, helpers
# =============================================================================


def start_server(tmp_path_factory, name, sink_port, *extra):
    data_dir = tmp_path_factory.mktemp(name) / "data"
    add_user(data_dir, "first@example.com")
    return Server(data_dir, "--smtp-relay", f"127.0.0.1:{sink_port}",
                  "--smtp-retry-seconds", "1", *extra).start()


@pytest.fixture(scope="module")
def plain_sink():
    """A relay offering neither STARTTLS nor AUTH."""
    sink = Sink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, plain_sink):
    """jmapd relaying through plain_sink (no TLS, no AUTH)."""
    srv = start_server(tmp_path_factory, "plain", plain_sink.port)
    srv.sink = plain_sink
    yield srv
    srv.stop()


class Account:
    """A fresh user of a server: its client, Mailbox ids by role and default Identity."""

    def __init__(self, srv, prefix="user"):
        self.username = f"{prefix}{next(_names)}@example.com"
        add_user(srv.data_dir, self.username)
        self.srv = srv
        self.client = Client(srv.url, self.username)
        self.id = self.client.account_id
        boxes = self.ok("Mailbox/get", {"ids": None})["list"]
        self.role = {m["role"]: m["id"] for m in boxes if m["role"]}
        self.drafts, self.sent = self.role["drafts"], self.role["sent"]
        identities = self.ok("Identity/get", {"ids": None})["list"]
        assert [i["email"] for i in identities] == [self.username], identities
        self.identity = identities[0]["id"]

    def request(self, calls):
        calls = [[name, {"accountId": self.id, **args}, cid] for name, args, cid in calls]
        return self.client.request(calls, using=USING)["methodResponses"]

    def call(self, name, args):
        return self.request([[name, args, "c0"]])[0]

    def ok(self, name, args):
        got, out, _ = self.call(name, args)
        assert got == name, out
        return out

    def compose(self, to=(), cc=(), bcc=(), subject="Hello", from_=None, body=None,
                keywords=None, **extra):
        """Email/set create into Drafts; return the created {id, blobId, threadId, size}."""
        def addresses(values):
            return [{"name": None, "email": a} for a in values]

        obj = {"mailboxIds": {self.drafts: True},
               "keywords": keywords if keywords is not None else {"$draft": True, "$seen": True},
               "subject": subject,
               "textBody": [{"partId": "t", "type": "text/plain"}],
               "bodyValues": {"t": {"value": body or f"{subject}\n.a line with a dot\nBye.\n"}},
               **extra}
        if from_ is not False:
            obj["from"] = addresses([from_ or self.username])
        for name, values in (("to", to), ("cc", cc), ("bcc", bcc)):
            if values:
                obj[name] = addresses(values)
        out = self.ok("Email/set", {"create": {"m": obj}})
        assert out["notCreated"] is None, out["notCreated"]
        return out["created"]["m"]

    def submit(self, create, **args):
        """EmailSubmission/set with these creates; the (single) response arguments."""
        responses = self.request([["EmailSubmission/set", {"create": create, **args}, "c0"]])
        assert [r[0] for r in responses] == ["EmailSubmission/set"], responses
        return responses[0][1]

    def send(self, email_id, envelope=None, **create_extra):
        """Submit one Email; return the new EmailSubmission's id."""
        create = {"identityId": self.identity, "emailId": email_id, **create_extra}
        if envelope is not None:
            create["envelope"] = envelope
        out = self.submit({"s": create})
        assert out["notCreated"] is None, out["notCreated"]
        return out["created"]["s"]["id"]

    def submission(self, sub_id):
        found = self.ok("EmailSubmission/get", {"ids": [sub_id]})
        assert found["notFound"] == [], found
        return found["list"][0]

    def wait_submission(self, sub_id, predicate, description):
        return wait_for(lambda: (lambda s: predicate(s) and s)(self.submission(sub_id)),
                        f"{description} ({sub_id})")

    def import_raw(self, raw):
        """Upload these octets and Email/import them into Drafts; return the created Email."""
        url = self.client.session["uploadUrl"].replace("{accountId}", quote(self.id, safe=""))
        r = self.client.http.post(url, data=raw, headers={"Content-Type": "message/rfc822"},
                                  timeout=30)
        assert r.status_code in (200, 201), r.text
        out = self.ok("Email/import", {"emails": {"i": {
            "blobId": r.json()["blobId"], "mailboxIds": {self.drafts: True}}}})
        assert out["notCreated"] is None, out["notCreated"]
        return out["created"]["i"]

    def download(self, blob_id):
        url = self.client.session["downloadUrl"]
        for key, value in {"accountId": self.id, "blobId": blob_id, "name": "m.eml",
                           "type": "message/rfc822"}.items():
            url = url.replace("{" + key + "}", quote(value, safe=""))
        r = self.client.http.get(url, timeout=30)
        assert r.status_code == 200, r.text
        return r.content


def envelope(mail_from, rcpts, mail_params=None):
    return {"mailFrom": {"email": mail_from, "parameters": mail_params},
            "rcptTo": [{"email": a, "parameters": None} for a in rcpts]}


def rcpt(prefix="rcpt"):
    """A recipient address no other test uses."""
    return f"{prefix}{next(_names)}@example.net"


def delivered(sub, statuses):
    """deliveryStatus has exactly these recipients, each with its `delivered` value."""
    ds = sub["deliveryStatus"] or {}
    return {a: s["delivered"] for a, s in ds.items()} == statuses


def retrying(sub, address):
    """The recipient is queued again after a 4xx reply (not merely queued, not yet tried)."""
    status = (sub["deliveryStatus"] or {}).get(address) or {}
    return status.get("delivered") == "queued" and status.get("smtpReply", "")[:1] == "4"


def without_bcc(raw):
    """The message with every Bcc header field (and its folded lines) removed."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    kept, skipping = [], False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == b"bcc"
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept) + sep + body


def as_smtp_data(raw):
    """What a DATA transaction carries for these octets: ends with CRLF (RFC 5321 §4.1.1.4)."""
    return raw if raw.endswith(b"\r\n") else raw + b"\r\n"


def utc(value):
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def utc_text(moment):
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_error(out, key):
    assert out["created"] in (None, {}), out["created"]
    return no_descriptions(out["notCreated"][key])


# =============================================================================
# A plain relay: the §7.5.1 example, envelope, octets, deliveryStatus
# =============================================================================


def test_send_like_the_rfc_example(plain):
    """RFC 8621 §7.5.1: create with an envelope plus onSuccessUpdateEmail -> the
    EmailSubmission/set response and then the implicit Email/set, both under the call's id;
    the Email moves from Drafts to Sent without $draft; the relay gets exactly the envelope."""
    acct = Account(plain, "example")
    jane, joe = rcpt("jane"), rcpt("joe")
    email = acct.compose(to=[jane], cc=[joe])
    before = time.time()
    responses = acct.request([["EmailSubmission/set", {
        "create": {"k1490": {"identityId": acct.identity, "emailId": email["id"],
                             "envelope": envelope(acct.username, [jane, joe])}},
        "onSuccessUpdateEmail": {"#k1490": {f"mailboxIds/{acct.drafts}": None,
                                            f"mailboxIds/{acct.sent}": True,
                                            "keywords/$draft": None}}}, "0"]])
    assert [(r[0], r[2]) for r in responses] == [("EmailSubmission/set", "0"),
                                                  ("Email/set", "0")], responses
    sub_set, email_set = responses[0][1], responses[1][1]
    assert sub_set["notCreated"] is None
    created = sub_set["created"]["k1490"]
    sub_id = created["id"]
    assert isinstance(sub_id, str) and sub_id
    assert created["undoStatus"] == "pending"
    send_at = utc(created["sendAt"]).timestamp()
    assert before - 2 <= send_at <= time.time() + 1  # no FUTURERELEASE: the creation time
    assert sub_set["oldState"] != sub_set["newState"]
    assert acct.ok("EmailSubmission/changes", {"sinceState": sub_set["oldState"]})[
        "created"] == [sub_id]
    assert email_set["accountId"] == acct.id
    assert email_set["updated"] == {email["id"]: None}, email_set
    assert email_set["notUpdated"] is None
    assert email_set["oldState"] != email_set["newState"]

    got = acct.ok("Email/get", {"ids": [email["id"]], "properties": ["mailboxIds", "keywords"]})
    assert got["list"][0]["mailboxIds"] == {acct.sent: True}
    assert got["list"][0]["keywords"] == {"$seen": True}

    [message] = plain.sink.wait_message(jane)
    assert message["mail_from"] == acct.username
    assert message["rcpt_tos"] == [jane, joe]
    raw = acct.download(email["blobId"])
    assert b"\r\n.a line with a dot\r\n" in raw  # premise: dot-stuffing is exercised
    assert message["content"] == as_smtp_data(raw)
    assert not message["tls"] and not message["authenticated"]
    assert not any(o.upper().startswith(("HOLDFOR", "HOLDUNTIL")) for o in message["mail_options"])

    sub = acct.wait_submission(sub_id, lambda s: s["undoStatus"] == "final", "final")
    # the worker's update shows in /changes (RFC 8621 §7 deliveryStatus: SHOULD update)
    changes = acct.ok("EmailSubmission/changes", {"sinceState": sub_set["newState"]})
    assert changes["updated"] == [sub_id] and changes["created"] == [], changes
    assert sub["deliveryStatus"] == {
        address: {"smtpReply": sub["deliveryStatus"][address]["smtpReply"],
                  "delivered": "unknown", "displayed": "unknown"} for address in (jane, joe)}
    for address in (jane, joe):
        # RFC 8621 §7: the RCPT reply, or the DATA reply
        reply = sub["deliveryStatus"][address]["smtpReply"]
        assert reply == rcpt_ok(address) or re.fullmatch(r"250 2\.0\.0 Queued as Q\d+", reply)
        assert sub["deliveryStatus"][address]["smtpReply"].startswith("250 ")
    assert sub["identityId"] == acct.identity and sub["emailId"] == email["id"]
    assert sub["threadId"] == email["threadId"]
    assert sub["envelope"] == envelope(acct.username, [jane, joe])
    assert sub["dsnBlobIds"] == [] and sub["mdnBlobIds"] == []
    assert len(plain.sink.to(jane)) == 1  # sent once


def test_generated_envelope_and_bcc_removed(plain):
    """envelope null: mailFrom from From, rcptTo To+Cc+Bcc deduplicated (RFC 8621 §7); the
    Bcc recipient gets the message but the octets carry no Bcc field (§7.5)."""
    acct = Account(plain, "bcc")
    to, cc, hidden = rcpt("to"), rcpt("cc"), rcpt("hidden")
    more = [rcpt("blind-carbon-copy-recipient") for _ in range(4)]  # the Bcc field folds
    email = acct.compose(to=[to, cc], cc=[cc], bcc=[hidden, to, *more])
    raw = acct.download(email["blobId"])
    # test premises: a Bcc field, folded over more than one line
    folded = re.search(rb"(?im)^bcc:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)+", raw)
    assert folded and more[-1].encode() in folded.group(0), raw

    sub_id = acct.send(email["id"])
    sub = acct.submission(sub_id)
    assert sub["envelope"]["mailFrom"] == {"email": acct.username, "parameters": None}
    rcpts = [r["email"] for r in sub["envelope"]["rcptTo"]]
    assert sorted(rcpts) == sorted([to, cc, hidden, *more]), sub["envelope"]
    assert all(r["parameters"] is None for r in sub["envelope"]["rcptTo"])

    [message] = plain.sink.wait_message(hidden)
    assert message["mail_from"] == acct.username
    assert sorted(message["rcpt_tos"]) == sorted([to, cc, hidden, *more])
    assert not re.search(rb"(?im)^bcc:", message["content"].split(b"\r\n\r\n")[0])
    assert not any(a.encode() in message["content"] for a in [hidden, *more])
    assert message["content"] == as_smtp_data(without_bcc(raw))

    sub = acct.wait_submission(sub_id, lambda s: delivered(
        s, dict.fromkeys([to, cc, hidden, *more], "unknown")), "delivered")
    assert sub["undoStatus"] == "final"
    assert all(s["displayed"] == "unknown" and s["smtpReply"].startswith("250 ")
               for s in sub["deliveryStatus"].values())
    # The Email itself keeps its Bcc (only the sent octets lose it).
    got = acct.ok("Email/get", {"ids": [email["id"]], "properties": ["bcc"]})
    assert got["list"][0]["bcc"] == [{"name": None, "email": a} for a in [hidden, to, *more]]


def test_on_success_destroy_email(plain):
    """onSuccessDestroyEmail destroys the Email; the message is still sent (§7.5)."""
    acct = Account(plain, "destroy")
    to = rcpt()
    email = acct.compose(to=[to])
    raw = acct.download(email["blobId"])
    responses = acct.request([["EmailSubmission/set", {
        "create": {"k2": {"identityId": acct.identity, "emailId": email["id"]}},
        "onSuccessDestroyEmail": ["#k2"]}, "c1"]])
    assert [(r[0], r[2]) for r in responses] == [("EmailSubmission/set", "c1"),
                                                  ("Email/set", "c1")], responses
    assert responses[1][1]["destroyed"] == [email["id"]], responses[1][1]
    got = acct.ok("Email/get", {"ids": [email["id"]]})
    assert got["list"] == [] and got["notFound"] == [email["id"]]
    [message] = plain.sink.wait_message(to)
    assert message["content"] == as_smtp_data(raw)
    sub = acct.wait_submission(responses[0][1]["created"]["k2"]["id"],
                               lambda s: delivered(s, {to: "unknown"}), "delivered")
    assert sub["emailId"] == email["id"]  # stays, though the Email is gone (§7.5)


def test_on_success_not_applied_when_the_create_fails(plain):
    """onSuccessUpdateEmail only for submissions that succeeded: no implicit Email/set."""
    acct = Account(plain, "nosuccess")
    email = acct.compose(to=[rcpt()])
    responses = acct.request([["EmailSubmission/set", {
        "create": {"k1": {"identityId": acct.identity, "emailId": email["id"],
                          "envelope": envelope(acct.username, [])}},
        "onSuccessUpdateEmail": {"#k1": {"keywords/$draft": None}},
        "onSuccessDestroyEmail": ["#k1"]}, "c0"]])
    assert [r[0] for r in responses] == ["EmailSubmission/set"], responses
    assert responses[0][1]["notCreated"]["k1"]["type"] == "noRecipients"
    got = acct.ok("Email/get", {"ids": [email["id"]], "properties": ["keywords"]})
    assert got["list"][0]["keywords"] == {"$draft": True, "$seen": True}


def test_envelope_parameters_and_null_reverse_path(plain):
    """The envelope's parameters reach the relay when it offers their extension (SIZE,
    SMTPUTF8, BODY), xtext-free; a DSN parameter it does not offer is left out; mailFrom ""
    is the null reverse-path MAIL FROM:<> (RFC 5321 §4.1.1.2); a non-ASCII recipient goes
    out under SMTPUTF8 when the client asks for it."""
    acct = Account(plain, "params")
    plain_rcpt, utf8_rcpt = rcpt("null"), f"jöe{next(_names)}@exämple.net"
    sub_null = acct.send(acct.compose(to=[plain_rcpt])["id"], envelope={
        "mailFrom": {"email": "", "parameters": {"SIZE": "100000"}},
        "rcptTo": [{"email": plain_rcpt, "parameters": {"NOTIFY": "SUCCESS,FAILURE"}}]})
    sub_utf8 = acct.send(acct.compose(to=[utf8_rcpt])["id"], envelope={
        "mailFrom": {"email": acct.username,
                     "parameters": {"SMTPUTF8": None, "BODY": "8BITMIME"}},
        "rcptTo": [{"email": utf8_rcpt, "parameters": None}]})
    [message] = plain.sink.wait_message(plain_rcpt)
    assert message["mail_from"] == "<>"  # aiosmtpd's spelling of the null reverse-path
    assert message["mail_options"] == ["SIZE=100000"]
    [message] = plain.sink.wait_message(utf8_rcpt)
    assert message["mail_from"] == acct.username and message["rcpt_tos"] == [utf8_rcpt]
    assert sorted(message["mail_options"]) == ["BODY=8BITMIME", "SMTPUTF8"]
    for sub_id, to in ((sub_null, plain_rcpt), (sub_utf8, utf8_rcpt)):
        acct.wait_submission(sub_id, lambda s: delivered(s, {to: "unknown"}), "delivered")


def test_eight_bit_message_is_sent_as_8bitmime(plain):
    """An imported message with 8-bit octets goes out with BODY=8BITMIME (RFC 6152), the
    octets unchanged."""
    acct = Account(plain, "eight")
    to = rcpt("eight")
    raw = (f"From: {acct.username}\r\nTo: {to}\r\nSubject: 8bit\r\nMIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
           "\r\nGrüße aus Köln\r\n").encode()
    email = acct.import_raw(raw)
    acct.send(email["id"])
    [message] = plain.sink.wait_message(to)
    assert message["mail_options"] == ["BODY=8BITMIME"]
    assert message["content"] == raw


def test_bare_lf_message_is_sent_with_crlf(plain):
    acct = Account(plain, "lf")
    to, hidden = rcpt("lf"), rcpt("lfbcc")
    lines = [f"From: {acct.username}", f"To: {to}", f"Bcc: {hidden}", "Subject: LF only", "",
             "line one", ".dot line", "line three"]
    email = acct.import_raw(("\n".join(lines) + "\n").encode())
    acct.send(email["id"])
    [message] = plain.sink.wait_message(to)
    assert hidden in message["rcpt_tos"]
    expected = "\r\n".join(line for line in lines if not line.startswith("Bcc:")) + "\r\n"
    assert message["content"] == expected.encode()


def test_non_ascii_recipient_without_smtputf8(plain):
    acct = Account(plain, "eai")
    to = f"zoë{next(_names)}@exämple.net"
    out = acct.submit({"s": {"identityId": acct.identity,
                             "emailId": acct.compose(to=[to])["id"]}})
    if out["notCreated"]:
        assert out["notCreated"]["s"]["type"] == "invalidRecipients"
        assert out["notCreated"]["s"]["invalidRecipients"] == [to]
        return
    sub = acct.wait_submission(out["created"]["s"]["id"], lambda s: s["deliveryStatus"][to][
        "smtpReply"] != "250 2.0.0 queued" or s["deliveryStatus"][to]["delivered"] != "queued",
        "an attempt")
    status = sub["deliveryStatus"][to]
    assert (status["delivered"] == "unknown" and plain.sink.to(to)) or (
        status["delivered"] == "no" and status["smtpReply"][:1] == "5"), status


# =============================================================================
# TLS to the relay: STARTTLS with AUTH, implicit TLS, AUTH never in clear
# =============================================================================


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and a certificate for 127.0.0.1 it signed, made with the openssl command."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args):
        done = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=jmapd test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "relay.key", "-out", "relay.csr", "-subj", "/CN=127.0.0.1")
    (d / "relay.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "relay.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "relay.pem", "-days", "2", "-extfile", "relay.ext")
    (d / "password").write_text(RELAY_PASSWORD + "\n")
    (d / "wrong-password").write_text("not the relay password\n")

    def server_context():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(d / "relay.pem", d / "relay.key")
        return context

    return SimpleNamespace(ca=d / "ca.pem", password=d / "password",
                           wrong_password=d / "wrong-password", server_context=server_context)


@pytest.fixture
def jmapd(tmp_path_factory):
    """jmapd(name, sink_port, *options) -> a started Server relaying to that port."""
    started = []

    def start(name, sink_port, *extra):
        srv = start_server(tmp_path_factory, name, sink_port, *extra)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def starttls_sink(pki):
    """A relay that requires STARTTLS and offers AUTH only after it."""
    sink = Sink(tls_context=pki.server_context(), require_starttls=True,
                auth_require_tls=True).start()
    yield sink
    sink.stop()


def test_starttls_and_auth(pki, starttls_sink, jmapd):
    """--smtp-tls auto: STARTTLS because the relay offers it, the relay's certificate checked
    against --smtp-ca-file, then AUTH with --smtp-user and the --smtp-password-file."""
    srv = jmapd("starttls", starttls_sink.port, "--smtp-ca-file", pki.ca,
                "--smtp-user", RELAY_USER, "--smtp-password-file", pki.password)
    acct = Account(srv, "tls")
    to = rcpt()
    email = acct.compose(to=[to])
    sub_id = acct.send(email["id"])
    [message] = starttls_sink.wait_message(to)
    assert message["starttls"] and message["tls"]
    assert message["authenticated"] and message["login"] == RELAY_USER.encode()
    assert message["mail_from"] == acct.username
    assert message["content"] == as_smtp_data(acct.download(email["blobId"]))
    assert (RELAY_USER, RELAY_PASSWORD, True) in [a[1:] for a in starttls_sink.auths]
    sub = acct.wait_submission(sub_id, lambda s: delivered(s, {to: "unknown"}), "delivered")
    assert sub["undoStatus"] == "final"


def test_starttls_wrong_password_is_retried_not_failed(pki, starttls_sink, jmapd):
    """AUTH refused with 535 is our own configuration's fault, not the recipients': the
    message stays queued (a 454 naming the 535 for each recipient, undoStatus pending) and
    is tried again until the password is fixed; nothing is sent meanwhile."""
    srv = jmapd("badpw", starttls_sink.port, "--smtp-ca-file", pki.ca,
                "--smtp-user", RELAY_USER, "--smtp-password-file", pki.wrong_password)
    acct = Account(srv, "badpw")
    one, two = rcpt(), rcpt()
    sub_id = acct.send(acct.compose(to=[one, two])["id"])
    sub = acct.wait_submission(sub_id, lambda s: retrying(s, one) and retrying(s, two),
                               "the refusal")
    for address in (one, two):
        reply = sub["deliveryStatus"][address]["smtpReply"]
        assert reply.startswith("454 ") and "535" in reply, sub
        assert sub["deliveryStatus"][address]["delivered"] == "queued", sub
    assert sub["undoStatus"] == "pending"
    refused = [a for a in starttls_sink.auths if a[2] == "not the relay password"]
    assert refused and not any(a[3] for a in refused)
    attempts = len(refused)
    time.sleep(2.5)  # the first retry comes after 1 s
    assert len([a for a in starttls_sink.auths if a[2] == "not the relay password"]) > attempts
    assert starttls_sink.rcpt_count(one) == 0 and starttls_sink.to(one) == []


def test_starttls_unknown_ca_is_not_trusted(starttls_sink, jmapd):
    """Without --smtp-ca-file the test CA is not trusted: no AUTH, no message, retried."""
    srv = jmapd("untrusted", starttls_sink.port, "--smtp-user", RELAY_USER)
    acct = Account(srv, "untrusted")
    to = rcpt()
    auths = len(starttls_sink.auths)
    sub_id = acct.send(acct.compose(to=[to])["id"])
    sub = acct.wait_submission(sub_id, lambda s: retrying(s, to), "an attempt")
    assert sub["deliveryStatus"][to]["smtpReply"].startswith("4"), sub
    assert sub["undoStatus"] == "pending"
    assert len(starttls_sink.auths) == auths and starttls_sink.rcpt_count(to) == 0


def test_implicit_tls(pki, jmapd):
    """--smtp-tls implicit: TLS from the first octet (port 465 style), certificate checked;
    AUTH over it without STARTTLS."""
    sink = Sink(ssl_context=pki.server_context(), auth_require_tls=False).start()
    try:
        srv = jmapd("implicit", sink.port, "--smtp-tls", "implicit", "--smtp-ca-file", pki.ca,
                    "--smtp-user", RELAY_USER, "--smtp-password-file", pki.password)
        acct = Account(srv, "implicit")
        to = rcpt()
        email = acct.compose(to=[to])
        sub_id = acct.send(email["id"])
        [message] = sink.wait_message(to)
        assert message["tls"] and not message["starttls"]
        assert message["authenticated"] and message["login"] == RELAY_USER.encode()
        assert message["content"] == as_smtp_data(acct.download(email["blobId"]))
        sub = acct.wait_submission(sub_id, lambda s: delivered(s, {to: "unknown"}), "delivered")
        assert sub["undoStatus"] == "final"
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def cleartext_auth_sink():
    """A relay offering AUTH without any TLS (which jmapd must never use)."""
    sink = Sink(auth_require_tls=False).start()
    yield sink
    sink.stop()


def test_auth_is_never_sent_in_clear(pki, cleartext_auth_sink, jmapd):
    """--smtp-user with a relay that offers no STARTTLS (but does offer AUTH): jmapd says
    EHLO, then gives up on the attempt with 454 for each recipient and retries; it never
    sends AUTH nor the message."""
    sink = cleartext_auth_sink
    srv = jmapd("cleartext", sink.port, "--smtp-user", RELAY_USER,
                "--smtp-password-file", pki.password)
    acct = Account(srv, "cleartext")
    to = rcpt()
    sub_id = acct.send(acct.compose(to=[to])["id"])
    sub = acct.wait_submission(sub_id, lambda s: retrying(s, to), "an attempt")
    assert sub["deliveryStatus"][to]["smtpReply"].startswith("454"), sub
    assert sub["undoStatus"] == "pending"
    ehlos = sink.ehlos
    assert ehlos >= 1
    wait_for(lambda: sink.ehlos > ehlos, "the retry")
    assert sink.auths == []  # never AUTH (and so never the password) without TLS
    assert not any(address == acct.username for address, _ in sink.mails)
    assert sink.rcpt_count(to) == 0
    sub = acct.submission(sub_id)
    assert delivered(sub, {to: "queued"}) and sub["deliveryStatus"][to]["smtpReply"][:3] == "454"


def test_starttls_required_but_not_offered(cleartext_auth_sink, jmapd):
    """--smtp-tls starttls with a relay that does not offer it: 454, queued, nothing sent."""
    sink = cleartext_auth_sink
    srv = jmapd("needtls", sink.port, "--smtp-tls", "starttls")
    acct = Account(srv, "needtls")
    to = rcpt()
    sub_id = acct.send(acct.compose(to=[to])["id"])
    sub = acct.wait_submission(sub_id, lambda s: retrying(s, to), "an attempt")
    assert sub["deliveryStatus"][to]["smtpReply"].startswith("454"), sub
    assert sink.rcpt_count(to) == 0


def test_serve_refuses_auth_without_tls(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "first@example.com")
    done = run_cli("serve", "--listen", "127.0.0.1:0", "--smtp-relay", "127.0.0.1:25",
                   "--smtp-user", RELAY_USER, "--smtp-tls", "none", data_dir=data_dir,
                   timeout=20)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "--smtp-user" in done.stderr and "listening" not in done.stdout + done.stderr


# =============================================================================
# The queue survives a restart
# =============================================================================


def test_queue_survives_restart_and_sends_once(tmp_path_factory):
    """Relay down: the submission stays pending with "queued" (4xx); jmapd is stopped by
    SIGTERM, the relay comes up, jmapd starts again on the same data: sent exactly once."""
    port = free_port()  # nothing listens there yet
    first = start_server(tmp_path_factory, "restart", port)
    sink = None
    try:
        acct = Account(first, "restart")
        to = rcpt()
        email = acct.compose(to=[to])
        responses = acct.request([["EmailSubmission/set", {
            "create": {"k": {"identityId": acct.identity, "emailId": email["id"]}},
            "onSuccessUpdateEmail": {"#k": {f"mailboxIds/{acct.drafts}": None,
                                            f"mailboxIds/{acct.sent}": True,
                                            "keywords/$draft": None}}}, "c0"]])
        sub_id = responses[0][1]["created"]["k"]["id"]
        sub = acct.wait_submission(sub_id, lambda s: retrying(s, to), "a failed attempt")
        assert sub["undoStatus"] == "pending"
        first.stop()
        assert first.proc.returncode == 0, first.log()

        sink = Sink(port=port).start()
        second = Server(first.data_dir, *first.extra).start()
        try:
            acct.client = Client(second.url, acct.username)
            [message] = sink.wait_message(to)
            assert message["content"] == as_smtp_data(acct.download(email["blobId"]))
            sub = acct.wait_submission(sub_id, lambda s: delivered(s, {to: "unknown"}),
                                       "delivered")
            assert sub["undoStatus"] == "final"
            time.sleep(2.2)  # a second copy would come within the next poll or retry
            assert len(sink.to(to)) == 1 and sink.rcpt_count(to) == 1
            got = acct.ok("Email/get", {"ids": [email["id"]], "properties": ["mailboxIds"]})
            assert got["list"][0]["mailboxIds"] == {acct.sent: True}
        finally:
            second.stop()
    finally:
        first.stop()
        if sink:
            sink.stop()


# =============================================================================
# Replies: retries of 4xx, final 5xx, per-recipient status, multi-line replies
# =============================================================================


def test_temporary_rcpt_failure_retries_only_that_recipient(plain):
    """451 at RCPT for one recipient, 250 for the other: the message goes to the one at
    once (undoStatus final, the other "queued" with the 451 reply), and to the other on the
    retry a second later; each recipient gets the message once."""
    acct = Account(plain, "retry")
    ok, later = rcpt("ok"), rcpt("later")
    plain.sink.script[("RCPT", later)] = ["451 4.3.0 Try again later"]
    email = acct.compose(to=[ok, later])
    sub_id = acct.send(email["id"])
    seen_queued = acct.wait_submission(sub_id, lambda s: delivered(
        s, {ok: "unknown", later: "queued"}), "the first attempt")
    assert seen_queued["deliveryStatus"][later]["smtpReply"] == "451 4.3.0 Try again later"
    assert seen_queued["undoStatus"] == "final"  # relayed to one recipient: cannot recall
    sub = acct.wait_submission(sub_id, lambda s: delivered(
        s, {ok: "unknown", later: "unknown"}), "the retry")
    assert sub["deliveryStatus"][later]["smtpReply"] == rcpt_ok(later)
    assert sub["undoStatus"] == "final"
    assert plain.sink.rcpt_count(later) == 2 and plain.sink.rcpt_count(ok) == 1
    assert [m["rcpt_tos"] for m in plain.sink.to(ok)] == [[ok]]
    assert [m["rcpt_tos"] for m in plain.sink.to(later)] == [[later]]


def test_temporary_data_failure_is_retried(plain):
    """451 at the end of DATA the first time, 250 the second: while queued the DATA reply
    is the recipient's smtpReply (§7: the message as a whole was refused), then 250 and
    delivered "unknown" after two attempts."""
    acct = Account(plain, "dataretry")
    to = rcpt()
    plain.sink.script[("DATA", to)] = ["451 4.7.1 Greylisted, come back later"]
    sub_id = acct.send(acct.compose(to=[to])["id"])
    first = acct.wait_submission(sub_id, lambda s: delivered(s, {to: "queued"}) and s[
        "deliveryStatus"][to]["smtpReply"].startswith("451"), "the first attempt")
    assert first["deliveryStatus"][to]["smtpReply"] == "451 4.7.1 Greylisted, come back later"
    assert first["undoStatus"] == "pending"
    sub = acct.wait_submission(sub_id, lambda s: delivered(s, {to: "unknown"}), "the retry")
    assert sub["deliveryStatus"][to]["smtpReply"].startswith("250 ")
    assert sub["undoStatus"] == "final"
    assert plain.sink.rcpt_count(to) == 2
    assert len(plain.sink.to(to)) == 1


def test_permanent_failures_per_recipient(plain):
    """5xx at RCPT is final for that recipient ("no", the reply text), the others are
    relayed ("unknown"); a multi-line reply is joined as RFC 8621 §7 shows; no retry."""
    acct = Account(plain, "perm")
    good, gone, spam = rcpt("good"), rcpt("gone"), rcpt("spam")
    plain.sink.script[("RCPT", gone)] = ["550 5.1.1 No such user here"]
    plain.sink.script[("RCPT", spam)] = [
        "550-5.7.1 Our system has detected that this message is\r\n"
        "550 5.7.1 likely spam."]
    sub_id = acct.send(acct.compose(to=[good, gone], cc=[spam])["id"])
    sub = acct.wait_submission(sub_id, lambda s: delivered(
        s, {good: "unknown", gone: "no", spam: "no"}), "the replies")
    assert sub["deliveryStatus"][gone] == {"smtpReply": "550 5.1.1 No such user here",
                                           "delivered": "no", "displayed": "unknown"}
    assert sub["deliveryStatus"][spam] == {
        "smtpReply": "550 5.7.1 Our system has detected that this message is likely spam.",
        "delivered": "no", "displayed": "unknown"}
    assert sub["undoStatus"] == "final"
    assert [m["rcpt_tos"] for m in plain.sink.to(good)] == [[good]]
    time.sleep(2.2)  # a retry would come after 1 s
    assert plain.sink.rcpt_count(gone) == 1 and plain.sink.rcpt_count(spam) == 1
    assert acct.submission(sub_id)["deliveryStatus"] == sub["deliveryStatus"]


def test_all_recipients_refused_is_final_and_not_relayed(plain):
    """5xx for the only recipient: delivered "no", undoStatus final (nothing to recall,
    nothing to retry), no message."""
    acct = Account(plain, "refused")
    to = rcpt()
    plain.sink.script[("RCPT", to)] = ["554 5.7.1 Relay access denied"]
    sub_id = acct.send(acct.compose(to=[to])["id"])
    sub = acct.wait_submission(sub_id, lambda s: delivered(s, {to: "no"}), "the 554")
    assert sub["deliveryStatus"][to]["smtpReply"] == "554 5.7.1 Relay access denied"
    assert sub["undoStatus"] == "final"
    assert plain.sink.to(to) == []


def test_rejected_at_mail_or_at_data(plain):
    """A 5xx to MAIL FROM is every recipient's reply; a 5xx at the end of DATA is the reply
    of every recipient whose RCPT was accepted, while one refused at RCPT keeps its own
    (RFC 8621 §7 smtpReply); all "no", undoStatus final."""
    sender, receiver = Account(plain, "mailrej"), Account(plain, "datarej")
    plain.sink.script[("MAIL", sender.username)] = ["553 5.7.1 Sender address rejected"]
    one, two = rcpt("m1"), rcpt("m2")
    mail_sub = sender.send(sender.compose(to=[one, two])["id"])
    accepted, refused = rcpt("acc"), rcpt("ref")
    plain.sink.script[("RCPT", refused)] = ["550 5.1.1 Unknown user"]
    plain.sink.script[("DATA", accepted)] = ["554-5.6.0 Message content rejected\r\n"
                                             "554 5.6.0 (policy 12)"]
    data_sub = receiver.send(receiver.compose(to=[accepted, refused])["id"])
    sub = sender.wait_submission(mail_sub, lambda s: delivered(s, {one: "no", two: "no"}),
                                 "the MAIL refusal")
    assert {a: v["smtpReply"] for a, v in sub["deliveryStatus"].items()} == {
        one: "553 5.7.1 Sender address rejected", two: "553 5.7.1 Sender address rejected"}
    assert sub["undoStatus"] == "final"
    sub = receiver.wait_submission(data_sub, lambda s: delivered(
        s, {accepted: "no", refused: "no"}), "the DATA refusal")
    assert sub["deliveryStatus"][accepted]["smtpReply"] == (
        "554 5.6.0 Message content rejected (policy 12)")
    assert sub["deliveryStatus"][refused]["smtpReply"] == "550 5.1.1 Unknown user"
    assert sub["undoStatus"] == "final"
    assert plain.sink.to(accepted) == [] and plain.sink.rcpt_count(one) == 0


# =============================================================================
# FUTURERELEASE (RFC 4865), maxDelayedSend, canceling
# =============================================================================


def test_session_capability_with_relay(plain):
    acct = Account(plain, "cap")
    session = acct.client.session
    assert SUBMISSION in session["capabilities"]
    assert session["primaryAccounts"][SUBMISSION] == acct.id
    assert session["accounts"][acct.id]["accountCapabilities"][SUBMISSION] == {
        "maxDelayedSend": MAX_DELAYED_SEND,
        "submissionExtensions": {"FUTURERELEASE": [str(MAX_DELAYED_SEND)]}}


def test_without_relay_nothing_can_be_sent(client):
    """No --smtp-relay: maxDelayedSend 0, no extensions, and a submission is refused with
    forbiddenToSend (never accepted and silently dropped)."""
    session = client.session
    assert session["accounts"][client.account_id]["accountCapabilities"][SUBMISSION] == {
        "maxDelayedSend": 0, "submissionExtensions": {}}
    acct = SimpleNamespace(id=client.account_id)
    identity = client.ok("Identity/get", {"accountId": acct.id, "ids": None},
                         using=USING)["list"][0]["id"]
    boxes = client.ok("Mailbox/get", {"accountId": acct.id, "ids": None})["list"]
    drafts = next(m["id"] for m in boxes if m["role"] == "drafts")
    made = client.ok("Email/set", {"accountId": acct.id, "create": {"m": {
        "mailboxIds": {drafts: True}, "from": [{"name": None, "email": client.username}],
        "to": [{"name": None, "email": "someone@example.net"}], "subject": "x",
        "textBody": [{"partId": "t", "type": "text/plain"}],
        "bodyValues": {"t": {"value": "x"}}}}})["created"]["m"]
    responses = client.request([["EmailSubmission/set", {
        "accountId": acct.id,
        "create": {"s": {"identityId": identity, "emailId": made["id"]}},
        "onSuccessDestroyEmail": ["#s"]}, "c0"]], using=USING)["methodResponses"]
    assert [r[0] for r in responses] == ["EmailSubmission/set"], responses
    out = responses[0][1]
    assert set_error(out, "s") == {"type": "forbiddenToSend"}
    assert client.ok("EmailSubmission/query", {"accountId": acct.id},
                     using=USING)["ids"] == []
    assert client.ok("Email/get", {"accountId": acct.id, "ids": [made["id"]]})["notFound"] == []


def test_future_release_and_cancel(plain):
    """HOLDFOR/HOLDUNTIL hold the message in jmapd (the relay offers no FUTURERELEASE):
    sendAt is the release time, undoStatus stays pending and nothing is sent before it;
    canceling a pending one keeps it from being sent; a sent one cannot be unsent."""
    acct = Account(plain, "hold")
    far, soon, near, past = rcpt("far"), rcpt("soon"), rcpt("near"), rcpt("past")
    emails = {a: acct.compose(to=[a], subject=f"for {a}")["id"] for a in (far, soon, near, past)}
    now = time.time()
    near_at = datetime.fromtimestamp(int(now) + 4, timezone.utc)
    out = acct.submit({
        "far": {"identityId": acct.identity, "emailId": emails[far],
                "envelope": envelope(acct.username, [far], {"HOLDFOR": "30"})},
        "soon": {"identityId": acct.identity, "emailId": emails[soon],
                 "envelope": envelope(acct.username, [soon], {"HOLDFOR": "3"})},
        "near": {"identityId": acct.identity, "emailId": emails[near],
                 "envelope": envelope(acct.username, [near], {"HOLDUNTIL": utc_text(near_at)})},
        "past": {"identityId": acct.identity, "emailId": emails[past],
                 "envelope": envelope(acct.username, [past],
                                      {"holduntil": utc_text(datetime.now(timezone.utc)
                                                             - timedelta(hours=1))})}})
    assert out["notCreated"] is None, out["notCreated"]
    ids = {k: v["id"] for k, v in out["created"].items()}
    assert all(v["undoStatus"] == "pending" for v in out["created"].values())
    assert abs(utc(out["created"]["far"]["sendAt"]).timestamp() - (now + 30)) <= 2
    assert utc(out["created"]["near"]["sendAt"]) == near_at
    assert abs(utc(out["created"]["past"]["sendAt"]).timestamp() - now) <= 2  # at once

    # Cancel "soon" before its time: updated; it is never sent.
    upd = acct.ok("EmailSubmission/set", {"update": {ids["soon"]: {"undoStatus": "canceled"}}})
    assert upd["updated"] == {ids["soon"]: None}, upd

    [message] = plain.sink.wait_message(past)  # HOLDUNTIL in the past: at once
    assert not any("HOLD" in o.upper() for o in message["mail_options"])
    [message] = plain.sink.wait_message(near)
    assert message["at"] >= near_at.timestamp()  # never before HOLDUNTIL (RFC 4865 §4.2)
    time.sleep(max(0.0, now + 5.5 - time.time()))  # past the time "soon" was held for
    assert plain.sink.rcpt_count(soon) == 0
    assert plain.sink.rcpt_count(far) == 0
    assert acct.submission(ids["far"])["undoStatus"] == "pending"
    assert acct.submission(ids["soon"])["undoStatus"] == "canceled"
    near_sub = acct.wait_submission(ids["near"], lambda s: s["undoStatus"] == "final", "final")
    assert delivered(near_sub, {near: "unknown"})

    # Undo send as a client does it: cancel, and put the Email back as a draft.
    responses = acct.request([["EmailSubmission/set", {
        "update": {ids["far"]: {"undoStatus": "canceled"},
                   ids["near"]: {"undoStatus": "canceled"},  # sent: cannotUnsend
                   ids["soon"]: {"undoStatus": "pending"}},  # no way back from canceled
        "onSuccessUpdateEmail": {i: {"keywords/$draft": True, "keywords/$seen": None}
                                 for i in (ids["far"], ids["near"], ids["soon"])}}, "u"]])
    assert [(r[0], r[2]) for r in responses] == [("EmailSubmission/set", "u"),
                                                  ("Email/set", "u")], responses
    upd, email_upd = responses[0][1], responses[1][1]
    assert upd["updated"] == {ids["far"]: None}, upd
    assert no_descriptions(upd["notUpdated"][ids["near"]]) == {"type": "cannotUnsend"}
    assert upd["notUpdated"][ids["soon"]]["type"] in ("invalidProperties", "cannotUnsend")
    assert email_upd["updated"] == {emails[far]: None}, email_upd  # only the canceled one
    keywords = {e["id"]: e["keywords"] for e in acct.ok("Email/get", {
        "ids": [emails[far], emails[near]], "properties": ["keywords"]})["list"]}
    assert keywords == {emails[far]: {"$draft": True}, emails[near]: {"$draft": True,
                                                                     "$seen": True}}
    assert acct.submission(ids["far"])["undoStatus"] == "canceled"
    assert acct.submission(ids["soon"])["undoStatus"] == "canceled"
    assert acct.submission(ids["near"])["undoStatus"] == "final"
    assert plain.sink.rcpt_count(far) == 0


def test_future_release_limits(plain):
    """HOLDFOR beyond maxDelayedSend, HOLDUNTIL beyond it, both at once, or malformed ->
    invalidProperties ["envelope"]; exactly maxDelayedSend is accepted."""
    acct = Account(plain, "limits")
    email = acct.compose(to=[rcpt()])
    to = [rcpt()]
    beyond = utc_text(datetime.now(timezone.utc) + timedelta(seconds=MAX_DELAYED_SEND + 120))
    cases = {
        "for": {"HOLDFOR": str(MAX_DELAYED_SEND + 1)},
        "until": {"HOLDUNTIL": beyond},
        "both": {"HOLDFOR": "10", "HOLDUNTIL": utc_text(datetime.now(timezone.utc))},
        "word": {"HOLDFOR": "soon"},
        "date": {"HOLDUNTIL": "tomorrow"},
    }
    out = acct.submit({k: {"identityId": acct.identity, "emailId": email["id"],
                           "envelope": envelope(acct.username, to, params)}
                       for k, params in cases.items()})
    assert out["created"] in (None, {}), out["created"]
    for key in cases:
        assert no_descriptions(out["notCreated"][key]) == {
            "type": "invalidProperties", "properties": ["envelope"]}, key
    out = acct.submit({"max": {"identityId": acct.identity, "emailId": email["id"],
                               "envelope": envelope(acct.username, to,
                                                    {"HOLDFOR": str(MAX_DELAYED_SEND)})}})
    assert out["notCreated"] is None, out["notCreated"]
    sub_id = out["created"]["max"]["id"]
    assert abs(utc(out["created"]["max"]["sendAt"]).timestamp()
               - (time.time() + MAX_DELAYED_SEND)) <= 3
    assert acct.ok("EmailSubmission/set", {"update": {sub_id: {"undoStatus": "canceled"}}}
                   )["updated"] == {sub_id: None}


# =============================================================================
# SetErrors of EmailSubmission/set create (RFC 8621 §7.5)
# =============================================================================


def test_create_set_errors(plain):
    acct = Account(plain, "errors")
    other = Account(plain, "stranger")
    good, bad = rcpt("good"), "not an address"
    email = acct.compose(to=[good])
    foreign_from = acct.compose(to=[good], from_=other.username)
    no_from = acct.compose(to=[good], from_=False)
    others_email = other.compose(to=[good])

    def sub(email_id=email["id"], env=None, identity=acct.identity):
        create = {"identityId": identity, "emailId": email_id}
        if env is not None:
            create["envelope"] = env
        return create

    many = [rcpt("many") for _ in range(101)]
    cases = {
        "forbiddenFrom": (sub(foreign_from["id"]), {"type": "forbiddenFrom"}),
        "forbiddenMailFrom": (sub(env=envelope(other.username, [good])),
                              {"type": "forbiddenMailFrom"}),
        "forbiddenMailFromStranger": (sub(env=envelope("boss@example.org", [good])),
                                      {"type": "forbiddenMailFrom"}),
        "noRecipients": (sub(env=envelope(acct.username, [])), {"type": "noRecipients"}),
        "tooManyRecipients": (sub(env=envelope(acct.username, many)),
                              {"type": "tooManyRecipients", "maxRecipients": 100}),
        "invalidRecipients": (sub(env=envelope(acct.username, [good, bad])),
                              {"type": "invalidRecipients", "invalidRecipients": [bad]}),
        "unknownEmail": (sub("e" + "9" * 12), {"type": "invalidProperties",
                                                "properties": ["emailId"]}),
        "othersEmail": (sub(others_email["id"]), {"type": "invalidProperties",
                                                  "properties": ["emailId"]}),
        "unknownIdentity": (sub(identity="I" + "9" * 12), {"type": "invalidProperties",
                                                           "properties": ["identityId"]}),
        "othersIdentity": (sub(identity=other.identity), {"type": "invalidProperties",
                                                          "properties": ["identityId"]}),
        "noFrom": (sub(no_from["id"]), {"type": "invalidEmail", "properties": ["from"]}),
        "mailParam": (sub(env=envelope(acct.username, [good], {"X-UNKNOWN": "1"})),
                      {"type": "invalidProperties", "properties": ["envelope"]}),
        "rcptParam": (sub(env={"mailFrom": {"email": acct.username, "parameters": None},
                               "rcptTo": [{"email": good, "parameters": {"HOLDFOR": "5"}}]}),
                      {"type": "invalidProperties", "properties": ["envelope"]}),
        "envelopeShape": (sub(env={"mailFrom": acct.username, "rcptTo": [good]}),
                          {"type": "invalidProperties", "properties": ["envelope"]}),
        "undoStatus": ({**sub(), "undoStatus": "final"},
                       {"type": "invalidProperties", "properties": ["undoStatus"]}),
        "serverSet": ({**sub(), "sendAt": "2030-01-01T00:00:00Z"},
                      {"type": "invalidProperties", "properties": ["sendAt"]}),
    }
    out = acct.submit({k: create for k, (create, _) in cases.items()},
                      onSuccessDestroyEmail=[f"#{k}" for k in cases])
    assert out["created"] in (None, {}), out["created"]
    assert set(out["notCreated"]) == set(cases)
    for key, (_, error) in cases.items():
        assert no_descriptions(out["notCreated"][key]) == error, key
    assert acct.ok("EmailSubmission/query", {})["ids"] == []  # nothing was queued
    assert plain.sink.rcpt_count(good) == 0
    assert not any(plain.sink.rcpt_count(a) for a in many)

    # 100 recipients are allowed (held, then canceled: nothing goes out).
    out = acct.submit({"hundred": sub(env=envelope(acct.username, many[:100],
                                                   {"HOLDFOR": "600"}))})
    assert out["notCreated"] is None, out["notCreated"]
    sub_id = out["created"]["hundred"]["id"]
    assert len(acct.submission(sub_id)["deliveryStatus"]) == 100
    assert acct.ok("EmailSubmission/set", {"update": {sub_id: {"undoStatus": "canceled"}}}
                   )["updated"] == {sub_id: None}


# =============================================================================
# EmailSubmission/get, /changes, /query, /queryChanges, destroy
# =============================================================================


def test_get_changes_query_query_changes(plain):
    acct = Account(plain, "query")
    a, b = acct.compose(to=[rcpt()], subject="thread A"), acct.compose(to=[rcpt()],
                                                                     subject="thread B")
    assert a["threadId"] != b["threadId"]
    state0 = acct.ok("EmailSubmission/get", {"ids": []})["state"]
    out = acct.submit({
        "s1": {"identityId": acct.identity, "emailId": a["id"],
               "envelope": envelope(acct.username, [rcpt()], {"HOLDFOR": "100"})},
        "s2": {"identityId": acct.identity, "emailId": a["id"],
               "envelope": envelope(acct.username, [rcpt()], {"HOLDFOR": "200"})},
        "s3": {"identityId": acct.identity, "emailId": b["id"],
               "envelope": envelope(acct.username, [rcpt()], {"HOLDFOR": "300"})}})
    assert out["notCreated"] is None, out["notCreated"]
    s1, s2, s3 = (out["created"][k]["id"] for k in ("s1", "s2", "s3"))
    send_at = {k: out["created"][k]["sendAt"] for k in ("s1", "s2", "s3")}

    got = acct.ok("EmailSubmission/get", {"ids": [s1, s2, s3, "S999999"]})
    assert [g["id"] for g in got["list"]] == [s1, s2, s3]
    assert got["notFound"] == ["S999999"]
    assert [g["threadId"] for g in got["list"]] == [a["threadId"], a["threadId"], b["threadId"]]
    assert [g["sendAt"] for g in got["list"]] == [send_at["s1"], send_at["s2"], send_at["s3"]]
    got = acct.ok("EmailSubmission/get", {"ids": [s1], "properties": ["undoStatus"]})
    assert got["list"] == [{"id": s1, "undoStatus": "pending"}]

    changes = acct.ok("EmailSubmission/changes", {"sinceState": state0})
    assert sorted(changes["created"]) == sorted([s1, s2, s3])
    assert changes["updated"] == [] and changes["destroyed"] == []
    state1 = changes["newState"]

    def query(**args):
        return acct.ok("EmailSubmission/query", args)

    by_sent = [{"property": "sentAt", "isAscending": True}]
    assert query(sort=by_sent)["ids"] == [s1, s2, s3]
    assert query(sort=[{"property": "sentAt", "isAscending": False}])["ids"] == [s3, s2, s1]
    assert sorted(query(filter={"emailIds": [a["id"]]})["ids"]) == sorted([s1, s2])
    assert query(filter={"threadIds": [b["threadId"]]})["ids"] == [s3]
    assert sorted(query(filter={"identityIds": [acct.identity]})["ids"]) == sorted([s1, s2, s3])
    assert query(filter={"before": send_at["s2"]}, sort=by_sent)["ids"] == [s1]
    assert query(filter={"after": send_at["s2"]}, sort=by_sent)["ids"] == [s2, s3]
    assert query(filter={"undoStatus": "pending"}, sort=by_sent)["ids"] == [s1, s2, s3]
    assert query(filter={"undoStatus": "final"})["ids"] == []
    assert query(filter={"operator": "AND", "conditions": [
        {"emailIds": [a["id"]]}, {"after": send_at["s2"]}]})["ids"] == [s2]
    assert len(query(sort=[{"property": "emailId"}])["ids"]) == 3
    assert len(query(sort=[{"property": "threadId"}])["ids"]) == 3
    pending = query(filter={"undoStatus": "pending"}, sort=by_sent)
    everything = query(sort=by_sent)

    upd = acct.ok("EmailSubmission/set", {"update": {s2: {"undoStatus": "canceled"}},
                                          "destroy": [s3]})
    assert upd["updated"] == {s2: None} and upd["destroyed"] == [s3], upd
    changes = acct.ok("EmailSubmission/changes", {"sinceState": state1})
    assert changes["created"] == [] and changes["updated"] == [s2]
    assert changes["destroyed"] == [s3]
    assert acct.ok("EmailSubmission/get", {"ids": [s3]})["notFound"] == [s3]
    assert query(filter={"undoStatus": "canceled"})["ids"] == [s2]

    for before, args in ((pending, {"filter": {"undoStatus": "pending"}, "sort": by_sent}),
                         (everything, {"sort": by_sent})):
        now = query(**args)
        qc = acct.ok("EmailSubmission/queryChanges", {
            **args, "sinceQueryState": before["queryState"]})
        assert qc["oldQueryState"] == before["queryState"]
        assert qc["newQueryState"] == now["queryState"] != before["queryState"]
        assert s3 in qc["removed"]  # destroyed
        assert apply_query_changes(before["ids"], qc) == now["ids"], qc
    assert query(filter={"undoStatus": "pending"}, sort=by_sent)["ids"] == [s1]
    assert query(sort=by_sent)["ids"] == [s1, s2]


def apply_query_changes(ids, changes):
    """RFC 8620 §5.6: drop every removed id, then insert the added ones by index."""
    out = [i for i in ids if i not in changes["removed"]]
    for item in sorted(changes["added"], key=lambda x: x["index"]):
        out.insert(item["index"], item["id"])
    return out


def test_destroying_a_queued_submission_still_sends(plain):
    """RFC 8621 §7.5: destroying an EmailSubmission only removes the record."""
    acct = Account(plain, "destroyq")
    to = rcpt()
    sub_id = acct.send(acct.compose(to=[to])["id"],
                       envelope=envelope(acct.username, [to], {"HOLDFOR": "2"}))
    out = acct.ok("EmailSubmission/set", {"destroy": [sub_id]})
    assert out["destroyed"] == [sub_id], out
    assert plain.sink.to(to) == []  # still held
    [message] = plain.sink.wait_message(to)
    assert message["mail_from"] == acct.username
    assert acct.ok("EmailSubmission/get", {"ids": [sub_id]})["notFound"] == [sub_id]
