"""LocalEngine: runs functions in runtime server processes on this machine (the servers pods run)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson

from engine.local_pool import WarmPool
from engine.packages import write_atomic
from engine.runtime_client import CANCEL_TIMEOUT, post_build, post_cancel, runtime_headers
from router.config import Config
from router.plugins import BuildResult, Coordination, ExecutionRequest, ExecutionResult, FunctionSpec, PackageRef, PackageStore

LOG = logging.getLogger(__name__)

STARTUP_TIMEOUT = 20.0  # seconds for a runtime server to print its LISTENING line
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when stopping a runtime server
# Runtime servers die the moment this process dies, even by SIGKILL (Linux's parent-death signal,
# set by util-linux's setpriv before it execs the server), and their function processes with them
# (the runtime sets the same signal on those). Without it a server outlived a killed engine by up
# to a second (its --parent-pid watcher) and finished runs nobody recorded, which ran again later.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None
_DIE_WITH_US = (_SETPRIV, "--pdeathsig", "KILL") if _SETPRIV else ()
# Beyond the function's own timeout (which the runtime enforces): time to unpack the package and
# import the module on a cold worker. Past it the runtime itself is stuck and gets restarted.
HTTP_MARGIN = 30.0
# OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: where the runtime sends its execution spans ([tracing]); no
# other OTEL_ variable (OTEL_EXPORTER_OTLP_HEADERS may hold a collector's credentials).
_RUNTIME_ENV = ("PATH", "LANG", "TZ", "HOME", "TMPDIR", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _default_runtimes_dir() -> Path:
    # runtimes/ sits next to engine/ in the source tree.
    return Path(__file__).resolve().parent.parent / "runtimes"


@dataclasses.dataclass(eq=False)
class Worker:
    """One runtime server process serving one function version (key None: idle in the warm pool)."""

    name: str
    key: tuple[str, int, str] | None
    runtime: str
    process: asyncio.subprocess.Process
    url: str
    token: str = ""  # the credential this runtime server made and announced to us alone
    inflight: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    log_tasks: list[asyncio.Task] = dataclasses.field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def headers(self) -> dict[str, str]:
        return runtime_headers(self.token)


def runtime_environment() -> dict[str, str]:
    """What a runtime server inherits from Headwater's environment: enough to run, nothing more. An
    operator's OS_PASSWORD, a database URL, a download-token secret or a cloud token in Headwater's
    environment must never reach user code."""
    env = {k: v for k, v in os.environ.items() if k in _RUNTIME_ENV or k.startswith(("LC_", "HEADWATER_RUNTIME_"))}
    env.pop("HEADWATER_RUNTIME_TOKEN", None)  # each server makes its own credential
    return env


class LocalEngine:
    name: ClassVar[str] = "local"

    def __init__(self, config: Config, packages: PackageStore, *, coordinator: Coordination | None = None) -> None:
        self.config = config
        self.packages = packages
        self.runtime_map: list[tuple[str, str]] = []
        for pair in config.engine.local_runtimes:
            substring, _, runtime_dir = pair.partition("=")
            self.runtime_map.append((substring.strip(), runtime_dir.strip()))
        self.runtimes_dir = Path(os.environ.get("HEADWATER_RUNTIMES_DIR") or _default_runtimes_dir())
        self.max_workers = config.engine.local_workers_per_function
        self.concurrency = config.engine.function_concurrency
        self.expiration = config.engine.function_service_expiration
        self.work_root = Path(config.data_dir) / "runtimes"
        self._server_commands: dict[str, list[str]] = {}  # runtime → how its server starts (found once)
        self._pools: dict[tuple[str, int, str], list[Worker]] = {}
        self._locks: dict[tuple[str, int, str], asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        self._reaper: asyncio.Task | None = None
        self._seq = itertools.count(1)
        self._stopping = False
        self._cancels: set[asyncio.Task] = set()  # POST /cancel requests on their way to runtimes
        # Pre-started servers a new function claims instead of waiting for one to start.
        self.warm = WarmPool(config.engine.local_pool_size, self._start_pool_worker, self._stop_worker)

    # -----------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        self._stopping = False
        self._ensure_session()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle(), name="local-engine-reaper")
        self.warm.start(self.pool_runtimes())

    def pool_runtimes(self) -> list[str]:
        """The runtimes the warm pool keeps servers for: each configured one that has a server here."""
        runtimes = dict.fromkeys(runtime_dir for _, runtime_dir in self.runtime_map)
        return [runtime for runtime in runtimes if self._server_command(runtime) is not None]

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # One session, keep-alive connections to every runtime; no connection cap because each
            # runtime handles its own concurrency.
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def stop(self) -> None:
        self._stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await self.warm.stop()
        if self._cancels:
            await asyncio.wait(list(self._cancels), timeout=CANCEL_TIMEOUT)
        workers = [w for pool in self._pools.values() for w in pool]
        self._pools.clear()
        await asyncio.gather(*(self._stop_worker(w) for w in workers), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def release(self, function_id: str, version: int | None = None) -> None:
        keys = [k for k in self._pools if k[0] == function_id and (version is None or k[1] == version)]
        workers = [w for k in keys for w in self._pools.pop(k, [])]
        if workers:
            LOG.info("releasing %d worker(s) of function %s version %s", len(workers), function_id, version)
        await asyncio.gather(*(self._stop_worker(w) for w in workers), return_exceptions=True)
        # Their unpacked trees go too (a deleted function's code must not stay on disk; the next
        # execution of a version that still exists unpacks it again).
        prefix = f"{function_id}_" + (f"{version}_" if version is not None else "")
        await asyncio.to_thread(_remove_unpacked, self.work_root, prefix)

    async def workers(self, function_id: str, version: int = 0) -> list[str]:
        return [w.name for k, pool in self._pools.items() if k[0] == function_id and k[1] == version
                for w in pool if w.alive]

    # -----------------------------------------------------------------------------------------
    # Executions

    def runtime_for(self, image: str | None) -> str | None:
        """The runtime dir for an image: the first 'substring=dir' pair whose substring it contains."""
        for substring, runtime_dir in self.runtime_map:
            if image and substring in image:
                return runtime_dir
        return None

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        fn = request.function
        log_extra = {"execution_id": request.execution_id}
        if fn.code.get("source") == "image":
            return ExecutionResult.platform_error(
                f"The local engine does not run image functions (code source 'image', image {fn.code.get('image')!r}): "
                "they run on the kubernetes engine ([engine] backend = kubernetes). Create the function from a "
                "package to run it here.")
        runtime = self.runtime_for(fn.runtime_image)
        if runtime is None:
            pairs = ", ".join(self.config.engine.local_runtimes) or "(empty)"
            return ExecutionResult.platform_error(
                f"No local runtime for image {fn.runtime_image!r}: no [engine] local_runtimes entry "
                f"('substring=runtime_dir') matches it; configured: {pairs}.")
        if self._server_command(runtime) is None:
            return ExecutionResult.platform_error(
                f"Local runtime {runtime!r} (for image {fn.runtime_image!r}) has no server.py or server.js (with node "
                f"on PATH) in {self.runtimes_dir / runtime}; set HEADWATER_RUNTIMES_DIR or fix [engine] local_runtimes.")
        package = fn.package
        try:
            if package is None and fn.code.get("source") == "swift":
                swift = fn.code.get("swift") or {}
                package = await self.packages.fetch_swift(fn.project_id, fn.id, swift.get("container", ""), swift.get("object", ""))
            if package is None:
                return ExecutionResult.platform_error(f"Function {fn.id} version {fn.version} has no code package.")
            package_path = await self._package_path(package)
        except Exception as exc:  # noqa: BLE001 - any storage trouble is a platform error
            LOG.error("cannot get the package of function %s: %s", fn.id, exc, extra=log_extra)
            return ExecutionResult.platform_error(f"Function package unavailable: {exc}")
        key = (fn.id, fn.version, package.md5sum)
        timeout = fn.timeout or self.config.resource_limits.default_timeout
        context = dict(request.context)
        context.setdefault("execution_id", request.execution_id)
        context.setdefault("function_id", fn.id)
        context.setdefault("function_version", fn.version)
        body = {
            "execution_id": request.execution_id,
            "entry": fn.entry or "main.main",
            "input": request.input,
            "timeout": timeout,
            "package": {"path": package_path, "md5sum": package.md5sum, "function_id": fn.id, "version": fn.version},
            "limits": {"memory_size": fn.memory_size, "cpu": fn.cpu},
            "context": context,
        }
        for attempt in (1, 2):
            try:
                worker = await self._acquire(key, runtime)
            except Exception as exc:  # noqa: BLE001 - start-up failures are platform errors
                LOG.error("cannot start a %s runtime for function %s: %s", runtime, fn.id, exc, extra=log_extra)
                return ExecutionResult.platform_error(f"Could not start the {runtime} runtime: {exc}")
            try:
                return await self._post(worker, body, timeout, log_extra)
            except aiohttp.ClientConnectorError as exc:
                # The request never reached the runtime, so one retry on a fresh worker is safe.
                LOG.warning("runtime worker %s unreachable (%s); retrying on a new worker", worker.name, exc, extra=log_extra)
                if attempt == 2:
                    return ExecutionResult.platform_error(f"Runtime worker {worker.name} unreachable: {exc}")
        raise AssertionError("unreachable")

    async def _post(self, worker: Worker, body: dict[str, Any], timeout: float, log_extra: dict) -> ExecutionResult:
        session = self._ensure_session()
        worker.inflight += 1
        try:
            data = orjson.dumps(body)
            client_timeout = aiohttp.ClientTimeout(total=timeout + HTTP_MARGIN, sock_connect=5)
            async with session.post(worker.url + "/execute", data=data, headers=worker.headers, timeout=client_timeout) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    text = raw[:300].decode("utf-8", "replace")
                    return ExecutionResult.platform_error(f"Runtime worker {worker.name} answered HTTP {resp.status}: {text}")
            reply = orjson.loads(raw)
        except asyncio.CancelledError:
            # The caller gave up on this execution (a newer cron tick replaced it, the router is
            # stopping). The runtime kills the function when this connection closes; the explicit
            # cancel is for when the close does not reach it promptly.
            self._cancel_remote(worker, body["execution_id"], log_extra)
            raise
        except TypeError as exc:
            return ExecutionResult.platform_error(f"Execution input or context is not JSON serialisable: {exc}")
        except asyncio.TimeoutError:
            # The runtime enforces the function's timeout itself; silence past the margin means the
            # runtime is stuck, so it goes.
            LOG.error("runtime worker %s did not answer in %.0f s; restarting it", worker.name, timeout + HTTP_MARGIN, extra=log_extra)
            await self._drop(worker)
            return ExecutionResult.platform_error(f"Runtime worker {worker.name} did not answer in time.")
        except aiohttp.ClientConnectorError:
            # Nothing was sent: the runtime is gone or not listening. The caller may retry elsewhere.
            await self._drop(worker)
            raise
        except (aiohttp.ClientError, OSError, orjson.JSONDecodeError) as exc:
            LOG.error("runtime worker %s failed: %r", worker.name, exc, extra=log_extra)
            # A dropped connection usually means the runtime died; give its exit a moment to show.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.process.wait()), 1.0)
            if not worker.alive:
                await self._drop(worker)
            return ExecutionResult.platform_error(f"Runtime worker {worker.name} failed: {exc or type(exc).__name__}")
        finally:
            worker.inflight -= 1
            worker.last_used = time.monotonic()
        if not isinstance(reply, dict):
            return ExecutionResult.platform_error(f"Runtime worker {worker.name} sent an unexpected reply.")
        ok = bool(reply.get("success"))
        return ExecutionResult(
            status="success" if ok else "failed",
            output=reply.get("output"),
            duration=float(reply.get("duration") or 0.0),
            logs=reply.get("logs") or "",
            reason=reply.get("reason") or ("ok" if ok else "error"),
        )

    async def build(self, function: FunctionSpec) -> BuildResult:
        """Compile a function's package with its runtime's POST /build (a runtime server kept for
        builds, the compiler contained like an execution); the artifact zip comes back."""
        runtime = self.runtime_for(function.runtime_image)
        if runtime is None or self._server_command(runtime) is None:
            return BuildResult(False, message=f"No local runtime builds image {function.runtime_image!r} ([engine] local_runtimes).")
        if function.package is None:
            return BuildResult(False, message=f"Function {function.id} has no code package to build.")
        log_extra = {"function_id": function.id, "function_version": function.version}
        timeout = self.config.engine.build_timeout
        try:
            package_path = await self._package_path(function.package)
            worker = await self._acquire((f"build:{runtime}", 0, ""), runtime)
        except Exception as exc:  # noqa: BLE001 - storage or start-up trouble: the build could not run
            LOG.error("cannot start a %s build for function %s: %s", runtime, function.id, exc, extra=log_extra)
            return BuildResult(False, message=f"Could not start the {runtime} build: {exc}")
        body = {"execution_id": f"build-{function.id}-{function.version}", "timeout": timeout,
                "package": {"path": package_path, "md5sum": function.package.md5sum, "function_id": function.id,
                            "version": function.version},
                "limits": {"memory_size": function.memory_size}}
        worker.inflight += 1
        try:
            return await post_build(self._ensure_session(), worker.url, body, timeout + HTTP_MARGIN, worker=worker.name,
                                    runtime=runtime, extra=log_extra, headers=worker.headers)
        finally:
            worker.inflight -= 1
            worker.last_used = time.monotonic()

    def _cancel_remote(self, worker: Worker, execution_id: str, log_extra: dict) -> None:
        if not worker.alive or self._session is None:
            return
        task = asyncio.get_running_loop().create_task(
            post_cancel(self._session, worker.url, execution_id, worker=worker.name, extra=log_extra,
                        headers=worker.headers))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _package_path(self, ref: PackageRef) -> str:
        path = self.packages.path(ref)
        if path:
            return path
        # A store whose local copy is a cache (Swift) has the file once it has been read.
        data = await self.packages.get(ref)
        path = self.packages.path(ref)
        if path:
            return path
        # A store without local files: keep a local copy for the runtimes to read.
        cached = Path(self.config.data_dir) / "engine-cache" / ref.project_id / f"{ref.function_id}_{ref.version}_{ref.md5sum}.zip"
        if not cached.is_file():
            await asyncio.to_thread(write_atomic, cached, data)
        return str(cached)

    # -----------------------------------------------------------------------------------------
    # Workers

    async def _acquire(self, key: tuple[str, int, str], runtime: str) -> Worker:
        worker = self._pick(key)
        if worker is not None:
            return worker
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            worker = self._pick(key)  # another execution may have started one meanwhile
            if worker is not None:
                return worker
            worker = self.warm.claim(runtime)
            if worker is not None:
                pool_name, worker.key, worker.name = worker.name, key, self._worker_name(key, runtime)
                LOG.info("runtime worker %s (pid %d) claimed from the warm pool as %s", pool_name, worker.process.pid, worker.name)
            else:
                worker = await self._start_worker(key, runtime)
            self._pools.setdefault(key, []).append(worker)
            return worker

    def _pick(self, key: tuple[str, int, str]) -> Worker | None:
        """The least-busy live worker, unless all are at [engine] function_concurrency and the pool may grow."""
        pool = self._pools.get(key)
        if not pool:
            return None
        dead = [w for w in pool if not w.alive]
        for w in dead:
            LOG.warning("runtime worker %s exited with %s; a new one will be started", w.name, w.process.returncode)
            pool.remove(w)
            for task in w.log_tasks:
                task.cancel()
        if not pool:
            return None
        best = min(pool, key=lambda w: w.inflight)
        if best.inflight < self.concurrency or len(pool) >= self.max_workers:
            return best
        return None

    def _server_command(self, runtime: str) -> list[str] | None:
        """How to start a runtime's server: server.py with this interpreter, or server.js with node.
        Every execution asks: a server found is remembered (no stat() per execution); a missing
        one is looked for again next time, so installing it needs no restart."""
        known = self._server_commands.get(runtime)
        if known is not None:
            return known
        folder = self.runtimes_dir / runtime
        command = None
        if (folder / "server.py").is_file():
            command = [sys.executable, str(folder / "server.py")]
        else:
            node = os.environ.get("HEADWATER_NODE") or shutil.which("node")
            if (folder / "server.js").is_file() and node:
                command = [node, str(folder / "server.js")]
        if command is not None:
            self._server_commands[runtime] = command
        return command

    def _worker_name(self, key: tuple[str, int, str], runtime: str) -> str:
        function_id, version, _ = key
        return f"{runtime}-{function_id[:12]}-v{version}-{next(self._seq)}"

    async def _start_pool_worker(self, runtime: str) -> Worker:
        return await self._start_worker(None, runtime)

    async def _start_worker(self, key: tuple[str, int, str] | None, runtime: str) -> Worker:
        if self._stopping:
            raise RuntimeError("the engine is stopping")
        name = self._worker_name(key, runtime) if key is not None else f"{runtime}-pool-{next(self._seq)}"
        work_dir = self.work_root / runtime
        work_dir.mkdir(parents=True, exist_ok=True)
        command = self._server_command(runtime)
        if command is None:
            raise RuntimeError(f"no server for runtime {runtime!r} in {self.runtimes_dir}")
        server = command[-1]
        # Package paths the runtime may read: the package store and this engine's cache, nothing else.
        package_dirs = [Path(self.config.data_dir) / "engine-cache"]
        store_root = getattr(self.packages, "root", None)
        if store_root is not None:
            package_dirs.append(Path(store_root))
        limits = self.config.resource_limits
        # The runtime gets no more of our environment than it needs: never our secrets (a download-token
        # secret, database or broker URLs with passwords), whatever user code manages to read.
        env = runtime_environment()
        env.update(HEADWATER_RUNTIME_MAX_UNPACKED_BYTES=str(limits.max_package_unpacked_size),
                   HEADWATER_RUNTIME_MAX_FILES=str(limits.max_package_files))
        process = await asyncio.create_subprocess_exec(
            *_DIE_WITH_US, *command, "--host", "127.0.0.1", "--port", "0", "--work-dir", str(work_dir),
            "--parent-pid", str(os.getpid()), *(arg for d in package_dirs for arg in ("--package-dir", str(d))),
            "--network", self.config.engine.function_network,
            "--scratch-size", str(self.config.engine.function_scratch_size),
            env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so stop() can signal the whole tree
        )
        try:
            line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
        except asyncio.CancelledError:
            # The execution that asked for this worker was cancelled: a half-started server in no
            # pool would run unseen until the engine exits.
            _signal_group(process, signal.SIGKILL)
            raise
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("LISTENING "):
            _signal_group(process, signal.SIGKILL)
            err = b""
            with contextlib.suppress(asyncio.TimeoutError):
                err = await asyncio.wait_for(process.stderr.read(4000), 2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 2)
            raise RuntimeError(f"runtime server {server} did not start: {(err.decode('utf-8', 'replace') or text or 'no output').strip()[-500:]}")
        _, address, token = (text.split() + [""])[:3]
        worker = Worker(name=name, key=key, runtime=runtime, process=process, url=f"http://{address}", token=token)
        # Keep reading the runtime's output so its pipes never fill up and block it.
        worker.log_tasks = [
            asyncio.create_task(_forward(process.stdout, worker, logging.DEBUG)),
            asyncio.create_task(_forward(process.stderr, worker, logging.INFO)),
        ]
        LOG.info("started runtime worker %s (pid %d) at %s", name, process.pid, worker.url)
        return worker

    async def _drop(self, worker: Worker) -> None:
        pool = self._pools.get(worker.key)
        if pool and worker in pool:
            pool.remove(worker)
        await self._stop_worker(worker)

    async def _stop_worker(self, worker: Worker) -> None:
        process = worker.process
        if process.returncode is None:
            # SIGTERM lets the runtime kill its function children first; SIGKILL if it lingers.
            _signal_group(process, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE)
            except asyncio.TimeoutError:
                _signal_group(process, signal.SIGKILL)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), STOP_GRACE)
        for task in worker.log_tasks:
            task.cancel()
        LOG.info("stopped runtime worker %s", worker.name)

    async def _reap_idle(self) -> None:
        """Release workers idle longer than [engine] function_service_expiration."""
        period = max(1.0, min(60.0, self.expiration / 4))
        while True:
            await asyncio.sleep(period)
            await self.reap_idle(self.expiration)

    async def reap_idle(self, idle_for: float) -> int:
        """Stop every function's worker that has run nothing for idle_for seconds; how many went."""
        cutoff = time.monotonic() - idle_for
        reaped = 0
        for key, pool in list(self._pools.items()):
            idle = [w for w in pool if w.inflight == 0 and w.last_used <= cutoff]
            for w in idle:
                pool.remove(w)
                LOG.info("runtime worker %s idle for %d s; stopping it", w.name, idle_for)
                await self._stop_worker(w)
                reaped += 1
            if not pool:
                self._pools.pop(key, None)
        return reaped


def _signal_group(process: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


async def _forward(stream: asyncio.StreamReader | None, worker: Worker, level: int) -> None:
    if stream is None:
        return
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        async for line in stream:
            # The worker's current name: a pool server takes its function's name when claimed.
            LOG.log(level, "[%s] %s", worker.name, line.decode("utf-8", "replace").rstrip())


def _remove_unpacked(work_root: Path, prefix: str) -> None:
    """Remove every runtime's unpacked package trees whose name starts with prefix (function_version_)."""
    for tree in work_root.glob(f"*/packages/{prefix}*"):
        shutil.rmtree(tree, ignore_errors=True)
