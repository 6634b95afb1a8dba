"""Zaqar source: claim messages from configured queues (and take Zaqar push POSTs) and publish them as events."""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import socket
import uuid
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
from aiohttp import web

from router.config import Config
from router.events import Event, InvalidEvent, utcnow
from router.plugins import SourceContext, SubscriptionInvalid

log = logging.getLogger(__name__)

KIND = "zaqar"
MESSAGE_TYPE = "org.openstack.zaqar.message"
PUSH_PATH = "/v1/zaqar/push"
TOKEN_HEADER = "X-Headwater-Token"
EXTENSIONS = ("projectid", "queue", "partitionkey", "messageage")
_CORE = ("id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "specversion", "sourcekind")
_TIMEOUT = aiohttp.ClientTimeout(total=30)


class MalformedMessage(ValueError):
    """A queue message (or push POST) that cannot become an event."""


class ZaqarError(RuntimeError):
    """Zaqar answered something other than what the API promises."""


def default_client_id() -> str:
    # Stable per host, so Zaqar sees one consumer across restarts (Client-ID must be a UUID).
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"headwater.{socket.gethostname()}"))


class ZaqarClient:
    """The few Zaqar v2 REST calls the consume path needs, over aiohttp. Identity: X-Project-ID for a
    Zaqar without Keystone, or a keystoneauth1 token when [zaqar] auth_url is set."""

    def __init__(self, config: Config):
        section = config.zaqar
        self.url = section.url.rstrip("/")
        self.project_id = section.project_id
        self.client_id = section.client_id or default_client_id()
        self._section = section
        self._auth: Any = None
        self._session: aiohttp.ClientSession | None = None

    async def _headers(self) -> dict[str, str]:
        headers = {"Client-ID": self.client_id, "Content-Type": "application/json", "Accept": "application/json"}
        if self._section.auth_url:
            if self._auth is None:
                self._auth = _keystone_session(self._section)
            # keystoneauth caches the token and renews it near expiry; it is synchronous (requests).
            headers.update(await asyncio.to_thread(self._auth.get_auth_headers) or {})
            # Under Keystone the queues are the token's project's: so are their messages' events
            # (only that project's subscriptions may see them), whatever [zaqar] project_id says.
            self.project_id = await asyncio.to_thread(self._auth.get_project_id) or self.project_id
        elif self.project_id:
            headers["X-Project-ID"] = self.project_id
        return headers

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _queue_url(self, queue: str) -> str:
        return f"{self.url}/v2/queues/{quote(queue, safe='')}"

    async def claim(self, queue: str, *, ttl: int, grace: int, limit: int) -> tuple[str, list[dict[str, Any]]] | None:
        """Claim up to `limit` free messages: (claim id, messages), or None when nothing is free."""
        async with self._http().post(f"{self._queue_url(queue)}/claims", params={"limit": str(limit)},
                                     json={"ttl": ttl, "grace": grace}, headers=await self._headers()) as resp:
            if resp.status == 204:
                return None
            if resp.status != 201:
                raise ZaqarError(f"claim on {queue!r} answered {resp.status}: {(await resp.text())[:300]}")
            body = await resp.json(content_type=None)
            location = resp.headers.get("Location", "")
        messages = body.get("messages", body) if isinstance(body, dict) else body
        claim_id = location.rstrip("/").rsplit("/", 1)[-1]
        if not claim_id or not isinstance(messages, list):
            raise ZaqarError(f"claim on {queue!r} answered 201 without a claim id or message list")
        return claim_id, messages

    async def delete_message(self, queue: str, message_id: str, claim_id: str | None) -> bool:
        """Delete one message with its claim id; False if it was not ours to delete any more."""
        params = {"claim_id": claim_id} if claim_id else {}
        async with self._http().delete(f"{self._queue_url(queue)}/messages/{quote(message_id, safe='')}",
                                       params=params, headers=await self._headers()) as resp:
            if resp.status in (200, 204):
                return True
            if resp.status in (403, 404):
                # 403: our claim expired and another consumer holds it; 404: gone already.
                return False
            raise ZaqarError(f"delete of {message_id} in {queue!r} answered {resp.status}: {(await resp.text())[:300]}")

    async def release(self, queue: str, claim_id: str) -> None:
        """Give a claim's undeleted messages back at once instead of after the claim ttl."""
        async with self._http().delete(f"{self._queue_url(queue)}/claims/{quote(claim_id, safe='')}",
                                       headers=await self._headers()) as resp:
            if resp.status not in (204, 404):
                raise ZaqarError(f"release of claim {claim_id} answered {resp.status}")

    async def post(self, queue: str, messages: list[dict[str, Any]]) -> list[str]:
        """Post messages; returns their resource hrefs."""
        async with self._http().post(f"{self._queue_url(queue)}/messages", json={"messages": messages},
                                     headers=await self._headers()) as resp:
            if resp.status != 201:
                raise ZaqarError(f"post to {queue!r} answered {resp.status}: {(await resp.text())[:300]}")
            body = await resp.json(content_type=None)
        return list(body.get("resources", []))


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


def message_event(*, queue: str, project_id: str, message_id: str, body: Any, age: Any = None) -> Event:
    """The event for one Zaqar message. A body that is itself a structured CloudEvent (it has
    `specversion`, as the Zaqar sink posts) keeps its own attributes; any other body is the data."""
    extensions = {"projectid": project_id, "queue": queue, "partitionkey": f"{project_id}/{queue}"}
    received = utcnow()
    if isinstance(age, (int, float)) and not isinstance(age, bool):
        extensions["messageage"] = int(age)
        # Zaqar reports only the age, so the post time is reconstructed from it.
        received = received - _dt.timedelta(seconds=age)
    if isinstance(body, dict) and "specversion" in body:
        try:
            event = Event.from_dict(body)
        except InvalidEvent as exc:
            raise MalformedMessage(f"body claims to be a CloudEvent but is not valid: {exc}") from None
        for name, value in extensions.items():
            event.extensions.setdefault(name, value)
        event.extensions["queue"] = queue  # the queue it came through is a fact, not the producer's say
        return event
    return Event(id=message_id, source=f"/zaqar/{project_id}/queues/{queue}", type=MESSAGE_TYPE, subject=message_id,
                 time=received, data=body, extensions=extensions)


class ZaqarSource:
    """One claim loop per configured queue (claim → publish → delete with the claim id), plus the
    receiver for Zaqar push subscriptions at POST /v1/zaqar/push."""

    kind: ClassVar[str] = KIND

    def __init__(self, config: Config):
        self.config = config
        section = config.zaqar
        self.queues = list(section.queues)
        self.claim_ttl, self.claim_grace, self.claim_limit = section.claim_ttl, section.claim_grace, section.claim_limit
        self.poll_interval = float(section.poll_interval)
        self.client = ZaqarClient(config)
        self._ctx: SourceContext | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        for field in ("pattern", "first_execution_time", "count"):
            if params.get(field) is not None:
                raise SubscriptionInvalid(f"{field} is a cron option; zaqar subscriptions take types and filters.")
        filters = params.get("filters") or {}
        if isinstance(filters, dict):
            queue = filters.get("queue")
            if queue is not None and queue not in self.queues:
                # Pushed messages can arrive from any queue, so this is advice in the log, not a 400.
                log.warning("subscription filters on zaqar queue %r, which [zaqar] queues does not consume", queue)
        return {}

    async def start(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        ctx.add_route("POST", PUSH_PATH, self.receive_push, public=True)
        for queue in self.queues:
            self._tasks.append(asyncio.create_task(self._consume(ctx, queue), name=f"headwater-zaqar-{queue}"))
        log.info("zaqar source started", extra={"queues": self.queues, "url": self.client.url})

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Claimed but unfinished messages are not released: like a crash, they come back when the
        # claim expires, and their deterministic ids make a second run a no-op where one happened.
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()

    # -- claim loop ----------------------------------------------------------------------------

    async def _consume(self, ctx: SourceContext, queue: str) -> None:
        while True:
            try:
                claimed = await self.client.claim(queue, ttl=self.claim_ttl, grace=self.claim_grace, limit=self.claim_limit)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("zaqar claim failed; retrying", extra={"queue": queue})
                await asyncio.sleep(self.poll_interval)
                continue
            if claimed is None:
                await asyncio.sleep(self.poll_interval)
                continue
            claim_id, messages = claimed
            for message in messages:
                if not await self.process(ctx, queue, claim_id, message):
                    # The router refused: hand the rest back now rather than after the claim ttl.
                    try:
                        await self.client.release(queue, claim_id)
                    except Exception:
                        log.warning("zaqar claim release failed; messages return at claim expiry", extra={"queue": queue})
                    await asyncio.sleep(self.poll_interval)
                    break

    async def process(self, ctx: SourceContext, queue: str, claim_id: str | None, message: Any) -> bool:
        """Publish one claimed message, then delete it with its claim id. False when the router did
        not take it (the message stays claimed and comes back)."""
        message_id = message.get("id") if isinstance(message, dict) else None
        try:
            if not isinstance(message_id, str) or not message_id:
                raise MalformedMessage("message has no id")
            if "body" not in message:
                raise MalformedMessage("message has no body")
            event = message_event(queue=queue, project_id=self.client.project_id or "default", message_id=message_id,
                                  body=message["body"], age=message.get("age"))
        except MalformedMessage as exc:
            await ctx.dead_letter(source=KIND, reason=f"malformed zaqar message in queue {queue!r}: {exc}",
                                  payload=message, event_id=message_id if isinstance(message_id, str) else None,
                                  project_id=self.client.project_id or "default")
            # Dead-lettered: deleting it stops Zaqar from handing the same poison message out forever.
            if isinstance(message_id, str) and message_id:
                await self._delete(queue, message_id, claim_id, message_id)
            return True
        extra = {"event_id": event.id, "queue": queue, "message_id": message_id}
        try:
            # Only once this returns is the message safe elsewhere: on the bus, or (memory bus)
            # its executions recorded. Deleting earlier would lose it in a crash.
            await ctx.publish(event, settle=not ctx.durable)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("zaqar message not taken by the router; it will be claimed again", extra=extra)
            return False
        await self._delete(queue, message_id, claim_id, event.id)
        log.info("zaqar message published", extra=extra)
        return True

    async def _delete(self, queue: str, message_id: str, claim_id: str | None, event_id: str) -> None:
        try:
            if not await self.client.delete_message(queue, message_id, claim_id):
                log.warning("zaqar message was no longer ours to delete (claim expired); a redelivery is de-duplicated",
                            extra={"event_id": event_id, "queue": queue})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("zaqar delete failed; the message returns at claim expiry and is de-duplicated",
                          extra={"event_id": event_id, "queue": queue})

    # -- push receiver -------------------------------------------------------------------------

    async def receive_push(self, request: web.Request) -> web.Response:
        """POST /v1/zaqar/push: what Zaqar sends for an http subscription, one POST per message:
        {"ttl", "body", "Message_Type": "Notification", "queue_name"}. Zaqar does not retry on an
        HTTP error, so the answer comes as soon as the event is on the bus."""
        assert self._ctx is not None
        ctx = self._ctx
        token = self.config.zaqar.push_token
        if token and request.headers.get(TOKEN_HEADER) != token:
            return web.json_response({"error": f"missing or wrong {TOKEN_HEADER}"}, status=401)
        raw = await request.read()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = raw.decode("utf-8", "replace")
        try:
            event = self._push_event(request, doc)
        except MalformedMessage as exc:
            await ctx.dead_letter(source=KIND, reason=f"malformed zaqar push: {exc}", payload=doc)
            return web.json_response({"error": str(exc)}, status=400)
        if event is None:
            return web.json_response({"ignored": True}, status=200)
        await ctx.publish(event)
        log.info("zaqar push published", extra={"event_id": event.id, "queue": event.extensions.get("queue")})
        return web.json_response({"event_id": event.id}, status=202)

    def _push_event(self, request: web.Request, doc: Any) -> Event | None:
        if not isinstance(doc, dict):
            raise MalformedMessage("body is not a JSON object")
        kind = doc.get("Message_Type")
        if kind == "SubscriptionConfirmation":
            # Needs a signed PUT back to Zaqar; deployments with require_confirmation confirm by hand.
            log.warning("zaqar subscription confirmation received; confirm it with the Zaqar API", extra={"queue": doc.get("queue_name")})
            return None
        if kind != "Notification" or "body" not in doc:
            raise MalformedMessage("not a Zaqar notification (Message_Type 'Notification' with a body)")
        queue = doc.get("queue_name") or request.query.get("queue")
        if not isinstance(queue, str) or not queue:
            raise MalformedMessage("no queue_name")
        body = doc["body"]
        # A pushed copy has no message id. A producer that puts one in the body ("id") gets
        # de-duplication of repeated pushes; otherwise every POST is a new event.
        key = body.get("id") if isinstance(body, dict) else None
        message_id = f"push-{queue}-{key}" if isinstance(key, (str, int)) and not isinstance(key, bool) else str(uuid.uuid4())
        project_id = request.query.get("project_id") or self.client.project_id or "default"
        return message_event(queue=queue, project_id=project_id, message_id=message_id, body=body)
