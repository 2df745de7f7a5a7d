"""Email/query and Email/queryChanges (jmapd §6.3 /query /queryChanges, §7.4).

RFC 8621 §4.4 (collapseThreads), §4.4.1 (every FilterCondition, alone and under
AND/OR/NOT, keyword syntax of §4.1.1), §4.4.2 (every sort, both directions, the
"keyword" a keyword sort MUST have, the example sort), §4.4.3 (thread collapsing with
position/anchor/limit/total), §4.5 (queryChanges with and without collapseThreads) and
the first §4.10 example; RFC 8620 §5.5 (position, anchor, limit, total, errors) and §5.6
(the splice algorithm: a client's cached ids with "removed" spliced out and "added"
spliced in must equal a fresh query; maxChanges -> tooManyChanges; upToId).

A module-wide corpus of seven messages (built with test_thread.message()) serves the
read-only tests; expected orders are computed from what each message was built with
(size = octets uploaded, RFC 8621 §4.1.1; sentAt from the Date header; base subjects
written by hand per RFC 5256 §2.1), never from jmapd's answers. Tests that change data
use accounts of their own. Keyword changes through Email/set are not covered yet (jmapd
has no Email/set); keywords here are given at Email/import.
"""

from datetime import datetime, timezone

import pytest

from test_generic import Var, expect
from test_thread import at, message, new_account, unique

# name: (message() arguments, Mailbox roles, keywords, receivedAt, base subject, sentAt UTC)
CORPUS = {
    "a": (dict(subject="Apple pie recipe", from_="Zoe Baker <zoe@bakery.example>",
               to="Adam Smith <adam@example.org>", cc="Carol Jones <carol@example.com>",
               date="Fri, 05 Jan 2024 10:00:00 +0000",
               text="Mix apples and cinnamon, then bake." + " pad" * 75),
          ["inbox"], ["$seen"], at(1), "Apple pie recipe", "2024-01-05T10:00:00"),
    "b": (dict(subject="Re: Apple pie recipe", from_="Adam Smith <adam@example.org>",
               to="Zoe Baker <zoe@bakery.example>", date="Sat, 06 Jan 2024 08:00:00 +0100",
               text="Thanks, it smells great."),
          ["inbox"], ["$seen", "$flagged"], at(2), "Apple pie recipe", "2024-01-06T07:00:00"),
    "c": (dict(subject="banana bread", from_="bob@example.net", to="Yann <yann@example.com>",
               bcc="Hidden Watcher <hidden@example.com>", date="Wed, 03 Jan 2024 12:00:00 -0500",
               text="Three ripe bananas.",
               attachments=[("recipe.pdf", "application/pdf", b"%PDF-1.4 not really" * 20)]),
          ["archive"], [], at(3), "banana bread", "2024-01-03T17:00:00"),
    "d": (dict(subject="Cherry tart", from_="Carol Jones <carol@example.com>",
               to="Adam Smith <adam@example.org>", date="Thu, 04 Jan 2024 09:00:00 +0000",
               text="Sour cherries only." + " pad" * 38),
          ["trash"], ["$seen"], at(4), "Cherry tart", "2024-01-04T09:00:00"),
    "e": (dict(subject="Re: Cherry tart", from_="Adam Smith <adam@example.org>",
               to="Carol Jones <carol@example.com>", date="Thu, 04 Jan 2024 18:00:00 +0000",
               text="Can I bring cream?" + " pad" * 150),
          ["inbox"], ["$seen"], at(5), "Cherry tart", "2024-01-04T18:00:00"),
    "f": (dict(subject="Date squares", from_="Eve <eve@example.com>", to=None,
               # 13:00 +0800 is 05:00Z: after c (12:00 -0500 = 17:00Z) in local time,
               # before it in UTC.
               date="Wed, 03 Jan 2024 13:00:00 +0800", text=None,
               html="<p>Dates and <b>oats</b>.</p>", headers=[("X-Priority-Tag", "urgent-42")]),
          ["inbox", "archive"], ["$flagged"], at(6), "Date squares", "2024-01-03T05:00:00"),
    "g": (dict(subject="Elderflower cordial", from_="dave@example.com",
               to="Zed <zed@example.com>", date="Mon, 01 Jan 2024 00:00:00 +0000",
               text="Pick the flowers in June." + " pad" * 110),
          ["inbox"], ["$answered"], at(7), "Elderflower cordial", "2024-01-01T00:00:00"),
}
NAMES = sorted(CORPUS)
THREADS = [{"a", "b"}, {"c"}, {"d", "e"}, {"f"}, {"g"}]
FROM_KEY = {"a": "Zoe Baker", "b": "Adam Smith", "c": "bob@example.net", "d": "Carol Jones",
            "e": "Adam Smith", "f": "Eve", "g": "dave@example.com"}  # RFC 8621 §4.4.2
TO_KEY = {"a": "Adam Smith", "b": "Zoe Baker", "c": "Yann", "d": "Adam Smith",
          "e": "Carol Jones", "f": "", "g": "Zed"}


class Corpus:
    """CORPUS imported into one account (one Email/import call)."""

    def __init__(self, acct):
        self.acct = acct
        self.msgid = {name: f"{name}-{unique()}@test.example" for name in NAMES}
        raws = {}
        for name, (args, *_rest) in CORPUS.items():
            args = dict(args)
            if name in ("b", "e"):
                parent = self.msgid[{"b": "a", "e": "d"}[name]]
                args.update(in_reply_to=parent, references=[parent])
            raws[name] = message(msgid=self.msgid[name], **args)
        items = {name: acct.item(raws[name], CORPUS[name][1], CORPUS[name][2], CORPUS[name][3])
                 for name in NAMES}
        created = acct.add_many(items)
        self.ids = {name: created[name]["id"] for name in NAMES}
        self.names_of = {v: k for k, v in self.ids.items()}
        self.size = {name: len(raws[name]) for name in NAMES}
        assert all(created[n]["size"] == self.size[n] for n in NAMES), created
        thread = {name: created[name]["threadId"] for name in NAMES}
        assert [{n for n in NAMES if thread[n] == thread[m]} for m in "acdfg"] == THREADS

    def names(self, ids):
        return [self.names_of[i] for i in ids]

    def run(self, **args):
        """Email/query -> the corpus names of the ids, in order."""
        return self.names(self.acct.query(**args))

    def filtered(self, condition):
        """Names matching a filter, oldest receivedAt first."""
        return self.run(filter=condition, sort=[{"property": "receivedAt"}])


@pytest.fixture(scope="module")
def corpus(server):
    return Corpus(new_account(server, "query"))


def received(name):
    return CORPUS[name][3]


def keywords(name):
    return set(CORPUS[name][2])


def thread_of(name):
    return next(t for t in THREADS if name in t)


# =============================================================================
# RFC 8621 §4.4.1: each FilterCondition alone
# =============================================================================


def test_email_query_no_filter_returns_everything(corpus):
    assert corpus.filtered(None) == NAMES
    assert corpus.filtered({}) == NAMES  # zero properties: always true


@pytest.mark.parametrize("role, expected", [
    ("inbox", "abefg"), ("archive", "cf"), ("trash", "d"), ("drafts", ""),
])
def test_email_query_in_mailbox(corpus, role, expected):
    assert corpus.filtered({"inMailbox": corpus.acct.box[role]}) == list(expected)


def test_email_query_in_unknown_mailbox_matches_nothing(corpus):
    assert corpus.filtered({"inMailbox": "M999999999"}) == []


@pytest.mark.parametrize("roles, expected", [
    (["trash"], "abcefg"),  # the §4.4.1 use: leave out what is only in the trash
    (["inbox"], "cdf"),  # f is in the Archive too
    (["inbox", "archive"], "d"),
    (["inbox", "archive", "trash"], ""),
    ([], "abcdefg"),
])
def test_email_query_in_mailbox_other_than(corpus, roles, expected):
    boxes = [corpus.acct.box[r] for r in roles]
    assert corpus.filtered({"inMailboxOtherThan": boxes}) == list(expected)


@pytest.mark.parametrize("moment, before, after", [
    (at(4), "abc", "defg"),  # d was received exactly then: "same or after"
    (at(4, seconds=1), "abcd", "efg"),
    (at(3, minutes=59, seconds=59), "abc", "defg"),
    (at(0), "", "abcdefg"),
    (at(100), "abcdefg", ""),
])
def test_email_query_before_and_after(corpus, moment, before, after):
    assert corpus.filtered({"before": moment}) == list(before)
    assert corpus.filtered({"after": moment}) == list(after)


@pytest.mark.parametrize("pivot", NAMES)
def test_email_query_min_and_max_size(corpus, pivot):
    size = corpus.size[pivot]
    assert corpus.filtered({"minSize": size}) == [n for n in NAMES if corpus.size[n] >= size]
    assert corpus.filtered({"maxSize": size}) == [n for n in NAMES if corpus.size[n] < size]
    assert pivot in corpus.filtered({"minSize": size, "maxSize": size + 1})


def test_email_query_size_bounds_at_the_extremes(corpus):
    assert corpus.filtered({"minSize": 0}) == NAMES
    assert corpus.filtered({"maxSize": 0}) == []


@pytest.mark.parametrize("condition, keyword", [
    ("hasKeyword", "$flagged"), ("hasKeyword", "$seen"), ("hasKeyword", "$answered"),
    ("hasKeyword", "$draft"), ("notKeyword", "$seen"), ("notKeyword", "$flagged"),
    ("allInThreadHaveKeyword", "$seen"), ("allInThreadHaveKeyword", "$flagged"),
    ("someInThreadHaveKeyword", "$flagged"), ("someInThreadHaveKeyword", "$seen"),
    ("noneInThreadHaveKeyword", "$flagged"), ("noneInThreadHaveKeyword", "$seen"),
])
def test_email_query_keyword_conditions(corpus, condition, keyword):
    def has(n):
        return keyword in keywords(n)

    match = {
        "hasKeyword": has,
        "notKeyword": lambda n: not has(n),
        "allInThreadHaveKeyword": lambda n: all(has(m) for m in thread_of(n)),
        "someInThreadHaveKeyword": lambda n: any(has(m) for m in thread_of(n)),
        "noneInThreadHaveKeyword": lambda n: not any(has(m) for m in thread_of(n)),
    }[condition]
    assert corpus.filtered({condition: keyword}) == [n for n in NAMES if match(n)]


def test_email_query_keyword_conditions_fixed_answers(corpus):
    # The same as above, written out for the corpus (threads ab, c, de, f, g).
    assert corpus.filtered({"hasKeyword": "$flagged"}) == ["b", "f"]
    assert corpus.filtered({"allInThreadHaveKeyword": "$seen"}) == ["a", "b", "d", "e"]
    assert corpus.filtered({"someInThreadHaveKeyword": "$flagged"}) == ["a", "b", "f"]
    assert corpus.filtered({"noneInThreadHaveKeyword": "$flagged"}) == ["c", "d", "e", "g"]
    assert corpus.filtered({"notKeyword": "$seen"}) == ["c", "f", "g"]


@pytest.mark.parametrize("condition", ["hasKeyword", "notKeyword", "allInThreadHaveKeyword",
                                       "someInThreadHaveKeyword", "noneInThreadHaveKeyword"])
def test_email_query_keywords_are_case_insensitive(corpus, condition):
    # RFC 8621 §4.1.1: "a keyword is a case-insensitive string".
    assert corpus.filtered({condition: "$FLAGGED"}) == corpus.filtered({condition: "$flagged"})


def test_email_query_odd_but_valid_keyword(corpus):
    # §4.1.1 forbids ( ) { ] % * " \ only: "[" and "}" are allowed.
    assert corpus.filtered({"hasKeyword": "odd[kw}"}) == []
    assert corpus.filtered({"notKeyword": "x" * 255}) == NAMES


def test_email_query_has_attachment(corpus):
    assert corpus.filtered({"hasAttachment": True}) == ["c"]
    assert corpus.filtered({"hasAttachment": False}) == ["a", "b", "d", "e", "f", "g"]


@pytest.mark.parametrize("condition, text, expected", [
    ("text", "cinnamon", "a"),  # body
    ("text", "tart", "de"),  # subject
    ("text", "carol", "ade"),  # cc of a, from of d, to of e
    ("text", "hidden", "c"),  # bcc
    ("text", "bakery.example", "ab"),  # from of a, to of b
    ("text", "oats", "f"),  # HTML body
    ("from", "adam", "be"),
    ("from", "Adam Smith", "be"),
    ("from", "zoe@bakery.example", "a"),
    ("from", "bob@example.net", "c"),
    ("from", "carol", "d"),
    ("to", "adam", "ad"),
    ("to", "yann@example.com", "c"),
    ("to", "eve", ""),
    ("cc", "carol", "a"),
    ("cc", "adam", ""),
    ("bcc", "hidden", "c"),
    ("bcc", "watcher", "c"),
    ("bcc", "yann", ""),
    ("subject", "tart", "de"),
    ("subject", "cinnamon", ""),
    ("subject", "apple recipe", "ab"),  # words, not a phrase
    ("body", "cinnamon", "a"),
    ("body", "tart", ""),  # only in subjects
    ("body", "oats", "f"),
    ("body", "adam", ""),  # only in headers
])
def test_email_query_text_conditions(corpus, condition, text, expected):
    assert corpus.filtered({condition: text}) == list(expected)


@pytest.mark.parametrize("value, expected", [
    (["X-Priority-Tag"], "f"),
    (["x-priority-tag"], "f"),  # field names are case-insensitive (RFC 5322 §1.2.2)
    (["X-Priority-Tag", "urgent"], "f"),
    (["X-Priority-Tag", "URGENT-42"], "f"),
    (["X-Priority-Tag", "relaxed"], ""),
    (["In-Reply-To"], "be"),
    (["Bcc"], "c"),
    (["Cc", "carol"], "a"),
    (["X-Not-There"], ""),
])
def test_email_query_header(corpus, value, expected):
    assert corpus.filtered({"header": value}) == list(expected)


# =============================================================================
# RFC 8620 §5.5 / RFC 8621 §4.4.1: FilterOperators and multi-property conditions
# =============================================================================


def test_email_query_filter_operators(corpus):
    box = corpus.acct.box
    flagged, inbox = {"hasKeyword": "$flagged"}, {"inMailbox": box["inbox"]}
    assert corpus.filtered({"operator": "AND", "conditions": [inbox, flagged]}) == ["b", "f"]
    assert corpus.filtered({"operator": "OR", "conditions": [
        {"from": "adam"}, {"hasAttachment": True}]}) == ["b", "c", "e"]
    assert corpus.filtered({"operator": "NOT", "conditions": [inbox]}) == ["c", "d"]
    # NOT: none of the conditions may match.
    assert corpus.filtered({"operator": "NOT", "conditions": [inbox, flagged]}) == ["c", "d"]
    assert corpus.filtered({"operator": "NOT", "conditions": [
        {"inMailbox": box["archive"]}, {"inMailbox": box["trash"]}]}) == ["a", "b", "e", "g"]


def test_email_query_filter_operators_nest(corpus):
    box = corpus.acct.box
    nested = {"operator": "AND", "conditions": [
        {"inMailboxOtherThan": [box["trash"]]},
        {"operator": "NOT", "conditions": [
            {"operator": "OR", "conditions": [{"text": "apple"}, {"text": "cherry"}]}]},
        {"operator": "OR", "conditions": [{"hasKeyword": "$flagged"}, {"text": "june"}]},
    ]}
    assert corpus.filtered(nested) == ["f", "g"]


def test_email_query_empty_operators(corpus):
    assert corpus.filtered({"operator": "AND", "conditions": []}) == NAMES
    assert corpus.filtered({"operator": "OR", "conditions": []}) == []
    assert corpus.filtered({"operator": "NOT", "conditions": []}) == NAMES


def test_email_query_condition_with_several_properties_is_and(corpus):
    inbox = corpus.acct.box["inbox"]
    assert corpus.filtered({"inMailbox": inbox, "notKeyword": "$seen"}) == ["f", "g"]
    assert corpus.filtered({"from": "adam", "after": at(3)}) == ["e"]
    assert corpus.filtered({"from": "adam", "subject": "banana"}) == []


# =============================================================================
# RFC 8621 §4.4.1 / RFC 8620 §5.5: errors
# =============================================================================

BAD_KEYWORDS = ["", "has space", "a(b", "a)b", "a{b", "a]b", "a%b", "a*b", 'a"b', "a\\b",
                "x" * 256, "caf\u00e9"]


@pytest.mark.parametrize("condition", ["hasKeyword", "notKeyword", "allInThreadHaveKeyword",
                                       "someInThreadHaveKeyword", "noneInThreadHaveKeyword"])
@pytest.mark.parametrize("keyword", BAD_KEYWORDS, ids=range(len(BAD_KEYWORDS)))
def test_email_query_invalid_keyword_is_invalid_arguments(corpus, condition, keyword):
    assert corpus.acct.error("Email/query", filter={condition: keyword}) == "invalidArguments"


@pytest.mark.parametrize("condition", [
    {"colour": "red"},
    {"inMailbox": "M1", "subjectStartsWith": "x"},
    {"operator": "AND", "conditions": [{"unknownThing": True}]},
])
def test_email_query_unknown_filter_is_unsupported_filter(corpus, condition):
    assert corpus.acct.error("Email/query", filter=condition) == "unsupportedFilter"


@pytest.mark.parametrize("condition", [
    {"header": []}, {"header": ["A", "b", "c"]}, {"header": "X-Priority-Tag"},
    {"header": [1]}, {"hasAttachment": "yes"}, {"minSize": -1}, {"maxSize": "10"},
    {"before": "2024-02-01"}, {"after": "yesterday"}, {"inMailboxOtherThan": "M1"},
    {"inMailbox": 5}, {"text": 5}, {"operator": "XOR", "conditions": []},
    {"operator": "AND"},
])
def test_email_query_malformed_filter_is_invalid_arguments(corpus, condition):
    assert corpus.acct.error("Email/query", filter=condition) == "invalidArguments"


@pytest.mark.parametrize("prop", ["hasKeyword", "allInThreadHaveKeyword",
                                  "someInThreadHaveKeyword"])
@pytest.mark.parametrize("keyword", [None, "bad keyword", 5], ids=["missing", "invalid", "int"])
def test_email_query_keyword_sort_needs_a_keyword(corpus, prop, keyword):
    # RFC 8621 §4.4.2: such a Comparator "MUST also have a keyword property".
    comparator = {"property": prop}
    if keyword is not None:
        comparator["keyword"] = keyword
    assert corpus.acct.error("Email/query", sort=[comparator]) == "invalidArguments"


@pytest.mark.parametrize("comparator", [
    {"property": "colour"}, {"property": "subject", "collation": "i;klingon"},
])
def test_email_query_unsupported_sort(corpus, comparator):
    assert corpus.acct.error("Email/query", sort=[comparator]) == "unsupportedSort"


# =============================================================================
# RFC 8621 §4.4.2: sorting
# =============================================================================


def _iso(text):
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


SORT_KEYS = {
    "receivedAt": lambda c, n: received(n),
    "size": lambda c, n: c.size[n],
    "from": lambda c, n: FROM_KEY[n].lower(),
    "to": lambda c, n: TO_KEY[n].lower(),
    "subject": lambda c, n: CORPUS[n][4].lower(),
    "sentAt": lambda c, n: _iso(CORPUS[n][5]),
    "hasKeyword": lambda c, n: "$flagged" in keywords(n),
    "allInThreadHaveKeyword": lambda c, n: all("$seen" in keywords(m) for m in thread_of(n)),
    "someInThreadHaveKeyword": lambda c, n: any("$flagged" in keywords(m)
                                                for m in thread_of(n)),
}
SORT_KEYWORD = {"hasKeyword": "$flagged", "allInThreadHaveKeyword": "$seen",
                "someInThreadHaveKeyword": "$flagged"}


def expected_order(corpus, key, descending, tiebreak_descending=False):
    """NAMES sorted by key, ties by receivedAt (Python's sort is stable)."""
    by_received = sorted(NAMES, key=received, reverse=tiebreak_descending)
    return sorted(by_received, key=lambda n: key(corpus, n), reverse=descending)


@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("prop", list(SORT_KEYS))
def test_email_query_sort(corpus, prop, descending):
    comparator = {"property": prop, "isAscending": not descending}
    if prop in SORT_KEYWORD:
        comparator["keyword"] = SORT_KEYWORD[prop]
    if prop in ("from", "to", "subject"):
        comparator["collation"] = "i;unicode-casemap"
    for tiebreak_descending in (False, True):
        sort = [comparator, {"property": "receivedAt", "isAscending": not tiebreak_descending}]
        assert corpus.run(sort=sort) == expected_order(
            corpus, SORT_KEYS[prop], descending, tiebreak_descending)


@pytest.mark.parametrize("prop", list(SORT_KEYS))
def test_email_query_sort_alone_is_stable(corpus, prop):
    # Ties (e.g. "from" of b and e, the Boolean sorts) are broken the same way every time
    # (RFC 8620 §5.5 "MUST be stable"), and the order respects the comparator.
    comparator = {"property": prop}
    if prop in SORT_KEYWORD:
        comparator["keyword"] = SORT_KEYWORD[prop]
    if prop in ("from", "to", "subject"):
        comparator["collation"] = "i;unicode-casemap"
    first = corpus.run(sort=[comparator])
    assert sorted(first) == NAMES
    keys = [SORT_KEYS[prop](corpus, n) for n in first]
    assert keys == sorted(keys)
    assert corpus.run(sort=[comparator]) == first
    assert corpus.run(sort=[comparator], position=2, limit=3) == first[2:5]


def test_email_query_sort_subject_is_base_subject(corpus):
    # "Re: Apple pie recipe" sorts as "Apple pie recipe", "Re: Cherry tart" as "Cherry tart".
    sort = [{"property": "subject", "collation": "i;ascii-casemap"}, {"property": "receivedAt"}]
    assert corpus.run(sort=sort) == ["a", "b", "c", "d", "e", "f", "g"]


@pytest.mark.parametrize("collation, expected", [
    ("i;ascii-casemap", "abcdefg"),
    ("i;unicode-casemap", "abcdefg"),
    ("i;octet", "abdefgc"),  # "banana bread": lower case sorts after upper case
])
def test_email_query_sort_subject_collations(corpus, collation, expected):
    sort = [{"property": "subject", "collation": collation}, {"property": "receivedAt"}]
    assert corpus.run(sort=sort) == list(expected)


def test_email_query_sort_sent_at_compares_instants_not_local_times(corpus):
    # f's Date is 13:00 +0800 (05:00Z), c's 12:00 -0500 (17:00Z): f was sent first.
    assert corpus.run(sort=[{"property": "sentAt"}]) == ["g", "f", "c", "d", "e", "a", "b"]


def test_email_query_sort_from_uses_name_else_email(corpus):
    sort = [{"property": "from", "collation": "i;ascii-casemap"}, {"property": "receivedAt"}]
    # Adam Smith (b, e), bob@example.net, Carol Jones, dave@example.com, Eve, Zoe Baker
    assert corpus.run(sort=sort) == ["b", "e", "c", "d", "g", "f", "a"]


def test_email_query_sort_to_missing_is_empty_string(corpus):
    sort = [{"property": "to", "collation": "i;ascii-casemap"}, {"property": "receivedAt"}]
    # "" (f, no To), Adam Smith (a, d), Carol Jones, Yann, Zed, Zoe Baker
    assert corpus.run(sort=sort) == ["f", "a", "d", "e", "c", "g", "b"]


def test_email_query_sort_rfc_8621_example(corpus):
    # §4.4.2: flagged threads first, then subject, then newest first.
    sort = [
        {"property": "someInThreadHaveKeyword", "keyword": "$flagged", "isAscending": False},
        {"property": "subject", "collation": "i;ascii-casemap"},
        {"property": "receivedAt", "isAscending": False},
    ]
    # flagged threads: {a, b} (b flagged), {f}; Apple pie (b newer than a), Date squares;
    # then banana bread, Cherry tart (e newer than d), Elderflower cordial.
    assert corpus.run(sort=sort) == ["b", "a", "f", "c", "e", "d", "g"]


def test_email_query_sort_keyword_is_case_insensitive(corpus):
    sort = [{"property": "hasKeyword", "keyword": "$FLAGGED", "isAscending": False},
            {"property": "receivedAt"}]
    assert corpus.run(sort=sort) == ["b", "f", "a", "c", "d", "e", "g"]


# =============================================================================
# RFC 8621 §4.4.3 collapseThreads with RFC 8620 §5.5 windowing
# =============================================================================


def collapse(names):
    seen, out = set(), []
    for n in names:
        thread = frozenset(thread_of(n))
        if thread not in seen:
            seen.add(thread)
            out.append(n)
    return out


NEWEST_FIRST = [{"property": "receivedAt", "isAscending": False}]


@pytest.mark.parametrize("sort", [
    NEWEST_FIRST, [{"property": "receivedAt"}], [{"property": "size"}],
    [{"property": "subject", "collation": "i;octet"}, {"property": "receivedAt",
                                                       "isAscending": False}],
], ids=["newest", "oldest", "size", "subject"])
def test_email_query_collapse_threads_first_position(corpus, sort):
    full = corpus.run(sort=sort)
    assert corpus.run(sort=sort, collapseThreads=True) == collapse(full)
    assert corpus.run(sort=sort, collapseThreads=False) == full


def test_email_query_collapse_threads_fixed_answers(corpus):
    assert corpus.run(sort=NEWEST_FIRST, collapseThreads=True) == ["g", "f", "e", "c", "b"]
    assert corpus.run(sort=[{"property": "receivedAt"}], collapseThreads=True) == \
        ["a", "c", "d", "f", "g"]


def test_email_query_collapse_threads_after_filter(corpus):
    # d is only in the Trash: in the Inbox, e stands for the thread {d, e}.
    inbox = {"inMailbox": corpus.acct.box["inbox"]}
    assert corpus.run(filter=inbox, sort=[{"property": "receivedAt"}],
                      collapseThreads=True) == ["a", "e", "f", "g"]


def window(corpus, **args):
    resp = corpus.acct.ok("Email/query", sort=NEWEST_FIRST, collapseThreads=True, **args)
    return resp["position"], corpus.names(resp["ids"]), resp.get("total"), resp


@pytest.mark.parametrize("args, position, names", [
    ({"position": 1, "limit": 2}, 1, "fe"),
    ({"position": 3}, 3, "cb"),
    ({"position": 5}, None, ""),
    ({"position": 50, "limit": 3}, None, ""),
    ({"position": -2}, 3, "cb"),
    ({"position": -50, "limit": 1}, 0, "g"),
    ({"limit": 0}, 0, ""),
    ({"anchor": "e"}, 2, "ecb"),
    ({"anchor": "e", "anchorOffset": -1, "limit": 2}, 1, "fe"),
    ({"anchor": "e", "anchorOffset": 2}, 4, "b"),
    ({"anchor": "e", "anchorOffset": 9}, None, ""),
    ({"anchor": "f", "anchorOffset": -5}, 0, "gfecb"),
    ({"anchor": "b", "position": 0, "limit": 1}, 4, "b"),  # position ignored with anchor
])
def test_email_query_collapse_threads_window_and_total(corpus, args, position, names):
    args = dict(args)
    if "anchor" in args:
        args["anchor"] = corpus.ids[args["anchor"]]
    got_position, got, total, resp = window(corpus, calculateTotal=True, **args)
    if position is None:  # past the end: ids is empty (RFC 8620 §5.5), position unspecified
        got_position = None
    assert (got_position, got, total) == (position, list(names), 5)
    assert "limit" not in resp  # the client's limit was used (RFC 8620 §5.5)


def test_email_query_total_only_when_asked(corpus):
    assert window(corpus)[2] is None
    assert window(corpus, calculateTotal=False)[2] is None
    resp = corpus.acct.ok("Email/query", calculateTotal=True)
    assert resp["total"] == len(NAMES)


def test_email_query_collapse_threads_anchor_hidden_by_collapse(corpus):
    # a is collapsed away behind b: it is not in the results (RFC 8620 §5.5 anchorNotFound).
    assert corpus.acct.error("Email/query", sort=NEWEST_FIRST, collapseThreads=True,
                             anchor=corpus.ids["a"]) == "anchorNotFound"
    assert corpus.acct.error("Email/query", anchor="e999999999") == "anchorNotFound"


def test_email_query_collapse_threads_total_matches_mailbox_total_threads(corpus):
    # §4.4: with only inMailbox, total is the Mailbox's totalEmails / totalThreads.
    acct = corpus.acct
    boxes = acct.ok("Mailbox/get", ids=[acct.box["inbox"], acct.box["archive"]])["list"]
    for box in boxes:
        for collapsed, count in ((False, "totalEmails"), (True, "totalThreads")):
            resp = acct.ok("Email/query", filter={"inMailbox": box["id"]},
                           collapseThreads=collapsed, calculateTotal=True)
            assert resp["total"] == box[count], (box, collapsed)


def test_email_query_limit_negative_is_invalid_arguments(corpus):
    assert corpus.acct.error("Email/query", limit=-1) == "invalidArguments"
    assert corpus.acct.error("Email/query", collapseThreads="yes") == "invalidArguments"


def in_request_order(responses):
    """RFC 8620 §5.1: /get may list objects in any order; put them in the ids' order."""
    out = []
    for i, (name, args, call_id) in enumerate(responses):
        if name.endswith("/get") and i > 0:
            args = dict(args)
            wanted = _get_ids(responses[i - 1])
            if wanted is not None:
                args["list"] = sorted(args["list"], key=lambda o: wanted.index(o["id"])
                                      if o["id"] in wanted else len(wanted))
        out.append([name, args, call_id])
    return out


def _get_ids(previous):
    name, args, _ = previous
    if name == "Email/query":
        return args["ids"]
    if name == "Email/get":
        return [e["threadId"] for e in args["list"]]
    if name == "Thread/get":
        return [i for t in args["list"] for i in t["emailIds"]]
    return None


def test_spec_8621_4_10_first_login_example(corpus):
    acct = corpus.acct
    inbox = acct.box["inbox"]
    resp = acct.client.request([
        ["Email/query", {"accountId": acct.id, "filter": {"inMailbox": inbox},
                         "sort": [{"isAscending": False, "property": "receivedAt"}],
                         "collapseThreads": True, "position": 0, "limit": 30,
                         "calculateTotal": True}, "0"],
        ["Email/get", {"accountId": acct.id,
                       "#ids": {"resultOf": "0", "name": "Email/query", "path": "/ids"},
                       "properties": ["threadId"]}, "1"],
        ["Thread/get", {"accountId": acct.id,
                        "#ids": {"resultOf": "1", "name": "Email/get",
                                 "path": "/list/*/threadId"}}, "2"],
        ["Email/get", {"accountId": acct.id,
                       "#ids": {"resultOf": "2", "name": "Thread/get",
                                "path": "/list/*/emailIds"},
                       "properties": ["threadId", "mailboxIds", "keywords", "hasAttachment",
                                      "from", "subject", "receivedAt", "size", "preview"]},
         "3"],
    ])["methodResponses"]
    ids, thread = corpus.ids, {}
    resp = in_request_order(resp)
    for entry in resp[1][1]["list"]:
        thread[corpus.names_of[entry["id"]]] = entry["threadId"]
    newest = ["g", "f", "e", "b"]  # Inbox: a b e f g; d (thread of e) is in the Trash
    members = {"g": ["g"], "f": ["f"], "e": ["d", "e"], "b": ["a", "b"]}
    full = resp[3][1]["list"]
    expect(resp[:3], [
        ["Email/query", {"accountId": acct.id, "queryState": Var("qs"),
                         "canCalculateChanges": True, "position": 0, "total": 4,
                         "ids": [ids[n] for n in newest]}, "0"],
        ["Email/get", {"accountId": acct.id, "state": Var("es"),
                       "list": [{"id": ids[n], "threadId": Var("t" + n)} for n in newest],
                       "notFound": []}, "1"],
        ["Thread/get", {"accountId": acct.id, "state": Var("ts"),
                        "list": [{"id": Var("t" + n), "emailIds": [ids[m] for m in members[n]]}
                                 for n in newest],
                        "notFound": []}, "2"],
    ])
    assert resp[3][0] == "Email/get" and resp[3][2] == "3"
    assert sorted(e["id"] for e in full) == sorted(ids[m] for n in newest for m in members[n])
    for email in full:
        name = corpus.names_of[email["id"]]
        assert email["mailboxIds"] == {corpus.acct.box[r]: True for r in CORPUS[name][1]}
        assert email["threadId"] == thread[next(n for n in newest if name in members[n])]
        assert email["keywords"] == dict.fromkeys(CORPUS[name][2], True)
        assert email["receivedAt"] == received(name)
        assert email["size"] == corpus.size[name]
        assert email["hasAttachment"] is False
        assert set(email) == {"id", "threadId", "mailboxIds", "keywords", "hasAttachment",
                              "from", "subject", "receivedAt", "size", "preview"}
    assert resp[3][1]["notFound"] == []


# =============================================================================
# RFC 8621 §4.5 / RFC 8620 §5.6: Email/queryChanges
# =============================================================================


def splice(old_ids, changes):
    """RFC 8620 §5.6: splice out "removed", splice in "added" by ascending index."""
    ids = [i for i in old_ids if i not in set(changes["removed"])]
    indexes = [a["index"] for a in changes["added"]]
    assert indexes == sorted(indexes), "added MUST be sorted by index"
    for item in changes["added"]:
        ids.insert(item["index"], item["id"])
    return ids


class Live:
    """An account whose mail changes, with a query cached as a client would."""

    def __init__(self, server):
        self.acct = new_account(server, "qchanges")
        self.parents = {}

    def thread_start(self, key, received_hours, mailboxes=("inbox",), keywords=()):
        msgid = unique() + "@test.example"
        self.parents[key] = (msgid, f"Topic {key} {unique('s')}")
        return self.acct.add(message(self.parents[key][1], msgid=msgid), mailboxes,
                             keywords, at(received_hours))

    def reply(self, key, received_hours, mailboxes=("inbox",), keywords=()):
        msgid, subject = self.parents[key]
        return self.acct.add(message("Re: " + subject, in_reply_to=msgid, references=[msgid]),
                             mailboxes, keywords, at(received_hours))

    def check(self, old, **query):
        """queryChanges since `old` (an Email/query response) replays to a fresh query."""
        fresh = self.acct.ok("Email/query", calculateTotal=True, **query)
        changes = self.acct.ok("Email/queryChanges", sinceQueryState=old["queryState"],
                               calculateTotal=True, **query)
        assert changes["oldQueryState"] == old["queryState"]
        assert changes["newQueryState"] == fresh["queryState"]
        assert changes["total"] == fresh["total"]
        assert splice(old["ids"], changes) == fresh["ids"]
        assert len({a["id"] for a in changes["added"]}) == len(changes["added"])
        return changes, fresh


QUERIES = {
    "inbox-newest": lambda live: dict(filter={"inMailbox": live.acct.box["inbox"]},
                                      sort=NEWEST_FIRST),
    "inbox-newest-collapsed": lambda live: dict(filter={"inMailbox": live.acct.box["inbox"]},
                                                sort=NEWEST_FIRST, collapseThreads=True),
    "all-oldest-collapsed": lambda live: dict(sort=[{"property": "receivedAt"}],
                                              collapseThreads=True),
    "flagged-threads-first": lambda live: dict(sort=[
        {"property": "someInThreadHaveKeyword", "keyword": "$flagged", "isAscending": False},
        {"property": "receivedAt", "isAscending": False}]),
    "flagged-threads-first-collapsed": lambda live: dict(sort=[
        {"property": "someInThreadHaveKeyword", "keyword": "$flagged", "isAscending": False},
        {"property": "receivedAt", "isAscending": False}], collapseThreads=True),
    "all-seen-threads-first": lambda live: dict(sort=[
        {"property": "allInThreadHaveKeyword", "keyword": "$seen", "isAscending": False},
        {"property": "receivedAt"}]),
    "subject-topic-oldest": lambda live: dict(filter={"subject": "topic"},
                                              sort=[{"property": "receivedAt"}]),
    "all-seen-threads": lambda live: dict(filter={"allInThreadHaveKeyword": "$seen"},
                                          sort=NEWEST_FIRST),
    "no-flagged-threads-collapsed": lambda live: dict(
        filter={"noneInThreadHaveKeyword": "$flagged"}, sort=NEWEST_FIRST,
        collapseThreads=True),
}


@pytest.fixture(scope="module")
def live(server):
    """Seed data for the queryChanges scenarios: threads A, B, C and D."""
    live = Live(server)
    live.thread_start("A", 10, keywords=["$seen"])
    live.reply("A", 20, keywords=["$seen"])
    live.thread_start("B", 30, keywords=["$seen"])
    live.thread_start("C", 40, mailboxes=["archive"], keywords=["$seen"])
    live.thread_start("D", 50)
    live.reply("D", 60, mailboxes=["archive"], keywords=["$seen"])
    return live


SCENARIOS = {
    # a newer reply in an existing thread: it becomes the thread's newest Email
    "reply-newest": lambda live: live.reply("A", 100 + next(_hours)),
    # an old reply arriving late: the thread's newest Email stays the same
    "reply-late-old": lambda live: live.reply("B", 31),
    # a reply that makes an unflagged thread flagged (keywords given at import)
    "reply-flagged": lambda live: live.reply("B", 100 + next(_hours), keywords=["$flagged"]),
    # a reply that makes an all-seen thread not all-seen
    "reply-unseen": lambda live: live.reply("A", 100 + next(_hours)),
    # a reply outside the Inbox into a thread that has an Inbox Email
    "reply-elsewhere": lambda live: live.reply("D", 100 + next(_hours), mailboxes=["archive"],
                                               keywords=["$flagged"]),
    # a new thread
    "new-thread": lambda live: live.thread_start(unique("N"), 100 + next(_hours)),
    # several at once
    "mixed": lambda live: (live.reply("C", 100 + next(_hours), keywords=["$seen"]),
                           live.thread_start(unique("N"), 5),
                           live.reply("B", 100 + next(_hours), mailboxes=["archive"])),
}
_hours = iter(range(1, 10_000))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("query", list(QUERIES))
def test_email_query_changes_replay_matches_fresh_query(live, query, scenario):
    args = QUERIES[query](live)
    old = live.acct.ok("Email/query", **args)
    SCENARIOS[scenario](live)
    live.check(old, **args)


def test_email_query_changes_reply_moves_thread_representative(server):
    # Collapsed newest first: the new reply replaces its thread's old representative.
    live = Live(server)
    first = live.thread_start("A", 1)
    other = live.thread_start("B", 2)
    args = dict(sort=NEWEST_FIRST, collapseThreads=True)
    old = live.acct.ok("Email/query", **args)
    assert old["ids"] == [other["id"], first["id"]]
    reply = live.reply("A", 3)
    changes, fresh = live.check(old, **args)
    assert fresh["ids"] == [reply["id"], other["id"]]
    assert first["id"] in changes["removed"]
    assert {"id": reply["id"], "index": 0} in changes["added"]
    # Not collapsed: the reply is simply added; nothing that was there is gone.
    plain = live.acct.ok("Email/query", sort=NEWEST_FIRST)
    newer = live.reply("B", 4)
    changes, fresh = live.check(plain, sort=NEWEST_FIRST)
    assert {"id": newer["id"], "index": 0} in changes["added"]


def test_email_query_changes_after_destroy(server):
    # RFC 8621 §4.10's second example: Emails destroyed (here by destroying their only
    # Mailbox, §2.5 onDestroyRemoveEmails) leave the results; a thread's next Email
    # takes over its collapsed place.
    live = Live(server)
    doomed = live.acct.mailbox("Doomed")
    live.thread_start("A", 1)
    live.reply("A", 2, mailboxes=[doomed])
    gone = live.thread_start("B", 3, mailboxes=[doomed])
    live.thread_start("C", 4)
    both = live.thread_start("D", 5, mailboxes=["inbox", doomed])  # survives, in fewer boxes
    queries = [dict(sort=NEWEST_FIRST, collapseThreads=True), dict(sort=NEWEST_FIRST),
               dict(filter={"inMailboxOtherThan": [live.acct.box["inbox"]]}, sort=NEWEST_FIRST)]
    olds = [live.acct.ok("Email/query", **q) for q in queries]
    live.acct.destroy_mailbox(doomed)
    for q, old in zip(queries, olds):
        changes, fresh = live.check(old, **q)
        assert gone["id"] in changes["removed"]
        assert gone["id"] not in fresh["ids"]
        assert both["id"] in fresh["ids"] or both["id"] in changes["removed"]


def test_email_query_changes_nothing_changed(live):
    args = QUERIES["inbox-newest-collapsed"](live)
    old = live.acct.ok("Email/query", **args)
    changes = live.acct.ok("Email/queryChanges", sinceQueryState=old["queryState"], **args)
    assert changes == {"accountId": live.acct.id, "oldQueryState": old["queryState"],
                       "newQueryState": old["queryState"], "removed": [], "added": []}


def test_email_query_changes_max_changes(server):
    live = Live(server)
    live.thread_start("A", 1)
    args = dict(sort=NEWEST_FIRST)
    old = live.acct.ok("Email/query", **args)
    live.thread_start("B", 2)
    live.thread_start("C", 3)  # two additions: two changes
    since = old["queryState"]
    assert live.acct.error("Email/queryChanges", sinceQueryState=since, maxChanges=1,
                           **args) == "tooManyChanges"
    changes = live.acct.ok("Email/queryChanges", sinceQueryState=since, maxChanges=2, **args)
    assert len(changes["added"]) + len(changes["removed"]) <= 2
    assert splice(old["ids"], changes) == live.acct.query(**args)


def test_email_query_changes_up_to_id_accepted(live):
    # The filter is on mailboxIds (mutable): upToId must be ignored (RFC 8620 §5.6), so the
    # whole cached list still replays.
    args = QUERIES["inbox-newest"](live)
    old = live.acct.ok("Email/query", **args)
    live.reply("A", 100 + next(_hours))
    live.thread_start(unique("N"), 1)  # sorts last: after upToId
    changes = live.acct.ok("Email/queryChanges", sinceQueryState=old["queryState"],
                           upToId=old["ids"][0], **args)
    assert splice(old["ids"], changes) == live.acct.query(**args)
    # Immutable sort and no filter: changes after upToId may be left out, those before not.
    args = dict(sort=NEWEST_FIRST)
    old = live.acct.ok("Email/query", **args)
    newest = live.thread_start(unique("N"), 100 + next(_hours))
    changes = live.acct.ok("Email/queryChanges", sinceQueryState=old["queryState"],
                           upToId=old["ids"][1], **args)
    assert {"id": newest["id"], "index": 0} in changes["added"]


def test_email_query_changes_bad_state(live):
    args = QUERIES["inbox-newest"](live)
    for state in ("not-a-state", "999999999"):
        assert live.acct.error("Email/queryChanges", sinceQueryState=state,
                               **args) == "cannotCalculateChanges"


def test_email_query_changes_same_errors_as_query(live):
    acct = live.acct
    state = acct.ok("Email/query")["queryState"]
    assert acct.error("Email/queryChanges", sinceQueryState=state,
                      filter={"colour": "red"}) == "unsupportedFilter"
    assert acct.error("Email/queryChanges", sinceQueryState=state,
                      filter={"hasKeyword": "a b"}) == "invalidArguments"
    assert acct.error("Email/queryChanges", sinceQueryState=state,
                      sort=[{"property": "hasKeyword"}]) == "invalidArguments"
    assert acct.error("Email/queryChanges", sinceQueryState=state,
                      sort=[{"property": "colour"}]) == "unsupportedSort"
