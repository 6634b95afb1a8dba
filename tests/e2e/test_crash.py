"""kill -9 of `headwater serve` on the README's defaults (and on RabbitMQ and NATS): webhook
invocations answered 202 and a retry waiting in backoff each end in exactly one execution; a
killed server takes its runtime processes, and the runs in them, along."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.server import Server, make_zip
from tests import processes
from tests.processes import gone
from tests.integration.test_durability import BusPlace, require

pytestmark = [pytest.mark.slow]

INVOCATIONS = 1000
WAIT = 180.0  # a guard against hanging: every wait ends as soon as its condition holds

ECHO = "def main(**kw):\n    return kw\n"
# Fails its first attempt (like a Zaqar message whose function raised), succeeds on the next.
FAIL_ONCE = '''
import os
def main(marker, **kw):
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first attempt fails")
    return "second attempt ran"
'''
# Says it started (with its pid), then finishes as soon as the test says go.
LONG_RUN = '''
import os, time
def main(started, go, finished, **kw):
    with open(started, "w") as fh:
        fh.write(str(os.getpid()))
    while not os.path.exists(go):
        time.sleep(0.2)
    open(finished, "w").close()
    return "finished"
'''


def function(server: Server, code: str, timeout: int = 5) -> str:
    runtime = server.request("POST", "/v1/runtimes", {"image": "python3"})
    assert runtime.status == 201, runtime.text
    form = {"runtime_id": runtime.json()["id"], "code": json.dumps({"source": "package"}), "entry": "main.main",
            "timeout": str(timeout)}
    resp = server.multipart("/v1/functions", form, {"package": make_zip({"main.py": code})})
    assert resp.status == 201, resp.text
    return resp.json()["id"]


@pytest.fixture
def shared_dir():
    """A directory the functions may write to (they run as another user, sandboxed, with a /tmp
    of their own: so not under /tmp)."""
    path = Path(processes.shared_dir("hwcrash-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {WAIT}s")
        time.sleep(0.1)


def executions(data_dir: Path, subscription_id: str) -> list[sqlite3.Row]:
    """The execution records of one subscription, read from the server's SQLite file."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'headwater.db'}?mode=ro", uri=True, timeout=30)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT id, event_id, status, attempts FROM executions WHERE subscription_id = ?",
                            (subscription_id,)).fetchall()


def dead_letters(data_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'headwater.db'}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["sqlite", "rabbitmq", "nats"])
def test_webhooks_answered_and_a_waiting_retry_survive_kill_9(backend, tmp_path, shared_dir, capsys):
    config = ""
    place = None
    if backend != "sqlite":  # sqlite: the README's first command, no configuration at all
        require(backend)
        place = BusPlace(backend)
        config = f"[bus]\nbackend = {backend}\nurl = {place.url()}\n"
    data_dir = tmp_path / "data"
    data_dir.mkdir()  # Server writes a config file there first
    first = Server(data_dir, config)
    second = None
    try:
        first.wait_ready()
        echo = function(first, ECHO)
        hook = first.request("POST", "/v1/webhooks", {"function_id": echo})
        assert hook.status == 201, hook.text
        hook_id = hook.json()["id"]
        # The retry: an event whose first attempt fails and whose second waits 30 s (the default
        # policy's other settings: retry any failure, 3 attempts) — long enough to be waiting
        # still when the server is killed, right after the last invocation was answered.
        failing = function(first, FAIL_ONCE)
        retried = first.request("POST", "/v1/subscriptions", {
            "source": "http", "types": ["com.example.queued"], "function_id": failing,
            "options": {"delivery": {"backoff_initial": 30, "jitter": 0}}})
        assert retried.status == 201, retried.text
        retried_id = retried.json()["id"]

        resp = first.request("POST", "/v1/events", {"specversion": "1.0", "id": "queued-1", "source": "/zaqar/q",
                                                    "type": "com.example.queued",
                                                    "data": {"marker": str(shared_dir / "attempted")}})
        assert resp.status == 202, resp.text
        wait_until(lambda: [r["status"] for r in executions(data_dir, retried_id)] == ["retrying"], "the retry to wait")

        def invoke(i: int) -> int:
            return first.request("POST", f"/v1/webhooks/{hook_id}/invoke", {"i": i}).status

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(invoke, range(INVOCATIONS)))
        assert statuses == [202] * INVOCATIONS
        first.proc.send_signal(signal.SIGKILL)  # right after the last 202: much is still to run
        first.proc.wait()
        at_kill = executions(data_dir, hook_id)  # a webhook is an http subscription of the same id
        in_flight = sum(1 for r in at_kill if r["status"] == "running")
        done_at_kill = sum(1 for r in at_kill if r["status"] == "success")
        retry_at_kill = [r["status"] for r in executions(data_dir, retried_id)]
        assert retry_at_kill == ["retrying"], retry_at_kill  # it was waiting in its backoff

        second = Server(data_dir, config)
        second.wait_ready()
        hook_sub = hook_id

        def settled() -> bool:
            rows = executions(data_dir, hook_sub)
            retry = executions(data_dir, retried_id)
            return (len(rows) == INVOCATIONS and all(r["status"] in ("success", "failed", "error") for r in rows)
                    and retry and retry[0]["status"] in ("success", "failed", "error"))

        wait_until(settled, "every invocation and the retry to finish")
        rows = executions(data_dir, hook_sub)
        assert len(rows) == len({r["event_id"] for r in rows}) == INVOCATIONS  # one execution per 202, none lost
        assert all(r["status"] == "success" for r in rows)
        # Only what was running when the server died may have run again (said so in the README).
        rerun = sum(1 for r in rows if r["attempts"] > 1)
        assert rerun <= in_flight, (rerun, in_flight)
        (retry,) = executions(data_dir, retried_id)
        assert retry["status"] == "success" and retry["attempts"] == 2
        assert dead_letters(data_dir) == 0
        with capsys.disabled():
            print(f"\n[kill -9/{backend}] {INVOCATIONS} webhooks answered 202; at the kill {done_at_kill} done, "
                  f"{in_flight} running, the retry waiting; after the restart all {INVOCATIONS} succeeded once "
                  f"({rerun} cut-off runs re-run), the retry succeeded on attempt 2, no dead letters")
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        if place is not None:
            asyncio.run(place.cleanup())


@pytest.mark.timeout(120)
def test_a_killed_server_takes_its_runtimes_and_their_runs_along(tmp_path, shared_dir):
    """The run under way dies with the server: it cannot finish unrecorded and then run again."""
    server = Server(tmp_path / "data")
    try:
        server.wait_ready()
        long_run = function(server, LONG_RUN, timeout=60)
        started, go, finished = shared_dir / "started", shared_dir / "go", shared_dir / "finished"

        def run() -> None:
            with contextlib.suppress(OSError):  # its server is killed under it
                server.request("POST", "/v1/executions", {"function_id": long_run, "input": {
                    "started": str(started), "go": str(go), "finished": str(finished)}}, timeout=90)

        threading.Thread(target=run, daemon=True).start()
        wait_until(lambda: started.exists() and started.read_text(), "the run to start")
        function_pid = int(started.read_text())
        # Every runtime server it started, the warm pool's idle ones too.
        runtimes = [int(pid) for pid in re.findall(r"started runtime worker \S+ \(pid (\d+)\)", server.log())]
        assert any(not gone(pid) for pid in runtimes), "no live runtime server in the log"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        # Linux sent the runtime its parent-death SIGKILL before the server was reaped: the run
        # cannot take this go. (Before, the runtime noticed up to a second later, and the run
        # finished meanwhile, unrecorded, to be run again after the restart.)
        go.touch()
        wait_until(lambda: gone(function_pid), "the function's process to die with the server")
        for pid in runtimes:
            wait_until(lambda: gone(pid), f"runtime server {pid} to die with the server")
        assert not finished.exists(), "the run went on after its server died"
    finally:
        server.stop()
