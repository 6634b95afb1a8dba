"""The RabbitMQ bus (aio-pika): a durable topic exchange, one durable queue per (topic, group)."""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import uuid
from typing import Any, ClassVar

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq
import aiormq.abc
from yarl import URL

from router.bus import (EVENTS_TOPIC, BatchHandler, BusError, DeliveryHandler, SettledOnce, dead_letter_topic,
                        settle_batch, settle_by_handler)
from router.config import Config
from router.events import Event, InvalidEvent

log = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_PREFIX = "headwater"

# Headers this backend owns. The attempt header is only set on copies we republish after a failed
# delivery, so a plain first publish carries none.
ATTEMPT_HEADER = "x-headwater-attempt"
REASON_HEADER = "x-headwater-dead-letter-reason"
ORIGIN_TOPIC_HEADER = "x-headwater-original-topic"
ORIGIN_GROUP_HEADER = "x-headwater-group"
ATTEMPTS_HEADER = "x-headwater-attempts"
_OWN_HEADERS = "x-headwater-"

CONTENT_TYPE = "application/cloudevents+json"
PERSISTENT = 2  # AMQP delivery mode: written to disk

# Options this backend reads from the URL query (and strips before aio-pika sees the URL).
_URL_OPTIONS = ("prefix", "queue_type", "publish_timeout")


class _RabbitDelivery(SettledOnce):
    __slots__ = ("_consumer", "_message", "_batched")

    def __init__(self, event: Event, topic: str, attempt: int, consumer: _RabbitConsumer,
                 message: aiormq.abc.DeliveredMessage, batched: bool = False):
        super().__init__(event, topic, attempt)
        self._consumer = consumer
        self._message = message
        self._batched = batched  # handed over in a batch: a failed nack gives the message back itself

    async def nack(self, *, requeue: bool = True, reason: str = "") -> None:
        try:
            await super().nack(requeue=requeue, reason=reason)
        except Exception:
            if self._batched:  # one at a time, _handle does this
                await self._consumer._give_back(self._message)
            raise

    @property
    def dead_letter_reason(self) -> str | None:
        reason = (self._message.header.properties.headers or {}).get(REASON_HEADER)
        return reason.decode() if isinstance(reason, bytes) else reason

    @property
    def _max_deliveries(self) -> int:
        return self._consumer.bus.max_deliveries

    async def _ack(self) -> None:
        self._consumer._acks.ack(self._message)

    async def _requeue(self) -> None:
        await self._consumer._requeue(self._message, self.event, self.attempt)

    async def _dead_letter(self, reason: str) -> None:
        await self._consumer._dead_letter(self._message, self.event.id, self.attempt, reason)


class _Acks:
    """The acks for one aiormq channel, sent together once per turn of the event loop: one ack
    with `multiple` for the tags below the oldest delivery still unsettled, one each above it
    (deliveries settle out of order)."""

    __slots__ = ("channel", "_unsettled", "_done", "_flush")

    def __init__(self, channel: aiormq.abc.AbstractChannel):
        self.channel = channel
        self._unsettled: set[int] = set()  # delivered, neither acked nor nacked yet
        self._done: list[int] = []  # acked, not yet sent
        self._flush: asyncio.Task | None = None  # the one task sending them, while it runs

    def delivered(self, message: aiormq.abc.DeliveredMessage) -> None:
        # Called first thing in each delivery's task, and aiormq starts those in tag order: a tag
        # below one being acked has been seen here, so `multiple` never covers one not settled.
        if message.channel is self.channel:
            self._unsettled.add(message.delivery.delivery_tag)

    def nacked(self, message: aiormq.abc.DeliveredMessage) -> None:
        # Only once the nack is queued may a `multiple` ack (queued after it) pass over its tag.
        if message.channel is self.channel:
            self._unsettled.discard(message.delivery.delivery_tag)

    def ack(self, message: aiormq.abc.DeliveredMessage) -> None:
        if message.channel is not self.channel or self.channel.is_closed:
            # The channel went away (reconnect): the broker redelivers; at-least-once holds.
            raise BusError("ack failed: the channel the message came on is closed")
        tag = message.delivery.delivery_tag
        self._unsettled.discard(tag)
        self._done.append(tag)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def flushed(self) -> None:
        if self._flush is None or self.channel.is_closed:
            return
        closing = self.channel.closing
        try:
            await asyncio.wait((self._flush, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()

    async def _send(self) -> None:
        # One sender at a time: a `multiple` ack queued ahead of single acks it also covers would
        # make those unknown tags to the broker, which closes the channel for it.
        try:
            while self._done:
                tags = sorted(self._done)
                self._done = []
                oldest = min(self._unsettled, default=None)
                below = len(tags) if oldest is None else bisect.bisect_left(tags, oldest)
                # Not waiting for the socket write: the broker does not answer acks, and a lost
                # one only means a redelivery.
                if below:
                    await self.channel.basic_ack(tags[below - 1], multiple=True, wait=False)
                for tag in tags[below:]:
                    await self.channel.basic_ack(tag, wait=False)
        except Exception:
            log.debug("acks not sent: the channel closed, and the broker redelivers", exc_info=True)
        finally:
            self._flush = None


class _RabbitConsumer:
    """One member of a consumer group: its own channel (so QoS and cancel are per member).

    aio-pika keeps the channel (reopened, with its queue re-declared, after a reconnect); the
    deliveries themselves are taken and settled on the aiormq channel underneath, without aio-pika's
    per-message objects and tasks."""

    def __init__(self, bus: RabbitMQBus, topic: str, group: str, handler: DeliveryHandler, prefetch: int):
        self.bus = bus
        self.topic = topic
        self.group = group
        self._handler = handler
        self._batch: BatchHandler | None = None
        self._ready: list[aiormq.abc.DeliveredMessage] = []  # delivered this turn, for the batch handler
        self._prefetch = prefetch
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._queue: aio_pika.abc.AbstractRobustQueue | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._acks: _Acks | None = None
        self._tag = f"headwater-{uuid.uuid4().hex}"
        self._tasks: set[asyncio.Task] = set()  # handlers in flight, a recovery: cancel() stops them
        self._cancelled = False

    async def start(self) -> None:
        connection = self.bus._require_connection()
        self._channel = await connection.channel(publisher_confirms=False)
        await self._channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await self.bus._declare_group_queue(self._channel, self.topic, self.group)
        # aio-pika only restores the consumers it registered itself: consume again on every reopen.
        self._channel.reopen_callbacks.add(self._resume)
        await self._consume()

    async def _consume(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        if self._tag not in underlay.consumers:
            if self._acks is None or self._acks.channel is not underlay:
                # Delivery tags count per channel: a new channel, a new count. On the same channel
                # (the broker cancelled the consumer) deliveries still in hand keep their place.
                self._acks = _Acks(underlay)
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            await underlay.basic_consume(self._queue.name, self._on_message, consumer_tag=self._tag)
        self._underlay = underlay

    async def _resume(self, _channel: aio_pika.abc.AbstractRobustChannel) -> None:
        if self._cancelled:
            return
        try:
            await self._consume()
        except Exception:
            # Only a closing channel makes basic.consume fail, and its reopen calls this again.
            log.warning("could not consume again after the channel reopened; waiting for the next reopen",
                        exc_info=True, extra={"topic": self.topic, "group": self.group})
        else:
            log.info("consuming again on the reopened channel", extra={"topic": self.topic, "group": self.group})

    def _on_broker_cancel(self, frame: aiormq.spec.Basic.Cancel) -> None:
        # The broker dropped this consumer (its queue was deleted, say) on a channel that stays
        # open: declare the queue again and consume, as aio-pika does for its own consumers.
        if frame.consumer_tag == self._tag and not self._cancelled:
            self._spawn(self._recover())

    async def _recover(self) -> None:
        while True:
            try:
                await self._queue.restore()  # declare and bind again
                await self._consume()
                return
            except Exception:
                log.warning("could not consume again after the broker cancelled the consumer; retrying",
                            exc_info=True, extra={"topic": self.topic, "group": self.group})
                await asyncio.sleep(self.bus.reconnect_interval)

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        # aiormq calls this in a task it cancels when the channel closes. The handler gets a task
        # of its own: a lost connection does not interrupt a running execution (its ack fails and
        # the redelivery finds the work recorded), and cancel() can still reach it.
        self._acks.delivered(message)
        if self._cancelled:
            return  # left unacked: it goes back to the queue when our channel closes
        if self._batch is None:
            self._spawn(self._handle(message))
            return
        # aiormq starts the tasks of what one read brought in the same turn: gather them, and hand
        # them over together at the end of the turn (never later: a batch is not a wait).
        if not self._ready:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._ready.append(message)

    def _hand_over(self) -> None:
        ready, self._ready = self._ready, []
        if self._cancelled:
            return
        deliveries = []
        for message in ready:
            attempt = self._attempt_of(message)
            try:
                event = Event.from_json(message.body)
            except InvalidEvent:
                event = None
            if event is None or attempt > self.bus.max_deliveries:
                self._spawn(self._handle(message))  # dead-lettered there, with the reason
            else:
                deliveries.append(_RabbitDelivery(event, self.topic, attempt, self, message, batched=True))
        if deliveries:
            self._spawn(settle_batch(self._batch, deliveries, log, topic=self.topic, group=self.group))

    @staticmethod
    def _attempt_of(message: aiormq.abc.DeliveredMessage) -> int:
        headers = message.header.properties.headers or {}
        base = int(headers.get(ATTEMPT_HEADER, 1))
        # Quorum queues count returns to the queue (consumer died, channel closed); a classic queue
        # (or a broker that does not count such returns) only says "redelivered at least once".
        returned = max(int(headers.get("x-delivery-count") or 0), 1 if message.delivery.redelivered else 0)
        return base + returned

    async def _handle(self, message: aiormq.abc.DeliveredMessage) -> None:
        try:
            await self._process(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Settling failed (broker gone, publish not confirmed). Give the message back so it is
            # not stuck unacked on a live channel; if the channel is dead the broker does it anyway.
            log.exception("could not settle a delivery; returning it to the queue",
                          extra={"event_id": message.header.properties.message_id, "topic": self.topic, "group": self.group})
            await self._give_back(message)

    async def _give_back(self, message: aiormq.abc.DeliveredMessage) -> None:
        """Return a message whose settling failed, so it is not stuck unacked on a live channel (if
        the channel is dead, the broker does it anyway)."""
        try:
            await message.channel.basic_nack(message.delivery.delivery_tag, requeue=True, wait=False)
        except Exception:
            log.debug("nack failed too", exc_info=True)
        self._acks.nacked(message)

    async def _process(self, message: aiormq.abc.DeliveredMessage) -> None:
        attempt = self._attempt_of(message)
        try:
            event = Event.from_json(message.body)
        except InvalidEvent as exc:
            message_id = message.header.properties.message_id
            log.error("message is not a valid event; dead-lettering it",
                      extra={"event_id": message_id, "topic": self.topic, "group": self.group, "reason": str(exc)})
            await self._dead_letter(message, message_id, attempt, f"invalid event: {exc}")
            return
        if attempt > self.bus.max_deliveries:
            # Only reachable when consumers died holding it (those returns are not our nacks): a
            # message that keeps killing its consumer must stop somewhere.
            await self._dead_letter(message, event.id, attempt - 1,
                                    "max deliveries reached (consumers stopped while handling it)")
            return
        delivery = _RabbitDelivery(event, self.topic, attempt, self, message)
        # Cancelled (the consumer is going away) it stays unacked, and closing the channel hands it
        # back to the queue, as when a consumer dies.
        await settle_by_handler(self._handler, delivery, log, topic=self.topic, group=self.group)

    async def _requeue(self, message: aiormq.abc.DeliveredMessage, event: Event, attempt: int) -> None:
        # Republish a copy to the tail of this group's queue with the attempt number, then ack the
        # original: exact attempt counts on any queue type, other groups untouched, and the event
        # waits behind the rest like the memory bus does. A crash between the two duplicates the
        # event, never loses it.
        # Our own headers go along (a dead letter keeps its reason); the broker's own do not, so
        # that x-delivery-count starts afresh rather than counting this attempt twice.
        headers = {k: v for k, v in (message.header.properties.headers or {}).items() if k.startswith(_OWN_HEADERS)}
        headers[ATTEMPT_HEADER] = attempt + 1
        properties = self.bus._properties(message.header.properties.message_id or event.id, headers)
        await self.bus._send("", self._queue.name, message.body, properties)
        self._acks.ack(message)

    async def _dead_letter(self, message: aiormq.abc.DeliveredMessage, event_id: str | None, attempt: int,
                           reason: str) -> None:
        target = dead_letter_topic(self.topic)
        log.warning("event dead-lettered", extra={"event_id": event_id, "topic": self.topic, "group": self.group,
                                                 "attempts": attempt, "reason": reason})
        properties = self.bus._properties(event_id, {
            REASON_HEADER: reason[:1000], ORIGIN_TOPIC_HEADER: self.topic, ORIGIN_GROUP_HEADER: self.group,
            ATTEMPTS_HEADER: attempt,
        })
        await self.bus._send(self.bus.exchange_name, target, message.body, properties)
        self._acks.ack(message)

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._underlay is not None and not self._underlay.is_closed:
            try:
                await self._underlay.basic_cancel(self._tag)
            except Exception:
                log.debug("basic.cancel failed; closing the channel anyway", exc_info=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._acks is not None:
            await self._acks.flushed()  # what was handled is acked before the channel closes
        if self._channel is not None and not self._channel.is_closed:
            # Closing the channel is what returns its unacked messages to the queue.
            try:
                await self._channel.close()
            except Exception:
                log.debug("channel close failed", exc_info=True)
        self.bus._consumers.discard(self)


class RabbitMQBus:
    """Topics on a durable topic exchange; each consumer group is a durable queue bound to it."""

    name: ClassVar[str] = "rabbitmq"

    def __init__(self, config: Config | None = None, *, url: str | None = None, prefix: str | None = None,
                 queue_type: str | None = None, publish_timeout: float | None = None,
                 reconnect_interval: float = 1.0, max_deliveries: int | None = None, prefetch: int | None = None):
        raw_url = URL(url or (config.bus.url if config else None) or DEFAULT_URL)
        query = raw_url.query
        self.prefix = prefix or query.get("prefix") or DEFAULT_PREFIX
        self.queue_type = queue_type or query.get("queue_type") or "quorum"
        if self.queue_type not in ("quorum", "classic"):
            raise ValueError(f"queue_type must be quorum or classic, not {self.queue_type!r}")
        self.publish_timeout = float(publish_timeout or query.get("publish_timeout") or 10.0)
        self.url = raw_url.with_query({k: v for k, v in query.items() if k not in _URL_OPTIONS})
        self.reconnect_interval = reconnect_interval
        self.max_deliveries = max_deliveries or (config.bus.max_deliveries if config else 10)
        self.default_prefetch = prefetch or (config.bus.prefetch if config else 256)
        self.exchange_name = self.prefix
        self.unrouted_name = f"{self.prefix}.unrouted"
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        # The aiormq channel under `_channel` that publishes go out on; replaced when it reopens.
        self._publisher: aiormq.abc.AbstractChannel | None = None
        self._consumers: set[_RabbitConsumer] = set()
        # Every queue this bus declared, so tests (and operators' scripts) can find them.
        self.declared_queues: set[str] = set()
        self._delay_queues: set[str] = set()

    def queue_name(self, topic: str, group: str) -> str:
        return f"{self.prefix}.{topic}/{group}"

    async def start(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(self.url, reconnect_interval=self.reconnect_interval,
                                                             client_properties={"connection_name": f"headwater-{self.prefix}"})
            self._connection.close_callbacks.add(self._release_senders)
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._publisher = await self._channel.get_underlay_channel()
            # Events for a topic nobody consumes yet are parked here instead of being dropped by
            # the broker: publish promises the event is safe.
            unrouted = await self._channel.declare_exchange(self.unrouted_name, aio_pika.ExchangeType.FANOUT, durable=True)
            parked = await self._channel.declare_queue(self.unrouted_name, durable=True,
                                                       arguments={"x-queue-type": self.queue_type})
            self.declared_queues.add(self.unrouted_name)
            await parked.bind(unrouted)
            await self._channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True,
                arguments={"alternate-exchange": self.unrouted_name})
        except Exception as exc:
            await self.close()
            where = self.url.with_password("***") if self.url.password else self.url
            raise BusError(f"cannot connect to RabbitMQ at {where}: {exc}") from exc
        log.info("rabbitmq bus started", extra={"exchange": self.exchange_name})

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.cancel()
        if self._connection is not None:
            try:
                await self._connection.close()
            except Exception:
                log.debug("connection close failed", exc_info=True)
        self._connection = self._channel = self._publisher = None
        self._delay_queues.clear()

    @staticmethod
    async def _release_senders(connection: aio_pika.abc.AbstractConnection, _exc: BaseException | None) -> None:
        """aiormq stops reading a lost connection's frame queue (it holds 10 frames) but leaves
        whoever waits to put one there waiting, holding its channel's lock: a publish would stall
        until its deadline instead of retrying on the new connection. Empty the queue until they
        have all gone on (to find their channel closed)."""
        if connection.transport is None:
            return  # closed by us
        queue = connection.transport.connection.write_queue
        while not queue.empty():
            while not queue.empty():
                queue.get_nowait()  # each wakes one waiting sender ...
            await asyncio.sleep(0)  # ... which puts its frame now

    def _require_connection(self) -> aio_pika.abc.AbstractRobustConnection:
        if self._connection is None:
            raise BusError("the rabbitmq bus is not started")
        return self._connection

    async def _declare_group_queue(self, channel: aio_pika.abc.AbstractChannel, topic: str, group: str):
        name = self.queue_name(topic, group)
        queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": self.queue_type})
        self.declared_queues.add(name)
        # Declared on the consumer's robust channel too, so a reconnect re-declares the topology.
        exchange = await channel.declare_exchange(self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True,
                                                  arguments={"alternate-exchange": self.unrouted_name})
        await queue.bind(exchange, routing_key=topic)
        return queue

    @staticmethod
    def _properties(message_id: str | None, headers: dict[str, Any] | None = None,
                    expiration: str | None = None) -> aiormq.spec.Basic.Properties:
        return aiormq.spec.Basic.Properties(content_type=CONTENT_TYPE, delivery_mode=PERSISTENT, message_id=message_id,
                                            headers=headers or None, expiration=expiration)

    async def _send(self, exchange: str, routing_key: str, body: bytes, properties: aiormq.spec.Basic.Properties) -> None:
        """Publish and wait for the broker's confirm; retry across a reconnect until the deadline."""
        if self._channel is None:
            raise BusError("the rabbitmq bus is not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BusError(f"publish to {routing_key!r} not confirmed within {self.publish_timeout}s")
            try:
                publisher = self._publisher
                if publisher is None or publisher.is_closed:
                    # Publishes go straight to the aiormq channel under the robust one (aio-pika's
                    # Message and Exchange.publish only add CPU per event); once it has closed,
                    # wait for aio-pika to open the next one.
                    await asyncio.wait_for(self._channel.ready(), remaining)
                    publisher = self._publisher = await self._channel.get_underlay_channel()
                # Mandatory: a message no queue takes comes back (a Return) instead of vanishing.
                # Not waiting for the socket write: the confirm comes after it anyway.
                confirmation = await publisher.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                                             properties=properties, mandatory=True,
                                                             timeout=deadline - loop.time(), wait=False)
            except aiormq.exceptions.DeliveryError as exc:
                raise BusError(f"broker refused the event for {routing_key!r}: {exc}") from exc
            except asyncio.TimeoutError:
                continue  # the loop turns this into a BusError once the deadline has passed
            except Exception as exc:
                # Connection lost mid-publish (aiormq fails what was waiting with the close reason,
                # sometimes a bare Exception): the robust connection is reconnecting; try again (a
                # duplicate is possible, and ids make it recognisable).
                if not (publisher is None or publisher.is_closed or isinstance(exc, aio_pika.exceptions.CONNECTION_EXCEPTIONS)):
                    raise
                log.info("publish interrupted; retrying after reconnect",
                         extra={"event_id": properties.message_id, "reason": str(exc)})
                await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
                continue
            if not isinstance(confirmation, aiormq.spec.Basic.Ack):
                # A Basic.Return (the message is mandatory): no queue took it, e.g. one was deleted.
                raise BusError(f"broker returned the event for {routing_key!r}: {confirmation.delivery.reply_text}")
            return

    async def publish(self, event: Event, *, topic: str = EVENTS_TOPIC, delay: float = 0.0, key: str | None = None) -> None:
        # `key` is not needed here: RabbitMQ does not de-duplicate, so every publish is stored.
        if delay > 0:
            await self._send_delayed(topic, event.to_json(), event.id, delay)
            return
        await self._send(self.exchange_name, topic, event.to_json(), self._properties(event.id))

    async def ensure_group(self, topic: str, group: str) -> None:
        if self._channel is None:
            raise BusError("the rabbitmq bus is not started")
        await self._declare_group_queue(self._channel, topic, group)

    def delay_queue_name(self, topic: str, delay: float) -> str:
        # Delays are filed in buckets a quarter octave wide: RabbitMQ expires messages only at the
        # head of a queue, so one queue per bucket bounds how long a shorter delay can wait behind
        # a longer one (at most ~19 % over), with a handful of queues in practice.
        bucket = max(0, math.ceil(4 * math.log2(max(delay * 1000.0, 1.0))))
        return f"{self.prefix}.delay.{topic}.{bucket}"

    async def _send_delayed(self, topic: str, body: bytes, message_id: str, delay: float) -> None:
        """Park the message in a delay queue with a per-message TTL; on expiry RabbitMQ dead-letters
        it to the topic exchange under the topic's routing key, and the topic's groups receive it."""
        if self._channel is None:
            raise BusError("the rabbitmq bus is not started")
        name = self.delay_queue_name(topic, delay)
        if name not in self._delay_queues:
            # Declared on the robust channel, so a reconnect declares it again.
            await self._channel.declare_queue(name, durable=True, arguments={
                "x-queue-type": "classic", "x-dead-letter-exchange": self.exchange_name,
                "x-dead-letter-routing-key": topic})
            self._delay_queues.add(name)
            self.declared_queues.add(name)
        expiration = str(max(int(delay * 1000), 1))  # milliseconds
        await self._send("", name, body, self._properties(message_id, expiration=expiration))

    async def _publish_raw(self, body: bytes, *, topic: str = EVENTS_TOPIC, message_id: str | None = None) -> None:
        """Publish bytes as they are (for tests: a message that is not a valid event)."""
        await self._send(self.exchange_name, topic, body, self._properties(message_id))

    async def consume(self, topic: str, group: str, handler: DeliveryHandler, *, prefetch: int | None = None,
                      batch: BatchHandler | None = None) -> _RabbitConsumer:
        consumer = _RabbitConsumer(self, topic, group, handler, prefetch or self.default_prefetch)
        consumer._batch = batch
        try:
            await consumer.start()
        except Exception as exc:
            await consumer.cancel()
            raise BusError(f"cannot consume {topic!r} as group {group!r}: {exc}") from exc
        self._consumers.add(consumer)
        return consumer
