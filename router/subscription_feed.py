"""SubscriptionFeed: this replica's subscription index follows the table change by change, never by reloading it whole."""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from router.events import utcnow
from router.index import SubscriptionIndex
from router.plugins import Subscription

log = logging.getLogger(__name__)

# How often the table's revision is read (one row, whatever the table holds). Events that match
# nothing check at once (catch_up), so this bounds only how late a change reaches matching that
# would not have been tried anyway (sources' lists, e.g. a new Zaqar queue).
POLL_SECONDS = 1.0


class SubscriptionFeed:
    """Applies subscription changes to `index`: this process's own writes at once (apply,
    apply_written), other replicas' through the change log (check), which it reads only when the
    table's revision moved. Every change up to `revision` is in the index.

    Writers commit revisions in order (router.store.repositories.record_subscription_change), so
    the changes after `revision` have no gaps; a gap means the log was pruned past this replica
    and it reloads in full. One lock orders the reads and applies of this process, so a row read
    earlier is never applied over one read later."""

    def __init__(self, repository: Any, index: SubscriptionIndex, view: Callable[[Any], Subscription],
                 on_change: Callable[[], None], *, clock: Callable[[], _dt.datetime] = utcnow):
        self.repository = repository  # router.store.repositories.Subscriptions, unscoped
        self.index = index
        self.view = view
        self.on_change = on_change
        self.clock = clock
        self.revision = 0
        # Every change committed before this time is in the index (the start of the last check).
        self.fresh_as_of = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
        self.full_loads = 0
        self._lock = asyncio.Lock()
        # revision → ids this process applied as it wrote them; the check need not read them again.
        self._own: dict[int, set[str]] = {}
        self._catching_up: asyncio.Task | None = None
        self._catching_up_since = self.fresh_as_of

    async def load(self) -> None:
        """Fill the index from the whole table (at start, and when the log was pruned past us)."""
        async with self._lock:
            await self._load()
        self.on_change()

    async def _load(self) -> None:
        started = self.clock()
        # The revision before the rows: rows newer than it are read again by the next check.
        revision = await self.repository.revision()
        rows = await self.repository.all()
        self.index.replace_all(self.view(row) for row in rows)
        self.revision = revision
        self._own.clear()
        self.fresh_as_of = max(self.fresh_as_of, started)
        self.full_loads += 1

    async def check(self) -> bool:
        """Apply what was committed since `revision` (anyone's); True if anything changed."""
        async with self._lock:
            changed = await self._check()
        if changed:
            self.on_change()
        return changed

    async def _check(self) -> bool:
        started = self.clock()
        if await self.repository.revision() == self.revision:
            self.fresh_as_of = max(self.fresh_as_of, started)
            return False
        changes = await self.repository.changes_after(self.revision)
        if not changes or changes[0][0] != self.revision + 1:
            # Pruned past this replica (it was away longer than the log keeps), or a table reset.
            log.warning("subscription change log does not reach back to this replica's revision; reloading in full",
                        extra={"revision": self.revision, "oldest": changes[0][0] if changes else None})
            await self._load()
            return True
        latest: dict[str, int] = {}
        for revision, subscription_id in changes:
            latest[subscription_id] = revision
        unread = [i for i, revision in latest.items() if i not in self._own.get(revision, ())]
        self._apply_rows(unread, await self.repository.by_ids(unread) if unread else [])
        self.revision = changes[-1][0]
        for revision in [r for r in self._own if r <= self.revision]:
            del self._own[revision]
        self.fresh_as_of = max(self.fresh_as_of, started)
        return True

    def _apply_rows(self, ids: Iterable[str], rows: Sequence[Any]) -> None:
        found = {row.id: row for row in rows}
        for subscription_id in ids:
            row = found.get(subscription_id)
            if row is None:
                self.index.remove(subscription_id)
                continue
            try:
                self.index.put(self.view(row))
            except Exception:  # one unusable row must not stop the others from routing
                log.exception("subscription left out of the index", extra={"subscription_id": subscription_id})

    async def apply(self, subscription_id: str) -> None:
        """This process changed one subscription: read it and file it now (gone: remove it)."""
        async with self._lock:
            self._apply_rows([subscription_id], await self.repository.by_ids([subscription_id]))
        self.on_change()

    async def apply_written(self, revision: int, rows: Sequence[Any]) -> None:
        """This process wrote `rows` as `revision`: file them as written, no read. If a check has
        passed that revision already, it read them (or newer) itself."""
        async with self._lock:
            if revision <= self.revision:
                return
            self._apply_rows([row.id for row in rows], rows)
            self._own[revision] = {row.id for row in rows}
        self.on_change()

    async def catch_up(self, event_time: _dt.datetime) -> bool:
        """Before an event is dropped as unmatched: if it was published after the index was last
        known fresh, another replica may have made a matching subscription since. Check (one check
        shared by the events that wait for it) and say whether anything changed."""
        if event_time <= self.fresh_as_of:
            return False
        task = self._catching_up
        if task is None or task.done() or self._catching_up_since < event_time:
            # A check started before this event was published may not see what the event needs.
            self._catching_up_since = self.clock()
            task = self._catching_up = asyncio.get_running_loop().create_task(self.check())
        return await asyncio.shield(task)

    async def follow(self) -> None:
        """Check every POLL_SECONDS until cancelled; a failed check is logged and tried again."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self.check()
            except Exception:
                log.exception("following subscription changes failed; will try again")
