"""Coordination through a real etcd-server (started by the tests on free ports): exclusive claims, locks,
leader election, lease expiry of a killed process, and two kubernetes engine processes sharing one pool."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine.coordination import EtcdCoordinator, LockTimeout
from tests.conditions import eventually
from tests.services import REQUIRE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def etcd(tmp_path):
    """A throw-away etcd-server (Debian's etcd-server package) on free ports; yields its client port."""
    binary = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if binary is None:
        message = "etcd is not installed (apt-get install etcd-server, or see .ci/services.sh)"
        if REQUIRE:
            pytest.fail(f"{message} and HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
        pytest.skip(message)
    client, peer = _free_port(), _free_port()
    proc = subprocess.Popen(
        [binary, "--name", "hw-test", "--data-dir", str(tmp_path / "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"hw-test=http://127.0.0.1:{peer}", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "etcd.log", "wb"), env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "amd64"})
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", client), 0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"etcd did not start: {(tmp_path / 'etcd.log').read_text()[-1000:]}")
            time.sleep(0.05)
    try:
        yield client
    finally:
        proc.kill()
        proc.wait()


async def coordinator(port: int, ttl: int = 2, name: str | None = None) -> EtcdCoordinator:
    c = EtcdCoordinator(name or f"engine-{uuid.uuid4().hex[:6]}", port=port, lease_ttl=ttl, prefix=f"/t-{port}/")
    await c.start()
    return c


async def test_a_pod_is_claimed_once(etcd):
    a, b = await coordinator(etcd), await coordinator(etcd)
    try:
        results = await asyncio.gather(a.claim("pod-1", "fa", 0, {"url": "u"}), b.claim("pod-1", "fb", 0, {"url": "u"}))
        assert sorted(results) == [False, True]
        winner = "fa" if results[0] else "fb"
        assert (await a.claims())["pod-1"]["function_id"] == winner
        assert list(await b.workers(winner, 0)) == ["pod-1"]
        await (a if results[0] else b).unclaim("pod-1")
        assert await a.claims() == {} and await b.workers(winner, 0) == {}
        assert await b.claim("pod-1", "fb", 0, {"url": "u"}) is True  # free again
    finally:
        await a.stop()
        await b.stop()


async def test_lock_is_exclusive_across_processes_and_times_out(etcd):
    a, b = await coordinator(etcd), await coordinator(etcd)
    inside, overlaps = 0, 0

    async def critical(c):
        nonlocal inside, overlaps
        async with c.lock("fn-1", timeout=10):
            inside += 1
            overlaps = max(overlaps, inside)
            await asyncio.sleep(0.05)
            inside -= 1

    try:
        await asyncio.gather(*(critical(c) for c in (a, b) * 5))
        assert overlaps == 1
        async with a.lock("held"):
            with pytest.raises(LockTimeout):
                async with b.lock("held", timeout=0.5):
                    pass
    finally:
        await a.stop()
        await b.stop()


async def test_leadership_passes_on_when_the_leader_stops(etcd):
    a, b = await coordinator(etcd), await coordinator(etcd)
    try:
        assert await a.campaign("reaper") is True
        assert await b.campaign("reaper") is False
        assert await a.campaign("reaper") is True  # idempotent for the leader
        await a.stop()  # revokes its lease
        assert await b.campaign("reaper") is True
    finally:
        await b.stop()


CLAIMER = r"""
import asyncio, json, sys
from engine.coordination import EtcdCoordinator
async def main(port):
    c = EtcdCoordinator("victim", port=port, lease_ttl=2, prefix=f"/t-{port}/")
    await c.start()
    await c.claim("pod-victim", "fv", 0, {"url": "u"})
    assert await c.campaign("zaqar-queue-demo-jobs")  # as the replica polling a Zaqar queue
    print("CLAIMED", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main(int(sys.argv[1])))
"""


async def _claim_gone(coordinator, pod: str) -> bool:
    return pod not in await coordinator.claims()


async def test_a_killed_process_loses_its_claims_and_leaderships_when_its_lease_expires(etcd):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLAIMER, str(etcd), cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                env={**os.environ, "PYTHONPATH": str(REPO)})
    watcher = await coordinator(etcd)
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"CLAIMED"
        assert "pod-victim" in await watcher.claims()
        await asyncio.sleep(3)  # quiet period: longer than the TTL, the claim must not expire (keep-alive)
        assert "pod-victim" in await watcher.claims()
        assert await watcher.campaign("zaqar-queue-demo-jobs") is False
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # Its lease expires (TTL 2 s): the claim goes, and another process may take the pod.
        await eventually(lambda: _claim_gone(watcher, "pod-victim"))
        assert await watcher.claim("pod-victim", "fw", 0, {"url": "u"}) is True
        # The queue's leadership went with the lease: this process polls the queue now.
        assert await watcher.campaign("zaqar-queue-demo-jobs") is True
    finally:
        if proc.returncode is None:
            proc.kill()
        await watcher.stop()


# ---------------------------------------------------------------------------------------------
# Two kubernetes engine processes on one etcd and one pool (done-when 3)

ENGINE_PROCESS = r"""
import asyncio, json, sys, uuid
from engine.kubernetes import KubernetesEngine
from engine.packages import FilesystemPackageStore
from router.config import Config
from router.plugins import FunctionSpec

async def main(overrides, functions):
    config = Config.load(overrides=overrides)
    engine = KubernetesEngine(config, FilesystemPackageStore(config))
    await engine.start()
    specs = [FunctionSpec(id=f, version=0, runtime_id="python3", runtime_image="headwater/runtime-python3:0.1.0", code={"source": "package"},
                          entry="main.main", cpu=100, memory_size=33554432, timeout=5) for f in functions]
    claims = await asyncio.gather(*(engine.scale_up(s) for s in specs), return_exceptions=True)
    print(json.dumps({f: (c if isinstance(c, list) else repr(c)) for f, c in zip(functions, claims)}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2:]))
"""


async def test_two_engine_processes_never_share_a_pod_and_a_dead_ones_claims_are_reaped(etcd, tmp_path):
    from engine.kubernetes import KubernetesEngine, manifests
    from engine.packages import FilesystemPackageStore
    from router.plugins import FunctionSpec
    from tests.fakes.kube_cluster import kube_cluster

    async with kube_cluster(tmp_path) as cluster:
        if cluster.fake is None:
            pytest.skip("inspects the fake cluster")
        etcd_options = {"engine": {"backend": "kubernetes", "coordination": "etcd"},
                        # 10 s, not 2: on a loaded machine a 2 s lease could lapse between keep-alives,
                        # and the claims checked below would be reaped under the test's feet.
                        "etcd": {"port": etcd, "lease_ttl": 10, "prefix": f"/t-{etcd}/"}}
        overrides = cluster.overrides(tmp_path, replicas=3, worker_wait=30)
        overrides.update(etcd_options)
        from router.config import Config
        config = Config.load(overrides=overrides)
        engine = KubernetesEngine(config, FilesystemPackageStore(config))
        await engine.start()
        theirs = [f"b-{uuid.uuid4().hex[:8]}" for _ in range(5)]
        mine = [FunctionSpec(id=f"a-{uuid.uuid4().hex[:8]}", version=0, runtime_id="python3", runtime_image="headwater/runtime-python3:0.1.0",
                             code={"source": "package"}, entry="main.main", cpu=100, memory_size=33554432, timeout=5) for _ in range(5)]
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ENGINE_PROCESS, json.dumps({k: {o: str(v) for o, v in opts.items()} for k, opts in overrides.items()}),
            *theirs, cwd=REPO, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            # Both processes take 5 workers each from a pool of 3 at the same moment.
            their_claims_line, my_claims = await asyncio.gather(
                asyncio.wait_for(other.stdout.readline(), 90), asyncio.gather(*(engine.scale_up(f) for f in mine)))
            their_claims = json.loads(their_claims_line)
            assert all(isinstance(c, list) and len(c) == 1 for c in their_claims.values()), their_claims
            assert all(len(c) == 1 for c in my_claims)
            by_pod: dict[str, list[str]] = {}
            for fn, (pod,) in list(zip([f.id for f in mine], my_claims)) + [(f, c) for f, c in their_claims.items()]:
                by_pod.setdefault(pod, []).append(fn)
            assert len(by_pod) == 10 and all(len(fns) == 1 for fns in by_pod.values()), by_pod
            claims = await engine.coordinator.claims()
            for pod, (fn,) in by_pod.items():
                assert claims[pod]["function_id"] == fn
                manifest = cluster.fake.get("pods", cluster.namespace, pod)
                assert manifest is not None, f"{pod}, claimed by {fn}, is gone from the cluster"
                assert manifest["metadata"]["labels"][manifests.L_FUNCTION] == fn

            # Kill the other engine: its claims expire with its lease, and this engine's reaper deletes its pods.
            other.send_signal(signal.SIGKILL)
            await other.wait()
            their_pods = {c[0] for c in their_claims.values()}
            async def reaped() -> bool:
                claims = await engine.coordinator.claims()
                left = [p for p in their_pods if cluster.fake.get("pods", cluster.namespace, p) is not None]
                return not (their_pods & set(claims)) and not left

            await eventually(reaped, timeout=120, interval=0.2)
            for f in mine:  # this engine's workers are untouched
                assert len(await engine.workers(f.id, 0)) == 1
        finally:
            if other.returncode is None:
                other.kill()
                await other.wait()
            await engine.stop()


async def test_sources_and_the_engine_of_a_replica_share_one_coordination(etcd, make_headwater):
    """The coordination port: each replica builds one Coordination from [engine] coordination and hands
    it to its engine and to its sources, so a pull source can elect one replica per queue."""
    from router.app import _SourceContext

    section = {"etcd": {"port": etcd, "lease_ttl": 2, "prefix": f"/t-{etcd}-sources/"}}
    first = await make_headwater("null", engine={"coordination": "etcd"}, **section)
    second = await make_headwater("null", engine={"coordination": "etcd"}, **section)
    assert first.coordination.engine_id != second.coordination.engine_id
    a, b = _SourceContext(first, "zaqar"), _SourceContext(second, "zaqar")
    assert a.coordination is first.coordination
    assert await a.coordination.campaign("zaqar-queue-orders") is True
    assert await b.coordination.campaign("zaqar-queue-orders") is False
    assert await b.coordination.campaign("zaqar-queue-invoices") is True  # one leader per queue, not per replica
    await first.coordination.stop()  # what a stopping replica does last: its lease is revoked
    assert await b.coordination.campaign("zaqar-queue-orders") is True


async def test_scale_up_counts_the_running_executions_of_every_engine(etcd, tmp_path):
    """Qinling's rule across replicas: 12 running executions with function_concurrency 3 need 4 workers,
    however they are spread over the engines (each engine alone sees 6: 2 workers)."""
    from engine.kubernetes import KubernetesEngine
    from engine.packages import FilesystemPackageStore
    from router.config import Config
    from router.plugins import ExecutionRequest, FunctionSpec, PackageRef
    from tests.e2e.server import make_zip
    from tests.fakes.kube_cluster import kube_cluster

    async with kube_cluster(tmp_path) as cluster:
        overrides = cluster.overrides(tmp_path, replicas=4, worker_wait=60)
        overrides.update({"engine": {"backend": "kubernetes", "coordination": "etcd", "function_concurrency": 3},
                          "etcd": {"port": etcd, "lease_ttl": 5, "prefix": f"/t-{etcd}-load/"}})
        config = Config.load(overrides=overrides)
        engines = [KubernetesEngine(config, FilesystemPackageStore(config)) for _ in range(2)]
        for engine in engines:
            await engine.start()
        function_id = f"f-{uuid.uuid4().hex[:8]}"
        md5 = await engines[0].packages.put("proj", function_id, 0, make_zip({"main.py": "import time\ndef wait(**kw):\n    time.sleep(60)\n"}))
        fn = FunctionSpec(id=function_id, version=0, runtime_id="python3", runtime_image="headwater/runtime-python3:0.1.0",
                          code={"source": "package"}, entry="main.wait", cpu=100, memory_size=64 * 1024 * 1024, timeout=90,
                          package=PackageRef("proj", function_id, 0, md5), project_id="proj")

        def start(engine, n):
            return [asyncio.create_task(engine.execute(ExecutionRequest(execution_id=str(uuid.uuid4()), function=fn, input=None)))
                    for _ in range(n)]

        async def until(probe, what: str, timeout: float = 60):
            deadline = asyncio.get_running_loop().time() + timeout
            while not await probe():
                assert asyncio.get_running_loop().time() < deadline, what
                await asyncio.sleep(0.05)

        async def posted(engine, n):  # executions handed to a worker
            return sum(engine._inflight.values()) == n

        first, second = engines
        tasks = start(first, 6)
        try:
            await until(lambda: posted(first, 6), "the first engine's 6 executions never reached a worker")
            await until(lambda: _total(second, fn, 6), "the first engine's load never reached etcd")
            assert len(await first.workers(fn.id, 0)) == 2  # 6 running / 3 per worker, as one engine sees it
            tasks += start(second, 6)
            await until(lambda: posted(second, 6), "the second engine's 6 executions never reached a worker")
            assert len(await second.workers(fn.id, 0)) == 4  # 12 running / 3 per worker
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for engine in engines:
                await engine.stop()


async def _total(engine, fn, expected: int) -> bool:
    return sum((await engine.coordinator.loads(fn.id, fn.version)).values()) == expected
