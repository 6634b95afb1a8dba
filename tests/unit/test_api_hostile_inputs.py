"""Hostile inputs get a 4xx, never a 5xx, and are refused before anything is published or recorded
(issue 15, findings 8-10)."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from aiohttp import FormData

DEEP = b"[" * 10000 + b"]" * 10000
HUGE = 99999999999999999999


def routes(hw):
    """Every (method, path) of the API that takes a body, path parameters filled with valid shapes."""
    seen = set()
    for route in hw.web.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if route.method not in ("POST", "PUT", "PATCH") or not path:
            continue
        path = re.sub(r"\{version[^}]*\}", "1", path)
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        if (route.method, path) not in seen:
            seen.add((route.method, path))
            yield route.method, path


async def test_deep_json_is_a_4xx_on_every_json_endpoint(make_headwater):
    hw = await make_headwater("null")
    checked = 0
    for method, path in routes(hw):
        for body in (DEEP, b'{"a": ' + DEEP + b"}", json.dumps({"name": "\ud800"}).encode(),
                     json.dumps({"count": HUGE, "name": HUGE, "timeout": HUGE}).encode()):
            resp = await hw.client.request(method, path, data=body, headers={"Content-Type": "application/json"})
            assert resp.status < 500, (method, path, body[:40], resp.status, await resp.text())
        checked += 1
    assert checked >= 10


async def test_integers_beyond_64_bits_are_a_400(make_headwater):
    hw = await make_headwater("null")
    fid = str(uuid.uuid4())
    resp = await hw.client.post(f"/v1/functions/{fid}/versions/{HUGE}/scale_down", json={})
    assert resp.status in (400, 404), await resp.text()
    resp = await hw.client.post("/v1/jobs", json={"function_id": fid, "pattern": "* * * * *", "count": 1e30})
    assert 400 <= resp.status < 500, await resp.text()
    resp = await hw.client.get(f"/v1/executions?limit={HUGE}")
    assert 400 <= resp.status < 500, await resp.text()


@pytest.mark.parametrize("name", ['bad\x01name', "x" * 9000])
async def test_bad_multipart_part_names_are_a_400(make_headwater, name):
    hw = await make_headwater("null")
    boundary = "hwboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nvalue\r\n--{boundary}--\r\n").encode()
    resp = await hw.client.post("/v1/functions", data=body,
                                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert 400 <= resp.status < 500, (resp.status, await resp.text())


@pytest.mark.parametrize("subject", [{"a": 1}, ["x"], 7])
async def test_a_cloudevent_whose_subject_is_not_a_string_is_a_400(make_headwater, subject):
    hw = await make_headwater("null")
    event = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/s", "type": "t", "subject": subject}
    resp = await hw.client.post("/v1/events", json=event)
    assert resp.status == 400 and "subject" in await resp.text()


async def function(hw) -> str:
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    form = FormData()
    form.add_field("runtime_id", runtime["id"])
    form.add_field("code", json.dumps({"source": "package"}))
    from tests.e2e.server import make_zip
    form.add_field("package", make_zip({"main.py": "def main(**kw):\n    return kw\n"}), filename="f.zip")
    resp = await hw.client.post("/v1/functions", data=form)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


@pytest.mark.parametrize("body", [b'{"a": ' + b"[" * 300 + b"]" * 300 + b"}", b'{"n": 99999999999999999999}',
                                  b'{"s": "\\ud800"}', b"[" * 10000 + b"]" * 10000])
async def test_a_bad_webhook_body_is_refused_before_anything_is_published(make_headwater, body):
    hw = await make_headwater("null")
    fid = await function(hw)
    hook = await (await hw.client.post("/v1/webhooks", json={"function_id": fid})).json()
    before = await (await hw.client.get("/v1/executions")).json()
    resp = await hw.client.post(f"/v1/webhooks/{hook['id']}/invoke", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400, (resp.status, await resp.text())
    after = await (await hw.client.get("/v1/executions")).json()
    assert len(after["executions"]) == len(before["executions"]), "an execution was recorded for a refused request"
    events = await (await hw.client.get("/v1/events")).json()
    assert not [e for e in events.get("events", []) if e.get("subject") == hook["id"]], "the event was published"
