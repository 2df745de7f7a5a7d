"""Issue 16 (hardening): bounded fuzzing of the request engine and the MIME parser.

One `jmapd.py serve` (with LMTP) for the whole module, driven over HTTP as a client would.
Hypothesis generates the inputs; `derandomize=True` makes every run (and CI) try the same
ones, and the example counts keep the module well under two minutes. contrib/fuzz.py is
the long-running version.

Request engine (RFC 8620 §3): Request objects valid and not (wrong shapes, unknown
capabilities, any JSON, bytes that are not JSON), method calls drawn from the methods
jmapd implements with arguments of the right names and random values, and result
references (§3.7) between the calls. The HTTP answer is 200 with well-formed
methodResponses (each [name, arguments, callId], an error with a "type", never
serverFail) or 400 with an RFC 7807 problem document; never 500.

MIME parser (RFC 5322, RFC 2045-2047, RFC 2231): the messages of tests/data/mail mutated
(bytes flipped, cut short, lines repeated or dropped, header fields added: codecs that are
not text encodings as charsets, malformed RFC 2231 parameter sets, odd encodings and
boundaries) and imported (upload, Email/import, RFC 8621 §4.8). Each is created (only a
blob that does not begin with a header field may be refused, with invalidEmail); Email/get
of it next to a good message answers every property with fetchAllBodyValues, Email/parse
(§4.9) of its blob answers, and its part blobs download.

Poison messages (issue 16): a fixed set of such messages (charset, RFC 2231 charset and
encoded-word charset naming `idna`, `rot13`, `hex`, `base64`, `zlib`, `uu`,
`quoted-printable`, `undefined`, `bz2`, `punycode`; malformed parameter sets) is stored by
LMTP (250), Email/import and `jmapd.py deliver` (exit 0), and read back as above.

Finally the server's log holds no Traceback.
"""

import json
import re
import smtplib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import CORE, MAIL, Client, Server, add_user, run_cli

SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
DATA = Path(__file__).resolve().parent / "data" / "mail"
CORPUS = {p.stem: p.read_bytes() for p in sorted(DATA.glob("*.eml"))}
HEADER_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 §2.2 field name ":"

REQUEST_EXAMPLES = 400
MESSAGE_EXAMPLES = 250
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=False,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.filter_too_much])

EMAIL_PROPERTIES = [
    "id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "messageId",
    "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo", "subject",
    "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody", "attachments",
    "bodyStructure", "headers", "header:Subject:asText", "header:From:asAddresses",
    "header:X-Fuzz:asRaw", "header:Content-Type:all"]
BODY_PROPERTIES = ["partId", "blobId", "size", "headers", "name", "type", "charset",
                   "disposition", "cid", "language", "location", "subParts",
                   "header:Content-Type:asText"]


# ---- the module's server ----


class Fuzzed:
    """The module's server and two accounts: one the request fuzzer may wreck, one that
    only receives mutated messages."""

    def __init__(self, tmp_path_factory):
        data_dir = tmp_path_factory.mktemp("fuzz") / "data"
        add_user(data_dir, "requests@example.com")
        add_user(data_dir, "messages@example.com")
        self.server = Server(data_dir, "--lmtp", "127.0.0.1:0",
                             "--max-login-failures-per-address", "100000",
                             "--max-login-failures-per-user", "100000").start()
        self.lmtp_port = int(re.search(r"LMTP on 127\.0\.0\.1:(\d+)",
                                       self.server.log()).group(1))
        self.requests = Client(self.server.url, "requests@example.com")
        self.messages = Client(self.server.url, "messages@example.com")
        self.inbox = inbox_id(self.messages)
        self.good_blob = upload(self.messages, CORPUS["02-alternative"])
        self.good_email = self.messages.ok("Email/import", {
            "accountId": self.messages.account_id, "emails": {"g": {
                "blobId": self.good_blob, "mailboxIds": {self.inbox: True}}}}
        )["created"]["g"]["id"]
        self.values = self._request_values()

    def _request_values(self) -> dict:
        """Real ids of the request fuzzer's account, for the $NAME placeholders."""
        client = self.requests
        account = client.account_id
        inbox = inbox_id(client)
        blobs = [upload(client, CORPUS[name])
                 for name in ("01-plain-ascii", "04-mixed-attachments")]
        made = client.ok("Email/import", {"accountId": account, "emails": {
            "a": {"blobId": blobs[0], "mailboxIds": {inbox: True}},
            "b": {"blobId": blobs[1], "mailboxIds": {inbox: True}, "keywords": {"$seen": True}}}})
        box = client.ok("Mailbox/set", {"accountId": account, "create": {
            "f": {"name": "Fuzz folder"}}})["created"]["f"]["id"]
        email = made["created"]["a"]
        return {"$ACCOUNT": account, "$INBOX": inbox, "$MAILBOX": box, "$EMAIL": email["id"],
                "$EMAIL2": made["created"]["b"]["id"], "$THREAD": email["threadId"],
                "$BLOB": blobs[0], "$BLOB2": blobs[1], "$STATE": made["newState"],
                "$PART": email["blobId"].replace("B", "P", 1) + "_1"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    state = Fuzzed(tmp_path_factory)
    yield state
    state.server.stop()


def inbox_id(client) -> str:
    boxes = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})["list"]
    return next(m["id"] for m in boxes if m["role"] == "inbox")


def upload(client, data: bytes) -> str:
    url = client.session["uploadUrl"].replace("{accountId}", client.account_id)
    r = client.http.post(url, data=data, headers={"Content-Type": "message/rfc822"}, timeout=60)
    assert r.status_code in (200, 201), r.text
    return r.json()["blobId"]


# ---- request strategies ----


METHOD_NAMES = ["Core/echo", "Mailbox/get", "Mailbox/set", "Mailbox/query", "Mailbox/changes",
                "Email/get", "Email/query", "Email/set", "Email/import", "Email/parse",
                "Thread/get", "SearchSnippet/get", "Identity/get", "EmailSubmission/get",
                "VacationResponse/get", "PushSubscription/get"]
PLACEHOLDERS = ["$ACCOUNT", "$INBOX", "$MAILBOX", "$EMAIL", "$EMAIL2", "$THREAD", "$BLOB",
                "$BLOB2", "$STATE", "$PART"]
PROPERTY_NAMES = ["id", "name", "parentId", "role", "sortOrder", "totalEmails", "myRights",
                  "isSubscribed", "blobId", "threadId", "mailboxIds", "keywords", "size",
                  "receivedAt", "subject", "from", "to", "preview", "bodyStructure",
                  "bodyValues", "textBody", "htmlBody", "attachments", "headers", "emailIds",
                  "header:Subject", "header:From:asAddresses", "header:Date:asDate:all",
                  "header:X:asBogus", "header:", "keywords/$seen", "mailboxIds/$INBOX",
                  "email", "textSignature", "isEnabled", "partId", "type", "charset", "bogus"]
FILTER_KEYS = ["inMailbox", "inMailboxOtherThan", "before", "after", "minSize", "maxSize",
               "allInThreadHaveKeyword", "someInThreadHaveKeyword", "noneInThreadHaveKeyword",
               "hasKeyword", "notKeyword", "hasAttachment", "text", "from", "to", "cc", "bcc",
               "subject", "body", "header", "parentId", "name", "role", "hasAnyRole",
               "isSubscribed", "bogus"]
SORT_PROPERTIES = ["receivedAt", "sentAt", "size", "from", "to", "subject", "hasKeyword",
                   "allInThreadHaveKeyword", "someInThreadHaveKeyword", "sortOrder", "name",
                   "id", "bogus"]
REFERENCE_PATHS = ["/ids", "/list/*/id", "/list/*/threadId", "/list/*/emailIds", "/created",
                   "/created/k/id", "/list/0/id", "/notFound", "/*", "", "/", "/ids/-1",
                   "/list/*/mailboxIds", "/accountId", "/list/*/*", "~", "/a~2b"]
DATES = ["2024-01-01T00:00:00Z", "2024-02-30T00:00:00Z", "0000-01-01T00:00:00Z",
         "2024-01-01T00:00:00+01:00", "2024-01-01T00:00:00.5Z", "yesterday", ""]

small_ints = st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**53 - 1, 2**53, 2**63,
                                                            -2**53, 10**30]))
texts = st.text(max_size=12)
ids = st.one_of(st.sampled_from(PLACEHOLDERS + ["#k", "#x", "M1", "E1", "T1", "B", "P_1"]),
                st.text("ABCDEFMPT0123456789_-", min_size=1, max_size=10), texts)
leaves = st.one_of(st.none(), st.booleans(), small_ints,
                   st.floats(allow_nan=False, allow_infinity=False), texts,
                   st.sampled_from(PLACEHOLDERS + PROPERTY_NAMES + DATES))
jsonish = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(texts, st.sampled_from(PROPERTY_NAMES)),
                                            inner, max_size=4)),
    max_leaves=10)
id_lists = st.one_of(st.none(), st.lists(ids, max_size=4), jsonish)


def _filter_condition():
    value = st.one_of(texts, ids, st.booleans(), small_ints, st.sampled_from(DATES),
                      st.lists(texts, max_size=3), st.text(max_size=40))
    return st.dictionaries(st.sampled_from(FILTER_KEYS), value, min_size=1, max_size=3)


filters = st.recursive(
    _filter_condition(),
    lambda inner: st.fixed_dictionaries(
        {"operator": st.sampled_from(["AND", "OR", "NOT", "XOR", "and"]),
         "conditions": st.lists(inner, max_size=4)}),
    max_leaves=8)
comparators = st.fixed_dictionaries(
    {"property": st.sampled_from(SORT_PROPERTIES)},
    optional={"isAscending": st.one_of(st.booleans(), leaves),
              "collation": st.sampled_from(["i;unicode-casemap", "i;octet", "i;bogus"]),
              "keyword": st.sampled_from(["$seen", "$flagged", "", "a b"])})
patches = st.dictionaries(
    st.one_of(st.sampled_from(PROPERTY_NAMES + ["keywords/$flagged", "mailboxIds/$MAILBOX",
                                                "keywords/a~1b", "name/x"]), texts),
    jsonish, max_size=4)
creations = st.dictionaries(
    st.sampled_from(["k", "x", "y"]),
    st.one_of(patches, st.fixed_dictionaries(
        {"name": texts}, optional={"parentId": st.one_of(st.none(), ids),
                                   "role": st.sampled_from([None, "inbox", "trash", "x"]),
                                   "mailboxIds": st.dictionaries(ids, jsonish, max_size=2),
                                   "keywords": st.dictionaries(texts, jsonish, max_size=2),
                                   "subject": texts,
                                   "bodyValues": jsonish, "textBody": jsonish})),
    max_size=3)
imports = st.dictionaries(
    st.sampled_from(["k", "x"]),
    st.one_of(jsonish, st.fixed_dictionaries(
        {"blobId": st.one_of(st.sampled_from(["$BLOB", "$BLOB2", "$PART", "$EMAIL"]), ids)},
        optional={"mailboxIds": st.one_of(st.just({"$INBOX": True}),
                                          st.dictionaries(ids, jsonish, max_size=2)),
                  "keywords": st.dictionaries(texts, jsonish, max_size=2),
                  "receivedAt": st.sampled_from(DATES)})),
    max_size=2)
ARGUMENTS = {
    "accountId": st.one_of(st.just("$ACCOUNT"), st.just("$ACCOUNT"), ids, leaves),
    "ids": id_lists, "emailIds": id_lists, "blobIds": id_lists, "destroy": id_lists,
    "properties": st.one_of(st.none(), st.lists(st.sampled_from(PROPERTY_NAMES), max_size=5),
                            jsonish),
    "bodyProperties": st.one_of(st.lists(st.sampled_from(PROPERTY_NAMES), max_size=4), jsonish),
    "filter": st.one_of(st.none(), filters, jsonish),
    "sort": st.one_of(st.none(), st.lists(comparators, max_size=3), jsonish),
    "position": small_ints, "anchor": ids, "anchorOffset": small_ints, "limit": small_ints,
    "calculateTotal": leaves, "collapseThreads": leaves, "sortAsTree": leaves,
    "filterAsTree": leaves, "sinceState": st.one_of(st.just("$STATE"), leaves),
    "maxChanges": small_ints, "ifInState": st.one_of(st.just("$STATE"), leaves),
    "create": st.one_of(creations, jsonish), "update": st.one_of(
        st.dictionaries(ids, patches, max_size=2), jsonish),
    "onDestroyRemoveEmails": leaves, "emails": st.one_of(imports, jsonish),
    "fetchTextBodyValues": leaves, "fetchHTMLBodyValues": leaves,
    "fetchAllBodyValues": leaves, "maxBodyValueBytes": small_ints,
}
references = st.fixed_dictionaries(
    {"resultOf": st.sampled_from(["c0", "c1", "c2", "c9"]),
     "name": st.sampled_from(METHOD_NAMES + ["error"]),
     "path": st.one_of(st.sampled_from(REFERENCE_PATHS), texts)})
arguments = st.fixed_dictionaries(
    {}, optional={**ARGUMENTS,
                  "#ids": st.one_of(references, jsonish), "#emailIds": references,
                  "#blobIds": references, "#anchor": references, "#destroy": references,
                  "#filter": references, "#accountId": references})
extra_arguments = st.dictionaries(st.one_of(texts, st.sampled_from(["#", "#x", "#" * 3])),
                                  st.one_of(jsonish, references), max_size=2)


@st.composite
def method_calls(draw):
    args = draw(arguments)
    if draw(st.integers(0, 9)) == 0:
        args.update(draw(extra_arguments))
    name = draw(st.one_of(st.sampled_from(METHOD_NAMES), st.sampled_from(METHOD_NAMES),
                          texts, st.sampled_from(["Email/copy", "Blob/copy", "Mailbox/"])))
    call_id = draw(st.one_of(st.sampled_from(["c0", "c1", "c2"]), texts))
    return [name, args, call_id]


usings = st.one_of(st.just([CORE, MAIL]), st.just([CORE, MAIL, SUBMISSION, VACATION]),
                   st.lists(st.sampled_from([CORE, MAIL, SUBMISSION, VACATION,
                                             "urn:example:bogus"]), max_size=5),
                   jsonish)
request_objects = st.fixed_dictionaries(
    {"using": usings, "methodCalls": st.lists(method_calls(), max_size=4)},
    optional={"createdIds": st.one_of(st.dictionaries(ids, ids, max_size=2), jsonish)})
broken_calls = st.fixed_dictionaries(
    {"using": usings, "methodCalls": st.one_of(jsonish, st.lists(jsonish, max_size=3))})


def _raw(obj) -> bytes:
    return json.dumps(obj).encode()


raw_bodies = st.one_of(
    st.binary(max_size=40),
    request_objects.map(_raw).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"using": [], "methodCalls": []}',
                     b'{"using": [], "methodCalls": [], "using": []}',
                     b'{"using": [], "methodCalls": [["Core/echo", {"a": NaN}, "c"]]}',
                     b'{"using": [], "methodCalls": [["Core/echo", {"a": 1e999}, "c"]]}',
                     b'{"using": ["' + CORE.encode() + b'"], "methodCalls": [["Core/echo", '
                     b'{"a": ' + b"1" * 5000 + b'}, "c"]]}',
                     b'{"using": [], "methodCalls": [["\xff", {}, "c"]]}',
                     b'{"using": [], "methodCalls": [["Core/echo", {"\\ud800": 1}, "c"]]}',
                     b"[" * 2000 + b"]" * 2000]))
request_bodies = st.one_of(request_objects.map(_raw), request_objects.map(_raw),
                           request_objects.map(_raw), broken_calls.map(_raw),
                           jsonish.map(_raw), raw_bodies)


def fill(body: bytes, values: dict) -> bytes:
    """Replace the $NAME placeholders (a whole string or inside one) with real ids; on the
    octets, so that a body that is not JSON stays exactly as it was drawn."""
    for name in sorted(values, key=len, reverse=True):
        body = body.replace(name.encode(), values[name].encode())
    return body


def check_api_answer(response, sent: bytes):
    """200 with well-formed methodResponses, or 400 with a problem document."""
    assert response.status_code in (200, 400), (response.status_code, response.text[:500])
    if response.status_code == 400:
        assert response.headers["Content-Type"].startswith("application/problem+json"), \
            response.headers
        problem = response.json()
        assert isinstance(problem.get("type"), str) and problem.get("status") == 400, problem
        return
    body = response.json()
    assert isinstance(body.get("sessionState"), str), body
    assert isinstance(body.get("methodResponses"), list), body
    sent_ids = [call[2] for call in json.loads(sent)["methodCalls"]]
    for item in body["methodResponses"]:
        assert isinstance(item, list) and len(item) == 3, item
        name, args, call_id = item
        assert isinstance(name, str) and isinstance(args, dict) and call_id in sent_ids, item
        if name == "error":
            assert isinstance(args.get("type"), str), item
            assert args["type"] != "serverFail", item


@settings(max_examples=REQUEST_EXAMPLES, **FUZZ)
@given(body=request_bodies)
def test_issue_16_fuzz_requests(fuzzed, body):
    client = fuzzed.requests
    body = fill(body, fuzzed.values)
    response = client.http.post(client.session["apiUrl"], data=body, timeout=60,
                                headers={"Content-Type": "application/json"})
    check_api_answer(response, body)


# ---- message strategies ----


POISON_CHARSETS = ["idna", "rot13", "hex", "base64", "zlib", "uu", "quoted-printable",
                   "undefined", "bz2", "punycode", "utf-7", "utf-16", "unicode_escape",
                   "raw_unicode_escape", "palmos", "x-bogus", "utf-8*en", "mbcs", "oem"]
BAD_PARAMETERS = ["name*0=a; name*=b", "name*1=x", "name*=''%ZZ", "name=a; name=b",
                  "name*99999999999999999999=x", "name*0=a; name*0=b", "name*0*=''%; name*1=",
                  "name*0=a; name*4294967296=b", "name*=utf-8'en'", "name*=x", "name*-1=a",
                  "name*0*=idna''%C3%A9; name*1*=%C3", 'name="a;b;c"; name*=\'\'', "name*"]


def poison_fields():
    """Header fields the issue names: charsets that are no text encoding, RFC 2231 oddities."""
    charset = st.sampled_from(POISON_CHARSETS)
    params = st.sampled_from(BAD_PARAMETERS)
    return st.one_of(
        charset.map(lambda c: f"Content-Type: text/plain; charset={c}"),
        charset.map(lambda c: f'Content-Type: text/html; charset="{c}"'),
        charset.map(lambda c: f"Subject: =?{c}?q?caf=C3=A9?= =?{c}?b?YWJj?="),
        charset.map(lambda c: f"From: =?{c}?q?Al=E9?= <alice@example.org>"),
        charset.map(lambda c: f"Content-Disposition: attachment; filename*={c}''caf%C3%A9"),
        charset.map(lambda c: f"Content-Type: text/plain; name*0*={c}''a%FF; name*1=b"),
        params.map(lambda p: f"Content-Type: text/plain; charset=utf-8; {p}"),
        params.map(lambda p: "Content-Disposition: attachment; " + p.replace("name", "filename")),
        st.sampled_from(["Content-Transfer-Encoding: base64",
                         "Content-Transfer-Encoding: quoted-printable",
                         "Content-Transfer-Encoding: x-uuencode", "Content-Transfer-Encoding:",
                         "Content-Type: multipart/mixed; boundary=", 'Content-Type: multipart/'
                         'mixed; boundary="', "Content-Type: multipart/digest; boundary=--",
                         "Content-Type: message/rfc822", "Content-Type: multipart/alternative",
                         "Content-Type: text/plain; charset*=''", "Content-Type: ;;;",
                         "MIME-Version: 1.0", "Date: Mon, 32 Foo 99999 25:61:61 +9999",
                         "From: <<<@>>>, (((, \"\"\"", "Subject: =?utf-8?q?=FF?=",
                         "Content-Type: text/plain; charset=utf-8\r\n\tname=x",
                         "X-Fuzz: \x00\x7f\u00e9", "Received: ; ; ; x"]))


random_fields = st.tuples(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-abcdefghij", min_size=1,
                                  max_size=12),
                          st.text(max_size=30)).map(lambda nv: f"{nv[0]}: {nv[1]}")
fields = st.one_of(poison_fields(), poison_fields(), random_fields)
positions = st.integers(0, 2**20)
mutations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 255)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("duplicate"), positions),
    st.tuples(st.just("remove"), positions),
    st.tuples(st.just("insert"), positions, fields),
    st.tuples(st.just("header"), fields),  # appended to the top-level header block
)


def mutate(raw: bytes, steps) -> bytes:
    """Apply mutations (see `mutations`) to a message, in order."""
    for step in steps:
        kind = step[0]
        lines = raw.split(b"\n")
        if kind == "flip" and raw:
            at = step[1] % len(raw)
            raw = raw[:at] + bytes([step[2]]) + raw[at + 1:]
        elif kind == "truncate":
            raw = raw[: step[1] % (len(raw) + 1)]
        elif kind == "duplicate":
            at = step[1] % len(lines)
            raw = b"\n".join(lines[:at + 1] + lines[at:])
        elif kind == "remove" and len(lines) > 1:
            at = step[1] % len(lines)
            raw = b"\n".join(lines[:at] + lines[at + 1:])
        elif kind == "insert":
            at = step[1] % (len(lines) + 1)
            raw = b"\n".join(lines[:at] + [step[2].encode("utf-8", "surrogatepass")] + lines[at:])
        elif kind == "header":
            blank = next((i for i, line in enumerate(lines) if not line.strip(b"\r")), len(lines))
            raw = b"\n".join(lines[:blank] + [step[1].encode("utf-8", "surrogatepass")]
                             + lines[blank:])
    return raw


def import_and_read(fuzzed, raw: bytes) -> str | None:
    """Upload and import a message; check the outcome and read it back every way a client
    can. Return the Email id (None when it was rightly refused)."""
    client = fuzzed.messages
    account = client.account_id
    blob = upload(client, raw)
    made = client.ok("Email/import", {"accountId": account, "emails": {"m": {
        "blobId": blob, "mailboxIds": {fuzzed.inbox: True}}}})
    if made["notCreated"]:
        error = made["notCreated"]["m"]
        assert error["type"] == "invalidEmail" and not HEADER_START.match(raw), (error, raw[:200])
        return None
    email_id = made["created"]["m"]["id"]
    got = client.ok("Email/get", {
        "accountId": account, "ids": [fuzzed.good_email, email_id], "properties": EMAIL_PROPERTIES,
        "bodyProperties": BODY_PROPERTIES, "fetchAllBodyValues": True,
        "maxBodyValueBytes": 1000})
    assert got["notFound"] == [] and len(got["list"]) == 2, got
    parsed = client.ok("Email/parse", {"accountId": account, "blobIds": [blob],
                                       "properties": EMAIL_PROPERTIES[6:],
                                       "fetchAllBodyValues": True})
    assert parsed["parsed"] and blob in parsed["parsed"], parsed
    for part in leaf_parts(got["list"][1]["bodyStructure"])[:4]:
        url = (client.session["downloadUrl"].replace("{accountId}", account)
               .replace("{blobId}", part["blobId"]).replace("{name}", "part")
               .replace("{type}", "application/octet-stream"))
        r = client.http.get(url, timeout=60)
        assert r.status_code == 200, (part, r.status_code, r.text[:200])
        assert len(r.content) == part["size"], part
    return email_id


def leaf_parts(part) -> list:
    """The parts with content (a multipart may have no parts at all)."""
    if part.get("subParts") is not None:
        return [leaf for child in part["subParts"] for leaf in leaf_parts(child)]
    return [part]


@settings(max_examples=MESSAGE_EXAMPLES, **FUZZ)
@given(name=st.sampled_from(sorted(CORPUS)), steps=st.lists(mutations, min_size=1, max_size=4))
def test_issue_16_fuzz_messages(fuzzed, name, steps):
    import_and_read(fuzzed, mutate(CORPUS[name], steps))


# ---- the poison messages, every one of them, by every way in ----


def _poison_cases():
    plain = ("From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
             "Message-ID: <poison.{mid}@poison.example>\r\nMIME-Version: 1.0\r\n")
    cases = {}
    for charset in ("idna", "rot13", "hex", "base64", "zlib", "uu", "quoted-printable",
                    "undefined", "bz2", "punycode"):
        cases[f"charset-{charset}"] = (
            f"Content-Type: text/plain; charset={charset}", "text")
        cases[f"html-charset-{charset}"] = (
            f"Content-Type: text/html; charset={charset}", "html")
        cases[f"rfc2231-{charset}"] = (
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: attachment; "
            f"filename*={charset}''caf%C3%A9.txt", "text")
        cases[f"encoded-word-{charset}"] = (f"X-Word: =?{charset}?q?caf=C3=A9?=", "word")
    for index, params in enumerate(BAD_PARAMETERS[:6]):
        cases[f"parameters-{index}"] = (
            f"Content-Type: text/plain; charset=utf-8; {params}\r\nContent-Disposition: "
            f"attachment; {params.replace('name', 'filename')}", "text")
    out = {}
    for case, (fields_, kind) in cases.items():
        subject = "Caf =?{0}?q?=C3=A9?= =?{0}?b?YWJj?=".format(case.split("-", 2)[-1]) \
            if kind == "word" else f"Poison {case}"
        head = plain.format(subject=subject, mid=case)
        if kind == "word":
            head += fields_.replace("X-Word", "From") + "\r\n"
            fields_ = "Content-Type: text/plain; charset=utf-8"
        body = "<p>caf\u00e9</p>" if kind == "html" else "caf\u00e9 \u00fcber"
        out[case] = (head + fields_ + "\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
                     + "\r\n").encode("utf-8")
    multipart = ("From: alice@example.org\r\nTo: bob@example.com\r\nSubject: parts\r\n"
                 "Message-ID: <poison.multipart-all@poison.example>\r\n"
                 "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                 "--b\r\nContent-Type: text/plain; charset=idna\r\n\r\ncaf\u00e9\r\n"
                 "--b\r\nContent-Type: text/html; charset=rot13\r\n\r\n<b>x</b>\r\n"
                 "--b\r\nContent-Type: application/octet-stream; name*0=a; name*=b\r\n"
                 "Content-Disposition: attachment; filename*=undefined''x\r\n\r\nxyz\r\n--b--\r\n")
    out["multipart-all"] = multipart.encode("utf-8")
    out["multipart-parameters"] = (
        b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: parts\r\n"
        b"Message-ID: <poison.multipart-parameters@poison.example>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=b; name*0=a; name*=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n")
    return out


POISON = _poison_cases()


@pytest.mark.parametrize("case", sorted(POISON))
def test_issue_16_poison_message(fuzzed, case):
    raw = POISON[case]
    assert import_and_read(fuzzed, raw) is not None
    client = fuzzed.messages
    lmtp = smtplib.LMTP("127.0.0.1", fuzzed.lmtp_port, timeout=60)
    try:
        lmtp.ehlo("mta.example.net")
        assert lmtp.sendmail("mta@example.net", [client.username], raw) == {}
        lmtp.quit()
    except smtplib.SMTPException as exc:
        pytest.fail(f"LMTP refused the message: {exc!r}")
    done = run_cli("deliver", "--user", client.username, data_dir=fuzzed.server.data_dir,
                   input_text=raw.decode("utf-8"))
    assert done.returncode == 0, done.stderr
    found = client.ok("Email/query", {"accountId": client.account_id, "filter": {
        "header": ["Message-ID", f"<poison.{case}@poison.example>"]}})["ids"]
    assert len(found) == 3, found  # by Email/import, LMTP and `jmapd.py deliver`
    got = client.ok("Email/get", {"accountId": client.account_id,
                                  "ids": [fuzzed.good_email, *found],
                                  "properties": EMAIL_PROPERTIES,
                                  "bodyProperties": BODY_PROPERTIES, "fetchAllBodyValues": True})
    assert len(got["list"]) == 4, got


# ---- last: nothing above made the server log a traceback ----


def test_issue_16_fuzz_server_log_clean(fuzzed):
    log = fuzzed.server.log()
    tracebacks = [m.start() for m in re.finditer("Traceback", log)]
    assert not tracebacks, log[max(0, tracebacks[0] - 300): tracebacks[0] + 3000]
