"""Writing mail over HTTP: Email/set create (RFC 8621 §4.6), Email/copy (§4.7), the
tooMany* SetErrors of Email/set and Email/import (§4.6, §4.8), and Email/parse (§4.9).

jmapd builds the MIME message of a created Email itself. Every message it writes is
downloaded by its blobId (the session's downloadUrl, RFC 8620 §6.2) and read by Python's
own `email` package (email.message_from_bytes with email.policy.default), the independent
checker: what the client sent must come back the same both through Email/get and through
that parser, and the octets must be a well-formed message (CRLF line ends only, lines of at
most 998 octets, RFC 5322 §2.1.1 / §2.3; header lines of at most 78 where a fold exists).

Email/copy needs two accounts: the second is reached through `jmapd.py user share` (read-write
or --read-only), run as the administrator would while the server runs.

One server with its own data directory for the module; tests use their own users where
counts, states or shares matter, and one shared "writer" account otherwise.
"""

import email
import email.errors
import email.header
import email.policy
import email.utils
import itertools
import re
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest

from conftest import MAIL, Client, Server, add_user, run_cli
from test_generic import Var, expect, no_descriptions

CREATED_KEYS = {"id", "blobId", "threadId", "size"}  # RFC 8621 §4.6, §4.7, §4.8
PARSE_DEFAULT_PROPERTIES = [  # RFC 8621 §4.9
    "messageId", "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo",
    "subject", "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody",
    "attachments"]
DEFAULT_BODY_PROPERTIES = ["partId", "blobId", "size", "name", "type", "charset",
                           "disposition", "cid", "language", "location"]  # RFC 8621 §4.2
NO_SUCH_BLOB = "B" + "0" * 64  # shaped like jmapd's blob ids; no such blob exists
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00"
       b"\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05"
       b"\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")
BINARY = bytes(range(256)) * 9 + b"\x00\r\n\r\n\n\r.\r\nFrom \x00\xff" * 3  # every octet
_names = itertools.count(1)


# =============================================================================
# Fixtures and helpers
# =============================================================================


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """This module's own server and data directory."""
    data_dir = tmp_path_factory.mktemp("email-write") / "data"
    add_user(data_dir, "first@example.com")
    server = Server(data_dir).start()
    yield server
    server.stop()


def make_user(srv, prefix="user"):
    username = f"{prefix}{next(_names)}@example.com"
    add_user(srv.data_dir, username)
    return Client(srv.url, username)


@pytest.fixture
def new_user(srv):
    return lambda prefix="user": make_user(srv, prefix)


class Account:
    """A client with its Mailbox ids by role."""

    def __init__(self, client):
        self.client = client
        self.id = client.account_id
        boxes = client.ok("Mailbox/get", {"accountId": self.id, "ids": None})["list"]
        self.role = {m["role"]: m["id"] for m in boxes if m["role"]}
        self.drafts = self.role["drafts"]
        self.inbox = self.role["inbox"]


@pytest.fixture(scope="module")
def writer(srv):
    """One account for the round-trip tests that need no counts or states of their own."""
    return Account(make_user(srv, "writer"))


@pytest.fixture
def fresh(new_user):
    return Account(new_user("fresh"))


def url_for(client, template, **variables):
    url = client.session[template]
    for key, value in variables.items():
        url = url.replace("{" + key + "}", quote(value, safe=""))
    return url


def upload(client, data, media_type="application/octet-stream", account_id=None):
    url = url_for(client, "uploadUrl", accountId=account_id or client.account_id)
    r = client.http.post(url, data=data, headers={"Content-Type": media_type}, timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()["blobId"]


def download(client, blob_id, account_id=None):
    url = url_for(client, "downloadUrl", accountId=account_id or client.account_id,
                  blobId=blob_id, name="blob.bin", type="application/octet-stream")
    r = client.http.get(url, timeout=30)
    assert r.status_code == 200, (blob_id, r.status_code, r.text[:200])
    return r.content


def email_set(client, account_id=None, **args):
    return client.ok("Email/set", {"accountId": account_id or client.account_id, **args})


def create_raw(acct, obj, mailbox=None):
    """Create one Email (in Drafts unless the object names Mailboxes); return (created, raw)."""
    obj = {"mailboxIds": {mailbox or acct.drafts: True}, **obj}
    resp = email_set(acct.client, create={"k": obj})
    assert resp["notCreated"] is None, resp["notCreated"]
    created = resp["created"]["k"]
    assert set(created) == CREATED_KEYS, created
    raw = download(acct.client, created["blobId"])
    assert created["size"] == len(raw)
    return created, raw


def email_get(client, ids, account_id=None, **args):
    return client.ok("Email/get", {"accountId": account_id or client.account_id, "ids": ids,
                                   **args})


def get_one(client, email_id, account_id=None, **args):
    found = email_get(client, [email_id], account_id, **args)
    assert len(found["list"]) == 1, found
    return found["list"][0]


def text_email(value="Hello.\n", **extra):
    return {"textBody": [{"partId": "t", "type": "text/plain"}],
            "bodyValues": {"t": {"value": value}}, **extra}


def check_octets(raw):
    """The message is RFC 5322 octets: CRLF line ends only, no NUL, lines <= 998 octets.
    (The body's last line need not end in CRLF: RFC 5322 §3.5 `body`.)"""
    assert b"\0" not in raw
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", raw), "bare CR or LF in the message"
    too_long = [line[:60] for line in raw.split(b"\r\n") if len(line) > 998]
    assert not too_long, too_long


def parse(raw):
    """The independent reader: Python's email package."""
    check_octets(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
        for name, value in part.items():
            # Python decodes each RFC 2231 segment on its own and flags a character split
            # between two segments; RFC 2231 §3-§4 join the octets first, so that is no defect
            defects = [d for d in getattr(value, "defects", ())
                       if not isinstance(d, email.errors.UndecodableBytesDefect)]
            assert not defects, (name, defects)
    return msg


def header_block(raw):
    return raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def header_lines(raw):
    """Every header line of every part: the top block and the block after each delimiter
    line of the boundaries Python finds (RFC 2046 §5.1.1)."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    marks = {b"--" + p.get_boundary().encode() for p in msg.walk() if p.is_multipart()}
    lines, in_header = [], True
    for line in raw.split(b"\r\n"):
        if in_header:
            if line == b"":
                in_header = False
            else:
                lines.append(line)
        elif line.rstrip(b" \t") in marks:
            in_header = True
    return lines


def decoded_text(part):
    """A text part's content with its line ends as JMAP gives them (\\n)."""
    return part.get_content().replace("\r\n", "\n")


def structure(msg):
    """The MIME tree as nested (type, [children]) / type, from the parsed message."""
    if msg.is_multipart():
        return (msg.get_content_type(), [structure(p) for p in msg.iter_parts()])
    return msg.get_content_type()


# =============================================================================
# Email/set create: bodies (RFC 8621 §4.6, read back per §4.1.4)
# =============================================================================


def test_create_plain_text_round_trip(writer):
    value = "Hello, world.\nSecond line.\n"
    created, raw = create_raw(writer, text_email(value, subject="Plain"))
    client = writer.client
    email_obj = get_one(client, created["id"], fetchTextBodyValues=True,
                        properties=["blobId", "size", "textBody", "htmlBody", "attachments",
                                    "bodyValues", "hasAttachment", "preview", "subject"])
    assert email_obj["blobId"] == created["blobId"] and email_obj["size"] == len(raw)
    text = email_obj["textBody"]
    assert len(text) == 1 and text[0]["type"] == "text/plain", text
    assert text[0]["charset"].lower() in ("utf-8", "us-ascii"), text
    assert email_obj["htmlBody"] == text  # no HTML part: htmlBody is textBody (§4.1.4)
    assert email_obj["attachments"] == [] and email_obj["hasAttachment"] is False
    assert email_obj["bodyValues"] == {text[0]["partId"]: {
        "value": value, "isEncodingProblem": False, "isTruncated": False}}
    assert email_obj["preview"] == "Hello, world. Second line."
    assert download(client, text[0]["blobId"]) == value.replace("\n", "\r\n").encode()
    msg = parse(raw)
    assert structure(msg) == "text/plain"
    assert decoded_text(msg) == value
    assert msg["Subject"] == "Plain"


@pytest.mark.parametrize("value", [
    "Grüße, 日本語 ✓\n",
    "日本語のテキストはとても長いです。" * 5 + "\n",   # mostly multi-octet characters
    "Emoji 😀 and a mathematical 𝔸, no final newline",
    "=?UTF-8?B?bm90IGEgd29yZA==?= stays text, = and =3D too\n",
    "\tTab first, trailing spaces   \nand a line with only spaces:\n   \n",
    ".\nFrom the start of a line\n-- \nsignature\n",
], ids=["mixed", "cjk", "astral", "encoded-word-lookalike", "whitespace", "dot-from"])
def test_create_text_values_round_trip(writer, value):
    created, raw = create_raw(writer, text_email(value))
    email_obj = get_one(writer.client, created["id"], properties=["textBody", "bodyValues"],
                        fetchTextBodyValues=True)
    part = email_obj["textBody"][0]
    assert email_obj["bodyValues"][part["partId"]]["value"] == value
    octets = download(writer.client, part["blobId"])
    assert part["size"] == len(octets)
    assert octets.decode("utf-8") == value.replace("\n", "\r\n")
    assert decoded_text(parse(raw)) == value


@pytest.mark.parametrize("value", [
    "x" * 1200 + "\n",                          # one word longer than a line may be
    " ".join(["word"] * 400) + "\n",            # a long line with spaces
    "ü" * 700 + "\nshort\n" + "y" * 5000,       # long non-ASCII, then long without newline
    ("a" * 997 + "\n") * 3,                     # 997: fits 7bit; 998 with CR would not
    "b" * 998 + "\n" + "c" * 999 + "\n",        # exactly at and beyond the limit
], ids=["no-spaces", "spaces", "non-ascii", "997", "998-999"])
def test_create_long_lines_are_wrapped_and_read_back_whole(writer, value):
    created, raw = create_raw(writer, text_email(value))  # check_octets: all lines <= 998
    email_obj = get_one(writer.client, created["id"], properties=["textBody", "bodyValues"],
                        fetchTextBodyValues=True)
    assert email_obj["bodyValues"][email_obj["textBody"][0]["partId"]]["value"] == value
    assert decoded_text(parse(raw)) == value


def test_create_line_end_mix_becomes_crlf(writer):
    value = "one\r\ntwo\rthree\nfour\r\n\r\nsix\n\rseven\r"
    created, raw = create_raw(writer, text_email(value))
    expected = "one\ntwo\nthree\nfour\n\nsix\n\nseven\n"
    email_obj = get_one(writer.client, created["id"], properties=["textBody", "bodyValues"],
                        fetchTextBodyValues=True)
    assert email_obj["bodyValues"][email_obj["textBody"][0]["partId"]]["value"] == expected
    assert decoded_text(parse(raw)) == expected
    assert b"\r\r" not in raw and b"\n\n" not in raw


def test_create_text_and_html_is_multipart_alternative(writer):
    text = "Plain version.\n"
    html = "<html><body><p>Rich <b>version</b> – ünïcode.</p></body></html>\n"
    created, raw = create_raw(writer, {
        "textBody": [{"partId": "t", "type": "text/plain"}],
        "htmlBody": [{"partId": "h", "type": "text/html"}],
        "bodyValues": {"t": {"value": text}, "h": {"value": html}},
    })
    email_obj = get_one(writer.client, created["id"], fetchAllBodyValues=True,
                        properties=["bodyStructure", "textBody", "htmlBody", "attachments",
                                    "bodyValues", "hasAttachment"],
                        bodyProperties=["partId", "type", "subParts"])
    tree = email_obj["bodyStructure"]
    assert tree["type"] == "multipart/alternative"
    plain, rich = tree["subParts"]
    assert (plain["type"], rich["type"]) == ("text/plain", "text/html")
    # subParts is null for a leaf (§4.1.4)
    assert email_obj["textBody"] == [{"partId": plain["partId"], "type": "text/plain",
                                      "subParts": None}]
    assert email_obj["htmlBody"] == [{"partId": rich["partId"], "type": "text/html",
                                      "subParts": None}]
    assert email_obj["attachments"] == [] and email_obj["hasAttachment"] is False
    assert email_obj["bodyValues"] == {
        plain["partId"]: {"value": text, "isEncodingProblem": False, "isTruncated": False},
        rich["partId"]: {"value": html, "isEncodingProblem": False, "isTruncated": False}}
    msg = parse(raw)
    assert structure(msg) == ("multipart/alternative", ["text/plain", "text/html"])
    assert decoded_text(msg.get_body(preferencelist=("plain",))) == text
    assert decoded_text(msg.get_body(preferencelist=("html",))) == html


@pytest.mark.parametrize("data", [
    BINARY,
    b"col1,col2\nLF,only\n",                 # text with bare LF: must survive unchanged
    b"CRLF text\r\nwithout a final newline",
    b"",
    b"\r\n\r\nleading empty lines\r\n\r\n",
], ids=["binary", "lf-text", "crlf-no-final", "empty", "blank-lines"])
def test_create_attachment_by_blob_id_is_byte_exact(writer, data):
    blob = upload(writer.client, data)
    created, raw = create_raw(writer, text_email("See attachment.\n", attachments=[
        {"blobId": blob, "type": "application/x-test", "name": "data.bin",
         "disposition": "attachment"}]))
    email_obj = get_one(writer.client, created["id"],
                        properties=["attachments", "hasAttachment", "textBody"])
    assert email_obj["hasAttachment"] is True
    (att,) = email_obj["attachments"]
    assert {k: att[k] for k in ("type", "name", "disposition", "size", "cid")} == {
        "type": "application/x-test", "name": "data.bin", "disposition": "attachment",
        "size": len(data), "cid": None}
    assert download(writer.client, att["blobId"]) == data
    msg = parse(raw)
    assert structure(msg) == ("multipart/mixed", ["text/plain", "application/x-test"])
    (part,) = msg.iter_attachments()
    assert part.get_payload(decode=True) == data
    assert part.get_filename() == "data.bin"
    assert part.get_content_disposition() == "attachment"


def test_create_text_blob_with_charset(writer):
    """A text part from a blob keeps the charset the client names (§4.6: charset may be given
    with a blobId) and reads back decoded by it."""
    blob = upload(writer.client, "Grüße aus Köln\r\n".encode("latin-1"), "text/plain")
    created, raw = create_raw(writer, {
        "bodyStructure": {"blobId": blob, "type": "text/plain", "charset": "iso-8859-1"}})
    email_obj = get_one(writer.client, created["id"], properties=["textBody", "bodyValues"],
                        fetchTextBodyValues=True)
    (part,) = email_obj["textBody"]
    assert part["charset"].lower() == "iso-8859-1"
    assert email_obj["bodyValues"][part["partId"]]["value"] == "Grüße aus Köln\n"
    assert download(writer.client, part["blobId"]) == "Grüße aus Köln\r\n".encode("latin-1")
    msg = parse(raw)
    assert msg.get_content_charset() == "iso-8859-1"
    assert decoded_text(msg) == "Grüße aus Köln\n"


def test_create_html_only(writer):
    html = "<p>Only <i>HTML</i> here.</p>\n"
    created, raw = create_raw(writer, {"htmlBody": [{"partId": "h", "type": "text/html"}],
                                       "bodyValues": {"h": {"value": html}}})
    email_obj = get_one(writer.client, created["id"], fetchHTMLBodyValues=True,
                        properties=["htmlBody", "bodyValues", "attachments"],
                        bodyProperties=["partId", "type"])
    (part,) = email_obj["htmlBody"]
    assert part["type"] == "text/html" and email_obj["attachments"] == []
    assert email_obj["bodyValues"][part["partId"]]["value"] == html
    msg = parse(raw)
    assert structure(msg) == "text/html" and decoded_text(msg) == html


def test_create_attached_message_with_lf_line_ends(writer):
    inner = b"From: x@example.com\nSubject: lf only\n\nbody line\n"
    blob = upload(writer.client, inner, "message/rfc822")
    created, raw = create_raw(writer, text_email(attachments=[
        {"blobId": blob, "type": "message/rfc822"}]))
    assert re.search(rb"(?<!\r)\n", raw) is None, raw
    msg = parse(raw)
    (attached,) = msg.iter_attachments()
    assert attached.get_content_type() == "message/rfc822"
    assert attached.get_content()["Subject"] == "lf only"


def test_create_attached_message_keeps_its_octets(writer):
    """A CRLF message attached as message/rfc822 (not base64: RFC 2046 §5.2.1) reads back
    octet for octet through its part blobId, and Email/parse reads it."""
    blob = upload(writer.client, INNER, "message/rfc822")
    created, raw = create_raw(writer, text_email(attachments=[
        {"blobId": blob, "type": "message/rfc822", "disposition": "attachment",
         "name": "inner.eml"}]))
    msg = parse(raw)
    (attached,) = msg.iter_attachments()
    assert attached.get_content_type() == "message/rfc822"
    assert attached["Content-Transfer-Encoding"] in ("7bit", "8bit", "binary")
    assert attached.get_content()["Subject"] == "Inner subject ü"
    (att,) = get_one(writer.client, created["id"], properties=["attachments"])["attachments"]
    assert download(writer.client, att["blobId"]) == INNER
    parsed = email_parse(writer.client, [att["blobId"]], properties=["subject"])
    assert parsed["parsed"] == {att["blobId"]: {"subject": "Inner subject ü"}}


@pytest.mark.parametrize("value", [
    pytest.param("Short lines.\nOnly.\n", id="short"),
    pytest.param("x" * 1200 + "\n", id="long-word"),
    pytest.param("Grüße " * 100 + "\n", id="non-ascii-long"),
    pytest.param(" ".join(["word"] * 40) + "\n", id="200-with-spaces"),
    pytest.param("a" * 997 + "\n", id="997"),
])
def test_create_all_message_lines_within_78(writer, value):
    """Every line of the written message, body included, within 78 octets where a fold or
    a soft line break exists (RFC 5322 §2.1.1, RFC 2045 §6.7 (5))."""
    blob = upload(writer.client, BINARY)
    _, raw = create_raw(writer, text_email(value, subject="Lines", attachments=[
        {"blobId": blob, "type": "application/octet-stream", "name": "b.bin"}]))
    long_lines = [line[:90] for line in raw.split(b"\r\n") if len(line) > 78]
    assert not long_lines, long_lines


def test_create_subject_with_line_breaks_is_no_header_injection(writer):
    subject = "Hello\r\nBcc: evil@example.com"
    created, raw = create_raw(writer, text_email(subject=subject))
    msg = parse(raw)
    assert msg["Bcc"] is None and b"\r\nBcc:" not in header_block(raw)
    email_obj = get_one(writer.client, created["id"], properties=["bcc", "subject"])
    assert email_obj["bcc"] is None
    assert "evil@example.com" in email_obj["subject"]


def test_create_forward_attachment_by_part_blob_id(writer):
    """A client forwards an attachment by the blobId Email/get gave for the part (§4.1.4)."""
    blob = upload(writer.client, BINARY)
    first, _ = create_raw(writer, text_email(attachments=[
        {"blobId": blob, "type": "application/octet-stream", "name": "orig.bin"}]))
    (att,) = get_one(writer.client, first["id"], properties=["attachments"])["attachments"]
    assert att["blobId"] != blob  # a part of the message, not the upload
    forward, raw = create_raw(writer, text_email("Forwarding.\n", attachments=[
        {"blobId": att["blobId"], "type": "application/zip", "name": "again.zip"}]))
    (again,) = get_one(writer.client, forward["id"], properties=["attachments"])["attachments"]
    assert (again["type"], again["name"], again["size"]) == ("application/zip", "again.zip",
                                                             len(BINARY))
    assert download(writer.client, again["blobId"]) == BINARY
    (part,) = parse(raw).iter_attachments()
    assert part.get_payload(decode=True) == BINARY


def test_create_attachment_size_given_with_blob_is_ignored(writer):
    """§4.6: with a blobId, `size` may be given but is ignored (calculated from the blob)."""
    blob = upload(writer.client, b"12345")
    created, _ = create_raw(writer, text_email(attachments=[
        {"blobId": blob, "type": "text/csv", "size": 999999}]))
    (att,) = get_one(writer.client, created["id"], properties=["attachments"])["attachments"]
    assert att["size"] == 5


LONG_NAME = ("Überweisungsbestätigung für das Geschäftsjahr 2026 – Quartalsübersicht "
             "mit allen Anhängen, Belegen und Kontoauszügen (endgültige Fassung) 日本語.pdf")


NAMES = [
    ("latin1", "Bericht über Größen.pdf"),
    ("long-2231", LONG_NAME),                                     # RFC 2231 continuations
    ("long-ascii", "a rather long plain ASCII file name with many words in it, more than 78.txt"),
    ("specials", 'quotes "and" back\\slash; semicolon = equals.txt'),
    ("ew-lookalike", "=?UTF-8?B?bm90IGVuY29kZWQ=?=.txt"),
    ("long-token", "x" * 150 + ".bin"),                           # one long token
    ("cjk", "日本語のファイル名.txt"),
]


def create_named_attachment(writer, name, disposition):
    blob = upload(writer.client, b"%PDF-1.4 not really\n")
    att = {"blobId": blob, "type": "application/pdf", "name": name}
    if disposition:
        att["disposition"] = disposition
    return create_raw(writer, text_email(attachments=[att]))


@pytest.mark.parametrize("name", [
    pytest.param(name, id=label) for label, name in NAMES])
@pytest.mark.parametrize("disposition", ["attachment", None])
def test_create_attachment_names_round_trip(writer, name, disposition):
    created, raw = create_named_attachment(writer, name, disposition)
    (got,) = get_one(writer.client, created["id"], properties=["attachments"])["attachments"]
    assert got["name"] == name
    assert got["disposition"] == disposition
    msg = parse(raw)
    (part,) = msg.iter_attachments()
    assert part.get_filename() == name
    assert part.get_content_disposition() == disposition


@pytest.mark.parametrize("name", [
    pytest.param(name, id=label) for label, name in NAMES])
def test_create_attachment_name_header_lines_within_78(writer, name):
    """RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; RFC 2231 §3 splits long
    parameter values, so a long file name never needs a longer line."""
    _, raw = create_named_attachment(writer, name, "attachment")
    long_lines = [line for line in header_lines(raw) if len(line) > 78]
    assert not long_lines, long_lines


def test_create_inline_image_goes_into_multipart_related(writer):
    client = writer.client
    png = upload(client, PNG, "image/png")
    pdf = upload(client, b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "application/pdf")
    html = '<p>Our logo: <img src="cid:logo.1@example.com"></p>\n'
    created, raw = create_raw(writer, {
        "textBody": [{"partId": "t", "type": "text/plain"}],
        "htmlBody": [{"partId": "h", "type": "text/html"}],
        "bodyValues": {"t": {"value": "Our logo: (image)\n"}, "h": {"value": html}},
        "attachments": [
            {"blobId": png, "type": "image/png", "disposition": "inline",
             "cid": "logo.1@example.com", "name": "logo.png"},
            {"blobId": pdf, "type": "application/pdf", "name": "terms.pdf",
             "disposition": "attachment"},
        ],
    })
    msg = parse(raw)
    assert structure(msg) == ("multipart/mixed", [
        ("multipart/alternative", ["text/plain", ("multipart/related", ["text/html",
                                                                      "image/png"])]),
        "application/pdf"])
    image = next(p for p in msg.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo.1@example.com>"
    assert image.get_content_disposition() == "inline"
    assert image.get_payload(decode=True) == PNG
    email_obj = get_one(client, created["id"], properties=["attachments", "htmlBody",
                                                           "textBody"],
                        bodyProperties=["type", "cid", "disposition", "name", "blobId"])
    assert [p["type"] for p in email_obj["textBody"]] == ["text/plain"]
    assert [p["type"] for p in email_obj["htmlBody"]] == ["text/html"]
    atts = [{k: v for k, v in p.items() if k != "blobId"} for p in email_obj["attachments"]]
    assert atts == [
        {"type": "image/png", "cid": "logo.1@example.com", "disposition": "inline",
         "name": "logo.png"},
        {"type": "application/pdf", "cid": None, "disposition": "attachment",
         "name": "terms.pdf"}]
    assert download(client, email_obj["attachments"][0]["blobId"]) == PNG


def test_create_body_structure_given_directly(writer):
    client = writer.client
    pdf = upload(client, b"%PDF-1.4 fake\n", "application/pdf")
    created, raw = create_raw(writer, {
        "subject": "Structured",
        "bodyStructure": {"type": "multipart/mixed", "subParts": [
            {"type": "multipart/alternative", "subParts": [
                {"partId": "t", "type": "text/plain", "header:X-Foo:asText": "bär ✓",
                 "language": ["de"]},
                {"partId": "h", "type": "text/html", "location": "https://example.com/x"},
            ]},
            {"blobId": pdf, "type": "application/pdf", "name": "doc.pdf",
             "disposition": "attachment"},
        ]},
        "bodyValues": {"t": {"value": "Text teil\n"}, "h": {"value": "<p>HTML teil</p>\n"}},
    })
    email_obj = get_one(client, created["id"], fetchAllBodyValues=True,
                        properties=["bodyStructure", "bodyValues", "textBody", "htmlBody",
                                    "attachments"],
                        bodyProperties=["partId", "type", "header:X-Foo:asText", "name",
                                        "disposition", "language", "location", "subParts"])
    tree = email_obj["bodyStructure"]
    alt, doc = tree["subParts"]
    plain, rich = alt["subParts"]

    def shape(part):
        out = {k: part[k] for k in ("type", "header:X-Foo:asText", "name", "disposition",
                                    "language", "location")}
        if part["type"].startswith("multipart/"):
            out["subParts"] = [shape(p) for p in part["subParts"]]
        return out

    none = {"header:X-Foo:asText": None, "name": None, "disposition": None, "language": None,
            "location": None}
    assert shape(tree) == {**none, "type": "multipart/mixed", "subParts": [
        {**none, "type": "multipart/alternative", "subParts": [
            {**none, "type": "text/plain", "header:X-Foo:asText": "bär ✓", "language": ["de"]},
            {**none, "type": "text/html", "location": "https://example.com/x"}]},
        {**none, "type": "application/pdf", "name": "doc.pdf", "disposition": "attachment"}]}
    assert [p["partId"] for p in email_obj["textBody"]] == [plain["partId"]]
    assert [p["partId"] for p in email_obj["htmlBody"]] == [rich["partId"]]
    assert [p["partId"] for p in email_obj["attachments"]] == [doc["partId"]]
    assert {k: v["value"] for k, v in email_obj["bodyValues"].items()} == {
        plain["partId"]: "Text teil\n", rich["partId"]: "<p>HTML teil</p>\n"}
    msg = parse(raw)
    assert structure(msg) == ("multipart/mixed", [
        ("multipart/alternative", ["text/plain", "text/html"]), "application/pdf"])
    text_part = msg.get_body(preferencelist=("plain",))
    assert text_part["X-Foo"] == "bär ✓"
    assert text_part["Content-Language"] == "de"
    assert msg["Subject"] == "Structured"
    assert next(msg.iter_attachments()).get_payload(decode=True) == b"%PDF-1.4 fake\n"


def test_create_body_structure_single_leaf(writer):
    """A bodyStructure that is one text part: the message is that part, no multipart."""
    created, raw = create_raw(writer, {
        "bodyStructure": {"partId": "only", "type": "text/plain"},
        "bodyValues": {"only": {"value": "Just me.\n"}}})
    msg = parse(raw)
    assert structure(msg) == "text/plain" and decoded_text(msg) == "Just me.\n"


def test_create_without_body_is_an_empty_text_message(writer):
    created, raw = create_raw(writer, {"subject": "Nothing to say"})
    msg = parse(raw)
    assert structure(msg) == "text/plain" and decoded_text(msg) == ""
    email_obj = get_one(writer.client, created["id"], properties=["subject", "attachments"])
    assert email_obj == {"id": created["id"], "subject": "Nothing to say", "attachments": []}


# =============================================================================
# Email/set create: header fields (RFC 8621 §4.1.2, §4.1.3)
# =============================================================================

HEADERS = {
    "from": [{"name": "Smith, John", "email": "john@example.com"},
             {"name": "Groß, Jürgen", "email": "juergen@example.de"}],
    "sender": [{"name": 'Zoë "Z" O\'Brien', "email": "zoe@example.com"}],
    "to": [{"name": "日本語", "email": "taro@example.jp"},
           {"name": None, "email": "bare@example.com"},
           {"name": "Plain Name", "email": "plain@example.com"}],
    "cc": [{"name": "back\\slash (not a comment)", "email": "cc@example.com"}],
    "bcc": [{"name": None, "email": "hidden@example.com"}],
    "replyTo": [{"name": "Lists: dept.", "email": "list@example.com"}],
    "subject": "Übergrößenträger und Fußgängerübergänge: ein sehr langer Betreff, "
               "länger als achtundsiebzig Zeichen",
    "messageId": ["given.1@example.com"],
    "inReplyTo": ["parent.1@example.com"],
    "references": ["root.1@example.com", "parent.1@example.com"],
    "sentAt": "2026-11-26T10:00:00+01:00",
    "header:X-Custom:asText": "Grüße ✓ from a custom field",
    "header:X-Raw": " raw value",
    "header:List-Unsubscribe:asURLs": ["mailto:unsub@example.com?subject=bye",
                                       "https://example.com/unsub?id=1&x=2"],
    "header:X-Multi:all": [" one", " two"],
}


@pytest.fixture(scope="module")
def headed(writer):
    created, raw = create_raw(writer, text_email("Headers.\n", **HEADERS))
    return created, raw, parse(raw)


def test_create_headers_read_back_identical(writer, headed):
    created, _, _ = headed
    email_obj = get_one(writer.client, created["id"], properties=list(HEADERS))
    assert email_obj == {"id": created["id"], **HEADERS}


def test_create_headers_parsed_by_python(headed):
    _, raw, msg = headed

    def addresses(field):
        return [(a.display_name, a.addr_spec) for a in msg[field].addresses]

    assert addresses("From") == [("Smith, John", "john@example.com"),
                                 ("Groß, Jürgen", "juergen@example.de")]
    assert addresses("Sender") == [('Zoë "Z" O\'Brien', "zoe@example.com")]
    assert addresses("To") == [("日本語", "taro@example.jp"), ("", "bare@example.com"),
                               ("Plain Name", "plain@example.com")]
    assert addresses("Cc") == [("back\\slash (not a comment)", "cc@example.com")]
    assert addresses("Bcc") == [("", "hidden@example.com")]
    assert addresses("Reply-To") == [("Lists: dept.", "list@example.com")]
    assert msg["Subject"] == HEADERS["subject"]
    assert msg["Message-ID"] == "<given.1@example.com>"
    assert msg["In-Reply-To"] == "<parent.1@example.com>"
    assert msg["References"].split() == ["<root.1@example.com>", "<parent.1@example.com>"]
    assert msg["Date"].datetime == datetime(2026, 11, 26, 10, 0, tzinfo=timezone(
        timedelta(hours=1)))
    assert msg["X-Custom"] == "Grüße ✓ from a custom field"
    assert msg["List-Unsubscribe"] == ("<mailto:unsub@example.com?subject=bye>, "
                                       "<https://example.com/unsub?id=1&x=2>")
    assert msg.get_all("X-Multi") == ["one", "two"]
    assert msg["MIME-Version"] == "1.0"
    assert b"\r\nX-Raw: raw value\r\n" in header_block(raw)  # Raw: the octets as given
    for name in ("From", "Sender", "To", "Cc", "Bcc", "Reply-To", "Subject", "Date",
                 "Message-ID", "MIME-Version"):
        assert len(msg.get_all(name)) == 1, name


def test_create_header_lines_within_78_ascii(writer):
    """RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; long fields are folded."""
    subject = ("A plain ASCII subject that is rather long, much longer than seventy-eight "
               "characters, and it must be folded between words to stay readable")
    to = [{"name": f"Recipient Number {i}", "email": f"recipient.{i}@example.com"}
          for i in range(8)]
    refs = [f"ref.{i}.{'x' * 20}@example.com" for i in range(6)]
    created, raw = create_raw(writer, text_email(subject=subject, to=to, references=refs))
    assert max(len(line) for line in header_lines(raw)) <= 78, header_lines(raw)
    msg = parse(raw)
    assert msg["Subject"] == subject
    assert [a.addr_spec for a in msg["To"].addresses] == [a["email"] for a in to]
    email_obj = get_one(writer.client, created["id"], properties=["subject", "to",
                                                                  "references"])
    assert email_obj == {"id": created["id"], "subject": subject, "to": to,
                         "references": refs}


def test_create_header_lines_within_78_non_ascii_subject(writer, headed):
    _, raw, _ = headed
    lines = header_lines(raw)
    assert max(len(line) for line in lines) <= 78, [ln for ln in lines if len(ln) > 78]


def test_create_long_non_ascii_display_name(writer):
    """A name longer than one encoded-word (75 octets) is written as several."""
    name = "Jürgen Groß-Übermaß von und zu Langnamen-Haus, Abteilung Fußböden"
    created, raw = create_raw(writer, text_email(
        **{"from": [{"name": name, "email": "j@example.de"}]}))
    email_obj = get_one(writer.client, created["id"], properties=["from"])
    assert email_obj["from"] == [{"name": name, "email": "j@example.de"}]
    # Python's structured-header parser keeps the space between adjacent encoded-words
    # in a phrase (RFC 2047 §6.2 says to drop it), so decode the phrase with
    # email.header, which follows §6.2.
    compat = email.message_from_bytes(raw)
    ((display, addr),) = email.utils.getaddresses(compat.get_all("From"))
    assert addr == "j@example.de"
    assert str(email.header.make_header(email.header.decode_header(display))) == name
    check_octets(raw)


def test_create_grouped_addresses_round_trip(writer):
    groups = [
        {"name": "Friends, old", "addresses": [
            {"name": "Ann", "email": "ann@example.com"},
            {"name": None, "email": "bob@example.com"}]},
        {"name": None, "addresses": [{"name": "Carl Dee", "email": "carl@example.com"}]},
        {"name": "Lists", "addresses": [{"name": "Dörte", "email": "d@example.de"}]},
        {"name": "Empty", "addresses": []},
    ]
    created, raw = create_raw(writer, text_email(**{"header:To:asGroupedAddresses": groups}))
    email_obj = get_one(writer.client, created["id"],
                        properties=["header:To:asGroupedAddresses", "to"])
    assert email_obj["header:To:asGroupedAddresses"] == groups
    assert email_obj["to"] == [a for g in groups for a in g["addresses"]]
    msg = parse(raw)
    got = [(g.display_name, [(a.display_name, a.addr_spec) for a in g.addresses])
           for g in msg["To"].groups]
    assert got == [("Friends, old", [("Ann", "ann@example.com"), ("", "bob@example.com")]),
                   (None, [("Carl Dee", "carl@example.com")]),
                   ("Lists", [("Dörte", "d@example.de")]),
                   ("Empty", [])]


def test_create_non_ascii_group_name(writer):
    groups = [{"name": "Übergruppe", "addresses": [{"name": "Dörte", "email": "d@example.de"}]}]
    created, raw = create_raw(writer, text_email(**{"header:To:asGroupedAddresses": groups}))
    email_obj = get_one(writer.client, created["id"], properties=["header:To:asGroupedAddresses"])
    assert email_obj["header:To:asGroupedAddresses"] == groups
    assert not re.search(rb"\?=[:;,<>@]", header_block(raw)), header_block(raw)
    msg = parse(raw)
    assert [g.display_name for g in msg["To"].groups] == ["Übergruppe"]


@pytest.mark.parametrize("sent_at, date", [
    ("2026-11-26T10:00:00+01:00", datetime(2026, 11, 26, 9, 0, tzinfo=timezone.utc)),
    ("2026-01-31T23:59:59-08:30", datetime(2026, 2, 1, 8, 29, 59, tzinfo=timezone.utc)),
    ("2026-06-01T12:00:00Z", datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)),
], ids=["plus-one", "minus-half", "zulu"])
def test_create_sent_at_keeps_its_offset(writer, sent_at, date):
    created, raw = create_raw(writer, text_email(sentAt=sent_at))
    got = get_one(writer.client, created["id"], properties=["sentAt"])["sentAt"]
    # §4.1.3: sentAt is a Date in the Date header's own offset; Z and +00:00 are one.
    assert got == sent_at or (sent_at.endswith("Z") and got == sent_at[:-1] + "+00:00")
    assert parse(raw)["Date"].datetime == date


def test_create_server_sets_message_id_date_and_mime_version(writer):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    created, raw = create_raw(writer, text_email())
    after = datetime.now(timezone.utc)
    email_obj = get_one(writer.client, created["id"], properties=["messageId", "sentAt",
                                                                  "receivedAt"])
    (message_id,) = email_obj["messageId"]  # §4.6: the server MUST generate one
    assert re.fullmatch(r"[^@\s<>]+@[^@\s<>]+", message_id), message_id
    msg = parse(raw)
    assert msg["Message-ID"] == f"<{message_id}>"
    assert msg["MIME-Version"] == "1.0"
    sent = datetime.fromisoformat(email_obj["sentAt"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=2) <= sent <= after + timedelta(seconds=2)
    assert msg["Date"].datetime == sent
    received = datetime.fromisoformat(email_obj["receivedAt"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=2) <= received <= after + timedelta(seconds=2)
    for name in ("Message-ID", "Date", "MIME-Version"):
        assert len(msg.get_all(name)) == 1, name
    # and a second draft gets a Message-ID of its own
    second, _ = create_raw(writer, text_email())
    other = get_one(writer.client, second["id"], properties=["messageId"])["messageId"]
    assert other != [message_id]


def test_create_header_x_custom_forms(writer):
    created, raw = create_raw(writer, text_email(**{
        "header:X-Text:asText": "plain words",
        "header:X-Addr:asAddresses": [{"name": "A, B", "email": "ab@example.com"}],
        "header:X-Ids:asMessageIds": ["a@b", "c@d"],
        "header:X-When:asDate": "2025-05-05T05:05:05-05:00",
        "header:X-Link:asURLs": ["https://example.com/a"],
        "header:X-Raws:all": [" first", " second\r\n folded"],
    }))
    email_obj = get_one(writer.client, created["id"], properties=[
        "header:X-Text:asText", "header:X-Addr:asAddresses", "header:X-Ids:asMessageIds",
        "header:X-When:asDate", "header:X-Link:asURLs", "header:X-Raws:all",
        "header:X-Raws:asText:all"])
    assert email_obj == {
        "id": created["id"],
        "header:X-Text:asText": "plain words",
        "header:X-Addr:asAddresses": [{"name": "A, B", "email": "ab@example.com"}],
        "header:X-Ids:asMessageIds": ["a@b", "c@d"],
        "header:X-When:asDate": "2025-05-05T05:05:05-05:00",
        "header:X-Link:asURLs": ["https://example.com/a"],
        "header:X-Raws:all": [" first", " second\r\n folded"],
        "header:X-Raws:asText:all": ["first", "second folded"],
    }
    msg = parse(raw)
    assert msg.get_all("X-Raws") == ["first", "second folded"]
    assert email.utils.getaddresses(msg.get_all("X-Addr")) == [("A, B", "ab@example.com")]


# =============================================================================
# Email/set create: metadata, counts, changes, query, threads
# =============================================================================


def drafts_counts(acct):
    box = acct.client.ok("Mailbox/get", {"accountId": acct.id, "ids": [acct.drafts],
                                         "properties": ["totalEmails", "unreadEmails",
                                                        "totalThreads", "unreadThreads"]})
    return {k: v for k, v in box["list"][0].items() if k != "id"}


def test_create_keywords_mailboxes_counts_changes_and_query(fresh):
    client = fresh.client
    since = email_get(client, [])["state"]
    assert drafts_counts(fresh) == {"totalEmails": 0, "unreadEmails": 0, "totalThreads": 0,
                                    "unreadThreads": 0}
    resp = email_set(client, create={
        "seen": {"mailboxIds": {fresh.drafts: True}, "keywords": {"$draft": True, "$seen": True},
                 "subject": "First draft", "receivedAt": "2025-01-02T03:04:05Z",
                 **text_email("The xylophone quartet plays tonight.\n")},
        "draft": {"mailboxIds": {fresh.drafts: True}, "keywords": {"$Draft": True},
                  "subject": "Second draft", **text_email("Nothing special.\n")},
        "unread": {"mailboxIds": {fresh.drafts: True, fresh.role["archive"]: True},
                   "subject": "Third", **text_email("Nothing special either.\n")},
    })
    assert resp["notCreated"] is None, resp
    assert resp["oldState"] == since and resp["newState"] != since
    ids = {cid: c["id"] for cid, c in resp["created"].items()}
    assert all(set(c) == CREATED_KEYS for c in resp["created"].values())
    got = {e["id"]: e for e in email_get(client, list(ids.values()),
                                         properties=["keywords", "mailboxIds", "receivedAt"])
           ["list"]}
    assert got[ids["seen"]]["keywords"] == {"$draft": True, "$seen": True}
    assert got[ids["seen"]]["receivedAt"] == "2025-01-02T03:04:05Z"
    assert got[ids["draft"]]["keywords"] == {"$draft": True}  # lower case (§4.1.1)
    assert got[ids["unread"]]["keywords"] == {}
    assert got[ids["seen"]]["mailboxIds"] == {fresh.drafts: True}
    assert got[ids["unread"]]["mailboxIds"] == {fresh.drafts: True,
                                                fresh.role["archive"]: True}
    # §2: unreadEmails counts Emails with neither $seen nor $draft
    assert drafts_counts(fresh) == {"totalEmails": 3, "unreadEmails": 1, "totalThreads": 3,
                                    "unreadThreads": 1}
    changes = client.ok("Email/changes", {"accountId": fresh.id, "sinceState": since})
    assert sorted(changes["created"]) == sorted(ids.values())
    assert changes["updated"] == [] and changes["destroyed"] == []
    assert changes["newState"] == resp["newState"]
    query = client.ok("Email/query", {"accountId": fresh.id,
                                      "filter": {"inMailbox": fresh.drafts}})
    assert sorted(query["ids"]) == sorted(ids.values())
    found = client.ok("Email/query", {"accountId": fresh.id, "filter": {"text": "xylophone"}})
    assert found["ids"] == [ids["seen"]]
    found = client.ok("Email/query", {"accountId": fresh.id, "filter": {"body": "quartet"}})
    assert found["ids"] == [ids["seen"]]
    found = client.ok("Email/query", {"accountId": fresh.id,
                                      "filter": {"subject": "Second draft"}})
    assert found["ids"] == [ids["draft"]]
    assert client.ok("Email/query", {"accountId": fresh.id, "filter": {
        "text": "zeppelin"}})["ids"] == []


def test_create_reply_joins_the_thread(writer):
    tag = uuid.uuid4().hex[:12]
    root_id = f"root.{tag}@example.com"
    root, _ = create_raw(writer, text_email(subject=f"Plans {tag}", messageId=[root_id]),
                         mailbox=writer.inbox)
    reply, raw = create_raw(writer, text_email(
        subject=f"Re: Plans {tag}", inReplyTo=[root_id], references=[root_id]))
    other, _ = create_raw(writer, text_email(subject=f"Other {tag}"))
    assert reply["threadId"] == root["threadId"]
    assert other["threadId"] != root["threadId"]
    thread = writer.client.ok("Thread/get", {"accountId": writer.id,
                                             "ids": [root["threadId"]]})["list"][0]
    assert thread["emailIds"] == [root["id"], reply["id"]]
    msg = parse(raw)
    assert msg["In-Reply-To"] == f"<{root_id}>" and msg["References"] == f"<{root_id}>"


def test_create_in_request_with_creation_reference_and_result(writer):
    """A Mailbox made earlier in the request (#ref) and Email/get of the new #id."""
    resp = writer.client.request([
        ["Mailbox/set", {"accountId": writer.id, "create": {
            "box": {"name": f"Box {next(_names)}"}}}, "0"],
        ["Email/set", {"accountId": writer.id, "create": {
            "e": {"mailboxIds": {"#box": True}, **text_email(subject="referenced")}}}, "1"],
        ["Email/get", {"accountId": writer.id, "ids": ["#e"],
                       "properties": ["mailboxIds", "subject"]}, "2"],
    ])["methodResponses"]
    box = resp[0][1]["created"]["box"]["id"]
    new_id = resp[1][1]["created"]["e"]["id"]
    assert resp[2][1]["list"] == [{"id": new_id, "mailboxIds": {box: True},
                                   "subject": "referenced"}]


# =============================================================================
# Email/set create: SetErrors (RFC 8621 §4.6, RFC 8620 §5.3)
# =============================================================================

DROP = object()  # remove this key from the valid Email


def bad_cases():
    """(id, changes to a valid Email, the properties that must be named)."""
    part = {"partId": "t", "type": "text/plain"}
    return [
        ("headers", {"headers": [{"name": "X-A", "value": " b"}]}, ["headers"]),
        ("from-twice", {"from": [{"name": None, "email": "a@example.com"}],
                        "header:From:asAddresses": [{"name": None, "email": "b@example.com"}]},
         {"from", "header:From:asAddresses"}),
        ("from-twice-raw", {"header:from": " a@example.com",
                            "header:FROM:asAddresses": [{"name": None, "email": "b@e.com"}]},
         {"header:from", "header:FROM:asAddresses"}),
        ("forbidden-form", {"header:From:asDate": "2026-11-26T10:00:00Z"},
         ["header:From:asDate"]),
        ("forbidden-form-subject", {"header:Subject:asAddresses": []},
         ["header:Subject:asAddresses"]),
        ("unknown-form", {"header:X-A:asColour": "red"}, ["header:X-A:asColour"]),
        ("content-type-top", {"header:Content-Type": " text/plain"}, ["header:Content-Type"]),
        ("content-other-top", {"header:Content-Language:asText": "en"},
         ["header:Content-Language:asText"]),
        ("structure-and-text", {"bodyStructure": part}, {"bodyStructure", "textBody"}),
        ("structure-and-attachments", {"bodyStructure": part, "textBody": DROP,
                                       "attachments": []}, {"bodyStructure", "attachments"}),
        ("text-two-parts", {"textBody": [part, {"partId": "u", "type": "text/plain"}],
                            "bodyValues": {"t": {"value": "1"}, "u": {"value": "2"}}},
         ["textBody"]),
        ("text-is-html", {"textBody": [{"partId": "t", "type": "text/html"}]}, ["textBody"]),
        ("html-is-plain", {"htmlBody": [{"partId": "t", "type": "text/plain"}],
                           "textBody": DROP}, ["htmlBody"]),
        ("part-and-blob", {"textBody": [{"partId": "t", "blobId": "{blob}"}]}, ["textBody"]),
        ("no-part-no-blob", {"textBody": [{"type": "text/plain"}]}, ["textBody"]),
        ("part-id-not-in-values", {"textBody": [{"partId": "nope", "type": "text/plain"}]},
         {"textBody", "bodyValues"}),
        ("charset-with-part-id", {"textBody": [{**part, "charset": "utf-8"}]}, ["textBody"]),
        ("cte-on-part", {"textBody": [{**part, "header:Content-Transfer-Encoding": " base64"}]},
         ["textBody"]),
        ("cte-on-structure", {"textBody": DROP, "bodyStructure": {
            **part, "header:Content-Transfer-Encoding:asText": "8bit"}}, ["bodyStructure"]),
        ("headers-on-part", {"textBody": [{**part, "headers": []}]}, ["textBody"]),
        ("part-field-twice", {"attachments": [{"blobId": "{blob}", "disposition": "inline",
                                               "header:Content-Disposition": " inline"}]},
         ["attachments"]),
        ("structure-repeats-top-header", {"subject": "top", "textBody": DROP,
                                          "bodyStructure": {**part,
                                                            "header:Subject:asText": "part"}},
         {"bodyStructure", "subject"}),
        ("truncated-value", {"bodyValues": {"t": {"value": "x", "isTruncated": True}}},
         ["bodyValues"]),
        ("encoding-problem", {"bodyValues": {"t": {"value": "x", "isEncodingProblem": True}}},
         ["bodyValues"]),
        ("missing-mailbox-ids", {"mailboxIds": DROP}, ["mailboxIds"]),
        ("empty-mailbox-ids", {"mailboxIds": {}}, ["mailboxIds"]),
        ("unknown-mailbox", {"mailboxIds": {"M999999999": True}}, ["mailboxIds"]),
        ("mailbox-false", {"mailboxIds": {"{drafts}": False}}, ["mailboxIds"]),
        ("bad-keyword", {"keywords": {"bad keyword": True}}, ["keywords"]),
        ("keyword-false", {"keywords": {"$seen": False}}, ["keywords"]),
        ("received-at-not-utc", {"receivedAt": "2026-11-26T10:00:00+01:00"}, ["receivedAt"]),
        ("sent-at-not-a-date", {"sentAt": "yesterday"}, ["sentAt"]),
        ("id", {"id": "e1"}, ["id"]),
        ("blob-id", {"blobId": "{blob}"}, ["blobId"]),
        ("size", {"size": 10}, ["size"]),
        ("thread-id", {"threadId": "T1"}, ["threadId"]),
        ("preview", {"preview": "hi"}, ["preview"]),
        ("has-attachment", {"hasAttachment": False}, ["hasAttachment"]),
        ("unknown-property", {"colour": "blue"}, ["colour"]),
        ("subject-twice", {"subject": "a", "header:Subject:asText": "b"},
         {"subject", "header:Subject:asText"}),
        ("raw-header-injection", {"header:X-Raw": " a\r\nBcc: evil@example.com"},
         ["header:X-Raw"]),
        ("raw-bare-lf", {"header:X-Raw": " a\nb"}, ["header:X-Raw"]),
        ("address-with-space", {"to": [{"name": None, "email": "a b@example.com"}]}, ["to"]),
        ("message-id-with-brackets", {"messageId": ["<a@b>"]}, ["messageId"]),
        ("bad-media-type", {"attachments": [{"blobId": "{blob}", "type": "no slash"}]},
         ["attachments"]),
        pytest.param({"keywords": {"flag\n": True}}, ["keywords"], id="keyword-trailing-lf"),
        pytest.param({"attachments": [{"blobId": "{blob}", "type": "application/pdf\n"}]},
                     ["attachments"], id="media-type-trailing-lf"),
        pytest.param({"header:X-Evil\n": " v"}, ["header:X-Evil\n"], id="header-name-lf"),
    ]


def _fill(value, names):
    if isinstance(value, str) and value in names:
        return names[value]
    if isinstance(value, dict):
        return {_fill(k, names): _fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    return value


@pytest.fixture(scope="module")
def a_blob(writer):
    return upload(writer.client, b"attached octets")


@pytest.mark.parametrize("changes, expected", [
    c if hasattr(c, "marks") else pytest.param(*c[1:], id=c[0]) for c in bad_cases()])
def test_create_invalid_properties(writer, a_blob, changes, expected):
    names = {"{blob}": a_blob, "{drafts}": writer.drafts}
    bad = {"mailboxIds": {writer.drafts: True}, **text_email("x")}
    for key, value in _fill(changes, names).items():
        if value is DROP:
            bad.pop(key, None)
        else:
            bad[key] = value
    resp = email_set(writer.client, create={
        "bad": bad, "good": {"mailboxIds": {writer.drafts: True}, **text_email("fine")}})
    assert set(resp["created"] or {}) == {"good"}, resp  # the rest of the call goes on
    error = no_descriptions(resp["notCreated"]["bad"])
    assert error["type"] == "invalidProperties", error
    assert set(error) == {"type", "properties"}, error
    if isinstance(expected, set):  # either property of a conflicting pair may be named
        assert error["properties"] and set(error["properties"]) <= expected, error
    else:
        assert error["properties"] == expected, error


def test_create_blob_not_found_lists_exactly_the_missing(writer, a_blob):
    missing = ["B" + "1" * 64, "Gnosuchblob"]
    resp = email_set(writer.client, create={"k": {
        "mailboxIds": {writer.drafts: True}, **text_email(),
        "attachments": [{"blobId": missing[0], "type": "image/png"},
                        {"blobId": a_blob, "type": "text/plain"},
                        {"blobId": missing[1], "type": "application/pdf"}]},
        "ok": {"mailboxIds": {writer.drafts: True}, **text_email()}})
    assert set(resp["created"]) == {"ok"}
    error = no_descriptions(resp["notCreated"]["k"])
    assert error["type"] == "blobNotFound"
    assert sorted(error["notFound"]) == sorted(missing)
    assert set(error) == {"type", "notFound"}


def test_create_blob_of_another_account_is_not_found(writer, new_user):
    other = new_user("other")
    theirs = upload(other, b"someone else's upload")
    resp = email_set(writer.client, create={"k": {
        "mailboxIds": {writer.drafts: True}, **text_email(),
        "attachments": [{"blobId": theirs, "type": "text/plain"}]}})
    assert no_descriptions(resp["notCreated"]["k"]) == {"type": "blobNotFound",
                                                         "notFound": [theirs]}


def test_create_failed_changes_nothing(fresh):
    state = email_get(fresh.client, [])["state"]
    resp = email_set(fresh.client, create={"k": {"mailboxIds": {fresh.drafts: True},
                                                 "headers": []}})
    assert resp["created"] is None and resp["newState"] == state
    assert drafts_counts(fresh)["totalEmails"] == 0
    assert email_get(fresh.client, None, properties=["id"])["list"] == []


# =============================================================================
# tooManyMailboxes / tooManyKeywords: Email/set create and update, Email/import
# =============================================================================


class Crowded:
    """An account with 101 extra Mailboxes and one Email."""

    def __init__(self, acct):
        self.acct = acct
        client = acct.client
        resp = client.ok("Mailbox/set", {"accountId": acct.id, "create": {
            f"m{i}": {"name": f"Box {i:03d}"} for i in range(101)}})
        assert resp["notCreated"] is None, resp["notCreated"]
        self.boxes = [resp["created"][f"m{i}"]["id"] for i in range(101)]
        self.email, _ = create_raw(acct, text_email(subject="crowded"))
        self.message = b"From: a@example.com\r\nSubject: imported\r\n\r\nbody\r\n"
        self.blob = upload(client, self.message, "message/rfc822")


@pytest.fixture(scope="module")
def crowded(srv):
    return Crowded(Account(make_user(srv, "crowded")))


def mailboxes(crowded, n):
    return dict.fromkeys(crowded.boxes[:n], True)


def keywords(n):
    return {f"kw{i}": True for i in range(n)}


def test_max_mailboxes_per_email_advertised(crowded):
    session = crowded.acct.client.session
    caps = session["accounts"][crowded.acct.id]["accountCapabilities"][MAIL]
    assert caps["maxMailboxesPerEmail"] == 100


def test_too_many_mailboxes_on_create(crowded):
    resp = email_set(crowded.acct.client, create={
        "over": {"mailboxIds": mailboxes(crowded, 101), **text_email()},
        "limit": {"mailboxIds": mailboxes(crowded, 100), **text_email()}})
    assert no_descriptions(resp["notCreated"]) == {"over": {"type": "tooManyMailboxes"}}
    new_id = resp["created"]["limit"]["id"]
    assert get_one(crowded.acct.client, new_id, properties=["mailboxIds"])["mailboxIds"] == \
        mailboxes(crowded, 100)


def test_too_many_keywords_on_create(crowded):
    resp = email_set(crowded.acct.client, create={
        "over": {"mailboxIds": mailboxes(crowded, 1), "keywords": keywords(101),
                 **text_email()},
        "limit": {"mailboxIds": mailboxes(crowded, 1), "keywords": keywords(100),
                  **text_email()}})
    assert no_descriptions(resp["notCreated"]) == {"over": {"type": "tooManyKeywords"}}
    new_id = resp["created"]["limit"]["id"]
    assert get_one(crowded.acct.client, new_id, properties=["keywords"])["keywords"] == \
        keywords(100)


def test_too_many_mailboxes_and_keywords_on_update(crowded):
    client, email_id = crowded.acct.client, crowded.email["id"]
    before = get_one(client, email_id, properties=["mailboxIds", "keywords"])
    resp = email_set(client, update={email_id: {"mailboxIds": mailboxes(crowded, 101)}})
    assert no_descriptions(resp["notUpdated"]) == {email_id: {"type": "tooManyMailboxes"}}
    resp = email_set(client, update={email_id: {"keywords": keywords(101)}})
    assert no_descriptions(resp["notUpdated"]) == {email_id: {"type": "tooManyKeywords"}}
    # with patches: up to 100 Mailboxes (Drafts and 99 more) and 100 keywords; then one more
    assert before["mailboxIds"] == {crowded.acct.drafts: True}
    patch = {f"mailboxIds/{m}": True for m in crowded.boxes[:99]}
    patch.update({f"keywords/kw{i}": True for i in range(100)})
    resp = email_set(client, update={email_id: patch})
    assert resp["notUpdated"] is None and email_id in resp["updated"], resp
    resp = email_set(client, update={email_id: {f"mailboxIds/{crowded.boxes[100]}": True}})
    assert no_descriptions(resp["notUpdated"]) == {email_id: {"type": "tooManyMailboxes"}}
    resp = email_set(client, update={email_id: {"keywords/one-more": True}})
    assert no_descriptions(resp["notUpdated"]) == {email_id: {"type": "tooManyKeywords"}}
    after = get_one(client, email_id, properties=["mailboxIds", "keywords"])
    assert after["mailboxIds"] == {**before["mailboxIds"], **mailboxes(crowded, 99)}
    assert after["keywords"] == keywords(100)
    # put it back for the other tests
    email_set(client, update={email_id: {"mailboxIds": before["mailboxIds"],
                                         "keywords": before["keywords"]}})


def test_too_many_mailboxes_and_keywords_on_import(crowded):
    client = crowded.acct.client
    resp = client.ok("Email/import", {"accountId": crowded.acct.id, "emails": {
        "boxes": {"blobId": crowded.blob, "mailboxIds": mailboxes(crowded, 101)},
        "kws": {"blobId": crowded.blob, "mailboxIds": mailboxes(crowded, 1),
                "keywords": keywords(101)},
        "fine": {"blobId": crowded.blob, "mailboxIds": mailboxes(crowded, 100),
                 "keywords": keywords(100)}}})
    assert no_descriptions(resp["notCreated"]) == {"boxes": {"type": "tooManyMailboxes"},
                                                   "kws": {"type": "tooManyKeywords"}}
    assert set(resp["created"]) == {"fine"}


def test_quoted_printable_single_long_line_has_crlf_soft_breaks(writer):
    """A long line without any line end, mostly ASCII with some non-ASCII, is written
    quoted-printable; its soft breaks are CRLF too (RFC 5322 §2.3, RFC 2045 §6.7)."""
    text = "Je suis absent, contactez mon collègue au bureau s'il vous plaît. " * 3
    created, raw = create_raw(writer, text_email(text.strip()))
    assert b"quoted-printable" in raw
    parse(raw)  # check_octets: no bare LF anywhere
    got = get_one(writer.client, created["id"], properties=["bodyValues"],
                  fetchTextBodyValues=True)
    assert [v["value"] for v in got["bodyValues"].values()] == [text.strip()]


@pytest.mark.parametrize("prop", ["sentAt", "messageId"])
def test_null_date_or_message_id_is_still_set_by_the_server(writer, prop):
    """RFC 8621 §4.6: without a Date or Message-ID the server MUST set one; null is none."""
    created, raw = create_raw(writer, text_email(**{prop: None}))
    msg = parse(raw)
    assert msg["Date"] and msg["Message-ID"], raw[:400]
    got = get_one(writer.client, created["id"], properties=["sentAt", "messageId"])
    assert got["sentAt"] and got["messageId"], got


def test_mime_version_is_the_servers_to_write(writer):
    resp = email_set(writer.client, create={"k": {"mailboxIds": {writer.drafts: True},
                                                  "header:MIME-Version": " 1.0",
                                                  **text_email()}})
    assert no_descriptions(resp["notCreated"]["k"]) == {
        "type": "invalidProperties", "properties": ["header:MIME-Version"]}


def test_import_of_a_blob_that_is_no_message_is_invalid_email(writer):
    """RFC 8621 §4.8: a blob that is not a message may be refused with invalidEmail; one
    that begins with a header field (however sloppy the rest) is imported."""
    client = writer.client
    png = upload(client, b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image/png")
    prose = upload(client, b"Dear diary,\r\n\r\nno headers here.\r\n", "text/plain")
    sloppy = upload(client, b"Subject: only this\r\nno colon on this line\r\n\r\nbody\r\n",
                    "message/rfc822")
    resp = client.ok("Email/import", {"accountId": writer.id, "emails": {
        name: {"blobId": blob, "mailboxIds": {writer.inbox: True}}
        for name, blob in (("png", png), ("prose", prose), ("sloppy", sloppy))}})
    assert no_descriptions(resp["notCreated"]) == {"png": {"type": "invalidEmail"},
                                                   "prose": {"type": "invalidEmail"}}
    assert set(resp["created"]) == {"sloppy"}


# =============================================================================
# Email/parse (RFC 8621 §4.9)
# =============================================================================

INNER = (b"From: =?UTF-8?Q?In=C3=A8s?= <ines@example.org>\r\n"
         b"To: someone@example.net\r\n"
         b"Subject: Inner subject =?UTF-8?Q?=C3=BC?=\r\n"
         b"Date: Mon, 13 May 2024 09:00:00 +0200\r\n"
         b"Message-ID: <inner@example.org>\r\n"
         b"MIME-Version: 1.0\r\n"
         b"Content-Type: text/plain; charset=utf-8\r\n"
         b"Content-Transfer-Encoding: 8bit\r\n"
         b"\r\n"
         b"Inner text body, \xc3\xbcber alles.\r\n")
OUTER = (b"From: Outer Sender <outer@example.com>\r\n"
         b"To: rcpt@example.net\r\n"
         b"Subject: Fwd: inner things\r\n"
         b"Date: Tue, 14 May 2024 07:15:00 +0000\r\n"
         b"Message-ID: <outer@example.com>\r\n"
         b"MIME-Version: 1.0\r\n"
         b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
         b"\r\n"
         b"--b1\r\n"
         b"Content-Type: text/plain; charset=us-ascii\r\n"
         b"\r\n"
         b"See the attached message.\r\n"
         b"--b1\r\n"
         b"Content-Type: message/rfc822\r\n"
         b"Content-Disposition: attachment; filename=\"inner.eml\"\r\n"
         b"\r\n" + INNER +
         b"\r\n--b1--\r\n")


@pytest.fixture(scope="module")
def parse_blobs(writer):
    return {"outer": upload(writer.client, OUTER, "message/rfc822"),
            "png": upload(writer.client, PNG, "image/png")}


def email_parse(client, blob_ids, **args):
    return client.ok("Email/parse", {"accountId": client.account_id, "blobIds": blob_ids,
                                     **args})


def test_parse_metadata_null_and_blob_id_and_size(writer, parse_blobs):
    outer = parse_blobs["outer"]
    resp = email_parse(writer.client, [outer], properties=[
        "id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt",
        "subject", "messageId", "from", "sentAt", "hasAttachment"])
    assert resp == {"accountId": writer.id, "notParsable": None, "notFound": None,
                    "parsed": {outer: {
                        "id": None, "blobId": outer, "threadId": None, "mailboxIds": None,
                        "keywords": None, "size": len(OUTER), "receivedAt": None,
                        "subject": "Fwd: inner things", "messageId": ["outer@example.com"],
                        "from": [{"name": "Outer Sender", "email": "outer@example.com"}],
                        "sentAt": "2024-05-14T07:15:00Z", "hasAttachment": True}}}


def test_parse_default_properties(writer, parse_blobs):
    outer = parse_blobs["outer"]
    parsed = email_parse(writer.client, [outer])["parsed"][outer]
    assert sorted(parsed) == sorted(PARSE_DEFAULT_PROPERTIES)
    assert parsed["bodyValues"] == {}  # no fetch*BodyValues
    for prop in ("textBody", "htmlBody", "attachments"):
        for part in parsed[prop]:
            assert sorted(part) == sorted(DEFAULT_BODY_PROPERTIES), part
    (att,) = parsed["attachments"]
    assert (att["type"], att["name"], att["disposition"], att["size"]) == (
        "message/rfc822", "inner.eml", "attachment", len(INNER))


def test_parse_attached_message_by_its_part_blob_id(writer, parse_blobs):
    client, outer = writer.client, parse_blobs["outer"]
    parsed = email_parse(client, [outer], properties=["attachments"])["parsed"][outer]
    inner_blob = parsed["attachments"][0]["blobId"]
    assert download(client, inner_blob) == INNER
    resp = email_parse(client, [inner_blob], fetchTextBodyValues=True, properties=[
        "blobId", "size", "subject", "from", "sentAt", "messageId", "textBody", "bodyValues",
        "id", "threadId"], bodyProperties=["partId", "type", "charset"])
    (text_part,) = resp["parsed"][inner_blob]["textBody"]
    expect(resp, {"accountId": writer.id, "notParsable": None, "notFound": None, "parsed": {
        inner_blob: {
            "blobId": inner_blob, "size": len(INNER), "subject": "Inner subject ü",
            "from": [{"name": "Inès", "email": "ines@example.org"}],
            "sentAt": "2024-05-13T09:00:00+02:00", "messageId": ["inner@example.org"],
            "textBody": [{"partId": Var("p"), "type": "text/plain", "charset": "utf-8"}],
            "bodyValues": {Var("p"): {"value": "Inner text body, über alles.\n",
                                      "isEncodingProblem": False, "isTruncated": False}},
            "id": None, "threadId": None}}})
    assert text_part["partId"]


def test_parse_not_parsable_and_not_found_in_one_call(writer, parse_blobs):
    outer, png = parse_blobs["outer"], parse_blobs["png"]
    resp = email_parse(writer.client, [png, NO_SUCH_BLOB, outer], properties=["subject"])
    assert resp == {"accountId": writer.id, "parsed": {outer: {"subject": "Fwd: inner things"}},
                    "notParsable": [png], "notFound": [NO_SUCH_BLOB]}


def test_parse_nothing_parsed_is_null(writer, parse_blobs):
    resp = email_parse(writer.client, [parse_blobs["png"]])
    assert resp == {"accountId": writer.id, "parsed": None,
                    "notParsable": [parse_blobs["png"]], "notFound": None}


def test_parse_fetch_body_value_flags(writer, parse_blobs):
    outer = parse_blobs["outer"]
    parsed = email_parse(writer.client, [outer], properties=["textBody", "bodyValues"],
                         fetchTextBodyValues=True)["parsed"][outer]
    (text_part,) = parsed["textBody"]
    assert parsed["bodyValues"] == {text_part["partId"]: {
        # the CRLF before the boundary belongs to the boundary (RFC 2046 §5.1.1)
        "value": "See the attached message.", "isEncodingProblem": False,
        "isTruncated": False}}
    truncated = email_parse(writer.client, [outer], properties=["bodyValues"],
                            fetchAllBodyValues=True, maxBodyValueBytes=3)["parsed"][outer]
    assert truncated["bodyValues"][text_part["partId"]] == {
        "value": "See", "isEncodingProblem": False, "isTruncated": True}


@pytest.mark.parametrize("args", [
    pytest.param({"properties": ["header:From:asDate"]}, id="forbidden-form"),
    pytest.param({"properties": ["subject", "colour"]}, id="unknown-property"),
    pytest.param({"properties": ["textBody"], "bodyProperties": ["header:Subject:asAddresses"]},
                 id="forbidden-body-form"),
    pytest.param({"properties": ["header:Subject\n"]}, id="header-name-lf"),
])
def test_parse_invalid_arguments(writer, parse_blobs, args):
    resp = writer.client.call("Email/parse", {"accountId": writer.id,
                                              "blobIds": [parse_blobs["outer"]], **args})
    assert resp[0] == "error" and resp[1]["type"] == "invalidArguments", resp


def test_parse_header_property_echoes_case(writer, parse_blobs):
    outer = parse_blobs["outer"]
    parsed = email_parse(writer.client, [outer], properties=[
        "header:SUBJECT:asText", "header:from"])["parsed"][outer]
    assert parsed == {"header:SUBJECT:asText": "Fwd: inner things",
                      "header:from": " Outer Sender <outer@example.com>"}


def test_parse_of_a_created_email(writer, headed):
    """What Email/set wrote parses to what the client sent (the blob of an Email)."""
    created, _, _ = headed
    parsed = email_parse(writer.client, [created["blobId"]], properties=list(HEADERS))
    assert parsed["parsed"][created["blobId"]] == HEADERS


# =============================================================================
# Email/copy between accounts (RFC 8621 §4.7, RFC 8620 §5.4)
# =============================================================================


def share(srv, owner, grantee, read_only=False):
    done = run_cli("user", "share", owner.username, grantee.username,
                   *(["--read-only"] if read_only else []), data_dir=srv.data_dir)
    assert done.returncode == 0, done.stderr


class Pair:
    """alice shares her account with bob; alice has one Email in her Inbox."""

    def __init__(self, srv, read_only):
        self.alice = Account(make_user(srv, "alice"))
        bob = make_user(srv, "bob")
        share(srv, self.alice.client, bob, read_only)
        self.bob = Account(bob)  # its first Session: after the share
        created, self.raw = create_raw(self.alice, text_email(
            "Copied text.\n", subject="To be copied", keywords={"$seen": True, "$flagged": True},
            receivedAt="2025-03-04T05:06:07Z"), mailbox=self.alice.inbox)
        self.original = created

    def copy(self, account_id=None, from_account_id=None, **args):
        return self.bob.client.request([["Email/copy", {
            "fromAccountId": from_account_id or self.alice.id,
            "accountId": account_id or self.bob.id, **args}, "c0"]])["methodResponses"]


@pytest.fixture
def pair(srv):
    return Pair(srv, read_only=False)


@pytest.fixture
def read_only_pair(srv):
    return Pair(srv, read_only=True)


def test_copy_shared_account_in_session(pair, read_only_pair):
    for p, read_only in ((pair, False), (read_only_pair, True)):
        account = p.bob.client.session["accounts"][p.alice.id]
        assert (account["name"], account["isPersonal"], account["isReadOnly"]) == (
            p.alice.client.username, False, read_only)
        assert MAIL in account["accountCapabilities"]


def test_copy_defaults_keywords_and_received_at_from_the_original(pair):
    original = pair.original
    responses = pair.copy(create={"c": {"id": original["id"],
                                        "mailboxIds": {pair.bob.inbox: True}}})
    expect(responses, [["Email/copy", {
        "fromAccountId": pair.alice.id, "accountId": pair.bob.id,
        "oldState": Var("old"), "newState": Var("new"),
        "created": {"c": {"id": Var("id"), "blobId": original["blobId"],
                          "threadId": Var("thread"), "size": original["size"]}},
        "notCreated": None}, "c0"]])
    args = responses[0][1]
    assert args["newState"] != args["oldState"]
    new_id = args["created"]["c"]["id"]
    got = get_one(pair.bob.client, new_id, properties=[
        "keywords", "receivedAt", "mailboxIds", "subject", "blobId", "size"])
    assert got == {"id": new_id, "keywords": {"$seen": True, "$flagged": True},
                   "receivedAt": "2025-03-04T05:06:07Z", "mailboxIds": {pair.bob.inbox: True},
                   "subject": "To be copied", "blobId": original["blobId"],
                   "size": original["size"]}
    assert download(pair.bob.client, original["blobId"]) == pair.raw  # from his own account
    # the original stays in alice's account, unchanged
    kept = get_one(pair.alice.client, original["id"], properties=["mailboxIds", "keywords"])
    assert kept["mailboxIds"] == {pair.alice.inbox: True}
    changes = pair.bob.client.ok("Email/changes", {"accountId": pair.bob.id,
                                                   "sinceState": args["oldState"]})
    assert changes["created"] == [new_id]


def test_copy_overrides_keywords_and_received_at(pair):
    responses = pair.copy(create={"c": {
        "id": pair.original["id"], "mailboxIds": {pair.bob.inbox: True},
        "keywords": {"$Answered": True}, "receivedAt": "2020-01-01T00:00:00Z"}})
    new_id = responses[0][1]["created"]["c"]["id"]
    got = get_one(pair.bob.client, new_id, properties=["keywords", "receivedAt"])
    assert got == {"id": new_id, "keywords": {"$answered": True},
                   "receivedAt": "2020-01-01T00:00:00Z"}


def test_copy_set_errors(pair):
    original = pair.original["id"]
    inbox = {pair.bob.inbox: True}
    responses = pair.copy(create={
        "subject": {"id": original, "mailboxIds": inbox, "subject": "changed"},
        "body": {"id": original, "mailboxIds": inbox, **text_email("new body")},
        "missing": {"id": "e999999999", "mailboxIds": inbox},
        "nobox": {"id": original},
        "badbox": {"id": original, "mailboxIds": {pair.alice.inbox: True}},  # not bob's
        "badkw": {"id": original, "mailboxIds": inbox, "keywords": {"$seen": False}},
        "local": {"id": original, "mailboxIds": inbox,
                  "receivedAt": "2020-01-01T00:00:00+01:00"},  # a UTCDate ends in Z
        "good": {"id": original, "mailboxIds": inbox},
    })
    (name, args, _), = responses
    assert name == "Email/copy"
    assert set(args["created"]) == {"good"}
    assert no_descriptions(args["notCreated"]) == {
        "subject": {"type": "invalidProperties", "properties": ["subject"]},
        "body": {"type": "invalidProperties", "properties": ["bodyValues", "textBody"]},
        "missing": {"type": "notFound"},
        "nobox": {"type": "invalidProperties", "properties": ["mailboxIds"]},
        "badbox": {"type": "invalidProperties", "properties": ["mailboxIds"]},
        "badkw": {"type": "invalidProperties", "properties": ["keywords"]},
        "local": {"type": "invalidProperties", "properties": ["receivedAt"]},
    }


def test_copy_on_success_destroy_original(pair):
    original = pair.original["id"]
    responses = pair.copy(onSuccessDestroyOriginal=True, create={
        "c": {"id": original, "mailboxIds": {pair.bob.inbox: True}},
        "fails": {"id": "e999999999", "mailboxIds": {pair.bob.inbox: True}}})
    assert [(r[0], r[2]) for r in responses] == [("Email/copy", "c0"), ("Email/set", "c0")]
    new_id = responses[0][1]["created"]["c"]["id"]
    expect(responses[1][1], {
        "accountId": pair.alice.id, "oldState": Var("old"), "newState": Var("new"),
        "created": None, "updated": None, "destroyed": [original],
        "notCreated": None, "notUpdated": None, "notDestroyed": None})
    gone = email_get(pair.alice.client, [original], properties=["id"])
    assert gone["list"] == [] and gone["notFound"] == [original]
    assert get_one(pair.bob.client, new_id, properties=["subject"])["subject"] == "To be copied"
    assert download(pair.bob.client, pair.original["blobId"]) == pair.raw


def test_copy_from_read_only_share_works(read_only_pair):
    p = read_only_pair
    responses = p.copy(create={"c": {"id": p.original["id"], "mailboxIds": {p.bob.inbox: True}}})
    assert responses[0][0] == "Email/copy" and set(responses[0][1]["created"]) == {"c"}
    assert download(p.bob.client, p.original["blobId"]) == p.raw


def test_copy_into_read_only_account_is_account_read_only(read_only_pair):
    p = read_only_pair
    own, _ = create_raw(p.bob, text_email(subject="bob's own"), mailbox=p.bob.inbox)
    responses = p.copy(account_id=p.alice.id, from_account_id=p.bob.id,
                       create={"c": {"id": own["id"], "mailboxIds": {p.alice.inbox: True}}})
    assert [(r[0], no_descriptions(r[1])) for r in responses] == [
        ("error", {"type": "accountReadOnly"})]
    assert email_get(p.alice.client, None, properties=["id"])["list"] == [
        {"id": p.original["id"]}]


def test_email_set_in_read_only_account_is_account_read_only(read_only_pair):
    p = read_only_pair
    resp = p.bob.client.call("Email/set", {"accountId": p.alice.id, "create": {
        "k": {"mailboxIds": {p.alice.inbox: True}, **text_email()}}})
    assert (resp[0], no_descriptions(resp[1])) == ("error", {"type": "accountReadOnly"})


def test_copy_destroy_original_in_read_only_account_is_refused(read_only_pair):
    p = read_only_pair
    original = p.original["id"]
    responses = p.copy(onSuccessDestroyOriginal=True, create={
        "c": {"id": original, "mailboxIds": {p.bob.inbox: True}}})
    assert responses[0][0] == "Email/copy" and set(responses[0][1]["created"]) == {"c"}
    kept = email_get(p.alice.client, [original], properties=["id"])
    assert kept["list"] == [{"id": original}], kept  # still in alice's account
    assert [(r[0], no_descriptions(r[1]), r[2]) for r in responses[1:]] == [
        ("error", {"type": "accountReadOnly"}, "c0")]
