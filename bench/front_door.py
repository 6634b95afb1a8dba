"""Front-door benchmark: HTTP requests to a real `headwater serve` (SQLite default and PostgreSQL),
side by side with a trivial aiohttp server in the same run as the floor. Sync executions
(sequential, 16 and 64 concurrent), webhook invokes (202/s and invoke → success), CloudEvents
ingress and list endpoints (keep-alive and a new connection per request). Prints a table, writes JSON.

Named front_door.py, not http.py as issue 17 first called it: run as a script, a bench/http.py would
be imported in place of the standard library's `http` package (aiohttp needs that one)."""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import textwrap
import time
import uuid

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.server import Server, free_port, make_zip  # noqa: E402

POSTGRES_ADMIN = os.environ.get("HEADWATER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
FUNCTION = "def main(*args, **kwargs):\n    return 'ok'\n"

# The floor: the least an aiohttp server can do for each request shape — parse the JSON body and
# answer with JSON, or answer a precomputed body of a given size.
FLOOR_APP = textwrap.dedent("""
    import json, sys
    from aiohttp import web
    bodies = {}
    async def echo(request):
        body = await request.json()
        return web.json_response({"id": "0" * 36, "status": "success", "result": json.dumps(body)}, status=201)
    async def accepted(request):
        await request.read()
        return web.json_response({"execution_id": "0" * 36}, status=202)
    async def sized(request):
        size = int(request.match_info["size"])
        if size not in bodies:
            bodies[size] = b"[" + b" " * (size - 2) + b"]"
        return web.Response(body=bodies[size], content_type="application/json")
    app = web.Application()
    app.router.add_post("/sync", echo)
    app.router.add_post("/accepted", accepted)
    app.router.add_get("/sized/{size}", sized)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def summary(latencies_ms: list[float], elapsed: float) -> dict:
    return {"requests": len(latencies_ms), "req_per_s": round(len(latencies_ms) / elapsed, 1),
            "p50_ms": round(percentile(latencies_ms, 50), 3), "p99_ms": round(percentile(latencies_ms, 99), 3)}


async def load(session: aiohttp.ClientSession, method: str, url: str, *, n: int, concurrency: int,
               body=None, expect: int, new_connection: bool = False, latencies: list[float] | None = None):
    """`n` requests from `concurrency` clients; latency per request, throughput over the whole run.
    With `latencies`, the latencies are appended there and the elapsed seconds returned instead."""
    sink = latencies
    latencies = [] if sink is None else sink
    remaining = iter(range(n))
    failures: list[str] = []

    async def client() -> None:
        own = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) if new_connection else None
        try:
            for _ in remaining:
                started = time.perf_counter()
                async with (own or session).request(method, url, json=body) as resp:
                    payload = await resp.read()
                    if resp.status != expect:
                        failures.append(f"{resp.status}: {payload[:200]!r}")
                latencies.append((time.perf_counter() - started) * 1000)
        finally:
            if own is not None:
                await own.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {n} requests to {url} failed, e.g. {failures[0]}")
    return elapsed if sink is not None else summary(latencies, elapsed)


class Floor:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(self.port)])

    async def ready(self, session: aiohttp.ClientSession) -> None:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/sized/2") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError("floor server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@contextlib.contextmanager
def postgres_database():
    """A database of its own for one Headwater, dropped afterwards."""
    import asyncpg

    name = f"hw_bench_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def set_up(server: Server, functions: int) -> dict:
    runtime = server.request("POST", "/v1/runtimes", {"image": "python3", "name": "python3"}).json()["id"]
    package = make_zip({"main.py": FUNCTION})
    ids = []
    for i in range(functions):
        resp = server.multipart("/v1/functions", {"runtime_id": runtime, "entry": "main.main", "name": f"bench-{i}",
                                                   "code": json.dumps({"source": "package"})}, {"package": package})
        if resp.status != 201:
            raise RuntimeError(f"function create failed: {resp.status} {resp.text}")
        ids.append(resp.json()["id"])
    # The webhook's function is not the sync rows' function, so its executions can be counted apart.
    hook = server.request("POST", "/v1/webhooks", {"function_id": ids[1]}).json()
    # Warm both functions' runtime workers so that every row measures the warm path.
    for function_id in ids[:2]:
        warm = server.request("POST", "/v1/executions", {"function_id": function_id, "input": "warm"})
        if warm.status != 201 or warm.json()["status"] != "success":
            raise RuntimeError(f"warm-up execution failed: {warm.status} {warm.text}")
    return {"function_id": ids[0], "webhook_function_id": ids[1], "webhook_url": hook["webhook_url"]}


async def invoke_to_success(session: aiohttp.ClientSession, server: Server, url: str, n: int) -> dict:
    """One webhook at a time: invoke, then poll its execution until it is done."""
    latencies = []
    started_all = time.perf_counter()
    for i in range(n):
        started = time.perf_counter()
        async with session.post(url, json={"i": i}) as resp:
            execution_id = (await resp.json())["execution_id"]
        while True:
            async with session.get(f"{server.url}/v1/executions/{execution_id}") as resp:
                status = (await resp.json())["status"]
            if status == "success":
                break
            if status not in ("running", "retrying"):
                raise RuntimeError(f"webhook execution ended {status}")
            await asyncio.sleep(0.0005)
        latencies.append((time.perf_counter() - started) * 1000)
    return summary(latencies, time.perf_counter() - started_all)


async def successes(session: aiohttp.ClientSession, server: Server) -> int:
    """Executions this server finished with success so far, from its Prometheus counter: one cheap
    request, where listing the executions would cost the server more with every one finished."""
    async with session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("headwater_executions_total{") and 'status="success"' in line))


async def backlog_drain(session: aiohttp.ClientSession, server: Server, function_id: str, accepted: int,
                        burst_started: float, accept_seconds: float, before: int) -> dict:
    """After a burst of webhook 202s: the rate their executions completed at (from the burst's
    start to the last success), against the rate the 202s arrived at. `before`: successes counted
    before the burst (nothing else runs meanwhile); the executions list confirms the count at the end."""
    deadline = time.perf_counter() + 120
    while True:
        done = await successes(session, server) - before
        if done >= accepted or time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.02)
    total = time.perf_counter() - burst_started
    listed = await count_executions(session, server, {"function_id": function_id, "status": "success"}) - 1  # less the warm-up run
    return {"accepted": accepted, "completed": min(done, listed), "completed_per_s": round(min(done, listed) / total, 1),
            "accepted_per_s": round(accepted / accept_seconds, 1)}


async def count_executions(session: aiohttp.ClientSession, server: Server, params: dict) -> int:
    """How many executions match, page by page (GET /v1/executions answers at most 1000 at a time)."""
    count, url, query = 0, f"{server.url}/v1/executions", {**params, "limit": "1000"}
    while True:
        async with session.get(url, params=query) as resp:
            page = await resp.json()
        count += len(page["executions"])
        if "next" not in page:
            return count
        url, query = server.url + page["next"], None


async def measure_headwater(server: Server, ids: dict, floor: Floor, args) -> dict:
    rows: dict[str, dict] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await floor.ready(session)
        n = args.requests
        if "executions" in args.rows:
            await measure_executions(session, server, ids, floor, n, args, rows)
        if "lists" in args.rows:
            await measure_lists(session, server, floor, n, rows)
    return rows


async def measure_executions(session: aiohttp.ClientSession, server: Server, ids: dict, floor: Floor, n: int, args,
                             rows: dict) -> None:
    """Sync executions, webhook invokes (202s, backlog drain, to success) and CloudEvent ingress."""
    sync_body = {"function_id": ids["function_id"], "input": "bench"}
    rows["sync, sequential"] = {
        "headwater": await load(session, "POST", f"{server.url}/v1/executions", n=n, concurrency=1, body=sync_body, expect=201),
        "floor": await load(session, "POST", f"{floor.url}/sync", n=n, concurrency=1, body=sync_body, expect=201)}
    for c in (16, 64):
        rows[f"sync, {c} concurrent"] = {
            "headwater": await load(session, "POST", f"{server.url}/v1/executions", n=n, concurrency=c, body=sync_body, expect=201),
            "floor": await load(session, "POST", f"{floor.url}/sync", n=n, concurrency=c, body=sync_body, expect=201)}
    before = await successes(session, server)
    started = time.perf_counter()
    webhook = await load(session, "POST", ids["webhook_url"], n=n, concurrency=16, body={"k": "v"}, expect=202)
    accept_seconds = time.perf_counter() - started
    rows["webhook backlog drain"] = {"headwater": await backlog_drain(session, server, ids["webhook_function_id"], n,
                                                                      started, accept_seconds, before)}
    # The floor runs after the drain, so it does not compete with the backlog for the CPU.
    rows["webhook → 202, 16 concurrent"] = {
        "headwater": webhook,
        "floor": await load(session, "POST", f"{floor.url}/accepted", n=n, concurrency=16, body={"k": "v"}, expect=202)}
    rows["webhook → success, one at a time"] = {"headwater": await invoke_to_success(session, server, ids["webhook_url"], args.latency)}
    event = {"specversion": "1.0", "type": "org.example.bench", "source": "/bench", "id": "x", "data": {"k": "v"}}
    rows["CloudEvent ingress, 16 concurrent"] = {
        "headwater": await load_events(session, server, event, n),
        "floor": await load(session, "POST", f"{floor.url}/accepted", n=n, concurrency=16, body=event, expect=202)}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def paired(session: aiohttp.ClientSession, sides: dict[str, tuple[str, int]], *, n: int, rounds: int,
                 new_connection: bool) -> dict[str, dict]:
    """GET `n` requests from 16 clients on each side, in `rounds` alternating slices (a load spike on a
    shared machine then hits both sides of the ratio alike); per side the combined throughput and
    latencies, and the CPU its server process spent per request (the database server's own is not in it)."""
    latencies: dict[str, list[float]] = {name: [] for name in sides}
    elapsed = dict.fromkeys(sides, 0.0)
    cpu: dict[str, float | None] = dict.fromkeys(sides, 0.0)
    for _ in range(rounds):
        for name, (url, pid) in sides.items():
            before = cpu_seconds(pid)
            result = await load(session, "GET", url, n=n // rounds, concurrency=16, expect=200, new_connection=new_connection,
                                latencies=latencies[name])
            after = cpu_seconds(pid)
            elapsed[name] += result
            cpu[name] = None if before is None or after is None or cpu[name] is None else cpu[name] + after - before
    out = {}
    for name in sides:
        out[name] = summary(latencies[name], elapsed[name])
        if cpu[name] is not None:
            out[name]["server_cpu_ms_per_req"] = round(cpu[name] * 1000 / len(latencies[name]), 3)
    return out


async def measure_lists(session: aiohttp.ClientSession, server: Server, floor: Floor, n: int, rows: dict,
                        rounds: int = 4) -> None:
    """GET list endpoints against the floor answering a precomputed body of the same size; keep-alive
    and a new connection per request (the floor's body is built once, then served as is)."""
    for path in ("/v1/functions", "/v1/runtimes"):
        async with session.get(server.url + path) as resp:
            size = len(await resp.read())
        for mode, fresh in (("keep-alive", False), ("new connection", True)):
            rows[f"GET {path} ({size} B), {mode}, 16 concurrent"] = await paired(
                session, {"headwater": (server.url + path, server.proc.pid), "floor": (f"{floor.url}/sized/{size}", floor.proc.pid)},
                n=n, rounds=rounds, new_connection=fresh)


async def load_events(session: aiohttp.ClientSession, server: Server, event: dict, n: int) -> dict:
    """CloudEvents with distinct ids (a repeated id is a duplicate, not new work)."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def client() -> None:
        for i in counter:
            started = time.perf_counter()
            async with session.post(f"{server.url}/v1/events", json={**event, "id": f"bench-{uuid.uuid4().hex}-{i}"}) as resp:
                await resp.read()
                if resp.status >= 300:
                    raise RuntimeError(f"event ingress answered {resp.status}")
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(16)))
    return summary(latencies, time.perf_counter() - started)


def run_database(database: str, args, floor: Floor) -> dict:
    with tempfile.TemporaryDirectory(prefix="hw-bench-http-") as tmp, contextlib.ExitStack() as stack:
        config = ""
        if database == "postgresql":
            url = stack.enter_context(postgres_database())
            config = f"[database]\nconnection = {url}\n"
        server = stack.enter_context(Server(Path(tmp), config))
        ids = set_up(server, args.functions)
        return asyncio.run(measure_headwater(server, ids, floor, args))


def print_table(results: dict) -> None:
    print(f"\n{'database':<11}{'row':<56}{'headwater':>22}{'floor':>22}{'ratio':>8}")
    for database, rows in results.items():
        for name, row in rows.items():
            hw, fl = row["headwater"], row.get("floor")
            if "req_per_s" in hw:
                hw_text = f"{hw['req_per_s']:,.0f}/s p50 {hw['p50_ms']:.2f}"
                fl_text = f"{fl['req_per_s']:,.0f}/s p50 {fl['p50_ms']:.2f}" if fl else ""
                ratio = f"{hw['req_per_s'] / fl['req_per_s']:.2f}" if fl else ""
                row["ratio"] = float(ratio) if ratio else None
            else:
                hw_text = f"{hw['completed_per_s']:,.0f}/s done"
                fl_text = f"{hw['accepted_per_s']:,.0f}/s 202"  # the ratio here: completions to 202s
                ratio = f"{hw['completed_per_s'] / hw['accepted_per_s']:.2f}"
                row["ratio"] = float(ratio)
            print(f"{database:<11}{name:<56}{hw_text:>22}{fl_text:>22}{ratio:>8}")
            if "p99_ms" in hw:
                print(f"{'':<11}{'':<56}{'p99 %.2f ms' % hw['p99_ms']:>22}{('p99 %.2f ms' % fl['p99_ms']) if fl else '':>22}")
            if "server_cpu_ms_per_req" in hw and fl and "server_cpu_ms_per_req" in fl:
                print(f"{'':<11}{'server CPU per request':<56}{'%.3f ms' % hw['server_cpu_ms_per_req']:>22}"
                      f"{'%.3f ms' % fl['server_cpu_ms_per_req']:>22}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per row")
    parser.add_argument("--latency", type=int, default=200, help="webhooks timed one at a time to success")
    parser.add_argument("--functions", type=int, default=50, help="functions listed by GET /v1/functions")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--rows", default="executions,lists",
                        help="which groups of rows: executions (sync, webhooks, events) and/or lists (GET list endpoints)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "front_door.json"))
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
