"""Functions that try to escape (issue 15): a real `headwater serve` on the local engine runs each attempt;
each is denied with a clear status, and the next normal execution of the same function succeeds."""

from __future__ import annotations

import json
import os
import re
import time
import zipfile

import pytest

from tests.conditions import wait_until
from tests.e2e.server import Server, make_zip
from tests.services import require_program

# Run as root (CI): the runtimes give every child a uid, a network namespace and scratch of its own.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the local engine contains functions only when it runs as root")

HOSTILE = '''
import json, os, socket, threading, urllib.request

def normal(context=None):
    return "ok"

def connect(host, port, context=None):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return "denied: " + type(exc).__name__

def drive_runtime(url, context=None):
    body = json.dumps({"execution_id": "evil", "entry": "x.y", "timeout": 300,
                       "package": {"path": "/etc/shadow"}, "limits": {}}).encode()
    req = urllib.request.Request(url + "/execute", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return "driven: " + resp.read().decode()[:200]
    except urllib.error.HTTPError as exc:
        return "denied: HTTP %d" % exc.code
    except OSError as exc:
        return "denied: " + type(exc).__name__

def read(path, context=None):
    try:
        with open(path, "rb") as fh:
            return "read %d bytes" % len(fh.read())
    except OSError as exc:
        return "denied: " + type(exc).__name__

def listdir(path, context=None):
    try:
        return "listed: " + ",".join(sorted(os.listdir(path)))
    except OSError as exc:
        return "denied: " + type(exc).__name__

def fill_shm(mib, context=None):
    written = 0
    try:
        with open("/dev/shm/headwater-hostile-%d" % os.getpid(), "wb") as fh:
            for _ in range(mib):
                fh.write(b"x" * (1024 * 1024))
                fh.flush()
                written += 1
    except OSError as exc:
        return "denied: %s after %d MiB" % (os.strerror(exc.errno), written)
    return "wrote %d MiB" % written

def signal_pid(pid, sig, context=None):
    import signal
    try:
        os.kill(pid, getattr(signal, sig))
        return "signalled"
    except OSError as exc:
        return "denied: " + type(exc).__name__

def mkdir(path, context=None):
    try:
        os.mkdir(path)
        return "made"
    except OSError as exc:
        return "denied: " + type(exc).__name__

def find(needle, roots, context=None):
    """Every readable place holding needle: each process's command line and environment, and the files under roots."""
    hits = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                with open("/proc/%s/%s" % (pid, part), "rb") as fh:
                    if needle.encode() in fh.read():
                        hits.append("/proc/%s/%s" % (pid, part))
            except OSError:
                pass
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                try:
                    with open(os.path.join(folder, name), "rb") as fh:
                        if needle.encode() in fh.read(1 << 20):
                            hits.append(os.path.join(folder, name))
                except OSError:
                    pass
    return hits

def threads(n, context=None):
    done = []
    workers = [threading.Thread(target=lambda: done.append(1)) for _ in range(n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return len(done)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("hostile")) as srv:
        yield srv


@pytest.fixture(scope="module")
def runtime(server):
    resp = server.request("POST", "/v1/runtimes", {"image": "openstackqinling/python3-runtime", "name": "py"})
    assert resp.status == 201, resp.text
    return resp.json()["id"]


def function(server, runtime, files: dict[str, str] | None = None, entry: str = "hostile.normal") -> str:
    form = {"runtime_id": runtime, "code": json.dumps({"source": "package"}), "entry": entry}
    resp = server.multipart("/v1/functions", form, {"package": make_zip(files or {"hostile.py": HOSTILE})})
    assert resp.status == 201, resp.text
    return resp.json()["id"]


def run(server, function_id, entry, input=None) -> str:
    """Run one entry of the hostile package (a function per entry would each start a worker); with
    entry None, the function itself with `input`."""
    body = {"function_id": function_id, "input": {"__entry": entry, **(input or {})} if entry else input}
    resp = server.request("POST", "/v1/executions", body, timeout=60)
    assert resp.status == 201, resp.text
    execution = resp.json()
    assert execution["status"] == "success", json.dumps(execution)
    return json.loads(execution["result"])["output"]


@pytest.fixture(scope="module")
def dispatcher(server, runtime):
    """One function whose entry point dispatches to the hostile entry named in its input."""
    files = {"hostile.py": HOSTILE + '''

def dispatch(__entry, context=None, **kwargs):
    return globals()[__entry](**kwargs)
'''}
    return function(server, runtime, files, entry="hostile.dispatch")


def then_normal(server, dispatcher):
    assert run(server, dispatcher, "normal") == "ok", "the next normal execution failed"


def test_cannot_connect_to_host_services(server, dispatcher):
    port = int(server.url.rsplit(":", 1)[1])
    for host, port in (("127.0.0.1", 5432), ("127.0.0.1", 6379), ("127.0.0.1", port), ("169.254.169.254", 80)):
        assert run(server, dispatcher, "connect", {"host": host, "port": port}).startswith("denied"), (host, port)
    then_normal(server, dispatcher)


def test_cannot_drive_a_runtime_server(server, dispatcher):
    run(server, dispatcher, "normal")
    urls = set(re.findall(r"started runtime worker \S+ \(pid \d+\) at (http://127\.0\.0\.1:\d+)", server.log()))
    assert urls, "no runtime worker found in the server log"
    for url in urls:
        assert run(server, dispatcher, "drive_runtime", {"url": url}).startswith("denied"), url
    then_normal(server, dispatcher)


def test_cannot_read_another_functions_package_or_the_database(server, runtime, dispatcher):
    other = function(server, runtime, {"secret.py": "TOKEN = 'other-tenant-secret'\ndef main(context=None):\n    return 1\n"},
                     entry="secret.main")
    resp = server.request("POST", "/v1/executions", {"function_id": other}, timeout=60)
    assert resp.status == 201 and resp.json()["status"] == "success", resp.text
    data = server.data_dir
    stored = [p for p in (data / "packages").rglob(f"{other}_*.zip")]
    unpacked = [p for p in (data / "runtimes").glob(f"*/packages/{other}_*")]
    assert stored and unpacked
    for path in [str(stored[0]), str(unpacked[0] / "secret.py"), str(data / "headwater.db"), str(data / "headwater.db-wal"),
                 str(data / "download-token.key")]:
        assert run(server, dispatcher, "read", {"path": path}).startswith("denied"), path
    assert run(server, dispatcher, "listdir", {"path": str(data)}).startswith("denied")
    then_normal(server, dispatcher)


def idle_pool_servers(server, runtime: str = r"\S+") -> dict[int, str]:
    """The warm pool's pre-started runtime servers no function has claimed, pid -> url, from the log."""
    log = server.log()
    started = {int(pid): url for pid, url in re.findall(
        rf"started runtime worker {runtime}-pool-\d+ \(pid (\d+)\) at (http://127\.0\.0\.1:\d+)", log)}
    claimed = {int(pid) for pid in re.findall(r"runtime worker \S+ \(pid (\d+)\) claimed from the warm pool", log)}
    return {pid: url for pid, url in started.items() if pid not in claimed and os.path.exists(f"/proc/{pid}")}


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_cannot_touch_the_idle_pre_started_servers_or_learn_the_next_functions_package(server, runtime, dispatcher):
    run(server, dispatcher, "normal")
    # The pool refills in the background (an earlier test's function claimed one); TimeoutError if
    # no idle pre-started python3 runtime server shows up in the server log.
    wait_until(lambda: idle_pool_servers(server, "python3"), timeout=120)
    idle = idle_pool_servers(server)
    for pid, url in idle.items():
        for sig in ("SIGKILL", "SIGSTOP", "SIGTERM"):
            assert run(server, dispatcher, "signal_pid", {"pid": pid, "sig": sig}).startswith("denied"), (pid, sig)
        for part in ("environ", "mem", "maps", "fd", "cwd", "root"):
            what = "listdir" if part in ("fd", "cwd", "root") else "read"
            assert run(server, dispatcher, what, {"path": f"/proc/{pid}/{part}"}).startswith("denied"), (pid, part)
        assert run(server, dispatcher, "drive_runtime", {"url": url}).startswith("denied"), url
    # Nor can it plant a tree where the next function's package will be unpacked.
    packages = server.data_dir / "runtimes" / "python3" / "packages"
    assert run(server, dispatcher, "listdir", {"path": str(packages)}).startswith("denied")
    assert run(server, dispatcher, "mkdir", {"path": str(packages / "planted")}).startswith("denied")
    assert not (packages / "planted").exists()
    for pid in idle:
        assert process_state(pid) not in ("T", "Z", "X"), f"idle server {pid} was stopped or killed"

    # The next function claims one of those servers and runs its own package, unseen by the first.
    marker = f"next-function-secret-{os.getpid()}-{time.monotonic_ns()}"
    other = function(server, runtime, {"nextfn.py": f"SECRET = {marker!r}\ndef main(context=None):\n    return SECRET\n"},
                     entry="nextfn.main")
    assert run(server, other, None) == marker
    claimed = {int(pid) for pid in re.findall(r"runtime worker \S+ \(pid (\d+)\) claimed from the warm pool", server.log())}
    assert claimed & set(idle), "the next function did not run in a server pre-started before the attack"
    roots = [str(server.data_dir), "/tmp", "/var/tmp", "/dev/shm"]
    assert run(server, dispatcher, "find", {"needle": marker, "roots": roots}) == []
    then_normal(server, dispatcher)


def test_dev_shm_is_bounded_and_private(server, dispatcher):
    reply = run(server, dispatcher, "fill_shm", {"mib": 200})
    assert reply.startswith("denied: No space left on device"), reply
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("headwater-hostile-")], "the file reached the host"
    then_normal(server, dispatcher)


def test_a_zip_bomb_is_refused_at_upload(server, runtime):
    bomb = make_zip({"hostile.py": "def normal(context=None):\n    return 1\n", "pad.bin": b"\0" * (300 * 1024 * 1024)},
                    zipfile.ZIP_DEFLATED)
    form = {"runtime_id": runtime, "code": json.dumps({"source": "package"}), "entry": "hostile.normal"}
    resp = server.multipart("/v1/functions", form, {"package": bomb})
    assert resp.status == 400 and "max_package_unpacked_size" in resp.text, resp.text
    assert str(server.data_dir) not in resp.text


def test_fifty_threads_under_the_default_memory_limit(server, dispatcher):
    assert run(server, dispatcher, "threads", {"n": 50}) == 50


# Go and PHP children are the same contained children (the shared runtime server forks and contains
# them, then execs the language's worker): the same escapes are denied.
GO_CONNECT = {"handler.go": '''package handler

import (
	"net"
	"strconv"
	"time"
)

type Target struct {
	Host string `json:"host"`
	Port int    `json:"port"`
}

func Connect(t Target) (string, error) {
	conn, err := net.DialTimeout("tcp", net.JoinHostPort(t.Host, strconv.Itoa(t.Port)), 3*time.Second)
	if err != nil {
		return "denied: " + err.Error(), nil
	}
	conn.Close()
	return "connected", nil
}
'''}

PHP_CONNECT = {"connect.php": '''<?php
function main($input, $context) {
    $sock = @fsockopen($input['host'], $input['port'], $errno, $errstr, 3);
    if ($sock === false) {
        return "denied: $errstr";
    }
    fclose($sock);
    return "connected";
}
'''}


def language_function(server, image: str, entry: str, files: dict[str, str]) -> str:
    """A function of another language's runtime, once built (go) or at once (php)."""
    resp = server.request("POST", "/v1/runtimes", {"image": image, "name": image.split("/")[-1]})
    assert resp.status == 201, resp.text
    function_id = function(server, resp.json()["id"], files, entry=entry)
    status = wait_until(lambda: (s := server.request("GET", f"/v1/functions/{function_id}").json()["status"]) != "building" and s,
                        timeout=240)
    assert status == "available", f"function {function_id} ended {status}"
    return function_id


@pytest.mark.parametrize("tool,image,entry,files", [
    ("go", "headwater/go-runtime", "handler.Connect", GO_CONNECT),
    ("php", "headwater/php-runtime", "connect.main", PHP_CONNECT),
], ids=["go", "php"])
def test_go_and_php_functions_cannot_connect_to_host_services(server, tool, image, entry, files):
    require_program(tool, f"the {tool} runtime needs it")
    function_id = language_function(server, image, entry, files)
    for host, port in (("127.0.0.1", 5432), ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))):
        assert run(server, function_id, None, {"host": host, "port": port}).startswith("denied"), (tool, host, port)
