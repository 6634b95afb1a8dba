"""The Bus protocol: durable, at-least-once carriage of events between sources and routers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar, Protocol, runtime_checkable

from router.config import Config
from router.events import Event

EVENTS_TOPIC = "events"


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlq"


class BusError(RuntimeError):
    """The bus could not take or hand out an event (broker down, publish not confirmed)."""


class Delivery(Protocol):
    """One delivery of one event to one consumer group member."""

    event: Event
    topic: str
    attempt: int  # 1 on first delivery, 2 on the first redelivery, …
    # On a dead-letter topic: why the bus dead-lettered the event (None elsewhere).
    dead_letter_reason: str | None

    async def ack(self) -> None:
        """Done with the event; it will not be delivered to this group again."""

    async def nack(self, *, requeue: bool = True, reason: str = "") -> None:
        """Give the event back (requeue) or send it to the topic's dead-letter topic."""


DeliveryHandler = Callable[[Delivery], Awaitable[None]]
# Takes whatever deliveries the bus had ready at once, and settles each as soon as it is done.
BatchHandler = Callable[[list[Delivery]], Awaitable[None]]


class SettledOnce:
    """The part of a Delivery every backend shares: it is settled at most once, and a nack
    requeues while the event is under `max_deliveries` deliveries, then dead-letters. Backends
    say how: `_ack`, `_requeue`, `_dead_letter`, and `_max_deliveries`."""

    __slots__ = ("event", "topic", "attempt", "_settled")

    def __init__(self, event: Event, topic: str, attempt: int):
        self.event = event
        self.topic = topic
        self.attempt = attempt
        self._settled = False

    @property
    def dead_letter_reason(self) -> str | None:
        return None

    @property
    def _max_deliveries(self) -> int:
        raise NotImplementedError

    async def _ack(self) -> None:
        raise NotImplementedError

    async def _requeue(self) -> None:
        raise NotImplementedError

    async def _dead_letter(self, reason: str) -> None:
        raise NotImplementedError

    async def ack(self) -> None:
        if self._settled:
            return
        self._settled = True
        await self._ack()

    async def nack(self, *, requeue: bool = True, reason: str = "") -> None:
        if self._settled:
            return
        self._settled = True
        if requeue and self.attempt < self._max_deliveries:
            await self._requeue()
        else:
            await self._dead_letter(reason or "max deliveries reached")


async def settle_by_handler(handler: DeliveryHandler, delivery: SettledOnce, log: logging.Logger, **context) -> None:
    """Run the handler on a delivery: returning acks it, raising nacks it for redelivery (logged
    with `context`). Cancellation propagates unsettled; each backend decides what that means."""
    try:
        await handler(delivery)
    except Exception as exc:
        log.warning("handler failed; event will be redelivered", exc_info=True,
                    extra={"event_id": delivery.event.id, "attempt": delivery.attempt, **context})
        await delivery.nack(requeue=True, reason=f"{type(exc).__name__}: {exc}")
    else:
        await delivery.ack()


async def settle_batch(handler: BatchHandler, deliveries: list, log: logging.Logger, **context) -> None:
    """Run a batch handler: what it left unsettled is acked if it returned, nacked if it raised."""
    try:
        await handler(deliveries)
    except Exception as exc:
        log.warning("batch handler failed; its unsettled events will be redelivered", exc_info=True,
                    extra={"events": len(deliveries), **context})
        for delivery in deliveries:
            if not delivery._settled:
                await delivery.nack(requeue=True, reason=f"{type(exc).__name__}: {exc}")
    else:
        for delivery in deliveries:
            if not delivery._settled:
                await delivery.ack()


class Consumer(Protocol):
    async def cancel(self) -> None:
        """Stop taking new deliveries; unacknowledged ones go back to the bus."""


@runtime_checkable
class Bus(Protocol):
    """Semantics every backend keeps (the bus contract suite checks them):

    * `publish` returns only once the event is safe (broker-confirmed, or queued in memory).
    * Each consumer group gets every event; members of a group share them.
    * The handler is called with a Delivery. If it returns without settling, the delivery is acked;
      if it raises, it is nacked and redelivered. After `max_deliveries` deliveries an event goes to
      `dead_letter_topic(topic)`.
    * Delivery is at-least-once: a consumer that dies (or loses its connection) before acking gets
      the event again, and a publish retried across a reconnect may store it twice. Consumers make
      their effects idempotent by event id (the router keys execution records on it).
    * A group receives the events published after it first exists: `ensure_group` creates it
      ahead of its first consumer (so nothing published meanwhile is missed).
    * `publish(..., delay=s)` makes the event visible to consumers only after s seconds, durably on
      a durable backend (the router's retries use it, so a waiting retry holds no consumer slot).
    * `consume(..., batch=h)`: the deliveries ready at once (what one claim, fetch or socket read
      brought) go to `h` as one list instead of one by one to the handler; a lone one goes at once,
      never held back to make a batch. `h` settles each as soon as it is done (a delivery's slot is
      free once it is settled), and the rules above hold for each delivery.
      `key` names the publish for de-duplication (default: the event id); a retry of the same
      event needs its own key.
    """

    name: ClassVar[str]

    def __init__(self, config: Config) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, event: Event, *, topic: str = EVENTS_TOPIC, delay: float = 0.0, key: str | None = None) -> None: ...

    async def ensure_group(self, topic: str, group: str) -> None: ...

    async def consume(self, topic: str, group: str, handler: DeliveryHandler, *, prefetch: int | None = None,
                      batch: BatchHandler | None = None) -> Consumer: ...
