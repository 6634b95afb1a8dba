"""EventFeed: events as they enter, handed to whoever watches (the dashboard's tail, `headwater
events tail`). With nobody watching, offering an event costs one truth test."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from router.events import Event
from router.filters import CompiledFilter
from router.index import source_kind

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000  # events a slow watcher may fall behind by before it misses some
MAX_WATCHERS = 100  # open tails per process: each holds a connection and up to QUEUE_SIZE events


class TooManyWatchers(RuntimeError):
    """MAX_WATCHERS tails are open already."""


def summary(event: Event) -> dict[str, Any]:
    """What a tail line shows of an event (its data stays in the history: GET /v1/events/{id})."""
    return {"id": event.id, "source_kind": source_kind(event), "source": event.source, "type": event.type,
            "subject": event.subject, "time": event.time.isoformat() if event.time else None,
            "project_id": event.project_id or "default"}


class Watcher:
    """One watcher's queue, limited to a project (None: every project) and an optional filter."""

    def __init__(self, project_id: str | None, matcher: CompiledFilter | None):
        self.project_id = project_id
        self.matcher = matcher
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE_SIZE)
        self.missed = 0

    def offer(self, event: Event) -> None:
        if self.project_id is not None and (event.project_id or "default") != self.project_id:
            return
        if self.matcher is not None and not self.matcher.matches(event):
            return
        try:
            self.queue.put_nowait(summary(event))
        except asyncio.QueueFull:
            self.missed += 1  # a watcher that cannot keep up misses events; the flow never waits


class EventFeed:
    def __init__(self) -> None:
        self._watchers: list[Watcher] = []

    def __len__(self) -> int:
        return len(self._watchers)

    def offer(self, event: Event) -> None:
        if not self._watchers:
            return
        for watcher in self._watchers:
            try:
                watcher.offer(event)
            except Exception:  # a watcher's filter must never break publishing
                log.exception("event feed watcher failed", extra={"event_id": event.id})

    def watch(self, project_id: str | None, matcher: CompiledFilter | None = None) -> Watcher:
        if len(self._watchers) >= MAX_WATCHERS:
            raise TooManyWatchers(f"{MAX_WATCHERS} event tails are open on this server already; try again later")
        watcher = Watcher(project_id, matcher)
        self._watchers = [*self._watchers, watcher]  # copied: offer() may be iterating the old list
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers = [w for w in self._watchers if w is not watcher]

    def close(self) -> None:
        """End every watch (the server is stopping): each watcher's next item is None."""
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            while True:
                try:
                    watcher.queue.put_nowait(None)
                    break
                except asyncio.QueueFull:  # make room: the end matters more than what it held
                    watcher.queue.get_nowait()
