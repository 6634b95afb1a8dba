"""The store behaves the same on SQLite and PostgreSQL: CRUD, scoping, filters, idempotent starts,
compare-and-set schedules, batch finishes, migrations."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from router.store import Conflict, NotFound, models
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


async def test_migrated_schema_matches_the_models(store):
    """What the migrations build is what the models say: no table, column or index differs."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from router.store.models import Base

    def differences(sync_conn):
        return compare_metadata(MigrationContext.configure(sync_conn), Base.metadata)

    async with store.db.engine.connect() as conn:
        assert await conn.run_sync(differences) == []


@pytest.mark.parametrize("store", ["postgresql"], indirect=True)
async def test_finishing_an_execution_is_an_update_in_place_on_postgresql(store):
    """On PostgreSQL the finish (status, result, lease…) is a HOT update: it writes no index entry,
    which needs every changed column unindexed and room on the row's page (fillfactor 50)."""
    function = await _function(store)
    ids = [f"hot-{i}" for i in range(50)]
    for id_ in ids:
        await store.executions.add(id=id_, function_id=function.id, function_version=0, status="running", sync=False,
                                   input={"k": "v" * 100}, project_id="p1", event_id=f"ev-{id_}", subscription_id="s")
    table = models.Execution.__table__
    stats = sa.text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'executions' "
                    "AND schemaname = current_schema()")
    async with store.db.engine.connect() as conn:
        for id_ in ids:  # one transaction each, as finishes commit batch by batch
            await conn.execute(sa.update(table).where(table.c.id == id_).values(
                status="success", result={"duration": 0.01, "output": "x" * 100}, logs="done\n", reason=None,
                updated_at=models.utcnow(), lease_until=None))
            await conn.commit()
        await conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))  # this backend's counts, now
        await conn.commit()
        await conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        updated, in_place = (await conn.execute(stats)).one()
    # A row whose new version outgrows what is free on its page moves (rarely: the page's old
    # versions are pruned once no transaction sees them); with the status indexed, none would stay.
    assert updated == 50 and in_place >= 45


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
