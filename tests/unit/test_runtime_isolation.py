"""The Python 3 runtime contains a hostile function: only the engine drives it, packages come only from
where the engine said, and (as root) each child has its own network and its own bounded /tmp and /dev/shm."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.e2e.server import make_zip

from tests.processes import RUNTIME_HEADERS, runtime_env

SERVER = Path(__file__).resolve().parents[2] / "runtimes" / "python3" / "server.py"

HOSTILE_PY = '''
import os, socket, threading, time, urllib.request

def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return type(exc).__name__

def fetch(url):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()

def drive(url, body):
    # A function posting to its own runtime server, as the engine would (finding 1).
    req = urllib.request.Request(url + "/execute", data=body.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return type(exc).__name__

def fill(path, mib):
    written = 0
    try:
        with open(path, "wb") as fh:
            for _ in range(mib):
                fh.write(b"x" * (1024 * 1024))
                fh.flush()
                written += 1
    except OSError as exc:
        return {"written": written, "error": exc.errno}
    return {"written": written, "error": None}

def exists(path):
    return os.path.exists(path)

def threads(n=50):
    done = []
    workers = [threading.Thread(target=lambda: done.append(1)) for _ in range(n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return len(done)

def idna():
    return "bücher.example".encode("idna").decode()
'''

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and sandbox uids need the runtime to run as root")


def zip_bytes(files: dict[str, bytes | str]) -> bytes:
    return make_zip(files, zipfile.ZIP_DEFLATED)


class Runtime:
    def __init__(self, base: Path, *args: str, env: dict[str, str] | None = None, work: str = "work"):
        self.work = base / work
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", "0", "--work-dir", str(self.work),
             "--package-dir", str(base / "pkgs"), *args],
            stdout=subprocess.PIPE, start_new_session=True, env=env if env is not None else runtime_env())
        self.line = self.proc.stdout.readline().decode().strip()
        assert self.line.startswith("LISTENING 127.0.0.1:"), self.line
        self.url = "http://" + self.line.split()[1]

    def post(self, body: dict, headers=RUNTIME_HEADERS, path: str = "/execute") -> tuple[int, dict | str]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def run(self, path: str, entry: str, input=None, **extra) -> dict:
        body = {"execution_id": "e", "entry": entry, "timeout": 20, "input": input,
                "package": {"path": path, "function_id": "hostile", "version": 0}}
        status, reply = self.post({**body, **extra})
        assert status == 200, reply
        return reply

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("isolation")
    (base / "pkgs").mkdir()
    (base / "pkgs" / "hostile.zip").write_bytes(zip_bytes({"hostile.py": HOSTILE_PY}))
    return base


@pytest.fixture(scope="module")
def runtime(base):
    rt = Runtime(base)
    yield rt
    rt.stop()


@pytest.fixture()
def listener():
    """A TCP service on the host's loopback (what PostgreSQL, Redis or the API are to a function)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv.getsockname()[1]
    srv.close()


def hostile(base: Path) -> str:
    return str(base / "pkgs" / "hostile.zip")


# --- finding 1: only the engine drives a runtime server ------------------------------------------

def test_execute_and_cancel_need_the_credential(runtime, base):
    body = {"execution_id": "x", "entry": "hostile.idna", "package": {"path": hostile(base)}}
    for headers in ({"Content-Type": "application/json"}, {**RUNTIME_HEADERS, "Authorization": "Bearer guess"}):
        assert runtime.post(body, headers=headers)[0] == 401
        assert runtime.post({"execution_id": "x"}, headers=headers, path="/cancel")[0] == 401
    assert runtime.post(body)[0] == 200
    with urllib.request.urlopen(runtime.url + "/ping", timeout=5) as resp:  # health probes stay open
        assert resp.status == 200


def test_a_server_without_a_given_credential_makes_one_and_tells_only_its_parent(base):
    env = {k: v for k, v in runtime_env().items() if k != "HEADWATER_RUNTIME_TOKEN"}
    rt = Runtime(base, env=env)
    try:
        parts = rt.line.split()
        assert len(parts) == 3 and len(parts[2]) >= 32
        body = {"execution_id": "x", "entry": "hostile.idna", "package": {"path": hostile(base)}}
        assert rt.post(body)[0] == 401  # the test credential is not this server's
        assert rt.post(body, headers={**RUNTIME_HEADERS, "Authorization": f"Bearer {parts[2]}"})[0] == 200
    finally:
        rt.stop()


def test_a_function_cannot_drive_its_own_runtime(runtime, base):
    body = json.dumps({"execution_id": "evil", "entry": "hostile.idna", "timeout": 300,
                       "package": {"path": "/etc/shadow"}})
    reply = runtime.run(hostile(base), "hostile.drive", {"url": runtime.url, "body": body})
    # As root the function has no route to the server at all; otherwise the server refuses it.
    assert reply["output"] in (401, "ConnectionRefusedError", "URLError"), reply


@pytest.mark.parametrize("package", [
    {"path": "/etc/shadow"},
    {"path": "/etc/passwd"},
    {"download_url": "file:///etc/shadow"},
    {"download_url": "http://169.254.169.254/latest/meta-data/"},
])
def test_package_locations_the_engine_did_not_give_are_refused(runtime, package):
    reply = runtime.run("", "x.y", package={**package, "function_id": "f", "version": 1})
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "refused" in reply["output"]
    assert "root:" not in reply["output"] and "/etc/" not in reply["output"]


def test_a_zip_bomb_is_refused_before_unpacking(base):
    bomb = base / "pkgs" / "bomb.zip"
    bomb.write_bytes(zip_bytes({"main.py": "def main(): return 1\n", "pad.bin": b"\0" * (8 * 1024 * 1024)}))
    rt = Runtime(base, env=runtime_env(HEADWATER_RUNTIME_MAX_UNPACKED_BYTES=str(1024 * 1024)), work="bomb-work")
    try:
        reply = rt.run(str(bomb), "main.main")
        assert reply["status"] == "failed" and "the limit is 1048576" in reply["output"], reply
        assert [p for p in os.listdir(rt.work / "packages") if not p.startswith(".")] == []
        assert [p for p in os.listdir(rt.work / "packages") if p.startswith(".unpack")] == []
    finally:
        rt.stop()


# --- finding 2: no network but its own ------------------------------------------------------------

@ROOT_ONLY
def test_a_function_cannot_reach_host_loopback_services(runtime, base, listener):
    assert runtime.run(hostile(base), "hostile.connect", {"host": "127.0.0.1", "port": listener})["output"] != "connected"
    # Link-local metadata has no route either.
    assert runtime.run(hostile(base), "hostile.connect", {"host": "169.254.169.254", "port": 80})["output"] != "connected"


@ROOT_ONLY
def test_network_host_shares_the_host_network_and_names_resolve(base, listener):
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello from the host")

        def log_message(self, *args):
            pass

    web = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    rt = Runtime(base, "--network", "host")
    try:
        assert rt.run(hostile(base), "hostile.connect", {"host": "127.0.0.1", "port": listener})["output"] == "connected"
        # A host name goes through the idna codec: under the sandbox it used to fail with
        # "unknown encoding: idna" (the stdlib's encodings package was unreachable by path).
        url = f"http://localhost:{web.server_address[1]}/"
        assert rt.run(hostile(base), "hostile.fetch", {"url": url})["output"] == "hello from the host"
    finally:
        rt.stop()
        web.shutdown()


def test_idna_encodes_in_the_sandbox(runtime, base):
    reply = runtime.run(hostile(base), "hostile.idna")
    assert reply["output"] == "xn--bcher-kva.example", reply


# --- finding 4: bounded, private scratch ----------------------------------------------------------

@ROOT_ONLY
@pytest.mark.parametrize("where", ["/dev/shm", "/tmp", "/var/tmp"])
def test_scratch_is_private_and_bounded(base, where):
    rt = Runtime(base, "--scratch-size", str(4 * 1024 * 1024))
    name = f"{where}/headwater-scratch-{os.getpid()}-{where.replace('/', '_')}"
    try:
        reply = rt.run(hostile(base), "hostile.fill", {"path": name, "mib": 16})
        assert reply["output"]["written"] < 5 and reply["output"]["error"] == 28, reply  # ENOSPC
        assert not os.path.exists(name), "the function's file reached the host's " + where
    finally:
        rt.stop()


# --- legitimate functions keep working ------------------------------------------------------------

def test_fifty_threads_under_the_default_memory_limit(runtime, base):
    reply = runtime.run(hostile(base), "hostile.threads", {"n": 50}, limits={"memory_size": 32 * 1024 * 1024})
    assert reply["output"] == 50, reply


# --- finding 12: a live child's uid is never handed out again ----------------------------------

def test_the_uid_pool_never_reuses_a_live_childs_uid(monkeypatch):
    monkeypatch.syspath_prepend(str(SERVER.parent))
    from headwater_runtime import sandbox
    monkeypatch.setitem(sandbox.SANDBOX, "uids", True)
    monkeypatch.setattr(sandbox, "_uids_in_use", set())
    live = [sandbox.allocate_uid() for _ in range(sandbox.SANDBOX_UID_SLOTS)]
    assert len(set(live)) == len(live)
    with pytest.raises(OSError, match="in use by live children"):
        sandbox.allocate_uid()
    sandbox.release_uid(live[7])
    assert sandbox.allocate_uid() == live[7]


def test_what_the_runtime_loads_from_under_tmp_stays_visible_to_its_children(tmp_path, monkeypatch):
    """A checkout or virtualenv under /tmp (a CI clone) would vanish under a child's private /tmp:
    those directories, and only those, are shown to the child again (read-only)."""
    runtime_dir = Path(__file__).resolve().parents[2] / "runtimes" / "python3"
    monkeypatch.syspath_prepend(str(runtime_dir))
    from headwater_runtime import namespaces

    venv = tmp_path / "venv" / "lib" / "site-packages"
    venv.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(venv), str(venv / "nested-not-there"), str(tmp_path / "venv"), "/usr/lib/python3",
                                      "/tmp", "/var/tmp"])
    kept = namespaces.kept_under_scratch()
    if str(tmp_path).startswith(("/tmp/", "/var/tmp/")):
        assert str(tmp_path / "venv") in kept and str(venv) not in kept  # the outermost one only
    else:
        assert str(tmp_path / "venv") not in kept
    assert "/tmp" not in kept and "/var/tmp" not in kept and not any(p.startswith("/usr") for p in kept)
