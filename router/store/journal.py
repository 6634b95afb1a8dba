"""ExecutionJournal: group commit for the routing hot path. Execution starts and finishes from many
concurrent deliveries are written by one task, many per transaction, straight through the database
driver, and each caller resumes when its own write is committed."""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import orjson
import sqlalchemy as sa

from router.store import models
from router.store.db import Database, sqlite_pragmas

log = logging.getLogger(__name__)

MAX_BATCH = 500

# Every column of the executions table, in one fixed order: the insert's shape.
_COLUMNS: tuple[str, ...] = tuple(c.name for c in models.Execution.__table__.columns)
_JSON_COLUMNS = frozenset(c.name for c in models.Execution.__table__.columns if isinstance(c.type, sa.JSON))
_TIME_COLUMNS = frozenset(c.name for c in models.Execution.__table__.columns if isinstance(c.type, models.UTCDateTime))
_ROW_DEFAULTS: dict[str, Any] = {name: None for name in _COLUMNS}
_ROW_DEFAULTS.update(function_version=0, sync=True, attempts=0)


class ExecutionRecord(SimpleNamespace):
    """An execution row as plain attributes: what the hot path hands around instead of an ORM
    object (building one of those costs more than writing the row)."""


class _Write:
    __slots__ = ("kind", "values", "future")

    def __init__(self, kind: str, values: dict[str, Any]):
        self.kind = kind  # "start" | "finish" | "claim", or "starts" | "finishes" (values: a list of rows)
        self.values = values
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()


def _json(value: Any) -> str:
    """JSON text as SQLAlchemy's JSON type would store it (None is the JSON null)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # what orjson refuses (e.g. integers beyond 64 bits) the json module may take
        return json.dumps(value, default=str)


# Writes per batch that the SQLite journal commits on the event loop itself (see _SqliteWriter.write).
INLINE_WRITES = 32


class _Busy(Exception):
    """Another connection holds SQLite's write lock: the batch goes to the writer's thread."""


class _SqliteWriter:
    """Writes on a connection of its own in a thread of its own: one hop per batch, and SQLite's
    C loop does the rows (the same file, WAL and pragmas as the engine's connections). Small
    batches are written on the event loop, unless the write lock is taken."""

    # SQLite allows 32766 bound parameters per statement: rows per multi-row insert.
    ROWS_PER_INSERT = 32766 // len(_COLUMNS)

    def __init__(self, path: str):
        if not path or path == ":memory:":
            raise ValueError("[database] connection: an in-memory SQLite database cannot be shared with the "
                             "execution journal's connection; use a file")
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="execution-journal")
        self._conn: sqlite3.Connection | None = None
        self._inline: sqlite3.Connection | None = None  # the event loop's own (see write)
        self._finish_sql = ("UPDATE executions SET status = ?, result = ?, logs = ?, reason = ?, updated_at = ?, "
                            "lease_until = NULL WHERE id = ?")
        # A claim inserts the row already leased, or takes over a running row nobody holds (one a
        # webhook recorded at publish, or one whose worker's lease ran out), counting the attempt.
        self._claim_tail = ("ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until, "
                            "attempts = executions.attempts + 1 WHERE executions.status = 'running' AND "
                            "(executions.lease_until IS NULL OR executions.lease_until < ?) "
                            "RETURNING id, attempts, created_at")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        sqlite_pragmas(conn, None)
        return conn

    @staticmethod
    def _time(value: _dt.datetime | None) -> str | None:
        if value is None:
            return None
        # SQLAlchemy's SQLite DATETIME text form, so both read the column the same way.
        return models.naive_utc(value).isoformat(" ", "microseconds")

    @classmethod
    def _params(cls, row: dict[str, Any]) -> list[Any]:
        """One row's values in column order, converted for SQLite (the plain ones as they are)."""
        return [_json(row[name]) if name in _JSON_COLUMNS else cls._time(row[name]) if name in _TIME_COLUMNS
                else row[name] for name in _COLUMNS]

    def _write_sync(self, rows: list[dict[str, Any]], finishes: list[dict[str, Any]],
                    claims: list[dict[str, Any]], claimed: dict[str, tuple[int, bool]]) -> set[str]:
        if self._conn is None:
            self._conn = self._connect()
        return self._write_on(self._conn, rows, finishes, claims, claimed)

    def _write_on(self, conn: sqlite3.Connection, rows: list[dict[str, Any]], finishes: list[dict[str, Any]],
                  claims: list[dict[str, Any]], claimed: dict[str, tuple[int, bool]]) -> set[str]:
        created: set[str] = set()
        try:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not half-way through
        except sqlite3.OperationalError as exc:
            if conn is self._inline and "locked" in str(exc):
                raise _Busy() from None
            raise
        try:
            for start in range(0, len(rows), self.ROWS_PER_INSERT):
                chunk = rows[start:start + self.ROWS_PER_INSERT]
                params = [value for row in chunk for value in self._params(row)]
                placeholders = ",".join(["(" + ",".join("?" * len(_COLUMNS)) + ")"] * len(chunk))
                sql = (f"INSERT INTO executions ({','.join(_COLUMNS)}) VALUES {placeholders} "
                       "ON CONFLICT (id) DO NOTHING RETURNING id")
                created.update(r[0] for r in conn.execute(sql, params))
            if claims:
                now = self._time(models.utcnow())
                for start in range(0, len(claims), self.ROWS_PER_INSERT - 1):
                    chunk = claims[start:start + self.ROWS_PER_INSERT - 1]
                    params = [value for row in chunk for value in self._params(row)]
                    params.append(now)
                    placeholders = ",".join(["(" + ",".join("?" * len(_COLUMNS)) + ")"] * len(chunk))
                    sql = f"INSERT INTO executions ({','.join(_COLUMNS)}) VALUES {placeholders} {self._claim_tail}"
                    sent = {row["id"]: self._time(row["created_at"]) for row in chunk}
                    for id_, attempts, created_at in conn.execute(sql, params):
                        # The row this statement inserted carries the creation time sent with it.
                        claimed[id_] = (attempts, created_at == sent[id_])
            if finishes:
                conn.executemany(self._finish_sql, [
                    (f["status"], _json(f["result"]), f["logs"], f["reason"], self._time(f["updated_at"]), f["id"])
                    for f in finishes])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return created

    async def write(self, rows: list[dict[str, Any]], finishes: list[dict[str, Any]],
                    claims: list[dict[str, Any]] = (), claimed: dict[str, tuple[int, bool]] | None = None) -> set[str]:
        """Insert `rows` (the ids created), record `finishes`, and for `claims` fill `claimed` with
        {id: (attempts, inserted)} of those claimed, all in one transaction."""
        claims, claimed = list(claims), claimed if claimed is not None else {}
        if len(rows) + len(finishes) + len(claims) <= INLINE_WRITES:
            # A small batch is written here, on the event loop: SQLite commits it (WAL, no fsync)
            # in less time than the hop to the writer's thread and back costs. Only if another
            # connection holds the write lock does it go to the thread, which may wait for it.
            if self._inline is None:
                self._inline = self._connect()
                self._inline.execute("PRAGMA busy_timeout=0")
            try:
                return self._write_on(self._inline, rows, finishes, claims, claimed)
            except _Busy:
                pass
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._write_sync, rows, finishes, claims, claimed)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    async def reset(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_sync)

    async def close(self) -> None:
        await self.reset()
        self._executor.shutdown(wait=False)


class _PostgresWriter:
    """One statement per kind of write, the rows passed as one JSON document that the server
    unpacks (json_to_recordset), on a driver connection held from the engine's pool: encoding a
    batch is one orjson call here, and the per-value work happens in the database's process."""

    _PG_TYPES = {sa.String: "text", sa.Text: "text", sa.Integer: "integer", sa.Boolean: "boolean"}

    def __init__(self, db: Database):
        self.db = db
        self._conn = None  # the SQLAlchemy connection that keeps the driver connection checked out
        self._driver = None
        table = models.Execution.__table__
        fields = []
        for column in table.columns:
            if column.name in _TIME_COLUMNS:
                kind = "timestamptz"  # written with their UTC offset, stored as naive UTC below
            elif column.name in _JSON_COLUMNS:
                kind = "text"  # JSON text, so that None stays the JSON null SQLAlchemy stores
            else:
                kind = next(t for k, t in self._PG_TYPES.items() if isinstance(column.type, k))
            fields.append(f"{column.name} {kind}")
        picks = ", ".join(f"u.{n}::json" if n in _JSON_COLUMNS else f"u.{n} AT TIME ZONE 'UTC'" if n in _TIME_COLUMNS
                          else f"u.{n}" for n in _COLUMNS)
        self._insert_sql = (f"INSERT INTO executions ({', '.join(_COLUMNS)}) SELECT {picks} "
                            f"FROM json_to_recordset($1::json) AS u({', '.join(fields)}) "
                            "ON CONFLICT (id) DO NOTHING RETURNING id")
        self._finish_sql = self._finish_statement("$1")
        # A batch of both kinds is one statement too: the finishes as a data-modifying WITH. One
        # round trip commits it, instead of four (BEGIN, insert, update, COMMIT). The two parts
        # never touch the same row's columns: a finish is sent only once its start has committed,
        # and a repeated start of a row is an insert that does nothing.
        self._both_sql = f"WITH finished AS ({self._finish_statement('$2')}) {self._insert_sql}"
        # A claim: inserted leased, or takes over a running row nobody holds (see _SqliteWriter).
        self._claim_sql = (f"INSERT INTO executions ({', '.join(_COLUMNS)}) SELECT {picks} "
                           f"FROM json_to_recordset($1::json) AS u({', '.join(fields)}) "
                           "ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until, "
                           "attempts = executions.attempts + 1 WHERE executions.status = 'running' AND "
                           "(executions.lease_until IS NULL OR executions.lease_until < ($2::timestamptz AT TIME ZONE 'UTC')) "
                           "RETURNING id, attempts, (xmax = 0) AS inserted")

    @staticmethod
    def _finish_statement(parameter: str) -> str:
        return ("UPDATE executions AS e SET status = u.status, result = u.result::json, logs = u.logs, "
                "reason = u.reason, updated_at = u.updated_at AT TIME ZONE 'UTC', lease_until = NULL "
                f"FROM json_to_recordset({parameter}::json) "
                "AS u(id text, status text, result text, logs text, reason text, updated_at timestamptz) "
                "WHERE e.id = u.id")

    async def _driver_connection(self):
        if self._driver is None:
            self._conn = await self.db.engine.connect()
            self._driver = (await self._conn.get_raw_connection()).driver_connection
        return self._driver

    @staticmethod
    def _document(rows: list[dict[str, Any]], json_columns) -> str:
        """The rows as one JSON array; JSON columns as their JSON text, datetimes with their offset
        (naive ones are UTC)."""
        encoded = []
        for row in rows:
            row = dict(row)
            for name in json_columns:
                row[name] = _json(row[name])
            encoded.append(row)
        return orjson.dumps(encoded, option=orjson.OPT_NAIVE_UTC).decode()

    async def write(self, rows: list[dict[str, Any]], finishes: list[dict[str, Any]],
                    claims: list[dict[str, Any]] = (), claimed: dict[str, tuple[int, bool]] | None = None) -> set[str]:
        conn = await self._driver_connection()
        if claims:
            if not rows and not finishes:
                await self._claim(conn, claims, claimed)
                return set()
            # Claims are a statement of their own; with other writes in the batch, one transaction
            # holds them all, so that a failed batch retried write by write claims nothing twice.
            async with conn.transaction():
                await self._claim(conn, claims, claimed)
                return await self._write_rows(conn, rows, finishes)
        return await self._write_rows(conn, rows, finishes)

    async def _claim(self, conn, claims: list[dict[str, Any]], claimed: dict[str, tuple[int, bool]] | None) -> None:
        for r in await conn.fetch(self._claim_sql, self._document(list(claims), _JSON_COLUMNS), models.utcnow()):
            if claimed is not None:
                claimed[r[0]] = (r[1], r[2])

    async def _write_rows(self, conn, rows: list[dict[str, Any]], finishes: list[dict[str, Any]]) -> set[str]:
        # Each batch is one statement, which commits on its own.
        if finishes:
            # The last finish of an execution wins (an UPDATE … FROM joins each row once).
            finished = self._document(list({f["id"]: f for f in finishes}.values()), ("result",))
            if not rows:
                await conn.execute(self._finish_sql, finished)
                return set()
            inserted = await conn.fetch(self._both_sql, self._document(rows, _JSON_COLUMNS), finished)
        else:
            inserted = await conn.fetch(self._insert_sql, self._document(rows, _JSON_COLUMNS))
        return {r[0] for r in inserted}

    async def reset(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.invalidate()
            except Exception:
                pass
        self._conn = self._driver = None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = self._driver = None


class ExecutionJournal:
    def __init__(self, db: Database):
        self.db = db
        self._writer = _SqliteWriter(db.url.database) if db.is_sqlite else _PostgresWriter(db)
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.batches = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="execution-journal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._writer.close()

    # Both return the write's future (await it): plain functions, as they run for every event.

    def start_execution(self, values: dict[str, Any]) -> asyncio.Future[tuple[ExecutionRecord, bool]]:
        """Insert the execution unless one with its id exists: (row, created)."""
        return self._submit(_Write("start", values))

    def start_executions(self, rows: list[dict[str, Any]]) -> asyncio.Future[list[tuple[ExecutionRecord, bool] | Exception]]:
        """start_execution for many rows (a batch of routed events): one write, one future, and per
        row (row, created), or the error that row alone met."""
        return self._submit(_Write("starts", rows))

    def finish_executions(self, finishes: list[dict[str, Any]]) -> asyncio.Future[None]:
        """finish for many executions (each: id, status, result, logs, reason, updated_at): one write."""
        return self._submit(_Write("finishes", finishes))

    def claim_execution(self, values: dict[str, Any]) -> asyncio.Future[tuple[ExecutionRecord, bool, bool]]:
        """Insert the execution claimed (`values` carry its lease and first attempt), or claim the
        running row with its id that nobody holds (counting an attempt): (row, created, claimed).
        Neither: the row as it is, read back (finished, or another worker's lease is live)."""
        return self._submit(_Write("claim", values))

    def finish(self, execution_id: str, *, status: str, result: Any, logs: str, reason: str,
               updated_at=None) -> asyncio.Future[None]:
        return self._submit(_Write("finish", {"id": execution_id, "status": status, "result": result, "logs": logs,
                                              "reason": reason, "updated_at": updated_at or models.utcnow()}))

    def _submit(self, write: _Write) -> asyncio.Future:
        if self._task is None:
            raise RuntimeError("the execution journal is not started")
        self._queue.put_nowait(write)
        return write.future

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
                await self._writer.reset()
                for write in batch:
                    try:
                        (result,) = await self._write([write])
                    except Exception as single:
                        await self._writer.reset()
                        result = single
                    self._answer(write, result)
                continue
            for write, result in zip(batch, results):
                self._answer(write, result)

    @staticmethod
    def _answer(write: _Write, result: Any) -> None:
        if write.future.done():  # its caller may have been cancelled meanwhile
            return
        if isinstance(result, Exception):
            write.future.set_exception(result)
        else:
            write.future.set_result(result)

    async def _write(self, batch: list[_Write]) -> list[Any]:
        """Write a batch in one transaction: a multi-row insert that says which rows it created,
        and the finishes. Raises only if the transaction failed; a start whose row existed already
        and could not be read back gets that error as its result (the batch is committed, and must
        not be written again: its new rows would then look like someone else's)."""
        full_row = self._full_row
        rows = [full_row(values) for w in batch if w.kind == "start" or w.kind == "starts"
                for values in (w.values if w.kind == "starts" else (w.values,))]
        finishes = [values for w in batch if w.kind == "finish" or w.kind == "finishes"
                    for values in (w.values if w.kind == "finishes" else (w.values,))]
        claim_rows: dict[int, dict[str, Any]] = {}
        claim_ids: set[str] = set()
        for i, w in enumerate(batch):
            # One claim per id per statement: a second claim of the same id in this batch loses.
            if w.kind == "claim" and w.values["id"] not in claim_ids:
                claim_ids.add(w.values["id"])
                claim_rows[i] = full_row(w.values)
        claimed: dict[str, tuple[int, bool]] = {}
        if claim_rows:
            created = await self._writer.write(rows, finishes, list(claim_rows.values()), claimed)
        else:
            created = await self._writer.write(rows, finishes)
        self.batches += 1
        others = {r["id"] for r in rows if r["id"] not in created}
        others.update(w.values["id"] for i, w in enumerate(batch)
                      if w.kind == "claim" and (i not in claim_rows or w.values["id"] not in claimed))
        unread: Exception | None = None
        try:
            existing = await self._existing(others) if others else {}
        except Exception as exc:
            log.warning("could not read back %d existing execution(s) after a journal batch (%s)", len(others), exc)
            existing, unread = {}, exc
        seen: set[str] = set()
        starts = iter(rows)

        def started() -> Any:
            row = next(starts)
            id_ = row["id"]
            if id_ in created and id_ not in seen:
                seen.add(id_)  # the same id twice in one batch: only the first created it
                return ExecutionRecord(**row), True
            if id_ in existing:
                return existing[id_], False
            if unread is not None and id_ in others:
                return unread
            return ExecutionRecord(**row), False  # created by an earlier write of this batch

        def result(i: int, write: _Write) -> Any:
            if write.kind == "start":
                return started()
            if write.kind == "starts":
                return [started() for _ in write.values]
            if write.kind == "claim":
                return self._claim_result(write, claim_rows.get(i), claimed, existing, unread)
            return None  # a finish

        return [result(i, write) for i, write in enumerate(batch)]

    @staticmethod
    def _claim_result(write: _Write, row: dict[str, Any] | None, claimed: dict[str, tuple[int, bool]],
                      existing: dict[str, ExecutionRecord], unread: Exception | None) -> Any:
        id_ = write.values["id"]
        if row is not None and id_ in claimed:
            attempts, inserted = claimed[id_]
            # A row taken over keeps what was recorded at its start; what it runs now is this
            # claim's (the same event and subscription give the same input).
            return ExecutionRecord(**dict(row, attempts=attempts)), inserted, True
        if id_ in existing:
            return existing[id_], False, False
        if unread is not None:
            return unread
        return RuntimeError(f"execution {id_} was neither claimed nor found")

    async def _existing(self, ids: set[str]) -> dict[str, ExecutionRecord]:
        """Rows that were there already (redeliveries, replicas racing): read after the commit."""
        table = models.Execution.__table__
        async with self.db.engine.connect() as conn:
            found = await conn.execute(sa.select(table).where(table.c.id.in_(ids)))
            return {row.id: ExecutionRecord(**row._mapping) for row in found}

    @staticmethod
    def _full_row(values: dict[str, Any]) -> dict[str, Any]:
        """Every column present (one shape for the whole insert), with the model's defaults."""
        row = dict(_ROW_DEFAULTS)
        row["created_at"] = models.utcnow()
        if values.keys() <= _ROW_DEFAULTS.keys():
            row.update(values)
        else:
            row.update((k, v) for k, v in values.items() if k in _ROW_DEFAULTS)
        return row
