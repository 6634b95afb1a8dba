"""ExecutionJournal: group commit for the routing hot path. Execution starts and finishes from many
concurrent deliveries are written by one task on one held connection, many per transaction, and
each caller resumes when its own write is committed."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from router.store import models
from router.store.db import Database

log = logging.getLogger(__name__)

MAX_BATCH = 500


@dataclass
class _Write:
    kind: str  # "start" | "finish"
    values: dict[str, Any]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ExecutionJournal:
    def __init__(self, db: Database):
        self.db = db
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._conn: AsyncConnection | None = None
        table = models.Execution.__table__
        dialect_insert = sqlite.insert if db.is_sqlite else postgresql.insert
        self._insert = dialect_insert(table).on_conflict_do_nothing(index_elements=[table.c.id]).returning(table.c.id)
        self._finish = (sa.update(table).where(table.c.id == sa.bindparam("b_id"))
                        .values(status=sa.bindparam("b_status"), result=sa.bindparam("b_result", type_=sa.JSON),
                                logs=sa.bindparam("b_logs"), reason=sa.bindparam("b_reason"),
                                updated_at=sa.bindparam("b_updated_at", type_=models.UTCDateTime), lease_until=None))
        self._columns = {c.name for c in table.columns}
        self.batches = 0
        self.writes = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="execution-journal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def start_execution(self, values: dict[str, Any]) -> tuple[models.Execution, bool]:
        """Insert the execution unless one with its id exists: (row, created)."""
        return await self._submit(_Write("start", values))

    async def finish(self, execution_id: str, *, status: str, result: Any, logs: str, reason: str,
                     updated_at=None) -> None:
        await self._submit(_Write("finish", {"b_id": execution_id, "b_status": status, "b_result": result,
                                              "b_logs": logs, "b_reason": reason,
                                              "b_updated_at": updated_at or models.utcnow()}))

    async def _submit(self, write: _Write):
        if self._task is None:
            raise RuntimeError("the execution journal is not started")
        self._queue.put_nowait(write)
        return await write.future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._write(batch)
            except asyncio.CancelledError:
                for write in batch:
                    if not write.future.done():
                        write.future.cancel()
                raise
            except Exception as exc:
                # One bad write must not fail the others: retry each alone, so only it fails.
                log.warning("journal batch of %d failed (%s); retrying one by one", len(batch), exc)
                await self._reset()
                for write in batch:
                    try:
                        (result,) = await self._write([write])
                        write.future.set_result(result)
                    except Exception as single:
                        await self._reset()
                        write.future.set_exception(single)
                continue
            for write, result in zip(batch, results):
                if not write.future.done():
                    write.future.set_result(result)

    async def _reset(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.close()
            except Exception:
                pass
            self._conn = None

    async def _write(self, batch: list[_Write]) -> list[Any]:
        """Write a batch in one transaction with two statements at most: a multi-row insert that
        says which rows it created (RETURNING), and an executemany update for the finishes."""
        if self._conn is None:
            self._conn = await self.db.engine.connect()
        conn = self._conn
        starts = [w for w in batch if w.kind == "start"]
        finishes = [w.values for w in batch if w.kind == "finish"]
        created_rows: dict[str, dict[str, Any]] = {}
        existing: dict[str, models.Execution] = {}
        try:
            if starts:
                rows = [self._full_row(w.values) for w in starts]
                inserted = {r[0] for r in (await conn.execute(self._insert, rows)).all()}
                created_rows = {r["id"]: r for r in rows if r["id"] in inserted}
                others = [r["id"] for r in rows if r["id"] not in inserted]
                if others:
                    table = models.Execution.__table__
                    found = await conn.execute(sa.select(table).where(table.c.id.in_(others)))
                    existing = {row.id: _detached(row) for row in found}
            if finishes:
                await conn.execute(self._finish, finishes)
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
        self.batches += 1
        self.writes += len(batch)
        results: list[Any] = []
        seen: set[str] = set()
        for write in batch:
            if write.kind == "finish":
                results.append(None)
                continue
            id_ = write.values["id"]
            if id_ in created_rows and id_ not in seen:
                seen.add(id_)  # the same id twice in one batch: only the first created it
                results.append((models.Execution(**created_rows[id_]), True))
            elif id_ in existing:
                results.append((existing[id_], False))
            else:  # created by an earlier write of this batch
                results.append((models.Execution(**created_rows[id_]), False))
        return results

    def _full_row(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every column present (executemany wants one shape), with the model's defaults."""
        row = dict(_ROW_DEFAULTS)
        row["created_at"] = models.utcnow()
        row.update((k, v) for k, v in values.items() if k in self._columns)
        return row


_ROW_DEFAULTS: dict[str, Any] = {c.name: None for c in models.Execution.__table__.columns}
_ROW_DEFAULTS.update(function_version=0, sync=True, attempts=0)


def _detached(row) -> models.Execution:
    """A plain Execution object from a Core row (nothing tracked by a session)."""
    mapping = row._mapping
    return models.Execution(**{c.name: mapping[c.name] for c in models.Execution.__table__.columns if c.name in mapping})
