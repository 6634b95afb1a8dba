"""The Go runtime server on its own: POST /build compiles a package once (vendored modules, no network, the
compiler's message, a timeout), /execute runs the prebuilt binary; Go's handler shapes. The limits and
containment every runtime keeps are in tests/contract/test_runtime_contract.py."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.runtime_server import post, runtime_server
from tests.services import require_program


HANDLER_GO = r'''
package handler

import (
	"context"
	"errors"
	"fmt"
	"os"

	"example.com/greeting"
)

func init() { fmt.Println("loaded handler") }

type Person struct {
	Name string `json:"name"`
}

func Hello(ctx context.Context, p Person) (string, error) {
	fmt.Println("hello from", p.Name)
	return greeting.Greet(p.Name), nil
}

func Greet(name string) string { return "Hello, " + name }

func Echo(v interface{}) interface{} { return v }

func Meta(ctx context.Context) (interface{}, error) {
	_, hasDeadline := ctx.Deadline()
	return map[string]interface{}{"context": ctx.Value("headwater"), "deadline": hasDeadline}, nil
}

func Nothing() {}

func Boom() error { panic("kaput") }

func Fail() (string, error) { return "", errors.New("failed on purpose") }

func Exits() { os.Exit(3) }

func NotJSON() (interface{}, error) { return make(chan int), nil }

func Pid() int { return os.Getpid() }
'''

GO_MOD = "module example.com/fn\n\ngo 1.19\n\nrequire example.com/greeting v1.0.0\n"
VENDORED = {
    "vendor/modules.txt": "# example.com/greeting v1.0.0\n## explicit\nexample.com/greeting\n",
    "vendor/example.com/greeting/greeting.go": 'package greeting\n\nfunc Greet(name string) string { return "Hello, " + name }\n',
}


def make_zip(path: Path, files: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_program("go", "the go runtime builds functions with it")
    with runtime_server("go", tmp_path_factory.mktemp("gowork")) as url:
        yield url


def build(url: str, package: str, function_id: str = "fn", **extra) -> dict:
    return post(url, {"package": {"path": package, "function_id": function_id, "version": 0}, "timeout": 120, **extra},
                path="/build", timeout=180)


@pytest.fixture(scope="module")
def package(server, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gopkg")
    source = make_zip(folder / "src.zip", {"handler.go": HANDLER_GO, "go.mod": GO_MOD, "data.txt": "shipped", **VENDORED})
    reply = build(server, source)
    assert (reply["status"], reply["reason"]) == ("success", "ok"), reply
    artifact = folder / "artifact.zip"
    artifact.write_bytes(base64.b64decode(reply["artifact"]))
    with zipfile.ZipFile(artifact) as zf:
        assert {"bootstrap", "handler.go", "data.txt"} <= set(zf.namelist())
    return str(artifact)


def run(url, package, entry="handler.Greet", input=None, **extra) -> dict:
    body = {"execution_id": "e1", "entry": entry, "timeout": 5, "package": {"path": package, "function_id": "fn", "version": 0}, **extra}
    if input is not None:
        body["input"] = input
    return post(url, body)


def test_keyword_positional_and_each_json_type(server, package):
    reply = run(server, package, "handler.Hello", {"name": "Qinling"})
    assert (reply["success"], reply["status"], reply["reason"], reply["output"]) == (True, "success", "ok", "Hello, Qinling")
    assert "hello from Qinling" in reply["logs"] and "loaded handler" in reply["logs"]
    assert run(server, package, "handler.Greet", "positional")["output"] == "Hello, positional"
    for value in ("text", 42, 2.5, True, False, [1, "two", {"three": 3}], {"a": {"b": [None]}}):
        assert run(server, package, "handler.Echo", value)["output"] == value
    assert run(server, package, "handler.Echo")["output"] is None
    assert run(server, package, "handler.Nothing")["output"] is None
    meta = run(server, package, "handler.Meta", context={"execution_id": "e1"})["output"]
    assert meta == {"context": {"execution_id": "e1"}, "deadline": True}


def test_input_that_does_not_fit_the_handler_is_an_error(server, package):
    reply = run(server, package, "handler.Hello", "a string, not a Person")
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "does not fit" in reply["output"]


def test_panic_and_error_are_failures_with_a_log_and_the_worker_stays(server, package):
    first = run(server, package, "handler.Pid")["output"]
    reply = run(server, package, "handler.Boom")
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "error", "kaput")
    assert "panic: kaput" in reply["logs"] and "handler.go:" in reply["logs"]
    assert "worker.go" not in reply["logs"] and "/tmp/" not in reply["logs"]
    reply = run(server, package, "handler.Fail")
    assert (reply["status"], reply["reason"], reply["output"]) == ("failed", "error", "failed on purpose")
    assert "failed on purpose" in reply["logs"]
    assert run(server, package, "handler.Pid")["output"] == first  # the same warm worker serves on


def test_not_serialisable_exit_and_unknown_entry(server, package):
    reply = run(server, package, "handler.NotJSON")
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "not JSON serialisable" in reply["output"]
    reply = run(server, package, "handler.Exits")
    assert (reply["status"], reply["reason"]) == ("failed", "crashed") and "code 3" in reply["output"]
    assert "no exported function" in run(server, package, "handler.Missing")["output"]
    assert run(server, package, input="again")["output"] == "Hello, again"


def test_a_package_that_does_not_compile_fails_with_the_compiler_message(server, tmp_path):
    source = make_zip(tmp_path / "bad.zip", {"handler.go": "package handler\n\nfunc Handle() string { return undefinedThing }\n"})
    reply = build(server, source, "bad")
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "handler.go:3" in reply["output"] and "undefined: undefinedThing" in reply["output"]
    assert "/tmp/" not in reply["output"] and "artifact" not in reply


def test_no_network_during_a_build_without_a_vendored_module(server, tmp_path):
    files = {"handler.go": 'package handler\n\nimport "example.com/missing"\n\nfunc Handle() string { return missing.X }\n',
             "go.mod": "module example.com/fn\n\ngo 1.19\n\nrequire example.com/missing v1.0.0\n"}
    reply = build(server, make_zip(tmp_path / "net.zip", files), "net")
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "GOPROXY=off" in reply["output"] or "disabled" in reply["output"], reply["output"]


def test_a_package_without_a_handler_and_a_source_package_run_unbuilt(server, tmp_path):
    reply = build(server, make_zip(tmp_path / "none.zip", {"handler.go": "package handler\n\nfunc private() {}\n"}), "none")
    assert (reply["status"], reply["reason"]) == ("failed", "error") and "no exported function" in reply["output"]
    source = make_zip(tmp_path / "src.zip", {"handler.go": "package handler\n\nfunc Handle() {}\n"})
    reply = run(server, source, "handler.Handle")
    assert (reply["status"], reply["reason"]) == ("failed", "error")
    assert "no prebuilt `bootstrap`" in reply["output"]  # an execution never runs the compiler


def test_build_timeout(server, tmp_path):
    reply = build(server, make_zip(tmp_path / "slow.zip", {"handler.go": HANDLER_GO, "go.mod": GO_MOD, **VENDORED}), "slow",
                  timeout=0.05)
    assert (reply["status"], reply["reason"]) == ("failed", "timeout"), reply
    assert "timed out" in reply["output"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-the-credential"}], ids=["none", "wrong"])
def test_build_needs_the_runtime_credential(server, tmp_path, headers):
    """POST /build runs a compiler under the server's uid pool: like /execute, only the engine may ask."""
    source = make_zip(tmp_path / "src.zip", {"handler.go": "package handler\n\nfunc Handle() {}\n"})
    body = json.dumps({"package": {"path": source, "function_id": "fn", "version": 0}, "timeout": 120}).encode()
    request = urllib.request.Request(server + "/build", data=body, headers={"Content-Type": "application/json", **headers})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 401


def test_build_refuses_a_package_path_it_was_not_given(server):
    """The build fetches its package as an execution does: only from what the engine handed out."""
    reply = build(server, "/etc/passwd")
    assert (reply["success"], reply["reason"]) == (False, "error")
    assert reply["output"].startswith("Package path refused"), reply
