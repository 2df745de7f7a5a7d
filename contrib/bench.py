#!/usr/bin/env python3
"""Measure jmapd on this machine: start-up, idle memory, request latency, upload.

    python3 contrib/bench.py                 # every benchmark
    python3 contrib/bench.py startup echo    # some of them
    python3 contrib/bench.py upload --upload-mb 100
    python3 contrib/bench.py adversarial     # parse time of hostile message shapes

Each benchmark starts a real `jmapd.py serve` on 127.0.0.1 with a fresh data directory
(real argon2 parameters) and talks to it over HTTP with `requests`. Figures are printed
one per line as `name: value unit`. Speed is measured here, never asserted in tests.
"""

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
JMAPD = ROOT / "jmapd.py"
USER, PASSWORD = "bench@example.com", "bench password"
CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"


def proc_status(pid: int, field: str) -> int:
    """Return a /proc/PID/status memory field (VmRSS, VmHWM) in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


class Jmapd:
    """A serve subprocess on a free port with one user."""

    def __init__(self, *extra):
        self.tmp = tempfile.TemporaryDirectory(prefix="jmapd-bench-")
        self.data_dir = Path(self.tmp.name) / "data"
        subprocess.run([sys.executable, str(JMAPD), "user", "add", USER, "--password-stdin",
                        "--data-dir", str(self.data_dir)], input=PASSWORD + "\n", text=True,
                       check=True, capture_output=True)
        self.log = open(Path(self.tmp.name) / "serve.log", "w+")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(JMAPD), "serve", "--listen", "127.0.0.1:0",
             "--data-dir", str(self.data_dir), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = self._wait_listening()
        self.http = requests.Session()
        self.http.auth = (USER, PASSWORD)

    def _wait_listening(self) -> str:
        while True:
            self.log.seek(0)
            match = re.search(r"listening on (http://\S+?)/ ", self.log.read())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise SystemExit("jmapd exited:\n" + self.log.read())
            time.sleep(0.01)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()
        self.tmp.cleanup()


class KeepAlive:
    """One kept-alive http.client connection, as a client library without overhead of
    its own (requests adds ~0.7 ms a request); Basic auth on every request."""

    def __init__(self, url: str, auth: tuple | None = (USER, PASSWORD)):
        import base64
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.headers = {"Content-Type": "application/json"}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def post(self, path: str, body: dict) -> bytes:
        self.conn.request("POST", path, json.dumps(body).encode(), self.headers)
        response = self.conn.getresponse()
        data = response.read()
        assert response.status == 200, data[:300]
        return data

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        return response.read()


def timed_runs(call, requests_per_run: int, runs: int = 3) -> tuple[float, float]:
    """(median of the runs' medians, median of their 95th percentiles), in ms."""
    medians, p95s = [], []
    for _ in range(runs):
        latencies = []
        for _ in range(requests_per_run):
            started = time.perf_counter()
            call()
            latencies.append((time.perf_counter() - started) * 1000)
        latencies.sort()
        medians.append(statistics.median(latencies))
        p95s.append(latencies[int(len(latencies) * 0.95)])
    return statistics.median(medians), statistics.median(p95s)


FLOOR_APP = ("import sys, waitress\n"
             "def app(environ, start):\n"
             "    environ['wsgi.input'].read()\n"
             "    start('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', '5')])\n"
             "    return [b'hello']\n"
             "waitress.serve(app, listen=sys.argv[1], threads=8, _quiet=True)\n")


def waitress_floor(requests_per_run: int) -> float:
    """The floor under every figure: a bare waitress "hello" app over the same client."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_APP, f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = KeepAlive(f"http://127.0.0.1:{port}", auth=None)
                client.post("/", {})
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        median, _ = timed_runs(lambda: client.post("/", {"hello": "world"}), requests_per_run)
    finally:
        proc.terminate()
        proc.wait(10)
    return median


def bench_startup(args):
    """Time from exec to the first answered request, and idle RSS afterwards."""
    times, rss = [], []
    for _ in range(args.repeat):
        server = Jmapd()
        requests.get(server.url + "/.well-known/jmap", allow_redirects=False, timeout=30)
        times.append((time.monotonic() - server.started) * 1000)
        server.http.get(server.url + "/jmap/session", timeout=30)  # auth, routes, session
        time.sleep(2)
        rss.append(proc_status(server.proc.pid, "VmRSS") / 1024)
        server.stop()
    print(f"startup_to_first_response_median: {statistics.median(times):.0f} ms")
    print(f"idle_rss_after_first_request_median: {statistics.median(rss):.1f} MiB")


def bench_echo(args):
    """Median latency of Core/echo with Basic auth (credential cached after the first),
    over one kept-alive connection, beside the floor of a bare waitress app."""
    server = Jmapd()
    client = KeepAlive(server.url)
    body = {"using": [CORE], "methodCalls": [["Core/echo", {"hello": "world"}, "0"]]}
    client.post("/jmap/api/", body)
    median, p95 = timed_runs(lambda: client.post("/jmap/api/", body), args.requests)
    server.stop()
    print(f"echo_requests: {args.requests} x 3 runs over one kept-alive connection")
    print(f"echo_latency_median: {median:.2f} ms  p95: {p95:.2f} ms  "
          f"(floor, a bare waitress app: {waitress_floor(args.requests):.2f} ms)")


def bench_mailbox_get(args):
    """Median latency of Mailbox/get (all mailboxes) for the same user."""
    server = Jmapd()
    session = server.http.get(server.url + "/jmap/session", timeout=30).json()
    account = session["primaryAccounts"][MAIL]
    body = {"using": [CORE, MAIL],
            "methodCalls": [["Mailbox/get", {"accountId": account, "ids": None}, "0"]]}
    latencies = []
    for _ in range(args.requests):
        started = time.perf_counter()
        server.http.post(session["apiUrl"], json=body, timeout=30).raise_for_status()
        latencies.append((time.perf_counter() - started) * 1000)
    server.stop()
    print(f"mailbox_get_latency_median: {statistics.median(latencies):.2f} ms")


def bench_upload(args):
    """Upload throughput of a large blob and the server's peak RSS meanwhile."""
    size = args.upload_mb * 1024 * 1024
    server = Jmapd("--max-size-upload", str(size + 1))
    session = server.http.get(server.url + "/jmap/session", timeout=30).json()
    account = session["primaryAccounts"][MAIL]
    url = session["uploadUrl"].replace("{accountId}", account)
    chunk = os.urandom(1024 * 1024)
    digest = hashlib.sha256()

    def body():
        for _ in range(args.upload_mb):
            digest.update(chunk)
            yield chunk

    rss_before = proc_status(server.proc.pid, "VmHWM") / 1024
    started = time.perf_counter()
    response = server.http.post(url, data=body(), headers={"Content-Type": "application/x-bench"},
                                timeout=600)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    peak = proc_status(server.proc.pid, "VmHWM") / 1024
    server.stop()
    assert response.json()["size"] == size
    assert response.json()["blobId"].endswith(digest.hexdigest())
    print(f"upload_size: {args.upload_mb} MiB")
    print(f"upload_throughput: {args.upload_mb / elapsed:.1f} MiB/s")
    print(f"server_peak_rss_before_upload: {rss_before:.1f} MiB")
    print(f"server_peak_rss_after_upload: {peak:.1f} MiB")


def synthetic_message(n: int, rng) -> bytes:
    """A realistic-shaped message: plain, alternative, or with an attachment."""
    words = ["meeting", "tomorrow", "invoice", "garden", "Grüße", "project", "photo", "dinner",
             "report", "the", "and", "we", "could", "please", "thanks", "weekend", "café"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 1200)))
    if n % 100 == 7:
        text += " zeppelin"  # a word in 1% of the messages (search benchmark)
    head = (f"From: Sender {n % 97} <s{n % 97}@example.com>\r\nTo: me@example.com\r\n"
            f"Subject: =?UTF-8?Q?Message_{n}_=C3=BCber?= {rng.choice(words)}\r\n"
            f"Date: Tue, 1 Nov 2026 10:{n % 60:02d}:00 +0100\r\n"
            f"Message-ID: <m{n}@example.com>\r\nMIME-Version: 1.0\r\n")
    kind = n % 10
    if kind < 6:
        return (head + "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n\r\n" + text + "\r\n").encode()
    html = "<html><body><p>" + text + "</p></body></html>"
    parts = ("--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n"
             "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n")
    if kind == 9:
        import base64
        blob = base64.encodebytes(rng.randbytes(rng.randint(10_000, 80_000))).decode()
        parts += ("--b\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\n"
                  "Content-Disposition: attachment; filename=\"r.pdf\"\r\n"
                  "Content-Transfer-Encoding: base64\r\n\r\n" + blob)
    sub = "mixed" if kind == 9 else "alternative"
    return (head + f"Content-Type: multipart/{sub}; boundary=\"b\"\r\n\r\n" + parts
            + "--b--\r\n").encode()


def bench_store(args):
    """Messages/s parsed and stored through deliver_message, single commits and batched."""
    import random
    sys.path.insert(0, str(ROOT))
    import jmapd

    rng = random.Random(42)
    messages = [synthetic_message(n, rng) for n in range(args.messages)]
    print(f"store_messages: {len(messages)} ({sum(map(len, messages)) / 2**20:.1f} MiB)")
    for batch in (1, 100):
        with tempfile.TemporaryDirectory(prefix="jmapd-bench-") as tmp:
            jmapd.db_open(tmp, create=True)
            auth = jmapd.Authenticator(True, jmapd.Clock())
            account = jmapd.account_create(auth, "bench@example.com", "pw", time.time())
            inbox = jmapd.Mailbox.get((jmapd.Mailbox.account_pk == account.pk)
                                      & (jmapd.Mailbox.role == "inbox")).pk
            started = time.perf_counter()
            for i in range(0, len(messages), batch):
                jmapd.deliver_message(tmp, account.pk, messages[i:i + batch], [inbox], {},
                                      time.time())
            elapsed = time.perf_counter() - started
            jmapd.db.close()
        print(f"store_batch_{batch}: {len(messages) / elapsed:.0f} messages/s")
    print(f"store_rss_after: {proc_status(os.getpid(), 'VmRSS') / 1024:.1f} MiB")
    print(f"store_peak_rss: {proc_status(os.getpid(), 'VmHWM') / 1024:.1f} MiB")


def build_mailbox(data_dir: str, count: int, rng) -> float:
    """Fill a new account's Inbox with `count` messages in realistic threads; return msgs/s."""
    sys.path.insert(0, str(ROOT))
    import jmapd

    jmapd.db_open(data_dir, create=True)
    auth = jmapd.Authenticator(False, jmapd.Clock())
    account = jmapd.account_create(auth, USER, PASSWORD, time.time())
    inbox = jmapd.Mailbox.get((jmapd.Mailbox.account_pk == account.pk)
                              & (jmapd.Mailbox.role == "inbox")).pk
    storing, batch, stored = 0.0, [], 0  # only the storing is timed, not making messages
    base = time.time() - count * 600
    for n in range(count):
        raw = synthetic_message(n, rng)
        if n > 10 and rng.random() < 0.35:  # a reply in an earlier conversation
            parent = rng.randrange(max(0, n - 2000), n)
            raw = raw.replace(b"Subject: ", b"Subject: Re: ", 1).replace(
                b"MIME-Version", f"In-Reply-To: <m{parent}@example.com>\r\n"
                f"References: <m{parent}@example.com>\r\nMIME-Version".encode(), 1)
            raw = raw.replace(b"Subject: Re: =?UTF-8?Q?Message_" + str(n).encode(),
                              b"Subject: Re: =?UTF-8?Q?Message_" + str(parent).encode(), 1)
        batch.append(raw)
        if len(batch) == 500 or n == count - 1:
            keywords = {"$seen": True} if rng.random() < 0.7 else {}
            started = time.perf_counter()
            jmapd.deliver_message(data_dir, account.pk, batch, [inbox], keywords,
                                  base + n * 600)
            storing += time.perf_counter() - started
            stored += len(batch)
            batch = []
    rate = stored / storing
    jmapd.db.close()
    return rate


def _timed(http, url, body, runs):
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        response = http.post(url, json=body, timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200 and "error" not in response.text[:200], response.text
    latencies.sort()
    return statistics.median(latencies), latencies[int(len(latencies) * 0.95)]


def bench_mailbox(args):
    """A realistic mailbox of N messages: store rate, list view, search latency, RSS."""
    import random

    rng = random.Random(7)
    tmp = tempfile.TemporaryDirectory(prefix="jmapd-bench-")
    data_dir = args.reuse or str(Path(tmp.name) / "data")
    if not args.reuse or not Path(data_dir).exists():
        rate = build_mailbox(data_dir, args.mailbox, rng)
        print(f"mailbox_messages: {args.mailbox}")
        print(f"mailbox_store_rate: {rate:.0f} messages/s (batches of 500)")
    server = Jmapd.__new__(Jmapd)
    server.tmp, server.data_dir = tmp, Path(data_dir)
    server.log = open(Path(tmp.name) / "serve.log", "w+")
    server.started = time.monotonic()
    server.proc = subprocess.Popen(
        [sys.executable, str(JMAPD), "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
        stdout=server.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server.url = server._wait_listening()
    server.http = requests.Session()
    server.http.auth = (USER, PASSWORD)
    session = server.http.get(server.url + "/jmap/session", timeout=30).json()
    api, account = session["apiUrl"], session["primaryAccounts"][MAIL]
    inbox = next(m["id"] for m in server.http.post(api, json={
        "using": [CORE, MAIL], "methodCalls": [["Mailbox/get", {"accountId": account}, "0"]]
    }).json()["methodResponses"][0][1]["list"] if m["role"] == "inbox")
    time.sleep(1)
    print(f"server_rss_idle_after_open: {proc_status(server.proc.pid, 'VmRSS') / 1024:.1f} MiB")
    listing = {"using": [CORE, MAIL], "methodCalls": [
        ["Email/query", {"accountId": account, "filter": {"inMailbox": inbox},
                         "sort": [{"property": "receivedAt", "isAscending": False}],
                         "collapseThreads": True, "limit": 50}, "q"],
        ["Email/get", {"accountId": account, "#ids": {"resultOf": "q", "name": "Email/query",
                                                       "path": "/ids"},
                       "properties": ["threadId", "mailboxIds", "keywords", "from", "subject",
                                      "receivedAt", "preview", "hasAttachment", "size"]}, "g"]]}
    client = KeepAlive(server.url)
    path = "/jmap/api/"
    plain = {"using": [CORE, MAIL], "methodCalls": [  # the list view of issue 19, as is
        ["Email/query", {"accountId": account,
                         "sort": [{"property": "receivedAt", "isAscending": False}],
                         "limit": 50}, "q"],
        ["Email/get", {"accountId": account, "#ids": {"resultOf": "q", "name": "Email/query",
                                                       "path": "/ids"},
                       "properties": ["subject", "from", "receivedAt", "preview"]}, "g"]]}
    floor = waitress_floor(args.requests)
    for name, body in (("list_view", plain), ("client_view", listing)):
        client.post(path, body)
        median, p95 = timed_runs(lambda: client.post(path, body), args.requests)
        print(f"{name}_median: {median:.2f} ms  p95: {p95:.2f} ms  (floor {floor:.2f} ms)")
    for word, share in (("zeppelin", "1%"), ("invoice", "most")):
        search = {"using": [CORE, MAIL], "methodCalls": [
            ["Email/query", {"accountId": account, "filter": {"text": word},
                             "sort": [{"property": "receivedAt", "isAscending": False}],
                             "limit": 50}, "s"]]}
        median, p95 = timed_runs(lambda: client.post(path, search), max(20, args.requests // 5))
        print(f"search_{word}_in_{share}_median: {median:.2f} ms  p95: {p95:.2f} ms")
    print(f"server_rss_after: {proc_status(server.proc.pid, 'VmRSS') / 1024:.1f} MiB")
    bench_flag_changes(client, account, inbox, args.requests)
    print(f"server_rss_end: {proc_status(server.proc.pid, 'VmRSS') / 1024:.1f} MiB")
    bench_sizes(data_dir, args.mailbox)  # check and backup run beside the live server
    server.stop()


def bench_sizes(data_dir: str, count: int) -> None:
    """The data directory per message, and how long check and backup take over it."""
    database = Path(data_dir) / "jmapd.sqlite3"
    blobs = sum(f.stat().st_size for f in (Path(data_dir) / "blobs").rglob("*") if f.is_file())
    print(f"database_per_message: {database.stat().st_size / count / 1024:.1f} KiB "
          f"({database.stat().st_size / 2**30:.2f} GiB)")
    print(f"blob_files_per_message: {blobs / count / 1024:.1f} KiB ({blobs / 2**30:.2f} GiB)")
    for command in (["check"], ["backup", str(Path(data_dir).parent / "backup")]):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(JMAPD), *command, "--data-dir", data_dir],
                              capture_output=True, text=True)
        print(f"{command[0]}_time: {time.perf_counter() - started:.1f} s (exit {done.returncode})")


def bench_flag_changes(client, account, inbox, runs):
    """Email/changes after 100 keyword changes, as a client syncing after flagging mail."""
    def call(*calls):
        body = {"using": [CORE, MAIL], "methodCalls": list(calls)}
        return json.loads(client.post("/jmap/api/", body))["methodResponses"]

    ids = call(["Email/query", {"accountId": account, "filter": {"inMailbox": inbox},
                                "limit": 100}, "q"])[0][1]["ids"]
    state = call(["Email/get", {"accountId": account, "ids": []}, "s"])[0][1]["state"]
    for email_id in ids:
        call(["Email/set", {"accountId": account,
                            "update": {email_id: {"keywords/$flagged": True}}}, "f"])
    body = {"using": [CORE, MAIL], "methodCalls": [
        ["Email/changes", {"accountId": account, "sinceState": state}, "c"]]}
    median, p95 = timed_runs(lambda: client.post("/jmap/api/", body), runs)
    print(f"changes_after_100_flags_median: {median:.2f} ms  p95: {p95:.2f} ms")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_lmtp(args):
    """Durable LMTP deliveries per second, one connection and four in parallel."""
    import random
    import smtplib
    import threading

    rng = random.Random(3)
    messages = [synthetic_message(n, rng) for n in range(args.lmtp_messages)]
    for connections in (1, 4):
        port = free_port()
        server = Jmapd("--lmtp", f"127.0.0.1:{port}")
        share = [messages[i::connections] for i in range(connections)]

        def send(batch):
            lmtp = smtplib.LMTP("127.0.0.1", port)
            lmtp.ehlo("bench")
            for raw in batch:
                lmtp.sendmail("bench@example.org", [USER], raw)
            lmtp.quit()

        started = time.perf_counter()
        threads = [threading.Thread(target=send, args=(b,)) for b in share]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        server.stop()
        print(f"lmtp_{connections}_connection(s): {len(messages) / elapsed:.0f} messages/s")


def bench_import(args):
    """`jmapd.py import` of an mbox of N messages (batched commits)."""
    import random

    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="jmapd-bench-") as tmp:
        mbox = Path(tmp) / "big.mbox"
        with open(mbox, "wb") as f:
            for n in range(args.messages):
                raw = synthetic_message(n, rng).replace(b"\r\n", b"\n")
                raw = re.sub(rb"(?m)^(>*From )", rb">\1", raw)
                f.write(b"From bench@example.org Tue Nov  1 10:00:00 2026\n" + raw + b"\n")
        data_dir = Path(tmp) / "data"
        subprocess.run([sys.executable, str(JMAPD), "user", "add", USER, "--password-stdin",
                        "--data-dir", str(data_dir)], input=PASSWORD + "\n", text=True,
                       check=True, capture_output=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(JMAPD), "import", "--user", USER, str(mbox),
                               "--data-dir", str(data_dir)], capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        assert done.returncode == 0, done.stderr
        print(f"import_mbox_{args.messages}: {args.messages / elapsed:.0f} messages/s "
              f"({done.stdout.strip()})")


def bench_push(args):
    """Median time from an Email/import response to the StateChange on each push channel
    (EventSource, WebSocket, PushSubscription), and Core/echo latency with 20 push
    connections open against none. Needs the `websockets` package (as the tests do)."""
    import base64
    import contextlib
    import http.client
    import json
    import queue
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from websockets.sync.client import connect

    server = Jmapd("--websocket", f"127.0.0.1:{free_port()}", "--max-push-connections", "30",
                   "--test-push-allow-loopback")
    http_ = server.http
    session = http_.get(server.url + "/jmap/session", timeout=30).json()
    api, account = session["apiUrl"], session["primaryAccounts"][MAIL]
    ws_url = session["capabilities"]["urn:ietf:params:jmap:websocket"]["url"]
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    arrivals = {"eventsource": queue.Queue(), "websocket": queue.Queue(),
                "pushsubscription": queue.Queue()}

    def call(*calls):
        body = {"using": [CORE, MAIL], "methodCalls": list(calls)}
        return http_.post(api, json=body, timeout=60).json()["methodResponses"]

    def read_events(stop):
        host, port = server.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", "/jmap/eventsource/?types=Email&closeafter=no&ping=0",
                     headers={"Authorization": auth, "Accept": "text/event-stream"})
        response = conn.getresponse()
        while not stop.is_set():
            line = response.fp.readline()
            if line.startswith(b"event: state"):
                arrivals["eventsource"].put(time.perf_counter())
            if not line:
                return

    def read_websocket(ws):
        ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": ["Email"]}))
        for message in ws:
            if json.loads(message).get("@type") == "StateChange":
                arrivals["websocket"].put(time.perf_counter())

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(201)
            self.end_headers()
            if body["@type"] == "PushVerification":
                verified.put(body)
            else:
                arrivals["pushsubscription"].put(time.perf_counter())

        def log_message(self, *_):
            pass

    verified = queue.Queue()
    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    made = call(["PushSubscription/set", {"create": {"p": {
        "deviceClientId": "bench", "types": ["Email"],
        "url": f"http://127.0.0.1:{receiver.server_port}/push"}}}, "0"])[0][1]
    code = verified.get(timeout=10)
    call(["PushSubscription/set", {"update": {made["created"]["p"]["id"]: {
        "verificationCode": code["verificationCode"]}}}, "0"])
    stop = threading.Event()
    threading.Thread(target=read_events, args=(stop,), daemon=True).start()
    sockets = contextlib.ExitStack()
    ws = sockets.enter_context(connect(ws_url, subprotocols=["jmap"],
                                       additional_headers={"Authorization": auth}))
    threading.Thread(target=read_websocket, args=(ws,), daemon=True).start()
    inbox = next(m["id"] for m in call(["Mailbox/get", {"accountId": account}, "0"])[0][1][
        "list"] if m["role"] == "inbox")
    blob = http_.post(session["uploadUrl"].replace("{accountId}", account),
                      data=synthetic_message(1, __import__("random").Random(1)),
                      timeout=30).json()["blobId"]
    time.sleep(1)
    latencies = {name: [] for name in arrivals}
    for n in range(args.push_changes):
        call(["Email/import", {"accountId": account, "emails": {"i": {
            "blobId": blob, "mailboxIds": {inbox: True}}}}, "0"])
        answered = time.perf_counter()
        for name, arrived in arrivals.items():
            latencies[name].append((arrived.get(timeout=10) - answered) * 1000)
        time.sleep(0.1)  # changes a moment apart are coalesced on purpose
    for name, values in latencies.items():
        print(f"push_{name}_after_import_median: {statistics.median(values):.1f} ms "
              f"(p95 {sorted(values)[int(len(values) * 0.95)]:.1f} ms, {len(values)} changes; "
              "negative: the push came before the HTTP response)")
    echo = {"using": [CORE], "methodCalls": [["Core/echo", {"ping": True}, "e"]]}
    median, p95 = _timed(http_, api, echo, args.requests)
    print(f"echo_with_1_stream_and_1_websocket: median {median:.2f} ms  p95 {p95:.2f} ms")
    extra_streams = [threading.Thread(target=read_events, args=(stop,), daemon=True)
                     for _ in range(9)]
    for thread in extra_streams:
        thread.start()
    for _ in range(9):
        sockets.enter_context(connect(ws_url, subprotocols=["jmap"],
                                      additional_headers={"Authorization": auth}))
    time.sleep(1)
    median, p95 = _timed(http_, api, echo, args.requests)
    print(f"echo_with_10_streams_and_10_websockets: median {median:.2f} ms  p95 {p95:.2f} ms")
    print(f"server_rss_with_20_push_connections: "
          f"{proc_status(server.proc.pid, 'VmRSS') / 1024:.1f} MiB")
    stop.set()
    sockets.close()
    server.stop()


# ---- adversarial messages (issue 16): parse time by shape and size ----


def adversarial_message(shape: str, size: int, max_parts: int = 500) -> bytes:
    """A message of about `size` octets of one adversarial shape."""
    head = (b"From: Mallory <mallory@example.net>\r\nTo: me@example.com\r\n"
            b"Date: Tue, 1 Nov 2026 10:00:00 +0100\r\nMessage-ID: <adversarial@example.net>\r\n"
            b"MIME-Version: 1.0\r\n")
    text = b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    if shape == "comment_bomb":  # an HTML body of nothing but "<!--"
        line = b"<!--" * 19 + b"\r\n"
        return (head + b"Subject: comments\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                + line * (size // len(line)))
    if shape == "folded_subject":  # "Subject: x (fwd) (fwd) ...", one (fwd) per line
        return head + b"Subject: x" + b"\r\n (fwd)" * (size // 8) + b"\r\n" + text
    if shape == "deep_nesting":  # 19 levels of multipart/mixed around one text part
        line = b"x" * 76 + b"\r\n"
        entity = b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + line * (size // 78)
        for level in range(19, 0, -1):
            boundary = b"level-%02d" % level
            entity = (b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n--'
                      + boundary + b"\r\n" + entity + b"\r\n--" + boundary + b"--\r\n")
        return head + b"Subject: nested\r\n" + entity
    if shape == "many_parts":  # as many text parts as the parser allows, one multipart
        leaves = max_parts - 1
        line = b"word " * 15 + b"\r\n"
        body = line * max(1, size // leaves // len(line))
        part = b"--p\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
        return (head + b'Subject: parts\r\nContent-Type: multipart/mixed; boundary="p"\r\n\r\n'
                + part * leaves + b"--p--\r\n")
    if shape == "long_header":  # one To field of `size` octets, on one line
        count = size // len(b"user000000@example.com, ")
        addresses = b", ".join(b"user%06d@example.com" % i for i in range(count))
        return head.replace(b"To: me@example.com\r\n", b"To: " + addresses + b"\r\n") \
            + b"Subject: many recipients\r\n" + text
    raise ValueError(shape)


ADVERSARIAL_SHAPES = ("comment_bomb", "folded_subject", "deep_nesting", "many_parts",
                      "long_header")
ADVERSARIAL_CHILD = """
import json, resource, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import bench, jmapd
raw = bench.adversarial_message(sys.argv[3], int(sys.argv[4]),
                                getattr(jmapd, "MAX_MIME_PARTS", 500))
jmapd.mime_summary(jmapd.mime_email(bench.adversarial_message(sys.argv[3], 2000)))  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
root = jmapd.mime_email(raw)
summary = jmapd.mime_summary(root)
jmapd.mime_base_subject(summary["subject"])
jmapd.search_body_text(root)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "octets": len(raw),
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "before_kib": before}))
"""


def bench_adversarial(args):
    """Time storing's parse of 1 MB and 10 MB messages of each adversarial shape (issue 16):
    jmapd.mime_email, mime_summary, mime_base_subject of the subject and search_body_text,
    as storing a message does. Each case runs in a child process of its own, stopped after
    --adversarial-timeout seconds; the ratio 10 MB / 1 MB is ~10 for a linear parser."""
    for shape in ADVERSARIAL_SHAPES:
        seconds = {}
        for megabytes in (1, 10):
            try:
                done = subprocess.run(
                    [sys.executable, "-c", ADVERSARIAL_CHILD, str(ROOT / "contrib"), str(ROOT),
                     shape, str(megabytes * 1_000_000)],
                    capture_output=True, text=True, timeout=args.adversarial_timeout)
            except subprocess.TimeoutExpired:
                print(f"adversarial_{shape}_{megabytes}MB: timeout > {args.adversarial_timeout} s")
                break
            if done.returncode != 0:
                why = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                print(f"adversarial_{shape}_{megabytes}MB: failed ({why[0]})")
                break
            result = json.loads(done.stdout)
            seconds[megabytes] = result["seconds"]
            print(f"adversarial_{shape}_{megabytes}MB: {result['seconds']:.3f} s "
                  f"({result['octets'] / 1e6:.1f} MB; child peak RSS "
                  f"{result['peak_kib'] / 1024:.0f} MiB, {result['before_kib'] / 1024:.0f} MiB "
                  "before parsing)")
        if len(seconds) == 2:
            print(f"adversarial_{shape}_ratio_10MB_1MB: {seconds[10] / max(seconds[1], 1e-9):.1f}")
        else:
            print(f"adversarial_{shape}_ratio_10MB_1MB: n/a")


def load_jmapd(path):
    """Import a jmapd.py (this one, or another version to compare) under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jmapd_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_write_transactions(database, times: list) -> None:
    """Record how long each BEGIN IMMEDIATE … COMMIT holds the write lock (peewee runs
    BEGIN through database.begin(lock_type) and ends with commit() or rollback())."""
    real_begin, real_commit, real_rollback = database.begin, database.commit, database.rollback
    held = {}

    def begin(lock_type=None):
        real_begin(lock_type)
        if lock_type == "IMMEDIATE":
            held["since"] = time.perf_counter()

    def end(real):
        def finish():
            real()
            if held.get("since") is not None:
                times.append((time.perf_counter() - held.pop("since")) * 1000)
        return finish

    database.begin, database.commit, database.rollback = begin, end(real_commit), end(
        real_rollback)


def bench_locktime(args):
    """Milliseconds inside BEGIN IMMEDIATE per delivered message, as one LMTP connection
    delivers (GroupCommit, one message at a time), for this jmapd.py or --jmapd PATH
    (another version, e.g. `git show COMMIT:jmapd.py > /tmp/old.py`)."""
    import random

    jm = load_jmapd(args.jmapd or JMAPD)
    rng = random.Random(11)
    messages = [synthetic_message(n, rng) for n in range(args.lock_messages)]
    with tempfile.TemporaryDirectory(prefix="jmapd-bench-") as tmp:
        jm.db_open(tmp, create=True)
        account = jm.account_create(jm.Authenticator(True, jm.Clock()), USER, PASSWORD,
                                    time.time())
        inbox = jm.Mailbox.get((jm.Mailbox.account_pk == account.pk)
                               & (jm.Mailbox.role == "inbox")).pk
        times = []
        time_write_transactions(jm.db.obj, times)
        commit = jm.GroupCommit(tmp, jm.Clock())
        started = time.perf_counter()
        for raw in messages:
            if hasattr(jm, "Delivery"):  # analysed before the transaction (issue 18)
                facts = jm.email_analyse(raw)
                item = jm.Delivery(account.pk, raw, facts, inbox,
                                   jm.delivery_plan(tmp, account.pk, facts, time.time()))
            else:
                item = (account.pk, raw, inbox)
            assert commit.deliver([item]) == [None]
        elapsed = time.perf_counter() - started
        jm.db.close()
    times.sort()
    print(f"locktime_messages: {len(messages)} ({args.jmapd or 'this jmapd.py'})")
    print(f"locktime_median: {statistics.median(times):.3f} ms inside BEGIN IMMEDIATE")
    print(f"locktime_p99: {times[int(len(times) * 0.99)]:.3f} ms")
    print(f"locktime_total_share: {sum(times) / 1000 / elapsed:.0%} of the delivery time")


BENCHMARKS = {"startup": bench_startup, "echo": bench_echo, "mailbox_get": bench_mailbox_get,
              "upload": bench_upload, "store": bench_store, "mailbox": bench_mailbox,
              "lmtp": bench_lmtp, "import": bench_import, "push": bench_push,
              "adversarial": bench_adversarial, "locktime": bench_locktime}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], metavar="NAME",
                        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="start-ups to measure")
    parser.add_argument("--requests", type=int, default=500, help="requests per latency run")
    parser.add_argument("--upload-mb", type=int, default=100, help="upload size in MiB")
    parser.add_argument("--messages", type=int, default=10_000, help="messages to store")
    parser.add_argument("--mailbox", type=int, default=100_000, help="messages in the mailbox")
    parser.add_argument("--lmtp-messages", type=int, default=2000, help="messages sent by LMTP")
    parser.add_argument("--push-changes", type=int, default=100, help="changes timed per channel")
    parser.add_argument("--lock-messages", type=int, default=1000,
                        help="messages delivered for locktime")
    parser.add_argument("--jmapd", metavar="PATH", help="locktime: measure this jmapd.py")
    parser.add_argument("--adversarial-timeout", type=int, default=60,
                        help="seconds one adversarial parse may take before it is stopped")
    parser.add_argument("--reuse", metavar="DIR", help="build the mailbox in DIR once and "
                        "measure it again on later runs (the user is bench@example.com)")
    args = parser.parse_args()
    for name in args.names or BENCHMARKS:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    main()
