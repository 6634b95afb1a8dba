"""Headwater Go runtime: the shared runtime server (runtimes/python3: server.py and its headwater_runtime package) running prebuilt Go handlers, plus POST /build."""

# The server, its containment (sandbox uid, rlimits, clean environment, process-tree kills) and the
# protocol are python3's, loaded from beside this folder. A warm child is forked and contained as
# for Python, then execs the function's prebuilt binary (`bootstrap` in the artifact), which serves
# requests over the same framed-JSON pipes. The compiler never runs on an execution's path: POST
# /build compiles a package once, under the same containment, and answers the artifact.

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1024 * 1024
BINARY = "bootstrap"  # the artifact's executable, beside the package's own files
MAIN_DIR = "headwater_main"  # the generated main package inside the function's module
DEFAULT_BUILD_TIMEOUT = 120
# The compiler's own room: a function's memory limit (32-128 MiB) is what the function may use
# beside its runtime, far too little for `go build`; the build gets this on top of it.
BUILD_FOOTPRINT = 1024 * MiB
BUILD_THREADS = 96  # the go command and its compile/link processes are multi-threaded
MESSAGE_CAP = 64 * 1024
MAX_BUILDS = max(1, (os.cpu_count() or 1) // 2)  # builds at once per runtime server
_FUNC = re.compile(r"^func\s+([A-Z][A-Za-z0-9_]*)\s*\(", re.MULTILINE)
_MODULE = re.compile(r"^\s*module\s+(\"[^\"]+\"|\S+)", re.MULTILINE)


# The shared server's folder: runtimes/python3 beside this folder in the source tree, or
# /opt/headwater/python3 below it in the image (this file being /opt/headwater/server.py). Its package,
# headwater_runtime, is the containment every runtime keeps.
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "python3"), os.path.join(HERE, "python3")]

from headwater_runtime import contained, language, packages, pool  # noqa: E402



class Go:
    """How the shared server runs (and builds) a Go function."""

    # The Go runtime's own data size at start (≈45 MiB of arenas and metadata measured with Go 1.19
    # on amd64): the memory limit is what the function may allocate beside it.
    footprint = 64 * MiB
    threads = 16  # the Go runtime's own threads (sysmon, GC workers, Ps)
    inherit: list[int] = []

    def __init__(self, go: str | None):
        self.go = go
        self.routes = {"/build": self.build}
        # A build keeps a core busy for seconds: uploads beyond this many wait their turn.
        self.building = asyncio.Semaphore(MAX_BUILDS)

    def command(self, entry: str, limits: dict) -> tuple[list[str], dict]:
        if not os.path.isfile(BINARY):
            raise RuntimeError(f"the package has no prebuilt `{BINARY}`: Go functions run once Headwater's build "
                               "step has compiled them (upload the package through the API)")
        env = {"GOTRACEBACK": "single"}
        if limits.get("memory_size"):
            # The collector works harder as the heap nears the limit, before RLIMIT_DATA stops it.
            env["GOMEMLIMIT"] = str(int(limits["memory_size"]))
        return [f"./{BINARY}"], env

    def prepare(self, pkg_dir: str, sandboxed: bool) -> str:
        # Unzipping drops the executable bit.
        binary = os.path.join(pkg_dir, BINARY)
        if os.path.isfile(binary) and not os.access(binary, os.X_OK):
            os.chmod(binary, 0o755)
        return pkg_dir

    def crash_reason(self, status: int, logs: str):
        if re.search(r"^fatal error: runtime: (out of memory|cannot allocate memory)", logs, re.MULTILINE):
            return "memory", "Function exceeded its memory limit."
        match = re.search(r"^(runtime: failed to create new OS thread.*|fatal error: newosproc.*)", logs, re.MULTILINE)
        if match:
            return "processes", f"Function reached its process limit: {match.group(1).strip()}"
        return None

    async def build(self, server, req: dict) -> dict:
        """POST /build {package, limits, timeout}: compile the package into an artifact zip (the
        package's files + `bootstrap`, which serves every exported function of the package as an
        entry), answered base64-encoded; or `failed` with the compiler's message."""
        def failed(reason: str, output: str, logs: str = "") -> dict:
            return {"success": False, "status": "failed", "reason": reason, "output": output[:MESSAGE_CAP], "logs": logs}

        if self.go is None:
            return failed("error", "The Go toolchain (`go`) is not installed where this runtime runs.")
        try:
            pkg_dir = server.pool.packages.unpack(req.get("package") or {})
        except (packages.PackageError, OSError) as exc:
            return failed("error", str(exc))
        root = tempfile.mkdtemp(prefix="headwater-go-build-")  # under /tmp: a sandbox uid can traverse to it
        try:
            src = os.path.join(root, "src")
            await asyncio.to_thread(shutil.copytree, pkg_dir, src)
            module = _module_path(src)
            if module is None:
                return failed("error", "go.mod has no module line.")
            if module == "":
                module = "function"
                with open(os.path.join(src, "go.mod"), "w") as fh:
                    fh.write("module function\n\ngo 1.19\n")
            main_dir = os.path.join(src, MAIN_DIR)
            shutil.rmtree(main_dir, ignore_errors=True)
            os.makedirs(main_dir)
            shutil.copy(os.path.join(HERE, "worker", "worker.go"), main_dir)
            handlers = _exported_functions(src)
            if not handlers:
                return failed("error", "The package has no exported function at the root of the zip to use as a "
                                       "handler (func Handler(ctx context.Context, input T) (U, error)).")
            with open(os.path.join(main_dir, "handlers.go"), "w") as fh:
                fh.write(_handlers_go(module, handlers, src + os.sep))
            os.makedirs(os.path.join(root, "home"))
            os.makedirs(os.path.join(root, "tmp"))  # the go command's work files: beside the cache, not in the child's small private /tmp
            env = {"HOME": os.path.join(root, "home"), "GOCACHE": os.path.join(root, "cache"),
                   "GOTMPDIR": os.path.join(root, "tmp"),
                   "GOPATH": os.path.join(root, "gopath"), "GOENV": "off", "GOTOOLCHAIN": "local", "GOTELEMETRY": "off",
                   "GOPROXY": "off", "GONOSUMDB": "*", "GOFLAGS": "-mod=vendor" if os.path.isdir(os.path.join(src, "vendor")) else "-mod=mod",
                   "CGO_ENABLED": "0", "GO111MODULE": "on"}
            argv = [self.go, "build", "-p", "2", "-o", os.path.join(root, BINARY), f"./{MAIN_DIR}"]
            limits = {k: v for k, v in (req.get("limits") or {}).items() if k in ("memory_size", "processes", "files", "file_size") and v}
            timeout = float(req.get("timeout") or DEFAULT_BUILD_TIMEOUT)
            async with self.building:
                timed_out, status, output = await contained.run(argv, src, env, limits, timeout, footprint=BUILD_FOOTPRINT,
                                                                     threads=BUILD_THREADS, owned=root)
            output = output.replace(src + os.sep, "").replace(root + os.sep, "")
            if timed_out:
                return failed("timeout", f"Build timed out after {timeout:g} s.", output)
            binary = os.path.join(root, BINARY)
            if status != 0 or not os.path.isfile(binary):
                return failed("error", output.strip() or pool._describe_death(status), output)
            artifact = await asyncio.to_thread(_artifact, pkg_dir, binary)  # megabytes to deflate: off the loop
            return {"success": True, "status": "success", "reason": "ok", "output": "built", "logs": output,
                    "artifact": base64.b64encode(artifact).decode()}
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _artifact(pkg_dir: str, binary: str) -> bytes:
    """The artifact zip: the package's files (a function may read them at run time) and the binary."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder, _, files in os.walk(pkg_dir):
            for name in files:
                path = os.path.join(folder, name)
                zf.write(path, os.path.relpath(path, pkg_dir))
        zf.write(binary, BINARY)
    return buf.getvalue()


def _module_path(src: str) -> str | None:
    """The module path of the package's go.mod ('' when it has none, None when it names none)."""
    path = os.path.join(src, "go.mod")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        match = _MODULE.search(fh.read())
    return match.group(1).strip('"') if match else None


def _exported_functions(src: str) -> list[str]:
    """Exported, non-generic top-level functions of the package at the root (each may be an entry)."""
    names: set[str] = set()
    for name in os.listdir(src):
        if name.endswith(".go") and not name.endswith("_test.go"):
            with open(os.path.join(src, name), encoding="utf-8", errors="replace") as fh:
                names.update(_FUNC.findall(fh.read()))
    return sorted(names)


def _handlers_go(module: str, handlers: list[str], source_root: str) -> str:
    table = "".join(f"\t{json.dumps(name)}: function.{name},\n" for name in handlers)
    return (f"// Generated by Headwater's build step: the package's exported functions, by entry name.\n"
            f"package main\n\nimport function {json.dumps(module)}\n\n"
            f"var handlers = map[string]interface{{}}{{\n{table}}}\n\n"
            f"const sourceRoot = {json.dumps(source_root)}\n")


def main(argv: list[str] | None = None) -> None:
    language.serve(Go(os.environ.get("HEADWATER_GO") or shutil.which("go")), "headwater.runtime.go", argv)

if __name__ == "__main__":
    main()
