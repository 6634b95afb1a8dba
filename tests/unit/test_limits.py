"""Per-subscription limits: concurrency ceiling, rate with no event lost, ordering by key."""

import asyncio

import pytest

from router.events import Event
from router.limits import Clock, LimitError, Limiter, validate_limits
from router.plugins import Subscription


def sub(limits):
    return Subscription(id="s1", project_id="p", source="http", options={"limits": validate_limits(limits)})


def event(i, key=None):
    return Event(id=f"e{i}", source="/t", type="t", extensions={"partitionkey": key} if key else {})


async def test_concurrency_ceiling_is_never_exceeded():
    limiter, s = Limiter(), sub({"max_concurrency": 2})
    running, peak = 0, 0

    async def work(i):
        nonlocal running, peak
        async with limiter.admit(s, event(i)):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1

    await asyncio.gather(*(work(i) for i in range(12)))
    assert peak == 2 and limiter.stats("s1")["peak"] == 2


class SteppedClock(Clock):
    """A clock that moves only when the limiter sleeps: admission times follow from the schedule
    alone, however loaded the machine is."""

    def __init__(self) -> None:
        self.time = 100.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.time += seconds
        await asyncio.sleep(0)


async def test_rate_spreads_events_and_loses_none():
    clock = SteppedClock()
    limiter, s = Limiter(clock), sub({"rate": {"count": 20, "per": "second"}})
    done = []

    async def work(i):
        async with limiter.admit(s, event(i)):
            done.append((i, clock.time - 100.0))

    await asyncio.gather(*(work(i) for i in range(21)))
    assert sorted(i for i, _ in done) == list(range(21)), "every event admitted"
    # One at once (a burst of one), then one every 1/20 s: 21 events take a second, evenly spread.
    assert [round(t, 6) for _, t in done] == [round(n / 20, 6) for n in range(21)]


async def test_same_key_in_order_different_keys_in_parallel():
    limiter, s = Limiter(), sub({"ordered": True})
    log = []

    async def work(i, key, delay):
        async with limiter.admit(s, event(i, key)):
            log.append(("start", key, i))
            await asyncio.sleep(delay)
            log.append(("end", key, i))

    tasks = [asyncio.create_task(work(i, "a", 0.05)) for i in range(3)]
    tasks += [asyncio.create_task(work(10 + i, "b", 0.05)) for i in range(3)]
    await asyncio.gather(*tasks)
    for key in ("a", "b"):
        events = [(kind, i) for kind, k, i in log if k == key]
        ids = sorted({i for _, i in events})
        assert events == [x for i in ids for x in (("start", i), ("end", i))], "one at a time, in arrival order"
    # Side by side: key b's first run starts while key a's first run is still running.
    assert log.index(("start", "b", 10)) < log.index(("end", "a", 0)), log


async def test_unlimited_subscriptions_pass_straight_through():
    limiter = Limiter()
    plain = Subscription(id="s2", project_id="p", source="http")
    async with limiter.admit(plain, event(1)):
        pass
    assert limiter.stats("s2") == {"running": 0, "peak": 0}


@pytest.mark.parametrize("spec, fault", [
    ([], "limits must be an object"),
    ({"burst": 3}, "unknown key"),
    ({"max_concurrency": 0}, "max_concurrency must be an integer"),
    ({"max_concurrency": True}, "max_concurrency must be an integer"),
    ({"rate": 5}, "limits.rate must look like"),
    ({"rate": {"count": 0}}, "rate.count must be a positive number"),
    ({"rate": {"count": 1, "per": "fortnight"}}, "rate.per must be one of"),
    ({"ordered": "yes"}, "ordered must be true or false"),
])
def test_invalid_limits_name_the_fault(spec, fault):
    with pytest.raises(LimitError, match=fault):
        validate_limits(spec)


async def test_shared_limits_hold_across_replicas():
    """Three limiters (three replicas) sharing one coordination: max_concurrency 2 across all of
    them, and the rate's slots come from one schedule (each replica alone would allow the full rate)."""
    from engine.coordination import MemoryCoordinator, MemoryState

    state = MemoryState()
    limiters = [Limiter(shared=MemoryCoordinator(f"r{n}", state)) for n in range(3)]
    s = sub({"max_concurrency": 2})
    running, peak = 0, 0

    async def work(limiter, i):
        nonlocal running, peak
        async with limiter.admit(s, event(i)):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(work(limiters[i % 3], i) for i in range(18)))
    assert peak == 2
    assert sum(limiter.stats("s1")["peak"] for limiter in limiters) > 2  # each replica alone ran 2 at times


async def test_a_shared_rate_hands_out_one_schedule_to_every_replica():
    from engine.coordination import MemoryCoordinator, MemoryState

    class RecordingClock(Clock):
        def __init__(self):
            self.sleeps = []

        async def sleep(self, seconds):
            self.sleeps.append(seconds)

    state, clock = MemoryState(), RecordingClock()
    limiters = [Limiter(clock, shared=MemoryCoordinator(f"r{n}", state)) for n in range(3)]
    s = sub({"rate": {"count": 1, "per": "hour"}})  # one slot an hour: the test's own run time is noise
    for i in range(6):
        async with limiters[i % 3].admit(s, event(i)):
            pass
    # The first runs at once; each next one waits one more hour, whichever replica takes it.
    assert [round(x / 3600) for x in clock.sleeps] == [1, 2, 3, 4, 5]
