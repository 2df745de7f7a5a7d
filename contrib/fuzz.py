#!/usr/bin/env python3
"""Fuzz a real jmapd for a long while: random API requests and mutated messages (issue 16).

    python3 contrib/fuzz.py                                  # 100,000 requests, 10,000 messages
    python3 contrib/fuzz.py --requests 2000 --messages 200   # a short run
    python3 contrib/fuzz.py --seed 7 --keep                  # keep the data directory and log

Starts `jmapd.py serve` on 127.0.0.1 (HTTP and LMTP on free ports, cheap password hashing,
login limits out of the way) with a fresh data directory and two users made with the CLI.
Then, at the same time:

  * several threads send random JMAP requests as one user: Request objects valid and not,
    the methods jmapd implements with arguments of the right names and random values,
    result references between the calls, any JSON, bytes that are not JSON. Every answer
    must be 200 with well-formed methodResponses (no serverFail) or 400 with a problem
    document -- never a 5xx;
  * the messages of tests/data/mail are mutated (octets flipped, cut short, lines repeated
    or dropped, header fields added: charsets that are not text encodings, malformed RFC
    2231 parameters, odd encodings, boundaries and dates), each given a unique X-Fuzz-Id
    field on top, and delivered to the other user: half by upload + Email/import, half by
    LMTP.

Afterwards every Email/import that created an Email and every LMTP 250 must be found again
(Email/query, then Email/get of header:X-Fuzz-Id), and every one of them must be readable:
Email/get of all properties with fetchAllBodyValues, and Email/parse of the imported
blobs. The server's RSS is sampled every second (VmRSS; VmHWM for the peak). A summary is
printed; the exit status is 1 on any HTTP 5xx, malformed answer, serverFail, timeout,
Traceback in the server's log or lost message, else 0.

Only the standard library and `requests` are needed.
"""

import argparse
import json
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
JMAPD = ROOT / "jmapd.py"
CORPUS_DIR = ROOT / "tests" / "data" / "mail"
API_USER, MAIL_USER, PASSWORD = "fuzz-api@example.com", "fuzz-mail@example.com", "fuzz password"
CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
HEADER_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
FUZZ_ID_RE = re.compile(r"fz\d+-\d+")

# ---- random requests ----

METHODS = ["Core/echo", "Mailbox/get", "Mailbox/set", "Mailbox/query", "Mailbox/changes",
           "Email/get", "Email/query", "Email/set", "Email/import", "Email/parse",
           "Thread/get", "SearchSnippet/get", "Identity/get", "EmailSubmission/get",
           "VacationResponse/get", "PushSubscription/get"]
PROPERTIES = ["id", "name", "parentId", "role", "sortOrder", "totalEmails", "myRights",
              "isSubscribed", "blobId", "threadId", "mailboxIds", "keywords", "size",
              "receivedAt", "subject", "from", "to", "preview", "bodyStructure", "bodyValues",
              "textBody", "htmlBody", "attachments", "headers", "emailIds", "header:Subject",
              "header:From:asAddresses", "header:Date:asDate:all", "header:X:asBogus",
              "header:", "keywords/$seen", "email", "textSignature", "isEnabled", "partId",
              "type", "charset", "bogus"]
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
SPECIAL_INTS = [0, 1, -1, 2**31, 2**53 - 1, 2**53, 2**63, -2**53, 10**30]
ODD_TEXT = ["", " ", "\u0000", "\ud7ff", "\u00e9", "\u2028", "a" * 300, "$seen", "#k", "/", "~1",
            "*", "\U0001f600", "null", "<b>", "\\", '"']


class Requests:
    """Random request bodies (bytes) for one thread, using the real ids in `values`."""

    def __init__(self, rng: random.Random, values: dict):
        self.rng, self.values = rng, values

    def text(self, max_len=12) -> str:
        rng = self.rng
        if rng.random() < 0.3:
            return rng.choice(ODD_TEXT)
        alphabet = rng.choice(["abcXYZ019 ", "ABCDEFMPT0123456789_-", "\u00e9\u4e2d\u0000 \t\n"])
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))

    def int(self) -> int:
        return self.rng.choice(SPECIAL_INTS) if self.rng.random() < 0.3 \
            else self.rng.randint(-3, 20)

    def id(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            return rng.choice(list(self.values.values()))
        if roll < 0.6:
            return rng.choice(["#k", "#x", "M1", "E1", "T1", "B", "P_1"])
        return self.text()

    def leaf(self):
        rng = self.rng
        return rng.choice([
            None, True, False, self.int(), rng.uniform(-1e9, 1e9), self.text(), self.id(),
            rng.choice(PROPERTIES), rng.choice(DATES)])

    def value(self, depth=0):
        roll = self.rng.random()
        if depth > 3 or roll < 0.6:
            return self.leaf()
        if roll < 0.8:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self.rng.choice([self.text(), self.rng.choice(PROPERTIES)]): self.value(depth + 1)
                for _ in range(self.rng.randint(0, 4))}

    def ids(self):
        return self.rng.choice([None, [self.id() for _ in range(self.rng.randint(0, 4))],
                                self.value()])

    def filter(self, depth=0):
        rng = self.rng
        if depth < 3 and rng.random() < 0.3:
            return {"operator": rng.choice(["AND", "OR", "NOT", "XOR", "and"]),
                    "conditions": [self.filter(depth + 1) for _ in range(rng.randint(0, 4))]}
        return {rng.choice(FILTER_KEYS): rng.choice([
            self.text(), self.id(), rng.random() < 0.5, self.int(), rng.choice(DATES),
            [self.text() for _ in range(rng.randint(0, 3))], self.text(40)])
            for _ in range(rng.randint(1, 3))}

    def patch(self):
        rng = self.rng
        keys = PROPERTIES + ["keywords/$flagged", f"mailboxIds/{self.values['mailbox']}",
                             "keywords/a~1b", "name/x"]
        return {rng.choice(keys + [self.text()]): self.value() for _ in range(rng.randint(0, 4))}

    def argument(self, name):
        rng = self.rng
        if name == "accountId":
            return self.values["account"] if rng.random() < 0.8 else self.id()
        if name in ("ids", "emailIds", "blobIds", "destroy"):
            return self.ids()
        if name in ("properties", "bodyProperties"):
            return [rng.choice(PROPERTIES) for _ in range(rng.randint(0, 5))] \
                if rng.random() < 0.8 else self.value()
        if name == "filter":
            return self.filter() if rng.random() < 0.8 else self.value()
        if name == "sort":
            return [{"property": rng.choice(SORT_PROPERTIES), "isAscending": rng.random() < 0.5,
                     **({"keyword": "$seen"} if rng.random() < 0.3 else {}),
                     **({"collation": rng.choice(["i;octet", "i;bogus"])}
                        if rng.random() < 0.2 else {})}
                    for _ in range(rng.randint(0, 3))] if rng.random() < 0.8 else self.value()
        if name in ("sinceState", "ifInState"):
            return self.values["state"] if rng.random() < 0.5 else self.leaf()
        if name == "create":
            return {rng.choice(["k", "x"]): rng.choice([
                self.patch(), {"name": self.text(), "parentId": rng.choice([None, self.id()])},
                {"mailboxIds": {self.values["inbox"]: True}, "subject": self.text(),
                 "keywords": {"$seen": True}, "bodyValues": self.value(),
                 "textBody": self.value()}]) for _ in range(rng.randint(0, 3))}
        if name == "update":
            return {self.id(): self.patch() for _ in range(rng.randint(0, 2))}
        if name == "emails":
            return {rng.choice(["k", "x"]): {
                "blobId": rng.choice([self.values["blob"], self.values["part"], self.id()]),
                "mailboxIds": {self.values["inbox"]: True} if rng.random() < 0.7
                else self.value(),
                **({"keywords": self.value()} if rng.random() < 0.3 else {}),
                **({"receivedAt": rng.choice(DATES)} if rng.random() < 0.3 else {})}
                for _ in range(rng.randint(0, 2))}
        if name in ("position", "anchorOffset", "limit", "maxChanges", "maxBodyValueBytes"):
            return self.int()
        if name == "anchor":
            return self.id()
        return self.leaf()  # the booleans, and anything else

    ARGUMENTS = ["accountId", "accountId", "ids", "emailIds", "blobIds", "destroy",
                 "properties", "bodyProperties", "filter", "sort", "position", "anchor",
                 "anchorOffset", "limit", "calculateTotal", "collapseThreads", "sortAsTree",
                 "filterAsTree", "sinceState", "maxChanges", "ifInState", "create", "update",
                 "onDestroyRemoveEmails", "emails", "fetchTextBodyValues",
                 "fetchHTMLBodyValues", "fetchAllBodyValues", "maxBodyValueBytes"]

    def reference(self):
        rng = self.rng
        ref = {"resultOf": rng.choice(["c0", "c1", "c2", "c9"]),
               "name": rng.choice(METHODS + ["error"]),
               "path": rng.choice(REFERENCE_PATHS) if rng.random() < 0.8 else self.text()}
        if rng.random() < 0.1:
            ref.pop(rng.choice(list(ref)))
        return ref

    def call(self):
        rng = self.rng
        names = rng.sample(self.ARGUMENTS, rng.randint(0, 8))
        args = {name: self.argument(name) for name in names}
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            target = rng.choice(["ids", "emailIds", "blobIds", "anchor", "destroy", "filter",
                                 "accountId", "x"])
            args.pop(target, None)
            args["#" + target] = self.reference()
        if rng.random() < 0.05:
            args[rng.choice(["#", "#x", self.text()])] = self.value()
        name = rng.choice(METHODS) if rng.random() < 0.9 else \
            rng.choice([self.text(), "Email/copy", "Blob/copy", "Mailbox/"])
        call_id = rng.choice(["c0", "c1", "c2"]) if rng.random() < 0.9 else self.text()
        return [name, args, call_id]

    def using(self):
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            return [CORE, MAIL]
        if roll < 0.8:
            return [CORE, MAIL, SUBMISSION, VACATION]
        if roll < 0.95:
            return [rng.choice([CORE, MAIL, SUBMISSION, VACATION, "urn:example:bogus"])
                    for _ in range(rng.randint(0, 5))]
        return self.value()

    def body(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        request = {"using": self.using(),
                   "methodCalls": [self.call() for _ in range(rng.randint(0, 4))]}
        if rng.random() < 0.1:
            request["createdIds"] = {self.id(): self.id() for _ in range(rng.randint(0, 2))}
        raw = json.dumps(request).encode()
        if roll < 0.8:
            return raw
        if roll < 0.85:
            return raw[: rng.randint(0, len(raw))]
        if roll < 0.9:
            return json.dumps(self.value()).encode()
        if roll < 0.95:
            return json.dumps({"using": self.using(), "methodCalls": [
                self.value() for _ in range(rng.randint(0, 3))]}).encode()
        return rng.choice([
            b"", b"{}", b"[]", b"null", rng.randbytes(rng.randint(1, 40)),
            b'{"using": [], "methodCalls": [], "using": []}',
            b'{"using": [], "methodCalls": [["Core/echo", {"a": NaN}, "c"]]}',
            b'{"using": [], "methodCalls": [["Core/echo", {"a": 1e999}, "c"]]}',
            b'{"using": ["' + CORE.encode() + b'"], "methodCalls": [["Core/echo", {"a": '
            + b"1" * 5000 + b'}, "c"]]}',
            b'{"using": [], "methodCalls": [["\xff", {}, "c"]]}',
            b"[" * 2000 + b"]" * 2000])


def check_answer(response, body: bytes) -> str | None:
    """What is wrong with an API answer, or None (see the module docstring)."""
    if response.status_code >= 500:
        return f"HTTP {response.status_code}"
    if response.status_code not in (200, 400):
        return f"HTTP {response.status_code}"
    try:
        answer = response.json()
    except ValueError:
        return "not JSON"
    if response.status_code == 400:
        if not response.headers.get("Content-Type", "").startswith("application/problem+json") \
                or not isinstance(answer.get("type"), str):
            return "400 without a problem document"
        return None
    responses = answer.get("methodResponses") if isinstance(answer, dict) else None
    if not isinstance(responses, list) or not isinstance(answer.get("sessionState"), str):
        return "no methodResponses/sessionState"
    sent_ids = [call[2] for call in json.loads(body)["methodCalls"]]
    for item in responses:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], dict) and item[2] in sent_ids):
            return f"malformed methodResponse {str(item)[:100]}"
        if item[0] == "error" and not isinstance(item[1].get("type"), str):
            return "error without a type"
        if item[0] == "error" and item[1]["type"] == "serverFail":
            return "serverFail"
    return None


# ---- mutated messages ----

POISON_CHARSETS = ["idna", "rot13", "hex", "base64", "zlib", "uu", "quoted-printable",
                   "undefined", "bz2", "punycode", "utf-7", "utf-16", "unicode_escape",
                   "raw_unicode_escape", "palmos", "x-bogus", "utf-8*en", "mbcs", "oem"]
BAD_PARAMETERS = ["name*0=a; name*=b", "name*1=x", "name*=''%ZZ", "name=a; name=b",
                  "name*99999999999999999999=x", "name*0=a; name*0=b", "name*0*=''%; name*1=",
                  "name*0=a; name*4294967296=b", "name*=utf-8'en'", "name*=x", "name*-1=a",
                  "name*0*=idna''%C3%A9; name*1*=%C3", 'name="a;b;c"; name*=\'\'', "name*"]
ODD_FIELDS = ["Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable",
              "Content-Transfer-Encoding: x-uuencode", "Content-Transfer-Encoding:",
              "Content-Type: multipart/mixed; boundary=", 'Content-Type: multipart/mixed; '
              'boundary="', "Content-Type: multipart/digest; boundary=--",
              "Content-Type: message/rfc822", "Content-Type: multipart/alternative",
              "Content-Type: text/plain; charset*=''", "Content-Type: ;;;", "MIME-Version: 1.0",
              "Date: Mon, 32 Foo 99999 25:61:61 +9999", "From: <<<@>>>, (((, \"\"\"",
              "Subject: =?utf-8?q?=FF?=", "Content-Type: text/plain; charset=utf-8\r\n\tname=x",
              "X-Fuzz: \x00\x7f\u00e9", "Received: ; ; ; x"]


def random_field(rng: random.Random) -> str:
    charset, params = rng.choice(POISON_CHARSETS), rng.choice(BAD_PARAMETERS)
    return rng.choice([
        f"Content-Type: text/plain; charset={charset}",
        f'Content-Type: text/html; charset="{charset}"',
        f"Subject: =?{charset}?q?caf=C3=A9?= =?{charset}?b?YWJj?=",
        f"From: =?{charset}?q?Al=E9?= <alice@example.org>",
        f"Content-Disposition: attachment; filename*={charset}''caf%C3%A9",
        f"Content-Type: text/plain; name*0*={charset}''a%FF; name*1=b",
        f"Content-Type: text/plain; charset=utf-8; {params}",
        "Content-Disposition: attachment; " + params.replace("name", "filename"),
        rng.choice(ODD_FIELDS), rng.choice(ODD_FIELDS),
        f"{rng.choice(['Subject', 'From', 'To', 'Date', 'Content-Type', 'X-Any'])}: "
        + "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x2fff)]))
                  for _ in range(rng.randint(0, 30)))])


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """One to four random mutations of a message."""
    for _ in range(rng.randint(1, 4)):
        lines = raw.split(b"\n")
        kind = rng.choice(["flip", "truncate", "duplicate", "remove", "insert", "header",
                           "header"])
        if kind == "flip" and raw:
            at = rng.randrange(len(raw))
            raw = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:]
        elif kind == "truncate":
            raw = raw[: rng.randint(0, len(raw))]
        elif kind == "duplicate":
            at = rng.randrange(len(lines))
            raw = b"\n".join(lines[:at + 1] + lines[at:])
        elif kind == "remove" and len(lines) > 1:
            at = rng.randrange(len(lines))
            raw = b"\n".join(lines[:at] + lines[at + 1:])
        elif kind == "insert":
            at = rng.randint(0, len(lines))
            raw = b"\n".join(lines[:at] + [random_field(rng).encode("utf-8", "surrogatepass")]
                             + lines[at:])
        elif kind == "header":
            blank = next((i for i, line in enumerate(lines) if not line.strip(b"\r")),
                         len(lines))
            raw = b"\n".join(lines[:blank] + [random_field(rng).encode("utf-8", "surrogatepass")]
                             + lines[blank:])
    return raw


# ---- the server ----


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in KiB (0 once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


class Server:
    def __init__(self, data_dir: Path, log_path: Path):
        self.data_dir, self.log_path = data_dir, log_path
        for user in (API_USER, MAIL_USER):
            self.cli("user", "add", user, "--password-stdin", input_text=PASSWORD + "\n")
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(JMAPD), "serve", "--listen", "127.0.0.1:0", "--lmtp",
             "127.0.0.1:0", "--data-dir", str(data_dir), "--test-cheap-hashing",
             "--max-login-failures-per-address", "1000000",
             "--max-login-failures-per-user", "1000000"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log_path.read_text()
            http = re.search(r"listening on (http://\S+?)/? ", text + " ")
            lmtp = re.search(r"LMTP on 127\.0\.0\.1:(\d+)", text)
            if http and lmtp:
                self.url, self.lmtp_port = http.group(1).rstrip("/"), int(lmtp.group(1))
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"jmapd exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise SystemExit("jmapd did not start:\n" + log_path.read_text())

    def cli(self, *args, input_text=None):
        done = subprocess.run(
            [sys.executable, str(JMAPD), *args, "--data-dir", str(self.data_dir),
             "--test-cheap-hashing"], input=input_text, capture_output=True, text=True,
            timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"jmapd {' '.join(args)} failed: {done.stderr}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Client:
    def __init__(self, url: str, user: str):
        self.http = requests.Session()
        self.http.auth = (user, PASSWORD)
        self.session = self.http.get(url + "/jmap/session", timeout=60).json()
        self.api = self.session["apiUrl"]
        self.account = self.session["primaryAccounts"][MAIL]
        self.limits = self.session["capabilities"][CORE]

    def calls(self, *calls) -> list:
        body = {"using": [CORE, MAIL], "methodCalls": [list(c) for c in calls]}
        r = self.http.post(self.api, json=body, timeout=120)
        r.raise_for_status()
        return r.json()["methodResponses"]

    def ok(self, name: str, args: dict) -> dict:
        response = self.calls([name, {"accountId": self.account, **args}, "0"])[0]
        if response[0] != name:
            raise RuntimeError(f"{name} failed: {response}")
        return response[1]

    def upload(self, data: bytes) -> requests.Response:
        url = self.session["uploadUrl"].replace("{accountId}", self.account)
        return self.http.post(url, data=data, headers={"Content-Type": "message/rfc822"},
                              timeout=120)

    def inbox(self) -> str:
        return next(m["id"] for m in self.ok("Mailbox/get", {"ids": None})["list"]
                    if m["role"] == "inbox")


# ---- the run ----


class Tally:
    """Counters shared by the threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.examples: dict = {}  # problem -> first example
        self.imported: dict = {}  # fuzz id -> (Email id, blob id)
        self.lmtp_ok: list = []  # fuzz ids answered 250

    def count(self, key: str, n: int = 1):
        with self.lock:
            self.counts[key] += n

    def problem(self, what: str, example):
        with self.lock:
            self.counts["problem: " + what] += 1
            self.examples.setdefault(what, example)


def send_requests(server: Server, values: dict, count: int, seed: int, tally: Tally):
    client = Client(server.url, API_USER)
    generator = Requests(random.Random(seed), values)
    for _ in range(count):
        body = generator.body()
        try:
            response = client.http.post(client.api, data=body, timeout=60,
                                        headers={"Content-Type": "application/json"})
        except requests.RequestException as exc:
            tally.problem(f"request failed: {type(exc).__name__}", body[:2000])
            continue
        tally.count(f"status {response.status_code}")
        if response.status_code >= 500:
            tally.count("http 5xx")
        wrong = check_answer(response, body)
        if wrong:
            tally.problem(wrong, body[:2000])


def import_messages(server: Server, messages: list, tally: Tally):
    client = Client(server.url, MAIL_USER)
    inbox = client.inbox()
    for fuzz_id, raw in messages:
        try:
            uploaded = client.upload(raw)
            if uploaded.status_code >= 500:
                tally.count("http 5xx")
            if uploaded.status_code not in (200, 201):
                tally.problem(f"upload HTTP {uploaded.status_code}", raw[:2000])
                continue
            blob = uploaded.json()["blobId"]
            r = client.http.post(client.api, timeout=120, json={
                "using": [CORE, MAIL], "methodCalls": [["Email/import", {
                    "accountId": client.account, "emails": {"m": {
                        "blobId": blob, "mailboxIds": {inbox: True}}}}, "0"]]})
        except requests.RequestException as exc:
            tally.problem(f"import failed: {type(exc).__name__}", raw[:2000])
            continue
        if r.status_code >= 500:
            tally.count("http 5xx")
        if r.status_code != 200:
            tally.problem(f"Email/import HTTP {r.status_code}", raw[:2000])
            continue
        name, args, _ = r.json()["methodResponses"][0]
        if name == "error":
            tally.problem(f"Email/import {args.get('type')}", raw[:2000])
        elif args.get("created"):
            with tally.lock:
                tally.imported[fuzz_id] = (args["created"]["m"]["id"], blob)
        else:
            error = args["notCreated"]["m"]
            if error.get("type") == "invalidEmail" and not HEADER_START.match(raw):
                tally.count("import invalidEmail (no header)")
            else:
                tally.problem(f"Email/import notCreated {error.get('type')}", raw[:2000])


def lmtp_messages(server: Server, messages: list, tally: Tally):
    lmtp = None
    for fuzz_id, raw in messages:
        try:
            if lmtp is None:
                lmtp = smtplib.LMTP("127.0.0.1", server.lmtp_port, timeout=120)
                lmtp.ehlo("fuzz.example.net")
            lmtp.sendmail("fuzzer@example.net", [MAIL_USER], raw)
            with tally.lock:
                tally.lmtp_ok.append(fuzz_id)
        except smtplib.SMTPResponseException as exc:
            tally.count(f"lmtp {exc.smtp_code}")
            if exc.smtp_code >= 400:
                tally.problem(f"LMTP {exc.smtp_code} {exc.smtp_error[:60]!r}", raw[:2000])
            lmtp = _reset(lmtp)
        except (smtplib.SMTPException, OSError) as exc:
            tally.problem(f"LMTP failed: {type(exc).__name__}", raw[:2000])
            lmtp = _reset(lmtp)


def _reset(lmtp):
    """After a refusal, RSET (or start over on a new connection)."""
    try:
        lmtp.rset()
        return lmtp
    except (smtplib.SMTPException, OSError):
        try:
            lmtp.close()
        except OSError:
            pass
        return None


def read_back(server: Server, tally: Tally) -> dict:
    """Find every delivered message again and read each every way; return the counts."""
    client = Client(server.url, MAIL_USER)
    page = min(int(client.limits.get("maxObjectsInGet", 500)), 200)
    ids, position = [], 0
    while True:
        got = client.ok("Email/query", {"position": position, "limit": 1000,
                                        "calculateTotal": True})
        ids += got["ids"]
        position += len(got["ids"])
        if not got["ids"] or position >= got["total"]:
            break
    found = {}
    for start in range(0, len(ids), page):
        for email in client.ok("Email/get", {"ids": ids[start:start + page],
                                             "properties": ["id", "header:X-Fuzz-Id"]})["list"]:
            match = FUZZ_ID_RE.search(email["header:X-Fuzz-Id"] or "")
            if match:
                found[match.group(0)] = email["id"]
    everything = ["id", "blobId", "threadId", "mailboxIds", "keywords", "size", "receivedAt",
                  "messageId", "inReplyTo", "references", "sender", "from", "to", "cc", "bcc",
                  "replyTo", "subject", "sentAt", "hasAttachment", "preview", "bodyValues",
                  "textBody", "htmlBody", "attachments", "bodyStructure", "headers"]
    for start in range(0, len(ids), 20):
        batch = ids[start:start + 20]
        answer = client.calls(["Email/get", {"accountId": client.account, "ids": batch,
                                             "properties": everything,
                                             "fetchAllBodyValues": True}, "0"])[0]
        if answer[0] == "error":
            tally.problem(f"Email/get of delivered mail: {answer[1].get('type')}", batch)
        elif answer[1]["notFound"]:
            tally.problem("Email/get: notFound", answer[1]["notFound"])
    blobs = [blob for _, blob in tally.imported.values()]
    for start in range(0, len(blobs), 20):
        answer = client.calls(["Email/parse", {"accountId": client.account,
                                               "blobIds": blobs[start:start + 20],
                                               "fetchAllBodyValues": True}, "0"])[0]
        if answer[0] == "error":
            tally.problem(f"Email/parse of imported blobs: {answer[1].get('type')}",
                          blobs[start:start + 20])
        elif answer[1]["notParsable"] or answer[1]["notFound"]:
            tally.problem("Email/parse: notParsable", answer[1]["notParsable"])
    return {"total": len(ids), "found": found}


def sample_rss(pid: int, samples: list, stop: threading.Event):
    while not stop.is_set():
        value = proc_status(pid, "VmRSS")
        if value:
            samples.append(value)
        stop.wait(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="API requests to send")
    parser.add_argument("--messages", type=int, default=10_000,
                        help="mutated messages to deliver (half Email/import, half LMTP)")
    parser.add_argument("--seed", type=int, default=1,
                        help="random seed (same seed, same inputs)")
    parser.add_argument("--threads", type=int, default=4, help="threads sending API requests")
    parser.add_argument("--data-dir", type=Path,
                        help="data directory to use (new; kept); default: a temporary one")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary data directory and the server's log")
    args = parser.parse_args()

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="jmapd-fuzz-"))
    data_dir = args.data_dir or tmp / "data"
    server = Server(data_dir, tmp / "serve.log")
    tally, samples, stop = Tally(), [], threading.Event()
    try:
        rss_start = proc_status(server.proc.pid, "VmRSS")
        threading.Thread(target=sample_rss, args=(server.proc.pid, samples, stop),
                         daemon=True).start()
        values = setup_values(server)
        rng = random.Random(args.seed)
        corpus = [p.read_bytes() for p in sorted(CORPUS_DIR.glob("*.eml"))]
        messages = [(f"fz{args.seed}-{n}",
                     f"X-Fuzz-Id: fz{args.seed}-{n}\r\n".encode() + mutate(rng, rng.choice(corpus)))
                    for n in range(args.messages)]
        workers = [threading.Thread(target=send_requests, args=(
            server, values, args.requests // args.threads + (i < args.requests % args.threads),
            args.seed * 1000 + i, tally)) for i in range(args.threads)]
        workers += [threading.Thread(target=import_messages, args=(server, messages[0::2], tally)),
                    threading.Thread(target=lmtp_messages, args=(server, messages[1::2], tally))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        back = read_back(server, tally)
        rss_end = proc_status(server.proc.pid, "VmRSS")
        rss_hwm = proc_status(server.proc.pid, "VmHWM")
    finally:
        stop.set()
        server.stop()
    log = (tmp / "serve.log").read_text(errors="replace")
    tracebacks = log.count("Traceback")
    imported_back = sum(fuzz_id in back["found"] for fuzz_id in tally.imported)
    lmtp_back = sum(fuzz_id in back["found"] for fuzz_id in tally.lmtp_ok)
    lost = (len(tally.imported) - imported_back) + (len(tally.lmtp_ok) - lmtp_back)
    counts = tally.counts
    problems = {k: v for k, v in counts.items() if k.startswith("problem: ")}
    statuses = ", ".join(f"{k.split()[1]}: {v}" for k, v in sorted(counts.items())
                         if k.startswith("status "))
    print(f"requests: {args.requests} ({statuses})")
    print(f"http_5xx: {counts['http 5xx']}")
    print(f"tracebacks_in_log: {tracebacks}")
    refused = ", ".join(f"{k[5:]}: {v}" for k, v in sorted(counts.items())
                        if k.startswith("lmtp "))
    print(f"lmtp_250_retrievable: {lmtp_back}/{len(tally.lmtp_ok)} "
          f"(of {len(messages[1::2])} sent; refused: {refused or 'none'})")
    print(f"imports_retrievable: {imported_back}/{len(tally.imported)} "
          f"(of {len(messages[0::2])} sent; {counts['import invalidEmail (no header)']} "
          "invalidEmail without a header)")
    print(f"emails_in_account: {back['total']}")
    for what, n in sorted(problems.items(), key=lambda kv: -kv[1]):
        print(f"{what}: {n}   e.g. {tally.examples[what[9:]]!r:.300}")
    print(f"rss: start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB, peak "
          f"{max(samples + [rss_hwm]) / 1024:.1f} MiB (VmHWM {rss_hwm / 1024:.1f} MiB)")
    if samples:  # does it level off? ten points spread over the run
        points = [samples[min(len(samples) - 1, i * len(samples) // 10)] for i in range(10)]
        print("rss_curve_mib: " + " ".join(f"{p / 1024:.0f}" for p in points + [samples[-1]]))
    print(f"elapsed: {time.monotonic() - started:.1f} s")
    if args.keep:
        print(f"kept: data {data_dir}, log {tmp / 'serve.log'}")
    elif args.data_dir:
        print(f"kept: data {data_dir}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)  # the log (and the data, unless --data-dir)
    failed = counts["http 5xx"] or tracebacks or lost or problems
    print("result:", "FAILED" if failed else "OK")
    return 1 if failed else 0


def setup_values(server: Server) -> dict:
    """Real ids in the API user's account for the requests to name."""
    client = Client(server.url, API_USER)
    inbox = client.inbox()
    raws = [(CORPUS_DIR / name).read_bytes() for name in ("01-plain-ascii.eml",
                                                          "04-mixed-attachments.eml")]
    blobs = [client.upload(raw).json()["blobId"] for raw in raws]
    made = client.ok("Email/import", {"emails": {
        "a": {"blobId": blobs[0], "mailboxIds": {inbox: True}},
        "b": {"blobId": blobs[1], "mailboxIds": {inbox: True}, "keywords": {"$seen": True}}}})
    folder = client.ok("Mailbox/set", {"create": {"f": {"name": "Fuzz"}}})["created"]["f"]["id"]
    first = made["created"]["a"]
    return {"account": client.account, "inbox": inbox, "mailbox": folder, "email": first["id"],
            "email2": made["created"]["b"]["id"], "thread": first["threadId"],
            "blob": blobs[0], "blob2": blobs[1], "state": made["newState"],
            "part": first["blobId"].replace("B", "P", 1) + "_1"}


if __name__ == "__main__":
    sys.exit(main())
