"""MinuteSeries: per-minute counts of events in, routed, executed, failed and dead-lettered, taken
from the Prometheus counters at each minute's start (nothing is added to the routing path)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from router.metrics import Metrics

SERIES = ("in", "routed", "executed", "failed", "dead_lettered")
KEEP_MINUTES = 60


def _total(metric) -> float:
    return sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith("_total"))


def totals(metrics: Metrics) -> dict[str, float]:
    """Each series' counter summed over its labels, now."""
    return {"in": _total(metrics.events_in), "routed": _total(metrics.events_routed),
            "executed": _total(metrics.executions), "failed": _total(metrics.executions_failed),
            "dead_lettered": _total(metrics.dead_letters)}


class MinuteSeries:
    """Snapshots of the counters at minute boundaries; a minute's count is the difference between
    its snapshot and the next (the current minute's: between its snapshot and now)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.time, keep: int = KEEP_MINUTES):
        self.metrics = metrics
        self.clock = clock
        self._snapshots: collections.deque[tuple[int, dict[str, float]]] = collections.deque(maxlen=keep + 1)
        self._task: asyncio.Task | None = None

    def tick(self) -> None:
        """Take the snapshot of the current minute, if not taken yet."""
        minute = int(self.clock() // 60)
        if not self._snapshots or self._snapshots[-1][0] < minute:
            self._snapshots.append((minute, totals(self.metrics)))

    def minutes(self) -> list[dict]:
        """[{minute (epoch seconds), in, routed, …}] oldest first, the current minute last."""
        self.tick()
        now = totals(self.metrics)
        points = list(self._snapshots)
        out = []
        for i, (minute, start) in enumerate(points):
            end = points[i + 1][1] if i + 1 < len(points) else now
            out.append({"minute": minute * 60, **{k: int(end[k] - start[k]) for k in SERIES}})
        return out

    async def _loop(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(60 - self.clock() % 60 + 0.01)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dashboard-minute-series")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
