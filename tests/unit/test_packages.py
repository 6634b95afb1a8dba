"""FilesystemPackageStore: validation (zip, md5, size) and a store/fetch/copy/delete round trip."""

from __future__ import annotations

import hashlib
import os

import pytest

from engine.packages import MAX_PACKAGE_SIZE, FilesystemPackageStore
from router.config import Config
from router.plugins import PackageInvalid, PackageRef, PackageStore
from tests.e2e.server import make_zip


@pytest.fixture
def store(tmp_path) -> FilesystemPackageStore:
    return FilesystemPackageStore(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))


def test_is_a_package_store(store):
    assert isinstance(store, PackageStore)


async def test_not_a_zip_is_refused(store):
    with pytest.raises(PackageInvalid, match="Package is not a valid ZIP package."):
        await store.put("p", "f", 0, b"definitely not a zip")


async def test_md5_mismatch_is_refused(store):
    with pytest.raises(PackageInvalid, match="Package md5 mismatch."):
        await store.put("p", "f", 0, make_zip({"main.py": "x = 1"}), md5sum="0" * 32)


async def test_too_large_is_refused(store):
    with pytest.raises(PackageInvalid, match="larger"):
        await store.put("p", "f", 0, b"\0" * (MAX_PACKAGE_SIZE + 1))


async def test_path_traversal_is_refused(store):
    with pytest.raises(ValueError):
        await store.put("..", "f", 0, make_zip({"main.py": ""}))


async def test_round_trip(store, tmp_path):
    data = make_zip({"main.py": "def main():\n    return 1\n"})
    md5 = await store.put("proj", "fn", 0, data, md5sum=hashlib.md5(data).hexdigest().upper())
    assert md5 == hashlib.md5(data).hexdigest()
    ref = PackageRef("proj", "fn", 0, md5)
    path = store.path(ref)
    assert path == str(tmp_path / "packages" / "proj" / f"fn_0_{md5}.zip")
    assert await store.get(ref) == data
    assert not [n for n in os.listdir(tmp_path / "packages" / "proj") if n.startswith(".")]  # no temp files left

    copied = await store.copy(ref, 3)
    assert copied == PackageRef("proj", "fn", 3, md5)
    assert await store.get(copied) == data

    await store.delete(ref)
    assert store.path(ref) is None
    with pytest.raises(FileNotFoundError):
        await store.get(ref)
    await store.delete(ref)  # deleting twice is fine
    assert await store.get(copied) == data


async def test_a_known_package_path_is_not_looked_up_again(store, monkeypatch):
    """An execution asks for its package's path every time: once seen on disk, the answer comes
    from memory (no stat per execution), until the package is deleted."""
    data = make_zip({"main.py": "def main():\n    return 1\n"})
    ref = PackageRef("proj", "fn", 0, await store.put("proj", "fn", 0, data))
    first = store.path(ref)
    looked = []
    real_is_file = type(store.root).is_file
    monkeypatch.setattr(type(store.root), "is_file", lambda self: looked.append(self) or real_is_file(self))
    assert store.path(ref) == first and looked == []
    await store.delete(ref)
    assert store.path(ref) is None and looked  # after a delete it is looked up, and is gone
    assert store.path(PackageRef("proj", "other", 0, "0" * 32)) is None
