"""The Kubernetes objects the engine creates: pool Deployments, image-function pods, NodePort Services, and
the labels that tie them to runtimes, functions and executions."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

PREFIX = "headwater.openstack.org/"
MANAGED_BY = "app.kubernetes.io/managed-by"
L_RUNTIME = PREFIX + "runtime"      # every pod made from a runtime's pool, claimed or not
L_POOL = PREFIX + "pool"            # only unclaimed pool pods: the Deployment's selector
L_FUNCTION = PREFIX + "function"    # claimed workers and image-function pods
L_VERSION = PREFIX + "version"
L_WORKER = PREFIX + "worker"        # a claimed worker's own name (NodePort Service selector)
L_ENGINE = PREFIX + "engine"        # the engine process that claimed the worker
L_EXECUTION = PREFIX + "execution"  # image-function pods
A_CLAIMED_AT = PREFIX + "claimed-at"
TRUSTED_SANDBOX = "io.kubernetes.cri-o.TrustedSandbox"
RUNTIME_CONTAINER = "runtime"
FUNCTION_CONTAINER = "function"

_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def label_value(text: str) -> str:
    """`text` as a label value (≤63 chars of [A-Za-z0-9_.-], alphanumeric at both ends); long or unsafe
    values keep a readable head and a hash, so distinct inputs stay distinct."""
    clean = _LABEL_UNSAFE.sub("-", text).strip("-_.")
    if clean == text and len(text) <= 63:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return (clean[:50].strip("-_.") + "-" + digest).strip("-_.")


def dns_name(prefix: str, text: str, limit: int = 40) -> str:
    """A DNS-1123 label `prefix-<text>` short enough that generated pod names stay under 63 characters."""
    clean = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")
    if clean != text or len(clean) > limit - len(prefix) - 1:
        clean = (clean[: limit - len(prefix) - 12].strip("-") + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]).strip("-")
    return f"{prefix}-{clean}"


def pool_name(runtime_id: str) -> str:
    return dns_name("hw-pool", runtime_id)


def pool_deployment(runtime_id: str, image: str, *, replicas: int, port: int, trusted: bool = True,
                    rollout_timeout: float = 300, pull_secrets: list[str] = (), env: dict[str, str] | None = None) -> dict[str, Any]:
    """One Deployment per runtime. Pods leave the pool by losing the `pool` label, so the ReplicaSet
    releases and replaces them: the pool refills instead of running dry (Qinling kept the selector label).
    The container has no command: each runtime image starts its own server (runtimes/*/Dockerfile)."""
    rid = label_value(runtime_id)
    labels = {MANAGED_BY: "headwater", L_RUNTIME: rid, L_POOL: rid}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": pool_name(runtime_id), "labels": {MANAGED_BY: "headwater", L_RUNTIME: rid},
                     "annotations": {PREFIX + "runtime-id": runtime_id}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {L_POOL: rid}},
            "progressDeadlineSeconds": max(1, int(rollout_timeout)),
            # Keep every warm pod serving while a new image rolls out; add one at a time.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": {TRUSTED_SANDBOX: "true" if trusted else "false"}},
                "spec": {
                    **_pod_hardening(pull_secrets),
                    "terminationGracePeriodSeconds": 5,
                    "volumes": [{"name": "work", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                    "containers": [{
                        "name": RUNTIME_CONTAINER, "image": image,
                        "ports": [{"name": "http", "containerPort": port}],
                        # The runtime listens on the pod IP only (downward API), never on 0.0.0.0.
                        "env": [{"name": "HEADWATER_RUNTIME_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                {"name": "HEADWATER_RUNTIME_PORT", "value": str(port)},
                                *({"name": k, "value": v} for k, v in sorted((env or {}).items()))],
                        "readinessProbe": {"httpGet": {"path": "/ping", "port": port}, "periodSeconds": 1,
                                           "timeoutSeconds": 1, "failureThreshold": 3},
                        "securityContext": _container_hardening(),
                        "volumeMounts": [{"name": "work", "mountPath": "/var/headwater/work"}, {"name": "tmp", "mountPath": "/tmp"}],
                    }],
                },
            },
        },
    }


def image_pod(name: str, *, image: str, function_id: str, version: int, execution_id: str, args: list[str],
              input_json: str, cpu: int, memory: int, timeout: float, pull_secrets: list[str] = ()) -> dict[str, Any]:
    """A pod for one execution of an image function. Limits sit on the *container* (Qinling put them on the
    pod spec, where Kubernetes ignores them); requests equal limits, so the pod is Guaranteed QoS."""
    resources = {"cpu": f"{int(cpu)}m", "memory": str(int(memory))}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name,
                     "labels": {MANAGED_BY: "headwater", L_FUNCTION: label_value(function_id), L_VERSION: str(version),
                                L_EXECUTION: label_value(execution_id)},
                     "annotations": {TRUSTED_SANDBOX: "false", PREFIX + "execution-id": execution_id}},
        "spec": {
            **_pod_hardening(pull_secrets),
            "restartPolicy": "Never",
            # A backstop: the kubelet ends the pod even if the engine that watches it is gone.
            "activeDeadlineSeconds": max(1, int(timeout) + 30),
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": FUNCTION_CONTAINER, "image": image, "args": args,
                "env": [{"name": "HEADWATER_INPUT", "value": input_json},
                        {"name": "HEADWATER_EXECUTION_ID", "value": execution_id}],
                "resources": {"limits": dict(resources), "requests": dict(resources)},
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


def worker_service(pod: dict[str, Any], port: int) -> dict[str, Any]:
    """A NodePort Service for one claimed worker, owned by the pod so it goes when the pod goes."""
    name = pod["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": dns_name("hw-w", name, limit=63)[:63].rstrip("-"),
                     "labels": {MANAGED_BY: "headwater", L_WORKER: label_value(name),
                                **{k: v for k, v in pod["metadata"].get("labels", {}).items() if k in (L_FUNCTION, L_VERSION)}},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": pod["metadata"]["uid"]}]},
        "spec": {"type": "NodePort", "selector": {L_WORKER: label_value(name)}, "ports": [{"port": port, "targetPort": port}]},
    }


def image_args(value: Any) -> tuple[list[str], str]:
    """Container args and HEADWATER_INPUT for an input: a string splits on whitespace (Qinling's
    behaviour), a list gives one arg per item, an object none — it is read from HEADWATER_INPUT."""
    as_json = json.dumps(value)
    if value is None or isinstance(value, dict):
        return [], as_json
    if isinstance(value, str):
        return value.split(), as_json
    if isinstance(value, list):
        return [v if isinstance(v, str) else json.dumps(v) for v in value], as_json
    return [json.dumps(value)], as_json


def _pod_hardening(pull_secrets) -> dict[str, Any]:
    spec: dict[str, Any] = {
        # Tenant code never sees a Kubernetes credential or the cluster's service list.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in pull_secrets]
    return spec


def _container_hardening() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
