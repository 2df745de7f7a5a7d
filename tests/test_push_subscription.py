"""PushSubscription and Web Push (jmapd §6.6: push_subscription_get/set, PushSender,
push_post, webpush_encrypt and its P-256 / AES-128-GCM helpers).

RFC 8620 §7.2 (the PushSubscription object: url and keys immutable, verificationCode null
on create, expires that the server may shorten, types; POSTs with Content-Type
application/json and a TTL header; subscriptions tied to the credential that made them and
destroyed with it; url and keys erased on destroy), §7.2.1 (/get: no accountId, no state,
url and keys forbidden), §7.2.2 (/set: no accountId or ifInState, no oldState/newState;
the PushVerification object; nothing more is POSTed until the code comes back; a wrong
code is invalidProperties; extending expires needs no new verification), §7.2.3 (the
example flow), §7.1 (the StateChange object), §8.6 (externally resolvable URLs only, a cap
on subscriptions per user and on their rate of creation). RFC 8030 §5.2 (TTL = 1*DIGIT),
§5.3 (Urgency values), §7.3 (a push service answers 404 for an expired subscription; 410
is the other "gone"), §8.4 (429 with Retry-After). RFC 8291 §3.1 (a new ECDH key pair per
message), §3.4 (key derivation), §4 (one record, a 65-octet keyid, the 0x02 delimiter), §5
and Appendix A (the worked example); RFC 8188 §2 (the aes128gcm header: salt(16) | rs(4) |
idlen(1) | keyid). The GCM specification's test cases 1-3 (McGrew & Viega, as used for
NIST SP 800-38D).

Regression tests for bugs found here: `expires` clamped on update too, a destroy erases url
and keys in the database, an update of `types` changes what is pushed, a change made just
after verification is pushed, and the hourly creation limit counts dropped subscriptions.

The server is a real `jmapd.py serve` subprocess started with the hidden
--test-push-allow-loopback (http:// and loopback push URLs allowed); the push endpoint is
an `http.server` on 127.0.0.1 in this process that records every POST and answers a
scripted status. Encrypted pushes are decrypted independently with the `cryptography`
package (ECDH, AESGCM) and HMAC-SHA-256 from the standard library; the decryptor is itself
checked against the RFC 8291 §5 example. The URL rules run against a second server
started without the test option.

Push delivery is asynchronous, so waits are generous (WAIT_S) and "nothing was POSTed" is
shown with a barrier where possible: a second, live subscription that must receive the
same change, after which the silent one gets a short grace period.
"""

import base64
import hashlib
import hmac
import http.server
import json
import os
import queue
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import PASSWORD, ROOT, Client, Server, add_user, run_cli
from test_mime import upload
from test_thread import message, unique

sys.path.insert(0, str(ROOT))
import jmapd  # noqa: E402  (only for the direct unit tests of the crypto helpers)

WAIT_S = 8  # an expected POST must arrive within this (they come within ~1 s)
QUIET_S = 2.5  # how long to listen for a POST that must not come, with no barrier
GRACE_S = 0.7  # after a barrier POST: a silent endpoint would have had its POST by now
SETTLE_S = 1.5  # see settle()
BUG_WAIT_S = 3  # long enough for a POST that works to arrive
DAY = 86400
MAX_EXPIRY_S = 7 * DAY  # jmapd's clamp (RFC 8620 §7.2: at least 48 h, SHOULD be 7 days)
SET_KEYS = {"created", "updated", "destroyed", "notCreated", "notUpdated", "notDestroyed"}
DEFAULT_PROPERTIES = {"id", "deviceClientId", "verificationCode", "expires", "types"}
URGENCIES = {"very-low", "low", "normal", "high"}  # RFC 8030 §5.3


# =============================================================================
# The push endpoint: an HTTP server that records POSTs
# =============================================================================


@dataclass
class Push:
    path: str
    headers: object  # http.client.HTTPMessage: case-insensitive get()
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self):
        """The body of an unencrypted push (RFC 8620 §7.2: UTF-8 JSON)."""
        assert self.headers.get("Content-Encoding") is None, dict(self.headers)
        return json.loads(self.body.decode("utf-8"))


class Endpoint:
    """One push URL (a path of its own on the receiver) and the POSTs made to it."""

    def __init__(self, receiver, path, statuses):
        self.receiver, self.path = receiver, path
        self.url = receiver.base + path
        self.statuses = list(statuses)  # answers for the first POSTs, then 201
        self.inbox = queue.Queue()

    def next(self, timeout=WAIT_S) -> Push | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def expect(self, timeout=WAIT_S) -> Push:
        push = self.next(timeout)
        assert push is not None, f"no POST to {self.path} within {timeout} s"
        return push

    def silent(self, seconds=QUIET_S):
        push = self.next(seconds)
        assert push is None, (push.headers.items(), push.body)


class Receiver:
    def __init__(self):
        self.lock = threading.Lock()
        self.endpoints: dict[str, Endpoint] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    endpoint = receiver.endpoints.get(self.path)
                    answer = endpoint.statuses.pop(0) if endpoint and endpoint.statuses else 201
                if endpoint is not None:
                    endpoint.inbox.put(Push(self.path, self.headers, body, time.monotonic()))
                status, extra = answer if isinstance(answer, tuple) else (answer, {})
                self.send_response(status if endpoint else 404)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def endpoint(self, *statuses) -> Endpoint:
        """A new push URL; its first POSTs are answered with `statuses` (an int or
        (status, {header: value})), later ones with 201 Created."""
        endpoint = Endpoint(self, f"/push/{unique('ep')}?device=x&client=y", statuses)
        with self.lock:
            self.endpoints[endpoint.path] = endpoint
        return endpoint

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# =============================================================================
# Fixtures
# =============================================================================


@pytest.fixture(scope="module")
def receiver():
    rec = Receiver()
    yield rec
    rec.stop()


@pytest.fixture(scope="module")
def push_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pushsub") / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir, "--test-push-allow-loopback").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """No --test-push-allow-loopback: only https URLs that resolve to public addresses."""
    data_dir = tmp_path_factory.mktemp("pushstrict") / "data"
    add_user(data_dir, "strict@example.com")
    srv = Server(data_dir).start()
    yield srv
    srv.stop()


def new_client(server, name) -> Client:
    """A fresh user. One write through the server makes its change bus read the new
    account at once (else it notices the CLI's commit within a poll), so that a
    subscription verified right away does not report the account's creation."""
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


def app_password(server, username) -> str:
    done = run_cli("user", "token", "add", username, unique("device"), data_dir=server.data_dir)
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "." in lines[0], done.stdout
    return lines[0]


def basic_client(server, username, secret) -> Client:
    return Client(server.url, username, secret)


def bearer_client(server, username, token) -> Client:
    client = Client(server.url, username)
    client.http.auth = None
    client.http.headers["Authorization"] = f"Bearer {token}"
    return client


# =============================================================================
# JMAP helpers
# =============================================================================


def utc_date(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc_date(text: str) -> float:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text  # RFC 8620 §1.4
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def push_get(client, **args):
    return client.ok("PushSubscription/get", args)


def push_set(client, **args):
    resp = client.ok("PushSubscription/set", args)
    assert set(resp) == SET_KEYS, resp  # RFC 8620 §7.2.2: no accountId, oldState, newState
    return resp


def create(client, url, device="dev-1", **props) -> dict:
    """PushSubscription/set create of one object; return the whole response."""
    return push_set(client, create={"k": {"deviceClientId": device, "url": url, **props}})


def subscribe(client, endpoint, types=None, **props) -> str:
    resp = create(client, endpoint.url, types=types, **props)
    assert resp["notCreated"] is None and "k" in resp["created"], resp
    return resp["created"]["k"]["id"]


def verification_of(endpoint, sub_id) -> str:
    """Wait for the PushVerification (RFC 8620 §7.2.2); return its code."""
    body = endpoint.expect().json()
    assert set(body) == {"@type", "pushSubscriptionId", "verificationCode"}, body
    assert body["@type"] == "PushVerification" and body["pushSubscriptionId"] == sub_id, body
    assert isinstance(body["verificationCode"], str) and body["verificationCode"], body
    return body["verificationCode"]


def verify(client, sub_id, code):
    resp = push_set(client, update={sub_id: {"verificationCode": code}})
    assert resp["notUpdated"] is None and sub_id in resp["updated"], resp


def settle():
    """Give jmapd's push thread time to start watching a just-verified subscription.

    Changes made in the first moment after verification can be lost (see
    test_change_made_right_after_verification_is_pushed); every other test waits here
    so that it tests what it names, not that race.
    """
    time.sleep(SETTLE_S)


def live_subscription(client, endpoint, types=None, **props) -> str:
    """Create, receive the code, verify; return the id (the caller settles)."""
    sub_id = subscribe(client, endpoint, types=types, **props)
    verify(client, sub_id, verification_of(endpoint, sub_id))
    return sub_id


def listed_ids(client) -> set:
    return {sub["id"] for sub in push_get(client, ids=None)["list"]}


def wait_until_gone(client, sub_id, timeout=WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        resp = push_get(client, ids=[sub_id])
        if resp["notFound"] == [sub_id] or time.monotonic() > deadline:
            return resp
        time.sleep(0.2)


def make_mailbox(client) -> str:
    """Create a Mailbox (RFC 8621 §2.5); return the Mailbox state it produced."""
    resp = client.ok("Mailbox/set", {"accountId": client.account_id,
                                     "create": {"m": {"name": unique("box")}}})
    assert resp["notCreated"] is None and "m" in resp["created"], resp
    return resp["newState"]


def state_of(client, type_name):
    return client.ok(f"{type_name}/get", {"accountId": client.account_id, "ids": []})["state"]


def inbox(client):
    boxes = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})["list"]
    return next(m["id"] for m in boxes if m["role"] == "inbox")


def import_email(client) -> str:
    blob = upload(client, message(unique("Push subscription ")))["blobId"]
    resp = client.ok("Email/import", {"accountId": client.account_id, "emails": {
        "e": {"blobId": blob, "mailboxIds": {inbox(client): True}}}})
    assert resp["notCreated"] is None, resp
    return resp["created"]["e"]["id"]


def flag(client, email_id) -> str:
    """Set $flagged (an Email-only change: no Mailbox count moves); return the Email state."""
    resp = client.ok("Email/set", {"accountId": client.account_id,
                                   "update": {email_id: {"keywords/$flagged": True}}})
    assert resp["notUpdated"] is None, resp
    return resp["newState"]


def exactly(account_id, type_name, state):
    """The StateChange (RFC 8620 §7.1) for one type of one account, nothing else."""
    return {"@type": "StateChange", "changed": {account_id: {type_name: state}}}


def check_push_headers(push, encrypted=False):
    """RFC 8620 §7.2: application/json and a TTL header; RFC 8030 §5.2/§5.3 syntax."""
    assert re.fullmatch(r"\d+", push.headers.get("TTL") or ""), dict(push.headers)
    urgency = push.headers.get("Urgency")
    assert urgency is None or urgency in URGENCIES, urgency
    if encrypted:
        assert push.headers.get("Content-Encoding") == "aes128gcm", dict(push.headers)
    else:
        media = (push.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        assert media == "application/json", dict(push.headers)
        assert push.headers.get("Content-Encoding") is None, dict(push.headers)


def db_rows_mentioning(server, *needles) -> int:
    """Rows of push_subscription whose url or keys still hold any of the needles."""
    conn = sqlite3.connect(f"file:{server.data_dir / 'jmapd.sqlite3'}?mode=ro", uri=True)
    try:
        count = 0
        for needle in needles:
            count += conn.execute(
                "SELECT count(*) FROM push_subscription WHERE url = ? OR instr(keys, ?) > 0",
                (needle, needle)).fetchone()[0]
        return count
    finally:
        conn.close()


# =============================================================================
# Web Push decryption, independent of jmapd (RFC 8291 §3.4, RFC 8188 §2)
# =============================================================================


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    text = re.sub(r"\s", "", text)
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hmac256(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()


def public_bytes(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint)


@dataclass
class UserAgentKeys:
    private: ec.EllipticCurvePrivateKey
    auth: bytes

    @classmethod
    def generate(cls):
        return cls(ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    def keys(self) -> dict:
        """The PushSubscription keys object (RFC 8620 §7.2: URL-safe base64)."""
        return {"p256dh": b64url(public_bytes(self.private)), "auth": b64url(self.auth)}


@dataclass
class Decrypted:
    salt: bytes
    rs: int
    keyid: bytes
    plaintext: bytes


def webpush_decrypt(body: bytes, ua: UserAgentKeys) -> Decrypted:
    """Decrypt one aes128gcm push message as a user agent would (RFC 8291 §3.4, §4)."""
    assert len(body) >= 21, body
    salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    keyid, ciphertext = body[21:21 + idlen], body[21 + idlen:]
    assert idlen == 65 and keyid[:1] == b"\x04", keyid  # RFC 8291 §4: uncompressed point
    assert 18 <= len(ciphertext) < rs, (rs, len(ciphertext))  # one record (§4)
    as_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), keyid)
    ecdh_secret = ua.private.exchange(ec.ECDH(), as_key)
    prk_key = hmac256(ua.auth, ecdh_secret)
    ikm = hmac256(prk_key, b"WebPush: info\x00" + public_bytes(ua.private) + keyid + b"\x01")
    prk = hmac256(salt, ikm)
    cek = hmac256(prk, b"Content-Encoding: aes128gcm\x00\x01")[:16]
    nonce = hmac256(prk, b"Content-Encoding: nonce\x00\x01")[:12]
    padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
    unpadded = padded.rstrip(b"\x00")
    assert unpadded[-1:] == b"\x02", padded  # RFC 8188 §2: the last record's delimiter
    return Decrypted(salt, rs, keyid, unpadded[:-1])


def decrypted_json(push, ua):
    check_push_headers(push, encrypted=True)
    return json.loads(webpush_decrypt(push.body, ua).plaintext.decode("utf-8"))


# RFC 8291 §5 and Appendix A
RFC8291_PLAINTEXT = b"When I grow up, I want to be a watermelon"
RFC8291_AUTH = unb64url("BTBZMqHH6r4Tts7J_aSIgg")
RFC8291_UA_PRIVATE = unb64url("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94")
RFC8291_UA_PUBLIC = unb64url("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcx"
                             "aOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4")
RFC8291_AS_PRIVATE = unb64url("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")
RFC8291_AS_PUBLIC = unb64url("BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIg"
                             "Dll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8")
RFC8291_SALT = unb64url("DGv6ra1nlYgDCS1FRnbzlw")
RFC8291_BODY = unb64url("""
    DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml
    mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT
    pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN""")


def rfc8291_user_agent() -> UserAgentKeys:
    private = ec.derive_private_key(int.from_bytes(RFC8291_UA_PRIVATE, "big"), ec.SECP256R1())
    assert public_bytes(private) == RFC8291_UA_PUBLIC
    return UserAgentKeys(private, RFC8291_AUTH)


def test_the_independent_decryptor_reads_the_rfc8291_example():
    """The test's own decryptor is right (so the end-to-end tests below can be trusted)."""
    assert len(RFC8291_BODY) == 144  # §5 says Content-Length 145; the octets shown are 144
    found = webpush_decrypt(RFC8291_BODY, rfc8291_user_agent())
    assert found.plaintext == RFC8291_PLAINTEXT
    assert (found.salt, found.rs, found.keyid) == (RFC8291_SALT, 4096, RFC8291_AS_PUBLIC)


# =============================================================================
# jmapd's own crypto, directly: RFC 8291 Appendix A, NIST GCM vectors, ECDH
# =============================================================================


def test_webpush_encrypt_reproduces_rfc8291_appendix_a():
    body = jmapd.webpush_encrypt(RFC8291_PLAINTEXT, RFC8291_UA_PUBLIC, RFC8291_AUTH,
                                 as_private=int.from_bytes(RFC8291_AS_PRIVATE, "big"),
                                 salt=RFC8291_SALT)
    assert b64url(body) == b64url(RFC8291_BODY)
    header = unb64url("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z 9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
                      "mlMoZIIgDll6e3vCYLocInmYWAmS6Tlz AC8wEqKK6PBru3jl7A8")
    assert len(header) == 86 and body[:86] == header  # Appendix A: the 86-octet header


def test_webpush_encrypt_with_fresh_keys_decrypts_independently():
    ua = UserAgentKeys.generate()
    plaintext = json.dumps({"@type": "StateChange", "changed": {"A1": {"Email": "7"}}}).encode()
    first = jmapd.webpush_encrypt(plaintext, public_bytes(ua.private), ua.auth)
    second = jmapd.webpush_encrypt(plaintext, public_bytes(ua.private), ua.auth)
    one, two = webpush_decrypt(first, ua), webpush_decrypt(second, ua)
    assert one.plaintext == two.plaintext == plaintext
    # RFC 8291 §3.1: a new application-server key pair per message; RFC 8188: a new salt
    assert one.keyid != two.keyid and one.salt != two.salt


@pytest.mark.parametrize("key, nonce, plaintext, expected", [
    # GCM test case 1 (McGrew & Viega; NIST SP 800-38D validation): empty plaintext
    ("00" * 16, "00" * 12, "", "58e2fccefa7e3061367f1d57a4e7455a"),
    # GCM test case 2: one zero block
    ("00" * 16, "00" * 12, "00" * 16,
     "0388dace60b6a392f328c2b971b2fe78" "ab6e47d42cec13bdf53a67b21257bddf"),
    # GCM test case 3: four blocks, no associated data
    ("feffe9928665731c6d6a8f9467308308", "cafebabefacedbaddecaf888",
     "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
     "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255",
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985"
     "4d5c2af327cd64a62cf35abd2ba6fab4"),
])
def test_aes128_gcm_encrypt_matches_gcm_test_vectors(key, nonce, plaintext, expected):
    out = jmapd.aes128_gcm_encrypt(bytes.fromhex(key), bytes.fromhex(nonce),
                                   bytes.fromhex(plaintext))
    assert out.hex() == expected


def test_aes128_gcm_encrypt_round_trips_through_cryptography():
    for size in (0, 1, 15, 16, 17, 31, 100, 1000):
        key, nonce, plaintext = os.urandom(16), os.urandom(12), os.urandom(size)
        sealed = jmapd.aes128_gcm_encrypt(key, nonce, plaintext)
        assert len(sealed) == size + 16
        assert sealed == AESGCM(key).encrypt(nonce, plaintext, None), size
        assert AESGCM(key).decrypt(nonce, sealed, None) == plaintext


def test_p256_multiply_agrees_with_cryptography():
    for _ in range(4):
        ours, theirs = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
            ec.SECP256R1())
        k = ours.private_numbers().private_value
        # k * G is the public key
        assert jmapd.p256_encode(jmapd.p256_multiply(k, jmapd.P256_G)) == public_bytes(ours)
        # ECDH: the x coordinate of k * (their public point)
        point = jmapd.p256_decode(public_bytes(theirs))
        shared = jmapd.p256_multiply(k, point)[0].to_bytes(32, "big")
        assert shared == ours.exchange(ec.ECDH(), theirs.public_key())


def test_p256_decode_refuses_points_off_the_curve():
    good = public_bytes(ec.generate_private_key(ec.SECP256R1()))
    assert jmapd.p256_encode(jmapd.p256_decode(good)) == good
    y = int.from_bytes(good[33:], "big")
    off_curve = good[:33] + ((y + 1) % jmapd.P256_P).to_bytes(32, "big")
    for bad in (off_curve, good[:33], b"\x02" + good[1:33], bytes(65), good + b"\x00"):
        with pytest.raises(ValueError):
            jmapd.p256_decode(bad)


# =============================================================================
# RFC 8620 §7.2.3: the example flow
# =============================================================================


def test_get_with_no_subscriptions_is_exactly_list_and_notfound(alice):
    assert push_get(alice, ids=None) == {"list": [], "notFound": []}


def test_rfc8620_example_flow_create_verify_then_state_changes(alice, receiver):
    assert push_get(alice, ids=None) == {"list": [], "notFound": []}
    endpoint = receiver.endpoint()
    before = time.time()
    resp = push_set(alice, create={"4f29": {"deviceClientId": "a889-ffea-910",
                                            "url": endpoint.url, "types": None}})
    after = time.time()
    assert resp["notCreated"] is None, resp
    created = resp["created"]["4f29"]
    sub_id = created["id"]
    assert isinstance(sub_id, str) and sub_id, created
    assert "url" not in created, created
    expires = parse_utc_date(created["expires"])  # none asked: the server sets 7 days
    assert int(before) + MAX_EXPIRY_S - 1 <= expires <= after + MAX_EXPIRY_S, created

    push = endpoint.expect()  # RFC 8620 §7.2.2: "immediately"
    check_push_headers(push)
    code = push.json()["verificationCode"]
    assert push.json() == {"@type": "PushVerification", "pushSubscriptionId": sub_id,
                           "verificationCode": code}
    assert isinstance(code, str) and len(code) >= 16, code  # "sufficient entropy"

    # RFC 8620 §7.2: nothing more is POSTed until the code comes back
    make_mailbox(alice)
    endpoint.silent()

    wrong = push_set(alice, update={sub_id: {"verificationCode": code[::-1] + "0"}})
    assert wrong["updated"] is None, wrong
    assert wrong["notUpdated"][sub_id]["type"] == "invalidProperties", wrong
    assert wrong["notUpdated"][sub_id]["properties"] == ["verificationCode"], wrong
    assert push_get(alice, ids=[sub_id])["list"][0]["verificationCode"] is None
    make_mailbox(alice)
    endpoint.silent(1)  # still unverified

    verify(alice, sub_id, code)
    listed = push_get(alice, ids=[sub_id])
    assert listed == {"list": [{"id": sub_id, "deviceClientId": "a889-ffea-910",
                                "verificationCode": code, "expires": created["expires"],
                                "types": None}], "notFound": []}
    settle()
    state = make_mailbox(alice)
    push = endpoint.expect()
    check_push_headers(push)
    assert push.json() == exactly(alice.account_id, "Mailbox", state)

    # RFC 8620 §7.2.2: the lifetime can be shortened and extended again (within the
    # server's limit) without a new verification
    shorter, longer = utc_date(time.time() + DAY), utc_date(time.time() + 5 * DAY)
    for expires in (shorter, longer):
        resp = push_set(alice, update={sub_id: {"expires": expires}})
        assert resp["notUpdated"] is None and sub_id in resp["updated"], resp
        assert (resp["updated"][sub_id] or {}).get("expires", expires) == expires, resp
        [sub] = push_get(alice, ids=[sub_id])["list"]
        assert (sub["expires"], sub["verificationCode"]) == (expires, code), sub
    state = make_mailbox(alice)
    assert endpoint.expect().json() == exactly(alice.account_id, "Mailbox", state)


def test_expires_far_away_is_clamped_and_reported_a_near_one_kept(alice, receiver):
    endpoint = receiver.endpoint()
    now = time.time()
    far = create(alice, endpoint.url, expires=utc_date(now + 30 * DAY))
    far_created = far["created"]["k"]
    assert "expires" in far_created, far  # the server changed it: it must say so (§5.3)
    far_expires = parse_utc_date(far_created["expires"])
    assert int(now) + MAX_EXPIRY_S - 5 <= far_expires <= time.time() + MAX_EXPIRY_S, far
    assert push_get(alice, ids=[far_created["id"]])["list"][0]["expires"] == \
        far_created["expires"]

    near_date = utc_date(now + 2 * DAY)
    near = create(alice, endpoint.url, expires=near_date)
    near_id = near["created"]["k"]["id"]
    assert near["created"]["k"].get("expires", near_date) == near_date, near
    assert push_get(alice, ids=[near_id])["list"][0]["expires"] == near_date

    shorter = utc_date(now + 3 * DAY)  # an update within the limit is kept
    resp = push_set(alice, update={near_id: {"expires": shorter}})
    assert resp["notUpdated"] is None and near_id in resp["updated"], resp
    assert (resp["updated"][near_id] or {}).get("expires", shorter) == shorter, resp
    assert push_get(alice, ids=[near_id])["list"][0]["expires"] == shorter


@pytest.mark.parametrize("asked", ["2999-08-13T00:00:00Z", None])
def test_extending_expires_by_update_is_clamped_and_reported(alice, receiver, asked):
    sub_id = subscribe(alice, receiver.endpoint())
    now = time.time()
    resp = push_set(alice, update={sub_id: {"expires": asked}})
    assert resp["notUpdated"] is None and sub_id in resp["updated"], resp
    stored = push_get(alice, ids=[sub_id])["list"][0]["expires"]
    assert stored is not None and parse_utc_date(stored) <= time.time() + MAX_EXPIRY_S, stored
    assert parse_utc_date(stored) >= int(now) + MAX_EXPIRY_S - 5, stored
    assert (resp["updated"][sub_id] or {}).get("expires") == stored, resp  # RFC 8620 §5.3


def test_state_change_after_the_deliver_command(alice, receiver, push_server):
    """`jmapd.py deliver` is another process: its commit is pushed too."""
    endpoint = receiver.endpoint()
    live_subscription(alice, endpoint)
    settle()
    done = run_cli("deliver", "--user", alice.username, data_dir=push_server.data_dir,
                   input_text=message(unique("Delivered ")).decode())
    assert done.returncode == 0, done.stderr
    wanted = {"Email", "Thread", "Mailbox", "EmailDelivery"}
    merged = {}
    while not wanted <= set(merged):
        push = endpoint.expect()
        check_push_headers(push)
        body = push.json()
        assert body["@type"] == "StateChange" and set(body) == {"@type", "changed"}, body
        assert set(body["changed"]) == {alice.account_id}, body  # only this user's account
        merged.update(body["changed"][alice.account_id])
    for type_name in ("Email", "Thread", "Mailbox"):
        assert merged[type_name] == state_of(alice, type_name), (type_name, merged)


def test_types_filter_pushes_only_the_listed_types(alice, receiver):
    email_id = import_email(alice)
    endpoint = receiver.endpoint()
    sub_id = live_subscription(alice, endpoint, types=["Mailbox"])
    assert push_get(alice, ids=[sub_id])["list"][0]["types"] == ["Mailbox"]
    settle()
    mailbox_state = state_of(alice, "Mailbox")
    flag(alice, email_id)  # Email only: not pushed
    assert state_of(alice, "Mailbox") == mailbox_state  # (the premise: Mailbox unmoved)
    import_email(alice)  # Email, Thread, Mailbox, EmailDelivery: only Mailbox is pushed
    push = endpoint.expect()
    assert push.json() == exactly(alice.account_id, "Mailbox", state_of(alice, "Mailbox"))
    endpoint.silent(1)


def test_updating_types_changes_what_is_pushed(alice, receiver):
    email_id = import_email(alice)
    endpoint = receiver.endpoint()
    sub_id = live_subscription(alice, endpoint, types=["Mailbox"])
    settle()
    state = make_mailbox(alice)
    assert endpoint.expect().json() == exactly(alice.account_id, "Mailbox", state)
    resp = push_set(alice, update={sub_id: {"types": ["Email"]}})
    assert resp["notUpdated"] is None, resp
    assert push_get(alice, ids=[sub_id])["list"][0]["types"] == ["Email"]
    settle()
    email_state = flag(alice, email_id)
    push = endpoint.next(BUG_WAIT_S)
    assert push is not None, "an Email change was not pushed after types became ['Email']"
    assert push.json() == exactly(alice.account_id, "Email", email_state)


def test_change_made_right_after_verification_is_pushed(alice, bob, receiver):
    live_subscription(bob, receiver.endpoint())  # another verified subscription on the server
    settle()
    for _ in range(2):  # twice: a lucky schedule cannot make both pass
        endpoint = receiver.endpoint()
        sub_id = subscribe(alice, endpoint)
        code = verification_of(endpoint, sub_id)
        # one request: the verification commits, then the Mailbox change commits
        resp = alice.request([
            ["PushSubscription/set", {"update": {sub_id: {"verificationCode": code}}}, "v"],
            ["Mailbox/set", {"accountId": alice.account_id,
                             "create": {"m": {"name": unique("box")}}}, "m"]])
        (name, verified, _), (_, made, _) = resp["methodResponses"]
        assert name == "PushSubscription/set" and sub_id in verified["updated"], resp
        push = endpoint.next(BUG_WAIT_S)
        assert push is not None, "the change made after verification was never pushed"
        assert push.json() == exactly(alice.account_id, "Mailbox", made["newState"])
        push_set(alice, destroy=[sub_id])


# =============================================================================
# RFC 8620 §7.2.1-7.2.2: argument and property rules
# =============================================================================


def test_get_returns_default_properties_and_forbids_url_and_keys(alice, receiver):
    ua = UserAgentKeys.generate()
    endpoint = receiver.endpoint()
    sub_id = subscribe(alice, endpoint, types=["Mailbox", "Email"], keys=ua.keys(),
                       device="dev-props")
    [sub] = push_get(alice, ids=None)["list"]
    assert set(sub) == DEFAULT_PROPERTIES, sub
    assert (sub["id"], sub["deviceClientId"], sub["types"]) == (
        sub_id, "dev-props", ["Mailbox", "Email"]), sub
    assert push_get(alice)["list"] == [sub]  # ids omitted: all
    assert push_get(alice, ids=None, properties=None)["list"] == [sub]
    assert push_get(alice, ids=[sub_id], properties=["deviceClientId"]) == {
        "list": [{"id": sub_id, "deviceClientId": "dev-props"}], "notFound": []}
    assert push_get(alice, ids=[sub_id, "P999999999"]) == {"list": [sub],
                                                           "notFound": ["P999999999"]}
    for properties in (["url"], ["keys"], ["id", "url"], ["keys", "expires"]):
        resp = alice.call("PushSubscription/get", {"ids": None, "properties": properties})
        assert resp[0] == "error" and resp[1]["type"] == "forbidden", (properties, resp)
    resp = alice.call("PushSubscription/get", {"ids": None, "accountId": alice.account_id})
    assert resp[0] == "error" and resp[1]["type"] == "invalidArguments", resp


def test_set_takes_no_accountid_or_ifinstate(alice, receiver):
    endpoint = receiver.endpoint()
    for extra in ({"ifInState": "0"}, {"accountId": alice.account_id}):
        resp = alice.call("PushSubscription/set", {"create": {"k": {
            "deviceClientId": "d", "url": endpoint.url}}, **extra})
        assert resp[0] == "error" and resp[1]["type"] == "invalidArguments", (extra, resp)
    assert push_get(alice, ids=None)["list"] == []  # nothing was made
    endpoint.silent(1)


def test_create_and_update_property_rules(alice, receiver):
    endpoint = receiver.endpoint()
    resp = push_set(alice, create={
        "code": {"deviceClientId": "d", "url": endpoint.url, "verificationCode": "guess"},
        "nourl": {"deviceClientId": "d"},
        "nodevice": {"url": endpoint.url},
        "ok": {"deviceClientId": "d", "url": endpoint.url, "types": None, "keys": None},
    })
    not_created = resp["notCreated"]
    assert set(not_created) == {"code", "nourl", "nodevice"}, resp
    assert not_created["code"]["type"] == "invalidProperties", resp
    assert not_created["code"]["properties"] == ["verificationCode"], resp
    assert not_created["nourl"]["type"] == "invalidProperties", resp
    assert "url" in not_created["nourl"]["properties"], resp
    assert not_created["nodevice"]["type"] == "invalidProperties", resp
    assert "deviceClientId" in not_created["nodevice"]["properties"], resp
    sub_id = resp["created"]["ok"]["id"]
    # url, keys and deviceClientId are immutable (RFC 8620 §7.2)
    other = receiver.endpoint()
    changes = {"url": {"url": other.url},
               "keys": {"keys": UserAgentKeys.generate().keys()},
               "deviceClientId": {"deviceClientId": "other"}}
    for prop, patch in changes.items():
        resp = push_set(alice, update={sub_id: patch})
        assert resp["updated"] is None, (prop, resp)
        assert resp["notUpdated"][sub_id]["type"] == "invalidProperties", (prop, resp)
        assert resp["notUpdated"][sub_id]["properties"] == [prop], (prop, resp)
    code = verification_of(endpoint, sub_id)
    endpoint.silent(1)  # one verification only, for the one created
    other.silent(0.1)
    verify(alice, sub_id, code)


# =============================================================================
# RFC 8620 §7.2: subscriptions belong to the credential that made them
# =============================================================================


def test_subscriptions_are_per_credential(alice, bob, receiver, push_server):
    token = app_password(push_server, alice.username)
    by_token = basic_client(push_server, alice.username, token)
    by_bearer = bearer_client(push_server, alice.username, token)
    assert by_bearer.account_id == alice.account_id == by_token.account_id
    with_password = subscribe(alice, receiver.endpoint())
    with_token = subscribe(by_bearer, receiver.endpoint())
    assert listed_ids(alice) == {with_password}
    assert listed_ids(by_bearer) == {with_token}
    assert listed_ids(by_token) == {with_token}  # the same token, over Basic
    assert listed_ids(bob) == set()
    assert push_get(by_token, ids=[with_password]) == {"list": [],
                                                       "notFound": [with_password]}
    # another credential can neither change nor destroy it
    for client, foreign in ((by_token, with_password), (alice, with_token),
                            (bob, with_password)):
        resp = push_set(client, update={foreign: {"expires": utc_date(time.time() + DAY)}},
                        destroy=[foreign])
        assert resp["notUpdated"][foreign]["type"] == "notFound", resp
        assert resp["notDestroyed"][foreign]["type"] == "notFound", resp
    assert listed_ids(alice) == {with_password} and listed_ids(by_token) == {with_token}


def test_revoking_an_app_password_destroys_its_subscriptions(alice, receiver, push_server):
    token = app_password(push_server, alice.username)
    device = bearer_client(push_server, alice.username, token)
    token_endpoint, password_endpoint = receiver.endpoint(), receiver.endpoint()
    token_sub = live_subscription(device, token_endpoint)
    live_subscription(alice, password_endpoint)
    settle()
    state = make_mailbox(alice)
    assert token_endpoint.expect().json() == exactly(alice.account_id, "Mailbox", state)
    assert password_endpoint.expect().json() == exactly(alice.account_id, "Mailbox", state)
    assert listed_ids(device) == {token_sub}

    done = run_cli("user", "token", "revoke", alice.username, token.split(".")[0],
                   data_dir=push_server.data_dir)
    assert done.returncode == 0, done.stderr
    assert db_rows_mentioning(push_server, token_endpoint.url) == 0  # gone from storage
    state = make_mailbox(alice)
    assert password_endpoint.expect().json() == exactly(alice.account_id, "Mailbox", state)
    token_endpoint.silent(GRACE_S)


def test_changing_the_password_destroys_the_passwords_subscriptions(alice, receiver,
                                                                    push_server):
    token = app_password(push_server, alice.username)
    device = bearer_client(push_server, alice.username, token)
    token_endpoint, password_endpoint = receiver.endpoint(), receiver.endpoint()
    token_sub = live_subscription(device, token_endpoint)
    live_subscription(alice, password_endpoint)
    settle()

    new_password = PASSWORD + " two"
    done = run_cli("user", "passwd", alice.username, "--password-stdin",
                   data_dir=push_server.data_dir, input_text=new_password + "\n")
    assert done.returncode == 0, done.stderr
    relogged = Client(push_server.url, alice.username, new_password)
    assert listed_ids(relogged) == set()
    assert listed_ids(device) == {token_sub}  # the app password's survive
    assert db_rows_mentioning(push_server, password_endpoint.url) == 0
    state = make_mailbox(relogged)
    assert token_endpoint.expect().json() == exactly(alice.account_id, "Mailbox", state)
    password_endpoint.silent(GRACE_S)


# =============================================================================
# RFC 8291: encrypted pushes
# =============================================================================


def test_encrypted_subscription_receives_aes128gcm_pushes(alice, receiver):
    ua = UserAgentKeys.generate()
    endpoint = receiver.endpoint()
    sub_id = subscribe(alice, endpoint, keys=ua.keys())
    push = endpoint.expect()
    verification = decrypted_json(push, ua)
    code = verification["verificationCode"]
    assert verification == {"@type": "PushVerification", "pushSubscriptionId": sub_id,
                            "verificationCode": code}
    verify(alice, sub_id, code)
    settle()
    state = make_mailbox(alice)
    change = endpoint.expect()
    assert decrypted_json(change, ua) == exactly(alice.account_id, "Mailbox", state)
    # RFC 8291 §3.1 / RFC 8188 §2.1: a fresh key pair and salt for every message
    one, two = webpush_decrypt(push.body, ua), webpush_decrypt(change.body, ua)
    assert one.keyid != two.keyid and one.salt != two.salt


def test_invalid_keys_are_invalid_properties(alice, receiver):
    good = UserAgentKeys.generate().keys()
    point = unb64url(good["p256dh"])
    y = int.from_bytes(point[33:], "big")
    off_curve = b64url(point[:33] + ((y + 1) % jmapd.P256_P).to_bytes(32, "big"))
    bad = {
        "off-curve": {**good, "p256dh": off_curve},
        "not-a-point": {**good, "p256dh": b64url(b"hello")},
        "zeros": {**good, "p256dh": b64url(bytes(65))},
        "short-auth": {**good, "auth": b64url(os.urandom(15))},
        "long-auth": {**good, "auth": b64url(os.urandom(17))},
        "no-auth": {"p256dh": good["p256dh"]},
        "no-p256dh": {"auth": good["auth"]},
        "not-strings": {"p256dh": 4, "auth": 16},
        "not-an-object": "p256dh",
    }
    endpoint = receiver.endpoint()
    resp = push_set(alice, create={
        **{name: {"deviceClientId": "d", "url": endpoint.url, "keys": keys}
           for name, keys in bad.items()},
        "good": {"deviceClientId": "d", "url": endpoint.url, "keys": good}})
    assert set(resp["created"] or {}) == {"good"}, resp
    assert set(resp["notCreated"]) == set(bad), resp
    for name, error in resp["notCreated"].items():
        assert error["type"] == "invalidProperties", (name, error)
        assert error["properties"] == ["keys"], (name, error)


# =============================================================================
# RFC 8620 §8.6: only externally resolvable, public https URLs (no test option)
# =============================================================================


BAD_URLS = {
    "http": "http://1.1.1.1/push",
    "loopback": "https://127.0.0.1/push",
    "localhost": "https://localhost/push",
    "private": "https://10.0.0.1/push",
    "ipv6-loopback": "https://[::1]/push",
    "unspecified": "https://0.0.0.0/push",
    "link-local": "https://169.254.169.254/latest/meta-data",
    "mapped-loopback": "https://[::ffff:127.0.0.1]/push",
    "decimal-loopback": "https://2130706433/push",
    "unresolvable": "https://no-such-host.invalid/push",
    "no-host": "https:///push",
    "not-a-url": "push me",
    "userinfo": "https://user:secret@1.1.1.1/push",
}


def test_push_urls_must_be_public_https(strict_server):
    client = new_client(strict_server, "strict")
    resp = push_set(client, create={name: {"deviceClientId": "d", "url": url}
                                    for name, url in BAD_URLS.items()})
    assert resp["created"] is None, resp
    assert set(resp["notCreated"]) == set(BAD_URLS), resp
    for name, error in resp["notCreated"].items():
        assert error["type"] == "invalidProperties", (name, error)
        assert error["properties"] == ["url"], (name, error)
    # ... while a public https URL is accepted. It is made already expired, so the server
    # drops it before it would POST anywhere, and is destroyed at once besides.
    resp = create(client, "https://1.1.1.1/jmapd-test-push", expires="2000-01-01T00:00:00Z")
    assert resp["notCreated"] is None and "k" in resp["created"], resp
    push_set(client, destroy=[resp["created"]["k"]["id"]])


def test_loopback_is_refused_over_https_even_with_the_http_url_allowed(alice, receiver):
    """The test option admits loopback addresses only; private ones stay refused."""
    resp = create(alice, "http://10.0.0.1/push")
    assert resp["notCreated"]["k"]["type"] == "invalidProperties", resp
    assert resp["notCreated"]["k"]["properties"] == ["url"], resp


# =============================================================================
# Delivery: back-off, gone endpoints, expiry, limits
# =============================================================================


def test_failing_endpoint_is_retried_with_back_off(alice, receiver):
    endpoint = receiver.endpoint(500)
    sub_id = subscribe(alice, endpoint)
    first = endpoint.expect()
    code = first.json()["verificationCode"]
    endpoint.silent(4)  # not at once: it backs off (jmapd: 10 s, doubling)
    retry = endpoint.expect(timeout=20)
    assert retry.at - first.at >= 5, retry.at - first.at
    assert retry.json() == first.json() == {"@type": "PushVerification",
                                            "pushSubscriptionId": sub_id,
                                            "verificationCode": code}
    verify(alice, sub_id, code)  # the retried verification counts


def test_too_many_requests_honours_retry_after(alice, receiver):
    endpoint = receiver.endpoint((429, {"Retry-After": "3"}))
    sub_id = subscribe(alice, endpoint)
    first = endpoint.expect()
    retry = endpoint.expect(timeout=WAIT_S + 3)
    gap = retry.at - first.at
    assert gap >= 1.8, gap  # RFC 8620 §7.2: slower on 429 (jmapd: whole seconds)
    assert gap < 9, gap  # Retry-After, not the default 10 s back-off
    assert retry.json() == first.json()
    assert sub_id in listed_ids(alice)


@pytest.mark.parametrize("status", [404, 410])
def test_gone_endpoint_destroys_the_subscription(alice, receiver, push_server, status):
    """A push service answers 404/410 for a subscription that no longer exists."""
    endpoint = receiver.endpoint(status)
    sub_id = subscribe(alice, endpoint)
    assert endpoint.expect().json()["pushSubscriptionId"] == sub_id
    assert wait_until_gone(alice, sub_id) == {"list": [], "notFound": [sub_id]}
    assert db_rows_mentioning(push_server, endpoint.url) == 0


def test_gone_on_a_state_change_destroys_a_verified_subscription(alice, receiver):
    endpoint = receiver.endpoint(201, 410)  # the verification is taken, the change is not
    sub_id = live_subscription(alice, endpoint)
    settle()
    make_mailbox(alice)
    assert endpoint.expect().json()["@type"] == "StateChange"
    assert wait_until_gone(alice, sub_id) == {"list": [], "notFound": [sub_id]}
    make_mailbox(alice)
    endpoint.silent(1.5)


def test_nothing_is_posted_after_expires_and_the_subscription_goes(alice, receiver):
    endpoint, barrier = receiver.endpoint(), receiver.endpoint()
    sub_id = live_subscription(alice, endpoint)
    live_subscription(alice, barrier)
    settle()
    state = make_mailbox(alice)
    assert endpoint.expect().json() == exactly(alice.account_id, "Mailbox", state)
    assert barrier.expect().json() == exactly(alice.account_id, "Mailbox", state)
    soon = utc_date(time.time() + 2)
    resp = push_set(alice, update={sub_id: {"expires": soon}})
    assert resp["notUpdated"] is None, resp
    time.sleep(max(0.0, parse_utc_date(soon) - time.time()) + 1.2)
    state = make_mailbox(alice)
    assert barrier.expect().json() == exactly(alice.account_id, "Mailbox", state)
    endpoint.silent(GRACE_S)
    assert wait_until_gone(alice, sub_id) == {"list": [], "notFound": [sub_id]}


def test_eleventh_subscription_of_a_user_is_over_quota(alice, receiver, push_server):
    endpoint = receiver.endpoint()
    resp = push_set(alice, create={f"s{i}": {"deviceClientId": f"d{i}", "url": endpoint.url}
                                   for i in range(10)})
    assert resp["notCreated"] is None and len(resp["created"]) == 10, resp
    resp = create(alice, endpoint.url)
    assert resp["created"] is None and resp["notCreated"]["k"]["type"] == "overQuota", resp
    # per user, whatever the credential (RFC 8620 §8.6)
    device = bearer_client(push_server, alice.username, app_password(push_server,
                                                                      alice.username))
    resp = create(device, endpoint.url)
    assert resp["created"] is None and resp["notCreated"]["k"]["type"] == "overQuota", resp
    one = sorted(listed_ids(alice))[0]
    assert push_set(alice, destroy=[one])["destroyed"] == [one]
    resp = create(device, endpoint.url)
    assert resp["notCreated"] is None and "k" in resp["created"], resp


def test_more_than_twenty_creations_an_hour_are_rate_limited(alice, receiver):
    endpoint = receiver.endpoint()
    for _ in range(2):  # 20 made, each batch destroyed so that the count stays at 10
        resp = push_set(alice, create={f"s{i}": {"deviceClientId": f"d{i}",
                                                 "url": endpoint.url} for i in range(10)})
        assert resp["notCreated"] is None and len(resp["created"]) == 10, resp
        ids = [c["id"] for c in resp["created"].values()]
        assert sorted(push_set(alice, destroy=ids)["destroyed"]) == sorted(ids)
    assert listed_ids(alice) == set()
    resp = create(alice, endpoint.url)
    assert resp["created"] is None and resp["notCreated"]["k"]["type"] == "rateLimit", resp


def test_rate_limit_counts_subscriptions_that_have_expired(alice, receiver):
    endpoint = receiver.endpoint()
    for _ in range(2):  # 20 made, each batch left to expire (the count stays under 10)
        soon = utc_date(time.time() + 1)
        resp = push_set(alice, create={f"s{i}": {"deviceClientId": f"d{i}", "url": endpoint.url,
                                                 "expires": soon} for i in range(10)})
        assert resp["notCreated"] is None and len(resp["created"]) == 10, resp
        deadline = time.monotonic() + WAIT_S
        while listed_ids(alice) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert listed_ids(alice) == set()
    resp = create(alice, endpoint.url)
    assert resp["created"] is None, resp
    assert resp["notCreated"]["k"]["type"] == "rateLimit", resp


# =============================================================================
# Destroy
# =============================================================================


def test_destroyed_subscription_gets_no_more_pushes(alice, receiver):
    ua = UserAgentKeys.generate()
    endpoint, barrier = receiver.endpoint(), receiver.endpoint()
    sub_id = subscribe(alice, endpoint, keys=ua.keys())
    verify(alice, sub_id, decrypted_json(endpoint.expect(), ua)["verificationCode"])
    barrier_id = live_subscription(alice, barrier)
    settle()
    state = make_mailbox(alice)
    assert decrypted_json(endpoint.expect(), ua) == exactly(alice.account_id, "Mailbox", state)
    assert barrier.expect().json() == exactly(alice.account_id, "Mailbox", state)

    resp = push_set(alice, destroy=[sub_id])
    assert resp["destroyed"] == [sub_id] and resp["notDestroyed"] is None, resp
    assert push_get(alice, ids=[sub_id]) == {"list": [], "notFound": [sub_id]}
    assert listed_ids(alice) == {barrier_id}
    state = make_mailbox(alice)
    assert barrier.expect().json() == exactly(alice.account_id, "Mailbox", state)
    endpoint.silent(GRACE_S)
    resp = push_set(alice, destroy=[sub_id])
    assert resp["notDestroyed"][sub_id]["type"] == "notFound", resp
    resp = push_set(alice, update={sub_id: {"expires": utc_date(time.time() + DAY)}})
    assert resp["notUpdated"][sub_id]["type"] == "notFound", resp


def test_destroy_erases_url_and_keys_from_storage(alice, receiver, push_server):
    ua = UserAgentKeys.generate()
    endpoint = receiver.endpoint()
    sub_id = subscribe(alice, endpoint, keys=ua.keys())
    needles = (endpoint.url, ua.keys()["p256dh"], ua.keys()["auth"])
    assert db_rows_mentioning(push_server, *needles) == 3  # (the probe finds them)
    assert push_set(alice, destroy=[sub_id])["destroyed"] == [sub_id]
    assert db_rows_mentioning(push_server, *needles) == 0
