"""Function builds: a package for a compiled runtime (go) is built once on upload; its state lives on the function."""

# The state is kept in the function's `code` document, beside the package's md5:
#   code["build"] = {"status": "building"}
#                 | {"status": "available", "md5sum": <artifact md5>}
#                 | {"status": "error", "message": <the compiler's message>}
# The artifact is a zip stored in the package store beside the package (same function and version,
# its own md5); executions run it, so a cold start never runs the compiler.

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from router.config import Config
from router.plugins import BuildResult, Engine, ExecutionResult, FunctionSpec, PackageRef, PackageStore
from router.store import NotFound, Store
from router.store import models

log = logging.getLogger(__name__)

BUILDING, AVAILABLE, ERROR = "building", "available", "error"
# How often an execution waiting for a build looks at the function again.
WAIT_POLL_SECONDS = 0.2


def runtime_name(config: Config, image: str | None) -> str | None:
    """The runtime an image runs on: the first [engine] local_runtimes 'substring=runtime' pair it matches."""
    for pair in config.engine.local_runtimes:
        substring, _, runtime = pair.partition("=")
        if image and substring.strip() and substring.strip() in image:
            return runtime.strip()
    return None


def needs_build(config: Config, image: str | None) -> bool:
    return runtime_name(config, image) in config.engine.compiled_runtimes


def build_state(code: dict[str, Any] | None) -> dict[str, Any] | None:
    build = (code or {}).get("build")
    return build if isinstance(build, dict) else None


def status(code: dict[str, Any] | None) -> str:
    """What the API shows as the function's status: its build's, or available (nothing to build)."""
    build = build_state(code)
    return str(build.get("status")) if build else AVAILABLE


def artifact_ref(function: models.Function, version: int) -> PackageRef | None:
    """Where the built artifact of a function version is (None: not built). A version snapshots the
    artifact of the function when it is created (code["build"]["versions"]: number → md5)."""
    build = build_state(function.code)
    if build is None:
        return None
    if version:
        md5 = (build.get("versions") or {}).get(str(version))
    else:
        md5 = build.get("md5sum") if build.get("status") == AVAILABLE else None
    return PackageRef(function.project_id, function.id, version, md5) if md5 else None


def with_version(code: dict[str, Any], version: int, md5: str | None) -> dict[str, Any]:
    """The code document with a version's artifact recorded (md5) or forgotten (None)."""
    build = dict(build_state(code) or {})
    versions = {k: v for k, v in (build.get("versions") or {}).items() if k != str(version)}
    if md5:
        versions[str(version)] = md5
    build["versions"] = versions
    return {**code, "build": build}


def rebuilding(code: dict[str, Any] | None) -> dict[str, Any]:
    """The build state of a new package: building, keeping the artifacts of existing versions."""
    versions = (build_state(code) or {}).get("versions")
    return {"status": BUILDING, **({"versions": versions} if versions else {})}


def build_failure(code: dict[str, Any] | None) -> ExecutionResult | None:
    """The outcome of an execution of a function whose build failed: the compiler's message."""
    build = build_state(code)
    if build and build.get("status") == ERROR:
        message = build.get("message") or "The function's build failed."
        return ExecutionResult(status="error", output=message, reason="build_failed", logs=message)
    return None


async def wait(store: Store, function: models.Function, timeout: float) -> models.Function:
    """The function once its build is no longer `building` (or as it is when `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while status(function.code) == BUILDING and time.monotonic() < deadline:
        await asyncio.sleep(WAIT_POLL_SECONDS)
        function = await store.functions.get(function.id)
    return function


class Builds:
    """Starts builds in the background and records their outcome on the function."""

    def __init__(self, config: Config, store: Store, packages: PackageStore, engine: Engine, spawn, on_change) -> None:
        self.config = config
        self.store = store
        self.packages = packages
        self.engine = engine
        self.spawn = spawn  # runs a coroutine in the background, cancelled when the service stops
        self.on_change = on_change  # called when a function's build state changed (clears cached targets)

    async def resume(self) -> None:
        """Start again the builds that were running when the service stopped (functions left `building`)."""
        for row in await self.store.functions.list():
            if status(row.code) == BUILDING and row.runtime_id:
                try:
                    runtime = await self.store.runtimes.get(row.runtime_id)
                except NotFound:
                    continue
                log.info("resuming the build of function %s", row.id, extra={"function_id": row.id})
                self.start(row, runtime.image)

    def start(self, function: models.Function, runtime_image: str | None) -> None:
        self.spawn(self._run(function.id, function.project_id, str(function.code.get("md5sum")), runtime_image))

    async def _run(self, function_id: str, project_id: str, md5: str, runtime_image: str | None) -> None:
        extra = {"function_id": function_id}
        started = time.perf_counter()
        try:
            row = await self.store.functions.get(function_id)
        except NotFound:
            return
        spec = FunctionSpec(id=row.id, version=0, runtime_id=row.runtime_id, runtime_image=runtime_image, code=row.code,
                            entry=row.entry, cpu=row.cpu, memory_size=row.memory_size,
                            timeout=row.timeout or self.config.resource_limits.default_timeout,
                            package=PackageRef(project_id, function_id, 0, md5), project_id=project_id)
        builder = getattr(self.engine, "build", None)
        try:
            result = await builder(spec) if builder else BuildResult(False, message=f"The {self.engine.name} engine cannot build functions.")
        except Exception as exc:  # noqa: BLE001 - the engine promises not to raise; the state must not stay `building`
            log.exception("build of function %s raised", function_id, extra=extra)
            result = BuildResult(False, message=f"Internal build error: {type(exc).__name__}")
        artifact = None
        if result.ok and result.artifact:
            artifact = await self.packages.put(project_id, function_id, 0, result.artifact)
            state = {"status": AVAILABLE, "md5sum": artifact}
        else:
            state = {"status": ERROR, "message": result.message or "Build failed."}
        try:
            row = await self.store.functions.get(function_id)
        except NotFound:
            row = None
        if row is None or str(row.code.get("md5sum")) != md5:
            # Deleted, or a newer package arrived meanwhile (its own build records its state).
            if artifact:
                await self.packages.delete(PackageRef(project_id, function_id, 0, artifact))
            return
        versions = (build_state(row.code) or {}).get("versions")
        if versions:
            state["versions"] = versions
        await self.store.functions.update(function_id, {"code": {**row.code, "build": state}})
        self.on_change()
        log.info("function build %s", state["status"], extra={**extra, "seconds": round(time.perf_counter() - started, 3)})
