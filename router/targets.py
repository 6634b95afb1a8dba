"""TargetCache: functions, runtimes, versions and aliases held briefly in memory, so routing an
event does not cost a database round trip per lookup."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from router.store import NotFound, Store
from router.store import models

# Changes made through this process's API clear the cache at once; changes made by another replica
# are seen within this many seconds.
DEFAULT_TTL_SECONDS = 2.0


class TargetCache:
    def __init__(self, store: Store, ttl: float = DEFAULT_TTL_SECONDS):
        self.store = store
        self.ttl = ttl
        self._entries: dict[tuple, tuple[float, Any]] = {}
        self._loading: dict[tuple, asyncio.Task] = {}
        self._generation = 0

    def clear(self) -> None:
        self._entries.clear()
        # A load under way when the rows changed must neither store its answer nor be joined by
        # callers that come after the change: they start a load of their own.
        self._loading.clear()
        self._generation += 1

    def peek(self, key: tuple) -> Any:
        """The value under `key` if it is held and fresh, else None (no load: the routing path
        tries this first and awaits `remember` only on a miss)."""
        hit = self._entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    async def remember(self, key: tuple, load) -> Any:
        """The value under `key`, loaded by `load()` when absent or older than the TTL: the rows
        below, and values derived from them (e.g. a resolved target), held as long as they are."""
        value = self.peek(key)
        if value is not None:
            return value
        now = time.monotonic()
        # One load per key at a time: when an entry runs out under load, hundreds of deliveries
        # in flight would otherwise each query the database for the same row. The load runs as a
        # task of its own, so a caller that is cancelled does not cancel it for the others.
        loading = self._loading.get(key)
        if loading is None:
            # The generation as of now, not as of when the task first runs: a clear() in between
            # must count against it.
            loading = self._loading[key] = asyncio.get_running_loop().create_task(
                self._load(key, load, now, self._generation))
        return await asyncio.shield(loading)

    async def _load(self, key: tuple, load, now: float, generation: int) -> Any:
        try:
            value = await load()
            if generation == self._generation:
                self._entries[key] = (now + self.ttl, value)
            return value
        finally:
            if self._loading.get(key) is asyncio.current_task():  # not a newer load, after a clear
                del self._loading[key]

    async def function(self, function_id: str, project_id: str | None) -> models.Function:
        row = await self.remember(("function", function_id), lambda: self.store.functions.get(function_id))
        if project_id is not None and row.project_id != project_id:
            raise NotFound(f"Function not found [id={function_id}]")
        return row

    async def runtime(self, runtime_id: str) -> models.Runtime:
        return await self.remember(("runtime", runtime_id), lambda: self.store.runtimes.get(runtime_id))

    async def version(self, function_id: str, number: int) -> models.FunctionVersion:
        return await self.remember(("version", function_id, number), lambda: self.store.versions.get_number(function_id, number))

    async def alias(self, name: str, project_id: str | None) -> models.FunctionAlias:
        return await self.remember(("alias", name, project_id), lambda: self.store.aliases.by_name(name, project_id=project_id))
