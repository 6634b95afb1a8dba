"""SubscriptionIndex: subscriptions filed so that matching an event touches only those that could match it."""

from __future__ import annotations

import collections
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from router.events import Event
from router.filters import CompiledFilter, FilterError, compile_filter, explain
from router.plugins import Subscription

log = logging.getLogger(__name__)

SOURCE_KIND_EXTENSION = "sourcekind"
REPLAY_FOR_EXTENSION = "replayfor"


def source_kind(event: Event) -> str | None:
    return event.extensions.get(SOURCE_KIND_EXTENSION)


def compile_subscription(sub: Subscription) -> CompiledFilter:
    return compile_filter(sub.filters or None, (sub.options or {}).get("filter"))


def why_not(sub: Subscription, event: Event) -> list[str]:
    """Why `sub` does not take `event`, one reason per line ([] when it does), in the order the
    router decides: project, source kind, status, type, then each filter condition at fault. For
    operators (the event trace), not the routing path: match() never calls it."""
    reasons = []
    if event.project_id and sub.project_id != event.project_id:
        reasons.append(f"project: the subscription belongs to {sub.project_id!r}, the event to {event.project_id!r}")
    target = event.extensions.get(REPLAY_FOR_EXTENSION)
    if target is not None and target != sub.id:
        reasons.append(f"replayfor: the event is a replay for subscription {target}")
    kind = source_kind(event)
    if target is None and kind != sub.source:
        reasons.append(f"source: the subscription takes {sub.source!r} events, the event came from {kind!r}")
    if target is None and sub.status != "running" and sub.source != "cron":
        reasons.append(f"status: the subscription is {sub.status}")
    if target is None and sub.types and event.type not in sub.types:
        reasons.append(f"type: the event's type {event.type!r} is not one of {list(sub.types)}")
    try:
        reasons += explain(sub.filters or None, (sub.options or {}).get("filter"), event)
    except FilterError as exc:
        reasons.append(f"filter: unusable, so the subscription routes nothing ({exc})")
    return reasons


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
    """One subscription as the index files it: where (slot), and what is left to test of an event
    found there (types, check)."""

    __slots__ = ("sub", "slot", "types", "check")

    def __init__(self, sub: Subscription, slot: tuple, types: tuple[str, ...], check: Any):
        self.sub = sub
        self.slot = slot
        self.types = types
        self.check = check


class _Checked(tuple):
    """Candidates of one cell some of which need testing: flat (sub, types, check) triples, so a
    lookup reads one tuple instead of an object per subscription. A cell whose subscriptions need
    no test holds a plain tuple of them instead."""

    __slots__ = ()


def _candidates(entries: Iterable[_Entry], found_by_type: bool) -> tuple:
    flat: list = []
    plain = True
    for e in entries:
        types = () if found_by_type else e.types  # found by event type: the type test is done
        plain = plain and not types and e.check is None
        flat += (e.sub, types, e.check)
    return tuple(flat[0::3]) if plain else _Checked(flat)


STRIDE = 4  # characters a _Trie level is keyed by
BAG_LENGTHS = 4  # distinct literal lengths a bag holds before it becomes a level


class _Bag(dict):
    """Literals → candidates, looked up whole: one probe per distinct length (`lengths`). `counts`
    keeps how many literals have each length, so that adding or removing one is O(1)."""

    __slots__ = ("lengths", "counts")

    def put(self, literal: str, found: tuple) -> None:
        if literal not in self:
            n = len(literal)
            self.counts[n] += 1
            if self.counts[n] == 1:
                self.lengths = tuple(sorted(self.counts))
        self[literal] = found

    def drop(self, literal: str) -> None:
        if literal in self:
            del self[literal]
            n = len(literal)
            self.counts[n] -= 1
            if not self.counts[n]:
                del self.counts[n]
                self.lengths = tuple(sorted(self.counts))


def _bag(items: Iterable[tuple[str, tuple]] = ()) -> _Bag:
    bag = _Bag(items)
    bag.counts = collections.Counter(len(k) for k in bag)
    bag.lengths = tuple(sorted(bag.counts))
    return bag


class _Leaf(tuple):
    """(literal, candidates): a level's only literal under one chunk, tested with one string
    comparison (a one-literal bag would be two more objects to read)."""

    __slots__ = ()


class _Level(dict):
    """Literals split by their STRIDE characters from `offset` on (counted from the end, for
    suffixes): chunk → leaf, bag or level. The literals too short for that are in `bag`."""

    __slots__ = ("offset", "bag")


class _Trie:
    """The literal prefixes (or suffixes) of one attribute.

    While they come in a few lengths they are one bag: looking a value up costs one hash probe
    per length, with 10 literals or 100,000. A bag with more than BAG_LENGTHS lengths becomes a
    level keyed by STRIDE characters of the literals, taken where they start to differ (after
    `photos/`, or before `.jpg`), so that a level tells many literals apart. Looking a value up
    takes its characters at each level's offset, down to a bag."""

    __slots__ = ("root", "suffix")

    def __init__(self, suffix: bool):
        self.root: dict = _bag()
        self.suffix = suffix

    def __bool__(self) -> bool:
        return bool(self.root)

    def _chunk(self, literal: str, offset: int) -> str:
        if self.suffix:
            end = len(literal) - offset
            return literal[end - STRIDE:end]
        return literal[offset:offset + STRIDE]

    def set(self, literal: str, found: tuple) -> None:
        self.root = self._insert(self.root, 0, literal, found)

    def discard(self, literal: str) -> None:
        self.root = self._remove(self.root, literal) or _bag()

    def _items(self, node: dict) -> Iterator[tuple[str, tuple]]:
        if type(node) is _Leaf:
            yield node
            return
        if type(node) is _Bag:
            yield from node.items()
            return
        yield from node.bag.items()
        for child in node.values():
            yield from self._items(child)

    def _build(self, items: list[tuple[str, tuple]], offset: int) -> dict:
        """A subtree for these literals, all at least `offset` long."""
        if len(items) == 1 and offset:
            return _Leaf(items[0])
        if len({len(k) for k, _ in items}) <= BAG_LENGTHS:
            return _bag(items)
        keys = [k[::-1] if self.suffix else k for k, _ in items]
        level = _Level()
        level.offset = offset = max(offset, len(os.path.commonprefix(keys)))
        short, groups = [], collections.defaultdict(list)
        for literal, found in items:
            if len(literal) < offset + STRIDE:
                short.append((literal, found))
            else:
                groups[self._chunk(literal, offset)].append((literal, found))
        level.bag = _bag(short)
        for chunk, group in groups.items():
            level[chunk] = self._build(group, offset + STRIDE)
        return level

    def _insert(self, node: dict, offset: int, literal: str, found: tuple) -> dict:
        """Insert into the subtree `node`, whose literals are all at least `offset` long; returns
        the subtree as it is now."""
        if type(node) is _Leaf:
            return _Leaf((literal, found)) if node[0] == literal else self._build([node, (literal, found)], offset)
        if type(node) is _Bag:
            node.put(literal, found)
            return node if len(node.lengths) <= BAG_LENGTHS else self._build(list(node.items()), offset)
        if len(literal) < node.offset:  # shorter than this level was cut for: cut it again
            return self._build([*self._items(node), (literal, found)], offset)
        if len(literal) < node.offset + STRIDE:
            node.bag.put(literal, found)
            return node
        chunk = self._chunk(literal, node.offset)
        child = node.get(chunk)
        node[chunk] = _Leaf((literal, found)) if child is None else self._insert(child, node.offset + STRIDE, literal, found)
        return node

    def _remove(self, node: dict, literal: str) -> dict | None:
        """Remove from the subtree `node`; returns it as it is now (None when empty), folded into
        a bag where a level is no longer needed."""
        if type(node) is _Leaf:
            return None if node[0] == literal else node
        if type(node) is _Bag:
            node.drop(literal)
            return node or None
        if len(literal) < node.offset + STRIDE:
            node.bag.drop(literal)
        else:
            chunk = self._chunk(literal, node.offset)
            child = node.get(chunk)
            if child is not None:
                child = self._remove(child, literal)
                if child is None:
                    del node[chunk]
                else:
                    node[chunk] = child
        if not node:
            return node.bag or None
        if len(node) == 1:
            (only,) = node.values()
            if type(only) is not _Level and len({*node.bag.lengths, *(len(k) for k, _ in self._items(only))}) <= BAG_LENGTHS:
                return _bag([*node.bag.items(), *self._items(only)])
        return node


class _Bucket:
    """The subscriptions of one source kind.

    Each is filed in one cell, under a condition every event it matches meets: an exact attribute
    value (a hash lookup), a literal prefix or suffix (a _Trie), else each of its event types, else
    `rest`. A cell holds its candidates ready-made (see _Checked), rebuilt at the next match after
    a change: loading N subscriptions into one cell costs O(N), not O(N²). The price is that a
    change to a cell of N costs O(N) once, at the next match; cells stay small when subscriptions
    are filed by something that tells them apart (a container, a cron job's subject)."""

    def __init__(self) -> None:
        self.members: dict[tuple, dict[str, _Entry]] = {}  # cell → its subscriptions, in put order
        self.dirty: dict[tuple, None] = {}  # cells whose candidates are stale, in the order they changed
        self.exact: dict[str, dict[Any, tuple]] = {}  # attribute → _key(value) → candidates
        self.numeric: collections.Counter[str] = collections.Counter()  # attribute → number-keyed entries
        self.prefix: dict[str, _Trie] = {}  # attribute → its literal prefixes
        self.suffix: dict[str, _Trie] = {}  # attribute → its literal suffixes
        self.by_type: dict[str, tuple] = {}
        self.rest: tuple = ()
        # Per attribute the index looks at: (name, exact table, number keys?, prefix trie, suffix
        # trie), so each attribute of the event is read once.
        self.plan: tuple = ()

    @staticmethod
    def cells(slot: tuple) -> list[tuple]:
        if slot[0] == "types":
            return [("type", t) for t in slot[1]]
        return [slot]

    def add(self, entry: _Entry) -> None:
        for cell in self.cells(entry.slot):
            self.members.setdefault(cell, {})[entry.sub.id] = entry
            self.dirty[cell] = None
        if entry.slot[0] == "eq" and type(entry.slot[2]) is tuple:
            self.numeric[entry.slot[1]] += 1

    def remove(self, entry: _Entry) -> None:
        for cell in self.cells(entry.slot):
            members = self.members.get(cell)
            if members is not None and members.pop(entry.sub.id, None) is not None:
                if not members:
                    del self.members[cell]
                self.dirty[cell] = None
        if entry.slot[0] == "eq" and type(entry.slot[2]) is tuple:
            self.numeric[entry.slot[1]] -= 1
            if not self.numeric[entry.slot[1]]:
                del self.numeric[entry.slot[1]]

    def flush(self) -> None:
        for cell in self.dirty:
            members = self.members.get(cell)
            found = _candidates(members.values(), cell[0] == "type") if members else None
            kind = cell[0]
            if kind == "eq":
                table = self.exact.setdefault(cell[1], {})
                if found is not None:
                    table[cell[2]] = found
                else:
                    table.pop(cell[2], None)
                    if not table:
                        del self.exact[cell[1]]
            elif kind in ("prefix", "suffix"):
                tries = self.prefix if kind == "prefix" else self.suffix
                trie = tries.get(cell[1])
                if trie is None:
                    trie = tries[cell[1]] = _Trie(suffix=kind == "suffix")
                if found is not None:
                    trie.set(cell[2], found)
                else:
                    trie.discard(cell[2])
                    if not trie:
                        del tries[cell[1]]
            elif kind == "type":
                if found is not None:
                    self.by_type[cell[1]] = found
                else:
                    self.by_type.pop(cell[1], None)
            else:
                self.rest = found or ()
        self.dirty.clear()
        names = sorted(set(self.exact) | set(self.prefix) | set(self.suffix))
        self.plan = tuple((name, self.exact.get(name), name in self.numeric, self.prefix.get(name), self.suffix.get(name))
                          for name in names)

    def match(self, event: Event) -> list[Subscription]:
        if self.dirty:
            self.flush()
        hits = []
        for name, exact, numeric, prefix, suffix in self.plan:
            value = event.attribute(name)
            if value is None:
                continue
            if exact is not None:
                if type(value) is str:
                    # Strings that are not number-like are filed under themselves: one probe, and
                    # no float() attempt unless this attribute has number keys.
                    found = exact.get(value)
                    if found is None and numeric:
                        found = exact.get(_key(value))
                else:
                    found = exact.get(_key(value))
                if found is not None:
                    hits.append(found)
            if isinstance(value, str):
                # The suffix walk below mirrors this prefix walk from the other end. Both stay
                # inline, not in a helper: this loop is the matching hot path, run per event.
                if prefix is not None:
                    node, size = prefix.root, len(value)
                    while type(node) is _Level:
                        bag = node.bag
                        for length in bag.lengths:
                            if length > size:
                                break
                            found = bag.get(value[:length])
                            if found is not None:
                                hits.append(found)
                        offset = node.offset
                        node = node.get(value[offset:offset + STRIDE]) if offset + STRIDE <= size else None
                    if type(node) is _Leaf:
                        if value.startswith(node[0]):
                            hits.append(node[1])
                    elif node is not None:
                        for length in node.lengths:
                            if length > size:
                                break
                            found = node.get(value[:length])
                            if found is not None:
                                hits.append(found)
                if suffix is not None:
                    node, size = suffix.root, len(value)
                    while type(node) is _Level:
                        bag = node.bag
                        for length in bag.lengths:
                            if length > size:
                                break
                            found = bag.get(value[size - length:])
                            if found is not None:
                                hits.append(found)
                        end = size - node.offset
                        node = node.get(value[end - STRIDE:end]) if end >= STRIDE else None
                    if type(node) is _Leaf:
                        if value.endswith(node[0]):
                            hits.append(node[1])
                    elif node is not None:
                        for length in node.lengths:
                            if length > size:
                                break
                            found = node.get(value[size - length:])
                            if found is not None:
                                hits.append(found)
        found = self.by_type.get(event.type)
        if found is not None:
            hits.append(found)
        if self.rest:
            hits.append(self.rest)
        out: list[Subscription] = []
        for found in hits:
            if type(found) is tuple:
                out += found
                continue
            event_type = event.type
            it = iter(found)
            for sub, types, check in zip(it, it, it):
                if (not types or event_type in types) and (check is None or check(event)):
                    out.append(sub)
        return out


def event_project(event: Event) -> str:
    """The project an event belongs to; events that name none are the `default` project's."""
    return event.extensions.get("projectid") or "default"


class SubscriptionIndex:
    """Matches an event to its subscriptions by project, source kind, event type and filters.
    Subscriptions are filed per (project, source kind): an event reaches only its own project's
    subscriptions, whatever their filters say. With `per_project` off (auth off: one tenant, every
    request is the `default` project's admin) the project is not part of the key."""

    def __init__(self, subscriptions: Iterable[Subscription] = (), *, per_project: bool = True):
        self.per_project = per_project
        self._entries: dict[str, _Entry] = {}
        # source kind → its subscriptions: sources ask for theirs at every change (cron, zaqar), and
        # that must cost what they hold, not the whole table.
        self._by_source: dict[str, dict[str, Subscription]] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = collections.defaultdict(_Bucket)
        self._shared_types: dict[tuple, tuple] = {}
        for sub in subscriptions:
            self.put(sub)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, subscription_id: str) -> Subscription | None:
        entry = self._entries.get(subscription_id)
        return entry.sub if entry else None

    def of_source(self, source: str) -> list[Subscription]:
        return list(self._by_source.get(source, {}).values())

    def all(self) -> list[Subscription]:
        return [e.sub for e in self._entries.values()]

    def put(self, sub: Subscription) -> None:
        """Add or replace a subscription. Its filters were validated when it was created; one that
        no longer compiles (a row edited by hand) raises FilterError."""
        entry = _file(sub, compile_subscription(sub), self._shared_types)
        self.remove(sub.id)
        self._entries[sub.id] = entry
        self._by_source.setdefault(sub.source, {})[sub.id] = sub
        if entry.slot[0] != "paused":
            self._buckets[(self._project(sub.project_id), sub.source)].add(entry)

    def remove(self, subscription_id: str) -> None:
        old = self._entries.pop(subscription_id, None)
        if old is not None:
            of_source = self._by_source[old.sub.source]
            del of_source[subscription_id]
            if not of_source:
                del self._by_source[old.sub.source]
        if old is not None and old.slot[0] != "paused":
            self._buckets[(self._project(old.sub.project_id), old.sub.source)].remove(old)

    def _project(self, project_id: str) -> str:
        return project_id if self.per_project else ""

    def replace_all(self, subscriptions: Iterable[Subscription]) -> None:
        fresh = SubscriptionIndex(per_project=self.per_project)
        for sub in subscriptions:
            try:
                fresh.put(sub)
            except FilterError as exc:  # one unusable row must not stop the others from routing
                log.error("subscription left out of the index: %s", exc, extra={"subscription_id": sub.id})
        self._entries, self._buckets, self._shared_types = fresh._entries, fresh._buckets, fresh._shared_types
        self._by_source = fresh._by_source

    def match_or_target(self, event: Event) -> list[Subscription]:
        """A replay (extension `replayfor`) goes to the one subscription it was replayed for;
        every other event to the subscriptions it matches."""
        target = event.extensions.get(REPLAY_FOR_EXTENSION)
        if target is not None:
            entry = self._entries.get(target)
            if entry is None or self._project(entry.sub.project_id) != self._project(event_project(event)):
                return []
            return [entry.sub]
        return self.match(event)

    def match(self, event: Event) -> list[Subscription]:
        kind = event.extensions.get(SOURCE_KIND_EXTENSION)
        bucket = self._buckets.get((self._project(event_project(event)), kind)) if kind is not None else None
        if bucket is None:
            return []
        return bucket.match(event)


def _file(sub: Subscription, compiled: CompiledFilter, shared: dict[tuple, tuple]) -> _Entry:
    """Where a subscription is filed, and what an event found there must still pass."""
    # A paused subscription routes nothing. Cron is the exception: its source decides whether a
    # tick fires, and a tick already published must still run after its schedule became done.
    if sub.status != "running" and sub.source != "cron":
        return _Entry(sub, ("paused",), (), None)
    types = tuple(sub.types or ())
    # The subscriptions with the same types share one tuple of interned names: less memory, and
    # testing an event's type reads objects that stay in cache.
    types = shared.setdefault(types, tuple(sys.intern(t) if type(t) is str else t for t in types))
    key = compiled.index_key()
    if key is not None:
        slot: tuple = ("eq", key[1], _key(key[2])) if key[0] == "eq" else key
        return _Entry(sub, slot, types, compiled.residual(key))
    check = compiled.residual(None)
    if types:
        return _Entry(sub, ("types", types), types, check)
    return _Entry(sub, ("rest",), (), check)
