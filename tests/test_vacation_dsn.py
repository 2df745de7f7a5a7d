"""Vacation auto-replies, delivery/read reports for sent mail, and LMTP group commit.

jmapd runs as a real `serve --lmtp 127.0.0.1:PORT --smtp-relay 127.0.0.1:SINK
--smtp-retry-seconds 1` subprocess. Mail comes in as an MTA brings it: over LMTP
(`smtplib.LMTP`, which makes jmapd add `Return-Path: <MAIL FROM>`) and through
`jmapd.py deliver --user ADDRESS` (the message carries its own Return-Path, as Postfix
adds one). Outgoing mail goes to an in-process aiosmtpd relay (the sink) that records each
envelope and the octets. Clients use JMAP over HTTP.

VacationResponse (RFC 8621 §8; RFC 5230 §4.5, §4.6, §5; RFC 3834 §2, §3, §5): one reply per
sender per period, sent with MAIL FROM:<> to the envelope sender; From the default
Identity, "Auto: <subject>" (or the configured subject), Auto-Submitted: auto-replied,
In-Reply-To/References threading; text, html alternative or a default body. No reply when
disabled, outside fromDate/toDate, to automated or list mail, to bounces, to robot senders,
to the account itself, when the account is not among To/Cc/Bcc, for imported mail. A reply
queued while there is no relay is sent once a relay is configured.

Reports (RFC 8621 §7 deliveryStatus, dsnBlobIds, mdnBlobIds; RFC 3464 DSN; RFC 8098 MDN)
received for a sent message update its EmailSubmission and are also stored as mail.

LMTP group commit: several recipients in one transaction, an unknown one among them, and
four connections delivering at once: every 250 means the message is there.
"""

import email
import email.policy
import email.utils
import itertools
import re
import secrets
import smtplib
import threading
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from aiosmtpd.controller import Controller

from conftest import add_user, Client, CORE, free_port, MAIL, run_cli, Server

SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
USING = [CORE, MAIL, SUBMISSION, VACATION]
WAIT_S = 10  # the outbox polls every second: a reply normally arrives within ~1 s
QUIET_S = 1.5  # after a later reply arrived: time for any earlier wrong one to show up
_names = itertools.count(1)


# =============================================================================
# The relay (sink)
# =============================================================================


class Sink:
    """An aiosmtpd smarthost accepting everything and recording each message."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages = []  # {"mail_from", "rcpt_tos", "content"} per accepted DATA
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    def start(self):
        self.controller.start()
        return self

    def stop(self):
        self.controller.stop()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append({"mail_from": envelope.mail_from,
                                  "rcpt_tos": list(envelope.rcpt_tos),
                                  "content": bytes(envelope.original_content)})
        return "250 2.0.0 queued"

    def to(self, address):
        """Messages whose envelope names this recipient (case-insensitively)."""
        with self.lock:
            return [m for m in self.messages
                    if address.lower() in (r.lower() for r in m["rcpt_tos"])]

    def count(self):
        with self.lock:
            return len(self.messages)

    def recipients_since(self, index):
        """The envelope recipients of every message accepted after the first `index`."""
        with self.lock:
            return [r for m in self.messages[index:] for r in m["rcpt_tos"]]

    def wait(self, address, count=1, timeout=WAIT_S):
        wait_for(lambda: len(self.to(address)) >= count,
                 f"{count} message(s) for {address} at the relay", timeout)
        return self.to(address)


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
# Servers and users
# =============================================================================


@pytest.fixture(scope="module")
def sink():
    relay = Sink().start()
    yield relay
    relay.stop()


def start_server(data_dir, *extra):
    srv = Server(data_dir, "--lmtp", f"127.0.0.1:{free_port()}", *extra).start()
    srv.lmtp_port = int(re.search(r"LMTP on 127\.0\.0\.1:(\d+)", srv.log()).group(1))
    return srv


@pytest.fixture(scope="module")
def srv(tmp_path_factory, sink):
    data_dir = tmp_path_factory.mktemp("vacation") / "data"
    add_user(data_dir, "first@example.com")
    server = start_server(data_dir, "--smtp-relay", f"127.0.0.1:{sink.port}",
                          "--smtp-retry-seconds", "1")
    yield server
    server.stop()


class User:
    """A fresh account on a server, with its JMAP client."""

    def __init__(self, server, prefix="user"):
        self.address = f"{prefix}{next(_names)}-{secrets.token_hex(3)}@example.com"
        add_user(server.data_dir, self.address)
        self.server = server
        self.connect(server)

    def connect(self, server):
        self.server = server
        self.client = Client(server.url, self.address)
        self.id = self.client.account_id

    def request(self, calls):
        calls = [[name, {"accountId": self.id, **args}, cid] for name, args, cid in calls]
        return self.client.request(calls, using=USING)["methodResponses"]

    def ok(self, name, args):
        got, out, _ = self.request([[name, args, "c0"]])[0]
        assert got == name, out
        return out

    def mailbox(self, role):
        boxes = self.ok("Mailbox/get", {"ids": None})["list"]
        return next(m["id"] for m in boxes if m["role"] == role)

    def identity(self):
        return self.ok("Identity/get", {"ids": None})["list"][0]

    def name_identity(self, name):
        ident = self.identity()
        out = self.ok("Identity/set", {"update": {ident["id"]: {"name": name}}})
        assert ident["id"] in (out["updated"] or {}), out

    def vacation(self, **props):
        """VacationResponse/set update of the singleton; the object afterwards."""
        out = self.ok("VacationResponse/set", {"update": {"singleton": props}})
        assert "singleton" in (out["updated"] or {}), out
        return self.ok("VacationResponse/get", {"ids": None})["list"][0]

    def alias(self, prefix="alias"):
        address = f"{prefix}-{secrets.token_hex(3)}@example.org"
        done = run_cli("user", "alias", "add", self.address, address,
                       data_dir=self.server.data_dir)
        assert done.returncode == 0, done.stderr
        return address

    def query(self, condition=None):
        args = {"calculateTotal": True, "limit": 1000}
        if condition:
            args["filter"] = condition
        return self.ok("Email/query", args)

    def emails(self, condition, properties):
        ids = self.query(condition)["ids"]
        if not ids:
            return []
        return self.ok("Email/get", {"ids": ids, "properties": properties})["list"]

    def download(self, blob_id):
        url = self.client.session["downloadUrl"]
        for key, value in {"accountId": self.id, "blobId": blob_id, "name": "m.eml",
                           "type": "message/rfc822"}.items():
            url = url.replace("{" + key + "}", quote(value, safe=""))
        r = self.client.http.get(url, timeout=30)
        assert r.status_code == 200, r.text
        return r.content


def utc_text(moment):
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def domain():
    """A domain no other test sends from: each test's senders live there."""
    return f"d{secrets.token_hex(4)}.example.org"


# =============================================================================
# Messages, LMTP and `jmapd.py deliver`
# =============================================================================


def message(sender, to, subject="Hello", msgid=None, headers=(), body=None, cc=None):
    """An RFC 5322 message (CRLF line ends). subject=None leaves the Subject field out."""
    msgid = msgid or f"{secrets.token_hex(8)}@example.org"
    head = [f"From: {sender}", f"To: {to}"]
    if cc:
        head.append(f"Cc: {cc}")
    if subject is not None:
        head.append(f"Subject: {subject}")
    head += [f"Message-ID: <{msgid}>", f"Date: {email.utils.formatdate()}", *headers,
             "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
             "Content-Transfer-Encoding: 8bit"]
    text = "\r\n".join(head) + "\r\n\r\n" + (body or f"Hi, {msgid}\r\n")
    return text.encode("utf-8")


def lmtp(server, mail_from, rcpts, raw):
    """One LMTP transaction: (RCPT reply codes, one (code, text) per accepted recipient)."""
    conn = smtplib.LMTP("127.0.0.1", server.lmtp_port, timeout=30)
    try:
        return lmtp_transaction(conn, mail_from, rcpts, raw)
    finally:
        conn.close()


def lmtp_transaction(conn, mail_from, rcpts, raw):
    if not getattr(conn, "_greeted", False):
        assert conn.ehlo("mta.example.net")[0] == 250  # smtplib.LMTP says LHLO
        conn._greeted = True
    code, text = conn.docmd(f"MAIL FROM:<{mail_from}>")
    assert code == 250, (code, text)
    codes = [conn.docmd(f"RCPT TO:<{r}>")[0] for r in rcpts]
    accepted = sum(c == 250 for c in codes)
    if not accepted:
        conn.docmd("RSET")
        return codes, []
    code, text = conn.docmd("DATA")
    assert code == 354, (code, text)
    conn.sock.sendall(re.sub(rb"(?m)^\.", b"..", raw) + b".\r\n")
    return codes, [conn.getreply() for _ in range(accepted)]


def lmtp_ok(server, mail_from, rcpt, raw):
    """Deliver to one recipient over LMTP; it must be answered 250."""
    codes, replies = lmtp(server, mail_from, [rcpt], raw)
    assert codes == [250] and [r[0] for r in replies] == [250], (codes, replies)


def cli_deliver(server, user_address, raw):
    """`jmapd.py deliver --user ADDRESS` as an MTA's MDA would run it; must exit 0."""
    done = run_cli("deliver", "--user", user_address, data_dir=server.data_dir,
                   input_text=raw.decode("utf-8"))
    assert done.returncode == 0, done.stderr


def return_path(sender, raw):
    """The message as an MTA hands it to an MDA: with the envelope sender on top."""
    return f"Return-Path: <{sender}>\r\n".encode() + raw


def parse(content):
    return email.message_from_bytes(content, policy=email.policy.default)


def text_of(part):
    return part.get_content().replace("\r\n", "\n")


# =============================================================================
# 1. The reply
# =============================================================================


def test_sender_that_cannot_be_answered_still_gets_its_mail_delivered(srv, sink):
    """A Return-Path no reply can be written to (a quoted local part with a comma) gets no
    vacation reply, and never costs the mail itself: the delivery is answered 250."""
    user = User(srv, "odd")
    user.vacation(isEnabled=True, textBody="Away.")
    odd = f'"a,b"@{domain()}'
    codes, replies = lmtp(srv, odd, [user.address], message(
        f"Odd <{odd}>", user.address, subject="Odd sender", msgid=f"odd@{domain()}"))
    assert codes == [250] and [code for code, _ in replies] == [250], (codes, replies)
    assert user.query({"subject": "Odd sender"})["ids"], "the message was not stored"


def test_vacation_reply_once_per_sender(srv, sink):
    """RFC 8621 §8 + RFC 5230 §5 + RFC 3834 §3: the reply goes from <> to the envelope
    sender; From the default Identity with its name, To the sender, Subject "Auto: ...",
    Auto-Submitted: auto-replied, In-Reply-To and References threading, own Message-ID and
    Date, the textBody as its body. RFC 3834 §2 / RFC 5230 §4.1: the same sender gets no
    second reply within the period; another sender does get one."""
    user = User(srv, "vera")
    user.name_identity("Vera Vacation")
    user.vacation(isEnabled=True, textBody="I am away until Monday.\nRegards, Vera\n")
    d = domain()
    bob, carol = f"bob@{d}", f"carol@{d}"
    before = time.time()
    lmtp_ok(srv, bob, user.address, message(
        f"Bob <{bob}>", f"Vera <{user.address}>", subject="Lunch plans",
        msgid=f"m1@{d}", headers=[f"References: <r1@{d}> <r2@{d}>"]))

    [reply] = sink.wait(bob)
    assert reply["mail_from"] == "<>"  # MAIL FROM:<> (RFC 5230 §5.1, RFC 3834 §3.3)
    assert reply["rcpt_tos"] == [bob]
    got = parse(reply["content"])
    assert [(a.display_name, a.addr_spec) for a in got["From"].addresses] == \
        [("Vera Vacation", user.address)]
    assert [a.addr_spec for a in got["To"].addresses] == [bob]
    assert got["Subject"] == "Auto: Lunch plans"
    assert got["Auto-Submitted"] == "auto-replied"
    assert got["In-Reply-To"].strip() == f"<m1@{d}>"
    assert got["References"].split() == [f"<r1@{d}>", f"<r2@{d}>", f"<m1@{d}>"]
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", got["Message-ID"].strip())
    assert got["Message-ID"].strip() != f"<m1@{d}>"
    sent = email.utils.parsedate_to_datetime(got["Date"]).timestamp()
    assert before - 60 <= sent <= time.time() + 60
    assert got.get_content_type() == "text/plain"
    assert text_of(got).rstrip("\n") == "I am away until Monday.\nRegards, Vera"

    lmtp_ok(srv, bob, user.address, message(f"Bob <{bob}>", user.address, "Again"))
    lmtp_ok(srv, carol, user.address, message(f"Carol <{carol}>", user.address, "Hi"))
    [to_carol] = sink.wait(carol)
    assert parse(to_carol["content"])["Subject"] == "Auto: Hi"
    time.sleep(QUIET_S)
    assert len(sink.to(bob)) == 1
    assert len(sink.to(carol)) == 1
    assert user.query()["total"] == 3  # every message was delivered all the same


def plain_body(m, text):
    assert m.get_content_type() == "text/plain"
    assert text_of(m).rstrip("\n") == text


def check_vacation_subject(m):
    """The VacationResponse's subject replaces "Auto: <original subject>"."""
    assert m["Subject"] == "Out of the office"
    plain_body(m, "Back soon.")


def check_no_original_subject(m):
    assert m["Subject"] == "Automated reply"


def check_encoded_subject(m):
    """The original's RFC 2047 subject is decoded, prefixed and encoded again."""
    assert m["Subject"] == "Auto: Grüße aus Köln"
    plain_body(m, "Zurück am Montag.")


def check_html_and_text(m):
    assert m.get_content_type() == "multipart/alternative"
    parts = list(m.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert text_of(parts[0]).rstrip("\n") == "Away until Monday."
    assert text_of(parts[1]).rstrip("\n") == "<p>Away until <b>Monday</b>.</p>"


def check_html_only(m):
    """RFC 8621 §8: textBody null -> a plain-text part generated from the htmlBody."""
    assert m.get_content_type() == "multipart/alternative"
    plain, html = list(m.iter_parts())
    assert (plain.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert "Away until Monday" in " ".join(text_of(plain).split())
    assert "<" not in text_of(plain)
    assert text_of(html).rstrip("\n") == "<p>Away until <b>Monday</b>.</p>"


def check_default_body(m):
    """Both bodies null: some default text, plain only."""
    assert m.get_content_type() == "text/plain"
    assert text_of(m).strip()


HTML = "<p>Away until <b>Monday</b>.</p>"
VARIANTS = {  # id: (VacationResponse properties, the original's Subject, check(reply))
    "vacation-subject": ({"subject": "Out of the office", "textBody": "Back soon."}, "Plans",
                         check_vacation_subject),
    "no-original-subject": ({"textBody": "Back soon."}, None, check_no_original_subject),
    "encoded-subject": ({"textBody": "Zurück am Montag."},
                        "=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", check_encoded_subject),
    "html-and-text": ({"textBody": "Away until Monday.", "htmlBody": HTML}, "Q",
                      check_html_and_text),
    "html-only": ({"htmlBody": HTML}, "Q", check_html_only),
    "default-body": ({}, "Q", check_default_body),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vacation_reply_variants_via_deliver_command(srv, sink, variant):
    """Delivered by `jmapd.py deliver` (Return-Path in the message): the configured
    subject, "Automated reply" without an original subject, RFC 2047 subjects, an html
    alternative, a text part generated from html, a default body. Without an Identity name
    From is the bare address."""
    props, subject, check = VARIANTS[variant]
    user = User(srv, "mda")
    user.vacation(isEnabled=True, **props)
    sender = f"sender@{domain()}"
    cli_deliver(srv, user.address, return_path(sender, message(
        f"Sender <{sender}>", user.address, subject=subject)))
    [reply] = sink.wait(sender)
    assert reply["mail_from"] == "<>" and reply["rcpt_tos"] == [sender]
    got = parse(reply["content"])
    assert [(a.display_name, a.addr_spec) for a in got["From"].addresses] == \
        [("", user.address)]
    assert got["Auto-Submitted"] == "auto-replied"
    check(got)


def test_vacation_reply_for_plus_detail_alias_and_cc(srv, sink):
    """RFC 5230 §4.5: the account's address may be in To with a +detail, be one of its
    aliases, or be in Cc; "Auto-Submitted: no" is a person's mail (RFC 3834 §5)."""
    user = User(srv, "plus")
    alias = user.alias()
    user.vacation(isEnabled=True, textBody="Away.")
    d = domain()
    local, _, host = user.address.partition("@")
    cases = {
        f"plus@{d}": message(f"plus@{d}", f"{local}+work@{host}"),
        f"alias@{d}": message(f"alias@{d}", f"Sales <{alias}>"),
        f"cc@{d}": message(f"cc@{d}", f"someone@{d}", cc=user.address),
        f"human@{d}": message(f"human@{d}", user.address, headers=["Auto-Submitted: no"]),
        f"person@{d}": message(f"person@{d}", user.address,
                               headers=["Auto-Submitted: No (typed by a person)"]),
    }
    for sender, raw in cases.items():
        lmtp_ok(srv, sender, user.address, raw)
    for sender in cases:
        [reply] = sink.wait(sender)
        assert reply["rcpt_tos"] == [sender]


def test_reply_goes_to_the_envelope_sender_not_an_older_return_path(srv, sink):
    """RFC 3834 §4: a response generated at delivery goes to the reverse-path of MAIL FROM
    (the Return-Path jmapd adds on top), never to an older Return-Path field further down;
    and §2: a null MAIL FROM gets no response at all."""
    user = User(srv, "stale")
    user.vacation(isEnabled=True, textBody="Away.")
    d = domain()
    real, control = f"real@{d}", f"control@{d}"
    start = sink.count()
    lmtp_ok(srv, "", user.address,
            return_path(f"stale-bounce@{d}", message(f"bounce@{d}", user.address)))
    lmtp_ok(srv, real, user.address,
            return_path(f"stale-real@{d}", message(real, user.address)))
    lmtp_ok(srv, control, user.address, message(control, user.address))
    sink.wait(control)
    time.sleep(QUIET_S)
    assert sorted(sink.recipients_since(start)) == sorted([real, control])


def test_reply_references_from_in_reply_to(srv, sink):
    """RFC 5230 §5.8 -> RFC 5322 §3.6.4: without References, the parent's single-id
    In-Reply-To followed by its Message-ID."""
    user = User(srv, "irt")
    user.vacation(isEnabled=True, textBody="Away.")
    d = domain()
    sender = f"irt@{d}"
    lmtp_ok(srv, sender, user.address, message(
        sender, user.address, "Re: x", msgid=f"child@{d}",
        headers=[f"In-Reply-To: <parent@{d}>"]))
    [reply] = sink.wait(sender)
    got = parse(reply["content"])
    assert got["In-Reply-To"].strip() == f"<child@{d}>"
    assert got["References"].split() == [f"<parent@{d}>", f"<child@{d}>"]


# =============================================================================
# 2. No reply
# =============================================================================


def test_no_vacation_reply(srv, sink):
    """No reply (RFC 8621 §8, RFC 5230 §4.5/§4.6, RFC 3834 §2): vacation disabled; mail
    before fromDate or after toDate; Auto-Submitted other than "no"; Precedence
    bulk/list/junk; List-* fields; a null envelope sender (LMTP and `deliver`); robot
    senders; the account or its alias as sender; the account only Bcc'd by the envelope.
    A user whose fromDate..toDate window holds now gets a reply, sent last as the control:
    once it arrived any wrong reply would have arrived too."""
    now = datetime.now(timezone.utc)
    main, disabled, early, late, window = (User(srv, p) for p in
                                           ("neg", "off", "early", "late", "window"))
    alias = main.alias()
    main.vacation(isEnabled=True, textBody="Away.")
    disabled.vacation(isEnabled=False, textBody="Away.")
    early.vacation(isEnabled=True, fromDate=utc_text(now + timedelta(hours=1)))
    late.vacation(isEnabled=True, fromDate=utc_text(now - timedelta(hours=2)),
                  toDate=utc_text(now - timedelta(seconds=5)))
    window.vacation(isEnabled=True, fromDate=utc_text(now - timedelta(hours=1)),
                    toDate=utc_text(now + timedelta(hours=1)))
    d = domain()
    to = main.address
    start = sink.count()
    lmtp_cases = [  # (envelope sender, recipient, message)
        (f"generated@{d}", to, message(f"generated@{d}", to,
                                       headers=["Auto-Submitted: auto-generated"])),
        (f"replied@{d}", to, message(f"replied@{d}", to,
                                     headers=["Auto-Submitted: auto-replied"])),
        (f"bulk@{d}", to, message(f"bulk@{d}", to, headers=["Precedence: bulk"])),
        (f"list@{d}", to, message(f"list@{d}", to, headers=["Precedence: list"])),
        (f"junk@{d}", to, message(f"junk@{d}", to, headers=["Precedence: junk"])),
        (f"listid@{d}", to, message(f"listid@{d}", to, headers=[f"List-Id: <l.{d}>"])),
        (f"unsub@{d}", to, message(f"unsub@{d}", to,
                                   headers=[f"List-Unsubscribe: <mailto:u@{d}>"])),
        ("", to, message(f"bounce@{d}", to)),  # MAIL FROM:<>: a bounce
        (f"MAILER-DAEMON@{d}", to, message(f"MAILER-DAEMON@{d}", to)),
        (f"noreply@{d}", to, message(f"noreply@{d}", to)),
        (f"owner-x@{d}", to, message(f"owner-x@{d}", to)),
        (f"x-request@{d}", to, message(f"x-request@{d}", to)),
        (main.address, to, message(main.address, to)),
        (alias, to, message(alias, to)),
        (f"bcc@{d}", to, message(f"bcc@{d}", f"someone@{d}")),  # envelope only
        (f"disabled@{d}", disabled.address, message(f"disabled@{d}", disabled.address)),
        (f"early@{d}", early.address, message(f"early@{d}", early.address)),
        (f"late@{d}", late.address, message(f"late@{d}", late.address)),
    ]
    for sender, rcpt, raw in lmtp_cases:
        lmtp_ok(srv, sender, rcpt, raw)
    cli_deliver(srv, to, b"Return-Path: <>\r\n" + message(f"clibounce@{d}", to))

    control = f"control@{d}"
    lmtp_ok(srv, control, window.address, message(control, window.address))
    sink.wait(control)
    time.sleep(QUIET_S)
    assert sink.recipients_since(start) == [control]  # nothing else was sent, to anyone
    assert main.query()["total"] == 1 + sum(rcpt == to for _, rcpt, _ in lmtp_cases)


# =============================================================================
# 3. Imported mail
# =============================================================================


def test_imported_mail_gets_no_vacation_reply(srv, sink, tmp_path):
    """`jmapd.py import` of an mbox and Email/import are not new mail from an MTA: even with
    a Return-Path and the account in To, they get no reply (a control delivered afterwards
    over LMTP does)."""
    user = User(srv, "imp")
    user.vacation(isEnabled=True, textBody="Away.")
    d = domain()
    mbox_sender, jmap_sender, control = f"mbox@{d}", f"jmap@{d}", f"control@{d}"
    start = sink.count()
    raw = return_path(mbox_sender, message(mbox_sender, user.address, "from the mbox"))
    mbox = tmp_path / "old.mbox"
    mbox.write_bytes(b"From mbox@example.org Mon Jan  1 00:00:00 2024\n"
                     + raw.replace(b"\r\n", b"\n") + b"\n")
    done = run_cli("import", "--user", user.address, mbox, data_dir=srv.data_dir)
    assert done.returncode == 0, done.stderr
    assert "imported 1 message " in done.stdout

    url = user.client.session["uploadUrl"].replace("{accountId}", quote(user.id, safe=""))
    up = user.client.http.post(url, data=return_path(jmap_sender, message(
        jmap_sender, user.address, "over JMAP")), headers={"Content-Type": "message/rfc822"},
        timeout=30)
    assert up.status_code in (200, 201), up.text
    out = user.ok("Email/import", {"emails": {"i": {
        "blobId": up.json()["blobId"], "mailboxIds": {user.mailbox("inbox"): True}}}})
    assert out["notCreated"] is None, out
    assert user.query()["total"] == 2

    lmtp_ok(srv, control, user.address, message(control, user.address))
    sink.wait(control)
    time.sleep(QUIET_S)
    assert sink.recipients_since(start) == [control]


# =============================================================================
# 4. Queued until there is a relay
# =============================================================================


def test_reply_queued_without_relay_is_sent_once_relay_exists(tmp_path_factory, sink):
    """Without --smtp-relay the reply waits in the outbox (not lost); after a restart with
    a relay it is sent, exactly once."""
    data_dir = tmp_path_factory.mktemp("norelay") / "data"
    add_user(data_dir, "first@example.com")
    first = start_server(data_dir)
    second = None
    try:
        user = User(first, "queued")
        user.vacation(isEnabled=True, textBody="Away.")
        sender = f"bob@{domain()}"
        lmtp_ok(first, sender, user.address, message(sender, user.address, "Queued?"))
        assert user.query()["total"] == 1
        time.sleep(1.2)  # an outbox poll would have come and gone
        first.stop()
        assert first.proc.returncode == 0, first.log()
        assert sink.to(sender) == []

        second = start_server(data_dir, "--smtp-relay", f"127.0.0.1:{sink.port}",
                              "--smtp-retry-seconds", "1")
        [reply] = sink.wait(sender)
        assert reply["mail_from"] == "<>"
        assert parse(reply["content"])["Subject"] == "Auto: Queued?"
        time.sleep(QUIET_S + 1)
        assert len(sink.to(sender)) == 1
    finally:
        first.stop()
        if second:
            second.stop()


# =============================================================================
# 5. Delivery status notifications and read reports for sent mail
# =============================================================================


class Sent:
    """A message sent through the relay by EmailSubmission/set; its id and Message-ID."""

    def __init__(self, server, sink, rcpts):
        self.user = user = User(server, "sender")
        self.rcpts = rcpts
        made = user.ok("Email/set", {"create": {"m": {
            "mailboxIds": {user.mailbox("drafts"): True}, "keywords": {"$draft": True},
            "from": [{"name": None, "email": user.address}],
            "to": [{"name": None, "email": a} for a in rcpts],
            "subject": "Report me", "textBody": [{"partId": "t", "type": "text/plain"}],
            "bodyValues": {"t": {"value": "Please read this.\n"}}}}})
        assert made["notCreated"] is None, made
        self.email_id = made["created"]["m"]["id"]
        out = user.ok("EmailSubmission/set", {"create": {"s": {
            "identityId": user.identity()["id"], "emailId": self.email_id}}})
        assert out["notCreated"] is None, out
        self.id = out["created"]["s"]["id"]
        for address in rcpts:
            sink.wait(address)
        wait_for(lambda: all(s["delivered"] == "unknown" for s in (
            self.get()["deliveryStatus"] or {"x": {"delivered": ""}}).values()),
            "the relay's replies recorded")
        got = user.ok("Email/get", {"ids": [self.email_id], "properties": ["messageId"]})
        [self.message_id] = got["list"][0]["messageId"]

    def get(self):
        out = self.user.ok("EmailSubmission/get", {"ids": [self.id]})
        assert out["notFound"] == [], out
        return out["list"][0]

    def state(self):
        return self.user.ok("EmailSubmission/get", {"ids": []})["state"]

    def receive(self, raw):
        """The report arrives over LMTP from the null sender (RFC 3464 §2, RFC 8098 §2)."""
        lmtp_ok(self.user.server, "", self.user.address, raw)


def report(to, kind, report_fields, headers_of, subject):
    """A multipart/report (RFC 6522) with a text part, the machine-readable part of type
    `kind` and the original message's header section (text/rfc822-headers)."""
    boundary = "=_report_" + secrets.token_hex(6)
    report_type = {"message/delivery-status": "delivery-status",
                   "message/disposition-notification": "disposition-notification"}[kind]
    lines = [
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>", f"To: {to}",
        f"Subject: {subject}", f"Message-ID: <{secrets.token_hex(8)}@mx.example.net>",
        f"Date: {email.utils.formatdate()}", "Auto-Submitted: auto-replied", "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={report_type}; boundary=\"{boundary}\"",
        "", f"--{boundary}", "Content-Type: text/plain; charset=us-ascii", "",
        f"{subject}.", "", f"--{boundary}", f"Content-Type: {kind}", "", *report_fields,
        "", f"--{boundary}", "Content-Type: text/rfc822-headers", "", *headers_of, "",
        f"--{boundary}--", ""]
    return "\r\n".join(lines).encode()


def dsn(sent, message_id, blocks, subject):
    """RFC 3464 §2: the per-message fields, then a block per recipient."""
    fields = ["Reporting-MTA: dns; mx.example.net",
              f"Arrival-Date: {email.utils.formatdate()}"]
    for block in blocks:
        fields += [""] + block
    headers_of = [f"From: {sent.user.address}", f"To: {', '.join(sent.rcpts)}",
                  "Subject: Report me", f"Message-ID: <{message_id}>"]
    return report(sent.user.address, "message/delivery-status", fields, headers_of, subject)


def recipient_block(address, action, status, diagnostic=None):
    block = [f"Final-Recipient: rfc822; {address}", f"Action: {action}", f"Status: {status}",
             "Remote-MTA: dns; mx2.example.net"]
    if diagnostic:
        block.append(f"Diagnostic-Code: smtp; {diagnostic}")
    return block


def test_dsn_updates_delivery_status(srv, sink):
    """RFC 8621 §7: a DSN (RFC 3464) for a sent message sets deliveryStatus per recipient
    ("failed" -> delivered "no" with the Diagnostic-Code's reply as smtpReply,
    "delivered" -> "yes"), adds its blob to dsnBlobIds (downloadable, the DSN as stored),
    and is stored in the Inbox like any mail."""
    d = domain()
    gone, there = f"gone@{d}", f"there@{d}"
    sent = Sent(srv, sink, [gone, there])
    before, state = sent.get(), sent.state()
    assert before["dsnBlobIds"] == [] and before["mdnBlobIds"] == []
    assert before["deliveryStatus"][there]["smtpReply"] == "250 2.1.5 OK"

    delayed = dsn(sent, sent.message_id, [recipient_block(
        there, "delayed", "4.4.1", "421 4.4.1 try again later")], "Delayed Mail")
    sent.receive(delayed)  # RFC 8621 §7: only "delivered" and "failed" change `delivered`
    got = sent.get()
    assert got["deliveryStatus"][there]["delivered"] == "unknown"
    assert got["deliveryStatus"][gone] == before["deliveryStatus"][gone]
    assert len(got["dsnBlobIds"]) == 1
    changes = sent.user.ok("EmailSubmission/changes", {"sinceState": state})
    assert changes["updated"] == [sent.id] and changes["created"] == [], changes
    before = got

    failed = dsn(sent, sent.message_id, [recipient_block(
        gone, "failed", "5.1.1", "550 5.1.1 user unknown")], "Undelivered Mail")
    sent.receive(failed)
    got = sent.get()
    assert got["deliveryStatus"][gone] == {
        "smtpReply": "550 5.1.1 user unknown", "delivered": "no", "displayed": "unknown"}
    assert got["deliveryStatus"][there] == before["deliveryStatus"][there]
    assert len(got["dsnBlobIds"]) == 2 and got["mdnBlobIds"] == []
    assert got["dsnBlobIds"][0] == before["dsnBlobIds"][0]  # oldest first
    blob = sent.user.download(got["dsnBlobIds"][1])
    assert blob.startswith(b"Return-Path: <>\r\n") and blob.endswith(failed)

    stored = sent.user.emails({"inMailbox": sent.user.mailbox("inbox"),
                               "subject": "Undelivered"}, ["subject", "blobId"])
    assert [e["subject"] for e in stored] == ["Undelivered Mail"]
    assert sent.user.download(stored[0]["blobId"]) == blob

    ok = dsn(sent, sent.message_id, [recipient_block(
        there, "delivered", "2.0.0", "250 2.0.0 stored")], "Delivery report")
    sent.receive(ok)
    got = sent.get()
    assert got["deliveryStatus"][there]["delivered"] == "yes"
    assert got["deliveryStatus"][there]["displayed"] == "unknown"
    assert got["deliveryStatus"][gone]["delivered"] == "no"
    assert len(got["dsnBlobIds"]) == 3
    assert sent.user.download(got["dsnBlobIds"][2]).endswith(ok)
    assert sent.user.query({"inMailbox": sent.user.mailbox("inbox")})["total"] == 3


def test_mdn_sets_displayed(srv, sink):
    """RFC 8621 §7 + RFC 8098: a "displayed" MDN sets that recipient's displayed to "yes"
    and adds its blob to mdnBlobIds; dsnBlobIds and delivered are untouched."""
    d = domain()
    reader, other = f"reader@{d}", f"other@{d}"
    sent = Sent(srv, sink, [reader, other])
    before = sent.get()

    def mdn_for(address, disposition, subject):
        return report(sent.user.address, "message/disposition-notification", [
            "Reporting-UA: mua.example.net; Example Mail",
            f"Original-Recipient: rfc822;{address}", f"Final-Recipient: rfc822; {address}",
            f"Original-Message-ID: <{sent.message_id}>", f"Disposition: {disposition}"],
            [f"From: {sent.user.address}", f"To: {address}", "Subject: Report me",
             f"Message-ID: <{sent.message_id}>"], subject)

    deleted = mdn_for(other, "manual-action/MDN-sent-manually; deleted", "Deleted: Report me")
    sent.receive(deleted)  # an MDN, but not "displayed" (RFC 8098 §3.2.6.2)
    got = sent.get()
    assert got["deliveryStatus"] == before["deliveryStatus"]
    assert len(got["mdnBlobIds"]) == 1 and got["dsnBlobIds"] == []

    mdn = mdn_for(reader, "manual-action/MDN-sent-manually; displayed", "Read: Report me")
    sent.receive(mdn)
    got = sent.get()
    assert got["deliveryStatus"][reader] == {**before["deliveryStatus"][reader],
                                             "displayed": "yes"}
    assert got["deliveryStatus"][other] == before["deliveryStatus"][other]
    assert got["dsnBlobIds"] == [] and len(got["mdnBlobIds"]) == 2
    assert sent.user.download(got["mdnBlobIds"][0]).endswith(deleted)
    assert sent.user.download(got["mdnBlobIds"][1]).endswith(mdn)
    assert sorted(e["subject"] for e in sent.user.emails(
        {"inMailbox": sent.user.mailbox("inbox")}, ["subject"])) == \
        ["Deleted: Report me", "Read: Report me"]


def test_dsn_for_unknown_message_changes_nothing(srv, sink):
    """A DSN whose original Message-ID is not one we sent leaves every EmailSubmission as it
    was (same state string, same object); the report is still stored as mail."""
    d = domain()
    rcpt = f"rcpt@{d}"
    sent = Sent(srv, sink, [rcpt])
    before, state = sent.get(), sent.state()
    stray = dsn(sent, f"never-sent-{secrets.token_hex(4)}@{d}",
                [recipient_block(rcpt, "failed", "5.1.1", "550 5.1.1 user unknown")],
                "Undelivered Mail")
    sent.receive(stray)
    assert sent.get() == before
    assert sent.state() == state
    assert sent.user.query({"inMailbox": sent.user.mailbox("inbox")})["total"] == 1


# =============================================================================
# 6. LMTP group commit
# =============================================================================


def tokens_of(user):
    """The tokens (Subjects) of the account's Emails."""
    return {e["subject"] for e in user.emails(None, ["subject"])}


def test_lmtp_three_recipients_one_transaction(srv):
    """RFC 2033 §4.2: one 250 per recipient after DATA; each account has the message."""
    users = [User(srv, "gc") for _ in range(3)]
    tok = "tok" + secrets.token_hex(6)
    codes, replies = lmtp(srv, f"alice@{domain()}", [u.address for u in users],
                          message("alice@example.net", users[0].address, tok))
    assert codes == [250, 250, 250]
    assert [r[0] for r in replies] == [250, 250, 250], replies
    for user in users:
        assert tokens_of(user) == {tok}


def test_lmtp_unknown_recipient_among_known(srv):
    """RFC 2033 §4.2: the unknown recipient gets 550 at RCPT, no reply after DATA; the
    others get their 250 and the message."""
    first, second = User(srv, "gc"), User(srv, "gc")
    tok = "tok" + secrets.token_hex(6)
    rcpts = [first.address, f"nobody-{secrets.token_hex(4)}@example.com", second.address]
    codes, replies = lmtp(srv, f"alice@{domain()}", rcpts,
                          message("alice@example.net", first.address, tok))
    assert codes[0] == 250 and codes[1] == 550 and codes[2] == 250
    assert [r[0] for r in replies] == [250, 250], replies
    assert tokens_of(first) == {tok} and tokens_of(second) == {tok}


def test_lmtp_parallel_connections_every_250_is_there(srv):
    """Four LMTP connections deliver 50 messages each at once (each to its own account and
    to one shared account): every message answered 250 is in both accounts."""
    shared = User(srv, "shared")
    own = [User(srv, "conn") for _ in range(4)]
    acked = [[] for _ in own]
    errors = []

    def run(index):
        try:
            conn = smtplib.LMTP("127.0.0.1", srv.lmtp_port, timeout=60)
            try:
                for n in range(50):
                    tok = f"c{index}m{n}x{secrets.token_hex(3)}"
                    codes, replies = lmtp_transaction(
                        conn, "alice@example.net", [own[index].address, shared.address],
                        message("alice@example.net", shared.address, tok))
                    if codes == [250, 250] and [r[0] for r in replies] == [250, 250]:
                        acked[index].append(tok)
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(own))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [len(a) for a in acked] == [50, 50, 50, 50]  # nothing was refused or deferred
    for user, tokens in zip(own, acked):
        assert user.query()["total"] == 50
        assert tokens_of(user) == set(tokens)
    assert shared.query()["total"] == 200
    assert tokens_of(shared) == {t for tokens in acked for t in tokens}
