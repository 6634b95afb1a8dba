"""The engine contract: one suite every execution engine backend must pass (local now, kubernetes later)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import uuid
import zipfile
from pathlib import Path

import pytest

from router.config import Config
from router.plugins import Engine, ExecutionRequest, FunctionSpec, PackageRef, load
from tests.processes import gone, pid_path, wait_for_pid, wait_gone
from tests.services import require_program

MAIN_PY = '''
import os, subprocess, sys, time

def main(name="World", **kwargs):
    print("hello from", name)
    return f"Hello, {name}"

def add(a, b):
    return a + b

def echo(value):
    return value

def noop():
    return None

def boom(**kwargs):
    raise ValueError("something broke")

def nap(seconds):
    # /bin/sleep and the log, not sys.executable and a file: a runtime started as root runs the
    # function as a sandbox uid that can reach neither the tests' interpreter nor their tmp dir.
    proc = subprocess.Popen(["sleep", "60"])
    print("PIDS", os.getpid(), proc.pid, flush=True)
    time.sleep(seconds)
    return "woke up"

def whoami():
    return os.getpid()

def snooze(seconds):
    time.sleep(seconds)

def nap_pid(path, seconds):
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(seconds)
    return "woke up"
'''

# Backends under contract. Each entry builds (config overrides) for one engine plugin name.
# `kubernetes` runs on the fake cluster of tests/fakes (a real one when HEADWATER_TEST_KUBECONFIG is set).
BACKENDS = ["local", "kubernetes"]


def make_zip(path: Path, files: dict[str, str]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path.read_bytes()


@pytest.fixture(params=BACKENDS)
async def env(request, tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        overrides = {"DEFAULT": {"data_dir": str(tmp_path)}}
        if request.param == "kubernetes":
            from tests.fakes.kube_cluster import kube_cluster

            overrides = (await stack.enter_async_context(kube_cluster(tmp_path))).overrides(tmp_path)
        config = Config.load(overrides=overrides)
        store = load("storage", "filesystem")(config)
        engine: Engine = load("engine", request.param)(config, store)
        await engine.start()
        data = make_zip(tmp_path / "pkg.zip", {"main.py": MAIN_PY})
        function_id = str(uuid.uuid4())
        md5 = await store.put("proj", function_id, 0, data)
        ref = PackageRef(project_id="proj", function_id=function_id, version=0, md5sum=md5)
        try:
            yield engine, ref, tmp_path
        finally:
            await engine.stop()


def spec(ref: PackageRef, entry: str = "main.main", timeout: int = 5, image: str = "headwater/runtime-python3:0.1.0") -> FunctionSpec:
    return FunctionSpec(id=ref.function_id, version=ref.version, runtime_id="rt", runtime_image=image, code={"source": "package"},
                        entry=entry, cpu=100, memory_size=33554432, timeout=timeout, package=ref, project_id=ref.project_id)


def req(function: FunctionSpec, input=None) -> ExecutionRequest:
    return ExecutionRequest(execution_id=str(uuid.uuid4()), function=function, input=input)



async def test_keyword_input(env):
    engine, ref, _ = env
    result = await engine.execute(req(spec(ref, "main.add"), {"a": 2, "b": 3}))
    assert (result.status, result.output, result.reason) == ("success", 5, "ok")


async def test_positional_string_input_and_print_in_logs(env):
    engine, ref, _ = env
    result = await engine.execute(req(spec(ref), "Qinling"))
    assert result.status == "success"
    assert result.output == "Hello, Qinling"
    assert "hello from Qinling" in result.logs
    assert result.duration >= 0


async def test_json_list_and_number_inputs_do_not_crash(env):
    engine, ref, _ = env
    result = await engine.execute(req(spec(ref, "main.echo"), [1, "two", {"three": 3}]))
    assert (result.status, result.output) == ("success", [1, "two", {"three": 3}])
    result = await engine.execute(req(spec(ref, "main.echo"), 42))
    assert (result.status, result.output) == ("success", 42)


async def test_no_input_calls_without_arguments(env):
    engine, ref, _ = env
    result = await engine.execute(req(spec(ref), None))
    assert (result.status, result.output) == ("success", "Hello, World")


async def test_exception_is_failed_with_traceback_and_engine_serves_next(env):
    engine, ref, _ = env
    result = await engine.execute(req(spec(ref, "main.boom")))
    assert result.status == "failed"
    assert result.reason == "error"
    assert result.output == "something broke"
    assert "Traceback" in result.logs and "ValueError: something broke" in result.logs
    again = await engine.execute(req(spec(ref, "main.add"), {"a": 1, "b": 1}))
    assert (again.status, again.output) == ("success", 2)


async def test_timeout_kills_the_function_and_its_children(env):
    engine, ref, tmp_path = env
    # The function would sleep far past the test's own timeout: an answer at all means it was cut off.
    result = await engine.execute(req(spec(ref, "main.nap", timeout=1), {"seconds": 3600}))
    assert (result.status, result.reason) == ("failed", "timeout")
    assert result.output == "Function execution timeout."
    assert result.duration >= 1
    pids = [int(p) for p in result.logs.split("PIDS", 1)[1].split()[:2]]
    for _ in range(50):
        if all(gone(p) for p in pids):
            break
        await asyncio.sleep(0.05)
    assert all(gone(p) for p in pids), f"left running: {[p for p in pids if not gone(p)]}"
    after = await engine.execute(req(spec(ref, "main.add"), {"a": 1, "b": 2}))
    assert (after.status, after.output) == ("success", 3)


async def test_warm_reuse_and_release(env):
    engine, ref, _ = env
    first = await engine.execute(req(spec(ref)))
    assert first.status == "success"
    workers = await engine.workers(ref.function_id, ref.version)
    assert len(workers) == 1
    second = await engine.execute(req(spec(ref)))
    assert second.status == "success"
    assert await engine.workers(ref.function_id, ref.version) == workers  # no new worker
    await engine.release(ref.function_id)
    assert await engine.workers(ref.function_id, ref.version) == []
    third = await engine.execute(req(spec(ref), "again"))
    assert (third.status, third.output) == ("success", "Hello, again")
    assert len(await engine.workers(ref.function_id, ref.version)) == 1


async def test_unknown_runtime_image_is_an_error(env):
    engine, ref, _ = env
    result = await engine.execute(req(spec(ref, image="example/cobol-runtime:1")))
    assert result.status == "error"
    assert "cobol" in str(result.output)


async def test_dead_worker_is_an_error_then_replaced(env, tmp_path):
    engine, ref, _ = env
    if engine.name != "local":
        pytest.skip("kills a local runtime process")
    assert (await engine.execute(req(spec(ref)))).status == "success"
    (worker,) = engine._pools[(ref.function_id, ref.version, ref.md5sum)]
    path = pid_path()
    running = asyncio.ensure_future(engine.execute(req(spec(ref, "main.nap_pid", timeout=3600), {"path": path, "seconds": 3600})))
    await asyncio.to_thread(wait_for_pid, path)  # the function runs in the worker
    worker.process.kill()
    result = await running
    assert result.status == "error"  # the platform failed, not the function
    assert worker.name in str(result.output)
    after = await engine.execute(req(spec(ref), "phoenix"))
    assert (after.status, after.output) == ("success", "Hello, phoenix")
    assert await engine.workers(ref.function_id, ref.version) != [worker.name]
    (current,) = engine._pools[(ref.function_id, ref.version, ref.md5sum)]
    current.process.kill()  # killed between executions: the next one still succeeds
    await current.process.wait()
    assert (await engine.execute(req(spec(ref), "again"))).output == "Hello, again"


async def test_cancelling_execute_stops_the_function_and_the_engine_serves_next(env):
    engine, ref, _ = env
    path = pid_path()
    # The function sleeps far past the test's own timeout: the cancel returning at all shows it did
    # not wait for the function.
    running = asyncio.ensure_future(engine.execute(req(spec(ref, "main.nap_pid", timeout=3600), {"path": path, "seconds": 3600})))
    pid = await asyncio.to_thread(wait_for_pid, path)
    assert not gone(pid)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await asyncio.to_thread(wait_gone, pid), "the cancelled function kept running"
    after = await engine.execute(req(spec(ref, "main.add"), {"a": 2, "b": 2}))
    assert (after.status, after.output) == ("success", 4)


GO_HANDLER = 'package handler\n\nfunc Hello(name string) string {\n\treturn "Hello from Go, " + name\n}\n'


async def test_build_compiles_a_package_once_and_the_artifact_runs(env):
    """The optional build step (compiled runtimes): the engine builds in the runtime's own environment;
    the artifact, stored like a package, runs without the compiler; a broken package gives the compiler's message."""
    require_program("go", "the go runtime builds with it")
    engine, ref, tmp_path = env
    store = engine.packages
    go_ref = dataclasses.replace(ref, md5sum=await store.put("proj", ref.function_id, 0, make_zip(tmp_path / "go.zip", {"handler.go": GO_HANDLER})))
    go = dataclasses.replace(spec(go_ref, "handler.Hello", image="headwater/runtime-go:0.1.0"), runtime_id="rt-go")
    built = await engine.build(go)
    assert built.ok and built.artifact, built.message
    with zipfile.ZipFile(io.BytesIO(built.artifact)) as zf:
        assert sorted(zf.namelist()) == ["bootstrap", "handler.go"]
    artifact = dataclasses.replace(go_ref, md5sum=await store.put("proj", ref.function_id, 0, built.artifact))
    go = dataclasses.replace(go, package=artifact, code={"source": "package", "md5sum": go_ref.md5sum, "build": {"status": "available"}})
    result = await engine.execute(req(go, "contract"))
    assert (result.status, result.output) == ("success", "Hello from Go, contract"), result
    broken_ref = dataclasses.replace(ref, function_id=str(uuid.uuid4()))
    broken_ref = dataclasses.replace(broken_ref, md5sum=await store.put("proj", broken_ref.function_id, 0, make_zip(
        tmp_path / "broken.zip", {"handler.go": "package handler\n\nfunc Hello() string { return nope }\n"})))
    failed = await engine.build(dataclasses.replace(spec(broken_ref, "handler.Hello", image="headwater/runtime-go:0.1.0"), runtime_id="rt-go"))
    assert not failed.ok and failed.artifact is None
    assert "undefined: nope" in failed.message and "handler.go:3" in failed.message
