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


async def _executions(hw, n: int, project: str = "default", same_time: bool = False, start: int = 0) -> list[str]:
    base = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=start)
    ids = []
    for i in range(n):
        at = base if same_time else base + dt.timedelta(seconds=i)
        row = await hw.store.executions.add(function_id="f", function_version=0, status="success", sync=True, input=None,
                                            project_id=project, attempts=1, created_at=at, updated_at=at)
        ids.append(row.id)
    return ids


async def _pages(hw, url: str) -> list[list[str]]:
    pages = []
    while url:
        resp = await hw.client.get(url)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        pages.append([e["id"] for e in body["executions"]])
        url = body.get("next")
    return pages


async def test_executions_are_listed_a_bounded_page_at_a_time(make_headwater):
    from router.api.executions import DEFAULT_PAGE

    hw = await make_headwater("null")
    ids = await _executions(hw, DEFAULT_PAGE + 5)
    first = await (await hw.client.get("/v1/executions")).json()
    assert [e["id"] for e in first["executions"]] == ids[:DEFAULT_PAGE]  # the default page, oldest first
    pages = await _pages(hw, "/v1/executions?limit=40")
    assert [len(p) for p in pages] == [40, 40, 25] and sum(pages, []) == ids
    # A page that ends exactly at the last row says so by an empty next page, never a repeat.
    assert await _pages(hw, f"/v1/executions?limit={DEFAULT_PAGE + 5}") == [ids, []]
    # Filters hold on every page; a write between pages neither repeats nor skips a row.
    first = await (await hw.client.get("/v1/executions?limit=50&status=success")).json()
    assert "status=success" in first["next"]
    late = await _executions(hw, 1, start=3600)
    rest = sum(await _pages(hw, first["next"]), [])
    assert [e["id"] for e in first["executions"]] + rest == ids + late


async def test_pages_of_executions_created_in_the_same_instant_are_ordered_by_id(make_headwater):
    hw = await make_headwater("null")
    ids = await _executions(hw, 7, same_time=True)
    assert sum(await _pages(hw, "/v1/executions?limit=3"), []) == sorted(ids)


async def test_a_page_larger_than_the_most_is_the_most(make_headwater):
    from router.api.executions import MAX_PAGE

    hw = await make_headwater("null")
    await _executions(hw, 3)
    body = await (await hw.client.get(f"/v1/executions?limit={MAX_PAGE * 50}")).json()
    assert len(body["executions"]) == 3 and "next" not in body


async def test_bad_page_parameters_are_a_400_naming_them(make_headwater):
    hw = await make_headwater("null")
    other = await _executions(hw, 1, project="someone-else")
    for query, name in (("limit=0", "limit"), ("limit=-1", "limit"), ("limit=ten", "limit"), ("limit=1.5", "limit"),
                        (f"limit={2 ** 70}", "limit"), ("marker=nope", "marker")):
        resp = await hw.client.get(f"/v1/executions?{query}")
        assert resp.status == 400, (query, resp.status)
        assert name in (await resp.json())["faultstring"], query
    # A well-formed id of no execution: 404, as GET /v1/executions/{id} answers.
    resp = await hw.client.get("/v1/executions?marker=" + "0" * 8 + "-0000-0000-0000-" + "0" * 12)
    assert resp.status == 404 and "marker" in (await resp.json())["faultstring"]
    # Under noauth every request is the admin of project `default`: another project's id is a
    # marker only with all_projects (the scope of the list it pages).
    resp = await hw.client.get(f"/v1/executions?marker={other[0]}&all_projects=true")
    assert resp.status == 200, await resp.text()

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
