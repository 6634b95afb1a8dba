"""End to end, as a user runs it: `headwater serve` on embedded defaults, driven over HTTP."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.server import Server, make_zip

HELLO = '''
def main(name="World", **kwargs):
    print("Hello from the function, name=%s" % name)
    return {"greeting": "Hello, %s" % name}
'''
FAILING = '''
def main(**kwargs):
    raise ValueError("this function always fails")
'''
SLOW = '''
import time
def main(**kwargs):
    time.sleep(3600)  # longer than any request waits: a reply means the timeout cut it off
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("headwater")) as srv:
        yield srv


@pytest.fixture(scope="module")
def runtime_id(server):
    resp = server.request("POST", "/v1/runtimes", {"image": "openstackqinling/python3-runtime:0.0.2", "name": "python3"})
    assert resp.status == 201, resp.text
    return resp.json()["id"]


def create_function(server, runtime_id, source, **fields):
    form = {"runtime_id": runtime_id, "code": json.dumps({"source": "package"}), "entry": "hello.main", **fields}
    resp = server.multipart("/v1/functions", form, {"package": make_zip({"hello.py": source})})
    assert resp.status == 201, resp.text
    return resp.json()


def test_webhook_post_runs_the_function(server, runtime_id):
    function = create_function(server, runtime_id, HELLO, name="hello")
    assert function["code"]["source"] == "package" and len(function["code"]["md5sum"]) == 32
    hook = server.request("POST", "/v1/webhooks", {"function_id": function["id"], "description": "e2e"})
    assert hook.status == 201, hook.text
    webhook_url = hook.json()["webhook_url"]
    assert webhook_url == f"{server.url}/v1/webhooks/{hook.json()['id']}/invoke"

    invoked = server.request("POST", webhook_url, {"name": "Headwater"})
    assert invoked.status == 202, invoked.text
    execution_id = invoked.json()["execution_id"]
    # The execution is recorded before the 202, so it can be read at once.
    assert server.request("GET", f"/v1/executions/{execution_id}").status == 200

    execution = server.wait_execution(execution_id)
    assert execution["status"] == "success", execution
    assert json.loads(execution["result"])["output"] == {"greeting": "Hello, Headwater"}
    assert execution["description"] == f"Created by Webhook {hook.json()['id']}"
    assert execution["sync"] is False
    log = server.request("GET", f"/v1/executions/{execution_id}/log")
    assert log.status == 200 and "Hello from the function, name=Headwater" in log.text

    listed = server.request("GET", f"/v1/executions?description=has:{hook.json()['id']}").json()["executions"]
    assert [e["id"] for e in listed] == [execution_id]


def test_sync_and_async_executions_through_the_api(server, runtime_id):
    function = create_function(server, runtime_id, HELLO)
    sync = server.request("POST", "/v1/executions", {"function_id": function["id"], "input": "Qinling"})
    assert sync.status == 201 and sync.json()["status"] == "success", sync.text
    assert json.loads(sync.json()["result"])["output"] == {"greeting": "Hello, Qinling"}
    assert sync.json()["input"] == "Qinling"
    asynchronous = server.request("POST", "/v1/executions", {"function_id": function["id"], "sync": False, "input": '{"name": "async"}'})
    assert asynchronous.status == 201 and asynchronous.json()["status"] == "running"
    done = server.wait_execution(asynchronous.json()["id"])
    assert json.loads(done["result"])["output"] == {"greeting": "Hello, async"}
    downloaded = server.request("GET", f"/v1/functions/{function['id']}?download=true")
    assert downloaded.status == 200 and downloaded.headers["Content-Type"] == "application/zip"
    assert downloaded.body[:2] == b"PK"


def test_cron_job_fires_once_per_tick(server, runtime_id):
    function = create_function(server, runtime_id, HELLO)
    job = server.request("POST", "/v1/jobs", {"function_id": function["id"], "pattern": "*/1 * * * * *", "count": 3,
                                              "function_input": '{"name": "cron"}', "name": "every-second"})
    assert job.status == 201, job.text
    job_id = job.json()["id"]
    assert job.json()["status"] == "running" and job.json()["next_execution_time"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.request("GET", f"/v1/jobs/{job_id}").json()["status"] != "done":
        time.sleep(0.2)
    assert server.request("GET", f"/v1/jobs/{job_id}").json()["status"] == "done"
    time.sleep(1.5)  # quiet period: a tick fired twice would show up by now
    executions = server.request("GET", f"/v1/executions?description=has:{job_id}").json()["executions"]
    assert len(executions) == 3, executions
    for execution in executions:
        done = server.wait_execution(execution["id"])
        assert done["status"] == "success" and json.loads(done["result"])["output"] == {"greeting": "Hello, cron"}
    assert len({e["created_at"] for e in executions}) >= 2, "ticks should be spread over seconds"


@pytest.mark.parametrize("method, path, body, status, fault", [
    ("POST", "/v1/jobs", {"function_id": "FUNCTION", "pattern": "not a cron"}, 400, "pattern is not valid"),
    ("POST", "/v1/jobs", {"function_id": "FUNCTION"}, 400, "pattern or first_execution_time must be specified"),
    ("POST", "/v1/executions", {"function_id": "00000000-0000-0000-0000-000000000000"}, 404, "Function not found"),
    ("POST", "/v1/executions", {}, 400, "Either function_alias or function_id must be provided"),
    ("POST", "/v1/webhooks", {"function_id": "00000000-0000-0000-0000-000000000000"}, 404, "Function not found"),
    ("GET", "/v1/runtimes/00000000-0000-0000-0000-000000000000", None, 404, "Runtime not found"),
    ("GET", "/v1/functions/nope", None, 404, "Function not found"),
    ("POST", "/v1/webhooks/00000000-0000-0000-0000-000000000000/invoke", {}, 404, "Webhook not found"),
    ("POST", "/v1/runtimes", {"name": "no image"}, 400, "Required param is missing"),
    ("POST", "/v1/runtimes", "{not json", 400, "Malformed JSON body"),
    ("POST", "/v1/executions", "[1, 2]", 400, "must be a JSON object"),
])
def test_bad_input_gets_a_clear_4xx(server, runtime_id, method, path, body, status, fault):
    if isinstance(body, dict) and body.get("function_id") == "FUNCTION":
        body = {**body, "function_id": create_function(server, runtime_id, HELLO)["id"]}
    headers = {"Content-Type": "application/json"} if isinstance(body, str) else None
    resp = server.request(method, path, body, headers)
    assert resp.status == status, resp.text
    assert fault in resp.json()["faultstring"]
    assert server.request("GET", "/healthz").status == 200


def test_package_that_is_not_a_zip(server, runtime_id):
    resp = server.multipart("/v1/functions", {"runtime_id": runtime_id, "code": '{"source": "package"}'},
                            {"package": b"this is not a zip file"})
    assert resp.status == 400 and "not a valid ZIP" in resp.json()["faultstring"]


def test_function_with_unknown_runtime(server):
    resp = server.multipart("/v1/functions", {"runtime_id": "00000000-0000-0000-0000-000000000000",
                                              "code": '{"source": "package"}'}, {"package": make_zip({"a.py": ""})})
    assert resp.status == 404 and "Runtime not found" in resp.json()["faultstring"]


def test_failing_function_ends_failed_with_traceback(server, runtime_id):
    function = create_function(server, runtime_id, FAILING)
    resp = server.request("POST", "/v1/executions", {"function_id": function["id"]})
    assert resp.status == 201 and resp.json()["status"] == "failed"
    log = server.request("GET", f"/v1/executions/{resp.json()['id']}/log").text
    assert "Traceback" in log and "ValueError: this function always fails" in log


def test_timeout_ends_failed_with_timeout_message(server, runtime_id):
    function = create_function(server, runtime_id, SLOW, timeout="1")
    resp = server.request("POST", "/v1/executions", {"function_id": function["id"]})
    assert resp.status == 201 and resp.json()["status"] == "failed", resp.text
    assert json.loads(resp.json()["result"])["output"] == "Function execution timeout."
    assert resp.json()["reason"] == "timeout"
    # and the server still serves
    assert server.request("GET", "/healthz").status == 200


def test_metrics_are_exposed(server):
    text = server.request("GET", "/metrics").text
    for name in ("headwater_events_in_total", "headwater_executions_total", "headwater_dead_letters_total",
                 "headwater_route_latency_seconds", "headwater_execution_duration_seconds"):
        assert name in text


def test_a_sync_execution_answer_carries_its_finish_time(server, runtime_id):
    function = create_function(server, runtime_id, HELLO)
    done = server.request("POST", "/v1/executions", {"function_id": function["id"]}).json()
    assert done["status"] == "success" and done["updated_at"] is not None
    assert done["updated_at"] == server.request("GET", f"/v1/executions/{done['id']}").json()["updated_at"]
