"""The index follows the subscriptions table change by change: another replica's create, update and
delete reach this one through the change log (two Headwaters on one database), an idle check reads
one row and nothing else, a change committed while a check runs is not missed, revisions commit in
order on PostgreSQL, and a replica the log was pruned past reloads in full."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from router.events import Event
from router.index import SOURCE_KIND_EXTENSION
from router.store import models
from router.store.repositories import record_subscription_change
from tests.conditions import eventually
from tests.services import POSTGRES_URL, require_service


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request, tmp_path):
    """One database two Headwaters share: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"hwf_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture
async def replicas(make_headwater, database_url):
    a = await make_headwater("null", database={"connection": database_url})
    b = await make_headwater("null", database={"connection": database_url})
    return a, b


async def hold_still(hw) -> None:
    """Stop the replica's follow loop, so that only the test's own checks run."""
    hw._refresher.cancel()
    await asyncio.gather(hw._refresher, return_exceptions=True)


class Counting:
    """The real repository, counting the calls the feed makes (and running `before` hooks)."""

    def __init__(self, real):
        self.real = real
        self.calls: dict[str, int] = {}
        self.before: dict[str, object] = {}
        self.after: dict[str, object] = {}

    def __getattr__(self, name):
        method = getattr(self.real, name)

        async def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.before:
                await self.before.pop(name)()
            result = await method(*args, **kwargs)
            if name in self.after:
                await self.after.pop(name)()
            return result
        return call


async def function(hw) -> str:
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    row = await hw.store.functions.add(runtime_id=runtime["id"], code={"source": "package"}, entry="m.main",
                                       project_id="default")
    return row.id


def event(type_: str = "com.example.feed") -> Event:
    return Event.from_dict({"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": type_,
                            SOURCE_KIND_EXTENSION: "http"})


async def test_another_replicas_create_update_and_delete_reach_this_index(replicas):
    a, b = replicas
    fid = await function(a)
    resp = await a.client.post("/v1/subscriptions", json={"source": "http", "function_id": fid, "types": ["com.example.feed"]})
    assert resp.status == 201, await resp.text()
    one = (await resp.json())["id"]
    resp = await a.client.post("/v1/subscriptions/batch", json={"subscriptions": [
        {"source": "http", "function_id": fid, "types": [f"com.example.batch{i}"]} for i in range(3)]})
    assert resp.status == 201, await resp.text()
    batch = [s["id"] for s in (await resp.json())["subscriptions"]]
    assert a.index.get(one) and all(a.index.get(i) for i in batch)  # the writer's own index at once

    assert await b.subscription_feed.check()
    assert [s.id for s in b.index.match(event())] == [one]
    assert [s.id for s in b.index.match(event("com.example.batch2"))] == [batch[2]]

    resp = await a.client.put(f"/v1/subscriptions/{one}", json={"types": ["com.example.renamed"]})
    assert resp.status == 200, await resp.text()
    assert await b.subscription_feed.check()
    assert b.index.match(event()) == []
    assert [s.id for s in b.index.match(event("com.example.renamed"))] == [one]

    assert (await a.client.delete(f"/v1/subscriptions/{batch[0]}")).status == 204
    assert await b.subscription_feed.check()
    assert b.index.get(batch[0]) is None and b.index.get(batch[1]) is not None

    # The follow loop does the same by itself (no explicit check): a delete from A leaves B.
    assert (await a.client.delete(f"/v1/subscriptions/{batch[1]}")).status == 204
    await eventually(lambda: b.index.get(batch[1]) is None)
    # All of it without reading the table whole again (the load at start is the only one).
    assert a.subscription_feed.full_loads == b.subscription_feed.full_loads == 1
    assert sorted(s.id for s in b.index.all()) == sorted(r.id for r in await b.store.subscriptions.all())


async def test_an_idle_check_reads_the_revision_and_nothing_else(replicas):
    a, b = replicas
    fid = await function(a)
    resp = await a.client.post("/v1/subscriptions/batch", json={"subscriptions": [
        {"source": "http", "function_id": fid, "types": [f"t{i}"]} for i in range(50)]})
    assert resp.status == 201
    await hold_still(b)
    assert await b.subscription_feed.check()
    counting = b.subscription_feed.repository = Counting(b.subscription_feed.repository)
    for _ in range(5):
        assert not await b.subscription_feed.check()
    assert counting.calls == {"revision": 5}
    assert len(b.index) == 50


async def test_an_own_batch_is_not_read_back_by_the_next_check(replicas):
    a, _ = replicas
    await hold_still(a)
    fid = await function(a)
    counting = a.subscription_feed.repository = Counting(a.subscription_feed.repository)
    resp = await a.client.post("/v1/subscriptions/batch", json={"subscriptions": [
        {"source": "http", "function_id": fid} for _ in range(20)]})
    assert resp.status == 201
    assert await a.subscription_feed.check()  # moves past its own revision
    assert "by_ids" not in counting.calls  # what it wrote was filed as written
    assert len(a.index) == 20


@pytest.mark.parametrize("during", ["changes_after", "by_ids"])
async def test_a_change_committed_during_a_check_is_not_missed(replicas, during):
    """A's writes land while B's check is between its reads: after the revision and change list
    were read (so the check cannot know of them), or while the rows are read. B's next check
    must bring them in; nothing is skipped by the revision B moved to."""
    a, b = replicas
    fid = await function(a)
    first = await a.store.subscriptions.add(source="http", function_id=fid, types=["x.first"], project_id="default")
    late: list[str] = []

    async def write_meanwhile():
        row = await a.store.subscriptions.add(source="http", function_id=fid, types=["x.late"], project_id="default")
        late.append(row.id)
        await a.store.subscriptions.update(first.id, {"types": ["x.moved"]})

    await hold_still(b)
    counting = b.subscription_feed.repository = Counting(b.subscription_feed.repository)
    counting.after[during] = write_meanwhile
    assert await b.subscription_feed.check()
    assert late, "the concurrent write ran"
    await b.subscription_feed.check()
    assert b.index.get(late[0]) is not None
    assert b.index.get(first.id).types == ("x.moved",)
    assert b.subscription_feed.revision == await b.store.subscriptions.revision()


async def test_an_unmatched_event_checks_before_it_is_dropped(replicas):
    """An event published after B last looked, aimed at a subscription only A's write made, finds
    it: the dispatcher asks the feed to catch up before dropping it."""
    a, b = replicas
    fid = await function(a)
    row = await a.store.subscriptions.add(source="http", function_id=fid, types=["x.fresh"], project_id="default")
    probe = event("x.fresh")
    probe.time = models.utcnow()
    assert b.index.match(probe) == []
    assert await b.subscription_feed.catch_up(probe.time)
    assert [s.id for s in b.index.match(probe)] == [row.id]


async def test_a_replica_the_log_was_pruned_past_reloads_in_full(replicas):
    a, b = replicas
    fid = await function(a)
    rows = [await a.store.subscriptions.add(source="http", function_id=fid, project_id="default") for _ in range(3)]
    await a.store.subscriptions.delete(rows[0].id)
    async with a.db.sessions() as session:  # as the pruning does to revisions older than it keeps
        await session.execute(sa.delete(models.SubscriptionChange.__table__)
                              .where(models.SubscriptionChange.revision <= 2))
        await session.commit()
    assert await b.subscription_feed.check()
    assert b.subscription_feed.full_loads == 2
    assert sorted(s.id for s in b.index.all()) == sorted(r.id for r in rows[1:])


async def test_a_bad_row_does_not_stop_the_others(replicas):
    a, b = replicas
    fid = await function(a)
    bad = await a.store.subscriptions.add(source="http", function_id=fid, project_id="default",
                                          options={"filter": "this is ( not an expression"})
    good = await a.store.subscriptions.add(source="http", function_id=fid, project_id="default")
    assert await b.subscription_feed.check()
    assert b.index.get(good.id) is not None and b.index.get(bad.id) is None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_revisions_commit_in_order_on_postgresql(replicas):
    """A writer holding revision N uncommitted makes the next writer wait for it: a reader never
    sees N+1 before N, which is what lets a check move to the newest revision it read."""
    a, b = replicas
    await hold_still(b)
    fid = await function(a)
    before = await b.store.subscriptions.revision()
    held = a.db.sessions()
    async with held as session:
        table = models.Subscription.__table__
        await session.execute(sa.insert(table).values(id="held-sub", source="http", kind="subscription", types=[],
                                                      filters={}, status="running", options={}, project_id="default",
                                                      function_id=fid, created_at=models.utcnow()))
        revision = await record_subscription_change(session, ["held-sub"])
        assert revision == before + 1
        second = asyncio.create_task(a.store.subscriptions.add(source="http", function_id=fid, project_id="default"))

        async def second_waits_for_the_lock():
            async with b.db.engine.connect() as conn:
                waiting = await conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"))
                return waiting.scalar_one() >= 1
        await eventually(second_waits_for_the_lock)
        assert not second.done()
        assert not await b.subscription_feed.check()  # revision N is not visible yet, nor anything after it
        await session.commit()
    row = await second
    assert await b.store.subscriptions.changes_after(before) == [(before + 1, "held-sub"), (before + 2, row.id)]
    assert await b.subscription_feed.check()
    assert b.index.get("held-sub") is not None and b.index.get(row.id) is not None
