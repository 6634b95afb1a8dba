"""Go and PHP functions through the API on a real `headwater serve` (local engine): the build step's
states (building → available, or error with the compiler's message) and a webhook running each."""

from __future__ import annotations

import io
import json
import time
import zipfile

import pytest

from tests.e2e.server import Server, make_zip
from tests.services import require_program

GO_OK = {"handler.go": '''package handler

import "fmt"

type Input struct {
	Name string `json:"name"`
}

func Hello(in Input) (string, error) {
	fmt.Println("go says hello to", in.Name)
	return "Hello from Go, " + in.Name, nil
}
'''}

GO_BROKEN = {"handler.go": "package handler\n\nfunc Hello() string {\n\treturn notDefinedAnywhere\n}\n"}

PHP_OK = {"hello.php": '''<?php
function main($input, $context) {
    echo "php says hello to {$input['name']}\\n";
    return "Hello from PHP, " . $input['name'];
}
'''}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_program("go", "Go functions are built with it")
    require_program("php", "PHP functions run with the PHP CLI")
    with Server(tmp_path_factory.mktemp("compiled")) as srv:
        yield srv


def runtime(server, image: str) -> str:
    resp = server.request("POST", "/v1/runtimes", {"image": image, "name": image.split("/")[-1]})
    assert resp.status == 201, resp.text
    return resp.json()["id"]


def create(server, runtime_id: str, entry: str, files: dict[str, str]) -> dict:
    form = {"runtime_id": runtime_id, "code": json.dumps({"source": "package"}), "entry": entry}
    resp = server.multipart("/v1/functions", form, {"package": make_zip(files)})
    assert resp.status == 201, resp.text
    return resp.json()


def settle(server, function_id: str, timeout: float = 240) -> dict:
    """The function once its build has finished (the state it reached)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        function = server.request("GET", f"/v1/functions/{function_id}").json()
        if function["status"] != "building":
            return function
        time.sleep(0.1)
    raise AssertionError(f"function {function_id} still building after {timeout}s")


def invoke_webhook(server, function_id: str, body: dict) -> dict:
    hook = server.request("POST", "/v1/webhooks", {"function_id": function_id})
    assert hook.status == 201, hook.text
    resp = server.request("POST", hook.json()["webhook_url"], body)
    assert resp.status == 202, resp.text
    execution = server.wait_execution(resp.json()["execution_id"], timeout=60)
    execution["log"] = server.request("GET", f"/v1/executions/{execution['id']}/log").text
    return execution


def test_go_package_builds_then_a_webhook_runs_it(server):
    function = create(server, runtime(server, "headwater/go-runtime"), "handler.Hello", GO_OK)
    assert function["status"] == "building" and function["status_reason"] is None
    assert "build" not in function["code"]
    built = settle(server, function["id"])
    assert (built["status"], built["status_reason"]) == ("available", None)
    execution = invoke_webhook(server, function["id"], {"name": "webhook"})
    assert execution["status"] == "success", execution
    assert json.loads(execution["result"])["output"] == "Hello from Go, webhook"
    assert "go says hello to webhook" in execution["log"]
    # The download is the uploaded source, not the built artifact.
    download = server.request("GET", f"/v1/functions/{function['id']}?download=true")
    assert download.status == 200
    with zipfile.ZipFile(io.BytesIO(download.body)) as zf:
        assert zf.namelist() == ["handler.go"]


def test_go_package_that_does_not_compile_shows_the_compiler_message(server):
    function = create(server, runtime(server, "headwater/go-runtime:broken"), "handler.Hello", GO_BROKEN)
    failed = settle(server, function["id"])
    assert failed["status"] == "error"
    assert "undefined: notDefinedAnywhere" in failed["status_reason"] and "handler.go:4" in failed["status_reason"]
    assert "/tmp/" not in failed["status_reason"]
    resp = server.request("POST", "/v1/executions", {"function_id": function["id"], "input": {"name": "x"}})
    assert resp.status == 201, resp.text
    execution = resp.json()
    assert (execution["status"], execution["reason"]) == ("error", "build_failed"), execution
    assert "undefined: notDefinedAnywhere" in json.loads(execution["result"])["output"]
    hooked = invoke_webhook(server, function["id"], {"name": "hook"})
    assert hooked["status"] == "error" and "notDefinedAnywhere" in json.loads(hooked["result"])["output"]


def test_uploading_a_fixed_package_rebuilds(server):
    function = create(server, runtime(server, "headwater/go-runtime:fix"), "handler.Hello", GO_BROKEN)
    assert settle(server, function["id"])["status"] == "error"
    resp = server.multipart(f"/v1/functions/{function['id']}", {}, {"package": make_zip(GO_OK)}, method="PUT")
    assert resp.status == 200, resp.text
    assert resp.json()["status"] == "building"
    # An execution that arrives while the function builds waits for the build, then runs the new code.
    resp = server.request("POST", "/v1/executions", {"function_id": function["id"], "input": {"name": "fixed"}}, timeout=300)
    assert json.loads(resp.json()["result"])["output"] == "Hello from Go, fixed", resp.json()
    assert settle(server, function["id"])["status"] == "available"
    assert server.request("DELETE", f"/v1/functions/{function['id']}").status == 204


def test_a_version_keeps_its_artifact_when_the_function_gets_a_new_package(server):
    function = create(server, runtime(server, "headwater/go-runtime:versions"), "handler.Hello", GO_OK)
    early = server.request("POST", f"/v1/functions/{function['id']}/versions", {})
    assert early.status in (201, 409)  # 409 while still building: a version snapshots the artifact
    assert settle(server, function["id"])["status"] == "available"
    if early.status == 409:
        assert "building" in early.json()["faultstring"]
        assert server.request("POST", f"/v1/functions/{function['id']}/versions", {}).status == 201
    resp = server.multipart(f"/v1/functions/{function['id']}", {}, {"package": make_zip(GO_BROKEN)}, method="PUT")
    assert resp.status == 200, resp.text
    assert settle(server, function["id"])["status"] == "error"
    v1 = server.request("POST", "/v1/executions", {"function_id": function["id"], "function_version": 1, "input": {"name": "v1"}})
    assert v1.status == 201 and json.loads(v1.json()["result"])["output"] == "Hello from Go, v1", v1.text
    assert server.request("POST", f"/v1/functions/{function['id']}/versions", {}).status == 409  # nothing built to snapshot
    artifact = server.request("GET", f"/v1/functions/{function['id']}/versions/1?download=true&artifact=true")
    with zipfile.ZipFile(io.BytesIO(artifact.body)) as zf:
        assert "bootstrap" in zf.namelist()
    assert server.request("DELETE", f"/v1/functions/{function['id']}/versions/1").status == 204
    assert server.request("DELETE", f"/v1/functions/{function['id']}").status == 204


def test_php_function_has_no_build_and_a_webhook_runs_it(server):
    function = create(server, runtime(server, "headwater/php-runtime"), "hello.main", PHP_OK)
    assert function["status"] == "available"
    execution = invoke_webhook(server, function["id"], {"name": "webhook"})
    assert execution["status"] == "success", execution
    assert json.loads(execution["result"])["output"] == "Hello from PHP, webhook"
    assert "php says hello to webhook" in execution["log"]
