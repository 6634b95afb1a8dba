"""Sources that authenticate through Keystone stamp their events with the token's project."""

from __future__ import annotations

from router.config import Config
from sources.zaqar import ZaqarClient
from tests.integration.keystone.conftest import KEYSTONE_URL


async def test_zaqar_client_under_keystone_takes_the_tokens_project(identities, tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "zaqar": {
        "auth_url": KEYSTONE_URL, "username": identities.bob.name, "password": identities.bob.password,
        "project_name": identities.admin.call("GET", f"/projects/{identities.p2}")["project"]["name"],
        "project_id": "default"}})
    client = ZaqarClient(config)
    try:
        headers = await client._headers()
    finally:
        await client.close()
    assert headers["X-Auth-Token"]
    assert client.project_id == identities.p2, "a queue's messages are its Keystone project's"
