"""The PHP runtime server on its own: PHP's entries, files, exit() and fatal errors, memory_limit. The limits and
containment every runtime keeps are in tests/contract/test_runtime_contract.py."""

from __future__ import annotations

import zipfile

import pytest

from tests.runtime_server import post, runtime_server
from tests.services import require_program

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
function pid($input, $context) { return posix_getpid(); }
function hog($mib, $context) { return strlen(str_repeat('x', $mib << 20)) >> 20; }
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
    require_program("php", "the php runtime runs functions with the PHP CLI")
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


def test_memory_limit(server, package):
    reply = run(server, package, "main.hog", 80, limits={"memory_size": 32 * MiB})
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "memory", "Function exceeded its memory limit."), reply
    assert "Allowed memory size" in reply["logs"]
    assert run(server, package, "main.hog", 60, limits={"memory_size": 96 * MiB})["output"] == 60
    assert run(server, package, input="after")["output"] == "Hello, after"


