"""Swift uploads, Zaqar messages and Aodh alarms run functions through a real in-process Headwater,
against real Zaqar, Swift + ceilometermiddleware and Aodh started by harness/openstack.sh."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aio_pika
import pytest

from router.events import derived_id
from sources.aodh import action_url, aodh_client, build_alarm

from .conftest import AODH_URL, DIR, PROJECT, SWIFT_URL, ZAQAR_URL, eventually, unique, zaqar

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
FEED_EVENT = Path(__file__).parent / "harness" / "feed_event.py"


async def swift_upload(tmp_path, container: str, name: str, text: str) -> None:
    """`swift upload` with the real python-swiftclient CLI; X-Project-Id stands in for keystonemiddleware."""
    (tmp_path / name).write_text(text)
    proc = await asyncio.create_subprocess_exec(
        str(DIR / "venv-swift/bin/swift"), "--os-storage-url", f"{SWIFT_URL}/v1/AUTH_test", "--os-auth-token", "unused",
        "upload", container, name, "-H", f"X-Project-Id: {PROJECT}", cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


async def delete_amqp_queue(name: str) -> None:
    connection = await aio_pika.connect(RABBIT)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


# -- 1. Swift ---------------------------------------------------------------------------------


async def test_swift_upload_runs_the_function_for_photos_jpg_only(router, tmp_path):
    queue = unique("headwater-test-swift")
    try:
        hw = await router(["swift"], swift={"queue": queue})
        function_id = await hw.make_function()
        sub = await hw.subscribe("swift", function_id, types=["org.openstack.swift.object.put"],
                                 filters={"container": "photos", "objectsuffix": "jpg"})
        unmatched = hw.app.metrics.events_unmatched.labels("swift")
        before = unmatched._value.get()

        started = time.monotonic()
        await swift_upload(tmp_path, "photos", "notes.txt", "not a picture")
        await swift_upload(tmp_path, "photos", "cat.jpg", "meow")
        (execution,) = await eventually(hw.executions)
        took = time.monotonic() - started
        assert execution.status == "success" and execution.subscription_id == sub["id"]
        assert execution.input["container"] == "photos" and execution.input["object"] == "cat.jpg"
        assert execution.input["method"] == "PUT" and execution.input["size"] == 4
        # The event is the account's (AUTH_test), whoever wrote into it: only its owner's subscriptions see it.
        assert execution.input["project_id"] == "test"
        # notes.txt reached the router too, and matched nothing
        await eventually(lambda: asyncio.sleep(0, unmatched._value.get() - before >= 1))
        await asyncio.sleep(0.5)
        assert len(await hw.executions(done=False)) == 1
        print(f"swift: upload → execution recorded in {took:.2f}s")
    finally:
        await delete_amqp_queue(queue)


async def test_malformed_swift_notifications_are_dead_lettered_and_consuming_goes_on(router, tmp_path):
    queue = unique("headwater-test-swift")
    try:
        hw = await router(["swift"], swift={"queue": queue})
        function_id = await hw.make_function()
        await hw.subscribe("swift", function_id, filters={"container": "bad-then-good"})
        connection = await aio_pika.connect(RABBIT)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange("swift")
            for body in (b"{not json", json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps({"event_type": "x"})}).encode()):
                await exchange.publish(aio_pika.Message(body, content_type="application/json"), routing_key="notifications.info")
        letters = await eventually(lambda: _at_least(hw.dead_letters, 2))
        assert {d.source for d in letters} == {"swift"}
        assert any("body is not JSON" in d.reason for d in letters) and any("event_type is 'x'" in d.reason for d in letters)
        await swift_upload(tmp_path, "bad-then-good", "after.bin", "still consuming")
        (execution,) = await eventually(hw.executions)
        assert execution.input["object"] == "after.bin"
    finally:
        await delete_amqp_queue(queue)


async def _at_least(probe, n: int):
    rows = await probe()
    return rows if len(rows) >= n else None


# -- 2. Zaqar ---------------------------------------------------------------------------------


async def test_zaqar_message_runs_the_function_and_is_deleted_only_after(router):
    queue = unique("hwtest")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "queues": queue, "project_id": PROJECT, "poll_interval": "0.2"})
    function_id = await hw.make_function()
    sub = await hw.subscribe("zaqar", function_id, filters={"queue": queue})
    source = hw.app.sources["zaqar"]
    recorded_at_delete: list[int] = []
    real_delete = source.client.delete_message

    async def observed_delete(q, message_id, claim_id):
        # what the router had recorded at the moment the source deleted the message
        recorded_at_delete.append(len([r for r in await hw.app.store.executions.list() if r.event_id == message_id]))
        return await real_delete(q, message_id, claim_id)

    source.client.delete_message = observed_delete
    started = time.monotonic()
    status, posted = await zaqar("POST", f"/v2/queues/{queue}/messages", json={"messages": [{"ttl": 300, "body": {"order": 42}}]})
    assert status == 201
    message_id = posted["resources"][0].rsplit("/", 1)[-1]
    (execution,) = await eventually(hw.executions)
    assert execution.event_id == message_id and execution.subscription_id == sub["id"] and execution.input == {"order": 42}
    stats = await eventually(lambda: _queue_empty(queue))
    took = time.monotonic() - started
    assert recorded_at_delete == [1], "the message was deleted before its execution was recorded"
    assert stats["messages"]["total"] == 0
    print(f"zaqar: post → recorded → deleted in {took:.2f}s")


async def _queue_empty(queue: str):
    status, stats = await zaqar("GET", f"/v2/queues/{queue}/stats")
    return stats if status == 200 and stats["messages"]["total"] == 0 else None


async def test_zaqar_router_killed_between_claim_and_record_processes_after_restart_once(router, tmp_path):
    """Two messages in one claim. A is recorded but the router dies before deleting it; B is claimed
    and never reaches the router. After the claim expires (60 s, Zaqar's minimum), a new router
    processes both: B runs, A is recognised by its id and does not run again."""
    queue = unique("hwtest")
    options = {"url": ZAQAR_URL, "queues": queue, "project_id": PROJECT, "poll_interval": "0.5",
               "claim_ttl": "60", "claim_grace": "60", "claim_limit": "10"}
    first = await router(["zaqar"], zaqar=options)
    function_id = await first.make_function()
    await first.subscribe("zaqar", function_id, filters={"queue": queue})
    dying = asyncio.Event()

    async def die_before_delete(*args):
        dying.set()
        await asyncio.Event().wait()  # never returns: the process "dies" here

    first.app.sources["zaqar"].client.delete_message = die_before_delete
    # one post, so both are free at once and land in one claim
    status, _ = await zaqar("POST", f"/v2/queues/{queue}/messages",
                            json={"messages": [{"ttl": 600, "body": {"m": "A"}}, {"ttl": 600, "body": {"m": "B"}}]})
    assert status == 201
    await asyncio.wait_for(dying.wait(), 20)
    (a,) = await first.executions()
    assert a.input == {"m": "A"}
    killed_at = time.monotonic()
    await first.stop()  # cancels the claim loop mid-message: no delete, no claim release
    status, stats = await zaqar("GET", f"/v2/queues/{queue}/stats")
    assert stats["messages"]["claimed"] == 2

    second = await router(["zaqar"], zaqar=options)  # same data dir: same store, function, subscription
    await eventually(lambda: _at_least(second.executions, 2), timeout=150, interval=0.5)
    await eventually(lambda: _queue_empty(queue), timeout=30)
    took = time.monotonic() - killed_at
    rows = await second.executions(done=False)
    assert sorted(r.input["m"] for r in rows) == ["A", "B"]
    assert all(r.attempts == 1 for r in rows), [(r.input, r.attempts) for r in rows]
    assert second.app.metrics.duplicates._value.get() == 1  # A came again and was recognised
    print(f"zaqar: kill → redelivered after claim expiry and processed in {took:.1f}s")


async def test_malformed_zaqar_messages_are_dead_lettered_and_consuming_goes_on(router):
    queue = unique("hwtest")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "queues": queue, "project_id": PROJECT, "poll_interval": "0.2"})
    function_id = await hw.make_function()
    await hw.subscribe("zaqar", function_id, filters={"queue": queue})
    await zaqar("POST", f"/v2/queues/{queue}/messages", json={"messages": [
        {"ttl": 300, "body": {"specversion": "1.0", "type": "broken"}},  # claims to be a CloudEvent, is not
        {"ttl": 300, "body": {"fine": True}}]})
    (letter,) = await eventually(hw.dead_letters)
    assert letter.source == "zaqar" and "claims to be a CloudEvent" in letter.reason
    (execution,) = await eventually(hw.executions)
    assert execution.input == {"fine": True}
    await eventually(lambda: _queue_empty(queue))  # the poison message is gone too


async def test_zaqar_push_subscription_runs_the_function(router):
    queue = unique("hwtest")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "project_id": PROJECT, "push_token": "push-secret"})
    function_id = await hw.make_function()
    await hw.subscribe("zaqar", function_id, filters={"queue": queue})
    status, _ = await zaqar("POST", f"/v2/queues/{queue}/subscriptions", json={
        "subscriber": f"{hw.config.api.public_url}/v1/zaqar/push?project_id={PROJECT}", "ttl": 3600,
        "options": {"post_headers": {"X-Headwater-Token": "push-secret"}}})
    assert status == 201
    await zaqar("POST", f"/v2/queues/{queue}/messages", json={"messages": [{"ttl": 300, "body": {"pushed": 1}}]})
    (execution,) = await eventually(hw.executions)
    assert execution.input == {"pushed": 1}


# -- 3. Aodh ----------------------------------------------------------------------------------


async def test_real_aodh_event_alarm_runs_the_function_with_the_alarm_payload(router):
    hw = await router(["aodh"], aodh={"token": "alarm-secret", "endpoint": AODH_URL})
    function_id = await hw.make_function()
    name = unique("hw-alarm")
    sub = await hw.subscribe("aodh", function_id, types=["org.openstack.aodh.alarm.alarm"], filters={"alarmname": name})

    # malformed first: dead-lettered, and the endpoint keeps serving
    resp = await hw.client.post("/v1/aodh/alarms?token=alarm-secret", json={"alarm_name": name, "current": "alarm"})
    assert resp.status == 400
    (letter,) = await eventually(hw.dead_letters)
    assert letter.source == "aodh" and "missing keys" in letter.reason

    event_type = unique("headwater.test")
    alarm = build_alarm(name=name, url=action_url(hw.config, PROJECT), event_type=event_type,
                        query=["traits.colour=string::red"], severity="critical")
    client = aodh_client(endpoint=AODH_URL, user_id="u1", project_id=PROJECT)
    created = await asyncio.to_thread(client.alarm.create, alarm)
    try:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            str(DIR / "venv-aodh/bin/python"), str(FEED_EVENT), PROJECT, event_type, "colour=red",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        ceilometer_event_id = out.decode().strip()
        (execution,) = await eventually(hw.executions, timeout=60)
        took = time.monotonic() - started
        payload = execution.input
        assert execution.subscription_id == sub["id"]
        assert set(payload) == {"alarm_name", "alarm_id", "severity", "previous", "current", "reason", "reason_data"}
        assert (payload["alarm_name"], payload["alarm_id"], payload["current"], payload["severity"]) == (name, created["alarm_id"], "alarm", "critical")
        assert payload["reason_data"]["event"]["message_id"] == ceilometer_event_id
        print(f"aodh: event → alarm action → execution recorded in {took:.2f}s")
    finally:
        await asyncio.to_thread(client.alarm.delete, created["alarm_id"])


# -- 4. Zaqar sink ----------------------------------------------------------------------------


async def test_function_result_lands_in_a_real_zaqar_queue(router):
    """An event runs a function through the router; its result goes to a real Zaqar queue through
    the subscription's zaqar sink, as the CloudEvent a Headwater Zaqar source would read back."""
    hw = await router([], zaqar={"url": ZAQAR_URL, "project_id": PROJECT})
    function_id = await hw.make_function()
    queue = unique("hwresults")
    sub = await hw.subscribe("http", function_id, types=["com.example.thumbnail"], sinks=[{"kind": "zaqar", "queue": queue}])
    event = {"specversion": "1.0", "id": unique("thumb"), "source": "/test", "type": "com.example.thumbnail",
             "data": {"thumb": "cat-128.jpg"}}
    assert (await hw.client.post("/v1/events", json=event)).status == 202
    (row,) = await eventually(hw.executions)
    assert row.subscription_id == sub["id"] and row.status == "success"

    async def landed():
        status, listed = await zaqar("GET", f"/v2/queues/{queue}/messages?echo=true")
        return listed["messages"] if status == 200 and listed and listed.get("messages") else None
    (message,) = await eventually(landed)
    assert message["body"]["id"] == derived_id("result", row.id)
    assert message["body"]["type"] == "org.openstack.headwater.execution.success"
    assert message["body"]["data"]["output"] == {"thumb": "cat-128.jpg"} and message["body"]["data"]["event_id"] == event["id"]
