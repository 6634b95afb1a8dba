"""No head-of-line blocking: events held back by one subscription's limits wait on that
subscription's parking topic, never in the delivery slots other subscriptions' events need."""

from __future__ import annotations

import asyncio
import datetime as _dt

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from router.dispatch import parked_topic
from router.events import Event, execution_id_for
from router.limits import Clock, Limiter
from router.plugins import ExecutionRequest, ExecutionResult
from tests.buses import BUSES, bus_settings
from tests.unit.test_router_flow import make_function

BACKLOG = 1000
WAIT = 60.0  # only a guard against hanging: every wait below ends when its condition holds


class ManualClock(Clock):
    """Time that moves only when the test says so: a rate limit of 1/s without waiting seconds."""

    def __init__(self) -> None:
        self.t = 0.0
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, future))
        await future

    def advance(self, seconds: float) -> None:
        self.t += seconds
        due = [(at, f) for at, f in self._sleepers if at <= self.t + 1e-9]
        self._sleepers = [(at, f) for at, f in self._sleepers if at > self.t + 1e-9]
        for _, future in due:
            if not future.done():
                future.set_result(None)


class OrderEngine:
    """Succeeds at once and remembers in which order executions finished."""

    name = "order"

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.changed = asyncio.Event()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        self.finished.append(request.execution_id)
        self.changed.set()
        return ExecutionResult(status="success", output="ok")

    async def release(self, function_id, version=None) -> None:
        pass

    async def workers(self, function_id, version=0) -> list[str]:
        return []

    async def wait_for(self, predicate) -> None:
        async def until() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), WAIT)


@pytest.fixture(params=BUSES)
async def app(request, tmp_path):
    # The defaults (the sqlite bus, the default prefetch) or another bus; only the clock and the
    # engine are the test's.
    bus, cleanup = bus_settings(request.param)
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"backend": "null"}, "bus": bus})
    hw = Headwater(config)
    hw.clock = ManualClock()
    hw.executions.limits = Limiter(hw.clock)
    hw.engine = hw.executions.engine = OrderEngine()
    await hw.start()
    hw.client = TestClient(TestServer(hw.web))
    await hw.client.start_server()
    yield hw
    await hw.client.close()
    await hw.stop()
    if cleanup is not None:
        await cleanup(hw.bus)


async def subscribe(hw, function_id: str, event_type: str, **options) -> str:
    resp = await hw.client.post("/v1/subscriptions", json={"source": "http", "types": [event_type],
                                                           "function_id": function_id, **options})
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


def event(event_id: str, event_type: str) -> Event:
    return Event(id=event_id, source="/hol", type=event_type, time=_dt.datetime.now(_dt.timezone.utc),
                 extensions={"sourcekind": "http"})


@pytest.mark.parametrize("ordered", [False, True])
async def test_a_backlog_behind_a_rate_limit_does_not_delay_another_subscription(app, ordered):
    assert app.config.bus.prefetch == 256  # the default
    function_id = await make_function(app)
    limits = {"rate": {"count": 1, "per": "second"}, **({"ordered": True} if ordered else {})}
    limited = await subscribe(app, function_id, "com.example.slow", limits=limits)
    other = await subscribe(app, function_id, "com.example.fast")
    backlog = [event(f"slow-{i}", "com.example.slow") for i in range(BACKLOG)]
    if ordered:  # one source publishing in order (concurrent publishes have no order to keep)
        for e in backlog:
            await app.bus.publish(e)
    else:
        for start in range(0, BACKLOG, 100):
            await asyncio.gather(*(app.bus.publish(e) for e in backlog[start:start + 100]))
    await app.bus.publish(event("fast", "com.example.fast"))  # published after all of them

    engine: OrderEngine = app.engine
    slow_ids = [execution_id_for(e.source, e.id, limited) for e in backlog]
    fast_id = execution_id_for("/hol", "fast", other)
    slow_done = lambda: [x for x in engine.finished if x in set(slow_ids)]  # noqa: E731

    # The clock stands still: the limited subscription runs its burst of one and then waits.
    await engine.wait_for(lambda: fast_id in engine.finished)
    assert len(slow_done()) <= 1
    for n in (2, 3):  # one second per token
        app.clock.advance(1.0)
        await engine.wait_for(lambda: len(slow_done()) >= n)
    order = engine.finished
    third = order.index(slow_done()[2])
    assert order.index(fast_id) < third, order[:5]
    if ordered:
        assert slow_done()[:3] == slow_ids[:3], [slow_ids.index(x) for x in slow_done()]  # parked in arrival order, run in that order
    if app.bus.name == "sqlite":  # its depth counts what is held as well as what waits
        # The rest of the backlog waits on the subscription's own topic (queued, or held by its
        # consumer), not on the shared one, which empties while the clock stands still.
        async def shared_topic_drained() -> None:
            while app.bus.depth("events", "router"):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(shared_topic_drained(), WAIT)
        assert app.bus.depth(parked_topic(limited), "router") >= BACKLOG - 3  # (acks of the three may lag)


async def test_a_retry_of_a_limited_subscription_is_parked_too(app):
    function_id = await make_function(app)
    limited = await subscribe(app, function_id, "com.example.slow", limits={"max_concurrency": 1})
    sub = app.index.get(limited)
    await app.dispatcher._run_or_park(event("r1", "com.example.slow"), sub, attempt=2, last_status="error")
    assert app.metrics.parked._value.get() == 1
