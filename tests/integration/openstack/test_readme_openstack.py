"""The README's "OpenStack sources" section, followed as written against the real services
(Done-when 4): its configuration, its Zaqar subscription and its Aodh `register` command."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import uuid
from pathlib import Path

import pytest

from sources.aodh import aodh_client
from tests.conditions import eventually
from tests.unit.test_batching import BatchEngine
from tests.unit.test_readme import readme_block

from .conftest import AODH_URL, PROJECT, ZAQAR_URL, zaqar

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def readme_config(tmp_path, public_url: str) -> str:
    """The README's configuration block, with the example hosts replaced by the harness's."""
    text = (readme_block("openstack-conf").replace("http://zaqar.example:8888", ZAQAR_URL)
            .replace("http://aodh.example:8042", AODH_URL).replace("rabbit.example", "127.0.0.1")
            .replace("http://headwater.example:7070", public_url))
    path = tmp_path / "headwater.conf"
    path.write_text(text + f"\n[DEFAULT]\ndata_dir = {tmp_path}\n")
    return str(path)


async def test_the_readme_zaqar_subscription_consumes_its_queue_in_batches(router, tmp_path):
    queue = "orders"  # as the README names it; emptied first, since the harness's Zaqar outlives test runs
    await zaqar("DELETE", f"/v2/queues/{queue}")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "project_id": PROJECT, "poll_interval": "0.2"})
    engine = BatchEngine()
    hw.app.engine = hw.app.executions.engine = engine
    function_id = await hw.make_function()
    body = json.loads(readme_block("zaqar-subscription").replace("FUNCTION_ID", function_id))
    resp = await hw.client.post("/v1/subscriptions", json=body)
    assert resp.status == 201, await resp.text()
    status, posted = await zaqar("POST", f"/v2/queues/{queue}/messages",
                                 json={"messages": [{"ttl": 300, "body": {"order": n}} for n in range(10)]})
    assert status == 201
    rows = await eventually(lambda: _done(hw, 10))
    assert sorted(r.input["order"] for r in rows) == list(range(10))
    assert [len(run) for run in engine.runs] == [10]  # one run for the ten (batch size 10)
    await zaqar("DELETE", f"/v2/queues/{queue}")


async def _done(hw, n: int):
    rows = [r for r in await hw.executions() if r.status == "success"]
    return rows if len(rows) == n else None


async def test_the_readme_register_command_creates_an_alarm_aimed_at_headwater(openstack, tmp_path):
    conf = readme_config(tmp_path, "http://127.0.0.1:7070")
    command = shlex.split(readme_block("aodh-register").replace("\\\n", " "))
    assert command[:3] == ["python", "-m", "sources.aodh"]
    name = f"photo-uploaded-{uuid.uuid4().hex[:6]}"  # the README's name, made unique: Aodh outlives test runs
    command = [sys.executable, *command[1:]]
    command[command.index("headwater.conf")] = conf
    command[command.index("photo-uploaded")] = name
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                cwd=str(Path(__file__).resolve().parents[3]))
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    created = json.loads(out)
    token = (tmp_path / "aodh-token.key").read_text()
    assert created["name"] == name and created["alarm_actions"] == [
        f"http://127.0.0.1:7070/v1/aodh/alarms?project_id=demo&token={token}"]
    client = aodh_client(endpoint=AODH_URL, user_id="headwater", project_id="demo")
    alarm = await asyncio.to_thread(client.alarm.get, created["alarm_id"])
    assert alarm["event_rule"]["event_type"] == "objectstore.http.request"
    assert alarm["event_rule"]["query"] == [{"field": "traits.action", "op": "eq", "type": "string", "value": "update"}]
    await asyncio.to_thread(client.alarm.delete, created["alarm_id"])
