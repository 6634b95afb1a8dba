"""The API listener's connection guard (issue 15, finding 11): slow or stalled requests are cut off,
one client cannot hold more than its share of connections, and whole requests are not disturbed."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from router.connguard import ConnectionGuard


@pytest.fixture
async def api():
    async def slow(request):
        await request.read()
        await asyncio.sleep(float(request.query.get("s", "0")))
        return web.Response(text="done")

    app = web.Application()
    app.router.add_route("*", "/x", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    guard = ConnectionGuard(runner.server, max_per_client=4, header_timeout=0.3, body_timeout=0.3)
    server = await asyncio.get_running_loop().create_server(guard, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield guard, port
    server.close()
    await runner.cleanup()


async def closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (waits for the close)."""
    return await asyncio.wait_for(reader.read(), 30)


async def test_a_trickled_request_head_is_cut_off(api):
    guard, port = api
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
    await writer.drain()
    assert await closed(reader) == b""
    assert guard.timed_out == 1
    writer.close()


async def test_a_stalled_body_is_cut_off(api):
    guard, port = api
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly some")
    await writer.drain()
    assert b"200" not in await closed(reader)
    assert guard.timed_out == 1
    writer.close()


async def test_a_whole_request_may_take_its_time_and_keep_alive_works(api):
    guard, port = api
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # Two pipelined requests, one with a body and one chunked, each answered although the handler
    # takes longer than both deadlines.
    writer.write(b"POST /x?s=0.8 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                 b"POST /x?s=0.8 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    await writer.drain()
    answers = b""
    while answers.count(b"done") < 2:
        chunk = await asyncio.wait_for(reader.read(4096), 30)
        assert chunk, answers
        answers += chunk
    assert answers.count(b"HTTP/1.1 200") == 2 and guard.timed_out == 0
    writer.close()


async def test_connections_per_client_are_capped(api):
    guard, port = api
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await closed(reader) == b""
    assert guard.refused == 1
    for _, w in held:
        w.close()
    writer.close()
    # Once they are gone the client may connect again.
    for _ in range(100):
        if not guard.per_client:
            break
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b"done" in await closed(reader)
    writer.close()
