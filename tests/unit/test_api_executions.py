"""GET /v1/executions shows Headwater's fields beside Qinling's: attempts, and start/finish to the millisecond."""

from __future__ import annotations

import datetime as dt
import re


async def test_executions_show_attempts_and_millisecond_times(make_headwater):
    hw = await make_headwater("null")
    started = dt.datetime(2026, 12, 4, 15, 35, 37, 123456, tzinfo=dt.timezone.utc)
    row = await hw.store.executions.add(function_id="f", function_version=0, status="retrying", sync=False, input=None,
                                        project_id="default", subscription_id="s", event_id="e", attempts=2,
                                        created_at=started, updated_at=started + dt.timedelta(milliseconds=250))
    shown = await (await hw.client.get(f"/v1/executions/{row.id}")).json()
    assert shown["attempts"] == 2 and shown["status"] == "retrying"
    assert shown["started_at"] == "2026-12-04T15:35:37.123Z" and shown["finished_at"] is None
    assert shown["created_at"] == "2026-12-04T15:35:37Z"  # Qinling's field keeps Qinling's format
    await hw.store.executions.update(row.id, {"status": "failed", "attempts": 3,
                                              "updated_at": started + dt.timedelta(seconds=2, milliseconds=7)})
    listed = (await (await hw.client.get("/v1/executions")).json())["executions"]
    (shown,) = [e for e in listed if e["id"] == row.id]
    assert shown["attempts"] == 3 and shown["finished_at"] == "2026-12-04T15:35:39.130Z"


async def test_a_run_through_the_api_has_millisecond_times(make_headwater):
    hw = await make_headwater("null")
    runtime = await hw.store.runtimes.add(image="python3", status="available", project_id="default")
    function = await hw.store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="m.main", cpu=100,
                                            memory_size=33554432, timeout=5, project_id="default")
    resp = await hw.client.post("/v1/executions", json={"function_id": function.id, "input": "{}"})
    shown = await resp.json()
    assert resp.status == 201 and shown["attempts"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", shown["started_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", shown["finished_at"])
