"""Regression tests for the API defects a newcomer met (issue 20): deleting a function with finished
jobs, alias targets shown as nothing, image functions on the local engine, a port already in use."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.unit.test_api_qinling import new_function, ok


@pytest.fixture
async def hw(make_headwater):
    return await make_headwater("null")


@pytest.mark.parametrize("finished", ["done", "cancelled"])
async def test_a_function_with_only_finished_jobs_is_deleted_with_them(hw, finished):
    c = hw.client
    fn = await new_function(hw)
    job = await ok(await c.post("/v1/jobs", json={"function_id": fn["id"], "pattern": "0 0 1 1 *"}), 201)
    if finished == "cancelled":
        await ok(await c.put(f"/v1/jobs/{job['id']}", json={"status": "cancelled"}))
    else:  # what the scheduler does when a job's count runs out
        await hw.store.subscriptions.update(job["id"], {"status": "done"})
    # Was a 500 (a foreign-key failure).
    await ok(await c.delete(f"/v1/functions/{fn['id']}"), 204)
    assert (await c.get(f"/v1/functions/{fn['id']}")).status == 404
    assert (await c.get(f"/v1/jobs/{job['id']}")).status == 404
    assert hw.index.get(job["id"]) is None


async def test_a_function_with_a_running_job_is_still_refused(hw):
    c = hw.client
    fn = await new_function(hw)
    await ok(await c.post("/v1/jobs", json={"function_id": fn["id"], "pattern": "0 0 1 1 *"}), 201)
    resp = await c.delete(f"/v1/functions/{fn['id']}")
    assert resp.status == 403 and "running job" in (await resp.json())["faultstring"]


async def test_jobs_and_webhooks_on_an_alias_show_the_alias_target(hw):
    c = hw.client
    fn = await new_function(hw)
    await ok(await c.post(f"/v1/functions/{fn['id']}/versions", json={}), 201)
    await ok(await c.post("/v1/aliases", json={"name": "live", "function_id": fn["id"], "function_version": 1}), 201)
    want = {"function_id": fn["id"], "function_version": 1, "function_alias": "live"}

    def target(body):
        return {k: body[k] for k in want}

    # Was function_version 0, function_id None at create and null after an update.
    job = await ok(await c.post("/v1/jobs", json={"function_alias": "live", "pattern": "0 0 1 1 *"}), 201)
    hook = await ok(await c.post("/v1/webhooks", json={"function_alias": "live"}), 201)
    assert target(job) == want and target(hook) == want
    assert target(await ok(await c.put(f"/v1/jobs/{job['id']}", json={"name": "renamed"}))) == want
    assert target(await ok(await c.put(f"/v1/webhooks/{hook['id']}", json={"description": "d"}))) == want
    assert target(await ok(await c.get(f"/v1/jobs/{job['id']}"))) == want
    assert [target(h) for h in (await ok(await c.get("/v1/webhooks")))["webhooks"]] == [want]
    # The alias moves: what they show moves with it, as what they run does.
    await ok(await c.put("/v1/aliases/live", json={"function_version": 0}))
    assert target(await ok(await c.get(f"/v1/webhooks/{hook['id']}")))["function_version"] == 0
    assert [target(j) for j in (await ok(await c.get("/v1/jobs")))["jobs"]] == [{**want, "function_version": 0}]


async def test_an_image_function_on_the_local_engine_says_why_it_cannot_run(make_headwater):
    hw = await make_headwater("local")
    c = hw.client
    fn = await ok(await c.post("/v1/functions", json={"code": {"source": "image", "image": "busybox"}}), 201)
    execution = await ok(await c.post("/v1/executions", json={"function_id": fn["id"]}), 201)
    assert execution["status"] == "error"
    output = json.loads(execution["result"])["output"]
    assert "local engine does not run image functions" in output and "busybox" in output, output
    assert "None" not in output  # was "No local runtime for image None"


def test_a_port_already_in_use_is_one_clear_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "headwater started" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "configuration error" in x]
    assert f"port = {port}" in line and "cannot listen" in line and "--port" in line, line
