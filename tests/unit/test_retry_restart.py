"""Retries survive restarts on every bus: an execution waiting for its next attempt when the server
stops is run again after it starts (durable buses keep the retry; after a restart on the memory
bus the router puts it back from the execution record and the event history)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from router.events import execution_id_for
from router.executions import RETRYING
from router.store import models
from tests.buses import BUSES, bus_settings
from tests.unit.test_delivery import FlakyEngine
from tests.unit.test_router_flow import make_function

WAIT = 30.0  # a guard against hanging; each wait ends as soon as its condition holds


async def started(config: Config, engine: FlakyEngine) -> Headwater:
    app = Headwater(config)
    app.engine = app.executions.engine = engine
    await app.start()
    app.client = TestClient(TestServer(app.web))
    await app.client.start_server()
    return app


async def stopped(app: Headwater) -> None:
    await app.client.close()
    await app.stop()


async def wait_status(app: Headwater, execution_id: str, statuses: tuple[str, ...]) -> models.Execution:
    async def poll() -> models.Execution:
        while True:
            row = await app.store.executions.find(execution_id)
            if row is not None and row.status in statuses:
                return row
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), WAIT)


async def first_attempt_fails(app: Headwater, backoff: float) -> str:
    """A subscription whose function fails once; its event's first attempt has failed and the
    execution waits `backoff` seconds for the next. Returns the execution id."""
    function_id = await make_function(app)
    resp = await app.client.post("/v1/subscriptions", json={
        "source": "http", "types": ["com.example.work"], "function_id": function_id,
        "options": {"delivery": {"backoff_initial": backoff, "jitter": 0}}})
    assert resp.status == 201, await resp.text()
    sub = (await resp.json())["id"]
    resp = await app.client.post("/v1/events", json={"specversion": "1.0", "id": "r1", "source": "/test",
                                                     "type": "com.example.work", "data": {"fail": 1}})
    assert resp.status == 202, await resp.text()
    execution_id = execution_id_for("/test", "r1", sub)
    await wait_status(app, execution_id, (RETRYING,))
    return execution_id


@pytest.mark.parametrize("backend", BUSES)
async def test_a_retry_waiting_when_the_server_stops_runs_after_it_starts(backend, tmp_path):
    bus, cleanup = bus_settings(backend)
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"backend": "null"}, "bus": bus})
    engine = FlakyEngine()  # one engine for both lives: it counts calls across the restart
    first = await started(config, engine)
    second = None
    try:
        execution_id = await first_attempt_fails(first, backoff=1.0)
        await stopped(first)  # the memory bus's waiting retry goes with it
        first = None
        second = await started(config, engine)
        row = await wait_status(second, execution_id, ("success", "failed", "error"))
        assert row.status == "success" and row.attempts == 2, (row.status, row.attempts, row.reason)
        assert engine.calls[execution_id] == 2
        assert await second.store.dead_letters.list() == []
    finally:
        for app in (first, second):
            if app is not None:
                await stopped(app)
        if cleanup is not None:
            await cleanup(second.bus if second is not None else None)


async def test_a_lost_retry_whose_event_left_the_history_is_dead_lettered(tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"backend": "null"},
                                    "bus": {"backend": "memory"}})
    engine = FlakyEngine()
    first = await started(config, engine)
    execution_id = await first_attempt_fails(first, backoff=1.0)
    # The history is trimmed before the restart: nothing is left to run the retry with.
    await first.history.flush()
    async with first.store.db.sessions() as session:
        await session.execute(models.EventRecord.__table__.delete())
        await session.commit()
    await stopped(first)
    second = await started(config, engine)
    try:
        row = await wait_status(second, execution_id, ("success", "failed", "error"))
        assert row.status == "error" and row.reason == "retry lost" and row.attempts == 1
        (letter,) = await second.store.dead_letters.list()
        assert letter.event_id == "r1" and "no longer in the event history" in letter.reason
        assert engine.calls[execution_id] == 1
    finally:
        await stopped(second)
