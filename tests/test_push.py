"""Push over EventSource (jmapd §6.5 ChangeBus/push_event_stream, §13 http_eventsource).

RFC 8620 §7.1 (the StateChange object: "@type" and "changed", accountId -> type -> new
state), §7.3 (eventSourceUrl, a level-1 URI template with types, closeafter and ping;
text/event-stream; the "state" event with a new event id; pings with {"interval"} and
no id; the clamped interval; Last-Event-ID makes the server send what the client
missed); §2 (eventSourceUrl in the Session); §3.6.1 (the limit problem document).
RFC 8621 §1.5 (the EmailDelivery pseudo-type: it changes when an Email is added, not
when one is flagged, read or destroyed).

Streams are read by an independent client: http.client in a background thread and the
WHATWG "server-sent events" parsing rules (lines end in CRLF, LF or CR; `field: value`
with one leading space dropped; a blank line dispatches; `:` starts a comment). Push
tests use two clients: the writer is a JMAP client over `requests` (or another process:
a second `serve` on the same data directory, `jmapd.py deliver`, `jmapd.py user`), the
watcher is the stream. "Nothing was pushed" is shown with a barrier where possible:
after the change that must stay silent, a change that must be pushed is made, and the
first event has to be exactly that one (the server reports state differences, so a
missed-but-owed change would still show in the barrier's event). Waits are generous
and never measured.

The servers are this module's own (streams hold server threads). Only the clamping of
a large ping interval runs against the in-process WSGI app, with jmapd's monotonic
clock made to leap, since an interval of 300 s or more cannot be waited for.
"""

import base64
import codecs
import http.client
import json
import queue
import re
import signal
import socket
import sys
import threading
import time
import wsgiref.util
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import pytest
import requests

from conftest import PASSWORD, ROOT, Client, Server, add_user, run_cli
from test_mime import upload
from test_thread import message, unique

sys.path.insert(0, str(ROOT))
import jmapd  # noqa: E402  (only for the in-process clamp test)

WAIT_S = 10  # generous: an expected event must arrive within this, however slow the host
QUIET_S = 3  # how long to listen for something that must not happen
READ_TIMEOUT_S = 60  # the socket's own timeout: a stuck test fails instead of hanging
LIMIT_PROBLEM = "urn:ietf:params:jmap:error:limit"


# =============================================================================
# An independent EventSource client
# =============================================================================


@dataclass
class Event:
    type: str  # "message" when no `event:` line came (WHATWG default)
    data: str
    id: str | None  # the value of this event's own `id:` line; None if it had none
    last_event_id: str  # the client's last event id after this event (WHATWG)

    def json(self):
        return json.loads(self.data)


class SseParser:
    """Incremental text/event-stream parser (WHATWG HTML, "Parsing an event stream")."""

    def __init__(self):
        self.pending = ""
        self.started = False
        self.last_event_id = ""
        self.comments = []
        self._reset()

    def _reset(self):
        self.data, self.type, self.id_line = [], "", None

    def feed(self, text: str, final: bool = False) -> list:
        if not self.started and text:
            self.started = True
            text = text.removeprefix("\ufeff")
        self.pending += text
        events = []
        while True:
            match = re.search(r"\r\n|\r|\n", self.pending)
            if not match:
                break
            if match.group() == "\r" and match.end() == len(self.pending) and not final:
                break  # perhaps the first half of a CRLF split across reads
            line, self.pending = self.pending[:match.start()], self.pending[match.end():]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events  # at the end of the stream an unfinished event is dropped (WHATWG)

    def _line(self, line: str):
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self.type = value
        elif field == "data":
            self.data.append(value)
        elif field == "id" and "\0" not in value:
            self.last_event_id = self.id_line = value
        return None

    def _dispatch(self):
        if not self.data:
            self._reset()
            return None
        event = Event(self.type or "message", "\n".join(self.data), self.id_line,
                      self.last_event_id)
        self._reset()
        return event


def test_push_sse_parser_follows_whatwg_rules():
    """The test client's own parser (a pure function), so its verdicts can be trusted."""
    parser = SseParser()
    stream = ("\ufeff: hello\r\nevent: state\r\nid: 7\r\ndata: {\"a\":\r\ndata:1}\r\n\r\n"
              "event:ping\rdata:x\r\rdata: plain\n\n: c\n\nid\ndata\n\n"
              "event: lost\ndata: never dispatched")
    events = []
    for i in range(len(stream)):  # one character at a time: CRLF split across reads
        events += parser.feed(stream[i])
    events += parser.feed("", final=True)
    assert events == [
        Event("state", '{"a":\n1}', "7", "7"),
        Event("ping", "x", None, "7"),
        Event("message", "plain", None, "7"),
        Event("message", "", "", ""),
    ]
    assert parser.comments == [" hello", " c"]


def fill(template: str, **variables) -> str:
    """Expand a level-1 URI template (RFC 6570 §3.2.2: values percent-encoded)."""
    for name, value in variables.items():
        template = template.replace("{" + name + "}", quote(str(value), safe=""))
    assert "{" not in template, template
    return template


def event_source_url(client, types="*", closeafter="no", ping=0) -> str:
    return fill(client.session["eventSourceUrl"], types=types, closeafter=closeafter, ping=ping)


def basic(username, password) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class NoEvent(AssertionError):
    pass


class EventStream:
    """One GET of the event-source resource, read by a thread of its own."""

    END = object()

    def __init__(self, url, auth=None, last_event_id=None):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                               timeout=READ_TIMEOUT_S)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if auth is not None:
            headers["Authorization"] = basic(*auth)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""),
                          headers=headers)
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = self.response.headers
        self.parser = SseParser()
        self.queue = queue.Queue()
        self.received = []  # every event, in order
        self.end = None  # "clean" or why the response broke off
        self.ended = threading.Event()
        self.closing = False
        self.body = b""
        if self.status == 200:
            self.thread = threading.Thread(target=self._read, daemon=True, name="sse-reader")
            self.thread.start()
        else:
            self.thread = None
            self.body = self.response.read()
            self.conn.close()
            self.ended.set()

    def _read(self):
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            while True:
                chunk = self.response.read1(65536)
                if not chunk:
                    break
                self._put(self.parser.feed(decoder.decode(chunk)))
            self._put(self.parser.feed(decoder.decode(b"", final=True), final=True))
            self.end = "clean"
        except Exception as exc:  # noqa: BLE001 -- recorded; tests that care assert on it
            self.end = "closed by the test" if self.closing else f"{type(exc).__name__}: {exc}"
        finally:
            self.ended.set()
            self.queue.put(self.END)

    def _put(self, events):
        for event in events:
            self.received.append(event)
            self.queue.put(event)

    def next_event(self, timeout=WAIT_S):
        """The next event; None once the response has ended; NoEvent after the timeout."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise NoEvent(f"no event within {timeout} s") from None
        if item is self.END:
            self.queue.put(self.END)
            return None
        return item

    def next_state(self, timeout=WAIT_S):
        """The next `state` event, skipping pings (None if the response ended first)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event is None or event.type == "state":
                return event
            assert event.type == "ping", event

    def states_until(self, done, timeout=WAIT_S) -> list:
        """StateChange objects (in order) until done(merged changed) is true."""
        merged, seen = {}, []
        deadline = time.monotonic() + timeout
        while not done(merged):
            event = self.next_state(max(0.0, deadline - time.monotonic()))
            assert event is not None, f"the stream ended ({self.end}) after {seen}"
            assert event.id, f"a state event without an id (RFC 8620 §7.3): {event}"
            change = event.json()
            seen.append(change)
            for account_id, types in change["changed"].items():
                merged.setdefault(account_id, {}).update(types)
        return seen

    def wait_end(self, timeout=WAIT_S) -> bool:
        return self.ended.wait(timeout)

    def close(self):
        if self.ended.is_set():
            self.conn.close()
            return
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.response.close()
        self.conn.close()
        if self.thread is not None:
            self.thread.join(WAIT_S)


@pytest.fixture
def streams():
    """Open EventSource streams; every one is closed when the test ends."""
    opened = []

    def open_stream(client, types="*", closeafter="no", ping=1, last_event_id=None,
                    auth="client", url=None):
        if auth == "client":
            auth = client.http.auth
        stream = EventStream(url or event_source_url(client, types, closeafter, ping),
                             auth=auth, last_event_id=last_event_id)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


def reopen_until_accepted(open_stream, timeout=WAIT_S):
    """Open a stream, retrying while a just-closed one still counts against the limit."""
    deadline = time.monotonic() + timeout
    while True:
        stream = open_stream()
        if stream.status == 200 or time.monotonic() > deadline:
            return stream
        stream.close()
        time.sleep(0.2)


def connected(stream):
    assert stream.status == 200, (stream.status, stream.body)
    return stream


# =============================================================================
# JMAP helpers (the writing client)
# =============================================================================


@pytest.fixture(scope="module")
def push_server(tmp_path_factory):
    """A server of this module's own, so streams held here cost the shared one nothing."""
    data_dir = tmp_path_factory.mktemp("push") / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir).start()
    yield srv
    srv.stop()


def new_client(server, name="push") -> Client:
    """A fresh user (added by the CLI, another process), known to the server's change bus.

    The bus learns of other processes' commits by polling, so a stream opened at once
    could report the account's creation as a change. One write through this server
    makes the bus re-read every account first; the tests then start from a quiet state.
    """
    username = f"{unique(name)}@example.com"
    add_user(server.data_dir, username)
    client = Client(server.url, username)
    make_mailbox(client)
    return client


@pytest.fixture
def alice(push_server):
    return new_client(push_server, "alice")


@pytest.fixture
def bob(push_server):
    return new_client(push_server, "bob")


def state_of(client, type_name):
    return client.ok(f"{type_name}/get", {"accountId": client.account_id, "ids": []})["state"]


def make_mailbox(client) -> str:
    """Create a Mailbox (RFC 8621 §2.5); return the Mailbox state it produced."""
    resp = client.ok("Mailbox/set", {"accountId": client.account_id,
                                     "create": {"m": {"name": unique("box")}}})
    assert resp["notCreated"] is None and "m" in resp["created"], resp
    return resp["newState"]


def inbox(client):
    boxes = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})["list"]
    return next(m["id"] for m in boxes if m["role"] == "inbox")


def import_email(client, keywords=()) -> str:
    """Upload a message and Email/import it into the Inbox (RFC 8621 §4.8); return its id."""
    blob = upload(client, message(unique("Push test ")))["blobId"]
    resp = client.ok("Email/import", {"accountId": client.account_id, "emails": {"e": {
        "blobId": blob, "mailboxIds": {inbox(client): True},
        "keywords": dict.fromkeys(keywords, True)}}})
    assert resp["notCreated"] is None, resp
    return resp["created"]["e"]["id"]


def exactly(account_id, type_name, state):
    """The StateChange (RFC 8620 §7.1) for one type of one account, nothing else."""
    return {"@type": "StateChange", "changed": {account_id: {type_name: state}}}


def has_state(account_id, type_name, state):
    return lambda merged: merged.get(account_id, {}).get(type_name) == state


# =============================================================================
# RFC 8620 §2, §7.3: the eventSourceUrl and the response
# =============================================================================


def test_push_event_source_url_is_absolute_template(alice):
    template = alice.session["eventSourceUrl"]
    parts = urlsplit(template)
    assert parts.scheme in ("http", "https") and parts.netloc, template
    assert set(re.findall(r"\{([^}]*)\}", template)) == {"types", "closeafter", "ping"}
    filled = event_source_url(alice)
    assert urlsplit(filled).netloc == urlsplit(alice.base_url).netloc


@pytest.mark.parametrize("types", ["*", "Mailbox", "Email,Mailbox,EmailDelivery"])
def test_push_event_source_filled_template_is_event_stream(alice, streams, types):
    stream = connected(streams(alice, types=types, closeafter="no", ping=0))
    media_type = stream.headers.get("Content-Type", "").split(";")[0].strip().lower()
    assert media_type == "text/event-stream"


def test_push_event_source_requires_authentication(alice, streams):
    stream = streams(alice, auth=None)
    assert stream.status == 401
    assert stream.headers.get("WWW-Authenticate", "").lower().startswith("basic")
    wrong = streams(alice, auth=(alice.username, "not the password"))
    assert wrong.status == 401


# =============================================================================
# RFC 8620 §7.1, §7.3: state events
# =============================================================================


def test_push_mailbox_set_by_one_client_reaches_the_others_stream(alice, streams):
    watcher = connected(streams(alice))
    writer = Client(alice.base_url, alice.username)  # a second client of the same user
    new_state = make_mailbox(writer)
    event = watcher.next_state()
    assert event is not None, watcher.end
    assert event.type == "state"
    assert event.json() == exactly(alice.account_id, "Mailbox", new_state)
    assert state_of(alice, "Mailbox") == new_state


def test_push_state_events_carry_an_id_and_pings_none(alice, streams):
    """ping=1: pings {"interval": 1} while nothing changes; state events set an id, pings not."""
    stream = connected(streams(alice, ping=1))
    first_ping = stream.next_event()
    assert first_ping is not None and first_ping.type == "ping", first_ping
    make_mailbox(alice)
    state = stream.next_state()
    make_mailbox(alice)
    second = stream.next_state()
    ping_after = stream.next_event()
    assert ping_after is not None and ping_after.type == "ping", ping_after
    assert state.id and second.id and second.id != state.id, (state, second)
    assert first_ping.id is None and ping_after.id is None  # pings MUST NOT set an id
    assert ping_after.last_event_id == second.id
    assert first_ping.json() == ping_after.json() == {"interval": 1}


def test_push_email_import_changes_email_thread_mailbox_and_delivery(alice, streams):
    stream = connected(streams(alice))
    email_id = import_email(alice)
    wanted = {"Email", "Thread", "Mailbox", "EmailDelivery"}
    changes = stream.states_until(lambda m: wanted <= set(m.get(alice.account_id, {})))
    assert all(set(c) == {"@type", "changed"} and c["@type"] == "StateChange" for c in changes)
    assert all(set(c["changed"]) == {alice.account_id} for c in changes), changes
    last = {}
    for change in changes:
        last.update(change["changed"][alice.account_id])
    for type_name in ("Email", "Thread", "Mailbox"):
        assert last[type_name] == state_of(alice, type_name), (type_name, changes)
    got = alice.ok("Email/get", {"accountId": alice.account_id, "ids": [email_id],
                                 "properties": ["id"]})
    assert [e["id"] for e in got["list"]] == [email_id]


@pytest.mark.parametrize("change", ["flag", "read", "destroy"])
def test_push_email_changes_other_than_arrival_are_not_email_delivery(alice, streams, change):
    """RFC 8621 §1.5: EmailDelivery SHOULD NOT change when an Email is read or deleted."""
    email_id = import_email(alice)
    stream = connected(streams(alice))
    if change == "destroy":
        args = {"destroy": [email_id]}
    else:
        keyword = {"flag": "$flagged", "read": "$seen"}[change]
        args = {"update": {email_id: {f"keywords/{keyword}": True}}}
    resp = alice.ok("Email/set", {"accountId": alice.account_id, **args})
    assert not resp.get("notUpdated") and not resp.get("notDestroyed"), resp
    barrier = make_mailbox(alice)
    changes = stream.states_until(has_state(alice.account_id, "Mailbox", barrier))
    types = {t for c in changes for t in c["changed"].get(alice.account_id, {})}
    assert "Email" in types, changes
    assert "EmailDelivery" not in types, changes


# =============================================================================
# RFC 8620 §7.3: types
# =============================================================================


def test_push_types_filter_skips_a_change_to_other_types(alice, streams):
    email_id = import_email(alice)
    stream = connected(streams(alice, types="Mailbox"))
    before = state_of(alice, "Mailbox")
    resp = alice.ok("Email/set", {"accountId": alice.account_id,
                                  "update": {email_id: {"keywords/$flagged": True}}})
    assert email_id in resp["updated"], resp
    assert state_of(alice, "Mailbox") == before  # a flag touches Email only
    barrier = make_mailbox(alice)
    event = stream.next_state()
    assert event is not None, stream.end
    assert event.json() == exactly(alice.account_id, "Mailbox", barrier)


@pytest.mark.parametrize("types", [["Mailbox"], ["EmailDelivery"], ["Email", "Thread"]])
def test_push_types_filter_reports_only_listed_types(alice, streams, types):
    stream = connected(streams(alice, types=",".join(types)))
    import_email(alice)
    changes = stream.states_until(lambda m: set(types) <= set(m.get(alice.account_id, {})))
    for change in changes:
        assert set(change["changed"]) == {alice.account_id}, changes
        assert set(change["changed"][alice.account_id]) <= set(types), changes
    if types == ["Mailbox"]:
        assert changes == [exactly(alice.account_id, "Mailbox", state_of(alice, "Mailbox"))]


# =============================================================================
# RFC 8620 §7.3: closeafter
# =============================================================================


def test_push_closeafter_state_ends_the_response_after_one_state(alice, streams):
    stream = connected(streams(alice, closeafter="state", ping=1))
    first = make_mailbox(alice)
    event = stream.next_state()
    assert event is not None, stream.end
    assert event.json() == exactly(alice.account_id, "Mailbox", first)
    assert stream.wait_end(WAIT_S), "the response went on after the state event"
    assert stream.end == "clean"
    assert [e.type for e in stream.received if e is not event and e.type == "state"] == []


def test_push_closeafter_no_stays_open_after_a_state(alice, streams):
    stream = connected(streams(alice, closeafter="no", ping=1))
    first = make_mailbox(alice)
    assert stream.next_state().json() == exactly(alice.account_id, "Mailbox", first)
    ping = stream.next_event()
    assert ping is not None and ping.type == "ping", (ping, stream.end)
    second = make_mailbox(alice)
    assert stream.next_state().json() == exactly(alice.account_id, "Mailbox", second)
    assert not stream.ended.is_set()


# =============================================================================
# RFC 8620 §7.3: ping
# =============================================================================


@pytest.mark.parametrize("ping", ["abc", "²", "1" * 40])
def test_push_bad_ping_is_400_not_a_crash(alice, streams, ping):
    """Digits in other scripts and absurd lengths are no interval: a clear 400."""
    stream = streams(alice, ping=ping)
    assert stream.status == 400, (stream.status, stream.body)


def test_push_unreadable_last_event_id_means_everything_is_new(alice, streams):
    """A Last-Event-ID we did not make (odd digits included) names no state the client
    has: the stream opens (no 500) and at once reports every state of the account."""
    stream = connected(streams(alice, last_event_id=f"{alice.account_id}:²,junk"))
    first = stream.next_state().json()["changed"][alice.account_id]
    assert first["Mailbox"] == state_of(alice, "Mailbox"), first


def test_push_ping_0_sends_no_pings(alice, streams):
    stream = connected(streams(alice, ping=0))
    with pytest.raises(NoEvent):
        stream.next_event(QUIET_S)
    new_state = make_mailbox(alice)
    event = stream.next_event()
    assert event is not None and event.type == "state", event
    assert event.json() == exactly(alice.account_id, "Mailbox", new_state)


class FastMonotonic:
    """jmapd's `time` module, except that every monotonic() reading is 10**7 s later."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self):
        self.offset += 10**7
        return time.monotonic() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def wsgi_app(tmp_path):
    """The WSGI app in this process (a ping interval of 300+ s cannot be waited for)."""
    data_dir = tmp_path / "data"
    username = add_user(data_dir, "clamp@example.com")
    cfg = jmapd.cfg_from_args(["serve", "--data-dir", str(data_dir), "--test-cheap-hashing"])
    jmapd.db_open(str(data_dir), create=False)
    app = jmapd.make_app(cfg)
    app.bus.refresh()
    yield app, username
    app.bus.stop()
    jmapd.db.close()


@pytest.mark.parametrize("asked, allowed", [
    (30, {30}), (300, {300}),  # RFC 8620 §7.3: min <= 30 and max >= 300, so these stand
    (100000, range(300, 100001)),  # clamped to the server's maximum, at least 300
])
def test_push_ping_interval_is_clamped_within_rfc_bounds(wsgi_app, monkeypatch, asked, allowed):
    app, username = wsgi_app
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(PATH_INFO="/jmap/eventsource/", REQUEST_METHOD="GET",
                   QUERY_STRING=f"types=%2A&closeafter=no&ping={asked}",
                   HTTP_AUTHORIZATION=basic(username, PASSWORD))
    status = []
    monkeypatch.setattr(jmapd, "time", FastMonotonic())  # each interval passes at once
    body = app.wsgi(environ, lambda s, h, exc_info=None: status.append((s, h)))
    parser, events = SseParser(), []
    try:
        for chunk in body:
            events += parser.feed(chunk.decode())
            if events:
                break
    finally:
        getattr(body, "close", lambda: None)()
    assert status[0][0].startswith("200"), status
    assert events[0].type == "ping" and events[0].id is None, events
    interval = events[0].json()["interval"]
    assert isinstance(interval, int) and interval in allowed, interval


# =============================================================================
# RFC 8620 §7.3: Last-Event-ID
# =============================================================================


def test_push_last_event_id_replays_missed_changes_then_nothing(alice, streams):
    first = connected(streams(alice, ping=1))
    make_mailbox(alice)
    seen = first.next_state()
    assert seen is not None and seen.id, seen
    first.close()
    missed = make_mailbox(alice)  # while no stream is open
    # The server notices a closed stream a moment later; until then it still counts
    # against --max-push-connections.
    again = connected(reopen_until_accepted(lambda: streams(alice, last_event_id=seen.id)))
    replay = again.next_state()  # no change is made now: this is the missed one
    assert replay is not None, again.end
    assert replay.json() == exactly(alice.account_id, "Mailbox", missed)
    assert replay.id and replay.id != seen.id
    again.close()

    latest = connected(reopen_until_accepted(lambda: streams(alice, last_event_id=replay.id)))
    new_state = make_mailbox(alice)
    event = latest.next_state()
    assert event.json() == exactly(alice.account_id, "Mailbox", new_state)


# =============================================================================
# The change bus: other processes, other users
# =============================================================================


def test_push_reports_a_commit_by_another_server_process(push_server, alice, streams):
    stream = connected(streams(alice))
    other = Server(push_server.data_dir).start()
    try:
        writer = Client(other.url, alice.username)
        new_state = make_mailbox(writer)
    finally:
        other.stop()
    event = stream.next_state()
    assert event is not None, stream.end
    assert event.json() == exactly(alice.account_id, "Mailbox", new_state)
    assert state_of(alice, "Mailbox") == new_state


def test_push_reports_a_delivery_by_the_deliver_command(push_server, alice, streams):
    """`jmapd.py deliver` (an MTA's MDA) is another process: its new Email is pushed."""
    stream = connected(streams(alice))
    raw = message(unique("Delivered ")).decode()
    done = run_cli("deliver", "--user", alice.username, data_dir=push_server.data_dir,
                   input_text=raw)
    assert done.returncode == 0, done.stderr
    wanted = {"Email", "Thread", "Mailbox", "EmailDelivery"}
    changes = stream.states_until(lambda m: wanted <= set(m.get(alice.account_id, {})))
    assert all(set(c["changed"]) == {alice.account_id} for c in changes), changes
    last = {}
    for change in changes:
        last.update(change["changed"][alice.account_id])
    for type_name in ("Email", "Thread", "Mailbox"):
        assert last[type_name] == state_of(alice, type_name), (type_name, changes)


def test_push_cli_user_commands_push_nothing_to_the_user(push_server, alice, streams):
    stream = connected(streams(alice))
    add_user(push_server.data_dir, f"{unique('carol')}@example.com")  # another account
    barrier = make_mailbox(alice)
    event = stream.next_state()
    assert event.json() == exactly(alice.account_id, "Mailbox", barrier)


def test_push_stream_ends_when_its_password_changes(push_server, alice, streams):
    """`user passwd` revokes the password a stream was opened with: the stream ends
    (as RFC 8887 §4.2 lets a server end a WebSocket whose credentials went away); a
    stream opened with the new password carries on."""
    before = connected(streams(alice))
    done = run_cli("user", "passwd", alice.username, "--password-stdin",
                   data_dir=push_server.data_dir, input_text=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert before.wait_end(), "the stream outlived the password it was opened with"
    after = connected(streams(alice))
    barrier = make_mailbox(alice)
    event = after.next_state()
    assert event.json() == exactly(alice.account_id, "Mailbox", barrier)


def test_push_two_users_never_see_each_others_changes(alice, bob, streams):
    alice_stream = connected(streams(alice))
    bob_stream = connected(streams(bob))
    make_mailbox(bob)
    import_email(bob)
    alice_state = make_mailbox(alice)  # the barrier for Alice's stream
    assert alice_stream.next_state().json() == exactly(alice.account_id, "Mailbox", alice_state)
    bob_changes = bob_stream.states_until(lambda m: "EmailDelivery" in m.get(bob.account_id, {}))
    assert all(set(c["changed"]) == {bob.account_id} for c in bob_changes), bob_changes
    bob_state = make_mailbox(bob)
    assert bob_stream.next_state().json() == exactly(bob.account_id, "Mailbox", bob_state)


# =============================================================================
# Limits: --max-push-connections (per user), other requests meanwhile
# =============================================================================


def test_push_default_limit_eight_streams_per_user(alice, bob, streams):
    # The default is 8 (issue 16: a few tabs and devices fit; it was 2).
    live = [connected(streams(alice)) for _ in range(8)]  # just under
    ninth = streams(alice)  # just over
    assert ninth.status == 400, ninth.status
    problem = json.loads(ninth.body)
    assert problem["type"] == LIMIT_PROBLEM and problem["status"] == 400, problem
    connected(streams(bob))  # the limit is per user
    new_state = make_mailbox(alice)
    for stream in live:
        assert stream.next_state().json() == exactly(alice.account_id, "Mailbox", new_state)


@pytest.fixture(scope="module")
def limit_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("push-limit") / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir, "--max-push-connections", "1").start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("ping", [1, 0])  # 0: nothing is written that could fail
def test_push_limit_one_refuses_a_second_stream_until_the_first_closes(limit_server, streams,
                                                                       ping):
    user = new_client(limit_server, "limit")
    first = connected(streams(user, ping=ping))
    refused = streams(user)
    assert refused.status == 400, refused.status
    assert refused.headers.get("Content-Type", "").startswith("application/problem+json")
    problem = json.loads(refused.body)
    assert problem["type"] == LIMIT_PROBLEM and problem["status"] == 400, problem
    assert isinstance(problem.get("limit"), str) and problem["limit"], problem
    # The open stream does not hold up ordinary requests, the user's own included.
    assert user.ok("Mailbox/get", {"accountId": user.account_id, "ids": None})["list"]
    new_state = make_mailbox(user)
    assert first.next_state().json() == exactly(user.account_id, "Mailbox", new_state)
    other = new_client(limit_server, "limit")
    connected(streams(other))
    first.close()
    again = reopen_until_accepted(lambda: streams(user))
    assert again.status == 200, (again.status, again.body)


def test_push_total_stream_cap_refuses_with_503_until_one_closes(tmp_path, streams):
    """--max-event-streams caps the streams of all users together (each holds a thread)."""
    data_dir = tmp_path / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir, "--max-event-streams", "2").start()
    try:
        users = [new_client(srv, "cap") for _ in range(3)]
        first, second = connected(streams(users[0])), connected(streams(users[1]))
        refused = streams(users[2])
        assert refused.status == 503, refused.status
        assert refused.headers.get("Retry-After"), refused.headers
        assert json.loads(refused.body)["status"] == 503, refused.body
        assert users[2].ok("Mailbox/get", {"accountId": users[2].account_id})["list"]
        first.close()
        again = reopen_until_accepted(lambda: streams(users[2]))
        assert again.status == 200, (again.status, again.body)
        new_state = make_mailbox(users[1])
        assert second.next_state().json() == exactly(users[1].account_id, "Mailbox", new_state)
    finally:
        srv.stop()


def test_push_streams_within_limits_do_not_starve_other_requests(tmp_path, streams):
    data_dir = tmp_path / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir).start()  # the defaults: --threads 8, --max-push-connections 8
    try:
        users = [new_client(srv, "busy") for _ in range(5)]
        for user in users[:4]:
            connected(streams(user))
            connected(streams(user))
        try:
            r = users[4].http.get(srv.url + "/jmap/session", timeout=WAIT_S)
        except requests.exceptions.Timeout:
            raise AssertionError(f"no answer within {WAIT_S} s while 8 streams are open") from None
        assert r.status_code == 200, r.text
    finally:
        srv.stop()


# =============================================================================
# Shutdown
# =============================================================================


def test_push_sigterm_ends_open_streams_and_exits_0(tmp_path, streams):
    data_dir = tmp_path / "data"
    username = add_user(data_dir, "term@example.com")
    srv = Server(data_dir).start()
    try:
        client = Client(srv.url, username)
        stream = connected(streams(client, ping=0))
        srv.proc.send_signal(signal.SIGTERM)
        assert stream.wait_end(WAIT_S), "the stream stayed open after SIGTERM"
        assert stream.end == "clean", stream.end
        assert srv.proc.wait(WAIT_S + 5) == 0, srv.log()
    finally:
        srv.stop()
