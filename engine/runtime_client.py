"""The engines' side of the runtime protocol that both use alike: asking a runtime to cancel a run."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import aiohttp
import orjson

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
