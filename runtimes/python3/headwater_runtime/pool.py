"""Warm children per (package, entry, limits), and one execution on one child (logs, result, timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time

from headwater_runtime import child as child_mod, language, packages as packages_mod, pipes, sandbox, tracing

LOG = logging.getLogger("headwater.runtime.python3")

LOG_CAP = 1024 * 1024  # bytes of stdout+stderr kept per execution
IDLE_CHILDREN = 4  # warm children kept per (package, entry, limits) beyond those running
# Children running at once per (package, entry, limits); further requests queue (the wait does not
# count against their timeout). Unbounded, a burst of 256 requests forked 256 children — each
# importing the function — and throughput fell to ~25 executions/s on two cores.
MAX_CHILDREN = int(os.environ.get("HEADWATER_RUNTIME_MAX_CHILDREN", "0")) or max(4, 2 * (os.cpu_count() or 1))
TIMEOUT_OUTPUT = "Function execution timeout."
CANCELLED_OUTPUT = "Function execution cancelled."


class Child:
    """One warm child process serving one (package, entry, limits), one execution at a time. Made
    with pkg_dir None it is a spare: forked and put in its namespaces ahead of need, it gets its
    package from assign()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pkg_dir: str | None, entry: str, limits: dict):
        self.loop = loop
        self.uid = sandbox.allocate_uid()
        req_r, self.req_w = pipes.pipe()
        self.result_r, result_w = pipes.pipe()
        self.log_r, log_w = pipes.pipe()
        self.ctl, ctl_child = _socketpair() if pkg_dir is None else (None, None)
        server_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for fd in (req_r, self.req_w, self.result_r, result_w, self.log_r, log_w, self.ctl, ctl_child):
                pipes.close(fd)
            sandbox.release_uid(self.uid)
            raise
        if pid == 0:
            pipes.close(self.ctl)
            child_mod.main(pkg_dir, entry, limits, req_r, result_w, log_w, server_pid, self.uid, ctl=ctl_child)
        self.pid = pid
        for fd in (req_r, result_w, log_w, ctl_child):
            pipes.close(fd)
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
            pipes.SERVER_FDS.add(self.pidfd)
            loop.add_reader(self.pidfd, self._reap)
        except (AttributeError, OSError):
            self._poller = asyncio.ensure_future(self._poll())
        CHILDREN[pid] = self

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def assign(self, pkg_dir: str, entry: str, limits: dict) -> None:
        """Give a spare its package, as a descriptor (its private /tmp may hide the path), and its
        entry and limits; from here on it is a child of that (package, entry, limits) only."""
        fd = os.open(pkg_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sock = socket.socket(fileno=self.ctl)
            try:
                message = json.dumps({"pkg_dir": pkg_dir, "entry": entry, "limits": limits}).encode()
                socket.send_fds(sock, [message], [fd])
            finally:
                sock.detach()
        finally:
            os.close(fd)
            pipes.close(self.ctl)
            self.ctl = None

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
        while len(buf) >= pipes.FRAME.size:
            size = pipes.FRAME.unpack_from(buf)[0]
            if len(buf) < pipes.FRAME.size + size:
                break
            message = bytes(buf[pipes.FRAME.size:pipes.FRAME.size + size])
            del buf[:pipes.FRAME.size + size]
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
        if self.uid:
            # Whatever the function left behind goes before its uid may be handed out again.
            sandbox.kill_uid(self.uid)
            sandbox.release_uid(self.uid)
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
        pipes.close(self.ctl)
        self.ctl = None
        for fd in (self.result_r, self.log_r, self.pidfd):
            if fd is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(fd)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.req_w)
        for fd in (self.req_w, self.result_r, self.log_r, self.pidfd):
            pipes.close(fd)
        self.req_w = self.result_r = self.log_r = self.pidfd = None

    async def send(self, data: bytes) -> None:
        """Write a framed request without blocking the loop (the child may still be importing)."""
        view = memoryview(pipes.FRAME.pack(len(data)) + data)
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
        sandbox.killpg(self.pid)
        if self.uid:
            sandbox.kill_uid(self.uid)

    def retire(self) -> None:
        """Let the child go: end-of-file on its request pipe ends its loop; the kill is for stragglers."""
        pipes.close(self.req_w)
        self.req_w = None
        self.kill()


CHILDREN: dict[int, Child] = {}  # pid -> child, until reaped


def _socketpair() -> tuple[int, int]:
    """A connected pair of Unix socket descriptors (a spare's control channel), owned like pipes."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = a.detach(), b.detach()
    pipes.SERVER_FDS.update(fds)
    return fds


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
        if self.result is None and not self.timed_out:
            # A worker's runtime dies on its own for some limits (Go: "fatal error: runtime: out of
            # memory"); the language names the reason from the exit and the last log lines.
            named = language.crash_reason(self.child.status or 0, logs)
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


class Pool:
    """Warm children per (package dir, entry, limits); at most MAX_CHILDREN of a key run at once."""

    def __init__(self, packages):
        self.packages = packages
        self.idle: dict[tuple[str, str, str], list[Child]] = {}  # (package dir, entry, limits) -> warm children
        self.slots: dict[tuple[str, str, str], asyncio.Semaphore] = {}
        self.stopping = False
        # One child forked and contained before any request (python3 only: a language's worker
        # execs with its package's path, known only at the request): the server's first new
        # (package, entry, limits) loads into it instead of waiting for a fork and its namespaces.
        self.spare: Child | None = None

    def start_spare(self) -> None:
        """Fork the spare child (the server does this once, at start-up)."""
        if language.LANGUAGE is not None or self.stopping:
            return
        try:
            self.spare = Child(asyncio.get_running_loop(), None, "", {})
        except OSError as exc:
            LOG.warning("cannot start a spare child: %s", exc)

    def _take_spare(self, key: tuple[str, str, str], limits: dict) -> Child | None:
        spare, self.spare = self.spare, None
        if spare is None or not spare.alive:
            return None
        try:
            spare.assign(key[0], key[1], limits)
        except OSError as exc:  # it died meanwhile: a fresh child instead
            LOG.warning("spare child unusable (%s); forking a new one", exc)
            spare.kill()
            return None
        return spare

    async def execute(self, req: dict) -> dict:
        span = tracing.start_span(req)
        result = await self._execute(req)
        if span is not None:
            asyncio.get_running_loop().run_in_executor(None, tracing.export_span, span, req, result)
        return result

    async def _execute(self, req: dict) -> dict:
        execution_id = req.get("execution_id")
        try:
            pkg_dir = self.packages.unpack(req.get("package") or {})
        except (packages_mod.PackageError, OSError) as exc:
            LOG.warning("execution %s: %s", execution_id, exc)
            return {"success": False, "status": "failed", "reason": "error", "output": str(exc),
                    "duration": 0.0, "logs": ""}
        if language.LANGUAGE is not None:
            pkg_dir = language.LANGUAGE.prepare(pkg_dir, sandboxed=sandbox.SANDBOX["uids"])
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
                child = self._take_spare(key, limits) or Child(loop, key[0], key[1], limits)
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
        if self.spare is not None:
            self.spare.kill()
            self.spare = None
        for children in self.idle.values():
            for child in children:
                child.retire()
        self.idle.clear()
        for child in list(CHILDREN.values()):
            child.kill()
