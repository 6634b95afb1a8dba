"""The dashboard's server side: why an event did not run (GET /v1/events/{id}), the filter check,
dead-letter replay and discard, the live tail (feed and SSE) and the per-minute counts."""

from __future__ import annotations

import pytest

from router.dashboard.feed import QUEUE_SIZE, EventFeed
from router.dashboard.series import MinuteSeries
from router.events import Event
from router.filters import compile_filter
from router.metrics import Metrics
from tests.unit.test_history_replay import wait_for


@pytest.fixture
async def hw(make_headwater):
    return await make_headwater("null")


async def _function(hw) -> str:
    from aiohttp import FormData

    from tests.e2e.server import make_zip

    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    form = FormData()
    form.add_field("runtime_id", runtime["id"])
    form.add_field("code", '{"source": "package"}')
    form.add_field("package", make_zip({"main.py": "def main(**kw):\n    return 1\n"}), filename="f.zip")
    resp = await hw.client.post("/v1/functions", data=form)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


def _event(event_id: str, **attrs) -> dict:
    return {"specversion": "1.0", "id": event_id, "source": "/shop", "type": "order.created", **attrs}


async def _recorded(hw, event_id: str, query: str = "") -> dict:
    async def get():
        resp = await hw.client.get(f"/v1/events/{event_id}{query}")
        return await resp.json() if resp.status == 200 else None
    return await wait_for(get)


async def test_an_unmatched_event_names_the_condition_that_rejected_it(hw):
    fn = await _function(hw)
    photos = await (await hw.client.post("/v1/subscriptions", json={
        "source": "http", "name": "photos", "types": ["order.created"], "function_id": fn,
        "filters": {"subject": {"prefix": "photos/"}}, "filter": "data.size > 1000"})).json()
    other_type = await (await hw.client.post("/v1/subscriptions", json={
        "source": "http", "name": "paid", "types": ["order.paid"], "function_id": fn})).json()
    resp = await hw.client.post("/v1/events", json=_event("e-1", subject="docs/a.txt", data={"size": 10}))
    assert resp.status == 202

    body = await _recorded(hw, "e-1", f"?subscription_id={photos['id']}")
    verdict = body["routing"]["subscription"]
    assert verdict["matched"] is False and verdict["subscription_id"] == photos["id"]
    assert verdict["reasons"] == ["subject prefix 'photos/' failed: the event's subject is 'docs/a.txt'",
                                  "data.size > 1000.0 failed: the event's data.size is 10"]
    assert body["routing"]["matched"] == []
    why = {s["name"]: s["reasons"] for s in body["routing"]["not_matched"]}
    assert why["paid"] == ["type: the event's type 'order.created' is not one of ['order.paid']"]
    assert other_type["id"] in {s["subscription_id"] for s in body["routing"]["not_matched"]}


async def test_a_matched_event_lists_its_subscription(hw):
    fn = await _function(hw)
    sub = await (await hw.client.post("/v1/subscriptions", json={
        "source": "http", "name": "all", "function_id": fn, "filter": "NOT subject = 'skip'"})).json()
    await hw.client.post("/v1/events", json=_event("e-2", subject="keep"))
    body = await _recorded(hw, "e-2", f"?subscription_id={sub['id']}")
    assert [m["subscription_id"] for m in body["routing"]["matched"]] == [sub["id"]]
    assert body["routing"]["subscription"]["matched"] is True and body["routing"]["subscription"]["reasons"] == []
    await hw.client.post("/v1/events", json=_event("e-3", subject="skip"))
    body = await _recorded(hw, "e-3", f"?subscription_id={sub['id']}")
    assert body["routing"]["subscription"]["reasons"] == ["NOT (subject = 'skip') failed: the inner condition held"]


async def test_explaining_a_missing_subscription_or_unknown_argument_is_a_client_error(hw):
    await hw.client.post("/v1/events", json=_event("e-4"))
    await _recorded(hw, "e-4")
    assert (await hw.client.get("/v1/events/e-4?subscription_id=nope")).status == 404
    resp = await hw.client.get("/v1/events/e-4?why=1")
    assert resp.status == 400 and "why" in (await resp.json())["faultstring"]


async def test_filter_check_validates_and_tests_against_an_event(hw):
    bad = await (await hw.client.post("/dashboard/api/filter", json={"filter": "subject LIKE"})).json()
    assert bad["valid"] is False and "filter" in bad["error"]
    bad = await (await hw.client.post("/dashboard/api/filter", json={"filters": {"size": {"gt": "x"}}})).json()
    assert bad == {"valid": False, "error": "filters.size: gt takes a number, got 'x'"}
    ok = await (await hw.client.post("/dashboard/api/filter", json={"filter": "data.n >= 2"})).json()
    assert ok == {"valid": True}
    tested = await (await hw.client.post("/dashboard/api/filter", json={
        "filter": "data.n >= 2", "event": _event("x", data={"n": 1})})).json()
    assert tested == {"valid": True, "matches": False, "reasons": ["data.n >= 2.0 failed: the event's data.n is 1"]}
    tested = await (await hw.client.post("/dashboard/api/filter", json={
        "filters": {"data.n": 1}, "event": _event("x", data={"n": 1})})).json()
    assert tested["matches"] is True
    for event in ({"id": "no-specversion"}, "text"):
        resp = await hw.client.post("/dashboard/api/filter", json={"filter": "type = 'a'", "event": event})
        assert resp.status == 400


async def test_replaying_a_dead_letter_runs_its_event_again_for_its_subscription(hw):
    fn = await _function(hw)
    sub = await (await hw.client.post("/v1/subscriptions", json={"source": "http", "function_id": fn,
                                                                 "types": ["order.created"]})).json()
    event = Event.from_dict({**_event("dead-1"), "sourcekind": "http"}).to_dict()
    letter = await hw.store.dead_letters.add(source="http", reason="gave up", event_id="dead-1",
                                             subscription_id=sub["id"], payload=event, project_id="default")
    resp = await hw.client.post(f"/v1/deadletters/{letter.id}/replay")
    assert resp.status == 202, await resp.text()
    replayed = await resp.json()
    assert replayed["event_id"].startswith("dead-1:replay:") and replayed["subscription_id"] == sub["id"]
    # Regression: the dashboard opens the replay's trace at once; the history had not written it yet.
    assert (await hw.client.get(f"/v1/events/{replayed['event_id']}")).status == 200

    async def executions():
        body = await (await hw.client.get(f"/v1/executions?event_id={replayed['event_id']}")).json()
        return body["executions"]
    (execution,) = await wait_for(executions)
    assert execution["subscription_id"] == sub["id"]
    assert (await hw.client.get(f"/v1/deadletters/{letter.id}")).status == 404


async def test_a_dead_letter_without_an_event_cannot_be_replayed_but_can_be_discarded(hw):
    letter = await hw.store.dead_letters.add(source="zaqar", reason="not JSON", payload="garbage", project_id="default")
    resp = await hw.client.post(f"/v1/deadletters/{letter.id}/replay")
    assert resp.status == 409 and "holds no event" in (await resp.json())["faultstring"]
    assert (await hw.client.delete(f"/v1/deadletters/{letter.id}")).status == 204
    assert (await hw.client.delete(f"/v1/deadletters/{letter.id}")).status == 404
    assert (await hw.client.post("/v1/deadletters/not-a-uuid/replay")).status == 400


async def test_the_tail_streams_events_of_the_watchers_project_that_pass_its_filter(hw):
    resp = await hw.client.get("/dashboard/api/stream?filter=type%20%3D%20%27order.paid%27")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    assert await wait_for(lambda: _true(len(hw.feed) == 1))
    await hw.client.post("/v1/events", json=_event("t-1"))
    await hw.client.post("/v1/events", json=_event("t-2", type="order.paid", subject="<b>x</b>"))
    lines = []
    while not any(line.startswith(b"data:") for line in lines):
        lines.append(await resp.content.readline())
    data = [line for line in lines if line.startswith(b"data:")]
    assert b'"id":"t-2"' in data[0] and b'"subject":"<b>x</b>"' in data[0]
    assert not any(b"t-1" in line for line in lines)
    resp.close()
    assert await wait_for(lambda: _true(len(hw.feed) == 0))
    assert (await hw.client.get("/dashboard/api/stream?filter=((")).status == 400


async def _true(value):
    return value


def test_feed_scopes_watchers_by_project_and_filter_and_counts_what_a_slow_one_misses():
    feed = EventFeed()
    feed.offer(Event.from_dict({**_event("nobody"), "projectid": "p1"}))  # nobody watching: nothing kept
    mine = feed.watch("p1")
    typed = feed.watch(None, compile_filter(None, "type = 'order.paid'"))
    feed.offer(Event.from_dict({**_event("a"), "projectid": "p1"}))
    feed.offer(Event.from_dict({**_event("b", type="order.paid"), "projectid": "p2"}))
    assert [mine.queue.get_nowait()["id"]] == ["a"] and mine.queue.empty()
    assert typed.queue.get_nowait()["id"] == "b" and typed.queue.empty()
    for i in range(QUEUE_SIZE + 3):
        feed.offer(Event.from_dict({**_event(f"n{i}"), "projectid": "p1"}))
    assert mine.queue.qsize() == QUEUE_SIZE and mine.missed == 3
    feed.unwatch(mine)
    feed.unwatch(typed)
    assert len(feed) == 0


def test_minute_series_counts_each_minute_from_the_counters():
    metrics = Metrics()
    now = [600.0]  # minute 10
    series = MinuteSeries(metrics, clock=lambda: now[0])
    series.tick()
    metrics.events_in.labels("http").inc(3)
    metrics.executions_failed.labels("error").inc()
    now[0] = 665.0  # minute 11
    series.tick()
    metrics.events_in.labels("cron").inc(2)
    metrics.dead_letters.labels("http").inc()
    minutes = series.minutes()
    assert [m["minute"] for m in minutes] == [600, 660]
    assert minutes[0] == {"minute": 600, "in": 3, "routed": 0, "executed": 0, "failed": 1, "dead_lettered": 0}
    assert minutes[1] == {"minute": 660, "in": 2, "routed": 0, "executed": 0, "failed": 0, "dead_lettered": 1}


async def test_pages_are_served_from_the_package_with_a_strict_policy(hw):
    resp = await hw.client.get("/dashboard", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/dashboard/"
    page = await hw.client.get("/dashboard/")
    assert page.status == 200 and "default-src 'self'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    assert "/dashboard/static/app.js" in html and "http://" not in html and "https://" not in html
    for name in ("app.js", "api.js", "dom.js", "chart.js", "style.css"):
        assert (await hw.client.get(f"/dashboard/static/{name}")).status == 200
    assert (await hw.client.get("/dashboard/static/..%2Fweb.py")).status == 404
    assert (await hw.client.get("/dashboard/static/nothing.js")).status == 404
    minutes = await (await hw.client.get("/dashboard/api/minutes")).json()
    assert minutes["minutes"] and set(minutes["minutes"][-1]) == {"minute", "in", "routed", "executed", "failed", "dead_lettered"}


async def test_open_tails_end_when_the_server_shuts_down(hw):
    """Regression: an open tail held `headwater serve` for aiohttp's whole shutdown timeout (two
    minutes) after SIGTERM."""
    import asyncio

    resp = await hw.client.get("/dashboard/api/stream")
    assert await wait_for(lambda: _true(len(hw.feed) == 1))
    await hw.web.shutdown()  # what serve's runner.cleanup() runs first
    rest = await asyncio.wait_for(resp.content.read(), 60)  # the old code never ended the stream
    assert rest == b": headwater event tail\n\n"
    assert len(hw.feed) == 0


def test_closing_the_feed_reaches_a_watcher_whose_queue_is_full():
    feed = EventFeed()
    watcher = feed.watch(None)
    for i in range(QUEUE_SIZE):
        feed.offer(Event.from_dict(_event(f"f{i}")))
    feed.close()
    items = [watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())]
    assert items[-1] is None and len(feed) == 0


async def test_a_server_refuses_more_tails_than_it_holds(hw, monkeypatch):
    from router.dashboard import feed as feed_module

    monkeypatch.setattr(feed_module, "MAX_WATCHERS", 1)
    first = await hw.client.get("/dashboard/api/stream")
    assert first.status == 200
    second = await hw.client.get("/dashboard/api/stream")
    assert second.status == 503 and "1 event tails are open" in (await second.json())["faultstring"]
    first.close()


async def test_editing_a_subscription_changes_what_it_matches(hw):
    fn = await _function(hw)
    sub = await (await hw.client.post("/v1/subscriptions", json={
        "source": "http", "name": "orders", "function_id": fn, "filter": "data.total > 100"})).json()
    resp = await hw.client.put(f"/v1/subscriptions/{sub['id']}", json={"filter": "data.total >", "name": "x"})
    assert resp.status == 400 and "filter" in (await resp.json())["faultstring"]
    resp = await hw.client.put(f"/v1/subscriptions/{sub['id']}", json={"function_id": fn})
    assert resp.status == 400 and "Cannot change function_id" in (await resp.json())["faultstring"]
    assert (await hw.client.put(f"/v1/subscriptions/{sub['id']}", json={"status": "done"})).status == 400

    resp = await hw.client.put(f"/v1/subscriptions/{sub['id']}", json={"filter": "data.total > 10", "name": "small",
                                                                     "types": ["order.created"]})
    assert resp.status == 200, await resp.text()
    edited = await resp.json()
    assert edited["filter"] == "data.total > 10" and edited["name"] == "small" and edited["types"] == ["order.created"]
    await hw.client.post("/v1/events", json=_event("edit-1", data={"total": 50}))
    body = await _recorded(hw, "edit-1", f"?subscription_id={sub['id']}")
    assert body["routing"]["subscription"]["matched"] is True

    paused = await (await hw.client.put(f"/v1/subscriptions/{sub['id']}", json={"status": "paused", "filter": None})).json()
    assert paused["status"] == "paused" and paused["filter"] is None
    body = await _recorded(hw, "edit-1", f"?subscription_id={sub['id']}")
    assert body["routing"]["subscription"]["reasons"] == ["status: the subscription is paused"]


async def test_a_cron_subscriptions_filters_are_not_editable(hw):
    fn = await _function(hw)
    job = await (await hw.client.post("/v1/subscriptions", json={"source": "cron", "pattern": "0 0 1 1 *",
                                                                 "function_id": fn})).json()
    resp = await hw.client.put(f"/v1/subscriptions/{job['id']}", json={"filters": {}})
    assert resp.status == 400 and "schedule" in (await resp.json())["faultstring"]
    assert (await hw.client.put(f"/v1/subscriptions/{job['id']}", json={"name": "nightly"})).status == 200
