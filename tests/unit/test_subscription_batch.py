"""POST /v1/subscriptions/batch: many subscriptions in one transaction, all or none; the first bad
item is named (subscriptions[i]) and nothing of the batch is stored or routed."""

from __future__ import annotations

import uuid

import pytest

from router.api.subscriptions import MAX_BATCH
from router.events import Event
from router.index import SOURCE_KIND_EXTENSION


@pytest.fixture
async def hw(make_headwater):
    return await make_headwater("null")


async def function(hw) -> str:
    runtime = await (await hw.client.post("/v1/runtimes", json={"image": "python3"})).json()
    return (await hw.store.functions.add(runtime_id=runtime["id"], code={"source": "package"}, entry="m.main",
                                         project_id="default")).id


async def batch(hw, items, status):
    resp = await hw.client.post("/v1/subscriptions/batch", json=items if not isinstance(items, list) else {"subscriptions": items})
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_a_batch_is_created_filed_and_routed(hw):
    fid = await function(hw)
    items = [{"source": "http", "function_id": fid, "name": f"s{i}", "filters": {"subject": f"thing-{i}"}} for i in range(25)]
    items.append({"source": "cron", "function_id": fid, "pattern": "0 0 1 1 *"})
    doc = await batch(hw, items, 201)
    created = doc["subscriptions"]
    assert [s["name"] for s in created[:25]] == [f"s{i}" for i in range(25)]
    assert created[25]["source"] == "cron" and created[25]["filters"] == {"subject": created[25]["id"]}
    assert len({s["id"] for s in created}) == 26
    listed = (await (await hw.client.get("/v1/subscriptions")).json())["subscriptions"]
    assert {s["id"] for s in listed} == {s["id"] for s in created}
    event = Event.from_dict({"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/t", "type": "x",
                             "subject": "thing-7", SOURCE_KIND_EXTENSION: "http"})
    assert [s.name for s in hw.index.match(event)] == ["s7"]
    assert [s.id for s in hw.index.of_source("cron")] == [created[25]["id"]]


@pytest.mark.parametrize("bad, status, words", [
    ({"function_id": "FID"}, 400, "subscriptions[1]: Required param is missing"),
    ({"source": "http", "function_id": "FID", "types": "x", "filter": "nope (("}, 400, "subscriptions[1]:"),
    ({"source": "http", "function_id": str(uuid.uuid4())}, 404, "subscriptions[1]: Function not found"),
    ({"source": "nosuch", "function_id": "FID"}, 400, "subscriptions[1]: Unknown source 'nosuch'"),
    ({"source": "cron", "function_id": "FID", "pattern": "not cron"}, 400, "subscriptions[1]: The specified pattern is not valid"),
    ({"source": "http", "function_id": "FID", "name": "n" * 300}, 400, "subscriptions[1]: Invalid input, name"),
    ("not an object", 400, "subscriptions[1]: A subscription must be a JSON object."),
])
async def test_one_bad_item_is_named_and_nothing_is_created(hw, bad, status, words):
    fid = await function(hw)
    if isinstance(bad, dict):
        bad = {k: (fid if v == "FID" else v) for k, v in bad.items()}
    doc = await batch(hw, [{"source": "http", "function_id": fid}, bad, {"source": "http", "function_id": fid}], status)
    assert doc["faultstring"].startswith(words), doc
    assert await hw.store.subscriptions.list() == []
    assert len(hw.index) == 0


@pytest.mark.parametrize("body, words", [
    ({}, "subscriptions must be a non-empty list"),
    ({"subscriptions": []}, "subscriptions must be a non-empty list"),
    ({"subscriptions": {"source": "http"}}, "subscriptions must be a non-empty list"),
    ({"subscriptions": [{}] * (MAX_BATCH + 1)}, f"at most {MAX_BATCH} per request"),
])
async def test_a_batch_that_is_not_a_list_or_too_long_is_a_400(hw, body, words):
    doc = await batch(hw, body, 400)
    assert words in doc["faultstring"]


async def test_a_batch_cannot_set_secrets_ids_or_status(hw):
    fid = await function(hw)
    doc = await batch(hw, [{"source": "http", "function_id": fid, "id": "chosen", "status": "paused",
                            "options": {"secret": "s3cret", "trust_id": "t", "user_id": "u"}}], 201)
    (created,) = doc["subscriptions"]
    assert created["id"] != "chosen" and created["status"] == "running"
    row = await hw.store.subscriptions.get(created["id"])
    assert not {"secret", "trust_id", "user_id"} & set(row.options)
