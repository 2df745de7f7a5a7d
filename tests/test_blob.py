"""Binary data: upload, download and Blob/copy (RFC 8620 §6, §6.1, §6.2, §6.3; limits §2).

Everything goes over HTTP with `requests`, through the session's uploadUrl and
downloadUrl templates filled as a client would (RFC 6570 level 1: raw or percent-encoded).
Limits get a test just under and one just over them; servers with special options
(small or large upload limits, one upload at a time, a fixed clock) are started here.
"""

import base64
import concurrent.futures
import hashlib
import importlib.metadata
import os
import re
import socket
import sqlite3
from urllib.parse import quote, unquote, urlsplit

import pytest
import requests

from conftest import CORE, MAIL, PASSWORD, Client, Server, add_user, run_cli

PROBLEM = "application/problem+json"
LIMIT = "urn:ietf:params:jmap:error:limit"
WAITRESS_MAJOR = int(importlib.metadata.version("waitress").split(".")[0])
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # RFC 8620 §1.2


# ---- helpers: what any client does with the session's templates ----


def fill(template, encode, **variables):
    """Expand a level-1 URI template: values raw, or percent-encoded as RFC 6570 says."""
    for name, value in variables.items():
        template = template.replace("{" + name + "}", quote(value, safe="") if encode else value)
    assert "{" not in template, template
    return template


def upload_url(client, account_id=None):
    return fill(client.session["uploadUrl"], True, accountId=account_id or client.account_id)


def download_url(
    client,
    blob_id,
    name="file.bin",
    media_type="application/octet-stream",
    account_id=None,
    encode=True,
):
    return fill(
        client.session["downloadUrl"],
        encode,
        accountId=account_id or client.account_id,
        blobId=blob_id,
        name=name,
        type=media_type,
    )


def upload(client, body, media_type="application/octet-stream", account_id=None, **kwargs):
    headers = {} if media_type is None else {"Content-Type": media_type}
    return client.http.post(
        upload_url(client, account_id), data=body, headers=headers, timeout=120, **kwargs
    )


def uploaded(client, body, media_type="application/octet-stream"):
    """Upload that must succeed; return its JSON answer."""
    r = upload(client, body, media_type)
    assert 200 <= r.status_code < 300, r.text
    return r.json()


def content_blob_id(data):
    """jmapd names blobs by content (section 4.4): the id an upload of `data` would get.

    Lets a test name a blob that must never have been stored; the assumption itself is
    checked by test_blob_upload_identical_content_same_blob_id.
    """
    return "B" + hashlib.sha256(data).hexdigest()


def assert_problem(r, status, kind=None):
    """An RFC 7807 problem document (RFC 8620 §6.1/§6.2 SHOULD) with this status."""
    assert r.status_code == status, (r.status_code, r.headers, r.text)
    assert r.headers["Content-Type"].split(";")[0].strip() == PROBLEM, r.headers
    problem = r.json()
    assert problem["status"] == status
    if kind is not None:
        assert problem["type"] == kind, problem
    return problem


def disposition_filename(header):
    """The RFC 6266 filename* (RFC 8187 ext-value) of a Content-Disposition, decoded."""
    match = re.search(r"filename\*\s*=\s*UTF-8''([^;\s]+)", header, re.IGNORECASE)
    assert match, header
    return unquote(match.group(1), encoding="utf-8", errors="strict")


def pattern(size, seed=b""):
    """`size` bytes that are neither constant nor compressible in any useful way."""
    out, counter = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def chunks(data, size=4096):
    """A generator body: requests sends it with Transfer-Encoding: chunked."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def vm_hwm_bytes(pid):
    """Peak resident set size of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                value, unit = line.split()[1:3]
                assert unit == "kB"
                return int(value) * 1024
    raise AssertionError("no VmHWM line")


@pytest.fixture
def own_server(tmp_path):
    """Start a server of one's own with extra options: own_server(*options) -> (Server, Client)."""
    started = []

    def start(*options, username="owner@example.com"):
        data_dir = tmp_path / f"data{len(started)}"
        add_user(data_dir, username)
        srv = Server(data_dir, *options).start()
        started.append(srv)
        return srv, Client(srv.url, username)

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def owner(server):
    """This module's user on the shared server (one user: adding one costs a CLI run)."""
    add_user(server.data_dir, "blob-owner@example.com")
    return Client(server.url, "blob-owner@example.com")


@pytest.fixture(scope="module")
def stranger(server):
    """A second, unrelated user of the shared server."""
    add_user(server.data_dir, "blob-stranger@example.com")
    return Client(server.url, "blob-stranger@example.com")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """maxSizeUpload 1000 (and maxSizeRequest 1000, so waitress's own body cap is ~1 MiB)."""
    data_dir = tmp_path_factory.mktemp("small") / "data"
    add_user(data_dir, "small@example.com")
    srv = Server(data_dir, "--max-size-upload", "1000", "--max-size-request", "1000").start()
    yield srv
    srv.stop()


@pytest.fixture
def small_client(small_server):
    return Client(small_server.url, "small@example.com")


# ---- upload and download (§6.1, §6.2) ----


@pytest.mark.parametrize("media_type", ["application/pdf", "text/plain; charset=utf-8"])
def test_blob_upload_download_round_trip(owner, media_type):
    body = pattern(5000, b"round trip") + bytes(range(256))
    r = upload(owner, body, media_type)
    assert 200 <= r.status_code < 300, r.text
    assert r.headers["Content-Type"].split(";")[0] == "application/json"
    answer = r.json()
    assert set(answer) == {"accountId", "blobId", "type", "size"}
    assert answer["accountId"] == owner.account_id
    assert ID_RE.match(answer["blobId"])
    assert answer["type"] == media_type
    assert answer["size"] == len(body)

    d = owner.http.get(
        download_url(owner, answer["blobId"], "report.pdf", media_type),
        headers={"Accept-Encoding": "gzip, deflate, br"},
        timeout=30,
    )
    assert d.status_code == 200, d.text
    assert d.content == body
    assert d.headers["Content-Type"] == media_type
    assert "Content-Encoding" not in d.headers  # the blob's octets, never compressed
    assert int(d.headers["Content-Length"]) == len(body)
    disposition = d.headers["Content-Disposition"]
    assert disposition_filename(disposition) == "report.pdf"
    cache = {
        token.strip().split("=")[0].lower() for token in d.headers["Cache-Control"].split(",")
    }
    assert {"private", "immutable"} <= cache


@pytest.mark.parametrize("encode", [True, False], ids=["percent-encoded", "raw"])
def test_blob_download_utf8_name(owner, encode):
    name = "Grüße 📎.txt"
    blob = uploaded(owner, "Grüße\n".encode(), "text/plain")
    d = owner.http.get(
        download_url(owner, blob["blobId"], name, "text/plain", encode=encode), timeout=30
    )
    assert d.status_code == 200, d.text
    assert d.content == "Grüße\n".encode()
    assert disposition_filename(d.headers["Content-Disposition"]) == name


def test_blob_download_head(owner):
    body = pattern(3000, b"head")
    blob = uploaded(owner, body)
    url = download_url(owner, blob["blobId"], "x.dat", "application/x-thing")
    # a connection of its own: see test_blob_download_head_keeps_connection
    h = requests.head(url, auth=owner.http.auth, timeout=30)
    assert h.status_code == 200
    assert h.content == b""
    assert int(h.headers["Content-Length"]) == len(body)
    assert h.headers["Content-Type"] == "application/x-thing"
    assert disposition_filename(h.headers["Content-Disposition"]) == "x.dat"


def test_blob_download_head_keeps_connection(owner):
    """HTTP/1.1 persistence (RFC 9112 §9.3): after a HEAD the connection is still usable.

    A HEAD and a GET are pipelined on one socket: both must be answered, unless the
    first answer announced `Connection: close`.
    """
    blob = uploaded(owner, b"persistent")
    url = urlsplit(download_url(owner, blob["blobId"], "p.txt", "text/plain"))
    target = f"{url.path}?{url.query}"
    token = base64.b64encode(f"{owner.username}:{PASSWORD}".encode()).decode()
    common = f"Host: {url.netloc}\r\nAuthorization: Basic {token}\r\n"
    wire = (
        f"HEAD {target} HTTP/1.1\r\n{common}\r\n"
        f"GET {target} HTTP/1.1\r\n{common}Connection: close\r\n\r\n"
    ).encode()
    received = b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(wire)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    first_head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert first_head.startswith(b"http/1.1 200"), received
    if b"\r\nconnection: close" not in first_head:
        assert received.count(b"HTTP/1.1 200") == 2, received
        assert received.endswith(b"\r\n\r\npersistent"), received


def test_blob_upload_identical_content_same_blob_id(owner):
    body = pattern(2048, b"twice")
    first = uploaded(owner, body, "text/plain")
    second = uploaded(owner, body, "image/png")  # the blobId names the octets, not the type
    assert second["blobId"] == first["blobId"]
    assert first["blobId"] == content_blob_id(body)
    assert second["type"] == "image/png"
    other = uploaded(owner, body + b"!")
    assert other["blobId"] != first["blobId"]


def test_blob_upload_empty_body(owner):
    blob = uploaded(owner, b"", "text/plain")
    assert blob["size"] == 0
    d = owner.http.get(download_url(owner, blob["blobId"], "empty.txt", "text/plain"), timeout=30)
    assert d.status_code == 200
    assert d.content == b""
    assert d.headers["Content-Length"] == "0"


@pytest.mark.parametrize("media_type", [None, ""], ids=["missing", "empty"])
def test_blob_upload_without_content_type(owner, media_type):
    r = upload(owner, b"no type given", media_type)
    assert "Content-Type" not in r.request.headers or r.request.headers["Content-Type"] == ""
    assert 200 <= r.status_code < 300, r.text
    assert r.json()["type"] == "application/octet-stream"
    assert r.json()["size"] == len(b"no type given")


def test_blob_upload_large_streamed(own_server):
    """64 MiB sent chunked: stored intact, and the server never holds it in memory."""
    srv, cl = own_server("--max-size-upload", "100000000")
    size, piece = 64 * 2**20, 2**20
    sent = hashlib.sha256()

    def body():
        for i in range(size // piece):
            chunk = os.urandom(piece)
            sent.update(chunk)
            yield chunk

    assert cl.session["capabilities"][CORE]["maxSizeUpload"] == 100_000_000
    baseline = vm_hwm_bytes(srv.proc.pid)
    r = upload(cl, body(), "application/x-large")
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert 200 <= r.status_code < 300, r.text
    assert r.json()["size"] == size

    got, length = hashlib.sha256(), 0
    with cl.http.get(
        download_url(cl, r.json()["blobId"], "large.bin"), stream=True, timeout=120
    ) as d:
        assert d.status_code == 200
        for chunk in d.iter_content(piece):
            got.update(chunk)
            length += len(chunk)
    assert length == size
    assert got.hexdigest() == sent.hexdigest()
    # Peak RSS over the whole upload and download grew by far less than the blob:
    # it was spooled to disk and streamed back, never read into memory whole.
    growth = vm_hwm_bytes(srv.proc.pid) - baseline
    assert growth < size // 2, f"server peak RSS grew by {growth} bytes"


# ---- maxSizeUpload (§2, §3.6.1, §6.1) ----


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [999, 1000])
def test_blob_upload_size_limit_under(small_client, size, chunked):
    assert small_client.session["capabilities"][CORE]["maxSizeUpload"] == 1000
    body = pattern(size, b"under")
    r = upload(small_client, chunks(body) if chunked else body)
    assert ("Transfer-Encoding" in r.request.headers) == chunked
    assert 200 <= r.status_code < 300, r.text
    assert r.json()["size"] == size
    d = small_client.http.get(download_url(small_client, r.json()["blobId"]), timeout=30)
    assert d.content == body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [1001, 50_000])
def test_blob_upload_size_limit_over(small_client, size, chunked):
    body = pattern(size, b"over")
    r = upload(small_client, chunks(body) if chunked else body)
    assert ("Transfer-Encoding" in r.request.headers) == chunked
    problem = assert_problem(r, 400, LIMIT)
    assert problem["limit"] == "maxSizeUpload"
    # nothing was stored under the content's id
    blob_id = content_blob_id(body)
    assert (
        small_client.http.get(download_url(small_client, blob_id), timeout=30).status_code == 404
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_blob_upload_far_over_limit_is_jmap_problem(small_client, chunked):
    body = pattern(3 * 2**20, b"far over")  # > 2*1000 + 1 MiB
    r = upload(small_client, chunks(body, 65536) if chunked else body)
    problem = assert_problem(r, 400, LIMIT)
    assert problem["limit"] == "maxSizeUpload"


# ---- the URL templates (§6.1, §6.2; RFC 6570 level 1) ----


@pytest.mark.parametrize("encode", [True, False], ids=["percent-encoded", "raw"])
@pytest.mark.parametrize("name", ["dir/sub dir/mail copy.eml", "plain.eml", "a b  c.eml"])
def test_blob_download_template_variables(owner, encode, name):
    body = b"Subject: hi\r\n\r\nhello\r\n"
    blob = uploaded(owner, body, "message/rfc822")
    url = download_url(owner, blob["blobId"], name, "message/rfc822", encode=encode)
    d = owner.http.get(url, timeout=30)
    assert d.status_code == 200, (url, d.text)
    assert d.content == body
    assert d.headers["Content-Type"] == "message/rfc822"
    assert disposition_filename(d.headers["Content-Disposition"]) == name


def test_blob_upload_template_raw_account_id(owner):
    url = fill(owner.session["uploadUrl"], False, accountId=owner.account_id)
    r = owner.http.post(url, data=b"raw", headers={"Content-Type": "text/plain"}, timeout=30)
    assert 200 <= r.status_code < 300, r.text
    assert r.json()["accountId"] == owner.account_id


# ---- who may see what (§6, §6.1, §6.2) ----


def test_blob_download_other_user_refused(owner, stranger):
    body = pattern(100, b"private")
    blob = uploaded(owner, body)
    # the other user, in their own account: the blob is not there
    r = stranger.http.get(download_url(stranger, blob["blobId"]), timeout=30)
    assert_problem(r, 404)
    # the other user, naming the owner's account: no such account (for them)
    r = stranger.http.get(
        download_url(stranger, blob["blobId"], account_id=owner.account_id), timeout=30
    )
    problem = assert_problem(r, 404)
    assert "account" in problem["detail"]
    # and the owner still can
    r = owner.http.get(download_url(owner, blob["blobId"]), timeout=30)
    assert r.content == body


def test_blob_same_content_other_user_gets_own_reference(owner, stranger):
    """Content addressing must not leak: each uploader sees the blob in their own account."""
    body = pattern(100, b"shared content")
    mine = uploaded(owner, body)
    theirs = uploaded(stranger, body)
    for cl, blob in ((owner, mine), (stranger, theirs)):
        assert cl.http.get(download_url(cl, blob["blobId"]), timeout=30).content == body


@pytest.mark.parametrize(
    "bad_id",
    [
        "nonsense",
        "B" + "0" * 64,
        "B" + "A" * 64,
        "B" + "0" * 63,
        "x" * 255,
    ],
)
def test_blob_download_unknown_blob(owner, bad_id):
    r = owner.http.get(download_url(owner, bad_id), timeout=30)
    assert_problem(r, 404)


def test_blob_download_upper_case_of_real_id(owner):
    blob = uploaded(owner, b"case matters")
    wrong = blob["blobId"][0] + blob["blobId"][1:].upper()
    assert wrong != blob["blobId"]
    assert_problem(owner.http.get(download_url(owner, wrong), timeout=30), 404)


def test_blob_requires_auth(owner):
    blob = uploaded(owner, b"secret")
    for auth in (None, (owner.username, PASSWORD + "x")):
        down = requests.get(download_url(owner, blob["blobId"]), auth=auth, timeout=30)
        up = requests.post(
            upload_url(owner),
            data=b"x",
            auth=auth,
            headers={"Content-Type": "text/plain"},
            timeout=30,
        )
        for r in (down, up):
            assert_problem(r, 401)
            assert r.headers["WWW-Authenticate"].lower().startswith("basic")
            assert b"secret" not in r.content


def test_blob_upload_to_other_account_refused(owner, stranger):
    r = upload(stranger, b"intruder", "text/plain", account_id=owner.account_id)
    assert_problem(r, 404)
    # nothing arrived in the owner's account
    blob_id = content_blob_id(b"intruder")
    assert_problem(owner.http.get(download_url(owner, blob_id), timeout=30), 404)


def test_blob_upload_unknown_account(owner):
    assert_problem(upload(owner, b"x", account_id="Anonexistent"), 404)


# ---- Blob/copy (§6.3) ----


def test_blob_copy_same_account_refused(owner):
    """§6.3 copies *between* two different accounts (as §5.4: accountId MUST differ)."""
    blob = uploaded(owner, b"copy me")
    name, args, _ = owner.call(
        "Blob/copy",
        {
            "fromAccountId": owner.account_id,
            "accountId": owner.account_id,
            "blobIds": [blob["blobId"]],
        },
        using=[CORE],
    )
    assert name == "error"
    assert args["type"] == "invalidArguments"


def test_blob_copy_from_other_users_account(owner, stranger):
    blob = uploaded(owner, b"not yours")
    name, args, _ = stranger.call(
        "Blob/copy",
        {
            "fromAccountId": owner.account_id,
            "accountId": stranger.account_id,
            "blobIds": [blob["blobId"]],
        },
        using=[CORE],
    )
    assert name == "error"
    assert args["type"] == "fromAccountNotFound"
    r = stranger.http.get(download_url(stranger, blob["blobId"]), timeout=30)
    assert_problem(r, 404)


def test_blob_copy_from_unknown_account(owner):
    name, args, _ = owner.call(
        "Blob/copy",
        {"fromAccountId": "Anonexistent", "accountId": owner.account_id, "blobIds": []},
        using=[CORE],
    )
    assert (name, args["type"]) == ("error", "fromAccountNotFound")


def test_blob_copy_into_other_users_account(owner, stranger):
    blob = uploaded(owner, b"push it over")
    name, args, _ = owner.call(
        "Blob/copy",
        {
            "fromAccountId": owner.account_id,
            "accountId": stranger.account_id,
            "blobIds": [blob["blobId"]],
        },
        using=[CORE],
    )
    assert (name, args["type"]) == ("error", "accountNotFound")
    r = stranger.http.get(download_url(stranger, blob["blobId"]), timeout=30)
    assert_problem(r, 404)


def test_blob_copy_needs_core_capability(owner):
    """RFC 8620 §2: the server behaves as though it implements only what `using` opts into."""
    name, args, _ = owner.call(
        "Blob/copy",
        {"fromAccountId": "Anonexistent", "accountId": owner.account_id, "blobIds": []},
        using=[MAIL],
    )
    assert (name, args["type"]) == ("error", "unknownMethod")


def test_blob_copy_unknown_capability(owner):
    r = owner.post(
        {
            "using": [CORE, "https://example.com/apis/foobar"],
            "methodCalls": [
                [
                    "Blob/copy",
                    {
                        "fromAccountId": "Anonexistent",
                        "accountId": owner.account_id,
                        "blobIds": [],
                    },
                    "c0",
                ]
            ],
        }
    )
    assert_problem(r, 400, "urn:ietf:params:jmap:error:unknownCapability")


def test_blob_copy_bad_arguments(owner):
    for args in (
        {"accountId": owner.account_id, "blobIds": []},
        {"fromAccountId": "Anonexistent", "accountId": owner.account_id, "blobIds": "Bxyz"},
        {
            "fromAccountId": "Anonexistent",
            "accountId": owner.account_id,
            "blobIds": [],
            "extra": 1,
        },
    ):
        name, out, _ = owner.call("Blob/copy", args, using=[CORE])
        assert (name, out["type"]) == ("error", "invalidArguments"), args


# ---- unreferenced uploads expire (§6) ----


def test_blob_upload_expires(tmp_path):
    """Kept at least 1 hour (jmapd: 24 h), re-upload resets the expiry, then gone; check ok."""
    data_dir = tmp_path / "data"
    user = add_user(data_dir, "clock@example.com")
    a, b = pattern(700, b"expiring a"), pattern(700, b"expiring b")

    def serving(now):
        return Server(data_dir, "--test-now", now).start()

    def status(srv, blob_id):
        cl = Client(srv.url, user)
        return cl.http.get(download_url(cl, blob_id), timeout=30).status_code

    srv = serving("2030-01-01T00:00:00Z")
    try:
        cl = Client(srv.url, user)
        id_a, id_b = uploaded(cl, a)["blobId"], uploaded(cl, b)["blobId"]
        assert status(srv, id_a) == status(srv, id_b) == 200
    finally:
        srv.stop()

    srv = serving("2030-01-01T23:00:00Z")
    try:
        assert status(srv, id_a) == status(srv, id_b) == 200
        assert uploaded(Client(srv.url, user), b)["blobId"] == id_b  # SHOULD reset the expiry
    finally:
        srv.stop()

    srv = serving("2030-01-02T01:00:00Z")
    try:
        assert status(srv, id_a) == 404
        assert status(srv, id_b) == 200
    finally:
        srv.stop()

    srv = serving("2030-01-03T00:00:00Z")
    try:
        assert status(srv, id_a) == 404
        assert status(srv, id_b) == 404
        again = uploaded(Client(srv.url, user), a)  # the same octets can come back
        assert again["blobId"] == id_a
        cl = Client(srv.url, user)
        assert cl.http.get(download_url(cl, id_a), timeout=30).content == a
    finally:
        srv.stop()

    done = run_cli("check", data_dir=data_dir)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- maxConcurrentUpload (§2) ----


def test_blob_upload_max_concurrent(own_server):
    """With maxConcurrentUpload 1, of two uploads in flight at once exactly one is refused.

    To hold an upload in flight deterministically, another process's write transaction
    (as `jmapd.py user add` or delivery would hold) keeps the database busy: an upload
    that has stored its octets waits to record them, inside its slot.
    """
    srv, cl = own_server("--max-concurrent-upload", "1")
    assert cl.session["capabilities"][CORE]["maxConcurrentUpload"] == 1
    first = uploaded(cl, b"warm-up")  # authenticates once, so the later ones only read
    assert first["size"] == 7

    (database,) = srv.data_dir.glob("*.sqlite3")
    lock = sqlite3.connect(database, isolation_level=None, timeout=30)
    bodies = [pattern(5000, b"concurrent %d" % i) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            lock.execute("BEGIN IMMEDIATE")
            # one HTTP session each: requests.Session is not meant to be shared by threads
            futures = [pool.submit(upload, Client(srv.url, cl.username), body) for body in bodies]
            # the refused one answers at once; the admitted one waits for the database
            concurrent.futures.wait(
                futures, timeout=8, return_when=concurrent.futures.FIRST_COMPLETED
            )
        finally:
            lock.rollback()
            lock.close()
        responses = [f.result() for f in futures]
    refused = [r for r in responses if r.status_code == 400]
    stored = [r for r in responses if 200 <= r.status_code < 300]
    assert len(refused) == 1 and len(stored) == 1, [(r.status_code, r.text) for r in responses]
    assert assert_problem(refused[0], 400, LIMIT)["limit"] == "maxConcurrentUpload"
    # the slot is free again, for a new upload as for the one refused
    refused_body = bodies[0] if responses[0] is refused[0] else bodies[1]
    assert uploaded(cl, refused_body)["size"] == 5000
