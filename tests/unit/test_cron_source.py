"""Unit tests of the cron source: Qinling's job validation, next_fire_time, and the scheduler loop."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import time
import zipfile
from zoneinfo import ZoneInfo
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from router.config import Config
from router.events import Event, derived_id
from router.plugins import Source, Subscription, SubscriptionInvalid
from sources.cron import EVENT_TYPE, CronSource, next_fire_time
from tests.processes import gone as process_gone, pid_path

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 15, 12, 0, 0, tzinfo=UTC)  # a Monday, in winter (Paris is UTC+1)


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def config(max_sleep: float = 0.01) -> Config:
    return Config.load(overrides={"cron": {"max_sleep": max_sleep}})


@pytest.fixture
def source() -> CronSource:
    return CronSource(config())


# ---------------------------------------------------------------------------------------------
# validate_subscription


ERRORS = [
    ("neither pattern nor time", {}, "pattern or first_execution_time must be specified."),
    ("empty pattern and no time", {"pattern": "  ", "first_execution_time": None}, "pattern or first_execution_time must be specified."),
    ("time too soon", {"first_execution_time": NOW + dt.timedelta(seconds=59)}, "Execution time must be at least 1 minute in the future."),
    ("time in the past", {"first_execution_time": "2020-01-01T00:00:00"}, "Execution time must be at least 1 minute in the future."),
    ("aware time converted before the check", {"first_execution_time": "2024-01-15T13:00:30+01:00"}, "Execution time must be at least 1 minute in the future."),
    ("count > 1 without pattern", {"first_execution_time": NOW + dt.timedelta(hours=1), "count": 2}, "pattern must be provided if count is greater than 1."),
    ("bad pattern", {"pattern": "61 * * * *"}, "The specified pattern is not valid: 61 * * * *"),
    ("garbage pattern", {"pattern": "every minute"}, "The specified pattern is not valid: every minute"),
    ("too few fields", {"pattern": "* * *"}, "The specified pattern is not valid: * * *"),
    ("seven fields", {"pattern": "* * * * * * *"}, "The specified pattern is not valid: * * * * * * *"),
    ("never matches", {"pattern": "0 0 31 2 *"}, "The specified pattern is not valid: 0 0 31 2 *"),
    ("bad seconds field", {"pattern": "75 * * * * *"}, "The specified pattern is not valid: 75 * * * * *"),
    ("pattern not a string", {"pattern": 5}, "The specified pattern is not valid: 5"),
    ("pattern with bad time", {"pattern": "* * * * *", "first_execution_time": NOW}, "Execution time must be at least 1 minute in the future."),
    ("count zero", {"pattern": "* * * * *", "count": 0}, "count must be a positive integer."),
    ("count negative", {"pattern": "* * * * *", "count": -3}, "count must be a positive integer."),
    ("count string", {"pattern": "* * * * *", "count": "3"}, "count must be a positive integer."),
    ("count bool", {"pattern": "* * * * *", "count": True}, "count must be a positive integer."),
    ("count float", {"pattern": "* * * * *", "count": 1.5}, "count must be a positive integer."),
    ("unknown timezone", {"pattern": "* * * * *", "timezone": "Mars/Olympus"}, "Unknown timezone: Mars/Olympus"),
    ("unparsable time", {"first_execution_time": "tomorrow"}, "Invalid first_execution_time: tomorrow"),
    ("time of the wrong type", {"first_execution_time": 1700000000}, "Invalid first_execution_time: 1700000000"),
]


@pytest.mark.parametrize(("params", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_validate_rejects(source: CronSource, params: dict[str, Any], message: str) -> None:
    with pytest.raises(SubscriptionInvalid) as info:
        source.validate_subscription(params, NOW)
    assert str(info.value) == message


ACCEPTED = [
    # (name, params, expected first == next, expected count)
    ("one-shot defaults to count 1", {"first_execution_time": at(2024, 1, 15, 12, 1)}, at(2024, 1, 15, 12, 1), 1),
    ("exactly one minute ahead is enough", {"first_execution_time": NOW + dt.timedelta(seconds=60)}, at(2024, 1, 15, 12, 1), 1),
    ("one-shot with count 1", {"first_execution_time": at(2024, 1, 16, 0, 0), "count": 1}, at(2024, 1, 16, 0, 0), 1),
    ("naive ISO string is UTC", {"first_execution_time": "2024-01-15T18:30:00"}, at(2024, 1, 15, 18, 30), 1),
    ("aware ISO string converted to UTC", {"first_execution_time": "2024-01-15T18:30:00+02:00"}, at(2024, 1, 15, 16, 30), 1),
    ("Z suffix", {"first_execution_time": "2024-01-15T18:30:00Z"}, at(2024, 1, 15, 18, 30), 1),
    ("aware datetime converted to UTC", {"first_execution_time": dt.datetime(2024, 1, 15, 20, 0, tzinfo=dt.timezone(dt.timedelta(hours=5)))}, at(2024, 1, 15, 15, 0), 1),
    ("naive datetime is UTC", {"first_execution_time": dt.datetime(2024, 1, 15, 15, 0)}, at(2024, 1, 15, 15, 0), 1),
    ("pattern only: first match after now, unlimited", {"pattern": "*/5 * * * *"}, at(2024, 1, 15, 12, 5), None),
    ("pattern with count", {"pattern": "0 * * * *", "count": 3}, at(2024, 1, 15, 13, 0), 3),
    ("pattern is stripped", {"pattern": "  0 * * * *  "}, at(2024, 1, 15, 13, 0), None),
    # Qinling starts the search at first_execution_time − 1 min, so a match at that time is the first run.
    ("pattern + time on a match", {"pattern": "0 * * * *", "first_execution_time": at(2024, 1, 15, 14, 0)}, at(2024, 1, 15, 14, 0), None),
    ("pattern + time between matches", {"pattern": "0 * * * *", "first_execution_time": at(2024, 1, 15, 14, 20)}, at(2024, 1, 15, 15, 0), None),
    ("pattern + time with seconds: Qinling's quirk", {"pattern": "* * * * *", "first_execution_time": at(2024, 1, 15, 14, 0, 30)}, at(2024, 1, 15, 14, 0), None),
    ("pattern + count > 1 is fine", {"pattern": "0 * * * *", "first_execution_time": at(2024, 1, 15, 14, 0), "count": 5}, at(2024, 1, 15, 14, 0), 5),
    ("alias", {"pattern": "@daily"}, at(2024, 1, 16, 0, 0), None),
    # 6 fields: the first is seconds.
    ("6 fields: every second", {"pattern": "*/1 * * * * *"}, at(2024, 1, 15, 12, 0, 1), None),
    ("6 fields: seconds 15 of each minute", {"pattern": "15 * * * * *"}, at(2024, 1, 15, 12, 0, 15), None),
    ("6 fields: 09:30:45 daily", {"pattern": "45 30 9 * * *"}, at(2024, 1, 16, 9, 30, 45), None),
    # Time zones: the pattern is read on the zone's wall clock.
    ("Paris in winter", {"pattern": "0 9 * * *", "timezone": "Europe/Paris"}, at(2024, 1, 16, 8, 0), None),
    ("New York in winter", {"pattern": "0 9 * * *", "timezone": "America/New_York"}, at(2024, 1, 15, 14, 0), None),
    ("Kolkata, half-hour offset", {"pattern": "0 18 * * *", "timezone": "Asia/Kolkata"}, at(2024, 1, 15, 12, 30), None),
]


@pytest.mark.parametrize(("params", "expected", "count"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_validate_accepts(source: CronSource, params: dict[str, Any], expected: dt.datetime, count: int | None) -> None:
    result = source.validate_subscription(params, NOW)
    assert result["next_execution_time"] == expected
    assert result["first_execution_time"] == expected
    assert result["next_execution_time"].utcoffset() == dt.timedelta(0)
    assert result["first_execution_time"].tzinfo is not None
    assert result["count"] == count
    assert result["timezone"] == params.get("timezone", "UTC")


def test_validate_keeps_other_params_and_fills_defaults(source: CronSource) -> None:
    result = source.validate_subscription({"pattern": "0 * * * *", "name": "hourly", "function_input": "{}"}, NOW)
    assert result["name"] == "hourly"
    assert result["function_input"] == "{}"
    assert result["timezone"] == "UTC"
    assert result["pattern"] == "0 * * * *"
    one_shot = source.validate_subscription({"first_execution_time": at(2024, 2, 1)}, NOW)
    assert one_shot["pattern"] is None
    assert one_shot["count"] == 1


def test_validate_accepts_naive_now(source: CronSource) -> None:
    result = source.validate_subscription({"pattern": "*/5 * * * *"}, NOW.replace(tzinfo=None))
    assert result["next_execution_time"] == at(2024, 1, 15, 12, 5)


def test_validate_paris_in_summer(source: CronSource) -> None:
    result = source.validate_subscription({"pattern": "0 9 * * *", "timezone": "Europe/Paris"}, at(2024, 7, 1, 12))
    assert result["next_execution_time"] == at(2024, 7, 2, 7, 0)


def test_is_a_source() -> None:
    assert isinstance(CronSource(config()), Source)
    assert CronSource.kind == "cron"


# ---------------------------------------------------------------------------------------------
# next_fire_time

NEXT = [
    ("every minute", "* * * * *", at(2024, 1, 1, 10, 0), "UTC", at(2024, 1, 1, 10, 1)),
    ("strictly after a match", "0 * * * *", at(2024, 1, 1, 10, 0), "UTC", at(2024, 1, 1, 11, 0)),
    ("seconds dropped for minute patterns", "* * * * *", at(2024, 1, 1, 10, 0, 59), "UTC", at(2024, 1, 1, 10, 1)),
    ("every second", "*/1 * * * * *", at(2024, 1, 1, 10, 0, 0), "UTC", at(2024, 1, 1, 10, 0, 1)),
    ("every 10 s", "*/10 * * * * *", at(2024, 1, 1, 10, 0, 5), "UTC", at(2024, 1, 1, 10, 0, 10)),
    ("microseconds", "*/1 * * * * *", dt.datetime(2024, 1, 1, 10, 0, 0, 500000, tzinfo=UTC), "UTC", at(2024, 1, 1, 10, 0, 1)),
    ("Paris winter", "0 9 * * *", at(2024, 1, 1, 10, 0), "Europe/Paris", at(2024, 1, 2, 8, 0)),
    ("Paris summer", "0 9 * * *", at(2024, 7, 1, 10, 0), "Europe/Paris", at(2024, 7, 2, 7, 0)),
    ("Paris, across spring-forward", "0 9 * * *", at(2024, 3, 30, 8, 0), "Europe/Paris", at(2024, 3, 31, 7, 0)),
    ("New York, weekday", "30 8 * * 1-5", at(2024, 1, 5, 14, 0), "America/New_York", at(2024, 1, 8, 13, 30)),
    ("naive after is UTC", "0 * * * *", dt.datetime(2024, 1, 1, 10, 30), "UTC", at(2024, 1, 1, 11, 0)),
    ("aware after in another zone", "0 * * * *", dt.datetime(2024, 1, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))), "UTC", at(2024, 1, 1, 11, 0)),
    ("@hourly", "@hourly", at(2024, 1, 1, 10, 5), "UTC", at(2024, 1, 1, 11, 0)),
]


@pytest.mark.parametrize(("pattern", "after", "zone", "expected"), [n[1:] for n in NEXT], ids=[n[0] for n in NEXT])
def test_next_fire_time(pattern: str, after: dt.datetime, zone: str, expected: dt.datetime) -> None:
    result = next_fire_time(pattern, after, zone)
    assert result == expected
    assert result.tzinfo is not None and result.utcoffset() == dt.timedelta(0)


def test_next_fire_time_default_zone_is_utc() -> None:
    assert next_fire_time("0 9 * * *", at(2024, 1, 1)) == at(2024, 1, 1, 9, 0)


@pytest.mark.parametrize(("pattern", "zone"), [("61 * * * *", "UTC"), ("* * *", "UTC"), ("* * * * *", "Nowhere/Land"), ("0 0 30 2 *", "UTC")])
def test_next_fire_time_rejects(pattern: str, zone: str) -> None:
    with pytest.raises(ValueError):
        next_fire_time(pattern, at(2024, 1, 1), zone)


def test_next_fire_time_is_monotonic_across_dst() -> None:
    # Every minute through both Paris transitions of 2024: never backwards, never a skipped minute.
    for start in (at(2024, 3, 31, 0, 0), at(2024, 10, 27, 0, 0)):
        t = start
        for _ in range(240):
            n = next_fire_time("* * * * *", t, "Europe/Paris")
            assert n - t == dt.timedelta(minutes=1)
            t = n


# ---------------------------------------------------------------------------------------------
# The scheduler loop, against a fake router


class FakeClock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class FakeContext:
    """An in-memory SourceContext: a subscription table, a record of published events, and
    advance_schedule with the router's compare-and-set and count-down."""

    def __init__(self, cfg: Config | None = None) -> None:
        self.config = cfg or config()
        self.subs: dict[str, Subscription] = {}
        self.published: list[Event] = []
        self.advances: list[tuple[str, dt.datetime, dt.datetime | None, bool]] = []
        self.callbacks: list[Callable[[], None]] = []
        self.fail_publishes = 0
        self.publish_delay = 0.0
        self.cancels: list[tuple[str, str, str, str | None]] = []  # cancel_executions calls
        self.running: dict[str, int] = {}  # subscription id → executions still running

    def add(self, sub: Subscription) -> None:
        self.subs[sub.id] = sub
        self.changed()

    def update(self, sub_id: str, **changes: Any) -> None:
        self.subs[sub_id] = dataclasses.replace(self.subs[sub_id], **changes)
        self.changed()

    def changed(self) -> None:
        for callback in self.callbacks:
            callback()

    async def publish(self, event: Event, *, expect: Sequence[str] = ()) -> dict[str, str]:
        if self.publish_delay:
            await asyncio.sleep(self.publish_delay)
        if self.fail_publishes:
            self.fail_publishes -= 1
            raise ConnectionError("bus down")
        self.published.append(event)
        return {}

    def subscriptions(self, source: str) -> Sequence[Subscription]:
        return [s for s in self.subs.values() if s.source == source]

    def subscription(self, subscription_id: str) -> Subscription | None:
        return self.subs.get(subscription_id)

    def on_subscriptions_changed(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def add_route(self, method: str, path: str, handler: Any, *, public: bool = False) -> None:
        raise AssertionError("the cron source mounts no routes")

    async def advance_schedule(self, subscription_id: str, scheduled: dt.datetime, next_time: dt.datetime | None,
                               *, fired: bool = True) -> bool:
        sub = self.subs.get(subscription_id)
        ok = sub is not None and sub.status == "running" and sub.next_execution_time == scheduled
        if ok:
            assert sub is not None
            count = sub.count
            if count is not None and fired:
                count -= 1
            if next_time is None or (count is not None and count <= 0):
                self.subs[subscription_id] = dataclasses.replace(sub, status="done", count=0 if count is not None else None)
            else:
                self.subs[subscription_id] = dataclasses.replace(sub, next_execution_time=next_time, count=count)
        self.advances.append((subscription_id, scheduled, next_time, ok))
        return ok

    async def dead_letter(self, *, source: str, reason: str, payload: Any, event_id: str | None = None,
                          project_id: str = "default") -> None:
        raise AssertionError("the cron source dead-letters nothing")

    async def active_executions(self, subscription_id: str) -> int:
        return self.running.get(subscription_id, 0)

    async def cancel_executions(self, subscription_id: str, reason: str, *, message: str = "",
                                except_event: str | None = None) -> int:
        self.cancels.append((subscription_id, reason, message, except_event))
        return self.running.pop(subscription_id, 0)

    @property
    def successful_advances(self) -> list[tuple[str, dt.datetime, dt.datetime | None, bool]]:
        return [a for a in self.advances if a[3]]


def schedule(sub_id: str = "job-1", *, pattern: str | None = "* * * * *", next_time: dt.datetime = NOW, count: int | None = None, status: str = "running", timezone: str | None = None,
             options: dict[str, Any] | None = None) -> Subscription:
    return Subscription(
        id=sub_id,
        project_id="project-a",
        source="cron",
        function_id="fn-1",
        pattern=pattern,
        first_execution_time=next_time,
        next_execution_time=next_time,
        count=count,
        status=status,
        options={**({"timezone": timezone} if timezone else {}), **(options or {})},
    )


def tick_id(sub_id: str, scheduled: dt.datetime) -> str:
    return derived_id("cron", sub_id, scheduled.isoformat())


async def spin(seconds: float = 0.05) -> None:
    """Let the scheduler run several passes (max_sleep is 0.01 s)."""
    await asyncio.sleep(seconds)


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


@pytest.fixture
async def harness():
    """(ctx, clock, started sources); every source started through it is stopped afterwards."""
    clock = FakeClock(NOW - dt.timedelta(seconds=1))
    ctx = FakeContext()
    started: list[CronSource] = []

    async def start(context: FakeContext | None = None, max_sleep: float = 0.01) -> CronSource:
        src = CronSource(config(max_sleep), clock=clock)
        await src.start(context or ctx)
        started.append(src)
        return src

    yield ctx, clock, start
    for src in started:
        await src.stop()


async def test_fires_at_the_scheduled_time_and_not_before(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule(pattern="*/5 * * * *", next_time=NOW))
    await start()
    await spin()
    assert ctx.published == []  # clock is one second short
    clock.now = NOW
    await until(lambda: len(ctx.published) == 1)
    event = ctx.published[0]
    assert event.id == tick_id("job-1", NOW)
    assert event.source == "/headwater/cron/job-1"
    assert event.type == EVENT_TYPE == "org.openstack.headwater.cron.tick"
    assert event.subject == "job-1"
    assert event.time == NOW
    assert event.data == {"subscription_id": "job-1", "scheduled_time": NOW.isoformat()}
    assert event.project_id == "project-a"
    await until(lambda: len(ctx.successful_advances) == 1)
    assert ctx.successful_advances == [("job-1", NOW, NOW + dt.timedelta(minutes=5), True)]
    assert ctx.subs["job-1"].next_execution_time == NOW + dt.timedelta(minutes=5)


async def test_fires_once_per_tick(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule(next_time=NOW))
    clock.now = NOW + dt.timedelta(seconds=30)
    await start()
    await until(lambda: len(ctx.published) == 1)
    await spin()
    assert [e.id for e in ctx.published] == [tick_id("job-1", NOW)]
    assert len(ctx.advances) == 1
    clock.now = NOW + dt.timedelta(minutes=1)
    await until(lambda: len(ctx.published) == 2)
    await spin()
    assert [e.id for e in ctx.published] == [tick_id("job-1", NOW), tick_id("job-1", NOW + dt.timedelta(minutes=1))]


async def test_count_runs_out(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule(next_time=NOW, count=2))
    await start()
    for minute in range(5):
        clock.now = NOW + dt.timedelta(minutes=minute)
        await spin(0.03)
    assert [e.time for e in ctx.published] == [NOW, NOW + dt.timedelta(minutes=1)]
    assert ctx.subs["job-1"].status == "done"
    assert ctx.subs["job-1"].count == 0


async def test_one_shot_fires_once_and_is_done(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule(pattern=None, next_time=NOW, count=1))
    clock.now = NOW + dt.timedelta(hours=1)
    await start()
    await until(lambda: ctx.subs["job-1"].status == "done")
    await spin()
    assert [e.id for e in ctx.published] == [tick_id("job-1", NOW)]
    assert ctx.advances == [("job-1", NOW, None, True)]


async def test_paused_and_finished_schedules_do_not_fire(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule("paused", next_time=NOW, status="paused"))
    ctx.add(schedule("cancelled", next_time=NOW, status="cancelled"))
    ctx.add(schedule("done", next_time=NOW, status="done"))
    ctx.add(schedule("running", next_time=NOW))
    ctx.add(dataclasses.replace(schedule("webhook", next_time=NOW), source="http"))
    clock.now = NOW + dt.timedelta(seconds=5)
    await start()
    await until(lambda: len(ctx.published) == 1)
    await spin()
    assert [e.subject for e in ctx.published] == ["running"]
    # Resuming (the router recomputes the next time from now) makes it fire again.
    ctx.update("paused", status="running", next_execution_time=NOW + dt.timedelta(minutes=1))
    clock.now = NOW + dt.timedelta(minutes=1)
    await until(lambda: any(e.subject == "paused" for e in ctx.published))


async def test_missed_ticks_are_replayed_once_each_in_order(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule(pattern="*/10 * * * *", next_time=NOW))
    # Down for 35 minutes: ticks 12:00, 12:10, 12:20, 12:30 were missed.
    clock.now = NOW + dt.timedelta(minutes=35)
    await start()
    await until(lambda: len(ctx.published) == 4)
    await spin()
    expected = [NOW + dt.timedelta(minutes=m) for m in (0, 10, 20, 30)]
    assert [e.time for e in ctx.published] == expected
    assert [e.id for e in ctx.published] == [tick_id("job-1", t) for t in expected]
    assert ctx.subs["job-1"].next_execution_time == NOW + dt.timedelta(minutes=40)
    assert all(a[3] for a in ctx.advances) and len(ctx.advances) == 4


async def test_seconds_pattern_and_timezone_in_the_loop(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule("every-second", pattern="*/1 * * * * *", next_time=NOW))
    ctx.add(schedule("paris", pattern="0 9 * * *", next_time=at(2024, 1, 15, 8, 0), timezone="Europe/Paris"))
    clock.now = NOW + dt.timedelta(seconds=2)
    await start()
    await until(lambda: len(ctx.published) == 4)
    await spin()
    by_sub = {}
    for e in ctx.published:
        by_sub.setdefault(e.subject, []).append(e.time)
    assert by_sub["every-second"] == [NOW + dt.timedelta(seconds=s) for s in (0, 1, 2)]
    assert by_sub["paris"] == [at(2024, 1, 15, 8, 0)]
    # The next Paris tick is computed on Paris wall-clock time: 09:00 CET = 08:00Z.
    assert ctx.subs["paris"].next_execution_time == at(2024, 1, 16, 8, 0)


async def test_two_replicas_publish_the_same_ids_and_advance_once(harness) -> None:
    ctx, clock, start = harness
    # A slow publish lets both replicas see the tick as due at once: the race the CAS settles.
    ctx.publish_delay = 0.01
    ctx.add(schedule(pattern="*/5 * * * *", next_time=NOW))
    clock.now = NOW
    await start()
    await start()
    await until(lambda: len(ctx.successful_advances) == 1)
    await spin()
    assert {e.id for e in ctx.published} == {tick_id("job-1", NOW)}
    assert len(ctx.successful_advances) == 1
    # Both replicas did publish and try to advance; the loser's compare-and-set came back False.
    assert len(ctx.published) == 2
    assert [a[3] for a in ctx.advances] == [True, False]
    clock.now = NOW + dt.timedelta(minutes=5)
    await until(lambda: len(ctx.successful_advances) == 2)
    await spin()
    assert {e.id for e in ctx.published} == {tick_id("job-1", NOW), tick_id("job-1", NOW + dt.timedelta(minutes=5))}
    assert [a[1] for a in ctx.successful_advances] == [NOW, NOW + dt.timedelta(minutes=5)]


async def test_replicas_with_their_own_view_and_a_restart_agree_on_ids(harness) -> None:
    _, clock, start = harness
    first, second = FakeContext(), FakeContext()
    for ctx in (first, second):
        ctx.add(schedule(pattern="0 * * * *", next_time=NOW))
    clock.now = NOW + dt.timedelta(hours=2)
    replica = await start(first)
    await start(second)
    await until(lambda: len(first.published) == 3 and len(second.published) == 3)
    assert [e.id for e in first.published] == [e.id for e in second.published]
    # A restart replays from the stored state and derives the same id again.
    await replica.stop()
    first.update("job-1", next_execution_time=NOW)
    before = [e.id for e in first.published]
    await start(first)
    await until(lambda: len(first.published) == 6)
    assert [e.id for e in first.published[3:]] == before


async def test_publish_failure_does_not_advance_and_is_retried(harness, caplog) -> None:
    ctx, clock, start = harness
    ctx.fail_publishes = 2
    ctx.add(schedule(next_time=NOW))
    clock.now = NOW
    with caplog.at_level(logging.INFO, logger="sources.cron"):
        await start()
        await until(lambda: ctx.fail_publishes == 0)
        assert ctx.advances == []  # nothing advanced while the bus refused
        await until(lambda: len(ctx.published) == 1)
        await until(lambda: len(ctx.advances) == 1)
    await spin()
    assert [e.id for e in ctx.published] == [tick_id("job-1", NOW)]
    assert ctx.advances == [("job-1", NOW, NOW + dt.timedelta(minutes=1), True)]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert all(r.event_id == tick_id("job-1", NOW) for r in failures)
    fired = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [(r.event_id, r.subscription_id) for r in fired] == [(tick_id("job-1", NOW), "job-1")]


async def test_sleeps_until_the_earliest_tick_not_max_sleep(harness) -> None:
    ctx, clock, start = harness
    clock.now = NOW
    ctx.add(schedule(pattern=None, next_time=NOW + dt.timedelta(seconds=0.05), count=1))
    await start(max_sleep=60)
    await spin(0.01)
    assert ctx.published == []
    clock.advance(0.05)  # the scheduler's ~0.05 s real sleep ends and it finds the tick due
    await until(lambda: len(ctx.published) == 1, timeout=0.5)


async def test_subscription_change_wakes_the_scheduler(harness) -> None:
    ctx, clock, start = harness
    clock.now = NOW
    await start(max_sleep=60)  # an empty table: it would sleep a whole minute
    await spin(0.01)
    ctx.add(schedule(next_time=NOW))
    await until(lambda: len(ctx.published) == 1, timeout=0.5)


async def test_stop_is_clean_and_idempotent(harness) -> None:
    ctx, clock, start = harness
    src = await start(max_sleep=60)
    task = src._task
    assert task is not None and not task.done()
    await src.stop()
    assert task.cancelled()
    await src.stop()
    ctx.changed()  # a late notification after stop is harmless
    ctx.add(schedule(next_time=NOW))
    clock.now = NOW
    await spin(0.02)
    assert ctx.published == []


# ---------------------------------------------------------------------------------------------
# DST, catch-up, overlap and jitter (cron done right)

PARIS = "Europe/Paris"


def _fires(pattern: str, start: dt.datetime, n: int, zone: str = PARIS) -> list[dt.datetime]:
    out, t = [], start
    for _ in range(n):
        t = next_fire_time(pattern, t, zone)
        out.append(t)
    return out


def test_daily_0230_fires_once_on_the_autumn_change() -> None:
    # 2024-10-27: Paris clocks go back 03:00 CEST → 02:00 CET, so 02:30 happens twice.
    fires = _fires("30 2 * * *", dt.datetime(2024, 10, 25, 12, 0, tzinfo=UTC), 4)
    local = [f.astimezone(ZoneInfo(PARIS)).strftime("%m-%d %H:%M%z") for f in fires]
    assert local == ["10-26 02:30+0200", "10-27 02:30+0200", "10-28 02:30+0100", "10-29 02:30+0100"]


def test_daily_0230_is_not_skipped_in_spring() -> None:
    # 2024-03-31: Paris clocks jump 02:00 CET → 03:00 CEST; 02:30 does not exist that night.
    fires = _fires("30 2 * * *", dt.datetime(2024, 3, 29, 12, 0, tzinfo=UTC), 3)
    days = [f.astimezone(ZoneInfo(PARIS)).date().isoformat() for f in fires]
    assert days == ["2024-03-30", "2024-03-31", "2024-04-01"], "one run every day, the spring day included"
    assert fires[1] == dt.datetime(2024, 3, 31, 1, 0, tzinfo=UTC), "the spring run happens at the first instant after the gap"


def test_wildcard_hour_jobs_run_through_both_autumn_hours() -> None:
    # Every 30 minutes is about elapsed time: the repeated hour has real instants to fire at.
    fires = _fires("*/30 * * * *", dt.datetime(2024, 10, 27, 0, 15, tzinfo=UTC), 4)
    assert fires == [dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC), dt.datetime(2024, 10, 27, 1, 0, tzinfo=UTC),
                     dt.datetime(2024, 10, 27, 1, 30, tzinfo=UTC), dt.datetime(2024, 10, 27, 2, 0, tzinfo=UTC)]


def test_fixed_hour_seconds_pattern_also_fires_once_in_autumn() -> None:
    fires = _fires("0 30 2 * * *", dt.datetime(2024, 10, 26, 12, 0, tzinfo=UTC), 2)
    assert fires[1] - fires[0] == dt.timedelta(hours=25), "the 25-hour day has one 02:30 run"


async def test_daily_job_in_the_loop_across_the_autumn_change(harness) -> None:
    ctx, clock, start = harness
    first = next_fire_time("30 2 * * *", dt.datetime(2024, 10, 26, 12, 0, tzinfo=UTC), PARIS)
    clock.now = first - dt.timedelta(seconds=1)
    ctx.add(schedule(pattern="30 2 * * *", next_time=first, timezone=PARIS))
    await start()
    for hours in (0, 1, 2):  # walk through the repeated hour
        clock.now = first + dt.timedelta(hours=hours, seconds=1)
        await spin()
    assert len(ctx.published) == 1
    assert ctx.subs["job-1"].next_execution_time == dt.datetime(2024, 10, 28, 1, 30, tzinfo=UTC)


@pytest.mark.parametrize("policy, limit, expected_fired", [
    ("all", None, 11),   # every missed tick once, in order, plus the current one
    ("all", 3, 3),      # bounded: only the newest three
    ("one", None, 1),   # the latest overdue tick only
    ("skip", None, 0),  # nothing overdue; resume with the next future tick
])
async def test_catch_up_policies_after_downtime(harness, policy, limit, expected_fired) -> None:
    ctx, clock, start = harness
    options = {"catchup": policy, **({"catchup_limit": limit} if limit else {})}
    ctx.add(dataclasses.replace(schedule(pattern="* * * * *", next_time=NOW, count=50), options=options))
    clock.now = NOW + dt.timedelta(minutes=10, seconds=30)  # down for ten and a half minutes
    await start()
    await spin(0.2)
    scheduled = [e.time for e in ctx.published]
    assert len(scheduled) == expected_fired, scheduled
    assert scheduled == sorted(scheduled)
    if expected_fired:
        assert scheduled[-1] == NOW + dt.timedelta(minutes=10), "the newest overdue tick is among those fired"
    sub = ctx.subs["job-1"]
    assert sub.next_execution_time == NOW + dt.timedelta(minutes=11), "the schedule resumes with the next future tick"
    assert sub.count == 50 - expected_fired, "skipped ticks do not use up the count"


async def test_overlap_forbid_skips_a_tick_while_the_previous_run_runs(harness) -> None:
    ctx, clock, start = harness
    ctx.running = {"job-1": 1}
    ctx.add(schedule(options={"overlap": "forbid"}))
    await start()
    clock.now = NOW + dt.timedelta(seconds=1)
    await spin()
    assert ctx.published == [] and ctx.subs["job-1"].next_execution_time == NOW + dt.timedelta(minutes=1)
    ctx.running = {}
    clock.now = NOW + dt.timedelta(minutes=1, seconds=1)
    await spin()
    assert [e.time for e in ctx.published] == [NOW + dt.timedelta(minutes=1)]


async def test_overlap_allow_is_the_default(harness) -> None:
    ctx, clock, start = harness
    ctx.running = {"job-1": 3}
    ctx.add(schedule(pattern="* * * * *", next_time=NOW))
    await start()
    clock.now = NOW + dt.timedelta(seconds=1)
    await spin()
    assert len(ctx.published) == 1


async def test_jitter_is_stable_and_delays_within_the_bound(harness) -> None:
    ctx, clock, start = harness
    sub = schedule(options={"jitter": 30})
    ctx.add(sub)
    from sources.cron import _jitter
    offset = _jitter(sub, NOW)
    assert offset == _jitter(sub, NOW), "every replica computes the same delay for a tick"
    assert dt.timedelta(0) <= offset < dt.timedelta(seconds=30)
    other = [_jitter(dataclasses.replace(sub, id=f"j{i}"), NOW) for i in range(20)]
    assert len(set(other)) > 10, "schedules are spread, not bunched"
    await start()
    clock.now = NOW + offset - dt.timedelta(milliseconds=100)
    await spin()
    assert ctx.published == []
    clock.now = NOW + offset + dt.timedelta(milliseconds=100)
    await spin()
    assert len(ctx.published) == 1 and ctx.published[0].id == tick_id("job-1", NOW), "the tick id ignores jitter"


async def test_a_restart_after_firing_does_not_fire_the_tick_again(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule(pattern="* * * * *", next_time=NOW))
    first = await start()
    clock.now = NOW + dt.timedelta(seconds=1)
    await until(lambda: len(ctx.published) == 1)
    await first.stop()
    await start()  # a new process: only the table carries state
    await spin()
    assert len(ctx.published) == 1


@pytest.mark.parametrize("params, message", [
    ({"pattern": "* * * * *", "catchup": "most"}, "catchup must be one of all, one, skip"),
    ({"pattern": "* * * * *", "catchup_limit": 0}, "catchup_limit must be an integer"),
    ({"pattern": "* * * * *", "overlap": "replace-ish"}, "overlap must be one of allow, forbid, replace, not 'replace-ish'"),
    ({"pattern": "* * * * *", "options": {"overlap": "REPLACE"}}, "overlap must be one of allow, forbid, replace"),
    ({"pattern": "* * * * *", "jitter": -1}, "jitter must be a number of seconds"),
    ({"pattern": "* * * * *", "options": {"jitter": "soon"}}, "jitter must be a number of seconds"),
    ({"pattern": "* * * * *", "options": []}, "options must be an object"),
])
def test_policy_validation(source: CronSource, params: dict[str, Any], message: str) -> None:
    with pytest.raises(SubscriptionInvalid, match=re.escape(message)):
        source.validate_subscription(params, NOW)


def test_policies_are_returned_normalised(source: CronSource) -> None:
    out = source.validate_subscription({"pattern": "* * * * *", "catchup": "one", "options": {"overlap": "forbid", "jitter": 5}}, NOW)
    assert out["options"] == {"catchup": "one", "overlap": "forbid", "jitter": 5}


@pytest.mark.parametrize("params", [{"overlap": "replace"}, {"options": {"overlap": "replace"}}])
def test_overlap_replace_is_accepted_top_level_or_in_options(source: CronSource, params: dict[str, Any]) -> None:
    out = source.validate_subscription({"pattern": "* * * * *", **params}, NOW)
    assert out["options"] == {"overlap": "replace"}


async def test_overlap_replace_with_nothing_running_just_fires(harness) -> None:
    ctx, clock, start = harness
    ctx.add(schedule(options={"overlap": "replace"}))
    await start()
    clock.now = NOW + dt.timedelta(seconds=1)
    await until(lambda: len(ctx.published) == 1)
    await spin()
    assert [e.id for e in ctx.published] == [tick_id("job-1", NOW)]
    assert ctx.subs["job-1"].next_execution_time == NOW + dt.timedelta(minutes=1)
    assert [c[3] for c in ctx.cancels] == [tick_id("job-1", NOW)], "asked once, sparing the tick's own run"


async def test_overlap_replace_cancels_the_previous_run_and_fires_the_tick(harness) -> None:
    ctx, clock, start = harness
    ctx.running = {"job-1": 1}
    ctx.add(schedule(options={"overlap": "replace"}))
    await start()
    clock.now = NOW + dt.timedelta(seconds=1)
    await until(lambda: len(ctx.cancels) == 1)
    assert [e.id for e in ctx.published] == [tick_id("job-1", NOW)], "the tick is not skipped"
    ((sub_id, reason, message, spared),) = ctx.cancels
    assert (sub_id, reason, spared) == ("job-1", "replaced", tick_id("job-1", NOW))
    assert "replaced" in message and "overlap=replace" in message
    assert ctx.running == {}


async def test_overlap_replace_cancels_nothing_for_a_tick_another_replica_advanced(harness) -> None:
    ctx, clock, start = harness
    ctx.running = {"job-1": 1}
    ctx.add(schedule(options={"overlap": "replace"}))

    class LosingRace(FakeContext):
        async def advance_schedule(self, *args: Any, **kwargs: Any) -> bool:
            return False  # another replica moved the schedule on first: it does the replacing

    other = LosingRace()
    other.subs, other.running = ctx.subs, ctx.running
    await start(other)
    clock.now = NOW + dt.timedelta(seconds=1)
    await until(lambda: len(other.published) >= 1)
    await spin()
    assert other.cancels == [] and ctx.running == {"job-1": 1}


async def test_overlap_replace_catching_up_cancels_once_with_the_newest_tick(harness) -> None:
    ctx, clock, start = harness
    ctx.running = {"job-1": 1}
    ctx.add(schedule(options={"overlap": "replace"}))
    clock.now = NOW + dt.timedelta(minutes=3, seconds=1)  # down for three minutes: four ticks due
    await start()
    await until(lambda: len(ctx.published) == 4)
    await spin()
    assert [c[3] for c in ctx.cancels] == [tick_id("job-1", NOW + dt.timedelta(minutes=3))]


# ---------------------------------------------------------------------------------------------
# overlap=replace through the whole router: local engine, python3 runtime, SQLite, memory bus

LONG_FIRST_RUN = """
import os, time

def main(path):
    if os.path.exists(path):
        return "quick"
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(3600)  # past the function timeout (300 s) and the test's: only a cancel ends it in time
    return "slow"
"""


class Router:
    """A whole Headwater on a controllable clock, with one cron subscription of LONG_FIRST_RUN."""

    def __init__(self, app: Any, client: Any, clock: FakeClock, sub_id: str, marker: str, first_tick: dt.datetime):
        self.app, self.client, self.clock = app, client, clock
        self.sub_id, self.marker, self.first_tick = sub_id, marker, first_tick

    async def executions(self) -> list[Any]:
        rows = await self.app.store.executions.list(filters={"subscription_id": self.sub_id})
        return sorted(rows, key=lambda r: r.created_at)

    async def eventually(self, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await condition()
            if found:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"not reached in {timeout}s: {[(r.status, r.reason) for r in await self.executions()]}")

    async def first_run_started(self) -> tuple[Any, int]:
        """Fire the first tick and wait until its function runs; returns (execution, its process id)."""
        self.clock.now = self.first_tick + dt.timedelta(seconds=1)

        async def pid() -> int | None:
            return int(open(self.marker).read()) if os.path.exists(self.marker) else None
        process = await self.eventually(pid)
        (first,) = await self.executions()
        assert first.status == "running" and not process_gone(process)
        return first, process

    async def finished(self, execution_id: str) -> Any:
        async def row() -> Any:
            found = await self.app.store.executions.find(execution_id)
            return found if found.status != "running" else None
        return await self.eventually(row)


async def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not process_gone(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # not time.sleep: the router under test runs on this loop
    return process_gone(pid)


@pytest.fixture
async def router(tmp_path):
    from aiohttp import FormData
    from aiohttp.test_utils import TestClient, TestServer

    from router.app import Headwater

    clock = FakeClock(NOW)
    cfg = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"backend": "local"},
                                 "cron": {"max_sleep": 0.05}})
    app = Headwater(cfg)
    app.sources["cron"] = CronSource(cfg, clock=clock)
    await app.start()
    client = TestClient(TestServer(app.web))
    await client.start_server()
    try:
        marker = pid_path()  # written by the first run's function, which may run as a sandbox uid
        runtime = await (await client.post("/v1/runtimes", json={"image": "python3"})).json()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("f.py", LONG_FIRST_RUN)
        form = FormData()
        for name, value in (("runtime_id", runtime["id"]), ("code", json.dumps({"source": "package"})),
                            ("entry", "f.main"), ("timeout", "300")):
            form.add_field(name, value)
        form.add_field("package", buf.getvalue(), filename="f.zip")
        function_id = (await (await client.post("/v1/functions", data=form)).json())["id"]
        # retry_on includes `failed`: a replaced run must stay replaced all the same.
        resp = await client.post("/v1/subscriptions", json={
            "source": "cron", "pattern": "* * * * *", "function_id": function_id, "input": json.dumps({"path": marker}),
            "options": {"overlap": "replace", "delivery": {"retry_on": ["failed", "error", "timeout"], "backoff_initial": 0.05}}})
        assert resp.status == 201, await resp.text()
        sub_id = (await resp.json())["id"]
        first_tick = (await app.store.subscriptions.find(sub_id)).next_execution_time
        yield Router(app, client, clock, sub_id, marker, first_tick.replace(tzinfo=first_tick.tzinfo or UTC))
    finally:
        await client.close()
        await app.stop()


async def test_overlap_replace_kills_the_long_first_run_and_the_next_tick_runs(router: Router) -> None:
    app = router.app
    first, pid = await router.first_run_started()
    router.clock.now = router.first_tick + dt.timedelta(minutes=1, seconds=1)  # the next tick; the first still runs
    first = await router.finished(first.id)  # recorded at the cancel: the run itself would take an hour
    assert (first.status, first.reason) == ("failed", "replaced")
    assert "replaced this run" in first.result["output"] and "overlap=replace" in first.logs

    async def second_done() -> list[Any] | None:
        rows = await router.executions()
        return rows if len(rows) == 2 and rows[1].status != "running" else None
    rows = await router.eventually(second_done)
    assert (rows[1].status, rows[1].result["output"]) == ("success", "quick")
    assert await gone_within(pid, 60), "the replaced run's process is still running"

    await asyncio.sleep(0.5)  # quiet period: a retry (backoff 0.05 s) would have run again by now
    first = await app.store.executions.find(first.id)
    assert (first.status, first.reason, first.attempts) == ("failed", "replaced", 1)
    assert [d for d in await app.store.dead_letters.list() if d.subscription_id == router.sub_id] == []


async def test_a_run_on_another_replica_stops_when_its_record_is_cancelled(router: Router) -> None:
    from router.executions import ExecutionService
    from router.metrics import Metrics

    app = router.app
    first, pid = await router.first_run_started()
    # Another replica fired the next tick: it shares only the store, not this replica's engine calls.
    other = ExecutionService(app.config, app.store, app.engine, Metrics())
    stopped = await other.cancel_for_subscription(router.sub_id, "replaced", message="Cancelled: replaced elsewhere.",
                                                  except_event="the-new-tick")
    assert stopped == 1
    assert await gone_within(pid, 60), "this replica did not notice the cancel"
    first = await router.finished(first.id)
    assert (first.status, first.reason, first.result["output"]) == ("failed", "replaced", "Cancelled: replaced elsewhere.")
    await asyncio.sleep(0.5)  # quiet period: a retry would have run by now
    assert (await app.store.executions.find(first.id)).status == "failed", "not retried"
    assert await other.cancel_for_subscription(router.sub_id, "replaced") == 0, "nothing left to cancel"
