"""Batching per subscription: events gather until `size` are waiting or `window` seconds pass, then
one function run gets them all; the ids it reports failed are retried, the others are done.

A subscription with `batch: {"size": 10, "window": 5}` runs its function with
`{"events": [{"id", "source", "type", "subject", "time", "data"}, …]}`. The function may return
`{"failed": ["<event id>", …]}` (Lambda's batchItemFailures, SQS's partial batch response): those
events get the delivery policy's next attempt (batched again), the rest are recorded as succeeded.
Each event keeps its own execution record, so de-duplication and retries stay per event.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from router.events import Event
from router.plugins import ExecutionResult, Subscription

MAX_SIZE = 1000
MAX_WINDOW = 300.0
# The reason of an event the function reported failed in its batch: retried whatever retry_on says,
# since the function asked for it.
ITEM_FAILED = "batch_item_failed"


class BatchError(ValueError):
    """A batch option that cannot be used; the message names the fault (the API answers 400)."""


def validate_batch(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BatchError('batch must be an object: {"size": N, "window": seconds}.')
    unknown = set(raw) - {"size", "window"}
    if unknown:
        raise BatchError(f"batch: unknown fields {', '.join(sorted(unknown))}; known: size, window.")
    size, window = raw.get("size"), raw.get("window", 1.0)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        raise BatchError(f"batch.size must be an integer from 1 to {MAX_SIZE}.")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= MAX_WINDOW:
        raise BatchError(f"batch.window must be a number of seconds above 0 and at most {MAX_WINDOW:g}.")
    return {"size": size, "window": float(window)}


def batch_of(sub: Subscription) -> dict[str, Any] | None:
    return (sub.options or {}).get("batch")


def event_entry(event: Event, item: Any) -> dict[str, Any]:
    """One event as the function sees it in a batch: its identity and its (mapped) input."""
    return {"id": event.id, "source": event.source, "type": event.type, "subject": event.subject,
            "time": event.time.isoformat() if event.time else None, "data": item}


def failed_ids(output: Any) -> set[str] | None:
    """The ids a batch function reported failed, or None when it reported none (all succeeded)."""
    if isinstance(output, dict) and isinstance(output.get("failed"), list):
        return {str(i) for i in output["failed"]}
    return None


@dataclasses.dataclass
class _Member:
    event: Event
    item: Any
    outcome: asyncio.Future


@dataclasses.dataclass
class _Pending:
    members: list[_Member]
    timer: asyncio.TimerHandle | None = None


# Runs one batch: (subscription, the first member's event, the function input) -> the run's result.
RunBatch = Callable[[Subscription, list[Event], dict[str, Any]], Awaitable[ExecutionResult]]


class Batcher:
    """Collects (event, subscription) pairs per subscription and runs each full (or timed-out) batch once."""

    def __init__(self, run: RunBatch):
        self._run = run
        self._pending: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, sub: Subscription, event: Event, item: Any) -> ExecutionResult:
        """Wait for the batch this event joins to run; returns this event's outcome."""
        options = batch_of(sub)
        assert options is not None
        loop = asyncio.get_running_loop()
        member = _Member(event, item, loop.create_future())
        pending = self._pending.get(sub.id)
        if pending is None:
            pending = self._pending[sub.id] = _Pending([])
            pending.timer = loop.call_later(options["window"], self._flush, sub)
        pending.members.append(member)
        if len(pending.members) >= options["size"]:
            self._flush(sub)
        return await member.outcome

    def _flush(self, sub: Subscription) -> None:
        pending = self._pending.pop(sub.id, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run_batch(sub, pending.members))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, sub: Subscription, members: list[_Member]) -> None:
        try:
            result = await self._run(sub, [m.event for m in members],
                                     {"events": [event_entry(m.event, m.item) for m in members]})
        except BaseException as exc:
            for m in members:
                if not m.outcome.done():
                    m.outcome.set_exception(exc)
            raise
        failed = failed_ids(result.output) if result.status == "success" else None
        for m in members:
            if m.outcome.done():
                continue
            if failed is not None and m.event.id in failed:
                m.outcome.set_result(dataclasses.replace(
                    result, status="failed", reason=ITEM_FAILED,
                    output={"failed": True, "batch_size": len(members), "output": result.output}))
            else:
                m.outcome.set_result(result)

    async def stop(self) -> None:
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
            for m in pending.members:
                m.outcome.cancel()
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
