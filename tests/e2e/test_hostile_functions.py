"""Functions that try to escape (issue 15): a real `headwater serve` on the local engine runs each attempt;
each is denied with a clear status, and the next normal execution of the same function succeeds."""

from __future__ import annotations

import json
import os
import re
import time
import zipfile

import pytest

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
    assert execution["status"] == "success", execution
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
    deadline = time.monotonic() + 240
    while server.request("GET", f"/v1/functions/{function_id}").json()["status"] == "building":
        assert time.monotonic() < deadline, f"function {function_id} still building"
        time.sleep(0.1)
    assert server.request("GET", f"/v1/functions/{function_id}").json()["status"] == "available"
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
