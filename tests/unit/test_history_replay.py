"""Event history and replay: events are kept and listed; replaying failed events after a fix runs
them again as recorded replays; a second replay without force runs nothing; force runs again."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import pathlib
import tempfile
import zipfile

import pytest
from aiohttp import FormData


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
    shared = pathlib.Path(tempfile.mkdtemp(prefix="headwater-replay-"))
    shared.chmod(0o755)
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
    assert (await resp.json())["replayed"] == 3  # published again, but de-duplicated per (event, subscription)
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
    from router.events import Event

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
