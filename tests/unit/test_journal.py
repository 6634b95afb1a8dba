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
