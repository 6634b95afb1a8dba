"""On Kubernetes the pod is the boundary: pool pods are hardened, carry the runtime credential, and the
shipped NetworkPolicy keeps them from metadata, private ranges and each other."""

from __future__ import annotations

from pathlib import Path

import yaml

from engine.kubernetes import manifests
from engine.runtime_client import pool_runtime_token

ROOT = Path(__file__).resolve().parents[2]


def test_pool_pods_are_hardened_and_get_the_runtime_credential():
    token = pool_runtime_token(b"secret")
    dep = manifests.pool_deployment("rt", "img", replicas=1, port=9090,
                                    env={"HEADWATER_RUNTIME_TOKEN": token, "HEADWATER_RUNTIME_PACKAGE_URLS": "http://api/v1/functions/"})
    spec = dep["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HEADWATER_RUNTIME_TOKEN"] == token and len(token) == 64
    assert env["HEADWATER_RUNTIME_PACKAGE_URLS"] == "http://api/v1/functions/"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert pool_runtime_token(b"other") != token


def test_network_policy_fences_function_pods():
    docs = list(yaml.safe_load_all((ROOT / "etc" / "kubernetes" / "namespace.yaml").read_text()))
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "headwater"}}
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert [p["port"] for rule in spec["ingress"] for p in rule["ports"]] == [9090]
    blocks = [to["ipBlock"] for rule in spec["egress"] for to in rule["to"] if "ipBlock" in to]
    assert blocks and all("169.254.0.0/16" in b["except"] and "10.0.0.0/8" in b["except"] for b in blocks)
