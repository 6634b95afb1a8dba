"""The Aodh source without Aodh: captured alarm-action POSTs in, one event per transition out."""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.config import Config
from router.plugins import SubscriptionInvalid
from sources.aodh import AodhSource, MalformedAlarm, action_url, alarm_event, build_alarm, parse_query
from tests.unit.test_source_swift import FakeContext

FIXTURES = Path(__file__).parent / "fixtures"


def captured(name: str) -> dict:
    """(headers, body) of the one POST aodh-notifier made in a capture."""
    post = json.loads((FIXTURES / name).read_text().splitlines()[0])
    return post


@contextlib.asynccontextmanager
async def endpoint(config: Config):
    """The aodh source's endpoint on a test client; `client.ctx` records what it publishes."""
    ctx = FakeContext(config)
    source = AodhSource(config)
    await source.start(ctx)
    client = TestClient(TestServer(ctx.app()))
    await client.start_server()
    client.ctx = ctx
    try:
        yield client
    finally:
        await client.close()
        await source.stop()


@pytest.fixture
async def aodh(tmp_path):
    async with endpoint(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "aodh": {"token": "t0k"}})) as client:
        yield client


async def test_full_chain_capture_becomes_an_alarm_event(aodh):
    post = captured("sample-aodh-post-full-chain.jsonl")
    resp = await aodh.post("/v1/aodh/alarms?project_id=demo&token=t0k", data=post["body"],
                           headers={"content-type": "application/json", "x-openstack-request-id": post["headers"]["x-openstack-request-id"]})
    assert resp.status == 202, await resp.text()
    (event, settle), = aodh.ctx.published
    body = json.loads(post["body"])
    assert event.type == "org.openstack.aodh.alarm.alarm" and event.subject == "swift-chain"
    assert event.source == f"/aodh/alarms/{body['alarm_id']}" and event.data == body
    assert event.extensions == {"projectid": "demo", "alarmname": "swift-chain", "alarmid": body["alarm_id"], "severity": "moderate",
                                "alarmstate": "alarm", "previousstate": "insufficient_data", "partitionkey": body["alarm_id"]}
    # event alarms carry the triggering ceilometer event: its time is the event's time
    assert event.time == _dt.datetime(2026, 11, 24, 3, 8, 16, 14951, tzinfo=_dt.timezone.utc)
    assert (await resp.json())["event_id"] == event.id


async def test_same_triggering_event_is_the_same_headwater_event():
    body = json.loads(captured("sample-aodh-rest-notifier-post.jsonl")["body"])
    first = alarm_event(body, project_id="p", request_id="req-1")
    again = alarm_event(copy.deepcopy(body), project_id="p", request_id="req-2")  # urllib3 retry, or a second notifier
    assert first.id == again.id
    threshold = {**body, "reason_data": {"type": "threshold", "count": 1, "most_recent": 9.0}}
    assert alarm_event(threshold, project_id="p", request_id="req-1").id == alarm_event(threshold, project_id="p", request_id="req-1").id
    assert alarm_event(threshold, project_id="p", request_id="req-1").id != alarm_event(threshold, project_id="p", request_id="req-2").id
    assert alarm_event(threshold, project_id="p").id != alarm_event(threshold, project_id="p").id


def test_state_is_in_the_type():
    body = json.loads(captured("sample-aodh-rest-notifier-post.jsonl")["body"])
    for state, type_ in (("ok", "ok"), ("insufficient data", "insufficient_data"), ("alarm", "alarm")):
        assert alarm_event({**body, "current": state}, project_id="p").type == f"org.openstack.aodh.alarm.{type_}"


@pytest.mark.parametrize("mutate, fault", [
    (lambda b: b.pop("reason_data"), "missing keys: reason_data"),
    (lambda b: b.update(current="firing"), "current is 'firing'"),
    (lambda b: b.update(severity="huge"), "severity is 'huge'"),
    (lambda b: b.update(alarm_id=""), "alarm_id must be a non-empty string"),
    (lambda b: b.update(reason_data=[1]), "reason_data must be an object"),
])
def test_malformed_bodies(mutate, fault):
    body = json.loads(captured("sample-aodh-rest-notifier-post.jsonl")["body"])
    mutate(body)
    with pytest.raises(MalformedAlarm, match=fault):
        alarm_event(body, project_id="p")


async def test_malformed_post_is_dead_lettered_and_answered_400(aodh):
    for data in ("{not json", json.dumps({"alarm_name": "x"})):
        resp = await aodh.post("/v1/aodh/alarms?token=t0k", data=data, headers={"content-type": "application/json"})
        assert resp.status == 400
    assert [d["source"] for d in aodh.ctx.dead] == ["aodh", "aodh"]
    assert "not a JSON object" in aodh.ctx.dead[0]["reason"] and "missing keys" in aodh.ctx.dead[1]["reason"]
    resp = await aodh.post("/v1/aodh/alarms?token=t0k&project_id=P2", data="{not json")
    assert aodh.ctx.dead[-1]["project_id"] == "P2", "a dead letter belongs to the alarm's project"
    # and the endpoint keeps working
    resp = await aodh.post("/v1/aodh/alarms?token=t0k", data=captured("sample-aodh-rest-notifier-post.jsonl")["body"])
    assert resp.status == 202 and len(aodh.ctx.published) == 1
    assert aodh.ctx.published[0][0].project_id == "default"  # no project_id in the URL: [aodh] project_id


async def test_wrong_token_is_refused(aodh):
    body = captured("sample-aodh-rest-notifier-post.jsonl")["body"]
    assert (await aodh.post("/v1/aodh/alarms", data=body)).status == 401
    assert (await aodh.post("/v1/aodh/alarms?token=nope", data=body)).status == 401
    assert aodh.ctx.published == []


async def test_without_a_configured_token_the_endpoint_still_wants_one(tmp_path):
    # Regression: with [aodh] token unset (the default) anyone could POST a forged alarm and run
    # functions. Now a token is generated once per data_dir, and `register` puts it in the action URL.
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "api": {"public_url": "http://hw.example:7070"}})
    async with endpoint(config) as client:
        ctx = client.ctx
        body = captured("sample-aodh-rest-notifier-post.jsonl")["body"]
        assert (await client.post("/v1/aodh/alarms", data=body)).status == 401
        assert (await client.post("/v1/aodh/alarms?token=", data=body)).status == 401
        assert ctx.published == []
        url = action_url(config)
        token = parse_qs(urlsplit(url).query)["token"][0]
        assert len(token) == 64 and token == (tmp_path / "aodh-token.key").read_text()
        assert (tmp_path / "aodh-token.key").stat().st_mode & 0o077 == 0
        resp = await client.post(f"/v1/aodh/alarms?token={token}", data=body, headers={"content-type": "application/json"})
        assert resp.status == 202 and len(ctx.published) == 1
        # A second process on the same data_dir (`python -m sources.aodh register`) agrees on it.
        assert action_url(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}})).endswith(f"token={token}")


def test_register_builds_an_event_alarm_aimed_at_headwater(tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "api": {"public_url": "http://hw.example:7070"},
                                    "aodh": {"token": "t0k"}})
    url = action_url(config, "demo")
    assert url == "http://hw.example:7070/v1/aodh/alarms?project_id=demo&token=t0k"
    alarm = build_alarm(name="n", url=url, event_type="objectstore.http.request", query=["traits.action=string::update", "traits.x=y"])
    assert alarm["type"] == "event" and alarm["alarm_actions"] == [url] and alarm["repeat_actions"] is True
    assert alarm["event_rule"]["query"] == [
        {"field": "traits.action", "op": "eq", "type": "string", "value": "update"},
        {"field": "traits.x", "op": "eq", "type": "string", "value": "y"}]
    with pytest.raises(ValueError):
        parse_query(["novalue"])


@pytest.mark.parametrize("filters, fault", [({"alarm": "x"}, "no attribute 'alarm'"), ({"alarmstate": "insufficient data"}, "alarmstate is one of")])
def test_subscription_validation(tmp_path, filters, fault):
    source = AodhSource(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))
    with pytest.raises(SubscriptionInvalid, match=fault):
        source.validate_subscription({"filters": filters}, None)
    assert source.validate_subscription({"filters": {"alarmname": "cpu", "severity": "critical", "alarmstate": "alarm"}}, None) == {}


class FakeAodhApi:
    """GET /v2/alarms/{id} as Aodh under keystonemiddleware answers it: a project's token sees only
    that project's alarms (404 for another's), an unknown token is a 401."""

    def __init__(self, alarms: dict[str, str], tokens: dict[str, str]):
        from aiohttp import web

        self.alarms, self.tokens, self.asked = alarms, tokens, []
        app = web.Application()
        app.router.add_get("/v2/alarms/{id}", self.get)
        self.server = TestServer(app)

    async def get(self, request):
        from aiohttp import web

        token = request.headers.get("X-Auth-Token")
        self.asked.append(token)
        if token not in self.tokens:
            return web.json_response({"error_message": "The request you have made requires authentication."}, status=401)
        alarm_id = request.match_info["id"]
        if self.alarms.get(alarm_id) != self.tokens[token]:
            return web.json_response({"error_message": f"Alarm {alarm_id} not found"}, status=404)
        return web.json_response({"alarm_id": alarm_id, "project_id": self.alarms[alarm_id]})


def _alarm_post(alarm_id: str) -> dict:
    return {"alarm_name": "a", "alarm_id": alarm_id, "severity": "low", "previous": "ok", "current": "alarm",
            "reason": "", "reason_data": {}}


async def test_under_keystone_an_alarm_reaches_only_the_project_aodh_says_it_is_of(tmp_path):
    """The action URL's project_id is a claim anyone with the shared URL token can write: Aodh,
    asked with a token of that project's subscription (its trust), must confirm it."""
    from router.plugins import Subscription
    from tests.unit.test_source_swift import FakeCredentials

    api = FakeAodhApi(alarms={"alarm-p1": "p1", "alarm-p2": "p2"}, tokens={"tok-p1": "p1", "tok-p2": "p2"})
    await api.server.start_server()
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "auth": {"strategy": "keystone"},
                                    "keystone_authtoken": {"auth_url": "http://127.0.0.1:9/v3", "password": "unused"},
                                    "aodh": {"token": "t0k", "endpoint": str(api.server.make_url("")).rstrip("/")}})
    credentials = FakeCredentials({"s-p1": "stale-p1", "s-p2": "tok-p2"}, renewed={"s-p1": "tok-p1"})
    ctx = FakeContext(config, credentials=credentials, kind="aodh")
    source = AodhSource(config)
    await source.start(ctx)
    client = TestClient(TestServer(ctx.app()))
    await client.start_server()
    try:
        for sub_id, project in (("s-p1", "p1"), ("s-p2", "p2")):
            ctx.put(Subscription(id=sub_id, project_id=project, source="aodh", options={"trust_id": f"t-{project}"}))
        ctx.put(Subscription(id="s-p3", project_id="p3", source="aodh"))  # no trust: cannot ask Aodh

        # P2's alarm, claimed for P1: Aodh does not know it as P1's.
        resp = await client.post("/v1/aodh/alarms?project_id=p1&token=t0k", json=_alarm_post("alarm-p2"))
        assert resp.status == 403 and "not an alarm of project p1" in (await resp.json())["error"]
        assert "s-p1" in credentials.fresh  # p1's kept token was refused (401) and asked anew once
        # A project with no subscription that can ask: refused, naming why.
        resp = await client.post("/v1/aodh/alarms?project_id=p3&token=t0k", json=_alarm_post("alarm-p2"))
        assert resp.status == 403 and "no aodh subscription of project p3" in (await resp.json())["error"]
        assert ctx.published == []

        resp = await client.post("/v1/aodh/alarms?project_id=p2&token=t0k", json=_alarm_post("alarm-p2"))
        assert resp.status == 202, await resp.text()
        ((event, _),) = ctx.published
        assert event.extensions["projectid"] == "p2"
        asked = len(api.asked)
        resp = await client.post("/v1/aodh/alarms?project_id=p2&token=t0k", json=_alarm_post("alarm-p2"))
        assert resp.status == 202 and len(api.asked) == asked  # confirmed once: an alarm never changes project

        await api.server.close()  # Aodh gone: an unconfirmed alarm is a 503, not a guess
        resp = await client.post("/v1/aodh/alarms?project_id=p1&token=t0k", json=_alarm_post("alarm-p1"))
        assert resp.status == 503 and "could not be asked" in (await resp.json())["error"]
    finally:
        await client.close()
        await source.stop()
        await api.server.close()
