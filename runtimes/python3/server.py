"""Headwater Python 3 runtime: a stdlib-only HTTP server that runs functions in warm child processes."""

# This program runs inside runtime pods and as local runtime processes. It must only use the Python
# standard library and must never import Headwater's own packages (router/, engine/, ...).
#
# How an execution runs: the server keeps, per (package, entry, limits), warm child processes that
# have imported the function's module. A request is handed to an idle child over a pipe; the child
# calls the function with its stdout/stderr on a log pipe and answers on a result pipe. A child that
# times out or dies is killed with its whole process group and replaced, so user code can never
# take the server down. Children are reused across executions (module globals survive between
# calls, as in other FaaS platforms) because forking a fresh process per call costs 2-4 ms on
# small VMs, more than the whole latency budget.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import hashlib
import inspect
import io
import json
import linecache
import logging
import os
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import urllib.request
import zipfile

try:  # loaded once here so each forked child need not (prctl for parent-death signals)
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except (ImportError, OSError):
    _LIBC = None

LOG = logging.getLogger("headwater.runtime.python3")

LOG_CAP = 1024 * 1024  # bytes of stdout+stderr kept per execution
MAX_BODY = 64 * 1024 * 1024  # largest /execute request accepted
DEFAULT_NOFILE = 1024
DEFAULT_NPROC = 128  # processes (and threads) a function may have beside its own interpreter; Qinling's value
DEFAULT_FSIZE = 524288000  # largest file a function may write (bytes); Qinling's value
# Sandbox uids (used when the server runs as root): every child gets its own uid so RLIMIT_NPROC
# counts exactly that child's processes and one kill(-1) as that uid ends all of them. The uid is
# derived from the server's pid and a per-server slot, so concurrent servers never share one.
SANDBOX_UID_BASE = 2 ** 30  # below 2**31: Node takes uids as int32
SANDBOX_UID_SLOTS = 256
# The environment a function sees: the server's own (which may hold the engine's credentials) is
# never passed on.
SAFE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONIOENCODING", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
DOWNLOAD_TIMEOUT = 30
IDLE_CHILDREN = 4  # warm children kept per (package, entry, limits) beyond those running
# Children running at once per (package, entry, limits); further requests queue (the wait does not
# count against their timeout). Unbounded, a burst of 256 requests forked 256 children — each
# importing the function — and throughput fell to ~25 executions/s on two cores.
MAX_CHILDREN = int(os.environ.get("HEADWATER_RUNTIME_MAX_CHILDREN", "0")) or max(4, 2 * (os.cpu_count() or 1))
TIMEOUT_OUTPUT = "Function execution timeout."
CANCELLED_OUTPUT = "Function execution cancelled."
# How often a running /execute checks whether its client hung up. asyncio tells a handler about the
# end of its connection only when it reads, and it must not read (a pipelined request would be eaten).
HANGUP_POLL = 0.2

_FRAME = struct.Struct(">Q")  # length prefix of request and result messages on the pipes

# Descriptors the server owns (sockets, the loop's selector, every pipe end); each child closes
# them, so user code never touches the server's sockets and never holds another execution's pipe
# open (which would keep it from seeing end-of-file).
_SERVER_FDS: set[int] = set()


# ---------------------------------------------------------------------------------------------
# Packages: unpacked once per (function, version, md5) into the work dir


class PackageError(Exception):
    """The package could not be fetched or unpacked; the message is shown to the user."""


class Packages:
    def __init__(self, work_dir: str):
        self.work_dir = os.path.abspath(work_dir)
        os.makedirs(os.path.join(self.work_dir, "packages"), exist_ok=True)
        if SANDBOX["uids"]:
            # Sandboxed children reach their own package through an open descriptor only.
            os.chmod(os.path.join(self.work_dir, "packages"), 0o700)
        self._dirs: dict[str, str] = {}

    @staticmethod
    def key(package: dict) -> str:
        fid = str(package.get("function_id") or "anonymous")
        version = str(package.get("version") or 0)
        md5 = str(package.get("md5sum") or "")
        if not md5 and package.get("path"):
            # Without an md5 the path's identity (size + mtime) decides when to unpack again.
            try:
                st = os.stat(package["path"])
                md5 = f"{st.st_size}-{st.st_mtime_ns}"
            except OSError:
                md5 = "nomd5"
        raw = f"{fid}_{version}_{md5}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)[:200]

    def unpack(self, package: dict) -> str:
        """The directory holding the unpacked package (unpacked now if this is the first time)."""
        key = self.key(package)
        known = self._dirs.get(key)
        if known:
            return known
        target = os.path.join(self.work_dir, "packages", key)
        if not os.path.isdir(target):
            data = self._fetch(package)
            md5 = package.get("md5sum")
            if md5 and hashlib.md5(data).hexdigest() != str(md5).lower():
                raise PackageError("Package md5 mismatch.")
            # Unpack beside the target and rename: another worker sharing the work dir never sees a
            # half-written tree.
            tmp = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.join(self.work_dir, "packages"))
            try:
                try:
                    with zipfile.ZipFile(io.BytesIO(data)) as zf:
                        zf.extractall(tmp)  # extractall drops absolute and '..' path parts
                except zipfile.BadZipFile as exc:
                    raise PackageError(f"Package is not a valid ZIP package: {exc}") from None
                _make_readable(tmp)  # by the sandbox uid, which owns none of it
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not os.path.isdir(target):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._dirs[key] = target
        return target

    @staticmethod
    def _fetch(package: dict) -> bytes:
        path = package.get("path")
        if path:
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise PackageError(f"Failed to read function package {path}: {exc}") from None
        url = package.get("download_url")
        if url:
            headers = {}
            if package.get("token"):
                headers["X-Auth-Token"] = package["token"]
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as resp:
                    return resp.read()
            except Exception as exc:  # noqa: BLE001 - any download failure is the same answer
                raise PackageError(f"Failed to download function package from {url}, error: {exc}") from None
        raise PackageError("Request names no package (package.path or package.download_url).")

def _make_readable(top: str) -> None:
    """Directories 0755 and files 0644 (0755 when executable): readable, never writable, by the function."""
    for root, dirs, files in os.walk(top):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                mode = os.lstat(path).st_mode
                if not os.path.islink(path):
                    os.chmod(path, 0o755 if mode & 0o100 else 0o644)

# ---------------------------------------------------------------------------------------------
# The child process: imports the entry once, then serves one request at a time


def _set_limits(limits: dict, footprint: int | None = None, threads: int = 0) -> None:
    """The execution's rlimits on this process. `footprint` (bytes) replaces the measured data size
    and `threads` adds room for the interpreter's own threads, for a child that next execs another
    language's worker (Go, PHP): what the function may add is the same for every runtime."""
    def cap(kind, value):
        value = int(value)
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_NOFILE, limits.get("files") or DEFAULT_NOFILE)
    if os.geteuid() != 0:
        # RLIMIT_NPROC counts every task (process or thread) of the uid. With a sandbox uid that is
        # exactly this child's tree, so the limit is what the function may add to what runs now.
        # Without one (a container's single uid) the server's own tasks count too: same formula.
        cap(resource.RLIMIT_NPROC, _uid_tasks() + threads + int(limits.get("processes") or DEFAULT_NPROC))
    cap(resource.RLIMIT_FSIZE, limits.get("file_size") or DEFAULT_FSIZE)
    if limits.get("memory_size"):
        # The limit is what the function may allocate on top of the interpreter's own footprint:
        # an absolute 32 MiB cap would leave a Python process no room at all.
        cap(resource.RLIMIT_DATA, (_vm_data() if footprint is None else footprint) + int(limits["memory_size"]))


def _uid_tasks() -> int:
    """Tasks of this process's real uid: this process's threads when it has a sandbox uid of its own."""
    if _SANDBOX_UID:
        try:
            return len(os.listdir("/proc/self/task"))
        except OSError:
            return 1
    uid = os.getuid()
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


def _vm_data() -> int:
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return b""
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _prctl(option: int, value: int) -> None:
    if _LIBC is None or _LIBC.prctl(option, value, 0, 0, 0) != 0:
        raise OSError("prctl failed")


def _die_with_parent(server_pid: int) -> None:
    """Ask Linux to SIGKILL this child if the server dies, so a killed server leaves no orphans."""
    try:
        # Called after any uid change: changing credentials clears the parent-death signal.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: idle children still exit on end-of-file from the server
    if os.getppid() != server_pid:
        os._exit(0)  # the server died before the request above took effect


_CHILD_PID = 0  # in a child: its own pid (a process the function forks has another)
_SANDBOX_UID = 0  # in a child: the sandbox uid it runs as (0: none)
_PKG_PREFIXES: list[str] = []  # in a child: path prefixes of the package, cut from tracebacks


def _enter_sandbox(pkg_dir: str, uid: int) -> str:
    """Drop to the sandbox uid (when given) and return the sys.path entry for the package."""
    global _SANDBOX_UID
    env = {k: v for k, v in os.environ.items() if k in SAFE_ENV or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = tempfile.gettempdir() if uid else os.environ.get("HOME", tempfile.gettempdir())
    os.environ.clear()
    os.environ.update(env)
    with contextlib.suppress(OSError):
        os.chdir(pkg_dir)
    with contextlib.suppress(OSError):
        # Orphans of the function's processes come back to this child, so it sees (and the server
        # can kill) everything the function left running.
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    path_entry = pkg_dir
    if uid:
        # The work dir is private to the server (root); the sandbox uid reaches its package only
        # through this open descriptor (and its cwd), never by path, so it cannot read other
        # functions' packages.
        dir_fd = os.open(pkg_dir, os.O_RDONLY | os.O_DIRECTORY)
        _SERVER_FDS.discard(dir_fd)
        path_entry = f"/proc/self/fd/{dir_fd}"
        _keep_imports_reachable()
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        _SANDBOX_UID = uid
        with contextlib.suppress(OSError):
            _prctl(PR_SET_DUMPABLE, 1)  # so the function may read its own /proc entries as usual
    _PKG_PREFIXES.extend({path_entry + os.sep, pkg_dir + os.sep})
    return path_entry


def _reachable_by_others(path: str) -> bool:
    """Whether a uid owning nothing can traverse to (and read) this directory."""
    path = os.path.abspath(path)
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        while path != os.sep:
            path = os.path.dirname(path)
            if not os.stat(path).st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def _keep_imports_reachable() -> None:
    """Before dropping to the sandbox uid: reach interpreter directories it could not traverse (an
    interpreter installed under /root, say) through open descriptors, so imports keep working."""
    for i, entry in enumerate(list(sys.path)):
        if entry and os.path.isdir(entry) and not _reachable_by_others(entry):
            with contextlib.suppress(OSError):
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
                sys.path[i] = f"/proc/self/fd/{fd}"
                _PKG_PREFIXES.append(sys.path[i] + os.sep)
    sys.path_importer_cache.clear()


def _child_main(pkg_dir: str, entry: str, limits: dict, req_r: int, result_w: int, log_w: int, server_pid: int,
                uid: int = 0) -> None:
    """Runs in the forked child; never returns."""
    global _CHILD_PID
    code = 0
    me = _CHILD_PID = os.getpid()
    try:
        os.setsid()  # own process group: the server kills the whole tree with one killpg
        path_entry = _enter_sandbox(pkg_dir, uid)
        _die_with_parent(server_pid)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big file raises OSError, not a silent death
        _own_stdio(log_w, keep={req_r, result_w})
        os.close(log_w)
        # asyncio remembers the server's running loop per thread; clear it so the function may use
        # asyncio.run().
        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop(None)
        if LANGUAGE is not None:
            _exec_worker(entry, limits, req_r, result_w)
        sys.path.insert(0, path_entry)
        _set_limits(limits)
        func, takes_context, load_error = _load(entry)
        while True:
            head = _read_exact(req_r, _FRAME.size)
            if not head:
                break  # the server retired this child, or died
            req = json.loads(_read_exact(req_r, _FRAME.unpack(head)[0]))
            if load_error is not None:
                result = {"status": "failed", "reason": "error", "output": load_error}
            else:
                result = _call(func, takes_context, req)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            if os.getpid() != me:
                os._exit(0)  # a process the function forked returned from it: never answer for it
            if _has_leftovers():
                # Processes the function started are still running: the server recycles this child
                # (killing them) rather than let them run into the next execution.
                result["leftovers"] = True
            payload = _encode(result)
            _write_all(result_w, _FRAME.pack(len(payload)) + payload)
            if load_error is not None:
                break  # import again in a fresh child next time: the cause may have been transient
    except BaseException:  # noqa: BLE001 - the server sees the exit and reports a crash
        if os.getpid() != me:
            os._exit(0)  # a forked copy of the function: quietly
        with contextlib.suppress(Exception):
            traceback.print_exc()
            sys.stderr.flush()
        code = 70
    os._exit(code)


def _own_stdio(out: int, keep: set[int]) -> None:
    """In a child: close the server's descriptors (but `out` and `keep`), stdin from /dev/null,
    stdout and stderr to `out`."""
    for fd in _SERVER_FDS - keep - {out}:
        with contextlib.suppress(OSError):
            os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)


def _exec_worker(entry: str, limits: dict, req_r: int, result_w: int) -> None:
    """Replace this child, already contained (own session and sandbox uid, clean environment, cwd in
    the package), with the language's worker program; it speaks the same framed JSON, requests on
    fd 3 and results on fd 4, and inherits stdout/stderr (the log pipe). Never returns."""
    fds = (req_r, result_w)
    try:
        argv, env = LANGUAGE.command(entry, limits)
        # Files the worker needs that the sandbox uid may not reach by path (its own script) follow as
        # 5, 6, …; through high numbers first, since any of them may already sit on a target number.
        wanted = [*fds, *LANGUAGE.inherit]
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10 + len(wanted)) for fd in wanted]
        for target, fd in enumerate(high, start=3):
            os.dup2(fd, target, inheritable=True)
        fds = (3, 4)
        # Nothing else of the server's reaches the worker (Python's own descriptors are close-on-exec,
        # this also covers any that are not).
        os.closerange(3 + len(wanted), max(os.sysconf("SC_OPEN_MAX"), 1024))
        _set_limits(limits, footprint=LANGUAGE.footprint, threads=LANGUAGE.threads)
        os.execve(argv[0], argv, {**os.environ, **env})
    except BaseException as exc:  # noqa: BLE001 - answered as the function's load failure
        message = f"Runtime could not start the function's worker: {exc}"
    # Answer the request that started this child, then exit: the server starts a fresh one next time.
    payload = json.dumps({"status": "failed", "reason": "error", "output": message, "recycle": True}).encode()
    with contextlib.suppress(OSError):
        if _read_exact(fds[0], _FRAME.size):
            _write_all(fds[1], _FRAME.pack(len(payload)) + payload)
    os._exit(0)


async def run_contained(argv: list[str], cwd: str, env: dict, limits: dict, timeout: float,
                        footprint: int | None = None, threads: int = 0, owned: str | None = None) -> tuple[bool, int, str]:
    """Run one program (a compiler) under a function's containment: own session, sandbox uid (which
    is given the tree `owned`, default `cwd`), clean environment plus `env`, rlimits, no server
    descriptors, killed with all it started when it ends or `timeout` passes. Returns (timed out,
    wait status, stdout+stderr capped like logs)."""
    loop = asyncio.get_running_loop()
    uid = _sandbox_uid()
    if uid:
        for root, dirs, files in os.walk(owned or cwd):
            for name in [root, *(os.path.join(root, f) for f in files)]:
                os.lchown(name, uid, uid)
    out_r, out_w = _pipe()
    server_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            _enter_sandbox(cwd, uid)
            _die_with_parent(server_pid)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_DFL)
            _own_stdio(out_w, keep=set())
            _set_limits(limits, footprint=footprint, threads=threads)
            os.execve(argv[0], argv, {**os.environ, **env})
        except BaseException as exc:  # noqa: BLE001 - reported through the output pipe
            with contextlib.suppress(Exception):
                os.write(2, f"cannot run {argv[0]}: {exc}\n".encode())
        os._exit(127)
    CONTAINED.add(pid)
    _close(out_w)
    os.set_blocking(out_r, False)
    output = bytearray()
    eof = loop.create_future()

    def on_output() -> None:
        try:
            chunk = os.read(out_r, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            loop.remove_reader(out_r)
            if not eof.done():
                eof.set_result(None)
            return
        output.extend(chunk[:max(LOG_CAP - len(output), 0)])

    loop.add_reader(out_r, on_output)
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(eof), timeout)  # end-of-file: everything it started is done writing
    except asyncio.TimeoutError:
        timed_out = True
    finally:
        _killpg(pid)  # nothing it started outlives it
        if uid:
            _kill_uid(uid)
        with contextlib.suppress(Exception):
            loop.remove_reader(out_r)
        _close(out_r)
        try:
            _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        except ChildProcessError:
            status = 0
        CONTAINED.discard(pid)
    return timed_out, status, output.decode("utf-8", "replace")


CONTAINED: set[int] = set()  # pids of run_contained programs (reaped by it, not by the orphan reaper)


def _has_leftovers() -> bool:
    """Whether the function left processes behind (this child is their subreaper, so all are children)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _load(entry: str):
    """(function, takes_context, None) or (None, False, error message); import output goes to the log."""
    module_name, sep, func_name = entry.rpartition(".")
    if not sep or not module_name or not func_name:
        return None, False, f"Invalid entry {entry!r}: expected 'module.function'."
    try:
        module = __import__(module_name, fromlist=["_"])
    except BaseException as exc:  # noqa: BLE001 - import-time failures of user code, incl. SystemExit
        _print_user_traceback(exc)
        return None, False, f"Failed to import module {module_name!r}: {exc}"
    func = getattr(module, func_name, None)
    if not callable(func):
        return None, False, f"Module {module_name!r} has no function {func_name!r}."
    return func, _takes_context(func), None


def _takes_context(func) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "context" and p.kind is not p.POSITIONAL_ONLY) for p in params)


def _call(func, takes_context: bool, req: dict) -> dict:
    data = req.get("input")
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(data, dict):
        kwargs = dict(data)
    elif data is not None:
        args = (data,)
    if takes_context and "context" not in kwargs:
        kwargs["context"] = req.get("context") or {}
    try:
        output = func(*args, **kwargs)
        if inspect.iscoroutine(output):
            output = asyncio.run(output)
    except MemoryError as exc:
        _print_user_traceback(exc)
        return {"status": "failed", "reason": "memory", "output": "Function exceeded its memory limit."}
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are function failures too
        if os.getpid() != _CHILD_PID:
            os._exit(1)  # a process the function forked (a fork bomb's offspring): no report, no traceback
        _print_user_traceback(exc)
        reason = "error"
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.EFBIG):
            reason = "files"
        elif isinstance(exc, OSError) and exc.errno == errno.EAGAIN and (_raised_by_fork(exc) or _at_process_limit(exc)):
            reason = "processes"
        if isinstance(exc, SystemExit):
            message = f"Function called sys.exit({exc.code!r})."
        else:
            message = str(exc) or type(exc).__name__
        if reason == "processes":
            message = f"Function reached its process limit: {message}"
        return {"status": "failed", "reason": reason, "output": message}
    return {"status": "success", "reason": "ok", "output": output}


def _raised_by_fork(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("fork", "_execute_child", "_launch", "spawnv", "posix_spawn"):
            return True
        tb = tb.tb_next
    return False


def _at_process_limit(exc: BaseException) -> bool:
    """EAGAIN from a C call (os.fork has no Python frame): blame the process limit when the failing
    line starts a process or the limit is nearly used up."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        if re.search(r"\b(fork|forkpty|spawn\w*|posix_spawn\w*|Popen|system|exec\w*)\s*\(", line):
            return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
        return False
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
    return count >= soft - 8


def _print_user_traceback(exc: BaseException) -> None:
    # Skip the runtime's own frame: the user only needs their code's part of the stack, with paths
    # relative to the package (the host's directories are none of the function's business).
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    for prefix in _PKG_PREFIXES:
        text = text.replace(prefix, "")
    sys.stderr.write(text)


def _encode(result: dict) -> bytes:
    try:
        return json.dumps(result, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        out = result.get("output")
        message = f"Function returned a value that is not JSON serialisable ({type(out).__name__}): {exc}"
        print(message, file=sys.stderr, flush=True)
        return json.dumps({"status": "failed", "reason": "error", "output": message}).encode()


# ---------------------------------------------------------------------------------------------
# The server side: warm children and one execution


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    _SERVER_FDS.update((r, w))
    return r, w


def _close(fd: int | None) -> None:
    if fd is None:
        return
    _SERVER_FDS.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of a sandbox uid, including any that left the child's process group.

    A helper process takes the uid and calls kill(-1): the kernel signals every process that uid may
    signal (all of its own, never the caller) in one pass that a fork bomb cannot outrun.
    """
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(20):
                os.kill(-1, signal.SIGKILL)
                time.sleep(0.001)
        except BaseException:  # noqa: BLE001 - ProcessLookupError: nothing (left) to kill
            pass
        os._exit(0)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


_uid_slots = iter(range(1 << 62))


def _sandbox_uid() -> int:
    """A uid no other live child of any runtime server on this host uses (0 when not sandboxing)."""
    if not SANDBOX["uids"]:
        return 0
    return SANDBOX_UID_BASE + (os.getpid() % (1 << 22)) * SANDBOX_UID_SLOTS + next(_uid_slots) % SANDBOX_UID_SLOTS


SANDBOX = {"uids": False}  # set by main(): --sandbox
# Set by a launcher that runs another language on this server (runtimes/go, runtimes/php): an object
# with command(entry, limits) -> (argv, env), footprint, threads, inherit (fds passed as 5, 6, …),
# prepare(pkg_dir, sandboxed) -> the directory the worker runs in,
# crash_reason(status, logs) -> (reason, output) | None, and routes {path: async handler(server, req)}.
# None: this is the python3 runtime, children import the function themselves.
LANGUAGE = None


class Child:
    """One warm child process serving one (package, entry, limits), one execution at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pkg_dir: str, entry: str, limits: dict):
        self.loop = loop
        req_r, self.req_w = _pipe()
        self.result_r, result_w = _pipe()
        self.log_r, log_w = _pipe()
        server_pid = os.getpid()
        self.uid = _sandbox_uid()
        pid = os.fork()
        if pid == 0:
            _child_main(pkg_dir, entry, limits, req_r, result_w, log_w, server_pid, self.uid)
        self.pid = pid
        for fd in (req_r, result_w, log_w):
            _close(fd)
        for fd in (self.req_w, self.result_r, self.log_r):
            os.set_blocking(fd, False)
        self.status: int | None = None  # wait status once the child has exited
        self.exited = loop.create_future()
        self.execution: Execution | None = None
        self.uses = 0
        # Output written while no execution runs (import-time prints) goes to the next execution.
        self.pending = bytearray()
        self.pending_dropped = 0
        self.result_buf = bytearray()
        loop.add_reader(self.result_r, self._read_result)
        loop.add_reader(self.log_r, self._read_log)
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(pid)
            _SERVER_FDS.add(self.pidfd)
            loop.add_reader(self.pidfd, self._reap)
        except (AttributeError, OSError):
            self._poller = asyncio.ensure_future(self._poll())
        CHILDREN[pid] = self

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def _read_result(self) -> None:
        while self.result_r is not None:
            try:
                chunk = os.read(self.result_r, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.loop.remove_reader(self.result_r)
                break
            self.result_buf += chunk
        buf = self.result_buf
        while len(buf) >= _FRAME.size:
            size = _FRAME.unpack_from(buf)[0]
            if len(buf) < _FRAME.size + size:
                break
            message = bytes(buf[_FRAME.size:_FRAME.size + size])
            del buf[:_FRAME.size + size]
            if self.execution is not None:
                self.execution.on_result(message)

    def _read_log(self) -> None:
        while self.log_r is not None:
            try:
                chunk = os.read(self.log_r, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.loop.remove_reader(self.log_r)
                return
            if self.execution is not None:
                self.execution.on_log(chunk)
            else:
                room = max(LOG_CAP - len(self.pending), 0)
                self.pending += chunk[:room]
                self.pending_dropped += max(len(chunk) - room, 0)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return
        CHILDREN.pop(self.pid, None)
        self.status = status
        # Anything still in the pipes was written before the exit.
        self._read_log()
        self._read_result()
        self._shut()
        if not self.exited.done():
            self.exited.set_result(status)

    async def _poll(self) -> None:
        while self.alive:
            self._reap()
            await asyncio.sleep(0.002)

    def _shut(self) -> None:
        for fd in (self.result_r, self.log_r, self.pidfd):
            if fd is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(fd)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.req_w)
        for fd in (self.req_w, self.result_r, self.log_r, self.pidfd):
            _close(fd)
        self.req_w = self.result_r = self.log_r = self.pidfd = None

    async def send(self, data: bytes) -> None:
        """Write a framed request without blocking the loop (the child may still be importing)."""
        view = memoryview(_FRAME.pack(len(data)) + data)
        while view:
            if self.req_w is None:
                raise BrokenPipeError("child exited")
            try:
                view = view[os.write(self.req_w, view):]
                continue
            except BlockingIOError:
                pass
            writable = self.loop.create_future()
            self.loop.add_writer(self.req_w, lambda: writable.done() or writable.set_result(None))
            try:
                await asyncio.wait((writable, self.exited), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if self.req_w is not None:
                    self.loop.remove_writer(self.req_w)

    def kill(self) -> None:
        """Kill the child and everything it started (its process group; with a sandbox uid, every process of it)."""
        _killpg(self.pid)
        if self.uid:
            _kill_uid(self.uid)

    def retire(self) -> None:
        """Let the child go: end-of-file on its request pipe ends its loop; the kill is for stragglers."""
        _close(self.req_w)
        self.req_w = None
        self.kill()


CHILDREN: dict[int, Child] = {}  # pid -> child, until reaped


class Execution:
    """One request on one child: collects logs and the result, enforces the timeout."""

    def __init__(self, child: Child, req: dict):
        self.child = child
        self.req = req
        self.log_buf = bytearray(child.pending)
        self.log_dropped = child.pending_dropped
        child.pending = bytearray()
        child.pending_dropped = 0
        self.result: dict | None = None
        self.timed_out = False
        self.done = child.loop.create_future()

    def on_log(self, chunk: bytes) -> None:
        room = LOG_CAP - len(self.log_buf)
        if len(chunk) > room:
            self.log_buf += chunk[:max(room, 0)]
            self.log_dropped += len(chunk) - max(room, 0)
        else:
            self.log_buf += chunk

    def on_result(self, message: bytes) -> None:
        try:
            self.result = json.loads(message)
        except ValueError:
            self.result = {"status": "failed", "reason": "crashed", "output": "Runtime child sent an unreadable result."}
        if not self.done.done():
            self.done.set_result(None)

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.child.kill()

    async def run(self) -> dict:
        child = self.child
        loop = child.loop
        timeout = float(self.req.get("timeout") or 0) or None
        payload = json.dumps(self.req, separators=(",", ":")).encode()
        child.execution = self
        child.uses += 1
        start = time.monotonic()
        timer = loop.call_later(timeout, self._on_timeout) if timeout else None
        try:
            try:
                await child.send(payload)
            except OSError:
                pass  # the child is gone; its exit status tells why
            if self.result is None:
                await asyncio.wait((self.done, child.exited), return_when=asyncio.FIRST_COMPLETED)
            if self.result is not None:
                # The child flushes stdout/stderr before it answers, so its logs are already in the
                # pipe: read them now rather than waiting for the loop to notice.
                child._read_log()
        finally:
            if timer:
                timer.cancel()
            child.execution = None
        duration = round(time.monotonic() - start, 3)
        return self._reply(duration)

    def _reply(self, duration: float) -> dict:
        result = self.result
        if result is None:
            status = self.child.status or 0
            if self.timed_out:
                result = {"status": "failed", "reason": "timeout", "output": TIMEOUT_OUTPUT}
            else:
                result = {"status": "failed", "reason": "crashed", "output": _describe_death(status)}
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXFSZ:
                    result["reason"] = "files"
                elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    # An outside SIGKILL (the kernel OOM killer, a cgroup limit) is almost always memory.
                    result["reason"] = "memory"
        logs = self.log_buf.decode("utf-8", "replace")
        if self.result is None and not self.timed_out and LANGUAGE is not None:
            # A worker's runtime dies on its own for some limits (Go: "fatal error: runtime: out of
            # memory"); the language names the reason from the exit and the last log lines.
            named = LANGUAGE.crash_reason(self.child.status or 0, logs)
            if named:
                result = {"status": "failed", "reason": named[0], "output": named[1]}
        if self.log_dropped:
            logs += f"\n[logs truncated: {self.log_dropped} more bytes were dropped]\n"
        ok = result.get("status") == "success"
        return {
            "success": ok,
            "status": "success" if ok else "failed",
            "reason": result.get("reason") or ("ok" if ok else "error"),
            "output": result.get("output"),
            "duration": duration,
            "logs": logs,
        }


def _describe_death(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"Function execution failed: the process was killed by {name} (too much resource consumption?)."
    return f"Function execution failed: the process exited with code {os.WEXITSTATUS(status)} without a result."


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 (just enough: Content-Length bodies, keep-alive)


class ClientGone(Exception):
    """The client closed its connection before the execution finished."""


class Server:
    def __init__(self, work_dir: str):
        self.packages = Packages(work_dir)
        self.idle: dict[tuple[str, str, str], list[Child]] = {}  # (package dir, entry, limits) -> warm children
        self.slots: dict[tuple[str, str, str], asyncio.Semaphore] = {}  # at most MAX_CHILDREN running per key
        self.running: dict[str, set[asyncio.Task]] = {}  # execution id -> its /execute work, for POST /cancel
        self.stopping = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        _SERVER_FDS.add(fd)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    await self._send(writer, 400, b"bad request line", close=True)
                    return
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await self._send(writer, 411, b"Content-Length required", close=True)
                    return
                length = int(headers.get("content-length") or 0)
                if length > MAX_BODY:
                    await self._send(writer, 413, b"request too large", close=True)
                    return
                body = await reader.readexactly(length) if length else b""
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                try:
                    status, payload, ctype = await self.route(method, target.split("?", 1)[0], body, reader)
                except ClientGone:
                    return  # nobody to answer; the execution was cancelled
                except Exception as exc:  # noqa: BLE001 - answer rather than drop the connection
                    LOG.exception("internal error on %s %s", method, target)
                    status, payload, ctype = 500, f"runtime internal error: {exc!r}".encode(), "text/plain"
                await self._send(writer, status, payload, ctype=ctype, close=close)
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            _SERVER_FDS.discard(fd)
            writer.close()

    @staticmethod
    async def _send(writer, status: int, payload: bytes, ctype: str = "text/plain", close: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
                  413: "Payload Too Large", 500: "Internal Server Error"}.get(status, "OK")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
        writer.write(head.encode("latin-1") + payload)
        await writer.drain()

    async def route(self, method: str, path: str, body: bytes,
                    reader: asyncio.StreamReader | None = None) -> tuple[int, bytes, str]:
        if path == "/ping":
            return 200, b"pong", "text/plain"
        extra = LANGUAGE.routes.get(path) if LANGUAGE is not None else None  # a language's own (go: /build)
        if path in ("/execute", "/cancel") or extra is not None:
            if method != "POST":
                return 405, b"use POST", "text/plain"
            try:
                req = json.loads(body)
                if not isinstance(req, dict):
                    raise ValueError("body must be a JSON object")
            except ValueError as exc:
                return 400, f"invalid JSON body: {exc}".encode(), "text/plain"
            if extra is not None:
                reply = await extra(self, req)
            elif path == "/cancel":
                reply = {"cancelled": self.cancel(str(req.get("execution_id") or ""))}
            else:
                reply = await self._execute_watched(req, reader)
            return 200, json.dumps(reply, separators=(",", ":")).encode(), "application/json"
        return 404, b"not found", "text/plain"

    def cancel(self, execution_id: str) -> int:
        """Cancel the running (or queued) executions with this id; returns how many there were."""
        work = [task for task in self.running.get(execution_id, ()) if not task.done()] if execution_id else []
        for task in work:
            task.cancel()
        if work:
            LOG.info("execution %s: cancel requested", execution_id)
        return len(work)

    async def _execute_watched(self, req: dict, reader: asyncio.StreamReader | None) -> dict:
        """Run one execution; cancel it when its client hangs up (ClientGone: there is no one to
        answer) or when POST /cancel names it (answered with reason `cancelled`)."""
        execution_id = str(req.get("execution_id") or "")
        started = time.monotonic()
        work = asyncio.ensure_future(self.execute(req))
        if execution_id:
            self.running.setdefault(execution_id, set()).add(work)
        try:
            while not work.done():
                await asyncio.wait((work,), timeout=HANGUP_POLL)
                if not work.done() and reader is not None and (reader.at_eof() or reader.exception() is not None):
                    LOG.info("execution %s: the client hung up; cancelling it", execution_id)
                    work.cancel()
                    await asyncio.wait((work,))
                    raise ClientGone()
        except asyncio.CancelledError:
            work.cancel()  # the server is going down: the execution goes with this handler
            raise
        finally:
            tasks = self.running.get(execution_id)
            if tasks is not None:
                tasks.discard(work)
                if not tasks:
                    del self.running[execution_id]
        if work.cancelled():
            return {"success": False, "status": "failed", "reason": "cancelled", "output": CANCELLED_OUTPUT,
                    "duration": round(time.monotonic() - started, 3), "logs": ""}
        return work.result()

    async def execute(self, req: dict) -> dict:
        execution_id = req.get("execution_id")
        try:
            pkg_dir = self.packages.unpack(req.get("package") or {})
        except (PackageError, OSError) as exc:
            LOG.warning("execution %s: %s", execution_id, exc)
            return {"success": False, "status": "failed", "reason": "error", "output": str(exc),
                    "duration": 0.0, "logs": ""}
        if LANGUAGE is not None:
            pkg_dir = LANGUAGE.prepare(pkg_dir, sandboxed=SANDBOX["uids"])
        limits = req.get("limits") or {}
        limits = {k: limits[k] for k in ("memory_size", "processes", "files", "file_size") if limits.get(k)}
        key = (pkg_dir, req.get("entry") or "main.main", json.dumps(limits, sort_keys=True))
        slots = self.slots.get(key)
        if slots is None:
            slots = self.slots[key] = asyncio.Semaphore(MAX_CHILDREN)
        async with slots:
            return await self._execute_in_child(key, limits, req, execution_id)

    async def _execute_in_child(self, key: tuple[str, str, str], limits: dict, req: dict, execution_id: str) -> dict:
        loop = asyncio.get_running_loop()
        idle = self.idle.setdefault(key, [])
        child = None
        while idle and child is None:
            candidate = idle.pop()
            if candidate.alive:
                child = candidate
        try:
            if child is None:
                child = Child(loop, key[0], key[1], limits)
        except OSError as exc:
            # fork/pipe failures are the runtime's trouble, not the function's
            LOG.error("execution %s: cannot start a child: %s", execution_id, exc)
            return {"success": False, "status": "failed", "reason": "crashed",
                    "output": f"Runtime could not start the execution: {exc}", "duration": 0.0, "logs": ""}
        execution = Execution(child, req)
        try:
            reply = await execution.run()
        except asyncio.CancelledError:
            # Nobody waits for this execution any more (the client hung up, or POST /cancel named
            # it): the function must stop now, not run on unseen, so its whole tree goes.
            LOG.info("execution %s cancelled; killing its child", execution_id)
            child.kill()
            if not idle and not self.stopping:
                loop.call_soon(self._spare, loop, key, limits)
            raise
        # A worker that left processes running, or that cannot serve again (a PHP fatal error), is recycled.
        leftovers = bool(execution.result and (execution.result.get("leftovers") or execution.result.get("recycle")))
        if leftovers:
            LOG.info("execution %s left processes running; recycling its child", execution_id)
        if child.alive and reply["reason"] != "timeout" and not leftovers and not self.stopping:
            if len(idle) < IDLE_CHILDREN:
                idle.append(child)
            else:
                child.retire()
        else:
            child.kill()
            if not idle and not self.stopping:
                # Have a warm child ready again before the next request needs one.
                loop.call_soon(self._spare, loop, key, limits)
        return reply

    def _spare(self, loop, key, limits) -> None:
        idle = self.idle.setdefault(key, [])
        if idle or self.stopping:
            return
        try:
            idle.append(Child(loop, key[0], key[1], limits))
        except OSError as exc:
            LOG.warning("cannot start a spare child: %s", exc)

    def close(self) -> None:
        self.stopping = True
        for children in self.idle.values():
            for child in children:
                child.retire()
        self.idle.clear()
        for child in list(CHILDREN.values()):
            child.kill()


async def serve(host: str, port: int, work_dir: str, parent_pid: int | None) -> None:
    server = Server(work_dir)
    srv = await asyncio.start_server(server.handle, host, port, backlog=1024)
    loop = asyncio.get_running_loop()
    for sock in srv.sockets:
        _SERVER_FDS.add(sock.fileno())
    # The loop's selector and self-pipe are fds the child must not keep.
    selector = getattr(loop, "_selector", None)
    if selector is not None and hasattr(selector, "fileno"):
        _SERVER_FDS.add(selector.fileno())
    for attr in ("_ssock", "_csock"):
        s = getattr(loop, attr, None)
        if s is not None:
            _SERVER_FDS.add(s.fileno())
    with contextlib.suppress(OSError):
        # Orphans of killed functions come to this server, which reaps them (a runtime that is a
        # container's PID 1 would otherwise collect zombies).
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    reaper = asyncio.ensure_future(_reap_orphans())
    bound = srv.sockets[0].getsockname()
    print(f"LISTENING {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent_pid:
        # Exit with the engine that started us, even if it died without cleaning up.
        async def watch_parent():
            while os.getppid() == parent_pid:
                await asyncio.sleep(1.0)
            stop.set()
        watcher = asyncio.ensure_future(watch_parent())
    await stop.wait()
    if parent_pid:
        watcher.cancel()
    reaper.cancel()
    srv.close()
    server.close()


async def _reap_orphans() -> None:
    me = str(os.getpid())
    while True:
        await asyncio.sleep(1.0)
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in CHILDREN or int(name) in CONTAINED:
                continue
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] == "Z":  # a zombie whose parent is this server
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(name), os.WNOHANG)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9090, help="0 picks a free port (printed as LISTENING host:port)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "headwater-python3"))
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer our parent")
    parser.add_argument("--sandbox", choices=("auto", "uid", "off"), default=os.environ.get("HEADWATER_RUNTIME_SANDBOX", "auto"),
                        help="run each child as its own unprivileged uid: 'auto' when started as root")
    args = parser.parse_args(argv)
    if args.sandbox == "uid" and os.geteuid() != 0:
        parser.error("--sandbox uid needs root (it switches each child to a uid of its own)")
    SANDBOX["uids"] = args.sandbox == "uid" or (args.sandbox == "auto" and os.geteuid() == 0)
    os.umask(0o022)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.host, args.port, args.work_dir, args.parent_pid))


if __name__ == "__main__":
    main()
