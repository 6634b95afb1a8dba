"""RowReader: the hot list reads as plain driver rows, without the ORM, a session or a pool round trip."""

# A list of 50 functions through the ORM cost ~3 ms of event-loop time per request: a session, a
# pooled aiosqlite connection (a thread hop per statement, and a rollback hop when it goes back to
# the pool), then an ORM object per row. Here each statement is compiled once per shape, and runs
# on a connection of the reader's own: on SQLite a sqlite3 connection in one thread (one hop per
# read, rows built by SQLite's C loop), on PostgreSQL a few asyncpg connections held from the
# engine's pool (their prepared-statement caches do the rest; more than one, so that concurrent
# reads do not queue behind one round trip). Anything else (an in-memory SQLite database,
# which no second connection can see) goes through the engine.
#
# Identical reads that wait together share one statement: a read joins another only while that
# one has not started (it is still queued for the thread or a connection), so whatever a joining
# request's result misses was committed after that request arrived, exactly as if it had run its
# own statement. Of each kind one read runs at a time; the next gathers whoever arrives meanwhile.
# 16 clients listing the same functions cost one round trip per batch, not 16.

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import sqlite3
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import orjson
import sqlalchemy as sa

from router.store import models
from router.store.db import sqlite_pragmas


def columns(table: sa.Table) -> list[sa.ColumnElement]:
    """What a raw read selects: every column in table order, JSON as its text (hashable, and the
    same on both databases)."""
    return [sa.cast(c, sa.Text) if isinstance(c.type, sa.JSON) else c for c in table.columns]


def _time(value: Any) -> _dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite's DATETIME text
        value = _dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=_dt.timezone.utc)


def _json(value: Any) -> Any:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:  # what orjson refuses (NaN, integers past 64 bits) json accepts
        return json.loads(value)


def converters(table: sa.Table) -> list[tuple[str, Callable[[Any], Any]]]:
    """(attribute, conversion) per selected column: driver values to what the ORM would give."""
    out: list[tuple[str, Callable[[Any], Any]]] = []
    for column in table.columns:
        if isinstance(column.type, models.UTCDateTime):
            out.append((column.key, _time))
        elif isinstance(column.type, sa.JSON):
            out.append((column.key, _json))
        elif isinstance(column.type, sa.Boolean):
            out.append((column.key, lambda v: None if v is None else bool(v)))
        else:
            out.append((column.key, lambda v: v))
    return out


def record(convert: Sequence[tuple[str, Callable[[Any], Any]]], raw: Sequence[Any]) -> SimpleNamespace:
    """One raw row as attributes, as the ORM object's (what the API's serialisers read)."""
    return SimpleNamespace(**{name: fn(value) for (name, fn), value in zip(convert, raw)})


class RowReader:
    POSTGRES_CONNECTIONS = 3

    def __init__(self, db) -> None:
        self.db = db
        self._statements: dict[Hashable, tuple[str, tuple[str, ...]]] = {}
        database = db.url.database if db.is_sqlite else None
        self._sqlite_path = database if database and database != ":memory:" and not database.startswith("file:") else None
        self._executor: ThreadPoolExecutor | None = None
        self._sqlite: sqlite3.Connection | None = None
        self._postgres = db.engine.dialect.driver == "asyncpg"
        # (engine connection that keeps it checked out, asyncpg connection), idle ones; at most
        # POSTGRES_CONNECTIONS in use, each running one statement at a time.
        self._idle: list[tuple[Any, Any]] = []
        self._held: set[Any] = set()
        self._slots = asyncio.Semaphore(self.POSTGRES_CONNECTIONS)
        # (sql, args) → the result of that read, while it has not started: later identical reads join it.
        self._waiting: dict[tuple, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[tuple, asyncio.Task] = {}  # the latest read of each kind, started or not

    def _statement(self, key: Hashable, build: Callable[[], sa.Select]) -> tuple[str, tuple[str, ...]]:
        statement = self._statements.get(key)
        if statement is None:
            compiled = build().compile(dialect=self.db.engine.dialect)
            statement = self._statements[key] = (compiled.string, tuple(compiled.positiontup or ()))
        return statement

    async def rows(self, key: Hashable, build: Callable[[], sa.Select], params: dict[str, Any]) -> list[tuple]:
        """The rows of the statement `build()` makes (compiled once per `key`, its bound
        parameters named as in `params`), as tuples of driver values."""
        sql, names = self._statement(key, build)
        read = (sql, tuple(params[name] for name in names))
        result = self._waiting.get(read)
        if result is None:
            loop = asyncio.get_running_loop()
            result = self._waiting[read] = loop.create_future()
            # Nobody may be left to look at a failure (every request gone): it is retrieved here.
            result.add_done_callback(lambda f: f.cancelled() or f.exception())
            # One read of a kind at a time: the next waits for the one under way, gathering the
            # requests that arrive meanwhile (fewer round trips; it starts after all of them arrived).
            task = loop.create_task(self._read(read, result, self._running.get(read)))
            self._running[read] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda t: self._running.get(read) is t and self._running.pop(read))
        # A request that goes away (its client hung up) does not cancel the others' read.
        return await asyncio.shield(result)

    def _started(self, read: tuple, result: asyncio.Future) -> None:
        """The read begins: later identical reads start another. (Called from the reader's thread
        on SQLite: one dict operation, atomic under the GIL.)"""
        if self._waiting.get(read) is result:
            del self._waiting[read]

    async def _read(self, read: tuple, result: asyncio.Future, previous: asyncio.Task | None) -> None:
        try:
            if previous is not None:
                await asyncio.wait([previous])
            sql, args = read
            if self._sqlite_path is not None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="row-reader")
                rows = await asyncio.get_running_loop().run_in_executor(self._executor, self._sqlite_rows, read, result)
            elif self._postgres:
                rows = await self._postgres_rows(read, result)
            else:
                self._started(read, result)
                async with self.db.engine.connect() as conn:
                    rows = [tuple(r) for r in await conn.exec_driver_sql(sql, args)]
        except BaseException as exc:
            self._started(read, result)
            if not result.done():
                result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            result.set_result(rows)

    def _sqlite_rows(self, read: tuple, result: asyncio.Future) -> list[tuple]:
        self._started(read, result)
        sql, args = read
        if self._sqlite is None:
            self._sqlite = sqlite3.connect(self._sqlite_path, isolation_level=None, check_same_thread=False)
            sqlite_pragmas(self._sqlite, None)
        return self._sqlite.execute(sql, args).fetchall()

    async def _postgres_rows(self, read: tuple, result: asyncio.Future) -> list[tuple]:
        sql, args = read
        async with self._slots:
            self._started(read, result)
            if self._idle:
                held = self._idle.pop()
            else:
                conn = await self.db.engine.connect()
                held = (conn, (await conn.get_raw_connection()).driver_connection)
                self._held.add(held)
            try:
                rows = [tuple(r) for r in await held[1].fetch(sql, *args)]
            except BaseException:
                # A broken (or interrupted) connection is not reused: the next read takes a fresh one.
                self._held.discard(held)
                try:
                    await held[0].invalidate()
                except Exception:
                    pass
                raise
            self._idle.append(held)
            return rows

    async def close(self) -> None:
        held, self._held, self._idle = self._held, set(), []
        for conn, _driver in held:
            await conn.close()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            if self._sqlite is not None:
                await asyncio.get_running_loop().run_in_executor(executor, self._sqlite.close)
                self._sqlite = None
            executor.shutdown(wait=False)
