"""SubscriptionIndex: matching by source kind, type and exact attributes; updates; scale."""

from router.events import Event
from router.index import SubscriptionIndex
from router.plugins import Subscription


def ev(kind="swift", type_="object.put", subject=None, **ext):
    return Event(id="e", source="/s", type=type_, subject=subject, extensions={"sourcekind": kind, **ext})


def ids(subs):
    return sorted(s.id for s in subs)


def test_matches_by_source_type_and_filters():
    index = SubscriptionIndex([
        Subscription(id="all-swift", project_id="p", source="swift"),
        Subscription(id="puts", project_id="p", source="swift", types=("object.put",)),
        Subscription(id="deletes", project_id="p", source="swift", types=("object.delete",)),
        Subscription(id="photos", project_id="p", source="swift", filters={"container": "photos"}),
        Subscription(id="photos-put", project_id="p", source="swift", types=("object.put",), filters={"container": "photos", "projectid": "p1"}),
        Subscription(id="zaqar", project_id="p", source="zaqar"),
    ])
    assert ids(index.match(ev(container="photos", projectid="p1"))) == ["all-swift", "photos", "photos-put", "puts"]
    assert ids(index.match(ev(container="photos", projectid="p2"))) == ["all-swift", "photos", "puts"]
    assert ids(index.match(ev(type_="object.delete", container="docs"))) == ["all-swift", "deletes"]
    assert ids(index.match(ev(kind="aodh"))) == []
    assert index.match(Event(id="x", source="/s", type="t")) == [], "an event without a source kind routes nowhere"


def test_webhook_style_subject_targeting():
    index = SubscriptionIndex(Subscription(id=f"w{i}", project_id="p", source="http", filters={"subject": f"w{i}"}) for i in range(1000))
    assert ids(index.match(ev(kind="http", subject="w7"))) == ["w7"]
    assert index.match(ev(kind="http", subject="nope")) == []


def test_put_replaces_and_remove_forgets():
    index = SubscriptionIndex([Subscription(id="a", project_id="p", source="swift", filters={"container": "x"})])
    index.put(Subscription(id="a", project_id="p", source="swift", filters={"container": "y"}))
    assert index.match(ev(container="x")) == []
    assert ids(index.match(ev(container="y"))) == ["a"]
    index.remove("a")
    assert index.match(ev(container="y")) == [] and len(index) == 0
    index.remove("a")  # removing twice is harmless


def test_paused_subscriptions_route_nothing_but_cron_ticks_still_run():
    index = SubscriptionIndex([
        Subscription(id="paused", project_id="p", source="swift", status="paused"),
        Subscription(id="job", project_id="p", source="cron", status="done", filters={"subject": "job"}),
    ])
    assert index.match(ev()) == []
    assert ids(index.match(ev(kind="cron", subject="job"))) == ["job"]


def test_of_source_and_replace_all():
    index = SubscriptionIndex([Subscription(id="a", project_id="p", source="cron")])
    index.replace_all([Subscription(id="b", project_id="p", source="cron"), Subscription(id="c", project_id="p", source="http")])
    assert ids(index.of_source("cron")) == ["b"] and index.get("a") is None
