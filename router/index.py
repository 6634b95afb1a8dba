"""SubscriptionIndex: subscriptions held in memory, keyed so matching costs the same with 10 or 100,000.

Each subscription is filed under one condition that every matching event must meet: an exact
attribute value (hash lookup), a literal prefix or suffix (a walk down a character trie, as long
as the event's value), or else its event types. Only the subscriptions filed where the event lands are tested with
their full compiled filter."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from router.events import Event
from router.filters import CompiledFilter, FilterError, compile_filter
from router.plugins import Subscription

log = logging.getLogger(__name__)

SOURCE_KIND_EXTENSION = "sourcekind"
REPLAY_FOR_EXTENSION = "replayfor"


def source_kind(event: Event) -> str | None:
    return event.extensions.get(SOURCE_KIND_EXTENSION)


def compile_subscription(sub: Subscription) -> CompiledFilter:
    return compile_filter(sub.filters or None, (sub.options or {}).get("filter"))


def _key(value: Any) -> Any:
    """Index keys compare numbers by value, so `5`, `5.0` and `"5"` meet in one slot; the full
    filter decides afterwards."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", float(value))
    if isinstance(value, str):
        try:
            return ("num", float(value))
        except ValueError:
            return value
    return repr(value)


class _Entry:
    __slots__ = ("sub", "compiled", "slot", "check")

    def __init__(self, sub: Subscription, compiled: CompiledFilter):
        self.sub = sub
        self.compiled = compiled
        self.slot: tuple | None = None
        # Where the index lookup itself proves the filter, testing it again is wasted work.
        self.check = None if compiled.decided_by_index() else compiled.predicate

    def matches(self, event: Event) -> bool:
        sub = self.sub
        # A paused subscription routes nothing. Cron is the exception: its source decides whether a
        # tick fires, and a tick already published must still run after its schedule became done.
        if sub.status != "running" and sub.source != "cron":
            return False
        if sub.types and event.type not in sub.types:
            return False
        return self.check is None or self.check(event)


_TERMINAL = ""  # key of a trie node's entries: no character is the empty string


class _Trie:
    """Literal prefixes (or, reversed, suffixes) of one attribute. Looking up a value walks its
    characters, so the cost depends on the value's length, never on how many literals there are."""

    __slots__ = ("root", "reverse")

    def __init__(self, reverse: bool):
        self.root: dict = {}
        self.reverse = reverse

    def add(self, literal: str, entry: _Entry) -> None:
        node = self.root
        for ch in (reversed(literal) if self.reverse else literal):
            node = node.setdefault(ch, {})
        node.setdefault(_TERMINAL, {})[entry.sub.id] = entry

    def remove(self, literal: str, sub_id: str) -> bool:
        """Remove an entry, pruning empty nodes; True when the trie is empty afterwards."""
        path = [self.root]
        for ch in (reversed(literal) if self.reverse else literal):
            node = path[-1].get(ch)
            if node is None:
                return not self.root
            path.append(node)
        entries = path[-1].get(_TERMINAL, {})
        entries.pop(sub_id, None)
        if not entries:
            path[-1].pop(_TERMINAL, None)
        chars = list(reversed(literal) if self.reverse else literal)
        for depth in range(len(chars), 0, -1):
            if path[depth]:
                break
            del path[depth - 1][chars[depth - 1]]
        return not self.root

    def lookup(self, value: str) -> Iterator[_Entry]:
        node = self.root
        for ch in (reversed(value) if self.reverse else value):
            node = node.get(ch)
            if node is None:
                return
            found = node.get(_TERMINAL)
            if found:
                yield from found.values()


class _Bucket:
    """The subscriptions of one source kind."""

    def __init__(self) -> None:
        self.exact: dict[tuple[str, Any], dict[str, _Entry]] = collections.defaultdict(dict)
        self.exact_attributes: collections.Counter[str] = collections.Counter()
        self.prefix: dict[str, _Trie] = {}  # attribute → trie of literal prefixes
        self.suffix: dict[str, _Trie] = {}  # attribute → trie of literal suffixes, reversed
        self.by_type: dict[str, dict[str, _Entry]] = collections.defaultdict(dict)
        self.rest: dict[str, _Entry] = {}

    def add(self, entry: _Entry) -> None:
        key = entry.compiled.index_key()
        sub_id = entry.sub.id
        if key is not None and key[0] == "eq":
            slot = ("eq", key[1], _key(key[2]))
            self.exact[(key[1], slot[2])][sub_id] = entry
            self.exact_attributes[key[1]] += 1
        elif key is not None:
            kind, attribute, literal = key
            slot = (kind, attribute, literal)
            tries = self.prefix if kind == "prefix" else self.suffix
            if attribute not in tries:
                tries[attribute] = _Trie(reverse=kind == "suffix")
            tries[attribute].add(literal, entry)
        elif entry.sub.types:
            slot = ("types", tuple(entry.sub.types))
            for type_ in entry.sub.types:
                self.by_type[type_][sub_id] = entry
        else:
            slot = ("rest",)
            self.rest[sub_id] = entry
        entry.slot = slot

    def remove(self, entry: _Entry) -> None:
        slot = entry.slot
        sub_id = entry.sub.id
        if slot[0] == "eq":
            bucket = self.exact[(slot[1], slot[2])]
            bucket.pop(sub_id, None)
            if not bucket:
                del self.exact[(slot[1], slot[2])]
            self.exact_attributes[slot[1]] -= 1
            if not self.exact_attributes[slot[1]]:
                del self.exact_attributes[slot[1]]
        elif slot[0] in ("prefix", "suffix"):
            _, attribute, literal = slot
            tries = self.prefix if slot[0] == "prefix" else self.suffix
            if tries[attribute].remove(literal, sub_id):
                del tries[attribute]
        elif slot[0] == "types":
            for type_ in slot[1]:
                self.by_type[type_].pop(sub_id, None)
                if not self.by_type[type_]:
                    del self.by_type[type_]
        else:
            self.rest.pop(sub_id, None)

    def candidates(self, event: Event) -> Iterator[_Entry]:
        for attribute in self.exact_attributes:
            value = event.attribute(attribute)
            if value is not None:
                found = self.exact.get((attribute, _key(value)))
                if found:
                    yield from found.values()
        for tries in (self.prefix, self.suffix):
            for attribute, trie in tries.items():
                value = event.attribute(attribute)
                if isinstance(value, str):
                    yield from trie.lookup(value)
        found = self.by_type.get(event.type)
        if found:
            yield from found.values()
        yield from self.rest.values()


class SubscriptionIndex:
    """Matches an event to its subscriptions by source kind, event type and filters."""

    def __init__(self, subscriptions: Iterable[Subscription] = ()):
        self._entries: dict[str, _Entry] = {}
        self._buckets: dict[str, _Bucket] = collections.defaultdict(_Bucket)
        for sub in subscriptions:
            self.put(sub)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, subscription_id: str) -> Subscription | None:
        entry = self._entries.get(subscription_id)
        return entry.sub if entry else None

    def of_source(self, source: str) -> list[Subscription]:
        return [e.sub for e in self._entries.values() if e.sub.source == source]

    def put(self, sub: Subscription) -> None:
        """Add or replace a subscription. Its filters were validated when it was created; one that
        no longer compiles (a row edited by hand) raises FilterError."""
        entry = _Entry(sub, compile_subscription(sub))
        self.remove(sub.id)
        self._entries[sub.id] = entry
        self._buckets[sub.source].add(entry)

    def remove(self, subscription_id: str) -> None:
        old = self._entries.pop(subscription_id, None)
        if old is not None:
            self._buckets[old.sub.source].remove(old)

    def replace_all(self, subscriptions: Iterable[Subscription]) -> None:
        fresh = SubscriptionIndex()
        for sub in subscriptions:
            try:
                fresh.put(sub)
            except FilterError as exc:  # one unusable row must not stop the others from routing
                log.error("subscription left out of the index: %s", exc, extra={"subscription_id": sub.id})
        self._entries, self._buckets = fresh._entries, fresh._buckets

    def match_or_target(self, event: Event) -> list[Subscription]:
        """A replay (extension `replayfor`) goes to the one subscription it was replayed for;
        every other event to the subscriptions it matches."""
        target = event.extensions.get(REPLAY_FOR_EXTENSION)
        if target is not None:
            entry = self._entries.get(target)
            return [entry.sub] if entry is not None else []
        return self.match(event)

    def match(self, event: Event) -> list[Subscription]:
        kind = source_kind(event)
        bucket = self._buckets.get(kind) if kind is not None else None
        if bucket is None:
            return []
        seen: set[str] = set()
        out = []
        for entry in bucket.candidates(event):
            sub_id = entry.sub.id
            if sub_id not in seen:
                seen.add(sub_id)
                if entry.matches(event):
                    out.append(entry.sub)
        return out
