"""Durability against the real brokers: a SIGKILLed `headwater serve` loses no event and runs none
twice, a broker connection cut behind a TCP proxy heals by itself, two replicas split a stream and
share a per-second cron job. PostgreSQL holds the execution records (shared across restarts and
replicas); the null engine keeps the runs short."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from router.app import Headwater
from router.bus.nats import NatsBus
from router.bus.rabbitmq import RabbitMQBus
from router.bus.sqlite import SqliteBus
from router.config import Config
from router.events import Event, derived_id
from tests.e2e.server import Server, make_zip
from tests.integration.tcpproxy import TcpProxy
from tests.services import NATS_URL, POSTGRES_URL, RABBITMQ_URL, require_service

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

EVENT_TYPE = "durability.test"
BACKENDS = ["sqlite", "rabbitmq", "nats"]
BROKERS = ["rabbitmq", "nats"]


def require(backend: str) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    if backend == "rabbitmq":
        require_service("RabbitMQ", "127.0.0.1", 5672)
    elif backend == "nats":
        require_service("NATS", "127.0.0.1", 4222)


class BusPlace:
    """One test's own corner of a broker: a RabbitMQ prefix, or a JetStream stream and subjects."""

    def __init__(self, backend: str):
        self.backend = backend
        self.tag = uuid.uuid4().hex[:10]
        # The sqlite bus: one file every server of the test shares (the data dirs differ).
        self.directory = Path(tempfile.gettempdir()) / f"hwt-bus-{self.tag}"

    def url(self, port: int | None = None) -> str:
        """The broker URL, through a proxy on `port` when given."""
        if self.backend == "sqlite":
            return f"sqlite://{self.directory / 'bus.db'}"
        if self.backend == "rabbitmq":
            base = RABBITMQ_URL if port is None else f"amqp://guest:guest@127.0.0.1:{port}/"
            return f"{base}?prefix=hwt-{self.tag}"
        base = NATS_URL if port is None else f"nats://127.0.0.1:{port}"
        # A short AckWait: an ack lost with a cut connection comes back in seconds, not 30.
        return f"{base}?stream=HWT_{self.tag}&subject_prefix=hwt{self.tag}&ack_wait=5"

    def bus(self):
        if self.backend == "sqlite":
            return SqliteBus(url=self.url())
        return RabbitMQBus(url=self.url()) if self.backend == "rabbitmq" else NatsBus(url=self.url())

    async def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.backend == "sqlite":
                shutil.rmtree(self.directory, ignore_errors=True)
            elif self.backend == "rabbitmq":
                import aio_pika

                connection = await aio_pika.connect(RABBITMQ_URL)
                async with connection:
                    channel = await connection.channel()
                    prefix = f"hwt-{self.tag}"
                    names = [f"{prefix}.events/router", f"{prefix}.events.retry/router", f"{prefix}.events/late",
                             f"{prefix}.unrouted", *(f"{prefix}.delay.{t}.{n}" for t in ("events", "events.retry") for n in range(64))]
                    for name in names:
                        with contextlib.suppress(Exception):
                            await channel.queue_delete(name)
                    for name in (prefix, f"{prefix}.unrouted"):
                        with contextlib.suppress(Exception):
                            await channel.exchange_delete(name)
            else:
                import nats

                nc = await nats.connect(NATS_URL)
                with contextlib.suppress(Exception):
                    await nc.jetstream().delete_stream(f"HWT_{self.tag}")
                await nc.close()


@pytest.fixture
async def pg_url():
    """A database of its own (servers cannot share a test schema through their URL)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"hwt_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def server_config(pg_url: str, bus_backend: str, bus_url: str, sources: str = "http", log_level: str = "WARNING") -> str:
    return f"""
[DEFAULT]
log_level = {log_level}
[database]
connection = {pg_url}
[bus]
backend = {bus_backend}
url = {bus_url}
[engine]
backend = null
[delivery]
# An execution in flight when its process dies is taken over 1 + 2 s later (timeout + margin).
lease_margin = 2
[sources]
enabled = {sources}
[cron]
max_sleep = 0.1
"""


def new_server(data_dir: Path, config: str) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)  # Server writes its config file there first
    return Server(data_dir, config)


def create_target(server: Server) -> str:
    """A function (timeout 1 s) and an http subscription to EVENT_TYPE; returns the function id."""
    runtime = server.request("POST", "/v1/runtimes", {"image": "python3"})
    assert runtime.status == 201, runtime.text
    form = {"runtime_id": runtime.json()["id"], "code": json.dumps({"source": "package"}), "entry": "main.main", "timeout": "1"}
    function = server.multipart("/v1/functions", form, {"package": make_zip({"main.py": "def main(**kw):\n    return kw\n"})})
    assert function.status == 201, function.text
    return function.json()["id"]


def subscribe(server: Server, function_id: str, body: dict | None = None) -> str:
    resp = server.request("POST", "/v1/subscriptions", {"source": "http", "types": [EVENT_TYPE], "function_id": function_id,
                                                        **(body or {})})
    assert resp.status == 201, resp.text
    return resp.json()["id"]


def wait_indexed(server: Server, subscription_id: str, timeout: float = 60) -> None:
    """Wait until `server`'s own subscription index (not the shared table) routes to the
    subscription: its dry run matches it."""
    probe = {"specversion": "1.0", "id": "probe", "source": "/probe", "type": EVENT_TYPE}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = server.request("POST", "/v1/subscriptions/test", probe)
        if subscription_id in {m["subscription_id"] for m in resp.json()["matches"]}:
            return
        time.sleep(0.2)
    raise AssertionError(f"{subscription_id} never reached the index of the replica at {server.url}")


def events(n: int, tag: str) -> list[Event]:
    now = _dt.datetime.now(_dt.timezone.utc)
    return [Event(id=f"{tag}-{i}", source="/durability", type=EVENT_TYPE, data={"i": i}, time=now,
                  extensions={"sourcekind": "http"}) for i in range(n)]


async def publish_all(bus, batch: list[Event], concurrency: int = 200, pace: float = 0.0) -> None:
    """Publish with up to `concurrency` unconfirmed at once; `pace` seconds between chunks."""
    for start in range(0, len(batch), concurrency):
        await asyncio.gather(*(bus.publish(e) for e in batch[start:start + concurrency]))
        if pace:
            await asyncio.sleep(pace)


class Records:
    """What the execution table says about one subscription."""

    def __init__(self, url: str):
        self.engine = create_async_engine(url)

    async def counts(self, subscription_id: str) -> dict:
        query = sa.text("""
            SELECT count(*) AS total, count(*) FILTER (WHERE status = 'success') AS finished,
                   count(*) FILTER (WHERE status NOT IN ('success', 'failed', 'error')) AS open,
                   count(DISTINCT event_id) AS events, coalesce(max(attempts), 0) AS max_attempts,
                   count(*) FILTER (WHERE attempts > 1) AS taken_over
            FROM executions WHERE subscription_id = :s""")
        async with self.engine.connect() as conn:
            return dict((await conn.execute(query, {"s": subscription_id})).mappings().one())

    async def wait_finished(self, subscription_id: str, n: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            counts = await self.counts(subscription_id)
            if counts["finished"] >= n and counts["open"] == 0:
                return counts
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled after {timeout}s: {counts}")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.engine.dispose()


def metric(server: Server, name: str) -> float:
    """Sum of a Prometheus counter over its labels, from the server's /metrics."""
    text = server.request("GET", "/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


# -- done-when 2: SIGKILL mid-flow -------------------------------------------------------------

CRASH_EVENTS = 10_000


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_sigkill_mid_flow_loses_no_event_and_records_none_twice(backend, pg_url, tmp_path, capsys):
    require(backend)
    place = BusPlace(backend)
    config = server_config(pg_url, backend, place.url())
    records = Records(pg_url)
    first = new_server(tmp_path / "first", config)
    second = None
    publisher = place.bus()
    try:
        await asyncio.to_thread(first.wait_ready)
        function_id = await asyncio.to_thread(create_target, first)
        sub = await asyncio.to_thread(subscribe, first, function_id)
        await publisher.start()
        started = time.monotonic()
        publishing = asyncio.get_running_loop().create_task(publish_all(publisher, events(CRASH_EVENTS, place.tag)))
        while (await records.counts(sub))["finished"] < CRASH_EVENTS // 4:
            assert not publishing.done() or publishing.exception() is None
            await asyncio.sleep(0.05)
        first.proc.kill()  # SIGKILL: no shutdown, no acks, a journal batch possibly half written
        await asyncio.to_thread(first.proc.wait)
        at_kill = await records.counts(sub)
        assert at_kill["finished"] < CRASH_EVENTS, "the flow ended before the kill: nothing was tested"
        second = new_server(tmp_path / "second", config)
        await asyncio.to_thread(second.wait_ready)
        await publishing
        final = await records.wait_finished(sub, CRASH_EVENTS, timeout=120)
        await asyncio.sleep(1.0)  # quiet period: anything late (a redelivery) would show up now
        final = await records.counts(sub)
        elapsed = time.monotonic() - started
        assert final["total"] == CRASH_EVENTS and final["events"] == CRASH_EVENTS, final
        assert final["finished"] == CRASH_EVENTS and final["open"] == 0, final
        # Re-run only what was claimed and unfinished when the process died (its lease ran out).
        assert final["max_attempts"] <= 2 and final["taken_over"] <= at_kill["total"] - at_kill["finished"] + 512, (at_kill, final)
        duplicates = metric(second, "headwater_duplicate_deliveries_total")
        with capsys.disabled():
            print(f"\n[crash/{backend}] {CRASH_EVENTS} events in {elapsed:.1f}s; at SIGKILL: {at_kill['finished']} finished, "
                  f"{at_kill['open']} open; after restart: {final['finished']} finished exactly once, "
                  f"{final['taken_over']} taken over after lease expiry, {duplicates:.0f} redeliveries recognised as duplicates")
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        with contextlib.suppress(Exception):
            await publisher.close()
        await records.close()
        await place.cleanup()


# -- done-when 4: replicas ----------------------------------------------------------------------

REPLICA_EVENTS = 3_000


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_two_replicas_split_a_stream_and_share_a_per_second_cron_job(backend, pg_url, tmp_path, capsys):
    require(backend)
    place = BusPlace(backend)
    config = server_config(pg_url, backend, place.url(), sources="http, cron")
    records = Records(pg_url)
    replicas: list[Server] = []
    publisher = place.bus()
    try:
        for name in ("a", "b"):  # one after the other: the first migrates the database
            replicas.append(new_server(tmp_path / name, config))
            await asyncio.to_thread(replicas[-1].wait_ready)
        a, b = replicas
        function_id = await asyncio.to_thread(create_target, a)
        sub = await asyncio.to_thread(subscribe, a, function_id)
        resp = await asyncio.to_thread(a.request, "POST", "/v1/subscriptions",
                                       {"source": "cron", "pattern": "* * * * * *", "function_id": function_id})
        assert resp.status == 201, resp.text
        cron = resp.json()["id"]
        await asyncio.to_thread(wait_indexed, b, sub)  # b learns of both from its periodic reload (5 s)
        await publisher.start()
        await publish_all(publisher, events(REPLICA_EVENTS, place.tag))
        final = await records.wait_finished(sub, REPLICA_EVENTS, timeout=90)
        assert final["total"] == REPLICA_EVENTS == final["events"] == final["finished"], final
        assert final["max_attempts"] == 1, f"an execution ran twice: {final}"
        routed = [metric(r, "headwater_events_routed_total") for r in replicas]
        assert sum(routed) >= REPLICA_EVENTS and all(n > 0.1 * REPLICA_EVENTS for n in routed), routed
        # Let the schedule run at least 8 ticks (how long the stream took above depends on the
        # machine's load), then stop it and look at its ticks: one per second, none doubled or skipped.
        deadline = asyncio.get_running_loop().time() + 90
        while asyncio.get_running_loop().time() < deadline:
            async with records.engine.connect() as conn:
                done = (await conn.execute(sa.text("SELECT count(*) FROM executions WHERE subscription_id = :s AND status = 'success'"),
                                           {"s": cron})).scalar()
            if done >= 8:
                break
            await asyncio.sleep(0.5)
        assert (await asyncio.to_thread(a.request, "DELETE", f"/v1/subscriptions/{cron}")).status == 204
        deadline = asyncio.get_running_loop().time() + 60
        while True:  # the ticks in flight at the delete finish
            async with records.engine.connect() as conn:
                rows = (await conn.execute(sa.text("SELECT event_id, created_at, status, attempts FROM executions WHERE subscription_id = :s "
                                                   "ORDER BY created_at"), {"s": cron})).all()
            if all(r.status in ("success", "failed", "error") for r in rows) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        cron_in = [metric(r, 'headwater_events_in_total{source="cron"}') for r in replicas]
        # Which scheduled second each execution belongs to: tick ids are derived from (subscription,
        # scheduled time), so they can be recomputed for every second around the run.
        fired = {r.event_id for r in rows}
        start = min(r.created_at for r in rows).replace(microsecond=0) - _dt.timedelta(seconds=30)
        seconds = [start + _dt.timedelta(seconds=k) for k in range(120)]
        ticks = [t for t in seconds if derived_id("cron", cron, t.replace(tzinfo=_dt.timezone.utc).isoformat()) in fired]
        gaps = [(y - x).total_seconds() for x, y in zip(ticks, ticks[1:])]
        assert len(rows) >= 8 and len(fired) == len(rows) == len(ticks), (len(rows), len(fired), len(ticks))
        assert all(r.status == "success" for r in rows)
        assert set(gaps) == {1.0}, gaps  # every second once: none skipped
        # Both replicas may publish a tick (the schedule's compare-and-set comes after the publish,
        # so a crash cannot lose one); the tick's id makes the second a recognised duplicate.
        assert all(r.attempts == 1 for r in rows), "a tick's execution ran twice"
        assert sum(cron_in) >= len(rows)
        with capsys.disabled():
            print(f"\n[replicas/{backend}] {REPLICA_EVENTS} events routed {routed[0]:.0f} / {routed[1]:.0f}, each "
                  f"executed once; cron: {len(rows)} ticks each executed once (publishes by replica {cron_in[0]:.0f} / {cron_in[1]:.0f}), "
                  f"one per second, {ticks[0]:%H:%M:%S}..{ticks[-1]:%H:%M:%S}")
    finally:
        for server in replicas:
            server.stop()
        with contextlib.suppress(Exception):
            await publisher.close()
        await records.close()
        await place.cleanup()


# -- done-when 3: connection loss ---------------------------------------------------------------

LOSS_EVENTS = 3_000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BROKERS)
async def test_broker_connection_cut_and_restored_loses_nothing_and_resumes(backend, pg_url, tmp_path, capsys):
    require(backend)
    place = BusPlace(backend)
    broker_port = 5672 if backend == "rabbitmq" else 4222
    proxy = await TcpProxy("127.0.0.1", broker_port).start()
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "database": {"connection": pg_url},
                                    "bus": {"backend": backend, "url": place.url(proxy.port)},
                                    "engine": {"backend": "null"}, "sources": {"enabled": "http"},
                                    "delivery": {"lease_margin": "2"}})
    app = Headwater(config)
    publisher = place.bus()  # straight to the broker: sources elsewhere keep publishing during the cut
    records = Records(pg_url)
    try:
        await app.start()
        runtime = await app.store.runtimes.add(image="python3", status="available", project_id="default")
        function = await app.store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="main.main",
                                                 cpu=100, memory_size=33554432, timeout=1, project_id="default")
        row = await app.store.subscriptions.add(source="http", types=[EVENT_TYPE], function_id=function.id,
                                                function_version=0, project_id="default")
        await app.reload_subscription(row.id)
        await publisher.start()
        publishing = asyncio.get_running_loop().create_task(
            publish_all(publisher, events(LOSS_EVENTS, place.tag), concurrency=100, pace=0.1))
        while (await records.counts(row.id))["finished"] < 500:
            await asyncio.sleep(0.05)
        await proxy.cut()
        connections_before = proxy.connections
        # What was in flight at the cut finishes; then the count must stand still.
        during = await records.counts(row.id)
        for _ in range(60):
            await asyncio.sleep(1.0)
            settled, during = during, await records.counts(row.id)
            if settled["finished"] == during["finished"]:
                break
        await asyncio.sleep(0.5)  # quiet period: a record written while cut off would show up now
        stalled = await records.counts(row.id)
        assert stalled["finished"] == during["finished"], "records kept coming while the broker was cut off"
        proxy.restore()
        await publishing
        final = await records.wait_finished(row.id, LOSS_EVENTS, timeout=120)
        await asyncio.sleep(1.0)  # quiet period: a duplicate would show up now
        final = await records.counts(row.id)
        assert proxy.refused > 0 and proxy.connections > connections_before, "the client never tried to reconnect"
        assert final["total"] == final["events"] == final["finished"] == LOSS_EVENTS, final
        with capsys.disabled():
            print(f"\n[connection-loss/{backend}] cut at {during['finished']} finished while cut off "
                  f"({proxy.refused} reconnects refused), resumed by itself: {final['finished']} of {LOSS_EVENTS} "
                  f"finished exactly once, {final['taken_over']} taken over")
    finally:
        await app.stop()
        with contextlib.suppress(Exception):
            await publisher.close()
        await proxy.close()
        await records.close()
        await place.cleanup()


# -- the bus additions the delivery policy relies on ---------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["memory", *BACKENDS])
async def test_delayed_publish_and_groups_made_ahead_of_their_consumer(backend):
    if backend == "memory":
        from router.bus.memory import MemoryBus

        bus, place = MemoryBus(), None
    else:
        require(backend)
        place = BusPlace(backend)
        bus = place.bus()
    await bus.start()
    try:
        await bus.ensure_group("events", "late")
        now = _dt.datetime.now(_dt.timezone.utc)
        await bus.publish(Event(id="early", source="/t", type="t", time=now))  # before anyone consumes
        loop = asyncio.get_running_loop()
        sent = loop.time()
        # 1.5 s, not 1.0: a redelivery due at the very instant a NATS pull request expires (the
        # consumer's first one expires after 1 s) can be counted as sent by nats-server 2.9 yet never
        # arrive, and it then comes back only after AckWait. A server race, noted, not ours to fix.
        await bus.publish(Event(id="later", source="/t", type="t", time=now), delay=1.5, key="later-1")
        await bus.publish(Event(id="sooner", source="/t", type="t", time=now), delay=0.3, key="sooner-1")
        arrived: dict[str, float] = {}
        all_in = loop.create_future()

        async def handler(delivery):
            arrived[delivery.event.id] = loop.time() - sent
            if len(arrived) == 3 and not all_in.done():
                all_in.set_result(None)

        consumer = await bus.consume("events", "late", handler)
        await asyncio.wait_for(all_in, 15)
        await consumer.cancel()
        assert list(arrived) == ["early", "sooner", "later"], arrived
        # Each delayed event was held back at least its delay (brokers round a little).
        assert arrived["sooner"] >= 0.28 and arrived["later"] >= 1.45, arrived
    finally:
        await bus.close()
        if place is not None:
            await place.cleanup()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_retries_and_dead_letters_through_a_real_broker(backend, tmp_path):
    """The retry path on a durable bus: a platform error twice, then success; one that never
    succeeds is dead-lettered with the reason."""
    require(backend)
    from tests.unit.test_delivery import FlakyEngine, record_retry_delays

    place = BusPlace(backend)
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "bus": {"backend": backend, "url": place.url()},
                                    "engine": {"backend": "null"}, "sources": {"enabled": "http"}})
    app = Headwater(config)
    app.engine = app.executions.engine = FlakyEngine()
    try:
        await app.start()
        runtime = await app.store.runtimes.add(image="python3", status="available", project_id="default")
        function = await app.store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="main.main",
                                                 cpu=100, memory_size=33554432, timeout=1, project_id="default")
        row = await app.store.subscriptions.add(
            source="http", types=[EVENT_TYPE], function_id=function.id, function_version=0, project_id="default",
            options={"delivery": {"max_attempts": 3, "backoff_initial": 0.2, "jitter": 0}})
        await app.reload_subscription(row.id)
        delays = record_retry_delays(app)
        now = _dt.datetime.now(_dt.timezone.utc)
        for event_id, fails in (("flaky", 2), ("broken", 99)):
            await app.bus.publish(Event(id=event_id, source="/t", type=EVENT_TYPE, data={"fail": fails}, time=now,
                                        extensions={"sourcekind": "http"}))
        from router.events import execution_id_for

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = {r.event_id: r for r in await app.store.executions.list()}
            if len(rows) == 2 and all(r.status in ("success", "error") for r in rows.values()):
                break
            await asyncio.sleep(0.05)
        assert rows["flaky"].status == "success" and rows["flaky"].attempts == 3
        assert rows["broken"].status == "error" and rows["broken"].attempts == 3
        assert app.engine.calls[execution_id_for("/t", "flaky", row.id)] == 3
        # The schedule (0.2 s, then twice that, for each event) and the broker keeping to it.
        assert sorted(delays) == [0.2, 0.2, 0.4, 0.4], delays
        times = app.engine.times[execution_id_for("/t", "broken", row.id)]
        assert [b - a >= d - 0.05 for (a, b), d in zip(zip(times, times[1:]), (0.2, 0.4))] == [True, True], times
        (letter,) = await app.store.dead_letters.list()
        assert letter.event_id == "broken" and "3 attempt(s) failed" in letter.reason
    finally:
        await app.stop()
        await place.cleanup()
