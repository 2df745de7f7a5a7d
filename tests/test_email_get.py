"""Email/get and Email/import over HTTP (jmapd §7.4): RFC 8621 §4.2, §4.8, §4.3, §2.

RFC 8621 §4.2 arguments (properties and their defaults, bodyProperties incl. header:*
part properties, fetchTextBodyValues / fetchHTMLBodyValues / fetchAllBodyValues,
maxBodyValueBytes and UTF-8-safe truncation), the forbidden header forms of §4.1.2
(invalidArguments), capitalisation echo (§4.2), id always returned (RFC 8620 §5.1);
Email/import (§4.8: created members, invalidProperties for blobId/mailboxIds/keywords,
stateMismatch, receivedAt, lowercase keywords); Email/changes after an import (§4.3);
Mailbox counts (§2); and the RFC 8621 examples §4.1.2.3, §4.1.2.4, §4.1.4 and §4.2.1.
The corpus-wide MIME checks are in test_mime.py, whose client helpers are reused here.
"""

import pytest

from conftest import Client, add_user
from test_generic import Var, expect, no_descriptions
from test_mime import DATA, download, inbox_id, upload

NO_SUCH_EMAIL = "f123u456"  # the unknown id of the RFC 8621 §4.2.1 example
DEFAULT_PROPERTIES = [
    "id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "messageId",
    "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo", "subject",
    "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody", "attachments",
]
DEFAULT_BODY_PROPERTIES = ["partId", "blobId", "size", "name", "type", "charset",
                           "disposition", "cid", "language", "location"]


def raw(name):
    return (DATA / f"{name}.eml").read_bytes()


def email_import(client, **args):
    return client.ok("Email/import", {"accountId": client.account_id, **args})


def import_one(client, name, **extra):
    """Upload and import one corpus message into the Inbox; return the created object."""
    blob = upload(client, raw(name))["blobId"]
    resp = email_import(client, emails={"k": {"blobId": blob,
                                              "mailboxIds": {inbox_id(client): True}, **extra}})
    assert resp["notCreated"] is None, resp
    return resp["created"]["k"]


def email_get(client, ids, **args):
    return client.ok("Email/get", {"accountId": client.account_id, "ids": ids, **args})


def get_one(client, email_id, **args):
    found = email_get(client, [email_id], **args)["list"]
    assert len(found) == 1, found
    return found[0]


def get_error(client, args):
    resp = client.call("Email/get", {"accountId": client.account_id, **args})
    assert resp[0] == "error", resp
    return resp[1]["type"]


def leaves(part):
    """Leaf EmailBodyParts of a bodyStructure, depth-first."""
    if part.get("subParts"):
        return [leaf for sub in part["subParts"] for leaf in leaves(sub)]
    return [part]


def state(client):
    return email_get(client, [])["state"]


class Mail:
    """A shared account for read-only tests, with a few corpus messages imported once."""

    NAMES = ["03-related-cid", "34-rfc8621-structure", "35-rfc8621-addresses",
             "36-multibyte", "38-spec-dinner"]

    def __init__(self, client):
        self.client = client
        self.ids = {name: import_one(client, name)["id"] for name in self.NAMES}


@pytest.fixture(scope="module")
def mail(server):
    username = "email-get@example.com"
    add_user(server.data_dir, username)
    return Mail(Client(server.url, username))


# =============================================================================
# RFC 8621 examples
# =============================================================================


def test_spec_8621_4_1_2_3_address_list(mail):
    email = get_one(mail.client, mail.ids["35-rfc8621-addresses"],
                    properties=["header:To:asAddresses"])
    # The RFC prints "John Smith", but =?UTF-8?Q?John_Sm=C3=AEth?= is UTF-8 C3 AE = U+00EE
    # (i with circumflex): decoding per RFC 2047 gives "John Smîth" (RFC 8621 erratum).
    assert email["header:To:asAddresses"] == [
        {"name": "James Smythe", "email": "james@example.com"},
        {"name": None, "email": "jane@example.com"},
        {"name": "John Smîth", "email": "john@example.com"},
    ]


def test_spec_8621_4_1_2_4_grouped_address_list(mail):
    email = get_one(mail.client, mail.ids["35-rfc8621-addresses"],
                    properties=["header:To:asGroupedAddresses"])
    # As in §4.1.2.3: "John Smîth", not the RFC's "John Smith".
    assert email["header:To:asGroupedAddresses"] == [
        {"name": None, "addresses": [
            {"name": "James Smythe", "email": "james@example.com"},
        ]},
        {"name": "Friends", "addresses": [
            {"name": None, "email": "jane@example.com"},
            {"name": "John Smîth", "email": "john@example.com"},
        ]},
    ]


def test_spec_8621_4_1_4_body_decomposition(mail):
    """The list-manager message: textBody [A,B,C,D,K], htmlBody [A,E,K], attachments
    [C,F,G,H,J]; its leaves, depth-first, are A B C D E F G H J K."""
    email = get_one(mail.client, mail.ids["34-rfc8621-structure"],
                    properties=["bodyStructure", "textBody", "htmlBody", "attachments"],
                    bodyProperties=["partId", "type", "subParts"])
    label = dict(zip([p["partId"] for p in leaves(email["bodyStructure"])], "ABCDEFGHJK"))
    assert len(label) == 10
    names = {prop: "".join(label[p["partId"]] for p in email[prop])
             for prop in ("textBody", "htmlBody", "attachments")}
    assert names == {"textBody": "ABCDK", "htmlBody": "AEK", "attachments": "CFGHJ"}


def test_spec_8621_4_2_1_email_get_example(mail):
    client = mail.client
    email_id = mail.ids["38-spec-dinner"]
    resp = client.request([["Email/get", {
        "accountId": client.account_id,
        "ids": [NO_SUCH_EMAIL, email_id],
        "properties": ["threadId", "mailboxIds", "from", "subject", "receivedAt",
                       "header:List-POST:asURLs", "htmlBody", "bodyValues"],
        "bodyProperties": ["partId", "blobId", "size", "type"],
        "fetchHTMLBodyValues": True,
        "maxBodyValueBytes": 256,
    }, "#1"]])
    html = raw("38-spec-dinner").split(b"charset=us-ascii\r\n\r\n")[1].split(b"\r\n--b38")[0]
    got = resp["methodResponses"][0][1]["list"][0]
    values = got.get("bodyValues", {})
    first = got["htmlBody"][0]["partId"] if got.get("htmlBody") else None
    truncated = values.get(first, {}).get("value", "")
    # §4.2: at most 256 octets, a prefix, and (SHOULD) not cut inside an HTML tag.
    assert len(truncated.encode()) <= 256 and html.decode().startswith(truncated), truncated
    assert truncated.startswith("<html><body><p>Hello")
    expect(resp["methodResponses"], [["Email/get", {
        "accountId": client.account_id,
        "state": Var("state"),
        "list": [{
            "id": email_id,
            "threadId": Var("threadId"),
            "mailboxIds": {inbox_id(client): True},
            "from": [{"name": "Joe Bloggs", "email": "joe@example.com"}],
            "subject": "Dinner on Thursday?",
            "receivedAt": Var("receivedAt"),
            "header:List-POST:asURLs": ["mailto:partytime@lists.example.com"],
            "htmlBody": [
                {"partId": Var("p1"), "blobId": Var("b1"), "size": len(html),
                 "type": "text/html"},
                {"partId": Var("p2"), "blobId": Var("b2"),
                 "size": len("-- Sent by your friendly mailing list ..."), "type": "text/plain"},
            ],
            "bodyValues": {
                Var("p1"): {"isEncodingProblem": False, "isTruncated": True,
                            "value": truncated},
                Var("p2"): {"isEncodingProblem": False, "isTruncated": False,
                            "value": "-- Sent by your friendly mailing list ..."},
            },
        }],
        "notFound": [NO_SUCH_EMAIL],
    }, "#1"]])


# =============================================================================
# Email/get arguments (RFC 8621 §4.2)
# =============================================================================


def test_email_get_default_properties(mail):
    """properties omitted: exactly the §4.2 default list; parts: the default bodyProperties."""
    email = get_one(mail.client, mail.ids["03-related-cid"])
    assert set(email) == set(DEFAULT_PROPERTIES)
    for prop in ("textBody", "htmlBody", "attachments"):
        for part in email[prop]:
            assert set(part) == set(DEFAULT_BODY_PROPERTIES), part
    assert email["bodyValues"] == {}  # no fetch*BodyValues flag: no values


def test_email_get_id_always_returned(mail):
    email = get_one(mail.client, mail.ids["03-related-cid"], properties=["subject"])
    assert email == {"id": mail.ids["03-related-cid"], "subject": "New logo"}


def test_email_get_unknown_ids_not_found(mail):
    resp = email_get(mail.client, [NO_SUCH_EMAIL, mail.ids["03-related-cid"], "Mnope"],
                     properties=["id"])
    assert resp["list"] == [{"id": mail.ids["03-related-cid"]}]
    assert sorted(resp["notFound"]) == sorted([NO_SUCH_EMAIL, "Mnope"])


def test_email_get_header_property_names_echo_request_case(mail):
    props = ["header:SUBJECT", "header:subject:asText", "header:List-POST:asURLs",
             "header:x-NOT-there:all", "header:FROM:asAddresses"]
    email = get_one(mail.client, mail.ids["38-spec-dinner"], properties=props)
    assert set(email) == {"id", *props}
    assert email["header:SUBJECT"] == " Dinner on Thursday?"
    assert email["header:subject:asText"] == "Dinner on Thursday?"
    assert email["header:x-NOT-there:all"] == []
    assert email["header:FROM:asAddresses"] == [{"name": "Joe Bloggs", "email": "joe@example.com"}]


def test_email_get_as_raw_is_the_raw_form(mail):
    """Raw is one of the forms (§4.1.2.1), so :asRaw is allowed on any field (§4.1.3)."""
    email = get_one(mail.client, mail.ids["38-spec-dinner"],
                    properties=["header:Subject:asRaw", "header:From:asRaw:all",
                                "header:Subject"])
    assert email["header:Subject:asRaw"] == email["header:Subject"] == " Dinner on Thursday?"
    assert email["header:From:asRaw:all"] == [" Joe Bloggs <joe@example.com>"]


@pytest.mark.parametrize("prop", [
    "header:From:asDate",           # §4.2's own example
    "header:Subject:asAddresses",
    "header:From:asText",           # Text: Subject, Comments, Keywords, List-Id, non-5322/2369
    "header:Received:asText",       # RFC 5322 §3.6.7 defines Received
    "header:List-Unsubscribe:asText",  # RFC 2369 field
    "header:List-Post:asAddresses",
    "header:Subject:asMessageIds",
    "header:To:asMessageIds",
    "header:Message-ID:asAddresses",
    "header:Date:asURLs",
    "header:Subject:asDate:all",
    "header:Sender:asGroupedAddresses:all:x",
    "header:From:all:asAddresses",  # suffixes out of order (§4.1.3)
    "header:From:asSomething",      # no such form
    "header:",                      # empty field name
    "header:Fr om",                 # space is not a printable ASCII name character
])
def test_email_get_forbidden_header_form_is_invalid_arguments(mail, prop):
    assert get_error(mail.client, {"ids": [mail.ids["03-related-cid"]],
                                   "properties": ["id", prop]}) == "invalidArguments"


def test_email_get_forbidden_form_in_body_properties(mail):
    assert get_error(mail.client, {"ids": [mail.ids["03-related-cid"]],
                                   "properties": ["bodyStructure"],
                                   "bodyProperties": ["partId", "header:From:asDate"]}
                     ) == "invalidArguments"


def test_email_get_unknown_body_property_is_invalid_arguments(mail):
    assert get_error(mail.client, {"ids": [mail.ids["03-related-cid"]],
                                   "properties": ["textBody"],
                                   "bodyProperties": ["partId", "colour"]}) == "invalidArguments"


def test_email_get_body_properties_with_header_part_properties(mail):
    """bodyProperties may name header:* part properties and `headers` (§4.1.4)."""
    email = get_one(mail.client, mail.ids["03-related-cid"], properties=["attachments"],
                    bodyProperties=["partId", "headers", "header:Content-Type",
                                    "header:Content-Disposition:asText",
                                    "header:Content-ID:asMessageIds", "header:X-None:all"])
    png = email["attachments"][0]
    assert set(png) == {"partId", "headers", "header:Content-Type",
                        "header:Content-Disposition:asText", "header:Content-ID:asMessageIds",
                        "header:X-None:all"}
    assert png["headers"] == [
        {"name": "Content-Transfer-Encoding", "value": " base64"},
        {"name": "Content-Disposition", "value": ' inline;\r\n\tfilename="logo.png"'},
        {"name": "Content-Type", "value": ' image/png;\r\n\tx-unix-mode=0644;\r\n\tname="logo.png"'},
        {"name": "Content-Id", "value": " <logo.png@01D9A1B2.C3D4E5F0>"},
    ]
    assert png["header:Content-Type"] == ' image/png;\r\n\tx-unix-mode=0644;\r\n\tname="logo.png"'
    assert png["header:Content-Disposition:asText"] == 'inline;\tfilename="logo.png"'
    assert png["header:Content-ID:asMessageIds"] == ["logo.png@01D9A1B2.C3D4E5F0"]
    assert png["header:X-None:all"] == []


def body_values(client, email_id, **flags):
    email = get_one(client, email_id, properties=["bodyStructure", "bodyValues"],
                    bodyProperties=["partId", "type", "subParts"], **flags)
    return {p["type"]: p["partId"] for p in leaves(email["bodyStructure"])}, email["bodyValues"]


def test_email_get_body_value_flags_combine(mail):
    """fetchText + fetchHTML: the union; text/* only, never image parts (§4.2)."""
    email_id = mail.ids["03-related-cid"]
    parts, values = body_values(mail.client, email_id, fetchTextBodyValues=True,
                                fetchHTMLBodyValues=True)
    assert set(values) == {parts["text/plain"], parts["text/html"]}
    _, none = body_values(mail.client, email_id)
    assert none == {}


T36 = "aé€😀" * 40 + "\n"  # 36-multibyte's text part: 10 octets per "aé€😀", 401 in all


def truncated_values(client, email_id, limits, part_type="text/plain"):
    """One request, one Email/get per limit; return {limit: EmailBodyValue}."""
    calls = [["Email/get", {"accountId": client.account_id, "ids": [email_id],
                            "properties": ["bodyStructure", "bodyValues"],
                            "bodyProperties": ["partId", "type", "subParts"],
                            "fetchAllBodyValues": True, "maxBodyValueBytes": limit}, str(limit)]
             for limit in limits]
    out = {}
    for start in range(0, len(calls), 16):  # maxCallsInRequest
        for name, args, call_id in client.request(calls[start:start + 16])["methodResponses"]:
            assert name == "Email/get", args
            email = args["list"][0]
            part = next(p for p in leaves(email["bodyStructure"]) if p["type"] == part_type)
            out[int(call_id)] = email["bodyValues"][part["partId"]]
    return out


def test_email_get_max_body_value_bytes_never_splits_utf8(mail):
    """Truncation to maxBodyValueBytes octets yields valid UTF-8, never mid-codepoint."""
    limits = list(range(1, 41)) + [399, 400]
    for limit, value in truncated_values(mail.client, mail.ids["36-multibyte"], limits).items():
        text = value["value"]
        assert len(text.encode("utf-8")) <= limit, (limit, text)
        assert T36.startswith(text) and "\ufffd" not in text, (limit, text)
        assert value["isTruncated"] is True and value["isEncodingProblem"] is False, value


def test_email_get_max_body_value_bytes_keeps_whole_values(mail):
    """A value that fits (or maxBodyValueBytes 0, the default) is not truncated."""
    for limit, value in truncated_values(mail.client, mail.ids["36-multibyte"],
                                         [0, 401, 402, 10000]).items():
        assert value == {"value": T36, "isEncodingProblem": False, "isTruncated": False}, limit


def test_email_get_max_body_value_bytes_html_not_inside_tag(mail):
    """SHOULD: text/html is not truncated inside a tag (§4.2)."""
    start = 15 + 40  # '<html><body><p>' then 20 x 'é' (40 octets): the <a ...> tag begins
    limits = range(start + 1, start + 50, 4)
    for limit, value in truncated_values(mail.client, mail.ids["36-multibyte"], limits,
                                         "text/html").items():
        text = value["value"]
        assert len(text.encode()) <= limit and value["isTruncated"] is True, (limit, value)
        assert text.rfind("<") <= text.rfind(">"), (limit, text)


def test_email_get_max_body_value_bytes_negative_is_invalid(mail):
    assert get_error(mail.client, {"ids": [mail.ids["36-multibyte"]],
                                   "fetchAllBodyValues": True,
                                   "maxBodyValueBytes": -1}) == "invalidArguments"


# =============================================================================
# Email/import (RFC 8621 §4.8)
# =============================================================================


def test_email_import_created_members_and_states(client):
    data = raw("01-plain-ascii")
    blob = upload(client, data)["blobId"]
    before = state(client)
    resp = email_import(client, emails={"k1": {
        "blobId": blob, "mailboxIds": {inbox_id(client): True},
        "keywords": {"$Seen": True, "$Flagged": True},
        "receivedAt": "2024-05-14T07:15:00Z"}})
    expect(resp, {
        "accountId": client.account_id, "oldState": before, "newState": Var("new"),
        "created": {"k1": {"id": Var("id"), "blobId": blob, "threadId": Var("thread"),
                           "size": len(data)}},
        "notCreated": None,
    })
    assert resp["newState"] != before and state(client) == resp["newState"]
    email = get_one(client, resp["created"]["k1"]["id"],
                    properties=["keywords", "receivedAt", "blobId", "size"])
    # keywords are case-insensitive and MUST be returned in lowercase (§4.1.1)
    assert email["keywords"] == {"$seen": True, "$flagged": True}
    assert email["receivedAt"] == "2024-05-14T07:15:00Z"
    assert download(client, email["blobId"]) == data


def test_email_import_received_at_defaults_to_newest_received_header(client):
    created = import_one(client, "27-list-headers")
    email = get_one(client, created["id"], properties=["receivedAt"])
    assert email["receivedAt"] == "2024-08-21T21:21:21Z"


def not_created(client, emails):
    resp = email_import(client, emails=emails)
    assert resp["created"] is None, resp
    return no_descriptions(resp["notCreated"])


def invalid(errors, key):
    err = errors[key]
    assert err["type"] == "invalidProperties", err
    return sorted(err.get("properties", []))


def test_email_import_unknown_blob_is_invalid_properties(client):
    """§4.8: "If the blobId ... [is] invalid (e.g., ... id not found), the server MUST
    reject the import with an invalidProperties SetError" (blobNotFound is Email/set's,
    §4.6, for EmailBodyPart blob ids)."""
    errors = not_created(client, {"k": {"blobId": "Gdeadbeef", "mailboxIds": {
        inbox_id(client): True}}})
    assert invalid(errors, "k") in ([], ["blobId"])


def test_email_import_other_accounts_blob_is_invalid_properties(client, other_client):
    blob = upload(other_client, raw("01-plain-ascii"))["blobId"]
    errors = not_created(client, {"k": {"blobId": blob, "mailboxIds": {
        inbox_id(client): True}}})
    assert invalid(errors, "k") in ([], ["blobId"])


@pytest.mark.parametrize("mailbox_ids", [{}, {"Mnosuchbox": True}, None, {"INBOX": False}])
def test_email_import_bad_mailbox_ids_are_invalid_properties(client, mailbox_ids):
    blob = upload(client, raw("01-plain-ascii"))["blobId"]
    if mailbox_ids == {"INBOX": False}:
        mailbox_ids = {inbox_id(client): False}  # values MUST be true (§4.1.1)
    emails = {"k": {"blobId": blob, "mailboxIds": mailbox_ids}}
    assert invalid(not_created(client, emails), "k") in ([], ["mailboxIds"])
    assert email_get(client, None, properties=["id"])["list"] == []


@pytest.mark.parametrize("keywords", [{"a(b": True}, {"$seen": False}, {"": True},
                                      {"x" * 256: True}])
def test_email_import_bad_keywords_are_invalid_properties(client, keywords):
    blob = upload(client, raw("01-plain-ascii"))["blobId"]
    emails = {"k": {"blobId": blob, "mailboxIds": {inbox_id(client): True},
                    "keywords": keywords}}
    assert invalid(not_created(client, emails), "k") in ([], ["keywords"])


def test_email_import_missing_blob_id_is_invalid_properties(client):
    emails = {"k": {"mailboxIds": {inbox_id(client): True}}}
    assert invalid(not_created(client, emails), "k") in ([], ["blobId"])


def test_email_import_each_email_is_atomic(client):
    blob = upload(client, raw("01-plain-ascii"))["blobId"]
    inbox = inbox_id(client)
    resp = email_import(client, emails={
        "good": {"blobId": blob, "mailboxIds": {inbox: True}},
        "bad": {"blobId": blob, "mailboxIds": {}},
    })
    assert set(resp["created"]) == {"good"} and set(resp["notCreated"]) == {"bad"}


def test_email_import_if_in_state_mismatch(client):
    blob = upload(client, raw("01-plain-ascii"))["blobId"]
    emails = {"k": {"blobId": blob, "mailboxIds": {inbox_id(client): True}}}
    resp = client.call("Email/import", {"accountId": client.account_id,
                                        "ifInState": "not-the-state", "emails": emails})
    assert resp[0] == "error" and resp[1]["type"] == "stateMismatch", resp
    assert email_get(client, None, properties=["id"])["list"] == []
    current = state(client)
    ok = email_import(client, ifInState=current, emails=emails)
    assert ok["oldState"] == current and set(ok["created"]) == {"k"}


def test_email_import_then_changes_lists_created(client):
    since = state(client)
    created = import_one(client, "02-alternative")
    changes = client.ok("Email/changes", {"accountId": client.account_id, "sinceState": since})
    assert changes["oldState"] == since
    assert changes["created"] == [created["id"]]
    assert changes["updated"] == [] and changes["destroyed"] == []
    assert changes["newState"] == state(client)


def test_email_import_updates_mailbox_counts(client):
    inbox = inbox_id(client)

    def counts():
        box = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": [inbox],
                                        "properties": ["totalEmails", "unreadEmails",
                                                       "totalThreads", "unreadThreads"]})
        return {k: v for k, v in box["list"][0].items() if k != "id"}

    assert counts() == {"totalEmails": 0, "unreadEmails": 0, "totalThreads": 0,
                        "unreadThreads": 0}
    import_one(client, "01-plain-ascii", keywords={"$seen": True})
    assert counts() == {"totalEmails": 1, "unreadEmails": 0, "totalThreads": 1,
                        "unreadThreads": 0}
    import_one(client, "05-attached-message")
    assert counts() == {"totalEmails": 2, "unreadEmails": 1, "totalThreads": 2,
                        "unreadThreads": 1}


@pytest.mark.parametrize("received_at", ["yesterday", "2024-01-01T00:00:00+01:00", 17])
def test_email_import_bad_received_at_is_invalid_properties(client, received_at):
    """receivedAt is a UTCDate: an RFC 3339 date-time whose offset MUST be "Z" (RFC 8620
    §1.4)."""
    blob = upload(client, raw("01-plain-ascii"))["blobId"]
    emails = {"k": {"blobId": blob, "mailboxIds": {inbox_id(client): True},
                    "receivedAt": received_at}}
    assert invalid(not_created(client, emails), "k") in ([], ["receivedAt"])


def test_email_import_duplicate_is_separate_or_already_exists(client):
    """§4.8: duplicates are either refused with alreadyExists + existingId, or a new Email
    with its own id and independent mutable properties."""
    first = import_one(client, "28-references")
    blob = upload(client, raw("28-references"))["blobId"]
    resp = email_import(client, emails={"k": {"blobId": blob, "keywords": {"$seen": True},
                                              "mailboxIds": {inbox_id(client): True}}})
    if resp["created"] is None:
        err = no_descriptions(resp["notCreated"]["k"])
        assert err == {"type": "alreadyExists", "existingId": first["id"]}
        return
    second = resp["created"]["k"]["id"]
    assert second != first["id"]
    found = {e["id"]: e["keywords"]
             for e in email_get(client, [first["id"], second], properties=["keywords"])["list"]}
    assert found == {first["id"]: {}, second: {"$seen": True}}


def test_email_import_into_mailbox_created_in_same_request(client):
    """A Mailbox created earlier in the request is named by "#" + its creation id (RFC 8620
    §5.3)."""
    blob = upload(client, raw("01-plain-ascii"))["blobId"]
    resp = client.request([
        ["Mailbox/set", {"accountId": client.account_id, "create": {"box": {"name": "New"}}}, "0"],
        ["Email/import", {"accountId": client.account_id, "emails": {
            "k": {"blobId": blob, "mailboxIds": {"#box": True}}}}, "1"],
    ])["methodResponses"]
    box = resp[0][1]["created"]["box"]["id"]
    email_id = resp[1][1]["created"]["k"]["id"]
    assert get_one(client, email_id, properties=["mailboxIds"])["mailboxIds"] == {box: True}
