"""The Node.js runtime server on its own: started as a subprocess, driven over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.processes import RUNTIME_HEADERS, check_hangup_cancels, check_post_cancel, gone, pid_path, runtime_env
from tests.services import require_program

SERVER = Path(__file__).resolve().parents[2] / "runtimes" / "nodejs" / "server.js"
MiB = 1024 * 1024

INDEX_JS = r'''
const cp = require('child_process');
const fs = require('fs');
const helper = require('./lib/helper');
console.log('loaded index');

exports.main = (context, input) => `Hello, ${input}`;
exports.echo = (context, input) => ({ input, context });
exports.later = async (context, input) => { await new Promise((r) => setTimeout(r, 10)); return input * 2; };
exports.helped = () => helper.answer();
exports.boom = () => { throw new TypeError('kaput'); };
exports.rejects = () => Promise.reject(new Error('rejected'));
exports.asyncThrow = () => new Promise(() => { setTimeout(() => { throw new Error('thrown later'); }, 5); });
exports.exits = () => process.exit(2);
exports.crash = () => { console.log('about to die'); process.kill(process.pid, 'SIGSEGV'); return new Promise(() => {}); };
exports.bigint = () => 1n;
exports.cyclic = () => { const a = {}; a.a = a; return a; };
exports.chatty = () => { for (let i = 0; i < 300; i++) console.log('x'.repeat(10000)); return 'done'; };
exports.pid = () => process.pid;
exports.heap = (context, mib) => { const a = []; for (let i = 0; i < mib; i++) a.push(new Array(131072).fill(i + 0.5)); return a.length; };
exports.buffer = (context, mib) => Buffer.alloc(mib * 1024 * 1024, 1).length;
exports.files = (context, n) => { const fds = []; for (let i = 0; i < n; i++) fds.push(fs.openSync('/dev/null', 'r')); return fds.length; };
exports.bigFile = () => { const name = `/tmp/hw-node-big-${process.pid}`; try { fs.writeFileSync(name, Buffer.alloc(2 * 1024 * 1024)); } finally { try { fs.unlinkSync(name); } catch (e) {} } };
exports.nap = (context, seconds) => {
  const child = cp.spawn('sleep', ['60']);
  const escaped = cp.spawn('setsid', ['sleep', '60']);
  console.log('PIDS', child.pid, escaped.pid);
  return new Promise((r) => setTimeout(() => r('slept'), seconds * 1000));
};
exports.who = () => ({ uid: process.getuid(), env: Object.keys(process.env), files: fs.readdirSync('.') });
exports.peek = (context, p) => { try { return fs.readdirSync(p); } catch (e) { return e.code; } };
exports.connect = (context, input) => new Promise((resolve) => {
  const s = require('net').connect(input.port, input.host, () => { s.destroy(); resolve('connected'); });
  s.setTimeout(3000, () => { s.destroy(); resolve('timeout'); });
  s.on('error', (e) => resolve(e.code));
});
exports.fill = (context, input) => {
  let written = 0;
  try {
    const fd = fs.openSync(input.path, 'w');
    for (let i = 0; i < input.mib; i++) { fs.writeSync(fd, Buffer.alloc(1024 * 1024, 1)); written++; }
    fs.closeSync(fd);
  } catch (e) { return { written, error: e.code }; }
  return { written, error: null };
};
exports.napPid = (context, input) => {
  fs.writeFileSync(input.path, String(process.pid));
  return new Promise((r) => setTimeout(() => r('slept'), input.seconds * 1000));
};
'''


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("nodepkg") / "pkg.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("index.js", INDEX_JS)
        zf.writestr("lib/helper.js", "exports.answer = () => 42;\n")
        zf.writestr("../evil.js", "exports.x = 1;\n")  # must not land outside the package dir
        zf.writestr("broken.js", "throw new Error('no such dependency');\n")
    return str(path)


WORK: list[Path] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    node = require_program("node", "the nodejs runtime needs Node.js 18 or newer: apt-get install nodejs")
    work = tmp_path_factory.mktemp("nodework")
    WORK.append(work)
    proc = subprocess.Popen([node, str(SERVER), "--host", "127.0.0.1", "--port", "0", "--work-dir", str(work),
                             "--package-dir", str(tmp_path_factory.getbasetemp())],
                            stdout=subprocess.PIPE, stderr=None, start_new_session=True, env=runtime_env())
    line = proc.stdout.readline().decode().strip()
    assert line.startswith("LISTENING 127.0.0.1:"), line
    yield f"http://{line.split()[1]}"
    proc.terminate()
    proc.wait(5)


def post(url: str, body: dict, timeout: float = 30) -> dict:
    request = urllib.request.Request(url + "/execute", data=json.dumps(body).encode(), headers=RUNTIME_HEADERS)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def run(url, package, entry="index.main", input=None, **extra) -> dict:
    body = {"execution_id": "e1", "entry": entry, "timeout": 5, "package": {"path": package, "function_id": "fn", "version": 0}, **extra}
    if input is not None:
        body["input"] = input
    return post(url, body)


def test_ping_404_and_bad_bodies(server):
    with urllib.request.urlopen(server + "/ping", timeout=5) as resp:
        assert (resp.status, resp.read()) == (200, b"pong")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + "/nope", timeout=5)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(server + "/execute", data=b"[1]", headers=RUNTIME_HEADERS), timeout=5)
    assert err.value.code == 400


def test_inputs_context_and_modules(server, package):
    reply = run(server, package, input="Qinling")
    assert (reply["success"], reply["status"], reply["reason"], reply["output"]) == (True, "success", "ok", "Hello, Qinling")
    assert "loaded index" in reply["logs"]
    assert run(server, package, "index.echo", input={"a": [1, 2]}, context={"execution_id": "e1"})["output"] == \
        {"input": {"a": [1, 2]}, "context": {"execution_id": "e1"}}
    assert run(server, package, "index.echo", input=[1, 2])["output"]["input"] == [1, 2]
    assert run(server, package, "index.echo")["output"]["input"] is None
    assert run(server, package, "index.later", input=21)["output"] == 42
    assert run(server, package, "index.helped")["output"] == 42
    assert not (WORK[-1] / "evil.js").exists() and not (WORK[-1] / "packages" / "evil.js").exists()


@pytest.mark.parametrize("entry, output", [
    ("index.boom", "kaput"), ("index.rejects", "rejected"), ("index.asyncThrow", "thrown later"),
    ("index.exits", "Function called process.exit(2)."),
])
def test_failures_are_errors_and_the_child_stays(server, package, entry, output):
    first = run(server, package, "index.pid")["output"]
    reply = run(server, package, entry)
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "error", output)
    assert "index.js:" in reply["logs"] and "server.js" not in reply["logs"]
    assert run(server, package, "index.pid")["output"] == first  # same warm child serves on


def test_not_serialisable_output(server, package):
    for entry in ("index.bigint", "index.cyclic"):
        reply = run(server, package, entry)
        assert (reply["status"], reply["reason"]) == ("failed", "error")
        assert "not JSON serialisable" in reply["output"]


def test_crash_load_error_and_bad_entry(server, package):
    reply = run(server, package, "index.crash")
    assert (reply["status"], reply["reason"]) == ("failed", "crashed")
    assert "SIGSEGV" in reply["output"] and "about to die" in reply["logs"]
    reply = run(server, package, "broken.main")
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "no such dependency" in reply["output"]
    assert "has no function" in run(server, package, "index.missing")["output"]
    assert "module.function" in run(server, package, "nodot")["output"]
    assert run(server, package, input="again")["output"] == "Hello, again"


def test_bad_package(server, tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    reply = run(server, str(bad))
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "ZIP" in reply["output"]
    reply = post(server, {"package": {"path": str(bad), "function_id": "x", "md5sum": "0" * 32}})
    assert "md5 mismatch" in reply["output"]
    assert "no package" in post(server, {})["output"]


def test_logs_are_capped(server, package):
    reply = run(server, package, "index.chatty")
    assert reply["output"] == "done"
    assert len(reply["logs"]) < 1024 * 1024 + 200 and "[logs truncated:" in reply["logs"]


def test_timeout_kills_process_tree(server, package):
    # The function would wait far longer than post() does: a reply means the timeout cut it off.
    reply = run(server, package, "index.nap", input=3600, timeout=1)
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "timeout", "Function execution timeout.")
    assert reply["duration"] >= 1.0
    pids = [int(p) for p in reply["logs"].split("PIDS", 1)[1].split()[:2]]
    if os.geteuid() != 0:
        pids = pids[:1]  # without a sandbox uid a setsid'd process escapes the group kill (documented)
    deadline = time.monotonic() + 60
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids)
    assert run(server, package, input="after")["output"] == "Hello, after"


@pytest.mark.parametrize("entry", ["index.heap", "index.buffer"])
def test_memory_limit(server, package, entry):
    reply = run(server, package, entry, input=80, limits={"memory_size": 32 * MiB})
    assert (reply["status"], reply["reason"]) == ("failed", "memory"), reply
    assert run(server, package, entry, input=60, limits={"memory_size": 96 * MiB})["status"] == "success"


def test_files_and_file_size_limits(server, package):
    reply = run(server, package, "index.files", input=100, limits={"files": 64})
    assert (reply["status"], reply["reason"]) == ("failed", "files") and "too many open files" in reply["output"]
    reply = run(server, package, "index.bigFile", limits={"file_size": MiB})
    assert (reply["status"], reply["reason"]) == ("failed", "files"), reply


def test_sandbox_uid_environment_and_other_packages(server, package):
    out = run(server, package, "index.who")["output"]
    assert "index.js" in out["files"]
    assert not [k for k in out["env"] if k.startswith(("HW_", "HEADWATER", "PYTEST"))], out["env"]
    if os.geteuid() == 0:
        assert out["uid"] >= 2 ** 30
        # Root-only (0700), and under /tmp also hidden by the child's private /tmp.
        assert run(server, package, "index.peek", input=str(WORK[-1] / "packages"))["output"] in ("EACCES", "ENOENT")


def test_background_process_recycles_the_child(server, package):
    first = run(server, package, "index.pid")["output"]
    reply = run(server, package, "index.nap", input=0)
    assert reply["output"] == "slept"
    pids = [int(p) for p in reply["logs"].split("PIDS", 1)[1].split()[:1]]
    deadline = time.monotonic() + 60
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids)
    assert run(server, package, "index.pid")["output"] == first  # other entries keep their warm child


def nap_body(execution_id: str, path: str, package: str) -> dict:
    return {"execution_id": execution_id, "entry": "index.napPid", "input": {"path": path, "seconds": 3600}, "timeout": 3600,
            "package": {"path": package, "function_id": "fn", "version": 0}}


def test_a_client_that_hangs_up_cancels_the_execution_and_its_child_is_killed(server, package):
    path = pid_path()
    child = check_hangup_cancels(server, nap_body("hangup", path, package), path)
    assert run(server, package, "index.pid")["output"] != child
    assert run(server, package, input="after")["output"] == "Hello, after"


def test_post_cancel_answers_cancelled_and_kills_the_child(server, package):
    path = pid_path()
    check_post_cancel(server, nap_body("to-cancel", path, package), path, post)
    assert run(server, package, input="after")["output"] == "Hello, after"


def test_execute_and_cancel_need_the_credential(server, package):
    body = json.dumps({"execution_id": "x", "entry": "index.main", "package": {"path": package}}).encode()
    for headers in ({"Content-Type": "application/json"}, {**RUNTIME_HEADERS, "Authorization": "Bearer guess"}):
        for path in ("/execute", "/cancel"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(server + path, data=body, headers=headers), timeout=5)
            assert err.value.code == 401


@pytest.mark.parametrize("source", [{"path": "/etc/shadow"}, {"download_url": "file:///etc/shadow"},
                                    {"download_url": "http://169.254.169.254/latest/meta-data/"}])
def test_package_locations_the_engine_did_not_give_are_refused(server, source):
    reply = post(server, {"execution_id": "x", "entry": "index.main", "timeout": 5, "package": {**source, "function_id": "f"}})
    assert reply["status"] == "failed" and "refused" in reply["output"] and "/etc/" not in reply["output"], reply


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need the runtime to run as root")
def test_no_host_loopback_and_bounded_private_scratch(server, package):
    import socket
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        reply = run(server, package, "index.connect", input={"host": "127.0.0.1", "port": srv.getsockname()[1]})
        assert reply["output"] != "connected", reply
    name = f"/dev/shm/hw-node-scratch-{os.getpid()}"
    reply = run(server, package, "index.fill", input={"path": name, "mib": 80})  # the default scratch is 64 MiB
    assert reply["output"]["error"] == "ENOSPC" and reply["output"]["written"] <= 64, reply
    assert not os.path.exists(name)
