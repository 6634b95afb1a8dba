"""Delegation through Keystone trusts: a cron job alice made keeps running, as alice in P1, after
her token has expired; a function that asks gets a token scoped to its project that Keystone
accepts; no service credential reaches the runtime (environment, context, package URL)."""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os

import aiohttp
import pytest
import requests

from tests.e2e.server import make_zip
from tests.integration.keystone.conftest import KEYSTONE_URL, SHORT_URL, issue_token, issue_token_expiring, keystone_sections

pytestmark = pytest.mark.slow

REPORTER = '''
import os
def main(context=None, **kwargs):
    return {"env": dict(os.environ), "context": context}
'''


async def _wait(predicate, what: str, attempts: int = 600):
    for _ in range(attempts):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


async def test_cron_job_runs_as_its_creator_after_her_token_expired(make_headwater, identities, monkeypatch):
    # A credential in Headwater's own environment must not reach user code either.
    monkeypatch.setenv("OS_PASSWORD", identities.service.password)
    hw = await make_headwater("local", **keystone_sections(identities))
    admin = {"X-Auth-Token": identities.admin_user.token()}
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"}, headers=admin)).json()
    form = aiohttp.FormData()
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("runtime_id", runtime["id"])
    form.add_field("entry", "main.main")
    form.add_field("package", make_zip({"main.py": REPORTER}), filename="p.zip")
    # The slow steps (a package upload) use a token that lives an hour ...
    resp = await hw.client.post("/v1/functions", data=form, headers={"X-Auth-Token": identities.alice.token()})
    assert resp.status == 201, await resp.text()
    function_id = (await resp.json())["id"]
    # ... the job is made with one from the Keystone whose tokens live seconds: taken just before,
    # and its expiry as Keystone stated it on issue (asking later may already be too late).
    alice_token, expires = issue_token_expiring(identities.alice.name, identities.alice.password, identities.p1,
                                                SHORT_URL)
    alice = {"X-Auth-Token": alice_token}
    resp = await hw.client.post("/v1/jobs", json={"function_id": function_id, "pattern": "*/1 * * * * *",
                                                  "keystone_token": True}, headers=alice)
    assert resp.status == 201, await resp.text()
    job = await resp.json()
    assert "trust_id" not in json.dumps(job)
    # Her token is now past its expiry: Keystone refuses it, the job goes on.
    await _wait(lambda: _async(_dt.datetime.now(_dt.timezone.utc) > expires + _dt.timedelta(seconds=1)), "expiry")
    assert (await hw.client.get("/v1/functions", headers=alice)).status == 401

    async def run_after_expiry():
        rows = await hw.store.executions.list(filters={"subscription_id": job["id"], "status": "success"})
        return [r for r in rows if r.created_at > expires]
    runs = await _wait(run_after_expiry, "a run after the token expired")
    run = runs[0]
    assert run.project_id == identities.p1
    assert run.description.endswith(f"for user {identities.alice.id}")
    output = run.result["output"]
    context = output["context"]
    assert context["user_id"] == identities.alice.id and context["project_id"] == identities.p1

    # The function's token: Keystone accepts it (validated as another OpenStack service would:
    # with a service token), as alice in P1 through the trust.
    token = context["keystone_token"]
    service = issue_token(identities.service.name, identities.service.password, identities.service_project, KEYSTONE_URL)
    resp = requests.get(f"{KEYSTONE_URL}/auth/tokens", headers={"X-Auth-Token": service, "X-Subject-Token": token},
                        timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()["token"]
    assert body["user"]["id"] == identities.alice.id and body["project"]["id"] == identities.p1
    assert "OS-TRUST:trust" in body

    # No service credential anywhere the function can look.
    seen = json.dumps(output)
    assert identities.service.password not in seen
    assert identities.service.name not in seen
    assert "OS_PASSWORD" not in output["env"]
    assert set(output["env"]) <= {"PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR"} | {k for k in output["env"] if k.startswith("LC_")} \
        | set(_runtime_own_variables(output["env"]))

    # Deleting the job deletes its trust: nothing acts for alice any more.
    trust_id = (await hw.store.subscriptions.get(job["id"])).options["trust_id"]
    assert (await hw.client.delete(f"/v1/jobs/{job['id']}", headers={"X-Auth-Token": identities.alice.token()})).status == 204
    resp = requests.get(f"{KEYSTONE_URL}/OS-TRUST/trusts/{trust_id}", headers={"X-Auth-Token": identities.alice.token()}, timeout=30)
    assert resp.status_code == 404


def _runtime_own_variables(env: dict) -> list[str]:
    # What the runtime server itself sets for its children (not inherited from Headwater).
    return [k for k in env if k == "HOME" or k.startswith(("PYTHON", "HEADWATER_RUNTIME"))]


async def _async(value):
    return value


async def test_download_url_carries_only_a_function_scoped_token(make_headwater, identities):
    """The package URL a runtime fetches from names one function version and expires; it is no credential of the service."""
    from router import download_tokens

    hw = await make_headwater("null", **keystone_sections(identities))
    token = download_tokens.issue(hw.download_secret, "f", 0, 60)
    assert identities.service.password not in token and identities.service.name not in token
    assert os.environ.get("OS_PASSWORD", "\0") not in token
