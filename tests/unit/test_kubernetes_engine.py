"""The kubernetes engine on the fake cluster (or a real one via HEADWATER_TEST_KUBECONFIG): pools, claims,
Qinling's concurrency rule, detach, idle release, pool resize/update with rollback, NodePort, image functions."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from engine.kubernetes import KubernetesEngine, manifests
from engine.kubernetes.engine import PoolBroken
from engine.packages import FilesystemPackageStore
from router import download_tokens
from router.plugins import ExecutionRequest, FunctionSpec, PackageRef
from tests.fakes.kube_images import FakeImage
from tests.conditions import eventually
from tests.fakes.kube_cluster import kube_cluster
from tests.processes import pid_path
from tests.services import require_program

pytestmark = pytest.mark.slow

MAIN_PY = '''
import time

def hello(name="World", **kwargs):
    return f"Hello, {name}"

def sleep(seconds=4, **kwargs):
    time.sleep(seconds)
    return "slept"

def meet(folder, n, **kwargs):
    # Each run checks in, then waits until n runs have: runs served one at a time never get there.
    import os
    open(os.path.join(folder, str(os.getpid())), "w").close()
    while len(os.listdir(folder)) < n:
        time.sleep(0.01)
    return "met"
'''

IMAGE_FN = '''
import json, os, sys, time
data = json.loads(os.environ["HEADWATER_INPUT"])
print("args", sys.argv[1:], "input", data, flush=True)
if isinstance(data, dict):
    time.sleep(data.get("sleep", 0))
    sys.exit(data.get("exit", 0))
'''

RUNTIME_IMAGE = "headwater/runtime-python3:0.1.0"
NODE_IMAGE = "headwater/runtime-nodejs:0.1.0"


class Env:
    def __init__(self, cluster, tmp_path: Path):
        self.cluster = cluster
        self.tmp_path = tmp_path
        self.engines: list[KubernetesEngine] = []

    @property
    def fake(self):
        """The fake cluster, for what only it can do (serve a made-up image, count 409s); skips on a real one."""
        if self.cluster.fake is None:
            pytest.skip("needs the fake cluster's internals")
        return self.cluster.fake

    # What the tests check goes through the Kubernetes API, so it holds on the fake and on a real cluster.

    def _api(self):
        return self.engines[0]

    def _dict(self, obj) -> dict:
        return self._api().api.sanitize_for_serialization(obj)

    async def pods(self, selector: str | None = None, *, terminating: bool = False) -> list[dict]:
        found = await self._api().core.list_namespaced_pod(self.cluster.namespace, label_selector=selector or "")
        return [self._dict(p) for p in found.items if terminating or p.metadata.deletion_timestamp is None]

    async def pod(self, name: str) -> dict | None:
        from kubernetes_asyncio.client.rest import ApiException
        try:
            return self._dict(await self._api().core.read_namespaced_pod(name, self.cluster.namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def gone(self, name: str) -> bool:
        return await self.pod(name) is None

    async def deployment(self, name: str) -> dict:
        return self._dict(await self._api().apps.read_namespaced_deployment(name, self.cluster.namespace))

    async def services(self) -> list[dict]:
        return [self._dict(s) for s in (await self._api().core.list_namespaced_service(self.cluster.namespace)).items]

    async def kill(self, name: str) -> None:
        """Delete a pod at once, behind the engine's back (the kubelet kills its processes)."""
        await self._api().core.delete_namespaced_pod(name, self.cluster.namespace, grace_period_seconds=0)

    async def engine(self, engine_options: dict | None = None, **kube) -> KubernetesEngine:
        config = self.cluster.config(self.tmp_path, engine=engine_options, **kube)
        engine = KubernetesEngine(config, FilesystemPackageStore(config))
        await engine.start()
        self.engines.append(engine)
        return engine

    async def function(self, engine: KubernetesEngine, entry: str = "main.hello", timeout: int = 10,
                       runtime: str = "python3") -> FunctionSpec:
        path = self.tmp_path / f"{uuid.uuid4().hex}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("main.py", MAIN_PY)
        function_id = str(uuid.uuid4())
        md5 = await engine.packages.put("proj", function_id, 0, path.read_bytes())
        return FunctionSpec(id=function_id, version=0, runtime_id=runtime, runtime_image=RUNTIME_IMAGE, code={"source": "package"},
                            entry=entry, cpu=100, memory_size=64 * 1024 * 1024, timeout=timeout,
                            package=PackageRef("proj", function_id, 0, md5), project_id="proj")


@pytest.fixture
async def env(tmp_path):
    async with kube_cluster(tmp_path) as cluster:
        e = Env(cluster, tmp_path)
        try:
            yield e
        finally:
            for engine in e.engines:
                await engine.stop()


def req(fn: FunctionSpec, input=None) -> ExecutionRequest:
    return ExecutionRequest(execution_id=str(uuid.uuid4()), function=fn, input=input)


# ---------------------------------------------------------------------------------------------
# Done-when 2: Qinling's concurrency behaviour


async def test_concurrency_one_worker_for_three_then_exactly_two_for_six_then_detach(env):
    engine = await env.engine(replicas=3)
    fn = await env.function(engine, "main.sleep", timeout=60)
    if env.cluster.fake is not None:
        # Each run waits for all three to have started (a folder on this machine): served one after
        # another they would time out.
        folder = os.path.dirname(pid_path())
        meet = dataclasses.replace(fn, entry="main.meet")
        results = await asyncio.gather(*(engine.execute(req(meet, {"folder": folder, "n": 3})) for _ in range(3)))
        assert [(r.status, r.output) for r in results] == [("success", "met")] * 3, results
    else:
        results = await asyncio.gather(*(engine.execute(req(fn, {"seconds": 4})) for _ in range(3)))
        assert [r.status for r in results] == ["success"] * 3, results
    assert len(await engine.workers(fn.id, 0)) == 1

    results = await asyncio.gather(*(engine.execute(req(fn, {"seconds": 4})) for _ in range(6)))
    assert [r.status for r in results] == ["success"] * 6, results
    workers = await engine.workers(fn.id, 0)
    assert len(workers) == 2
    labelled = await env.pods(f"{manifests.L_FUNCTION}={fn.id}")
    assert sorted(p["metadata"]["name"] for p in labelled) == workers

    await engine.release(fn.id)
    assert await engine.workers(fn.id, 0) == []
    await eventually(lambda: _none(env.pods(f"{manifests.L_FUNCTION}={fn.id}", terminating=True)))
    # The pool never ran dry: claimed pods were replaced, released ones are not returned to it.
    await eventually(lambda: _ready_pool_pods(env, 3))


NODE_JS = "exports.hello = async (context, input) => `Hello from ${process.release.name}, ${input}`;\n"


async def test_a_nodejs_function_runs_on_the_nodejs_runtime_image(env):
    """The nodejs pool runs headwater/runtime-nodejs by that image's own entrypoint (Qinling's one global
    command put `python …` into every pool, and the nodejs pool crash-looped)."""
    if env.cluster.fake is not None:
        require_program("node", "the fake kubelet runs the image's node as the host's")
    engine = await env.engine(replicas=1)
    path = env.tmp_path / "node.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("index.js", NODE_JS)
    function_id = str(uuid.uuid4())
    md5 = await engine.packages.put("proj", function_id, 0, path.read_bytes())
    fn = FunctionSpec(id=function_id, version=0, runtime_id="nodejs", runtime_image=NODE_IMAGE, code={"source": "package"},
                      entry="index.hello", cpu=100, memory_size=64 * 1024 * 1024, timeout=10,
                      package=PackageRef("proj", function_id, 0, md5), project_id="proj")
    result = await engine.execute(req(fn, "Kubernetes"))
    assert (result.status, result.output) == ("success", "Hello from node, Kubernetes"), result
    (worker,) = await engine.workers(fn.id, 0)
    container = (await env.pod(worker))["spec"]["containers"][0]
    assert container["image"] == NODE_IMAGE and "command" not in container


async def test_idle_workers_are_released_after_the_expiration(env):
    engine = await env.engine({"function_service_expiration": 1}, replicas=2)
    fn = await env.function(engine)
    assert (await engine.execute(req(fn, "idle"))).output == "Hello, idle"
    (worker,) = await engine.workers(fn.id, 0)
    await eventually(lambda: _empty(engine, fn), timeout=6)
    await eventually(lambda: env.gone(worker), timeout=30)
    # Released, not broken: the next execution claims a fresh pod.
    assert (await engine.execute(req(fn, "back"))).output == "Hello, back"
    assert (await engine.workers(fn.id, 0)) != [worker]


async def _empty(engine, fn):
    return await engine.workers(fn.id, 0) == []


async def test_busy_worker_is_not_reaped_while_running(env):
    engine = await env.engine({"function_service_expiration": 1}, replicas=1)
    fn = await env.function(engine, "main.sleep")
    result = await engine.execute(req(fn, {"seconds": 2.5}))
    assert result.status == "success"  # its worker was not deleted under it


# ---------------------------------------------------------------------------------------------
# Pools and claims


async def test_claim_relabels_out_of_the_pool_and_the_pool_refills(env):
    engine = await env.engine(replicas=2)
    fn = await env.function(engine)
    assert (await engine.execute(req(fn, "pool"))).status == "success"
    (worker,) = await engine.workers(fn.id, 0)
    pod = await env.pod(worker)
    labels = pod["metadata"]["labels"]
    assert manifests.L_POOL not in labels and labels[manifests.L_FUNCTION] == fn.id and labels[manifests.L_RUNTIME] == "python3"
    # The ReplicaSet let go of it (no owner) and made a replacement.
    await eventually(lambda: _unowned(env, worker))
    await eventually(lambda: _count(env.pods(f"{manifests.L_POOL}=python3"), 2))
    total, available = await engine.pool("python3")
    assert total == 3
    await eventually(lambda: _available(engine, 2))
    # The pool pod template: hardening, downward-API host, readiness probe, no service account token.
    dep = await env.deployment(manifests.pool_name("python3"))
    spec = dep["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    # No command: the image's own entrypoint runs its server, told the pod's IP and the port.
    assert "command" not in container and "args" not in container
    env = {e["name"]: e for e in container["env"]}
    assert env["HEADWATER_RUNTIME_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["HEADWATER_RUNTIME_PORT"]["value"] == str(engine.port)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"


async def _none(listing) -> bool:
    return not await listing


async def _count(listing, n: int) -> bool:
    return len(await listing) == n


async def _present(env, name: str) -> bool:
    return await env.pod(name) is not None


async def _unowned(env, name: str) -> bool:
    return not (await env.pod(name))["metadata"].get("ownerReferences")


async def _pool_images(env, images: set[str]) -> bool:
    return {p["spec"]["containers"][0]["image"] for p in await env.pods(f"{manifests.L_POOL}=python3")} == images


async def _ready_pool_pods(env, n: int) -> bool:
    pods = await env.pods(f"{manifests.L_POOL}=python3")
    return len([p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                       for c in (p.get("status") or {}).get("conditions") or [])]) == n


async def _available(engine, n):
    return (await engine.pool("python3"))[1] == n


async def test_racing_claims_conflict_and_move_on(env):
    """Two engines (separate processes as far as coordination goes) claim from one pool at once: the
    stale-resourceVersion relabel gets 409 and the loser tries the next pod; no pod serves two functions."""
    a = await env.engine(replicas=3)
    b = await env.engine(replicas=3)
    fns = [await env.function(a) for _ in range(4)] + [await env.function(b) for _ in range(4)]
    await a.create_pool("python3", RUNTIME_IMAGE)
    await eventually(lambda: _available(a, 3))
    claims = await asyncio.gather(*(a.scale_up(f) for f in fns[:4]), *(b.scale_up(f) for f in fns[4:]))
    pods = [p for c in claims for p in c]
    assert len(pods) == 8 and len(set(pods)) == 8
    for fn, (pod,) in zip(fns, claims):
        assert (await env.pod(pod))["metadata"]["labels"][manifests.L_FUNCTION] == fn.id
    if env.cluster.fake is not None:  # a real API server's answers are not recorded
        conflicts = [r for r in env.fake.responses if r[0] == "PATCH" and r[2] == 409]
        assert conflicts, "no claim ever raced (test did not exercise the 409 path)"


async def test_scale_up_and_scale_down_never_below_one(env):
    engine = await env.engine(replicas=3)
    fn = await env.function(engine)
    assert len(await engine.scale_up(fn, 3)) == 3
    assert len(await engine.workers(fn.id, 0)) == 3
    removed = await engine.scale_down(fn.id, 0, count=10)
    assert len(removed) == 2
    assert len(await engine.workers(fn.id, 0)) == 1
    assert (await engine.execute(req(fn, "left"))).output == "Hello, left"


async def test_worker_deleted_behind_the_engines_back_is_replaced(env):
    engine = await env.engine(replicas=2)
    fn = await env.function(engine)
    assert (await engine.execute(req(fn))).status == "success"
    (worker,) = await engine.workers(fn.id, 0)
    runtime = env.cluster.fake._pods.get((env.cluster.namespace, worker)) if env.cluster.fake is not None else None
    await env.kill(worker)
    await eventually(lambda: env.gone(worker))
    if runtime is not None:
        # The object goes before the fake kubelet has killed the process: a request sent in between
        # would be a worker lost mid-request (the next test's case), not one deleted before it.
        await eventually(lambda: runtime.process is None or runtime.process.returncode is not None)
    result = await engine.execute(req(fn, "again"))
    assert (result.status, result.output) == ("success", "Hello, again")
    assert await engine.workers(fn.id, 0) != [worker]


async def test_a_worker_killed_mid_request_is_reported_and_replaced(env):
    engine = await env.engine(replicas=2)
    fn = await env.function(engine, entry="main.sleep", timeout=60)
    running = asyncio.create_task(engine.execute(req(fn, {"seconds": 60})))
    await eventually(lambda: sum(engine._inflight.values()) == 1, timeout=60)
    (worker,) = await engine.workers(fn.id, 0)
    await env.kill(worker)
    result = await asyncio.wait_for(running, 60)
    assert (result.status, result.reason) == ("error", "worker_lost"), result
    assert worker in result.output and "may have run in part" in result.output
    assert worker not in await engine.workers(fn.id, 0)
    hello = dataclasses.replace(fn, entry="main.hello")
    after = await engine.execute(req(dataclasses.replace(hello, id=fn.id), "again"))
    assert (after.status, after.output) == ("success", "Hello, again")
    assert await engine.workers(fn.id, 0) not in ([], [worker])


async def test_unpullable_runtime_image_fails_fast_with_the_reason(env):
    engine = await env.engine(replicas=1)
    fn = await env.function(engine)
    broken = dataclasses.replace(fn, runtime_id="cobol", runtime_image="example/cobol-runtime:1")
    result = await engine.execute(req(broken))
    assert result.status == "error"
    assert "ErrImagePull" in result.output and "example/cobol-runtime:1" in result.output  # the reason, not a wait's end


@pytest.mark.parametrize("image,reason", [
    # The image's entrypoint names an executable the image does not have: containerd's StartError.
    (FakeImage(entrypoint=["python", "/opt/headwater/server.py"], binaries={}, user="1000"), "StartError"),
    # The executable exists but the server exits at once (its file is missing): a crash loop.
    (FakeImage(entrypoint=["python", "/opt/headwater/server.py"], binaries={"python": sys.executable}, user="1000"), "CrashLoopBackOff"),
    # An image that runs as root: the pool's runAsNonRoot makes the kubelet refuse to start it.
    (FakeImage(entrypoint=["python", "/opt/headwater/server.py"], binaries={"python": sys.executable}), "CreateContainerConfigError"),
], ids=["start-error", "crash-loop", "root-image"])
async def test_a_pool_whose_server_cannot_start_is_broken_with_the_reason(env, image, reason):
    env.fake.images["example/broken-runtime"] = image
    engine = await env.engine(replicas=2)
    await engine.create_pool("broken", "example/broken-runtime:1")
    # The generous timeout is only a cap: PoolBroken comes as soon as every pod shows the failure,
    # long before the rollout timeout (300 s by default) that used to be the only way out.
    with pytest.raises(PoolBroken, match=reason):
        await engine.wait_pool_ready("broken", "example/broken-runtime:1", timeout=120)
    fn = await env.function(engine)
    result = await engine.execute(req(dataclasses.replace(fn, runtime_id="broken", runtime_image="example/broken-runtime:1")))
    assert result.status == "error" and reason in result.output, result.output


async def test_pool_update_rolls_out_and_a_bad_image_rolls_back(env):
    env.fake.images["headwater/runtime-python3-next"] = env.fake.images["headwater/runtime-python3"]
    engine = await env.engine(replicas=2, rollout_timeout=4)
    await engine.create_pool("python3", RUNTIME_IMAGE)
    name = manifests.pool_name("python3")
    assert await engine.update_pool("python3", "headwater/runtime-python3-next:2") is True
    images = {p["spec"]["containers"][0]["image"] for p in await env.pods(f"{manifests.L_POOL}=python3")}
    assert images == {"headwater/runtime-python3-next:2"}

    assert await engine.update_pool("python3", "example/missing:9") is False
    dep = await env.deployment(name)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "headwater/runtime-python3-next:2"
    await eventually(lambda: _pool_images(env, {"headwater/runtime-python3-next:2"}))
    # Executions kept working on the rolled-back pool.
    fn = await env.function(engine)
    fn = dataclasses.replace(fn, runtime_image="headwater/runtime-python3-next:2")
    assert (await engine.execute(req(fn, "rolled"))).output == "Hello, rolled"


async def test_pool_resize(env):
    engine = await env.engine(replicas=1)
    await engine.create_pool("python3", RUNTIME_IMAGE)
    assert await engine.resize_pool("python3", 4) is True
    assert (await engine.pool("python3")) == (4, 4)
    assert await engine.resize_pool("python3", 2) is True
    await eventually(lambda: _total(engine, 2))


async def _total(engine, n):
    return (await engine.pool("python3"))[0] == n


async def test_nodeport_resolver_reaches_the_worker_through_a_service(env):
    engine = await env.engine(replicas=1, resolver="nodeport")
    fn = await env.function(engine)
    result = await engine.execute(req(fn, "nodeport"))
    assert (result.status, result.output) == ("success", "Hello, nodeport")
    (worker,) = await engine.workers(fn.id, 0)
    (svc,) = await env.services()
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["selector"] == {manifests.L_WORKER: worker}
    await engine.release(fn.id)
    await eventually(lambda: _none(env.services()))  # owned by the pod: collected


async def test_package_download_uses_a_scoped_short_lived_token(env):
    engine = await env.engine(replicas=1)
    fn = await env.function(engine)
    body = engine._body(req(fn))
    url = body["package"]["download_url"]
    assert url.startswith(env.cluster.public_url + f"/v1/functions/{fn.id}?download=true&token=")
    assert "token" not in body["package"] and "password" not in str(body) and "auth" not in str(body["context"])
    assert (await engine.execute(req(fn))).status == "success"
    assert (fn.id, 0, 200) in env.cluster.downloads
    secret = download_tokens.secret_from_config(engine.config)
    token = url.rsplit("token=", 1)[1]
    assert download_tokens.verify(secret, token, fn.id, 0)
    assert not download_tokens.verify(secret, token, "another-function", 0)
    assert not download_tokens.verify(secret, token, fn.id, 1)
    assert not download_tokens.verify(secret, token, fn.id, 0, now=time.time() + 10_000)
    assert not download_tokens.verify(b"other-secret", token, fn.id, 0)
    assert not download_tokens.verify(secret, "garbage", fn.id, 0)


# ---------------------------------------------------------------------------------------------
# Done-when 4: image functions


@pytest.fixture
def image_fn(env, tmp_path):
    script = tmp_path / "fn.py"
    script.write_text(IMAGE_FN)
    # Image function pods run as non-root (runAsNonRoot): the image names a numeric non-root USER.
    env.fake.images["example/fn"] = FakeImage(entrypoint=["python", "/app/fn.py"], files={"/app/fn.py": str(script)},
                                              binaries={"python": __import__("sys").executable}, user="1000")

    def make(timeout: int = 5, image: str = "example/fn:1") -> FunctionSpec:
        return FunctionSpec(id=str(uuid.uuid4()), version=0, runtime_id=None, runtime_image=None,
                            code={"source": "image", "image": image}, entry=None, cpu=200, memory_size=64 * 1024 * 1024,
                            timeout=timeout, project_id="proj")
    return make


def _created_pod(env, execution_id: str) -> dict:
    name = manifests.dns_name("hw-exec", execution_id, limit=63)
    return next(e[4] for e in env.fake.events if e[1] == "pods" and e[3] == "ADDED" and e[4]["metadata"]["name"] == name)


async def test_image_function_runs_in_its_own_pod_with_container_limits_and_is_deleted(env, image_fn):
    engine = await env.engine(replicas=0)
    fn = image_fn()
    request = req(fn, "a b  c")
    result = await engine.execute(request)
    assert result.status == "success", result
    assert "args ['a', 'b', 'c']" in result.logs
    pod = _created_pod(env, request.execution_id)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "200m", "memory": str(64 * 1024 * 1024)}
    assert "resources" not in pod["spec"] and pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False
    await eventually(lambda: env.gone(pod["metadata"]["name"]))

    request = req(fn, {"exit": 0, "key": "value"})  # a JSON object arrives whole, in HEADWATER_INPUT
    result = await engine.execute(request)
    assert result.status == "success" and "'key': 'value'" in result.logs


async def test_image_function_timeout_kills_and_deletes_the_pod(env, image_fn):
    engine = await env.engine(replicas=0)
    fn = image_fn(timeout=1)
    request = req(fn, {"sleep": 3600})  # longer than the test may take: an answer means the timeout cut it off
    result = await engine.execute(request)
    assert (result.status, result.reason, result.output) == ("failed", "timeout", "Function execution timeout.")
    name = _created_pod(env, request.execution_id)["metadata"]["name"]
    assert await env.gone(name)


async def test_an_image_pod_cancelled_just_before_stop_is_still_deleted(env, image_fn):
    """A cancelled run's pod is deleted in the background; stopping the engine right after waits
    for that delete rather than dropping it (nothing else would ever remove the pod)."""
    engine = await env.engine(replicas=0)
    request = req(image_fn(timeout=30), {"sleep": 30})
    running = asyncio.ensure_future(engine.execute(request))
    name = manifests.dns_name("hw-exec", request.execution_id, limit=63)
    await eventually(lambda: _present(env, name))
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await engine.stop()
    env.engines.remove(engine)
    await env.engine(replicas=0)  # the API is reached through an engine
    assert await env.gone(name)


async def test_image_function_failure_is_seen_at_once(env, image_fn):
    engine = await env.engine(replicas=0)
    # Qinling noticed a Failed pod only at the timeout: an hour here, far past the test's own.
    result = await engine.execute(req(image_fn(timeout=3600), {"exit": 3}))
    assert (result.status, result.reason) == ("failed", "error")
    assert "code 3" in result.output


async def test_image_function_with_unpullable_image_is_an_error(env, image_fn):
    engine = await env.engine(replicas=0)
    request = req(image_fn(image="example/nothing:1"))
    result = await engine.execute(request)
    assert result.status == "error" and "ErrImagePull" in result.output
    name = _created_pod(env, request.execution_id)["metadata"]["name"]
    await eventually(lambda: env.gone(name))


@pytest.mark.parametrize("answer", [401, None], ids=["credentials-refused", "unreachable"])
async def test_start_up_that_kubernetes_refuses_is_one_clear_configuration_error(tmp_path, answer):
    """A rejected client certificate (or no API server) stops start-up with a message naming the options,
    and leaves no client session open (no "Unclosed client session" at exit)."""
    import gc
    import warnings

    from aiohttp import web

    from router.config import Config, ConfigError
    from tests.e2e.server import free_port

    async def refuse(request):
        return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized", "message": "Unauthorized"}, status=401)

    port = free_port()
    runner = None
    if answer is not None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", refuse)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"backend": "kubernetes"},
                                    "kubernetes": {"kube_host": f"http://127.0.0.1:{port}"}})
    engine = KubernetesEngine(config, FilesystemPackageStore(config))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ConfigError) as raised:
                await engine.start()
            gc.collect()
        assert f"127.0.0.1:{port}" in str(raised.value)
        assert ("401 Unauthorized" in str(raised.value) and "cert_file" in str(raised.value)) if answer else "cannot be reached" in str(raised.value)
        assert engine.api is None
        assert not [w for w in caught if "Unclosed" in str(w.message)]
    finally:
        if runner is not None:
            await runner.cleanup()
