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


async def test_runtime_servers_get_none_of_the_engines_secrets(make_headwater, monkeypatch):
    import json

    from aiohttp import FormData

    from tests.e2e.server import make_zip
    monkeypatch.setenv("HEADWATER_DOWNLOAD_TOKEN_SECRET", "engine-secret-value")
    monkeypatch.setenv("OS_PASSWORD", "cloud-password")
    hw = await make_headwater("local")
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    form = FormData()
    form.add_field("runtime_id", runtime["id"])
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("package", make_zip({"main.py": "def main():\n    return 1\n"}), filename="f.zip")
    fid = (await (await hw.client.post("/v1/functions", data=form)).json())["id"]
    resp = await hw.client.post("/v1/executions", json={"function_id": fid})
    assert (await resp.json())["status"] == "success"
    workers = [w for pool in hw.engine._pools.values() for w in pool]
    assert workers
    for worker in workers:
        with open(f"/proc/{worker.process.pid}/environ", "rb") as fh:
            environ = fh.read()
        assert b"engine-secret-value" not in environ and b"cloud-password" not in environ
