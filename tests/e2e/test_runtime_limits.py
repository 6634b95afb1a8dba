"""Hostile functions through the API: a real `headwater serve`, the local engine, python3, nodejs, go and php runtimes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import time

import pytest

from tests.e2e.server import Server, make_zip
from tests.processes import wait_gone
from tests.services import require_program

MiB = 1024 * 1024

PYTHON = '''
import os, subprocess, sys, time

def main(name, context=None):
    return "Hello, %s" % (name,)

def sleeper(seconds, context=None):
    child = subprocess.Popen(["sleep", "60"])
    print("CHILD", child.pid, flush=True)
    time.sleep(seconds)
    return "slept %s" % seconds

def allocate(mib, context=None):
    block = bytearray(mib * 1024 * 1024)
    return len(block)

def open_files(count, context=None):
    return len([open(os.devnull) for _ in range(count)])

def spawn(count, context=None):
    return len([subprocess.Popen(["sleep", "30"]) for _ in range(count)])

def fork_bomb(context=None):
    while True:
        os.fork()

def boom(context=None):
    raise ValueError("hostile function failed on purpose")
'''

NODE = '''
const cp = require('child_process');
const fs = require('fs');

exports.main = (context, input) => (input && typeof input === 'object' && !Array.isArray(input))
  ? 'Hello, ' + input.name : 'Hello, ' + input;

exports.sleeper = (context, seconds) => {
  const child = cp.spawn('sleep', ['60']);
  console.log('CHILD', child.pid);
  return new Promise((resolve) => setTimeout(() => resolve('slept ' + seconds), seconds * 1000));
};

exports.allocate = (context, mib) => Buffer.alloc(mib * 1024 * 1024, 1).length;

exports.open_files = (context, count) => {
  const fds = [];
  for (let i = 0; i < count; i++) fds.push(fs.openSync('/dev/null', 'r'));
  return fds.length;
};

exports.spawn = (context, count) => new Promise((resolve, reject) => {
  const children = [];
  for (let i = 0; i < count; i++) {
    const child = cp.spawn('sleep', ['30']);
    child.on('error', reject);
    children.push(child);
  }
  setTimeout(() => resolve(children.length), 1000);
});

exports.fork_bomb = () => new Promise(() => {
  cp.spawn('sh', ['-c', 'bomb() { bomb | bomb & }; bomb'], { stdio: 'ignore' });
});

exports.boom = () => { throw new Error('hostile function failed on purpose'); };
'''

GO = r'''
package hostile

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"time"
)

func Main(input interface{}) string {
	if m, ok := input.(map[string]interface{}); ok {
		return fmt.Sprint("Hello, ", m["name"])
	}
	return fmt.Sprint("Hello, ", input)
}

func Sleeper(seconds float64) (string, error) {
	child := exec.Command("sleep", "60")
	if err := child.Start(); err != nil {
		return "", err
	}
	fmt.Println("CHILD", child.Process.Pid)
	time.Sleep(time.Duration(seconds * float64(time.Second)))
	return fmt.Sprint("slept ", seconds), nil
}

func Allocate(mib int) int {
	block := make([]byte, mib*1024*1024)
	for i := range block {
		block[i] = 1
	}
	return len(block)
}

func OpenFiles(count int) (int, error) {
	var files []*os.File
	for i := 0; i < count; i++ {
		f, err := os.Open(os.DevNull)
		if err != nil {
			return 0, err
		}
		files = append(files, f)
	}
	return len(files), nil
}

func Spawn(count int) (int, error) {
	for i := 0; i < count; i++ {
		if err := exec.Command("sleep", "30").Start(); err != nil {
			return i, err
		}
	}
	return count, nil
}

func ForkBomb() {
	exec.Command("sh", "-c", "bomb() { bomb | bomb & }; bomb").Start()
	select {}
}

func Boom() error {
	panic(errors.New("hostile function failed on purpose"))
}
'''

PHP = r'''<?php
function main($input, $context) {
    if (is_array($input) && isset($input['name'])) { return 'Hello, ' . $input['name']; }
    return 'Hello, ' . (is_array($input) ? json_encode($input) : $input);
}
function sleeper($seconds, $context) {
    $child = proc_open(['sleep', '60'], [], $pipes);
    echo 'CHILD ', proc_get_status($child)['pid'], "\n";
    usleep((int)($seconds * 1e6));
    return "slept $seconds";
}
function allocate($mib, $context) { return strlen(str_repeat('x', $mib * 1024 * 1024)); }
function open_files($count, $context) { $f = []; for ($i = 0; $i < $count; $i++) { $f[] = fopen('/dev/null', 'r'); } return count($f); }
function spawn($count, $context) { $p = []; for ($i = 0; $i < $count; $i++) { $p[] = proc_open(['sleep', '30'], [], $pipes); } return count($p); }
function fork_bomb($input, $context) { while (true) { pcntl_fork(); } }
function boom($input, $context) { throw new RuntimeException('hostile function failed on purpose'); }
'''

RUNTIMES = {
    "python3": ("openstackqinling/python3-runtime:0.0.2", {"hostile.py": PYTHON}, "Traceback", 'hostile.py", line'),
    "nodejs": ("openstackqinling/nodejs-runtime:0.0.1", {"hostile.js": NODE}, "Error: hostile function failed", "hostile.js:"),
    "go": ("headwater/go-runtime:latest", {"hostile.go": GO}, "panic: hostile function failed", "hostile.go:"),
    "php": ("headwater/php-runtime:latest", {"hostile.php": PHP}, "RuntimeException: hostile function failed", "hostile.php:"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_program("node", "the nodejs runtime needs Node.js 18 or newer: apt-get install nodejs")
    require_program("go", "the go runtime builds functions with it")
    require_program("php", "the php runtime runs functions with the PHP CLI")
    with Server(tmp_path_factory.mktemp("runtime-limits")) as srv:
        yield srv


@pytest.fixture(scope="module")
def runtimes(server):
    ids = {}
    for name, (image, _, _, _) in RUNTIMES.items():
        resp = server.request("POST", "/v1/runtimes", {"image": image, "name": name})
        assert resp.status == 201, resp.text
        ids[name] = resp.json()["id"]
    return ids


@pytest.fixture(params=list(RUNTIMES))
def lang(request):
    return request.param


def function(server, runtimes, lang, entry, **fields):
    _, files, _, _ = RUNTIMES[lang]
    form = {"runtime_id": runtimes[lang], "code": json.dumps({"source": "package"}), "entry": f"hostile.{entry}",
            **{k: str(v) for k, v in fields.items()}}
    resp = server.multipart("/v1/functions", form, {"package": make_zip(files)})
    assert resp.status == 201, resp.text
    function_id = resp.json()["id"]
    deadline = time.monotonic() + 240
    while resp.json()["status"] == "building" and time.monotonic() < deadline:  # go: the build step
        time.sleep(0.1)
        resp = server.request("GET", f"/v1/functions/{function_id}")
    assert resp.json()["status"] == "available", resp.json()
    return function_id


def execute(server, function_id, input=None, timeout=60):
    body = {"function_id": function_id}
    if input is not None:
        body["input"] = input  # a JSON client sends the value itself (a string is parsed by Qinling's rules)
    resp = server.request("POST", "/v1/executions", body, timeout=timeout)
    assert resp.status == 201, resp.text
    execution = resp.json()
    execution["result"] = json.loads(execution["result"]) if execution.get("result") else {}
    execution["log"] = server.request("GET", f"/v1/executions/{execution['id']}/log").text
    return execution



def sandbox_processes(server) -> int:
    """Processes now running under the sandbox uids of this test server's runtimes. A runtime server's
    uids are SANDBOX_UID_BASE + (its pid mod 2**22) * 256 + slot: other engineers' runtimes on a shared
    host have their own, and counting theirs made this test fail while they ran."""
    parents: dict[int, int] = {}
    uids: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    parents[int(name)] = int(fh.read().rsplit(")", 1)[1].split()[1])
                uids[int(name)] = os.stat(f"/proc/{name}").st_uid
            except (OSError, ValueError, IndexError):
                pass
    ours, frontier = set(), {server.proc.pid}
    while frontier:  # the serve process's descendants: its runtime servers among them
        ours |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - ours
    blocks = {pid % (1 << 22) for pid in ours}
    return sum(1 for uid in uids.values() if uid >= 2 ** 30 and (uid - 2 ** 30) // 256 in blocks)


def test_positional_keyword_and_list_input(server, runtimes, lang):
    fid = function(server, runtimes, lang, "main")
    positional = execute(server, fid, "Qinling")
    assert (positional["status"], positional["result"]["output"]) == ("success", "Hello, Qinling"), positional
    keyword = execute(server, fid, {"name": "keyword"})
    assert (keyword["status"], keyword["result"]["output"]) == ("success", "Hello, keyword"), keyword
    listed = execute(server, fid, [1, 2, 3])
    assert listed["status"] == "success", listed
    assert "1" in listed["result"]["output"] and "3" in listed["result"]["output"]


def test_sleep_past_the_timeout_is_killed_with_its_children(server, runtimes):
    # Eight 7 s executions (four runtimes x two timeouts) run at once to keep the suite fast.
    cases = [(lang, timeout) for lang in RUNTIMES for timeout in (5, 10)]
    fids = {case: function(server, runtimes, case[0], "sleeper", timeout=case[1]) for case in cases}
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = {case: pool.submit(execute, server, fids[case], 7) for case in cases}
        results = {case: f.result() for case, f in futures.items()}
    for (lang, timeout), execution in results.items():
        children = [int(p) for p in re.findall(r"CHILD (\d+)", execution["log"])]
        assert children, (lang, timeout, execution["log"])
        if timeout == 5:
            assert execution["status"] == "failed", (lang, execution)
            assert execution["reason"] == "timeout", (lang, execution["result"], execution["log"][-800:])
            assert execution["result"]["output"] == "Function execution timeout."
            assert execution["result"]["duration"] >= 5.0, (lang, execution)
        else:
            assert execution["status"] == "success", (lang, execution)
            assert execution["result"]["output"] == "slept 7"
        # killed with the timed-out child, or with the child recycled for leaving it behind
        assert [p for p in children if not wait_gone(p)] == [], (lang, timeout)


@pytest.mark.parametrize("memory, status, reason", [(32 * MiB, "failed", "memory"), (96 * MiB, "success", "ok")])
def test_memory_limit(server, runtimes, lang, memory, status, reason):
    fid = function(server, runtimes, lang, "allocate", memory_size=memory)
    execution = execute(server, fid, 80)
    assert (execution["status"], execution["reason"]) == (status, reason), execution
    if status == "success":
        assert execution["result"]["output"] == 80 * MiB


def test_too_many_open_files(server, runtimes, lang):
    fid = function(server, runtimes, lang, "open_files")
    execution = execute(server, fid, 1024)
    assert (execution["status"], execution["reason"]) == ("failed", "files"), execution
    assert "too many open files" in execution["result"]["output"].lower()
    assert "too many open files" in execution["log"].lower()


def test_spawning_past_the_process_limit(server, runtimes, lang):
    fid = function(server, runtimes, lang, "spawn")
    execution = execute(server, fid, 200)
    assert (execution["status"], execution["reason"]) == ("failed", "processes"), execution
    assert "Resource temporarily unavailable" in execution["result"]["output"] or "EAGAIN" in execution["result"]["output"]


def test_fork_bomb_is_contained(server, runtimes, lang):
    if os.geteuid() != 0:
        pytest.skip("without root the runtimes share the tests' uid, so a bomb's process count would hit the test run itself")
    fid = function(server, runtimes, lang, "fork_bomb", timeout=3)
    execution = execute(server, fid)
    assert execution["status"] == "failed" and execution["reason"] in ("processes", "timeout"), execution
    assert server.request("GET", "/healthz").status == 200
    # the bomb's processes are gone: only warm children (one per function version and limits) remain
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sandbox_processes(server) > 40:
        time.sleep(0.1)
    assert sandbox_processes(server) <= 40
    hello = function(server, runtimes, lang, "main")
    assert execute(server, hello, "after the bomb")["result"]["output"] == "Hello, after the bomb"


def test_exception_has_traceback_and_runtime_serves_on(server, runtimes, lang):
    _, _, marker, location = RUNTIMES[lang]
    fid = function(server, runtimes, lang, "boom")
    execution = execute(server, fid)
    assert (execution["status"], execution["reason"]) == ("failed", "error"), execution
    assert execution["result"]["output"] == "hostile function failed on purpose"
    assert marker in execution["log"] and location in execution["log"], execution["log"]
    again = execute(server, fid)
    assert again["status"] == "failed" and again["result"]["output"] == "hostile function failed on purpose"
    hello = function(server, runtimes, lang, "main")
    assert execute(server, hello, "next")["result"]["output"] == "Hello, next"
