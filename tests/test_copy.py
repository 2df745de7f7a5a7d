"""Generic /copy (RFC 8620 §5.4) on the type machine, exercised in-process.

No type that RFC 8621 gives a /copy exists yet (Email/copy arrives with the mail issues),
and a user reaches only their own account until sharing exists, so these tests drive the
generic method_copy() directly on a real SQLite data directory, with a second account made
reachable the way sharing will make it reachable (App.accessible_accounts).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import jmapd  # noqa: E402


@pytest.fixture
def two_accounts(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    jmapd.db_open(str(data_dir), create=True)
    cfg = jmapd.Config(command="serve", data_dir=str(data_dir), test_cheap_hashing=True)
    app = jmapd.make_app(cfg)
    alice = jmapd.account_create(app.auth, "alice@example.com", "pw", app.clock.now())
    bob = jmapd.account_create(app.auth, "bob@example.com", "pw", app.clock.now())
    reach = {alice.id: (alice, False), bob.id: (bob, False)}
    monkeypatch.setattr(app, "accessible_accounts", lambda user: reach)
    yield app, alice, bob
    jmapd.db.close()


def run(app, user, name, args):
    """Run one method call through the real engine; return (response name, arguments, extra)."""
    ctx = jmapd.Call(app, user, frozenset([jmapd.CAP_CORE, jmapd.CAP_MAIL]), {}, method=name)
    try:
        output = jmapd.engine_call(ctx, name, args)
    except jmapd.MethodError as exc:
        return "error", exc.as_json(), []
    return name, output, ctx.extra_responses


def copy(app, alice, bob, **args):
    ctx = jmapd.Call(app, alice, frozenset([jmapd.CAP_CORE, jmapd.CAP_MAIL]), {})
    ctx.account, ctx.changes = alice, jmapd.ChangeLog(alice.pk, app.clock.now())
    spec = jmapd.TYPES["Mailbox"]
    with jmapd.db.atomic("IMMEDIATE"):
        try:
            result = jmapd.method_copy(spec, ctx, {"accountId": alice.id, **args})
        except jmapd.MethodError as exc:
            return {"error": exc.as_json()}, ctx
        ctx.flush_changes()
    return result, ctx


def bob_mailbox(app, bob, name):
    _, out, _ = run(app, bob, "Mailbox/set",
                    {"accountId": bob.id, "create": {"x": {"name": name}}})
    return out["created"]["x"]["id"]


def names(app, user, account):
    _, out, _ = run(app, user, "Mailbox/get", {"accountId": account.id})
    return {m["name"]: m for m in out["list"]}


def test_copy_between_accounts_creates_and_keeps_original(two_accounts):
    app, alice, bob = two_accounts
    source = bob_mailbox(app, bob, "Receipts")
    result, _ = copy(app, alice, bob, fromAccountId=bob.id,
                     create={"c1": {"id": source, "sortOrder": 7}})
    assert result["fromAccountId"] == bob.id and result["accountId"] == alice.id
    new_id = result["created"]["c1"]["id"]
    assert result["notCreated"] is None
    assert result["newState"] != result["oldState"]
    copied = names(app, alice, alice)["Receipts"]
    assert copied["id"] == new_id and copied["sortOrder"] == 7  # overrides apply
    assert "Receipts" in names(app, bob, bob)  # the original stays


def test_copy_on_success_destroy_original_answers_implicit_set(two_accounts):
    app, alice, bob = two_accounts
    source = bob_mailbox(app, bob, "Move me")
    result, ctx = copy(app, alice, bob, fromAccountId=bob.id, onSuccessDestroyOriginal=True,
                       create={"c1": {"id": source}})
    assert result["created"]["c1"]["id"]
    assert [name for name, _ in ctx.extra_responses] == ["Mailbox/set"]
    implicit = ctx.extra_responses[0][1]
    assert implicit["accountId"] == bob.id and implicit["destroyed"] == [source]
    assert "Move me" not in names(app, bob, bob)


def test_copy_destroy_from_if_in_state_mismatch(two_accounts):
    app, alice, bob = two_accounts
    source = bob_mailbox(app, bob, "Stay")
    result, ctx = copy(app, alice, bob, fromAccountId=bob.id, onSuccessDestroyOriginal=True,
                       destroyFromIfInState="no-such-state", create={"c1": {"id": source}})
    assert result["created"]["c1"]["id"]
    assert ctx.extra_responses == [("error", {"type": "stateMismatch",
                                              "description": ctx.extra_responses[0][1]["description"]})]
    assert "Stay" in names(app, bob, bob)


def test_copy_set_errors(two_accounts):
    app, alice, bob = two_accounts
    source = bob_mailbox(app, bob, "Dup")
    copy(app, alice, bob, fromAccountId=bob.id, create={"a": {"id": source}})
    result, _ = copy(app, alice, bob, fromAccountId=bob.id, create={
        "again": {"id": source},            # a sibling named Dup exists in alice's account now
        "missing": {"id": "M999999"},
        "noid": {"name": "x"},
        "bad": {"id": source, "sortOrder": -1},
    })
    assert result["created"] is None
    errors = {cid: e["type"] for cid, e in result["notCreated"].items()}
    assert errors == {"again": "alreadyExists", "missing": "notFound",
                      "noid": "invalidProperties", "bad": "invalidProperties"}
    assert result["notCreated"]["again"]["properties"] == ["name"]  # issue 16: alreadyExists
    assert result["notCreated"]["bad"]["properties"] == ["sortOrder"]


def test_copy_method_errors(two_accounts):
    app, alice, bob = two_accounts
    assert copy(app, alice, bob, fromAccountId=alice.id, create={})[0]["error"]["type"] == \
        "invalidArguments"  # RFC 8620 §5.4: the two accounts MUST differ
    assert copy(app, alice, bob, fromAccountId="A999", create={})[0]["error"]["type"] == \
        "fromAccountNotFound"
    assert copy(app, alice, bob, fromAccountId=bob.id, ifFromInState="x",
                create={})[0]["error"]["type"] == "stateMismatch"
    assert copy(app, alice, bob, fromAccountId=bob.id, ifInState="x",
                create={})[0]["error"]["type"] == "stateMismatch"
    assert copy(app, alice, bob, fromAccountId=bob.id)[0]["error"]["type"] == "invalidArguments"
