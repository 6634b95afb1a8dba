"""Event history and replay: events are kept and listed; replaying failed events after a fix runs
them again as recorded replays; a second replay without force runs nothing; force runs again."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import pathlib
import zipfile

import pytest
from aiohttp import FormData

from router.events import Event
from tests.processes import shared_dir


FLAKY = '''
import os
def main(n=0, marker="", **kwargs):
    if not os.path.exists(marker):
        raise RuntimeError("not fixed yet")
    return n * 2
'''


@pytest.fixture
async def hw(make_headwater):
    return await make_headwater("local")


async def wait_for(condition, timeout=15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        result = await condition()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_replay_failed_events_after_a_fix(hw, tmp_path):
    # Functions may run as an unprivileged user: the "fix" marker must be readable by anyone.
    shared = pathlib.Path(shared_dir("headwater-replay-"))
    marker = shared / "fixed"
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("flaky.py", FLAKY)
    form = FormData()
    form.add_field("runtime_id", runtime["id"])
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("entry", "flaky.main")
    form.add_field("package", buf.getvalue(), filename="f.zip")
    function = await (await hw.client.post("/v1/functions", data=form)).json()
    sub = await (await hw.client.post("/v1/subscriptions", json={
        "source": "http", "types": ["com.example.order"], "function_id": function["id"]})).json()
    other = await (await hw.client.post("/v1/subscriptions", json={
        "source": "http", "types": ["com.example.order"], "function_id": function["id"], "input": '{"n": 0}'})).json()

    for i in range(3):
        event = {"specversion": "1.0", "id": f"order-{i}", "source": "/shop", "type": "com.example.order",
                 "data": {"n": i, "marker": str(marker)}}
        assert (await hw.client.post("/v1/events", json=event)).status == 202

    async def failed():
        rows = await hw.store.executions.list(filters={"subscription_id": sub["id"]})
        return rows if len(rows) == 3 and all(r.status == "failed" for r in rows) else None
    await wait_for(failed)

    # The history keeps them.
    listed = (await (await hw.client.get("/v1/events?source_kind=http")).json())["events"]
    assert sorted(e["id"] for e in listed) == ["order-0", "order-1", "order-2"]
    one = await (await hw.client.get("/v1/events/order-1")).json()
    assert one["event"]["data"]["n"] == 1 and one["type"] == "com.example.order"
    assert (await hw.client.get("/v1/events/nope")).status == 404

    marker.write_text("yes")  # the function is fixed
    marker.chmod(0o644)
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).isoformat()
    resp = await hw.client.post("/v1/events/replay", json={"subscription_id": sub["id"], "since": since,
                                                            "execution_status": "failed"})
    body = await resp.json()
    assert resp.status == 202 and body["replayed"] == 3, body

    async def replayed():
        rows = await hw.store.executions.list(filters={"subscription_id": sub["id"], "event_id": "has::replay"})
        return rows if len(rows) == 3 and all(r.status == "success" for r in rows) else None
    rows = await wait_for(replayed)
    assert sorted(r.result["output"] for r in rows) == [0, 2, 4]
    assert all(r.event_id.endswith(":replay") for r in rows)
    # The other subscription got nothing from the replay.
    assert len(await hw.store.executions.list(filters={"subscription_id": other["id"]})) == 3

    # Again without force: already recorded, nothing runs.
    resp = await hw.client.post("/v1/events/replay", json={"subscription_id": sub["id"], "since": since})
    # Regression: this answered replayed 3 though nothing ran (the copies were de-duplicated).
    assert await resp.json() == {"subscription_id": sub["id"], "replayed": 0, "events": [], "skipped": 3}
    await asyncio.sleep(0.5)  # quiet period: a second run would show up now
    assert len(await hw.store.executions.list(filters={"subscription_id": sub["id"]})) == 6

    # With force: runs again, as new records.
    resp = await hw.client.post("/v1/events/replay", json={"subscription_id": sub["id"], "since": since, "force": True,
                                                            "filter": "data.n >= 1"})
    assert (await resp.json())["replayed"] == 2

    async def forced():
        rows = await hw.store.executions.list(filters={"subscription_id": sub["id"]})
        return rows if len(rows) == 8 else None
    await wait_for(forced)


async def test_replay_finds_the_events_its_subscription_received_from_another_project(make_headwater):
    # Regression: OpenStack sources stamp the Swift account's / Zaqar queue's project on their events,
    # while an API-made subscription lives in `default`; replay looked in `default` only: replayed 0.
    from router.app import _SourceContext
    from router.events import Event

    hw = await make_headwater("null")
    runtime = await hw.store.runtimes.add(image="python3", status="available", project_id="default")
    function = {"id": (await hw.store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="m.main",
                                                     cpu=100, memory_size=33554432, timeout=5, project_id="default")).id}
    sub = await (await hw.client.post("/v1/subscriptions", json={
        "source": "swift", "types": ["org.openstack.swift.object.put"], "function_id": function["id"]})).json()
    ctx = _SourceContext(hw, "swift")
    for i in range(2):
        await ctx.publish(Event(id=f"n-{i}", source="/swift/AUTH_acct/photos", type="org.openstack.swift.object.put",
                                subject=f"photos/{i}.jpg", data={"i": i}, extensions={"projectid": "acct"}), settle=True)
    # Another project's event that this subscription never received stays out of its replays.
    await hw.history.flush()
    hw.history.record(Event(id="other", source="/swift/AUTH_x/c", type="org.openstack.swift.object.put",
                            subject="c/o", data={}, extensions={"projectid": "x", "sourcekind": "swift"}))
    await hw.history.flush()
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)).isoformat()
    body = await (await hw.client.post("/v1/events/replay", json={"subscription_id": sub["id"], "since": since})).json()
    assert body["replayed"] == 2 and sorted(body["events"]) == ["n-0:replay", "n-1:replay"], body


@pytest.mark.parametrize("body, status, fault", [
    ({}, 400, "Required param is missing. Required: {'subscription_id'}"),
    ({"subscription_id": "nope", "since": "2026-01-01T00:00:00Z"}, 404, "Subscription not found"),
    ({"subscription_id": "SUB"}, 400, "Required: {'since'}"),
    ({"subscription_id": "SUB", "since": "yesterday"}, 400, "since must be an ISO 8601 time"),
    ({"subscription_id": "SUB", "since": "2026-01-01", "filter": "data.n >"}, 400, "filter:"),
    ({"subscription_id": "SUB", "since": "2026-01-01", "execution_status": "meh"}, 400, "execution_status must be"),
    ({"subscription_id": "SUB", "since": "2026-01-01", "limit": 0}, 400, "limit must be from 1"),
])
async def test_replay_validation(hw, body, status, fault):
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    form = FormData()
    form.add_field("runtime_id", runtime["id"])
    form.add_field("code", json.dumps({"source": "package"}))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("main.py", "def main(**kw):\n    return 1\n")
    form.add_field("package", buf.getvalue(), filename="f.zip")
    function = await (await hw.client.post("/v1/functions", data=form)).json()
    sub = await (await hw.client.post("/v1/subscriptions", json={"source": "http", "function_id": function["id"]})).json()
    body = {k: (sub["id"] if v == "SUB" else v) for k, v in body.items()}
    resp = await hw.client.post("/v1/events/replay", json=body)
    assert resp.status == status
    assert fault in (await resp.json())["faultstring"]


async def test_history_trim_by_age_and_bound(hw):
    hw.history.max_per_project = 3
    for i in range(5):
        hw.history.record(Event(id=f"h{i}", source="/s", type="t", extensions={"sourcekind": "http", "projectid": "p"}))
        await asyncio.sleep(0.01)
    await hw.history.flush()
    assert await hw.history.trim() == 2
    kept = await hw.history.query(project_id="p")
    assert sorted(r.id for r in kept) == ["h2", "h3", "h4"]
    hw.history.retention = dt.timedelta(seconds=-1)  # everything is past it, however fast this runs
    assert await hw.history.trim() == 3


async def test_one_bad_event_loses_only_itself_from_the_history(hw):
    # A subject that is not a string gets past no source any more, but the writer must not depend
    # on that: 199 good events once went down with the one bad row in their batch.
    good = [Event(id=f"ok-{i}", source="/s", type="t", subject=f"s{i}", extensions={"sourcekind": "http", "projectid": "p"})
            for i in range(199)]
    bad = Event(id="bad", source="/s", type="t", subject=["not", "text"], extensions={"sourcekind": "http", "projectid": "p"})
    for event in good[:100] + [bad] + good[100:]:
        hw.history.record(event)
    await hw.history.flush()
    kept = await hw.history.query(project_id="p", limit=1000)
    assert sorted(e.id for e in kept) == sorted(e.id for e in good)


async def test_flush_waits_for_the_batch_the_writer_is_writing(make_headwater):
    # Regression: flush() wrote only what was still queued, and returned while the writer's own
    # batch was being written; a replay right after it did not find that event (the full suite
    # caught it on a loaded machine: replayed 1 of 2).
    from router.events import Event

    hw = await make_headwater("null")
    write, entered, gate = hw.history._write, asyncio.Event(), asyncio.Event()

    async def held(batch):
        entered.set()
        await gate.wait()
        await write(batch)

    hw.history._write = held
    hw.history.record(Event(id="held-1", source="/h", type="t", extensions={"sourcekind": "http"}))
    await entered.wait()  # the writer took it off the queue and is writing it
    flushing = asyncio.ensure_future(hw.history.flush())
    for _ in range(5):
        await asyncio.sleep(0)
    done_early = flushing.done()
    gate.set()
    await flushing
    assert not done_early
    assert await hw.history.get("held-1", None) is not None


async def test_replay_under_keystone_stays_in_the_subscriptions_project(make_headwater):
    # Under Keystone (per-project index) a replay never reaches beyond the subscription's project,
    # even for an event id its executions name: another project may reuse that id. With auth off
    # (one tenant) such an event is the subscription's, as above.
    hw = await make_headwater("null")
    for event_id, project in (("own", "p1"), ("shared", "p2")):
        hw.history.record(Event(id=event_id, source=f"/swift/AUTH_{project}/c", type="org.openstack.swift.object.put",
                                subject="c/o", data={}, extensions={"projectid": project, "sourcekind": "swift"}))
    await hw.history.flush()
    await hw.store.executions.add(project_id="p1", subscription_id="sub-1", event_id="shared", status="success")
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    query = dict(subscription_id="sub-1", project_id="p1", source_kind="swift", since=since)
    assert [r.id for r in await hw.history.received_by(**query, other_projects=False)] == ["own"]
    assert sorted(r.id for r in await hw.history.received_by(**query, other_projects=True)) == ["own", "shared"]
    assert hw.index.per_project is False  # auth off here: the API replays with other_projects on
