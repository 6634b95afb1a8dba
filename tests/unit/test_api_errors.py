"""Every error case of the Qinling v1 API reference, table-driven: status code and JSON error body."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import uuid

import pytest
import pytest_asyncio
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from tests.e2e.server import make_zip

pytestmark = pytest.mark.asyncio(loop_scope="module")


def zip_bytes(text: str = "def main(**kw):\n    return kw\n") -> bytes:
    return make_zip({"main.py": text})


class Form:
    """A multipart body: fields, plus an optional package part."""

    def __init__(self, package: bytes | None = None, **fields):
        self.package = package
        self.fields = fields

    def build(self, world: dict) -> FormData:
        form = FormData()
        for key, value in self.fields.items():
            form.add_field(key, _template(value, world))
        if self.package is not None:
            form.add_field("package", self.package, filename="p.zip", content_type="application/zip")
        return form


def _template(text: str, world: dict) -> str:
    """`{name}` placeholders filled from the world's ids; other braces (JSON) left alone."""
    return re.sub(r"\{(\w+)\}", lambda m: str(world.get(m.group(1), m.group(0))), text)


def code(source: str = "package", **extra) -> str:
    return json.dumps({"source": source, **extra})


def later(minutes: float = 5) -> str:
    return (_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M:%S")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory):
    """One server with an object in every state the error cases need."""
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path_factory.mktemp("api-errors"))},
                                    "engine": {"backend": "null"}})
    app = Headwater(config)
    await app.start()
    client = TestClient(TestServer(app.web))
    await client.start_server()

    async def call(method, path, body=None):
        kwargs = {"data": body.build({})} if isinstance(body, Form) else {"json": body}
        resp = await client.request(method, path, **kwargs)
        assert resp.status in (200, 201, 202, 204), (method, path, resp.status, await resp.text())
        return await resp.json() if resp.status in (200, 201) else None

    async def function(package: bytes | None = None) -> str:
        fn = await call("POST", "/v1/functions", Form(package or zip_bytes(), runtime_id=rid, code=code()))
        return fn["id"]

    async def new_version(function_id: str, n: int) -> None:
        await call("PUT", f"/v1/functions/{function_id}", Form(zip_bytes(f"# v{n}\ndef main(**kw): pass\n")))
        await call("POST", f"/v1/functions/{function_id}/versions", {})

    rid = (await call("POST", "/v1/runtimes", {"image": "python3"}))["id"]
    w = {"rid": rid, "uuid": str(uuid.uuid4()), "later": later(), "soon": later(0.5)}
    w["fid"] = await function()
    w["md5"] = hashlib.md5(zip_bytes()).hexdigest()
    w["img"] = (await call("POST", "/v1/functions", {"code": {"source": "image", "image": "busybox"}}))["id"]
    # A function whose only version has the current package (a second version is "not changed").
    w["fver"] = await function()
    await call("POST", f"/v1/functions/{w['fver']}/versions", {})
    # Versions 1, 2, 3 used by an alias, a webhook and a job respectively.
    w["fused"] = await function()
    for n in (1, 2, 3):
        await new_version(w["fused"], n)
    await call("POST", "/v1/aliases", {"name": "uses-v1", "function_id": w["fused"], "function_version": 1})
    await call("POST", "/v1/webhooks", {"function_id": w["fused"], "function_version": 2})
    await call("POST", "/v1/jobs", {"function_id": w["fused"], "function_version": 3, "pattern": "0 0 1 1 *"})
    # Functions held by a running job, a webhook, an alias.
    w["fjob"] = await function()
    await call("POST", "/v1/jobs", {"function_id": w["fjob"], "pattern": "0 0 1 1 *"})
    w["fhook"] = await function()
    w["hook"] = (await call("POST", "/v1/webhooks", {"function_id": w["fhook"]}))["id"]
    w["falias"] = await function()
    await call("POST", "/v1/aliases", {"name": "taken", "function_id": w["falias"]})
    # Ten versions: the most there may be.
    w["ffull"] = await function()
    for n in range(1, 11):
        await new_version(w["ffull"], n)
    # Jobs: a one-shot one, a recurring one, a cancelled one.
    w["once"] = (await call("POST", "/v1/jobs", {"function_id": w["fid"], "first_execution_time": w["later"]}))["id"]
    w["cron"] = (await call("POST", "/v1/jobs", {"function_id": w["fid"], "pattern": "0 0 1 1 *"}))["id"]
    w["cancelled"] = (await call("POST", "/v1/jobs", {"function_id": w["fid"], "pattern": "0 0 1 1 *"}))["id"]
    await call("PUT", f"/v1/jobs/{w['cancelled']}", {"status": "cancelled"})
    # A runtime in state `error` with a function on it.
    w["rdown"] = (await call("POST", "/v1/runtimes", {"image": "python3"}))["id"]
    rid_saved, rid = rid, w["rdown"]
    w["fdown"] = await function()
    rid = rid_saved
    await app.store.runtimes.update(w["rdown"], {"status": "error"})
    app.executions.targets.clear()

    w["_client"] = client
    yield w
    await client.close()
    await app.stop()


# (case id, method, path, body, status, words the faultstring contains)
CASES = [
    # -- runtimes ----------------------------------------------------------------------------------
    ("runtime-missing-image", "POST", "/v1/runtimes", {"name": "x"}, 400, "Required param is missing. Required: {'image'}"),
    ("runtime-image-not-string", "POST", "/v1/runtimes", {"image": 5}, 400, "image"),
    ("runtime-bad-is-public", "POST", "/v1/runtimes", {"image": "i", "is_public": "maybe"}, 400, "is_public"),
    ("runtime-malformed-json", "POST", "/v1/runtimes", b"{not json", 400, "Malformed JSON"),
    ("runtime-body-not-object", "POST", "/v1/runtimes", [1, 2], 400, "JSON object"),
    ("runtime-list-unknown-filter", "GET", "/v1/runtimes?colour=red", None, 400, "Unknown argument"),
    ("runtime-show-not-uuid", "GET", "/v1/runtimes/nope", None, 400, "Expected a uuid but received nope."),
    ("runtime-show-unknown", "GET", "/v1/runtimes/{uuid}", None, 404, "Runtime not found"),
    ("runtime-delete-unknown", "DELETE", "/v1/runtimes/{uuid}", None, 404, "not found"),
    ("runtime-delete-in-use", "DELETE", "/v1/runtimes/{rid}", None, 403, "is still in use"),
    ("runtime-update-unavailable-image", "PUT", "/v1/runtimes/{rdown}", {"image": "python4"}, 409, "is not available"),
    ("runtime-update-bad-name", "PUT", "/v1/runtimes/{rid}", {"name": ["x"]}, 400, "name"),
    ("runtime-pool-unknown", "GET", "/v1/runtimes/{uuid}/pool", None, 404, "not found"),
    # -- functions: create -------------------------------------------------------------------------
    ("function-missing-code", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}"), 400,
     "Required param is missing. Required: {'code'}"),
    ("function-code-not-json", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}", code="{oops"), 400,
     "code must be a JSON object"),
    ("function-bad-source", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}", code=code("ftp")), 400,
     "Invalid code source specified, available sources: package, swift, image"),
    ("function-no-runtime", "POST", "/v1/functions", Form(zip_bytes(), code=code()), 400, '"runtime_id" must be specified.'),
    ("function-unknown-runtime", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{uuid}", code=code()), 404,
     "Runtime not found"),
    ("function-runtime-unavailable", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rdown}", code=code()), 400,
     "is not available"),
    ("function-no-package", "POST", "/v1/functions", Form(runtime_id="{rid}", code=code()), 400, "Package is required"),
    ("function-not-a-zip", "POST", "/v1/functions", Form(b"plain text", runtime_id="{rid}", code=code()), 400,
     "Package is not a valid ZIP package."),
    ("function-md5-mismatch", "POST", "/v1/functions",
     Form(zip_bytes(), runtime_id="{rid}", code=code(md5sum="0" * 32)), 400, "Package md5 mismatch."),
    ("function-cpu-low", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}", code=code(), cpu="99"), 400,
     "cpu resource limitation not within the allowable range: 100 ~ 300(millicpu)."),
    ("function-cpu-high", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}", code=code(), cpu="301"), 400,
     "100 ~ 300(millicpu)"),
    ("function-cpu-not-int", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}", code=code(), cpu="lots"), 400,
     "not an integer"),
    ("function-memory-low", "POST", "/v1/functions",
     Form(zip_bytes(), runtime_id="{rid}", code=code(), memory_size="1024"), 400,
     "memory resource limitation not within the allowable range: 33554432 ~ 134217728(bytes)."),
    ("function-memory-high", "POST", "/v1/functions",
     Form(zip_bytes(), runtime_id="{rid}", code=code(), memory_size="134217729"), 400, "memory resource limitation"),
    ("function-timeout-low", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}", code=code(), timeout="0"),
     400, "timeout resource limitation not within the allowable range: 1 ~ 300(seconds)."),
    ("function-timeout-high", "POST", "/v1/functions", Form(zip_bytes(), runtime_id="{rid}", code=code(), timeout="301"),
     400, "timeout resource limitation"),
    ("function-swift-incomplete", "POST", "/v1/functions",
     Form(runtime_id="{rid}", code=code("swift", swift={"container": "c"})), 400,
     "Both container and object must be provided for swift type function."),
    ("function-swift-unconfigured", "POST", "/v1/functions",
     Form(runtime_id="{rid}", code=code("swift", swift={"container": "c", "object": "o"})), 400, "Swift object not supported"),
    ("function-image-missing", "POST", "/v1/functions", {"code": {"source": "image"}}, 400, "Image must be provided"),
    ("function-name-too-long", "POST", "/v1/functions", {"code": {"source": "image", "image": "i"}, "name": "n" * 256},
     400, "longer than 255"),
    # -- functions: read, update, delete -----------------------------------------------------------
    ("function-show-unknown", "GET", "/v1/functions/{uuid}", None, 404, "Function not found [id="),
    ("function-download-image", "GET", "/v1/functions/{img}?download=true", None, 405,
     "Download image function is not allowed."),
    ("function-list-unknown-filter", "GET", "/v1/functions?colour=red", None, 400, "Unknown argument"),
    ("function-update-unknown", "PUT", "/v1/functions/{uuid}", {"name": "x"}, 404, "not found"),
    ("function-update-type", "PUT", "/v1/functions/{fver}", {"code": {"source": "image", "image": "x"}}, 400,
     "The function code type can not be changed."),
    ("function-update-image-code", "PUT", "/v1/functions/{img}", {"code": {"source": "image", "image": "y"}}, 400,
     "The image type function code can not be changed."),
    ("function-update-same-md5", "PUT", "/v1/functions/{fver}", Form(zip_bytes(), code=code(md5sum="{md5}")), 400,
     "The function code checksum is not changed."),
    ("function-update-md5-mismatch", "PUT", "/v1/functions/{fver}",
     Form(zip_bytes("# other\n"), code=code(md5sum="1" * 32)), 400, "Package md5 mismatch."),
    ("function-update-not-zip", "PUT", "/v1/functions/{fver}", Form(b"nope", source="package"), 400, "not a valid ZIP"),
    ("function-update-package-missing", "PUT", "/v1/functions/{fver}", {"code": {"source": "package"}}, 400,
     "Package is required"),
    ("function-update-timeout", "PUT", "/v1/functions/{fid}", {"timeout": 301}, 400, "timeout resource limitation"),
    ("function-update-cpu", "PUT", "/v1/functions/{fid}", {"cpu": 1000}, 400, "cpu resource limitation"),
    ("function-update-with-job", "PUT", "/v1/functions/{fjob}", Form(zip_bytes("# new\n")), 403,
     "still associated with running job(s)"),
    ("function-delete-job", "DELETE", "/v1/functions/{fjob}", None, 403,
     "The function is still associated with running job(s)."),
    ("function-delete-webhook", "DELETE", "/v1/functions/{fhook}", None, 403,
     "The function is still associated with webhook(s)."),
    ("function-delete-alias", "DELETE", "/v1/functions/{falias}", None, 403,
     "The function is still associated with function alias(es)."),
    ("function-delete-unknown", "DELETE", "/v1/functions/{uuid}", None, 404, "not found"),
    ("function-scale-no-count", "POST", "/v1/functions/{fid}/scale_up", {}, 400, "Required: {'count'}"),
    ("function-scale-zero", "POST", "/v1/functions/{fid}/scale_down", {"count": 0}, 400, "positive"),
    ("function-scale-unknown", "POST", "/v1/functions/{uuid}/scale_up", {"count": 1}, 404, "not found"),
    ("function-detach-unknown", "POST", "/v1/functions/{uuid}/detach", None, 404, "not found"),
    ("function-workers-unknown", "GET", "/v1/functions/{uuid}/workers", None, 404, "not found"),
    # -- versions ----------------------------------------------------------------------------------
    ("version-image-function", "POST", "/v1/functions/{img}/versions", {}, 403,
     "Function versioning only allowed for package type function."),
    ("version-unchanged", "POST", "/v1/functions/{fver}/versions", {}, 403,
     "Function package not changed since the latest version 1."),
    ("version-limit", "POST", "/v1/functions/{ffull}/versions", {}, 403, "Can not exceed maximum number(10) of versions"),
    ("version-unknown-function", "POST", "/v1/functions/{uuid}/versions", {}, 404, "not found"),
    ("version-show-unknown", "GET", "/v1/functions/{fver}/versions/7", None, 404, "FunctionVersion not found"),
    ("version-show-not-number", "GET", "/v1/functions/{fver}/versions/latest", None, 400, "not an integer"),
    ("version-delete-alias", "DELETE", "/v1/functions/{fused}/versions/1", None, 403, "function alias(es)"),
    ("version-delete-webhook", "DELETE", "/v1/functions/{fused}/versions/2", None, 403, "webhook(s)"),
    ("version-delete-job", "DELETE", "/v1/functions/{fused}/versions/3", None, 403, "running job(s)"),
    ("version-scale-unknown", "POST", "/v1/functions/{fver}/versions/9/scale_up", {"count": 1}, 404, "not found"),
    # -- aliases -----------------------------------------------------------------------------------
    ("alias-missing-params", "POST", "/v1/aliases", {"description": "x"}, 400, "Required param is missing"),
    ("alias-unknown-function", "POST", "/v1/aliases", {"name": "a", "function_id": "{uuid}"}, 404, "Function not found"),
    ("alias-unknown-version", "POST", "/v1/aliases", {"name": "a", "function_id": "{fid}", "function_version": 4}, 404,
     "FunctionVersion not found"),
    ("alias-duplicate-name", "POST", "/v1/aliases", {"name": "taken", "function_id": "{fver}"}, 400,
     "Duplicate entry for function_aliases"),
    ("alias-duplicate-target", "POST", "/v1/aliases", {"name": "again", "function_id": "{falias}"}, 400,
     "Duplicate entry for function_aliases"),
    ("alias-show-unknown", "GET", "/v1/aliases/nothing", None, 404, "FunctionAlias not found [name=nothing]"),
    ("alias-update-unknown-version", "PUT", "/v1/aliases/taken", {"function_version": 5}, 404, "not found"),
    ("alias-delete-unknown", "DELETE", "/v1/aliases/nothing", None, 404, "FunctionAlias not found"),
    # -- executions --------------------------------------------------------------------------------
    ("execution-no-target", "POST", "/v1/executions", {"input": "x"}, 400,
     "Either function_alias or function_id must be provided."),
    ("execution-unknown-function", "POST", "/v1/executions", {"function_id": "{uuid}"}, 404, "Function not found"),
    ("execution-unknown-alias", "POST", "/v1/executions", {"function_alias": "ghost"}, 404, "FunctionAlias not found"),
    ("execution-unknown-version", "POST", "/v1/executions", {"function_id": "{fid}", "function_version": 3}, 404,
     "FunctionVersion not found"),
    ("execution-version-of-image", "POST", "/v1/executions", {"function_id": "{img}", "function_version": 1}, 400,
     "non-package"),
    ("execution-runtime-unavailable", "POST", "/v1/executions", {"function_id": "{fdown}"}, 409, "is not available"),
    ("execution-bad-sync", "POST", "/v1/executions", {"function_id": "{fid}", "sync": "sometimes"}, 400, "sync"),
    ("execution-bad-version", "POST", "/v1/executions", {"function_id": "{fid}", "function_version": "one"}, 400,
     "not an integer"),
    ("execution-show-unknown", "GET", "/v1/executions/{uuid}", None, 404, "Execution not found"),
    ("execution-log-unknown", "GET", "/v1/executions/{uuid}/log", None, 404, "Execution not found"),
    ("execution-delete-unknown", "DELETE", "/v1/executions/{uuid}", None, 404, "Execution not found"),
    ("execution-list-unknown-filter", "GET", "/v1/executions?colour=red", None, 400, "Unknown argument"),
    ("execution-list-bad-number", "GET", "/v1/executions?function_version=gt:abc", None, 400, "expects an integer"),
    # -- jobs --------------------------------------------------------------------------------------
    ("job-no-schedule", "POST", "/v1/jobs", {"function_id": "{fid}"}, 400, "pattern or first_execution_time must be specified."),
    ("job-too-soon", "POST", "/v1/jobs", {"function_id": "{fid}", "first_execution_time": "{soon}"}, 400,
     "Execution time must be at least 1 minute in the future."),
    ("job-count-without-pattern", "POST", "/v1/jobs", {"function_id": "{fid}", "first_execution_time": "{later}",
                                                        "count": 2}, 400, "pattern must be provided if count is greater than 1."),
    ("job-bad-pattern", "POST", "/v1/jobs", {"function_id": "{fid}", "pattern": "every tuesday"}, 400,
     "The specified pattern is not valid"),
    ("job-bad-time", "POST", "/v1/jobs", {"function_id": "{fid}", "first_execution_time": "tomorrow"}, 400,
     "Invalid first_execution_time"),
    ("job-no-target", "POST", "/v1/jobs", {"pattern": "* * * * *"}, 400, "Either function_alias or function_id"),
    ("job-unknown-function", "POST", "/v1/jobs", {"function_id": "{uuid}", "pattern": "* * * * *"}, 404, "not found"),
    ("job-unknown-alias", "POST", "/v1/jobs", {"function_alias": "ghost", "pattern": "* * * * *"}, 404, "not found"),
    ("job-unknown-version", "POST", "/v1/jobs", {"function_id": "{fid}", "function_version": 2, "pattern": "* * * * *"},
     404, "FunctionVersion not found"),
    ("job-update-finished", "PUT", "/v1/jobs/{cancelled}", {"name": "again"}, 400, "Can not update a finished job."),
    ("job-update-done-status", "PUT", "/v1/jobs/{cron}", {"status": "done"}, 400, "Invalid status."),
    ("job-update-bogus-status", "PUT", "/v1/jobs/{cron}", {"status": "sleeping"}, 400, "Invalid status."),
    ("job-update-add-pattern", "PUT", "/v1/jobs/{once}", {"pattern": "* * * * *"}, 400, "Can not change job type."),
    ("job-update-clear-pattern", "PUT", "/v1/jobs/{cron}", {"pattern": ""}, 400, "Can not change job type."),
    ("job-update-bad-pattern", "PUT", "/v1/jobs/{cron}", {"pattern": "0 0 31 2 *"}, 400, "The specified pattern is not valid"),
    ("job-update-next-too-soon", "PUT", "/v1/jobs/{cron}", {"next_execution_time": "{soon}"}, 400,
     "at least 1 minute in the future"),
    ("job-show-unknown", "GET", "/v1/jobs/{uuid}", None, 404, "not found"),
    ("job-show-webhook-id", "GET", "/v1/jobs/{hook}", None, 404, "Job not found"),
    ("job-delete-unknown", "DELETE", "/v1/jobs/{uuid}", None, 404, "not found"),
    # -- webhooks ----------------------------------------------------------------------------------
    ("webhook-no-target", "POST", "/v1/webhooks", {"description": "x"}, 400, "Either function_alias or function_id"),
    ("webhook-unknown-function", "POST", "/v1/webhooks", {"function_id": "{uuid}"}, 404, "Function not found"),
    ("webhook-unknown-version", "POST", "/v1/webhooks", {"function_id": "{fid}", "function_version": 9}, 404,
     "FunctionVersion not found"),
    ("webhook-unknown-alias", "POST", "/v1/webhooks", {"function_alias": "ghost"}, 404, "FunctionAlias not found"),
    ("webhook-negative-version", "POST", "/v1/webhooks", {"function_id": "{fid}", "function_version": -1}, 400, "negative"),
    ("webhook-update-unknown-function", "PUT", "/v1/webhooks/{hook}", {"function_id": "{uuid}"}, 404, "not found"),
    ("webhook-update-bad-description", "PUT", "/v1/webhooks/{hook}", {"description": 7}, 400, "description"),
    ("webhook-show-unknown", "GET", "/v1/webhooks/{uuid}", None, 404, "not found"),
    ("webhook-show-job-id", "GET", "/v1/webhooks/{cron}", None, 404, "Webhook not found"),
    ("webhook-delete-unknown", "DELETE", "/v1/webhooks/{uuid}", None, 404, "not found"),
    ("webhook-invoke-unknown", "POST", "/v1/webhooks/{uuid}/invoke", {"a": 1}, 404, "Webhook not found"),
    ("webhook-invoke-malformed", "POST", "/v1/webhooks/{hook}/invoke", b"{oops", 400, "Malformed JSON"),
]


@pytest.mark.parametrize("case_id, method, path, body, status, fault", CASES, ids=[c[0] for c in CASES])
async def test_error_case(world, case_id, method, path, body, status, fault):
    client = world["_client"]
    url = path.format(**world)
    if isinstance(body, Form):
        kwargs = {"data": body.build(world)}
    elif isinstance(body, bytes):
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}}
    elif body is None:
        kwargs = {}
    else:
        kwargs = {"json": _fill(body, world)}
    resp = await client.request(method, url, **kwargs)
    text = await resp.text()
    assert resp.status == status, f"{case_id}: {resp.status} {text}"
    assert resp.content_type == "application/json", text
    error = json.loads(text)
    assert set(error) == {"faultcode", "faultstring", "debuginfo"}, error
    assert error["faultcode"] == ("Client" if status < 500 else "Server")
    assert fault in error["faultstring"], f"{case_id}: {error['faultstring']!r} lacks {fault!r}"


def _fill(value, world):
    """Put the world's ids into a JSON body's strings."""
    if isinstance(value, str):
        return _template(value, world)
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, world) for v in value]
    return value


async def test_refused_requests_changed_nothing(world):
    """The refusals above left every object in place."""
    client = world["_client"]
    for path in ("/v1/functions/{fjob}", "/v1/functions/{fhook}", "/v1/functions/{falias}", "/v1/runtimes/{rid}",
                 "/v1/functions/{fused}/versions/1", "/v1/functions/{fused}/versions/2", "/v1/jobs/{cancelled}"):
        assert (await client.get(path.format(**world))).status == 200, path
    versions = await (await client.get(f"/v1/functions/{world['ffull']}/versions")).json()
    assert [v["version_number"] for v in versions["function_versions"]] == list(range(1, 11))
    job = await (await client.get(f"/v1/jobs/{world['cancelled']}")).json()
    assert job["status"] == "cancelled" and job["name"] is None
