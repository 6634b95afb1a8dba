"""The NATS bus's own machinery, past what the bus contract checks: pipelined PubAcks with one
deadline timer, the pull consumer's prefetch bound, and in-progress beats for long handlers."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
import nats.errors
import pytest

from router.bus import BusError
from router.bus.nats import NatsBus
from router.events import Event
from tests.services import NATS_URL, require_service


@pytest.fixture
async def bus():
    require_service("NATS", "127.0.0.1", 4222)
    run = uuid.uuid4().hex[:8]
    bus = NatsBus(url=NATS_URL, stream=f"HWUNIT_{run}", subject_prefix=f"hwunit_{run}", ack_wait=1.0,
                  nak_delay=0.05, fetch_timeout=0.5, reconnect_time_wait=0.2)
    await bus.start()
    try:
        yield bus
    finally:
        stream = bus.stream
        await bus.close()
        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().delete_stream(stream)
        except Exception:
            pass
        await nc.close()


def event(i: int = 0) -> Event:
    return Event(id=str(uuid.uuid4()), source="/headwater/tests", type="t", data={"n": i})


async def test_concurrent_publishes_all_acknowledged_and_none_left_waiting(bus):
    seen: list[str] = []
    done = asyncio.get_running_loop().create_future()
    events = [event(i) for i in range(300)]

    async def handler(delivery):
        seen.append(delivery.event.id)
        if len(seen) == len(events) and not done.done():
            done.set_result(None)

    await bus.consume("events", "router", handler)
    await asyncio.gather(*(bus.publish(e) for e in events))
    assert bus._acks._waiting == {}
    await asyncio.wait_for(done, 10)
    assert sorted(seen) == sorted(e.id for e in events)


async def test_each_publish_times_out_at_its_own_deadline(bus):
    # A plain subscriber takes the message but never answers: no PubAck, no "no responders" either.
    silent = await bus._nc.subscribe("hwunit-silent.>")
    loop = asyncio.get_running_loop()
    started = loop.time()
    finished: dict[str, float] = {}

    async def attempt(name: str, timeout: float) -> None:
        with pytest.raises(nats.errors.TimeoutError):
            await bus._acks.publish(f"hwunit-silent.{name}", b"x", {}, timeout)
        finished[name] = loop.time() - started

    late = loop.create_task(attempt("late", 5.0))
    await asyncio.sleep(0)
    await attempt("early", 0.2)  # an earlier deadline than the one the timer waits for
    assert "late" not in finished, "the earlier deadline was served first, not at the later one"
    await late
    assert list(finished) == ["early", "late"] and finished["early"] >= 0.2 and finished["late"] >= 5.0, finished
    assert bus._acks._waiting == {}
    await silent.unsubscribe()


async def test_publish_the_stream_refuses_fails_at_once(bus):
    bus.publish_timeout = 3600.0  # an answer before the test's own timeout means no retrying to the deadline
    with pytest.raises(BusError, match="refused"):
        # A condition the stream checks and refuses with an API error (wrong last sequence).
        await bus._send("events", event().to_json(), "refused-1", {"Nats-Expected-Last-Sequence": "999999"})


async def test_publish_stored_by_another_stream_is_an_error(bus):
    bus._acks._stored_in = b'"stream":"NOT_THE_STREAM"'  # as if another stream had taken the subject
    with pytest.raises(BusError, match="another stream"):
        await bus.publish(event())


async def test_publish_without_a_stream_retries_until_the_deadline(bus):
    bus.publish_timeout = 1.0
    nc = await nats.connect(NATS_URL)
    await nc.jetstream().delete_stream(bus.stream)  # JetStream answers "no responders" (503)
    await nc.close()
    started = time.monotonic()
    with pytest.raises(BusError, match="not acknowledged within"):
        await bus.publish(event())
    assert time.monotonic() - started >= 0.9  # it kept trying until the deadline


async def test_publish_answers_still_arrive_after_a_reconnect(bus):
    await bus.publish(event())
    bus._nc._transport._io_writer.transport.abort()
    # Those sent into the dying connection are sent again after their first attempt's 2 s.
    await asyncio.wait_for(asyncio.gather(*(bus.publish(event(i)) for i in range(50))), 8)
    assert bus._acks._waiting == {}


async def test_no_more_than_prefetch_handlers_run_at_once(bus):
    running, most, seen = 0, 0, []
    events = [event(i) for i in range(60)]

    async def handler(delivery):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        seen.append(delivery.event.id)

    await bus.consume("events", "router", handler, prefetch=4)
    await asyncio.gather(*(bus.publish(e) for e in events))
    deadline = time.monotonic() + 10
    while len(seen) < len(events) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sorted(seen) == sorted(e.id for e in events)
    assert most == 4


async def test_a_handler_running_past_ack_wait_keeps_its_event(bus):
    deliveries: list[tuple[str, int]] = []
    finished = asyncio.Event()

    async def slow(delivery):
        deliveries.append((delivery.event.id, delivery.attempt))
        await asyncio.sleep(2.5)  # AckWait is 1 s: only in-progress beats keep the event here
        finished.set()

    await bus.consume("events", "router", slow)
    await bus.consume("events", "router", slow)  # a second member that would get a redelivery
    sent = event()
    await bus.publish(sent)
    await asyncio.wait_for(finished.wait(), 60)
    await asyncio.sleep(1.5)  # quiet period: past AckWait, a redelivery would show up now
    assert deliveries == [(sent.id, 1)]
