"""The local engine's warm pool: pre-started runtime servers per runtime that new functions claim, refilled in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

LOG = logging.getLogger(__name__)

RETRY_FIRST = 1.0  # seconds before a runtime whose server would not start is tried again
RETRY_MAX = 300.0  # the wait doubles per failure up to this (php without the PHP CLI fails every time)
# A pool server that dies sooner than this after it started counts as a failed start (backing off),
# so a server that crashes on start-up is not restarted in a tight loop.
CRASH_LOOP = 10.0


class WarmPool:
    """Keeps `size` idle runtime servers per runtime. A server is started exactly as one started for
    a function (same command, containment and credential: the server itself knows nothing of
    functions until its first /execute), so claiming one only skips the server's start-up. A claimed
    server is the claimant's for good: the pool never takes one back, so no server that has held one
    function's package and children ever serves another function."""

    def __init__(self, size: int, start: Callable[[str], Awaitable[Any]], stop: Callable[[Any], Awaitable[None]],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self._start = start
        self._stop = stop
        self._clock = clock
        self.runtimes: list[str] = []
        self._idle: dict[str, list[Any]] = {}
        self._born: dict[Any, float] = {}  # idle server -> when it started
        self._watchers: dict[Any, asyncio.Task] = {}
        self._retry: dict[str, tuple[float, float]] = {}  # runtime -> (not before, current wait)
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, runtimes: list[str]) -> None:
        """Begin filling the pool of each runtime (nothing when size is 0)."""
        self.runtimes = list(runtimes)
        for runtime in self.runtimes:
            self._idle.setdefault(runtime, [])
        if self.size > 0 and self.runtimes and self._task is None:
            self._task = asyncio.create_task(self._refill(), name="local-engine-warm-pool")
            self._wake.set()

    async def stop(self) -> None:
        """Stop refilling and stop every idle server (claimed ones belong to the engine's pools)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        idle = [w for pool in self._idle.values() for w in pool]
        self._idle.clear()
        for w in idle:
            self._unwatch(w)
        await asyncio.gather(*(self._stop(w) for w in idle), return_exceptions=True)

    def claim(self, runtime: str) -> Any | None:
        """An idle live server of `runtime`, now the caller's alone; None when the pool has none."""
        pool = self._idle.get(runtime)
        worker = None
        while pool and worker is None:
            candidate = pool.pop(0)  # the oldest: all are alike, and it has settled longest
            self._unwatch(candidate)
            if candidate.alive:
                worker = candidate
                self._retry.pop(runtime, None)  # this runtime's servers do start and stay up
        if self._task is not None:
            self._wake.set()
        return worker

    def idle(self, runtime: str) -> list[Any]:
        """The idle servers of a runtime (a copy)."""
        return list(self._idle.get(runtime, ()))

    async def wait_full(self, timeout: float) -> bool:
        """Wait until every runtime's pool is full (True), or timeout seconds passed (False)."""
        def full() -> bool:
            return all(len(self._idle.get(rt, ())) >= self.size for rt in self.runtimes)

        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(full), timeout)
            return full()

    async def _refill(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # One server per runtime per pass, so every runtime gets its first one soon.
            progress = True
            while progress:
                progress = False
                for runtime in self.runtimes:
                    if len(self._idle[runtime]) >= self.size or self._backing_off(runtime):
                        continue
                    progress = await self._add(runtime) or progress

    async def _add(self, runtime: str) -> bool:
        try:
            worker = await self._start(runtime)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot start (php without php) backs off
            self._failed(runtime, f"could not start: {exc}")
            return False
        self._idle[runtime].append(worker)
        self._born[worker] = self._clock()
        self._watchers[worker] = asyncio.create_task(self._watch(runtime, worker))
        async with self._changed:
            self._changed.notify_all()
        return True

    def _failed(self, runtime: str, why: str) -> None:
        _, wait = self._retry.get(runtime, (0.0, RETRY_FIRST / 2))
        wait = min(RETRY_MAX, wait * 2)
        self._retry[runtime] = (self._clock() + wait, wait)
        LOG.warning("warm pool: a %s runtime server %s; trying again in %.0f s", runtime, why, wait)
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(wait, self._wake.set)

    def _backing_off(self, runtime: str) -> bool:
        retry = self._retry.get(runtime)
        return retry is not None and self._clock() < retry[0]

    async def _watch(self, runtime: str, worker: Any) -> None:
        """Replace an idle server that dies (a crash, an outside kill) before anyone claims it."""
        await worker.process.wait()
        pool = self._idle.get(runtime)
        if pool is None or worker not in pool:
            return
        pool.remove(worker)
        self._watchers.pop(worker, None)
        lived = self._clock() - self._born.pop(worker, self._clock())
        if lived < CRASH_LOOP:
            self._failed(runtime, f"{worker.name} exited with {worker.process.returncode} {lived:.1f} s after it started")
        else:
            LOG.warning("warm pool: idle runtime server %s exited with %s; replacing it", worker.name, worker.process.returncode)
            self._retry.pop(runtime, None)
        await self._stop(worker)  # its log readers
        self._wake.set()

    def _unwatch(self, worker: Any) -> None:
        self._born.pop(worker, None)
        task = self._watchers.pop(worker, None)
        if task is not None:
            task.cancel()
