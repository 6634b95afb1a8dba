"""The NATS JetStream bus (nats-py): one stream, a durable pull consumer per (topic, group)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from router.bus import EVENTS_TOPIC, BusError, DeliveryHandler, SettledOnce, dead_letter_topic, settle_by_handler
from router.config import Config
from router.events import Event, InvalidEvent

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_STREAM = "HEADWATER"
DEFAULT_SUBJECT_PREFIX = "headwater"

REASON_HEADER = "Headwater-Dead-Letter-Reason"
ORIGIN_TOPIC_HEADER = "Headwater-Original-Topic"
ORIGIN_GROUP_HEADER = "Headwater-Group"
ATTEMPTS_HEADER = "Headwater-Attempts"
DUE_HEADER = "Headwater-Due"  # a delayed event's due time, Unix seconds
KEY_HEADER = "Headwater-Key"  # a delayed event's de-duplication key on its topic

# Options this backend reads from the URL query (stripped before nats-py sees the URL).
_URL_OPTIONS = ("stream", "subject_prefix", "ack_wait")

_BAD_TOPIC = re.compile(r"[\s*>]|^\.|\.$|\.\.")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")

_STREAM_NAME_IN_USE = 10058  # JetStream: stream exists with a different configuration


class _NatsDelivery(SettledOnce):
    __slots__ = ("_consumer", "_msg")

    def __init__(self, event: Event, topic: str, attempt: int, consumer: _NatsConsumer, msg: Msg):
        super().__init__(event, topic, attempt)
        self._consumer = consumer
        self._msg = msg

    @property
    def dead_letter_reason(self) -> str | None:
        return (self._msg.headers or {}).get(REASON_HEADER)

    @property
    def _max_deliveries(self) -> int:
        return self._consumer.bus.max_deliveries

    async def _ack(self) -> None:
        try:
            await self._msg.ack()
        except Exception as exc:
            # Lost with the connection: JetStream redelivers after AckWait; at-least-once holds.
            raise BusError(f"ack failed: {exc}") from exc

    async def _requeue(self) -> None:
        # The delay keeps a failing event from spinning hot against a broken dependency.
        await self._msg.nak(delay=self._consumer.bus.nak_delay)

    async def _dead_letter(self, reason: str) -> None:
        await self._consumer._dead_letter(self._msg, self.event.id, self.attempt, reason)


class _Heartbeat:
    """Tells JetStream every `interval` seconds that a message is still being worked on: a handler
    may run longer than AckWait (functions can run for minutes), and the event must not go to
    another member meanwhile."""

    __slots__ = ("_msg", "_interval", "_timer", "_sending")

    def __init__(self, msg: Msg, interval: float):
        self._msg = msg
        self._interval = interval
        self._sending: asyncio.Task | None = None
        self._timer = asyncio.get_running_loop().call_later(interval, self._beat)

    def _beat(self) -> None:
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send())
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._beat)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await self._msg.in_progress()

    def cancel(self) -> None:
        self._timer.cancel()
        if self._sending is not None:
            self._sending.cancel()


class _NatsConsumer:
    """One member of a consumer group: a fetch loop on the group's durable pull consumer."""

    def __init__(self, bus: NatsBus, topic: str, group: str, handler: DeliveryHandler, prefetch: int):
        self.bus = bus
        self.topic = topic
        self.group = group
        self._handler = handler
        self._prefetch = prefetch
        self._psub = None
        self._inflight: set[asyncio.Task] = set()
        self._room = asyncio.Event()
        self._room.set()
        # Fetch again once this much room is free, not at every finished message: under load a
        # pull per message would cost a server round trip per message.
        self._refill = max(1, prefetch // 4)
        self._loop_task: asyncio.Task | None = None
        self._cancelled = False

    async def start(self) -> None:
        bus = self.bus
        durable = bus.durable_name(self.topic, self.group)
        config = bus.consumer_config(self.topic, self.group)
        self._psub = await bus._js.pull_subscribe(bus.subject(self.topic), durable=durable, stream=bus.stream,
                                                  config=config)
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"nats-consumer-{durable}")

    async def _run(self) -> None:
        while not self._cancelled:
            await self._room.wait()
            want = self._prefetch - len(self._inflight)
            if want < self._refill:
                self._room.clear()
                continue
            try:
                msgs = await self._psub.fetch(batch=want, timeout=self.bus.fetch_timeout)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Disconnected or reconnecting: nats-py restores the subscription; wait and retry.
                log.info("fetch failed; retrying", extra={"topic": self.topic, "group": self.group, "reason": repr(exc)})
                await asyncio.sleep(self.bus.reconnect_time_wait)
                continue
            for msg in msgs:
                task = asyncio.get_running_loop().create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._done)
            if self._prefetch - len(self._inflight) < self._refill:
                self._room.clear()

    def _done(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        if self._prefetch - len(self._inflight) >= self._refill:
            self._room.set()

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._process(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Settling failed (connection lost, dead-letter publish refused): JetStream redelivers
            # after AckWait, so nothing is lost.
            log.exception("could not settle a delivery; JetStream will redeliver it",
                          extra={"event_id": _msg_event_id(msg), "topic": self.topic, "group": self.group})

    async def _process(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        try:
            event = Event.from_json(msg.data)
        except InvalidEvent as exc:
            log.error("message is not a valid event; dead-lettering it",
                      extra={"event_id": _msg_event_id(msg), "topic": self.topic, "group": self.group, "reason": str(exc)})
            await self._dead_letter(msg, None, attempt, f"invalid event: {exc}")
            return
        if attempt > self.bus.max_deliveries:
            # Only reachable when consumers died holding it (AckWait expiry, not our naks).
            await self._dead_letter(msg, event.id, attempt - 1, "max deliveries reached (consumers stopped while handling it)")
            return
        delivery = _NatsDelivery(event, self.topic, attempt, self, msg)
        # A timer, not a task: most handlers finish long before the first heartbeat is due.
        heartbeat = _Heartbeat(msg, max(self.bus.ack_wait / 2, 0.05))
        try:
            await settle_by_handler(self._handler, delivery, log, topic=self.topic, group=self.group)
        except asyncio.CancelledError:
            # Going away without an answer: hand the event back now rather than making the group
            # wait out AckWait (if this nak is lost, AckWait still brings it back). The delay
            # outlasts our last pull request, which the server would otherwise still serve, to
            # an inbox nobody reads any more.
            if not delivery._settled:
                delivery._settled = True
                with contextlib.suppress(Exception):
                    await asyncio.shield(msg.nak(delay=self.bus.fetch_timeout + 0.2))
            raise
        finally:
            heartbeat.cancel()

    async def _dead_letter(self, msg: Msg, event_id: str | None, attempt: int, reason: str) -> None:
        target = dead_letter_topic(self.topic)
        log.warning("event dead-lettered", extra={"event_id": event_id or _msg_event_id(msg), "topic": self.topic,
                                                 "group": self.group, "attempts": attempt, "reason": reason})
        headers = {REASON_HEADER: reason[:1000], ORIGIN_TOPIC_HEADER: self.topic, ORIGIN_GROUP_HEADER: self.group,
                   ATTEMPTS_HEADER: str(attempt)}
        # The id names the group too: two groups dead-lettering one event are two dead letters,
        # while a retry of this very publish is de-duplicated by JetStream.
        msg_id = f"{target}:{self.group}:{event_id or msg.metadata.sequence.stream}"
        await self.bus._send(target, msg.data, msg_id, headers)
        await msg.term()

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(t for t in [self._loop_task, *tasks] if t is not None), return_exceptions=True)
        if self._psub is not None:
            # Only our inbox subscription goes; the durable consumer (the group) stays on the server.
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
        self.bus._consumers.discard(self)


class _DelayMover:
    """Moves delayed events of one topic onto the topic once they are due. Delayed events wait in
    the stream under `<prefix>._delayed.<topic>`; a durable consumer shared by every process of the
    bus takes each one, and hands back one not yet due with a nak delayed until its due time, which
    holds no consumer slot meanwhile. A crash loses nothing: an unacked event comes back."""

    def __init__(self, bus: NatsBus, topic: str):
        self.bus = bus
        self.topic = topic
        self._psub = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        bus = self.bus
        subject = bus.subject(delayed_topic(self.topic))
        durable = bus.durable_name(delayed_topic(self.topic), "mover")
        config = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=bus.ack_wait,
                                    max_deliver=-1, deliver_policy=api.DeliverPolicy.ALL, filter_subject=subject)
        self._psub = await bus._js.pull_subscribe(subject, durable=durable, stream=bus.stream, config=config)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"nats-delay-{durable}")

    async def _run(self) -> None:
        while True:
            try:
                msgs = await self._psub.fetch(batch=256, timeout=self.bus.fetch_timeout)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("delayed fetch failed; retrying", extra={"topic": self.topic, "reason": repr(exc)})
                await asyncio.sleep(self.bus.reconnect_time_wait)
                continue
            await asyncio.gather(*(self._move(msg) for msg in msgs), return_exceptions=True)

    async def _move(self, msg: Msg) -> None:
        headers = msg.headers or {}
        try:
            due = float(headers.get(DUE_HEADER, 0))
        except ValueError:
            due = 0.0
        remaining = due - time.time()
        try:
            if remaining > 0.001:
                await msg.nak(delay=remaining)
                return
            key = headers.get(KEY_HEADER) or _msg_event_id(msg) or str(msg.metadata.sequence.stream)
            # The same Nats-Msg-Id on every try: a move repeated after a crash is stored once.
            await self.bus._send(self.topic, msg.data, f"{self.topic}:{key}")
            await msg.ack()
        except Exception:
            log.warning("could not move a delayed event; it comes back after AckWait", exc_info=True,
                        extra={"topic": self.topic})

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()


def delayed_topic(topic: str) -> str:
    return f"_delayed.{topic}"


def _msg_event_id(msg: Msg) -> str | None:
    # Our publishes set Nats-Msg-Id to "<topic>:<event id>"; fall back to the whole header.
    msg_id = (msg.headers or {}).get("Nats-Msg-Id")
    return msg_id.split(":", 1)[-1] if msg_id else None


class NatsBus:
    """Topics are subjects `<prefix>.<topic>` of one stream; each group is a durable pull consumer."""

    name: ClassVar[str] = "nats"

    def __init__(self, config: Config | None = None, *, url: str | None = None, stream: str | None = None,
                 subject_prefix: str | None = None, ack_wait: float | None = None, nak_delay: float = 1.0,
                 publish_timeout: float = 10.0, start_timeout: float = 10.0, fetch_timeout: float = 1.0, reconnect_time_wait: float = 0.5,
                 max_age: float = 7 * 86400, duplicate_window: float = 120.0,
                 max_deliveries: int | None = None, prefetch: int | None = None):
        raw = url or (config.bus.url if config else None) or DEFAULT_URL
        parts = urlsplit(raw)
        query = dict(parse_qsl(parts.query))
        self.url = urlunsplit(parts._replace(query="&".join(f"{k}={v}" for k, v in query.items() if k not in _URL_OPTIONS)))
        self.stream = stream or query.get("stream") or DEFAULT_STREAM
        self.subject_prefix = subject_prefix or query.get("subject_prefix") or DEFAULT_SUBJECT_PREFIX
        self.ack_wait = float(ack_wait or query.get("ack_wait") or 30.0)
        self.nak_delay = nak_delay
        self.publish_timeout = publish_timeout
        self.start_timeout = start_timeout
        self.fetch_timeout = fetch_timeout
        self.reconnect_time_wait = reconnect_time_wait
        self.max_age = max_age
        self.duplicate_window = duplicate_window
        self.max_deliveries = max_deliveries or (config.bus.max_deliveries if config else 10)
        self.default_prefetch = prefetch or (config.bus.prefetch if config else 256)
        self._nc: nats.NATS | None = None
        self._js = None
        self._consumers: set[_NatsConsumer] = set()
        self._movers: dict[str, _DelayMover] = {}
        self._closing = False

    def subject(self, topic: str) -> str:
        if not topic or _BAD_TOPIC.search(topic):
            raise ValueError(f"topic {topic!r} cannot be a NATS subject (no spaces, wildcards or empty tokens)")
        return f"{self.subject_prefix}.{topic}"

    @staticmethod
    def durable_name(topic: str, group: str) -> str:
        # Durable names may not contain dots or wildcards; the hash keeps distinct (topic, group)
        # pairs distinct after the clean-up.
        digest = hashlib.sha1(f"{topic}\x1f{group}".encode()).hexdigest()[:10]
        return f"{_NOT_NAME.sub('_', topic)}__{_NOT_NAME.sub('_', group)}_{digest}"

    async def start(self) -> None:
        async def on_error(exc: Exception) -> None:
            log.warning("nats connection error: %r", exc, extra={"reason": repr(exc)})

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("nats disconnected; reconnecting")

        async def on_reconnect() -> None:
            log.info("nats reconnected")

        self._closing = False
        self._nc = nats.NATS()
        try:
            # Reconnect forever once connected, but do not wait forever for the first connection:
            # nats-py would keep retrying it, and a router that cannot reach its bus should say so.
            await asyncio.wait_for(
                self._nc.connect(self.url, reconnect_time_wait=self.reconnect_time_wait, max_reconnect_attempts=-1,
                                 connect_timeout=2, error_cb=on_error, disconnected_cb=on_disconnect,
                                 reconnected_cb=on_reconnect, name=f"headwater-{self.stream}"),
                self.start_timeout)
            self._js = self._nc.jetstream(timeout=self.publish_timeout)
            config = api.StreamConfig(
                name=self.stream, subjects=[f"{self.subject_prefix}.>"], retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE, max_age=self.max_age, duplicate_window=self.duplicate_window,
            )
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                await self._js.update_stream(config)
        except Exception as exc:
            await self.close()
            raise BusError(f"cannot start the NATS bus at {self.url}: {type(exc).__name__}: {exc}") from exc
        log.info("nats bus started", extra={"stream": self.stream})

    async def close(self) -> None:
        self._closing = True
        for consumer in list(self._consumers):
            await consumer.cancel()
        for mover in list(self._movers.values()):
            await mover.cancel()
        self._movers.clear()
        if self._nc is not None:
            # Drain flushes pending acks; bounded, so a dead server cannot hold up shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), 5)
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = self._js = None

    async def _send(self, topic: str, payload: bytes, msg_id: str, headers: dict[str, str] | None = None) -> None:
        """Publish and wait for the PubAck; retry across a reconnect with the same Nats-Msg-Id, so a
        retry of a publish that did land is de-duplicated by the stream."""
        if self._js is None:
            raise BusError("the nats bus is not started")
        subject = self.subject(topic)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        last: Exception | None = None
        while (remaining := deadline - loop.time()) > 0:
            try:
                await self._js.publish(subject, payload, timeout=min(remaining, 2.0), stream=self.stream,
                                       headers={**(headers or {}), "Nats-Msg-Id": msg_id})
                return
            except nats.js.errors.APIError as exc:
                raise BusError(f"JetStream refused the event for {topic!r}: {exc}") from exc
            except (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.NoStreamResponseError, nats.errors.ConnectionClosedError,
                    nats.errors.OutboundBufferLimitError, nats.errors.ConnectionReconnectingError, OSError) as exc:
                # Reconnecting, or the stream is between leaders: retry until the deadline.
                last = exc
                log.info("publish not acknowledged yet; retrying", extra={"event_id": msg_id, "reason": repr(exc)})
                await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
            except Exception as exc:
                raise BusError(f"publish to {topic!r} failed: {exc!r}") from exc
        raise BusError(f"publish to {topic!r} not acknowledged within {self.publish_timeout}s: {last!r}")

    async def publish(self, event: Event, *, topic: str = EVENTS_TOPIC, delay: float = 0.0, key: str | None = None) -> None:
        # De-duplication is per stream, and the stream holds every topic: the id names the topic so
        # one event may go to two topics, while a repeated publish to one topic is stored once.
        key = key or event.id
        if delay > 0:
            parked = delayed_topic(topic)
            await self._send(parked, event.to_json(), f"{parked}:{key}",
                             {DUE_HEADER: f"{time.time() + delay:.3f}", KEY_HEADER: key})
            return
        await self._send(topic, event.to_json(), f"{topic}:{key}")

    def consumer_config(self, topic: str, group: str) -> api.ConsumerConfig:
        # Dead letters are kept for whoever comes to read them; any other new group starts with the
        # events published from now on (a new subscription does not replay the stream's history).
        is_dead_letter_topic = topic.endswith(dead_letter_topic(""))
        policy = api.DeliverPolicy.ALL if is_dead_letter_topic else api.DeliverPolicy.NEW
        return api.ConsumerConfig(
            durable_name=self.durable_name(topic, group),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            # Two spare deliveries past max_deliveries: a message whose consumers died while
            # holding it still comes back once more so that we can dead-letter it (and once more
            # if that publish failed), instead of JetStream silently giving up on it.
            max_deliver=self.max_deliveries + 2,
            deliver_policy=policy,
            filter_subject=self.subject(topic),
        )

    async def ensure_group(self, topic: str, group: str) -> None:
        if self._js is None:
            raise BusError("the nats bus is not started")
        try:
            await self._js.add_consumer(self.stream, self.consumer_config(topic, group))
        except Exception as exc:
            raise BusError(f"cannot create group {group!r} of {topic!r}: {exc}") from exc

    async def _publish_raw(self, body: bytes, *, topic: str = EVENTS_TOPIC, message_id: str | None = None) -> None:
        """Publish bytes as they are (for tests: a message that is not a valid event)."""
        await self._send(topic, body, f"{topic}:{message_id or hashlib.sha1(body).hexdigest()}")

    async def consume(self, topic: str, group: str, handler: DeliveryHandler, *, prefetch: int | None = None) -> _NatsConsumer:
        if self._js is None:
            raise BusError("the nats bus is not started")
        consumer = _NatsConsumer(self, topic, group, handler, prefetch or self.default_prefetch)
        try:
            if topic not in self._movers:
                # Whoever consumes a topic also moves its delayed events on when they are due.
                mover = _DelayMover(self, topic)
                await mover.start()
                self._movers[topic] = mover
            await consumer.start()
        except Exception as exc:
            await consumer.cancel()
            raise BusError(f"cannot consume {topic!r} as group {group!r}: {exc}") from exc
        self._consumers.add(consumer)
        return consumer
