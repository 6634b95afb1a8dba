"""ExecutionService: resolve a function target, record an execution, run it on the engine, record
the outcome. Used by the API (direct executions) and by the dispatcher (event executions)."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import datetime as _dt
import json
import logging
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

from router import builds, mapping, tracing
from router.config import Config
from router.delivery import DeliveryPolicy, DeliveryService
from router.batching import Batcher, batch_of
from router.events import Event, derived_id, execution_id_for
from router.log import current_event_id, current_execution_id
from router.metrics import Metrics
from router.plugins import Engine, ExecutionRequest, ExecutionResult, FunctionSpec, PackageRef, Subscription
from router.store import NotFound, Store
from router.store.journal import ExecutionJournal, ExecutionRecord
from router.limits import Limiter
from router.results import ResultSinks, result_event
from router.targets import TargetCache
from router.store import models

log = logging.getLogger(__name__)


def _eager(coro, context: contextvars.Context) -> tuple[bool, Any]:
    """Run a coroutine in `context` up to its first wait: (True, its result) if it finished
    without waiting, else (False, a task, in that context, running the rest)."""
    try:
        waiting_on = context.run(coro.send, None)
    except StopIteration as stop:
        return True, stop.value
    return False, asyncio.get_running_loop().create_task(_resume(coro, waiting_on), context=context)


async def _resume(coro, waiting_on) -> Any:
    return await _rest(coro, waiting_on)


@types.coroutine
def _rest(coro, waiting_on):
    """The rest of a coroutine `_eager` started: the future it waits on first, then itself."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as stop:
                return stop.value

FINISHED = ("success", "failed", "error")
# An event execution that failed and waits on the bus for its next attempt: not finished, not owned.
RETRYING = "retrying"
LEASE_MARGIN_SECONDS = 30.0  # default of [delivery] lease_margin
LEASE_POLL_SECONDS = 0.5
REDRIVE_BATCH = 1000  # retrying executions looked at per pass
COUNT_FLUSH_SECONDS = 1.0
BUILD_WAIT_MARGIN = 30.0  # beyond [engine] build_timeout, an execution waits this long for a running build


class TargetUnavailable(RuntimeError):
    """The function's runtime is not available (the API answers 409)."""


class InvalidTarget(ValueError):
    """A target that cannot be executed as asked (the API answers 400)."""


def render_input(value: Any) -> str | None:
    """How an execution's input is shown in the API: a raw string as itself, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


# How often a replica looks for executions it runs that another replica cancelled (finished their
# record: cron overlap=replace fired there). One query per period while event executions run here,
# for those running longer than one period (short runs end before a cancel could matter).
CANCEL_POLL_SECONDS = 1.0
CANCEL_POLL_BATCH = 500

# How an event execution's description names what created it (Qinling's wording for jobs and webhooks).
_KIND_LABELS = {"job": "Job", "webhook": "Webhook"}


class _EngineCall:
    """One engine call of an event execution, cancellable by subscription."""

    __slots__ = ("task", "subscription_id", "event_id", "started", "outcome")

    def __init__(self, task: asyncio.Task, subscription_id: str, event_id: str | None):
        self.task = task
        self.subscription_id = subscription_id
        self.event_id = event_id
        self.started = time.monotonic()
        # Set when the call is cancelled on purpose: (status, reason, output, logs) to report instead.
        self.outcome: tuple[str, str, Any, str] | None = None


class ExecutionService:
    def __init__(self, config: Config, store: Store, engine: Engine, metrics: Metrics):
        self.config = config
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.targets = TargetCache(store)
        self.limits = Limiter()
        self.results: ResultSinks | None = None  # set by the app once the bus exists
        # Set by the app under Keystone: what a subscription's run adds to the function's context
        # when it acts for its creator through a trust (user id, and a token when asked for).
        self.delegate: Callable[[Subscription], Awaitable[dict[str, Any]]] | None = None
        self.journal = ExecutionJournal(store.db)
        self._background: set[asyncio.Task] = set()
        # Qinling's per-function execution `count`, summed in memory and written once a second:
        # an informational counter is not worth a transaction per event.
        self._pending_counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self._count_flusher: asyncio.Task | None = None
        # Event executions this process is handling now: a duplicate delivery waits instead of re-running.
        self._in_flight: dict[str, asyncio.Future | None] = {}
        # Engine calls of event executions running here, by execution id: what cancel_for_subscription
        # stops (cron overlap=replace); the watcher stops those another replica cancelled.
        self._engine_calls: dict[str, _EngineCall] = {}
        self._cancel_watcher: asyncio.Task | None = None
        # Retries and dead letters; the dispatcher hands it the bus it consumes from.
        self.delivery = DeliveryService(config, store, metrics)
        # Executions in progress here, read by the gauge when scraped (not written twice per run).
        self._running = 0
        metrics.executions_running.set_function(lambda: self._running)
        self.lease_margin = getattr(getattr(config, "delivery", None), "lease_margin", LEASE_MARGIN_SECONDS)
        self.batcher = Batcher(self._run_batch)

    # -- targets ------------------------------------------------------------------------------

    async def resolve(self, *, project_id: str | None, function_id: str | None, version: int | None,
                      alias: str | None) -> tuple[models.Function, int]:
        """The function and version an execution runs; aliases resolve at use time (the answer is
        cached as long as the rows it comes from)."""
        key = ("target", project_id, function_id, version, alias)
        return self.targets.peek(key) or await self.targets.remember(
            key, lambda: self._resolve(project_id=project_id, function_id=function_id, version=version, alias=alias))

    async def _resolve(self, *, project_id: str | None, function_id: str | None, version: int | None,
                       alias: str | None) -> tuple[models.Function, int]:
        if alias:
            row = await self.targets.alias(alias, project_id)
            function_id, version = row.function_id, row.function_version
        if not function_id:
            raise InvalidTarget("Either function_alias or function_id must be provided.")
        function = await self.targets.function(function_id, project_id)
        version = version or 0
        if version:
            if function.code.get("source") != "package":
                raise InvalidTarget("Can not specify version for non-package type function.")
            await self.targets.version(function.id, version)
        if function.runtime_id:
            runtime = await self.targets.runtime(function.runtime_id)
            if runtime.status != "available":
                raise TargetUnavailable(f"Runtime {runtime.id} is not available.")
        return function, version

    async def function_spec(self, function: models.Function, version: int) -> FunctionSpec:
        """What the engine needs to know of a function version (scale-up uses it too)."""
        return await self._spec(function, version)

    async def _spec(self, function: models.Function, version: int) -> FunctionSpec:
        key = ("spec", function.id, version)
        return self.targets.peek(key) or await self.targets.remember(key, lambda: self._build_spec(function, version))

    async def _build_spec(self, function: models.Function, version: int) -> FunctionSpec:
        runtime_image = None
        if function.runtime_id:
            runtime_image = (await self.targets.runtime(function.runtime_id)).image
        md5 = function.code.get("md5sum")
        if version:
            md5 = (await self.targets.version(function.id, version)).md5sum or md5
        package = PackageRef(function.project_id, function.id, version, md5) if function.code.get("source") == "package" else None
        if package is not None and builds.build_state(function.code) is not None:
            # A compiled runtime: executions run the built artifact, never the source.
            package = builds.artifact_ref(function, version)
        return FunctionSpec(id=function.id, version=version, runtime_id=function.runtime_id, runtime_image=runtime_image,
                            code=function.code, entry=function.entry, cpu=function.cpu, memory_size=function.memory_size,
                            timeout=function.timeout or self.config.resource_limits.default_timeout,
                            package=package, project_id=function.project_id)

    async def _built_spec(self, function: models.Function, version: int) -> tuple[FunctionSpec, ExecutionResult | None]:
        """The spec of a function whose build was not available when looked up: wait for a running
        build; a failed one ends the execution with the compiler's message."""
        function = await builds.wait(self.store, function, self.config.engine.build_timeout + BUILD_WAIT_MARGIN)
        spec = await self._build_spec(function, version)
        failed = builds.build_failure(function.code)
        if failed is None and builds.status(function.code) == builds.BUILDING:
            failed = ExecutionResult.platform_error(f"Function {function.id} is still building.")
        return spec, failed

    # -- API executions -----------------------------------------------------------------------

    async def create(self, *, project_id: str, function_id: str | None, version: int | None, alias: str | None,
                     input: Any, sync: bool, description: str | None) -> ExecutionRecord:
        function, version = await self.resolve(project_id=project_id, function_id=function_id, version=version, alias=alias)
        # Through the journal's group commit, as event executions are; the count is summed in memory.
        values = dict(id=models.new_id(), function_id=function.id, function_version=version, function_alias=alias,
                      status="running", sync=sync, input=input, description=description, project_id=project_id,
                      attempts=1, lease_until=models.utcnow() + _dt.timedelta(seconds=self._lease(function)))
        started = self.journal.start_execution(values)
        if sync:
            return await self._run_sync(started, values, function, version)
        row, _ = await started  # an async execution's id is answered only once its record exists
        self._count(function.id, version)
        self.spawn(self.run(row, function, version))
        return row

    async def _run_sync(self, started: asyncio.Future, values: dict[str, Any], function: models.Function,
                        version: int) -> ExecutionRecord:
        """A sync execution runs while its record is being written: the caller waits for the run,
        not for a commit and then the run. Its outcome is written once the start has committed (the
        journal never sends a finish before its start); a start that fails stops the run."""
        run = asyncio.ensure_future(self.execute(ExecutionRecord(**values), function, version))
        try:
            row, _ = await started
            self._count(function.id, version)
            result = await run
        finally:
            if not run.done():
                run.cancel()  # the record could not be written, or the caller went away: the engine stops it
        await self.record(row, result)
        return row

    def spawn(self, coro) -> None:
        """Run work in the background, tracked so that stop() cancels it (async executions, pool builds)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run(self, row: models.Execution, function: models.Function, version: int, *,
                  event_id: str | None = None) -> models.Execution:
        """Run a recorded execution on the engine and record its outcome."""
        result = await self.execute(row, function, version, event_id=event_id)
        await self.record(row, result)
        return row

    async def _engine_execute(self, row: models.Execution, request: ExecutionRequest, event_id: str | None,
                              cancellable: bool) -> ExecutionResult:
        if cancellable:
            return await self._engine_call(row, request, event_id)
        return await self.engine.execute(request)

    async def execute(self, row: models.Execution, function: models.Function, version: int, *,
                      event_id: str | None = None, cancellable: bool = False,
                      context: dict[str, Any] | None = None) -> ExecutionResult:
        """Run a recorded execution on the engine; the caller records the outcome."""
        token = current_execution_id.set(row.id)
        self._running += 1
        started = time.perf_counter()
        try:
            try:
                spec = await self._spec(function, version)
                if not version and builds.status(spec.code) != builds.AVAILABLE:
                    spec, failed = await self._built_spec(function, version)
                    if failed is not None:
                        return failed
                request = ExecutionRequest(execution_id=row.id, function=spec, input=row.input, event_id=event_id,
                                           context={**(context or {}), "execution_id": row.id, "function_id": function.id,
                                                    "function_version": version, "project_id": row.project_id,
                                                    "event_id": event_id})
                if tracing.enabled:  # tested first: with tracing off, an execution pays one flag test
                    with tracing.span(f"engine execute {function.name or function.id}", attributes={
                            "headwater.execution_id": row.id, "headwater.function_id": function.id}):
                        # The runtime's and the function's own spans join this trace.
                        request.context["traceparent"] = tracing.traceparent()
                        result = await self._engine_execute(row, request, event_id, cancellable)
                else:
                    result = await self._engine_execute(row, request, event_id, cancellable)
            except Exception as exc:  # the engine promises not to raise; if it does, it's ours
                log.exception("engine raised instead of returning a result")
                result = ExecutionResult.platform_error(f"Internal service error: {type(exc).__name__}")
            self.metrics.execution_seconds.observe(time.perf_counter() - started)
            if log.isEnabledFor(logging.INFO):
                log.info("execution finished", extra={"status": result.status, "reason": result.reason,
                                                      "duration": result.duration, "function_id": function.id})
            return result
        finally:
            self._running -= 1
            current_execution_id.reset(token)

    async def record_many(self, finished: list[tuple[ExecutionRecord, ExecutionResult]]) -> None:
        """`record` for many finished executions (none retrying): one journal write."""
        finished_at = models.utcnow()
        writes = [{"id": row.id, "status": result.status, "result": {"duration": round(result.duration, 3),
                                                                      "output": result.output},
                   "logs": result.logs, "reason": result.reason, "updated_at": finished_at} for row, result in finished]
        await self.journal.finish_executions(writes)
        metrics = self.metrics
        for (row, result), write in zip(finished, writes):
            row.status, row.result, row.logs, row.reason = result.status, write["result"], result.logs, result.reason
            row.updated_at = finished_at
            metrics.child(metrics.executions, result.status, result.reason).inc()
            if result.status != "success":
                metrics.child(metrics.executions_failed, result.reason).inc()

    async def record(self, row: models.Execution, result: ExecutionResult, *, status: str | None = None) -> None:
        """Record an outcome; `status` RETRYING keeps the execution open for its next attempt."""
        status = status or result.status
        document = {"duration": round(result.duration, 3), "output": result.output}
        finished_at = models.utcnow()
        await self.journal.finish(row.id, status=status, result=document, logs=result.logs, reason=result.reason,
                                  updated_at=finished_at)
        row.status, row.result, row.logs, row.reason = status, document, result.logs, result.reason
        row.updated_at = finished_at  # what the journal wrote, for callers that show the row
        if status == RETRYING:
            return
        metrics = self.metrics
        metrics.child(metrics.executions, result.status, result.reason).inc()
        if result.status != "success":
            metrics.child(metrics.executions_failed, result.reason).inc()

    # -- event executions ---------------------------------------------------------------------

    def _description(self, sub: Subscription) -> str:
        user = (sub.options or {}).get("user_id")
        # Whose identity the run acts with (Keystone: the creator's, through its trust).
        return f"Created by {_KIND_LABELS.get(sub.kind, 'Subscription')} {sub.id}" + (f" for user {user}" if user else "")

    async def prepare_for_event(self, event: Event, sub: Subscription, *, claim: bool = False,
                                execution_id: str | None = None) -> tuple[ExecutionRecord, models.Function, int, bool]:
        """Record the execution of (event, subscription) unless it exists; returns it with its target
        and whether it was created now (and, with `claim`, is owned by the caller)."""
        function, version = await self.resolve(project_id=sub.project_id, function_id=sub.function_id,
                                               version=sub.function_version, alias=sub.function_alias)
        # Created already claimed (lease and first attempt) when `claim` is set: one transaction, not two.
        lease = {"lease_until": models.utcnow() + _dt.timedelta(seconds=self._lease(function)), "attempts": 1} if claim else {}
        row, created = await self.journal.start_execution(self._event_row(event, sub, function, version, execution_id, lease))
        if created:
            self._count(function.id, version)
        return row, function, version, created

    async def record_for_event(self, event: Event, sub: Subscription) -> asyncio.Future[tuple[ExecutionRecord, bool]]:
        """Resolve the target now (raising as prepare_for_event does) and submit the execution's
        record to the journal without waiting for its commit: a webhook writes its record while
        the event goes onto the bus, and awaits both before it answers."""
        function, version = await self.resolve(project_id=sub.project_id, function_id=sub.function_id,
                                               version=sub.function_version, alias=sub.function_alias)
        started = self.journal.start_execution(self._event_row(event, sub, function, version, None, {}))

        def count(future: asyncio.Future) -> None:
            if not future.cancelled() and future.exception() is None and future.result()[1]:
                self._count(function.id, version)

        started.add_done_callback(count)
        return started

    async def claim_for_event(self, event: Event, sub: Subscription, *, execution_id: str | None = None
                              ) -> tuple[ExecutionRecord, models.Function, int, bool]:
        """Record the execution of (event, subscription) claimed by the caller, or claim the one
        recorded already that nobody runs (a webhook's, recorded at publish): one batched write,
        no read-back. Returns it with its target and whether the caller now owns it (if not: the
        row as stored, finished or held by another worker)."""
        function, version = await self.resolve(project_id=sub.project_id, function_id=sub.function_id,
                                               version=sub.function_version, alias=sub.function_alias)
        lease = {"lease_until": models.utcnow() + _dt.timedelta(seconds=self._lease(function)), "attempts": 1}
        row, created, claimed = await self.journal.claim_execution(
            self._event_row(event, sub, function, version, execution_id, lease))
        if created:
            self._count(function.id, version)
        return row, function, version, claimed

    def _event_row(self, event: Event, sub: Subscription, function: models.Function, version: int,
                   execution_id: str | None, extra: dict[str, Any]) -> dict[str, Any]:
        return dict(id=execution_id or execution_id_for(event.source, event.id, sub.id), function_id=function.id,
                    function_version=version, function_alias=sub.function_alias, status="running", sync=False,
                    input=mapping.event_input(event, sub), description=self._description(sub),
                    project_id=sub.project_id, event_id=event.id, subscription_id=sub.id, **extra)

    def _count(self, function_id: str, version: int) -> None:
        self._pending_counts[(function_id, version)] += 1
        if self._count_flusher is None or self._count_flusher.done():
            self._count_flusher = asyncio.get_running_loop().create_task(self._flush_counts_later())

    async def _flush_counts_later(self) -> None:
        await asyncio.sleep(COUNT_FLUSH_SECONDS)
        await self.flush_counts()

    async def flush_counts(self) -> None:
        pending, self._pending_counts = self._pending_counts, collections.Counter()
        for (function_id, version), n in pending.items():
            try:
                await self.store.functions.bump_count(function_id, version, n)
            except Exception:
                log.exception("could not record execution counts", extra={"function_id": function_id})

    def _lease(self, function: models.Function) -> float:
        return (function.timeout or self.config.resource_limits.default_timeout) + self.lease_margin

    async def run_for_event(self, event: Event, sub: Subscription, *, attempt: int = 1,
                            last_status: str | None = None) -> None:
        """Execute (event, subscription) once. A redelivery of an event whose execution finished
        does nothing; one whose execution another worker is running waits for that worker (and
        takes over if its lease runs out, i.e. it died). `attempt` > 1 is a retry the delivery
        policy scheduled (the event came back on the retry topic)."""
        execution_id = execution_id_for(event.source, event.id, sub.id)
        in_flight = self._in_flight
        while execution_id in in_flight:
            # A duplicate delivery to this process: wait for the first (whose future is made only
            # now, as duplicates are rare and every event passes here).
            running_here = in_flight[execution_id]
            if running_here is None:
                running_here = in_flight[execution_id] = asyncio.get_running_loop().create_future()
            await asyncio.shield(running_here)
        in_flight[execution_id] = None
        try:
            if self.limits.limited(sub):
                # The subscription's limits (concurrency, rate, order by key) admit it first: an event
                # over a limit waits here, unacknowledged on the subscription's own parking topic
                # (the dispatcher parks events of limited subscriptions there), never dropped.
                async with self.limits.admit(sub, event):
                    await self._run_for_event(event, sub, execution_id, attempt, last_status)
            else:
                await self._run_for_event(event, sub, execution_id, attempt, last_status)
        finally:
            waiting = in_flight.pop(execution_id)
            if waiting is not None:
                waiting.set_result(None)

    async def run_for_events(self, items: list[tuple[Event, Subscription]],
                             settle: Callable[[int, BaseException | None], Awaitable[None]]) -> None:
        """run_for_event for a batch of first deliveries (item i: an event and its one matching
        subscription): the executions of the plain ones (no limits, batching, overlap rule, trust
        or duplicate here, the target cached) are recorded by one journal write; the others take
        the one-event path. `settle(i, error)` is called as soon as item i is done, so that a
        slow execution holds back no other item's acknowledgement."""
        in_flight = self._in_flight
        now = models.utcnow()
        plain: list[tuple[int, Event, Subscription, str, models.Function, int]] = []
        rows: list[dict[str, Any]] = []
        work: list[Awaitable[None]] = []
        running: list[asyncio.Task] = []  # engine calls that did not answer at once
        unstarted: set[str] = set()  # plain items' executions held in _in_flight whose run has not begun
        # What is the same for every event of a subscription, worked out once per batch.
        shared: dict[str, tuple | None] = {}
        for _, sub in items:
            if sub.id in shared:
                continue
            options = sub.options
            if self.limits.limited(sub) or (options and (
                    options.get("batch") or options.get("overlap") == "replace" or options.get("trust_id"))):
                shared[sub.id] = None  # one event at a time: its run needs more than a start
                continue
            key = ("target", sub.project_id, sub.function_id, sub.function_version, sub.function_alias)
            target = self.targets.peek(key)
            if target is None:
                try:  # the cache ran out: resolved once for the batch
                    target = await self.resolve(project_id=sub.project_id, function_id=sub.function_id,
                                                version=sub.function_version, alias=sub.function_alias)
                except Exception:  # the one-event path reports why (a dead letter)
                    shared[sub.id] = None
                    continue
            function, version = target
            shared[sub.id] = (function, version, self.delivery.policy(sub), self._description(sub),
                              now + _dt.timedelta(seconds=self._lease(function)))
        for i, (event, sub) in enumerate(items):
            execution_id = execution_id_for(event.source, event.id, sub.id)
            common = shared[sub.id]
            if common is None or execution_id in in_flight or common[2].expired(event, now):
                work.append(self._settled(i, self.run_for_event(event, sub), settle))
                continue
            function, version, _, description, lease_until = common
            in_flight[execution_id] = None
            unstarted.add(execution_id)
            plain.append((i, event, sub, execution_id, function, version))
            rows.append({"id": execution_id, "function_id": function.id, "function_version": version,
                         "function_alias": sub.function_alias, "status": "running", "sync": False,
                         "input": mapping.event_input(event, sub), "description": description,
                         "project_id": sub.project_id, "event_id": event.id, "subscription_id": sub.id,
                         "lease_until": lease_until, "attempts": 1, "created_at": now})
        try:
            if plain:
                try:
                    started = await self.journal.start_executions(rows)
                except Exception as exc:
                    started = [exc] * len(plain)
                finished: list[tuple[int, Event, str, ExecutionRecord, ExecutionResult]] = []
                for (i, event, sub, execution_id, function, version), outcome in zip(plain, started):
                    if not isinstance(outcome, tuple) or not outcome[1]:
                        run = self._run_started(event, sub, execution_id, outcome, unstarted)
                        work.append(self._settled(i, run, settle))
                        continue
                    row = outcome[0]
                    self._count(function.id, version)
                    # Started at once, not as a task: an engine that answers without waiting (the
                    # null engine; a result at hand) costs no task, and its outcome joins the
                    # batch's one journal write below. One that waits goes on as a task.
                    context = contextvars.copy_context()
                    context.run(current_event_id.set, event.id)
                    done, value = _eager(self.execute(row, function, version, event_id=event.id), context)
                    if not done:
                        running.append(value)
                    elif not (sub.options and sub.options.get("sinks")) and (
                            value.status == "success" or not shared[sub.id][2].retries(value)):
                        unstarted.discard(execution_id)
                        finished.append((i, event, execution_id, row, value))
                        continue
                    work.append(self._settled(i, self._run_executed(event, sub, execution_id, row, value, unstarted),
                                              settle))
                if finished:
                    work.append(self._record_finished(finished, settle))
            for failure in await asyncio.gather(*work, return_exceptions=True):
                if isinstance(failure, BaseException):
                    raise failure  # only a cancellation: each item's own errors went to settle
        finally:
            for task in running:
                if not task.done():
                    task.cancel()  # the batch was cancelled (the consumer is going away)
            # Each run releases its own; these are the ones cancelled before they began.
            for execution_id in unstarted:
                waiting = in_flight.pop(execution_id)
                if waiting is not None:
                    waiting.set_result(None)

    async def _record_finished(self, finished: list[tuple[int, Event, str, ExecutionRecord, ExecutionResult]],
                               settle: Callable[[int, BaseException | None], Awaitable[None]]) -> None:
        """Record the outcomes a batch's engine calls gave at once: one journal write for all."""
        error: Exception | None = None
        try:
            await self.record_many([(row, result) for _, _, _, row, result in finished])
        except Exception as exc:
            error = exc
        now = time.time()
        for _, event, execution_id, _, _ in finished:
            self._release(execution_id)
            if error is None and event.time is not None:
                self.metrics.route_seconds.observe(max(0.0, now - event.time.timestamp()))
        for i, *_ in finished:
            await settle(i, error)

    async def _run_executed(self, event: Event, sub: Subscription, execution_id: str, row: ExecutionRecord,
                            executed: ExecutionResult | asyncio.Task, unstarted: set[str]) -> None:
        """The rest of a batched first delivery whose engine call was started (a task still running,
        or a result that needs more than recording: a retry, a dead letter)."""
        unstarted.discard(execution_id)
        current_event_id.set(event.id)
        try:
            result = await executed if isinstance(executed, asyncio.Task) else executed
            await self._settle(event, sub, self.delivery.policy(sub), row, result, 1)
            if event.time is not None:
                self.metrics.route_seconds.observe(max(0.0, time.time() - event.time.timestamp()))
        finally:
            self._release(execution_id)

    def _release(self, execution_id: str) -> None:
        """This process is done with the execution: a duplicate delivery waiting for it goes on."""
        waiting = self._in_flight.pop(execution_id, None)
        if waiting is not None:
            waiting.set_result(None)

    @staticmethod
    async def _settled(i: int, run: Awaitable[None], settle: Callable[[int, BaseException | None], Awaitable[None]]) -> None:
        error: Exception | None = None
        try:
            await run
        except Exception as exc:
            error = exc
        await settle(i, error)

    async def _run_started(self, event: Event, sub: Subscription, execution_id: str,
                           started: tuple[ExecutionRecord, bool] | Exception, unstarted: set[str]) -> None:
        """A batched first delivery whose execution the journal found recorded before (a
        redelivery, another replica), or could not write: the one-event path decides."""
        unstarted.discard(execution_id)
        current_event_id.set(event.id)  # this run's own task: its log lines name the event
        try:
            if isinstance(started, Exception):
                raise started
            await self._run_for_event(event, sub, execution_id, 1, None)
        finally:
            self._release(execution_id)

    async def _run_for_event(self, event: Event, sub: Subscription, execution_id: str, attempt: int,
                             last_status: str | None) -> None:
        policy = self.delivery.policy(sub)
        retry = attempt > 1
        if policy.expired(event):
            await self._expire(event, sub, policy, execution_id, last_status)
            return
        try:
            if retry:
                # A retry's record exists already (status retrying): it is claimed below, not created.
                row, function, version, _ = await self.prepare_for_event(event, sub, execution_id=execution_id)
                claimed = False
            else:
                row, function, version, claimed = await self.claim_for_event(event, sub, execution_id=execution_id)
        except (NotFound, TargetUnavailable, InvalidTarget) as exc:
            # The subscription points at something that cannot run: no retry will help.
            await self.delivery.dead_letter(event, sub, str(exc), policy=policy)
            await self._close_open(execution_id, last_status or "error", "platform")
            return
        number = row.attempts if claimed else 1  # which attempt this run is
        while not claimed:
            if row.status in FINISHED:
                self.metrics.duplicates.inc()
                return
            if row.status == RETRYING:
                if not (retry and row.attempts == attempt - 1):
                    # Its next attempt waits on the bus already: this delivery is a duplicate.
                    self.metrics.duplicates.inc()
                    return
                claimed, number = await self._claim_retry(row.id, attempt, self._lease(function)), attempt
            else:
                claimed, number = await self.store.executions.claim(row.id, self._lease(function)), row.attempts + 1
            if claimed:
                break
            if row.status != RETRYING:
                # Another process holds a live lease: wait for it to finish, or for its lease to run out.
                await asyncio.sleep(LEASE_POLL_SECONDS)
            row = await self.store.executions.get(row.id)
        # Only runs that a later tick may replace are tracked for cancelling: the others skip the
        # extra task and the watcher.
        replaceable = (sub.options or {}).get("overlap") == "replace"
        try:
            context = await self._delegation(sub)
        except Exception as exc:  # the trust is gone, or Keystone is down: a platform error, retried as such
            log.warning("could not act for the subscription's creator: %s", exc, extra={"subscription_id": sub.id})
            result = ExecutionResult.platform_error(f"Could not act for the subscription's creator: {exc}")
        else:
            if batch_of(sub):
                # Joins its subscription's next batch: one run for many events, an outcome for each
                # (the batch run acts for the subscription's creator itself).
                result = await self.batcher.submit(sub, event, row.input)
            else:
                result = await self.execute(row, function, version, event_id=event.id, cancellable=replaceable,
                                            context=context)
        await self._settle(event, sub, policy, row, result, number)
        if event.time is not None:
            self.metrics.route_seconds.observe(max(0.0, time.time() - event.time.timestamp()))

    async def _run_batch(self, sub: Subscription, events: list[Event], batch_input: dict[str, Any]) -> ExecutionResult:
        """One engine run for a batch of a subscription's events (router.batching)."""
        function, version = await self.resolve(project_id=sub.project_id, function_id=sub.function_id,
                                               version=sub.function_version, alias=sub.function_alias)
        batch_id = derived_id("batch", sub.id, *sorted(f"{e.source}\x1f{e.id}" for e in events))
        run = ExecutionRecord(id=batch_id, input=batch_input, project_id=sub.project_id, subscription_id=sub.id)
        log.info("batch run", extra={"subscription_id": sub.id, "execution_id": batch_id, "size": len(events)})
        try:
            context = await self._delegation(sub)
        except Exception as exc:  # as for a single event: a platform error, each member retried as such
            log.warning("could not act for the subscription's creator: %s", exc, extra={"subscription_id": sub.id})
            return ExecutionResult.platform_error(f"Could not act for the subscription's creator: {exc}")
        return await self.execute(run, function, version, event_id=events[0].id, context=context)

    async def _delegation(self, sub: Subscription) -> dict[str, Any] | None:
        """The execution context that acts for the subscription's creator (its trust), if it has one."""
        if self.delegate is None or not (sub.options or {}).get("trust_id"):
            return None
        return await self.delegate(sub)

    async def _settle(self, event: Event, sub: Subscription, policy: DeliveryPolicy, row: models.Execution,
                      result: ExecutionResult, number: int) -> None:
        """Record the outcome of attempt `number`, or schedule the next attempt, or dead-letter."""
        if result.status == "success" or not policy.retries(result):
            await self.record(row, result)
            if sub.options and sub.options.get("sinks"):
                await self._deliver_result(event, sub, policy, row, result)
            return
        outcome = f"last outcome {result.status} ({result.reason}): {str(result.output)[:500]}"
        if number < policy.max_attempts:
            delay = policy.backoff(number, self.delivery.rng)
            limit = policy.expires_at(event)
            if limit is None or models.utcnow() + _dt.timedelta(seconds=delay) < limit:
                # The retry is on the bus before the record says so: a crash in between leaves a
                # running execution whose lease runs out, never an execution nobody will retry.
                await self.delivery.schedule_retry(event, sub, number + 1, delay, result.status)
                await self.record(row, result, status=RETRYING)
                return
            reason = f"max_age {policy.max_age:g}s would pass before attempt {number + 1}; {outcome}"
        else:
            reason = f"{number} attempt(s) failed (max_attempts {policy.max_attempts}); {outcome}"
        # Dead letter first: a crash before the record finishes means a redelivery and a second
        # try at the dead letter, which is idempotent; the other order could lose it.
        await self.delivery.dead_letter(event, sub, reason, policy=policy)
        await self.record(row, result)
        await self._deliver_result(event, sub, policy, row, result)

    async def _deliver_result(self, event: Event, sub: Subscription, policy: DeliveryPolicy, row: models.Execution,
                              result: ExecutionResult) -> None:
        """Send a finished execution's result to the subscription's sinks. The execution is
        recorded already, so a sink that fails (or a chain that runs too deep) is dead-lettered
        with the reason rather than retried by running the function again."""
        specs = (sub.options or {}).get("sinks")
        if not specs or self.results is None:
            return
        outcome = result_event(execution_id=row.id, subscription_id=sub.id, project_id=sub.project_id,
                               function_id=row.function_id, status=result.status, output=result.output,
                               duration=round(result.duration, 3), trigger=event)
        try:
            await self.results.deliver(outcome, specs)
        except Exception as exc:
            log.warning("result could not be delivered", extra={"event_id": event.id, "subscription_id": sub.id})
            await self.delivery.dead_letter(event, sub, f"result sink failed: {type(exc).__name__}: {exc}", policy=policy)

    async def _expire(self, event: Event, sub: Subscription, policy: DeliveryPolicy, execution_id: str,
                      last_status: str | None) -> None:
        age = (models.utcnow() - event.time).total_seconds() if event.time else 0.0
        await self.delivery.dead_letter(event, sub, f"expired: event is {age:.1f}s old, max_age {policy.max_age:g}s",
                                        policy=policy)
        # An execution recorded for it already (a webhook's, or one waiting for its retry) ends here.
        await self._close_open(execution_id, last_status or "error", "expired")

    async def _claim_retry(self, execution_id: str, attempt: int, lease_seconds: float) -> bool:
        """Compare-and-set a waiting execution to running for attempt `attempt`: of two deliveries
        of the same retry, one wins."""
        table = models.Execution.__table__
        now = models.utcnow()
        stmt = (sa.update(table).where(table.c.id == execution_id, table.c.status == RETRYING,
                                       table.c.attempts == attempt - 1)
                .values(status="running", attempts=attempt, lease_until=now + _dt.timedelta(seconds=lease_seconds),
                        updated_at=now))
        async with self.store.db.sessions() as session:
            result = await session.execute(stmt)
            await session.commit()
        return result.rowcount == 1

    async def _close_open(self, execution_id: str, status: str, reason: str) -> None:
        """Finish an execution nobody is running (waiting for a retry, or never claimed)."""
        table = models.Execution.__table__
        now = models.utcnow()
        stmt = (sa.update(table).where(
            table.c.id == execution_id,
            sa.or_(table.c.status == RETRYING,
                   sa.and_(table.c.status == "running", sa.or_(table.c.lease_until.is_(None), table.c.lease_until < now))))
            .values(status=status if status in FINISHED else "error", reason=reason, lease_until=None, updated_at=now))
        async with self.store.db.sessions() as session:
            await session.execute(stmt)
            await session.commit()

    # -- retries the bus no longer holds ---------------------------------------------------------

    async def redrive_retries(self, subscription: Callable[[str], Subscription | None], *,
                              all_waiting: bool) -> int:
        """Put the next attempt of `retrying` executions back on the bus when the bus may have lost
        it: all of them (`all_waiting`, after a restart on a bus that keeps nothing across one), or
        those overdue by more than the lease margin (on any bus). A duplicate of a retry the bus
        still holds is harmless: of two deliveries of one attempt, one claims it (_claim_retry).
        The event comes from the event history; one that is not there any more is dead-lettered,
        and its execution closed. Returns how many executions were re-driven or closed."""
        table = models.Execution.__table__
        stmt = (sa.select(table.c.id, table.c.event_id, table.c.subscription_id, table.c.attempts, table.c.reason,
                          table.c.updated_at, table.c.project_id)
                .where(table.c.status == RETRYING).order_by(table.c.updated_at).limit(REDRIVE_BATCH))
        async with self.store.db.sessions() as session:
            rows = (await session.execute(stmt)).all()
        now = models.utcnow()
        handled = 0
        for row in rows:
            sub = subscription(row.subscription_id) if row.subscription_id else None
            if sub is None:
                await self._close_open(row.id, "error", "subscription deleted while the execution waited for a retry")
                handled += 1
                continue
            policy = self.delivery.policy(sub)
            # When the attempt was due: the longest wait the policy allows (no jitter taken off).
            wait = min(policy.backoff_max, policy.backoff_initial * policy.backoff_multiplier ** max(row.attempts - 1, 0))
            due = row.updated_at + _dt.timedelta(seconds=wait)
            if not all_waiting and now < due + _dt.timedelta(seconds=self.lease_margin):
                continue
            last_status = "error" if row.reason == "platform" else "failed"
            record = None
            if row.event_id:
                async with self.store.db.sessions() as session:
                    record = await session.get(models.EventRecord, row.event_id)
            if record is None:
                reason = (f"the retry of attempt {row.attempts + 1} was lost (the bus did not keep it across a "
                          f"restart) and the event is no longer in the event history")
                await self.delivery.record_dead_letter(
                    letter_id=derived_id("dead-letter", row.event_id or row.id, sub.id), source=sub.source,
                    reason=reason, payload={"id": row.event_id}, event_id=row.event_id, subscription_id=sub.id,
                    project_id=sub.project_id)
                await self._close_open(row.id, last_status, "retry lost")
            else:
                event = Event.from_dict(record.document)
                delay = max(0.0, (due - now).total_seconds())
                await self.delivery.schedule_retry(event, sub, row.attempts + 1, delay, last_status)
                log.warning("retry put back on the bus", extra={"execution_id": row.id, "event_id": row.event_id,
                                                               "attempt": row.attempts + 1, "delay": round(delay, 3)})
            handled += 1
        return handled

    async def start(self) -> None:
        await self.journal.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._count_flusher is not None:
            self._count_flusher.cancel()
            await asyncio.gather(self._count_flusher, return_exceptions=True)
        await self.flush_counts()
        await self.journal.stop()

    # -- cancelling (cron overlap=replace) ----------------------------------------------------

    async def _engine_call(self, row: models.Execution, request: ExecutionRequest,
                           event_id: str | None) -> ExecutionResult:
        """The engine's execute, run as a task that cancel_for_subscription can stop (event
        executions only, so `row` names its subscription)."""
        call = _EngineCall(asyncio.ensure_future(self.engine.execute(request)), row.subscription_id, event_id)
        self._engine_calls[row.id] = call
        self._watch_cancels()
        try:
            # Awaiting the task: when the caller itself is cancelled (shutdown), the engine call is
            # cancelled too and has stopped the function by the time this raises.
            return await call.task  # also when a cancel came too late: the run's real outcome stands
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if call.outcome is None or (current is not None and current.cancelling()):
                raise
            status, reason, output, logs = call.outcome
            return ExecutionResult(status=status, output=output, duration=round(time.monotonic() - call.started, 3),
                                   logs=logs, reason=reason)
        finally:
            if self._engine_calls.get(row.id) is call:
                del self._engine_calls[row.id]

    async def cancel_for_subscription(self, subscription_id: str, reason: str, *, message: str = "",
                                      except_event: str | None = None) -> int:
        """Stop the subscription's unfinished executions except the one of event `except_event`, each
        recorded `failed` with `reason` and `message` (output and log). Engine calls running here are
        cancelled at once (the engine kills the function; only runs of overlap=replace subscriptions
        are tracked for this, see _run_for_event); the others (running on another replica,
        or waiting for a retry) are finished in the store, and the replica running one cancels it
        when its watcher sees that. Returns how many were stopped."""
        message = message or f"Execution cancelled ({reason})."
        outcome = ("failed", reason, message, message + "\n")
        here = []
        for execution_id, call in list(self._engine_calls.items()):
            if call.subscription_id != subscription_id or call.outcome is not None or call.task.done():
                continue
            if except_event is not None and call.event_id == except_event:
                continue
            call.outcome = outcome
            call.task.cancel()
            here.append(execution_id)
        table = models.Execution.__table__
        conditions = [table.c.subscription_id == subscription_id, table.c.status.in_(("running", RETRYING))]
        if except_event is not None:
            conditions.append(sa.or_(table.c.event_id.is_(None), table.c.event_id != except_event))
        if here:
            conditions.append(table.c.id.notin_(here))  # recorded by their own execute, with their duration
        stmt = sa.update(table).where(*conditions).values(
            status="failed", reason=reason, result={"duration": 0.0, "output": message}, logs=outcome[3],
            lease_until=None, updated_at=models.utcnow())
        async with self.store.db.sessions() as session:
            elsewhere = (await session.execute(stmt)).rowcount or 0
            await session.commit()
        if here or elsewhere:
            log.info("executions cancelled", extra={"subscription_id": subscription_id, "reason": reason,
                                                    "here": len(here), "elsewhere": elsewhere})
        return len(here) + elsewhere

    def _watch_cancels(self) -> None:
        if self._cancel_watcher is None or self._cancel_watcher.done():
            task = asyncio.get_running_loop().create_task(self._cancel_watch())
            self._cancel_watcher = task
            self._background.add(task)  # stop() cancels it
            task.add_done_callback(self._background.discard)

    async def _cancel_watch(self) -> None:
        """While event executions run here: cancel those whose record another replica finished."""
        table = models.Execution.__table__
        while self._engine_calls:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            cutoff = time.monotonic() - CANCEL_POLL_SECONDS
            ids = [eid for eid, call in self._engine_calls.items() if call.outcome is None and call.started <= cutoff]
            try:
                for i in range(0, len(ids), CANCEL_POLL_BATCH):
                    stmt = (sa.select(table.c.id, table.c.status, table.c.reason, table.c.result, table.c.logs)
                            .where(table.c.id.in_(ids[i:i + CANCEL_POLL_BATCH]), table.c.status.in_(FINISHED)))
                    async with self.store.db.sessions() as session:
                        rows = (await session.execute(stmt)).all()
                    for row in rows:
                        call = self._engine_calls.get(row.id)
                        if call is None or call.outcome is not None or call.task.done():
                            continue
                        # Its outcome was decided elsewhere: stop the function and report that outcome,
                        # so this replica's record writes what is already there.
                        output = row.result.get("output") if isinstance(row.result, dict) else None
                        call.outcome = (row.status, row.reason or "cancelled", output, row.logs or "")
                        call.task.cancel()
                        log.info("execution finished elsewhere; cancelling it here",
                                 extra={"execution_id": row.id, "reason": row.reason})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not look for cancelled executions; will look again")
