"""Function packages: fetched once per (function, version, md5) and unpacked into the work dir."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import urllib.request
import zipfile

from headwater_runtime import sandbox

DOWNLOAD_TIMEOUT = 30
# What one package may unpack to, checked from the ZIP directory before anything is written (a
# 2 MiB zip bomb otherwise unpacked to 2.1 GiB). The API checks the same at upload with the
# operator's [resource_limits]; these are the runtime's own ceiling.
MAX_UNPACKED_BYTES = int(os.environ.get("HEADWATER_RUNTIME_MAX_UNPACKED_BYTES", "0")) or 512 * 1024 * 1024
MAX_FILES = int(os.environ.get("HEADWATER_RUNTIME_MAX_FILES", "0")) or 10000


class PackageError(Exception):
    """The package could not be fetched or unpacked; the message is shown to the user."""


class Packages:
    def __init__(self, work_dir: str, package_dirs: list[str] = (), package_urls: list[str] = ()):
        self.work_dir = os.path.abspath(work_dir)
        # Where packages may come from: only what the engine named at start-up. A request naming
        # any other path (/etc/shadow) or URL (file://, another host) is refused.
        self.package_dirs = [os.path.realpath(d) for d in package_dirs]
        self.package_urls = [u for u in package_urls if u.startswith(("http://", "https://"))]
        os.makedirs(os.path.join(self.work_dir, "packages"), exist_ok=True)
        if sandbox.SANDBOX["uids"]:
            # Sandboxed children reach their own package through an open descriptor only.
            os.chmod(os.path.join(self.work_dir, "packages"), 0o700)
        self._dirs: dict[str, str] = {}

    @staticmethod
    def key(package: dict) -> str:
        fid = str(package.get("function_id") or "anonymous")
        version = str(package.get("version") or 0)
        md5 = str(package.get("md5sum") or "")
        if not md5 and package.get("path"):
            # Without an md5 the path's identity (size + mtime) decides when to unpack again.
            try:
                st = os.stat(package["path"])
                md5 = f"{st.st_size}-{st.st_mtime_ns}"
            except OSError:
                md5 = "nomd5"
        raw = f"{fid}_{version}_{md5}"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)[:200]

    def unpack(self, package: dict) -> str:
        """The directory holding the unpacked package (unpacked now if this is the first time)."""
        path, url = self._allowed_path(package), self._allowed_url(package)  # before any cache: a
        key = self.key(package)  # request must not reach another function's tree by naming its key
        known = self._dirs.get(key)
        if known:
            return known
        target = os.path.join(self.work_dir, "packages", key)
        if not os.path.isdir(target):
            data = self._fetch(package, path, url)
            md5 = package.get("md5sum")
            if md5 and hashlib.md5(data).hexdigest() != str(md5).lower():
                raise PackageError("Package md5 mismatch.")
            # Unpack beside the target and rename: another worker sharing the work dir never sees a
            # half-written tree.
            tmp = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.join(self.work_dir, "packages"))
            try:
                try:
                    with zipfile.ZipFile(io.BytesIO(data)) as zf:
                        _check_size(zf)
                        zf.extractall(tmp)  # extractall drops absolute and '..' path parts
                except zipfile.BadZipFile as exc:
                    raise PackageError(f"Package is not a valid ZIP package: {exc}") from None
                _make_readable(tmp)  # by the sandbox uid, which owns none of it
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not os.path.isdir(target):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._dirs[key] = target
        return target

    def _allowed_path(self, package: dict) -> str | None:
        path = package.get("path")
        if path is None:
            return None
        if not isinstance(path, str) or not self.package_dirs:
            raise PackageError("Package path refused: this runtime takes no package paths.")
        real = os.path.realpath(path)
        if not any(real.startswith(root + os.sep) for root in self.package_dirs):
            raise PackageError("Package path refused: not in a package directory this runtime was given.")
        return real

    def _allowed_url(self, package: dict) -> str | None:
        url = package.get("download_url")
        if url is None:
            return None
        if not isinstance(url, str) or not any(url.startswith(prefix) for prefix in self.package_urls):
            raise PackageError("Package URL refused: not under a package URL this runtime was given.")
        return url

    @staticmethod
    def _fetch(package: dict, path: str | None, url: str | None) -> bytes:
        if path:
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise PackageError(f"Failed to read the function package: {exc.strerror}") from None
        if url:
            headers = {}
            if package.get("token"):
                headers["X-Auth-Token"] = str(package["token"])
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as resp:
                    return resp.read(MAX_UNPACKED_BYTES + 1)
            except Exception as exc:  # noqa: BLE001 - any download failure is the same answer
                raise PackageError(f"Failed to download the function package: {type(exc).__name__}") from None
        raise PackageError("Request names no package (package.path or package.download_url).")


def _check_size(zf: zipfile.ZipFile) -> None:
    """Refuse a package whose directory declares too many files or too many bytes (zipfile never
    inflates a member past its declared size, so the directory bounds the unpacked tree)."""
    members = zf.infolist()
    if len(members) > MAX_FILES:
        raise PackageError(f"Package has {len(members)} files; the limit is {MAX_FILES}.")
    total = sum(m.file_size for m in members)
    if total > MAX_UNPACKED_BYTES:
        raise PackageError(f"Package unpacks to {total} bytes; the limit is {MAX_UNPACKED_BYTES}.")


def _make_readable(top: str) -> None:
    """Directories 0755 and files 0644 (0755 when executable): readable, never writable, by the function."""
    for root, dirs, files in os.walk(top):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                mode = os.lstat(path).st_mode
                if not os.path.islink(path):
                    os.chmod(path, 0o755 if mode & 0o100 else 0o644)

# ---------------------------------------------------------------------------------------------
