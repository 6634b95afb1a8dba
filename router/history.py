"""EventLog: the history of events that entered Headwater — written in batches off the hot path,
trimmed by age and by a per-project bound, queried for GET /v1/events and replays."""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from router.config import Config
from router.events import Event, utcnow
from router.index import source_kind
from router.store import Store
from router.store import models

log = logging.getLogger(__name__)

MAX_BATCH = 500
TRIM_INTERVAL_SECONDS = 60.0


class EventLog:
    def __init__(self, config: Config, store: Store):
        self.enabled = config.events.history
        self.retention = _dt.timedelta(seconds=config.events.history_retention)
        self.max_per_project = config.events.history_max_per_project
        self.store = store
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._writer: asyncio.Task | None = None
        # Held while a batch is written: flush() waits for the one the writer took off the queue.
        self._writing = asyncio.Lock()
        self._trimmer: asyncio.Task | None = None
        table = models.EventRecord.__table__
        dialect_insert = sqlite.insert if store.db.is_sqlite else postgresql.insert
        self._insert = dialect_insert(table).on_conflict_do_nothing(index_elements=[table.c.id])

    async def start(self) -> None:
        if self.enabled and self._writer is None:
            loop = asyncio.get_running_loop()
            self._writer = loop.create_task(self._write_loop(), name="event-history-writer")
            self._trimmer = loop.create_task(self._trim_loop(), name="event-history-trimmer")

    async def stop(self) -> None:
        for task in (self._trimmer, self._writer):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._trimmer, self._writer) if t), return_exceptions=True)
        self._writer = self._trimmer = None
        await self.flush()

    def record(self, event: Event) -> None:
        """Queue an event for the history. Does not wait: history must never slow or stop the flow
        of events (a crash can lose the last moments of history, not events)."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(self._row(event))
        except Exception:  # noqa: BLE001 - a malformed event is left out of the history, never raised
            log.exception("event %s cannot be kept in the history", getattr(event, "id", "?"))

    async def record_now(self, event: Event) -> None:
        """Write an event to the history before returning (an operator's replay, whose trace the
        dashboard opens at once); the flow of events uses record()."""
        if self.enabled:
            await self._write([self._row(event)])

    @staticmethod
    def _row(event: Event) -> dict[str, Any]:
        document = event.to_dict()
        return {
            "id": event.id, "project_id": event.project_id or "default", "source_kind": source_kind(event) or "unknown",
            "source": event.source[:255], "type": event.type[:255], "subject": (event.subject or None) and event.subject[:1024],
            "time": event.time, "received_at": utcnow(), "size": len(orjson.dumps(document)), "document": document}

    async def flush(self) -> None:
        """Return once every event recorded so far is written, including a batch being written now."""
        async with self._writing:
            batch = []
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if batch:
                await self._write_isolating(batch)

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            async with self._writing:
                batch = [first]
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._write_isolating(batch)

    async def _write_isolating(self, batch: list[dict[str, Any]]) -> None:
        """Write a batch; when it fails, write its rows one by one so that a bad row loses only
        itself (one event whose subject was a list once dropped the 199 good events beside it)."""
        try:
            await self._write(batch)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if len(batch) == 1:
                log.exception("event %s could not be written to the history; left out", batch[0].get("id"))
                return
            log.warning("event history batch of %d could not be written; writing its rows one by one", len(batch))
        for row in batch:
            try:
                await self._write([row])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event %s could not be written to the history; left out", row.get("id"))

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        async with self.store.db.engine.begin() as conn:
            await conn.execute(self._insert, batch)

    async def _trim_loop(self) -> None:
        while True:
            await asyncio.sleep(TRIM_INTERVAL_SECONDS)
            try:
                await self.trim()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event history trim failed")

    async def trim(self) -> int:
        """Delete events past the retention period, and each project's oldest beyond the bound."""
        table = models.EventRecord.__table__
        removed = 0
        async with self.store.db.engine.begin() as conn:
            result = await conn.execute(sa.delete(table).where(table.c.received_at < utcnow() - self.retention))
            removed += result.rowcount or 0
            counts = await conn.execute(sa.select(table.c.project_id, sa.func.count()).group_by(table.c.project_id)
                                        .having(sa.func.count() > self.max_per_project))
            for project_id, count in counts.all():
                cutoff = (await conn.execute(
                    sa.select(table.c.received_at).where(table.c.project_id == project_id)
                    .order_by(table.c.received_at.desc()).offset(self.max_per_project).limit(1))).scalar()
                if cutoff is not None:
                    result = await conn.execute(sa.delete(table).where(table.c.project_id == project_id,
                                                                       table.c.received_at <= cutoff))
                    removed += result.rowcount or 0
        if removed:
            log.info("event history trimmed", extra={"removed": removed})
        return removed

    async def query(self, *, project_id: str | None, source_kind: str | None = None, types: list[str] | None = None,
                    subject: str | None = None, since: _dt.datetime | None = None, until: _dt.datetime | None = None,
                    limit: int = 100, ascending: bool = False) -> list[models.EventRecord]:
        table = models.EventRecord
        stmt = sa.select(table)
        if project_id is not None:
            stmt = stmt.where(table.project_id == project_id)
        if source_kind:
            stmt = stmt.where(table.source_kind == source_kind)
        if types:
            stmt = stmt.where(table.type.in_(types))
        if subject:
            stmt = stmt.where(table.subject == subject)
        if since:
            stmt = stmt.where(table.received_at >= since)
        if until:
            stmt = stmt.where(table.received_at < until)
        order = table.received_at.asc() if ascending else table.received_at.desc()
        stmt = stmt.order_by(order, table.id).limit(limit)
        async with self.store.db.sessions() as session:
            return list((await session.execute(stmt)).scalars())

    async def received_by(self, *, subscription_id: str, project_id: str, source_kind: str, since: _dt.datetime,
                          until: _dt.datetime | None = None, limit: int = 1000,
                          other_projects: bool = True) -> list[models.EventRecord]:
        """The events a replay to one subscription chooses from, oldest first: those of its project,
        and with `other_projects` those it received (an execution of it names the event) whatever
        project the source stamped on them: with auth off an OpenStack source's events carry the
        Swift account's or Zaqar queue's project, which need not be the subscription's. Under
        Keystone it is off: a replay never reaches beyond the subscription's project."""
        table = models.EventRecord
        executions = models.Execution
        received = sa.select(executions.event_id).where(executions.subscription_id == subscription_id,
                                                        executions.event_id.is_not(None))
        scope = sa.or_(table.project_id == project_id, table.id.in_(received)) if other_projects else table.project_id == project_id
        stmt = sa.select(table).where(table.source_kind == source_kind, table.received_at >= since, scope)
        if until:
            stmt = stmt.where(table.received_at < until)
        stmt = stmt.order_by(table.received_at.asc(), table.id).limit(limit)
        async with self.store.db.sessions() as session:
            return list((await session.execute(stmt)).scalars())

    async def executed(self, execution_ids: list[str]) -> set[str]:
        """Which of these executions are recorded already (a replay that ran before runs nothing)."""
        table = models.Execution
        found: set[str] = set()
        async with self.store.db.sessions() as session:
            for i in range(0, len(execution_ids), 500):
                stmt = sa.select(table.id).where(table.id.in_(execution_ids[i:i + 500]))
                found.update((await session.execute(stmt)).scalars())
        return found

    async def get(self, event_id: str, project_id: str | None) -> models.EventRecord | None:
        async with self.store.db.sessions() as session:
            row = await session.get(models.EventRecord, event_id)
        if row is None or (project_id is not None and row.project_id != project_id):
            return None
        return row
