"""The Kubernetes engine behind the real API, on the fake cluster: a runtime builds its pool
(creating → available), a package function runs on a pool pod that downloads its code from the API
with a scoped token, scale-up adds a worker, detach releases them, deleting the runtime removes its
pool."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import zipfile

from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from tests.fakes.kube_cluster import kube_cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(probe, timeout=30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


async def test_kubernetes_engine_through_the_api(tmp_path):
    async with kube_cluster(tmp_path / "cluster") as cluster:
        port = free_port()
        overrides = cluster.overrides(tmp_path / "hw")
        overrides["api"] = {"public_url": f"http://127.0.0.1:{port}"}
        overrides["engine"] = {"backend": "kubernetes"}
        app = Headwater(Config.load(overrides=overrides))
        await app.start()
        client = TestClient(TestServer(app.web, host="127.0.0.1", port=port))
        await client.start_server()
        try:
            runtime = await (await client.post("/v1/runtimes", json={"image": "headwater/runtime-python3:0.1.0"})).json()
            assert runtime["status"] == "creating"

            async def available():
                body = await (await client.get(f"/v1/runtimes/{runtime['id']}")).json()
                return body["status"] == "available"
            await until(available)
            pool = await (await client.get(f"/v1/runtimes/{runtime['id']}/pool")).json()
            assert pool["capacity"]["total"] == 3

            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr("hello.py", "def main(name='World', **kw):\n    return 'Hello, ' + name\n")
            form = FormData()
            form.add_field("runtime_id", runtime["id"])
            form.add_field("code", json.dumps({"source": "package"}))
            form.add_field("entry", "hello.main")
            form.add_field("package", buf.getvalue(), filename="p.zip")
            function = await (await client.post("/v1/functions", data=form)).json()

            run = await (await client.post("/v1/executions", json={"function_id": function["id"], "input": "Kubernetes"})).json()
            assert run["status"] == "success", (run["result"], run["reason"])
            assert json.loads(run["result"])["output"] == "Hello, Kubernetes"
            workers = (await (await client.get(f"/v1/functions/{function['id']}/workers")).json())["workers"]
            assert len(workers) == 1

            assert (await client.post(f"/v1/functions/{function['id']}/scale_up", json={"count": 1})).status == 202
            workers = (await (await client.get(f"/v1/functions/{function['id']}/workers")).json())["workers"]
            assert len(workers) == 2

            assert (await client.post(f"/v1/functions/{function['id']}/detach")).status == 202
            workers = (await (await client.get(f"/v1/functions/{function['id']}/workers")).json())["workers"]
            assert workers == []

            broken = await (await client.post("/v1/runtimes", json={"image": "example/cobol-runtime:1"})).json()

            async def settled():
                body = await (await client.get(f"/v1/runtimes/{broken['id']}")).json()
                return body["status"] if body["status"] != "creating" else None
            assert await until(settled) == "error", "an image that cannot be pulled leaves the runtime in error"

            assert (await client.delete(f"/v1/functions/{function['id']}")).status == 204
            assert (await client.delete(f"/v1/runtimes/{runtime['id']}")).status == 204
            resp = await client.get(f"/v1/runtimes/{runtime['id']}/pool")
            assert resp.status == 404
        finally:
            await client.close()
            await app.stop()
