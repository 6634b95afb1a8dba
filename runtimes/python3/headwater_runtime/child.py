"""The forked child: imports the entry once, then runs one request at a time and answers on a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import linecache
import os
import re
import resource
import signal
import socket
import sys
import traceback

from headwater_runtime import language, limits as limits_mod, namespaces, pipes, sandbox

def main(pkg_dir: str | None, entry: str, limits: dict, req_r: int, result_w: int, log_w: int, server_pid: int,
                uid: int = 0, ctl: int | None = None) -> None:
    """Runs in the forked child; never returns. A spare (pkg_dir None) gets its package, entry and
    limits on the socket ctl once the server has a request for it (Child.assign)."""
    code = 0
    me = sandbox.CHILD_PID = os.getpid()
    try:
        os.setsid()  # own process group: the server kills the whole tree with one killpg
        if ctl is not None:
            pkg_dir, entry, limits, path_entry = _await_package(ctl, uid, server_pid)
        else:
            # A language's worker opens its package by absolute path: keep it visible under private /tmp.
            path_entry = sandbox.enter(pkg_dir, uid, keep=(pkg_dir,) if language.LANGUAGE is not None else ())
        sandbox.die_with_parent(server_pid)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big file raises OSError, not a silent death
        sandbox.own_stdio(log_w, keep={req_r, result_w})
        os.close(log_w)
        # asyncio remembers the server's running loop per thread; clear it so the function may use
        # asyncio.run().
        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop(None)
        if language.LANGUAGE is not None:
            language.exec_worker(entry, limits, req_r, result_w)  # never returns
        sys.path.insert(0, path_entry)
        limits_mod.apply(limits)
        func, takes_context, load_error = _load(entry)
        while True:
            head = pipes.read_exact(req_r, pipes.FRAME.size)
            if not head:
                break  # the server retired this child, or died
            req = json.loads(pipes.read_exact(req_r, pipes.FRAME.unpack(head)[0]))
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
            pipes.write_all(result_w, pipes.FRAME.pack(len(payload)) + payload)
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


def _await_package(ctl: int, uid: int, server_pid: int) -> tuple[str, str, dict, str]:
    """A spare child: make its network namespace now, as root and before any package is known (the
    costly part of a new child, which a server's first new function would otherwise wait for), then
    wait for the package and contain itself as enter() does. Until then it runs no user code and
    holds nothing of any function."""
    sandbox.die_with_parent(server_pid)  # while it waits; set again after the uid switch clears it
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    namespaces.isolate_network()
    sock = socket.socket(fileno=ctl)
    try:
        message, fds, _, _ = socket.recv_fds(sock, 65536, 1)
    finally:
        sock.close()
    pipes.SERVER_FDS.discard(ctl)
    if not message or not fds:
        os._exit(0)  # retired unused
    assignment = json.loads(message)
    # The package's directory, opened in the server's mount namespace (this one, still): the current
    # directory before the private mounts, exactly as enter() has it.
    os.fchdir(fds[0])
    namespaces.isolate_mounts()
    path_entry = sandbox.enter_package(fds[0], assignment["pkg_dir"], uid)
    return assignment["pkg_dir"], assignment["entry"], assignment["limits"], path_entry


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
        if os.getpid() != sandbox.CHILD_PID:
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
    for prefix in sandbox.PKG_PREFIXES:
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


