"""The local engine's warm pool (engine/local_pool.py) with stand-in servers: it fills per runtime,
a claim is final and triggers a refill, a server that will not start backs off on the injected clock,
an idle server that dies is replaced, and stop stops every idle server."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from engine import local_pool
from engine.local_pool import WarmPool


class FakeProcess:
    def __init__(self) -> None:
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        return self.returncode

    def die(self, code: int = -9) -> None:
        self.returncode = code
        self._exited.set()


class FakeServer:
    def __init__(self, runtime: str, n: int) -> None:
        self.runtime = runtime
        self.name = f"{runtime}-pool-{n}"
        self.process = FakeProcess()

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


class Servers:
    """Starts and stops stand-in servers; `failing` runtimes raise on start."""

    def __init__(self) -> None:
        self.started: list[FakeServer] = []
        self.stopped: list[FakeServer] = []
        self.failing: set[str] = set()
        self.attempts: dict[str, int] = {}
        self._seq = itertools.count(1)

    async def start(self, runtime: str) -> FakeServer:
        self.attempts[runtime] = self.attempts.get(runtime, 0) + 1
        await asyncio.sleep(0)  # a real start awaits the server's LISTENING line
        if runtime in self.failing:
            raise RuntimeError(f"runtime server {runtime} did not start: php: not found")
        server = FakeServer(runtime, next(self._seq))
        self.started.append(server)
        return server

    async def stop(self, server: FakeServer) -> None:
        if server.alive:
            server.process.die(-15)
        self.stopped.append(server)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition, what: str) -> None:
    """Let the pool's task run until condition holds (pytest-timeout catches a hang)."""
    while not condition():
        await asyncio.sleep(0.001)


@pytest.fixture
async def pool():
    servers, clock = Servers(), Clock()
    made: list[WarmPool] = []

    def make(size: int, runtimes: list[str]) -> WarmPool:
        warm = WarmPool(size, servers.start, servers.stop, clock=clock)
        warm.start(runtimes)
        made.append(warm)
        return warm

    yield make, servers, clock
    for warm in made:
        await warm.stop()


async def test_fills_every_runtime_to_its_size(pool):
    make, servers, _ = pool
    warm = make(2, ["python3", "nodejs", "go"])
    assert await warm.wait_full(30)
    assert {rt: len(warm.idle(rt)) for rt in ("python3", "nodejs", "go")} == {"python3": 2, "nodejs": 2, "go": 2}
    assert len(servers.started) == 6


async def test_a_claim_is_final_and_the_pool_refills_with_a_new_server(pool):
    make, servers, _ = pool
    warm = make(1, ["python3"])
    assert await warm.wait_full(30)
    (first,) = warm.idle("python3")
    claimed = warm.claim("python3")
    assert claimed is first
    await until(lambda: warm.idle("python3"), "the refill")
    (refill,) = warm.idle("python3")
    assert refill is not first
    # The claimed server stays the claimant's: later claims never hand it out again.
    again = warm.claim("python3")
    assert again is refill
    assert claimed not in warm.idle("python3")
    assert claimed not in servers.stopped  # stopping it is its owner's business, not the pool's


async def test_claim_on_an_empty_or_unknown_runtime_is_none(pool):
    make, _, _ = pool
    warm = make(0, ["python3"])
    assert warm.claim("python3") is None
    assert warm.claim("cobol") is None
    assert warm.idle("python3") == []


async def test_a_dead_idle_server_is_never_claimed(pool):
    make, _, _ = pool
    warm = make(1, ["python3"])
    assert await warm.wait_full(30)
    (server,) = warm.idle("python3")
    server.process.returncode = -9  # died, and the pool's watcher has not run yet
    assert warm.claim("python3") is None


async def test_an_idle_server_that_dies_is_replaced(pool):
    make, servers, clock = pool
    warm = make(1, ["python3"])
    assert await warm.wait_full(30)
    (server,) = warm.idle("python3")
    clock.now += local_pool.CRASH_LOOP + 1  # it had been up a while: no crash loop
    server.process.die(-9)
    await until(lambda: warm.idle("python3") and warm.idle("python3")[0] is not server, "a replacement")
    assert server in servers.stopped  # its log readers went with it
    assert warm.idle("python3")[0].alive


async def test_a_runtime_that_will_not_start_backs_off_on_the_clock_and_spares_the_others(pool, caplog):
    make, servers, clock = pool
    servers.failing.add("php")
    warm = make(1, ["php", "python3"])
    await until(lambda: warm.idle("python3"), "python3's server")
    await until(lambda: servers.attempts.get("php") == 1, "php's first attempt")
    for _ in range(50):
        await asyncio.sleep(0)  # quiet period: no second php attempt may happen before the clock moves
    assert servers.attempts["php"] == 1
    assert "php runtime server could not start" in caplog.text and "php: not found" in caplog.text
    # The wait doubles per failure: 1 s, then 2 s.
    clock.now += local_pool.RETRY_FIRST
    warm.claim("python3")  # any claim wakes the refill
    await until(lambda: servers.attempts["php"] == 2, "php's second attempt")
    clock.now += local_pool.RETRY_FIRST
    warm.claim("python3")
    for _ in range(50):
        await asyncio.sleep(0)  # quiet period: 1 s after the second failure is too soon
    assert servers.attempts["php"] == 2
    servers.failing.clear()  # php installed meanwhile
    clock.now += local_pool.RETRY_FIRST
    warm.claim("python3")
    assert await warm.wait_full(30)
    assert servers.attempts["php"] == 3


async def test_a_server_that_dies_right_after_start_backs_off(pool):
    make, servers, clock = pool
    warm = make(1, ["python3"])
    assert await warm.wait_full(30)
    (server,) = warm.idle("python3")
    server.process.die(1)  # within CRASH_LOOP of its start
    await until(lambda: server in servers.stopped, "the dead server's clean-up")
    for _ in range(50):
        await asyncio.sleep(0)  # quiet period: no restart in a tight loop
    assert len(servers.started) == 1 and warm.idle("python3") == []
    clock.now += local_pool.RETRY_FIRST
    warm.claim("python3")
    assert await warm.wait_full(30)
    assert len(servers.started) == 2


async def test_stop_stops_every_idle_server_and_refills_no_more(pool):
    make, servers, _ = pool
    warm = make(2, ["python3", "nodejs"])
    assert await warm.wait_full(30)
    idle = warm.idle("python3") + warm.idle("nodejs")
    await warm.stop()
    assert set(servers.stopped) == set(idle)
    assert not any(s.alive for s in idle)
    assert warm.claim("python3") is None
    assert len(servers.started) == 4
