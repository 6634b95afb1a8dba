"""Dispatcher: consume events from the bus, match them to subscriptions, execute each match, ack."""

from __future__ import annotations

import asyncio
import logging

from router.bus import EVENTS_TOPIC, Bus, Consumer, Delivery
from router.executions import ExecutionService
from router.index import SubscriptionIndex, source_kind
from router.log import current_event_id
from router.metrics import Metrics

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, bus: Bus, index: SubscriptionIndex, executions: ExecutionService, metrics: Metrics,
                 *, group: str = "router", prefetch: int | None = None):
        self.bus = bus
        self.index = index
        self.executions = executions
        self.metrics = metrics
        self.group = group
        self.prefetch = prefetch
        self._consumer: Consumer | None = None
        self._settle_waiters: dict[str, list[asyncio.Future]] = {}

    def settled(self, event_id: str) -> asyncio.Future:
        """A future resolved when this dispatcher has handled the event (all its executions recorded)."""
        future = asyncio.get_running_loop().create_future()
        self._settle_waiters.setdefault(event_id, []).append(future)
        return future

    def _settle(self, event_id: str) -> None:
        for future in self._settle_waiters.pop(event_id, ()):
            if not future.done():
                future.set_result(None)

    async def start(self) -> None:
        self._consumer = await self.bus.consume(EVENTS_TOPIC, self.group, self.handle, prefetch=self.prefetch)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.cancel()
            self._consumer = None

    async def handle(self, delivery: Delivery) -> None:
        """Returning acks the delivery; raising gives it back to the bus for redelivery. Each
        (event, subscription) execution is idempotent, so a redelivery redoes only what is missing."""
        event = delivery.event
        token = current_event_id.set(event.id)
        try:
            await self._route(event)
        finally:
            current_event_id.reset(token)
        if self._settle_waiters:
            self._settle(event.id)

    async def _route(self, event) -> None:
        kind = source_kind(event) or "unknown"
        matches = self.index.match(event)
        if not matches:
            self.metrics.events_unmatched.labels(kind).inc()
            log.debug("event matched no subscription")
            return
        self.metrics.events_routed.labels(kind).inc(len(matches))
        if len(matches) == 1:
            await self.executions.run_for_event(event, matches[0])
            return
        results = await asyncio.gather(*(self.executions.run_for_event(event, sub) for sub in matches), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
