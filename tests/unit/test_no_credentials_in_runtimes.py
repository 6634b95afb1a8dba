"""No service credential reaches user code: the local runtime's environment, Kubernetes pod specs."""

from __future__ import annotations

import json

from engine.kubernetes import manifests
from engine.local import runtime_environment


def test_local_runtimes_inherit_no_credentials(monkeypatch):
    for name in ("OS_PASSWORD", "OS_AUTH_URL", "OS_TOKEN", "DATABASE_URL", "AWS_SECRET_ACCESS_KEY", "HEADWATER_SECRET"):
        monkeypatch.setenv(name, "s3cret")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer s3cret")
    monkeypatch.setenv("HEADWATER_RUNTIME_TOKEN", "s3cret")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces")
    env = runtime_environment()
    assert not any("s3cret" in v for v in env.values()), env
    assert env.get("LC_ALL") == "C.UTF-8" and "PATH" in env
    # Where the runtime sends its spans (tracing) is no secret and it needs it.
    assert env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "http://collector:4318/v1/traces"


def test_pod_specs_carry_no_credentials():
    pool = manifests.pool_deployment("rt", "img", replicas=1, port=9090)
    pod = manifests.image_pod("p", image="img", function_id="f", version=0, execution_id="e", args=[], input_json="{}",
                              cpu=100, memory=1 << 25, timeout=5)
    for spec in (pool["spec"]["template"]["spec"], pod["spec"]):
        assert spec["automountServiceAccountToken"] is False
        names = {e["name"] for c in spec["containers"] for e in c.get("env", [])}
        assert names <= {"HEADWATER_RUNTIME_HOST", "HEADWATER_RUNTIME_PORT", "HEADWATER_INPUT", "HEADWATER_EXECUTION_ID"}, names
        assert not any("envFrom" in c for c in spec["containers"])
        text = json.dumps(spec).lower()
        assert "password" not in text and "x-auth-token" not in text
