"""Routing benchmark: events through a bus (the memory bus, and the durable sqlite default) → index →
dispatcher → engine → execution record, next to a raw asyncio.Queue put/get baseline measured in the
same run. Prints a table, writes JSON."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router import plugins  # noqa: E402
from router import tracing  # noqa: E402
from router.config import Config  # noqa: E402
from router.dashboard.feed import EventFeed  # noqa: E402
from router.dashboard.series import MinuteSeries  # noqa: E402
from router.dispatch import Dispatcher  # noqa: E402
from router.events import Event, execution_id_for  # noqa: E402
from router.executions import ExecutionService  # noqa: E402
from router.index import SubscriptionIndex  # noqa: E402
from router.metrics import Metrics  # noqa: E402
from router.plugins import Subscription  # noqa: E402
from router.store import Database, Store  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def queue_baseline(n: int) -> dict:
    """A producer puts N items on an asyncio.Queue, a consumer gets them: the floor of any in-process hand-off."""
    queue: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []

    async def consume():
        for _ in range(n):
            sent = await queue.get()
            latencies.append(time.perf_counter() - sent)

    consumer = asyncio.get_running_loop().create_task(consume())
    started = time.perf_counter()
    for _ in range(n):
        await queue.put(time.perf_counter())
    await consumer
    elapsed = time.perf_counter() - started
    return {"events": n, "seconds": elapsed, "events_per_s": n / elapsed, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3}


async def record_floor(n: int, data_dir: Path) -> dict:
    """The cost of the one thing each routed event must leave behind, an execution row, written as
    cheaply as SQLite allows: raw sqlite3 executemany, one transaction, no router code at all. Its
    ratio to the queue baseline bounds what any routing path that records executions can reach."""
    import datetime
    import sqlite3

    from router.store.db import sqlite_pragmas
    from router.store.journal import _COLUMNS, _ROW_DEFAULTS, _SqliteWriter

    db = Database(f"sqlite+aiosqlite:///{data_dir / 'floor.db'}")
    await db.migrate()
    await db.dispose()
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [dict(_ROW_DEFAULTS, id=execution_id_for("/bench", f"floor-{i}", "s"), project_id="bench", status="success",
                 input={"i": i}, created_at=now, event_id=f"floor-{i}", subscription_id="s") for i in range(n)]
    params = [_SqliteWriter._params(row) for row in rows]  # prepared outside the clock
    conn = sqlite3.connect(data_dir / "floor.db", isolation_level=None)
    sqlite_pragmas(conn, None)  # the settings the journal writes with
    sql = f"INSERT INTO executions ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"
    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(sql, params)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return {"events": n, "seconds": elapsed, "events_per_s": n / elapsed, "p50_ms": float("nan"), "p99_ms": float("nan")}


def routed_rows_floor(n: int, data_dir: Path, wave: int = 100) -> dict:
    """Every row the durable default writes for a routed event, written as cheaply as SQLite allows:
    raw sqlite3 on one thread, no router code, values encoded before the clock starts. Per wave of
    `wave` events (the throughput runs publish in waves of that size): the bus messages inserted
    and fsynced (as publish does), claimed (select + lease update), the execution rows inserted,
    finished, and the bus messages deleted (the ack). The same rows and the same transactions'
    durability as routing, none of the work around them (parsing, matching, the hand-offs)."""
    import datetime
    import sqlite3

    from router.bus.sqlite import _SCHEMA
    from router.store.db import sqlite_pragmas
    from router.store.journal import _COLUMNS, _ROW_DEFAULTS, _json, _SqliteWriter

    bus = sqlite3.connect(data_dir / "floor-bus.db", isolation_level=None)
    bus.execute("PRAGMA journal_mode=WAL")
    bus.executescript(_SCHEMA)
    bus.execute("INSERT INTO bus_groups (topic, grp) VALUES ('events', 'router')")
    store = sqlite3.connect(data_dir / "floor.db", isolation_level=None)  # migrated by record_floor
    sqlite_pragmas(store, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    bodies = [Event(id=f"rows-{i}", source="/bench", type="bench.tick", subject="bench", data={"i": i},
                    extensions={"sourcekind": "bench", "projectid": "bench"}).to_json() for i in range(n)]
    starts = [_SqliteWriter._params(dict(_ROW_DEFAULTS, id=execution_id_for("/bench", f"rows-{i}", "s"), project_id="bench",
                                         status="running", input={"i": i}, created_at=now, event_id=f"rows-{i}",
                                         subscription_id="s")) for i in range(n)]
    finishes = [("success", _json({"duration": 0.0, "output": "ok"}), "", None, _SqliteWriter._time(now), row[0])
                for row in starts]
    columns = len(_COLUMNS)
    insert = f"INSERT INTO executions ({','.join(_COLUMNS)}) VALUES "
    finish = ("UPDATE executions SET status = ?, result = ?, logs = ?, reason = ?, updated_at = ?, lease_until = NULL "
              "WHERE id = ?")

    def transaction(conn: sqlite3.Connection, durable: bool, work) -> object:
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        conn.execute("BEGIN IMMEDIATE")
        out = work()
        conn.execute("COMMIT")
        return out

    started, cpu = time.perf_counter(), time.process_time()
    for first in range(0, n, wave):
        last = min(n, first + wave)
        visible = time.time()
        transaction(bus, True, lambda: bus.executemany(
            "INSERT INTO bus_messages (topic, grp, body, visible_at) VALUES ('events', 'router', ?, ?)",
            [(body, visible) for body in bodies[first:last]]))

        def claim() -> list[int]:
            ids = [r[0] for r in bus.execute("SELECT id FROM bus_messages WHERE topic = 'events' AND grp = 'router' "
                                             "AND visible_at <= ? ORDER BY id LIMIT 256", (time.time(),))]
            bus.executemany("UPDATE bus_messages SET owner = 'o', visible_at = ?, deliveries = deliveries + 1 "
                            "WHERE id = ?", [(visible + 30, i) for i in ids])
            return ids

        claimed = transaction(bus, False, claim)
        chunk = starts[first:last]
        transaction(store, False, lambda: store.execute(
            insert + ",".join(["(" + ",".join("?" * columns) + ")"] * len(chunk)) + " ON CONFLICT (id) DO NOTHING RETURNING id",
            [v for row in chunk for v in row]).fetchall())
        transaction(store, False, lambda: store.executemany(finish, finishes[first:last]))
        transaction(bus, False, lambda: bus.executemany("DELETE FROM bus_messages WHERE id = ?", [(i,) for i in claimed]))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    bus.close()
    store.close()
    return {"events": n, "seconds": elapsed, "events_per_s": n / elapsed, "p50_ms": float("nan"), "p99_ms": float("nan"),
            "cpu_us_per_event": cpu / n * 1e6}


class Rig:
    """The router's real parts, wired as router.app wires them, on a throw-away SQLite store."""

    def __init__(self, data_dir: Path, engine_name: str, bus: str = "memory"):
        self.config = Config.load(overrides={"DEFAULT": {"data_dir": str(data_dir)}, "engine": {"backend": engine_name},
                                             "bus": {"backend": bus}})
        self.db = Database(self.config.database.connection)
        self.store = Store(self.db)
        self.metrics = Metrics()
        self.packages = plugins.load("storage", "filesystem")(self.config)
        self.engine = plugins.load("engine", engine_name)(self.config, self.packages)
        self.bus = plugins.load("bus", bus)(self.config)
        self.index = SubscriptionIndex()
        self.executions = ExecutionService(self.config, self.store, self.engine, self.metrics)
        self.dispatcher = Dispatcher(self.bus, self.index, self.executions, self.metrics, prefetch=self.config.bus.prefetch)
        self.done: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        await self.db.migrate()
        await self.engine.start()
        await self.executions.start()
        runtime = await self.store.runtimes.add(image="python3", status="available", project_id="bench")
        source = "def main(*args, **kwargs):\n    return 'ok'\n"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("noop.py", source)
        function_id = "00000000-0000-4000-8000-000000000001"
        md5 = await self.packages.put("bench", function_id, 0, buf.getvalue())
        await self.store.functions.add(id=function_id, runtime_id=runtime.id, code={"source": "package", "md5sum": md5},
                                       entry="noop.main", cpu=100, memory_size=33554432, timeout=5, project_id="bench")
        sub = await self.store.subscriptions.add(source="bench", function_id=function_id, function_version=0,
                                                 filters={"subject": "bench"}, project_id="bench")
        self.subscription_id = sub.id
        self.index.put(Subscription(id=sub.id, project_id="bench", source="bench", filters={"subject": "bench"},
                                    function_id=function_id, function_version=0))
        # Note each execution's finish time: the benchmark's only hook into the router (outcomes
        # are recorded one by one, or a batch's together).
        self.on_recorded = None
        original, original_many = self.executions.record, self.executions.record_many

        def recorded(row) -> None:
            self.done[row.id] = time.perf_counter()
            waiter = self.waiters.pop(row.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self.on_recorded is not None:
                self.on_recorded(row)

        async def record(row, result, **kw):
            await original(row, result, **kw)
            recorded(row)

        async def record_many(finished):
            await original_many(finished)
            for row, _ in finished:
                recorded(row)

        self.executions.record, self.executions.record_many = record, record_many
        await self.bus.start()
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.bus.close()
        await self.executions.stop()
        await self.engine.stop()
        await self.db.dispose()

    def event(self, i: int) -> Event:
        return Event(id=f"bench-{i}", source="/bench", type="bench.tick", subject="bench", data={"i": i},
                     extensions={"sourcekind": "bench", "projectid": "bench"})

    async def throughput(self, n: int, offset: int, feed: EventFeed | None = None, concurrency: int = 100) -> dict:
        """N events published back to back, `concurrency` publishes at a time (as concurrent HTTP
        requests publish; a durable bus commits each wave with one fsync); event ids from `offset`
        on, unused by earlier runs (the router would rightly treat a reused id as a duplicate and
        not run it again). With `feed`, each event is also offered to the dashboard's live tail, as
        a source's publish does."""
        sent: dict[str, float] = {}
        all_done = asyncio.get_running_loop().create_future()
        expected = {execution_id_for("/bench", f"bench-{i}", self.subscription_id) for i in range(offset, offset + n)}
        def recorded(row) -> None:
            expected.discard(row.id)
            if not expected and not all_done.done():
                all_done.set_result(None)

        self.on_recorded = recorded
        started, cpu = time.perf_counter(), time.process_time()

        async def publish(i: int) -> None:
            event = self.event(i)
            sent[execution_id_for(event.source, event.id, self.subscription_id)] = time.perf_counter()
            await self.bus.publish(event)
            if feed is not None:
                feed.offer(event)

        for wave in range(offset, offset + n, concurrency):
            await asyncio.gather(*(publish(i) for i in range(wave, min(wave + concurrency, offset + n))))
        await all_done
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        self.on_recorded = None
        latencies = [self.done[k] - v for k, v in sent.items() if k in self.done]
        return {"events": n, "seconds": elapsed, "events_per_s": n / elapsed,
                "p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3,
                "cpu_us_per_event": cpu / n * 1e6}

    async def sequential_latency(self, n: int, offset: int) -> dict:
        """One event at a time, each waiting for its execution record: the warm end-to-end latency."""
        latencies = []
        for i in range(offset, offset + n):
            event = self.event(i)
            execution_id = execution_id_for(event.source, event.id, self.subscription_id)
            waiter = asyncio.get_running_loop().create_future()
            self.waiters[execution_id] = waiter
            started = time.perf_counter()
            await self.bus.publish(event)
            await waiter
            latencies.append(time.perf_counter() - started)
        return {"events": n, "seconds": sum(latencies), "events_per_s": n / sum(latencies),
                "p50_ms": statistics.median(latencies) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


ROWS_FLOOR = "floor: routed rows (bus + executions), raw sqlite3"
KINDS = ("exact", "prefix", "suffix", "glob", "expression", "typed-exact", "data")


def mixed_subscriptions(n: int, rng: random.Random) -> tuple[list[Subscription], list[str]]:
    """N subscriptions of mixed filter kinds over made-up Swift traffic, in groups of seven (one of
    each kind) that share a container name, so an event for a name matches a handful of them.
    Names are 12 random letters and digits: all of one length, so that events for 10 and for
    100,000 subscriptions have the same shape (numbered names grew with N, and so did the events)."""
    subs, names = [], []
    for i in range(n):
        group, kind = divmod(i, len(KINDS))
        if kind == 0:
            names.append("".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=12)))
        name = names[group]
        filters: dict = {}
        expression = None
        types: tuple = ()
        kind_name = KINDS[kind]
        if kind_name == "exact":
            filters = {"container": name}
        elif kind_name == "prefix":
            filters = {"subject": {"prefix": f"{name}/"}}
        elif kind_name == "suffix":
            filters = {"subject": {"suffix": f"/{name}.jpg"}}
        elif kind_name == "glob":
            filters = {"subject": {"glob": f"{name}/*.jpg"}}
        elif kind_name == "expression":
            expression = f"container = '{name}' AND data.size > 10"
        elif kind_name == "typed-exact":
            filters, types = {"container": name}, ("org.openstack.swift.object.put",)
        else:
            filters = {"container": name, "data.size": {"gte": 1}}
        subs.append(Subscription(id=f"s{i}", project_id="bench", source="swift", filters=filters, types=types,
                                 options={"filter": expression} if expression else {}))
    return subs, names


def match_cost(n: int, lookups: int) -> tuple:
    """An index of N mixed subscriptions and 200 events, each matching a handful of them: the row
    for N (matches per event), and a function that times `lookups` SubscriptionIndex.match calls
    over those events and returns microseconds per match."""
    rng = random.Random(42)
    subs, names = mixed_subscriptions(n, rng)
    index = SubscriptionIndex(subs)
    events = []
    complete_groups = n // len(KINDS)  # events for complete groups only: each matches all seven kinds
    for j in range(200):
        name = names[rng.randrange(complete_groups)]
        events.append(Event(id=f"m{j}", source="/swift", type="org.openstack.swift.object.put", subject=f"{name}/{name}.jpg",
                            data={"size": 100}, extensions={"sourcekind": "swift", "container": name, "projectid": "bench"}))
    matched = [len(index.match(e)) for e in events]
    rounds = max(1, lookups // len(events))

    def timed() -> float:
        match = index.match
        started = time.perf_counter()
        for _ in range(rounds):
            for event in events:
                match(event)
        return (time.perf_counter() - started) / (rounds * len(events)) * 1e6

    row = {"subscriptions": n, "matches_per_event_mean": statistics.mean(matched), "matches_per_event_max": max(matched)}
    return row, timed


async def run(args) -> dict:
    results: dict[str, dict] = {}
    results["asyncio.Queue baseline"] = await queue_baseline(args.events)
    with tempfile.TemporaryDirectory() as tmp:
        results["floor: execution rows, raw sqlite3"] = await record_floor(args.events, Path(tmp))
        # The floor the durable default is measured against: the same rows the routed path writes.
        results[ROWS_FLOOR] = routed_rows_floor(args.events, Path(tmp))
        # The memory bus (tests, benchmarks: a crash loses what it holds) next to the durable default.
        for bus in ("memory", "sqlite"):
            rig = Rig(Path(tmp) / f"null-{bus}", "null", bus)
            await rig.start()
            try:
                await rig.throughput(min(200, args.events), offset=0)  # warm-up
                results[f"route, null engine, {bus} bus"] = await rig.throughput(args.events, offset=1_000_000)
                results[f"route, null engine, {bus} bus, one at a time"] = await rig.sequential_latency(
                    args.latency_events, 2_000_000)
            finally:
                await rig.stop()
        if not args.skip_dashboard:
            results.update(await dashboard_cost(Path(tmp) / "dashboard", args))
        rig = Rig(Path(tmp) / "local", "local")
        await rig.start()
        try:
            await rig.sequential_latency(20, 0)  # warm the runtime process
            results["route, local engine, one at a time (warm)"] = await rig.sequential_latency(args.latency_events, 1_000_000)
            results["route, local engine, concurrent"] = await rig.throughput(args.local_events, offset=2_000_000)
        finally:
            await rig.stop()
    baseline = results["asyncio.Queue baseline"]["events_per_s"]
    for row in results.values():
        row["ratio_to_baseline"] = row["events_per_s"] / baseline
    return results


async def dashboard_cost(data_dir: Path, args) -> dict:
    """The routing path with the dashboard present but no browser connected (every event offered
    to an empty live tail, the per-minute sampler running) against the same path without it:
    alternating rounds on one rig, medians of each."""
    rig = Rig(data_dir, "null")
    await rig.start()
    series = MinuteSeries(rig.metrics)
    series.start()
    runs: dict[str, list[dict]] = {"without": [], "with": []}
    try:
        await rig.throughput(min(200, args.events), offset=0)  # warm-up
        offset = 1_000_000
        for _ in range(args.dashboard_rounds):
            for name, feed in (("without", None), ("with", EventFeed())):
                runs[name].append(await rig.throughput(args.events, offset=offset, feed=feed))
                offset += args.events
    finally:
        await series.stop()
        await rig.stop()

    def median_row(rows: list[dict]) -> dict:
        row = dict(sorted(rows, key=lambda r: r["events_per_s"])[len(rows) // 2])
        row["events_per_s_rounds"] = [r["events_per_s"] for r in rows]
        return row

    # The whole of what the routing path gains with nobody watching: one call per event.
    import timeit

    feed, event = EventFeed(), rig.event(0)
    offer_ns = min(timeit.repeat(lambda: feed.offer(event), number=100_000, repeat=5)) / 100_000 * 1e9
    print(f"EventFeed.offer with no watcher: {offer_ns:.0f} ns per event")

    def untraced() -> None:  # what each event pays for tracing when [tracing] is off: three flag tests
        for _ in range(3):
            if tracing.enabled:
                raise AssertionError("tracing is on")

    span_ns = min(timeit.repeat(untraced, number=100_000, repeat=5)) / 100_000 * 1e9
    print(f"tracing off: {span_ns:.0f} ns per event (publish, route and execute each test one flag)")
    return {"EventFeed.offer, no watcher": {"events": 100_000, "seconds": offer_ns * 1e-4, "events_per_s": 1e9 / offer_ns,
                                            "p50_ms": offer_ns / 1e6, "p99_ms": float("nan")},
            "tracing off, per event": {"events": 100_000, "seconds": span_ns * 1e-4, "events_per_s": 1e9 / span_ns,
                                       "p50_ms": span_ns / 1e6, "p99_ms": float("nan")},
            "route, null engine, no dashboard (median)": median_row(runs["without"]),
            "route, null engine, dashboard, no watcher (median)": median_row(runs["with"])}


def run_matching(args) -> dict:
    """Both indexes side by side, timed in alternating rounds so that both see the same machine
    (a shared one is noisy): the medians, and their ratio."""
    rounds = 7
    small, small_timed = match_cost(10, args.match_lookups)
    large, large_timed = match_cost(100_000, args.match_lookups)
    small_timed(), large_timed()  # warm-up
    small_us, large_us = [], []
    for _ in range(rounds):
        small_us.append(small_timed())
        large_us.append(large_timed())
    ratios = [large_round / small_round for small_round, large_round in zip(small_us, large_us)]
    for row, us in ((small, small_us), (large, large_us)):
        row["us_per_match"] = statistics.median(us)
        row["us_per_match_rounds"] = us
    return {"10": small, "100000": large, "ratio_100000_to_10": large["us_per_match"] / small["us_per_match"],
            "rounds": rounds, "ratio_per_round": {"min": min(ratios), "max": max(ratios)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=5000, help="events per throughput run")
    parser.add_argument("--latency-events", type=int, default=300, help="events for the one-at-a-time latency runs")
    parser.add_argument("--local-events", type=int, default=1000, help="events for the local-engine throughput run")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "route.json"))
    parser.add_argument("--match-lookups", type=int, default=100_000, help="index lookups per matching-cost run")
    parser.add_argument("--only", choices=("route", "match"), help="run one part only")
    parser.add_argument("--dashboard-rounds", type=int, default=5, help="alternating rounds with and without the dashboard")
    parser.add_argument("--skip-dashboard", action="store_true", help="leave out the dashboard-cost rounds")
    args = parser.parse_args()
    output: dict = {"benchmark": "route"}
    if args.only != "route":
        matching = run_matching(args)
        output["matching"] = matching
        print(f"{'subscriptions':>14} {'us/match':>10} {'matches/event':>14}")
        for key in ("10", "100000"):
            row = matching[key]
            print(f"{row['subscriptions']:>14} {row['us_per_match']:>10.2f} {row['matches_per_event_mean']:>8.2f} (max {row['matches_per_event_max']})")
        spread = matching["ratio_per_round"]
        print(f"matching cost, 100,000 vs 10 subscriptions: {matching['ratio_100000_to_10']:.2f}x "
              f"(median of {matching['rounds']} rounds; rounds {spread['min']:.2f}x-{spread['max']:.2f}x)\n")
    if args.only == "match":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(output, indent=2))
        print(f"wrote {args.json}")
        return
    results = asyncio.run(run(args))
    output["results"] = results
    # cpu us/ev: this process's CPU (all threads) per event; on a loaded machine it varies less
    # than events/s, which follows the CPU share each row happens to get.
    print(f"{'scenario':<52} {'events':>7} {'events/s':>11} {'ratio':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/ev':>10}")
    for name, row in results.items():
        print(f"{name:<52} {row['events']:>7} {row['events_per_s']:>11.0f} {row['ratio_to_baseline']:>8.4f} "
              f"{row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {row.get('cpu_us_per_event', float('nan')):>10.1f}")
    floor, durable = results.get(ROWS_FLOOR), results.get("route, null engine, sqlite bus")
    if floor and durable:
        output["sqlite_bus_to_rows_floor"] = durable["events_per_s"] / floor["events_per_s"]
        print(f"durable default (sqlite bus) routed: {output['sqlite_bus_to_rows_floor']:.2f}x the raw-sqlite floor "
              "writing the same rows")
    without = results.get("route, null engine, no dashboard (median)")
    present = results.get("route, null engine, dashboard, no watcher (median)")
    if without and present:
        output["dashboard_cost_ratio"] = present["events_per_s"] / without["events_per_s"]
        print(f"dashboard present, no watcher: {output['dashboard_cost_ratio']:.3f}x the events/s without it "
              f"(medians of {args.dashboard_rounds} alternating rounds; rounds without "
              f"{min(without['events_per_s_rounds']):.0f}-{max(without['events_per_s_rounds']):.0f}/s, with "
              f"{min(present['events_per_s_rounds']):.0f}-{max(present['events_per_s_rounds']):.0f}/s)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(output, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
