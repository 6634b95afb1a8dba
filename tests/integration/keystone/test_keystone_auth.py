"""Keystone authentication against a real Keystone: valid and bad tokens, the 401 and 503 answers,
request ids, and an unreachable Keystone that comes back."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.keystone.conftest import SHORT_URL, issue_token, keystone_sections
from tests.integration.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow


@pytest.fixture
async def hw(make_headwater, identities):
    return await make_headwater("null", **keystone_sections(identities))


async def test_no_token_is_401_naming_keystone(hw):
    resp = await hw.client.get("/v1/functions")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Keystone uri=")
    assert resp.headers["X-Openstack-Request-Id"].startswith("req-")
    assert "X-Auth-Token" in (await resp.json())["faultstring"]


async def test_public_routes_need_no_token(hw):
    for path in ("/", "/healthz", "/v1"):
        resp = await hw.client.get(path)
        assert resp.status == 200, path
        assert resp.headers["X-Openstack-Request-Id"].startswith("req-")


async def test_valid_token_is_scoped_to_its_project(hw, identities):
    resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": identities.alice.token()})
    assert resp.status == 200
    assert (await resp.json())["functions"] == []


@pytest.mark.parametrize("token", ["garbage", "gAAAAA" + "x" * 200, "a b\tc", "é" * 10])
async def test_malformed_token_is_401(hw, token):
    resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})
    assert resp.status == 401
    assert "WWW-Authenticate" in resp.headers


async def test_revoked_token_is_401(hw, identities):
    token = identities.alice.token()
    identities.admin.revoke(token)
    resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})
    assert resp.status == 401


async def test_expired_token_is_401(hw, identities):
    # The short Keystone issues tokens that live a few seconds; both share keys and database.
    token = issue_token(identities.alice.name, identities.alice.password, identities.p1, SHORT_URL)
    resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})
    assert resp.status == 200
    # Wait on the condition (the token's own expiry), not on a guessed interval.
    expires = await _expiry(hw, token)
    while time.time() <= expires + 1:
        await asyncio.sleep(0.5)
    resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})
    assert resp.status == 401


async def _expiry(hw, token: str) -> float:
    identity = await hw.keystone.validate(token)
    return identity.expires_at.timestamp()


async def test_token_of_a_disabled_project_is_401(hw, identities, make_headwater):
    p = identities.admin.project(f"hw-disabled-{time.time_ns()}")
    user = identities.admin.user(f"dora-{time.time_ns()}", p, "member")
    token = user.token()
    assert (await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})).status == 200
    identities.admin.set_project_enabled(p, False)
    try:
        resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})
        assert resp.status == 401
    finally:
        identities.admin.set_project_enabled(p, True)


async def test_keystone_unreachable_is_503_and_recovers(make_headwater, identities):
    from urllib.parse import urlsplit

    from tests.integration.keystone.conftest import KEYSTONE_URL

    target = urlsplit(KEYSTONE_URL)
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.start()
    try:
        url = f"http://127.0.0.1:{proxy.port}/v3"
        hw = await make_headwater("null", **keystone_sections(identities, url=url))
        token = identities.alice.token()
        assert (await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})).status == 200
        await proxy.cut()
        resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})
        assert resp.status == 503
        assert "Identity service unavailable" in (await resp.json())["faultstring"]
        assert (await hw.client.get("/healthz")).status == 200  # the service stays up
        proxy.restore()
        assert (await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})).status == 200
    finally:
        await proxy.close()


async def test_a_keystone_connection_that_fails_once_is_retried_not_503(make_headwater, identities):
    """A Keystone that drops a connection (a restart, a full accept queue under load) is asked again
    (http_request_max_retries) before the caller is told it is unavailable."""
    from urllib.parse import urlsplit

    from tests.integration.keystone.conftest import KEYSTONE_URL

    target = urlsplit(KEYSTONE_URL)
    proxy = TcpProxy(target.hostname, target.port)
    await proxy.start()
    try:
        sections = keystone_sections(identities, url=f"http://127.0.0.1:{proxy.port}/v3")
        hw = await make_headwater("null", **sections)
        token = identities.alice.token()
        assert (await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})).status == 200
        await proxy.blip(refuse=2)
        assert (await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})).status == 200
        assert proxy.refused == 2
        # With no retries the same outage is a 503.
        sections["keystone_authtoken"]["http_request_max_retries"] = "0"
        hw = await make_headwater("null", **sections)
        assert (await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})).status == 200
        await proxy.blip(refuse=1)
        resp = await hw.client.get("/v1/functions", headers={"X-Auth-Token": token})
        assert resp.status == 503
        assert "Identity service unavailable" in (await resp.json())["faultstring"]
    finally:
        await proxy.close()
