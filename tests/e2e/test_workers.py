"""`headwater serve --workers N`: N processes on one port and one bus, a dead one restarted, all of
them stopped with the supervisor; refused where the bus cannot be shared."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.server import Server, make_zip
from tests.services import NATS_URL, require_service


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid …: comm may hold spaces, so split after its closing parenthesis.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def wait_for(probe, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_workers_refuse_a_bus_that_lives_in_one_process(tmp_path):
    conf = tmp_path / "memory.conf"
    conf.write_text("[bus]\nbackend = memory\n")
    # A process of its own: the command sets up logging, which a test must not do to the others.
    done = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--data-dir", str(tmp_path), "--workers", "2",
                           "--config-file", str(conf)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "[api] workers = 2" in done.stderr and "[bus] backend = memory" in done.stderr


def test_workers_on_a_port_in_use_say_one_line_and_exit_2(tmp_path, nats_stream):
    # Checked by the supervisor before any worker starts (each worker would fail the same way).
    (tmp_path / "headwater.conf").write_text(f"[bus]\nbackend = nats\nurl = {nats_stream}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config-file", str(tmp_path / "headwater.conf"),
                               "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "worker started" not in done.stderr, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "configuration error" in x]
    assert f"port = {port}" in line and "cannot listen" in line, line


def test_a_worker_configuration_error_is_the_supervisors_exit_status_2():
    # Was 0: the supervisor stopped the others and reported a clean stop.
    program = ("import sys\nfrom router.workers import Supervisor\n"
               "sys.exit(Supervisor([sys.executable, '-c', 'raise SystemExit(2)'], 2).run())\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr


@pytest.fixture
def nats_stream():
    require_service("NATS", "127.0.0.1", 4222)
    tag = uuid.uuid4().hex[:8]
    yield f"{NATS_URL}?stream=HWW_{tag}&subject_prefix=hww{tag}"

    async def delete():
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().delete_stream(f"HWW_{tag}")
        except Exception:  # noqa: BLE001 - never created
            pass
        await nc.close()

    asyncio.run(delete())


@pytest.fixture(params=["sqlite", "nats"])
def shared_bus(request):
    """The default embedded bus (one file the workers share) and a broker."""
    if request.param == "sqlite":
        yield ""
    else:
        yield f"[bus]\nbackend = nats\nurl = {request.getfixturevalue('nats_stream')}\n"


def test_two_workers_share_the_port_and_one_that_dies_is_replaced(tmp_path, shared_bus):
    config = shared_bus
    with Server(tmp_path, config, extra_args=("--workers", "2")) as server:
        # Both listening, not only started: the survivor must be serving when the victim dies (a
        # slower start-up, e.g. loading the policy, left it still starting: connection refused).
        first = wait_for(lambda: len(children(server.proc.pid)) == 2 and server.log().count("API listening") >= 2
                         and children(server.proc.pid), "two workers never started listening")
        runtime = server.request("POST", "/v1/runtimes", {"image": "python3"}).json()["id"]
        created = server.multipart("/v1/functions", {"runtime_id": runtime, "entry": "main.main",
                                                      "code": json.dumps({"source": "package"})},
                                   {"package": make_zip({"main.py": "def main(**kw):\n    return 'ok'\n"})})
        assert created.status == 201, created.text
        function_id = created.json()["id"]

        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        # Once the dead worker is gone (its listening socket closes as it exits; a connection the
        # kernel had queued on it is reset, as with any SO_REUSEPORT server), the other one serves
        # alone until the supervisor's replacement starts.
        wait_for(lambda: victim not in children(server.proc.pid), "the killed worker never went away")
        ran = server.request("POST", "/v1/executions", {"function_id": function_id, "input": {}})
        assert ran.status == 201 and ran.json()["status"] == "success", ran.text
        after = wait_for(lambda: len(children(server.proc.pid)) == 2 and victim not in children(server.proc.pid)
                         and children(server.proc.pid), "the dead worker was never replaced")
        assert len(after & first) == 1
        for _ in range(20):  # new connections land on either process; every one is answered
            assert server.request("GET", f"/v1/functions/{function_id}").status == 200
        # Events go through the shared bus: each gets its execution, whichever worker took it in.
        sub = server.request("POST", "/v1/subscriptions", {"source": "http", "types": ["workers.test"],
                                                           "function_id": function_id})
        assert sub.status == 201, sub.text
        for i in range(10):
            posted = server.request("POST", "/v1/events", {"specversion": "1.0", "id": f"w-{i}", "source": "/workers",
                                                           "type": "workers.test"})
            assert posted.status == 202, posted.text

        def routed():
            listed = server.request("GET", f"/v1/executions?function_id={function_id}").json()["executions"]
            done = [e for e in listed if e.get("description") == f"Created by Subscription {sub.json()['id']}"]
            return len(done) == 10 and all(e["status"] == "success" for e in done) and done

        wait_for(routed, "the events posted to the workers never all ran")

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in after), "workers outlived the supervisor")
    assert "worker 0" in server.log() or "worker 1" in server.log()
