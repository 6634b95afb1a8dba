"""The runtime contract: one suite every runtime server passes (python3, nodejs, go, php), driven over
HTTP as the engines drive it: inputs, JSON types, failures with their logs, limits, containment, warm
reuse and cancellation."""

from __future__ import annotations

import base64
import dataclasses
import os
import zipfile

import pytest

from tests.processes import check_hangup_cancels, check_post_cancel, gone, pid_path, wait_gone
from tests.runtime_server import post, runtime_server
from tests.services import require_program

MiB = 1024 * 1024

PYTHON = r'''
import os, subprocess, time

def greet(name):
    print("hello", name)
    return "Hello, " + name

def echo(value=None, **kwargs):
    kwargs.pop("context", None)  # passed to a function that takes **kwargs
    return kwargs or value  # an object input arrives as keyword arguments

def boom():
    raise RuntimeError("kaput")

def pid():
    return os.getpid()

def chatty():
    for _ in range(300):
        print("x" * 10000)
    return "done"

def nap(seconds):
    child = subprocess.Popen(["sleep", "60"])
    escaped = subprocess.Popen(["setsid", "sleep", "60"])
    print("PIDS", os.getpid(), child.pid, escaped.pid, flush=True)
    time.sleep(seconds)
    return "slept"

def hog(mib):
    return len(bytearray(mib * 1024 * 1024)) // (1024 * 1024)

def files(n):
    return len([open(os.devnull) for _ in range(n)])

def big_file():
    name = "/tmp/headwater-contract-big-%d" % os.getpid()
    try:
        with open(name, "wb") as fh:
            fh.write(b"x" * (2 * 1024 * 1024))
    finally:
        if os.path.exists(name):
            os.unlink(name)

def spawn(n):
    return len([subprocess.Popen(["sleep", "30"]) for _ in range(n)])

def fork_bomb():
    while True:
        os.fork()

def background():
    subprocess.Popen(["sleep", "60"])
    return os.getpid()

def who():
    return {"uid": os.getuid(), "env": sorted(os.environ), "files": sorted(os.listdir("."))}

def nap_pid(path, seconds):
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(seconds)
    return "slept"
'''

NODE = r'''
const cp = require('child_process');
const fs = require('fs');
exports.greet = (context, input) => { const name = typeof input === 'object' ? input.name : input; console.log('hello', name); return `Hello, ${name}`; };
exports.echo = (context, input) => input;
exports.boom = () => { throw new Error('kaput'); };
exports.pid = () => process.pid;
exports.chatty = () => { for (let i = 0; i < 300; i++) console.log('x'.repeat(10000)); return 'done'; };
exports.nap = (context, seconds) => {
  const child = cp.spawn('sleep', ['60']);
  const escaped = cp.spawn('setsid', ['sleep', '60']);
  console.log('PIDS', process.pid, child.pid, escaped.pid);
  return new Promise((r) => setTimeout(() => r('slept'), seconds * 1000));
};
exports.hog = (context, mib) => Buffer.alloc(mib * 1024 * 1024, 1).length / (1024 * 1024);
exports.files = (context, n) => { const fds = []; for (let i = 0; i < n; i++) fds.push(fs.openSync('/dev/null', 'r')); return fds.length; };
exports.big_file = () => { const name = `/tmp/headwater-contract-big-${process.pid}`; try { fs.writeFileSync(name, Buffer.alloc(2 * 1024 * 1024)); } finally { try { fs.unlinkSync(name); } catch (e) {} } };
exports.spawn = (context, n) => new Promise((resolve, reject) => {
  for (let i = 0; i < n; i++) cp.spawn('sleep', ['30']).on('error', reject);
  setTimeout(() => resolve(n), 1000);
});
exports.fork_bomb = () => new Promise(() => { cp.spawn('sh', ['-c', 'bomb() { bomb | bomb & }; bomb'], { stdio: 'ignore' }); });
exports.background = () => { cp.spawn('sleep', ['60']); return process.pid; };
exports.who = () => ({ uid: process.getuid(), env: Object.keys(process.env), files: fs.readdirSync('.') });
exports.nap_pid = (context, input) => { fs.writeFileSync(input.path, String(process.pid)); return new Promise((r) => setTimeout(() => r('slept'), input.seconds * 1000)); };
'''

GO = r'''
package contract

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

func Greet(input interface{}) string {
	name := fmt.Sprint(input)
	if m, ok := input.(map[string]interface{}); ok {
		name = fmt.Sprint(m["name"])
	}
	fmt.Println("hello", name)
	return "Hello, " + name
}

func Echo(v interface{}) interface{} { return v }

func Boom() error { panic(errors.New("kaput")) }

func Pid() int { return os.Getpid() }

func Chatty() string {
	for i := 0; i < 300; i++ {
		fmt.Println(strings.Repeat("x", 10000))
	}
	return "done"
}

func Nap(seconds float64) (string, error) {
	child := exec.Command("sleep", "60")
	escaped := exec.Command("sleep", "60")
	escaped.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := child.Start(); err != nil {
		return "", err
	}
	if err := escaped.Start(); err != nil {
		return "", err
	}
	fmt.Println("PIDS", os.Getpid(), child.Process.Pid, escaped.Process.Pid)
	time.Sleep(time.Duration(seconds * float64(time.Second)))
	return "slept", nil
}

func Hog(mib int) int {
	b := make([]byte, mib<<20)
	for i := range b {
		b[i] = 1
	}
	return len(b) >> 20
}

func Files(n int) (int, error) {
	var files []*os.File
	for i := 0; i < n; i++ {
		f, err := os.Open(os.DevNull)
		if err != nil {
			return 0, err
		}
		files = append(files, f)
	}
	return len(files), nil
}

func BigFile() error {
	name := fmt.Sprintf("/tmp/headwater-contract-big-%d", os.Getpid())
	defer os.Remove(name)
	return os.WriteFile(name, make([]byte, 2<<20), 0o600)
}

func Spawn(n int) (int, error) {
	for i := 0; i < n; i++ {
		if err := exec.Command("sleep", "30").Start(); err != nil {
			return i, err
		}
	}
	return n, nil
}

func ForkBomb() {
	exec.Command("sh", "-c", "bomb() { bomb | bomb & }; bomb").Start()
	select {}
}

func Background() int {
	exec.Command("sleep", "60").Start()
	return os.Getpid()
}

func Who() map[string]interface{} {
	var env, files []string
	for _, kv := range os.Environ() {
		env = append(env, strings.SplitN(kv, "=", 2)[0])
	}
	entries, _ := os.ReadDir(".")
	for _, e := range entries {
		files = append(files, e.Name())
	}
	return map[string]interface{}{"uid": os.Getuid(), "env": env, "files": files}
}

type napInput struct {
	Path    string  `json:"path"`
	Seconds float64 `json:"seconds"`
}

func NapPid(in napInput) (string, error) {
	if err := os.WriteFile(in.Path, []byte(fmt.Sprint(os.Getpid())), 0o644); err != nil {
		return "", err
	}
	time.Sleep(time.Duration(in.Seconds * float64(time.Second)))
	return "slept", nil
}
'''

PHP = r'''<?php
function greet($input, $context) { $name = is_array($input) ? $input['name'] : $input; echo "hello $name\n"; return "Hello, $name"; }
function echo_value($input, $context) { return $input; }
function boom($input, $context) { throw new RuntimeException('kaput'); }
function pid($input, $context) { return posix_getpid(); }
function chatty($input, $context) { for ($i = 0; $i < 300; $i++) { echo str_repeat('x', 10000), "\n"; } return 'done'; }
function nap($seconds, $context) {
    $child = proc_open(['sleep', '60'], [], $p1);
    $escaped = proc_open(['setsid', 'sleep', '60'], [], $p2);
    echo 'PIDS ', posix_getpid(), ' ', proc_get_status($child)['pid'], ' ', proc_get_status($escaped)['pid'], "\n";
    usleep((int)($seconds * 1e6));
    return 'slept';
}
function hog($mib, $context) { return strlen(str_repeat('x', $mib << 20)) >> 20; }
function files($n, $context) { $f = []; for ($i = 0; $i < $n; $i++) { $f[] = fopen('/dev/null', 'r'); } return count($f); }
function big_file($input, $context) {
    $name = '/tmp/headwater-contract-big-' . posix_getpid();
    try { file_put_contents($name, str_repeat('x', 2 * 1024 * 1024)); } finally { @unlink($name); }
}
function spawn($n, $context) { $p = []; for ($i = 0; $i < $n; $i++) { $p[] = proc_open(['sleep', '30'], [], $pipes); } return count($p); }
function fork_bomb($input, $context) { while (true) { pcntl_fork(); } }
function background($input, $context) { proc_open(['sleep', '60'], [], $p); return posix_getpid(); }
function who($input, $context) { return ['uid' => posix_getuid(), 'env' => array_keys(getenv()), 'files' => scandir('.')]; }
function nap_pid($input, $context) { file_put_contents($input['path'], (string)posix_getpid()); usleep((int)($input['seconds'] * 1e6)); return 'slept'; }
'''


@dataclasses.dataclass
class Runtime:
    name: str
    tool: str  # the program the runtime needs on PATH
    filename: str
    source: str
    failure_log: str  # what the log of `boom` shows: the language's own trace, with the package's file
    compiled: bool = False

    def entry(self, function: str) -> str:
        module = self.filename.rsplit(".", 1)[0]
        if self.name == "php" and function == "echo":
            function = "echo_value"  # `echo` is a PHP keyword
        return f"{module}.{function}"


RUNTIMES = [
    Runtime("python3", "python3", "contract.py", PYTHON, "RuntimeError: kaput"),
    Runtime("nodejs", "node", "contract.js", NODE, "Error: kaput"),
    Runtime("go", "go", "contract.go", GO, "panic: kaput", compiled=True),
    Runtime("php", "php", "contract.php", PHP, "RuntimeException: kaput"),
]


@pytest.fixture(scope="module", params=RUNTIMES, ids=[r.name for r in RUNTIMES])
def runtime(request, tmp_path_factory):
    """(runtime, server URL, package path): a go package is built first, with the runtime's POST /build."""
    rt: Runtime = request.param
    require_program(rt.tool, f"the {rt.name} runtime needs it")
    folder = tmp_path_factory.mktemp(f"contract-{rt.name}")
    package = folder / "package.zip"
    with zipfile.ZipFile(package, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(rt.filename, rt.source)
    with runtime_server(rt.name, folder / "work") as url:
        if rt.compiled:
            reply = post(url, {"package": {"path": str(package), "function_id": "contract", "version": 0}, "timeout": 300},
                         path="/build", timeout=400)
            assert reply["success"], reply
            package = folder / "artifact.zip"
            package.write_bytes(base64.b64decode(reply["artifact"]))
        yield rt, url, str(package)


def run(runtime, function: str, input=None, **extra) -> dict:
    rt, url, package = runtime
    body = {"execution_id": "contract", "entry": rt.entry(function), "timeout": 5,
            "package": {"path": package, "function_id": "contract", "version": 0}, **extra}
    if input is not None:
        body["input"] = input
    return post(url, body)


def test_positional_and_keyword_input_and_logs(runtime):
    reply = run(runtime, "greet", "Qinling")
    assert (reply["success"], reply["status"], reply["reason"], reply["output"]) == (True, "success", "ok", "Hello, Qinling")
    assert "hello Qinling" in reply["logs"]
    assert isinstance(reply["duration"], float)
    assert run(runtime, "greet", {"name": "keyword"})["output"] == "Hello, keyword"


@pytest.mark.parametrize("value", ["text", 42, 2.5, True, False, [1, "two", {"three": 3}], {"a": {"b": [None, 1.5]}}])
def test_each_json_type_comes_back(runtime, value):
    assert run(runtime, "echo", value)["output"] == value


def test_failure_has_its_trace_in_the_log_and_the_worker_stays(runtime):
    rt = runtime[0]
    first = run(runtime, "pid")["output"]
    reply = run(runtime, "boom")
    assert (reply["success"], reply["status"], reply["reason"], reply["output"]) == (False, "failed", "error", "kaput")
    assert rt.failure_log in reply["logs"] and "contract." in reply["logs"], reply["logs"]
    assert "server." not in reply["logs"] and "worker." not in reply["logs"]
    assert run(runtime, "pid")["output"] == first  # the same warm worker serves on


def test_warm_worker_is_reused(runtime):
    first = run(runtime, "pid")["output"]
    assert run(runtime, "pid")["output"] == first


def test_logs_are_capped(runtime):
    reply = run(runtime, "chatty")
    assert reply["output"] == "done"
    assert len(reply["logs"]) < MiB + 200 and "[logs truncated:" in reply["logs"]


def test_timeout_kills_the_process_tree_and_the_next_execution_succeeds(runtime):
    # The function would nap an hour: any reply at all shows the timeout cut it.
    reply = run(runtime, "nap", 3600, timeout=1)
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "timeout", "Function execution timeout.")
    assert reply["duration"] >= 1.0
    pids = [int(p) for p in reply["logs"].split("PIDS", 1)[1].split()[:3]]
    if os.geteuid() != 0:
        pids = pids[:2]  # without a sandbox uid a setsid'd process escapes the group kill (documented)
    assert all(wait_gone(p) for p in pids)
    assert run(runtime, "greet", "after")["output"] == "Hello, after"


def test_memory_limit(runtime):
    reply = run(runtime, "hog", 80, limits={"memory_size": 32 * MiB})
    assert (reply["status"], reply["reason"]) == ("failed", "memory"), reply
    assert run(runtime, "hog", 60, limits={"memory_size": 96 * MiB})["output"] == 60
    assert run(runtime, "greet", "after")["output"] == "Hello, after"


def test_files_and_file_size_limits(runtime):
    reply = run(runtime, "files", 100, limits={"files": 64})
    assert (reply["status"], reply["reason"]) == ("failed", "files"), reply
    assert "too many open files" in reply["output"].lower()
    reply = run(runtime, "big_file", limits={"file_size": MiB})
    assert (reply["status"], reply["reason"]) == ("failed", "files"), reply
    assert run(runtime, "greet", "after")["output"] == "Hello, after"


def test_process_limit(runtime):
    reply = run(runtime, "spawn", 40, limits={"processes": 16})
    assert (reply["status"], reply["reason"]) == ("failed", "processes"), reply
    assert "resource temporarily unavailable" in reply["output"].lower() or "EAGAIN" in reply["output"], reply
    assert run(runtime, "greet", "next")["output"] == "Hello, next"


def test_fork_bomb_is_contained(runtime):
    reply = run(runtime, "fork_bomb", limits={"processes": 32}, timeout=3)
    assert reply["status"] == "failed" and reply["reason"] in ("processes", "timeout"), reply
    assert run(runtime, "greet", "alive")["output"] == "Hello, alive"


def test_background_process_does_not_outlive_the_execution(runtime):
    left = run(runtime, "background")["output"]
    assert run(runtime, "background")["output"] != left  # the worker that left a process was replaced
    assert gone(left)


def test_sandbox_uid_and_clean_environment(runtime):
    rt = runtime[0]
    out = run(runtime, "who")["output"]
    assert rt.filename in out["files"]
    assert not [k for k in out["env"] if k.startswith(("HEADWATER", "PYTEST", "OS_", "VIRTUAL_ENV"))], out["env"]
    if os.geteuid() == 0:
        assert out["uid"] >= 2 ** 30  # a uid of its own, not root


def test_post_cancel_and_hang_up_kill_the_function(runtime):
    rt, url, package = runtime
    body = {"execution_id": "to-cancel", "entry": rt.entry("nap_pid"), "timeout": 60,
            "package": {"path": package, "function_id": "contract", "version": 0}}
    path = pid_path()
    check_post_cancel(url, {**body, "input": {"path": path, "seconds": 30}}, path, post)
    path = pid_path()
    check_hangup_cancels(url, {**body, "execution_id": "hangup", "input": {"path": path, "seconds": 30}}, path)
    assert run(runtime, "greet", "after")["output"] == "Hello, after"
