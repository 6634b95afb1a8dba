"""RowReader: the hot list reads as plain driver rows, without the ORM, a session or a pool round trip."""

# A list of 50 functions through the ORM cost ~3 ms of event-loop time per request: a session, a
# pooled aiosqlite connection (a thread hop per statement, and a rollback hop when it goes back to
# the pool), then an ORM object per row. Here each statement is compiled once per shape, and runs
# on a connection of the reader's own: on SQLite a sqlite3 connection in one thread (one hop per
# read, rows built by SQLite's C loop), on PostgreSQL one asyncpg connection held from the engine's
# pool (its prepared-statement cache does the rest). Anything else (an in-memory SQLite database,
# which no second connection can see) goes through the engine.

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
    def __init__(self, db) -> None:
        self.db = db
        self._statements: dict[Hashable, tuple[str, tuple[str, ...]]] = {}
        database = db.url.database if db.is_sqlite else None
        self._sqlite_path = database if database and database != ":memory:" and not database.startswith("file:") else None
        self._executor: ThreadPoolExecutor | None = None
        self._sqlite: sqlite3.Connection | None = None
        self._postgres = db.engine.dialect.driver == "asyncpg"
        self._conn = None  # the engine connection that keeps the asyncpg connection checked out
        self._driver = None
        self._lock = asyncio.Lock()  # one statement at a time on the asyncpg connection

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
        args = [params[name] for name in names]
        if self._sqlite_path is not None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="row-reader")
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._sqlite_rows, sql, args)
        if self._postgres:
            return await self._postgres_rows(sql, args)
        async with self.db.engine.connect() as conn:
            return [tuple(r) for r in await conn.exec_driver_sql(sql, tuple(args))]

    def _sqlite_rows(self, sql: str, args: list[Any]) -> list[tuple]:
        if self._sqlite is None:
            self._sqlite = sqlite3.connect(self._sqlite_path, isolation_level=None, check_same_thread=False)
            sqlite_pragmas(self._sqlite, None)
        return self._sqlite.execute(sql, args).fetchall()

    async def _postgres_rows(self, sql: str, args: list[Any]) -> list[tuple]:
        async with self._lock:
            if self._driver is None:
                self._conn = await self.db.engine.connect()
                self._driver = (await self._conn.get_raw_connection()).driver_connection
            try:
                return [tuple(r) for r in await self._driver.fetch(sql, *args)]
            except BaseException:
                await self._reset()  # a broken connection: the next read takes a fresh one
                raise

    async def _reset(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            try:
                await conn.invalidate()
            except Exception:
                pass

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                conn, self._conn, self._driver = self._conn, None, None
                await conn.close()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            if self._sqlite is not None:
                await asyncio.get_running_loop().run_in_executor(executor, self._sqlite.close)
                self._sqlite = None
            executor.shutdown(wait=False)
