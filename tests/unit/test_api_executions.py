"""GET /v1/executions shows Headwater's fields beside Qinling's: attempts, and start/finish to the millisecond."""

from __future__ import annotations

import asyncio
import datetime as dt
import re


async def test_executions_show_attempts_and_millisecond_times(make_headwater):
    hw = await make_headwater("null")
    started = dt.datetime(2026, 12, 4, 15, 35, 37, 123456, tzinfo=dt.timezone.utc)
    row = await hw.store.executions.add(function_id="f", function_version=0, status="retrying", sync=False, input=None,
                                        project_id="default", subscription_id="s", event_id="e", attempts=2,
                                        created_at=started, updated_at=started + dt.timedelta(milliseconds=250))
    shown = await (await hw.client.get(f"/v1/executions/{row.id}")).json()
    assert shown["attempts"] == 2 and shown["status"] == "retrying"
    assert shown["started_at"] == "2026-12-04T15:35:37.123Z" and shown["finished_at"] is None
    assert shown["created_at"] == "2026-12-04T15:35:37Z"  # Qinling's field keeps Qinling's format
    await hw.store.executions.update(row.id, {"status": "failed", "attempts": 3,
                                              "updated_at": started + dt.timedelta(seconds=2, milliseconds=7)})
    listed = (await (await hw.client.get("/v1/executions")).json())["executions"]
    (shown,) = [e for e in listed if e["id"] == row.id]
    assert shown["attempts"] == 3 and shown["finished_at"] == "2026-12-04T15:35:39.130Z"


async def test_a_run_through_the_api_has_millisecond_times(make_headwater):
    hw = await make_headwater("null")
    runtime = await hw.store.runtimes.add(image="python3", status="available", project_id="default")
    function = await hw.store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="m.main", cpu=100,
                                            memory_size=33554432, timeout=5, project_id="default")
    resp = await hw.client.post("/v1/executions", json={"function_id": function.id, "input": "{}"})
    shown = await resp.json()
    assert resp.status == 201 and shown["attempts"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", shown["started_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", shown["finished_at"])


async def _function(hw):
    runtime = await hw.store.runtimes.add(image="python3", status="available", project_id="default")
    return await hw.store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="m.main",
                                        project_id="default")


async def test_sync_and_async_executions_are_recorded_and_counted(make_headwater):
    """Both go through the execution journal: the sync answer is what the store holds, an async
    execution exists when its id is answered, and the function's count (summed in memory, written
    in one update) includes both."""
    hw = await make_headwater("null")
    function = await _function(hw)
    sync = await (await hw.client.post("/v1/executions", json={"function_id": function.id, "input": {"k": 1}})).json()
    stored = await hw.store.executions.get(sync["id"])
    assert sync["status"] == stored.status == "success" and stored.result["output"] == {"k": 1} and stored.sync
    resp = await hw.client.post("/v1/executions", json={"function_id": function.id, "input": "x", "sync": False})
    assert resp.status == 201
    shown = await hw.client.get(f"/v1/executions/{(await resp.json())['id']}")
    assert shown.status == 200 and (await shown.json())["sync"] is False
    await hw.executions.flush_counts()
    assert (await hw.store.functions.get(function.id)).count == 2


async def test_a_sync_execution_whose_record_cannot_be_written_is_stopped(make_headwater, monkeypatch):
    """The run starts while its record is being written; when that write fails, the caller hears
    of it and the engine call is cancelled, not left running unrecorded."""
    hw = await make_headwater("null")
    function = await _function(hw)
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def engine_execute(request):
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    monkeypatch.setattr(hw.executions.engine, "execute", engine_execute)

    def failing_start(values):
        future = asyncio.get_running_loop().create_future()

        async def fail():
            await entered.wait()  # the run has started: the failure must stop it
            future.set_exception(ConnectionError("database went away"))

        asyncio.ensure_future(fail())
        return future

    monkeypatch.setattr(hw.executions.journal, "start_execution", failing_start)
    resp = await hw.client.post("/v1/executions", json={"function_id": function.id, "input": "x"})
    assert resp.status == 500
    await asyncio.wait_for(cancelled.wait(), 30)


async def test_an_execution_of_another_project_is_not_shown(make_headwater):
    hw = await make_headwater("null")
    row = await hw.store.executions.add(function_id="f", status="success", sync=True, project_id="other")
    assert (await hw.store.scoped("default").executions.find(row.id)) is None
    assert (await hw.store.scoped("other").executions.get(row.id)).id == row.id
    missing = await hw.client.get("/v1/executions/no-such-id")
    assert missing.status == 404 and "Execution not found [id=no-such-id]" in await missing.text()
