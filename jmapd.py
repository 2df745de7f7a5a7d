#!/usr/bin/env python3
"""jmapd -- a personal JMAP server (RFC 8620, RFC 8621) in one file.

One person's (or one family's) mail, reached from any JMAP client, served from a
small machine such as a Raspberry Pi. Storage is SQLite (WAL) plus a content-addressed
blob directory; passwords are argon2id hashes; the server binds to 127.0.0.1 unless told
otherwise and expects TLS to be terminated by a reverse proxy in front of it.

Usage:
    python3 jmapd.py serve                      # start on 127.0.0.1:8080, data in ./jmapd-data
    python3 -m pytest -q tests                  # run the tests

INDEX
    1   Docstring, imports, compatibility
    1.2 Compatibility shims
    2   Constants and utilities
    2.1 Capabilities and limits
    2.2 Ids, clock, dates, JSON, JSON Pointer
    2.3 Logging
    3   Configuration
    4   Storage
    4.1 Database and pragmas
    4.2 Models
    4.3 Migrations
    4.4 Blob store
    4.5 Change log and state
    5   Auth and the session resource
    6   JMAP core
    6.1 Errors
    6.2 Request engine and result references
    6.3 Generic type machine
    6.4 Core/echo and Blob/copy
    6.5 Change bus and EventSource
    6.6 PushSubscription (Web Push encryption)
    7   Mail
    7.1 MIME -> Email
    7.2 Mailbox
    7.3 Thread
    7.4 Email
    7.5 SearchSnippet
    7.6 Identity
    7.7 VacationResponse
    7.8 Search (FTS5)
    7.9 MIME writing (Email/set create)
    8   Delivery and submission
    8.1 deliver_message
    8.2 LMTP
    8.3 Submission (EmailSubmission, outbox)
    12  WebSocket (RFC 8887, RFC 6455)
    13  HTTP routes
    14  CLI commands and main

IMPLEMENTATION NOTES
1. Only section 4 opens the database. Other sections use the models and
   record_change().
2. Every JMAP-visible mutation calls record_change(log, type_name, row, kind) (or its
   insert-only twin record_new() on the delivery hot path). Rows carry
   created_modseq, updated_modseq and destroyed. A type's state is the highest modseq
   touching it (type_state table). Tombstones below purged_below are gone, so /changes
   answers cannotCalculateChanges.
3. Commit, then notify the change bus, then acknowledge. Never hold a write transaction
   across network I/O or an openssl call.
4. Writes have two phases. Analyse first, outside any transaction: parse (once), write
   and sync blob files, resolve names, decide delivery rules (a method's `prepare`, a
   type's prepare_set, email_analyse + delivery_plan). Then commit: one short BEGIN
   IMMEDIATE that writes rows; each record of a /set runs in a savepoint so a SetError
   undoes only its own record, its change-log entries included.
5. Migrations are ordered, named functions, each run in one transaction with its version
   record. Never edit one that has been applied.
6. Times are stored as UTC (integer seconds since the epoch).
7. Every query is scoped by account. Every client-controlled count, size and depth has a
   named limit in 2.1 or OPTIONS.
"""

__version__ = "0.1.0"

# =============================================================================
# 1 DOCSTRING, IMPORTS, COMPATIBILITY
#   Standard library first, then the four runtime dependencies. Nothing heavy is
#   imported at start-up that a request does not need.
# =============================================================================

import argparse
import base64
import binascii
import collections
import contextlib
import dataclasses
import functools
import getpass
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Callable

try:
    import argon2
    import bottle
    import peewee
    import waitress
    import waitress.utilities
except ImportError as missing:  # one line that says what to install, not a traceback
    if __name__ != "__main__":
        raise
    sys.exit(f"jmapd: the Python package {'argon2-cffi' if missing.name == 'argon2' else missing.name}"
             " is missing. On Debian or Raspberry Pi OS: sudo apt install python3-bottle "
             "python3-waitress python3-peewee python3-argon2; in a virtual environment: "
             "pip install bottle waitress peewee argon2-cffi")

# =============================================================================
# 1.2 COMPATIBILITY SHIMS
#     bottle 0.12/0.13, peewee 3.14/4.x, waitress 2.1/3.x, argon2-cffi 21/25.
#     Each shim names the versions it serves; the rest of the file calls it by one name.
# =============================================================================


def argon2_hasher(time_cost: int, memory_kib: int, parallelism: int) -> argon2.PasswordHasher:
    """Build an argon2id hasher with pinned parameters.

    argon2-cffi 21 and 25 have different defaults (and 21 lacks `profiles`), so every
    parameter is given explicitly; the keyword names are the same in both versions.
    """
    return argon2.PasswordHasher(
        time_cost=time_cost,
        memory_cost=memory_kib,
        parallelism=parallelism,
        hash_len=32,
        salt_len=16,
        type=argon2.Type.ID,
    )


def waitress_server(app, *, sockets: list, threads: int, max_body: int, guard=None):
    """Create waitress servers on already-bound sockets, sharing one loop and thread pool.

    waitress (2.1 and 3.x) refuses TCP and Unix sockets in one server, so each socket
    gets its own server on a shared map and task dispatcher; the first is returned.
    With a `guard` (section 13) every connection passes it: admission per address,
    a deadline for request heads, refusals decided from the head alone.
    """
    channels: dict = {}
    first = None
    for sock in sockets:
        server = waitress.create_server(
            app,
            map=channels,
            _dispatcher=first.task_dispatcher if first else None,
            sockets=[sock],
            threads=threads,
            channel_request_lookahead=1,  # lets a push stream learn that its client left
            ident="jmapd",
            channel_timeout=300,
            cleanup_interval=1,  # maintenance() each second: the head deadline is checked there
            connection_limit=HTTP_CONNECTION_LIMIT,
            max_request_body_size=max_body,
            # Our middleware (section 13) honours or strips X-Forwarded-* itself: waitress 3
            # would strip them all before it, and waitress 2.1 would pass them through.
            clear_untrusted_proxy_headers=False,
        )
        if guard is not None:
            waitress_guard_server(server, guard)
        first = first or server
    return first


def waitress_guard_server(server, guard) -> None:
    # long: the shim's two subclasses live here, where waitress's modules are imported
    """Put a waitress server's connections under `guard`.

    waitress 2.1 and 3.x alike: handle_accept() calls server.channel_class(server, sock,
    addr, adj, map=…); a channel makes each request's parser with parser_class(adj) and
    feeds it with parser.received(data) -> octets consumed; the parser sets
    headers_finished, completed, error, expect_continue; request.close() is called once
    the request has been served; maintenance(now) runs every cleanup_interval.
    """
    from waitress.channel import HTTPChannel  # lazy: serve only
    from waitress.parser import HTTPRequestParser

    class GuardedParser(HTTPRequestParser):
        channel = None
        started = 0.0  # when the head's first octet came
        charged = 0  # body octets counted against the unverified allowance

        def received(self, data):
            self.started = self.started or time.monotonic()
            was_finished = self.headers_finished
            consumed = HTTPRequestParser.received(self, data)
            if self.headers_finished and not was_finished and self.error is None:
                refusal = guard.check_head(self.channel, self)
                if refusal is not None:
                    self.error, self.completed, self.expect_continue = refusal, True, False
                    self.channel.refusing = True
                    return len(data)  # the body nobody will read is dropped unread
            return consumed

        def close(self):
            guard.release_body(self)
            HTTPRequestParser.close(self)

    class GuardedChannel(HTTPChannel):
        refusing = False  # a refusal was queued: what else arrives is dropped

        def __init__(self, server, sock, addr, adj, map=None):
            HTTPChannel.__init__(self, server, sock, addr, adj, map=map)
            self.parser_class = functools.partial(_guarded_parser, self)

        def received(self, data):
            if self.refusing:
                return False
            if self.request is None and data[:2] == b"\x16\x03":  # a TLS ClientHello
                guard.tls_on_plain_port(self)
                self.refusing = self.will_close = True
                return False
            return HTTPChannel.received(self, data)

        def del_channel(self, map=None):
            HTTPChannel.del_channel(self, map)
            guard.channel_closed(self)

    def _guarded_parser(channel, adj):
        parser = GuardedParser(adj)
        parser.channel = channel
        return parser

    def admit(srv, sock, addr, adj, map=None):
        admitted, key = guard.admit(addr)
        if not admitted:
            _refuse_socket(sock, guard.refusal_octets(503, "too many connections from your "
                                                           "address; try again later"))
            return None
        channel = GuardedChannel(srv, sock, addr, adj, map=map)
        channel.guard_key = key
        return channel

    plain_maintenance = server.maintenance

    def maintenance(now):
        plain_maintenance(now)
        for channel in list(server.active_channels.values()):
            if guard.overdue(channel):
                channel.will_close = True

    server.channel_class = admit
    server.maintenance = maintenance


def _refuse_socket(sock, octets: bytes) -> None:
    try:
        sock.setblocking(False)
        sock.send(octets)  # a fresh connection's send buffer takes this at once
    except OSError:
        pass
    finally:
        sock.close()


def waitress_problem_errors() -> None:
    """Answer what waitress refuses itself with RFC 7807 problem documents: an over-size
    body with the JMAP limit problem, a malformed request with a plain problem, and the
    early refusals of section 13 (EarlyRefusal) as they were made.

    waitress answers such requests itself (text/plain) before the app runs; its
    ErrorTask.execute is the same in 2.1 and 3.x. Only `serve` installs this.
    """
    from waitress import task, utilities  # lazy: serve only

    def execute(self):
        error = self.request.error
        if isinstance(error, EarlyRefusal):
            status, headers, body = error.status_line, list(error.headers), error.body
        elif isinstance(error, utilities.RequestEntityTooLarge):
            upload = (self.request.path or "").startswith("/jmap/upload")
            name = "maxSizeUpload" if upload else "maxSizeRequest"
            status, headers = "400 Bad Request", []
            body = json_dumps({"type": PROBLEM_PREFIX + "limit", "status": 400, "limit": name,
                               "detail": "the request body is larger than the server accepts"})
        else:
            code = getattr(error, "code", 400)
            status, headers = f"{code} {getattr(error, 'reason', 'Bad Request')}", []
            body = json_dumps({"type": "about:blank", "status": code,
                               "detail": f"malformed request: {str(error.body)[:200]}"})
        self.status = status
        self.response_headers.extend(headers + [("Content-Type", PROBLEM_TYPE)])
        self.response_headers.append(("Connection", "close"))  # the body was not read
        self.close_on_finish = True
        octets = body.encode()
        self.content_length = len(octets)
        self.write(octets)

    task.ErrorTask.execute = execute


class EarlyRefusal(waitress.utilities.Error):
    """An answer decided from a request's head alone (section 13), as waitress's error
    type so that its ErrorTask sends it; rendered by waitress_problem_errors()."""

    def __init__(self, status: int, reason: str, body: str, headers: tuple = ()):
        self.code, self.reason, self.body = status, reason, body
        self.status_line = f"{status} {reason}"
        self.headers = headers

    def to_response(self, ident=None):  # waitress's own rendering, should it ever be used
        return self.status_line, list(self.headers) + [("Content-Type", PROBLEM_TYPE)], \
            self.body.encode()


def waitress_say_close() -> None:
    """Send `Connection: close` whenever waitress has already decided to close.

    waitress 2.1 closes a kept-alive connection after a HEAD answer with a Content-Length
    (no body follows) without telling the client, whose next request on it then fails.
    waitress 3 no longer does that; there the header is already present and this is a no-op.
    """
    from waitress import task  # lazy: serve only

    plain_build = task.Task.build_response_header

    def build_response_header(self):
        if self.close_on_finish and not any(
            name.lower() == "connection" for name, _ in self.response_headers
        ):
            self.response_headers.append(("Connection", "close"))
        return plain_build(self)

    task.Task.build_response_header = build_response_header


def release_free_memory() -> None:
    """Give freed heap memory back to the system (glibc's malloc_trim).

    Running this one large file as __main__ compiles it without a .pyc, and the ~25 MB
    the compiler used stay in the heap, freed but counted in RSS, unless trimmed."""
    try:
        import ctypes  # lazy: only serve trims

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to do


def waitress_run_until(server, stop_asked: Callable, on_stop: Callable) -> None:
    """Run waitress's loop until stop_asked(); then stop accepting and let requests finish.

    waitress's own run() ends the loop at once on a signal, dropping responses that
    worker threads are still writing; here the loop goes on until they are sent.
    wasyncore, `_map`/`map`, `task_dispatcher` and `total_outbufs_len` exist in 2.1 and 3.x.
    """
    from waitress import wasyncore  # lazy: serve only

    channels = getattr(server, "_map", None) or server.map
    waitress_wake_on_signal(channels)
    deadline = None
    while True:
        wasyncore.loop(timeout=0.2, use_poll=True, map=channels, count=1)
        if not stop_asked():
            continue
        if deadline is None:
            deadline = time.monotonic() + DRAIN_SECONDS
            for listener in [c for c in channels.values() if hasattr(c, "accepting") and c.accepting]:
                wasyncore.dispatcher.close(listener)  # stop accepting; keep the loop's trigger
            on_stop()
        if _waitress_idle(server, channels) or time.monotonic() > deadline:
            break
    server.task_dispatcher.shutdown(timeout=5)
    wasyncore.close_all(channels)


def waitress_wake_on_signal(channels: dict) -> None:
    """Let a signal wake waitress's loop at once: Python writes a byte to the wake-up fd
    when a signal arrives (signal.set_wakeup_fd, async-signal-safe), and the loop polls
    its other end, so a stop is seen now rather than at the next poll timeout."""
    from waitress import wasyncore  # lazy: serve only

    reader, writer = socket.socketpair()
    writer.setblocking(False)

    class Wakeup(wasyncore.dispatcher):
        def writable(self):
            return False

        def handle_read(self):
            try:
                self.recv(4096)  # what woke us; the handler has recorded the signal
            except OSError:
                pass

    Wakeup(reader, map=channels).writer = writer  # kept alive as long as the loop's map
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)


def _waitress_idle(server, channels: dict) -> bool:
    dispatcher = server.task_dispatcher
    if dispatcher.queue or dispatcher.active_count:
        return False
    return not any(
        getattr(c, "requests", None)  # being served
        or getattr(c, "request", None)  # partly received (an upload still arriving)
        or getattr(c, "total_outbufs_len", 0)  # answer not yet sent
        for c in channels.values()
    )


# =============================================================================
# 2 CONSTANTS AND UTILITIES
# =============================================================================

# =============================================================================
# 2.1 CAPABILITIES AND LIMITS
#     Capability URIs, the core limits advertised in the session (RFC 8620 §2) and
#     the server's own bounds on client-controlled sizes.
# =============================================================================

CAP_CORE = "urn:ietf:params:jmap:core"
CAP_MAIL = "urn:ietf:params:jmap:mail"
CAP_SUBMISSION = "urn:ietf:params:jmap:submission"
CAP_VACATION = "urn:ietf:params:jmap:vacationresponse"
CAP_WEBSOCKET = "urn:ietf:params:jmap:websocket"

PROBLEM_PREFIX = "urn:ietf:params:jmap:error:"

MAX_SIZE_MAILBOX_NAME = 255  # RFC 8621 §1.3.1: at least 100 octets
MAX_MAILBOX_DEPTH = 10
MAX_MAILBOXES_PER_EMAIL = 100  # maxMailboxesPerEmail; more is tooManyMailboxes (RFC 8621 §4.6)
MAX_KEYWORDS_PER_EMAIL = 100  # more is tooManyKeywords (RFC 8621 §4.6)
MAX_IDENTITIES = 100  # per account
MAX_EMAIL_CREATE_PARTS = 500  # body parts in one created Email
MAX_RECIPIENTS = 100  # per EmailSubmission (tooManyRecipients)
MAX_SIZE_SEND = 50_000_000  # octets of a message to send (tooLarge, maxSize)
SMTP_TLS_MODES = ("auto", "starttls", "implicit", "none")
MAX_ID_LENGTH = 255  # RFC 8620 §1.2
MAX_INT = 2**53 - 1  # RFC 8620 §1.3
MAX_SORT_ORDER = 2**31 - 1  # RFC 8621 §2: sortOrder < 2^31
MAX_FILTER_DEPTH = 10
MAX_FILTER_CONDITIONS = 100  # in a whole filter tree; more is unsupportedFilter (RFC 8620 §5.5)
MAX_SORT_COMPARATORS = 10
MAX_QUERY_LIMIT = 5000  # /query results per call; a larger limit is clamped (RFC 8620 §5.5)
MAX_RESULT_REFERENCE_DEPTH = 32
CHANGES_HORIZON_DAYS_MIN = 30  # RFC 8620 §5.2 via the checklist: states up to 30 days old
AUTH_CACHE_SECONDS = 120
ARGON2_PARALLEL_CHECKS = 2  # password checks at once, 64 MiB each
DRAIN_SECONDS = 30  # how long SIGTERM waits for requests in flight
# What a client that has not (yet) proved who it is may cost (section 13, 12, 5):
UNVERIFIED_BODY_PER_ADDRESS = 2 * 2**20  # request body octets in flight from one address
UNVERIFIED_BODY_TOTAL = 16 * 2**20  # … and from everyone
UNVERIFIED_BODY_SECONDS = 60  # such a body arrives within this, or the connection closes
HTTP_CONNECTION_LIMIT = 512  # connections the HTTP listener holds at once, in all
WS_MAX_PENDING_PER_ADDRESS = 4  # WebSocket connections not yet through their handshake
WS_MAX_PENDING = 16
NEW_ADDRESS_GUESSES = 3  # an hour, from a new address, for a user over its failure limit
KNOWN_ADDRESS_DAYS = 30  # an address that logged in as a user stays known this long
LIMITER_MAX_KEYS = 100_000  # failure counters kept; the least used go first
COLLATIONS = ("i;unicode-casemap", "i;ascii-casemap", "i;octet")

# IANA "IMAP Mailbox Name Attributes" that are roles (RFC 8621 §2, RFC 8457).
MAILBOX_ROLES = frozenset(
    "all archive drafts flagged important inbox junk sent subscribed trash snoozed "
    "scheduled memos".split()
)
DEFAULT_MAILBOXES = (
    ("Inbox", "inbox", 1),
    ("Drafts", "drafts", 2),
    ("Sent", "sent", 3),
    ("Archive", "archive", 4),
    ("Junk", "junk", 5),
    ("Trash", "trash", 6),
)


@dataclass(frozen=True)
class CoreLimits:
    """The core capability's limits (RFC 8620 §2), advertised and enforced once in 6.2."""

    max_size_upload: int
    max_concurrent_upload: int
    max_size_request: int
    max_concurrent_requests: int
    max_calls_in_request: int
    max_objects_in_get: int
    max_objects_in_set: int

    def as_capability(self) -> dict:
        return {
            "maxSizeUpload": self.max_size_upload,
            "maxConcurrentUpload": self.max_concurrent_upload,
            "maxSizeRequest": self.max_size_request,
            "maxConcurrentRequests": self.max_concurrent_requests,
            "maxCallsInRequest": self.max_calls_in_request,
            "maxObjectsInGet": self.max_objects_in_get,
            "maxObjectsInSet": self.max_objects_in_set,
            "collationAlgorithms": list(COLLATIONS),
        }


# =============================================================================
# 2.2 IDS, CLOCK, DATES, JSON, JSON POINTER
#     Small pure helpers used everywhere. JMAP Ids are strings (`id`), database
#     keys are ints (`pk`); TypeSpec.id_of()/pk_from_raw() (IdScheme) are the bridge.
# =============================================================================

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}\Z")  # RFC 8620 §1.2
SINGLETON_ID = "singleton"  # the id of a singleton type's one object (RFC 8621 §8)


def is_valid_id(value) -> bool:
    """Tell whether a value is a syntactically valid JMAP Id (RFC 8620 §1.2)."""
    return isinstance(value, str) and bool(ID_RE.match(value))


def id_for(prefix: str, pk: int) -> str:
    """Make the JMAP Id of a database row: a type letter and the row's key."""
    return f"{prefix}{pk}"


def pk_from_id(prefix: str, raw_id) -> int | None:
    """Return the database key named by a JMAP Id, or None if it is not one of ours."""
    if not isinstance(raw_id, str) or not raw_id.startswith(prefix):
        return None
    digits = raw_id[len(prefix) :]
    if not digits.isdigit() or digits.startswith("0") or len(digits) > 18:
        return None
    return int(digits)


class IdScheme:
    """JMAP ids that say nothing about how many objects exist: a row's id is its type's
    prefix and a keyed permutation of its key (a four-round Feistel network over 64 bits,
    BLAKE2b as the round function, a key per table from the database's secret), in 13
    base-32 letters. Rows older than the scheme keep the plain ids they were given."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"

    def __init__(self, secret: bytes, first_new: dict):
        self.secret, self.first_new = secret, first_new
        self.keys: dict[str, bytes] = {}
        self.encode = functools.lru_cache(maxsize=4096)(self._encode)  # a few pages' worth
        self.decode = functools.lru_cache(maxsize=4096)(self._decode)

    @classmethod
    def load(cls, database) -> "IdScheme":
        secret = database.execute_sql("SELECT value FROM server_secret WHERE name = 'ids'") \
            .fetchone()[0]
        first = dict(database.execute_sql("SELECT table_name, first_new_pk FROM id_scheme"))
        return cls(bytes(secret), first)

    def _key(self, table: str) -> bytes:
        if table not in self.keys:
            self.keys[table] = hashlib.blake2b(table.encode(), key=self.secret).digest()
        return self.keys[table]

    def _round(self, key: bytes, index: int, half: int) -> int:
        digest = hashlib.blake2b(half.to_bytes(4, "big"), key=key, digest_size=4,
                                 person=b"jmapd-id-%d" % index).digest()
        return int.from_bytes(digest, "big")

    def _encode(self, table: str, pk: int) -> str:
        """The id body of a key: plain digits for rows older than the scheme."""
        if pk < self.first_new.get(table, 1):
            return str(pk)
        key, left, right = self._key(table), pk >> 32, pk & 0xFFFFFFFF
        for index in range(4):
            left, right = right, left ^ self._round(key, index, right)
        block, letters = (left << 32) | right, []
        for _ in range(13):
            block, digit = divmod(block, 32)
            letters.append(self.ALPHABET[digit])
        return "".join(reversed(letters))

    def _decode(self, table: str, body: str) -> int | None:
        """The key an id body names, or None."""
        if body.isdigit():  # an id from before the scheme, and only such
            pk = int(body) if len(body) <= 18 and not body.startswith("0") else None
            return pk if pk is not None and pk < self.first_new.get(table, 1) else None
        if len(body) != 13 or any(ch not in self.ALPHABET for ch in body):
            return None
        block = 0
        for ch in body:
            block = block * 32 + self.ALPHABET.index(ch)
        if block >> 64:
            return None
        pk = self.unpermute(table, block)
        if pk >> 63:  # beyond SQLite's integers: a key no row can have
            return None
        return pk if pk >= self.first_new.get(table, 1) else None

    def unpermute(self, table: str, block: int) -> int:
        """The 64-bit key a 64-bit id block stands for (the Feistel rounds backwards)."""
        key, left, right = self._key(table), block >> 32, block & 0xFFFFFFFF
        for index in reversed(range(4)):
            left, right = right ^ self._round(key, index, left), left
        return (left << 32) | right


class Clock:
    """Tell the time; a fixed clock (hidden --test-now option) makes tests repeatable."""

    def __init__(self, fixed: float | None = None):
        self.fixed = fixed

    def now(self) -> float:
        return self.fixed if self.fixed is not None else time.time()


def utc_date(ts: float) -> str:
    """Format seconds since the epoch as an RFC 8620 §1.4 UTCDate (no fraction if zero)."""
    moment = datetime.fromtimestamp(int(ts), timezone.utc)
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:" \
           f"{moment.minute:02d}:{moment.second:02d}Z"


def parse_utc_date(value: str) -> float:
    """Parse an RFC 3339 date-time with a `Z` offset; raise ValueError otherwise."""
    if not isinstance(value, str) or not value.endswith("Z") or "t" in value or "z" in value[:-1]:
        raise ValueError("not a UTCDate")
    parsed = datetime.fromisoformat(value[:-1] + "+00:00")
    return parsed.timestamp()


def json_dumps(obj) -> str:
    """Serialise a response: compact, UTF-8 kept as is."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class NotIJson(ValueError):
    """The text is not I-JSON (RFC 7493): bad syntax, duplicate names, NaN, bad UTF-8."""


def _no_duplicate_names(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise NotIJson(f"duplicate member name {key!r}")
        obj[key] = value
    return obj


def _no_constants(name):
    raise NotIJson(f"{name} is not JSON")


# RFC 7493 §2.1: no surrogates (lone ones come from \u escapes) and no noncharacters.
NOT_IJSON_CHARS = re.compile(
    "[\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]|"
    + "|".join(chr(plane << 16 | 0xFFFE) + "|" + chr(plane << 16 | 0xFFFF) for plane in range(1, 17))
)


def _ijson_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise NotIJson(f"number {text[:20]} is out of range")  # RFC 7493 §2.2
    return value


def _ijson_check_strings(value, depth: int = 0) -> None:
    """Refuse strings with surrogates or noncharacters, in names and values."""
    if isinstance(value, str):
        if NOT_IJSON_CHARS.search(value):
            raise NotIJson("a string holds a surrogate or a noncharacter")
    elif isinstance(value, dict):
        for key, item in value.items():
            _ijson_check_strings(key, depth)
            _ijson_check_strings(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _ijson_check_strings(item, depth + 1)


def parse_ijson(raw: bytes):
    """Parse a request body as I-JSON (RFC 8620 §1.5, RFC 7493); raise NotIJson."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotIJson("body is not UTF-8") from exc
    if text.startswith("\ufeff"):
        raise NotIJson("byte order mark")
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicate_names, parse_constant=_no_constants,
            parse_float=_ijson_float,
        )
    except NotIJson:
        raise
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer too long to read
        raise NotIJson(str(exc)[:200]) from exc
    if "\\u" in text or NOT_IJSON_CHARS.search(text):
        _ijson_check_strings(value)  # only escapes or raw noncharacters can smuggle them in
    return value


def pointer_tokens(path: str) -> list[str]:
    """Split a JSON Pointer (RFC 6901) into unescaped tokens; raise ValueError."""
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError("a JSON Pointer starts with /")
    tokens = []
    for raw in path[1:].split("/"):
        if re.search(r"~(?![01])", raw):
            raise ValueError(f"bad escape in {raw!r}")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tokens


def pointer_evaluate(value, tokens: list[str]):
    """Evaluate a JSON Pointer with JMAP's `*` rule (RFC 8620 §3.7); raise ValueError.

    `*` on an array maps the rest of the pointer over each item; items that are
    themselves arrays are flattened into the result.
    """
    for index, token in enumerate(tokens):
        if isinstance(value, list):
            if token == "*":
                rest = tokens[index + 1 :]
                out = []
                for item in value:
                    found = pointer_evaluate(item, rest)
                    out.extend(found if isinstance(found, list) else [found])
                return out
            if not re.fullmatch(r"0|[1-9][0-9]*", token) or int(token) >= len(value):
                raise ValueError(f"no item {token!r} in array")
            value = value[int(token)]
        elif isinstance(value, dict):
            if token not in value:
                raise ValueError(f"no member {token!r}")
            value = value[token]
        else:
            raise ValueError(f"cannot descend into a {type(value).__name__}")
    return value


def octets(text: str) -> int:
    return len(text.encode("utf-8"))


def is_net_unicode(text: str) -> bool:
    """Tell whether text has no control characters (RFC 5198 Net-Unicode, less NFC)."""
    return not any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


# =============================================================================
# 2.3 LOGGING
#     One "jmapd" logger with a child per section. Under systemd (JOURNAL_STREAM set)
#     the journal stamps the time, so the format drops it.
# =============================================================================

log = logging.getLogger("jmapd")


JOURNAL_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournalFormatter(logging.Formatter):
    """Lines for the systemd journal: each line (a traceback's too) begins with its
    record's syslog priority, <3> … <7> (sd-daemon(3)), so `journalctl -p warning` works;
    the journal stamps the time itself."""

    def format(self, record) -> str:
        prefix = f"<{JOURNAL_PRIORITIES.get(record.levelname, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def logging_to_journal() -> bool:
    """Whether stderr is the journal: JOURNAL_STREAM names stderr's device and inode."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return device.isdigit() and inode.isdigit() and (stat.st_dev, stat.st_ino) == (
        int(device), int(inode))


def logging_setup(level: str) -> None:
    """Configure the root jmapd logger once for a process (and waitress's, which would
    else print bare lines of its own)."""
    handler = logging.StreamHandler(sys.stderr)
    if logging_to_journal():
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for logger in (log, logging.getLogger("waitress")):
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


# =============================================================================
# 3 CONFIGURATION
#   One OPTIONS table drives argparse, --help and the README's option table.
#   Converters raise ValueError("why"). The result is a frozen Config passed down.
#   Hidden options are test-only knobs (cheap argon2, a fixed clock).
# =============================================================================


class ConfigError(Exception):
    """A configuration that cannot work; main() prints it on one line and exits 2."""


def conv_listen(text: str) -> tuple[str, int]:
    """Parse HOST:PORT, with IPv6 literals in brackets ([::1]:8080)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ValueError(f"expected HOST:PORT or [IPv6]:PORT, got {text!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def conv_tls_mode(text: str) -> str:
    if text not in SMTP_TLS_MODES:
        raise ValueError(f"one of {', '.join(SMTP_TLS_MODES)}")
    return text


def conv_positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def conv_url(text: str) -> str:
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("expected an absolute http(s) URL")
    return text.rstrip("/")


def conv_horizon(text: str) -> int:
    value = int(text)
    if value < CHANGES_HORIZON_DAYS_MIN:
        raise ValueError(f"must be at least {CHANGES_HORIZON_DAYS_MIN} days (RFC 8620 §5.2)")
    return value


def conv_test_now(text: str) -> float:
    return parse_utc_date(text)


def conv_network(text: str) -> str:
    """An IP address or network (10.0.0.0/8, ::1); one line that says what is wrong."""
    import ipaddress  # lazy: only options that name networks

    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network") from None


def conv_seconds(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 3600:
        raise ValueError("between 1 and 3600 seconds")
    return value


def conv_level(text: str) -> str:
    if text.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("one of debug, info, warning, error")
    return text.upper()


@dataclass(frozen=True)
class Opt:
    """One command-line option: its flag, default, converter and help."""

    flag: str
    default: Any
    conv: Callable | None
    help: str
    commands: tuple = ("serve",)
    secret: bool = False
    hidden: bool = False
    action: str | None = None
    nargs: str | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def metavar(self) -> str | None:
        """A short placeholder for --help: N, HOST:PORT, PATH, …"""
        if self.action:
            return None
        named = {conv_listen: "HOST:PORT", conv_url: "URL", conv_network: "ADDRESS",
                 conv_seconds: "SECONDS", conv_positive: "N", conv_horizon: "DAYS",
                 conv_level: "LEVEL", conv_tls_mode: "MODE"}.get(self.conv)
        if named:
            return named
        words = self.flag.split("-")
        if words[-1] in ("dir", "file", "socket"):
            return "PATH"
        return {"--user": "ADDRESS", "--mailbox": "NAME", "--smtp-user": "NAME"}.get(
            self.flag, "VALUE")


GLOBAL = "*"  # an option every command takes, before or after the subcommand

OPTIONS = (
    Opt("--data-dir", "./jmapd-data", str,
        "directory holding the database and blobs, relative to where jmapd is started",
        (GLOBAL,)),
    Opt("--log-level", "INFO", conv_level, "debug, info, warning or error", (GLOBAL,)),
    Opt("--listen", "127.0.0.1:8080", conv_listen, "HOST:PORT to serve HTTP on ([::1]:8080)"),
    Opt("--public-url", None, conv_url, "external base URL (https://mail.example.com)"),
    Opt("--unix-socket", None, str, "also serve HTTP on this Unix socket (for a local proxy)"),
    Opt("--lmtp", None, conv_listen, "also accept mail by LMTP on HOST:PORT (RFC 2033)"),
    Opt("--lmtp-socket", None, str, "also accept mail by LMTP on this Unix socket"),
    Opt("--websocket", None, conv_listen,
        "also serve JMAP over WebSocket on HOST:PORT (RFC 8887; map /jmap/ws/ onto it)"),
    Opt("--max-websockets", 32, conv_positive, "WebSocket connections open at once, in all"),
    Opt("--max-event-streams", 32, conv_positive, "EventSource streams open at once, in all"),
    Opt("--user", None, str, "the address the mail is for", ("deliver", "import"),
        required=True),
    Opt("--mailbox", None, str, "a role (inbox, junk, …) or the name of an existing Mailbox; "
        "without it, the Inbox", ("deliver", "import")),
    Opt("--smtp-relay", None, conv_listen,
        "send mail through this submission server, HOST:PORT (your provider's smarthost)"),
    Opt("--smtp-tls", "auto", conv_tls_mode,
        "auto (STARTTLS when offered), starttls, implicit (port 465) or none"),
    Opt("--smtp-ca-file", None, str, "CA certificates to verify the relay with (else the system's)"),
    Opt("--smtp-user", None, str, "user name for AUTH at the relay (only ever over TLS)"),
    Opt("--smtp-password-file", None, str, "file holding the relay password (not on argv)"),
    Opt("--smtp-retry-seconds", 60, conv_positive,
        "first retry after a temporary failure; doubled each time up to an hour"),
    Opt("--smtp-give-up-hours", 120, conv_positive, "stop retrying a message after this long"),
    Opt("--max-delayed-send", 7 * 86400, conv_positive,
        "maxDelayedSend: longest FUTURERELEASE hold in seconds"),
    Opt("--trusted-proxy", (), conv_network,
        "addresses or networks whose X-Forwarded-For/-Proto/-Host are honoured", nargs="+"),
    Opt("--max-connections-per-address", 32, conv_positive,
        "HTTP connections one client address may hold (IPv6: per /64; proxies exempt)"),
    Opt("--head-timeout", 10, conv_seconds,
        "seconds a client has to send a whole request head once it has begun"),
    Opt("--max-lmtp-connections", 20, conv_positive, "LMTP connections at once"),
    Opt("--threads", 8, conv_positive, "waitress worker threads"),
    Opt("--log-requests", False, None,
        "log every JMAP request and response (cut short; credentials, push keys and message "
        "text left out): for finding out what a client sends", action="store_true"),
    Opt("--max-size-upload", 50_000_000, conv_positive, "maxSizeUpload in octets"),
    Opt("--max-concurrent-upload", 4, conv_positive, "maxConcurrentUpload"),
    Opt("--max-size-request", 10_000_000, conv_positive, "maxSizeRequest in octets"),
    Opt("--max-concurrent-requests", 4, conv_positive, "maxConcurrentRequests per user"),
    Opt("--max-calls-in-request", 16, conv_positive, "maxCallsInRequest"),
    Opt("--max-objects-in-get", 500, conv_positive, "maxObjectsInGet"),
    Opt("--max-objects-in-set", 500, conv_positive, "maxObjectsInSet"),
    Opt("--changes-horizon-days", 60, conv_horizon, "keep destroyed-record tombstones this long"),
    Opt("--max-push-connections", 8, conv_positive,
        "EventSource streams (and WebSockets) one user may hold open"),
    Opt("--max-login-failures-per-address", 10, conv_positive,
        "failed logins from one address per 15 minutes before it must wait"),
    Opt("--max-login-failures-per-user", 30, conv_positive,
        "failed logins for one user per 15 minutes before it must wait"),
    Opt("--password-stdin", False, None, "read the password from stdin",
        ("user add", "user passwd"), action="store_true"),
    Opt("--purge", False, None, "delete the account even if it holds data",
        ("user del",), action="store_true"),
    Opt("--read-only", False, None, "the grantee may read but not change anything",
        ("user share",), action="store_true"),
    Opt("--test-cheap-hashing", False, None, argparse.SUPPRESS, (GLOBAL,), hidden=True,
        action="store_true"),
    Opt("--test-now", None, conv_test_now, argparse.SUPPRESS, (GLOBAL,), hidden=True),
    Opt("--test-push-allow-loopback", False, None, argparse.SUPPRESS, hidden=True,
        action="store_true"),
)


@dataclass(frozen=True)
class Config:
    """The effective configuration of one process, built once from the command line."""

    command: str
    data_dir: str
    log_level: str = "INFO"
    listen: tuple = ("127.0.0.1", 8080)
    public_url: str | None = None
    threads: int = 8
    max_size_upload: int = 50_000_000
    max_concurrent_upload: int = 4
    max_size_request: int = 10_000_000
    max_concurrent_requests: int = 4
    max_calls_in_request: int = 16
    max_objects_in_get: int = 500
    max_objects_in_set: int = 500
    changes_horizon_days: int = 60
    unix_socket: str | None = None
    lmtp: tuple | None = None
    lmtp_socket: str | None = None
    websocket: tuple | None = None
    max_websockets: int = 32
    max_event_streams: int = 32
    user: str | None = None
    mailbox: str | None = None
    alias: str | None = None
    paths: tuple = ()
    trusted_proxy: tuple = ()
    smtp_relay: tuple | None = None
    smtp_tls: str = "auto"
    smtp_ca_file: str | None = None
    smtp_user: str | None = None
    smtp_password_file: str | None = None
    smtp_retry_seconds: int = 60
    smtp_give_up_hours: int = 120
    max_delayed_send: int = 7 * 86400
    max_push_connections: int = 8
    max_connections_per_address: int = 32
    log_requests: bool = False
    head_timeout: int = 10
    max_lmtp_connections: int = 20
    max_login_failures_per_address: int = 10
    max_login_failures_per_user: int = 30
    label: str | None = None
    token_id: str | None = None
    path: str | None = None
    password_stdin: bool = False
    purge: bool = False
    read_only: bool = False
    grantee: str | None = None
    test_cheap_hashing: bool = False
    test_now: float | None = None
    test_push_allow_loopback: bool = False
    username: str | None = None

    @property
    def limits(self) -> CoreLimits:
        return CoreLimits(
            self.max_size_upload,
            self.max_concurrent_upload,
            self.max_size_request,
            self.max_concurrent_requests,
            self.max_calls_in_request,
            self.max_objects_in_get,
            self.max_objects_in_set,
        )

    def masked(self) -> dict:
        secret = {opt.dest for opt in OPTIONS if opt.secret}
        return {k: ("***" if k in secret else v) for k, v in dataclasses.asdict(self).items()}


class CliParser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line that matters, not the whole usage."""

    def error(self, message):
        self.exit(2, f"jmapd: {message} (see: {self.prog} --help)\n")


def _typed(opt: Opt) -> Callable:
    """Wrap a converter so argparse reports its ValueError text (argparse names the
    option itself)."""

    def convert(text):
        try:
            return opt.conv(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = opt.dest
    return convert


def _add_options(parser: argparse.ArgumentParser, command: str, top: bool) -> None:
    for opt in OPTIONS:
        if GLOBAL in opt.commands:
            # The subparser copy must not overwrite a value given before the subcommand.
            default = opt.default if top else argparse.SUPPRESS
        elif command in opt.commands and not top:
            default = opt.default
        else:
            continue
        kwargs = {"default": default, "help": _help_text(opt), "dest": opt.dest}
        if opt.nargs:
            kwargs["nargs"] = opt.nargs
        if opt.required and not top:
            kwargs["required"] = True
        if opt.action:
            kwargs["action"] = opt.action
        else:
            kwargs["metavar"] = opt.metavar
            if opt.conv:
                kwargs["type"] = _typed(opt)
        parser.add_argument(opt.flag, **kwargs)


def _help_text(opt: Opt) -> str:
    """The option's help with its default shown (argparse formats help with %)."""
    if opt.help == argparse.SUPPRESS:
        return opt.help
    text = opt.help.replace("%", "%%")
    if opt.required:
        return text + " (required)"
    if opt.default in (None, False, ()):
        return text
    shown = ":".join(map(str, opt.default)) if isinstance(opt.default, tuple) else opt.default
    return f"{text} (default: {shown})"


COMMANDS = (
    # (command, help, positional arguments (dest, metavar, help))
    ("serve", "run the server", ()),
    ("user add", "create a user (the username is an e-mail address)",
     (("username", "ADDRESS", "the user's e-mail address"),)),
    ("user passwd", "change a user's password", (("username", "ADDRESS", "the user"),)),
    ("user del", "delete a user and their data", (("username", "ADDRESS", "the user"),)),
    ("user list", "list users", ()),
    ("user token add", "create an app password for a device (printed once)",
     (("username", "ADDRESS", "the user"), ("label", "LABEL", "what the device is"))),
    ("user token list", "list a user's app passwords", (("username", "ADDRESS", "the user"),)),
    ("user token revoke", "revoke an app password",
     (("username", "ADDRESS", "the user"), ("token_id", "ID", "the app password's id"))),
    ("user alias add", "let another address deliver to a user",
     (("username", "ADDRESS", "the user"), ("alias", "ALIAS", "the other address"))),
    ("user alias del", "remove an alias",
     (("username", "ADDRESS", "the user"), ("alias", "ALIAS", "the other address"))),
    ("user alias list", "list a user's aliases", (("username", "ADDRESS", "the user"),)),
    ("user share", "give GRANTEE access to OWNER's mail account (again: change the access)",
     (("username", "OWNER", "the account's user"), ("grantee", "GRANTEE", "who may use it"))),
    ("user unshare", "take back a share",
     (("username", "OWNER", "the account's user"), ("grantee", "GRANTEE", "who had it"))),
    ("user shares", "list the accounts a user shares and is shared",
     (("username", "ADDRESS", "the user"),)),
    ("deliver", "store one message from stdin (for an MTA or fetchmail); exit 75 to retry", ()),
    ("import", "import mbox files, Maildirs or folders of .eml files",
     (("paths", "PATH", "an mbox file, a Maildir or a folder of .eml files"),)),
    ("backup", "copy the database and blobs to DEST while the server runs",
     (("path", "DEST", "a new or empty directory"),)),
    ("restore", "make a data directory from a backup", (("path", "SRC", "a backup directory"),)),
    ("check", "verify the data directory: schema, every blob present and intact", ()),
    ("status", "one screen on how the server is doing; exit 1 when something needs attention",
     ()),
)


def cfg_parser() -> argparse.ArgumentParser:
    """Build the argparse parser for every command from OPTIONS and COMMANDS."""
    parser = CliParser(
        prog="jmapd.py", description="A personal JMAP server (RFC 8620, RFC 8621).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"jmapd {__version__}")
    _add_options(parser, "", top=True)
    groups = {"": parser.add_subparsers(dest="command", metavar="COMMAND", required=True)}
    parsers = {}
    for command, text, positionals in COMMANDS:
        words = command.split()
        for depth in range(1, len(words)):  # intermediate groups: user, user token
            group = " ".join(words[:depth])
            if group not in groups:
                parent = groups[" ".join(words[: depth - 1])]
                sub = parent.add_parser(words[depth - 1], help=f"{group} commands",
                                        allow_abbrev=False)
                parsers[group] = sub
                groups[group] = sub.add_subparsers(dest=f"command_{depth}", metavar="ACTION",
                                                   required=True)
        sub = groups[" ".join(words[:-1])].add_parser(words[-1], help=text, description=text,
                                                      allow_abbrev=False)
        for dest, metavar, arg_help in positionals:
            sub.add_argument(dest, metavar=metavar, help=arg_help,
                             **({"nargs": "+"} if dest == "paths" else {}))
        _add_options(sub, command, top=False)
    return parser


def cfg_from_args(argv: list[str]) -> Config:
    """Parse the command line into a Config (argparse exits 2 on a bad option)."""
    ns = cfg_parser().parse_args(argv)
    words = [ns.command] + [getattr(ns, f"command_{d}") for d in (1, 2) if hasattr(ns, f"command_{d}")]
    command = " ".join(words)
    known = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(ns).items() if k in known and k != "command"}
    if isinstance(values.get("trusted_proxy"), list):
        values["trusted_proxy"] = tuple(values["trusted_proxy"])
    if isinstance(values.get("paths"), list):
        values["paths"] = tuple(values["paths"])
    return Config(command=command, **values)


# =============================================================================
# 4 STORAGE
#   peewee over one SQLite file in WAL mode. Tables are made by migrations (raw DDL,
#   never edited once applied); the models below map onto them.
# =============================================================================

# =============================================================================
# 4.1 DATABASE AND PRAGMAS
#     db_open() is the one way to a database: WAL, synchronous=FULL (anything that
#     acknowledges mail must survive a crash), foreign keys, a busy timeout, and
#     the collations /query sorts with.
# =============================================================================

DB_FILE = "jmapd.sqlite3"
db = peewee.DatabaseProxy()
BUSY_TIMEOUT_MS = 10_000


class DataDirMissing(Exception):
    """The data directory does not exist and this command may not create it."""


class DataDirProblem(Exception):
    """The data directory or its database cannot be used (permissions, a full disk, a
    damaged file); the message says which and what to do."""


def _collate_unicode_casemap(a: str, b: str) -> int:
    # RFC 5051 i;unicode-casemap, approximated by NFKD + casefold.
    ka = unicodedata.normalize("NFKD", a).casefold()
    kb = unicodedata.normalize("NFKD", b).casefold()
    return (ka > kb) - (ka < kb)


def _collate_ascii_casemap(a: str, b: str) -> int:
    ka = a.translate(_ASCII_LOWER)
    kb = b.translate(_ASCII_LOWER)
    return (ka > kb) - (ka < kb)


def _collate_octet(a: str, b: str) -> int:
    ka, kb = a.encode("utf-8"), b.encode("utf-8")
    return (ka > kb) - (ka < kb)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
SQL_COLLATION = {
    "i;unicode-casemap": "JMAP_UNICODE_CASEMAP",
    "i;ascii-casemap": "JMAP_ASCII_CASEMAP",
    "i;octet": "JMAP_OCTET",
}


def _sql_casefold(text):
    return None if text is None else unicodedata.normalize("NFKD", text).casefold()


def db_path(data_dir: str) -> str:
    return os.path.join(data_dir, DB_FILE)


def db_open(data_dir: str, create: bool) -> peewee.SqliteDatabase:
    """Open (and with create=True make) the data directory's database, migrated to date."""
    db_check_data_dir(data_dir, create)
    database = peewee.SqliteDatabase(
        db_path(data_dir),
        pragmas={
            "journal_mode": "wal",
            "synchronous": 2,  # FULL
            "foreign_keys": 1,
            "busy_timeout": BUSY_TIMEOUT_MS,
            "cache_size": -2000,  # KiB per connection: a thread each, so kept small (Pi)
        },
        timeout=BUSY_TIMEOUT_MS / 1000,
        check_same_thread=False,
    )
    database.register_collation(_collate_unicode_casemap, SQL_COLLATION["i;unicode-casemap"])
    database.register_collation(_collate_ascii_casemap, SQL_COLLATION["i;ascii-casemap"])
    database.register_collation(_collate_octet, SQL_COLLATION["i;octet"])
    database.register_function(_sql_casefold, "jmap_casefold", 1)
    database.register_function(
        lambda sha, name, value: search_header_matches(data_dir, sha, name, value),
        "jmap_header_matches", 3)
    db.initialize(database)
    try:
        database.connect(reuse_if_open=True)
        db_migrate(database)
    except peewee.OperationalError as exc:
        raise DataDirProblem(f"cannot use the database in {data_dir!r}: {exc}") from exc
    return database


def db_check_data_dir(data_dir: str, create: bool) -> None:
    """Make sure the data directory is there and ours to use, or say plainly why not:
    missing (and this command may not make it), not reachable, or someone else's."""
    try:
        os.stat(data_dir)
    except NotADirectoryError:
        raise DataDirProblem(f"{data_dir!r} cannot be a data directory: part of its path is "
                             "a file") from None
    except FileNotFoundError:
        if not create:
            raise DataDirMissing(f"data directory {data_dir!r} does not exist (create it "
                                 "with 'jmapd.py user add' or 'jmapd.py serve')") from None
        try:
            os.makedirs(data_dir, mode=0o750, exist_ok=True)
        except OSError as exc:
            raise DataDirProblem(f"cannot create the data directory {data_dir!r}: "
                                 f"{exc.strerror}") from None
        return
    except PermissionError:
        raise DataDirProblem(f"permission denied on the way to {data_dir!r}: "
                             f"{_permission_hint(data_dir)}") from None
    if not os.access(data_dir, os.R_OK | os.W_OK | os.X_OK):
        raise DataDirProblem(f"permission denied: {data_dir!r} belongs to "
                             f"{_owner_name(data_dir)}; {_permission_hint(data_dir)}")
    if not create and not os.path.exists(db_path(data_dir)):
        raise DataDirMissing(  # an empty mount point: the disk is not mounted
            f"no jmapd database in {data_dir!r} (not mounted, or not a data directory)")


def _owner_name(path: str) -> str:
    import pwd  # lazy: only error messages need it

    try:
        uid = os.stat(path).st_uid
    except OSError:
        return "another user"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _permission_hint(data_dir: str) -> str:
    """What to run instead: as the directory's owner (root is switched automatically)."""
    parent = data_dir
    while parent and not os.access(parent, os.F_OK):
        parent = os.path.dirname(parent.rstrip("/")) or "/"
        if parent == "/":
            break
    owner = _owner_name(data_dir if os.access(data_dir, os.F_OK) else parent)
    if owner == "root":
        return "run jmapd with sudo"
    return f"run jmapd as its owner, e.g. sudo -u {owner} jmapd.py … (or with sudo alone)"


def db_data_dir() -> str:
    """The data directory of the open database (blob files live beside it)."""
    return os.path.dirname(db.obj.database)


def db_data_version(database) -> int:
    """Return SQLite's data_version: it changes when another connection commits."""
    return database.execute_sql("PRAGMA data_version").fetchone()[0]


# =============================================================================
# 4.2 MODELS
#     Plain columns, no peewee foreign-key magic: keys are ints named *_pk.
#     Every JMAP object table carries created_modseq, updated_modseq, destroyed.
# =============================================================================


class BaseModel(peewee.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Account(BaseModel):
    """A user and the account of the same name (one login, one mail account)."""

    pk = peewee.AutoField()
    username = peewee.TextField(unique=True)
    password_hash = peewee.TextField()
    created_at = peewee.IntegerField()
    modseq = peewee.IntegerField(default=0)
    credential = None  # set by Authenticator: "password" or "token:<pk>" (not a column)

    @property
    def id(self) -> str:
        return id_for("A", self.pk)


class TypeState(BaseModel):
    """The state of one JMAP type in one account: its highest modseq (RFC 8620 §5.1)."""

    account_pk = peewee.IntegerField()
    type_name = peewee.TextField()
    modseq = peewee.IntegerField(default=0)
    purged_below = peewee.IntegerField(default=0)

    class Meta:
        table_name = "type_state"
        primary_key = peewee.CompositeKey("account_pk", "type_name")


class JmapRow(BaseModel):
    """Columns every JMAP object table has: the account and the change-log columns."""

    pk = peewee.AutoField()
    account_pk = peewee.IntegerField()
    created_modseq = peewee.IntegerField(default=0)
    updated_modseq = peewee.IntegerField(default=0)
    destroyed = peewee.BooleanField(default=False)
    destroyed_at = peewee.IntegerField(null=True)


class Mailbox(JmapRow):
    name = peewee.TextField()
    parent_pk = peewee.IntegerField(null=True)
    role = peewee.TextField(null=True)
    sort_order = peewee.IntegerField(default=0)
    is_subscribed = peewee.BooleanField(default=True)
    total_emails = peewee.IntegerField(default=0)
    unread_emails = peewee.IntegerField(default=0)
    total_threads = peewee.IntegerField(default=0)
    unread_threads = peewee.IntegerField(default=0)
    counts_modseq = peewee.IntegerField(default=0)


class Thread(JmapRow):
    """A conversation (RFC 8621 §3); its Emails point at it."""


class Email(JmapRow):
    """A stored message: the raw octets are blob `blob_sha256`; `summary` holds the fast
    properties (RFC 8621 §4.2) as JSON, computed once when the message is stored."""

    blob_sha256 = peewee.TextField()
    thread_pk = peewee.IntegerField()
    size = peewee.IntegerField()
    received_at = peewee.IntegerField()
    sent_at = peewee.IntegerField(null=True)
    keywords = peewee.TextField(default="{}")
    unread = peewee.BooleanField(default=True)
    summary = peewee.TextField(default="{}")
    message_id = peewee.TextField(null=True)
    subject_sort = peewee.TextField(default="")
    from_sort = peewee.TextField(default="")
    to_sort = peewee.TextField(default="")
    has_attachment = peewee.BooleanField(default=False)
    search_version = peewee.IntegerField(default=1)  # SEARCH_VERSION that indexed it


class EmailKeyword(BaseModel):
    """One keyword of one Email, with its thread for the *InThreadHaveKeyword filters."""

    email_pk = peewee.IntegerField()
    thread_pk = peewee.IntegerField()
    keyword = peewee.TextField()

    class Meta:
        table_name = "email_keyword"
        primary_key = peewee.CompositeKey("keyword", "email_pk")


class EmailMailbox(BaseModel):
    """Membership of an Email in a Mailbox (mailboxIds)."""

    email_pk = peewee.IntegerField()
    mailbox_pk = peewee.IntegerField()

    class Meta:
        table_name = "email_mailbox"
        primary_key = peewee.CompositeKey("mailbox_pk", "email_pk")


class Alias(BaseModel):
    """Another address that delivers to an account (`user alias add`)."""

    address = peewee.TextField(primary_key=True)
    account_pk = peewee.IntegerField()


class AccountShare(BaseModel):
    """OWNER's mail account shared with GRANTEE (`user share`)."""

    owner_pk = peewee.IntegerField()
    grantee_pk = peewee.IntegerField()
    read_only = peewee.BooleanField()

    class Meta:
        table_name = "account_share"
        primary_key = peewee.CompositeKey("owner_pk", "grantee_pk")


class Identity(JmapRow):
    """An address the account sends as (RFC 8621 §6)."""

    name = peewee.TextField(default="")
    email = peewee.TextField()
    reply_to = peewee.TextField(null=True)  # JSON EmailAddress[] or NULL
    bcc = peewee.TextField(null=True)
    text_signature = peewee.TextField(default="")
    html_signature = peewee.TextField(default="")
    may_delete = peewee.BooleanField(default=True)


class VacationResponse(JmapRow):
    """The account's one vacation auto-reply setting (RFC 8621 §8)."""

    is_enabled = peewee.BooleanField(default=False)
    from_date = peewee.IntegerField(null=True)
    to_date = peewee.IntegerField(null=True)
    subject = peewee.TextField(null=True)
    text_body = peewee.TextField(null=True)
    html_body = peewee.TextField(null=True)

    class Meta:
        table_name = "vacation_response"


class EmailSubmission(JmapRow):
    """A request to send an Email (RFC 8621 §7); the sending itself is an Outbox row."""

    identity_pk = peewee.IntegerField()
    email_pk = peewee.IntegerField()
    thread_pk = peewee.IntegerField()
    envelope = peewee.TextField()  # JSON Envelope
    send_at = peewee.IntegerField()
    undo_status = peewee.TextField(default="pending")
    delivery_status = peewee.TextField(null=True)  # JSON {address: DeliveryStatus}
    dsn_blob_ids = peewee.TextField(default="[]")
    mdn_blob_ids = peewee.TextField(default="[]")
    message_id = peewee.TextField(null=True)  # of the message sent, to match DSNs

    class Meta:
        table_name = "email_submission"


class Outbox(BaseModel):
    """A message waiting for the smarthost: an EmailSubmission's, or a vacation reply."""

    pk = peewee.AutoField()
    account_pk = peewee.IntegerField()
    submission_pk = peewee.IntegerField(null=True)
    sha256 = peewee.TextField()  # the octets to send (Bcc already removed)
    mail_from = peewee.TextField()
    mail_params = peewee.TextField(default="{}")  # JSON, FUTURERELEASE removed
    rcpts = peewee.TextField()  # JSON [[address, {params}]] still to send to
    state = peewee.TextField(default="queued")  # queued, sending, done, canceled
    attempts = peewee.IntegerField(default=0)
    next_attempt_at = peewee.IntegerField()
    created_at = peewee.IntegerField()


class PushSubscription(JmapRow):
    """A URL to POST StateChanges to, owned by one credential (RFC 8620 §7.2)."""

    credential = peewee.TextField(default="")  # "password" or "token:<app password pk>"
    device_client_id = peewee.TextField()
    url = peewee.TextField()
    keys = peewee.TextField(null=True)  # JSON {p256dh, auth}
    verification_code = peewee.TextField(null=True)  # as the client set it
    expected_code = peewee.TextField(default="")  # as we pushed it
    verification_sent = peewee.BooleanField(default=False)
    expires = peewee.IntegerField(null=True)
    types = peewee.TextField(null=True)
    failures = peewee.IntegerField(default=0)
    failing_since = peewee.IntegerField(null=True)
    next_attempt_at = peewee.IntegerField(default=0)
    created_at = peewee.IntegerField(default=0)
    pushed_state = peewee.TextField(null=True)  # event id of the states last pushed

    class Meta:
        table_name = "push_subscription"


class VacationSent(BaseModel):
    """When a sender last got this account's vacation reply (RFC 3834 §2, RFC 5230 §4.6)."""

    account_pk = peewee.IntegerField()
    sender = peewee.TextField()
    sent_at = peewee.IntegerField()

    class Meta:
        table_name = "vacation_sent"
        primary_key = peewee.CompositeKey("account_pk", "sender")


class Blob(BaseModel):
    """One stored blob file, named by its SHA-256."""

    sha256 = peewee.TextField(primary_key=True)
    size = peewee.IntegerField()
    created_at = peewee.IntegerField()


class BlobRef(BaseModel):
    """Why an account may see a blob (RFC 8620 §6): an upload, an email, an attachment."""

    pk = peewee.AutoField()
    account_pk = peewee.IntegerField()
    sha256 = peewee.TextField()
    kind = peewee.TextField()  # upload, email, ...
    owner_pk = peewee.IntegerField(null=True)  # the referencing row, if any
    created_at = peewee.IntegerField()
    expires_at = peewee.IntegerField(null=True)  # uploads not yet used by anything

    class Meta:
        table_name = "blob_ref"


class AppPassword(BaseModel):
    """A device's credential: `<public_id>.<secret>`, the secret argon2id-hashed."""

    pk = peewee.AutoField()
    account_pk = peewee.IntegerField()
    public_id = peewee.TextField(unique=True)
    label = peewee.TextField()
    secret_hash = peewee.TextField()
    created_at = peewee.IntegerField()
    last_used_at = peewee.IntegerField(null=True)

    class Meta:
        table_name = "app_password"


# =============================================================================
# 4.3 MIGRATIONS
#     Ordered, named functions, each run in one transaction with its version row.
#     A database newer than this code is refused rather than guessed at.
# =============================================================================


def _migration_1_initial(database) -> None:
    for statement in (
        """CREATE TABLE account (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            username TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            modseq INTEGER NOT NULL DEFAULT 0)""",
        """CREATE TABLE type_state (
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            type_name TEXT NOT NULL,
            modseq INTEGER NOT NULL DEFAULT 0,
            purged_below INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (account_pk, type_name)) WITHOUT ROWID""",
        """CREATE TABLE mailbox (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            name TEXT NOT NULL,
            parent_pk INTEGER,
            role TEXT,
            sort_order INTEGER NOT NULL DEFAULT 0,
            is_subscribed INTEGER NOT NULL DEFAULT 1,
            total_emails INTEGER NOT NULL DEFAULT 0,
            unread_emails INTEGER NOT NULL DEFAULT 0,
            total_threads INTEGER NOT NULL DEFAULT 0,
            unread_threads INTEGER NOT NULL DEFAULT 0,
            counts_modseq INTEGER NOT NULL DEFAULT 0,
            created_modseq INTEGER NOT NULL,
            updated_modseq INTEGER NOT NULL,
            destroyed INTEGER NOT NULL DEFAULT 0,
            destroyed_at INTEGER)""",
        "CREATE INDEX mailbox_changes ON mailbox(account_pk, updated_modseq)",
        "CREATE INDEX mailbox_parent ON mailbox(account_pk, parent_pk) WHERE destroyed = 0",
    ):
        database.execute_sql(statement)


def _migration_2_blobs_and_app_passwords(database) -> None:
    for statement in (
        """CREATE TABLE blob (
            sha256 TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            created_at INTEGER NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE blob_ref (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            sha256 TEXT NOT NULL REFERENCES blob(sha256),
            kind TEXT NOT NULL,
            owner_pk INTEGER,
            created_at INTEGER NOT NULL,
            expires_at INTEGER)""",
        "CREATE INDEX blob_ref_account ON blob_ref(account_pk, sha256)",
        "CREATE INDEX blob_ref_sha ON blob_ref(sha256)",
        "CREATE INDEX blob_ref_expiry ON blob_ref(expires_at) WHERE expires_at IS NOT NULL",
        """CREATE TABLE app_password (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            public_id TEXT NOT NULL UNIQUE,
            label TEXT NOT NULL,
            secret_hash TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            last_used_at INTEGER)""",
    ):
        database.execute_sql(statement)


def _migration_3_email(database) -> None:
    for statement in (
        """CREATE TABLE thread (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            created_modseq INTEGER NOT NULL,
            updated_modseq INTEGER NOT NULL,
            destroyed INTEGER NOT NULL DEFAULT 0,
            destroyed_at INTEGER)""",
        "CREATE INDEX thread_changes ON thread(account_pk, updated_modseq)",
        """CREATE TABLE email (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            blob_sha256 TEXT NOT NULL,
            thread_pk INTEGER NOT NULL,
            size INTEGER NOT NULL,
            received_at INTEGER NOT NULL,
            sent_at INTEGER,
            keywords TEXT NOT NULL DEFAULT '{}',
            unread INTEGER NOT NULL DEFAULT 1,
            summary TEXT NOT NULL DEFAULT '{}',
            created_modseq INTEGER NOT NULL,
            updated_modseq INTEGER NOT NULL,
            destroyed INTEGER NOT NULL DEFAULT 0,
            destroyed_at INTEGER)""",
        "CREATE INDEX email_changes ON email(account_pk, updated_modseq)",
        "CREATE INDEX email_thread ON email(thread_pk)",
        "CREATE INDEX email_received ON email(account_pk, received_at) WHERE destroyed = 0",
        """CREATE TABLE email_mailbox (
            mailbox_pk INTEGER NOT NULL,
            email_pk INTEGER NOT NULL REFERENCES email(pk) ON DELETE CASCADE,
            PRIMARY KEY (mailbox_pk, email_pk)) WITHOUT ROWID""",
        "CREATE INDEX email_mailbox_email ON email_mailbox(email_pk)",
    ):
        database.execute_sql(statement)


def _migration_4_email_search(database) -> None:
    for statement in (
        "ALTER TABLE email ADD COLUMN message_id TEXT",
        "ALTER TABLE email ADD COLUMN subject_sort TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE email ADD COLUMN from_sort TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE email ADD COLUMN to_sort TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE email ADD COLUMN has_attachment INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE email_keyword (
            keyword TEXT NOT NULL,
            email_pk INTEGER NOT NULL REFERENCES email(pk) ON DELETE CASCADE,
            thread_pk INTEGER NOT NULL,
            PRIMARY KEY (keyword, email_pk)) WITHOUT ROWID""",
        "CREATE INDEX email_keyword_thread ON email_keyword(thread_pk, keyword)",
        "CREATE INDEX email_keyword_email ON email_keyword(email_pk)",
        """CREATE TABLE email_msgid (
            account_pk INTEGER NOT NULL,
            msgid TEXT NOT NULL,
            email_pk INTEGER NOT NULL REFERENCES email(pk) ON DELETE CASCADE,
            own INTEGER NOT NULL,
            PRIMARY KEY (account_pk, msgid, email_pk)) WITHOUT ROWID""",
        "CREATE INDEX email_msgid_email ON email_msgid(email_pk)",
        """CREATE VIRTUAL TABLE email_fts USING fts5(
            subject, from_, to_, cc_, bcc_, body,
            content='', tokenize='unicode61 remove_diacritics 2')""",
        "CREATE INDEX email_mailbox_sorted ON email(account_pk, received_at DESC, pk) "
        "WHERE destroyed = 0",
    ):
        database.execute_sql(statement)


def _migration_5_aliases(database) -> None:
    database.execute_sql(
        """CREATE TABLE alias (
            address TEXT PRIMARY KEY,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE
        ) WITHOUT ROWID""")


def _migration_6_sharing_identities_vacation(database) -> None:
    jmap_columns = """created_modseq INTEGER NOT NULL,
            updated_modseq INTEGER NOT NULL,
            destroyed INTEGER NOT NULL DEFAULT 0,
            destroyed_at INTEGER"""
    for statement in (
        """CREATE TABLE account_share (
            owner_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            grantee_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            read_only INTEGER NOT NULL,
            PRIMARY KEY (owner_pk, grantee_pk)) WITHOUT ROWID""",
        "CREATE INDEX account_share_grantee ON account_share(grantee_pk)",
        f"""CREATE TABLE identity (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            name TEXT NOT NULL DEFAULT '',
            email TEXT NOT NULL,
            reply_to TEXT,
            bcc TEXT,
            text_signature TEXT NOT NULL DEFAULT '',
            html_signature TEXT NOT NULL DEFAULT '',
            may_delete INTEGER NOT NULL DEFAULT 1,
            {jmap_columns})""",
        "CREATE INDEX identity_changes ON identity(account_pk, updated_modseq)",
        f"""CREATE TABLE vacation_response (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL UNIQUE REFERENCES account(pk) ON DELETE CASCADE,
            is_enabled INTEGER NOT NULL DEFAULT 0,
            from_date INTEGER,
            to_date INTEGER,
            subject TEXT,
            text_body TEXT,
            html_body TEXT,
            {jmap_columns})""",
        # Existing accounts get their default Identity and VacationResponse as if they
        # had always had them (modseq 0: older than any state a client holds).
        "INSERT INTO identity (account_pk, email, may_delete, created_modseq, updated_modseq) "
        "SELECT pk, username, 0, 0, 0 FROM account",
        "INSERT INTO vacation_response (account_pk, created_modseq, updated_modseq) "
        "SELECT pk, 0, 0 FROM account",
    ):
        database.execute_sql(statement)


def _migration_7_submission(database) -> None:
    for statement in (
        """CREATE TABLE email_submission (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            identity_pk INTEGER NOT NULL,
            email_pk INTEGER NOT NULL,
            thread_pk INTEGER NOT NULL,
            envelope TEXT NOT NULL,
            send_at INTEGER NOT NULL,
            undo_status TEXT NOT NULL DEFAULT 'pending',
            delivery_status TEXT,
            dsn_blob_ids TEXT NOT NULL DEFAULT '[]',
            mdn_blob_ids TEXT NOT NULL DEFAULT '[]',
            message_id TEXT,
            created_modseq INTEGER NOT NULL,
            updated_modseq INTEGER NOT NULL,
            destroyed INTEGER NOT NULL DEFAULT 0,
            destroyed_at INTEGER)""",
        "CREATE INDEX email_submission_changes ON email_submission(account_pk, updated_modseq)",
        "CREATE INDEX email_submission_msgid ON email_submission(account_pk, message_id)",
        """CREATE TABLE outbox (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            submission_pk INTEGER,
            sha256 TEXT NOT NULL,
            mail_from TEXT NOT NULL,
            mail_params TEXT NOT NULL DEFAULT '{}',
            rcpts TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'queued',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at INTEGER NOT NULL,
            created_at INTEGER NOT NULL)""",
        "CREATE INDEX outbox_due ON outbox(state, next_attempt_at)",
        """CREATE TABLE vacation_sent (
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            sender TEXT NOT NULL,
            sent_at INTEGER NOT NULL,
            PRIMARY KEY (account_pk, sender)) WITHOUT ROWID""",
    ):
        database.execute_sql(statement)


def _migration_8_push_subscriptions(database) -> None:
    database.execute_sql(
        """CREATE TABLE push_subscription (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            credential TEXT NOT NULL DEFAULT '',
            device_client_id TEXT NOT NULL,
            url TEXT NOT NULL,
            keys TEXT,
            verification_code TEXT,
            expected_code TEXT NOT NULL DEFAULT '',
            verification_sent INTEGER NOT NULL DEFAULT 0,
            expires INTEGER,
            types TEXT,
            failures INTEGER NOT NULL DEFAULT 0,
            failing_since INTEGER,
            next_attempt_at INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL DEFAULT 0,
            created_modseq INTEGER NOT NULL,
            updated_modseq INTEGER NOT NULL,
            destroyed INTEGER NOT NULL DEFAULT 0,
            destroyed_at INTEGER)""")
    database.execute_sql("CREATE INDEX push_subscription_user ON push_subscription"
                         "(account_pk, credential)")


def _migration_9_push_state(database) -> None:
    database.execute_sql("ALTER TABLE push_subscription ADD COLUMN pushed_state TEXT")


def _migration_10_search_version_login_addresses(database) -> None:
    # Mail indexed before: version 1 (an older text extraction; see SEARCH_VERSION).
    database.execute_sql("ALTER TABLE email ADD COLUMN search_version INTEGER NOT NULL "
                         "DEFAULT 1")
    database.execute_sql(  # where each user logged in from (LoginLimiter.known)
        """CREATE TABLE login_address (
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE,
            address TEXT NOT NULL,
            last_at INTEGER NOT NULL,
            PRIMARY KEY (account_pk, address)) WITHOUT ROWID""")


def _migration_11_id_scheme(database) -> None:
    # Ids were the row keys, counted across all accounts, so a user could tell from two of
    # their own ids how much others had stored meanwhile. New rows get ids that say
    # nothing (IdScheme); rows made before keep the ids clients already hold.
    database.execute_sql("CREATE TABLE server_secret (name TEXT PRIMARY KEY, value BLOB "
                         "NOT NULL) WITHOUT ROWID")
    database.execute_sql("INSERT INTO server_secret VALUES ('ids', randomblob(32))")
    database.execute_sql("CREATE TABLE id_scheme (table_name TEXT PRIMARY KEY, first_new_pk "
                         "INTEGER NOT NULL) WITHOUT ROWID")
    for table in ("mailbox", "thread", "email", "identity", "vacation_response",
                  "email_submission", "push_subscription"):
        database.execute_sql(f"INSERT INTO id_scheme SELECT '{table}', COALESCE(MAX(pk), 0) + 1 "
                             f"FROM {table}")


def _migration_12_blob_data(database) -> None:
    # Small delivered messages are kept here, written by the commit that stores their
    # Email: one sync makes both durable (blob files cost three syncs each).
    database.execute_sql("CREATE TABLE blob_data (sha256 TEXT PRIMARY KEY REFERENCES "
                         "blob(sha256) ON DELETE CASCADE, data BLOB NOT NULL)")


MIGRATIONS = [
    (1, "initial", _migration_1_initial),
    (2, "blobs and app passwords", _migration_2_blobs_and_app_passwords),
    (3, "email and thread", _migration_3_email),
    (4, "email search", _migration_4_email_search),
    (5, "aliases", _migration_5_aliases),
    (6, "sharing, identities, vacation response", _migration_6_sharing_identities_vacation),
    (7, "submission queue", _migration_7_submission),
    (8, "push subscriptions", _migration_8_push_subscriptions),
    (9, "push subscription state", _migration_9_push_state),
    (10, "search extraction version, login addresses",
     _migration_10_search_version_login_addresses),
    (11, "ids that do not count", _migration_11_id_scheme),
    (12, "small blobs in the database", _migration_12_blob_data),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]  # of the types built in; see schema_version()


def register_migration(version: int, name: str, migrate: Callable) -> None:
    """Add a migration (a type declared outside this file brings its table this way),
    before any database is opened; versions only grow."""
    assert version > MIGRATIONS[-1][0], version
    MIGRATIONS.append((version, name, migrate))


def schema_version() -> int:
    """The schema this process brings its databases to."""
    return MIGRATIONS[-1][0]


def db_object_table(database, table: str, columns: dict, *, document: bool = False,
                    search: tuple = ()) -> None:
    """Make the table of a JMAP type in a migration: its own `columns` {name: SQL type}
    plus what the machine needs — the account, the change-log columns (created_modseq,
    updated_modseq, destroyed, destroyed_at), the JSON document of a document type —
    the change index, and an FTS5 table for the `search` columns. What this makes for a
    given call never changes: migrations that used it are never edited."""
    own = "".join(f",\n            {name} {sql}" for name, sql in columns.items())
    database.execute_sql(f"""CREATE TABLE {table} (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            account_pk INTEGER NOT NULL REFERENCES account(pk) ON DELETE CASCADE{own},
            {"doc TEXT NOT NULL," if document else ""}
            created_modseq INTEGER NOT NULL,
            updated_modseq INTEGER NOT NULL,
            destroyed INTEGER NOT NULL DEFAULT 0,
            destroyed_at INTEGER)""")
    database.execute_sql(f"CREATE INDEX {table}_changes ON {table}(account_pk, updated_modseq)")
    if search:
        database.execute_sql(f"CREATE VIRTUAL TABLE {table}_fts USING fts5("
                             f"{', '.join(search)}, tokenize='unicode61 remove_diacritics 2')")


def db_schema_version(database) -> int:
    """Return the schema version recorded in the database (0 for an empty one)."""
    database.execute_sql(
        "CREATE TABLE IF NOT EXISTS schema_version "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    row = database.execute_sql("SELECT MAX(version) FROM schema_version").fetchone()
    return row[0] or 0


def db_migrate(database) -> None:
    """Apply every migration newer than the database, each in its own transaction."""
    with database.atomic("IMMEDIATE"):
        current = db_schema_version(database)
    if current > schema_version():
        raise ConfigError(
            f"database schema {current} is newer than this jmapd ({schema_version()}); "
            "upgrade jmapd"
        )
    for version, name, migrate in MIGRATIONS:
        if version <= current:
            continue
        with database.atomic("IMMEDIATE"):
            if db_schema_version(database) >= version:
                continue  # another process migrated meanwhile
            migrate(database)
            database.execute_sql(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, int(time.time())),
            )
        log.debug("database migrated to schema %d (%s)", version, name)
    if current < schema_version():
        log.info("new database (schema %d)" if current == 0 else
                 f"database upgraded from schema {current} to %d", schema_version())
    database.jmapd_ids = IdScheme.load(database)


# =============================================================================
# 4.4 BLOB STORE
#     Content-addressed files blobs/ab/<sha256>, written temp -> fsync -> rename ->
#     fsync the directory before any row refers to them. A BlobRef says which account
#     may see a blob; download checks it, never a bare blobId (RFC 8620 §6).
# =============================================================================

BLOB_ID_PREFIX = "B"
INLINE_BLOB_MAX = 256 * 1024  # delivered messages this small live in the database
BLOB_COPY_CHUNK = 256 * 1024
UPLOAD_TTL_SECONDS = 24 * 3600  # RFC 8620 §6: an unreferenced upload lives at least 1 hour
ORPHAN_GRACE_SECONDS = 3600


class BlobTooLarge(Exception):
    """More octets arrived than the limit allows."""


def blob_id(sha256: str) -> str:
    return BLOB_ID_PREFIX + sha256


def blob_sha_from_id(raw_blob_id) -> str | None:
    """Return the hash a blobId names, or None if it is not one of ours."""
    if not isinstance(raw_blob_id, str) or not raw_blob_id.startswith(BLOB_ID_PREFIX):
        return None
    sha = raw_blob_id[len(BLOB_ID_PREFIX) :]
    return sha if re.fullmatch(r"[0-9a-f]{64}", sha) else None


def blob_path(data_dir: str, sha256: str) -> str:
    return os.path.join(data_dir, "blobs", sha256[:2], sha256)


def blob_tmp_dir(data_dir: str) -> str:
    """The spool directory: on the data disk, never a RAM /tmp."""
    path = os.path.join(data_dir, "tmp")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blob_store_stream(data_dir: str, source, max_bytes: int) -> tuple[str, int]:
    """Copy a stream into the blob store; return (sha256, size). Raise BlobTooLarge."""
    digest, size = hashlib.sha256(), 0
    fd, tmp = _blob_tempfile(data_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = source.read(BLOB_COPY_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise BlobTooLarge(f"more than {max_bytes} octets")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        _blob_install(data_dir, tmp, sha)
        return sha, size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def blob_store_bytes(data_dir: str, data: bytes) -> tuple[str, int]:
    """Store bytes held in memory (small blobs: messages, generated parts)."""
    return blob_store_many(data_dir, [data])[0]


def blob_store_many(data_dir: str, datas: list[bytes]) -> list[tuple[str, int]]:
    """Store several in-memory blobs durably before returning.

    One blob is fsynced on its own. A batch writes every temp file, makes them all
    durable with one os.sync(), and only then renames them into place: a final path
    never holds octets that are not yet on disk, at two syncs per batch instead of
    two fsyncs per blob.
    """
    stored, pending = [], []
    for data in datas:
        sha = hashlib.sha256(data).hexdigest()
        stored.append((sha, len(data)))
        final = blob_path(data_dir, sha)
        if os.path.exists(final):
            os.utime(final)  # fresh again: the orphan purge spares recent files
            continue
        if any(sha == other for other, _ in pending):
            continue
        fd, tmp = _blob_tempfile(data_dir)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if len(datas) == 1:
                out.flush()
                os.fsync(out.fileno())
        pending.append((sha, tmp))
    try:
        if len(datas) > 1 and pending:
            os.sync()  # every temp file's octets on disk
        folders = set()
        for sha, tmp in pending:
            folders.add(_blob_folder(data_dir, sha))
            os.replace(tmp, blob_path(data_dir, sha))
        if len(datas) > 1 and pending:
            os.sync()  # the renames on disk too
        else:
            for folder in folders:
                _fsync_dir(folder)
    finally:
        for _, tmp in pending:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return stored


def _blob_tempfile(data_dir: str) -> tuple[int, str]:
    path = os.path.join(blob_tmp_dir(data_dir), f"blob-{secrets.token_hex(8)}")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), path


def _blob_install(data_dir: str, tmp: str, sha: str) -> None:
    final = blob_path(data_dir, sha)
    if os.path.exists(final):
        os.utime(final)  # same content already stored: content addressing dedupes
        return
    folder = _blob_folder(data_dir, sha)
    os.replace(tmp, final)
    _fsync_dir(folder)


def _blob_folder(data_dir: str, sha: str) -> str:
    """The blob's directory, made (and its parent fsynced) if it is new."""
    folder = os.path.dirname(blob_path(data_dir, sha))
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o750, exist_ok=True)
        _fsync_dir(os.path.dirname(folder))
    return folder


def blob_add_ref(account_pk: int, sha256: str, size: int, kind: str, now: float,
                 owner_pk: int | None = None, expires_at: float | None = None) -> None:
    """Record that an account may see a stored blob (call inside a transaction)."""
    db.execute_sql("INSERT OR IGNORE INTO blob (sha256, size, created_at) VALUES (?, ?, ?)",
                   (sha256, size, int(now)))
    db.execute_sql(
        "INSERT INTO blob_ref (account_pk, sha256, kind, owner_pk, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (account_pk, sha256, kind, owner_pk, int(now),
         None if expires_at is None else int(expires_at)))


def blob_visible(account_pk: int, sha256: str, now: float, user_pk: int) -> Blob | None:
    """Return the blob if the account holds a live reference to it for this user.

    RFC 8620 §6.1: an upload nothing refers to yet is visible only to its uploader.
    """
    live_ref = BlobRef.select().where(
        (BlobRef.account_pk == account_pk)
        & (BlobRef.sha256 == sha256)
        & (BlobRef.expires_at.is_null() | (BlobRef.expires_at > int(now)))
        & ((BlobRef.kind != "upload") | (BlobRef.owner_pk == user_pk))
    )
    if not live_ref.exists():
        return None
    return Blob.get_or_none(Blob.sha256 == sha256)


def blob_store_inline(sha256: str, data: bytes) -> None:
    """Keep a small blob in the database, in the caller's transaction: its commit makes
    it durable, with no file, file sync or directory sync of its own (a delivery costs
    one sync). The blob row itself comes from blob_add_ref()."""
    db.execute_sql("INSERT OR IGNORE INTO blob_data (sha256, data) VALUES (?, ?)",
                   (sha256, data))


def blob_files_needed(raws: list, facts: list) -> list:
    """The octets of the messages that are not kept inline: those need blob files."""
    return [raw for raw, fact in zip(raws, facts) if fact.inline is None]


def blob_open(data_dir: str, sha256: str):
    """The blob's octets as a binary file: from the database if kept inline, else its file."""
    row = db.execute_sql("SELECT data FROM blob_data WHERE sha256 = ?", (sha256,)).fetchone()
    if row is not None:
        return io.BytesIO(row[0])
    return open(blob_path(data_dir, sha256), "rb")


def blob_is_inline(sha256: str) -> bool:
    return db.execute_sql("SELECT 1 FROM blob_data WHERE sha256 = ?",
                          (sha256,)).fetchone() is not None


def blob_purge(data_dir: str, now: float) -> tuple[int, int]:
    """Drop expired upload references, then blobs nothing refers to (after a grace time)."""
    with db.atomic("IMMEDIATE"):
        refs = BlobRef.delete().where(BlobRef.expires_at <= int(now)).execute()
        orphans = [
            sha for (sha,) in Blob.select(Blob.sha256)
            .where((Blob.created_at < int(now - ORPHAN_GRACE_SECONDS))
                   & ~peewee.fn.EXISTS(BlobRef.select().where(BlobRef.sha256 == Blob.sha256)))
            .tuples()
        ]
        Blob.delete().where(Blob.sha256.in_(orphans)).execute()  # inline data: cascaded
    for sha in orphans:
        path = blob_path(data_dir, sha)
        try:
            if os.stat(path).st_mtime < time.time() - ORPHAN_GRACE_SECONDS:
                os.unlink(path)  # a file stored again meanwhile has a fresh mtime: kept
        except FileNotFoundError:
            pass
    return refs, len(orphans)


# =============================================================================
# 4.5 CHANGE LOG AND STATE
#     One modseq counter per account. record_change() stamps a row and the type's
#     state; ChangeLog.flush() writes the counter back inside the same transaction.
#     Tombstones older than the horizon are purged and raise purged_below.
# =============================================================================


class ChangeLog:
    """Allocate modseqs for one account within one write transaction."""

    def __init__(self, account_pk: int, now: float):
        self.account_pk = account_pk
        self.now = now
        self.modseq: int | None = None
        self.touched: dict[str, int] = {}

    def next(self, type_name: str) -> int:
        if self.modseq is None:  # plain SQL here and below: every delivery passes through
            self.modseq = db.execute_sql("SELECT modseq FROM account WHERE pk = ?",
                                         (self.account_pk,)).fetchone()[0]
        self.modseq += 1
        self.touched[type_name] = self.modseq
        return self.modseq

    def mark(self) -> tuple:
        """Where the log stands, to go back to when a savepoint is rolled back."""
        return self.modseq, dict(self.touched)

    def rollback(self, mark: tuple) -> None:
        """Forget what was allocated since mark(): its rows were rolled back, so a state
        must not move for them (nor a push fire)."""
        self.modseq, self.touched = mark[0], mark[1]

    def flush(self) -> None:
        """Write the counter and each touched type's state (call inside the transaction)."""
        if not self.touched:
            return
        db.execute_sql("UPDATE account SET modseq = ? WHERE pk = ?",
                       (self.modseq, self.account_pk))
        db.cursor().executemany(
            "INSERT INTO type_state (account_pk, type_name, modseq) VALUES (?, ?, ?) "
            "ON CONFLICT (account_pk, type_name) DO UPDATE SET modseq = excluded.modseq",
            [(self.account_pk, t, m) for t, m in self.touched.items()])
        self.touched = {}


CHANGE_KINDS = ("created", "updated", "destroyed", "counts")


def record_change(changes: ChangeLog, type_name: str, row: JmapRow, kind: str) -> None:
    """Stamp a row with a new modseq for a JMAP-visible change and save it."""
    assert kind in CHANGE_KINDS, kind
    modseq = changes.next(type_name)
    if kind == "created":
        row.created_modseq = row.updated_modseq = modseq
    elif kind == "updated":
        row.updated_modseq = modseq
    elif kind == "destroyed":
        row.updated_modseq = modseq
        row.destroyed = True
        row.destroyed_at = int(changes.now)
    else:
        row.counts_modseq = modseq
    row.save()


def record_new(changes: ChangeLog, type_name: str, model, **columns) -> int:
    """Insert a new object row stamped as created; return its key.

    The hot-path twin of record_change(row, "created") for mail delivery: one plain
    INSERT, without building the statement through peewee's query classes.
    """
    modseq = changes.next(type_name)
    columns.update(account_pk=changes.account_pk, created_modseq=modseq, updated_modseq=modseq)
    names = ", ".join(columns)
    marks = ", ".join("?" * len(columns))
    cursor = db.execute_sql(f"INSERT INTO {model._meta.table_name} ({names}) VALUES ({marks})",
                            list(columns.values()))
    return cursor.lastrowid


def type_state_row(account_pk: int, type_name: str) -> TypeState:
    """Return the stored state of a type (an unsaved zero row if it never changed)."""
    found = db.execute_sql(  # plain SQL: every method call asks, several times
        "SELECT modseq, purged_below FROM type_state WHERE account_pk = ? AND type_name = ?",
        (account_pk, type_name)).fetchone()
    modseq, purged_below = found or (0, 0)
    return TypeState(account_pk=account_pk, type_name=type_name, modseq=modseq,
                     purged_below=purged_below)


def state_string(modseq: int) -> str:
    return str(modseq)


def parse_state(raw_state) -> int | None:
    """Return the modseq a state string names, or None if it is not one of ours."""
    if not isinstance(raw_state, str) or not re.fullmatch(r"0|[1-9][0-9]{0,17}", raw_state):
        return None
    return int(raw_state)


def db_purge_tombstones(models: dict, horizon_days: int, now: float) -> int:
    """Delete tombstones older than the horizon; raise purged_below so /changes knows."""
    cutoff = int(now - horizon_days * 86400)
    purged = 0
    for type_name, model in models.items():
        with db.atomic("IMMEDIATE"):
            old = (
                model.select(model.account_pk, peewee.fn.MAX(model.updated_modseq).alias("top"))
                .where(model.destroyed & (model.destroyed_at < cutoff))
                .group_by(model.account_pk)
            )
            for row in old:
                state = type_state_row(row.account_pk, type_name)
                TypeState.insert(
                    account_pk=row.account_pk,
                    type_name=type_name,
                    modseq=state.modseq,
                    purged_below=max(state.purged_below, row.top),
                ).on_conflict_replace().execute()
            purged += model.delete().where(model.destroyed & (model.destroyed_at < cutoff)).execute()
    return purged


# =============================================================================
# 5 AUTH AND THE SESSION RESOURCE
#   argon2id password hashes with pinned parameters; HTTP Basic. A verified
#   credential is remembered briefly under a keyed hash of it (never the credential
#   itself) and only while the stored hash is unchanged. Session: RFC 8620 §2.
# =============================================================================

ARGON2_PI = (3, 65536, 1)  # time cost, memory KiB (64 MiB), lanes: ~100 ms on a Pi 4
ARGON2_CHEAP = (1, 8, 1)  # --test-cheap-hashing only
USERNAME_RE = re.compile(r"^[^@\s\"(),:;<>\[\\\]]{1,64}@[A-Za-z0-9.-]{1,253}\Z")


def auth_normalise_username(raw_username: str) -> str:
    """Check that a username is an e-mail address and return it lower-cased."""
    username = raw_username.strip().lower()
    if not USERNAME_RE.match(username) or ".." in username.split("@")[1]:
        raise ValueError(f"{raw_username!r} is not an e-mail address")
    return username


TOKEN_RE = re.compile(r"^([A-Za-z0-9_-]{8,32})\.([A-Za-z0-9_-]{16,128})\Z")  # <id>.<secret>
LOGIN_WINDOW_SECONDS = 900


class TooManyFailures(Exception):
    """Too many failed logins from this address or for this user; try later."""

    def __init__(self, retry_after: int):
        super().__init__("too many failed logins")
        self.retry_after = retry_after


@functools.lru_cache(maxsize=4096)
def client_address_key(address: str) -> str:
    """The unit per-address limits count: an IPv4 address, or an IPv6 address's /64
    (one host or home network gets a /64, so counting single addresses counts nothing)."""
    import ipaddress  # lazy: only limits need it

    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address  # "local" (the Unix socket) and the like
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginLimiter:
    """Slow password guessing down without letting a stranger lock the owner out.

    Failures count per client address (IPv6: per /64) and per username over a sliding
    window. An address over its limit is refused outright. A user over its limit (some
    one is guessing) stays reachable from the addresses that logged in as them lately
    (`known`: the owner's devices), where a wrong password is then answered 429; any
    other address gets NEW_ADDRESS_GUESSES an hour. Counters beyond LIMITER_MAX_KEYS go
    fewest failures first, never all at once, so a flood of new keys cannot wipe the
    count of an address or user under attack."""

    GUESS_WINDOW_SECONDS = 3600

    def __init__(self, per_address: int, per_user: int, known: Callable | None = None):
        self.limits = {"address": per_address, "user": per_user}
        self.known = known or (lambda username, address: False)
        self.failures: dict[tuple, list[float]] = {}
        self.failures_lock = threading.Lock()

    def check(self, address: str, username: str | None) -> bool:
        """Raise TooManyFailures, or return whether a failure now must be answered 429
        (the user is over its limit and this address is one of theirs)."""
        now = time.monotonic()
        where = ("address", client_address_key(address))
        with self.failures_lock:
            self._refuse_if_over(self._recent(where, now), self.limits["address"], now)
            if not username or len(self._recent(("user", username), now)) < self.limits["user"]:
                return False
        if self.known(username, address):  # a database read: outside the lock
            return True
        guesses_key = ("guess", username, where[1])
        with self.failures_lock:
            guesses = self._recent(guesses_key, now, self.GUESS_WINDOW_SECONDS)
            self._refuse_if_over(guesses, NEW_ADDRESS_GUESSES, now, self.GUESS_WINDOW_SECONDS)
            self.failures[guesses_key] = guesses + [now]
        return False

    def fail(self, address: str, username: str | None) -> None:
        now = time.monotonic()
        with self.failures_lock:
            keys = [("address", client_address_key(address))]
            keys += [("user", username)] if username else []
            for key in keys:
                self.failures[key] = self._recent(key, now) + [now]
            if len(self.failures) > LIMITER_MAX_KEYS:
                self._evict(now)

    def _recent(self, key, now, window=LOGIN_WINDOW_SECONDS) -> list[float]:
        return [t for t in self.failures.get(key, ()) if t > now - window]

    @staticmethod
    def _refuse_if_over(recent: list, limit: int, now: float,
                        window=LOGIN_WINDOW_SECONDS) -> None:
        if len(recent) >= limit:
            raise TooManyFailures(int(recent[0] + window - now) + 1)

    def _evict(self, now: float) -> None:
        """Forget what has expired, then the counters with the fewest failures, down to
        nine tenths of the bound (so this runs once per many failures, not each one)."""
        live = {}
        for key, times in self.failures.items():
            window = self.GUESS_WINDOW_SECONDS if key[0] == "guess" else LOGIN_WINDOW_SECONDS
            recent = [t for t in times if t > now - window]
            if recent:
                live[key] = recent
        keep = LIMITER_MAX_KEYS * 9 // 10
        if len(live) > keep:
            ranked = sorted(live, key=lambda k: (len(live[k]), live[k][-1]), reverse=True)
            live = {key: live[key] for key in ranked[:keep]}
        self.failures = live


class Authenticator:
    """Verify passwords and app passwords, remembering successes briefly.

    The cache key is an HMAC of the credentials under a per-process key; a hit still
    checks that the stored hash is unchanged, so `user passwd` and `user token revoke`
    (even from another process) take effect at once. Refusals are logged in one fixed
    format (README: fail2ban), at most LOG_PER_MINUTE lines a minute.
    """

    LOG_PER_MINUTE = 30
    BACKGROUND_CHECKS = 4

    def __init__(self, cheap: bool, clock: Clock, limiter: LoginLimiter | None = None):
        self.hasher = argon2_hasher(*(ARGON2_CHEAP if cheap else ARGON2_PI))
        self.clock = clock
        self.limiter = limiter or LoginLimiter(10**9, 10**9)
        self.cache_key = secrets.token_bytes(32)
        self.cache: dict[bytes, tuple[int, int | None, str, float]] = {}
        self.cache_lock = threading.Lock()
        # Each check takes 64 MiB: a burst of logins waits its turn instead of taking
        # the memory of a Pi (HTTP workers and WebSocket handshakes share this).
        self.verify_slots = threading.BoundedSemaphore(ARGON2_PARALLEL_CHECKS)
        self.verified: dict[bytes, float] = {}  # credentials that got in lately (listener)
        self.remembered: dict[tuple, float] = {}  # (account, address) last written
        self.background = 0
        self.log_window = [0.0, 0, 0]  # minute start, lines logged, lines left out

    @functools.cached_property
    def dummy_hash(self) -> str:
        """A hash to verify against when the user is unknown, so timing tells nothing."""
        return self.hasher.hash(secrets.token_hex(16))

    def hash_password(self, password: str) -> str:
        return self.hasher.hash(password)

    def check_header(self, header: str, address: str) -> Account | None:
        """Return the account an Authorization header proves, or None (Basic or Bearer)."""
        pair = auth_credentials(header)
        if pair is None:
            if header:
                self.log_refusal(address, None, "malformed credentials")
            return None
        return self.check_credentials(pair[0], pair[1], address)

    def check_credentials(self, username: str | None, secret: str, address: str):
        """Verify a username and password or app password (username None: a Bearer token)."""
        key = self._key(username, secret)
        # The limiter comes first: else, once over the limit, a guess that matches a
        # cached credential (200) could still be told from one that does not (429).
        try:
            strict = self.limiter.check(address, username)
        except TooManyFailures:
            self.log_refusal(address, username, "too many failed logins", refused=True)
            raise
        account = self._cached(key)
        if account is None:
            account = self._verify_and_cache(key, username, secret)
        if account is None:
            self.limiter.fail(address, username)
            self.log_refusal(address, username, "wrong password or unknown user")
            if strict:  # the user is being guessed at: a wrong password waits too
                raise TooManyFailures(LOGIN_WINDOW_SECONDS)
            return None
        with self.cache_lock:
            self.verified.pop(key, None)
            self.verified[key] = time.monotonic()
            if len(self.verified) > 10_000:
                del self.verified[next(iter(self.verified))]
        self.remember_address(account, address)
        return account

    def recently_verified(self, header: str) -> bool:
        """Whether these credentials got in within KNOWN_ADDRESS_DAYS (cheap: no hashing,
        no database; the listener asks before it spools a body)."""
        pair = auth_credentials(header)
        if pair is None:
            return False
        with self.cache_lock:
            when = self.verified.get(self._key(*pair))
        return when is not None and time.monotonic() - when < KNOWN_ADDRESS_DAYS * 86400

    def verify_later(self, header: str, address: str) -> None:
        """Check credentials in the background (a request was refused before its body
        was read), so that the client's next try is known; a few at a time at most."""
        with self.cache_lock:
            if self.background >= self.BACKGROUND_CHECKS:
                return
            self.background += 1

        def run():
            try:
                self.check_header(header, address)
            except (TooManyFailures, peewee.OperationalError):
                pass
            finally:
                with self.cache_lock:
                    self.background -= 1

        threading.Thread(target=run, daemon=True, name="auth-check").start()

    def remember_address(self, account: Account, address: str) -> None:
        """Record that the user logged in from this address (LoginLimiter.known); at most
        once a day per address, so logging in stays free of writes."""
        key = (account.pk, client_address_key(address))
        with self.cache_lock:
            last = self.remembered.get(key)
            if last is not None and time.monotonic() - last < 86400:
                return
            if len(self.remembered) > 10_000:
                self.remembered.clear()  # only a write throttle: nothing is forgotten
            self.remembered[key] = time.monotonic()
        try:
            db.execute_sql(
                "INSERT INTO login_address (account_pk, address, last_at) VALUES (?, ?, ?) "
                "ON CONFLICT (account_pk, address) DO UPDATE SET last_at = excluded.last_at",
                (account.pk, key[1], int(self.clock.now())))
        except peewee.OperationalError:
            with self.cache_lock:
                self.remembered.pop(key, None)  # busy: written next time

    def known_address(self, username: str, address: str) -> bool:
        """Whether the user logged in from this address within KNOWN_ADDRESS_DAYS."""
        row = db.execute_sql(
            "SELECT la.last_at FROM login_address la JOIN account a ON a.pk = la.account_pk "
            "WHERE a.username = ? AND la.address = ?",
            (username, client_address_key(address))).fetchone()
        return row is not None and self.clock.now() - row[0] < KNOWN_ADDRESS_DAYS * 86400

    def log_refusal(self, address: str, username: str | None, reason: str,
                    refused: bool = False) -> None:
        """One line per refused login, in the format the README's fail2ban filter reads;
        beyond LOG_PER_MINUTE a minute, a count of the lines left out instead."""
        now = time.monotonic()
        with self.cache_lock:
            start, logged, left_out = self.log_window
            if now - start >= 60:
                self.log_window = [now, 0, 0]
                if left_out:
                    log.getChild("auth").warning("%d more refused logins were not logged",
                                                 left_out)
            if self.log_window[1] >= self.LOG_PER_MINUTE:
                self.log_window[2] += 1
                return
            self.log_window[1] += 1
        who = repr(username) if username else "an app password"
        log.getChild("auth").warning("login %s from %s for %s: %s",
                                     "refused" if refused else "failed", address, who, reason)

    def _key(self, username: str | None, secret: str) -> bytes:
        return hmac.new(self.cache_key, f"{username}\0{secret}".encode(), "sha256").digest()

    def _verify_and_cache(self, key: bytes, username, secret) -> Account | None:
        found = self._verify_uncached(username, secret)
        if found is None:
            return None
        account, token_pk, stored_hash = found
        with self.cache_lock:
            if len(self.cache) > 10_000:
                self.cache.clear()
            self.cache[key] = (account.pk, token_pk, stored_hash,
                               time.monotonic() + AUTH_CACHE_SECONDS)
        account.credential = "password" if token_pk is None else f"token:{token_pk}"
        return account

    def _cached(self, key: bytes) -> Account | None:
        with self.cache_lock:
            cached = self.cache.get(key)
        if not cached or cached[3] < time.monotonic():
            return None
        account_pk, token_pk, stored_hash, _ = cached
        # plain SQL: every request that was authenticated lately passes here
        found = db.execute_sql(
            "SELECT username, password_hash, created_at, modseq FROM account WHERE pk = ?",
            (account_pk,)).fetchone()
        if found is None:
            return None
        if token_pk is not None:
            token = db.execute_sql("SELECT secret_hash FROM app_password WHERE pk = ? AND "
                                   "account_pk = ?", (token_pk, account_pk)).fetchone()
            if token is None or token[0] != stored_hash:
                return None
        elif found[1] != stored_hash:
            return None
        account = Account(pk=account_pk, username=found[0], password_hash=found[1],
                          created_at=found[2], modseq=found[3])
        account.credential = "password" if token_pk is None else f"token:{token_pk}"
        return account

    def _verify_uncached(self, username, secret):
        """Return (account, app password pk or None, the hash checked) or None."""
        match = TOKEN_RE.match(secret)
        token = AppPassword.get_or_none(AppPassword.public_id == match.group(1)) if match else None
        if token is not None:
            account = Account.get_or_none(Account.pk == token.account_pk)
            if username is not None and (account is None or account.username != username):
                self._verify(self.dummy_hash, secret)
                return None
            if not self._verify(token.secret_hash, match.group(2)):
                return None
            AppPassword.update(last_used_at=int(self.clock.now())).where(
                AppPassword.pk == token.pk).execute()
            return account, token.pk, token.secret_hash
        if username is None:  # a Bearer token that names no app password
            self._verify(self.dummy_hash, secret)
            return None
        account = Account.get_or_none(Account.username == username)
        if not self._verify(account.password_hash if account else self.dummy_hash, secret):
            return None
        return (account, None, account.password_hash) if account else None

    def _verify(self, stored_hash: str, password: str) -> bool:
        try:
            with self.verify_slots:
                return self.hasher.verify(stored_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHash):
            return False


def auth_credentials(header: str) -> tuple[str | None, str] | None:
    """(username or None, secret) from an Authorization header: Basic user:password
    (the username folded to lower case) or Bearer token; None if it is neither."""
    scheme, _, credentials = (header or "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return (None, credentials) if credentials else None
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.encode("ascii"), validate=True).decode("utf-8")
    except (ValueError, UnicodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username.strip().lower(), password) if sep else None


def auth_still_valid(account: Account) -> bool:
    """Whether the credential that authenticated `account` still stands: the user exists,
    and its password is unchanged or its app password not revoked (long-lived
    connections ask again; RFC 8887 §4.2)."""
    if account.credential and account.credential.startswith("token:"):
        return db.execute_sql("SELECT 1 FROM app_password WHERE pk = ? AND account_pk = ?",
                              (int(account.credential[6:]), account.pk)).fetchone() is not None
    row = db.execute_sql("SELECT password_hash FROM account WHERE pk = ?",
                         (account.pk,)).fetchone()
    return row is not None and row[0] == account.password_hash


def auth_token_create(auth: Authenticator, account: Account, label: str, now: float) -> str:
    """Create an app password for a device; return it (shown once, stored hashed)."""
    public_id = secrets.token_urlsafe(9).replace("-", "x").replace("_", "y")
    secret = secrets.token_urlsafe(24)
    AppPassword.create(account_pk=account.pk, public_id=public_id, label=label,
                       secret_hash=auth.hash_password(secret), created_at=int(now))
    return f"{public_id}.{secret}"


@dataclass(frozen=True)
class Capability:
    """A capability the server may advertise (RFC 8620 §2): its session-level object,
    its per-account object (None: not a capability accounts have), whether its account
    goes in primaryAccounts, and whether a configuration offers it at all."""

    uri: str
    session: Callable  # (app, base_url, forwarded) -> dict
    account: Callable | None = None  # (app, read_only) -> dict
    primary: bool = True
    offered: Callable = lambda cfg: True


CAPABILITIES: dict[str, Capability] = {}  # the one registry; each section adds its own


def register_capability(uri: str, session: Callable = lambda app, base, fwd: {},
                        account: Callable | None = None, primary: bool = True,
                        offered: Callable = lambda cfg: True) -> None:
    """Declare a capability (at import time, from the section that implements it)."""
    assert uri not in CAPABILITIES, uri
    CAPABILITIES[uri] = Capability(uri, session, account, primary, offered)


register_capability(CAP_CORE, lambda app, base, fwd: app.cfg.limits.as_capability(),
                    account=lambda app, read_only: {}, primary=False)


def session_account_capabilities(app, read_only: bool = False) -> dict:
    """The capabilities an account has, with their per-account values (RFC 8621 §1.3)."""
    return {uri: CAPABILITIES[uri].account(app, read_only) for uri in app.capabilities
            if CAPABILITIES[uri].account is not None}


def session_resource(app, user: Account, base_url: str, forwarded: bool = False) -> dict:
    """Build the JMAP Session object (RFC 8620 §2) for a user."""
    accounts = {
        account.id: {
            "name": account.username,
            "isPersonal": account.pk == user.pk,
            "isReadOnly": read_only,
            "accountCapabilities": session_account_capabilities(app, read_only),
        }
        for account, read_only in app.accessible_accounts(user).values()
    }
    offered = [CAPABILITIES[uri] for uri in app.capabilities]
    session = {
        "capabilities": {cap.uri: cap.session(app, base_url, forwarded) for cap in offered},
        "accounts": accounts,
        "primaryAccounts": {cap.uri: user.id for cap in offered
                            if cap.account is not None and cap.primary},
        "username": user.username,
        "apiUrl": f"{base_url}/jmap/api/",
        "downloadUrl": f"{base_url}/jmap/download/{{accountId}}/{{blobId}}/{{name}}?type={{type}}",
        "uploadUrl": f"{base_url}/jmap/upload/{{accountId}}/",
        "eventSourceUrl": (
            f"{base_url}/jmap/eventsource/?types={{types}}&closeafter={{closeafter}}&ping={{ping}}"
        ),
    }
    session["state"] = session_state(session)
    return session


def ws_url(app, base_url: str, forwarded: bool) -> str:
    """The WebSocket URL: through a proxy (--public-url, or a request a trusted proxy
    forwarded) the same origin, which the proxy maps onto our listener; asked directly,
    our own listener's port on the host the client used."""
    if app.cfg.public_url or forwarded or not base_url:
        scheme, _, rest = (app.cfg.public_url or base_url).partition("://")
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{WS_PATH}"
    host = urllib.parse.urlsplit(base_url).hostname or app.cfg.websocket[0]
    host = f"[{host}]" if ":" in host else host
    return f"ws://{host}:{app.ws_port}{WS_PATH}"


def session_state(session: dict) -> str:
    """Derive the session state from its content, so it changes whenever the session does.

    URLs are left out: they change only with the configuration (or the Host a client
    used), and an API response must be able to report the state without them.
    """
    content = {k: session[k] for k in ("capabilities", "accounts", "primaryAccounts", "username")}
    if CAP_WEBSOCKET in content["capabilities"]:
        content["capabilities"] = {**content["capabilities"], CAP_WEBSOCKET: "url left out"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return digest[:16]


# =============================================================================
# 6 JMAP CORE
# =============================================================================

# =============================================================================
# 6.1 ERRORS
#     RequestError -> RFC 7807 problem document (RFC 8620 §3.6.1); MethodError ->
#     ["error", {...}, callId] (§3.6.2); SetError -> one record's entry in
#     notCreated/notUpdated/notDestroyed (§5.3). Anything else is a bug: serverFail.
# =============================================================================


class RequestError(Exception):
    """A request-level problem (RFC 8620 §3.6.1), answered as RFC 7807 JSON."""

    def __init__(self, kind: str, detail: str, status: int = 400, limit: str | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.status, self.limit = kind, detail, status, limit

    def as_json(self) -> dict:
        body = {"type": PROBLEM_PREFIX + self.kind, "status": self.status, "detail": self.detail}
        if self.limit:
            body["limit"] = self.limit  # RFC 8620 §3.6.1: MUST name the limit
        return body


class MethodError(Exception):
    """A method-level error (RFC 8620 §3.6.2); extra members go into the error object."""

    def __init__(self, kind: str, description: str | None = None, **extra):
        super().__init__(description or kind)
        self.kind, self.description, self.extra = kind, description, extra

    def as_json(self) -> dict:
        body = {"type": self.kind}
        if self.description:
            body["description"] = self.description
        body.update(self.extra)
        return body


class SetError(MethodError):
    """One record of a /set, /copy or import failed (RFC 8620 §5.3)."""


def invalid_properties(names, description: str | None = None) -> SetError:
    return SetError("invalidProperties", description, properties=sorted(set(names)))


# =============================================================================
# 6.2 REQUEST ENGINE AND RESULT REFERENCES
#     engine_run() validates a Request (RFC 8620 §3.3), then for each call resolves
#     `#` references (§3.7), checks `using` and the account, and runs the handler in
#     one transaction. Handlers have one signature: handler(ctx, args) -> dict.
# =============================================================================


@dataclass(frozen=True)
class Method:
    name: str
    capability: str
    handler: Callable
    writes: bool
    takes_account: bool = True
    prepare: Callable | None = None  # (ctx, args): the analyse phase, outside any transaction


METHODS: dict[str, Method] = {}


def jmap_method(name: str, capability: str, writes: bool = False, takes_account: bool = True,
                prepare: Callable | None = None):
    """Register a method handler under its wire name. `prepare` runs before the
    method's transaction (parsing, blob files, anything slow) and leaves what it found
    in ctx.scratch for the handler, which then only writes rows."""

    def register(handler):
        assert name not in METHODS, name
        METHODS[name] = Method(name, capability, handler, writes, takes_account, prepare)
        return handler

    return register


@dataclass
class Call:
    """The context of one method call: who, which account, the request's shared state."""

    app: Any
    user: Account
    using: frozenset
    created_ids: dict
    method: str = ""
    call_id: str = ""
    account: Account | None = None
    read_only: bool = False
    changes: ChangeLog | None = None
    extra_responses: list = field(default_factory=list)
    sub_calls: list = field(default_factory=list)
    pending: dict = field(default_factory=dict)  # pk -> props a later update/destroy changes
    scratch: dict = field(default_factory=dict)  # what a method's prepare found, for its handler
    after_commit: list = field(default_factory=list)  # callables, run once the call committed

    @property
    def now(self) -> float:
        return self.app.clock.now()

    @property
    def limits(self) -> CoreLimits:
        return self.app.cfg.limits

    def for_account(self, account: Account, read_only: bool) -> "Call":
        """A context for a second account in the same call (e.g. /copy's from-account)."""
        sub = dataclasses.replace(self, account=account, read_only=read_only)
        sub.changes = ChangeLog(account.pk, self.now)
        sub.extra_responses = self.extra_responses
        self.sub_calls.append(sub)
        return sub

    def flush_changes(self) -> set:
        touched = set()
        for ctx in [self] + self.sub_calls:
            if ctx.changes and ctx.changes.touched:
                touched.add(ctx.changes.account_pk)
                ctx.changes.flush()
        return touched


def engine_parse_request(app, raw_body: bytes, content_type: str = "application/json") -> dict:
    """Parse and validate a Request object (RFC 8620 §3.3); raise RequestError."""
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError("notJSON", "The request must be of type application/json (RFC 8620 §3.1)")
    try:
        request = parse_ijson(raw_body)
    except NotIJson as exc:
        raise RequestError("notJSON", f"The request did not parse as I-JSON: {exc}") from exc
    problem = _request_shape_problem(request)
    if problem:
        raise RequestError("notRequest", f"The request is not a JMAP Request object: {problem}")
    unknown = [cap for cap in request["using"] if cap not in app.capabilities]
    if unknown:
        raise RequestError(
            "unknownCapability",
            f"The Request object used capability {unknown[0]!r}, "
            "which is not supported by this server.",
        )
    if len(request["methodCalls"]) > app.cfg.max_calls_in_request:
        raise RequestError(
            "limit",
            f"The request has more than {app.cfg.max_calls_in_request} method calls.",
            limit="maxCallsInRequest",
        )
    return request


def _request_shape_problem(request) -> str | None:
    if not isinstance(request, dict):
        return "not an object"
    using = request.get("using")
    if not isinstance(using, list) or not all(isinstance(u, str) for u in using):
        return "'using' must be an array of strings"
    calls = request.get("methodCalls")
    if not isinstance(calls, list):
        return "'methodCalls' must be an array"
    for call in calls:
        if not (
            isinstance(call, list)
            and len(call) == 3
            and isinstance(call[0], str)
            and isinstance(call[1], dict)
            and isinstance(call[2], str)
        ):
            return "each method call must be [String, Object, String]"
    created = request.get("createdIds")
    if "createdIds" in request and not (
        isinstance(created, dict)
        and all(is_valid_id(k) and is_valid_id(v) for k, v in created.items())
    ):
        return "'createdIds' must be an Id[Id] object"
    return None


def engine_run(app, user: Account, raw_body: bytes, content_type: str = "application/json") -> dict:
    """Run a JMAP API request for a user and return the Response object (RFC 8620 §3.4)."""
    try:
        request = engine_parse_request(app, raw_body, content_type)
    except RequestError as exc:
        if app.cfg.log_requests:
            log.info("request of %s: %d octets, refused: %s", user.username, len(raw_body),
                     exc.kind)
        raise
    if app.cfg.log_requests:
        log.info("request of %s: %s", user.username, log_shortened(request))
    using = frozenset(request["using"])
    created_ids = dict(request.get("createdIds") or {})
    responses: list = []
    # What references copy from earlier results counts against maxSizeRequest too: else
    # a small request doubling its own echo a dozen times asks for gigabytes.
    budget = [app.cfg.max_size_request]
    for name, raw_args, call_id in request["methodCalls"]:
        ctx = Call(app, user, using, created_ids, method=name, call_id=call_id)
        try:
            args = resolve_references(raw_args, responses, budget)
            output = engine_call(ctx, name, args)
        except MethodError as exc:
            responses.append(["error", exc.as_json(), call_id])
            continue
        responses.append([name, output, call_id])
        responses.extend([resp_name, resp, call_id] for resp_name, resp in ctx.extra_responses)
    response = {"methodResponses": responses, "sessionState": app.session_state_for(user)}
    if "createdIds" in request:
        response["createdIds"] = created_ids  # RFC 8620 §3.4: only if the request had it
    if app.cfg.log_requests:
        log.info("response to %s: %s", user.username, log_shortened(response))
    return response


LOG_EXCHANGE_OCTETS = 4096  # --log-requests: the longest request or response logged
LOG_HIDDEN = {"keys", "url", "verificationCode", "accessToken", "password"}  # never written
LOG_TEXT = {"value", "preview", "textBody", "htmlBody", "textSignature", "htmlSignature"}


def log_shortened(obj) -> str:
    """A request or response for --log-requests: push keys, URLs and codes hidden,
    message text replaced by its length, the whole cut at LOG_EXCHANGE_OCTETS."""
    text = json_dumps(_log_redacted(obj, 0))
    if len(text) > LOG_EXCHANGE_OCTETS:
        text = f"{text[:LOG_EXCHANGE_OCTETS]}… ({len(text) - LOG_EXCHANGE_OCTETS} more)"
    return text


def _log_redacted(value, depth: int):
    if isinstance(value, list):
        return [_log_redacted(item, depth + 1) for item in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, member in value.items():
        name = key.split("/", 1)[0]  # a PatchObject's path names the property first
        if name in LOG_HIDDEN and member is not None:
            out[key] = "(hidden)"
        elif key in LOG_TEXT and isinstance(member, str):
            out[key] = f"({len(member)} characters)"
        else:
            out[key] = _log_redacted(member, depth + 1)
    return out


def resolve_references(raw_args: dict, responses: list, budget: list | None = None) -> dict:
    """Replace `#name` result references with their values (RFC 8620 §3.7).

    budget[0] is what the request's references may still copy, in JSON octets; a call
    whose values would pass it gets invalidArguments (a request-level error is too late
    once calls have run, RFC 8620 §3.6.1)."""
    args = {}
    for key, value in raw_args.items():
        if not key.startswith("#"):
            args[key] = value
            continue
        plain = key[1:]
        if plain in raw_args:
            raise MethodError("invalidArguments", f"both {plain!r} and {key!r} given")
        args[plain] = _resolve_one(value, responses)
        if budget is not None:
            budget[0] -= json_size(args[plain], budget[0] + 1)
            if budget[0] < 0:
                raise MethodError("invalidArguments", "the values result references copy in "
                                  "this request add up to more than maxSizeRequest")
    return args


def json_size(value, stop_after: int) -> int:
    """The size of a value as JSON, in octets (close enough: escapes are not counted),
    counted only until it passes stop_after, so a huge value costs no more than that."""
    size, stack = 0, [value]
    while stack and size <= stop_after:
        item = stack.pop()
        if isinstance(item, str):
            size += 2 + (len(item) if item.isascii() else len(item.encode("utf-8", "replace")))
        elif isinstance(item, dict):
            size += 1 + len(item) * 2
            for key, member in item.items():
                size += 2 + len(key)
                stack.append(member)
        elif isinstance(item, list):
            size += 1 + len(item)
            stack.extend(item)
        else:
            size += 5 if item is None or isinstance(item, bool) else len(repr(item))
    return size


def _resolve_one(ref, responses: list):
    if not (
        isinstance(ref, dict)
        and isinstance(ref.get("resultOf"), str)
        and isinstance(ref.get("name"), str)
        and isinstance(ref.get("path"), str)
    ):
        raise MethodError("invalidResultReference", "a ResultReference needs resultOf, name, path")
    match = next((r for r in responses if r[2] == ref["resultOf"]), None)
    if match is None:
        raise MethodError("invalidResultReference", f"no response for {ref['resultOf']!r}")
    if match[0] != ref["name"]:
        raise MethodError(
            "invalidResultReference", f"response {ref['resultOf']!r} is {match[0]!r}"
        )
    try:
        tokens = pointer_tokens(ref["path"])
        if len(tokens) > MAX_RESULT_REFERENCE_DEPTH:
            raise ValueError("path too deep")
        return pointer_evaluate(match[1], tokens)
    except ValueError as exc:
        raise MethodError("invalidResultReference", f"path {ref['path']!r}: {exc}") from exc


def engine_call(ctx: Call, name: str, args: dict) -> dict:
    """Run one method call in its own transaction and return its response arguments."""
    method = METHODS.get(name)
    if method is None or method.capability not in ctx.using:
        raise MethodError("unknownMethod", f"unknown method {name!r} for the capabilities used")
    if method.takes_account:
        _use_account(ctx, method, args.get("accountId"))
    try:
        if method.prepare is not None:
            method.prepare(ctx, args)
        with db.atomic("IMMEDIATE" if method.writes else None):
            output = method.handler(ctx, args)
            touched = ctx.flush_changes()
    except MethodError:
        raise
    except peewee.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            log.exception("%s failed", name)
            raise MethodError("serverFail", "internal error; see the server log") from exc
        log.warning("%s: database unavailable: %s", name, exc)
        raise MethodError("serverUnavailable", "the database is busy; try again") from exc
    except Exception as exc:  # noqa: BLE001 -- a bug: log it, answer serverFail, go on
        log.exception("%s failed", name)
        raise MethodError("serverFail", "internal error; see the server log") from exc
    for account_pk in touched:
        ctx.app.bus.notify(account_pk)
    for callback in ctx.after_commit:  # never inside the transaction: others would see
        callback()                     # (or act on) what might still be rolled back
    return output


def _use_account(ctx: Call, method: Method, raw_account_id) -> None:
    if not isinstance(raw_account_id, str):
        raise MethodError("invalidArguments", "accountId must be a String")
    found = ctx.app.accessible_accounts(ctx.user).get(raw_account_id)
    if found is None:
        raise MethodError("accountNotFound", f"no account {raw_account_id!r}")
    account, read_only = found
    capability = CAPABILITIES.get(method.capability)
    if capability is None or capability.account is None or \
            method.capability not in ctx.app.capabilities:
        raise MethodError("accountNotSupportedByMethod")
    if method.writes and read_only:
        raise MethodError("accountReadOnly")
    ctx.account, ctx.read_only = account, read_only
    ctx.changes = ChangeLog(account.pk, ctx.now)


class InflightSlot:
    """Count a user's requests of one kind in flight against a limit (RFC 8620 §2)."""

    def __init__(self, app, user: Account, kind: str, limit: int):
        self.app, self.key, self.kind, self.limit = app, (user.pk, kind), kind, limit

    def __enter__(self):
        with self.app.inflight_lock:
            count = self.app.inflight.get(self.key, 0)
            if count >= self.limit:
                raise RequestError("limit", f"more than {self.limit} at once ({self.kind})",
                                   limit=self.kind)
            self.app.inflight[self.key] = count + 1
        return self

    def __exit__(self, *exc):
        with self.app.inflight_lock:
            self.app.inflight[self.key] -= 1
        return False


# ---- argument checking: one table per method, checked before the handler runs ----

REQUIRED = object()


def a_any(value):
    return value


def a_bool(value):
    if not isinstance(value, bool):
        raise ValueError("must be a Boolean")
    return value


def a_str(value):
    if not isinstance(value, str):
        raise ValueError("must be a String")
    return value


def a_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_INT:
        raise ValueError("must be an Int")
    return value


def a_uint(value):
    if a_int(value) < 0:
        raise ValueError("must be an UnsignedInt")
    return value


def a_id(value):
    if not isinstance(value, str) or not (is_valid_id(value) or _is_creation_ref(value)):
        raise ValueError("must be an Id")
    return value


def a_ids(value):
    if not isinstance(value, list):
        raise ValueError("must be an array of Ids")
    return [a_id(item) for item in value]


def a_strs(value):
    if not isinstance(value, list):
        raise ValueError("must be an array of Strings")
    return [a_str(item) for item in value]


def a_obj(value):
    if not isinstance(value, dict):
        raise ValueError("must be an object")
    return value


def nullable(check):
    def check_or_null(value):
        return None if value is None else check(value)

    return check_or_null


def _is_creation_ref(value) -> bool:
    return isinstance(value, str) and value.startswith("#") and is_valid_id(value[1:])


def take_args(raw_args: dict, schema: dict) -> dict:
    """Check method arguments against {name: (checker, default)}; raise invalidArguments."""
    unknown = sorted(set(raw_args) - set(schema))
    if unknown:
        raise MethodError("invalidArguments", f"unknown argument(s): {', '.join(unknown)}")
    args = {}
    for name, (check, default) in schema.items():
        if name not in raw_args:
            if default is REQUIRED:
                raise MethodError("invalidArguments", f"missing argument {name!r}")
            args[name] = default
            continue
        try:
            args[name] = check(raw_args[name])
        except ValueError as exc:
            raise MethodError("invalidArguments", f"{name}: {exc}") from exc
    return args


def resolve_creation_id(ctx: Call, raw_id: str) -> str | None:
    """Map `#creationId` to the id it created in this request (RFC 8620 §5.3)."""
    if _is_creation_ref(raw_id):
        return ctx.created_ids.get(raw_id[1:])
    return raw_id


# =============================================================================
# 6.3 GENERIC TYPE MACHINE -- /get /changes /set /copy /query /queryChanges
#     RFC 8620 §5. A type is a TypeSpec declaration: its properties (Prop), filters,
#     sorts and hooks. The machine does the bookkeeping: argument checks, ifInState,
#     create -> update -> destroy, patches, creation ids, change log, paging.
# =============================================================================

NO_DEFAULT = object()


@dataclass(frozen=True)
class Prop:
    """One property of a JMAP type: its kind, column and rules (RFC 8620 §5.3)."""

    kind: str  # id, idset, str, bool, uint, int, utcdate, object, list, any, and the
    # JSCalendar/JSContact kinds localdatetime, utcdatetime, duration, signedduration, timezone
    column: str | None = None  # model attribute; None = computed by TypeSpec.compute()
    default: Any = NO_DEFAULT
    nullable: bool = False
    server_set: bool = False
    immutable: bool = False
    ref: str | None = None  # referenced type name (Ids that may be "#creationId")
    max_len: int | None = None  # octets, for strings
    max_value: int | None = None
    check: Callable | None = None  # extra value check raising ValueError
    json: bool = False  # the column holds the value as JSON text


_DURATION_TIME = r"T(?:\d+H(?:\d+M(?:\d+S)?)?|\d+M(?:\d+S)?|\d+S)"
DURATION_RE = re.compile(  # JSCalendar 2.0 §1.5.6 (and §1.5.7: a sign in front)
    rf"[+-]?P(?:(?:\d+W(?:\d+D)?|\d+D)(?:{_DURATION_TIME})?|{_DURATION_TIME})\Z")
LOCAL_DATE_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ?\Z")


def a_date_time(value, utc: bool):
    """A JSCalendar UTCDateTime ("Z", no fraction) or LocalDateTime (no offset) that
    names a real moment of the calendar (JSCalendar 2.0 §1.5.4, §1.5.5)."""
    if not isinstance(value, str) or not LOCAL_DATE_TIME_RE.match(value) \
            or value.endswith("Z") != utc:
        raise ValueError("a UTCDateTime (…Z)" if utc else "a LocalDateTime (no offset)")
    try:
        datetime.fromisoformat(value.rstrip("Z"))
    except ValueError:
        raise ValueError("not a date and time of the calendar") from None
    return value


def a_duration(value, signed: bool):
    if not isinstance(value, str) or not DURATION_RE.match(value) or (
            not signed and value[:1] in "+-"):
        raise ValueError("a Duration such as PT1H or P1DT12H")
    return value


def a_time_zone(value):
    """An IANA time zone name the system's tz database knows (for zoneinfo)."""
    if not isinstance(value, str) or value not in _time_zone_names():
        raise ValueError("an IANA time zone name such as Europe/Berlin")
    return value


@functools.lru_cache(maxsize=1)
def _time_zone_names() -> frozenset:
    import zoneinfo  # lazy: only time zone properties need the tz database

    return frozenset(zoneinfo.available_timezones()) | {"UTC", "Etc/UTC"}


PROP_KIND_CHECKS = {
    "localdatetime": lambda v: a_date_time(v, utc=False),
    "utcdatetime": lambda v: a_date_time(v, utc=True),
    "duration": lambda v: a_duration(v, signed=False),
    "signedduration": lambda v: a_duration(v, signed=True),
    "timezone": a_time_zone,
    "str": a_str,
    "bool": a_bool,
    "int": a_int,
    "uint": a_uint,
    "object": a_obj,
    "list": lambda v: v if isinstance(v, list) else (_ for _ in ()).throw(ValueError("array")),
    "any": a_any,
}

TYPES: dict[str, "TypeSpec"] = {}


def type_id(type_name: str, pk: int) -> str:
    """The JMAP id of a row of another type (its declaration says how ids look)."""
    return TYPES[type_name].id_of(pk)


def type_pk(type_name: str, raw_id) -> int | None:
    """The key an id of another type names (no creation ids: see TypeSpec.pk_of)."""
    return TYPES[type_name].pk_from_raw(raw_id)


def register_type(cls):
    """Declare a JMAP type: register it and its standard methods."""
    spec = cls()
    assert spec.name not in TYPES, spec.name
    assert spec.singleton or all(other.id_prefix != spec.id_prefix for other in TYPES.values()
                                 if not other.singleton), f"{spec.name}: id prefix taken"
    TYPES[spec.name] = spec
    handlers = {
        "get": (method_get, False),
        "changes": (method_changes, False),
        "set": (method_set, True),
        "copy": (method_copy, True),
        "query": (method_query, False),
        "queryChanges": (method_query_changes, False),
    }
    for suffix in spec.methods:
        handler, writes = handlers[suffix]
        prepare = spec.prepare_set if suffix == "set" else None
        jmap_method(f"{spec.name}/{suffix}", spec.capability, writes, prepare=prepare)(
            functools.partial(handler, spec)
        )
    return cls


class TypeSpec:
    """A JMAP data type on the generic machine.

    Hooks a type may override (each raises SetError to reject one record):
      compute(ctx, row, name)       value of a computed (column-less) property
      validate(ctx, values, row)    check the whole would-be object; row is None on create
      on_create / on_update(ctx, row, values)   after the row is written
      on_destroy(ctx, row, args)    before the tombstone is written (may refuse)
      query_order(ctx, args, rows)  reorder or winnow query rows, lazily (e.g. sortAsTree)
      check_property(name)          accept a dynamic property name (Email's header:…)
      prepare_get(ctx, args)        read the type's extra /get arguments
      prefetch(ctx, rows, wanted)   batch what compute() needs for a /get
      update_base(patch)            properties an update reads (Email: not its body)
      destroy_order(ctx, raw_ids)   the order to destroy in (e.g. children first)
      create_one(ctx, cid, obj)     make one record (Email: a MIME message, not columns)
      copy_one(ctx, src, cid, obj)  copy one record from another account
      validate_final(ctx)           check the end state of a /set (raise MethodError)
      after_set(ctx, args, result)  follow-up work once a /set has run
      can_calculate_changes(args)   whether /queryChanges is exact for this query
      changes_extra(ctx, since, rows)   extra /changes response members
      query_changed(ctx, args, since)   objects a /queryChanges must re-place
    """

    name: str = ""
    capability: str = CAP_CORE
    model: type = JmapRow
    id_prefix: str = "X"
    methods: tuple = ("get", "changes", "set", "query", "queryChanges")
    props: dict = {}
    filters: dict = {}  # condition name -> fn(ctx, value) -> peewee expression
    sorts: dict = {}  # property name -> (column, is_string)
    get_all: bool = True  # /get with ids null returns everything
    default_properties: list | None = None  # /get without properties (None: all of props)
    get_args: dict = {}
    singleton: bool = False  # exactly one object, never created or destroyed (RFC 8620 §5.3)
    max_object_octets: int | None = None  # a bigger object is tooLarge (RFC 8620 §5.3)
    set_args: dict = {}
    query_args: dict = {}

    # ---- reading ----
    def id_of(self, pk: int) -> str:
        if self.singleton:
            return SINGLETON_ID
        return self.id_prefix + db.obj.jmapd_ids.encode(self.model._meta.table_name, pk)

    def pk_from_raw(self, raw_id) -> int | None:
        """The key an id of this type names (IdScheme), None if it names nothing."""
        if not isinstance(raw_id, str) or not raw_id.startswith(self.id_prefix):
            return None
        return db.obj.jmapd_ids.decode(self.model._meta.table_name, raw_id[len(self.id_prefix):])

    def live(self, ctx: Call, keyed: bool = False):
        """The account's objects. `keyed`: the caller picks rows by key, so SQLite must
        look them up by key instead of walking an index of the whole account (+ 0
        keeps it off account_pk indexes)."""
        model = self.model
        account = model.account_pk + 0 if keyed else model.account_pk
        return model.select().where(
            (account == ctx.account.pk) & (model.destroyed == False))  # noqa: E712

    def pk_of(self, ctx: Call, raw_id) -> int | None:
        """The key an id (or "#creationId") names, None if it names nothing of ours.
        A singleton's one object is "singleton" (RFC 8621 §8)."""
        if self.singleton and raw_id == SINGLETON_ID:
            return self.live(ctx).select(self.model.pk).scalar()
        return self.pk_from_raw(resolve_creation_id(ctx, raw_id))

    def load(self, ctx: Call, raw_id) -> JmapRow | None:
        pk = self.pk_of(ctx, raw_id)
        if pk is None:
            return None
        return self.live(ctx, keyed=True).where(self.model.pk == pk).first()

    def to_json(self, ctx: Call, row, wanted) -> dict:
        obj = {"id": self.id_of(row.pk)}
        for name in wanted:
            if name == "id":
                continue
            prop = self.props.get(name)
            if prop is None or prop.column is None:
                obj[name] = self.compute(ctx, row, name)
                continue
            value = getattr(row, prop.column)
            if prop.ref and value is not None:
                value = TYPES[prop.ref].id_of(value)
            elif prop.kind == "bool":
                value = bool(value)
            elif prop.kind == "utcdate" and value is not None:
                value = utc_date(value)
            elif prop.json and value is not None:
                value = json.loads(value)
            obj[name] = value
        return obj

    def compute(self, ctx: Call, row, name: str):
        raise NotImplementedError(f"{self.name}.{name} has no column and no compute()")

    def state(self, ctx: Call) -> str:
        return state_string(type_state_row(ctx.account.pk, self.name).modseq)

    # ---- hooks (defaults do nothing) ----
    def validate(self, ctx: Call, values: dict, row) -> None:
        pass

    def on_create(self, ctx: Call, row, values: dict) -> None:
        pass

    def on_update(self, ctx: Call, row, values: dict) -> None:
        pass

    def on_destroy(self, ctx: Call, row, args: dict) -> None:
        pass

    def query_columns(self) -> tuple:
        """Columns query_order() receives per row; the key comes first."""
        return (self.model.pk,)

    def query_order(self, ctx: Call, args: dict, rows):
        """Reorder or winnow query rows (tuples of query_columns); yield keys."""
        return (row[0] for row in rows)

    def check_property(self, name: str) -> bool:
        """Accept a property name beyond `props` (e.g. `header:…`); may raise MethodError."""
        return False

    def prepare_get(self, ctx: Call, args: dict) -> None:
        pass

    def prefetch(self, ctx: Call, rows: list, wanted: list) -> None:
        """Load what computed properties of many rows need, in few queries."""

    def update_base(self, patch: dict) -> list:
        """The properties an update patches and compares against (default: all)."""
        return list(self.props)

    def destroy_order(self, ctx: Call, raw_ids: list) -> list:
        return raw_ids

    def create_one(self, ctx: Call, cid: str, raw_obj: dict) -> dict:
        """Create one record from a client's object (a type may build it its own way)."""
        return create_from_props(self, ctx, cid, raw_obj)

    def copy_one(self, ctx: Call, src: Call, cid: str, raw_obj) -> dict:
        """Copy one record from the from-account's context `src` (RFC 8620 §5.4)."""
        return copy_from_props(self, ctx, src, cid, raw_obj)

    def validate_final(self, ctx: Call) -> None:
        pass

    def after_set(self, ctx: Call, args: dict, result: dict) -> None:
        """After a /set has run (EmailSubmission: the implicit Email/set)."""

    def can_calculate_changes(self, args: dict) -> bool:
        return True

    def change_column(self):
        return self.model.updated_modseq

    def query_changed(self, ctx: Call, args: dict, since: int) -> dict:
        """Map pk -> created_modseq of every object whose query position may have changed."""
        model = self.model
        rows = model.select(model.pk, model.created_modseq).where(
            (model.account_pk == ctx.account.pk) & (model.updated_modseq > since))
        return dict(rows.tuples())

    def changes_extra(self, ctx: Call, since: int, rows: list) -> dict:
        return {}

    def create_defaults(self, changes: ChangeLog, account: Account) -> None:
        """Make the objects a new account starts with (its Inbox, its Identity, …)."""

    def defaults_missing(self, account: Account) -> bool:
        """Whether an existing account lacks the defaults (a type added by an upgrade:
        every account, new and old, gets its default calendar); checked at start."""
        return False

    def prepare_set(self, ctx: Call, args: dict) -> None:
        """The analyse phase of a /set, before its write transaction: parse, write blob
        files, resolve names; leave the results in ctx.scratch for the hooks."""

    def update_row(self, ctx: Call, row, patch: dict):
        """Apply a PatchObject to a loaded row (documents: to the document)."""
        return update_from_props(self, ctx, row, patch)

    def may(self, ctx: Call, row, action: str) -> bool:
        """Whether the caller may "read", "update" or "destroy" this object (shared
        calendars and address books answer from their myRights; a read-only account is
        refused before any of this)."""
        return True

    def forget(self, ctx: Call, row) -> None:
        """After an object is destroyed: drop what else refers to it (its search entry)."""


# ---- /get (RFC 8620 §5.1) ----

GET_ARGS = {
    "accountId": (a_id, REQUIRED),
    "ids": (nullable(a_ids), None),
    "properties": (nullable(a_strs), None),
}


def method_get(spec: TypeSpec, ctx: Call, raw_args: dict) -> dict:
    """Return the requested objects of a type (RFC 8620 §5.1)."""
    args = take_args(raw_args, {**GET_ARGS, **spec.get_args})
    wanted = _wanted_properties(spec, args["properties"])
    ctx.scratch["all_properties"] = args["properties"] is None
    spec.prepare_get(ctx, args)
    state = spec.state(ctx)
    if args["ids"] is None:
        if not spec.get_all:
            raise MethodError("requestTooLarge", "ids must be given for this type")
        rows = read_only_rows(spec.live(ctx).order_by(spec.model.pk).limit(
            ctx.limits.max_objects_in_get + 1))
        if len(rows) > ctx.limits.max_objects_in_get:
            raise MethodError("requestTooLarge", "more objects than maxObjectsInGet")
        rows = [row for row in rows if spec.may(ctx, row, "read")]
        spec.prefetch(ctx, rows, wanted)
        return {
            "accountId": ctx.account.id,
            "state": state,
            "list": [spec.to_json(ctx, row, wanted) for row in rows],
            "notFound": [],
        }
    ids = list(dict.fromkeys(args["ids"]))  # RFC 8620 §5.1: duplicates answered once
    if len(ids) > ctx.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", "more ids than maxObjectsInGet")
    wanted_pks = {raw_id: spec.pk_of(ctx, raw_id) for raw_id in ids}
    pks = [pk for pk in wanted_pks.values() if pk is not None]
    rows = {row.pk: row for row in _rows_by_key(spec, ctx, pks) if spec.may(ctx, row, "read")}
    spec.prefetch(ctx, list(rows.values()), wanted)
    found = [spec.to_json(ctx, rows[wanted_pks[i]], wanted) for i in ids if wanted_pks[i] in rows]
    not_found = [i for i in ids if wanted_pks[i] not in rows]
    return {"accountId": ctx.account.id, "state": state, "list": found, "notFound": not_found}


def read_only_rows(query) -> list:
    """Rows as light attribute objects holding the stored values as SQLite gives them
    (integers for booleans): a list view reads fifty per request, and peewee's model
    instances and per-column conversions cost several times the query itself."""
    sql, params = query.sql()
    return rows_of(db.execute_sql(sql, params))


def rows_of(cursor) -> list:
    """A cursor's rows as named tuples (each with a __dict__ for per-request caches)."""
    make = _row_class(tuple(column[0] for column in cursor.description))._make
    return [make(row) for row in cursor]


@functools.lru_cache(maxsize=128)
def _row_class(names: tuple):
    return type("Row", (collections.namedtuple("RowTuple", names, rename=True),), {})


def _rows_by_key(spec: TypeSpec, ctx: Call, pks: list) -> list:
    """The account's live rows with these keys. For the plain case the SQL is written
    here rather than built by peewee, which for fifty keys costs more than the query;
    SQLite must look rows up by key (+ 0 keeps it off the account's indexes)."""
    if not pks:
        return []
    if type(spec).live is not TypeSpec.live:  # a type that narrows what is visible
        return read_only_rows(spec.live(ctx, keyed=True).where(spec.model.pk.in_(pks)))
    return rows_of(db.execute_sql(
        f"SELECT * FROM {spec.model._meta.table_name} WHERE pk IN "
        f"({','.join('?' * len(pks))}) AND account_pk + 0 = ? AND destroyed = 0",
        [*pks, ctx.account.pk]))


def _wanted_properties(spec: TypeSpec, properties) -> list:
    if properties is None:
        return list(spec.default_properties or spec.props)
    unknown = [p for p in properties if p not in spec.props and not spec.check_property(p)]
    if unknown:
        raise MethodError("invalidArguments", f"unknown properties: {', '.join(unknown)}")
    return list(dict.fromkeys(["id"] + properties))  # RFC 8620 §5.1: id always returned


# ---- /changes (RFC 8620 §5.2) ----

CHANGES_ARGS = {
    "accountId": (a_id, REQUIRED),
    "sinceState": (a_str, REQUIRED),
    "maxChanges": (nullable(a_uint), None),
}


def method_changes(spec: TypeSpec, ctx: Call, raw_args: dict) -> dict:
    """List ids created, updated and destroyed since a state (RFC 8620 §5.2)."""
    args = take_args(raw_args, CHANGES_ARGS)
    max_changes = args["maxChanges"]
    if max_changes == 0:
        raise MethodError("invalidArguments", "maxChanges must be greater than 0")
    since = _since_modseq(spec, ctx, args["sinceState"])
    model, changed = spec.model, spec.change_column()
    # A row enters the change list at its creation if that is newer than `since`, else at
    # its last change; paging by that keeps every creation inside the page that covers it.
    entry = peewee.Case(None, [(model.created_modseq > since, model.created_modseq)], changed)
    query = (
        model.select(model, changed.alias("changed_at"), entry.alias("entered_at"))
        .where((model.account_pk == ctx.account.pk) & (changed > since))
        .order_by(entry)
    )
    if max_changes is not None:
        query = query.limit(max_changes + 1)
    rows = list(query)
    has_more = max_changes is not None and len(rows) > max_changes
    if has_more:
        rows = rows[:max_changes]
        upto = rows[-1].entered_at
        new_state = state_string(upto)
    else:
        upto = None
        new_state = spec.state(ctx)
    created, updated, destroyed = [], [], []
    for row in rows:
        gone = row.destroyed and (upto is None or row.changed_at <= upto)
        if row.created_modseq > since:
            if not gone:  # RFC 8620 §5.2: created and destroyed since: may be left out
                created.append(spec.id_of(row.pk))
        elif gone:
            destroyed.append(spec.id_of(row.pk))
        else:
            updated.append(spec.id_of(row.pk))
    response = {
        "accountId": ctx.account.id,
        "oldState": args["sinceState"],
        "newState": new_state,
        "hasMoreChanges": has_more,
        "created": created,
        "updated": updated,
        "destroyed": destroyed,
    }
    response.update(spec.changes_extra(ctx, since, rows))
    return response


def _since_modseq(spec: TypeSpec, ctx: Call, raw_state: str) -> int:
    """Turn a client's state into a modseq, or refuse with cannotCalculateChanges."""
    since = parse_state(raw_state)
    current = type_state_row(ctx.account.pk, spec.name)
    if since is None or since > current.modseq:
        raise MethodError("cannotCalculateChanges", "unknown state")
    if since < current.purged_below:
        raise MethodError("cannotCalculateChanges", "state is older than the change horizon")
    return since


# ---- /set (RFC 8620 §5.3) ----

SET_ARGS = {
    "accountId": (a_id, REQUIRED),
    "ifInState": (nullable(a_str), None),
    "create": (nullable(a_obj), None),
    "update": (nullable(a_obj), None),
    "destroy": (nullable(a_ids), None),
}


def method_set(spec: TypeSpec, ctx: Call, raw_args: dict) -> dict:
    """Create, update and destroy objects of a type (RFC 8620 §5.3)."""
    args = take_args(raw_args, {**SET_ARGS, **spec.set_args})
    create, update = args["create"] or {}, args["update"] or {}
    destroy = list(dict.fromkeys(args["destroy"] or []))
    result = set_begin(spec, ctx, len(create) + len(update) + len(destroy), args["ifInState"],
                       "created", "updated", "destroyed", "notCreated", "notUpdated",
                       "notDestroyed")
    for cid, obj in _creation_order(spec, create):
        _record_outcome(result, "created", "notCreated", cid,
                        lambda: set_create_one(spec, ctx, cid, obj), ctx.changes)
    will_destroy = {resolve_creation_id(ctx, i) for i in destroy}
    ctx.pending = _pending_changes(spec, ctx, update, destroy)
    for raw_id, patch in update.items():
        _record_outcome(result, "updated", "notUpdated", raw_id,
                        lambda: set_update_one(spec, ctx, raw_id, patch, will_destroy), ctx.changes)
        ctx.pending.pop(spec.pk_of(ctx, raw_id), None)
    for raw_id in spec.destroy_order(ctx, destroy):
        _record_outcome(result, "destroyed", "notDestroyed", raw_id,
                        lambda: set_destroy_one(spec, ctx, raw_id, args), ctx.changes)
    ctx.pending = {}
    spec.validate_final(ctx)
    set_finish(spec, ctx, result)
    spec.after_set(ctx, args, result)
    return result


def set_begin(spec: TypeSpec, ctx: Call, count: int, if_in_state, *outcomes) -> dict:
    """The set-like response every method that creates or changes objects answers with
    (/set, /copy, Email/import, …, RFC 8620 §5.3): maxObjectsInSet and ifInState are
    checked, oldState taken, and the given outcome members start empty."""
    if count > ctx.limits.max_objects_in_set:
        raise MethodError("requestTooLarge", "more changes than maxObjectsInSet")
    old_state = spec.state(ctx)
    if if_in_state is not None and if_in_state != old_state:
        raise MethodError("stateMismatch", f"state is {old_state}")
    result = {"accountId": ctx.account.id, "oldState": old_state, "newState": None}
    result.update((key, [] if key == "destroyed" else {}) for key in outcomes)
    return result


def set_finish(spec: TypeSpec, ctx: Call, result: dict) -> None:
    """newState, and null for every empty outcome (RFC 8620 §5.3)."""
    result["newState"] = state_string(ctx.changes.touched.get(spec.name)
                                      or int(result["oldState"]))
    for key in ("created", "updated", "destroyed", "notCreated", "notUpdated", "notDestroyed"):
        if key in result:
            result[key] = result[key] or None


def implicit_set(ctx: Call, type_name: str, args: dict) -> None:
    """An implicit Foo/set that another method asks for (RFC 8620 §5.4
    onSuccessDestroyOriginal, RFC 8621 §7.5 onSuccessUpdateEmail…): in a savepoint of
    its own, answered right after the call that asked, with that call's id."""
    try:
        with db.atomic():
            done = method_set(TYPES[type_name], ctx, args)
    except MethodError as exc:
        ctx.extra_responses.append(("error", exc.as_json()))
    else:
        ctx.extra_responses.append((f"{type_name}/set", done))


def json_equal(a, b) -> bool:
    """Compare JSON values strictly: 1, 1.0 and true are three different values."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return a == b


def _record_outcome(result: dict, ok_key: str, fail_key: str, key: str, action,
                    changes: ChangeLog | None = None) -> None:
    """Run one record's change in a savepoint; a SetError undoes only that record, its
    change-log entries included (`changes`: the log the record writes to)."""
    mark = changes.mark() if changes is not None else None
    try:
        with db.atomic():
            outcome = action()
    except SetError as exc:
        if mark is not None:
            changes.rollback(mark)
        result[fail_key][key] = exc.as_json()
        return
    if ok_key == "destroyed":
        result["destroyed"].append(key)
    else:
        result[ok_key][key] = outcome


def _pending_changes(spec: TypeSpec, ctx: Call, update: dict, destroy: list) -> dict:
    """Map pk -> properties an update or destroy later in this call will change.

    RFC 8620 §5.3 lets a call pass through invalid intermediate states (rename A -> B
    and B -> A); validate() hooks may consult ctx.pending for that, and validate_final()
    checks the end state.
    """
    pending = {}
    for raw_id, patch in update.items():
        pk = spec.pk_of(ctx, raw_id)
        if pk is not None and isinstance(patch, dict):
            pending[pk] = {key.split("/")[0] for key in patch}
    for raw_id in destroy:
        pk = spec.pk_of(ctx, raw_id)
        if pk is not None:
            pending[pk] = {"*"}
    return pending


def _creation_order(spec: TypeSpec, create: dict) -> list:
    """Order creates so a record referencing another new one (#cid) comes after it."""
    ref_props = [name for name, prop in spec.props.items() if prop.ref == spec.name]
    pending, ordered, done = dict(create), [], set()
    while pending:
        progress = False
        for cid, obj in list(pending.items()):
            needs = {
                obj[p][1:]
                for p in ref_props
                if isinstance(obj, dict) and _is_creation_ref(obj.get(p))
            }
            if not (needs & set(pending)) or needs <= done:
                ordered.append((cid, obj))
                done.add(cid)
                del pending[cid]
                progress = True
        if not progress:  # a cycle: let each fail on its unresolved reference
            ordered.extend(pending.items())
            break
    return ordered


def set_create_one(spec: TypeSpec, ctx: Call, cid: str, raw_obj) -> dict:
    """Create one record; return the properties the client did not send (RFC 8620 §5.3)."""
    if spec.singleton:
        raise SetError("singleton", f"there is only one {spec.name}")
    if not isinstance(raw_obj, dict):
        raise invalid_properties([], "a create must be an object")
    return spec.create_one(ctx, cid, raw_obj)


def create_from_props(spec: TypeSpec, ctx: Call, cid: str, raw_obj: dict) -> dict:
    """The generic create: properties checked one by one, defaults, validate(), a new row."""
    bad = [n for n in raw_obj if n not in spec.props or spec.props[n].server_set]
    values = {}
    for name, raw_value in raw_obj.items():
        if name in bad:
            continue
        try:
            values[name] = prop_value(spec, ctx, name, raw_value)
        except ValueError as exc:
            bad.append(property_path(name, exc))
    defaulted = []
    named = {entry.split("/", 1)[0] for entry in bad}  # a path names its property
    for name, prop in spec.props.items():
        if name in values or prop.server_set or name in named:
            continue
        if prop.default is NO_DEFAULT:
            bad.append(name)  # required and missing
        else:
            values[name] = prop.default
            defaulted.append(name)
    if bad:
        raise invalid_properties(bad)
    _check_size(spec, values)
    spec.validate(ctx, values, None)
    row = spec.model(account_pk=ctx.account.pk, **_columns(spec, values))
    record_change(ctx.changes, spec.name, row, "created")
    spec.on_create(ctx, row, values)
    new_id = spec.id_of(row.pk)
    ctx.created_ids[cid] = new_id  # RFC 8620 §5.3: a reused creation id maps to the newest
    stored = spec.to_json(ctx, row, list(spec.props))
    sent = _as_sent(spec, raw_obj, values)
    return {
        name: value
        for name, value in stored.items()
        if name not in raw_obj or name in defaulted or not json_equal(value, sent[name])
    }


def _as_sent(spec: TypeSpec, raw_obj: dict, values: dict) -> dict:
    """The client's values with `#creationId` references replaced by the ids they name."""
    sent = dict(raw_obj)
    for name, value in values.items():
        if name in sent and spec.props[name].kind == "id":
            sent[name] = value
    return sent


def set_update_one(spec: TypeSpec, ctx: Call, raw_id: str, patch, will_destroy: set):
    """Apply one PatchObject; return what changed beyond the patch, or None."""
    row = spec.load(ctx, raw_id)
    if row is None:
        raise SetError("notFound", f"no {spec.name} {raw_id!r}")
    if resolve_creation_id(ctx, raw_id) in will_destroy:
        raise SetError("willDestroy", "the record is destroyed in the same call")
    if not isinstance(patch, dict):
        raise SetError("invalidPatch", "a PatchObject must be an object")
    if not spec.may(ctx, row, "update"):
        raise SetError("forbidden", f"you may not change this {spec.name}")
    return spec.update_row(ctx, row, patch)


def update_from_props(spec: TypeSpec, ctx: Call, row, patch: dict):
    """The generic update: the patch applied to the row's properties, each changed one
    checked, validate(), the columns written; return what changed beyond the patch."""
    base = spec.update_base(patch)
    current = spec.to_json(ctx, row, base)
    patched = apply_patch(spec, current, patch)
    bad = [name for name in current if name not in patched]  # a required property removed
    changed = {}
    for name, value in patched.items():
        if name not in spec.props:
            bad.append(name)
        elif not json_equal(value, current.get(name)):
            prop = spec.props[name]
            if prop.server_set or prop.immutable:
                bad.append(name)
                continue
            try:
                changed[name] = prop_value(spec, ctx, name, value)
            except ValueError as exc:
                bad.append(property_path(name, exc))
    if bad:
        raise invalid_properties(bad)
    if not changed:
        return None
    values = {**current, **changed}
    _check_size(spec, values)
    spec.validate(ctx, values, row)
    changed = {name: value for name, value in values.items()  # validate() may adjust
               if name in changed or not json_equal(value, current.get(name))}
    for column, value in _columns(spec, changed).items():
        setattr(row, column, value)
    record_change(ctx.changes, spec.name, row, "updated")
    spec.on_update(ctx, row, changed)
    stored = spec.to_json(ctx, row, base)
    sent = _as_sent(spec, patched, changed)
    extra = {  # what changed other than as the client asked (RFC 8620 §5.3 "updated")
        name: value
        for name, value in stored.items()
        if not json_equal(value, sent.get(name))
    }
    return extra or None


def set_destroy_one(spec: TypeSpec, ctx: Call, raw_id: str, args: dict) -> None:
    """Destroy one record, leaving a tombstone for /changes."""
    if spec.singleton:  # RFC 8620 §5.3: whatever the id, nothing of it is destroyed
        raise SetError("singleton", f"the {spec.name} cannot be destroyed")
    row = spec.load(ctx, raw_id)
    if row is None:
        raise SetError("notFound", f"no {spec.name} {raw_id!r}")
    if not spec.may(ctx, row, "destroy"):
        raise SetError("forbidden", f"you may not destroy this {spec.name}")
    spec.on_destroy(ctx, row, args)
    record_change(ctx.changes, spec.name, row, "destroyed")
    spec.forget(ctx, row)


def _check_size(spec: TypeSpec, values: dict) -> None:
    if spec.max_object_octets is None:
        return
    size = octets(json_dumps(values))
    if size > spec.max_object_octets:
        raise SetError("tooLarge", f"{size} octets; at most {spec.max_object_octets}")


def prop_value(spec: TypeSpec, ctx: Call, name: str, value):
    """Check a client value for a property; raise ValueError if it is not acceptable."""
    prop = spec.props[name]
    if value is None:
        if not prop.nullable:
            raise ValueError("null not allowed")
        return None
    if prop.kind == "id":
        real = resolve_creation_id(ctx, value) if isinstance(value, str) else None
        if not is_valid_id(real):
            raise ValueError("not an Id")
        if prop.ref and TYPES[prop.ref].load(ctx, real) is None:
            raise ValueError("no such record")  # RFC 8620 §5.3: bad foreign key
        value = real
    elif prop.kind == "idset":
        value = prop_id_set(ctx, prop, value)
    elif prop.kind == "utcdate":
        parse_utc_date(value)
    else:
        value = PROP_KIND_CHECKS[prop.kind](value)
    if prop.max_len is not None and octets(value) > prop.max_len:
        raise ValueError("too long")
    if prop.max_value is not None and value > prop.max_value:
        raise ValueError("too large")
    if prop.check:
        value = prop.check(value)
    return value


class PropertyError(ValueError):
    """A value that is wrong somewhere inside: `path` (a JSON Pointer without the leading
    slash, "abc" or "0/start") says where, for invalidProperties (RFC 8620 §5.3)."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def property_path(name: str, exc: ValueError) -> str:
    """The invalidProperties entry for an error in property `name`: a path into it when
    the error knows where (RFC 8620 §5.3: "properties … that failed validation")."""
    path = getattr(exc, "path", "")
    return f"{name}/{path}" if path else name


def prop_id_set(ctx: Call, prop: Prop, value) -> dict:
    """An Id[Boolean] of existing objects of prop.ref, every value true (mailboxIds,
    calendarIds, addressBookIds); creation ids are resolved."""
    if not isinstance(value, dict) or not value:
        raise ValueError("an object of ids, each true, at least one")
    out = {}
    for raw_id, flag in value.items():
        real = resolve_creation_id(ctx, raw_id)
        escaped = raw_id.replace("~", "~0").replace("/", "~1")
        if flag is not True:
            raise PropertyError(escaped, "each value is true")
        if not is_valid_id(real) or TYPES[prop.ref].load(ctx, real) is None:
            raise PropertyError(escaped, f"no {prop.ref} {raw_id!r}")
        out[real] = True
    return out


def _columns(spec: TypeSpec, values: dict) -> dict:
    """Map JSON property values onto model columns."""
    columns = {}
    for name, value in values.items():
        prop = spec.props[name]
        if prop.column is None:
            continue
        if prop.ref and value is not None:
            value = TYPES[prop.ref].pk_from_raw(value)
        elif prop.kind == "utcdate" and value is not None:
            value = int(parse_utc_date(value))
        elif prop.json and value is not None:
            value = json_dumps(value)
        columns[prop.column] = value
    return columns


def apply_patch(spec: TypeSpec, current: dict, patch: dict) -> dict:
    """Apply a PatchObject (RFC 8620 §5.3) to a copy of an object; raise invalidPatch."""
    paths = []
    for key in patch:
        try:
            paths.append(pointer_tokens("/" + key))
        except ValueError as exc:
            raise SetError("invalidPatch", f"{key!r}: {exc}") from exc
    for a in paths:
        for b in paths:
            if a is not b and len(a) < len(b) and b[: len(a)] == a:
                raise SetError("invalidPatch", f"{'/'.join(a)!r} is a prefix of another path")
    result = json.loads(json.dumps(current))
    for tokens, value in zip(paths, patch.values()):
        _patch_one(spec, result, tokens, value)
    return result


def _patch_one(spec: TypeSpec, obj: dict, tokens: list, value) -> None:
    target = obj
    for token in tokens[:-1]:
        if not isinstance(target, dict) or token not in target:
            raise SetError("invalidPatch", f"{'/'.join(tokens)!r}: parent does not exist")
        target = target[token]
    if isinstance(target, list):
        raise SetError("invalidPatch", "a patch may not reach inside an array")
    if not isinstance(target, dict):
        raise SetError("invalidPatch", f"{'/'.join(tokens)!r}: parent is not an object")
    last = tokens[-1]
    if value is not None:
        target[last] = value
    elif len(tokens) == 1 and last in spec.props and spec.props[last].default is not NO_DEFAULT:
        target[last] = spec.props[last].default  # null resets to the default
    else:
        target.pop(last, None)


# ---- /copy (RFC 8620 §5.4) ----

COPY_ARGS = {
    "fromAccountId": (a_id, REQUIRED),
    "ifFromInState": (nullable(a_str), None),
    "accountId": (a_id, REQUIRED),
    "ifInState": (nullable(a_str), None),
    "create": (a_obj, REQUIRED),
    "onSuccessDestroyOriginal": (a_bool, False),
    "destroyFromIfInState": (nullable(a_str), None),
}


def method_copy(spec: TypeSpec, ctx: Call, raw_args: dict) -> dict:
    """Copy objects from another account into this one (RFC 8620 §5.4)."""
    args = take_args(raw_args, COPY_ARGS)
    src = _from_account(ctx, args["fromAccountId"])
    if args["ifFromInState"] is not None and args["ifFromInState"] != spec.state(src):
        raise MethodError("stateMismatch", "fromAccount state does not match ifFromInState")
    result = {"fromAccountId": src.account.id, **set_begin(
        spec, ctx, len(args["create"]), args["ifInState"], "created", "notCreated")}
    copied = []
    for cid, obj in args["create"].items():
        _record_outcome(result, "created", "notCreated", cid,
                        lambda: spec.copy_one(ctx, src, cid, obj), ctx.changes)
        if cid in result["created"]:
            copied.append(obj["id"])
    set_finish(spec, ctx, result)
    if args["onSuccessDestroyOriginal"] and copied and src.read_only:
        ctx.extra_responses.append(("error", {"type": "accountReadOnly"}))  # RFC 8620 §3.6.2
    elif args["onSuccessDestroyOriginal"] and copied:  # RFC 8620 §5.4, in the from-account
        implicit_set(src, spec.name, {"accountId": src.account.id, "destroy": copied,
                                      "ifInState": args["destroyFromIfInState"]})
    return result


def _from_account(ctx: Call, raw_account_id: str) -> Call:
    if raw_account_id == ctx.account.id:
        raise MethodError("invalidArguments", "fromAccountId must differ from accountId")
    found = ctx.app.accessible_accounts(ctx.user).get(raw_account_id)
    if found is None:
        raise MethodError("fromAccountNotFound", f"no account {raw_account_id!r}")
    return ctx.for_account(*found)


def copy_original(spec: TypeSpec, src: Call, raw_obj) -> JmapRow:
    """The record a /copy create names in the from-account (RFC 8620 §5.4)."""
    if not isinstance(raw_obj, dict) or not isinstance(raw_obj.get("id"), str):
        raise invalid_properties(["id"], "each copy needs the id of the original")
    original = spec.load(src, raw_obj["id"])
    if original is None:
        raise SetError("notFound", f"no {spec.name} {raw_obj['id']!r} in fromAccount")
    return original


def copy_from_props(spec: TypeSpec, ctx: Call, src: Call, cid: str, raw_obj) -> dict:
    """The generic copy: the original's settable properties, overridden, created anew."""
    original = copy_original(spec, src, raw_obj)
    source = spec.to_json(src, original, list(spec.props))
    obj = {n: v for n, v in source.items() if not spec.props[n].server_set}
    obj.update({n: v for n, v in raw_obj.items() if n != "id"})
    created = set_create_one(spec, ctx, cid, obj)
    created["id"] = ctx.created_ids[cid]
    return created


# ---- /query (RFC 8620 §5.5) ----

QUERY_ARGS = {
    "accountId": (a_id, REQUIRED),
    "filter": (nullable(a_obj), None),
    "sort": (nullable(lambda v: a_sort_list(v)), None),
    "position": (a_int, 0),
    "anchor": (nullable(a_id), None),
    "anchorOffset": (a_int, 0),
    "limit": (nullable(a_uint), None),
    "calculateTotal": (a_bool, False),
}

QUERY_CHANGES_ARGS = {
    "accountId": (a_id, REQUIRED),
    "filter": (nullable(a_obj), None),
    "sort": (nullable(lambda v: a_sort_list(v)), None),
    "sinceQueryState": (a_str, REQUIRED),
    "maxChanges": (nullable(a_uint), None),
    "upToId": (nullable(a_id), None),
    "calculateTotal": (a_bool, False),
}


def a_sort_list(value):
    """Check a Comparator[] (RFC 8620 §5.5); extra members are tolerated."""
    if not isinstance(value, list) or len(value) > MAX_SORT_COMPARATORS:
        raise ValueError(f"must be an array of at most {MAX_SORT_COMPARATORS} Comparators")
    for comparator in value:
        if not isinstance(comparator, dict) or not isinstance(comparator.get("property"), str):
            raise ValueError("a Comparator needs a property")
        if not isinstance(comparator.get("isAscending", True), bool):
            raise ValueError("isAscending must be a Boolean")
        if not isinstance(comparator.get("collation", ""), str):
            raise ValueError("collation must be a String")
    return value


def method_query(spec: TypeSpec, ctx: Call, raw_args: dict) -> dict:
    """Search, sort and window the objects of a type (RFC 8620 §5.5).

    Results are read lazily in sort order: a first page with no total, anchor or
    negative position stops reading after position + limit rows.
    """
    args = take_args(raw_args, {**QUERY_ARGS, **spec.query_args})
    limit = args["limit"]
    clamped = limit is None or limit > MAX_QUERY_LIMIT
    if clamped:
        limit = MAX_QUERY_LIMIT
    results = query_results(spec, ctx, args)
    whole = args["anchor"] is not None or args["position"] < 0 or args["calculateTotal"]
    if whole:
        pks = list(results)
        position = _query_position(spec, ctx, args, pks)
        page, more = pks[position: position + limit], len(pks) > position + limit
    else:
        position = args["position"]
        page = list(itertools.islice(results, position, position + limit + 1))
        more = len(page) > limit
        page = page[:limit]
    response = {
        "accountId": ctx.account.id,
        "queryState": spec.state(ctx),
        "canCalculateChanges": spec.can_calculate_changes(args),
        "position": position,
        "ids": [spec.id_of(pk) for pk in page],
    }
    if args["calculateTotal"]:
        response["total"] = len(pks)
    if clamped and (args["limit"] is not None or more):
        response["limit"] = limit  # RFC 8620 §5.5: only when the server set a limit
    return response


def _query_position(spec: TypeSpec, ctx: Call, args: dict, pks: list) -> int:
    if args["anchor"] is None:
        position = args["position"]
        return max(0, len(pks) + position) if position < 0 else position
    anchor = spec.pk_of(ctx, args["anchor"])
    try:
        index = pks.index(anchor)
    except ValueError:
        raise MethodError("anchorNotFound") from None
    return max(0, index + args["anchorOffset"])


def query_results(spec: TypeSpec, ctx: Call, args: dict):
    """Yield the keys of every matching object, in sort order, as SQLite reads them."""
    model = spec.model
    where = (model.account_pk == ctx.account.pk) & (model.destroyed == False)  # noqa: E712
    if args["filter"] is not None:
        where &= filter_expression(spec, ctx, args["filter"], 0)
    order = sort_order(spec, args["sort"] or [])
    query = model.select(*spec.query_columns()).where(where).order_by(*order, model.pk)
    return spec.query_order(ctx, args, query.tuples().iterator())


def filter_expression(spec: TypeSpec, ctx: Call, raw_filter: dict, depth: int = 0):
    """Turn a FilterOperator or FilterCondition into a SQL expression (RFC 8620 §5.5).

    The tree may hold MAX_FILTER_CONDITIONS conditions in all (more is unsupportedFilter);
    each operator's operands are joined flat, so SQLite's parser never sees a hundred
    nested levels for a hundred conditions."""
    if depth == 0 and _filter_conditions(raw_filter, 0) > MAX_FILTER_CONDITIONS:
        raise MethodError("unsupportedFilter",
                          f"more than {MAX_FILTER_CONDITIONS} conditions in one filter")
    if "operator" in raw_filter:
        operator, conditions = raw_filter["operator"], raw_filter.get("conditions")
        if operator not in ("AND", "OR", "NOT") or not isinstance(conditions, list):
            raise MethodError("invalidArguments", "a FilterOperator needs operator and conditions")
        parts = []
        for condition in conditions:
            if not isinstance(condition, dict):
                raise MethodError("invalidArguments", "a filter condition must be an object")
            parts.append(filter_expression(spec, ctx, condition, depth + 1))
        if operator == "AND":
            return _sql_joined(parts, " AND ", "1")
        either = _sql_joined(parts, " OR ", "0")
        return either if operator == "OR" else peewee.NodeList((peewee.SQL("NOT"), either))
    parts = []
    for name, value in raw_filter.items():
        make = spec.filters.get(name)
        if make is None:
            raise MethodError("unsupportedFilter", f"cannot filter on {name!r}")
        try:
            parts.append(peewee.fn.COALESCE(make(ctx, value), 0))  # NOT of NULL is NULL
        except ValueError as exc:
            raise MethodError("invalidArguments", f"filter {name}: {exc}") from exc
    return _sql_joined(parts, " AND ", "1")


def _sql_joined(parts: list, glue: str, empty: str):
    if not parts:
        return peewee.SQL(empty)
    return peewee.NodeList(parts, glue=glue, parens=True)


def _filter_conditions(raw_filter, depth: int) -> int:
    """How many conditions a filter tree holds (each property of a FilterCondition is
    one); refuse one nested deeper than MAX_FILTER_DEPTH."""
    if depth > MAX_FILTER_DEPTH:
        raise MethodError("invalidArguments", "filter nested too deeply")
    if not isinstance(raw_filter, dict):
        return 0
    conditions = raw_filter.get("conditions")
    if "operator" in raw_filter and isinstance(conditions, list):
        total = 0
        for condition in conditions:
            total += _filter_conditions(condition, depth + 1)
            if total > MAX_FILTER_CONDITIONS:
                break  # enough to refuse: the rest need not be counted
        return total
    return len(raw_filter)


def sort_order(spec: TypeSpec, comparators: list) -> list:
    """Turn Comparators into ORDER BY terms; refuse unknown ones with unsupportedSort."""
    order = []
    for comparator in comparators:
        column = spec.sorts.get(comparator["property"])
        if column is None:
            raise MethodError("unsupportedSort", f"cannot sort by {comparator['property']!r}")
        if callable(column):  # a sort with its own arguments (e.g. Email's "keyword")
            column = column(comparator)
        direction = "ASC" if comparator.get("isAscending", True) else "DESC"
        collation = comparator.get("collation", "i;unicode-casemap")
        if collation not in SQL_COLLATION:
            raise MethodError("unsupportedSort", f"unknown collation {collation!r}")
        if column[1]:  # a string: the collation applies (RFC 8620 §5.5)
            term = peewee.NodeList((column[0], peewee.SQL(f"COLLATE {SQL_COLLATION[collation]}")))
        else:
            term = column[0]
        order.append(peewee.Ordering(term, direction))
    return order


# ---- /queryChanges (RFC 8620 §5.6) ----


def method_query_changes(spec: TypeSpec, ctx: Call, raw_args: dict) -> dict:
    """Tell how a query's results changed since a query state (RFC 8620 §5.6).

    An object's membership and position depend only on its own properties, so every
    object changed since the old state is "removed" and, if it matches now, "added"
    back at its new index; this is exact for such queries.
    """
    args = take_args(raw_args, {**QUERY_CHANGES_ARGS, **spec.query_args})
    if args["maxChanges"] == 0:
        raise MethodError("invalidArguments", "maxChanges must be greater than 0")
    since = _since_modseq(spec, ctx, args["sinceQueryState"])
    if not spec.can_calculate_changes(args):
        raise MethodError("cannotCalculateChanges", "this query cannot report changes")
    pks = list(query_results(spec, ctx, args))
    changed = spec.query_changed(ctx, args, since)
    removed = [spec.id_of(pk) for pk, created in sorted(changed.items()) if created <= since]
    added = [
        {"id": spec.id_of(pk), "index": index} for index, pk in enumerate(pks) if pk in changed
    ]
    if args["maxChanges"] is not None and len(removed) + len(added) > args["maxChanges"]:
        raise MethodError("tooManyChanges", "more changes than maxChanges")
    response = {
        "accountId": ctx.account.id,
        "oldQueryState": args["sinceQueryState"],
        "newQueryState": spec.state(ctx),
        "removed": removed,
        "added": added,
    }
    if args["calculateTotal"]:
        response["total"] = len(pks)
    return response


# ---- document types (JSCalendar Events, JSContact Cards, …) ----


class DocumentRow(JmapRow):
    """The columns of a document type's table (db_object_table(…, document=True))."""

    doc = peewee.TextField()


class DocumentSpec(TypeSpec):
    """A type whose objects are JSON documents, kept whole in a `doc` column.

    Declared props are checked by kind (invalidProperties names the path inside a
    value that is wrong); properties the declaration does not know are kept as sent
    (`keep_unknown`); `index` columns are extracted from every version written (what
    /query filters and sorts on); `search` columns fill the type's FTS5 table and give
    it a `text` filter; an update is a PatchObject applied to the document, its paths
    reaching inside (RFC 8620 §5.3). validate() sees, and may adjust, the document.
    """

    index: dict = {}  # column -> fn(document) -> value
    search: dict = {}  # FTS column -> fn(document) -> text
    computed: frozenset = frozenset()  # props compute() gives, never stored
    keep_unknown: bool = True

    def __init__(self):
        if self.search and "text" not in self.filters:
            self.filters = {**self.filters, "text": document_text_filter(self)}

    def document(self, row) -> dict:
        doc = row.__dict__.get("_doc")
        if doc is None:
            doc = row.__dict__["_doc"] = json.loads(row.doc)
        return doc

    def check_property(self, name: str) -> bool:
        return self.keep_unknown and ":" in name  # vendor properties (example.com:foo)

    def to_json(self, ctx, row, wanted) -> dict:
        doc = self.document(row)
        obj = {"id": self.id_of(row.pk)}
        names = list(wanted)
        if ctx.scratch.get("all_properties"):
            names += [name for name in doc if name not in self.props]
        for name in names:
            if name == "id":
                continue
            if name in self.computed:
                obj[name] = self.compute(ctx, row, name)
            elif name in doc:
                obj[name] = doc[name]
            elif name in self.props:
                default = self.props[name].default
                obj[name] = None if default is NO_DEFAULT else default
        return obj

    def create_one(self, ctx, cid, raw_obj):
        doc = self.checked_document(ctx, raw_obj)
        self.validate(ctx, doc, None)
        _check_size(self, doc)
        row = self.model(account_pk=ctx.account.pk, doc=json_dumps(doc), **self.index_of(doc))
        record_change(ctx.changes, self.name, row, "created")
        self.on_create(ctx, row, doc)
        self.search_write(row.pk, doc)
        ctx.created_ids[cid] = self.id_of(row.pk)
        answer = {"id": self.id_of(row.pk)}  # RFC 8620 §5.3: and what the client did not send
        answer.update((n, v) for n, v in doc.items() if not json_equal(v, raw_obj.get(n, ...)))
        answer.update((n, self.compute(ctx, row, n)) for n in self.computed)
        return answer

    def update_row(self, ctx, row, patch):
        current = self.document(row)
        patched = apply_patch(self, current, patch)
        changed = {name for name in set(current) | set(patched)
                   if not json_equal(current.get(name), patched.get(name))}
        if not changed:
            return None
        doc = self.checked_document(ctx, patched, changed)
        self.validate(ctx, doc, row)
        _check_size(self, doc)
        row.doc = json_dumps(doc)
        row.__dict__["_doc"] = doc
        for column, value in self.index_of(doc).items():
            setattr(row, column, value)
        record_change(ctx.changes, self.name, row, "updated")
        self.on_update(ctx, row, {name: doc.get(name) for name in changed})
        self.search_write(row.pk, doc)
        extra = {n: v for n, v in doc.items() if not json_equal(v, patched.get(n, ...))}
        return extra or None

    def copy_one(self, ctx, src, cid, raw_obj):
        original = copy_original(self, src, raw_obj)
        obj = {n: v for n, v in self.document(original).items()
               if n not in self.props or not self.props[n].server_set}
        obj.update((n, v) for n, v in raw_obj.items() if n != "id")
        created = set_create_one(self, ctx, cid, obj)
        created["id"] = ctx.created_ids[cid]
        return created

    def forget(self, ctx, row) -> None:
        if self.search:
            db.execute_sql(f"DELETE FROM {self.model._meta.table_name}_fts WHERE rowid = ?",
                           (row.pk,))

    def checked_document(self, ctx, obj: dict, changed: set | None = None) -> dict:
        """The document a create (changed None) or an update (the names it changes)
        makes: every (changed) property checked by kind, defaults filled in on create,
        unknown properties kept; invalidProperties with paths for what is wrong."""
        bad, doc = [], {}
        for name, value in obj.items():
            prop = self.props.get(name)
            if changed is not None and name not in changed:
                doc[name] = value  # as stored
            elif prop is None:
                if not self.keep_unknown or name == "id":
                    bad.append(name)
                doc[name] = value
            elif prop.server_set or (prop.immutable and changed is not None):
                bad.append(name)
            elif name not in self.computed:
                try:
                    doc[name] = prop_value(self, ctx, name, value)
                except ValueError as exc:
                    bad.append(property_path(name, exc))
        named = {entry.split("/", 1)[0] for entry in bad}  # a path names its property
        for name, prop in self.props.items():
            if name in doc or prop.server_set or name in self.computed or name in named:
                continue
            if prop.default is NO_DEFAULT:
                bad.append(name)  # required, and missing (or removed)
            elif changed is None:
                doc[name] = prop.default
        if bad:
            raise invalid_properties(bad)
        return doc

    def index_of(self, doc: dict) -> dict:
        return {column: extract(doc) for column, extract in self.index.items()}

    def search_write(self, pk: int, doc: dict) -> None:
        """The object's entry in its type's FTS5 table (replaced on every write)."""
        if not self.search:
            return
        table = f"{self.model._meta.table_name}_fts"
        db.execute_sql(f"DELETE FROM {table} WHERE rowid = ?", (pk,))
        columns = list(self.search)
        db.execute_sql(f"INSERT INTO {table} (rowid, {', '.join(columns)}) VALUES "
                       f"(?{', ?' * len(columns)})",
                       [pk, *(_CONTROL_CHARS_RE.sub(" ", str(self.search[c](doc) or ""))
                              for c in columns)])


def document_text_filter(spec: DocumentSpec) -> Callable:
    """The `text` filter of a document type: every word in one of its search columns
    (RFC 8621 §4.4.1's query syntax, as for Email)."""
    table = f"{spec.model._meta.table_name}_fts"

    def make(ctx, value):
        query = search_fts_query(a_str(value), None)
        return spec.model.pk.in_(peewee.SQL(f"(SELECT rowid FROM {table} WHERE {table} "
                                            "MATCH ?)", [query]))

    return make


# =============================================================================
# 6.4 CORE/ECHO AND BLOB/COPY
#     RFC 8620 §4: the arguments come back unchanged. §6.3: Blob/copy between accounts.
#     Upload and download are HTTP routes (section 13) over the blob store (4.4).
# =============================================================================


@jmap_method("Core/echo", CAP_CORE, takes_account=False)
def core_echo(ctx: Call, args: dict) -> dict:
    """Return the arguments unchanged (RFC 8620 §4)."""
    return args


BLOB_COPY_ARGS = {
    "fromAccountId": (a_id, REQUIRED),
    "accountId": (a_id, REQUIRED),
    "blobIds": (a_ids, REQUIRED),
}


@jmap_method("Blob/copy", CAP_CORE, writes=True)
def blob_copy(ctx: Call, raw_args: dict) -> dict:
    """Let another account see blobs this user can see (RFC 8620 §6.3)."""
    args = take_args(raw_args, BLOB_COPY_ARGS)
    src = _from_account(ctx, args["fromAccountId"])
    copied, not_copied = {}, {}
    for raw_blob_id in dict.fromkeys(args["blobIds"]):
        sha = blob_sha_from_id(raw_blob_id)
        blob = blob_visible(src.account.pk, sha, ctx.now, ctx.user.pk) if sha else None
        if blob is None:
            not_copied[raw_blob_id] = {"type": "notFound"}
            continue
        blob_add_ref(ctx.account.pk, sha, blob.size, "upload", ctx.now, owner_pk=ctx.user.pk,
                     expires_at=ctx.now + UPLOAD_TTL_SECONDS)
        copied[raw_blob_id] = raw_blob_id  # content-addressed: the same id everywhere
    return {"fromAccountId": src.account.id, "accountId": ctx.account.id,
            "copied": copied or None, "notCopied": not_copied or None}


# =============================================================================
# 6.5 CHANGE BUS AND EVENTSOURCE
#     After each commit the account's type states are published here. Commits by
#     other processes (deliver, import, user) are noticed by a watcher thread through
#     PRAGMA data_version on its own connection. EventSource and WebSocket push wait
#     on it. API: notify(account_pk), refresh(), states(account_pk), wait(...).
# =============================================================================


class ChangeBus:
    """Per-account type states and a condition to wait for them to change."""

    POLL_SECONDS = 0.2

    def __init__(self):
        self.states_lock = threading.Condition()
        self.states: dict[int, dict[str, str]] = {}
        self.modseqs: dict[int, int] = {}  # each account's modseq when last read
        self.versions: dict[int, int] = {}
        self.stopping = threading.Event()
        self.watcher: threading.Thread | None = None

    def refresh(self) -> set:
        """Publish what other connections committed: the accounts whose modseq moved (or
        that are gone) have their states read again; wake waiters of those that changed.

        States are merged by number under the lock, never replaced: a reader that was
        slow to get here cannot move a published state backwards."""
        modseqs = dict(db.execute_sql("SELECT pk, modseq FROM account").fetchall())
        with self.states_lock:
            moved = [pk for pk, modseq in modseqs.items() if self.modseqs.get(pk) != modseq]
            gone = [pk for pk in self.states if pk not in modseqs]
        changed = set()
        for account_pk in moved:
            changed |= self._merge(account_pk, self._read(account_pk), modseqs[account_pk])
        with self.states_lock:
            for account_pk in gone:  # a deleted account changes too
                self.states.pop(account_pk, None)
                self.modseqs.pop(account_pk, None)
                self._publish({account_pk})
        return changed | set(gone)

    def notify(self, account_pk: int) -> None:
        """Publish an account's states after a commit in this process."""
        row = db.execute_sql("SELECT modseq FROM account WHERE pk = ?", (account_pk,)).fetchone()
        self._merge(account_pk, self._read(account_pk), row[0] if row else None)

    @staticmethod
    def _read(account_pk: int) -> dict[str, int]:
        return dict(db.execute_sql("SELECT type_name, modseq FROM type_state WHERE "
                                   "account_pk = ?", (account_pk,)).fetchall())

    def _merge(self, account_pk: int, read: dict, modseq: int | None) -> set:
        """Take what was read where it is newer than what is published."""
        with self.states_lock:
            states = self.states.setdefault(account_pk, {})
            newer = {t: state_string(m) for t, m in read.items()
                     if m > int(states.get(t, -1))}
            if modseq is not None and modseq > self.modseqs.get(account_pk, -1):
                self.modseqs[account_pk] = modseq
            if not newer:
                return set()
            states.update(newer)
            self._publish({account_pk})
            return {account_pk}

    def _publish(self, account_pks: set) -> None:
        """Wake the waiters of these accounts (call with states_lock held)."""
        for pk in account_pks:
            self.versions[pk] = self.versions.get(pk, 0) + 1
        self.states_lock.notify_all()

    def snapshot(self, account_pk: int) -> tuple[int, dict]:
        """Return (version, {type: state}) for an account."""
        with self.states_lock:
            return self.versions.get(account_pk, 0), dict(self.states.get(account_pk, {}))

    def wait(self, account_pk: int, seen_version: int, timeout_s: float) -> tuple[int, dict]:
        """Block until the account's version passes seen_version or the timeout ends."""
        deadline = time.monotonic() + timeout_s
        with self.states_lock:
            while self.versions.get(account_pk, 0) == seen_version and not self.stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.states_lock.wait(remaining)
            return self.versions.get(account_pk, 0), dict(self.states.get(account_pk, {}))

    def wait_any(self, seen: dict, timeout_s: float) -> dict:
        """Block until any account in seen {pk: version} moves on; return {pk: version}."""
        deadline = time.monotonic() + timeout_s
        with self.states_lock:
            while not self.stopping.is_set() and all(
                self.versions.get(pk, 0) == version for pk, version in seen.items()
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.states_lock.wait(remaining)
            return {pk: self.versions.get(pk, 0) for pk in seen}

    def start_watcher(self, data_dir: str) -> None:
        """Watch for commits by other processes (PRAGMA data_version on a private connection)."""
        import sqlite3  # lazy: only serve needs the watcher's private connection

        def watch():
            conn = sqlite3.connect(db_path(data_dir), timeout=BUSY_TIMEOUT_MS / 1000)
            last = None
            try:
                while not self.stopping.wait(self.POLL_SECONDS):
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                    if version != last:
                        last = version
                        self._refresh_logged()
            finally:
                conn.close()

        self.refresh()
        self.watcher = threading.Thread(target=watch, name="change-bus", daemon=True)
        self.watcher.start()

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except peewee.OperationalError as exc:
            log.warning("change bus: %s", exc)

    def stop(self) -> None:
        self.stopping.set()
        with self.states_lock:
            self.states_lock.notify_all()


# ---- EventSource (RFC 8620 §7.3) ----

PING_MIN_S, PING_MAX_S = 1, 600  # RFC 8620 §7.3: the range must include 30..300
COALESCE_S = 0.05  # changes a moment apart go out as one StateChange


def push_event_id(states: dict) -> str:
    """An event id naming every state the user can see: account:modseq pairs."""
    return ",".join(f"{account_id}:{max(map(int, s.values()), default=0)}"
                    for account_id, s in sorted(states.items()))


def push_parse_event_id(raw: str) -> dict:
    """{account id: modseq} from a Last-Event-ID we made; {} for anything else."""
    seen = {}
    for item in (raw or "").split(","):
        account_id, _, modseq = item.partition(":")
        if is_valid_id(account_id) and re.fullmatch(r"[0-9]{1,18}", modseq):
            seen[account_id] = int(modseq)
    return seen


def push_state_changes(before: dict, after: dict, types) -> dict:
    """StateChange.changed: per account, the types whose state moved (RFC 8620 §7.1)."""
    changed = {}
    for account_id, states in after.items():
        old = before.get(account_id, {})
        moved = {t: s for t, s in states.items()
                 if old.get(t) != s and (types is None or t in types)}
        if moved:
            changed[account_id] = moved
    return changed


KEEPALIVE_S = 5  # with ping=0, an SSE comment now and then shows a closed client


class EventStreams:
    """The EventSource streams each user has open, against --max-push-connections.

    A stream whose client has gone gives its place up at once when another asks (a
    browser reloading a tab would else get a refusal, which EventSource never retries);
    a live stream is never ended to make room. A request that finds no place waits a
    moment for a leaving client to be noticed."""

    ADMIT_WAIT_S = 1.0

    def __init__(self):
        self.open_lock = threading.Condition()
        self.open: dict[int, list] = {}

    def admit(self, user: Account, gone: Callable, limit: int):
        """A ticket for a new stream, or None when the user's streams are all live."""
        deadline = time.monotonic() + self.ADMIT_WAIT_S
        with self.open_lock:
            while True:
                tickets = [t for t in self.open.get(user.pk, []) if not t.gone()]
                if len(tickets) < limit:
                    ticket = SimpleNamespace(gone=gone)
                    self.open[user.pk] = tickets + [ticket]
                    return ticket
                self.open[user.pk] = tickets
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.open_lock.wait(min(0.05, remaining))

    def leave(self, user: Account, ticket) -> None:
        with self.open_lock:
            tickets = [t for t in self.open.get(user.pk, []) if t is not ticket]
            if tickets:
                self.open[user.pk] = tickets
            else:
                self.open.pop(user.pk, None)
            self.open_lock.notify_all()


def push_event_stream(app, user: Account, types, close_after_state: bool, ping_s: int,
                      last_event_id: str | None, gone: Callable = lambda: False):
    """Yield text/event-stream chunks until closed, stopped or (closeafter) one state sent.

    `gone` tells whether the client has hung up (waitress's client_disconnected).
    """
    # RFC 8620 §7.3: with Last-Event-ID, what the client missed is sent at once
    watch = PushWatch(app, user, types, push_parse_event_id(last_event_id)
                      if last_event_id else None)
    yield ": jmapd event stream\n\n"
    last_event = last_write = time.monotonic()
    while not app.bus.stopping.is_set() and not gone():
        if not auth_still_valid(user):
            return  # the user or the credential is gone: the stream ends
        changed, now = watch.changes()
        if changed:
            body = json_dumps({"@type": "StateChange", "changed": changed})
            yield f"event: state\nid: {push_event_id(now)}\ndata: {body}\n\n"
            last_event = time.monotonic()
            if close_after_state:
                return
            continue
        if ping_s and time.monotonic() - last_event >= ping_s:
            yield f"event: ping\ndata: {json_dumps({'interval': ping_s})}\n\n"
            last_event = last_write = time.monotonic()
        elif not ping_s and time.monotonic() - last_write >= KEEPALIVE_S:
            yield ": keep-alive\n\n"  # a comment, not an event (RFC 8620 §7.3: no pings)
            last_write = time.monotonic()
        wait_s = ping_s - (time.monotonic() - last_event) if ping_s else KEEPALIVE_S
        watch.wait(min(1.0, max(0.01, wait_s)))


class PushWatch:
    """The states one push channel has told its client, and waiting for more
    (RFC 8620 §7.1); shared by EventSource and WebSocket push."""

    def __init__(self, app, user: Account, types, seen: dict | None):
        self.app, self.types, self.user = app, types, user
        self.accounts = {a.pk: a.id for a, _ in app.accessible_accounts(user).values()}
        self.versions = {pk: app.bus.snapshot(pk)[0] for pk in self.accounts}
        self.sent = self.states()
        if seen is not None:  # resuming: states newer than the client's count as changed
            self.sent = {a: {t: s for t, s in st.items() if int(s) <= seen.get(a, -1)}
                         for a, st in self.sent.items()}

    def states(self) -> dict:
        return {self.accounts[pk]: self.app.bus.snapshot(pk)[1] for pk in self.accounts}

    def changes(self) -> tuple[dict, dict]:
        """(StateChange.changed since the last call, all current states)."""
        changed, now = self.pending()
        if changed:
            self.mark_sent(now)
        return changed, now

    def pending(self) -> tuple[dict, dict]:
        """What changed since the client was last told, without counting it as told."""
        self.refresh_accounts()
        now = self.states()
        return push_state_changes(self.sent, now, self.types), now

    def mark_sent(self, states: dict) -> None:
        self.sent = states

    def refresh_accounts(self) -> None:
        """Follow shares given and taken back while the channel is open."""
        accounts = {a.pk: a.id for a, _ in self.app.accessible_accounts(self.user).values()}
        if accounts != self.accounts:
            self.accounts = accounts
            self.versions = {pk: self.versions.get(pk, self.app.bus.snapshot(pk)[0])
                             for pk in accounts}
            self.sent = {a: s for a, s in self.sent.items() if a in accounts.values()}

    def wait(self, timeout_s: float) -> None:
        """Until a watched account moves on (then a moment more, to coalesce) or timeout."""
        moved = self.app.bus.wait_any(self.versions, timeout_s)
        if moved != self.versions:
            self.versions = moved
            time.sleep(COALESCE_S)


# =============================================================================
# 6.6 PUSHSUBSCRIPTION -- RFC 8620 §7.2, with RFC 8291 encryption
#     Subscriptions belong to the credential that made them (the password or one
#     app password), not to an account: get and set take no accountId. PushSender
#     POSTs a PushVerification once, then StateChanges for the user's accounts
#     after each commit, with TTL and Urgency (RFC 8030 §5), back-off on failure,
#     and drops a subscription whose endpoint says 404/410 or that keeps failing.
# =============================================================================

MAX_PUSH_SUBSCRIPTIONS = 10  # per user (RFC 8620 §8.6)
MAX_PUSH_CREATES_PER_HOUR = 20
PUSH_MAX_EXPIRY_S = 7 * 86400  # RFC 8620 §7.2: at least 48 hours, SHOULD be 7 days
PUSH_TIMEOUT_S = 5
PUSH_DEADLINE_S = 15  # a whole POST, however slowly the receiver answers
PUSH_TTL_S = 86400
PUSH_RETRY_MAX_S = 3600
PUSH_GIVE_UP_S = 2 * 86400


class UnloggedChanges(ChangeLog):
    """A ChangeLog that records nothing: push subscriptions have no state (RFC 8620 §7.2)."""

    def next(self, type_name: str) -> int:
        return 0

    def mark(self) -> tuple:
        return (None, {})

    def rollback(self, mark: tuple) -> None:
        pass

    def flush(self) -> None:
        pass


def push_check_keys(value) -> dict:
    """keys: {p256dh, auth} in URL-safe base64; the key must be a point on P-256."""
    if not isinstance(value, dict) or set(value) != {"p256dh", "auth"} or not all(
            isinstance(v, str) for v in value.values()):
        raise ValueError("keys is {p256dh, auth}")
    try:
        p256_decode(b64url_decode(value["p256dh"]))
        if len(b64url_decode(value["auth"])) != 16:
            raise ValueError("auth is 16 octets")
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"keys: {exc}") from exc
    return value


def push_check_types(value) -> list:
    if not all(isinstance(t, str) for t in value):
        raise ValueError("types is a list of type names")
    return value


def push_url_addresses(url: str, allow_local: bool) -> tuple[str, int, list]:
    """(host, port, addresses) of a push URL: https only, and every address the name
    resolves to must be public (RFC 8620 §8.6), unless the test option allows loopback."""
    import ipaddress  # lazy: only push subscriptions resolve names

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" and not (allow_local and parts.scheme == "http"):
        raise ValueError("the url must begin with https://")
    if not parts.hostname or parts.username or parts.password:
        raise ValueError("the url needs a host and no user name")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{parts.hostname} does not resolve") from exc
    addresses = sorted({info[4][0] for info in infos})
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global and not (allow_local and ip.is_loopback):
            raise ValueError(f"{parts.hostname} resolves to {address}, not a public address")
    return parts.hostname, port, addresses


@register_type
class PushSubscriptionType(TypeSpec):
    """PushSubscription (RFC 8620 §7.2): served by push_subscription_get/set below."""

    name, capability, model, id_prefix = "PushSubscription", CAP_CORE, PushSubscription, "P"
    methods = ()  # not the standard methods: no accountId, no state
    props = {
        "id": Prop("id", server_set=True, immutable=True),
        "deviceClientId": Prop("str", "device_client_id", immutable=True, max_len=255),
        "url": Prop("str", "url", immutable=True, max_len=2048),
        "keys": Prop("object", "keys", default=None, nullable=True, immutable=True, json=True,
                     check=push_check_keys),
        "verificationCode": Prop("str", "verification_code", default=None, nullable=True,
                                 max_len=255),
        "expires": Prop("utcdate", "expires", default=None, nullable=True),
        "types": Prop("list", "types", default=None, nullable=True, json=True,
                      check=push_check_types),
    }
    # RFC 8620 §7.2.1: url and keys are never returned
    default_properties = ["id", "deviceClientId", "verificationCode", "expires", "types"]

    def live(self, ctx, keyed=False):
        return super().live(ctx, keyed).where(PushSubscription.credential == ctx.user.credential)

    def validate(self, ctx, values, row):
        latest = ctx.now + PUSH_MAX_EXPIRY_S  # the server may shorten expires (§7.2)
        if values["expires"] is None or parse_utc_date(values["expires"]) > latest:
            values["expires"] = utc_date(latest)
        if row is not None:
            if values["verificationCode"] not in (row.verification_code, row.expected_code):
                raise invalid_properties(["verificationCode"], "not the code that was pushed")
            return
        if values["verificationCode"] is not None:
            raise invalid_properties(["verificationCode"], "null until the code is pushed")
        problem = ctx.scratch.get("push_urls", {}).get(values["url"], "was not checked")
        if problem:  # resolved by push_set_prepare, before the write transaction
            raise invalid_properties(["url"], problem)
        mine = PushSubscription.select().where(PushSubscription.account_pk == ctx.user.pk)
        if mine.where(PushSubscription.destroyed == False).count() >= MAX_PUSH_SUBSCRIPTIONS:  # noqa: E712
            raise SetError("overQuota", f"at most {MAX_PUSH_SUBSCRIPTIONS} push subscriptions")
        if mine.where(PushSubscription.created_at > ctx.now - 3600).count() >= \
                MAX_PUSH_CREATES_PER_HOUR:
            raise SetError("rateLimit", "too many push subscriptions made in the last hour")

    def on_create(self, ctx, row, values):
        PushSubscription.update(credential=ctx.user.credential, created_at=int(ctx.now),
                                expected_code=secrets.token_hex(16)).where(
            PushSubscription.pk == row.pk).execute()
        ctx.after_commit.append(ctx.app.push_wake.set)

    def on_update(self, ctx, row, values):
        if "verificationCode" in values and row.verification_code == row.expected_code:
            # Verified: changes from this moment on are pushed, even the very next one.
            row.pushed_state = push_event_id({
                account.id: {"all": str(db.execute_sql(
                    "SELECT modseq FROM account WHERE pk = ?", (account.pk,)).fetchone()[0])}
                for account, _ in ctx.app.accessible_accounts(ctx.user).values()})
            row.save()
        ctx.after_commit.append(ctx.app.push_wake.set)

    def on_destroy(self, ctx, row, args):
        row.url, row.keys, row.expected_code = "", None, ""  # saved with the tombstone


def push_drop(where) -> None:
    """Destroy subscriptions outside a /set: their url and keys erased at once (RFC 8620
    §7.2); the erased rows stay a while so the hourly creation limit still counts them."""
    PushSubscription.update(destroyed=True, destroyed_at=int(time.time()), url="", keys=None,
                            expected_code="").where(where).execute()


PUSH_GET_ARGS = {"ids": (nullable(a_ids), None), "properties": (nullable(a_strs), None)}
PUSH_SET_ARGS = {"create": (nullable(a_obj), None), "update": (nullable(a_obj), None),
                 "destroy": (nullable(a_ids), None)}


def _push_context(ctx: Call) -> TypeSpec:
    ctx.account, ctx.read_only = ctx.user, False  # scoped by credential in live()
    ctx.changes = UnloggedChanges(ctx.user.pk, ctx.now)
    return TYPES["PushSubscription"]


@jmap_method("PushSubscription/get", CAP_CORE, takes_account=False)
def push_subscription_get(ctx: Call, raw_args: dict) -> dict:
    """RFC 8620 §7.2.1: no accountId, no state; url and keys are forbidden."""
    spec = _push_context(ctx)
    args = take_args(raw_args, PUSH_GET_ARGS)
    if args["properties"] is not None and {"url", "keys"} & set(args["properties"]):
        raise MethodError("forbidden", "url and keys are never returned")
    result = method_get(spec, ctx, {**raw_args, "accountId": ctx.account.id})
    return {"list": result["list"], "notFound": result["notFound"]}


def push_set_prepare(ctx: Call, raw_args: dict) -> None:
    """Resolve the URLs of new subscriptions before the write transaction: a slow
    resolver must not hold every other writer (and every delivery) waiting. The push
    itself resolves again and connects to what it checked (push_post)."""
    checked = ctx.scratch.setdefault("push_urls", {})
    create = raw_args.get("create")
    for obj in (create.values() if isinstance(create, dict) else ()):
        url = obj.get("url") if isinstance(obj, dict) else None
        if isinstance(url, str) and url not in checked and len(checked) < MAX_PUSH_SUBSCRIPTIONS:
            try:
                push_url_addresses(url, ctx.app.cfg.test_push_allow_loopback)
                checked[url] = None
            except ValueError as exc:
                checked[url] = str(exc)


@jmap_method("PushSubscription/set", CAP_CORE, writes=True, takes_account=False,
             prepare=push_set_prepare)
def push_subscription_set(ctx: Call, raw_args: dict) -> dict:
    """RFC 8620 §7.2.2: no accountId, ifInState, oldState or newState."""
    spec = _push_context(ctx)
    take_args(raw_args, PUSH_SET_ARGS)
    result = method_set(spec, ctx, {**raw_args, "accountId": ctx.account.id})
    return {k: result[k] for k in ("created", "updated", "destroyed", "notCreated",
                                   "notUpdated", "notDestroyed")}


def push_forget_credential(account_pk: int, credential: str) -> None:
    """A revoked or changed credential takes its subscriptions with it (RFC 8620 §7.2)."""
    push_drop((PushSubscription.account_pk == account_pk)
              & (PushSubscription.credential == credential))


class PushSender:
    """One thread POSTing verifications and StateChanges to verified subscriptions."""

    def __init__(self, app):
        self.app = app
        self.watches: dict[int, PushWatch] = {}
        self.thread = threading.Thread(target=self.run, daemon=True, name="push")

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        while not self.app.bus.stopping.is_set():
            self.app.push_wake.clear()  # before the round: a wake-up during it is kept
            for watch in self.watches.values():  # wake on what moves after this point
                watch.versions = {pk: self.app.bus.snapshot(pk)[0] for pk in watch.versions}
            try:
                self.round()
            except peewee.OperationalError as exc:
                log.warning("push: database busy (%s)", exc)
            except Exception:  # noqa: BLE001 -- a bug must not end pushing for everyone
                log.exception("push: round failed")
            versions = {}
            for watch in self.watches.values():
                versions.update(watch.versions)
            if versions and not self.app.push_wake.is_set():
                self.app.bus.wait_any(versions, 0.25)  # new subscriptions seen soon too
            else:
                self.app.push_wake.wait(1.0)

    def round(self) -> None:
        now = self.app.clock.now()
        expired = [pk for (pk,) in PushSubscription.select(PushSubscription.pk).where(
            (PushSubscription.destroyed == False)  # noqa: E712
            & (PushSubscription.expires < now)).tuples()]
        if expired:  # RFC 8620 §7.2: no requests after expires
            push_drop(PushSubscription.pk.in_(expired))
        rows = list(PushSubscription.select().where(
            (PushSubscription.destroyed == False)  # noqa: E712
            & (PushSubscription.next_attempt_at <= now)))
        live = {pk for (pk,) in PushSubscription.select(PushSubscription.pk).where(
            PushSubscription.destroyed == False).tuples()}  # noqa: E712
        self.watches = {pk: w for pk, w in self.watches.items() if pk in live}
        for row in rows:
            if not row.verification_sent:
                body = {"@type": "PushVerification",
                        "pushSubscriptionId": type_id("PushSubscription", row.pk),
                        "verificationCode": row.expected_code}
                if self.post(row, body, "normal"):
                    PushSubscription.update(verification_sent=True).where(
                        PushSubscription.pk == row.pk).execute()
                continue
            if row.verification_code != row.expected_code:
                continue  # RFC 8620 §7.2: nothing more until verified
            types = set(json.loads(row.types)) if row.types else None
            watch = self.watches.get(row.pk)
            if watch is None or watch.types != types:  # new, or its types were changed
                user = Account.get_or_none(Account.pk == row.account_pk)
                seen = push_parse_event_id(row.pushed_state) if row.pushed_state else None
                watch = self.watches[row.pk] = PushWatch(self.app, user, types, seen)
            changed, states = watch.pending()
            if changed and self.post(row, {"@type": "StateChange", "changed": changed},
                                     "high" if any("EmailDelivery" in c for c in changed.values())
                                     else "normal"):
                watch.mark_sent(states)
                PushSubscription.update(pushed_state=push_event_id(states)).where(
                    PushSubscription.pk == row.pk).execute()  # a restart goes on from here

    def post(self, row: PushSubscription, body: dict, urgency: str) -> bool:
        """POST one push message; record success, back off, or drop the subscription."""
        payload = json_dumps(body).encode()
        headers = {"TTL": str(PUSH_TTL_S), "Urgency": urgency,
                   "Content-Type": "application/json"}
        if row.keys:
            keys = json.loads(row.keys)
            payload = webpush_encrypt(payload, b64url_decode(keys["p256dh"]),
                                      b64url_decode(keys["auth"]))
            headers.update({"Content-Encoding": "aes128gcm",
                            "Content-Type": "application/octet-stream"})
        status, retry_after = push_post(row.url, payload, headers,
                                        self.app.cfg.test_push_allow_loopback)
        now = self.app.clock.now()
        if 200 <= status < 300:
            PushSubscription.update(failures=0, failing_since=None, next_attempt_at=0).where(
                PushSubscription.pk == row.pk).execute()
            return True
        if status in (404, 410) or (row.failing_since and now - row.failing_since > PUSH_GIVE_UP_S):
            log.info("push subscription %d dropped (%s)", row.pk, status or "unreachable")
            push_drop(PushSubscription.pk == row.pk)
            return False
        delay = retry_after or min(10 * 2 ** row.failures, PUSH_RETRY_MAX_S)  # 429: slower
        PushSubscription.update(failures=row.failures + 1, failing_since=row.failing_since
                                or int(now), next_attempt_at=int(now + delay)).where(
            PushSubscription.pk == row.pk).execute()
        log.info("push subscription %d: %s; next try in %d s", row.pk, status or "unreachable",
                 delay)
        return False


def push_post(url: str, payload: bytes, headers: dict, allow_local: bool) -> tuple[int, int]:
    """POST to a push URL, connecting to the address just checked (no DNS rebinding);
    return (status or 0 if unreachable, Retry-After seconds or 0)."""
    import http.client  # lazy: only push sends
    import ssl

    try:
        host, port, addresses = push_url_addresses(url, allow_local)
        parts = urllib.parse.urlsplit(url)
        sock = socket.create_connection((addresses[0], port), timeout=PUSH_TIMEOUT_S)
        if parts.scheme == "https":
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
            connection = http.client.HTTPSConnection(host, port, timeout=PUSH_TIMEOUT_S,
                                                     context=context)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=PUSH_TIMEOUT_S)
        connection.sock = sock
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        deadline = threading.Timer(PUSH_DEADLINE_S, lambda: sock.shutdown(socket.SHUT_RDWR))
        deadline.start()  # a receiver answering a byte at a time cannot hold the sender
        try:
            connection.request("POST", path, body=payload, headers=headers)
            response = connection.getresponse()
            response.read(65536)
        finally:
            deadline.cancel()
            connection.close()
        retry = response.getheader("Retry-After") or ""
        return response.status, int(retry) if retry.isdigit() else 0
    except (OSError, ValueError, http.client.HTTPException) as exc:
        log.info("push to %s failed: %s", urllib.parse.urlsplit(url).hostname, exc)
        return 0, 0


# ---- Web Push message encryption (RFC 8291 over RFC 8188 aes128gcm) ----
# Neither the standard library nor the allowed packages offer ECDH or AES-GCM, so the
# small amount needed is here: P-256 (SEC 2 §2.4.2) point arithmetic and AES-128 in GCM
# mode (NIST SP 800-38D). Only public values and one-off keys pass through it; it is
# checked against RFC 8291 Appendix A in the tests.

P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
P256_A = P256_P - 3
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
          0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)


def p256_on_curve(point) -> bool:
    x, y = point
    return 0 <= x < P256_P and 0 <= y < P256_P and (
        y * y - (x * x * x + P256_A * x + P256_B)) % P256_P == 0


def p256_multiply(k: int, point) -> tuple[int, int]:
    """k * point in affine coordinates (a Montgomery ladder over Jacobian points)."""
    def double(p):
        x, y, z = p
        if not y:
            return (0, 1, 0)
        s = 4 * x * y * y % P256_P
        m = (3 * x * x + P256_A * pow(z, 4, P256_P)) % P256_P
        nx = (m * m - 2 * s) % P256_P
        return nx, (m * (s - nx) - 8 * pow(y, 4, P256_P)) % P256_P, 2 * y * z % P256_P

    def add(p, q):
        if not p[2]:
            return q
        if not q[2]:
            return p
        z1z1, z2z2 = p[2] * p[2] % P256_P, q[2] * q[2] % P256_P
        u1, u2 = p[0] * z2z2 % P256_P, q[0] * z1z1 % P256_P
        s1, s2 = p[1] * z2z2 * q[2] % P256_P, q[1] * z1z1 * p[2] % P256_P
        if u1 == u2:
            return double(p) if s1 == s2 else (0, 1, 0)
        h, r = (u2 - u1) % P256_P, (s2 - s1) % P256_P
        hh = h * h % P256_P
        hhh = h * hh % P256_P
        nx = (r * r - hhh - 2 * u1 * hh) % P256_P
        return nx, (r * (u1 * hh - nx) - s1 * hhh) % P256_P, h * p[2] * q[2] % P256_P

    r0, r1 = (0, 1, 0), (point[0], point[1], 1)
    for bit in bin(k)[2:]:
        if bit == "1":
            r0, r1 = add(r0, r1), double(r1)
        else:
            r0, r1 = double(r0), add(r0, r1)
    x, y, z = r0
    if not z:
        raise ValueError("the point at infinity")
    zi = pow(z, P256_P - 2, P256_P)
    return x * zi * zi % P256_P, y * zi * zi * zi % P256_P


def p256_decode(raw: bytes) -> tuple[int, int]:
    """An uncompressed public key (0x04 || X || Y) that lies on the curve."""
    if len(raw) != 65 or raw[0] != 4:
        raise ValueError("not an uncompressed P-256 point")
    point = int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big")
    if not p256_on_curve(point):
        raise ValueError("not on P-256")
    return point


def p256_encode(point) -> bytes:
    return b"\x04" + point[0].to_bytes(32, "big") + point[1].to_bytes(32, "big")


def _aes_tables():
    sbox, p, q = [0] * 256, 1, 1
    while True:  # the S-box from the multiplicative inverse and the affine map (FIPS 197)
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        for shift in (1, 2, 4):
            q ^= q << shift
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        rot = lambda v, n: ((v << n) | (v >> (8 - n))) & 0xFF  # noqa: E731
        sbox[p] = q ^ rot(q, 1) ^ rot(q, 2) ^ rot(q, 3) ^ rot(q, 4) ^ 0x63
        if p == 1:
            break
    sbox[0] = 0x63
    return sbox


AES_SBOX = _aes_tables()


def _xtime(b: int) -> int:
    return ((b << 1) ^ 0x1B) & 0xFF if b & 0x80 else b << 1


def aes128_round_keys(key: bytes) -> list:
    words = [list(key[i:i + 4]) for i in range(0, 16, 4)]
    rcon = 1
    for i in range(4, 44):
        word = list(words[i - 1])
        if i % 4 == 0:
            word = [AES_SBOX[b] for b in word[1:] + word[:1]]
            word[0] ^= rcon
            rcon = _xtime(rcon)
        words.append([a ^ b for a, b in zip(words[i - 4], word)])
    return [sum(words[r * 4:r * 4 + 4], []) for r in range(11)]


def aes128_block(round_keys: list, block: bytes) -> bytes:
    """Encrypt one 16-octet block (FIPS 197 §5.1); state in column order."""
    s = [b ^ k for b, k in zip(block, round_keys[0])]
    for r in range(1, 11):
        s = [AES_SBOX[b] for b in s]
        s = [s[(i + 4 * (i % 4)) % 16] for i in range(16)]  # ShiftRows
        if r < 10:
            mixed = []
            for c in range(4):
                a = s[4 * c:4 * c + 4]
                t = a[0] ^ a[1] ^ a[2] ^ a[3]
                mixed += [a[i] ^ t ^ _xtime(a[i] ^ a[(i + 1) % 4]) for i in range(4)]
            s = mixed
        s = [b ^ k for b, k in zip(s, round_keys[r])]
    return bytes(s)


def _gf128_multiply(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (bit-reflected, SP 800-38D §6.3)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def aes128_gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    """AES-128-GCM with a 96-bit nonce and no associated data: ciphertext || 16-octet tag."""
    keys = aes128_round_keys(key)
    h = int.from_bytes(aes128_block(keys, bytes(16)), "big")
    counter = int.from_bytes(nonce + b"\x00\x00\x00\x01", "big")
    out = bytearray()
    for i in range(0, len(plaintext), 16):
        counter = (counter & ~0xFFFFFFFF) | ((counter + 1) & 0xFFFFFFFF)
        stream = aes128_block(keys, counter.to_bytes(16, "big"))
        out += bytes(a ^ b for a, b in zip(plaintext[i:i + 16], stream))
    tag = 0
    padded = bytes(out) + bytes(-len(out) % 16)
    for i in range(0, len(padded), 16):
        tag = _gf128_multiply(tag ^ int.from_bytes(padded[i:i + 16], "big"), h)
    tag = _gf128_multiply(tag ^ (len(out) * 8), h)  # lengths block: 0 AAD bits, then C bits
    j0 = aes128_block(keys, nonce + b"\x00\x00\x00\x01")
    return bytes(out) + (tag ^ int.from_bytes(j0, "big")).to_bytes(16, "big")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hmac256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, "sha256").digest()


def webpush_encrypt(plaintext: bytes, ua_public: bytes, auth_secret: bytes,
                    as_private: int | None = None, salt: bytes | None = None) -> bytes:
    """An aes128gcm body for a push subscription's keys (RFC 8291 §3.4, RFC 8188 §2)."""
    as_private = as_private or secrets.randbelow(P256_N - 1) + 1
    salt = salt or secrets.token_bytes(16)
    as_public = p256_encode(p256_multiply(as_private, P256_G))
    shared = p256_multiply(as_private, p256_decode(ua_public))[0].to_bytes(32, "big")
    prk_key = _hmac256(auth_secret, shared)
    ikm = _hmac256(prk_key, b"WebPush: info\x00" + ua_public + as_public + b"\x01")
    prk = _hmac256(salt, ikm)
    cek = _hmac256(prk, b"Content-Encoding: aes128gcm\x00\x01")[:16]
    nonce = _hmac256(prk, b"Content-Encoding: nonce\x00\x01")[:12]
    record = max(4096, len(plaintext) + 1 + 16)  # one record holds it all (RFC 8188 §2)
    header = salt + record.to_bytes(4, "big") + bytes([len(as_public)]) + as_public
    return header + aes128_gcm_encrypt(cek, nonce, plaintext + b"\x02")  # one last record


# =============================================================================
# 7 MAIL
# =============================================================================

# =============================================================================
# 7.1 MIME -> EMAIL
#     RFC 8621 §4.1. The MIME tree is cut at its boundaries here (mime_tree), parts are
#     offsets into the raw message, so every part's raw octets and raw header values are
#     exact. Everything is our own and linear in its input (a stranger chooses it):
#     parameters (RFC 2045, RFC 2231), header forms (§4.1.2), HTML to text, base subjects.
#     Entry points: mime_email(), mime_header_value().
# =============================================================================

MAX_MIME_DEPTH = 20
MAX_MIME_PARTS = 500
MAX_PARSED_ADDRESSES = 2000  # of one header field (the Raw form keeps the rest)
PREVIEW_CHARS = 256  # RFC 8621 §4.1.4: at most 256 characters
HEADER_FORMS = ("Raw", "Text", "Addresses", "GroupedAddresses", "MessageIds", "Date", "URLs")
_ADDRESS_HEADERS = {"from", "sender", "reply-to", "to", "cc", "bcc", "resent-from",
                    "resent-sender", "resent-reply-to", "resent-to", "resent-cc", "resent-bcc"}
_MSGID_HEADERS = {"message-id", "in-reply-to", "references", "resent-message-id"}
_DATE_HEADERS = {"date", "resent-date"}
_URL_HEADERS = {"list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner",
                "list-archive"}
_TEXT_HEADERS = {"subject", "comments", "keywords", "list-id"}
# Fields RFC 5322 and RFC 2369 define: only the forms RFC 8621 §4.1.2 lists apply to them.
_DEFINED_HEADERS = (_ADDRESS_HEADERS | _MSGID_HEADERS | _DATE_HEADERS | _URL_HEADERS
                    | {"subject", "comments", "keywords", "return-path", "received"})
_FORM_HEADERS = {"Text": _TEXT_HEADERS, "Addresses": _ADDRESS_HEADERS,
                 "GroupedAddresses": _ADDRESS_HEADERS, "MessageIds": _MSGID_HEADERS,
                 "Date": _DATE_HEADERS, "URLs": _URL_HEADERS}
HEADER_PROP_RE = re.compile(r"^header:([\x21-\x39\x3b-\x7e]+)(?::as([A-Za-z]+))?(:all)?\Z")
ENCODED_WORD_RE = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_HEADER_NAME_BAD_RE = re.compile(rb"[\x00-\x20\x7f-\xff]")
# Possessive quantifiers (Python 3.11): a long quoted string is read once, without the
# backtracking state a plain (a|b)* keeps per character (that made it superlinear).
_PARAM_TOKEN_RE = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?|[^";]++|;', re.S)
_PARAM_NAME_RE = re.compile(r"([^*\s]+)(?:\*([0-9]{1,4}))?(\*)?")
_COMMENT_TOKEN_RE = re.compile(r'[^()"\\]+|.', re.S)
_CONTROL_CHARS_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # Unicode Cc but TAB
# Codecs Python knows that are no charset a message may name (RFC 2978): decoding with
# them fails whatever the errors handler, or turns octets into something else entirely.
_NOT_CHARSETS = frozenset({"undefined", "idna", "punycode", "unicode-escape",
                           "raw-unicode-escape"})  # as codecs.lookup() names them


class MimeError(ValueError):
    """A message or part that cannot be read as MIME at all."""


@dataclass
class MimePart:
    """One MIME entity: its exact raw header fields, where its body lies in the message's
    one buffer (offsets: nesting never copies a body), and its children."""

    headers: list  # [(name, raw value str)], raw value as in RFC 8621 §4.1.2.1
    raw: bytes  # the whole message, shared by every part of it
    start: int  # the body is raw[start:end]
    end: int
    type: str = "text/plain"
    part_id: str | None = None
    sub_parts: list = field(default_factory=list)
    decoded: bytes | None = None
    cte_known: bool = True
    param_cache: dict = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        """The body octets (a copy: only the leaves that are read ask for it)."""
        return self.raw[self.start:self.end]

    def header(self, name: str) -> str | None:
        """The raw value of the last field with this name, or None."""
        for field_name, value in reversed(self.headers):
            if field_name.lower() == name:
                return value
        return None

    def params(self, header: str = "content-type") -> dict:
        """{name: (value, came as RFC 2231)} of Content-Type or Content-Disposition."""
        if header not in self.param_cache:
            value = self.header(header)
            self.param_cache[header] = mime_params(value) if value is not None else {}
        return self.param_cache[header]

    def param(self, name: str, header: str = "content-type") -> str | None:
        found = self.params(header).get(name)
        return found[0] if found else None


def mime_split(raw: bytes) -> tuple[bytes, bytes]:
    """Split an entity into its header block and its body at the first empty line."""
    head_end, body_start = _mime_head_end(raw, 0, len(raw))
    return raw[:head_end], raw[body_start:]


def _mime_head_end(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """Offsets of the end of raw[start:end]'s header block and of the start of its body:
    the first empty line (CRLF or LF), found with find() (memchr), not a regex that tries
    every position of a ten-megabyte header."""
    if raw.startswith(b"\r\n", start, end):
        return start, start + 2
    if raw.startswith(b"\n", start, end):
        return start, start + 1
    found = []
    lf_lf = raw.find(b"\n\n", start, end)
    if lf_lf >= 0:
        found.append((lf_lf - (raw[lf_lf - 1:lf_lf] == b"\r"), lf_lf + 2))
    lf_crlf = raw.find(b"\n\r\n", start, end)
    if lf_crlf >= 0:
        found.append((lf_crlf - (raw[lf_crlf - 1:lf_crlf] == b"\r"), lf_crlf + 3))
    return min(found) if found else (end, end)


def mime_header_fields(block: bytes) -> list:
    """Cut a header block into (name, raw value) fields, keeping folding as it is.

    lenient: a line that is neither a field nor a continuation is dropped (its
    continuation lines join the field before it, or go too when no field came before);
    NUL octets are dropped (RFC 8621 §4.1.2.1). The block is cut at the line ends that start a field, so a field folded
    a million times is one piece, not a million small objects.
    """
    block = block.replace(b"\0", b"")
    fields, start = [], 0
    for match in itertools.chain(_FIELD_START_RE.finditer(block), (None,)):
        stop = match.start() if match else len(block)
        head, folded, rest = block[start:stop].partition(b"\n")
        start = match.end() if match else len(block)
        if head.endswith(b"\r"):
            head = head[:-1]
        if folded:  # the continuation lines: CRLF between them, one CR less at each end
            rest = rest.replace(b"\r\n", b"\n")
            rest = (rest[:-1] if rest.endswith(b"\r") else rest).replace(b"\n", b"\r\n")
        name, sep, value = head.partition(b":")
        name = name.strip()
        if head[:1] in (b" ", b"\t") or not sep or not name or _HEADER_NAME_BAD_RE.search(name):
            if folded and fields and head[:1] not in (b" ", b"\t"):
                fields[-1][1].append(rest)
            continue
        fields.append((name, [value, rest] if folded else [value]))
    return [(n.decode("ascii", "replace"), _raw_text(b"\r\n".join(v))) for n, v in fields]


_FIELD_START_RE = re.compile(rb"\n(?![ \t])")  # a line end after which a field begins


def _raw_text(value: bytes) -> str:
    """Raw form text: UTF-8, invalid octet runs replaced by U+FFFD (RFC 8621 §4.1.2.1)."""
    return value.decode("utf-8", "replace")


def mime_tree(raw: bytes, default_type: str = "text/plain", depth: int = 0,
              counter: dict | None = None, start: int = 0, end: int | None = None) -> MimePart:
    """Parse the entity raw[start:end] into MimeParts, numbering leaves 1, 2, … depth-first.

    Every part keeps offsets into the one buffer, so a message nested twenty levels
    deep costs its own size once, not once per level."""
    counter = counter if counter is not None else {"parts": 0, "leaves": 0}
    end = len(raw) if end is None else end
    head_end, body_start = _mime_head_end(raw, start, end)
    part = MimePart(mime_header_fields(raw[start:head_end]), raw, body_start, end)
    part.type = _mime_type(part, default_type)
    counter["parts"] += 1
    if counter["parts"] > MAX_MIME_PARTS:
        raise MimeError("too many MIME parts")
    if part.type.startswith("multipart/"):
        boundary = part.param("boundary")
        if boundary and depth < MAX_MIME_DEPTH:
            child_type = "message/rfc822" if part.type == "multipart/digest" else "text/plain"
            marker = b"--" + boundary.encode("utf-8", "replace")
            for child_start, child_end in _mime_children(raw, body_start, end, marker):
                part.sub_parts.append(
                    mime_tree(raw, child_type, depth + 1, counter, child_start, child_end))
            return part
        part.type = "text/plain"  # lenient: a multipart without a usable boundary
    counter["leaves"] += 1
    part.part_id = str(counter["leaves"])
    return part


def mime_strip_comments(value: str) -> str:
    """Remove RFC 5322 comments (nested, with quoted-pairs) outside quoted strings.

    Runs of ordinary characters are one token each, so the loop is over the few
    special characters, not over every character."""
    if "(" not in value:
        return value
    out, depth, quoted, escaped = [], 0, False, False
    for token in _COMMENT_TOKEN_RE.findall(value):
        if escaped:  # the character after a backslash is itself (RFC 5322 §3.2.1)
            escaped = False
        elif token == "\\" and (quoted or depth):
            escaped = True
        elif token == '"' and not depth:
            quoted = not quoted
        elif token == "(" and not quoted:
            depth += 1
            if depth == 1:
                out.append(" ")
            continue
        elif token == ")" and depth:
            depth -= 1
            continue
        if not depth:
            out.append(token)
    return "".join(out)


def mime_params(value: str) -> dict:
    """The parameters of a Content-Type or Content-Disposition value (RFC 2045 §5.1):
    {name in lower case: (value, whether it came in RFC 2231 form)}.

    Quoted strings are unquoted; RFC 2231 continuations (name*0, name*1, …) are joined
    and extended values (name*=charset'lang'%XX) decoded. The extended form wins over
    sections, sections over the plain form; the first of duplicates counts. Malformed
    pieces are skipped, never fatal, and the value is read in one pass."""
    pieces, current = [], []
    for token in _PARAM_TOKEN_RE.findall(mime_strip_comments(_unfold(value))):
        if token == ";":
            pieces.append("".join(current))
            current = []
        else:
            current.append(token)
    pieces.append("".join(current))
    plain, sections, extended = {}, {}, {}
    for piece in pieces[1:]:  # the first is the media type or the disposition
        name, sep, raw_value = piece.partition("=")
        match = _PARAM_NAME_RE.fullmatch(name.strip().lower())
        if not sep or not match:
            continue
        raw_value = _param_unquote(raw_value.strip())
        base, section, star = match.groups()
        if section is not None:
            sections.setdefault(base, {}).setdefault(int(section), (bool(star), raw_value))
        elif star:
            extended.setdefault(base, raw_value)
        else:
            plain.setdefault(base, raw_value)
    found = {name: (text, False) for name, text in plain.items()}
    for base, parts in sections.items():  # RFC 2231 §3: in section order
        ordered = [parts[index] for index in sorted(parts)]
        found[base] = (_rfc2231_join(ordered), any(star for star, _ in ordered))
    for base, raw_value in extended.items():
        found[base] = (_rfc2231_join([(True, raw_value)]), True)
    return found


def _param_unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    inner = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
    return re.sub(r"\\(.)", r"\1", inner, flags=re.S) if "\\" in inner else inner


def _rfc2231_join(parts: list) -> str:
    """One value from RFC 2231 sections [(extended, text)]: an extended section is
    %-encoded octets, the first one prefixed by charset'language' (RFC 2231 §4)."""
    from urllib.parse import unquote_to_bytes  # lazy: mail reading only

    charset, data = "us-ascii", bytearray()
    for index, (extended, text) in enumerate(parts):
        if not extended:
            data += text.encode("utf-8", "replace")  # lenient: raw 8-bit taken as UTF-8
            continue
        if index == 0 and text.count("'") >= 2:
            named, _language, text = text.split("'", 2)
            charset = named or "us-ascii"
        data += unquote_to_bytes(text)
    if not data.isascii() and charset.lower() in ("us-ascii", "ascii"):
        charset = "utf-8"  # lenient: 8-bit octets labelled ASCII are most often UTF-8
    return mime_decode_text(bytes(data), charset)[0]


@functools.lru_cache(maxsize=256)
def mime_text_codec(charset: str | None) -> str | None:
    """The Python codec for a charset a message names, or None if there is none that
    decodes octets to text: unknown names, and codecs such as rot13, zlib, base64, hex,
    uu, quoted-printable, idna or undefined, which are not text encodings."""
    import codecs  # lazy: mail reading only

    if not charset:
        return None
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        return None  # _is_text_encoding: how codecs itself marks bytes-to-bytes codecs
    return info.name


def mime_decode_text(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode octets in the charset a message names, never failing: (text, problem).
    Without a usable codec the octets are read as UTF-8 with U+FFFD for the rest."""
    codec = mime_text_codec(charset)
    if codec is not None:
        try:
            text = data.decode(codec, "replace")
        except (UnicodeError, LookupError, ValueError, TypeError):
            pass  # a codec that fails whatever the errors handler says
        else:  # UTF-7 and UTF-16 can yield lone surrogates, which no UTF-8 can carry
            if not text.isascii() and _SURROGATE_RE.search(text):
                return _SURROGATE_RE.sub("\ufffd", text), True
            return text, False
    return data.decode("utf-8", "replace"), True


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _mime_type(part: MimePart, default_type: str) -> str:
    """The part's media type, lower case, without parameters (RFC 8621 §4.1.4 `type`)."""
    value = part.header("content-type")
    if value is None:
        return default_type
    media = re.sub(r"\s+", "", mime_strip_comments(_unfold(value)).partition(";")[0]).lower()
    if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", media):
        return "text/plain"  # RFC 2045 §5.2: a malformed Content-Type means text/plain
    return media


def _mime_children(raw: bytes, start: int, end: int, marker: bytes) -> list[tuple[int, int]]:
    """Cut the multipart body raw[start:end] at its delimiter lines (RFC 2046 §5.1.1);
    return each part's (start, end) offsets.

    The CRLF before a delimiter belongs to the delimiter; a missing close delimiter
    ends the last part at the end of the body (lenient).
    """
    chunks, first, at = [], None, start
    while True:
        at = raw.find(marker, at, end)
        if at < 0:
            break
        if at > start and raw[at - 1] != 0x0A:
            at += len(marker)
            continue  # not at the start of a line
        line_end = raw.find(b"\n", at, end)
        line_end = end if line_end < 0 else line_end
        rest = raw[at + len(marker): line_end].rstrip(b"\r \t")
        if rest not in (b"", b"--"):
            at += len(marker)
            continue  # a longer boundary that merely starts the same way
        if first is not None:
            cut = at - 2 if raw[at - 2: at] == b"\r\n" and at - 2 >= first else max(at - 1, first)
            chunks.append((first, cut))
        if rest == b"--":
            return chunks
        first = at = min(line_end + 1, end)
    if first is not None:
        chunks.append((first, end))
    return chunks


def mime_decoded(part: MimePart) -> bytes:
    """The part's octets after Content-Transfer-Encoding (unknown: as they are)."""
    if part.decoded is not None:
        return part.decoded
    import binascii  # lazy: mail reading only
    import quopri

    encoding = mime_strip_comments(_unfold(part.header("content-transfer-encoding") or "7bit"))
    encoding = encoding.strip().lower()
    body = part.body
    if encoding == "base64":
        cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", body)
        cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
        try:
            part.decoded = binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
        except binascii.Error:
            part.decoded, part.cte_known = body, False
    elif encoding == "quoted-printable":
        part.decoded = quopri.decodestring(body)
    else:
        part.cte_known = encoding in ("7bit", "8bit", "binary", "")
        part.decoded = body
    return part.decoded


def mime_walk(part: MimePart):
    """Every part, depth-first, not descending into message/rfc822."""
    yield part
    for child in part.sub_parts:
        yield from mime_walk(child)


# ---- header forms (RFC 8621 §4.1.2) ----


def mime_header_form_allowed(name: str, form: str) -> bool:
    """Tell whether a parsed form may be used on a header field (RFC 8621 §4.1.2)."""
    lower = name.lower()
    if form == "Raw" or lower not in _DEFINED_HEADERS | _TEXT_HEADERS:
        return True
    return lower in _FORM_HEADERS.get(form, ())


def mime_header_value(raw: str | None, form: str):
    """Parse one raw header value into a form; None stays None."""
    if raw is None:
        return None
    if form == "Raw":
        return raw.replace("\0", "")
    if form == "Text":
        return mime_text(raw)
    if form == "Addresses":
        return [a for group in mime_address_groups(raw) for a in group["addresses"]]
    if form == "GroupedAddresses":
        return mime_address_groups(raw)
    if form == "MessageIds":
        return mime_message_ids(raw)
    if form == "Date":
        return mime_date(raw)
    return mime_urls(raw)


def _unfold(raw: str) -> str:
    """The field without its folding: a line end before white space goes (RFC 5322 §2.2.3).
    str.replace, not re.sub, which would hold a piece per fold of a field folded a
    million times (the same result: a field's value never holds an empty line)."""
    if "\n" not in raw:  # the common case: one line, nothing to unfold
        return raw.rstrip("\r")
    for fold, kept in (("\r\n ", " "), ("\r\n\t", "\t"), ("\n ", " "), ("\n\t", "\t")):
        raw = raw.replace(fold, kept)
    return raw.rstrip("\r\n")


_ANY_SPACE = {c: " " for c in range(0x110000) if chr(c).isspace()}  # what \s matches


def collapse_space(text: str) -> str:
    """Runs of white space as one SP, the ends stripped (re.sub(r"\\s+", " ", text).strip()),
    without re.sub's piece per run: a ten-megabyte "a a a …" would hold five million."""
    text = text.translate(_ANY_SPACE)
    while "  " in text:  # each pass halves the longest run
        text = text.replace("  ", " ")
    return text.strip()


def mime_text(raw: str) -> str:
    """Text form (RFC 8621 §4.1.2.2): unfolded, leading SP gone, encoded words decoded, NFC."""
    text = _unfold(raw).lstrip(" ")
    return unicodedata.normalize("NFC", mime_decode_words(text))


def mime_decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words that stand alone between whitespace.

    Whitespace between two adjacent encoded words is dropped (RFC 2047 §6.2); a word
    glued to other text is left as it is (RFC 8621 §4.1.2.2 step 4). Adjacent words
    in one charset are decoded together (a character may be split across two).
    """
    if "=?" not in text:
        return text
    items: list = []  # [kind, text or charset, octet pieces]: kinds ew, ws, text
    for token in _WHITE_SPACE_SPLIT_RE.split(text):
        if not token:
            continue
        word = ENCODED_WORD_RE.fullmatch(token) if "=?" in token else None
        decoded = _encoded_word_octets(word) if word else None
        if decoded is None:
            items.append(["ws" if token.isspace() else "text", token, None])
            continue
        if len(items) >= 2 and items[-1][0] == "ws" and items[-2][0] == "ew":
            items.pop()  # white space between encoded words is not part of the text
        if items and items[-1][0] == "ew" and items[-1][1] == decoded[0]:
            items[-1][2].append(decoded[1])
        else:
            items.append(["ew", decoded[0], [decoded[1]]])
    return "".join(_decoded_word(value, b"".join(pieces)) if kind == "ew" else value
                   for kind, value, pieces in items)


_WHITE_SPACE_SPLIT_RE = re.compile(r"([ \t]+)")


def _decoded_word(charset: str, data: bytes) -> str:
    return _CONTROL_CHARS_RE.sub("", mime_decode_text(data, charset)[0])


def _encoded_word_octets(word) -> tuple[str, bytes] | None:
    import binascii  # lazy: mail reading only

    charset = word.group(1).split("*")[0].lower()  # RFC 2231 §5: charset*language
    if mime_text_codec(charset) is None:
        return None  # an unknown charset (or no text codec): the word stays as it is
    payload = word.group(3)
    try:
        if word.group(2) in "Bb":
            data = binascii.a2b_base64(payload + "=" * (-len(payload) % 4))
        else:
            data = re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                          payload.replace("_", " ").encode("ascii", "replace"))
    except (binascii.Error, ValueError):
        return None
    return charset, data


# ---- addresses (RFC 5322 §3.4 with RFC 8621 §4.1.2.3) ----

_ADDRESS_TOKEN_RE = re.compile(
    r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?'  # quoted-string (lenient: unterminated; possessive)
    r"|\[[^\]]*\]?"  # domain-literal
    r"|[<>,:;@.]"  # specials that matter here
    r"|[^\s\"(<>,:;@.\[]+"  # atom
    r"|\s+",
    re.S,
)


def _address_tokens(text: str):
    """Tokenise an address list, lazily: (kind, text) with kinds q, c, s, a, w."""
    i = 0
    while i < len(text):
        if text[i] == "(":
            j = _comment_end(text, i)
            yield "c", text[i + 1: j - 1] if text[j - 1:j] == ")" else text[i + 1: j]
            i = j
            continue
        match = _ADDRESS_TOKEN_RE.match(text, i)
        if not match:  # a stray ")" or similar: skip it
            i += 1
            continue
        token = match.group(0)
        yield ("q" if token[0] == '"' else "w" if token.isspace()
               else "s" if token in "<>,:;@." else "a"), token
        i = match.end()


_COMMENT_SCAN_RE = re.compile(r"[^()\\]+|\\.?|[()]", re.S)


def _comment_end(text: str, at: int) -> int:
    """The index just past the (nested) comment opening at text[at]; the end of the text
    if it never closes. Runs of ordinary characters are skipped as one token."""
    depth = 0
    for match in _COMMENT_SCAN_RE.finditer(text, at):
        token = match.group(0)
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth == 0:
                return match.end()
    return len(text)


def mime_address_groups(raw: str) -> list[dict]:
    """GroupedAddresses form (RFC 8621 §4.1.2.4), best effort on broken lists.

    deviation: at most MAX_PARSED_ADDRESSES addresses of one field are parsed (a field
    listing four hundred thousand would cost gigabytes); its Raw form keeps them all."""
    groups: list[dict] = []
    current: list = []
    group = loose = None  # the open named group; the group of mailboxes outside any group
    angle, found = False, 0
    for kind, token in itertools.chain(_address_tokens(_unfold(raw)), [("s", ",")]):
        if found >= MAX_PARSED_ADDRESSES:
            break
        if kind == "s" and token in "<>":
            angle = token == "<"
        if kind == "s" and not angle and token == ":" and group is None:
            group, loose = {"name": _phrase(current), "addresses": []}, None
            groups.append(group)
            current = []
            continue
        if kind == "s" and not angle and token in ",;":
            mailbox, current = _mailbox(current), []
            found += mailbox is not None
            if mailbox and group is not None:
                group["addresses"].append(mailbox)
            elif mailbox:
                if loose is None:
                    loose = {"name": None, "addresses": []}
                    groups.append(loose)
                loose["addresses"].append(mailbox)
            if token == ";":
                group = None
            continue
        current.append((kind, token))
    return groups


def _mailbox(tokens: list) -> dict | None:
    """One mailbox from its tokens: name-addr, addr-spec, or a bare word."""
    if not any(kind in ("a", "q") or token == "<" for kind, token in tokens):
        return None  # only white space or comments (e.g. after a group's ";")
    if ("s", "<") in tokens:
        start = tokens.index(("s", "<"))
        end = tokens.index(("s", ">")) if ("s", ">") in tokens[start:] else len(tokens)
        email = _addr_spec(tokens[start + 1: end])
        name = _phrase(tokens[:start])
        if name is None:
            name = _comment_name(tokens[end + 1:])
        return {"name": name, "email": email}
    body = [t for t in tokens if t[0] != "c"]
    last = max(i for i, t in enumerate(tokens) if t[0] in ("a", "q", "s"))
    return {"name": _comment_name(tokens[last + 1:]), "email": _addr_spec(body)}


def _addr_spec(tokens: list) -> str:
    """The addr-spec text: comments and whitespace dropped, a source route removed."""
    text = "".join(t[1] for t in tokens if t[0] not in ("c", "w"))
    if text.startswith("@") and ":" in text:
        text = text.split(":", 1)[1]  # obs-route
    return text


def _phrase(tokens: list) -> str | None:
    """A display name (RFC 8621 §4.1.2.3): a quoted-string keeps its inner white space,
    quotes and quoted-pairs removed; words outside quotes are joined by single spaces
    and their encoded words decoded (never inside a quoted-string: RFC 2047 §5)."""
    pieces, run = [], []
    for kind, token in tokens:
        if kind == "q":
            pieces.append(mime_decode_words(re.sub(r"\s+", " ", "".join(run))))
            run = []
            inner = token[1:-1] if token.endswith('"') and len(token) > 1 else token[1:]
            pieces.append(re.sub(r"\\(.)", r"\1", inner, flags=re.S))
        elif kind == "w":
            run.append(" ")
        elif kind in ("a", "s") and token not in "<>,:;":
            run.append(token)
    pieces.append(mime_decode_words(re.sub(r"\s+", " ", "".join(run))))
    text = "".join(pieces).strip()
    return unicodedata.normalize("NFC", text) or None


def _comment_name(tokens: list) -> str | None:
    """RFC 8621 §4.1.2.3: without a display name, a comment right after the addr-spec."""
    for kind, token in tokens:
        if kind == "w":
            continue
        if kind == "c":
            text = re.sub(r"\s+", " ", mime_decode_words(token)).strip()
            return unicodedata.normalize("NFC", text) or None
        return None
    return None


def mime_message_ids(raw: str) -> list[str] | None:
    """MessageIds form (RFC 8621 §4.1.2.5): ids without <>, or None if it does not parse."""
    text = re.sub(r"\([^()]*\)", " ", _unfold(raw))
    ids = []
    for token in re.findall(r"<[^<>]*>|[^\s<>]+", text):
        if not token.startswith("<"):
            return None
        inner = re.sub(r"\s+", "", token[1:-1])
        if not inner:
            return None
        ids.append(inner)
    return ids or None


def mime_date(raw: str) -> str | None:
    """Date form (RFC 8621 §4.1.2.6): RFC 3339 with the original offset, or None."""
    from email.utils import parsedate_tz  # lazy: mail reading only

    text = re.sub(r"\([^()]*\)", " ", _unfold(raw)).strip()
    parsed = parsedate_tz(text) if text else None
    if not parsed or not re.search(r"\d:\d\d(?::\d\d)?\s*(?:[+-]\d{4}|[A-Za-z]{1,5})\b", text):
        return None  # RFC 5322 §3.3: the zone is not optional (parsedate_tz assumes UTC)
    offset = parsed[9] or 0
    try:
        moment = datetime(*parsed[:6])
    except (ValueError, OverflowError):
        return None
    if abs(offset) >= 24 * 3600:
        return None
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    zone = "Z" if offset == 0 else f"{sign}{hours:02d}:{minutes:02d}"
    # RFC 3339 years have four digits (strftime's %Y does not pad a year below 1000)
    return f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}" + zone


def mime_date_timestamp(value: str | None) -> int | None:
    """Seconds since the epoch of a Date form value."""
    if value is None:
        return None
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def mime_urls(raw: str) -> list[str] | None:
    """URLs form (RFC 8621 §4.1.2.7, RFC 2369): the <...> values, comments dropped."""
    text = re.sub(r"\([^()]*\)", " ", _unfold(raw))
    urls = [re.sub(r"\s+", "", u) for u in re.findall(r"<([^<>]*)>", text)]
    return urls or None


# ---- body parts (RFC 8621 §4.1.4) ----


def mime_part_json(part: MimePart, blob_base: str, wanted: list) -> dict:
    """An EmailBodyPart with the wanted properties."""
    out = {}
    for name in wanted:
        out[name] = _part_property(part, blob_base, name, wanted)
    return out


def _part_property(part: MimePart, blob_base: str, name: str, wanted: list):
    # long: one branch per EmailBodyPart property, RFC 8621 §4.1.4
    multipart = part.type.startswith("multipart/")
    if name == "partId":
        return None if multipart else part.part_id
    if name == "blobId":
        return None if multipart else f"{blob_base}_{part.part_id}"
    if name == "size":
        return 0 if multipart else len(mime_decoded(part))
    if name == "headers":
        return [{"name": n, "value": v} for n, v in part.headers]
    if name == "name":
        return mime_part_name(part)
    if name == "type":
        return part.type
    if name == "charset":
        return mime_part_charset(part)
    if name == "disposition":
        value = part.header("content-disposition")
        return _strip_params(value).lower() or None if value is not None else None
    if name == "cid":
        value = part.header("content-id")
        return (mime_message_ids(value) or [_strip_params(value).strip("<>")])[0] \
            if value is not None and value.strip() else None
    if name == "language":
        value = part.header("content-language")
        text = re.sub(r"\([^()]*\)", " ", _unfold(value)) if value else ""
        return [v for v in re.split(r"[\s,]+", text) if v] or None if value else None
    if name == "location":
        value = part.header("content-location")  # RFC 2557 §4.1: [CFWS] URI [CFWS]
        return re.sub(r"\s+", "", mime_strip_comments(_unfold(value))) if value is not None \
            else None
    if name == "subParts":
        if not multipart:
            return None
        return [mime_part_json(child, blob_base, wanted) for child in part.sub_parts]
    form, prop = _header_property(name)
    return mime_header_property(part.headers, prop)


def _strip_params(value: str) -> str:
    return re.sub(r"\([^()]*\)", "", _unfold(value)).split(";")[0].strip()


def mime_part_charset(part: MimePart) -> str | None:
    """RFC 8621 §4.1.4 `charset`: the parameter, else us-ascii for text, else null."""
    if part.header("content-type") is None:
        return "us-ascii" if part.type.startswith("text/") else None
    if not part.type.startswith("text/"):
        return None
    charset = (part.param("charset") or "").strip().lower()
    return charset or "us-ascii"


def mime_part_name(part: MimePart) -> str | None:
    """RFC 8621 §4.1.4 `name`: Content-Disposition filename (RFC 2231), else Content-Type name."""
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        found = part.params(header).get(param)
        if found is None:
            continue
        value, rfc2231 = found
        if not rfc2231:
            value = mime_decode_words(value)  # lenient: RFC 2047 words where 2231 belongs
        text = unicodedata.normalize("NFC", value.replace("\0", "")).strip()
        if text:
            return text
    return None


def mime_body_lists(root: MimePart) -> tuple[list, list, list]:
    """textBody, htmlBody and attachments by RFC 8621 §4.1.4's suggested algorithm."""
    text_body, html_body, attachments = [], [], []
    _parse_structure([root], "mixed", False, html_body, text_body, attachments)
    return text_body, html_body, attachments


def _is_inline_media(part_type: str) -> bool:
    return part_type.startswith(("image/", "audio/", "video/"))


def _parse_structure(parts, multipart_type, in_alternative, html_body, text_body, attachments):
    # long: RFC 8621 §4.1.4's parseStructure, kept close to the RFC's own code
    text_length = len(text_body) if text_body is not None else -1
    html_length = len(html_body) if html_body is not None else -1
    for i, part in enumerate(parts):
        is_multipart = part.type.startswith("multipart/")
        disposition = (_strip_params(part.header("content-disposition") or "")).lower()
        is_inline = (
            disposition != "attachment"
            and (part.type in ("text/plain", "text/html") or _is_inline_media(part.type))
            and (i == 0 or (multipart_type != "related"
                            and (_is_inline_media(part.type) or not mime_part_name(part))))
        )
        if is_multipart:
            sub_type = part.type.split("/", 1)[1]
            _parse_structure(part.sub_parts, sub_type, in_alternative or sub_type == "alternative",
                             html_body, text_body, attachments)
        elif is_inline:
            if multipart_type == "alternative":
                if part.type == "text/plain":
                    text_body.append(part)
                elif part.type == "text/html":
                    html_body.append(part)
                else:
                    attachments.append(part)
                continue
            if in_alternative:
                if part.type == "text/plain":
                    html_body = None
                if part.type == "text/html":
                    text_body = None
            if text_body is not None:
                text_body.append(part)
            if html_body is not None:
                html_body.append(part)
            if (text_body is None or html_body is None) and _is_inline_media(part.type):
                attachments.append(part)
        else:
            attachments.append(part)
    if multipart_type == "alternative" and text_body is not None and html_body is not None:
        if text_length == len(text_body) and html_length != len(html_body):
            text_body.extend(html_body[html_length:])  # found an HTML part only
        if html_length == len(html_body) and text_length != len(text_body):
            html_body.extend(text_body[text_length:])  # found a plain-text part only


def mime_part_text(part: MimePart) -> tuple[str, bool]:
    """Decode a text part to a string with LF line ends; return (text, isEncodingProblem)."""
    cached = part.__dict__.get("_text")  # preview and search both read it
    if cached is None:
        cached = part.__dict__["_text"] = _mime_part_text(part)
    return cached


def _mime_part_text(part: MimePart) -> tuple[str, bool]:
    data = mime_decoded(part)
    charset = mime_part_charset(part) or "us-ascii"
    problem = not part.cte_known
    if charset in ("us-ascii", "ascii") and not data.isascii():
        try:  # lenient: 8-bit text labelled (or defaulted to) ASCII is most often UTF-8
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text, problem = data.decode("windows-1252", "replace"), True
    else:
        text, unusable = mime_decode_text(data, charset)
        problem = problem or unusable or "\ufffd" in text and b"\xef\xbf\xbd" not in data
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", ""), problem


def mime_truncate(text: str, max_octets: int, is_html: bool) -> tuple[str, bool]:
    """Cut a value to at most max_octets of UTF-8, not mid-character nor inside an HTML tag."""
    encoded = text.encode("utf-8")
    if max_octets <= 0 or len(encoded) <= max_octets:
        return text, False
    cut = encoded[:max_octets].decode("utf-8", "ignore")
    if is_html and cut.rfind("<") > cut.rfind(">"):
        cut = cut[: cut.rfind("<")]
    return cut, True


_HTML_TAG_NAME_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)")
_HTML_ALT_RE = re.compile(r"""(?is)\b(?:alt|title)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_HTML_RAW_TEXT_END = {name: re.compile(rf"(?i)</{name}\s*>") for name in ("script", "style",
                                                                          "head")}
_HTML_LINE_BREAKS = {"br", "/p", "/div", "/li", "/tr"}


def mime_html_to_text(html: str) -> str:
    """Plain text from HTML, for previews and search, in one pass (linear in the input):
    comments and script, style and head elements dropped, tags out (their alt and title
    texts kept: readers see them, RFC 8621 §4.4.1), line-ending elements as newlines,
    entities decoded. An unclosed comment, script or style runs to the end, as in a
    browser; after the last `>` the rest is text."""
    import html as html_lib  # lazy: mail reading only

    out, at, size, unclosed = [], 0, len(html), set()
    while at < size:
        lt = html.find("<", at)
        if lt < 0:
            out.append(html[at:])
            break
        out.append(html[at:lt])
        if html.startswith("<!--", lt):
            close = html.find("-->", lt + 4)
            out.append(" ")
            at = size if close < 0 else close + 3
            continue
        gt = html.find(">", lt + 1)
        if gt < 0:
            out.append(html[lt:])  # no tag can end after here
            break
        at = gt + 1
        named = _HTML_TAG_NAME_RE.match(html, lt, gt)
        name = (named.group(1) + named.group(2).lower()) if named else ""
        if name in _HTML_LINE_BREAKS:
            out.append("\n")
        elif name and not named.group(1):
            alts = [a or b for a, b in _HTML_ALT_RE.findall(html, lt, gt)]
            out.append(" " + " ".join(alts) + " " if alts else " ")
        else:
            out.append(" ")
        if name in _HTML_RAW_TEXT_END and name not in unclosed:
            close = _HTML_RAW_TEXT_END[name].search(html, at)
            if close is not None:
                at = close.end()
            elif name == "head":
                unclosed.add(name)  # lenient: an unclosed head ends where the body starts
            else:
                at = size
    return html_lib.unescape("".join(out))


def mime_preview(text_body: list) -> str:
    """Up to 256 characters of the first readable text part, white space collapsed."""
    for part in text_body:
        if part.type not in ("text/plain", "text/html"):
            continue
        text, _ = mime_part_text(part)
        if part.type == "text/html":
            text = mime_html_to_text(text)
        head = text[:PREVIEW_CHARS * 4]  # collapsing white space in all of it is wasted
        collapsed = collapse_space(head)
        text = collapsed if len(collapsed) > PREVIEW_CHARS or head == text else \
            collapse_space(text)
        if text:
            return text[:PREVIEW_CHARS]
    return ""


# ---- the whole Email ----


def _header_property(name: str) -> tuple[str, str]:
    """Split `header:Name[:asForm][:all]` into (form, name) after checking it."""
    match = HEADER_PROP_RE.match(name)
    if not match or (match.group(2) and match.group(2) not in HEADER_FORMS):
        raise ValueError(f"{name!r} is not a header property")
    return match.group(2) or "Raw", name


def mime_check_header_property(name: str) -> None:
    """Refuse a header property whose form does not apply (RFC 8621 §4.2: invalidArguments)."""
    match = HEADER_PROP_RE.match(name)
    if not match or (match.group(2) and match.group(2) not in HEADER_FORMS):
        raise ValueError(f"{name!r} is not a valid header property")
    if not mime_header_form_allowed(match.group(1), match.group(2) or "Raw"):
        raise ValueError(f"the {match.group(2)} form does not apply to {match.group(1)}")


def mime_header_property(headers: list, prop: str):
    """The value of a `header:…` property over (name, raw value) fields (RFC 8621 §4.1.3)."""
    match = HEADER_PROP_RE.match(prop)
    wanted, form, every = match.group(1).lower(), match.group(2) or "Raw", bool(match.group(3))
    values = [v for n, v in headers if n.lower() == wanted]
    if every:
        return [mime_header_value(v, form) for v in values]
    return mime_header_value(values[-1], form) if values else None


CONVENIENCE_HEADERS = {
    "messageId": "header:Message-ID:asMessageIds",
    "inReplyTo": "header:In-Reply-To:asMessageIds",
    "references": "header:References:asMessageIds",
    "sender": "header:Sender:asAddresses",
    "from": "header:From:asAddresses",
    "to": "header:To:asAddresses",
    "cc": "header:Cc:asAddresses",
    "bcc": "header:Bcc:asAddresses",
    "replyTo": "header:Reply-To:asAddresses",
    "subject": "header:Subject:asText",
    "sentAt": "header:Date:asDate",
}


def mime_summary(root: MimePart) -> dict:
    """The fast Email properties, computed once when a message is stored (RFC 8621 §4.2)."""
    last = {}  # the last field of each name, looked up once for all the properties below
    for name, value in root.headers:
        last[name.lower()] = value
    summary = {name: mime_header_value(last.get(field), form)
               for name, (field, form) in CONVENIENCE_FIELDS.items()}
    text_body, html_body, attachments = mime_body_lists(root)
    summary["hasAttachment"] = any(
        _strip_params(p.header("content-disposition") or "").lower() != "inline"
        for p in attachments
    )
    summary["preview"] = mime_preview(text_body or html_body)
    return summary


CONVENIENCE_FIELDS = {name: (HEADER_PROP_RE.match(prop).group(1).lower(),
                             HEADER_PROP_RE.match(prop).group(2))
                      for name, prop in CONVENIENCE_HEADERS.items()}


def mime_email(raw: bytes) -> MimePart:
    """Parse a whole message; a message that is not MIME at all is still one text part."""
    try:
        return mime_tree(raw)
    except (MimeError, RecursionError, ValueError, LookupError) as exc:
        log.getChild("mime").warning("unparsable message (%s); kept as one part", exc)
        return MimePart([], raw, 0, len(raw), "text/plain", "1")


_SUBJECT_TRAILER_REV_RE = re.compile(r"(?:\)dwf\(| )*+", re.I)  # "(fwd)" and " ", reversed
_SUBJECT_LEADER_RE = re.compile(r"(?:re|fwd?|aw|sv|wg) ?(?:\[[^\[\]]*\])? ?: ?", re.I)
_SUBJECT_BLOB_RE = re.compile(r"\[[^\[\]]*\] ?")


def mime_base_subject(subject: str | None) -> str:
    """The base subject (RFC 5256 §2.1): reply/forward prefixes, list tags and (fwd) gone.

    The subject is never copied while it shrinks: two indexes close in on the base, so
    a subject of a thousand prefixes or trailers costs what its length costs."""
    text = collapse_space(subject or "")
    backwards = text[::-1]  # trailers are matched from the end, on the reversed text
    n = len(text)
    start, end = 0, n
    while True:
        before = (start, end)
        trailer = _SUBJECT_TRAILER_REV_RE.match(backwards, n - end, n - start)
        end -= trailer.end() - trailer.start()  # (2) trailers: "(fwd)" and white space
        if end - start >= 6 and text[start:start + 5].lower() == "[fwd:" and text[end - 1] == "]":
            start, end = start + 5, end - 1  # (6) a [fwd: …] wrapper, then again from (2)
            start += text.startswith(" ", start)
            continue
        leader = _SUBJECT_LEADER_RE.match(text, start, end)  # (3) Re:, Fwd: and friends
        while leader and leader.end() > start:
            start = leader.end()
            leader = _SUBJECT_LEADER_RE.match(text, start, end)
        blob = _SUBJECT_BLOB_RE.match(text, start, end)  # (4) a list tag, unless all there is
        if blob and blob.end() < end:
            start = blob.end()
        if (start, end) == before:
            return text[start:end]


def mime_received_at(root: MimePart) -> int | None:
    """The time of the most recent Received field (RFC 8621 §4.8 default receivedAt)."""
    for name, value in root.headers:  # the topmost Received is the most recent
        if name.lower() == "received" and ";" in value:
            return mime_date_timestamp(mime_date(value.rsplit(";", 1)[1]))
    return None


def mime_find_part(root: MimePart, part_id: str) -> MimePart | None:
    for part in mime_walk(root):
        if part.part_id == part_id and not part.type.startswith("multipart/"):
            return part
    return None


# =============================================================================
# 7.2 MAILBOX
#     RFC 8621 §2 on the generic machine: the declaration, the tree rules (no
#     cycles, unique sibling names, depth), role rules, sortAsTree/filterAsTree,
#     and count-only changes reported through updatedProperties (§2.2).
# =============================================================================

MAILBOX_COUNT_PROPS = ["totalEmails", "unreadEmails", "totalThreads", "unreadThreads"]
MAILBOX_RIGHTS = (
    "mayReadItems", "mayAddItems", "mayRemoveItems", "maySetSeen", "maySetKeywords",
    "mayCreateChild", "mayRename", "mayDelete", "maySubmit",
)


def _mailbox_name(value: str) -> str:
    value = unicodedata.normalize("NFC", value)  # Net-Unicode (RFC 8621 §2)
    if not value or not is_net_unicode(value):
        raise ValueError("a name is non-empty and has no control characters")
    return value


def _mailbox_role(value: str) -> str:
    if value not in MAILBOX_ROLES:
        raise ValueError(f"unknown role {value!r}")
    return value


def _filter_mailbox_parent(ctx, value):
    if value is None:
        return Mailbox.parent_pk.is_null()
    pk = type_pk("Mailbox", resolve_creation_id(ctx, a_id(value)))
    return Mailbox.parent_pk == (pk or -1)


def _filter_mailbox_name(ctx, value):
    needle = _sql_casefold(a_str(value))
    return peewee.fn.instr(peewee.fn.jmap_casefold(Mailbox.name), needle) > 0


def _filter_mailbox_role(ctx, value):
    return Mailbox.role.is_null() if value is None else Mailbox.role == a_str(value)


def _filter_mailbox_has_any_role(ctx, value):
    return Mailbox.role.is_null(not a_bool(value))


def _filter_mailbox_subscribed(ctx, value):
    return Mailbox.is_subscribed == a_bool(value)


@register_type
class MailboxType(TypeSpec):
    """Mailbox (RFC 8621 §2)."""

    name, capability, model, id_prefix = "Mailbox", CAP_MAIL, Mailbox, "M"
    props = {
        "id": Prop("id", server_set=True, immutable=True),
        "name": Prop("str", "name", max_len=MAX_SIZE_MAILBOX_NAME, check=_mailbox_name),
        "parentId": Prop("id", "parent_pk", default=None, nullable=True, ref="Mailbox"),
        "role": Prop("str", "role", default=None, nullable=True, check=_mailbox_role),
        "sortOrder": Prop("uint", "sort_order", default=0, max_value=MAX_SORT_ORDER),
        "totalEmails": Prop("uint", "total_emails", server_set=True),
        "unreadEmails": Prop("uint", "unread_emails", server_set=True),
        "totalThreads": Prop("uint", "total_threads", server_set=True),
        "unreadThreads": Prop("uint", "unread_threads", server_set=True),
        "myRights": Prop("object", server_set=True),
        "isSubscribed": Prop("bool", "is_subscribed", default=True),
    }
    filters = {
        "parentId": _filter_mailbox_parent,
        "name": _filter_mailbox_name,
        "role": _filter_mailbox_role,
        "hasAnyRole": _filter_mailbox_has_any_role,
        "isSubscribed": _filter_mailbox_subscribed,
    }
    sorts = {"sortOrder": (Mailbox.sort_order, False), "name": (Mailbox.name, True)}
    set_args = {"onDestroyRemoveEmails": (a_bool, False)}
    query_args = {"sortAsTree": (a_bool, False), "filterAsTree": (a_bool, False)}

    def compute(self, ctx, row, name):
        assert name == "myRights"
        rights = dict.fromkeys(MAILBOX_RIGHTS, not ctx.read_only)
        rights["mayReadItems"] = True
        if row.role == "inbox":  # mail is delivered here: it stays, under its name
            rights["mayRename"] = rights["mayDelete"] = False
        return rights

    def validate(self, ctx, values, row):
        """Enforce the tree and role rules (RFC 8621 §2)."""
        parent_pk = self.pk_from_raw(values["parentId"]) if values["parentId"] else None
        if row is not None and row.role == "inbox" and (
            values["name"] != row.name or parent_pk != row.parent_pk
        ):
            raise SetError("forbidden", "the Inbox cannot be renamed or moved (mayRename)")
        if row is not None and parent_pk is not None and self._is_descendant(parent_pk, row.pk):
            raise invalid_properties(["parentId"], "a Mailbox cannot be its own ancestor")
        height = self._height(ctx, row.pk) if row is not None else 1
        if self._depth(parent_pk) + height > MAX_MAILBOX_DEPTH:
            raise invalid_properties(["parentId"], f"deeper than {MAX_MAILBOX_DEPTH} levels")
        sibling = self._sibling_named(ctx, parent_pk, values["name"], row, ctx.pending)
        if sibling is not None:  # RFC 8620 §5.3 alreadyExists: the common SetError for this
            raise SetError("alreadyExists", "a sibling Mailbox has this name",
                           existingId=self.id_of(sibling.pk), properties=["name"])
        if values["role"] is not None:
            clash = self.live(ctx).where(Mailbox.role == values["role"])
            if row is not None:
                clash = clash.where(Mailbox.pk != row.pk)
            if clash.exists():
                raise invalid_properties(["role"], "another Mailbox has this role")
        if row is not None and row.role == "inbox" and values["role"] != "inbox":
            raise SetError("forbidden", "the Inbox keeps its role")
        if row is not None and row.role != values["role"] and "trash" in (row.role,
                                                                          values["role"]):
            # The trash rule of unreadThreads changes for this Mailbox's threads: count
            # them before the role moves, again after (on_update).
            threads = mailbox_thread_pks(row.pk)
            ctx.scratch.setdefault("recount", {})[row.pk] = (threads,
                                                               thread_counts_sum(threads))

    def on_update(self, ctx, row, values):
        pending = ctx.scratch.get("recount", {}).pop(row.pk, None)
        if pending:
            threads, before = pending
            mailbox_apply_counts(ctx.changes, before, thread_counts_sum(threads))

    def _sibling_named(self, ctx, parent_pk, name, row, pending):
        """Another Mailbox under the parent that has the name and keeps it, or None.

        A sibling that a later update in the same call renames, moves or destroys does
        not count (RFC 8620 §5.3: A -> B and B -> A in one call); validate_final()
        checks the end state.
        """
        siblings = self.live(ctx).where(
            Mailbox.parent_pk.is_null() if parent_pk is None else Mailbox.parent_pk == parent_pk
        ).where(Mailbox.name == name)
        if row is not None:
            siblings = siblings.where(Mailbox.pk != row.pk)
        return next((s for s in siblings
                     if not pending.get(s.pk, set()) & {"name", "parentId", "*"}), None)

    def validate_final(self, ctx):
        clash = (
            self.live(ctx)
            .select(Mailbox.parent_pk, Mailbox.name)
            .group_by(Mailbox.parent_pk, Mailbox.name)
            .having(peewee.fn.COUNT(Mailbox.pk) > 1)
            .first()
        )
        if clash is not None:
            raise MethodError("invalidArguments",
                              f"the changes leave two sibling Mailboxes named {clash.name!r}")

    def _height(self, ctx, pk: int) -> int:
        """Levels in the subtree under a Mailbox, itself included."""
        height, level = 0, [pk]
        while level and height <= MAX_MAILBOX_DEPTH:
            height += 1
            level = [c for (c,) in self.live(ctx).select(Mailbox.pk)
                     .where(Mailbox.parent_pk.in_(level)).tuples()]
        return height

    def _is_descendant(self, pk: int, ancestor_pk: int) -> bool:
        seen = set()
        while pk is not None and pk not in seen:
            if pk == ancestor_pk:
                return True
            seen.add(pk)
            pk = Mailbox.select(Mailbox.parent_pk).where(Mailbox.pk == pk).scalar()
        return False

    def _depth(self, pk: int | None) -> int:
        depth = 0
        while pk is not None and depth <= MAX_MAILBOX_DEPTH:
            depth += 1
            pk = Mailbox.select(Mailbox.parent_pk).where(Mailbox.pk == pk).scalar()
        return depth

    def on_destroy(self, ctx, row, args):
        """Refuse to orphan children or lose mail (RFC 8621 §2.5)."""
        if row.role == "inbox":
            raise SetError("forbidden", "the Inbox cannot be destroyed")
        if self.live(ctx).where(Mailbox.parent_pk == row.pk).exists():
            raise SetError("mailboxHasChild", "destroy or move the child Mailboxes first")
        members = EmailMailbox.select(EmailMailbox.email_pk).where(
            EmailMailbox.mailbox_pk == row.pk)
        if members.exists() and not args["onDestroyRemoveEmails"]:
            raise SetError("mailboxHasEmail", "the Mailbox is not empty")
        for (email_pk,) in members.tuples():
            email_remove_from_mailbox(ctx.changes, Email.get_by_id(email_pk), row.pk)

    def destroy_order(self, ctx, raw_ids):
        """Children before parents, so one call can remove a whole subtree (RFC 8620 §5.3)."""
        def depth(raw_id):
            row = self.load(ctx, raw_id)
            return -self._depth(row.pk) if row else 0

        return sorted(raw_ids, key=depth)

    def query_order(self, ctx, args, rows):
        pks = [row[0] for row in rows]
        if not (args.get("sortAsTree") or args.get("filterAsTree")):
            return pks
        parents = dict(
            self.live(ctx).select(Mailbox.pk, Mailbox.parent_pk).tuples()
        )
        if args.get("filterAsTree"):
            pks = _mailbox_filter_as_tree(pks, parents)
        if args.get("sortAsTree"):
            pks = _mailbox_sort_as_tree(pks, parents)
        return pks

    def create_defaults(self, changes, account):
        mailbox_create_defaults(changes, account.pk)

    def can_calculate_changes(self, args):
        # A parent's change moves its whole subtree, which the generic algorithm misses.
        return not (args.get("sortAsTree") or args.get("filterAsTree"))

    def change_column(self):
        return peewee.fn.MAX(Mailbox.updated_modseq, Mailbox.counts_modseq)

    def changes_extra(self, ctx, since, rows):
        """updatedProperties: only the counts changed (RFC 8621 §2.2)."""
        updated = [r for r in rows if r.created_modseq <= since and not r.destroyed]
        counts_only = updated and all(r.updated_modseq <= since for r in updated)
        return {"updatedProperties": list(MAILBOX_COUNT_PROPS) if counts_only else None}


def _mailbox_filter_as_tree(pks: list, parents: dict) -> list:
    """Keep a Mailbox only if all its ancestors matched too (RFC 8621 §2.3)."""
    matched = set(pks)

    def ancestors_match(pk):
        parent = parents.get(pk)
        while parent is not None:
            if parent not in matched:
                return False
            parent = parents.get(parent)
        return True

    return [pk for pk in pks if ancestors_match(pk)]


def _mailbox_sort_as_tree(pks: list, parents: dict) -> list:
    """Order parents before children, siblings by the sort (RFC 8621 §2.3)."""
    rank = {pk: i for i, pk in enumerate(pks)}
    children: dict = {}
    roots = []
    for pk in pks:
        parent = parents.get(pk)
        if parent in rank:
            children.setdefault(parent, []).append(pk)
        else:
            roots.append(pk)  # parent filtered out: placed at top level
    out = []

    def walk(pk):
        out.append(pk)
        for child in sorted(children.get(pk, []), key=rank.get):
            walk(child)

    for root in roots:
        walk(root)
    return out


def mailbox_create_defaults(changes: ChangeLog, account_pk: int) -> None:
    """Create the standard role Mailboxes every account starts with."""
    for name, role, sort_order in DEFAULT_MAILBOXES:
        row = Mailbox(account_pk=account_pk, name=name, role=role, sort_order=sort_order)
        record_change(changes, "Mailbox", row, "created")


# =============================================================================
# 7.3 THREAD
#     RFC 8621 §3: a Thread is the list of its Emails, oldest first. Thread ids
#     are assigned when an Email is stored (thread_for_email in 7.4).
# =============================================================================


@register_type
class ThreadType(TypeSpec):
    """Thread (RFC 8621 §3)."""

    name, capability, model, id_prefix = "Thread", CAP_MAIL, Thread, "T"
    methods = ("get", "changes")
    get_all = False
    props = {
        "id": Prop("id", server_set=True, immutable=True),
        "emailIds": Prop("list", server_set=True),
    }

    def compute(self, ctx, row, name):
        emails = (Email.select(Email.pk)
                  .where((Email.thread_pk == row.pk) & ~Email.destroyed)
                  .order_by(Email.received_at, Email.pk).tuples())
        return [type_id("Email", pk) for (pk,) in emails]


# =============================================================================
# 7.4 EMAIL
#     RFC 8621 §4 on the generic machine. email_store() is the one way a message
#     becomes an Email (delivery, Email/import, import all call it): blob reference,
#     row, membership, Mailbox counts, thread and the change log, in the caller's
#     transaction. Fast properties come from a summary made at store time; body and
#     header properties parse the raw message, once per call.
# =============================================================================

EMAIL_DEFAULT_PROPERTIES = [
    "id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "messageId",
    "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo", "subject",
    "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody", "attachments",
]
BODY_PART_PROPERTIES = ("partId", "blobId", "size", "headers", "name", "type", "charset",
                        "disposition", "cid", "language", "location", "subParts")
DEFAULT_BODY_PROPERTIES = ["partId", "blobId", "size", "name", "type", "charset",
                           "disposition", "cid", "language", "location"]
KEYWORD_RE = re.compile(r'^[\x21-\x7e]{1,255}\Z')
KEYWORD_FORBIDDEN = set('(){]%*"\\')


def _keywords(value) -> dict:
    """Check a keywords object (RFC 8621 §4.1.1) and return it in lower case."""
    if not isinstance(value, dict):
        raise ValueError("keywords must be an object")
    out = {}
    for keyword, flag in value.items():
        if flag is not True or not KEYWORD_RE.match(keyword) or set(keyword) & KEYWORD_FORBIDDEN:
            raise ValueError(f"bad keyword {keyword!r}")
        out[keyword.lower()] = True
    return out


def email_is_unread(keywords: dict) -> bool:
    return "$seen" not in keywords and "$draft" not in keywords  # RFC 8621 §2 unreadEmails


# ---- Email/query filters and sorts (RFC 8621 §4.4) ----


def _keyword_value(value) -> str:
    keyword = a_str(value)
    if not KEYWORD_RE.match(keyword) or set(keyword) & KEYWORD_FORBIDDEN:
        raise ValueError(f"bad keyword {keyword!r}")
    return keyword.lower()


def _has_keyword(keyword: str, email_pk_column=None):
    return peewee.fn.EXISTS(EmailKeyword.select(peewee.SQL("1")).where(
        (EmailKeyword.email_pk == (email_pk_column or Email.pk))
        & (EmailKeyword.keyword == keyword)))


def _some_in_thread(keyword: str):
    return peewee.fn.EXISTS(EmailKeyword.select(peewee.SQL("1")).where(
        (EmailKeyword.thread_pk == Email.thread_pk) & (EmailKeyword.keyword == keyword)))


def _all_in_thread(keyword: str):
    other = Email.alias("other")
    missing = other.select(peewee.SQL("1")).where(
        (other.thread_pk == Email.thread_pk) & ~other.destroyed
        & ~_has_keyword(keyword, other.pk))
    return ~peewee.fn.EXISTS(missing)


def _first_of_each_thread(rows):
    seen = set()
    for pk, thread_pk in rows:
        if thread_pk not in seen:
            seen.add(thread_pk)
            yield pk


def _filter_in_mailbox(ctx, value):
    # EXISTS, not IN: SQLite checks each row as it walks the received_at index, so a
    # first page of a large Mailbox reads only that page.
    pk = type_pk("Mailbox", resolve_creation_id(ctx, a_id(value)))
    return peewee.fn.EXISTS(EmailMailbox.select(peewee.SQL("1")).where(
        (EmailMailbox.mailbox_pk == (pk or -1)) & (EmailMailbox.email_pk == Email.pk)))


def _filter_in_mailbox_other_than(ctx, value):
    pks = [type_pk("Mailbox", resolve_creation_id(ctx, i)) or -1 for i in a_ids(value)]
    return peewee.fn.EXISTS(EmailMailbox.select(peewee.SQL("1")).where(
        (EmailMailbox.email_pk == Email.pk) & EmailMailbox.mailbox_pk.not_in(pks)))


def _filter_header(ctx, value):
    if not isinstance(value, list) or not 1 <= len(value) <= 2 \
            or not all(isinstance(v, str) for v in value):
        raise ValueError("header takes [name] or [name, text]")
    name, text = value[0], value[1] if len(value) == 2 else None
    return peewee.fn.jmap_header_matches(Email.blob_sha256, name, text) == 1


EMAIL_FILTERS = {
    "inMailbox": _filter_in_mailbox,
    "inMailboxOtherThan": _filter_in_mailbox_other_than,
    "before": lambda ctx, v: Email.received_at < parse_utc_date(a_str(v)),
    "after": lambda ctx, v: Email.received_at >= parse_utc_date(a_str(v)),
    "minSize": lambda ctx, v: Email.size >= a_uint(v),
    "maxSize": lambda ctx, v: Email.size < a_uint(v),
    "allInThreadHaveKeyword": lambda ctx, v: _all_in_thread(_keyword_value(v)),
    "someInThreadHaveKeyword": lambda ctx, v: _some_in_thread(_keyword_value(v)),
    "noneInThreadHaveKeyword": lambda ctx, v: ~_some_in_thread(_keyword_value(v)),
    "hasKeyword": lambda ctx, v: _has_keyword(_keyword_value(v)),
    "notKeyword": lambda ctx, v: ~_has_keyword(_keyword_value(v)),
    "hasAttachment": lambda ctx, v: Email.has_attachment == a_bool(v),
    "text": lambda ctx, v: search_filter(None)(ctx, v),  # 7.8: in any column
    "from": lambda ctx, v: search_filter(("from_",))(ctx, v),  # 7.8
    "to": lambda ctx, v: search_filter(("to_",))(ctx, v),  # 7.8
    "cc": lambda ctx, v: search_filter(("cc_",))(ctx, v),  # 7.8
    "bcc": lambda ctx, v: search_filter(("bcc_",))(ctx, v),  # 7.8
    "subject": lambda ctx, v: search_filter(("subject",))(ctx, v),  # 7.8
    "body": lambda ctx, v: search_filter(("body",))(ctx, v),  # 7.8
    "header": _filter_header,
}


def _keyword_sort(make):
    def sort(comparator):
        try:
            return make(_keyword_value(comparator.get("keyword"))), False
        except ValueError as exc:
            raise MethodError("invalidArguments", f"sort: {exc}") from exc

    return sort


EMAIL_SORTS = {
    "receivedAt": (Email.received_at, False),
    "size": (Email.size, False),
    "from": (Email.from_sort, True),
    "to": (Email.to_sort, True),
    "subject": (Email.subject_sort, True),
    "sentAt": (Email.sent_at, False),
    "hasKeyword": _keyword_sort(_has_keyword),
    "allInThreadHaveKeyword": _keyword_sort(_all_in_thread),
    "someInThreadHaveKeyword": _keyword_sort(_some_in_thread),
}
_THREAD_WIDE = {"allInThreadHaveKeyword", "someInThreadHaveKeyword", "noneInThreadHaveKeyword"}


def mail_account_capability(app, read_only: bool) -> dict:
    """urn:ietf:params:jmap:mail in an account (RFC 8621 §1.3.1)."""
    return {
        "maxMailboxesPerEmail": MAX_MAILBOXES_PER_EMAIL,
        "maxMailboxDepth": MAX_MAILBOX_DEPTH,
        "maxSizeMailboxName": MAX_SIZE_MAILBOX_NAME,
        "maxSizeAttachmentsPerEmail": app.cfg.max_size_upload,
        "emailQuerySortOptions": sorted(EMAIL_SORTS),
        "mayCreateTopLevelMailbox": not read_only,
    }


register_capability(CAP_MAIL, account=mail_account_capability)


def _uses_thread_state(args: dict) -> bool:
    """Whether a query's results depend on other Emails of a thread than the one placed."""
    sorts = {c.get("property") for c in args.get("sort") or []}
    return bool(args.get("collapseThreads") or sorts & _THREAD_WIDE
                or _THREAD_WIDE & set(_filter_keys(args.get("filter"))))


def _filter_keys(raw_filter):
    if not isinstance(raw_filter, dict):
        return
    for condition in raw_filter.get("conditions") or []:
        yield from _filter_keys(condition)
    yield from (k for k in raw_filter if k not in ("operator", "conditions"))


@register_type
class EmailType(TypeSpec):
    """Email (RFC 8621 §4). Only mailboxIds and keywords are mutable."""

    name, capability, model, id_prefix = "Email", CAP_MAIL, Email, "e"
    methods = ("get", "changes", "set", "copy", "query", "queryChanges")
    filters = EMAIL_FILTERS
    sorts = EMAIL_SORTS
    query_args = {"collapseThreads": (a_bool, False)}
    props = {
        "id": Prop("id", server_set=True, immutable=True),
        "blobId": Prop("id", server_set=True, immutable=True),
        "threadId": Prop("id", server_set=True, immutable=True),
        "mailboxIds": Prop("object"),
        "keywords": Prop("object", default={}),
        "size": Prop("uint", "size", server_set=True, immutable=True),
        "receivedAt": Prop("utcdate", "received_at", server_set=True, immutable=True),
        **{name: Prop("any", server_set=True, immutable=True) for name in (
            "messageId", "inReplyTo", "references", "sender", "from", "to", "cc", "bcc",
            "replyTo", "subject", "sentAt", "hasAttachment", "preview", "headers",
            "bodyStructure", "bodyValues", "textBody", "htmlBody", "attachments")},
    }
    default_properties = EMAIL_DEFAULT_PROPERTIES
    get_args = {
        "bodyProperties": (nullable(a_strs), None),
        "fetchTextBodyValues": (a_bool, False),
        "fetchHTMLBodyValues": (a_bool, False),
        "fetchAllBodyValues": (a_bool, False),
        "maxBodyValueBytes": (a_uint, 0),
    }

    def check_property(self, name: str) -> bool:
        if not name.startswith("header:"):
            return False
        try:
            mime_check_header_property(name)
        except ValueError as exc:
            raise MethodError("invalidArguments", str(exc)) from exc  # RFC 8621 §4.2
        return True

    def prepare_get(self, ctx, args):
        wanted = args["bodyProperties"]
        if wanted is None:
            wanted = DEFAULT_BODY_PROPERTIES
        for name in wanted:
            if name not in BODY_PART_PROPERTIES and not self.check_property(name):
                raise MethodError("invalidArguments", f"unknown body property {name!r}")
        ctx.scratch["body_properties"] = wanted
        # bodyStructure is the whole MIME tree (RFC 8621 §4.1.4): without bodyProperties
        # it keeps its subParts, which §4.2's default list leaves out for the flat lists;
        # clients find attachments through them. An explicit list is taken as it is.
        ctx.scratch["structure_properties"] = wanted if args["bodyProperties"] is not None \
            else DEFAULT_BODY_PROPERTIES + ["subParts"]
        ctx.scratch["get_args"] = args

    def compute(self, ctx, row, name):
        # long: one branch per computed Email property, RFC 8621 §4.1
        if name == "blobId":
            return blob_id(row.blob_sha256)
        if name == "threadId":
            return type_id("Thread", row.thread_pk)
        if name == "mailboxIds":
            pks = row.__dict__.get("_mailboxes")
            if pks is None:
                pks = email_mailbox_pks(row.pk)
            return {type_id("Mailbox", pk): True for pk in pks}
        if name == "keywords":
            return json.loads(row.keywords)
        summary = row.__dict__.get("_summary")
        if summary is None:
            summary = row.__dict__["_summary"] = json.loads(row.summary)
        if name in summary:
            return summary[name]
        try:
            return email_message_property(ctx, self._parsed(ctx, row), f"P{row.blob_sha256}",
                                          name)
        except Exception:  # noqa: BLE001 -- one message's reader bug never fails the call
            log.getChild("mime").exception("Email %s: %s could not be read", row.pk, name)
            return MESSAGE_PROPERTY_FALLBACK.get(name)

    def validate(self, ctx, values, row):
        """An update's mailboxIds and keywords (RFC 8621 §4.6)."""
        email_meta(ctx, values)

    def prepare_set(self, ctx, args):
        """Write each new message, make its blob durable and analyse it, before the
        transaction (a SetError from writing is kept for create_one to raise)."""
        create = args.get("create")
        prepared = ctx.scratch.setdefault("email_create", {})
        for cid, raw_obj in (create.items() if isinstance(create, dict) else ()):
            if isinstance(raw_obj, dict):
                prepared[cid] = _email_compose(ctx, raw_obj)

    def create_one(self, ctx, cid, raw_obj):
        """Store the message a client composed (RFC 8621 §4.6), written by prepare_set."""
        mailbox_pks, keywords, received_at = email_meta(ctx, raw_obj)
        facts = ctx.scratch.get("email_create", {}).get(cid) or _email_compose(ctx, raw_obj)
        if isinstance(facts, SetError):
            raise facts
        row = email_store(ctx.changes, ctx.account.pk, facts, mailbox_pks, keywords,
                          received_at or ctx.now, ctx.now)
        return email_created(ctx, cid, row)

    def copy_one(self, ctx, src, cid, raw_obj):
        """The same message in another account: only mailboxIds, keywords and receivedAt
        may be set (RFC 8621 §4.7); the others come with the message."""
        original = copy_original(self, src, raw_obj)
        bad = sorted(set(raw_obj) - {"id", "mailboxIds", "keywords", "receivedAt"})
        if bad:
            raise invalid_properties(bad, "only mailboxIds, keywords and receivedAt")
        values = {"keywords": json.loads(original.keywords),
                  "receivedAt": utc_date(original.received_at), **raw_obj}
        mailbox_pks, keywords, received_at = email_meta(ctx, values)
        with blob_open(ctx.app.cfg.data_dir, original.blob_sha256) as f:
            raw = f.read()
        row = email_store(ctx.changes, ctx.account.pk, email_analyse(raw, original.blob_sha256),
                          mailbox_pks, keywords, received_at, ctx.now)
        return email_created(ctx, cid, row)

    def update_base(self, patch):
        # Only mailboxIds and keywords change; other properties a client sends along
        # are compared with their stored values (RFC 8620 §5.3), the body never parsed.
        sent = {key.split("/")[0] for key in patch}
        return ["id", "mailboxIds", "keywords"] + sorted(sent & set(self.props) - {
            "id", "mailboxIds", "keywords"})

    def on_update(self, ctx, row, changed):
        """Write new mailboxIds/keywords; recount the thread's Mailboxes."""
        before = thread_counts(row.thread_pk)
        if "mailboxIds" in changed:
            EmailMailbox.delete().where(EmailMailbox.email_pk == row.pk).execute()
            pks = sorted(set(email_mailbox_arg(ctx, changed["mailboxIds"])))
            EmailMailbox.insert_many([(row.pk, pk) for pk in pks],
                                     fields=[EmailMailbox.email_pk, EmailMailbox.mailbox_pk]
                                     ).execute()
        if "keywords" in changed:
            keywords = _keywords(changed["keywords"])
            Email.update(keywords=json_dumps(keywords), unread=email_is_unread(keywords)).where(
                Email.pk == row.pk).execute()
            EmailKeyword.delete().where(EmailKeyword.email_pk == row.pk).execute()
            EmailKeyword.insert_many([(k, row.pk, row.thread_pk) for k in keywords],
                                     fields=[EmailKeyword.keyword, EmailKeyword.email_pk,
                                             EmailKeyword.thread_pk]).execute()
            row.keywords = json_dumps(keywords)
        row.__dict__.pop("_mailboxes", None)
        mailbox_apply_counts(ctx.changes, before, thread_counts(row.thread_pk))
        email_thread_changed(ctx.changes, row)  # thread-wide keyword queries move

    def on_destroy(self, ctx, row, args):
        before = thread_counts(row.thread_pk)
        email_detach(ctx.changes, row)
        row.destroyed = True  # so the thread's counts and liveness see it gone
        Email.update(destroyed=True).where(Email.pk == row.pk).execute()
        mailbox_apply_counts(ctx.changes, before, thread_counts(row.thread_pk))
        email_thread_changed(ctx.changes, row)

    def prefetch(self, ctx, rows, wanted):
        if "mailboxIds" not in wanted or not rows:
            return
        by_pk = {row.pk: row for row in rows}
        for row in rows:
            row.__dict__["_mailboxes"] = []
        members = EmailMailbox.select(EmailMailbox.email_pk, EmailMailbox.mailbox_pk).where(
            EmailMailbox.email_pk.in_(list(by_pk))).order_by(EmailMailbox.mailbox_pk)
        for email_pk, mailbox_pk in members.tuples():
            by_pk[email_pk].__dict__["_mailboxes"].append(mailbox_pk)

    def query_columns(self):
        return (Email.pk, Email.thread_pk)

    def query_order(self, ctx, args, rows):
        """collapseThreads: keep the first Email of each thread (RFC 8621 §4.4.3)."""
        if not args.get("collapseThreads"):
            return (pk for pk, _ in rows)
        return _first_of_each_thread(rows)

    def query_changed(self, ctx, args, since):
        """With collapsed threads or thread-wide keywords, a change to one Email can move
        the others of its thread: re-place every Email of a thread that changed."""
        changed = super().query_changed(ctx, args, since)
        if not _uses_thread_state(args):
            return changed
        threads = Thread.select(Thread.pk).where(
            (Thread.account_pk == ctx.account.pk) & (Thread.updated_modseq > since))
        rows = Email.select(Email.pk, Email.created_modseq).where(
            (Email.account_pk == ctx.account.pk) & Email.thread_pk.in_(threads))
        changed.update(rows.tuples())
        return changed

    def _parsed(self, ctx, row) -> MimePart:
        cache = ctx.scratch.setdefault("parsed", {})
        if row.pk not in cache:
            with blob_open(ctx.app.cfg.data_dir, row.blob_sha256) as f:
                cache[row.pk] = mime_email(f.read())
        return cache[row.pk]


def _email_compose(ctx: Call, raw_obj: dict):
    """The MessageFacts of a message written from a client's Email, its blob durable; or
    the SetError that writing it raised."""
    try:
        raw = mime_write_message(ctx, raw_obj)
    except SetError as exc:
        return exc
    facts = email_analyse(raw, inline=True)
    if facts.inline is None:  # too big to keep in the database: a file, durable now
        blob_store_bytes(ctx.app.cfg.data_dir, raw)
    return facts


def email_meta(ctx: Call, values: dict) -> tuple[list, dict, float | None]:
    """Check mailboxIds, keywords and receivedAt of a new or changed Email (RFC 8621 §4.6)."""
    bad = []
    mailbox_pks = email_mailbox_arg(ctx, values.get("mailboxIds"))
    if mailbox_pks is None:
        bad.append("mailboxIds")
    try:
        keywords = _keywords(values.get("keywords", {}))
    except ValueError:
        bad.append("keywords")
    received_at = values.get("receivedAt")
    try:
        received_at = None if received_at is None else parse_utc_date(received_at)
    except (ValueError, TypeError):
        bad.append("receivedAt")
    if bad:
        raise invalid_properties(bad, "mailboxIds: existing Mailboxes, each true; keywords: "
                                      "IMAP atoms, each true; receivedAt: a UTCDate")
    if len(set(mailbox_pks)) > MAX_MAILBOXES_PER_EMAIL:
        raise SetError("tooManyMailboxes", f"at most {MAX_MAILBOXES_PER_EMAIL} Mailboxes")
    if len(keywords) > MAX_KEYWORDS_PER_EMAIL:
        raise SetError("tooManyKeywords", f"at most {MAX_KEYWORDS_PER_EMAIL} keywords")
    return mailbox_pks, keywords, received_at


def email_created(ctx: Call, cid: str, row: Email) -> dict:
    """The created/copied/imported answer: id, blobId, threadId, size (RFC 8621 §4.6)."""
    ctx.created_ids[cid] = type_id("Email", row.pk)
    return {"id": type_id("Email", row.pk), "blobId": blob_id(row.blob_sha256),
            "threadId": type_id("Thread", row.thread_pk), "size": row.size}


MESSAGE_PROPERTY_FALLBACK = {"headers": [], "bodyValues": {}, "textBody": [], "htmlBody": [],
                             "attachments": [], "hasAttachment": False, "preview": ""}


def email_message_property(ctx: Call, root: MimePart, blob_base: str, name: str):
    """An Email property read from the parsed message; part blob ids start with blob_base."""
    if name in CONVENIENCE_HEADERS or name in ("hasAttachment", "preview"):
        if "_summary" not in root.__dict__:
            root.__dict__["_summary"] = mime_summary(root)
        return root.__dict__["_summary"][name]
    if name == "headers":
        return [{"name": n, "value": v} for n, v in root.headers]
    if name.startswith("header:"):
        return mime_header_property(root.headers, name)
    body_properties = ctx.scratch.get("body_properties", DEFAULT_BODY_PROPERTIES)
    if name == "bodyStructure":
        return mime_part_json(root, blob_base, ctx.scratch.get("structure_properties",
                                                               body_properties))
    text_body, html_body, attachments = mime_body_lists(root)
    if name == "bodyValues":
        return email_body_values(root, text_body, html_body, ctx.scratch.get("get_args", {}))
    chosen = {"textBody": text_body, "htmlBody": html_body, "attachments": attachments}[name]
    return [mime_part_json(part, blob_base, body_properties) for part in chosen]


def email_body_values(root: MimePart, text_body: list, html_body: list, args: dict) -> dict:
    """bodyValues for the text parts the fetch* arguments ask for (RFC 8621 §4.2)."""
    chosen = []
    if args.get("fetchAllBodyValues"):
        chosen = [p for p in mime_walk(root) if p.type.startswith("text/")]
    else:
        if args.get("fetchTextBodyValues"):
            chosen += text_body
        if args.get("fetchHTMLBodyValues"):
            chosen += html_body
    values = {}
    for part in chosen:
        if not part.type.startswith("text/") or part.part_id in values:
            continue
        text, problem = mime_part_text(part)
        text, truncated = mime_truncate(text, args.get("maxBodyValueBytes") or 0,
                                        part.type == "text/html")
        values[part.part_id] = {"value": text, "isEncodingProblem": problem,
                                "isTruncated": truncated}
    return values


def email_mailbox_pks(email_pk: int) -> list[int]:
    return [pk for (pk,) in EmailMailbox.select(EmailMailbox.mailbox_pk)
            .where(EmailMailbox.email_pk == email_pk).order_by(EmailMailbox.mailbox_pk).tuples()]


# ---- storing and counting ----


@dataclass
class MessageFacts:
    """What storing a message needs, worked out from one parse before any write
    transaction (DESIGN: analyse, then commit): the commit only writes rows."""

    sha: str
    size: int
    summary: dict  # the fast properties (RFC 8621 §4.2), stored as JSON
    columns: dict  # Email columns read from the message (sort keys, sentAt, …)
    received_at: int | None  # of the topmost Received field
    msgids: list  # [(message id, 1 if its own else 0)] for threading
    fts: list  # the search index values
    headers: list  # the top-level header fields (vacation, delivery reports)
    report: dict | None  # a delivery report's facts (submission_report_facts)
    inline: bytes | None = None  # the octets, when the commit stores them (blob_store_inline)


EMPTY_SUMMARY = {**dict.fromkeys(CONVENIENCE_HEADERS), "hasAttachment": False, "preview": ""}


def email_analyse(raw: bytes, sha: str | None = None, inline: bool = False) -> MessageFacts:
    """Parse a message once into the facts its Email is stored from. A message always
    yields facts: what cannot be read is left empty and the raw message is kept. With
    `inline`, a message small enough (INLINE_BLOB_MAX) is kept in the database by the
    commit that stores it, instead of as a file written before."""
    sha = sha or hashlib.sha256(raw).hexdigest()
    root = mime_email(raw)
    summary, report = dict(EMPTY_SUMMARY), None
    try:
        summary = mime_summary(root)
        report = submission_report_facts(root)
    except Exception:  # noqa: BLE001 -- a parser bug must not cost the mail: logged, stored
        log.getChild("mime").exception("message %s: read in part only", sha[:12])
    fts = search_values(root, summary)
    ids = [(i, 1) for i in summary["messageId"] or []]
    ids += [(i, 0) for i in (summary["references"] or []) + (summary["inReplyTo"] or [])]
    columns = {"sent_at": mime_date_timestamp(summary["sentAt"]),
               "summary": json_dumps(summary), "message_id": (summary["messageId"] or [None])[0],
               "subject_sort": mime_base_subject(summary["subject"]),
               "from_sort": _address_sort_key(summary["from"]),
               "to_sort": _address_sort_key(summary["to"]),
               "has_attachment": summary["hasAttachment"], "search_version": SEARCH_VERSION}
    received_at = None
    try:
        received_at = mime_received_at(root)
    except (ValueError, OverflowError):
        pass  # a Received date beyond what a timestamp holds: the arrival time instead
    return MessageFacts(sha, len(raw), summary, columns, received_at, ids, fts, root.headers,
                        report, raw if inline and len(raw) <= INLINE_BLOB_MAX else None)


def email_store(changes: ChangeLog, account_pk: int, facts: MessageFacts, mailbox_pks: list,
                keywords: dict, received_at: float | None, now: float) -> Email:
    """Store analysed facts as an Email in the caller's transaction (the one way mail
    enters): rows only, no parsing, no file I/O."""
    if received_at is None:
        received_at = facts.received_at or now
    thread_pk = thread_for_email(changes, account_pk, facts)
    before = thread_counts(thread_pk)
    email_pk = record_new(
        changes, "Email", Email, blob_sha256=facts.sha, size=facts.size,
        received_at=int(received_at), thread_pk=thread_pk, keywords=json_dumps(keywords),
        unread=email_is_unread(keywords), **facts.columns)
    cursor = db.cursor()
    cursor.executemany("INSERT INTO email_mailbox (email_pk, mailbox_pk) VALUES (?, ?)",
                       [(email_pk, m) for m in sorted(set(mailbox_pks))])
    cursor.executemany("INSERT INTO email_keyword (keyword, email_pk, thread_pk) VALUES (?, ?, ?)",
                       [(k, email_pk, thread_pk) for k in keywords])
    cursor.executemany("INSERT OR IGNORE INTO email_msgid (account_pk, msgid, email_pk, own) "
                       "VALUES (?, ?, ?, ?)",
                       [(account_pk, i, email_pk, own) for i, own in facts.msgids])
    search_index(email_pk, facts.fts)
    blob_add_ref(account_pk, facts.sha, facts.size, "email", now, owner_pk=email_pk)
    if facts.inline is not None:
        blob_store_inline(facts.sha, facts.inline)
    mailbox_apply_counts(changes, before, thread_counts(thread_pk))
    changes.next("EmailDelivery")  # RFC 8621 §1.5: changes only when new mail arrives
    return Email(pk=email_pk, account_pk=account_pk, blob_sha256=facts.sha, size=facts.size,
                 thread_pk=thread_pk, received_at=int(received_at))


def _address_sort_key(addresses) -> str:
    """RFC 8621 §4.4.2 `from`/`to` sort: the first address's name, else its email."""
    if not addresses:
        return ""
    return addresses[0]["name"] or addresses[0]["email"] or ""


def thread_for_email(changes: ChangeLog, account_pk: int, facts: MessageFacts) -> int:
    """The thread a new Email joins (RFC 8621 §3).

    It joins the thread of a message it names in References/In-Reply-To, or of a
    message that names it (a reply that came first), if their base subjects agree;
    the subject check keeps broken References from merging strangers, and a subject
    alone never joins anything. Otherwise it starts a thread of its own.
    """
    refs = [i for i, own in facts.msgids if not own]
    own = [i for i, own in facts.msgids if own]
    subject = facts.columns["subject_sort"].casefold()
    candidates = []
    for ids, kind in ((refs, 1), (own, 0)):
        if ids:
            marks = ", ".join("?" * len(ids))
            candidates += db.execute_sql(
                "SELECT e.thread_pk, e.subject_sort FROM email_msgid m JOIN email e "
                f"ON e.pk = m.email_pk WHERE m.account_pk = ? AND m.own = ? AND m.msgid IN ({marks}) "
                "AND e.destroyed = 0 ORDER BY e.pk", [account_pk, kind, *ids]).fetchall()
    for thread_pk, other_subject in candidates:
        if other_subject.casefold() == subject:
            db.execute_sql("UPDATE thread SET updated_modseq = ? WHERE pk = ?",
                           (changes.next("Thread"), thread_pk))  # its emailIds change
            return thread_pk
    return record_new(changes, "Thread", Thread)


def thread_counts(thread_pk: int) -> dict:
    """Per Mailbox: (emails, unread emails, thread in it, thread unread for it) for one thread.

    RFC 8621 §2 unreadThreads with the trash rule: Emails only in the trash are left
    out of other Mailboxes' counts, Emails not in the trash out of the trash's.
    """
    rows = db.execute_sql(
        "SELECT e.pk, e.unread, em.mailbox_pk, m.role FROM email e "
        "JOIN email_mailbox em ON em.email_pk = e.pk JOIN mailbox m ON m.pk = em.mailbox_pk "
        "WHERE e.thread_pk = ? AND e.destroyed = 0", (thread_pk,))
    emails: dict = {}
    for email_pk, unread, mailbox_pk, role in rows:
        emails.setdefault(email_pk, [bool(unread), {}])[1][mailbox_pk] = role == "trash"
    counts: dict = {}
    for unread, boxes in emails.values():
        for mailbox_pk in boxes:
            c = counts.setdefault(mailbox_pk, [0, 0, 1, 0])
            c[0] += 1
            c[1] += unread
    trash = {pk for _, boxes in emails.values() for pk, is_trash in boxes.items() if is_trash}
    for mailbox_pk, c in counts.items():
        if mailbox_pk in trash:  # only Emails in the trash count for the trash
            c[3] = int(any(u and mailbox_pk in boxes for u, boxes in emails.values()))
        else:  # Emails only in the trash do not count elsewhere
            c[3] = int(any(u and not all(boxes.values()) for u, boxes in emails.values()))
    return {pk: tuple(c) for pk, c in counts.items()}


def thread_counts_sum(thread_pks: list) -> dict:
    """thread_counts() of several threads added up per Mailbox."""
    total: dict = {}
    for thread_pk in thread_pks:
        for mailbox_pk, counts in thread_counts(thread_pk).items():
            total[mailbox_pk] = tuple(a + b for a, b in zip(
                total.get(mailbox_pk, (0, 0, 0, 0)), counts))
    return total


def mailbox_thread_pks(mailbox_pk: int) -> list:
    return [pk for (pk,) in db.execute_sql(
        "SELECT DISTINCT e.thread_pk FROM email e JOIN email_mailbox em ON em.email_pk = e.pk "
        "WHERE em.mailbox_pk = ? AND e.destroyed = 0", (mailbox_pk,))]


def mailbox_apply_counts(changes: ChangeLog, before: dict, after: dict) -> None:
    """Add the difference of two thread_counts() to the Mailboxes and log count changes."""
    for mailbox_pk in set(before) | set(after):
        old, new = before.get(mailbox_pk, (0, 0, 0, 0)), after.get(mailbox_pk, (0, 0, 0, 0))
        delta = [n - o for n, o in zip(new, old)]
        if not any(delta):
            continue
        db.execute_sql(  # a count change (RFC 8621 §2.2), logged as kind "counts"
            "UPDATE mailbox SET total_emails = total_emails + ?, unread_emails = "
            "unread_emails + ?, total_threads = total_threads + ?, unread_threads = "
            "unread_threads + ?, counts_modseq = ? WHERE pk = ?",
            (*delta, changes.next("Mailbox"), mailbox_pk))


def email_remove_from_mailbox(changes: ChangeLog, row: Email, mailbox_pk: int) -> None:
    """Take an Email out of a Mailbox; an Email left in none is destroyed (RFC 8621 §2.5)."""
    before = thread_counts(row.thread_pk)
    EmailMailbox.delete().where((EmailMailbox.email_pk == row.pk)
                                & (EmailMailbox.mailbox_pk == mailbox_pk)).execute()
    if EmailMailbox.select().where(EmailMailbox.email_pk == row.pk).exists():
        record_change(changes, "Email", row, "updated")
    else:
        email_destroy(changes, row)
    mailbox_apply_counts(changes, before, thread_counts(row.thread_pk))


def email_destroy(changes: ChangeLog, row: Email) -> None:
    """Destroy an Email: tombstone, membership and blob reference gone, thread updated."""
    email_detach(changes, row)
    record_change(changes, "Email", row, "destroyed")
    email_thread_changed(changes, row)


def email_detach(changes: ChangeLog, row: Email) -> None:
    """Everything but the tombstone of destroying an Email (RFC 8621 §4.6 destroy)."""
    try:
        if getattr(row, "search_version", 1) == SEARCH_VERSION:
            with blob_open(db_data_dir(), row.blob_sha256) as f:
                root = mime_email(f.read())
            search_unindex(row.pk, search_values(root, json.loads(row.summary)))
    except OSError as exc:  # a missing blob must not keep the Email alive
        log.error("Email %s: blob unreadable (%s); search index entry left", row.pk, exc)
    EmailMailbox.delete().where(EmailMailbox.email_pk == row.pk).execute()
    EmailKeyword.delete().where(EmailKeyword.email_pk == row.pk).execute()
    BlobRef.delete().where((BlobRef.kind == "email") & (BlobRef.owner_pk == row.pk)).execute()


def email_thread_changed(changes: ChangeLog, row: Email) -> None:
    """Log the Email's thread as updated (its emailIds or keywords changed) or destroyed."""
    thread = Thread.get_by_id(row.thread_pk)
    alive = Email.select().where(
        (Email.thread_pk == thread.pk) & (Email.destroyed == False)).exists()  # noqa: E712
    record_change(changes, "Thread", thread, "updated" if alive else "destroyed")


# ---- Email/import (RFC 8621 §4.8) ----

IMPORT_ARGS = {
    "accountId": (a_id, REQUIRED),
    "ifInState": (nullable(a_str), None),
    "emails": (a_obj, REQUIRED),
}


def _import_prepare(ctx: Call, raw_args: dict) -> None:
    """Read, check and analyse each blob before the write transaction; a part of another
    message becomes a blob of its own, durably, here too."""
    emails = raw_args.get("emails")
    if not isinstance(emails, dict) or len(emails) > ctx.limits.max_objects_in_set:
        return  # the handler refuses the call
    prepared = ctx.scratch.setdefault("import", {})
    for item in emails.values():
        raw_blob_id = item.get("blobId") if isinstance(item, dict) else None
        if isinstance(raw_blob_id, str) and raw_blob_id not in prepared:
            prepared[raw_blob_id] = _import_analyse(ctx, raw_blob_id)


def _import_analyse(ctx: Call, raw_blob_id: str):
    """MessageFacts of a blob to import, or "notFound" / "invalidEmail"."""
    raw = blob_read(ctx, raw_blob_id)
    if raw is None:
        return "notFound"
    if not mime_looks_like_message(raw):  # RFC 8621 §4.8: a blob that is no message at all
        return "invalidEmail"
    sha = hashlib.sha256(raw).hexdigest()
    if blob_sha_from_id(raw_blob_id) != sha:  # a part of another message: store it
        blob_store_bytes(ctx.app.cfg.data_dir, raw)
    return email_analyse(raw, sha)


@jmap_method("Email/import", CAP_MAIL, writes=True, prepare=_import_prepare)
def email_import(ctx: Call, raw_args: dict) -> dict:
    """Add uploaded messages as Emails (RFC 8621 §4.8)."""
    args = take_args(raw_args, IMPORT_ARGS)
    spec = TYPES["Email"]
    result = set_begin(spec, ctx, len(args["emails"]), args["ifInState"], "created",
                       "notCreated")
    for cid, item in args["emails"].items():
        _record_outcome(result, "created", "notCreated", cid,
                        lambda: _import_one(ctx, cid, item), ctx.changes)
    set_finish(spec, ctx, result)
    return result


def _import_one(ctx: Call, cid: str, item) -> dict:
    if not isinstance(item, dict):
        raise invalid_properties([], "an EmailImport must be an object")
    bad = sorted(set(item) - {"blobId", "mailboxIds", "keywords", "receivedAt"})
    raw_blob_id = item.get("blobId")
    facts = "notFound"
    if isinstance(raw_blob_id, str):
        facts = ctx.scratch.get("import", {}).get(raw_blob_id) or _import_analyse(ctx, raw_blob_id)
    if facts == "notFound":
        bad.append("blobId")
    if bad:
        raise invalid_properties(bad, "blobId must name a blob this account can read")
    mailbox_pks, keywords, received_at = email_meta(ctx, item)
    if facts == "invalidEmail":
        raise SetError("invalidEmail", "the blob is not a message: it must begin with a header")
    row = email_store(ctx.changes, ctx.account.pk, facts, mailbox_pks, keywords, received_at,
                      ctx.now)
    return email_created(ctx, cid, row)


# ---- Email/parse (RFC 8621 §4.9) ----

PARSE_DEFAULT_PROPERTIES = [
    "messageId", "inReplyTo", "references", "sender", "from", "to", "cc", "bcc", "replyTo",
    "subject", "sentAt", "hasAttachment", "preview", "bodyValues", "textBody", "htmlBody",
    "attachments"]
PARSE_NULL_PROPERTIES = ("id", "mailboxIds", "keywords", "receivedAt", "threadId")
PARSE_ARGS = {
    "accountId": (a_id, REQUIRED),
    "blobIds": (a_ids, REQUIRED),
    "properties": (nullable(a_strs), None),
    **EmailType.get_args,
}


@jmap_method("Email/parse", CAP_MAIL)
def email_parse(ctx: Call, raw_args: dict) -> dict:
    """Read blobs as messages without storing them (RFC 8621 §4.9)."""
    args = take_args(raw_args, PARSE_ARGS)
    spec = TYPES["Email"]
    if len(args["blobIds"]) > ctx.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", "more blobIds than maxObjectsInGet")
    properties = args["properties"]
    if properties is None:
        properties = PARSE_DEFAULT_PROPERTIES
    unknown = [p for p in properties if p not in spec.props and not spec.check_property(p)]
    if unknown:
        raise MethodError("invalidArguments", f"unknown properties: {', '.join(unknown)}")
    spec.prepare_get(ctx, args)
    parsed, not_parsable, not_found = {}, [], []
    for raw_blob_id in dict.fromkeys(args["blobIds"]):
        raw = blob_read(ctx, raw_blob_id)
        if raw is None:
            not_found.append(raw_blob_id)
            continue
        root = mime_parsable(raw)
        if root is None:
            not_parsable.append(raw_blob_id)
            continue
        parsed[raw_blob_id] = {name: _parsed_property(ctx, root, raw_blob_id, len(raw), name)
                               for name in properties}
    return {"accountId": ctx.account.id, "parsed": parsed or None,
            "notParsable": not_parsable or None, "notFound": not_found or None}


def _parsed_property(ctx: Call, root: MimePart, raw_blob_id: str, size: int, name: str):
    if name in PARSE_NULL_PROPERTIES:
        return None  # RFC 8621 §4.9: not in any mailbox, no thread computed
    if name == "blobId":
        return raw_blob_id
    if name == "size":
        return size
    base = "P" + raw_blob_id[1:] if raw_blob_id.startswith(BLOB_ID_PREFIX) else raw_blob_id
    return email_message_property(ctx, root, base, name)


def mime_looks_like_message(raw: bytes) -> bool:
    """Whether a blob opens with a header field, as a message must (RFC 5322 §2.1);
    later stray lines are tolerated as the reader tolerates them."""
    return bool(_MESSAGE_START_RE.match(raw))


_MESSAGE_START_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,998}[ \t]*:")


def mime_parsable(raw: bytes) -> MimePart | None:
    """The message in a blob, or None if it is not one (see mime_looks_like_message)."""
    if not mime_looks_like_message(raw):
        return None
    try:
        return mime_tree(raw)
    except (MimeError, RecursionError, ValueError, LookupError):
        return None


def email_mailbox_arg(ctx: Call, value) -> list[int] | None:
    """Check a mailboxIds object: at least one existing Mailbox, every value true."""
    if not isinstance(value, dict) or not value:
        return None
    pks = []
    for raw_id, flag in value.items():
        row = TYPES["Mailbox"].load(ctx, raw_id)
        if flag is not True or row is None:
            return None
        pks.append(row.pk)
    return pks


def blob_read(ctx: Call, raw_blob_id: str) -> bytes | None:
    """The octets of a blob the account may see (see blob_read_as)."""
    return blob_read_as(ctx.app.cfg.data_dir, ctx.account.pk, ctx.user.pk, raw_blob_id, ctx.now)


def blob_read_as(data_dir: str, account_pk: int, user_pk: int, raw_blob_id: str,
                 now: float) -> bytes | None:
    """Read a stored blob (`B<sha>`) or a message part (`P<sha>_<partId>[_<partId>…]`).

    Part blobs are decoded from the message on demand; the account must hold a
    reference to the message itself (RFC 8620 §6).
    """
    base, _, part_path = raw_blob_id.partition("_")
    if base.startswith("P"):
        base = BLOB_ID_PREFIX + base[1:]
    elif part_path:
        return None
    sha = blob_sha_from_id(base)
    if sha is None or blob_visible(account_pk, sha, now, user_pk) is None:
        return None
    if base != raw_blob_id.partition("_")[0] and not part_path:
        return None  # "P<sha>" alone names no part
    with blob_open(data_dir, sha) as f:
        data = f.read()
    for part_id in part_path.split("_") if part_path else []:
        part = mime_find_part(mime_email(data), part_id)
        if part is None:
            return None
        data = mime_decoded(part)
    return data




# =============================================================================
# 7.5 SEARCHSNIPPET
#     RFC 8621 §5: the subject and a piece of the body with the query's terms
#     marked. Terms come from the filter's text conditions (search_terms).
# =============================================================================

SNIPPET_CHARS = 200
SNIPPET_MAX_OCTETS = 255  # RFC 8621 §5: the preview MUST NOT be bigger than 255 octets
SNIPPET_ARGS = {
    "accountId": (a_id, REQUIRED),
    "filter": (nullable(a_obj), None),
    "emailIds": (a_ids, REQUIRED),
}


@jmap_method("SearchSnippet/get", CAP_MAIL)
def search_snippet_get(ctx: Call, raw_args: dict) -> dict:
    """Highlight the filter's terms in the subject and body of Emails (RFC 8621 §5)."""
    args = take_args(raw_args, SNIPPET_ARGS)
    if len(args["emailIds"]) > ctx.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", "more ids than maxObjectsInGet")
    spec = TYPES["Email"]
    if args["filter"] is not None:
        filter_expression(spec, ctx, args["filter"], 0)  # same checks as Email/query
    terms = search_terms(args["filter"])
    found, not_found = [], []
    for raw_id in dict.fromkeys(args["emailIds"]):
        row = spec.load(ctx, raw_id)
        if row is None:
            not_found.append(raw_id)
            continue
        summary = json.loads(row.summary)
        body = search_snippet_text(spec._parsed(ctx, row))
        found.append({"emailId": raw_id, "subject": search_mark(summary["subject"], terms),
                      "preview": search_preview(body, terms)})
    # RFC 8621 §5.1: notFound is null when every id was found
    return {"accountId": ctx.account.id, "list": found, "notFound": not_found or None}


def search_terms(raw_filter) -> list[str]:
    """The words and phrases of every text condition in a filter, folded for matching."""
    if not isinstance(raw_filter, dict):
        return []
    if isinstance(raw_filter.get("conditions"), list) and raw_filter.get("operator") != "NOT":
        return [t for c in raw_filter["conditions"] for t in search_terms(c)]
    terms = []
    for key in ("text", "subject", "body", "from", "to", "cc", "bcc"):
        if isinstance(raw_filter.get(key), str):
            terms += [search_fold(t)[0] for t in search_parse_query(raw_filter[key])]
    return [t for t in terms if t.strip()]


def search_fold(text: str) -> tuple[str, list[int]]:
    """Fold text as the index does (case, diacritics, runs of white space) and map each
    folded character back to the index of the original character it came from."""
    folded, origin, space = [], [], False
    for index, char in enumerate(text):
        if char.isspace():
            if not space:
                folded.append(" ")
                origin.append(index)
            space = True
            continue
        space = False
        base = "".join(c for c in unicodedata.normalize("NFKD", char)
                       if not unicodedata.combining(c)).casefold()
        for piece in base or char:
            folded.append(piece)
            origin.append(index)
    return "".join(folded), origin


def _term_spans(text: str, terms: list) -> list[tuple[int, int]]:
    """Where the folded terms occur in text: (start, end) of original characters."""
    folded, origin = search_fold(text)
    spans, taken = [], bytearray(len(text))  # taken: characters inside a span already
    for term in sorted(set(terms), key=len, reverse=True):
        at = folded.find(term) if term else -1
        while at >= 0:
            start, end = origin[at], origin[at + len(term) - 1] + 1
            if taken.find(1, start, end) < 0:
                spans.append((start, end))
                taken[start:end] = b"\x01" * (end - start)
            at = folded.find(term, at + len(term))
    return sorted(spans)


def search_mark(text: str | None, terms: list) -> str | None:
    """Escape text as HTML and wrap the terms in <mark> (RFC 8621 §5); None if none occur."""
    import html as html_lib  # lazy: search only

    if text is None or not terms:
        return None
    spans = _term_spans(text, terms)
    if not spans:
        return None
    out, last = [], 0
    for start, end in spans:
        out.append(html_lib.escape(text[last:start]))
        out.append(f"<mark>{html_lib.escape(text[start:end])}</mark>")
        last = end
    out.append(html_lib.escape(text[last:]))
    return "".join(out)


def search_preview(body: str, terms: list) -> str | None:
    """Body text around the first match, marked, at most 255 octets (RFC 8621 §5)."""
    spans = _term_spans(body, terms) if terms else []
    if not spans:
        return None
    start = max(0, spans[0][0] - SNIPPET_CHARS // 4)
    length = SNIPPET_CHARS
    while length > 0:
        excerpt = re.sub(r"\s+", " ", body[start: start + length]).strip()
        marked = search_mark(excerpt, terms)
        if marked and octets(marked) <= SNIPPET_MAX_OCTETS:
            return marked
        length = length * 3 // 4
    return None


# =============================================================================
# 7.6 IDENTITY
#     RFC 8621 §6: the addresses an account sends as. Every account has a default
#     Identity for its own address (mayDelete false); more may be made for the
#     account's own address and its aliases, never for another's (forbiddenFrom).
# =============================================================================


def email_address_list(value) -> list:
    """Check an EmailAddress[] (RFC 8621 §4.1.2.3) and return it with every name present."""
    if not isinstance(value, list) or len(value) > MAX_IDENTITIES:
        raise ValueError("an array of EmailAddress objects")
    out = []
    for item in value:
        if (not isinstance(item, dict) or set(item) - {"name", "email"}
                or not isinstance(item.get("email"), str)
                or not isinstance(item.get("name"), (str, type(None)))):
            raise ValueError("an EmailAddress is {name, email}")
        out.append({"name": item.get("name"), "email": item["email"]})
    return out


def account_addresses(account_pk: int) -> set:
    """The addresses an account owns: its username and its aliases, in lower case."""
    rows = db.execute_sql("SELECT username FROM account WHERE pk = ? UNION "
                          "SELECT address FROM alias WHERE account_pk = ?",
                          (account_pk, account_pk))
    return {address.lower() for (address,) in rows}


def _identity_email(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in value):
        raise ValueError("an e-mail address")
    return value


@register_type
class IdentityType(TypeSpec):
    """Identity (RFC 8621 §6)."""

    name, capability, model, id_prefix = "Identity", CAP_SUBMISSION, Identity, "I"
    methods = ("get", "changes", "set")
    props = {
        "id": Prop("id", server_set=True, immutable=True),
        "name": Prop("str", "name", default="", max_len=255),
        "email": Prop("str", "email", immutable=True, max_len=255, check=_identity_email),
        "replyTo": Prop("list", "reply_to", default=None, nullable=True, json=True,
                        check=email_address_list),
        "bcc": Prop("list", "bcc", default=None, nullable=True, json=True,
                    check=email_address_list),
        "textSignature": Prop("str", "text_signature", default="", max_len=65536),
        "htmlSignature": Prop("str", "html_signature", default="", max_len=65536),
        "mayDelete": Prop("bool", "may_delete", server_set=True),
    }

    def validate(self, ctx, values, row):
        if row is not None:
            return
        if values["email"].lower() not in account_addresses(ctx.account.pk):
            raise SetError("forbiddenFrom", f"this account may not send as {values['email']}")
        if self.live(ctx).count() >= MAX_IDENTITIES:
            raise SetError("overQuota", f"at most {MAX_IDENTITIES} identities")

    def on_destroy(self, ctx, row, args):
        if not row.may_delete:
            raise SetError("forbidden", "the account's own address cannot be deleted")

    def create_defaults(self, changes, account):
        identity_create_default(changes, account)


def identity_create_default(changes: ChangeLog, account: Account) -> None:
    row = Identity(account_pk=account.pk, email=account.username, may_delete=False)
    record_change(changes, "Identity", row, "created")


# =============================================================================
# 7.7 VACATIONRESPONSE
#     RFC 8621 §8: one object per account, id "singleton". The auto-reply itself is
#     sent by delivery (section 8).
# =============================================================================

register_capability(CAP_VACATION, account=lambda app, read_only: {})  # RFC 8621 §1.3.3


@register_type
class VacationResponseType(TypeSpec):
    """VacationResponse (RFC 8621 §8): a singleton with get and set."""

    name, capability, model, id_prefix = "VacationResponse", CAP_VACATION, VacationResponse, "V"
    methods = ("get", "set")
    singleton = True
    props = {
        "id": Prop("id", server_set=True, immutable=True),
        "isEnabled": Prop("bool", "is_enabled", default=False),
        "fromDate": Prop("utcdate", "from_date", default=None, nullable=True),
        "toDate": Prop("utcdate", "to_date", default=None, nullable=True),
        "subject": Prop("str", "subject", default=None, nullable=True, max_len=998),
        "textBody": Prop("str", "text_body", default=None, nullable=True, max_len=65536),
        "htmlBody": Prop("str", "html_body", default=None, nullable=True, max_len=262144),
    }

    def create_defaults(self, changes, account):
        vacation_create(changes, account.pk)


def vacation_create(changes: ChangeLog, account_pk: int) -> None:
    record_change(changes, "VacationResponse", VacationResponse(account_pk=account_pk), "created")


def vacation_active(row: VacationResponse, at: float) -> bool:
    """Whether mail arriving at `at` gets the reply (RFC 8621 §8: from inclusive, to not)."""
    return bool(row.is_enabled) and (row.from_date is None or row.from_date <= at) and (
        row.to_date is None or at < row.to_date)


# =============================================================================
# 7.8 SEARCH
#     SQLite FTS5 (contentless) over subject, addresses and body text, written in
#     the same transaction as the Email, so mail is searchable once stored. Query
#     strings follow RFC 8621 §4.4.1: words must all match, quotes make phrases.
# =============================================================================

MAX_INDEXED_BODY_CHARS = 200_000
FTS_COLUMNS = ("subject", "from_", "to_", "cc_", "bcc_", "body")


def search_parse_query(text: str) -> list[str]:
    """Split a search string into words and quoted phrases (RFC 8621 §4.4.1).

    Control characters (NUL included) separate words. A quote that has no partner
    starts an ordinary word, and once one kind of quote has none, later ones of that
    kind are not searched for again: the split is one pass however the quotes fall."""
    text = _CONTROL_CHARS_RE.sub(" ", text).replace("\t", " ")
    terms, at, size, unpaired = [], 0, len(text), set()
    while at < size:
        if text[at].isspace():
            at += 1
            continue
        quote = text[at]
        if quote in "'\"" and quote not in unpaired:
            close = _closing_quote(text, at)
            if close > 0:
                terms.append(re.sub(r"\\(.)", r"\1", text[at + 1:close], flags=re.S).strip())
                at = close + 1
                continue
            unpaired.add(quote)
        word = _SEARCH_WORD_RE.match(text, at)  # a quote inside a word (don't) is part of it
        terms.append(word.group(0))
        at = word.end()
    return [t for t in (t.strip() for t in terms) if t]


_SEARCH_WORD_RE = re.compile(r"\S+")


def _closing_quote(text: str, at: int) -> int:
    """The index of the quote that closes the one at `at` (escapes skipped), or -1."""
    pattern = _CLOSING_QUOTE_RE[text[at]]
    found = pattern.match(text, at + 1)
    return found.end() - 1 if found else -1


_CLOSING_QUOTE_RE = {q: re.compile(rf"[^{q}\\]*+(?:\\.[^{q}\\]*+)*+{q}", re.S)
                     for q in "'\""}


def search_fts_query(text: str, columns: tuple | None) -> str:
    """An FTS5 MATCH expression: every term (as a phrase) in one of the columns (None:
    any column of the table)."""
    terms = search_parse_query(text)
    if not terms:
        raise ValueError("nothing to search for")
    scope = "{" + " ".join(columns) + "}: " if columns else ""
    return " AND ".join(scope + '"' + t.replace('"', '""') + '"' for t in terms)


def search_filter(column_names: tuple | None):
    """A filter condition over FTS columns (Email/query `text`, `from`, … `body`)."""

    def make(ctx, value):
        query = search_fts_query(a_str(value), column_names)
        return Email.pk.in_(peewee.SQL("(SELECT rowid FROM email_fts WHERE email_fts MATCH ?)",
                                       [query]))

    return make


def search_body_text(root: MimePart) -> str:
    """Every text part a reader may see, decoded, HTML turned into text: the plain and
    HTML alternatives both, and text attachments (RFC 8621 §4.4.1 `body`)."""
    pieces = []
    for part in mime_walk(root):
        if part.type.startswith("text/") and part.type != "text/calendar":
            text, _ = mime_part_text(part)
            pieces.append(mime_html_to_text(text) if part.type == "text/html" else text)
    return "\n".join(pieces)[:MAX_INDEXED_BODY_CHARS]


def search_values(root: MimePart, summary: dict) -> list:
    """The index values of a message; the same every time for the same message (removal
    needs them again), empty where extraction fails."""
    try:
        return _fts_values(root, summary)
    except Exception:  # noqa: BLE001 -- a parser bug must not cost the mail: logged
        log.getChild("search").exception("message text not indexed")
        return [summary.get("subject") or "", "", "", "", "", ""]


def search_snippet_text(root: MimePart) -> str:
    """The text a snippet is cut from: what a reader sees, once. Of a plain and an HTML
    alternative only the one the text body takes (the index holds both, so that either
    is found), then text attachments."""
    text_body, html_body, attachments = mime_body_lists(root)
    pieces = []
    for part in (text_body or html_body) + attachments:
        if part.type.startswith("text/") and part.type != "text/calendar":
            text, _ = mime_part_text(part)
            pieces.append(mime_html_to_text(text) if part.type == "text/html" else text)
    return "\n".join(pieces)[:MAX_INDEXED_BODY_CHARS]


def _fts_values(root: MimePart, summary: dict) -> list:
    def people(key, field):
        addresses = summary.get(key) or []
        if len(addresses) >= MAX_PARSED_ADDRESSES:  # the parse stopped: index the whole field
            return " ".join(mime_text(raw) for name, raw in root.headers if name.lower() == field)
        return " ".join(f"{a['name'] or ''} {a['email']}" for a in addresses)

    return [summary.get("subject") or "", people("from", "from"), people("to", "to"),
            people("cc", "cc"), people("bcc", "bcc"), search_body_text(root)]


# The index is contentless: removing an Email needs exactly the values it was indexed
# with, which only the same text extraction gives back. Rows record the version of the
# extraction that indexed them; an older one's entry is left (search joins on live
# Emails, so it is never found) rather than removed with values that do not match.
SEARCH_VERSION = 2


def search_index(email_pk: int, values: list) -> None:
    """Add an Email to the full-text index (in the storing transaction)."""
    db.execute_sql("INSERT INTO email_fts (rowid, subject, from_, to_, cc_, bcc_, body) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", [email_pk, *values])


def search_unindex(email_pk: int, values: list) -> None:
    """Remove an Email from the contentless index (it needs the indexed values again)."""
    db.execute_sql("INSERT INTO email_fts (email_fts, rowid, subject, from_, to_, cc_, bcc_, "
                   "body) VALUES ('delete', ?, ?, ?, ?, ?, ?, ?)", [email_pk, *values])


def search_header_matches(data_dir: str, sha: str, name: str, value: str | None) -> bool:
    """Whether a message has a header field (containing a text): the `header` filter."""
    try:
        with blob_open(data_dir, sha) as f:
            block, _ = mime_split(f.read(256 * 1024))
    except OSError:
        return False
    needle = value.casefold() if value else None
    for field_name, raw in mime_header_fields(block):
        if field_name.lower() == name.lower():
            if needle is None or needle in mime_text(raw).casefold():
                return True
    return False


# =============================================================================
# 7.9 MIME WRITING -- Email/set create (RFC 8621 §4.6)
#     A JMAP Email (header properties, a bodyStructure or textBody/htmlBody/
#     attachments, bodyValues and blob ids) becomes RFC 5322/MIME octets: CRLF
#     lines folded at 78 where a fold is possible, RFC 2047 words and RFC 2231
#     parameters for non-ASCII, the smallest transfer encoding that fits.
# =============================================================================

EMAIL_CREATE_HEADERS = {  # convenience property -> (field name, parsed form)
    "messageId": ("Message-ID", "MessageIds"),
    "inReplyTo": ("In-Reply-To", "MessageIds"),
    "references": ("References", "MessageIds"),
    "sender": ("Sender", "Addresses"),
    "from": ("From", "Addresses"),
    "to": ("To", "Addresses"),
    "cc": ("Cc", "Addresses"),
    "bcc": ("Bcc", "Addresses"),
    "replyTo": ("Reply-To", "Addresses"),
    "subject": ("Subject", "Text"),
    "sentAt": ("Date", "Date"),
}
EMAIL_CREATE_PROPS = {"mailboxIds", "keywords", "receivedAt", "bodyStructure", "bodyValues",
                      "textBody", "htmlBody", "attachments", *EMAIL_CREATE_HEADERS}
PART_CREATE_PROPS = {"partId", "blobId", "size", "name", "type", "charset", "disposition",
                     "cid", "language", "location", "subParts"}
PART_HEADER_OF = {"disposition": "content-disposition", "cid": "content-id",
                  "language": "content-language", "location": "content-location"}
MIME_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+\Z")
ATEXT_PHRASE_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+( [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*+\Z")
FOLD_AT = 78  # RFC 5322 §2.1.1: SHOULD be no more than 78 characters
ENCODED_WORD_OCTETS = 30  # "=?UTF-8?B?" + base64 of 30 octets + "?=" is 52: with a field
# name of up to 25 characters the first line still fits 78 (RFC 2047 §2: words <= 75)


@dataclass
class MimeOut:
    """A part to write: its type and parameters, other fields, and body or children."""

    ctype: str
    params: list = field(default_factory=list)  # (name, value)
    fields: list = field(default_factory=list)  # (name, value as written after the colon)
    body: bytes = b""
    cte: str | None = None
    children: list = field(default_factory=list)


class EmailDraft:
    """One Email/set create under way: what it may read and what went wrong so far."""

    def __init__(self, ctx: Call, body_values: dict):
        self.ctx = ctx
        self.body_values = body_values
        self.bad: list[str] = []  # invalid top-level properties
        self.why: list[str] = []  # where exactly, for the description
        self.not_found: list[str] = []  # blob ids (blobNotFound)
        self.bad_values: set = set()  # bodyValues already refused
        self.parts = 0
        self.blob_octets = 0

    def fail(self, prop: str, why: str) -> None:
        top = prop.split("/")[0]
        if top not in self.bad:
            self.bad.append(top)
        self.why.append(f"{prop}: {why}")


def mime_write_message(ctx: Call, obj: dict) -> bytes:
    """The message an Email/set create describes (RFC 8621 §4.6); raises SetError."""
    body_values = obj.get("bodyValues") or {}
    draft = EmailDraft(ctx, body_values if isinstance(body_values, dict) else {})
    if not isinstance(body_values, dict):
        draft.fail("bodyValues", "an object")
    for part_id, value in list(draft.body_values.items()):
        if not (isinstance(value, dict) and isinstance(value.get("value"), str)
                and set(value) <= {"value", "isEncodingProblem", "isTruncated"}
                and value.get("isEncodingProblem", False) is False
                and value.get("isTruncated", False) is False):
            draft.fail("bodyValues", f"{part_id!r}: {{value}} with no problem or truncation")
            del draft.body_values[part_id]  # never read as text below
            draft.bad_values.add(part_id)
    for name in obj:
        if name not in EMAIL_CREATE_PROPS and not name.startswith("header:"):
            draft.fail(name, "not settable on create")
    top_fields, top_names = mime_write_fields(draft, obj, "", top=True)
    root = mime_write_body(draft, obj, top_names)
    if draft.bad:
        raise invalid_properties(draft.bad, "; ".join(draft.why))
    if draft.not_found:
        raise SetError("blobNotFound", "blobs not found", notFound=draft.not_found)
    if draft.blob_octets > ctx.app.cfg.max_size_upload:
        raise SetError("tooLarge", "the attachments exceed maxSizeAttachmentsPerEmail")
    if not top_names.get("date"):
        top_fields.append(("Date", " " + mime_date_field(ctx.now)))
    if not top_names.get("message-id"):  # RFC 8621 §4.6: the server MUST set one
        top_fields.append(("Message-ID", " " + mime_new_message_id(ctx.account.username)))
    top_fields.append(("MIME-Version", " 1.0"))
    return mime_render(root, top_fields)


def mime_write_fields(draft: EmailDraft, obj: dict, where: str, top: bool) -> tuple[list, dict]:
    """Header fields from header properties; returns (fields, {lower name: written?})."""
    fields, names = [], {}
    for prop, value in obj.items():
        if top and prop in EMAIL_CREATE_HEADERS:
            name, form = EMAIL_CREATE_HEADERS[prop]
            every = False
        elif prop.startswith("header:"):
            match = HEADER_PROP_RE.match(prop)
            form = match and (match.group(2) or "Raw")
            if not match or form not in HEADER_FORMS:
                draft.fail(where + prop, "not a header property")
                continue
            name, every = match.group(1), bool(match.group(3))
            if not mime_header_form_allowed(name, form):
                draft.fail(where + prop, f"the {form} form does not apply")
                continue
        else:
            continue
        key = name.lower()
        if key in names:
            draft.fail(where + prop, f"{name} is given twice")
            continue
        if top and (key.startswith("content-") or key == "mime-version") or \
                key == "content-transfer-encoding" or (not top and key == "content-type"):
            draft.fail(where + prop, f"{name} is not allowed here")
            continue
        written = mime_write_field_values(draft, where + prop, name, form, value, every)
        names[key] = bool(written)
        fields += written
    return fields, names


def mime_write_field_values(draft: EmailDraft, prop: str, name: str, form: str, value,
                            every: bool) -> list:
    if value is None:
        return []
    if every and not isinstance(value, list):
        draft.fail(prop, "an array (:all)")
        return []
    written = []
    for item in value if every else [value]:
        try:
            written.append((name, mime_write_value(form, item)))
        except (ValueError, TypeError, AttributeError) as exc:
            draft.fail(prop, str(exc) or "not a valid value for its form")
    return written


def mime_write_value(form: str, value) -> str:
    """One header value in a parsed form, written as the octets after the colon."""
    if form == "Raw":
        if not isinstance(value, str) or "\0" in value or re.search(
                r"\r(?!\n)|(?<!\r)\n|\r\n(?![ \t])", value):
            raise ValueError("raw text with CRLF only before whitespace")
        return value
    if form == "Text":
        if not isinstance(value, str):
            raise ValueError("a String")
        return " " + mime_write_text(value)
    if form == "Addresses":
        return " " + ", ".join(mime_write_address(a) for a in _as_list(value))
    if form == "GroupedAddresses":
        return " " + ", ".join(mime_write_group(g) for g in _as_list(value))
    if form == "MessageIds":
        ids = _as_list(value)
        if not ids or not all(isinstance(i, str) and re.fullmatch(r"[^\s<>()\x00-\x1f]+", i)
                              for i in ids):
            raise ValueError("message ids without <>, spaces or controls")
        return " " + " ".join(f"<{i}>" for i in ids)
    if form == "Date":
        return " " + mime_write_date(value)
    urls = _as_list(value)
    if not all(isinstance(u, str) and re.fullmatch(r"[^\s<>]+", u) for u in urls):
        raise ValueError("URLs without spaces or <>")
    return " " + ", ".join(f"<{u}>" for u in urls)


def _as_list(value) -> list:
    if not isinstance(value, list):
        raise ValueError("an array")
    return value


def mime_write_text(text: str) -> str:
    """Unstructured text (RFC 5322 §3.2.5), as RFC 2047 words when not plain ASCII."""
    plain = re.fullmatch(r"[\x20-\x7e\t]*", text) and "=?" not in text and not re.search(
        r"\S{900}", text) and "\r" not in text and "\n" not in text
    return text if plain else mime_encoded_words(text)


def mime_encoded_words(text: str) -> str:
    """RFC 2047 B-encoded UTF-8 words of whole characters, each within 75 octets."""
    words, current = [], ""
    for char in text:
        if len((current + char).encode("utf-8")) > ENCODED_WORD_OCTETS:
            words.append(current)
            current = ""
        current += char
    words.append(current)
    return " ".join("=?UTF-8?B?" + base64.b64encode(w.encode("utf-8")).decode("ascii") + "?="
                    for w in words)


def mime_write_phrase(name: str) -> str:
    """A display name: atoms as they are, else a quoted string, else RFC 2047 words."""
    if ATEXT_PHRASE_RE.fullmatch(name):
        return name
    if re.fullmatch(r"[\x20-\x7e]*", name) and "=?" not in name:
        return '"' + re.sub(r'(["\\])', r"\\\1", name) + '"'
    return mime_encoded_words(name)


def mime_write_address(address) -> str:
    if not isinstance(address, dict) or set(address) - {"name", "email"}:
        raise ValueError("an EmailAddress is {name, email}")
    name, email = address.get("name"), address.get("email")
    if not isinstance(email, str) or re.search(r"[\s<>,;\x00-\x1f]", email) or not isinstance(
            name, (str, type(None))):
        raise ValueError("an EmailAddress needs a valid email")
    return f"{mime_write_phrase(name)} <{email}>" if name else email


def mime_write_group(group) -> str:
    if not isinstance(group, dict) or set(group) - {"name", "addresses"}:
        raise ValueError("an EmailAddressGroup is {name, addresses}")
    members = ", ".join(mime_write_address(a) for a in _as_list(group.get("addresses")))
    if group.get("name") is None:
        return members
    if not isinstance(group["name"], str):
        raise ValueError("a group name is a String")
    phrase = mime_write_phrase(group["name"])
    space = " " if phrase.endswith("?=") else ""  # RFC 2047 §5(3): a word, then white space
    return f"{phrase}{space}: {members};"


def mime_write_date(value) -> str:
    """A JMAP Date (RFC 3339 with offset) as an RFC 5322 date-time keeping the offset."""
    if not isinstance(value, str) or not re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        raise ValueError("a Date such as 2026-11-26T10:00:00+01:00")
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    offset = int(moment.utcoffset().total_seconds()) // 60
    sign = "-" if offset < 0 else "+"
    return moment.strftime("%a, %d %b %Y %H:%M:%S ") + f"{sign}{abs(offset) // 60:02d}" \
        f"{abs(offset) % 60:02d}"


def mime_date_field(ts: float) -> str:
    """An RFC 5322 date-time in UTC for a Date field we write."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")


def mime_new_message_id(address: str) -> str:
    """A fresh msg-id (RFC 5322 §3.6.4) in the domain of an address of ours."""
    return f"<{secrets.token_hex(16)}@{address.rpartition('@')[2] or 'jmapd.invalid'}>"


def mime_crlf(data: bytes) -> bytes:
    """Every line end CRLF (RFC 5322 §2.3, RFC 5321 §2.3.8)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def mime_text_part(ctype: str, text: str) -> MimeOut:
    """A UTF-8 text part with the smallest transfer encoding that fits."""
    part = MimeOut(ctype, [("charset", "utf-8")])
    part.body, part.cte = mime_encode_text(text)
    return part


# ---- bodies ----


def mime_write_body(draft: EmailDraft, obj: dict, top_names: dict) -> MimeOut:
    """The root part: bodyStructure as given, else built from textBody/htmlBody/attachments."""
    if "bodyStructure" in obj:
        for name in ("textBody", "htmlBody", "attachments"):
            if name in obj:
                draft.fail(name, "not with bodyStructure")
        return mime_write_part(draft, obj["bodyStructure"], "bodyStructure", "text/plain",
                               top_names)
    text = _single_body(draft, obj, "textBody", "text/plain")
    html = _single_body(draft, obj, "htmlBody", "text/html")
    attachments = obj.get("attachments") or []
    if not isinstance(attachments, list):
        draft.fail("attachments", "an array of EmailBodyPart")
        attachments = []
    inline, mixed = [], []
    for i, part in enumerate(attachments):
        out = mime_write_part(draft, part, f"attachments/{i}", "application/octet-stream", {})
        related = isinstance(part, dict) and part.get("cid") and part.get("disposition") == "inline"
        (inline if related and html else mixed).append(out)
    if html and inline:  # inline images travel with the HTML (RFC 2387)
        html = MimeOut("multipart/related", children=[html, *inline])
    body = MimeOut("multipart/alternative", children=[text, html]) if text and html else (
        text or html or (None if mixed else mime_text_part("text/plain", "")))
    if mixed:
        return MimeOut("multipart/mixed", children=([body] if body else []) + mixed)
    return body


def _single_body(draft: EmailDraft, obj: dict, prop: str, wanted: str) -> MimeOut | None:
    parts = obj.get(prop)
    if parts is None:
        return None
    if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict):
        draft.fail(prop, f"exactly one {wanted} part")
        return None
    if parts[0].get("type", wanted) != wanted:  # RFC 8621 §4.6
        draft.fail(prop, f"must be {wanted}")
        return None
    return mime_write_part(draft, parts[0], f"{prop}/0", wanted, {})


def mime_write_part(draft: EmailDraft, obj, where: str, default_type: str,
                    top_names: dict) -> MimeOut:
    """One EmailBodyPart for creation (RFC 8621 §4.6), its children first."""
    draft.parts += 1
    if not isinstance(obj, dict) or draft.parts > MAX_EMAIL_CREATE_PARTS:
        draft.fail(where, "an EmailBodyPart object" if draft.parts <= MAX_EMAIL_CREATE_PARTS
                   else "too many parts")
        return MimeOut("text/plain")
    for name in obj:
        if name not in PART_CREATE_PROPS and not name.startswith("header:"):
            draft.fail(f"{where}/{name}", "not an EmailBodyPart property for creation")
    fields, names = mime_write_fields(draft, obj, where + "/", top=False)
    for name in names:
        if name in top_names:
            draft.fail(where, f"{name} is also given on the Email")
    for prop, header in PART_HEADER_OF.items():
        if prop in obj and header in names:
            draft.fail(f"{where}/{prop}", f"also given as a {header} header property")
    ctype = obj.get("type") or default_type
    if not isinstance(ctype, str) or not MIME_TYPE_RE.match(ctype.lower()):
        draft.fail(f"{where}/type", "a media type such as text/plain")
        ctype = default_type
    out = MimeOut(ctype.lower())
    if out.ctype.startswith("multipart/"):
        _write_multipart(draft, obj, where, out)
    else:
        _write_leaf(draft, obj, where, out)
    _write_part_fields(draft, obj, where, out)
    out.fields += fields
    return out


def _write_multipart(draft: EmailDraft, obj: dict, where: str, out: MimeOut) -> None:
    for name in ("partId", "blobId", "charset"):
        if name in obj:
            draft.fail(f"{where}/{name}", "not on a multipart")
    sub_parts = obj.get("subParts")
    if not isinstance(sub_parts, list):
        draft.fail(f"{where}/subParts", "a multipart needs subParts")
        return
    out.children = [mime_write_part(draft, sub, f"{where}/subParts/{i}", "text/plain", {})
                    for i, sub in enumerate(sub_parts)]


def _write_leaf(draft: EmailDraft, obj: dict, where: str, out: MimeOut) -> None:
    part_id, blob = obj.get("partId"), obj.get("blobId")
    if obj.get("subParts") is not None:
        draft.fail(f"{where}/subParts", "only a multipart has subParts")
    if (part_id is None) == (blob is None):
        draft.fail(where, "give a partId or a blobId, not both")
        return
    if part_id is not None:
        if "charset" in obj:
            draft.fail(f"{where}/charset", "omitted with a partId")
        value = draft.body_values.get(part_id) if isinstance(part_id, str) else None
        if part_id in draft.bad_values:
            return  # its bodyValues entry is the property at fault
        if value is None:
            draft.fail(f"{where}/partId", "not in bodyValues")
            return
        out.body, out.cte = mime_encode_text(value["value"])
        out.params.append(("charset", "utf-8"))
        return
    data = blob_read(draft.ctx, blob) if isinstance(blob, str) else None
    if data is None:
        draft.not_found.append(blob)
        return
    draft.blob_octets += len(data)
    charset = obj.get("charset")
    if charset is not None:
        if not isinstance(charset, str) or not re.fullmatch(r"[A-Za-z0-9_.:+-]{1,64}", charset):
            draft.fail(f"{where}/charset", "a charset name")
        elif out.ctype.startswith("text/"):
            out.params.append(("charset", charset))
    out.body, out.cte = mime_encode_blob(out.ctype, data)


def _write_part_fields(draft: EmailDraft, obj: dict, where: str, out: MimeOut) -> None:
    """name, disposition, cid, language and location as Content-* fields."""
    name, disposition = obj.get("name"), obj.get("disposition")
    checks = {"name": (str,), "disposition": (str,), "cid": (str,), "location": (str,),
              "language": (list,)}
    for prop, kinds in checks.items():
        if obj.get(prop) is not None and not isinstance(obj[prop], kinds):
            draft.fail(f"{where}/{prop}", "wrong type")
            return
    if name is not None:
        out.params.append(("name", name))
    if disposition is not None:
        if not re.fullmatch(r"[A-Za-z0-9!#$&^_.+-]+", disposition):
            draft.fail(f"{where}/disposition", "a disposition token")
            return
        value = " " + disposition.lower() + (
            "" if name is None else "; " + mime_write_param("filename", name))
        out.fields.append(("Content-Disposition", value))
    if obj.get("cid") is not None:
        if not re.fullmatch(r"[^\s<>()\x00-\x1f]+", obj["cid"]):
            draft.fail(f"{where}/cid", "a content id without <>")
            return
        out.fields.append(("Content-ID", f" <{obj['cid']}>"))
    if obj.get("language") is not None:
        tags = obj["language"]
        if not tags or not all(isinstance(t, str) and re.fullmatch(r"[A-Za-z0-9-]{1,35}", t)
                               for t in tags):
            draft.fail(f"{where}/language", "language tags")
            return
        out.fields.append(("Content-Language", " " + ", ".join(tags)))
    if obj.get("location") is not None:
        if not re.fullmatch(r"[^\s<>\"]+", obj["location"]):
            draft.fail(f"{where}/location", "a URI")
            return
        out.fields.append(("Content-Location", " " + obj["location"]))


def mime_write_param(name: str, value: str) -> str:
    """A parameter: a token, a quoted string, or RFC 2231 UTF-8 percent-encoding in pieces."""
    if re.fullmatch(r"[A-Za-z0-9!#$&^_.+-]{1,40}", value):
        return f"{name}={value}"
    if re.fullmatch(r"[\x20-\x7e]{0,40}", value) and "=?" not in value:  # not a 2047 lookalike
        return f'{name}="' + re.sub(r'(["\\])', r"\\\1", value) + '"'
    encoded = urllib.parse.quote(value, safe="!#$&+-.^_`|~")
    pieces = _rejoin_escapes(encoded)
    if len(pieces) == 1:
        return f"{name}*=utf-8''{encoded}"
    return "; ".join(f"{name}*{i}*=" + ("utf-8''" if i == 0 else "") + piece
                     for i, piece in enumerate(pieces))


def _rejoin_escapes(encoded: str) -> list:
    """Cut percent-encoded text in pieces of about 40 without splitting a %XX escape."""
    pieces, current = [], ""
    for token in re.findall(r"%[0-9A-F]{2}|.", encoded):
        if len(current) + len(token) > 40:
            pieces.append(current)
            current = ""
        current += token
    return pieces + [current]


def mime_encode_text(text: str) -> tuple[bytes, str]:
    """A text body value as CRLF lines: 7bit if it can be, else quoted-printable or base64."""
    data = mime_crlf(text.encode("utf-8"))
    if mime_is_7bit(data) and not re.search(rb"[^\r\n]{79}", data):  # RFC 5322 §2.1.1: 78
        return data, "7bit"
    high = sum(1 for byte in data if byte > 0x7e)
    if high * 3 > len(data):  # mostly non-ASCII (e.g. CJK): base64 is shorter
        return mime_base64(data), "base64"
    # b2a_qp breaks soft lines with a bare LF unless the text had a CRLF first
    return mime_crlf(binascii.b2a_qp(data, istext=True)), "quoted-printable"


def mime_encode_blob(ctype: str, data: bytes) -> tuple[bytes, str]:
    """Blob content: 7bit when it is clean; messages stay readable (RFC 2046 §5.2.1)."""
    if ctype.startswith("message/"):  # never base64 (RFC 2046 §5.2.1): CRLF lines instead
        data = mime_crlf(data)
        if mime_is_7bit(data):
            return data, "7bit"
        return data, "8bit" if b"\0" not in data and not re.search(
            rb"[^\r\n]{999}", data) else "binary"
    if mime_is_7bit(data):
        return data, "7bit"
    return mime_base64(data), "base64"


def mime_is_7bit(data: bytes) -> bool:
    """ASCII without NUL, CRLF line ends only, lines within 998 octets (RFC 5322 §2.1.1)."""
    return not re.search(rb"[\x00\x80-\xff]|\r(?!\n)|(?<!\r)\n|[^\r\n]{999}", data)


def mime_base64(data: bytes) -> bytes:
    text = base64.b64encode(data)
    return b"".join(text[i:i + 76] + b"\r\n" for i in range(0, len(text), 76))


# ---- rendering ----


def mime_render(part: MimeOut, top_fields: list = ()) -> bytes:
    """Write a part (the whole message when top_fields are given) as CRLF octets."""
    params = list(part.params)
    body = part.body
    if part.children:
        rendered = [mime_render(child) for child in part.children]
        boundary = mime_boundary(rendered)
        params.append(("boundary", boundary))
        mark = b"--" + boundary.encode("ascii")
        body = b"".join(mark + b"\r\n" + child + b"\r\n" for child in rendered) + mark + b"--\r\n"
    content_type = " " + "; ".join([part.ctype] + [mime_write_param(n, v) for n, v in params])
    fields = list(top_fields) + [("Content-Type", content_type)]
    if part.cte:
        fields.append(("Content-Transfer-Encoding", " " + part.cte))
    fields += part.fields
    head = "".join(mime_fold(name, value) for name, value in fields)
    return head.encode("utf-8") + b"\r\n" + body


def mime_boundary(rendered: list) -> str:
    """A boundary found in none of the parts (RFC 2046 §5.1.1)."""
    while True:
        boundary = "=_" + secrets.token_hex(12)
        if not any(boundary.encode("ascii") in child for child in rendered):
            return boundary


def mime_fold(name: str, value: str) -> str:
    """One header field, folded before whitespace so lines stay within 78 octets
    where they can; never a line of whitespace only (RFC 5322 §2.2.3, §3.2.2)."""
    if "\r\n" in value:  # a raw value the client folded itself
        return f"{name}:{value}\r\n"
    pieces = re.split(r"(?=[ \t])", f"{name}:{value}")
    lines, current = [], pieces[0]
    for piece in pieces[1:]:
        if len((current + piece).encode("utf-8")) > FOLD_AT and current.strip() and (
                lines or current != pieces[0]):  # never leave the name alone on its line
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    return "\r\n".join(lines) + "\r\n"


# =============================================================================
# 8 DELIVERY AND SUBMISSION
# =============================================================================

# =============================================================================
# 8.1 DELIVER_MESSAGE
#     The one way mail enters an account: blobs written durably first, then the
#     rows in one transaction, committed before the caller acknowledges anything.
#     A batch shares one commit (bulk import); a single message is its own.
# =============================================================================


def deliver_message(data_dir: str, account_pk: int, raws: list[bytes], mailbox_pks: list,
                    keywords: dict | list, now: float, received: list | None = None,
                    incoming: bool = False) -> list[Email]:
    """Store messages in an account's Mailboxes and commit; return the new Emails.

    `keywords` is one set for all or a list with one per message; `received` optionally
    gives each message's receivedAt (else its Received header or now). New mail from
    an MTA (`incoming`) may get the vacation reply and may be a delivery report for
    mail we sent; imported mail is neither. Everything slow happens before the write
    transaction: parsing, the blob files, the vacation reply's own blob.
    """
    facts = [email_analyse(raw, inline=True) for raw in raws]
    blob_store_many(data_dir, blob_files_needed(raws, facts))  # durable before any row
    plans = [delivery_plan(data_dir, account_pk, f, now) if incoming else None for f in facts]
    per_message = keywords if isinstance(keywords, list) else [keywords] * len(raws)
    received = received or [None] * len(raws)
    changes = ChangeLog(account_pk, now)
    with db.atomic("IMMEDIATE"):
        rows = [deliver_stored(changes, f, mailbox_pks, flags, at, now, plan)
                for f, flags, at, plan in zip(facts, per_message, received, plans)]
        changes.flush()
    return rows


@dataclass
class DeliveryPlan:
    """What the delivery-time rules decided for one message to one account, in the
    analyse phase (outside any transaction). Today the vacation reply; Sieve, iMIP and
    S/MIME status at delivery add theirs here, and deliver_stored() carries them out."""

    vacation: Any = None  # a VacationPlan, or None


def delivery_plan(data_dir: str, account_pk: int, facts: MessageFacts,
                  now: float) -> DeliveryPlan:
    """Run the rules new mail meets (RFC 8621 §8 vacation, …) for one recipient account:
    the one place every way in (LMTP, deliver, later the upstream puller) passes."""
    return DeliveryPlan(vacation=vacation_plan(data_dir, account_pk, facts, now))


def deliver_stored(changes: ChangeLog, facts: MessageFacts, mailbox_pks: list, keywords: dict,
                   received_at, now: float, plan: DeliveryPlan | None = None) -> Email:
    """One analysed message whose blob is durable becomes an Email in the caller's
    transaction, and what its delivery plan decided is carried out (new mail only:
    `plan` None is imported mail, which meets no delivery rules, RFC 9661 §1)."""
    row = email_store(changes, changes.account_pk, facts, mailbox_pks, keywords,
                      received_at, now)
    if plan is not None:
        if plan.vacation is not None:
            vacation_queue(changes.account_pk, plan.vacation, now)
        if facts.report is not None:  # a report on mail we sent (RFC 8621 §7)
            submission_apply_report(changes, changes.account_pk, facts.report, facts.sha)
    return row


@dataclass
class Delivery:
    """One message for one account, analysed and planned, waiting for its commit."""

    account_pk: int
    raw: bytes
    facts: MessageFacts
    mailbox_pk: int
    plan: DeliveryPlan


# ---- group commit: concurrent deliveries share one commit ----


class GroupCommit:
    """Deliveries arriving while one commits wait and then commit together: their blobs
    made durable with one sync, their rows in one transaction (a savepoint each, so
    one bad message fails alone). Nobody returns before the commit that holds its
    message; the first waiter commits for all (leader and followers)."""

    def __init__(self, data_dir: str, clock):
        self.data_dir, self.clock = data_dir, clock
        self.cond = threading.Condition()
        self.queue: list = []
        self.committing = False

    def deliver(self, items: list) -> list:
        """Store Delivery items; return per item None or the error."""
        slots = [{"item": item, "done": False, "error": None} for item in items]
        with self.cond:
            self.queue.extend(slots)
            while not all(slot["done"] for slot in slots):
                if self.committing:
                    self.cond.wait()
                    continue
                batch, self.queue, self.committing = self.queue, [], True
                self.cond.release()
                try:
                    self._commit(batch)
                except BaseException as exc:  # nothing unacknowledged is reported stored
                    for slot in batch:
                        slot["error"] = slot["error"] or exc
                    raise
                finally:
                    self.cond.acquire()
                    self.committing = False
                    for slot in batch:
                        slot["done"] = True
                    self.cond.notify_all()
        return [slot["error"] for slot in slots]

    def _commit(self, batch: list) -> None:
        try:
            items = [slot["item"] for slot in batch]
            blob_store_many(self.data_dir, blob_files_needed([i.raw for i in items],
                                                             [i.facts for i in items]))
        except OSError as exc:
            for slot in batch:
                slot["error"] = exc
            return
        now = self.clock.now()
        changes: dict = {}
        try:
            with db.atomic("IMMEDIATE"):
                for slot in batch:
                    self._store(slot, changes, now, alone=len(batch) == 1)
                for log_ in changes.values():
                    log_.flush()
        except Exception as exc:  # noqa: BLE001 -- nothing is acknowledged unless committed
            if not isinstance(exc, (peewee.OperationalError, OSError)):
                log.exception("group commit failed")
            for slot in batch:
                slot["error"] = slot["error"] or exc

    @staticmethod
    def _store(slot: dict, changes: dict, now: float, alone: bool = False) -> None:
        """One delivery in its own savepoint of the group's transaction (`alone`: the
        group holds only it, so the transaction is its savepoint)."""
        item = slot["item"]
        log_ = changes.setdefault(item.account_pk, ChangeLog(item.account_pk, now))
        mark = log_.mark()
        try:
            with contextlib.nullcontext() if alone else db.atomic():
                deliver_stored(log_, item.facts, [item.mailbox_pk], {}, None, now, item.plan)
        except peewee.OperationalError:
            raise  # busy or broken database: nothing of the group commits
        except Exception as exc:  # noqa: BLE001 -- this message fails alone
            if alone:
                raise  # no savepoint: the whole transaction is rolled back instead
            log_.rollback(mark)  # its rows are gone: so are its change-log entries
            log.exception("delivery to account %d failed", item.account_pk)
            slot["error"] = exc


# ---- vacation replies (RFC 8621 §8, RFC 5230, RFC 3834) ----

VACATION_DAYS = 7  # RFC 5230 §4.1: one reply per sender per 7 days
VACATION_DEFAULT_TEXT = "I am away at the moment and will read your message when I return."
LIST_HEADERS = ("list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post",
                "list-owner", "list-archive")
ROBOT_SENDER_RE = re.compile(  # RFC 5230 §4.6 and RFC 3834 §2: never answer these
    r"^(mailer-daemon|postmaster|listserv|majordomo|owner-.*|.*-request|.*-owner|"
    r"no-?reply|do-?not-?reply|bounces?(\+.*)?)@", re.IGNORECASE)


@dataclass
class VacationPlan:
    """A vacation reply decided and written before the delivery's transaction; the
    transaction queues it if the setting is unchanged and the sender not answered lately."""

    sender: str
    sha: str
    size: int
    setting_modseq: int  # the VacationResponse's updated_modseq the reply was made from


def vacation_plan(data_dir: str, account_pk: int, facts: MessageFacts,
                  now: float) -> VacationPlan | None:
    """The vacation reply a newly delivered message deserves, if any, its blob already
    durable: everything but the queueing happens outside the write transaction."""
    enabled = db.execute_sql("SELECT pk FROM vacation_response WHERE account_pk = ? AND "
                             "is_enabled AND destroyed = 0", (account_pk,)).fetchone()
    if enabled is None:  # the usual case, answered without building a query
        return None
    vacation = VacationResponse.get_or_none(VacationResponse.pk == enabled[0])
    if vacation is None or not vacation_active(vacation, now):
        return None
    sender = vacation_sender(facts.headers)
    try:
        if sender is not None:
            mime_write_address({"name": None, "email": sender})  # one we can write back to
    except ValueError:
        sender = None
    why = vacation_refusal(facts.headers, sender, account_addresses(account_pk))
    if why:
        log.getChild("vacation").info("no vacation reply: %s", why)
        return None
    if vacation_answered_lately(account_pk, sender, now):
        return None  # checked again when queueing; here it saves writing a reply
    identity = Identity.select().where((Identity.account_pk == account_pk)
                                       & (Identity.destroyed == False)  # noqa: E712
                                       ).order_by(Identity.may_delete, Identity.pk).first()
    try:
        reply = vacation_reply(vacation, facts.headers, identity, sender, now)
    except (ValueError, TypeError, LookupError) as exc:  # a reply never costs the mail
        log.getChild("vacation").warning("no vacation reply to %s: %s", sender, exc)
        return None
    sha, size = blob_store_bytes(data_dir, reply)
    return VacationPlan(sender, sha, size, vacation.updated_modseq)


def vacation_answered_lately(account_pk: int, sender: str, now: float) -> bool:
    last = VacationSent.get_or_none((VacationSent.account_pk == account_pk)
                                    & (VacationSent.sender == sender.lower()))
    return last is not None and now - last.sent_at < VACATION_DAYS * 86400


def vacation_queue(account_pk: int, plan: VacationPlan, now: float) -> None:
    """Queue a planned reply in the delivery's transaction, so it is durable exactly when
    the mail is: unless the setting changed meanwhile or the sender had one lately."""
    current = db.execute_sql("SELECT updated_modseq FROM vacation_response WHERE account_pk = ? "
                             "AND is_enabled AND destroyed = 0", (account_pk,)).fetchone()
    if current is None or current[0] != plan.setting_modseq:
        return  # turned off or rewritten since the reply was made
    if vacation_answered_lately(account_pk, plan.sender, now):
        return  # RFC 3834 §2: not again to the same sender within the period
    VacationSent.insert(account_pk=account_pk, sender=plan.sender.lower(),
                        sent_at=int(now)).on_conflict_replace().execute()
    blob_add_ref(account_pk, plan.sha, plan.size, "outbox", now)
    Outbox.create(account_pk=account_pk, sha256=plan.sha, mail_from="",  # RFC 5230 §5.1: <>
                  rcpts=json_dumps([[plan.sender, {"NOTIFY": "NEVER"}]]),
                  next_attempt_at=int(now), created_at=int(now))
    log.getChild("vacation").info("vacation reply to %s queued", plan.sender)


def vacation_sender(headers: list) -> str | None:
    """The envelope sender the MTA recorded in Return-Path; None for <> (a bounce).

    The topmost Return-Path is the final delivery's (RFC 5321 §4.4); older ones the
    message carried from elsewhere say nothing about this envelope."""
    value = next((v for n, v in headers if n.lower() == "return-path"), None)
    if value is None:
        return None
    found = re.search(r"<([^<>\s]*)>", value) or re.search(r"(\S+@\S+)", value)
    address = found.group(1) if found else ""
    return address if SEND_ADDRESS_RE.match(address) else None


def vacation_refusal(headers: list, sender: str | None, owned: set) -> str | None:
    """Why this message must get no automatic reply (RFC 3834 §2, RFC 5230 §4.5), or None."""
    def header(name):
        return next((v for n, v in reversed(headers) if n.lower() == name), None)

    if sender is None:
        return "no envelope sender (a bounce, or no Return-Path)"
    auto = header("auto-submitted")
    if auto is not None and mime_strip_comments(_unfold(auto)).strip().lower() != "no":
        return "Auto-Submitted"
    precedence = (header("precedence") or "").strip().lower()
    if precedence in ("bulk", "list", "junk"):
        return f"Precedence: {precedence}"
    if any(header(name) is not None for name in LIST_HEADERS):
        return "a mailing list message"
    suppress = (header("x-auto-response-suppress") or "").lower()
    if "oof" in suppress or "all" in suppress:
        return "X-Auto-Response-Suppress"
    if ROBOT_SENDER_RE.match(sender):
        return f"{sender} is an automated sender"
    if sender.lower() in owned:
        return "mail from the account itself"
    named = set()
    for name in ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"):
        for value in (v for n, v in headers if n.lower() == name):
            for address in mime_header_value(value, "Addresses"):
                local, _, domain = (address["email"] or "").lower().rpartition("@")
                named.add(f"{local.split('+')[0]}@{domain}")
    if not named & owned:
        return "the account's address is not among the recipients"
    return None


def vacation_reply(vacation: VacationResponse, headers: list, identity: Identity,
                   sender: str, now: float) -> bytes:
    """The reply (RFC 3834 §3, RFC 5230 §5): Auto-Submitted, threaded to the original."""
    subject = vacation.subject
    if subject is None:
        original = mime_header_property(headers, "header:Subject:asText")
        subject = f"Auto: {original}" if original else "Automated reply"
    text, html = vacation.text_body, vacation.html_body
    if text is None:
        text = mime_html_to_text(html) if html is not None else VACATION_DEFAULT_TEXT
    body = mime_text_part("text/plain", text)
    if html is not None:
        body = MimeOut("multipart/alternative", children=[body, mime_text_part("text/html", html)])
    own = {"name": identity.name or None, "email": identity.email}
    fields = [("From", mime_write_value("Addresses", [own])),
              ("To", mime_write_value("Addresses", [{"name": None, "email": sender}])),
              ("Subject", mime_write_value("Text", subject)),
              ("Date", " " + mime_date_field(now)),
              ("Message-ID", " " + mime_new_message_id(identity.email)),
              ("Auto-Submitted", " auto-replied")]
    message_ids = mime_header_property(headers, "header:Message-ID:asMessageIds") or []
    if message_ids:
        references = mime_header_property(headers, "header:References:asMessageIds") or (
            mime_header_property(headers, "header:In-Reply-To:asMessageIds") or [])[:1]
        # RFC 5322 §3.6.4: the parent's References, else its In-Reply-To, then its id
        fields.append(("In-Reply-To", mime_write_value("MessageIds", message_ids[:1])))
        fields.append(("References", mime_write_value("MessageIds", references + message_ids[:1])))
    fields.append(("MIME-Version", " 1.0"))
    return mime_render(body, fields)


# ---- import: mbox, Maildir, directories of .eml ----

MAILDIR_FLAGS = {"S": "$seen", "R": "$answered", "F": "$flagged", "D": "$draft"}
IMPORT_BATCH = 500


def import_sources(path: str, opened=None):
    """Yield (raw message, keywords, receivedAt or None) from an mbox, Maildir or .eml
    folder, or from a file (or standard input) holding an mbox or one message."""
    if opened is not None:
        yield from import_file(path, opened)
        return
    try:
        yield from _import_folder(path)
    except PermissionError as exc:  # e.g. a 0700 Maildir, after root became the owner
        raise CommandError(f"{exc.filename or path}: permission denied for {_user_name()}; "
                           "make it readable to that user, or give an mbox on standard "
                           "input: jmapd.py import … - < FILE") from None


def _import_folder(path: str):
    if os.path.isdir(os.path.join(path, "cur")) or os.path.isdir(os.path.join(path, "new")):
        for sub in ("new", "cur"):
            folder = os.path.join(path, sub)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                info = name.rsplit(":2,", 1)[1] if ":2," in name else ""
                flags = {MAILDIR_FLAGS[c]: True for c in info if c in MAILDIR_FLAGS}
                full = os.path.join(folder, name)
                with open(full, "rb") as f:
                    yield f.read(), flags, os.stat(full).st_mtime
        return
    try:
        names = sorted(os.listdir(path))
    except PermissionError:
        raise
    except OSError as exc:
        raise CommandError(f"{path}: {exc.strerror}") from None
    for name in names:
        if name.endswith(".eml"):
            with open(os.path.join(path, name), "rb") as f:
                yield f.read(), {}, None


def _user_name() -> str:
    import pwd  # lazy: only error messages need it

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def import_file(path: str, source):
    """An mbox (it begins with a From_ line) or a single message, from an open file."""
    first = source.readline()
    if first.startswith(b"From "):
        yield from import_mbox(itertools.chain([first], source))
    elif mime_looks_like_message(first):
        yield first + source.read(), {}, None
    elif first:
        raise CommandError(f"{path} is neither an mbox (its first line is no 'From ' line) "
                           "nor a message (it does not begin with a header field)")


def import_mbox(lines_in):
    """Split an mbox at its From_ lines (mboxrd: one '>' less before From)."""
    from email.utils import parsedate_to_datetime  # lazy: import only

    def finish(lines, when):
        if lines and lines[-1].strip() == b"":
            lines = lines[:-1]  # the empty line before the next From_ is the separator's
        body = b"".join(re.sub(rb"^>(>*From )", rb"\1", line) if line[:1] == b">" else line
                        for line in lines)
        return body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), {}, when

    lines, when = None, None
    for line in lines_in:
        if line.startswith(b"From "):
            if lines is not None:
                yield finish(lines, when)
            lines, when = [], None
            parts = line.decode("ascii", "replace").split(None, 2)
            try:
                when = parsedate_to_datetime(parts[2].strip()).timestamp() \
                    if len(parts) > 2 else None
            except (TypeError, ValueError, IndexError, OverflowError):
                when = None
            continue
        if lines is not None:
            lines.append(line)
    if lines is not None:
        yield finish(lines, when)


def deliver_recipient(address: str) -> tuple[Account, str | None] | None:
    """The account an address delivers to (its username or an alias) and its +detail."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at:
        return None
    base, _, detail = local.partition("+")
    for candidate in dict.fromkeys([f"{local}@{domain}", f"{base}@{domain}"]):
        found = db.execute_sql(  # plain SQL: every recipient of every delivery asks
            "SELECT pk, username FROM account WHERE username = ? UNION ALL "
            "SELECT a.pk, a.username FROM alias JOIN account a ON a.pk = alias.account_pk "
            "WHERE alias.address = ? LIMIT 1", (candidate, candidate)).fetchone()
        if found is not None:
            account = Account(pk=found[0], username=found[1])
            return account, (detail or None) if candidate != f"{local}@{domain}" else None
    return None


def deliver_mailbox(account_pk: int, wanted: str | None, exact: bool = False) -> int:
    """The Mailbox mail goes to: a role or a name if one matches, else the Inbox.

    A sender's +detail never creates a Mailbox; an unknown one files into the Inbox.
    With `exact` (the owner's --mailbox), an unknown name is a mistake, not the Inbox.
    """
    rows = db.execute_sql("SELECT pk, name, role FROM mailbox WHERE account_pk = ? AND "
                          "destroyed = 0 ORDER BY pk", (account_pk,)).fetchall()
    if wanted:
        for pk, _, role in rows:
            if role == wanted.lower():
                return pk
        for pk, name, _ in rows:
            if name.casefold() == wanted.casefold():
                return pk
        if exact:
            raise DeliveryTemporaryError(f"there is no Mailbox (or role) {wanted!r}")
    for pk, _, role in rows:
        if role == "inbox":
            return pk
    raise DeliveryTemporaryError("the account has no Inbox")


class DeliveryTemporaryError(Exception):
    """Delivery cannot happen now but may later (disk nearly full, database busy)."""


DISK_RESERVE_BYTES = 64 * 2**20  # refuse new mail before the disk is full, not half-way


def deliver_check_space(data_dir: str, size: int) -> None:
    """Refuse mail that would leave less than the reserve free (a temporary failure)."""
    import shutil  # lazy: delivery only

    if shutil.disk_usage(data_dir).free < DISK_RESERVE_BYTES + 2 * size:
        raise DeliveryTemporaryError("the disk is nearly full")



# =============================================================================
# 8.2 LMTP
#     RFC 2033 inside `serve`: a thread per connection (an MTA opens few). Each
#     recipient is answered on its own after its message is committed (250), or
#     refused (550 unknown, 552 too big) or deferred (4xx) so the MTA retries.
# =============================================================================

LMTP_MAX_LINE = 64 * 1024
LMTP_TIMEOUT_S = 300
LMTP_MAX_RECIPIENTS = 100


class LmtpSession:
    """One LMTP conversation (RFC 2033) over a file-like socket pair."""

    def __init__(self, app, reader, writer, peer: str):
        self.app, self.reader, self.writer, self.peer = app, reader, writer, peer
        self.host = socket.gethostname()
        self.greeted = False
        self.reset()

    def reset(self) -> None:
        self.sender: str | None = None
        self.recipients: list = []

    def reply(self, text: str) -> None:
        self.writer.write(text.encode() + b"\r\n")
        self.writer.flush()

    def read_line(self) -> tuple[bytes | None, bool]:
        """One whole line (None at end of input) and whether it was too long.

        A long line is read to its end and cut, never split: a piece of it that looks
        like `.` must not end a message (RFC 5321 §4.5.3.1.6, smuggling).
        """
        line = self.reader.readline(LMTP_MAX_LINE + 1)
        if not line:
            return None, False
        if line.endswith(b"\n") or len(line) <= LMTP_MAX_LINE:
            return line, False
        while True:  # too long: the rest of the line is read and dropped
            more = self.reader.readline(LMTP_MAX_LINE + 1)
            if not more:
                return None, True
            if more.endswith(b"\n"):
                return line[:LMTP_MAX_LINE] + b"\r\n", True

    def run(self) -> None:
        self.reply(f"220 {self.host} LMTP jmapd ready")
        while True:
            line, too_long = self.read_line()
            if line is None:
                return
            if too_long:
                self.reply("500 5.5.2 line too long")
                continue
            command = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
            if b"\r" in command or b"\n" in command or b"\0" in command:
                self.reply("501 5.5.2 CR, LF and NUL have no place in a command")
                continue  # else a bare CR would reach Return-Path (RFC 5321 §2.3.8)
            verb, _, rest = command.decode("utf-8", "replace").partition(" ")
            if verb.upper() == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            self.command(verb.upper(), rest.strip())

    def command(self, verb: str, rest: str) -> None:
        # long: one branch per LMTP verb, RFC 2033 §4 with RFC 5321 §4.1
        if verb == "LHLO":
            self.greeted = True
            self.reset()
            size = self.app.cfg.max_size_upload
            self.reply(f"250-{self.host}\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
                       f"250-8BITMIME\r\n250 SIZE {size}")
        elif verb in ("HELO", "EHLO"):
            self.reply("500 5.5.1 this is LMTP: say LHLO")
        elif verb == "MAIL":
            self.mail(rest)
        elif verb == "RCPT":
            self.rcpt(rest)
        elif verb == "DATA":
            self.data()
        elif verb == "RSET":
            self.reset()
            self.reply("250 2.0.0 OK")
        elif verb == "NOOP":
            self.reply("250 2.0.0 OK")
        elif verb == "VRFY":
            self.reply("252 2.5.0 cannot verify, but will try")
        else:
            self.reply("500 5.5.1 unknown command")

    def mail(self, rest: str) -> None:
        match = re.match(r"(?i)FROM:\s*<([^>]*)>(.*)$", rest)
        if not self.greeted:
            self.reply("503 5.5.1 LHLO first")
        elif self.sender is not None:
            self.reply("503 5.5.1 nested MAIL")
        elif not match:
            self.reply("501 5.5.4 syntax: MAIL FROM:<address>")
        else:
            params = dict(p.upper().partition("=")[::2] for p in match.group(2).split())
            if set(params) - {"SIZE", "BODY"} or params.get("BODY", "7BIT") not in (
                    "7BIT", "8BITMIME") or not params.get("SIZE", "0").isdigit():
                self.reply("555 5.5.4 parameter not recognised")  # RFC 5321 §4.1.1.11
                return
            if int(params.get("SIZE", "0")) > self.app.cfg.max_size_upload:
                self.reply("552 5.3.4 message too big")
                return
            self.sender = match.group(1)
            self.reply("250 2.1.0 OK")

    def rcpt(self, rest: str) -> None:
        match = re.match(r"(?i)TO:\s*<([^>]+)>(.*)$", rest)
        if self.sender is None:
            self.reply("503 5.5.1 MAIL first")
        elif not match:
            self.reply("501 5.5.4 syntax: RCPT TO:<address>")
        elif match.group(2).strip():
            self.reply("555 5.5.4 parameter not recognised")  # RFC 5321 §4.1.1.11
        elif len(self.recipients) >= LMTP_MAX_RECIPIENTS:
            self.reply("452 4.5.3 too many recipients")
        else:
            try:
                found = deliver_recipient(match.group(1))
            except peewee.OperationalError:
                self.reply("451 4.3.0 temporary trouble, try again")
                return
            if found is None:
                log.getChild("lmtp").warning("recipient %r refused (no such user) for %s",
                                             match.group(1), self.peer)
                self.reply("550 5.1.1 no such user here")
                return
            self.recipients.append((match.group(1), *found))
            self.reply("250 2.1.5 OK")

    def data(self) -> None:
        if not self.recipients:
            self.reply("503 5.5.1 no valid recipients")
            return
        self.reply("354 go ahead, end with <CRLF>.<CRLF>")
        raw, problem = self.read_message()
        if raw is None:
            raise ConnectionError("the connection ended inside DATA")  # RFC 5321 §4.1.1.10
        replies = [problem] * len(self.recipients) if problem else self.deliver_all(raw)
        for reply in replies:  # RFC 2033 §4.2: one reply per recipient, in order
            self.reply(reply)
        self.reset()

    def read_message(self) -> tuple[bytes | None, str | None]:
        """Read DATA up to CRLF.CRLF, undoing dot-stuffing (RFC 5321 §4.5.2).

        Return (message, None), (message, the reply that refuses it) or (None, None)
        when the connection ended first: then nothing is delivered.
        """
        lines, size, limit, problem = [], 0, self.app.cfg.max_size_upload, None
        after_crlf = True  # the DATA command's own line end
        readline = self.reader.readline
        while True:
            line = readline(LMTP_MAX_LINE + 1)  # the usual line: whole, in one C call
            too_long = False
            if not line.endswith(b"\n") and len(line) > LMTP_MAX_LINE:
                line, too_long = self._rest_of_long_line(line)
            if not line:
                return None, None
            if line[:1] == b".":
                if line == b".\r\n" and after_crlf:
                    break  # only CRLF.CRLF ends it (RFC 5321 §4.1.1.4): LF.CRLF does not
                if line not in (b".\r\n", b".\n"):
                    line = line[1:]  # RFC 5321 §4.5.2: only a period with more on its line
            after_crlf = line[-2:] == b"\r\n"
            if too_long:
                problem = "500 5.5.2 a line of the message is too long"
            size += len(line)
            if size <= limit:
                lines.append(line)
            else:
                problem = "552 5.3.4 message too big"
        return self.trace_headers() + b"".join(lines), problem

    def _rest_of_long_line(self, line: bytes) -> tuple[bytes, bool]:
        """A line longer than LMTP_MAX_LINE: read to its end, and cut (never split: a
        piece of it that looks like "." must not end the message)."""
        while True:
            more = self.reader.readline(LMTP_MAX_LINE + 1)
            if not more:
                return b"", True
            if more.endswith(b"\n"):
                return line[:LMTP_MAX_LINE] + b"\r\n", True

    def trace_headers(self) -> bytes:
        return (f"Return-Path: <{self.sender}>\r\nReceived: from {self.peer} by {self.host} "
                f"(jmapd) with LMTP; {mime_date_field(time.time())}\r\n").encode()

    def deliver_all(self, raw: bytes) -> list[str]:
        """Deliver to every recipient in one group commit; a reply for each."""
        replies, items, where = [], [], []
        facts = email_analyse(raw, inline=True)  # once for all recipients, outside any lock
        now = self.app.clock.now()
        for address, account, detail in self.recipients:
            try:
                deliver_check_space(self.app.cfg.data_dir, len(raw))
                plan = delivery_plan(self.app.cfg.data_dir, account.pk, facts, now)
                items.append(Delivery(account.pk, raw, facts,
                                      deliver_mailbox(account.pk, detail), plan))
                where.append(len(replies))
                replies.append(None)
            except DeliveryTemporaryError as exc:
                log.getChild("lmtp").warning("deferred mail for %r: %s", address, exc)
                replies.append(f"452 4.3.1 {exc}")
            except (peewee.OperationalError, OSError) as exc:
                log.getChild("lmtp").warning("deferred mail for %r: %s", address, exc)
                replies.append("451 4.3.0 temporary trouble, try again")
        for index, error in zip(where, self.app.delivery.deliver(items) if items else []):
            address, account, _ = self.recipients[index]
            if error is None:
                self.app.bus.notify(account.pk)
                log.getChild("lmtp").info("delivered %d octets to %s", len(raw),
                                          account.username)
                replies[index] = "250 2.1.5 delivered"
            else:
                log.getChild("lmtp").warning("deferred mail for %r: %s", address, error)
                replies[index] = "451 4.3.0 temporary trouble, try again"
        return replies


def lmtp_start(app, sockets: list) -> list:
    """Serve LMTP on already-bound sockets, one thread per connection; return the servers."""
    import socketserver  # lazy: serve with --lmtp only

    sessions = Allowance(app.cfg.max_lmtp_connections, app.cfg.max_lmtp_connections)

    class Handler(socketserver.StreamRequestHandler):
        timeout = LMTP_TIMEOUT_S

        def handle(self):
            peer = self.client_address[0] if isinstance(self.client_address, tuple) else "local"
            if not sessions.enter(None):
                log.getChild("lmtp").warning("connection from %s refused: %d open "
                                             "(--max-lmtp-connections)", peer, sessions.total)
                self.wfile.write(b"421 4.3.2 too many connections; try again later\r\n")
                return
            try:
                with sessions.held(None):
                    LmtpSession(app, self.rfile, self.wfile, str(peer)).run()
            except (OSError, socket.timeout, ConnectionError) as exc:
                log.getChild("lmtp").info("connection from %s ended: %s", peer, exc)

    return serve_threaded(sockets, Handler, "lmtp")


def serve_threaded(sockets: list, handler, name: str) -> list:
    """Serve already-bound sockets with a thread per connection; return the servers."""
    import socketserver  # lazy: only the LMTP and WebSocket listeners use it

    servers = []
    for sock in sockets:
        base = (socketserver.ThreadingUnixStreamServer if sock.family == socket.AF_UNIX
                else socketserver.ThreadingTCPServer)
        server = base(sock.getsockname(), handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock  # already bound and listening
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
        servers.append(server)
    return servers


# =============================================================================
# 8.3 SUBMISSION -- EmailSubmission (RFC 8621 §7) and the outbox
#     EmailSubmission/set checks the Email, the Identity and the envelope, stores
#     the octets to send (Bcc removed) and queues an Outbox row in the same
#     transaction. OutboxWorker sends due rows through --smtp-relay with smtplib,
#     records each recipient's reply, retries 4xx with back-off and holds
#     FUTURERELEASE messages (RFC 4865) until their time. Delivery is at least
#     once: a crash while sending sends that message again on restart.
# =============================================================================

MAIL_PARAMS = {"BODY", "SMTPUTF8", "ENVID", "RET", "SIZE", "HOLDFOR", "HOLDUNTIL"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}
PARAM_EXTENSION = {"BODY": "8bitmime", "SMTPUTF8": "smtputf8", "ENVID": "dsn", "RET": "dsn",
                   "SIZE": "size", "NOTIFY": "dsn", "ORCPT": "dsn"}
SEND_ADDRESS_RE = re.compile(r"^[^\s<>@]+@[^\s<>@.][^\s<>@]*\Z")
SMTP_TIMEOUT_S = 60
RETRY_MAX_S = 3600


def submission_capability(cfg) -> dict:
    """The submission capability: FUTURERELEASE only when there is a relay to send by."""
    if not cfg.smtp_relay:
        return {"maxDelayedSend": 0, "submissionExtensions": {}}
    return {"maxDelayedSend": cfg.max_delayed_send,
            "submissionExtensions": {"FUTURERELEASE": [str(cfg.max_delayed_send)]}}


register_capability(CAP_SUBMISSION, account=lambda app, read_only: submission_capability(
    app.cfg))  # RFC 8621 §1.3.2


def _ids_condition(column, type_name: str):
    def condition(ctx, value):
        pks = [type_pk(type_name, i) for i in a_ids(value)]
        return column.in_([pk for pk in pks if pk is not None])
    return condition


SUBMISSION_FILTERS = {  # RFC 8621 §7.3
    "identityIds": _ids_condition(EmailSubmission.identity_pk, "Identity"),
    "emailIds": _ids_condition(EmailSubmission.email_pk, "Email"),
    "threadIds": _ids_condition(EmailSubmission.thread_pk, "Thread"),
    "undoStatus": lambda ctx, v: EmailSubmission.undo_status == a_str(v),
    "before": lambda ctx, v: EmailSubmission.send_at < parse_utc_date(a_str(v)),
    "after": lambda ctx, v: EmailSubmission.send_at >= parse_utc_date(a_str(v)),
}
SUBMISSION_SORTS = {
    "emailId": (EmailSubmission.email_pk, False),
    "threadId": (EmailSubmission.thread_pk, False),
    "sentAt": (EmailSubmission.send_at, False),  # RFC 8621 §7.3 names the sort "sentAt"
    "sendAt": (EmailSubmission.send_at, False),
}


@register_type
class EmailSubmissionType(TypeSpec):
    """EmailSubmission (RFC 8621 §7): creating one sends the Email."""

    name, capability, model, id_prefix = "EmailSubmission", CAP_SUBMISSION, EmailSubmission, "S"
    filters, sorts = SUBMISSION_FILTERS, SUBMISSION_SORTS
    set_args = {"onSuccessUpdateEmail": (nullable(a_obj), None),
                "onSuccessDestroyEmail": (nullable(a_ids), None)}
    props = {
        "id": Prop("id", server_set=True, immutable=True),
        "identityId": Prop("id", "identity_pk", immutable=True, ref="Identity"),
        "emailId": Prop("id", "email_pk", immutable=True, ref="Email"),
        "threadId": Prop("id", "thread_pk", server_set=True, immutable=True, ref="Thread"),
        "envelope": Prop("object", "envelope", default=None, nullable=True, immutable=True,
                         json=True),
        "sendAt": Prop("utcdate", "send_at", server_set=True, immutable=True),
        "undoStatus": Prop("str", "undo_status", default="pending"),
        "deliveryStatus": Prop("object", "delivery_status", server_set=True, nullable=True,
                               json=True),
        "dsnBlobIds": Prop("list", "dsn_blob_ids", server_set=True, json=True),
        "mdnBlobIds": Prop("list", "mdn_blob_ids", server_set=True, json=True),
    }

    def prepare_set(self, ctx, args):
        """Read, parse and write out (Bcc removed) each Email to send, before the write
        transaction."""
        create = args.get("create")
        prepared = ctx.scratch.setdefault("submission", {})
        for raw_obj in (create.values() if isinstance(create, dict) else ()):
            email_id = raw_obj.get("emailId") if isinstance(raw_obj, dict) else None
            email = TYPES["Email"].load(ctx, email_id) if isinstance(email_id, str) else None
            if email is not None and email.size <= MAX_SIZE_SEND and email.pk not in prepared:
                prepared[email.pk] = submission_outgoing(ctx, email)

    def validate(self, ctx, values, row):
        if row is None:
            submission_prepare(ctx, values)
        elif values["undoStatus"] != row.undo_status:
            if values["undoStatus"] != "canceled" or row.undo_status != "pending":
                if values["undoStatus"] == "canceled":
                    raise SetError("cannotUnsend", "the message has already been sent")
                raise invalid_properties(["undoStatus"], "only pending -> canceled")
            queued = Outbox.select().where((Outbox.submission_pk == row.pk)
                                           & (Outbox.state == "queued")).exists()
            if not queued:
                raise SetError("cannotUnsend", "the message is being sent or was sent")

    def on_create(self, ctx, row, values):
        (sha, size), mail_from, mail_params, rcpts, message_id = ctx.scratch.pop("outgoing")
        blob_add_ref(ctx.account.pk, sha, size, "outbox", ctx.now, owner_pk=row.pk)
        EmailSubmission.update(message_id=message_id).where(
            EmailSubmission.pk == row.pk).execute()
        Outbox.create(account_pk=ctx.account.pk, submission_pk=row.pk, sha256=sha,
                      mail_from=mail_from, mail_params=json_dumps(mail_params),
                      rcpts=json_dumps(rcpts), next_attempt_at=row.send_at,
                      created_at=int(ctx.now))
        self._done(ctx, row)

    def on_update(self, ctx, row, values):
        if values.get("undoStatus") == "canceled":
            Outbox.update(state="canceled").where((Outbox.submission_pk == row.pk)
                                                  & (Outbox.state == "queued")).execute()
        self._done(ctx, row)

    def on_destroy(self, ctx, row, args):
        self._done(ctx, row)  # the record goes; a queued send still happens (RFC 8621 §7.5)

    def _done(self, ctx, row):
        ctx.scratch.setdefault("submitted", {})[self.id_of(row.pk)] = type_id("Email",
                                                                            row.email_pk)

    def after_set(self, ctx, args, result):
        """onSuccessUpdateEmail / onSuccessDestroyEmail: one implicit Email/set, answered
        right after this response (RFC 8621 §7.5)."""
        done = ctx.scratch.pop("submitted", {})
        succeeded = {c["id"] for c in (result["created"] or {}).values()}
        succeeded |= set(result["updated"] or {}) | set(result["destroyed"] or [])
        update, destroy = {}, []
        for key, patch in (args["onSuccessUpdateEmail"] or {}).items():
            sub_id = resolve_creation_id(ctx, key)
            if sub_id in done and sub_id in succeeded:
                update[done[sub_id]] = patch
        for key in args["onSuccessDestroyEmail"] or []:
            sub_id = resolve_creation_id(ctx, key)
            if sub_id in done and sub_id in succeeded:
                destroy.append(done[sub_id])
        if not update and not destroy:
            return
        implicit_set(ctx, "Email", {"accountId": ctx.account.id, "update": update or None,
                                    "destroy": destroy or None})


def submission_prepare(ctx: Call, values: dict) -> None:
    """Check a new EmailSubmission and fill in its server-set values (RFC 8621 §7.5)."""
    if not ctx.app.cfg.smtp_relay:
        raise SetError("forbiddenToSend", "this server has no mail relay configured "
                                          "(serve --smtp-relay); nothing can be sent")
    if values["undoStatus"] != "pending":
        raise invalid_properties(["undoStatus"], "a new submission is pending")
    identity = Identity.get_by_id(type_pk("Identity", values["identityId"]))
    email = Email.get_by_id(type_pk("Email", values["emailId"]))
    if email.size > MAX_SIZE_SEND:
        raise SetError("tooLarge", "the message is too large to send", maxSize=MAX_SIZE_SEND)
    prepared = ctx.scratch.get("submission", {}).get(email.pk) \
        or submission_outgoing(ctx, email)
    root = prepared[0]
    owned = account_addresses(ctx.account.pk)
    senders = submission_header_addresses(root, "from")
    if not senders:
        raise SetError("invalidEmail", "the message has no From address", properties=["from"])
    senders += submission_header_addresses(root, "sender")  # RFC 8621 §7.5: Sender too
    if any((a["email"] or "").lower() not in owned for a in senders):
        raise SetError("forbiddenFrom", "this account may not send as "
                       + ", ".join(a["email"] or "?" for a in senders
                                   if (a["email"] or "").lower() not in owned))
    envelope = values["envelope"]
    if envelope is None:
        envelope = submission_envelope(root, identity)
    mail_from, mail_params, rcpts = submission_check_envelope(envelope)
    if mail_from and mail_from.lower() not in owned:
        raise SetError("forbiddenMailFrom", f"this account may not send as {mail_from}")
    send_at = submission_send_at(ctx, mail_params)
    values.update(envelope=envelope, threadId=type_id("Thread", email.thread_pk),
                  sendAt=utc_date(send_at), deliveryStatus={
                      address: {"smtpReply": "250 2.0.0 queued", "delivered": "queued",
                                "displayed": "unknown"} for address, _ in rcpts})
    message_id = (mime_header_property(root.headers, "header:Message-ID:asMessageIds")
                  or [None])[0]
    ctx.scratch["outgoing"] = (prepared[1:], mail_from, mail_params, rcpts, message_id)


def submission_outgoing(ctx: Call, email) -> tuple:
    """(the parsed message, the sha and size of what goes to the relay: Bcc removed,
    CRLF line ends, RFC 8621 §7.5, RFC 5321 §2.3.8, its blob durable)."""
    with blob_open(ctx.app.cfg.data_dir, email.blob_sha256) as f:
        raw = f.read()
    sha, size = blob_store_bytes(ctx.app.cfg.data_dir, mime_crlf(mime_strip_fields(raw, {"bcc"})))
    return mime_email(raw), sha, size


def submission_header_addresses(root: MimePart, name: str) -> list:
    fields = [v for n, v in root.headers if n.lower() == name]
    return mime_header_value(fields[-1], "Addresses") if fields else []


def submission_envelope(root: MimePart, identity: Identity) -> dict:
    """The envelope from the headers when the client gave none (RFC 8621 §7)."""
    mail_from = ""
    for name in ("sender", "from"):
        fields = [v for n, v in root.headers if n.lower() == name]
        if not fields:
            continue
        addresses = mime_header_value(fields[-1], "Addresses")
        if len(fields) > 1 or len(addresses) != 1:  # SHOULD reject as invalid
            raise SetError("invalidEmail", f"one {name} address is needed to send",
                           properties=[name])
        mail_from = addresses[0]["email"] or ""
        break
    if mail_from.lower() != identity.email.lower():
        mail_from = identity.email  # not this Identity's address: use the Identity's
    rcpts, seen = [], set()
    for name in ("to", "cc", "bcc"):
        for field_value in (v for n, v in root.headers if n.lower() == name):
            for address in mime_header_value(field_value, "Addresses"):
                email = address["email"] or ""
                if email and email.lower() not in seen:
                    seen.add(email.lower())
                    rcpts.append({"email": email, "parameters": None})
    return {"mailFrom": {"email": mail_from, "parameters": None}, "rcptTo": rcpts}


def submission_check_envelope(envelope) -> tuple[str, dict, list]:
    """Check an Envelope; return MAIL FROM, its parameters, and [address, params] pairs."""
    def address(value, allowed: set) -> tuple[str, dict]:
        if not isinstance(value, dict) or set(value) - {"email", "parameters"} or \
                not isinstance(value.get("email"), str):
            raise ValueError("an Address is {email, parameters}")
        params = value.get("parameters") or {}
        if not isinstance(params, dict) or any(
                k.upper() not in allowed or not isinstance(v, (str, type(None)))
                for k, v in params.items()):
            raise ValueError(f"parameters may be {', '.join(sorted(allowed))}")
        return value["email"], {k.upper(): v for k, v in params.items()}

    try:
        if not isinstance(envelope, dict) or set(envelope) != {"mailFrom", "rcptTo"} or \
                not isinstance(envelope["rcptTo"], list):
            raise ValueError("an Envelope is {mailFrom, rcptTo}")
        mail_from, mail_params = address(envelope["mailFrom"], MAIL_PARAMS)
        rcpts = [list(address(r, RCPT_PARAMS)) for r in envelope["rcptTo"]]
    except ValueError as exc:
        raise invalid_properties(["envelope"], str(exc)) from exc
    if mail_from and not SEND_ADDRESS_RE.match(mail_from):
        raise invalid_properties(["envelope"], f"mailFrom {mail_from!r} is not an address")
    if not rcpts:
        raise SetError("noRecipients", "the envelope has no recipients")
    if len(rcpts) > MAX_RECIPIENTS:
        raise SetError("tooManyRecipients", f"at most {MAX_RECIPIENTS} recipients",
                       maxRecipients=MAX_RECIPIENTS)
    invalid = [a for a, _ in rcpts if not SEND_ADDRESS_RE.match(a)]
    if invalid:
        raise SetError("invalidRecipients", "not addresses one can send to",
                       invalidRecipients=invalid)
    return mail_from, mail_params, rcpts


def submission_send_at(ctx: Call, mail_params: dict) -> float:
    """When to send: now, or later by FUTURERELEASE HOLDFOR/HOLDUNTIL (RFC 4865 §3)."""
    hold_for, hold_until = mail_params.pop("HOLDFOR", None), mail_params.pop("HOLDUNTIL", None)
    if hold_for is not None and hold_until is not None:
        raise invalid_properties(["envelope"], "HOLDFOR or HOLDUNTIL, not both")
    try:
        if hold_for is not None:
            if not re.fullmatch(r"\d{1,10}", hold_for or ""):
                raise ValueError("HOLDFOR is a number of seconds")
            at = ctx.now + int(hold_for)
        elif hold_until is not None:
            at = datetime.fromisoformat(rfc3339_for_python(hold_until)).timestamp()
        else:
            return ctx.now
    except ValueError as exc:
        raise invalid_properties(["envelope"], str(exc)) from exc
    if at - ctx.now > ctx.app.cfg.max_delayed_send:
        raise invalid_properties(["envelope"], f"at most {ctx.app.cfg.max_delayed_send} s "
                                               "ahead (maxDelayedSend)")
    return max(at, ctx.now)


def rfc3339_for_python(value: str) -> str:
    """An RFC 3339 date-time as fromisoformat() reads it, or ValueError."""
    if not isinstance(value, str) or not re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", value):
        raise ValueError("HOLDUNTIL is an RFC 3339 date-time")
    return value[:-1] + "+00:00" if value[-1] in "Zz" else value


def mime_strip_fields(raw: bytes, names: set) -> bytes:
    """The message without the named header fields (Bcc, RFC 8621 §7.5), else unchanged."""
    match = re.search(rb"\r?\n\r?\n", raw)
    end = match.start() if match else len(raw)
    kept, skipping = [], False
    for line in raw[:end].split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace") in names
        if not skipping:
            kept.append(line)
    return b"\n".join(kept) + raw[end:]


# ---- the outbox worker ----


class OutboxWorker:
    """One thread sending due Outbox rows through the relay, one at a time."""

    def __init__(self, app):
        self.app = app
        self.thread = threading.Thread(target=self.run, daemon=True, name="outbox")

    def start(self) -> None:
        with db.atomic("IMMEDIATE"):  # rows a crash left mid-send go again (at least once)
            Outbox.update(state="queued").where(Outbox.state == "sending").execute()
        self.thread.start()

    def run(self) -> None:
        while not self.app.bus.stopping.is_set():
            try:
                job = outbox_claim(self.app.clock.now())
            except peewee.OperationalError as exc:
                log.warning("outbox: database busy (%s)", exc)
                job = None
            if job is None:
                self.app.bus.stopping.wait(OUTBOX_POLL_S)
                continue
            try:
                with blob_open(self.app.cfg.data_dir, job.sha256) as f:
                    data = f.read()
                replies = smtp_send(self.app.cfg, job, data)
            except Exception:  # noqa: BLE001 -- a bug must not stop the queue
                log.exception("outbox %d: sending failed", job.pk)
                replies = {a: (451, "4.3.0 internal error; see the server log")
                           for a, _ in json.loads(job.rcpts)}
            while not self.app.bus.stopping.is_set():  # the replies must be recorded
                try:
                    outbox_record(self.app, job, replies)
                    break
                except peewee.OperationalError as exc:
                    log.warning("outbox %d: cannot record yet (%s)", job.pk, exc)
                    self.app.bus.stopping.wait(1)

    def stop(self, timeout_s: float) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout_s)


OUTBOX_POLL_S = 1.0


def outbox_claim(now: float) -> Outbox | None:
    """Take the next due row, marking it as being sent so it can no longer be canceled."""
    with db.atomic("IMMEDIATE"):
        job = Outbox.select().where((Outbox.state == "queued") & (Outbox.next_attempt_at <= now)
                                    ).order_by(Outbox.next_attempt_at).first()
        if job is not None:
            Outbox.update(state="sending").where(Outbox.pk == job.pk).execute()
    return job


def outbox_record(app, job: Outbox, replies: dict) -> None:
    """Record an attempt: final replies stay, 4xx recipients are retried with back-off."""
    now = app.clock.now()
    cfg = app.cfg
    remaining = [[a, p] for a, p in json.loads(job.rcpts) if 400 <= replies[a][0] < 500]
    give_up = bool(remaining) and now - job.created_at > cfg.smtp_give_up_hours * 3600
    with db.atomic("IMMEDIATE"):
        if remaining and not give_up:
            delay = min(cfg.smtp_retry_seconds * 2 ** job.attempts, RETRY_MAX_S)
            Outbox.update(state="queued", rcpts=json_dumps(remaining), attempts=job.attempts + 1,
                          next_attempt_at=int(now + delay)).where(Outbox.pk == job.pk).execute()
        else:
            Outbox.update(state="done", attempts=job.attempts + 1).where(
                Outbox.pk == job.pk).execute()
        changes = ChangeLog(job.account_pk, now)
        if job.submission_pk is not None:
            submission_record_replies(changes, job.submission_pk, replies,
                                      finished=not remaining or give_up)
        changes.flush()
    log.info("outbox %d: %s", job.pk, "; ".join(f"{a}: {smtp_reply_text(*r)}"
                                                for a, r in replies.items()))
    app.bus.notify(job.account_pk)


def submission_record_replies(changes: ChangeLog, submission_pk: int, replies: dict,
                              finished: bool) -> None:
    """deliveryStatus per recipient from the relay's replies (RFC 8621 §7)."""
    row = EmailSubmission.get_or_none(EmailSubmission.pk == submission_pk)
    if row is None or row.destroyed:
        return  # the record was destroyed; the sending went on without it
    status = json.loads(row.delivery_status or "{}")
    for address, (code, text) in replies.items():
        delivered = "unknown" if code < 400 else "no" if code >= 500 or finished else "queued"
        status[address] = {"smtpReply": smtp_reply_text(code, text), "delivered": delivered,
                           "displayed": status.get(address, {}).get("displayed", "unknown")}
    row.delivery_status = json_dumps(status)
    relayed = any(s["delivered"] in ("unknown", "yes") for s in status.values())
    if relayed or finished:
        row.undo_status = "final"
    record_change(changes, "EmailSubmission", row, "updated")


REPORT_KINDS = {"message/delivery-status": "dsn", "message/global-delivery-status": "dsn",
                "message/disposition-notification": "mdn"}


def submission_report_facts(root: MimePart) -> dict | None:
    """What a delivery report says, read at analysis: {kind, blocks, message_ids}, or
    None for a message that is no DSN (RFC 3464) or MDN (RFC 8098)."""
    if root.type != "multipart/report":
        return None
    report = next((p for p in mime_walk(root) if p.type in REPORT_KINDS), None)
    if report is None:
        return None
    blocks = [dict((n.lower(), _unfold(v).strip()) for n, v in mime_header_fields(block))
              for block in re.split(rb"\r?\n[ \t]*\r?\n", mime_decoded(report)) if block.strip()]
    if not blocks:
        return None
    wanted = mime_message_ids(blocks[0].get("original-message-id", "")) or []
    for part in mime_walk(root):  # the returned message's own Message-ID
        if part.type in ("text/rfc822-headers", "message/rfc822", "message/global",
                         "message/global-headers"):
            fields = mime_header_fields(mime_split(mime_decoded(part))[0]
                                        if part.type.startswith("message/")
                                        else mime_decoded(part))
            wanted += mime_header_property(fields, "header:Message-ID:asMessageIds") or []
    return {"kind": REPORT_KINDS[report.type], "blocks": blocks, "message_ids": wanted}


def submission_apply_report(changes: ChangeLog, account_pk: int, report: dict, sha: str) -> None:
    """A DSN or MDN for mail we sent updates its EmailSubmission: deliveryStatus
    delivered/displayed, dsnBlobIds/mdnBlobIds (RFC 8621 §7)."""
    blocks, is_mdn = report["blocks"], report["kind"] == "mdn"
    row = submission_for_report(account_pk, blocks[0], report["message_ids"])
    if row is None:
        return
    status = json.loads(row.delivery_status or "{}")
    by_lower = {address.lower(): address for address in status}
    for block in blocks if is_mdn else blocks[1:]:
        recipient = block.get("final-recipient") or block.get("original-recipient") or ""
        address = by_lower.get(recipient.partition(";")[2].strip().strip("<>").lower())
        if address is None:
            continue
        if is_mdn:
            if "displayed" in block.get("disposition", "").lower():
                status[address]["displayed"] = "yes"  # RFC 8621 §7 / RFC 8098 §3.2.6.2
            continue
        action = block.get("action", "").lower()
        if action in ("delivered", "failed"):  # RFC 8621 §7: other actions leave it
            status[address]["delivered"] = "yes" if action == "delivered" else "no"
        diagnostic = block.get("diagnostic-code", "")
        if diagnostic.lower().startswith("smtp;"):
            status[address]["smtpReply"] = diagnostic[5:].strip()
        elif block.get("status"):
            code = {"2": "250", "4": "450", "5": "550"}.get(block["status"][:1], "250")
            status[address]["smtpReply"] = f"{code} {block['status']} {action or 'reported'}"
    column = "mdn_blob_ids" if is_mdn else "dsn_blob_ids"
    setattr(row, column, json_dumps(json.loads(getattr(row, column)) + [blob_id(sha)]))
    row.delivery_status = json_dumps(status)
    record_change(changes, "EmailSubmission", row, "updated")


def submission_for_report(account_pk: int, first: dict, message_ids: list):
    """The EmailSubmission a report is about: by ENVID, else by the returned Message-ID."""
    live = EmailSubmission.select().where((EmailSubmission.account_pk == account_pk)
                                          & (EmailSubmission.destroyed == False))  # noqa: E712
    pk = type_pk("EmailSubmission", first.get("original-envelope-id", ""))
    if pk is not None:
        row = live.where(EmailSubmission.pk == pk).first()
        if row is not None:
            return row
    if not message_ids:
        return None
    return live.where(EmailSubmission.message_id.in_(message_ids[:100])).order_by(
        EmailSubmission.pk.desc()).first()


def smtp_reply_text(code: int, text) -> str:
    """An SMTP reply as one line (RFC 8621 §7: continuation prefixes and CRLFs joined)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = text.split("\n")
    prefix = re.match(r"\d\.\d{1,3}\.\d{1,3} ", lines[0])
    rest = [line[prefix.end():] if prefix and line.startswith(prefix.group(0)) else line
            for line in lines[1:]]
    return " ".join([f"{code} {lines[0]}".rstrip()] + rest)


def smtp_send(cfg, job: Outbox, data: bytes) -> dict:
    """Send one message to its remaining recipients; map each to (code, text)."""
    import smtplib  # lazy: only the outbox sends
    import ssl

    rcpts = json.loads(job.rcpts)
    host, port = cfg.smtp_relay
    context = ssl.create_default_context(cafile=cfg.smtp_ca_file)
    try:
        if cfg.smtp_tls == "implicit":
            client = smtplib.SMTP_SSL(host, port, timeout=SMTP_TIMEOUT_S, context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT_S)
        try:
            replies = _smtp_transaction(cfg, client, context, job, rcpts, data)
        finally:
            try:  # the replies so far stand, whatever QUIT answers
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()
        return replies
    except smtplib.SMTPAuthenticationError as exc:  # our own configuration: retry later
        reply = (454, f"4.7.0 the relay refused our login: {smtp_reply_text(exc.smtp_code, exc.smtp_error)}")
    except smtplib.SMTPResponseException as exc:
        reply = (exc.smtp_code, exc.smtp_error)
    except UnicodeError as exc:  # an address the relay's dialect cannot carry
        reply = (553, f"5.6.7 {exc}")
    except (OSError, smtplib.SMTPException) as exc:
        reply = (451, f"4.4.1 the relay could not be reached: {exc}")
    return {address: reply for address, _ in rcpts}


def _smtp_transaction(cfg, client, context, job: Outbox, rcpts: list, data: bytes) -> dict:
    import smtplib

    client.ehlo()
    if cfg.smtp_tls == "starttls" or (cfg.smtp_tls == "auto" and client.has_extn("starttls")):
        if not client.has_extn("starttls"):
            return {a: (454, "4.7.0 the relay does not offer STARTTLS") for a, _ in rcpts}
        client.starttls(context=context)
        client.ehlo()
    elif cfg.smtp_user and cfg.smtp_tls != "implicit":
        return {a: (454, "4.7.0 the relay offers no TLS; AUTH is never sent in plain text")
                for a, _ in rcpts}
    if cfg.smtp_user:
        client.login(cfg.smtp_user, smtp_password(cfg))
    params = json.loads(job.mail_params)
    if re.search(rb"[\x80-\xff]", data) and "BODY" not in params:
        params["BODY"] = "8BITMIME"
    if not (job.mail_from + "".join(a for a, _ in rcpts)).isascii():
        if not client.has_extn("smtputf8"):  # RFC 6531: such addresses need SMTPUTF8
            return {a: (553, "5.6.7 the relay does not take non-ASCII addresses (SMTPUTF8)")
                    for a, _ in rcpts}
        params.setdefault("SMTPUTF8", None)
    if job.submission_pk is not None and "ENVID" not in params:
        params["ENVID"] = type_id("EmailSubmission", job.submission_pk)  # DSNs name it
    code, text = client.mail(job.mail_from, smtp_options(client, params))
    if code >= 300:
        client.rset()
        return {a: (code, text) for a, _ in rcpts}
    replies, accepted = {}, []
    for address, rcpt_params in rcpts:
        replies[address] = client.rcpt(address, smtp_options(client, rcpt_params))
        if replies[address][0] < 300:
            accepted.append(address)
    if not accepted:
        client.rset()
        return replies
    try:
        code, text = client.data(data)
    except smtplib.SMTPResponseException as exc:
        code, text = exc.smtp_code, exc.smtp_error
    if code >= 300:  # the message as a whole was refused: that reply for each (RFC 8621 §7)
        replies.update({a: (code, text) for a in accepted})
    return replies


def smtp_options(client, params: dict) -> list:
    """ESMTP parameters the relay announced support for, xtext-encoded (RFC 3461 §4)."""
    options = []
    for name, value in params.items():
        if not client.has_extn(PARAM_EXTENSION.get(name, name.lower())):
            continue
        if value is None:
            options.append(name)
        else:
            options.append(f"{name}=" + "".join(
                c if "!" <= c <= "~" and c not in "+=" else "".join(
                    f"+{b:02X}" for b in c.encode("utf-8")) for c in value))
    return options


def smtp_password(cfg) -> str:
    if not cfg.smtp_password_file:
        return ""
    with open(cfg.smtp_password_file, encoding="utf-8") as f:
        return f.read().rstrip("\r\n")


# =============================================================================
# 12 WEBSOCKET -- JMAP over WebSocket (RFC 8887) on our own small listener
#     Our own minimal RFC 6455 server side: handshake, framing, fragments, ping/
#     pong, close codes, a message size limit. waitress has no public way to hand
#     a connection over, and the request read-ahead EventSource relies on to see
#     hang-ups would swallow the frames; so WebSockets get a listener of their own
#     (--websocket HOST:PORT) that the proxy configs in contrib/ map onto
#     /jmap/ws/ of the same origin. Connections hold no waitress worker.
# =============================================================================

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
WS_PATH = "/jmap/ws/"
register_capability(  # RFC 8887 §4.1: offered only with a listener to reach
    CAP_WEBSOCKET, lambda app, base, fwd: {"url": ws_url(app, base, fwd), "supportsPush": True},
    offered=lambda cfg: bool(cfg.websocket))
WS_MAX_HEAD = 16384
WS_HANDSHAKE_TIMEOUT_S = 10
WS_PING_S = 30  # an idle connection is pinged so proxies and NAT keep it open
WS_CLOSE_CODES = (set(range(1000, 1015)) - {1004, 1005, 1006}) | set(range(3000, 5000))  # §7.4
WS_MAX_FRAGMENTS = 1024  # frames in one message: empty fragments cost memory too
WS_SEND_TIMEOUT_S = 30  # a client that stops reading is dropped, never waited on forever


class WebSocketClosed(Exception):
    """The connection is over: a close frame went both ways, or the peer vanished."""

    def __init__(self, code: int, reason: str = ""):
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


class WebSocket:
    """The server side of one RFC 6455 connection after the handshake."""

    def __init__(self, sock: socket.socket, max_message: int):
        self.sock, self.max_message = sock, max_message
        # Reads may wait forever (pings keep it honest); a send that cannot proceed for
        # WS_SEND_TIMEOUT_S fails (SO_SNDTIMEO), so no thread waits on a stalled client.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", WS_SEND_TIMEOUT_S, 0))
        self.reader = sock.makefile("rb")
        self.send_lock = threading.Lock()
        self.close_sent = False

    # ---- sending (any thread) ----
    def send_text(self, text: str) -> None:
        self._send(0x1, text.encode("utf-8"))

    def ping(self) -> None:
        self._send(0x9, b"")

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (once) and stop writing; the reader sees the end. A sender
        stuck on a stalled client is not waited for: the socket is shut down anyway."""
        try:
            if self.send_lock.acquire(timeout=1):
                self.send_lock.release()
                self._send(0x8, code.to_bytes(2, "big") + reason.encode("utf-8")[:120])
        except (OSError, WebSocketClosed):
            pass
        finally:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _send(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            head = bytes([0x80 | opcode, size])
        elif size < 65536:
            head = bytes([0x80 | opcode, 126]) + size.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 127]) + size.to_bytes(8, "big")
        with self.send_lock:  # server frames are never masked (RFC 6455 §5.1)
            if self.close_sent:
                raise WebSocketClosed(1006, "closed")
            self.close_sent = opcode == 0x8
            self.sock.sendall(head + payload)

    # ---- receiving (the connection's thread) ----
    def receive(self) -> str:
        """The next text message, its fragments joined; control frames handled on the way."""
        fragments, total, first = [], 0, None
        while True:
            fin, opcode, payload = self._frame()
            if opcode >= 0x8:
                self._control(opcode, payload)
                continue
            if (opcode == 0) == (first is None):  # RFC 6455 §5.4
                self.fail(1002, "unexpected continuation" if opcode == 0
                          else "a new message before the last one ended")
            first = first if opcode == 0 else opcode
            total += len(payload)
            if total > self.max_message or len(fragments) >= WS_MAX_FRAGMENTS:
                self.fail(1009, f"message larger than {self.max_message} octets")
            fragments.append(payload)
            if fin:
                break
        if first == 0x2:
            self.fail(1003, "JMAP messages are text frames")  # RFC 8887 §4.3.1
        try:
            return b"".join(fragments).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(1007, "text frames must be UTF-8")

    def fail(self, code: int, reason: str):
        self.close(code, reason)
        raise WebSocketClosed(code, reason)

    def _read(self, size: int) -> bytes:
        data = self.reader.read(size) if size else b""
        if len(data) < size:
            raise WebSocketClosed(1006, "connection lost")
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read(2)
        fin, opcode = bool(first & 0x80), first & 0x0F
        if first & 0x70:
            self.fail(1002, "no extension was negotiated")
        if opcode not in (0x0, 0x1, 0x2, 0x8, 0x9, 0xA):
            self.fail(1002, f"unknown opcode {opcode}")
        if not second & 0x80:
            self.fail(1002, "client frames must be masked")  # RFC 6455 §5.1
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(self._read(2), "big")
        elif size == 127:
            size = int.from_bytes(self._read(8), "big")
            if size >> 63:
                self.fail(1002, "bad length")
        if opcode >= 0x8 and (size > 125 or not fin):
            self.fail(1002, "control frames are short and whole")  # RFC 6455 §5.5
        if size > self.max_message:
            self.fail(1009, f"message larger than {self.max_message} octets")
        mask = self._read(4)
        data = self._read(size)
        if size:  # unmask with one big-integer XOR instead of a loop per octet
            key = (mask * (size // 4 + 1))[:size]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
        return fin, opcode, data

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:
            self._send(0xA, payload)
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
            if len(payload) == 1 or (len(payload) >= 2 and code not in WS_CLOSE_CODES):
                self.fail(1002, "bad close frame")
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(1007, "close reason is not UTF-8")
            self.close(code)  # RFC 6455 §5.5.1: answer the close, then end
            raise WebSocketClosed(code, "closed by the client")


def ws_handshake(app, sock: socket.socket, peer: str):
    """Read the upgrade request (RFC 6455 §4.2) and authenticate it; return
    (user, reply headers) or send an HTTP error and return None."""
    deadline = time.monotonic() + WS_HANDSHAKE_TIMEOUT_S  # for the whole request head
    head = b""
    while b"\r\n\r\n" not in head:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ws_refuse(sock, 400, "the handshake took too long")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk or len(head) + len(chunk) > WS_MAX_HEAD:
            return ws_refuse(sock, 400, "bad request") if chunk else None
        head += chunk
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rpartition(" ")[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")
    params = urllib.parse.parse_qs(query)
    if method != "GET" or path.rstrip("/") != WS_PATH.rstrip("/"):
        return ws_refuse(sock, 404, "not found")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if "websocket" not in headers.get("upgrade", "").lower() or "upgrade" not in tokens:
        return ws_refuse(sock, 426, "this endpoint speaks WebSocket only",
                         {"Upgrade": "websocket", "Connection": "Upgrade"})
    if headers.get("sec-websocket-version") != "13":
        return ws_refuse(sock, 426, "WebSocket version 13 only", {"Sec-WebSocket-Version": "13"})
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError(key)
    except ValueError:
        return ws_refuse(sock, 400, "bad Sec-WebSocket-Key")
    protocols = {p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")}
    if "jmap" not in protocols:  # RFC 8887 §4.2: the jmap subprotocol or nothing
        return ws_refuse(sock, 400, "the jmap subprotocol (Sec-WebSocket-Protocol: jmap) is "
                                    "required")
    environ = {"REMOTE_ADDR": peer, "HTTP_HOST": headers.get("host", ""),
               "wsgi.url_scheme": "http"}
    environ.update({"HTTP_" + n.upper().replace("-", "_"): v for n, v in headers.items()
                    if n.startswith("x-forwarded-")})
    http_apply_proxy_headers(app.cfg, environ)
    user = ws_authenticate(app, sock, headers, params, environ)
    if user is None:
        return None
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    return user, environ["REMOTE_ADDR"], (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: jmap\r\n\r\n")


def ws_authenticate(app, sock, headers: dict, params: dict, environ: dict):
    """Authorization header, or for browsers an app password as ?access_token=.

    A browser sends Origin; its Basic credentials reach a foreign page's WebSocket
    too (cross-site hijacking), so from another origin only an explicit
    access_token is taken."""
    authorization = headers.get("authorization", "")
    token = (params.get("access_token") or [""])[0]
    origin = headers.get("origin")
    own = app.base_url(environ)
    if authorization and origin and origin.rstrip("/") != own.rstrip("/") and not token:
        return ws_refuse(sock, 403, "from a web page, authenticate with ?access_token=APP_PASSWORD")
    if token:
        authorization = "Bearer " + token
    try:
        user = app.auth.check_header(authorization, environ["REMOTE_ADDR"] or "local")
    except TooManyFailures as exc:
        return ws_refuse(sock, 429, "too many failed logins", {"Retry-After": str(exc.retry_after)})
    if user is None:
        detail = "the credentials were refused" if authorization else "authentication required"
        return ws_refuse(sock, 401, detail,
                         {"WWW-Authenticate": 'Basic realm="jmapd", charset="UTF-8"'})
    return user


def ws_refuse(sock, status: int, detail: str, extra: dict | None = None,
              kind: str = "about:blank", limit: str | None = None) -> None:
    """Answer a handshake with an RFC 7807 problem and close."""
    problem = {"type": kind, "status": status, "detail": detail}
    if limit:
        problem["limit"] = limit  # RFC 8620 §3.6.1, as over HTTP
    body = json_dumps(problem).encode()
    reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
              426: "Upgrade Required", 429: "Too Many Requests",
              503: "Service Unavailable"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {PROBLEM_TYPE}\r\n" \
           f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
    try:
        sock.sendall(head.encode() + b"\r\n" + body)
    except OSError:
        pass
    return None


class JmapWebSocket:
    """One JMAP-over-WebSocket session (RFC 8887 §4.3): requests answered as they
    finish, several in flight, and StateChange pushes once enabled."""

    def __init__(self, app, ws: WebSocket, user: Account):
        self.app, self.ws, self.user = app, ws, user
        self.watch: PushWatch | None = None
        self.push_lock = threading.Lock()
        self.push_enabled = threading.Event()  # wakes the push loop on WebSocketPushEnable
        self.running = threading.BoundedSemaphore(app.cfg.max_concurrent_requests)

    def run(self) -> None:
        threading.Thread(target=self.push_loop, daemon=True, name="ws-push").start()
        try:
            while True:
                self.handle(self.ws.receive())
        finally:
            if not self.ws.close_sent:
                self.ws.close(1001)

    def handle(self, text: str) -> None:
        try:
            message = parse_ijson(text.encode("utf-8"))
        except NotIJson as exc:
            return self.send_error(None, RequestError("notJSON", f"not I-JSON: {exc}"))
        kind = message.get("@type") if isinstance(message, dict) else None
        request_id = message.get("id") if isinstance(message, dict) else None
        if not auth_still_valid(self.user):  # RFC 8887 §4.2: 1008 once credentials go
            self.ws.fail(1008, "the credentials are no longer valid")
        if kind == "Request":
            if request_id is not None and not isinstance(request_id, str):
                return self.send_error(None, RequestError("notRequest", "id must be a String"))
            if not self.running.acquire(blocking=False):
                return self.send_error(request_id, RequestError(
                    "limit", "too many requests in flight", limit="maxConcurrentRequests"))
            body = {k: v for k, v in message.items() if k not in ("@type", "id")}
            threading.Thread(target=self.answer, args=(request_id, body), daemon=True,
                             name="ws-request").start()
        elif kind == "WebSocketPushEnable":
            types = message.get("dataTypes")
            state = message.get("pushState")
            if not (types is None or isinstance(types, list) and all(
                    isinstance(t, str) for t in types)) or not isinstance(state, (str, type(None))):
                return self.send_error(None, RequestError(
                    "notRequest", "dataTypes is a String[] or null; pushState a String"))
            seen = push_parse_event_id(state) if state else None
            with self.push_lock:
                self.watch = PushWatch(self.app, self.user, None if types is None else set(types),
                                       seen)
            self.push_enabled.set()
        elif kind == "WebSocketPushDisable":
            with self.push_lock:
                self.watch = None
            self.push_enabled.clear()
        else:
            self.send_error(request_id if isinstance(request_id, str) else None, RequestError(
                "notRequest", "@type must be Request, WebSocketPushEnable or "
                              "WebSocketPushDisable"))

    def answer(self, request_id, body: dict) -> None:
        started = time.monotonic()
        try:  # the request counts against the limits until its answer is sent
            with self.app.slot(self.user, "maxConcurrentRequests",
                               self.app.cfg.max_concurrent_requests):
                response = engine_run(self.app, self.user, json_dumps(body).encode())
                reply = {"@type": "Response",
                         **({"requestId": request_id} if request_id is not None else {}),
                         **response}
                self.send(reply)
        except RequestError as exc:
            return self.send_error(request_id, exc)
        finally:
            self.running.release()
        log.info("ws %s [%s] %.1f ms", self.user.username,
                 ",".join(r[0] for r in response["methodResponses"]),
                 (time.monotonic() - started) * 1000)

    def send_error(self, request_id, exc: RequestError) -> None:
        self.send({"@type": "RequestError", "requestId": request_id, **exc.as_json()})

    def send(self, obj: dict) -> None:
        try:
            self.ws.send_text(json_dumps(obj))
        except (OSError, WebSocketClosed):
            pass  # the reader notices the end

    def push_loop(self) -> None:
        """StateChange with pushState whenever a watched state moves (RFC 8887 §4.3.5)."""
        last_write = checked = time.monotonic()
        while not self.ws.close_sent and not self.app.bus.stopping.is_set():
            if time.monotonic() - checked >= 1:  # at most once a second, not every wake
                checked = time.monotonic()
                if not auth_still_valid(self.user):
                    self.ws.close(1008, "the credentials are no longer valid")
                    return
            with self.push_lock:
                watch = self.watch
            if watch is not None:
                changed, now = watch.changes()
                if changed:
                    self.send({"@type": "StateChange", "changed": changed,
                               "pushState": push_event_id(now)})
                    last_write = time.monotonic()
                    continue
                watch.wait(1.0)
            else:  # short: SIGTERM must reach an idle connection before the process ends
                self.push_enabled.wait(0.2)
            if time.monotonic() - last_write > WS_PING_S:
                try:
                    self.ws.ping()
                except (OSError, WebSocketClosed):
                    return
                last_write = time.monotonic()
        if self.app.bus.stopping.is_set():
            self.ws.close(1001, "the server is stopping")


def ws_start(app, sockets: list) -> list:
    """Serve JMAP over WebSocket on already-bound sockets, a thread per connection."""
    import socketserver  # lazy: serve with --websocket only

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            peer = self.client_address[0] if isinstance(self.client_address, tuple) else ""
            ws_connection(app, self.request, str(peer))

    return serve_threaded(sockets, Handler, "websocket")


def ws_connection(app, sock: socket.socket, peer: str) -> None:
    """Handshake, limits, then the session until either side closes.

    Until its handshake is through, a connection counts only against the small
    allowance for handshakes under way (WS_MAX_PENDING_PER_ADDRESS from one address,
    WS_MAX_PENDING in all; a trusted proxy's count only in all), so strangers cannot
    hold the --max-websockets slots of the users; once authenticated it takes one."""
    key = None if not peer or http_is_trusted_proxy(app.cfg, peer) else client_address_key(peer)
    if not app.ws_pending.enter(key):
        log.getChild("ws").warning("WebSocket handshake from %s refused: too many under way",
                                   peer or "local")
        return ws_refuse(sock, 503, "too many WebSocket handshakes under way; try again",
                         {"Retry-After": "10"})
    try:
        with app.ws_pending.held(key):
            found = ws_handshake(app, sock, peer)
        if found is None:
            return
        ws_session(app, sock, *found)
    except RequestError as exc:
        ws_refuse(sock, 400, exc.detail, kind=PROBLEM_PREFIX + exc.kind, limit=exc.limit)
    except WebSocketClosed as exc:
        log.info("ws closed: %s", exc)
    except (OSError, ValueError) as exc:
        log.info("ws connection from %s ended: %s", peer, exc)


def ws_session(app, sock: socket.socket, user: Account, address: str, reply: str) -> None:
    """An authenticated connection: the total and per-user caps, then JMAP (RFC 8887)."""
    if not app.ws_open.enter(None):
        log.getChild("ws").warning("WebSocket of %s from %s refused: %d open "
                                   "(--max-websockets)", user.username, address,
                                   app.cfg.max_websockets)
        ws_refuse(sock, 503, f"more than {app.cfg.max_websockets} WebSockets are open; try "
                             "again later", {"Retry-After": "30"})
        return
    with app.ws_open.held(None):
        try:
            slot = app.slot(user, "webSocket", app.cfg.max_push_connections).__enter__()
        except RequestError:
            log.getChild("ws").warning("WebSocket of %s from %s refused: %d open for the user "
                                       "(--max-push-connections)", user.username, address,
                                       app.cfg.max_push_connections)
            raise
        try:
            sock.settimeout(None)
            sock.sendall(reply.encode())
            log.info("ws %s connected from %s", user.username, address)
            JmapWebSocket(app, WebSocket(sock, app.cfg.max_size_request), user).run()
        finally:
            slot.__exit__(None, None, None)


class Allowance:
    """Counted places, per key (an address, or None for "in all only") and in total."""

    def __init__(self, per_key: int, total: int):
        self.per_key, self.total = per_key, total
        self.counts: dict = {}
        self.count = 0
        self.lock = threading.Lock()

    def enter(self, key) -> bool:
        with self.lock:
            if self.count >= self.total or (
                    key is not None and self.counts.get(key, 0) >= self.per_key):
                return False
            self.count += 1
            if key is not None:
                self.counts[key] = self.counts.get(key, 0) + 1
            return True

    def leave(self, key) -> None:
        with self.lock:
            self.count -= 1
            if key is not None:
                left = self.counts.get(key, 1) - 1
                if left:
                    self.counts[key] = left
                else:
                    self.counts.pop(key, None)

    @contextlib.contextmanager
    def held(self, key):
        """Leave when the block ends (the place was taken with enter())."""
        try:
            yield
        finally:
            self.leave(key)


# =============================================================================
# 13 HTTP ROUTES
#    make_app(cfg) -> App, whose .wsgi is a bottle.Bottle(): /.well-known/jmap,
#    /jmap/session, /jmap/api/. Every error is an RFC 7807 problem document; a
#    401 carries WWW-Authenticate. X-Forwarded-* are never read here.
# =============================================================================

HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?\Z|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?\Z")
NO_STORE = "no-cache, no-store, must-revalidate"  # RFC 8620 §2
PROBLEM_TYPE = "application/problem+json"  # RFC 7807 §3
# possessive repeat: no backtracking state kept per parameter of a long list
MEDIA_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
                           r"(\s*;\s*[A-Za-z0-9_.+-]+=(\"[^\"\\\r\n]*\"|[A-Za-z0-9_.+-]+))*+\Z")
FORWARDED_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST",
                     "HTTP_X_FORWARDED_PORT", "HTTP_X_FORWARDED_SCHEME", "HTTP_X_FORWARDED_SSL",
                     "HTTP_FORWARDED", "HTTP_X_REAL_IP")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Content-Disposition, Content-Length, Retry-After, "
                                     "WWW-Authenticate",
}
CORS_PREFLIGHT = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept, Last-Event-ID",
    "Access-Control-Max-Age": "86400",
}


class App:
    """The running server's state: configuration, clock, auth, change bus, counters."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.clock = Clock(cfg.test_now)
        limiter = LoginLimiter(cfg.max_login_failures_per_address,
                               cfg.max_login_failures_per_user)
        self.auth = Authenticator(cfg.test_cheap_hashing, self.clock, limiter)
        limiter.known = self.auth.known_address
        self.bus = ChangeBus()
        self.capabilities = [uri for uri, cap in CAPABILITIES.items() if cap.offered(cfg)]
        self.inflight_lock = threading.Lock()
        self.inflight: dict[tuple, int] = {}
        self.request_ids = itertools.count(1)
        self.session_states: dict = {}  # (user, accounts) -> session state
        self.push_streams = 0
        self.event_streams = EventStreams()
        self.ws_pending = Allowance(WS_MAX_PENDING_PER_ADDRESS, WS_MAX_PENDING)
        self.ws_open = Allowance(cfg.max_websockets, cfg.max_websockets)
        self.push_wake = threading.Event()  # a subscription was made or verified
        self.delivery = GroupCommit(cfg.data_dir, self.clock)
        self.ws_port = None  # the WebSocket listener's port, once bound
        self.workers = None  # waitress's task dispatcher, once serve has made it
        self.wsgi = http_middleware(self, http_routes(self))

    def slot(self, user: Account, kind: str, limit: int) -> InflightSlot:
        return InflightSlot(self, user, kind, limit)

    def push_streams_changed(self, delta: int) -> bool:
        """Keep cfg.threads workers free for ordinary requests while push streams are open;
        False (and nothing changed) when one more would pass --max-event-streams."""
        with self.inflight_lock:
            if delta > 0 and self.push_streams + delta > self.cfg.max_event_streams:
                return False
            self.push_streams += delta
            if self.workers is not None:
                self.workers.set_thread_count(self.cfg.threads + self.push_streams)
        return True

    def accessible_accounts(self, user: Account) -> dict:
        """Map account id -> (Account, read_only): the user's own and those shared with them."""
        found = {user.id: (user, False)}
        shared = db.execute_sql(  # plain SQL: asked once per method call
            "SELECT a.pk, a.username, s.read_only FROM account_share s JOIN account a "
            "ON a.pk = s.owner_pk WHERE s.grantee_pk = ? ORDER BY a.pk", (user.pk,))
        for pk, username, read_only in shared:
            account = Account(pk=pk, username=username)
            found[account.id] = (account, bool(read_only))
        return found

    def session_state_for(self, user: Account) -> str:
        """The session's state (RFC 8620 §2), answered with every API response: it only
        changes with the accounts the user has, so it is remembered per that."""
        accounts = self.accessible_accounts(user)
        key = (user.pk, user.username, tuple((a.pk, ro) for a, ro in accounts.values()))
        state = self.session_states.get(key)
        if state is None:
            if len(self.session_states) > 10_000:
                self.session_states.clear()
            state = self.session_states[key] = session_resource(self, user, "")["state"]
        return state

    def base_url(self, environ: dict) -> str:
        """The external base URL: --public-url, else what the client asked for."""
        if self.cfg.public_url:
            return self.cfg.public_url
        host = environ.get("HTTP_HOST", "")
        if not HOST_RE.match(host):
            name, port = self.cfg.listen
            host = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
        return f"{environ.get('wsgi.url_scheme', 'http')}://{host}"


def make_app(cfg: Config) -> App:
    """Build the application for a configuration (the database must be open)."""
    return App(cfg)


def http_middleware(app: App, web: bottle.Bottle):
    """Wrap the routes: trusted-proxy headers, CORS preflight and CORS headers."""

    def middleware(environ, start_response):
        http_apply_proxy_headers(app.cfg, environ)
        if environ.get("REQUEST_METHOD") == "OPTIONS":
            start_response("204 No Content", list(CORS_PREFLIGHT.items()))
            return [b""]

        extra = list(CORS_HEADERS.items())

        def start_with_cors(status, headers, exc_info=None):
            return start_response(status, headers + extra, exc_info)

        return web(environ, start_with_cors)

    return middleware


def http_apply_proxy_headers(cfg: Config, environ: dict) -> None:
    """Honour X-Forwarded-* only from --trusted-proxy peers; strip them from anyone else.

    waitress 2.1 passes these headers through and bottle trusts them when it builds
    URLs, so an untrusted client could otherwise forge its address, scheme or host.
    """
    peer = environ.get("REMOTE_ADDR") or ""
    forwarded = {k: environ.pop(k) for k in FORWARDED_HEADERS if k in environ}
    address, trusted = http_client_address(cfg, peer,
                                           forwarded.get("HTTP_X_FORWARDED_FOR", ""))
    if not trusted:
        return
    environ["jmapd.forwarded"] = bool(forwarded) or peer in ("", "localhost")
    environ["REMOTE_ADDR"] = address
    proto = forwarded.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip().lower()
    if proto in ("http", "https"):
        environ["wsgi.url_scheme"] = proto
    host = forwarded.get("HTTP_X_FORWARDED_HOST", "").split(",")[0].strip()
    if host and HOST_RE.match(host):
        environ["HTTP_HOST"] = host


BODY_ROUTE_RE = re.compile(r"^/jmap/(?:api/?|upload/[^/]+/?)\Z")  # what takes a body


class ListenerGuard:
    """What the HTTP listener decides before the app sees a request: how many
    connections one address may hold, how long a request head may take, which requests
    are refused from their head alone (a body for a route that takes none: 404; a body
    without credentials: 401), and how much body credentials not yet verified may send
    (UNVERIFIED_BODY_*: 503 beyond, and the credentials are checked meanwhile).

    Limits count per client address (IPv6: per /64). A trusted proxy and the Unix
    socket are exempt from the connection cap; behind them, the forwarded client's
    address counts once the head is read. Called from waitress's loop thread, except
    release_body() (worker threads): hence the lock."""

    def __init__(self, app):
        self.app, self.cfg = app, app.cfg
        self.lock = threading.Lock()
        self.connections: dict[str, int] = {}
        self.bodies: dict[str, int] = {}
        self.bodies_total = 0
        self.logged: dict[str, float] = {}  # address -> when a refusal was last logged

    def admit(self, addr) -> tuple[bool, str | None]:
        """(whether a new connection may stay, the key it counts under or None)."""
        peer = addr[0] if isinstance(addr, tuple) and addr[0] else "localhost"
        if peer == "localhost" or http_is_trusted_proxy(self.cfg, peer):
            return True, None
        key = client_address_key(peer)
        with self.lock:
            held = self.connections.get(key, 0)
            if held < self.cfg.max_connections_per_address:
                self.connections[key] = held + 1
                return True, key
        self.log_once(key, "connection from %s refused: %d open (--max-connections-per-address)",
                      key, held)
        return False, None

    def channel_closed(self, channel) -> None:
        key = getattr(channel, "guard_key", None)
        for parser in [channel.request, *channel.requests]:
            if parser is not None:
                self.release_body(parser)
        if key is not None:
            with self.lock:
                left = self.connections.get(key, 1) - 1
                if left > 0:
                    self.connections[key] = left
                else:
                    self.connections.pop(key, None)

    def check_head(self, channel, parser):
        """An EarlyRefusal for a request whose head alone decides it, else None."""
        if not (parser.content_length > 0 or parser.chunked):
            return None  # no body: the app answers whatever it is
        if parser.command != "POST" or not BODY_ROUTE_RE.match(parser.path or ""):
            return self.refusal(404, "Not Found", "no such resource takes a request body")
        header = parser.headers.get("AUTHORIZATION", "")
        if auth_credentials(header) is None:
            return self.refusal(401, "Unauthorized", "authentication required",
                                ("WWW-Authenticate", 'Basic realm="jmapd", charset="UTF-8"'))
        if self.app.auth.recently_verified(header):
            return None
        peer = channel.addr[0] if isinstance(channel.addr, tuple) and channel.addr[0] \
            else "localhost"
        address = http_client_address(self.cfg, peer,
                                      parser.headers.get("X_FORWARDED_FOR", ""))[0]
        if parser.chunked:  # RFC 9110 §15.5.12: its size must be known before it is read
            return self.refusal(411, "Length Required",
                                "send a Content-Length (or log in first)")
        return self._charge(parser, header, address)

    def _charge(self, parser, header: str, address: str):
        key, size = client_address_key(address), parser.content_length
        with self.lock:
            fits = (self.bodies.get(key, 0) + size <= UNVERIFIED_BODY_PER_ADDRESS
                    and self.bodies_total + size <= UNVERIFIED_BODY_TOTAL)
            if fits:
                self.bodies[key] = self.bodies.get(key, 0) + size
                self.bodies_total += size
                parser.charged, parser.charged_key = size, key
        if fits:
            return None
        self.app.auth.verify_later(header, address)  # so that a retry gets through
        self.log_once(key, "request body from %s refused: unverified credentials over "
                      "their allowance", key)
        return self.refusal(503, "Service Unavailable", "too much unauthenticated data in "
                            "flight; try again shortly", ("Retry-After", "5"))

    def release_body(self, parser) -> None:
        size, key = getattr(parser, "charged", 0), getattr(parser, "charged_key", None)
        if not size:
            return
        parser.charged = 0
        with self.lock:
            self.bodies_total -= size
            left = self.bodies.get(key, size) - size
            if left > 0:
                self.bodies[key] = left
            else:
                self.bodies.pop(key, None)

    def overdue(self, channel) -> bool:
        """Whether a connection must close: a head unfinished after --head-timeout, or
        an unverified body unfinished after UNVERIFIED_BODY_SECONDS."""
        parser = channel.request
        started = getattr(parser, "started", 0)
        if parser is None or not started:
            return False
        age = time.monotonic() - started
        if not parser.headers_finished:
            return age > self.cfg.head_timeout
        return bool(getattr(parser, "charged", 0)) and not parser.completed \
            and age > UNVERIFIED_BODY_SECONDS

    @staticmethod
    def refusal(status: int, reason: str, detail: str, *headers) -> EarlyRefusal:
        body = json_dumps({"type": "about:blank", "status": status, "detail": detail})
        return EarlyRefusal(status, reason, body, tuple(headers) + tuple(CORS_HEADERS.items()))

    @staticmethod
    def refusal_octets(status: int, detail: str) -> bytes:
        """A whole response for a connection refused before it was read at all."""
        body = json_dumps({"type": "about:blank", "status": status, "detail": detail}).encode()
        return (f"HTTP/1.1 {status} Service Unavailable\r\nContent-Type: {PROBLEM_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 10\r\nConnection: close\r\n"
                "\r\n").encode() + body

    def tls_on_plain_port(self, channel) -> None:
        """A client spoke TLS to the plain-HTTP port: say once what is wrong and what helps."""
        self.log_once("tls", "a TLS handshake from %s arrived on the plain-HTTP port: jmapd "
                      "speaks plain HTTP and expects a TLS proxy (Caddy or nginx) in front of "
                      "it; see the README, 'HTTPS'", channel.addr[0] if isinstance(
                          channel.addr, tuple) else "local", every_s=3600)

    def log_once(self, key: str, message: str, *args, every_s: float = 60) -> None:
        """Log a refusal, at most once a minute (every_s) per address."""
        now = time.monotonic()
        with self.lock:
            if now - self.logged.get(key, -every_s) < every_s:
                return
            if len(self.logged) > 10_000:
                self.logged.clear()
            self.logged[key] = now
        log.getChild("http").warning(message, *args)


def http_client_address(cfg: Config, peer: str, forwarded_for: str) -> tuple[str, bool]:
    """(the client's address, whether the peer is a trusted proxy). Behind one, the
    client is the rightmost X-Forwarded-For hop that is not itself a trusted proxy; the
    Unix socket counts as a trusted proxy (only a local proxy can reach it)."""
    local = peer in ("", "localhost")
    if not (local and cfg.unix_socket) and not http_is_trusted_proxy(cfg, peer):
        return peer, False
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    while hops and http_is_trusted_proxy(cfg, hops[-1]):
        hops.pop()
    return (hops[-1] if hops else peer), True


def http_is_trusted_proxy(cfg: Config, address: str) -> bool:
    return bool(cfg.trusted_proxy) and _in_networks(cfg.trusted_proxy, address)


@functools.lru_cache(maxsize=4096)
def _in_networks(networks: tuple, address: str) -> bool:
    import ipaddress  # lazy: proxies only

    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
    return any(ip in ipaddress.ip_network(net) for net in networks)


def http_problem(status: int, kind: str, detail: str, **extra) -> bottle.HTTPResponse:
    """An RFC 7807 problem document response."""
    body = {"type": kind, "status": status, "detail": detail, **extra}
    return bottle.HTTPResponse(json_dumps(body), status, {"Content-Type": PROBLEM_TYPE})


def http_json(obj, status: int = 200, **headers) -> bottle.HTTPResponse:
    headers = {"Content-Type": "application/json", "Cache-Control": NO_STORE, **headers}
    return bottle.HTTPResponse(json_dumps(obj), status, headers)


def http_user(app: App, token_param: bool = False) -> Account:
    """Authenticate the request (Basic or Bearer) or abort with 401 or 429.

    With `token_param` (EventSource: browsers cannot set Authorization on it) an app
    password may come as ?access_token= instead; jmapd never logs URLs."""
    environ = bottle.request.environ
    header = environ.get("HTTP_AUTHORIZATION", "")
    token = bottle.request.query.getunicode("access_token") if token_param else None
    if token:
        header = "Bearer " + token
    try:
        account = app.auth.check_header(header, environ.get("REMOTE_ADDR") or "local")
    except TooManyFailures as exc:
        problem = http_problem(429, "about:blank", "too many failed logins; try again later")
        problem.set_header("Retry-After", str(exc.retry_after))
        raise problem from None
    if account is None:
        detail = "the credentials were refused" if header else "authentication required"
        problem = http_problem(401, "about:blank", detail)
        problem.set_header("WWW-Authenticate", 'Basic realm="jmapd", charset="UTF-8"')
        raise problem
    return account


def http_account(app: App, user: Account, raw_account_id: str, write: bool) -> Account:
    """Find an account the user may use for an upload or download, else 404/403."""
    found = app.accessible_accounts(user).get(raw_account_id)
    if found is None:
        raise http_problem(404, "about:blank", "no such account")
    if write and found[1]:
        raise http_problem(403, "about:blank", "the account is read-only")
    return found[0]


def http_read_body(app: App, limit: int, limit_name: str) -> bytes:
    """Read the request body, refusing more than `limit` octets with a JMAP limit error."""
    environ = bottle.request.environ
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > limit:
        raise _limit_problem(limit_name, f"the request is larger than {limit} octets")
    body = environ["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise _limit_problem(limit_name, f"the request is larger than {limit} octets")
    return body


def _limit_problem(limit_name: str, detail: str) -> bottle.HTTPResponse:
    return http_problem(400, PROBLEM_PREFIX + "limit", detail, limit=limit_name)


class _Slot:
    """An InflightSlot that answers a full slot with the HTTP limit problem."""

    def __init__(self, app: App, user: Account, kind: str, limit: int):
        self.slot = app.slot(user, kind, limit)

    def __enter__(self):
        try:
            self.slot.__enter__()
        except RequestError as exc:
            raise _limit_problem(exc.limit, exc.detail) from None
        return self

    def __exit__(self, *exc):
        return self.slot.__exit__(*exc)


def http_routes(app: App) -> bottle.Bottle:
    """Build the bottle application with every route."""
    web = bottle.Bottle()
    bottle.BaseRequest.MEMFILE_MAX = max(bottle.BaseRequest.MEMFILE_MAX, app.cfg.max_size_request)

    @web.get("/")
    def front_page():
        # Someone opening the server's address in a browser learns what it is.
        base = app.base_url(bottle.request.environ)
        text = (f"This is jmapd, a JMAP server (RFC 8620, RFC 8621) for mail.\n\n"
                f"Point a JMAP client at {base}/ : it finds the session resource at "
                f"{base}/jmap/session through {base}/.well-known/jmap.\n")
        return bottle.HTTPResponse(text, 200, {"Content-Type": "text/plain; charset=utf-8"})

    @web.get("/.well-known/jmap")
    def well_known():
        # RFC 8620 §2.2: autodiscovery redirects to the session resource.
        url = app.base_url(bottle.request.environ) + "/jmap/session"
        return bottle.HTTPResponse("", 307, {"Location": url, "Cache-Control": NO_STORE})

    @web.get("/jmap/session")
    def session():
        user = http_user(app)
        environ = bottle.request.environ
        return http_json(session_resource(app, user, app.base_url(environ),
                                          bool(environ.get("jmapd.forwarded"))))

    @web.post("/jmap/api")
    @web.post("/jmap/api/")
    def api():
        return http_api(app)

    @web.get("/jmap/eventsource")
    @web.get("/jmap/eventsource/")
    def eventsource():
        return http_eventsource(app)

    @web.post("/jmap/upload/<account_id>")
    @web.post("/jmap/upload/<account_id>/")
    def upload(account_id):
        return http_upload(app, account_id)

    @web.get("/jmap/download/<account_id>/<raw_blob_id>/<name:path>")
    def download(account_id, raw_blob_id, name):
        return http_download(app, account_id, raw_blob_id, name)

    for status in (404, 405, 500):
        web.error(status)(functools.partial(_http_error_page, status))
    return web


def http_api(app: App) -> bottle.HTTPResponse:
    """Handle one JMAP API request (RFC 8620 §3)."""
    started = time.monotonic()
    request_id = next(app.request_ids)
    user = http_user(app)
    with _Slot(app, user, "maxConcurrentRequests", app.cfg.max_concurrent_requests):
        raw_body = http_read_body(app, app.cfg.max_size_request, "maxSizeRequest")
        try:
            response = engine_run(app, user, raw_body,
                                  bottle.request.environ.get("CONTENT_TYPE") or "")
        except RequestError as exc:
            log.info("api #%d %s 400 %s", request_id, user.username, exc.kind)
            return bottle.HTTPResponse(
                json_dumps(exc.as_json()), exc.status, {"Content-Type": PROBLEM_TYPE}
            )
    names = ",".join(r[0] for r in response["methodResponses"])
    log.info("api #%d %s 200 [%s] %.1f ms", request_id, user.username, names,
             (time.monotonic() - started) * 1000)
    return http_json(response)


def http_eventsource(app: App):
    """The EventSource push channel (RFC 8620 §7.3)."""
    user = http_user(app, token_param=True)
    query = bottle.request.query
    raw_types = query.getunicode("types") or "*"
    types = None if raw_types == "*" else {t for t in raw_types.split(",") if t}
    closeafter = query.getunicode("closeafter") or "no"
    ping = query.getunicode("ping") or "0"
    if closeafter not in ("state", "no") or not re.fullmatch(r"[0-9]{1,9}", ping):
        raise http_problem(400, "about:blank", "closeafter is state or no; ping is seconds")
    ping_s = min(max(int(ping), PING_MIN_S), PING_MAX_S) if int(ping) else 0
    environ = bottle.request.environ
    gone = environ.get("waitress.client_disconnected") or (lambda: False)
    address = environ.get("REMOTE_ADDR") or "local"
    ticket = app.event_streams.admit(user, gone, app.cfg.max_push_connections)
    if ticket is None:
        log.getChild("push").warning("EventSource of %s from %s refused: %d open for the user "
                                     "(--max-push-connections)", user.username, address,
                                     app.cfg.max_push_connections)
        raise _limit_problem("eventSource", f"more than {app.cfg.max_push_connections} "
                                            "EventSource streams open for this user")
    if not app.push_streams_changed(+1):  # the stream holds a worker: one more is added
        app.event_streams.leave(user, ticket)
        log.getChild("push").warning("EventSource of %s from %s refused: %d open in all "
                                     "(--max-event-streams)", user.username, address,
                                     app.cfg.max_event_streams)
        problem = http_problem(503, "about:blank", f"more than {app.cfg.max_event_streams} "
                               "EventSource streams are open; try again later")
        problem.set_header("Retry-After", "30")
        raise problem

    def stream():
        try:
            for chunk in push_event_stream(app, user, types, closeafter == "state", ping_s,
                                           environ.get("HTTP_LAST_EVENT_ID"), gone):
                yield chunk.encode()
        finally:
            app.event_streams.leave(user, ticket)
            app.push_streams_changed(-1)

    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}  # nginx: pass events on at once
    return bottle.HTTPResponse(stream(), 200, headers)


def http_upload(app: App, raw_account_id: str) -> bottle.HTTPResponse:
    """Store an uploaded blob (RFC 8620 §6.1), streaming it from waitress's spool file."""
    user = http_user(app)
    account = http_account(app, user, raw_account_id, write=True)
    limit = app.cfg.max_size_upload
    with _Slot(app, user, "maxConcurrentUpload", app.cfg.max_concurrent_upload):
        declared = bottle.request.environ.get("CONTENT_LENGTH") or ""
        if declared.isdigit() and int(declared) > limit:
            raise _limit_problem("maxSizeUpload", f"the upload is larger than {limit} octets")
        try:
            sha, size = blob_store_stream(app.cfg.data_dir, bottle.request.environ["wsgi.input"],
                                          limit)
        except BlobTooLarge:
            raise _limit_problem("maxSizeUpload", f"the upload is larger than {limit} octets")
        now = app.clock.now()
        with db.atomic("IMMEDIATE"):
            blob_add_ref(account.pk, sha, size, "upload", now, owner_pk=user.pk,
                         expires_at=now + UPLOAD_TTL_SECONDS)
    media_type = (bottle.request.environ.get("CONTENT_TYPE") or "").strip()
    if not MEDIA_TYPE_RE.match(media_type):
        media_type = "application/octet-stream"  # lenient: missing or odd Content-Type
    log.info("upload %s %s %d octets", user.username, blob_id(sha), size)
    return http_json({"accountId": account.id, "blobId": blob_id(sha), "type": media_type,
                      "size": size}, status=201)


def http_download(app: App, raw_account_id: str, raw_blob_id: str, name: str):
    """Send a blob the account may see (RFC 8620 §6.2); never compressed."""
    user = http_user(app)
    account = http_account(app, user, raw_account_id, write=False)
    sha = blob_sha_from_id(raw_blob_id)
    blob = blob_visible(account.pk, sha, app.clock.now(), user.pk) if sha else None
    if blob is None:
        part = blob_read_as(app.cfg.data_dir, account.pk, user.pk, raw_blob_id, app.clock.now())
        if part is None:
            raise http_problem(404, "about:blank", "no such blob")
        return _http_blob_response(part, len(part), name)
    return _http_blob_response(blob_open(app.cfg.data_dir, sha), blob.size, name)


def _http_blob_response(body, size: int, name: str) -> bottle.HTTPResponse:
    media_type = bottle.request.query.getunicode("type") or ""
    if not MEDIA_TYPE_RE.match(media_type):
        media_type = "application/octet-stream"
    headers = {
        "Content-Type": media_type,
        "Content-Length": str(size),
        "Content-Disposition": http_content_disposition(name),
        "Cache-Control": "private, immutable, max-age=31536000",  # RFC 8620 §6.2
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    return bottle.HTTPResponse(body, 200, headers)


def http_content_disposition(name: str) -> str:
    """attachment with an ASCII fallback and the RFC 6266/5987 UTF-8 filename."""
    from urllib.parse import quote  # lazy: downloads only

    fallback = re.sub(r'[^A-Za-z0-9 ._()+-]', "_", name)[:200] or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _http_error_page(status: int, error) -> str:
    bottle.response.content_type = PROBLEM_TYPE
    detail = {404: "no such resource", 405: "method not allowed"}.get(status, "server error")
    if status == 500:
        log.error("unhandled error: %s", getattr(error, "exception", error))
    return json_dumps({"type": "about:blank", "status": status, "detail": detail})


# =============================================================================
# 14 CLI COMMANDS AND MAIN
#    serve, user (add|passwd|del|list, token add|list|revoke), backup, restore, check.
#    Only serve, user add and restore create a data directory. Exit status: 0 ok,
#    1 the command failed, 2 bad usage or configuration.
# =============================================================================

HOUSEKEEPING_SECONDS = 3600
MIN_PASSWORD_LENGTH = 10


class CommandError(Exception):
    """A command could not do what was asked; main() prints it and exits 1."""


def cli_read_password(cfg: Config, stdin) -> str:
    """Read a new password from stdin (--password-stdin) or a terminal prompt, never argv."""
    if cfg.password_stdin:
        password = stdin.read()
        for newline in ("\r\n", "\n"):
            if password.endswith(newline):
                password = password[: -len(newline)]  # one trailing newline only
                break
    else:
        if not stdin.isatty():
            raise CommandError("no terminal to prompt on: pass the password with --password-stdin")
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password again: ")
        except (KeyboardInterrupt, EOFError):
            raise CommandError("cancelled") from None
        if again != password:
            raise CommandError("the passwords differ")
    if not password:
        raise CommandError("the password is empty")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise CommandError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} "
                           "characters (a few words are easy to type and hard to guess)")
    return password


def account_create(auth: Authenticator, username: str, password: str, now: float) -> Account:
    """Create an account with its standard Mailboxes in one transaction."""
    password_hash = auth.hash_password(password)
    with db.atomic("IMMEDIATE"):
        if Account.select().where(Account.username == username).exists():
            raise CommandError(f"user {username} already exists")
        account = Account.create(
            username=username, password_hash=password_hash, created_at=int(now)
        )
        changes = ChangeLog(account.pk, now)
        for spec in TYPES.values():  # what every account starts with: Inbox, Identity, …
            spec.create_defaults(changes, account)
        changes.flush()
    return account


def account_ensure_defaults(now: float) -> None:
    """Give existing accounts the default objects of types added since they were made."""
    specs = [spec for spec in TYPES.values()
             if type(spec).defaults_missing is not TypeSpec.defaults_missing]
    if not specs:
        return
    for account in Account.select():
        for spec in (s for s in specs if s.defaults_missing(account)):
            with db.atomic("IMMEDIATE"):
                changes = ChangeLog(account.pk, now)
                spec.create_defaults(changes, account)
                changes.flush()
            log.info("%s: default %s objects made", account.username, spec.name)


def account_has_mail(account: Account) -> bool:
    total = (
        Mailbox.select(peewee.fn.SUM(Mailbox.total_emails))
        .where((Mailbox.account_pk == account.pk) & ~Mailbox.destroyed)
        .scalar()
    )
    return bool(total)


def cmd_user(cfg: Config, stdin=None, stdout=None) -> int:
    """Run `user add|passwd|del|list` and `user token add|list|revoke`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    action = cfg.command.split(maxsplit=1)[1]
    username = None
    if action != "list":
        try:
            username = auth_normalise_username(cfg.username)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    db_open(cfg.data_dir, create=action == "add")
    clock = Clock(cfg.test_now)
    if action == "list":
        for account in Account.select().order_by(Account.username):
            print(account.username, file=stdout)
        return 0
    auth = Authenticator(cfg.test_cheap_hashing, clock)
    if action == "add":
        account_create(auth, username, cli_read_password(cfg, stdin), clock.now())
        print(f"user {username} added", file=stdout)
        return 0
    account = Account.get_or_none(Account.username == username)
    if account is None:
        raise CommandError(f"no user {username}")
    if action.startswith("token"):
        return cmd_user_token(cfg, auth, account, clock, stdout)
    if action.startswith("alias"):
        return cmd_user_alias(cfg, account, stdout)
    if action in ("share", "unshare", "shares"):
        return cmd_user_share(cfg, account, stdout)
    if action == "passwd":
        account.password_hash = auth.hash_password(cli_read_password(cfg, stdin))
        with db.atomic("IMMEDIATE"):
            account.save()
            push_forget_credential(account.pk, "password")  # the old password is revoked
        print(f"password of {username} changed", file=stdout)
        return 0
    with db.atomic("IMMEDIATE"):
        if account_has_mail(account) and not cfg.purge:
            raise CommandError(f"{username} has mail; add --purge to delete it with the account")
        Account.delete().where(Account.pk == account.pk).execute()
    print(f"user {username} deleted", file=stdout)
    return 0


def cmd_user_token(cfg: Config, auth, account: Account, clock: Clock, stdout) -> int:
    """App passwords: add prints the secret once; list shows ids; revoke deletes one."""
    action = cfg.command.split()[-1]
    if action == "add":
        token = auth_token_create(auth, account, cfg.label, clock.now())
        print(token, file=stdout)
        if sys.stderr.isatty():
            print("(shown once: enter it in the device as the password, or as a Bearer token)",
                  file=sys.stderr)
        return 0
    if action == "list":
        tokens = AppPassword.select().where(AppPassword.account_pk == account.pk)
        for token in tokens.order_by(AppPassword.created_at):
            used = utc_date(token.last_used_at) if token.last_used_at else "never"
            print(f"{token.public_id}\t{utc_date(token.created_at)}\tlast used {used}\t"
                  f"{token.label}", file=stdout)
        return 0
    token = AppPassword.get_or_none((AppPassword.account_pk == account.pk)
                                    & (AppPassword.public_id == cfg.token_id))
    deleted = 0
    if token is not None:
        with db.atomic("IMMEDIATE"):
            push_forget_credential(account.pk, f"token:{token.pk}")
            deleted = AppPassword.delete().where(AppPassword.pk == token.pk).execute()
    if not deleted:
        raise CommandError(f"{account.username} has no app password {cfg.token_id!r}")
    print(f"app password {cfg.token_id} revoked", file=stdout)
    return 0


def cmd_user_alias(cfg: Config, account: Account, stdout) -> int:
    """Aliases: other addresses whose mail (by LMTP) goes to this account."""
    action = cfg.command.split()[-1]
    if action == "list":
        for alias in Alias.select().where(Alias.account_pk == account.pk).order_by(Alias.address):
            print(alias.address, file=stdout)
        return 0
    try:
        address = auth_normalise_username(cfg.alias)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if action == "add":
        with db.atomic("IMMEDIATE"):
            taken = Account.select().where(Account.username == address).exists() or \
                Alias.select().where(Alias.address == address).exists()
            if taken:
                raise CommandError(f"{address} is already a user or an alias")
            Alias.create(address=address, account_pk=account.pk)
        print(f"{address} now delivers to {account.username}", file=stdout)
        return 0
    deleted = Alias.delete().where((Alias.address == address)
                                   & (Alias.account_pk == account.pk)).execute()
    if not deleted:
        raise CommandError(f"{account.username} has no alias {address}")
    print(f"alias {address} removed", file=stdout)
    return 0


def cmd_user_share(cfg: Config, owner: Account, stdout) -> int:
    """Share a mail account with another user, read-write or read-only, or stop sharing."""
    action = cfg.command.split()[-1]
    if action == "shares":
        rows = db.execute_sql(
            "SELECT o.username, g.username, s.read_only FROM account_share s "
            "JOIN account o ON o.pk = s.owner_pk JOIN account g ON g.pk = s.grantee_pk "
            "WHERE ? IN (s.owner_pk, s.grantee_pk) ORDER BY 1, 2", (owner.pk,))
        for owner_name, grantee_name, read_only in rows:
            mode = "read-only" if read_only else "read-write"
            print(f"{owner_name}\t{grantee_name}\t{mode}", file=stdout)
        return 0
    try:
        name = auth_normalise_username(cfg.grantee)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    grantee = Account.get_or_none(Account.username == name)
    if grantee is None:
        raise CommandError(f"no user {name}")
    if grantee.pk == owner.pk:
        raise CommandError("a user always has their own account")
    where = (AccountShare.owner_pk == owner.pk) & (AccountShare.grantee_pk == grantee.pk)
    if action == "unshare":
        if not AccountShare.delete().where(where).execute():
            raise CommandError(f"{owner.username} is not shared with {grantee.username}")
        print(f"{grantee.username} no longer has {owner.username}'s account", file=stdout)
        return 0
    AccountShare.insert(owner_pk=owner.pk, grantee_pk=grantee.pk,
                        read_only=cfg.read_only).on_conflict_replace().execute()
    mode = "read-only" if cfg.read_only else "read-write"
    print(f"{grantee.username} now has {owner.username}'s account ({mode})", file=stdout)
    return 0


EX_DATAERR, EX_NOUSER, EX_TEMPFAIL = 65, 67, 75  # sysexits.h: what MTAs understand


def cmd_deliver(cfg: Config, stdin=None) -> int:
    """Store one message from stdin; exit 0 only once it is durable (an MTA's MDA).

    Exit 67 for an unknown user; 75 for anything that may pass, so the MTA retries
    instead of bouncing. Never creates a data directory.
    """
    stdin = stdin or sys.stdin.buffer
    try:
        raw = stdin.read(cfg.max_size_upload + 1)
        db_check_data_dir(cfg.data_dir, create=False)  # missing, unreachable: said plainly
        if len(raw) > cfg.max_size_upload:
            print("jmapd: message too big", file=sys.stderr)
            return 73  # EX_CANTCREAT: a permanent refusal the MTA reports
        if not raw.strip():
            print("jmapd: the message is empty", file=sys.stderr)
            return EX_DATAERR
        if not cfg.user:
            raise DeliveryTemporaryError("--user is missing (a configuration mistake)")
        db_open(cfg.data_dir, create=False)
        found = deliver_recipient(cfg.user)
        if found is None:
            print(f"jmapd: no such user {cfg.user!r}", file=sys.stderr)
            return EX_NOUSER
        account, detail = found
        deliver_check_space(cfg.data_dir, len(raw))
        mailbox_pk = deliver_mailbox(account.pk, cfg.mailbox or detail,
                                     exact=cfg.mailbox is not None)
        deliver_message(cfg.data_dir, account.pk, [raw], [mailbox_pk], {}, time.time(),
                        incoming=True)
    except (DeliveryTemporaryError, DataDirMissing, DataDirProblem, ConfigError,
            peewee.OperationalError, OSError) as exc:
        print(f"jmapd: delivery deferred: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


def cmd_import(cfg: Config, inputs: list | None = None) -> int:
    """Import mbox files, Maildirs, .eml folders and single messages (`-`: standard input);
    resumable (what is already stored is skipped)."""
    inputs = cli_open_inputs(cfg.paths) if inputs is None else inputs
    db_open(cfg.data_dir, create=False)
    found = deliver_recipient(cfg.user or "")
    if found is None:
        raise CommandError(f"no such user {cfg.user!r}")
    account = found[0]
    try:
        mailbox_pk = deliver_mailbox(account.pk, cfg.mailbox, exact=True)
    except DeliveryTemporaryError as exc:
        raise CommandError(str(exc)) from None
    have = {sha for (sha,) in BlobRef.select(BlobRef.sha256).where(
        (BlobRef.account_pk == account.pk) & (BlobRef.kind == "email")).tuples()}
    imported = skipped = 0
    batch: list = []
    show = sys.stderr.isatty()
    for path, opened in inputs:
        for raw, flags, when in import_sources(path, opened):
            sha = hashlib.sha256(raw).hexdigest()
            if sha in have:
                skipped += 1  # resumable: a message stored before is not stored twice
                continue
            have.add(sha)
            batch.append((raw, flags, when))
            if len(batch) >= IMPORT_BATCH:
                imported += _import_batch(cfg, account, mailbox_pk, batch)
                if show:
                    print(f"\r{imported} imported, {skipped} already there", end="",
                          file=sys.stderr)
    imported += _import_batch(cfg, account, mailbox_pk, batch)
    if show:
        print(file=sys.stderr)
    if not imported and not skipped:
        raise CommandError(f"no messages found in {', '.join(cfg.paths)} (an mbox file, a "
                           "Maildir, a folder of .eml files or one message are expected)")
    print(f"imported {imported} message{'' if imported == 1 else 's'} into {account.username}; "
          f"{skipped} {'was' if skipped == 1 else 'were'} already there")
    return 0


def _import_batch(cfg: Config, account: Account, mailbox_pk: int, batch: list) -> int:
    if not batch:
        return 0
    deliver_message(cfg.data_dir, account.pk, [b[0] for b in batch], [mailbox_pk],
                    [b[1] for b in batch], time.time(), [b[2] for b in batch])
    count = len(batch)
    batch.clear()
    return count


# ---- backup, restore, check ----


def cmd_backup(cfg: Config) -> int:
    """Copy the database (SQLite online backup) and then its blobs, while serve runs."""
    import shutil  # lazy: backup only
    import sqlite3

    db_open(cfg.data_dir, create=False)
    dest = _empty_target(cfg.path)
    source = sqlite3.connect(db_path(cfg.data_dir), timeout=BUSY_TIMEOUT_MS / 1000)
    target = sqlite3.connect(db_path(dest))
    try:
        source.backup(target)  # a consistent snapshot; writers go on meanwhile (WAL)
        hashes = [row[0] for row in target.execute(  # blob files; inline ones came along
            "SELECT sha256 FROM blob WHERE sha256 NOT IN (SELECT sha256 FROM blob_data)")]
    finally:
        source.close()
        target.close()
    missing = 0
    for sha in hashes:  # blobs are written before any row names them, so all exist
        src, dst = blob_path(cfg.data_dir, sha), blob_path(dest, sha)
        if not os.path.exists(src):
            missing += 1
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
    _fsync_tree(dest)
    print(f"backup of {cfg.data_dir} in {dest}: database and {len(hashes) - missing} blob "
          "files")
    if missing:
        raise CommandError(f"{missing} blobs were missing from the data directory")
    cli_write_record(os.path.join(cfg.data_dir, BACKUP_RECORD),
                     {"at": utc_date(time.time()), "to": os.path.abspath(dest)})
    return 0


BACKUP_RECORD = "backup.json"  # in the data directory: the last backup, for `status`
STATUS_DISK_FREE = 0.05  # less free than this needs attention
STATUS_BACKUP_DAYS = 30


def cli_write_record(path: str, record: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json_dumps(record))
    os.replace(tmp, path)


def cli_read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def cmd_status(cfg: Config) -> int:
    """One screen an owner runs when something seems wrong; exit 1 if anything needs
    attention: a failing send, little disk left, a damaged store, no recent backup."""
    db_open(cfg.data_dir, create=False)
    now, lines, attention = time.time(), [f"jmapd {__version__}"], []
    for label, (text, problem) in (("data directory", _status_disk(cfg)),
                                   ("database", _status_database(cfg)),
                                   ("server", _status_server(cfg)),
                                   ("outbox", _status_outbox(now)),
                                   ("last backup", _status_backup(cfg, now))):
        lines.append(f"{label:<15} {text}")
        if problem:
            attention.append(problem)
    lines += _status_users()
    lines.append("needs attention: " + "; ".join(attention) if attention
                 else "nothing needs attention")
    print("\n".join(lines))
    return 1 if attention else 0


def _status_disk(cfg: Config) -> tuple[str, str | None]:
    import shutil  # lazy: status only

    usage = shutil.disk_usage(cfg.data_dir)
    free = usage.free / usage.total if usage.total else 1.0
    text = (f"{os.path.abspath(cfg.data_dir)} (owner {_owner_name(cfg.data_dir)}; "
            f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB)")
    return text, f"only {free:.0%} of the disk is free" if free < STATUS_DISK_FREE else None


def _status_database(cfg: Config) -> tuple[str, str | None]:
    version = db.execute_sql("SELECT MAX(version) FROM schema_version").fetchone()[0]
    blobs = [sha for (sha,) in db.execute_sql(
        "SELECT sha256 FROM blob WHERE sha256 NOT IN (SELECT sha256 FROM blob_data)")]
    missing = sum(not os.path.exists(blob_path(cfg.data_dir, sha)) for sha in blobs)
    text = f"schema {version}, {len(blobs)} blobs, {missing} missing"
    if version != schema_version():
        return text, f"schema {version}, this jmapd expects {schema_version()}"
    return text, f"{missing} blob files are missing (run check)" if missing else None


def _status_server(cfg: Config) -> tuple[str, str | None]:
    record = cli_read_record(serve_record_path(cfg))
    if record is None:
        return "not running", None
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return "not running (it did not stop cleanly)", None
    except PermissionError:
        pass  # running as another user
    return (f"running since {record['started']} (pid {record['pid']}): "
            + ", ".join(record["listeners"])), None


def _status_outbox(now: float) -> tuple[str, str | None]:
    rows = db.execute_sql("SELECT attempts, next_attempt_at, created_at FROM outbox "
                          "WHERE state IN ('queued', 'sending')").fetchall()
    if not rows:
        return "empty", None
    failing = [r for r in rows if r[0] > 0]
    held = [r for r in rows if r[0] == 0 and r[1] > now]
    oldest = utc_date(min(r[2] for r in rows))
    text = (f"{len(rows)} waiting ({len(held)} held for later, {len(failing)} failing), "
            f"oldest from {oldest}")
    return text, f"{len(failing)} messages fail to send" if failing else None


def _status_backup(cfg: Config, now: float) -> tuple[str, str | None]:
    record = cli_read_record(os.path.join(cfg.data_dir, BACKUP_RECORD))
    if record is None:
        return "never", "no backup yet (jmapd.py backup DEST)"
    age_days = (now - parse_utc_date(record["at"])) / 86400
    text = f"{record['at']} to {record['to']} ({age_days:.0f} days ago)"
    return text, f"no backup for {age_days:.0f} days" if age_days > STATUS_BACKUP_DAYS else None


def _status_users() -> list[str]:
    counts = dict(db.execute_sql("SELECT account_pk, COUNT(*) FROM email WHERE destroyed = 0 "
                                 "GROUP BY account_pk").fetchall())
    users = db.execute_sql("SELECT pk, username FROM account ORDER BY username").fetchall()
    lines = [f"{'users' if i == 0 else '':<15} {name}: {counts.get(pk, 0)} messages"
             for i, (pk, name) in enumerate(users)]
    return lines or [f"{'users':<15} none yet (jmapd.py user add ADDRESS)"]


def cmd_restore(cfg: Config) -> int:
    """Make a new data directory from a backup, then check it."""
    import shutil  # lazy: restore only

    if not os.path.isfile(db_path(cfg.path)):
        raise CommandError(f"{cfg.path!r} holds no {DB_FILE}")
    dest = _empty_target(cfg.data_dir)
    shutil.copyfile(db_path(cfg.path), db_path(dest))
    blobs = os.path.join(cfg.path, "blobs")
    if os.path.isdir(blobs):
        shutil.copytree(blobs, os.path.join(dest, "blobs"), dirs_exist_ok=True)
    _fsync_tree(dest)
    print(f"restored {cfg.path} into {dest}")
    return cmd_check(cfg)


def cmd_check(cfg: Config) -> int:
    """Report the schema version and verify every blob; exit 1 if anything is damaged."""
    db_open(cfg.data_dir, create=False)
    version = db.execute_sql("SELECT MAX(version) FROM schema_version").fetchone()[0]
    print(f"schema version {version} (this jmapd: {schema_version()})")
    problems = 0
    known = set()
    for sha, size in Blob.select(Blob.sha256, Blob.size).tuples():
        known.add(sha)
        state = _blob_file_state(cfg.data_dir, sha, size)
        if state != "ok":
            problems += 1
            print(f"blob {blob_id(sha)}: {state}")
    unreferenced = Blob.select().where(
        ~peewee.fn.EXISTS(BlobRef.select().where(BlobRef.sha256 == Blob.sha256))).count()
    orphans = [sha for sha in _blob_files(cfg.data_dir) if sha not in known]
    for sha in orphans:
        print(f"orphan file blobs/{sha[:2]}/{sha} (no database row)")
    print(f"{len(known)} blobs checked, {problems} damaged or missing, {len(orphans)} orphan "
          f"files, {unreferenced} blobs awaiting purge")
    return 1 if problems or version != schema_version() else 0


def _blob_file_state(data_dir: str, sha: str, size: int) -> str:
    digest = hashlib.sha256()
    try:
        with blob_open(data_dir, sha) as f:
            for chunk in iter(lambda: f.read(BLOB_COPY_CHUNK), b""):
                digest.update(chunk)
                size -= len(chunk)
    except FileNotFoundError:
        return "missing"
    if digest.hexdigest() != sha or size != 0:
        return "damaged (content does not match its hash)"
    return "ok"


def _blob_files(data_dir: str):
    root = os.path.join(data_dir, "blobs")
    for folder, _, files in os.walk(root):
        for name in files:
            if re.fullmatch(r"[0-9a-f]{64}", name):
                yield name


def _empty_target(path: str) -> str:
    try:
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise CommandError(f"{path!r} exists and is not an empty directory")
        os.makedirs(path, mode=0o750, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot make {path!r}: {exc.strerror}") from None
    return path


def _fsync_tree(path: str) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


# ---- serve ----


def serve_first_user(app: App) -> float:
    """On a first start at a terminal, ask for the first user; otherwise say how to add
    one. Return the seconds spent at the prompt."""
    if Account.select().exists():
        return 0.0
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        log.warning("no users yet: add one with 'jmapd.py user add ADDRESS --data-dir %s'",
                    app.cfg.data_dir)
        return 0.0
    asked = time.monotonic()
    print("No users yet. Create the first one (the username is an e-mail address).",
          file=sys.stderr)
    while True:
        try:
            username = auth_normalise_username(input("E-mail address: "))
            password = cli_read_password(dataclasses.replace(app.cfg, password_stdin=False),
                                         sys.stdin)
            account_create(app.auth, username, password, app.clock.now())
        except (KeyboardInterrupt, EOFError):
            print(file=sys.stderr)
            raise CommandError("cancelled: no user was added") from None
        except CommandError as exc:
            if str(exc) == "cancelled":
                raise CommandError("cancelled: no user was added") from None
            print(exc, file=sys.stderr)
            continue
        except ValueError as exc:
            print(exc, file=sys.stderr)
            continue
        print(f"user {username} added; log in with it from your JMAP client", file=sys.stderr)
        return time.monotonic() - asked


def serve_listen_tcp(address: tuple, what: str) -> socket.socket:
    """Bind and listen on HOST:PORT (IPv4 or IPv6); a taken address is a ConfigError."""
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    return sock


def serve_listen_unix(path: str) -> socket.socket:
    """Bind and listen on a Unix socket the local proxy or MTA reaches by group (0660)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path):
            os.unlink(path)
        sock.bind(path)
        os.chmod(path, 0o660)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def serve_bind(cfg: Config) -> list[socket.socket]:
    """Bind the HTTP listener (and the Unix socket, if asked for)."""
    sockets = [serve_listen_tcp(cfg.listen, "HTTP")]
    if cfg.unix_socket:
        sockets.append(serve_listen_unix(cfg.unix_socket))
    return sockets


def serve_bind_lmtp(cfg: Config) -> list[socket.socket]:
    """Bind the LMTP listeners asked for (--lmtp, --lmtp-socket)."""
    sockets = []
    if cfg.lmtp:
        sockets.append(serve_listen_tcp(cfg.lmtp, "LMTP"))
    if cfg.lmtp_socket:
        sockets.append(serve_listen_unix(cfg.lmtp_socket))
    return sockets


def serve_housekeeping(app: App) -> None:
    """Purge old tombstones, expired uploads and orphan blobs; checkpoint the WAL."""
    models = {spec.name: spec.model for spec in TYPES.values()}
    now = app.clock.now()
    purged = db_purge_tombstones(models, app.cfg.changes_horizon_days, now)
    refs, blobs = blob_purge(app.cfg.data_dir, now)
    db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)")
    if purged or refs or blobs:
        log.info("housekeeping: %d tombstones, %d expired uploads, %d orphan blobs removed",
                 purged, refs, blobs)


def _housekeeping_loop(app: App, stopping: threading.Event) -> None:
    while not stopping.wait(HOUSEKEEPING_SECONDS):
        try:
            serve_housekeeping(app)
        except peewee.OperationalError as exc:
            log.warning("housekeeping postponed: %s", exc)
        release_free_memory()  # after a big import or upload, the heap shrinks again


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def cmd_serve(cfg: Config) -> int:
    """Run the server until SIGTERM or SIGINT, then let in-flight requests finish."""
    import tempfile  # lazy: only serve spools uploads

    started = time.monotonic()
    serve_check_relay(cfg)
    waitress_problem_errors()
    waitress_say_close()
    db_open(cfg.data_dir, create=True)
    tempfile.tempdir = blob_tmp_dir(cfg.data_dir)  # waitress spools large bodies here
    app = make_app(cfg)
    log.debug("configuration: %s", cfg.masked())
    if cfg.listen[0] not in ("127.0.0.1", "::1", "localhost") and not cfg.public_url:
        log.warning("listening beyond loopback without --public-url; put TLS in front of jmapd")
    started += serve_first_user(app)  # the time spent at the prompt is not start-up
    account_ensure_defaults(app.clock.now())
    serve_housekeeping(app)
    stopping = threading.Event()
    server, others, listeners = serve_listeners(app)
    outbox = serve_workers(app, stopping)
    users = Account.select().count()
    log.info("jmapd %s, data in %s (%d user%s)", __version__, os.path.abspath(cfg.data_dir),
             users, "" if users == 1 else "s")
    serve_record(cfg, listeners)
    # A signal handler only records the request: taking a lock in one (Event.set) would
    # deadlock when a second signal arrives while the first handler holds it. The
    # wake-up fd makes waitress's loop notice it at once.
    asked = SimpleNamespace(stop=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: setattr(asked, "stop", True))
    log.info("jmapd %s listening on %s (ready in %.0f ms)", __version__, listeners[0][1],
             (time.monotonic() - started) * 1000)
    release_free_memory()
    sd_notify("READY=1")
    waitress_run_until(server, lambda: asked.stop,
                       on_stop=lambda: (stopping.set(), _serve_stopping(app)))
    for signum in (signal.SIGTERM, signal.SIGINT):  # more signals while we finish: ignored
        signal.signal(signum, signal.SIG_IGN)  # (at exit Python would restore the default)
    for other in others:
        other.shutdown()  # a delivery under way finishes; its MTA gets its answer
    for path in (cfg.lmtp_socket, cfg.unix_socket, serve_record_path(cfg)):
        if path and os.path.exists(path):
            os.unlink(path)
    app.bus.stop()
    outbox.stop(DRAIN_SECONDS)  # a message being sent gets its answer recorded
    db.close()
    log.info("stopped")
    return 0


def serve_listeners(app) -> tuple:
    """Bind and start every listener: (the waitress server, the other servers, and
    [(kind, where)] for the log, the record and `status`)."""
    cfg = app.cfg
    sockets = serve_bind(cfg)
    server = waitress_server(app.wsgi, sockets=sockets, threads=cfg.threads,
                             max_body=max(cfg.max_size_upload, cfg.max_size_request) + 2**20,
                             guard=ListenerGuard(app))
    app.workers = server.task_dispatcher
    host, port = sockets[0].getsockname()[:2]
    listeners = [("HTTP", f"http://{f'[{host}]' if ':' in host else host}:{port}/")]
    listeners += [("HTTP", f"unix:{cfg.unix_socket}")] if cfg.unix_socket else []
    lmtp_sockets = serve_bind_lmtp(cfg)
    others = lmtp_start(app, lmtp_sockets)
    for sock in lmtp_sockets:
        name = sock.getsockname()
        listeners.append(("LMTP", f"unix:{name}" if isinstance(name, str)
                          else "%s:%d" % name[:2]))
    if cfg.websocket:
        ws_socket = serve_listen_tcp(cfg.websocket, "WebSocket")
        app.ws_port = ws_socket.getsockname()[1]
        others += ws_start(app, [ws_socket])
        listeners.append(("JMAP over WebSocket",
                          f"ws://{cfg.websocket[0]}:{app.ws_port}{WS_PATH}"))
    for kind, where in listeners[1:]:
        log.info("%s on %s", kind, where)
    return server, others, listeners


def serve_workers(app, stopping: threading.Event):
    """Start the change bus watcher, the push sender, the outbox and housekeeping."""
    app.bus.start_watcher(app.cfg.data_dir)
    PushSender(app).start()
    outbox = OutboxWorker(app)
    if app.cfg.smtp_relay:
        outbox.start()
        log.info("sending through %s:%d (TLS: %s)", *app.cfg.smtp_relay, app.cfg.smtp_tls)
    else:
        log.info("no --smtp-relay: sending is off (EmailSubmission/set answers "
                 "forbiddenToSend)")
    threading.Thread(target=_housekeeping_loop, args=(app, stopping), daemon=True,
                     name="housekeeping").start()
    return outbox


SERVE_RECORD = "serve.json"  # in the data directory while serve runs: for `status`


def serve_record_path(cfg: Config) -> str:
    return os.path.join(cfg.data_dir, SERVE_RECORD)


def serve_record(cfg: Config, listeners: list) -> None:
    """Note who serves this data directory and where, for `jmapd.py status`."""
    record = {"pid": os.getpid(), "version": __version__, "started": utc_date(time.time()),
              "listeners": [f"{kind} {where}" for kind, where in listeners]}
    tmp = serve_record_path(cfg) + ".tmp"
    with open(tmp, "w") as f:
        f.write(json_dumps(record))
    os.replace(tmp, serve_record_path(cfg))


def serve_check_relay(cfg: Config) -> None:
    """Refuse relay settings that would send a password in clear or cannot work."""
    if (cfg.smtp_user or cfg.smtp_password_file) and not cfg.smtp_relay:
        raise ConfigError("--smtp-user/--smtp-password-file need --smtp-relay")
    if cfg.smtp_user and cfg.smtp_tls == "none":
        raise ConfigError("--smtp-user with --smtp-tls none would send the password in clear")
    if cfg.smtp_password_file:
        try:
            smtp_password(cfg)
        except OSError as exc:
            raise ConfigError(f"--smtp-password-file: {exc}") from exc


def _serve_stopping(app: App) -> None:
    log.info("stopping: finishing requests in flight")
    sd_notify("STOPPING=1")
    app.bus.stop()  # long-lived push responses end


COMMAND_HANDLERS = {"serve": cmd_serve, "backup": cmd_backup, "restore": cmd_restore,
                    "check": cmd_check, "deliver": cmd_deliver, "import": cmd_import,
                    "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run a command; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = cfg_from_args(argv)
    except ConfigError as exc:
        print(f"jmapd: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if "deliver" in argv and exc.code not in (0, None):
            return EX_TEMPFAIL  # an MTA bounces mail on any status but 75 (STYLE §6)
        raise
    if cfg.command == "serve" and globals().get("RUN_AS_SCRIPT"):
        serve_without_script_tree(argv)
    logging_setup(cfg.log_level)
    os.umask(os.umask(0o027) | 0o027)  # mail is private: no file of ours is world-readable
    try:
        if cfg.command == "import":
            inputs = cli_open_inputs(cfg.paths)  # before becoming the owner: root's files
            cli_run_as_owner(cfg)
            return cmd_import(cfg, inputs)
        cli_run_as_owner(cfg)
        return COMMAND_HANDLERS.get(cfg.command, cmd_user)(cfg)
    except (ConfigError, DataDirMissing) as exc:
        print(f"jmapd: {exc}", file=sys.stderr)
        return 2
    except (CommandError, DataDirProblem) as exc:
        print(f"jmapd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jmapd: interrupted", file=sys.stderr)
        return 130


# Modules imported where first needed (start-up stays light); loaded in advance when
# jmapd gives root up, as the interpreter may live where the new user cannot read.
LAZY_MODULES = ("binascii", "codecs", "ctypes", "email.utils", "getpass", "html",
                "http.client", "ipaddress", "pwd", "quopri", "shutil", "smtplib", "socketserver",
                "sqlite3", "ssl", "tempfile", "urllib.parse", "waitress.channel",
                "waitress.parser", "waitress.task", "waitress.utilities", "waitress.wasyncore")


def cli_run_as_owner(cfg: Config) -> None:
    """Started as root on a data directory another user owns (`sudo jmapd.py import …`),
    become that user before anything is written: a root-owned file in it would stop
    the service, which runs as the owner, from using it. Input already open stays
    readable; every module a command may use, every text codec included, is loaded
    first."""
    if os.geteuid() != 0:
        return
    try:
        stat = os.stat(cfg.data_dir)
    except OSError:
        return  # nothing there yet: what root makes now is root's (README: run as the user)
    if stat.st_uid == 0:
        return
    import importlib  # lazy: only when giving root up
    import pkgutil
    import pwd

    for name in LAZY_MODULES:
        importlib.import_module(name)
    for codec in pkgutil.iter_modules(importlib.import_module("encodings").__path__):
        try:
            importlib.import_module(f"encodings.{codec.name}")
        except (ImportError, LookupError):
            pass  # codecs of other platforms (mbcs, oem)
    try:
        entry = pwd.getpwuid(stat.st_uid)
        os.initgroups(entry.pw_name, entry.pw_gid)
        name, gid = entry.pw_name, entry.pw_gid
    except KeyError:
        os.setgroups([])
        name, gid = f"uid {stat.st_uid}", stat.st_gid
    os.setgid(gid)
    os.setuid(stat.st_uid)
    log.info("running as %s, the owner of %s", name, cfg.data_dir)


def cli_open_inputs(paths: tuple) -> list:
    """(path, open binary file or None for a folder) for `import`: files (and `-`,
    standard input) are opened now, while a root caller can still read them."""
    inputs = []
    for path in paths:
        if path == "-":
            inputs.append((path, sys.stdin.buffer))
            continue
        try:
            inputs.append((path, None if os.path.isdir(path) else open(path, "rb")))
        except OSError as exc:
            raise CommandError(f"{path}: {exc.strerror}") from None
    return inputs


RELAUNCH = ("import runpy, sys; path = sys.argv.pop(1); sys.argv[0] = path; "
            "runpy.run_path(path, {'RUN_AS_SCRIPT': False}, '__main__')")


def serve_without_script_tree(argv: list[str]) -> None:
    """Start `serve` again in this process, compiled the way imports are.

    CPython keeps a script's whole syntax tree until the script ends; for this file
    that is ~25 MB held for the server's lifetime. runpy compiles the file and frees
    the tree at once, so serve re-executes itself (same process id) through it."""
    options = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]  # -X dev, -W … stay
    os.execv(sys.executable, [sys.executable, *options, "-c", RELAUNCH,
                              os.path.abspath(__file__), *argv])


if __name__ == "__main__":
    RUN_AS_SCRIPT = globals().get("RUN_AS_SCRIPT", True)
    sys.exit(main())
