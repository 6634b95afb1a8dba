"""The execution journal writes rows through the driver: what it writes must read back through the
store exactly as rows the ORM wrote, on SQLite and PostgreSQL, and a batch must say what it created."""

from __future__ import annotations

import asyncio
import datetime as _dt

import pytest

from router.store import Database
from router.store.journal import ExecutionJournal


async def _function(store):
    runtime = await store.runtimes.add(image="python3", status="available", project_id="p")
    return await store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="m.main", project_id="p")


@pytest.fixture
async def journal(store):
    journal = ExecutionJournal(store.db)
    await journal.start()
    yield journal
    await journal.stop()


async def test_start_and_finish_read_back_through_the_store(store, journal):
    function = await _function(store)
    lease = _dt.datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=_dt.timezone.utc)
    row, created = await journal.start_execution(dict(
        id="e1", function_id=function.id, function_version=0, status="running", sync=False,
        input={"container": "photos", "n": [1, 2.5, None], "ü": "✓"}, description="Created by Subscription s",
        project_id="p", event_id="ev1", subscription_id="s", lease_until=lease, attempts=1))
    assert created and row.id == "e1" and row.status == "running" and row.attempts == 1
    stored = await store.executions.get("e1")
    assert stored.input == {"container": "photos", "n": [1, 2.5, None], "ü": "✓"}
    assert stored.lease_until == lease and stored.sync is False and stored.result is None
    assert abs((stored.created_at - row.created_at).total_seconds()) < 1e-5

    finished = _dt.datetime(2026, 11, 24, 7, 0, 1, tzinfo=_dt.timezone.utc)
    await journal.finish("e1", status="success", result={"duration": 0.01, "output": "ok"}, logs="hello\n",
                         reason=None, updated_at=finished)
    stored = await store.executions.get("e1")
    assert (stored.status, stored.result, stored.logs, stored.reason) == ("success", {"duration": 0.01, "output": "ok"}, "hello\n", None)
    assert stored.updated_at == finished and stored.lease_until is None


async def test_a_second_start_finds_the_first_row(store, journal):
    function = await _function(store)
    values = dict(id="e2", function_id=function.id, status="running", project_id="p", input="plain text")
    first, second = await asyncio.gather(journal.start_execution(dict(values)), journal.start_execution(dict(values)))
    # Same batch or not, exactly one of them created the row.
    assert sorted([first[1], second[1]]) == [False, True]
    await journal.finish("e2", status="failed", result={"output": "boom"}, logs="", reason="function")
    row, created = await journal.start_execution(dict(values, status="running"))
    assert not created and row.status == "failed" and row.input == "plain text"


async def test_a_batch_of_starts_and_finishes_together(store, journal):
    """Starts and finishes queued together go in one batch (on PostgreSQL one statement): new rows
    are created, finishes land, and a repeated start of a row finished in the same batch creates
    nothing and reads the row back as it is after the batch."""
    function = await _function(store)
    values = dict(function_id=function.id, status="running", project_id="p", input={"k": 1})
    await journal.start_execution(dict(values, id="both-old"))
    batches = journal.batches
    finish, again, fresh = await asyncio.gather(
        journal.finish("both-old", status="success", result={"output": 1}, logs="", reason=None),
        journal.start_execution(dict(values, id="both-old")),
        journal.start_execution(dict(values, id="both-new")))
    assert journal.batches == batches + 1
    assert finish is None
    assert again[1] is False and again[0].status == "success" and again[0].result == {"output": 1}
    assert fresh[1] is True and fresh[0].status == "running"
    assert (await store.executions.get("both-old")).status == "success"
    assert (await store.executions.get("both-new")).status == "running"


async def test_many_writes_in_few_batches(store, journal):
    function = await _function(store)
    results = await asyncio.gather(*(journal.start_execution(dict(id=f"m{i}", function_id=function.id, status="running",
                                                                   project_id="p", input={"i": i})) for i in range(300)))
    assert all(created for _, created in results)
    assert journal.batches < 300  # grouped, not one transaction per write
    await asyncio.gather(*(journal.finish(f"m{i}", status="success", result={"output": i}, logs="", reason=None)
                           for i in range(300)))
    rows = {r.id: r for r in await store.executions.list(project_id="p")}
    assert all(rows[f"m{i}"].status == "success" and rows[f"m{i}"].result == {"output": i} for i in range(300))


async def test_a_bad_write_fails_alone(store, journal):
    function = await _function(store)
    good = journal.start_execution(dict(id="g1", function_id=function.id, status="running", project_id="p"))
    # No status: the NOT NULL constraint refuses the row, and only this caller hears of it.
    bad = journal.start_execution(dict(id="b1", function_id=function.id, status=None, project_id="p"))
    outcome = await asyncio.gather(good, bad, return_exceptions=True)
    assert outcome[0][1] is True
    assert isinstance(outcome[1], Exception)
    assert (await store.executions.get("g1")).status == "running"


async def test_a_failed_read_back_fails_only_the_starts_that_needed_it(store, journal, monkeypatch):
    """The batch is committed before rows that existed already are read back: if that read fails,
    only those starts fail. The batch is not written again, so the rows it created are still
    reported as created (written again, they would look like another worker's)."""
    function = await _function(store)
    values = dict(function_id=function.id, status="running", project_id="p")
    await journal.start_execution(dict(values, id="rb-old"))

    async def unreadable(ids):
        raise ConnectionError("connection lost")

    monkeypatch.setattr(journal, "_existing", unreadable)
    batches = journal.batches
    old, new = await asyncio.gather(journal.start_execution(dict(values, id="rb-old")),
                                    journal.start_execution(dict(values, id="rb-new")), return_exceptions=True)
    assert isinstance(old, ConnectionError)
    assert new[1] is True and new[0].id == "rb-new"
    assert journal.batches == batches + 1  # one write, no one-by-one retry


def test_in_memory_sqlite_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="in-memory SQLite"):
        ExecutionJournal(Database("sqlite+aiosqlite:///:memory:"))


def _lease(seconds: float) -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=seconds)


async def test_a_claim_inserts_the_row_leased(store, journal):
    function = await _function(store)
    lease = _lease(60)
    row, created, claimed = await journal.claim_execution(dict(
        id="c1", function_id=function.id, status="running", sync=False, project_id="p", input={"k": 1},
        lease_until=lease, attempts=1))
    assert (created, claimed, row.attempts, row.input) == (True, True, 1, {"k": 1})
    stored = await store.executions.get("c1")
    assert stored.attempts == 1 and stored.lease_until == lease


async def test_a_claim_takes_over_a_row_nobody_holds(store, journal):
    """A webhook records its execution at publish (no lease, no attempt); the router's claim takes
    that row over in its one write, counting the attempt, and says it did not create it."""
    function = await _function(store)
    values = dict(id="c2", function_id=function.id, status="running", sync=False, project_id="p", input={"k": 2})
    await journal.start_execution(dict(values))
    row, created, claimed = await journal.claim_execution(dict(values, lease_until=_lease(60), attempts=1))
    assert (created, claimed, row.attempts) == (False, True, 1)
    assert (await store.executions.get("c2")).attempts == 1


async def test_a_claim_does_not_take_a_live_lease_or_a_finished_row(store, journal):
    function = await _function(store)
    values = dict(function_id=function.id, status="running", sync=False, project_id="p")
    held_until = _lease(60)
    await journal.claim_execution(dict(values, id="held", lease_until=held_until, attempts=1))
    await journal.start_execution(dict(values, id="done"))
    await journal.finish("done", status="success", result={"output": 1}, logs="", reason=None)
    held, done = await asyncio.gather(journal.claim_execution(dict(values, id="held", lease_until=_lease(90), attempts=1)),
                                      journal.claim_execution(dict(values, id="done", lease_until=_lease(90), attempts=1)))
    assert held[1:] == (False, False) and held[0].attempts == 1 and held[0].lease_until == held_until
    assert done[1:] == (False, False) and done[0].status == "success"
    assert (await store.executions.get("held")).lease_until == held_until


async def test_a_claim_takes_over_a_row_whose_lease_ran_out(store, journal):
    """A worker died holding it: its lease ran out, the next claim owns it and counts attempt 2."""
    function = await _function(store)
    values = dict(id="expired", function_id=function.id, status="running", sync=False, project_id="p")
    await journal.claim_execution(dict(values, lease_until=_lease(-5), attempts=1))
    row, created, claimed = await journal.claim_execution(dict(values, lease_until=_lease(60), attempts=1))
    assert (created, claimed, row.attempts) == (False, True, 2)


async def test_two_claims_of_one_row_in_a_batch_one_wins(store, journal):
    function = await _function(store)
    values = dict(id="twice", function_id=function.id, status="running", sync=False, project_id="p",
                  lease_until=_lease(60), attempts=1)
    batches = journal.batches
    first, second = await asyncio.gather(journal.claim_execution(dict(values)), journal.claim_execution(dict(values)))
    assert journal.batches == batches + 1
    assert first[1:] == (True, True) and second[1:] == (False, False) and second[0].attempts == 1


async def test_claims_starts_and_finishes_in_one_batch(store, journal):
    function = await _function(store)
    values = dict(function_id=function.id, status="running", sync=False, project_id="p")
    await journal.start_execution(dict(values, id="mix-old"))
    batches = journal.batches
    finish, start, claim = await asyncio.gather(
        journal.finish("mix-old", status="success", result={"output": 1}, logs="", reason=None),
        journal.start_execution(dict(values, id="mix-new")),
        journal.claim_execution(dict(values, id="mix-claim", lease_until=_lease(60), attempts=1)))
    assert journal.batches == batches + 1
    assert finish is None and start[1] is True and claim[1:] == (True, True)
    assert (await store.executions.get("mix-old")).status == "success"


async def test_a_small_batch_waits_for_a_write_lock_held_elsewhere(store, journal):
    """SQLite: a small batch is written on the event loop, but when another connection holds the
    write lock it goes to the writer's thread and commits once the lock is released."""
    if not store.db.is_sqlite:
        pytest.skip("SQLite's write lock")
    import sqlite3

    function = await _function(store)
    holder = sqlite3.connect(store.db.url.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        pending = journal.start_execution(dict(id="locked", function_id=function.id, status="running", project_id="p"))
        done, _ = await asyncio.wait({pending}, timeout=0.2)
        assert not done  # waiting for the lock, the event loop still free to run this test
    finally:
        holder.execute("COMMIT")
        holder.close()
    row, created = await pending
    assert created and (await store.executions.get("locked")).status == "running"
