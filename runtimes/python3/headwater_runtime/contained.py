"""One program (a compiler) run once under a function's containment, its output captured."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from headwater_runtime import limits as limits_mod, pipes, sandbox

OUTPUT_CAP = 1024 * 1024  # bytes of stdout+stderr kept, as for an execution's logs

CONTAINED: set[int] = set()  # pids of programs run here (reaped by run(), not by the orphan reaper)


async def run(argv: list[str], cwd: str, env: dict, limits: dict, timeout: float,
              footprint: int | None = None, threads: int = 0, owned: str | None = None) -> tuple[bool, int, str]:
    """Run one program under a function's containment: own session, sandbox uid (given the tree
    `owned`, default `cwd`), the child's namespaces (no network, private /tmp: `owned` stays visible),
    clean environment plus `env`, rlimits, no server descriptors, killed with all it started when it
    ends or `timeout` passes. Returns (timed out, wait status, stdout+stderr capped like logs)."""
    loop = asyncio.get_running_loop()
    tree = owned or cwd
    uid = sandbox.allocate_uid()
    try:
        if uid:
            for root, _, files in os.walk(tree):
                for name in [root, *(os.path.join(root, f) for f in files)]:
                    os.lchown(name, uid, uid)
        out_r, out_w = pipes.pipe()
        server_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            _exec(argv, cwd, env, limits, footprint, threads, tree, uid, out_w, server_pid)
        CONTAINED.add(pid)
        pipes.close(out_w)
        try:
            return await _collect(loop, pid, out_r, uid, timeout)
        finally:
            CONTAINED.discard(pid)
    finally:
        sandbox.release_uid(uid)


def _exec(argv, cwd, env, limits, footprint, threads, tree, uid, out_w, server_pid) -> None:
    """In the forked process: contain it as a function's child, then exec the program. Never returns."""
    try:
        os.setsid()
        sandbox.enter(cwd, uid, keep=(tree,))
        sandbox.die_with_parent(server_pid)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        sandbox.own_stdio(out_w, keep=set())
        limits_mod.apply(limits, footprint=footprint, threads=threads)
        os.execve(argv[0], argv, {**os.environ, **env})
    except BaseException as exc:  # noqa: BLE001 - reported through the output pipe
        with contextlib.suppress(Exception):
            os.write(2, f"cannot run {argv[0]}: {exc}\n".encode())
    os._exit(127)


async def _collect(loop: asyncio.AbstractEventLoop, pid: int, out_r: int, uid: int, timeout: float) -> tuple[bool, int, str]:
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
        output.extend(chunk[:max(OUTPUT_CAP - len(output), 0)])

    loop.add_reader(out_r, on_output)
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(eof), timeout)  # end-of-file: everything it started is done writing
    except asyncio.TimeoutError:
        timed_out = True
    finally:
        sandbox.killpg(pid)  # nothing it started outlives it
        if uid:
            sandbox.kill_uid(uid)
        with contextlib.suppress(Exception):
            loop.remove_reader(out_r)
        pipes.close(out_r)
        try:
            _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        except ChildProcessError:
            status = 0
    return timed_out, status, output.decode("utf-8", "replace")
