"""Zaqar source: claim messages from configured queues (and take Zaqar push POSTs) and publish them as events."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
from aiohttp import web

from router.config import Config
from router.events import Event, InvalidEvent, utcnow
from router.plugins import CredentialsUnavailable, SourceContext, Subscription, SubscriptionInvalid

log = logging.getLogger(__name__)

KIND = "zaqar"
MESSAGE_TYPE = "org.openstack.zaqar.message"
PUSH_PATH = "/v1/zaqar/push"
TOKEN_HEADER = "X-Headwater-Token"
EXTENSIONS = ("projectid", "queue", "partitionkey", "messageage")
_CORE = ("id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "specversion", "sourcekind")
_TIMEOUT = aiohttp.ClientTimeout(total=30)
LEADER_CHECK_SECONDS = 1.0  # how often the replica polling a queue confirms it still leads it


# Zaqar's own rule for queue names.
_QUEUE_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _named_queues(filters: dict[str, Any]) -> list[Any] | None:
    """The queues a subscription's filters name: `"queue": "q"` or `"queue": {"in": [...]}`; None
    when they do not restrict the queue."""
    condition = filters.get("queue")
    if condition is None:
        return None
    if isinstance(condition, dict) and isinstance(condition.get("in"), list) and len(condition) == 1:
        return list(condition["in"])
    if isinstance(condition, dict):
        return None  # a prefix or glob: matches pushed messages; claim loops need names
    return [condition]


class MalformedMessage(ValueError):
    """A queue message (or push POST) that cannot become an event."""


class ZaqarError(RuntimeError):
    """Zaqar answered something other than what the API promises."""


def default_client_id() -> str:
    # Stable per host, so Zaqar sees one consumer across restarts (Client-ID must be a UUID).
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"headwater.{socket.gethostname()}"))


TokenSource = Callable[[bool], Awaitable[str]]


class ZaqarClient:
    """The few Zaqar v2 REST calls the consume path needs, over aiohttp. Identity: X-Project-ID for a
    Zaqar without Keystone; a keystoneauth1 token of [zaqar]'s user when [zaqar] auth_url is set; or,
    given `token` (called with True after Zaqar answered 401, for a new one), a token of one
    project, e.g. a subscription creator's through its trust."""

    def __init__(self, config: Config, *, project_id: str | None = None, token: TokenSource | None = None):
        section = config.zaqar
        self.url = section.url.rstrip("/")
        self.project_id = project_id or section.project_id
        self.client_id = section.client_id or default_client_id()
        self._section = section
        self._auth: Any = None
        self._token = token
        self._stale = False  # Zaqar refused the last token: ask for a new one
        self._session: aiohttp.ClientSession | None = None

    async def _headers(self) -> dict[str, str]:
        headers = {"Client-ID": self.client_id, "Content-Type": "application/json", "Accept": "application/json"}
        if self._token is not None:
            fresh, self._stale = self._stale, False
            headers["X-Auth-Token"] = await self._token(fresh)
        elif self._section.auth_url:
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

    async def authenticate(self) -> str | None:
        """Authenticate (Keystone) and return the project the queues belong to."""
        await self._headers()
        return self.project_id

    def _refused(self, status: int) -> None:
        if status == 401:  # a token revoked or run out before its time: the next call gets a new one
            self._stale = True

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
                self._refused(resp.status)
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
            self._refused(resp.status)
            raise ZaqarError(f"delete of {message_id} in {queue!r} answered {resp.status}: {(await resp.text())[:300]}")

    async def renew(self, queue: str, claim_id: str, *, ttl: int, grace: int) -> None:
        """Extend a claim: its ttl counts again from now (Zaqar's PATCH on the claim)."""
        async with self._http().patch(f"{self._queue_url(queue)}/claims/{quote(claim_id, safe='')}",
                                      json={"ttl": ttl, "grace": grace}, headers=await self._headers()) as resp:
            if resp.status != 204:
                self._refused(resp.status)
                raise ZaqarError(f"renewal of claim {claim_id} on {queue!r} answered {resp.status}: {(await resp.text())[:300]}")

    async def release(self, queue: str, claim_id: str) -> None:
        """Give a claim's undeleted messages back at once instead of after the claim ttl."""
        async with self._http().delete(f"{self._queue_url(queue)}/claims/{quote(claim_id, safe='')}",
                                       headers=await self._headers()) as resp:
            if resp.status not in (204, 404):
                self._refused(resp.status)
                raise ZaqarError(f"release of claim {claim_id} answered {resp.status}")

    async def post(self, queue: str, messages: list[dict[str, Any]]) -> list[str]:
        """Post messages; returns their resource hrefs."""
        async with self._http().post(f"{self._queue_url(queue)}/messages", json={"messages": messages},
                                     headers=await self._headers()) as resp:
            if resp.status != 201:
                self._refused(resp.status)
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
    """Consumes the Zaqar queues its subscriptions name (`filters: {"queue": …}`): a claim loop per
    queue, started when the first subscription on a queue appears and stopped when the last goes,
    without a restart. `[zaqar] queues`, when set, is an allow-list. Claimed messages are processed
    concurrently (up to `[zaqar] max_in_flight` per queue) and their claim is renewed while they
    run, so a long function keeps its message from being claimed again by another replica.
    Also the receiver for Zaqar push subscriptions at POST /v1/zaqar/push."""

    kind: ClassVar[str] = KIND

    def __init__(self, config: Config):
        self.config = config
        section = config.zaqar
        self.allowed = frozenset(section.queues)
        self.claim_ttl, self.claim_grace, self.claim_limit = section.claim_ttl, section.claim_grace, section.claim_limit
        self.poll_interval = float(section.poll_interval)
        self.max_in_flight = section.max_in_flight
        self.claiming = bool(section.claim)
        # Renew a claim well before it runs out: a third of its ttl leaves two renewals of slack.
        self.renew_interval = self.claim_ttl / 3
        self.client = ZaqarClient(config)
        # Under Keystone, the clients of the projects whose queues are claimed as a subscription's
        # creator (its trust), one per project; the service user's own project uses self.client.
        self._clients: dict[str, ZaqarClient] = {}
        self._ctx: SourceContext | None = None
        # (project, queue) → its claim loop: two projects' queues of one name are two queues.
        self._consumers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._leading: set[tuple[str, str]] = set()
        self._work: set[asyncio.Task[Any]] = set()
        # Under Keystone (per-project routing) a subscription's queues are its own project's: claimed
        # with its creator's token (its trust), or, for the project of [zaqar]'s user, with that
        # user's. A subscription with neither consumes nothing, else another tenant's subscription
        # could have the service project's queues drained into dead letters.
        self.per_project = config.auth.strategy == "keystone"
        self._owner_known = not (self.per_project and config.zaqar.auth_url)

    @property
    def queues(self) -> list[str]:
        """The queues this replica's subscriptions want consumed (each polled by one replica at a time)."""
        return sorted({queue for _, queue in self._consumers})

    @property
    def consumed(self) -> list[tuple[str, str]]:
        """(project, queue) of every queue consumed: under Keystone each project's queues are its own."""
        return sorted(self._consumers)

    @property
    def leading(self) -> list[str]:
        """The queues this replica polls now: those whose leadership it holds among the replicas."""
        return sorted({queue for _, queue in self._leading})

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        for field in ("pattern", "first_execution_time", "count"):
            if params.get(field) is not None:
                raise SubscriptionInvalid(f"{field} is a cron option; zaqar subscriptions take types and filters.")
        filters = params.get("filters") or {}
        for queue in _named_queues(filters if isinstance(filters, dict) else {}):
            if not isinstance(queue, str) or not _QUEUE_NAME.match(queue):
                raise SubscriptionInvalid(f"filters.queue must be a Zaqar queue name (1-64 letters, digits, '_' or '-'), not {queue!r}.")
            if self.allowed and queue not in self.allowed:
                raise SubscriptionInvalid(f"zaqar queue {queue!r} is not in [zaqar] queues (the allow-list: "
                                          f"{', '.join(sorted(self.allowed))}).")
        return {}

    async def start(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        ctx.add_route("POST", PUSH_PATH, self.receive_push, public=True)
        ctx.on_subscriptions_changed(self.reconcile)
        self.reconcile()
        if not self._owner_known:
            task = asyncio.get_running_loop().create_task(self._learn_owner(), name="headwater-zaqar-owner")
            self._work.add(task)
            task.add_done_callback(self._work.discard)
        log.info("zaqar source started", extra={"queues": self.queues, "url": self.client.url})

    def wanted_queues(self) -> set[tuple[str, str]]:
        """(project, queue) of the queues the current subscriptions name (within the allow-list); a
        subscription that names none takes every allowed queue."""
        assert self._ctx is not None
        wanted: set[tuple[str, str]] = set()
        if not self.claiming:
            return wanted  # push only
        for sub in self._ctx.subscriptions(KIND):
            project = self._project_of(sub)
            if project is None:
                continue  # no identity to claim its project's queues with (yet)
            named = _named_queues(sub.filters or {})
            if named is None:
                queues = set(self.allowed)
            else:
                queues = {q for q in named if isinstance(q, str) and (not self.allowed or q in self.allowed)}
            wanted |= {(project, q) for q in queues}
        return wanted

    def _project_of(self, sub: Subscription) -> str | None:
        """Whose queues the subscription's are, if this source can claim them: without Keystone
        the one project's ([zaqar] project_id); under Keystone the subscription's own, through its
        trust or, in the project of [zaqar]'s user, that user's token."""
        if not self.per_project:
            return self.client.project_id
        if self._owner_known and sub.project_id == self.client.project_id:
            return sub.project_id
        assert self._ctx is not None
        if self._ctx.credentials.active and (sub.options or {}).get("trust_id"):
            return sub.project_id
        return None

    def _client(self, project: str) -> ZaqarClient:
        if not self.per_project or (self._owner_known and project == self.client.project_id):
            return self.client
        client = self._clients.get(project)
        if client is None:
            async def token(fresh: bool) -> str:
                return await self._project_token(project, fresh)
            client = self._clients[project] = ZaqarClient(self.config, project_id=project, token=token)
        return client

    async def _project_token(self, project: str, fresh: bool) -> str:
        """A token of the project from the trust of one of its Zaqar subscriptions (any: each acts
        for a member of the project, and every one of them may read the project's queues)."""
        assert self._ctx is not None
        failure = "none has a trust"
        for sub in self._ctx.subscriptions(KIND):
            if sub.project_id != project or not (sub.options or {}).get("trust_id"):
                continue
            try:
                token = await self._ctx.credentials.token(sub, fresh=fresh)
            except CredentialsUnavailable as exc:
                failure = str(exc)  # that creator may be gone: another subscription's may serve
                continue
            if token:
                return token
        raise ZaqarError(f"no token for project {project}'s queues from its subscriptions' trusts: {failure}")

    async def _learn_owner(self) -> None:
        """Authenticate once to learn the token's project (the queues' owner), then consume the
        queues that project's subscriptions name; retried while Keystone cannot be reached."""
        delay = 1.0
        while not self._owner_known:
            try:
                await self.client.authenticate()
            except Exception as exc:
                log.warning("zaqar: cannot learn the token's project yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._owner_known = True
        log.info("zaqar queues belong to project", extra={"project_id": self.client.project_id})
        self.reconcile()

    def reconcile(self) -> None:
        """Start a claim loop for each newly wanted queue; stop those no subscription names any more
        (their claimed messages finish; the claim loop just stops taking new ones)."""
        if self._ctx is None:
            return
        wanted = self.wanted_queues()
        for key in wanted - set(self._consumers):
            project, queue = key
            self._consumers[key] = asyncio.get_running_loop().create_task(
                self._consume(self._ctx, project, queue), name=f"headwater-zaqar-{queue}")
            log.info("zaqar queue consumed", extra={"queue": queue, "project_id": project})
        for key in set(self._consumers) - wanted:
            self._consumers.pop(key).cancel()
            log.info("zaqar queue no longer consumed: no subscription names it",
                     extra={"queue": key[1], "project_id": key[0]})

    async def stop(self) -> None:
        tasks = [*self._consumers.values(), *self._work]
        self._consumers = {}
        self._ctx = None
        for task in tasks:
            task.cancel()
        # Claimed but unfinished messages are not released: like a crash, they come back when the
        # claim expires, and their deterministic ids make a second run a no-op where one happened.
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (self.client, *self._clients.values()):
            await client.close()
        self._clients = {}

    # -- claim loop ----------------------------------------------------------------------------

    async def _consume(self, ctx: SourceContext, project: str, queue: str) -> None:
        client = self._client(project)
        key = (project, queue)
        in_flight = 0
        room = asyncio.Condition()

        async def finished(n: int) -> None:
            nonlocal in_flight
            async with room:
                in_flight -= n
                room.notify_all()

        leadership = f"zaqar-queue-{project or 'token'}-{queue}"
        loop = asyncio.get_running_loop()
        checked_at = loop.time()
        try:
            while True:
                # One replica polls each queue; the others stand by and take over when it dies (its
                # leadership ends with its coordination lease). A leader re-checks once a second.
                if key not in self._leading or loop.time() - checked_at >= LEADER_CHECK_SECONDS:
                    checked_at = loop.time()
                    if not await self._lead(ctx, leadership, key):
                        await asyncio.sleep(self.poll_interval)
                        continue
                async with room:
                    await room.wait_for(lambda: in_flight < self.max_in_flight)
                    free = self.max_in_flight - in_flight
                try:
                    claimed = await client.claim(queue, ttl=self.claim_ttl, grace=self.claim_grace,
                                                      limit=min(self.claim_limit, free))
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
                in_flight += len(messages)
                task = loop.create_task(self._handle_claim(ctx, client, queue, claim_id, messages, finished))
                self._work.add(task)
                task.add_done_callback(self._work.discard)
        finally:
            self._leading.discard(key)
            with contextlib.suppress(Exception):
                await ctx.coordination.resign(leadership)

    async def _lead(self, ctx: SourceContext, leadership: str, key: tuple[str, str]) -> bool:
        """Whether this replica polls the queue now (and log when that changes)."""
        try:
            leads = await ctx.coordination.campaign(leadership)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("zaqar: coordination did not answer; not polling the queue until it does", extra={"queue": key[1]})
            leads = False
        if leads != (key in self._leading):
            (self._leading.add if leads else self._leading.discard)(key)
            log.info("zaqar: this replica polls the queue" if leads else "zaqar: another replica polls the queue",
                     extra={"queue": key[1], "project_id": key[0]})
        return leads

    async def _handle_claim(self, ctx: SourceContext, client: ZaqarClient, queue: str, claim_id: str,
                            messages: list[Any], finished) -> None:
        """Process one claim's messages side by side, renewing the claim until all are done."""
        renewer = asyncio.get_running_loop().create_task(self._renew(client, queue, claim_id))
        try:
            async def one(message: Any) -> bool:
                try:
                    return await self.process(ctx, queue, claim_id, message, client=client)
                finally:
                    await finished(1)
            results = await asyncio.gather(*(one(m) for m in messages), return_exceptions=True)
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        if not all(r is True for r in results):
            # The router refused some: hand them back now rather than after the claim ttl.
            try:
                await client.release(queue, claim_id)
            except Exception:
                log.warning("zaqar claim release failed; messages return at claim expiry", extra={"queue": queue})
            await asyncio.sleep(self.poll_interval)

    async def _renew(self, client: ZaqarClient, queue: str, claim_id: str) -> None:
        """The visibility-timeout heartbeat: extend the claim every renew_interval while its messages run."""
        while True:
            await asyncio.sleep(self.renew_interval)
            try:
                await client.renew(queue, claim_id, ttl=self.claim_ttl, grace=self.claim_grace)
                log.debug("zaqar claim renewed", extra={"queue": queue, "claim_id": claim_id})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("zaqar claim renewal failed; will try again", extra={"queue": queue, "claim_id": claim_id})

    async def process(self, ctx: SourceContext, queue: str, claim_id: str | None, message: Any, *,
                      client: ZaqarClient | None = None) -> bool:
        """Publish one claimed message (claimed with `client`, default the source's own), then
        delete it with its claim id. False when the router did not take it (the message stays
        claimed and comes back). The event is the project's whose queue it came from."""
        client = client or self.client
        message_id = message.get("id") if isinstance(message, dict) else None
        try:
            if not isinstance(message_id, str) or not message_id:
                raise MalformedMessage("message has no id")
            if "body" not in message:
                raise MalformedMessage("message has no body")
            event = message_event(queue=queue, project_id=client.project_id or "default", message_id=message_id,
                                  body=message["body"], age=message.get("age"))
        except MalformedMessage as exc:
            await ctx.dead_letter(source=KIND, reason=f"malformed zaqar message in queue {queue!r}: {exc}",
                                  payload=message, event_id=message_id if isinstance(message_id, str) else None,
                                  project_id=client.project_id or "default")
            # Dead-lettered: deleting it stops Zaqar from handing the same poison message out forever.
            if isinstance(message_id, str) and message_id:
                await self._delete(client, queue, message_id, claim_id, message_id)
            return True
        extra = {"event_id": event.id, "queue": queue, "message_id": message_id}
        if not ctx.matching(event):
            # Consumed from the queue but wanted by no subscription (their types or filters say no):
            # kept as a dead letter an operator can list, not deleted without a trace.
            await ctx.dead_letter(source=KIND, reason=f"zaqar message in queue {queue!r} matched no subscription "
                                  "(their types or filters exclude it); removed from the queue", payload=message,
                                  event_id=event.id, project_id=client.project_id or "default")
            await self._delete(client, queue, message_id, claim_id, event.id)
            return True
        try:
            # Only once this returns is the message safe elsewhere: on the bus, or (memory bus)
            # its executions recorded. Deleting earlier would lose it in a crash.
            await ctx.publish(event, settle=not ctx.durable)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("zaqar message not taken by the router; it will be claimed again", extra=extra)
            return False
        await self._delete(client, queue, message_id, claim_id, event.id)
        log.info("zaqar message published", extra=extra)
        return True

    async def _delete(self, client: ZaqarClient, queue: str, message_id: str, claim_id: str | None, event_id: str) -> None:
        try:
            if not await client.delete_message(queue, message_id, claim_id):
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
        if self.per_project and not token:
            # Under Keystone an unauthenticated push could put events into any project: closed.
            return web.json_response({"error": "push is closed under Keystone until [zaqar] push_token is set"}, status=401)
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
        # Under Keystone the push token is shared, so the caller may not choose the project: pushed
        # messages are the source's project's, like the queues it claims from.
        chosen = None if self.per_project else request.query.get("project_id")
        project_id = chosen or self.client.project_id or "default"
        return message_event(queue=queue, project_id=project_id, message_id=message_id, body=body)
