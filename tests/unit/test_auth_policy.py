"""Authentication strategy, policy in code and the policy file, request ids and the audit log (no Keystone needed)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import Config, ConfigError
from router.policy import PUBLIC_ROUTES, Policy, rule_for_route, sample

ROOT = Path(__file__).resolve().parents[2]


async def test_every_route_of_the_app_has_a_policy_rule_or_is_public(make_headwater):
    hw = await make_headwater("null", sources={"enabled": "http,cron,aodh,zaqar"})
    routes = {(r.method, r.resource.canonical) for r in hw.web.router.routes() if r.method != "HEAD"}
    rules = rule_for_route()
    uncovered = {r for r in routes if r not in rules and r not in hw.public_routes}
    assert not uncovered, f"routes without a policy rule: {sorted(uncovered)}"
    stale = set(rules) - routes
    assert not stale, f"policy rules for routes that do not exist: {sorted(stale)}"


def test_reader_can_read_but_not_write(tmp_path):
    policy = Policy(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))
    reader = {"roles": ["reader"], "project_id": "p1", "user_id": "carol"}
    member = {"roles": ["member", "reader"], "project_id": "p1", "user_id": "alice"}
    target = {"project_id": "p1"}
    assert policy.allowed("headwater:functions:list", reader, target)
    assert not policy.allowed("headwater:functions:create", reader, target)
    assert not policy.allowed("headwater:executions:create", reader, target)
    assert policy.allowed("headwater:executions:create", member, target)
    assert not policy.allowed("headwater:executions:create", member, {"project_id": "p2"})
    assert not policy.allowed("headwater:runtimes:create", member, target)
    assert policy.allowed("headwater:runtimes:create", {"roles": ["admin"], "project_id": "admin"}, target)
    assert not policy.allowed("context_is_admin", member, {})


def test_policy_file_overrides_a_rule(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text('"headwater:functions:list": "role:admin"\n')
    policy = Policy(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "oslo_policy": {"policy_file": str(path)}}))
    assert not policy.allowed("headwater:functions:list", {"roles": ["reader"], "project_id": "p1"}, {"project_id": "p1"})


def test_remembered_decisions_follow_a_changed_policy_file(tmp_path):
    """Decisions are remembered per (rule, credentials, target); an edited policy file, which
    oslo.policy reloads while the server runs, still takes effect at once."""
    import os

    path = tmp_path / "policy.yaml"
    path.write_text('"headwater:functions:list": "role:admin"\n')
    policy = Policy(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "oslo_policy": {"policy_file": str(path)}}))
    reader = {"roles": ["reader"], "project_id": "p1", "user_id": "carol"}
    assert not policy.allowed("headwater:functions:list", reader, {"project_id": "p1"})
    assert not policy.allowed("headwater:functions:list", reader, {"project_id": "p1"})  # remembered
    path.write_text('"headwater:functions:list": "role:reader or role:admin"\n')
    stamp = path.stat().st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(stamp, stamp))
    assert policy.allowed("headwater:functions:list", reader, {"project_id": "p1"})
    # Each caller and target is its own decision.
    assert not policy.allowed("headwater:functions:create", reader, {"project_id": "p1"})
    member = {"roles": ["member"], "project_id": "p1", "user_id": "alice"}
    assert policy.allowed("headwater:functions:create", member, {"project_id": "p1"})
    assert not policy.allowed("headwater:functions:create", member, {"project_id": "p2"})


def test_a_check_that_may_change_its_answer_is_asked_every_time(tmp_path):
    """Only checks of credentials and target are remembered: an external check (http:, a
    plugin's) is asked on every request."""
    from oslo_policy import _checks
    from oslo_policy import policy as oslo_policy

    asked = []

    class Counting(_checks.Check):
        def __call__(self, target, creds, enforcer, current_rule=None):
            asked.append(creds["user_id"])
            return True

    path = tmp_path / "policy.yaml"
    path.write_text('"headwater:functions:list": "counting:x"\n')
    oslo_policy.register("counting", Counting)
    try:
        policy = Policy(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "oslo_policy": {"policy_file": str(path)}}))
        reader = {"roles": ["reader"], "project_id": "p1", "user_id": "carol"}
        for _ in range(3):
            assert policy.allowed("headwater:functions:list", reader, {"project_id": "p1"})
    finally:
        _checks.registered_checks.pop("counting", None)
    assert asked == ["carol"] * 3


@pytest.mark.parametrize("text", ['"headwater:functions:list": "role:admin\n  - [', "{not: [valid"])
def test_a_policy_file_with_a_syntax_error_stops_start_up_naming_the_file(tmp_path, text):
    path = tmp_path / "broken-policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        Policy(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "oslo_policy": {"policy_file": str(path)}}))


def test_serve_with_a_broken_policy_file_exits_naming_it(tmp_path):
    path = tmp_path / "broken-policy.yaml"
    path.write_text("{not: [valid")
    conf = tmp_path / "hw.conf"
    conf.write_text(f"[oslo_policy]\npolicy_file = {path}\n")
    proc = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--config-file", str(conf), "--data-dir",
                           str(tmp_path), "--port", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert str(path) in proc.stderr


def test_a_missing_policy_file_stops_start_up(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Policy(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)},
                                      "oslo_policy": {"policy_file": str(tmp_path / "nope.yaml")}}))


def test_policy_sample_lists_every_rule_and_is_the_shipped_sample():
    text = sample()
    for rule in rule_for_route().values():
        assert f'#"{rule}":' in text
    assert (ROOT / "etc" / "policy.yaml.sample").read_text() == text, \
        "etc/policy.yaml.sample is stale: run `headwater policy-sample > etc/policy.yaml.sample`"
    proc = subprocess.run([sys.executable, "-m", "router.cli", "policy-sample"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout == text


def test_keystone_strategy_needs_the_service_credentials(tmp_path):
    with pytest.raises(ConfigError, match=r"\[keystone_authtoken\] auth_url"):
        Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "auth": {"strategy": "keystone"}})


def test_start_up_log_masks_credentials(tmp_path):
    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "auth": {"strategy": "keystone"},
                                    "keystone_authtoken": {"auth_url": "http://k/v3", "password": "s3cret"}})
    assert "s3cret" not in repr(config.summary())


def test_public_routes_are_only_discovery_health_openapi_webhook_invoke_and_dashboard_files():
    # The dashboard's pages and static files hold no data; its API calls (tail, counts, filter
    # check) are not public and each has a rule.
    assert PUBLIC_ROUTES == {("GET", "/"), ("GET", "/v1"), ("GET", "/v1/"), ("GET", "/healthz"),
                             ("GET", "/v1/openapi.json"), ("POST", "/v1/webhooks/{id}/invoke"),
                             ("GET", "/dashboard"), ("GET", "/dashboard/"), ("GET", "/dashboard/static/{name}")}
    rules = rule_for_route()
    for route in (("GET", "/dashboard/api/stream"), ("GET", "/dashboard/api/minutes"), ("POST", "/dashboard/api/filter"),
                  ("PUT", "/v1/subscriptions/{id}"), ("POST", "/v1/deadletters/{id}/replay"),
                  ("DELETE", "/v1/deadletters/{id}")):
        assert route in rules and route not in PUBLIC_ROUTES, route


def test_new_integration_routes_follow_the_personas(tmp_path):
    policy = Policy(Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}}))
    reader = {"roles": ["reader"], "project_id": "p1", "user_id": "carol"}
    member = {"roles": ["member", "reader"], "project_id": "p1", "user_id": "alice"}
    target = {"project_id": "p1"}
    for rule in ("headwater:subscriptions:update", "headwater:deadletters:replay", "headwater:deadletters:delete"):
        assert policy.allowed(rule, member, target) and not policy.allowed(rule, reader, target), rule
        assert not policy.allowed(rule, member, {"project_id": "p2"}), rule
    for rule in ("headwater:dashboard:tail", "headwater:dashboard:check_filter"):
        assert policy.allowed(rule, reader, target), rule
    assert not policy.allowed("headwater:dashboard:minutes", member, target)
    assert policy.allowed("headwater:dashboard:minutes", {"roles": ["admin"], "project_id": "admin"}, target)


async def test_every_answer_carries_a_request_id_and_writes_are_audited(make_headwater, caplog):
    hw = await make_headwater("null")
    caplog.set_level(logging.INFO, logger="headwater.audit")
    ok = await hw.client.get("/v1/functions")
    missing = await hw.client.get("/v1/functions/00000000-0000-0000-0000-000000000000")
    bad = await hw.client.post("/v1/runtimes", json={})
    ids = {r.headers["X-Openstack-Request-Id"] for r in (ok, missing, bad)}
    assert len(ids) == 3 and all(i.startswith("req-") for i in ids)
    audits = [r for r in caplog.records if r.name == "headwater.audit"]
    assert len(audits) == 1, "reads are not audited, each write is, once"
    line = audits[0]
    assert line.request_id == bad.headers["X-Openstack-Request-Id"]
    assert (line.action, line.outcome, line.status, line.project_id) == ("headwater:runtimes:create", "failure", 400, "default")


async def test_noauth_on_a_public_address_warns_loudly(tmp_path, caplog):
    import asyncio

    from router.app import Headwater, serve
    from tests.e2e.server import free_port

    config = Config.load(overrides={"DEFAULT": {"data_dir": str(tmp_path)}, "engine": {"backend": "null"},
                                    "api": {"host": "0.0.0.0", "port": str(free_port())}})
    caplog.set_level(logging.WARNING, logger="router.app")
    task = asyncio.get_running_loop().create_task(serve(Headwater(config)))
    try:
        while not any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records):
            assert not task.done(), task
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_api_handlers_reach_the_store_only_through_the_request_scope():
    """No handler may query the unscoped store: `store(request)` is the caller's view."""
    offenders = []
    for path in (ROOT / "router" / "api").glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"hw\(request\)\.store\b|\bapp\.store\.(?!runtimes\.update)", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


async def test_head_follows_the_rule_of_get(make_headwater):
    hw = await make_headwater("null")
    assert (await hw.client.head("/v1/functions")).status == 200
    assert (await hw.client.head("/healthz")).status == 200
