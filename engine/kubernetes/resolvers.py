"""How the engine reaches a claimed pod: its pod IP (default, engine inside the cluster) or a NodePort
Service (engine outside the cluster) — the seam where other transports would go."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aiohttp
from kubernetes_asyncio.client.rest import ApiException

from engine.kubernetes import manifests

LOG = logging.getLogger(__name__)


class Resolver(Protocol):
    async def url(self, pod: Any) -> str:
        """The base URL of the runtime server in a claimed pod (a kubernetes_asyncio V1Pod)."""


class PodIPResolver:
    def __init__(self, port: int):
        self.port = port

    async def url(self, pod: Any) -> str:
        ip = pod.status.pod_ip
        if not ip:
            raise RuntimeError(f"pod {pod.metadata.name} has no IP yet")
        return f"http://{ip}:{self.port}"


class NodePortResolver:
    """A NodePort Service per worker, reached at a node address. The Service is owned by the pod, so
    deleting the worker removes it; it selects that one pod only (not every pod of the function)."""

    def __init__(self, core: Any, namespace: str, port: int, node_address: str | None = None, ready_timeout: float = 15.0):
        self.core = core
        self.namespace = namespace
        self.port = port
        self.node_address = node_address
        self.ready_timeout = ready_timeout

    async def _address(self) -> str:
        if self.node_address:
            return self.node_address
        nodes = await self.core.list_node()
        for kind in ("ExternalIP", "InternalIP"):
            for node in nodes.items:
                for addr in node.status.addresses or []:
                    if addr.type == kind:
                        self.node_address = addr.address
                        return addr.address
        raise RuntimeError("no node has an ExternalIP or InternalIP address")

    async def url(self, pod: Any) -> str:
        body = manifests.worker_service({"metadata": {"name": pod.metadata.name, "uid": pod.metadata.uid,
                                                      "labels": pod.metadata.labels or {}}}, self.port)
        try:
            service = await self.core.create_namespaced_service(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            service = await self.core.read_namespaced_service(body["metadata"]["name"], self.namespace)
        url = f"http://{await self._address()}:{service.spec.ports[0].node_port}"
        # kube-proxy programs the node port asynchronously: wait until it answers.
        deadline = asyncio.get_running_loop().time() + self.ready_timeout
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url + "/ping", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return url
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"NodePort service {body['metadata']['name']} at {url} did not answer")
                await asyncio.sleep(0.1)
