"""Go and PHP functions on the Kubernetes engine (the fake cluster, or a real one), behind the real API:
a Go package is built on a pool pod (building → available, or error with the compiler's message),
pods download the built artifact with a scoped token, and a webhook runs it; PHP runs with no build."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile

from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from router.app import Headwater
from router.config import Config
from tests.fakes.kube_cluster import kube_cluster
from tests.services import require_program
from tests.unit.test_kubernetes_api import free_port, until

GO_OK = 'package handler\n\nfunc Hello(in map[string]string) (string, error) {\n\treturn "Hello from Go on Kubernetes, " + in["name"], nil\n}\n'
GO_BROKEN = "package handler\n\nfunc Hello() string {\n\treturn notDefinedAnywhere\n}\n"
PHP_OK = "<?php\nfunction main($input, $context) { return 'Hello from PHP on Kubernetes, ' . $input['name']; }\n"


def package(name: str, text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, text)
    return buf.getvalue()


async def test_go_and_php_functions_on_the_kubernetes_engine(tmp_path):
    require_program("go", "the go runtime's pods build with it")
    require_program("php", "the php runtime's pods run functions with it")
    async with kube_cluster(tmp_path / "cluster") as cluster:
        port = free_port()
        overrides = cluster.overrides(tmp_path / "hw", replicas=2)
        overrides["api"] = {"public_url": f"http://127.0.0.1:{port}"}
        overrides["engine"] = {"backend": "kubernetes"}
        app = Headwater(Config.load(overrides=overrides))
        await app.start()
        client = TestClient(TestServer(app.web, host="127.0.0.1", port=port))
        await client.start_server()
        try:
            async def runtime(image: str) -> str:
                created = await (await client.post("/v1/runtimes", json={"image": image})).json()

                async def available():
                    return (await (await client.get(f"/v1/runtimes/{created['id']}")).json())["status"] == "available"
                await until(available)
                return created["id"]

            async def function(runtime_id: str, entry: str, name: str, text: str) -> dict:
                form = FormData()
                form.add_field("runtime_id", runtime_id)
                form.add_field("code", json.dumps({"source": "package"}))
                form.add_field("entry", entry)
                form.add_field("package", package(name, text), filename="p.zip")
                resp = await client.post("/v1/functions", data=form)
                assert resp.status == 201, await resp.text()
                return await resp.json()

            async def settled(function_id: str) -> dict:
                async def done():
                    body = await (await client.get(f"/v1/functions/{function_id}")).json()
                    return body if body["status"] != "building" else None
                return await until(done, timeout=240)

            async def webhook(function_id: str, body: dict) -> dict:
                hook = await (await client.post("/v1/webhooks", json={"function_id": function_id})).json()
                resp = await client.post(f"/v1/webhooks/{hook['id']}/invoke", json=body)
                assert resp.status == 202, await resp.text()
                execution_id = (await resp.json())["execution_id"]

                async def finished():
                    row = await (await client.get(f"/v1/executions/{execution_id}")).json()
                    return row if row["status"] != "running" else None
                return await until(finished, timeout=60)

            go = await runtime("headwater/runtime-go:0.1.0")
            built = await function(go, "handler.Hello", "handler.go", GO_OK)
            assert built["status"] == "building"
            assert (await settled(built["id"]))["status"] == "available"
            run = await webhook(built["id"], {"name": "webhook"})
            assert run["status"] == "success", run
            assert json.loads(run["result"])["output"] == "Hello from Go on Kubernetes, webhook"
            # What the pod fetched: the artifact (the source and the prebuilt binary), not the source alone.
            artifact = await (await client.get(f"/v1/functions/{built['id']}?download=true&artifact=true")).read()
            with zipfile.ZipFile(io.BytesIO(artifact)) as zf:
                assert sorted(zf.namelist()) == ["bootstrap", "handler.go"]
            source = await (await client.get(f"/v1/functions/{built['id']}?download=true")).read()
            with zipfile.ZipFile(io.BytesIO(source)) as zf:
                assert zf.namelist() == ["handler.go"]

            broken = await function(go, "handler.Hello", "handler.go", GO_BROKEN)
            failed = await settled(broken["id"])
            assert failed["status"] == "error" and "undefined: notDefinedAnywhere" in failed["status_reason"], failed
            run = await webhook(broken["id"], {"name": "x"})
            assert (run["status"], run["reason"]) == ("error", "build_failed"), run
            assert "notDefinedAnywhere" in json.loads(run["result"])["output"]

            php = await runtime("headwater/runtime-php:0.1.0")
            hello = await function(php, "hello.main", "hello.php", PHP_OK)
            assert hello["status"] == "available"
            run = await webhook(hello["id"], {"name": "webhook"})
            assert run["status"] == "success", run
            assert json.loads(run["result"])["output"] == "Hello from PHP on Kubernetes, webhook"
        finally:
            await client.close()
            await app.stop()
            await asyncio.sleep(0)
