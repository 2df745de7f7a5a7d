"""The README's first command on a fresh machine: `serve` at a terminal asks for the first
user, then a JMAP client logs in with it (README "Logging in the first time").

The server runs under a pseudo-terminal (pty.fork makes it the controlling terminal, as a
person's shell would), so getpass really prompts without echo.
"""

import os
import pty
import re
import select
import signal
import sys
import time

import pytest
import requests

from conftest import JMAPD

ADDRESS, PASSWORD = "newcomer@example.com", "first password"


def read_until(fd, pattern, timeout=30):
    """Read the terminal until `pattern` appears; return everything read."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} in terminal output: {seen!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.fixture
def terminal_server(tmp_path):
    data_dir = tmp_path / "jmapd-data"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the README's command, in a fresh directory
        os.chdir(tmp_path)
        os.execv(sys.executable, [sys.executable, str(JMAPD), "serve", "--listen",
                                  "127.0.0.1:0", "--test-cheap-hashing"])
    yield pid, fd, data_dir
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    os.close(fd)


def test_first_run_prompts_for_the_first_user_then_client_logs_in(terminal_server):
    pid, fd, data_dir = terminal_server
    read_until(fd, rb"E-mail address: ")
    os.write(fd, ADDRESS.encode() + b"\n")
    read_until(fd, rb"Password: ")
    os.write(fd, PASSWORD.encode() + b"\n")
    read_until(fd, rb"Password again: ")
    os.write(fd, PASSWORD.encode() + b"\n")
    output = read_until(fd, rb"listening on http://\S+/ ")
    assert PASSWORD.encode() not in output  # never echoed, never logged
    url = re.search(rb"listening on (http://\S+?)/ ", output).group(1).decode()
    assert data_dir.is_dir()  # the default ./jmapd-data
    r = requests.get(url + "/.well-known/jmap", auth=(ADDRESS, PASSWORD), timeout=30)
    assert r.status_code == 200 and r.json()["username"] == ADDRESS
    assert requests.get(url + "/jmap/session", auth=(ADDRESS, "wrong"), timeout=30).status_code == 401


def test_first_run_asks_again_after_a_bad_address_or_mismatch(terminal_server):
    pid, fd, _ = terminal_server
    read_until(fd, rb"E-mail address: ")
    os.write(fd, b"not an address\n")
    read_until(fd, rb"E-mail address: ")
    os.write(fd, ADDRESS.encode() + b"\n")
    read_until(fd, rb"Password: ")
    os.write(fd, b"one\n")
    read_until(fd, rb"Password again: ")
    os.write(fd, b"two\n")
    read_until(fd, rb"differ[\s\S]*E-mail address: ")  # both arrive in one write
    os.write(fd, ADDRESS.encode() + b"\n")
    read_until(fd, rb"Password: ")
    os.write(fd, PASSWORD.encode() + b"\n")
    read_until(fd, rb"Password again: ")
    os.write(fd, PASSWORD.encode() + b"\n")
    output = read_until(fd, rb"listening on http://\S+/ ")
    url = re.search(rb"listening on (http://\S+?)/ ", output).group(1).decode()
    r = requests.get(url + "/jmap/session", auth=(ADDRESS, PASSWORD), timeout=30)
    assert r.status_code == 200
