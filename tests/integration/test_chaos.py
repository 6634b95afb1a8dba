"""Three `headwater serve` replicas (separate data dirs; one PostgreSQL database, one bus, one etcd,
one package store) under chaos: a replica is SIGKILLed every few seconds and restarted while a
stream of events, a limited subscription and a per-second cron job run. Nothing is lost, nothing
runs twice, every cron tick runs once, max_concurrency holds across the replicas. Also: a package
uploaded through one replica runs on the others, on the local and the Kubernetes engine."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import random
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from router.events import Event, derived_id
from tests.e2e.server import Server, free_port, make_zip
from tests.integration.test_durability import BROKERS, BusPlace, Records, pg_url, publish_all, require  # noqa: F401
from tests.integration.tcpproxy import TcpProxy
from tests.integration.test_etcd_coordination import etcd  # noqa: F401 - the etcd-server fixture
from tests.processes import shared_dir

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# The figures; fewer through HEADWATER_CHAOS_EVENTS for a quick look.
STREAM_EVENTS = int(os.environ.get("HEADWATER_CHAOS_EVENTS", "5000"))
LIMITED_EVENTS = min(120, STREAM_EVENTS)
MAX_CONCURRENCY = 2
KILL_EVERY = 5.0
FUNCTION_TIMEOUT = 1  # seconds: the runtime kills a run that outlives it
STREAM_TYPE, LIMITED_TYPE = "chaos.stream", "chaos.limited"

# The package store every replica shares: real Swift when the OpenStack harness is up, else the
# filesystem store on one directory (what a ReadWriteMany volume gives pods).
OPENSTACK = os.environ.get("HEADWATER_OPENSTACK", "").lower() in ("1", "true", "yes")


def store_config(packages: Path) -> str:
    if OPENSTACK:
        from tests.integration.openstack.conftest import SWIFT_URL

        return (f"provider = swift\nswift_store_url = {SWIFT_URL}/v1/AUTH_headwater\n"
                f"swift_store_container = hw-chaos-{uuid.uuid4().hex[:8]}\n")
    return f"provider = filesystem\nfile_system_dir = {packages}\n"


def replica_config(pg: str, backend: str, bus_url: str, etcd_port: int, packages: Path, engine: str = "local",
                   extra: str = "") -> str:
    return f"""
[DEFAULT]
log_level = WARNING
[database]
connection = {pg}
[bus]
backend = {backend}
url = {bus_url}
[engine]
backend = {engine}
coordination = etcd
download_token_secret = chaos-test-shared-secret
[etcd]
port = {etcd_port}
# Short: a killed replica's permits and leaderships come back 2 s after its death.
lease_ttl = 2
prefix = /chaos-{uuid.uuid4().hex[:8]}/
[delivery]
# An execution whose replica died is taken over timeout (1 s) + 2 s later.
lease_margin = 2
[sources]
enabled = http, cron
[cron]
max_sleep = 0.1
[storage]
{store_config(packages)}
{extra}
"""


class Replica:
    """One `headwater serve` that keeps its data dir and port across kills (as a pod keeps its name)."""

    def __init__(self, name: str, data_dir: Path, config: str):
        self.name, self.data_dir, self.config = name, data_dir, config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.public_url(self.url)
        self.server: Server | None = None
        self.kills = 0

    def public_url(self, url: str) -> None:
        """The address pods and clients reach the API at (a load balancer in front of every replica)."""
        (self.data_dir / "replica.conf").write_text(f"[api]\npublic_url = {url}\n")

    def start(self) -> Server:
        log = self.data_dir / "server.log"
        if log.exists():  # keep each life's log for a post-mortem
            log.rename(self.data_dir / f"server.log.{self.kills}")
        server = Server(self.data_dir, self.config,
                        extra_args=("--port", str(self.port), "--config-file", str(self.data_dir / "replica.conf")))
        server.port, server.url = self.port, self.url  # argparse keeps the last --port: ours
        self.server = server
        return server

    def kill(self) -> None:
        assert self.server is not None
        self.server.proc.kill()  # SIGKILL: no shutdown, no acks, no lease revoked
        self.server.proc.wait()
        self.server._log.close()
        self.kills += 1

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def function_source(log_path: str) -> str:
    """A function that appends what it does to a log every replica's runs share (O_APPEND: one
    write per line, never interleaved): the side effect the test counts."""
    return f"""
import os, time

LOG = {log_path!r}

def note(line):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)

def stream(i=None, **kw):
    note(f"stream {{i}}")
    return i

def limited(i=None, **kw):
    note(f"start {{i}} {{time.time()!r}}")
    time.sleep(0.05)
    note(f"end {{i}} {{time.time()!r}}")
    return i

def tick(**kw):
    note("tick")
"""


def create_function(server: Server, source: str, entry: str) -> str:
    runtime = server.request("POST", "/v1/runtimes", {"image": "python3"})
    assert runtime.status == 201, runtime.text
    form = {"runtime_id": runtime.json()["id"], "code": json.dumps({"source": "package"}), "entry": entry, "timeout": str(FUNCTION_TIMEOUT)}
    function = server.multipart("/v1/functions", form, {"package": make_zip({"main.py": source})})
    assert function.status == 201, function.text
    return function.json()["id"]


def subscribe(server: Server, body: dict) -> str:
    resp = server.request("POST", "/v1/subscriptions", body)
    assert resp.status == 201, resp.text
    return resp.json()["id"]


def stream(n: int, tag: str, kind: str) -> list[Event]:
    now = _dt.datetime.now(_dt.timezone.utc)
    return [Event(id=f"{tag}-{kind}-{i}", source="/chaos", type=kind, data={"i": i}, time=now,
                  extensions={"sourcekind": "http"}) for i in range(n)]


def peak_concurrency(lines: list[str], kills: list[float]) -> tuple[int, int]:
    """The most runs of the limited function at once, from its own start/end times, and how many
    runs never ended: killed with their replica (the kernel kills a runtime's processes with it), or
    by the runtime at the function's timeout. Such a run counts as running until the first kill
    after its start or until its timeout, whichever comes first."""
    starts: dict[str, list[float]] = {}
    ends: dict[str, list[float]] = {}
    for line in lines:
        word, i, at = line.split()
        (starts if word == "start" else ends).setdefault(i, []).append(float(at))
    edges: list[tuple[float, int]] = []
    unfinished = 0
    for i, begun in starts.items():
        # A run that was killed and run again has two starts and one end: an end belongs to the
        # latest start before it (its own run), the earlier start is the killed run.
        open_runs = sorted(begun)
        for end in sorted(ends.get(i, [])):
            b = max((x for x in open_runs if x <= end), default=None)
            if b is not None:
                open_runs.remove(b)
                edges += [(b, 1), (end, -1)]
        for b in open_runs:
            unfinished += 1
            end = min(next((k for k in sorted(kills) if k >= b), float("inf")), b + FUNCTION_TIMEOUT)
            edges += [(b, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak, unfinished


async def dead_letters(records: Records) -> dict:
    async with records.engine.connect() as conn:
        rows = (await conn.execute(sa.text("SELECT subscription_id, left(reason, 160) AS reason, count(*) AS n FROM dead_letters "
                                           "GROUP BY 1, 2"))).all()
    return {(r.subscription_id, r.reason): r.n for r in rows}


async def finished_count(records: Records, subscription_id: str) -> int:
    return (await records.counts(subscription_id))["finished"]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("backend", BROKERS)
async def test_three_replicas_killed_in_turn_lose_nothing_and_run_nothing_twice(backend, pg_url, etcd, tmp_path, capsys):  # noqa: F811
    require(backend)
    place = BusPlace(backend)
    side_effects = Path(shared_dir("headwater-chaos-")) / "effects.log"
    side_effects.touch()
    side_effects.chmod(0o666)  # every run's sandbox uid appends to it
    packages = Path(shared_dir("headwater-chaos-packages-"))
    config = replica_config(pg_url, backend, place.url(), etcd, packages)
    replicas = [Replica(name, tmp_path / name, config) for name in ("r1", "r2", "r3")]
    records = Records(pg_url)
    publisher = place.bus()
    kills: list[float] = []  # when each SIGKILL happened (the function's clock: time.time)
    chaos: asyncio.Task | None = None
    try:
        for replica in replicas:  # one after the other: the first migrates the database
            await asyncio.to_thread(replica.start().wait_ready)
        first = replicas[0].server
        source = function_source(str(side_effects))
        stream_fn = await asyncio.to_thread(create_function, first, source, "main.stream")
        limited_fn = await asyncio.to_thread(create_function, first, source, "main.limited")
        tick_fn = await asyncio.to_thread(create_function, first, source, "main.tick")
        stream_sub = await asyncio.to_thread(subscribe, first, {"source": "http", "types": [STREAM_TYPE], "function_id": stream_fn})
        limited_sub = await asyncio.to_thread(subscribe, first, {
            "source": "http", "types": [LIMITED_TYPE], "function_id": limited_fn,
            "limits": {"max_concurrency": MAX_CONCURRENCY}})
        cron = await asyncio.to_thread(subscribe, first, {"source": "cron", "pattern": "* * * * * *", "function_id": tick_fn})
        for replica in replicas[1:]:  # the others learn of the subscriptions from their periodic reload
            await asyncio.to_thread(wait_indexed, replica.server, LIMITED_TYPE, limited_sub)
            await asyncio.to_thread(wait_indexed, replica.server, STREAM_TYPE, stream_sub)

        async def kill_in_turn() -> None:
            rng = random.Random(place.tag)
            while True:
                await asyncio.sleep(KILL_EVERY)  # the chaos schedule, not a wait for anything
                victim = rng.choice(replicas)
                await asyncio.to_thread(victim.kill)
                kills.append(time.time())
                victim.start()  # restarted at once; it rejoins when it is up

        await publisher.start()
        started = time.monotonic()
        chaos = asyncio.get_running_loop().create_task(kill_in_turn())
        await publish_all(publisher, stream(LIMITED_EVENTS, place.tag, LIMITED_TYPE))
        await publish_all(publisher, stream(STREAM_EVENTS, place.tag, STREAM_TYPE), pace=0.2)

        async def all_done() -> bool:
            return (await finished_count(records, stream_sub) >= STREAM_EVENTS
                    and await finished_count(records, limited_sub) >= LIMITED_EVENTS and len(kills) >= 3)

        deadline = time.monotonic() + (300 if STREAM_EVENTS >= 1000 else 90)
        while not await all_done():
            assert time.monotonic() < deadline, (f"not done: {await records.counts(stream_sub)} {await records.counts(limited_sub)}; "
                                                 f"dead letters: {await dead_letters(records)}")
            assert not chaos.done(), chaos.exception()
            await asyncio.sleep(0.5)
        chaos.cancel()
        await asyncio.gather(chaos, return_exceptions=True)
        for replica in replicas:  # every replica up again before the schedule is stopped
            await asyncio.to_thread(replica.server.wait_ready)
        resp = await asyncio.to_thread(replicas[0].server.request, "DELETE", f"/v1/subscriptions/{cron}")
        assert resp.status == 204, resp.text
        final_stream = await records.wait_finished(stream_sub, STREAM_EVENTS, timeout=120)
        final_limited = await records.wait_finished(limited_sub, LIMITED_EVENTS, timeout=120)
        async with records.engine.connect() as conn:
            async def ticks_settled():
                rows = (await conn.execute(sa.text("SELECT event_id, created_at, status, attempts FROM executions "
                                                   "WHERE subscription_id = :s ORDER BY created_at"), {"s": cron})).all()
                return rows if all(r.status in ("success", "failed", "error") for r in rows) else None

            rows = await _eventually(ticks_settled, 60)
        await asyncio.sleep(1.0)  # quiet period: a late redelivery or duplicate run would show up now
        final_stream, final_limited = await records.counts(stream_sub), await records.counts(limited_sub)
        elapsed = time.monotonic() - started

        # Records: every event exactly one execution, finished successfully.
        for final, n in ((final_stream, STREAM_EVENTS), (final_limited, LIMITED_EVENTS)):
            assert final["total"] == final["events"] == final["finished"] == n and final["open"] == 0, final
        # The function's own side effects: every event ran; a run appears twice only when its first
        # run's replica was killed before recording the outcome (that execution was taken over).
        lines = side_effects.read_text().splitlines()
        ran = [line.split()[1] for line in lines if line.startswith("stream ")]
        assert set(ran) == {str(i) for i in range(STREAM_EVENTS)}, f"lost: {STREAM_EVENTS - len(set(ran))}"
        twice = len(ran) - len(set(ran))
        assert twice <= final_stream["taken_over"], (twice, final_stream)
        # max_concurrency across the three replicas, from the function's own start/end times.
        peak, unfinished = peak_concurrency([line for line in lines if line.startswith(("start ", "end "))], kills)
        assert peak == MAX_CONCURRENCY, f"{peak} runs of the limited function at once (limit {MAX_CONCURRENCY})"
        # Cron: every second between the first tick and the last ran exactly once.
        fired = {r.event_id for r in rows}
        start = min(r.created_at for r in rows).replace(microsecond=0) - _dt.timedelta(seconds=30)
        seconds = [start + _dt.timedelta(seconds=k) for k in range(600)]
        ticks = [t for t in seconds if derived_id("cron", cron, t.replace(tzinfo=_dt.timezone.utc).isoformat()) in fired]
        gaps = {(y - x).total_seconds() for x, y in zip(ticks, ticks[1:])}
        assert len(rows) == len(fired) == len(ticks) >= 10, (len(rows), len(fired), len(ticks))
        assert gaps == {1.0}, f"ticks skipped: gaps {sorted(gaps)}"
        assert all(r.status == "success" for r in rows), [r for r in rows if r.status != "success"]
        with capsys.disabled():
            print(f"\n[chaos/{backend}] store={'swift' if OPENSTACK else 'filesystem (shared dir)'}; {len(kills)} SIGKILLs "
                  f"({', '.join(f'{r.name}×{r.kills}' for r in replicas)}) in {elapsed:.0f}s; {STREAM_EVENTS} stream events "
                  f"each recorded once ({final_stream['taken_over']} taken over after a kill, {twice} side effects repeated "
                  f"by those); {LIMITED_EVENTS} limited events, peak {peak} at once ({unfinished} runs killed mid-way); "
                  f"{len(rows)} cron ticks each once ({sum(r.attempts > 1 for r in rows)} taken over)")
    finally:
        if chaos is not None:
            chaos.cancel()
            await asyncio.gather(chaos, return_exceptions=True)
        for replica in replicas:
            replica.stop()
        # For a post-mortem: the side effects and kill times beside the replicas' logs.
        (tmp_path / "effects.log").write_text(side_effects.read_text())
        (tmp_path / "kills.txt").write_text("\n".join(map(repr, kills)))
        with contextlib.suppress(Exception):
            await publisher.close()
        await records.close()
        await place.cleanup()


def wait_indexed(server: Server, event_type: str, subscription_id: str, timeout: float = 60) -> None:
    """Wait until the replica's own index routes `event_type` to the subscription (its dry run)."""
    probe = {"specversion": "1.0", "id": "probe", "source": "/probe", "type": event_type}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = server.request("POST", "/v1/subscriptions/test", probe)
        if resp.status == 200 and subscription_id in {m["subscription_id"] for m in resp.json()["matches"]}:
            return
        time.sleep(0.2)
    raise AssertionError(f"{subscription_id} never reached the index of the replica at {server.url}")


async def _eventually(probe, timeout: float):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"{probe.__name__} never held"
        await asyncio.sleep(0.2)


# -- a package stored through one replica runs on every replica ----------------------------------

class LoadBalancer(TcpProxy):
    """Round robin over the replicas' ports: each new connection goes to the next replica."""

    def __init__(self, ports: list[int]):
        super().__init__("127.0.0.1", ports[0])
        self.ports, self.turn = ports, 1  # the first connection goes to the second replica, not the one that stored the package
        self.by_port = {port: 0 for port in ports}

    async def _accept(self, client_reader, client_writer) -> None:
        port = self.ports[self.turn % len(self.ports)]
        self.turn += 1
        self.by_port[port] += 1
        self.target = ("127.0.0.1", port)  # read by the connect that follows, before any await
        await super()._accept(client_reader, client_writer)


HELLO = "def main(name='nobody', **kw):\n    return 'hello ' + name\n"


def run_on(server: Server, function_id: str, name: str) -> dict:
    resp = server.request("POST", "/v1/executions", {"function_id": function_id, "input": {"name": name}}, timeout=120)
    assert resp.status == 201, resp.text
    return resp.json()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["local", "kubernetes"])
async def test_a_package_uploaded_through_one_replica_runs_on_the_others(engine, pg_url, etcd, tmp_path, capsys):  # noqa: F811
    require("rabbitmq")
    place = BusPlace("rabbitmq")
    packages = Path(shared_dir("headwater-chaos-packages-"))
    cluster_context = None
    extra, image = "", "python3"
    if engine == "kubernetes":
        from tests.fakes.kube_cluster import kube_cluster

        cluster_context = kube_cluster(tmp_path / "cluster")
        cluster = await cluster_context.__aenter__()
        if cluster.fake is None:
            pytest.skip("three replicas on the fake cluster; a real one is covered by the engine suite")
        extra = (f"[kubernetes]\nkube_host = {cluster.fake.url}\nnamespace = {cluster.namespace}\nreplicas = 2\n"
                 "worker_wait = 60\nrollout_timeout = 60\n")
        image = "headwater/runtime-python3:0.1.0"
    config = replica_config(pg_url, "rabbitmq", place.url(), etcd, packages, engine=engine, extra=extra)
    replicas = [Replica(name, tmp_path / name, config) for name in ("r1", "r2", "r3")]
    # One public URL in front of all three (as the layout in docs/ha.md has it): pods fetch packages
    # through it, so each download may reach any replica, which must find the package whoever stored it.
    balancer = await LoadBalancer([r.port for r in replicas]).start()
    try:
        for replica in replicas:
            replica.public_url(f"http://127.0.0.1:{balancer.port}")
            await asyncio.to_thread(replica.start().wait_ready)
        first = replicas[0].server
        runtime = await asyncio.to_thread(first.request, "POST", "/v1/runtimes", {"image": image, "name": "python3"})
        assert runtime.status == 201, runtime.text
        runtime_id = runtime.json()["id"]

        async def runtime_available():
            got = await asyncio.to_thread(first.request, "GET", f"/v1/runtimes/{runtime_id}")
            assert got.json()["status"] != "error", got.text
            return got.json()["status"] == "available"

        await _eventually(runtime_available, 120)
        form = {"runtime_id": runtime_id, "code": json.dumps({"source": "package"}), "entry": "main.main"}
        function = await asyncio.to_thread(first.multipart, "/v1/functions", form, {"package": make_zip({"main.py": HELLO})})
        assert function.status == 201, function.text
        function_id = function.json()["id"]
        outcomes = {}
        for replica in replicas[1:]:  # never through the replica that stored it
            outcome = await asyncio.to_thread(run_on, replica.server, function_id, replica.name)
            outcomes[replica.name] = outcome
            assert (outcome["status"], json.loads(outcome["result"])["output"]) == ("success", f"hello {replica.name}"), outcome
        with capsys.disabled():
            print(f"\n[packages/{engine}] stored through r1 ({'swift' if OPENSTACK else 'filesystem, shared dir'}), ran on r2 "
                  f"and r3; connections through the public URL by replica: {list(balancer.by_port.values())}")
    finally:
        for replica in replicas:
            replica.stop()
        await balancer.close()
        if cluster_context is not None:
            await cluster_context.__aexit__(None, None, None)
        await place.cleanup()


def test_peak_concurrency_pairs_a_rerun_with_its_own_end():
    """The checker itself: event 1 was killed at 10.5 and run again at 12; event 2 ran 12.02–12.07.
    At most two ran at once (pairing the re-run's end with the killed start would make it three)."""
    lines = ["start 1 10.0", "start 2 12.02", "start 1 12.0", "end 1 12.05", "end 2 12.07", "start 3 12.06", "end 3 12.1"]
    assert peak_concurrency(lines, kills=[10.5]) == (2, 1)
    assert peak_concurrency(["start 1 10.0", "start 2 10.2"], kills=[]) == (2, 2)  # no kill: the timeout ends them
    assert peak_concurrency(["start 1 10.0", "start 2 11.5"], kills=[]) == (1, 2)
