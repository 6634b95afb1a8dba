"""The Swift package store against real Swift: the package store contract, a Swift that cannot be
reached, and a package uploaded through one replica running on another."""

from __future__ import annotations

import uuid

import pytest

from router.plugins import PackageRef, PackageStoreUnavailable
from tests.contract.test_package_store_contract import MD5, PACKAGE, PackageStoreContract, store_config
from tests.integration.openstack.conftest import SWIFT_URL, free_port

ACCOUNT = f"{SWIFT_URL}/v1/AUTH_headwater"


def swift_store(data_dir, url: str = ACCOUNT, container: str | None = None):
    from engine.swift_store import SwiftPackageStore

    return SwiftPackageStore(store_config(data_dir, provider="swift", swift_store_url=url,
                                          swift_store_container=container or f"hw-test-{uuid.uuid4().hex[:8]}"))


class TestSwiftPackageStore(PackageStoreContract):
    @pytest.fixture
    async def package_stores(self, openstack, tmp_path):
        """Two replicas: one Swift container, a cache directory each."""
        container = f"hw-contract-{uuid.uuid4().hex[:8]}"
        stores = [swift_store(tmp_path / f"replica{i}", container=container) for i in (1, 2)]
        yield stores
        for store in stores:
            await store.close()


async def test_an_unreachable_swift_refuses_the_upload_and_keeps_nothing(openstack, tmp_path):
    store = swift_store(tmp_path, url=f"http://127.0.0.1:{free_port()}/v1/AUTH_headwater")
    with pytest.raises(PackageStoreUnavailable, match="could not be reached"):
        await store.put("p", "f", 0, PACKAGE)
    assert store.path(PackageRef("p", "f", 0, MD5)) is None  # no replica-local copy that Swift lacks
    await store.close()


async def test_swift_store_needs_its_url(tmp_path):
    from engine.swift_store import SwiftPackageStore
    from router.config import ConfigError

    with pytest.raises(ConfigError, match=r"\[storage\] swift_store_url"):
        SwiftPackageStore(store_config(tmp_path, provider="swift"))


async def test_a_function_uploaded_through_one_replica_runs_on_the_others(router, tmp_path):
    """Three replicas share the database and the Swift container; each has its own package cache."""
    container = f"hw-replicas-{uuid.uuid4().hex[:8]}"
    replicas = []
    for i in range(3):
        replicas.append(await router([], engine={"backend": "local"},
                                     storage={"provider": "swift", "swift_store_url": ACCOUNT,
                                              "swift_store_container": container,
                                              "file_system_dir": str(tmp_path / f"cache{i}")}))
    first = replicas[0]
    function_id = await first.make_function()
    for replica in replicas[1:]:
        resp = await replica.client.post("/v1/executions", json={"function_id": function_id, "input": {"hello": "swift"}})
        body = await resp.json()
        assert resp.status == 201, body
        assert body["status"] == "success", body
        assert "swift" in body["result"], body
