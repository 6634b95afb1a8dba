"""Swift uploads, Zaqar messages and Aodh alarms run functions through a real in-process Headwater,
against real Zaqar, Swift + ceilometermiddleware and Aodh started by harness/openstack.sh."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
import pytest

from engine.null import NullEngine
from router.events import derived_id
from sources.aodh import action_url, aodh_client, build_alarm
from tests.conditions import eventually

from .conftest import AODH_EVENT_TOPIC, AODH_URL, DIR, PROJECT, SWIFT_URL, ZAQAR_HEADERS, ZAQAR_URL, aodh_listener_consumers, unique, zaqar

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
        await eventually(lambda: unmatched._value.get() - before >= 1)
        await asyncio.sleep(0.5)  # quiet period: a second execution would show up now
        assert len(await hw.executions(done=False)) == 1
        print(f"swift: upload → execution recorded in {took:.2f}s")
    finally:
        await delete_amqp_queue(queue)


async def swift_cli(tmp_path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(DIR / "venv-swift/bin/swift"), "--os-storage-url", f"{SWIFT_URL}/v1/AUTH_test", "--os-auth-token", "unused",
        *args, "-H", f"X-Project-Id: {PROJECT}", cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_a_refused_swift_put_runs_nothing_and_a_stored_object_event_has_etag_and_type(router, tmp_path):
    """Done-when 3. Regression: an anonymous PUT that Swift answered 401 ran the photos/*.jpg function."""
    queue = unique("headwater-test-swift")
    try:
        # prefetch 1: notifications are handled one after another, so the refused PUT's is done
        # before the stored object's execution exists.
        hw = await router(["swift"], swift={"queue": queue, "prefetch": "1"})
        function_id = await hw.make_function()
        await hw.subscribe("swift", function_id, types=["org.openstack.swift.object.put"],
                           filters={"container": "photos", "objectsuffix": "jpg"})
        await swift_cli(tmp_path, "post", "photos")  # the container exists: the 401 below is the refusal
        async with aiohttp.ClientSession() as session:
            # An expired temp URL: Swift's tempurl middleware answers 401 Unauthorized.
            async with session.put(f"{SWIFT_URL}/v1/AUTH_test/photos/forged.jpg",
                                   params={"temp_url_sig": "0" * 40, "temp_url_expires": "1"}, data=b"forged",
                                   headers={"X-Headwater-Status": "201"}) as resp:  # a forged status is dropped too
                assert resp.status == 401, resp.status
        (tmp_path / "cat.jpg").write_bytes(b"meow")
        await swift_cli(tmp_path, "upload", "photos", "cat.jpg", "-H", "Content-Type: image/jpeg")
        (execution,) = await eventually(hw.executions)
        assert execution.input["object"] == "cat.jpg" and execution.input["size"] == 4
        assert execution.input["etag"] == hashlib.md5(b"meow").hexdigest()
        assert execution.input["content_type"] == "image/jpeg"
        assert len(await hw.executions(done=False)) == 1
        assert await hw.app.history.query(project_id=None, subject="photos/forged.jpg") == []
    finally:
        await delete_amqp_queue(queue)


async def test_swift_copy_and_large_object_uploads_are_one_event_each(router, tmp_path):
    queue = unique("headwater-test-swift")
    container = unique("media")
    try:
        hw = await router(["swift"], swift={"queue": queue})
        function_id = await hw.make_function()
        await hw.subscribe("swift", function_id, filters={"container": container})
        (tmp_path / "film.bin").write_bytes(b"0123456789" * 3)
        # --use-slo -S 10: three segments in <container>_segments, then one SLO manifest PUT.
        await swift_cli(tmp_path, "upload", container, "film.bin", "--use-slo", "-S", "10")
        (manifest,) = await eventually(hw.executions)
        assert manifest.input["object"] == "film.bin" and manifest.input["large_object"] == "slo"
        # `swift copy` (COPY + Destination) and a PUT with X-Copy-From: each one copy event for the
        # object it creates.
        await swift_cli(tmp_path, "copy", container, "film.bin", "-d", f"/{container}/copy.bin")
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{SWIFT_URL}/v1/AUTH_test/{container}/again.bin", data=b"",
                                   headers={"X-Copy-From": f"{container}/film.bin", "X-Project-Id": PROJECT}) as resp:
                assert resp.status == 201, resp.status

        async def three():
            rows = await hw.executions()
            return {r.input["object"]: r for r in rows} if len(rows) == 3 else None
        rows = await eventually(three)
        assert rows["copy.bin"].input["method"] == "COPY" and rows["copy.bin"].input["copy_from"] == f"{container}/film.bin"
        assert rows["again.bin"].input["method"] == "COPY" and rows["again.bin"].input["copy_from"] == f"{container}/film.bin"
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
    # On the memory bus an event is only safe once the router has recorded it, so the source must
    # wait for that before deleting the message (on a durable bus the publish itself is enough).
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "queues": queue, "project_id": PROJECT, "poll_interval": "0.2"},
                      bus={"backend": "memory"})
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
    """Two messages in one claim, processed side by side: both are recorded, and the router dies
    before deleting either. After the claim expires (60 s, Zaqar's minimum) a new router gets both
    again and recognises each by its id: nothing runs twice."""
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
    await eventually(lambda: _at_least(first.executions, 2))
    killed_at = time.monotonic()
    await first.stop()  # cancels the claim loop mid-message: no delete, no claim release
    status, stats = await zaqar("GET", f"/v2/queues/{queue}/stats")
    assert stats["messages"]["claimed"] == 2

    second = await router(["zaqar"], zaqar=options)  # same data dir: same store, function, subscription
    await eventually(lambda: _queue_empty(queue), timeout=150, interval=0.5)
    took = time.monotonic() - killed_at
    rows = await second.executions(done=False)
    assert sorted(r.input["m"] for r in rows) == ["A", "B"]
    assert all(r.attempts == 1 for r in rows), [(r.input, r.attempts) for r in rows]
    assert second.app.metrics.duplicates._value.get() == 2  # both came again and were recognised
    print(f"zaqar: kill → redelivered after claim expiry and processed in {took:.1f}s")


class HoldingEngine(NullEngine):
    """The null engine, but each execution takes `seconds`; counts calls and how many run at once."""

    def __init__(self, seconds: float):
        self.seconds, self.calls, self.running, self.most = seconds, 0, 0, 0

    async def execute(self, request):
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.running -= 1
        return await super().execute(request)


def hold(hw, seconds: float) -> HoldingEngine:
    engine = HoldingEngine(seconds)
    hw.app.engine = hw.app.executions.engine = engine
    return engine


async def post_messages(queue: str, *bodies) -> list[str]:
    status, posted = await zaqar("POST", f"/v2/queues/{queue}/messages",
                                 json={"messages": [{"ttl": 600, "body": b} for b in bodies]})
    assert status == 201, posted
    return [href.rsplit("/", 1)[-1] for href in posted["resources"]]


async def test_a_subscription_on_a_new_queue_starts_consuming_it_without_a_restart(router):
    """Done-when 2: no [zaqar] queues, no restart; the subscription is what makes Headwater consume."""
    queue = unique("hwtest")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "project_id": PROJECT, "poll_interval": "0.2"})
    source = hw.app.sources["zaqar"]
    assert queue not in source.queues
    function_id = await hw.make_function()
    (message_id,) = await post_messages(queue, {"order": 7})  # waiting before anyone subscribed
    sub = await hw.subscribe("zaqar", function_id, filters={"queue": queue})
    assert queue in source.queues
    (execution,) = await eventually(hw.executions)
    assert execution.event_id == message_id and execution.input == {"order": 7}
    await eventually(lambda: _queue_empty(queue))
    assert (await hw.client.delete(f"/v1/subscriptions/{sub['id']}")).status == 204
    assert queue not in source.queues  # the last subscription gone: no longer consumed
    (later,) = await post_messages(queue, {"order": 8})
    # Headwater holds no claim on it: another consumer gets it.
    status, claimed = await zaqar("POST", f"/v2/queues/{queue}/claims", json={"ttl": 60, "grace": 60})
    assert status == 201 and [m["id"] for m in claimed["messages"]] == [later]


async def test_messages_of_one_queue_run_at_the_same_time(router):
    """#16's observation: five messages for a 2 s function ran one after another on the memory bus."""
    queue = unique("hwtest")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "project_id": PROJECT, "poll_interval": "0.2"})
    engine = hold(hw, 2.0)
    function_id = await hw.make_function()
    await hw.subscribe("zaqar", function_id, filters={"queue": queue})
    await post_messages(queue, *({"n": i} for i in range(5)))
    await eventually(lambda: asyncio.sleep(0, engine.most == 5))
    rows = await eventually(lambda: _at_least(hw.executions, 5))
    assert sorted(r.input["n"] for r in rows) == [0, 1, 2, 3, 4] and engine.calls == 5


async def test_a_function_longer_than_the_claim_keeps_its_message(router):
    """Done-when 2, on a real Zaqar, whose shortest claim is 60 s (MIN_CLAIM_TTL): a 75 s run holds
    its message through the claim's renewals, while another consumer keeps trying to claim it; the
    function runs once and the message is deleted after."""
    queue = unique("hwtest")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "project_id": PROJECT, "poll_interval": "0.2",
                                        "claim_ttl": "60", "claim_grace": "60"})
    engine = hold(hw, 75.0)
    function_id = await hw.make_function()
    await hw.subscribe("zaqar", function_id, filters={"queue": queue})
    (message_id,) = await post_messages(queue, {"long": True})
    await eventually(lambda: asyncio.sleep(0, engine.calls == 1))
    stolen = []
    other = {**ZAQAR_HEADERS, "Client-ID": str(uuid.uuid4())}  # another replica
    async with aiohttp.ClientSession() as session:
        while engine.running:
            async with session.post(f"{ZAQAR_URL}/v2/queues/{queue}/claims", json={"ttl": 60, "grace": 60},
                                    headers=other) as resp:
                if resp.status == 201:
                    stolen.extend(m["id"] for m in (await resp.json())["messages"])
            await asyncio.sleep(2)
    assert stolen == [], "the claim ran out while the function ran"
    (execution,) = await eventually(hw.executions)
    assert execution.event_id == message_id and execution.status == "success" and engine.calls == 1
    await eventually(lambda: _queue_empty(queue))


async def test_a_batch_subscription_gets_ten_messages_in_one_run_and_retries_only_the_failed(router):
    """Done-when 2: batch size 10 on a real Zaqar queue; the function reports two of the ten failed."""
    from tests.unit.test_batching import BatchEngine

    queue = unique("hwtest")
    hw = await router(["zaqar"], zaqar={"url": ZAQAR_URL, "project_id": PROJECT, "poll_interval": "0.2",
                                        "claim_limit": "10"})
    function_id = await hw.make_function()
    sub = await hw.subscribe("zaqar", function_id, filters={"queue": queue}, batch={"size": 10, "window": 2},
                             options={"delivery": {"backoff_initial": 0.1, "jitter": 0}})
    engine = BatchEngine()
    hw.app.engine = hw.app.executions.engine = engine
    ids = await post_messages(queue, *({"n": i} for i in range(10)))
    engine.fail_once = {ids[2], ids[7]}

    async def all_done():
        rows = [r for r in await hw.executions() if r.subscription_id == sub["id"]]
        return rows if len(rows) == 10 and all(r.status == "success" for r in rows) else None
    # The first ten fill the batch at once; the two retries run together when the 2 s window closes.
    rows = {r.event_id: r for r in await eventually(all_done)}
    assert sorted(engine.runs[0]) == sorted(ids)  # one invocation with all ten
    assert sorted(i for run in engine.runs[1:] for i in run) == sorted([ids[2], ids[7]])
    assert {i for i, r in rows.items() if r.attempts == 2} == {ids[2], ids[7]}
    await eventually(lambda: _queue_empty(queue))


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
    topic = AODH_EVENT_TOPIC
    await eventually(aodh_listener_consumers, timeout=180)
    try:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            str(DIR / "venv-aodh/bin/python"), str(FEED_EVENT), PROJECT, event_type, "colour=red",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            # RabbitMQ is shared by every run here: another run's listener must not take this event
            env={**os.environ, "HEADWATER_AODH_EVENT_TOPIC": topic})
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
