"""The bus contract: one suite every bus backend (memory, sqlite, rabbitmq, nats) must pass."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import pytest

from router.bus import Bus, Delivery, dead_letter_topic
from router.config import Config
from router.events import Event
from tests.services import NATS_URL, RABBITMQ_URL, require_service

MAX_DELIVERIES = 3
WAIT = 15.0  # upper bound for anything to arrive; tests finish as soon as it does


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


class Harness:
    """A started bus plus what the backend-specific cases need (unique names, breaking the link)."""

    def __init__(self, backend: str, bus: Bus):
        self.backend = backend
        self.bus = bus
        self.run_id = uuid.uuid4().hex[:8]

    def topic(self, name: str = "events") -> str:
        return f"{name}-{self.run_id}-{uuid.uuid4().hex[:6]}"

    async def break_connection(self) -> None:
        """Drop the broker connection under the bus's feet, as a network failure would."""
        if self.backend == "rabbitmq":
            transport = self.bus._connection.transport.connection
            # aiormq keeps the socket's StreamWriter only in its writer task: abort that socket.
            writer = transport._writer_task.get_coro().cr_frame.f_locals["writer"]
            writer.transport.abort()
        elif self.backend == "nats":
            self.bus._nc._transport._io_writer.transport.abort()
        else:
            pytest.skip(f"the {self.backend} bus has no connection to lose")


async def _cleanup_rabbitmq(bus) -> None:
    import aio_pika

    connection = await aio_pika.connect(str(bus.url))
    async with connection:
        channel = await connection.channel()
        for name in bus.declared_queues:
            await channel.queue_delete(name)
        for name in (bus.exchange_name, bus.unrouted_name):
            await channel.exchange_delete(name)


async def _cleanup_nats(bus) -> None:
    import nats

    nc = await nats.connect(bus.url)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(bus.stream)
    finally:
        await nc.close()


def _config() -> Config:
    return Config.load(overrides={"bus": {"max_deliveries": MAX_DELIVERIES, "prefetch": 32}})


@pytest.fixture(params=["memory", "sqlite", "rabbitmq", "nats"])
async def harness(request, tmp_path) -> AsyncIterator[Harness]:
    backend = request.param
    run = uuid.uuid4().hex[:8]
    cleanup: Callable | None = None
    if backend == "memory":
        from router.bus.memory import MemoryBus

        bus = MemoryBus(_config())
    elif backend == "sqlite":
        from router.bus.sqlite import SqliteBus

        bus = SqliteBus(_config(), url=f"sqlite://{tmp_path / 'bus.db'}")
    elif backend == "rabbitmq":
        require_service("RabbitMQ", *_host_port(RABBITMQ_URL, 5672))
        from router.bus.rabbitmq import RabbitMQBus

        bus = RabbitMQBus(_config(), url=RABBITMQ_URL, prefix=f"hwtest-{run}", reconnect_interval=0.2)
        cleanup = _cleanup_rabbitmq
    else:
        require_service("NATS", *_host_port(NATS_URL, 4222))
        from router.bus.nats import NatsBus

        bus = NatsBus(_config(), url=NATS_URL, stream=f"HWTEST_{run}", subject_prefix=f"hwtest_{run}",
                      ack_wait=1.0, nak_delay=0.05, fetch_timeout=0.5, reconnect_time_wait=0.2)
        cleanup = _cleanup_nats
    assert isinstance(bus, Bus)
    await bus.start()
    try:
        yield Harness(backend, bus)
    finally:
        await bus.close()
        if cleanup is not None:
            await cleanup(bus)


class Recorder:
    """A handler that records deliveries; `behaviour` may raise, block or settle by hand."""

    def __init__(self, behaviour: Callable | None = None, name: str = ""):
        self.name = name
        self.deliveries: list[tuple[str, int, str]] = []  # (event id, attempt, topic)
        self.events: list[Event] = []
        self._behaviour = behaviour
        self._changed = asyncio.Condition()
        self.dead_letter_reasons: list[str | None] = []

    async def __call__(self, delivery: Delivery) -> None:
        async with self._changed:
            self.deliveries.append((delivery.event.id, delivery.attempt, delivery.topic))
            self.events.append(delivery.event)
            self.dead_letter_reasons.append(delivery.dead_letter_reason)
            self._changed.notify_all()
        if self._behaviour is not None:
            await self._behaviour(delivery)

    @property
    def ids(self) -> list[str]:
        return [d[0] for d in self.deliveries]

    def attempts(self, event_id: str) -> list[int]:
        return [attempt for eid, attempt, _ in self.deliveries if eid == event_id]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def wait_count(self, n: int, timeout: float = WAIT) -> None:
        await self.wait_for(lambda: len(self.deliveries) >= n, timeout)


def make_event(i: int = 0, **extensions) -> Event:
    return Event(id=str(uuid.uuid4()), source="/headwater/tests", type="org.openstack.headwater.test",
                 data={"n": i}, extensions=extensions)


async def wait_all(recorders: list[Recorder], ids: set[str], timeout: float = WAIT) -> None:
    async def seen_all() -> None:
        while not ids <= {i for r in recorders for i in r.ids}:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(seen_all(), timeout)


# ---------------------------------------------------------------------------------------------


async def test_published_event_arrives_intact(harness: Harness):
    topic = harness.topic()
    recorder = Recorder()
    await harness.bus.consume(topic, "router", recorder)
    event = Event(
        id="swift-tx" + uuid.uuid4().hex,
        source="/swift/v1/AUTH_p1/photos",
        type="org.openstack.swift.object.created",
        subject="cats/é-tabby.jpg",
        time=dt.datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=dt.timezone.utc),
        datacontenttype="application/json",
        dataschema="https://headwater.example/schemas/swift-object.json",
        extensions={"projectid": "p1", "partitionkey": "photos/cats", "traceparent": "00-abc-def-01"},
        data={"bytes": 1234, "etag": "d41d8cd9", "tags": ["a", "ü", None], "nested": {"x": 1.5, "ok": True}},
    )
    await harness.bus.publish(event, topic=topic)
    await recorder.wait_count(1)
    assert recorder.events[0] == event
    assert recorder.deliveries[0][1:] == (1, topic)


async def test_each_group_gets_every_event_and_members_share(harness: Harness):
    topic = harness.topic()

    async def slow(delivery: Delivery) -> None:
        await asyncio.sleep(0.02)  # long enough that one member cannot take everything

    member_a1, member_a2, member_b = Recorder(slow), Recorder(slow), Recorder()
    await harness.bus.consume(topic, "group-a", member_a1, prefetch=1)
    await harness.bus.consume(topic, "group-a", member_a2, prefetch=1)
    await harness.bus.consume(topic, "group-b", member_b)
    events = [make_event(i) for i in range(20)]
    for event in events:
        await harness.bus.publish(event, topic=topic)
    ids = {e.id for e in events}
    await wait_all([member_b], ids)
    await wait_all([member_a1, member_a2], ids)
    await asyncio.sleep(0.3)  # quiet period: a duplicate or an extra attempt would show up now
    assert sorted(member_b.ids) == sorted(ids)
    assert sorted(member_a1.ids + member_a2.ids) == sorted(ids)
    assert not set(member_a1.ids) & set(member_a2.ids)
    assert member_a1.ids and member_a2.ids, "both members of group-a should have had work"


async def test_handler_exception_redelivers_with_next_attempt(harness: Harness):
    topic = harness.topic()

    async def fail_first(delivery: Delivery) -> None:
        if delivery.attempt == 1:
            raise RuntimeError("function runtime unavailable")

    recorder, dead = Recorder(fail_first), Recorder()
    await harness.bus.consume(topic, "router", recorder)
    await harness.bus.consume(dead_letter_topic(topic), "dlq", dead)
    event = make_event()
    await harness.bus.publish(event, topic=topic)
    await recorder.wait_count(2)
    await asyncio.sleep(0.3)  # quiet period: a duplicate or an extra attempt would show up now
    assert recorder.attempts(event.id) == [1, 2]
    assert recorder.events[1] == event
    assert dead.deliveries == []


async def test_unacked_delivery_returns_when_consumer_stops(harness: Harness):
    topic = harness.topic()
    never = asyncio.Event()

    async def hang(delivery: Delivery) -> None:
        await never.wait()  # the consumer "dies" holding the event

    dying = Recorder(hang)
    consumer = await harness.bus.consume(topic, "router", dying)
    event = make_event()
    await harness.bus.publish(event, topic=topic)
    await dying.wait_count(1)
    await consumer.cancel()

    survivor = Recorder()
    await harness.bus.consume(topic, "router", survivor)
    await survivor.wait_count(1)
    assert survivor.events[0] == event
    assert survivor.deliveries[0][1] == 2
    await asyncio.sleep(0.3)  # quiet period: a duplicate or an extra attempt would show up now
    assert survivor.ids == [event.id]


async def test_dead_letter_after_max_deliveries(harness: Harness):
    topic = harness.topic()

    async def always_fail(delivery: Delivery) -> None:
        raise ValueError("bad input")

    failing, dead = Recorder(always_fail), Recorder()
    await harness.bus.consume(topic, "router", failing)
    await harness.bus.consume(dead_letter_topic(topic), "dlq", dead)
    event = make_event(7, projectid="p1")
    await harness.bus.publish(event, topic=topic)
    await dead.wait_count(1)
    await asyncio.sleep(0.3)  # quiet period: a duplicate or an extra attempt would show up now
    assert failing.attempts(event.id) == list(range(1, MAX_DELIVERIES + 1))
    assert dead.events == [event]
    assert dead.deliveries[0][1:] == (1, dead_letter_topic(topic))
    # Why it was dead-lettered travels with it (the router records it for the API).
    assert "bad input" in dead.dead_letter_reasons[0]
    assert failing.dead_letter_reasons == [None] * MAX_DELIVERIES


async def test_nack_without_requeue_dead_letters_at_once(harness: Harness):
    topic = harness.topic()

    async def reject(delivery: Delivery) -> None:
        await delivery.nack(requeue=False, reason="schema mismatch")

    rejecting, dead = Recorder(reject), Recorder()
    await harness.bus.consume(topic, "router", rejecting)
    await harness.bus.consume(dead_letter_topic(topic), "dlq", dead)
    event = make_event()
    await harness.bus.publish(event, topic=topic)
    await dead.wait_count(1)
    await asyncio.sleep(0.2)  # quiet period: a duplicate or an extra attempt would show up now
    assert rejecting.attempts(event.id) == [1]
    assert dead.events == [event]
    assert "schema mismatch" in dead.dead_letter_reasons[0]


async def test_a_dead_letter_redelivered_keeps_its_reason(harness: Harness):
    """The dead-letter reader fails once (its database is down, say): the redelivery still says
    why the event was dead-lettered."""
    topic = harness.topic()

    async def reject(delivery: Delivery) -> None:
        await delivery.nack(requeue=False, reason="schema mismatch")

    failed_once: set[str] = set()

    async def fail_once(delivery: Delivery) -> None:
        if delivery.event.id not in failed_once:
            failed_once.add(delivery.event.id)
            raise RuntimeError("dead-letter store unavailable")

    dead = Recorder(fail_once)
    await harness.bus.consume(topic, "router", Recorder(reject))
    await harness.bus.consume(dead_letter_topic(topic), "dlq", dead)
    event = make_event()
    await harness.bus.publish(event, topic=topic)
    await dead.wait_count(2)
    assert dead.attempts(event.id) == [1, 2]
    assert all("schema mismatch" in (reason or "") for reason in dead.dead_letter_reasons), dead.dead_letter_reasons


async def test_one_id_from_two_sources_is_two_events(harness: Harness):
    # CloudEvents identity is source + id: a bus that de-duplicates publishes must not fold
    # id 1001 from /shop/eu into id 1001 from /shop/us.
    topic = harness.topic()
    recorder = Recorder()
    await harness.bus.consume(topic, "router", recorder)
    same_id = uuid.uuid4().hex
    for source in ("/shop/eu", "/shop/us"):
        await harness.bus.publish(Event(id=same_id, source=source, type="org.openstack.headwater.test"), topic=topic)
    await recorder.wait_count(2)
    assert sorted(e.source for e in recorder.events) == ["/shop/eu", "/shop/us"]


async def test_many_concurrent_events_none_lost_none_duplicated(harness: Harness):
    topic = harness.topic()

    async def work(delivery: Delivery) -> None:
        await asyncio.sleep(0.001)

    members = [Recorder(work, name=f"m{i}") for i in range(3)]
    for member in members:
        await harness.bus.consume(topic, "router", member, prefetch=20)
    events = [make_event(i) for i in range(500)]
    ids = {e.id for e in events}
    for start in range(0, len(events), 100):  # concurrent publishers, in waves
        await asyncio.gather(*(harness.bus.publish(e, topic=topic) for e in events[start:start + 100]))
    await wait_all(members, ids, timeout=30)
    await asyncio.sleep(0.5)  # quiet period: a duplicate or an extra attempt would show up now
    counts = collections.Counter(i for m in members for i in m.ids)
    assert set(counts) == ids
    assert [i for i, n in counts.items() if n > 1] == []


async def test_single_consumer_with_prefetch_one_sees_publish_order(harness: Harness):
    topic = harness.topic()
    recorder = Recorder()
    await harness.bus.consume(topic, "router", recorder, prefetch=1)
    events = [make_event(i, partitionkey="tenant-1") for i in range(50)]
    for event in events:
        await harness.bus.publish(event, topic=topic)
    await recorder.wait_count(len(events))
    assert recorder.ids == [e.id for e in events]


async def test_invalid_message_is_dead_lettered_and_consumer_survives(harness: Harness, caplog):
    if harness.backend == "memory":
        pytest.skip("the memory bus carries Event objects; it cannot hold an invalid one")
    topic = harness.topic()
    recorder, dead = Recorder(), Recorder()
    await harness.bus.consume(topic, "router", recorder)
    await harness.bus.consume(dead_letter_topic(topic), "dlq", dead)
    caplog.set_level(logging.WARNING)
    await harness.bus._publish_raw(b'{"specversion": "0.3", "id": "x"}', topic=topic, message_id="bad-1")
    event = make_event()
    await harness.bus.publish(event, topic=topic)
    await recorder.wait_count(1)

    def rejected_on(t: str) -> bool:
        return any(getattr(r, "topic", None) == t and "not a valid event" in r.getMessage() for r in caplog.records)

    # The dead-letter topic's own consumer rejecting it too proves it arrived there.
    for _ in range(100):
        if rejected_on(topic) and rejected_on(dead_letter_topic(topic)):
            break
        await asyncio.sleep(0.05)
    assert rejected_on(topic)
    assert rejected_on(dead_letter_topic(topic))
    assert recorder.ids == [event.id]
    assert dead.deliveries == []


async def test_publish_and_consume_resume_after_connection_loss(harness: Harness):
    if harness.backend in ("memory", "sqlite"):
        pytest.skip(f"the {harness.backend} bus has no connection to lose")
    topic = harness.topic()
    recorder = Recorder()
    await harness.bus.consume(topic, "router", recorder)
    before = [make_event(i) for i in range(20)]
    for event in before:
        await harness.bus.publish(event, topic=topic)
    await wait_all([recorder], {e.id for e in before})

    await harness.break_connection()
    after = [make_event(i) for i in range(20, 40)]
    for event in after:
        await harness.bus.publish(event, topic=topic)  # waits out the reconnect; must not lose any
    await wait_all([recorder], {e.id for e in before + after}, timeout=20)
    # At-least-once: a delivery in flight at the break may come again, but none is missing.
    assert {e.id for e in before + after} == set(recorder.ids)


# -- batch consumers (consume(..., batch=h)): what is ready goes over as one list ----------------


class Batches:
    """A batch handler: records each batch's size and settles each delivery as soon as its own
    behaviour ends (ack; nack if it raised), as the dispatcher does."""

    def __init__(self, behaviour: Callable | None = None):
        self.sizes: list[int] = []
        self.recorder = Recorder(behaviour)

    async def __call__(self, deliveries: list[Delivery]) -> None:
        self.sizes.append(len(deliveries))

        async def one(delivery: Delivery) -> None:
            try:
                await self.recorder(delivery)
            except Exception as exc:
                await delivery.nack(requeue=True, reason=str(exc))
            else:
                await delivery.ack()

        await asyncio.gather(*(one(d) for d in deliveries))


async def _one_at_a_time(delivery: Delivery) -> None:
    raise AssertionError("a batch consumer handed a valid event to the one-at-a-time handler")


async def test_batch_consumer_gets_what_is_ready_together_each_event_once(harness: Harness):
    topic = harness.topic()
    await harness.bus.ensure_group(topic, "router")
    events = [make_event(i) for i in range(100)]
    for start in range(0, len(events), 25):  # waiting before the consumer starts: ready at once
        await asyncio.gather(*(harness.bus.publish(e, topic=topic) for e in events[start:start + 25]))
    batches = Batches()
    await harness.bus.consume(topic, "router", _one_at_a_time, batch=batches)
    await batches.recorder.wait_count(len(events))
    assert sorted(batches.recorder.ids) == sorted(e.id for e in events)
    assert max(batches.sizes) > 1, batches.sizes
    assert max(batches.sizes) <= 32  # never beyond the prefetch
    assert {attempt for _, attempt, _ in batches.recorder.deliveries} == {1}


async def test_a_settled_delivery_frees_its_slot_while_its_batch_runs(harness: Harness):
    """A slow execution holds its own slot, never the slots of the others handed over with it."""
    topic = harness.topic()
    release = asyncio.Event()
    slow_id = "slow-" + uuid.uuid4().hex

    async def behaviour(delivery: Delivery) -> None:
        if delivery.event.id == slow_id:
            await release.wait()

    batches = Batches(behaviour)
    await harness.bus.consume(topic, "router", _one_at_a_time, prefetch=2, batch=batches)
    await harness.bus.publish(Event(id=slow_id, source="/headwater/tests", type="t", data={}), topic=topic)
    await batches.recorder.wait_count(1)
    later = [make_event(i) for i in range(5)]
    for event in later:  # one at a time through the one free slot, while the slow one holds its own
        await harness.bus.publish(event, topic=topic)
    try:
        await batches.recorder.wait_for(lambda: {e.id for e in later} <= set(batches.recorder.ids))
    finally:
        release.set()
    assert batches.recorder.ids[0] == slow_id


async def test_batch_nack_and_failure_redeliver(harness: Harness):
    topic = harness.topic()
    failing_id = "fail-" + uuid.uuid4().hex

    async def fail_first(delivery: Delivery) -> None:
        if delivery.event.id == failing_id and delivery.attempt == 1:
            raise RuntimeError("function runtime unavailable")

    batches = Batches(fail_first)
    await harness.bus.consume(topic, "router", _one_at_a_time, batch=batches)
    ok = make_event(1)
    await harness.bus.publish(Event(id=failing_id, source="/headwater/tests", type="t", data={}), topic=topic)
    await harness.bus.publish(ok, topic=topic)
    await batches.recorder.wait_for(lambda: batches.recorder.attempts(failing_id) == [1, 2] and ok.id in batches.recorder.ids)
    assert batches.recorder.attempts(ok.id) == [1]

    # A batch handler that raises without settling: what it held comes back, next attempt.
    topic = harness.topic()
    calls = []

    async def broken(deliveries: list[Delivery]) -> None:
        calls.append([(d.event.id, d.attempt) for d in deliveries])
        if len(calls) == 1:
            raise RuntimeError("router bug")
        for d in deliveries:
            await d.ack()

    event = make_event(2)
    await harness.bus.consume(topic, "router", _one_at_a_time, batch=broken)
    await harness.bus.publish(event, topic=topic)

    async def redelivered() -> None:
        while (event.id, 2) not in [item for call in calls for item in call]:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(redelivered(), WAIT)
    assert calls[0] == [(event.id, 1)]
