"""The package store contract every backend passes: what one replica stores, every replica reads.

Each backend's subclass of PackageStoreContract provides `package_stores`: two stores that share the
backend but not their local files, as two Headwater replicas would. The filesystem store runs it here
on one shared volume; the Swift store against real Swift in
tests/integration/openstack/test_package_store_swift.py.
"""

from __future__ import annotations

import hashlib

import pytest

from router.config import Config
from router.plugins import PackageInvalid, PackageRef, PackageStore
from tests.e2e.server import make_zip

PACKAGE = make_zip({"main.py": "def main():\n    return 'packaged'\n"})
MD5 = hashlib.md5(PACKAGE).hexdigest()


def store_config(data_dir, **storage) -> Config:
    return Config.load(overrides={"DEFAULT": {"data_dir": str(data_dir)}, "storage": storage})


class PackageStoreContract:
    """Subclasses provide the fixture `package_stores`: two replicas' stores on one backend."""

    async def test_is_a_package_store(self, package_stores):
        assert all(isinstance(store, PackageStore) for store in package_stores)

    async def test_a_package_stored_through_one_replica_is_read_by_another(self, package_stores):
        first, second = package_stores
        project, function = "p-contract", "f-read"
        assert await first.put(project, function, 0, PACKAGE) == MD5
        ref = PackageRef(project, function, 0, MD5)
        assert await second.get(ref) == PACKAGE
        assert await first.get(ref) == PACKAGE
        # After a read, a replica has the zip on its own disk for the local engine to open.
        path = second.path(ref)
        assert path is not None and open(path, "rb").read() == PACKAGE

    async def test_a_version_copied_on_one_replica_is_read_by_another(self, package_stores):
        first, second = package_stores
        project, function = "p-contract", "f-copy"
        await first.put(project, function, 0, PACKAGE)
        copied = await first.copy(PackageRef(project, function, 0, MD5), 4)
        assert copied == PackageRef(project, function, 4, MD5)
        assert await second.get(copied) == PACKAGE

    async def test_a_deleted_package_is_gone_for_replicas_that_had_not_read_it(self, package_stores):
        first, second = package_stores
        project, function = "p-contract", "f-delete"
        await first.put(project, function, 0, PACKAGE)
        ref = PackageRef(project, function, 0, MD5)
        await first.delete(ref)
        await first.delete(ref)  # twice is fine
        for store in package_stores:
            with pytest.raises(FileNotFoundError):
                await store.get(ref)
        assert first.path(ref) is None

    async def test_a_missing_package_is_file_not_found(self, package_stores):
        with pytest.raises(FileNotFoundError):
            await package_stores[1].get(PackageRef("p-contract", "f-never", 0, "0" * 32))

    @pytest.mark.parametrize("data,md5,message", [
        (b"definitely not a zip", None, "not a valid ZIP"),
        (PACKAGE, "f" * 32, "md5 mismatch"),
    ])
    async def test_a_refused_package_is_stored_nowhere(self, package_stores, data, md5, message):
        first, second = package_stores
        with pytest.raises(PackageInvalid, match=message):
            await first.put("p-contract", "f-refused", 0, data, md5)
        digest = hashlib.md5(data).hexdigest()
        for store in package_stores:
            with pytest.raises(FileNotFoundError):
                await store.get(PackageRef("p-contract", "f-refused", 0, digest))


class TestFilesystemPackageStore(PackageStoreContract):
    @pytest.fixture
    async def package_stores(self, tmp_path):
        """Two replicas' stores on one shared volume (the filesystem backend's multi-replica set-up)."""
        from engine.packages import FilesystemPackageStore

        shared = tmp_path / "shared-volume"
        stores = [FilesystemPackageStore(store_config(tmp_path / f"replica{i}", file_system_dir=str(shared))) for i in (1, 2)]
        yield stores
        for store in stores:
            await store.close()
