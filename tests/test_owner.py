"""Issue 17, "The appliance as its owner meets it: first run, permissions, errors, logs, TLS".

Each point of the issue, driven the way the owner of a Pi would meet it: real `jmapd.py`
processes started as subprocesses, a pseudo-terminal for the prompts (as in
test_first_run.py), and second Unix users for the ownership cases.

- The ownership trap: a command run as root on a data directory another user owns becomes
  that user (initgroups, setgid, setuid) after opening its input, so nothing under the data
  directory is ever root's and the service (running as the owner) keeps working; `import -`
  reads standard input, so `sudo -u OWNER jmapd.py import - < root-only.mbox` works.
- Permission problems are named as such (one line, the owner, a `sudo -u` hint).
- One-line errors, never a traceback: Ctrl-C/Ctrl-D at prompts, missing paths, unusable
  data directories and socket folders, bad arguments, a missing dependency.
- deliver/import: empty input (65), single messages, not-a-mailbox files, stdin, --user
  required, unknown --mailbox (import 1, deliver 75).
- Passwords of at least 10 characters; --trusted-proxy validated; 401 details.
- Logs: refused logins in the fail2ban format and rate-limited, refused LMTP recipients,
  journald priority prefixes only when JOURNAL_STREAM names stderr, a short start-up
  summary, one "new database" line, "ready in" without the prompt.
- GET /, a TLS handshake on the plain port, the systemd unit's options file, `status`,
  search snippets cut from one alternative.

The ownership tests need root and useradd (they skip with the reason otherwise). They put
their data directories under a 0755 folder in /var/tmp, since pytest's temporary base is
0700 and another user could not reach it. A command run *as* the second user needs an
interpreter that user can execute with bottle, waitress, peewee and argon2 importable:
the venv running the tests if the user can run it, else /usr/bin/python3 (same minor
version) with the venv's site-packages on PYTHONPATH; without either those cases skip.
Commands started as root use the tests' own interpreter: that the owner usually cannot
read it (a venv under /root) is what "load every module before giving root up" is for.
"""

import json
import os
import pty
import pwd
import re
import secrets
import select
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import CORE, JMAPD, MAIL, PASSWORD, ROOT, Client, Server, add_user, free_port
from test_appliance import unit_argv, unit_entries, unit_value
from test_first_run import read_until

UNIT = ROOT / "jmapd.service"
FAIL2BAN = ROOT / "contrib" / "fail2ban-jmapd.conf"
SUBMISSION = "urn:ietf:params:jmap:submission"
EX_DATAERR, EX_TEMPFAIL = 65, 75
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


# =============================================================================
# helpers
# =============================================================================


def jmapd(*args, input=None, stdin=None, env=None, prefix=(), python=None, cwd=None,
          timeout=60):
    """Run `[prefix] python jmapd.py ARGS`; return the CompletedProcess (text)."""
    cmd = [*prefix, *(python or [sys.executable]), str(JMAPD), *map(str, args)]
    if input is None and stdin is None:
        stdin = subprocess.DEVNULL
    return subprocess.run(cmd, input=input, stdin=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


SWITCHED = re.compile(r"^\S+ \S+ INFO jmapd: running as \S+, the owner of ")


def one_line_error(done, *needles):
    """The command failed with one line on stderr, no traceback; it names `needles`.
    (A command started as root may say first, in a log line, whose rights it took.)"""
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines()
             if line.strip() and not SWITCHED.match(line)]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def address(tag="u"):
    return f"{tag}-{secrets.token_hex(4)}@example.com"


def message(subject, body="Hello.\r\n", to="someone@example.com"):
    return (f"From: Sender <sender@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{secrets.token_hex(8)}@example.com>\r\n"
            f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n{body}").encode()


def mbox(*subjects):
    """An mbox (From_ lines) with one message per subject."""
    return b"".join(b"From sender@example.com Mon Jan  1 10:00:00 2024\n"
                    + message(s).replace(b"\r\n", b"\n") + b"\n" for s in subjects)


def subjects_of(client, mailbox_role=None):
    """The subjects of every Email of the client's account (optionally in one Mailbox)."""
    account = client.account_id
    filter_ = {}
    if mailbox_role:
        boxes = client.ok("Mailbox/get", {"accountId": account, "ids": None})["list"]
        filter_ = {"inMailbox": next(m["id"] for m in boxes if m["role"] == mailbox_role)}
    ids = client.ok("Email/query", {"accountId": account, "filter": filter_})["ids"]
    if not ids:
        return []
    got = client.ok("Email/get", {"accountId": account, "ids": ids,
                                   "properties": ["subject"]})["list"]
    return sorted(e["subject"] for e in got)


def upload_status(client, data=b"a blob of the owner's"):
    url = client.session["uploadUrl"].replace("{accountId}", client.account_id)
    r = client.http.post(url, data=data, headers={"Content-Type": "application/octet-stream"},
                         timeout=30)
    return r.status_code


def lmtp_port_of(log_text):
    match = re.search(r"LMTP on 127\.0\.0\.1:(\d+)", log_text)
    assert match, log_text
    return int(match.group(1))


def lmtp_deliver(port, rcpt, raw):
    """One LMTP transaction to one recipient: (RCPT reply code, DATA reply code)."""
    with smtplib.LMTP("127.0.0.1", port, timeout=30) as conn:
        assert conn.ehlo("mta.example.net")[0] == 250
        assert conn.mail("sender@example.com")[0] == 250
        code, _ = conn.rcpt(rcpt)
        if code != 250:
            return code, None
        return code, conn.data(raw)[0]


class Serve(Server):
    """conftest's Server with an environment, a command prefix and an interpreter of its
    own, and stderr alone in the log (stdout elsewhere) when asked."""

    def __init__(self, data_dir, *extra, env=None, prefix=(), python=None, cheap=True,
                 log_path=None):
        super().__init__(data_dir, *extra)
        self.env, self.prefix, self.python, self.cheap = env or {}, list(prefix), python, cheap
        if log_path is not None:
            self.log_path = Path(log_path)

    def start(self, timeout=30):
        self.log_file = open(self.log_path, "w+")
        cmd = [*self.prefix, *(self.python or [sys.executable]), str(JMAPD), "serve",
               "--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir),
               *(["--test-cheap-hashing"] if self.cheap else []), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=self.log_file,
                                     stdin=subprocess.DEVNULL, cwd="/",
                                     env={**os.environ, **self.env})
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


def wait_for(predicate, what, timeout=15, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def run_in_pty(argv, steps, env=None, timeout=30):
    """Run argv on a new pseudo-terminal (its controlling terminal, as a shell would give
    it); for each (pattern, octets) wait for the pattern, then type the octets (or, for
    (seconds, octets), wait that long first). Keys are typed a moment after the prompt,
    as a person would: a Ctrl-C that arrives between Python's writing a prompt and its
    read() starting is only acted on at the next input (a CPython race, not jmapd's).
    Return (exit status, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        try:
            os.chdir("/")
            os.execve(argv[0], argv, {**os.environ, **(env or {})})
        finally:
            os._exit(127)
    seen = b""
    try:
        for pattern, typed in steps:
            seen += read_until(fd, pattern, timeout)
            delay, typed = typed if isinstance(typed, tuple) else (0.2, typed)
            time.sleep(delay)
            os.write(fd, typed)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            else:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return os.waitstatus_to_exitcode(status), seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), seen
            time.sleep(0.1)
        raise AssertionError(f"{argv[2:4]} did not exit; the terminal showed: {seen!r}")
    except BaseException:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    finally:
        os.close(fd)


def terminal_lines_after(output, prompt):
    """What the terminal showed after the last `prompt`, as lines, echoed ^C/^D removed."""
    text = output.rsplit(prompt, 1)[-1].decode(errors="replace")
    text = text.replace("^C", "").replace("^D", "")
    return [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]


# =============================================================================
# Unix users for the ownership cases
# =============================================================================


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("the ownership cases switch users: they need root")
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


class UnixUser:
    def __init__(self, tag):
        self.name = f"jm17{tag}{os.getpid() % 100000}{secrets.token_hex(2)}"
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", self.name], check=True,
                       capture_output=True, timeout=60)
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    @property
    def prefix(self):
        """Run as this user, as `sudo -u` would: its uid, gid and groups; exec, same pid.
        setpriv keeps root's capabilities up to its own exec, so it execs env(1), which
        then execs the command with the user's rights alone."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--",
                "/usr/bin/env"]

    def can_run(self, argv, code="pass", env=None):
        done = subprocess.run([*self.prefix, *argv, "-c", code], capture_output=True,
                              timeout=60, cwd="/", env={**os.environ, **(env or {})})
        return done.returncode == 0

    def remove(self):
        subprocess.run(["userdel", self.name], capture_output=True, timeout=60)
        subprocess.run(["groupdel", self.name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def users():
    """Make Unix users on demand (owner, intruder, …); all removed at the end."""
    _need_root()
    made = {}

    def get(tag):
        if tag not in made:
            made[tag] = UnixUser(tag)
        return made[tag]

    yield get
    for user in made.values():
        user.remove()


@pytest.fixture(scope="module")
def owner(users):
    return users("o")


@pytest.fixture(scope="module")
def shared():
    """A 0755 folder outside pytest's 0700 temporary base, as /var/lib is."""
    path = Path(tempfile.mkdtemp(prefix="jmapd-issue17-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def owned_dir(shared, user, name=None):
    """An empty data directory made for `user`, as systemd's StateDirectory= makes one."""
    path = shared / (name or f"data-{secrets.token_hex(4)}")
    path.mkdir(mode=0o750)
    os.chown(path, user.uid, user.gid)
    return path


def python_for(user):
    """(argv, env) of an interpreter `user` can run with jmapd's dependencies, or skip."""
    needs = "import sys, bottle, waitress, peewee, argon2; assert sys.version_info[:2] == %r" % (
        tuple(sys.version_info[:2]),)
    if user.can_run([sys.executable], needs):
        return [sys.executable], {}
    system = {"PYTHONPATH": sysconfig.get_paths()["purelib"]}
    if os.path.exists("/usr/bin/python3") and user.can_run(["/usr/bin/python3"], needs, system):
        return ["/usr/bin/python3"], system
    pytest.skip(f"no interpreter {user.name} may run with bottle, waitress, peewee and argon2 "
                f"({sys.executable} is not readable by it and /usr/bin/python3 cannot import "
                "them): commands run as the second user cannot be tested here")


def owners_of(path):
    """{path relative to `path`: owner uid} of everything under it, itself included."""
    found = {".": os.lstat(path).st_uid}
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(folder, name)
            found[os.path.relpath(full, path)] = os.lstat(full).st_uid
    return found


def not_owned_by(path, user):
    return {p: uid for p, uid in owners_of(path).items() if uid != user.uid}


def root_only_file(shared, content):
    """A file in a 0700 root folder (root's home, say): only root can open it."""
    folder = Path(tempfile.mkdtemp(prefix="root-only-", dir=shared))
    folder.chmod(0o700)
    path = folder / "old.mbox"
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def process_groups(pid):
    """({real, effective, saved, fs gid}, {supplementary groups}) of a process."""
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    gids = {int(g) for g in re.search(r"^Gid:\s+(.*)$", text, re.M).group(1).split()}
    groups = {int(g) for g in re.search(r"^Groups:\s*(.*)$", text, re.M).group(1).split()}
    return gids, groups


def process_uid(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^Uid:\s+(\d+)\s+(\d+)", f.read(), re.M).group(2))


QP_MESSAGE = (b"From old@example.com Mon Jan  1 10:00:00 2024\n"
              b"From: Old Friend <old@example.com>\nTo: owner@example.com\n"
              b"Subject: from the old mbox\nMIME-Version: 1.0\n"
              b"Content-Type: text/plain; charset=iso-8859-1\n"
              b"Content-Transfer-Encoding: quoted-printable\n\n"
              b"Gr=FC=DFe aus dem alten Postfach.\n\n")


# =============================================================================
# The ownership trap
# =============================================================================


def test_issue_17_owner_cannot_run_the_tests_interpreter(owner):
    """The precondition that makes the next test prove "every module is loaded first":
    the interpreter root starts jmapd with is out of the owner's reach (a venv or pyenv
    under /root), so a module imported after the switch would fail."""
    if owner.can_run([sys.executable]):
        pytest.skip(f"{owner.name} can run {sys.executable}: the root-started cases do not "
                    "show here that modules are loaded before root is given up")


def test_issue_17_root_commands_on_the_owners_data_dir_become_the_owner(owner, shared):
    """`sudo jmapd.py user add|import|deliver|serve` on a data directory the service user
    owns: each becomes that user before writing; every file stays the owner's, and the
    service keeps accepting uploads (201) and LMTP deliveries (250)."""
    data_dir = owned_dir(shared, owner)
    user = address("owner")
    done = jmapd("user", "add", user, "--password-stdin", "--data-dir", data_dir,
                 "--test-cheap-hashing", input=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert f"running as {owner.name}" in done.stderr
    old_mbox = root_only_file(shared, QP_MESSAGE + mbox("second old one"))
    done = jmapd("import", old_mbox, "--user", user, "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert "imported 2 messages" in done.stdout
    done = jmapd("deliver", "--user", user, "--data-dir", data_dir,
                 input=message("delivered by root").decode())
    assert done.returncode == 0, done.stderr
    # A message too big to be kept in the database gets a blob file (and folders).
    big = message("big, delivered by root", "y" * 400_000 + "\r\n")
    done = jmapd("deliver", "--user", user, "--data-dir", data_dir, input=big.decode())
    assert done.returncode == 0, done.stderr
    assert not_owned_by(data_dir, owner) == {}
    assert os.path.isdir(data_dir / "tmp") and os.path.isdir(data_dir / "blobs")

    srv = Serve(data_dir, "--lmtp", "127.0.0.1:0").start()  # as root: it switches too
    try:
        assert process_uid(srv.proc.pid) == owner.uid
        assert process_groups(srv.proc.pid) == ({owner.gid}, {owner.gid})  # initgroups
        assert f"running as {owner.name}" in srv.log()
        client = Client(srv.url, user)
        assert upload_status(client) == 201
        assert lmtp_deliver(lmtp_port_of(srv.log()), user, message("over LMTP")) == (250, 250)
        assert subjects_of(client) == ["big, delivered by root", "delivered by root",
                                       "from the old mbox", "over LMTP", "second old one"]
        account = client.account_id
        ids = client.ok("Email/query", {"accountId": account,
                                        "filter": {"subject": "from the old mbox"}})["ids"]
        got = client.ok("Email/get", {"accountId": account, "ids": ids,
                                      "fetchTextBodyValues": True})["list"][0]
        assert "Grüße aus dem alten Postfach." in list(got["bodyValues"].values())[0]["value"]
        assert os.path.exists(data_dir / "jmapd.sqlite3-wal")
        assert not_owned_by(data_dir, owner) == {}  # -wal, -shm, serve.json included
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.log()
    assert "Traceback" not in srv.log()
    assert not_owned_by(data_dir, owner) == {}


def test_issue_17_root_command_makes_the_sqlite_wal_and_shm_as_the_owner(owner, shared):
    """`sudo jmapd.py import - < old.mbox` with nothing else using the database: the
    SQLite -wal and -shm files it creates are the owner's (were they root's, the service
    could not open the database). The import waits on its standard input while the
    database is open, so the files are looked at then."""
    data_dir = owned_dir(shared, owner)
    user = address("owner")
    done = jmapd("user", "add", user, "--password-stdin", "--data-dir", data_dir,
                 "--test-cheap-hashing", input=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert not (data_dir / "jmapd.sqlite3-wal").exists()
    proc = subprocess.Popen([sys.executable, str(JMAPD), "import", "-", "--user", user,
                             "--data-dir", str(data_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wal, shm = data_dir / "jmapd.sqlite3-wal", data_dir / "jmapd.sqlite3-shm"
        wait_for(lambda: wal.exists() and shm.exists(), "the import to open the database")
        assert process_uid(proc.pid) == owner.uid
        assert (wal.stat().st_uid, shm.stat().st_uid) == (owner.uid, owner.uid)
        out, err = proc.communicate(mbox("through the pipe"), timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"imported 1 message " in out
    assert not_owned_by(data_dir, owner) == {}


def test_issue_17_root_import_and_deliver_keep_the_owners_service_working(owner, shared):
    """The owner makes the data directory (`user add` as the service user); root then
    imports and delivers into it; the service, run as the owner, still takes an upload
    (201, a new blobs/xx folder) and an LMTP delivery (250)."""
    python, env = python_for(owner)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    home = owned_dir(shared, owner)  # the service user's home, where it may create things
    data_dir = home / "data"
    user = address("owner")
    done = jmapd("user", "add", user, "--password-stdin", "--data-dir", data_dir,
                 "--test-cheap-hashing", input=PASSWORD + "\n", prefix=owner.prefix,
                 python=python, env=env, cwd="/")
    assert done.returncode == 0, done.stderr
    assert data_dir.stat().st_uid == owner.uid
    old_mbox = root_only_file(shared, mbox("imported by root 1", "imported by root 2"))
    done = jmapd("import", old_mbox, "--user", user, "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    done = jmapd("deliver", "--user", user, "--data-dir", data_dir,
                 input=message("delivered by root").decode())
    assert done.returncode == 0, done.stderr
    assert not_owned_by(data_dir, owner) == {}

    srv = Serve(data_dir, "--lmtp", "127.0.0.1:0", prefix=owner.prefix, python=python,
                env=env).start()
    try:
        assert process_uid(srv.proc.pid) == owner.uid
        client = Client(srv.url, user)
        for n in range(8):  # new blobs/xx folders beside the ones root's commands made
            assert upload_status(client, f"upload {n}".encode()) == 201
        assert lmtp_deliver(lmtp_port_of(srv.log()), user, message("over LMTP")) == (250, 250)
        assert subjects_of(client) == ["delivered by root", "imported by root 1",
                                       "imported by root 2", "over LMTP"]
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()
    assert not_owned_by(data_dir, owner) == {}


def test_issue_17_sudo_u_import_reads_standard_input(owner, shared):
    """`sudo -u OWNER jmapd.py import - < ~/old.mbox`: the shell (root) opens the file, the
    owner's jmapd reads it from stdin; an mbox and a single message both work. Naming the
    root-only file instead is one line saying permission was denied."""
    python, env = python_for(owner)
    data_dir = owned_dir(shared, owner)
    user = address("owner")
    done = jmapd("user", "add", user, "--password-stdin", "--data-dir", data_dir,
                 "--test-cheap-hashing", input=PASSWORD + "\n", prefix=owner.prefix,
                 python=python, env=env, cwd="/")
    assert done.returncode == 0, done.stderr
    private = root_only_file(shared, mbox("stdin one", "stdin two"))
    as_owner = {"prefix": owner.prefix, "python": python, "env": env, "cwd": "/"}

    refused = jmapd("import", private, "--user", user, "--data-dir", data_dir, **as_owner)
    one_line_error(refused, "permission denied")

    with open(private, "rb") as stdin:  # what `< ~/old.mbox` does in root's shell
        done = jmapd("import", "-", "--user", user, "--data-dir", data_dir, stdin=stdin,
                     **as_owner)
    assert done.returncode == 0, done.stderr
    assert "imported 2 messages" in done.stdout
    single = private.parent / "one.eml"
    single.write_bytes(message("stdin single"))
    with open(single, "rb") as stdin:
        done = jmapd("import", "-", "--user", user, "--data-dir", data_dir, stdin=stdin,
                     **as_owner)
    assert done.returncode == 0, done.stderr
    assert "imported 1 message " in done.stdout
    assert not_owned_by(data_dir, owner) == {}
    srv = Serve(data_dir, prefix=owner.prefix, python=python, env=env).start()
    try:
        assert subjects_of(Client(srv.url, user)) == ["stdin one", "stdin single", "stdin two"]
    finally:
        srv.stop()


# =============================================================================
# Permission problems are named as permission problems
# =============================================================================

PERMISSION_COMMANDS = {
    "user list": ["user", "list"],
    "backup": ["backup", "{dest}"],
    "deliver": ["deliver", "--user", "{user}"],
    "serve": ["serve", "--listen", "127.0.0.1:0"],
    "user add": ["user", "add", "new@example.com", "--password-stdin"],
    "import": ["import", "-", "--user", "{user}"],
    "status": ["status"],
}


@pytest.fixture(scope="module")
def someone_elses_data(users, shared):
    """A data directory of the owner's (0750), and an intruder who is not the owner."""
    owner, intruder = users("o"), users("i")
    data_dir = owned_dir(shared, owner)
    user = address("owner")
    done = jmapd("user", "add", user, "--password-stdin", "--data-dir", data_dir,
                 "--test-cheap-hashing", input=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert not_owned_by(data_dir, owner) == {}
    return owner, intruder, data_dir, user


def run_as_intruder(intruder, command, data_dir, user, shared):
    python, env = python_for(intruder)
    args = [a.format(dest=shared / f"backup-{secrets.token_hex(3)}", user=user)
            for a in PERMISSION_COMMANDS[command]]
    return jmapd(*args, "--data-dir", data_dir, "--test-cheap-hashing",
                 input=message("x").decode() if command != "user add" else "long enough pw\n",
                 prefix=intruder.prefix, python=python, env=env, cwd="/", timeout=30)


def check_permission_line(done, *needles):
    line = one_line_error(done, "permission denied", *needles)
    for wrong in ("does not exist", "not mounted", "no jmapd database", "OperationalError"):
        assert wrong not in line, line
    return line


@pytest.mark.parametrize("command", list(PERMISSION_COMMANDS))
def test_issue_17_someone_elses_data_dir_is_a_permission_problem(someone_elses_data, shared,
                                                                 command):
    owner, intruder, data_dir, user = someone_elses_data
    done = run_as_intruder(intruder, command, data_dir, user, shared)
    check_permission_line(done, owner.name, f"sudo -u {owner.name}")
    if command == "deliver":
        assert done.returncode == EX_TEMPFAIL  # the MTA keeps the mail
    else:
        assert done.returncode == 1


@pytest.fixture(scope="module")
def behind_a_private_folder(shared):
    private = Path(tempfile.mkdtemp(prefix="private-", dir=shared))
    private.chmod(0o700)
    data_dir = private / "data"
    add_user(data_dir, "someone@example.com")
    return data_dir


@pytest.mark.parametrize("command", [
    "user list", "serve", "user add", "backup", "status",
    "deliver",
])
def test_issue_17_unreadable_parent_is_a_permission_problem(users, behind_a_private_folder,
                                                           shared, command):
    """A data directory behind a 0700 folder of root's: "permission denied on the way",
    not "does not exist (create it with user add)" — which would lead to a second data
    directory."""
    done = run_as_intruder(users("i"), command, behind_a_private_folder, "someone@example.com",
                           shared)
    check_permission_line(done, "sudo")


def test_issue_17_data_dir_in_a_folder_the_user_cannot_write(users, shared):
    """`user add` (and `serve`) by a user who may not create the data directory where it
    was asked for: one line that says permission was denied."""
    intruder = users("i")
    python, env = python_for(intruder)
    for args in (["user", "add", "new@example.com", "--password-stdin"],
                 ["serve", "--listen", "127.0.0.1:0"]):
        done = jmapd(*args, "--data-dir", shared / "not-yet" / "data", "--test-cheap-hashing",
                     input="long enough pw\n", prefix=intruder.prefix, python=python,
                     env=env, cwd="/", timeout=30)
        assert done.returncode == 1
        one_line_error(done, "cannot create the data directory", "permission denied")
    assert not (shared / "not-yet").exists()


@pytest.mark.parametrize("home", [
    "0700",
    "0755",
])
def test_issue_17_root_import_of_a_maildir_the_owner_cannot_read(owner, shared, home):
    """`sudo jmapd.py import /home/someone/Maildir` into the service's data directory:
    either imported (read before root is given up) or one line saying permission was
    denied, never a traceback; with a private home folder (0700) or an open one (0755,
    the Maildir's own folders 0700)."""
    data_dir = owned_dir(shared, owner)
    user = address("owner")
    assert jmapd("user", "add", user, "--password-stdin", "--data-dir", data_dir,
                 "--test-cheap-hashing", input=PASSWORD + "\n").returncode == 0
    folder = Path(tempfile.mkdtemp(prefix="home-", dir=shared))
    folder.chmod(int(home, 8))
    maildir = folder / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(mode=0o700, parents=True)
    (maildir / "cur" / "1700000000.1.host:2,S").write_bytes(message("from a Maildir"))
    done = jmapd("import", maildir, "--user", user, "--data-dir", data_dir)
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0:
        assert "imported 1 message " in done.stdout
    else:
        one_line_error(done, "permission denied")
    assert not_owned_by(data_dir, owner) == {}


@pytest.mark.parametrize("where", ["below-a-file", "root-only-folder"])
def test_issue_17_backup_to_a_destination_that_cannot_be_made(owner, shared, tmp_path, where):
    if where == "below-a-file":
        data_dir = tmp_path / "data"
        add_user(data_dir, "who@example.com")
        (tmp_path / "a-file").write_text("x\n")
        dest = tmp_path / "a-file" / "backup"
    else:  # `sudo jmapd.py backup /root/jmapd-backup`: run as the owner, who cannot
        data_dir = owned_dir(shared, owner)
        assert jmapd("user", "add", "who@example.com", "--password-stdin", "--data-dir",
                     data_dir, "--test-cheap-hashing", input=PASSWORD + "\n").returncode == 0
        private = Path(tempfile.mkdtemp(prefix="root-only-", dir=shared))
        private.chmod(0o700)
        dest = private / "backup"
    done = jmapd("backup", dest, "--data-dir", data_dir)
    assert done.returncode == 1
    one_line_error(done, str(dest))


# =============================================================================
# One-line errors, never a traceback
# =============================================================================


def serve_argv(*extra):
    return [sys.executable, str(JMAPD), "serve", "--listen", "127.0.0.1:0",
            "--test-cheap-hashing", *map(str, extra)]


@pytest.mark.parametrize("key", [b"\x03", b"\x04"], ids=["ctrl-c", "ctrl-d"])
@pytest.mark.parametrize("at", ["address", "password"])
def test_issue_17_first_run_prompt_cancelled_in_one_line(tmp_path, key, at):
    data_dir = tmp_path / "data"
    steps = [(rb"E-mail address: ", key if at == "address" else b"first@example.com\n")]
    prompt = b"E-mail address: "
    if at == "password":
        steps.append((rb"Password: ", key))
        prompt = b"Password: "
    status, output = run_in_pty(serve_argv("--data-dir", data_dir), steps)
    assert status == 1, output
    assert b"Traceback" not in output, output
    lines = terminal_lines_after(output, prompt)
    assert len(lines) == 1 and "cancelled" in lines[0], output
    assert b"listening on" not in output


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    """A data directory with who@example.com, for the prompts (cancelled: nothing changes)."""
    data_dir = tmp_path_factory.mktemp("issue17-prompts") / "data"
    add_user(data_dir, "who@example.com")
    return data_dir


@pytest.mark.parametrize("key", [b"\x03", b"\x04"], ids=["ctrl-c", "ctrl-d"])
@pytest.mark.parametrize("command", ["user add", "user passwd"])
@pytest.mark.parametrize("prompt", [b"Password: ", b"Password again: "], ids=["first", "again"])
def test_issue_17_password_prompt_cancelled_in_one_line(prompt_data, key, command, prompt):
    data_dir = prompt_data
    steps = [(rb"Password: ", key if prompt == b"Password: " else b"long enough pw\n")]
    if prompt == b"Password again: ":
        steps.append((rb"Password again: ", key))
    argv = [sys.executable, str(JMAPD), *command.split(),
            "who@example.com" if command == "user passwd" else "new@example.com",
            "--data-dir", str(data_dir), "--test-cheap-hashing"]
    status, output = run_in_pty(argv, steps)
    assert status == 1, output
    assert b"Traceback" not in output, output
    assert terminal_lines_after(output, prompt) == ["jmapd: cancelled"], output


def test_issue_17_import_of_a_missing_path(mail, tmp_path):
    done = jmapd("import", tmp_path / "no-such.mbox", "--user", "first@example.com",
                 "--data-dir", mail.data_dir)
    assert done.returncode == 1
    one_line_error(done, "no-such.mbox", "no such file")


def test_issue_17_data_dir_that_cannot_be_created(tmp_path):
    done = jmapd("user", "add", "who@example.com", "--password-stdin", "--data-dir",
                 "/proc/jmapd-issue-17/data", "--test-cheap-hashing", input="long enough pw\n")
    assert done.returncode == 1
    one_line_error(done, "cannot create the data directory")


@pytest.mark.parametrize("command", ["user add", "serve"])
def test_issue_17_data_dir_below_a_file(tmp_path, command):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    args = (["user", "add", "who@example.com", "--password-stdin"] if command == "user add"
            else ["serve", "--listen", "127.0.0.1:0"])
    done = jmapd(*args, "--data-dir", a_file / "data", "--test-cheap-hashing",
                 input="long enough pw\n", timeout=30)
    assert done.returncode in (1, 2)
    one_line_error(done, str(a_file / "data"))


def test_issue_17_unix_socket_in_a_missing_folder(mail, tmp_path):
    socket_path = tmp_path / "no-such-folder" / "http.sock"
    done = jmapd("serve", "--listen", "127.0.0.1:0", "--unix-socket", socket_path,
                 "--data-dir", mail.data_dir, "--test-cheap-hashing", timeout=30)
    assert done.returncode == 2
    one_line_error(done, str(socket_path), "no such file")


@pytest.mark.parametrize("args, named", [
    (["serve", "--max-websockets", "x"], "--max-websockets"),
    (["serve", "--bogus-option"], "--bogus-option"),
    (["serve", "--listen", "nonsense"], "--listen"),
    (["user", "add"], "ADDRESS"),
    (["import", "some.mbox"], "--user"),
    (["serve", "--trusted-proxy", "notanip"], "--trusted-proxy"),
], ids=["bad-value", "unknown-option", "bad-listen", "missing-argument", "missing-user",
        "trusted-proxy"])
def test_issue_17_bad_arguments_are_one_line(tmp_path, args, named):
    done = jmapd(*args, "--data-dir", tmp_path / "data")
    assert done.returncode == 2
    line = one_line_error(done)
    assert line.startswith("jmapd: ") and "--help" in line, line
    assert line.count(named) == 1, line
    assert not done.stdout
    assert not (tmp_path / "data").exists()


def site_packages_without(tmp_path, missing):
    """A folder for PYTHONPATH with the venv's packages, less those named."""
    farm = tmp_path / "site"
    farm.mkdir()
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        if entry.name.split(".")[0] not in missing and not entry.name.endswith(".pth"):
            (farm / entry.name).symlink_to(entry)
    return farm


@pytest.mark.parametrize("missing, named", [
    (("bottle",), "bottle"), (("waitress",), "waitress"), (("peewee", "playhouse"), "peewee"),
    (("argon2",), "argon2-cffi")])
def test_issue_17_missing_dependency_named_with_both_ways(tmp_path, missing, named):
    base = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run([base, "-s", "-c", f"import {missing[0]}"], capture_output=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if probe.returncode == 0:
        pytest.skip(f"{base} has {missing[0]} of its own: it cannot be made missing")
    farm = site_packages_without(tmp_path, missing)
    done = subprocess.run([base, "-s", str(JMAPD), "serve", "--data-dir", tmp_path / "data"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(farm)}, stdin=subprocess.DEVNULL)
    line = one_line_error(done, f"package {named} is missing", "apt install", "pip install")
    assert "python3-bottle" in line and "argon2-cffi" in line
    assert not (tmp_path / "data").exists()


def test_issue_17_no_dependencies_at_all(tmp_path):
    """`python3 -I jmapd.py serve` with a bare system Python."""
    for python in ("/usr/bin/python3", getattr(sys, "_base_executable", None)):
        if python and os.path.exists(python) and subprocess.run(
                [python, "-I", "-c", "import bottle"], capture_output=True).returncode != 0:
            break
    else:
        pytest.skip("no Python without bottle here")
    done = subprocess.run([python, "-I", str(JMAPD), "serve"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    one_line_error(done, "is missing", "sudo apt install", "pip install")
    assert not (tmp_path / "jmapd-data").exists()


# =============================================================================
# deliver and import
# =============================================================================


@pytest.fixture(scope="module")
def mail(tmp_path_factory):
    """A server whose data directory `deliver` and `import` write to from outside (and
    the one tests that need no server of their own talk to)."""
    data_dir = tmp_path_factory.mktemp("issue17-mail") / "data"
    add_user(data_dir, "first@example.com")
    srv = Serve(data_dir, "--lmtp", "127.0.0.1:0").start()
    yield srv
    srv.stop()


@pytest.fixture
def mail_user(mail):
    user = address("mail")
    add_user(mail.data_dir, user)
    return user, Client(mail.url, user)


@pytest.mark.parametrize("raw", [b"", b"\n\r\n  \n"], ids=["empty", "blank-lines"])
def test_issue_17_deliver_refuses_empty_input(mail, mail_user, raw):
    user, client = mail_user
    done = subprocess.run([sys.executable, str(JMAPD), "deliver", "--user", user, "--data-dir",
                           str(mail.data_dir)], input=raw, capture_output=True, timeout=60)
    assert done.returncode == EX_DATAERR, done.stderr
    assert b"empty" in done.stderr and b"Traceback" not in done.stderr
    assert subjects_of(client) == []


def test_issue_17_import_single_eml_file(mail, mail_user, tmp_path):
    user, client = mail_user
    eml = tmp_path / "letter.eml"
    eml.write_bytes(message("a single letter"))
    done = jmapd("import", eml, "--user", user, "--data-dir", mail.data_dir)
    assert done.returncode == 0, done.stderr
    assert "imported 1 message " in done.stdout
    assert subjects_of(client) == ["a single letter"]


def test_issue_17_import_of_neither_mbox_nor_message(mail, mail_user, tmp_path):
    user, client = mail_user
    notes = tmp_path / "notes.txt"
    notes.write_text("Shopping list\n- rhubarb\n- sugar\n")
    done = jmapd("import", notes, "--user", user, "--data-dir", mail.data_dir)
    assert done.returncode == 1
    one_line_error(done, "notes.txt", "neither an mbox", "nor a message")
    assert "imported 0" not in done.stdout
    assert subjects_of(client) == []


def test_issue_17_import_of_an_empty_folder_says_nothing_was_found(mail, mail_user, tmp_path):
    user, client = mail_user
    (tmp_path / "empty").mkdir()
    done = jmapd("import", tmp_path / "empty", "--user", user, "--data-dir", mail.data_dir)
    assert done.returncode == 1
    one_line_error(done, "no messages found")


@pytest.mark.parametrize("kind", ["mbox", "message"])
def test_issue_17_import_from_standard_input(mail, mail_user, kind):
    user, client = mail_user
    raw = mbox("piped 1", "piped 2") if kind == "mbox" else message("piped single")
    done = subprocess.run([sys.executable, str(JMAPD), "import", "-", "--user", user,
                           "--data-dir", str(mail.data_dir)], input=raw, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    expected = ["piped 1", "piped 2"] if kind == "mbox" else ["piped single"]
    assert f"imported {len(expected)} message".encode() in done.stdout
    assert subjects_of(client) == expected


@pytest.mark.parametrize("command", ["import", "deliver"])
def test_issue_17_user_is_required_in_the_help(command):
    done = jmapd(command, "--help")
    assert done.returncode == 0
    usage = done.stdout.split("\n\n", 1)[0]
    assert re.search(r"--user\s+ADDRESS", usage) and "[--user" not in usage, usage
    assert re.search(r"--user ADDRESS\s+.*\(required\)", done.stdout), done.stdout


def test_issue_17_unknown_mailbox_is_an_error(mail, mail_user, tmp_path):
    user, client = mail_user
    eml = tmp_path / "letter.eml"
    eml.write_bytes(message("for no such mailbox"))
    done = jmapd("import", eml, "--user", user, "--mailbox", "No Such Folder", "--data-dir",
                 mail.data_dir)
    assert done.returncode == 1
    one_line_error(done, "No Such Folder")
    done = jmapd("deliver", "--user", user, "--mailbox", "No Such Folder", "--data-dir",
                 mail.data_dir, input=message("for no such mailbox").decode())
    assert done.returncode == EX_TEMPFAIL  # the MTA keeps the mail until it is fixed
    one_line_error(done, "No Such Folder")
    assert subjects_of(client) == []
    done = jmapd("deliver", "--user", user, "--mailbox", "archive", "--data-dir",
                 mail.data_dir, input=message("into the archive").decode())
    assert done.returncode == 0, done.stderr
    assert subjects_of(client, "archive") == ["into the archive"]


# =============================================================================
# Passwords, --trusted-proxy, 401 details
# =============================================================================


@pytest.mark.parametrize("command", ["user add", "user passwd"])
def test_issue_17_password_of_at_least_ten_characters(mail, command):
    name = address("pw")
    if command == "user passwd":
        add_user(mail.data_dir, name)
    short = jmapd(*command.split(), name, "--password-stdin", "--data-dir", mail.data_dir,
                  "--test-cheap-hashing", input="123456789\n")
    assert short.returncode == 1
    one_line_error(short, "too short", "at least 10 characters")
    ok = jmapd(*command.split(), name, "--password-stdin", "--data-dir", mail.data_dir,
               "--test-cheap-hashing", input="1234567890\n")
    assert ok.returncode == 0, ok.stderr
    r = requests.get(mail.url + "/jmap/session", auth=(name, "1234567890"), timeout=30)
    assert r.status_code == 200


def test_issue_17_password_prompt_too_short_says_so(prompt_data):
    data_dir = prompt_data
    argv = [sys.executable, str(JMAPD), "user", "add", "new@example.com", "--data-dir",
            str(data_dir), "--test-cheap-hashing"]
    status, output = run_in_pty(argv, [(rb"Password: ", b"short\n"),
                                       (rb"Password again: ", b"short\n")])
    assert status == 1
    assert terminal_lines_after(output, b"Password again: ") == [
        "jmapd: the password is too short: use at least 10 characters (a few words are easy "
        "to type and hard to guess)"], output


def test_issue_17_trusted_proxy_networks_accepted(tmp_path):
    data_dir = tmp_path / "data"
    srv = Serve(data_dir, "--trusted-proxy", "10.0.0.0/8", "::1", "192.168.1.1").start()
    try:
        assert requests.get(srv.url + "/", timeout=30).status_code == 200
    finally:
        srv.stop()
    bad = jmapd("serve", "--trusted-proxy", "10.0.0.0/8", "10.0.0.300", "--data-dir", data_dir)
    assert bad.returncode == 2
    one_line_error(bad, "'10.0.0.300' is not an IP address or network")


def test_issue_17_401_details(mail):
    wrong = requests.get(mail.url + "/jmap/session",
                         auth=("first@example.com", "not the password"), timeout=30)
    assert wrong.status_code == 401
    assert wrong.json()["detail"] == "the credentials were refused"
    none = requests.get(mail.url + "/jmap/session", timeout=30)
    assert none.status_code == 401
    assert none.json()["detail"] == "authentication required"


# =============================================================================
# Logs an owner can use
# =============================================================================


def fail2ban_regex():
    """contrib/fail2ban-jmapd.conf's failregex, <HOST> as fail2ban expands it."""
    text = FAIL2BAN.read_text()
    failregex = re.search(r"^failregex\s*=\s*(.+)$", text, re.M).group(1).strip()
    return re.compile(failregex.replace("<HOST>", r"(?:::f{4,6}:)?(?P<host>\S+)"))


def auth_lines(log_text):
    return [line for line in log_text.splitlines() if "jmapd.auth:" in line]


def test_issue_17_failed_login_and_lockout_each_logged_once_for_fail2ban(tmp_path):
    """A wrong password: one line, `login failed from ADDRESS for 'USER': reason`; once the
    address is over its limit: one `login refused …` line per refusal. Both match the
    contrib/ fail2ban filter, with the client's address as the host; no password shown."""
    data_dir = tmp_path / "data"
    add_user(data_dir, "who@example.com")
    srv = Serve(data_dir, "--max-login-failures-per-address", "2").start()
    http = requests.Session()

    def login():
        return http.get(srv.url + "/jmap/session", auth=("who@example.com", "wrong one!"),
                        timeout=30).status_code

    def settled(count):
        wait_for(lambda: len(auth_lines(srv.log())) >= count, f"{count} login lines")
        time.sleep(0.3)  # and no more come
        return auth_lines(srv.log())

    try:
        assert login() == 401
        first = settled(1)
        assert login() == 401
        settled(2)
        assert login() in (401, 429)  # over the limit
        lines = settled(3)
    finally:
        srv.stop()
    assert len(first) == 1, first
    assert re.search(r"jmapd\.auth: login failed from 127\.0\.0\.1 for 'who@example\.com': "
                     r"wrong password or unknown user$", first[0]), first
    assert len(lines) == 3, lines
    assert re.search(r"jmapd\.auth: login refused from 127\.0\.0\.1 for 'who@example\.com': "
                     r"too many failed logins$", lines[2]), lines
    for line in lines:
        match = fail2ban_regex().search(line)
        assert match and match.group("host") == "127.0.0.1", line
    assert "wrong one!" not in srv.log()


def test_issue_17_refused_logins_logged_at_a_capped_rate(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "who@example.com")
    srv = Serve(data_dir).start()
    try:
        http = requests.Session()
        for n in range(100):
            http.get(srv.url + "/jmap/session", auth=(f"guess{n}@example.com", "wrong"),
                     timeout=30)
        time.sleep(0.5)
        lines = auth_lines(srv.log())
    finally:
        srv.stop()
    logins = [line for line in lines if " login " in line]
    per_minute = int(re.search(r"^\s+LOG_PER_MINUTE = (\d+)", JMAPD.read_text(), re.M).group(1))
    assert per_minute <= 30
    assert len(logins) == per_minute, lines  # the rest are counted, and said after the minute
    assert all(fail2ban_regex().search(line) for line in logins)


def test_issue_17_lmtp_refused_recipient_logged(mail):
    nobody = address("nobody-here")
    code, _ = lmtp_deliver(lmtp_port_of(mail.log()), nobody, message("lost"))
    assert code == 550
    wait_for(lambda: nobody in mail.log(), "the refusal logged")
    lines = [line for line in mail.log().splitlines() if nobody in line]
    assert len(lines) == 1 and "refused" in lines[0] and "jmapd.lmtp" in lines[0], lines


def fill_connection_table(url, count=520):
    """Hold more connections than waitress's connection_limit; waitress then logs lines of
    its own (no longer accepting, then listening again)."""
    port = int(url.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(count):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(1.5)
    finally:
        for sock in held:
            sock.close()
    time.sleep(1.5)


def test_issue_17_journald_priority_on_every_line(tmp_path):
    """stderr is the journal (JOURNAL_STREAM names its device:inode): every line, jmapd's
    and waitress's own, begins with <N>; warnings are <4>, information <6>."""
    data_dir = tmp_path / "data"
    add_user(data_dir, "who@example.com")
    log_path = tmp_path / "journal.log"
    log_path.touch()
    st = os.stat(log_path)
    srv = Serve(data_dir, "--max-connections-per-address", "2000", "--lmtp", "127.0.0.1:0",
                env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, log_path=log_path)
    srv.start()
    try:
        requests.get(srv.url + "/jmap/session", auth=("who@example.com", "wrong"), timeout=30)
        lmtp_deliver(lmtp_port_of(srv.log()), "nobody@example.com", message("x"))
        fill_connection_table(srv.url)
    finally:
        srv.stop()
    lines = [line for line in srv.log().splitlines() if line]
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert not any(TIMESTAMP.match(line[3:]) for line in lines), lines  # the journal stamps
    assert any(line.startswith("<4>") and "jmapd.auth: login failed" in line for line in lines)
    assert any(line.startswith("<6>") and "listening on" in line for line in lines)
    waitress = [line for line in lines if re.match(r"<\d>\w+ waitress", line)]
    assert any(line.startswith("<4>") and "connection limit" in line for line in waitress), lines


def test_issue_17_plain_lines_when_journal_stream_names_another_file(tmp_path):
    """JOURNAL_STREAM set (systemd started something above us) but stderr is not the
    journal: plain timestamped lines, no <N> prefixes."""
    log_path = tmp_path / "serve.log"
    log_path.touch()
    st = os.stat(log_path)
    srv = Serve(tmp_path / "data", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"},
                log_path=log_path).start()
    srv.stop()
    lines = [line for line in srv.log().splitlines() if line]
    assert len(lines) >= 3 and all(TIMESTAMP.match(line) for line in lines), lines


def test_issue_17_start_up_summary_is_short_and_new_database_one_line(tmp_path, monkeypatch):
    """No JOURNAL_STREAM (a terminal, a plain log file): plain timestamped lines; a few of
    them; one for the new database; no settings dict."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    data_dir = tmp_path / "data"
    srv = Serve(data_dir, "--lmtp", "127.0.0.1:0").start()  # a new data directory
    try:
        startup = srv.log()
    finally:
        srv.stop()
    lines = startup.splitlines()
    assert lines and all(TIMESTAMP.match(line) for line in lines), startup
    assert len(lines) <= 8, startup
    assert sum("new database" in line for line in lines) == 1, startup
    assert not re.search(r"migrat|configuration|test_cheap_hashing|\{", startup), startup
    assert len(startup) < 1200, startup
    assert str(data_dir) in startup and re.search(r"jmapd \d+\.\d+\.\d+", startup), startup
    assert "listening on http://127.0.0.1:" in startup and "LMTP on 127.0.0.1:" in startup


def test_issue_17_user_add_on_an_existing_database_logs_no_migrations(tmp_path):
    data_dir = tmp_path / "data"
    first = jmapd("user", "add", "a@example.com", "--password-stdin", "--data-dir", data_dir,
                  "--test-cheap-hashing", input=PASSWORD + "\n")
    assert first.returncode == 0
    assert len([line for line in first.stderr.splitlines() if line]) == 1, first.stderr
    assert "new database" in first.stderr
    again = jmapd("user", "add", "b@example.com", "--password-stdin", "--data-dir", data_dir,
                  "--test-cheap-hashing", input=PASSWORD + "\n")
    assert again.returncode == 0
    assert again.stderr == "", again.stderr
    assert again.stdout == "user b@example.com added\n"


def test_issue_17_ready_time_excludes_the_first_run_prompt(tmp_path):
    data_dir = tmp_path / "data"
    steps = [(rb"E-mail address: ", (2.0, b"first@example.com\n")),
             (rb"Password: ", (0.5, b"long enough pw\n")),
             (rb"Password again: ", b"long enough pw\n"),
             (rb"ready in \d+ ms", (0.5, b"\x03"))]  # then Ctrl-C stops the server
    status, output = run_in_pty(serve_argv("--data-dir", data_dir), steps)
    ready = int(re.search(rb"ready in (\d+) ms", output).group(1))
    assert ready < 2000, output
    assert status in (0, 130) and b"Traceback" not in output, output


# =============================================================================
# Reaching it from a real client
# =============================================================================


def test_issue_17_front_page_says_what_this_is(mail):
    r = requests.get(mail.url + "/", timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    assert "jmapd" in r.text and "/jmap/session" in r.text


def test_issue_17_tls_handshake_on_the_plain_port_is_logged_once(mail):
    """A client speaking TLS to the plain-HTTP port (an https:// URL for jmapd itself):
    one line, naming TLS and the README's HTTPS section, however many times it happens."""
    port = int(mail.url.rsplit(":", 1)[1])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.recv(1)
    wait_for(lambda: "TLS" in mail.log(), "the TLS line")
    time.sleep(0.3)
    assert requests.get(mail.url + "/", timeout=30).status_code == 200  # still serving
    lines = [line for line in mail.log().splitlines() if "TLS" in line]
    assert len(lines) == 1, lines
    assert "README" in lines[0] and "127.0.0.1" in lines[0], lines


# ---- the systemd unit ----


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def test_issue_17_unit_reads_an_options_file():
    environment_files = [v for s, k, v in unit_entries(UNIT)
                         if s == "Service" and k == "EnvironmentFile"]
    assert environment_files == ["-/etc/jmapd/options"]
    assert "$JMAPD_OPTIONS" in unit_value("ExecStart").split()
    assert unit_argv({}) == unit_argv({"JMAPD_OPTIONS": ""})  # no file: no extra words


def analyze(folder):
    done = subprocess.run(["systemd-analyze", "verify", str(folder / "jmapd.service")],
                          capture_output=True, text=True, timeout=60, cwd=folder)
    return done.returncode, done.stdout + done.stderr


@needs_systemd_analyze
def test_issue_17_unit_verifies_alone_and_with_a_drop_in(tmp_path):
    shutil.copy(UNIT, tmp_path / "jmapd.service")
    code, output = analyze(tmp_path)
    assert code == 0 and not re.search(r"error|invalid|unknown|ignoring", output, re.I), output
    drop_in = tmp_path / "jmapd.service.d"
    drop_in.mkdir()
    (drop_in / "override.conf").write_text(  # what `systemctl edit jmapd` saves
        '[Service]\nEnvironment="JMAPD_OPTIONS=--lmtp 127.0.0.1:2424 --max-websockets 7"\n')
    code, output = analyze(tmp_path)
    assert code == 0 and not re.search(r"error|invalid|unknown|ignoring", output, re.I), output
    (drop_in / "typo.conf").write_text("[Service]\nEnviroment=JMAPD_OPTIONS=--x\n")
    code, output = analyze(tmp_path)  # the drop-in is read: its mistake is reported
    assert "Enviroment" in output, output


def test_issue_17_unit_execstart_takes_jmapd_options(tmp_path):
    argv = unit_argv({"JMAPD_OPTIONS": "--max-websockets 7 --lmtp 127.0.0.1:0"})
    assert argv[-4:] == ["--max-websockets", "7", "--lmtp", "127.0.0.1:0"]
    data_dir = tmp_path / "state"
    add_user(data_dir, "who@example.com")
    argv = [*argv[2:], "--test-cheap-hashing", "--log-level", "debug"]
    argv[argv.index("--data-dir") + 1] = str(data_dir)
    argv[argv.index("--listen") + 1] = "127.0.0.1:0"
    argv[argv.index("--websocket") + 1] = f"127.0.0.1:{free_port()}"
    assert argv[0] == "serve"
    srv = Serve(data_dir, *argv[1:], cheap=False)
    srv.start()
    try:
        assert lmtp_deliver(lmtp_port_of(srv.log()), "who@example.com",
                            message("via the options file")) == (250, 250)
        assert subjects_of(Client(srv.url, "who@example.com")) == ["via the options file"]
    finally:
        srv.stop()
    assert re.search(r"'max_websockets': 7\b", srv.log()), srv.log()


def test_issue_17_unit_documentation_is_installed_by_its_steps():
    documentation = unit_value("Documentation", "Unit")
    match = re.fullmatch(r"file://(/\S+)", documentation)
    assert match, documentation
    installed = match.group(1)
    comments = [line.lstrip("#").strip() for line in UNIT.read_text().splitlines()
                if line.startswith("#")]
    steps = [line.split() for line in comments if line.startswith("install ")]
    sources = [words[-2] for words in steps if words[-1] == installed]
    assert sources, (installed, comments)
    assert (ROOT / sources[0]).is_file(), sources


# =============================================================================
# status
# =============================================================================


def status(data_dir):
    done = jmapd("status", "--data-dir", data_dir)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout


def status_line(text, label):
    match = re.search(rf"^{label}\s+(.*)$", text, re.M)
    assert match, (label, text)
    return match.group(1)


def test_issue_17_status_of_a_running_server_then_backed_up_then_stopped(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "a@example.com")
    add_user(data_dir, "b@example.com")
    srv = Serve(data_dir, "--lmtp", "127.0.0.1:0").start()
    try:
        lmtp = lmtp_port_of(srv.log())
        for n in range(3):
            assert lmtp_deliver(lmtp, "a@example.com", message(f"m{n}")) == (250, 250)
        code, text = status(data_dir)
        assert code == 1, text  # no backup yet
        assert re.match(r"jmapd \d+\.\d+\.\d+\n", text), text
        directory = status_line(text, "data directory")
        me = pwd.getpwuid(os.getuid()).pw_name
        assert str(data_dir) in directory and f"owner {me}" in directory
        assert re.search(r"GiB free of", directory), directory
        assert re.match(r"schema \d+", status_line(text, "database")), text
        server = status_line(text, "server")
        assert f"pid {srv.proc.pid}" in server, server
        assert f"HTTP {srv.url}/" in server and f"LMTP 127.0.0.1:{lmtp}" in server, server
        assert status_line(text, "outbox") == "empty"
        assert status_line(text, "last backup") == "never"
        assert "a@example.com: 3 messages" in text and "b@example.com: 0 messages" in text
        assert re.search(r"^needs attention: .*no backup", text, re.M), text

        backup = tmp_path / "backup"
        done = jmapd("backup", backup, "--data-dir", data_dir)
        assert done.returncode == 0, done.stderr
        code, text = status(data_dir)
        assert code == 0, text
        assert str(backup) in status_line(text, "last backup")
        assert text.rstrip().endswith("nothing needs attention"), text
    finally:
        srv.stop()
    code, text = status(data_dir)
    assert code == 0, text
    assert status_line(text, "server") == "not running"


def test_issue_17_status_after_serve_was_killed(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "a@example.com")
    srv = Serve(data_dir).start()
    assert "running since" in status_line(status(data_dir)[1], "server")
    srv.stop(signal.SIGKILL)
    assert status_line(status(data_dir)[1], "server") == "not running (it did not stop cleanly)"


def test_issue_17_status_old_backup_needs_attention(tmp_path):
    """No backup for more than 30 days. The test cannot wait a month: it moves the date
    in the record `backup` wrote (backup.json in the data directory) 40 days back."""
    data_dir = tmp_path / "data"
    add_user(data_dir, "a@example.com")
    assert jmapd("backup", tmp_path / "backup", "--data-dir", data_dir).returncode == 0
    record_path = data_dir / "backup.json"
    record = json.loads(record_path.read_text())
    old = time.gmtime(time.time() - 40 * 86400)
    record["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", old)
    record_path.write_text(json.dumps(record))
    code, text = status(data_dir)
    assert code == 1, text
    assert "(40 days ago)" in status_line(text, "last backup"), text
    assert re.search(r"^needs attention: .*no backup for 40 days", text, re.M), text


def test_issue_17_status_missing_blob_needs_attention(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "a@example.com")
    done = jmapd("deliver", "--user", "a@example.com", "--data-dir", data_dir,  # too big to
                 input=message("soon without its file", "x" * 400_000 + "\r\n").decode())
    assert done.returncode == 0, done.stderr
    assert jmapd("backup", tmp_path / "backup", "--data-dir", data_dir).returncode == 0
    assert status(data_dir)[0] == 0
    blob = next(p for p in (data_dir / "blobs").rglob("*") if p.is_file())
    blob.unlink()
    code, text = status(data_dir)
    assert code == 1, text
    assert re.search(r"^needs attention: .*missing", text, re.M), text


def test_issue_17_status_failing_outbox_needs_attention(tmp_path):
    """A relay that refuses connections (a closed port): the submission stays queued with
    a failed attempt, and status says so and exits 1."""
    data_dir = tmp_path / "data"
    add_user(data_dir, "a@example.com")
    srv = Serve(data_dir, "--smtp-relay", f"127.0.0.1:{free_port()}",
                "--smtp-retry-seconds", "1").start()
    try:
        assert jmapd("backup", tmp_path / "backup", "--data-dir", data_dir).returncode == 0
        assert status(data_dir)[0] == 0
        client = Client(srv.url, "a@example.com")
        account = client.account_id
        using = [CORE, MAIL, SUBMISSION]
        boxes = client.ok("Mailbox/get", {"accountId": account, "ids": None})["list"]
        drafts = next(m["id"] for m in boxes if m["role"] == "drafts")
        identity = client.ok("Identity/get", {"accountId": account, "ids": None},
                             using=using)["list"][0]["id"]
        created = client.ok("Email/set", {"accountId": account, "create": {"m": {
            "mailboxIds": {drafts: True}, "keywords": {"$draft": True},
            "from": [{"email": "a@example.com"}], "to": [{"email": "far@example.net"}],
            "subject": "to a relay that is down",
            "textBody": [{"partId": "t", "type": "text/plain"}],
            "bodyValues": {"t": {"value": "Hello"}}}}})["created"]["m"]
        out = client.ok("EmailSubmission/set", {"accountId": account, "create": {"s": {
            "identityId": identity, "emailId": created["id"]}}}, using=using)
        assert out.get("notCreated") in (None, {}), out

        def failing():
            code, text = status(data_dir)
            return (code, text) if "1 failing" in text else None

        code, text = wait_for(failing, "status to show the failing send", timeout=20)
    finally:
        srv.stop()
    assert code == 1, text
    assert re.search(r"^outbox\s+1 waiting .*1 failing", text, re.M), text
    assert re.search(r"^needs attention: .*fail to send", text, re.M), text


# =============================================================================
# Search snippets
# =============================================================================


def test_issue_17_snippet_from_one_alternative(mail, mail_user):
    user, client = mail_user
    sentence = "We baked a rhubarb pie for the neighbours."
    raw = (f"From: Cook <cook@example.com>\r\nTo: {user}\r\nSubject: Sunday\r\n"
           f"Message-ID: <{secrets.token_hex(8)}@example.com>\r\nMIME-Version: 1.0\r\n"
           "Content-Type: multipart/alternative; boundary=b\r\n\r\n"
           "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           f"{sentence}\r\n"
           "--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           f"<html><body><p>{sentence}</p></body></html>\r\n--b--\r\n").encode()
    done = subprocess.run([sys.executable, str(JMAPD), "deliver", "--user", user, "--data-dir",
                           str(mail.data_dir)], input=raw, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    account = client.account_id
    filter_ = {"text": "rhubarb"}
    ids = client.ok("Email/query", {"accountId": account, "filter": filter_})["ids"]
    assert len(ids) == 1
    snippet = client.ok("SearchSnippet/get", {"accountId": account, "emailIds": ids,
                                              "filter": filter_})["list"][0]
    preview = snippet["preview"]
    assert preview and preview.lower().count("rhubarb") == 1, preview
    assert preview.count("neighbours") == 1, preview


# =============================================================================
# Help texts
# =============================================================================


def test_issue_17_help_shows_defaults_and_placeholders():
    done = jmapd("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--listen HOST:PORT" in text and "(default: 127.0.0.1:8080)" in text
    assert "--data-dir PATH" in text and "(default: ./jmapd-data)" in text
    assert "--max-websockets N" in text
