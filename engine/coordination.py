"""Coordination between engine processes: the function→worker map under a per-process lease, locks, and
leader election — through etcd (aetcd), or in-process for the embedded single-process default."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from router.config import Config

LOG = logging.getLogger(__name__)

# How often a process waiting for a shared permit looks again when the one it watched is not the one freed.
PERMIT_RECHECK_SECONDS = 0.25


class CoordinationError(RuntimeError):
    """The coordination service could not be reached or refused the operation."""


class LockTimeout(CoordinationError):
    """A lock was not acquired in time."""


class Coordinator(abc.ABC):
    """What engines share. Claims (worker records) belong to the process that made them and vanish with it:
    in etcd they live under the process's lease, so a crashed engine's claims expire after `lease_ttl`."""

    def __init__(self, engine_id: str):
        self.engine_id = engine_id

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def claim(self, pod: str, function_id: str, version: int, info: dict[str, Any]) -> bool:
        """Record that `pod` serves the function version, atomically: False if the pod is already claimed."""

    @abc.abstractmethod
    async def unclaim(self, pod: str) -> None:
        """Forget the pod's claim (whoever made it)."""

    @abc.abstractmethod
    async def workers(self, function_id: str, version: int) -> dict[str, dict[str, Any]]:
        """pod name → claim info of the workers of a function version (any engine's)."""

    @abc.abstractmethod
    async def claims(self) -> dict[str, dict[str, Any]]:
        """pod name → claim info of every claimed pod."""

    @abc.abstractmethod
    def lock(self, name: str, timeout: float = 30.0) -> contextlib.AbstractAsyncContextManager[None]:
        """A mutual-exclusion lock shared by every engine; raises LockTimeout after `timeout` seconds."""

    @abc.abstractmethod
    async def campaign(self, name: str) -> bool:
        """Try (without waiting) to become or stay the leader of `name`; True while this process leads.
        For work that must run once across replicas (reapers, cron, a Zaqar consumer)."""

    @abc.abstractmethod
    async def resign(self, name: str) -> None: ...

    async def wait_leader(self, name: str, poll: float = 1.0) -> None:
        """Block until this process leads `name`."""
        while not await self.campaign(name):
            await asyncio.sleep(poll)

    @abc.abstractmethod
    async def report_load(self, function_id: str, version: int, running: int) -> None:
        """Publish how many executions of the function version this process runs now (its last
        report stands until the next one, or until the process is gone)."""

    @abc.abstractmethod
    async def loads(self, function_id: str, version: int) -> dict[str, int]:
        """engine id → running executions of the function version, as each process last reported."""

    @abc.abstractmethod
    def permit(self, name: str, limit: int) -> contextlib.AbstractAsyncContextManager[None]:
        """One of `limit` permits of `name` shared by every process (a counting semaphore), held
        for the block; a dead holder's permits end with its lease."""

    @abc.abstractmethod
    async def reserve_rate(self, name: str, interval: float) -> float:
        """Reserve the next slot of a rate shared by every process (one event per `interval`
        seconds, no bursts) and return how many seconds to wait until it comes."""


# ---------------------------------------------------------------------------------------------
# In-process


class MemoryState:
    """State shared by the MemoryCoordinators of one process (one per engine instance)."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.leaders: dict[str, str] = {}
        self.loads: dict[tuple[str, int], dict[str, int]] = {}
        self.permits: dict[str, _LocalPermits] = {}
        self.rates: dict[str, float] = {}  # name → the time (monotonic) the next slot is due


class _LocalPermits:
    """A counting semaphore whose limit may change between uses (the subscription's limits were edited)."""

    def __init__(self) -> None:
        self.held = 0
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, limit: int) -> AsyncIterator[None]:
        async with self.changed:
            await self.changed.wait_for(lambda: self.held < limit)
            self.held += 1
        try:
            yield
        finally:
            async with self.changed:
                self.held -= 1
                self.changed.notify_all()


class MemoryCoordinator(Coordinator):
    """The embedded default: coordination among the engines of this one process."""

    def __init__(self, engine_id: str, state: MemoryState | None = None):
        super().__init__(engine_id)
        self.state = state or MemoryState()

    async def stop(self) -> None:
        # A stopped process's claims and leadership end with it, as an etcd lease would.
        for pod, info in list(self.state.pods.items()):
            if info.get("engine") == self.engine_id:
                self.state.pods.pop(pod, None)
        for name, holder in list(self.state.leaders.items()):
            if holder == self.engine_id:
                self.state.leaders.pop(name, None)
        for reports in self.state.loads.values():
            reports.pop(self.engine_id, None)

    async def claim(self, pod: str, function_id: str, version: int, info: dict[str, Any]) -> bool:
        if pod in self.state.pods:
            return False
        self.state.pods[pod] = {**info, "pod": pod, "function_id": function_id, "version": version, "engine": self.engine_id}
        return True

    async def unclaim(self, pod: str) -> None:
        self.state.pods.pop(pod, None)

    async def workers(self, function_id: str, version: int) -> dict[str, dict[str, Any]]:
        return {p: dict(i) for p, i in self.state.pods.items() if i["function_id"] == function_id and i["version"] == version}

    async def claims(self) -> dict[str, dict[str, Any]]:
        return {p: dict(i) for p, i in self.state.pods.items()}

    @contextlib.asynccontextmanager
    async def lock(self, name: str, timeout: float = 30.0) -> AsyncIterator[None]:
        lock = self.state.locks.setdefault(name, asyncio.Lock())
        try:
            async with asyncio.timeout(timeout):  # not wait_for: in 3.11 it can lose a cancellation
                await lock.acquire()
        except TimeoutError:
            raise LockTimeout(f"lock {name!r} not acquired in {timeout:g} s") from None
        try:
            yield
        finally:
            lock.release()

    async def campaign(self, name: str) -> bool:
        return self.state.leaders.setdefault(name, self.engine_id) == self.engine_id

    async def resign(self, name: str) -> None:
        if self.state.leaders.get(name) == self.engine_id:
            del self.state.leaders[name]

    async def report_load(self, function_id: str, version: int, running: int) -> None:
        self.state.loads.setdefault((function_id, version), {})[self.engine_id] = running

    async def loads(self, function_id: str, version: int) -> dict[str, int]:
        return dict(self.state.loads.get((function_id, version), {}))

    def permit(self, name: str, limit: int) -> contextlib.AbstractAsyncContextManager[None]:
        return self.state.permits.setdefault(name, _LocalPermits()).hold(limit)

    async def reserve_rate(self, name: str, interval: float) -> float:
        now = time.monotonic()
        due = max(now, self.state.rates.get(name, now))
        self.state.rates[name] = due + interval
        return due - now


# ---------------------------------------------------------------------------------------------
# etcd


class EtcdCoordinator(Coordinator):
    """etcd v3 through aetcd. Keys (under `prefix`):

    * ``pods/<pod>``    → claim JSON {function_id, version, engine, url, …}, under this process's lease;
      created only if absent, so one pod is never claimed twice;
    * ``workers/<function_id>/<version>/<pod>`` → the same JSON (the per-function index), same lease;
    * ``locks/<name>``  → holder token, under the lease (a dead holder's locks expire);
    * ``leaders/<name>`` → engine id, under the lease;
    * ``loads/<function_id>/<version>/<engine id>`` → running executions there, under the lease (so a
      dead engine's load disappears with it);
    * ``permits/<name>/<slot>`` → holder token, slot in 0..limit-1, created only if absent, under
      the lease (a dead holder's permits come back after `lease_ttl`);
    * ``rates/<name>`` → the wall-clock time the next slot of the rate is due, moved on by
      compare-and-set (so the replicas' clocks must agree, as NTP keeps them).
    """

    def __init__(self, engine_id: str, *, host: str = "127.0.0.1", port: int = 2379, protocol: str = "http",
                 ca_cert: str | None = None, cert_file: str | None = None, cert_key: str | None = None,
                 lease_ttl: int = 15, prefix: str = "/headwater/", timeout: float = 10.0):
        super().__init__(engine_id)
        self.host, self.port, self.protocol = host, port, protocol
        self.ca_cert, self.cert_file, self.cert_key = ca_cert, cert_file, cert_key
        self.lease_ttl = lease_ttl
        self.prefix = prefix.rstrip("/") + "/"
        self.timeout = timeout
        self.client: Any = None
        self.lease: Any = None
        self._keepalive: asyncio.Task | None = None
        self._local_locks: dict[str, asyncio.Lock] = {}
        self._mine: dict[str, dict[str, Any]] = {}  # claims this process made, to restore after a lost lease

    def _k(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    async def start(self) -> None:
        import aetcd  # the etcd client is only needed when etcd coordination is configured

        self._aetcd = aetcd
        self.client = _client_class(aetcd)(host=self.host, port=self.port, timeout=self.timeout,
                                           tls=(self.ca_cert, self.cert_file, self.cert_key) if self.protocol == "https" else None)
        try:
            await self.client.connect()
            self.lease = await self.client.lease(self.lease_ttl)
        except Exception as exc:  # noqa: BLE001 - any failure here means etcd is unusable
            raise CoordinationError(f"etcd at {self.protocol}://{self.host}:{self.port} is not usable: {exc}") from exc
        self._keepalive = asyncio.create_task(self._keep_alive(), name="etcd-lease-keepalive")
        LOG.info("etcd coordination started (lease %x, ttl %d s)", self.lease.id, self.lease_ttl)

    async def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        if self.client is not None:
            # Revoking the lease drops this process's claims, locks and leadership at once.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.client.revoke_lease(self.lease.id)
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None

    async def _keep_alive(self) -> None:
        period = max(0.2, self.lease_ttl / 3)
        while True:
            await asyncio.sleep(period)
            try:
                async with asyncio.timeout(max(1.0, period)):
                    reply = await self.client.refresh_lease(self.lease.id)
                if reply is not None and reply.TTL > 0:
                    continue
                LOG.error("etcd lease %x expired; claims made by this engine were dropped, taking a new lease", self.lease.id)
            except Exception as exc:  # noqa: BLE001 - keep trying: etcd may come back within the TTL
                LOG.warning("etcd lease keep-alive failed: %s", exc)
                continue
            try:
                self.lease = await self.client.lease(self.lease_ttl)
                for pod, info in list(self._mine.items()):
                    # Restore only claims nobody else made meanwhile.
                    await self._create_claim(pod, info)
            except Exception as exc:  # noqa: BLE001
                LOG.warning("etcd lease renewal failed: %s", exc)

    async def _create_claim(self, pod: str, info: dict[str, Any]) -> bool:
        tx = self.client.transactions
        value = json.dumps(info).encode()
        ok, _ = await self.client.transaction(
            compare=[tx.create(self._k("pods", pod)) == 0],
            success=[tx.put(self._k("pods", pod), value, lease=self.lease),
                     tx.put(self._k("workers", info["function_id"], str(info["version"]), pod), value, lease=self.lease)],
            failure=[])
        return bool(ok)

    async def claim(self, pod: str, function_id: str, version: int, info: dict[str, Any]) -> bool:
        record = {**info, "pod": pod, "function_id": function_id, "version": version, "engine": self.engine_id, "claimed_at": time.time()}
        ok = await self._guard(self._create_claim(pod, record))
        if ok:
            self._mine[pod] = record
        return ok

    async def unclaim(self, pod: str) -> None:
        self._mine.pop(pod, None)
        got = await self._guard(self.client.get(self._k("pods", pod)))
        ops = [self.client.transactions.delete(self._k("pods", pod))]
        if got is not None:
            info = json.loads(got.value)
            ops.append(self.client.transactions.delete(self._k("workers", info["function_id"], str(info["version"]), pod)))
        await self._guard(self.client.transaction(compare=[], success=ops, failure=[]))

    async def workers(self, function_id: str, version: int) -> dict[str, dict[str, Any]]:
        found = await self._guard(self.client.get_prefix(self._k("workers", function_id, str(version)) + b"/"))
        return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in found}

    async def claims(self) -> dict[str, dict[str, Any]]:
        found = await self._guard(self.client.get_prefix(self._k("pods") + b"/"))
        return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in found}

    @contextlib.asynccontextmanager
    async def lock(self, name: str, timeout: float = 30.0) -> AsyncIterator[None]:
        # Coroutines of this process queue locally first, so only one of them polls etcd.
        local = self._local_locks.setdefault(name, asyncio.Lock())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                await local.acquire()
        except TimeoutError:
            raise LockTimeout(f"lock {name!r} not acquired in {timeout:g} s") from None
        try:
            token = f"{self.engine_id}:{uuid.uuid4().hex}".encode()
            key = self._k("locks", name)
            tx = self.client.transactions
            while True:
                ok, responses = await self._guard(self.client.transaction(
                    compare=[tx.create(key) == 0], success=[tx.put(key, token, lease=self.lease)], failure=[tx.get(key)]))
                if ok:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise LockTimeout(f"lock {name!r} is held by another engine ({timeout:g} s)")
                held = responses[0][0][1] if responses and responses[0] else None
                try:
                    await self.client.watch_once(key, timeout=min(remaining, 1.0),
                                                 start_revision=(held.mod_revision + 1) if held else None,
                                                 kind=self._aetcd.rtypes.EventKind.DELETE)
                except self._aetcd.exceptions.WatchTimeoutError:
                    pass
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    await self.client.transaction(compare=[tx.value(key) == token], success=[tx.delete(key)], failure=[])
        finally:
            local.release()

    async def campaign(self, name: str) -> bool:
        tx = self.client.transactions
        key = self._k("leaders", name)
        ok, responses = await self._guard(self.client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, self.engine_id.encode(), lease=self.lease)], failure=[tx.get(key)]))
        if ok:
            return True
        held = responses[0][0][1] if responses and responses[0] else None
        return held is not None and held.value == self.engine_id.encode() and held.lease == self.lease.id

    async def resign(self, name: str) -> None:
        tx = self.client.transactions
        key = self._k("leaders", name)
        await self._guard(self.client.transaction(compare=[tx.value(key) == self.engine_id.encode()], success=[tx.delete(key)], failure=[]))

    async def report_load(self, function_id: str, version: int, running: int) -> None:
        key = self._k("loads", function_id, str(version), self.engine_id)
        if running:
            await self._guard(self.client.put(key, str(running).encode(), lease=self.lease))
        else:
            await self._guard(self.client.delete(key))

    async def loads(self, function_id: str, version: int) -> dict[str, int]:
        found = await self._guard(self.client.get_prefix(self._k("loads", function_id, str(version)) + b"/"))
        return {kv.key.decode().rsplit("/", 1)[1]: int(kv.value) for kv in found}

    @contextlib.asynccontextmanager
    async def permit(self, name: str, limit: int) -> AsyncIterator[None]:
        prefix = self._k("permits", name) + b"/"
        token = f"{self.engine_id}:{uuid.uuid4().hex}".encode()
        tx = self.client.transactions if self.client is not None else None
        key = None
        while key is None:
            held = {kv.key: kv for kv in await self._guard(self.client.get_prefix(prefix))}
            for slot in range(limit):
                candidate = prefix + str(slot).encode()
                if candidate in held:
                    continue
                ok, _ = await self._guard(self.client.transaction(
                    compare=[tx.create(candidate) == 0], success=[tx.put(candidate, token, lease=self.lease)], failure=[]))
                if ok:
                    key = candidate
                    break
            else:
                # All taken: wait for one to be given back (or to expire with its holder's lease),
                # then look again; the timeout bounds the wait when the slot freed is another one.
                busy = [kv for k, kv in held.items() if int(k.rsplit(b"/", 1)[1]) < limit]
                if busy:
                    oldest = min(busy, key=lambda kv: kv.mod_revision)
                    try:
                        await self.client.watch_once(oldest.key, timeout=PERMIT_RECHECK_SECONDS,
                                                     start_revision=oldest.mod_revision + 1,
                                                     kind=self._aetcd.rtypes.EventKind.DELETE)
                    except self._aetcd.exceptions.WatchTimeoutError:
                        pass
                    except self._aetcd.exceptions.ClientError as exc:
                        raise CoordinationError(f"etcd at {self.host}:{self.port}: {exc}") from exc
                else:
                    await asyncio.sleep(PERMIT_RECHECK_SECONDS)
        try:
            yield
        finally:
            # Only our own token: if our lease lapsed meanwhile the slot may be someone else's now.
            with contextlib.suppress(Exception):
                await self.client.transaction(compare=[tx.value(key) == token], success=[tx.delete(key)], failure=[])

    async def reserve_rate(self, name: str, interval: float) -> float:
        key = self._k("rates", name)
        tx = self.client.transactions if self.client is not None else None
        while True:
            got = await self._guard(self.client.get(key))
            now = time.time()
            due = max(now, float(got.value)) if got is not None else now
            seen = tx.mod(key) == got.mod_revision if got is not None else tx.create(key) == 0
            ok, _ = await self._guard(self.client.transaction(
                compare=[seen], success=[tx.put(key, repr(due + interval).encode(), lease=self.lease)], failure=[]))
            if ok:
                return due - now

    async def _guard(self, awaitable):
        if self.client is None:
            raise CoordinationError("etcd coordination is not started")
        try:
            return await awaitable
        except self._aetcd.exceptions.ClientError as exc:
            raise CoordinationError(f"etcd at {self.host}:{self.port}: {exc}") from exc


def _client_class(aetcd):
    """aetcd's Client speaks plaintext only; this subclass opens a TLS channel when given certificates."""

    class Client(aetcd.Client):
        def __init__(self, *args, tls=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._tls = tls

        async def connect(self) -> None:
            if self._tls is None or self._connected.is_set():
                return await super().connect()
            import grpc

            ca, cert, key = self._tls

            def read(path):
                if not path:
                    return None
                with open(path, "rb") as fh:
                    return fh.read()

            credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
            original = aetcd.rpc.insecure_channel
            # connect() builds its channel with rpc.insecure_channel; swap in a secure one for this call.
            aetcd.rpc.insecure_channel = lambda target, options=None: aetcd.rpc.secure_channel(target, credentials, options=options)
            try:
                await super().connect()
            finally:
                aetcd.rpc.insecure_channel = original

    return Client


def memory_coordination(config: Config, engine_id: str) -> MemoryCoordinator:
    """The `memory` coordination plugin: one process, no other replicas."""
    return MemoryCoordinator(engine_id)


def etcd_coordination(config: Config, engine_id: str) -> EtcdCoordinator:
    """The `etcd` coordination plugin, from the [etcd] options."""
    etcd = config.etcd
    return EtcdCoordinator(engine_id, host=etcd.host, port=etcd.port, protocol=etcd.protocol,
                           ca_cert=str(etcd.ca_cert) if etcd.ca_cert else None,
                           cert_file=str(etcd.cert_file) if etcd.cert_file else None,
                           cert_key=str(etcd.cert_key) if etcd.cert_key else None,
                           lease_ttl=etcd.lease_ttl, prefix=etcd.prefix)


def coordinator_from_config(config: Config, engine_id: str | None = None) -> Coordinator:
    engine_id = engine_id or f"engine-{uuid.uuid4().hex[:12]}"
    if config.engine.coordination == "etcd":
        return etcd_coordination(config, engine_id)
    return memory_coordination(config, engine_id)
