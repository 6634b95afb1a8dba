"""SubscriptionIndex: subscriptions held in memory, keyed so matching costs the same with 10 or 100,000."""

from __future__ import annotations

import collections
from collections.abc import Iterable

from router.events import Event
from router.plugins import Subscription

SOURCE_KIND_EXTENSION = "sourcekind"


def source_kind(event: Event) -> str | None:
    return event.extensions.get(SOURCE_KIND_EXTENSION)


def _key_attribute(sub: Subscription) -> str | None:
    """The exact filter a subscription is filed under: `subject` if it has one (webhooks and jobs
    target one subscription through it), else its first filter by name."""
    if not sub.filters:
        return None
    return "subject" if "subject" in sub.filters else min(sub.filters)


class _Bucket:
    """The subscriptions of one source kind."""

    __slots__ = ("keyed", "key_attributes", "by_type", "any_type")

    def __init__(self) -> None:
        self.keyed: dict[tuple[str, object], dict[str, Subscription]] = collections.defaultdict(dict)
        self.key_attributes: collections.Counter[str] = collections.Counter()
        self.by_type: dict[str, dict[str, Subscription]] = collections.defaultdict(dict)
        self.any_type: dict[str, Subscription] = {}

    def add(self, sub: Subscription) -> None:
        attribute = _key_attribute(sub)
        if attribute is not None:
            self.keyed[(attribute, _hashable(sub.filters[attribute]))][sub.id] = sub
            self.key_attributes[attribute] += 1
        elif sub.types:
            for type_ in sub.types:
                self.by_type[type_][sub.id] = sub
        else:
            self.any_type[sub.id] = sub

    def remove(self, sub: Subscription) -> None:
        attribute = _key_attribute(sub)
        if attribute is not None:
            key = (attribute, _hashable(sub.filters[attribute]))
            self.keyed[key].pop(sub.id, None)
            if not self.keyed[key]:
                del self.keyed[key]
            self.key_attributes[attribute] -= 1
            if not self.key_attributes[attribute]:
                del self.key_attributes[attribute]
        elif sub.types:
            for type_ in sub.types:
                self.by_type[type_].pop(sub.id, None)
                if not self.by_type[type_]:
                    del self.by_type[type_]
        else:
            self.any_type.pop(sub.id, None)

    def candidates(self, event: Event) -> Iterable[Subscription]:
        for attribute in self.key_attributes:
            found = self.keyed.get((attribute, _hashable(event.attribute(attribute))))
            if found:
                yield from found.values()
        found = self.by_type.get(event.type)
        if found:
            yield from found.values()
        yield from self.any_type.values()


def _hashable(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _matches(sub: Subscription, event: Event) -> bool:
    # A paused subscription routes nothing. Cron is the exception: its source decides whether a tick
    # fires, and a tick already published must still run after its schedule became `done`.
    if sub.status != "running" and sub.source != "cron":
        return False
    if sub.types and event.type not in sub.types:
        return False
    for name, expected in sub.filters.items():
        if event.attribute(name) != expected:
            return False
    return True


class SubscriptionIndex:
    """Matches an event to its subscriptions by source kind, event type and exact attributes."""

    def __init__(self, subscriptions: Iterable[Subscription] = ()):
        self._by_id: dict[str, Subscription] = {}
        self._buckets: dict[str, _Bucket] = collections.defaultdict(_Bucket)
        for sub in subscriptions:
            self.put(sub)

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, subscription_id: str) -> Subscription | None:
        return self._by_id.get(subscription_id)

    def of_source(self, source: str) -> list[Subscription]:
        return [s for s in self._by_id.values() if s.source == source]

    def put(self, sub: Subscription) -> None:
        self.remove(sub.id)
        self._by_id[sub.id] = sub
        self._buckets[sub.source].add(sub)

    def remove(self, subscription_id: str) -> None:
        old = self._by_id.pop(subscription_id, None)
        if old is not None:
            self._buckets[old.source].remove(old)

    def replace_all(self, subscriptions: Iterable[Subscription]) -> None:
        fresh = SubscriptionIndex(subscriptions)
        self._by_id, self._buckets = fresh._by_id, fresh._buckets

    def match(self, event: Event) -> list[Subscription]:
        kind = source_kind(event)
        bucket = self._buckets.get(kind) if kind is not None else None
        if bucket is None:
            return []
        seen: set[str] = set()
        out = []
        for sub in bucket.candidates(event):
            if sub.id not in seen and _matches(sub, event):
                seen.add(sub.id)
                out.append(sub)
        return out
