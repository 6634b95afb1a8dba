"""The in-memory bus: the embedded default. Safe against handler failures, not against a crash of
the process (use rabbitmq or nats for that)."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import ClassVar

from router.bus import EVENTS_TOPIC, DeliveryHandler, dead_letter_topic
from router.config import Config
from router.events import Event

log = logging.getLogger(__name__)


class _MemoryDelivery:
    __slots__ = ("event", "topic", "attempt", "dead_letter_reason", "_group", "_settled")

    def __init__(self, event: Event, topic: str, attempt: int, group: _Group, dead_letter_reason: str | None = None):
        self.event = event
        self.topic = topic
        self.attempt = attempt
        self.dead_letter_reason = dead_letter_reason
        self._group = group
        self._settled = False

    async def ack(self) -> None:
        self._settled = True

    async def nack(self, *, requeue: bool = True, reason: str = "") -> None:
        if self._settled:
            return
        self._settled = True
        self._group.redeliver(self.event, self.attempt, requeue=requeue, reason=reason)


class _Group:
    """One consumer group: a FIFO queue shared by its members."""

    def __init__(self, bus: MemoryBus, topic: str, name: str):
        self.bus = bus
        self.topic = topic
        self.name = name
        self.queue: asyncio.Queue[tuple[Event, int, str | None]] = asyncio.Queue()

    def put(self, event: Event, attempt: int = 1, dead_letter_reason: str | None = None) -> None:
        self.queue.put_nowait((event, attempt, dead_letter_reason))

    def redeliver(self, event: Event, attempt: int, *, requeue: bool, reason: str) -> None:
        if requeue and attempt < self.bus.max_deliveries:
            self.put(event, attempt + 1)
            return
        log.warning("event dead-lettered", extra={"event_id": event.id, "topic": self.topic, "group": self.name,
                                                 "attempts": attempt, "reason": reason or "max deliveries reached"})
        self.bus.publish_nowait(event, dead_letter_topic(self.topic), dead_letter_reason=reason or "max deliveries reached")


class _MemoryConsumer:
    def __init__(self, group: _Group, handler: DeliveryHandler, prefetch: int):
        self._group = group
        self._handler = handler
        self._slots = asyncio.Semaphore(prefetch)
        self._inflight: set[asyncio.Task] = set()
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"memory-consumer-{group.name}")

    async def _run(self) -> None:
        queue = self._group.queue
        while True:
            await self._slots.acquire()
            try:
                event, attempt, reason = await queue.get()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            delivery = _MemoryDelivery(event, self._group.topic, attempt, self._group, reason)
            task = asyncio.get_running_loop().create_task(self._handle(delivery))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _handle(self, delivery: _MemoryDelivery) -> None:
        try:
            await self._handler(delivery)
        except asyncio.CancelledError:
            # The consumer is going away without an answer: the event goes back, like an unacked
            # message on a broker whose consumer died.
            if not delivery._settled:
                delivery._settled = True
                self._group.put(delivery.event, delivery.attempt + 1, delivery.dead_letter_reason)
            raise
        except Exception as exc:  # the handler failed: redeliver (or dead-letter)
            log.warning("handler failed; event will be redelivered", exc_info=True,
                        extra={"event_id": delivery.event.id, "attempt": delivery.attempt})
            await delivery.nack(requeue=True, reason=f"{type(exc).__name__}: {exc}")
        else:
            delivery._settled = True
        finally:
            self._slots.release()

    async def cancel(self) -> None:
        self._loop_task.cancel()
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(self._loop_task, *tasks, return_exceptions=True)


class MemoryBus:
    """Topics with consumer groups, held in this process."""

    name: ClassVar[str] = "memory"

    def __init__(self, config: Config | None = None):
        self.max_deliveries = config.bus.max_deliveries if config else 10
        self.default_prefetch = config.bus.prefetch if config else 256
        self._groups: dict[str, dict[str, _Group]] = collections.defaultdict(dict)
        # Events published to a topic before any group consumes it wait here for the first group.
        self._backlog: dict[str, list[tuple[Event, str | None]]] = collections.defaultdict(list)
        self._delayed: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for handle in self._delayed:
            handle.cancel()
        self._delayed.clear()

    def publish_nowait(self, event: Event, topic: str = EVENTS_TOPIC, *, dead_letter_reason: str | None = None) -> None:
        groups = self._groups.get(topic)
        if not groups:
            self._backlog[topic].append((event, dead_letter_reason))
            return
        for group in groups.values():
            group.put(event, 1, dead_letter_reason)

    async def publish(self, event: Event, *, topic: str = EVENTS_TOPIC, delay: float = 0.0, key: str | None = None) -> None:
        if delay > 0:
            # Held by a timer in this process: as durable as the rest of the memory bus.
            def fire() -> None:
                self._delayed.discard(handle)
                self.publish_nowait(event, topic)

            handle = asyncio.get_running_loop().call_later(delay, fire)
            self._delayed.add(handle)
            return
        self.publish_nowait(event, topic)

    async def ensure_group(self, topic: str, group: str) -> None:
        groups = self._groups[topic]
        if group not in groups:
            groups[group] = _Group(self, topic, group)
            for event, reason in self._backlog.pop(topic, ()):
                groups[group].put(event, 1, reason)

    async def consume(self, topic: str, group: str, handler: DeliveryHandler, *, prefetch: int | None = None) -> _MemoryConsumer:
        await self.ensure_group(topic, group)
        return _MemoryConsumer(self._groups[topic][group], handler, prefetch or self.default_prefetch)

    def depth(self, topic: str, group: str) -> int:
        """Events waiting for a group (for tests and metrics)."""
        grp = self._groups.get(topic, {}).get(group)
        return grp.queue.qsize() if grp else len(self._backlog.get(topic, ()))
