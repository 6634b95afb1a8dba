"""The SQLite bus: the embedded default. Events and delayed retries are in a WAL-mode SQLite file
(fsynced, commits grouped) before publish returns, leased to consumers, deleted on ack, and handed
out again after a crash — as safe on one machine as the brokers are on many."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from router.bus import (EVENTS_TOPIC, BatchHandler, BusError, DeliveryHandler, SettledOnce, dead_letter_topic,
                        settle_batch, settle_by_handler)
from router.config import Config, ConfigError
from router.events import Event, InvalidEvent

log = logging.getLogger(__name__)

DEFAULT_FILE = "bus.db"
DEFAULT_LEASE = 30.0  # seconds a delivery stays leased to a consumer that stops renewing it
DEFAULT_POLL = 0.25  # seconds between looks for work published by another process
BACKLOG_GROUP = ""  # events published to a topic before any group exists wait for the first group
_URL_OPTIONS = {"lease": float, "poll": float}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bus_groups (
    topic TEXT NOT NULL, grp TEXT NOT NULL, PRIMARY KEY (topic, grp)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bus_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    body BLOB NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,  -- due time of a delayed event, lease end of a delivered one
    owner TEXT,                -- the bus instance holding it (NULL: nobody)
    reason TEXT                -- why it was dead-lettered (on a dead-letter topic)
);
CREATE INDEX IF NOT EXISTS bus_messages_ready ON bus_messages (topic, grp, visible_at);
CREATE INDEX IF NOT EXISTS bus_messages_owner ON bus_messages (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS bus_owners (id TEXT PRIMARY KEY) WITHOUT ROWID;
"""


def bus_path(config: Config | None, url: str | None) -> Path:
    """Where the bus file lives: `[bus] url = sqlite:///path`, or <data_dir>/bus.db."""
    if url:
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or not parts.path:
            raise ConfigError(f"[bus] url = {url!r}: the sqlite bus takes sqlite:///<path to the bus file>")
        return Path(parts.path)
    data_dir = config.data_dir if config is not None else Path.cwd()
    return Path(data_dir) / DEFAULT_FILE


def _url_options(url: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in parse_qsl(urlsplit(url).query if url else ""):
        if name not in _URL_OPTIONS:
            raise ConfigError(f"[bus] url option {name!r} is unknown to the sqlite bus; known: {', '.join(_URL_OPTIONS)}")
        try:
            out[name] = _URL_OPTIONS[name](value)
        except ValueError:
            raise ConfigError(f"[bus] url option {name}={value!r} is not a number") from None
        if out[name] <= 0:
            raise ConfigError(f"[bus] url option {name}={value!r} must be positive")
    return out


class _Writer:
    """One SQLite connection on its own thread. Operations submitted while a commit is under way
    share the next transaction and its one fsync (group commit)."""

    def __init__(self, path: Path):
        self.path = path
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-bus")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future, bool]] = []
        # Operations of the next transaction that gather many callers' items (see gather).
        self._gathered: dict[Any, tuple[list, asyncio.Future]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._durable = True  # the connection's synchronous setting: FULL (True) or NORMAL

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created owner-only before SQLite opens it: events carry tenants' data.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is fsynced before publish returns (NORMAL could lose the last commits on
        # power loss). Commits are grouped, so this costs one fsync per batch, not per event;
        # batches of claims and acks alone run NORMAL (see submit).
        conn.execute("PRAGMA synchronous=FULL")
        self._durable = True
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._open)
        self._task = loop.create_task(self._run(), name=f"sqlite-bus-writer-{self.path.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for _, future, _ in self._pending:
            if not future.done():
                future.set_exception(BusError("the sqlite bus is closed"))
        self._pending.clear()
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
            self._conn = None
        self._thread.shutdown(wait=True)

    def submit(self, operation: Callable[[sqlite3.Connection], Any], *, durable: bool = True) -> asyncio.Future:
        """Run `operation(connection)` in the next transaction; the future resolves after its commit.
        A transaction holding only operations that need not survive a power loss (`durable`
        False: claims, acks, lease renewals — losing one means a redelivery) is not fsynced at
        its commit; the next durable commit fsyncs it along (the WAL keeps commits in order)."""
        if self._task is None:
            raise BusError("the sqlite bus is not started")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((operation, future, durable))
        self._wake.set()
        return future

    def gather(self, key: Any, item: Any, operation: Callable[[sqlite3.Connection, list], Any], *,
               durable: bool = True) -> asyncio.Future:
        """Add `item` to the next transaction's operation under `key`: the items gathered until the
        writer takes its next batch run as one `operation(connection, items)` (one statement for
        a wave of publishes or acks instead of one each, with its savepoint), sharing its future."""
        gathered = self._gathered.get(key)
        if gathered is None:
            items: list = []
            gathered = self._gathered[key] = (items, self.submit(lambda c: operation(c, items), durable=durable))
        gathered[0].append(item)
        return gathered[1]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            self._gathered = {}  # what is gathered from now on goes into the next transaction
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._thread, self._transaction, [op for op, _, _ in batch],
                                                     any(durable for _, _, durable in batch))
            except asyncio.CancelledError:
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(BusError("the sqlite bus closed before the commit"))
                raise
            except Exception as exc:
                log.error("sqlite bus transaction failed", exc_info=True, extra={"path": str(self.path)})
                results = [BusError(f"the sqlite bus could not commit: {exc}")] * len(batch)
            for (_, future, _), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _transaction(self, operations: list[Callable[[sqlite3.Connection], Any]], durable: bool) -> list[Any]:
        conn = self._conn
        assert conn is not None
        results: list[Any] = []
        # FULL: fsynced before publish returns. NORMAL (in WAL mode): atomic, not yet fsynced.
        if durable != self._durable:
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        conn.execute("BEGIN IMMEDIATE")
        try:
            for operation in operations:
                # A savepoint each: one operation that fails does not undo the others of the batch.
                conn.execute("SAVEPOINT op")
                try:
                    results.append(operation(conn))
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO op")
                    results.append(BusError(f"sqlite bus operation failed: {exc}"))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return results


def _insert_many(conn: sqlite3.Connection, topic: str, messages: list[tuple[bytes, float]]) -> None:
    """Publishes to one topic in one statement: a copy of each per group of the topic (or one for
    the first group to come), in publish order."""
    groups = [row[0] for row in conn.execute("SELECT grp FROM bus_groups WHERE topic = ?", (topic,))] or [BACKLOG_GROUP]
    conn.executemany("INSERT INTO bus_messages (topic, grp, body, visible_at) VALUES (?, ?, ?, ?)",
                     [(topic, group, body, visible_at) for body, visible_at in messages for group in groups])


def _delete_many(conn: sqlite3.Connection, row_ids: list[int]) -> None:
    conn.executemany("DELETE FROM bus_messages WHERE id = ?", [(row_id,) for row_id in row_ids])


def _insert(conn: sqlite3.Connection, topic: str, body: bytes, visible_at: float, reason: str | None = None) -> None:
    """One copy of the message per group of the topic (or one for the first group to come)."""
    cursor = conn.execute(
        "INSERT INTO bus_messages (topic, grp, body, visible_at, reason) "
        "SELECT ?, grp, ?, ?, ? FROM bus_groups WHERE topic = ?", (topic, body, visible_at, reason, topic))
    if cursor.rowcount == 0:
        conn.execute("INSERT INTO bus_messages (topic, grp, body, visible_at, reason) VALUES (?, ?, ?, ?, ?)",
                     (topic, BACKLOG_GROUP, body, visible_at, reason))


class _SqliteDelivery(SettledOnce):
    __slots__ = ("_consumer", "_row_id", "_reason")

    def __init__(self, event: Event, consumer: _SqliteConsumer, row_id: int, attempt: int, reason: str | None):
        super().__init__(event, consumer.topic, attempt)
        self._consumer = consumer
        self._row_id = row_id
        self._reason = reason

    @property
    def dead_letter_reason(self) -> str | None:
        return self._reason

    @property
    def _max_deliveries(self) -> int:
        return self._consumer.bus.max_deliveries

    async def _ack(self) -> None:
        self._consumer._settled_one(self._row_id)
        await self._consumer.bus.ack(self._row_id)

    async def _requeue(self) -> None:
        self._consumer._settled_one(self._row_id)
        await self._consumer.bus.release(self._row_id, self.topic)

    async def _dead_letter(self, reason: str) -> None:
        self._consumer._settled_one(self._row_id)
        log.warning("event dead-lettered", extra={"event_id": self.event.id, "topic": self.topic,
                                                 "group": self._consumer.group, "attempts": self.attempt, "reason": reason})
        await self._consumer.bus.dead_letter(self._row_id, self.topic, reason)


class _SqliteConsumer:
    """Claims up to `prefetch` visible messages of its group at a time and hands each to the handler
    (or all it claimed at once to the batch handler). A message holds its slot until it is settled."""

    def __init__(self, bus: SqliteBus, topic: str, group: str, handler: DeliveryHandler, prefetch: int,
                 batch: BatchHandler | None = None):
        self.bus = bus
        self.topic = topic
        self.group = group
        self._handler = handler
        self._batch = batch
        self._prefetch = prefetch
        self._held: dict[int, _SqliteDelivery] = {}  # by row id: claimed, not settled yet
        self._tasks: set[asyncio.Task] = set()
        self._slot_freed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sqlite-consumer-{topic}-{group}")

    async def _run(self) -> None:
        signal = self.bus._signal(self.topic)
        while True:
            free = self._prefetch - len(self._held)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            signal.clear()  # before the claim: a publish committed after it wakes the wait below
            try:
                rows, next_visible = await self.bus.claim(self.topic, self.group, free)
            except BusError:
                log.warning("sqlite bus claim failed; trying again", exc_info=True,
                            extra={"topic": self.topic, "group": self.group})
                rows, next_visible = [], None
            claimed = [d for d in (self._delivery(*row) for row in rows) if d is not None]
            if self._batch is not None and claimed:
                self._spawn(settle_batch(self._batch, claimed, log, topic=self.topic, group=self.group))
            else:
                for delivery in claimed:
                    self._spawn(settle_by_handler(self._handler, delivery, log, topic=self.topic, group=self.group))
            if len(rows) == free:
                continue
            wait = self.bus.poll
            if next_visible is not None:
                wait = min(wait, max(0.0, next_visible - time.time()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(signal.wait(), wait)
            await asyncio.sleep(0)  # let a batch of publishes land before claiming

    def _delivery(self, row_id: int, body: bytes, deliveries: int, reason: str | None) -> _SqliteDelivery | None:
        try:
            event = Event.from_json(body)
        except InvalidEvent as exc:
            log.error("message is not a valid event; dead-lettering it",
                      extra={"topic": self.topic, "group": self.group, "reason": str(exc)})
            self.bus._background(self.bus.dead_letter(row_id, self.topic, f"invalid event: {exc}"))
            return None
        delivery = self._held[row_id] = _SqliteDelivery(event, self, row_id, deliveries, reason)
        return delivery

    def _spawn(self, handling) -> None:
        task = asyncio.get_running_loop().create_task(handling)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _settled_one(self, row_id: int) -> None:
        if self._held.pop(row_id, None) is not None:
            self._slot_freed.set()

    async def cancel(self) -> None:
        self._task.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(self._task, *tasks, return_exceptions=True)
        if self in self.bus._consumers:
            self.bus._consumers.remove(self)
        # What the handler never settled goes back at once, as a broker does for a closed channel.
        unsettled = list(self._held)
        self._held.clear()
        if unsettled:
            with contextlib.suppress(BusError):
                await self.bus.release_many(unsettled, self.topic)


class SqliteBus:
    """Topics with consumer groups in one SQLite file (default <data_dir>/bus.db, mode 0600)."""

    name: ClassVar[str] = "sqlite"

    def __init__(self, config: Config | None = None, *, url: str | None = None, lease: float | None = None,
                 poll: float | None = None):
        url = url or (config.bus.url if config is not None else None)
        options = _url_options(url)
        self.path = bus_path(config, url)
        self.max_deliveries = config.bus.max_deliveries if config else 10
        self.default_prefetch = config.bus.prefetch if config else 256
        self.lease = lease or options.get("lease", DEFAULT_LEASE)
        self.poll = poll or options.get("poll", DEFAULT_POLL)
        self.owner = uuid.uuid4().hex
        self._writer = _Writer(self.path)
        self._signals: dict[str, asyncio.Event] = {}
        self._consumers: list[_SqliteConsumer] = []
        self._tasks: set[asyncio.Task] = set()
        self._owner_lock: int | None = None

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self._writer.start()
        await self._claim_ownership()
        self._background(self._renew_leases())

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.cancel()
        self._consumers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(BusError):
            await self._writer.submit(lambda c: c.execute("DELETE FROM bus_owners WHERE id = ?", (self.owner,)))
        await self._writer.close()
        if self._owner_lock is not None:
            os.close(self._owner_lock)
            with contextlib.suppress(OSError):
                os.unlink(self._owner_file(self.owner))
            self._owner_lock = None

    def _owner_file(self, owner: str) -> Path:
        return self.path.with_name(f"{self.path.name}.owners") / owner

    async def _claim_ownership(self) -> None:
        """Hold a lock file as long as this bus lives. A process that died (SIGKILL) left its lock
        unheld: whatever it had leased is handed out again now rather than after its lease."""
        directory = self._owner_file(self.owner).parent
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self._owner_file(self.owner), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._owner_lock = fd
        owner = self.owner

        def register(conn: sqlite3.Connection) -> list[str]:
            conn.execute("INSERT OR IGNORE INTO bus_owners (id) VALUES (?)", (owner,))
            return [row[0] for row in conn.execute("SELECT id FROM bus_owners WHERE id != ?", (owner,))]

        dead = [other for other in await self._writer.submit(register) if not self._alive(other)]
        if dead:
            def release(conn: sqlite3.Connection) -> int:
                released = 0
                for other in dead:
                    released += conn.execute("UPDATE bus_messages SET owner = NULL, visible_at = ? WHERE owner = ?",
                                             (time.time(), other)).rowcount
                    conn.execute("DELETE FROM bus_owners WHERE id = ?", (other,))
                return released

            released = await self._writer.submit(release)
            for other in dead:
                with contextlib.suppress(OSError):
                    os.unlink(self._owner_file(other))
            if released:
                log.warning("deliveries of a stopped process handed out again",
                            extra={"released": released, "path": str(self.path)})

    def _alive(self, owner: str) -> bool:
        try:
            fd = os.open(self._owner_file(owner), os.O_RDWR)
        except OSError:
            return False  # no lock file: it never started here, or cleaned up after itself
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True  # someone holds it: that bus is running
        finally:
            os.close(fd)
        return False

    async def _renew_leases(self) -> None:
        owner = self.owner
        while True:
            await asyncio.sleep(self.lease / 3)
            until = time.time() + self.lease
            try:
                await self._writer.submit(lambda c: c.execute(
                    "UPDATE bus_messages SET visible_at = ? WHERE owner = ?", (until, owner)), durable=False)
            except BusError:
                log.warning("could not renew sqlite bus leases; trying again", exc_info=True)

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _signal(self, topic: str) -> asyncio.Event:
        signal = self._signals.get(topic)
        if signal is None:
            signal = self._signals[topic] = asyncio.Event()
        return signal

    def _notify(self, topic: str) -> None:
        signal = self._signals.get(topic)
        if signal is not None:
            signal.set()

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, event: Event, *, topic: str = EVENTS_TOPIC, delay: float = 0.0, key: str | None = None) -> None:
        await self._publish_raw(event.to_json(), topic=topic, delay=delay)

    async def _publish_raw(self, body: bytes, *, topic: str = EVENTS_TOPIC, delay: float = 0.0,
                           message_id: str | None = None) -> None:
        """Store the bytes as they are (the tests use it for a message that is not a valid event)."""
        visible_at = time.time() + max(delay, 0.0)
        # The publishes of a wave share one statement and the commit's one fsync.
        await self._writer.gather(("publish", topic), (body, visible_at), lambda c, items: _insert_many(c, topic, items))
        # Delayed too: a consumer sleeping until a later due time must learn of this earlier one.
        self._notify(topic)

    async def ensure_group(self, topic: str, group: str) -> None:
        def create(conn: sqlite3.Connection) -> None:
            first = conn.execute("SELECT 1 FROM bus_groups WHERE topic = ? LIMIT 1", (topic,)).fetchone() is None
            conn.execute("INSERT OR IGNORE INTO bus_groups (topic, grp) VALUES (?, ?)", (topic, group))
            if first:
                conn.execute("UPDATE bus_messages SET grp = ? WHERE topic = ? AND grp = ?", (group, topic, BACKLOG_GROUP))

        await self._writer.submit(create)

    # -- consuming ---------------------------------------------------------------------------

    async def consume(self, topic: str, group: str, handler: DeliveryHandler, *, prefetch: int | None = None,
                      batch: BatchHandler | None = None) -> _SqliteConsumer:
        await self.ensure_group(topic, group)
        consumer = _SqliteConsumer(self, topic, group, handler, prefetch or self.default_prefetch, batch)
        self._consumers.append(consumer)
        return consumer

    async def claim(self, topic: str, group: str, limit: int) -> tuple[list[tuple], float | None]:
        """Lease up to `limit` visible messages of the group, oldest first. Returns them (id, body,
        delivery number, dead-letter reason) and, when fewer were found, when the next one becomes
        visible. A message that its consumers died holding `max_deliveries` times is dead-lettered."""
        owner, lease, max_deliveries = self.owner, self.lease, self.max_deliveries

        def claim(conn: sqlite3.Connection) -> tuple[list[tuple], float | None]:
            now = time.time()
            rows = conn.execute(
                "SELECT id, body, deliveries, reason FROM bus_messages WHERE topic = ? AND grp = ? AND visible_at <= ? "
                "ORDER BY id LIMIT ?", (topic, group, now, limit)).fetchall()
            out = []
            for row_id, body, deliveries, reason in rows:
                if deliveries >= max_deliveries and not topic.endswith(".dlq"):
                    _move_to_dead_letters(conn, row_id, topic, body,
                                          "max deliveries reached (consumers stopped while handling it)")
                    continue
                conn.execute("UPDATE bus_messages SET owner = ?, visible_at = ?, deliveries = deliveries + 1 WHERE id = ?",
                             (owner, now + lease, row_id))
                out.append((row_id, body, deliveries + 1, reason))
            next_visible = None
            if len(rows) < limit:
                next_visible = conn.execute("SELECT min(visible_at) FROM bus_messages WHERE topic = ? AND grp = ?",
                                            (topic, group)).fetchone()[0]
            return out, next_visible

        return await self._writer.submit(claim, durable=False)

    async def ack(self, row_id: int) -> None:
        # Not waited for: the consumer's slot is free at once, and the delete rides the next
        # commit. An ack lost to a crash means a redelivery, which the router recognises by the
        # execution record (at-least-once, as on every bus).
        future = self._writer.gather("ack", row_id, _delete_many, durable=False)
        if len(self._writer._gathered["ack"][0]) == 1:  # one callback for the whole group
            future.add_done_callback(_log_failed_ack)

    async def release(self, row_id: int, topic: str) -> None:
        await self.release_many([row_id], topic)

    async def release_many(self, row_ids: list[int], topic: str) -> None:
        """Give leased messages back: visible again now."""
        now = time.time()
        await self._writer.submit(lambda c: c.executemany(
            "UPDATE bus_messages SET owner = NULL, visible_at = ? WHERE id = ?", [(now, i) for i in row_ids]))
        self._notify(topic)

    async def dead_letter(self, row_id: int, topic: str, reason: str) -> None:
        def move(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT body FROM bus_messages WHERE id = ?", (row_id,)).fetchone()
            if row is not None:
                _move_to_dead_letters(conn, row_id, topic, row[0], reason)

        await self._writer.submit(move)
        self._notify(dead_letter_topic(topic))

    def depth(self, topic: str, group: str) -> int:
        """Messages waiting for or held by a group (for tests and metrics; reads the file)."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=30.0)) as conn:
            return conn.execute("SELECT count(*) FROM bus_messages WHERE topic = ? AND grp IN (?, ?)",
                                (topic, group, BACKLOG_GROUP)).fetchone()[0]


def _log_failed_ack(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("sqlite bus ack failed; the event will be delivered again", exc_info=future.exception())


def _move_to_dead_letters(conn: sqlite3.Connection, row_id: int, topic: str, body: bytes, reason: str) -> None:
    conn.execute("DELETE FROM bus_messages WHERE id = ?", (row_id,))
    if topic.endswith(".dlq"):
        # A dead letter its own reader cannot take (not an event): nowhere further to send it.
        log.error("dead letter dropped: its reader rejects it", extra={"topic": topic, "reason": reason})
        return
    _insert(conn, dead_letter_topic(topic), body, time.time(), reason)
