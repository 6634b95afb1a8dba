"""HTTP callback sink: POST a function's result event to a URL, signed with HMAC-SHA256 so the
receiver can tell it came from Headwater and was not altered or replayed long after."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp

from router.config import Config
from router.events import Event

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Headwater-Signature"
TIMESTAMP_HEADER = "X-Headwater-Timestamp"
_TIMEOUT = aiohttp.ClientTimeout(total=30)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>." + body): the timestamp is signed too,
    so a receiver that checks its age can refuse replays of an old callback."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, max_age: float = 300.0, now: float | None = None) -> bool:
    """What a receiver runs (documented, and used by the tests' receiver)."""
    try:
        age = (now if now is not None else time.time()) - float(timestamp)
    except ValueError:
        return False
    return abs(age) <= max_age and hmac.compare_digest(sign(secret, timestamp, body), signature)


class CallbackFailed(RuntimeError):
    """The receiver did not take the callback (network error or non-2xx); the policy may retry."""


class HttpCallbackSink:
    """Target: {"url": "https://…", "secret": "shared secret" (optional but recommended)}."""

    kind: ClassVar[str] = "http"

    def __init__(self, config: Config):
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def validate_target(self, target: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(target, dict):
            raise ValueError("an http target is an object with a url")
        unknown = set(target) - {"url", "secret"}
        if unknown:
            raise ValueError(f"unknown http target fields: {', '.join(sorted(unknown))}")
        url = target.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("url must be an absolute http(s) URL")
        secret = target.get("secret")
        if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
            raise ValueError("secret must be a string of at least 16 characters")
        return {"url": url, **({"secret": secret} if secret else {})}

    async def send(self, event: Event, target: dict[str, Any]) -> None:
        body = event.to_json()
        headers = {"Content-Type": "application/cloudevents+json", "User-Agent": "headwater"}
        if target.get("secret"):
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(target["secret"], timestamp, body)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        try:
            async with self._session.post(target["url"], data=body, headers=headers) as resp:
                if resp.status >= 300:
                    raise CallbackFailed(f"callback {target['url']} answered {resp.status}")
        except aiohttp.ClientError as exc:
            raise CallbackFailed(f"callback {target['url']} failed: {exc}") from exc
        log.info("result delivered to callback", extra={"event_id": event.id, "url": target["url"]})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
