"""One replica polls a Zaqar queue at a time, through etcd leadership: two replica processes (each a
Zaqar source with its own etcd coordination) on one queue; the leader is SIGKILLed and the other
takes over once the dead one's lease has run out."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid

import pytest

from tests.conditions import eventually
from tests.integration.test_etcd_coordination import REPO, etcd  # noqa: F401 - the etcd-server fixture
from tests.unit.test_source_zaqar import FakeZaqar

pytestmark = pytest.mark.slow
LEASE_TTL = 2

REPLICA = r"""
import asyncio, sys
from engine.coordination import EtcdCoordinator
from router.config import Config
from sources.zaqar import ZaqarSource
from tests.unit.test_source_swift import FakeContext
from tests.unit.test_source_zaqar import JOBS

async def main(url, port, prefix, client_id, data_dir, ttl):
    config = Config.load(overrides={"DEFAULT": {"data_dir": data_dir}, "zaqar": {
        "url": url, "queues": "jobs", "poll_interval": "0.05", "project_id": "demo", "client_id": client_id}})
    coordination = EtcdCoordinator(client_id, port=int(port), lease_ttl=int(ttl), prefix=prefix)
    await coordination.start()
    source = ZaqarSource(config)
    await source.start(FakeContext(config, subscriptions=JOBS, coordination=coordination))
    print("STARTED", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_one_replica_polls_and_another_takes_over_after_the_leaders_lease(etcd, tmp_path, capsys):  # noqa: F811
    prefix = f"/zaqar-{uuid.uuid4().hex[:8]}/"
    async with FakeZaqar() as zaqar:
        procs: dict[str, asyncio.subprocess.Process] = {}
        try:
            for n in (1, 2):
                client_id = str(uuid.uuid4())
                procs[client_id] = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", REPLICA, zaqar.url, str(etcd), prefix, client_id, str(tmp_path / f"r{n}"),
                    str(LEASE_TTL), cwd=REPO, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
            for proc in procs.values():
                assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"STARTED"

            def pollers(since: int = 0) -> list[str]:
                return [h["Client-ID"] for h in zaqar.headers[since:]]

            # Both replicas run for many poll periods: all the claims come from one of them.
            await eventually(lambda: len(pollers()) >= 40, timeout=60)
            first = zaqar.add("jobs", {"n": 1})
            await eventually(lambda: first not in zaqar.messages, timeout=30)
            assert len(set(pollers())) == 1, f"two replicas polled the queue: {set(pollers())}"
            (leader,) = set(pollers())
            (standby,) = set(procs) - {leader}

            procs[leader].send_signal(signal.SIGKILL)  # no resign: only the lease's expiry ends its leadership
            await procs[leader].wait()
            killed_at, seen = time.monotonic(), len(zaqar.headers)
            await eventually(lambda: standby in pollers(seen), timeout=60)
            took = time.monotonic() - killed_at
            assert set(pollers(seen)) == {standby}
            second = zaqar.add("jobs", {"n": 2})
            await eventually(lambda: second not in zaqar.messages, timeout=30)  # the new leader consumes
            with capsys.disabled():
                print(f"\n[zaqar leader] one replica of two polled ({len(pollers())} claims); SIGKILLed, the other "
                      f"polled {took:.1f}s later (lease TTL {LEASE_TTL}s, leader re-check 1s)")
        finally:
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
