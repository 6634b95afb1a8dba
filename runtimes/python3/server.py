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
#
# The modules, one job each (headwater_runtime/): http (the protocol), pool (warm children and one
# execution), child (what runs in a forked child), sandbox (uids, environment, killing), limits
# (rlimits), packages (fetch and unpack), pipes (framing between server and children), namespaces
# (network, private scratch), tracing, language (the hook runtimes/go and runtimes/php set: their
# workers run in these same contained children) and contained (one program, a compiler, run once
# under the same containment).

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile

from headwater_runtime import contained, namespaces, packages, pipes, pool, sandbox
from headwater_runtime.http import Server

async def serve(host: str, port: int, work_dir: str, parent_pid: int | None, *, token: str, announce_token: bool,
                package_dirs: list[str], package_urls: list[str]) -> None:
    children = pool.Pool(packages.Packages(work_dir, package_dirs, package_urls))
    server = Server(children, token)
    srv = await asyncio.start_server(server.handle, host, port, backlog=1024)
    loop = asyncio.get_running_loop()
    for sock in srv.sockets:
        pipes.SERVER_FDS.add(sock.fileno())
    # The loop's selector and self-pipe are fds the child must not keep.
    selector = getattr(loop, "_selector", None)
    if selector is not None and hasattr(selector, "fileno"):
        pipes.SERVER_FDS.add(selector.fileno())
    for attr in ("_ssock", "_csock"):
        s = getattr(loop, attr, None)
        if s is not None:
            pipes.SERVER_FDS.add(s.fileno())
    with contextlib.suppress(OSError):
        # Orphans of killed functions come to this server, which reaps them (a runtime that is a
        # container's PID 1 would otherwise collect zombies).
        sandbox.prctl(sandbox.PR_SET_CHILD_SUBREAPER, 1)
    reaper = asyncio.ensure_future(_reap_orphans())
    children.start_spare()  # before LISTENING: a server announced ready has it
    bound = srv.sockets[0].getsockname()
    # A credential the server made itself goes to its parent only, on this pipe; one it was given
    # (a pod's environment) the engine already knows and is never printed (pod logs are not secret).
    print(f"LISTENING {bound[0]}:{bound[1]}" + (f" {token}" if announce_token else ""), flush=True)
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
    children.close()


async def _reap_orphans() -> None:
    me = str(os.getpid())
    while True:
        await asyncio.sleep(1.0)
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in pool.CHILDREN or int(name) in contained.CONTAINED:
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
    # In a pool pod the engine sets these (the pod's own IP, the configured port), so the image's
    # own entrypoint serves without a command of the engine's.
    parser.add_argument("--host", default=os.environ.get("HEADWATER_RUNTIME_HOST") or "0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("HEADWATER_RUNTIME_PORT") or 9090),
                        help="0 picks a free port (printed as LISTENING host:port)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "headwater-python3"))
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is no longer our parent")
    parser.add_argument("--sandbox", choices=("auto", "uid", "off"), default=os.environ.get("HEADWATER_RUNTIME_SANDBOX", "auto"),
                        help="run each child as its own unprivileged uid: 'auto' when started as root")
    parser.add_argument("--package-dir", action="append", default=_env_list("HEADWATER_RUNTIME_PACKAGE_DIRS", os.pathsep),
                        help="a directory package.path may name (repeatable); any other path is refused")
    parser.add_argument("--package-url", action="append", default=_env_list("HEADWATER_RUNTIME_PACKAGE_URLS", " "),
                        help="an http(s) URL prefix package.download_url may start with (repeatable); any other URL is refused")
    parser.add_argument("--network", choices=namespaces.NETWORKS, default=os.environ.get("HEADWATER_RUNTIME_NETWORK", "none"),
                        help="as root: 'none' gives each child a network namespace of its own (loopback only), "
                             "'host' shares the host's network")
    parser.add_argument("--scratch-size", type=int, default=namespaces.SETTINGS["scratch_size"],
                        help="as root: bytes of the private tmpfs mounted on /tmp and on /dev/shm in each child")
    args = parser.parse_args(argv)
    namespaces.SETTINGS.update(network=args.network, scratch_size=args.scratch_size)
    # The credential: given by the engine (a pod's environment), or made here and announced to the
    # parent on the LISTENING line. Either way it leaves this process's environment now, and the
    # process is made non-dumpable, so a function running as the same uid (sandbox off) cannot read
    # it from /proc/<pid>/environ or /proc/<pid>/mem.
    token = os.environ.pop("HEADWATER_RUNTIME_TOKEN", "")
    announce = not token
    token = token or secrets.token_urlsafe(32)
    with contextlib.suppress(OSError):
        sandbox.prctl(sandbox.PR_SET_DUMPABLE, 0)
    if args.sandbox == "uid" and os.geteuid() != 0:
        parser.error("--sandbox uid needs root (it switches each child to a uid of its own)")
    sandbox.SANDBOX["uids"] = args.sandbox == "uid" or (args.sandbox == "auto" and os.geteuid() == 0)
    os.umask(0o022)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.host, args.port, args.work_dir, args.parent_pid, token=token, announce_token=announce,
                      package_dirs=args.package_dir, package_urls=args.package_url))


def _env_list(name: str, sep: str) -> list[str]:
    return [item for item in os.environ.get(name, "").split(sep) if item]


if __name__ == "__main__":
    main()

