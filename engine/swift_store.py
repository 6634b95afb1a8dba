"""Function packages kept in a Swift container that every replica shares, with each replica's
filesystem copy as a read-through cache ([storage] provider = swift)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from urllib.parse import quote

import aiohttp

from engine.packages import FilesystemPackageStore, write_atomic
from router.config import Config, ConfigError
from router.plugins import PackageRef, PackageStoreUnavailable

LOG = logging.getLogger(__name__)

_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)


class SwiftUnavailable(PackageStoreUnavailable):
    """Swift refused or could not be reached; the message names the object and the answer."""


class SwiftPackageStore(FilesystemPackageStore):
    """Objects are named `<project>/<function>_<version>_<md5>.zip`: the md5 in the name makes each
    object immutable, so a replica's cached copy can never be stale and needs no invalidation.
    A package is stored in Swift before `put` returns, so any replica can serve it at once."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        options = config.storage
        if not options.swift_store_url:
            raise ConfigError("[storage] provider = swift needs [storage] swift_store_url (the storage URL of the "
                              "account that keeps packages, e.g. http://swift:8080/v1/AUTH_headwater)")
        self.base = options.swift_store_url.rstrip("/")
        self.container = options.swift_store_container
        self.token = options.swift_store_token
        self._container_ready = False
        self._session: aiohttp.ClientSession | None = None

    # -- Swift calls ------------------------------------------------------------------------

    def _object_url(self, ref: PackageRef) -> str:
        name = self._file(ref.project_id, ref.function_id, ref.version, ref.md5sum).relative_to(self.root)
        return f"{self.base}/{quote(self.container, safe='')}/{quote(str(name), safe='/')}"

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"X-Auth-Token": self.token} if self.token else {}
        headers.update(extra or {})
        return headers

    def _client(self) -> aiohttp.ClientSession:
        # One session per event loop: the store outlives test loops in some fixtures.
        if self._session is None or self._session.closed or self._session._loop is not asyncio.get_running_loop():
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        return self._session

    async def _call(self, method: str, url: str, *, ok: tuple[int, ...], what: str, **kw) -> tuple[int, bytes]:
        try:
            async with self._client().request(method, url, **kw) as resp:
                body = await resp.read()
                if resp.status not in ok:
                    raise SwiftUnavailable(f"Swift answered {resp.status} to {method} of {what}")
                return resp.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise SwiftUnavailable(f"Swift could not be reached for {method} of {what}: {exc or type(exc).__name__}") from None

    async def _ensure_container(self) -> None:
        if self._container_ready:
            return
        await self._call("PUT", f"{self.base}/{quote(self.container, safe='')}", ok=(201, 202, 204),
                         what=f"container {self.container}", headers=self._headers())
        self._container_ready = True

    # -- PackageStore -----------------------------------------------------------------------

    async def put(self, project_id: str, function_id: str, version: int, data: bytes, md5sum: str | None = None) -> str:
        digest = await super().put(project_id, function_id, version, data, md5sum)  # validates, caches locally
        ref = PackageRef(project_id, function_id, version, digest)
        try:
            await self._ensure_container()
            # Swift checks the body against ETag and refuses (422) a corrupted upload.
            await self._call("PUT", self._object_url(ref), ok=(201,), what=f"package {function_id} v{version}",
                             data=data, headers=self._headers({"ETag": digest, "Content-Type": "application/zip"}))
        except BaseException:
            await super().delete(ref)  # not in Swift: no replica may believe it is stored
            raise
        LOG.info("stored package in Swift", extra={"function_id": function_id, "version": version, "container": self.container})
        return digest

    async def get(self, ref: PackageRef) -> bytes:
        try:
            return await super().get(ref)
        except FileNotFoundError:
            pass
        status, data = await self._call("GET", self._object_url(ref), ok=(200, 404), what=f"package {ref.function_id} v{ref.version}",
                                        headers=self._headers())
        if status == 404:
            raise FileNotFoundError(f"package of function {ref.function_id} version {ref.version} not found")
        if hashlib.md5(data).hexdigest() != ref.md5sum:
            raise SwiftUnavailable(f"package of function {ref.function_id} version {ref.version} came back from Swift corrupted")
        await asyncio.to_thread(write_atomic, self._file(ref.project_id, ref.function_id, ref.version, ref.md5sum), data)
        return data

    async def copy(self, ref: PackageRef, version: int) -> PackageRef:
        copied = PackageRef(ref.project_id, ref.function_id, version, ref.md5sum)
        source = self._object_url(ref).removeprefix(self.base + "/")
        # A server-side copy: the bytes never pass through this replica.
        await self._call("PUT", self._object_url(copied), ok=(201,), what=f"package {ref.function_id} v{version}",
                         headers=self._headers({"X-Copy-From": "/" + source, "Content-Length": "0"}))
        if self.path(ref):
            await super().copy(ref, version)
        return copied

    async def delete(self, ref: PackageRef) -> None:
        await super().delete(ref)
        await self._call("DELETE", self._object_url(ref), ok=(204, 404), what=f"package {ref.function_id} v{ref.version}",
                         headers=self._headers())

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
