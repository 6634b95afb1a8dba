"""Batch routing: what the bus has ready goes to the dispatcher as one batch, recorded by one journal
write, each event acked as soon as its own execution is recorded; a lone event goes at once."""

from __future__ import annotations

import asyncio
import json

import pytest

from router.events import Event, execution_id_for
from router.plugins import ExecutionResult
from tests.conditions import eventually
from tests.unit.test_router_flow import make_function, wait_status


@pytest.fixture(params=["sqlite", "memory"])
async def hw(request, make_headwater):
    return await make_headwater("null", bus={"backend": request.param})


async def subscribe(hw, event_type: str, **options) -> dict:
    function_id = await make_function(hw)
    resp = await hw.client.post("/v1/subscriptions", json={"source": "http", "types": [event_type],
                                                           "function_id": function_id, **options})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def batch_sizes(hw) -> list[int]:
    """The sizes of the batches the dispatcher gets from now on (it consumes again, with a spy)."""
    sizes: list[int] = []
    handle_batch = hw.dispatcher.handle_batch

    async def spy(deliveries):
        sizes.append(len(deliveries))
        await handle_batch(deliveries)

    hw.dispatcher.handle_batch = spy
    await hw.dispatcher.stop()
    await hw.dispatcher.start()
    return sizes


def event(i: int, event_type: str = "batch.test") -> Event:
    return Event(id=f"b-{i}", source="/batch", type=event_type, data={"i": i}, extensions={"sourcekind": "http"})


async def test_events_ready_together_are_recorded_by_few_journal_writes(hw):
    sub = await subscribe(hw, "batch.test")
    calls = await batch_sizes(hw)
    writes_before = hw.executions.journal.batches
    await asyncio.gather(*(hw.bus.publish(event(i)) for i in range(60)))
    for i in range(60):
        execution = await wait_status(hw, execution_id_for("/batch", f"b-{i}", sub["id"]))
        assert execution["status"] == "success" and json.loads(execution["result"])["output"] == {"i": i}
    assert sum(calls) == 60 and max(calls) > 1, calls
    # A start and a finish each per event, one by one, would be 120 writes.
    assert hw.executions.journal.batches - writes_before < 60
    rows = await hw.store.executions.list()
    assert len(rows) == 60 and {r.attempts for r in rows} == {1}


async def test_a_slow_execution_holds_back_no_other_of_its_batch(hw):
    sub = await subscribe(hw, "batch.test")
    release = asyncio.Event()
    engine_execute = hw.engine.execute

    async def execute(request):
        if request.input == {"i": 0}:
            await release.wait()
        return await engine_execute(request)

    hw.engine.execute = execute
    try:
        await asyncio.gather(*(hw.bus.publish(event(i)) for i in range(20)))
        for i in range(1, 20):
            assert (await wait_status(hw, execution_id_for("/batch", f"b-{i}", sub["id"])))["status"] == "success"
        slow = await hw.store.executions.get(execution_id_for("/batch", "b-0", sub["id"]))
        assert slow.status == "running"
    finally:
        release.set()
    assert (await wait_status(hw, execution_id_for("/batch", "b-0", sub["id"])))["status"] == "success"


async def test_a_duplicate_within_a_batch_runs_once(hw):
    sub = await subscribe(hw, "batch.test")
    await asyncio.gather(*(hw.bus.publish(event(1)) for _ in range(3)), *(hw.bus.publish(event(i)) for i in range(2, 6)))
    for i in range(1, 6):
        await wait_status(hw, execution_id_for("/batch", f"b-{i}", sub["id"]))
    await eventually(lambda: hw.metrics.duplicates._value.get() >= 2)
    rows = await hw.store.executions.list()
    assert len(rows) == 5 and {r.attempts for r in rows} == {1}


async def test_a_failure_in_a_batch_is_retried_alone(hw):
    sub = await subscribe(hw, "batch.test", options={"delivery": {"max_attempts": 2, "backoff_initial": 0.05,
                                                                  "backoff_max": 0.05, "jitter": 0}})
    engine_execute = hw.engine.execute
    failed = []

    async def execute(request):
        if request.input == {"i": 3} and not failed:
            failed.append(request.execution_id)
            return ExecutionResult(status="error", output="boom", duration=0.0, logs="", reason="platform")
        return await engine_execute(request)

    hw.engine.execute = execute
    await asyncio.gather(*(hw.bus.publish(event(i)) for i in range(8)))
    ids = [execution_id_for("/batch", f"b-{i}", sub["id"]) for i in range(8)]

    async def all_succeeded() -> bool:
        return {r.id: r.status for r in await hw.store.executions.list()} == dict.fromkeys(ids, "success")

    await eventually(all_succeeded)
    rows = {r.id: r for r in await hw.store.executions.list()}
    assert rows[execution_id_for("/batch", "b-3", sub["id"])].attempts == 2
    assert {r.attempts for key, r in rows.items() if key != execution_id_for("/batch", "b-3", sub["id"])} == {1}


async def test_a_lone_event_is_not_held_back_to_make_a_batch(hw):
    """A batch is never a wait: one event goes through the one-event path at once."""
    sub = await subscribe(hw, "batch.test")
    sizes = await batch_sizes(hw)
    await hw.bus.publish(event(1))
    assert (await wait_status(hw, execution_id_for("/batch", "b-1", sub["id"])))["status"] == "success"
    assert sizes == [1]
