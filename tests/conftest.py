"""Shared fixtures: a real `jmapd.py serve` subprocess on 127.0.0.1 and HTTP clients.

Tests talk to the server as a client would, with `requests`; users are created with
the real CLI (`jmapd.py user add ... --password-stdin`), a separate process writing the
same database, as an administrator would.
"""

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
JMAPD = ROOT / "jmapd.py"
CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
USING = [CORE, MAIL]
PASSWORD = "correct horse battery staple"
_serial = itertools.count(1)


def run_cli(*args, data_dir=None, input_text=None, timeout=60):
    """Run `jmapd.py ARGS` (with cheap hashing) and return the CompletedProcess."""
    cmd = [sys.executable, str(JMAPD), *map(str, args), "--test-cheap-hashing"]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return subprocess.run(
        cmd, input=input_text, capture_output=True, text=True, timeout=timeout,
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_user(data_dir, username, password=PASSWORD):
    done = run_cli("user", "add", username, "--password-stdin", data_dir=data_dir,
                   input_text=password + "\n")
    assert done.returncode == 0, done.stderr
    return username


class Server:
    """A `jmapd.py serve` subprocess on a free loopback port."""

    def __init__(self, data_dir, *extra):
        self.data_dir = Path(data_dir)
        self.extra = [str(e) for e in extra]
        self.proc = None
        self.url = None
        self.log_path = self.data_dir.parent / f"serve-{next(_serial)}.log"

    def start(self, timeout=20):
        self.log_file = open(self.log_path, "w+")
        cmd = [sys.executable, str(JMAPD), "serve", "--listen", "127.0.0.1:0",
               "--data-dir", str(self.data_dir), "--test-cheap-hashing", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+?)/? ", self.log() + " ")
            if match:
                self.url = match.group(1).rstrip("/")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"jmapd exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"jmapd did not start:\n{self.log()}")

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log_file", None):
            self.log_file.close()
            self.log_file = None


class Client:
    """A minimal independent JMAP client over `requests`."""

    def __init__(self, base_url, username, password=PASSWORD):
        self.base_url = base_url
        self.username = username
        self.http = requests.Session()
        self.http.auth = (username, password)
        self._session = None

    @property
    def session(self):
        if self._session is None:
            r = self.http.get(self.base_url + "/jmap/session", timeout=30)
            assert r.status_code == 200, r.text
            self._session = r.json()
        return self._session

    @property
    def account_id(self):
        return self.session["primaryAccounts"][MAIL]

    def post(self, body, **kwargs):
        """POST a raw body (str/bytes/dict) to the API URL; return the requests.Response."""
        if isinstance(body, (dict, list)):
            kwargs["json"] = body
        else:
            kwargs["data"] = body
        kwargs.setdefault("headers", {"Content-Type": "application/json"})
        return self.http.post(self.session["apiUrl"], timeout=30, **kwargs)

    def request(self, method_calls, using=USING, **extra):
        r = self.post({"using": using, "methodCalls": method_calls, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    def call(self, name, args, using=USING):
        """Make one method call; return its (single) response [name, args, id]."""
        args = dict(args)
        return self.request([[name, args, "c0"]], using=using)["methodResponses"][0]

    def ok(self, name, args, using=USING):
        """Make one call that must succeed; return its response arguments."""
        resp = self.call(name, args, using=using)
        assert resp[0] == name, resp
        return resp[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One running server for the whole session (tests use their own users)."""
    data_dir = tmp_path_factory.mktemp("jmapd") / "data"
    add_user(data_dir, "first@example.com")
    # Many tests try wrong passwords on purpose; the login limits get their own server.
    srv = Server(data_dir, "--max-login-failures-per-address", "100000",
                 "--max-login-failures-per-user", "100000").start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    """A client logged in as a fresh user of its own."""
    username = f"user{next(_serial)}-{os.getpid()}@example.com"
    add_user(server.data_dir, username)
    return Client(server.url, username)


@pytest.fixture
def other_client(server):
    """A second, unrelated user on the same server."""
    username = f"other{next(_serial)}-{os.getpid()}@example.com"
    add_user(server.data_dir, username)
    return Client(server.url, username)
