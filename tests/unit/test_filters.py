"""Every filter operator and expression form, valid and invalid, and how the index files them."""

from __future__ import annotations

import re

import pytest

from router.events import Event
from router.filters import FilterError, compile_filter
from router.index import SubscriptionIndex
from router.plugins import Subscription

EVENT = Event(id="e1", source="/swift/AUTH_p", type="org.openstack.swift.object.put", subject="photos/cat.jpg",
              data={"size": 2048, "object": {"name": "cat.jpg", "tags": ["a", "b"]}, "flag": True, "ratio": "0.5"},
              extensions={"container": "photos", "projectid": "p1", "count": "7", "sourcekind": "swift"})


@pytest.mark.parametrize("filters, expected", [
    ({"container": "photos"}, True),
    ({"container": "docs"}, False),
    ({"subject": {"prefix": "photos/"}}, True),
    ({"subject": {"prefix": "docs/"}}, False),
    ({"subject": {"suffix": ".jpg"}}, True),
    ({"subject": {"suffix": ".png"}}, False),
    ({"subject": {"glob": "photos/*.jpg"}}, True),
    # Regression: `*` crossed `/` (fnmatch), so "*.jp?" matched "photos/cat.jpg". Now `*` stays
    # within a path segment and `**` crosses segments, as in .gitignore globs.
    ({"subject": {"glob": "*.jp?"}}, False),
    ({"subject": {"glob": "**.jp?"}}, True),
    ({"subject": {"glob": "*/*.jp?"}}, True),
    ({"subject": {"glob": "**/cat.jpg"}}, True),
    ({"subject": {"glob": "photos/**/cat.jpg"}}, True),
    ({"subject": {"glob": "p?otos/c[a-c]t.jpg"}}, True),
    ({"subject": {"glob": "photos?cat.jpg"}}, False),
    ({"subject": {"glob": "photos[/]cat.jpg"}}, False),
    ({"subject": {"glob": "photos/[!c]at.jpg"}}, False),
    # Regression: one attribute could carry only one operator. Several all hold.
    ({"data.size": {"gte": 1, "lt": 4096}}, True),
    ({"data.size": {"gte": 1, "lt": 2048}}, False),
    ({"data.size": {"gt": 2048, "lt": 9999}}, False),
    ({"subject": {"prefix": "photos/", "suffix": ".jpg"}}, True),
    ({"subject": {"prefix": "photos/", "suffix": ".png"}}, False),
    ({"data.size": {"gte": 1, "bogus": 2}}, None),
    ({"data.size": {}}, None),
    ({"subject": {"glob": "photos/*.png"}}, False),
    ({"data.size": {"gt": 1024}}, True),
    ({"data.size": {"gt": 2048}}, False),
    ({"data.size": {"gte": 2048}}, True),
    ({"data.size": {"lt": 4096}}, True),
    ({"data.size": {"lte": 2047}}, False),
    ({"count": {"gt": 5}}, True),  # extension attributes travel as strings: compared as numbers
    ({"count": 7}, True),
    ({"data.ratio": {"lt": 1}}, True),
    ({"data.object.name": "cat.jpg"}, True),
    ({"data.object.tags.1": "b"}, True),
    ({"data.missing": {"exists": False}}, True),
    ({"data.size": {"exists": True}}, True),
    ({"partitionkey": {"exists": True}}, False),
    ({"container": {"in": ["docs", "photos"]}}, True),
    ({"container": {"in": ["docs"]}}, False),
    ({"container": {"ne": "docs"}}, True),
    ({"container": {"ne": "photos"}}, False),
    ({"nothere": {"ne": "x"}}, False),  # a missing attribute is not "not equal": it is absent
    ({"container": {"eq": "photos"}}, True),
    ({"data.flag": True}, True),
    ({"data.size": {"gt": "abc"}}, None),
    ({"container": "photos", "subject": {"suffix": ".jpg"}, "data.size": {"gte": 1}}, True),
    ({"container": "photos", "subject": {"suffix": ".png"}}, False),
])
def test_operators(filters, expected):
    if expected is None:
        with pytest.raises(FilterError):
            compile_filter(filters)
        return
    assert compile_filter(filters).matches(EVENT) is expected


@pytest.mark.parametrize("expression, expected", [
    ("container = 'photos'", True),
    ("container = 'photos' AND data.size > 1000", True),
    ("container = 'docs' OR data.size > 1000", True),
    ("container = 'docs' OR data.size > 4096", False),
    ("NOT container = 'docs'", True),
    ("subject LIKE 'photos/%.jpg'", True),
    ("subject LIKE 'photos/___.jpg'", True),
    ("subject LIKE 'photos/__.jpg'", False),
    ("subject NOT LIKE '%.png'", True),
    ("container IN ('a', 'photos')", True),
    ("container NOT IN ('a', 'photos')", False),
    ("EXISTS data.size AND NOT EXISTS data.nope", True),
    ("(container = 'docs' OR container = 'photos') AND (data.size >= 2048)", True),
    ("data.size <> 2048", False),
    ("data.size != 1", True),
    ("data.flag = TRUE", True),
    ("type = 'org.openstack.swift.object.put' and subject like '%cat%'", True),  # keywords in any case
    ("data.note = 'it''s'", False),
    ({"all": [{"container": "photos"}, {"any": [{"subject": {"suffix": ".png"}}, {"data.size": {"gt": 1}}]}]}, True),
    ({"not": {"container": "photos"}}, False),
    ({"any": [{"container": "x"}, {"container": "y"}]}, False),
])
def test_expressions(expression, expected):
    assert compile_filter(None, expression).matches(EVENT) is expected


@pytest.mark.parametrize("filters, expression, fault", [
    (["container"], None, "filters must be an object"),
    ({"Container": "x"}, None, "'Container' is not an attribute name"),
    ({"a" * 21: "x"}, None, "is not an attribute name"),
    ({"data.": "x"}, None, "is not an attribute name"),
    ({"container": {"around": "x"}}, None, "unknown operator 'around'"),
    ({"container": {"prefix": "a", "bad": "b"}}, None, "filters.container.bad: unknown operator 'bad'"),
    ({"container": {}}, None, "a condition is a value or an object of operators"),
    ({"container": {"prefix": ""}}, None, "prefix takes a non-empty string"),
    ({"container": {"in": []}}, None, "in takes a non-empty list"),
    ({"container": {"exists": "yes"}}, None, "exists takes true or false"),
    ({"container": {"eq": ["x"]}}, None, "eq compares with"),
    ({"container": [1, 2]}, None, "a condition is a value"),
    (None, "", None),
    (None, "container =", "expected value, found the end"),
    (None, "container = 'x' AND", "expected an attribute name"),
    (None, "container 'x'", "expected a comparison"),
    (None, "(container = 'x'", "expected ), found the end"),
    (None, "container = 'x')", "unexpected ')'"),
    (None, "data.size > 'big'", "> needs a number"),
    (None, "container = 'x' # comment", "unexpected character '#'"),
    (None, "subject LIKE 5", "LIKE takes a quoted pattern"),
    (None, {"all": []}, "filter.all takes a non-empty list"),
    (None, {"all": [{"container": {"bad": 1}}]}, "filter.all[0].container: unknown operator"),
    (None, "   ", "the expression is empty"),
])
def test_invalid_filters_name_the_fault(filters, expression, fault):
    if fault is None:
        assert compile_filter(filters, expression).matches(EVENT)
        return
    with pytest.raises(FilterError, match=fault.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        compile_filter(filters, expression)


def sub(id_, filters=None, expression=None, types=()):
    return Subscription(id=id_, project_id="p1", source="swift", filters=filters or {}, types=types,
                        options={"filter": expression} if expression else {})


def test_index_files_each_subscription_under_its_most_selective_condition():
    index = SubscriptionIndex([
        sub("exact", {"container": "photos", "subject": {"suffix": ".jpg"}}),
        sub("prefix", {"subject": {"prefix": "photos/"}}),
        sub("suffix", {"subject": {"suffix": "cat.jpg"}}),
        sub("glob-prefix", {"subject": {"glob": "photos/c*.jpg"}}),
        sub("glob-suffix", {"subject": {"glob": "*/cat.jpg"}}),
        sub("expression", expression="container = 'photos' AND data.size > 100"),
        sub("any", expression="container = 'x' OR container = 'photos'"),
        sub("typed", types=("org.openstack.swift.object.put",)),
        sub("numeric-only", {"data.size": {"gt": 100}}),
        sub("miss-prefix", {"subject": {"prefix": "docs/"}}),
        sub("miss-exact", {"container": "docs"}),
        sub("miss-type", types=("org.openstack.swift.object.delete",)),
    ])
    matched = sorted(s.id for s in index.match(EVENT))
    assert matched == ["any", "exact", "expression", "glob-prefix", "glob-suffix", "numeric-only", "prefix", "suffix", "typed"]
    slots = {e.sub.id: e.slot[0] for e in index._entries.values()}
    assert slots["exact"] == "eq" and slots["prefix"] == "prefix" and slots["suffix"] == "suffix"
    assert slots["glob-prefix"] == "prefix" and slots["glob-suffix"] == "suffix" and slots["expression"] == "eq"
    assert slots["typed"] == "types" and slots["any"] == "rest" and slots["numeric-only"] == "rest"
    for id_ in list(slots):
        index.remove(id_)
    assert index.match(EVENT) == [] and len(index) == 0
    bucket = index._buckets["swift"]
    assert not bucket.exact and not bucket.prefix and not bucket.suffix and not bucket.by_type and not bucket.rest


def test_exact_index_matches_numbers_by_value():
    index = SubscriptionIndex([sub("n", {"count": 7}), sub("s", {"count": "7"})])
    assert sorted(s.id for s in index.match(EVENT)) == ["n", "s"]


def test_a_broken_row_is_left_out_and_the_rest_still_route():
    index = SubscriptionIndex()
    index.replace_all([sub("bad", {"container": {"nope": 1}}), sub("good", {"container": "photos"})])
    assert [s.id for s in index.match(EVENT)] == ["good"]


@pytest.mark.parametrize("filters, decided", [
    ({"container": "photos"}, True),
    ({"subject": {"prefix": "photos/"}}, True),
    ({"subject": {"suffix": ".jpg"}}, True),
    ({"count": "7"}, False),  # number-like: the index compares loosely, the filter strictly
    ({"count": 7}, False),
    ({"subject": {"glob": "photos/*.jpg"}}, False),
    ({"container": "photos", "subject": {"suffix": ".jpg"}}, False),
    ({"data.size": {"gt": 1}}, False),
])
def test_filters_the_index_decides_alone(filters, decided):
    compiled = compile_filter(filters)
    # Decided alone: once the index found it through its key, nothing is left to test.
    assert (compiled.residual(compiled.index_key()) is None) is decided


def test_index_decided_filters_still_match_exactly():
    index = SubscriptionIndex([sub("s", {"count": "7"}), sub("p", {"subject": {"prefix": "photos/c"}})])
    event = Event(id="x", source="/s", type="t", subject="photos/cat.jpg", extensions={"sourcekind": "swift", "count": 7, "projectid": "p1"})
    # "7" (string filter) must not match 7 (number attribute): the predicate still runs for it.
    assert [s.id for s in index.match(event)] == ["p"]


# --- LIKE in linear time, and a cost bound at creation (issue 15, finding 7) --------------------

def _like_reference(pattern: str, subject: str) -> bool:
    """What LIKE means, by dynamic programming (quadratic, no backtracking): the oracle."""
    m, n = len(pattern), len(subject)
    row = [True] + [False] * n
    for i in range(m):
        new = [row[0] and pattern[i] == "%"] + [False] * n
        for j in range(1, n + 1):
            c = pattern[i]
            new[j] = (new[j - 1] or row[j]) if c == "%" else row[j - 1] and (c == "_" or c == subject[j - 1])
        row = new
    return row[n]


def test_like_agrees_with_its_definition():
    import itertools
    import random
    rng = random.Random(15)
    alphabet = "ab%_"
    for _ in range(3000):
        pattern = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
        subject = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        f = compile_filter(None, f"subject LIKE '{pattern}'")
        assert f.matches(Event(id="1", source="s", type="t", subject=subject)) == _like_reference(pattern, subject), (pattern, subject)
    for pattern, subject in itertools.product(["%", "_", "%%", "a%", "%a", "a_b", "%a%b%"], ["", "a", "ab", "acb", "ba"]):
        f = compile_filter(None, f"subject LIKE '{pattern}'")
        assert f.matches(Event(id="1", source="s", type="t", subject=subject)) == _like_reference(pattern, subject)


def test_like_with_many_wildcards_does_not_backtrack():
    # Took 5.2 s with a regex at 61 characters, minutes at 100; the matcher's work is counted, not timed.
    from router import filters
    calls = 0
    real = filters._find_segment

    def counting(*args):
        nonlocal calls
        calls += 1
        return real(*args)

    pattern = "%a" * 40 + "%c%b"
    subject = "a" * 5000 + "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(filters, "_find_segment", counting)
        f = compile_filter(None, f"subject LIKE '{pattern}'")
        assert not f.matches(Event(id="1", source="s", type="t", subject=subject))
    assert calls <= 42  # one search per segment


@pytest.mark.parametrize("expression, fault", [
    ("(" * 40 + "type = 'x'" + ")" * 40, "nests 40 deep; the limit is 32"),
    ("NOT " * 40 + "type = 'x'", "nests 40 deep"),
    ("type = 'x' AND " * 300 + "type = 'y'", "301 conditions; the limit is 256"),
    ("subject LIKE '" + "%a" * 600 + "'", "LIKE pattern is 1200 characters long"),
    ("type = '" + "x" * 9000 + "'", "the limit is 8192"),
])
def test_filters_past_the_cost_bound_are_refused(expression, fault):
    with pytest.raises(FilterError, match=re.escape(fault)):
        compile_filter(None, expression)


def test_a_deeply_nested_filter_object_is_a_filter_error_not_a_crash():
    spec: dict = {"type": "x"}
    for _ in range(5000):
        spec = {"not": spec}
    with pytest.raises(FilterError, match="nests deeper than 32"):
        compile_filter(None, spec)
