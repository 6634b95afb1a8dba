"""Pipes between the server and its children: length-prefixed frames, and the descriptors a child must close."""

from __future__ import annotations

import contextlib
import os
import struct

FRAME = struct.Struct(">Q")  # length prefix of request and result messages on the pipes

# Descriptors the server owns (sockets, the loop's selector, every pipe end); each child closes
# them, so user code never touches the server's sockets and never holds another execution's pipe
# open (which would keep it from seeing end-of-file).
SERVER_FDS: set[int] = set()
SERVER_FDS: set[int] = set()


def read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return b""
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pipe() -> tuple[int, int]:
    r, w = os.pipe()
    SERVER_FDS.update((r, w))
    return r, w


def close(fd: int | None) -> None:
    if fd is None:
        return
    SERVER_FDS.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)
