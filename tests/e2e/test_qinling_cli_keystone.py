"""The real `openstack function …` CLI with password auth through a real Keystone, against a
`headwater serve` with [auth] strategy = keystone: the catalog leads the CLI to Headwater, each
user works in their own project and sees only its resources."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.e2e.server import Server
from tests.e2e.test_qinling_cli import HELLO, Cli, osc_python, wait_for
from tests.integration.keystone import conftest as keystone

identities = keystone.identities  # the session fixture, shared with the Keystone integration tests

pytestmark = pytest.mark.slow


class PasswordCli(Cli):
    """`openstack --os-auth-url … --os-username … --os-password …`: the endpoint comes from the catalog."""

    def __init__(self, python, user: keystone.User, region: str, workdir):
        super().__init__(python, "unused", workdir)
        self.base = ["--os-auth-type", "password", "--os-auth-url", keystone.KEYSTONE_URL,
                     "--os-identity-api-version", "3", "--os-username", user.name, "--os-password", user.password,
                     "--os-user-domain-id", "default", "--os-project-id", user.project_id, "--os-region-name", region,
                     "--os-interface", "public"]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, identities):
    python = osc_python()
    ids = identities
    conf = (f"[auth]\nstrategy = keystone\n[keystone_authtoken]\nauth_url = {keystone.KEYSTONE_URL}\n"
            f"username = {ids.service.name}\npassword = {ids.service.password}\nproject_name = service\n")
    with Server(tmp_path_factory.mktemp("headwater-ks-cli"), conf) as server:
        # Headwater in the catalog, in a region of its own: Keystone is shared between test runs.
        region = f"hw-{uuid.uuid4().hex[:8]}"
        ids.admin.call("POST", "/regions", json={"region": {"id": region}})
        service = ids.admin.call("POST", "/services", json={"service": {"type": "function-engine", "name": "headwater"}})["service"]
        for interface in ("public", "internal", "admin"):
            ids.admin.call("POST", "/endpoints", json={"endpoint": {
                "service_id": service["id"], "interface": interface, "region_id": region, "url": server.url}})
        work = tmp_path_factory.mktemp("cli-ks-work")
        clis = {name: PasswordCli(python, getattr(ids, attr), region, work)
                for name, attr in (("admin", "admin_user"), ("alice", "alice"), ("bob", "bob"), ("carol", "carol"))}
        try:
            yield clis, server
        finally:
            for c in clis.values():
                c.close()
            ids.admin.call("DELETE", f"/services/{service['id']}")


def test_cli_with_password_auth_works_in_its_own_project(cloud, identities):
    clis, server = cloud
    admin, alice, bob, carol = clis["admin"], clis["alice"], clis["bob"], clis["carol"]
    runtime = admin.json("runtime", "create", "openstackqinling/python3-runtime:0.0.2", "--name", "python3")
    assert runtime["status"] == "available"
    failed = alice("runtime", "create", "openstackqinling/python3-runtime:0.0.2", ok=False)
    assert failed["rc"] != 0, "only admins create runtimes"

    source = alice.workdir / "hello.py"
    source.write_text(HELLO)
    fn = alice.json("function", "create", "--runtime", runtime["id"], "--name", "hello", "--file", str(source),
                    "--entry", "hello.main")
    assert fn["project_id"] == identities.p1
    theirs = bob.json("function", "create", "--runtime", runtime["id"], "--name", "bobs", "--file", str(source),
                      "--entry", "hello.main")
    assert theirs["project_id"] == identities.p2

    run = alice.json("function", "execution", "create", "--function", fn["id"], "--input", '{"name": "Keystone"}')
    assert run["status"] == "success" and json.loads(run["result"])["output"] == "Hello, Keystone"
    job = alice.json("job", "create", "--function", fn["id"], "--name", "yearly", "--pattern", "0 0 1 1 *")
    hook = alice.json("webhook", "create", "--function", fn["id"])
    assert hook["webhook_url"].startswith(server.url)

    assert {f["Id"] for f in alice.json("function", "list")} == {fn["id"]}
    assert {f["Id"] for f in bob.json("function", "list")} == {theirs["id"]}
    assert {j["Id"] for j in alice.json("job", "list")} == {job["id"]}
    assert bob.json("job", "list") == [] and bob.json("webhook", "list") == []
    assert {w["Id"] for w in alice.json("webhook", "list")} == {hook["id"]}
    assert {e["Id"] for e in alice.json("function", "execution", "list")} == {run["id"]}
    assert bob.json("function", "execution", "list") == []
    assert bob("function", "show", fn["id"], ok=False)["rc"] != 0, "another project's function does not exist"

    # carol reads P1 but may not change or run anything there
    assert {f["Id"] for f in carol.json("function", "list")} == {fn["id"]}
    assert carol("function", "execution", "create", "--function", fn["id"], ok=False)["rc"] != 0
    assert carol("function", "delete", fn["id"], ok=False)["rc"] != 0

    alice("job", "delete", job["id"])
    alice("webhook", "delete", hook["id"])
    alice("function", "delete", fn["id"])
    wait_for(lambda: alice.json("function", "list") == [])
