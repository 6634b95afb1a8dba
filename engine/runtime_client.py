"""The engines' side of the runtime protocol that both use alike: asking a runtime to cancel a run, or to build a package."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging

import aiohttp
import orjson

from router.plugins import BuildResult

LOG = logging.getLogger(__name__)

CANCEL_TIMEOUT = 5.0  # seconds for a runtime to acknowledge POST /cancel


def pool_runtime_token(secret: bytes) -> str:
    """The credential pool pods' runtime servers answer to (set in their environment): derived from
    the download-token secret every engine process shares, so any engine replica can drive any pod."""
    return hmac.new(secret, b"headwater runtime credential", hashlib.sha256).hexdigest()


def runtime_headers(token: str) -> dict[str, str]:
    """Headers of every request to a runtime server: JSON, and the credential it answers only to."""
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


async def post_cancel(session: aiohttp.ClientSession | None, url: str, execution_id: str, *, worker: str,
                      extra: dict, headers: dict[str, str]) -> None:
    """POST /cancel for one execution, best effort: the closed connection has usually stopped the
    function already, and a runtime that does not answer is not waited for beyond CANCEL_TIMEOUT."""
    if session is None or session.closed:
        return
    try:
        async with session.post(url + "/cancel", data=orjson.dumps({"execution_id": execution_id}),
                                headers=headers,
                                timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT)) as resp:
            await resp.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        LOG.debug("cancel of execution %s on %s not delivered: %r", execution_id, worker, exc, extra=extra)


async def post_build(session: aiohttp.ClientSession, url: str, body: dict, timeout: float, *, worker: str,
                     runtime: str, extra: dict, headers: dict[str, str]) -> BuildResult:
    """POST /build: the runtime compiles the package (under an execution's containment) and answers
    the artifact zip, base64-encoded, or the compiler's message. Never raises."""
    try:
        async with session.post(url + "/build", data=orjson.dumps(body), headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5)) as resp:
            if resp.status == 404:
                return BuildResult(False, message=f"Runtime {runtime!r} has no build step (POST /build).")
            raw = await resp.read()
            if resp.status != 200:
                return BuildResult(False, message=f"Runtime {runtime!r} answered the build with HTTP {resp.status}.")
        reply = orjson.loads(raw)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, orjson.JSONDecodeError) as exc:
        LOG.error("build on %s failed: %r", worker, exc, extra=extra)
        return BuildResult(False, message=f"Build failed in runtime worker {worker}: {exc or type(exc).__name__}")
    if not isinstance(reply, dict) or not reply.get("success"):
        message = str(reply.get("output") or "Build failed.") if isinstance(reply, dict) else "Build failed."
        LOG.info("package did not build on %s: %s", worker, message[:200], extra=extra)
        return BuildResult(False, message=message)
    try:
        artifact = base64.b64decode(reply.get("artifact") or "", validate=True)
    except (binascii.Error, ValueError):
        return BuildResult(False, message=f"Runtime {runtime!r} sent an unreadable artifact.")
    LOG.info("package built on %s (%d bytes)", worker, len(artifact), extra=extra)
    return BuildResult(True, artifact=artifact, message=str(reply.get("logs") or ""))
