"""FilesystemPackageStore: function zips under <file_system_dir>/<project_id>/<function_id>_<version>_<md5>.zip."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from router.config import Config
from engine.swift import SwiftObjects
from router.plugins import PackageInvalid, PackageRef

LOG = logging.getLogger(__name__)

MAX_PACKAGE_SIZE = 50 * 1024 * 1024  # Qinling's client-side cap; the API's request limit matches it

# Ids become path components: anything that could climb out of the store is refused.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FilesystemPackageStore:
    """Keeps each function version's zip as one file; the local engine reads it in place."""

    def __init__(self, config: Config) -> None:
        self.root = Path(config.storage.file_system_dir)
        self.max_unpacked = config.resource_limits.max_package_unpacked_size
        self.max_files = config.resource_limits.max_package_files
        url = config.storage.swift_url
        self.swift = SwiftObjects(url, config.storage.swift_token) if url else None
        # Package files seen on disk, by ref: a file is named by its content's md5 and never
        # changed in place, so an execution need not stat() it again (delete() forgets it).
        self._present: dict[tuple[str, str, int, str | None], str] = {}
        # (project, function, container, object) → (etag, md5 of the stored copy)
        self._swift_copies: dict[tuple[str, str, str, str], tuple[str, str]] = {}

    @property
    def swift_enabled(self) -> bool:
        return self.swift is not None

    async def check_swift(self, project_id: str, container: str, obj: str) -> None:
        """Refuse a Swift object that cannot be a function's code (missing, unreadable, > 51 MiB)."""
        if self.swift is None:
            raise PackageInvalid("Swift object not supported: no Swift store is configured ([storage] swift_url).")
        await self.swift.head(project_id, container, obj)

    async def fetch_swift(self, project_id: str, function_id: str, container: str, obj: str) -> PackageRef:
        """The function's code from Swift as a stored package: fetched again only when the
        object's ETag changed, so an updated object is picked up by the next execution."""
        if self.swift is None:
            raise PackageInvalid("Swift object not supported: no Swift store is configured ([storage] swift_url).")
        key = (project_id, function_id, container, obj)
        headers = await self.swift.head(project_id, container, obj)
        etag = headers.get("Etag", headers.get("ETag", "")).strip('"')
        cached = self._swift_copies.get(key)
        if cached and cached[0] == etag and etag:
            ref = PackageRef(project_id, function_id, 0, cached[1])
            if self.path(ref):
                return ref
        data, etag = await self.swift.get(project_id, container, obj)
        md5 = await self.put(project_id, function_id, 0, data)
        self._swift_copies[key] = (etag, md5)
        LOG.info("fetched function code from Swift", extra={"function_id": function_id, "object": f"{container}/{obj}"})
        return PackageRef(project_id, function_id, 0, md5)

    def _check_unpacked(self, members: list[zipfile.ZipInfo]) -> None:
        """Refuse a package that would unpack past [resource_limits] (a zip bomb). zipfile never
        inflates a member past the size its directory entry declares, so the directory bounds it."""
        if len(members) > self.max_files:
            raise PackageInvalid(f"Package holds {len(members)} files; [resource_limits] max_package_files is {self.max_files}.")
        total = sum(m.file_size for m in members)
        if total > self.max_unpacked:
            raise PackageInvalid(f"Package unpacks to {total} bytes; [resource_limits] max_package_unpacked_size "
                                 f"is {self.max_unpacked}.")

    def _file(self, project_id: str, function_id: str, version: int, md5sum: str) -> Path:
        for what, value in (("project id", project_id), ("function id", function_id), ("md5sum", md5sum)):
            if not _SAFE.match(str(value)):
                raise ValueError(f"invalid {what} for a package path: {value!r}")
        return self.root / project_id / f"{function_id}_{int(version)}_{md5sum}.zip"

    async def put(self, project_id: str, function_id: str, version: int, data: bytes, md5sum: str | None = None) -> str:
        if len(data) > MAX_PACKAGE_SIZE:
            raise PackageInvalid(f"Package is larger than {MAX_PACKAGE_SIZE // (1024 * 1024)} MiB.")
        return await asyncio.to_thread(self._put, project_id, function_id, version, data, md5sum)

    def _put(self, project_id: str, function_id: str, version: int, data: bytes, md5sum: str | None) -> str:
        if not zipfile.is_zipfile(io.BytesIO(data)):
            raise PackageInvalid("Package is not a valid ZIP package.")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = zf.infolist()
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
            raise PackageInvalid("Package is not a valid ZIP package.") from exc
        self._check_unpacked(members)  # from the directory, before inflating anything
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                if zf.testzip() is not None:
                    raise PackageInvalid("Package is not a valid ZIP package.")
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
            raise PackageInvalid("Package is not a valid ZIP package.") from exc
        digest = hashlib.md5(data).hexdigest()
        if md5sum is not None and md5sum.strip().lower() != digest:
            raise PackageInvalid("Package md5 mismatch.")
        target = self._file(project_id, function_id, version, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a reader never sees half a zip.
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".zip", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        LOG.info("stored package %s", target, extra={"function_id": function_id, "version": version})
        return digest

    async def get(self, ref: PackageRef) -> bytes:
        path = self._file(ref.project_id, ref.function_id, ref.version, ref.md5sum)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise FileNotFoundError(f"package of function {ref.function_id} version {ref.version} not found") from None

    def path(self, ref: PackageRef) -> str | None:
        key = (ref.project_id, ref.function_id, ref.version, ref.md5sum)
        known = self._present.get(key)
        if known is not None:
            return known
        path = self._file(ref.project_id, ref.function_id, ref.version, ref.md5sum)
        if not path.is_file():
            return None
        self._present[key] = str(path)
        return str(path)

    async def copy(self, ref: PackageRef, version: int) -> PackageRef:
        src = self._file(ref.project_id, ref.function_id, ref.version, ref.md5sum)
        dst = self._file(ref.project_id, ref.function_id, version, ref.md5sum)
        await asyncio.to_thread(_link_or_copy, src, dst)
        return PackageRef(project_id=ref.project_id, function_id=ref.function_id, version=version, md5sum=ref.md5sum)

    async def delete(self, ref: PackageRef) -> None:
        self._present.pop((ref.project_id, ref.function_id, ref.version, ref.md5sum), None)
        path = self._file(ref.project_id, ref.function_id, ref.version, ref.md5sum)
        await asyncio.to_thread(_unlink, path)

    async def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside the target and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise FileNotFoundError(f"package {src.name} not found")
    tmp = dst.with_name(f".copy-{os.getpid()}-{dst.name}")
    try:
        os.link(src, tmp)  # packages are never modified in place, so sharing the inode is safe
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass

