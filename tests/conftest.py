"""Shared fixtures: a store on SQLite and on PostgreSQL, configuration in a temporary data dir."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from router.config import Config
from router.store import Database, Store
from tests.services import POSTGRES_URL, require_service


@pytest.fixture
def config(tmp_path) -> Config:
    return Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}})


async def _postgres_database() -> Database:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return Database(POSTGRES_URL, schema=f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path):
    """A migrated store; the PostgreSQL one lives in a throw-away schema of database `test`."""
    if request.param == "sqlite":
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'test.db'}")
    else:
        db = await _postgres_database()
    await db.migrate()
    yield Store(db)
    if db.schema:
        async with db.engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA "{db.schema}" CASCADE'))
    await db.dispose()


@pytest.fixture
async def make_headwater(tmp_path):
    """Factory for whole in-process Headwaters on a test HTTP client: `await make_headwater("null",
    section={option: value}, …)` (the first argument is the engine); `.client` is an aiohttp TestClient.
    All are stopped after the test."""
    from aiohttp.test_utils import TestClient, TestServer

    from router.app import Headwater

    started = []

    async def make(backend: str = "null", **sections):
        overrides = {"DEFAULT": {"data_dir": str(tmp_path / f"hw{len(started)}")}, "engine": {"backend": backend}}
        for section, options in sections.items():
            overrides.setdefault(section, {}).update(options)
        app = Headwater(Config.load(overrides=overrides))
        await app.start()
        app.client = TestClient(TestServer(app.web))
        await app.client.start_server()
        started.append(app)
        return app

    yield make
    for app in reversed(started):
        await app.client.close()
        await app.stop()
