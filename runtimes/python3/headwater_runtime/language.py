"""Another language on this server (go, php): the hook its launcher sets, and the exec of its worker in a contained child."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import runpy

from headwater_runtime import limits as limits_mod, pipes

# Set by a launcher that runs another language on this server (runtimes/go, runtimes/php): an object
# with command(entry, limits) -> (argv, env), footprint, threads, inherit (fds passed as 5, 6, …),
# prepare(pkg_dir, sandboxed) -> the directory the worker runs in,
# crash_reason(status, logs) -> (reason, output) | None, and routes {path: async handler(server, req)}
# (each needs the server's credential, like /execute). None: this is the python3 runtime, children
# import the function themselves.
LANGUAGE = None


def serve(hook, log_name: str, argv: list[str] | None = None) -> None:
    """Run the shared server (server.py beside this package) with `hook` as its language: what a
    launcher (runtimes/go/server.py, runtimes/php/server.py) does."""
    global LANGUAGE
    LANGUAGE = hook
    logging.getLogger("headwater.runtime.python3").name = log_name  # the server's log lines name the language
    server = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "server.py")
    runpy.run_path(server, run_name="headwater_runtime_server")["main"](argv)


def routes() -> dict:
    """The language's own routes (go: /build); none for python3."""
    return LANGUAGE.routes if LANGUAGE is not None else {}


def exec_worker(entry: str, limits: dict, req_r: int, result_w: int) -> None:
    """Replace this child, already contained (own session, sandbox uid, namespaces, clean
    environment, cwd in the package), with the language's worker program; it speaks the same framed
    JSON, requests on fd 3 and results on fd 4, and inherits stdout/stderr (the log pipe). Never returns."""
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
        limits_mod.apply(limits, footprint=LANGUAGE.footprint, threads=LANGUAGE.threads)
        os.execve(argv[0], argv, {**os.environ, **env})
    except BaseException as exc:  # noqa: BLE001 - answered as the function's load failure
        message = f"Runtime could not start the function's worker: {exc}"
    # Answer the request that started this child, then exit: the server starts a fresh one next time.
    payload = json.dumps({"status": "failed", "reason": "error", "output": message, "recycle": True}).encode()
    with contextlib.suppress(OSError):
        if pipes.read_exact(fds[0], pipes.FRAME.size):
            pipes.write_all(fds[1], pipes.FRAME.pack(len(payload)) + payload)
    os._exit(0)


def crash_reason(status: int, logs: str) -> tuple[str, str] | None:
    """The language's reason for a worker that died without a result (Go: "fatal error: runtime: out
    of memory" is a memory limit), from its exit status and last log lines; None: no such reason."""
    return LANGUAGE.crash_reason(status, logs) if LANGUAGE is not None else None
