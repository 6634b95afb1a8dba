"""The PHP runtime server on its own: started as a subprocess, driven over HTTP."""

from __future__ import annotations

import os
import time
import zipfile

import pytest

from tests.processes import check_hangup_cancels, check_post_cancel, gone, pid_path
from tests.runtime_server import post, runtime_server
from tests.services import require_tool

MiB = 1024 * 1024

MAIN_PHP = r'''<?php
require_once __DIR__ . '/lib/helper.php';
echo "loaded main\n";

function main($input, $context) {
    $name = is_array($input) ? $input['name'] : $input;
    echo "hello $name\n";
    return "Hello, $name";
}
function echo_input($input, $context) { return $input; }
function meta($input, $context) { return $context; }
function helped($input, $context) { return helper_answer(); }
function boom($input, $context) { throw new RuntimeException('kaput'); }
function exits($input, $context) { exit(2); }
function fatal($input, $context) { return undefined_function(); }
function not_json($input, $context) { return NAN; }
function chatty($input, $context) { for ($i = 0; $i < 300; $i++) { echo str_repeat('x', 10000), "\n"; } return 'done'; }
function pid($input, $context) { return posix_getpid(); }
function hog($mib, $context) { return strlen(str_repeat('x', $mib << 20)) >> 20; }
function files($n, $context) { $f = []; for ($i = 0; $i < $n; $i++) { $f[] = fopen('/dev/null', 'r'); } return count($f); }
function big_file($input, $context) {
    $name = '/tmp/headwater-php-big-' . posix_getpid();
    try { file_put_contents($name, str_repeat('x', 2 * 1024 * 1024)); } finally { @unlink($name); }
}
function spawn($n, $context) {
    $procs = [];
    for ($i = 0; $i < $n; $i++) { $procs[] = proc_open(['sleep', '30'], [], $pipes); }
    return count($procs);
}
function fork_bomb($input, $context) { while (true) { pcntl_fork(); } }
function nap($seconds, $context) {
    $child = proc_open(['sleep', '60'], [], $p1);
    $escaped = proc_open(['setsid', 'sleep', '60'], [], $p2);
    echo 'PIDS ', posix_getpid(), ' ', proc_get_status($child)['pid'], ' ', proc_get_status($escaped)['pid'], "\n";
    usleep((int)($seconds * 1e6));
    return 'slept';
}
function background($input, $context) { proc_open(['sleep', '60'], [], $p); return posix_getpid(); }
function who($input, $context) { return ['uid' => posix_getuid(), 'env' => array_keys(getenv()), 'files' => scandir('.')]; }
function peek($path, $context) { try { scandir($path); return 'listed'; } catch (ErrorException $e) { return str_contains($e->getMessage(), 'Permission denied') ? 'EACCES' : $e->getMessage(); } }
function nap_pid($input, $context) { file_put_contents($input['path'], (string)posix_getpid()); usleep((int)($input['seconds'] * 1e6)); return 'slept'; }
'''


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("phppkg") / "pkg.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("main.php", MAIN_PHP)
        zf.writestr("lib/helper.php", "<?php\nfunction helper_answer() { return 42; }\n")
        zf.writestr("broken.php", "<?php\nthrow new Exception('no such dependency');\n")
        zf.writestr("syntax.php", "<?php\nfunction main( {\n")
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_tool("php", "the php runtime runs functions with the PHP CLI")
    with runtime_server("php", tmp_path_factory.mktemp("phpwork")) as url:
        yield url


def run(url, package, entry="main.main", input=None, **extra) -> dict:
    body = {"execution_id": "e1", "entry": entry, "timeout": 5, "package": {"path": package, "function_id": "fn", "version": 0}, **extra}
    if input is not None:
        body["input"] = input
    return post(url, body)


def test_keyword_positional_and_each_json_type(server, package):
    reply = run(server, package, input="Qinling")
    assert (reply["success"], reply["status"], reply["reason"], reply["output"]) == (True, "success", "ok", "Hello, Qinling")
    assert "loaded main" in reply["logs"] and "hello Qinling" in reply["logs"]
    assert run(server, package, input={"name": "keyword"})["output"] == "Hello, keyword"
    for value in ("text", 42, 2.5, True, False, [1, "two", {"three": 3}], {"a": {"b": [None]}}):
        assert run(server, package, "main.echo_input", value)["output"] == value
    assert run(server, package, "main.echo_input")["output"] is None
    assert run(server, package, "main.meta", context={"execution_id": "e1"})["output"] == {"execution_id": "e1"}
    assert run(server, package, "main.helped")["output"] == 42


def test_exception_is_an_error_with_a_trace_and_the_worker_stays(server, package):
    first = run(server, package, "main.pid")["output"]
    reply = run(server, package, "main.boom")
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "error", "kaput")
    assert "RuntimeException: kaput" in reply["logs"] and "main.php:" in reply["logs"]
    assert "worker.php" not in reply["logs"] and "/tmp/" not in reply["logs"]
    assert run(server, package, "main.pid")["output"] == first


def test_exit_fatal_error_and_not_serialisable_get_a_fresh_worker(server, package):
    reply = run(server, package, "main.exits")
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "error", "Function called exit().")
    reply = run(server, package, "main.fatal")
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "undefined_function" in reply["output"]
    reply = run(server, package, "main.not_json")
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "not JSON serialisable" in reply["output"]
    assert run(server, package, input="again")["output"] == "Hello, again"


def test_load_errors_and_bad_entry(server, package):
    reply = run(server, package, "broken.main")
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "no such dependency" in reply["output"]
    reply = run(server, package, "syntax.main")
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "syntax error" in reply["output"]
    assert "has no function" in run(server, package, "main.missing")["output"]
    assert "no such file" in run(server, package, "nofile.main")["output"]
    assert "file.function" in run(server, package, "nodot")["output"]
    assert run(server, package, input="after")["output"] == "Hello, after"


def test_logs_are_capped(server, package):
    reply = run(server, package, "main.chatty")
    assert reply["output"] == "done"
    assert len(reply["logs"]) < MiB + 200 and "[logs truncated:" in reply["logs"]


def test_timeout_kills_process_tree(server, package):
    reply = run(server, package, "main.nap", 30, timeout=1)
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "timeout", "Function execution timeout.")
    assert reply["duration"] >= 1.0
    pids = [int(p) for p in reply["logs"].split("PIDS", 1)[1].split()[:3]]
    if os.geteuid() != 0:
        pids = pids[:2]  # without a sandbox uid a setsid'd process escapes the group kill (documented)
    deadline = time.monotonic() + 3
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids)
    assert run(server, package, input="after")["output"] == "Hello, after"


def test_memory_limit(server, package):
    reply = run(server, package, "main.hog", 80, limits={"memory_size": 32 * MiB})
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "memory", "Function exceeded its memory limit."), reply
    assert "Allowed memory size" in reply["logs"]
    assert run(server, package, "main.hog", 60, limits={"memory_size": 96 * MiB})["output"] == 60
    assert run(server, package, input="after")["output"] == "Hello, after"


def test_files_and_file_size_limits(server, package):
    reply = run(server, package, "main.files", 100, limits={"files": 64})
    assert (reply["status"], reply["reason"]) == ("failed", "files") and "Too many open files" in reply["output"]
    reply = run(server, package, "main.big_file", limits={"file_size": MiB})
    assert (reply["status"], reply["reason"]) == ("failed", "files"), reply


def test_process_limit_and_fork_bomb(server, package):
    reply = run(server, package, "main.spawn", 40, limits={"processes": 16})
    assert (reply["status"], reply["reason"]) == ("failed", "processes"), reply
    started = time.monotonic()
    reply = run(server, package, "main.fork_bomb", limits={"processes": 32}, timeout=3)
    assert reply["status"] == "failed" and reply["reason"] in ("processes", "timeout"), reply
    assert time.monotonic() - started < 6
    assert run(server, package, input="alive")["output"] == "Hello, alive"


def test_sandbox_uid_environment_and_other_packages(server, package):
    out = run(server, package, "main.who")["output"]
    assert "main.php" in out["files"]
    assert not [k for k in out["env"] if k.startswith(("HEADWATER", "PYTEST", "OS_", "VIRTUAL_ENV"))], out["env"]
    if os.geteuid() == 0:
        assert out["uid"] >= 2 ** 30
        assert run(server, package, "main.peek", "/root")["output"] == "EACCES"


def test_warm_worker_reused_and_background_process_recycles_it(server, package):
    first = run(server, package, "main.pid")["output"]
    assert run(server, package, "main.pid")["output"] == first
    left = run(server, package, "main.background")["output"]
    assert run(server, package, "main.background")["output"] != left
    assert gone(left)


def test_cancel_and_hangup(server, package):
    body = {"execution_id": "to-cancel", "entry": "main.nap_pid", "timeout": 60,
            "package": {"path": package, "function_id": "fn", "version": 0}}
    path = pid_path()
    check_post_cancel(server, {**body, "input": {"path": path, "seconds": 30}}, path, post)
    path = pid_path()
    check_hangup_cancels(server, {**body, "execution_id": "hangup", "input": {"path": path, "seconds": 30}}, path)
    assert run(server, package, input="after")["output"] == "Hello, after"
