"""MIME -> Email (jmapd §7.1): RFC 8621 §4.1 over a corpus of real-world-shaped messages.

Every `tests/data/mail/NN-name.eml` is imported as a client would (upload to the session's
uploadUrl, then Email/import, RFC 8621 §4.8) and fetched with Email/get (§4.2); the
expectations sit next to it in `NN-name.json`, written from the RFCs, not from jmapd:
RFC 8621 §4.1.1 (size, receivedAt), §4.1.2 parsed forms (Raw, Text, Addresses,
GroupedAddresses, MessageIds, Date, URLs), §4.1.3 (headers, header:X[:asForm][:all],
convenience properties), §4.1.4 (EmailBodyPart, bodyStructure, bodyValues, the
textBody/htmlBody/attachments algorithm, hasAttachment, preview); MIME per RFC 2045-2047
and RFC 2231, addresses and dates per RFC 5322 (incl. the obsolete forms of §4),
raw UTF-8 headers per RFC 6532.

JSON format of an expectation file:
  email          exact Email properties (convenience and header:* ones, size, receivedAt)
  preview        {"exact": s} | {"startsWith": s} | {"contains": [..]} | {"notContains": [..]}
  headers        (optional) the exact `headers` list
  bodyStructure  the tree; leaves carry "$label" and "$sha256" of the decoded octets;
                 partId/blobId are server-chosen and checked structurally; the size of a
                 multipart is not checked (RFC 8621 does not define it)
  textBody, htmlBody, attachments   lists of leaf labels, in order
  bodyValues     label -> EmailBodyValue for every text/* leaf (fetchAllBodyValues)
  notes          why an expectation is what it is, and what is left to the server
Values may be {"$anyOf": [..]} where the RFCs allow more than one answer, or
{"$regex": ".."}. Media types, charsets and dispositions compare case-insensitively
(RFC 2045 §5.1, RFC 2183 §2.8); RFC 8621 does not say whether servers normalise case.
"""

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import Client, add_user
from test_generic import jmapd_bug

DATA = Path(__file__).resolve().parent / "data" / "mail"
NAMES = sorted(p.stem for p in DATA.glob("*.eml"))
EXPECT = {name: json.loads((DATA / f"{name}.json").read_text("utf-8")) for name in NAMES}

BODY_PROPERTIES = ["partId", "blobId", "size", "name", "type", "charset", "disposition", "cid",
                   "language", "location", "subParts"]
EMAIL_PROPERTIES = [
    "id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "messageId",
    "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo", "subject",
    "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody", "attachments",
    "bodyStructure", "headers",
]
CASE_INSENSITIVE = {"type", "charset", "disposition"}

# Where jmapd is wrong by the RFCs: test id -> reason (see the module docstring of each
# expectation's "notes"). A fix makes the test XPASS, which fails: then delete the entry.
KNOWN_BUGS = {}  # test id -> reason, for jmapd bugs found and not yet fixed (strict xfail)


# ---- matching with placeholders ----


def matches(expected, actual, ci=False):
    """True if `actual` fits `expected` ($anyOf / $regex placeholders allowed)."""
    if isinstance(expected, dict) and "$anyOf" in expected:
        return any(matches(option, actual, ci) for option in expected["$anyOf"])
    if isinstance(expected, dict) and "$regex" in expected:
        return isinstance(actual, str) and re.fullmatch(expected["$regex"], actual, re.S)
    if isinstance(expected, dict):
        return (isinstance(actual, dict) and set(expected) == set(actual)
                and all(matches(expected[k], actual[k], k in CASE_INSENSITIVE) for k in expected))
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(expected) == len(actual)
                and all(matches(e, a, ci) for e, a in zip(expected, actual)))
    if ci and isinstance(expected, str) and isinstance(actual, str):
        return expected.lower() == actual.lower()
    return type(expected) is type(actual) and expected == actual


def assert_matches(expected, actual, what=""):
    if "$" not in json.dumps(expected):
        assert actual == expected, what
    else:
        assert matches(expected, actual), f"{what}\nexpected {expected!r}\n     got {actual!r}"


# ---- a client's view: upload, import, get, download ----


def fill(template, **variables):
    for name, value in variables.items():
        template = template.replace("{" + name + "}", quote(value, safe=""))
    return template


def upload(client, data):
    url = fill(client.session["uploadUrl"], accountId=client.account_id)
    r = client.http.post(url, data=data, headers={"Content-Type": "message/rfc822"}, timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()


def download(client, blob_id, name="part.bin", media_type="application/octet-stream"):
    url = fill(client.session["downloadUrl"], accountId=client.account_id, blobId=blob_id,
               name=name, type=media_type)
    r = client.http.get(url, timeout=30)
    assert r.status_code == 200, (blob_id, r.status_code, r.text[:200])
    return r.content


def inbox_id(client):
    boxes = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})["list"]
    return next(m["id"] for m in boxes if m["role"] == "inbox")


class Corpus:
    """The whole corpus imported into one fresh account, fetched once."""

    def __init__(self, client):
        self.client = client
        self.inbox = inbox_id(client)
        self.raw = {name: (DATA / f"{name}.eml").read_bytes() for name in NAMES}
        self.uploads = {name: upload(client, self.raw[name]) for name in NAMES}
        emails = {name: {"blobId": self.uploads[name]["blobId"],
                         "mailboxIds": {self.inbox: True}} for name in NAMES}
        self.imported = client.ok("Email/import", {"accountId": client.account_id,
                                                   "emails": emails})
        created = self.imported.get("created") or {}
        self.ids = {name: created[name]["id"] for name in NAMES if name in created}
        self.emails = self._get(fetchAllBodyValues=True)
        self._values = {}
        self._headers = {}

    def _get(self, properties=EMAIL_PROPERTIES, **args):
        ids = list(self.ids.values())
        resp = self.client.ok("Email/get", {
            "accountId": self.client.account_id, "ids": ids, "properties": properties,
            "bodyProperties": BODY_PROPERTIES, **args})
        found = {e["id"]: e for e in resp["list"]}
        return {name: found.get(email_id) for name, email_id in self.ids.items()}

    def email(self, name):
        """The Email of one message (skips if jmapd refused it as §4.8 allows)."""
        if name not in self.ids:
            err = (self.imported.get("notCreated") or {}).get(name)
            if EXPECT[name].get("mayBeInvalidEmail") and err and err["type"] == "invalidEmail":
                pytest.skip("jmapd rejected the message with invalidEmail (RFC 8621 §4.8 MAY)")
            pytest.fail(f"{name} was not imported: {err}")
        email = self.emails[name]
        assert email is not None, f"Email/get did not return {name}"
        return email

    def values(self, flag):
        """bodyValues of every Email, fetched with one fetch*BodyValues flag."""
        if flag not in self._values:
            self._values[flag] = self._get(["id", "bodyValues"], **{flag: True})
        return self._values[flag]

    def header_props(self, name):
        """The header:* properties the expectation file asks for, in one Email/get."""
        if name not in self._headers:
            self.email(name)
            props = [p for p in EXPECT[name]["email"] if p.startswith("header:")]
            resp = self.client.ok("Email/get", {"accountId": self.client.account_id,
                                                "ids": [self.ids[name]],
                                                "properties": ["id", *props]})
            self._headers[name] = resp["list"][0]
        return self._headers[name]


@pytest.fixture(scope="module")
def corpus(server):
    username = "mime-corpus@example.com"
    add_user(server.data_dir, username)
    return Corpus(Client(server.url, username))


def cases(kind, names=NAMES, keys=None):
    """pytest params `name` or `name-key`, with KNOWN_BUGS marks attached."""
    params = []
    for name in names:
        for key in (keys(name) if keys else [None]):
            case_id = f"{kind}[{name}]" if key is None else f"{kind}[{name}::{key}]"
            values = (name,) if key is None else (name, key)
            marks = [jmapd_bug(KNOWN_BUGS[case_id])] if case_id in KNOWN_BUGS else []
            params.append(pytest.param(*values, id=case_id.split("[", 1)[1][:-1], marks=marks))
    return params


# ---- structure helpers ----


def walk(expected, actual, out):
    """Pair expected and actual body parts depth-first; return [(expected, actual)]."""
    out.append((expected, actual))
    subs = expected.get("subParts") or []
    if subs:
        got = actual.get("subParts") if isinstance(actual, dict) else None
        assert isinstance(got, list) and len(got) == len(subs), (
            f"{expected['type']}: expected {len(subs)} subParts, got {got!r}")
        for e, a in zip(subs, got):
            walk(e, a, out)
    return out


def leaves_by_label(name, email):
    pairs = walk(EXPECT[name]["bodyStructure"], email["bodyStructure"], [])
    return {e["$label"]: (e, a) for e, a in pairs if "$label" in e}


def has_body(name):
    return "bodyStructure" in EXPECT[name] and not EXPECT[name].get("skipBody")


BODY_NAMES = [n for n in NAMES if has_body(n)]


# =============================================================================
# Import and raw octets (RFC 8621 §4.8, §4.1.1)
# =============================================================================


def test_mime_corpus_is_large_enough():
    assert len(NAMES) >= 34
    for name in NAMES:
        raw = (DATA / f"{name}.eml").read_bytes()
        assert b"\n" not in raw.replace(b"\r\n", b""), f"{name}: bare LF"


@pytest.mark.parametrize("name", cases("test_mime_import_created"))
def test_mime_import_created(corpus, name):
    email = corpus.email(name)
    created = corpus.imported["created"][name]
    assert {"id", "blobId", "threadId", "size"} <= set(created), created
    assert created["id"] == email["id"] and created["blobId"] == email["blobId"]
    assert created["threadId"] == email["threadId"] and created["size"] == email["size"]
    assert email["mailboxIds"] == {corpus.inbox: True}
    assert email["keywords"] == {}


@pytest.mark.parametrize("name", cases("test_mime_raw_download"))
def test_mime_raw_download(corpus, name):
    """The Email's blobId downloads the message as imported, byte for byte (§4.1.1)."""
    email = corpus.email(name)
    data = download(corpus.client, email["blobId"], "message.eml", "message/rfc822")
    assert email["size"] == len(data)
    if email["blobId"] == corpus.uploads[name]["blobId"]:
        assert data == corpus.raw[name]
    else:  # §4.8: a server that fixes a message MUST give it a new blobId
        assert data != corpus.raw[name]
        assert b"\0" not in data


# =============================================================================
# Header fields (RFC 8621 §4.1.2, §4.1.3)
# =============================================================================


def email_keys(name):
    return [k for k in EXPECT[name]["email"] if k != "size" or name != "26-nul-header"]


@pytest.mark.parametrize("name,prop", cases("test_mime_property", keys=email_keys))
def test_mime_property(corpus, name, prop):
    email = corpus.email(name)
    source = corpus.header_props(name) if prop.startswith("header:") else email
    assert prop in source, f"{prop} missing from {sorted(source)}"
    assert_matches(EXPECT[name]["email"][prop], source[prop], f"{name} {prop}")


@pytest.mark.parametrize("name", cases("test_mime_headers",
                                       names=[n for n in NAMES if "headers" in EXPECT[n]]))
def test_mime_headers(corpus, name):
    """`headers`: every field, in order, name as written, value in Raw form (§4.1.3)."""
    expected = EXPECT[name]["headers"]
    assert corpus.email(name)["headers"] == expected


@pytest.mark.parametrize("name", cases("test_mime_preview"))
def test_mime_preview(corpus, name):
    """preview: at most 256 characters (§4.1.4); content as far as it is determined."""
    preview = corpus.email(name)["preview"]
    rule = EXPECT[name]["preview"]
    assert isinstance(preview, str) and len(preview) <= 256, preview
    if "exact" in rule:
        assert preview == rule["exact"]
    if "startsWith" in rule:
        assert preview.startswith(rule["startsWith"]), preview
    for text in rule.get("contains", []):
        assert text in preview, preview
    for text in rule.get("notContains", []):
        assert text not in preview, preview


# =============================================================================
# Body parts (RFC 8621 §4.1.4)
# =============================================================================


def check_part(expected, actual):
    assert isinstance(actual, dict), actual
    assert set(actual) == set(BODY_PROPERTIES), f"properties {sorted(actual)}"
    multipart = expected["type"].lower().startswith("multipart/")
    if multipart:  # partId and blobId null if, and only if, multipart/*
        assert actual["partId"] is None and actual["blobId"] is None, actual
        assert isinstance(actual["size"], int) and actual["size"] >= 0
    else:
        assert isinstance(actual["partId"], str) and actual["partId"], actual
        assert isinstance(actual["blobId"], str) and actual["blobId"], actual
    for key, value in expected.items():
        if key.startswith("$") or key == "subParts":
            continue
        assert matches(value, actual[key], key in CASE_INSENSITIVE), (
            f"{expected.get('$label', expected['type'])}.{key}: expected {value!r}, "
            f"got {actual[key]!r}")
    if not multipart:
        assert actual["subParts"] is None, actual["subParts"]


@pytest.mark.parametrize("name", cases("test_mime_body_structure", names=BODY_NAMES))
def test_mime_body_structure(corpus, name):
    email = corpus.email(name)
    for expected, actual in walk(EXPECT[name]["bodyStructure"], email["bodyStructure"], []):
        check_part(expected, actual)


@pytest.mark.parametrize("name", cases("test_mime_part_ids", names=BODY_NAMES))
def test_mime_part_ids(corpus, name):
    """partIds are unique in the Email; different octets never share a blobId."""
    leaves = leaves_by_label(name, corpus.email(name))
    part_ids = [a["partId"] for _, a in leaves.values()]
    assert len(set(part_ids)) == len(part_ids), part_ids
    by_blob = {}
    for e, a in leaves.values():
        by_blob.setdefault(a["blobId"], set()).add(e["$sha256"])
    assert all(len(hashes) == 1 for hashes in by_blob.values()), by_blob


@pytest.mark.parametrize("name", cases("test_mime_part_blobs", names=BODY_NAMES))
def test_mime_part_blobs(corpus, name):
    """Each part's blobId downloads its octets after transfer decoding (§4.1.4)."""
    for label, (e, a) in leaves_by_label(name, corpus.email(name)).items():
        data = download(corpus.client, a["blobId"], "part.bin", "application/octet-stream")
        assert hashlib.sha256(data).hexdigest() == e["$sha256"], (label, data[:80])
        assert len(data) == e["size"] == a["size"], label


def part_list_cases(kind):
    return cases(f"test_mime_{kind}", names=BODY_NAMES)


def check_part_list(corpus, name, prop):
    email = corpus.email(name)
    leaves = leaves_by_label(name, email)
    got = email[prop]
    labels = {a["partId"]: label for label, (_, a) in leaves.items()}
    assert [labels.get(p.get("partId"), p) for p in got] == EXPECT[name][prop]
    for part in got:  # the same EmailBodyPart as in bodyStructure
        assert part == leaves[labels[part["partId"]]][1]


@pytest.mark.parametrize("name", part_list_cases("text_body"))
def test_mime_text_body(corpus, name):
    check_part_list(corpus, name, "textBody")


@pytest.mark.parametrize("name", part_list_cases("html_body"))
def test_mime_html_body(corpus, name):
    check_part_list(corpus, name, "htmlBody")


@pytest.mark.parametrize("name", part_list_cases("attachments"))
def test_mime_attachments(corpus, name):
    check_part_list(corpus, name, "attachments")


def expected_values(name, email, labels=None):
    leaves = leaves_by_label(name, email)
    return {leaves[label][1]["partId"]: value
            for label, value in EXPECT[name]["bodyValues"].items()
            if labels is None or label in labels}


def expected_leaves(node, out=None):
    """label -> expected leaf, from an expectation tree."""
    out = {} if out is None else out
    if "$label" in node:
        out[node["$label"]] = node
    for sub in node.get("subParts") or []:
        expected_leaves(sub, out)
    return out


def text_labels(name, prop):
    leaves = expected_leaves(EXPECT[name]["bodyStructure"])
    return {label for label in EXPECT[name][prop] if leaves[label]["type"].startswith("text/")}


@pytest.mark.parametrize("name", cases("test_mime_body_values_all", names=BODY_NAMES))
def test_mime_body_values_all(corpus, name):
    """fetchAllBodyValues: every text/* part of bodyStructure, decoded, LF line ends."""
    email = corpus.email(name)
    expected = expected_values(name, email)
    assert_matches(expected, email["bodyValues"], name)


@pytest.mark.parametrize("name", cases("test_mime_body_values_text", names=BODY_NAMES))
def test_mime_body_values_text(corpus, name):
    """fetchTextBodyValues: the text/* parts of textBody only (§4.2)."""
    email = corpus.email(name)
    expected = expected_values(name, email, text_labels(name, "textBody"))
    assert_matches(expected, corpus.values("fetchTextBodyValues")[name]["bodyValues"], name)


@pytest.mark.parametrize("name", cases("test_mime_body_values_html", names=BODY_NAMES))
def test_mime_body_values_html(corpus, name):
    """fetchHTMLBodyValues: the text/* parts of htmlBody only (§4.2)."""
    email = corpus.email(name)
    expected = expected_values(name, email, text_labels(name, "htmlBody"))
    assert_matches(expected, corpus.values("fetchHTMLBodyValues")[name]["bodyValues"], name)
