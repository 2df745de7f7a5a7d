"""Session resource, API request engine and authentication, against a real server.

RFC 8620 §1.5 (I-JSON), §2 (Session, with §2.1's example and §2.2 autodiscovery),
§3.2-§3.4 (Invocation, Request, Response; §3.3.1/§3.4.1 examples), §3.6.1 (request-level
problem documents, RFC 7807; §3.6.1.1 examples), §3.6.2 (method-level errors), §3.7
(result references), §3.3/§5.3 (creation ids and createdIds), §4 (Core/echo, §4.1
example), §5.1/§5.3 requestTooLarge; RFC 7617 (HTTP Basic) and RFC 7235 (401 challenge).

Two servers: the session-wide `server` of conftest (default limits) and a module-wide
`small` server with tiny limits, so that every limit can be tested just under and just
over it. Failed-login tests run against `small` only, which is started with generous
login-failure limits: failures from 127.0.0.1 must not lock other modules out of the
shared server.
"""

import base64
import itertools
import json
import os
import re
import sqlite3
import threading
import time
from urllib.parse import urljoin, urlsplit

import pytest
import requests

from conftest import CORE, MAIL, PASSWORD, USING, Client, Server, add_user, run_cli

PROBLEM = "urn:ietf:params:jmap:error:"
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # RFC 8620 §1.2
CORE_LIMITS = ("maxSizeUpload", "maxConcurrentUpload", "maxSizeRequest",
               "maxConcurrentRequests", "maxCallsInRequest", "maxObjectsInGet",
               "maxObjectsInSet")
DEFAULT_MAILBOXES = {"Inbox", "Drafts", "Sent", "Archive", "Junk", "Trash"}

SMALL_LIMITS = {"maxSizeRequest": 2000, "maxCallsInRequest": 3, "maxObjectsInGet": 5,
                "maxObjectsInSet": 5, "maxConcurrentRequests": 1}
_names = itertools.count(1)


# ---------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------


def fresh_name(prefix):
    return f"{prefix}{next(_names)}-{os.getpid()}@example.com"


@pytest.fixture(scope="module")
def reader(server):
    """A module-wide user on the shared server, for tests that change nothing."""
    username = add_user(server.data_dir, fresh_name("engine-reader"))
    return Client(server.url, username)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A second server with small limits (and login-failure limits out of the way)."""
    data_dir = tmp_path_factory.mktemp("jmapd-small") / "data"
    add_user(data_dir, "small-first@example.com")
    srv = Server(
        data_dir,
        "--max-size-request", SMALL_LIMITS["maxSizeRequest"],
        "--max-calls-in-request", SMALL_LIMITS["maxCallsInRequest"],
        "--max-objects-in-get", SMALL_LIMITS["maxObjectsInGet"],
        "--max-objects-in-set", SMALL_LIMITS["maxObjectsInSet"],
        "--max-concurrent-requests", SMALL_LIMITS["maxConcurrentRequests"],
        "--max-login-failures-per-address", 100000,
        "--max-login-failures-per-user", 100000,
    ).start()
    yield srv
    srv.stop()


@pytest.fixture
def small_client(small):
    """A fresh user of its own on the small server."""
    return Client(small.url, add_user(small.data_dir, fresh_name("small")))


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def echo_request(args=None, using=(CORE,)):
    return {"using": list(using), "methodCalls": [["Core/echo", args or {"a": 1}, "c0"]]}


def assert_problem(r, kind, status=400):
    """Check an RFC 7807 problem document of a JMAP request-level error (RFC 8620 §3.6.1)."""
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].split(";")[0].strip() == "application/problem+json"
    body = r.json()
    assert body["type"] == PROBLEM + kind, body
    assert body["status"] == status, body
    if "detail" in body:
        assert isinstance(body["detail"], str)
    return body


def assert_limit(r, limit):
    body = assert_problem(r, "limit")
    assert body["limit"] == limit, body  # RFC 8620 §3.6.1: MUST name the limit
    return body


def error_type(resp):
    """The type of an ["error", {...}, id] response (RFC 8620 §3.6.2)."""
    assert resp[0] == "error", resp
    assert isinstance(resp[1]["type"], str)
    if "description" in resp[1]:
        assert isinstance(resp[1]["description"], str)
    return resp[1]["type"]


def without_description(resp):
    """A method response without the optional free-text description of an error."""
    name, args, call_id = resp
    if name == "error":
        args = {k: v for k, v in args.items() if k != "description"}
    return [name, args, call_id]


def strict_json(text):
    """Parse JSON refusing the NaN/Infinity extensions Python's json would accept."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def mailboxes(client, account_id=None):
    """Map name -> Mailbox object for every Mailbox of an account."""
    got = client.ok("Mailbox/get", {"accountId": account_id or client.account_id, "ids": None})
    return {m["name"]: m for m in got["list"]}


def ref(result_of, name, path):
    return {"resultOf": result_of, "name": name, "path": path}


# ---------------------------------------------------------------------------------------
# Session resource (RFC 8620 §2)
# ---------------------------------------------------------------------------------------


def is_uint(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**53 - 1


def test_session_required_members_and_types(reader):
    r = reader.http.get(reader.base_url + "/jmap/session", timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0].strip() == "application/json"
    session = strict_json(r.text)
    for name, kind in (("capabilities", dict), ("accounts", dict), ("primaryAccounts", dict),
                       ("username", str), ("apiUrl", str), ("downloadUrl", str),
                       ("uploadUrl", str), ("eventSourceUrl", str), ("state", str)):
        assert isinstance(session.get(name), kind), (name, session.get(name))
    assert session["state"]
    assert session["username"] == reader.username

    core = session["capabilities"][CORE]
    for limit in CORE_LIMITS:
        assert is_uint(core[limit]), (limit, core.get(limit))
    # The RFC 8620 §2.1 example spells this limit "maxConcurrentRequest": the example is
    # wrong, §2 calls it maxConcurrentRequests. (The same example is not even valid JSON:
    # a comma is missing after "urn:ietf:params:jmap:mail": {}.)
    assert "maxConcurrentRequest" not in core
    assert isinstance(core["collationAlgorithms"], list)
    assert all(isinstance(c, str) for c in core["collationAlgorithms"])
    assert MAIL in session["capabilities"]
    assert all(isinstance(v, dict) for v in session["capabilities"].values())


def test_session_accounts_and_primary_accounts(reader):
    session = reader.session
    assert session["accounts"], "the user has at least their own account"
    for account_id, account in session["accounts"].items():
        assert ID_RE.match(account_id)
        assert isinstance(account["name"], str)
        assert isinstance(account["isPersonal"], bool)
        assert isinstance(account["isReadOnly"], bool)
        assert isinstance(account["accountCapabilities"], dict)
        assert all(isinstance(v, dict) for v in account["accountCapabilities"].values())
        # accountCapabilities only name capabilities the server advertises
        assert set(account["accountCapabilities"]) <= set(session["capabilities"])

    primary = session["primaryAccounts"]
    assert CORE not in primary  # RFC 8620 §2: core SHOULD NOT be present
    mail_account = primary[MAIL]
    own = session["accounts"][mail_account]
    assert own["isPersonal"] is True
    assert own["isReadOnly"] is False
    for capability, account_id in primary.items():
        assert isinstance(account_id, str)
        # "A map of capability URIs (as found in accountCapabilities) to the account id"
        assert capability in session["accounts"][account_id]["accountCapabilities"]


def template_variables(template):
    """The expressions of a level-1 URI Template (RFC 6570): {name} only."""
    expressions = re.findall(r"\{([^}]*)\}", template)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", e) for e in expressions), template
    assert "{" not in re.sub(r"\{[^}]*\}", "", template), template
    return set(expressions)


@pytest.mark.parametrize("member, variables", [
    ("apiUrl", set()),
    ("downloadUrl", {"accountId", "blobId", "type", "name"}),
    ("uploadUrl", {"accountId"}),
    ("eventSourceUrl", {"types", "closeafter", "ping"}),
])
def test_session_urls_absolute_with_template_variables(server, reader, member, variables):
    url = reader.session[member]
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.netloc, url
    assert parts.netloc == urlsplit(server.url).netloc, url  # where the client connected
    assert template_variables(url) == variables


def test_session_cache_control_no_store(reader):
    r = reader.http.get(reader.base_url + "/jmap/session", timeout=30)
    assert r.status_code == 200
    directives = {d.strip().lower() for d in r.headers.get("Cache-Control", "").split(",")}
    assert "no-store" in directives


def test_session_state_equals_api_session_state(reader):
    state = reader.session["state"]
    response = reader.request([["Core/echo", {}, "c0"]], using=[CORE])
    assert response["sessionState"] == state
    response = reader.request([["Mailbox/get", {"accountId": reader.account_id, "ids": []},
                                "c0"]])
    assert response["sessionState"] == state


def test_session_advertises_configured_limits(small_client):
    core = small_client.session["capabilities"][CORE]
    for limit, value in SMALL_LIMITS.items():
        assert core[limit] == value


def test_session_well_known_redirects_to_session(server, reader):
    r = requests.get(server.url + "/.well-known/jmap", allow_redirects=False, timeout=30)
    assert 300 <= r.status_code < 400
    location = r.headers["Location"]
    assert location.endswith("/jmap/session")
    followed = reader.http.get(urljoin(server.url + "/", location), timeout=30)
    assert followed.status_code == 200
    assert followed.json()["username"] == reader.username
    # and a client that just follows redirects (RFC 8620 §2.2) gets the Session
    auto = reader.http.get(server.url + "/.well-known/jmap", timeout=30)
    assert auto.status_code == 200
    assert auto.json()["state"] == reader.session["state"]


# ---------------------------------------------------------------------------------------
# RFC 8620 examples, replayed exactly
# ---------------------------------------------------------------------------------------


def test_engine_rfc8620_4_1_core_echo_example(reader):
    request = {"using": [CORE],
               "methodCalls": [["Core/echo", {"hello": True, "high": 5}, "b3ff"]]}
    r = reader.post(request)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0].strip() == "application/json"
    assert strict_json(r.text) == {
        "methodResponses": [["Core/echo", {"hello": True, "high": 5}, "b3ff"]],
        "sessionState": reader.session["state"],
    }


def test_engine_core_echo_returns_arguments_unchanged(reader):
    args = {"nested": {"list": [1, -2, 2.5, None, False, True, "", "ü ✓ 🙂"]},
            "accountId": "not-an-account", "empty": {}, "big": 2**53 - 1}
    assert reader.call("Core/echo", args, using=[CORE]) == ["Core/echo", args, "c0"]


def test_engine_rfc8620_3_3_1_example_request_unknown_methods(reader):
    """§3.3.1's request: none of method1..3 exist, so each gets §3.4.1's unknownMethod."""
    request = {
        "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
        "methodCalls": [
            ["method1", {"arg1": "arg1data", "arg2": "arg2data"}, "c1"],
            ["method2", {"arg1": "arg1data"}, "c2"],
            ["method3", {}, "c3"],
        ],
    }
    r = reader.post(request)
    assert r.status_code == 200  # method-level errors are never HTTP errors (§3.6.2)
    response = strict_json(r.text)
    assert set(response) == {"methodResponses", "sessionState"}  # no createdIds asked for
    assert response["sessionState"] == reader.session["state"]
    for resp in response["methodResponses"]:
        error_type(resp)
    assert [without_description(x) for x in response["methodResponses"]] == [
        ["error", {"type": "unknownMethod"}, "c1"],
        ["error", {"type": "unknownMethod"}, "c2"],
        ["error", {"type": "unknownMethod"}, "c3"],
    ]


def test_engine_rfc8620_3_6_1_1_unknown_capability_example(reader):
    r = reader.post({"using": [CORE, "https://example.com/apis/foobar"],
                     "methodCalls": [["Core/echo", {}, "c0"]]})
    assert_problem(r, "unknownCapability")


def test_engine_rfc8620_3_6_1_1_limit_example(small_client):
    body = compact(echo_request({"pad": "x" * SMALL_LIMITS["maxSizeRequest"]}))
    assert_limit(small_client.post(body), "maxSizeRequest")


# ---------------------------------------------------------------------------------------
# Request-level errors (RFC 8620 §3.6.1, RFC 7807)
# ---------------------------------------------------------------------------------------

ECHO_PREFIX = b'{"using":["urn:ietf:params:jmap:core"],"methodCalls":[["Core/echo",'
NOT_JSON = {
    "syntax error": b'{"using": [',
    "empty body": b"",
    "trailing garbage": ECHO_PREFIX + b'{},"c0"]]} x',
    "single quotes": b"{'using': [], 'methodCalls': []}",
    "duplicate top-level name": (b'{"using":["urn:ietf:params:jmap:core"],'
                                 b'"using":["urn:ietf:params:jmap:core"],"methodCalls":[]}'),
    "duplicate name in arguments": ECHO_PREFIX + b'{"a":1,"a":2},"c0"]]}',
    "NaN": ECHO_PREFIX + b'{"a":NaN},"c0"]]}',
    "Infinity": ECHO_PREFIX + b'{"a":Infinity},"c0"]]}',
    "-Infinity": ECHO_PREFIX + b'{"a":-Infinity},"c0"]]}',
    "not UTF-8 (Latin-1 byte)": ECHO_PREFIX + b'{"a":"caf\xe9"},"c0"]]}',
    "UTF-16": json.dumps(echo_request()).encode("utf-16"),
}


@pytest.mark.parametrize("body", NOT_JSON.values(), ids=list(NOT_JSON))
def test_engine_not_json(reader, body):
    assert_problem(reader.post(body), "notJSON")


def test_engine_not_json_lone_surrogate(reader):
    """I-JSON (RFC 7493 §2.1, required by RFC 8620 §1.5): no surrogate code points."""
    assert_problem(reader.post(ECHO_PREFIX + b'{"a":"\\ud800"},"c0"]]}'), "notJSON")


def test_engine_not_json_noncharacter(reader):
    """I-JSON (RFC 7493 §2.1, required by RFC 8620 §1.5): no noncharacters."""
    assert_problem(reader.post(ECHO_PREFIX + b'{"a":"\\ufdd0"},"c0"]]}'), "notJSON")


def test_engine_number_overflow_never_yields_invalid_json(reader):
    """A number beyond IEEE 754 double (RFC 7493 §2.2): refuse it or answer valid JSON."""
    r = reader.post(ECHO_PREFIX + b'{"a":1e400},"c0"]]}')
    if r.status_code == 400:
        assert_problem(r, "notJSON")
    else:
        assert r.status_code == 200
        strict_json(r.text)  # RFC 8620 §1.5: server to client MUST be valid I-JSON


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
def test_engine_not_json_wrong_content_type(reader, content_type):
    """§3.6.1 notJSON: "The content type of the request was not application/json"."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = reader.post(compact(echo_request()), headers=headers)
    assert_problem(r, "notJSON")


def test_engine_content_type_with_charset_parameter_accepted(reader):
    r = reader.post(compact(echo_request()),
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    assert r.json()["methodResponses"] == [["Core/echo", {"a": 1}, "c0"]]


NOT_REQUEST = {
    "array": [],
    "string": "using",
    "null": None,
    "missing using": {"methodCalls": []},
    "using not an array": {"using": CORE, "methodCalls": []},
    "using holds a number": {"using": [CORE, 1], "methodCalls": []},
    "using null": {"using": None, "methodCalls": []},
    "missing methodCalls": {"using": [CORE]},
    "methodCalls an object": {"using": [CORE], "methodCalls": {"c0": ["Core/echo", {}, "c0"]}},
    "methodCalls null": {"using": [CORE], "methodCalls": None},
    "invocation with 2 elements": {"using": [CORE], "methodCalls": [["Core/echo", {}]]},
    "invocation with 4 elements": {"using": [CORE],
                                   "methodCalls": [["Core/echo", {}, "c0", "extra"]]},
    "invocation an object": {"using": [CORE], "methodCalls": [
        {"name": "Core/echo", "arguments": {}, "id": "c0"}]},
    "method name not a string": {"using": [CORE], "methodCalls": [[1, {}, "c0"]]},
    "arguments an array": {"using": [CORE], "methodCalls": [["Core/echo", [], "c0"]]},
    "arguments null": {"using": [CORE], "methodCalls": [["Core/echo", None, "c0"]]},
    "call id a number": {"using": [CORE], "methodCalls": [["Core/echo", {}, 7]]},
    "call id null": {"using": [CORE], "methodCalls": [["Core/echo", {}, None]]},
    "second invocation bad": {"using": [CORE], "methodCalls": [["Core/echo", {}, "c0"],
                                                               ["Core/echo", {}]]},
    "createdIds with a number value": {"using": [CORE], "methodCalls": [],
                                       "createdIds": {"a": 1}},
    "createdIds with a null value": {"using": [CORE], "methodCalls": [],
                                     "createdIds": {"a": None}},
    "createdIds an array": {"using": [CORE], "methodCalls": [], "createdIds": ["a"]},
}


@pytest.mark.parametrize("request_obj", NOT_REQUEST.values(), ids=list(NOT_REQUEST))
def test_engine_not_request(reader, request_obj):
    assert_problem(reader.post(compact(request_obj)), "notRequest")


@pytest.mark.parametrize("value", ["", "not an id!"])
def test_engine_not_request_created_ids_value_not_an_id(reader, value):
    """§3.3 createdIds is "Id[Id]"; §1.2 an Id is 1-255 of [A-Za-z0-9_-]."""
    request = {"using": [CORE], "methodCalls": [], "createdIds": {"a": value}}
    assert_problem(reader.post(compact(request)), "notRequest")


def test_engine_valid_request_edges(reader):
    """Unknown Request members are ignored (§3.3); no calls gives no responses."""
    r = reader.post({"using": [CORE], "methodCalls": [], "someFutureExtension": {"x": 1}})
    assert r.status_code == 200
    assert r.json() == {"methodResponses": [], "sessionState": reader.session["state"]}


def test_engine_unknown_capability(reader):
    r = reader.post({"using": USING + ["urn:ietf:params:jmap:nonesuch"],
                     "methodCalls": [["Core/echo", {}, "c0"]]})
    assert_problem(r, "unknownCapability")


def test_engine_limit_max_calls_in_request(small_client):
    limit = SMALL_LIMITS["maxCallsInRequest"]
    calls = [["Core/echo", {"n": i}, f"c{i}"] for i in range(limit + 1)]
    response = small_client.request(calls[:limit], using=[CORE])
    assert response["methodResponses"] == calls[:limit]
    assert_limit(small_client.post({"using": [CORE], "methodCalls": calls}), "maxCallsInRequest")


def sized_echo(size):
    """A Core/echo request of exactly `size` octets."""
    empty = compact(echo_request({"pad": ""}))
    body = compact(echo_request({"pad": "x" * (size - len(empty))}))
    assert len(body) == size
    return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_engine_limit_max_size_request(small_client, chunked):
    limit = SMALL_LIMITS["maxSizeRequest"]

    def send(body):
        return small_client.post(iter([body[:100], body[100:]]) if chunked else body)

    under = send(sized_echo(limit))
    assert under.status_code == 200, under.text
    assert len(under.json()["methodResponses"][0][1]["pad"]) > 0
    assert_limit(send(sized_echo(limit + 1)), "maxSizeRequest")


def test_engine_limit_max_concurrent_requests(small):
    """Hold one request inside the server, then another of the same user is refused.

    Deterministic without timing: the held request is a Mailbox/set, which needs the
    database's write lock; this test takes that lock first (BEGIN IMMEDIATE on the
    server's SQLite file) so the request waits inside the server (up to its busy
    timeout) while it counts against maxConcurrentRequests = 1. Probes (Core/echo, no
    write) are sent until one is refused; then the lock is released and the held
    request must complete normally.
    """
    username = add_user(small.data_dir, fresh_name("concurrent"))
    holder, prober = Client(small.url, username), Client(small.url, username)
    account_id = holder.account_id
    prober.session  # noqa: B018 -- fetch the session before the race
    db_file = next(small.data_dir.glob("*.sqlite3"))
    held = {}

    def hold():
        body = {"using": USING, "methodCalls": [["Mailbox/set", {
            "accountId": account_id, "create": {"held": {"name": "Held"}}}, "s0"]]}
        for _ in range(1000):
            r = holder.post(body)
            held["response"] = r
            if not (r.status_code == 400 and r.json().get("limit") == "maxConcurrentRequests"):
                return
            # a probe was in flight as it arrived: try again

    lock = sqlite3.connect(db_file, timeout=30, isolation_level=None)
    refused, answered = [], 0
    thread = threading.Thread(target=hold, daemon=True)
    try:
        lock.execute("BEGIN IMMEDIATE")
        thread.start()
        give_up = time.monotonic() + 8  # a bound on the loop (busy timeout: 10 s), no assert
        while thread.is_alive() and time.monotonic() < give_up:
            r = prober.post(echo_request({"probe": True}))
            if r.status_code == 200:
                assert r.json()["methodResponses"] == [["Core/echo", {"probe": True}, "c0"]]
                answered += 1
                continue
            refused.append(r)
            break
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        thread.join(30)
    assert refused, "no request was refused while another one was held in the server"
    assert_limit(refused[0], "maxConcurrentRequests")
    response = held["response"]
    assert response.status_code == 200, response.text
    [[name, args, _]] = response.json()["methodResponses"]
    assert name == "Mailbox/set", args
    assert set(args["created"]) == {"held"}
    # with nothing in flight any more, the next request is served
    assert prober.request([["Core/echo", {"after": 1}, "c0"]], using=[CORE])[
        "methodResponses"] == [["Core/echo", {"after": 1}, "c0"]]


# ---------------------------------------------------------------------------------------
# Method-level errors (RFC 8620 §3.6.2)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, using", [
    ("Foo/bar", USING),
    ("core/echo", [CORE]),  # method names are case-sensitive (§1.5)
    ("Mailbox/get", [CORE]),  # known method, but its capability is not in `using`
    ("Mailbox/set", [CORE]),
])
def test_engine_unknown_method(reader, name, using):
    resp = reader.call(name, {"accountId": reader.account_id}, using=using)
    assert error_type(resp) == "unknownMethod"
    assert resp[2] == "c0"


@pytest.mark.parametrize("name, args", [
    ("Mailbox/get", {"bogus": 1}),
    ("Mailbox/get", {"ids": "M1"}),
    ("Mailbox/get", {"ids": [1]}),
    ("Mailbox/get", {"properties": "name"}),
    ("Mailbox/set", {"create": []}),
    ("Mailbox/set", {"destroy": {"x": 1}}),
    ("Mailbox/changes", {}),  # sinceState missing
    ("Mailbox/changes", {"sinceState": 0}),
    ("Mailbox/query", {"position": "0"}),
])
def test_engine_invalid_arguments(reader, name, args):
    resp = reader.call(name, {"accountId": reader.account_id, **args})
    assert error_type(resp) == "invalidArguments"


@pytest.mark.parametrize("account_id", [None, 1, ["A1"]], ids=["missing", "number", "array"])
def test_engine_invalid_arguments_account_id(reader, account_id):
    args = {"ids": None} if account_id is None else {"accountId": account_id, "ids": None}
    assert error_type(reader.call("Mailbox/get", args)) == "invalidArguments"


def test_engine_method_error_changes_nothing(client):
    before = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": []})["state"]
    resp = client.call("Mailbox/set", {"accountId": client.account_id, "bogus": True,
                                       "create": {"n": {"name": "Never"}}})
    assert error_type(resp) == "invalidArguments"
    assert "Never" not in mailboxes(client)
    assert client.ok("Mailbox/get", {"accountId": client.account_id, "ids": []})["state"] == before


@pytest.mark.parametrize("account_id", ["nope", "A999999999", "", "!!"])
def test_engine_account_not_found_garbage(reader, account_id):
    for name in ("Mailbox/get", "Mailbox/set", "Mailbox/query"):
        assert error_type(reader.call(name, {"accountId": account_id})) == "accountNotFound"


def test_engine_processing_continues_after_errors(reader):
    calls = [
        ["Foo/bar", {}, "a"],
        ["Core/echo", {"x": 1}, "b"],
        ["Mailbox/get", {"accountId": "nope"}, "c"],
        ["Mailbox/get", {"accountId": reader.account_id, "bogus": 1}, "d"],
        ["Core/echo", {"y": 2}, "e"],
    ]
    responses = reader.request(calls)["methodResponses"]
    assert [r[2] for r in responses] == ["a", "b", "c", "d", "e"]
    assert [r[0] for r in responses] == ["error", "Core/echo", "error", "error", "Core/echo"]
    assert [error_type(responses[i]) for i in (0, 2, 3)] == [
        "unknownMethod", "accountNotFound", "invalidArguments"]
    assert responses[1][1] == {"x": 1} and responses[4][1] == {"y": 2}


def test_engine_request_too_large_get_ids(small_client):
    """RFC 8620 §5.1: more ids than maxObjectsInGet -> requestTooLarge."""
    limit = SMALL_LIMITS["maxObjectsInGet"]
    ids = [f"Mnope{i}" for i in range(limit + 1)]
    got = small_client.ok("Mailbox/get", {"accountId": small_client.account_id,
                                          "ids": ids[:limit]})
    assert sorted(got["notFound"]) == sorted(ids[:limit])
    resp = small_client.call("Mailbox/get", {"accountId": small_client.account_id, "ids": ids})
    assert error_type(resp) == "requestTooLarge"


def test_engine_request_too_large_get_all(small_client):
    """§5.1: ids null returns all records only if they do not exceed maxObjectsInGet."""
    account_id = small_client.account_id
    limit = SMALL_LIMITS["maxObjectsInGet"]
    ids = small_client.ok("Mailbox/query", {"accountId": account_id})["ids"]
    assert len(ids) == limit + 1  # the six standard Mailboxes
    resp = small_client.call("Mailbox/get", {"accountId": account_id, "ids": None})
    assert error_type(resp) == "requestTooLarge"
    junk = small_client.ok("Mailbox/query", {"accountId": account_id,
                                             "filter": {"role": "junk"}})["ids"]
    done = small_client.ok("Mailbox/set", {"accountId": account_id, "destroy": junk})
    assert done["destroyed"] == junk
    got = small_client.ok("Mailbox/get", {"accountId": account_id, "ids": None})
    assert len(got["list"]) == limit


def test_engine_request_too_large_set(small_client):
    """§5.3: create + update + destroy together over maxObjectsInSet -> requestTooLarge."""
    account_id = small_client.account_id
    limit = SMALL_LIMITS["maxObjectsInSet"]
    before = small_client.ok("Mailbox/get", {"accountId": account_id, "ids": []})["state"]
    assert limit == 5  # so that any two of the three parts below stay within it
    over = {"accountId": account_id,
            "create": {f"k{i}": {"name": f"Over {i}"} for i in range(2)},
            "update": {"Mnope1": {"name": "x"}, "Mnope2": {"name": "y"}},
            "destroy": ["Mnope3", "Mnope4"]}
    assert error_type(small_client.call("Mailbox/set", over)) == "requestTooLarge"
    assert small_client.ok("Mailbox/get", {"accountId": account_id, "ids": []})["state"] == before
    under = {"accountId": account_id,
             "create": {f"k{i}": {"name": f"Under {i}"} for i in range(limit)}}
    done = small_client.ok("Mailbox/set", under)
    assert set(done["created"]) == {f"k{i}" for i in range(limit)}


# ---------------------------------------------------------------------------------------
# Result references (RFC 8620 §3.7)
# ---------------------------------------------------------------------------------------


def test_engine_result_reference_rfc_example_flow(client):
    """§3.7's first example: Foo/changes -> Foo/get #ids from /created, with Mailbox."""
    account_id = client.account_id
    state = client.ok("Mailbox/get", {"accountId": account_id, "ids": []})["state"]
    created = client.ok("Mailbox/set", {"accountId": account_id, "create": {
        "f1": {"name": "F1"}, "f4": {"name": "F4"}}})["created"]
    new_ids = {created["f1"]["id"], created["f4"]["id"]}
    responses = client.request([
        ["Mailbox/changes", {"accountId": account_id, "sinceState": state}, "t0"],
        ["Mailbox/get", {"accountId": account_id,
                         "#ids": ref("t0", "Mailbox/changes", "/created"),
                         "properties": ["name"]}, "t1"],
    ])["methodResponses"]
    [name0, changes, id0], [name1, got, id1] = responses
    assert (name0, id0, name1, id1) == ("Mailbox/changes", "t0", "Mailbox/get", "t1")
    assert changes["oldState"] == state
    assert changes["hasMoreChanges"] is False
    assert set(changes["created"]) == new_ids and len(changes["created"]) == 2
    assert changes["updated"] == [] and changes["destroyed"] == []
    assert sorted(got["list"], key=lambda m: m["name"]) == [
        {"id": created["f1"]["id"], "name": "F1"}, {"id": created["f4"]["id"], "name": "F4"}]
    assert got["notFound"] == []


def test_engine_result_reference_star_over_get_list(reader):
    account_id = reader.account_id
    responses = reader.request([
        ["Mailbox/get", {"accountId": account_id, "ids": None, "properties": ["name"]}, "g0"],
        ["Mailbox/get", {"accountId": account_id, "#ids": ref("g0", "Mailbox/get", "/list/*/id"),
                         "properties": ["role"]}, "g1"],
        ["Core/echo", {"#names": ref("g0", "Mailbox/get", "/list/*/name")}, "e0"],
    ])["methodResponses"]
    first, second, echo = (r[1] for r in responses)
    assert [r[0] for r in responses] == ["Mailbox/get", "Mailbox/get", "Core/echo"]
    assert {m["id"] for m in second["list"]} == {m["id"] for m in first["list"]}
    assert len(second["list"]) == len(first["list"]) == len(DEFAULT_MAILBOXES)
    assert echo == {"names": [m["name"] for m in first["list"]]}  # same order as the list
    assert set(echo["names"]) == DEFAULT_MAILBOXES


REFERENCED = {
    "threads": [{"id": "t1", "emailIds": ["m1", "m2"], "n": 1},
                {"id": "t2", "emailIds": ["m3"], "n": 2},
                {"id": "t3", "emailIds": [], "n": 3}],
    "matrix": [[1, 2], [3], [], [[4]]],
    "deep": [{"b": [{"c": "x"}, {"c": ["y", "z"]}]}, {"b": []}, {"b": [{"c": "w"}]}],
    "a/b": {"m~n": "escaped"},
    "list": [{"id": "a"}],
}


@pytest.mark.parametrize("path, expected", [
    ("/threads/*/emailIds", ["m1", "m2", "m3"]),  # arrays are flattened
    ("/threads/*/n", [1, 2, 3]),
    ("/threads/*", REFERENCED["threads"]),
    ("/matrix/*", [1, 2, 3, [4]]),  # one level of flattening per *
    ("/deep/*/b/*/c", ["x", "y", "z", "w"]),
    ("/threads/1/emailIds/0", "m3"),
    ("/a~1b/m~0n", "escaped"),  # RFC 6901 escapes
    ("", REFERENCED),  # the empty pointer is the whole arguments object
])
def test_engine_result_reference_paths(reader, path, expected):
    responses = reader.request([
        ["Core/echo", REFERENCED, "c0"],
        ["Core/echo", {"#v": ref("c0", "Core/echo", path)}, "c1"],
    ], using=[CORE])["methodResponses"]
    assert responses[1] == ["Core/echo", {"v": expected}, "c1"]


BAD_REFERENCES = {
    "unknown resultOf": ref("zz", "Core/echo", "/n"),
    "forward reference": ref("later", "Core/echo", "/n"),
    "reference to its own call": ref("r", "Core/echo", "/n"),
    "wrong name": ref("c0", "Mailbox/get", "/n"),
    "name differs in case": ref("c0", "core/echo", "/n"),
    "reference to an error response": ref("c1", "Foo/bar", "/type"),
    "path without leading slash": ref("c0", "Core/echo", "n"),
    "path with bad escape": ref("c0", "Core/echo", "/~2"),
    "path into a missing member": ref("c0", "Core/echo", "/nope"),
    "path through a scalar": ref("c0", "Core/echo", "/n/x"),
    "index out of range": ref("c0", "Core/echo", "/list/1"),
    "index not a number": ref("c0", "Core/echo", "/list/x"),
    "index with a leading zero": ref("c0", "Core/echo", "/list/00"),
    "index -": ref("c0", "Core/echo", "/list/-"),
    "star into a missing member": ref("c0", "Core/echo", "/list/*/nope"),
    "star on an object": ref("c0", "Core/echo", "/obj/*"),
    "not an object": "c0",
    "null": None,
    "an array": ["c0", "Core/echo", "/n"],
    "missing resultOf": {"name": "Core/echo", "path": "/n"},
    "missing name": {"resultOf": "c0", "path": "/n"},
    "missing path": {"resultOf": "c0", "name": "Core/echo"},
    "path not a string": {"resultOf": "c0", "name": "Core/echo", "path": 1},
    "resultOf not a string": {"resultOf": 0, "name": "Core/echo", "path": "/n"},
}


@pytest.mark.parametrize("reference", BAD_REFERENCES.values(), ids=list(BAD_REFERENCES))
def test_engine_invalid_result_reference(reader, reference):
    responses = reader.request([
        ["Core/echo", {"n": 1, "list": [{"id": "a"}], "obj": {"k": 1}}, "c0"],
        ["Foo/bar", {}, "c1"],
        ["Core/echo", {"#x": reference}, "r"],
        ["Core/echo", {"n": 2}, "later"],
    ], using=[CORE])["methodResponses"]
    assert [r[2] for r in responses] == ["c0", "c1", "r", "later"]
    assert error_type(responses[2]) == "invalidResultReference"
    assert responses[3] == ["Core/echo", {"n": 2}, "later"]  # processing goes on


def test_engine_invalid_result_reference_changes_nothing(client):
    account_id = client.account_id
    responses = client.request([
        ["Mailbox/set", {"accountId": account_id, "create": {"n": {"name": "Never"}},
                         "#destroy": ref("nope", "Mailbox/query", "/ids")}, "s0"],
    ])["methodResponses"]
    assert error_type(responses[0]) == "invalidResultReference"
    assert "Never" not in mailboxes(client)


def test_engine_result_reference_with_plain_argument_is_invalid_arguments(reader):
    """§3.7: `foo` and `#foo` together -> invalidArguments, though the reference resolves."""
    responses = reader.request([
        ["Core/echo", {"a": 1, "ids": []}, "c0"],
        ["Core/echo", {"x": 1, "#x": ref("c0", "Core/echo", "/a")}, "c1"],
        ["Mailbox/get", {"accountId": reader.account_id, "ids": [],
                         "#ids": ref("c0", "Core/echo", "/ids")}, "c2"],
        ["Core/echo", {"#x": ref("c0", "Core/echo", "/a")}, "c3"],  # alone, it resolves
    ])["methodResponses"]
    assert error_type(responses[1]) == "invalidArguments"
    assert error_type(responses[2]) == "invalidArguments"
    assert responses[3] == ["Core/echo", {"x": 1}, "c3"]


def test_engine_result_reference_uses_first_response_with_the_call_id(reader):
    responses = reader.request([
        ["Core/echo", {"v": 1}, "dup"],
        ["Core/echo", {"v": 2}, "dup"],
        ["Core/echo", {"#v": ref("dup", "Core/echo", "/v")}, "c2"],
    ], using=[CORE])["methodResponses"]
    assert responses[2] == ["Core/echo", {"v": 1}, "c2"]


def test_engine_result_reference_first_response_is_an_error(reader):
    """The first response with the id is the error, so the name check fails (§3.7 step 2)."""
    responses = reader.request([
        ["Foo/bar", {}, "dup"],
        ["Core/echo", {"v": 2}, "dup"],
        ["Core/echo", {"#v": ref("dup", "Core/echo", "/v")}, "c2"],
    ], using=[CORE])["methodResponses"]
    assert error_type(responses[0]) == "unknownMethod"
    assert error_type(responses[2]) == "invalidResultReference"


# ---------------------------------------------------------------------------------------
# Creation ids and createdIds (RFC 8620 §3.3, §3.4, §5.3)
# ---------------------------------------------------------------------------------------


def parent_of(client, mailbox_id):
    got = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": [mailbox_id],
                                    "properties": ["parentId"]})
    assert got["notFound"] == []
    return got["list"][0]["parentId"]


def test_engine_creation_id_in_the_same_call(client):
    """§5.3: creates are ordered so a #cid is created before it is referenced."""
    created = client.ok("Mailbox/set", {"accountId": client.account_id, "create": {
        "child": {"name": "Child", "parentId": "#parent"},  # listed before its parent
        "parent": {"name": "Parent"},
    }})["created"]
    assert set(created) == {"child", "parent"}
    assert parent_of(client, created["child"]["id"]) == created["parent"]["id"]


def test_engine_creation_id_in_a_later_call(client):
    account_id = client.account_id
    existing = client.ok("Mailbox/set", {"accountId": account_id,
                                         "create": {"e": {"name": "Existing"}}})
    existing_id = existing["created"]["e"]["id"]
    responses = client.request([
        ["Mailbox/set", {"accountId": account_id, "create": {"parent": {"name": "Later"}}}, "s0"],
        ["Mailbox/set", {"accountId": account_id,
                         "create": {"child": {"name": "Kid", "parentId": "#parent"}},
                         "update": {existing_id: {"parentId": "#parent"}}}, "s1"],
    ])["methodResponses"]
    assert [r[0] for r in responses] == ["Mailbox/set", "Mailbox/set"], responses
    parent_id = responses[0][1]["created"]["parent"]["id"]
    assert responses[1][1]["notCreated"] is None and responses[1][1]["notUpdated"] is None
    assert parent_of(client, responses[1][1]["created"]["child"]["id"]) == parent_id
    assert parent_of(client, existing_id) == parent_id
    assert "createdIds" not in client.request([["Core/echo", {}, "c0"]])


def test_engine_created_ids_only_when_requested(client):
    account_id = client.account_id
    call = ["Mailbox/set", {"accountId": account_id, "create": {"a": {"name": "NoMap"}}}, "s0"]
    response = client.request([call])
    assert "createdIds" not in response  # §3.4: only returned if given in the request
    assert set(response["methodResponses"][0][1]["created"]) == {"a"}


def test_engine_created_ids_returned_with_new_entries(client):
    account_id = client.account_id
    inbox_id = mailboxes(client)["Inbox"]["id"]
    response = client.request([
        ["Mailbox/set", {"accountId": account_id, "create": {"p": {"name": "Mapped"}}}, "s0"],
        ["Mailbox/set", {"accountId": account_id,
                         "create": {"c": {"name": "MappedKid", "parentId": "#p"}}}, "s1"],
    ], createdIds={"pre": inbox_id})
    created = [r[1]["created"] for r in response["methodResponses"]]
    assert response["createdIds"] == {"pre": inbox_id, "p": created[0]["p"]["id"],
                                      "c": created[1]["c"]["id"]}
    empty_map = client.request([
        ["Mailbox/set", {"accountId": account_id, "create": {"q": {"name": "FromEmpty"}}}, "s0"],
    ], createdIds={})
    assert empty_map["createdIds"] == {
        "q": empty_map["methodResponses"][0][1]["created"]["q"]["id"]}
    nothing_new = client.request([["Core/echo", {}, "c0"]], createdIds={"pre": inbox_id})
    assert nothing_new["createdIds"] == {"pre": inbox_id}


def test_engine_created_ids_from_the_request_resolve(client):
    account_id = client.account_id
    archive_id = mailboxes(client)["Archive"]["id"]
    response = client.request([
        ["Mailbox/set", {"accountId": account_id,
                         "create": {"n": {"name": "Under archive", "parentId": "#x"}}}, "s0"],
    ], createdIds={"x": archive_id})
    [[name, args, _]] = response["methodResponses"]
    assert name == "Mailbox/set" and args["notCreated"] is None, args
    assert parent_of(client, args["created"]["n"]["id"]) == archive_id
    assert response["createdIds"] == {"x": archive_id, "n": args["created"]["n"]["id"]}


def test_engine_creation_id_reused_maps_to_latest(client):
    """§5.3: a reused creation id maps to the most recently created record."""
    account_id = client.account_id
    response = client.request([
        ["Mailbox/set", {"accountId": account_id, "create": {"x": {"name": "First"}}}, "s0"],
        ["Mailbox/set", {"accountId": account_id, "create": {"x": {"name": "Second"}}}, "s1"],
        ["Mailbox/set", {"accountId": account_id,
                         "create": {"c": {"name": "Under second", "parentId": "#x"}}}, "s2"],
    ], createdIds={})
    first, second, third = (r[1]["created"] for r in response["methodResponses"])
    assert parent_of(client, third["c"]["id"]) == second["x"]["id"] != first["x"]["id"]
    assert response["createdIds"] == {"x": second["x"]["id"], "c": third["c"]["id"]}


def test_engine_creation_id_unknown_or_from_another_request(client):
    account_id = client.account_id
    client.ok("Mailbox/set", {"accountId": account_id, "create": {"old": {"name": "Old"}}})
    done = client.ok("Mailbox/set", {"accountId": account_id, "create": {
        "a": {"name": "Orphan A", "parentId": "#nope"},
        "b": {"name": "Orphan B", "parentId": "#old"},  # created by an earlier request
    }})
    assert done["created"] is None
    for cid in ("a", "b"):
        assert done["notCreated"][cid]["type"] == "invalidProperties"
        assert "parentId" in done["notCreated"][cid]["properties"]


# ---------------------------------------------------------------------------------------
# Accounts of other users (RFC 8620 §1.6.2, §3.6.2 accountNotFound)
# ---------------------------------------------------------------------------------------


def test_engine_other_users_account_is_invisible(client, other_client):
    mine, theirs = client.account_id, other_client.account_id
    assert mine != theirs
    assert theirs not in client.session["accounts"]
    assert mine not in other_client.session["accounts"]
    their_before = mailboxes(other_client)
    for name, args in (
        ("Mailbox/get", {"ids": None}),
        ("Mailbox/query", {}),
        ("Mailbox/changes", {"sinceState": "0"}),
        ("Mailbox/set", {"create": {"x": {"name": "Intruder"}}}),
    ):
        assert error_type(client.call(name, {"accountId": theirs, **args})) == "accountNotFound"
    assert mailboxes(other_client) == their_before


def test_engine_other_users_records_are_not_found(client, other_client):
    their = mailboxes(other_client)
    their_ids = [m["id"] for m in their.values()]
    account_id = client.account_id
    got = client.ok("Mailbox/get", {"accountId": account_id, "ids": their_ids})
    assert got["list"] == [] and sorted(got["notFound"]) == sorted(their_ids)
    trash = their["Trash"]["id"]
    done = client.ok("Mailbox/set", {"accountId": account_id,
                                     "update": {their["Archive"]["id"]: {"name": "Stolen"}},
                                     "destroy": [trash]})
    assert done["notUpdated"][their["Archive"]["id"]]["type"] == "notFound"
    assert done["notDestroyed"][trash]["type"] == "notFound"
    # a createdIds entry naming their Mailbox does not make it a valid parent here
    smuggled = client.request([
        ["Mailbox/set", {"accountId": account_id,
                         "create": {"n": {"name": "Smuggled", "parentId": "#x"}}}, "s0"],
    ], createdIds={"x": their["Inbox"]["id"]})["methodResponses"][0][1]
    assert smuggled["created"] is None
    assert smuggled["notCreated"]["n"]["type"] == "invalidProperties"
    assert mailboxes(other_client) == their


# ---------------------------------------------------------------------------------------
# Authentication (HTTP Basic, RFC 7617; 401 challenge, RFC 7235)
# ---------------------------------------------------------------------------------------


def basic(username, password):
    raw = f"{username}:{password}".encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(raw).decode("ascii")


def assert_challenge(r):
    assert r.status_code == 401, r.text
    challenge = r.headers.get("WWW-Authenticate", "")
    assert re.match(r'(?i)basic\s+realm="[^"]*"', challenge), challenge
    assert r.headers["Content-Type"].split(";")[0].strip() == "application/problem+json"
    assert r.json()["status"] == 401


def session_and_api(server, headers):
    """GET the session and POST an API request with these headers; return both responses."""
    session = requests.get(server.url + "/jmap/session", headers=headers, timeout=30)
    api = requests.post(server.url + "/jmap/api/", data=compact(echo_request()),
                        headers={"Content-Type": "application/json", **headers}, timeout=30)
    return session, api


def test_auth_missing_authorization_is_challenged(small):
    for r in session_and_api(small, {}):
        assert_challenge(r)


def test_auth_bad_credentials_are_challenged_then_good_ones_work(small_client, small):
    user = small_client.username
    bad = {
        "wrong password": basic(user, PASSWORD + "x"),
        "empty password": basic(user, ""),
        "unknown user": basic(fresh_name("nobody"), PASSWORD),
        "Basic without credentials": "Basic",
        "not base64": "Basic !!!not-base64!!!",
        "no colon": "Basic " + base64.b64encode(user.encode()).decode(),
        "not UTF-8": basic(user, user.encode() + b":\xff\xfe"),
        "password as username": basic(PASSWORD, user),
        "other scheme": "Digest " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode(),
    }
    for label, header in bad.items():
        for r in session_and_api(small, {"Authorization": header}):
            assert r.status_code == 401, label
            assert_challenge(r)
    session, api = session_and_api(small, {"Authorization": basic(user, PASSWORD)})
    assert session.status_code == 200 and session.json()["username"] == user
    assert api.status_code == 200
    assert api.json()["methodResponses"] == [["Core/echo", {"a": 1}, "c0"]]


def test_auth_password_change_takes_effect_at_once(small_client, small):
    user = small_client.username
    old_header = {"Authorization": basic(user, PASSWORD)}
    for r in session_and_api(small, old_header):  # the old password works (and is cached)
        assert r.status_code == 200
    new_password = "a different horse, battery and staple"
    done = run_cli("user", "passwd", user, "--password-stdin", data_dir=small.data_dir,
                   input_text=new_password + "\n")
    assert done.returncode == 0, done.stderr
    for r in session_and_api(small, old_header):
        assert_challenge(r)
    for r in session_and_api(small, {"Authorization": basic(user, new_password)}):
        assert r.status_code == 200, r.text
