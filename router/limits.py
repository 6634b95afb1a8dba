"""Per-subscription flow control: a ceiling on concurrent executions, a rate (token bucket), and
optional ordering by partition key; across replicas when given the shared Coordination. Over-limit
events wait their turn — none is dropped. They wait on the subscription's own parking topic of the
bus (see router.dispatch), so one subscription's backlog never holds the delivery slots other
subscriptions' events need."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from router.events import Event
from router.plugins import Coordination, Subscription

log = logging.getLogger(__name__)

RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


class LimitError(ValueError):
    """A limits specification that cannot be used; the message names the fault."""


def validate_limits(spec: Any) -> dict[str, Any]:
    """`{"max_concurrency": 2, "rate": {"count": 10, "per": "second"}, "ordered": true}`; every key
    optional. Returns the normalised spec."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise LimitError("limits must be an object with max_concurrency, rate and ordered")
    unknown = set(spec) - {"max_concurrency", "rate", "ordered"}
    if unknown:
        raise LimitError(f"limits: unknown key(s) {', '.join(sorted(unknown))}; known: max_concurrency, rate, ordered")
    out: dict[str, Any] = {}
    if spec.get("max_concurrency") is not None:
        value = spec["max_concurrency"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
            raise LimitError("limits.max_concurrency must be an integer from 1 to 10000")
        out["max_concurrency"] = value
    if spec.get("rate") is not None:
        rate = spec["rate"]
        if not isinstance(rate, dict) or set(rate) - {"count", "per"}:
            raise LimitError('limits.rate must look like {"count": 10, "per": "second"}')
        count, per = rate.get("count"), rate.get("per", "second")
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count <= 0:
            raise LimitError("limits.rate.count must be a positive number")
        if per not in RATE_UNITS:
            raise LimitError(f"limits.rate.per must be one of {', '.join(RATE_UNITS)}")
        out["rate"] = {"count": count, "per": per}
    if spec.get("ordered") is not None:
        if not isinstance(spec["ordered"], bool):
            raise LimitError("limits.ordered must be true or false")
        out["ordered"] = spec["ordered"]
    return out


class Clock:
    """What the rate limits measure time with (tests inject one they advance by hand)."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _TokenBucket:
    """`rate` events per second on average, bursts of at most `burst`; waiters are served in
    arrival order."""

    def __init__(self, rate: float, burst: float, clock: Clock):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.updated = clock.now()
        self.lock = asyncio.Lock()  # FIFO: asyncio.Lock wakes waiters in order

    async def take(self) -> None:
        async with self.lock:
            while True:
                now = self.clock.now()
                self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                # A hair under one token after sleeping exactly the deficit is float rounding: a
                # strict check would sleep again for a time too small to move the clock.
                if self.tokens >= 1 - 1e-9:
                    self.tokens = max(0.0, self.tokens - 1)
                    return
                await self.clock.sleep((1 - self.tokens) / self.rate)


class _KeyedSequencer:
    """Runs same-key work one at a time in arrival order; different keys run in parallel."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        previous = self._tails.get(key)
        mine = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        try:
            if previous is not None:
                await asyncio.shield(previous)
            yield
        finally:
            mine.set_result(None)
            if self._tails.get(key) is mine:
                del self._tails[key]


class _SubscriptionGate:
    def __init__(self, spec: dict[str, Any], clock: Clock):
        self.spec = spec
        concurrency = spec.get("max_concurrency")
        self.semaphore = asyncio.Semaphore(concurrency) if concurrency else None
        rate = spec.get("rate")
        if rate:
            per_second = rate["count"] / RATE_UNITS[rate["per"]]
            # A burst of one: events are spread evenly, not let through in clumps.
            self.bucket: _TokenBucket | None = _TokenBucket(per_second, 1.0, clock)
            self.interval = 1.0 / per_second
        else:
            self.bucket = None
        # Shared rates: this process asks for one reservation at a time, in arrival order.
        self.reserving = asyncio.Lock()
        self.sequencer = _KeyedSequencer() if spec.get("ordered") else None
        self.running = 0
        self.peak = 0


class Limiter:
    """Holds one gate per limited subscription; unlimited subscriptions pass straight through.

    With `shared` (the replicas' Coordination, e.g. etcd) max_concurrency and rate hold across every
    replica: a run holds a shared permit besides this process's slot, and rate slots are reserved
    from one shared schedule. Ordering across replicas comes from the dispatcher: one replica at a
    time consumes an ordered subscription's parking topic. Without it, limits are per process."""

    def __init__(self, clock: Clock | None = None, shared: Coordination | None = None) -> None:
        self._gates: dict[str, _SubscriptionGate] = {}
        self.clock = clock or Clock()
        self.shared = shared

    def _gate(self, sub: Subscription) -> _SubscriptionGate | None:
        spec = (sub.options or {}).get("limits")
        if not spec:
            self._gates.pop(sub.id, None)
            return None
        gate = self._gates.get(sub.id)
        if gate is None or gate.spec != spec:  # new, or its limits were changed
            gate = self._gates[sub.id] = _SubscriptionGate(spec, self.clock)
        return gate

    def limited(self, sub: Subscription) -> bool:
        """Whether the subscription has limits at all (most have none: they skip admit())."""
        return bool(sub.options and sub.options.get("limits")) or sub.id in self._gates

    def stats(self, subscription_id: str) -> dict[str, int]:
        gate = self._gates.get(subscription_id)
        return {"running": gate.running, "peak": gate.peak} if gate else {"running": 0, "peak": 0}

    @contextlib.asynccontextmanager
    async def admit(self, sub: Subscription, event: Event) -> AsyncIterator[None]:
        """Wait until the subscription may run this event: its key's turn (ordered), a rate token,
        a concurrency slot — in that order, so ordering holds even under the other limits."""
        gate = self._gate(sub)
        if gate is None:
            yield
            return
        async with contextlib.AsyncExitStack() as stack:
            if gate.sequencer is not None:
                key = event.partition_key or event.subject or ""
                await stack.enter_async_context(gate.sequencer.turn(key))
            if gate.bucket is not None:
                if self.shared is None:
                    await gate.bucket.take()
                else:
                    async with gate.reserving:
                        delay = await self.shared.reserve_rate(f"rate/{sub.id}", gate.interval)
                    if delay > 0:
                        await self.clock.sleep(delay)
            if gate.semaphore is not None:
                # This process's slot first: at most max_concurrency of its waiters ask the others.
                await stack.enter_async_context(gate.semaphore)
                if self.shared is not None:
                    await stack.enter_async_context(self.shared.permit(f"concurrency/{sub.id}", gate.spec["max_concurrency"]))
            gate.running += 1
            gate.peak = max(gate.peak, gate.running)
            try:
                yield
            finally:
                gate.running -= 1


# How often the replica consuming an ordered subscription's parking topic confirms it still leads
# (and how often the others ask whether it is gone).
ORDERED_LEAD_CHECK_SECONDS = 1.0


class LeadingConsumer:
    """Consumes one topic only while this replica leads `name` among the replicas: ordering across
    replicas, since events of one key taken by two replicas at once could run in either order.
    The others keep the topic's group (so nothing published is lost) and take over when the
    leader's lease ends."""

    def __init__(self, bus: Any, coordination: Coordination, name: str, topic: str, group: str, handler: Any,
                 prefetch: int | None, check: float = ORDERED_LEAD_CHECK_SECONDS):
        self.bus, self.coordination, self.name = bus, coordination, name
        self.topic, self.group, self.handler, self.prefetch, self.check = topic, group, handler, prefetch, check
        self.consumer: Any = None
        self._task: asyncio.Task | None = None

    async def start(self) -> LeadingConsumer:
        await self.bus.ensure_group(self.topic, self.group)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name=f"lead-{self.name}")
        return self

    async def _follow(self) -> None:
        while True:
            try:
                leads = await self.coordination.campaign(self.name)
            except asyncio.CancelledError:
                raise
            except Exception:  # coordination unreachable: stop consuming, another may lead now
                log.exception("ordered: coordination did not answer", extra={"topic": self.topic})
                leads = False
            if leads and self.consumer is None:
                self.consumer = await self.bus.consume(self.topic, self.group, self.handler, prefetch=self.prefetch)
                log.info("ordered: this replica consumes the topic", extra={"topic": self.topic})
            elif not leads and self.consumer is not None:
                consumer, self.consumer = self.consumer, None
                await consumer.cancel()
                log.info("ordered: another replica consumes the topic", extra={"topic": self.topic})
            await asyncio.sleep(self.check)

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            await consumer.cancel()
        with contextlib.suppress(Exception):
            await self.coordination.resign(self.name)
