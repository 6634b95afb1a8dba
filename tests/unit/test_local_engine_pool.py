"""The local engine's warm pool with real runtime servers: a new function (or one whose worker was
reaped) claims a pre-started server, which is its own from then on; the pool refills, replaces an idle
server killed from outside, and its servers end with the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from router.config import Config
from router.plugins import ExecutionRequest, FunctionSpec, PackageRef, load
from tests.processes import gone

MAIN_PY = """import os

def main(**kwargs):
    return os.getppid()

def where(**kwargs):
    # What a function sees of its containment: identical whether its child was the server's spare
    # (forked and given its network namespace before the package was known) or forked for it.
    with open("main.py") as fh:
        relative = fh.read(9)
    try:
        cwd = os.getcwd()
    except OSError as exc:
        cwd = type(exc).__name__
    return {"server": os.getppid(), "cwd": cwd, "relative": relative,
            "uid": os.getuid(), "net": os.readlink("/proc/self/ns/net"), "mnt": os.readlink("/proc/self/ns/mnt"),
            "tmp": sorted(os.listdir("/tmp")), "env": sorted(os.environ), "pid": os.getpid()}
"""


def shown_under_tmp() -> list[str]:
    """What a child's private /tmp still shows: the top directory of a checkout or virtualenv that
    lies under /tmp (a CI clone), put back read-only so the runtime can load; else nothing."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sys.path) if p and os.path.isdir(p)}
    return sorted({Path(p).parts[2] for p in paths if p.startswith("/tmp/")})


@pytest.fixture
async def engine_for(tmp_path):
    engines = []

    async def make(pool_size: int = 1):
        config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path / f"data{len(engines)}")},
                                        "engine": {"local_pool_size": str(pool_size), "local_runtimes": "python=python3"}})
        engine = load("engine", "local")(config, load("storage", "filesystem")(config))
        engines.append(engine)
        await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def new_function(engine, tmp_path) -> FunctionSpec:
    path = tmp_path / f"{uuid.uuid4().hex}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("main.py", MAIN_PY)
    function_id = str(uuid.uuid4())
    md5 = await engine.packages.put("proj", function_id, 0, path.read_bytes())
    return FunctionSpec(id=function_id, version=0, runtime_id="rt", runtime_image="python3", code={"source": "package"},
                        entry="main.main", cpu=100, memory_size=33554432, timeout=10,
                        package=PackageRef("proj", function_id, 0, md5), project_id="proj")


async def server_pid(engine, fn: FunctionSpec) -> int:
    """The runtime server that ran fn: the function returns its parent's pid, the server's."""
    result = await engine.execute(ExecutionRequest(execution_id=str(uuid.uuid4()), function=fn))
    assert result.status == "success", result
    return result.output


def idle_pids(engine) -> list[int]:
    return [w.process.pid for w in engine.warm.idle("python3")]


async def until(condition, what: str) -> None:
    while not condition():
        await asyncio.sleep(0.02)


async def test_a_new_function_claims_a_pre_started_server_that_is_never_handed_back(engine_for, tmp_path):
    engine = await engine_for(1)
    assert await engine.warm.wait_full(60)
    (pre_started,) = idle_pids(engine)
    fn = await new_function(engine, tmp_path)
    assert await server_pid(engine, fn) == pre_started
    assert await engine.warm.wait_full(60)
    (refill,) = idle_pids(engine)
    assert refill != pre_started
    # Released, the claimed server ends; it never returns to the pool for another function.
    await engine.release(fn.id)
    await until(lambda: gone(pre_started), "the released server to end")
    other = await new_function(engine, tmp_path)
    assert await server_pid(engine, other) == refill
    assert pre_started not in idle_pids(engine)


async def test_after_its_worker_is_reaped_a_function_claims_a_fresh_pre_started_server(engine_for, tmp_path):
    engine = await engine_for(1)
    fn = await new_function(engine, tmp_path)
    first = await server_pid(engine, fn)
    assert await engine.reap_idle(0) == 1
    await until(lambda: gone(first), "the reaped server to end")
    assert await engine.warm.wait_full(60)
    (pre_started,) = idle_pids(engine)
    assert await server_pid(engine, fn) == pre_started


async def test_an_idle_server_killed_from_outside_is_replaced(engine_for, tmp_path):
    engine = await engine_for(1)
    assert await engine.warm.wait_full(60)
    (victim,) = idle_pids(engine)
    os.kill(victim, signal.SIGKILL)
    await until(lambda: idle_pids(engine) and idle_pids(engine)[0] != victim, "a replacement")
    fn = await new_function(engine, tmp_path)
    assert await server_pid(engine, fn) not in (victim, None)


async def test_stop_ends_the_idle_servers(engine_for):
    engine = await engine_for(2)
    assert await engine.warm.wait_full(60)
    pids = idle_pids(engine)
    assert len(pids) == 2
    await engine.stop()
    for pid in pids:
        await until(lambda: gone(pid), f"idle server {pid} to end")


async def test_pool_size_0_starts_nothing_ahead_and_functions_still_run(engine_for, tmp_path):
    engine = await engine_for(0)
    assert engine.warm.runtimes == ["python3"] and idle_pids(engine) == []
    fn = await new_function(engine, tmp_path)
    assert await server_pid(engine, fn) > 0
    assert idle_pids(engine) == []


async def test_pool_runtimes_are_the_configured_ones_with_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADWATER_NODE", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no node on PATH either
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)},
                                    "engine": {"local_runtimes": "python=python3, py3=python3, node=nodejs, php=php, x=nowhere"}})
    engine = load("engine", "local")(config, load("storage", "filesystem")(config))
    # python3 once though two images map to it; nodejs without node and a missing folder are left out.
    assert engine.pool_runtimes() == ["python3", "php"]


async def test_the_spare_child_is_contained_like_a_forked_one(engine_for, tmp_path):
    """A pre-started server's first function loads into its spare child; another child of the same
    server (other limits) is forked for it. Both see the same containment."""
    engine = await engine_for(1)
    fn = await new_function(engine, tmp_path)
    fn = dataclasses.replace(fn, entry="main.where")
    spare = await engine.execute(ExecutionRequest(execution_id=str(uuid.uuid4()), function=fn))
    other_limits = dataclasses.replace(fn, memory_size=fn.memory_size * 2)
    forked = await engine.execute(ExecutionRequest(execution_id=str(uuid.uuid4()), function=other_limits))
    assert spare.status == forked.status == "success", (spare, forked)
    a, b = spare.output, forked.output
    assert a["server"] == b["server"] and a["pid"] != b["pid"]  # two children of one server
    assert a["cwd"] == b["cwd"] and a["cwd"].endswith(fn.package.md5sum), (a, b)  # its package, by the same path
    assert a["relative"] == b["relative"] == "import os"
    assert a["env"] == b["env"] and a["tmp"] == b["tmp"] == shown_under_tmp()
    if os.geteuid() == 0:
        host_net, host_mnt = os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/mnt")
        assert a["uid"] != 0 and b["uid"] != 0 and a["uid"] != b["uid"]
        assert len({host_net, a["net"], b["net"]}) == 3 and len({host_mnt, a["mnt"], b["mnt"]}) == 3
