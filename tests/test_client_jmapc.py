"""An independent client library, jmapc (PyPI), drives the real server unmodified.

RFC 8620 §2 and §2.2 (session, autodiscovery through /.well-known/jmap), §3 (requests,
result references), §4 (Core/echo), §6.1/§6.2 (upload, download); RFC 8621 §2
(Mailbox/get, /query, /set).

jmapc only speaks https: it fetches https://{host}/.well-known/jmap. jmapd expects TLS
to be terminated by a reverse proxy in front of it, so the tests put one in front:
`TlsTerminator`, a requests transport adapter mounted on jmapc's own requests session,
takes each https://jmap.example/... request and forwards it over plain HTTP to the
jmapd subprocess on 127.0.0.1 (no certificates, no extra process). jmapd runs with
`--public-url https://jmap.example`, as it would behind such a proxy.
"""

import itertools
import mimetypes

import jmapc
import pytest
import requests
from jmapc import Ref
from jmapc.methods import (
    CoreEcho,
    CoreEchoResponse,
    MailboxGet,
    MailboxGetResponse,
    MailboxQuery,
    MailboxQueryResponse,
    MailboxSet,
    MailboxSetResponse,
)
from jmapc.models import EmailBodyPart, MailboxQueryFilterCondition

from conftest import PASSWORD, Server, add_user, run_cli

PUBLIC_HOST = "jmap.example"
ROLES = {"inbox", "drafts", "sent", "archive", "junk", "trash"}


class TlsTerminator(requests.adapters.HTTPAdapter):
    """A TLS-terminating reverse proxy in miniature: https://<public>/... -> http://<backend>/...

    Each forwarded request is recorded as (method, path, status). The response keeps the
    URL the client asked for, as it would through a real proxy, so requests' redirect
    handling (and its rule to drop credentials on a change of scheme or host) sees https.
    """

    def __init__(self, public_origin, backend, extra_headers=None):
        super().__init__()
        self.public_origin, self.backend = public_origin, backend
        self.extra_headers = extra_headers or {}
        self.seen = []

    def send(self, request, **kwargs):
        assert request.url.startswith(self.public_origin + "/"), request.url
        inner = request.copy()
        inner.url = self.backend + request.url[len(self.public_origin) :]
        inner.headers.update(self.extra_headers)
        response = super().send(inner, **kwargs)
        self.seen.append((request.method, request.path_url, response.status_code))
        response.request, response.url = request, request.url
        return response


@pytest.fixture(scope="module")
def proxied_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("jmapc") / "data"
    add_user(data_dir, "first@example.com")
    srv = Server(data_dir, "--public-url", f"https://{PUBLIC_HOST}").start()
    yield srv
    srv.stop()


_users = itertools.count(1)


def connect(client):
    """Mount the TLS terminator on jmapc's own requests session; return the terminator."""
    proxy = TlsTerminator(f"https://{PUBLIC_HOST}", client.backend_url)
    client.requests_session.mount(f"https://{PUBLIC_HOST}/", proxy)
    return proxy


@pytest.fixture
def jmap(proxied_server):
    """A jmapc Client logged in (HTTP Basic) as a fresh user; .proxy records the traffic."""
    username = f"jmapc{next(_users)}@example.com"
    add_user(proxied_server.data_dir, username)
    client = jmapc.Client.create_with_password(host=PUBLIC_HOST, user=username, password=PASSWORD)
    client.backend_url = proxied_server.url
    client.proxy = connect(client)
    return client


def test_jmapc_session_discovery(jmap):
    session = jmap.jmap_session
    # jmapc asked for /.well-known/jmap and followed the redirect to the session (§2.2)
    assert [(m, p) for m, p, _ in jmap.proxy.seen] == [
        ("GET", "/.well-known/jmap"),
        ("GET", "/jmap/session"),
    ]
    assert jmap.proxy.seen[0][2] in (301, 302, 307, 308)
    assert jmap.proxy.seen[1][2] == 200
    assert session.username == jmap.requests_session.auth.username
    base = f"https://{PUBLIC_HOST}/"
    for url in (
        session.api_url,
        session.upload_url,
        session.download_url,
        session.event_source_url,
    ):
        assert url.startswith(base), url
    assert session.capabilities.core.max_size_upload == 50_000_000
    assert "i;unicode-casemap" in session.capabilities.core.collation_algorithms
    assert jmap.account_id == session.primary_accounts.mail


def test_jmapc_core_echo(jmap):
    data = {"hello": True, "nested": {"list": [1, "two", None]}, "text": "Grüße"}
    response = jmap.request(CoreEcho(data=data))
    assert isinstance(response, CoreEchoResponse)
    assert response.data == data


def test_jmapc_mailbox_get_roles(jmap):
    response = jmap.request(MailboxGet(ids=None))
    assert isinstance(response, MailboxGetResponse), response
    assert response.account_id == jmap.account_id
    assert {m.role for m in response.data} == ROLES
    assert len(response.data) == 6
    inbox = next(m for m in response.data if m.role == "inbox")
    assert (inbox.name, inbox.parent_id, inbox.total_emails) == ("Inbox", None, 0)


def test_jmapc_mailbox_query_with_result_reference(jmap):
    query, got = jmap.request(
        [
            MailboxQuery(filter=MailboxQueryFilterCondition(role="trash")),
            MailboxGet(ids=Ref("/ids")),
        ],
        raise_errors=True,
    )
    assert isinstance(query.response, MailboxQueryResponse)
    assert len(query.response.ids) == 1
    assert [m.role for m in got.response.data] == ["trash"]
    assert got.response.data[0].id == query.response.ids[0]


def test_jmapc_mailbox_set_and_sorted_query(jmap):
    created = jmap.request(MailboxSet(create={"p": jmapc.Mailbox(name="Projects")}))
    assert isinstance(created, MailboxSetResponse), created
    assert created.not_created is None
    new_id = created.created["p"].id
    # jmapc's Comparator also sends anchorOffset/calculateTotal/position inside each
    # comparator (a jmapc quirk); RFC 8620 §5.5 does not forbid extra members.
    ordered = jmap.request(MailboxQuery(sort=[jmapc.Comparator(property="name")]))
    assert isinstance(ordered, MailboxQueryResponse), ordered
    names = {m.id: m.name for m in jmap.request(MailboxGet(ids=ordered.ids)).data}
    assert [names[i] for i in ordered.ids] == sorted(names.values())
    assert names[new_id] == "Projects"

    renamed = jmap.request(MailboxSet(update={new_id: {"name": "Projects 2025"}}))
    assert renamed.updated is not None and new_id in renamed.updated
    gone = jmap.request(MailboxSet(destroy=[new_id]))
    assert gone.destroyed == [new_id]
    missing = jmap.request(MailboxGet(ids=[new_id]))
    assert missing.not_found == [new_id]


@pytest.mark.parametrize("file_name", ["notes.txt", "scan.pdf", "Grüße 📎.txt", "data.jmapd-test"])
def test_jmapc_blob_upload_download(jmap, tmp_path, file_name):
    content = bytes(range(256)) * 40 + file_name.encode()
    source = tmp_path / file_name
    source.write_bytes(content)
    blob = jmap.upload_blob(source)
    guessed = mimetypes.guess_type(file_name)[0]
    # jmapc sends Content-Type: "" when it cannot guess; jmapd then says octet-stream
    assert blob.type == (guessed or "application/octet-stream")
    assert blob.size == len(content)

    target = tmp_path / "downloaded"
    jmap.download_attachment(
        EmailBodyPart(blob_id=blob.id, name=file_name, type=blob.type), target
    )
    assert target.read_bytes() == content
    assert ("GET", f"/jmap/download/{jmap.account_id}/{blob.id}", 200) in [
        (m, "/".join(p.split("/")[:5]), s) for m, p, s in jmap.proxy.seen
    ]


def test_jmapc_bearer_token(proxied_server):
    username = f"jmapc{next(_users)}@example.com"
    add_user(proxied_server.data_dir, username)
    made = run_cli(
        "user", "token", "add", username, "jmapc test", data_dir=proxied_server.data_dir
    )
    assert made.returncode == 0, made.stderr
    client = jmapc.Client.create_with_api_token(host=PUBLIC_HOST, api_token=made.stdout.strip())
    client.backend_url = proxied_server.url
    connect(client)
    assert client.jmap_session.username == username
    assert client.request(CoreEcho(data={"via": "bearer"})).data == {"via": "bearer"}


def test_jmapc_wrong_password_refused(proxied_server):
    client = jmapc.Client.create_with_password(
        host=PUBLIC_HOST, user="first@example.com", password=PASSWORD + "x"
    )
    client.backend_url = proxied_server.url
    connect(client)
    with pytest.raises(requests.HTTPError) as failed:
        client.jmap_session  # noqa: B018 -- the property fetches the session
    assert failed.value.response.status_code == 401


def test_jmapc_method_error(jmap):
    """jmapc maps a method-level error to its Error types (RFC 8620 §3.6.2)."""
    response = jmap.request(MailboxSet(destroy=["Mnonexistent"]))
    assert response.not_destroyed["Mnonexistent"].type == "notFound"
    with pytest.raises(jmapc.ClientError):
        jmap.request(MailboxGet(ids=None, properties=["noSuchProperty"]), raise_errors=True)


def test_jmapc_behind_trusted_proxy(tmp_path):
    """The contrib/ deployment: --trusted-proxy 127.0.0.1, the proxy sends X-Forwarded-Proto.

    Regression: with waitress 3, whose clear_untrusted_proxy_headers defaulted to True,
    the headers were gone before jmapd's middleware saw them; the redirect and the
    session said http://, and requests dropped the credentials on that redirect (401).
    """
    data_dir = tmp_path / "data"
    add_user(data_dir, "proxied@example.com")
    srv = Server(data_dir, "--trusted-proxy", "127.0.0.1").start()
    try:
        origin = srv.url.split("://", 1)[1]  # the Host the proxy passes on
        client = jmapc.Client.create_with_password(
            host=origin, user="proxied@example.com", password=PASSWORD
        )
        client.requests_session.mount(
            f"https://{origin}/",
            TlsTerminator(f"https://{origin}", srv.url, {"X-Forwarded-Proto": "https"}),
        )
        assert client.jmap_session.api_url == f"https://{origin}/jmap/api/"
        assert client.request(CoreEcho(data={"ok": 1})).data == {"ok": 1}
    finally:
        srv.stop()
