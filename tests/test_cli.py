"""The command line (jmapd section 14): `serve` and `user add|passwd|del|list`.

This is the contract scripts and administrators rely on: exit status (0 ok, 1 the
command failed, 2 bad usage/configuration), where passwords come from (stdin, never
argv), which commands may create a data directory, `--data-dir` before or after the
subcommand, and how `serve` starts and stops. Logins are checked over HTTP Basic
(RFC 7617) against a real `jmapd.py serve` subprocess on 127.0.0.1.
"""

import base64
import itertools
import signal
import socket
import subprocess
import sys

import pytest
import requests

from conftest import JMAPD, PASSWORD, Client, Server, add_user, run_cli

_names = itertools.count(1)


def new_name(tag="user"):
    return f"{tag}{next(_names)}@example.com"


def run_cli_in(cwd, *args, input_text=None, timeout=60):
    """Like run_cli, but in a chosen working directory and without an implicit --data-dir."""
    cmd = [sys.executable, str(JMAPD), *map(str, args), "--test-cheap-hashing"]
    return subprocess.run(
        cmd, cwd=cwd, input=input_text, capture_output=True, text=True, timeout=timeout,
        stdin=None if input_text is not None else subprocess.DEVNULL,
    )


def login_status(url, username, password):
    """HTTP status of GET /jmap/session with Basic credentials (200 ok, 401 refused)."""
    return requests.get(url + "/jmap/session", auth=(username, password), timeout=30).status_code


def listed_users(data_dir):
    done = run_cli("user", "list", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def have_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    """A server of this module's own, so its failed logins touch no other module."""
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir, "--max-login-failures-per-address", "1000").start()
    yield srv
    srv.stop()


# ---- user add ----


def test_cli_user_add_creates_data_dir_and_user(tmp_path):
    data_dir = tmp_path / "new" / "data"
    done = run_cli("user", "add", "alice@example.com", "--password-stdin",
                   data_dir=data_dir, input_text="s3cret-words\n")
    assert done.returncode == 0, done.stderr
    assert data_dir.is_dir()
    assert listed_users(data_dir) == ["alice@example.com"]


def test_cli_user_add_password_stdin_strips_exactly_one_newline(cli_server):
    username = new_name()
    done = run_cli("user", "add", username, "--password-stdin",
                   data_dir=cli_server.data_dir, input_text=" pass word \n")
    assert done.returncode == 0, done.stderr
    assert login_status(cli_server.url, username, " pass word ") == 200
    assert login_status(cli_server.url, username, " pass word \n") == 401


def test_cli_user_add_password_stdin_without_newline(cli_server):
    username = new_name()
    done = run_cli("user", "add", username, "--password-stdin",
                   data_dir=cli_server.data_dir, input_text="no-newline-at-end")
    assert done.returncode == 0, done.stderr
    assert login_status(cli_server.url, username, "no-newline-at-end") == 200


def test_cli_user_add_password_stdin_keeps_second_newline(cli_server):
    username = new_name()
    done = run_cli("user", "add", username, "--password-stdin",
                   data_dir=cli_server.data_dir, input_text="two-words-pw\n\n")
    assert done.returncode == 0, done.stderr
    assert login_status(cli_server.url, username, "two-words-pw\n") == 200
    assert login_status(cli_server.url, username, "two-words-pw") == 401


def test_cli_data_dir_before_or_after_subcommand(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data_dir = tmp_path / "data"
    done = run_cli_in(cwd, "--data-dir", data_dir, "user", "add", "bob@example.com",
                      "--password-stdin", input_text="long-enough-pw\n")
    assert done.returncode == 0, done.stderr
    done = run_cli_in(cwd, "user", "add", "carol@example.com", "--password-stdin",
                      "--data-dir", data_dir, input_text="long-enough-pw\n")
    assert done.returncode == 0, done.stderr
    before = run_cli_in(cwd, "--data-dir", data_dir, "user", "list")
    after = run_cli_in(cwd, "user", "list", "--data-dir", data_dir)
    assert before.returncode == 0, before.stderr
    assert after.returncode == 0, after.stderr
    assert sorted(before.stdout.splitlines()) == ["bob@example.com", "carol@example.com"]
    assert sorted(after.stdout.splitlines()) == ["bob@example.com", "carol@example.com"]
    assert list(cwd.iterdir()) == []  # nothing fell back to the default ./jmapd-data


@pytest.mark.parametrize("bad", [
    "alice", "@example.com", "al ice@example.com", "alice@exa..mple.com",
])
def test_cli_user_add_username_must_be_email_address(cli_server, bad):
    done = run_cli("user", "add", bad, "--password-stdin", data_dir=cli_server.data_dir,
                   input_text="pw\n")
    assert done.returncode == 2, done.stderr
    assert "e-mail address" in done.stderr
    assert bad in done.stderr
    assert bad.lower() not in listed_users(cli_server.data_dir)


def test_cli_user_add_folds_username_to_lower_case(cli_server):
    lower = new_name("mixed")
    mixed = lower.replace("mixed", "MiXeD").replace("example.com", "Example.COM")
    done = run_cli("user", "add", mixed, "--password-stdin", data_dir=cli_server.data_dir,
                   input_text="pw-mixed-case\n")
    assert done.returncode == 0, done.stderr
    users = listed_users(cli_server.data_dir)
    assert lower in users
    assert mixed not in users
    assert login_status(cli_server.url, lower, "pw-mixed-case") == 200
    again = run_cli("user", "add", lower, "--password-stdin", data_dir=cli_server.data_dir,
                    input_text="other-password\n")
    assert again.returncode == 1, again.stderr  # the same user, whatever its case


def test_cli_user_add_existing_user_fails(cli_server):
    username = add_user(cli_server.data_dir, new_name())
    done = run_cli("user", "add", username, "--password-stdin", data_dir=cli_server.data_dir,
                   input_text="a-new-password\n")
    assert done.returncode == 1
    assert "exists" in done.stderr
    assert listed_users(cli_server.data_dir).count(username) == 1
    assert login_status(cli_server.url, username, PASSWORD) == 200  # password unchanged


@pytest.mark.parametrize("stdin_text", ["\n", ""])
def test_cli_user_add_empty_password_refused(cli_server, stdin_text):
    username = new_name("empty")
    done = run_cli("user", "add", username, "--password-stdin",
                   data_dir=cli_server.data_dir, input_text=stdin_text)
    assert done.returncode == 1
    assert "empty" in done.stderr
    assert username not in listed_users(cli_server.data_dir)


@pytest.mark.parametrize("argv", [
    ["--password", "hunter2"],
    ["hunter2"],
    ["--password-stdin", "hunter2"],
])
def test_cli_user_add_no_password_on_argv(cli_server, argv):
    username = new_name("argv")
    done = run_cli("user", "add", username, *argv, data_dir=cli_server.data_dir,
                   input_text="from-stdin\n")
    assert done.returncode == 2, done.stderr
    assert username not in listed_users(cli_server.data_dir)


def test_cli_user_add_without_terminal_refuses(cli_server):
    username = new_name("noterm")
    done = run_cli("user", "add", username, data_dir=cli_server.data_dir)  # stdin: /dev/null
    assert done.returncode == 1
    assert "--password-stdin" in done.stderr
    assert username not in listed_users(cli_server.data_dir)


# ---- user passwd, list, del ----


def test_cli_user_passwd_changes_password_while_serving(cli_server):
    username = add_user(cli_server.data_dir, new_name(), "old-password")
    assert login_status(cli_server.url, username, "old-password") == 200  # now cached
    done = run_cli("user", "passwd", username, "--password-stdin",
                   data_dir=cli_server.data_dir, input_text="new-password\n")
    assert done.returncode == 0, done.stderr
    assert login_status(cli_server.url, username, "old-password") == 401
    assert login_status(cli_server.url, username, "new-password") == 200


def test_cli_user_passwd_without_terminal_refuses(cli_server):
    username = add_user(cli_server.data_dir, new_name(), "kept-password")
    done = run_cli("user", "passwd", username, data_dir=cli_server.data_dir)
    assert done.returncode == 1
    assert "--password-stdin" in done.stderr
    assert login_status(cli_server.url, username, "kept-password") == 200


def test_cli_user_passwd_unknown_user_fails(cli_server):
    username = new_name("nobody")
    done = run_cli("user", "passwd", username, "--password-stdin",
                   data_dir=cli_server.data_dir, input_text="pw\n")
    assert done.returncode == 1
    assert username in done.stderr
    assert username not in listed_users(cli_server.data_dir)


def test_cli_user_list_one_per_line(tmp_path):
    data_dir = tmp_path / "data"
    names = ["zoe@example.com", "adam@example.org", "mia@example.net"]
    for name in names:
        add_user(data_dir, name)
    done = run_cli("user", "list", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    assert sorted(done.stdout.splitlines()) == sorted(names)


def test_cli_user_del_removes_user_while_serving(cli_server):
    username = add_user(cli_server.data_dir, new_name("gone"))
    client = Client(cli_server.url, username)
    account_id = client.account_id  # logged in: the credential is cached now
    assert client.ok("Mailbox/get", {"accountId": account_id, "ids": None})["list"]
    done = run_cli("user", "del", username, data_dir=cli_server.data_dir)
    assert done.returncode == 0, done.stderr
    assert username not in listed_users(cli_server.data_dir)
    assert login_status(cli_server.url, username, PASSWORD) == 401
    r = client.post({"using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
                     "methodCalls": [["Mailbox/get", {"accountId": account_id}, "c0"]]})
    if r.status_code == 200:
        name, args, _ = r.json()["methodResponses"][0]
        assert (name, args["type"]) == ("error", "accountNotFound"), r.text
    else:
        assert r.status_code == 401, r.text


def test_cli_user_del_unknown_user_fails(cli_server):
    before = listed_users(cli_server.data_dir)
    done = run_cli("user", "del", "nobody@example.com", data_dir=cli_server.data_dir)
    assert done.returncode == 1
    assert "nobody@example.com" in done.stderr
    assert listed_users(cli_server.data_dir) == before


def test_cli_user_del_purge(cli_server):
    username = add_user(cli_server.data_dir, new_name("purged"))
    assert login_status(cli_server.url, username, PASSWORD) == 200
    done = run_cli("user", "del", username, "--purge", data_dir=cli_server.data_dir)
    assert done.returncode == 0, done.stderr
    assert username not in listed_users(cli_server.data_dir)
    assert login_status(cli_server.url, username, PASSWORD) == 401


def test_cli_user_del_with_mail_needs_purge(cli_server):
    username = add_user(cli_server.data_dir, new_name("mailholder"))
    client = Client(cli_server.url, username)
    raw = (b"From: sender@example.org\r\nTo: " + username.encode() + b"\r\n"
           b"Subject: keep me\r\nMessage-ID: <keep-me@example.org>\r\n"
           b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nhello\r\n")
    upload_url = client.session["uploadUrl"].replace("{accountId}", client.account_id)
    up = client.http.post(upload_url, data=raw, headers={"Content-Type": "message/rfc822"},
                          timeout=30)
    assert up.status_code == 201, up.text
    inbox = client.ok("Mailbox/query", {"accountId": client.account_id,
                                        "filter": {"role": "inbox"}})["ids"][0]
    imported = client.ok("Email/import", {"accountId": client.account_id, "emails": {
        "m1": {"blobId": up.json()["blobId"], "mailboxIds": {inbox: True}, "keywords": {}}}})
    assert "m1" in (imported["created"] or {}), imported

    refused = run_cli("user", "del", username, data_dir=cli_server.data_dir)
    assert refused.returncode == 1
    assert "--purge" in refused.stderr
    assert username in listed_users(cli_server.data_dir)
    assert login_status(cli_server.url, username, PASSWORD) == 200

    done = run_cli("user", "del", username, "--purge", data_dir=cli_server.data_dir)
    assert done.returncode == 0, done.stderr
    assert username not in listed_users(cli_server.data_dir)
    assert login_status(cli_server.url, username, PASSWORD) == 401


# ---- only serve and user add create a data directory ----


@pytest.mark.parametrize("args,stdin_text", [
    (["user", "list"], None),
    (["user", "passwd", "alice@example.com", "--password-stdin"], "pw\n"),
    (["user", "del", "alice@example.com"], None),
    (["user", "del", "alice@example.com", "--purge"], None),
])
def test_cli_user_commands_refuse_missing_data_dir(tmp_path, args, stdin_text):
    missing = tmp_path / "missing"
    done = run_cli(*args, data_dir=missing, input_text=stdin_text)
    assert done.returncode != 0
    assert str(missing) in done.stderr
    assert "does not exist" in done.stderr
    assert not missing.exists()


def test_cli_serve_on_empty_data_dir_says_how_to_add_user(tmp_path):
    data_dir = tmp_path / "fresh"
    srv = Server(data_dir).start()  # stdin is /dev/null: no terminal to ask on
    try:
        assert data_dir.is_dir()  # serve creates its data directory
        assert "user add" in srv.log()
        assert str(data_dir) in srv.log()
    finally:
        srv.stop()


# ---- serve options ----


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_cli_serve_listen_ipv6_literal(tmp_path):
    data_dir = tmp_path / "data"
    username = add_user(data_dir, "v6@example.com")
    srv = Server(data_dir, "--listen", "[::1]:0").start()
    try:
        assert srv.url.startswith("http://[::1]:")
        client = Client(srv.url, username)
        assert client.account_id in client.session["accounts"]
    finally:
        srv.stop()


@pytest.mark.parametrize("listen", [
    "localhost", "127.0.0.1:", "127.0.0.1:65536", "::1:8080", "[not-v6]:8080",
])
def test_cli_serve_bad_listen_exits_2(tmp_path, listen):
    done = run_cli("serve", "--listen", listen, data_dir=tmp_path / "data", timeout=20)
    assert done.returncode == 2
    assert "--listen" in done.stderr


@pytest.mark.parametrize("days", ["10", "29", "thirty"])
def test_cli_serve_changes_horizon_below_minimum_exits_2(tmp_path, days):
    done = run_cli("serve", "--changes-horizon-days", days, data_dir=tmp_path / "data",
                   timeout=20)
    assert done.returncode == 2
    assert "--changes-horizon-days" in done.stderr


def test_cli_serve_changes_horizon_minimum_accepted(tmp_path):
    srv = Server(tmp_path / "data", "--changes-horizon-days", "30").start()
    srv.stop()
    assert srv.proc.returncode == 0


def test_cli_log_never_contains_password(tmp_path):
    data_dir = tmp_path / "data"
    secret, changed, wrong = "Sekr3t-Pa55-alpha", "Sekr3t-Pa55-beta", "Wr0ng-Pa55-gamma"
    outputs = []
    done = run_cli("user", "add", "alice@example.com", "--password-stdin", "--log-level",
                   "debug", data_dir=data_dir, input_text=secret + "\n")
    assert done.returncode == 0, done.stderr
    outputs += [done.stdout, done.stderr]
    srv = Server(data_dir, "--log-level", "debug").start()
    try:
        client = Client(srv.url, "alice@example.com", secret)
        client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})
        assert login_status(srv.url, "alice@example.com", wrong) == 401
        assert login_status(srv.url, "nobody@example.com", secret) == 401
        done = run_cli("user", "passwd", "alice@example.com", "--password-stdin",
                       "--log-level", "debug", data_dir=data_dir, input_text=changed + "\n")
        assert done.returncode == 0, done.stderr
        outputs += [done.stdout, done.stderr]
        assert login_status(srv.url, "alice@example.com", changed) == 200
    finally:
        srv.stop()
    outputs.append(srv.log())
    everything = "\n".join(outputs)
    assert "listening on" in everything  # the log was written
    for password in (secret, changed, wrong):
        assert password not in everything
        credentials = base64.b64encode(f"alice@example.com:{password}".encode()).decode()
        assert credentials not in everything


# ---- help and usage errors ----


HIDDEN = ("--test-now", "--test-cheap-hashing", "test-")


@pytest.mark.parametrize("args,expected", [
    ([], ["--data-dir", "--log-level", "serve", "user"]),
    (["serve"], ["--data-dir", "--log-level", "--listen", "--public-url", "--threads",
                 "--max-size-upload", "--max-concurrent-upload", "--max-size-request",
                 "--max-concurrent-requests", "--max-calls-in-request",
                 "--max-objects-in-get", "--max-objects-in-set", "--changes-horizon-days",
                 "--unix-socket", "--trusted-proxy", "--max-login-failures-per-address",
                 "--max-login-failures-per-user"]),
    (["user", "add"], ["--data-dir", "--password-stdin"]),
    (["user", "passwd"], ["--data-dir", "--password-stdin"]),
    (["user", "del"], ["--data-dir", "--purge"]),
])
def test_cli_help_lists_options_but_not_hidden_ones(args, expected):
    done = run_cli(*args, "--help")
    assert done.returncode == 0, done.stderr
    for option in expected:
        assert option in done.stdout
    for hidden in HIDDEN:
        assert hidden not in done.stdout


@pytest.mark.parametrize("args", [
    ["serve", "--no-such-option"],
    ["user", "list", "--no-such-option"],
    ["user", "frobnicate", "alice@example.com"],
    ["user", "add", "alice@example.com", "--purge", "--password-stdin"],
    ["serve", "--password-stdin"],
    [],
])
def test_cli_unknown_option_or_command_exits_2(tmp_path, args):
    data_dir = tmp_path / "data"
    done = run_cli(*args, data_dir=data_dir, input_text="pw\n", timeout=20)
    assert done.returncode == 2
    # Issue 17: the one line that matters and where to read more, not the whole usage.
    assert done.stderr.startswith("jmapd: ") and "--help" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not data_dir.exists()


# ---- signals ----


def test_cli_sigterm_stops_server_with_status_0(tmp_path):
    data_dir = tmp_path / "data"
    username = add_user(data_dir, "term@example.com")
    srv = Server(data_dir).start()
    try:
        client = Client(srv.url, username)  # keeps a keep-alive connection open
        client.ok("Mailbox/get", {"accountId": client.account_id, "ids": None})
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=10) == 0, srv.log()
    finally:
        srv.stop()
