"""The contracts every plugin kind implements (Source, Sink, Engine, PackageStore, Coordination)
and the registry that finds plugins by name through Python entry points."""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from router.config import Config
from router.events import Event

# ---------------------------------------------------------------------------------------------
# Registry

GROUPS = {
    "bus": "headwater.bus",
    "source": "headwater.sources",
    "sink": "headwater.sinks",
    "engine": "headwater.engines",
    "storage": "headwater.storage",
    "coordination": "headwater.coordination",
}


class PluginNotFound(LookupError):
    pass


def available(kind: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUPS[kind]))


def load(kind: str, name: str) -> type:
    """The plugin class registered under `name` for `kind` (bus, source, sink, engine, storage,
    coordination: for coordination, a factory `(config, process_id) -> Coordination`)."""
    matches = [ep for ep in entry_points(group=GROUPS[kind]) if ep.name == name]
    if not matches:
        raise PluginNotFound(f"no {kind} plugin named {name!r}; installed: {', '.join(available(kind)) or 'none'}")
    return matches[0].load()


# ---------------------------------------------------------------------------------------------
# Subscriptions as plugins see them


@dataclasses.dataclass(frozen=True, slots=True)
class Subscription:
    """A read-only view of one row of the subscription table (what sources and the index use).

    A Qinling *job* is a subscription with source `cron`; a Qinling *webhook* one with source `http`.
    `filters` are exact attribute matches (CloudEvents attribute name → value).
    """

    id: str
    project_id: str
    source: str
    types: tuple[str, ...] = ()
    kind: str = "subscription"  # job, webhook or subscription: how it was made
    filters: dict[str, Any] = dataclasses.field(default_factory=dict)
    function_id: str | None = None
    function_version: int | None = 0
    function_alias: str | None = None
    name: str | None = None
    # Schedules (cron source)
    pattern: str | None = None
    first_execution_time: _dt.datetime | None = None
    next_execution_time: _dt.datetime | None = None
    count: int | None = None
    status: str = "running"
    function_input: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sources

Handler = Callable[..., Awaitable[Any]]


class SubscriptionInvalid(ValueError):
    """A subscription a source cannot serve; the message says why (the API answers 400)."""


class PublishRefused(Exception):
    """The router would not take an event aimed at a subscription: its function, version or alias
    is gone (404), its runtime unavailable (409), or the target invalid (400)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class CredentialsUnavailable(RuntimeError):
    """No token for the project now: Keystone did not answer, or the subscription's trust is gone."""


class Credentials(Protocol):
    """Keystone tokens for calls to OpenStack services (Zaqar, Swift, Aodh) on a project's behalf."""

    active: bool
    """False without Keystone ([auth] strategy = noauth): `token` then always answers None."""

    async def token(self, subscription: Subscription, *, fresh: bool = False) -> str | None:
        """A token that acts for the subscription's creator in the subscription's project (through
        its trust), kept and renewed before it expires; `fresh` drops the kept one first (after a
        401). None when Headwater runs without Keystone or the subscription has no trust. Raises
        CredentialsUnavailable."""


class SourceContext(Protocol):
    """What the router offers a running source."""

    config: Config

    credentials: Credentials
    """Tokens that act for a subscription's creator in its project, for the source's own calls to
    the service its events come from (claiming a project's Zaqar queues, asking Aodh whose alarm it is)."""

    durable: bool
    """True when the bus keeps a published event across a crash of this process (rabbitmq, nats)."""

    async def publish(self, event: Event, *, expect: Sequence[str] = (), settle: bool = False) -> dict[str, str]:
        """Put the event safely on the bus. For each subscription id in `expect` an execution record
        is created first (status running) so callers can hand its id out at once; returns
        {subscription id: execution id}. With `settle`, return only once this process's router has
        handled the event (its executions recorded): what a source that must not lose input needs
        on a bus that is not durable, before it acknowledges the input upstream."""

    def subscriptions(self, source: str) -> Sequence[Subscription]:
        """The current subscriptions of one source kind (a snapshot of the in-memory index)."""

    def subscription(self, subscription_id: str) -> Subscription | None: ...

    def matching(self, event: Event) -> Sequence[Subscription]:
        """The subscriptions of this source that the event would go to now (none: it would be
        dropped unmatched), so a source can keep such input visible instead of consuming it silently."""

    def on_subscriptions_changed(self, callback: Callable[[], None]) -> None: ...

    def add_route(self, method: str, path: str, handler: Handler, *, public: bool = False) -> None:
        """Mount an aiohttp handler on the API (webhook receivers). A public route is answered
        without a Keystone token, so its handler must check the caller itself (a shared token, a
        signature); any other route passes authentication and policy first."""

    def caller_project(self, request: Any) -> tuple[str, bool]:
        """On a non-public route: the caller's project, and whether the caller may act for any
        project (admins and services). Events a caller posts belong to its project."""

    async def advance_schedule(self, subscription_id: str, scheduled: _dt.datetime, next_time: _dt.datetime | None,
                               *, fired: bool = True) -> bool:
        """Move a schedule on from `scheduled` to `next_time` (None: the schedule is done), counting
        down its `count` when the tick `fired` (a skipped tick does not count). Compare-and-set on
        `scheduled`: False if another replica already did."""

    async def active_executions(self, subscription_id: str) -> int:
        """How many executions of this subscription are still running (for overlap policies)."""

    async def cancel_executions(self, subscription_id: str, reason: str, *, message: str = "",
                                except_event: str | None = None) -> int:
        """Stop this subscription's unfinished executions (running, or waiting for a retry), except
        the one of event `except_event`, and record each as failed with `reason` (machine-readable,
        never retried) and `message` (its output and log). Runs on this replica are cancelled at
        once; a run on another replica stops when that replica sees the record (within
        router.executions.CANCEL_POLL_SECONDS). Only subscriptions whose options say
        `"overlap": "replace"` have their runs tracked for this (tracking costs a task per run):
        for any other, the records are finished but the functions run on. Returns how many were
        stopped."""

    async def dead_letter(self, *, source: str, reason: str, payload: Any, event_id: str | None = None,
                          project_id: str = "default") -> None:
        """Record input that could not become an event, with the reason, in the project it came
        from (only that project sees it)."""

    coordination: Coordination
    """This process's coordination with the other replicas: a pull source elects a leader per
    queue with it, so that exactly one replica polls each queue."""


@runtime_checkable
class Source(Protocol):
    kind: ClassVar[str]

    def __init__(self, config: Config) -> None: ...

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        """Check and normalise the source-specific fields of a new or changed subscription; raise
        SubscriptionInvalid with a message naming the fault."""

    async def start(self, ctx: SourceContext) -> None: ...

    async def stop(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Engines

ExecutionStatus = Literal["success", "failed", "error"]

# Machine-readable reasons for an outcome (the runtime protocol's `reason`). `cancelled`: the runtime
# stopped it on request; `replaced`: the router cancelled it for a newer cron tick (overlap=replace);
# `build_failed`: the function's package did not build (no attempt can succeed before a new upload).
REASONS = ("ok", "error", "timeout", "memory", "processes", "files", "cpu", "crashed", "platform", "busy",
           "cancelled", "replaced", "build_failed")


@dataclasses.dataclass(frozen=True, slots=True)
class PackageRef:
    """Where a function version's code lives in the package store."""

    project_id: str
    function_id: str
    version: int
    md5sum: str


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionSpec:
    id: str
    version: int
    runtime_id: str | None
    runtime_image: str | None
    code: dict[str, Any]
    entry: str | None
    cpu: int
    memory_size: int
    timeout: int
    package: PackageRef | None = None
    project_id: str = "default"


@dataclasses.dataclass(frozen=True, slots=True)
class ExecutionRequest:
    execution_id: str
    function: FunctionSpec
    # Any JSON value. A dict becomes keyword arguments, anything else one positional argument,
    # None no argument (Qinling's input model, without its crashes on lists and numbers).
    input: Any = None
    event_id: str | None = None
    context: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class ExecutionResult:
    status: ExecutionStatus
    output: Any = None
    duration: float = 0.0
    logs: str = ""
    reason: str = "ok"

    @classmethod
    def platform_error(cls, message: str, reason: str = "platform") -> ExecutionResult:
        return cls(status="error", output=message, reason=reason)


@dataclasses.dataclass(slots=True)
class BuildResult:
    """The outcome of compiling a package (runtimes with a build step, e.g. go): the artifact zip
    executions run, or the compiler's message."""

    ok: bool
    artifact: bytes | None = None
    message: str = ""


# ---------------------------------------------------------------------------------------------
# Coordination between replicas


@runtime_checkable
class Coordination(Protocol):
    """What the replicas of one Headwater share (etcd, or in-process for one replica): leaders,
    locks, and the map of which worker serves which function. One per process, shared by the
    engine and the sources; everything a process holds ends with it (an etcd lease)."""

    engine_id: str
    """This process's identity among the replicas."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Give up every leadership, lock and claim this process holds."""

    async def campaign(self, name: str) -> bool:
        """Try (without waiting) to become or stay the leader of `name`; True while this process
        leads. Call it again at least every lease period to keep leading."""

    async def resign(self, name: str) -> None: ...

    async def wait_leader(self, name: str, poll: float = 1.0) -> None:
        """Block until this process leads `name`."""

    def lock(self, name: str, timeout: float = 30.0) -> AbstractAsyncContextManager[None]:
        """A mutual-exclusion lock shared by every replica; raises after `timeout` seconds."""

    async def claim(self, pod: str, function_id: str, version: int, info: dict[str, Any]) -> bool:
        """Record that `pod` serves the function version, atomically: False if already claimed."""

    async def unclaim(self, pod: str) -> None: ...

    async def workers(self, function_id: str, version: int) -> dict[str, dict[str, Any]]:
        """pod → claim info of the workers of a function version (any replica's)."""

    async def claims(self) -> dict[str, dict[str, Any]]: ...

    async def report_load(self, function_id: str, version: int, running: int) -> None:
        """Publish how many executions of the function version this process runs now."""

    async def loads(self, function_id: str, version: int) -> dict[str, int]:
        """engine id → running executions of the function version, as each process last reported:
        what scale-up decisions count, so that they see every replica's load."""

    def permit(self, name: str, limit: int) -> AbstractAsyncContextManager[None]:
        """Hold one of `limit` permits of `name` shared by every replica for the block (a
        subscription's max_concurrency); waits while all are held. A dead replica's permits come
        back when its lease ends, never later."""

    async def reserve_rate(self, name: str, interval: float) -> float:
        """Reserve the next slot of a rate shared by every replica (one per `interval` seconds, no
        bursts): returns the seconds to wait before using it (a subscription's rate limit)."""


class EngineBusy(RuntimeError):
    """The engine cannot take more work right now; the caller should back off and retry."""


@runtime_checkable
class Engine(Protocol):
    name: ClassVar[str]

    def __init__(self, config: Config, packages: PackageStore, *, coordinator: Coordination | None = None) -> None:
        """`coordinator`: the process's shared Coordination (started and stopped by the caller);
        None for an engine used on its own, which then needs none or makes its own."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one execution to its end. Never raises for a function's own failure: that is a
        `failed` result; platform trouble is an `error` result. Cancelling the call stops the
        function itself (its process or pod), not just the wait for it."""

    async def release(self, function_id: str, version: int | None = None) -> None:
        """Drop warm workers of a function (all versions when version is None): detach, update, delete."""

    async def workers(self, function_id: str, version: int = 0) -> list[str]:
        """Names of the warm workers serving a function version."""

    # Optional, for runtimes with a build step ([engine] compiled_runtimes):
    # async def build(self, function: FunctionSpec) -> BuildResult
    #     Compile the function's package in its runtime's own environment, under an execution's
    #     limits and containment, within [engine] build_timeout. Never raises for the package's
    #     own failure (ok=False with the compiler's message).


# ---------------------------------------------------------------------------------------------
# Package storage


class PackageInvalid(ValueError):
    """An uploaded package that cannot be stored (not a zip, md5 mismatch, too large)."""


class PackageStoreUnavailable(RuntimeError):
    """The package store could not be reached or refused a request (the API answers 503)."""


@runtime_checkable
class PackageStore(Protocol):
    def __init__(self, config: Config) -> None: ...

    async def put(self, project_id: str, function_id: str, version: int, data: bytes, md5sum: str | None = None) -> str:
        """Store a zip, verifying it (and `md5sum` if given); returns the md5 hex digest."""

    async def get(self, ref: PackageRef) -> bytes: ...

    def path(self, ref: PackageRef) -> str | None:
        """A local filesystem path of the zip, when the store keeps one (the local engine uses it)."""

    async def copy(self, ref: PackageRef, version: int) -> PackageRef: ...

    async def delete(self, ref: PackageRef) -> None: ...

    async def close(self) -> None:
        """Release connections; called once when Headwater stops."""

    swift_enabled: bool
    """Whether functions may take their code from Swift objects."""

    async def check_swift(self, project_id: str, container: str, obj: str) -> None:
        """Refuse (PackageInvalid) a Swift object that cannot be function code."""

    async def fetch_swift(self, project_id: str, function_id: str, container: str, obj: str) -> PackageRef:
        """The Swift object as a stored package (fetched again when it changed)."""


# ---------------------------------------------------------------------------------------------
# Sinks


@runtime_checkable
class Sink(Protocol):
    kind: ClassVar[str]

    def __init__(self, config: Config) -> None: ...

    def validate_target(self, target: dict[str, Any]) -> dict[str, Any]: ...

    async def send(self, event: Event, target: dict[str, Any]) -> None:
        """Deliver a result event to the target; raise on failure so the delivery policy can retry.
        The event's subject is the subscription's id and its `projectid` the subscription's project."""

    # Optional, for sinks that call OpenStack services as the subscription's creator:
    # def use_credentials(self, credentials: Credentials, subscription: Callable[[str], Subscription | None]) -> None
    #     Called once, before the first send, with the router's Credentials and a lookup of
    #     subscriptions by id.
