"""KubernetesEngine: runs package functions on warm runtime pods claimed from per-runtime pools, and image
functions in a pod per execution; workers are shared between engine processes through engine.coordination."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import random
import re
import socket
import time
import uuid
from typing import Any, ClassVar

import aiohttp
import orjson
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import ApiException

from engine.coordination import CoordinationError, Coordinator, LockTimeout, coordinator_from_config
from engine.kubernetes import manifests
from engine.kubernetes.client import api_client
from engine.kubernetes.manifests import (A_CLAIMED_AT, L_ENGINE, L_FUNCTION, L_POOL, L_RUNTIME, L_VERSION,
                                         L_WORKER, label_value)
from engine.kubernetes.resolvers import NodePortResolver, PodIPResolver, Resolver
from engine.runtime_client import CANCEL_TIMEOUT, pool_runtime_token, post_build, post_cancel, runtime_headers
from router import download_tokens
from router.config import Config, ConfigError
from router.plugins import BuildResult, ExecutionRequest, ExecutionResult, FunctionSpec, PackageStore

LOG = logging.getLogger(__name__)

HTTP_MARGIN = 30.0  # beyond the function's timeout: package download + import on a cold pod
WORKER_CACHE_SECONDS = 1.0  # how long a function's worker list read from coordination is reused
PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                 "CreateContainerError", "RunContainerError")
# A container whose command cannot be run (no such executable, bad entrypoint): no restart will help.
START_FAILURES = ("StartError", "ContainerCannotRun")
# Context keys a runtime may see. Never the caller's token or a service credential (Qinling sent both).
CONTEXT_KEYS = ("execution_id", "function_id", "function_version", "project_id", "event_id")


class NoWorkers(RuntimeError):
    """No pool pod became available in time."""


class PoolBroken(RuntimeError):
    """The runtime's pool cannot produce a pod (e.g. its image cannot be pulled)."""


class WorkerGone(RuntimeError):
    """A claimed worker could not be reached: it is dropped and the execution retried once."""


@dataclasses.dataclass(eq=False)
class Worker:
    pod: str
    url: str
    function_id: str
    version: int
    engine: str


@dataclasses.dataclass
class Load:
    """Executions of one function version running through this engine right now."""

    running: int = 0


def _engine_id() -> str:
    host = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower())[:30].strip("-") or "engine"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None or (pod.status.phase or "") != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _waiting_problem(pod: Any) -> str | None:
    """Why a pod's container cannot run, when the kubelet says it cannot (pull or start failures,
    a crash loop), with the failure behind it; None while it is merely starting."""
    for status in pod.status.container_statuses or []:
        state, last = status.state, status.last_state
        waiting = state.waiting if state else None
        terminated = (state.terminated if state else None) or (last.terminated if last else None)
        if waiting is not None and waiting.reason in PULL_FAILURES:
            return f"{waiting.reason}: {waiting.message or ''}".strip()
        if terminated is not None and terminated.reason in START_FAILURES:
            return f"{terminated.reason}: {terminated.message or f'exit code {terminated.exit_code}'}"
        if waiting is not None and waiting.reason == "CrashLoopBackOff":
            cause = f" after {terminated.reason} (exit code {terminated.exit_code})" if terminated else ""
            return f"CrashLoopBackOff: the runtime server keeps exiting{cause}"
    return None


class KubernetesEngine:
    name: ClassVar[str] = "kubernetes"

    def __init__(self, config: Config, packages: PackageStore, *, coordinator: Coordinator | None = None) -> None:
        self.config = config
        self.packages = packages
        self.options = config.kubernetes
        self.namespace = self.options.namespace
        self.port = self.options.runtime_port
        self.concurrency = config.engine.function_concurrency
        self.expiration = config.engine.function_service_expiration
        self.engine_id = coordinator.engine_id if coordinator else _engine_id()
        # A coordinator handed in is the process's (Headwater starts and stops it); else our own.
        self._own_coordinator = coordinator is None
        self.coordinator = coordinator or coordinator_from_config(config, self.engine_id)
        self.api: client.ApiClient | None = None
        self.core: Any = None
        self.apps: Any = None
        self.resolver: Resolver | None = None
        self._secret = download_tokens.secret_from_config(config)
        self._runtime_headers = runtime_headers(pool_runtime_token(self._secret))
        self._session: aiohttp.ClientSession | None = None
        self._loads: dict[tuple[str, int], Load] = {}
        self._inflight: dict[str, int] = {}  # pod → executions this engine has on it
        self._last_used: dict[str, float] = {}  # pod → monotonic time this engine last used it
        self._owned: dict[str, tuple[str, int]] = {}  # pods this engine claimed → (function, version)
        self._cache: dict[tuple[str, int], tuple[float, dict[str, Worker]]] = {}
        self._others_cache: dict[tuple[str, int], tuple[float, int]] = {}
        self._reported: dict[tuple[str, int], int] = {}  # what the other engines last heard of our load
        self._publishers: dict[tuple[str, int], asyncio.Task] = {}
        self._pools: dict[str, str] = {}  # runtime id → image the pool runs, as far as this engine knows
        # runtime id → its ready unclaimed pods as a watch last showed them: a claim is then one PATCH
        # (no LIST first); a stale entry costs a 409 and the next pod, never a wrong claim.
        self._ready_pods: dict[str, dict[str, Any]] = {}
        self._pool_watchers: dict[str, asyncio.Task] = {}
        self._pool_locks: dict[str, asyncio.Lock] = {}
        self._updating: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._cleanups: set[asyncio.Task] = set()

    # -----------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        self.api = await api_client(self.options)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        if self.options.resolver == "nodeport":
            self.resolver = NodePortResolver(self.core, self.namespace, self.port, self.options.node_address)
        else:
            self.resolver = PodIPResolver(self.port)
        try:
            await self._ensure_namespace()
        except BaseException as exc:
            host = self.api.configuration.host
            await self.api.close()  # nothing else holds the client: close it, or its session leaks
            self.api = None
            if isinstance(exc, ApiException) and exc.status == 401:
                raise ConfigError(f"the Kubernetes API at {host} refused Headwater's credentials (401 Unauthorized): "
                                  "check [kubernetes] cert_file and key_file, kubeconfig, or the pod's service account") from None
            if isinstance(exc, (aiohttp.ClientError, OSError)):
                raise ConfigError(f"the Kubernetes API at {host} cannot be reached: {exc}") from None
            raise
        if self._own_coordinator:
            await self.coordinator.start()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
        self._tasks = [asyncio.create_task(self._reap(), name="kubernetes-engine-reaper")]
        LOG.info("kubernetes engine %s started in namespace %s", self.engine_id, self.namespace)

    async def stop(self) -> None:
        if self._cleanups:
            await asyncio.wait(list(self._cleanups), timeout=CANCEL_TIMEOUT)
        pending = self._tasks + list(self._background) + list(self._cleanups) + list(self._publishers.values())
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        # Workers this engine claimed go with it: without its lease nobody would route to them.
        owned = list(self._owned)
        if owned and self.core is not None:
            await asyncio.gather(*(self._drop_worker(pod, reason="engine stopping") for pod in owned), return_exceptions=True)
        if self._own_coordinator:
            with contextlib.suppress(Exception):
                await self.coordinator.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.api is not None:
            await self.api.close()
            self.api = None

    async def _ensure_namespace(self) -> None:
        try:
            await self.core.read_namespace(self.namespace)
            return
        except ApiException as exc:
            if exc.status == 403:
                return  # least-privilege RBAC: the namespace is made by the operator
            if exc.status != 404:
                raise
        with contextlib.suppress(ApiException):
            await self.core.create_namespace({"metadata": {"name": self.namespace, "labels": {manifests.MANAGED_BY: "headwater"}}})

    # -----------------------------------------------------------------------------------------
    # Executions

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        fn = request.function
        if (fn.code or {}).get("source") == "image":
            return await self._run_image(request)
        if not fn.runtime_id or not fn.runtime_image:
            return ExecutionResult.platform_error(f"Function {fn.id} has no runtime.")
        if fn.package is None:
            return ExecutionResult.platform_error(f"Function {fn.id} version {fn.version} has no code package.")
        extra = {"execution_id": request.execution_id, "event_id": request.event_id}
        key = (fn.id, fn.version)
        load = self._loads.setdefault(key, Load())
        load.running += 1
        self._load_changed(key)
        try:
            for attempt in (1, 2):
                try:
                    worker = await self._acquire(fn, load)
                except PoolBroken as exc:
                    return ExecutionResult.platform_error(str(exc))
                except (NoWorkers, LockTimeout) as exc:
                    return ExecutionResult.platform_error(f"Not enough workers available: {exc}", reason="busy")
                except (CoordinationError, ApiException, aiohttp.ClientError, OSError) as exc:
                    LOG.error("cannot get a worker for function %s: %s", fn.id, exc, extra=extra)
                    return ExecutionResult.platform_error(f"Function execution failed: {exc}")
                try:
                    return await self._post(worker, self._body(request), fn.timeout or self.config.resource_limits.default_timeout, extra)
                except WorkerGone as exc:
                    LOG.warning("worker %s unreachable (%s); dropping it", worker.pod, exc, extra=extra)
                    await self._drop_worker(worker.pod, reason="unreachable")
                    if attempt == 2:
                        return ExecutionResult.platform_error(f"Runtime worker {worker.pod} unreachable: {exc}")
            raise AssertionError("unreachable")
        finally:
            load.running -= 1
            self._load_changed(key)

    def _runtime_env(self) -> dict[str, str]:
        """What a pool pod's runtime server is told: its credential, and the only URL packages come from."""
        return {"HEADWATER_RUNTIME_TOKEN": pool_runtime_token(self._secret),
                "HEADWATER_RUNTIME_PACKAGE_URLS": f"{self.config.api.public_url}/v1/functions/"}

    def _package(self, fn: FunctionSpec) -> dict[str, Any]:
        """Where a pod downloads the function's package: the API, with a scoped token; `artifact=true`
        asks for the built artifact (a compiled runtime) instead of the uploaded source."""
        token = download_tokens.issue(self._secret, fn.id, fn.version, self.config.engine.download_token_ttl)
        path = f"/v1/functions/{fn.id}" + (f"/versions/{fn.version}" if fn.version else "")
        code = fn.code or {}
        artifact = "&artifact=true" if code.get("build") and fn.package.md5sum != code.get("md5sum") else ""
        return {"download_url": f"{self.config.api.public_url}{path}?download=true{artifact}&token={token}",
                "md5sum": fn.package.md5sum, "function_id": fn.id, "version": fn.version}

    async def build(self, function: FunctionSpec) -> BuildResult:
        """Compile a function's package on one of its runtime pool's pods (POST /build, the compiler
        contained like an execution there); that pod stays the function's warm worker."""
        extra = {"function_id": function.id, "function_version": function.version}
        if not function.runtime_id or not function.runtime_image or function.package is None:
            return BuildResult(False, message=f"Function {function.id} has no runtime or package to build.")
        key = (function.id, function.version)
        load = self._loads.setdefault(key, Load())
        load.running += 1
        try:
            try:
                worker = await self._acquire(function, load)
            except (PoolBroken, NoWorkers, LockTimeout, CoordinationError, ApiException, aiohttp.ClientError, OSError) as exc:
                LOG.error("no worker to build function %s: %s", function.id, exc, extra=extra)
                return BuildResult(False, message=f"No runtime worker to build the function: {exc}")
            timeout = self.config.engine.build_timeout
            body = {"execution_id": f"build-{function.id}-{function.version}", "timeout": timeout,
                    "package": self._package(function), "limits": {"memory_size": function.memory_size}}
            return await post_build(self._session, worker.url, body, timeout + HTTP_MARGIN, worker=worker.pod,
                                    runtime=function.runtime_image, extra=extra, headers=self._runtime_headers)
        finally:
            load.running -= 1

    def _body(self, request: ExecutionRequest) -> dict[str, Any]:
        fn = request.function
        context = {k: v for k, v in request.context.items() if k in CONTEXT_KEYS}
        context.setdefault("execution_id", request.execution_id)
        context.setdefault("function_id", fn.id)
        context.setdefault("function_version", fn.version)
        return {
            "execution_id": request.execution_id,
            "entry": fn.entry or "main.main",
            "input": request.input,
            "timeout": fn.timeout or self.config.resource_limits.default_timeout,
            "package": self._package(fn),
            "limits": {"memory_size": fn.memory_size, "cpu": fn.cpu},
            "context": context,
        }

    async def _post(self, worker: Worker, body: dict[str, Any], timeout: float, extra: dict) -> ExecutionResult:
        assert self._session is not None
        self._inflight[worker.pod] = self._inflight.get(worker.pod, 0) + 1
        try:
            client_timeout = aiohttp.ClientTimeout(total=timeout + HTTP_MARGIN, sock_connect=5)
            async with self._session.post(worker.url + "/execute", data=orjson.dumps(body), headers=self._runtime_headers,
                                          timeout=client_timeout) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    text = raw[:300].decode("utf-8", "replace")
                    return ExecutionResult.platform_error(f"Runtime worker {worker.pod} answered HTTP {resp.status}: {text}")
            reply = orjson.loads(raw)
        except asyncio.CancelledError:
            # The caller gave up on this execution (a newer cron tick replaced it, the router is
            # stopping). The runtime kills the function when this connection closes; the explicit
            # cancel covers a close that does not reach the pod (a proxy in between keeps its side open).
            self._spawn_cleanup(post_cancel(self._session, worker.url, body["execution_id"], worker=worker.pod, extra=extra,
                                           headers=self._runtime_headers))
            raise
        except TypeError as exc:
            return ExecutionResult.platform_error(f"Execution input is not JSON serialisable: {exc}")
        except aiohttp.ClientConnectorError as exc:
            raise WorkerGone(str(exc)) from exc
        except asyncio.TimeoutError:
            LOG.error("worker %s did not answer in %.0f s; dropping it", worker.pod, timeout + HTTP_MARGIN, extra=extra)
            await self._drop_worker(worker.pod, reason="stuck")
            return ExecutionResult.platform_error(f"Runtime worker {worker.pod} did not answer in time.")
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            # The request reached the worker, then the connection died: the pod was killed, evicted or
            # OOM-killed mid-run. Whether the function had started cannot be known, so it is not
            # re-run here (the delivery policy decides); the worker is replaced for the next execution.
            why = await self._pod_end(worker.pod)
            LOG.error("worker %s lost during an execution (%s%s); replacing it", worker.pod, exc or type(exc).__name__, why, extra=extra)
            await self._drop_worker(worker.pod, reason="lost mid-request")
            return ExecutionResult.platform_error(
                f"Runtime worker {worker.pod} was lost during the execution{why}; the function may have run in part. "
                "The worker has been replaced.", reason="worker_lost")
        except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
            LOG.error("worker %s failed: %r", worker.pod, exc, extra=extra)
            return ExecutionResult.platform_error(f"Runtime worker {worker.pod} failed: {exc or type(exc).__name__}")
        finally:
            self._inflight[worker.pod] = self._inflight.get(worker.pod, 1) - 1
            self._last_used[worker.pod] = time.monotonic()
        if not isinstance(reply, dict):
            return ExecutionResult.platform_error(f"Runtime worker {worker.pod} sent an unexpected reply.")
        ok = bool(reply.get("success"))
        return ExecutionResult(status="success" if ok else "failed", output=reply.get("output"),
                               duration=float(reply.get("duration") or 0.0), logs=reply.get("logs") or "",
                               reason=reply.get("reason") or ("ok" if ok else "error"))

    # -----------------------------------------------------------------------------------------
    # Workers: the function → worker map, scale up, scale down, release

    async def _workers(self, key: tuple[str, int], fresh: bool = False) -> dict[str, Worker]:
        cached = self._cache.get(key)
        if cached and not fresh and time.monotonic() - cached[0] < WORKER_CACHE_SECONDS:
            return cached[1]
        found = await self.coordinator.workers(*key)
        workers = {pod: Worker(pod, info["url"], key[0], key[1], info.get("engine", "")) for pod, info in found.items()}
        self._cache[key] = (time.monotonic(), workers)
        return workers

    def _least_busy(self, workers: dict[str, Worker]) -> Worker:
        return min(workers.values(), key=lambda w: (self._inflight.get(w.pod, 0), random.random()))

    def _overloaded(self, load: Load, others: int, workers: dict[str, Worker]) -> bool:
        # Qinling's rule: running executions (this one included, every engine's) per worker above
        # function_concurrency → +1 worker.
        return not workers or (load.running + others) / len(workers) > self.concurrency

    def _load_changed(self, key: tuple[str, int]) -> None:
        """Let the other engines see this one's running count (one publisher per function at a time:
        a burst of changes costs one write per round trip, not one per execution)."""
        if key not in self._publishers:
            self._publishers[key] = asyncio.get_running_loop().create_task(self._publish_load(key))

    async def _publish_load(self, key: tuple[str, int]) -> None:
        try:
            # No await between the last check and the finally: a change after it starts a new publisher.
            while (running := self._loads[key].running) != self._reported.get(key, 0):
                await self.coordinator.report_load(*key, running)
                self._reported[key] = running
        except Exception as exc:  # noqa: BLE001 - scale-up then counts this engine's load only, as before
            LOG.warning("cannot publish the load of function %s: %s", key[0], exc)
        finally:
            del self._publishers[key]

    async def _others_load(self, key: tuple[str, int], fresh: bool = False) -> int:
        """Running executions of the function version on the other engines (reused for a second)."""
        cached = self._others_cache.get(key)
        if cached and not fresh and time.monotonic() - cached[0] < WORKER_CACHE_SECONDS:
            return cached[1]
        loads = await self.coordinator.loads(*key)
        others = sum(n for engine, n in loads.items() if engine != self.engine_id)
        self._others_cache[key] = (time.monotonic(), others)
        return others

    async def _acquire(self, fn: FunctionSpec, load: Load) -> Worker:
        key = (fn.id, fn.version)
        workers = await self._workers(key)
        if not self._overloaded(load, await self._others_load(key), workers):
            return self._least_busy(workers)
        async with self.coordinator.lock(f"function_worker_{fn.id}_{fn.version}", timeout=self.options.worker_wait):
            workers = await self._workers(key, fresh=True)
            if self._overloaded(load, await self._others_load(key, fresh=True), workers):
                try:
                    claimed = await self._claim(fn, 1)
                except (NoWorkers, PoolBroken):
                    if not workers:
                        raise
                    # Busy but served: better a queue on the existing workers than an error.
                    LOG.warning("function %s could not scale up; using its %d worker(s)", fn.id, len(workers))
                else:
                    # Under the lock nobody else adds workers for this function: the list just read plus
                    # ours is current, without another read of coordination (an etcd round trip).
                    workers = {**workers, **{w.pod: w for w in claimed}}
                    self._cache[key] = (time.monotonic(), workers)
            if not workers:
                raise NoWorkers(f"function {fn.id} version {fn.version} has no worker")
            return self._least_busy(workers)

    async def scale_up(self, function: FunctionSpec, count: int = 1) -> list[str]:
        """Add `count` workers to a function version (the API's scale_up)."""
        async with self.coordinator.lock(f"function_worker_{function.id}_{function.version}", timeout=self.options.worker_wait):
            return [w.pod for w in await self._claim(function, count)]

    async def scale_down(self, function_id: str, version: int = 0, count: int = 1) -> list[str]:
        """Remove up to `count` workers, least busy first, never the last one (Qinling's rule)."""
        workers = sorted((await self._workers((function_id, version), fresh=True)).values(),
                         key=lambda w: self._inflight.get(w.pod, 0))
        victims = workers[: max(0, min(count, len(workers) - 1))]
        await asyncio.gather(*(self._drop_worker(w.pod, reason="scaled down") for w in victims))
        return [w.pod for w in victims]

    async def release(self, function_id: str, version: int | None = None) -> None:
        """Detach: delete every worker of the function (one version, or all); pods never go back to a pool."""
        claims = await self.coordinator.claims()
        pods = [pod for pod, info in claims.items()
                if info["function_id"] == function_id and (version is None or info["version"] == version)]
        selector = f"{L_FUNCTION}={label_value(function_id)},{L_WORKER}"
        if version is not None:
            selector += f",{L_VERSION}={version}"
        labelled = await self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        pods = sorted(set(pods) | {p.metadata.name for p in labelled.items})
        if pods:
            LOG.info("releasing %d worker(s) of function %s version %s", len(pods), function_id, version)
        await asyncio.gather(*(self._drop_worker(pod, reason="released") for pod in pods))

    async def workers(self, function_id: str, version: int = 0) -> list[str]:
        return sorted(await self._workers((function_id, version), fresh=True))

    async def _claim(self, fn: FunctionSpec, count: int) -> list[Worker]:
        """Take `count` ready pods from the runtime's pool: relabel each with its resourceVersion as a
        precondition (409 = another engine took it: try the next), then record the claim."""
        await self._ensure_pool(fn.runtime_id, fn.runtime_image)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.worker_wait
        selector = f"{L_POOL}={label_value(fn.runtime_id)}"
        claimed: list[Worker] = []
        # Ready pods the pool watch knows of first: one PATCH each, no LIST.
        known = self._ready_pods.get(fn.runtime_id, {})
        for name in random.sample(list(known), len(known)):  # engines racing for one pool spread over its pods
            if len(claimed) >= count:
                break
            pod = known.pop(name, None)
            if pod is not None and (worker := await self._try_claim(pod, fn)) is not None:
                claimed.append(worker)
        while len(claimed) < count:
            pods = await self.core.list_namespaced_pod(self.namespace, label_selector=selector)
            ready = [p for p in pods.items if _ready(p)]
            random.shuffle(ready)  # engines racing for one pool spread over its pods
            for pod in ready:
                if len(claimed) >= count:
                    break
                worker = await self._try_claim(pod, fn)
                if worker is not None:
                    claimed.append(worker)
            if len(claimed) >= count:
                break
            problems = [p for p in (_waiting_problem(pod) for pod in pods.items) if p]
            if problems and not ready and len(problems) == len(pods.items):
                raise PoolBroken(f"Runtime pool {manifests.pool_name(fn.runtime_id)} cannot start image "
                                 f"{fn.runtime_image!r}: {problems[0]}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoWorkers(f"no ready pod in the pool of runtime {fn.runtime_id} after {self.options.worker_wait:g} s "
                                f"({len(claimed)} of {count} claimed)")
            await self._wait_for_pods(selector, pods.metadata.resource_version, min(remaining, 2.0))
        self._cache.pop((fn.id, fn.version), None)
        return claimed

    async def _try_claim(self, pod: Any, fn: FunctionSpec) -> Worker | None:
        name = pod.metadata.name
        patch = {"metadata": {
            "resourceVersion": pod.metadata.resource_version,
            "labels": {L_POOL: None, L_FUNCTION: label_value(fn.id), L_VERSION: str(fn.version), L_WORKER: label_value(name),
                       L_ENGINE: label_value(self.engine_id)},
            "annotations": {A_CLAIMED_AT: _dt.datetime.now(_dt.timezone.utc).isoformat()}}}
        try:
            patched = await self.core.patch_namespaced_pod(name, self.namespace, patch, _content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status in (404, 409):
                return None  # someone else claimed or deleted it
            raise
        try:
            url = await self.resolver.url(patched)
            recorded = await self.coordinator.claim(name, fn.id, fn.version, {"url": url, "runtime": fn.runtime_id})
        except Exception:
            await self._delete_pod(name)  # labelled but unrecorded: nobody could use or reap it
            raise
        if not recorded:
            # Kubernetes granted the relabel, so no other engine can hold this pod; a record means a stale
            # claim from an earlier life of the pod name. Never serve two functions from one pod: drop it.
            LOG.error("pod %s is already claimed in coordination; deleting it", name)
            await self._delete_pod(name)
            return None
        self._owned[name] = (fn.id, fn.version)
        self._last_used[name] = time.monotonic()
        LOG.info("worker %s claimed for function %s version %s", name, fn.id, fn.version)
        return Worker(name, url, fn.id, fn.version, self.engine_id)

    async def _wait_for_pods(self, selector: str, resource_version: str, timeout: float) -> None:
        """Return at the next change of the pool's pods (or after `timeout`)."""
        w = watch.Watch()
        try:
            async with asyncio.timeout(timeout + 1):
                async for _ in w.stream(self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                                        resource_version=resource_version, timeout_seconds=max(1, int(timeout))):
                    return
        except (TimeoutError, ApiException, aiohttp.ClientError):
            await asyncio.sleep(0.05)
        finally:
            w.stop()
            await w.close()

    async def _pod_end(self, pod: str) -> str:
        """Why a pod's runtime stopped, as the kubelet tells it (" (OOMKilled)", " (pod deleted)"), or ""."""
        try:
            async with asyncio.timeout(2):
                found = await self.core.read_namespaced_pod(pod, self.namespace)
        except ApiException as exc:
            return " (pod deleted)" if exc.status == 404 else ""
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            return ""
        if found.metadata.deletion_timestamp is not None:
            return " (pod deleted)"
        for status in found.status.container_statuses or []:
            ended = (status.state.terminated if status.state else None) or (status.last_state.terminated if status.last_state else None)
            if ended is not None:
                return f" ({ended.reason or 'terminated'}, exit code {ended.exit_code})"
        return ""

    async def _drop_worker(self, pod: str, *, reason: str) -> None:
        owned = self._owned.pop(pod, None)
        self._inflight.pop(pod, None)
        self._last_used.pop(pod, None)
        with contextlib.suppress(CoordinationError):
            await self.coordinator.unclaim(pod)
        self._cache.clear()
        await self._delete_pod(pod)
        LOG.info("worker %s deleted (%s)%s", pod, reason, f" for function {owned[0]}" if owned else "")

    async def _delete_pod(self, name: str, grace: int | None = 1) -> None:
        try:
            await self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=grace)
        except ApiException as exc:
            if exc.status != 404:
                LOG.warning("cannot delete pod %s: %s", name, exc.reason)

    # -----------------------------------------------------------------------------------------
    # Reaping: idle workers (own claims) and orphans (claims whose engine is gone; leader only)

    async def _reap(self) -> None:
        orphan_grace = float(getattr(self.coordinator, "lease_ttl", 5))
        period = max(0.2, min(30.0, self.expiration / 4, orphan_grace / 2))
        while True:
            await asyncio.sleep(period)
            try:
                cutoff = time.monotonic() - self.expiration
                for pod in [p for p in self._owned if self._inflight.get(p, 0) == 0 and self._last_used.get(p, 0) < cutoff]:
                    await self._drop_worker(pod, reason=f"idle for {self.expiration} s")
                if await self.coordinator.campaign("kubernetes-engine-reaper"):
                    await self._reap_orphans(orphan_grace)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reaper must survive API hiccups
                LOG.warning("reaper pass failed: %s", exc)

    async def _reap_orphans(self, grace: float) -> None:
        """Delete claimed pods nobody holds a claim for: their engine died and its lease expired (or it
        crashed between relabelling and recording). The Deployment has already replaced them in the pool."""
        claims = await self.coordinator.claims()
        pods = await self.core.list_namespaced_pod(self.namespace, label_selector=f"{L_WORKER},{L_RUNTIME}")
        now = _dt.datetime.now(_dt.timezone.utc)
        for pod in pods.items:
            name = pod.metadata.name
            if name in claims or pod.metadata.deletion_timestamp is not None:
                continue
            stamp = (pod.metadata.annotations or {}).get(A_CLAIMED_AT)
            try:
                age = (now - _dt.datetime.fromisoformat(stamp)).total_seconds() if stamp else grace + 1
            except ValueError:
                age = grace + 1
            if age > grace:
                LOG.info("deleting orphaned worker %s (claimed by %s, no live claim)", name, (pod.metadata.labels or {}).get(L_ENGINE))
                self._owned.pop(name, None)
                await self._delete_pod(name)

    # -----------------------------------------------------------------------------------------
    # Pools

    async def _ensure_pool(self, runtime_id: str, image: str) -> None:
        known = self._pools.get(runtime_id)
        if known is None:
            async with self._pool_locks.setdefault(runtime_id, asyncio.Lock()):
                known = self._pools.get(runtime_id)
                if known is None:
                    known = await self.create_pool(runtime_id, image)
        if runtime_id not in self._pool_watchers:
            self._pool_watchers[runtime_id] = task = asyncio.get_running_loop().create_task(
                self._watch_pool(runtime_id), name=f"kubernetes-pool-watch-{runtime_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if known != image and (runtime_id, image) not in self._updating:
            # The runtime's image changed (runtime update): roll the pool over in the background.
            self._updating.add((runtime_id, image))
            self._spawn(self.update_pool(runtime_id, image))

    async def create_pool(self, runtime_id: str, image: str, replicas: int | None = None, trusted: bool = True) -> str:
        """Create the runtime's pool Deployment unless it exists; returns the image the pool runs."""
        body = manifests.pool_deployment(runtime_id, image, replicas=self.options.replicas if replicas is None else replicas,
                                         port=self.port, trusted=trusted,
                                         rollout_timeout=self.options.rollout_timeout, pull_secrets=self.options.image_pull_secrets,
                                         env=self._runtime_env())
        try:
            dep = await self.apps.create_namespaced_deployment(self.namespace, body)
            LOG.info("created pool %s for runtime %s (%s)", dep.metadata.name, runtime_id, image)
        except ApiException as exc:
            if exc.status != 409:
                raise
            dep = await self.apps.read_namespaced_deployment(body["metadata"]["name"], self.namespace)
        current = dep.spec.template.spec.containers[0].image
        self._pools[runtime_id] = current
        return current

    async def _watch_pool(self, runtime_id: str) -> None:
        """Keep _ready_pods[runtime_id] current: list once, then follow a watch of the pool's pods (a pod
        claimed by anyone leaves the selection: DELETED); list again whenever the watch ends or fails."""
        selector = f"{L_POOL}={label_value(runtime_id)}"
        ready = self._ready_pods.setdefault(runtime_id, {})
        while True:
            w = watch.Watch()
            try:
                pods = await self.core.list_namespaced_pod(self.namespace, label_selector=selector)
                ready.clear()
                ready.update({p.metadata.name: p for p in pods.items if _ready(p)})
                async for event in w.stream(self.core.list_namespaced_pod, self.namespace, label_selector=selector,
                                            resource_version=pods.metadata.resource_version, timeout_seconds=300):
                    pod = event["object"]
                    if event["type"] == "ERROR" or not hasattr(pod, "metadata"):
                        break  # 410 Gone and the like: list afresh
                    if event["type"] == "DELETED" or not _ready(pod):
                        ready.pop(pod.metadata.name, None)
                    else:
                        ready[pod.metadata.name] = pod
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - claims fall back to listing meanwhile
                LOG.debug("watch of pool %s ended: %s", runtime_id, exc)
                ready.clear()
                await asyncio.sleep(1.0)
            finally:
                w.stop()
                await w.close()

    async def wait_pool_ready(self, runtime_id: str, image: str, timeout: float | None = None) -> int:
        """Wait until the runtime's pool has a ready pod (returns how many are ready); PoolBroken
        when every pod is stuck (an image that cannot be pulled), NoWorkers after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.options.rollout_timeout if timeout is None else timeout)
        selector = f"{L_POOL}={label_value(runtime_id)}"
        while True:
            pods = await self.core.list_namespaced_pod(self.namespace, label_selector=selector)
            ready = [p for p in pods.items if _ready(p)]
            if ready:
                return len(ready)
            problems = [p for p in (_waiting_problem(pod) for pod in pods.items) if p]
            if problems and len(problems) == len(pods.items):
                raise PoolBroken(f"Runtime pool {manifests.pool_name(runtime_id)} cannot start image {image!r}: {problems[0]}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoWorkers(f"no ready pod in the pool of runtime {runtime_id} after the rollout timeout")
            await self._wait_for_pods(selector, pods.metadata.resource_version, min(remaining, 2.0))

    async def delete_pool(self, runtime_id: str) -> None:
        """Delete the runtime's pool; claimed workers are not pool pods any more and stay until released."""
        self._pools.pop(runtime_id, None)
        watcher = self._pool_watchers.pop(runtime_id, None)
        if watcher is not None:
            watcher.cancel()
        self._ready_pods.pop(runtime_id, None)
        try:
            await self.apps.delete_namespaced_deployment(manifests.pool_name(runtime_id), self.namespace, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def pool(self, runtime_id: str) -> tuple[int, int]:
        """(total, available): pods made from the runtime's pool, and the ready ones still unclaimed."""
        pods = await self.core.list_namespaced_pod(self.namespace, label_selector=f"{L_RUNTIME}={label_value(runtime_id)}")
        live = [p for p in pods.items if p.metadata.deletion_timestamp is None]
        available = [p for p in live if L_POOL in (p.metadata.labels or {}) and _ready(p)]
        return len(live), len(available)

    async def resize_pool(self, runtime_id: str, replicas: int) -> bool:
        """Set the pool size and wait until it is met; on failure (rollout timeout) restore the old size."""
        name = manifests.pool_name(runtime_id)
        dep = await self.apps.read_namespaced_deployment(name, self.namespace)
        old = dep.spec.replicas
        await self.apps.patch_namespaced_deployment(name, self.namespace, {"spec": {"replicas": replicas}})
        if await self._rollout(name):
            return True
        LOG.error("pool %s did not reach %d replicas; back to %d", name, replicas, old)
        await self.apps.patch_namespaced_deployment(name, self.namespace, {"spec": {"replicas": old}})
        return False

    async def update_pool(self, runtime_id: str, image: str) -> bool:
        """Roll the pool to a new image; if the rollout does not complete (image cannot be pulled, pods never
        ready, progress deadline exceeded), roll back to the previous image. True when the update took."""
        name = manifests.pool_name(runtime_id)
        try:
            dep = await self.apps.read_namespaced_deployment(name, self.namespace)
            old = dep.spec.template.spec.containers[0].image
            if old == image:
                self._pools[runtime_id] = image
                return True
            patch = {"spec": {"template": {"spec": {"containers": [{"name": manifests.RUNTIME_CONTAINER, "image": image}]}}}}
            await self.apps.patch_namespaced_deployment(name, self.namespace, patch)
            LOG.info("pool %s: rolling from %s to %s", name, old, image)
            if await self._rollout(name):
                self._pools[runtime_id] = image
                return True
            LOG.error("pool %s: image %s did not roll out; rolling back to %s", name, image, old)
            patch["spec"]["template"]["spec"]["containers"][0]["image"] = old
            await self.apps.patch_namespaced_deployment(name, self.namespace, patch)
            await self._rollout(name)
            self._pools[runtime_id] = old
            return False
        finally:
            self._updating.discard((runtime_id, image))

    async def _rollout(self, name: str) -> bool:
        """Wait for a Deployment's rollout: observed, updated, all replicas available. False on
        ProgressDeadlineExceeded or after [kubernetes] rollout_timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.rollout_timeout
        while loop.time() < deadline:
            dep = await self.apps.read_namespaced_deployment(name, self.namespace)
            st, want = dep.status, dep.spec.replicas
            for cond in st.conditions or []:
                if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
                    return False
            if ((st.observed_generation or 0) >= dep.metadata.generation and (st.updated_replicas or 0) == want
                    and (st.available_replicas or 0) == want and (st.replicas or 0) == want and not st.unavailable_replicas):
                return True
            await asyncio.sleep(0.2)
        return False

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn_cleanup(self, coro) -> None:
        """Background work that must not be dropped at stop (pod deletes, cancels): stop() waits
        for it, up to CANCEL_TIMEOUT, before cancelling the rest."""
        task = asyncio.get_running_loop().create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    # -----------------------------------------------------------------------------------------
    # Image functions: a pod per execution

    async def _run_image(self, request: ExecutionRequest) -> ExecutionResult:
        fn = request.function
        extra = {"execution_id": request.execution_id, "event_id": request.event_id}
        timeout = float(fn.timeout or self.config.resource_limits.default_timeout)
        name = manifests.dns_name("hw-exec", request.execution_id, limit=63)
        args, input_json = manifests.image_args(request.input)
        body = manifests.image_pod(name, image=fn.code.get("image") or fn.runtime_image or "", function_id=fn.id, version=fn.version,
                                   execution_id=request.execution_id, args=args, input_json=input_json, cpu=fn.cpu,
                                   memory=fn.memory_size, timeout=timeout, pull_secrets=self.options.image_pull_secrets)
        try:
            pod = await self.core.create_namespaced_pod(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                return ExecutionResult.platform_error(f"Cannot create the pod of image function {fn.id}: {exc.reason}")
            pod = await self.core.read_namespaced_pod(name, self.namespace)  # a retried execution: follow its pod
        except asyncio.CancelledError:
            self._spawn_cleanup(self._delete_pod(name, grace=0))  # the create may have gone through before the cancel
            raise
        cancelled = False
        try:
            return await self._follow_image_pod(pod, timeout, extra)
        except (ApiException, aiohttp.ClientError, OSError) as exc:
            return ExecutionResult.platform_error(f"Lost track of the pod of image function {fn.id}: {exc}")
        except asyncio.CancelledError:
            # Cancelled (a newer cron tick replaced it): the pod must stop. Deleted in the background,
            # so the cancel completes at once and a second cancel cannot interrupt the delete.
            cancelled = True
            self._spawn_cleanup(self._delete_pod(name, grace=0))
            raise
        finally:
            if not cancelled:
                await self._delete_pod(name, grace=0)

    async def _follow_image_pod(self, pod: Any, timeout: float, extra: dict) -> ExecutionResult:
        name = pod.metadata.name
        loop = asyncio.get_running_loop()
        pending_deadline = loop.time() + self.options.worker_wait
        started: float | None = None
        rv = pod.metadata.resource_version
        while True:
            phase = pod.status.phase if pod.status else None
            if started is None and phase in ("Running", "Succeeded", "Failed"):
                started = loop.time()
            if phase in ("Succeeded", "Failed"):
                duration = loop.time() - (started or loop.time())
                return await self._image_outcome(pod, duration)
            problem = _waiting_problem(pod)
            if problem:
                return ExecutionResult.platform_error(f"Cannot start image {pod.spec.containers[0].image!r}: {problem}")
            now = loop.time()
            if started is not None and now - started >= timeout:
                LOG.info("image function pod %s timed out after %g s", name, timeout, extra=extra)
                logs = await self._pod_logs(name)
                return ExecutionResult(status="failed", output="Function execution timeout.", duration=timeout, logs=logs, reason="timeout")
            if started is None and now > pending_deadline:
                return ExecutionResult.platform_error(f"Pod {name} did not start in {self.options.worker_wait:g} s.", reason="busy")
            wait = (started + timeout - now) if started is not None else (pending_deadline - now)
            pod, rv = await self._next_pod_state(name, rv, max(0.05, wait))

    async def _next_pod_state(self, name: str, rv: str, timeout: float) -> tuple[Any, str]:
        """The pod after its next change (watch from `rv`), or as it is after `timeout`."""
        w = watch.Watch()
        try:
            async with asyncio.timeout(timeout):
                async for event in w.stream(self.core.list_namespaced_pod, self.namespace, field_selector=f"metadata.name={name}",
                                            resource_version=rv, timeout_seconds=max(1, int(timeout) + 1)):
                    obj = event["object"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        return obj, obj.metadata.resource_version
        except TimeoutError:
            pass
        finally:
            w.stop()
            await w.close()
        pod = await self.core.read_namespaced_pod(name, self.namespace)
        return pod, pod.metadata.resource_version

    async def _image_outcome(self, pod: Any, duration: float) -> ExecutionResult:
        logs = await self._pod_logs(pod.metadata.name)
        terminated = None
        for status in pod.status.container_statuses or []:
            if status.state and status.state.terminated:
                terminated = status.state.terminated
        if pod.status.phase == "Succeeded":
            return ExecutionResult(status="success", output=None, duration=round(duration, 3), logs=logs)
        if pod.status.reason == "DeadlineExceeded":
            return ExecutionResult(status="failed", output="Function execution timeout.", duration=round(duration, 3), logs=logs, reason="timeout")
        code = terminated.exit_code if terminated else None
        reason = "memory" if terminated is not None and terminated.reason == "OOMKilled" else "error"
        return ExecutionResult(status="failed", output=f"Function container exited with code {code}.", duration=round(duration, 3),
                               logs=logs, reason=reason)

    async def _pod_logs(self, name: str) -> str:
        try:
            text = await self.core.read_namespaced_pod_log(name, self.namespace, limit_bytes=1024 * 1024)
        except ApiException:
            return ""
        return text if isinstance(text, str) else str(text)
