"""The in-memory bus, for tests and benchmarks: safe against handler failures, not against a crash
of the process, which loses every event not yet handled and every retry waiting (the embedded
default is the durable sqlite bus)."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import ClassVar

from router.bus import (EVENTS_TOPIC, BatchHandler, DeliveryHandler, SettledOnce, dead_letter_topic, settle_batch,
                        settle_by_handler)
from router.config import Config
from router.events import Event

log = logging.getLogger(__name__)


class _MemoryDelivery(SettledOnce):
    __slots__ = ("_reason", "_group", "_slot")

    def __init__(self, event: Event, topic: str, attempt: int, group: _Group, dead_letter_reason: str | None = None,
                 slot: asyncio.Semaphore | None = None):
        super().__init__(event, topic, attempt)
        self._reason = dead_letter_reason
        self._group = group
        self._slot = slot  # handed over in a batch: its consumer slot, given back once it is settled

    def _free(self) -> None:
        if self._slot is not None and not self._settled:
            self._slot.release()
            self._slot = None

    async def ack(self) -> None:
        self._free()
        await super().ack()

    async def nack(self, *, requeue: bool = True, reason: str = "") -> None:
        self._free()
        await super().nack(requeue=requeue, reason=reason)

    @property
    def dead_letter_reason(self) -> str | None:
        return self._reason

    @property
    def _max_deliveries(self) -> int:
        return self._group.bus.max_deliveries

    async def _ack(self) -> None:
        pass

    async def _requeue(self) -> None:
        self._group.put(self.event, self.attempt + 1, self._reason)

    async def _dead_letter(self, reason: str) -> None:
        self._group.dead_letter(self.event, self.attempt, reason)


class _Group:
    """One consumer group: a FIFO queue shared by its members."""

    def __init__(self, bus: MemoryBus, topic: str, name: str):
        self.bus = bus
        self.topic = topic
        self.name = name
        self.queue: asyncio.Queue[tuple[Event, int, str | None]] = asyncio.Queue()

    def put(self, event: Event, attempt: int = 1, dead_letter_reason: str | None = None) -> None:
        self.queue.put_nowait((event, attempt, dead_letter_reason))

    def dead_letter(self, event: Event, attempt: int, reason: str) -> None:
        log.warning("event dead-lettered", extra={"event_id": event.id, "topic": self.topic, "group": self.name,
                                                 "attempts": attempt, "reason": reason})
        self.bus.publish_nowait(event, dead_letter_topic(self.topic), dead_letter_reason=reason)


class _MemoryConsumer:
    def __init__(self, group: _Group, handler: DeliveryHandler, prefetch: int, batch: BatchHandler | None = None):
        self._group = group
        self._handler = handler
        self._batch = batch
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
            if self._batch is None:
                delivery = _MemoryDelivery(event, self._group.topic, attempt, self._group, reason)
                self._spawn(self._handle(delivery))
                continue
            # The batch handler gets this event and what else is queued now, as far as slots allow.
            deliveries = [_MemoryDelivery(event, self._group.topic, attempt, self._group, reason, self._slots)]
            while not queue.empty() and not self._slots.locked():
                await self._slots.acquire()  # free: returns at once
                event, attempt, reason = queue.get_nowait()
                deliveries.append(_MemoryDelivery(event, self._group.topic, attempt, self._group, reason, self._slots))
            self._spawn(self._handle_batch(deliveries))

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle_batch(self, deliveries: list[_MemoryDelivery]) -> None:
        try:
            await settle_batch(self._batch, deliveries, log, topic=self._group.topic, group=self._group.name)
        except asyncio.CancelledError:
            for delivery in deliveries:  # going away without an answer: as in _handle
                if not delivery._settled:
                    delivery._free()
                    delivery._settled = True
                    self._group.put(delivery.event, delivery.attempt + 1, delivery.dead_letter_reason)
            raise

    async def _handle(self, delivery: _MemoryDelivery) -> None:
        try:
            await settle_by_handler(self._handler, delivery, log, topic=self._group.topic, group=self._group.name)
        except asyncio.CancelledError:
            # The consumer is going away without an answer: the event goes back, like an unacked
            # message on a broker whose consumer died.
            if not delivery._settled:
                delivery._settled = True
                self._group.put(delivery.event, delivery.attempt + 1, delivery.dead_letter_reason)
            raise
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
            # Held by a timer in this process: lost with it (after a restart the router puts
            # retries back from the execution records, see ExecutionService.redrive_retries).
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

    async def consume(self, topic: str, group: str, handler: DeliveryHandler, *, prefetch: int | None = None,
                      batch: BatchHandler | None = None) -> _MemoryConsumer:
        await self.ensure_group(topic, group)
        return _MemoryConsumer(self._groups[topic][group], handler, prefetch or self.default_prefetch, batch)

    def depth(self, topic: str, group: str) -> int:
        """Events waiting for a group (for tests and metrics)."""
        grp = self._groups.get(topic, {}).get(group)
        return grp.queue.qsize() if grp else len(self._backlog.get(topic, ()))
