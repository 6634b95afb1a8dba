"""Just enough HTTP/1.1 for the runtime protocol: Content-Length bodies, keep-alive, /ping, /execute, /cancel (and a language's routes)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time

from headwater_runtime import language, pipes, pool

LOG = logging.getLogger("headwater.runtime.python3")

MAX_BODY = 64 * 1024 * 1024  # largest /execute request accepted
# How often a running /execute checks whether its client hung up. asyncio tells a handler about the
# end of its connection only when it reads, and it must not read (a pipelined request would be eaten).
HANGUP_POLL = 0.2


class ClientGone(Exception):
    """The client closed its connection before the execution finished."""


class Server:
    """Answers the runtime protocol on one listening socket; executions go to the pool."""

    def __init__(self, pool: pool.Pool, token: str):
        self.pool = pool
        # The credential the engine drives this server with: a function on the same host or in the
        # same pod may reach the port, so /execute and /cancel answer only requests that carry it.
        # Only its digest is kept: children are forked from this process and inherit its memory.
        self.authorization = hashlib.sha256(f"Bearer {token}".encode()).digest()
        self.running: dict[str, set[asyncio.Task]] = {}  # execution id -> its /execute work, for POST /cancel

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        pipes.SERVER_FDS.add(fd)
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
                try:
                    length = int(headers.get("content-length") or 0)
                    if length < 0:
                        raise ValueError(length)
                except ValueError:
                    await self._send(writer, 400, b"bad Content-Length", close=True)
                    return
                if length > MAX_BODY:
                    await self._send(writer, 413, b"request too large", close=True)
                    return
                body = await reader.readexactly(length) if length else b""
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                try:
                    if self._authorized(target, headers):
                        status, payload, ctype = await self.route(method, target.split("?", 1)[0], body, reader)
                    else:
                        status, payload, ctype = 401, b"missing or wrong runtime credential", "text/plain"
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
            pipes.SERVER_FDS.discard(fd)
            writer.close()

    def _authorized(self, target: str, headers: dict[str, str]) -> bool:
        """/execute, /cancel and a language's routes (go: /build) need the server's credential; /ping
        (health probes) and 404s do not."""
        path = target.split("?", 1)[0]
        if path not in ("/execute", "/cancel") and path not in language.routes():
            return True
        given = hashlib.sha256(headers.get("authorization", "").encode("latin-1")).digest()
        return hmac.compare_digest(given, self.authorization)

    @staticmethod
    async def _send(writer, status: int, payload: bytes, ctype: str = "text/plain", close: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
                  413: "Payload Too Large", 500: "Internal Server Error"}.get(status, "OK")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n")
        writer.write(head.encode("latin-1") + payload)
        await writer.drain()

    async def route(self, method: str, path: str, body: bytes,
                    reader: asyncio.StreamReader | None = None) -> tuple[int, bytes, str]:
        if path == "/ping":
            return 200, b"pong", "text/plain"
        extra = language.routes().get(path)  # a language's own (go: /build)
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
        work = asyncio.ensure_future(self.pool.execute(req))
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
            return {"success": False, "status": "failed", "reason": "cancelled", "output": pool.CANCELLED_OUTPUT,
                    "duration": round(time.monotonic() - started, 3), "logs": ""}
        return work.result()
