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


class PackageError(Exception):
    """The package could not be fetched or unpacked; the message is shown to the user."""


class Packages:
    def __init__(self, work_dir: str):
        self.work_dir = os.path.abspath(work_dir)
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
        key = self.key(package)
        known = self._dirs.get(key)
        if known:
            return known
        target = os.path.join(self.work_dir, "packages", key)
        if not os.path.isdir(target):
            data = self._fetch(package)
            md5 = package.get("md5sum")
            if md5 and hashlib.md5(data).hexdigest() != str(md5).lower():
                raise PackageError("Package md5 mismatch.")
            # Unpack beside the target and rename: another worker sharing the work dir never sees a
            # half-written tree.
            tmp = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.join(self.work_dir, "packages"))
            try:
                try:
                    with zipfile.ZipFile(io.BytesIO(data)) as zf:
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

    @staticmethod
    def _fetch(package: dict) -> bytes:
        path = package.get("path")
        if path:
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise PackageError(f"Failed to read function package {path}: {exc}") from None
        url = package.get("download_url")
        if url:
            headers = {}
            if package.get("token"):
                headers["X-Auth-Token"] = package["token"]
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as resp:
                    return resp.read()
            except Exception as exc:  # noqa: BLE001 - any download failure is the same answer
                raise PackageError(f"Failed to download function package from {url}, error: {exc}") from None
        raise PackageError("Request names no package (package.path or package.download_url).")

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
