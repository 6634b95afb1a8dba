"""Zaqar sink: post a function's result event as a message to a Zaqar queue, so functions chain through Zaqar."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp

from router.config import Config
from router.events import Event
from router.plugins import Credentials, CredentialsUnavailable, Subscription

log = logging.getLogger(__name__)

# Zaqar's own rule for queue names.
_QUEUE_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
FORMATS = ("cloudevent", "data")
_MIN_TTL, _MAX_TTL = 60, 1209600
_TIMEOUT = aiohttp.ClientTimeout(total=30)


class SinkFailed(RuntimeError):
    """Zaqar did not take the message; the delivery policy may retry."""


class ZaqarSink:
    """Target: {"queue": name, "ttl": seconds (optional), "format": "cloudevent" | "data" (optional)}.

    `cloudevent` (default) posts the whole result event in structured JSON, which a Headwater Zaqar
    source reading that queue turns back into the same event (same id, so a re-sent result runs its
    next function once); `data` posts only the event's data, for consumers that are not Headwater."""

    kind: ClassVar[str] = "zaqar"

    def __init__(self, config: Config):
        section = config.zaqar
        self.url = section.url.rstrip("/")
        self.project_id = section.project_id
        self.client_id = section.client_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"headwater.{socket.gethostname()}"))
        self.default_ttl = section.message_ttl
        self._section = section
        self._auth: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._credentials: Credentials | None = None
        self._subscription: Callable[[str], Subscription | None] = lambda _id: None

    def use_credentials(self, credentials: Credentials, subscription: Callable[[str], Subscription | None]) -> None:
        """Under Keystone a result goes to its subscription's project's queue, posted as the
        subscription's creator (its trust): never into Headwater's own project, where every
        tenant's results would mix."""
        self._credentials = credentials if credentials.active else None
        self._subscription = subscription

    def validate_target(self, target: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(target, dict):
            raise ValueError("a zaqar target is an object with a queue")
        unknown = set(target) - {"queue", "ttl", "format"}
        if unknown:
            raise ValueError(f"unknown zaqar target fields: {', '.join(sorted(unknown))}")
        queue = target.get("queue")
        if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
            raise ValueError("queue must be 1-64 letters, digits, '_' or '-'")
        ttl = target.get("ttl", self.default_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not _MIN_TTL <= ttl <= _MAX_TTL:
            raise ValueError(f"ttl must be an integer from {_MIN_TTL} to {_MAX_TTL}")
        fmt = target.get("format", "cloudevent")
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        return {"queue": queue, "ttl": ttl, "format": fmt}

    async def send(self, event: Event, target: dict[str, Any]) -> None:
        target = self.validate_target(target)
        body = event.to_dict() if target["format"] == "cloudevent" else event.data
        url = f"{self.url}/v2/queues/{quote(target['queue'], safe='')}/messages"
        payload = {"messages": [{"ttl": target["ttl"], "body": body}]}
        for fresh in (False, True):
            headers = await self._headers(event, fresh=fresh)
            try:
                async with self._http().post(url, json=payload, headers=headers) as resp:
                    if resp.status == 401 and not fresh and "X-Auth-Token" in headers:
                        continue  # the kept token was revoked or ran out early: once more with a new one
                    if resp.status != 201:
                        raise SinkFailed(f"zaqar queue {target['queue']!r} refused the result: {resp.status} {(await resp.text())[:300]}")
                    resources = (await resp.json(content_type=None)).get("resources", [])
                    break
            except aiohttp.ClientError as exc:
                raise SinkFailed(f"zaqar at {self.url} unreachable: {exc}") from exc
        # "message" is a reserved LogRecord attribute: naming an extra so raises KeyError after the post.
        log.info("result posted to zaqar", extra={"event_id": event.id, "queue": target["queue"],
                                                  "message_href": resources[0] if resources else None})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        return self._session

    async def _headers(self, event: Event, *, fresh: bool = False) -> dict[str, str]:
        headers = {"Client-ID": self.client_id, "Content-Type": "application/json", "Accept": "application/json"}
        if self._credentials is not None:
            sub = self._subscription(str(event.subject))
            try:
                token = await self._credentials.token(sub, fresh=fresh) if sub is not None else None
            except CredentialsUnavailable as exc:
                raise SinkFailed(f"no Keystone token for the subscription's project: {exc}") from None
            if token is None:
                raise SinkFailed(f"subscription {event.subject} has no delegated identity (a Keystone trust) to post "
                                 "its results to its project's Zaqar with; create it again under Keystone "
                                 "with [auth] delegation = trusts")
            headers["X-Auth-Token"] = token
            return headers
        if self._section.auth_url:
            if self._auth is None:
                self._auth = _keystone_session(self._section)
            # keystoneauth is synchronous; it caches the token, so this is a network call only on renewal.
            headers.update(await asyncio.to_thread(self._auth.get_auth_headers) or {})
        elif self.project_id:
            headers["X-Project-ID"] = self.project_id
        return headers


def _keystone_session(section: Any) -> Any:
    try:
        from keystoneauth1 import session as ks_session
        from keystoneauth1.identity import v3
    except ImportError as exc:
        raise RuntimeError("[zaqar] auth_url needs keystoneauth1: pip install 'headwater[openstack]'") from exc
    auth = v3.Password(auth_url=section.auth_url, username=section.username, password=section.password,
                       project_name=section.project_name, user_domain_name=section.user_domain_name,
                       project_domain_name=section.project_domain_name)
    return ks_session.Session(auth=auth)
