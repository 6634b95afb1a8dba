"""Subscriptions benchmark: a real `headwater serve` (SQLite default and PostgreSQL). Idle CPU of the
server process (from /proc/<pid>/stat over a window) with 0, N and N+M subscriptions in the same
run; creating N through the API in batches (POST /v1/subscriptions/batch), then M one request
each, with the server CPU each costs; a trivial aiohttp server answering the same one-at-a-time
POSTs is the same-run floor. Prints a table, writes JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import asyncio
import contextlib
import json
import os
import platform
import tempfile
import time

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from front_door import Floor, load, postgres_database  # noqa: E402
from tests.e2e.server import Server, make_zip  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5), counted after the name


async def idle_cpu(pid: int, window: float, settle: float) -> dict:
    """Percent of one core the process used over `window` seconds of nothing asked of it."""
    await asyncio.sleep(settle)  # let work the last phase left (group commits, a check) finish
    before, started = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(window)
    used, elapsed = cpu_seconds(pid) - before, time.monotonic() - started
    return {"cpu_percent": round(100 * used / elapsed, 2), "cpu_s": round(used, 3), "window_s": round(elapsed, 1)}


def subscription(function_id: str, i: int) -> dict:
    # Most filed by subject (one exact cell each), some by event type: what a table of this size holds.
    if i % 5:
        return {"source": "http", "function_id": function_id, "name": f"bench-{i}", "filters": {"subject": f"thing-{i}"}}
    return {"source": "http", "function_id": function_id, "name": f"bench-{i}", "types": [f"com.example.bench.{i}"]}


async def create_batched(session: aiohttp.ClientSession, url: str, function_id: str, n: int, size: int, offset: int,
                         pid: int) -> dict:
    cpu, started = cpu_seconds(pid), time.perf_counter()
    for start in range(0, n, size):
        items = [subscription(function_id, offset + i) for i in range(start, min(n, start + size))]
        async with session.post(f"{url}/v1/subscriptions/batch", json={"subscriptions": items}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"batch create failed: {resp.status} {await resp.text()}")
    elapsed = time.perf_counter() - started
    return {"subscriptions": n, "batch_size": size, "seconds": round(elapsed, 2), "per_s": round(n / elapsed, 1),
            "server_cpu_ms_each": round(1000 * (cpu_seconds(pid) - cpu) / n, 3)}


async def create_one_by_one(session: aiohttp.ClientSession, url: str, function_id: str, n: int, offset: int,
                            pid: int) -> dict:
    latencies = []
    cpu, started = cpu_seconds(pid), time.perf_counter()
    for i in range(n):
        sent = time.perf_counter()
        async with session.post(f"{url}/v1/subscriptions", json=subscription(function_id, offset + i)) as resp:
            if resp.status != 201:
                raise RuntimeError(f"create failed: {resp.status} {await resp.text()}")
            await resp.read()
        latencies.append((time.perf_counter() - sent) * 1000)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"subscriptions": n, "seconds": round(elapsed, 2), "per_s": round(n / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2], 3), "p99_ms": round(latencies[int(len(latencies) * 0.99)], 3),
            "server_cpu_ms_each": round(1000 * (cpu_seconds(pid) - cpu) / n, 3)}


async def measure(server: Server, floor: Floor, args) -> dict:
    pid = server.proc.pid
    runtime = server.request("POST", "/v1/runtimes", {"image": "python3", "name": "python3"}).json()["id"]
    resp = server.multipart("/v1/functions", {"runtime_id": runtime, "entry": "main.main",
                                               "code": json.dumps({"source": "package"})},
                            {"package": make_zip({"main.py": "def main(**kw):\n    return 'ok'\n"})})
    function_id = resp.json()["id"]
    rows: dict[str, dict] = {}
    n = args.subscriptions
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await floor.ready(session)
        rows["idle, 0 subscriptions"] = await idle_cpu(pid, args.window, args.settle)
        rows[f"create {n:,} in batches of {args.batch}"] = await create_batched(
            session, server.url, function_id, n, args.batch, 0, pid)
        rows[f"idle, {n:,} subscriptions"] = await idle_cpu(pid, args.window, args.settle)
        m = args.one_at_a_time
        rows[f"create {m:,} one at a time"] = one = await create_one_by_one(session, server.url, function_id, m, n, pid)
        one["floor"] = await load(session, "POST", f"{floor.url}/sync", n=m, concurrency=1,
                                  body=subscription(function_id, 0), expect=201)
        rows[f"idle, {n + m:,} subscriptions"] = await idle_cpu(pid, args.window, args.settle)
    listed = server.request("GET", "/v1/subscriptions").json()["subscriptions"]
    if len(listed) != n + m:
        raise RuntimeError(f"expected {n + m} subscriptions, the API lists {len(listed)}")
    return rows


def run_database(database: str, args, floor: Floor) -> dict:
    with tempfile.TemporaryDirectory(prefix="hw-bench-subs-") as tmp, contextlib.ExitStack() as stack:
        config = "[DEFAULT]\nlog_level = WARNING\n"
        if database == "postgresql":
            config += f"[database]\nconnection = {stack.enter_context(postgres_database())}\n"
        server = stack.enter_context(Server(Path(tmp), config))
        return asyncio.run(measure(server, floor, args))


def print_table(results: dict) -> None:
    print(f"\n{'database':<11}{'row':<36}{'headwater':>44}{'floor':>22}")
    for database, rows in results.items():
        for name, row in rows.items():
            floor = ""
            if "cpu_percent" in row:
                text = f"{row['cpu_percent']:.2f} % of a core ({row['cpu_s']:.2f} s / {row['window_s']:.0f} s)"
            else:
                text = f"{row['seconds']:.1f} s, {row['per_s']:,.0f}/s, {row['server_cpu_ms_each']:.2f} ms CPU each"
                if "p50_ms" in row:
                    text = f"p50 {row['p50_ms']:.2f} ms, " + text
                    floor = f"{row['floor']['req_per_s']:,.0f}/s p50 {row['floor']['p50_ms']:.2f}"
            print(f"{database:<11}{name:<36}{text:>44}{floor:>22}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscriptions", type=int, default=10_000, help="created in batches")
    parser.add_argument("--one-at-a-time", type=int, default=10_000, help="then created one request each")
    parser.add_argument("--batch", type=int, default=1000, help="subscriptions per batch request (the API takes up to 1000)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds each idle CPU reading lasts")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds waited before each idle reading")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "subscriptions.json"))
    args = parser.parse_args()
    floor = Floor()
    try:
        results = {database: run_database(database, args, floor) for database in args.databases.split(",")}
    finally:
        floor.stop()
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                           "load_average": os.getloadavg(), "args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
