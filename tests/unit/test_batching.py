"""Batching per subscription: one run for a batch of events, partial-batch failure retries only the failed ones."""

from __future__ import annotations

import asyncio

import pytest

from engine.null import NullEngine
from router.batching import BatchError, validate_batch
from router.events import execution_id_for
from router.plugins import ExecutionResult
from tests.unit.test_router_flow import make_function


class BatchEngine(NullEngine):
    """Records each run's event ids; the first run containing one of `fail_once` reports those failed."""

    def __init__(self, fail_once: set[str] = frozenset()):
        self.runs: list[list[str]] = []
        self.fail_once = set(fail_once)

    async def execute(self, request):
        ids = [e["id"] for e in request.input["events"]]
        self.runs.append(ids)
        failed = sorted(self.fail_once & set(ids))
        self.fail_once -= set(failed)
        return ExecutionResult(status="success", output={"failed": failed} if failed else {"ok": len(ids)}, reason="ok")


async def batch_headwater(make_headwater, engine, batch, delivery=None):
    hw = await make_headwater("null")
    hw.engine = hw.executions.engine = engine
    function_id = await make_function(hw)
    body = {"source": "http", "types": ["com.example.item"], "function_id": function_id, "batch": batch,
            "options": {"delivery": delivery or {"backoff_initial": 0.05, "jitter": 0, "max_attempts": 3}}}
    resp = await hw.client.post("/v1/subscriptions", json=body)
    assert resp.status == 201, await resp.text()
    return hw, await resp.json()


async def post_items(hw, ids):
    for event_id in ids:
        event = {"specversion": "1.0", "id": event_id, "source": "/items", "type": "com.example.item", "data": {"n": event_id}}
        assert (await hw.client.post("/v1/events", json=event)).status == 202


async def settled(hw, sub_id, ids, status="success"):
    for _ in range(1000):
        rows = [await hw.store.executions.find(execution_id_for("/items", i, sub_id)) for i in ids]
        if all(r is not None and r.status == status for r in rows):
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError([(r.id, r.status) if r else None for r in rows])


async def test_a_full_batch_is_one_run_with_every_event(make_headwater):
    engine = BatchEngine()
    hw, sub = await batch_headwater(make_headwater, engine, {"size": 4, "window": 300})
    assert sub["batch"] == {"size": 4, "window": 300.0}
    ids = [f"i{n}" for n in range(4)]
    await post_items(hw, ids)
    rows = await settled(hw, sub["id"], ids)
    assert [sorted(r) for r in engine.runs] == [ids]  # the size filled it: no wait for the 300 s window
    assert all(r.attempts == 1 and r.result["output"] == {"ok": 4} for r in rows)


async def test_the_window_runs_a_partial_batch(make_headwater):
    engine = BatchEngine()
    hw, sub = await batch_headwater(make_headwater, engine, {"size": 100, "window": 0.2})
    await post_items(hw, ["a", "b"])
    await settled(hw, sub["id"], ["a", "b"])
    assert [sorted(r) for r in engine.runs] == [["a", "b"]]


async def test_partial_batch_failure_retries_only_the_failed_events(make_headwater):
    engine = BatchEngine(fail_once={"i1", "i3"})
    hw, sub = await batch_headwater(make_headwater, engine, {"size": 5, "window": 0.2})
    ids = [f"i{n}" for n in range(5)]
    await post_items(hw, ids)
    rows = {r.event_id: r for r in await settled(hw, sub["id"], ids)}
    assert sorted(engine.runs[0]) == ids
    assert sorted(i for run in engine.runs[1:] for i in run) == ["i1", "i3"]  # only those ran again
    assert rows["i1"].attempts == rows["i3"].attempts == 2
    assert all(rows[i].attempts == 1 for i in ("i0", "i2", "i4"))


async def test_events_reported_failed_every_time_are_dead_lettered(make_headwater):
    class AlwaysFails(BatchEngine):
        async def execute(self, request):
            self.fail_once = {e["id"] for e in request.input["events"]}
            return await super().execute(request)

    hw, sub = await batch_headwater(make_headwater, AlwaysFails(), {"size": 2, "window": 0.1},
                                    delivery={"backoff_initial": 0.05, "jitter": 0, "max_attempts": 2})
    await post_items(hw, ["x", "y"])
    rows = await settled(hw, sub["id"], ["x", "y"], status="failed")
    assert all(r.attempts == 2 and r.reason == "batch_item_failed" for r in rows)
    letters = await hw.store.dead_letters.list()
    assert sorted(d.event_id for d in letters) == ["x", "y"]


@pytest.mark.parametrize("raw, fault", [
    ([], "batch must be an object"), ({"size": 0}, "batch.size must be an integer from 1"),
    ({"size": 2.5}, "batch.size must be an integer"), ({"size": True}, "batch.size must be an integer"),
    ({"size": 10, "window": 0}, "batch.window must be a number"), ({"size": 10, "window": "5s"}, "batch.window"),
    ({"size": 10, "colour": 1}, "unknown fields colour"), ({"window": 1}, "batch.size"),
])
async def test_invalid_batch_options_are_a_400_that_names_the_fault(make_headwater, raw, fault):
    with pytest.raises(BatchError, match=fault):
        validate_batch(raw)
    hw = await make_headwater("null")
    function_id = await make_function(hw)
    resp = await hw.client.post("/v1/subscriptions", json={"source": "http", "function_id": function_id, "batch": raw})
    assert resp.status == 400 and fault in (await resp.json())["faultstring"]
