"""Headwater: builds every part from the configuration, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import datetime as _dt
import logging
import os
import re
import socket
import uuid
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from router import __version__, download_tokens, plugins, tracing
from router.api.common import CTX_KEY
from router.bus import Bus
from router.config import Config, ConfigError
from router.dispatch import Dispatcher
from router.events import Event, utcnow
from router.builds import Builds
from router.executions import ExecutionService, InvalidTarget, TargetUnavailable
from router.gctuning import tune_for_server
from router.connguard import ConnectionGuard
from router.credentials import TrustCredentials
from router.dashboard.feed import EventFeed
from router.history import EventLog
from router.results import ResultSinks
from router.index import SOURCE_KIND_EXTENSION, SubscriptionIndex
from router.keystone import Keystone
from router.metrics import Metrics
from router.policy import PUBLIC_ROUTES, Policy
from router.store import Database, NotFound, Store
from router.store import models
from router.subscription_feed import SubscriptionFeed

log = logging.getLogger(__name__)

REDRIVE_SECONDS = 60.0  # how often retries overdue on the bus are looked for


def _plugin(kind: str, name: str, option: str) -> type:
    try:
        return plugins.load(kind, name)
    except plugins.PluginNotFound as exc:
        raise ConfigError(f"{option} = {name!r}: {exc}") from None
    except ImportError as exc:  # e.g. the rabbitmq extra is not installed
        raise ConfigError(f"{option} = {name!r} cannot be loaded: {exc}") from None


def process_id() -> str:
    """This process's name among the replicas: host, pid and a random part (pids repeat across restarts)."""
    host = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().lower())[:30].strip("-") or "headwater"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def subscription_view(row: models.Subscription) -> plugins.Subscription:
    return plugins.Subscription(
        id=row.id, project_id=row.project_id, source=row.source, kind=row.kind, types=tuple(row.types or ()),
        filters=dict(row.filters or {}), function_id=row.function_id, function_version=row.function_version,
        function_alias=row.function_alias, name=row.name, pattern=row.pattern,
        first_execution_time=row.first_execution_time, next_execution_time=row.next_execution_time,
        count=row.count, status=row.status, function_input=row.function_input, options=dict(row.options or {}))


class _SourceContext:
    """What one running source sees of the router (router.plugins.SourceContext)."""

    def __init__(self, app: Headwater, kind: str):
        self._app = app
        self._kind = kind
        self.config = app.config

    @property
    def durable(self) -> bool:
        return self._app.bus_durable

    @property
    def credentials(self) -> plugins.Credentials:
        return self._app.credentials

    async def publish(self, event: Event, *, expect: Sequence[str] = (), settle: bool = False) -> dict[str, str]:
        event.extensions[SOURCE_KIND_EXTENSION] = self._kind
        if event.time is None:
            event.time = utcnow()
        # The expected executions' records are written while the event goes onto the bus, and both
        # are awaited before publish returns: either may land first, as an execution's id comes
        # from the event (the router's claim inserts a record that the event outran). The targets
        # are resolved first, so an event for one that cannot run is never published.
        records: dict[str, asyncio.Future] = {}
        try:
            for subscription_id in expect:
                sub = self._app.index.get(subscription_id)
                if sub is None:
                    raise plugins.PublishRefused(404, f"Subscription not found [id={subscription_id}]")
                try:
                    records[subscription_id] = await self._app.executions.record_for_event(event, sub)
                except NotFound as exc:
                    raise plugins.PublishRefused(404, str(exc)) from None
                except TargetUnavailable as exc:
                    raise plugins.PublishRefused(409, str(exc)) from None
                except InvalidTarget as exc:
                    raise plugins.PublishRefused(400, str(exc)) from None
            settled = self._app.dispatcher.settled(event.id) if settle else None
            if tracing.enabled:  # tested first: with tracing off, publishing pays one flag test
                with tracing.span(f"publish {event.type}", event=event, kind="producer",
                                  attributes={"cloudevents.event_id": event.id, "headwater.source": self._kind}):
                    tracing.stamp(event)  # the router's span is this one's child
                    await self._app.bus.publish(event)
            else:
                await self._app.bus.publish(event)
        except BaseException:
            # Not published: the records written stay (running, unclaimed), as when the record
            # was written first; their outcome is not waited for.
            for record in records.values():
                record.add_done_callback(_retrieved)
            raise
        # A record that failed after the event is on the bus: the caller hears the error, and the
        # router records the run when it claims it.
        execution_ids = {subscription_id: (await record)[0].id for subscription_id, record in records.items()}
        self._app.history.record(event)
        self._app.feed.offer(event)
        self._app.metrics.child(self._app.metrics.events_in, self._kind).inc()
        if settled is not None:
            await settled
        return execution_ids

    def subscriptions(self, source: str) -> list[plugins.Subscription]:
        return self._app.index.of_source(source)

    def subscription(self, subscription_id: str) -> plugins.Subscription | None:
        return self._app.index.get(subscription_id)

    def matching(self, event: Event) -> list[plugins.Subscription]:
        probe = dataclasses.replace(event, extensions={**event.extensions, SOURCE_KIND_EXTENSION: self._kind})
        return self._app.index.match_or_target(probe)

    def on_subscriptions_changed(self, callback: Callable[[], None]) -> None:
        self._app.change_listeners.append(callback)

    def add_route(self, method: str, path: str, handler, *, public: bool = False) -> None:
        self._app.web.router.add_route(method, path, handler)
        if public:  # answered without a Keystone token: the handler checks its own credentials
            self._app.public_routes.add((method, path))

    def caller_project(self, request: web.Request) -> tuple[str, bool]:
        """The project of the API caller (from its token), and whether the caller may publish
        events for any project (admins and services)."""
        c = request[CTX_KEY]
        may_any = self._app.policy.allowed("headwater:events:create_for_any_project", c.credentials,
                                           {"project_id": c.project_id})
        return c.project_id, may_any

    @property
    def coordination(self) -> plugins.Coordination:
        return self._app.coordination

    async def advance_schedule(self, subscription_id: str, scheduled: _dt.datetime, next_time: _dt.datetime | None,
                               *, fired: bool = True) -> bool:
        advanced = await self._app.store.subscriptions.advance_schedule(subscription_id, scheduled, next_time, count_down=fired)
        await self._app.reload_subscription(subscription_id)
        return advanced

    async def active_executions(self, subscription_id: str) -> int:
        # A run waiting for its retry is still unfinished: overlap=forbid must count it too.
        return await self._app.store.executions.count(subscription_id=subscription_id, status=("running", "retrying"))

    async def cancel_executions(self, subscription_id: str, reason: str, *, message: str = "",
                                except_event: str | None = None) -> int:
        return await self._app.executions.cancel_for_subscription(subscription_id, reason, message=message,
                                                                  except_event=except_event)

    async def dead_letter(self, *, source: str, reason: str, payload: Any, event_id: str | None = None,
                          project_id: str = "default") -> None:
        await self._app.executions.delivery.record_dead_letter(source=source, reason=reason, payload=payload,
                                                               event_id=event_id, project_id=project_id)


def _retrieved(future: asyncio.Future) -> None:
    """Mark a future's outcome as seen (nobody waits for it any more)."""
    if not future.cancelled():
        future.exception()


def private_data_dir(path: Path) -> None:
    """The data directory holds the database, packages and keys: only Headwater's own user may enter
    it (a function running as another uid once read the SQLite database and its WAL from it)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid == os.geteuid():
        os.chmod(path, 0o700)


class Headwater:
    """The whole service in one process: store, bus, engine, index, dispatcher, sources, API."""

    def __init__(self, config: Config):
        self.config = config
        tracing.configure(config)  # before anything that makes spans; a ConfigError without the extra
        self.metrics = Metrics()
        private_data_dir(Path(config.data_dir))
        self.db = Database(config.database.connection, pool_size=config.database.pool_size)
        self.store = Store(self.db)
        # Under Keystone an event reaches only its own project's subscriptions; with auth off there
        # is one tenant (every request is project `default`), and sources' projects are labels.
        self.index = SubscriptionIndex(per_project=config.auth.strategy == "keystone")
        self.change_listeners: list[Callable[[], None]] = []
        self.packages: plugins.PackageStore = _plugin("storage", config.storage.provider, "[storage] provider")(config)
        # One coordination per process, shared by the engine (workers, locks) and the sources (leaders).
        self.coordination: plugins.Coordination = _plugin("coordination", config.engine.coordination,
                                                          "[engine] coordination")(config, process_id())
        self.engine: plugins.Engine = _plugin("engine", config.engine.backend, "[engine] backend")(
            config, self.packages, coordinator=self.coordination)
        self.bus: Bus = _plugin("bus", config.bus.backend, "[bus] backend")(config)
        self.executions = ExecutionService(config, self.store, self.engine, self.metrics)
        if config.engine.coordination != "memory":
            # Subscriptions' limits hold across the replicas sharing this coordination (docs/ha.md).
            self.executions.limits.shared = self.coordination
        self.builds = Builds(config, self.store, self.packages, self.engine, spawn=self.executions.spawn,
                             on_change=self.executions.targets.clear)
        self.history = EventLog(config, self.store)
        self.feed = EventFeed()  # the live tail (dashboard, `headwater events tail`)
        self.download_secret = download_tokens.secret_from_config(config)
        self.policy = Policy(config)  # a policy file that does not load stops start-up here
        self.keystone = Keystone(config) if config.auth.strategy == "keystone" else None
        self.public_routes: set[tuple[str, str]] = set(PUBLIC_ROUTES)
        if self.keystone is not None:
            self.executions.delegate = self.delegated_context
        # Calls to OpenStack services on a project's behalf (sources, the Zaqar sink) act through
        # the subscription's trust, never as Headwater's service user in another project.
        self.credentials = TrustCredentials(self.keystone)
        self.results = ResultSinks(config, self.bus, credentials=self.credentials, subscription=self.index.get)
        self.executions.results = self.results
        self.dispatcher = Dispatcher(self.bus, self.index, self.executions, self.metrics, prefetch=config.bus.prefetch)
        self.roles = frozenset(config.default.roles)
        # The http source's events arrive as API requests: it runs with the api role; the others
        # (pollers, schedules, consumers) with the sources role.
        self.sources: dict[str, plugins.Source] = {}
        for name in config.sources.enabled:
            source_class = _plugin("source", name, "[sources] enabled")
            if ("api" if getattr(source_class, "part_of_api", False) else "sources") in self.roles:
                self.sources[name] = source_class(config)
        from router.api import build_api  # the API imports this module's types; import late

        self.web = build_api(self)
        self._refresher: asyncio.Task | None = None
        self._redriver: asyncio.Task | None = None
        # The index follows the table: own writes at once, other replicas' through the change log.
        self.subscription_feed = SubscriptionFeed(self.store.subscriptions, self.index, subscription_view, self._notify)
        self.dispatcher.refresh_index = self.subscription_feed.catch_up
        self.started_at: _dt.datetime | None = None

    async def delegated_context(self, sub: plugins.Subscription) -> dict[str, Any]:
        """What a run of a subscription made under Keystone carries: the creator it acts for, and,
        when the subscription asks (options.keystone_token), a token of that user scoped to the
        project through the trust, so the function can call OpenStack APIs. Never Headwater's own
        service credentials."""
        assert self.keystone is not None
        token, identity = await self.keystone.trust_token(sub.options["trust_id"])
        context: dict[str, Any] = {"user_id": identity.user_id}
        if sub.options.get("keystone_token"):
            context.update(keystone_token=token, keystone_url=self.config.keystone_authtoken.www_authenticate_uri,
                           keystone_token_expires_at=identity.expires_at.isoformat() if identity.expires_at else None)
        return context

    def source(self, kind: str) -> plugins.Source | None:
        return self.sources.get(kind)

    async def start(self) -> None:
        revision = await self.db.migrate()
        await self.reload_subscriptions()
        await self.coordination.start()
        if "engine" in self.roles:
            await self.engine.start()
        await self.executions.start()  # its journal records what this process's sources and API do too
        if "engine" in self.roles:
            await self.builds.resume()
        await self.history.start()
        await self.bus.start()
        if "router" in self.roles:
            await self.dispatcher.start()
            # A bus that keeps nothing across a restart (memory) lost every retry that was waiting:
            # put them all back now. Durable buses kept theirs; the periodic pass catches any lost.
            await self.executions.redrive_retries(self.index.get, all_waiting=not self.bus_durable)
        for source in self.sources.values():
            await source.start(_SourceContext(self, source.kind))
        self._refresher = asyncio.get_running_loop().create_task(self.subscription_feed.follow())
        if "router" in self.roles:
            self._redriver = asyncio.get_running_loop().create_task(self._redrive_loop())
        self.started_at = utcnow()
        log.info("headwater started", extra={
            "version": __version__, "config_files": list(self.config.files), "schema_revision": revision,
            "database": self.db.url.render_as_string(hide_password=True), "bus": self.config.bus.backend,
            "engine": self.config.engine.backend, "sources": list(self.sources), "subscriptions": len(self.index),
            "roles": sorted(self.roles),
            "public_url": self.config.api.public_url})

    @property
    def bus_durable(self) -> bool:
        """Whether the bus keeps events and waiting retries across a crash (all but memory)."""
        return self.config.bus.backend != "memory"

    async def stop(self) -> None:
        for task in (self._refresher, self._redriver):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for source in reversed(list(self.sources.values())):
            await source.stop()
        if "router" in self.roles:
            await self.dispatcher.stop()
        await self.executions.stop()
        await self.history.stop()
        await self.results.close()
        await self.bus.close()
        if "engine" in self.roles:
            await self.engine.stop()
        await self.coordination.stop()
        await self.packages.close()
        await self.db.dispose()
        tracing.shutdown()

    # -- the index follows the table -----------------------------------------------------------

    async def reload_subscriptions(self) -> None:
        await self.subscription_feed.load()

    async def reload_subscription(self, subscription_id: str) -> None:
        """This process changed a subscription: the index follows at once."""
        await self.subscription_feed.apply(subscription_id)

    def _notify(self) -> None:
        for callback in self.change_listeners:
            callback()

    async def _redrive_loop(self) -> None:
        while True:
            await asyncio.sleep(REDRIVE_SECONDS)
            try:
                await self.executions.redrive_retries(self.index.get, all_waiting=False)
            except Exception:
                log.exception("looking for retries lost by the bus failed; will look again")


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The API's listening socket, taken before anything starts: a port already in use is a
    configuration error that names the option, not a traceback after "headwater started"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # Several worker processes ([api] workers) share the port: the kernel spreads connections over them.
        return socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(f"[api] host = {host}, port = {port}: cannot listen there ({exc.strerror or exc}); "
                          "stop what uses it, or choose another with --port / [api] port") from None


async def start_listener(runner: web.AppRunner, config: Config, sock: socket.socket) -> asyncio.AbstractServer:
    """Serve the API on `sock`, each connection behind the guard (per-client cap, read deadlines)."""
    guard = ConnectionGuard(runner.server, max_per_client=config.api.max_connections_per_client,
                            header_timeout=config.api.request_header_timeout, body_timeout=config.api.request_body_timeout)
    return await asyncio.get_running_loop().create_server(guard, sock=sock)


async def serve(app: Headwater) -> None:
    """Run until cancelled (SIGINT/SIGTERM)."""
    config = app.config
    sock = listen(config.api.host, config.api.port, reuse_port=config.api.workers > 1)
    try:
        await app.start()
    except BaseException:
        sock.close()
        raise
    runner = web.AppRunner(app.web, access_log=None, handle_signals=False)
    listener = None
    try:
        # Inside the try: whatever fails here must still stop what app.start() started.
        await runner.setup()
        listener = await start_listener(runner, config, sock)
        if config.auth.strategy == "noauth" and not _loopback(config.api.host):
            log.warning("AUTHENTICATION IS OFF ([auth] strategy = noauth) on a non-loopback address: anyone who "
                        "reaches %s:%s can read, run and delete every function. Set [auth] strategy = keystone.",
                        config.api.host, config.api.port, extra={"host": config.api.host, "strategy": "noauth"})
        tune_for_server()
        log.info("API listening", extra={"host": config.api.host, "port": config.api.port, "public_url": config.api.public_url})
        await asyncio.Event().wait()
    finally:
        if listener is not None:
            listener.close()  # closes the socket it serves
        else:
            sock.close()
        await runner.cleanup()
        await app.stop()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
