"""SubscriptionIndex: matching by source kind, type and exact attributes; updates; scale."""

import random

from router.events import Event
from router.index import SubscriptionIndex, compile_subscription
from router.plugins import Subscription


def ev(kind="swift", type_="object.put", subject=None, **ext):
    return Event(id="e", source="/s", type=type_, subject=subject, extensions={"sourcekind": kind, "projectid": "p1", **ext})


def ids(subs):
    return sorted(s.id for s in subs)


def test_matches_by_source_type_and_filters():
    index = SubscriptionIndex([
        Subscription(id="all-swift", project_id="p1", source="swift"),
        Subscription(id="puts", project_id="p1", source="swift", types=("object.put",)),
        Subscription(id="deletes", project_id="p1", source="swift", types=("object.delete",)),
        Subscription(id="photos", project_id="p1", source="swift", filters={"container": "photos"}),
        Subscription(id="photos-put", project_id="p1", source="swift", types=("object.put",), filters={"container": "photos", "projectid": "p1"}),
        Subscription(id="zaqar", project_id="p1", source="zaqar"),
    ])
    assert ids(index.match(ev(container="photos", projectid="p1"))) == ["all-swift", "photos", "photos-put", "puts"]
    assert ids(index.match(ev(container="photos", projectid="p2"))) == [], "another project's event"
    assert ids(index.match(ev(type_="object.delete", container="docs"))) == ["all-swift", "deletes"]
    assert ids(index.match(ev(kind="aodh"))) == []
    assert index.match(Event(id="x", source="/s", type="t")) == [], "an event without a source kind routes nowhere"


def test_webhook_style_subject_targeting():
    index = SubscriptionIndex(Subscription(id=f"w{i}", project_id="p1", source="http", filters={"subject": f"w{i}"}) for i in range(1000))
    assert ids(index.match(ev(kind="http", subject="w7"))) == ["w7"]
    assert index.match(ev(kind="http", subject="nope")) == []


def test_put_replaces_and_remove_forgets():
    index = SubscriptionIndex([Subscription(id="a", project_id="p1", source="swift", filters={"container": "x"})])
    index.put(Subscription(id="a", project_id="p1", source="swift", filters={"container": "y"}))
    assert index.match(ev(container="x")) == []
    assert ids(index.match(ev(container="y"))) == ["a"]
    index.remove("a")
    assert index.match(ev(container="y")) == [] and len(index) == 0
    index.remove("a")  # removing twice is harmless


def test_paused_subscriptions_route_nothing_but_cron_ticks_still_run():
    index = SubscriptionIndex([
        Subscription(id="paused", project_id="p1", source="swift", status="paused"),
        Subscription(id="job", project_id="p1", source="cron", status="done", filters={"subject": "job"}),
    ])
    assert index.match(ev()) == []
    assert ids(index.match(ev(kind="cron", subject="job"))) == ["job"]


def test_of_source_and_replace_all():
    index = SubscriptionIndex([Subscription(id="a", project_id="p1", source="cron")])
    index.replace_all([Subscription(id="b", project_id="p1", source="cron"), Subscription(id="c", project_id="p1", source="http")])
    assert ids(index.of_source("cron")) == ["b"] and index.get("a") is None


def sub(id_, filters=None, types=(), expression=None, status="running", source="swift"):
    return Subscription(id=id_, project_id="p1", source=source, filters=filters or {}, types=types, status=status,
                        options={"filter": expression} if expression else {})


def test_prefixes_and_suffixes_of_many_lengths_on_one_attribute():
    # More distinct lengths than one bag holds, literals shorter than a level's stride, shared
    # beginnings and endings: every literal that starts (ends) the value matches, and only those.
    prefixes = ["p", "ph", "pho", "phot", "photo", "photos", "photos/", "photos/2", "photos/2024/", "photos/2024/cats/",
                "docs/", "photos/2025/"]
    suffixes = ["g", "pg", "jpg", ".jpg", "t.jpg", "cat.jpg", "/cat.jpg", "s/cat.jpg", "cats/cat.jpg", ".png", "dog.jpg"]
    index = SubscriptionIndex([sub(f"p:{p}", {"subject": {"prefix": p}}) for p in prefixes]
                              + [sub(f"s:{s}", {"subject": {"suffix": s}}) for s in suffixes])
    for subject in ("photos/2024/cats/cat.jpg", "photos/2025/dog.jpg", "ph", "docs/a.png", "x", "", "g"):
        expected = [f"p:{p}" for p in prefixes if subject.startswith(p)] + [f"s:{s}" for s in suffixes if subject.endswith(s)]
        assert ids(index.match(ev(subject=subject))) == sorted(expected), subject
    few = SubscriptionIndex([sub("p:a", {"subject": {"prefix": "a"}}), sub("p:ab", {"subject": {"prefix": "ab"}}),
                             sub("s:g", {"subject": {"suffix": "g"}}), sub("s:pg", {"subject": {"suffix": "pg"}})])
    assert [s.id for s in few.match(ev(subject="a"))] == ["p:a"], "a value shorter than a literal is not cut to fit"
    assert [s.id for s in few.match(ev(subject="g"))] == ["s:g"]


def test_removing_literals_keeps_the_others_matching():
    prefixes = ["a/", "a/b/", "a/b/c/", "a/b/c/d/", "a/b/c/d/e/", "a/x/", "b/"]
    index = SubscriptionIndex([sub(p, {"subject": {"prefix": p}}) for p in prefixes]
                              + [sub("s" + p, {"subject": {"suffix": p}}) for p in prefixes])
    subject = "a/b/c/d/e/"
    for gone in ["a/b/c/", "a/", "sa/b/c/d/e/", "a/b/c/d/e/", "se/", "a/x/"]:
        index.remove(gone)
        prefixes_left = [p for p in prefixes if index.get(p) is not None and subject.startswith(p)]
        suffixes_left = ["s" + p for p in prefixes if index.get("s" + p) is not None and subject.endswith(p)]
        assert ids(index.match(ev(subject=subject))) == sorted(prefixes_left + suffixes_left), gone
    for id_ in [p for p in prefixes] + ["s" + p for p in prefixes]:
        index.remove(id_)
    assert index.match(ev(subject=subject)) == [] and len(index) == 0


def test_a_subscription_put_twice_matches_once_and_as_last_put():
    index = SubscriptionIndex([sub("a", {"subject": {"prefix": "photos/"}})])
    index.put(sub("a", {"subject": {"prefix": "photos/"}}))
    assert [s.id for s in index.match(ev(subject="photos/cat.jpg"))] == ["a"]
    index.put(sub("a", {"subject": {"suffix": ".jpg"}}, types=("object.put",)))
    assert [s.id for s in index.match(ev(subject="docs/cat.jpg"))] == ["a"]
    assert index.match(ev(subject="photos/cat.png")) == [], "the old prefix filter is gone"
    assert index.match(ev(type_="object.delete", subject="docs/cat.jpg")) == [], "the new type applies"
    index.put(sub("a", {"subject": {"suffix": ".jpg"}}, status="paused"))
    assert index.match(ev(subject="docs/cat.jpg")) == [] and index.get("a").status == "paused"
    index.put(sub("a", {"subject": {"suffix": ".jpg"}}))
    assert [s.id for s in index.match(ev(subject="docs/cat.jpg"))] == ["a"]


def test_a_filter_on_an_attribute_the_event_lacks_does_not_match():
    index = SubscriptionIndex([
        sub("exact", {"account": "p1"}),
        sub("prefix", {"subject": {"prefix": "a"}}),
        sub("suffix", {"subject": {"suffix": "a"}}),
        sub("glob", {"subject": {"glob": "*"}}),
        sub("absent", {"account": {"exists": False}}),
    ])
    assert ids(index.match(ev())) == ["absent"]
    assert ids(index.match(ev(subject="a", account="p1"))) == ["exact", "glob", "prefix", "suffix"]
    assert ids(index.match(ev(subject=7))) == ["absent"], "a prefix or suffix needs a string"


def test_what_the_index_did_not_prove_is_still_tested():
    index = SubscriptionIndex([
        sub("glob-after", {"subject": {"glob": "photos/[ab]*.jpg"}}),
        sub("glob-before", {"subject": {"glob": "*/[0-9]?/cat.jpg"}}),
        sub("expression", expression="container = 'photos' AND data.size > 10"),
        sub("typed", {"container": "photos"}, types=("object.put",)),
    ])
    match = lambda **kw: ids(index.match(Event(id="e", source="/s", type=kw.pop("type", "object.put"), data=kw.pop("data", None),
                                               subject=kw.pop("subject", None), extensions={"sourcekind": "swift", "projectid": "p1", **kw})))
    assert match(subject="photos/a1.jpg") == ["glob-after"]
    assert match(subject="photos/c1.jpg") == [] and match(subject="photos/a1.png") == []
    assert match(subject="x/1z/cat.jpg") == ["glob-before"]
    assert match(subject="x/zz/cat.jpg") == [] and match(subject="/cat.jpg") == []
    assert match(container="photos", data={"size": 11}) == ["expression", "typed"]
    assert match(container="photos", data={"size": 5}) == ["typed"]
    assert match(container="photos", data={"size": 11}, type="object.delete") == ["expression"]


def test_matches_what_each_filter_alone_matches():
    # Random subscriptions of every kind, put, replaced and removed at random: the index returns
    # exactly the running subscriptions whose own compiled filter and types accept the event.
    rng = random.Random(7)

    def text(low, high, letters="ab/"):
        return "".join(rng.choice(letters) for _ in range(rng.randint(low, high)))

    index, live = SubscriptionIndex(), {}
    for step in range(1500):
        id_ = f"s{rng.randrange(60)}"
        if rng.random() < 0.35:
            index.remove(id_)
            live.pop(id_, None)
            continue
        kind = rng.choice(["prefix", "suffix", "glob", "eq", "none"])
        filters = {"subject": {kind: text(1, rng.choice([3, 9, 20]))}} if kind in ("prefix", "suffix") else {}
        if kind == "glob":
            filters = {"subject": {"glob": text(0, 3) + rng.choice(["*", "?", "[ab]"]) + text(0, 3)}}
        elif kind == "eq":
            filters = {"subject": text(1, 3)}
        new = sub(id_, filters, types=rng.choice([(), ("t1",)]), status=rng.choice(["running"] * 9 + ["paused"]))
        index.put(new)
        live[id_] = new
        if step % 5 == 0:
            event = Event(id="e", source="/s", type=rng.choice(["t1", "t2"]), subject=text(0, 24), extensions={"sourcekind": "swift", "projectid": "p1"})
            expected = [s.id for s in live.values() if s.status == "running" and (not s.types or event.type in s.types)
                        and compile_subscription(s).matches(event)]
            got = [s.id for s in index.match(event)]
            assert sorted(got) == sorted(expected), (step, event.subject)


def test_a_bag_keeps_its_lengths_through_repeated_puts_and_drops():
    """A bag probes one length per distinct literal length; adding a literal twice or dropping one
    that is not there must not unbalance the count kept per length."""
    from router.index import _bag

    bag = _bag([("ab", ("s1",)), ("abcd", ("s2",))])
    bag.put("ab", ("s1", "s3"))  # the same literal again: still one literal of length 2
    bag.put("xy", ("s4",))
    assert bag.lengths == (2, 4)
    bag.drop("ab")
    bag.drop("ab")  # not there any more
    bag.drop("zz")  # never there
    assert bag.lengths == (2, 4)  # "xy" is still of length 2
    bag.drop("xy")
    assert bag.lengths == (4,) and dict(bag) == {"abcd": ("s2",)}


def test_an_event_reaches_only_its_own_projects_subscriptions():
    """Enforced in matching, whatever a subscription's filter says (even one naming the other
    project, or none at all); a replay aimed at another project's subscription goes nowhere."""
    mine = Subscription(id="mine", project_id="p1", source="swift")
    theirs = Subscription(id="theirs", project_id="p2", source="swift", filters={"projectid": "p1"})
    index = SubscriptionIndex([mine, theirs])
    assert ids(index.match(ev(projectid="p1"))) == ["mine"]
    assert ids(index.match(ev(projectid="p2"))) == []
    assert ids(index.match_or_target(ev(projectid="p1", replayfor="theirs"))) == []
    assert ids(index.match_or_target(ev(projectid="p2", replayfor="theirs"))) == ["theirs"]
    index.remove("theirs")
    assert ids(index.match(ev(projectid="p2"))) == []


def test_with_auth_off_there_is_one_tenant():
    """noauth: every API request is project `default`, so subscriptions made through it must still
    see events that sources stamp with the cloud's projects (a Swift account, a Zaqar project)."""
    index = SubscriptionIndex([Subscription(id="s", project_id="default", source="swift")], per_project=False)
    assert ids(index.match(ev(projectid="demo"))) == ["s"]
    assert ids(index.match_or_target(ev(projectid="demo", replayfor="s"))) == ["s"]
    index.replace_all([Subscription(id="t", project_id="default", source="swift")])
    assert ids(index.match(ev(projectid="other"))) == ["t"]
