"""The NATS JetStream bus (nats-py): one stream, a durable pull consumer per (topic, group)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import re
import time
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from router.bus import (EVENTS_TOPIC, BatchHandler, BusError, DeliveryHandler, SettledOnce, dead_letter_topic,
                        settle_batch, settle_by_handler)
from router.config import Config
from router.events import Event, InvalidEvent, derived_id

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

MSG_ID_HEADER = "Nats-Msg-Id"
STATUS_HEADER = "Status"  # how nats-py hands over a server status message (no payload)
PENDING_HEADER = "Nats-Pending-Messages"  # on the end of a pull request: how much of its batch went unused
NO_RESPONDERS = "503"
IDLE_HEARTBEAT = "100"

# Options this backend reads from the URL query (stripped before nats-py sees the URL).
_URL_OPTIONS = ("stream", "subject_prefix", "ack_wait")

_BAD_TOPIC = re.compile(r"[\s*>]|^\.|\.$|\.\.")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")

_STREAM_NAME_IN_USE = 10058  # JetStream: stream exists with a different configuration
_PUBLISH_ATTEMPT = 2.0  # seconds one publish attempt waits for its PubAck before sending it again


class _PubAcks:
    """Publishes that wait for JetStream's PubAck, any number in flight over one connection: one
    wildcard reply subscription, a reply subject per publish from a counter, one timer for all
    their deadlines, and a full JSON parse only for an answer that is not a plain PubAck.
    (`js.publish` pays for a random inbox token, a wait_for timer and a JSON parse per publish.)"""

    def __init__(self, nc: nats.NATS, stream: str):
        self._nc = nc
        # Which stream stored it, as the PubAck says: checked here rather than sent as a
        # Nats-Expected-Stream header, which the stream would store and every delivery carry.
        # (JetStream refuses streams with overlapping subjects, so this is a guard, not a filter.)
        self._stored_in = f'"stream":{json.dumps(stream)}'.encode()
        self._prefix = f"{nc.new_inbox()}."
        self._numbers = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Future, float]] = {}  # reply subject → (answer, deadline)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    async def start(self) -> None:
        # Like every subscription, nats-py subscribes it again after a reconnect.
        await self._nc.subscribe(f"{self._prefix}*", cb=self._on_answer)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> None:
        """Return once the stream has stored the message. Raises nats.errors.TimeoutError without an
        answer within `timeout`, NoStreamResponseError when no stream took it, APIError when the
        stream refused it, BusError on any other answer, and what nats-py raises when sending."""
        loop = asyncio.get_running_loop()
        reply = f"{self._prefix}{next(self._numbers)}"
        answer = loop.create_future()
        deadline = loop.time() + timeout
        self._waiting[reply] = (answer, deadline)
        if deadline < self._timer_at:
            self._expire_at(deadline)
        try:
            await self._nc.publish(subject, payload, reply=reply, headers=headers)
            msg = await answer
        finally:
            del self._waiting[reply]
        if msg is None:
            raise nats.errors.TimeoutError
        data = msg.data
        if b'"seq"' in data and b'"error"' not in data:
            if self._stored_in not in data:
                raise BusError(f"published to {subject!r} but stored by another stream: {data[:200]!r}")
            return  # {"stream": …, "seq": …[, "duplicate": true]}
        if not data and (msg.headers or {}).get(STATUS_HEADER) == NO_RESPONDERS:
            raise nats.js.errors.NoStreamResponseError
        try:
            error = json.loads(data).get("error")
        except (ValueError, AttributeError):
            error = None
        if error:
            raise nats.js.errors.APIError.from_error(error)
        raise BusError(f"unexpected answer to a publish: {data[:200]!r} {msg.headers}")

    async def _on_answer(self, msg: Msg) -> None:
        waiting = self._waiting.get(msg.subject)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(msg)

    def _expire_at(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)
        self._timer_at = when

    def _expire(self) -> None:
        """Answer None to every publish past its deadline; wake again at the next deadline."""
        self._timer, self._timer_at = None, math.inf
        now = asyncio.get_running_loop().time()
        nearest = math.inf
        for answer, deadline in self._waiting.values():
            if answer.done():
                continue
            if deadline <= now:
                answer.set_result(None)
            elif deadline < nearest:
                nearest = deadline
        if nearest < math.inf:
            self._expire_at(nearest)


class _Held:
    """A delivered message not yet settled, and when JetStream last heard of it (its delivery, or
    our last in-progress for it)."""

    __slots__ = ("msg", "since")

    def __init__(self, msg: Msg, since: float):
        self.msg = msg
        self.since = since


class _PullConsumer:
    """One member of a durable pull consumer that asks for messages itself: pull requests answered
    on its own inbox, whose messages go straight to a task each (nats-py's `fetch` awaits every
    message with a timeout of its own). At most `prefetch` messages are handled at once; it asks
    for more once a quarter of that is free, and keeps count of what its open requests may still
    bring so that it never asks for more than there is room for."""

    def __init__(self, bus: NatsBus, config: api.ConsumerConfig, prefetch: int):
        self.bus = bus
        self._subject = config.filter_subject
        self._config = config
        self._durable = config.durable_name
        self._prefetch = prefetch
        # Ask again once this much room is free, not at every finished message: under load a pull
        # per message would cost a request per message.
        self._refill = max(1, prefetch // 4)
        self._expires = bus.fetch_timeout  # how long a pull request waits on the server for messages
        # Long-running handlers tell JetStream they are still at it (functions can run for minutes,
        # and the event must not go to another member meanwhile): each sweep sends an in-progress
        # for every message JetStream has not heard of for `_beat_after`, so none goes AckWait/2
        # without one. One sweep over all of them, not a timer per message.
        self._beat_after = max(bus.ack_wait / 4, 0.05)
        self._sweep_every = min(self._beat_after, bus.fetch_timeout)
        # Messages in hand: by their handler task, or (handed over in a batch) by their delivery.
        self._running: dict[object, _Held] = {}
        self._batch_tasks: set[asyncio.Task] = set()
        self._ready: list[_Held] = []  # delivered this turn, for the batch handler
        # Delivered beyond prefetch: a pull request sent before a reconnect may still be served after
        # the next one was sent. These wait their turn rather than exceed the bound.
        self._queued: collections.deque[_Held] = collections.deque()
        self._asked = 0  # messages our open pull requests may still bring
        self._asked_at = 0.0
        self._wake = asyncio.Event()  # set when there may be room to ask for more
        self._nc: nats.NATS | None = None
        self._sub = None
        self._inbox = ""
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{bus.stream}.{self._durable}"
        self._task: asyncio.Task | None = None
        self._cancelled = False

    async def start(self) -> None:
        bus = self.bus
        try:
            await bus._js.consumer_info(bus.stream, self._durable)
        except nats.js.errors.NotFoundError:
            await bus._js.add_consumer(bus.stream, self._config)
        self._nc = bus._nc
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        self._wake.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"nats-consumer-{self._durable}")

    async def _handle(self, msg: Msg) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sweep_at = loop.time() + self._sweep_every
        # Not `while True`: nats-py swallows a cancellation that lands while it sends.
        while not self._cancelled:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, sweep_at - loop.time()))
            self._wake.clear()
            if loop.time() >= sweep_at:
                await self._sweep()
                sweep_at = loop.time() + self._sweep_every
            await self._pull()

    async def _pull(self) -> None:
        want = self._prefetch - len(self._running) - len(self._queued) - self._asked
        if want < self._refill or not self._nc.is_connected:
            return  # on reconnect, `reconnected` wakes us
        self._asked += want
        self._asked_at = asyncio.get_running_loop().time()
        request = b'{"batch":%d,"expires":%d}' % (want, int(self._expires * 1e9))
        try:
            await self._nc.publish(self._next_subject, request, reply=self._inbox)
        except Exception as exc:
            self._asked = max(0, self._asked - want)
            log.info("pull request failed; retrying", extra={"subject": self._subject, "reason": repr(exc)})

    async def _sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._asked and now > self._asked_at + self._expires + 1.0:
            # Every request sent has expired on the server by now: an end we did not hear of (lost
            # with a connection) must not hold back the next request.
            self._asked = 0
        due = now - self._beat_after
        for held in [*self._running.values(), *self._queued]:
            if held.since <= due:
                held.since = now
                with contextlib.suppress(Exception):
                    await held.msg.in_progress()

    async def _on_message(self, msg: Msg) -> None:
        if not msg.data and msg.headers and STATUS_HEADER in msg.headers:
            self._on_status(msg.headers)
            return
        if self._asked:
            self._asked -= 1
        held = _Held(msg, asyncio.get_running_loop().time())
        if len(self._running) < self._prefetch:
            self._start(held)
        else:
            self._queued.append(held)

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers[STATUS_HEADER]
        unused = headers.get(PENDING_HEADER)
        if unused is not None:
            # A pull request ended (expired: 408) with this much of its batch unused.
            self._asked = max(0, self._asked - int(unused))
            self._wake.set()
        elif status != IDLE_HEARTBEAT:
            # The server dropped our requests (no responders, leadership change, consumer deleted…):
            # forget them; the next sweep asks again.
            log.info("pull request ended by the server; asking again shortly",
                     extra={"subject": self._subject, "reason": f"{status} {headers.get('Description', '')}"})
            self._asked = 0

    def _start(self, held: _Held) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(held.msg))
        self._running[task] = held
        task.add_done_callback(self._done)

    def _done(self, key: object) -> None:
        """A message is out of hand (its task ended, or its batched delivery was settled)."""
        if self._running.pop(key, None) is None:
            return
        if self._cancelled:
            return
        if self._queued:
            self._start(self._queued.popleft())
        elif self._prefetch - len(self._running) - self._asked >= self._refill:
            self._wake.set()

    def reconnected(self) -> None:
        """Requests sent on the lost connection are gone or expire soon: ask afresh at once (the few
        an old request may still bring wait in `_queued`)."""
        self._asked = 0
        self._wake.set()

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()
        if self._sub is not None:
            # Only our inbox subscription goes; the durable consumer (the group) stays on the server.
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        queued = [held.msg for held in self._queued]
        self._queued.clear()
        tasks = [key for key in self._running if isinstance(key, asyncio.Task)] + list(self._batch_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(t for t in [self._task, *tasks] if t is not None), *map(self._give_back, queued),
                             return_exceptions=True)

    async def _give_back(self, msg: Msg) -> None:
        # Hand an event back now rather than making the group wait out AckWait (if this nak is
        # lost, AckWait still brings it back). The delay outlasts our last pull request, which the
        # server would otherwise still serve, to an inbox nobody reads any more.
        with contextlib.suppress(Exception):
            await asyncio.shield(msg.nak(delay=self._expires + 0.2))


class _NatsDelivery(SettledOnce):
    __slots__ = ("_consumer", "_msg", "_batched")

    def __init__(self, event: Event, topic: str, attempt: int, consumer: _NatsConsumer, msg: Msg,
                 batched: bool = False):
        super().__init__(event, topic, attempt)
        self._consumer = consumer
        self._msg = msg
        self._batched = batched  # handed over in a batch: its slot is free once it is settled

    async def ack(self) -> None:
        if self._batched and not self._settled:
            self._consumer._done(self)
        await super().ack()

    async def nack(self, *, requeue: bool = True, reason: str = "") -> None:
        if self._batched and not self._settled:
            self._consumer._done(self)
        await super().nack(requeue=requeue, reason=reason)

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


class _NatsConsumer(_PullConsumer):
    """One member of a consumer group: its events go to the handler, one delivery each."""

    def __init__(self, bus: NatsBus, topic: str, group: str, handler: DeliveryHandler, prefetch: int):
        super().__init__(bus, bus.consumer_config(topic, group), prefetch)
        self.topic = topic
        self.group = group
        self._handler = handler
        self._batch: BatchHandler | None = None

    def _start(self, held: _Held) -> None:
        if self._batch is None:
            super()._start(held)
            return
        # What arrives in one turn (one socket read's messages) goes to the batch handler together,
        # at the end of that turn (never later: a batch is not a wait).
        if not self._ready:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._ready.append(held)
        self._running[held] = held  # in hand from now on (re-keyed by its delivery below)

    def _hand_over(self) -> None:
        ready, self._ready = self._ready, []
        deliveries = []
        for held in ready:
            del self._running[held]
            if self._cancelled:
                continue  # not ours any more: AckWait hands it out again
            msg = held.msg
            attempt = _num_delivered(msg.reply)
            try:
                event = Event.from_json(msg.data)
            except InvalidEvent:
                event = None
            if event is None or attempt > self.bus.max_deliveries:
                super()._start(held)  # dead-lettered there, with the reason
                continue
            delivery = _NatsDelivery(event, self.topic, attempt, self, msg, batched=True)
            self._running[delivery] = held
            deliveries.append(delivery)
        if deliveries:
            task = asyncio.get_running_loop().create_task(self._handle_batch(deliveries))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _handle_batch(self, deliveries: list[_NatsDelivery]) -> None:
        try:
            await settle_batch(self._batch, deliveries, log, topic=self.topic, group=self.group)
        except asyncio.CancelledError:
            # Going away without an answer: hand back what was not settled.
            unsettled = [d for d in deliveries if not d._settled]
            for delivery in unsettled:
                delivery._settled = True
                self._done(delivery)
            await asyncio.gather(*(self._give_back(d._msg) for d in unsettled), return_exceptions=True)
            raise
        except Exception:
            log.exception("could not settle a batch of deliveries; JetStream will redeliver them",
                          extra={"topic": self.topic, "group": self.group})
        finally:
            for delivery in deliveries:  # settling failed half-way: JetStream redelivers after AckWait
                self._done(delivery)

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
        attempt = _num_delivered(msg.reply)
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
        try:
            await settle_by_handler(self._handler, delivery, log, topic=self.topic, group=self.group)
        except asyncio.CancelledError:
            # Going away without an answer: hand the event back.
            if not delivery._settled:
                delivery._settled = True
                await self._give_back(msg)
            raise

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
        await super().cancel()
        self.bus._consumers.discard(self)


class _DelayMover(_PullConsumer):
    """Moves delayed events of one topic onto the topic once they are due. Delayed events wait in
    the stream under `<prefix>._delayed.<topic>`; a durable consumer shared by every process of the
    bus takes each one, and hands back one not yet due with a nak delayed until its due time, which
    holds no consumer slot meanwhile. A crash loses nothing: an unacked event comes back."""

    def __init__(self, bus: NatsBus, topic: str):
        subject = bus.subject(delayed_topic(topic))
        config = api.ConsumerConfig(durable_name=bus.durable_name(delayed_topic(topic), "mover"),
                                    ack_policy=api.AckPolicy.EXPLICIT, ack_wait=bus.ack_wait, max_deliver=-1,
                                    deliver_policy=api.DeliverPolicy.ALL, filter_subject=subject)
        super().__init__(bus, config, prefetch=256)
        self.topic = topic

    async def _handle(self, msg: Msg) -> None:
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


def delayed_topic(topic: str) -> str:
    return f"_delayed.{topic}"


def _num_delivered(reply: str) -> int:
    # The ack subject is $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>,
    # with <domain>.<account hash> after ACK on newer servers (Msg.metadata parses all of it).
    tokens = reply.split(".")
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


def _msg_event_id(msg: Msg) -> str | None:
    # Our publishes set Nats-Msg-Id to "<topic>:<event id>"; fall back to the whole header.
    msg_id = (msg.headers or {}).get(MSG_ID_HEADER)
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
        self._acks: _PubAcks | None = None
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
            for consumer in [*self._consumers, *self._movers.values()]:
                consumer.reconnected()

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
            acks = _PubAcks(self._nc, self.stream)
            await acks.start()
            self._acks = acks
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
        self._nc = self._js = self._acks = None

    async def _send(self, topic: str, payload: bytes, msg_id: str, headers: dict[str, str] | None = None) -> None:
        """Publish and wait for the PubAck; retry across a reconnect with the same Nats-Msg-Id, so a
        retry of a publish that did land is de-duplicated by the stream."""
        acks = self._acks
        if acks is None:
            raise BusError("the nats bus is not started")
        subject = self.subject(topic)
        headers = {**(headers or {}), MSG_ID_HEADER: msg_id}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        last: Exception | None = None
        while (remaining := deadline - loop.time()) > 0:
            try:
                await acks.publish(subject, payload, headers, min(remaining, _PUBLISH_ATTEMPT))
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
        # one event may go to two topics, while a repeated publish to one topic is stored once. An
        # event is its source and id together (one id may come from two sources).
        key = key or derived_id("publish", event.source, event.id)
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

    async def consume(self, topic: str, group: str, handler: DeliveryHandler, *, prefetch: int | None = None,
                      batch: BatchHandler | None = None) -> _NatsConsumer:
        if self._js is None:
            raise BusError("the nats bus is not started")
        consumer = _NatsConsumer(self, topic, group, handler, prefetch or self.default_prefetch)
        consumer._batch = batch
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
