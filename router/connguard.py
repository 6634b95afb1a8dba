"""Connection guard for the API listener: a cap on connections per client address, and deadlines for
reading a request (slowloris), in front of aiohttp's own protocol."""

# aiohttp closes a connection that never sends anything (its keep-alive timeout), but a client that
# trickles a header byte every few seconds, or stops half-way through a body, holds its socket (and
# a handler) forever: 500 such sockets were held by one client. This wraps each aiohttp protocol,
# watches the bytes going to it just enough to know where requests start and end (head, then a
# Content-Length or chunked body), and closes the connection when a head is not complete within
# `header_timeout` or a body stalls for `body_timeout`. Once a request has arrived whole, the
# handler may take as long as it needs (a synchronous execution may run for minutes).

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*chunked", re.IGNORECASE)
MAX_HEAD = 256 * 1024  # bytes of request head kept while looking for its end (aiohttp refuses far less)


class ConnectionGuard:
    """Counts connections per client address and builds guarded protocols for one listener."""

    def __init__(self, inner_factory: Callable[[], asyncio.Protocol], *, max_per_client: int,
                 header_timeout: float, body_timeout: float):
        self.inner_factory = inner_factory
        self.max_per_client = max_per_client
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.per_client: dict[str, int] = defaultdict(int)
        self.refused = 0
        self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        return _GuardedProtocol(self)


class _GuardedProtocol(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.inner: Any = None
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.timer: asyncio.TimerHandle | None = None
        self.head = bytearray()  # the request head read so far ("" between requests)
        self.body_left = 0  # Content-Length bytes still to come
        self.chunked_tail: bytes | None = None  # in a chunked body: its last bytes, to see "0\r\n\r\n"

    # -- the connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else str(peer)
        guard = self.guard
        if guard.per_client[self.client] >= guard.max_per_client:
            guard.refused += 1
            log.warning("refusing a connection from %s: it already has %d open ([api] max_connections_per_client)",
                        self.client, guard.per_client[self.client])
            self.client = ""
            transport.abort()
            return
        guard.per_client[self.client] += 1
        self.inner = guard.inner_factory()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self.client:
            self.guard.per_client[self.client] -= 1
            if self.guard.per_client[self.client] <= 0:
                del self.guard.per_client[self.client]
            self.client = ""
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        self._watch(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- request framing, just enough for the deadlines ---------------------------------------

    def _watch(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.body_left:
                taken = min(self.body_left, len(view))
                self.body_left -= taken
                view = view[taken:]
                self._arm(self.guard.body_timeout if self.body_left else None)
                continue
            if self.chunked_tail is not None:
                # A chunked body ends with "0\r\n\r\n" (trailers are rare enough to get the idle
                # deadline instead); what follows it in this read starts the next request.
                window = self.chunked_tail + bytes(view)
                end = window.find(b"0\r\n\r\n")
                if end < 0:
                    self.chunked_tail = window[-5:]
                    self._arm(self.guard.body_timeout)
                    return
                self.chunked_tail = None
                self._arm(None)
                view = memoryview(window)[end + 5:]
                continue
            if not self.head:
                self._arm(self.guard.header_timeout)  # a new request starts: its head has a deadline
            before = len(self.head)
            self.head += view
            end = self.head.find(b"\r\n\r\n", max(0, before - 3))
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    del self.head[:-MAX_HEAD]
                return
            head = bytes(self.head[:end + 4])
            view = view[end + 4 - before:]
            self.head = bytearray()
            length = _CONTENT_LENGTH.search(head)
            if _CHUNKED.search(head):
                self.chunked_tail = b""
                self._arm(self.guard.body_timeout)
            elif length and int(length.group(1)):
                self.body_left = int(length.group(1))
                self._arm(self.guard.body_timeout)
            else:
                self._arm(None)

    def _arm(self, timeout: float | None) -> None:
        self._cancel_timer()
        if timeout is not None and self.transport is not None:
            self.timer = asyncio.get_running_loop().call_later(timeout, self._expire)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        self.guard.timed_out += 1
        log.warning("closing a connection from %s: its request did not arrive in time ([api] request_header_timeout, "
                    "request_body_timeout)", self.client)
        if self.transport is not None:
            self.transport.abort()
