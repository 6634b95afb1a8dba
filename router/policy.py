"""Policy in code (oslo.policy): one rule per API action, OpenStack's 2024+ personas as defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from oslo_config import cfg
from oslo_policy import _checks, policy

from router.config import Config, ConfigError

# The personas (https://docs.openstack.org/keystone/latest/admin/service-api-protection.html).
# Keystone's implied roles make every manager a member and every member a reader.
ADMIN = "role:admin"
PROJECT_MANAGER = "role:manager and project_id:%(project_id)s"
PROJECT_MEMBER = "role:member and project_id:%(project_id)s"
PROJECT_READER = "role:reader and project_id:%(project_id)s"
SERVICE = "role:service"

BASE_RULES = [
    policy.RuleDefault("context_is_admin", "rule:admin", "Who is an administrator: sees every project with all_projects/project_id."),
    policy.RuleDefault("admin", ADMIN, "The cloud administrator."),
    policy.RuleDefault("service", SERVICE, "Another OpenStack service acting on behalf of a project."),
    policy.RuleDefault("project_manager", PROJECT_MANAGER, "A manager of the target's project."),
    policy.RuleDefault("project_member", PROJECT_MEMBER, "A member of the target's project."),
    policy.RuleDefault("project_reader", PROJECT_READER, "A reader of the target's project."),
    policy.RuleDefault("admin_or_reader", "rule:admin or rule:project_reader", "Reads."),
    policy.RuleDefault("admin_or_member", "rule:admin or rule:project_member", "Writes and invocations."),
]

_READ, _WRITE, _ADMIN = "rule:admin_or_reader", "rule:admin_or_member", "rule:admin"

# (rule name, check, description, [(method, path), ...]): the API's actions. A route of the app
# without a rule here is refused (403), and tests/unit/test_policy.py fails until it has one.
ACTIONS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("headwater:metrics:get", _ADMIN + " or rule:service", "Prometheus metrics of every project.", [("GET", "/metrics")]),
    ("headwater:runtimes:create", _ADMIN, "Create a runtime.", [("POST", "/v1/runtimes")]),
    ("headwater:runtimes:list", _READ, "List public runtimes and the project's own.", [("GET", "/v1/runtimes")]),
    ("headwater:runtimes:get", _READ, "Show a runtime.", [("GET", "/v1/runtimes/{id}")]),
    ("headwater:runtimes:update", _ADMIN, "Update a runtime.", [("PUT", "/v1/runtimes/{id}")]),
    ("headwater:runtimes:delete", _ADMIN, "Delete a runtime.", [("DELETE", "/v1/runtimes/{id}")]),
    ("headwater:runtimes:pool", _ADMIN, "Show a runtime's worker pool.", [("GET", "/v1/runtimes/{id}/pool")]),
    ("headwater:functions:create", _WRITE, "Create a function.", [("POST", "/v1/functions")]),
    ("headwater:functions:list", _READ, "List functions.", [("GET", "/v1/functions")]),
    ("headwater:functions:get", _READ, "Show a function or download its package.", [("GET", "/v1/functions/{id}")]),
    ("headwater:functions:update", _WRITE, "Update a function.", [("PUT", "/v1/functions/{id}")]),
    ("headwater:functions:delete", _WRITE, "Delete a function.", [("DELETE", "/v1/functions/{id}")]),
    ("headwater:functions:detach", _ADMIN, "Release a function's workers.",
     [("POST", "/v1/functions/{id}/detach"), ("POST", "/v1/functions/{id}/versions/{version}/detach")]),
    ("headwater:functions:scale", _ADMIN, "Scale a function's workers.",
     [("POST", "/v1/functions/{id}/scale_up"), ("POST", "/v1/functions/{id}/scale_down"),
      ("POST", "/v1/functions/{id}/versions/{version}/scale_up"), ("POST", "/v1/functions/{id}/versions/{version}/scale_down")]),
    ("headwater:functions:workers", _ADMIN, "List a function's workers.", [("GET", "/v1/functions/{id}/workers")]),
    ("headwater:versions:create", _WRITE, "Create a function version.", [("POST", "/v1/functions/{id}/versions")]),
    ("headwater:versions:list", _READ, "List a function's versions.", [("GET", "/v1/functions/{id}/versions")]),
    ("headwater:versions:get", _READ, "Show a version or download its package.", [("GET", "/v1/functions/{id}/versions/{version}")]),
    ("headwater:versions:delete", _WRITE, "Delete a version.", [("DELETE", "/v1/functions/{id}/versions/{version}")]),
    ("headwater:aliases:create", _WRITE, "Create an alias.", [("POST", "/v1/aliases")]),
    ("headwater:aliases:list", _READ, "List aliases.", [("GET", "/v1/aliases")]),
    ("headwater:aliases:get", _READ, "Show an alias.", [("GET", "/v1/aliases/{name}")]),
    ("headwater:aliases:update", _WRITE, "Update an alias.", [("PUT", "/v1/aliases/{name}")]),
    ("headwater:aliases:delete", _WRITE, "Delete an alias.", [("DELETE", "/v1/aliases/{name}")]),
    ("headwater:executions:create", _WRITE, "Run a function.", [("POST", "/v1/executions")]),
    ("headwater:executions:list", _READ, "List executions.", [("GET", "/v1/executions")]),
    ("headwater:executions:get", _READ, "Show an execution.", [("GET", "/v1/executions/{id}")]),
    ("headwater:executions:log", _READ, "Show an execution's log.", [("GET", "/v1/executions/{id}/log")]),
    ("headwater:executions:delete", _WRITE, "Delete an execution.", [("DELETE", "/v1/executions/{id}")]),
    ("headwater:webhooks:create", _WRITE, "Create a webhook.", [("POST", "/v1/webhooks")]),
    ("headwater:webhooks:list", _READ, "List webhooks.", [("GET", "/v1/webhooks")]),
    ("headwater:webhooks:get", _READ, "Show a webhook.", [("GET", "/v1/webhooks/{id}")]),
    ("headwater:webhooks:update", _WRITE, "Update a webhook.", [("PUT", "/v1/webhooks/{id}")]),
    ("headwater:webhooks:delete", _WRITE, "Delete a webhook.", [("DELETE", "/v1/webhooks/{id}")]),
    ("headwater:jobs:create", _WRITE, "Create a cron job.", [("POST", "/v1/jobs")]),
    ("headwater:jobs:list", _READ, "List jobs.", [("GET", "/v1/jobs")]),
    ("headwater:jobs:get", _READ, "Show a job.", [("GET", "/v1/jobs/{id}")]),
    ("headwater:jobs:update", _WRITE, "Update a job.", [("PUT", "/v1/jobs/{id}")]),
    ("headwater:jobs:delete", _WRITE, "Delete a job.", [("DELETE", "/v1/jobs/{id}")]),
    ("headwater:subscriptions:create", _WRITE, "Create a subscription, or many in one request.",
     [("POST", "/v1/subscriptions"), ("POST", "/v1/subscriptions/batch")]),
    ("headwater:subscriptions:test", _READ, "Dry-run an event against the project's subscriptions.", [("POST", "/v1/subscriptions/test")]),
    ("headwater:subscriptions:list", _READ, "List subscriptions.", [("GET", "/v1/subscriptions")]),
    ("headwater:subscriptions:get", _READ, "Show a subscription.", [("GET", "/v1/subscriptions/{id}")]),
    ("headwater:subscriptions:update", _WRITE, "Edit a subscription (name, filters, status...).", [("PUT", "/v1/subscriptions/{id}")]),
    ("headwater:subscriptions:delete", _WRITE, "Delete a subscription.", [("DELETE", "/v1/subscriptions/{id}")]),
    ("headwater:events:create", _WRITE + " or rule:service", "Post a CloudEvent into the project.", [("POST", "/v1/events")]),
    ("headwater:events:list", _READ, "List the project's event history.", [("GET", "/v1/events")]),
    ("headwater:events:get", _READ, "Show a past event.", [("GET", "/v1/events/{id}")]),
    ("headwater:events:replay", _WRITE, "Replay past events to a subscription.", [("POST", "/v1/events/replay")]),
    ("headwater:events:create_for_any_project", _ADMIN + " or rule:service",
     "Keep the projectid a posted CloudEvent names instead of stamping the caller's project.", []),
    ("headwater:deadletters:list", _READ, "List dead letters.", [("GET", "/v1/deadletters")]),
    ("headwater:deadletters:get", _READ, "Show a dead letter.", [("GET", "/v1/deadletters/{id}")]),
    ("headwater:deadletters:replay", _WRITE, "Publish a dead letter's event again and remove the letter.",
     [("POST", "/v1/deadletters/{id}/replay")]),
    ("headwater:deadletters:delete", _WRITE, "Discard a dead letter.", [("DELETE", "/v1/deadletters/{id}")]),
    ("headwater:dashboard:tail", _READ, "Watch the project's events live (the dashboard's tail, `headwater events tail`).",
     [("GET", "/dashboard/api/stream")]),
    ("headwater:dashboard:minutes", _ADMIN, "Per-minute counts of the whole service (every project's events).",
     [("GET", "/dashboard/api/minutes")]),
    ("headwater:dashboard:check_filter", _READ, "Check a subscription filter, optionally against an event (nothing is stored).",
     [("POST", "/dashboard/api/filter")]),
]

# Answered without a token: discovery, health, the OpenAPI document, Qinling's unauthenticated
# webhook invoke (optionally signed, see sources/http) and endpoints that check their own
# credentials (package downloads with an engine token; Aodh and Zaqar push with a shared token).
PUBLIC_ROUTES: set[tuple[str, str]] = {
    ("GET", "/"), ("GET", "/v1"), ("GET", "/v1/"), ("GET", "/healthz"), ("GET", "/v1/openapi.json"),
    ("POST", "/v1/webhooks/{id}/invoke"),
    # The dashboard's pages and static files hold no data: every call they make is an API request
    # with the user's token, scoped and checked like any other.
    ("GET", "/dashboard"), ("GET", "/dashboard/"), ("GET", "/dashboard/static/{name}"),
}


def rule_defaults() -> list[policy.RuleDefault]:
    return BASE_RULES + [policy.DocumentedRuleDefault(name, check, description,
                                                      [{"method": m, "path": p} for m, p in ops] or [{"method": "POST", "path": "/v1/events"}])
                         for name, check, description, ops in ACTIONS]


def rule_for_route() -> dict[tuple[str, str], str]:
    return {op: name for name, _check, _description, ops in ACTIONS for op in ops}


# Checks whose answer depends only on the credentials and the target (no remote call, no clock):
# a decision built from these alone can be remembered. An `http:` check or a plugin's is asked every time.
_PURE_CHECKS = (_checks.AndCheck, _checks.OrCheck, _checks.NotCheck, _checks.RoleCheck, _checks.GenericCheck,
                _checks.RuleCheck, _checks.TrueCheck, _checks.FalseCheck)
_DECISIONS_MAX = 10_000  # remembered decisions before the table starts afresh (user ids are unbounded)


def _frozen(mapping: Mapping[str, Any]) -> tuple:
    """A credentials or target mapping as a hashable key (lists as tuples); TypeError if a value
    cannot be one."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in mapping.items()))


class PolicyError(Exception):
    """The caller's roles do not allow the action (403)."""


class Policy:
    """The enforcer: the rules in code, overridden by [oslo_policy] policy_file."""

    def __init__(self, config: Config):
        conf = cfg.ConfigOpts()
        conf([], project="headwater", default_config_files=[], default_config_dirs=[])
        path = config.oslo_policy.policy_file
        self.policy_file = str(path) if path else None
        if self.policy_file and not os.path.isfile(self.policy_file):
            raise ConfigError(f"[oslo_policy] policy_file {self.policy_file} does not exist")
        self.enforcer = policy.Enforcer(conf, policy_file=self.policy_file, use_conf=bool(self.policy_file))
        # No policy.d directories: only the named file, so what is in force is what the operator wrote.
        conf.set_override("policy_dirs", [], "oslo_policy")
        self.enforcer.register_defaults(rule_defaults())
        try:
            self.enforcer.load_rules(force_reload=True)
        except Exception as exc:  # a YAML/JSON syntax error, or a rule that does not parse
            raise ConfigError(f"[oslo_policy] policy_file {self.policy_file} could not be loaded: {exc}") from None
        self._by_route = rule_for_route()
        # Decisions per (rule, credentials, target): oslo.policy re-reads its configuration and
        # walks the rule tree on every enforce (~0.2 ms, each API request pays it). A changed
        # policy file (oslo.policy reloads it by mtime) empties the table.
        self._decisions: dict[tuple, bool] = {}
        self._pure: dict[str, bool] = {}
        self._file_stamp = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        if not self.policy_file:
            return None
        try:
            st = os.stat(self.policy_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def rule_for(self, method: str, path: str) -> str | None:
        return self._by_route.get((method, path))

    def allowed(self, rule: str, credentials: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
        if self.policy_file and self._stamp() != self._file_stamp:
            self._file_stamp = self._stamp()
            self._decisions.clear()
            self._pure.clear()
        try:
            key = (rule, _frozen(credentials), _frozen(target))
            hash(key)
        except TypeError:  # a value that cannot be a key: decide without remembering
            return bool(self.enforcer.enforce(rule, dict(target), dict(credentials)))
        decision = self._decisions.get(key)
        if decision is None:
            decision = bool(self.enforcer.enforce(rule, dict(target), dict(credentials)))
            if self._is_pure(rule):
                if len(self._decisions) >= _DECISIONS_MAX:
                    self._decisions.clear()
                self._decisions[key] = decision
        return decision

    def _is_pure(self, rule: str) -> bool:
        """Whether the rule's answer depends on nothing but credentials and target (checked once
        per rule, after enforce has loaded the rules)."""
        if rule not in self._pure:
            self._pure[rule] = self._check_is_pure(self.enforcer.rules.get(rule), set())
        return self._pure[rule]

    def _check_is_pure(self, check: Any, seen: set[str]) -> bool:
        if check is None or not isinstance(check, _PURE_CHECKS):
            return False
        if isinstance(check, (_checks.AndCheck, _checks.OrCheck)):
            return all(self._check_is_pure(c, seen) for c in check.rules)
        if isinstance(check, _checks.NotCheck):
            return self._check_is_pure(check.rule, seen)
        if isinstance(check, _checks.RuleCheck):
            if check.match in seen:
                return True  # a cycle: its members are judged on their other branches
            return self._check_is_pure(self.enforcer.rules.get(check.match), seen | {check.match})
        return True


def sample() -> str:
    """The default rules as a YAML policy file, every rule commented out (oslopolicy-sample-generator style)."""
    lines = ["# Headwater policy defaults. Uncomment a rule to change it; [oslo_policy] policy_file names this file.", ""]
    for rule in rule_defaults():
        lines.append(f"# {rule.description}")
        for op in getattr(rule, "operations", None) or ():
            lines.append(f"# {op['method']}  {op['path']}")
        lines.append(f'#"{rule.name}": "{rule.check_str}"')
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
