"""Database engine set-up: connection, SQLite pragmas (WAL), Alembic migrations at start-up."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class NotFound(LookupError):
    """No such row (the API answers 404 with this message)."""


class Conflict(ValueError):
    """A uniqueness or state conflict (the API answers 400 or 409 as Qinling does)."""


def sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while one writer commits; busy_timeout makes writers wait instead of
    # failing with "database is locked"; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """Owns the async engine and the session factory."""

    def __init__(self, url: str, *, pool_size: int = 10, schema: str | None = None):
        self.url = sa.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict = {}
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
                # database file's mode, so none of them is readable by other users.
                os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
                for path in (database, f"{database}-wal", f"{database}-shm"):  # made by an older release
                    try:
                        os.chmod(path, 0o600)
                    except OSError:
                        pass
                # A bounded pool without overflow: each overflow connection would start an aiosqlite
                # thread and rerun the PRAGMAs, only to be closed again; SQLite writes one at a time
                # anyway, so a caller waits for a pooled connection instead.
                kwargs.update(pool_size=pool_size, max_overflow=0)

        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
            if schema:
                # Tests isolate themselves in a schema of their own on the shared database.
                kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
        self.schema = schema
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine.sync_engine, "connect", sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False, class_=AsyncSession)
        self._reader = None

    @property
    def reader(self):
        """The RowReader of the hot list reads (router.store.reader), made on first use."""
        if self._reader is None:
            from router.store.reader import RowReader  # it builds on this module: import late

            self._reader = RowReader(self)
        return self._reader

    async def pending_migrations(self) -> tuple[str, list[tuple[str, str]]]:
        """(revision in force or "base", [(revision, description)] not yet applied, oldest first)."""
        def read(sync_conn) -> tuple[str, list[tuple[str, str]]]:
            script = ScriptDirectory(str(MIGRATIONS_DIR))
            current = MigrationContext.configure(sync_conn).get_current_revision()
            pending = [(rev.revision, rev.doc or "") for rev in script.walk_revisions(current or "base", "heads")
                       if rev.revision != current]
            return current or "base", list(reversed(pending))

        async with self.engine.connect() as conn:
            return await conn.run_sync(read)

    async def migrate(self, target: str = "head") -> str:
        """Bring the schema up to `target` (the newest Alembic revision by default); returns the
        revision in force."""
        if self.schema and not self.is_sqlite:
            async with self.engine.begin() as conn:
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))

        def upgrade(sync_conn) -> str:
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            cfg.attributes["connection"] = sync_conn
            command.upgrade(cfg, target)
            row = sync_conn.execute(sa.text("SELECT version_num FROM alembic_version")).first()
            return row[0] if row else "base"

        async with self.engine.begin() as conn:
            revision = await conn.run_sync(upgrade)
        log.info("database schema at revision %s", revision, extra={"database": self.url.render_as_string(hide_password=True)})
        return revision

    async def dispose(self) -> None:
        if self._reader is not None:
            await self._reader.close()
        await self.engine.dispose()
