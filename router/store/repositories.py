"""Repositories: the queries Headwater runs, one class per table, behind one `Store` facade."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from router.store import models, reader
from router.store.db import Conflict, Database, NotFound
from router.store.journal import ExecutionRecord

M = TypeVar("M", bound=models.Base)

# Qinling's list filter syntax: `op:value`, op in this table; no prefix means eq.
_OPERATORS = ("in", "nin", "eq", "neq", "gt", "gte", "lt", "lte", "has")


_MAX_LIMIT = 2**31 - 1


class InvalidFilter(ValueError):
    pass


class VersionLimit(Exception):
    """A function already has the most versions allowed (the API answers 403)."""


def parse_filter(value: str) -> tuple[str, Any]:
    """Split `gt:5` into ("gt", "5"); `in:a,b` into ("in", ["a", "b"])."""
    op, sep, rest = value.partition(":")
    if sep and op in _OPERATORS:
        return op, (rest.split(",") if op in ("in", "nin") else rest)
    return "eq", value


def _int64(value: Any) -> int:
    number = int(value)
    if not -(2 ** 63) <= number < 2 ** 63:
        raise ValueError(value)  # the database cannot bind it: the caller's 400
    return number


def _condition(column: sa.ColumnElement, op: str, value: Any) -> sa.ColumnElement[bool]:
    if op == "eq":
        return column.is_(None) if value is None else column == value
    if op == "neq":
        return column.is_not(None) if value is None else column != value
    if op == "in":
        return column.in_(value)
    if op == "nin":
        return column.not_in(value)
    if op == "has":
        return sa.cast(column, sa.String).like(f"%{value}%")
    return {"gt": column > value, "gte": column >= value, "lt": column < value, "lte": column <= value}[op]


class Repository(Generic[M]):
    model: type[M]

    def __init__(self, db: Database, scope: str | None = None):
        self.db = db
        # The project a request may see (router.api's RequestContext.store); None: every project.
        # Every query below applies it, whatever project_id its caller passes.
        self.scope = scope

    def _visible(self, project=None):
        """The condition that limits rows to the scope, or to `project` (a value or a bound
        parameter); runtimes widen it to public and shared ones."""
        return self.model.project_id == (self.scope if project is None else project)

    def _scoped(self, stmt, project_id: str | None = None):
        if self.scope is not None:
            stmt = stmt.where(self._visible())
        return stmt if project_id is None else stmt.where(self.model.project_id == project_id)

    def _listed(self, project):
        """What `rows(project_id=…)` limits to (the list endpoint's project)."""
        return self.model.project_id == project

    async def rows(self, *, project_id: str | None = None) -> list[tuple]:
        """The unfiltered list read without the ORM: every column in table order (JSON as its text,
        see router.store.reader), ordered by created_at and id, within the scope and `project_id`."""
        params = {"scope": self.scope, "project": project_id}
        params = {k: v for k, v in params.items() if v is not None}

        def build() -> sa.Select:
            stmt = sa.select(*reader.columns(self.model.__table__))
            if "scope" in params:
                stmt = stmt.where(self._visible(sa.bindparam("scope", type_=sa.String)))
            if "project" in params:
                stmt = stmt.where(self._listed(sa.bindparam("project", type_=sa.String)))
            return stmt.order_by(self.model.created_at, self.model.id)

        return await self.db.reader.rows((type(self).__name__, tuple(params)), build, params)

    async def get(self, id_: str, *, project_id: str | None = None) -> M:
        async with self.db.sessions() as session:
            row = (await session.execute(self._scoped(sa.select(self.model).where(self.model.id == id_), project_id))).scalar_one_or_none()
        if row is None:
            raise NotFound(f"{self.model.__name__} not found [id={id_}]")
        return row

    async def find(self, id_: str, *, project_id: str | None = None) -> M | None:
        try:
            return await self.get(id_, project_id=project_id)
        except NotFound:
            return None

    async def list(self, *, project_id: str | None = None, filters: Mapping[str, Any] | None = None,
                   order_by: str = "created_at", limit: int | None = None, after: M | None = None) -> list[M]:
        """Rows ordered by `order_by` then id; with `after` (a row of this table), only those that
        come after it in that order (keyset pagination: a page never repeats or skips a row because
        rows were added or removed before it)."""
        stmt = self._scoped(sa.select(self.model), project_id)
        if after is not None:
            key = getattr(self.model, order_by)
            stmt = stmt.where(sa.or_(key > getattr(after, order_by),
                                     sa.and_(key == getattr(after, order_by), self.model.id > after.id)))
        for name, raw in (filters or {}).items():
            column = getattr(self.model, name, None)
            if column is None:
                raise InvalidFilter(f"unknown filter {name!r}")
            op, value = parse_filter(raw) if isinstance(raw, str) else ("eq", raw)
            stmt = stmt.where(_condition(column, op, self._coerce(name, value)))
        stmt = stmt.order_by(getattr(self.model, order_by), self.model.id)
        if limit is not None and not 0 <= limit <= _MAX_LIMIT:
            # Query strings reach here; a limit the database cannot bind is the caller's 400, not a 500.
            raise InvalidFilter(f"limit must be between 0 and {_MAX_LIMIT}, got {limit}")
        if limit:
            stmt = stmt.limit(limit)
        async with self.db.sessions() as session:
            return list((await session.execute(stmt)).scalars())

    def _coerce(self, name: str, value: Any) -> Any:
        """Query strings arrive as text; compare integers and booleans as such."""
        column_type = self.model.__table__.c[name].type
        try:
            if isinstance(column_type, (sa.Integer, sa.BigInteger)):
                return [_int64(v) for v in value] if isinstance(value, list) else _int64(value)
            if isinstance(column_type, sa.Boolean) and isinstance(value, str):
                return value.lower() in ("true", "1", "yes")
            if isinstance(column_type, models.UTCDateTime):
                return [_parse_time(v) for v in value] if isinstance(value, list) else _parse_time(value)
        except ValueError:
            kind = "a time" if isinstance(column_type, models.UTCDateTime) else "an integer"
            raise InvalidFilter(f"filter {name!r} expects {kind}, got {value!r}") from None
        return value

    async def _changed(self, session, ids: Sequence[str]) -> None:
        """Called inside a write's transaction, before its commit, with the ids it touched."""

    async def add(self, **values: Any) -> M:
        row = self.model(**values)
        async with self.db.sessions() as session:
            session.add(row)
            try:
                await self._changed(session, [row.id])
                await session.commit()
            except IntegrityError as exc:
                raise Conflict(f"Duplicate entry for {self.model.__tablename__}: {_constraint(exc)}") from None
        return row

    async def update(self, id_: str, values: Mapping[str, Any], *, project_id: str | None = None,
                     expect: Mapping[str, Any] | None = None) -> M:
        """Update one row; with `expect`, only if those columns still hold those values
        (compare-and-set), else NotFound."""
        stmt = self._scoped(sa.update(self.model).where(self.model.id == id_), project_id)
        for name, value in (expect or {}).items():
            stmt = stmt.where(_condition(getattr(self.model, name), "eq", value))
        values = dict(values)
        values.setdefault("updated_at", models.utcnow())
        async with self.db.sessions() as session:
            try:
                result = await session.execute(stmt.values(**values))
                if result.rowcount:
                    await self._changed(session, [id_])
                await session.commit()
            except IntegrityError as exc:
                raise Conflict(f"Duplicate entry for {self.model.__tablename__}: {_constraint(exc)}") from None
        if result.rowcount == 0:
            raise NotFound(f"{self.model.__name__} not found [id={id_}]")
        return await self.get(id_)

    async def delete(self, id_: str, *, project_id: str | None = None) -> None:
        async with self.db.sessions() as session:
            result = await session.execute(self._scoped(sa.delete(self.model).where(self.model.id == id_), project_id))
            if result.rowcount:
                await self._changed(session, [id_])
            await session.commit()
        if result.rowcount == 0:
            raise NotFound(f"{self.model.__name__} not found [id={id_}]")

    async def count(self, **where: Any) -> int:
        stmt = self._scoped(sa.select(sa.func.count()).select_from(self.model))
        for name, value in where.items():
            column = getattr(self.model, name)
            stmt = stmt.where(column.in_(value) if isinstance(value, (list, tuple)) else column == value)
        async with self.db.sessions() as session:
            return (await session.execute(stmt)).scalar_one()


def _parse_time(value: Any) -> _dt.datetime:
    """A filter's time as text (ISO 8601, `Z` allowed; naive means UTC), as an aware datetime."""
    if isinstance(value, _dt.datetime):
        return value
    text = str(value).strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = _dt.datetime.fromisoformat(text)  # ValueError: the caller's 400
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def _constraint(exc: IntegrityError) -> str:
    return str(exc.orig).splitlines()[0][:200]


class Runtimes(Repository[models.Runtime]):
    model = models.Runtime

    def _visible(self, project=None):
        # A project sees public runtimes, its own and private ones shared with it; writes are the
        # admins' (policy).
        return _runtime_visible_to(self.scope if project is None else project)

    def _listed(self, project):
        return _runtime_visible_to(project)  # as visible(): a project's list shows what it may use

    async def visible(self, project_id: str | None) -> list[models.Runtime]:
        """Public runtimes plus the project's own and those shared with it (all for project_id None)."""
        stmt = self._scoped(sa.select(models.Runtime).order_by(models.Runtime.created_at))
        if project_id is not None:
            stmt = stmt.where(_runtime_visible_to(project_id))
        async with self.db.sessions() as session:
            return list((await session.execute(stmt)).scalars())


    async def projects(self, runtime_id: str) -> list[str]:
        stmt = (sa.select(models.RuntimeProject.project_id).where(models.RuntimeProject.runtime_id == runtime_id)
                .order_by(models.RuntimeProject.project_id))
        async with self.db.sessions() as session:
            return list((await session.execute(stmt)).scalars())

    async def share(self, runtime_id: str, projects: Sequence[str]) -> None:
        """Replace the projects a private runtime is shared with."""
        async with self.db.sessions() as session:
            await session.execute(sa.delete(models.RuntimeProject).where(models.RuntimeProject.runtime_id == runtime_id))
            session.add_all(models.RuntimeProject(runtime_id=runtime_id, project_id=p) for p in dict.fromkeys(projects))
            await session.commit()


def _runtime_visible_to(project_id: str | None):
    shared = sa.select(models.RuntimeProject.runtime_id).where(models.RuntimeProject.project_id == project_id)
    return sa.or_(models.Runtime.is_public.is_(True), models.Runtime.project_id == project_id,
                  models.Runtime.id.in_(shared))


class Functions(Repository[models.Function]):
    model = models.Function

    async def bump_count(self, function_id: str, version: int, n: int = 1) -> None:
        """Count an execution (Qinling's `count`); also marks the function as recently used."""
        async with self.db.sessions() as session:
            if version:
                await session.execute(
                    sa.update(models.FunctionVersion)
                    .where(models.FunctionVersion.function_id == function_id, models.FunctionVersion.version_number == version)
                    .values(count=models.FunctionVersion.count + n, updated_at=models.utcnow()))
            else:
                await session.execute(sa.update(models.Function).where(models.Function.id == function_id)
                                      .values(count=models.Function.count + n, updated_at=models.utcnow()))
            await session.commit()


    async def delete_with_finished_jobs(self, function_id: str) -> list[str]:
        """Delete the function and its finished (`done`/`cancelled`) jobs, which only reference
        it, in one transaction; returns the ids of the jobs deleted. Callers check first that no
        other subscription, alias or running job uses it."""
        jobs = models.Subscription
        async with self.db.sessions() as session:
            ids = list((await session.execute(sa.select(jobs.id).where(
                jobs.function_id == function_id, jobs.kind == "job", jobs.status.in_(("done", "cancelled"))))).scalars())
            if ids:
                await session.execute(sa.delete(jobs).where(jobs.id.in_(ids)))
            result = await session.execute(sa.delete(models.Function).where(models.Function.id == function_id))
            if ids and result.rowcount:
                await record_subscription_change(session, ids)
            await session.commit()
        if result.rowcount == 0:
            raise NotFound(f"Function not found [id={function_id}]")
        return ids


class FunctionVersions(Repository[models.FunctionVersion]):
    model = models.FunctionVersion

    async def get_number(self, function_id: str, number: int) -> models.FunctionVersion:
        stmt = self._scoped(sa.select(models.FunctionVersion).where(models.FunctionVersion.function_id == function_id,
                                                                    models.FunctionVersion.version_number == number))
        async with self.db.sessions() as session:
            row = (await session.execute(stmt)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"FunctionVersion not found [function_id={function_id}, version_number={number}]")
        return row

    async def for_function(self, function_id: str) -> list[models.FunctionVersion]:
        stmt = self._scoped(sa.select(models.FunctionVersion).where(models.FunctionVersion.function_id == function_id)).order_by(models.FunctionVersion.version_number)
        async with self.db.sessions() as session:
            return list((await session.execute(stmt)).scalars())

    async def add_next(self, function_id: str, *, project_id: str, description: str | None, md5sum: str | None,
                       max_versions: int) -> models.FunctionVersion:
        """Create the function's next version: number = latest_version + 1, taken with a compare-and-set
        on functions.latest_version in the same transaction, so concurrent creates (any replica) never
        share a number and numbers are never reused. Raises VersionLimit at `max_versions` versions."""
        for _ in range(20):
            async with self.db.sessions() as session:
                latest = (await session.execute(sa.select(models.Function.latest_version)
                                                .where(models.Function.id == function_id))).scalar_one_or_none()
                if latest is None:
                    raise NotFound(f"Function not found [id={function_id}]")
                existing = (await session.execute(sa.select(sa.func.count()).select_from(models.FunctionVersion)
                                                  .where(models.FunctionVersion.function_id == function_id))).scalar_one()
                if existing >= max_versions:
                    raise VersionLimit(f"Can not exceed maximum number({max_versions}) of versions")
                now = models.utcnow()
                moved = await session.execute(sa.update(models.Function)
                                              .where(models.Function.id == function_id, models.Function.latest_version == latest)
                                              .values(latest_version=latest + 1, updated_at=now))
                if moved.rowcount != 1:
                    await session.rollback()
                    continue  # another create took this number: look again
                row = models.FunctionVersion(function_id=function_id, project_id=project_id, description=description,
                                             version_number=latest + 1, md5sum=md5sum, created_at=now)
                session.add(row)
                try:
                    await session.commit()
                except IntegrityError:
                    await session.rollback()
                    continue
                return row
        raise Conflict(f"Could not allocate a version number for function {function_id}; try again.")


class FunctionAliases(Repository[models.FunctionAlias]):
    model = models.FunctionAlias

    async def by_name(self, name: str, *, project_id: str | None) -> models.FunctionAlias:
        stmt = self._scoped(sa.select(models.FunctionAlias).where(models.FunctionAlias.name == name), project_id)
        async with self.db.sessions() as session:
            row = (await session.execute(stmt)).scalars().first()
        if row is None:
            raise NotFound(f"FunctionAlias not found [name={name}]")
        return row


CHANGE_RETENTION = _dt.timedelta(hours=1)  # how long the change log keeps a revision's ids
PRUNE_EVERY = 256  # revisions between two prunings of the change log
_IN_CHUNK = 500  # ids per IN (…) list: well under SQLite's limit on bound parameters


async def record_subscription_change(session, ids: Sequence[str]) -> int:
    """Bump the subscriptions' revision and log `ids` under it, in the caller's transaction, as its
    last statement before the commit: the counter row's lock, held to the commit, makes revisions
    commit in order (so a reader never sees revision N without N-1)."""
    if hasattr(session, "flush"):  # an ORM session: the caller's own rows first, the counter always last
        await session.flush()
    counter = models.SubscriptionRevision.__table__
    bumped = await session.execute(sa.update(counter).where(counter.c.id == 1)
                                   .values(revision=counter.c.revision + 1).returning(counter.c.revision))
    revision = bumped.scalar_one()
    changes = models.SubscriptionChange.__table__
    now = models.utcnow()
    await session.execute(sa.insert(changes), [{"revision": revision, "subscription_id": i, "changed_at": now}
                                               for i in dict.fromkeys(ids)])
    if revision % PRUNE_EVERY == 0:
        await session.execute(sa.delete(changes).where(changes.c.changed_at < now - CHANGE_RETENTION))
    return revision


class Subscriptions(Repository[models.Subscription]):
    """Every write also records its ids in the change log (record_subscription_change), which
    other replicas follow (router.subscription_feed)."""

    model = models.Subscription

    async def _changed(self, session, ids: Sequence[str]) -> None:
        await record_subscription_change(session, ids)

    async def add(self, **values: Any) -> models.Subscription:
        values.setdefault("id", models.new_id())  # the change log needs it before the flush would set it
        return await super().add(**values)

    async def all(self) -> list[models.Subscription]:
        async with self.db.sessions() as session:
            return list((await session.execute(sa.select(models.Subscription))).scalars())

    async def add_many(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[models.Subscription], int]:
        """Insert all of `rows` in one transaction (all or none); returns them and their revision."""
        table = models.Subscription.__table__
        now = models.utcnow()
        values = [{"id": models.new_id(), "kind": "subscription", "types": [], "filters": {}, "function_version": 0,
                   "status": "running", "options": {}, **row, "created_at": now, "updated_at": None} for row in rows]
        try:
            # A connection, not an ORM session: nothing here needs the unit of work, and it costs.
            async with self.db.engine.begin() as conn:
                await conn.execute(sa.insert(table), values if len(values) > 1 else values[0])
                revision = await record_subscription_change(conn, [v["id"] for v in values])
        except IntegrityError as exc:
            raise Conflict(f"Duplicate entry for subscriptions: {_constraint(exc)}") from None
        return [models.Subscription(**v) for v in values], revision

    async def revision(self) -> int:
        """The table's revision: every change up to it is committed (0 before the first)."""
        counter = models.SubscriptionRevision.__table__
        async with self.db.sessions() as session:
            return (await session.execute(sa.select(counter.c.revision).where(counter.c.id == 1))).scalar_one_or_none() or 0

    async def changes_after(self, revision: int) -> list[tuple[int, str]]:
        """(revision, subscription id) of every change after `revision`, oldest first."""
        changes = models.SubscriptionChange.__table__
        stmt = (sa.select(changes.c.revision, changes.c.subscription_id).where(changes.c.revision > revision)
                .order_by(changes.c.revision))
        async with self.db.sessions() as session:
            return [(r, i) for r, i in (await session.execute(stmt)).all()]

    async def by_ids(self, ids: Sequence[str]) -> list[models.Subscription]:
        """The rows of these ids that exist (a deleted one is simply absent)."""
        found: list[models.Subscription] = []
        async with self.db.sessions() as session:
            for start in range(0, len(ids), _IN_CHUNK):
                stmt = sa.select(models.Subscription).where(models.Subscription.id.in_(ids[start:start + _IN_CHUNK]))
                found += (await session.execute(stmt)).scalars()
        return found

    async def advance_schedule(self, subscription_id: str, scheduled: _dt.datetime, next_time: _dt.datetime | None,
                               *, count_down: bool = True) -> bool:
        """Compare-and-set the schedule from `scheduled` to `next_time`, counting `count` down; a
        schedule whose count runs out or that has no next time becomes `done`."""
        async with self.db.sessions() as session:
            row = (await session.execute(sa.select(models.Subscription).where(models.Subscription.id == subscription_id))).scalar_one_or_none()
            if row is None or row.next_execution_time != scheduled or row.status != "running":
                return False
            values: dict[str, Any] = {"next_execution_time": next_time or scheduled, "updated_at": models.utcnow()}
            if row.count is not None and count_down:
                values["count"] = max(row.count - 1, 0)
            if next_time is None or values.get("count") == 0:
                values["status"] = "done"
            result = await session.execute(
                sa.update(models.Subscription)
                .where(models.Subscription.id == subscription_id,
                       models.Subscription.next_execution_time == models.UTCDateTime().process_bind_param(scheduled, None),
                       models.Subscription.status == "running")
                .values(**values))
            if result.rowcount == 1:
                await record_subscription_change(session, [subscription_id])
            await session.commit()
            return result.rowcount == 1

    async def using_function(self, function_id: str, *, version: int | None = None, kind: str | None = None,
                             active_only: bool = False) -> list[models.Subscription]:
        stmt = self._scoped(sa.select(models.Subscription).where(models.Subscription.function_id == function_id))
        if version is not None:
            stmt = stmt.where(models.Subscription.function_version == version)
        if kind is not None:
            stmt = stmt.where(models.Subscription.kind == kind)
        if active_only:
            stmt = stmt.where(models.Subscription.status.not_in(("done", "cancelled")))
        async with self.db.sessions() as session:
            return list((await session.execute(stmt)).scalars())


class Executions(Repository[models.Execution]):
    model = models.Execution

    async def get(self, id_: str, *, project_id: str | None = None) -> ExecutionRecord:
        """One execution as plain attributes, read with a Core statement on a pooled connection:
        every poll of a running execution comes here, and an ORM session per read cost more than
        the query."""
        table = models.Execution.__table__
        stmt = self._scoped(sa.select(table).where(table.c.id == id_), project_id)
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"Execution not found [id={id_}]")
        return ExecutionRecord(**row._mapping)

    async def start(self, **values: Any) -> tuple[models.Execution, bool]:
        """Insert a running execution unless one with this id exists. Returns (row, created):
        the idempotency point for redelivered events."""
        try:
            return await self.add(**values), True
        except Conflict:
            return await self.get(values["id"]), False

    async def claim(self, execution_id: str, lease_seconds: float) -> bool:
        """Take a running execution to run it, unless another worker's claim on it is still live.
        Counts the attempt. True if this caller now owns it."""
        now = models.utcnow()
        stmt = (sa.update(models.Execution)
                .where(models.Execution.id == execution_id, models.Execution.status == "running",
                       sa.or_(models.Execution.lease_until.is_(None), models.Execution.lease_until < now))
                .values(lease_until=now + _dt.timedelta(seconds=lease_seconds), attempts=models.Execution.attempts + 1))
        async with self.db.sessions() as session:
            result = await session.execute(stmt)
            await session.commit()
        return result.rowcount == 1

    async def finish(self, execution_id: str, *, status: str, result: Any, logs: str, reason: str) -> None:
        async with self.db.sessions() as session:
            await session.execute(sa.update(models.Execution).where(models.Execution.id == execution_id).values(
                status=status, result=result, logs=logs, reason=reason, updated_at=models.utcnow(), lease_until=None))
            await session.commit()

    async def finish_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record many outcomes in one transaction (the dispatcher's group commit)."""
        if not rows:
            return
        now = models.utcnow()
        stmt = (sa.update(models.Execution).where(models.Execution.id == sa.bindparam("b_id"))
                .values(status=sa.bindparam("b_status"), result=sa.bindparam("b_result", type_=sa.JSON),
                        logs=sa.bindparam("b_logs"), reason=sa.bindparam("b_reason"), updated_at=now, lease_until=None))
        params = [{"b_id": r["id"], "b_status": r["status"], "b_result": r["result"], "b_logs": r["logs"], "b_reason": r["reason"]} for r in rows]
        async with self.db.sessions() as session:
            await session.connection(execution_options={"synchronize_session": False})
            await (await session.connection()).execute(stmt, params)
            await session.commit()

    async def running_count(self, function_id: str, version: int) -> int:
        return await self.count(function_id=function_id, function_version=version, status="running")


class DeadLetters(Repository[models.DeadLetter]):
    model = models.DeadLetter


class Store:
    """All repositories over one database; `scoped(project)` is the same store limited to one
    project's rows (what an API request sees)."""

    def __init__(self, db: Database, scope: str | None = None):
        self.db = db
        self.scope = scope
        self.runtimes = Runtimes(db, scope)
        self.functions = Functions(db, scope)
        self.versions = FunctionVersions(db, scope)
        self.aliases = FunctionAliases(db, scope)
        self.subscriptions = Subscriptions(db, scope)
        self.executions = Executions(db, scope)
        self.dead_letters = DeadLetters(db, scope)

    def scoped(self, project_id: str | None) -> Store:
        if project_id is None and self.scope is None:
            return self
        if self.scope is not None and project_id != self.scope:
            raise ValueError("a scoped store cannot be widened or moved to another project")
        return Store(self.db, project_id)
