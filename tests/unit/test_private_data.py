"""The data directory, the SQLite database and its WAL are private to Headwater's own user (finding 5)."""

from __future__ import annotations

import os
import stat

import sqlalchemy as sa

from router.app import private_data_dir
from router.store.db import Database


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_data_dir_is_made_private(tmp_path):
    data = tmp_path / "data"
    private_data_dir(data)
    assert mode(data) == 0o700
    os.chmod(data, 0o755)  # made by an older release
    private_data_dir(data)
    assert mode(data) == 0o700


async def test_the_database_and_its_wal_are_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "db" / "headwater.db"
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            await db.migrate()
            async with db.engine.begin() as conn:
                await conn.execute(sa.text("CREATE TABLE probe (x INTEGER)"))
                await conn.execute(sa.text("INSERT INTO probe VALUES (1)"))
            files = [p for p in path.parent.iterdir() if p.name.startswith("headwater.db")]
            assert any(p.name.endswith("-wal") for p in files), files
            assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
        finally:
            await db.engine.dispose()
    finally:
        os.umask(old)
