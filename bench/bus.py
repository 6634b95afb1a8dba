"""Bus benchmark: per backend, events/s and p50/p99 through publish → route → null engine → record,
next to the raw client's own publish/consume loop measured in the same run. Prints a table, writes JSON.

    python bench/bus.py [--events 5000] [--backends memory,rabbitmq,nats] [--database sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from router import plugins  # noqa: E402
from router.config import Config  # noqa: E402
from router.dispatch import Dispatcher  # noqa: E402
from router.events import Event, execution_id_for  # noqa: E402
from router.executions import ExecutionService  # noqa: E402
from router.gctuning import tune_for_server  # noqa: E402
from router.index import SubscriptionIndex  # noqa: E402
from router.metrics import Metrics  # noqa: E402
from router.plugins import Subscription  # noqa: E402
from router.store import Database, Store  # noqa: E402

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
WINDOW = 256  # publishes in flight at once, for both loops: same client-side concurrency
PREFETCH = 256


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def summary(n: int, elapsed: float, latencies: list[float], cpu: float) -> dict:
    """`cpu_us_per_event`: this process's CPU (all its threads; not the broker's or the database's)
    per event. On a shared, loaded machine events/s follows the CPU share each loop happens to get;
    CPU per event does not, so it says more there about the code's own cost."""
    return {"events": n, "seconds": round(elapsed, 3), "events_per_s": round(n / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 2), "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
            "cpu_us_per_event": round(cpu / n * 1e6, 1)}


async def windowed(n: int, publish) -> None:
    """Publish n messages with up to WINDOW unconfirmed at once."""
    for start in range(0, n, WINDOW):
        await asyncio.gather(*(publish(i) for i in range(start, min(n, start + WINDOW))))


# -- raw client loops ---------------------------------------------------------------------------

async def raw_memory(n: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    sent: dict[int, float] = {}
    latencies: list[float] = []

    async def consume():
        for _ in range(n):
            i = await queue.get()
            latencies.append(time.perf_counter() - sent[i])

    consumer = asyncio.get_running_loop().create_task(consume())
    started, cpu = time.perf_counter(), time.process_time()

    async def publish(i):
        sent[i] = time.perf_counter()
        await queue.put(i)

    await windowed(n, publish)
    await consumer
    return summary(n, time.perf_counter() - started, latencies, time.process_time() - cpu)


async def raw_rabbitmq(n: int) -> dict:
    """aio-pika as a careful user would use it for durable work: a durable quorum queue, persistent
    messages, publisher confirms, prefetch, manual ack."""
    import aio_pika

    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=PREFETCH)
        queue = await consume_channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        sent: dict[str, float] = {}
        latencies: list[float] = []
        done = asyncio.get_running_loop().create_future()
        body = Event(id="x", source="/bench", type="bench", data={"i": 0}).to_json()

        async def on_message(message):
            latencies.append(time.perf_counter() - sent[message.message_id])
            await message.ack()
            if len(latencies) == n and not done.done():
                done.set_result(None)

        tag = await queue.consume(on_message)
        started, cpu = time.perf_counter(), time.process_time()

        async def publish(i):
            sent[str(i)] = time.perf_counter()
            await publish_channel.default_exchange.publish(
                aio_pika.Message(body, message_id=str(i), delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=name)

        await windowed(n, publish)
        await done
        result = summary(n, time.perf_counter() - started, latencies, time.process_time() - cpu)
        await queue.cancel(tag)  # before the delete, which would cancel it from the broker's side (logged)
        await queue.delete(if_unused=False, if_empty=False)
        return result
    finally:
        await connection.close()


async def raw_nats(n: int, *, publish_async: bool = False) -> dict:
    """nats-py JetStream: a file-backed stream, acked publishes, a durable pull consumer fetching in
    batches, explicit acks. With `publish_async`, each window's publishes go out without waiting
    for one another's PubAck (`js.publish_async`), as Headwater's own adapter pipelines them."""
    import nats
    from nats.js import api

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    stream = f"BENCHRAW{uuid.uuid4().hex[:8]}"
    subject = f"benchraw.{stream}"
    try:
        await js.add_stream(api.StreamConfig(name=stream, subjects=[subject], storage=api.StorageType.FILE))
        psub = await js.pull_subscribe(subject, durable="raw", stream=stream)
        sent: dict[str, float] = {}
        latencies: list[float] = []
        body = Event(id="x", source="/bench", type="bench", data={"i": 0}).to_json()

        async def consume():
            while len(latencies) < n:
                try:
                    msgs = await psub.fetch(batch=PREFETCH, timeout=1)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                now = time.perf_counter()
                for msg in msgs:
                    latencies.append(now - sent[msg.headers["Nats-Msg-Id"]])
                await asyncio.gather(*(m.ack() for m in msgs))

        consumer = asyncio.get_running_loop().create_task(consume())
        started, cpu = time.perf_counter(), time.process_time()

        async def publish(i):
            sent[str(i)] = time.perf_counter()
            await js.publish(subject, body, headers={"Nats-Msg-Id": str(i)})

        if publish_async:
            for start in range(0, n, WINDOW):
                acks = []
                for i in range(start, min(n, start + WINDOW)):
                    sent[str(i)] = time.perf_counter()
                    acks.append(await js.publish_async(subject, body, headers={"Nats-Msg-Id": str(i)}))
                await asyncio.gather(*acks)
        else:
            await windowed(n, publish)
        await consumer
        return summary(n, time.perf_counter() - started, latencies, time.process_time() - cpu)
    finally:
        try:
            await js.delete_stream(stream)
        finally:
            await nc.close()


async def raw_nats_publish_async(n: int) -> dict:
    return await raw_nats(n, publish_async=True)


RAW = {"memory": raw_memory, "rabbitmq": raw_rabbitmq, "nats": raw_nats}
# A second, stronger baseline where the client offers one: the ratio against it is printed too.
RAW_PIPELINED = {"nats": ("raw, publish_async", raw_nats_publish_async)}


# -- Headwater's routed path ----------------------------------------------------------------------

class RoutedRig:
    """The router's real parts as router.app wires them: bus backend → dispatcher → index →
    execution service (journal) → null engine → execution record."""

    def __init__(self, backend: str, database: str, data_dir: Path):
        tag = uuid.uuid4().hex[:8]
        url = {"memory": None, "rabbitmq": f"{RABBITMQ_URL}?prefix=bench-{tag}",
               "nats": f"{NATS_URL}?stream=BENCH{tag}&subject_prefix=bench{tag}"}[backend]
        overrides = {"DEFAULT": {"data_dir": str(data_dir)}, "engine": {"backend": "null"},
                     "bus": {"backend": backend, "url": url, "prefetch": str(PREFETCH)}}
        self.config = Config.load(overrides=overrides)
        self.schema = None
        if database == "postgresql":
            self.schema = f"bench_{tag}"
            self.db = Database(POSTGRES_URL, schema=self.schema)
        else:
            self.db = Database(self.config.database.connection)
        self.backend = backend
        self.tag = tag
        self.store = Store(self.db)
        self.metrics = Metrics()
        self.packages = plugins.load("storage", "filesystem")(self.config)
        self.engine = plugins.load("engine", "null")(self.config, self.packages)
        self.bus = plugins.load("bus", backend)(self.config)
        self.index = SubscriptionIndex()
        self.executions = ExecutionService(self.config, self.store, self.engine, self.metrics)
        self.dispatcher = Dispatcher(self.bus, self.index, self.executions, self.metrics, prefetch=PREFETCH)
        self.done: dict[str, float] = {}
        self.expected: set[str] = set()
        self.all_done: asyncio.Future | None = None

    async def start(self) -> None:
        await self.db.migrate()
        await self.engine.start()
        await self.executions.start()
        await self.bus.start()
        runtime = await self.store.runtimes.add(image="python3", status="available", project_id="bench")
        function = await self.store.functions.add(runtime_id=runtime.id, code={"source": "package"}, entry="noop.main",
                                                  cpu=100, memory_size=33554432, timeout=5, project_id="bench")
        sub = await self.store.subscriptions.add(source="bench", function_id=function.id, function_version=0,
                                                 filters={"subject": "bench"}, project_id="bench")
        self.subscription_id = sub.id
        self.index.put(Subscription(id=sub.id, project_id="bench", source="bench", filters={"subject": "bench"},
                                    function_id=function.id, function_version=0))
        # Outcomes are recorded one by one, or a batch's together: both are noted.
        original, original_many = self.executions.record, self.executions.record_many

        def recorded(row) -> None:
            self.done[row.id] = time.perf_counter()
            self.expected.discard(row.id)
            if not self.expected and self.all_done is not None and not self.all_done.done():
                self.all_done.set_result(None)

        async def record(row, result, **kw):
            await original(row, result, **kw)
            recorded(row)

        async def record_many(finished):
            await original_many(finished)
            for row, _ in finished:
                recorded(row)

        self.executions.record, self.executions.record_many = record, record_many
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.executions.stop()
        await self.bus.close()
        await self.engine.stop()
        if self.schema:
            async with self.db.engine.begin() as conn:
                await conn.execute(sa.text(f'DROP SCHEMA "{self.schema}" CASCADE'))
        await self.db.dispose()
        await self._cleanup_broker()

    async def _cleanup_broker(self) -> None:
        try:
            if self.backend == "rabbitmq":
                import aio_pika

                connection = await aio_pika.connect(RABBITMQ_URL)
                async with connection:
                    channel = await connection.channel()
                    for name in self.bus.declared_queues:
                        await channel.queue_delete(name)
                    for name in (f"bench-{self.tag}", f"bench-{self.tag}.unrouted"):
                        await channel.exchange_delete(name)
            elif self.backend == "nats":
                import nats

                nc = await nats.connect(NATS_URL)
                await nc.jetstream().delete_stream(f"BENCH{self.tag}")
                await nc.close()
        except Exception as exc:  # a benchmark's leftovers are not worth failing it
            print(f"  (cleanup of {self.backend} objects failed: {exc})", file=sys.stderr)

    async def run(self, n: int, prefix: str) -> dict:
        events = [Event(id=f"{prefix}-{i}", source="/bench", type="bench.tick", subject="bench", data={"i": i},
                        extensions={"sourcekind": "bench", "projectid": "bench"}) for i in range(n)]
        ids = [execution_id_for(e.source, e.id, self.subscription_id) for e in events]
        self.expected = set(ids)
        self.all_done = asyncio.get_running_loop().create_future()
        sent: dict[str, float] = {}
        started, cpu = time.perf_counter(), time.process_time()

        async def publish(i):
            sent[ids[i]] = time.perf_counter()
            await self.bus.publish(events[i])

        await windowed(n, publish)
        await self.all_done
        elapsed = time.perf_counter() - started
        return summary(n, elapsed, [self.done[k] - v for k, v in sent.items()], time.process_time() - cpu)


async def routed(backend: str, n: int, database: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rig = RoutedRig(backend, database, Path(tmp))
        await rig.start()
        try:
            await rig.run(min(500, n), "warm")  # connections, prepared statements, JIT-free warm-up
            return await rig.run(n, "run")
        finally:
            await rig.stop()


async def bench(args) -> dict:
    results: dict[str, dict] = {}
    # The garbage collector set as `headwater serve` sets it once started, for both loops alike.
    tune_for_server()
    for backend in args.backends:
        port = {"memory": None, "rabbitmq": 5672, "nats": 4222}[backend]
        if port and not reachable(port):
            print(f"skipping {backend}: nothing listens on 127.0.0.1:{port}", file=sys.stderr)
            continue
        await RAW[backend](min(500, args.events))  # warm-up
        raw = await RAW[backend](args.events)
        rows = {"raw client loop": raw}
        if backend in RAW_PIPELINED:
            label, loop = RAW_PIPELINED[backend]
            await loop(min(500, args.events))
            rows[label] = await loop(args.events)
        route = await routed(backend, args.events, args.database)
        route["ratio_to_raw"] = round(route["events_per_s"] / raw["events_per_s"], 3)
        for label, row in rows.items():
            if label != "raw client loop":
                route[f"ratio_to_{label}"] = round(route["events_per_s"] / row["events_per_s"], 3)
        results[backend] = {**rows, "headwater routed": route}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--backends", type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
                        default=["memory", "rabbitmq", "nats"])
    parser.add_argument("--database", choices=("sqlite", "postgresql"),
                        default="postgresql" if reachable(5432) else "sqlite")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "bus.json")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    print(f"\nbus benchmark: {args.events} events, window {WINDOW}, prefetch {PREFETCH}, records in {args.database}, "
          "null engine, garbage collector tuned as `headwater serve` does (both loops)")
    print("ratio: routed events/s over the raw client loop's (in brackets: over the stronger baseline)")
    print(f"{'backend':<10} {'loop':<18} {'events/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'ratio':>13} {'cpu us/ev':>10}")
    for backend, rows in results.items():
        for loop, row in rows.items():
            ratio = f"{row['ratio_to_raw']:.2f}" if "ratio_to_raw" in row else ""
            ratio += "".join(f" [{v:.2f}]" for k, v in row.items() if k.startswith("ratio_to_") and k != "ratio_to_raw")
            print(f"{backend:<10} {loop:<18} {row['events_per_s']:>10.0f} {row['p50_ms']:>9.2f} {row['p99_ms']:>9.2f} {ratio:>13} "
                  f"{row['cpu_us_per_event']:>10.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"events": args.events, "window": WINDOW, "prefetch": PREFETCH, "database": args.database,
                                       "python": platform.python_version(), "machine": platform.machine(), "gc": "router.gctuning.tune_for_server",
                                       "results": results}, indent=2) + "\n")
    print(f"written to {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
