"""Signed webhooks: with a secret, only requests carrying X-Hub-Signature-256 = sha256=HMAC(body) run."""

from __future__ import annotations

import hashlib
import hmac
import json

import aiohttp

from tests.e2e.server import make_zip

SECRET = "a-webhook-secret-of-some-length"


async def _webhook(hw, **body) -> dict:
    resp = await hw.client.post("/v1/runtimes", json={"image": "python3"})
    runtime_id = (await resp.json())["id"]
    form = aiohttp.FormData()
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("runtime_id", runtime_id)
    form.add_field("package", make_zip({"main.py": "def main(**kw):\n    return kw\n"}), filename="p.zip")
    function_id = (await (await hw.client.post("/v1/functions", data=form)).json())["id"]
    resp = await hw.client.post("/v1/webhooks", json={"function_id": function_id, **body})
    assert resp.status == 201, await resp.text()
    return await resp.json()


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def _executions(hw, webhook_id: str) -> list:
    return await hw.store.executions.list(filters={"subscription_id": webhook_id})


async def test_only_correctly_signed_requests_run(make_headwater):
    hw = await make_headwater("null")
    webhook = await _webhook(hw, secret=SECRET)
    assert webhook["signed"] is True and "secret" not in webhook
    url = f"/v1/webhooks/{webhook['id']}/invoke"
    body = b'{"name": "headwater"}'
    headers = {"Content-Type": "application/json"}
    for bad in (None, "", "sha256=", sign(body, "another-secret-entirely"), sign(b"other body"), "sha1=" + "0" * 40,
                sign(body).replace("sha256=", "")):
        h = dict(headers) if bad is None else {**headers, "X-Hub-Signature-256": bad}
        resp = await hw.client.post(url, data=body, headers=h)
        assert resp.status == 401, (bad, await resp.text())
    assert await _executions(hw, webhook["id"]) == [], "a refused request runs nothing"
    resp = await hw.client.post(url, data=body, headers={**headers, "X-Hub-Signature-256": sign(body)})
    assert resp.status == 202, await resp.text()
    runs = await _executions(hw, webhook["id"])
    assert [r.id for r in runs] == [(await resp.json())["execution_id"]]


async def test_the_secret_is_never_answered(make_headwater):
    hw = await make_headwater("null")
    webhook = await _webhook(hw, secret=SECRET)
    for path in ("/v1/webhooks", f"/v1/webhooks/{webhook['id']}", "/v1/subscriptions", f"/v1/subscriptions/{webhook['id']}"):
        text = await (await hw.client.get(path)).text()
        assert SECRET not in text, path
    resp = await hw.client.put(f"/v1/webhooks/{webhook['id']}", json={"description": "d"})
    assert SECRET not in await resp.text() and (await resp.json())["signed"] is True


async def test_secret_can_be_removed_and_unsigned_webhooks_stay_open(make_headwater):
    hw = await make_headwater("null")
    webhook = await _webhook(hw, secret=SECRET)
    url = f"/v1/webhooks/{webhook['id']}/invoke"
    assert (await hw.client.post(url, json={})).status == 401
    resp = await hw.client.put(f"/v1/webhooks/{webhook['id']}", json={"secret": None})
    assert (await resp.json())["signed"] is False
    assert (await hw.client.post(url, json={})).status == 202


async def test_a_weak_or_malformed_secret_is_refused(make_headwater):
    hw = await make_headwater("null")
    for secret in ("short", 12345, "x" * 256, "tab\tinside-secret-value"):
        resp = await hw.client.post("/v1/webhooks", json={"function_id": "00000000-0000-0000-0000-000000000000", "secret": secret})
        assert resp.status == 400, secret


async def test_a_misspelt_or_non_ascii_secret_is_a_400_and_no_webhook_is_made(make_headwater):
    hw = await make_headwater("null")
    await _webhook(hw)  # makes the function
    function_id = (await hw.store.functions.list())[0].id
    before = len(await hw.store.subscriptions.list())
    for body, needle in (({"secrett": SECRET}, "Unknown argument: 'secrett'"),
                         ({"secret": "é" * 20}, "printable ASCII")):
        resp = await hw.client.post("/v1/webhooks", json={"function_id": function_id, **body})
        assert resp.status == 400 and needle in (await resp.json())["faultstring"], await resp.text()
    assert len(await hw.store.subscriptions.list()) == before
