"""Delivery policy: validation, backoff, and retry / max-age / dead-letter behaviour through the
router in one process (memory bus, a fake engine whose function fails N times)."""

from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import random

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from router.delivery import DeliveryPolicy, validate_delivery_policy
from router.events import Event, execution_id_for
from router.plugins import ExecutionRequest, ExecutionResult
from tests.unit.test_router_flow import make_function


# -- the policy itself -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, fault", [
    ([], "delivery must be an object"),
    ({"attempts": 3}, "unknown field(s) attempts"),
    ({"max_attempts": 0}, "delivery.max_attempts must be at least 1"),
    ({"max_attempts": 2.5}, "delivery.max_attempts must be an integer"),
    ({"max_attempts": True}, "delivery.max_attempts must be an integer"),
    ({"max_attempts": 1000}, "delivery.max_attempts must be at most 100"),
    ({"backoff_initial": -1}, "delivery.backoff_initial must be at least 0"),
    ({"backoff_initial": "1s"}, "delivery.backoff_initial must be a number"),
    ({"backoff_multiplier": 0.5}, "delivery.backoff_multiplier must be at least 1"),
    ({"jitter": 1.5}, "delivery.jitter must be at most 1"),
    ({"max_age": 0}, "delivery.max_age must be at least"),
    ({"max_age": float("nan")}, "delivery.max_age must be a finite number"),
    ({"retry_on": ["error", "oops"]}, "delivery.retry_on has unknown outcome(s) oops"),
    ({"retry_on": 3}, "delivery.retry_on must be a list"),
    ({"dead_letter_topic": "has space"}, "delivery.dead_letter_topic must be a topic name"),
    ({"dead_letter_topic": "events"}, "cannot be the router's own topic"),
    ({"backoff_initial": 10, "backoff_max": 5}, "delivery.backoff_max (5) must not be below delivery.backoff_initial (10)"),
])
def test_invalid_policies_name_the_fault(raw, fault):
    with pytest.raises(ValueError) as err:
        validate_delivery_policy(raw)
    assert fault in str(err.value)


def test_valid_policy_is_normalised():
    assert validate_delivery_policy(None) == {}
    assert validate_delivery_policy({"max_attempts": 5, "backoff_initial": 1, "retry_on": "failed", "max_age": 60,
                                     "dead_letter_topic": "dead.orders"}) == {
        "max_attempts": 5, "backoff_initial": 1.0, "retry_on": ["failed"], "max_age": 60.0, "dead_letter_topic": "dead.orders"}


def test_backoff_is_exponential_capped_and_jittered_below_the_cap():
    policy = DeliveryPolicy(backoff_initial=1.0, backoff_multiplier=2.0, backoff_max=5.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    jittered = DeliveryPolicy(backoff_initial=1.0, backoff_multiplier=2.0, backoff_max=5.0, jitter=0.5)
    rng = random.Random(7)
    waits = [jittered.backoff(4, rng) for _ in range(2000)]
    assert 2.5 <= min(waits) < 2.6 and 4.9 < max(waits) <= 5.0  # within [cap*(1-jitter), cap]
    assert len({round(w, 3) for w in waits}) > 1000  # spread out, not a few fixed values


@pytest.mark.parametrize("retry_on, status, reason, retried", [
    ({"error", "timeout"}, "error", "platform", True),
    ({"error", "timeout"}, "failed", "timeout", True),
    ({"error", "timeout"}, "failed", "error", False),
    ({"error"}, "failed", "timeout", False),
    ({"failed"}, "failed", "error", True),
    ({"failed"}, "failed", "timeout", True),
    ({"failed"}, "error", "platform", False),
    ({"error", "timeout", "failed"}, "success", "ok", False),
    ({"error", "timeout", "failed"}, "error", "build_failed", False),  # the package must change first
])
def test_which_outcomes_are_retried(retry_on, status, reason, retried):
    policy = DeliveryPolicy(retry_on=frozenset(retry_on))
    assert policy.retries(ExecutionResult(status=status, reason=reason)) is retried


def test_expiry_uses_the_event_time():
    policy = DeliveryPolicy(max_age=60)
    now = _dt.datetime(2024, 1, 1, 12, 0, tzinfo=_dt.timezone.utc)
    fresh = Event(id="a", source="/s", type="t", time=now - _dt.timedelta(seconds=59))
    stale = Event(id="b", source="/s", type="t", time=now - _dt.timedelta(seconds=60))
    untimed = Event(id="c", source="/s", type="t")
    assert not policy.expired(fresh, now) and policy.expired(stale, now) and not policy.expired(untimed, now)
    assert not DeliveryPolicy().expired(stale, now)


# -- through the router ------------------------------------------------------------------------

class FlakyEngine:
    """Fails an execution `fail` times (input {"fail": n, "status": ..., "reason": ...}), then succeeds;
    counts calls per execution, and can be held at a gate."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.times: dict[str, list[float]] = collections.defaultdict(list)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        self.calls[request.execution_id] += 1
        self.times[request.execution_id].append(asyncio.get_running_loop().time())
        spec = request.input if isinstance(request.input, dict) else {}
        if self.calls[request.execution_id] <= spec.get("fail", 0):
            return ExecutionResult(status=spec.get("status", "error"), output=f"boom {self.calls[request.execution_id]}",
                                   reason=spec.get("reason", "platform"))
        return ExecutionResult(status="success", output="ok")

    async def release(self, function_id, version=None) -> None:
        pass

    async def workers(self, function_id, version=0) -> list[str]:
        return []


def record_retry_delays(app) -> list[float]:
    """The backoff schedule, as the router hands it to the bus: the delay of each retry scheduled."""
    delays: list[float] = []
    schedule_retry = app.executions.delivery.schedule_retry

    async def spy(event, sub, next_attempt, delay, last_status):
        delays.append(delay)
        await schedule_retry(event, sub, next_attempt, delay, last_status)

    app.executions.delivery.schedule_retry = spy
    return delays


@pytest.fixture
async def hw(tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"backend": "null"},
                                    "bus": {"prefetch": "4"}})
    app = Headwater(config)
    app.engine = app.executions.engine = FlakyEngine()
    await app.start()
    app.retry_delays = record_retry_delays(app)
    client = TestClient(TestServer(app.web))
    await client.start_server()
    app.client = client
    try:
        yield app
    finally:
        await client.close()
        await app.stop()


async def subscribe(hw, delivery: dict | None = None, types=("com.example.work",)) -> str:
    function_id = await make_function(hw)
    body = {"source": "http", "types": list(types), "function_id": function_id}
    if delivery is not None:
        body["options"] = {"delivery": delivery}
    resp = await hw.client.post("/v1/subscriptions", json=body)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def post_event(hw, event_id: str, data: dict, time: str | None = None) -> None:
    event = {"specversion": "1.0", "id": event_id, "source": "/test", "type": "com.example.work", "data": data}
    if time:
        event["time"] = time
    resp = await hw.client.post("/v1/events", json=event)
    assert resp.status == 202, await resp.text()


async def settled(hw, execution_id: str, timeout: float = 60.0, statuses=("success", "failed", "error")):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        row = await hw.store.executions.find(execution_id)
        if row is not None and row.status in statuses:
            return row
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{execution_id}: {row.status if row else 'no record'}")


async def retrying(hw, execution_id: str):
    return await settled(hw, execution_id, statuses=("retrying",))


FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "jitter": 0.1}


async def test_platform_errors_are_retried_with_backoff_until_success(hw):
    sub = await subscribe(hw, {**FAST, "max_attempts": 4, "backoff_multiplier": 2.0, "jitter": 0.0})
    scheduled: list[tuple[int, float]] = []
    schedule_retry = hw.executions.delivery.schedule_retry

    async def noting(event, sub_, next_attempt, delay, last_status):
        scheduled.append((next_attempt, delay))
        await schedule_retry(event, sub_, next_attempt, delay, last_status)

    hw.executions.delivery.schedule_retry = noting
    await post_event(hw, "e1", {"fail": 2})
    row = await settled(hw, execution_id_for("/test", "e1", sub))
    assert row.status == "success" and row.attempts == 3
    assert hw.engine.calls[row.id] == 3
    # The waits asked of the bus are the policy's (0.05 s, then 0.1 s), and no attempt came early;
    # how much later one came depends on the machine's load, so it is not asserted.
    assert scheduled == [(2, pytest.approx(0.05)), (3, pytest.approx(0.1))]
    times = hw.engine.times[row.id]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.05 * 0.99 and gaps[1] >= 0.1 * 0.99, gaps
    assert await hw.store.dead_letters.list() == []
    assert len(await hw.store.executions.list()) == 1  # one record however many attempts


async def test_exhausted_attempts_dead_letter_the_event_visible_through_the_api(hw):
    sub = await subscribe(hw, {**FAST, "max_attempts": 3, "dead_letter_topic": "dead.work"})
    letters_on_bus: list[Event] = []

    async def collect(delivery):
        letters_on_bus.append(delivery.event)

    await hw.bus.consume("dead.work", "test", collect)
    await post_event(hw, "e2", {"fail": 99})
    row = await settled(hw, execution_id_for("/test", "e2", sub))
    assert row.status == "error" and row.attempts == 3 and hw.engine.calls[row.id] == 3
    listed = (await (await hw.client.get(f"/v1/deadletters?subscription_id={sub}")).json())["deadletters"]
    assert len(listed) == 1
    letter = listed[0]
    assert letter["event_id"] == "e2" and letter["subscription_id"] == sub and letter["source"] == "http"
    assert "3 attempt(s) failed" in letter["reason"] and "error (platform): boom 3" in letter["reason"]
    assert letter["payload"]["data"] == {"fail": 99} and "hwretrysub" not in letter["payload"]
    one = await hw.client.get(f"/v1/deadletters/{letter['id']}")
    assert one.status == 200 and (await one.json())["reason"] == letter["reason"]
    for _ in range(100):
        if letters_on_bus:
            break
        await asyncio.sleep(0.01)
    assert [e.id for e in letters_on_bus] == ["e2"]
    assert letters_on_bus[0].extensions["deadlettersub"] == sub
    assert "3 attempt(s) failed" in letters_on_bus[0].extensions["deadletterreason"]


async def test_deadletter_api_unhappy_paths(hw):
    assert (await hw.client.get("/v1/deadletters/not-a-uuid")).status == 400
    resp = await hw.client.get("/v1/deadletters/00000000-0000-0000-0000-000000000000")
    assert resp.status == 404
    resp = await hw.client.get("/v1/deadletters?color=red")
    assert resp.status == 400 and "Unknown argument" in (await resp.json())["faultstring"]
    assert (await hw.client.get("/v1/deadletters?limit=x")).status == 400
    assert (await (await hw.client.get("/v1/deadletters?source=http&limit=5")).json()) == {"deadletters": []}


async def test_function_failures_are_retried_by_default_then_dead_lettered(hw):
    """Like AWS Lambda's asynchronous invocations: an event-triggered function that fails gets two
    more attempts with backoff, then a dead letter."""
    sub = await subscribe(hw, {"backoff_initial": 0.05, "backoff_max": 0.2})  # only the waits shortened
    await post_event(hw, "e3", {"fail": 99, "status": "failed", "reason": "error"})
    row = await settled(hw, execution_id_for("/test", "e3", sub))
    assert row.status == "failed" and row.attempts == 3 and hw.engine.calls[row.id] == 3
    (letter,) = await hw.store.dead_letters.list()
    assert letter.event_id == "e3" and "3 attempt(s) failed (max_attempts 3)" in letter.reason


async def test_function_failures_are_not_retried_when_the_policy_says_so(hw):
    plain = await subscribe(hw, {**FAST, "retry_on": ["error", "timeout"]})
    await post_event(hw, "e3", {"fail": 1, "status": "failed", "reason": "error"})
    row = await settled(hw, execution_id_for("/test", "e3", plain))
    assert row.status == "failed" and row.attempts == 1 and hw.engine.calls[row.id] == 1
    assert await hw.store.dead_letters.list() == []  # the function ran and failed: delivered, not dead


async def test_sync_executions_are_never_retried(hw):
    function_id = await make_function(hw)
    resp = await hw.client.post("/v1/executions", json={"function_id": function_id, "input": {"fail": 1, "status": "failed",
                                                                                              "reason": "error"}})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["status"] == "failed" and hw.engine.calls[body["id"]] == 1
    assert await hw.store.dead_letters.list() == []


async def test_function_failures_are_retried_when_the_policy_says_so(hw):
    sub = await subscribe(hw, {**FAST, "retry_on": ["failed"]})
    await post_event(hw, "e4", {"fail": 1, "status": "failed", "reason": "error"})
    row = await settled(hw, execution_id_for("/test", "e4", sub))
    assert row.status == "success" and row.attempts == 2


async def test_timeouts_are_retried_by_default(hw):
    sub = await subscribe(hw, FAST)
    await post_event(hw, "e5", {"fail": 1, "status": "failed", "reason": "timeout"})
    row = await settled(hw, execution_id_for("/test", "e5", sub))
    assert row.status == "success" and row.attempts == 2


async def test_an_event_older_than_max_age_is_dead_lettered_without_running(hw):
    sub = await subscribe(hw, {**FAST, "max_age": 60})
    old = (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(hours=1)).isoformat()
    await post_event(hw, "e6", {}, time=old)
    for _ in range(200):
        letters = await hw.store.dead_letters.list()
        if letters:
            break
        await asyncio.sleep(0.01)
    assert len(letters) == 1 and letters[0].reason.startswith("expired: event is 36") and "max_age 60s" in letters[0].reason
    assert await hw.store.executions.find(execution_id_for("/test", "e6", sub)) is None
    assert sum(hw.engine.calls.values()) == 0


async def test_retries_stop_when_max_age_would_pass_first(hw):
    sub = await subscribe(hw, {"backoff_initial": 0.3, "jitter": 0, "max_attempts": 5, "max_age": 0.5})
    await post_event(hw, "e7", {"fail": 99})
    row = await settled(hw, execution_id_for("/test", "e7", sub))
    # attempt 1 at ~0, attempt 2 at ~0.3; attempt 3 would come at ~0.9 > 0.5: dead letter after 2
    assert row.status == "error" and row.attempts == 2
    (letter,) = await hw.store.dead_letters.list()
    assert "max_age 0.5s would pass before attempt 3" in letter.reason


async def test_a_waiting_retry_does_not_hold_up_other_events(hw):
    # prefetch is 4: a retry that slept inside its handler would block a slot for an hour, so the
    # quick events settling at all (before the test's timeout) shows the retries wait on the bus.
    sub = await subscribe(hw, {"backoff_initial": 3600.0, "backoff_max": 3600.0, "jitter": 0, "max_attempts": 2})
    for i in range(4):
        await post_event(hw, f"slow-{i}", {"fail": 1})
    for i in range(4):
        await retrying(hw, execution_id_for("/test", f"slow-{i}", sub))
    for i in range(40):
        await post_event(hw, f"quick-{i}", {})
    for i in range(40):
        assert (await settled(hw, execution_id_for("/test", f"quick-{i}", sub))).status == "success"
    assert {(await hw.store.executions.get(execution_id_for("/test", f"slow-{i}", sub))).status for i in range(4)} == {"retrying"}
    assert hw.retry_delays == [3600.0] * 4


async def test_redelivery_while_a_retry_waits_does_not_run_it_again(hw):
    sub_id = await subscribe(hw, {"backoff_initial": 0.5, "jitter": 0})
    await post_event(hw, "e8", {"fail": 1})
    execution_id = execution_id_for("/test", "e8", sub_id)
    for _ in range(200):
        row = await hw.store.executions.find(execution_id)
        if row is not None and row.status == "retrying":
            break
        await asyncio.sleep(0.01)
    sub = hw.index.get(sub_id)
    original = Event(id="e8", source="/test", type="com.example.work", data={"fail": 1})
    await hw.executions.run_for_event(original, sub)  # the bus redelivers the original
    await hw.executions.run_for_event(original, sub, attempt=2)  # and the retry arrives twice
    assert hw.engine.calls[execution_id] == 2
    await hw.executions.run_for_event(original, sub, attempt=2)
    row = await settled(hw, execution_id)
    assert row.status == "success" and row.attempts == 2 and hw.engine.calls[execution_id] == 2


async def test_subscription_api_refuses_a_bad_policy(hw):
    resp = await hw.client.post("/v1/runtimes", json={"image": "python3"})
    body = {"source": "http", "function_id": "x", "options": {"delivery": {"max_attempts": 0}}}
    resp = await hw.client.post("/v1/subscriptions", json=body)
    assert resp.status == 400 and "delivery.max_attempts must be at least 1" in (await resp.json())["faultstring"]


def test_config_defaults_apply_and_a_bad_retry_on_is_a_config_error(tmp_path):
    from router.config import ConfigError
    from router.delivery import default_policy

    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "delivery": {"max_attempts": "5", "retry_on": "failed"}})
    policy = default_policy(config)
    assert policy.max_attempts == 5 and policy.retry_on == {"failed"} and policy.max_age is None
    bad = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "delivery": {"retry_on": "error, crash"}})
    with pytest.raises(ConfigError, match=r"\[delivery\] retry_on has unknown outcome\(s\) crash"):
        default_policy(bad)


async def test_an_event_the_bus_gives_up_on_becomes_a_dead_letter_record(make_headwater):
    """When the router itself keeps failing on an event (here: routing raises), the bus dead-letters
    it after max_deliveries, and the router records that where operators look: /v1/deadletters."""
    hw = await make_headwater("null", bus={"max_deliveries": "3"})
    calls = collections.Counter()

    async def broken_route(event):
        calls[event.id] += 1
        raise RuntimeError("database unreachable")

    hw.dispatcher._route = broken_route
    event = Event(id="poison-1", source="/tests", type="org.example.thing", data={"n": 1},
                  extensions={"sourcekind": "http", "projectid": "default"})
    await hw.bus.publish(event)
    for _ in range(200):
        letters = (await (await hw.client.get("/v1/deadletters?event_id=poison-1")).json())["deadletters"]
        if letters:
            break
        await asyncio.sleep(0.02)
    assert calls["poison-1"] == 3
    (letter,) = letters
    assert letter["source"] == "http" and letter["event_id"] == "poison-1"
    assert "database unreachable" in letter["reason"] and "topic events" in letter["reason"]
    # A second delivery of the same dead letter (at-least-once) records nothing new.
    await hw.dispatcher.record_bus_dead_letter(type("D", (), {"event": event, "topic": "events.dlq",
                                                              "dead_letter_reason": "again"})())
    assert len((await (await hw.client.get("/v1/deadletters?event_id=poison-1")).json())["deadletters"]) == 1
    assert 'headwater_dead_letters_total{source="http"} 1.0' in await (await hw.client.get("/metrics")).text()
