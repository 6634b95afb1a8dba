"""Functions whose code is a Swift object, against the real Swift: created after a HEAD check,
fetched when executed, fetched again when the object changes; a missing object is a clear 400."""

from __future__ import annotations

import io
import json
import urllib.request
import zipfile

from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from tests.integration.openstack.conftest import SWIFT_URL, unique

ACCOUNT = f"{SWIFT_URL}/v1/AUTH_test"


def swift_put(path: str, data: bytes = b"") -> int:
    req = urllib.request.Request(f"{ACCOUNT}/{path}", data=data, method="PUT", headers={"X-Auth-Token": "unused"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def zip_of(source: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hello.py", source)
    return buf.getvalue()


async def test_swift_function_runs_the_object_and_follows_its_changes(openstack, tmp_path):
    container = unique("code")
    assert swift_put(container) in (201, 202)
    assert swift_put(f"{container}/hello.zip", zip_of("def main(**kw):\n    return 'v1'\n")) == 201

    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "storage": {"swift_url": ACCOUNT}})
    app = Headwater(config)
    await app.start()
    client = TestClient(TestServer(app.web))
    await client.start_server()
    try:
        runtime = await (await client.post("/v1/runtimes", json={"image": "python3"})).json()
        code = {"source": "swift", "swift": {"container": container, "object": "hello.zip"}}
        resp = await client.post("/v1/functions", data={"runtime_id": runtime["id"], "code": json.dumps(code), "entry": "hello.main"})
        function = await resp.json()
        assert resp.status == 201, function
        assert function["code"] == code

        run = await (await client.post("/v1/executions", json={"function_id": function["id"]})).json()
        assert run["status"] == "success", run
        assert json.loads(run["result"])["output"] == "v1"

        # A new object version: the next execution runs it.
        assert swift_put(f"{container}/hello.zip", zip_of("def main(**kw):\n    return 'v2'\n")) == 201
        run = await (await client.post("/v1/executions", json={"function_id": function["id"]})).json()
        assert json.loads(run["result"])["output"] == "v2"

        download = await client.get(f"/v1/functions/{function['id']}?download=true")
        assert download.status == 200 and (await download.read())[:2] == b"PK"

        missing = {"source": "swift", "swift": {"container": container, "object": "nope.zip"}}
        resp = await client.post("/v1/functions", data={"runtime_id": runtime["id"], "code": json.dumps(missing)})
        assert resp.status == 400 and "Failed to validate object in Swift" in (await resp.json())["faultstring"]
    finally:
        await client.close()
        await app.stop()


async def test_swift_functions_are_refused_without_a_swift_store(tmp_path):
    app = Headwater(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))
    await app.start()
    client = TestClient(TestServer(app.web))
    await client.start_server()
    try:
        runtime = await (await client.post("/v1/runtimes", json={"image": "python3"})).json()
        code = {"source": "swift", "swift": {"container": "c", "object": "o"}}
        resp = await client.post("/v1/functions", data={"runtime_id": runtime["id"], "code": json.dumps(code)})
        assert resp.status == 400 and "no Swift store is configured" in (await resp.json())["faultstring"]
    finally:
        await client.close()
        await app.stop()
