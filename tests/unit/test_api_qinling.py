"""Qinling v1 API behaviour beyond the error cases: updates, versions, aliases resolved at use time,
job pause/resume, webhook re-targeting, and the Qinling defects Headwater fixes."""

from __future__ import annotations

import datetime as _dt
import json
import re

import pytest
from aiohttp import FormData

from tests.e2e.server import make_zip

TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@pytest.fixture
async def hw(make_headwater):
    return await make_headwater("null")


async def ok(resp, status: int = 200):
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text) if text else None


def package_form(text: str = "def main(**kw):\n    return kw\n", **fields) -> FormData:
    form = FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    form.add_field("package", make_zip({"main.py": text}), filename="p.zip")
    return form


async def new_function(hw) -> dict:
    runtime = await ok(await hw.client.post("/v1/runtimes", json={"image": "python3"}), 201)
    return await ok(await hw.client.post("/v1/functions", data=package_form(
        runtime_id=runtime["id"], code=json.dumps({"source": "package"}))), 201)


async def test_function_update_replaces_the_package_and_keeps_metadata_updates_cheap(hw):
    c = hw.client
    fn = await new_function(hw)
    old_md5 = fn["code"]["md5sum"]
    renamed = await ok(await c.put(f"/v1/functions/{fn['id']}", json={"name": "n", "description": "d", "timeout": 9}))
    assert (renamed["name"], renamed["description"], renamed["timeout"]) == ("n", "d", 9)
    assert renamed["code"] == fn["code"] and TIME.match(renamed["updated_at"])
    # What python-qinlingclient sends: the code dict's keys merged into the form, plus the file.
    updated = await ok(await c.put(f"/v1/functions/{fn['id']}", data=package_form("def main(**kw):\n    return 2\n",
                                                                                 source="package", entry="main.main")))
    new_md5 = updated["code"]["md5sum"]
    assert new_md5 != old_md5 and updated["code"]["source"] == "package"
    files = sorted(p.name for p in hw.packages.root.rglob("*.zip"))
    assert files == [f"{fn['id']}_0_{new_md5}.zip"], "the old package is deleted after the update"
    download = await c.get(f"/v1/functions/{fn['id']}?download=true")
    assert download.status == 200 and download.content_type == "application/zip"
    assert download.headers["Content-Disposition"] == f'attachment; filename="{fn["id"]}"'
    # Read-only fields a client echoes back are ignored, as in Qinling.
    same = await ok(await c.put(f"/v1/functions/{fn['id']}", json={"id": "x", "count": 99, "runtime_id": None}))
    assert same["id"] == fn["id"] and same["count"] == 0 and same["runtime_id"] == fn["runtime_id"]


async def test_versions_are_numbered_snapshots_never_reused(hw):
    c = hw.client
    fn = await new_function(hw)
    v1 = await ok(await c.post(f"/v1/functions/{fn['id']}/versions", json={"description": "one"}), 201)
    await ok(await c.put(f"/v1/functions/{fn['id']}", data=package_form("def main(**kw):\n    return 'v2'\n")))
    v2 = await ok(await c.post(f"/v1/functions/{fn['id']}/versions"), 201)
    assert (v1["version_number"], v2["version_number"]) == (1, 2)
    assert (await ok(await c.get(f"/v1/functions/{fn['id']}")))["latest_version"] == 2
    zipped = await c.get(f"/v1/functions/{fn['id']}/versions/1?download=true")
    assert zipped.status == 200 and zipped.headers["Content-Disposition"] == f'attachment; filename="{fn["id"]}_1"'
    assert b"return kw" in await zipped.read(), "version 1 keeps the code it was made from"
    await ok(await c.delete(f"/v1/functions/{fn['id']}/versions/2"), 204)
    await ok(await c.put(f"/v1/functions/{fn['id']}", data=package_form("def main(**kw):\n    return 'v3'\n")))
    v3 = await ok(await c.post(f"/v1/functions/{fn['id']}/versions"), 201)
    assert v3["version_number"] == 3, "Qinling reused 2 here; a number is never given twice"
    listed = await ok(await c.get(f"/v1/functions/{fn['id']}/versions"))
    assert [v["version_number"] for v in listed["function_versions"]] == [1, 3]
    # Executions by version run that version and count on it.
    ran = await ok(await c.post("/v1/executions", json={"function_id": fn["id"], "function_version": 3}), 201)
    assert ran["function_version"] == 3 and ran["status"] == "success"
    await ok(await c.delete(f"/v1/functions/{fn['id']}"), 204)
    assert list(hw.packages.root.rglob("*.zip")) == [], "deleting a function deletes every version's package"


async def test_alias_is_resolved_at_use_time_and_listing_respects_projects(hw):
    c = hw.client
    fn = await new_function(hw)
    await ok(await c.post(f"/v1/functions/{fn['id']}/versions"), 201)
    alias = await ok(await c.post("/v1/aliases", json={"name": "prod", "function_id": fn["id"]}), 201)
    assert alias["function_version"] == 0 and TIME.match(alias["created_at"])
    first = await ok(await c.post("/v1/executions", json={"function_alias": "prod"}), 201)
    assert (first["function_version"], first["function_alias"]) == (0, "prod")
    moved = await ok(await c.put("/v1/aliases/prod", json={"function_version": 1, "function_id": None,
                                                           "description": None}))
    assert moved["function_version"] == 1 and moved["function_id"] == fn["id"]
    second = await ok(await c.post("/v1/executions", json={"function_alias": "prod"}), 201)
    assert second["function_version"] == 1
    assert [a["name"] for a in (await ok(await c.get("/v1/aliases")))["function_aliases"]] == ["prod"]
    assert (await ok(await c.get("/v1/aliases?project_id=someone-else")))["function_aliases"] == []
    await ok(await c.delete("/v1/aliases/prod"), 204)
    assert (await c.get("/v1/aliases/prod")).status == 404


async def test_job_pause_resume_and_reschedule(hw):
    c = hw.client
    fn = await new_function(hw)
    job = await ok(await c.post("/v1/jobs", json={"function_id": fn["id"], "pattern": "0 0 1 1 *", "name": "new year"}), 201)
    assert job["status"] == "running" and job["count"] is None and TIME.match(job["next_execution_time"])
    paused = await ok(await c.put(f"/v1/jobs/{job['id']}", json={"status": "paused"}))
    assert paused["status"] == "paused"
    assert hw.index.get(job["id"]).status == "paused", "the scheduler's index follows the table"
    resumed = await ok(await c.put(f"/v1/jobs/{job['id']}", json={"status": "running", "function_input": "hi"}))
    assert resumed["status"] == "running" and resumed["function_input"] == "hi"
    hourly = await ok(await c.put(f"/v1/jobs/{job['id']}", json={"pattern": "0 * * * *"}))
    next_time = _dt.datetime.strptime(hourly["next_execution_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
    now = _dt.datetime.now(_dt.timezone.utc)
    assert hourly["pattern"] == "0 * * * *" and now < next_time <= now + _dt.timedelta(hours=1)
    at = (now + _dt.timedelta(hours=3)).replace(microsecond=0)
    moved = await ok(await c.put(f"/v1/jobs/{job['id']}", json={"next_execution_time": at.strftime("%Y-%m-%d %H:%M:%S")}))
    assert moved["next_execution_time"] == at.strftime("%Y-%m-%dT%H:%M:%SZ")
    cancelled = await ok(await c.put(f"/v1/jobs/{job['id']}", json={"status": "cancelled"}))
    assert cancelled["status"] == "cancelled"
    assert (await c.put(f"/v1/jobs/{job['id']}", json={"status": "running"})).status == 400


async def test_webhook_retargeting_and_a_webhook_without_version_runs(hw):
    c = hw.client
    fn = await new_function(hw)
    await ok(await c.post("/v1/aliases", json={"name": "a", "function_id": fn["id"]}), 201)
    # Qinling stored a missing function_version as null and every invoke then failed with 500.
    hook = await ok(await c.post("/v1/webhooks", json={"function_id": fn["id"]}), 201)
    assert hook["function_version"] == 0
    invoked = await ok(await c.post(f"/v1/webhooks/{hook['id']}/invoke?x=1", json={"y": 2}), 202)
    execution = await ok(await c.get(f"/v1/executions/{invoked['execution_id']}"))
    assert execution["description"] == f"Created by Webhook {hook['id']}"
    to_alias = await ok(await c.put(f"/v1/webhooks/{hook['id']}", json={"function_alias": "a", "function_id": None,
                                                                        "function_version": None, "description": None}))
    # The alias's current target is shown (stored empty, resolved at each use).
    assert (to_alias["function_alias"], to_alias["function_id"], to_alias["function_version"]) == ("a", fn["id"], 0)
    assert (hw.index.get(hook["id"]).function_id, hw.index.get(hook["id"]).function_alias) == (None, "a")
    back = await ok(await c.put(f"/v1/webhooks/{hook['id']}", json={"function_id": fn["id"], "description": "d"}))
    assert (back["function_alias"], back["function_id"], back["function_version"], back["description"]) == (
        None, fn["id"], 0, "d")
    assert hw.index.get(hook["id"]).function_alias is None


@pytest.mark.parametrize("raw, shown", [('[1, 2]', '[1, 2]'), ("3.5", "3.5"), ("42", "42"), ('"text"', "text"),
                                        ("plain words", "plain words"), ('{"k": "v"}', '{"k": "v"}')])
async def test_execution_inputs_of_every_json_shape_are_accepted(hw, raw, shown):
    fn = await new_function(hw)
    execution = await ok(await hw.client.post("/v1/executions", json={"function_id": fn["id"], "input": raw}), 201)
    assert execution["status"] == "success" and execution["input"] == shown


async def test_admin_operations_runtime_update_pool_workers_scale_detach(hw):
    c = hw.client
    fn = await new_function(hw)
    rid = fn["runtime_id"]
    updated = await ok(await c.put(f"/v1/runtimes/{rid}", json={"image": "python3.12", "name": "py"}))
    assert (updated["image"], updated["name"], updated["status"]) == ("python3.12", "py", "available")
    assert await ok(await c.get(f"/v1/runtimes/{rid}/pool")) == {"name": rid, "capacity": {"total": 0, "available": 0}}
    workers = await ok(await c.get(f"/v1/functions/{fn['id']}/workers"))
    assert workers == {"workers": []}
    for path in ("scale_up", "scale_down", "versions/0/scale_up"):
        assert (await c.post(f"/v1/functions/{fn['id']}/{path}", json={"count": 2})).status == 202
    assert (await c.post(f"/v1/functions/{fn['id']}/detach")).status == 202
    listed = await ok(await c.get("/v1/functions"))
    assert isinstance(listed["functions"][0]["code"], dict), "code is an object in lists too (Qinling: a string)"
