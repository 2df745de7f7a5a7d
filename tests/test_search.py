"""Full-text search and SearchSnippet/get (jmapd §7.8 SEARCH, §7.5 SEARCHSNIPPET).

RFC 8621 §4.4.1 string matching through Email/query's text/from/to/cc/bcc/subject/body
conditions: searchable as soon as Email/import returns (even later in the same request),
every word must match, quoted phrases with backslash escapes, case- and
diacritics-insensitive matching, HTML markup (tags, attributes, <head>, <style>,
<script>) not searched but alt/title text searched, RFC 2047 encoded words decoded,
names and addresses in address fields, destroyed Emails (RFC 8621 §2.5
onDestroyRemoveEmails) no longer found. RFC 8621 §5 SearchSnippet/get and its §5.2
example: <mark> around the terms, HTML-escaped text, null when a field does not match,
the 255-octet preview bound, notFound, requestTooLarge, and filter errors as Email/query.
"""

import base64

import pytest

from test_generic import Var, expect
from test_thread import message, new_account, unique


def b_word(text, charset="UTF-8"):
    """An RFC 2047 "B" encoded word."""
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode('ascii')}?="


HTML_PAGE = """<!DOCTYPE html><html><head><title>headtitleword</title>
<style type="text/css">.hiddenstyleword { color: red }</style></head>
<body><p class="classattrword" style="fontsizeword: 12px"><span>Visible gardening notes
</span></p><script>var scriptword = 1;</script>
<img src="flower.png" alt="sunflowerword" title="tooltipword"></body></html>"""

CORPUS = {
    "fox1": dict(subject="Fox report", text="Yesterday the quick brown fox jumped."),
    "fox2": dict(subject="Another fox", text="Today the brown quick fox slept."),
    "cafe": dict(subject="Menu", text="Le caf\u00e9 cr\u00e8me est pr\u00eat."),
    "resume": dict(subject="Jobs", text="Please send your resume today."),
    "html": dict(subject="Garden", text=None, html=HTML_PAGE),
    "alternative": dict(subject="Versions", text="The plain version of the letter.",
                        html="<p>The plain version of the letter, with htmlonlyword.</p>"),
    "attached": dict(subject="Notes", text="See the attached notes.",
                     attachments=[("notes.txt", "text/plain", b"attachmentword inside")]),
    "encoded": dict(subject=b_word("Gr\u00fc\u00dfe aus M\u00fcnchen"),
                    from_="=?ISO-8859-1?Q?Andr=E9_Dupont?= <andre@example.fr>",
                    to="=?UTF-8?Q?J=C3=B6rg?= <joerg@example.de>", text="Servus."),
    "people": dict(subject="Meeting", from_="Quentin Quarry <quentin@quarry.example>",
                   to="Rita Rivers <rita@rivers.example>", cc="Sam Stone <sam@stone.example>",
                   bcc="Tina Tide <tina@tide.example>", text="Agenda attached."),
    "quotes": dict(subject="Sayings", text='He said "hello world" loudly. Don\'t worry '
                                            "about the panic, it is o'clock somewhere."),
    # RFC 8621 §5.2 example
    "nofoo": dict(subject="Weekly report", text="Nothing much happened."),
    "foosubject": dict(subject="The Foo competition",
                       text="This year the foo competition will be held in the Stadium de "
                            "France, as every year."),
    "foobody": dict(subject="Widget results",
                    text="In the end the Foo/bar method results often returns <1 widget "
                         "rather than the complete set."),
    "markup": dict(subject="Use <b> tags & more", text="Escaping tags & entities."),
    "long": dict(subject="Repeats", text="foo " * 300),
    "longutf8": dict(subject="Umlauts", text="f\u00f6\u00f6 \u00e4\u00e4 " * 200),
    "htmlsnippet": dict(subject="Zoo", text=None,
                        html="<p>Hello <b>bold</b> world, the zebra &amp; friends.</p>"),
    "cafesubject": dict(subject="Caf\u00e9 opening hours", text="We open at nine."),
    "strasse": dict(subject="Stra\u00dfe closed", text="Die Stra\u00dfe ist gesperrt."),
    "linebreak": dict(subject="Bears", text="Look: the quick\r\nbrown bear."),
}


class Search:
    def __init__(self, acct):
        self.acct = acct
        items = {name: acct.item(message(**args)) for name, args in CORPUS.items()}
        created = acct.add_many(items)
        self.ids = {name: created[name]["id"] for name in CORPUS}
        self.names_of = {v: k for k, v in self.ids.items()}

    def find(self, **condition):
        """The names of the Emails matching one FilterCondition, as a set."""
        return {self.names_of[i] for i in self.acct.query(filter=condition)}

    def snippets(self, names, **condition):
        resp = self.acct.ok("SearchSnippet/get", filter=condition or None,
                            emailIds=[self.ids[n] for n in names])
        assert not resp["notFound"], resp
        assert sorted(s["emailId"] for s in resp["list"]) == sorted(self.ids[n] for n in names)
        return {self.names_of[s["emailId"]]: s for s in resp["list"]}

    def snippet(self, name, **condition):
        found = self.snippets([name], **condition)[name]
        return found["subject"], found["preview"]


@pytest.fixture(scope="module")
def search(server):
    return Search(new_account(server, "search"))


# =============================================================================
# RFC 8621 §4.4.1: what the text conditions find
# =============================================================================


def test_search_same_request_as_import(server):
    acct = new_account(server, "searchnow")
    word = "zanzibar" + unique("w").replace("x", "")
    item = acct.item(message("Hello", text=f"A word: {word}."))
    resp = acct.client.request([
        ["Email/import", {"accountId": acct.id, "emails": {"k": item}}, "0"],
        ["Email/query", {"accountId": acct.id, "filter": {"text": word}}, "1"],
        ["Email/query", {"accountId": acct.id, "filter": {"body": word}}, "2"],
    ])["methodResponses"]
    created = resp[0][1]["created"]["k"]["id"]
    assert resp[1][1]["ids"] == [created]
    assert resp[2][1]["ids"] == [created]


@pytest.mark.parametrize("text, expected", [
    ("quick", {"fox1", "fox2", "linebreak"}),
    ("quick brown fox", {"fox1", "fox2"}),  # every word, anywhere
    ("fox   brown quick", {"fox1", "fox2"}),
    ("quick jumped", {"fox1"}),
    ("quick zebra", set()),  # every word must match
    ("fox report", {"fox1"}),  # subject and body words together
])
def test_search_words_must_all_match(search, text, expected):
    assert search.find(text=text) == expected


@pytest.mark.parametrize("text, expected", [
    ('"quick brown"', {"fox1", "linebreak"}),  # a line break is white space
    ("'quick brown'", {"fox1", "linebreak"}),
    ('"brown quick"', {"fox2"}),
    ('"quick brown" slept', set()),
    ('"quick brown" jumped', {"fox1"}),
    ('"quick brown" bear', {"linebreak"}),
    ('"brown fox"', {"fox1"}),
    ('"quick fox"', {"fox2"}),
    ('"fox brown"', set()),
    ('"said \\"hello world"', {"quotes"}),  # \" inside a phrase is a quote (§4.4.1)
    ('"hello world" loudly', {"quotes"}),
    ('"world hello"', set()),
])
def test_search_quoted_phrases(search, text, expected):
    assert search.find(text=text) == expected


def test_search_apostrophe_is_not_a_phrase(search):
    assert search.find(text="don't panic") == {"quotes"}


@pytest.mark.parametrize("condition", [
    {"text": "QUICK Brown"}, {"body": "qUiCk"}, {"subject": "FOX"}, {"text": '"QUICK BROWN"'},
])
def test_search_is_case_insensitive(search, condition):
    assert search.find(**condition) >= {"fox1"}


@pytest.mark.parametrize("text, expected", [
    ("cafe", {"cafe", "cafesubject"}), ("CAF\u00c9", {"cafe", "cafesubject"}),
    ("caf\u00e9 creme", {"cafe"}), ("pret", {"cafe"}),
    ("r\u00e9sum\u00e9", {"resume"}), ("muenchen", set()),
])
def test_search_ignores_diacritics(search, text, expected):
    assert search.find(text=text) == expected


@pytest.mark.parametrize("word", ["gardening", "visible", "notes"])
def test_search_html_text_is_searched(search, word):
    assert "html" in search.find(body=word)
    assert "html" in search.find(text=word)


@pytest.mark.parametrize("word", [
    "span", "class", "classattrword", "style", "fontsizeword", "hiddenstyleword", "color",
    "headtitleword", "title", "scriptword", "var", "img", "src", "flower", "png", "html",
    "doctype", "body",
])
def test_search_html_markup_is_not_searched(search, word):
    # Tags, attribute names and values, <head>, CSS and JavaScript (§4.4.1).
    assert "html" not in search.find(body=word)
    assert "html" not in search.find(text=word)


@pytest.mark.parametrize("word", ["sunflowerword", "tooltipword"])
def test_search_html_alt_and_title_are_searched(search, word):
    assert search.find(body=word) == {"html"}


def test_search_html_alternative_is_searched(search):
    assert search.find(body="htmlonlyword") == {"alternative"}


def test_search_text_attachment_is_searched(search):
    assert search.find(text="attachmentword") == {"attached"}


@pytest.mark.parametrize("condition, expected", [
    ({"subject": "m\u00fcnchen"}, {"encoded"}),
    ({"subject": "Gr\u00fc\u00dfe"}, {"encoded"}),
    ({"subject": "munchen"}, {"encoded"}),
    ({"text": "m\u00fcnchen"}, {"encoded"}),
    ({"subject": "UTF"}, set()),  # the encoded form is not what is searched
    ({"text": "R3L"}, set()),  # start of the base64 text
    ({"from": "andr\u00e9"}, {"encoded"}),
    ({"from": "andre dupont"}, {"encoded"}),
    ({"from": "ISO"}, set()),
    ({"to": "j\u00f6rg"}, {"encoded"}),
    ({"to": "joerg@example.de"}, {"encoded"}),
])
def test_search_encoded_words_are_decoded(search, condition, expected):
    assert search.find(**condition) == expected


@pytest.mark.parametrize("field, person, domain", [
    ("from", "quentin", "quarry.example"), ("to", "rita", "rivers.example"),
    ("cc", "sam", "stone.example"), ("bcc", "tina", "tide.example"),
])
def test_search_address_fields_names_and_addresses(search, field, person, domain):
    surname = {"quentin": "Quarry", "rita": "Rivers", "sam": "Stone", "tina": "Tide"}[person]
    for value in (person, person.upper(), f"{person} {surname}", domain,
                  f"{person}@{domain}"):
        assert search.find(**{field: value}) == {"people"}, value
        assert search.find(text=value) == {"people"}, value
    for other in ("from", "to", "cc", "bcc"):
        if other != field:
            assert search.find(**{other: person}) == set(), other


def test_search_text_under_operators(search):
    everything = set(CORPUS)
    assert search.find(operator="NOT", conditions=[{"text": "fox"}]) == \
        everything - {"fox1", "fox2"}
    assert search.find(operator="OR", conditions=[{"text": "jumped"}, {"body": "bear"}]) == \
        {"fox1", "linebreak"}
    assert search.find(operator="AND", conditions=[{"subject": "fox"}, {"body": "slept"}]) == \
        {"fox2"}
    assert search.find(operator="NOT", conditions=[{"body": "quick"}, {"subject": "foo"}]) == \
        everything - {"fox1", "fox2", "linebreak", "foosubject"}


def test_search_subject_and_body_are_separate(search):
    assert search.find(subject="competition") == {"foosubject"}
    assert search.find(body="competition") == {"foosubject"}
    assert search.find(subject="widget") == {"foobody"}
    assert search.find(body="results") == {"foobody"}
    assert search.find(subject="stadium") == set()
    assert search.find(body="weekly") == set()
    assert search.find(body="quentin") == set()


def test_search_destroyed_email_is_not_found(server):
    acct = new_account(server, "searchgone")
    doomed = acct.mailbox("Doomed")
    word = "quokka" + unique("w").replace("x", "")
    only = acct.add(message("Gone soon", text=f"{word} alone"), mailboxes=[doomed])
    kept = acct.add(message("Stays", text=f"{word} kept"), mailboxes=[doomed, "inbox"])
    assert set(acct.query(filter={"text": word})) == {only["id"], kept["id"]}
    acct.destroy_mailbox(doomed)
    assert acct.query(filter={"text": word}) == [kept["id"]]
    assert acct.query(filter={"body": "alone"}) == []
    resp = acct.ok("SearchSnippet/get", filter={"text": word}, emailIds=[only["id"]])
    assert (resp["list"], resp["notFound"]) == ([], [only["id"]])


# =============================================================================
# RFC 8621 §5: SearchSnippet/get
# =============================================================================


def test_spec_8621_5_2_search_snippet_example(search):
    names = ["nofoo", "foosubject", "foobody"]
    resp = search.acct.client.request([["SearchSnippet/get", {
        "accountId": search.acct.id, "filter": {"text": "foo"},
        "emailIds": [search.ids[n] for n in names]}, "0"]])["methodResponses"]
    resp[0][1]["list"].sort(key=lambda s: [search.ids[n] for n in names].index(s["emailId"]))
    bound = expect(resp, [["SearchSnippet/get", {
        "accountId": search.acct.id,
        "list": [
            {"emailId": search.ids["nofoo"], "subject": None, "preview": None},
            {"emailId": search.ids["foosubject"], "subject": "The <mark>Foo</mark> competition",
             "preview": Var("preview1")},
            {"emailId": search.ids["foobody"], "subject": None, "preview": Var("preview2")},
        ],
        "notFound": None,
    }, "0"]])
    assert "year the <mark>foo</mark> competition will be held" in bound["preview1"]
    assert "the <mark>Foo</mark>/bar method results often returns &lt;1 widget" in \
        bound["preview2"]


def test_search_snippet_example_without_not_found(search):
    # The §5.2 example with notFound left out: marks, escaping, nulls.
    got = search.snippets(["nofoo", "foosubject", "foobody"], text="foo")
    assert (got["nofoo"]["subject"], got["nofoo"]["preview"]) == (None, None)
    assert got["foosubject"]["subject"] == "The <mark>Foo</mark> competition"
    assert "year the <mark>foo</mark> competition will be held" in got["foosubject"]["preview"]
    assert got["foobody"]["subject"] is None
    assert "the <mark>Foo</mark>/bar method results often returns &lt;1 widget" in \
        got["foobody"]["preview"]
    assert set(got["foobody"]) == {"emailId", "subject", "preview"}  # no "id" (§5)


def test_search_snippet_subject_is_html_escaped(search):
    subject, preview = search.snippet("markup", text="tags")
    assert subject == "Use &lt;b&gt; <mark>tags</mark> &amp; more"
    assert preview == "Escaping <mark>tags</mark> &amp; entities."


@pytest.mark.parametrize("condition, subject, preview", [
    ({"text": "competition"}, "The Foo <mark>competition</mark>", True),
    ({"subject": "competition"}, "The Foo <mark>competition</mark>", None),
    ({"text": "stadium"}, None, True),
    ({"text": "Foo competition"}, "The <mark>Foo</mark> <mark>competition</mark>", True),
    ({"text": '"the foo"'}, "<mark>The Foo</mark> competition", True),
    ({"text": "france"}, None, True),
    ({"text": "zebra"}, None, False),
])
def test_search_snippet_marks_terms_or_null(search, condition, subject, preview):
    # preview: True = marked, False = null, None = either (a subject-only condition)
    got_subject, got_preview = search.snippet("foosubject", **condition)
    assert got_subject == subject
    if preview is not None:
        assert (got_preview is not None) == preview
    if got_preview is not None:
        assert "<mark>" in got_preview and "</mark>" in got_preview


def test_search_snippet_marks_every_term_in_preview(search):
    _, preview = search.snippet("fox1", text="quick fox")
    assert preview == "Yesterday the <mark>quick</mark> brown <mark>fox</mark> jumped."
    _, preview = search.snippet("fox1", text='"quick brown"')
    assert preview == "Yesterday the <mark>quick brown</mark> fox jumped."


def test_search_snippet_html_body_is_plain_text(search):
    subject, preview = search.snippet("htmlsnippet", text="zebra")
    assert subject is None
    assert "<mark>zebra</mark>" in preview
    assert "Hello bold world" in preview and "&amp; friends" in preview
    assert "<b>" not in preview and "&lt;b&gt;" not in preview and "<p>" not in preview


@pytest.mark.parametrize("name, term", [("long", "foo"), ("longutf8", "f\u00f6\u00f6")])
def test_search_snippet_preview_at_most_255_octets(search, name, term):
    _, preview = search.snippet(name, text=term)
    assert preview is not None and f"<mark>{term}</mark>" in preview
    assert len(preview.encode("utf-8")) <= 255


def test_search_snippet_marks_diacritics_insensitive_matches(search):
    assert search.find(text="cafe") >= {"cafesubject"}
    subject, _ = search.snippet("cafesubject", text="cafe")
    assert subject == "<mark>Caf\u00e9</mark> opening hours"


def test_search_snippet_marks_words_with_sharp_s(search):
    assert search.find(text="Stra\u00dfe") == {"strasse"}
    subject, preview = search.snippet("strasse", text="Stra\u00dfe")
    assert subject == "<mark>Stra\u00dfe</mark> closed"
    assert preview == "Die <mark>Stra\u00dfe</mark> ist gesperrt."


def test_search_snippet_phrase_across_line_break(search):
    assert search.find(text='"quick brown"') == {"fox1", "linebreak"}
    _, preview = search.snippet("linebreak", text='"quick brown"')
    assert preview is not None and "<mark>" in preview


def test_search_snippet_without_text_is_null(search):
    got = search.snippets(["foosubject"])["foosubject"]
    assert (got["subject"], got["preview"]) == (None, None)
    got = search.snippets(["foosubject"], hasAttachment=False)["foosubject"]
    assert (got["subject"], got["preview"]) == (None, None)


def test_search_snippet_not_found(search):
    resp = search.acct.ok("SearchSnippet/get", filter={"text": "foo"},
                          emailIds=[search.ids["foosubject"], "e999999999", "f123u4"])
    assert [s["emailId"] for s in resp["list"]] == [search.ids["foosubject"]]
    assert sorted(resp["notFound"]) == ["e999999999", "f123u4"]


def test_search_snippet_other_accounts_email_not_found(search, server):
    other = new_account(server, "searchother")
    resp = other.ok("SearchSnippet/get", filter={"text": "foo"},
                    emailIds=[search.ids["foosubject"]])
    assert (resp["list"], resp["notFound"]) == ([], [search.ids["foosubject"]])


@pytest.mark.parametrize("condition", [
    {"colour": "red"}, {"hasKeyword": "bad keyword"}, {"header": []},
    {"operator": "NOT", "conditions": [{"madeUp": 1}]}, {"text": 7},
    {"inMailbox": 5}, {"operator": "XOR", "conditions": []},
])
def test_search_snippet_filter_errors_as_email_query(search, condition):
    query_error = search.acct.error("Email/query", filter=condition)
    assert query_error in ("unsupportedFilter", "invalidArguments")
    snippet_error = search.acct.error("SearchSnippet/get", filter=condition,
                                      emailIds=[search.ids["foosubject"]])
    assert snippet_error == query_error


def test_search_snippet_request_too_large(search):
    limit = search.acct.client.session["capabilities"]["urn:ietf:params:jmap:core"][
        "maxObjectsInGet"]
    ids = [search.ids["foosubject"]] + [f"e{900000000 + i}" for i in range(limit - 1)]
    resp = search.acct.ok("SearchSnippet/get", filter={"text": "foo"}, emailIds=ids)
    assert len(resp["list"]) == 1 and len(resp["notFound"]) == limit - 1
    assert search.acct.error("SearchSnippet/get", filter={"text": "foo"},
                             emailIds=ids + ["e1"]) == "requestTooLarge"


def test_search_snippet_arguments_checked(search):
    assert search.acct.error("SearchSnippet/get", filter={"text": "foo"}) == "invalidArguments"
    assert search.acct.error("SearchSnippet/get", emailIds="e1") == "invalidArguments"
