"""Events route only within their project, against the harness's Keystone-auth Swift (keystoneauth),
Zaqar and Aodh (keystonemiddleware) and a real Keystone: with projects P1 and P2 subscribed alike, a
Swift upload into AUTH_<P2>, a message on P2's Zaqar queue and an alarm of P2 run only P2's function.
Headwater's Zaqar source, Aodh source and Zaqar sink reach those services through Keystone, each
subscription as its creator (its trust)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sources.aodh import action_url, build_alarm
from tests.conditions import eventually
from tests.e2e.server import make_zip
from tests.integration.keystone.conftest import Identities, keystone_sections, make_identities, require_keystone
from tests.services import REQUIRE

from .conftest import AODH_EVENT_TOPIC, AODH_KS_URL, DIR, KEYSTONE_PORTS, SWIFT_KS_URL, ZAQAR_KS_URL, aodh_listener_consumers, unique

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
FEED_EVENT = Path(__file__).parent / "harness" / "feed_event.py"
AODH_TOKEN = "alarm-secret-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def ids(openstack) -> Identities:
    require_keystone()
    if not all(KEYSTONE_PORTS.values()):
        message = ("the OpenStack harness runs no Keystone-auth servers: start it with HEADWATER_KEYSTONE_URL and "
                   "HEADWATER_KEYSTONE_ADMIN_PASSWORD set (eval \"$(tests/integration/keystone/keystone.sh env)\")")
        if REQUIRE:
            pytest.fail(f"{message}; HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
        pytest.skip(message)
    return make_identities()


class Tenants:
    """One Headwater under Keystone, and alice (member of P1) and bob (member of P2) using it."""

    def __init__(self, hw, ids: Identities):
        self.hw, self.ids = hw, ids
        self.alice = {"X-Auth-Token": ids.alice.token()}
        self.bob = {"X-Auth-Token": ids.bob.token()}
        self.runtime_id: str | None = None

    async def setup(self) -> Tenants:
        admin = {"X-Auth-Token": self.ids.admin_user.token()}
        resp = await self.hw.client.post("/v1/runtimes", json={"image": "python3"}, headers=admin)
        assert resp.status == 201, await resp.text()
        self.runtime_id = (await resp.json())["id"]
        return self

    async def function(self, who: dict) -> str:
        form = aiohttp.FormData()
        form.add_field("runtime_id", self.runtime_id)
        form.add_field("code", json.dumps({"source": "package"}))
        form.add_field("package", make_zip({"main.py": "def main(**kw):\n    return kw\n"}), filename="p.zip")
        resp = await self.hw.client.post("/v1/functions", data=form, headers=who)
        assert resp.status == 201, await resp.text()
        return (await resp.json())["id"]

    async def subscribe(self, who: dict, source: str, **fields) -> dict:
        function_id = await self.function(who)
        resp = await self.hw.client.post("/v1/subscriptions", json={"source": source, "function_id": function_id,
                                                                     **fields}, headers=who)
        assert resp.status == 201, await resp.text()
        return await resp.json()

    async def executions(self, who: dict, subscription: dict) -> list[dict]:
        """The project's execution records as its member sees them through the API."""
        resp = await self.hw.client.get("/v1/executions", headers=who)
        assert resp.status == 200, await resp.text()
        return [e for e in (await resp.json())["executions"] if e.get("subscription_id") == subscription["id"]]

    async def finished(self, who: dict, subscription: dict) -> list[dict]:
        rows = await self.executions(who, subscription)
        return rows if rows and all(r["status"] != "running" for r in rows) else []

    def routed(self, kind: str) -> float:
        return self.hw.app.metrics.events_routed.labels(kind)._value.get()


def headwater_config(ids: Identities, **sections: dict[str, str]) -> dict[str, dict[str, str]]:
    return {**keystone_sections(ids), "zaqar": {"url": ZAQAR_KS_URL, "poll_interval": "0.2"},
            "aodh": {"endpoint": AODH_KS_URL, "token": AODH_TOKEN}, **sections}


async def call(method: str, url: str, token: str, **kw) -> tuple[int, Any]:
    headers = {"X-Auth-Token": token, "Client-ID": str(uuid.uuid4()), **kw.pop("headers", {})}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text


async def test_a_swift_upload_into_p2s_account_runs_only_p2s_function(router, ids):
    queue = unique("headwater-test-swift-ks")
    container = unique("photos")
    try:
        hw = await router(["swift"], **headwater_config(ids, swift={"queue": queue}))
        t = await Tenants(hw, ids).setup()
        same = {"types": ["org.openstack.swift.object.put"], "filters": {"container": container, "objectsuffix": "jpg"}}
        p1 = await t.subscribe(t.alice, "swift", **same)
        p2 = await t.subscribe(t.bob, "swift", **same)
        before = t.routed("swift")

        # Bob writes into his project's account with his token; keystoneauth checks it against Keystone.
        account = f"{SWIFT_KS_URL}/v1/AUTH_{ids.p2}"
        bob = ids.bob.token()
        assert (await call("PUT", f"{account}/{container}", bob))[0] in (201, 202)
        status, _ = await call("PUT", f"{account}/{container}/cat.jpg", bob, data=b"meow")
        assert status == 201, status
        # Without a token Swift (keystoneauth) refuses, and nothing runs for that request.
        assert (await call("PUT", f"{account}/{container}/anon.jpg", "", data=b"x"))[0] == 401

        (run,) = await eventually(lambda: t.finished(t.bob, p2))
        assert run["status"] == "success" and run["project_id"] == ids.p2
        assert json.loads(run["input"])["project_id"] == ids.p2  # the account's project, AUTH_<P2>
        # The event is fully routed once its execution exists (the match is one step); it went to one subscription.
        assert t.routed("swift") - before == 1
        assert await t.executions(t.alice, p1) == [], "P1's subscription received P2's upload"
        # Alice's own token cannot write into P2's account either.
        assert (await call("PUT", f"{account}/{container}/evil.jpg", ids.alice.token(), data=b"x"))[0] == 403
    finally:
        from .test_openstack_sources import delete_amqp_queue

        await delete_amqp_queue(queue)


async def test_a_zaqar_message_on_p2s_queue_runs_only_p2s_function(router, ids):
    queue = unique("hwks")
    hw = await router(["zaqar"], **headwater_config(ids))
    t = await Tenants(hw, ids).setup()
    p1 = await t.subscribe(t.alice, "zaqar", filters={"queue": queue})
    p2 = await t.subscribe(t.bob, "zaqar", filters={"queue": queue})
    source = hw.app.sources["zaqar"]
    # Each project's queue of that name is consumed, as a creator of that project's subscription.
    assert source.consumed == sorted([(ids.p1, queue), (ids.p2, queue)])
    before = t.routed("zaqar")

    bob = ids.bob.token()
    messages = f"{ZAQAR_KS_URL}/v2/queues/{queue}/messages"
    status, posted = await call("POST", messages, bob, json={"messages": [{"ttl": 300, "body": {"order": 2}}]})
    assert status == 201, posted
    message_id = posted["resources"][0].rsplit("/", 1)[-1]

    (run,) = await eventually(lambda: t.finished(t.bob, p2))
    assert run["status"] == "success" and json.loads(run["input"]) == {"order": 2}

    async def deleted():  # deleted only after the event was routed and its executions recorded
        status, stats = await call("GET", f"{ZAQAR_KS_URL}/v2/queues/{queue}/stats", bob)
        return status == 200 and stats["messages"]["total"] == 0
    await eventually(deleted)
    assert t.routed("zaqar") - before == 1
    assert await t.executions(t.alice, p1) == [], "P1's subscription received P2's message"
    # P2's message was never in P1's queue of the same name.
    status, listed = await call("GET", f"{messages}?echo=true", ids.alice.token())
    assert status in (200, 204) and not (listed or {}).get("messages")
    assert run["event_id"] == message_id and run["project_id"] == ids.p2
    # Zaqar refuses the same calls without a token: the source's were Keystone-authenticated.
    assert (await call("GET", f"{ZAQAR_KS_URL}/v2/queues/{queue}/stats", ""))[0] == 401


async def test_an_alarm_of_p2_runs_only_p2s_function_and_a_forged_project_is_refused(router, ids):
    hw = await router(["aodh"], **headwater_config(ids))
    t = await Tenants(hw, ids).setup()
    name = unique("hw-ks-alarm")
    same = {"types": ["org.openstack.aodh.alarm.alarm"], "filters": {"alarmname": name}}
    p1 = await t.subscribe(t.alice, "aodh", **same)
    p2 = await t.subscribe(t.bob, "aodh", **same)
    before = t.routed("aodh")

    event_type = unique("headwater.test")
    bob = ids.bob.token()
    alarm = build_alarm(name=name, url=action_url(hw.config, ids.p2), event_type=event_type, severity="critical")
    status, created = await call("POST", f"{AODH_KS_URL}/v2/alarms", bob, json=alarm)
    assert status == 201, created
    assert created["project_id"] == ids.p2  # Aodh took the project from bob's token
    try:
        # Hostile: P2's alarm posted to the endpoint as P1's (the URL and its token are shared).
        forged = {"alarm_name": name, "alarm_id": created["alarm_id"], "severity": "critical", "previous": "ok",
                  "current": "alarm", "reason": "forged", "reason_data": {}}
        resp = await hw.client.post(f"{hw.config.aodh.path}?project_id={ids.p1}&token={AODH_TOKEN}", json=forged)
        assert resp.status == 403, await resp.text()
        assert "not an alarm of project" in (await resp.json())["error"]

        await eventually(aodh_listener_consumers, timeout=180)
        proc = await asyncio.create_subprocess_exec(
            str(DIR / "venv-aodh/bin/python"), str(FEED_EVENT), ids.p2, event_type,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HEADWATER_AODH_EVENT_TOPIC": AODH_EVENT_TOPIC})
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        (run,) = await eventually(lambda: t.finished(t.bob, p2))
        payload = json.loads(run["input"])
        assert run["status"] == "success" and payload["alarm_id"] == created["alarm_id"]
        assert payload["reason_data"]["event"]["message_id"] == out.decode().strip()
        assert t.routed("aodh") - before == 1
        assert await t.executions(t.alice, p1) == [], "P1's subscription received P2's alarm"
    finally:
        await call("DELETE", f"{AODH_KS_URL}/v2/alarms/{created['alarm_id']}", ids.bob.token())


async def test_the_zaqar_sink_posts_a_result_into_its_subscriptions_project_queue(router, ids):
    hw = await router([], **headwater_config(ids))
    t = await Tenants(hw, ids).setup()
    results = unique("hwksresults")
    sub = await t.subscribe(t.bob, "http", types=["com.example.ks"], sinks=[{"kind": "zaqar", "queue": results}])
    assert "trust_id" not in sub["options"]  # made (the sink posts as bob), never shown
    event = {"specversion": "1.0", "id": unique("ev"), "source": "/test", "type": "com.example.ks", "data": {"n": 1}}
    assert (await hw.client.post("/v1/events", json=event, headers=t.bob)).status == 202

    async def landed(token: str):
        status, listed = await call("GET", f"{ZAQAR_KS_URL}/v2/queues/{results}/messages?echo=true", token)
        return (listed or {}).get("messages") if status == 200 else None
    bob = ids.bob.token()
    (message,) = await eventually(lambda: landed(bob))
    assert message["body"]["data"]["output"] == {"n": 1} and message["body"]["projectid"] == ids.p2
    assert not await landed(ids.alice.token()), "P2's result reached P1's queue"


def test_the_harness_keystone_servers_refuse_requests_without_a_token(ids):
    """Keystone mode is on in each server (a request without a token is a 401), so the tests above
    went through Keystone and not around it."""
    import urllib.error
    import urllib.request

    for url in (f"{ZAQAR_KS_URL}/v2/queues", f"{SWIFT_KS_URL}/v1/AUTH_{ids.p2}", f"{AODH_KS_URL}/v2/alarms"):
        request = urllib.request.Request(url, headers={"Client-ID": str(uuid.uuid4())})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401, url
    assert os.path.isdir(DIR)
