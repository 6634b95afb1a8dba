"""The Python 3 runtime server on its own: started as a subprocess, driven over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.processes import RUNTIME_HEADERS, check_hangup_cancels, check_post_cancel, gone, pid_path, runtime_env

SERVER = Path(__file__).resolve().parents[2] / "runtimes" / "python3" / "server.py"

MAIN_PY = '''
import asyncio, os, subprocess, sys, time

print("imported main")

def main(name="World"):
    print("hello", name)
    return f"Hello, {name}"

def with_context(x=None, context=None):
    return {"x": x, "context": context}

def with_kwargs(**kwargs):
    return sorted(kwargs)

def plain(x=None):
    return x

def boom():
    raise RuntimeError("kaput")

def not_json():
    return object()

def crash():
    sys.stdout.write("about to die\\n"); sys.stdout.flush()
    os._exit(3)

def exits():
    sys.exit(2)

def chatty():
    for _ in range(300):
        print("x" * 10000)
    return "done"

def nap(seconds=30):
    # /bin/sleep, not sys.executable: a sandbox uid may not reach the server's interpreter path.
    proc = subprocess.Popen(["sleep", "60"])
    escaped = subprocess.Popen(["setsid", "sleep", "60"])  # leaves the process group
    print("PIDS", os.getpid(), proc.pid, escaped.pid, flush=True)
    time.sleep(seconds)
    return "slept"

def whoami():
    import decimal  # not imported by the server: the stdlib stays importable in the sandbox
    return {"uid": os.getuid(), "env": sorted(os.environ), "cwd_files": sorted(os.listdir(".")),
            "decimal": str(decimal.Decimal("1.5"))}

def peek(path):
    try:
        return os.listdir(path)
    except OSError as exc:
        return type(exc).__name__

def spawn_many(n=200):
    procs = []
    for _ in range(n):
        procs.append(subprocess.Popen(["sleep", "30"]))
    return len(procs)

def fork_bomb():
    while True:
        os.fork()

def background():
    subprocess.Popen(["sleep", "60"])
    return os.getpid()

def big_file():
    with open("/tmp/headwater-test-big-%d" % os.getpid(), "wb") as fh:
        try:
            fh.write(b"x" * (2 * 1024 * 1024))
        finally:
            os.unlink(fh.name)

def hog():
    blocks = []
    while True:
        blocks.append(bytearray(16 * 1024 * 1024))

def many_files():
    return [open(os.devnull) for _ in range(200)]

async def coro(n):
    await asyncio.sleep(0)
    return n * 2

def pid():
    return os.getpid()

def nap_pid(path, seconds=30):
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(seconds)
    return "slept"

def meet(folder, n):
    # Each run checks in, then waits until n runs have: runs served one at a time never get there.
    open(os.path.join(folder, str(os.getpid())), "w").close()
    while len(os.listdir(folder)) < n:
        time.sleep(0.01)
    return "met"
'''


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pkg") / "pkg.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("main.py", MAIN_PY)
        zf.writestr("broken.py", "raise ImportError('no such dependency')\n")
    return str(path)


WORK: list[Path] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    WORK.append(work)
    proc = subprocess.Popen([sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", "0", "--work-dir", str(work),
                             "--package-dir", str(tmp_path_factory.getbasetemp())],
                            stdout=subprocess.PIPE, stderr=None, start_new_session=True, env=runtime_env())
    line = proc.stdout.readline().decode().strip()
    assert line.startswith("LISTENING 127.0.0.1:"), (line, proc.stderr.read1(4000) if proc.poll() is not None else "")
    yield f"http://{line.split()[1]}", proc
    proc.terminate()
    proc.wait(5)


def post(url: str, body: dict, timeout: float = 30) -> dict:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + "/execute", data=data, headers=RUNTIME_HEADERS)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def run(server, package, entry="main.main", input=None, **extra) -> dict:
    url, _ = server
    body = {"execution_id": "e1", "entry": entry, "timeout": 5,
            "package": {"path": package, "function_id": "fn", "version": 0}, **extra}
    if input is not None:
        body["input"] = input
    return post(url, body)


def test_ping(server):
    url, _ = server
    with urllib.request.urlopen(url + "/ping", timeout=5) as resp:
        assert (resp.status, resp.read()) == (200, b"pong")


def test_unknown_path_is_404(server):
    url, _ = server
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/nope", timeout=5)
    assert err.value.code == 404


def test_inputs(server, package):
    reply = run(server, package, input="Qinling")
    assert reply["success"] is True and reply["status"] == "success" and reply["reason"] == "ok"
    assert reply["output"] == "Hello, Qinling"
    assert "hello Qinling" in reply["logs"]
    assert isinstance(reply["duration"], float)
    assert run(server, package, input={"name": "kw"})["output"] == "Hello, kw"
    assert run(server, package, "main.plain", input=[1, 2])["output"] == [1, 2]
    assert run(server, package, "main.plain", input=7)["output"] == 7
    assert run(server, package, "main.plain")["output"] is None


def test_context_only_when_accepted(server, package):
    reply = run(server, package, "main.with_context", input={"x": 1}, context={"execution_id": "e1"})
    assert reply["output"] == {"x": 1, "context": {"execution_id": "e1"}}
    assert run(server, package, "main.with_kwargs", input={"a": 1}, context={"k": 1})["output"] == ["a", "context"]
    assert run(server, package, "main.plain", input={"x": 3}, context={"k": 1})["output"] == 3


def test_async_function(server, package):
    assert run(server, package, "main.coro", input=21)["output"] == 42


def test_exception(server, package):
    reply = run(server, package, "main.boom")
    assert (reply["success"], reply["status"], reply["reason"], reply["output"]) == (False, "failed", "error", "kaput")
    assert "Traceback" in reply["logs"] and "RuntimeError: kaput" in reply["logs"]
    assert "server.py" not in reply["logs"]  # only the user's frames


def test_not_serialisable_output(server, package):
    reply = run(server, package, "main.not_json")
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "not JSON serialisable" in reply["output"]


def test_crash_and_sys_exit_do_not_take_the_server_down(server, package):
    reply = run(server, package, "main.crash")
    assert (reply["status"], reply["reason"]) == ("failed", "crashed")
    assert "about to die" in reply["logs"]
    reply = run(server, package, "main.exits")
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "sys.exit(2)" in reply["output"]
    assert run(server, package, input="again")["output"] == "Hello, again"


def test_import_error_and_bad_entry(server, package):
    reply = run(server, package, "broken.main")
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "no such dependency" in reply["output"]
    assert "ImportError" in reply["logs"]
    assert "has no function" in run(server, package, "main.missing")["output"]
    assert "module.function" in run(server, package, "nodot")["output"]


def test_bad_package(server, tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    reply = run(server, str(bad))
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "ZIP" in reply["output"]
    url, _ = server
    reply = post(url, {"execution_id": "e", "package": {"path": str(bad), "function_id": "other", "version": 1, "md5sum": "0" * 32}})
    assert "md5 mismatch" in reply["output"]


def test_logs_are_capped(server, package):
    reply = run(server, package, "main.chatty")
    assert reply["output"] == "done"
    assert len(reply["logs"]) < 1024 * 1024 + 200
    assert "[logs truncated:" in reply["logs"]


def test_timeout_kills_process_tree(server, package):
    # The function would sleep far longer than post() waits: a reply means the timeout cut it off.
    reply = run(server, package, "main.nap", input={"seconds": 3600}, timeout=1)
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "timeout", "Function execution timeout.")
    assert reply["duration"] >= 1.0
    pids = [int(p) for p in reply["logs"].split("PIDS", 1)[1].split()[:3]]
    if os.geteuid() != 0:
        pids = pids[:2]  # without a sandbox uid a setsid'd process escapes the group kill (documented)
    deadline = time.monotonic() + 60
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids)
    assert run(server, package, input="after")["output"] == "Hello, after"


def test_memory_limit(server, package):
    reply = run(server, package, "main.hog", limits={"memory_size": 64 * 1024 * 1024})
    assert (reply["status"], reply["reason"]) == ("failed", "memory")


def test_files_limit(server, package):
    reply = run(server, package, "main.many_files", limits={"files": 64})
    assert (reply["status"], reply["reason"]) == ("failed", "files")


def test_warm_child_is_reused(server, package):
    first = run(server, package, "main.pid")["output"]
    assert run(server, package, "main.pid")["output"] == first


def test_concurrent_executions_run_in_parallel(server, package):
    url, _ = server

    folder = os.path.dirname(pid_path())

    async def three():
        loop = asyncio.get_running_loop()
        body = {"entry": "main.meet", "input": {"folder": folder, "n": 3}, "timeout": 20,
                "package": {"path": package, "function_id": "fn", "version": 0}}
        return await asyncio.gather(*(loop.run_in_executor(None, post, url, body) for _ in range(3)))

    # Each run waits for all three to have started: run one after another, they would time out.
    replies = asyncio.run(three())
    assert [(r["status"], r["output"]) for r in replies] == [("success", "met")] * 3, replies


def test_failures_in_the_log_use_package_relative_paths(server, package):
    reply = run(server, package, "main.boom")
    assert 'File "main.py", line' in reply["logs"]
    assert "/proc/self/fd" not in reply["logs"] and "/tmp/" not in reply["logs"]


def test_environment_is_not_inherited_and_sandbox_uid_is_used(server, package):
    out = run(server, package, "main.whoami")["output"]
    assert out["decimal"] == "1.5"
    assert "main.py" in out["cwd_files"]
    assert not [k for k in out["env"] if k.startswith(("HEADWATER", "PYTEST", "OS_", "VIRTUAL_ENV"))], out["env"]
    if os.geteuid() == 0:
        assert out["uid"] >= 2 ** 30  # a uid of its own, not root


def test_other_packages_are_unreachable_in_the_sandbox(server, package):
    if os.geteuid() != 0:
        pytest.skip("the uid sandbox needs the server to run as root")
    packages = WORK[-1] / "packages"
    assert len(os.listdir(packages)) >= 1
    # Root-only (0700), and under /tmp also hidden by the child's private /tmp.
    assert run(server, package, "main.peek", input=str(packages))["output"] in ("PermissionError", "FileNotFoundError")
    assert run(server, package, "main.peek", input="/root")["output"] == "PermissionError"


def test_process_limit_and_leftovers(server, package):
    reply = run(server, package, "main.spawn_many", input={"n": 40}, limits={"processes": 16})
    assert (reply["status"], reply["reason"]) == ("failed", "processes"), reply
    assert "Resource temporarily unavailable" in reply["output"]
    # the 16 sleeps it left were killed with its child; a fresh child serves the next call
    assert run(server, package, input="next")["output"] == "Hello, next"


def test_fork_bomb_is_contained(server, package):
    reply = run(server, package, "main.fork_bomb", limits={"processes": 32}, timeout=3)
    assert reply["status"] == "failed" and reply["reason"] in ("processes", "timeout"), reply
    assert run(server, package, input="alive")["output"] == "Hello, alive"


def test_background_processes_do_not_outlive_the_execution(server, package):
    first = run(server, package, "main.background")["output"]
    second = run(server, package, "main.background")["output"]
    assert first != second  # the child that left a process running was recycled
    assert gone(first)


def test_file_size_limit(server, package):
    reply = run(server, package, "main.big_file", limits={"file_size": 1024 * 1024})
    assert (reply["status"], reply["reason"]) == ("failed", "files"), reply
    assert "File too large" in reply["output"]


def test_a_client_that_hangs_up_cancels_the_execution_and_its_child_is_killed(server, package):
    url, _ = server
    path = pid_path()
    body = {"execution_id": "hangup", "entry": "main.nap_pid", "input": {"path": path, "seconds": 3600},
            "timeout": 3600, "package": {"path": package, "function_id": "fn", "version": 0}}
    child = check_hangup_cancels(url, body, path)
    assert run(server, package, "main.pid")["output"] != child  # a fresh child serves the next call
    assert run(server, package, input="after")["output"] == "Hello, after"


def test_post_cancel_answers_cancelled_and_kills_the_child(server, package):
    url, _ = server
    path = pid_path()
    body = {"execution_id": "to-cancel", "entry": "main.nap_pid", "input": {"path": path, "seconds": 3600},
            "timeout": 3600, "package": {"path": package, "function_id": "fn", "version": 0}}
    check_post_cancel(url, body, path, post)
    assert run(server, package, input="after")["output"] == "Hello, after"
