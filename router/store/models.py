"""The tables: runtimes (and the projects private ones are shared with), functions and their versions and aliases, subscriptions (and their change log), executions, dead letters."""

from __future__ import annotations

import datetime as _dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def naive_utc(value: _dt.datetime | None) -> _dt.datetime | None:
    """How the database holds a datetime: naive UTC (a naive one is taken as UTC already)."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(_dt.timezone.utc).replace(tzinfo=None)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in the database (the same on SQLite and PostgreSQL)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: _dt.datetime | None, dialect) -> _dt.datetime | None:
        return naive_utc(value)

    def process_result_value(self, value: _dt.datetime | None, dialect) -> _dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=_dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: sa.JSON, list[Any]: sa.JSON, Any: sa.JSON}


class _Common:
    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(sa.String(80), nullable=False, index=True)
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime, nullable=True, default=None, onupdate=utcnow)


class Runtime(_Common, Base):
    __tablename__ = "runtimes"
    name: Mapped[str | None] = mapped_column(sa.String(255))
    description: Mapped[str | None] = mapped_column(sa.String(255))
    image: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    status: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    is_public: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True)
    trusted: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True)


class RuntimeProject(Base):
    """A project a private runtime is shared with (Qinling's runtime access); the admins' project
    that created it always sees it."""

    __tablename__ = "runtime_projects"
    __table_args__ = (sa.Index("ix_runtime_projects_project_id", "project_id"),)
    runtime_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("runtimes.id", ondelete="CASCADE"), primary_key=True)
    project_id: Mapped[str] = mapped_column(sa.String(80), primary_key=True)


class Function(_Common, Base):
    __tablename__ = "functions"
    name: Mapped[str | None] = mapped_column(sa.String(255))
    description: Mapped[str | None] = mapped_column(sa.String(255))
    runtime_id: Mapped[str | None] = mapped_column(sa.String(36), sa.ForeignKey("runtimes.id"), nullable=True, index=True)
    cpu: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    memory_size: Mapped[int] = mapped_column(sa.BigInteger, nullable=False, default=0)
    timeout: Mapped[int | None] = mapped_column(sa.Integer)
    code: Mapped[dict[str, Any]] = mapped_column(sa.JSON, nullable=False)
    entry: Mapped[str | None] = mapped_column(sa.String(80))
    count: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    latest_version: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)


class FunctionVersion(_Common, Base):
    __tablename__ = "function_versions"
    __table_args__ = (sa.UniqueConstraint("project_id", "function_id", "version_number"),)
    function_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("functions.id", ondelete="CASCADE"), nullable=False, index=True)
    description: Mapped[str | None] = mapped_column(sa.String(255))
    version_number: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    count: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    md5sum: Mapped[str | None] = mapped_column(sa.String(32))


class FunctionAlias(_Common, Base):
    __tablename__ = "function_aliases"
    __table_args__ = (
        sa.UniqueConstraint("project_id", "name"),
        sa.UniqueConstraint("project_id", "function_id", "function_version"),
    )
    name: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    function_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("functions.id"), nullable=False, index=True)
    function_version: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    description: Mapped[str | None] = mapped_column(sa.String(255))


class Subscription(_Common, Base):
    """Which events go to which function. Qinling jobs are rows with source 'cron', webhooks rows
    with source 'http'."""

    __tablename__ = "subscriptions"
    name: Mapped[str | None] = mapped_column(sa.String(255))
    description: Mapped[str | None] = mapped_column(sa.String(255))
    source: Mapped[str] = mapped_column(sa.String(32), nullable=False, index=True)
    # How it was made: `job` (/v1/jobs), `webhook` (/v1/webhooks) or `subscription` (/v1/subscriptions).
    kind: Mapped[str] = mapped_column(sa.String(16), nullable=False, default="subscription", index=True)
    types: Mapped[list[Any]] = mapped_column(sa.JSON, nullable=False, default=list)
    filters: Mapped[dict[str, Any]] = mapped_column(sa.JSON, nullable=False, default=dict)
    function_id: Mapped[str | None] = mapped_column(sa.String(36), sa.ForeignKey("functions.id"), nullable=True, index=True)
    function_version: Mapped[int | None] = mapped_column(sa.Integer, nullable=True, default=0)
    function_alias: Mapped[str | None] = mapped_column(sa.String(255))
    function_input: Mapped[str | None] = mapped_column(sa.Text)
    # Schedules (cron): the scheduler's state lives on the row so replicas share it.
    pattern: Mapped[str | None] = mapped_column(sa.String(64))
    first_execution_time: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime)
    next_execution_time: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    count: Mapped[int | None] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.String(32), nullable=False, default="running")
    # Source-specific and policy settings (timezone, input mapping, delivery, sinks), as JSON.
    options: Mapped[dict[str, Any]] = mapped_column(sa.JSON, nullable=False, default=dict)


class SubscriptionRevision(Base):
    """One row: the subscriptions table's revision, bumped by every transaction that changes it.

    Writers take the row's lock last and hold it to their commit, so revisions commit in order:
    a replica that sees revision N also sees every change up to N (router.subscription_feed)."""

    __tablename__ = "subscription_revision"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    revision: Mapped[int] = mapped_column(sa.BigInteger, nullable=False, default=0)


class SubscriptionChange(Base):
    """Which subscriptions one revision created, changed or deleted (a delete leaves only this
    row behind). Pruned after a while; a replica that fell further behind reloads in full."""

    __tablename__ = "subscription_changes"
    revision: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    subscription_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    changed_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime, nullable=False)


class Execution(_Common, Base):
    """One run of a function. Executions caused by an event have id = execution_id_for(event,
    subscription), which makes a redelivered event recognisable."""

    __tablename__ = "executions"
    # Inserted at start, updated at finish: room on each page for the updated row, so that the
    # update stays on its page and writes no index entry (migration 0003).
    __table_args__ = {"postgresql_with": {"fillfactor": 50}}
    function_id: Mapped[str | None] = mapped_column(sa.String(36), index=True)
    function_alias: Mapped[str | None] = mapped_column(sa.String(255))
    function_version: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    # Not indexed: a finish changes it, and an indexed column would keep that update off its page.
    status: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    sync: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True)
    input: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
    result: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
    description: Mapped[str | None] = mapped_column(sa.String(255))
    logs: Mapped[str | None] = mapped_column(sa.Text)
    reason: Mapped[str | None] = mapped_column(sa.String(32))
    event_id: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    subscription_id: Mapped[str | None] = mapped_column(sa.String(36), index=True)
    attempts: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    # Who runs it: a worker claims a running execution until this time (its timeout plus a margin).
    # A crashed worker's claim runs out, so a redelivery of the event can take the execution over.
    lease_until: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class DeadLetter(_Common, Base):
    """Something that could not be delivered or could not become an event, with the reason."""

    __tablename__ = "dead_letters"
    source: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    reason: Mapped[str] = mapped_column(sa.Text, nullable=False)
    event_id: Mapped[str | None] = mapped_column(sa.String(255), index=True)
    subscription_id: Mapped[str | None] = mapped_column(sa.String(36), index=True)
    payload: Mapped[Any] = mapped_column(sa.JSON, nullable=True)


class EventRecord(Base):
    """An event that entered Headwater, kept for a while (history and replay)."""

    __tablename__ = "events"
    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    project_id: Mapped[str] = mapped_column(sa.String(80), nullable=False, index=True)
    source_kind: Mapped[str] = mapped_column(sa.String(32), nullable=False, index=True)
    source: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    type: Mapped[str] = mapped_column(sa.String(255), nullable=False, index=True)
    subject: Mapped[str | None] = mapped_column(sa.String(1024))
    time: Mapped[_dt.datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    size: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    document: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
