"""The router in one process (null engine): webhooks, subscriptions, CloudEvents ingress,
idempotent redelivery, dead letters, and the subscription API's validation."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import FormData

from router.events import Event, execution_id_for
from tests.conditions import counter_total, eventually
from tests.e2e.server import make_zip


@pytest.fixture
async def hw(make_headwater):
    return await make_headwater("null", cron={"max_sleep": "0.05"})


async def make_function(hw) -> str:
    resp = await hw.client.post("/v1/runtimes", json={"image": "python3"})
    runtime_id = (await resp.json())["id"]
    form = FormData()
    form.add_field("runtime_id", runtime_id)
    form.add_field("code", json.dumps({"source": "package"}))
    form.add_field("package", make_zip({"main.py": "def main(**kw):\n    return kw\n"}), filename="p.zip")
    resp = await hw.client.post("/v1/functions", data=form)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def wait_status(hw, execution_id: str, timeout: float = 5.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        resp = await hw.client.get(f"/v1/executions/{execution_id}")
        if resp.status == 200:
            body = await resp.json()
            if body["status"] != "running":
                return body
        await asyncio.sleep(0.01)
    raise TimeoutError(execution_id)


async def test_webhook_invocation_merges_query_and_body(hw):
    function_id = await make_function(hw)
    hook = await (await hw.client.post("/v1/webhooks", json={"function_id": function_id})).json()
    assert hook["function_version"] == 0, "a webhook without function_version must default to 0 (Qinling stored null)"
    resp = await hw.client.post(f"/v1/webhooks/{hook['id']}/invoke?color=blue", json={"size": 3})
    assert resp.status == 202
    body = await resp.json()
    execution = await wait_status(hw, body["execution_id"])
    assert execution["status"] == "success"
    # the null engine echoes its input as the output
    assert json.loads(execution["result"])["output"] == {"color": "blue", "size": 3}
    assert json.loads(execution["input"]) == {"color": "blue", "size": 3}
    assert execution["event_id"] == body["event_id"]


@pytest.mark.parametrize("body, headers, expected", [
    ("[1, 2, 3]", {"Content-Type": "application/json"}, [1, 2, 3]),
    ("a=1&b=two", {"Content-Type": "application/x-www-form-urlencoded"}, {"a": "1", "b": "two"}),
    ("", {}, {}),
])
async def test_webhook_input_shapes(hw, body, headers, expected):
    function_id = await make_function(hw)
    hook = await (await hw.client.post("/v1/webhooks", json={"function_id": function_id})).json()
    resp = await hw.client.post(f"/v1/webhooks/{hook['id']}/invoke", data=body, headers=headers)
    assert resp.status == 202, await resp.text()
    execution = await wait_status(hw, (await resp.json())["execution_id"])
    assert json.loads(execution["result"])["output"] == expected


async def test_malformed_webhook_body_is_a_400_and_nothing_runs(hw):
    function_id = await make_function(hw)
    hook = await (await hw.client.post("/v1/webhooks", json={"function_id": function_id})).json()
    resp = await hw.client.post(f"/v1/webhooks/{hook['id']}/invoke", data="{broken", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "Malformed JSON" in (await resp.json())["faultstring"]
    assert await hw.store.executions.list() == []


async def test_idempotency_key_runs_a_retried_post_once(hw):
    function_id = await make_function(hw)
    hook = await (await hw.client.post("/v1/webhooks", json={"function_id": function_id})).json()
    ids = set()
    for _ in range(3):
        resp = await hw.client.post(f"/v1/webhooks/{hook['id']}/invoke", json={"x": 1}, headers={"Idempotency-Key": "k-1"})
        ids.add((await resp.json())["execution_id"])
    assert len(ids) == 1
    await wait_status(hw, ids.pop())
    await asyncio.sleep(0.05)  # quiet period: a second run would show up now
    executions = await hw.store.executions.list()
    assert len(executions) == 1 and executions[0].attempts == 1


async def test_redelivered_event_does_not_run_twice(hw):
    function_id = await make_function(hw)
    sub = await (await hw.client.post("/v1/subscriptions", json={"source": "http", "types": ["com.example.thing"],
                                                                  "function_id": function_id})).json()
    event = {"specversion": "1.0", "id": "evt-1", "source": "/example", "type": "com.example.thing", "data": {"n": 1}}
    for _ in range(3):  # the same event id three times: at-least-once delivery upstream
        assert (await hw.client.post("/v1/events", json=event)).status == 202
    execution_id = execution_id_for("/example", "evt-1", sub["id"])
    execution = await wait_status(hw, execution_id)
    await eventually(lambda: hw.metrics.duplicates._value.get() >= 2)  # the two redeliveries were seen
    assert execution["status"] == "success" and execution["description"] == f"Created by Subscription {sub['id']}"
    rows = await hw.store.executions.list()
    assert [r.id for r in rows] == [execution_id] and rows[0].attempts == 1
    assert hw.metrics.duplicates._value.get() == 2


async def test_same_id_from_two_sources_is_two_events(hw):
    # Regression: duplicates were recognised by event id alone, so /shop/us's 1001 was taken for a
    # redelivery of /shop/eu's 1001 and never ran. CloudEvents identity is source + id.
    function_id = await make_function(hw)
    sub = await (await hw.client.post("/v1/subscriptions", json={"source": "http", "types": ["com.example.order"],
                                                                  "function_id": function_id})).json()
    for source in ("/shop/eu", "/shop/us"):
        event = {"specversion": "1.0", "id": "1001", "source": source, "type": "com.example.order", "data": {"from": source}}
        assert (await hw.client.post("/v1/events", json=event)).status == 202
    for source in ("/shop/eu", "/shop/us"):
        execution = await wait_status(hw, execution_id_for(source, "1001", sub["id"]))
        assert json.loads(execution["result"])["output"]["from"] == source
    assert hw.metrics.duplicates._value.get() == 0


async def test_binary_mode_cloudevent_and_filters(hw):
    function_id = await make_function(hw)
    await hw.client.post("/v1/subscriptions", json={"source": "http", "filters": {"container": "photos"}, "function_id": function_id})
    headers = {"ce-specversion": "1.0", "ce-id": "b-1", "ce-source": "/swift", "ce-type": "object.put",
               "ce-container": "photos", "Content-Type": "application/json"}
    assert (await hw.client.post("/v1/events", data='{"object": "cat.jpg"}', headers=headers)).status == 202
    headers.update({"ce-id": "b-2", "ce-container": "docs"})
    assert (await hw.client.post("/v1/events", data='{"object": "a.txt"}', headers=headers)).status == 202
    await eventually(lambda: counter_total(hw.metrics.events_unmatched) >= 1)  # b-2 was routed: to nothing
    await eventually(hw.store.executions.list)
    rows = await hw.store.executions.list()
    assert [r.event_id for r in rows] == ["b-1"] and rows[0].input == {"object": "cat.jpg"}


@pytest.mark.parametrize("event, fault", [
    ({"id": "1", "source": "/s", "type": "t"}, "specversion"),
    ({"specversion": "1.0", "source": "/s", "type": "t"}, "'id'"),
    ("not json", "not JSON"),
])
async def test_invalid_cloudevents_are_refused(hw, event, fault):
    data = event if isinstance(event, str) else json.dumps(event)
    resp = await hw.client.post("/v1/events", data=data, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and fault in (await resp.json())["faultstring"]


async def test_event_for_a_deleted_function_is_dead_lettered(hw):
    function_id = await make_function(hw)
    sub = await (await hw.client.post("/v1/subscriptions", json={"source": "http", "function_id": function_id})).json()
    # Break the target behind the router's back: the subscription points at a function that is gone.
    await hw.store.subscriptions.update(sub["id"], {"function_id": None, "function_alias": "missing-alias"})
    await hw.reload_subscription(sub["id"])
    assert (await hw.client.post("/v1/events", json={"specversion": "1.0", "id": "x", "source": "/s", "type": "t"})).status == 202
    for _ in range(100):
        letters = await hw.store.dead_letters.list()
        if letters:
            break
        await asyncio.sleep(0.02)
    assert len(letters) == 1 and "FunctionAlias not found" in letters[0].reason and letters[0].event_id == "x"
    assert await hw.store.executions.list() == []


@pytest.mark.parametrize("body, status, fault", [
    ({}, 400, "Required param is missing. Required: {'source'}"),
    ({"source": "carrier-pigeon", "function_id": "F"}, 400, "Unknown source 'carrier-pigeon'"),
    ({"source": "http", "function_id": "F", "filters": ["x"]}, 400, "filters must be an object"),
    ({"source": "http", "function_id": "F", "filters": {"x": {"around": 1}}}, 400, "unknown operator 'around'"),
    ({"source": "http", "function_id": "F", "filter": "subject LIKE"}, 400, "filter: expected value, found the end"),
    ({"source": "http", "function_id": "F", "filters": {"Bad-Name": "x"}}, 400, "is not an attribute name"),
    ({"source": "http", "function_id": "F", "filters": {"x": {"nested": 1, "two": 2}}}, 400, "filters.x.nested: unknown operator 'nested'"),
    ({"source": "http", "function_id": "F", "types": [1]}, 400, "types must be a list"),
    ({"source": "http", "function_id": "F", "pattern": "* * * * *"}, 400, "pattern is a cron option"),
    ({"source": "cron", "function_id": "F", "pattern": "61 * * * *"}, 400, "The specified pattern is not valid"),
    ({"source": "http"}, 400, "Either function_alias or function_id must be provided"),
    ({"source": "http", "function_id": "00000000-0000-0000-0000-000000000000"}, 404, "Function not found"),
    ({"source": "http", "function_id": "F", "function_version": 3}, 404, "FunctionVersion not found"),
    ({"source": "http", "function_alias": "nope"}, 404, "FunctionAlias not found"),
])
async def test_subscription_validation(hw, body, status, fault):
    function_id = await make_function(hw)
    body = {k: (function_id if v == "F" else v) for k, v in body.items()}
    resp = await hw.client.post("/v1/subscriptions", json=body)
    assert resp.status == status, await resp.text()
    assert fault in (await resp.json())["faultstring"]


async def test_subscription_crud_updates_the_index(hw):
    function_id = await make_function(hw)
    resp = await hw.client.post("/v1/subscriptions", json={"source": "http", "types": ["a"], "function_id": function_id, "name": "s"})
    sub = await resp.json()
    assert resp.status == 201 and hw.index.get(sub["id"]) is not None
    listed = (await (await hw.client.get("/v1/subscriptions?source=http")).json())["subscriptions"]
    assert [s["id"] for s in listed] == [sub["id"]]
    assert (await hw.client.get(f"/v1/subscriptions/{sub['id']}")).status == 200
    assert (await hw.client.delete(f"/v1/subscriptions/{sub['id']}")).status == 204
    assert hw.index.get(sub["id"]) is None
    assert (await hw.client.get(f"/v1/subscriptions/{sub['id']}")).status == 404


async def test_cron_subscription_fires_through_the_router(hw):
    function_id = await make_function(hw)
    resp = await hw.client.post("/v1/subscriptions", json={"source": "cron", "pattern": "* * * * * *", "count": 2,
                                                           "input": '{"from": "cron"}', "function_id": function_id})
    sub = await resp.json()
    assert resp.status == 201, sub
    for _ in range(400):
        rows = [r for r in await hw.store.executions.list() if r.status == "success"]
        if len(rows) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(rows) == 2 and all(r.input == {"from": "cron"} for r in rows)
    # The source marks the schedule done after publishing its last tick: the tick's execution may
    # be recorded first (routing does not wait for the source), so wait for it.

    async def done() -> bool:
        return (await hw.store.subscriptions.get(sub["id"])).status == "done"

    await eventually(done)


async def test_function_in_use_cannot_be_deleted(hw):
    function_id = await make_function(hw)
    hook = await (await hw.client.post("/v1/webhooks", json={"function_id": function_id})).json()
    resp = await hw.client.delete(f"/v1/functions/{function_id}")
    assert resp.status == 403 and "webhook" in (await resp.json())["faultstring"]
    assert (await hw.client.delete(f"/v1/webhooks/{hook['id']}")).status == 204
    assert (await hw.client.delete(f"/v1/functions/{function_id}")).status == 204


async def test_unknown_list_filter_is_refused(hw):
    resp = await hw.client.get("/v1/executions?colour=red")
    assert resp.status == 400 and "Unknown argument" in (await resp.json())["faultstring"]


async def test_published_event_reaches_dispatcher_directly(hw):
    """The bus → index → dispatcher path without the API: what sources use."""
    function_id = await make_function(hw)
    sub = await (await hw.client.post("/v1/subscriptions", json={"source": "http", "types": ["direct"], "function_id": function_id})).json()
    event = Event(id="d-1", source="/t", type="direct", data=[1], extensions={"sourcekind": "http"})
    await hw.bus.publish(event)
    execution = await wait_status(hw, execution_id_for("/t", "d-1", sub["id"]))
    assert json.loads(execution["result"])["output"] == [1]


async def test_dry_run_lists_matches_and_inputs_without_running_anything(hw):
    function_id = await make_function(hw)
    photos = await (await hw.client.post("/v1/subscriptions", json={
        "source": "swift", "filters": {"container": "photos", "subject": {"glob": "photos/*.jpg"}}, "function_id": function_id,
        "input_mapping": {"container": "$.container", "object": "$.data.object", "size": "thumb"}})).json()
    await hw.client.post("/v1/subscriptions", json={"source": "swift", "filter": "container = 'docs'", "function_id": function_id})
    event = {"specversion": "1.0", "id": "t-1", "source": "/swift", "type": "org.openstack.swift.object.put",
             "subject": "photos/cat.jpg", "container": "photos", "data": {"object": "cat.jpg"}}
    resp = await hw.client.post("/v1/subscriptions/test?source_kind=swift", json=event)
    body = await resp.json()
    assert resp.status == 200, body
    assert [m["subscription_id"] for m in body["matches"]] == [photos["id"]]
    assert body["matches"][0]["input"] == {"container": "photos", "object": "cat.jpg", "size": "thumb"}
    assert await hw.store.executions.list() == []
    bad = await hw.client.post("/v1/subscriptions/test", json={"id": "x"})
    assert bad.status == 400 and "Invalid CloudEvent" in (await bad.json())["faultstring"]


async def test_input_mapping_validation_and_exclusion(hw):
    function_id = await make_function(hw)
    resp = await hw.client.post("/v1/subscriptions", json={"source": "http", "function_id": function_id, "input_mapping": "all"})
    assert resp.status == 400 and "is not a mode" in (await resp.json())["faultstring"]
    resp = await hw.client.post("/v1/subscriptions", json={"source": "http", "function_id": function_id, "input": "x",
                                                           "input_mapping": "event"})
    assert resp.status == 400 and "exclude each other" in (await resp.json())["faultstring"]


async def test_a_subscription_made_by_another_replica_moments_ago_is_not_missed(make_headwater, tmp_path):
    """Two routers on one database: an event matching a subscription the other replica created a
    moment ago is routed, not acked unmatched (the periodic reload would come seconds later)."""
    db = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    first = await make_headwater("null", database={"connection": db})
    second = await make_headwater("null", database={"connection": db})
    function_id = await make_function(first)
    sub = await (await first.client.post("/v1/subscriptions", json={"source": "http", "types": ["late"], "function_id": function_id})).json()
    assert second.index.get(sub["id"]) is None, "the second replica has not reloaded yet"
    resp = await second.client.post("/v1/events", json={"specversion": "1.0", "id": "late-1", "source": "/s", "type": "late"})
    assert resp.status == 202
    execution = await wait_status(second, execution_id_for("/s", "late-1", sub["id"]))
    assert execution["status"] == "success"


async def test_package_download_tokens(hw):
    from router import download_tokens

    function_id = await make_function(hw)
    good = download_tokens.issue(hw.download_secret, function_id, 0, ttl=60)
    assert (await hw.client.get(f"/v1/functions/{function_id}?download=true&token={good}")).status == 200
    other = download_tokens.issue(hw.download_secret, "another-function", 0, ttl=60)
    resp = await hw.client.get(f"/v1/functions/{function_id}?download=true&token={other}")
    assert resp.status == 401 and "download token" in (await resp.json())["faultstring"]
    expired = download_tokens.issue(hw.download_secret, function_id, 0, ttl=60, now=0)
    assert (await hw.client.get(f"/v1/functions/{function_id}?download=true&token={expired}")).status == 401
