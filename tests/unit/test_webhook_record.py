"""A webhook writes its execution record while its event goes onto the bus: whichever lands first,
the caller gets the execution's id, and the run happens once, recorded and counted once."""

from __future__ import annotations

import asyncio

from router.events import derived_id, execution_id_for
from tests.unit.test_webhook_secret import _webhook


def _watch_finishes(hw, monkeypatch) -> dict[str, asyncio.Event]:
    """An event per execution id, set when the journal is asked to record its outcome."""
    finished: dict[str, asyncio.Event] = {}
    real_finish = hw.executions.journal.finish

    def finish(execution_id, **kwargs):
        future = real_finish(execution_id, **kwargs)
        future.add_done_callback(lambda _: finished.setdefault(execution_id, asyncio.Event()).set())
        return future

    monkeypatch.setattr(hw.executions.journal, "finish", finish)
    return finished


async def _finished(finished: dict[str, asyncio.Event], execution_id: str) -> None:
    await asyncio.wait_for(finished.setdefault(execution_id, asyncio.Event()).wait(), 30)


async def test_an_event_that_outruns_its_record_runs_once(make_headwater, monkeypatch):
    hw = await make_headwater("null")
    webhook = await _webhook(hw)
    finished = _watch_finishes(hw, monkeypatch)
    real_start = hw.executions.journal.start_execution

    def late_start(values):
        # The publisher's record is written only after the router has claimed, run and finished it.
        future = asyncio.get_running_loop().create_future()

        async def write():
            await _finished(finished, values["id"])
            try:
                future.set_result(await real_start(values))
            except Exception as exc:
                future.set_exception(exc)

        asyncio.ensure_future(write())
        return future

    monkeypatch.setattr(hw.executions.journal, "start_execution", late_start)
    resp = await hw.client.post(f"/v1/webhooks/{webhook['id']}/invoke", json={"n": 1})
    assert resp.status == 202, await resp.text()
    execution_id = (await resp.json())["execution_id"]
    runs = await hw.store.executions.list(filters={"subscription_id": webhook["id"]})
    assert [(r.id, r.status, r.attempts) for r in runs] == [(execution_id, "success", 1)]
    await hw.executions.flush_counts()
    assert (await hw.store.functions.get(webhook["function_id"])).count == 1


async def test_a_record_that_fails_once_the_event_is_on_the_bus(make_headwater, monkeypatch):
    """The caller hears 503; the event is safe on the bus, so the router runs it and its claim
    writes the record."""
    hw = await make_headwater("null")
    webhook = await _webhook(hw)
    finished = _watch_finishes(hw, monkeypatch)

    def failing_start(values):
        future = asyncio.get_running_loop().create_future()
        future.set_exception(ConnectionError("database went away"))
        return future

    monkeypatch.setattr(hw.executions.journal, "start_execution", failing_start)
    resp = await hw.client.post(f"/v1/webhooks/{webhook['id']}/invoke", json={"n": 2}, headers={"Idempotency-Key": "k"})
    assert resp.status == 503 and "ConnectionError" in await resp.text()
    event_id = derived_id("webhook", webhook["id"], "k")
    await _finished(finished, execution_id_for(f"/headwater/webhooks/{webhook['id']}", event_id, webhook["id"]))
    (run,) = await hw.store.executions.list(filters={"subscription_id": webhook["id"]})
    assert (run.status, run.attempts, run.event_id) == ("success", 1, event_id)
