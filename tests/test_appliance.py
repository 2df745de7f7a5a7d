"""jmapd as an installed service: the systemd unit, the reverse-proxy examples in contrib/,
and the administrator's commands `backup`, `restore` and `check` (section 14).

RFC 8620 §2 (session URLs behind a proxy), §2.2 (/.well-known/jmap, RFC 8615), §6.1/§6.2
(upload and download through the proxy); X-Forwarded-For as nginx builds it
($proxy_add_x_forwarded_for); systemd.exec(5)/systemd.service(5) and sd_notify(3).

The unit is checked with `systemd-analyze` and by running its ExecStart line; nginx is run
for real with contrib/nginx.conf and contrib/jmapd-proxy.conf, and Caddy with
contrib/Caddyfile (each skipped where not installed). Behind each, jmapd also serves JMAP
over WebSocket (RFC 8887) on its own listener, which the proxy maps onto /jmap/ws/ of the
same origin; the `websockets` package is the client there (wss:// through the proxy).
"""

import base64
import hashlib
import inspect
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from conftest import CORE, JMAPD, PASSWORD, ROOT, USING, Client, Server, add_user, run_cli

UNIT = ROOT / "jmapd.service"
CONTRIB = ROOT / "contrib"
ALICE = "alice@example.com"
BOB, CAROL = "bob@example.com", "carol@example.com"  # never cached: see test_http


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def have_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def upload(client, data, media_type="application/octet-stream", base=None):
    url = client.session["uploadUrl"].replace("{accountId}", client.account_id)
    if base:
        url = base + urlsplit(url).path
    r = client.http.post(url, data=data, headers={"Content-Type": media_type}, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["size"] == len(data)
    return r.json()["blobId"]


def download(client, blob_id, base=None):
    url = (client.session["downloadUrl"].replace("{accountId}", client.account_id)
           .replace("{blobId}", blob_id).replace("{name}", "data.bin")
           .replace("{type}", "application/octet-stream"))
    if base:
        parts = urlsplit(url)
        url = base + parts.path + "?" + parts.query
    return client.http.get(url, timeout=120)


def create_mailboxes(client, names):
    created = client.ok("Mailbox/set", {"accountId": client.account_id, "create": {
        f"n{i}": {"name": name} for i, name in enumerate(names)}})
    assert len(created.get("created", {})) == len(names), created
    return created["created"]


def mailbox_names(client):
    got = client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None,
                                    "properties": ["name"]})
    return {m["name"] for m in got["list"]}


def recv_notify(sock, proc, timeout=20):
    """Receive one sd_notify datagram as the set of its lines."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except socket.timeout:
            if proc.poll() is not None:
                pytest.fail(f"jmapd exited {proc.returncode} before notifying")
            continue
        return set(data.decode().split("\n")) - {""}
    pytest.fail("no sd_notify message")


def websocket_port(server):
    """The port of jmapd's WebSocket listener (--websocket 127.0.0.1:0), from its log."""
    match = re.search(r"JMAP over WebSocket on ws://127\.0\.0\.1:(\d+)/jmap/ws/", server.log())
    assert match, server.log()
    return int(match.group(1))


def check_websocket_through_proxy(proxy, ca_file):
    """RFC 8887 through the proxy: the session (asked through it) names the same-origin
    wss URL; there, with the test's own CA trusted, a Core/echo is answered and a change
    by another client (HTTP through the proxy) is pushed. A page of the proxy's own
    origin may use Basic; a foreign origin is refused (jmapd sees the forwarded origin)."""
    ws_client = pytest.importorskip("websockets.sync.client")
    from websockets.exceptions import InvalidStatus

    client = proxy.client()
    capability = client.session["capabilities"]["urn:ietf:params:jmap:websocket"]
    assert capability == {"url": f"wss://{urlsplit(proxy.base).netloc}/jmap/ws/",
                          "supportsPush": True}, capability
    context = ssl.create_default_context(cafile=str(ca_file))
    kwargs = {"ssl": context, "subprotocols": ["jmap"], "open_timeout": 30,
              "additional_headers": {"Authorization": "Basic " + base64.b64encode(
                  f"{ALICE}:{PASSWORD}".encode()).decode()}}
    if "proxy" in inspect.signature(ws_client.connect).parameters:
        kwargs["proxy"] = None  # never an HTTP proxy from the environment

    def recv(ws):
        return json.loads(ws.recv(timeout=30))

    with ws_client.connect(capability["url"], origin=proxy.base, **kwargs) as ws:
        assert ws.subprotocol == "jmap"
        ws.send(json.dumps({"@type": "Request", "id": "R1", "using": [CORE],
                            "methodCalls": [["Core/echo", {"hello": True, "high": 5}, "b3ff"]]}))
        assert recv(ws) == {"@type": "Response", "requestId": "R1",
                            "methodResponses": [["Core/echo", {"hello": True, "high": 5}, "b3ff"]],
                            "sessionState": client.session["state"]}
        ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": ["Mailbox"]}))
        ws.send(json.dumps({"@type": "Request", "id": "sync", "using": [CORE],
                            "methodCalls": [["Core/echo", {}, "s"]]}))
        assert recv(ws)["requestId"] == "sync"  # the enable was read before the change
        writer = proxy.client()
        created = writer.ok("Mailbox/set", {"accountId": writer.account_id, "create": {
            "m": {"name": f"via websocket {secrets.token_hex(4)}"}}})
        change = recv(ws)
        assert change["@type"] == "StateChange", change
        assert change["changed"] == {writer.account_id: {"Mailbox": created["newState"]}}, change
        assert isinstance(change["pushState"], str) and change["pushState"], change

    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(capability["url"], origin="https://evil.example", **kwargs)
    assert refused.value.response.status_code == 403


# ---------------------------------------------------------------------------
# the systemd unit
# ---------------------------------------------------------------------------


def unit_entries(path=UNIT):
    """[(section, key, value)] of a unit file, in order (keys may repeat)."""
    entries, section, pending = [], None, ""
    for raw in Path(path).read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_value(key, section="Service"):
    values = [v for s, k, v in unit_entries() if s == section and k == key]
    assert values, f"{key}= missing from [{section}]"
    return values[-1]


def unit_environment():
    env = {}
    for section, key, value in unit_entries():
        if section == "Service" and key == "Environment":
            for assignment in shlex.split(value):
                name, _, val = assignment.partition("=")
                env[name] = val
    return env


def unit_argv(variables=None):
    """ExecStart as systemd runs it (systemd.exec(5) "Command lines"): a word that is a
    lone $NAME becomes the words of that variable's value, or nothing if it is unset."""
    variables = {**unit_environment(), **(variables or {})}
    argv = []
    for word in shlex.split(unit_value("ExecStart")):
        match = re.fullmatch(r"\$(\w+)|\$\{(\w+)\}", word)
        if match:
            argv += variables.get(match.group(1) or match.group(2), "").split()
        else:
            argv.append(word)
    return argv


def option_value(argv, flag):
    assert flag in argv, argv
    return argv[argv.index(flag) + 1]


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


@needs_systemd_analyze
def test_appliance_unit_verifies(tmp_path):
    unit = tmp_path / "jmapd.service"
    shutil.copy(UNIT, unit)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    bad = [line for line in output.splitlines()
           if re.search(r"error|invalid|unknown|ignoring|failed|not executable|deprecated",
                        line, re.I)]
    assert not bad, output


@needs_systemd_analyze
def test_appliance_unit_security_exposure(tmp_path):
    unit = tmp_path / "jmapd.service"
    shutil.copy(UNIT, unit)
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout
    exposure = float(match.group(1))
    print(f"systemd-analyze security: overall exposure {exposure}")
    assert exposure <= 2.0, done.stdout


def test_appliance_unit_settings():
    assert unit_value("Type") == "notify"
    assert unit_value("NotifyAccess") in ("main", "all")
    assert unit_value("User") == "jmapd"
    assert unit_value("Restart") == "on-failure"
    state = unit_value("StateDirectory")
    assert state == "jmapd"
    state_dir = f"/var/lib/{state}"
    tmpdir = unit_environment().get("TMPDIR", "")
    assert tmpdir.startswith(state_dir + "/"), tmpdir
    argv = unit_argv()
    assert "serve" in argv
    assert option_value(argv, "--data-dir").rstrip("/") == state_dir
    host = option_value(argv, "--listen").rsplit(":", 1)[0].strip("[]")
    assert host in ("127.0.0.1", "::1", "localhost")
    # systemd must not SIGKILL while jmapd still drains requests in flight.
    text = JMAPD.read_text()
    drain = int(re.search(r"^DRAIN_SECONDS = (\d+)", text, re.M).group(1))
    stop = unit_value("TimeoutStopSec")
    seconds = int(re.fullmatch(r"(\d+)s?", stop).group(1))
    assert seconds > drain, (stop, drain)


def test_appliance_unit_allows_the_unix_socket_contrib_suggests():
    match = re.search(r"--unix-socket\s+(/\S+)", (CONTRIB / "nginx.conf").read_text())
    if not match:
        pytest.skip("contrib/nginx.conf suggests no Unix socket")
    folder = os.path.dirname(match.group(1))
    writable = [f"/var/lib/{v}" for v in unit_value("StateDirectory").split()]
    entries = unit_entries()
    for section, key, value in entries:
        if section == "Service" and key == "RuntimeDirectory":
            writable += [f"/run/{v}" for v in value.split()]
        if section == "Service" and key == "ReadWritePaths":
            writable += [v.lstrip("-+") for v in value.split()]
    assert any(folder == w or folder.startswith(w.rstrip("/") + "/") for w in writable), (
        folder, writable)


def test_appliance_unit_execstart_runs_as_notify_service(tmp_path):
    """Run the unit's own ExecStart line (paths moved into tmp) the way systemd would."""
    argv = unit_argv()
    assert Path(argv[0]).name.startswith("python3"), argv
    assert argv[1].endswith("/jmapd.py"), argv
    state_dir = option_value(argv, "--data-dir").rstrip("/")
    data_dir = tmp_path / "state"
    add_user(data_dir, ALICE)
    argv = [sys.executable, str(JMAPD), *argv[2:], "--test-cheap-hashing"]
    argv[argv.index("--data-dir") + 1] = str(data_dir)
    argv[argv.index("--listen") + 1] = "127.0.0.1:0"
    env = {**os.environ}
    for name, value in unit_environment().items():
        env[name] = value.replace(state_dir, str(data_dir))
    short = tempfile.mkdtemp(prefix="jmapd-notify-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(short, "notify"))
    env["NOTIFY_SOCKET"] = os.path.join(short, "notify")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        assert "READY=1" in recv_notify(sock, proc)
        url = re.search(r"listening on (http://\S+?)/? ", log_path.read_text()).group(1)
        client = Client(url.rstrip("/"), ALICE)
        assert client.ok("Core/echo", {"x": 1}, using=[CORE]) == {"x": 1}
        blob = secrets.token_bytes(4096)
        assert download(client, upload(client, blob)).content == blob
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in recv_notify(sock, proc)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        shutil.rmtree(short, ignore_errors=True)


# ---------------------------------------------------------------------------
# backup, restore, check
# ---------------------------------------------------------------------------


class Writer(threading.Thread):
    """Keep creating Mailboxes and uploading blobs until stopped."""

    def __init__(self, url, username, tag):
        super().__init__(daemon=True)
        self.client = Client(url, username)
        self.tag = tag
        self.done = 0
        self.errors = []
        self.stopping = threading.Event()

    def run(self):
        try:
            while not self.stopping.is_set():
                create_mailboxes(self.client, [f"{self.tag} {self.done}"])
                upload(self.client, secrets.token_bytes(20_000))
                self.done += 1
        except Exception as exc:  # reported by the test
            self.errors.append(exc)

    def wait_for(self, count, timeout=30):
        deadline = time.monotonic() + timeout
        while self.done < count and time.monotonic() < deadline and not self.errors:
            time.sleep(0.02)
        assert not self.errors, self.errors
        assert self.done >= count

    def stop(self):
        self.stopping.set()
        self.join(30)
        assert not self.errors, self.errors


@pytest.fixture
def live(tmp_path):
    """A running server on tmp/data with alice, and her client."""
    data_dir = tmp_path / "data"
    add_user(data_dir, ALICE)
    srv = Server(data_dir).start()
    yield srv, Client(srv.url, ALICE)
    srv.stop()


def test_appliance_backup_during_writes_restores(tmp_path, live):
    srv, client = live
    before_names = [f"before {i}" for i in range(20)]
    create_mailboxes(client, before_names)
    before_blobs = {}
    for size in (1, 1000, 300_000, 1_500_000):
        data = secrets.token_bytes(size)
        before_blobs[upload(client, data)] = data

    writer = Writer(srv.url, ALICE, "during")
    writer.start()
    try:
        writer.wait_for(3)
        started_at = writer.done
        backup = tmp_path / "backup"
        done = run_cli("backup", backup, data_dir=srv.data_dir)
        finished_at = writer.done
    finally:
        writer.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert finished_at > started_at, "no write overlapped the backup"

    restored = tmp_path / "restored"
    done = run_cli("restore", backup, data_dir=restored)
    assert done.returncode == 0, done.stdout + done.stderr

    again = Server(restored).start()
    try:
        other = Client(again.url, ALICE)
        assert other.account_id == client.account_id
        names = mailbox_names(other)
        assert set(before_names) <= names
        assert {f"during {i}" for i in range(started_at)} <= names
        for blob_id, data in before_blobs.items():
            r = download(other, blob_id)
            assert r.status_code == 200, r.text
            assert r.content == data
        # The restored server is a working one: it takes new writes too.
        create_mailboxes(other, ["after restore"])
        assert "after restore" in mailbox_names(other)
    finally:
        again.stop()
    assert again.proc.returncode == 0

    done = run_cli("check", data_dir=restored)
    assert done.returncode == 0, done.stdout + done.stderr


def test_appliance_backup_refuses_non_empty_dest(tmp_path, live):
    srv, _ = live
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    done = run_cli("backup", dest, data_dir=srv.data_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "precious"
    # A file where the directory should be is refused too.
    target = tmp_path / "a-file"
    target.write_text("x")
    assert run_cli("backup", target, data_dir=srv.data_dir).returncode == 1
    assert target.read_text() == "x"


def test_appliance_restore_refuses_non_empty_target(tmp_path, live):
    srv, client = live
    backup = tmp_path / "backup"
    assert run_cli("backup", backup, data_dir=srv.data_dir).returncode == 0

    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    done = run_cli("restore", backup, data_dir=target)
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]

    # Restoring over the live data directory is refused and changes nothing in it.
    create_mailboxes(client, ["after backup"])
    db_file = next(p for p in srv.data_dir.iterdir() if p.suffix.startswith(".sqlite"))
    before = hashlib.sha256(db_file.read_bytes()).hexdigest()
    done = run_cli("restore", backup, data_dir=srv.data_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    assert hashlib.sha256(db_file.read_bytes()).hexdigest() == before
    assert "after backup" in mailbox_names(client)

    # Something that is not a backup is refused.
    not_backup = tmp_path / "not-a-backup"
    not_backup.mkdir()
    assert run_cli("restore", not_backup, data_dir=tmp_path / "fresh").returncode == 1


def blob_file(data_dir, blob_id):
    sha = blob_id[1:]
    assert re.fullmatch(r"[0-9a-f]{64}", sha), blob_id
    path = Path(data_dir) / "blobs" / sha[:2] / sha
    assert path.is_file(), path
    return sha, path


def lines_naming(output, sha):
    return [line for line in output.splitlines() if sha in line]


def test_appliance_check_live_data_dir(tmp_path, live):
    srv, client = live
    blobs = {}
    for _ in range(3):
        data = secrets.token_bytes(50_000)
        blobs[upload(client, data)] = data
    (damaged_id, _), (missing_id, _), (intact_id, _) = blobs.items()

    writer = Writer(srv.url, ALICE, "meanwhile")
    writer.start()
    try:
        writer.wait_for(2)
        done = run_cli("check", data_dir=srv.data_dir)
    finally:
        writer.stop()
    assert done.returncode == 0, done.stdout + done.stderr

    damaged_sha, damaged_path = blob_file(srv.data_dir, damaged_id)
    os.chmod(damaged_path, 0o600)
    with open(damaged_path, "r+b") as f:
        f.seek(25_000)
        original = f.read(4)
        f.seek(25_000)
        f.write(bytes(b ^ 0xFF for b in original))
    done = run_cli("check", data_dir=srv.data_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    assert lines_naming(done.stdout + done.stderr, damaged_sha), done.stdout
    for other in (missing_id, intact_id):
        assert not lines_naming(done.stdout + done.stderr, other[1:]), done.stdout

    missing_sha, missing_path = blob_file(srv.data_dir, missing_id)
    missing_path.unlink()
    done = run_cli("check", data_dir=srv.data_dir)
    assert done.returncode == 1
    named = lines_naming(done.stdout + done.stderr, missing_sha)
    assert named and "missing" in named[0].lower(), done.stdout
    assert lines_naming(done.stdout + done.stderr, damaged_sha)

    stray = secrets.token_bytes(100)
    stray_sha = hashlib.sha256(stray).hexdigest()
    stray_path = Path(srv.data_dir) / "blobs" / stray_sha[:2] / stray_sha
    stray_path.parent.mkdir(exist_ok=True)
    stray_path.write_bytes(stray)
    done = run_cli("check", data_dir=srv.data_dir)
    named = lines_naming(done.stdout + done.stderr, stray_sha)
    assert named and "orphan" in named[0].lower(), done.stdout
    # The intact blob is still served intact by the running server.
    assert download(client, intact_id).content == blobs[intact_id]


# ---------------------------------------------------------------------------
# nginx in front (contrib/nginx.conf + contrib/jmapd-proxy.conf), for real
# ---------------------------------------------------------------------------

NGINX = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")


def free_port(ipv6_too):
    for _ in range(50):
        with socket.socket() as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            if not ipv6_too:
                return port
            try:
                with socket.socket(socket.AF_INET6) as s6:
                    s6.bind(("::1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def render_site(jmapd_port, nginx_port, ipv6, cert, key, include, ws_port):
    """contrib/nginx.conf with this test's ports, certificate and include path."""
    text = (CONTRIB / "nginx.conf").read_text()
    ipv6_listen = f"listen [::1]:{nginx_port} ssl;" if ipv6 else ""
    substitutions = [
        (r"server\s+127\.0\.0\.1:8080\s*;", f"server 127.0.0.1:{jmapd_port};", 1),
        (r"server\s+127\.0\.0\.1:8081\s*;", f"server 127.0.0.1:{ws_port};", 1),
        (r"listen\s+443\s+ssl\s*;", f"listen 127.0.0.1:{nginx_port} ssl;", 1),
        (r"listen\s+\[::\]:443\s+ssl\s*;", ipv6_listen, 1),
        (r"server_name\s+[^;]+;", "server_name 127.0.0.1;", 1),
        (r"ssl_certificate\s+[^;]+;", f"ssl_certificate {cert};", 1),
        (r"ssl_certificate_key\s+[^;]+;", f"ssl_certificate_key {key};", 1),
        # /.well-known/jmap, /jmap/, /jmap/eventsource/, /jmap/ws/
        (r"include\s+/etc/nginx/jmapd-proxy\.conf\s*;", f"include {include};", 4),
    ]
    for pattern, replacement, count in substitutions:
        text, made = re.subn(pattern, replacement, text)
        assert made == count, f"contrib/nginx.conf: {pattern!r} found {made} times"
    return text


def top_level_conf(prefix, site):
    version = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    temp = [f"client_body_temp_path {prefix}/body;", f"proxy_temp_path {prefix}/proxy;"]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in version:
            temp.append(f"{module}_temp_path {prefix}/{module};")
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    return "\n".join([
        "daemon off;", "worker_processes 1;", user, f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log info;",
        "events { worker_connections 64; }",
        "http {", f"    access_log {prefix}/access.log;", *("    " + t for t in temp),
        f"    include {site};", "}", "",
    ])


class Proxied:
    """jmapd behind a real nginx configured from contrib/."""

    def __init__(self, tmp_path_factory):
        self.ipv6 = have_ipv6_loopback()
        self.prefix = Path(tempfile.mkdtemp(prefix="jmapd-nginx-"))
        os.chmod(self.prefix, 0o711)  # nginx workers (nobody) may need to reach temp dirs
        self.cert, self.key = self.prefix / "cert.pem", self.prefix / "key.pem"
        san = "IP:127.0.0.1,IP:::1,DNS:localhost"
        done = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", f"subjectAltName={san}",
             "-keyout", str(self.key), "-out", str(self.cert)],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        data_dir = tmp_path_factory.mktemp("proxied") / "data"
        for user in (ALICE, BOB, CAROL):
            add_user(data_dir, user)
        self.jmapd = Server(data_dir, "--trusted-proxy", "127.0.0.1",
                            "--max-login-failures-per-address", "3",
                            "--websocket", "127.0.0.1:0").start()
        try:
            self.port = free_port(self.ipv6)
            shutil.copy(CONTRIB / "jmapd-proxy.conf", self.prefix / "jmapd-proxy.conf")
            site = self.prefix / "jmapd.conf"
            site.write_text(render_site(
                int(self.jmapd.url.rsplit(":", 1)[1]), self.port, self.ipv6, self.cert,
                self.key, self.prefix / "jmapd-proxy.conf", websocket_port(self.jmapd)))
            self.conf = self.prefix / "nginx.conf"
            self.conf.write_text(top_level_conf(self.prefix, site))
        except BaseException:
            self.jmapd.stop()  # the fixture never gets to stop() when this fails
            raise
        self.base = f"https://127.0.0.1:{self.port}"
        self.base6 = f"https://[::1]:{self.port}"
        self.proc = None

    def nginx_cmd(self, *extra):
        return [NGINX, "-p", str(self.prefix), "-c", str(self.conf),
                "-e", str(self.prefix / "error.log"), *extra]

    def start(self):
        self.log = open(self.prefix / "nginx.out", "w")
        self.proc = subprocess.Popen(self.nginx_cmd(), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.errors()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start: {self.errors()}")

    def errors(self):
        out = ""
        for name in ("nginx.out", "error.log"):
            path = self.prefix / name
            if path.exists():
                out += path.read_text()
        return out

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        self.jmapd.stop()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def client(self, base=None):
        client = Client(base or self.base, ALICE)
        client.http.verify = str(self.cert)
        client.http.trust_env = False  # else REQUESTS_CA_BUNDLE overrides .verify
        return client


needs_nginx = pytest.mark.skipif(not NGINX or shutil.which("openssl") is None,
                                 reason="nginx or openssl is not installed")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    setup = Proxied(tmp_path_factory)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def check_session_urls_on_proxy(proxy):
    """Every session URL is https on the proxy's host:port, and the apiUrl works."""
    session = proxy.client().session
    assert session["apiUrl"] == f"{proxy.base}/jmap/api/"
    for key in ("downloadUrl", "uploadUrl", "eventSourceUrl"):
        assert session[key].startswith(f"{proxy.base}/jmap/"), session[key]
    client = proxy.client()
    assert client.ok("Core/echo", {"via": "session apiUrl"}, using=[CORE]) == {
        "via": "session apiUrl"}


def check_api_call_through_proxy(proxy):
    """A two-call API request through the proxy is answered in full."""
    client = proxy.client()
    r = client.http.post(proxy.base + "/jmap/api/", timeout=30, json={
        "using": USING, "methodCalls": [
            ["Core/echo", {"hello": True}, "e"],
            ["Mailbox/get", {"accountId": client.account_id, "ids": None}, "m"]]})
    assert r.status_code == 200, r.text
    responses = r.json()["methodResponses"]
    assert responses[0] == ["Core/echo", {"hello": True}, "e"]
    assert responses[1][0] == "Mailbox/get"
    assert "inbox" in {m["role"] for m in responses[1][1]["list"]}


@needs_nginx
def test_appliance_nginx_config_test_accepts_rendered_config(proxied):
    done = subprocess.run(proxied.nginx_cmd("-t"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr and "test is successful" in done.stderr, done.stderr


@needs_nginx
def test_appliance_nginx_well_known_redirects_to_https(proxied):
    r = requests.get(proxied.base + "/.well-known/jmap", allow_redirects=False,
                     verify=str(proxied.cert), timeout=30)
    assert r.status_code in (301, 302, 307, 308), r.text
    assert r.headers["Location"] == f"{proxied.base}/jmap/session"


@needs_nginx
def test_appliance_nginx_session_urls_are_https_on_nginx(proxied):
    check_session_urls_on_proxy(proxied)


@needs_nginx
def test_appliance_nginx_api_call(proxied):
    check_api_call_through_proxy(proxied)


@needs_nginx
def test_appliance_nginx_upload_download_3mb(proxied):
    client = proxied.client()
    data = secrets.token_bytes(3 * 1024 * 1024)
    blob_id = upload(client, data, base=proxied.base)
    r = download(client, blob_id, base=proxied.base)
    assert r.status_code == 200, r.text
    assert "Content-Encoding" not in r.headers
    assert r.content == data


@needs_nginx
def test_appliance_nginx_websocket(proxied):
    check_websocket_through_proxy(proxied, proxied.cert)


@needs_nginx
def test_appliance_nginx_forged_x_forwarded_for_is_not_the_client(proxied):
    """Runs last in this module: it spends [::1]'s login-failure budget on purpose.

    bob and carol never logged in before, so no cached credential hides the limiter.

    The client comes from [::1] (untrusted by jmapd, which trusts 127.0.0.1 only), so
    nginx sends "FORGED, ::1" and the rightmost untrusted address, ::1, is the client.
    """
    if not proxied.ipv6:
        pytest.skip("no IPv6 loopback: the client would share the proxy's address")
    cert = str(proxied.cert)

    def login(password, forged=None):
        headers = {"X-Forwarded-For": forged} if forged else {}
        return requests.get(proxied.base6 + "/jmap/session", auth=(BOB, password),
                            headers=headers, verify=cert, timeout=30)

    for n in range(3):  # each with a different forged address
        assert login("wrong", f"203.0.113.{n + 1}").status_code == 401
    blocked = login(PASSWORD, "203.0.113.50")
    assert blocked.status_code == 429, blocked.text
    assert "Retry-After" in blocked.headers
    assert login(PASSWORD).status_code == 429
    # Another client address (127.0.0.1 via nginx) has its own budget.
    fresh = requests.get(proxied.base + "/jmap/session", auth=(CAROL, PASSWORD),
                         verify=cert, timeout=30)
    assert fresh.status_code == 200, fresh.text


# ---------------------------------------------------------------------------
# Caddy in front (contrib/Caddyfile), for real
# ---------------------------------------------------------------------------

CADDY = shutil.which("caddy")
needs_caddy = pytest.mark.skipif(CADDY is None, reason="caddy is not installed")


def caddy_env(home):
    """Caddy's environment with HOME and the XDG folders inside `home` (a tmp dir)."""
    env = {**os.environ}
    for name in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        env[name] = str(home / name.lower())
        os.makedirs(env[name], exist_ok=True)
    return env


def render_caddyfile(jmapd_port, caddy_port, ipv6, ws_port):
    """contrib/Caddyfile with this test's addresses; its site block otherwise as shipped.

    The global options keep Caddy on loopback and off the network and the system: no admin
    endpoint, no port-80 redirect listener, certificates from its own local CA (in the tmp
    data folder) instead of ACME, and that CA not installed into any trust store.
    """
    text = (CONTRIB / "Caddyfile").read_text()
    sites = f"https://127.0.0.1:{caddy_port}"
    if ipv6:
        sites += f", https://[::1]:{caddy_port}"
    substitutions = [
        (r"^mail\.example\.com(\s*\{)", sites + r"\1", 1),
        (r"(reverse_proxy\s+\S+\s+)127\.0\.0\.1:8080\b", rf"\g<1>127.0.0.1:{jmapd_port}", 2),
        (r"(reverse_proxy\s+\S+\s+)127\.0\.0\.1:8081\b", rf"\g<1>127.0.0.1:{ws_port}", 1),
    ]
    for pattern, replacement, count in substitutions:
        text, made = re.subn(pattern, replacement, text, flags=re.M)
        assert made == count, f"contrib/Caddyfile: {pattern!r} found {made} times"
    binds = "127.0.0.1 [::1]" if ipv6 else "127.0.0.1"
    options = "\n".join(["{", "\tadmin off", f"\tdefault_bind {binds}",
                         "\tauto_https disable_redirects", "\tlocal_certs",
                         "\tskip_install_trust", "}", "", ""])
    return options + text


class CaddyProxied:
    """jmapd behind a real Caddy configured from contrib/Caddyfile."""

    def __init__(self, tmp_path_factory):
        self.ipv6 = have_ipv6_loopback()
        self.prefix = tmp_path_factory.mktemp("caddy")
        self.env = caddy_env(self.prefix)
        self.conf = self.prefix / "Caddyfile"
        self.root = (Path(self.env["XDG_DATA_HOME"]) / "caddy" / "pki" / "authorities"
                     / "local" / "root.crt")
        self.jmapd = self.proc = self.log = None

    def start(self):
        """Start jmapd, then Caddy; stop() cleans up after a start that failed half-way."""
        data_dir = self.prefix / "jmapd" / "data"
        for user in (ALICE, BOB, CAROL):
            add_user(data_dir, user)
        # Caddy dials the upstream as written, 127.0.0.1, so only that address is trusted.
        self.jmapd = Server(data_dir, "--trusted-proxy", "127.0.0.1",
                            "--max-login-failures-per-address", "3",
                            "--websocket", "127.0.0.1:0").start()
        self.port = free_port(self.ipv6)
        self.base = f"https://127.0.0.1:{self.port}"
        self.base6 = f"https://[::1]:{self.port}"
        self.conf.write_text(render_caddyfile(int(self.jmapd.url.rsplit(":", 1)[1]),
                                              self.port, self.ipv6, websocket_port(self.jmapd)))
        self.log = open(self.prefix / "caddy.log", "w")
        self.proc = subprocess.Popen(
            [CADDY, "run", "--config", str(self.conf), "--adapter", "caddyfile"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.prefix)
        # Ready once its local CA exists and a TLS request verified by it gets any answer
        # (the site certificate is issued just after the listener opens).
        deadline = time.monotonic() + 30
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"caddy exited {self.proc.returncode}: {self.errors()}")
            if self.root.exists():
                try:
                    self.http().get(self.base + "/.well-known/jmap", allow_redirects=False,
                                    timeout=5)
                    return self
                except requests.RequestException as exc:
                    last = exc
            time.sleep(0.1)
        raise RuntimeError(f"caddy did not start ({last}): {self.errors()}")

    def errors(self):
        path = self.prefix / "caddy.log"
        return path.read_text() if path.exists() else ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # graceful shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log:
            self.log.close()
        if self.jmapd:
            self.jmapd.stop()

    def http(self, auth=None):
        """A requests session trusting Caddy's local CA only (REQUESTS_CA_BUNDLE ignored)."""
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.root)
        session.auth = auth
        return session

    def client(self, base=None, username=ALICE):
        client = Client(base or self.base, username)
        client.http.verify = str(self.root)
        client.http.trust_env = False
        return client


@pytest.fixture(scope="module")
def caddied(tmp_path_factory):
    setup = CaddyProxied(tmp_path_factory)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@needs_caddy
def test_appliance_caddy_validate_accepts_shipped_file(tmp_path):
    """`caddy validate` on contrib/Caddyfile as shipped (it stays offline: nothing is issued)."""
    done = subprocess.run([CADDY, "validate", "--adapter", "caddyfile",
                           "--config", str(CONTRIB / "Caddyfile")],
                          capture_output=True, text=True, timeout=60,
                          env=caddy_env(tmp_path), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Valid configuration" in output, output
    # Caddy warns, among others, when the file is not as `caddy fmt` would write it.
    warnings = [line for line in output.splitlines() if '"level":"warn"' in line
                or '"level":"error"' in line]
    assert not warnings, output


@needs_caddy
def test_appliance_caddy_well_known_redirects_to_https(caddied):
    r = caddied.http().get(caddied.base + "/.well-known/jmap", allow_redirects=False, timeout=30)
    assert r.status_code in (301, 302, 307, 308), r.text
    assert r.headers["Location"] == f"{caddied.base}/jmap/session"


@needs_caddy
def test_appliance_caddy_session_urls_are_https_on_caddy(caddied):
    check_session_urls_on_proxy(caddied)


@needs_caddy
def test_appliance_caddy_api_call(caddied):
    check_api_call_through_proxy(caddied)
    denied = caddied.http().post(caddied.base + "/jmap/api/", json={}, timeout=30)
    assert denied.status_code == 401
    assert "WWW-Authenticate" in denied.headers


@needs_caddy
def test_appliance_caddy_upload_download_3mb(caddied):
    client = caddied.client()
    data = secrets.token_bytes(3 * 1024 * 1024)
    blob_id = upload(client, data, base=caddied.base)
    r = download(client, blob_id, base=caddied.base)
    assert r.status_code == 200, r.text
    assert "Content-Encoding" not in r.headers
    assert r.content == data
    # A compressible type too: Caddy's `encode`, if ever added, would gzip this one (it
    # leaves application/octet-stream alone anyway). requests asks for gzip by default.
    url = (client.session["downloadUrl"].replace("{accountId}", client.account_id)
           .replace("{blobId}", blob_id).replace("{name}", "notes.txt")
           .replace("{type}", "text/plain"))
    r = client.http.get(url, timeout=120, headers={"Accept-Encoding": "gzip, deflate"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain"), r.headers
    assert "Content-Encoding" not in r.headers
    assert r.content == data


@needs_caddy
def test_appliance_caddy_body_limit_admits_jmapds_upload_limit(caddied):
    """request_body max_size must let through what jmapd advertises as maxSizeUpload, and
    leave the refusal of one octet more to jmapd (its JMAP limit problem, not Caddy's)."""
    client = caddied.client()
    limit = client.session["capabilities"][CORE]["maxSizeUpload"]
    data = secrets.token_bytes(limit)
    blob_id = upload(client, data, base=caddied.base)
    r = download(client, blob_id, base=caddied.base)
    assert r.status_code == 200, r.text
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(data).digest()
    url = caddied.base + f"/jmap/upload/{client.account_id}/"
    r = client.http.post(url, data=data + b"x", timeout=120,
                         headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json"), r.headers
    problem = r.json()
    assert problem["type"] == "urn:ietf:params:jmap:error:limit", problem
    assert problem["limit"] == "maxSizeUpload", problem


@needs_caddy
def test_appliance_caddy_websocket(caddied):
    check_websocket_through_proxy(caddied, caddied.root)


@needs_caddy
def test_appliance_caddy_forged_x_forwarded_for_is_not_the_client(caddied):
    """Runs last among the Caddy tests: it spends 127.0.0.1's login-failure budget.

    Caddy (no trusted_proxies) replaces a client's X-Forwarded-For with the client's own
    address; were it appended instead, jmapd (trusting 127.0.0.1) would take the forged
    entry for the client and every forged address would get a budget of its own.
    """

    def login(username, password, forged):
        return caddied.http().get(caddied.base + "/jmap/session", auth=(username, password),
                                  headers={"X-Forwarded-For": forged}, timeout=30)

    for n in range(3):  # each with a different forged address
        assert login(BOB, "wrong", f"203.0.113.{n + 1}").status_code == 401
    # carol never failed: a 429 for her can only be the address's budget, 127.0.0.1's.
    blocked = login(CAROL, PASSWORD, "203.0.113.50")
    assert blocked.status_code == 429, blocked.text
    assert "Retry-After" in blocked.headers
    if caddied.ipv6:
        # Another client address (::1 via Caddy) has its own budget.
        fresh = caddied.http(auth=(CAROL, PASSWORD)).get(caddied.base6 + "/jmap/session",
                                                         timeout=30)
        assert fresh.status_code == 200, fresh.text
