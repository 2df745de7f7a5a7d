"""Generic type machine (jmapd §6.3, §4.5), exercised through Mailbox, the only type so far.

RFC 8620 §5.1 /get, §5.2 /changes (incl. the 30-day horizon), §5.3 /set (SetErrors,
PatchObject, creation ids), §5.5 /query, §5.6 /queryChanges and the §5.7 examples
(Todo adapted to Mailbox), plus account scoping (§1.6.2, §3.6.2 accountNotFound).
Everything goes over HTTP to a real `jmapd.py serve` process (conftest.py).
"""

import os

import pytest

from conftest import Client, Server, add_user, run_cli

RIGHTS = (
    "mayReadItems", "mayAddItems", "mayRemoveItems", "maySetSeen", "maySetKeywords",
    "mayCreateChild", "mayRename", "mayDelete", "maySubmit",
)
ALL_RIGHTS = dict.fromkeys(RIGHTS, True)
NO_SUCH_ID = "M999999999"  # a syntactically valid Mailbox id no account has


def jmapd_bug(reason):
    """Mark a test that fails because jmapd is wrong (strict: a fix makes it XPASS and fail)."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason="jmapd bug: " + reason)


# ---- placeholders: server-chosen values (states, new ids) in otherwise exact JSON ----


class Var:
    """A server-chosen value: bound from the first response it meets, then must match."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


def _bind(template, actual, bound):
    if isinstance(template, Var):
        bound.setdefault(template.name, actual)
    elif isinstance(template, dict) and isinstance(actual, dict):
        for key, value in template.items():
            real_key = bound.get(key.name, key) if isinstance(key, Var) else key
            if real_key in actual:
                _bind(value, actual[real_key], bound)
    elif isinstance(template, list) and isinstance(actual, list):
        for item, real in zip(template, actual):
            _bind(item, real, bound)


def _subst(template, bound):
    if isinstance(template, Var):
        return bound.get(template.name, template)
    if isinstance(template, dict):
        return {_subst(k, bound): _subst(v, bound) for k, v in template.items()}
    if isinstance(template, list):
        return [_subst(item, bound) for item in template]
    return template


def no_descriptions(value):
    """Drop the free-text `description` of error objects (RFC 8620 §3.6.2, §5.3)."""
    if isinstance(value, dict):
        if isinstance(value.get("type"), str) and "description" in value:
            assert value["description"] is None or isinstance(value["description"], str)
            value = {k: v for k, v in value.items() if k != "description"}
        return {k: no_descriptions(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_descriptions(item) for item in value]
    return value


def expect(actual, template, **known):
    """Assert actual == template once each Var is replaced by the value it stands for."""
    bound = dict(known)
    _bind(template, actual, bound)
    actual = no_descriptions(actual)
    assert actual == _subst(template, bound)
    return bound


# ---- a small client vocabulary ----


def mailbox_get(client, ids=None, **extra):
    return client.ok("Mailbox/get", {"accountId": client.account_id, "ids": ids, **extra})


def mailbox_set(client, **args):
    return client.ok("Mailbox/set", {"accountId": client.account_id, **args})


def mailbox_query(client, **args):
    return client.ok("Mailbox/query", {"accountId": client.account_id, **args})


def mailbox_changes(client, since, **args):
    return client.ok("Mailbox/changes", {"accountId": client.account_id, "sinceState": since,
                                         **args})


def query_changes(client, since, **args):
    return client.ok("Mailbox/queryChanges", {"accountId": client.account_id,
                                              "sinceQueryState": since, **args})


def method_error(client, name, args):
    """Make a call that must fail; return its error type (RFC 8620 §3.6.2)."""
    resp = client.call(name, {"accountId": client.account_id, **args})
    assert resp[0] == "error", resp
    return resp[1]["type"]


def state_of(client):
    return mailbox_get(client, ids=[])["state"]


def create(client, **objects):
    """Create Mailboxes (creation id -> object) that must all succeed; return their ids."""
    resp = mailbox_set(client, create=objects)
    assert resp["notCreated"] is None, resp
    return {cid: resp["created"][cid]["id"] for cid in objects}


def one(client, mailbox_id):
    found = mailbox_get(client, [mailbox_id])["list"]
    assert len(found) == 1, found
    return found[0]


def by_role(client, role):
    return next(m["id"] for m in mailbox_get(client)["list"] if m["role"] == role)


def mailbox(mailbox_id, name, parent_id=None, role=None, sort_order=0, subscribed=True,
            rights=ALL_RIGHTS):
    """A whole Mailbox object as RFC 8621 §2 defines it, with no mail in it."""
    return {
        "id": mailbox_id, "name": name, "parentId": parent_id, "role": role,
        "sortOrder": sort_order, "totalEmails": 0, "unreadEmails": 0, "totalThreads": 0,
        "unreadThreads": 0, "myRights": dict(rights), "isSubscribed": subscribed,
    }


def set_response(account_id, old, new, **results):
    """A whole /set response: every result member not given is null (RFC 8620 §5.3)."""
    response = {"accountId": account_id, "oldState": old, "newState": new}
    for key in ("created", "updated", "destroyed", "notCreated", "notUpdated", "notDestroyed"):
        response[key] = results.get(key)
    return response


def server_defaults(mailbox_id):
    """What /set create returns for a Mailbox given only a name (RFC 8620 §5.3)."""
    obj = mailbox(mailbox_id, "unused")
    del obj["name"]
    return obj


# =============================================================================
# RFC 8620 §5.7 examples, with Todo -> Mailbox (title -> name, hasKeyword -> name)
# =============================================================================

MUSIC_OR_VIDEO = {"operator": "OR", "conditions": [{"name": "music"}, {"name": "video"}]}
BY_NAME = [{"property": "name"}]


@pytest.fixture
def todos(client):
    """The §5.7 data set: three matching Mailboxes and one that does not match."""
    return create(
        client,
        a={"name": "Practise Piano music"},
        b={"name": "Watch Daft Punk music video"},
        c={"name": "Old video tapes"},
        d={"name": "Taxes"},
    )


def test_spec_8620_5_7_query_then_get_by_reference(client, todos):
    a, b, c = todos["a"], todos["b"], todos["c"]
    state = state_of(client)
    resp = client.request([
        ["Mailbox/query", {"accountId": client.account_id, "filter": MUSIC_OR_VIDEO,
                           "sort": BY_NAME, "position": 0, "limit": 10}, "0"],
        ["Mailbox/get", {"accountId": client.account_id,
                         "#ids": {"resultOf": "0", "name": "Mailbox/query", "path": "/ids"}}, "1"],
    ])
    responses = resp["methodResponses"]
    responses[1][1]["list"].sort(key=lambda m: m["name"])  # RFC 8620 §5.1: any order
    expect(responses, [
        ["Mailbox/query", {
            "accountId": client.account_id,
            "queryState": Var("queryState"),
            "canCalculateChanges": True,
            "position": 0,
            "ids": [c, a, b],
        }, "0"],
        ["Mailbox/get", {
            "accountId": client.account_id,
            "state": state,
            "list": [
                mailbox(c, "Old video tapes"),
                mailbox(a, "Practise Piano music"),
                mailbox(b, "Watch Daft Punk music video"),
            ],
            "notFound": [],
        }, "1"],
    ])


def test_spec_8620_5_7_whole_object_and_minimal_patch(client, todos):
    a, c = todos["a"], todos["c"]
    state = state_of(client)
    whole = one(client, a)
    whole.update(name="Practise Piano music daily", sortOrder=3, isSubscribed=False)
    resp = client.request([["Mailbox/set", {
        "accountId": client.account_id, "ifInState": state, "update": {a: whole}}, "0"]])
    bound = expect(resp["methodResponses"], [["Mailbox/set", set_response(
        client.account_id, state, Var("new"), updated={a: None}), "0"]])
    assert bound["new"] != state
    assert one(client, a) == whole

    # The minimal patch has exactly the same effect (RFC 8620 §5.7).
    resp = client.request([["Mailbox/set", {
        "accountId": client.account_id, "ifInState": bound["new"],
        "update": {c: {"sortOrder": 3, "isSubscribed": False}}}, "0"]])
    expect(resp["methodResponses"], [["Mailbox/set", set_response(
        client.account_id, bound["new"], Var("newer"), updated={c: None}), "0"]])
    assert one(client, c) == mailbox(c, "Old video tapes", sort_order=3, subscribed=False)


def test_spec_8620_5_7_create_referenced_by_update(client, todos):
    a = todos["a"]
    state = state_of(client)
    resp = client.request([["Mailbox/set", {
        "accountId": client.account_id,
        "create": {"k15": {"name": "Warm up with scales"}},
        "update": {a: {"parentId": "#k15"}},
    }, "0"]])
    bound = expect(resp["methodResponses"], [["Mailbox/set", set_response(
        client.account_id, state, Var("new"),
        created={"k15": server_defaults(Var("k15"))},
        updated={a: None},
    ), "0"]])
    assert one(client, a)["parentId"] == bound["k15"]
    assert one(client, bound["k15"])["name"] == "Warm up with scales"


def test_spec_8620_5_7_changes_and_query_changes_after_another_session_destroys(
    server, client, todos
):
    b = todos["b"]
    state = state_of(client)
    query_state = mailbox_query(client, filter=MUSIC_OR_VIDEO, sort=BY_NAME)["queryState"]
    other_session = Client(server.url, client.username)  # "another user" of the account
    assert mailbox_set(other_session, destroy=[b])["destroyed"] == [b]

    resp = client.request([
        ["Mailbox/changes", {"accountId": client.account_id, "sinceState": state,
                             "maxChanges": 50}, "0"],
        ["Mailbox/queryChanges", {"accountId": client.account_id, "filter": MUSIC_OR_VIDEO,
                                  "sort": BY_NAME, "sinceQueryState": query_state,
                                  "maxChanges": 50}, "1"],
    ])
    # The RFC shows "added": null; AddedItem[] is not nullable, so it is [] here.
    bound = expect(resp["methodResponses"], [
        ["Mailbox/changes", {
            "accountId": client.account_id, "oldState": state, "newState": Var("new"),
            "hasMoreChanges": False, "created": [], "updated": [], "destroyed": [b],
            "updatedProperties": None,
        }, "0"],
        ["Mailbox/queryChanges", {
            "accountId": client.account_id, "oldQueryState": query_state,
            "newQueryState": Var("newQuery"), "removed": [b], "added": [],
        }, "1"],
    ])
    assert bound["new"] == state_of(client) != state
    assert bound["newQuery"] != query_state


# =============================================================================
# /get (RFC 8620 §5.1)
# =============================================================================


def test_get_ids_null_returns_all(client):
    ids = create(client, x={"name": "X"}, y={"name": "Y", "parentId": "#x"})
    resp = mailbox_get(client)
    listed = [m["id"] for m in resp["list"]]
    assert len(listed) == len(set(listed)) == 8  # six role Mailboxes, two of ours
    assert {ids["x"], ids["y"]} <= set(listed)
    assert resp["notFound"] == []
    assert resp["accountId"] == client.account_id


def test_get_properties_filter_always_returns_id(client):
    ids = create(client, x={"name": "X"})
    resp = mailbox_get(client, [ids["x"]], properties=["name", "sortOrder"])
    assert resp["list"] == [{"id": ids["x"], "name": "X", "sortOrder": 0}]
    assert mailbox_get(client, [ids["x"]], properties=[])["list"] == [{"id": ids["x"]}]
    assert mailbox_get(client, [ids["x"]], properties=["id"])["list"] == [{"id": ids["x"]}]
    every = mailbox_get(client, properties=["role"])["list"]
    assert every and all(set(m) == {"id", "role"} for m in every)


def test_get_unknown_property_is_invalid_arguments(client):
    args = {"ids": None, "properties": ["name", "colour"]}
    assert method_error(client, "Mailbox/get", args) == "invalidArguments"


def test_get_duplicate_ids_answered_once(client):
    ids = create(client, x={"name": "X"})
    resp = mailbox_get(client, [ids["x"], NO_SUCH_ID, ids["x"], NO_SUCH_ID])
    assert [m["id"] for m in resp["list"]] == [ids["x"]]
    assert resp["notFound"] == [NO_SUCH_ID]


def test_get_not_found_and_empty_ids(client):
    ids = create(client, x={"name": "X"})
    mailbox_set(client, destroy=[ids["x"]])
    resp = mailbox_get(client, [ids["x"], NO_SUCH_ID])
    assert resp["list"] == []
    assert sorted(resp["notFound"]) == sorted([ids["x"], NO_SUCH_ID])
    resp = mailbox_get(client, [])
    assert (resp["list"], resp["notFound"]) == ([], [])


def test_get_creation_id_reference(client):
    resp = client.request([
        ["Mailbox/set", {"accountId": client.account_id, "create": {"new": {"name": "New"}}},
         "0"],
        ["Mailbox/get", {"accountId": client.account_id, "ids": ["#new", "#unknown"],
                         "properties": ["name"]}, "1"],
    ])
    new_id = resp["methodResponses"][0][1]["created"]["new"]["id"]
    got = resp["methodResponses"][1][1]
    assert got["list"] == [{"id": new_id, "name": "New"}]
    assert got["notFound"] == ["#unknown"]


# =============================================================================
# /changes (RFC 8620 §5.2; RFC 8621 §2.2 updatedProperties)
# =============================================================================


def test_changes_classifies_created_updated_destroyed(client):
    drafts, archive = by_role(client, "drafts"), by_role(client, "archive")
    since = state_of(client)
    new = create(client, n={"name": "New"})["n"]
    mailbox_set(client, update={drafts: {"name": "Brouillons"}})
    mailbox_set(client, destroy=[archive])
    resp = mailbox_changes(client, since)
    expect(resp, {
        "accountId": client.account_id, "oldState": since, "newState": state_of(client),
        "hasMoreChanges": False, "created": [new], "updated": [drafts],
        "destroyed": [archive], "updatedProperties": None,
    })


def test_changes_coalesces_changes_to_one_record(client):
    trash = by_role(client, "trash")
    since = state_of(client)
    made = create(client, upd={"name": "Created then updated"}, gone={"name": "Short-lived"})
    mailbox_set(client, update={made["upd"]: {"name": "Renamed"}, trash: {"sortOrder": 9}})
    mailbox_set(client, destroy=[made["gone"], trash])
    resp = mailbox_changes(client, since)
    assert resp["created"] == [made["upd"]]  # created + updated: just created (SHOULD)
    assert resp["updated"] == []
    assert resp["destroyed"] == [trash]  # updated + destroyed: just destroyed (SHOULD)
    # created + destroyed: omitted entirely (SHOULD)
    assert made["gone"] not in resp["created"] + resp["updated"] + resp["destroyed"]


def test_changes_since_current_state_is_empty(client):
    now = state_of(client)
    resp = mailbox_changes(client, now)
    assert resp["newState"] == now and resp["hasMoreChanges"] is False
    assert resp["created"] == resp["updated"] == resp["destroyed"] == []


def walk_changes(client, since, max_changes):
    """Follow hasMoreChanges to the end; return the pages."""
    pages = []
    while True:
        page = mailbox_changes(client, since, maxChanges=max_changes)
        pages.append(page)
        assert page["oldState"] == since
        ids = page["created"] + page["updated"] + page["destroyed"]
        assert len(ids) <= max_changes, page
        assert len(pages) < 50, "hasMoreChanges never ended"
        if not page["hasMoreChanges"]:
            return pages
        assert page["newState"] != since
        since = page["newState"]


def test_changes_max_changes_pages_through_intermediate_states(client):
    since = state_of(client)
    made = create(client, **{f"m{i}": {"name": f"Box {i}"} for i in range(5)})
    pages = walk_changes(client, since, 2)
    assert len(pages) >= 3  # five changes, at most two per page
    assert all(p["hasMoreChanges"] for p in pages[:-1])
    assert all(p["newState"] != state_of(client) for p in pages[:-1])  # intermediate
    assert pages[-1]["newState"] == state_of(client)
    created = [i for p in pages for i in p["created"]]
    assert sorted(created) == sorted(made.values())
    assert all(p["updated"] == p["destroyed"] == [] for p in pages)


def test_changes_paging_reports_each_new_record_as_created(client):
    since = state_of(client)
    made = create(client, a={"name": "A"}, b={"name": "B"}, c={"name": "C"}, d={"name": "D"})
    mailbox_set(client, update={made["a"]: {"name": "A2"}})
    mailbox_set(client, destroy=[made["b"]])
    pages = walk_changes(client, since, 2)
    created = {i for p in pages for i in p["created"]}
    # From `since`, a, c and d are new and b came and went. An intermediate state may
    # have b (it existed then): then b is reported created and later destroyed, never
    # updated before it is created (RFC 8620 §5.2).
    assert created - {made["b"]} == {made["a"], made["c"], made["d"]}
    if made["b"] in created:
        first = next(n for n, p in enumerate(pages) if made["b"] in p["created"])
        assert any(made["b"] in p["destroyed"] for p in pages[first + 1:])
    # Replaying the pages gives exactly the Mailboxes that exist now.
    known = set()
    for page in pages:
        assert not set(page["updated"]) - known - set(page["created"]), page
        known |= set(page["created"])
        known -= set(page["destroyed"])
    assert known == {made["a"], made["c"], made["d"]}
    assert pages[-1]["newState"] == state_of(client)


def test_changes_max_changes_must_be_positive(client):
    since = state_of(client)
    for bad in (0, -1):
        args = {"sinceState": since, "maxChanges": bad}
        assert method_error(client, "Mailbox/changes", args) == "invalidArguments"


def test_changes_unknown_or_future_state_cannot_calculate(client):
    current = state_of(client)
    future = str(int(current) + 1)  # white box: jmapd states are decimal modseqs (§4.5)
    for since in ("not-a-state", "", future):
        args = {"sinceState": since}
        assert method_error(client, "Mailbox/changes", args) == "cannotCalculateChanges", since


def test_changes_updated_properties_null_after_non_count_change(client):
    ids = create(client, x={"name": "X"})
    since = state_of(client)
    mailbox_set(client, update={ids["x"]: {"isSubscribed": False}})
    resp = mailbox_changes(client, since)
    assert resp["updated"] == [ids["x"]]
    assert resp["updatedProperties"] is None  # RFC 8621 §2.2: not just the counts


# =============================================================================
# State strings (RFC 8620 §5.1, §5.3)
# =============================================================================


def test_state_changes_on_every_create_update_destroy(client):
    states = [state_of(client)]

    def check(resp):
        assert resp["oldState"] == states[-1]
        assert resp["newState"] == state_of(client)  # newState is what /get says next
        states.append(resp["newState"])
        return resp

    x = check(mailbox_set(client, create={"x": {"name": "X"}}))["created"]["x"]["id"]
    check(mailbox_set(client, update={x: {"name": "Y"}}))
    check(mailbox_set(client, destroy=[x]))
    assert len(set(states)) == 4


def test_state_unchanged_by_reads(client):
    before = state_of(client)
    mailbox_get(client)
    query = mailbox_query(client, calculateTotal=True)
    mailbox_changes(client, before)
    query_changes(client, query["queryState"])
    assert state_of(client) == before
    assert mailbox_query(client)["queryState"] == query["queryState"]


def test_state_failed_set_changes_nothing(client):
    ids = create(client, x={"name": "X"})
    before, obj = state_of(client), one(client, ids["x"])
    resp = mailbox_set(
        client,
        create={"bad": {"name": "Bad", "sortOrder": -1}},
        update={ids["x"]: {"name": "Renamed", "sortOrder": -1}},  # atomic: no partial update
        destroy=[NO_SUCH_ID],
    )
    assert resp["oldState"] == resp["newState"] == before == state_of(client)
    assert (resp["created"], resp["updated"], resp["destroyed"]) == (None, None, None)
    assert one(client, ids["x"]) == obj


def test_state_if_in_state(client):
    before = state_of(client)
    resp = mailbox_set(client, ifInState=before, create={"x": {"name": "X"}})
    assert resp["created"]["x"]["id"]
    after = state_of(client)
    args = {"ifInState": before, "create": {"y": {"name": "Y"}}}
    assert method_error(client, "Mailbox/set", args) == "stateMismatch"
    assert state_of(client) == after
    assert "Y" not in [m["name"] for m in mailbox_get(client)["list"]]


# =============================================================================
# /set (RFC 8620 §5.3)
# =============================================================================


def test_set_create_invalid_properties_lists_exactly_the_bad_ones(client):
    other = create(client, o={"name": "Other"})["o"]
    before = state_of(client)
    cases = {
        "unknown": ({"name": "a", "colour": "red"}, ["colour"]),
        "wrongTypeName": ({"name": 5}, ["name"]),
        "wrongTypeSortOrder": ({"name": "b", "sortOrder": "1"}, ["sortOrder"]),
        "wrongTypeSubscribed": ({"name": "c", "isSubscribed": "yes"}, ["isSubscribed"]),
        "wrongTypeParent": ({"name": "d", "parentId": 7}, ["parentId"]),
        "serverSetCount": ({"name": "e", "totalEmails": 0}, ["totalEmails"]),
        "serverSetId": ({"name": "f", "id": other}, ["id"]),
        "serverSetRights": ({"name": "g", "myRights": ALL_RIGHTS}, ["myRights"]),
        "nullName": ({"name": None}, ["name"]),
        "nullSortOrder": ({"name": "h", "sortOrder": None}, ["sortOrder"]),
        "nullSubscribed": ({"name": "i", "isSubscribed": None}, ["isSubscribed"]),
        "missingName": ({"sortOrder": 1}, ["name"]),
        "empty": ({}, ["name"]),
        "noSuchParent": ({"name": "j", "parentId": NO_SUCH_ID}, ["parentId"]),
        "noSuchCreation": ({"name": "k", "parentId": "#nope"}, ["parentId"]),
        "several": ({"colour": 1, "name": 5, "unreadThreads": 0},
                    ["colour", "name", "unreadThreads"]),
    }
    resp = mailbox_set(client, create={cid: obj for cid, (obj, _) in cases.items()})
    assert resp["created"] is None
    got = no_descriptions(resp["notCreated"])
    for errors in got.values():
        errors["properties"] = sorted(errors.get("properties", []))
    assert got == {cid: {"type": "invalidProperties", "properties": props}
                   for cid, (_, props) in cases.items()}
    assert state_of(client) == before


def test_set_update_invalid_properties_lists_exactly_the_bad_ones(client):
    cases = {
        "unknown": ({"colour": "red"}, ["colour"]),
        "wrongType": ({"name": 5}, ["name"]),
        "wrongTypeSortOrder": ({"sortOrder": "2"}, ["sortOrder"]),
        "negative": ({"sortOrder": -1}, ["sortOrder"]),
        "requiredToNull": ({"name": None}, ["name"]),
        "serverSetCount": ({"totalEmails": 3}, ["totalEmails"]),
        "serverSetId": ({"id": NO_SUCH_ID}, ["id"]),
        "serverSetRights": ({"myRights/mayDelete": False}, ["myRights"]),
        "noSuchParent": ({"parentId": NO_SUCH_ID}, ["parentId"]),
        "several": ({"colour": 1, "sortOrder": True, "unreadEmails": 1},
                    ["colour", "sortOrder", "unreadEmails"]),
    }
    ids = create(client, **{cid: {"name": cid} for cid in cases})
    before = {m["id"]: m for m in mailbox_get(client)["list"]}
    state = state_of(client)
    resp = mailbox_set(client, update={ids[cid]: patch for cid, (patch, _) in cases.items()})
    assert resp["updated"] is None
    got = no_descriptions(resp["notUpdated"])
    for errors in got.values():
        errors["properties"] = sorted(errors.get("properties", []))
    assert got == {ids[cid]: {"type": "invalidProperties", "properties": props}
                   for cid, (_, props) in cases.items()}
    assert state_of(client) == state
    assert {m["id"]: m for m in mailbox_get(client)["list"]} == before


def test_set_update_wrong_type_equal_in_python_is_invalid(client):
    cases = {
        "intForBool": ({"isSubscribed": 1}, ["isSubscribed"]),
        "boolForInt": ({"sortOrder": False}, ["sortOrder"]),
        "floatForInt": ({"sortOrder": 0.0}, ["sortOrder"]),
        "boolForServerSet": ({"totalEmails": False}, ["totalEmails"]),
    }
    ids = create(client, **{cid: {"name": cid} for cid in cases})
    resp = mailbox_set(client, update={ids[cid]: patch for cid, (patch, _) in cases.items()})
    got = no_descriptions(resp["notUpdated"] or {})
    assert got == {ids[cid]: {"type": "invalidProperties", "properties": props}
                   for cid, (_, props) in cases.items()}


def test_set_update_server_set_properties_allowed_when_unchanged(client):
    ids = create(client, x={"name": "X"})
    whole = one(client, ids["x"])  # a whole object is a valid PatchObject
    whole["name"] = "X renamed"
    resp = mailbox_set(client, update={ids["x"]: whole})
    assert resp["updated"] == {ids["x"]: None} and resp["notUpdated"] is None
    assert one(client, ids["x"]) == whole
    resp = mailbox_set(client, update={ids["x"]: {"myRights/mayDelete": True, "totalEmails": 0}})
    assert resp["updated"] == {ids["x"]: None} and resp["notUpdated"] is None


def test_set_not_found_on_update_and_destroy(client, other_client):
    foreign = create(other_client, f={"name": "Foreign"})["f"]
    resp = mailbox_set(client, update={NO_SUCH_ID: {"name": "x"}, foreign: {"name": "y"}})
    assert no_descriptions(resp["notUpdated"]) == {
        NO_SUCH_ID: {"type": "notFound"}, foreign: {"type": "notFound"}}
    resp = mailbox_set(client, destroy=[NO_SUCH_ID, foreign])
    assert no_descriptions(resp["notDestroyed"]) == {
        NO_SUCH_ID: {"type": "notFound"}, foreign: {"type": "notFound"}}
    assert one(other_client, foreign)["name"] == "Foreign"


def test_set_will_destroy(client):
    ids = create(client, x={"name": "X"})
    resp = mailbox_set(client, update={ids["x"]: {"name": "Y"}}, destroy=[ids["x"]])
    assert no_descriptions(resp["notUpdated"]) == {ids["x"]: {"type": "willDestroy"}}
    assert resp["destroyed"] == [ids["x"]]
    assert mailbox_get(client, [ids["x"]])["notFound"] == [ids["x"]]


def test_set_update_of_missing_id_in_destroy_is_not_found(client):
    resp = mailbox_set(client, update={NO_SUCH_ID: {"name": "x"}}, destroy=[NO_SUCH_ID])
    assert no_descriptions(resp["notUpdated"]) == {NO_SUCH_ID: {"type": "notFound"}}


@pytest.mark.parametrize("patch", [
    {"myRights/x/y": True},  # a parent that does not exist
    {"name/x": "y"},  # a parent that is not an object
    {"myRights": dict(ALL_RIGHTS), "myRights/mayDelete": True},  # one path prefixes another
    {"na~2me": "y"},  # ~ not followed by 0 or 1 (RFC 6901)
], ids=["missing-parent", "string-parent", "prefix-overlap", "bad-escape"])
def test_set_invalid_patch(client, patch):
    ids = create(client, x={"name": "X"})
    before = one(client, ids["x"])
    resp = mailbox_set(client, update={ids["x"]: patch})
    assert no_descriptions(resp["notUpdated"]) == {ids["x"]: {"type": "invalidPatch"}}
    assert one(client, ids["x"]) == before


def test_set_patch_pointer_escapes(client):
    ids = create(client, x={"name": "X"})
    # ~1 is "/" and ~0 is "~" (RFC 6901), so these name two unknown top-level properties.
    resp = mailbox_set(client, update={ids["x"]: {"name~1x": 1, "a~01": 2}})
    err = no_descriptions(resp["notUpdated"][ids["x"]])
    assert err["type"] == "invalidProperties"
    assert sorted(err["properties"]) == ["a~1", "name/x"]
    # A path into an object member: equal to the server value, so accepted as a no-op.
    resp = mailbox_set(client, update={ids["x"]: {"myRights/mayDelete": True}})
    assert resp["updated"] == {ids["x"]: None}


def test_set_patch_null_resets_to_default(client):
    ids = create(client, p={"name": "P"},
                 x={"name": "X", "parentId": "#p", "role": "flagged", "sortOrder": 5,
                    "isSubscribed": False})
    resp = mailbox_set(client, update={ids["x"]: {
        "parentId": None, "role": None, "sortOrder": None, "isSubscribed": None}})
    assert resp["updated"] == {ids["x"]: None}
    assert one(client, ids["x"]) == mailbox(ids["x"], "X")


def test_set_created_returns_server_set_and_defaulted_properties(client):
    resp = mailbox_set(client, create={
        "bare": {"name": "Bare", "sortOrder": 3},
        "full": {"name": "Full", "parentId": None, "role": None, "sortOrder": 0,
                 "isSubscribed": False},
    })
    bare = server_defaults(Var("bare"))
    del bare["sortOrder"]  # sent by the client, unchanged: not returned
    bound = expect(resp["created"], {
        "bare": bare,
        "full": {"id": Var("full"), "totalEmails": 0, "unreadEmails": 0, "totalThreads": 0,
                 "unreadThreads": 0, "myRights": ALL_RIGHTS},
    })
    assert one(client, bound["bare"]) == mailbox(bound["bare"], "Bare", sort_order=3)
    assert one(client, bound["full"]) == mailbox(bound["full"], "Full", subscribed=False)


def test_set_response_shape_empty_maps_are_null(client):
    state = state_of(client)
    resp = client.call("Mailbox/set", {"accountId": client.account_id})
    assert resp[1] == set_response(client.account_id, state, state)
    resp = mailbox_set(client, create={"x": {"name": "X"}})
    x = resp["created"]["x"]["id"]
    expect(resp, set_response(client.account_id, state, Var("s1"),
                              created={"x": server_defaults(x)}))
    resp = mailbox_set(client, update={x: {"name": "Y", "sortOrder": 2}})
    expect(resp, set_response(client.account_id, Var("s1"), Var("s2"), updated={x: None}))
    resp = mailbox_set(client, destroy=[x])
    expect(resp, set_response(client.account_id, Var("s2"), Var("s3"), destroyed=[x]))


def test_set_one_failing_record_does_not_undo_the_others(client):
    ids = create(client, u1={"name": "U1"}, u2={"name": "U2"}, d1={"name": "D1"})
    resp = mailbox_set(
        client,
        create={"ok1": {"name": "OK1"}, "bad": {"name": ""}, "ok2": {"name": "OK2"}},
        update={ids["u1"]: {"name": "U1 renamed"}, ids["u2"]: {"sortOrder": "x"}},
        destroy=[NO_SUCH_ID, ids["d1"]],
    )
    assert set(resp["created"]) == {"ok1", "ok2"} and set(resp["notCreated"]) == {"bad"}
    assert resp["updated"] == {ids["u1"]: None} and set(resp["notUpdated"]) == {ids["u2"]}
    assert resp["destroyed"] == [ids["d1"]] and set(resp["notDestroyed"]) == {NO_SUCH_ID}
    names = {m["name"] for m in mailbox_get(client)["list"]}
    assert {"OK1", "OK2", "U1 renamed", "U2"} <= names
    assert "D1" not in names and "U1" not in names


def test_set_creates_in_dependency_order(client):
    # RFC 8620 §5.3: the server orders creates so a referenced creation comes first.
    resp = mailbox_set(client, create={
        "grandchild": {"name": "Grandchild", "parentId": "#child"},
        "child": {"name": "Child", "parentId": "#top"},
        "top": {"name": "Top"},
    })
    assert resp["notCreated"] is None
    ids = {cid: c["id"] for cid, c in resp["created"].items()}
    assert one(client, ids["grandchild"])["parentId"] == ids["child"]
    assert one(client, ids["child"])["parentId"] == ids["top"]


def test_set_reused_creation_id_maps_to_newest(client):
    resp = client.request([
        ["Mailbox/set", {"accountId": client.account_id, "create": {"k": {"name": "First"}}}, "0"],
        ["Mailbox/set", {"accountId": client.account_id, "create": {"k": {"name": "Second"}}},
         "1"],
        ["Mailbox/get", {"accountId": client.account_id, "ids": ["#k"],
                         "properties": ["name"]}, "2"],
    ], createdIds={})
    second = resp["methodResponses"][1][1]["created"]["k"]["id"]
    assert resp["methodResponses"][2][1]["list"] == [{"id": second, "name": "Second"}]
    assert resp["createdIds"] == {"k": second}


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A server of our own with maxObjectsInSet = 3."""
    data_dir = tmp_path_factory.mktemp("small") / "data"
    add_user(data_dir, "small@example.com")
    srv = Server(data_dir, "--max-objects-in-set", 3).start()
    yield srv
    srv.stop()


def test_set_request_too_large_over_max_objects_in_set(small_server):
    client = Client(small_server.url, "small@example.com")
    assert client.session["capabilities"]["urn:ietf:params:jmap:core"]["maxObjectsInSet"] == 3
    ids = create(client, a={"name": "A"}, b={"name": "B"}, c={"name": "C"})  # at the limit
    state = state_of(client)
    args = {"create": {"d": {"name": "D"}, "e": {"name": "E"}},
            "update": {ids["a"]: {"name": "A2"}}, "destroy": [ids["b"]]}  # 4: over it
    assert method_error(client, "Mailbox/set", args) == "requestTooLarge"
    assert state_of(client) == state
    resp = mailbox_set(client, update={ids["a"]: {"name": "A2"}},
                       destroy=[ids["b"], ids["c"]])  # 3 again, mixed
    assert resp["updated"] == {ids["a"]: None} and sorted(resp["destroyed"]) == sorted(
        [ids["b"], ids["c"]])


# =============================================================================
# /query (RFC 8620 §5.5; Mailbox filters RFC 8621 §2.3)
# =============================================================================


@pytest.fixture
def zoo(client):
    """Five children of a "Zoo" Mailbox with known names, sort orders and subscriptions."""
    return make_zoo(client)


@pytest.fixture(scope="module")
def shared_zoo(server):
    """(client, zoo) of one account shared by the /query tests that only read."""
    username = f"zoo-{os.getpid()}@example.com"
    add_user(server.data_dir, username)
    client = Client(server.url, username)
    zoo = make_zoo(client)
    state = state_of(client)
    yield client, zoo
    assert state_of(client) == state, "a test using shared_zoo changed it"


def make_zoo(client):
    ids = create(
        client,
        zoo={"name": "Zoo"},
        apple={"name": "apple", "parentId": "#zoo", "sortOrder": 3},
        banana={"name": "Banana", "parentId": "#zoo", "sortOrder": 1, "isSubscribed": False},
        cherry={"name": "cherry", "parentId": "#zoo", "sortOrder": 2},
        date={"name": "date", "parentId": "#zoo", "sortOrder": 1},
        elder={"name": "Elder", "parentId": "#zoo", "sortOrder": 0, "isSubscribed": False},
    )
    return ids


def zoo_query(client, zoo, filter=None, **args):
    """Query the Zoo's children (sorted by name unless told otherwise)."""
    in_zoo = {"parentId": zoo["zoo"]}
    full = in_zoo if filter is None else {"operator": "AND", "conditions": [in_zoo, filter]}
    args.setdefault("sort", BY_NAME)
    return mailbox_query(client, filter=full, **args)


def names(zoo, ids):
    by_id = {v: k for k, v in zoo.items()}
    return [by_id.get(i, i) for i in ids]


def test_query_filter_parent_id(client, zoo):
    roots = mailbox_query(client, filter={"parentId": None})["ids"]
    assert len(roots) == 7 and zoo["zoo"] in roots and zoo["apple"] not in roots
    kids = mailbox_query(client, filter={"parentId": zoo["zoo"]}, sort=BY_NAME)["ids"]
    assert names(zoo, kids) == ["apple", "banana", "cherry", "date", "elder"]
    assert mailbox_query(client, filter={"parentId": zoo["apple"]})["ids"] == []


def test_query_filter_name_contains_case_insensitive(client, zoo):
    assert names(zoo, zoo_query(client, zoo, {"name": "AN"})["ids"]) == ["banana"]
    assert names(zoo, zoo_query(client, zoo, {"name": "e"})["ids"]) == [
        "apple", "cherry", "date", "elder"]
    assert zoo_query(client, zoo, {"name": "zebra"})["ids"] == []
    inbox = by_role(client, "inbox")
    assert mailbox_query(client, filter={"name": "INB"})["ids"] == [inbox]
    ids = create(client, u={"name": "Übersicht"}, w={"name": "50%_off"})
    assert mailbox_query(client, filter={"name": "üBER"})["ids"] == [ids["u"]]
    for literal in ("%", "_", "0%_O"):  # plain substrings, no wildcards
        assert mailbox_query(client, filter={"name": literal})["ids"] == [ids["w"]], literal


def test_query_filter_role_and_has_any_role(shared_zoo):
    client, zoo = shared_zoo
    trash = by_role(client, "trash")
    assert mailbox_query(client, filter={"role": "trash"})["ids"] == [trash]
    assert mailbox_query(client, filter={"role": "flagged"})["ids"] == []
    ours = sorted(zoo.values())
    assert sorted(mailbox_query(client, filter={"role": None})["ids"]) == ours
    assert sorted(mailbox_query(client, filter={"hasAnyRole": False})["ids"]) == ours
    with_role = mailbox_query(client, filter={"hasAnyRole": True})["ids"]
    assert len(with_role) == 6 and trash in with_role and not set(with_role) & set(ours)


def test_query_filter_is_subscribed(shared_zoo):
    client, zoo = shared_zoo
    assert names(zoo, zoo_query(client, zoo, {"isSubscribed": False})["ids"]) == [
        "banana", "elder"]
    assert names(zoo, zoo_query(client, zoo, {"isSubscribed": True})["ids"]) == [
        "apple", "cherry", "date"]


def test_query_filter_operators_and_nesting(shared_zoo):
    client, zoo = shared_zoo
    def q(filter):
        return names(zoo, zoo_query(client, zoo, filter)["ids"])

    assert q({"operator": "OR", "conditions": [{"name": "apple"}, {"name": "date"}]}) == [
        "apple", "date"]
    assert q({"operator": "AND", "conditions": [{"name": "e"}, {"isSubscribed": False}]}) == [
        "elder"]
    assert q({"operator": "NOT", "conditions": [{"isSubscribed": False}]}) == [
        "apple", "cherry", "date"]
    # NOT means none of the conditions match (RFC 8620 §5.5).
    assert q({"operator": "NOT", "conditions": [{"name": "apple"}, {"name": "date"}]}) == [
        "banana", "cherry", "elder"]
    nested = {"operator": "NOT", "conditions": [
        {"operator": "OR", "conditions": [{"name": "a"}, {"isSubscribed": False}]}]}
    assert q(nested) == ["cherry"]
    deeper = {"operator": "OR", "conditions": [
        nested, {"operator": "AND", "conditions": [{"name": "an"}, {"hasAnyRole": False}]}]}
    assert q(deeper) == ["banana", "cherry"]
    # A condition object with several properties: all must match (RFC 8621 §2.3).
    assert q({"name": "e", "isSubscribed": True}) == ["apple", "cherry", "date"]


def test_query_not_includes_records_with_null_values(shared_zoo):
    client, zoo = shared_zoo
    every = {m["id"] for m in mailbox_get(client)["list"]}
    inbox = by_role(client, "inbox")
    not_inbox = mailbox_query(client, filter={"operator": "NOT", "conditions": [
        {"role": "inbox"}]})["ids"]
    assert set(not_inbox) == every - {inbox}
    not_in_zoo = mailbox_query(client, filter={"operator": "NOT", "conditions": [
        {"parentId": zoo["zoo"]}]})["ids"]
    assert set(not_in_zoo) == every - {zoo[k] for k in ("apple", "banana", "cherry", "date",
                                                         "elder")}


def test_query_unknown_filter_is_unsupported_filter(shared_zoo):
    client, zoo = shared_zoo
    for filter in ({"colour": "red"},
                   {"operator": "AND", "conditions": [{"name": "a"}, {"colour": "red"}]}):
        assert method_error(client, "Mailbox/query", {"filter": filter}) == "unsupportedFilter"


def test_query_sort_name_and_sort_order(shared_zoo):
    client, zoo = shared_zoo
    def q(*sort):
        return names(zoo, zoo_query(client, zoo, sort=list(sort))["ids"])

    assert q({"property": "name"}) == ["apple", "banana", "cherry", "date", "elder"]
    assert q({"property": "name", "isAscending": False}) == [
        "elder", "date", "cherry", "banana", "apple"]
    assert q({"property": "sortOrder"}, {"property": "name"}) == [
        "elder", "banana", "date", "cherry", "apple"]
    assert q({"property": "sortOrder", "isAscending": False}, {"property": "name"}) == [
        "apple", "cherry", "banana", "date", "elder"]
    assert q({"property": "sortOrder"}, {"property": "name", "isAscending": False}) == [
        "elder", "date", "banana", "cherry", "apple"]


def test_query_sort_collations(client):
    ids = create(client, p={"name": "P"}, lower_b={"name": "b", "parentId": "#p"},
                 upper_b={"name": "B", "parentId": "#p"}, a={"name": "a", "parentId": "#p"})

    def q(**comparator):
        found = mailbox_query(client, filter={"parentId": ids["p"]},
                              sort=[{"property": "name", **comparator}])["ids"]
        return [{v: k for k, v in ids.items()}[i] for i in found]

    assert q(collation="i;octet") == ["upper_b", "a", "lower_b"]
    assert q(collation="i;octet", isAscending=False) == ["lower_b", "a", "upper_b"]
    for caseless in ("i;unicode-casemap", "i;ascii-casemap"):
        assert q(collation=caseless)[0] == "a"
        assert set(q(collation=caseless)[1:]) == {"lower_b", "upper_b"}
        assert q(collation=caseless, isAscending=False)[2] == "a"
    assert q()[0] == "a"  # default: case-insensitive where it makes sense (SHOULD)
    advertised = client.session["capabilities"]["urn:ietf:params:jmap:core"]
    assert {"i;octet", "i;unicode-casemap"} <= set(advertised["collationAlgorithms"])


def test_query_unsupported_sort(shared_zoo):
    client = shared_zoo[0]
    for sort in ([{"property": "colour"}],
                 [{"property": "name", "collation": "i;no-such-collation"}],
                 [{"property": "name"}, {"property": "colour"}]):
        assert method_error(client, "Mailbox/query", {"sort": sort}) == "unsupportedSort", sort


def test_query_comparator_extra_members_tolerated(shared_zoo):
    client, zoo = shared_zoo
    sort = [{"property": "name", "isAscending": True, "keyword": "$seen", "x-extra": {"a": 1}}]
    assert names(zoo, zoo_query(client, zoo, sort=sort)["ids"]) == [
        "apple", "banana", "cherry", "date", "elder"]


def test_query_position(shared_zoo):
    client, zoo = shared_zoo
    def q(**args):
        resp = zoo_query(client, zoo, **args)
        return resp["position"], names(zoo, resp["ids"])

    assert q(position=1, limit=2) == (1, ["banana", "cherry"])
    assert q(position=-2) == (3, ["date", "elder"])
    assert q(position=-10) == (0, ["apple", "banana", "cherry", "date", "elder"])
    assert q(position=4) == (4, ["elder"])
    assert q(position=5)[1] == []
    assert q(position=99)[1] == []
    assert q(position=1, anchorOffset=3) == (1, ["banana", "cherry", "date", "elder"])


def test_query_anchor(shared_zoo):
    client, zoo = shared_zoo
    def q(**args):
        resp = zoo_query(client, zoo, anchor=zoo["cherry"], **args)
        return resp["position"], names(zoo, resp["ids"])

    assert q() == (2, ["cherry", "date", "elder"])
    assert q(anchorOffset=1, limit=1) == (3, ["date"])
    assert q(anchorOffset=-1, limit=2) == (1, ["banana", "cherry"])
    assert q(anchorOffset=-10, limit=2) == (0, ["apple", "banana"])  # clamped to 0
    assert q(anchorOffset=10)[1] == []
    assert q(position=4, limit=1) == (2, ["cherry"])  # anchor wins over position
    assert q(position=-1, anchorOffset=0, limit=1) == (2, ["cherry"])


def test_query_anchor_not_found(shared_zoo):
    client, zoo = shared_zoo
    inbox = by_role(client, "inbox")  # exists, but filtered out
    for anchor in (inbox, NO_SUCH_ID):
        args = {"filter": {"parentId": zoo["zoo"]}, "anchor": anchor}
        assert method_error(client, "Mailbox/query", args) == "anchorNotFound"


def test_query_limit(shared_zoo):
    client, zoo = shared_zoo
    resp = zoo_query(client, zoo, limit=2)
    assert names(zoo, resp["ids"]) == ["apple", "banana"]
    assert "limit" not in resp  # only when the server changed it
    assert zoo_query(client, zoo, limit=0)["ids"] == []
    assert len(zoo_query(client, zoo, limit=None)["ids"]) == 5
    args = {"filter": {"parentId": zoo["zoo"]}, "limit": -1}
    assert method_error(client, "Mailbox/query", args) == "invalidArguments"


def test_query_calculate_total(shared_zoo):
    client, zoo = shared_zoo
    assert "total" not in zoo_query(client, zoo)
    assert "total" not in zoo_query(client, zoo, calculateTotal=False)
    resp = zoo_query(client, zoo, calculateTotal=True, limit=1, position=1)
    assert resp["total"] == 5 and len(resp["ids"]) == 1
    assert zoo_query(client, zoo, {"name": "zebra"}, calculateTotal=True)["total"] == 0


def test_query_state_and_can_calculate_changes(client, zoo):
    first = zoo_query(client, zoo)
    expect(first, {"accountId": client.account_id, "queryState": Var("qs"),
                   "canCalculateChanges": True, "position": 0,
                   "ids": [zoo[k] for k in ("apple", "banana", "cherry", "date", "elder")]})
    assert zoo_query(client, zoo)["queryState"] == first["queryState"]
    create(client, fig={"name": "fig", "parentId": zoo["zoo"]})
    assert zoo_query(client, zoo)["queryState"] != first["queryState"]  # results changed


# =============================================================================
# /queryChanges (RFC 8620 §5.6)
# =============================================================================


def splice(old_ids, removed, added):
    """The client algorithm of RFC 8620 §5.6: splice out removed, splice in added."""
    ids = [i for i in old_ids if i not in set(removed)]
    for item in added:
        ids.insert(item["index"], item["id"])
    return ids


def check_query_changes(client, zoo, change):
    before = zoo_query(client, zoo)
    change()
    after = zoo_query(client, zoo)
    resp = query_changes(client, before["queryState"], filter=zoo_query_filter(zoo),
                         sort=BY_NAME)
    assert resp["oldQueryState"] == before["queryState"]
    assert resp["newQueryState"] == after["queryState"]
    indexes = [a["index"] for a in resp["added"]]
    assert indexes == sorted(indexes)  # lowest index first
    assert splice(before["ids"], resp["removed"], resp["added"]) == after["ids"]
    return resp


def zoo_query_filter(zoo):
    return {"parentId": zoo["zoo"]}


def test_query_changes_after_creates(client, zoo):
    made = {}

    def change():
        made.update(create(client, blueberry={"name": "blueberry", "parentId": zoo["zoo"]},
                           aardvark={"name": "aardvark", "parentId": zoo["zoo"]},
                           elsewhere={"name": "Elsewhere"}))

    resp = check_query_changes(client, zoo, change)
    assert resp["removed"] == []
    assert resp["added"] == [{"id": made["aardvark"], "index": 0},
                             {"id": made["blueberry"], "index": 3}]


def test_query_changes_after_rename_that_moves(client, zoo):
    def change():
        mailbox_set(client, update={zoo["date"]: {"name": "Aaa"}})

    resp = check_query_changes(client, zoo, change)
    assert zoo["date"] in resp["removed"]
    assert {"id": zoo["date"], "index": 0} in resp["added"]


def test_query_changes_after_destroy_and_moves(client, zoo):
    def change():
        mailbox_set(client, update={zoo["banana"]: {"parentId": None}},
                    destroy=[zoo["cherry"]])

    resp = check_query_changes(client, zoo, change)
    assert sorted(resp["removed"]) == sorted([zoo["banana"], zoo["cherry"]])
    assert resp["added"] == []

    def move_back():
        mailbox_set(client, update={zoo["banana"]: {"parentId": zoo["zoo"]}})

    resp = check_query_changes(client, zoo, move_back)
    assert resp["added"] == [{"id": zoo["banana"], "index": 1}]


def test_query_changes_max_changes_and_total(client, zoo):
    qs = zoo_query(client, zoo)["queryState"]
    create(client, **{k: {"name": k, "parentId": zoo["zoo"]} for k in ("x", "y", "z")})
    args = {"filter": zoo_query_filter(zoo), "sort": BY_NAME, "sinceQueryState": qs}
    assert method_error(client, "Mailbox/queryChanges", {**args, "maxChanges": 2}) == (
        "tooManyChanges")
    assert method_error(client, "Mailbox/queryChanges", {**args, "maxChanges": 0}) == (
        "invalidArguments")
    resp = query_changes(client, qs, filter=zoo_query_filter(zoo), sort=BY_NAME, maxChanges=3)
    assert len(resp["added"]) == 3 and "total" not in resp
    resp = query_changes(client, qs, filter=zoo_query_filter(zoo), sort=BY_NAME,
                         calculateTotal=True)
    assert resp["total"] == 8


def test_query_changes_bad_state_cannot_calculate(shared_zoo):
    client, zoo = shared_zoo
    for since in ("not-a-state", ""):
        args = {"filter": zoo_query_filter(zoo), "sinceQueryState": since}
        assert method_error(client, "Mailbox/queryChanges", args) == "cannotCalculateChanges"


# =============================================================================
# Account scoping: two accounts never see each other's Mailboxes
# =============================================================================


def test_accounts_never_see_each_other(client, other_client):
    my_start = state_of(client)
    mine = create(client, m={"name": "Mine"})["m"]
    theirs = create(other_client, t={"name": "Theirs"})["t"]
    their_state = state_of(other_client)
    assert theirs not in [m["id"] for m in mailbox_get(client)["list"]]
    assert mine not in [m["id"] for m in mailbox_get(other_client)["list"]]
    assert mailbox_get(client, [theirs])["notFound"] == [theirs]
    assert theirs not in mailbox_query(client)["ids"]
    assert mailbox_changes(client, my_start)["created"] == [mine]
    resp = mailbox_set(client, update={theirs: {"name": "Hijacked"}},
                       create={"c": {"name": "Child", "parentId": theirs}})
    assert resp["notUpdated"][theirs]["type"] == "notFound"
    assert mailbox_set(client, destroy=[theirs])["notDestroyed"][theirs]["type"] == "notFound"
    assert no_descriptions(resp["notCreated"]) == {
        "c": {"type": "invalidProperties", "properties": ["parentId"]}}
    assert one(other_client, theirs)["name"] == "Theirs"
    assert state_of(other_client) == their_state


def test_accounts_other_account_id_is_account_not_found(client, other_client):
    theirs = other_client.account_id
    assert theirs != client.account_id
    calls = {
        "Mailbox/get": {"ids": None},
        "Mailbox/set": {"create": {"x": {"name": "X"}}},
        "Mailbox/query": {},
        "Mailbox/changes": {"sinceState": state_of(other_client)},
        "Mailbox/queryChanges": {"sinceQueryState": state_of(other_client)},
    }
    for name, args in calls.items():
        resp = client.call(name, {**args, "accountId": theirs})
        assert resp[0] == "error" and resp[1]["type"] == "accountNotFound", (name, resp)
    assert "X" not in [m["name"] for m in mailbox_get(other_client)["list"]]


# =============================================================================
# The change horizon (RFC 8620 §5.2: changes from states up to 30 days old)
# =============================================================================


def test_changes_horizon_purges_old_tombstones(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "horizon@example.com")

    def serve(now, *extra):
        # tombstones are stamped with the clock at destroy time, hence --test-now throughout
        return Server(data_dir, "--test-now", now, *extra).start()

    srv = serve("2030-01-01T00:00:00Z")
    try:
        client = Client(srv.url, "horizon@example.com")
        gone = create(client, g={"name": "Gone"})["g"]
        before = state_of(client)
        after = mailbox_set(client, destroy=[gone])["newState"]
    finally:
        srv.stop()

    srv = serve("2030-01-30T00:00:00Z", "--changes-horizon-days", 30)  # 29 days later
    try:
        client = Client(srv.url, "horizon@example.com")
        assert mailbox_changes(client, before)["destroyed"] == [gone]
    finally:
        srv.stop()

    srv = serve("2030-03-12T00:00:00Z", "--changes-horizon-days", 60)  # 70 days later
    try:
        client = Client(srv.url, "horizon@example.com")
        assert method_error(client, "Mailbox/changes", {"sinceState": before}) == (
            "cannotCalculateChanges")
        assert method_error(client, "Mailbox/queryChanges", {"sinceQueryState": before}) == (
            "cannotCalculateChanges")
        resp = mailbox_changes(client, after)
        assert resp["newState"] == after and resp["destroyed"] == []
    finally:
        srv.stop()


def test_changes_horizon_below_30_days_refused(tmp_path):
    done = run_cli("serve", "--listen", "127.0.0.1:0", "--changes-horizon-days", 29,
                   data_dir=tmp_path / "data", timeout=30)
    assert done.returncode == 2, done
    assert "changes-horizon-days" in done.stderr
