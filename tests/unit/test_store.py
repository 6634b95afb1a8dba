"""The store behaves the same on SQLite and PostgreSQL: CRUD, scoping, filters, idempotent starts,
compare-and-set schedules, batch finishes, migrations."""

from __future__ import annotations

import datetime as dt

import pytest

from router.store import Conflict, NotFound
from router.store.repositories import InvalidFilter, parse_filter

UTC = dt.timezone.utc


async def _function(store, project="p1"):
    runtime = await store.runtimes.add(image="python3", status="available", project_id=project)
    return await store.functions.add(runtime_id=runtime.id, code={"source": "package", "md5sum": "x"},
                                     entry="main.main", cpu=100, memory_size=33554432, timeout=5, project_id=project)


async def test_migrate_is_idempotent_and_reaches_head(store):
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from router.store.db import MIGRATIONS_DIR

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert await store.db.migrate() == head
    assert await store.db.migrate() == head


async def test_runtime_crud_and_visibility(store):
    public = await store.runtimes.add(image="python3", status="available", project_id="admin")
    private = await store.runtimes.add(image="nodejs", status="available", project_id="p2", is_public=False)
    assert public.is_public and public.trusted
    assert public.created_at.tzinfo is not None
    visible_to_p1 = {r.id for r in await store.runtimes.visible("p1")}
    assert visible_to_p1 == {public.id}
    assert {r.id for r in await store.runtimes.visible("p2")} == {public.id, private.id}
    updated = await store.runtimes.update(public.id, {"name": "py"})
    assert updated.name == "py" and updated.updated_at is not None
    await store.runtimes.delete(private.id)
    with pytest.raises(NotFound, match=r"Runtime not found \[id="):
        await store.runtimes.get(private.id)


async def test_project_scoping(store):
    fn = await _function(store, "p1")
    assert (await store.functions.get(fn.id, project_id="p1")).id == fn.id
    with pytest.raises(NotFound):
        await store.functions.get(fn.id, project_id="p2")
    assert await store.functions.list(project_id="p2") == []
    assert [f.id for f in await store.functions.list()] == [fn.id]


async def test_json_columns_round_trip(store):
    fn = await _function(store)
    ex = await store.executions.add(function_id=fn.id, status="running", input=[1, "two", {"3": None}], project_id="p1")
    got = await store.executions.get(ex.id)
    assert got.input == [1, "two", {"3": None}]
    assert (await store.functions.get(fn.id)).code == {"source": "package", "md5sum": "x"}


async def test_filters_with_operators(store):
    fn = await _function(store)
    for i, status in enumerate(["success", "failed", "running", "success"]):
        await store.executions.add(function_id=fn.id, status=status, description=f"Created by Job j{i}",
                                   function_version=i, project_id="p1")
    assert len(await store.executions.list(filters={"status": "success"})) == 2
    assert len(await store.executions.list(filters={"status": "in:failed,running"})) == 2
    assert len(await store.executions.list(filters={"status": "neq:success"})) == 2
    assert len(await store.executions.list(filters={"description": "has:j2"})) == 1
    assert len(await store.executions.list(filters={"function_version": "gte:2"})) == 2
    with pytest.raises(InvalidFilter):
        await store.executions.list(filters={"nope": "x"})
    with pytest.raises(InvalidFilter):
        await store.executions.list(filters={"function_version": "gt:abc"})


def test_parse_filter():
    assert parse_filter("in:a,b") == ("in", ["a", "b"])
    assert parse_filter("gt:5") == ("gt", "5")
    assert parse_filter("plain:value") == ("eq", "plain:value")
    assert parse_filter("x") == ("eq", "x")


async def test_alias_uniqueness(store):
    fn = await _function(store)
    await store.aliases.add(name="prod", function_id=fn.id, function_version=0, project_id="p1")
    with pytest.raises(Conflict, match="Duplicate entry for function_aliases"):
        await store.aliases.add(name="prod", function_id=fn.id, function_version=1, project_id="p1")
    assert (await store.aliases.by_name("prod", project_id="p1")).function_id == fn.id
    with pytest.raises(NotFound):
        await store.aliases.by_name("prod", project_id="p2")


async def test_execution_start_is_idempotent(store):
    fn = await _function(store)
    first, created = await store.executions.start(id="e-1", function_id=fn.id, status="running", project_id="p1", event_id="ev")
    assert created
    await store.executions.finish("e-1", status="success", result={"output": 1}, logs="hi", reason="ok")
    again, created = await store.executions.start(id="e-1", function_id=fn.id, status="running", project_id="p1", event_id="ev")
    assert not created and again.status == "success"


async def test_finish_many(store):
    fn = await _function(store)
    ids = [f"e-{i}" for i in range(5)]
    for id_ in ids:
        await store.executions.add(id=id_, function_id=fn.id, status="running", project_id="p1")
    await store.executions.finish_many([{"id": id_, "status": "success", "result": {"output": id_}, "logs": "", "reason": "ok"} for id_ in ids])
    rows = {r.id: r for r in await store.executions.list()}
    assert all(rows[i].status == "success" and rows[i].result == {"output": i} for i in ids)


async def test_advance_schedule_compare_and_set(store):
    fn = await _function(store)
    t0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    sub = await store.subscriptions.add(source="cron", function_id=fn.id, pattern="* * * * *", next_execution_time=t0,
                                        count=2, status="running", project_id="p1")
    t1 = t0 + dt.timedelta(minutes=1)
    assert await store.subscriptions.advance_schedule(sub.id, t0, t1)
    assert not await store.subscriptions.advance_schedule(sub.id, t0, t1), "a second replica must lose the race"
    row = await store.subscriptions.get(sub.id)
    assert row.next_execution_time == t1 and row.count == 1 and row.status == "running"
    assert await store.subscriptions.advance_schedule(sub.id, t1, t1 + dt.timedelta(minutes=1))
    row = await store.subscriptions.get(sub.id)
    assert row.count == 0 and row.status == "done"
    assert not await store.subscriptions.advance_schedule(sub.id, row.next_execution_time, None)


async def test_one_shot_schedule_is_done_after_firing(store):
    fn = await _function(store)
    t0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    sub = await store.subscriptions.add(source="cron", function_id=fn.id, next_execution_time=t0, count=1, project_id="p1")
    assert await store.subscriptions.advance_schedule(sub.id, t0, None)
    assert (await store.subscriptions.get(sub.id)).status == "done"


async def test_cascade_delete_versions(store):
    fn = await _function(store)
    await store.versions.add(function_id=fn.id, version_number=1, project_id="p1")
    assert len(await store.versions.for_function(fn.id)) == 1
    await store.functions.delete(fn.id)
    assert await store.versions.for_function(fn.id) == []


async def test_claim_is_exclusive_until_the_lease_runs_out(store):
    fn = await _function(store)
    await store.executions.add(id="e-claim", function_id=fn.id, status="running", project_id="p1")
    assert await store.executions.claim("e-claim", 60)
    assert not await store.executions.claim("e-claim", 60), "a live lease belongs to its holder"
    # the holder died: its lease runs out and another worker may take over
    await store.executions.update("e-claim", {"lease_until": dt.datetime.now(UTC) - dt.timedelta(seconds=1)})
    assert await store.executions.claim("e-claim", 60)
    assert (await store.executions.get("e-claim")).attempts == 2
    await store.executions.finish("e-claim", status="success", result=None, logs="", reason="ok")
    assert not await store.executions.claim("e-claim", 60), "a finished execution is never claimed again"
