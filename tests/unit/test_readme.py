"""The README's code is run, not just read: each block marked `<!-- readme-check: name -->` works as written."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from router.config import Config
from router.events import Event
from sinks.http import HttpCallbackSink

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(name: str) -> str:
    """The fenced block right after `<!-- readme-check: name -->`."""
    match = re.search(rf"<!-- readme-check: {re.escape(name)} -->\n```\w*\n(.*?)\n```", README.read_text(), re.S)
    assert match, f"README has no block marked readme-check: {name}"
    return match.group(1)


async def test_the_readme_verification_snippet_accepts_real_callbacks_and_nothing_else(tmp_path):
    # Regression: the README said "HMAC-SHA256 in X-Headwater-Signature"; a receiver built from that
    # (HMAC of the body, no prefix) refused every callback. The documented snippet must accept them.
    namespace: dict = {}
    exec(compile(readme_block("http-callback-verify"), "README.md", "exec"), namespace)
    verify = namespace["verify_headwater_callback"]
    received = []

    async def receive(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = TestServer(app)
    await server.start_server()
    sink = HttpCallbackSink(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))
    secret = "s3cret-s3cret-s3cret"
    try:
        event = Event(id="r1", source="/headwater/executions/e1", type="org.openstack.headwater.execution.success",
                      data={"output": 42})
        await sink.send(event, {"url": str(server.make_url("/hook")), "secret": secret})
    finally:
        await sink.close()
        await server.close()
    (headers, body), = received
    assert verify(secret, headers, body)
    assert not verify("another-secret-value", headers, body)
    assert not verify(secret, headers, body.replace(b"42", b"43"))
    assert not verify(secret, {**headers, "X-Headwater-Timestamp": str(int(headers["X-Headwater-Timestamp"]) - 1)}, body)
    assert not verify(secret, {**headers, "X-Headwater-Timestamp": "1000"}, body)  # too old
    assert not verify(secret, {}, body)
