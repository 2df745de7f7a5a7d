"""Mailbox (jmapd §7.2): RFC 8621 §2 on top of the generic machine.

RFC 8621 §1.3.1 (account capabilities), §2 (properties, roles, rights, tree rules),
§2.1-§2.5 (get, changes, query with sortAsTree/filterAsTree, queryChanges, set with
mailboxHasChild) and the §2.6 examples that need no Email. The generic RFC 8620 §5
behaviour is in test_generic.py, whose client helpers are reused here.
"""

import unicodedata

import pytest

from test_generic import (
    ALL_RIGHTS,
    Var,
    by_role,
    create,
    expect,
    mailbox,
    mailbox_changes,
    mailbox_get,
    mailbox_query,
    mailbox_set,
    method_error,
    no_descriptions,
    one,
    set_response,
    state_of,
)

MAIL = "urn:ietf:params:jmap:mail"
ROLES = {"inbox", "drafts", "sent", "trash", "junk", "archive"}
INBOX_RIGHTS = dict(ALL_RIGHTS, mayRename=False, mayDelete=False)
# jmapd's standard Mailboxes for a new account: (name, role, sortOrder).
STANDARD = [("Inbox", "inbox", 1), ("Drafts", "drafts", 2), ("Sent", "sent", 3),
            ("Archive", "archive", 4), ("Junk", "junk", 5), ("Trash", "trash", 6)]


def mail_capability(client):
    return client.session["accounts"][client.account_id]["accountCapabilities"][MAIL]


def invalid(resp, key, section="notCreated"):
    """The invalidProperties SetError of one record, `properties` sorted."""
    err = no_descriptions(resp[section][key])
    err["properties"] = sorted(err.get("properties", []))
    return err


def chain(client, depth, prefix="L"):
    """Create a line of `depth` nested Mailboxes; return their ids, outermost first."""
    objects = {f"{prefix}0": {"name": f"{prefix}0"}}
    for level in range(1, depth):
        objects[f"{prefix}{level}"] = {"name": f"{prefix}{level}",
                                       "parentId": f"#{prefix}{level - 1}"}
    ids = create(client, **objects)
    return [ids[f"{prefix}{level}"] for level in range(depth)]


# =============================================================================
# RFC 8621 §2.6 examples (those that need no Email)
# =============================================================================


def test_spec_8621_2_6_get_all(client):
    resp = client.request([["Mailbox/get", {"accountId": client.account_id, "ids": None}, "0"]])
    responses = resp["methodResponses"]
    responses[0][1]["list"].sort(key=lambda m: m["sortOrder"])  # RFC 8620 §5.1: any order
    ids = {m["role"]: m["id"] for m in responses[0][1]["list"]}
    expect(responses, [["Mailbox/get", {
        "accountId": client.account_id,
        "state": Var("state"),
        "list": [
            mailbox(ids[role], name, role=role, sort_order=order,
                    rights=INBOX_RIGHTS if role == "inbox" else ALL_RIGHTS)
            for name, role, order in STANDARD
        ],
        "notFound": [],
    }, "0"]])


def test_spec_8621_2_6_changes_then_get_by_reference(client):
    archive = by_role(client, "archive")
    since = state_of(client)
    important = create(client, imp={"name": "Important mail"})["imp"]
    mailbox_set(client, update={archive: {"name": "Old mail"}})
    account = client.account_id
    resp = client.request([
        ["Mailbox/changes", {"accountId": account, "sinceState": since}, "0"],
        ["Mailbox/get", {"accountId": account, "#ids": {
            "resultOf": "0", "name": "Mailbox/changes", "path": "/created"}}, "1"],
        ["Mailbox/get", {"accountId": account, "#ids": {
            "resultOf": "0", "name": "Mailbox/changes", "path": "/updated"},
            "#properties": {
                "resultOf": "0", "name": "Mailbox/changes", "path": "/updatedProperties"}},
         "2"],
    ])
    # Not a counts-only change, so updatedProperties is null and "2" gets every property.
    bound = expect(resp["methodResponses"], [
        ["Mailbox/changes", {
            "accountId": account, "oldState": since, "newState": Var("new"),
            "hasMoreChanges": False, "updatedProperties": None,
            "created": [important], "updated": [archive], "destroyed": [],
        }, "0"],
        ["Mailbox/get", {"accountId": account, "state": Var("new"),
                         "list": [mailbox(important, "Important mail")], "notFound": []}, "1"],
        ["Mailbox/get", {"accountId": account, "state": Var("new"),
                         "list": [mailbox(archive, "Old mail", role="archive", sort_order=4)],
                         "notFound": []}, "2"],
    ])
    assert bound["new"] == state_of(client)


def test_spec_8621_2_6_rename_and_destroy_inbox_forbidden(client):
    inbox = by_role(client, "inbox")
    important = create(client, imp={"name": "Important mail"})["imp"]
    state = state_of(client)
    resp = client.request([["Mailbox/set", {
        "accountId": client.account_id,
        "ifInState": state,
        "update": {important: {"name": "Maybe important mail"}},
        "destroy": [inbox],
    }, "0"]])
    expect(resp["methodResponses"], [["Mailbox/set", set_response(
        client.account_id, state, Var("new"),
        updated={important: None},
        notDestroyed={inbox: {"type": "forbidden"}},
    ), "0"]])
    assert one(client, inbox) == mailbox(inbox, "Inbox", role="inbox", sort_order=1,
                                         rights=INBOX_RIGHTS)
    assert one(client, important)["name"] == "Maybe important mail"


# =============================================================================
# Account capabilities, properties, roles and rights (RFC 8621 §1.3.1, §2)
# =============================================================================


def test_mailbox_account_capabilities(client):
    cap = mail_capability(client)
    assert cap["maxMailboxDepth"] is None or cap["maxMailboxDepth"] >= 1
    assert cap["maxSizeMailboxName"] >= 100
    assert cap["mayCreateTopLevelMailbox"] is True
    assert client.session["capabilities"][MAIL] == {}


def test_mailbox_new_account_has_standard_roles(client):
    found = mailbox_get(client)["list"]
    assert sorted(m["role"] for m in found) == sorted(ROLES)
    assert all(m["parentId"] is None for m in found)


def test_mailbox_all_properties_and_rights(client):
    create(client, x={"name": "X"})
    for box in mailbox_get(client)["list"]:
        assert set(box) == {"id", "name", "parentId", "role", "sortOrder", "totalEmails",
                            "unreadEmails", "totalThreads", "unreadThreads", "myRights",
                            "isSubscribed"}
        assert set(box["myRights"]) == set(ALL_RIGHTS)
        assert all(isinstance(v, bool) for v in box["myRights"].values())
        for count in ("totalEmails", "unreadEmails", "totalThreads", "unreadThreads"):
            assert box[count] == 0
        assert box["myRights"] == (INBOX_RIGHTS if box["role"] == "inbox" else ALL_RIGHTS)


def test_mailbox_inbox_cannot_be_renamed_or_lose_its_role(client):
    inbox = by_role(client, "inbox")
    resp = mailbox_set(client, update={inbox: {"name": "Eingang"}})
    assert no_descriptions(resp["notUpdated"]) == {inbox: {"type": "forbidden"}}
    resp = mailbox_set(client, update={inbox: {"role": None}})
    assert no_descriptions(resp["notUpdated"]) == {inbox: {"type": "forbidden"}}
    resp = mailbox_set(client, update={inbox: {"sortOrder": 0, "isSubscribed": False}})
    assert resp["updated"] == {inbox: None}  # other properties stay writable
    assert one(client, inbox)["name"] == "Inbox" and one(client, inbox)["role"] == "inbox"


def test_mailbox_inbox_cannot_be_moved(client):
    inbox = by_role(client, "inbox")
    parent = create(client, p={"name": "P"})["p"]
    resp = mailbox_set(client, update={inbox: {"parentId": parent}})
    assert no_descriptions(resp["notUpdated"] or {}) == {inbox: {"type": "forbidden"}}
    assert one(client, inbox)["parentId"] is None


def test_mailbox_role_rules(client):
    trash = by_role(client, "trash")
    resp = mailbox_set(client, create={
        "dupe": {"name": "Second Trash", "role": "trash"},
        "upper": {"name": "Upper", "role": "Flagged"},
        "unknown": {"name": "Unknown", "role": "receipts"},
        "empty": {"name": "Empty", "role": ""},
        "number": {"name": "Number", "role": 1},
        "flagged": {"name": "Flagged", "role": "flagged"},
        "all": {"name": "All Mail", "role": "all"},
        "important": {"name": "Important", "role": "important"},
    })
    for cid in ("dupe", "upper", "unknown", "empty", "number"):
        assert invalid(resp, cid) == {"type": "invalidProperties", "properties": ["role"]}, cid
    assert set(resp["created"]) == {"flagged", "all", "important"}
    flagged = resp["created"]["flagged"]["id"]
    resp = mailbox_set(client, update={flagged: {"role": "junk"}})
    assert invalid(resp, flagged, "notUpdated") == {"type": "invalidProperties",
                                                    "properties": ["role"]}
    # Once the old holder is gone, the role is free again.
    mailbox_set(client, destroy=[trash])
    resp = mailbox_set(client, update={flagged: {"role": "trash"}})
    assert resp["updated"] == {flagged: None}
    assert by_role(client, "trash") == flagged


# =============================================================================
# The tree (RFC 8621 §2: parentId, no loops, unique sibling names, maxMailboxDepth)
# =============================================================================


def test_mailbox_no_cycles(client):
    a, b, c = chain(client, 3)
    for moved, new_parent in ((a, c), (a, b), (b, c), (c, c)):
        resp = mailbox_set(client, update={moved: {"parentId": new_parent}})
        assert invalid(resp, moved, "notUpdated") == {"type": "invalidProperties",
                                                      "properties": ["parentId"]}
    assert [one(client, i)["parentId"] for i in (a, b, c)] == [None, a, b]
    resp = mailbox_set(client, update={c: {"parentId": a}})  # not a cycle
    assert resp["updated"] == {c: None}


def test_mailbox_sibling_names_unique(client):
    ids = create(client, work={"name": "Work"}, home={"name": "Home"},
                 sub={"name": "Work", "parentId": "#home"})  # same name, other parent: fine
    # The registered SetError alreadyExists (RFC 8620 §5.3), naming the sibling, as the
    # JMAP conformance suite expects (issue 16; RFC 8621 names no error of its own).
    resp = mailbox_set(client, create={"again": {"name": "Work"},
                                       "child": {"name": "Work", "parentId": ids["home"]}})
    assert invalid(resp, "again") == {"type": "alreadyExists", "existingId": ids["work"],
                                      "properties": ["name"]}
    assert invalid(resp, "child") == {"type": "alreadyExists", "existingId": ids["sub"],
                                      "properties": ["name"]}
    resp = mailbox_set(client, update={ids["home"]: {"name": "Work"}})
    assert invalid(resp, ids["home"], "notUpdated") == {
        "type": "alreadyExists", "existingId": ids["work"], "properties": ["name"]}
    resp = mailbox_set(client, update={ids["sub"]: {"parentId": None}})  # onto a "Work"
    assert invalid(resp, ids["sub"], "notUpdated") == {
        "type": "alreadyExists", "existingId": ids["work"], "properties": ["name"]}
    resp = mailbox_set(client, update={ids["sub"]: {"parentId": None, "name": "Work 2"}})
    assert resp["updated"] == {ids["sub"]: None}
    # Two creations with one name in the same call: exactly one wins.
    resp = mailbox_set(client, create={"t1": {"name": "Twin"}, "t2": {"name": "Twin"}})
    assert len(resp["created"]) == 1 and len(resp["notCreated"]) == 1


def test_mailbox_sibling_name_swap_in_one_call(client):
    ids = create(client, a={"name": "A"}, b={"name": "B"})
    resp = mailbox_set(client, update={ids["a"]: {"name": "B"}, ids["b"]: {"name": "A"}})
    assert resp["notUpdated"] is None
    assert (one(client, ids["a"])["name"], one(client, ids["b"])["name"]) == ("B", "A")


def test_mailbox_max_depth(client):
    depth = mail_capability(client)["maxMailboxDepth"]
    assert isinstance(depth, int)  # jmapd has a limit; null would mean none
    levels = chain(client, depth)  # just at the limit
    assert one(client, levels[-1])["parentId"] == levels[-2]
    resp = mailbox_set(client, create={"deeper": {"name": "Too deep", "parentId": levels[-1]}})
    assert invalid(resp, "deeper") == {"type": "invalidProperties", "properties": ["parentId"]}
    loose = create(client, x={"name": "Loose"})["x"]
    resp = mailbox_set(client, update={loose: {"parentId": levels[-1]}})
    assert invalid(resp, loose, "notUpdated") == {"type": "invalidProperties",
                                                  "properties": ["parentId"]}
    resp = mailbox_set(client, update={loose: {"parentId": levels[-2]}})  # depth == limit
    assert resp["updated"] == {loose: None}


def test_mailbox_max_depth_counts_the_moved_subtree(client):
    depth = mail_capability(client)["maxMailboxDepth"]
    levels = chain(client, depth - 1)
    ids = create(client, top={"name": "Top"}, kid={"name": "Kid", "parentId": "#top"})
    resp = mailbox_set(client, update={ids["top"]: {"parentId": levels[-1]}})  # kid: depth+1
    assert resp["updated"] is None
    assert invalid(resp, ids["top"], "notUpdated") == {"type": "invalidProperties",
                                                       "properties": ["parentId"]}


def test_mailbox_has_child_on_destroy(client):
    ids = create(client, p={"name": "P"}, c={"name": "C", "parentId": "#p"})
    state = state_of(client)
    resp = mailbox_set(client, destroy=[ids["p"]])
    assert no_descriptions(resp["notDestroyed"]) == {ids["p"]: {"type": "mailboxHasChild"}}
    assert state_of(client) == state
    assert one(client, ids["p"])["name"] == "P"


@pytest.mark.parametrize("parent_first", [False, True], ids=["child-first", "parent-first"])
def test_mailbox_destroy_parent_and_child_in_one_call(client, parent_first):
    # The final state is valid, whatever the order of `destroy` (RFC 8620 §5.3).
    ids = create(client, p={"name": "P"}, c={"name": "C", "parentId": "#p"},
                 g={"name": "G", "parentId": "#c"})
    order = [ids["p"], ids["c"], ids["g"]]
    resp = mailbox_set(client, destroy=order if parent_first else order[::-1])
    assert resp["notDestroyed"] is None
    assert sorted(resp["destroyed"]) == sorted(order)
    assert mailbox_get(client, order)["list"] == []


def test_mailbox_created_in_one_call_with_parent_references(client):
    resp = mailbox_set(client, create={"kid": {"name": "Kid", "parentId": "#mum"},
                                       "mum": {"name": "Mum"}})
    kid, mum = resp["created"]["kid"]["id"], resp["created"]["mum"]["id"]
    assert one(client, kid)["parentId"] == mum


# =============================================================================
# sortAsTree / filterAsTree (RFC 8621 §2.3, §2.4)
# =============================================================================


@pytest.fixture
def tree(client):
    """zq-a, zq-b (zq-d, zq-c (zq-e)); zq-c is not subscribed."""
    ids = create(
        client,
        b={"name": "zq-b"},
        a={"name": "zq-a"},
        d={"name": "zq-d", "parentId": "#b"},
        c={"name": "zq-c", "parentId": "#b", "isSubscribed": False},
        e={"name": "zq-e", "parentId": "#c"},
    )
    return ids


def tree_query(client, tree, filter=None, **args):
    resp = mailbox_query(client, filter=filter or {"name": "zq-"},
                         sort=args.pop("sort", [{"property": "name"}]), **args)
    by_id = {v: k for k, v in tree.items()}
    return "".join(by_id[i] for i in resp["ids"])


def test_mailbox_sort_as_tree(client, tree):
    assert tree_query(client, tree) == "abcde"
    assert tree_query(client, tree, sortAsTree=False) == "abcde"
    assert tree_query(client, tree, sortAsTree=True) == "abced"
    descending = [{"property": "name", "isAscending": False}]
    assert tree_query(client, tree, sort=descending) == "edcba"
    assert tree_query(client, tree, sort=descending, sortAsTree=True) == "bdcea"
    # sortOrder first: zq-c sorts before zq-b at the top, but stays under it in a tree.
    mailbox_set(client, update={tree["a"]: {"sortOrder": 5}, tree["c"]: {"sortOrder": 0},
                                tree["b"]: {"sortOrder": 1}, tree["d"]: {"sortOrder": 1}})
    by_order = [{"property": "sortOrder"}, {"property": "name"}]
    assert tree_query(client, tree, sort=by_order) == "cebda"
    assert tree_query(client, tree, sort=by_order, sortAsTree=True) == "bceda"


def test_mailbox_filter_as_tree(client, tree):
    subscribed = {"operator": "AND", "conditions": [{"name": "zq-"}, {"isSubscribed": True}]}
    assert tree_query(client, tree, subscribed) == "abde"
    assert tree_query(client, tree, subscribed, filterAsTree=True) == "abd"  # zq-c hides zq-e
    assert tree_query(client, tree, subscribed, filterAsTree=True, sortAsTree=True) == "abd"
    assert tree_query(client, tree, {"name": "zq-d"}) == "d"
    assert tree_query(client, tree, {"name": "zq-d"}, filterAsTree=True) == ""
    assert tree_query(client, tree, filterAsTree=True) == "abcde"


def test_mailbox_tree_queries_cannot_calculate_changes(client, tree):
    plain = mailbox_query(client, filter={"name": "zq-"})
    assert plain["canCalculateChanges"] is True
    for flag in ("sortAsTree", "filterAsTree"):
        resp = mailbox_query(client, filter={"name": "zq-"}, **{flag: True})
        assert resp["canCalculateChanges"] is False, flag
        args = {"filter": {"name": "zq-"}, flag: True, "sinceQueryState": resp["queryState"]}
        assert method_error(client, "Mailbox/queryChanges", args) == "cannotCalculateChanges"
    args = {"filter": {"name": "zq-"}, "sinceQueryState": plain["queryState"]}
    assert client.call("Mailbox/queryChanges", {"accountId": client.account_id, **args})[0] == (
        "Mailbox/queryChanges")


# =============================================================================
# Property values: name, sortOrder, isSubscribed (RFC 8621 §2)
# =============================================================================


def test_mailbox_name_is_nfc_normalised(client):
    decomposed = "Cafe\u0301 receipts"
    composed = unicodedata.normalize("NFC", decomposed)
    assert composed != decomposed
    created = create(client, x={"name": decomposed})["x"]
    assert one(client, created)["name"] == composed
    assert mailbox_query(client, filter={"name": "café"})["ids"] == [created]
    resp = mailbox_set(client, create={"twin": {"name": composed}})  # the same name
    assert invalid(resp, "twin") == {"type": "alreadyExists", "existingId": created,
                                     "properties": ["name"]}


def test_mailbox_update_reports_normalised_name(client):
    created = create(client, x={"name": "Plain"})["x"]
    resp = mailbox_set(client, update={created: {"name": "Cafe\u0301"}})
    assert resp["updated"] == {created: {"name": "Caf\u00e9"}}


def test_mailbox_name_rules(client):
    limit = mail_capability(client)["maxSizeMailboxName"]
    longest = "\u00e9" * (limit // 2) + "x" * (limit % 2)  # exactly `limit` octets
    assert len(longest.encode("utf-8")) == limit
    resp = mailbox_set(client, create={
        "longest": {"name": longest},
        "tooLong": {"name": longest + "x"},
        "empty": {"name": ""},
        "bell": {"name": "ring\u0007"},
        "newline": {"name": "two\nlines"},
    })
    assert set(resp["created"]) == {"longest"}
    for cid in ("tooLong", "empty", "bell", "newline"):
        assert invalid(resp, cid) == {"type": "invalidProperties", "properties": ["name"]}, cid
    assert one(client, resp["created"]["longest"]["id"])["name"] == longest


def test_mailbox_sort_order_bounds(client):
    resp = mailbox_set(client, create={
        "zero": {"name": "Zero", "sortOrder": 0},
        "top": {"name": "Top", "sortOrder": 2**31 - 1},
        "over": {"name": "Over", "sortOrder": 2**31},
        "negative": {"name": "Negative", "sortOrder": -1},
    })
    assert set(resp["created"]) == {"zero", "top"}
    for cid in ("over", "negative"):
        assert invalid(resp, cid) == {"type": "invalidProperties", "properties": ["sortOrder"]}
    top = resp["created"]["top"]["id"]
    assert one(client, top)["sortOrder"] == 2**31 - 1
    resp = mailbox_set(client, update={top: {"sortOrder": 2**31}})
    assert invalid(resp, top, "notUpdated") == {"type": "invalidProperties",
                                                "properties": ["sortOrder"]}


def test_mailbox_is_subscribed_defaults_true(client):
    resp = mailbox_set(client, create={"x": {"name": "X"}})
    x = resp["created"]["x"]["id"]
    assert resp["created"]["x"]["isSubscribed"] is True  # defaulted, so returned
    assert one(client, x)["isSubscribed"] is True
    mailbox_set(client, update={x: {"isSubscribed": False}})
    assert one(client, x)["isSubscribed"] is False


def test_mailbox_on_destroy_remove_emails_argument(client):
    ids = create(client, a={"name": "A"}, b={"name": "B"})
    resp = mailbox_set(client, destroy=[ids["a"]], onDestroyRemoveEmails=True)
    assert resp["destroyed"] == [ids["a"]]
    args = {"destroy": [ids["b"]], "onDestroyRemoveEmails": "yes"}
    assert method_error(client, "Mailbox/set", args) == "invalidArguments"
    assert one(client, ids["b"])["name"] == "B"


def test_mailbox_changes_reports_destroyed_mailbox(client):
    ids = create(client, a={"name": "A"})
    since = state_of(client)
    mailbox_set(client, destroy=[ids["a"]])
    resp = mailbox_changes(client, since)
    assert (resp["created"], resp["updated"], resp["destroyed"]) == ([], [], [ids["a"]])
    assert resp["updatedProperties"] is None


def test_mailbox_copy_is_not_defined(client, other_client):
    # RFC 8621 defines no Mailbox/copy.
    args = {"fromAccountId": other_client.account_id, "create": {}}
    assert method_error(client, "Mailbox/copy", args) == "unknownMethod"
