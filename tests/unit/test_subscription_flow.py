"""Subscriptions through the whole router (real local engine): a concurrency ceiling holds, a rate
spreads events with none lost, same-key events run in order while keys run in parallel, results
chain through the bus with a loop guard, and signed callbacks reach a real receiver."""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile

import pytest
from aiohttp import FormData, web

from sinks.http import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.conditions import eventually

SLEEPER = '''
import time
def main(ms=200, **kw):
    start = time.time()
    time.sleep(ms / 1000.0)
    return {"start": start, "end": time.time(), "key": kw.get("key"), "n": kw.get("n")}
'''
SECRET = "receiver-secret-1234"


async def function(hw, source=SLEEPER, entry="f.main") -> str:
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("f.py", source)
    form = FormData()
    form.add_field("runtime_id", runtime["id"])
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("entry", entry)
    form.add_field("timeout", "30")
    form.add_field("package", buf.getvalue(), filename="f.zip")
    resp = await hw.client.post("/v1/functions", data=form)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def subscribe(hw, **fields) -> dict:
    resp = await hw.client.post("/v1/subscriptions", json={"source": "http", **fields})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def send(hw, event_id, type_="com.example.job", data=None, **ext):
    event = {"specversion": "1.0", "id": event_id, "source": "/test", "type": type_, "data": data or {}, **ext}
    resp = await hw.client.post("/v1/events", json=event)
    assert resp.status == 202, await resp.text()


async def finished(hw, sub_id, n, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in await hw.store.executions.list(filters={"subscription_id": sub_id}) if r.status != "running"]
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(rows)} of {n} executions finished")


def peak_overlap(intervals):
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


async def test_concurrency_ceiling_holds_through_the_router(make_headwater):
    hw = await make_headwater("local", engine={"local_workers_per_function": "4"})
    fid = await function(hw)
    limited = await subscribe(hw, types=["com.example.job"], function_id=fid, limits={"max_concurrency": 2})
    for i in range(8):
        await send(hw, f"c{i}", data={"ms": 300, "n": i})
    rows = await finished(hw, limited["id"], 8)
    assert all(r.status == "success" for r in rows), [r.result for r in rows]
    intervals = [(r.result["output"]["start"], r.result["output"]["end"]) for r in rows]
    assert peak_overlap(intervals) <= 2
    assert hw.executions.limits.stats(limited["id"])["peak"] == 2


async def test_rate_spreads_100_events_over_9_seconds_with_none_lost(make_headwater):
    hw = await make_headwater("null")
    fid = await function(hw)
    sub = await subscribe(hw, types=["com.example.tick"], function_id=fid, limits={"rate": {"count": 10, "per": "second"}})
    started = time.monotonic()
    for i in range(100):
        await send(hw, f"r{i}", type_="com.example.tick", data={"n": i})
    rows = await finished(hw, sub["id"], 100, timeout=40)
    elapsed = time.monotonic() - started
    assert len(rows) == 100 and all(r.status == "success" for r in rows)
    assert sorted(r.result["output"]["n"] for r in rows) == list(range(100)), "none lost"
    assert elapsed >= 9.0, f"100 events at 10/s took only {elapsed:.1f}s"


async def test_same_key_in_order_different_keys_in_parallel(make_headwater):
    hw = await make_headwater("local", engine={"local_workers_per_function": "4"})
    fid = await function(hw)
    sub = await subscribe(hw, types=["com.example.obj"], function_id=fid, limits={"ordered": True})
    for i in range(4):
        for key in ("a", "b"):
            await send(hw, f"o-{key}{i}", type_="com.example.obj", data={"ms": 250, "key": key, "n": i}, partitionkey=f"photos/{key}.jpg")
    rows = await finished(hw, sub["id"], 8)
    outputs = [r.result["output"] for r in rows]
    for key in ("a", "b"):
        mine = sorted((o for o in outputs if o["key"] == key), key=lambda o: o["start"])
        assert [o["n"] for o in mine] == [0, 1, 2, 3], "same key: arrival order"
        assert all(x["end"] <= y["start"] + 0.01 for x, y in zip(mine, mine[1:])), "same key: one at a time"
    a = [(o["start"], o["end"]) for o in outputs if o["key"] == "a"]
    b = [(o["start"], o["end"]) for o in outputs if o["key"] == "b"]
    assert peak_overlap(a + b) == 2, "keys a and b ran side by side"


async def test_results_chain_and_the_loop_guard_stops_a_loop(make_headwater):
    hw = await make_headwater("null", events={"max_chain_depth": "4"})
    fid = await function(hw)
    first = await subscribe(hw, types=["com.example.order"], function_id=fid, sinks=[{"kind": "event"}])
    second = await (await hw.client.post("/v1/subscriptions", json={
        "source": "result", "filters": {"subject": first["id"]}, "function_id": fid})).json()
    await send(hw, "order-1", type_="com.example.order", data={"n": 7})
    rows = await finished(hw, second["id"], 1)
    assert rows[0].input["output"] == {"n": 7} and rows[0].input["event_id"] == "order-1"

    # A subscription that feeds on its own results loops; the chain is cut at the depth limit.
    looper = await (await hw.client.post("/v1/subscriptions", json={
        "source": "result", "filter": "data.status = 'success'", "types": ["org.openstack.headwater.execution.success"],
        "function_id": fid, "sinks": [{"kind": "event"}]})).json()
    await send(hw, "order-2", type_="com.example.order", data={"n": 8})

    async def cut_letters():
        return [d for d in await hw.store.dead_letters.list() if d.subscription_id == looper["id"]]

    letters = await eventually(cut_letters)
    runs = await hw.store.executions.list(filters={"subscription_id": looper["id"]})
    assert 1 <= len(runs) <= 5, len(runs)
    assert letters and "chain depth" in letters[0].reason


@pytest.fixture
async def receiver():
    got = []

    async def handle(request):
        body = await request.read()
        got.append(verify(SECRET, request.headers.get(TIMESTAMP_HEADER, ""), body, request.headers.get(SIGNATURE_HEADER, "")))
        got.append(json.loads(body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook", got
    await runner.cleanup()


async def test_signed_callback_through_the_router(make_headwater, receiver):
    url, got = receiver
    hw = await make_headwater("null")
    fid = await function(hw)
    sub = await subscribe(hw, types=["com.example.cb"], function_id=fid, sinks=[{"kind": "http", "url": url, "secret": SECRET}])
    assert sub["sinks"] == [{"kind": "http", "url": url, "secret": "***"}], "the secret is not shown again"
    assert SECRET not in json.dumps(sub), "nor anywhere else in the subscription (options.sinks held it in clear)"
    for path in (f"/v1/subscriptions/{sub['id']}", "/v1/subscriptions"):
        assert SECRET not in await (await hw.client.get(path)).text()
    await send(hw, "cb-1", type_="com.example.cb", data={"n": 1})
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert got[0] is True, "signature verified by the receiver"
    assert got[1]["type"] == "org.openstack.headwater.execution.success" and got[1]["data"]["output"] == {"n": 1}


async def test_a_failing_callback_becomes_a_dead_letter(make_headwater):
    hw = await make_headwater("null")
    fid = await function(hw)
    sub = await subscribe(hw, types=["com.example.cb"], function_id=fid, sinks=[{"kind": "http", "url": "http://127.0.0.1:9/nothing"}])
    await send(hw, "cb-2", type_="com.example.cb")
    deadline = time.monotonic() + 10
    letters = []
    while not letters and time.monotonic() < deadline:
        letters = [d for d in await hw.store.dead_letters.list() if d.subscription_id == sub["id"]]
        await asyncio.sleep(0.05)
    assert letters and "result sink failed" in letters[0].reason
    assert (await hw.store.executions.list(filters={"subscription_id": sub["id"]}))[0].status == "success"
