"""Dispatcher: consume events from the bus, match them to subscriptions, execute each match, ack.
The bus hands over whatever is ready as one batch: its executions are recorded by one journal write,
and each event is acked as soon as its own execution is recorded. Events for a subscription with limits are parked on that subscription's own topic instead, so that
its backlog never holds the slots other subscriptions' events need (no head-of-line blocking)."""

from __future__ import annotations

import asyncio
import logging

from router import tracing
from router.bus import EVENTS_TOPIC, Bus, Consumer, Delivery, dead_letter_topic, settle_by_handler
from router.delivery import RETRY_TOPIC, clean, retry_copy, retry_marks
from router.events import Event, derived_id, execution_id_for
from router.executions import ExecutionService
from router.index import SubscriptionIndex, source_kind
from router.limits import LeadingConsumer
from router.log import current_event_id
from router.metrics import Metrics
from router.plugins import Subscription

log = logging.getLogger(__name__)

PARKED_TOPIC_PREFIX = "events.parked."


def parked_topic(subscription_id: str) -> str:
    """The topic where events wait for a limited subscription's concurrency, rate or ordering."""
    return PARKED_TOPIC_PREFIX + subscription_id


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
        self._retry_consumer: Consumer | None = None
        self._dead_letter_consumers: list[Consumer] = []
        # Consumers of limited subscriptions' parking topics, by subscription id; kept until stop
        # (events parked before a subscription's limits were lifted still need taking).
        self._parked_consumers: dict[str, asyncio.Future] = {}
        # Parking of an ordered subscription's events, one publish at a time in arrival order.
        self._park_locks: dict[str, asyncio.Lock] = {}
        self._settle_waiters: dict[str, list[asyncio.Future]] = {}
        # Retries go back through the bus this dispatcher consumes from.
        executions.delivery.bus = bus
        # Set by the app: refreshes the index when an unmatched event is newer than the index.
        self.refresh_index = None

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
        # What the bus gave up on (this router failed to handle it max_deliveries times) becomes a
        # dead-letter record an operator can list, not a message on a topic nobody reads.
        self._dead_letter_consumers = [
            await self.bus.consume(dead_letter_topic(topic), f"{self.group}-dead-letters", self.record_bus_dead_letter)
            for topic in (EVENTS_TOPIC, RETRY_TOPIC)]
        # What limited subscriptions parked before a restart is taken up again.
        for sub in self.index.all():
            if self.executions.limits.limited(sub):
                await self._parking_consumer(sub.id)
        self._retry_consumer = await self.bus.consume(RETRY_TOPIC, self.group, self.handle_retry, prefetch=self.prefetch)
        self._consumer = await self.bus.consume(EVENTS_TOPIC, self.group, self.handle, prefetch=self.prefetch,
                                                batch=self.handle_batch)

    async def stop(self) -> None:
        parked = [f for f in self._parked_consumers.values() if f.done() and f.exception() is None]
        for consumer in (self._consumer, self._retry_consumer, *self._dead_letter_consumers,
                         *(f.result() for f in parked)):
            if consumer is not None:
                await consumer.cancel()
        self._consumer = self._retry_consumer = None
        self._dead_letter_consumers = []
        self._parked_consumers = {}

    async def _parking_consumer(self, subscription_id: str) -> None:
        """Make sure this router consumes the subscription's parking topic (once, however many
        events ask at the same time)."""
        started = self._parked_consumers.get(subscription_id)
        if started is None or (started.done() and started.exception() is not None):
            topic, shared, sub = parked_topic(subscription_id), self.executions.limits.shared, self.index.get(subscription_id)
            if shared is not None and sub is not None and ((sub.options or {}).get("limits") or {}).get("ordered"):
                # Ordered across replicas: one replica at a time consumes (router.limits).
                consuming = LeadingConsumer(self.bus, shared, f"ordered-{subscription_id}", topic, self.group,
                                            self.handle_parked, self.prefetch).start()
            else:
                consuming = self.bus.consume(topic, self.group, self.handle_parked, prefetch=self.prefetch)
            started = self._parked_consumers[subscription_id] = asyncio.ensure_future(consuming)
        await asyncio.shield(started)

    async def park(self, event: Event, sub: Subscription, attempt: int = 1, last_status: str | None = None) -> None:
        """Hand the event to the subscription's parking topic: it waits there for the subscription's
        limits, holding none of the slots of the topic other subscriptions' events come on."""
        copy = retry_copy(event, sub.id, attempt, last_status)
        topic, key = parked_topic(sub.id), f"{execution_id_for(event.source, event.id, sub.id)}/{attempt}/parked"
        if ((sub.options or {}).get("limits") or {}).get("ordered"):
            # Concurrent publishes may be stored in any order; an ordered subscription's may not.
            # The lock comes first: an event must not overtake those waiting for the consumer.
            async with self._park_locks.setdefault(sub.id, asyncio.Lock()):
                await self._parking_consumer(sub.id)
                await self.bus.publish(copy, topic=topic, key=key)
        else:
            await self._parking_consumer(sub.id)
            await self.bus.publish(copy, topic=topic, key=key)
        self.metrics.parked.inc()

    async def _run_or_park(self, event: Event, sub: Subscription, attempt: int = 1, last_status: str | None = None) -> None:
        if self.executions.limits.limited(sub):
            await self.park(event, sub, attempt, last_status)
        else:
            await self.executions.run_for_event(event, sub, attempt=attempt, last_status=last_status)

    async def record_bus_dead_letter(self, delivery: Delivery) -> None:
        """Record an event the bus dead-lettered, once (by event and topic) however often it comes."""
        event = delivery.event
        kind = source_kind(event) or "unknown"
        subscription_id, attempt, _ = retry_marks(event)
        reason = (f"the router could not handle the event on topic {delivery.topic.removesuffix('.dlq')} "
                  f"within the bus's maximum deliveries: {delivery.dead_letter_reason or 'no reason given by the bus'}")
        await self.executions.delivery.record_dead_letter(
            letter_id=derived_id("bus-dead-letter", delivery.topic, event.id, str(attempt)), source=kind, reason=reason,
            payload=clean(event), event_id=event.id, subscription_id=subscription_id,
            project_id=event.project_id or "default")

    async def handle(self, delivery: Delivery) -> None:
        """Returning acks the delivery; raising gives it back to the bus for redelivery. Each
        (event, subscription) execution is idempotent, so a redelivery redoes only what is missing."""
        event = delivery.event
        token = current_event_id.set(event.id)
        try:
            if tracing.enabled:  # tested first: with tracing off, routing pays one flag test
                with tracing.span("route", event=event, kind="consumer",
                                  attributes={"cloudevents.event_id": event.id, "cloudevents.event_type": event.type}):
                    await self._route(event)
            else:
                await self._route(event)
        finally:
            current_event_id.reset(token)
        if self._settle_waiters:
            self._settle(event.id)

    async def handle_batch(self, deliveries: list[Delivery]) -> None:
        """Handle what the bus had ready, settling each delivery as soon as it is done (ack once its
        execution is recorded, nack if that failed), as `handle` does for one. First deliveries of
        events that match one subscription without limits go through one journal write; the rest
        (and any one alone: a batch is never a wait) through `handle`."""
        if len(deliveries) == 1:  # the one-event path, without the batch's gathering
            await settle_by_handler(self.handle, deliveries[0], log, topic=deliveries[0].topic)
            return
        plain: list[Delivery] = []
        items: list[tuple[Event, Subscription]] = []
        work = []
        limited = self.executions.limits.limited
        if not tracing.enabled:
            match = self.index.match_or_target
            for delivery in deliveries:
                event = delivery.event
                matches = match(event) if delivery.attempt == 1 else ()
                if len(matches) == 1 and not limited(matches[0]):
                    plain.append(delivery)
                    items.append((event, matches[0]))
                else:
                    work.append(settle_by_handler(self.handle, delivery, log, topic=delivery.topic))
        else:
            work = [settle_by_handler(self.handle, delivery, log, topic=delivery.topic) for delivery in deliveries]
        if items:
            metrics = self.metrics
            for event, _ in items:
                metrics.child(metrics.events_routed, source_kind(event) or "unknown").inc()

            async def settle(i: int, error: BaseException | None) -> None:
                delivery = plain[i]
                try:
                    if error is None:
                        await delivery.ack()
                    else:
                        log.warning("handler failed; event will be redelivered", exc_info=error,
                                    extra={"event_id": delivery.event.id, "attempt": delivery.attempt,
                                           "topic": delivery.topic})
                        await delivery.nack(requeue=True, reason=f"{type(error).__name__}: {error}")
                except Exception:
                    # An ack lost with the connection: the bus hands the event out again, and the
                    # others of the batch are not held back by it.
                    log.warning("could not settle a delivery; the bus will deliver it again", exc_info=True,
                                extra={"event_id": delivery.event.id, "topic": delivery.topic})
                if self._settle_waiters:
                    self._settle(delivery.event.id)

            work.append(self.executions.run_for_events(items, settle))
        for failure in await asyncio.gather(*work, return_exceptions=True):
            # Only settling itself can fail here (an ack lost with the connection): the bus hands
            # the event out again, and the others of the batch are not held back by it.
            if isinstance(failure, Exception):
                log.warning("could not settle a delivery; the bus will deliver it again", exc_info=failure)
            elif isinstance(failure, BaseException):
                raise failure

    async def handle_retry(self, delivery: Delivery) -> None:
        """A retry the delivery policy scheduled: it goes to the one subscription that failed."""
        await self._handle_marked(delivery, parked=False)

    async def handle_parked(self, delivery: Delivery) -> None:
        """An event parked for a limited subscription: it runs once the limits admit it (holding a
        slot of this subscription's parking topic only while it waits)."""
        await self._handle_marked(delivery, parked=True)

    async def _handle_marked(self, delivery: Delivery, *, parked: bool) -> None:
        event = delivery.event
        subscription_id, attempt, last_status = retry_marks(event)
        sub = self.index.get(subscription_id) if subscription_id else None
        if sub is None:
            # Deleted while the retry waited (or not a retry at all): nothing left to run it for.
            log.info("retry dropped: its subscription is gone",
                     extra={"event_id": event.id, "subscription_id": subscription_id})
            return
        token = current_event_id.set(event.id)
        try:
            with tracing.span("route retry", event=event, kind="consumer", attributes={"cloudevents.event_id": event.id}):
                if parked:
                    await self.executions.run_for_event(event, sub, attempt=attempt, last_status=last_status)
                else:
                    await self._run_or_park(event, sub, attempt, last_status)
        finally:
            current_event_id.reset(token)

    async def _route(self, event) -> None:
        kind = source_kind(event) or "unknown"
        matches = self.index.match_or_target(event)
        # Another replica may have created a matching subscription after this index was loaded
        # (cron ticks and webhook calls aimed at one, or any other): refresh before dropping it.
        if not matches and self.refresh_index is not None and event.time is not None and await self.refresh_index(event.time):
            matches = self.index.match_or_target(event)
        if not matches:
            self.metrics.child(self.metrics.events_unmatched, kind).inc()
            log.debug("event matched no subscription")
            return
        self.metrics.child(self.metrics.events_routed, kind).inc(len(matches))
        if len(matches) == 1:
            await self._run_or_park(event, matches[0])
            return
        results = await asyncio.gather(*(self._run_or_park(event, sub) for sub in matches), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
