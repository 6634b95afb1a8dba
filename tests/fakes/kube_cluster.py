"""A cluster for kubernetes engine tests: the fake API server (or a real cluster when
HEADWATER_TEST_KUBECONFIG names a kubeconfig), plus the package download endpoint pods fetch code from."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from router import download_tokens
from router.config import Config
from tests.fakes.kube_api import FakeKubernetes

KUBECONFIG = os.environ.get("HEADWATER_TEST_KUBECONFIG")
REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Cluster:
    fake: FakeKubernetes | None  # the in-process fake (None: a real cluster, or the fake in its own process)
    namespace: str
    public_url: str
    downloads: list[tuple[str, int, int]]  # (function id, version, HTTP status) of each package download
    fake_url: str | None = None  # the fake's API URL, in-process or not; None on a real cluster

    def overrides(self, data_dir: Path, **kubernetes: Any) -> dict[str, dict[str, Any]]:
        """Config overrides for an engine on this cluster."""
        kube = {"namespace": self.namespace, "replicas": 3, "worker_wait": 20, "rollout_timeout": 20, **kubernetes}
        if self.fake_url is not None:
            kube["kube_host"] = self.fake_url
        else:
            kube["kubeconfig"] = KUBECONFIG
        return {"DEFAULT": {"data_dir": str(data_dir)}, "api": {"public_url": self.public_url},
                "kubernetes": {k: v for k, v in kube.items() if v is not None}}

    def config(self, data_dir: Path, engine: dict[str, Any] | None = None, **kubernetes: Any) -> Config:
        overrides = self.overrides(data_dir, **kubernetes)
        overrides["engine"] = {"backend": "kubernetes", **(engine or {})}
        return Config.load(overrides=overrides)


def _package_app(config: Config, downloads: list) -> web.Application:
    """What the API's download route does for a pod: check the scoped token, serve the stored zip. (The
    API's own handler is another engineer's; this stands in for it so engine tests need no database.)"""
    secret = download_tokens.secret_from_config(config)
    root = Path(config.storage.file_system_dir)

    async def download(request: web.Request) -> web.StreamResponse:
        function_id = request.match_info["id"]
        version = int(request.match_info.get("version", 0))
        if not download_tokens.verify(secret, request.query.get("token"), function_id, version):
            downloads.append((function_id, version, 401))
            return web.json_response({"faultstring": "invalid or expired download token"}, status=401)
        files = sorted(root.glob(f"*/{function_id}_{version}_*.zip"), key=lambda p: p.stat().st_mtime)
        if not files:
            downloads.append((function_id, version, 404))
            return web.json_response({"faultstring": "Function not found"}, status=404)
        downloads.append((function_id, version, 200))
        return web.Response(body=files[-1].read_bytes(), content_type="application/zip")

    app = web.Application()
    app.router.add_get("/v1/functions/{id}", download)
    app.router.add_get("/v1/functions/{id}/versions/{version}", download)
    return app


@contextlib.asynccontextmanager
async def kube_cluster(data_dir: Path, *, separate_process: bool = False, probe_interval: float = 0.05) -> AsyncIterator[Cluster]:
    """A fresh namespace on the fake cluster (or on the real one), and a package server for its pods.
    `separate_process` runs the fake in a process of its own, as a real API server is (benchmarks);
    `probe_interval` caps its kubelet's probe periods (1 s or more: probes as a real kubelet runs them)."""
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(data_dir)}})
    downloads: list = []
    runner = web.AppRunner(_package_app(config, downloads), access_log=None)
    await runner.setup()
    # Pods of a real cluster must reach the package server; HEADWATER_TEST_PACKAGE_HOST names this
    # machine's address as they see it.
    bind = os.environ.get("HEADWATER_TEST_PACKAGE_HOST", "127.0.0.1") if KUBECONFIG else "127.0.0.1"
    site = web.TCPSite(runner, "0.0.0.0" if KUBECONFIG else "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake, fake_url, process = None, None, None
    if not KUBECONFIG and separate_process:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.fakes.kube_api", str(probe_interval), cwd=str(REPO),
                                                       stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        fake_url = (await process.stdout.readline()).decode().strip()
        if not fake_url.startswith("http://"):
            raise RuntimeError(f"the fake cluster process did not start (exit code {await process.wait()})")
    elif not KUBECONFIG:
        fake = FakeKubernetes(probe_interval=probe_interval)
        fake_url = await fake.start()
    namespace = f"hw-test-{uuid.uuid4().hex[:8]}"
    try:
        yield Cluster(fake=fake, namespace=namespace, public_url=f"http://{bind}:{port}", downloads=downloads, fake_url=fake_url)
    finally:
        if fake is not None:
            await fake.stop()
        elif process is not None:
            process.stdin.close()  # it stops at EOF, its pods with it
            await process.wait()
        else:
            await _delete_namespace(namespace)
        await runner.cleanup()


async def _delete_namespace(namespace: str) -> None:
    from kubernetes_asyncio import client
    from kubernetes_asyncio import config as kube_config

    configuration = client.Configuration()
    await kube_config.load_kube_config(config_file=KUBECONFIG, client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        with contextlib.suppress(Exception):
            await client.CoreV1Api(api).delete_namespace(namespace)
