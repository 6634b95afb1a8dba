"""The Coordination contract every backend passes (memory: the engines of one process; etcd: a real
etcd-server on free ports): shared permits and shared rates, the primitives behind cluster-wide
subscription limits, and that a holder which is gone gives its permits back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from engine.coordination import EtcdCoordinator, MemoryCoordinator, MemoryState
from tests.conditions import eventually
from tests.integration.test_etcd_coordination import etcd  # noqa: F401 - the etcd-server fixture

BACKENDS = ["memory", "etcd"]


@pytest.fixture
async def pair(request):
    """Two coordinators standing for two replicas; yields (a, b, kill) where kill(c) ends c the way
    a SIGKILL would: no resign, no release (etcd: its lease is left to expire)."""
    made: list = []
    if request.param == "memory":
        state = MemoryState()

        def new():
            return MemoryCoordinator(f"engine-{uuid.uuid4().hex[:6]}", state)

        async def kill(c):
            await c.stop()  # in one process, a gone engine's holdings go at once
    else:
        port = request.getfixturevalue("etcd")
        prefix = f"/contract-{uuid.uuid4().hex[:6]}/"

        def new():
            return EtcdCoordinator(f"engine-{uuid.uuid4().hex[:6]}", port=port, lease_ttl=2, prefix=prefix)

        async def kill(c):
            c._keepalive.cancel()  # no keep-alive, no revoke: the lease runs out after its TTL
            with contextlib.suppress(asyncio.CancelledError):
                await c._keepalive
            c._keepalive = None
            client, c.client = c.client, None
            await client.close()
    for _ in range(2):
        c = new()
        await c.start()
        made.append(c)
    try:
        yield made[0], made[1], kill
    finally:
        for c in made:
            if not (isinstance(c, EtcdCoordinator) and c.client is None):  # a killed one has nothing to stop
                await c.stop()


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
async def test_permits_are_shared_and_never_over_the_limit(pair):
    a, b, _ = pair
    holding, peak, done = 0, 0, 0

    async def run(c, n):
        nonlocal holding, peak, done
        for _ in range(n):
            async with c.permit("concurrency/sub-1", 2):
                holding += 1
                peak = max(peak, holding)
                await asyncio.sleep(0.01)  # hold it across a switch, so others must wait
                holding -= 1
            done += 1

    await asyncio.gather(*(run(c, 4) for c in (a, b, a, b)))
    assert (done, peak) == (16, 2)


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
async def test_a_waiter_gets_the_permit_when_a_holder_gives_it_back(pair):
    a, b, _ = pair
    release = asyncio.Event()
    got: list[str] = []

    async def hold(c, who):
        async with c.permit("concurrency/sub-2", 1):
            got.append(who)
            await release.wait()

    first = asyncio.create_task(hold(a, "a"))
    await eventually(lambda: got == ["a"])
    second = asyncio.create_task(hold(b, "b"))
    await asyncio.sleep(0.3)  # quiet period: b must not get the only permit while a holds it
    assert got == ["a"]
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert got == ["a", "b"]


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
async def test_a_dead_holders_permit_comes_back_with_its_lease(pair):
    a, b, kill = pair
    held = asyncio.Event()

    async def hold_forever():
        async with a.permit("concurrency/sub-3", 1):
            held.set()
            await asyncio.Event().wait()

    holder = asyncio.create_task(hold_forever())
    await asyncio.wait_for(held.wait(), 30)
    await kill(a)
    # Its coroutines end with it; with etcd the release they attempt goes nowhere (no client), so
    # only the lease's expiry can free the permit.
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    async with asyncio.timeout(30):
        async with b.permit("concurrency/sub-3", 1):
            pass


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
async def test_rate_slots_are_reserved_one_after_another_across_processes(pair):
    a, b, _ = pair
    interval = 1000.0  # so long that the time the test itself takes cannot blur one slot into the next
    delays = await asyncio.gather(*(c.reserve_rate("rate/sub-4", interval) for c in (a, b, a, b, a, b)))
    # Six reservations, six distinct slots: 0, 1000, …, 5000 s from now (less what has passed since).
    assert sorted(round(d / interval) for d in delays) == [0, 1, 2, 3, 4, 5], delays
    assert min(delays) >= 0
