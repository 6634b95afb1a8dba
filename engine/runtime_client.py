"""The engines' side of the runtime protocol that both use alike: asking a runtime to cancel a run."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

LOG = logging.getLogger(__name__)

CANCEL_TIMEOUT = 5.0  # seconds for a runtime to acknowledge POST /cancel


async def post_cancel(session: aiohttp.ClientSession | None, url: str, execution_id: str, *, worker: str,
                      extra: dict) -> None:
    """POST /cancel for one execution, best effort: the closed connection has usually stopped the
    function already, and a runtime that does not answer is not waited for beyond CANCEL_TIMEOUT."""
    if session is None or session.closed:
        return
    try:
        async with session.post(url + "/cancel", data=orjson.dumps({"execution_id": execution_id}),
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT)) as resp:
            await resp.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        LOG.debug("cancel of execution %s on %s not delivered: %r", execution_id, worker, exc, extra=extra)
